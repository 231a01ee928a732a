//! NodeNetworks as the controller keeps them in its store.
//!
//! The controller is the only writer of NodeNetwork specs, and reads them for two things: the
//! blocks already given (kept across its restarts, see [`super::allocator`]) and whether a
//! node's spec already is what it would write. A spec as read from JSON holds three strings a
//! block (about 140 bytes with its allocations); [`Blocks`] holds the Network's name shared
//! between all nodes ([`Names`]) and each block as a parsed network (40 bytes a block), and
//! loses nothing: a spec whose text is not what its parsed form prints (a CIDR not in
//! canonical form, an address of the wrong family) keeps its text as well. The Networks the
//! agent reports realized are kept the same way ([`Realized`]): the agent of a node with 10k
//! Networks lists 10k names. Both are shared, not copied, by what the controller remembers of a
//! NodeNetwork's previous version (see `networks_touched`).

use crate::model::shared::LabelSets;
pub use crate::model::shared::Names;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use std::borrow::Cow;
use std::sync::Arc;
use weft_crds::{Cidr, NodeNetwork, NodeNetworkBlock, NodeNetworkSpec, NodeNetworkStatus};

/// One entry of [`Blocks`]: a Network and the node's block of each family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The Network's name.
    pub network: Arc<str>,
    /// The node's IPv4 block, if the entry has a valid one.
    pub ipv4: Option<Ipv4Net>,
    /// The node's IPv6 block, if the entry has a valid one.
    pub ipv6: Option<Ipv6Net>,
}

impl Entry {
    /// The block of the family of `ipv6`.
    pub fn block(&self, ipv6: bool) -> Option<IpNet> {
        if ipv6 {
            self.ipv6.map(IpNet::V6)
        } else {
            self.ipv4.map(IpNet::V4)
        }
    }

    fn to_block(&self) -> NodeNetworkBlock {
        NodeNetworkBlock {
            network: self.network.to_string(),
            ipv4: self.ipv4.map(|n| Cidr(n.to_string())),
            ipv6: self.ipv6.map(|n| Cidr(n.to_string())),
        }
    }
}

/// A NodeNetwork spec in compact form: its entries in their order, each block parsed (as
/// `Cidr::net` reads it). Equal [`Blocks`] are equal specs.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Blocks {
    entries: Arc<[Entry]>,
    /// The spec as read, when the entries do not print it back exactly (a block that is not
    /// a canonical CIDR of its family, or a canonical one written differently). Such a spec
    /// never equals one the allocator builds, whose text is always what its entries print.
    text: Option<Box<NodeNetworkSpec>>,
}

impl Blocks {
    /// Blocks of these entries (as the allocator builds them).
    pub fn new(entries: Vec<Entry>) -> Self {
        Blocks {
            entries: entries.into(),
            text: None,
        }
    }

    /// The compact form of `spec`, its Network names shared through `names`.
    pub fn read(spec: &NodeNetworkSpec, names: &mut Names) -> Self {
        let mut exact = true;
        let entries = spec
            .blocks
            .iter()
            .map(|b| {
                let ipv4 = b.ipv4.as_ref().and_then(|c| match c.net() {
                    Ok(IpNet::V4(n)) => Some(n),
                    _ => None,
                });
                let ipv6 = b.ipv6.as_ref().and_then(|c| match c.net() {
                    Ok(IpNet::V6(n)) => Some(n),
                    _ => None,
                });
                let entry = Entry {
                    network: names.get(&b.network),
                    ipv4,
                    ipv6,
                };
                exact = exact && entry.to_block() == *b;
                entry
            })
            .collect();
        Blocks {
            entries,
            text: (!exact).then(|| Box::new(spec.clone())),
        }
    }

    /// The entries, in the spec's order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entries, shared.
    pub fn shared_entries(&self) -> Arc<[Entry]> {
        self.entries.clone()
    }

    /// Whether the spec has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The spec these blocks stand for.
    pub fn to_spec(&self) -> NodeNetworkSpec {
        match &self.text {
            Some(spec) => (**spec).clone(),
            None => NodeNetworkSpec {
                blocks: self.entries.iter().map(Entry::to_block).collect(),
            },
        }
    }
}

impl From<&NodeNetworkSpec> for Blocks {
    fn from(spec: &NodeNetworkSpec) -> Self {
        Blocks::read(spec, &mut Names::default())
    }
}

/// A node's current blocks as the allocator reads them: held as [`Blocks`], or as a spec
/// (read into [`Blocks`] when asked).
pub trait Current {
    /// The blocks.
    fn blocks(&self) -> Cow<'_, Blocks>;
}

impl Current for Blocks {
    fn blocks(&self) -> Cow<'_, Blocks> {
        Cow::Borrowed(self)
    }
}

impl Current for NodeNetworkSpec {
    fn blocks(&self) -> Cow<'_, Blocks> {
        Cow::Owned(Blocks::from(self))
    }
}

impl<T: Current> Current for Arc<T> {
    fn blocks(&self) -> Cow<'_, Blocks> {
        (**self).blocks()
    }
}

/// The Networks an agent reports realized (`status.networks`), sorted, each name once, the
/// names shared between nodes ([`Names`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Realized(Arc<[Arc<str>]>);

impl Realized {
    /// The names of `networks`, shared through `names`.
    pub fn read(networks: &[String], names: &mut Names) -> Self {
        let mut v: Vec<Arc<str>> = networks.iter().map(|n| names.get(n)).collect();
        v.sort_unstable();
        v.dedup();
        Realized(v.into())
    }

    /// Whether `network` is one of them.
    pub fn contains(&self, network: &str) -> bool {
        self.0.binary_search_by(|n| (**n).cmp(network)).is_ok()
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|n| &**n)
    }
}

/// The addresses a node's workloads hold, per Network: what its agent publishes in
/// `status.workloads`, counted once when the NodeNetwork is read. A live migration's target port
/// that waits for its VM (`active: false`) is not counted: it holds the addresses its source
/// holds on the other node. Only Networks with addresses are listed, so the size follows the
/// node's workloads, not the number of Networks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InUse(Arc<[(Arc<str>, i64)]>);

impl InUse {
    /// The counts of `workloads`, the Network names shared through `names`.
    pub fn read(workloads: &[weft_crds::NodeWorkload], names: &mut Names) -> Self {
        let mut counts: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for w in workloads.iter().filter(|w| w.active) {
            *counts.entry(&w.network).or_default() +=
                i64::try_from(w.ips.len()).unwrap_or(i64::MAX);
        }
        InUse(
            counts
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(network, n)| (names.get(network), n))
                .collect(),
        )
    }

    /// The addresses `network`'s workloads hold on the node.
    pub fn of(&self, network: &str) -> i64 {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(network))
            .map_or(0, |i| self.0[i].1)
    }

    /// The Networks whose count differs between `self` and `other`.
    pub fn changed<'a>(&'a self, other: &'a InUse) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .chain(other.0.iter())
            .map(|(n, _)| &**n)
            .filter(move |n| self.of(n) != other.of(n))
    }
}

/// What a node's agent publishes per Network (`status.workloads` and `status.reservations`),
/// as one fingerprint per Network: a change of it is what wakes the Network's WorkloadSlices.
/// Only Networks with entries are listed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Published(Arc<[(Arc<str>, u64)]>);

impl Published {
    /// The fingerprints of what `status` publishes, the Network names shared through `names`.
    pub fn read(status: &NodeNetworkStatus, names: &mut Names) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hashers: std::collections::BTreeMap<
            &str,
            std::collections::hash_map::DefaultHasher,
        > = std::collections::BTreeMap::new();
        for w in &status.workloads {
            let h = hashers.entry(&w.network).or_default();
            'w'.hash(h);
            serde_json::to_vec(w).unwrap_or_default().hash(h);
        }
        for r in &status.reservations {
            let h = hashers.entry(&r.network).or_default();
            'r'.hash(h);
            serde_json::to_vec(r).unwrap_or_default().hash(h);
        }
        Published(
            hashers
                .into_iter()
                .map(|(network, h)| (names.get(network), h.finish()))
                .collect(),
        )
    }

    /// The fingerprint of `network`'s entries, if the node publishes any.
    pub fn of(&self, network: &str) -> Option<u64> {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(network))
            .ok()
            .map(|i| self.0[i].1)
    }

    /// The Networks the node publishes entries of.
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| &**n)
    }

    /// The Networks whose entries differ between `self` and `other`.
    pub fn changed<'a>(&'a self, other: &'a Published) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .chain(other.0.iter())
            .map(|(n, _)| &**n)
            .filter(move |n| self.of(n) != other.of(n))
    }
}

/// A NodeNetwork as the controller keeps it ([`keep_node_network`]): its metadata without
/// managed fields, its spec as [`Blocks`], its status with the Networks realized taken out
/// into [`Realized`], and the addresses its workloads hold per Network ([`InUse`]).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CompactNodeNetwork {
    /// The NodeNetwork's metadata, without managed fields.
    pub metadata: ObjectMeta,
    /// The NodeNetwork's spec.
    pub spec: Blocks,
    /// What its agent reports, but `networks` (always empty here: see
    /// [`CompactNodeNetwork::realized`]).
    pub status: Option<NodeNetworkStatus>,
    /// The Networks its agent reports realized (`status.networks`).
    pub realized: Realized,
    /// The addresses its workloads hold, per Network (from `status.workloads`).
    pub in_use: InUse,
    /// What its agent publishes, per Network (fingerprints).
    pub published: Published,
}

impl CompactNodeNetwork {
    /// Whether the agent reports `network` as realized on the node.
    pub fn lists_network(&self, network: &str) -> bool {
        self.realized.contains(network)
    }

    /// What its agent publishes of `network`, with the node's blocks of it
    /// ([`crate::model::peers`]); `None` when it publishes nothing of it (its blocks then
    /// vouch for nothing). Only what this node's entries need is looked at: a reconcile of
    /// one Network reads every node's.
    pub fn publication_of(&self, network: &str) -> Option<crate::model::peers::Publication<'_>> {
        self.published.of(network)?;
        let status = self.status.as_ref()?;
        let blocks = self
            .spec
            .entries()
            .iter()
            .filter(|e| &*e.network == network)
            .flat_map(|e| {
                [e.block(false), e.block(true)]
                    .into_iter()
                    .flatten()
                    .map(|net| (&*e.network, net))
            })
            .collect();
        Some(crate::model::peers::Publication {
            node: self.metadata.name.as_deref().unwrap_or_default(),
            blocks,
            workloads: &status.workloads,
            reservations: &status.reservations,
        })
    }
}

impl Resource for CompactNodeNetwork {
    type DynamicType = ();
    type Scope = <NodeNetwork as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        NodeNetwork::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        NodeNetwork::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        NodeNetwork::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        NodeNetwork::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the controller keeps of a NodeNetwork: all but its managed fields (which it never
/// reads; with server-side apply they name every entry of the blocks), its spec as
/// [`Blocks`] and the Networks realized as [`Realized`], the Network names shared through
/// `names`.
pub fn keep_node_network(
    nn: NodeNetwork,
    names: &mut Names,
    labels: &mut LabelSets,
) -> CompactNodeNetwork {
    let NodeNetwork {
        mut metadata,
        spec,
        mut status,
    } = nn;
    metadata.managed_fields = None;
    if let Some(s) = status.as_mut() {
        labels.share_all(s.workloads.iter_mut());
    }
    let realized = status
        .as_mut()
        .map(|s| Realized::read(&std::mem::take(&mut s.networks), names))
        .unwrap_or_default();
    let in_use = status
        .as_ref()
        .map(|s| InUse::read(&s.workloads, names))
        .unwrap_or_default();
    let published = status
        .as_ref()
        .map(|s| Published::read(s, names))
        .unwrap_or_default();
    CompactNodeNetwork {
        metadata,
        spec: Blocks::read(&spec, names),
        status,
        realized,
        in_use,
        published,
    }
}

impl From<NodeNetwork> for CompactNodeNetwork {
    fn from(nn: NodeNetwork) -> Self {
        keep_node_network(nn, &mut Names::default(), &mut LabelSets::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(network: &str, ipv4: Option<&str>, ipv6: Option<&str>) -> NodeNetworkBlock {
        NodeNetworkBlock {
            network: network.into(),
            ipv4: ipv4.map(Cidr::from),
            ipv6: ipv6.map(Cidr::from),
        }
    }

    #[test]
    fn addresses_in_use_are_counted_per_network_from_the_active_workloads() {
        let w = |network: &str, ips: usize, active: bool| weft_crds::NodeWorkload {
            network: network.into(),
            namespace: "ns".into(),
            name: "p".into(),
            labels: Default::default(),
            ips: vec!["10.0.0.2".into(); ips],
            vm: None,
            mac: None,
            active,
        };
        let mut names = Names::default();
        let a = InUse::read(
            &[
                w("red", 2, true),
                w("blue", 1, true),
                w("red", 1, true),
                w("green", 1, false),
            ],
            &mut names,
        );
        assert_eq!((a.of("red"), a.of("blue"), a.of("green")), (3, 1, 0));
        assert_eq!(a.0.len(), 2, "no entry for a Network without addresses");
        let b = InUse::read(&[w("red", 3, true), w("green", 1, true)], &mut names);
        let changed: std::collections::BTreeSet<&str> = a.changed(&b).collect();
        assert_eq!(changed, ["blue", "green"].into());
        assert_eq!(a.changed(&a.clone()).count(), 0);
    }

    #[test]
    fn a_spec_comes_back_as_it_was_read_and_shares_the_network_names() {
        let mut names = Names::default();
        let spec = NodeNetworkSpec {
            blocks: vec![
                block("blue", Some("10.10.0.64/26"), Some("fd10::40/122")),
                block("red", None, Some("fd20::/122")),
            ],
        };
        let a = Blocks::read(&spec, &mut names);
        let b = Blocks::read(&spec, &mut names);
        assert_eq!(a.to_spec(), spec);
        assert_eq!(a, b);
        assert!(
            a.text.is_none(),
            "a canonical spec needs no copy of its text"
        );
        assert!(Arc::ptr_eq(
            &a.entries()[0].network,
            &b.entries()[0].network
        ));
        assert_eq!(names.len(), 2);
        assert_eq!(
            a.entries()[0].block(false),
            Some("10.10.0.64/26".parse().unwrap())
        );
        assert_eq!(a.entries()[1].block(false), None);
    }

    #[test]
    fn a_spec_its_entries_do_not_print_back_keeps_its_text_and_equals_no_canonical_one() {
        for odd in [
            block("blue", Some("10.10.0.65/26"), None), // host bits set: not a block
            block("blue", Some("fd10::/122"), None),    // wrong family
            block("blue", None, Some("FD10::40/122")),  // not written canonically
            block("blue", Some("ten"), None),
        ] {
            let spec = NodeNetworkSpec {
                blocks: vec![odd.clone()],
            };
            let read = Blocks::from(&spec);
            assert_eq!(read.to_spec(), spec, "{odd:?}");
            let canonical = Blocks::from(&read.to_spec());
            assert_eq!(read, canonical, "reading is deterministic");
            let built = Blocks::new(read.entries().to_vec());
            assert_ne!(read, built, "{odd:?} must not pass for {built:?}");
        }
        // Parsed as Cidr::net reads it (what the allocator keeps), the upper-case block is
        // still the node's claim.
        let upper = Blocks::from(&NodeNetworkSpec {
            blocks: vec![block("blue", None, Some("FD10::40/122"))],
        });
        assert_eq!(
            upper.entries()[0].block(true),
            Some("fd10::40/122".parse().unwrap())
        );
    }

    #[test]
    fn a_kept_node_network_has_no_managed_fields_and_its_spec_in_compact_form() {
        let mut nn = NodeNetwork::new(
            "node-a",
            NodeNetworkSpec {
                blocks: vec![block("blue", Some("10.10.0.0/26"), None)],
            },
        );
        nn.metadata.managed_fields = Some(vec![Default::default()]);
        nn.metadata.generation = Some(3);
        nn.status = Some(NodeNetworkStatus {
            endpoints: Some(4),
            networks: vec!["red".into(), "blue".into(), "red".into()],
            ..NodeNetworkStatus::default()
        });
        let mut names = Names::default();
        let kept = keep_node_network(nn.clone(), &mut names, &mut LabelSets::default());
        assert_eq!(kept.metadata.managed_fields, None);
        assert_eq!(kept.metadata.generation, Some(3));
        assert_eq!(kept.spec.to_spec(), nn.spec);
        assert_eq!(
            kept.status,
            Some(NodeNetworkStatus {
                endpoints: Some(4),
                ..NodeNetworkStatus::default()
            })
        );
        assert_eq!(kept.realized.names().collect::<Vec<_>>(), ["blue", "red"]);
        assert!(kept.lists_network("red") && kept.lists_network("blue"));
        assert!(!kept.lists_network("green"));
        assert_eq!(
            names.len(),
            2,
            "blue named by the spec and the status: once"
        );
        // Two nodes' workloads with equal labels: one copy of them.
        let mut labels = LabelSets::default();
        let workload = |name: &str| weft_crds::NodeWorkload {
            network: "blue".into(),
            namespace: "shop".into(),
            name: name.into(),
            labels: Arc::new([("app".to_owned(), "web".to_owned())].into()),
            ips: vec!["10.10.0.5".into()],
            vm: None,
            mac: None,
            active: true,
        };
        let [a, b] = ["web-1", "web-2"].map(|name| {
            let mut nn = nn.clone();
            nn.status = Some(NodeNetworkStatus {
                workloads: vec![workload(name)],
                ..NodeNetworkStatus::default()
            });
            keep_node_network(nn, &mut names, &mut labels)
                .status
                .unwrap()
                .workloads
                .remove(0)
        });
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        // No status: nothing realized.
        nn.status = None;
        assert!(!CompactNodeNetwork::from(nn).lists_network("blue"));
    }
}

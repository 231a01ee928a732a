//! Decide: per-node address blocks (pure).
//!
//! Every Network that is not being deleted (and that [`super::validate`] accepted) gives each
//! node its `nodeSelector` selects one block per family of its subnets, of the Network's block
//! prefix ([`NetworkSpec::block_prefix_v4`]/[`NetworkSpec::block_prefix_v6`]). Existing
//! assignments (the NodeNetwork specs) are kept when they are still valid; a block claimed by
//! two nodes stays with the first node by name and the other gets a new one; blocks of nodes
//! that are gone or no longer selected are free again. New blocks are the lowest free ones.
//!
//! The result ([`Allocation`]) holds every block as its index in its subnet (a `u32` while the
//! indexes fit, one array per Network and family) and every node as its position in one sorted
//! list of names; a node's [`NodeNetworkSpec`] is built when it is asked for
//! ([`Allocation::spec`]), so the specs of all nodes are never held at once.

use super::compact::{Blocks, Current, Entry};
use super::status;
use ipnet::IpNet;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use weft_crds::nodenetwork::MAX_NODE_BLOCKS;
use weft_crds::{Network, NetworkSpec, NodeNetworkSpec, selector_matches};

/// A node as the allocator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// The Node's name (and its NodeNetwork's).
    pub name: String,
    /// The Node's labels.
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// A node with these labels.
    pub fn new(name: impl Into<String>, labels: &[(&str, &str)]) -> Self {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }
}

/// Block indexes, one per node of a [`FamilyBlocks`]: `u32` while every index fits.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Indexes {
    Small(Vec<u32>),
    Large(Vec<u128>),
}

impl Indexes {
    fn push(&mut self, index: u128) {
        match self {
            Indexes::Small(v) => match u32::try_from(index) {
                Ok(i) => v.push(i),
                Err(_) => {
                    let mut large: Vec<u128> = v.iter().map(|&i| u128::from(i)).collect();
                    large.push(index);
                    *self = Indexes::Large(large);
                }
            },
            Indexes::Large(v) => v.push(index),
        }
    }

    fn get(&self, k: usize) -> Option<u128> {
        match self {
            Indexes::Small(v) => v.get(k).map(|&i| u128::from(i)),
            Indexes::Large(v) => v.get(k).copied(),
        }
    }

    fn shrink_to_fit(&mut self) {
        match self {
            Indexes::Small(v) => v.shrink_to_fit(),
            Indexes::Large(v) => v.shrink_to_fit(),
        }
    }
}

/// The blocks of one family of one Network: the nodes that got one (positions in
/// [`Allocation`]'s names, ascending) and the index of each one's block.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FamilyBlocks {
    family: Family,
    nodes: Vec<u32>,
    indexes: Indexes,
}

impl FamilyBlocks {
    /// The block of the node at `position`, if it got one.
    fn block_of(&self, position: u32) -> Option<IpNet> {
        let k = self.nodes.binary_search(&position).ok()?;
        self.family.net(self.indexes.get(k)?)
    }
}

/// The blocks of one Network, per family (IPv4, IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetworkBlocks {
    name: Arc<str>,
    families: [Option<FamilyBlocks>; 2],
}

impl NetworkBlocks {
    /// The node's entry of this Network, if it got a block of either family.
    fn entry(&self, position: u32) -> Option<Entry> {
        let [ipv4, ipv6] = [0, 1].map(|fi| self.families[fi].as_ref()?.block_of(position));
        let ipv4 = match ipv4 {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        let ipv6 = match ipv6 {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
        (ipv4.is_some() || ipv6.is_some()).then(|| Entry {
            network: self.name.clone(),
            ipv4,
            ipv6,
        })
    }
}

/// The result of [`allocate`].
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Allocation {
    /// Every node's name, sorted (also the nodes without blocks).
    names: Vec<String>,
    /// The Networks that hold blocks, sorted by name.
    networks: Vec<NetworkBlocks>,
    /// Problems per Network name, e.g. an exhausted subnet.
    pub problems: BTreeMap<String, Vec<String>>,
}

impl Allocation {
    /// Every node's name, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    fn position(&self, node: &str) -> Option<u32> {
        let k = self.names.binary_search_by(|n| n.as_str().cmp(node)).ok()?;
        u32::try_from(k).ok()
    }

    /// Whether `node` is one of the nodes.
    pub fn contains_node(&self, node: &str) -> bool {
        self.position(node).is_some()
    }

    /// The desired blocks of `node` (`None` if it is not a node), built now: the blocks of
    /// every Network that gave it one, by Network name.
    pub fn blocks(&self, node: &str) -> Option<Blocks> {
        let position = self.position(node)?;
        Some(Blocks::new(
            self.networks
                .iter()
                .filter_map(|n| n.entry(position))
                .collect(),
        ))
    }

    /// The desired NodeNetwork spec of `node` (`None` if it is not a node), built now (see
    /// [`Allocation::blocks`]).
    pub fn spec(&self, node: &str) -> Option<NodeNetworkSpec> {
        self.blocks(node).map(|b| b.to_spec())
    }

    /// The desired NodeNetwork spec of every node (all built at once: for small clusters and
    /// tests).
    pub fn specs(&self) -> BTreeMap<String, NodeNetworkSpec> {
        self.names
            .iter()
            .filter_map(|n| Some((n.clone(), self.spec(n)?)))
            .collect()
    }

    /// The number of (node, Network) pairs with a block of either family.
    pub fn entries(&self) -> usize {
        self.networks
            .iter()
            .map(|n| match &n.families {
                [Some(a), Some(b)] => {
                    // Union of two sorted node lists.
                    let both = a
                        .nodes
                        .iter()
                        .filter(|p| b.nodes.binary_search(p).is_ok())
                        .count();
                    a.nodes.len() + b.nodes.len() - both
                }
                [Some(a), None] | [None, Some(a)] => a.nodes.len(),
                [None, None] => 0,
            })
            .sum()
    }

    fn network(&self, network: &str) -> Option<&NetworkBlocks> {
        let k = self
            .networks
            .binary_search_by(|n| (*n.name).cmp(network))
            .ok()?;
        self.networks.get(k)
    }

    /// The number of blocks (of both families) of `network`.
    pub fn block_count(&self, network: &str) -> usize {
        self.network(network).map_or(0, |n| {
            n.families.iter().flatten().map(|f| f.nodes.len()).sum()
        })
    }

    /// The blocks of `network`, by node: `(node, [cidr, ...])`, nodes sorted by name.
    pub fn blocks_of(&self, network: &str) -> Vec<(String, Vec<String>)> {
        let Some(net) = self.network(network) else {
            return Vec::new();
        };
        let mut positions: Vec<u32> = net
            .families
            .iter()
            .flatten()
            .flat_map(|f| f.nodes.iter().copied())
            .collect();
        positions.sort_unstable();
        positions.dedup();
        positions
            .into_iter()
            .filter_map(|p| {
                let entry = net.entry(p)?;
                let node = self.names.get(usize::try_from(p).ok()?)?.clone();
                let cidrs = [entry.block(false), entry.block(true)]
                    .into_iter()
                    .flatten()
                    .map(|c| c.to_string())
                    .collect();
                Some((node, cidrs))
            })
            .collect()
    }
}

/// Name of a Network (empty if it has none).
fn name_of(net: &Network) -> &str {
    net.metadata.name.as_deref().unwrap_or_default()
}

/// Whether the Network's `nodeSelector` selects the node (absent or empty selects all).
pub fn selects(spec: &NetworkSpec, node: &NodeInfo) -> bool {
    selects_labels(spec, &node.labels)
}

/// Whether the Network's `nodeSelector` selects a node with `labels`.
pub fn selects_labels(spec: &NetworkSpec, labels: &BTreeMap<String, String>) -> bool {
    spec.node_selector
        .as_ref()
        .is_none_or(|s| selector_matches(s, labels))
}

/// The blocks of one family of one subnet: block `i` starts at `base + i * size`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Family {
    subnet: IpNet,
    prefix: u8,
}

impl Family {
    fn bits(&self) -> u8 {
        self.subnet.max_prefix_len()
    }

    /// Number of blocks, saturated at u128::MAX.
    fn count(&self) -> u128 {
        let shift = u32::from(self.prefix.saturating_sub(self.subnet.prefix_len()));
        1u128.checked_shl(shift).unwrap_or(u128::MAX)
    }

    fn size(&self) -> u128 {
        1u128
            .checked_shl(u32::from(self.bits() - self.prefix))
            .unwrap_or(0)
    }

    fn base(&self) -> u128 {
        match self.subnet {
            IpNet::V4(n) => u128::from(u32::from(n.network())),
            IpNet::V6(n) => u128::from(n.network()),
        }
    }

    /// The index of `net` if it is a block of this family.
    fn index_of(&self, net: IpNet) -> Option<u128> {
        if net.prefix_len() != self.prefix || !self.subnet.contains(&net) {
            return None;
        }
        let addr = match net {
            IpNet::V4(n) => u128::from(u32::from(n.network())),
            IpNet::V6(n) => u128::from(n.network()),
        };
        let size = self.size();
        let offset = addr.checked_sub(self.base())?;
        (size != 0 && offset % size == 0).then(|| offset / size)
    }

    fn net(&self, index: u128) -> Option<IpNet> {
        let addr = self.base().checked_add(index.checked_mul(self.size())?)?;
        Some(match self.subnet {
            IpNet::V4(_) => {
                let a = u32::try_from(addr).ok()?;
                IpNet::V4(ipnet::Ipv4Net::new(a.into(), self.prefix).ok()?)
            }
            IpNet::V6(_) => IpNet::V6(ipnet::Ipv6Net::new(addr.into(), self.prefix).ok()?),
        })
    }

    /// The first block at or after `from` that is neither in `used` nor wholly inside one of
    /// `excludes` (`spec.ipam.exclude`: a Bridge network's LAN hosts, gateway and DHCP pool).
    /// Jumps over an excluded range in one step, so a large exclude costs nothing.
    fn next_free(&self, from: u128, used: &BTreeSet<u128>, excludes: &[IpNet]) -> Option<u128> {
        let mut c = from;
        loop {
            if c >= self.count() {
                return None;
            }
            if used.contains(&c) {
                c = c.checked_add(1)?;
                continue;
            }
            let block: IpNet = self.net(c)?;
            match excludes.iter().find(|e| e.contains(&block)) {
                Some(e) => {
                    let end = match e.broadcast() {
                        std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
                        std::net::IpAddr::V6(a) => u128::from(a),
                    };
                    c = (end.checked_add(1)?.checked_sub(self.base())?) / self.size();
                }
                None => return Some(c),
            }
        }
    }
}

/// The `n`-th (0-based) block of `subnet` at `prefix` that is not wholly inside `excludes`: the
/// standalone agent's assignment for node number `n`.
pub fn nth_block(subnet: IpNet, prefix: u8, excludes: &[IpNet], n: usize) -> Option<IpNet> {
    let family = Family { subnet, prefix };
    let none = BTreeSet::new();
    let mut c = family.next_free(0, &none, excludes)?;
    for _ in 0..n {
        c = family.next_free(c.checked_add(1)?, &none, excludes)?;
    }
    family.net(c)
}

/// A node's current blocks (its NodeNetwork spec), looked up by Network name in
/// logarithmic time: the blocks in the order the controller writes them (by Network name) are
/// searched in place, others through a sorted list of positions.
struct Claims<'a> {
    blocks: Cow<'a, Blocks>,
    /// Positions in `blocks` sorted by Network name (stable), when `blocks` is not sorted.
    order: Option<Vec<usize>>,
}

impl<'a> Claims<'a> {
    fn new(blocks: Cow<'a, Blocks>) -> Self {
        let entries = blocks.entries();
        let sorted = entries.windows(2).all(|w| w[0].network <= w[1].network);
        let order = (!sorted).then(|| {
            let mut order: Vec<usize> = (0..entries.len()).collect();
            order.sort_by(|&a, &b| entries[a].network.cmp(&entries[b].network));
            order
        });
        Claims { blocks, order }
    }

    /// The first entry of `network` (the one `iter().find` would return).
    fn find(&self, network: &str) -> Option<&Entry> {
        let entries = self.blocks.entries();
        let entry = match &self.order {
            None => entries.get(entries.partition_point(|b| &*b.network < network)),
            Some(order) => {
                let k = order.partition_point(|&i| &*entries[i].network < network);
                order.get(k).map(|&i| &entries[i])
            }
        };
        entry.filter(|b| &*b.network == network)
    }
}

/// Computes every node's blocks. `networks` are the Networks that may hold blocks (the caller
/// leaves out invalid ones; Networks being deleted are skipped here), `nodes` the Nodes that
/// exist, `existing` the current NodeNetwork specs by node name (compact or not).
///
/// A node takes the blocks of at most [`MAX_NODE_BLOCKS`] Networks (its NodeNetwork's
/// `spec.blocks` holds no more): the Networks that have a block there keep it, the others get
/// one while there is room, by Network name, and a Network that finds a node full has a
/// problem naming it (no NodeNetwork write that the API server would refuse).
pub fn allocate<'a, S: Current>(
    networks: impl IntoIterator<Item = &'a Network>,
    nodes: &[NodeInfo],
    existing: &BTreeMap<String, S>,
) -> Allocation {
    allocate_at_most(networks, nodes, existing, MAX_NODE_BLOCKS)
}

/// [`allocate`], with at most `per_node` Networks' blocks on one node.
fn allocate_at_most<'a, S: Current>(
    networks: impl IntoIterator<Item = &'a Network>,
    nodes: &[NodeInfo],
    existing: &BTreeMap<String, S>,
    per_node: usize,
) -> Allocation {
    let mut networks: Vec<&Network> = networks
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .collect();
    networks.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    networks.dedup_by(|a, b| name_of(a) == name_of(b));
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.dedup_by(|a, b| a.name == b.name);
    // Position of each node (in `nodes`, by name) and its current blocks.
    let nodes: Vec<(u32, &NodeInfo, Option<Claims>)> = nodes
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| {
            Some((
                u32::try_from(i).ok()?,
                n,
                existing.get(&n.name).map(|s| Claims::new(s.blocks())),
            ))
        })
        .collect();

    let mut out = Allocation {
        names: nodes.iter().map(|(_, n, _)| n.name.clone()).collect(),
        networks: Vec::new(),
        problems: BTreeMap::new(),
    };
    let has_block = |claims: &Option<Claims>, network: &str| {
        claims.as_ref().is_some_and(|c| c.find(network).is_some())
    };
    // Per node, the Networks that keep the block they have there: its entries of Networks that
    // still select it.
    let mut taken: Vec<usize> = nodes
        .iter()
        .map(|(_, node, claims)| {
            let Some(c) = claims else { return 0 };
            let mut names: Vec<&str> = c.blocks.entries().iter().map(|e| &*e.network).collect();
            names.sort_unstable();
            names.dedup();
            names
                .into_iter()
                .filter(|n| {
                    networks
                        .binary_search_by(|net| name_of(net).cmp(n))
                        .ok()
                        .and_then(|i| networks.get(i))
                        .is_some_and(|net| selects(&net.spec, node))
                })
                .count()
        })
        .collect();
    for net in networks {
        let name = name_of(net);
        // The selected nodes, each with whether it takes a new place among its node's
        // Networks (given back below if it gets no block).
        let mut selected: Vec<&(u32, &NodeInfo, Option<Claims>)> = Vec::new();
        let mut new_place: Vec<Option<usize>> = Vec::new();
        let mut full = Vec::new();
        for (k, node) in nodes.iter().enumerate() {
            if !selects(&net.spec, node.1) {
                continue;
            }
            if has_block(&node.2, name) {
                selected.push(node);
                new_place.push(None);
            } else if let Some(t) = taken.get_mut(k).filter(|t| **t < per_node) {
                *t += 1;
                selected.push(node);
                new_place.push(Some(k));
            } else {
                full.push(node.1.name.as_str());
            }
        }
        if !full.is_empty() {
            let nodes = match full.as_slice() {
                [node] => format!("node {node}"),
                many => format!("{} nodes: {}", many.len(), status::some_of(many)),
            };
            out.problems.entry(name.to_owned()).or_default().push(format!(
                "no block for {nodes}: a node takes the blocks of at most {per_node} Networks (its NodeNetwork's spec.blocks), and other Networks hold them all; select fewer Networks for the node (spec.nodeSelector of this Network or of others)"
            ));
        }
        let families = [
            net.spec.subnet_v4().map(|s| Family {
                subnet: IpNet::V4(s),
                prefix: net.spec.block_prefix_v4(),
            }),
            net.spec.subnet_v6().map(|s| Family {
                subnet: IpNet::V6(s),
                prefix: net.spec.block_prefix_v6(),
            }),
        ];
        let mut blocks = NetworkBlocks {
            name: Arc::from(name),
            families: [None, None],
        };
        // Per selected node: whether it got a block of either family.
        let mut got = vec![false; selected.len()];
        for (fi, family) in families.into_iter().enumerate() {
            let Some(family) = family else { continue };
            let mut used = BTreeSet::new();
            // Per selected node: its block index.
            let mut chosen: Vec<Option<u128>> = vec![None; selected.len()];
            let mut missing = Vec::new();
            // Keep valid existing assignments, first claimant by node name wins.
            for (k, (_, node, claims)) in selected.iter().enumerate() {
                let current = claims
                    .as_ref()
                    .and_then(|c| c.find(name))
                    .and_then(|b| b.block(fi == 1))
                    .and_then(|n| family.index_of(n));
                match current {
                    Some(i) if used.insert(i) => chosen[k] = Some(i),
                    _ => missing.push((k, node.name.as_str())),
                }
            }
            let excludes = net.spec.excludes();
            // Every block below the last one given is used or excluded: the next search
            // starts after it, not at the start of the subnet again.
            let mut from = 0;
            let mut without = Vec::new();
            for (k, node) in missing {
                match family
                    .next_free(from, &used, &excludes)
                    .filter(|&i| family.net(i).is_some())
                {
                    Some(i) => {
                        used.insert(i);
                        chosen[k] = Some(i);
                        from = i.saturating_add(1);
                    }
                    None => without.push(node),
                }
            }
            if !without.is_empty() {
                // One problem per family, naming a few of the nodes: the message stays short
                // with a thousand nodes without a block.
                let nodes = match without.as_slice() {
                    [node] => format!("node {node}"),
                    many => format!("{} nodes: {}", many.len(), status::some_of(many)),
                };
                out.problems.entry(name.to_owned()).or_default().push(format!(
                    "subnet {} has no free /{} block left for {nodes} ({} blocks, all assigned or excluded); select fewer nodes (spec.nodeSelector) or exclude fewer addresses (spec.ipam.exclude), or, as spec.subnets and the block prefix cannot change on a live Network, create a new Network with a larger subnet or a longer block prefix",
                    family.subnet,
                    family.prefix,
                    family.count()
                ));
            }
            let mut fb = FamilyBlocks {
                family,
                nodes: Vec::new(),
                indexes: Indexes::Small(Vec::new()),
            };
            for (k, ((position, _, _), index)) in selected.iter().zip(chosen).enumerate() {
                if let Some(i) = index {
                    fb.nodes.push(*position);
                    fb.indexes.push(i);
                    got[k] = true;
                }
            }
            fb.nodes.shrink_to_fit();
            fb.indexes.shrink_to_fit();
            blocks.families[fi] = Some(fb);
        }
        // A place taken for a block the Network could not give (its subnet is exhausted) goes
        // back to the node, for the Networks after it.
        for (place, got) in new_place.into_iter().zip(got) {
            if let Some(t) = place.filter(|_| !got).and_then(|k| taken.get_mut(k)) {
                *t = t.saturating_sub(1);
            }
        }
        if blocks
            .families
            .iter()
            .flatten()
            .any(|f| !f.nodes.is_empty())
        {
            out.networks.push(blocks);
        }
    }
    out.networks.shrink_to_fit();
    out
}

/// Every block assigned twice: `(network, cidr, [nodes])`. Empty for any [`allocate`] result.
pub fn duplicates(nodes: &BTreeMap<String, NodeNetworkSpec>) -> Vec<(String, String, Vec<String>)> {
    let mut owners: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (node, spec) in nodes {
        for b in &spec.blocks {
            for c in [&b.ipv4, &b.ipv6].into_iter().flatten() {
                owners
                    .entry((b.network.clone(), c.0.clone()))
                    .or_default()
                    .push(node.clone());
            }
        }
    }
    owners
        .into_iter()
        .filter(|(_, n)| n.len() > 1)
        .map(|((net, cidr), n)| (net, cidr, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use weft_crds::{Cidr, IpamSpec, NodeNetworkBlock};

    fn net(name: &str, subnets: &[&str], prefix_v4: Option<i32>) -> Network {
        let mut n = Network::new(
            name,
            NetworkSpec {
                subnets: subnets.iter().map(|s| Cidr::from(*s)).collect(),
                ipam: prefix_v4.map(|p| IpamSpec {
                    node_block_prefix: Some(p),
                    ..IpamSpec::default()
                }),
                ..NetworkSpec::default()
            },
        );
        n.metadata.name = Some(name.into());
        n
    }

    fn with_selector(mut n: Network, k: &str, v: &str) -> Network {
        n.spec.node_selector = Some(LabelSelector {
            match_labels: Some([(k.to_owned(), v.to_owned())].into()),
            ..LabelSelector::default()
        });
        n
    }

    fn nodes(names: &[&str]) -> Vec<NodeInfo> {
        names.iter().map(|n| NodeInfo::new(*n, &[])).collect()
    }

    #[test]
    fn every_selected_node_gets_one_block_per_family() {
        let n = net("blue", &["10.10.0.0/24", "fd10::/64"], None);
        let a = allocate(
            [&n],
            &nodes(&["a", "b"]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        assert_eq!(
            a.blocks_of("blue"),
            [
                ("a".into(), vec!["10.10.0.0/26".into(), "fd10::/122".into()]),
                (
                    "b".into(),
                    vec!["10.10.0.64/26".into(), "fd10::40/122".into()]
                ),
            ]
        );
        assert!(a.problems.is_empty());
    }

    #[test]
    fn existing_assignments_are_kept_and_gone_nodes_free_their_blocks() {
        let n = net("blue", &["10.10.0.0/24"], None);
        let first = allocate(
            [&n],
            &nodes(&["a", "b", "c"]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        // b leaves, d joins: a and c keep theirs, d gets b's old block.
        let second = allocate([&n], &nodes(&["a", "c", "d"]), &first.specs());
        assert_eq!(
            second.blocks_of("blue"),
            [
                ("a".into(), vec!["10.10.0.0/26".into()]),
                ("c".into(), vec!["10.10.0.128/26".into()]),
                ("d".into(), vec!["10.10.0.64/26".into()]),
            ]
        );
    }

    #[test]
    fn unselected_nodes_and_deleted_networks_lose_their_blocks() {
        let blue = with_selector(net("blue", &["10.10.0.0/24"], None), "pool", "x");
        let mut red = net("red", &["10.20.0.0/24"], None);
        let ns = vec![
            NodeInfo::new("a", &[("pool", "x")]),
            NodeInfo::new("b", &[]),
        ];
        let first = allocate(
            [&blue, &red],
            &ns,
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        assert_eq!(first.blocks_of("blue").len(), 1);
        red.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let second = allocate([&blue, &red], &ns, &first.specs());
        assert!(second.blocks_of("red").is_empty());
        assert_eq!(second.specs()["b"].blocks, []);
        assert_eq!(second.specs()["a"].blocks.len(), 1);
    }

    /// A node takes the blocks of at most so many Networks (a NodeNetwork's `spec.blocks` holds
    /// no more, and the API server refuses a longer one, which stalled every Network's
    /// reconcile): the Networks that have a block there keep it, the others get one while there
    /// is room, by name, and the rest have a problem naming the node.
    #[test]
    fn a_node_takes_so_many_networks_blocks_and_those_it_has_keep_theirs() {
        let (a, b, c) = (
            net("a", &["10.1.0.0/24"], None),
            net("b", &["10.2.0.0/24"], None),
            net("c", &["10.3.0.0/24"], None),
        );
        let existing = BTreeMap::from([(
            "n1".to_owned(),
            NodeNetworkSpec {
                blocks: vec![NodeNetworkBlock {
                    network: "c".into(),
                    ipv4: Some("10.3.0.64/26".into()),
                    ipv6: None,
                }],
            },
        )]);
        let got = allocate_at_most([&a, &b, &c], &nodes(&["n1", "n2"]), &existing, 2);
        let on = |node: &str| -> Vec<String> {
            got.specs()[node]
                .blocks
                .iter()
                .map(|b| b.network.clone())
                .collect()
        };
        assert_eq!(
            on("n1"),
            ["a", "c"],
            "c keeps its block, a gets the room left"
        );
        assert_eq!(on("n2"), ["a", "b"]);
        assert_eq!(
            got.blocks_of("c"),
            [("n1".into(), vec!["10.3.0.64/26".into()])]
        );
        let problems: Vec<(&str, &str)> = got
            .problems
            .iter()
            .flat_map(|(n, p)| p.iter().map(move |p| (n.as_str(), p.as_str())))
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].0 == "b"
                && problems[0].1.starts_with(
                    "no block for node n1: a node takes the blocks of at most 2 Networks"
                ),
            "{problems:?}"
        );
        assert!(
            problems[1].0 == "c" && problems[1].1.starts_with("no block for node n2:"),
            "{problems:?}"
        );
        // The cluster's limit is the one the NodeNetwork schema gives.
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(weft_crds::NodeNetwork::crd()).unwrap();
        assert_eq!(
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["blocks"]["maxItems"],
            serde_json::json!(MAX_NODE_BLOCKS)
        );
    }

    /// A Network whose subnet has no block left for a node gives its place on the node back:
    /// the Networks after it get it.
    #[test]
    fn a_network_without_a_block_for_a_node_leaves_its_place_to_the_next() {
        let aa = net("aa", &["10.9.0.0/26"], Some(26)); // one block: n1's
        let bb = net("bb", &["10.2.0.0/24"], None);
        let got = allocate_at_most(
            [&aa, &bb],
            &nodes(&["n1", "n2"]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
            1,
        );
        assert_eq!(
            got.blocks_of("aa"),
            [("n1".into(), vec!["10.9.0.0/26".into()])]
        );
        assert_eq!(got.blocks_of("bb").len(), 1);
        assert_eq!(got.blocks_of("bb")[0].0, "n2");
        assert!(
            got.problems["aa"][0]
                .starts_with("subnet 10.9.0.0/26 has no free /26 block left for node n2")
        );
        assert_eq!(got.problems["bb"].len(), 1);
        assert!(got.problems["bb"][0].starts_with("no block for node n1:"));
    }

    /// A NodeNetwork spec claiming IPv4 block `cidr` of Network `blue`.
    fn claim(cidr: &str) -> NodeNetworkSpec {
        NodeNetworkSpec {
            blocks: vec![NodeNetworkBlock {
                network: "blue".into(),
                ipv4: Some(cidr.into()),
                ipv6: None,
            }],
        }
    }

    #[test]
    fn new_blocks_fill_the_lowest_holes_in_node_order() {
        let mut n = net("blue", &["10.10.0.0/24"], Some(27));
        n.spec.ipam = Some(IpamSpec {
            node_block_prefix: Some(27),
            exclude: Some(vec![weft_crds::IpOrCidr::from("10.10.0.64/27")]),
            ..IpamSpec::default()
        });
        // Blocks 1 and 4 are taken, 2 is excluded: the others get 0, 3, 5, 6 and 7 in turn.
        let existing = BTreeMap::from([
            ("b".to_owned(), claim("10.10.0.32/27")),
            ("e".to_owned(), claim("10.10.0.128/27")),
        ]);
        let a = allocate(
            [&n],
            &nodes(&["a", "b", "c", "d", "e", "f", "g"]),
            &existing,
        );
        let got: Vec<(String, Vec<String>)> = a.blocks_of("blue");
        let want: Vec<(String, Vec<String>)> = [
            ("a", "10.10.0.0/27"),
            ("b", "10.10.0.32/27"),
            ("c", "10.10.0.96/27"),
            ("d", "10.10.0.160/27"),
            ("e", "10.10.0.128/27"),
            ("f", "10.10.0.192/27"),
            ("g", "10.10.0.224/27"),
        ]
        .iter()
        .map(|(n, c)| ((*n).to_owned(), vec![(*c).to_owned()]))
        .collect();
        assert_eq!(got, want);
        // One more node: none left.
        let a = allocate(
            [&n],
            &nodes(&["a", "b", "c", "d", "e", "f", "g", "h"]),
            &existing,
        );
        assert_eq!(a.problems["blue"].len(), 1);
        assert!(a.problems["blue"][0].contains("node h"), "{:?}", a.problems);
    }

    #[test]
    fn exhaustion_is_reported_for_the_network() {
        let n = net("tiny", &["10.10.0.0/25"], Some(26));
        let a = allocate(
            [&n],
            &nodes(&["a", "b", "c"]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        assert_eq!(a.blocks_of("tiny").len(), 2);
        let problems = &a.problems["tiny"];
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("node c"), "{problems:?}");
    }

    #[test]
    fn exhaustion_names_a_few_of_the_nodes_without_a_block() {
        // One problem per family however many nodes go without a block, naming ten of them:
        // the Ready message stays short at a thousand nodes (it took ~170 characters a node).
        let n = net("tiny", &["10.10.0.0/25"], Some(26));
        let names: Vec<String> = (0..1000).map(|k| format!("node-{k:04}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let a = allocate(
            [&n],
            &nodes(&refs),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        assert_eq!(a.blocks_of("tiny").len(), 2);
        let fix = "select fewer nodes (spec.nodeSelector) or exclude fewer addresses \
                   (spec.ipam.exclude), or, as spec.subnets and the block prefix cannot change on \
                   a live Network, create a new Network with a larger subnet or a longer block prefix";
        assert_eq!(
            a.problems["tiny"],
            [format!(
                "subnet 10.10.0.0/25 has no free /26 block left for 998 nodes: node-0002, \
                 node-0003, node-0004, node-0005, node-0006, node-0007, node-0008, node-0009, \
                 node-0010, node-0011 and 988 more (2 blocks, all assigned or excluded); {fix}"
            )]
        );
        // One node without a block is named as such (here an IPv6 /124 of four /126 blocks).
        let v6 = Network {
            spec: NetworkSpec {
                subnets: vec![Cidr::from("fd10::/124")],
                ipam: Some(IpamSpec {
                    node_block_prefix_v6: Some(126),
                    ..IpamSpec::default()
                }),
                ..NetworkSpec::default()
            },
            ..net("v6", &[], None)
        };
        let a = allocate(
            [&v6],
            &nodes(&refs[..5]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        assert_eq!(
            a.problems["v6"],
            [format!(
                "subnet fd10::/124 has no free /126 block left for node node-0004 (4 blocks, all \
                 assigned or excluded); {fix}"
            )]
        );
    }

    #[test]
    fn a_block_claimed_twice_stays_with_the_first_node_by_name() {
        let n = net("blue", &["10.10.0.0/24"], None);
        let existing = BTreeMap::from([
            ("a".to_owned(), claim("10.10.0.64/26")),
            ("b".to_owned(), claim("10.10.0.64/26")),
            ("c".to_owned(), claim("10.99.0.0/26")), // outside the subnet
        ]);
        let a = allocate([&n], &nodes(&["a", "b", "c"]), &existing);
        assert_eq!(
            a.blocks_of("blue"),
            [
                ("a".into(), vec!["10.10.0.64/26".into()]),
                ("b".into(), vec!["10.10.0.0/26".into()]),
                ("c".into(), vec!["10.10.0.128/26".into()]),
            ]
        );
    }

    #[test]
    fn existing_blocks_are_found_in_any_order_first_entry_first() {
        let blue = net("blue", &["10.10.0.0/24"], None);
        let red = net("red", &["10.20.0.0/24"], None);
        let block = |n: &str, c: &str| NodeNetworkBlock {
            network: n.into(),
            ipv4: Some(c.into()),
            ipv6: None,
        };
        // Not sorted by Network, and blue listed twice: the first entry counts.
        let existing = BTreeMap::from([(
            "a".to_owned(),
            NodeNetworkSpec {
                blocks: vec![
                    block("red", "10.20.0.128/26"),
                    block("blue", "10.10.0.64/26"),
                    block("blue", "10.10.0.192/26"),
                ],
            },
        )]);
        let a = allocate([&red, &blue], &nodes(&["a", "b"]), &existing);
        assert_eq!(
            a.spec("a").unwrap().blocks,
            [
                block("blue", "10.10.0.64/26"),
                block("red", "10.20.0.128/26")
            ]
        );
        assert_eq!(
            a.blocks_of("blue"),
            [
                ("a".into(), vec!["10.10.0.64/26".into()]),
                ("b".into(), vec!["10.10.0.0/26".into()]),
            ]
        );
        assert_eq!(a.spec("nobody"), None);
        assert_eq!(a.entries(), 4);
        assert_eq!(a.block_count("blue"), 2);
        assert_eq!(a.block_count("green"), 0);
    }

    /// A restarted controller reads the blocks from its NodeNetwork store, where the watch put
    /// them in compact form: the nodes that stay keep them, and a spec that is already what
    /// the allocator wants compares equal (nothing to write).
    #[test]
    fn blocks_read_back_in_compact_form_are_kept_after_a_restart() {
        use super::super::compact::{Blocks, Names, keep_node_network};
        use weft_crds::NodeNetwork;
        let blue = net("blue", &["10.10.0.0/24", "fd10::/120"], None);
        let red = with_selector(net("red", &["10.20.0.0/24"], None), "pool", "x");
        let before = vec![
            NodeInfo::new("a", &[("pool", "x")]),
            NodeInfo::new("b", &[("pool", "x")]),
            NodeInfo::new("c", &[("pool", "x")]),
        ];
        let first = allocate(
            [&blue, &red],
            &before,
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        // As the watch delivers the written specs and the store keeps them.
        let mut names = Names::default();
        let stored: BTreeMap<String, Blocks> = first
            .specs()
            .into_iter()
            .map(|(node, spec)| {
                let json = serde_json::to_vec(&NodeNetwork::new(&node, spec)).unwrap();
                let nn: NodeNetwork = serde_json::from_slice(&json).unwrap();
                (
                    node,
                    keep_node_network(nn, &mut names, &mut Default::default()).spec,
                )
            })
            .collect();
        assert_eq!(names.len(), 2, "one name per Network, shared by the nodes");
        // b leaves and d joins: from nothing, c would get b's blocks.
        let after = vec![
            NodeInfo::new("d", &[("pool", "x")]),
            NodeInfo::new("c", &[("pool", "x")]),
            NodeInfo::new("a", &[("pool", "x")]),
        ];
        let second = allocate([&red, &blue], &after, &stored);
        for node in ["a", "c"] {
            assert_eq!(second.spec(node), first.spec(node), "{node}");
            assert_eq!(second.blocks(node).as_ref(), stored.get(node), "{node}");
        }
        assert_eq!(
            second.blocks_of("blue")[2],
            (
                "d".into(),
                vec!["10.10.0.64/26".into(), "fd10::40/122".into()]
            )
        );
        assert_eq!(duplicates(&second.specs()), []);

        // A block written in another form (upper case) is still the node's, but its spec
        // is not what the allocator writes.
        let mut spec = first.spec("a").unwrap();
        let v6 = spec.blocks[0].ipv6.as_mut().unwrap();
        v6.0 = v6.0.to_uppercase();
        let odd = BTreeMap::from([("a".to_owned(), Blocks::read(&spec, &mut names))]);
        let third = allocate([&blue, &red], &before, &odd);
        assert_eq!(third.spec("a"), first.spec("a"));
        assert_ne!(third.blocks("a").as_ref(), odd.get("a"));
    }

    #[test]
    fn block_indexes_beyond_32_bits_are_kept() {
        let n = net("wide", &["10.10.0.0/24", "fd10::/64"], None);
        let high = "fd10::ffff:ffff:ffff:ffc0/122";
        let existing = BTreeMap::from([(
            "b".to_owned(),
            NodeNetworkSpec {
                blocks: vec![NodeNetworkBlock {
                    network: "wide".into(),
                    ipv4: None,
                    ipv6: Some(high.into()),
                }],
            },
        )]);
        let a = allocate([&n], &nodes(&["a", "b", "c"]), &existing);
        assert_eq!(
            a.blocks_of("wide"),
            [
                ("a".into(), vec!["10.10.0.0/26".into(), "fd10::/122".into()]),
                ("b".into(), vec!["10.10.0.64/26".into(), high.into()]),
                (
                    "c".into(),
                    vec!["10.10.0.128/26".into(), "fd10::40/122".into()]
                ),
            ]
        );
        assert_eq!(a.entries(), 3);
        assert_eq!(a.block_count("wide"), 6);
    }

    /// xorshift64*, enough for a reproducible random walk without a crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap()
        }
    }

    /// Random node churn, including two allocations computed from the same snapshot whose
    /// writes then land in either order (per node, last writer wins): no allocation ever
    /// hands one block to two nodes, and nodes that stay keep their blocks.
    #[test]
    fn random_node_churn_never_duplicates_a_block() {
        let networks = [
            net("blue", &["10.10.0.0/23", "fd10::/120"], Some(26)),
            with_selector(net("red", &["10.20.0.0/24"], Some(27)), "pool", "x"),
            net("tiny", &["10.30.0.0/26"], Some(28)),
        ];
        let pool = [
            "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "na", "nb",
        ];
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut present: BTreeMap<String, NodeInfo> = BTreeMap::new();
            let mut state: BTreeMap<String, NodeNetworkSpec> = BTreeMap::new();
            for _ in 0..40 {
                let churn = |rng: &mut Rng, present: &mut BTreeMap<String, NodeInfo>| {
                    let name = pool[rng.below(pool.len())];
                    match rng.below(3) {
                        0 => {
                            present.remove(name);
                        }
                        1 => {
                            present.insert(name.into(), NodeInfo::new(name, &[("pool", "x")]));
                        }
                        _ => {
                            present.insert(name.into(), NodeInfo::new(name, &[]));
                        }
                    }
                };
                if rng.below(2) == 0 {
                    churn(&mut rng, &mut present);
                    let nodes: Vec<NodeInfo> = present.values().cloned().collect();
                    let a = allocate(&networks, &nodes, &state);
                    assert_eq!(duplicates(&a.specs()), [], "seed {seed}");
                    // Stability: nodes present before and after keep valid blocks.
                    for (node, spec) in &a.specs() {
                        if let Some(old) = state.get(node) {
                            for b in &old.blocks {
                                if let Some(nb) =
                                    spec.blocks.iter().find(|x| x.network == b.network)
                                    && nb.ipv4.is_some()
                                    && b.ipv4.is_some()
                                    && duplicates(&state).is_empty()
                                {
                                    assert_eq!(nb.ipv4, b.ipv4, "seed {seed} node {node}");
                                }
                            }
                        }
                    }
                    state = a.specs();
                } else {
                    // Two "concurrent" reconciles from the same snapshot.
                    let mut view_a = present.clone();
                    let mut view_b = present.clone();
                    churn(&mut rng, &mut view_a);
                    churn(&mut rng, &mut view_b);
                    let a = allocate(
                        &networks,
                        &view_a.values().cloned().collect::<Vec<_>>(),
                        &state,
                    );
                    let b = allocate(
                        &networks,
                        &view_b.values().cloned().collect::<Vec<_>>(),
                        &state,
                    );
                    assert_eq!(duplicates(&a.specs()), [], "seed {seed}");
                    assert_eq!(duplicates(&b.specs()), [], "seed {seed}");
                    let (first, second) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
                    let mut merged = state.clone();
                    merged.extend(first.specs());
                    merged.extend(second.specs());
                    present = if rng.below(2) == 0 { view_a } else { view_b };
                    merged.retain(|n, _| present.contains_key(n));
                    // The stored state may now hold a stale claim; the next allocation repairs it.
                    let nodes: Vec<NodeInfo> = present.values().cloned().collect();
                    let repaired = allocate(&networks, &nodes, &merged);
                    assert_eq!(duplicates(&repaired.specs()), [], "seed {seed}");
                    state = repaired.specs();
                }
            }
        }
    }

    #[test]
    fn wholly_excluded_blocks_are_skipped_in_one_jump() {
        let mut lan = net("lan", &["192.168.50.0/24"], Some(27));
        lan.spec.ipam.as_mut().unwrap().exclude = Some(vec![
            weft_crds::IpOrCidr::from("192.168.50.0/26"),
            weft_crds::IpOrCidr::from("192.168.50.100"),
        ]);
        let out = allocate(
            [&lan],
            &nodes(&["a", "b", "c"]),
            &BTreeMap::<String, NodeNetworkSpec>::new(),
        );
        let got: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| out.specs()[*n].blocks[0].ipv4.clone().unwrap().0)
            .collect();
        // .96/27 holds one excluded address only: still a block.
        assert_eq!(
            got,
            ["192.168.50.64/27", "192.168.50.96/27", "192.168.50.128/27"]
        );
        let v6: IpNet = "fd00::/48".parse().unwrap();
        let huge: IpNet = "fd00::/49".parse().unwrap();
        assert_eq!(
            nth_block(v6, 122, &[huge], 1),
            Some("fd00:0:0:8000::40/122".parse().unwrap())
        );
        assert_eq!(
            nth_block(
                "10.0.0.0/30".parse().unwrap(),
                30,
                &["10.0.0.0/30".parse().unwrap()],
                0
            ),
            None
        );
    }
}

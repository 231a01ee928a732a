//! What the controller keeps of a Network's WorkloadSlices between two reconciles, so that a
//! NodeNetwork event costs work in proportion to what it changed, not to the Network's size.
//!
//! A [`Book`] holds the slices as last placed and, per node, the fingerprint of what the node
//! published for the Network and what was left out of it. While the store agrees with the
//! book (every slice of the store at a version the book wrote or read, none deleted since),
//! a reconcile vouches again only for the nodes whose publication or blocks changed and moves
//! their entries in or out of the slices that hold them ([`Book::update`]); the result is the
//! one [`place`] gives for all entries (property-tested). Otherwise (the first reconcile, a
//! slice written or deleted by someone else, a write that failed, another leader) the book is
//! read again from the store and every node vouched for.

use super::{ReservationKey, WorkloadKey, fill, keyed, place, reservation_key, workload_key};
use crate::controller::compact::CompactNodeNetwork;
use crate::controller::pods::PodDirectory;
use crate::model::peers::{Held, Pods, Publication, VmAddresses, Vouched, vouch};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use weft_crds::{SliceReservation, SliceWorkload, WorkloadSlice, WorkloadSliceSpec};

/// What identifies a node's publication for one Network: the fingerprint of its entries, its
/// blocks of the Network, and the generation of what is known of its pods
/// ([`PodDirectory::generation`]).
type NodeKey = (Option<u64>, Vec<IpNet>, u64);

/// What the book remembers of one node.
#[derive(Debug)]
struct Node {
    /// Its publication when last vouched for.
    key: NodeKey,
    /// What of it was left out, and why.
    problems: Vec<String>,
}

/// A Network's slices in the store, by index.
pub type Stored = BTreeMap<usize, Arc<WorkloadSlice>>;

/// What a node's publication is vouched for with: the Network, the VM addresses all nodes
/// reserve, the cluster's pods and the reservations the slices hold.
struct Vouching<'a> {
    network: &'a str,
    vms: &'a VmAddresses,
    pods: &'a Pods,
    held: &'a Held,
}

/// What the controller keeps of one Network's WorkloadSlices ([module docs](self)).
#[derive(Debug, Default)]
pub struct Book {
    /// The slices as last placed, by index (what the API server holds once the writes are in).
    slices: BTreeMap<usize, WorkloadSliceSpec>,
    /// Per index, the versions of the slice in the store that agree with `slices`: the one
    /// the store showed when the book last read it, then each one this replica wrote since
    /// (the store may lag behind a write). `None`: no such slice.
    versions: BTreeMap<usize, Vec<Option<String>>>,
    /// Per node, its publication as last vouched for.
    nodes: BTreeMap<String, Node>,
    /// Per node, the slices that hold its entries.
    held: HashMap<String, BTreeSet<usize>>,
    /// The VM addresses as last vouched with; `None` until the book is first filled.
    vms: Option<VmAddresses>,
    /// The WorkloadSlice deletions the watch had seen when the book was read from the store.
    deletions: u64,
}

impl Book {
    /// Brings the book of `network` up to date with the NodeNetworks `nodes`, the pods bound to
    /// nodes (`pods`) and the store's slices of the Network (`stored`, after `deletions` slice
    /// deletions seen by the watch), and returns the slices to write: those whose spec changed,
    /// by index.
    pub fn update(
        &mut self,
        network: &str,
        nodes: &[Arc<CompactNodeNetwork>],
        pods: &PodDirectory,
        stored: &Stored,
        deletions: u64,
    ) -> Vec<(usize, WorkloadSliceSpec)> {
        let publications: Vec<(NodeKey, Publication<'_>)> = nodes
            .iter()
            .filter_map(|nn| {
                let p = nn.publication_of(network)?;
                let key = (
                    nn.published.of(network),
                    p.blocks.iter().map(|(_, b)| *b).collect(),
                    pods.generation(p.node),
                );
                Some((key, p))
            })
            .collect();
        let in_step = self.in_step(stored, deletions);
        // The reservations the slices hold: the book's, or the store's when it is read again.
        let held = if in_step {
            Held::of(self.slices.values().flat_map(|s| &s.reservations))
        } else {
            Held::of(stored.values().flat_map(|s| &s.spec.reservations))
        };
        let pods = pods.pods();
        let vms = VmAddresses::of(
            publications.iter().map(|(_, p)| p),
            pods,
            &held,
            Some(network),
        );
        let vouching = Vouching {
            network,
            vms: &vms,
            pods,
            held: &held,
        };
        if in_step {
            self.changes(&publications, vouching)
        } else {
            self.read(&publications, vouching, stored, deletions)
        }
    }

    /// Records that the slice `index` was written and the API server answered with `version`.
    pub fn written(&mut self, index: usize, version: Option<String>) {
        self.versions.entry(index).or_default().push(version);
    }

    /// What the nodes published that the slices leave out, by node.
    pub fn problems(&self) -> Vec<String> {
        self.nodes
            .values()
            .flat_map(|n| n.problems.iter().cloned())
            .collect()
    }

    /// Whether the store agrees with the book; when a slice in the store has caught up with
    /// this replica's last write of it, the book takes the store's copy (and forgets the
    /// versions before).
    fn in_step(&mut self, stored: &Stored, deletions: u64) -> bool {
        if self.vms.is_none()
            || deletions != self.deletions
            || stored.keys().any(|i| !self.versions.contains_key(i))
        {
            return false;
        }
        let version = |i: &usize| {
            stored
                .get(i)
                .and_then(|s| s.metadata.resource_version.as_deref())
        };
        let agrees = self
            .versions
            .iter()
            .all(|(i, known)| known.iter().any(|v| v.as_deref() == version(i)));
        if !agrees {
            return false;
        }
        for (i, known) in &mut self.versions {
            if known.len() > 1 && known.last().is_some_and(|v| v.as_deref() == version(i)) {
                known.drain(..known.len() - 1);
                if let Some(s) = stored.get(i) {
                    self.slices.insert(*i, s.spec.clone());
                }
            }
        }
        true
    }

    /// Reads the book again from the store and vouches for every node: [`place`] of all
    /// entries from the store's slices.
    fn read(
        &mut self,
        publications: &[(NodeKey, Publication<'_>)],
        with: Vouching<'_>,
        stored: &Stored,
        deletions: u64,
    ) -> Vec<(usize, WorkloadSliceSpec)> {
        let network = with.network;
        let current: BTreeMap<usize, WorkloadSliceSpec> =
            stored.iter().map(|(i, s)| (*i, s.spec.clone())).collect();
        self.nodes.clear();
        let mut all = Vouched::default();
        for (key, p) in publications {
            self.vouch_for(key, p, &with, &mut all);
        }
        let desired = place(all.peers, all.reservations, &current, network);
        let changed = desired
            .iter()
            .filter(|(i, spec)| current.get(i) != Some(spec))
            .map(|(i, spec)| (*i, spec.clone()))
            .collect();
        self.versions = desired
            .keys()
            .map(|i| {
                let v = stored
                    .get(i)
                    .and_then(|s| s.metadata.resource_version.clone());
                (*i, vec![v])
            })
            .collect();
        self.held.clear();
        for (i, spec) in &desired {
            let nodes = spec.workloads.iter().map(|w| &w.node);
            for node in nodes.chain(spec.reservations.iter().map(|r| &r.node)) {
                if !self.held.get(node).is_some_and(|h| h.contains(i)) {
                    self.held.entry(node.clone()).or_default().insert(*i);
                }
            }
        }
        self.slices = desired;
        self.vms = Some(with.vms.clone());
        self.deletions = deletions;
        changed
    }

    /// Vouches again for the nodes whose publication changed since the book last did (all of
    /// them when the VM addresses changed) and moves their entries in or out of the slices.
    fn changes(
        &mut self,
        publications: &[(NodeKey, Publication<'_>)],
        with: Vouching<'_>,
    ) -> Vec<(usize, WorkloadSliceSpec)> {
        let network = with.network;
        let every = self.vms.as_ref() != Some(with.vms);
        let mut fresh = Vouched::default();
        let mut nodes: HashSet<String> = HashSet::new();
        let present: HashSet<&str> = publications.iter().map(|(_, p)| p.node).collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !present.contains(n.as_str()))
            .cloned()
            .collect();
        for node in gone {
            self.nodes.remove(&node);
            nodes.insert(node);
        }
        for (key, p) in publications {
            if !every && self.nodes.get(p.node).is_some_and(|n| n.key == *key) {
                continue;
            }
            self.vouch_for(key, p, &with, &mut fresh);
            nodes.insert(p.node.to_owned());
        }
        if every {
            self.vms = Some(with.vms.clone());
        }
        if nodes.is_empty() {
            return Vec::new();
        }
        let (workloads, reservations) = keyed(fresh.peers, fresh.reservations);
        let holding: BTreeSet<usize> = nodes
            .iter()
            .filter_map(|n| self.held.get(n))
            .flatten()
            .copied()
            .collect();
        let touched = move_entries(
            &mut self.slices,
            network,
            &holding,
            &|node| nodes.contains(node),
            workloads,
            reservations,
        );
        for i in &touched {
            self.versions.entry(*i).or_insert_with(|| vec![None]);
        }
        for node in &nodes {
            let was = self.held.remove(node).unwrap_or_default();
            let is: BTreeSet<usize> = was
                .union(&touched)
                .copied()
                .filter(|i| {
                    let spec = &self.slices[i];
                    spec.workloads.iter().any(|w| &w.node == node)
                        || spec.reservations.iter().any(|r| &r.node == node)
                })
                .collect();
            if !is.is_empty() {
                self.held.insert(node.clone(), is);
            }
        }
        touched
            .into_iter()
            .map(|i| (i, self.slices[&i].clone()))
            .collect()
    }

    /// Adds to `into` what the node of `p` may vouch for, and remembers its publication
    /// (`key`) with what was left out of it.
    fn vouch_for(
        &mut self,
        key: &NodeKey,
        p: &Publication<'_>,
        with: &Vouching<'_>,
        into: &mut Vouched,
    ) {
        let before = into.problems.len();
        vouch(p, with.vms, with.pods, with.held, Some(with.network), into);
        let problems = into.problems.split_off(before);
        self.nodes.insert(
            p.node.to_owned(),
            Node {
                key: key.clone(),
                problems,
            },
        );
    }
}

/// Moves the entries of the nodes for which `of_nodes` holds (in the slices `holding`) to what
/// they publish now (`workloads`, `reservations`): an entry still published stays where it is,
/// with what is published now; the others leave; new ones fill the slices with room, lowest
/// index first, then new slices after the last, as [`place`] does. Returns the indexes of the
/// slices that changed.
fn move_entries(
    slices: &mut BTreeMap<usize, WorkloadSliceSpec>,
    network: &str,
    holding: &BTreeSet<usize>,
    of_nodes: &dyn Fn(&str) -> bool,
    mut workloads: BTreeMap<WorkloadKey, SliceWorkload>,
    mut reservations: BTreeMap<ReservationKey, SliceReservation>,
) -> BTreeSet<usize> {
    let mut touched = BTreeSet::new();
    for i in holding {
        let Some(spec) = slices.get_mut(i) else {
            continue;
        };
        let before = spec.len();
        let mut changed = false;
        spec.workloads.retain_mut(|w| {
            if !of_nodes(&w.node) {
                return true;
            }
            match workloads.remove(&workload_key(w)) {
                Some(now) => {
                    if **w != now {
                        *w = Arc::new(now);
                        changed = true;
                    }
                    true
                }
                None => false,
            }
        });
        spec.reservations.retain_mut(|r| {
            if !of_nodes(&r.node) {
                return true;
            }
            match reservations.remove(&reservation_key(r)) {
                Some(now) => {
                    if *r != now {
                        *r = now;
                        changed = true;
                    }
                    true
                }
                None => false,
            }
        });
        if changed || spec.len() != before {
            touched.insert(*i);
        }
    }
    touched.extend(fill(
        slices,
        network,
        workloads.into_values(),
        reservations.into_values(),
    ));
    touched
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::compact::{Names, keep_node_network};
    use crate::model::peers::{PodFacts, Publication, vouched};
    use crate::model::shared::LabelSets;
    use proptest::prelude::*;
    use std::time::Instant;
    use weft_crds::{
        Cidr, NodeNetwork, NodeNetworkBlock, NodeNetworkSpec, NodeNetworkStatus, NodeReservation,
        NodeWorkload,
    };

    /// One node's publication: its block (the third octet), workloads (pod number, the third
    /// octet of its address, whether it is a VM's, label), reservations (VM number, whether
    /// in the node's block).
    #[derive(Debug, Clone)]
    struct Pub {
        block: u8,
        workloads: Vec<(u8, u8, bool, u8)>,
        reservations: Vec<(u8, bool)>,
    }

    fn node_network(node: usize, p: &Pub) -> NodeNetwork {
        let mut nn = NodeNetwork::new(
            &format!("n{node}"),
            NodeNetworkSpec {
                blocks: vec![NodeNetworkBlock {
                    network: "blue".into(),
                    ipv4: Some(Cidr::from(format!("10.0.{}.0/24", p.block).as_str())),
                    ipv6: None,
                }],
            },
        );
        nn.status = Some(NodeNetworkStatus {
            workloads: p
                .workloads
                .iter()
                .map(|&(pod, octet, vm, label)| NodeWorkload {
                    network: "blue".into(),
                    namespace: "default".into(),
                    // Pods of one node keep their names, so that some entries stay.
                    name: format!("p{node}-{pod}"),
                    // A VM's interface has the VM's address, which may lie in another node's
                    // block (the VM moved there).
                    ips: vec![if vm {
                        format!("10.0.{octet}.{}", 200 + pod % 3)
                    } else {
                        format!("10.0.{octet}.{}", 10 + pod)
                    }],
                    vm: vm.then(|| format!("default/vm{}", pod % 3)),
                    active: true,
                    labels: Arc::new(BTreeMap::from([("app".into(), format!("a{label}"))])),
                    mac: None,
                })
                .collect(),
            reservations: p
                .reservations
                .iter()
                .map(|&(vm, own)| NodeReservation {
                    vm: format!("default/vm{vm}"),
                    network: "blue".into(),
                    ifname: "eth0".into(),
                    ips: vec![format!(
                        "10.0.{}.{}",
                        if own { p.block } else { 3 - p.block },
                        200 + vm
                    )],
                    mac: None,
                    since: 1,
                })
                .collect(),
            ..Default::default()
        });
        nn
    }

    fn publication() -> impl Strategy<Value = Pub> {
        (
            0u8..4,
            prop::collection::vec((0u8..40, 0u8..4, prop::bool::weighted(0.2), 0u8..3), 0..30),
            prop::collection::vec((0u8..3, prop::bool::weighted(0.8)), 0..3),
        )
            .prop_map(|(block, workloads, reservations)| Pub {
                block,
                workloads,
                reservations,
            })
    }

    /// A step: node `.0` publishes `.1` (`Some(None)`: it goes; `None`: what it published
    /// before); `.2`: the store catches up with the writes before the next step; `.3`: the
    /// labels its pods have now.
    fn step() -> impl Strategy<Value = (usize, Option<Option<Pub>>, bool, u8)> {
        (
            0usize..4,
            prop::option::weighted(0.8, prop::option::weighted(0.9, publication())),
            any::<bool>(),
            0u8..3,
        )
    }

    /// Binds the pods `p` publishes for node `node` in `pods` (their labels from `relabel`, not
    /// those published; some bound to the next node, some not at all), and forgets the pods
    /// `bound` says it published before and no longer does.
    fn bind(
        pods: &mut PodDirectory,
        bound: &mut BTreeMap<usize, BTreeSet<String>>,
        node: usize,
        p: Option<&Pub>,
        relabel: u8,
    ) {
        let now: BTreeSet<String> = p
            .iter()
            .flat_map(|p| &p.workloads)
            .map(|w| format!("p{node}-{}", w.0))
            .collect();
        for gone in bound.get(&node).into_iter().flatten() {
            if !now.contains(gone) {
                pods.apply("default", gone, None, Instant::now());
            }
        }
        for &(pod, _, _, label) in p.iter().flat_map(|p| &p.workloads) {
            let on = if pod % 11 == 0 { (node + 1) % 4 } else { node };
            let facts = (pod % 13 != 0).then(|| PodFacts {
                node: format!("n{on}").into(),
                // Now and then a static pod's mirror, which its node may not speak for.
                mirror: pod % 17 == 0,
                departed: false,
                labels: Arc::new(BTreeMap::from([(
                    "app".into(),
                    format!("b{}", (label + relabel) % 3),
                )])),
            });
            pods.apply("default", &format!("p{node}-{pod}"), facts, Instant::now());
        }
        bound.insert(node, now);
        // Now and then the departed pods' grace is over.
        if relabel == 0 {
            pods.expire(Instant::now() + crate::controller::pods::DEPARTED_GRACE);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However the nodes' publications and their pods change, and whether the store keeps
        /// up or lags, the book's slices are [`place`] of everything vouched for, from the
        /// slices before, and the slices it says to write are exactly those that changed.
        #[test]
        fn the_book_places_what_place_places_from_all_entries(
            steps in prop::collection::vec(step(), 1..24),
        ) {
            let (mut names, mut labels) = (Names::default(), LabelSets::default());
            let mut published: BTreeMap<usize, Pub> = BTreeMap::new();
            let mut book = Book::default();
            // The API server's slices and the store's view of them.
            let mut server: Stored = BTreeMap::new();
            let mut store: Stored = BTreeMap::new();
            let mut version = 0u64;
            let (mut pods, mut bound) = (PodDirectory::default(), BTreeMap::new());
            for (node, publication, catch_up, relabel) in steps {
                match publication {
                    Some(Some(p)) => {
                        published.insert(node, p);
                    }
                    Some(None) => {
                        published.remove(&node);
                    }
                    None => {}
                }
                bind(&mut pods, &mut bound, node, published.get(&node), relabel);
                let nodes: Vec<Arc<CompactNodeNetwork>> = published
                    .iter()
                    .map(|(n, p)| Arc::new(keep_node_network(node_network(*n, p), &mut names, &mut labels)))
                    .collect();
                let before = book.slices.clone();
                let changed = book.update("blue", &nodes, &pods, &store, 0);

                let pubs: Vec<Publication<'_>> =
                    nodes.iter().filter_map(|nn| nn.publication_of("blue")).collect();
                // What the slices held before: a reservation taken once stays vouched for.
                let held = Held::of(before.values().flat_map(|s| &s.reservations));
                let all = vouched(&pubs, pods.pods(), &held, Some("blue"));
                let want = place(all.peers, all.reservations, &before, "blue");
                prop_assert_eq!(&book.slices, &want);
                let differ: Vec<usize> = want
                    .iter()
                    .filter(|(i, s)| before.get(i) != Some(s))
                    .map(|(i, _)| *i)
                    .collect();
                let said: Vec<usize> = changed.iter().map(|(i, _)| *i).collect();
                prop_assert_eq!(said, differ);
                let mut problems = book.problems();
                let mut expected = all.problems;
                problems.sort();
                expected.sort();
                prop_assert_eq!(problems, expected);

                for (index, spec) in changed {
                    version += 1;
                    let mut slice = WorkloadSlice::new(&format!("blue.{index}"), spec);
                    slice.metadata.resource_version = Some(version.to_string());
                    server.insert(index, Arc::new(slice));
                    book.written(index, Some(version.to_string()));
                }
                if catch_up {
                    store = server.clone();
                }
            }
        }
    }

    #[test]
    fn a_slice_changed_or_deleted_by_someone_else_makes_the_book_read_the_store_again() {
        let (mut names, mut labels) = (Names::default(), LabelSets::default());
        let p = Pub {
            block: 1,
            workloads: vec![(1, 1, false, 0), (2, 1, false, 0)],
            reservations: vec![],
        };
        let nodes = vec![Arc::new(keep_node_network(
            node_network(1, &p),
            &mut names,
            &mut labels,
        ))];
        let mut pods = PodDirectory::default();
        bind(&mut pods, &mut BTreeMap::new(), 1, Some(&p), 0);
        let mut book = Book::default();
        let changed = book.update("blue", &nodes, &pods, &BTreeMap::new(), 0);
        assert_eq!(changed.len(), 1);
        book.written(0, Some("1".into()));
        // The store has not seen the slice's creation yet: nothing to write again.
        assert!(
            book.update("blue", &nodes, &pods, &BTreeMap::new(), 0)
                .is_empty()
        );
        // The same store after the watch saw a deletion: the slice is written again.
        let changed = book.update("blue", &nodes, &pods, &BTreeMap::new(), 1);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1.workloads.len(), 2);
        let mut slice = WorkloadSlice::new("blue.0", changed[0].1.clone());
        slice.metadata.resource_version = Some("2".into());
        book.written(0, Some("2".into()));
        let mut store: Stored = BTreeMap::from([(0, Arc::new(slice.clone()))]);
        // In step, nothing changed: nothing to write.
        assert!(book.update("blue", &nodes, &pods, &store, 1).is_empty());
        // Emptied by hand: written again.
        slice.spec.workloads.clear();
        slice.metadata.resource_version = Some("3".into());
        store.insert(0, Arc::new(slice));
        let changed = book.update("blue", &nodes, &pods, &store, 1);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1.workloads.len(), 2);
    }
}

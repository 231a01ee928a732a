//! Which of the workloads and VM reservations a node's agent publishes the node may vouch for.
//!
//! An agent can write its NodeNetwork's status, not its spec (the blocks, written by the
//! controller): an address is taken from a node only when it lies in one of that node's blocks
//! of the same network, or, for a VM interface that kept its address when it moved from another
//! node, when the node whose block holds the address reserves it for that VM. Anything else is
//! left out and named in a problem, so that a compromised node cannot put an address of its
//! choosing into the other nodes' policy groups or hand a VM another workload's address.
//!
//! Nor is the node believed on who a workload is: a workload interface is taken only for a pod
//! the API server binds to that node ([`Pods`]), with that pod's labels (whatever labels the
//! node publishes), and a VM identity only of the pod's namespace and, for a KubeVirt
//! virt-launcher pod, its own VM's. A compromised node therefore cannot put its addresses into
//! a label group its pods do not belong to, nor speak for another node's pod. The controller
//! applies this before it copies the workloads into the Networks' WorkloadSlices.
//!
//! A VM reservation (`status.reservations`: the addresses and MAC a node keeps for a VM, which
//! the VM adopts when it starts on another node) is taken only from a node the VM ran on: one
//! that publishes an interface of that VM which it may speak for (above), or one whose
//! reservation of it the slices already hold ([`Held`]: taken while the VM ran there, kept
//! after it left). Otherwise a compromised node could publish a newer reservation for any VM
//! of any namespace, and the VM, started elsewhere, would adopt addresses of that node's block
//! (and their traffic) and a MAC of its choosing.

use super::{Peer, PeerReservation};
use ipnet::IpNet;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use weft_crds::nodenetwork::Labels;
use weft_crds::{NodeNetwork, NodeReservation, NodeWorkload};

/// What the API server says of a pod: the node it is bound to (`spec.nodeName`), its labels,
/// and whether it is a static pod's mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// The node the pod is bound to (one copy of each name).
    pub node: std::sync::Arc<str>,
    /// The pod's labels.
    pub labels: Labels,
    /// A mirror pod (annotation `kubernetes.io/config.mirror`): the kubelet made it from a
    /// static pod of its node, in the namespace and with the labels the node chose.
    pub mirror: bool,
    /// Deleted from the API moments ago: its node may still publish its workloads (the agent
    /// publishes the DEL after it), which are left out without a problem.
    pub departed: bool,
}

/// The pods bound to a node, by namespace and name ([`PodFacts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pods(HashMap<String, HashMap<String, PodFacts>>);

impl Pods {
    /// What is known of the pod `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        self.0.get(namespace)?.get(name)
    }

    /// Records `facts` for the pod `namespace/name`; returns what was known before.
    pub fn insert(&mut self, namespace: &str, name: &str, facts: PodFacts) -> Option<PodFacts> {
        self.0
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), facts)
    }

    /// Forgets the pod `namespace/name`; returns what was known of it.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<PodFacts> {
        let pods = self.0.get_mut(namespace)?;
        let was = pods.remove(name);
        if pods.is_empty() {
            self.0.remove(namespace);
        }
        was
    }

    /// Every pod: `(namespace, name, facts)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &PodFacts)> {
        self.0.iter().flat_map(|(namespace, pods)| {
            pods.iter()
                .map(move |(name, facts)| (namespace.as_str(), name.as_str(), facts))
        })
    }

    /// How many pods are known.
    pub fn len(&self) -> usize {
        self.0.values().map(HashMap::len).sum()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one node publishes, with the blocks the controller gave it.
#[derive(Debug, Clone, Default)]
pub struct Publication<'a> {
    /// The node.
    pub node: &'a str,
    /// The node's blocks: (network, block).
    pub blocks: Vec<(&'a str, IpNet)>,
    /// Its agent's `status.workloads`.
    pub workloads: &'a [NodeWorkload],
    /// Its agent's `status.reservations`.
    pub reservations: &'a [NodeReservation],
}

impl<'a> Publication<'a> {
    /// What the NodeNetwork `nn` publishes (blocks that do not parse are left out).
    pub fn of(nn: &'a NodeNetwork) -> Self {
        let blocks = nn
            .spec
            .blocks
            .iter()
            .flat_map(|b| {
                [&b.ipv4, &b.ipv6]
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.net().ok())
                    .map(|net| (b.network.as_str(), net))
            })
            .collect();
        let (workloads, reservations) = match &nn.status {
            Some(s) => (&s.workloads[..], &s.reservations[..]),
            None => (&[][..], &[][..]),
        };
        Publication {
            node: nn.metadata.name.as_deref().unwrap_or_default(),
            blocks,
            workloads,
            reservations,
        }
    }
}

/// The workloads and reservations the nodes may vouch for, and a problem for each left out.
#[derive(Debug, Default)]
pub struct Vouched {
    /// Workload interfaces, in the order of the publications.
    pub peers: Vec<Peer>,
    /// VM reservations, likewise.
    pub reservations: Vec<PeerReservation>,
    /// What was left out, and why (`NodeNetwork <node>: status.workloads: ...`).
    pub problems: Vec<String>,
}

/// The addresses the nodes reserve for VMs in blocks of their own: `(vm, network, address)`.
/// A node may vouch for a VM interface whose address lies in another node's block when that
/// node reserves it for the VM (it moved and kept its address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmAddresses(BTreeSet<(String, String, IpAddr)>);

impl VmAddresses {
    /// What `publications` reserve in their own blocks, of the reservations they may vouch for
    /// ([`reservation_refused`], given the cluster's `pods` and the reservations the slices
    /// `held`); with `network`, of that network only.
    pub fn of<'p, 'a: 'p>(
        publications: impl IntoIterator<Item = &'p Publication<'a>>,
        pods: &Pods,
        held: &Held,
        network: Option<&str>,
    ) -> Self {
        let mut out = BTreeSet::new();
        for p in publications {
            let ran = p.vms_running(pods);
            for r in p
                .reservations
                .iter()
                .filter(|r| of_network(network, &r.network))
                .filter(|r| reservation_refused(p.node, r, &ran, held).is_none())
            {
                for ip in r.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                    if p.holds(&r.network, &ip) {
                        out.insert((r.vm.clone(), r.network.clone(), ip));
                    }
                }
            }
        }
        VmAddresses(out)
    }

    fn contains(&self, vm: &str, network: &str, ip: IpAddr) -> bool {
        self.0.contains(&(vm.to_owned(), network.to_owned(), ip))
    }
}

/// The VM reservations a Network's WorkloadSlices hold: `(node, vm, interface)`. A node keeps
/// vouching for a reservation taken once, after its VM left it (a restart or a migration
/// elsewhere), for as long as it publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held(HashSet<(String, String, String)>);

impl Held {
    /// The reservations among `entries` (a Network's slice entries).
    pub fn of<'e>(entries: impl IntoIterator<Item = &'e PeerReservation>) -> Self {
        Held(
            entries
                .into_iter()
                .map(|r| {
                    let (node, vm, ifname) = r.key();
                    (node.to_owned(), vm.to_owned(), ifname.to_owned())
                })
                .collect(),
        )
    }

    fn holds(&self, node: &str, r: &NodeReservation) -> bool {
        self.0
            .contains(&(node.to_owned(), r.vm.clone(), r.ifname.clone()))
    }
}

/// Why the reservation `r` published by `node` is not taken, if it is not: unless the slices
/// already hold it (`held`), the VM must run on the node, in a pod the node may speak for
/// (`ran`: `(vm, network)` of the node's interfaces that [`pod_taken`] accepts).
fn reservation_refused(
    node: &str,
    r: &NodeReservation,
    ran: &HashSet<(&str, &str)>,
    held: &Held,
) -> Option<String> {
    if ran.contains(&(r.vm.as_str(), r.network.as_str())) || held.holds(node, r) {
        return None;
    }
    Some(format!(
        "VM {} runs in no pod bound to node {node}, and no reservation of it by {node} was taken while it did",
        r.vm
    ))
}

fn of_network(want: Option<&str>, network: &str) -> bool {
    want.is_none_or(|want| want == network)
}

impl Publication<'_> {
    /// `(vm, network)` of each VM interface the node publishes for a pod it may speak for
    /// ([`pod_taken`]).
    fn vms_running(&self, pods: &Pods) -> HashSet<(&str, &str)> {
        self.workloads
            .iter()
            .filter_map(|w| {
                let vm = w.vm.as_deref()?;
                pod_taken(self.node, w, pods.get(&w.namespace, &w.name)).ok()?;
                Some((vm, w.network.as_str()))
            })
            .collect()
    }

    /// Whether one of the node's blocks of `network` holds `ip`.
    fn holds(&self, network: &str, ip: &IpAddr) -> bool {
        self.blocks
            .iter()
            .any(|(n, block)| *n == network && block.contains(ip))
    }
}

/// Why a workload's published MAC is not taken, if it is not: one that is not a unicast MAC
/// (a multicast or the all-zero MAC would be refused by every kernel it reached, and a peer's
/// MAC stands in other nodes' anti-spoofing and collision checks).
fn mac_refused(mac: &str) -> Option<String> {
    let Some(m) = weft_dataplane::names::parse_mac(mac) else {
        return Some(format!("MAC {mac:?} is not a MAC address"));
    };
    (m[0] & 1 == 1 || m == [0; 6]).then(|| format!("MAC {mac} is not a unicast address"))
}

/// The pod of the workload `w` (`pod`, what the API server says of it) if the node `node` may
/// speak for it, else why not (`None`: its pod was just deleted, and the node's publication of
/// the DEL may be on its way, no problem): the pod must exist and be bound to `node`, not be a
/// static pod's mirror, and a VM identity the node gives the workload must be of the pod's
/// namespace and, when the pod names the VM it runs (KubeVirt's `vm.kubevirt.io/name` label),
/// that VM.
fn pod_taken<'a>(
    node: &str,
    w: &NodeWorkload,
    pod: Option<&'a PodFacts>,
) -> Result<&'a PodFacts, Option<String>> {
    let Some(pod) = pod else {
        return Err(Some(format!(
            "no pod {}/{} is bound to a node (the API server has none)",
            w.namespace, w.name
        )));
    };
    if *pod.node != *node {
        return Err(Some(format!(
            "pod {}/{} runs on node {}, not on {node}",
            w.namespace, w.name, pod.node
        )));
    }
    if pod.departed {
        return Err(None);
    }
    if pod.mirror {
        // A node makes the mirror pods of its static pods itself: their namespace and labels
        // say nothing the node could not choose.
        return Err(Some(format!(
            "pod {}/{} is the mirror of a static pod, whose namespace and labels its node chooses",
            w.namespace, w.name
        )));
    }
    let Some(vm) = w.vm.as_deref() else {
        return Ok(pod);
    };
    let runs = pod
        .labels
        .get(weft_dataplane::proto::VM_NAME_LABEL)
        .map(|name| format!("{}/{name}", w.namespace));
    match vm.split_once('/') {
        Some((namespace, _)) if namespace != w.namespace => Err(Some(format!(
            "VM {vm} is not of the pod's namespace {}",
            w.namespace
        ))),
        None => Err(Some(format!("VM {vm:?} is not namespace/name"))),
        _ => match runs {
            Some(runs) if runs != vm => Err(Some(format!("the pod runs VM {runs}, not {vm}"))),
            _ => Ok(pod),
        },
    }
}

/// What the node of `p` may vouch for ([module docs](self)), added to `out`, given the VM
/// addresses that all nodes reserve ([`VmAddresses::of`]), the cluster's pods and the
/// reservations the slices hold; with `network`, only that network's workloads and
/// reservations. A workload taken carries its pod's labels.
pub fn vouch(
    p: &Publication<'_>,
    vms: &VmAddresses,
    pods: &Pods,
    held: &Held,
    network: Option<&str>,
    out: &mut Vouched,
) {
    let node = p.node;
    // Why an address published by the node is not taken, if it is not.
    let refuse = |network: &str, vm: Option<&str>, ip: &str| -> Option<String> {
        let Ok(addr) = ip.parse::<IpAddr>() else {
            return Some(format!("{ip:?} is not an IP address"));
        };
        if p.holds(network, &addr) || vm.is_some_and(|vm| vms.contains(vm, network, addr)) {
            return None;
        }
        Some(format!(
            "{addr} is outside the node's blocks of network {network} and not reserved there for it"
        ))
    };
    for w in p
        .workloads
        .iter()
        .filter(|w| of_network(network, &w.network))
    {
        let taken = w
            .ips
            .iter()
            .find_map(|ip| refuse(&w.network, w.vm.as_deref(), ip))
            .or_else(|| w.mac.as_deref().and_then(mac_refused))
            .map_or_else(
                || pod_taken(node, w, pods.get(&w.namespace, &w.name)),
                |why| Err(Some(why)),
            );
        match taken {
            Ok(pod) => out.peers.push(Peer {
                node: node.to_owned(),
                workload: NodeWorkload {
                    labels: pod.labels.clone(),
                    ..w.clone()
                },
            }),
            // Its pod just deleted: the node's DEL is on its way.
            Err(None) => {}
            Err(Some(why)) => out.problems.push(format!(
                "NodeNetwork {node}: status.workloads: {}/{} on network {} left out of policy groups: {why}",
                w.namespace, w.name, w.network
            )),
        }
    }
    let ran = p.vms_running(pods);
    for r in p
        .reservations
        .iter()
        .filter(|r| of_network(network, &r.network))
    {
        match r
            .ips
            .iter()
            .find_map(|ip| refuse(&r.network, Some(&r.vm), ip))
            .or_else(|| reservation_refused(node, r, &ran, held))
        {
            None => out.reservations.push(PeerReservation {
                node: node.to_owned(),
                reservation: r.clone(),
            }),
            Some(why) => out.problems.push(format!(
                "NodeNetwork {node}: status.reservations: VM {} on network {} ignored: {why}",
                r.vm, r.network
            )),
        }
    }
}

/// What each of `publications` may vouch for ([module docs](self)), given the cluster's pods
/// and the reservations the slices hold; with `network`, only that network's workloads and
/// reservations.
pub fn vouched(
    publications: &[Publication<'_>],
    pods: &Pods,
    held: &Held,
    network: Option<&str>,
) -> Vouched {
    let vms = VmAddresses::of(publications, pods, held, network);
    let mut out = Vouched::default();
    for p in publications {
        vouch(p, &vms, pods, held, network, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::spec;
    use weft_crds::NodeNetworkStatus;

    fn published(
        node: &str,
        blocks: &[(&str, Option<&str>, Option<&str>)],
        workloads: &[(&str, &str, Option<&str>, &[&str])],
        reservations: &[(&str, &str, &[&str])],
    ) -> NodeNetwork {
        let mut nn = NodeNetwork::new(node, spec(blocks));
        nn.status = Some(NodeNetworkStatus {
            workloads: workloads
                .iter()
                .map(|(name, network, vm, ips)| weft_crds::NodeWorkload {
                    network: (*network).into(),
                    namespace: "default".into(),
                    name: (*name).into(),
                    ips: ips.iter().map(|s| (*s).into()).collect(),
                    vm: vm.map(Into::into),
                    active: true,
                    labels: Default::default(),
                    mac: None,
                })
                .collect(),
            reservations: reservations
                .iter()
                .map(|(vm, network, ips)| weft_crds::NodeReservation {
                    vm: (*vm).into(),
                    network: (*network).into(),
                    ifname: "eth0".into(),
                    ips: ips.iter().map(|s| (*s).into()).collect(),
                    mac: None,
                    since: 1,
                })
                .collect(),
            ..Default::default()
        });
        nn
    }

    /// The slices' reservations `(node, vm)` (interface `eth0`).
    fn held(entries: &[(&str, &str)]) -> Held {
        let entries: Vec<PeerReservation> = entries
            .iter()
            .map(|(node, vm)| PeerReservation {
                node: (*node).into(),
                reservation: NodeReservation {
                    vm: (*vm).into(),
                    ifname: "eth0".into(),
                    ..Default::default()
                },
            })
            .collect();
        Held::of(&entries)
    }

    #[test]
    fn a_workload_of_a_pod_just_deleted_is_left_out_without_a_problem() {
        let a = published(
            "node-a",
            &[("nat", Some("10.10.0.0/24"), None)],
            &[
                ("web", "nat", None, &["10.10.0.5"]),
                ("gone", "nat", None, &["10.10.0.6"]),
            ],
            &[],
        );
        let mut pods = bound(&[&a]);
        let mut gone = pods.get("default", "gone").cloned().unwrap();
        gone.departed = true;
        pods.insert("default", "gone", gone);
        let v = vouched(&[Publication::of(&a)], &pods, &Held::default(), None);
        let names: Vec<&str> = v.peers.iter().map(|p| p.workload.name.as_str()).collect();
        assert_eq!(names, ["web"]);
        assert!(v.problems.is_empty(), "{:#?}", v.problems);
        // Once forgotten (its grace over), the node still publishing it has a problem.
        pods.remove("default", "gone");
        let v = vouched(&[Publication::of(&a)], &pods, &Held::default(), None);
        assert_eq!(v.peers.len(), 1);
        assert!(
            v.problems[0].contains("no pod default/gone is bound to a node"),
            "{:#?}",
            v.problems
        );
    }

    #[test]
    fn a_reservation_is_taken_only_from_a_node_the_vm_ran_on() {
        let x = published(
            "node-x",
            &[("nat", Some("10.10.0.0/24"), None)],
            &[(
                "virt-launcher-mine",
                "nat",
                Some("default/mine"),
                &["10.10.0.5"],
            )],
            &[
                // Runs here, in a pod bound to node-x.
                ("default/mine", "nat", &["10.10.0.5"]),
                // Ran here once: the slices hold node-x's reservation of it.
                ("default/left", "nat", &["10.10.0.6"]),
                // Never ran here: claimed with an address of node-x's block.
                ("default/victim", "nat", &["10.10.0.7"]),
            ],
        );
        // The victim starts on node-b, which adopts what node-x claims.
        let b = published(
            "node-b",
            &[("nat", Some("10.10.1.0/24"), None)],
            &[(
                "virt-launcher-victim",
                "nat",
                Some("default/victim"),
                &["10.10.0.7"],
            )],
            &[],
        );
        let mut pods = bound(&[&x]);
        let launcher = |node: &str, vm: &str| PodFacts {
            node: node.into(),
            labels: std::sync::Arc::new(
                [(weft_dataplane::proto::VM_NAME_LABEL.into(), vm.into())].into(),
            ),
            mirror: false,
            departed: false,
        };
        pods.insert("default", "virt-launcher-mine", launcher("node-x", "mine"));
        pods.insert(
            "default",
            "virt-launcher-victim",
            launcher("node-b", "victim"),
        );
        let v = vouched(
            &[Publication::of(&x), Publication::of(&b)],
            &pods,
            &held(&[("node-x", "default/left")]),
            None,
        );
        let kept: Vec<&str> = v
            .reservations
            .iter()
            .map(|r| r.reservation.vm.as_str())
            .collect();
        assert_eq!(kept, ["default/mine", "default/left"]);
        let names: Vec<&str> = v.peers.iter().map(|p| p.workload.name.as_str()).collect();
        assert_eq!(names, ["virt-launcher-mine"], "{:#?}", v.problems);
        assert!(
            v.problems.iter().any(|p| p.contains(
                "status.reservations: VM default/victim on network nat ignored: VM default/victim runs in no pod bound to node node-x"
            )),
            "{:#?}",
            v.problems
        );
        // The victim's launcher on node-b: node-x's claim reserves nothing for it.
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("default/virt-launcher-victim")
                    && p.contains("10.10.0.7 is outside the node's blocks of network nat")),
            "{:#?}",
            v.problems
        );
    }

    /// Every pod `nodes` publish, bound to its node, with label `app=real`.
    fn bound(nodes: &[&NodeNetwork]) -> Pods {
        let mut pods = Pods::default();
        for nn in nodes {
            for w in nn.status.iter().flat_map(|s| &s.workloads) {
                pods.insert(
                    &w.namespace,
                    &w.name,
                    PodFacts {
                        node: nn.metadata.name.as_deref().unwrap().into(),
                        labels: std::sync::Arc::new([("app".into(), "real".into())].into()),
                        mirror: false,
                        departed: false,
                    },
                );
            }
        }
        pods
    }

    #[test]
    fn a_node_vouches_only_for_addresses_of_its_own_blocks_or_reserved_for_a_moved_vm() {
        let a = published(
            "node-a",
            &[("nat", Some("10.10.0.0/24"), Some("fd10::/120"))],
            &[("web", "nat", None, &["10.10.0.5", "fd10::5"])],
            &[("default/vm1", "nat", &["10.10.0.9"])],
        );
        let b = published(
            "node-b",
            &[("nat", Some("10.10.1.0/24"), None)],
            &[
                ("ok", "nat", None, &["10.10.1.7"]),
                // node-a's web, claimed by node-b: an address of another node's block.
                ("thief", "nat", None, &["10.10.0.5"]),
                // Outside every block, and not an address at all.
                ("far", "nat", None, &["192.0.2.1"]),
                ("junk", "nat", None, &["10.10.1.8", "not-an-ip"]),
                // An address of node-b's block of another network.
                ("other-net", "lan", None, &["10.10.1.9"]),
                // vm1 moved from node-a and kept its address: node-a reserves it for vm1.
                ("vm1-pod", "nat", Some("default/vm1"), &["10.10.0.9"]),
                // Another VM cannot take vm1's address.
                ("vm2-pod", "nat", Some("default/vm2"), &["10.10.0.9"]),
            ],
            &[
                ("default/vm1", "nat", &["10.10.0.9"]),
                ("default/vm3", "nat", &["10.10.0.5"]),
                ("default/vm4", "nat", &["10.10.1.20"]),
            ],
        );
        let pods = bound(&[&a, &b]);
        // Reservations of VMs that no longer run on their node: taken while they did.
        let held = held(&[("node-a", "default/vm1"), ("node-b", "default/vm4")]);
        let v = vouched(
            &[Publication::of(&a), Publication::of(&b)],
            &pods,
            &held,
            None,
        );
        let (peers, reservations, problems) = (v.peers, v.reservations, v.problems);
        let names: Vec<(&str, &str)> = peers
            .iter()
            .map(|p| (p.node.as_str(), p.workload.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [("node-a", "web"), ("node-b", "ok"), ("node-b", "vm1-pod")]
        );
        let kept: Vec<(&str, &str)> = reservations
            .iter()
            .map(|r| (r.node.as_str(), r.reservation.vm.as_str()))
            .collect();
        assert_eq!(
            kept,
            [
                ("node-a", "default/vm1"),
                ("node-b", "default/vm1"),
                ("node-b", "default/vm4")
            ]
        );
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(
            problems[0].contains("NodeNetwork node-b: status.workloads: default/thief")
                && problems[0].contains("10.10.0.5 is outside the node's blocks of network nat"),
            "{problems:#?}"
        );
        assert!(
            problems[2].contains("\"not-an-ip\" is not an IP address"),
            "{problems:#?}"
        );
        assert!(
            problems[5].contains("status.reservations: VM default/vm3"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_published_mac_must_be_a_unicast_mac() {
        let mut b = published(
            "node-b",
            &[("nat", Some("10.10.1.0/24"), None)],
            &[
                ("derived", "nat", None, &["10.10.1.7"]),
                // A VM's hashed MAC may begin like weft's derived ones: taken as it is.
                ("hashed", "nat", None, &["10.10.1.8"]),
                ("multicast", "nat", None, &["10.10.1.9"]),
                ("zero", "nat", None, &["10.10.1.10"]),
                ("junk", "nat", None, &["10.10.1.11"]),
            ],
            &[],
        );
        let macs = [
            "0a:58:0a:0a:01:07",
            "0a:58:0a:0a:00:05",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "not-a-mac",
        ];
        let status = b.status.as_mut().unwrap();
        for (w, mac) in status.workloads.iter_mut().zip(macs) {
            w.mac = Some(mac.into());
        }
        let v = vouched(
            &[Publication::of(&b)],
            &bound(&[&b]),
            &Held::default(),
            None,
        );
        let names: Vec<&str> = v.peers.iter().map(|p| p.workload.name.as_str()).collect();
        assert_eq!(names, ["derived", "hashed"]);
        assert_eq!(v.problems.len(), 3, "{:#?}", v.problems);
        assert!(
            v.problems[0].contains("default/multicast")
                && v.problems[0].contains("not a unicast address"),
            "{:#?}",
            v.problems
        );
        assert!(
            v.problems[2].contains("is not a MAC address"),
            "{:#?}",
            v.problems
        );
    }

    #[test]
    fn one_networks_vouched_entries_alone() {
        let a = published(
            "node-a",
            &[
                ("nat", Some("10.10.0.0/24"), None),
                ("lan", Some("10.30.0.0/24"), None),
            ],
            &[
                ("web", "nat", None, &["10.10.0.5"]),
                ("db", "lan", None, &["10.30.0.5"]),
            ],
            &[("default/vm1", "lan", &["10.30.0.9"])],
        );
        let v = vouched(
            &[Publication::of(&a)],
            &bound(&[&a]),
            &held(&[("node-a", "default/vm1")]),
            Some("lan"),
        );
        let names: Vec<&str> = v.peers.iter().map(|p| p.workload.name.as_str()).collect();
        assert_eq!(names, ["db"]);
        assert_eq!(v.reservations.len(), 1);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
    }

    #[test]
    fn a_node_speaks_only_for_pods_bound_to_it_and_with_their_own_labels() {
        let mut a = published(
            "node-a",
            &[("nat", Some("10.10.0.0/24"), None)],
            &[
                ("web", "nat", None, &["10.10.0.5"]),
                // The API server binds it to node-b.
                ("elsewhere", "nat", None, &["10.10.0.6"]),
                // No such pod.
                ("ghost", "nat", None, &["10.10.0.7"]),
                // virt-launcher pods: of VM default/db (its label), or naming none.
                ("launcher-db", "nat", Some("default/db"), &["10.10.0.8"]),
                ("launcher-db2", "nat", Some("default/other"), &["10.10.0.9"]),
                ("launcher-x", "nat", Some("prod/x"), &["10.10.0.10"]),
                ("launcher-y", "nat", Some("default/y"), &["10.10.0.11"]),
                // A static pod's mirror, which node-a made itself.
                ("static", "nat", None, &["10.10.0.12"]),
            ],
            &[],
        );
        // The node claims a label group of its choosing for web.
        a.status.as_mut().unwrap().workloads[0].labels =
            std::sync::Arc::new([("app".into(), "db".into())].into());
        let mut pods = bound(&[&a]);
        pods.remove("default", "ghost");
        let facts = |node: &str, labels: &[(&str, &str)]| PodFacts {
            node: node.into(),
            labels: std::sync::Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            mirror: false,
            departed: false,
        };
        pods.insert("default", "elsewhere", facts("node-b", &[]));
        let vm = weft_dataplane::proto::VM_NAME_LABEL;
        pods.insert("default", "launcher-db", facts("node-a", &[(vm, "db")]));
        pods.insert("default", "launcher-db2", facts("node-a", &[(vm, "db")]));
        pods.insert(
            "default",
            "static",
            PodFacts {
                mirror: true,
                departed: false,
                ..facts("node-a", &[("app", "db")])
            },
        );
        let v = vouched(&[Publication::of(&a)], &pods, &Held::default(), None);
        let taken: Vec<(&str, Option<&String>)> = v
            .peers
            .iter()
            .map(|p| (p.workload.name.as_str(), p.workload.labels.get("app")))
            .collect();
        let real = "real".to_string();
        assert_eq!(
            taken,
            [
                ("web", Some(&real)),
                ("launcher-db", None),
                ("launcher-y", Some(&real))
            ]
        );
        let why: Vec<&str> = v
            .problems
            .iter()
            .map(|p| p.split_once("left out of policy groups: ").unwrap().1)
            .collect();
        assert_eq!(
            why,
            [
                "pod default/elsewhere runs on node node-b, not on node-a",
                "no pod default/ghost is bound to a node (the API server has none)",
                "the pod runs VM default/db, not default/other",
                "VM prod/x is not of the pod's namespace default",
                "pod default/static is the mirror of a static pod, whose namespace and labels its node chooses",
            ]
        );
    }
}

//! What weft reads: the resources the agent, the policy compiler and the lab work from, and the
//! problems found in them. Plain data and the reading of manifests; nothing here knows how the
//! agent gets the resources or what the compiler makes of them.

mod manifest;
pub mod peers;
pub mod shared;

/// Test helpers shared by the modules that read NodeNetworks.
#[cfg(test)]
pub(crate) mod testing {
    use weft_crds::{Cidr, NodeNetworkBlock, NodeNetworkSpec};

    /// A NodeNetwork spec of `(network, IPv4 block, IPv6 block)`.
    pub(crate) fn spec(blocks: &[(&str, Option<&str>, Option<&str>)]) -> NodeNetworkSpec {
        NodeNetworkSpec {
            blocks: blocks
                .iter()
                .map(|(network, v4, v6)| NodeNetworkBlock {
                    network: (*network).into(),
                    ipv4: v4.map(Cidr::from),
                    ipv6: v6.map(Cidr::from),
                })
                .collect(),
        }
    }
}

pub use manifest::{add_document, parse_manifests};

use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeMap;
use weft_crds::{
    ClusterSegmentationPolicy, Network, PortForward, SegmentationPolicy, TrafficMirror,
};

/// A workload's identity and labels (a Pod; for KubeVirt, the virt-launcher pod).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The `weft.dev/networks` annotation: the weft Networks the pod wants, one interface each.
    pub networks: Option<String>,
    /// Its limit annotations ([`weft_crds::limits::ANNOTATIONS`]), as written.
    pub limits: BTreeMap<String, String>,
}

impl WorkloadMeta {
    /// The limit annotations among a pod's `annotations`.
    pub fn limit_annotations(annotations: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        weft_crds::limits::ANNOTATIONS
            .iter()
            .filter_map(|k| annotations.get(*k).map(|v| ((*k).to_string(), v.clone())))
            .collect()
    }
}

/// A workload interface on another node: its node and what its agent published, as an entry
/// of a WorkloadSlice carries it (the agent reads the slices, the controller writes them).
pub type Peer = weft_crds::SliceWorkload;

/// The workloads of other nodes that went and came from `before` to `now` (as many times as
/// each went or came: an entry read again from a rewritten slice is neither). Entries that
/// are the same allocation in both (a slice that did not change) are not compared.
pub fn peer_delta(
    before: &[std::sync::Arc<Peer>],
    now: &[std::sync::Arc<Peer>],
) -> (Vec<std::sync::Arc<Peer>>, Vec<std::sync::Arc<Peer>>) {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    let held =
        |peers: &[Arc<Peer>]| -> HashSet<*const Peer> { peers.iter().map(Arc::as_ptr).collect() };
    let (was, is) = (held(before), held(now));
    // Content → the entries not shared that held it before, and those that hold it now.
    type Sides<'a> = (Vec<&'a Arc<Peer>>, Vec<&'a Arc<Peer>>);
    let mut sides: HashMap<&Peer, Sides> = HashMap::new();
    for p in before.iter().filter(|p| !is.contains(&Arc::as_ptr(p))) {
        sides.entry(&**p).or_default().0.push(p);
    }
    for p in now.iter().filter(|p| !was.contains(&Arc::as_ptr(p))) {
        sides.entry(&**p).or_default().1.push(p);
    }
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for (gone, came) in sides.into_values() {
        let (g, c) = (gone.len(), came.len());
        removed.extend(gone.into_iter().take(g.saturating_sub(c)).cloned());
        added.extend(came.into_iter().take(c.saturating_sub(g)).cloned());
    }
    (removed, added)
}

/// A VM interface's reservation on another node, as an entry of a WorkloadSlice carries it.
pub type PeerReservation = weft_crds::SliceReservation;

/// Everything the node plan is computed from, besides the node's own endpoints.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    /// Networks.
    pub networks: Vec<Network>,
    /// Port forwards.
    pub port_forwards: Vec<PortForward>,
    /// Workloads (pods) known to the source, for label selectors.
    pub workloads: Vec<WorkloadMeta>,
    /// Cluster segmentation policies.
    pub cluster_policies: Vec<ClusterSegmentationPolicy>,
    /// Namespaced segmentation policies.
    pub policies: Vec<SegmentationPolicy>,
    /// Traffic mirrors.
    pub mirrors: Vec<TrafficMirror>,
    /// Namespaces' labels (a namespace without a Namespace object has only the automatic
    /// `kubernetes.io/metadata.name` label).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Documents that could not be read, with the reason (reported, never fatal).
    pub problems: Vec<String>,
    /// Workload interfaces on other nodes, as their agents published them: members of the
    /// policies' groups here (a rule naming pods by label matches them wherever they run).
    pub peers: Vec<std::sync::Arc<Peer>>,
    /// VM reservations on other nodes, as their agents published them: a VM started here gets
    /// the addresses and MAC it had there.
    pub peer_reservations: Vec<PeerReservation>,
    /// The identities (`namespace/name`) of the KubeVirt VMs and VM instances in the cluster,
    /// when the source knows them (cluster mode with KubeVirt installed, once listed): a
    /// reservation of a VM not among them is forgotten. `None`: reservations are kept.
    pub vms: Option<std::collections::BTreeSet<String>>,
    /// This node's address blocks per network, when the source knows them (cluster mode: the
    /// controller's `NodeNetwork`). `None`: the agent assigns blocks itself (standalone).
    pub node_blocks: Option<BTreeMap<String, NodeBlocks>>,
    /// Cluster mode: this node's `NodeNetwork` is not in the API (not written yet, deleted and
    /// not written again yet, or gone with its Node while the Node was re-created);
    /// `node_blocks` is then empty. The plan keeps the Networks realized on the node meanwhile
    /// (see `agent::plan::held_blocks`).
    pub node_network_missing: bool,
    /// This node's labels, when the source knows them (cluster mode: the Node object). `None`:
    /// the agent uses the labels it was configured with (`--node-labels`).
    pub node_labels: Option<BTreeMap<String, String>>,
}

impl Resources {
    /// Whether `other` differs from this snapshot in its peers at most (the workloads of other
    /// nodes; their VM reservations must be equal too).
    pub fn same_but_peers(&self, other: &Resources) -> bool {
        // Every field named, so that a new one is not forgotten here.
        let Resources {
            networks,
            port_forwards,
            workloads,
            cluster_policies,
            policies,
            mirrors,
            namespaces,
            problems,
            peers: _,
            peer_reservations,
            vms,
            node_blocks,
            node_network_missing,
            node_labels,
        } = self;
        *networks == other.networks
            && *port_forwards == other.port_forwards
            && *workloads == other.workloads
            && *cluster_policies == other.cluster_policies
            && *policies == other.policies
            && *mirrors == other.mirrors
            && *namespaces == other.namespaces
            && *problems == other.problems
            && *peer_reservations == other.peer_reservations
            && *vms == other.vms
            && *node_blocks == other.node_blocks
            && *node_network_missing == other.node_network_missing
            && *node_labels == other.node_labels
    }
}

/// This node's address blocks of one network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeBlocks {
    /// IPv4 block.
    pub v4: Option<Ipv4Net>,
    /// IPv6 block.
    pub v6: Option<Ipv6Net>,
}

/// A problem with one resource, found by the policy compiler or the agent's node plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Network`, `PortForward`, `ClusterSegmentationPolicy`, `SegmentationPolicy`, `Pod` or
    /// `Container` (a workload the runtime named no pod for).
    pub kind: &'static str,
    /// `namespace/name` or `name`.
    pub object: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// What kind of problem a workload's (kind `Pod` or `Container`) is; `None` for the
    /// other kinds. In a cluster it is the reason of the Event on the pod.
    pub reason: Option<WorkloadReason>,
}

/// What is wrong with one workload interface, as a pod's users see it: the `reason` of the
/// Warning Event the agent publishes on the pod (see `agent::pod_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadReason {
    /// One of its limit annotations (`weft.dev/max-connections`,
    /// `kubernetes.io/egress-bandwidth`, ...) is invalid; its Network's limits apply alone.
    InvalidLimitAnnotation,
    /// A host port of its is already another workload's on the node; it is not forwarded.
    HostPortConflict,
    /// A host port of its has a protocol weft does not forward (not tcp, udp or sctp).
    UnsupportedHostPortProtocol,
    /// A host port of its is also a node port of a PortForward, which takes the connections of
    /// its allowed sources.
    HostPortShadowedByPortForward,
    /// It asks for a SYN proxy on its host ports and the node's agent runs without one.
    SynProxyUnavailable,
}

impl WorkloadReason {
    /// The Event's `reason` (CamelCase, as Kubernetes' own reasons are).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadReason::InvalidLimitAnnotation => "InvalidLimitAnnotation",
            WorkloadReason::HostPortConflict => "HostPortConflict",
            WorkloadReason::UnsupportedHostPortProtocol => "UnsupportedHostPortProtocol",
            WorkloadReason::HostPortShadowedByPortForward => "HostPortShadowedByPortForward",
            WorkloadReason::SynProxyUnavailable => "SynProxyUnavailable",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.message)
    }
}

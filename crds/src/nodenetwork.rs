//! `NodeNetwork` (cluster-scoped, short name `wnn`): one object per node, named after the node.
//! The controller writes its spec (the address blocks the node got from each Network); the
//! node's agent writes its status (what it realized).

use crate::cidr::Cidr;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Kind of [`NodeNetwork`].
pub const NODE_NETWORK_KIND: &str = "NodeNetwork";

/// Most entries in `spec.blocks` (one per Network that selects the node).
pub const MAX_NODE_BLOCKS: usize = 1024;

/// The weft networks of one node (the object is named after the node): the address blocks the
/// controller assigned to the node from each Network's subnets, and what the node's agent has
/// realized.
// The printcolumn(...) lists repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "NodeNetwork",
    shortname = "wnn",
    status = "NodeNetworkStatus",
    derive = "PartialEq",
    doc = "The weft networks of one node (weft.dev/v1alpha1, cluster-scoped, named after the node): address blocks assigned by the controller, and what the node agent realized.",
    printcolumn(name = "Networks", type_ = "string", json_path = ".status.networks"),
    printcolumn(name = "Endpoints", type_ = "integer", json_path = ".status.endpoints"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkSpec {
    /// The address blocks of the node, one entry per Network that selects the node. Written
    /// by the weft controller.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["network".into()]))]
    pub blocks: Vec<NodeNetworkBlock>,
}

/// The address blocks one node got from one Network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkBlock {
    /// Name of the Network.
    #[schemars(length(max = 253))]
    pub network: String,
    /// The node's block of the Network's IPv4 subnet, e.g. 10.10.0.64/26; absent when the
    /// Network has no IPv4 subnet (or no block was free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Cidr>,
    /// The node's block of the Network's IPv6 subnet, e.g. fd10::40/122; absent when the
    /// Network has no IPv6 subnet (or no block was free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Cidr>,
}

/// What the node's agent realized, written by the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkStatus {
    /// The metadata.generation of the spec the agent applied last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: Ready (every block of the spec is realized) and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Names of the Networks realized on the node right now (their bridge and rules exist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,

    /// Names of the bridges weft created on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<String>,

    /// Number of workload endpoints (pod or VM interfaces) on the node, all networks together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<i64>,

    /// The last error the agent hit while applying the spec, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// The workload interfaces on the node (pod or VM, network, labels, addresses): the other
    /// nodes' agents put them into their policies' groups, so a rule naming pods by label
    /// matches them wherever they run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub workloads: Vec<NodeWorkload>,

    /// The segmentation policies enforced on the node: how many of its workload interfaces each
    /// applies to, and what is wrong with it here. The controller sums them into each policy's
    /// status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub policies: Vec<NodePolicy>,

    /// The traffic mirrors on the node: how many of its workload interfaces each copies, what
    /// it copied, and what is wrong with it here. The controller sums them into each mirror's
    /// status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub mirrors: Vec<NodeMirror>,

    /// The PortForwards whose target runs on the node: the addresses the node forwards each
    /// to, and what keeps it from forwarding as asked here. The controller sums them into each
    /// PortForward's status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub forwards: Vec<NodeForward>,

    /// The VM interfaces whose addresses and MAC the node keeps for their VM (KubeVirt's
    /// `vm.kubevirt.io/name`): a VM started on another node gets the newest of them back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub reservations: Vec<NodeReservation>,
}

/// One VM interface's addresses and MAC kept on a node, as its agent publishes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReservation {
    /// The VM's identity, `namespace/name`.
    pub vm: String,
    /// The weft Network.
    pub network: String,
    /// The interface inside the VM's pod (`eth0`, `pod<hash>`).
    pub ifname: String,
    /// The addresses.
    #[schemars(length(max = 2))]
    pub ips: Vec<String>,
    /// The MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// When an attachment on the node last took them (Unix seconds).
    pub since: i64,
}

/// One traffic mirror on one node, as its agent reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeMirror {
    /// The TrafficMirror, `namespace/name`.
    #[schemars(length(max = 317))]
    pub mirror: String,
    /// Workload interfaces on the node whose frames it copies.
    pub sources: i32,
    /// Frames copied on the node (the counters of the sources' ports now).
    #[serde(default)]
    pub packets: i64,
    /// Bytes copied on the node, likewise.
    #[serde(default)]
    pub bytes: i64,
    /// What keeps it from mirroring here (no analyzer on the node, a collector outside the
    /// allowed CIDRs), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
}

/// One PortForward on one node, as its agent reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeForward {
    /// The PortForward, `namespace/name`.
    #[schemars(length(max = 317))]
    pub forward: String,
    /// The workload addresses the node forwards it to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub targets: Vec<String>,
    /// What keeps the node from forwarding it as asked (a node port another forward holds, a
    /// SYN proxy the agent may not run), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
}

/// One segmentation policy as one node's agent enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicy {
    /// `ClusterSegmentationPolicy <name>` or `SegmentationPolicy <namespace>/<name>`.
    pub policy: String,
    /// Workload interfaces on the node it applies to.
    pub interfaces: i32,
    /// What the agent could not enforce (an unknown network, a bad selector), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One workload interface on a node, as its agent publishes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeWorkload {
    /// The weft Network of the interface.
    pub network: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name (for a VM, its virt-launcher pod).
    pub name: String,
    /// The pod's labels.
    #[serde(default, skip_serializing_if = "no_labels")]
    #[schemars(length(max = 64))]
    pub labels: Labels,
    /// The interface's addresses.
    #[schemars(length(max = 2))]
    pub ips: Vec<String>,
    /// For a VM: its stable identity (`namespace/name`); a live migration's target node keeps
    /// the VM's addresses and MAC from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The interface's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// False for a live migration's target port that waits for the VM to arrive.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub active: bool,
}

/// A workload's labels, shared: the pods of one Deployment carry the same set, and a reader
/// holding thousands of workloads keeps one copy of each set (see `weft_operator`'s label
/// interning), not one a workload.
pub type Labels = std::sync::Arc<std::collections::BTreeMap<String, String>>;

fn no_labels(labels: &Labels) -> bool {
    labels.is_empty()
}

impl NodeNetworkStatus {
    /// Whether the agent reports `network` as realized on the node.
    pub fn lists_network(&self, network: &str) -> bool {
        self.networks.iter().any(|n| n == network)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    #[test]
    fn empty_objects_deserialize() {
        let spec: NodeNetworkSpec = serde_json::from_str("{}").unwrap();
        assert!(spec.blocks.is_empty());
        let status: NodeNetworkStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(status, NodeNetworkStatus::default());
        let nn: NodeNetwork = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "NodeNetwork",
            "metadata": {"name": "node-a"},
            "spec": {"blocks": [{"network": "blue", "ipv4": "10.10.0.0/26"}]},
            "status": {"networks": ["blue"], "endpoints": 3, "observedGeneration": 2}
        }))
        .unwrap();
        assert_eq!(nn.spec.blocks[0].ipv4.as_deref(), Some("10.10.0.0/26"));
        assert_eq!(nn.spec.blocks[0].ipv6, None);
        let status = nn.status.unwrap();
        assert!(status.lists_network("blue"));
        assert_eq!(status.endpoints, Some(3));
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let crd = NodeNetwork::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("nodenetworks.weft.dev"));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["wnn".to_string()]));
        assert_eq!(NodeNetwork::kind(&()), NODE_NETWORK_KIND);
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().is_some_and(|s| s.status.is_some()));
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Networks", "Endpoints", "Ready", "Age"]);
    }
}

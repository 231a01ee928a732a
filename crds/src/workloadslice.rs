//! `WorkloadSlice` (cluster-scoped, short name `wws`): part of one Network's workload interfaces
//! on all nodes, as the agents of other nodes need them for their policy groups and a VM's
//! live migration. The controller writes them (from what each node's agent publishes in its
//! NodeNetwork status, keeping only the addresses that node may vouch for); agents read the
//! slices of the Networks they realize, selected by the label [`NETWORK_LABEL`]. One Network's
//! workloads are spread over slices of at most [`MAX_SLICE_ENTRIES`] entries, so a pod's start
//! rewrites one slice, not a list that grows with the cluster.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Kind of [`WorkloadSlice`].
pub const WORKLOAD_SLICE_KIND: &str = "WorkloadSlice";

/// The label naming a slice's Network ([`network_label_value`] of the Network's name).
pub const NETWORK_LABEL: &str = "weft.dev/network";

/// Most workloads and reservations in one slice, together.
pub const MAX_SLICE_ENTRIES: usize = 100;

/// Part of one Network's workload interfaces, on all nodes (written by the weft controller).
// The printcolumn(...) lists repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "WorkloadSlice",
    shortname = "wws",
    derive = "PartialEq",
    doc = "Part of one Network's workload interfaces on all nodes (weft.dev/v1alpha1, cluster-scoped), written by the weft controller for the agents' policy groups.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSliceSpec {
    /// The Network.
    #[schemars(length(max = 253))]
    pub network: String,
    /// Workload interfaces of the Network, each on the node that runs it.
    // Shared: a reader's snapshot of all its slices' workloads holds pointers, not copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub workloads: Vec<std::sync::Arc<SliceWorkload>>,
    /// VM interfaces' addresses and MAC kept by a node for their VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub reservations: Vec<SliceReservation>,
}

/// One workload interface in a [`WorkloadSlice`]: what its node's agent published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceWorkload {
    /// The node it runs on.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The interface as the node's agent published it.
    #[serde(flatten)]
    pub workload: crate::NodeWorkload,
}

/// One VM reservation in a [`WorkloadSlice`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceReservation {
    /// The node that keeps it.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The reservation as the node's agent published it.
    #[serde(flatten)]
    pub reservation: crate::NodeReservation,
}

impl SliceWorkload {
    /// What identifies the entry among a Network's slices: its node, namespace, name and
    /// addresses. The controller places each entry once by it, and agents read an entry found
    /// in two slices (two writes that crossed) once.
    pub fn key(&self) -> (&str, &str, &str, &[String]) {
        (
            &self.node,
            &self.workload.namespace,
            &self.workload.name,
            &self.workload.ips,
        )
    }
}

impl SliceReservation {
    /// What identifies the entry among a Network's slices: its node, VM and interface.
    pub fn key(&self) -> (&str, &str, &str) {
        (&self.node, &self.reservation.vm, &self.reservation.ifname)
    }
}

impl WorkloadSliceSpec {
    /// Workloads and reservations together.
    pub fn len(&self) -> usize {
        self.workloads.len() + self.reservations.len()
    }

    /// Whether it holds neither.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The value of [`NETWORK_LABEL`] for the Network `network`: its name when that is a valid
/// label value (at most 63 characters), else its first 46 characters, `-` and the first 8 bytes of
/// the SHA-256 of the whole name in hex (the same in every version of weft).
pub fn network_label_value(network: &str) -> String {
    if network.len() <= crate::validate::MAX_LABEL_VALUE_LEN {
        return network.to_owned();
    }
    let digest = Sha256::digest(network.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = network.chars().take(46).collect();
    format!("{}-{hash}", prefix.trim_end_matches(['-', '.']))
}

/// The name of the `index`-th slice of `network`: the label value, `.`, the index.
pub fn slice_name(network: &str, index: usize) -> String {
    format!("{}.{index}", network_label_value(network))
}

/// The index of slice `name` of `network`, if it is named as [`slice_name`] names them.
pub fn slice_index(network: &str, name: &str) -> Option<usize> {
    let rest = name.strip_prefix(&network_label_value(network))?;
    let digits = rest.strip_prefix('.')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    #[test]
    fn crd_is_cluster_scoped_with_atomic_lists() {
        let crd = WorkloadSlice::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("workloadslices.weft.dev")
        );
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(WorkloadSlice::kind(&()), WORKLOAD_SLICE_KIND);
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["workloads"]["x-kubernetes-list-type"], "atomic");
        assert_eq!(spec["workloads"]["maxItems"], 100);
        // The flattened workload's fields are the slice entry's own.
        let entry = &spec["workloads"]["items"]["properties"];
        assert!(
            entry["node"].is_object() && entry["ips"].is_object(),
            "{entry}"
        );
    }

    #[test]
    fn entries_read_back_flat() {
        let s: WorkloadSliceSpec = serde_json::from_value(serde_json::json!({
            "network": "blue",
            "workloads": [{"node": "n1", "network": "blue", "namespace": "shop", "name": "web-1", "ips": ["10.0.0.2"]}],
            "reservations": [{"node": "n2", "vm": "shop/vm", "network": "blue", "ifname": "eth0", "ips": ["10.0.0.9"], "since": 5}],
        }))
        .unwrap();
        assert_eq!(s.workloads[0].node, "n1");
        assert_eq!(s.workloads[0].workload.name, "web-1");
        assert!(s.workloads[0].workload.active);
        assert_eq!(s.reservations[0].reservation.vm, "shop/vm");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn names_and_labels_fit_the_api() {
        assert_eq!(network_label_value("blue"), "blue");
        assert_eq!(slice_name("blue", 3), "blue.3");
        assert_eq!(slice_index("blue", "blue.3"), Some(3));
        assert_eq!(slice_index("blue", "blue.03"), None);
        assert_eq!(slice_index("blue", "blue.x"), None);
        assert_eq!(slice_index("blue", "blue-2.3"), None);
        assert_eq!(slice_index("blu", "blue.3"), None);
        let long = format!("{}.{}", "a".repeat(60), "b".repeat(60));
        let label = network_label_value(&long);
        assert!(label.len() <= 63, "{label}");
        assert!(
            label.starts_with(&"a".repeat(46))
                && label.ends_with(|c: char| c.is_ascii_alphanumeric())
        );
        assert_ne!(label, network_label_value(&format!("{long}c")));
        assert_eq!(slice_index(&long, &slice_name(&long, 12)), Some(12));
    }
}

//! What `peer_memory` and `peer_change_cpu` share: the WorkloadSlices of `bench/peers-scale.sh`
//! (110 pods a node in the shapes of Deployments' pods: ten apps, five labels each; one NAT
//! Network) and its one ClusterSegmentationPolicy, whose peers are the `app: web` pods.

use std::collections::BTreeMap;
use weft_operator::agent::plan::NodeContext;
use weft_operator::model::{NodeBlocks, Resources, parse_manifests};

pub const APPS: [&str; 10] = [
    "web", "api", "cache", "db", "worker", "auth", "search", "billing", "mail", "queue",
];
pub const PER_NODE: usize = 110;

/// The slices of `n` workloads as JSON, 100 workloads a slice.
pub fn slices(n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for k in 0..n {
        let (node, j) = (1 + k / PER_NODE, k % PER_NODE);
        let app = APPS[k % APPS.len()];
        let version = if k % 3 == 0 { "v2" } else { "v1" };
        let hash = format!("{:010x}", (k % APPS.len()) * 3 + usize::from(k % 3 == 0));
        entries.push(serde_json::json!({
            "node": format!("node-{node}"), "network": "pods", "namespace": "bench",
            "name": format!("{app}-{hash}-{k:05}"),
            "labels": {"app": app, "tier": "backend", "pod-template-hash": hash,
                       "version": version, "app.kubernetes.io/part-of": "shop"},
            "ips": [format!("10.{}.{}.{}", node / 256, node % 256, 2 + j)],
            "mac": format!("02:00:00:{:02x}:{:02x}:{:02x}", node / 256, node % 256, j),
        }));
        if entries.len() == 100 || k + 1 == n {
            out.push(
                serde_json::json!({
                    "apiVersion": "weft.dev/v1alpha1", "kind": "WorkloadSlice",
                    "metadata": {"name": format!("pods-{}", out.len()),
                                 "labels": {"weft.dev/network": "pods"}},
                    "spec": {"network": "pods", "workloads": std::mem::take(&mut entries)},
                })
                .to_string(),
            );
        }
    }
    out
}

/// The Network and the policy of `bench/peers-scale.sh`, parsed.
pub fn resources() -> anyhow::Result<Resources> {
    let mut res = Resources::default();
    parse_manifests(
        "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: pods}\n\
         spec: {mode: NAT, subnets: [10.0.0.0/8], ipam: {nodeBlockPrefix: 24}}\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: ClusterSegmentationPolicy\n\
         metadata: {name: web-to-all}\n\
         spec:\n  tier: Admin\n  priority: 100\n  subject: {pods: {podSelector: {}}}\n  \
         ingress:\n    - name: from-web\n      action: Accept\n      \
         from: [{pods: {podSelector: {matchLabels: {app: web}}}}]\n",
        "peers_common",
        &mut res,
    );
    anyhow::ensure!(res.problems.is_empty(), "{:?}", res.problems);
    Ok(res)
}

/// node-0, and its block of the Network.
pub fn node_zero() -> anyhow::Result<(NodeContext, BTreeMap<String, NodeBlocks>)> {
    let node = NodeContext {
        name: "node-0".into(),
        labels: BTreeMap::new(),
        syn_proxy: false,
        own_tcp_ports: Vec::new(),
    };
    let blocks = BTreeMap::from([(
        "pods".to_string(),
        NodeBlocks {
            v4: Some("10.0.0.0/24".parse()?),
            v6: None,
        },
    )]);
    Ok((node, blocks))
}

//! Heap an agent holds per workload of other nodes: the WorkloadSlices its store keeps, the
//! peers of a resource snapshot, and the node plan compiled from them, with the peak while the
//! plan is computed. The slices are those of `bench/peers-scale.sh` (110 pods a node in the
//! shapes of Deployments' pods: ten apps, five labels each; one NAT Network; one
//! ClusterSegmentationPolicy whose peers are the `app: web` pods), read from their JSON as the
//! watch delivers it.
//!
//!   cargo run --release -p weft-operator --example peer_memory -- [WORKLOADS]
//!
//! Figures: docs/benchmarks.md ("Peers at scale").

use std::collections::BTreeMap;
use std::sync::Arc;
use weft_crds::WorkloadSlice;
use weft_operator::agent::plan::{self, NodeContext};
use weft_operator::model::shared::LabelSets;
use weft_operator::model::{NodeBlocks, Peer, Resources, parse_manifests};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const APPS: [&str; 10] = [
    "web", "api", "cache", "db", "worker", "auth", "search", "billing", "mail", "queue",
];
const PER_NODE: usize = 110;

/// The slices of `n` workloads as JSON, 100 workloads a slice.
fn slices(n: usize) -> Vec<String> {
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

fn live() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Bytes a workload, of what `f` left allocated, and of its peak above what was live before.
fn measure<T>(n: usize, f: impl FnOnce() -> T) -> (T, usize, usize) {
    let before = live();
    let _ = dhat::HeapStats::get();
    let out = f();
    let stats = dhat::HeapStats::get();
    // `max_bytes` is the peak of the whole run: report it only when this step set it.
    let peak = stats.max_bytes.saturating_sub(before);
    (out, stats.curr_bytes.saturating_sub(before) / n, peak / n)
}

fn main() -> anyhow::Result<()> {
    let _profiler = dhat::Profiler::builder().testing().build();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(21_890);
    let texts = slices(n);
    let read = |share: bool| -> anyhow::Result<Vec<Arc<WorkloadSlice>>> {
        let mut sets = LabelSets::default();
        texts
            .iter()
            .map(|t| {
                let mut slice: WorkloadSlice = serde_json::from_str(t)?;
                if share {
                    sets.share_slice(&mut slice);
                }
                Ok(Arc::new(slice))
            })
            .collect()
    };
    let snapshot = |slices: &[Arc<WorkloadSlice>]| -> Vec<Arc<Peer>> {
        slices
            .iter()
            .flat_map(|s| s.spec.workloads.iter().cloned())
            .collect()
    };
    println!("{n} workloads of other nodes; bytes of heap a workload:");
    let (own, read_plain, _) = measure(n, || read(false));
    drop(own?);
    let (shared, kept, _) = measure(n, || read(true));
    let shared = shared?;
    println!("  slices as read (each workload's own labels): {read_plain}");
    println!("  slices as the agent keeps them (label sets shared): {kept}");
    let (peers, snap, _) = measure(n, || snapshot(&shared));
    println!("  a snapshot's peers: {snap}");

    let mut res = Resources::default();
    parse_manifests(
        "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: pods}\n\
         spec: {mode: NAT, subnets: [10.0.0.0/8], ipam: {nodeBlockPrefix: 24}}\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: ClusterSegmentationPolicy\n\
         metadata: {name: web-to-all}\n\
         spec:\n  tier: Admin\n  priority: 100\n  subject: {pods: {podSelector: {}}}\n  \
         ingress:\n    - name: from-web\n      action: Accept\n      \
         from: [{pods: {podSelector: {matchLabels: {app: web}}}}]\n",
        "peer_memory",
        &mut res,
    );
    anyhow::ensure!(res.problems.is_empty(), "{:?}", res.problems);
    res.peers = peers;
    let node = NodeContext {
        name: "node-0".into(),
        labels: BTreeMap::new(),
        syn_proxy: false,
    };
    let blocks = BTreeMap::from([(
        "pods".to_string(),
        NodeBlocks {
            v4: Some("10.0.0.0/24".parse()?),
            v6: None,
        },
    )]);
    let started = std::time::Instant::now();
    let (out, planned, peak) = measure(n, || plan::plan(&node, &res, &blocks, &[]));
    println!(
        "  the node plan: {planned} (peak while it is computed: {peak}; {:.0} ms)",
        started.elapsed().as_secs_f64() * 1e3
    );
    std::hint::black_box((&shared, &res, &out));
    Ok(())
}

//! Heap the controller holds per pod bound to a node (`controller::pods`: what the nodes'
//! publications are checked against), for pods in the shapes of `bench/peers-scale.sh` (110 a
//! node, ten apps, five labels each), read from their JSON as the watch delivers them, with the
//! peak while a full list is taken in.
//!
//!   cargo run --release -p weft-operator --example pod_memory -- [PODS]
//!
//! Figures: docs/benchmarks.md ("Peers at scale").

// Only the pods' shapes of the module are used here.
#[allow(dead_code)]
mod peers_common;

use k8s_openapi::api::core::v1::Pod;
use peers_common::{APPS, PER_NODE};
use weft_operator::controller::pods::{PodDirectory, facts_of};
use weft_operator::model::peers::Pods;
use weft_operator::model::shared::{LabelSets, Names};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Pod `k` as the API server sends it (trimmed of nothing: the watch decodes it whole).
fn pod(k: usize) -> String {
    let node = 1 + k / PER_NODE;
    let app = APPS[k % APPS.len()];
    let version = if k.is_multiple_of(3) { "v2" } else { "v1" };
    let hash = format!(
        "{:010x}",
        (k % APPS.len()) * 3 + usize::from(k.is_multiple_of(3))
    );
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{app}-{hash}-{k:05}"), "namespace": "bench",
                     "uid": format!("00000000-0000-0000-0000-{k:012}"), "resourceVersion": "1",
                     "labels": {"app": app, "tier": "backend", "pod-template-hash": hash,
                                "version": version, "app.kubernetes.io/part-of": "shop"}},
        "spec": {"nodeName": format!("node-{node}"),
                 "containers": [{"name": app, "image": format!("registry.example/shop/{app}:1.4.2"),
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", node / 256, node % 256, 2 + k % PER_NODE)},
    })
    .to_string()
}

fn main() -> anyhow::Result<()> {
    let _profiler = dhat::Profiler::builder().testing().build();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(110_000);
    let before = dhat::HeapStats::get().curr_bytes;
    let (mut names, mut labels) = (Names::default(), LabelSets::default());
    let mut all = Pods::default();
    for k in 0..n {
        let p: Pod = serde_json::from_str(&pod(k))?;
        if let Some((ns, name, facts)) = facts_of(&p, &mut names, &mut labels) {
            all.insert(&ns, &name, facts);
        }
    }
    let mut directory = PodDirectory::default();
    directory.relist(all, std::time::Instant::now());
    let stats = dhat::HeapStats::get();
    let held = stats.curr_bytes.saturating_sub(before);
    let peak = stats.max_bytes.saturating_sub(before);
    anyhow::ensure!(directory.pods().len() == n, "every pod is held");
    println!(
        "{n} pods on {} nodes: {} bytes a pod held ({:.1} MiB), peak {:.1} MiB while listed",
        n.div_ceil(PER_NODE),
        held / n,
        held as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    Ok(())
}

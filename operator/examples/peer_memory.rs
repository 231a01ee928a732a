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

mod peers_common;

use peers_common::slices;
use std::sync::Arc;
use weft_crds::WorkloadSlice;
use weft_operator::agent::plan;
use weft_operator::model::Peer;
use weft_operator::model::shared::LabelSets;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

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

    let mut res = peers_common::resources()?;
    res.peers = peers;
    let (node, blocks) = peers_common::node_zero()?;
    let started = std::time::Instant::now();
    let (out, planned, peak) = measure(n, || plan::plan(&node, &res, &blocks, &[]));
    println!(
        "  the node plan: {planned} (peak while it is computed: {peak}; {:.0} ms)",
        started.elapsed().as_secs_f64() * 1e3
    );
    std::hint::black_box((&shared, &res, &out));
    Ok(())
}

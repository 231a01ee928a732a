//! The agent's CPU for one workload more on another node, with N workloads of other nodes
//! already in its rules: the snapshot's peers read from the WorkloadSlices (as the agent's
//! source reads them on every reconcile), the comparison with the snapshot applied last, the
//! peers that went and came, the in-place change of the groups' sets; and, for comparison,
//! the full plan of the same resources. The slices, Network and policy are those of
//! `bench/peers-scale.sh`; no kernel (the change's one nfnetlink batch is not in these times).
//!
//!   cargo run --release -p weft-operator --example peer_change_cpu -- [WORKLOADS]
//!
//! Medians of five. Figures: docs/benchmarks.md ("Peers at scale").

mod peers_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use weft_crds::WorkloadSlice;
use weft_operator::agent::kube::slice_peers;
use weft_operator::agent::plan;
use weft_operator::model::shared::LabelSets;

/// The median time of five runs of `f`, in ms, and its last result.
fn median<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut timed = || {
        let t = Instant::now();
        let out = f();
        (t.elapsed().as_secs_f64() * 1e3, out)
    };
    let (first, mut out) = timed();
    let mut times = vec![first];
    for _ in 0..4 {
        let (ms, o) = timed();
        times.push(ms);
        out = o;
    }
    times.sort_by(f64::total_cmp);
    (times[2], out)
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(109_890);
    // n + 1 workloads: the last slice is read once without its last entry (before) and once
    // with it (after the new pod's status write), each as the watch delivers it.
    let texts = peers_common::slices(n + 1);
    let mut sets = LabelSets::default();
    let mut read = |text: &str| -> anyhow::Result<Arc<WorkloadSlice>> {
        let mut slice: WorkloadSlice = serde_json::from_str(text)?;
        sets.share_slice(&mut slice);
        Ok(Arc::new(slice))
    };
    let mut slices = texts
        .iter()
        .map(|t| read(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // (`slice_peers` sorts the slices by name: the last one is found by its name.)
    let name = slices[slices.len() - 1].metadata.name.clone();
    let at = |slices: &[Arc<WorkloadSlice>]| slices.iter().position(|s| s.metadata.name == name);
    let last = slices.len() - 1;
    let after = Arc::clone(&slices[last]);
    let mut before = (*after).clone();
    before.spec.workloads.pop();
    slices[last] = Arc::new(before);
    let networks = BTreeSet::from(["pods".to_string()]);

    let mut res = peers_common::resources()?;
    let (node, blocks) = peers_common::node_zero()?;
    res.peers = slice_peers(&mut slices, &networks, "node-0").0;
    let mut out = plan::plan(&node, &res, &blocks, &[]);
    let elements: usize = out
        .plan
        .firewall
        .sets
        .iter()
        .map(|s| s.elements.len())
        .sum();

    let last = at(&slices).ok_or_else(|| anyhow::anyhow!("the last slice is gone"))?;
    slices[last] = after;
    let (read_ms, (peers, _)) = median(|| slice_peers(&mut slices, &networks, "node-0"));
    let mut now = res.clone();
    now.peers = peers;
    let (same_ms, same) = median(|| res.same_but_peers(&now));
    anyhow::ensure!(same, "the snapshots differ in more than their peers");
    let (delta_ms, (removed, added)) =
        median(|| weft_operator::model::peer_delta(&res.peers, &now.peers));
    anyhow::ensure!(removed.is_empty() && added.len() == 1, "one peer came");
    let t = Instant::now();
    let tx = plan::apply_peer_changes(&mut out, &now, &removed, &added);
    let change_ms = t.elapsed().as_secs_f64() * 1e3;
    let tx = tx.ok_or_else(|| anyhow::anyhow!("the peer's change does not fit in place"))?;
    let (plan_ms, full) = median(|| plan::plan(&node, &now, &blocks, &[]));
    anyhow::ensure!(
        full.plan == out.plan,
        "the change in place differs from the full plan"
    );

    println!("{n} workloads of other nodes, {elements} set elements; one workload more:");
    println!("  the snapshot's peers from the slices: {read_ms:.1} ms");
    println!("  same but peers: {same_ms:.2} ms");
    println!("  the peers that went and came: {delta_ms:.1} ms");
    println!(
        "  the change in place: {change_ms:.2} ms ({} set changes)",
        tx.0.len()
    );
    println!("  the full plan instead: {plan_ms:.1} ms");
    Ok(())
}

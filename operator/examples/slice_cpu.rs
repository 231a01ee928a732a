//! CPU time of the controller's WorkloadSlice reconcile of one Network: reading every node's
//! publication (the first reconcile, or after the store disagreed) against taking one node's
//! change (one pod more) into the slices. NODES nodes (200 unless given) publish 110 pods each,
//! five labels a pod.
//!
//!   cargo run --release -p weft-operator --example slice_cpu -- [NODES]
//!
//! Figures: docs/benchmarks.md ("Peers at scale").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_crds::{
    Cidr, NodeNetwork, NodeNetworkBlock, NodeNetworkSpec, NodeNetworkStatus, NodeWorkload,
    WorkloadSlice,
};
use weft_operator::controller::compact::{CompactNodeNetwork, Names, keep_node_network};
use weft_operator::controller::pods::PodDirectory;
use weft_operator::controller::slices::{Book, Stored};
use weft_operator::model::peers::{PodFacts, Pods};
use weft_operator::model::shared::LabelSets;

const PER_NODE: usize = 110;

fn node_network(n: usize, pods: usize) -> NodeNetwork {
    let (hi, lo) = (n / 256, n % 256);
    let mut nn = NodeNetwork::new(
        &format!("node-{n}"),
        NodeNetworkSpec {
            blocks: vec![NodeNetworkBlock {
                network: "pods".into(),
                ipv4: Some(Cidr::from(format!("10.{hi}.{lo}.0/24").as_str())),
                ipv6: None,
            }],
        },
    );
    let labels = [
        ("app", "web"),
        ("tier", "backend"),
        ("pod-template-hash", "6d4cf56db6"),
        ("version", "v1"),
        ("app.kubernetes.io/part-of", "shop"),
    ];
    nn.status = Some(NodeNetworkStatus {
        workloads: (0..pods)
            .map(|j| NodeWorkload {
                network: "pods".into(),
                namespace: "bench".into(),
                name: format!("web-6d4cf56db6-{n:04}{j:03}"),
                ips: vec![format!("10.{hi}.{lo}.{}", j + 2)],
                vm: None,
                active: true,
                labels: Arc::new(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                mac: None,
            })
            .collect(),
        ..Default::default()
    });
    nn
}

fn main() -> anyhow::Result<()> {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let (mut names, mut labels) = (Names::default(), LabelSets::default());
    // The API server's pods: every node's, the one more too.
    let mut pods = Pods::default();
    for nn in (0..nodes).map(|n| node_network(n, PER_NODE + 1)) {
        for w in nn.status.iter().flat_map(|s| &s.workloads) {
            let mut set = w.labels.clone();
            labels.share(&mut set);
            let node = nn.metadata.name.as_deref().unwrap_or_default().into();
            let facts = PodFacts {
                node,
                labels: set,
                mirror: false,
                departed: false,
            };
            pods.insert(&w.namespace, &w.name, facts);
        }
    }
    let mut directory = PodDirectory::default();
    directory.relist(pods, std::time::Instant::now());
    let mut keep = |nn| Arc::new(keep_node_network(nn, &mut names, &mut labels));
    let mut all: Vec<Arc<CompactNodeNetwork>> = (0..nodes)
        .map(|n| keep(node_network(n, PER_NODE)))
        .collect();
    let mut store: Stored = BTreeMap::new();
    let mut version = 0u64;
    let mut write = |book: &mut Book, store: &mut Stored, changed: Vec<_>| {
        for (index, spec) in changed {
            version += 1;
            let mut slice = WorkloadSlice::new(&format!("pods.{index}"), spec);
            slice.metadata.resource_version = Some(version.to_string());
            store.insert(index, Arc::new(slice));
            book.written(index, Some(version.to_string()));
        }
    };
    let (mut read, mut change) = (Vec::new(), Vec::new());
    for round in 0..5 {
        // Every node read: a book of its own, from the store as the last round left it.
        let mut book = Book::default();
        let t = Instant::now();
        let changed = book.update("pods", &all, &directory, &store, 0);
        read.push(t.elapsed());
        write(&mut book, &mut store, changed);
        // One pod more, or one fewer, on one node, taken in by the book.
        let n = (round * 7) % nodes;
        all[n] = keep(node_network(n, PER_NODE + 1 - 2 * (round % 2)));
        let t = Instant::now();
        let changed = book.update("pods", &all, &directory, &store, 0);
        change.push(t.elapsed());
        anyhow::ensure!(changed.len() == 1, "one slice changes: {}", changed.len());
        write(&mut book, &mut store, changed);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "{nodes} nodes x {PER_NODE} pods ({} workloads, {} slices): every node read {:.1?}, one node's change {:.2?} (medians of 5)",
        nodes * PER_NODE,
        store.len(),
        median(&mut read),
        median(&mut change),
    );
    Ok(())
}

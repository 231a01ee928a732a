//! Controller scale benchmark: N Networks, N SegmentationPolicies and K nodes held in the
//! controller's reflector stores (fed with watch events, as from an API server), then one full
//! decide pass — validation of every Network against the others, block allocation for every
//! node, each policy's status from the nodes' reports — and the process's peak RSS.
//!
//! With `--steady`, the NodeNetwork store then gets every node's spec as written (as the
//! API server's watch would echo it) and a second decide pass runs from it: the steady state
//! of a controller, which also holds every block in its NodeNetwork store. Then what one event
//! costs: one that changes no input of the allocation (an agent's status report: the
//! fingerprint alone), one Network added and one node added (a pass each, and the NodeNetwork
//! specs it writes). The NodeNetwork watch's memory of what each NodeNetwork named (which
//! Networks its events wake) is kept as the controller keeps it. With `--realized` as well,
//! every node's agent also reports every Network with a block on it realized
//! (`status.networks`), as agents do once they have caught up.
//!
//!   cargo run --release -p weft-operator --example controller_scale -- [NETWORKS] [NODES] [--steady [--realized]]
//!
//! Figures: docs/benchmarks.md.

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector;
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use weft_crds::{
    Cidr, Network, NetworkSpec, NodeNetwork, NodeNetworkSpec, NodeNetworkStatus, NodePolicy,
    SegmentationPolicy,
};
use weft_operator::controller::allocator::NodeInfo;
use weft_operator::controller::compact::{CompactNodeNetwork, Names, keep_node_network};
use weft_operator::controller::network::{Observed, ObservedSpec, allocation_inputs, desired};
use weft_operator::controller::networks_touched;
use weft_operator::controller::policy::enforcement;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let count = args.first().copied().unwrap_or(10_000);
    let node_count = args.get(1).copied().unwrap_or(100);
    let before = rss_kib("VmRSS:");

    let (networks, mut nw) = reflector::store::<Network>();
    let (policies, mut pw) = reflector::store::<SegmentationPolicy>();
    let (node_networks, mut nnw) = reflector::store::<CompactNodeNetwork>();
    // The Network names the controller's NodeNetwork watch shares between nodes.
    let mut names = Names::default();
    let (nodes, mut ndw) = reflector::store::<Node>();
    let t = Instant::now();
    for i in 0..count {
        // One IPv6 /64 each (10k IPv4 subnets of a useful size do not fit in 10/8).
        let mut n = Network::new(
            &format!("net-{i}"),
            NetworkSpec {
                subnets: vec![Cidr::from(
                    format!("fd00:{:x}:{:x}::/64", i / 65536, i % 65536).as_str(),
                )],
                ..NetworkSpec::default()
            },
        );
        n.metadata.uid = Some(format!("uid-{i}"));
        nw.apply_watcher_event(&watcher::Event::Apply(n));
        let p: SegmentationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "SegmentationPolicy",
            "metadata": {"name": format!("p-{i}"), "namespace": format!("ns-{}", i % 100)},
            "spec": {"subject": {"podSelector": {"matchLabels": {"app": format!("a{}", i % 50)}}},
                     "ingress": [{"name": "web", "action": "Allow",
                                  "from": [{"pods": {"podSelector": {"matchLabels": {"app": "web"}}}}]}]}
        }))?;
        pw.apply_watcher_event(&watcher::Event::Apply(p));
    }
    for k in 0..node_count {
        let mut node = Node::default();
        node.metadata.name = Some(format!("node-{k}"));
        node.metadata.uid = Some(format!("node-uid-{k}"));
        ndw.apply_watcher_event(&watcher::Event::Apply(node));
        let mut nn = NodeNetwork::new(&format!("node-{k}"), NodeNetworkSpec::default());
        // Every node reports the policies of its namespaces' workloads.
        nn.status = Some(NodeNetworkStatus {
            policies: (0..count)
                .filter(|i| i % node_count == k)
                .map(|i| NodePolicy {
                    policy: format!("SegmentationPolicy ns-{}/p-{i}", i % 100),
                    interfaces: 3,
                    error: None,
                })
                .collect(),
            ..NodeNetworkStatus::default()
        });
        nnw.apply_watcher_event(&watcher::Event::Apply(keep_node_network(
            nn,
            &mut names,
            &mut Default::default(),
        )));
    }
    let fill = t.elapsed();

    let t = Instant::now();
    let observed = Observed {
        networks: networks.state(),
        nodes: nodes
            .state()
            .iter()
            .map(|n| {
                (
                    NodeInfo::new(n.metadata.name.as_deref().unwrap_or_default(), &[]),
                    n.metadata.uid.clone(),
                )
            })
            .collect(),
        node_networks: BTreeMap::new(),
        specs: BTreeMap::new(),
        accepted: BTreeMap::new(),
    };
    let decision = desired(&observed);
    let decide = t.elapsed();
    let blocks = decision.allocation.entries();

    let t = Instant::now();
    let reports = node_networks.state();
    let mut enforced = 0i64;
    for p in policies.state() {
        let key = format!(
            "SegmentationPolicy {}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default()
        );
        enforced += i64::from(enforcement(&key, &reports).workloads);
    }
    let statuses = t.elapsed();

    println!("networks {count}, segmentation policies {count}, nodes {node_count}");
    println!("  fill the stores          {fill:?}");
    println!(
        "  validate + allocate      {decide:?} ({blocks} blocks, {} rejected)",
        decision.verdicts.values().filter(|v| v.is_some()).count()
    );
    println!("  every policy's status    {statuses:?} ({enforced} interfaces)");
    println!(
        "  RSS {} MiB (peak {} MiB; {} MiB before the stores)",
        rss_kib("VmRSS:") / 1024,
        rss_kib("VmHWM:") / 1024,
        before / 1024
    );

    if std::env::args().any(|a| a == "--steady") {
        let realized = std::env::args().any(|a| a == "--realized");
        let mut named = std::collections::HashMap::new();
        let mut woken = 0;
        let t = Instant::now();
        for nn in node_networks.state() {
            let name = nn.metadata.name.clone().unwrap_or_default();
            let mut written =
                NodeNetwork::new(&name, decision.allocation.spec(&name).unwrap_or_default());
            written.metadata = nn.metadata.clone();
            written.status = nn.status.clone();
            if realized && let Some(status) = written.status.as_mut() {
                status.networks = written
                    .spec
                    .blocks
                    .iter()
                    .map(|b| b.network.clone())
                    .collect();
            }
            // As the controller's watch reads and keeps it.
            let echoed: NodeNetwork = serde_json::from_slice(&serde_json::to_vec(&written)?)?;
            drop(written);
            let kept = keep_node_network(echoed, &mut names, &mut Default::default());
            woken += networks_touched(&mut named, &kept, false).len();
            nnw.apply_watcher_event(&watcher::Event::Apply(kept));
        }
        drop(decision);
        let echo = t.elapsed();
        let t = Instant::now();
        let stored: BTreeMap<String, Arc<CompactNodeNetwork>> = node_networks
            .state()
            .into_iter()
            .map(|nn| (nn.metadata.name.clone().unwrap_or_default(), nn))
            .collect();
        let observed = Observed {
            specs: stored
                .iter()
                .map(|(k, v)| (k.clone(), ObservedSpec::Stored(v.clone())))
                .collect(),
            node_networks: stored,
            ..observed
        };
        let again = desired(&observed);
        println!(
            "  steady state: specs in the store {echo:?} ({woken} Network wake-ups), validate + allocate again {:?} ({} specs to write)",
            t.elapsed(),
            again.changed.len()
        );
        println!(
            "  RSS {} MiB (peak {} MiB)",
            rss_kib("VmRSS:") / 1024,
            rss_kib("VmHWM:") / 1024
        );

        // What one event costs now. An agent's status report or a Node heartbeat changes no
        // input of the allocation: the reconcile computes the fingerprint and reuses the last
        // decision.
        let t = Instant::now();
        let key = allocation_inputs(&observed);
        println!(
            "  an event that changes no input (status report): fingerprint {:?} (key {key:x}), no allocation",
            t.elapsed()
        );
        // One Network added: one pass; the writes are the specs that differ.
        let mut added = observed.clone();
        let mut n = Network::new(
            "net-added",
            NetworkSpec {
                subnets: vec![Cidr::from("fd01:ffff::/64")],
                ..NetworkSpec::default()
            },
        );
        n.metadata.uid = Some("uid-added".into());
        added.networks.push(Arc::new(n));
        let t = Instant::now();
        let d = desired(&added);
        println!(
            "  one Network added: validate + allocate {:?}, {} NodeNetwork specs to write",
            t.elapsed(),
            d.changed.len()
        );
        drop(d);
        drop(added);
        // One node added.
        let mut added = observed;
        added.nodes.push((
            NodeInfo::new("node-added", &[]),
            Some("node-uid-added".into()),
        ));
        let t = Instant::now();
        let d = desired(&added);
        println!(
            "  one node added: validate + allocate {:?}, {} NodeNetwork specs to write",
            t.elapsed(),
            d.changed.len()
        );
    }
    Ok(())
}

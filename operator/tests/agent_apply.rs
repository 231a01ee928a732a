//! The agent's plan applied to a real kernel, in a network namespace of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use weft_dataplane::names;
use weft_dataplane::netlink::{Netlink, VethSpec};
use weft_dataplane::netns::{self, Netns};
use weft_dataplane::nft::NftCli;
use weft_dataplane::plan::{ProcSysctls, cleanup};
use weft_dataplane::proto::Endpoint;
use weft_operator::agent::endpoints::EndpointStore;
use weft_operator::agent::install::CniInstall;
use weft_operator::agent::plan::NodeContext;
use weft_operator::agent::{
    AgentConfig, apply_blocking, bridge_netfilter_problem, check_blocking, compute, realized_blocks,
};
use weft_operator::model::{NodeBlocks, Resources, parse_manifests};

fn isolate() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN) for a network namespace; run the tests as root"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
}

fn config(state: &std::path::Path) -> AgentConfig {
    AgentConfig {
        node: NodeContext {
            name: "node-a".into(),
            labels: BTreeMap::new(),
            syn_proxy: false,
            own_tcp_ports: Vec::new(),
        },
        nodes: vec!["node-a".into()],
        state_dir: state.to_path_buf(),
        socket: state.join("agent.sock"),
        cni: CniInstall {
            bin_dir: state.join("bin"),
            conf_dir: state.join("net.d"),
            binary: state.join("weft"),
            state_dir: state.to_path_buf(),
            socket: state.join("agent.sock"),
        },
        default_network: None,
        agent_ports: Vec::new(),
        cleanup_config_on_exit: false,
        resync: std::time::Duration::from_secs(30),
        poll: std::time::Duration::from_millis(500),
        audit_log: None,
        workload_metrics: false,
        mirror_collectors: Vec::new(),
        anomaly_thresholds: Default::default(),
    }
}

const TWO: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: alpha}
spec: {mode: NAT, subnets: [10.61.0.0/16, "fd61::/64"]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: beta}
spec: {mode: NAT, subnets: [10.62.0.0/16]}
"#;

fn resources(text: &str) -> Resources {
    let mut r = Resources::default();
    parse_manifests(text, "test", &mut r);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    r
}

fn nft_list() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "weft"])
        .output()
        .expect("nft (install nftables)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// br_netfilter's calls (traffic between two ports of a bridge meets the policies only
/// through them): weft's bridges have their own on, whatever the node's switches say, which
/// weft leaves alone; a bridge whose calls someone turned off gets them back at the next full
/// apply. With the module loaded, the agent's check finds nothing wrong.
#[test]
fn weft_bridges_have_br_netfilter_calls_on_whatever_the_node_s_switches_say() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    const V6: &str = "net.bridge.bridge-nf-call-ip6tables";
    weft_dataplane::sysctl::set(V6, "0").unwrap();
    let plan = compute(
        &cfg,
        &resources(TWO),
        &EndpointStore::default(),
        &BTreeMap::new(),
    )
    .plan;
    apply_blocking(&plan, None, state.path()).unwrap();
    let calls = |name: &str| {
        Netlink::new()
            .unwrap()
            .link_by_name(name)
            .unwrap()
            .unwrap()
            .netfilter_calls
    };
    assert_eq!(calls("wn-alpha"), Some(true));
    assert_eq!(calls("wn-beta"), Some(true));
    assert_eq!(
        weft_dataplane::sysctl::get(V6).unwrap().trim(),
        "0",
        "the node's switch is not weft's"
    );
    assert_eq!(bridge_netfilter_problem(), None);
    let off = Command::new("ip")
        .args([
            "link",
            "set",
            "wn-alpha",
            "type",
            "bridge",
            "nf_call_ip6tables",
            "0",
        ])
        .status()
        .unwrap();
    assert!(off.success());
    assert_eq!(calls("wn-alpha"), Some(false));
    let report = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("bridge wn-alpha no_linklocal_learn 1 nf_call_iptables 1")),
        "{:?}",
        report.changes
    );
    assert_eq!(calls("wn-alpha"), Some(true));
    cleanup(
        &mut Netlink::new().unwrap(),
        &mut NftCli::default(),
        &mut ProcSysctls,
        state.path(),
    )
    .unwrap();
}

#[test]
fn apply_is_idempotent_and_removing_a_network_removes_what_it_created() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let eps = EndpointStore::default();

    let plan = compute(&cfg, &resources(TWO), &eps, &BTreeMap::new()).plan;
    let first = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(
        first
            .changes
            .iter()
            .any(|c| c.contains("created bridge wn-alpha"))
    );
    let mut nl = Netlink::new().unwrap();
    let alpha = nl
        .link_by_name("wn-alpha")
        .unwrap()
        .expect("bridge wn-alpha");
    assert!(alpha.up);
    let addrs: Vec<String> = nl
        .addresses(Some(alpha.index))
        .unwrap()
        .iter()
        .map(|a| a.addr.to_string())
        .collect();
    assert!(addrs.contains(&"10.61.0.1/16".to_string()), "{addrs:?}");
    assert!(addrs.contains(&"fd61::1/64".to_string()), "{addrs:?}");
    assert_eq!(
        weft_dataplane::sysctl::get("net.ipv4.ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    let ruleset = nft_list();
    assert!(ruleset.contains("masquerade"), "{ruleset}");
    assert!(state.path().join("networks/alpha.json").exists());

    // Second apply of the same plan: nothing changes, no link churn, same ruleset.
    let second = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(second.is_noop(), "{:?}", second.changes);
    assert_eq!(nft_list(), ruleset);
    assert_eq!(
        nl.link_by_name("wn-alpha").unwrap().unwrap().index,
        alpha.index
    );

    // A bridge deleted by hand is restored; a table deleted by hand too.
    nl.delete_link(alpha.index).unwrap();
    assert!(
        Command::new("nft")
            .args(["delete", "table", "inet", "weft"])
            .status()
            .unwrap()
            .success()
    );
    let repair = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(
        repair
            .changes
            .iter()
            .any(|c| c.contains("created bridge wn-alpha")),
        "{:?}",
        repair.changes
    );
    assert_eq!(nft_list(), ruleset);

    // The periodic check (most resyncs) does the same from the plan applied last: a quiet node
    // needs nothing; a bridge and a table deleted by hand are restored.
    let quiet = check_blocking(&plan, Some(&plan), state.path()).unwrap();
    assert!(quiet.is_noop(), "{:?}", quiet.changes);
    let alpha = nl.link_by_name("wn-alpha").unwrap().unwrap();
    nl.delete_link(alpha.index).unwrap();
    assert!(
        Command::new("nft")
            .args(["delete", "table", "inet", "weft"])
            .status()
            .unwrap()
            .success()
    );
    let repair = check_blocking(&plan, Some(&plan), state.path()).unwrap();
    assert!(
        repair
            .changes
            .iter()
            .any(|c| c.contains("created bridge wn-alpha")),
        "{:?}",
        repair.changes
    );
    assert_eq!(nft_list(), ruleset);

    // Removing beta: its bridge, set elements and runtime state go; rules stay the same.
    let only_alpha = compute(
        &cfg,
        &resources(&TWO[..TWO.find("---").unwrap()]),
        &eps,
        &BTreeMap::new(),
    )
    .plan;
    let report = apply_blocking(&only_alpha, None, state.path()).unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("deleted bridge wn-beta")),
        "{:?}",
        report.changes
    );
    assert!(nl.link_by_name("wn-beta").unwrap().is_none());
    assert!(!state.path().join("networks/beta.json").exists());
    let after = nft_list();
    assert!(!after.contains("10.62.0.0/16"), "{after}");
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.contains("masquerade") || l.contains("dnat") || l.contains("drop"))
            .count()
    };
    assert_eq!(rules(&after), rules(&ruleset));

    // Cleanup removes everything weft created, and is idempotent.
    let mut fw = NftCli::default();
    let gone = cleanup(&mut nl, &mut fw, &mut ProcSysctls, state.path()).unwrap();
    assert!(!gone.is_noop());
    assert!(nl.link_by_name("wn-alpha").unwrap().is_none());
    assert!(nft_list().is_empty());
    assert!(
        cleanup(&mut nl, &mut fw, &mut ProcSysctls, state.path())
            .unwrap()
            .is_noop()
    );
    let _ = ProcSysctls;
}

#[test]
fn a_foreign_link_with_weft_s_bridge_name_is_never_touched() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let mut nl = Netlink::new().unwrap();
    let foreign = nl.create_bridge("wn-alpha", None, None, None).unwrap();
    let plan = compute(
        &cfg,
        &resources(TWO),
        &EndpointStore::default(),
        &BTreeMap::new(),
    )
    .plan;
    // That Network fails, named with the link; the other is applied.
    let report = apply_blocking(&plan, None, state.path()).unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, "alpha");
    assert!(
        report.failed[0].1.contains("not created by weft"),
        "{report:?}"
    );
    assert_eq!(nl.link_by_name("wn-alpha").unwrap().unwrap().index, foreign);
    assert!(nl.link_by_name("wn-beta").unwrap().is_some(), "{report:?}");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Workloads on the test's node, each in a named network namespace of its own
/// (`wl-reattach-<pid>-<n>-<i>`: tests run in parallel). Dropping them deletes the
/// namespaces, also when the test fails, and with them their veth pairs.
struct Workloads {
    id: String,
    made: Vec<(String, Netns, Endpoint)>,
}

impl Drop for Workloads {
    fn drop(&mut self) {
        for (name, _, _) in &self.made {
            if let Err(e) = netns::delete_named(name) {
                eprintln!("cannot delete test netns {name}: {e}");
            }
        }
    }
}

impl Workloads {
    fn new() -> Self {
        Workloads {
            id: format!(
                "{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ),
            made: Vec::new(),
        }
    }

    /// Endpoint `i` of network `alpha` (address 10.61.0.1<i>), as the CNI registers it.
    fn endpoint(&self, i: u8) -> Endpoint {
        let container_id = format!("reattach-{}-{i}", self.id);
        Endpoint {
            network: "alpha".into(),
            host_ifname: names::host_veth_name(&container_id, "eth0"),
            container_id,
            ifname: "eth0".into(),
            mac: format!("0a:58:0a:3d:00:1{i}"),
            ips: vec![format!("10.61.0.1{i}").parse().unwrap()],
            pod_namespace: Some("default".into()),
            pod_name: Some(format!("w{i}")),
            netns: None,
            vm: None,
            pending: false,
            vlan_trunk: Vec::new(),
            port_mappings: Vec::new(),
            bandwidth: None,
        }
    }

    /// Starts the workload of `ep` on `bridge` (of the test's node, the calling thread's
    /// namespace) as the CNI does: the host end named and aliased by weft, on the bridge in
    /// hairpin mode; `eth0` inside with the endpoint's MAC and address, up.
    fn start(&mut self, ep: &Endpoint, bridge: &str) {
        let name = format!("wl-reattach-{}-{}", self.id, self.made.len());
        let ns = netns::create_named(&name).expect("create a workload netns");
        self.made.push((name, ns, ep.clone()));
        let ns = &self.made.last().unwrap().1;
        let mut nl = Netlink::new().unwrap();
        let bridge = nl.link_by_name(bridge).unwrap().expect("the bridge").index;
        let alias = names::host_veth_alias(&ep.network, &ep.container_id, &ep.ifname);
        let host = nl
            .create_veth_into_netns(&VethSpec {
                host_name: &ep.host_ifname,
                host_alias: Some(&alias),
                host_master: Some(bridge),
                peer_name: &ep.ifname,
                peer_netns: ns.fd(),
                peer_mac: names::parse_mac(&ep.mac),
                mtu: None,
            })
            .unwrap();
        nl.set_port_hairpin(host, true).unwrap();
        let mut inner = Netlink::in_netns(ns).unwrap();
        let eth = inner.link_by_name(&ep.ifname).unwrap().unwrap().index;
        let addr = format!("{}/16", ep.ips[0]).parse().unwrap();
        inner.add_address(eth, addr, true).unwrap();
        inner.set_up(eth).unwrap();
    }

    /// Does workload `from` get an answer from workload `to` (real ICMP echo), trying for up
    /// to `within`?
    fn pings(&self, from: usize, to: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.made[from].0])
                .args(["ping", "-c", "1", "-W", "1"])
                .arg(self.made[to].2.ips[0].to_string())
                .output()
                .expect("ip and ping (install iproute2 and iputils-ping)");
            if out.status.success() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both workloads answer each other.
    fn talk(&self) -> bool {
        self.pings(0, 1, Duration::from_secs(3)) && self.pings(1, 0, Duration::from_secs(3))
    }
}

/// The link `name` of the test's node.
fn link(nl: &mut Netlink, name: &str) -> weft_dataplane::netlink::LinkInfo {
    nl.link_by_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("link {name}"))
}

fn nft_bridge_list() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "bridge", "weft"])
        .output()
        .expect("nft (install nftables)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn alpha() -> Resources {
    resources(&TWO[..TWO.find("---").unwrap()])
}

#[test]
fn workload_ports_go_back_on_a_bridge_deleted_by_hand_and_packets_flow_again() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let mut wl = Workloads::new();
    let mut eps = EndpointStore::default();
    let (a, b) = (wl.endpoint(0), wl.endpoint(1));
    eps.register(a.clone());
    eps.register(b.clone());
    let plan = compute(&cfg, &alpha(), &eps, &BTreeMap::new()).plan;
    apply_blocking(&plan, None, state.path()).unwrap();
    wl.start(&a, "wn-alpha");
    wl.start(&b, "wn-alpha");
    assert!(wl.talk(), "the workloads answer each other before");

    // The bridge is deleted by hand: the kernel releases its ports, and they stay released.
    let mut nl = Netlink::new().unwrap();
    let old = link(&mut nl, "wn-alpha").index;
    nl.delete_link(old).unwrap();
    for ep in [&a, &b] {
        assert_eq!(link(&mut nl, &ep.host_ifname).master, None);
    }
    assert!(!wl.pings(0, 1, Duration::from_millis(500)), "cut off");

    // The periodic resync (most of them: the check that trusts the tables' elements) makes
    // the bridge again and puts the ports back on it, in hairpin mode, with their guard.
    let repair = check_blocking(&plan, Some(&plan), state.path()).unwrap();
    let bridge = link(&mut nl, "wn-alpha");
    assert_ne!(bridge.index, old);
    for want in ["created bridge wn-alpha".to_string()]
        .into_iter()
        .chain([&a, &b].iter().flat_map(|ep| {
            [
                format!("port {} attached to bridge wn-alpha", ep.host_ifname),
                format!("port {} hairpin on", ep.host_ifname),
            ]
        }))
    {
        assert!(
            repair.changes.contains(&want),
            "{want}: {:?}",
            repair.changes
        );
    }
    let guard = nft_bridge_list();
    for ep in [&a, &b] {
        let port = link(&mut nl, &ep.host_ifname);
        assert_eq!(port.master, Some(bridge.index), "{}", ep.host_ifname);
        assert_eq!(port.hairpin, Some(true), "{}", ep.host_ifname);
        assert!(port.up, "{}", ep.host_ifname);
        assert!(
            guard.contains(&format!("\"{}\" . {}", ep.host_ifname, ep.mac)),
            "the guard admits {} again: {guard}",
            ep.host_ifname
        );
    }
    assert!(wl.talk(), "the workloads answer each other again");

    // Idempotent: the next resync, and a full apply, change nothing.
    let quiet = check_blocking(&plan, Some(&plan), state.path()).unwrap();
    assert!(quiet.is_noop(), "{:?}", quiet.changes);
    let full = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(full.is_noop(), "{:?}", full.changes);

    // The every-tenth resync (a full apply) repairs the same.
    nl.delete_link(bridge.index).unwrap();
    let repair = apply_blocking(&plan, None, state.path()).unwrap();
    assert!(
        repair.changes.contains(&format!(
            "port {} attached to bridge wn-alpha",
            a.host_ifname
        )),
        "{:?}",
        repair.changes
    );
    assert!(
        wl.talk(),
        "the workloads answer each other after the full apply"
    );
    drop(wl);
    cleanup(
        &mut nl,
        &mut NftCli::default(),
        &mut ProcSysctls,
        state.path(),
    )
    .unwrap();
}

#[test]
fn a_node_network_missing_for_a_moment_leaves_live_workloads_alone() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let mut wl = Workloads::new();
    let mut eps = EndpointStore::default();
    let (a, b) = (wl.endpoint(0), wl.endpoint(1));
    eps.register(a.clone());
    eps.register(b.clone());
    // Cluster mode: the Node's labels, and the block of the node's NodeNetwork.
    let with_node_network = |blocks: &[(&str, &str)]| {
        let mut res = alpha();
        res.node_labels = Some(BTreeMap::new());
        res.node_blocks = Some(
            blocks
                .iter()
                .map(|(n, b)| {
                    (
                        n.to_string(),
                        NodeBlocks {
                            v4: b.parse().ok(),
                            v6: None,
                        },
                    )
                })
                .collect(),
        );
        res
    };
    let present = with_node_network(&[("alpha", "10.61.0.0/24")]);
    let first = compute(&cfg, &present, &eps, &BTreeMap::new());
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    apply_blocking(&first.plan, None, state.path()).unwrap();
    wl.start(&a, "wn-alpha");
    wl.start(&b, "wn-alpha");
    assert!(wl.talk(), "the workloads answer each other before");
    let mut nl = Netlink::new().unwrap();
    let bridge = link(&mut nl, "wn-alpha").index;

    // The NodeNetwork is deleted (by hand, or with its Node while the Node is re-created):
    // the Network still exists and selects the node, so it keeps its block and bridge.
    let mut missing = with_node_network(&[]);
    missing.node_network_missing = true;
    let realized = realized_blocks(state.path());
    let held = compute(&cfg, &missing, &eps, &realized);
    assert_eq!(held.plan.bridges, first.plan.bridges, "the Network stays");
    assert_eq!(
        held.plan, first.plan,
        "the same plan as with the NodeNetwork"
    );
    assert!(
        held.problems.iter().any(|p| p
            .to_string()
            .starts_with("NodeNetwork node-a: not in the Kubernetes API; networks alpha keep")),
        "{:?}",
        held.problems
    );
    let report = apply_blocking(&held.plan, None, state.path()).unwrap();
    assert!(report.is_noop(), "nothing torn down: {:?}", report.changes);
    assert_eq!(link(&mut nl, "wn-alpha").index, bridge);
    assert!(
        wl.talk(),
        "the workloads answer each other while it is missing"
    );

    // The controller writes it again: nothing to do.
    let back = compute(&cfg, &present, &eps, &BTreeMap::new());
    let report = apply_blocking(&back.plan, None, state.path()).unwrap();
    assert!(report.is_noop(), "{:?}", report.changes);

    // The Network deleted meanwhile: it goes, NodeNetwork or not.
    let mut deleted = missing.clone();
    deleted.networks.clear();
    let gone = compute(&cfg, &deleted, &eps, &realized_blocks(state.path()));
    assert!(gone.plan.bridges.is_empty());
    let report = apply_blocking(&gone.plan, None, state.path()).unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("deleted bridge wn-alpha")),
        "{:?}",
        report.changes
    );
    drop(wl);
    cleanup(
        &mut nl,
        &mut NftCli::default(),
        &mut ProcSysctls,
        state.path(),
    )
    .unwrap();
}

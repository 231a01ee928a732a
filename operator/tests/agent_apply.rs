//! The agent's plan applied to a real kernel, in a network namespace of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::nft::NftCli;
use weft_dataplane::plan::{ProcSysctls, cleanup};
use weft_operator::agent::endpoints::EndpointStore;
use weft_operator::agent::install::CniInstall;
use weft_operator::agent::plan::NodeContext;
use weft_operator::agent::source::{Resources, parse_manifests};
use weft_operator::agent::{AgentConfig, apply_blocking, check_blocking, compute};

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

#[test]
fn apply_is_idempotent_and_removing_a_network_removes_what_it_created() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let eps = EndpointStore::default();

    let plan = compute(&cfg, &resources(TWO), &eps).plan;
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
    let only_alpha = compute(&cfg, &resources(&TWO[..TWO.find("---").unwrap()]), &eps).plan;
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
    let gone = cleanup(&mut nl, &mut fw, state.path()).unwrap();
    assert!(!gone.is_noop());
    assert!(nl.link_by_name("wn-alpha").unwrap().is_none());
    assert!(nft_list().is_empty());
    assert!(cleanup(&mut nl, &mut fw, state.path()).unwrap().is_noop());
    let _ = ProcSysctls;
}

#[test]
fn a_foreign_link_with_weft_s_bridge_name_is_never_touched() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    let mut nl = Netlink::new().unwrap();
    let foreign = nl.create_bridge("wn-alpha", None, None, None).unwrap();
    let plan = compute(&cfg, &resources(TWO), &EndpointStore::default()).plan;
    let err = apply_blocking(&plan, None, state.path()).unwrap_err();
    assert!(err.to_string().contains("not created by weft"), "{err}");
    assert_eq!(nl.link_by_name("wn-alpha").unwrap().unwrap().index, foreign);
}

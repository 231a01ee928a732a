//! What the whole-agent tests share: a network namespace of the test's own and the agent's
//! configuration under a temporary state directory.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use weft_operator::agent::AgentConfig;
use weft_operator::agent::install::CniInstall;
use weft_operator::agent::plan::NodeContext;

/// Moves the test's thread into a network namespace of its own, with `lo` up.
pub fn isolate() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN) for a network namespace; run the tests as root"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (install iproute2)");
    assert!(up.success(), "cannot bring lo up in the test's namespace");
}

/// The agent's configuration for node `node-a`, everything under `state`.
pub fn config(state: &std::path::Path) -> AgentConfig {
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
        resync: Duration::from_secs(30),
        poll: Duration::from_millis(100),
        audit_log: Some(state.join("audit.log")),
        workload_metrics: false,
        mirror_collectors: Vec::new(),
        anomaly_thresholds: Default::default(),
    }
}

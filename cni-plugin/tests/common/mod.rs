//! The harness of the `weft` binary tests: a node namespace per test thread with a bridge, the
//! runtime state the agent would write, a stand-in agent on a socket, and unique named workload
//! namespaces removed by a guard even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use weft_dataplane::names;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns;
use weft_dataplane::state::{NetworkMode, NetworkState, NodeState};

pub static COUNTER: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// The node's locations for the `weft` runs of this test thread: what a runtime's
    /// environment gives the plugin (`WEFT_STATE_DIR`, `WEFT_AGENT_SOCKET`, `WEFT_LOG_FILE`);
    /// the network configuration no longer may.
    static NODE_ENV: std::cell::RefCell<Vec<(String, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's node location variables, to hand to threads it spawns ([`adopt_node_env`]).
pub fn node_env() -> Vec<(String, String)> {
    NODE_ENV.with(|e| e.borrow().clone())
}

/// Takes over the node location variables of the thread that spawned this one.
pub fn adopt_node_env(vars: Vec<(String, String)>) {
    NODE_ENV.with(|e| *e.borrow_mut() = vars);
}

/// Sets a node location variable for this thread's `weft` runs (`WEFT_STATE_DIR`, …).
pub fn set_node_env(key: &str, value: &Path) {
    NODE_ENV.with(|e| {
        let mut e = e.borrow_mut();
        e.retain(|(k, _)| k != key);
        e.push((key.to_string(), value.display().to_string()));
    });
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN) to create network namespaces; run the tests as root"
    );
}

/// A node namespace for this test thread, a state dir, a bridge and a stand-in agent.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub namespaces: Vec<String>,
    pub agent: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = netns::delete_named(ns);
        }
    }
}

pub enum Agent {
    /// Answers every request with ok.
    Answers,
    /// Reads requests and never answers.
    Silent,
    /// Answers identity questions "not in my cache yet" (a pod the agent has not seen), the
    /// rest with ok.
    UnknownPods,
    /// Refuses registrations (as the agent refuses a host port another workload holds), the
    /// rest with ok.
    Refuses,
    /// Attaches as the agent does (an `Attach` answered twice): the interface `CNI_IFNAME` on
    /// the configuration's Network with address 10.77.0.9, or, for a container id that starts
    /// with `on-other`, on Network `other` with 10.78.0.9 (as when the pod's annotation picks
    /// it); the MAC derived from the address. Refuses (code 11) container id `refused`.
    /// Declines detaching, as [`Agent::Answers`].
    Attaches,
    /// No socket at all.
    None,
}

impl Node {
    pub fn new(agent: Agent) -> Node {
        Self::with_block(agent, "10.77.0.0/24", tempfile::tempdir().unwrap())
    }

    /// A node whose IPv4 block of the network is `block` (inside 10.77.0.0/16), with its state
    /// in `dir`.
    pub fn with_block(agent: Agent, block: &str, dir: tempfile::TempDir) -> Node {
        require_root();
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let mut nl = Netlink::new().unwrap();
        if let Some(lo) = nl.link_by_name("lo").unwrap() {
            nl.set_up(lo.index).unwrap();
        }
        let br = nl
            .create_bridge("wn-test", Some(1500), None, Some("weft:net:test"))
            .unwrap();
        nl.set_up(br).unwrap();
        nl.add_address(br, "10.77.0.1/16".parse().unwrap(), true)
            .unwrap();
        nl.add_address(br, "fd77::1/64".parse().unwrap(), true)
            .unwrap();
        NetworkState {
            name: "test".into(),
            mode: NetworkMode::Nat,
            bridge: "wn-test".into(),
            mtu: 1400,
            subnet_v4: Some("10.77.0.0/16".parse().unwrap()),
            subnet_v6: Some("fd77::/64".parse().unwrap()),
            gateway_v4: Some("10.77.0.1".parse().unwrap()),
            gateway_v6: Some("fd77::1".parse().unwrap()),
            block_v4: Some(block.parse().unwrap()),
            block_v6: Some("fd77::/112".parse().unwrap()),
            exclude: vec!["10.77.0.2/32".parse().unwrap()],
            anti_spoofing: true,
            vlan_filtering: None,
        }
        .write(dir.path())
        .unwrap();
        let socket = dir.path().join("agent.sock");
        let handle = match agent {
            Agent::None => None,
            Agent::Answers
            | Agent::Silent
            | Agent::UnknownPods
            | Agent::Refuses
            | Agent::Attaches => {
                let listener = UnixListener::bind(&socket).unwrap();
                let attaches = matches!(agent, Agent::Attaches);
                let silent = matches!(agent, Agent::Silent);
                let unknown = matches!(agent, Agent::UnknownPods);
                let refuses = matches!(agent, Agent::Refuses);
                Some(std::thread::spawn(move || {
                    for s in listener.incoming() {
                        let Ok(s) = s else { return };
                        std::thread::spawn(move || {
                            let mut line = String::new();
                            let _ = BufReader::new(&s).read_line(&mut line);
                            let identity = line.contains("\"op\":\"identity\"");
                            // Attaching takes a real agent (the IPAM store, the rules): the
                            // stand-in does not know the request, as an older agent, and the
                            // CNI allocates and registers itself. (The agent's side of it is
                            // tested in e2e, with the real agent.)
                            if line.contains("\"op\":\"attach\"") && attaches {
                                let _ = (&s).write_all(attach_answers(&line).as_bytes());
                                return;
                            }
                            if line.contains("\"op\":\"attach\"") {
                                let _ = (&s).write_all(b"{\"ok\":false,\"ready\":true,\"error\":\"bad request: unknown variant `attach`\"}\n");
                                return;
                            }
                            // Silent: the agent hangs on registrations (it still knows pods).
                            if silent && !identity {
                                std::thread::sleep(Duration::from_secs(30));
                                return;
                            }
                            // A pod named vm-launcher-<x> runs VM default/<x> (its label).
                            let reply = match line.split("\"name\":\"vm-launcher-").nth(1) {
                                _ if refuses && line.contains("\"op\":\"register\"") => "{\"ok\":false,\"ready\":true,\"error\":\"host port 8080/tcp is already used on node n\"}\n".to_string(),
                                _ if unknown && identity => "{\"ok\":false,\"ready\":true,\"error\":\"pod default/pod is not in the agent's cache yet\"}\n".to_string(),
                                // Pod two-nets asks for Networks test and other (its annotation).
                                _ if identity && line.contains("\"name\":\"two-nets\"") => "{\"ok\":true,\"ready\":true,\"networks\":\"test,other\"}\n".to_string(),
                                // Detaching takes a real agent (rules, addresses, then the
                                // link): the stand-in declines, as an older agent does, and the
                                // CNI removes the attachment itself.
                                _ if line.contains("\"op\":\"detach\"") => "{\"ok\":false,\"ready\":true,\"error\":\"the stand-in agent does not detach\"}\n".to_string(),
                                Some(rest) if identity => {
                                    let vm = rest.split('"').next().unwrap_or_default();
                                    format!(
                                        "{{\"ok\":true,\"ready\":true,\"vm\":\"default/{vm}\"}}\n"
                                    )
                                }
                                _ => "{\"ok\":true,\"ready\":true}\n".to_string(),
                            };
                            let _ = (&s).write_all(reply.as_bytes());
                        });
                    }
                }))
            }
        };
        set_node_env("WEFT_STATE_DIR", dir.path());
        set_node_env("WEFT_AGENT_SOCKET", &socket);
        if matches!(
            agent,
            Agent::Answers | Agent::UnknownPods | Agent::Refuses | Agent::Attaches
        ) {
            NodeState {
                node: "n".into(),
                agent_socket: socket,
                ready: true,
                reconciled_at: 0,
                version: "test".into(),
            }
            .write(dir.path())
            .unwrap();
        }
        Node {
            dir,
            namespaces: Vec::new(),
            agent: handle,
        }
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn workload(&mut self) -> (String, PathBuf) {
        let name = format!(
            "weft-cnitest-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        netns::create_named(&name).unwrap();
        self.namespaces.push(name.clone());
        (name.clone(), netns::named_path(&name))
    }

    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft",
            "network": "test",
            "agentTimeoutMs": 500,
        })
    }
}

/// The stand-in's answers to the attach request `line` (see [`Agent::Attaches`]).
fn attach_answers(line: &str) -> String {
    let request: Value = serde_json::from_str(line).unwrap();
    let ask = &request["ask"];
    let (cid, ifname) = (
        ask["containerId"].as_str().unwrap(),
        ask["ifname"].as_str().unwrap(),
    );
    if cid == "refused" {
        return "{\"ok\":false,\"ready\":true,\"code\":11,\"msg\":\"the stand-in refuses\",\"error\":\"container id refused\"}\n".to_string();
    }
    let (network, ip) = if cid.starts_with("on-other") {
        ("other", "10.78.0.9")
    } else {
        (ask["network"].as_str().unwrap(), "10.77.0.9")
    };
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let attached = json!({
        "network": network,
        "ifname": ifname,
        "defaultRoute": true,
        "ips": [ip],
        "mac": names::format_mac(names::workload_mac(&[ip], cid, ifname)),
        "hostIfname": names::host_veth_name(cid, ifname),
    });
    let first = json!({"ok": true, "ready": true, "attached": [attached]});
    format!("{first}\n{{\"ok\":true,\"ready\":true}}\n")
}

pub struct Out {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

/// Starts `weft` as a runtime does (configuration on stdin, closed) without waiting for it.
pub fn spawn_weft(command: &str, conf: &Value, env: &[(&str, &str)]) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .envs(NODE_ENV.with(|e| e.borrow().clone()))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // VERSION may exit before reading its input: a broken pipe is fine.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes());
    child
}

/// Runs `weft` to completion and decodes its answer.
pub fn weft(command: &str, conf: &Value, env: &[(&str, &str)]) -> Out {
    let out = spawn_weft(command, conf, env).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    Out {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

pub fn env<'a>(cid: &'a str, netns: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod",
        ),
    ]
}

pub fn host_link_exists(cid: &str, ifname: &str) -> bool {
    Netlink::new()
        .unwrap()
        .link_by_name(&names::host_veth_name(cid, ifname))
        .unwrap()
        .is_some()
}

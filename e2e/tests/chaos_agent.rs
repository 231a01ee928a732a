//! Chaos: a node's agent killed (SIGKILL) and restarted, and another node's agent replaced by a
//! binary at another path (an upgrade's shape), while TCP connections and pings run between
//! workloads of a NAT network and of a Bridge network. Established connections must not notice:
//! the kernel keeps forwarding while no agent runs, and the restarted agent takes the node over
//! without tearing anything down. Ping loss is reported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_dataplane::netns::{self, Netns};
use weft_e2e::{lab_binary, operator_binary, require_root};

const LAB: &str = r#"
lan: {gateway: 192.168.50.1/24}
nodes:
  - {name: node-a, address: 192.168.50.11/24}
  - {name: node-b, address: 192.168.50.12/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat}
    spec: {mode: NAT, subnets: [10.10.0.0/16], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [10.70.0.0/24]
      ipam: {nodeBlockPrefix: 27, exclude: [10.70.0.0/27]}
      bridge: {uplink: eth0}
workloads:
  - {name: w1, node: node-a, networks: [nat], listen: [80/tcp]}
  - {name: w2, node: node-a, networks: [nat], listen: [80/tcp]}
  - {name: l1, node: node-a, networks: [lan], listen: [80/tcp]}
  - {name: l2, node: node-b, networks: [lan], listen: [80/tcp]}
expect:
  - {from: w1, to: w2, port: 80, result: allow}
  - {from: l1, to: l2, port: 80, result: allow}
"#;

/// The addresses the lab printed under `built:`.
fn address(stdout: &str, workload: &str) -> IpAddr {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(workload))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|a| a.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no address of {workload} in\n{stdout}"))
}

fn ns(lab: &str, workload: &str) -> Netns {
    Netns::open(netns::named_path(&format!("wl-{lab}-w-{workload}"))).unwrap()
}

/// An echo server in `server`'s namespace and a client in `client`'s that exchanges a message
/// every 10 ms over one TCP connection until `stop`; returns (exchanges, errors).
fn conversation(
    lab: &str,
    client: &str,
    server: &str,
    addr: IpAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    let target = SocketAddr::new(addr, 7007);
    let listener = netns::run_in(&ns(lab, server), move || TcpListener::bind(target))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 8];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
    let stream = netns::run_in(&ns(lab, client), move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    std::thread::spawn(move || {
        let mut s = stream;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (mut ok, mut errors) = (0u64, 0u64);
        let mut buf = [0u8; 8];
        while !stop.load(Ordering::SeqCst) {
            let msg = ok.to_be_bytes();
            match s.write_all(&msg).and_then(|()| s.read_exact(&mut buf)) {
                Ok(()) if buf == msg => ok += 1,
                _ => {
                    errors += 1;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, errors)
    })
}

fn agent_pids(lab: &str) -> Vec<u32> {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new("/run/weft-lab").join(lab).join("lab.json")).unwrap(),
    )
    .unwrap();
    record["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect()
}

/// The process's arguments (empty ones kept: `--node-labels ""`).
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect()
}

fn generation(lab: &str, node: &str) -> u64 {
    std::fs::read(
        Path::new("/run/weft-lab")
            .join(lab)
            .join(node)
            .join("state/status.json"),
    )
    .ok()
    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    .and_then(|v| v["generation"].as_u64())
    .unwrap_or(0)
}

struct Restarted(Vec<Child>);

impl Drop for Restarted {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills `pid` with SIGKILL and starts `binary` with its arguments; waits until the new agent
/// has reconciled (its status generation starts again from 1).
fn restart(lab: &str, node: &str, pid: u32, binary: &Path, log_path: &Path) -> Child {
    let args = cmdline(pid);
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let log = std::fs::File::create(log_path).unwrap();
    let mut child = Command::new(binary)
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // The old agent's last status has a high generation; the new one starts from 1.
    let before = generation(lab, node);
    while Instant::now() < deadline {
        let g = generation(lab, node);
        if g != before && g >= 1 {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "the restarted agent of {node} did not reconcile; its log:\n{}",
        std::fs::read_to_string(log_path).unwrap_or_default()
    );
}

#[test]
fn agents_killed_and_replaced_under_traffic_lose_no_connection() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chaos.yaml");
    std::fs::write(&file, LAB).unwrap();
    let lab = format!("chaos{}", std::process::id() % 10000);
    let out = Command::new(lab_binary())
        .args(["--keep", "--name", &lab])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let down = || {
        let _ = Command::new(lab_binary())
            .args(["down", "--name", &lab])
            .arg(&file)
            .status();
    };
    if !out.status.success() {
        down();
        panic!(
            "lab failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result = std::panic::catch_unwind(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let nat = conversation(&lab, "w1", "w2", address(&stdout, "w2"), stop.clone());
        let bridged = conversation(&lab, "l1", "l2", address(&stdout, "l2"), stop.clone());
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("wl-{lab}-w-l1"),
                "ping",
                "-q",
                "-i",
                "0.02",
                "-w",
                "8",
            ])
            .arg(address(&stdout, "l2").to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let pids = agent_pids(&lab);
        // A copy of the binary at another path stands in for an upgraded build.
        let upgraded = dir.path().join("weft-operator-next");
        std::fs::copy(operator_binary(), &upgraded).unwrap();
        let mut children = Restarted(Vec::new());
        children.0.push(restart(
            &lab,
            "node-a",
            pids[0],
            &operator_binary(),
            &dir.path().join("a.log"),
        ));
        children.0.push(restart(
            &lab,
            "node-b",
            pids[1],
            &upgraded,
            &dir.path().join("b.log"),
        ));
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        let (nat_ok, nat_err) = nat.join().unwrap();
        let (br_ok, br_err) = bridged.join().unwrap();
        let ping = ping.wait_with_output().unwrap();
        let summary = String::from_utf8_lossy(&ping.stdout).to_string();
        let loss = summary
            .lines()
            .find(|l| l.contains("packet loss"))
            .unwrap_or("no ping summary")
            .to_string();
        println!(
            "NAT connection: {nat_ok} exchanges, {nat_err} failures; bridged connection: {br_ok} exchanges, {br_err} failures; ping l1 -> l2 across both restarts: {loss}"
        );
        assert_eq!((nat_err, br_err), (0, 0), "a connection broke");
        assert!(
            nat_ok > 50 && br_ok > 50,
            "too few exchanges: {nat_ok} {br_ok}"
        );
        drop(children);
    });
    down();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

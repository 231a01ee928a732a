//! The lab on every topology in `examples/lab/`, and on topologies written here that are not in
//! the examples. Each lab runs the real agent per node namespace and the real `weft` binary, and
//! checks its expectations with real packets; afterwards nothing of it may be left on the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use weft_e2e::{lab_binary, require_root};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn leftovers(lab_prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(lab_prefix) {
                out.push(n);
            }
        }
    }
    out
}

fn run_lab(file: &Path, name: &str) -> String {
    require_root();
    let out = Command::new(lab_binary())
        .args(["--name", name])
        .arg(file)
        .output()
        .expect("run the lab");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let left = leftovers(&format!("wl-{name}-"));
    if out.status.code() == Some(3) && stdout.contains("NOT SUPPORTED BY THIS KERNEL") {
        // Said, not passed: the lab needs a kernel feature this machine lacks.
        println!("{}: {stdout}", file.display());
        assert!(left.is_empty(), "the lab left namespaces behind: {left:?}");
        return stdout;
    }
    assert!(
        out.status.success(),
        "lab {} failed:\n{stdout}\n{stderr}",
        file.display()
    );
    assert!(left.is_empty(), "the lab left namespaces behind: {left:?}");
    assert!(
        !Path::new("/run/weft-lab").join(name).exists(),
        "the lab left its directory behind"
    );
    stdout
}

#[test]
fn every_example_lab_passes() {
    let dir = workspace().join("examples/lab");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/lab")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for (i, f) in files.iter().enumerate() {
        let out = run_lab(f, &format!("ex{i}-{}", std::process::id() % 10000));
        assert!(
            out.contains("all expectations hold") || out.contains("NOT SUPPORTED BY THIS KERNEL"),
            "{out}"
        );
    }
}

/// Runs lab `file` as `lab`, kept up, and `check` once its expectations held; then takes it
/// down, and deletes the namespaces `extra` the check made, whether or not the check passed.
fn with_kept_lab(
    lab: &str,
    file: &Path,
    extra: &[String],
    check: impl FnOnce() + std::panic::UnwindSafe,
) {
    let out = Command::new(lab_binary())
        .args(["--keep", "--name", lab])
        .arg(file)
        .output()
        .unwrap();
    let result = std::panic::catch_unwind(move || {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("all expectations hold"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        check();
    });
    for ns in extra {
        let _ = weft_dataplane::netns::delete_named(ns);
    }
    let _ = Command::new(lab_binary())
        .args(["down", "--name", lab])
        .arg(file)
        .status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn three_networks_port_ranges_allow_from_and_static_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let resources = write(
        dir.path(),
        "nets.yaml",
        r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: blue}
spec: {mode: NAT, subnets: [172.30.0.0/24], ipam: {nodeBlockPrefix: 26}, mtu: 1400}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: green}
spec: {mode: NAT, subnets: [172.31.0.0/16, "fd31::/64"]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: red}
spec: {mode: NAT, subnets: [172.29.0.0/16], nodeSelector: {matchLabels: {red: "yes"}}}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: range, namespace: team-a}
spec:
  network: blue
  target: {selector: {matchExpressions: [{key: tier, operator: In, values: [front]}]}}
  ports: [{protocol: TCP, portRange: {start: 7000, end: 7100}}, {protocol: UDP, port: 7053, targetPort: 53}]
  allowFrom: [10.99.0.0/24]
"#,
    );
    let lab = write(
        dir.path(),
        "lab.yaml",
        &format!(
            r#"
lan: {{gateway: 10.99.0.1/24, gateway6: "fd99::1/64"}}
nodes:
  - {{name: n1, address: 10.99.0.21/24, address6: "fd99::21/64", labels: {{red: "yes"}}}}
  - {{name: n2, address: 10.99.0.22/24, address6: "fd99::22/64"}}
resourceFiles: [{}]
workloads:
  - {{name: front, namespace: team-a, node: n2, labels: {{tier: front}}, networks: [blue], listen: [7050/tcp, 53/udp]}}
  - {{name: back, namespace: team-a, node: n2, networks: [blue], listen: [80/tcp], ips: [172.30.0.100]}}
  - {{name: g1, node: n1, networks: [green], listen: [80/tcp]}}
  - {{name: g2, node: n1, networks: [green], listen: [80/tcp]}}
  - {{name: r1, node: n1, networks: [red], listen: [80/tcp]}}
expect:
  - {{from: outside, to: n2, port: 7050, protocol: tcp, result: allow, answeredBy: front, sourceSeenAs: self}}
  - {{from: outside, to: n2, port: 7053, protocol: udp, result: allow, answeredBy: front}}
  - {{from: n1, to: n2, port: 7050, protocol: tcp, result: allow, answeredBy: front}}
  - {{from: outside, to: n1, port: 7050, protocol: tcp, result: deny}}
  - {{from: front, to: back, port: 80, protocol: tcp, result: allow, sourceSeenAs: self}}
  - {{from: g1, to: g2, port: 80, protocol: tcp, result: allow}}
  - {{from: g1, to: g2, port: 80, protocol: tcp, family: ipv6, result: allow, sourceSeenAs: self}}
  - {{from: g1, to: outside, port: 443, protocol: tcp, family: ipv6, result: allow, sourceSeenAs: node}}
  - {{from: r1, to: outside, port: 443, protocol: tcp, result: allow, sourceSeenAs: node}}
  - {{from: r1, to: g1, port: 80, protocol: tcp, result: deny}}
  - {{from: g1, to: r1, port: 80, protocol: tcp, result: deny}}
  - {{from: back, to: outside, port: 443, protocol: tcp, result: allow, sourceSeenAs: node}}
"#,
            resources.display()
        ),
    );
    let out = run_lab(&lab, &format!("t3n-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    // The static address was honoured, and blue's /24 was cut into /26 blocks per node.
    assert!(out.contains("172.30.0.100"), "{out}");
}

#[test]
fn a_failing_expectation_fails_the_lab_and_still_cleans_up() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "lab.yaml",
        r#"
lan: {gateway: 10.98.0.1/24}
nodes: [{name: n1, address: 10.98.0.21/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: a}, spec: {mode: NAT, subnets: [172.28.0.0/24]}}
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: b}, spec: {mode: NAT, subnets: [172.27.0.0/24]}}
workloads:
  - {name: wa, node: n1, networks: [a], listen: [80/tcp]}
  - {name: wb, node: n1, networks: [b], listen: [80/tcp]}
expect:
  - {from: wa, to: wb, port: 80, protocol: tcp, result: allow}
"#,
    );
    let name = format!("fail-{}", std::process::id() % 10000);
    let out = Command::new(lab_binary())
        .args(["--name", &name])
        .arg(&lab)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "isolated networks must not reach each other: {stdout}"
    );
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(leftovers(&format!("wl-{name}-")).is_empty());
}

#[test]
fn an_invalid_lab_file_is_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "lab.yaml",
        "lan: {gateway: 10.97.0.1/24}\nnodes: [{name: n1, address: 10.97.0.21/24}]\nworkloads: [{name: w, node: n9, networks: [x]}]\n",
    );
    let out = Command::new(lab_binary()).arg(&lab).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workloads[0].node"), "{stderr}");
}

#[test]
fn anti_spoofing_off_lets_forged_macs_and_arp_through_but_never_unknown_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "spoof-off.yaml",
        r#"
lan: {gateway: 192.168.61.1/24}
nodes: [{name: node-a, address: 192.168.61.11/24}]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: open-net}
    spec: {mode: NAT, subnets: [10.41.0.0/24], security: {antiSpoofing: false}}
workloads:
  - {name: a, node: node-a, networks: [open-net], listen: [22/tcp]}
  - {name: b, node: node-a, networks: [open-net], listen: [22/tcp]}
expect:
  - {from: b, to: a, port: 22, result: allow}
  # Without anti-spoofing a forged MAC and an ARP claim pass: the probes can see both outcomes.
  - {from: b, to: a, port: 22, spoof: {mac: "02:00:00:00:00:99"}, result: allow}
  - {from: b, to: a, port: 22, spoof: {arp: 10.41.0.99}, result: allow}
  # An address no registered workload owns is still dropped (fail closed).
  - {from: b, to: a, port: 22, spoof: {ip: 10.41.0.99}, result: deny}
"#,
    );
    let out = run_lab(&lab, &format!("spo-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    // Each spoofing line says which probe it is.
    for probe in [
        "b -> a 22/tcp v4 spoofed mac 02:00:00:00:00:99 (",
        "b -> a 22/tcp v4 spoofed arp claim 10.41.0.99 (",
        "b -> a 22/tcp v4 spoofed ip 10.41.0.99 (",
    ] {
        assert!(out.contains(probe), "no line {probe:?}:\n{out}");
    }
}

#[test]
fn dual_stack_udp_egress_tiers_and_default_deny_hold_with_real_packets() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "policy.yaml",
        r#"
lan: {gateway: 192.168.62.1/24, gateway6: "fd00:62::1/64", listen: [53/udp, 443/tcp]}
nodes: [{name: node-a, address: 192.168.62.11/24, address6: "fd00:62::11/64"}]
resources:
  - {apiVersion: v1, kind: Namespace, metadata: {name: team-a, labels: {team: a}}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: locked}
    spec: {mode: NAT, subnets: [10.42.0.0/24, "fd42::/64"], security: {defaultAction: Deny}}
  # Admin: DNS to the LAN resolver is always fine; nothing else leaves for the LAN but 443.
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: egress-guard}
    spec:
      tier: Admin
      priority: 1
      subject: {namespaces: {}}
      egress:
        - {name: dns, action: Accept, to: [{cidrs: [192.168.62.1/32, "fd00:62::1/128"]}], protocols: [{protocol: UDP, port: 53}]}
        - {name: https-pass, action: Pass, to: [{cidrs: [192.168.62.0/24, "fd00:62::/64"]}], protocols: [{protocol: TCP, port: 443}]}
        - {name: no-lan, action: Deny, to: [{cidrs: [192.168.62.0/24, "fd00:62::/64"]}]}
  # Baseline: team-a may talk among itself on 8000-8001.
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: team-a-internal}
    spec:
      tier: Baseline
      priority: 1
      subject: {namespaces: {matchLabels: {team: a}}}
      ingress:
        - {name: peers, action: Accept, from: [{namespaces: {matchLabels: {team: a}}}], protocols: [{protocol: TCP, portRange: {start: 8000, end: 8001}}]}
      egress:
        - {name: peers, action: Accept, to: [{namespaces: {matchLabels: {team: a}}}]}
        - {name: https, action: Accept, to: [{cidrs: [0.0.0.0/0, "::/0"]}], protocols: [{protocol: TCP, port: 443}]}
workloads:
  - {name: a1, namespace: team-a, node: node-a, networks: [locked], listen: [8000/tcp, 9000/tcp]}
  - {name: a2, namespace: team-a, node: node-a, networks: [locked], listen: [8001/tcp]}
  - {name: x1, node: node-a, networks: [locked], listen: [8000/tcp]}
expect:
  - {from: a1, to: outside, port: 53, protocol: udp, result: allow}
  - {from: a1, to: outside, port: 53, protocol: udp, family: ipv6, result: allow}
  - {from: x1, to: outside, port: 53, protocol: udp, result: allow}
  - {from: a1, to: outside, port: 443, result: allow}
  - {from: a1, to: outside, port: 443, family: ipv6, result: allow}
  - {from: x1, to: outside, port: 443, result: deny}
  - {from: a1, to: outside, port: 80, result: deny}
  - {from: a1, to: a2, port: 8001, result: allow}
  - {from: a2, to: a1, port: 8000, family: ipv6, result: allow}
  - {from: a2, to: a1, port: 9000, result: deny}
  - {from: x1, to: a1, port: 8000, result: deny}
  - {from: a1, to: x1, port: 8000, result: deny}
"#,
    );
    let out = run_lab(&lab, &format!("pol-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    assert!(
        out.contains("Deny by ClusterSegmentationPolicy egress-guard rule no-lan (Admin tier)"),
        "{out}"
    );
    assert!(
        out.contains("Network locked security.defaultAction is Deny"),
        "{out}"
    );
}

#[test]
fn trace_names_the_deciding_rule_and_exits_by_verdict() {
    let file = workspace().join("examples/lab/segmentation.yaml");
    let run = |args: &[&str]| {
        let out = Command::new(lab_binary())
            .args(["trace", "--file"])
            .arg(&file)
            .args(args)
            .output()
            .expect("run trace");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = run(&["--from", "ops-1", "--to", "db-1", "--port", "5432"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("Deny by ClusterSegmentationPolicy guard-db rule deny-ops"),
        "{out}"
    );
    let (code, out) = run(&[
        "--from", "outside", "--to", "node-a", "--port", "8080", "--json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ingress"]["rule"]["rule"], "http-from-lan");
    assert_eq!(v["via"], "port forward shop/web on node-a to web-1:80");
    // web-1 -> db-1 is passed by guard-db to the namespace stage, where db-1 is isolated: the
    // Pass is shown before the decision.
    let (code, out) = run(&["--from", "web-1", "--to", "db-1", "--port", "5432"]);
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let pass = lines
        .iter()
        .position(|l| {
            l.contains("ingress of shop/db-1")
                && l.contains(
                    "pass    Pass by ClusterSegmentationPolicy guard-db rule pass-prod (Admin tier)",
                )
        })
        .unwrap_or_else(|| panic!("no Pass line:\n{out}"));
    assert!(
        lines[pass + 1..]
            .iter()
            .any(|l| l.contains("ingress of shop/db-1") && l.contains("deny")),
        "{out}"
    );
    let (_, out) = run(&[
        "--from", "web-1", "--to", "db-1", "--port", "5432", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["ingress"]["passed"][0],
        "Pass by ClusterSegmentationPolicy guard-db rule pass-prod (Admin tier)"
    );
}

#[test]
fn a_dual_stack_bridge_network_with_a_port_forward_and_policy_on_one_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(dir.path(), "bridge-extra.yaml", BRIDGE_EXTRA);
    let out = run_lab(&lab, &format!("bx-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    // East-west on one bridge and a LAN host both meet the policy; the audit saw the denials.
    assert!(out.contains("audit: deny on node-a"), "{out}");
}

const BRIDGE_EXTRA: &str = r#"lan:
  gateway: 192.168.60.1/24
  gateway6: "fd00:60::1/64"
nodes:
  - {name: node-a, address: 192.168.60.11/24, address6: "fd00:60::11/64"}
  - {name: node-b, address: 192.168.60.12/24, address6: "fd00:60::12/64"}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.60.0/24, "fd00:60::/64"]
      gateway: [192.168.60.1, "fd00:60::1"]
      ipam: {nodeBlockPrefix: 27, exclude: [192.168.60.0/26, "fd00:60::/120"]}
      bridge: {uplink: eth0}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: web, namespace: default}
    spec:
      network: lan
      target: {workload: web}
      ports: [{protocol: TCP, port: 8080, targetPort: 80}]
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: protect-db}
    spec:
      tier: Admin
      priority: 10
      subject: {pods: {podSelector: {matchLabels: {app: db}}}}
      ingress:
        - {name: web-only, action: Accept, from: [{pods: {podSelector: {matchLabels: {app: web}}}}]}
        - {name: rest, action: Deny, from: [{cidrs: ["0.0.0.0/0", "::/0"]}], log: true}
workloads:
  - {name: web, node: node-a, labels: {app: web}, networks: [lan], listen: [80/tcp]}
  - {name: db, node: node-a, labels: {app: db}, networks: [lan], listen: [5432/tcp]}
  - {name: other, node: node-b, labels: {app: other}, networks: [lan], listen: [80/tcp]}
  - {name: stranger, node: node-a, labels: {app: stranger}, networks: [lan]}
expect:
  - {from: web, to: outside, port: 80, family: ipv6, result: allow, sourceSeenAs: self}
  - {from: node-a, to: outside, port: 80, family: ipv6, result: allow}
  - {from: outside, to: node-a, port: 8080, result: allow, answeredBy: web}
  - {from: web, to: db, port: 5432, result: allow}
  - {from: other, to: db, port: 5432, result: deny}
  - {from: outside, to: db, port: 5432, result: deny}
  - {from: other, to: web, port: 80, family: ipv6, result: allow}
  # Link-local addresses are the workloads' too: the policy judges them alike, on the node and
  # across the LAN.
  - {from: web, to: db, port: 5432, family: ipv6, linkLocal: true, result: allow}
  - {from: other, to: db, port: 5432, family: ipv6, linkLocal: true, result: deny}
  - {from: stranger, to: db, port: 5432, family: ipv6, linkLocal: true, result: deny}
  - {from: other, to: web, port: 80, family: ipv6, linkLocal: true, result: allow}
"#;

#[test]
fn policies_match_workloads_on_other_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(dir.path(), "cross-node.yaml", CROSS_NODE);
    let out = run_lab(&lab, &format!("xn-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
}

/// Default deny; web (node-b) may reach db (node-a): node-b's egress rule names db and
/// node-a's ingress rule names web, each running on the other node.
const CROSS_NODE: &str = r#"lan: {gateway: 192.168.50.1/24}
nodes:
  - {name: node-a, address: 192.168.50.11/24}
  - {name: node-b, address: 192.168.50.12/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.50.0/24]
      ipam: {nodeBlockPrefix: 27, exclude: [192.168.50.0/26]}
      bridge: {uplink: eth0}
      security: {defaultAction: Deny}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: db, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {app: db}}}
      ingress:
        - {name: web, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: web}}}}]}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: web, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {app: web}}}
      egress:
        - {name: db, action: Allow, to: [{pods: {podSelector: {matchLabels: {app: db}}}}]}
workloads:
  - {name: db, node: node-a, labels: {app: db}, networks: [lan], listen: [5432/tcp]}
  - {name: web, node: node-b, labels: {app: web}, networks: [lan], listen: [80/tcp]}
  - {name: other, node: node-b, labels: {app: other}, networks: [lan], listen: [80/tcp]}
expect:
  - {from: web, to: db, port: 5432, result: allow}
  - {from: other, to: db, port: 5432, result: deny}
"#;

#[test]
fn the_networks_annotation_picks_the_default_route_and_names_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    // nat-a's traffic may not reach the LAN: a pod whose default route goes through nat-a is
    // stopped there, one whose annotation moves it to nat-b gets out (masqueraded).
    let lab = write(
        dir.path(),
        "default-route.yaml",
        r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat-a}
    spec: {mode: NAT, subnets: [10.10.0.0/16], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat-b}
    spec: {mode: NAT, subnets: [10.20.0.0/16], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: nat-a-stays-inside}
    spec:
      tier: Admin
      priority: 10
      subject: {pods: {}, networks: [nat-a]}
      egress:
        - {name: no-lan, action: Deny, to: [{cidrs: [192.168.50.0/24]}]}
workloads:
  - {name: via-a, node: node-a, annotations: {weft.dev/networks: "nat-a,nat-b"}, listen: [80/tcp]}
  - name: via-b
    node: node-a
    annotations:
      weft.dev/networks: '[{"name": "nat-a"}, {"name": "nat-b", "interface": "uplink0", "defaultRoute": true}]'
    listen: [80/tcp]
expect:
  - {from: via-a, to: outside, port: 80, result: deny}
  - {from: via-b, to: outside, port: 80, result: allow, sourceSeenAs: node}
"#,
    );
    let out = run_lab(&lab, &format!("dr-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    assert!(
        out.contains("Deny by ClusterSegmentationPolicy nat-a-stays-inside rule no-lan"),
        "{out}"
    );
}

#[test]
fn a_migrated_vm_keeps_its_policy_and_hybrid_targets_are_reached_on_a_shared_network() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(dir.path(), "migrate-policy.yaml", MIGRATE_POLICY);
    let out = run_lab(&lab, &format!("mp-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
}

#[test]
fn outside_and_nodes_probe_a_hybrid_workload_on_its_lan_address() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(dir.path(), "hybrid-outside.yaml", HYBRID_OUTSIDE);
    let out = run_lab(&lab, &format!("ho-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    // The matrix probes outside -> hybrid at its LAN address too.
    let matrix = out
        .split("connectivity (IPv4")
        .nth(1)
        .expect("a connectivity matrix");
    let row = matrix
        .lines()
        .find(|l| l.trim_start().starts_with("outside"))
        .expect("the outside row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["outside", "yes", "-"], "{matrix}");
}

/// hybrid is on a NAT network first and on a Bridge network of the LAN's own subnet second.
/// outside and the other node reach it at its LAN address (the NAT one is private to its
/// node); its own node reaches it on the NAT network, through its bridge.
const HYBRID_OUTSIDE: &str = r#"lan: {gateway: 10.21.31.1/24, listen: [80/tcp]}
nodes:
  - {name: hy-a, address: 10.21.31.2/24}
  - {name: hy-b, address: 10.21.31.3/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: pods}
    spec: {mode: NAT, subnets: [10.97.0.0/20], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [10.21.31.0/24]
      ipam: {nodeBlockPrefix: 28, exclude: [10.21.31.0/28]}
      bridge: {uplink: eth0}
workloads:
  - {name: hybrid, node: hy-a, networks: [pods, lan], listen: [80/tcp]}
expect:
  - {from: outside, to: hybrid, port: 80, result: allow, sourceSeenAs: self}
  - {from: hy-b, to: hybrid, port: 80, result: allow, sourceSeenAs: self}
  - {from: hy-a, to: hybrid, port: 80, result: allow, sourceSeenAs: 10.97.0.1}
"#;

/// db is isolated by a namespace policy and live-migrates to kvm-b: its target launcher there
/// carries its labels, so the policy holds on its new port. roamer (NAT) is masqueraded to
/// kvm-b's address once it runs there. mixed is on a NAT network first and on the bridge
/// second: other (bridge only) reaches it at its bridge address, and so does mixed-2 (on both,
/// on the other node: the NAT network is private to each node).
const MIGRATE_POLICY: &str = r#"lan: {gateway: 10.20.30.1/24}
nodes:
  - {name: kvm-a, address: 10.20.30.2/24}
  - {name: kvm-b, address: 10.20.30.3/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: pods}
    spec: {mode: NAT, subnets: [10.96.0.0/20], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [10.20.30.0/24]
      ipam: {nodeBlockPrefix: 28, exclude: [10.20.30.0/28]}
      bridge: {uplink: eth0}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: db, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {role: db}}}
      ingress:
        - {name: app, action: Allow, from: [{pods: {podSelector: {matchLabels: {role: app}}}}], protocols: [{protocol: TCP, port: 5432}]}
workloads:
  - {name: db, kind: VM, node: kvm-a, labels: {role: db}, networks: [lan], listen: [5432/tcp], migrateTo: kvm-b}
  - {name: app, kind: VM, node: kvm-a, labels: {role: app}, networks: [lan], ips: [10.20.30.30]}
  - {name: other, node: kvm-a, networks: [lan], listen: [80/tcp]}
  - {name: mixed, node: kvm-b, networks: [pods, lan], listen: [80/tcp]}
  - {name: roamer, kind: VM, node: kvm-a, networks: [pods], migrateTo: kvm-b}
  - {name: mixed-2, node: kvm-a, annotations: {weft.dev/networks: "pods,lan"}}
expect:
  - {from: app, to: db, port: 5432, result: allow, sourceSeenAs: self}
  - {from: other, to: db, port: 5432, result: deny}
  # db has learned app's address from app itself: a forged claim must not replace it.
  - {from: other, to: db, port: 5432, spoof: {arp: 10.20.30.30}, result: deny}
  - {from: other, to: mixed, port: 80, result: allow, sourceSeenAs: self}
  # Both on pods and lan, on two nodes: pods is private to each node, lan is shared; the
  # source is mixed-2's address on lan.
  - {from: mixed-2, to: mixed, port: 80, result: allow, sourceSeenAs: self}
  # Masqueraded to the node it runs on now.
  - {from: roamer, to: outside, port: 80, result: allow, sourceSeenAs: node}
"#;

#[test]
fn a_deny_is_checked_against_a_listener_not_passed_because_nothing_listens() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "lab.yaml",
        r#"
lan: {gateway: 10.95.0.1/24}
nodes: [{name: n1, address: 10.95.0.21/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: a}, spec: {mode: NAT, subnets: [172.26.0.0/24]}}
workloads:
  - {name: wa, node: n1, networks: [a]}
  - {name: wb, node: n1, networks: [a], listen: [80/tcp]}
expect:
  # Nothing denies it: the lab listens on 5432 for the check, and the packets pass.
  - {from: wa, to: wb, port: 5432, result: deny}
"#,
    );
    let name = format!("nl-{}", std::process::id() % 10000);
    let out = Command::new(lab_binary())
        .args(["--name", &name])
        .arg(&lab)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("answered by wb"), "{stdout}");
    assert!(leftovers(&format!("wl-{name}-")).is_empty());
}

#[test]
fn a_lab_whose_output_is_closed_early_still_cleans_up() {
    use std::io::BufRead;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "lab.yaml",
        r#"
lan: {gateway: 10.94.0.1/24}
nodes: [{name: n1, address: 10.94.0.21/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: a}, spec: {mode: NAT, subnets: [172.25.0.0/24]}}
workloads:
  - {name: wa, node: n1, networks: [a], listen: [80/tcp]}
expect:
  - {from: outside, to: wa, port: 80, result: deny}
"#,
    );
    let name = format!("eo-{}", std::process::id() % 10000);
    let mut child = Command::new(lab_binary())
        .args(["--name", &name])
        .arg(&lab)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read the first line, then go away (as `| head -1` does): the lab's next line fails.
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("weft lab"), "{first}");
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        leftovers(&format!("wl-{name}-")).is_empty(),
        "the lab left namespaces behind"
    );
    assert!(!Path::new("/run/weft-lab").join(&name).exists());
}

#[test]
fn icmp_expectations_check_echo_requests_against_icmp_rules() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "icmp.yaml",
        r#"
lan: {gateway: 192.168.70.1/24, gateway6: "fd70::1/64"}
nodes: [{name: node-a, address: 192.168.70.11/24, address6: "fd70::11/64"}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: net}, spec: {mode: NAT, subnets: [10.70.0.0/24, "fd70:1::/64"]}}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: quiet, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {app: quiet}}}
      ingress:
        - {name: ping, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: pinger}}}}], protocols: [{protocol: ICMP, icmpType: 8}, {protocol: ICMPv6, icmpType: 128}]}
      egress:
        - {name: no-ping-out, action: Deny, protocols: [{protocol: ICMP}, {protocol: ICMPv6}], log: true}
workloads:
  - {name: quiet, node: node-a, labels: {app: quiet}, networks: [net]}
  - {name: pinger, node: node-a, labels: {app: pinger}, networks: [net]}
  - {name: other, node: node-a, networks: [net]}
expect:
  - {from: pinger, to: quiet, protocol: icmp, result: allow}
  - {from: pinger, to: quiet, protocol: icmp, family: ipv6, result: allow}
  - {from: other, to: quiet, protocol: icmp, result: deny}
  - {from: quiet, to: outside, protocol: icmp, family: ipv6, result: deny}
  - {from: pinger, to: outside, protocol: icmp, result: allow}
"#,
    );
    let out = run_lab(&lab, &format!("icmp-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
    assert!(out.contains("echo reply from 10.70.0."), "{out}");
    assert!(out.contains("rule no-ping-out"), "{out}");
}

#[test]
fn a_lab_terminated_while_it_builds_leaves_nothing_behind() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "lab.yaml",
        r#"
lan: {gateway: 10.93.0.1/24}
nodes:
  - {name: n1, address: 10.93.0.21/24}
  - {name: n2, address: 10.93.0.22/24}
  - {name: n3, address: 10.93.0.23/24}
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: a}, spec: {mode: NAT, subnets: [172.24.0.0/24]}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [10.93.0.0/24]
      ipam: {nodeBlockPrefix: 27, exclude: [10.93.0.0/27]}
      bridge: {uplink: eth0}
workloads:
  - {name: w1, node: n1, networks: [a], listen: [80/tcp]}
  - {name: w2, node: n2, networks: [a, lan], listen: [80/tcp]}
  - {name: v3, kind: VM, node: n3, networks: [lan], listen: [80/tcp]}
  - {name: v4, kind: VM, node: n1, networks: [lan], listen: [80/tcp]}
"#,
    );
    // SIGTERM at several moments of the build (agents taking the uplinks over, ADDs running):
    // the removal must not miss what the lab goes on creating meanwhile.
    for delay_ms in [300u64, 800, 1500] {
        let name = format!("tm{delay_ms}-{}", std::process::id() % 10000);
        let mut child = Command::new(lab_binary())
            .args(["--name", &name])
            .arg(&lab)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        child.wait().unwrap();
        assert!(
            leftovers(&format!("wl-{name}-")).is_empty(),
            "terminated after {delay_ms} ms, the lab left namespaces behind"
        );
        assert!(
            !Path::new("/run/weft-lab").join(&name).exists(),
            "terminated after {delay_ms} ms, the lab left its directory behind"
        );
    }
}

#[test]
fn a_forward_into_a_nat_network_keeps_the_lan_client_s_address_beside_a_bridge_network() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        dir.path(),
        "forward-beside-bridge.yaml",
        r#"
lan: {gateway: 192.168.40.1/24}
nodes:
  - {name: edge-1, address: 192.168.40.2/24}
  - {name: edge-2, address: 192.168.40.3/24}
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: nat}, spec: {mode: NAT, subnets: [10.40.0.0/24]}}
  # The LAN's own subnet as a Bridge network: the LAN's clients are in it.
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.40.0/24]
      ipam: {nodeBlockPrefix: 28, exclude: [192.168.40.0/28]}
      bridge: {uplink: eth0}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: api, namespace: default}
    spec:
      network: nat
      target: {workload: api}
      ports: [{protocol: TCP, port: 8443, targetPort: 443}]
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: api-in, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {app: api}}}
      ingress:
        - {name: block-edge-2, action: Deny, from: [{cidrs: [192.168.40.3/32]}], log: true}
        - {name: https, action: Allow, protocols: [{protocol: TCP, port: 443}]}
workloads:
  - {name: api, node: edge-1, labels: {app: api}, networks: [nat], listen: [443/tcp]}
  - {name: peer, node: edge-1, networks: [nat]}
  - {name: desk, node: edge-2, networks: [lan]}
expect:
  - {from: outside, to: edge-1, port: 8443, result: allow, answeredBy: api, sourceSeenAs: 192.168.40.1}
  - {from: desk, to: edge-1, port: 8443, result: allow, answeredBy: api, sourceSeenAs: self}
  - {from: edge-2, to: edge-1, port: 8443, result: deny}
  # A workload of the same NAT network still gets its answer through the node (hairpin).
  - {from: peer, to: edge-1, port: 8443, result: allow, answeredBy: api, sourceSeenAs: 10.40.0.1}
"#,
    );
    let out = run_lab(&lab, &format!("fb-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
}

#[test]
fn a_vlan_filtering_network_is_built_or_said_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    // Access ports on a VLAN-filtering bridge whose uplink is a trunk: two workloads of the
    // Network's own VLAN reach each other. A kernel without VLAN-filtering bridges makes the lab
    // say so (exit status 3) before building anything.
    let lab = write(
        dir.path(),
        "filtering.yaml",
        r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: trunk10}
    spec:
      mode: Bridge
      subnets: [10.110.0.0/24]
      ipam: {nodeBlockPrefix: 27, exclude: [10.110.0.0/27]}
      bridge: {uplink: eth0, vlanFiltering: true, vlan: 10, trunkVlans: [{id: 20}]}
workloads:
  - {name: a, node: node-a, networks: [trunk10], listen: [80/tcp]}
  - {name: b, node: node-a, networks: [trunk10], listen: [80/tcp]}
expect:
  - {from: a, to: b, port: 80, result: allow, sourceSeenAs: self}
"#,
    );
    let out = run_lab(&lab, &format!("vf-{}", std::process::id() % 10000));
    assert!(
        out.contains("all expectations hold")
            || out.contains("NOT SUPPORTED BY THIS KERNEL: VLAN-filtering bridges"),
        "{out}"
    );
}

#[test]
fn a_workload_reaches_itself_through_its_own_nodes_port_forward() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(dir.path(), "hairpin.yaml", HAIRPIN);
    let out = run_lab(&lab, &format!("hp-{}", std::process::id() % 10000));
    assert!(out.contains("all expectations hold"), "{out}");
}

/// A workload behind a port forward of its own node, on a NAT network and on a Bridge network,
/// TCP and UDP, IPv4 and IPv6: the DNATed packet must leave through the port it came in on
/// (hairpin), masqueraded so the reply comes back through the node.
const HAIRPIN: &str = r#"lan:
  gateway: 192.168.61.1/24
  gateway6: "fd00:61::1/64"
nodes:
  - {name: node-a, address: 192.168.61.11/24, address6: "fd00:61::11/64"}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat}
    spec: {mode: NAT, subnets: [10.61.0.0/24, "fd61::/64"]}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.61.0/24, "fd00:61::/64"]
      gateway: [192.168.61.1, "fd00:61::1"]
      ipam: {nodeBlockPrefix: 27, exclude: [192.168.61.0/26, "fd00:61::/120"]}
      bridge: {uplink: eth0}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: self, namespace: default}
    spec:
      network: nat
      target: {workload: web}
      ports: [{protocol: TCP, port: 8080, targetPort: 80}, {protocol: UDP, port: 5353, targetPort: 53}]
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: self-lan, namespace: default}
    spec:
      network: lan
      target: {workload: host}
      ports: [{protocol: TCP, port: 8081, targetPort: 80}, {protocol: UDP, port: 5354, targetPort: 53}]
workloads:
  - {name: web, node: node-a, networks: [nat], listen: [80/tcp, 53/udp]}
  - {name: peer, node: node-a, networks: [nat], listen: [80/tcp]}
  - {name: host, node: node-a, networks: [lan], listen: [80/tcp, 53/udp]}
expect:
  - {from: web, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: web}
  - {from: web, to: node-a, port: 8080, protocol: tcp, family: ipv6, result: allow, answeredBy: web}
  - {from: web, to: node-a, port: 5353, protocol: udp, result: allow, answeredBy: web}
  - {from: web, to: node-a, port: 5353, protocol: udp, family: ipv6, result: allow, answeredBy: web}
  - {from: peer, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: web}
  - {from: host, to: node-a, port: 8081, protocol: tcp, result: allow, answeredBy: host}
  - {from: host, to: node-a, port: 8081, protocol: tcp, family: ipv6, result: allow, answeredBy: host}
  - {from: host, to: node-a, port: 5354, protocol: udp, result: allow, answeredBy: host}
  - {from: host, to: node-a, port: 5354, protocol: udp, family: ipv6, result: allow, answeredBy: host}
  - {from: web, to: peer, port: 80, protocol: tcp, result: allow, sourceSeenAs: self}
"#;

/// A workload's host ports (`runtimeConfig.portMappings`) on a NAT network: one on every node
/// address, one on the node's IPv6 address only.
const HOST_PORTS: &str = r#"lan:
  gateway: 192.168.62.1/24
  gateway6: "fd00:62::1/64"
nodes:
  - {name: node-a, address: 192.168.62.11/24, address6: "fd00:62::11/64"}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat}
    spec: {mode: NAT, subnets: [10.62.0.0/24, "fd62::/64"]}
workloads:
  - name: web
    node: node-a
    networks: [nat]
    listen: [80/tcp, 53/udp]
    hostPorts:
      - {hostPort: 8080, containerPort: 80, protocol: tcp}
      - {hostPort: 5353, containerPort: 53, protocol: udp}
  - name: pinned
    node: node-a
    networks: [nat]
    listen: [81/tcp]
    hostPorts:
      - {hostPort: 8081, containerPort: 81, protocol: tcp, hostIP: "fd00:62::11"}
expect:
  - {from: outside, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: web, sourceSeenAs: self}
  - {from: outside, to: node-a, port: 8080, protocol: tcp, family: ipv6, result: allow, answeredBy: web}
  - {from: outside, to: node-a, port: 5353, protocol: udp, result: allow, answeredBy: web}
  - {from: outside, to: node-a, port: 5353, protocol: udp, family: ipv6, result: allow, answeredBy: web}
  - {from: web, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: web}
  - {from: web, to: node-a, port: 5353, protocol: udp, family: ipv6, result: allow, answeredBy: web}
  - {from: outside, to: node-a, port: 8081, protocol: tcp, family: ipv6, result: allow, answeredBy: pinned}
  - {from: outside, to: node-a, port: 8081, protocol: tcp, result: deny}
"#;

/// Runs the real `weft` binary in the lab's node namespace, as the lab does.
fn weft_in_node(
    lab: &str,
    node: &str,
    command: &str,
    container_id: &str,
    workload_ns: &str,
    conf: &serde_json::Value,
    extra_args: &str,
) -> (bool, serde_json::Value) {
    use std::io::Write;
    let node_dir = Path::new("/run/weft-lab").join(lab).join(node);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("wl-{lab}-n-{node}")])
        .arg(node_dir.join("cni-bin").join("weft"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/run/netns/{workload_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", node_dir.join("cni-bin"))
        // The node's locations, as the lab's runtime gives them: the plugin takes none from the
        // configuration.
        .env("WEFT_STATE_DIR", node_dir.join("state"))
        .env("WEFT_AGENT_SOCKET", node_dir.join("agent.sock"))
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container_id}{extra_args}"
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(conf).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), value)
}

/// The elements of both host-port maps of a family (`4` or `6`): ports on one node address,
/// then on any.
fn host_ports(lab: &str, family: &str) -> String {
    format!(
        "{} {}",
        nft_map(lab, &format!("hport{family}")),
        nft_map(lab, &format!("hportany{family}"))
    )
    .trim()
    .to_string()
}

/// The elements of map `name` of the node's `inet weft` table, as `nft` lists them.
fn nft_map(lab: &str, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("wl-{lab}-n-node-a")])
        .args(["nft", "list", "map", "inet", "weft", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_once("elements = {")
        .map(|(_, e)| e.split('}').next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

#[test]
fn host_ports_reach_the_pod_a_second_claim_fails_and_del_removes_them() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "hostports.yaml", HOST_PORTS);
    let lab = format!("hpt-{}", std::process::id() % 10000);
    let thief_ns = format!("wl-{lab}-x-thief");
    with_kept_lab(&lab, &file, std::slice::from_ref(&thief_ns), || {
        let node_dir = Path::new("/run/weft-lab").join(&lab).join("node-a");
        let conflist: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                node_dir
                    .join("cni-conf")
                    .join(weft_dataplane::names::CONFLIST_NAME),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            conflist["plugins"][0]["capabilities"]["portMappings"], true,
            "the conflist declares the portMappings capability"
        );
        let mut conf = conflist["plugins"][0].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        conf["network"] = serde_json::json!("nat");
        for key in ["stateDir", "agentSocket", "logFile"] {
            assert!(conf.get(key).is_none(), "the conflist names no {key}");
        }
        let state_dir = node_dir.join("state");
        let web = format!("lab-{lab}-web");
        assert!(
            host_ports(&lab, "4").contains("8080"),
            "web's host port is in force"
        );

        // A second pod asking for web's host port: refused, naming it, and nothing is left.
        weft_dataplane::netns::create_named(&thief_ns).unwrap();
        let mut thief = conf.clone();
        thief["runtimeConfig"] = serde_json::json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
        ]});
        let (ok, reply) = weft_in_node(&lab, "node-a", "ADD", "thief", &thief_ns, &thief, "");
        assert!(!ok, "{reply}");
        assert_eq!(reply["code"], 105, "{reply}");
        let details = reply["details"].as_str().unwrap_or_default();
        assert!(
            details.contains("host port 8080/tcp") && details.contains("pod default/web"),
            "the error names the host port and its holder: {reply}"
        );
        let store = weft_dataplane::ipam::IpamStore::open(&state_dir, "nat").unwrap();
        assert!(
            store
                .list()
                .unwrap()
                .iter()
                .all(|a| a.container_id != "thief"),
            "the refused ADD keeps no address"
        );
        let host_link = weft_dataplane::names::host_veth_name("thief", "eth0");
        let links = Command::new("ip")
            .args([
                "-n",
                &format!("wl-{lab}-n-node-a"),
                "link",
                "show",
                &host_link,
            ])
            .output()
            .unwrap();
        assert!(!links.status.success(), "the refused ADD keeps no link");
        assert!(
            host_ports(&lab, "4").contains("8080"),
            "web keeps its host port"
        );

        // DEL removes web's host ports; the other pod keeps its own.
        let (ok, reply) = weft_in_node(
            &lab,
            "node-a",
            "DEL",
            &web,
            &format!("wl-{lab}-w-web"),
            &conf,
            "",
        );
        assert!(ok, "{reply}");
        // The DEL returns once the addresses are free; the rules follow in the reconciler's
        // next batch, so the maps are read once that batch has had its chance.
        let settled = |family: &str, gone: &dyn Fn(&str) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let elements = host_ports(&lab, family);
                if gone(&elements) || std::time::Instant::now() > deadline {
                    return elements;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
        assert_eq!(
            settled("4", &|e| e.is_empty()),
            "",
            "DEL leaves no IPv4 host port"
        );
        let v6 = settled("6", &|e| !e.contains("8080") && !e.contains("5353"));
        assert!(
            !v6.contains("8080") && !v6.contains("5353") && v6.contains("8081"),
            "DEL removes web's IPv6 host ports only: {v6}"
        );
    });
}

#[test]
fn a_mac_a_workload_on_another_node_uses_on_a_bridge_network_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "macs.yaml",
        r#"lan: {gateway: 192.168.63.1/24}
nodes:
  - {name: node-a, address: 192.168.63.11/24}
  - {name: node-b, address: 192.168.63.12/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.63.0/24]
      ipam: {nodeBlockPrefix: 27, exclude: [192.168.63.0/26]}
      bridge: {uplink: eth0}
workloads:
  - {name: victim, node: node-a, networks: [lan], listen: [80/tcp], mac: "02:00:00:00:63:01"}
  - {name: peer, node: node-b, networks: [lan], listen: [80/tcp]}
expect:
  - {from: peer, to: victim, port: 80, protocol: tcp, result: allow}
"#,
    );
    let lab = format!("mac-{}", std::process::id() % 10000);
    let thief_ns = format!("wl-{lab}-x-thief");
    with_kept_lab(&lab, &file, std::slice::from_ref(&thief_ns), || {
        let node_dir = Path::new("/run/weft-lab").join(&lab).join("node-b");
        let conflist: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                node_dir
                    .join("cni-conf")
                    .join(weft_dataplane::names::CONFLIST_NAME),
            )
            .unwrap(),
        )
        .unwrap();
        let mut conf = conflist["plugins"][0].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        conf["network"] = serde_json::json!("lan");
        weft_dataplane::netns::create_named(&thief_ns).unwrap();
        // node-b's agent learns node-a's workloads from what node-a publishes: until it has,
        // the ADD goes through and is undone here. The bridge of node-b may also have learned
        // victim's MAC from the LAN, which ADD refuses by itself (code 7): the entry is
        // removed first, so that the agent's refusal is what this test sees.
        let mut refused = None;
        for _ in 0..20 {
            let _ = Command::new("bridge")
                .args(["-n", &format!("wl-{lab}-n-node-b"), "fdb", "del"])
                .args(["02:00:00:00:63:01", "dev", "eth0", "master"])
                .output();
            let (ok, reply) = weft_in_node(
                &lab,
                "node-b",
                "ADD",
                "thief",
                &thief_ns,
                &conf,
                ";MAC=02:00:00:00:63:01",
            );
            if !ok && reply["code"] == 105 {
                refused = Some(reply);
                break;
            }
            if ok {
                let (ok, reply) =
                    weft_in_node(&lab, "node-b", "DEL", "thief", &thief_ns, &conf, "");
                assert!(ok, "{reply}");
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let reply = refused.expect("node-b refuses the MAC victim uses on node-a");
        assert_eq!(reply["code"], 105, "{reply}");
        let details = reply["details"].as_str().unwrap_or_default();
        assert!(
            details.contains("MAC 02:00:00:00:63:01")
                && details.contains("pod default/victim on node node-a"),
            "{reply}"
        );
        let host_link = weft_dataplane::names::host_veth_name("thief", "eth0");
        let links = Command::new("ip")
            .args([
                "-n",
                &format!("wl-{lab}-n-node-b"),
                "link",
                "show",
                &host_link,
            ])
            .output()
            .unwrap();
        assert!(!links.status.success(), "the refused ADD keeps no link");
    });
}

const SYN_PROXY: &str = r#"lan:
  gateway: 192.168.64.1/24
  gateway6: "fd00:64::1/64"
nodes:
  - {name: node-a, address: 192.168.64.11/24, address6: "fd00:64::11/64"}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: nat}
    spec: {mode: NAT, subnets: [10.64.0.0/24, "fd64::/64"]}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: ssh, namespace: default}
    spec:
      network: nat
      target: {workload: ssh}
      ports: [{port: 8080, targetPort: 80}, {port: 2222, targetPort: 2200}]
      synProxy: {}
workloads:
  - name: ssh
    node: node-a
    networks: [nat]
    listen: [80/tcp]
    annotations: {weft.dev/syn-proxy: "true", weft.dev/conntrack-entries: "3"}
    hostPorts:
      - {hostPort: 2223, containerPort: 2200, protocol: tcp}
expect:
  - {from: outside, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: ssh}
  - {from: outside, to: node-a, port: 8080, protocol: tcp, family: ipv6, result: allow, answeredBy: ssh}
"#;

/// A workload's TCP counters (`/proc/net/netstat`'s `TcpExt` line) in its namespace.
fn tcp_ext(ns: &weft_dataplane::netns::Netns) -> std::collections::BTreeMap<String, u64> {
    let text = weft_dataplane::netns::run_in(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })
    .unwrap()
    .unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    lines[0]
        .split_whitespace()
        .zip(lines[1].split_whitespace())
        .skip(1)
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

#[test]
fn a_syn_proxy_completes_the_workloads_handshake_at_once_for_a_server_that_speaks_first() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "synproxy.yaml", SYN_PROXY);
    let lab = format!("syp-{}", std::process::id() % 10000);
    with_kept_lab(&lab, &file, &[], || {
        let workload =
            weft_dataplane::netns::Netns::open(format!("/run/netns/wl-{lab}-w-ssh")).unwrap();
        let outside =
            weft_dataplane::netns::Netns::open(format!("/run/netns/wl-{lab}-lan-0")).unwrap();
        // A server that speaks first, like SSH: its banner as soon as a client is accepted.
        let listener =
            weft_dataplane::netns::run_in(&workload, || std::net::TcpListener::bind("[::]:2200"))
                .unwrap()
                .unwrap();
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let mut c = c;
                let _ = std::io::Write::write_all(&mut c, b"SSH-2.0-weft\r\n");
            }
        });
        let before = tcp_ext(&workload);
        for target in [
            "192.168.64.11:2222",
            "[fd00:64::11]:2222",
            "192.168.64.11:2223",
            "[fd00:64::11]:2223",
        ] {
            let addr: std::net::SocketAddr = target.parse().unwrap();
            let banner = weft_dataplane::netns::run_in(&outside, move || {
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
                let mut buf = [0u8; 64];
                let n = std::io::Read::read(&mut s, &mut buf)?;
                Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).to_string())
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("{target}: {e}"));
            assert!(banner.starts_with("SSH-2.0-weft"), "{target}: {banner:?}");
        }
        // Each handshake the proxy completed on the workload's side was accepted the first
        // time: no ACK refused for its timestamp echo, no SYN-ACK sent again (a second's wait).
        let after = tcp_ext(&workload);
        for counter in ["TSEcrRejected", "TCPSynRetrans"] {
            assert_eq!(
                after.get(counter),
                before.get(counter),
                "{counter}: the workload refused the proxy's ACK"
            );
        }
        // The workload's conntrack budget (3 entries) holds behind the proxy too: with three
        // connections open, the proxy's connection for a fourth client is dropped (that client
        // completed its handshake with the node, and hears nothing); once they close, a new
        // client gets in.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let banner_from = |timeout: u64| {
            let addr: std::net::SocketAddr = "192.168.64.11:2222".parse().unwrap();
            weft_dataplane::netns::run_in(&outside, move || {
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(timeout)))?;
                let mut buf = [0u8; 64];
                let n = std::io::Read::read(&mut s, &mut buf)?;
                Ok::<_, std::io::Error>((s, n))
            })
            .unwrap()
        };
        let held: Vec<std::net::TcpStream> = (0..3)
            .map(|i| {
                let (s, n) = banner_from(3).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                assert!(n > 0, "connection {i} got its banner");
                s
            })
            .collect();
        assert!(
            banner_from(1).is_err(),
            "a fourth connection got through the workload's budget of 3"
        );
        drop(held);
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(
            banner_from(3).is_ok_and(|(_, n)| n > 0),
            "a new client after the others closed"
        );
        // The node answered the SYNs with cookies (the connections went through its proxy).
        let node =
            weft_dataplane::netns::Netns::open(format!("/run/netns/wl-{lab}-n-node-a")).unwrap();
        let stats = weft_dataplane::netns::run_in(&node, || {
            std::fs::read_to_string("/proc/thread-self/net/stat/synproxy")
        })
        .unwrap()
        .unwrap();
        let valid: u64 = stats
            .lines()
            .skip(1)
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(3)?, 16).ok())
            .sum();
        assert!(valid >= 4, "cookies validated: {valid}\n{stats}");
    });
}

const COPIES: &str = r#"
lan:
  gateway: 192.168.57.1/24
nodes:
  - {name: node-a, address: 192.168.57.11/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: flat}
    spec: {mode: NAT, subnets: [10.47.0.0/24], ipam: {nodeBlockPrefix: 24}}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: guarded-in, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {role: guarded}}}
      ingress:
        - {name: talker, action: Allow, from: [{pods: {podSelector: {matchLabels: {role: talker}}}}], protocols: [{protocol: UDP, port: 5355}, {protocol: TCP, port: 80}]}
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: no-stranger-chatter}
    spec:
      tier: Admin
      priority: 10
      subject: {pods: {podSelector: {matchLabels: {role: guarded}}}}
      ingress:
        - {name: no-llmnr, action: Deny, from: [{pods: {podSelector: {matchLabels: {role: stranger}}}}], protocols: [{protocol: UDP, port: 5355}], log: true}
workloads:
  - {name: talker, node: node-a, labels: {role: talker}, networks: [flat]}
  - {name: stranger, node: node-a, labels: {role: stranger}, networks: [flat]}
  - {name: guarded, node: node-a, labels: {role: guarded}, networks: [flat], listen: [80/tcp]}
  - {name: open, node: node-a, labels: {role: open}, networks: [flat], listen: [80/tcp]}
expect:
  - {from: talker, to: guarded, port: 80, result: allow}
  - {from: stranger, to: guarded, port: 80, result: deny}
  - {from: stranger, to: open, port: 80, result: allow}
"#;

const LAN_COPIES: &str = r#"
lan:
  gateway: 192.168.58.1/24
nodes:
  - {name: node-a, address: 192.168.58.11/24}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec:
      mode: Bridge
      subnets: [192.168.58.0/24]
      gateway: [192.168.58.1]
      ipam: {nodeBlockPrefix: 27, exclude: [192.168.58.0/26]}
      bridge: {uplink: eth0}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: web-only, namespace: default}
    spec:
      subject: {podSelector: {matchLabels: {role: isolated}}}
      ingress:
        - {name: web, action: Allow, protocols: [{protocol: TCP, port: 80}]}
workloads:
  - {name: isolated, node: node-a, labels: {role: isolated}, networks: [lan], listen: [80/tcp]}
  - {name: open, node: node-a, labels: {role: open}, networks: [lan], listen: [80/tcp]}
expect:
  - {from: outside, to: isolated, port: 80, result: allow}
  - {from: outside, to: open, port: 80, result: allow}
"#;

/// A DHCPv4 server's broadcast on the LAN (UDP 67 to 68) reaches a workload isolated for
/// ingress, as DHCPv6 does: the link's own business. Another broadcast from the LAN meets its
/// ingress policy and stops at its port; a workload without a policy gets both.
#[test]
fn a_dhcp_server_s_broadcast_reaches_an_isolated_workload_and_other_broadcasts_do_not() {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::time::Duration;
    use weft_dataplane::netns::{Netns, named_path, run_in};
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "lan-copies.yaml", LAN_COPIES);
    let lab = format!("dh-{}", std::process::id() % 10000);
    let name = lab.clone();
    with_kept_lab(&lab, &file, &[], move || {
        let ns = |n: &str| Netns::open(named_path(&format!("wl-{name}-{n}"))).unwrap();
        let listen = |w: &str, port: u16| {
            run_in(&ns(&format!("w-{w}")), || {
                let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                s
            })
            .unwrap()
        };
        let got = |s: &UdpSocket| {
            let mut buf = [0u8; 64];
            let mut n = 0;
            while s.recv_from(&mut buf).is_ok() {
                n += 1;
            }
            n
        };
        let sockets = [
            (listen("isolated", 68), listen("isolated", 5355)),
            (listen("open", 68), listen("open", 5355)),
        ];
        // The LAN's router sends an offer-like broadcast from the DHCP server port, and an
        // LLMNR-like one.
        run_in(&ns("lan-0"), || {
            for (from, to) in [(67, 68), (40000, 5355)] {
                let s = UdpSocket::bind(("0.0.0.0", from)).unwrap();
                s.set_broadcast(true).unwrap();
                for _ in 0..5 {
                    // The LAN's broadcast address: the router has no route for the
                    // limited broadcast (it is the LAN's default route).
                    s.send_to(
                        b"hello",
                        SocketAddr::from((Ipv4Addr::new(192, 168, 58, 255), to)),
                    )
                    .unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
        .unwrap();
        let [(iso_dhcp, iso_other), (open_dhcp, open_other)] =
            sockets.map(|(d, o)| (got(&d), got(&o)));
        assert!(iso_dhcp >= 1, "the isolated workload got no DHCP broadcast");
        assert_eq!(iso_other, 0, "the isolated workload got another broadcast");
        assert!(
            open_dhcp >= 1 && open_other >= 1,
            "open got {open_dhcp}, {open_other}"
        );
    });
}

/// Broadcasts and multicasts meet each receiver's ingress policy, not only the sender's
/// egress: the bridge floods a copy to every port, and each copy is judged as its receiver's
/// ingress. `guarded` takes UDP 5355 from `talker` only: it gets talker's broadcasts and
/// multicasts, never stranger's, which `open` (no policy) still gets; an Admin rule with `log`
/// denies stranger's to it, and its audit records name `guarded` as each copy's receiver.
#[test]
fn broadcasts_and_multicasts_meet_each_receiver_s_ingress_policy() {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::time::Duration;
    use weft_dataplane::netns::{Netns, named_path, run_in};
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "copies.yaml", COPIES);
    let lab = format!("bc-{}", std::process::id() % 10000);
    let name = lab.clone();
    with_kept_lab(&lab, &file, &[], move || {
        let ns = |w: &str| Netns::open(named_path(&format!("wl-{name}-w-{w}"))).unwrap();
        let group = Ipv4Addr::new(224, 0, 0, 251);
        let receiver = |w: &str| {
            run_in(&ns(w), || {
                let s = UdpSocket::bind("0.0.0.0:5355").unwrap();
                s.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                s
            })
            .unwrap()
        };
        let (guarded, open) = (receiver("guarded"), receiver("open"));
        // Drains what a receiver got, by sender's tag.
        let got = |s: &UdpSocket| {
            let mut tags = std::collections::BTreeSet::new();
            let mut buf = [0u8; 64];
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                tags.insert(String::from_utf8_lossy(&buf[..n]).to_string());
            }
            tags
        };
        for (sender, to, kind) in [
            ("talker", Ipv4Addr::BROADCAST, "broadcast"),
            ("stranger", Ipv4Addr::BROADCAST, "broadcast"),
            ("talker", group, "multicast"),
            ("stranger", group, "multicast"),
        ] {
            run_in(&ns(sender), || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_broadcast(true).unwrap();
                for _ in 0..5 {
                    s.send_to(
                        format!("{sender} {kind}").as_bytes(),
                        SocketAddr::from((to, 5355)),
                    )
                    .unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .unwrap();
        }
        let (g, o) = (got(&guarded), got(&open));
        let all = |s: &str| {
            ["broadcast", "multicast"]
                .iter()
                .map(|k| format!("{s} {k}"))
                .collect::<Vec<_>>()
        };
        for tag in all("talker") {
            assert!(g.contains(&tag), "guarded missed {tag}: {g:?}");
            assert!(o.contains(&tag), "open missed {tag}: {o:?}");
        }
        for tag in all("stranger") {
            assert!(!g.contains(&tag), "guarded got {tag}: {g:?}");
            assert!(o.contains(&tag), "open missed {tag}: {o:?}");
        }
        // The copies kept from guarded are counted under its port's id: stranger's ten.
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("wl-{name}-n-node-a")])
            .args(["nft", "-j", "list", "set", "inet", "weft", "drops_inp"])
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let counted: Vec<u64> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .filter_map(|e| e["elem"]["counter"]["packets"].as_u64())
            .collect();
        assert!(
            counted.len() == 1 && counted[0] >= 10,
            "copies dropped per port: {json}"
        );
        // The logging rule's records name the receiver of each copy it denied: its
        // destination is the broadcast or the group, its receiver the workload.
        let audit = format!("/run/weft-lab/{name}/node-a/audit.jsonl");
        let records = || -> Vec<serde_json::Value> {
            std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|v: &serde_json::Value| v["rule"] == "no-llmnr")
                .collect()
        };
        let mut seen = records();
        for _ in 0..20 {
            if seen.len() >= 10 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            seen = records();
        }
        for dst in ["255.255.255.255", "224.0.0.251"] {
            assert!(
                seen.iter()
                    .any(|v| v["dst"] == dst && v["dstWorkload"] == "default/guarded"),
                "no record of a copy to {dst} naming its receiver: {seen:?}"
            );
        }
        assert!(
            seen.iter().all(|v| v["dstWorkload"] == "default/guarded"),
            "{seen:?}"
        );
    });
}

//! The whole agent (`agent::run`) with `--metrics-addr`, in a network namespace of the test's
//! own: `/readyz` answers 503 while the source cannot give a snapshot and 200 after the first
//! successful reconcile; `/metrics` counts the reconciles.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_operator::agent::AgentStatus;
use weft_operator::agent::source::{ManifestSource, ResourceSource, SourceError};
use weft_operator::model::Resources;

mod common;
use common::{config, isolate};

/// A manifest source that is "not synced" until `open` is set, like the API source before its
/// first lists.
struct Gated {
    inner: ManifestSource,
    open: Arc<AtomicBool>,
}

impl ResourceSource for Gated {
    fn snapshot(&mut self) -> Result<Resources, SourceError> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(SourceError::NotSynced {
                what: "networks".into(),
            });
        }
        self.inner.snapshot()
    }

    fn fingerprint(&mut self) -> Result<u64, SourceError> {
        Ok(self.inner.fingerprint()? ^ u64::from(self.open.load(Ordering::SeqCst)))
    }

    fn report(&mut self, status: &AgentStatus) {
        self.inner.report(status)
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The agent binds the address when it starts: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_for(addr: SocketAddr, path: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(addr, path).await;
        if reply.contains(want) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never contained {want:?}; last reply:\n{reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn readyz_turns_ready_after_the_first_successful_reconcile_and_metrics_count_reconciles() {
    isolate();
    let state = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(
        manifests.path().join("net.yaml"),
        "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: alpha}\nspec: {mode: NAT, subnets: [10.63.0.0/16]}\n",
    )
    .unwrap();
    let open = Arc::new(AtomicBool::new(false));
    let source = Box::new(Gated {
        inner: ManifestSource::new(manifests.path()),
        open: open.clone(),
    });
    let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    // Built after unshare: the runtime's threads live in the test's namespace.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = config(state.path());
        cfg.workload_metrics = true;
        let agent = tokio::spawn(weft_operator::agent::run(
            cfg,
            source,
            Some(addr),
        ));
        // The source waits for its first list: alive, not ready, the start counted as a
        // reconcile but not as an error (every start in a cluster begins so).
        let metrics = wait_for(
            addr,
            "/metrics",
            r#"weft_agent_reconciliations_total{trigger="start"} 1"#,
        )
        .await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            !metrics.contains("weft_agent_reconciliation_errors_total{"),
            "{metrics}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));

        open.store(true, Ordering::SeqCst);
        wait_for(addr, "/readyz", "HTTP/1.1 200").await;
        let metrics = get(addr, "/metrics").await;
        for want in [
            r#"weft_agent_reconciliations_total{trigger="resources changed"} 1"#,
            "weft_agent_networks 1",
            "weft_agent_endpoints 0",
            "# TYPE weft_agent_audit_records counter",
            "weft_agent_banned_sources 0",
        ] {
            assert!(metrics.contains(want), "missing {want} in\n{metrics}");
        }
        assert!(
            !metrics.contains(r#"reconciliation_errors_total{trigger="resources changed"}"#),
            "{metrics}"
        );
        // The weft binary reports each ADD and DEL over the socket when it finishes.
        let socket = state.path().join("agent.sock");
        let reply = tokio::task::spawn_blocking(move || {
            weft_dataplane::proto::call(
                &socket,
                &weft_dataplane::proto::Request::Report {
                    command: "ADD".into(),
                    ok: true,
                    micros: 3_500,
                },
                std::time::Duration::from_secs(5),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert!(reply.ok, "{reply:?}");
        let metrics = wait_for(
            addr,
            "/metrics",
            r#"weft_agent_cni_operations_total{command="ADD",result="success"} 1"#,
        )
        .await;
        assert!(
            metrics.contains(r#"weft_agent_cni_duration_seconds_count{command="ADD"} 1"#),
            "{metrics}"
        );
        assert!(metrics.contains("weft_agent_ready 1"), "{metrics}");
        // A workload's traffic, from its host link's counters (`--workload-metrics`): the
        // frames the workload sends are packets out of it.
        let socket = state.path().join("agent.sock");
        tokio::task::spawn_blocking(move || workload_sends_frames(&socket, 3))
            .await
            .unwrap();
        let out = r#"weft_agent_workload_packets_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="out"} "#;
        let metrics = wait_for(addr, "/metrics", out).await;
        let sent: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(out))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        assert_eq!(sent, 3, "{metrics}");
        assert!(
            metrics.contains(r#"weft_agent_workload_bytes_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="out"} 126"#),
            "three 42-byte ARP frames: {metrics}"
        );
        // Forged frames the guard drops (ARP claiming another address), counted per port in
        // the kernel's dynamic set and reported as the workload's drops for reason guard.
        tokio::task::spawn_blocking(|| workload_forges_frames(2))
            .await
            .unwrap();
        let guard = r#"weft_agent_workload_drops_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="out",reason="guard"} 2"#;
        let metrics = wait_for(addr, "/metrics", guard).await;
        for want in [
            r#"weft_agent_workload_drops_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="in",reason="policy"} 0"#,
            r#"weft_agent_workload_drops_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="out",reason="link"} 0"#,
            r#"weft_agent_workload_drops_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="in",reason="limit"} 0"#,
            r#"weft_agent_workload_connections_total{namespace="shop",pod="web-1",network="alpha",interface="eth0",direction="out"} 0"#,
            "# TYPE weft_agent_anomalies counter",
        ] {
            assert!(metrics.contains(want), "missing {want} in\n{metrics}");
        }
        agent.abort();
        every_metric_the_chart_queries_is_exported(&metrics);
    });
}

/// A workload's veth (host end `wftraffic0`, registered as pod shop/web-1 on Network alpha)
/// whose workload end sends `n` ARP requests.
fn workload_sends_frames(socket: &std::path::Path, n: usize) {
    use weft_dataplane::netlink::Netlink;
    let mut nl = Netlink::new().unwrap();
    nl.create_veth_pair("wftraffic0", "wftraffic0p", None, None)
        .unwrap();
    // No IPv6 on either end: its autoconfiguration would send packets of its own.
    for end in ["wftraffic0", "wftraffic0p"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{end}/disable_ipv6"), "1").unwrap();
    }
    let host = nl.link_by_name("wftraffic0").unwrap().unwrap();
    let peer = nl.link_by_name("wftraffic0p").unwrap().unwrap();
    nl.set_up(host.index).unwrap();
    nl.set_up(peer.index).unwrap();
    let mac = [0x0a, 0x58, 0x0a, 0x3f, 0x00, 0x05];
    let endpoint = weft_dataplane::proto::Endpoint {
        network: "alpha".into(),
        container_id: "ctraffic".into(),
        ifname: "eth0".into(),
        host_ifname: "wftraffic0".into(),
        mac: weft_dataplane::names::format_mac(mac),
        ips: vec!["10.63.0.5".parse().unwrap()],
        pod_namespace: Some("shop".into()),
        pod_name: Some("web-1".into()),
        netns: None,
        vm: None,
        pending: false,
        vlan_trunk: vec![],
        port_mappings: vec![],
        bandwidth: None,
    };
    let reply = weft_dataplane::proto::call(
        socket,
        &weft_dataplane::proto::Request::Register { endpoint },
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(reply.ok, "{reply:?}");
    let frame = weft_dataplane::frame::arp_request(
        mac,
        "10.63.0.5".parse().unwrap(),
        "10.63.0.1".parse().unwrap(),
    );
    for _ in 0..n {
        weft_dataplane::frame::send(peer.index, &frame).unwrap();
    }
}

/// The workload of [`workload_sends_frames`], its port now on its network's bridge, sends `n`
/// ARP requests claiming an address that is not its own.
fn workload_forges_frames(n: usize) {
    use weft_dataplane::netlink::Netlink;
    let mut nl = Netlink::new().unwrap();
    let bridge = nl
        .link_by_name(&weft_dataplane::names::bridge_name("alpha"))
        .unwrap()
        .expect("the bridge of Network alpha");
    let host = nl.link_by_name("wftraffic0").unwrap().unwrap();
    let peer = nl.link_by_name("wftraffic0p").unwrap().unwrap();
    nl.set_master(host.index, Some(bridge.index)).unwrap();
    let mac = [0x0a, 0x58, 0x0a, 0x3f, 0x00, 0x05];
    let forged = weft_dataplane::frame::arp_request(
        mac,
        "10.63.0.99".parse().unwrap(),
        "10.63.0.1".parse().unwrap(),
    );
    for _ in 0..n {
        weft_dataplane::frame::send(peer.index, &forged).unwrap();
    }
}

/// The names of the series `text` (the exposition format) declares: each family's `# TYPE`
/// name, with the suffixes its samples take (`_total`, `_bucket`, `_sum`, `_count`).
fn exported(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if let Some(name) = line
            .split(['{', ' '])
            .next()
            .filter(|n| n.starts_with("weft_"))
        {
            names.insert(name.to_string());
        }
    }
    names
}

/// The weft metrics a query text names.
fn queried(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("weft_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

/// The chart's Grafana dashboard and alerts query only metrics that exist: the agent's as this
/// test scraped them, the controller's as its `/metrics` renders its registry. A labelled
/// family appears only with its first sample, so those the scrape could not show (a failed
/// reconcile) are recorded once in registries of their own.
fn every_metric_the_chart_queries_is_exported(scraped: &str) {
    use weft_operator::controller::metrics::{Metrics, render};
    let mut registry = prometheus_client::registry::Registry::default();
    let agent = weft_operator::agent::metrics::AgentMetrics::register(
        &mut registry,
        weft_operator::agent::audit::Counters::default(),
    );
    agent.reconciled(
        "retry",
        Duration::from_millis(5),
        false,
        &AgentStatus::default(),
    );
    let failures = render(&registry).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let controller = Metrics::register(&mut registry);
    controller.reconciled("Network", Duration::from_millis(5));
    controller.failed("Network", "Conflict");
    controller.set_blocks_in_use("blue", 1);
    let controller = render(&registry).unwrap();
    let mut known = exported(scraped);
    known.extend(
        exported(&failures)
            .into_iter()
            .filter(|n| n.starts_with("weft_agent_reconciliation_errors")),
    );
    known.extend(exported(&controller));
    let files = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/files");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(files.join("dashboard.json")).unwrap())
            .unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(e)) => {
                            exprs.push(("dashboard.json", e.clone()))
                        }
                        _ => stack.push(v),
                    }
                }
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    let alerts = std::fs::read_to_string(files.join("alerts.yaml")).unwrap();
    exprs.push(("alerts.yaml", alerts));
    assert!(exprs.len() > 10, "only {} queries found", exprs.len());
    let mut missing = Vec::new();
    let mut named = 0;
    for (file, e) in &exprs {
        for name in queried(e) {
            named += 1;
            if !known.contains(&name) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(named > 20, "only {named} metric names queried");
    assert!(
        missing.is_empty(),
        "queried but not exported:\n  {}\nexported: {known:?}",
        missing.join("\n  ")
    );
}

#[test]
fn the_check_of_the_chart_s_queries_sees_a_metric_nobody_exports() {
    let known = exported(
        "# TYPE weft_agent_ready gauge\nweft_agent_ready 1\n# TYPE weft_agent_x counter\n",
    );
    assert!(known.contains("weft_agent_ready") && known.contains("weft_agent_x_total"));
    let q = queried("rate(weft_agent_x_total[5m]) / weft_agent_nope");
    assert!(q.contains("weft_agent_x_total") && q.contains("weft_agent_nope"));
    assert!(!known.contains("weft_agent_nope"));
}

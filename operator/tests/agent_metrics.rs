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
        let agent = tokio::spawn(weft_operator::agent::run(
            config(state.path()),
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
        agent.abort();
    });
}

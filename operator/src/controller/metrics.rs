//! The controller's Prometheus metrics and the `/metrics`, `/healthz` and `/readyz` endpoints.
//!
//! Metrics (all prefixed `weft_controller_`):
//! - `reconciliations_total{kind}`: reconciles run;
//! - `reconciliation_errors_total{kind,reason}`: failed reconciles, by [`super::Error::reason`];
//! - `reconcile_duration_seconds{kind}`: histogram of reconcile durations;
//! - `blocks_in_use{network}`: address blocks assigned to nodes, per Network;
//! - `leader`: 1 while this replica holds the Lease.
//!
//! [`serve`] is independent of the controller: it serves any [`Registry`].

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

/// The controller's metrics.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    blocks_in_use: Family<Labels, Gauge>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            blocks_in_use: Family::default(),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them with the prefix `weft_controller`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("weft_controller");
        r.register("reconciliations", "Reconciles run", m.reconciles.clone());
        r.register(
            "reconciliation_errors",
            "Reconciles that failed, by reason",
            m.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            m.duration.clone(),
        );
        r.register(
            "blocks_in_use",
            "Address blocks assigned to nodes, per Network",
            m.blocks_in_use.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        m
    }

    /// Counts a reconcile of `kind` that took `took`.
    pub fn reconciled(&self, kind: &'static str, took: Duration) {
        let labels = vec![("kind", kind.to_owned())];
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile of `kind`.
    pub fn failed(&self, kind: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Sets the number of blocks assigned from `network`.
    pub fn set_blocks_in_use(&self, network: &str, blocks: usize) {
        self.blocks_in_use
            .get_or_create(&vec![("network", network.to_owned())])
            .set(i64::try_from(blocks).unwrap_or(i64::MAX));
    }

    /// Forgets a Network that no longer exists.
    pub fn forget_network(&self, network: &str) {
        self.blocks_in_use
            .remove(&vec![("network", network.to_owned())]);
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

/// The text exposition of a registry.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    encode(&mut out, registry)?;
    Ok(out)
}

/// The HTTP routes: `/metrics` (OpenMetrics text), `/healthz` (always 200 while the process
/// serves), `/readyz` (200 once `ready` is true, else 503).
pub fn router(registry: Arc<Registry>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    match render(&registry) {
                        Ok(text) => (
                            StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "cannot encode metrics".to_owned(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
}

/// Serves [`router`] on `addr` until the future is dropped.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(registry, ready)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_names_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.reconciled("Network", Duration::from_millis(12));
        m.failed("Network", "Conflict");
        m.set_blocks_in_use("blue", 3);
        m.set_leader(true);
        let text = render(&registry).unwrap();
        for want in [
            r#"weft_controller_reconciliations_total{kind="Network"} 1"#,
            r#"weft_controller_reconciliation_errors_total{kind="Network",reason="Conflict"} 1"#,
            r#"weft_controller_reconcile_duration_seconds_count{kind="Network"} 1"#,
            r#"weft_controller_blocks_in_use{network="blue"} 3"#,
            "weft_controller_leader 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[tokio::test]
    async fn probes_answer_over_http() {
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::new(Registry::default()), ready.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").await.starts_with("HTTP/1.1 200"));
    }
}

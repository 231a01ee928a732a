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
    allocations: Counter,
    allocations_reused: Counter,
    allocation_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            blocks_in_use: Family::default(),
            leader: Gauge::default(),
            allocations: Counter::default(),
            allocations_reused: Counter::default(),
            allocation_duration: duration_histogram(),
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
            "allocations",
            "Allocation passes run (validation and blocks of every Network on every node)",
            m.allocations.clone(),
        );
        r.register(
            "allocations_reused",
            "Reconciles that reused the last allocation (its inputs unchanged)",
            m.allocations_reused.clone(),
        );
        r.register(
            "allocation_duration_seconds",
            "Duration of allocation passes",
            m.allocation_duration.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        m
    }

    /// Counts an allocation pass that took `took`.
    pub fn allocated(&self, took: Duration) {
        self.allocations.inc();
        self.allocation_duration.observe(took.as_secs_f64());
    }

    /// Counts a reconcile that reused the last allocation.
    pub fn allocation_reused(&self) {
        self.allocations_reused.inc();
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

/// Serves [`router`] on `addr` until the future is dropped, through a [`BoundedListener`].
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let listener = BoundedListener::bind(addr).await?;
    axum::serve(listener, router(registry, ready)).await
}

/// Most HTTP connections served at once; more wait in the kernel's accept queue (costing the
/// process no descriptor) until one closes.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that neither sends nor takes a byte this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener for the metrics endpoints that holds at most `max` connections at once and
/// closes idle ones: whoever can reach the port cannot exhaust the process's descriptors (the
/// agent's CNI socket shares them) by opening connections and leaving them open.
pub struct BoundedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    idle: Duration,
}

impl BoundedListener {
    /// Binds `addr` with [`MAX_CONNECTIONS`] and [`IDLE_TIMEOUT`].
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self::new(
            tokio::net::TcpListener::bind(addr).await?,
            MAX_CONNECTIONS,
            IDLE_TIMEOUT,
        ))
    }

    /// Wraps a bound listener.
    pub fn new(inner: tokio::net::TcpListener, max: usize, idle: Duration) -> Self {
        BoundedListener {
            inner,
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            idle,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Wait for a free slot before accepting: the waiting connections stay in the kernel.
        let permit = loop {
            match self.permits.clone().acquire_owned().await {
                Ok(p) => break p,
                // The semaphore is never closed; if it were, slow down rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let deadline = Box::pin(tokio::time::sleep(self.idle));
                    return (
                        BoundedStream {
                            inner: stream,
                            idle: self.idle,
                            deadline,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of a [`BoundedListener`]: holds its slot until dropped, and fails with
/// `TimedOut` when neither side moves a byte for the idle timeout.
pub struct BoundedStream {
    inner: tokio::net::TcpStream,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl BoundedStream {
    fn progressed(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    fn idle_out<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle connection closed",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for BoundedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                this.progressed();
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => this.idle_out(cx),
        }
    }
}

impl tokio::io::AsyncWrite for BoundedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, data) {
            std::task::Poll::Ready(r) => {
                this.progressed();
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => this.idle_out(cx),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_holds_at_most_its_connections_and_closes_idle_ones() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = BoundedListener::new(tcp, 2, Duration::from_millis(300));
        let ready = Arc::new(AtomicBool::new(true));
        let server = tokio::spawn(async move {
            axum::serve(listener, router(Arc::new(Registry::default()), ready)).await
        });
        // Two idle connections take both slots; a third request waits for one to time out.
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = tokio::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
            .await
            .expect("the idle connections were never closed")
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "answered while both slots were held"
        );
        // The idle ones were closed by the server.
        let mut buf = [0u8; 1];
        assert_eq!(idle[0].read(&mut buf).await.unwrap_or(0), 0);
        server.abort();
    }

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

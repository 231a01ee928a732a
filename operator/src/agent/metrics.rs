//! The agent's Prometheus metrics. They are served on `--metrics-addr` by the same routes as
//! the controller's ([`crate::controller::metrics::router`]: `/metrics`, `/healthz`, and
//! `/readyz`, which answers 200 once the first reconcile succeeded).
//!
//! Metrics (all prefixed `weft_agent_`):
//! - `reconciliations_total{trigger}`: reconciles run, by what started them (`start`,
//!   `resources changed`, `endpoints`, `retry`, `resync`);
//! - `reconciliation_errors_total{trigger}`: reconciles that failed;
//! - `reconcile_duration_seconds`: histogram of reconcile durations;
//! - `endpoints`: workload endpoints known on the node;
//! - `networks`: networks realized on the node;
//! - `audit_records_total{verdict}`: audit records written, read from the audit reader's
//!   counters at each scrape.

use super::AgentStatus;
use super::audit;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// The agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    reconciles: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    duration: Histogram,
    endpoints: Gauge,
    networks: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            endpoints: Gauge::default(),
            networks: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    /// Creates the metrics and registers them, with the audit counters, under the prefix
    /// `weft_agent`.
    pub fn register(registry: &mut Registry, audit: audit::Counters) -> Self {
        let m = AgentMetrics::default();
        let r = registry.sub_registry_with_prefix("weft_agent");
        r.register(
            "reconciliations",
            "Reconciles run, by trigger",
            m.reconciles.clone(),
        );
        r.register(
            "reconciliation_errors",
            "Reconciles that failed, by trigger",
            m.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            m.duration.clone(),
        );
        r.register(
            "endpoints",
            "Workload endpoints known on the node",
            m.endpoints.clone(),
        );
        r.register(
            "networks",
            "Networks realized on the node",
            m.networks.clone(),
        );
        r.register_collector(Box::new(AuditRecords(audit)));
        m
    }

    /// Records one reconcile started by `trigger`, its outcome and the status it left.
    pub fn reconciled(&self, trigger: &str, took: Duration, ok: bool, status: &AgentStatus) {
        let labels = vec![("trigger", trigger.to_owned())];
        self.reconciles.get_or_create(&labels).inc();
        if !ok {
            self.failures.get_or_create(&labels).inc();
        }
        self.duration.observe(took.as_secs_f64());
        self.endpoints
            .set(i64::try_from(status.endpoints).unwrap_or(i64::MAX));
        self.networks
            .set(i64::try_from(status.networks.len()).unwrap_or(i64::MAX));
    }
}

/// `audit_records_total{verdict}`, read from the audit reader's counters at each scrape.
#[derive(Debug)]
struct AuditRecords(audit::Counters);

impl Collector for AuditRecords {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.lock().map(|c| c.clone()).unwrap_or_default();
        let family = ConstCounter::new(0u64);
        let mut metric = encoder.encode_descriptor(
            "audit_records",
            "Audit records written, by verdict",
            None,
            family.metric_type(),
        )?;
        for (verdict, n) in counts {
            let labels: Labels = vec![("verdict", verdict)];
            ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::metrics::render;

    #[test]
    fn metrics_render_with_their_names_and_labels() {
        let mut registry = Registry::default();
        let audit = audit::Counters::default();
        let m = AgentMetrics::register(&mut registry, audit.clone());
        let status = AgentStatus {
            endpoints: 3,
            networks: vec!["blue".into()],
            ..AgentStatus::default()
        };
        m.reconciled("start", Duration::from_millis(20), true, &status);
        m.reconciled("retry", Duration::from_millis(20), false, &status);
        audit.lock().unwrap().insert("drop".into(), 7);
        let text = render(&registry).unwrap();
        for want in [
            r#"weft_agent_reconciliations_total{trigger="start"} 1"#,
            r#"weft_agent_reconciliations_total{trigger="retry"} 1"#,
            r#"weft_agent_reconciliation_errors_total{trigger="retry"} 1"#,
            "weft_agent_reconcile_duration_seconds_count 2",
            "weft_agent_endpoints 3",
            "weft_agent_networks 1",
            "# TYPE weft_agent_audit_records counter",
            r#"weft_agent_audit_records_total{verdict="drop"} 7"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains(r#"reconciliation_errors_total{trigger="start"}"#));
    }
}

//! The agent's Prometheus metrics. They are served on `--metrics-addr` by the same routes as
//! the controller's ([`crate::controller::metrics::router`]: `/metrics`, `/healthz`, and
//! `/readyz`, which answers 200 once the first reconcile succeeded).
//!
//! Metrics (all prefixed `weft_agent_`):
//! - `reconciliations_total{trigger}`: reconciles run, by what started them (`start`,
//!   `resources changed`, `endpoints`, `retry`, `resync`);
//! - `reconciliation_errors_total{trigger}`: reconciles that failed (one that waits for the
//!   first list of the Kubernetes API, as every start does, is not a failure);
//! - `reconcile_duration_seconds`: histogram of reconcile durations (buckets from 0.5 ms, so a
//!   registration's in-place change is told apart from a full apply);
//! - `ready`: 1 once the agent has reconciled the node (as `/readyz`), 0 before;
//! - `endpoints`: workload endpoints known on the node;
//! - `networks`: networks realized on the node;
//! - `audit_records_total{verdict}`: audit records written, read from the audit reader's
//!   counters at each scrape;
//! - `audit_overruns_total`: times the audit reader's socket overran (`ENOBUFS`, a burst of
//!   logged packets faster than the reader): the kernel dropped what did not fit, so some
//!   logged packets have no record (and a live migration's announcement may wait for the next);
//! - `cni_operations_total{command,result}` and `cni_duration_seconds{command}`: CNI ADD and
//!   DEL as the `weft` binary reports them over the agent's socket when it finishes;
//! - `banned_sources`: sources PortForwards' brute-force guards have banned on the node now;
//! - `workload_bytes_total`, `workload_packets_total` and `workload_drops_total`
//!   `{namespace,pod,network,interface,direction}`: each workload interface's traffic, `in` to
//!   the workload and `out` of it, read from its host link's counters at each scrape; the
//!   drops also by `reason`: `link` (the host link's: a full queue, a peer gone), `policy` (the
//!   segmentation policy's, counted by the kernel per workload address, and `in` also the
//!   copies of broadcasts and multicasts it dropped at the workload's port), `guard`
//!   (anti-spoofing's, per port) and `limit` (new connections over the workload's connection
//!   limits or conntrack budget, per workload address) and `bandwidth` (`out`: frames over its
//!   egress limit, where its Network polices egress limits); `workload_connections_total` the new
//!   connections it opened (`out`) and received (`in`); all only with `--workload-metrics` (one
//!   series per workload interface and direction: the cardinality grows with the workloads);
//! - `conntrack_entries` and `conntrack_limit`: the node's connection tracking table
//!   (`nf_conntrack_count` and `nf_conntrack_max`, read at each scrape). Masquerade and port
//!   forwards need an entry per connection; alert well before entries reach the limit, e.g.
//!   `weft_agent_conntrack_entries / weft_agent_conntrack_limit > 0.8`.

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
    ready: Gauge,
    endpoints: Gauge,
    networks: Gauge,
    cni_ops: Family<Labels, Counter>,
    cni_duration: Family<Labels, Histogram, fn() -> Histogram>,
    audit_overruns: Counter,
}

fn cni_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ready: Gauge::default(),
            endpoints: Gauge::default(),
            networks: Gauge::default(),
            cni_ops: Family::default(),
            cni_duration: Family::new_with_constructor(cni_histogram),
            audit_overruns: Counter::default(),
        }
    }
}

impl AgentMetrics {
    /// Creates the metrics and registers them, with the audit counters, under the prefix
    /// `weft_agent`.
    pub fn register(registry: &mut Registry, audit: audit::Counters) -> Self {
        Self::register_with(
            registry,
            audit,
            &weft_dataplane::sysctl::root().join("net/netfilter"),
        )
    }

    /// [`AgentMetrics::register`], reading conntrack's counters from `conntrack_dir`.
    pub fn register_with(
        registry: &mut Registry,
        audit: audit::Counters,
        conntrack_dir: &std::path::Path,
    ) -> Self {
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
            "ready",
            "1 once the agent has reconciled the node, as /readyz",
            m.ready.clone(),
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
        r.register(
            "cni_operations",
            "CNI operations reported by the weft binary, by command and result",
            m.cni_ops.clone(),
        );
        r.register(
            "cni_duration_seconds",
            "Duration of CNI operations as the weft binary measured them, by command",
            m.cni_duration.clone(),
        );
        r.register(
            "audit_overruns",
            "Times the audit reader's socket overran (ENOBUFS): logged packets were lost without a record",
            m.audit_overruns.clone(),
        );
        r.register_collector(Box::new(Counts {
            name: "audit_records",
            help: "Audit records written, by verdict",
            label: "verdict",
            counts: audit,
        }));
        r.register_collector(Box::new(Conntrack(conntrack_dir.to_path_buf())));
        r.register_collector(Box::new(Bans));
        m
    }

    /// The audit reader's overrun counter (`audit_overruns_total`), counted by the reader.
    pub fn audit_overruns(&self) -> Counter {
        self.audit_overruns.clone()
    }

    /// The agent has reconciled the node: ready.
    pub fn ready(&self) {
        self.ready.set(1);
    }

    /// Records one CNI operation the `weft` binary reported.
    pub fn cni(&self, command: &str, ok: bool, took: Duration) {
        let command = command.to_ascii_uppercase();
        self.cni_ops
            .get_or_create(&vec![
                ("command", command.clone()),
                ("result", if ok { "success" } else { "error" }.to_string()),
            ])
            .inc();
        self.cni_duration
            .get_or_create(&vec![("command", command)])
            .observe(took.as_secs_f64());
    }

    /// How many `command` operations the `weft` binary reported, succeeded (`ok`) or failed.
    #[cfg(test)]
    pub fn cni_operations(&self, command: &str, ok: bool) -> u64 {
        self.cni_ops
            .get_or_create(&vec![
                ("command", command.to_string()),
                ("result", if ok { "success" } else { "error" }.to_string()),
            ])
            .get()
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

/// A counter by one label, read from a map another task keeps (`audit_records_total{verdict}`
/// from the audit reader, `anomalies_total{kind}` from the anomaly detector) at each scrape.
#[derive(Debug)]
struct Counts {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    counts: audit::Counters,
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        let family = ConstCounter::new(0u64);
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, None, family.metric_type())?;
        for (value, n) in counts {
            let labels: Labels = vec![(self.label, value)];
            ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One workload interface whose traffic the `workload_*` metrics report, by its host link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadPort {
    /// The workload's host link.
    pub host_ifname: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod (a VM's virt-launcher pod).
    pub pod: String,
    /// The weft Network.
    pub network: String,
    /// The interface's name in the pod.
    pub interface: String,
    /// Its addresses (the keys of the policy's drop counters).
    pub ips: Vec<std::net::IpAddr>,
    /// Its limits.
    pub limits: weft_crds::Limits,
}

/// The drops the node's rules counted per workload (the kernel's dynamic sets, see
/// `policy::render::drops_set` and `guard::DROPS_SET`), read at each scrape.
#[derive(Debug, Default)]
struct RuleDrops {
    /// Address → packets the policy dropped from it (egress).
    policy_out: std::collections::HashMap<String, u64>,
    /// Address → packets the policy dropped to it (ingress).
    policy_in: std::collections::HashMap<String, u64>,
    /// Port id (as nft lists it) → copies of broadcasts and multicasts the receiver's ingress
    /// policy dropped at the port.
    policy_in_copies: std::collections::HashMap<String, u64>,
    /// Host port → forged frames the guard dropped from it.
    guard: std::collections::HashMap<String, u64>,
    /// Host port → frames over its policed egress limit.
    police: std::collections::HashMap<String, u64>,
    /// Address → new connections from it its limits dropped.
    limit_out: std::collections::HashMap<String, u64>,
    /// Address → new connections to it its conntrack budget dropped.
    limit_in: std::collections::HashMap<String, u64>,
    /// Address → new connections it opened.
    conns_out: std::collections::HashMap<String, u64>,
    /// Address → new connections to it.
    conns_in: std::collections::HashMap<String, u64>,
}

impl RuleDrops {
    fn read() -> Self {
        use weft_dataplane::nft::{Family, NftCli};
        let nft = NftCli::default();
        let read = |family: Family, set: &str| -> std::collections::HashMap<String, u64> {
            match nft.set_counters(family, weft_dataplane::names::NFT_TABLE, set) {
                Ok(list) => list
                    .into_iter()
                    .map(|(k, packets, _)| (k, packets))
                    .collect(),
                Err(e) => {
                    tracing::debug!(error = %e, set, "cannot read drop counters");
                    Default::default()
                }
            }
        };
        let mut out = RuleDrops::default();
        for v6 in [false, true] {
            out.policy_out.extend(read(
                Family::Inet,
                &crate::policy::render::drops_set("eg", v6),
            ));
            out.policy_in.extend(read(
                Family::Inet,
                &crate::policy::render::drops_set("in", v6),
            ));
        }
        out.policy_in_copies = read(Family::Inet, crate::policy::render::COPY_DROPS_SET);
        out.guard = read(Family::Bridge, super::guard::DROPS_SET);
        out.police = read(Family::Bridge, super::guard::POLICE_DROPS_SET);
        let [lo, li] = super::firewall::LIMIT_DROP_SETS;
        for set in lo {
            out.limit_out.extend(read(Family::Inet, set));
        }
        for set in li {
            out.limit_in.extend(read(Family::Inet, set));
        }
        let [co, ci] = super::anomaly::NEW_CONNECTION_SETS;
        for set in co {
            out.conns_out.extend(read(Family::Inet, set));
        }
        for set in ci {
            out.conns_in.extend(read(Family::Inet, set));
        }
        out
    }

    /// `(direction, new connections)` of one workload interface.
    fn connections(&self, p: &WorkloadPort) -> [(&'static str, u64); 2] {
        let sum = |m| sum_of_addresses(m, p);
        [("in", sum(&self.conns_in)), ("out", sum(&self.conns_out))]
    }

    /// `(reason, direction, packets)` of one workload interface; `bandwidth` only where its
    /// egress limit is policed (a port without a meter has no such drops).
    fn of(&self, p: &WorkloadPort) -> Vec<(&'static str, &'static str, u64)> {
        let sum = |m| sum_of_addresses(m, p);
        [
            (
                "policy",
                "in",
                sum(&self.policy_in).saturating_add(
                    self.policy_in_copies
                        .get(&weft_dataplane::names::classid_text(
                            weft_dataplane::names::port_id(&p.host_ifname),
                        ))
                        .copied()
                        .unwrap_or(0),
                ),
            ),
            ("policy", "out", sum(&self.policy_out)),
            (
                "guard",
                "out",
                self.guard.get(&p.host_ifname).copied().unwrap_or(0),
            ),
            ("limit", "in", sum(&self.limit_in)),
            ("limit", "out", sum(&self.limit_out)),
            (
                "bandwidth",
                "out",
                self.police.get(&p.host_ifname).copied().unwrap_or(0),
            ),
        ]
        .into_iter()
        .filter(|(reason, _, _)| *reason != "bandwidth" || p.limits.polices_egress())
        .collect()
    }
}

/// Registers `weft_agent_anomalies_total{kind}`: anomalies the detector raised, by kind.
pub fn register_anomalies(registry: &mut Registry, counts: super::anomaly::Counts) {
    registry
        .sub_registry_with_prefix("weft_agent")
        .register_collector(Box::new(Counts {
            name: "anomalies",
            help: "Anomalies the agent raised on workload interfaces, by kind: connection-limit, conntrack-budget, bandwidth (a limit crossed), packet-rate, connection-rate (an administrator's rate crossed); each is also an audit record and, in a cluster, an Event on the pod",
            label: "kind",
            counts,
        }));
}

/// The sum of per-address counts `m` over the addresses of workload interface `p`.
fn sum_of_addresses(m: &std::collections::HashMap<String, u64>, p: &WorkloadPort) -> u64 {
    p.ips.iter().filter_map(|ip| m.get(&ip.to_string())).sum()
}

/// The labels of one workload interface's series in one direction.
fn port_labels(p: &WorkloadPort, direction: &str) -> Labels {
    vec![
        ("namespace", p.namespace.clone()),
        ("pod", p.pod.clone()),
        ("network", p.network.clone()),
        ("interface", p.interface.clone()),
        ("direction", direction.to_string()),
    ]
}

/// The workload interfaces of the node, kept by the reconciler and read at each scrape.
pub type WorkloadPorts = std::sync::Arc<std::sync::Mutex<Vec<WorkloadPort>>>;

/// Registers the `workload_*` metrics (`--workload-metrics`) under the prefix `weft_agent`.
pub fn register_workload_traffic(registry: &mut Registry, ports: WorkloadPorts) {
    registry
        .sub_registry_with_prefix("weft_agent")
        .register_collector(Box::new(WorkloadTraffic(ports)));
}

/// The host links' counters of the workload interfaces, read at each scrape.
#[derive(Debug)]
struct WorkloadTraffic(WorkloadPorts);

impl Collector for WorkloadTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use weft_dataplane::netlink::{LinkStats, Netlink};
        let ports = self.0.lock().map(|p| p.clone()).unwrap_or_default();
        let stats: std::collections::HashMap<String, LinkStats> =
            match Netlink::new().and_then(|mut nl| nl.link_stats()) {
                Ok(s) => s.into_iter().collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the links' counters");
                    Default::default()
                }
            };
        // Seen from the workload: what its host link sends goes in, what it receives came out.
        type Pick = fn(&LinkStats) -> (u64, u64);
        let families: [(&str, &str, Pick); 2] = [
            (
                "workload_bytes",
                "Bytes into and out of each workload interface",
                |s| (s.tx_bytes, s.rx_bytes),
            ),
            (
                "workload_packets",
                "Packets into and out of each workload interface",
                |s| (s.tx_packets, s.rx_packets),
            ),
        ];
        for (name, help, pick) in families {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for p in &ports {
                let Some(s) = stats.get(&p.host_ifname) else {
                    continue;
                };
                let (into, out) = pick(s);
                for (direction, n) in [("in", into), ("out", out)] {
                    let labels = port_labels(p, direction);
                    ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        // Drops by reason: the host link's (a full queue, a peer gone), the segmentation
        // policy's (into the workload and out of it) and the guard's (forged frames out of it).
        let rules = RuleDrops::read();
        let mut metric = encoder.encode_descriptor(
            "workload_drops",
            "Packets dropped into and out of each workload interface, by reason: link (its host link dropped them), policy (the segmentation policy; in: the copies of broadcasts and multicasts it kept from the workload too), guard (anti-spoofing: forged addresses, MACs, ARP, neighbour discovery), limit (new connections over the workload's connection limits, counted per connection's first packet), bandwidth (out: frames over its egress limit where its Network polices it)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for p in &ports {
            let link = stats
                .get(&p.host_ifname)
                .map(|s| (s.tx_dropped, s.rx_dropped));
            let mut rows: Vec<(&str, &str, u64)> = Vec::new();
            if let Some((into, out)) = link {
                rows.extend([("link", "in", into), ("link", "out", out)]);
            }
            rows.extend(rules.of(p));
            for (reason, direction, n) in rows {
                let mut labels = port_labels(p, direction);
                labels.push(("reason", reason.to_string()));
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        // New connections (the first packet of each, counted per workload address by the
        // `limits` chain): opened by the workload (out) and to it (in).
        let mut metric = encoder.encode_descriptor(
            "workload_connections",
            "New connections opened by (out) and to (in) each workload interface, as the node's connection tracking saw them",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for p in &ports {
            for (direction, n) in rules.connections(p) {
                let labels = port_labels(p, direction);
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// `banned_sources`: the sources PortForwards' brute-force guards have banned on the node now
/// (one per source and port; the audit records name them), read at each scrape.
#[derive(Debug)]
struct Bans;

impl Collector for Bans {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use weft_dataplane::nft::{Family, NftCli};
        let nft = NftCli::default();
        let mut n = 0usize;
        for set in super::firewall::BAN_SETS {
            match nft.set_len(Family::Inet, weft_dataplane::names::NFT_TABLE, set) {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::debug!(error = %e, set, "cannot read the bans");
                    return Ok(());
                }
            }
        }
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(n).unwrap_or(i64::MAX),
        );
        let metric = encoder.encode_descriptor(
            "banned_sources",
            "Sources banned from a PortForward's node port by its brute-force guard now, per source and port",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// `conntrack_entries` and `conntrack_limit`, read at each scrape (absent when the kernel has
/// no connection tracking loaded).
#[derive(Debug)]
struct Conntrack(std::path::PathBuf);

impl Collector for Conntrack {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |name: &str| -> Option<i64> {
            std::fs::read_to_string(self.0.join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        for (file, name, help) in [
            (
                "nf_conntrack_count",
                "conntrack_entries",
                "Connection tracking entries in use on the node",
            ),
            (
                "nf_conntrack_max",
                "conntrack_limit",
                "Connection tracking table size: new connections are dropped beyond it",
            ),
        ] {
            if let Some(v) = read(file) {
                let gauge = prometheus_client::metrics::gauge::ConstGauge::new(v);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::metrics::render;

    #[test]
    fn a_policed_port_s_meter_drops_are_its_bandwidth_drops_and_others_have_none() {
        let port = |name: &str, policed: bool| WorkloadPort {
            host_ifname: name.into(),
            namespace: "prod".into(),
            pod: name.into(),
            network: "nat".into(),
            interface: "eth0".into(),
            ips: vec![],
            limits: weft_crds::Limits {
                egress_bps: Some(1_000_000),
                egress_policed: policed,
                ..Default::default()
            },
        };
        let drops = RuleDrops {
            police: [("wfa".to_string(), 7), ("wfb".to_string(), 9)].into(),
            ..Default::default()
        };
        let bandwidth = |p: &WorkloadPort| -> Vec<(&str, u64)> {
            drops
                .of(p)
                .into_iter()
                .filter(|(reason, _, _)| *reason == "bandwidth")
                .map(|(_, direction, n)| (direction, n))
                .collect()
        };
        assert_eq!(bandwidth(&port("wfa", true)), [("out", 7)]);
        // Shaped: its drops are the shaper's, and no series of a meter it does not have.
        assert_eq!(bandwidth(&port("wfb", false)), []);
        assert_eq!(bandwidth(&port("wfc", true)), [("out", 0)]);
    }

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
        audit.lock().unwrap().insert("deny".into(), 7);
        m.audit_overruns().inc();
        let text = render(&registry).unwrap();
        for want in [
            r#"weft_agent_reconciliations_total{trigger="start"} 1"#,
            r#"weft_agent_reconciliations_total{trigger="retry"} 1"#,
            r#"weft_agent_reconciliation_errors_total{trigger="retry"} 1"#,
            "weft_agent_reconcile_duration_seconds_count 2",
            "weft_agent_ready 0",
            "weft_agent_endpoints 3",
            "weft_agent_networks 1",
            "# TYPE weft_agent_audit_records counter",
            r#"weft_agent_audit_records_total{verdict="deny"} 7"#,
            "# TYPE weft_agent_audit_overruns counter",
            "weft_agent_audit_overruns_total 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains(r#"reconciliation_errors_total{trigger="start"}"#));
    }

    #[test]
    fn cni_reports_and_conntrack_fill_are_exported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nf_conntrack_count"), "812\n").unwrap();
        std::fs::write(dir.path().join("nf_conntrack_max"), "65536\n").unwrap();
        let mut registry = Registry::default();
        let m = AgentMetrics::register_with(&mut registry, audit::Counters::default(), dir.path());
        m.cni("add", true, Duration::from_micros(4200));
        m.cni("ADD", false, Duration::from_millis(30));
        m.cni("del", true, Duration::from_micros(900));
        let text = render(&registry).unwrap();
        for want in [
            r#"weft_agent_cni_operations_total{command="ADD",result="success"} 1"#,
            r#"weft_agent_cni_operations_total{command="ADD",result="error"} 1"#,
            r#"weft_agent_cni_operations_total{command="DEL",result="success"} 1"#,
            r#"weft_agent_cni_duration_seconds_count{command="ADD"} 2"#,
            "weft_agent_conntrack_entries 812",
            "weft_agent_conntrack_limit 65536",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}

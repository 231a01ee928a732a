//! Anomaly detection: once a second the agent samples each workload interface's counters
//! (its host link's packets, the new connections it opened and received, the connections its
//! limits dropped, its bandwidth shaping) and raises an anomaly when the interface crosses one
//! of its limits or a rate the administrator set (`--anomaly-packets-per-second`,
//! `--anomaly-connections-per-second`): an audit record (verdict `anomaly`), the metric
//! `weft_agent_anomalies_total{kind}`, and in a cluster a Kubernetes Event on the pod (a VM's
//! launcher pod). An anomaly that goes on is reported once; it ends after
//! [`QUIET`] without a crossing (another audit record), and is reported again if it comes
//! back. [`detect`] is pure; [`Detector`] is the sampling task.

use super::metrics::WorkloadPort;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_dataplane::names;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::nft::{Family, NftCli};

/// How often the counters are sampled.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// An anomaly ends after this long without a crossing.
pub const QUIET: Duration = Duration::from_secs(30);

/// The dynamic sets that count new connections per workload address: opened by it (IPv4,
/// IPv6), and to it.
pub const NEW_CONNECTION_SETS: [[&str; 2]; 2] =
    [["conns_out4", "conns_out6"], ["conns_in4", "conns_in6"]];

/// What crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// New connections it opened were dropped by its connection limits.
    ConnectionLimit,
    /// Connections to it were dropped by its conntrack budget (an inbound flood).
    ConntrackBudget,
    /// Its traffic reached its bandwidth limit (the shaper queued or dropped it, or the
    /// egress meter dropped it).
    Bandwidth,
    /// Its packets per second, in and out, crossed the administrator's rate.
    PacketRate,
    /// Its new connections per second, in and out, crossed the administrator's rate.
    ConnectionRate,
}

impl Kind {
    /// The metric label and audit `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConnectionLimit => "connection-limit",
            Kind::ConntrackBudget => "conntrack-budget",
            Kind::Bandwidth => "bandwidth",
            Kind::PacketRate => "packet-rate",
            Kind::ConnectionRate => "connection-rate",
        }
    }

    /// The Event's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::ConnectionLimit => "ConnectionLimitReached",
            Kind::ConntrackBudget => "ConntrackBudgetReached",
            Kind::Bandwidth => "BandwidthLimitReached",
            Kind::PacketRate => "PacketRateHigh",
            Kind::ConnectionRate => "ConnectionRateHigh",
        }
    }
}

/// The administrator's rates (none: only the limits raise anomalies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Thresholds {
    /// Packets per second in and out of one workload interface.
    pub packets_per_second: Option<u64>,
    /// New connections per second opened by and to one workload interface.
    pub connections_per_second: Option<u64>,
}

/// One sample of the node's counters.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When it was taken.
    pub at: Option<Instant>,
    /// Host link → packets it received plus sent.
    pub packets: HashMap<String, u64>,
    /// Address → new connections it opened; and received.
    pub conns_out: HashMap<IpAddr, u64>,
    /// Address → new connections to it.
    pub conns_in: HashMap<IpAddr, u64>,
    /// Address → connections from it its limits dropped.
    pub limit_out: HashMap<IpAddr, u64>,
    /// Address → connections to it its conntrack budget dropped.
    pub limit_in: HashMap<IpAddr, u64>,
    /// Host link → its shapers' overlimits and drops, both directions, and the frames its
    /// egress meter dropped.
    pub shaped: HashMap<String, u64>,
}

/// One crossing.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    /// The interface's host link.
    pub host_ifname: String,
    /// What crossed.
    pub kind: Kind,
    /// The rate seen, per second (packets, connections, drops).
    pub rate: f64,
    /// What it crossed: the limit or threshold, in words.
    pub limit: String,
}

/// The crossings between two samples of `ports`.
pub fn detect(
    prev: &Sample,
    now: &Sample,
    ports: &[WorkloadPort],
    thresholds: &Thresholds,
) -> Vec<Crossing> {
    let (Some(t0), Some(t1)) = (prev.at, now.at) else {
        return Vec::new();
    };
    let secs = t1.saturating_duration_since(t0).as_secs_f64().max(0.001);
    let mut out = Vec::new();
    for p in ports {
        let by_ip = |m0: &HashMap<IpAddr, u64>, m1: &HashMap<IpAddr, u64>| -> u64 {
            p.ips
                .iter()
                .map(|ip| {
                    m1.get(ip)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(m0.get(ip).copied().unwrap_or(0))
                })
                .sum()
        };
        let by_link = |m0: &HashMap<String, u64>, m1: &HashMap<String, u64>| -> u64 {
            match (m0.get(&p.host_ifname), m1.get(&p.host_ifname)) {
                (Some(a), Some(b)) => b.saturating_sub(*a),
                _ => 0,
            }
        };
        let mut push = |kind: Kind, n: u64, limit: String| {
            out.push(Crossing {
                host_ifname: p.host_ifname.clone(),
                kind,
                rate: n as f64 / secs,
                limit,
            });
        };
        let l = &p.limits;
        let dropped_out = by_ip(&prev.limit_out, &now.limit_out);
        if dropped_out > 0 {
            let mut words = Vec::new();
            if let Some(r) = l.new_connections_per_second {
                words.push(format!("{r} new connections per second"));
            }
            if let Some(c) = l.max_connections {
                words.push(format!("{c} concurrent connections"));
            }
            if let Some(t) = l.conntrack_entries {
                words.push(format!("{t} conntrack entries"));
            }
            push(Kind::ConnectionLimit, dropped_out, words.join(", "));
        }
        let dropped_in = by_ip(&prev.limit_in, &now.limit_in);
        if dropped_in > 0 {
            push(
                Kind::ConntrackBudget,
                dropped_in,
                l.conntrack_entries
                    .map(|t| format!("{t} conntrack entries"))
                    .unwrap_or_default(),
            );
        }
        let shaped = by_link(&prev.shaped, &now.shaped);
        if shaped > 0 {
            let mut words = Vec::new();
            if let Some(b) = l.ingress_bps {
                words.push(format!("{b} bit/s in"));
            }
            if let Some(b) = l.egress_bps {
                words.push(format!("{b} bit/s out"));
            }
            push(Kind::Bandwidth, shaped, words.join(", "));
        }
        if let Some(max) = thresholds.packets_per_second {
            let n = by_link(&prev.packets, &now.packets);
            if n as f64 / secs > max as f64 {
                push(Kind::PacketRate, n, format!("{max} packets per second"));
            }
        }
        if let Some(max) = thresholds.connections_per_second {
            let n = by_ip(&prev.conns_out, &now.conns_out) + by_ip(&prev.conns_in, &now.conns_in);
            if n as f64 / secs > max as f64 {
                push(
                    Kind::ConnectionRate,
                    n,
                    format!("{max} new connections per second"),
                );
            }
        }
    }
    out
}

/// An anomaly record (a JSON line of the audit log).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnomalyRecord {
    /// RFC 3339 time.
    pub time: String,
    /// The node.
    pub node: String,
    /// Always `anomaly`.
    pub verdict: &'static str,
    /// What crossed.
    pub kind: Kind,
    /// `started` or `ended`.
    pub state: &'static str,
    /// The workload, `namespace/pod`.
    pub workload: String,
    /// Its Network and interface.
    pub network: String,
    /// The interface's name in the pod.
    pub interface: String,
    /// The rate seen when it started, per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// The limit or threshold crossed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub limit: String,
}

/// An anomaly that started, as the Event publisher gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod (a VM's launcher pod).
    pub pod: String,
    /// What crossed.
    pub kind: Kind,
    /// The Event's note.
    pub note: String,
}

/// Where anomalies go besides the audit log and the metric: in a cluster, Events.
pub type Publish = Box<dyn Fn(Anomaly) + Send + Sync>;

/// Anomalies started, by kind, since the agent started.
pub type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// The shared audit log the records are written to.
pub type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Takes one sample of what `ports` and `thresholds` make worth reading: the link counters
/// (a packet rate is set), the per-address new-connection counters (a connection rate is
/// set), the limits' drop counters (a port has connection limits) and the shapers of the
/// ports with bandwidth limits. Nothing configured: nothing read.
fn sample(ports: &[WorkloadPort], thresholds: &Thresholds) -> Sample {
    let mut s = Sample {
        at: Some(Instant::now()),
        ..Sample::default()
    };
    let Ok(mut nl) = Netlink::new() else {
        return s;
    };
    if thresholds.packets_per_second.is_some()
        && let Ok(stats) = nl.link_stats()
    {
        s.packets = stats
            .into_iter()
            .map(|(name, st)| (name, st.rx_packets.saturating_add(st.tx_packets)))
            .collect();
    }
    let nft = NftCli::default();
    let read = |set: &str| -> HashMap<IpAddr, u64> {
        nft.set_counters(Family::Inet, names::NFT_TABLE, set)
            .map(|l| {
                l.into_iter()
                    .filter_map(|(k, packets, _)| Some((k.parse().ok()?, packets)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let limited = ports.iter().any(|p| !p.limits.connections().is_none());
    if limited {
        for (i, sets) in super::firewall::LIMIT_DROP_SETS.iter().enumerate() {
            for set in sets {
                let m = read(set);
                if i == 0 {
                    &mut s.limit_out
                } else {
                    &mut s.limit_in
                }
                .extend(m);
            }
        }
    }
    if thresholds.connections_per_second.is_some() {
        for (i, sets) in NEW_CONNECTION_SETS.iter().enumerate() {
            for set in sets {
                let m = read(set);
                if i == 0 {
                    &mut s.conns_out
                } else {
                    &mut s.conns_in
                }
                .extend(m);
            }
        }
    }
    // The shapers of every port with a bandwidth limit, in two requests for all of them.
    let shaped: Vec<&str> = ports
        .iter()
        .filter(|p| p.limits.ingress_bps.is_some() || p.limits.shapes_egress())
        .map(|p| p.host_ifname.as_str())
        .collect();
    if !shaped.is_empty()
        && let Ok(counters) = nl.shaping_counters_of(&shaped)
    {
        s.shaped = counters
            .into_iter()
            .map(|(port, c)| {
                let n = [c.ingress, c.egress]
                    .into_iter()
                    .flatten()
                    .map(|q| q.overlimits.saturating_add(q.drops))
                    .sum();
                (port, n)
            })
            .collect();
    }
    // The frames the meters of policed egress limits dropped, per port. The kernel adds a
    // port's counter at its first drop: until then the port's count is 0 (read), so that the
    // first drops are a crossing.
    let policed: Vec<&str> = ports
        .iter()
        .filter(|p| p.limits.polices_egress())
        .map(|p| p.host_ifname.as_str())
        .collect();
    if !policed.is_empty()
        && let Ok(counters) = nft.set_counters(
            Family::Bridge,
            names::NFT_TABLE,
            super::guard::POLICE_DROPS_SET,
        )
    {
        let counters: HashMap<String, u64> = counters
            .into_iter()
            .map(|(port, packets, _)| (port, packets))
            .collect();
        for port in policed {
            let n = s.shaped.entry(port.to_string()).or_default();
            *n = n.saturating_add(counters.get(port).copied().unwrap_or(0));
        }
    }
    s
}

/// The sampling task's settings.
pub struct Detector {
    /// This node.
    pub node: String,
    /// The workload interfaces, kept by the reconciler.
    pub ports: super::metrics::WorkloadPorts,
    /// The administrator's rates.
    pub thresholds: Thresholds,
    /// The audit log.
    pub sink: Sink,
    /// Anomalies started, by kind.
    pub counts: Counts,
    /// Events, in a cluster.
    pub publish: Option<Publish>,
}

impl Detector {
    /// Samples forever (a dedicated thread: `nft` and netlink calls block).
    pub fn run(self) {
        let mut prev = Sample::default();
        // (host link, kind) → when it last crossed.
        let mut active: HashMap<(String, Kind), Instant> = HashMap::new();
        loop {
            let started = Instant::now();
            let ports = self.ports.lock().map(|p| p.clone()).unwrap_or_default();
            let now = sample(&ports, &self.thresholds);
            let crossings = detect(&prev, &now, &ports, &self.thresholds);
            let at = now.at.unwrap_or(started);
            for c in crossings {
                let key = (c.host_ifname.clone(), c.kind);
                let new = active.insert(key, at).is_none();
                if !new {
                    continue;
                }
                let Some(p) = ports.iter().find(|p| p.host_ifname == c.host_ifname) else {
                    continue;
                };
                self.write(p, c.kind, "started", Some(c.rate), &c.limit);
                if let Ok(mut counts) = self.counts.lock() {
                    *counts.entry(c.kind.as_str().to_string()).or_default() += 1;
                }
                if let Some(publish) = &self.publish {
                    publish(Anomaly {
                        namespace: p.namespace.clone(),
                        pod: p.pod.clone(),
                        kind: c.kind,
                        note: format!(
                            "interface {} on Network {} (node {}): {:.0}/s, over {}",
                            p.interface,
                            p.network,
                            self.node,
                            c.rate,
                            if c.limit.is_empty() {
                                "its limit"
                            } else {
                                &c.limit
                            }
                        ),
                    });
                }
            }
            let ended: Vec<(String, Kind)> = active
                .iter()
                .filter(|(_, last)| at.saturating_duration_since(**last) >= QUIET)
                .map(|(k, _)| k.clone())
                .collect();
            for key in ended {
                active.remove(&key);
                if let Some(p) = ports.iter().find(|p| p.host_ifname == key.0) {
                    self.write(p, key.1, "ended", None, "");
                }
            }
            prev = now;
            std::thread::sleep(INTERVAL.saturating_sub(started.elapsed()));
        }
    }

    fn write(
        &self,
        p: &WorkloadPort,
        kind: Kind,
        state: &'static str,
        rate: Option<f64>,
        limit: &str,
    ) {
        let rec = AnomalyRecord {
            time: jiff::Timestamp::now().to_string(),
            node: self.node.clone(),
            verdict: "anomaly",
            kind,
            state,
            workload: format!("{}/{}", p.namespace, p.pod),
            network: p.network.clone(),
            interface: p.interface.clone(),
            rate: rate.map(|r| (r * 10.0).round() / 10.0),
            limit: limit.to_string(),
        };
        tracing::warn!(workload = %rec.workload, interface = %rec.interface, kind = kind.as_str(), state, "anomaly");
        if let (Ok(mut line), Ok(mut out)) = (serde_json::to_vec(&rec), self.sink.lock()) {
            line.push(b'\n');
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_crds::Limits;

    fn port(limits: Limits) -> WorkloadPort {
        WorkloadPort {
            host_ifname: "wf1".into(),
            namespace: "prod".into(),
            pod: "web".into(),
            network: "nat".into(),
            interface: "eth0".into(),
            ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            limits,
        }
    }

    fn samples(edit: impl Fn(&mut Sample, u64)) -> (Sample, Sample) {
        let t0 = Instant::now();
        let mut a = Sample {
            at: Some(t0),
            ..Sample::default()
        };
        let mut b = Sample {
            at: Some(t0 + Duration::from_secs(2)),
            ..Sample::default()
        };
        edit(&mut a, 0);
        edit(&mut b, 1);
        (a, b)
    }

    #[test]
    fn limit_drops_are_crossings_named_by_their_limits() {
        let p = port(Limits {
            max_connections: Some(100),
            conntrack_entries: Some(500),
            ..Limits::default()
        });
        let (a, b) = samples(|s, i| {
            s.limit_out.insert("fd00::5".parse().unwrap(), 10 + 30 * i);
            s.limit_in.insert("10.0.0.5".parse().unwrap(), 7);
        });
        let c = detect(&a, &b, &[p], &Thresholds::default());
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].kind, Kind::ConnectionLimit);
        assert_eq!(c[0].rate, 15.0);
        assert_eq!(
            c[0].limit,
            "100 concurrent connections, 500 conntrack entries"
        );
    }

    #[test]
    fn rates_cross_only_the_administrator_s_thresholds() {
        let p = port(Limits::default());
        let (a, b) = samples(|s, i| {
            s.packets.insert("wf1".into(), 1000 + 5000 * i);
            s.conns_in.insert("10.0.0.5".parse().unwrap(), 100 * i);
            s.conns_out.insert("10.0.0.5".parse().unwrap(), 50 * i);
        });
        assert!(detect(&a, &b, std::slice::from_ref(&p), &Thresholds::default()).is_empty());
        let t = Thresholds {
            packets_per_second: Some(2000),
            connections_per_second: Some(100),
        };
        let kinds: Vec<Kind> = detect(&a, &b, std::slice::from_ref(&p), &t)
            .into_iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(kinds, [Kind::PacketRate]);
        let t = Thresholds {
            packets_per_second: Some(3000),
            connections_per_second: Some(50),
        };
        let kinds: Vec<Kind> = detect(&a, &b, &[p], &t)
            .into_iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(kinds, [Kind::ConnectionRate]);
    }

    #[test]
    fn a_shaper_at_work_is_a_bandwidth_crossing_and_a_new_link_is_not() {
        let p = port(Limits {
            egress_bps: Some(10_000_000),
            ..Limits::default()
        });
        let (a, b) = samples(|s, i| {
            s.shaped.insert("wf1".into(), 3 + 40 * i);
        });
        let c = detect(&a, &b, std::slice::from_ref(&p), &Thresholds::default());
        assert_eq!(c[0].kind, Kind::Bandwidth);
        assert_eq!(c[0].limit, "10000000 bit/s out");
        // A link first seen in the second sample has no difference to report.
        let (a, b) = samples(|s, i| {
            if i == 1 {
                s.shaped.insert("wf1".into(), 400);
                s.packets.insert("wf1".into(), 1_000_000);
            }
        });
        let t = Thresholds {
            packets_per_second: Some(1),
            ..Thresholds::default()
        };
        assert!(detect(&a, &b, &[p], &t).is_empty());
    }
}

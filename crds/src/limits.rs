//! Per-workload limits: bandwidth each way, new connections per second, concurrent connections
//! and connection-tracking entries.
//!
//! A Network's `spec.limits` applies to every workload interface on it; a pod (a VM's launcher
//! pod) may set a lower limit with annotations ([`INGRESS_BANDWIDTH_ANNOTATION`] and the others
//! of [`ANNOTATIONS`]), never a higher one: the Network's limits are the administrator's
//! ceiling, the annotations the workload owner's choice below it. Without a Network limit an
//! annotation applies alone. [`Limits::tightest`] combines them.
//!
//! Bandwidth values are Kubernetes quantities in bits per second (`10M`, `1G`, `500k`), as the
//! standard `kubernetes.io/ingress-bandwidth` annotation has them, 1k to 1P.

use crate::cel;
use crate::validate::Errors;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Traffic into the pod (bits per second), the standard annotation the Kubernetes `bandwidth`
/// CNI plugin reads.
pub const INGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/ingress-bandwidth";
/// Traffic out of the pod (bits per second).
pub const EGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";
/// New connections the pod may open per second.
pub const NEW_CONNECTIONS_ANNOTATION: &str = "weft.dev/new-connections-per-second";
/// Connections the pod may have open at once (those it opened).
pub const MAX_CONNECTIONS_ANNOTATION: &str = "weft.dev/max-connections";
/// Entries of the node's connection-tracking table the pod may hold, both directions.
pub const CONNTRACK_ANNOTATION: &str = "weft.dev/conntrack-entries";

/// `"true"`: a SYN proxy for the pod's TCP host ports.
pub const SYN_PROXY_ANNOTATION: &str = "weft.dev/syn-proxy";
/// The maximum segment size the SYN proxy of the pod's host ports announces, 536 to 65495
/// (default: the Network's MTU less the IP and TCP headers).
pub const SYN_PROXY_MSS_ANNOTATION: &str = "weft.dev/syn-proxy-mss";
/// The window scale the SYN proxy of the pod's host ports announces, 0 to 14 (default 7).
pub const SYN_PROXY_WINDOW_SCALE_ANNOTATION: &str = "weft.dev/syn-proxy-window-scale";

/// Every annotation a limit is read from.
pub const ANNOTATIONS: [&str; 8] = [
    INGRESS_BANDWIDTH_ANNOTATION,
    EGRESS_BANDWIDTH_ANNOTATION,
    NEW_CONNECTIONS_ANNOTATION,
    MAX_CONNECTIONS_ANNOTATION,
    CONNTRACK_ANNOTATION,
    SYN_PROXY_ANNOTATION,
    SYN_PROXY_MSS_ANNOTATION,
    SYN_PROXY_WINDOW_SCALE_ANNOTATION,
];

/// The lowest bandwidth limit, bits per second (as the Kubernetes bandwidth annotations).
pub const MIN_BANDWIDTH: u64 = 1_000;
/// The highest bandwidth limit, bits per second (1P, as the Kubernetes bandwidth annotations).
pub const MAX_BANDWIDTH: u64 = 1_000_000_000_000_000;
/// The most new connections per second a limit can allow.
pub const MAX_NEW_CONNECTIONS_PER_SECOND: i32 = 1_000_000;
/// The most concurrent connections or connection-tracking entries a limit can allow.
pub const MAX_CONNECTIONS: i32 = 16_777_216;

/// Pattern of a bandwidth quantity: a decimal number with an optional SI or binary suffix.
pub const BANDWIDTH_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$";

/// Limits on each workload interface of a Network.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadLimits {
    /// Traffic into each workload interface, in bits per second as a Kubernetes quantity
    /// (`100M`, `1G`), 1k to 1P. Shaped on the node (a token bucket on the host port). A pod's
    /// `kubernetes.io/ingress-bandwidth` annotation may set a lower value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 24), pattern(BANDWIDTH_PATTERN))]
    #[x_kube(validation = &cel::BANDWIDTH_RANGE)]
    pub ingress_bandwidth: Option<String>,

    /// Traffic out of each workload interface, bits per second, like ingressBandwidth; a pod's
    /// `kubernetes.io/egress-bandwidth` annotation may set a lower value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 24), pattern(BANDWIDTH_PATTERN))]
    #[x_kube(validation = &cel::BANDWIDTH_RANGE)]
    pub egress_bandwidth: Option<String>,

    /// How the egress limit is enforced: `Shape` (default) or `Police` (see
    /// [`EgressBandwidthMode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_bandwidth_mode: Option<EgressBandwidthMode>,

    /// New connections (TCP, UDP, SCTP, ICMP flows) a workload address may open per second,
    /// in bursts of as many, 1 to 1000000; the ones above are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub new_connections_per_second: Option<i32>,

    /// Connections a workload address may have open at once that it opened, 1 to 16777216;
    /// new ones above are dropped until some close.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_connections: Option<i32>,

    /// Entries of the node's connection-tracking table a workload address may hold, its
    /// connections in both directions (an inbound flood's included), 1 to 16777216: no
    /// workload can fill the node's table and break NAT for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub conntrack_entries: Option<i32>,

    /// A SYN proxy for each workload's TCP host ports (a pod's `hostPort`, the runtime's
    /// `portMappings`): the node answers SYNs with cookies and only a client that completes the
    /// handshake reaches the workload. Needs the agent's `--syn-proxy` (chart value
    /// `agent.synProxy`). A pod may turn it on with the annotation `weft.dev/syn-proxy: "true"`,
    /// never off. PortForwards have their own `spec.synProxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_proxy: Option<bool>,
}

/// How the egress limit (egressBandwidth, a pod's `kubernetes.io/egress-bandwidth`, the
/// runtime's egress rate) is enforced. `Shape` (the default): a token bucket on the node
/// queues the workload's traffic to the rate (the host port's frames are redirected through
/// a link of their own). `Police`: frames over the rate are dropped at the host port (an
/// nftables meter per port), as OVS ingress policing does; a workload's start costs one set
/// element instead of a link and its qdiscs, and TCP finds the rate by its losses. The meter
/// holds one second of traffic at the rate plus the burst.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum EgressBandwidthMode {
    /// Queued to the rate by a token bucket on the node.
    #[default]
    Shape,
    /// Dropped over the rate at the host port.
    Police,
}

/// Effective limits of one workload interface, every value in range; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Limits {
    /// Into the workload, bits per second.
    pub ingress_bps: Option<u64>,
    /// Out of the workload, bits per second.
    pub egress_bps: Option<u64>,
    /// New connections per second.
    pub new_connections_per_second: Option<u32>,
    /// Concurrent connections it opened.
    pub max_connections: Option<u32>,
    /// Connection-tracking entries, both directions.
    pub conntrack_entries: Option<u32>,
    /// A SYN proxy for its TCP host ports.
    pub syn_proxy: bool,
    /// The MSS that proxy announces, when not the default.
    pub syn_mss: Option<u16>,
    /// The window scale that proxy announces, when not the default.
    pub syn_window_scale: Option<u8>,
    /// The egress limit is policed, not shaped (the Network's `egressBandwidthMode`).
    pub egress_policed: bool,
}

/// The connection limits of [`Limits`] (what nftables enforces), without the bandwidth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionLimits {
    /// New connections per second.
    pub new_per_second: Option<u32>,
    /// Concurrent connections it opened.
    pub concurrent: Option<u32>,
    /// Connection-tracking entries, both directions.
    pub conntrack: Option<u32>,
}

impl ConnectionLimits {
    /// No connection limit at all.
    pub fn is_none(&self) -> bool {
        *self == ConnectionLimits::default()
    }
}

impl Limits {
    /// Nothing limited (how an egress limit would be enforced is no limit).
    pub fn is_none(&self) -> bool {
        Limits {
            egress_policed: false,
            ..*self
        } == Limits::default()
    }

    /// An egress limit enforced by a meter (its Network polices egress limits).
    pub fn polices_egress(&self) -> bool {
        self.egress_bps.is_some() && self.egress_policed
    }

    /// An egress limit enforced by a shaper (its Network shapes egress limits, the default).
    pub fn shapes_egress(&self) -> bool {
        self.egress_bps.is_some() && !self.egress_policed
    }

    /// The connection limits.
    pub fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            new_per_second: self.new_connections_per_second,
            concurrent: self.max_connections,
            conntrack: self.conntrack_entries,
        }
    }

    /// The lower of each limit (a limit set on one side only applies alone).
    pub fn tightest(self, other: Limits) -> Limits {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Limits {
            ingress_bps: min(self.ingress_bps, other.ingress_bps),
            egress_bps: min(self.egress_bps, other.egress_bps),
            new_connections_per_second: min(
                self.new_connections_per_second,
                other.new_connections_per_second,
            ),
            max_connections: min(self.max_connections, other.max_connections),
            conntrack_entries: min(self.conntrack_entries, other.conntrack_entries),
            syn_proxy: self.syn_proxy || other.syn_proxy,
            // Set by the pod alone (what its own TCP stack announces).
            syn_mss: other.syn_mss.or(self.syn_mss),
            syn_window_scale: other.syn_window_scale.or(self.syn_window_scale),
            // Set by the Network alone.
            egress_policed: self.egress_policed || other.egress_policed,
        }
    }

    /// The limits a pod's annotations set (others are ignored). The error names the
    /// annotation, what is wrong and the fix.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Limits, String> {
        let get = |key: &str| annotations.get(key).map(|v| v.trim());
        let bandwidth = |key: &str| -> Result<Option<u64>, String> {
            get(key)
                .map(|v| bandwidth_bps(v).map_err(|e| format!("annotation {key}: {e}")))
                .transpose()
        };
        let count = |key: &str, max: i32| -> Result<Option<u32>, String> {
            get(key)
                .map(|v| {
                    v.parse::<u32>()
                        .ok()
                        .filter(|n| (1..=max.unsigned_abs()).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "annotation {key}: {v:?} is not a whole number from 1 to {max}; write one, e.g. \"100\", or remove the annotation"
                            )
                        })
                })
                .transpose()
        };
        let in_range = |key: &str,
                        min: i32,
                        max: i32,
                        example: &str|
         -> Result<Option<i32>, String> {
            get(key)
                .map(|v| {
                    v.parse::<i32>()
                        .ok()
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "annotation {key}: {v:?} is not a whole number from {min} to {max}; write one, e.g. \"{example}\", or remove the annotation"
                            )
                        })
                })
                .transpose()
        };
        Ok(Limits {
            ingress_bps: bandwidth(INGRESS_BANDWIDTH_ANNOTATION)?,
            egress_bps: bandwidth(EGRESS_BANDWIDTH_ANNOTATION)?,
            new_connections_per_second: count(
                NEW_CONNECTIONS_ANNOTATION,
                MAX_NEW_CONNECTIONS_PER_SECOND,
            )?,
            max_connections: count(MAX_CONNECTIONS_ANNOTATION, MAX_CONNECTIONS)?,
            conntrack_entries: count(CONNTRACK_ANNOTATION, MAX_CONNECTIONS)?,
            syn_proxy: match get(SYN_PROXY_ANNOTATION) {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => {
                    return Err(format!(
                        "annotation {SYN_PROXY_ANNOTATION}: {v:?} is neither \"true\" nor \"false\"; write \"true\" for a SYN proxy on the pod's TCP host ports, or remove the annotation"
                    ));
                }
            },
            syn_mss: in_range(
                SYN_PROXY_MSS_ANNOTATION,
                crate::portforward::MIN_SYN_PROXY_MSS,
                crate::portforward::MAX_SYN_PROXY_MSS,
                "1460",
            )?
            .and_then(|v| u16::try_from(v).ok()),
            syn_window_scale: in_range(
                SYN_PROXY_WINDOW_SCALE_ANNOTATION,
                0,
                crate::portforward::MAX_WINDOW_SCALE,
                "7",
            )?
            .and_then(|v| u8::try_from(v).ok()),
            egress_policed: false,
        })
    }
}

/// A bandwidth quantity (`10M`, `1.5G`, `512Ki`) in bits per second, 1k to 1P.
pub fn bandwidth_bps(value: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{value:?} is not a bandwidth; write bits per second as a Kubernetes quantity from 1k to 1P, e.g. \"10M\" or \"1G\""
        )
    };
    let parsed: kube_quantity::ParsedQuantity = value.try_into().map_err(|_| bad())?;
    // A quantity Kubernetes accepts but weft's pattern does not (`1e6`, `100m`) is refused
    // too, so the annotation and the Network field take the same values.
    if !value
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        || !matches!(
            value.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'),
            "" | "k" | "M" | "G" | "T" | "P" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi"
        )
    {
        return Err(bad());
    }
    // The integer conversions truncate the number before scaling it ("1.5G" would be 1G);
    // every value in range is exact in an f64 (below 2^53).
    let bps = parsed
        .to_bytes_f64()
        .filter(|b| b.is_finite())
        .ok_or_else(bad)?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bps = bps.round() as u64;
    if !(MIN_BANDWIDTH..=MAX_BANDWIDTH).contains(&bps) || parsed.to_bytes_f64() > Some(1e15) {
        return Err(format!(
            "{value:?} is out of range; use 1k to 1P bits per second, e.g. \"10M\""
        ));
    }
    Ok(bps)
}

impl WorkloadLimits {
    /// The limits, if every value is valid (see [`WorkloadLimits::validate`]).
    pub fn limits(&self) -> Option<Limits> {
        let bandwidth = |v: &Option<String>| match v {
            Some(v) => bandwidth_bps(v).ok().map(Some),
            None => Some(None),
        };
        let count = |v: Option<i32>, max: i32| match v {
            Some(n) if (1..=max).contains(&n) => Some(Some(n.unsigned_abs())),
            Some(_) => None,
            None => Some(None),
        };
        Some(Limits {
            ingress_bps: bandwidth(&self.ingress_bandwidth)?,
            egress_bps: bandwidth(&self.egress_bandwidth)?,
            new_connections_per_second: count(
                self.new_connections_per_second,
                MAX_NEW_CONNECTIONS_PER_SECOND,
            )?,
            max_connections: count(self.max_connections, MAX_CONNECTIONS)?,
            conntrack_entries: count(self.conntrack_entries, MAX_CONNECTIONS)?,
            syn_proxy: self.syn_proxy.unwrap_or(false),
            egress_policed: self.egress_bandwidth_mode == Some(EgressBandwidthMode::Police),
            ..Limits::default()
        })
    }

    /// Checks every value; errors name the field under `path` (`spec.limits`).
    pub(crate) fn validate(&self, path: &str, errors: &mut Errors) {
        for (field, v) in [
            ("ingressBandwidth", &self.ingress_bandwidth),
            ("egressBandwidth", &self.egress_bandwidth),
        ] {
            if let Some(v) = v
                && let Err(e) = bandwidth_bps(v)
            {
                errors.push(format!("{path}.{field}"), e);
            }
        }
        for (field, v, max) in [
            (
                "newConnectionsPerSecond",
                self.new_connections_per_second,
                MAX_NEW_CONNECTIONS_PER_SECOND,
            ),
            ("maxConnections", self.max_connections, MAX_CONNECTIONS),
            ("conntrackEntries", self.conntrack_entries, MAX_CONNECTIONS),
        ] {
            if let Some(n) = v
                && !(1..=max).contains(&n)
            {
                errors.push(
                    format!("{path}.{field}"),
                    format!("{n} is out of range; use 1 to {max}, or leave it out for no limit"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn bandwidths_are_quantities_in_bits_per_second() {
        assert_eq!(bandwidth_bps("10M"), Ok(10_000_000));
        assert_eq!(bandwidth_bps("1.5G"), Ok(1_500_000_000));
        assert_eq!(bandwidth_bps("1k"), Ok(1_000));
        assert_eq!(bandwidth_bps("512Ki"), Ok(524_288));
        assert_eq!(bandwidth_bps("1P"), Ok(MAX_BANDWIDTH));
        for bad in [
            "", "fast", "10 M", "-5M", "999", "2P", "100m", "1e6", "10MB", "10Mbit",
        ] {
            let e = bandwidth_bps(bad).unwrap_err();
            assert!(e.contains("1k") && e.contains("1P"), "{bad}: {e}");
        }
    }

    #[test]
    fn annotations_name_themselves_in_errors_and_other_keys_are_ignored() {
        let l = Limits::from_annotations(&annotations(&[
            (INGRESS_BANDWIDTH_ANNOTATION, "20M"),
            (MAX_CONNECTIONS_ANNOTATION, " 500 "),
            ("weft.dev/networks", "nat"),
        ]))
        .unwrap();
        assert_eq!(l.ingress_bps, Some(20_000_000));
        assert_eq!(l.max_connections, Some(500));
        assert_eq!(l.egress_bps, None);
        for (key, value) in [
            (EGRESS_BANDWIDTH_ANNOTATION, "lots"),
            (NEW_CONNECTIONS_ANNOTATION, "0"),
            (CONNTRACK_ANNOTATION, "-1"),
            (MAX_CONNECTIONS_ANNOTATION, "99999999999"),
            (SYN_PROXY_ANNOTATION, "yes"),
            (SYN_PROXY_MSS_ANNOTATION, "535"),
            (SYN_PROXY_MSS_ANNOTATION, "65496"),
            (SYN_PROXY_WINDOW_SCALE_ANNOTATION, "15"),
            (SYN_PROXY_WINDOW_SCALE_ANNOTATION, "-1"),
        ] {
            let e = Limits::from_annotations(&annotations(&[(key, value)])).unwrap_err();
            assert!(e.starts_with(&format!("annotation {key}:")), "{e}");
        }
    }

    #[test]
    fn the_tighter_of_two_limits_wins_and_one_side_alone_applies() {
        let network = Limits {
            ingress_bps: Some(100),
            conntrack_entries: Some(1000),
            ..Limits::default()
        };
        let pod = Limits {
            ingress_bps: Some(500),
            egress_bps: Some(50),
            conntrack_entries: Some(10),
            ..Limits::default()
        };
        let t = network.tightest(pod);
        assert_eq!(t.ingress_bps, Some(100), "a pod cannot raise the Network's");
        assert_eq!(t.egress_bps, Some(50));
        assert_eq!(t.conntrack_entries, Some(10));
        assert_eq!(t.max_connections, None);
        assert_eq!(t, pod.tightest(network));
        // A SYN proxy is on when either side turns it on; a pod cannot turn it off.
        let proxied = Limits {
            syn_proxy: true,
            ..Limits::default()
        };
        assert!(proxied.tightest(pod).syn_proxy && pod.tightest(proxied).syn_proxy);
        let off = Limits::from_annotations(&annotations(&[(SYN_PROXY_ANNOTATION, "false")]));
        assert!(proxied.tightest(off.unwrap()).syn_proxy);
        assert!(
            Limits::from_annotations(&annotations(&[(SYN_PROXY_ANNOTATION, "true")]))
                .unwrap()
                .syn_proxy
        );
        // The proxy's options are the pod's alone.
        let options = Limits::from_annotations(&annotations(&[
            (SYN_PROXY_MSS_ANNOTATION, "1400"),
            (SYN_PROXY_WINDOW_SCALE_ANNOTATION, "0"),
        ]))
        .unwrap();
        assert_eq!(
            (options.syn_mss, options.syn_window_scale),
            (Some(1400), Some(0))
        );
        let both = proxied.tightest(options);
        assert!(both.syn_proxy);
        assert_eq!((both.syn_mss, both.syn_window_scale), (Some(1400), Some(0)));
    }

    #[test]
    fn network_limits_are_checked_field_by_field() {
        let l = WorkloadLimits {
            ingress_bandwidth: Some("1G".into()),
            egress_bandwidth: Some("1Gbit".into()),
            max_connections: Some(0),
            ..WorkloadLimits::default()
        };
        assert_eq!(l.limits(), None);
        let mut errors = Errors::default();
        l.validate("spec.limits", &mut errors);
        let errors = errors.finish().unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.limits.egressBandwidth", "spec.limits.maxConnections"]
        );
        let ok = WorkloadLimits {
            ingress_bandwidth: Some("1G".into()),
            new_connections_per_second: Some(50),
            ..WorkloadLimits::default()
        };
        assert_eq!(
            ok.limits(),
            Some(Limits {
                ingress_bps: Some(1_000_000_000),
                new_connections_per_second: Some(50),
                ..Limits::default()
            })
        );
    }
}

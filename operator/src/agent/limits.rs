//! The limits of each workload interface on this node: its Network's `spec.limits`, lowered by
//! its pod's annotations (see [`weft_crds::limits`]) and by the bandwidth the runtime asked
//! for (the CNI `bandwidth` capability). The connection limits become elements of the
//! firewall's limit classes (`firewall::limits`), the bandwidth a token bucket on the host port
//! (the mirror task keeps the port's tc, `mirror::MirrorPlan::shaping`), or, for the egress
//! limits of a Network with `egressBandwidthMode: Police`, a meter in the guard table
//! (`guard::Policing`).

use crate::model::Resources;
use std::collections::{BTreeMap, HashMap};
use weft_crds::limits::Limits;
use weft_dataplane::netlink::Shaping;
use weft_dataplane::proto::{Endpoint, Rate};

/// The burst a bandwidth limit allows when the runtime gave none: 20 ms of traffic at the
/// rate, at least 32 KiB (a token bucket needs room for a few full frames).
pub fn default_burst_bits(bits_per_second: u64) -> u64 {
    (bits_per_second / 50).max(32 * 1024 * 8)
}

/// Endpoint `e`'s limits, and what is wrong with its pod's annotations if anything is (the
/// Network's limits and the runtime's then apply alone: a bad annotation never lifts a limit).
pub fn of(res: &Resources, e: &Endpoint) -> (Limits, Option<String>) {
    let network = res
        .networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(e.network.as_str()))
        .and_then(|n| n.spec.limits.as_ref())
        .and_then(weft_crds::WorkloadLimits::limits)
        .unwrap_or_default();
    let pod = match (&e.pod_namespace, &e.pod_name) {
        (Some(ns), Some(name)) => res
            .workloads
            .iter()
            .find(|w| &w.namespace == ns && &w.name == name)
            .map(|w| &w.limits),
        _ => None,
    };
    combined(network, pod, e)
}

/// From how many endpoints a pass looks their limits up in a [`Lookup`] rather than searching
/// the lists for each.
const LOOKUP_FROM: usize = 4;

/// The Networks' limits and the pods' annotations by name, for a pass over many endpoints
/// (which [`of`] would search the lists for, endpoint by endpoint).
struct Lookup<'a> {
    networks: HashMap<&'a str, Limits>,
    pods: HashMap<(&'a str, &'a str), &'a BTreeMap<String, String>>,
}

impl<'a> Lookup<'a> {
    fn new(res: &'a Resources) -> Self {
        let mut networks = HashMap::new();
        for n in &res.networks {
            if let Some(name) = n.metadata.name.as_deref() {
                // The first of a name, as `of` finds it.
                networks.entry(name).or_insert_with(|| {
                    n.spec
                        .limits
                        .as_ref()
                        .and_then(weft_crds::WorkloadLimits::limits)
                        .unwrap_or_default()
                });
            }
        }
        let mut pods = HashMap::new();
        for w in &res.workloads {
            pods.entry((w.namespace.as_str(), w.name.as_str()))
                .or_insert(&w.limits);
        }
        Lookup { networks, pods }
    }

    /// [`of`], looked up.
    fn of(&self, e: &Endpoint) -> (Limits, Option<String>) {
        let network = self
            .networks
            .get(e.network.as_str())
            .copied()
            .unwrap_or_default();
        let pod = match (&e.pod_namespace, &e.pod_name) {
            (Some(ns), Some(name)) => self.pods.get(&(ns.as_str(), name.as_str())).copied(),
            _ => None,
        };
        combined(network, pod, e)
    }
}

/// The tightest of the Network's limits, the runtime's (endpoint `e`'s bandwidth) and the
/// pod's annotations (`pod`).
fn combined(
    network: Limits,
    pod: Option<&BTreeMap<String, String>>,
    e: &Endpoint,
) -> (Limits, Option<String>) {
    let runtime = e.bandwidth.map_or_else(Limits::default, |b| Limits {
        ingress_bps: b.ingress.map(|r| r.bits_per_second),
        egress_bps: b.egress.map(|r| r.bits_per_second),
        ..Limits::default()
    });
    match pod.map(Limits::from_annotations) {
        Some(Ok(annotated)) => (network.tightest(runtime).tightest(annotated), None),
        Some(Err(problem)) => (network.tightest(runtime), Some(problem)),
        None => (network.tightest(runtime), None),
    }
}

/// The burst containerd's CRI passes with every rate of the bandwidth annotations:
/// 2^32 - 1 bits, about 512 MiB, which it uses because the annotations have no burst
/// ("can't set burst currently"). Taken as given, it would let a workload send half a gigabyte
/// at full speed before its limit applies: weft takes it as no burst given.
pub const UNSET_RUNTIME_BURST_BITS: u64 = u32::MAX as u64;

/// Endpoint `e`'s bandwidth limits, into and out of the workload, with their bursts: the
/// runtime's burst for the runtime's rate; a default one for a lower rate, and for the
/// runtimes' placeholder. And whether its egress limit is policed, not shaped.
fn rates(limits: (Limits, Option<String>), e: &Endpoint) -> (Option<Rate>, Option<Rate>, bool) {
    let (limits, _) = limits;
    let rate = |bps: Option<u64>, asked: Option<Rate>| {
        bps.map(|bits_per_second| Rate {
            bits_per_second,
            burst_bits: asked
                .filter(|r| {
                    r.bits_per_second == bits_per_second
                        && r.burst_bits > 0
                        && r.burst_bits != UNSET_RUNTIME_BURST_BITS
                })
                .map_or_else(|| default_burst_bits(bits_per_second), |r| r.burst_bits),
        })
    };
    (
        rate(limits.ingress_bps, e.bandwidth.and_then(|b| b.ingress)),
        rate(limits.egress_bps, e.bandwidth.and_then(|b| b.egress)),
        limits.egress_policed,
    )
}

/// The shaping of every host port with a bandwidth limit, by port name (an egress limit its
/// Network polices is not shaped: see [`policing`]).
pub fn shaping<'a>(
    res: &Resources,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> BTreeMap<String, Shaping> {
    let lookup = Lookup::new(res);
    let mut out = BTreeMap::new();
    for e in endpoints {
        let (ingress, egress, policed) = rates(lookup.of(e), e);
        let shaping = Shaping {
            ingress,
            egress: egress.filter(|_| !policed),
        };
        if shaping != Shaping::default() {
            out.insert(e.host_ifname.clone(), shaping);
        }
    }
    out
}

/// The egress rate of every host port whose Network polices egress limits, by port name
/// (the guard table's meters, `guard::Policing`).
pub fn policing<'a>(
    res: &Resources,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> BTreeMap<String, Rate> {
    let endpoints: Vec<&Endpoint> = endpoints.into_iter().collect();
    // A registration's few endpoints are found in the lists; a whole node's, looked up.
    let lookup = (endpoints.len() > LOOKUP_FROM).then(|| Lookup::new(res));
    endpoints
        .into_iter()
        .filter_map(
            |e| match rates(lookup.as_ref().map_or_else(|| of(res, e), |l| l.of(e)), e) {
                (_, Some(egress), true) => Some((e.host_ifname.clone(), egress)),
                _ => None,
            },
        )
        .collect()
}

/// The limits of the realized Networks themselves (`spec.limits`, where valid).
pub fn of_networks<'a>(
    res: &'a Resources,
    realized: &'a dyn Fn(&str) -> bool,
) -> impl Iterator<Item = Limits> + 'a {
    res.networks
        .iter()
        .filter(move |n| n.metadata.name.as_deref().is_some_and(realized))
        .filter_map(|n| n.spec.limits.as_ref())
        .filter_map(weft_crds::WorkloadLimits::limits)
}

/// The egress rates of the Networks that police them, with the default burst: their meters
/// stay in the guard table while the Network does, so that its workloads coming and going
/// change set elements only (see [`super::guard::Policing::standing`]).
pub fn standing_police_rates(
    res: &Resources,
    realized: &dyn Fn(&str) -> bool,
) -> std::collections::BTreeSet<Rate> {
    of_networks(res, realized)
        .filter(|l| l.egress_policed)
        .filter_map(|l| l.egress_bps)
        .map(|bits_per_second| Rate {
            bits_per_second,
            burst_bits: default_burst_bits(bits_per_second),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::WorkloadMeta;
    use weft_crds::limits::{CONNTRACK_ANNOTATION, INGRESS_BANDWIDTH_ANNOTATION};

    fn resources(limits: &str, annotations: &[(&str, &str)]) -> Resources {
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {{name: nat}}\nspec: {{mode: NAT, subnets: [10.1.0.0/16], limits: {limits}}}\n"
        );
        let mut res = Resources::default();
        res.networks
            .push(serde_saphyr::from_str::<weft_crds::Network>(&yaml).unwrap());
        res.workloads.push(WorkloadMeta {
            namespace: "prod".into(),
            name: "web".into(),
            labels: BTreeMap::new(),
            networks: None,
            limits: annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        });
        res
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            network: "nat".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_ifname: "wf0123456789a".into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec!["10.1.0.5".parse().unwrap()],
            pod_namespace: Some("prod".into()),
            pod_name: Some("web".into()),
            netns: None,
            vm: None,
            pending: false,
            vlan_trunk: vec![],
            port_mappings: vec![],
            bandwidth: None,
        }
    }

    #[test]
    fn a_pod_lowers_its_network_s_limits_and_cannot_raise_them() {
        let res = resources(
            "{ingressBandwidth: 100M, conntrackEntries: 1000}",
            &[
                (INGRESS_BANDWIDTH_ANNOTATION, "1G"),
                (CONNTRACK_ANNOTATION, "50"),
            ],
        );
        let (l, problem) = of(&res, &endpoint());
        assert_eq!(problem, None);
        assert_eq!(l.ingress_bps, Some(100_000_000));
        assert_eq!(l.conntrack_entries, Some(50));
    }

    #[test]
    fn a_bad_annotation_is_reported_and_the_network_s_limits_still_apply() {
        let res = resources(
            "{maxConnections: 10}",
            &[(INGRESS_BANDWIDTH_ANNOTATION, "fast")],
        );
        let (l, problem) = of(&res, &endpoint());
        assert_eq!(l.max_connections, Some(10));
        assert_eq!(l.ingress_bps, None);
        let problem = problem.unwrap();
        assert!(
            problem.starts_with("annotation kubernetes.io/ingress-bandwidth:"),
            "{problem}"
        );
    }

    #[test]
    fn the_runtime_s_bandwidth_is_a_limit_too_with_its_burst() {
        let res = resources("{egressBandwidth: 10M}", &[]);
        let mut e = endpoint();
        e.bandwidth = Some(weft_dataplane::proto::Bandwidth {
            ingress: Some(Rate {
                bits_per_second: 5_000_000,
                burst_bits: 800_000,
            }),
            egress: Some(Rate {
                bits_per_second: 20_000_000,
                burst_bits: 800_000,
            }),
        });
        let s = shaping(&res, &[e]);
        let s = s.get("wf0123456789a").unwrap();
        assert_eq!(
            s.ingress,
            Some(Rate {
                bits_per_second: 5_000_000,
                burst_bits: 800_000
            })
        );
        // The Network's lower rate, with a burst of its own.
        assert_eq!(
            s.egress,
            Some(Rate {
                bits_per_second: 10_000_000,
                burst_bits: default_burst_bits(10_000_000)
            })
        );
    }

    #[test]
    fn the_burst_containerd_passes_for_the_annotations_is_no_burst() {
        let res = resources("{}", &[]);
        let mut e = endpoint();
        e.bandwidth = Some(weft_dataplane::proto::Bandwidth {
            ingress: Some(Rate {
                bits_per_second: 10_000_000,
                burst_bits: UNSET_RUNTIME_BURST_BITS,
            }),
            egress: None,
        });
        let s = shaping(&res, &[e]);
        assert_eq!(
            s.get("wf0123456789a").unwrap().ingress,
            Some(Rate {
                bits_per_second: 10_000_000,
                burst_bits: default_burst_bits(10_000_000)
            })
        );
    }

    /// The pass over many endpoints finds the limits `of` finds, endpoint by endpoint: the
    /// Network's (the first of its name), the pod's annotations, a bad annotation's problem,
    /// an unknown pod or Network.
    #[test]
    fn the_lookup_finds_what_the_search_finds() {
        let mut res = resources("{ingressBandwidth: 100M}", &[(CONNTRACK_ANNOTATION, "50")]);
        let mut shadow = res.networks[0].clone();
        shadow.spec.limits = None;
        res.networks.push(shadow);
        let mut bad = res.workloads[0].clone();
        bad.name = "bad".into();
        bad.limits = BTreeMap::from([(INGRESS_BANDWIDTH_ANNOTATION.to_string(), "fast".into())]);
        res.workloads.push(bad);
        let lookup = Lookup::new(&res);
        let mut endpoints = Vec::new();
        for (pod, network) in [
            ("web", "nat"),
            ("bad", "nat"),
            ("gone", "nat"),
            ("web", "other"),
        ] {
            let mut e = endpoint();
            e.pod_name = Some(pod.into());
            e.network = network.into();
            endpoints.push(e);
        }
        let mut e = endpoint();
        e.pod_namespace = None;
        endpoints.push(e);
        for e in &endpoints {
            assert_eq!(
                lookup.of(e),
                of(&res, e),
                "{:?} on {}",
                e.pod_name,
                e.network
            );
        }
        assert_eq!(lookup.of(&endpoints[0]).0.ingress_bps, Some(100_000_000));
        assert!(lookup.of(&endpoints[1]).1.is_some());
    }

    #[test]
    fn ports_without_bandwidth_limits_are_not_shaped() {
        let res = resources("{maxConnections: 10}", &[]);
        assert!(shaping(&res, &[endpoint()]).is_empty());
    }
}

//! `TrafficMirror` (namespaced, short name `wtm`): copies of the frames of selected workloads'
//! weft interfaces, sent to an analyzer workload on the same node or to a remote collector
//! through a VXLAN tunnel.

use crate::cel;
use crate::cidr::{Cidr, IpAddress, parse_cidr, parse_ip};
use crate::portforward::PortRange;
use crate::validate::{
    DNS1123_SUBDOMAIN_PATTERN, Errors, FieldError, check_selector, is_dns1123_subdomain,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Kind of [`TrafficMirror`].
pub const TRAFFIC_MIRROR_KIND: &str = "TrafficMirror";
/// Most entries in `spec.filter.ports`.
pub const MAX_MIRROR_PORTS: usize = 16;
/// Most entries in `spec.filter.cidrs`.
pub const MAX_MIRROR_CIDRS: usize = 16;
/// The VXLAN port IANA assigned, the default of `spec.destination.remote.port`.
pub const VXLAN_PORT: u16 = 4789;

/// Copies the traffic of selected workloads (pods and VMs) to an analyzer: a workload on the
/// same node (an IDS, an EDR sensor, a packet recorder), whose weft interface receives the
/// copies, or a remote collector that receives them in a VXLAN tunnel. The copies are taken on
/// the node, on the workload's host port, for veth and VM tap alike, and follow the workload
/// wherever it runs.
// The printcolumn(...) lists repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficMirror",
    namespaced,
    shortname = "wtm",
    status = "TrafficMirrorStatus",
    derive = "PartialEq",
    doc = "A weft traffic mirror (weft.dev/v1alpha1): copies of selected workloads' frames, sent to an analyzer workload on the same node or to a remote collector over VXLAN.",
    printcolumn(name = "Direction", type_ = "string", json_path = ".spec.direction"),
    printcolumn(name = "Sources", type_ = "integer", json_path = ".status.sources"),
    printcolumn(name = "Packets", type_ = "integer", json_path = ".status.packets"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMirrorSpec {
    /// The workloads whose traffic is copied: pods of the TrafficMirror's namespace (for
    /// KubeVirt VMs, their virt-launcher pods) and, optionally, only their interface on one
    /// Network.
    pub sources: MirrorSources,

    /// Which frames, seen from the source workload: Ingress (frames to it), Egress (frames
    /// from it) or Both (the default). Copies of egress frames are taken before the node's
    /// segmentation policy judges them (a frame the policy drops is still copied); copies of
    /// ingress frames after (only frames the policy let through reach the workload).
    #[serde(default)]
    pub direction: MirrorDirection,

    /// Which frames to copy; absent: every frame (ARP and neighbour discovery included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<MirrorFilter>,

    /// Where the copies go: exactly one of analyzer (a workload on the source's node) or
    /// remote (a collector reached through a VXLAN tunnel).
    pub destination: MirrorDestination,
}

/// The workloads a TrafficMirror copies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSources {
    /// Labels of the pods in the TrafficMirror's namespace (for VMs, of their virt-launcher
    /// pods); an empty selector selects every pod of the namespace. An analyzer the
    /// destination selects is never a source of the same mirror.
    pub selector: LabelSelector,

    /// Only the sources' interface on this weft Network; absent: every weft interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN))]
    pub network: Option<String>,
}

/// Which frames a mirror copies, seen from the source workload.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    JsonSchema,
)]
pub enum MirrorDirection {
    /// Frames to the workload.
    Ingress,
    /// Frames from the workload.
    Egress,
    /// Both.
    #[default]
    Both,
}

impl MirrorDirection {
    /// Whether frames to the workload are copied.
    pub fn ingress(self) -> bool {
        matches!(self, MirrorDirection::Ingress | MirrorDirection::Both)
    }
    /// Whether frames from the workload are copied.
    pub fn egress(self) -> bool {
        matches!(self, MirrorDirection::Egress | MirrorDirection::Both)
    }
}

/// A protocol a mirror's filter names.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum MirrorProtocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
    /// ICMP for IPv4 and ICMPv6 for IPv6.
    #[serde(rename = "ICMP")]
    Icmp,
}

/// Which frames to copy: the fields given must all match (an empty field matches anything).
/// With any field given, only IPv4 and IPv6 frames are copied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = &cel::MIRROR_PORTS_NEED_L4)]
#[serde(rename_all = "camelCase")]
pub struct MirrorFilter {
    /// Protocols (TCP, UDP, SCTP, ICMP); absent: any (with ports: TCP, UDP and SCTP). The
    /// IPv6 next header is read from the fixed header; frames with extension headers match
    /// only by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(validation = &cel::MIRROR_PROTOCOLS_UNIQUE)]
    pub protocols: Vec<MirrorProtocol>,

    /// Ports: a TCP, UDP or SCTP frame matches when its source or destination port is one of
    /// them (ICMP frames, when ICMP is listed, match regardless). At most 16 entries, each
    /// with exactly one of port and portRange.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<MirrorPort>,

    /// The far end's address: the destination of frames from the workload, the source of
    /// frames to it, in one of these CIDRs. At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub cidrs: Vec<Cidr>,
}

/// A port or a range of ports of a mirror's filter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = &cel::MIRROR_PORT_OR_RANGE)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPort {
    /// One port (1 to 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// An inclusive range of ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
}

impl MirrorPort {
    /// The inclusive range, if exactly one of port and portRange is set and valid.
    pub fn range(&self) -> Option<(u16, u16)> {
        let port = |p: i32| u16::try_from(p).ok().filter(|p| *p != 0);
        match (self.port, self.port_range) {
            (Some(p), None) => port(p).map(|p| (p, p)),
            (None, Some(r)) => {
                let (s, e) = (port(r.start)?, port(r.end)?);
                (s <= e).then_some((s, e))
            }
            _ => None,
        }
    }
}

/// Where a mirror's copies go.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = &cel::MIRROR_DESTINATION_EXACTLY_ONE)]
#[serde(rename_all = "camelCase")]
pub struct MirrorDestination {
    /// An analyzer workload in the TrafficMirror's namespace on the source's node: the copies
    /// arrive on its weft interface, unchanged (their MAC addresses are the original frames').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analyzer: Option<MirrorAnalyzer>,
    /// A remote collector: the copies go to it from the node in VXLAN (UDP), one tunnel per
    /// node and mirror. The node agent sends only to collectors inside the CIDRs its
    /// administrator allowed (chart value `agent.mirrorCollectors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<MirrorRemote>,
}

/// An analyzer workload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MirrorAnalyzer {
    /// Labels of the analyzer pods in the TrafficMirror's namespace; on each node the copies
    /// go to the first of them (by name) that runs there, typically one pod of a DaemonSet.
    pub selector: LabelSelector,
    /// Its interface on this weft Network (for example a dedicated, address-less capture
    /// interface); absent: its first weft interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN))]
    pub network: Option<String>,
}

/// A remote collector reached through a tunnel.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MirrorRemote {
    /// The collector's address.
    pub address: IpAddress,
    /// The encapsulation: VXLAN (GRE and ERSPAN are not offered: weft's target kernels may
    /// lack them, and VXLAN is what collectors such as Zeek, Suricata and cloud packet
    /// mirroring receive).
    #[serde(default)]
    pub encapsulation: MirrorEncapsulation,
    /// The VXLAN network identifier (1 to 16777215), which tells the collector whose copies
    /// these are.
    #[schemars(range(min = 1, max = 16777215))]
    pub vni: i32,
    /// The UDP port (default 4789).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

impl MirrorRemote {
    /// The UDP port, default 4789.
    pub fn udp_port(&self) -> u16 {
        self.port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .unwrap_or(VXLAN_PORT)
    }
}

/// A tunnel encapsulation.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    JsonSchema,
)]
pub enum MirrorEncapsulation {
    /// VXLAN (RFC 7348): the copied Ethernet frame in UDP.
    #[default]
    #[serde(rename = "VXLAN")]
    Vxlan,
}

/// Observed state of a TrafficMirror, written by the weft controller from what each node's
/// agent reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMirrorStatus {
    /// Standard conditions: Ready is True when every node with a source mirrors it, False
    /// with the problems otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Source interfaces mirrored now, all nodes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<i32>,
    /// The nodes that mirror a source now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub nodes: Vec<String>,
    /// Frames copied, summed over the nodes' counters (which restart with a source's port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<i64>,
    /// Bytes copied, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// What keeps it from mirroring somewhere, one line per node and problem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub problems: Vec<String>,
}

impl TrafficMirrorSpec {
    /// The ports of the filter as inclusive ranges (invalid entries left out).
    pub fn port_ranges(&self) -> Vec<(u16, u16)> {
        self.filter
            .iter()
            .flat_map(|f| f.ports.iter().filter_map(MirrorPort::range))
            .collect()
    }

    /// Checks every rule of the CRD schema and its CEL rules; each error names the field, e.g.
    /// `spec.filter.cidrs[1]`.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Errors::default();
        check_selector(&self.sources.selector, "spec.sources.selector", &mut errors);
        let network = |n: &Option<String>, field: &str, errors: &mut Errors| {
            if let Some(n) = n
                && !is_dns1123_subdomain(n)
            {
                errors.push(
                    field,
                    format!("{n:?} is not a Network name; use the metadata.name of a Network (lowercase letters, digits, '-' and '.')"),
                );
            }
        };
        network(&self.sources.network, "spec.sources.network", &mut errors);
        if let Some(f) = &self.filter {
            if f.protocols.len() > 4 {
                errors.push(
                    "spec.filter.protocols",
                    "at most 4 protocols (TCP, UDP, SCTP, ICMP)",
                );
            }
            for (i, p) in f.protocols.iter().enumerate() {
                if f.protocols[..i].contains(p) {
                    errors.push(
                        format!("spec.filter.protocols[{i}]"),
                        cel::MIRROR_PROTOCOLS_UNIQUE.message,
                    );
                }
            }
            if f.ports.len() > MAX_MIRROR_PORTS {
                errors.push(
                    "spec.filter.ports",
                    format!(
                        "lists {} ports; at most {MAX_MIRROR_PORTS} are allowed (use portRange)",
                        f.ports.len()
                    ),
                );
            }
            for (i, p) in f.ports.iter().enumerate() {
                let at = format!("spec.filter.ports[{i}]");
                if p.port.is_some() == p.port_range.is_some() {
                    errors.push(at.clone(), cel::MIRROR_PORT_OR_RANGE.message);
                    continue;
                }
                if let Some(port) = p.port
                    && !(1..=65535).contains(&port)
                {
                    errors.push(
                        format!("{at}.port"),
                        format!("{port} is not a port number; use 1 to 65535"),
                    );
                }
                if let Some(r) = p.port_range {
                    for (v, field) in [(r.start, "start"), (r.end, "end")] {
                        if !(1..=65535).contains(&v) {
                            errors.push(
                                format!("{at}.portRange.{field}"),
                                format!("{v} is not a port number; use 1 to 65535"),
                            );
                        }
                    }
                    if r.start > r.end {
                        errors.push(
                            format!("{at}.portRange"),
                            format!("start {} is greater than end {}; swap them", r.start, r.end),
                        );
                    }
                }
            }
            if !f.ports.is_empty()
                && !f.protocols.is_empty()
                && f.protocols.iter().all(|p| *p == MirrorProtocol::Icmp)
            {
                errors.push("spec.filter.ports", cel::MIRROR_PORTS_NEED_L4.message);
            }
            if f.cidrs.len() > MAX_MIRROR_CIDRS {
                errors.push(
                    "spec.filter.cidrs",
                    format!("lists {} CIDRs; at most {MAX_MIRROR_CIDRS} are allowed (merge neighbours into larger CIDRs)", f.cidrs.len()),
                );
            }
            for (i, c) in f.cidrs.iter().enumerate() {
                if let Err(e) = parse_cidr(c) {
                    errors.push(format!("spec.filter.cidrs[{i}]"), e.to_string());
                }
            }
        }
        let d = &self.destination;
        if d.analyzer.is_some() == d.remote.is_some() {
            errors.push(
                "spec.destination",
                cel::MIRROR_DESTINATION_EXACTLY_ONE.message,
            );
        }
        if let Some(a) = &d.analyzer {
            check_selector(
                &a.selector,
                "spec.destination.analyzer.selector",
                &mut errors,
            );
            network(&a.network, "spec.destination.analyzer.network", &mut errors);
        }
        if let Some(r) = &d.remote {
            if let Err(e) = parse_ip(&r.address) {
                errors.push("spec.destination.remote.address", e.to_string());
            }
            if !(1..=16_777_215).contains(&r.vni) {
                errors.push(
                    "spec.destination.remote.vni",
                    format!(
                        "{} is not a VXLAN network identifier; use 1 to 16777215",
                        r.vni
                    ),
                );
            }
            if let Some(p) = r.port
                && !(1..=65535).contains(&p)
            {
                errors.push(
                    "spec.destination.remote.port",
                    format!("{p} is not a port number; use 1 to 65535 (VXLAN's is 4789)"),
                );
            }
        }
        errors.finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> TrafficMirrorSpec {
        TrafficMirrorSpec {
            sources: MirrorSources {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                    ..Default::default()
                },
                network: None,
            },
            direction: MirrorDirection::Both,
            filter: None,
            destination: MirrorDestination {
                analyzer: Some(MirrorAnalyzer {
                    selector: LabelSelector::default(),
                    network: Some("lan".into()),
                }),
                remote: None,
            },
        }
    }

    fn fields(s: &TrafficMirrorSpec) -> Vec<String> {
        s.validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_plain_mirror_is_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn the_destination_is_exactly_one() {
        let mut s = spec();
        s.destination.remote = Some(MirrorRemote {
            address: "192.0.2.10".into(),
            vni: 7,
            ..Default::default()
        });
        assert_eq!(fields(&s), ["spec.destination"]);
        s.destination = MirrorDestination::default();
        assert_eq!(fields(&s), ["spec.destination"]);
    }

    #[test]
    fn filter_errors_name_their_entry() {
        let mut s = spec();
        s.filter = Some(MirrorFilter {
            protocols: vec![MirrorProtocol::Tcp, MirrorProtocol::Tcp],
            ports: vec![
                MirrorPort {
                    port: Some(22),
                    port_range: None,
                },
                MirrorPort {
                    port: None,
                    port_range: Some(PortRange { start: 90, end: 80 }),
                },
                MirrorPort::default(),
            ],
            cidrs: vec!["10.0.0.1/8".into()],
        });
        assert_eq!(
            fields(&s),
            [
                "spec.filter.protocols[1]",
                "spec.filter.ports[1].portRange",
                "spec.filter.ports[2]",
                "spec.filter.cidrs[0]"
            ]
        );
        assert_eq!(s.port_ranges(), vec![(22, 22)]);
    }

    #[test]
    fn ports_need_a_protocol_with_ports() {
        let mut s = spec();
        s.filter = Some(MirrorFilter {
            protocols: vec![MirrorProtocol::Icmp],
            ports: vec![MirrorPort {
                port: Some(22),
                port_range: None,
            }],
            cidrs: vec![],
        });
        assert_eq!(fields(&s), ["spec.filter.ports"]);
    }

    #[test]
    fn a_remote_collector_is_checked() {
        let mut s = spec();
        s.destination = MirrorDestination {
            analyzer: None,
            remote: Some(MirrorRemote {
                address: "192.0.2.300".into(),
                vni: 0,
                port: Some(70000),
                ..Default::default()
            }),
        };
        assert_eq!(
            fields(&s),
            [
                "spec.destination.remote.address",
                "spec.destination.remote.vni",
                "spec.destination.remote.port"
            ]
        );
    }
}

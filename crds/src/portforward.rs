//! `PortForward` (namespaced, short name `wpf`): node ports forwarded to a workload on a NAT
//! network, like KubeVirt's masquerade-binding ports or a Service's NodePort.

use crate::cel;
use crate::cidr::{Cidr, parse_cidr};
use crate::validate::{
    DNS1123_SUBDOMAIN_PATTERN, Errors, FieldError, PORT_NAME_PATTERN, check_selector,
    is_dns1123_subdomain, is_valid_port_name,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most entries in `spec.ports`.
pub const MAX_PORTS: usize = 64;
/// Most entries in `spec.allowFrom`.
pub const MAX_ALLOW_FROM: usize = 64;

/// Forwards ports of the node's address to a workload (pod or VM) on a NAT network: traffic to
/// a node port is DNATed to the workload's address on that network, like the ports of
/// KubeVirt's masquerade binding or a Service's NodePort, but for one workload. It works on
/// the node(s) where the target runs.
// The printcolumn(...) lists repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "PortForward",
    namespaced,
    shortname = "wpf",
    status = "PortForwardStatus",
    derive = "PartialEq",
    doc = "A weft port forward (weft.dev/v1alpha1): node ports forwarded to a pod or VM on a NAT network.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
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
#[x_kube(validation = &cel::PORT_FORWARD_SYN_PROXY_NEEDS_TCP)]
pub struct PortForwardSpec {
    /// Name of the Network (NAT mode) the target is attached to; the forward goes to the
    /// target's address on that network.
    #[schemars(length(min = 1, max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN))]
    pub network: String,

    /// The workload to forward to: exactly one of workload (a pod or VM name) or selector
    /// (labels of pods in this namespace; for KubeVirt VMs, of their virt-launcher pods).
    pub target: PortForwardTarget,

    /// The ports to forward, 1 to 64 entries. Each has exactly one of port (one node port,
    /// optionally to another targetPort) or portRange (node ports forwarded to the same port
    /// numbers on the target).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = &cel::PORT_FORWARD_PORT_NAMES_UNIQUE)]
    pub ports: Vec<ForwardedPort>,

    /// Source CIDRs allowed to use the forward, e.g. [192.168.50.0/24]. Empty or absent allows
    /// any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub allow_from: Option<Vec<Cidr>>,

    /// A brute-force guard: a source that opens more new connections to one of the node ports
    /// than `maxNewConnectionsPerMinute` is banned from that port for `banSeconds` (IPv4 and
    /// IPv6; the node keeps the bans across agent restarts). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brute_force: Option<BruteForceGuard>,

    /// A SYN proxy for the TCP ports (`{}` for the defaults): the node answers each SYN with a
    /// SYN cookie and opens the connection to the workload only once the client has completed
    /// the handshake, so a flood of spoofed SYNs takes neither the workload's backlog nor
    /// connection-tracking entries. Needs the agent's `--syn-proxy` (chart value
    /// `agent.synProxy`), which turns the node's loose TCP tracking off; without it the ports
    /// are forwarded unproxied and the node's agent logs that as a problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_proxy: Option<SynProxy>,
}

/// Smallest `mss` of a SYN proxy (the Internet's minimum datagram less 40 bytes of headers).
pub const MIN_SYN_PROXY_MSS: i32 = 536;
/// Largest `mss` of a SYN proxy.
pub const MAX_SYN_PROXY_MSS: i32 = 65_495;
/// Largest `windowScale` of a SYN proxy (RFC 7323).
pub const MAX_WINDOW_SCALE: i32 = 14;
/// The window scale a SYN proxy announces by default: what Linux announces with its default
/// receive buffers.
pub const DEFAULT_WINDOW_SCALE: i32 = 7;

/// The TCP options a SYN proxy announces on the workload's behalf: they must be what the
/// workload itself would announce (it never sees the client's SYN), so set them when it differs
/// from a Linux default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SynProxy {
    /// The maximum segment size announced, 536 to 65495. Default: the Network's MTU less 40
    /// (IPv4) or 60 (IPv6) bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 536, max = 65495))]
    pub mss: Option<i32>,
    /// The window scale announced, 0 to 14 (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 14))]
    pub window_scale: Option<i32>,
}

/// The TCP node ports of the node's own services, first to last, with what uses them: a
/// PortForward on one would take their connections (from its `allowFrom` sources) to a
/// workload — an SSH login to the node, the kubelet's API — so none is forwarded. The API
/// server refuses them ([`cel::PORT_FORWARD_NOT_RESERVED`]) and so does `validate()`.
pub const RESERVED_NODE_PORTS: &[(u16, u16, &str)] = &[
    (22, 22, "SSH"),
    (2379, 2380, "etcd"),
    (6443, 6443, "kube-apiserver"),
    (
        10248,
        10260,
        "kubelet, kube-proxy, controller-manager, scheduler",
    ),
];

/// Most `maxNewConnectionsPerMinute` of a brute-force guard.
pub const MAX_CONNECTIONS_PER_MINUTE: i32 = 100_000;
/// Longest ban of a brute-force guard: a week.
pub const MAX_BAN_SECONDS: i32 = 604_800;
/// The ban of a brute-force guard without `banSeconds`: ten minutes.
pub const DEFAULT_BAN_SECONDS: i32 = 600;

/// Per-source limits on new connections to a PortForward's node ports, with a temporary ban.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BruteForceGuard {
    /// New connections (TCP, UDP or SCTP flows) one source may open to one node port per
    /// minute, in bursts of as many (1 to 100000). The next one bans it.
    #[schemars(range(min = 1, max = 100000))]
    pub max_new_connections_per_minute: i32,
    /// How long a source stays banned from the port, in seconds (1 to 604800; default 600).
    /// Its established connections are not cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub ban_seconds: Option<i32>,
}

impl BruteForceGuard {
    /// `(per minute, ban seconds)` with the default applied, if the values are in range.
    pub fn limits(&self) -> Option<(u32, u32)> {
        let per_minute = u32::try_from(self.max_new_connections_per_minute)
            .ok()
            .filter(|n| (1..=MAX_CONNECTIONS_PER_MINUTE as u32).contains(n))?;
        let ban = u32::try_from(self.ban_seconds.unwrap_or(DEFAULT_BAN_SECONDS))
            .ok()
            .filter(|n| (1..=MAX_BAN_SECONDS as u32).contains(n))?;
        Some((per_minute, ban))
    }
}

/// The workload a PortForward forwards to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = &cel::PORT_FORWARD_TARGET_EXACTLY_ONE)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardTarget {
    /// Name of a pod or KubeVirt VirtualMachine(Instance) in the PortForward's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN))]
    pub workload: Option<String>,

    /// Labels of the pods in the PortForward's namespace to forward to. If several match on a
    /// node, the first by name is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// One forwarded port or port range.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(
    validation = &cel::PORT_FORWARD_PORT_OR_RANGE,
    validation = &cel::PORT_FORWARD_TARGET_PORT_NEEDS_PORT,
    validation = &cel::PORT_FORWARD_NOT_RESERVED
)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedPort {
    /// Optional name of the port (lowercase letters, digits and '-', at most 15 characters),
    /// unique within the PortForward; shown in status and events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), pattern(PORT_NAME_PATTERN))]
    pub name: Option<String>,

    /// Protocol: TCP (the default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Protocol,

    /// The node port (1 to 65535). Exactly one of port and portRange is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// A range of node ports, forwarded to the same port numbers on the target (for protocols
    /// like RTP or passive FTP). Exactly one of port and portRange is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,

    /// The port on the target (1 to 65535); only with port. Defaults to port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,
}

/// An inclusive range of ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = &cel::PORT_RANGE_ORDERED)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// First port of the range (1 to 65535).
    #[schemars(range(min = 1, max = 65535))]
    pub start: i32,
    /// Last port of the range (1 to 65535), not smaller than start.
    #[schemars(range(min = 1, max = 65535))]
    pub end: i32,
}

/// A transport protocol.
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
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The name as written in YAML: `TCP`, `UDP` or `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The protocol's name in nftables rules: `tcp`, `udp` or `sctp`.
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state of a PortForward, written by the weft controller and agents.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardStatus {
    /// Standard conditions; Ready is True when the forward is installed for its target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The workload addresses traffic is currently forwarded to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

/// One forward rule derived from `spec.ports`, in the form the node agent installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForwardPort {
    /// The protocol.
    pub protocol: Protocol,
    /// The node ports, inclusive (`start == end` for a single port).
    pub node_ports: (u16, u16),
    /// For a single port: the target port (`targetPort`, default the node port). `None` for a
    /// range, which keeps the port numbers.
    pub target_port: Option<u16>,
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

impl ForwardedPort {
    /// The node ports, inclusive, if exactly one of port and portRange is set and valid.
    pub fn node_ports(&self) -> Option<(u16, u16)> {
        match (self.port, self.port_range) {
            (Some(p), None) => port_u16(p).map(|p| (p, p)),
            (None, Some(r)) => {
                let (start, end) = (port_u16(r.start)?, port_u16(r.end)?);
                (start <= end).then_some((start, end))
            }
            _ => None,
        }
    }

    fn validate(&self, at: &str, errors: &mut Errors) {
        if let Some(name) = &self.name
            && !is_valid_port_name(name)
        {
            errors.push(
                format!("{at}.name"),
                format!("{name:?} is not a valid port name; use at most 15 lowercase letters, digits and '-', starting and ending with a letter or digit"),
            );
        }
        let port_field = |p: i32, field: &str, errors: &mut Errors| {
            if port_u16(p).is_none() {
                errors.push(
                    format!("{at}.{field}"),
                    format!("{p} is not a port number; use 1 to 65535"),
                );
            }
        };
        match (self.port, &self.port_range) {
            (Some(_), Some(_)) | (None, None) => {
                errors.push(at.to_owned(), cel::PORT_FORWARD_PORT_OR_RANGE.message);
            }
            _ => {}
        }
        if let Some(p) = self.port {
            port_field(p, "port", errors);
        }
        if let Some(r) = &self.port_range {
            port_field(r.start, "portRange.start", errors);
            port_field(r.end, "portRange.end", errors);
            if r.start > r.end {
                errors.push(
                    format!("{at}.portRange"),
                    format!("start {} is greater than end {}; swap them", r.start, r.end),
                );
            }
        }
        if let Some(t) = self.target_port {
            port_field(t, "targetPort", errors);
            if self.port.is_none() {
                errors.push(
                    format!("{at}.targetPort"),
                    cel::PORT_FORWARD_TARGET_PORT_NEEDS_PORT.message,
                );
            }
        }
        if self.takes_a_reserved_port() {
            errors.push(at.to_owned(), cel::PORT_FORWARD_NOT_RESERVED.message);
        }
    }

    /// Whether it is TCP and its node ports hold one of [`RESERVED_NODE_PORTS`].
    fn takes_a_reserved_port(&self) -> bool {
        let (first, last) = match (self.port, &self.port_range) {
            (Some(p), _) => (p, p),
            (None, Some(r)) => (r.start, r.end),
            (None, None) => return false,
        };
        self.protocol == Protocol::Tcp
            && RESERVED_NODE_PORTS
                .iter()
                .any(|&(s, e, _)| first <= i32::from(e) && last >= i32::from(s))
    }
}

impl PortForwardSpec {
    /// The forward rules of `spec.ports`: protocol, node port range and target port (the
    /// `targetPort`, or the node port, for single ports; `None` for ranges). Entries that are
    /// invalid (see [`validate`](Self::validate)) are left out.
    pub fn forward_ports(&self) -> Vec<ForwardPort> {
        self.ports
            .iter()
            .filter_map(|p| {
                let node_ports = p.node_ports()?;
                let target_port = match p.port_range {
                    Some(_) => None,
                    None => match p.target_port {
                        Some(t) => Some(port_u16(t)?),
                        None => Some(node_ports.0),
                    },
                };
                Some(ForwardPort {
                    protocol: p.protocol,
                    node_ports,
                    target_port,
                })
            })
            .collect()
    }

    /// Checks every rule of the CRD schema and its CEL rules, plus one CEL cannot express:
    /// two entries of the same protocol must not share node ports. Each error names the field,
    /// e.g. `spec.ports[1].portRange`.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Errors::default();
        if !is_dns1123_subdomain(&self.network) {
            errors.push(
                "spec.network",
                format!(
                    "{:?} is not a Network name; use the metadata.name of a Network (lowercase letters, digits, '-' and '.')",
                    self.network
                ),
            );
        }
        match (&self.target.workload, &self.target.selector) {
            (Some(_), Some(_)) | (None, None) => {
                errors.push(
                    "spec.target",
                    "needs exactly one of workload (a pod or VM name) or selector (labels of pods in this namespace)",
                );
            }
            _ => {}
        }
        if let Some(w) = &self.target.workload
            && !is_dns1123_subdomain(w)
        {
            errors.push(
                "spec.target.workload",
                format!(
                    "{w:?} is not a pod or VM name; use lowercase letters, digits, '-' and '.'"
                ),
            );
        }
        if let Some(sel) = &self.target.selector {
            check_selector(sel, "spec.target.selector", &mut errors);
        }
        if self.ports.is_empty() || self.ports.len() > MAX_PORTS {
            errors.push(
                "spec.ports",
                format!("lists {} ports; list 1 to {MAX_PORTS}", self.ports.len()),
            );
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, port) in self.ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            port.validate(&at, &mut errors);
            if let Some(name) = &port.name
                && let Some(first) = names.insert(name, i)
            {
                errors.push(
                    format!("{at}.name"),
                    format!("{name:?} is already the name of spec.ports[{first}]; port names must be unique"),
                );
            }
        }
        self.validate_overlaps(&mut errors);
        if let Some(g) = &self.brute_force {
            if !(1..=MAX_CONNECTIONS_PER_MINUTE).contains(&g.max_new_connections_per_minute) {
                errors.push(
                    "spec.bruteForce.maxNewConnectionsPerMinute",
                    format!(
                        "{} is out of range; use 1 to {MAX_CONNECTIONS_PER_MINUTE}",
                        g.max_new_connections_per_minute
                    ),
                );
            }
            if let Some(b) = g.ban_seconds
                && !(1..=MAX_BAN_SECONDS).contains(&b)
            {
                errors.push(
                    "spec.bruteForce.banSeconds",
                    format!("{b} is out of range; use 1 to {MAX_BAN_SECONDS} (a week)"),
                );
            }
        }
        if let Some(p) = &self.syn_proxy {
            if let Some(mss) = p.mss
                && !(MIN_SYN_PROXY_MSS..=MAX_SYN_PROXY_MSS).contains(&mss)
            {
                errors.push(
                    "spec.synProxy.mss",
                    format!(
                        "{mss} is out of range; use {MIN_SYN_PROXY_MSS} to {MAX_SYN_PROXY_MSS} (or leave it out for the Network's MTU less the headers)"
                    ),
                );
            }
            if let Some(w) = p.window_scale
                && !(0..=MAX_WINDOW_SCALE).contains(&w)
            {
                errors.push(
                    "spec.synProxy.windowScale",
                    format!("{w} is out of range; use 0 to {MAX_WINDOW_SCALE}"),
                );
            }
            if !self.ports.iter().any(|p| p.protocol == Protocol::Tcp) {
                errors.push(
                    "spec.synProxy",
                    "a SYN proxy protects TCP ports and spec.ports has none; remove synProxy or forward a TCP port",
                );
            }
        }
        if let Some(allow) = &self.allow_from {
            if allow.len() > MAX_ALLOW_FROM {
                errors.push(
                    "spec.allowFrom",
                    format!(
                        "lists {} CIDRs; at most {MAX_ALLOW_FROM} are allowed (merge neighbours into larger CIDRs)",
                        allow.len()
                    ),
                );
            }
            for (i, c) in allow.iter().enumerate() {
                if let Err(e) = parse_cidr(c) {
                    errors.push(format!("spec.allowFrom[{i}]"), e.to_string());
                }
            }
        }
        errors.finish()
    }

    fn validate_overlaps(&self, errors: &mut Errors) {
        let ranges: Vec<(usize, Protocol, (u16, u16))> = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.protocol, p.node_ports()?)))
            .collect();
        for (n, (i, proto, (start, end))) in ranges.iter().enumerate() {
            if let Some((j, _, _)) = ranges[..n]
                .iter()
                .find(|(_, p, (s, e))| p == proto && s <= end && start <= e)
            {
                errors.push(
                    format!("spec.ports[{i}]"),
                    format!(
                        "{proto} node ports {start}-{end} overlap spec.ports[{j}]; each node port can be forwarded once"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server's rule and `validate()` refuse the same ports: the rule's text is the
    /// one [`RESERVED_NODE_PORTS`] makes.
    #[test]
    fn the_reserved_ports_rule_is_the_constant_s() {
        let ports: Vec<String> = RESERVED_NODE_PORTS
            .iter()
            .map(|&(s, e, _)| {
                if s == e {
                    format!("self.port == {s}")
                } else {
                    format!("(self.port >= {s} && self.port <= {e})")
                }
            })
            .collect();
        let ranges: Vec<String> = RESERVED_NODE_PORTS
            .iter()
            .map(|&(s, e, _)| format!("(self.portRange.start <= {e} && self.portRange.end >= {s})"))
            .collect();
        let rule = format!(
            "(has(self.protocol) && self.protocol != 'TCP') || (has(self.port) ? !({}) : (!has(self.portRange) || !({})))",
            ports.join(" || "),
            ranges.join(" || ")
        );
        assert_eq!(cel::PORT_FORWARD_NOT_RESERVED.rule, rule);
        for (s, e, what) in RESERVED_NODE_PORTS {
            let text = if s == e {
                format!("{s} ({what})")
            } else {
                format!("{s}-{e} ({what})")
            };
            assert!(
                cel::PORT_FORWARD_NOT_RESERVED.message.contains(&text),
                "{text}"
            );
        }
    }

    #[test]
    fn tcp_node_ports_of_the_node_s_own_services_are_refused() {
        let refused = |p: ForwardedPort| {
            spec(vec![p]).validate().err().is_some_and(|errors| {
                errors.iter().any(|e| {
                    e.field == "spec.ports[0]"
                        && e.message == cel::PORT_FORWARD_NOT_RESERVED.message
                })
            })
        };
        let port = |protocol, port| ForwardedPort {
            protocol,
            port: Some(port),
            ..ForwardedPort::default()
        };
        let range = |start, end| range(Protocol::Tcp, start, end);
        for p in [22, 2379, 2380, 6443, 10248, 10250, 10260] {
            assert!(refused(port(Protocol::Tcp, p)), "{p}");
            assert!(!refused(port(Protocol::Udp, p)), "udp {p}");
        }
        for p in [21, 23, 2222, 2378, 2381, 6442, 6444, 10247, 10261] {
            assert!(!refused(port(Protocol::Tcp, p)), "{p}");
        }
        assert!(refused(range(20, 30)));
        assert!(refused(range(10200, 10248)));
        assert!(refused(range(10260, 10300)));
        assert!(!refused(range(23, 2378)));
        assert!(!refused(range(10261, 11000)));
    }
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn single(port: i32, target: Option<i32>) -> ForwardedPort {
        ForwardedPort {
            port: Some(port),
            target_port: target,
            ..Default::default()
        }
    }

    fn range(protocol: Protocol, start: i32, end: i32) -> ForwardedPort {
        ForwardedPort {
            protocol,
            port_range: Some(PortRange { start, end }),
            ..Default::default()
        }
    }

    fn spec(ports: Vec<ForwardedPort>) -> PortForwardSpec {
        PortForwardSpec {
            network: "nat-demo".into(),
            target: PortForwardTarget {
                workload: Some("web-1".into()),
                selector: None,
            },
            ports,
            allow_from: None,
            brute_force: None,
            syn_proxy: None,
        }
    }

    #[track_caller]
    fn assert_invalid(spec: &PortForwardSpec, field: &str, needle: &str) {
        let errs = spec.validate().expect_err("spec should be invalid");
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message.contains(needle)),
            "expected an error on {field} containing {needle:?}, got {errs:#?}"
        );
    }

    #[test]
    fn valid_specs_pass() {
        let mut by_selector = spec(vec![single(8080, Some(80))]);
        by_selector.target = PortForwardTarget {
            workload: None,
            selector: Some(LabelSelector {
                match_labels: Some([("app".to_string(), "web".to_string())].into()),
                match_expressions: None,
            }),
        };
        let mut everything = spec(vec![
            ForwardedPort {
                name: Some("http".into()),
                ..single(8080, Some(80))
            },
            ForwardedPort {
                name: Some("rtp".into()),
                ..range(Protocol::Udp, 10000, 10099)
            },
            range(Protocol::Tcp, 10000, 10099),
            single(5353, None),
            ForwardedPort {
                protocol: Protocol::Udp,
                ..single(5353, Some(53))
            },
            ForwardedPort {
                protocol: Protocol::Sctp,
                ..single(1, Some(65535))
            },
            range(Protocol::Sctp, 65535, 65535),
        ]);
        everything.allow_from = Some(vec![
            "192.168.50.0/24".into(),
            "fd00:50::/64".into(),
            "0.0.0.0/0".into(),
        ]);
        for s in [spec(vec![single(8080, None)]), by_selector, everything] {
            assert_eq!(s.validate(), Ok(()), "{s:?}");
        }
    }

    #[test]
    fn network_must_be_a_name() {
        let mut s = spec(vec![single(80, None)]);
        s.network = String::new();
        assert_invalid(&s, "spec.network", "not a Network name");
        s.network = "Nat_Demo".into();
        assert_invalid(&s, "spec.network", "not a Network name");
    }

    #[test]
    fn target_needs_exactly_one_of_workload_and_selector() {
        let mut s = spec(vec![single(80, None)]);
        s.target.workload = None;
        assert_invalid(&s, "spec.target", "exactly one of workload");
        s.target.workload = Some("web-1".into());
        s.target.selector = Some(LabelSelector::default());
        assert_invalid(&s, "spec.target", "exactly one of workload");
    }

    #[test]
    fn target_workload_and_selector_are_checked() {
        let mut s = spec(vec![single(80, None)]);
        s.target.workload = Some("Web 1".into());
        assert_invalid(&s, "spec.target.workload", "not a pod or VM name");
        s.target = PortForwardTarget {
            workload: None,
            selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "In".into(),
                    values: None,
                }]),
                match_labels: None,
            }),
        };
        assert_invalid(
            &s,
            "spec.target.selector.matchExpressions[0].values",
            "at least one value",
        );
    }

    #[test]
    fn ports_must_not_be_empty_or_too_many() {
        assert_invalid(&spec(vec![]), "spec.ports", "lists 0 ports");
        let many = (1..=65).map(|p| single(p, None)).collect();
        assert_invalid(&spec(many), "spec.ports", "lists 65 ports");
    }

    #[test]
    fn each_port_needs_exactly_one_of_port_and_range() {
        assert_invalid(
            &spec(vec![ForwardedPort::default()]),
            "spec.ports[0]",
            "exactly one of port",
        );
        let both = ForwardedPort {
            port_range: Some(PortRange { start: 1, end: 2 }),
            ..single(80, None)
        };
        assert_invalid(
            &spec(vec![single(81, None), both]),
            "spec.ports[1]",
            "exactly one of port",
        );
    }

    #[test]
    fn port_numbers_are_range_checked() {
        assert_invalid(
            &spec(vec![single(0, None)]),
            "spec.ports[0].port",
            "1 to 65535",
        );
        assert_invalid(
            &spec(vec![single(65536, None)]),
            "spec.ports[0].port",
            "1 to 65535",
        );
        assert_invalid(
            &spec(vec![single(80, Some(0))]),
            "spec.ports[0].targetPort",
            "1 to 65535",
        );
        assert_invalid(
            &spec(vec![range(Protocol::Tcp, 0, 10)]),
            "spec.ports[0].portRange.start",
            "1 to 65535",
        );
        assert_invalid(
            &spec(vec![range(Protocol::Tcp, 10, 70000)]),
            "spec.ports[0].portRange.end",
            "1 to 65535",
        );
    }

    #[test]
    fn port_range_start_must_not_exceed_end() {
        assert_invalid(
            &spec(vec![range(Protocol::Tcp, 9002, 9000)]),
            "spec.ports[0].portRange",
            "swap them",
        );
    }

    #[test]
    fn target_port_only_with_a_single_port() {
        let p = ForwardedPort {
            target_port: Some(80),
            ..range(Protocol::Tcp, 9000, 9002)
        };
        assert_invalid(
            &spec(vec![p]),
            "spec.ports[0].targetPort",
            "only allowed with port",
        );
    }

    #[test]
    fn port_names_are_checked_and_unique() {
        let bad = ForwardedPort {
            name: Some("HTTP".into()),
            ..single(80, None)
        };
        assert_invalid(
            &spec(vec![bad]),
            "spec.ports[0].name",
            "not a valid port name",
        );
        let a = ForwardedPort {
            name: Some("web".into()),
            ..single(80, None)
        };
        let b = ForwardedPort {
            name: Some("web".into()),
            ..single(81, None)
        };
        assert_invalid(
            &spec(vec![a, b]),
            "spec.ports[1].name",
            "already the name of spec.ports[0]",
        );
    }

    #[test]
    fn node_ports_of_one_protocol_must_not_overlap() {
        let s = spec(vec![range(Protocol::Tcp, 9000, 9010), single(9005, None)]);
        assert_invalid(&s, "spec.ports[1]", "overlap spec.ports[0]");
        let s = spec(vec![range(Protocol::Udp, 9000, 9010), single(9005, None)]);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn allow_from_must_hold_canonical_cidrs() {
        let mut s = spec(vec![single(80, None)]);
        s.allow_from = Some(vec![
            "10.0.0.0/8".into(),
            "192.168.50.1".into(),
            "10.1.2.3/16".into(),
        ]);
        assert_invalid(&s, "spec.allowFrom[1]", "not a CIDR");
        assert_invalid(&s, "spec.allowFrom[2]", "10.1.0.0/16");
        s.allow_from = Some(vec!["10.0.0.0/8".into(); 65]);
        assert_invalid(&s, "spec.allowFrom", "at most 64");
    }

    #[test]
    fn forward_ports_expand_singles_and_ranges() {
        let s = spec(vec![
            single(8080, Some(80)),
            ForwardedPort {
                protocol: Protocol::Udp,
                ..single(5353, None)
            },
            range(Protocol::Sctp, 9000, 9002),
            ForwardedPort::default(),
        ]);
        assert_eq!(
            s.forward_ports(),
            vec![
                ForwardPort {
                    protocol: Protocol::Tcp,
                    node_ports: (8080, 8080),
                    target_port: Some(80)
                },
                ForwardPort {
                    protocol: Protocol::Udp,
                    node_ports: (5353, 5353),
                    target_port: Some(5353)
                },
                ForwardPort {
                    protocol: Protocol::Sctp,
                    node_ports: (9000, 9002),
                    target_port: None
                },
            ]
        );
    }

    #[test]
    fn protocols_have_yaml_and_nft_names() {
        assert_eq!(Protocol::default(), Protocol::Tcp);
        for (p, yaml, nft) in [
            (Protocol::Tcp, "TCP", "tcp"),
            (Protocol::Udp, "UDP", "udp"),
            (Protocol::Sctp, "SCTP", "sctp"),
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), yaml);
            assert_eq!(p.to_string(), yaml);
            assert_eq!(p.nft_name(), nft);
        }
    }

    #[test]
    fn yaml_uses_the_documented_names_and_defaults() {
        let yaml = r#"
network: nat-demo
target: {selector: {matchLabels: {app: api}}}
ports:
  - {port: 8080, targetPort: 80}
  - {protocol: UDP, portRange: {start: 9000, end: 9002}}
allowFrom: [192.168.50.1/32]
"#;
        let s: PortForwardSpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(
            s.ports[1].port_range,
            Some(PortRange {
                start: 9000,
                end: 9002
            })
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["ports"][0]["targetPort"], 80);
        assert_eq!(json["ports"][1]["portRange"]["end"], 9002);
        assert_eq!(json["allowFrom"][0], "192.168.50.1/32");
        assert!(json["target"].get("workload").is_none());
    }
}

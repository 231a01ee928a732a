//! `Network` (cluster-scoped, short name `wnet`): an address space for pods and VMs that shares
//! the node's host network, in NAT or Bridge mode.

use crate::cel;
use crate::cidr::{Cidr, IpAddress, IpOrCidr, parse_cidr, parse_ip, parse_ip_or_cidr};
use crate::constants::{DEFAULT_MTU, DEFAULT_NODE_BLOCK_PREFIX_V4, DEFAULT_NODE_BLOCK_PREFIX_V6};
use crate::limits::WorkloadLimits;
use crate::validate::{Errors, FieldError, IFNAME_PATTERN, check_selector, matches_ifname_pattern};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Lowest MTU accepted in `spec.mtu` (the IPv4 minimum datagram size).
pub const MIN_MTU: i32 = 576;
/// Highest MTU accepted in `spec.mtu` (common jumbo-frame limit).
pub const MAX_MTU: i32 = 9216;
/// Most entries in `spec.ipam.exclude`.
pub const MAX_EXCLUDES: usize = 64;
/// Most entries in `spec.bridge.trunkVlans`.
pub const MAX_TRUNK_VLANS: usize = 64;

/// A weft network: the subnets pods and VMs get addresses from, and how they reach the rest of
/// the world. In NAT mode each node routes and masquerades the network behind its own address
/// (like KubeVirt's masquerade binding or Calico's natOutgoing); in Bridge mode workloads sit on
/// a Linux bridge attached to a node uplink (optionally a VLAN), like a Kube-OVN underlay subnet.
/// Each node receives blocks of addresses from the subnets (like Calico IPAM blocks) and
/// hands them out to its workloads.
// The printcolumn(...) lists repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Network",
    shortname = "wnet",
    status = "NetworkStatus",
    derive = "PartialEq",
    doc = "A weft network (weft.dev/v1alpha1, cluster-scoped): subnets that pods and VMs get addresses from, in NAT or Bridge mode, sharing the nodes' host network.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Subnets", type_ = "string", json_path = ".spec.subnets"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "In Use",
        type_ = "integer",
        json_path = ".status.addressesInUse"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = &cel::NETWORK_BRIDGE_ONLY_IN_BRIDGE_MODE,
    validation = &cel::NETWORK_BRIDGE_REQUIRED,
    validation = &cel::NETWORK_NAT_ONLY_IN_NAT_MODE,
    validation = &cel::NETWORK_GATEWAY_IN_SUBNET,
    validation = &cel::NETWORK_GATEWAY_NOT_NETWORK_ADDRESS,
    validation = &cel::NETWORK_NODE_BLOCK_PREFIX_V4,
    validation = &cel::NETWORK_NODE_BLOCK_PREFIX_V6,
    validation = &cel::NETWORK_EXCLUDE_IN_SUBNET,
    validation = &cel::NETWORK_TRUNK_NEEDS_VLAN_FILTERING,
    validation = &cel::NETWORK_TRUNK_EXCLUDES_OWN_VLAN,
    validation = &cel::NETWORK_GATEWAY_IMMUTABLE,
    validation = &cel::NETWORK_NODE_BLOCK_PREFIX_V4_IMMUTABLE,
    validation = &cel::NETWORK_NODE_BLOCK_PREFIX_V6_IMMUTABLE
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// How workloads reach the outside: NAT (a routed subnet per network, masqueraded behind the
    /// node's address; outside clients reach workloads through PortForwards) or Bridge
    /// (workloads are on the uplink's L2 segment, optionally in a VLAN, and are reached directly).
    /// Cannot change once the Network exists.
    #[x_kube(validation = &cel::NETWORK_MODE_IMMUTABLE)]
    pub mode: NetworkMode,

    /// The network's address space: one IPv4 CIDR, one IPv6 CIDR, or one of each for
    /// dual-stack, in canonical form (host bits zero), e.g. [10.10.0.0/16, "fd10:10::/64"].
    /// An IPv4 subnet must be /30 or shorter and an IPv6 subnet /126 or shorter. Cannot change
    /// once the Network exists.
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(
        validation = &cel::NETWORK_SUBNETS_IMMUTABLE,
        validation = &cel::SUBNETS_ONE_V4,
        validation = &cel::SUBNETS_ONE_V6,
        validation = &cel::SUBNETS_LARGE_ENOUGH
    )]
    pub subnets: Vec<Cidr>,

    /// The gateway address workloads use, at most one per family, inside that family's subnet
    /// and neither its network address nor (IPv4) its broadcast address. Defaults to the first
    /// usable address of each subnet (10.10.0.1 for 10.10.0.0/16). In NAT mode every node
    /// answers on this address; in Bridge mode it is the router on the uplink's segment. Cannot
    /// be added, removed or changed once the Network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2))]
    #[x_kube(validation = &cel::GATEWAY_ONE_V4, validation = &cel::GATEWAY_ONE_V6)]
    pub gateway: Option<Vec<IpAddress>>,

    /// Address management: the size of the per-node address blocks and the addresses that are
    /// never handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSpec>,

    /// MTU of the network's bridge and workload interfaces, 576 to 9216. Defaults to 1500.
    /// In Bridge mode it must not exceed the uplink's MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9216))]
    pub mtu: Option<i32>,

    /// The nodes the network exists on. Empty or absent selects all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// NAT settings; only allowed when mode is NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatSpec>,

    /// Bridge settings; required when mode is Bridge and only allowed then. uplink, vlan,
    /// bridgeName and vlanFiltering cannot change once the Network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = &cel::NETWORK_UPLINK_IMMUTABLE,
        validation = &cel::NETWORK_VLAN_IMMUTABLE,
        validation = &cel::NETWORK_BRIDGE_NAME_IMMUTABLE,
        validation = &cel::NETWORK_VLAN_FILTERING_IMMUTABLE
    )]
    pub bridge: Option<BridgeSpec>,

    /// Microsegmentation defaults of the network's workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecuritySpec>,

    /// Limits on each workload interface: bandwidth each way, new connections per second,
    /// concurrent connections and connection-tracking entries. A pod's annotations
    /// (`kubernetes.io/ingress-bandwidth`, `kubernetes.io/egress-bandwidth`,
    /// `weft.dev/new-connections-per-second`, `weft.dev/max-connections`,
    /// `weft.dev/conntrack-entries`) may set lower values, never higher ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WorkloadLimits>,
}

/// How workloads of a network reach the outside.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum NetworkMode {
    /// A routed subnet behind each node; outbound traffic is masqueraded to the node's address,
    /// inbound traffic arrives through PortForwards.
    #[default]
    #[serde(rename = "NAT")]
    Nat,
    /// Workloads are bridged onto a node uplink (optionally a VLAN) and are reached directly.
    Bridge,
}

impl NetworkMode {
    /// The name as written in YAML: `NAT` or `Bridge`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Nat => "NAT",
            NetworkMode::Bridge => "Bridge",
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Address management of a network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpamSpec {
    /// Prefix length of the IPv4 address block each node receives from the IPv4 subnet, 16 to
    /// 30, and not shorter than the subnet's prefix (like Calico's blockSize). Defaults to 26
    /// (64 addresses per block), or to the subnet's prefix when the subnet is smaller. Cannot
    /// be added, removed or changed once the Network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 30))]
    pub node_block_prefix: Option<i32>,

    /// Prefix length of the IPv6 address block each node receives from the IPv6 subnet, 64 to
    /// 126, and not shorter than the subnet's prefix. Defaults to 122 (64 addresses per block),
    /// or to the subnet's prefix when the subnet is smaller. Cannot be added, removed or changed
    /// once the Network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 126))]
    pub node_block_prefix_v6: Option<i32>,

    /// Addresses that are never handed out to workloads (like Kube-OVN's excludeIps): single IPs
    /// (10.10.0.5) or CIDRs in canonical form (10.10.0.16/28), each inside one of the subnets,
    /// none overlapping another. The gateway is never handed out anyway. May change on a live
    /// Network: addresses already handed out stay with their workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = &cel::EXCLUDE_NO_OVERLAP)]
    pub exclude: Option<Vec<IpOrCidr>>,
}

/// NAT settings of a NAT network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatSpec {
    /// Masquerade traffic from workloads to destinations outside the network behind the node's
    /// address (like Calico's natOutgoing). Defaults to true; set false when the subnets are
    /// routed to the nodes by the rest of your network.
    #[serde(default = "default_true")]
    pub masquerade: bool,
}

impl Default for NatSpec {
    fn default() -> Self {
        NatSpec { masquerade: true }
    }
}

/// Bridge settings of a Bridge network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BridgeSpec {
    /// The node interface the bridge is attached to (e.g. eth1 or bond0), 1 to 15 characters.
    /// Nodes without this interface do not realize the network; narrow them out with
    /// spec.nodeSelector.
    #[schemars(length(min = 1, max = 15), pattern(IFNAME_PATTERN))]
    pub uplink: String,

    /// VLAN ID (1 to 4094) to tag the network's traffic with on the uplink (like Kube-OVN's
    /// Vlan id). Absent means untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan: Option<i32>,

    /// Name of the Linux bridge on the node, 1 to 15 characters (letters, digits, '_', '.', '-';
    /// starting with a letter or digit). Defaults to a name derived from the network's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), pattern(IFNAME_PATTERN))]
    pub bridge_name: Option<String>,

    /// Attach the uplink itself to a VLAN-filtering bridge as a trunk, instead of an 802.1Q
    /// sub-interface per VLAN (the default, false). vlan is then the network's own VLAN:
    /// workload ports are untagged access ports on it, the uplink carries it tagged. Needed for
    /// trunkVlans (workloads, typically VMs, that send and receive tagged frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_filtering: Option<bool>,

    /// The extra VLANs workload trunk ports may carry tagged (a NetworkAttachmentDefinition's
    /// vlanTrunk picks from them), and the uplink carries tagged; only with vlanFiltering: true.
    /// Single IDs ({id: 20}) or ranges ({minId: 100, maxId: 199}), 2 to 4094 (VLAN 1 is the
    /// uplink's untagged VLAN, the node's own traffic), at most 64 entries, not including the
    /// network's own VLAN (vlan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub trunk_vlans: Option<Vec<VlanRange>>,
}

/// One VLAN ID or an inclusive range of VLAN IDs, shaped like the reference bridge CNI plugin's
/// vlanTrunk entries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[x_kube(
    validation = &cel::VLAN_RANGE_ID_OR_RANGE,
    validation = &cel::VLAN_RANGE_ORDERED
)]
#[serde(rename_all = "camelCase")]
pub struct VlanRange {
    /// A single VLAN ID, 2 to 4094. Give either id or minId and maxId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4094))]
    pub id: Option<i32>,
    /// First VLAN ID of a range, 2 to 4094; needs maxId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4094))]
    pub min_id: Option<i32>,
    /// Last VLAN ID of a range, 2 to 4094, not smaller than minId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4094))]
    pub max_id: Option<i32>,
}

impl VlanRange {
    /// The first and last VLAN ID, when the entry is well-formed.
    pub fn bounds(&self) -> Option<(u16, u16)> {
        let (lo, hi) = match (self.id, self.min_id, self.max_id) {
            (Some(id), None, None) => (id, id),
            (None, Some(lo), Some(hi)) => (lo, hi),
            _ => return None,
        };
        let vid = |v: i32| u16::try_from(v).ok().filter(|v| (2..=4094).contains(v));
        let (lo, hi) = (vid(lo)?, vid(hi)?);
        (lo <= hi).then_some((lo, hi))
    }
}

/// Microsegmentation defaults of a network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecuritySpec {
    /// Drop packets whose source MAC or IP address is not the one weft assigned to the
    /// workload's interface. Defaults to true.
    #[serde(default = "default_true")]
    pub anti_spoofing: bool,

    /// What happens to traffic between workloads that no policy matches: Allow (the default)
    /// or Deny.
    #[serde(default)]
    pub default_action: Action,
}

impl Default for SecuritySpec {
    fn default() -> Self {
        SecuritySpec {
            anti_spoofing: true,
            default_action: Action::Allow,
        }
    }
}

/// A verdict for traffic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Action {
    /// Let the traffic through.
    #[default]
    Allow,
    /// Drop the traffic.
    Deny,
}

fn default_true() -> bool {
    true
}

/// Observed state of a Network, written by the weft controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Standard conditions; Ready is True when the network is realized on every selected node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The address blocks assigned to each node, listed while the Network has blocks on at
    /// most 100 nodes; beyond that the list is left out (`nodes` counts them, and each node's
    /// NodeNetwork holds its blocks), so that the status stays small: it is rewritten whenever
    /// a node joins or leaves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["node".into()]))]
    pub node_blocks: Vec<NodeBlock>,

    /// How many nodes have blocks of this Network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i64>,

    /// Addresses currently assigned to the Network's workloads, all nodes and families together
    /// (as the agents of the nodes that realize it publish them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_in_use: Option<i64>,

    /// Addresses that can be assigned to workloads (the subnets without network, broadcast,
    /// gateway and excluded addresses), all families together (saturated at the int64 maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_total: Option<i64>,
}

/// How many nodes a Network's `status.nodeBlocks` lists at the most; a Network with blocks on
/// more nodes leaves the list out.
pub const NODE_BLOCKS_LISTED: usize = 100;

/// The address blocks of one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBlock {
    /// The node's name.
    pub node: String,
    /// The node's blocks, as CIDRs (one per family, more when a node outgrows its first block).
    #[serde(default)]
    pub blocks: Vec<String>,
}

fn v4_first_usable(net: Ipv4Net) -> Option<Ipv4Addr> {
    net.hosts().next()
}

fn v6_first_usable(net: Ipv6Net) -> Option<Ipv6Addr> {
    // The subnet-router anycast address (host bits zero) is not usable; the next one is.
    let next = u128::from(net.network()).checked_add(1)?;
    let addr = Ipv6Addr::from(next);
    net.contains(&addr).then_some(addr)
}

fn clamp_prefix(explicit: Option<i32>, default: u8, subnet_prefix: Option<u8>, max: u8) -> u8 {
    let wanted = explicit
        .and_then(|p| u8::try_from(p).ok())
        .unwrap_or(default)
        .min(max);
    match subnet_prefix {
        Some(s) => wanted.max(s),
        None => wanted,
    }
}

impl NetworkSpec {
    /// The IPv4 subnet, if there is one (and it is valid).
    pub fn subnet_v4(&self) -> Option<Ipv4Net> {
        self.subnets.iter().find_map(|s| match parse_cidr(s) {
            Ok(IpNet::V4(n)) => Some(n),
            _ => None,
        })
    }

    /// The IPv6 subnet, if there is one (and it is valid).
    pub fn subnet_v6(&self) -> Option<Ipv6Net> {
        self.subnets.iter().find_map(|s| match parse_cidr(s) {
            Ok(IpNet::V6(n)) => Some(n),
            _ => None,
        })
    }

    fn explicit_gateways(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.gateway
            .iter()
            .flatten()
            .filter_map(|g| parse_ip(g).ok())
    }

    /// The IPv4 gateway: `spec.gateway`'s IPv4 address, else the first usable address of the
    /// IPv4 subnet. `None` without an IPv4 subnet.
    pub fn gateway_v4(&self) -> Option<Ipv4Addr> {
        let subnet = self.subnet_v4()?;
        self.explicit_gateways()
            .find_map(|g| match g {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .or_else(|| v4_first_usable(subnet))
    }

    /// The IPv6 gateway: `spec.gateway`'s IPv6 address, else the first address after the IPv6
    /// subnet's network address. `None` without an IPv6 subnet.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        let subnet = self.subnet_v6()?;
        self.explicit_gateways()
            .find_map(|g| match g {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
            .or_else(|| v6_first_usable(subnet))
    }

    /// Prefix length of the IPv4 per-node blocks: `spec.ipam.nodeBlockPrefix` or 26, never
    /// shorter than the IPv4 subnet's prefix.
    pub fn block_prefix_v4(&self) -> u8 {
        clamp_prefix(
            self.ipam.as_ref().and_then(|i| i.node_block_prefix),
            DEFAULT_NODE_BLOCK_PREFIX_V4,
            self.subnet_v4().map(|s| s.prefix_len()),
            32,
        )
    }

    /// Prefix length of the IPv6 per-node blocks: `spec.ipam.nodeBlockPrefixV6` or 122, never
    /// shorter than the IPv6 subnet's prefix.
    pub fn block_prefix_v6(&self) -> u8 {
        clamp_prefix(
            self.ipam.as_ref().and_then(|i| i.node_block_prefix_v6),
            DEFAULT_NODE_BLOCK_PREFIX_V6,
            self.subnet_v6().map(|s| s.prefix_len()),
            128,
        )
    }

    /// The excluded addresses as networks (a single IP becomes a /32 or /128); invalid
    /// entries are left out.
    pub fn excludes(&self) -> Vec<IpNet> {
        self.ipam
            .iter()
            .flat_map(|i| i.exclude.iter().flatten())
            .filter_map(|e| parse_ip_or_cidr(e).ok())
            .collect()
    }

    /// The MTU: `spec.mtu` or 1500.
    pub fn mtu(&self) -> u32 {
        self.mtu
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(DEFAULT_MTU)
    }

    /// Whether outbound traffic is masqueraded: true in NAT mode unless `spec.nat.masquerade`
    /// is false; always false in Bridge mode.
    pub fn masquerade(&self) -> bool {
        self.mode == NetworkMode::Nat && self.nat.as_ref().is_none_or(|n| n.masquerade)
    }

    /// Whether anti-spoofing is on: `spec.security.antiSpoofing`, default true.
    pub fn anti_spoofing(&self) -> bool {
        self.security.as_ref().is_none_or(|s| s.anti_spoofing)
    }

    /// The verdict for traffic no policy matches: `spec.security.defaultAction`, default Allow.
    pub fn default_action(&self) -> Action {
        self.security
            .as_ref()
            .map_or(Action::Allow, |s| s.default_action)
    }

    /// The VLAN ID of a Bridge network, if tagged.
    pub fn vlan(&self) -> Option<u16> {
        self.bridge
            .as_ref()
            .and_then(|b| b.vlan)
            .and_then(|v| u16::try_from(v).ok())
    }

    /// Whether the network's bridge filters VLANs (`spec.bridge.vlanFiltering`): the uplink
    /// is a trunk port of it, and workload ports may be trunks too.
    pub fn vlan_filtering(&self) -> bool {
        self.mode == NetworkMode::Bridge
            && self
                .bridge
                .as_ref()
                .and_then(|b| b.vlan_filtering)
                .unwrap_or(false)
    }

    /// `spec.bridge.trunkVlans` as (first, last) VLAN IDs, malformed entries left out.
    pub fn trunk_vlans(&self) -> Vec<(u16, u16)> {
        self.bridge
            .iter()
            .flat_map(|b| b.trunk_vlans.iter().flatten())
            .filter_map(VlanRange::bounds)
            .collect()
    }

    /// Checks every rule of the CRD schema and its CEL rules (plus the IPv4 broadcast-gateway
    /// rule, which CEL cannot express). Each error names the field, e.g. `spec.subnets[1]`.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Errors::default();
        let subnets = self.validate_subnets(&mut errors);
        self.validate_gateway(&subnets, &mut errors);
        self.validate_ipam(&subnets, &mut errors);
        if let Some(mtu) = self.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            errors.push(
                "spec.mtu",
                format!(
                    "{mtu} is out of range; use {MIN_MTU} to {MAX_MTU}, or leave it out for 1500"
                ),
            );
        }
        if let Some(sel) = &self.node_selector {
            check_selector(sel, "spec.nodeSelector", &mut errors);
        }
        if self.nat.is_some() && self.mode != NetworkMode::Nat {
            errors.push(
                "spec.nat",
                "only allowed when spec.mode is NAT; remove spec.nat or set mode: NAT",
            );
        }
        match (&self.bridge, self.mode) {
            (Some(_), NetworkMode::Nat) => {
                errors.push(
                    "spec.bridge",
                    "only allowed when spec.mode is Bridge; remove spec.bridge or set mode: Bridge",
                );
            }
            (None, NetworkMode::Bridge) => {
                errors.push(
                    "spec.bridge",
                    "required when spec.mode is Bridge: name the uplink interface, e.g. bridge: {uplink: eth1}",
                );
            }
            _ => {}
        }
        if let Some(bridge) = &self.bridge {
            bridge.validate(&mut errors);
        }
        if let Some(limits) = &self.limits {
            limits.validate("spec.limits", &mut errors);
        }
        errors.finish()
    }

    /// Checks an update of a live Network from `old` to `self` against the fields that cannot
    /// change (the CRD's transition rules, which need the old object and so are not part of
    /// [`validate`](Self::validate)): `spec.mode`, `spec.subnets`, `spec.gateway`,
    /// `spec.ipam.nodeBlockPrefix(V6)` and `spec.bridge`'s uplink, vlan, bridgeName and
    /// vlanFiltering. Each error names the field, the old and the new value, and the fix.
    pub fn validate_update(&self, old: &NetworkSpec) -> Result<(), Vec<FieldError>> {
        fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
            v.as_ref().map_or("(unset)".into(), |v| format!("{v:?}"))
        }
        let mut errors = Errors::default();
        let mut immutable = |field: &str, what: &str, before: String, after: String| {
            if before != after {
                errors.push(
                    field,
                    format!(
                        "cannot change on a live Network ({what}; it was {before}, now {after}): put the old value back, or create a new Network and move the workloads to it"
                    ),
                );
            }
        };
        immutable(
            "spec.mode",
            "its workloads are wired for the old mode",
            old.mode.to_string(),
            self.mode.to_string(),
        );
        let subnets = |s: &NetworkSpec| {
            s.subnets
                .iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        immutable(
            "spec.subnets",
            "every node's block and every workload's address come from them",
            format!("[{}]", subnets(old)),
            format!("[{}]", subnets(self)),
        );
        let gateways = |s: &NetworkSpec| {
            s.gateway
                .as_ref()
                .map(|g| g.iter().map(|a| a.0.clone()).collect::<Vec<_>>())
        };
        immutable(
            "spec.gateway",
            "running workloads route through the old gateway",
            show(&gateways(old)),
            show(&gateways(self)),
        );
        let ipam = |s: &NetworkSpec, v6: bool| {
            s.ipam.as_ref().and_then(|i| {
                if v6 {
                    i.node_block_prefix_v6
                } else {
                    i.node_block_prefix
                }
            })
        };
        for (field, v6) in [
            ("spec.ipam.nodeBlockPrefix", false),
            ("spec.ipam.nodeBlockPrefixV6", true),
        ] {
            immutable(
                field,
                "every node's block would be renumbered",
                show(&ipam(old, v6)),
                show(&ipam(self, v6)),
            );
        }
        if let (Some(o), Some(n)) = (&old.bridge, &self.bridge) {
            immutable(
                "spec.bridge.uplink",
                "its workloads are bridged onto the old uplink's segment",
                format!("{:?}", o.uplink),
                format!("{:?}", n.uplink),
            );
            immutable(
                "spec.bridge.vlan",
                "its workloads are on the old VLAN's segment and subnet",
                show(&o.vlan),
                show(&n.vlan),
            );
            immutable(
                "spec.bridge.bridgeName",
                "running workloads' ports are attached to the old bridge",
                show(&o.bridge_name),
                show(&n.bridge_name),
            );
            immutable(
                "spec.bridge.vlanFiltering",
                "the uplink and the running workloads' ports are wired for the old setting",
                o.vlan_filtering.unwrap_or(false).to_string(),
                n.vlan_filtering.unwrap_or(false).to_string(),
            );
        }
        errors.finish()
    }

    /// Checks `spec.subnets`; returns the valid subnets with their index.
    fn validate_subnets(&self, errors: &mut Errors) -> Vec<IpNet> {
        if self.subnets.is_empty() || self.subnets.len() > 2 {
            errors.push(
                "spec.subnets",
                format!(
                    "lists {} subnets; list one IPv4 CIDR, one IPv6 CIDR, or one of each for dual-stack",
                    self.subnets.len()
                ),
            );
        }
        let mut nets = Vec::new();
        for (i, s) in self.subnets.iter().enumerate() {
            let field = format!("spec.subnets[{i}]");
            match parse_cidr(s) {
                Ok(net) => {
                    let (max, family) = match net {
                        IpNet::V4(_) => (30, "an IPv4"),
                        IpNet::V6(_) => (126, "an IPv6"),
                    };
                    if net.prefix_len() > max {
                        errors.push(
                            field,
                            format!(
                                "{net} is too small to hold a gateway and workloads; {family} subnet needs a prefix of /{max} or shorter"
                            ),
                        );
                    }
                    nets.push(net);
                }
                Err(e) => errors.push(field, e.to_string()),
            }
        }
        for (family, is_v4) in [("IPv4", true), ("IPv6", false)] {
            let count = nets
                .iter()
                .filter(|n| matches!(n, IpNet::V4(_)) == is_v4)
                .count();
            if count > 1 {
                errors.push(
                    "spec.subnets",
                    format!("holds {count} {family} CIDRs; a network has at most one subnet per family (one IPv4 and one IPv6 for dual-stack)"),
                );
            }
        }
        nets
    }

    fn validate_gateway(&self, subnets: &[IpNet], errors: &mut Errors) {
        // The API server refuses an edit of spec.gateway: the fix is a new Network.
        const GATEWAY_FIX: &str = "spec.gateway cannot change on a live Network: delete the Network and create it again with a host address as its gateway, such as the first usable one (the default)";
        let Some(gateways) = &self.gateway else {
            return;
        };
        if gateways.len() > 2 {
            errors.push(
                "spec.gateway",
                format!(
                    "lists {} addresses; list at most one IPv4 and one IPv6 address",
                    gateways.len()
                ),
            );
        }
        let mut seen_v4 = 0;
        let mut seen_v6 = 0;
        for (i, g) in gateways.iter().enumerate() {
            let field = format!("spec.gateway[{i}]");
            let addr = match parse_ip(g) {
                Ok(a) => a,
                Err(e) => {
                    errors.push(field, e.to_string());
                    continue;
                }
            };
            if addr.is_ipv4() {
                seen_v4 += 1;
            } else {
                seen_v6 += 1;
            }
            let Some(subnet) = subnets.iter().find(|s| s.contains(&addr)) else {
                let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                errors.push(
                    field,
                    format!(
                        "{addr} is not inside the network's {family} subnet; use an address of that subnet, or add an {family} subnet to spec.subnets"
                    ),
                );
                continue;
            };
            if addr == subnet.network() {
                errors.push(
                    field,
                    format!("{addr} is the network address of {subnet}; {GATEWAY_FIX}"),
                );
            } else if subnet.addr().is_ipv4() && addr == subnet.broadcast() {
                errors.push(
                    field,
                    format!("{addr} is the broadcast address of {subnet}; {GATEWAY_FIX}"),
                );
            }
        }
        for (family, count) in [("IPv4", seen_v4), ("IPv6", seen_v6)] {
            if count > 1 {
                errors.push(
                    "spec.gateway",
                    format!(
                        "holds {count} {family} addresses; list at most one gateway per family"
                    ),
                );
            }
        }
    }

    fn validate_ipam(&self, subnets: &[IpNet], errors: &mut Errors) {
        let Some(ipam) = &self.ipam else {
            return;
        };
        let checks = [
            (
                "spec.ipam.nodeBlockPrefix",
                ipam.node_block_prefix,
                16..=30,
                subnets.iter().find(|s| s.addr().is_ipv4()),
                "IPv4",
            ),
            (
                "spec.ipam.nodeBlockPrefixV6",
                ipam.node_block_prefix_v6,
                64..=126,
                subnets.iter().find(|s| s.addr().is_ipv6()),
                "IPv6",
            ),
        ];
        for (field, value, range, subnet, family) in checks {
            let Some(prefix) = value else { continue };
            if !range.contains(&prefix) {
                errors.push(
                    field,
                    format!(
                        "{prefix} is out of range; use {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
            } else if let Some(s) = subnet
                && prefix < i32::from(s.prefix_len())
            {
                errors.push(
                    field,
                    format!(
                        "/{prefix} blocks are larger than the {family} subnet {s}; use a prefix of at least {} or widen the subnet",
                        s.prefix_len()
                    ),
                );
            }
        }
        let Some(exclude) = &ipam.exclude else {
            return;
        };
        if exclude.len() > MAX_EXCLUDES {
            errors.push(
                "spec.ipam.exclude",
                format!(
                    "lists {} entries; at most {MAX_EXCLUDES} are allowed (merge neighbours into CIDRs)",
                    exclude.len()
                ),
            );
        }
        let mut seen: Vec<(usize, IpNet)> = Vec::new();
        for (i, e) in exclude.iter().enumerate() {
            let field = format!("spec.ipam.exclude[{i}]");
            match parse_ip_or_cidr(e) {
                Ok(net) => {
                    if !subnets.iter().any(|s| s.contains(&net)) {
                        errors.push(
                            field.clone(),
                            format!("{e} is not inside any of spec.subnets; fix or remove it"),
                        );
                    }
                    if let Some((j, other)) = seen
                        .iter()
                        .find(|(_, o)| o.contains(&net) || net.contains(o))
                    {
                        errors.push(
                            field,
                            format!(
                                "{e} overlaps spec.ipam.exclude[{j}] ({other}); list every address once: remove the inner or repeated entry"
                            ),
                        );
                    }
                    seen.push((i, net));
                }
                Err(err) => errors.push(field, err.to_string()),
            }
        }
    }
}

impl BridgeSpec {
    fn validate(&self, errors: &mut Errors) {
        if !matches_ifname_pattern(&self.uplink) {
            errors.push(
                "spec.bridge.uplink",
                format!(
                    "{:?} is not a valid interface name; use 1 to 15 letters, digits, '_', '.' or '-', starting with a letter or digit (e.g. eth1)",
                    self.uplink
                ),
            );
        }
        if let Some(vlan) = self.vlan
            && !(1..=4094).contains(&vlan)
        {
            errors.push(
                "spec.bridge.vlan",
                format!(
                    "{vlan} is not a VLAN ID; use 1 to 4094, or leave it out for untagged traffic"
                ),
            );
        }
        if let Some(name) = &self.bridge_name
            && !matches_ifname_pattern(name)
        {
            errors.push(
                "spec.bridge.bridgeName",
                format!(
                    "{name:?} is not a valid interface name; use 1 to 15 letters, digits, '_', '.' or '-', starting with a letter or digit"
                ),
            );
        }
        self.validate_trunk(errors);
    }

    fn validate_trunk(&self, errors: &mut Errors) {
        let Some(trunk) = &self.trunk_vlans else {
            return;
        };
        if self.vlan_filtering != Some(true) {
            errors.push(
                "spec.bridge.trunkVlans",
                "only allowed with spec.bridge.vlanFiltering: true (trunks need a VLAN-filtering bridge); set vlanFiltering: true or remove trunkVlans",
            );
        }
        if trunk.len() > MAX_TRUNK_VLANS {
            errors.push(
                "spec.bridge.trunkVlans",
                format!(
                    "lists {} entries; at most {MAX_TRUNK_VLANS} are allowed (merge neighbours into ranges)",
                    trunk.len()
                ),
            );
        }
        for (i, r) in trunk.iter().enumerate() {
            let field = format!("spec.bridge.trunkVlans[{i}]");
            for (name, value) in [("id", r.id), ("minId", r.min_id), ("maxId", r.max_id)] {
                if let Some(v) = value
                    && !(2..=4094).contains(&v)
                {
                    errors.push(
                        format!("{field}.{name}"),
                        format!(
                            "{v} is not a trunk VLAN ID; use 2 to 4094 (VLAN 1 is the uplink's untagged VLAN: the node's own traffic)"
                        ),
                    );
                }
            }
            match (r.id, r.min_id, r.max_id) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                (Some(_), _, _) => errors.push(
                    field.clone(),
                    "sets id and a range; give either id (one VLAN) or minId and maxId (a range)",
                ),
                (None, None, None) => errors.push(
                    field.clone(),
                    "is empty; give id (one VLAN) or minId and maxId (a range)",
                ),
                (None, _, _) => errors.push(
                    field.clone(),
                    "a range needs both minId and maxId; add the missing one, or use id for one VLAN",
                ),
            }
            if let (Some(lo), Some(hi)) = (r.min_id, r.max_id)
                && lo > hi
            {
                errors.push(
                    field.clone(),
                    format!("minId {lo} is greater than maxId {hi}; swap them"),
                );
            }
            if let (Some((lo, hi)), Some(own)) = (r.bounds(), self.vlan)
                && (i32::from(lo)..=i32::from(hi)).contains(&own)
            {
                errors.push(
                    field,
                    format!(
                        "includes the network's own VLAN spec.bridge.vlan {own}; workload ports carry it untagged, so leave it out of trunkVlans"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(subnets: &[&str]) -> NetworkSpec {
        NetworkSpec {
            mode: NetworkMode::Nat,
            subnets: subnets.iter().map(|s| Cidr::from(*s)).collect(),
            ..Default::default()
        }
    }

    fn bridge(uplink: &str) -> NetworkSpec {
        NetworkSpec {
            mode: NetworkMode::Bridge,
            subnets: vec!["192.168.100.0/24".into()],
            bridge: Some(BridgeSpec {
                uplink: uplink.into(),
                vlan: Some(10),
                bridge_name: Some("br-vlan10".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_ipam(mut spec: NetworkSpec, f: impl FnOnce(&mut IpamSpec)) -> NetworkSpec {
        let mut ipam = spec.ipam.take().unwrap_or_default();
        f(&mut ipam);
        spec.ipam = Some(ipam);
        spec
    }

    fn with_gateway(mut spec: NetworkSpec, gw: &[&str]) -> NetworkSpec {
        spec.gateway = Some(gw.iter().map(|g| IpAddress::from(*g)).collect());
        spec
    }

    /// Asserts the spec is invalid with an error on exactly `field` whose message contains `needle`.
    #[track_caller]
    fn assert_invalid(spec: &NetworkSpec, field: &str, needle: &str) {
        let errs = spec.validate().expect_err("spec should be invalid");
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message.contains(needle)),
            "expected an error on {field} containing {needle:?}, got {errs:#?}"
        );
    }

    #[test]
    fn valid_specs_pass() {
        let specs = [
            nat(&["10.10.0.0/16"]),
            nat(&["fd10:10::/64"]),
            nat(&["10.10.0.0/16", "fd10:10::/64"]),
            nat(&["10.0.0.0/30"]),
            with_gateway(
                nat(&["10.10.0.0/16", "fd10::/64"]),
                &["10.10.255.254", "fd10::1"],
            ),
            with_ipam(nat(&["10.10.0.0/16", "fd10::/64"]), |i| {
                i.node_block_prefix = Some(24);
                i.node_block_prefix_v6 = Some(120);
                i.exclude = Some(vec![
                    "10.10.0.2/31".into(),
                    "10.10.3.4".into(),
                    "fd10::5".into(),
                ]);
            }),
            NetworkSpec {
                mtu: Some(9000),
                nat: Some(NatSpec { masquerade: false }),
                security: Some(SecuritySpec {
                    anti_spoofing: false,
                    default_action: Action::Deny,
                }),
                ..nat(&["10.10.0.0/16"])
            },
            bridge("eth1"),
            bridge("bond0.100"),
        ];
        for spec in specs {
            assert_eq!(spec.validate(), Ok(()), "{spec:?}");
        }
    }

    #[test]
    fn subnets_must_not_be_empty_or_more_than_two() {
        assert_invalid(&nat(&[]), "spec.subnets", "lists 0 subnets");
        assert_invalid(
            &nat(&["10.0.0.0/16", "10.1.0.0/16", "fd00::/64"]),
            "spec.subnets",
            "lists 3 subnets",
        );
    }

    #[test]
    fn subnets_must_be_cidrs() {
        assert_invalid(&nat(&["10.10.0.0"]), "spec.subnets[0]", "not a CIDR");
        assert_invalid(
            &nat(&["10.0.0.0/16", "fd00::/200"]),
            "spec.subnets[1]",
            "not a CIDR",
        );
    }

    #[test]
    fn subnets_must_be_canonical() {
        assert_invalid(&nat(&["10.10.0.1/16"]), "spec.subnets[0]", "10.10.0.0/16");
        assert_invalid(
            &nat(&["10.0.0.0/8", "fd10::1/64"]),
            "spec.subnets[1]",
            "fd10::/64",
        );
    }

    #[test]
    fn subnets_hold_at_most_one_per_family() {
        assert_invalid(
            &nat(&["10.0.0.0/16", "10.1.0.0/16"]),
            "spec.subnets",
            "2 IPv4",
        );
        assert_invalid(&nat(&["fd00::/64", "fd01::/64"]), "spec.subnets", "2 IPv6");
    }

    #[test]
    fn subnets_must_hold_a_gateway_and_workloads() {
        assert_invalid(&nat(&["10.0.0.0/31"]), "spec.subnets[0]", "/30 or shorter");
        assert_invalid(&nat(&["fd00::/127"]), "spec.subnets[0]", "/126 or shorter");
    }

    #[test]
    fn gateways_must_be_addresses() {
        assert_invalid(
            &with_gateway(nat(&["10.0.0.0/16"]), &["10.0.0.1/16"]),
            "spec.gateway[0]",
            "not an IP",
        );
    }

    #[test]
    fn gateways_must_lie_in_the_subnet_of_their_family() {
        assert_invalid(
            &with_gateway(nat(&["10.0.0.0/16"]), &["10.1.0.1"]),
            "spec.gateway[0]",
            "not inside",
        );
        assert_invalid(
            &with_gateway(nat(&["10.0.0.0/16"]), &["10.0.0.1", "fd00::1"]),
            "spec.gateway[1]",
            "add an IPv6 subnet",
        );
    }

    #[test]
    fn gateways_must_not_be_network_or_broadcast() {
        assert_invalid(
            &with_gateway(nat(&["10.0.0.0/16"]), &["10.0.0.0"]),
            "spec.gateway[0]",
            "network address",
        );
        assert_invalid(
            &with_gateway(nat(&["10.0.0.0/16"]), &["10.0.255.255"]),
            "spec.gateway[0]",
            "broadcast",
        );
        assert_invalid(
            &with_gateway(nat(&["fd00::/64"]), &["fd00::"]),
            "spec.gateway[0]",
            "network address",
        );
        // spec.gateway cannot change on a live Network: the fix is a new Network, not an edit.
        for gateway in ["10.0.0.0", "10.0.255.255"] {
            assert_invalid(
                &with_gateway(nat(&["10.0.0.0/16"]), &[gateway]),
                "spec.gateway[0]",
                "delete the Network and create it again with a host address as its gateway",
            );
        }
        // IPv6 has no broadcast address.
        let last_v6 = with_gateway(nat(&["fd00::/120"]), &["fd00::ff"]);
        assert_eq!(last_v6.validate(), Ok(()));
    }

    #[test]
    fn gateways_hold_at_most_one_per_family() {
        let spec = with_gateway(nat(&["10.0.0.0/16"]), &["10.0.0.1", "10.0.0.2"]);
        assert_invalid(&spec, "spec.gateway", "2 IPv4");
        let spec = with_gateway(
            nat(&["10.0.0.0/16", "fd00::/64"]),
            &["10.0.0.1", "fd00::1", "fd00::2"],
        );
        assert_invalid(&spec, "spec.gateway", "lists 3 addresses");
        assert_invalid(&spec, "spec.gateway", "2 IPv6");
    }

    #[test]
    fn node_block_prefixes_are_range_checked() {
        let spec = with_ipam(nat(&["10.0.0.0/8"]), |i| i.node_block_prefix = Some(31));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefix", "16 to 30");
        let spec = with_ipam(nat(&["10.0.0.0/8"]), |i| i.node_block_prefix = Some(15));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefix", "16 to 30");
        let spec = with_ipam(nat(&["fd00::/48"]), |i| i.node_block_prefix_v6 = Some(127));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefixV6", "64 to 126");
        let spec = with_ipam(nat(&["fd00::/48"]), |i| i.node_block_prefix_v6 = Some(63));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefixV6", "64 to 126");
    }

    #[test]
    fn node_blocks_must_not_be_larger_than_the_subnet() {
        let spec = with_ipam(nat(&["10.0.0.0/24"]), |i| i.node_block_prefix = Some(20));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefix", "at least 24");
        let spec = with_ipam(nat(&["fd00::/96"]), |i| i.node_block_prefix_v6 = Some(80));
        assert_invalid(&spec, "spec.ipam.nodeBlockPrefixV6", "at least 96");
    }

    #[test]
    fn excludes_must_be_valid_and_inside_a_subnet() {
        let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
            i.exclude = Some(vec!["10.0.0.0/24".into(), "bogus".into()])
        });
        assert_invalid(
            &spec,
            "spec.ipam.exclude[1]",
            "neither an IP address nor a CIDR",
        );
        let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
            i.exclude = Some(vec!["10.0.0.5/24".into()])
        });
        assert_invalid(&spec, "spec.ipam.exclude[0]", "10.0.0.0/24");
        let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
            i.exclude = Some(vec!["10.1.0.5".into()])
        });
        assert_invalid(&spec, "spec.ipam.exclude[0]", "not inside");
        let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
            i.exclude = Some(vec!["10.0.0.0/8".into()])
        });
        assert_invalid(&spec, "spec.ipam.exclude[0]", "not inside");
        let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
            i.exclude = Some(vec!["10.0.0.1".into(); 65])
        });
        assert_invalid(&spec, "spec.ipam.exclude", "at most 64");
    }

    #[test]
    fn excludes_must_not_overlap_each_other() {
        for (list, field, needle) in [
            (
                vec!["10.0.1.0/24", "10.0.1.7"],
                "spec.ipam.exclude[1]",
                "overlaps spec.ipam.exclude[0] (10.0.1.0/24)",
            ),
            (
                vec!["10.0.1.7", "10.0.0.0/23"],
                "spec.ipam.exclude[1]",
                "overlaps spec.ipam.exclude[0]",
            ),
            (
                vec!["10.0.2.0/24", "10.0.1.5", "10.0.1.5"],
                "spec.ipam.exclude[2]",
                "overlaps spec.ipam.exclude[1]",
            ),
            (
                vec!["10.0.0.0/24", "10.0.0.128/25"],
                "spec.ipam.exclude[1]",
                "overlaps spec.ipam.exclude[0]",
            ),
        ] {
            let spec = with_ipam(nat(&["10.0.0.0/16"]), |i| {
                i.exclude = Some(list.iter().map(|e| IpOrCidr::from(*e)).collect())
            });
            assert_invalid(&spec, field, needle);
        }
        let neighbours = with_ipam(nat(&["10.0.0.0/16", "fd10::/64"]), |i| {
            i.exclude = Some(vec![
                "10.0.0.0/25".into(),
                "10.0.0.128/25".into(),
                "10.0.1.0".into(),
                "10.0.1.1".into(),
                "fd10::5".into(),
            ])
        });
        assert_eq!(neighbours.validate(), Ok(()));
    }

    #[test]
    fn updates_keep_mode_subnets_gateway_block_size_and_bridge_wiring() {
        let old = bridge("eth1");
        assert_eq!(old.validate_update(&old), Ok(()));
        let fields = |new: &NetworkSpec| -> Vec<String> {
            new.validate_update(&old)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        let mut new = old.clone();
        new.subnets = vec!["192.168.200.0/24".into()];
        assert_eq!(fields(&new), ["spec.subnets"]);
        let err = &new.validate_update(&old).unwrap_err()[0];
        assert!(
            err.message.contains("192.168.100.0/24")
                && err.message.contains("192.168.200.0/24")
                && err.message.contains("create a new Network"),
            "{err}"
        );
        let mut new = old.clone();
        new.subnets.push("fd10::/64".into());
        assert_eq!(fields(&new), ["spec.subnets"]);
        let mut new = old.clone();
        if let Some(b) = new.bridge.as_mut() {
            b.uplink = "eth2".into();
            b.vlan = None;
            b.bridge_name = Some("br-other".into());
            b.vlan_filtering = Some(true);
        }
        assert_eq!(
            fields(&new),
            [
                "spec.bridge.uplink",
                "spec.bridge.vlan",
                "spec.bridge.bridgeName",
                "spec.bridge.vlanFiltering"
            ]
        );
        let mut new = with_gateway(old.clone(), &["192.168.100.254"]);
        new = with_ipam(new, |i| i.node_block_prefix = Some(28));
        assert_eq!(fields(&new), ["spec.gateway", "spec.ipam.nodeBlockPrefix"]);
        let mut new = nat(&["192.168.100.0/24"]);
        new.bridge = None;
        assert!(fields(&new).contains(&"spec.mode".to_owned()));
        // What may change: MTU, excludes, node selector, security, trunks, explicit false.
        let mut new = with_ipam(old.clone(), |i| {
            i.exclude = Some(vec!["192.168.100.7".into()])
        });
        new.mtu = Some(9000);
        new.security = Some(SecuritySpec {
            anti_spoofing: false,
            default_action: Action::Deny,
        });
        new.node_selector = Some(LabelSelector::default());
        if let Some(b) = new.bridge.as_mut() {
            b.vlan_filtering = Some(false);
        }
        assert_eq!(new.validate_update(&old), Ok(()));
    }

    #[test]
    fn mtu_is_range_checked() {
        for bad in [0, 575, 9217, -1] {
            let spec = NetworkSpec {
                mtu: Some(bad),
                ..nat(&["10.0.0.0/16"])
            };
            assert_invalid(&spec, "spec.mtu", "576 to 9216");
        }
        for ok in [576, 1500, 9216] {
            let spec = NetworkSpec {
                mtu: Some(ok),
                ..nat(&["10.0.0.0/16"])
            };
            assert_eq!(spec.validate(), Ok(()));
        }
    }

    #[test]
    fn node_selector_must_be_well_formed() {
        let spec = NetworkSpec {
            node_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "zone".into(),
                        operator: "Equals".into(),
                        values: Some(vec!["a".into()]),
                    },
                ]),
                match_labels: None,
            }),
            ..nat(&["10.0.0.0/16"])
        };
        assert_invalid(
            &spec,
            "spec.nodeSelector.matchExpressions[0].operator",
            "unknown operator",
        );
    }

    #[test]
    fn nat_is_only_allowed_in_nat_mode() {
        let spec = NetworkSpec {
            nat: Some(NatSpec::default()),
            ..bridge("eth1")
        };
        assert_invalid(&spec, "spec.nat", "only allowed when spec.mode is NAT");
    }

    #[test]
    fn bridge_is_only_allowed_in_bridge_mode() {
        let spec = NetworkSpec {
            mode: NetworkMode::Nat,
            ..bridge("eth1")
        };
        assert_invalid(
            &spec,
            "spec.bridge",
            "only allowed when spec.mode is Bridge",
        );
    }

    #[test]
    fn bridge_mode_requires_bridge_settings() {
        let spec = NetworkSpec {
            bridge: None,
            ..bridge("eth1")
        };
        assert_invalid(&spec, "spec.bridge", "required when spec.mode is Bridge");
    }

    #[test]
    fn bridge_names_and_vlan_are_checked() {
        assert_invalid(
            &bridge(""),
            "spec.bridge.uplink",
            "not a valid interface name",
        );
        assert_invalid(
            &bridge("a-very-long-uplink0"),
            "spec.bridge.uplink",
            "1 to 15",
        );
        let mut spec = bridge("eth1");
        if let Some(b) = spec.bridge.as_mut() {
            b.vlan = Some(4095);
            b.bridge_name = Some("br/x".into());
        }
        assert_invalid(&spec, "spec.bridge.vlan", "1 to 4094");
        assert_invalid(
            &spec,
            "spec.bridge.bridgeName",
            "not a valid interface name",
        );
        if let Some(b) = spec.bridge.as_mut() {
            b.vlan = Some(0);
        }
        assert_invalid(&spec, "spec.bridge.vlan", "1 to 4094");
    }

    fn trunk(vlan: Option<i32>, filtering: Option<bool>, ranges: &[VlanRange]) -> NetworkSpec {
        let mut spec = bridge("eth1");
        if let Some(b) = spec.bridge.as_mut() {
            b.vlan = vlan;
            b.vlan_filtering = filtering;
            b.trunk_vlans = Some(ranges.to_vec());
        }
        spec
    }

    fn id(id: i32) -> VlanRange {
        VlanRange {
            id: Some(id),
            ..Default::default()
        }
    }

    fn range(lo: i32, hi: i32) -> VlanRange {
        VlanRange {
            id: None,
            min_id: Some(lo),
            max_id: Some(hi),
        }
    }

    #[test]
    fn trunk_vlans_are_ids_or_ordered_ranges_without_the_own_vlan() {
        let ok = trunk(Some(10), Some(true), &[id(20), range(100, 199)]);
        assert_eq!(ok.validate(), Ok(()));
        assert!(ok.vlan_filtering());
        assert_eq!(ok.trunk_vlans(), [(20, 20), (100, 199)]);
        assert_eq!(trunk(None, Some(true), &[id(2)]).validate(), Ok(()));
        assert_invalid(
            &trunk(Some(10), None, &[id(20)]),
            "spec.bridge.trunkVlans",
            "only allowed with spec.bridge.vlanFiltering: true",
        );
        assert_invalid(
            &trunk(Some(10), Some(false), &[id(20)]),
            "spec.bridge.trunkVlans",
            "set vlanFiltering: true",
        );
        assert_invalid(
            &trunk(Some(10), Some(true), &[id(0)]),
            "spec.bridge.trunkVlans[0].id",
            "use 2 to 4094",
        );
        assert_invalid(
            &trunk(Some(10), Some(true), &[id(20), range(100, 4095)]),
            "spec.bridge.trunkVlans[1].maxId",
            "use 2 to 4094",
        );
        assert_invalid(
            &trunk(Some(10), Some(true), &[range(200, 100)]),
            "spec.bridge.trunkVlans[0]",
            "swap them",
        );
        assert_invalid(
            &trunk(
                Some(10),
                Some(true),
                &[VlanRange {
                    id: Some(5),
                    min_id: Some(1),
                    max_id: Some(3),
                }],
            ),
            "spec.bridge.trunkVlans[0]",
            "either id",
        );
        assert_invalid(
            &trunk(Some(10), Some(true), &[VlanRange::default()]),
            "spec.bridge.trunkVlans[0]",
            "is empty",
        );
        assert_invalid(
            &trunk(
                Some(10),
                Some(true),
                &[VlanRange {
                    min_id: Some(5),
                    ..Default::default()
                }],
            ),
            "spec.bridge.trunkVlans[0]",
            "needs both minId and maxId",
        );
        assert_invalid(
            &trunk(Some(10), Some(true), &[range(5, 15)]),
            "spec.bridge.trunkVlans[0]",
            "own VLAN spec.bridge.vlan 10",
        );
        // VLAN 1 is the uplink's untagged VLAN (the node's own traffic), never a trunk VLAN.
        for (spec, field) in [
            (
                trunk(None, Some(true), &[id(1)]),
                "spec.bridge.trunkVlans[0].id",
            ),
            (
                trunk(Some(10), Some(true), &[range(1, 5)]),
                "spec.bridge.trunkVlans[0].minId",
            ),
        ] {
            assert_invalid(&spec, field, "VLAN 1 is the uplink's untagged VLAN");
        }
        assert_invalid(
            &trunk(Some(10), Some(true), &vec![id(20); 65]),
            "spec.bridge.trunkVlans",
            "at most 64",
        );
        // vlanFiltering alone (no trunks) is fine; in NAT mode it means nothing.
        let mut plain = bridge("eth1");
        if let Some(b) = plain.bridge.as_mut() {
            b.vlan_filtering = Some(true);
        }
        assert_eq!(plain.validate(), Ok(()));
        assert!(plain.vlan_filtering());
        assert!(!bridge("eth1").vlan_filtering());
    }

    #[test]
    fn trunk_vlans_read_from_yaml_in_the_documented_shape() {
        let spec: NetworkSpec = serde_saphyr::from_str(
            "{mode: Bridge, subnets: [192.168.0.0/24], bridge: {uplink: eth1, vlan: 10, vlanFiltering: true, trunkVlans: [{id: 20}, {minId: 100, maxId: 199}]}}",
        )
        .unwrap();
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.trunk_vlans(), [(20, 20), (100, 199)]);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["bridge"]["trunkVlans"][1]["minId"], 100);
        assert!(json["bridge"]["trunkVlans"][0].get("minId").is_none());
    }

    #[test]
    fn errors_display_as_field_colon_message() {
        let errs = nat(&["10.0.0.1/16"]).validate().unwrap_err();
        assert!(
            errs[0].to_string().starts_with("spec.subnets[0]: "),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn subnets_by_family() {
        let spec = nat(&["fd10::/64", "10.10.0.0/16"]);
        assert_eq!(spec.subnet_v4(), Some("10.10.0.0/16".parse().unwrap()));
        assert_eq!(spec.subnet_v6(), Some("fd10::/64".parse().unwrap()));
        assert_eq!(nat(&["10.10.0.0/16"]).subnet_v6(), None);
        assert_eq!(nat(&["fd10::/64"]).subnet_v4(), None);
    }

    #[test]
    fn gateways_default_to_the_first_usable_address() {
        let spec = nat(&["10.10.0.0/16", "fd10::/64"]);
        assert_eq!(spec.gateway_v4(), Some("10.10.0.1".parse().unwrap()));
        assert_eq!(spec.gateway_v6(), Some("fd10::1".parse().unwrap()));
        let spec = with_gateway(spec, &["fd10::fe", "10.10.9.9"]);
        assert_eq!(spec.gateway_v4(), Some("10.10.9.9".parse().unwrap()));
        assert_eq!(spec.gateway_v6(), Some("fd10::fe".parse().unwrap()));
        assert_eq!(nat(&["fd10::/64"]).gateway_v4(), None);
        assert_eq!(
            nat(&["10.0.0.0/30"]).gateway_v4(),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn block_prefixes_default_and_clamp_to_the_subnet() {
        let spec = nat(&["10.10.0.0/16", "fd10::/64"]);
        assert_eq!(spec.block_prefix_v4(), 26);
        assert_eq!(spec.block_prefix_v6(), 122);
        let small = nat(&["10.10.0.0/28", "fd10::/124"]);
        assert_eq!(small.block_prefix_v4(), 28);
        assert_eq!(small.block_prefix_v6(), 124);
        let explicit = with_ipam(nat(&["10.10.0.0/16", "fd10::/64"]), |i| {
            i.node_block_prefix = Some(24);
            i.node_block_prefix_v6 = Some(112);
        });
        assert_eq!(explicit.block_prefix_v4(), 24);
        assert_eq!(explicit.block_prefix_v6(), 112);
        let too_large = with_ipam(nat(&["10.10.0.0/24"]), |i| i.node_block_prefix = Some(20));
        assert_eq!(too_large.block_prefix_v4(), 24);
    }

    #[test]
    fn excludes_turn_single_ips_into_host_networks() {
        let spec = with_ipam(nat(&["10.10.0.0/16", "fd10::/64"]), |i| {
            i.exclude = Some(vec![
                "10.10.0.2/31".into(),
                "10.10.3.4".into(),
                "fd10::5".into(),
                "junk".into(),
            ]);
        });
        let got: Vec<String> = spec.excludes().iter().map(|n| n.to_string()).collect();
        assert_eq!(got, ["10.10.0.2/31", "10.10.3.4/32", "fd10::5/128"]);
        assert!(nat(&["10.10.0.0/16"]).excludes().is_empty());
    }

    #[test]
    fn scalar_accessors_apply_defaults() {
        let spec = nat(&["10.10.0.0/16"]);
        assert_eq!(spec.mtu(), 1500);
        assert!(spec.masquerade());
        assert!(spec.anti_spoofing());
        assert_eq!(spec.default_action(), Action::Allow);
        assert_eq!(spec.vlan(), None);
        let spec = NetworkSpec {
            mtu: Some(9000),
            nat: Some(NatSpec { masquerade: false }),
            security: Some(SecuritySpec {
                anti_spoofing: false,
                default_action: Action::Deny,
            }),
            ..spec
        };
        assert_eq!(spec.mtu(), 9000);
        assert!(!spec.masquerade());
        assert!(!spec.anti_spoofing());
        assert_eq!(spec.default_action(), Action::Deny);
        assert!(!bridge("eth1").masquerade());
        assert_eq!(bridge("eth1").vlan(), Some(10));
    }

    #[test]
    fn yaml_uses_the_documented_names_and_defaults() {
        let yaml = r#"
mode: NAT
subnets: [10.10.0.0/16, "fd10::/64"]
ipam: {nodeBlockPrefix: 24, nodeBlockPrefixV6: 120, exclude: [10.10.0.5]}
nodeSelector: {matchLabels: {zone: a}}
nat: {}
security: {}
"#;
        let spec: NetworkSpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(spec.mode, NetworkMode::Nat);
        assert_eq!(
            spec.ipam.as_ref().and_then(|i| i.node_block_prefix_v6),
            Some(120)
        );
        assert!(spec.masquerade());
        assert!(spec.anti_spoofing());
        assert_eq!(spec.default_action(), Action::Allow);
        assert_eq!(spec.validate(), Ok(()));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["mode"], "NAT");
        assert_eq!(json["nat"]["masquerade"], true);
        assert_eq!(json["security"]["defaultAction"], "Allow");
        assert!(json.get("gateway").is_none());
        let bridge: NetworkSpec = serde_saphyr::from_str(
            "{mode: Bridge, subnets: [192.168.0.0/24], bridge: {uplink: eth1, bridgeName: br0}}",
        )
        .unwrap();
        assert_eq!(bridge.mode, NetworkMode::Bridge);
        assert_eq!(
            bridge
                .bridge
                .as_ref()
                .and_then(|b| b.bridge_name.as_deref()),
            Some("br0")
        );
        assert!(
            serde_saphyr::from_str::<NetworkSpec>("{mode: nat, subnets: [10.0.0.0/8]}").is_err()
        );
    }
}

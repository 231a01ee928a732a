//! The CEL validation rules (`x-kubernetes-validations`) of the CRDs.
//!
//! Every rule lives here once, as a constant, and is attached to the schema from there (the
//! `#[x_kube(validation = ...)]` attributes and the address newtypes' schemas), so the tests can
//! check that each one is present in the generated YAML. The same checks are written in Rust in
//! `NetworkSpec::validate` and `PortForwardSpec::validate`.
//!
//! The rules use only the standard CEL environment of Kubernetes 1.31+ (its `ip`/`cidr`
//! libraries included). `cidr.containsCIDR()` is avoided on purpose: before
//! kubernetes/kubernetes#130450 it wrongly returned false for a sub-CIDR whose address differs from
//! the outer one, so containment is written with `containsIP` plus a prefix-length comparison.
//! A rule that depends on another field guards against values that a field-level rule already
//! rejects (`!isCIDR(s) || ...`), so a bad value yields one clear message, not an evaluation error.
//!
//! The apiserver refuses a CRD whose rules it cannot price within its budget (per rule
//! 10,000,000 cost units, times how often the rule can run; 100,000,000 for a whole schema).
//! Two things keep weft's rules inside it:
//! - Every list has `maxItems` and every string `maxLength` (or an enum): the estimator
//!   multiplies a rule's cost by the `maxItems` of every list above it and prices a string by
//!   four bytes per allowed character.
//! - IP and CIDR values are compared with `==` only, written `!(a == b)` for "differ": the
//!   apiserver's cost library prices `==` on them but has no entry for `!=`, so a `!=` on two
//!   addresses is estimated as unbounded.

use serde_json::{Value, json};

/// One CEL validation rule as it appears in the CRD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CelRule {
    /// The CEL expression; `self` is the value of the schema node that carries the rule.
    pub rule: &'static str,
    /// The message the apiserver returns when the rule fails: which field, and the fix.
    pub message: &'static str,
    /// The field the error is reported on, relative to the node that carries the rule
    /// (for rules on an object that check one of its fields), e.g. `.bridge`.
    pub field_path: Option<&'static str>,
}

impl CelRule {
    /// The rule as a `x-kubernetes-validations` entry.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "rule": self.rule, "message": self.message });
        if let (Some(path), Value::Object(map)) = (self.field_path, &mut v) {
            map.insert("fieldPath".into(), Value::String(path.into()));
        }
        v
    }
}

impl From<&CelRule> for kube::core::Rule {
    fn from(r: &CelRule) -> Self {
        let rule = kube::core::Rule::new(r.rule).message(r.message);
        match r.field_path {
            Some(path) => rule.field_path(path),
            None => rule,
        }
    }
}

// ---- address strings (attached to every field of that type) ----

/// A [`Cidr`](crate::Cidr) must parse as a CIDR.
pub const CIDR_VALID: CelRule = CelRule {
    rule: "isCIDR(self)",
    message: "must be a CIDR (address/prefix-length) such as 10.10.0.0/16 or fd10::/64",
    field_path: None,
};

/// A [`Cidr`](crate::Cidr) must be in canonical form (host bits zero).
pub const CIDR_CANONICAL: CelRule = CelRule {
    rule: "!isCIDR(self) || cidr(self) == cidr(self).masked()",
    message: "must be in canonical form with the host bits zero, e.g. 10.10.0.0/16 rather than 10.10.0.1/16",
    field_path: None,
};

/// An [`IpAddress`](crate::IpAddress) must parse as an IP address.
pub const IP_VALID: CelRule = CelRule {
    rule: "isIP(self)",
    message: "must be an IPv4 or IPv6 address such as 10.10.0.1 or fd10::1",
    field_path: None,
};

/// An [`IpOrCidr`](crate::IpOrCidr) must be an address or a CIDR.
pub const IP_OR_CIDR_VALID: CelRule = CelRule {
    rule: "isIP(self) || isCIDR(self)",
    message: "must be an IP address such as 10.10.0.5 or a CIDR such as 10.10.0.0/28",
    field_path: None,
};

/// An [`IpOrCidr`](crate::IpOrCidr) that is a CIDR must be in canonical form.
pub const IP_OR_CIDR_CANONICAL: CelRule = CelRule {
    rule: "!isCIDR(self) || cidr(self) == cidr(self).masked()",
    message: "a CIDR must have its host bits zero, e.g. 10.10.0.0/28 rather than 10.10.0.5/28",
    field_path: None,
};

// ---- Network: spec.subnets ----

/// `spec.subnets`: at most one IPv4 subnet.
pub const SUBNETS_ONE_V4: CelRule = CelRule {
    rule: "self.filter(s, isCIDR(s) && cidr(s).ip().family() == 4).size() <= 1",
    message: "subnets may hold at most one IPv4 CIDR (and one IPv6 CIDR for dual-stack); remove the extra one",
    field_path: None,
};

/// `spec.subnets`: at most one IPv6 subnet.
pub const SUBNETS_ONE_V6: CelRule = CelRule {
    rule: "self.filter(s, isCIDR(s) && cidr(s).ip().family() == 6).size() <= 1",
    message: "subnets may hold at most one IPv6 CIDR (and one IPv4 CIDR for dual-stack); remove the extra one",
    field_path: None,
};

/// `spec.subnets`: room for a gateway and workloads.
pub const SUBNETS_LARGE_ENOUGH: CelRule = CelRule {
    rule: "self.all(s, !isCIDR(s) || cidr(s).prefixLength() <= (cidr(s).ip().family() == 4 ? 30 : 126))",
    message: "a subnet needs room for a gateway and workloads: use an IPv4 prefix of /30 or shorter and an IPv6 prefix of /126 or shorter",
    field_path: None,
};

// ---- Network: spec.gateway ----

/// `spec.gateway`: at most one IPv4 gateway.
pub const GATEWAY_ONE_V4: CelRule = CelRule {
    rule: "self.filter(g, isIP(g) && ip(g).family() == 4).size() <= 1",
    message: "gateway may hold at most one IPv4 address (and one IPv6 address); remove the extra one",
    field_path: None,
};

/// `spec.gateway`: at most one IPv6 gateway.
pub const GATEWAY_ONE_V6: CelRule = CelRule {
    rule: "self.filter(g, isIP(g) && ip(g).family() == 6).size() <= 1",
    message: "gateway may hold at most one IPv6 address (and one IPv4 address); remove the extra one",
    field_path: None,
};

// ---- Network: spec ----

/// `spec.bridge` only with mode Bridge.
pub const NETWORK_BRIDGE_ONLY_IN_BRIDGE_MODE: CelRule = CelRule {
    rule: "!has(self.bridge) || self.mode == 'Bridge'",
    message: "spec.bridge is only allowed when spec.mode is Bridge; remove spec.bridge or set mode: Bridge",
    field_path: Some(".bridge"),
};

/// Mode Bridge needs `spec.bridge` (whose `uplink` is required).
pub const NETWORK_BRIDGE_REQUIRED: CelRule = CelRule {
    rule: "self.mode != 'Bridge' || has(self.bridge)",
    message: "spec.mode Bridge needs spec.bridge with the uplink interface, e.g. bridge: {uplink: eth1}",
    field_path: Some(".bridge"),
};

/// `spec.nat` only with mode NAT.
pub const NETWORK_NAT_ONLY_IN_NAT_MODE: CelRule = CelRule {
    rule: "!has(self.nat) || self.mode == 'NAT'",
    message: "spec.nat is only allowed when spec.mode is NAT; remove spec.nat or set mode: NAT",
    field_path: Some(".nat"),
};

/// Every gateway lies inside the subnet of its family.
pub const NETWORK_GATEWAY_IN_SUBNET: CelRule = CelRule {
    rule: "!has(self.gateway) || self.gateway.all(g, !isIP(g) || self.subnets.exists(s, isCIDR(s) && cidr(s).containsIP(g)))",
    message: "each spec.gateway address must lie inside the spec.subnets entry of its family; fix the address or add that family's subnet",
    field_path: Some(".gateway"),
};

/// No gateway is its subnet's network address. (The IPv4 broadcast address cannot be expressed
/// in CEL; `NetworkSpec::validate` checks it.)
pub const NETWORK_GATEWAY_NOT_NETWORK_ADDRESS: CelRule = CelRule {
    rule: "!has(self.gateway) || self.gateway.all(g, !isIP(g) || self.subnets.all(s, !isCIDR(s) || !(cidr(s).ip() == ip(g))))",
    message: "a spec.gateway address must not be its subnet's network address; use a host address such as the first usable one (the default)",
    field_path: Some(".gateway"),
};

/// The IPv4 node block is not larger than the IPv4 subnet.
pub const NETWORK_NODE_BLOCK_PREFIX_V4: CelRule = CelRule {
    rule: "!has(self.ipam) || !has(self.ipam.nodeBlockPrefix) || self.subnets.all(s, !isCIDR(s) || cidr(s).ip().family() != 4 || cidr(s).prefixLength() <= self.ipam.nodeBlockPrefix)",
    message: "spec.ipam.nodeBlockPrefix must be at least the IPv4 subnet's prefix length (a node block cannot be larger than the subnet); raise it or widen the subnet",
    field_path: Some(".ipam.nodeBlockPrefix"),
};

/// The IPv6 node block is not larger than the IPv6 subnet.
pub const NETWORK_NODE_BLOCK_PREFIX_V6: CelRule = CelRule {
    rule: "!has(self.ipam) || !has(self.ipam.nodeBlockPrefixV6) || self.subnets.all(s, !isCIDR(s) || cidr(s).ip().family() != 6 || cidr(s).prefixLength() <= self.ipam.nodeBlockPrefixV6)",
    message: "spec.ipam.nodeBlockPrefixV6 must be at least the IPv6 subnet's prefix length (a node block cannot be larger than the subnet); raise it or widen the subnet",
    field_path: Some(".ipam.nodeBlockPrefixV6"),
};

/// Every excluded address or CIDR lies inside one of the subnets.
pub const NETWORK_EXCLUDE_IN_SUBNET: CelRule = CelRule {
    rule: "!has(self.ipam) || !has(self.ipam.exclude) || self.ipam.exclude.all(e, !(isIP(e) || isCIDR(e)) || self.subnets.exists(s, isCIDR(s) && (isIP(e) ? cidr(s).containsIP(e) : (cidr(s).containsIP(cidr(e).ip()) && cidr(e).prefixLength() >= cidr(s).prefixLength()))))",
    message: "each spec.ipam.exclude entry must lie inside one of spec.subnets; fix or remove it",
    field_path: Some(".ipam.exclude"),
};

/// `spec.bridge.trunkVlans` only with `spec.bridge.vlanFiltering: true`.
pub const NETWORK_TRUNK_NEEDS_VLAN_FILTERING: CelRule = CelRule {
    rule: "!has(self.bridge) || !has(self.bridge.trunkVlans) || (has(self.bridge.vlanFiltering) && self.bridge.vlanFiltering)",
    message: "spec.bridge.trunkVlans is only allowed with spec.bridge.vlanFiltering: true (trunks need a VLAN-filtering bridge); set vlanFiltering: true or remove trunkVlans",
    field_path: Some(".bridge.trunkVlans"),
};

/// `spec.bridge.trunkVlans` leaves out the network's own VLAN (`spec.bridge.vlan`; VLAN 1, the
/// uplink's untagged one, is outside the entries' range anyway).
pub const NETWORK_TRUNK_EXCLUDES_OWN_VLAN: CelRule = CelRule {
    rule: "!has(self.bridge) || !has(self.bridge.trunkVlans) || !has(self.bridge.vlan) || self.bridge.trunkVlans.all(t, has(t.id) ? t.id != self.bridge.vlan : (!has(t.minId) || !has(t.maxId) || self.bridge.vlan < t.minId || self.bridge.vlan > t.maxId))",
    message: "spec.bridge.trunkVlans must not include the network's own VLAN spec.bridge.vlan: workload ports carry it untagged; leave it out",
    field_path: Some(".bridge.trunkVlans"),
};

// ---- Network: what may not change on a live Network (transition rules) ----
//
// A rule that compares `self` with `oldSelf` runs on updates only, and only when the node
// exists in both the old and the new object. So `spec.mode` and `spec.subnets` (required)
// carry `self == oldSelf` themselves, and optional fields are compared from their parent with
// a `has()` on both sides, which also catches a field that is added or removed.

/// `spec.mode` is immutable.
pub const NETWORK_MODE_IMMUTABLE: CelRule = CelRule {
    rule: "self == oldSelf",
    message: "spec.mode cannot change on a live Network (its workloads are wired for the old mode): create a new Network with the other mode and move the workloads to it",
    field_path: None,
};

/// `spec.subnets` is immutable.
pub const NETWORK_SUBNETS_IMMUTABLE: CelRule = CelRule {
    rule: "self == oldSelf",
    message: "spec.subnets cannot change on a live Network (every node's block and every workload's address come from them): create a new Network with the new subnets and move the workloads to it",
    field_path: None,
};

/// `spec.gateway` is immutable (added, removed or changed).
pub const NETWORK_GATEWAY_IMMUTABLE: CelRule = CelRule {
    rule: "has(self.gateway) == has(oldSelf.gateway) && (!has(self.gateway) || self.gateway == oldSelf.gateway)",
    message: "spec.gateway cannot change on a live Network (running workloads route through the old gateway): create a new Network with the new gateway and move the workloads to it",
    field_path: Some(".gateway"),
};

/// `spec.ipam.nodeBlockPrefix` is immutable (added, removed or changed).
pub const NETWORK_NODE_BLOCK_PREFIX_V4_IMMUTABLE: CelRule = CelRule {
    rule: "(has(self.ipam) && has(self.ipam.nodeBlockPrefix)) == (has(oldSelf.ipam) && has(oldSelf.ipam.nodeBlockPrefix)) && (!has(self.ipam) || !has(self.ipam.nodeBlockPrefix) || self.ipam.nodeBlockPrefix == oldSelf.ipam.nodeBlockPrefix)",
    message: "spec.ipam.nodeBlockPrefix cannot change on a live Network (every node's block would be renumbered): create a new Network with the new block size and move the workloads to it",
    field_path: Some(".ipam.nodeBlockPrefix"),
};

/// `spec.ipam.nodeBlockPrefixV6` is immutable (added, removed or changed).
pub const NETWORK_NODE_BLOCK_PREFIX_V6_IMMUTABLE: CelRule = CelRule {
    rule: "(has(self.ipam) && has(self.ipam.nodeBlockPrefixV6)) == (has(oldSelf.ipam) && has(oldSelf.ipam.nodeBlockPrefixV6)) && (!has(self.ipam) || !has(self.ipam.nodeBlockPrefixV6) || self.ipam.nodeBlockPrefixV6 == oldSelf.ipam.nodeBlockPrefixV6)",
    message: "spec.ipam.nodeBlockPrefixV6 cannot change on a live Network (every node's block would be renumbered): create a new Network with the new block size and move the workloads to it",
    field_path: Some(".ipam.nodeBlockPrefixV6"),
};

/// `spec.bridge.uplink` is immutable.
pub const NETWORK_UPLINK_IMMUTABLE: CelRule = CelRule {
    rule: "self.uplink == oldSelf.uplink",
    message: "spec.bridge.uplink cannot change on a live Network (its workloads are bridged onto the old uplink's segment): create a new Network on the new uplink and move the workloads to it",
    field_path: Some(".uplink"),
};

/// `spec.bridge.vlan` is immutable (added, removed or changed).
pub const NETWORK_VLAN_IMMUTABLE: CelRule = CelRule {
    rule: "has(self.vlan) == has(oldSelf.vlan) && (!has(self.vlan) || self.vlan == oldSelf.vlan)",
    message: "spec.bridge.vlan cannot change on a live Network (its workloads are on the old VLAN's segment and subnet): create a new Network for the new VLAN and move the workloads to it",
    field_path: Some(".vlan"),
};

/// `spec.bridge.bridgeName` is immutable (added, removed or changed).
pub const NETWORK_BRIDGE_NAME_IMMUTABLE: CelRule = CelRule {
    rule: "has(self.bridgeName) == has(oldSelf.bridgeName) && (!has(self.bridgeName) || self.bridgeName == oldSelf.bridgeName)",
    message: "spec.bridge.bridgeName cannot change on a live Network (running workloads' ports are attached to the old bridge): create a new Network with the new name and move the workloads to it",
    field_path: Some(".bridgeName"),
};

/// `spec.bridge.vlanFiltering` is immutable (an absent value and false are the same).
pub const NETWORK_VLAN_FILTERING_IMMUTABLE: CelRule = CelRule {
    rule: "(has(self.vlanFiltering) && self.vlanFiltering) == (has(oldSelf.vlanFiltering) && oldSelf.vlanFiltering)",
    message: "spec.bridge.vlanFiltering cannot change on a live Network (the uplink and the running workloads' ports are wired for the old setting): create a new Network and move the workloads to it",
    field_path: Some(".vlanFiltering"),
};

/// `spec.ipam.exclude`: no two entries overlap (an address or CIDR is listed once).
pub const EXCLUDE_NO_OVERLAP: CelRule = CelRule {
    rule: "self.all(a, !(isIP(a) || isCIDR(a)) || self.exists_one(b, (isIP(b) || isCIDR(b)) && (isIP(a) ? (isIP(b) ? ip(a) == ip(b) : cidr(b).containsIP(a)) : (isIP(b) ? cidr(a).containsIP(b) : (cidr(a).containsIP(cidr(b).ip()) || cidr(b).containsIP(cidr(a).ip()))))))",
    message: "spec.ipam.exclude entries must not overlap (an address or CIDR inside another entry, or listed twice); remove the inner or repeated entry",
    field_path: None,
};

// ---- Network: spec.bridge.trunkVlans[] ----

/// A VLAN range entry: either `id`, or `minId` and `maxId`.
pub const VLAN_RANGE_ID_OR_RANGE: CelRule = CelRule {
    rule: "has(self.id) ? !has(self.minId) && !has(self.maxId) : has(self.minId) && has(self.maxId)",
    message: "give either id (one VLAN) or minId and maxId (a range)",
    field_path: None,
};

/// A VLAN range: `minId <= maxId`.
pub const VLAN_RANGE_ORDERED: CelRule = CelRule {
    rule: "!has(self.minId) || !has(self.maxId) || self.minId <= self.maxId",
    message: "minId must not be greater than maxId; swap them",
    field_path: None,
};

// ---- label selectors (attached to every `matchExpressions[]` item and `matchLabels`) ----

/// A selector expression: In and NotIn need values, Exists and DoesNotExist take none.
pub const SELECTOR_EXPRESSION_VALUES: CelRule = CelRule {
    rule: "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values) || size(self.values) == 0",
    message: "operators In and NotIn need at least one value, Exists and DoesNotExist take none; fix values or the operator",
    field_path: Some(".values"),
};

/// The rules on the item of every label selector's `matchExpressions` (added to the schema
/// with the selector bounds, see `validate::bound_label_selectors`), wherever a selector is.
pub const EVERY_SELECTOR_EXPRESSION: &[&CelRule] = &[&SELECTOR_EXPRESSION_VALUES];

/// A selector's `matchLabels` has no empty key. (A schema bounds a map's values, not its keys;
/// an expression's empty key is refused by its `minLength`.)
pub const SELECTOR_LABEL_KEYS_NOT_EMPTY: CelRule = CelRule {
    rule: "self.all(k, size(k) > 0)",
    message: "a label key must not be empty; name a label key",
    field_path: None,
};

/// The rules on every label selector's `matchLabels` (added with the selector bounds, see
/// `validate::bound_label_selectors`), wherever a selector is.
pub const EVERY_SELECTOR_LABELS: &[&CelRule] = &[&SELECTOR_LABEL_KEYS_NOT_EMPTY];

// ---- PortForward ----

/// `spec.target`: exactly one of workload and selector.
pub const PORT_FORWARD_TARGET_EXACTLY_ONE: CelRule = CelRule {
    rule: "has(self.workload) != has(self.selector)",
    message: "spec.target needs exactly one of workload (a pod or VM name) or selector (labels of pods in this namespace)",
    field_path: None,
};

/// A bandwidth limit (`spec.limits.ingressBandwidth`, `egressBandwidth`): 1k to 1P bits per
/// second. The schema's pattern already refuses what is not a decimal quantity.
pub const BANDWIDTH_RANGE: CelRule = CelRule {
    rule: "!isQuantity(self) || (quantity(self).compareTo(quantity('1k')) >= 0 && quantity(self).compareTo(quantity('1P')) <= 0)",
    message: "a bandwidth limit is 1k to 1P bits per second, as a Kubernetes quantity such as 10M or 1G",
    field_path: None,
};

/// `spec.synProxy`: only with a TCP port (protocol's default is TCP).
pub const PORT_FORWARD_SYN_PROXY_NEEDS_TCP: CelRule = CelRule {
    rule: "!has(self.synProxy) || self.ports.exists(p, !has(p.protocol) || p.protocol == 'TCP')",
    message: "a SYN proxy protects TCP ports and spec.ports has none; remove synProxy or forward a TCP port",
    field_path: Some(".synProxy"),
};

/// `spec.ports`: names are unique.
pub const PORT_FORWARD_PORT_NAMES_UNIQUE: CelRule = CelRule {
    rule: "self.all(p, !has(p.name) || self.exists_one(q, has(q.name) && q.name == p.name))",
    message: "spec.ports names must be unique; rename or drop the duplicate name",
    field_path: None,
};

/// `spec.ports[]`: exactly one of port and portRange.
pub const PORT_FORWARD_PORT_OR_RANGE: CelRule = CelRule {
    rule: "has(self.port) != has(self.portRange)",
    message: "set exactly one of port (a single node port) or portRange (a range of node ports)",
    field_path: None,
};

/// `spec.ports[]`: a TCP node port of the node's own services is not forwarded (see
/// [`crate::portforward::RESERVED_NODE_PORTS`], which a unit test holds this rule to).
pub const PORT_FORWARD_NOT_RESERVED: CelRule = CelRule {
    rule: "(has(self.protocol) && self.protocol != 'TCP') || (has(self.port) ? !(self.port == 22 || (self.port >= 2379 && self.port <= 2380) || self.port == 6443 || (self.port >= 10248 && self.port <= 10260)) : (!has(self.portRange) || !((self.portRange.start <= 22 && self.portRange.end >= 22) || (self.portRange.start <= 2380 && self.portRange.end >= 2379) || (self.portRange.start <= 6443 && self.portRange.end >= 6443) || (self.portRange.start <= 10260 && self.portRange.end >= 10248))))",
    message: "TCP node ports 22 (SSH), 2379-2380 (etcd), 6443 (kube-apiserver) and 10248-10260 (kubelet, kube-proxy, controller-manager, scheduler) belong to the node's own services, whose connections a PortForward would take: choose another node port",
    field_path: None,
};

/// `spec.ports[]`: targetPort only with port.
pub const PORT_FORWARD_TARGET_PORT_NEEDS_PORT: CelRule = CelRule {
    rule: "!has(self.targetPort) || has(self.port)",
    message: "targetPort is only allowed with port; a portRange forwards to the same port numbers on the target, so remove targetPort",
    field_path: Some(".targetPort"),
};

/// `spec.ports[].portRange`: start <= end.
pub const PORT_RANGE_ORDERED: CelRule = CelRule {
    rule: "self.start <= self.end",
    message: "portRange.start must not be greater than portRange.end; swap them",
    field_path: None,
};

// ---- ClusterSegmentationPolicy and SegmentationPolicy ----

/// `spec`: ingress rules have no `to`.
pub const POLICY_INGRESS_NO_TO: CelRule = CelRule {
    rule: "!has(self.ingress) || self.ingress.all(r, !has(r.to))",
    message: "ingress rules name their peers in from, not to",
    field_path: Some(".ingress"),
};

/// `spec`: egress rules have no `from`.
pub const POLICY_EGRESS_NO_FROM: CelRule = CelRule {
    rule: "!has(self.egress) || self.egress.all(r, !has(r.from))",
    message: "egress rules name their peers in to, not from",
    field_path: Some(".egress"),
};

/// `spec.ingress`/`spec.egress`: rule names are unique.
pub const POLICY_RULE_NAMES_UNIQUE: CelRule = CelRule {
    rule: "self.all(r, self.exists_one(q, q.name == r.name))",
    message: "rule names must be unique within ingress and within egress; rename the duplicate",
    field_path: None,
};

/// `spec.subject` of a cluster policy: exactly one of namespaces and pods.
pub const CLUSTER_SUBJECT_EXACTLY_ONE: CelRule = CelRule {
    rule: "has(self.namespaces) != has(self.pods)",
    message: "spec.subject needs exactly one of namespaces (every workload of those namespaces) or pods",
    field_path: None,
};

/// A peer: exactly one of namespaces, pods, networks or cidrs (networks may narrow the first two).
pub const PEER_EXACTLY_ONE: CelRule = CelRule {
    rule: "[has(self.namespaces), has(self.pods), has(self.cidrs)].filter(x, x).size() + (has(self.networks) && !has(self.namespaces) && !has(self.pods) ? 1 : 0) == 1 && !(has(self.cidrs) && has(self.networks))",
    message: "a peer has exactly one of namespaces, pods, networks or cidrs (networks may also narrow namespaces or pods)",
    field_path: None,
};

/// A protocol entry: at most one of port and portRange.
pub const PROTOCOL_PORT_OR_RANGE: CelRule = CelRule {
    rule: "!(has(self.port) && has(self.portRange))",
    message: "set at most one of port and portRange",
    field_path: None,
};

/// A protocol entry: ports only for TCP, UDP, SCTP.
pub const PROTOCOL_PORTS_NEED_L4: CelRule = CelRule {
    rule: "!(has(self.port) || has(self.portRange)) || self.protocol in ['TCP', 'UDP', 'SCTP']",
    message: "port and portRange are only for TCP, UDP and SCTP; use icmpType for ICMP",
    field_path: None,
};

/// A protocol entry: icmpType/icmpCode only for ICMP, code only with type.
pub const PROTOCOL_ICMP_FIELDS: CelRule = CelRule {
    rule: "(!(has(self.icmpType) || has(self.icmpCode)) || self.protocol in ['ICMP', 'ICMPv6']) && (!has(self.icmpCode) || has(self.icmpType))",
    message: "icmpType and icmpCode are only for ICMP and ICMPv6, and icmpCode needs icmpType",
    field_path: None,
};

// ---- TrafficMirror ----

/// `spec.filter.protocols`: no protocol twice.
pub const MIRROR_PROTOCOLS_UNIQUE: CelRule = CelRule {
    rule: "self.all(p, self.exists_one(q, q == p))",
    message: "spec.filter.protocols lists a protocol twice; remove the duplicate",
    field_path: None,
};

/// `spec.filter.ports[]`: exactly one of port and portRange.
pub const MIRROR_PORT_OR_RANGE: CelRule = CelRule {
    rule: "has(self.port) != has(self.portRange)",
    message: "set exactly one of port (one port) or portRange (a range of ports)",
    field_path: None,
};

/// `spec.filter`: ports need a protocol that has ports.
pub const MIRROR_PORTS_NEED_L4: CelRule = CelRule {
    rule: "!has(self.ports) || size(self.ports) == 0 || !has(self.protocols) || size(self.protocols) == 0 || self.protocols.exists(p, p in ['TCP', 'UDP', 'SCTP'])",
    message: "ports match TCP, UDP and SCTP frames; add one of them to protocols or remove the ports",
    field_path: Some(".ports"),
};

/// `spec.destination`: exactly one of analyzer and remote.
pub const MIRROR_DESTINATION_EXACTLY_ONE: CelRule = CelRule {
    rule: "has(self.analyzer) != has(self.remote)",
    message: "spec.destination needs exactly one of analyzer (a workload on the source's node) or remote (a collector reached over VXLAN)",
    field_path: None,
};

/// Where each rule is attached: the schema location (from `openAPIV3Schema`, `[]` for list
/// items) in the CRD named, and the rule. Used by the tests of the generated schema.
pub const ATTACHED: &[(&str, &str, &CelRule)] = &[
    ("nodenetworks.weft.dev", "spec.blocks[].ipv4", &CIDR_VALID),
    (
        "nodenetworks.weft.dev",
        "spec.blocks[].ipv4",
        &CIDR_CANONICAL,
    ),
    ("nodenetworks.weft.dev", "spec.blocks[].ipv6", &CIDR_VALID),
    (
        "nodenetworks.weft.dev",
        "spec.blocks[].ipv6",
        &CIDR_CANONICAL,
    ),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_BRIDGE_ONLY_IN_BRIDGE_MODE,
    ),
    ("networks.weft.dev", "spec", &NETWORK_BRIDGE_REQUIRED),
    ("networks.weft.dev", "spec", &NETWORK_NAT_ONLY_IN_NAT_MODE),
    ("networks.weft.dev", "spec", &NETWORK_GATEWAY_IN_SUBNET),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_GATEWAY_NOT_NETWORK_ADDRESS,
    ),
    ("networks.weft.dev", "spec", &NETWORK_NODE_BLOCK_PREFIX_V4),
    ("networks.weft.dev", "spec", &NETWORK_NODE_BLOCK_PREFIX_V6),
    ("networks.weft.dev", "spec", &NETWORK_EXCLUDE_IN_SUBNET),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_TRUNK_NEEDS_VLAN_FILTERING,
    ),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_TRUNK_EXCLUDES_OWN_VLAN,
    ),
    (
        "networks.weft.dev",
        "spec.bridge.trunkVlans[]",
        &VLAN_RANGE_ID_OR_RANGE,
    ),
    (
        "networks.weft.dev",
        "spec.bridge.trunkVlans[]",
        &VLAN_RANGE_ORDERED,
    ),
    ("networks.weft.dev", "spec", &NETWORK_GATEWAY_IMMUTABLE),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_NODE_BLOCK_PREFIX_V4_IMMUTABLE,
    ),
    (
        "networks.weft.dev",
        "spec",
        &NETWORK_NODE_BLOCK_PREFIX_V6_IMMUTABLE,
    ),
    ("networks.weft.dev", "spec.mode", &NETWORK_MODE_IMMUTABLE),
    (
        "networks.weft.dev",
        "spec.bridge",
        &NETWORK_UPLINK_IMMUTABLE,
    ),
    ("networks.weft.dev", "spec.bridge", &NETWORK_VLAN_IMMUTABLE),
    (
        "networks.weft.dev",
        "spec.bridge",
        &NETWORK_BRIDGE_NAME_IMMUTABLE,
    ),
    (
        "networks.weft.dev",
        "spec.bridge",
        &NETWORK_VLAN_FILTERING_IMMUTABLE,
    ),
    (
        "networks.weft.dev",
        "spec.ipam.exclude",
        &EXCLUDE_NO_OVERLAP,
    ),
    (
        "networks.weft.dev",
        "spec.subnets",
        &NETWORK_SUBNETS_IMMUTABLE,
    ),
    ("networks.weft.dev", "spec.subnets", &SUBNETS_ONE_V4),
    ("networks.weft.dev", "spec.subnets", &SUBNETS_ONE_V6),
    ("networks.weft.dev", "spec.subnets", &SUBNETS_LARGE_ENOUGH),
    ("networks.weft.dev", "spec.subnets[]", &CIDR_VALID),
    ("networks.weft.dev", "spec.subnets[]", &CIDR_CANONICAL),
    ("networks.weft.dev", "spec.gateway", &GATEWAY_ONE_V4),
    ("networks.weft.dev", "spec.gateway", &GATEWAY_ONE_V6),
    ("networks.weft.dev", "spec.gateway[]", &IP_VALID),
    (
        "networks.weft.dev",
        "spec.ipam.exclude[]",
        &IP_OR_CIDR_VALID,
    ),
    (
        "networks.weft.dev",
        "spec.ipam.exclude[]",
        &IP_OR_CIDR_CANONICAL,
    ),
    (
        "portforwards.weft.dev",
        "spec.target",
        &PORT_FORWARD_TARGET_EXACTLY_ONE,
    ),
    (
        "portforwards.weft.dev",
        "spec",
        &PORT_FORWARD_SYN_PROXY_NEEDS_TCP,
    ),
    (
        "portforwards.weft.dev",
        "spec.ports",
        &PORT_FORWARD_PORT_NAMES_UNIQUE,
    ),
    (
        "portforwards.weft.dev",
        "spec.ports[]",
        &PORT_FORWARD_PORT_OR_RANGE,
    ),
    (
        "portforwards.weft.dev",
        "spec.ports[]",
        &PORT_FORWARD_TARGET_PORT_NEEDS_PORT,
    ),
    (
        "portforwards.weft.dev",
        "spec.ports[]",
        &PORT_FORWARD_NOT_RESERVED,
    ),
    (
        "portforwards.weft.dev",
        "spec.ports[].portRange",
        &PORT_RANGE_ORDERED,
    ),
    ("portforwards.weft.dev", "spec.allowFrom[]", &CIDR_VALID),
    ("portforwards.weft.dev", "spec.allowFrom[]", &CIDR_CANONICAL),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec",
        &POLICY_INGRESS_NO_TO,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec",
        &POLICY_EGRESS_NO_FROM,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.subject",
        &CLUSTER_SUBJECT_EXACTLY_ONE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress",
        &POLICY_RULE_NAMES_UNIQUE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].from[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].from[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].from[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].to[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].to[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].to[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_PORT_OR_RANGE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_PORTS_NEED_L4,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_ICMP_FIELDS,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.ingress[].protocols[].portRange",
        &PORT_RANGE_ORDERED,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress",
        &POLICY_RULE_NAMES_UNIQUE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].from[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].from[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].from[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].to[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].to[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].to[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_PORT_OR_RANGE,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_PORTS_NEED_L4,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_ICMP_FIELDS,
    ),
    (
        "clustersegmentationpolicies.weft.dev",
        "spec.egress[].protocols[].portRange",
        &PORT_RANGE_ORDERED,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec",
        &POLICY_INGRESS_NO_TO,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec",
        &POLICY_EGRESS_NO_FROM,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress",
        &POLICY_RULE_NAMES_UNIQUE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].from[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].from[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].from[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].to[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].to[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].to[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_PORT_OR_RANGE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_PORTS_NEED_L4,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].protocols[]",
        &PROTOCOL_ICMP_FIELDS,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.ingress[].protocols[].portRange",
        &PORT_RANGE_ORDERED,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress",
        &POLICY_RULE_NAMES_UNIQUE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].from[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].from[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].from[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].to[]",
        &PEER_EXACTLY_ONE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].to[].cidrs[]",
        &CIDR_VALID,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].to[].cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_PORT_OR_RANGE,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_PORTS_NEED_L4,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].protocols[]",
        &PROTOCOL_ICMP_FIELDS,
    ),
    (
        "segmentationpolicies.weft.dev",
        "spec.egress[].protocols[].portRange",
        &PORT_RANGE_ORDERED,
    ),
    (
        "networks.weft.dev",
        "spec.limits.ingressBandwidth",
        &BANDWIDTH_RANGE,
    ),
    (
        "networks.weft.dev",
        "spec.limits.egressBandwidth",
        &BANDWIDTH_RANGE,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter.protocols",
        &MIRROR_PROTOCOLS_UNIQUE,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter.ports[]",
        &MIRROR_PORT_OR_RANGE,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter",
        &MIRROR_PORTS_NEED_L4,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.destination",
        &MIRROR_DESTINATION_EXACTLY_ONE,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.destination.remote.address",
        &IP_VALID,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter.cidrs[]",
        &CIDR_VALID,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter.cidrs[]",
        &CIDR_CANONICAL,
    ),
    (
        "trafficmirrors.weft.dev",
        "spec.filter.ports[].portRange",
        &PORT_RANGE_ORDERED,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_serialize_with_message_and_field_path() {
        let v = NETWORK_BRIDGE_REQUIRED.to_json();
        assert_eq!(v["rule"], NETWORK_BRIDGE_REQUIRED.rule);
        assert_eq!(v["message"], NETWORK_BRIDGE_REQUIRED.message);
        assert_eq!(v["fieldPath"], ".bridge");
        assert!(CIDR_VALID.to_json().get("fieldPath").is_none());
        let kube_rule =
            serde_json::to_value(kube::core::Rule::from(&NETWORK_BRIDGE_REQUIRED)).unwrap();
        assert_eq!(kube_rule, v);
    }

    #[test]
    fn messages_are_single_lines() {
        // The apiserver requires a message for rules with line breaks and refuses messages with them.
        for (_, _, r) in ATTACHED {
            assert!(
                !r.rule.contains('\n') && !r.message.contains('\n'),
                "{}",
                r.rule
            );
            assert!(!r.message.is_empty());
        }
    }
}

//! Microsegmentation policies, shaped after the upstream AdminNetworkPolicy /
//! BaselineAdminNetworkPolicy API and Calico tiers:
//!
//! - [`ClusterSegmentationPolicy`] (cluster-scoped, `wcsp`): a `tier` (`Admin` or `Baseline`), a
//!   `priority` (0–1000, lower first), a `subject` (namespaces, or pods by namespace and pod
//!   selector, optionally only on some weft networks) and named `ingress`/`egress` rules with
//!   `Accept` (final), `Deny` (final) or `Pass` (skip the rest of the tier).
//! - [`SegmentationPolicy`] (namespaced, `wsp`): rules with `Allow` or `Deny` for pods of its
//!   namespace; a pod selected in a direction is isolated in that direction.
//!
//! Order of evaluation (docs/policy.md): Admin tier by priority → the namespace's
//! SegmentationPolicies → Baseline tier → the Network's `security.defaultAction`. Replies of
//! allowed connections are always allowed.

use crate::cel;
use crate::cidr::{Cidr, parse_cidr};
use crate::portforward::PortRange;
use crate::validate::{
    DNS1123_SUBDOMAIN_PATTERN, Errors, FieldError, PORT_NAME_PATTERN, check_selector,
    is_dns1123_subdomain,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The list bounds keep the CEL rules of the CIDRs inside the apiserver's cost budget: a rule on
// a peer's CIDR runs up to MAX_RULES x MAX_PEERS x MAX_CIDRS times (docs/policy.md, "Limits").

/// Most rules in one direction of a policy.
pub const MAX_RULES: usize = 100;
/// Most peers in one rule (`from` or `to`).
pub const MAX_PEERS: usize = 32;
/// Most CIDRs in one peer.
pub const MAX_CIDRS: usize = 32;
/// Most protocol entries in one rule.
pub const MAX_PROTOCOLS: usize = 100;
/// Most Networks a subject or peer names.
pub const MAX_NETWORKS: usize = 32;

/// A cluster-wide segmentation policy in the Admin or Baseline tier.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ClusterSegmentationPolicy",
    shortname = "wcsp",
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "A weft cluster segmentation policy (weft.dev/v1alpha1): Admin or Baseline tier rules between workloads, enforced on every weft port.",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Workloads", type_ = "integer", json_path = ".status.workloads"),
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
#[x_kube(
    validation = &cel::POLICY_INGRESS_NO_TO,
    validation = &cel::POLICY_EGRESS_NO_FROM
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSegmentationPolicySpec {
    /// `Admin` (evaluated before namespace policies; its Accept and Deny cannot be overridden)
    /// or `Baseline` (evaluated after them: defaults that namespace owners may override).
    pub tier: Tier,

    /// 0 to 1000; within a tier, lower priorities are evaluated first. Two policies of one
    /// tier should not share a priority (the name breaks the tie).
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,

    /// The workloads the policy applies to.
    pub subject: ClusterSubject,

    /// Rules for traffic to the subject, evaluated in order; each names its peers in `from`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    #[x_kube(validation = &cel::POLICY_RULE_NAMES_UNIQUE)]
    pub ingress: Vec<PolicyRule>,

    /// Rules for traffic from the subject, evaluated in order; each names its peers in `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    #[x_kube(validation = &cel::POLICY_RULE_NAMES_UNIQUE)]
    pub egress: Vec<PolicyRule>,
}

/// A namespace's segmentation policy: Allow and Deny rules for some of its pods.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "SegmentationPolicy",
    namespaced,
    shortname = "wsp",
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "A weft segmentation policy (weft.dev/v1alpha1): Allow and Deny rules for pods and VMs of one namespace.",
    printcolumn(name = "Workloads", type_ = "integer", json_path = ".status.workloads"),
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
#[x_kube(
    validation = &cel::POLICY_INGRESS_NO_TO,
    validation = &cel::POLICY_EGRESS_NO_FROM
)]
#[serde(rename_all = "camelCase")]
pub struct SegmentationPolicySpec {
    /// The pods (and VMs' virt-launcher pods) of this namespace the policy applies to. A
    /// workload selected by a policy with ingress (egress) rules is isolated in that direction:
    /// only what an Allow rule of some policy admits passes, and Deny beats Allow.
    pub subject: NamespacedSubject,

    /// Rules for traffic to the subject; each names its peers in `from`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    #[x_kube(validation = &cel::POLICY_RULE_NAMES_UNIQUE)]
    pub ingress: Vec<PolicyRule>,

    /// Rules for traffic from the subject; each names its peers in `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    #[x_kube(validation = &cel::POLICY_RULE_NAMES_UNIQUE)]
    pub egress: Vec<PolicyRule>,
}

/// The tier of a cluster policy.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema,
)]
pub enum Tier {
    /// Before namespace policies.
    #[default]
    Admin,
    /// After namespace policies.
    Baseline,
}

/// What a rule does with the traffic it matches.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema,
)]
pub enum RuleAction {
    /// Cluster policies: allowed, no later rule or tier is consulted.
    Accept,
    /// Both kinds: dropped. In a namespace policy, Deny beats Allow.
    #[default]
    Deny,
    /// Cluster policies: skip the rest of this tier (Admin: on to namespace policies; Baseline:
    /// on to the network's default action).
    Pass,
    /// Namespace policies: allowed unless a Deny of a namespace policy matches.
    Allow,
}

impl RuleAction {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
            RuleAction::Allow => "Allow",
        }
    }
}

/// The actions a rule of the policy kind `kind` may have: Accept, Deny and Pass for a
/// ClusterSegmentationPolicy, Allow and Deny for a SegmentationPolicy (both share
/// [`PolicyRule`] and so [`RuleAction`]).
pub fn rule_actions(kind: &str) -> &'static [RuleAction] {
    match kind {
        "ClusterSegmentationPolicy" => &[RuleAction::Accept, RuleAction::Deny, RuleAction::Pass],
        "SegmentationPolicy" => &[RuleAction::Allow, RuleAction::Deny],
        _ => &[],
    }
}

/// Narrows the `enum` of `spec.ingress[].action` and `spec.egress[].action` in the schema of a
/// policy kind to [`rule_actions`], so the apiserver refuses a wrong action at the rule's own
/// field (`spec.ingress[2].action: Unsupported value`), as `validate()` does.
pub(crate) fn narrow_rule_actions(kind: &str, schema: &mut serde_json::Value) {
    let actions = rule_actions(kind);
    if actions.is_empty() {
        return;
    }
    let names: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
    for direction in ["ingress", "egress"] {
        if let Some(action) = schema
            .pointer_mut(&format!(
                "/properties/spec/properties/{direction}/items/properties/action"
            ))
            .and_then(serde_json::Value::as_object_mut)
        {
            action.insert("enum".into(), serde_json::json!(names));
        }
    }
}

/// Pods chosen by their namespace's labels and their own labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodsSelector {
    /// Labels of the namespaces; absent selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Labels of the pods (for KubeVirt VMs, of their virt-launcher pods, which carry the VM
    /// template's labels); absent selects every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// The workloads a cluster policy applies to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = &cel::CLUSTER_SUBJECT_EXACTLY_ONE)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSubject {
    /// Every workload in the namespaces with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Workloads by namespace and pod labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsSelector>,
    /// Only the workloads' interfaces on these weft Networks; absent: every weft network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NETWORKS), inner(length(max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN)))]
    pub networks: Option<Vec<String>>,
}

/// The workloads a namespace policy applies to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedSubject {
    /// Labels of the pods of the policy's namespace; `{}` selects them all.
    pub pod_selector: LabelSelector,
    /// Only the workloads' interfaces on these weft Networks; absent: every weft network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NETWORKS), inner(length(max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN)))]
    pub networks: Option<Vec<String>>,
}

/// One named rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Name of the rule, unique in its list (lowercase letters, digits and '-'); audit records
    /// and `weft-operator trace` name it.
    #[schemars(length(min = 1, max = 63), pattern(PORT_NAME_PATTERN))]
    pub name: String,

    /// Cluster policies: Accept, Deny or Pass. Namespace policies: Allow or Deny.
    pub action: RuleAction,

    /// Ingress rules: where the traffic comes from. Absent or empty: from anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PEERS))]
    pub from: Option<Vec<Peer>>,

    /// Egress rules: where the traffic goes. Absent or empty: anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PEERS))]
    pub to: Option<Vec<Peer>>,

    /// Protocols and ports the rule matches. Absent or empty: all traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PROTOCOLS))]
    pub protocols: Option<Vec<ProtocolMatch>>,

    /// Emit an audit record for every new connection the rule matches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log: bool,
}

/// The other end of a connection.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = &cel::PEER_EXACTLY_ONE)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Every workload in the namespaces with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Workloads by namespace and pod labels. In a namespace policy, an absent
    /// namespaceSelector means the policy's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsSelector>,
    /// Alone: every workload on these weft Networks. With namespaces or pods: only their
    /// interfaces on these networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NETWORKS), inner(length(max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN)))]
    pub networks: Option<Vec<String>>,
    /// Addresses outside the workloads: the node itself, the LAN, the internet
    /// (e.g. `0.0.0.0/0`, `192.168.50.0/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_CIDRS))]
    pub cidrs: Option<Vec<Cidr>>,
}

/// A protocol, with ports (TCP, UDP, SCTP) or type and code (ICMP, ICMPv6).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = &cel::PROTOCOL_PORT_OR_RANGE,
    validation = &cel::PROTOCOL_PORTS_NEED_L4,
    validation = &cel::PROTOCOL_ICMP_FIELDS
)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMatch {
    /// TCP, UDP, SCTP, ICMP or ICMPv6.
    pub protocol: L4Protocol,
    /// One destination port (TCP, UDP, SCTP); absent with portRange absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// A range of destination ports (TCP, UDP, SCTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// ICMP or ICMPv6 type (e.g. 8 for an IPv4 echo request); absent: every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub icmp_type: Option<i32>,
    /// ICMP or ICMPv6 code; only with icmpType.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub icmp_code: Option<i32>,
}

/// A protocol a rule can match.
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
pub enum L4Protocol {
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
    /// ICMP (IPv4 only).
    #[serde(rename = "ICMP")]
    Icmp,
    /// ICMPv6 (IPv6 only).
    #[serde(rename = "ICMPv6")]
    Icmpv6,
}

impl L4Protocol {
    /// Does it have ports?
    pub fn has_ports(self) -> bool {
        matches!(self, L4Protocol::Tcp | L4Protocol::Udp | L4Protocol::Sctp)
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
            L4Protocol::Sctp => 132,
            L4Protocol::Icmp => 1,
            L4Protocol::Icmpv6 => 58,
        }
    }

    /// The protocol with this IP protocol number, if a rule can match it.
    pub fn from_number(n: u8) -> Option<L4Protocol> {
        [
            L4Protocol::Tcp,
            L4Protocol::Udp,
            L4Protocol::Sctp,
            L4Protocol::Icmp,
            L4Protocol::Icmpv6,
        ]
        .into_iter()
        .find(|p| p.number() == n)
    }

    /// The name in nftables rules.
    pub fn nft_name(self) -> &'static str {
        match self {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
            L4Protocol::Sctp => "sctp",
            L4Protocol::Icmp => "icmp",
            L4Protocol::Icmpv6 => "icmpv6",
        }
    }

    /// Parses `tcp`, `UDP`, `icmpv6`, ... (any case).
    pub fn parse(s: &str) -> Option<L4Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(L4Protocol::Tcp),
            "udp" => Some(L4Protocol::Udp),
            "sctp" => Some(L4Protocol::Sctp),
            "icmp" => Some(L4Protocol::Icmp),
            "icmpv6" => Some(L4Protocol::Icmpv6),
            _ => None,
        }
    }
}

impl ProtocolMatch {
    /// The destination ports matched (inclusive), `None` for every port or a port-less protocol.
    pub fn ports(&self) -> Option<(u16, u16)> {
        if let Some(p) = self.port {
            let p = u16::try_from(p).ok()?;
            return Some((p, p));
        }
        self.port_range.map(|r| {
            (
                u16::try_from(r.start).unwrap_or(0),
                u16::try_from(r.end).unwrap_or(u16::MAX),
            )
        })
    }
}

/// Observed state of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Standard conditions; Ready is False with the reason when the policy has an error (a bad
    /// selector, an unknown network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many workload interfaces the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<i32>,
    /// How many nodes enforce it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i32>,
}

fn check_rules(rules: &[PolicyRule], field: &str, cluster: bool, errors: &mut Errors) {
    if rules.len() > MAX_RULES {
        errors.push(field, format!("at most {MAX_RULES} rules are allowed"));
    }
    let ingress = field.ends_with("ingress");
    for (i, r) in rules.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if r.name.len() > 63 || !is_dns1123_subdomain(&r.name) || r.name.contains('.') {
            errors.push(
                format!("{f}.name"),
                format!(
                    "{:?} must be lowercase letters, digits and '-' (at most 63), starting and ending with a letter or digit",
                    r.name
                ),
            );
        }
        if rules[..i].iter().any(|o| o.name == r.name) {
            errors.push(
                format!("{f}.name"),
                format!(
                    "{:?} is used twice in {field}; rule names must be unique",
                    r.name
                ),
            );
        }
        let allowed = rule_actions(if cluster {
            "ClusterSegmentationPolicy"
        } else {
            "SegmentationPolicy"
        });
        if !allowed.contains(&r.action) {
            errors.push(
                format!("{f}.action"),
                if cluster {
                    "a ClusterSegmentationPolicy rule's action is Accept, Deny or Pass"
                } else {
                    "a SegmentationPolicy rule's action is Allow or Deny"
                },
            );
        }
        if ingress && r.to.is_some() {
            errors.push(
                format!("{f}.to"),
                "ingress rules name their peers in from, not to",
            );
        }
        if !ingress && r.from.is_some() {
            errors.push(
                format!("{f}.from"),
                "egress rules name their peers in to, not from",
            );
        }
        let (peers, pf) = if ingress {
            (&r.from, "from")
        } else {
            (&r.to, "to")
        };
        let peers = peers.as_deref().unwrap_or_default();
        if peers.len() > MAX_PEERS {
            errors.push(
                format!("{f}.{pf}"),
                format!(
                    "lists {} peers; at most {MAX_PEERS} are allowed (a peer's cidrs or selector can cover several)",
                    peers.len()
                ),
            );
        }
        let protocols = r.protocols.as_deref().unwrap_or_default();
        if protocols.len() > MAX_PROTOCOLS {
            errors.push(
                format!("{f}.protocols"),
                format!(
                    "lists {} entries; at most {MAX_PROTOCOLS} are allowed",
                    protocols.len()
                ),
            );
        }
        for (j, p) in peers.iter().enumerate() {
            check_peer(p, &format!("{f}.{pf}[{j}]"), errors);
        }
        for (j, p) in r.protocols.iter().flatten().enumerate() {
            check_protocol(p, &format!("{f}.protocols[{j}]"), errors);
        }
    }
}

fn check_networks(networks: &Option<Vec<String>>, field: &str, errors: &mut Errors) {
    if let Some(list) = networks {
        if list.is_empty() {
            errors.push(
                field,
                "name at least one Network, or remove the field to mean every network",
            );
        }
        if list.len() > MAX_NETWORKS {
            errors.push(
                field,
                format!(
                    "lists {} Networks; at most {MAX_NETWORKS} are allowed",
                    list.len()
                ),
            );
        }
        for (i, n) in list.iter().enumerate() {
            if !is_dns1123_subdomain(n) {
                errors.push(
                    format!("{field}[{i}]"),
                    format!("{n:?} is not a Network name"),
                );
            }
        }
    }
}

fn check_pods(p: &PodsSelector, field: &str, errors: &mut Errors) {
    if let Some(s) = &p.namespace_selector {
        check_selector(s, &format!("{field}.namespaceSelector"), errors);
    }
    if let Some(s) = &p.pod_selector {
        check_selector(s, &format!("{field}.podSelector"), errors);
    }
}

fn check_peer(p: &Peer, field: &str, errors: &mut Errors) {
    let kinds = [p.namespaces.is_some(), p.pods.is_some(), p.cidrs.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds > 1
        || (kinds == 0 && p.networks.is_none())
        || (p.cidrs.is_some() && p.networks.is_some())
    {
        errors.push(
            field,
            "a peer has exactly one of namespaces, pods, networks or cidrs (networks may also narrow namespaces or pods)",
        );
    }
    if let Some(s) = &p.namespaces {
        check_selector(s, &format!("{field}.namespaces"), errors);
    }
    if let Some(pods) = &p.pods {
        check_pods(pods, &format!("{field}.pods"), errors);
    }
    check_networks(&p.networks, &format!("{field}.networks"), errors);
    if p.cidrs.as_ref().is_some_and(Vec::is_empty) {
        errors.push(
            format!("{field}.cidrs"),
            "name at least one CIDR (0.0.0.0/0 and ::/0 for every address)",
        );
    }
    if let Some(cidrs) = p.cidrs.as_ref().filter(|c| c.len() > MAX_CIDRS) {
        errors.push(
            format!("{field}.cidrs"),
            format!(
                "lists {} CIDRs; at most {MAX_CIDRS} are allowed (merge neighbours into larger CIDRs, or add a peer)",
                cidrs.len()
            ),
        );
    }
    for (i, c) in p.cidrs.iter().flatten().enumerate() {
        if let Err(e) = parse_cidr(c.as_str()) {
            errors.push(format!("{field}.cidrs[{i}]"), e.to_string());
        }
    }
}

fn check_protocol(p: &ProtocolMatch, field: &str, errors: &mut Errors) {
    if p.port.is_some() && p.port_range.is_some() {
        errors.push(field, "set at most one of port and portRange");
    }
    if (p.port.is_some() || p.port_range.is_some()) && !p.protocol.has_ports() {
        errors.push(
            field,
            "port and portRange are only for TCP, UDP and SCTP; use icmpType for ICMP",
        );
    }
    if let Some(port) = p.port
        && !(1..=65535).contains(&port)
    {
        errors.push(format!("{field}.port"), "must be 1 to 65535");
    }
    if let Some(r) = p.port_range
        && (!(1..=65535).contains(&r.start) || !(1..=65535).contains(&r.end) || r.start > r.end)
    {
        errors.push(
            format!("{field}.portRange"),
            "start and end must be 1 to 65535 with start <= end",
        );
    }
    if (p.icmp_type.is_some() || p.icmp_code.is_some()) && p.protocol.has_ports() {
        errors.push(field, "icmpType and icmpCode are only for ICMP and ICMPv6");
    }
    if p.icmp_code.is_some() && p.icmp_type.is_none() {
        errors.push(format!("{field}.icmpCode"), "icmpCode needs icmpType");
    }
    for (name, v) in [("icmpType", p.icmp_type), ("icmpCode", p.icmp_code)] {
        if let Some(v) = v
            && !(0..=255).contains(&v)
        {
            errors.push(format!("{field}.{name}"), "must be 0 to 255");
        }
    }
}

impl ClusterSegmentationPolicySpec {
    /// Checks what the CRD schema and CEL rules check, naming the field of each error.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Errors::default();
        if !(0..=1000).contains(&self.priority) {
            errors.push(
                "spec.priority",
                "must be 0 to 1000 (lower is evaluated first)",
            );
        }
        let s = &self.subject;
        if s.namespaces.is_some() == s.pods.is_some() {
            errors.push(
                "spec.subject",
                "set exactly one of namespaces (every workload of the selected namespaces) or pods",
            );
        }
        if let Some(ns) = &s.namespaces {
            check_selector(ns, "spec.subject.namespaces", &mut errors);
        }
        if let Some(p) = &s.pods {
            check_pods(p, "spec.subject.pods", &mut errors);
        }
        check_networks(&s.networks, "spec.subject.networks", &mut errors);
        check_rules(&self.ingress, "spec.ingress", true, &mut errors);
        check_rules(&self.egress, "spec.egress", true, &mut errors);
        errors.finish()
    }
}

impl SegmentationPolicySpec {
    /// Checks what the CRD schema and CEL rules check, naming the field of each error.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Errors::default();
        check_selector(
            &self.subject.pod_selector,
            "spec.subject.podSelector",
            &mut errors,
        );
        check_networks(&self.subject.networks, "spec.subject.networks", &mut errors);
        check_rules(&self.ingress, "spec.ingress", false, &mut errors);
        check_rules(&self.egress, "spec.egress", false, &mut errors);
        errors.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> ClusterSegmentationPolicySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_full_cluster_policy_parses_and_validates() {
        let p = cluster(
            r#"
tier: Admin
priority: 10
subject: {namespaces: {matchLabels: {env: prod}}, networks: [nat-demo]}
ingress:
  - name: from-monitoring
    action: Accept
    from: [{namespaces: {matchLabels: {team: monitoring}}}]
    protocols: [{protocol: TCP, port: 9100}]
  - name: no-ssh
    action: Deny
    from: [{cidrs: [0.0.0.0/0, "::/0"]}]
    protocols: [{protocol: TCP, port: 22}]
    log: true
egress:
  - name: to-app
    action: Pass
    to: [{pods: {podSelector: {matchLabels: {tier: app}}}, networks: [nat-demo]}]
    protocols: [{protocol: ICMP, icmpType: 8}, {protocol: UDP, portRange: {start: 5000, end: 5010}}]
"#,
        );
        p.validate().unwrap();
        assert_eq!(
            p.egress[0].protocols.as_ref().unwrap()[1].ports(),
            Some((5000, 5010))
        );
    }

    #[test]
    fn errors_name_the_field() {
        let p = cluster(
            r#"
tier: Baseline
priority: 2000
subject: {}
ingress:
  - {name: a, action: Allow, to: [{cidrs: [10.0.0.1/8]}]}
  - {name: a, action: Deny, from: [{}], protocols: [{protocol: ICMP, port: 80}, {protocol: TCP, icmpCode: 1}]}
  - {name: b, action: Deny, from: [{cidrs: []}]}
"#,
        );
        let errs: Vec<String> = p
            .validate()
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        let all = errs.join("\n");
        for want in [
            "spec.priority",
            "spec.subject:",
            "spec.ingress[0].action",
            "spec.ingress[0].to",
            "spec.ingress[1].name",
            "spec.ingress[1].from[0]",
            "spec.ingress[1].protocols[0]",
            "spec.ingress[1].protocols[1].icmpCode",
            "spec.ingress[2].from[0].cidrs",
        ] {
            assert!(all.contains(want), "{want} missing in\n{all}");
        }
        let ns: SegmentationPolicySpec = serde_saphyr::from_str(
            "{subject: {podSelector: {}}, egress: [{name: x, action: Pass}]}",
        )
        .unwrap();
        let e = ns.validate().unwrap_err();
        assert_eq!(e[0].field, "spec.egress[0].action");
    }
}

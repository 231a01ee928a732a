//! The segmentation policy compiler: a pure function from policies, namespaces, networks and
//! workload interfaces to an ordered rule list ([`Compiled`]) whose peers and subjects are
//! *groups* of addresses. The agent renders it into nftables sets and rules ([`render`]); `trace`
//! evaluates the very same rule list and group contents ([`Compiled::decide`]), so what `trace`
//! says is what the packets meet.
//!
//! Order of evaluation, per direction (egress of the source, ingress of the destination; a
//! connection must pass both): Admin tier by priority (Accept and Deny final, Pass skips to the
//! namespace stage) → the namespace's SegmentationPolicies (a workload selected by a policy with
//! rules in that direction is isolated: a Deny that matches drops, else an Allow that matches
//! admits, else it is dropped) → Baseline tier (Accept, Deny, Pass to the default) → the
//! workload's Network `security.defaultAction`.
//!
//! Groups depend on the policies only; workloads only change which addresses are in them, so
//! adding or removing a workload changes set elements, never rules.

pub mod cluster;
// Its property checks panic: compiled only for tests and fuzz builds, never into the operator.
#[cfg(any(test, feature = "fuzzing"))]
mod fuzz;
pub mod render;

#[cfg(any(test, feature = "fuzzing"))]
pub use fuzz::fuzz_compile;

use crate::model::{Problem, Resources};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use weft_crds::{
    Action, ClusterSegmentationPolicy, L4Protocol, Network, Peer, PodsSelector, PolicyRule,
    RuleAction, SegmentationPolicy, Tier, selector_matches,
};

/// The label every namespace carries.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One interface of a workload on a weft network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's name (pod; for KubeVirt VMs the virt-launcher pod).
    pub name: String,
    /// Its labels (shared with the workload they were read from).
    pub labels: weft_crds::Labels,
    /// The weft network of this interface.
    pub network: String,
    /// The interface's addresses.
    pub ips: Vec<IpAddr>,
    /// Does the interface live on this node (its policy is enforced here)?
    pub local: bool,
    /// Its host port's id ([`weft_dataplane::names::port_id`]), for a local interface: the
    /// bridge tags the broadcast and multicast copies it sends the interface with it, and
    /// the policies judge them as its ingress by it. `None` for another node's interface, or
    /// a local one whose id another local port shares (its copies are dropped: see the agent's
    /// `clash_p` set).
    pub port: Option<u32>,
}

/// Which way traffic flows relative to the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the subject.
    Ingress,
    /// Traffic from the subject.
    Egress,
}

impl Direction {
    /// `ingress` or `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Which workloads a group holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupSpec {
    /// Exactly this namespace (namespace policies' own namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Namespaces by labels (`None`: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods by labels (`None`: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Only interfaces on these networks (`None`: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
}

impl GroupSpec {
    fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Does the group hold this interface?
    pub fn matches(
        &self,
        m: &Member,
        ns_labels: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> bool {
        if let Some(ns) = &self.namespace
            && ns != &m.namespace
        {
            return false;
        }
        if let Some(sel) = &self.namespace_selector
            && !selector_matches(sel, &namespace_labels(ns_labels, &m.namespace))
        {
            return false;
        }
        if let Some(sel) = &self.pod_selector
            && !selector_matches(sel, &m.labels)
        {
            return false;
        }
        if let Some(nets) = &self.networks
            && !nets.contains(&m.network)
        {
            return false;
        }
        true
    }
}

/// A namespace's labels, with the automatic name label.
pub fn namespace_labels(
    all: &BTreeMap<String, BTreeMap<String, String>>,
    namespace: &str,
) -> BTreeMap<String, String> {
    let mut labels = all.get(namespace).cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), namespace.into());
    labels
}

/// What a rule's peer side matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Anything.
    Any,
    /// The addresses of a group.
    Group(usize),
    /// Addresses in these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// One protocol entry of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoMatch {
    /// The protocol.
    pub protocol: L4Protocol,
    /// Destination ports (inclusive), `None` for all.
    pub ports: Option<(u16, u16)>,
    /// ICMP type.
    pub icmp_type: Option<u8>,
    /// ICMP code.
    pub icmp_code: Option<u8>,
}

/// Where a rule comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// `ClusterSegmentationPolicy` or `SegmentationPolicy`.
    pub kind: &'static str,
    /// `name` or `namespace/name`.
    pub policy: String,
    /// The rule's name.
    pub rule: String,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} rule {}", self.kind, self.policy, self.rule)
    }
}

/// One compiled rule: one peer of one policy rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A number unique in the compilation (audit records carry it).
    pub id: u32,
    /// The policy and rule.
    pub origin: Origin,
    /// The subject group.
    pub subject: usize,
    /// The peer.
    pub peer: PeerMatch,
    /// Protocols (empty: all traffic).
    pub protocols: Vec<ProtoMatch>,
    /// What it does.
    pub action: RuleAction,
    /// Emit audit records.
    pub log: bool,
}

/// The rules of one direction, in evaluation order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionRules {
    /// Admin tier.
    pub admin: Vec<Rule>,
    /// Namespace policies' Deny rules.
    pub ns_deny: Vec<Rule>,
    /// Namespace policies' Allow rules.
    pub ns_allow: Vec<Rule>,
    /// Groups isolated in this direction (subjects of namespace policies with rules in it).
    pub isolated: BTreeSet<usize>,
    /// Baseline tier.
    pub baseline: Vec<Rule>,
}

/// The compiled policy of a node (or, for `trace`, of the whole cluster).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// The groups, by index.
    pub groups: Vec<GroupSpec>,
    /// Each group's addresses.
    pub group_ips: Vec<BTreeSet<IpAddr>>,
    /// How many workload interfaces enforced here (local members) each group holds.
    pub group_members: Vec<usize>,
    /// Ingress rules.
    pub ingress: DirectionRules,
    /// Egress rules.
    pub egress: DirectionRules,
    /// Addresses of the interfaces enforced here.
    pub local: BTreeSet<IpAddr>,
    /// Addresses whose network's default action is Deny.
    pub default_deny: BTreeSet<IpAddr>,
    /// Address → (network, `namespace/name`) of every known interface.
    pub owners: BTreeMap<IpAddr, (String, String)>,
    /// Problems found.
    pub problems: Vec<Problem>,
    /// Per policy (`kind name`): how many interfaces enforced here it applies to.
    pub applies_to: BTreeMap<String, usize>,
    /// Per policy (`kind name`): its subject group.
    pub subjects: BTreeMap<String, usize>,
    /// Addresses more than one member holds (a migrating VM's, on its source and target).
    pub shared: BTreeSet<IpAddr>,
    /// The port ids ([`Member::port`]) of the interfaces enforced here.
    pub local_ports: BTreeSet<u32>,
    /// The port ids of the interfaces enforced here whose network's default action is Deny.
    pub deny_ports: BTreeSet<u32>,
    /// Each group's port ids (its local members').
    pub group_ports: Vec<BTreeSet<u32>>,
    /// Port ids two local members share (a chance of about n² / 2³²): neither member's id is
    /// in the sets above, and the copies of broadcasts and multicasts to either port are
    /// dropped (fail closed) until one of them goes.
    pub clash_ports: BTreeSet<u32>,
}

/// Where one member's interface sits in a [`Compiled`]: the groups that hold it, and whether
/// its network's default action is Deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The groups holding the member, ascending.
    pub groups: Vec<usize>,
    /// Its network's `security.defaultAction` is Deny.
    pub deny: bool,
}

fn network_denies(networks: &[Network], network: &str) -> bool {
    networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(network))
        .is_some_and(|n| n.spec.default_action() == Action::Deny)
}

impl Compiled {
    /// Member `m`'s port id as the port sets hold it: a local member's, unless another local
    /// member shares it ([`Compiled::clash_ports`]).
    pub fn port_of(&self, m: &Member) -> Option<u32> {
        m.port.filter(|p| m.local && !self.clash_ports.contains(p))
    }

    /// Adds one member's interface, exactly as compiling with it would have — for a member
    /// whose addresses no other member holds (see [`Compiled::shared`] and
    /// [`Compiled::owners`]): groups depend on the policies only, so a member only changes
    /// group contents and counts. `networks` and `namespaces` are those it was compiled with.
    pub fn add_member(
        &mut self,
        m: &Member,
        networks: &[Network],
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Placement {
        self.change_member(m, networks, namespaces, true)
    }

    /// Removes one member's interface, exactly as compiling without it would have (same
    /// condition as [`Compiled::add_member`]).
    pub fn remove_member(
        &mut self,
        m: &Member,
        networks: &[Network],
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Placement {
        self.change_member(m, networks, namespaces, false)
    }

    fn change_member(
        &mut self,
        m: &Member,
        networks: &[Network],
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
        add: bool,
    ) -> Placement {
        let change = |set: &mut BTreeSet<IpAddr>| {
            for ip in &m.ips {
                if add {
                    set.insert(*ip);
                } else {
                    set.remove(ip);
                }
            }
        };
        for ip in &m.ips {
            if add {
                self.owners.insert(
                    *ip,
                    (m.network.clone(), format!("{}/{}", m.namespace, m.name)),
                );
            } else {
                self.owners.remove(ip);
            }
        }
        let port = self.port_of(m);
        let change_port = |set: &mut BTreeSet<u32>| {
            if let Some(p) = port {
                if add {
                    set.insert(p);
                } else {
                    set.remove(&p);
                }
            }
        };
        if m.local {
            change(&mut self.local);
            change_port(&mut self.local_ports);
        }
        let deny = network_denies(networks, &m.network);
        if deny {
            change(&mut self.default_deny);
            change_port(&mut self.deny_ports);
        }
        let groups: Vec<usize> = (0..self.groups.len())
            .filter(|i| self.groups[*i].matches(m, namespaces))
            .collect();
        for i in &groups {
            change(&mut self.group_ips[*i]);
            change_port(&mut self.group_ports[*i]);
            if m.local {
                let count = &mut self.group_members[*i];
                *count = if add {
                    *count + 1
                } else {
                    count.saturating_sub(1)
                };
            }
        }
        for (policy, subject) in &self.subjects {
            if let Some(n) = self.applies_to.get_mut(policy) {
                *n = self.group_members[*subject];
            }
        }
        Placement { groups, deny }
    }
}

/// Everything the compiler reads.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Cluster policies.
    pub cluster: &'a [ClusterSegmentationPolicy],
    /// Namespace policies.
    pub namespaced: &'a [SegmentationPolicy],
    /// Namespace labels.
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// Networks (default actions; names for checks).
    pub networks: &'a [Network],
    /// Workload interfaces.
    pub members: &'a [Member],
}

struct Builder<'a> {
    inputs: Inputs<'a>,
    out: Compiled,
    keys: BTreeMap<String, usize>,
    next_id: u32,
}

impl Builder<'_> {
    fn group(&mut self, spec: GroupSpec) -> usize {
        let key = spec.key();
        if let Some(i) = self.keys.get(&key) {
            return *i;
        }
        let i = self.out.groups.len();
        let members: Vec<&Member> = self
            .inputs
            .members
            .iter()
            .filter(|m| spec.matches(m, self.inputs.namespaces))
            .collect();
        self.out
            .group_members
            .push(members.iter().filter(|m| m.local).count());
        self.out
            .group_ports
            .push(members.iter().filter_map(|m| self.out.port_of(m)).collect());
        self.out
            .group_ips
            .push(members.iter().flat_map(|m| m.ips.iter().copied()).collect());
        self.out.groups.push(spec);
        self.keys.insert(key, i);
        i
    }

    /// Reports each of a policy's validation errors `errs`, followed by what becomes of the
    /// policy (`outcome`).
    fn invalid(
        &mut self,
        kind: &'static str,
        object: &str,
        errs: Vec<weft_crds::validate::FieldError>,
        outcome: &str,
    ) {
        for e in errs {
            self.out.problems.push(Problem {
                kind,
                object: object.to_owned(),
                message: format!("{e}; {outcome}"),
                reason: None,
            });
        }
    }

    fn check_networks(
        &mut self,
        kind: &'static str,
        object: &str,
        field: &str,
        nets: &Option<Vec<String>>,
    ) {
        for n in nets.iter().flatten() {
            if !self
                .inputs
                .networks
                .iter()
                .any(|x| x.metadata.name.as_deref() == Some(n.as_str()))
            {
                self.out.problems.push(Problem {
                    kind,
                    object: object.into(),
                    message: format!("{field}: Network {n} does not exist; it matches nothing until it is created"),
                    reason: None,
                });
            }
        }
    }

    /// The peers of a rule as matches; `own_namespace` for namespace policies.
    fn peers(&mut self, peers: &[Peer], own_namespace: Option<&str>) -> Vec<PeerMatch> {
        if peers.is_empty() {
            return vec![PeerMatch::Any];
        }
        let mut out = Vec::new();
        for p in peers {
            if let Some(cidrs) = &p.cidrs {
                out.push(PeerMatch::Cidrs(
                    cidrs.iter().filter_map(|c| c.net().ok()).collect(),
                ));
                continue;
            }
            let spec = if let Some(ns) = &p.namespaces {
                GroupSpec {
                    namespace: None,
                    namespace_selector: Some(ns.clone()),
                    pod_selector: None,
                    networks: p.networks.clone(),
                }
            } else if let Some(PodsSelector {
                namespace_selector,
                pod_selector,
            }) = &p.pods
            {
                GroupSpec {
                    namespace: match (namespace_selector, own_namespace) {
                        (None, Some(ns)) => Some(ns.to_string()),
                        _ => None,
                    },
                    namespace_selector: namespace_selector.clone(),
                    pod_selector: pod_selector.clone(),
                    networks: p.networks.clone(),
                }
            } else {
                GroupSpec {
                    namespace: None,
                    namespace_selector: None,
                    pod_selector: None,
                    networks: p.networks.clone(),
                }
            };
            out.push(PeerMatch::Group(self.group(spec)));
        }
        out
    }

    fn rules(
        &mut self,
        kind: &'static str,
        object: &str,
        subject: usize,
        rules: &[PolicyRule],
        dir: Direction,
        own_namespace: Option<&str>,
    ) -> Vec<Rule> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let (peers, pf) = match dir {
                Direction::Ingress => (r.from.as_deref().unwrap_or_default(), "from"),
                Direction::Egress => (r.to.as_deref().unwrap_or_default(), "to"),
            };
            for (j, p) in peers.iter().enumerate() {
                self.check_networks(
                    kind,
                    object,
                    &format!("spec.{}[{i}].{pf}[{j}].networks", dir.as_str()),
                    &p.networks,
                );
            }
            let protocols: Vec<ProtoMatch> = r
                .protocols
                .iter()
                .flatten()
                .map(|p| ProtoMatch {
                    protocol: p.protocol,
                    ports: p.ports(),
                    icmp_type: p.icmp_type.and_then(|t| u8::try_from(t).ok()),
                    icmp_code: p.icmp_code.and_then(|t| u8::try_from(t).ok()),
                })
                .collect();
            for peer in self.peers(peers, own_namespace) {
                self.next_id += 1;
                out.push(Rule {
                    id: self.next_id,
                    origin: Origin {
                        kind,
                        policy: object.to_string(),
                        rule: r.name.clone(),
                    },
                    subject,
                    peer,
                    protocols: protocols.clone(),
                    action: r.action,
                    log: r.log,
                });
            }
        }
        out
    }
}

/// A cluster policy's rules `rules` (at `field`, `spec.ingress` or `spec.egress`) as they are
/// enforced when `errors` (the fields of its validation errors) name some of them: a rule no
/// error names as it is; an invalid Accept rule left out (without it the traffic goes on to
/// the next rules and tiers, which allow no more than it did); an invalid Deny or Pass rule,
/// or one whose action is wrong, as a Deny of everything that way (what it was meant to match
/// is unknown, and a Pass left out could let a later Accept allow what the namespace policies
/// would deny). An error on the list itself (too many rules) names no rule.
fn fail_closed(rules: &[PolicyRule], field: &str, errors: &[String]) -> Vec<PolicyRule> {
    let names = |i: usize| {
        let at = format!("{field}[{i}]");
        errors.iter().any(|e| {
            e.strip_prefix(&at)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    };
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            if !names(i) {
                return Some(r.clone());
            }
            match r.action {
                RuleAction::Accept => None,
                RuleAction::Deny | RuleAction::Pass | RuleAction::Allow => Some(PolicyRule {
                    name: r.name.clone(),
                    action: RuleAction::Deny,
                    from: None,
                    to: None,
                    protocols: None,
                    log: r.log,
                }),
            }
        })
        .collect()
}

fn object_name(meta: &kube::api::ObjectMeta, namespaced: bool) -> String {
    let name = meta.name.clone().unwrap_or_default();
    if namespaced {
        format!(
            "{}/{name}",
            meta.namespace.clone().unwrap_or_else(|| "default".into())
        )
    } else {
        name
    }
}

/// A workload interface's addresses for the policies: `ips`, and the IPv6 link-local address
/// of MAC `mac` (EUI-64), the only other source the guard lets the interface send from (see
/// `agent::guard`). Every interface has one, on IPv4-only networks too: without it in the
/// groups and the sets of local addresses, a workload's link-local traffic (to another on its
/// bridge, from the node) would meet no policy.
pub fn with_link_local(mut ips: Vec<IpAddr>, mac: Option<&str>) -> Vec<IpAddr> {
    if let Some(mac) = mac.and_then(weft_dataplane::names::parse_mac) {
        let ll = IpAddr::V6(weft_dataplane::names::eui64_link_local(mac));
        if !ips.contains(&ll) {
            ips.push(ll);
        }
    }
    ips
}

/// Compiles the policies.
pub fn compile(inputs: Inputs<'_>) -> Compiled {
    let mut b = Builder {
        inputs,
        out: Compiled::default(),
        keys: BTreeMap::new(),
        next_id: 0,
    };
    let mut ports = BTreeSet::new();
    for p in inputs
        .members
        .iter()
        .filter(|m| m.local)
        .filter_map(|m| m.port)
    {
        if !ports.insert(p) {
            b.out.clash_ports.insert(p);
        }
    }
    for m in inputs.members {
        for ip in &m.ips {
            if b.out
                .owners
                .insert(
                    *ip,
                    (m.network.clone(), format!("{}/{}", m.namespace, m.name)),
                )
                .is_some()
            {
                b.out.shared.insert(*ip);
            }
            if m.local {
                b.out.local.insert(*ip);
            }
        }
        let port = b.out.port_of(m);
        b.out.local_ports.extend(port);
        if network_denies(inputs.networks, &m.network) {
            b.out.default_deny.extend(m.ips.iter().copied());
            b.out.deny_ports.extend(port);
        }
    }

    // Cluster policies: by tier, priority, name.
    let mut cluster: Vec<&ClusterSegmentationPolicy> = inputs.cluster.iter().collect();
    cluster.sort_by(|a, c| {
        (a.spec.tier, a.spec.priority, &a.metadata.name).cmp(&(
            c.spec.tier,
            c.spec.priority,
            &c.metadata.name,
        ))
    });
    const CLUSTER: &str = "ClusterSegmentationPolicy";
    const NAMESPACED: &str = "SegmentationPolicy";
    for p in cluster {
        let object = object_name(&p.metadata, false);
        // A policy that fails its checks (only one an older, looser schema admitted, or a
        // manifest of the standalone agent) fails closed rule by rule, where its subject is
        // usable: dropping it would drop its Deny rules, opening what it closes.
        let (ingress_rules, egress_rules) = match p.spec.validate() {
            Ok(()) => (
                std::borrow::Cow::Borrowed(p.spec.ingress.as_slice()),
                std::borrow::Cow::Borrowed(p.spec.egress.as_slice()),
            ),
            Err(errs) => {
                if errs.iter().any(|e| e.field.starts_with("spec.subject")) {
                    b.invalid(
                        CLUSTER,
                        &object,
                        errs,
                        "the policy is not enforced until it is fixed",
                    );
                    continue;
                }
                let fields: Vec<String> = errs.iter().map(|e| e.field.clone()).collect();
                b.invalid(
                    CLUSTER,
                    &object,
                    errs,
                    "until it is fixed, its valid rules are enforced, each invalid Deny or Pass rule denies all of its subject's traffic that way and each invalid Accept rule is left out (fail closed)",
                );
                (
                    std::borrow::Cow::Owned(fail_closed(&p.spec.ingress, "spec.ingress", &fields)),
                    std::borrow::Cow::Owned(fail_closed(&p.spec.egress, "spec.egress", &fields)),
                )
            }
        };
        let s = &p.spec.subject;
        b.check_networks(CLUSTER, &object, "spec.subject.networks", &s.networks);
        let spec = match (&s.namespaces, &s.pods) {
            (Some(ns), _) => GroupSpec {
                namespace: None,
                namespace_selector: Some(ns.clone()),
                pod_selector: None,
                networks: s.networks.clone(),
            },
            (None, Some(pods)) => GroupSpec {
                namespace: None,
                namespace_selector: pods.namespace_selector.clone(),
                pod_selector: pods.pod_selector.clone(),
                networks: s.networks.clone(),
            },
            (None, None) => continue,
        };
        let subject = b.group(spec);
        b.out
            .applies_to
            .insert(format!("{CLUSTER} {object}"), b.out.group_members[subject]);
        b.out
            .subjects
            .insert(format!("{CLUSTER} {object}"), subject);
        let ingress = b.rules(
            CLUSTER,
            &object,
            subject,
            &ingress_rules,
            Direction::Ingress,
            None,
        );
        let egress = b.rules(
            CLUSTER,
            &object,
            subject,
            &egress_rules,
            Direction::Egress,
            None,
        );
        let (i, e) = match p.spec.tier {
            Tier::Admin => (&mut b.out.ingress.admin, &mut b.out.egress.admin),
            Tier::Baseline => (&mut b.out.ingress.baseline, &mut b.out.egress.baseline),
        };
        i.extend(ingress);
        e.extend(egress);
    }

    let mut namespaced: Vec<&SegmentationPolicy> = inputs.namespaced.iter().collect();
    namespaced.sort_by(|a, c| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&c.metadata.namespace, &c.metadata.name))
    });
    for p in namespaced {
        let object = object_name(&p.metadata, true);
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        // A policy that fails its checks (only one an older, looser schema admitted) has none
        // of its rules enforced, but its subject stays isolated where it has rules, allowed
        // nothing by them: fail closed, as dropping the policy would open the subject to
        // everyone. Without a usable subject there is nothing to isolate.
        let valid = match p.spec.validate() {
            Ok(()) => true,
            Err(errs) => {
                let subject_ok = errs.iter().all(|e| !e.field.starts_with("spec.subject"));
                let outcome = if subject_ok {
                    "the policy's rules are not enforced until it is fixed, and its subject stays isolated where it has rules (fail closed)"
                } else {
                    "the policy is not enforced until it is fixed"
                };
                b.invalid(NAMESPACED, &object, errs, outcome);
                if !subject_ok {
                    continue;
                }
                false
            }
        };
        if valid {
            b.check_networks(
                NAMESPACED,
                &object,
                "spec.subject.networks",
                &p.spec.subject.networks,
            );
        }
        let subject = b.group(GroupSpec {
            namespace: Some(ns.clone()),
            namespace_selector: None,
            pod_selector: Some(p.spec.subject.pod_selector.clone()),
            networks: p.spec.subject.networks.clone(),
        });
        b.out.applies_to.insert(
            format!("{NAMESPACED} {object}"),
            b.out.group_members[subject],
        );
        b.out
            .subjects
            .insert(format!("{NAMESPACED} {object}"), subject);
        for (dir, rules) in [
            (Direction::Ingress, &p.spec.ingress),
            (Direction::Egress, &p.spec.egress),
        ] {
            if rules.is_empty() {
                continue;
            }
            let compiled = if valid {
                b.rules(NAMESPACED, &object, subject, rules, dir, Some(&ns))
            } else {
                Vec::new()
            };
            let target = match dir {
                Direction::Ingress => &mut b.out.ingress,
                Direction::Egress => &mut b.out.egress,
            };
            target.isolated.insert(subject);
            for r in compiled {
                if r.action == RuleAction::Deny {
                    target.ns_deny.push(r);
                } else {
                    target.ns_allow.push(r);
                }
            }
        }
    }
    b.out
}

/// Compiles the policies of a resource snapshot over `members`.
pub fn compile_resources(res: &Resources, members: &[Member]) -> Compiled {
    compile(Inputs {
        cluster: &res.cluster_policies,
        namespaced: &res.policies,
        namespaces: &res.namespaces,
        networks: &res.networks,
        members,
    })
}

/// [`compile_resources`], with the IPv6 link-local addresses that members of two Networks hold
/// (one MAC on two Networks: cloned VMs) taken out of their identities: no policy names them,
/// and they are denied by default (in the default-deny set, and local when a local member holds
/// one), held as shared (a change that touches one takes the full compilation). Returns the
/// problems that name the members (kind `Network`, the first of their Networks).
pub fn compile_members(res: &Resources, mut members: Vec<Member>) -> (Compiled, Vec<Problem>) {
    let mut problems = Vec::new();
    let unshared = unshare_link_local(&mut members, &mut problems);
    let mut c = compile_resources(res, &members);
    for (ip, local) in unshared {
        c.shared.insert(ip);
        c.default_deny.insert(ip);
        if local {
            c.local.insert(ip);
        }
    }
    (c, problems)
}

/// Takes out of `members` the link-local addresses that members of two Networks hold, reporting
/// each in `problems`; returns them, each with whether a local member held it.
fn unshare_link_local(
    members: &mut [Member],
    problems: &mut Vec<Problem>,
) -> BTreeMap<IpAddr, bool> {
    let mut holders: BTreeMap<IpAddr, Vec<(String, String, bool)>> = BTreeMap::new();
    for m in members.iter() {
        for ip in &m.ips {
            if let IpAddr::V6(v6) = ip
                && v6.is_unicast_link_local()
            {
                holders.entry(*ip).or_default().push((
                    m.network.clone(),
                    format!("{}/{}", m.namespace, m.name),
                    m.local,
                ));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (ip, mut by) in holders {
        by.sort();
        by.dedup();
        let Some(first) = by.first().map(|(n, _, _)| n.clone()) else {
            continue;
        };
        if by.iter().all(|(n, _, _)| *n == first) {
            continue;
        }
        let named: Vec<String> = by
            .iter()
            .map(|(network, w, _)| format!("{w} on Network {network}"))
            .collect();
        let problem = Problem {
            kind: "Network",
            object: first,
            message: format!(
                "{} have one MAC, so one IPv6 link-local address {ip}: no policy names it, and its traffic is denied unless a rule allows it by address (cidrs); give one of them another MAC",
                named.join(" and ")
            ),
            reason: None,
        };
        if !problems.contains(&problem) {
            problems.push(problem);
        }
        out.insert(ip, by.iter().any(|(_, _, local)| *local));
    }
    if !out.is_empty() {
        for m in members.iter_mut() {
            m.ips.retain(|ip| !out.contains_key(ip));
        }
    }
    out
}

/// A packet (the first of a connection) as `trace` asks about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol.
    pub protocol: L4Protocol,
    /// Destination port (TCP, UDP, SCTP).
    pub port: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
}

impl Packet {
    /// The first packet `trace` asks about: to `port` for TCP, UDP and SCTP, an echo request
    /// (ICMP type 8, ICMPv6 type 128) otherwise.
    pub fn first(src: IpAddr, dst: IpAddr, protocol: L4Protocol, port: u16) -> Packet {
        Packet {
            src,
            dst,
            protocol,
            port: protocol.has_ports().then_some(port),
            icmp: (!protocol.has_ports()).then_some((if dst.is_ipv6() { 128 } else { 8 }, 0)),
        }
    }

    /// `trace`'s `--protocol` flag.
    pub fn parse_protocol(text: &str) -> anyhow::Result<L4Protocol> {
        L4Protocol::parse(text).ok_or_else(|| {
            anyhow::anyhow!("--protocol: {text:?} is not tcp, udp, sctp, icmp or icmpv6")
        })
    }
}

/// The verdict of one direction and what decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Whose policy: `namespace/name` of the workload.
    pub workload: String,
    /// Allowed?
    pub allowed: bool,
    /// The rule that decided, if a rule did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Origin>,
    /// The rule's id (audit records carry it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<u32>,
    /// In words.
    pub reason: String,
    /// The Pass rules that handed the packet on before the decision (at most one per tier),
    /// in order, e.g. `Pass by ClusterSegmentationPolicy guard-db rule pass-prod (Admin tier)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<String>,
}

/// The decision for a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Does the connection pass?
    pub allowed: bool,
    /// The source workload's egress, if the source is a workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Step>,
    /// The destination workload's ingress, if the destination is a workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Step>,
}

impl Decision {
    /// The steps taken: the source's egress, then the destination's ingress.
    pub fn steps(&self) -> impl Iterator<Item = (Direction, &Step)> {
        [
            (Direction::Egress, &self.egress),
            (Direction::Ingress, &self.ingress),
        ]
        .into_iter()
        .filter_map(|(d, s)| s.as_ref().map(|s| (d, s)))
    }

    /// One line: the deciding step (a denial; else the most specific reason, a rule over a
    /// default).
    pub fn summary(&self) -> String {
        let step = self
            .steps()
            .find(|(_, s)| !s.allowed)
            .or_else(|| self.steps().find(|(_, s)| s.rule.is_some()))
            .or_else(|| self.steps().next());
        let verdict = if self.allowed { "accepted" } else { "denied" };
        match step {
            Some((d, s)) => format!("{verdict}: {} of {}: {}", d.as_str(), s.workload, s.reason),
            None => format!("{verdict}: neither end is a weft workload"),
        }
    }
}

/// Prints a `trace` answer: one line and a line per direction, or the decision as JSON. A
/// reader that stops early (`| head -1`) ends the output quietly.
pub fn print_trace(
    from: &str,
    to: &str,
    port: u16,
    protocol: weft_crds::L4Protocol,
    decision: &Decision,
    note: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let text = trace_text(from, to, port, protocol, decision, note, json)?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The text [`print_trace`] prints.
pub fn trace_text(
    from: &str,
    to: &str,
    port: u16,
    protocol: weft_crds::L4Protocol,
    decision: &Decision,
    note: Option<&str>,
    json: bool,
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    if json {
        let mut v = serde_json::to_value(decision)?;
        if let Some(n) = note {
            v["via"] = serde_json::json!(n);
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        // ICMP has no port: `echo-request/icmp`, not `0/icmp`.
        let what = match protocol {
            weft_crds::L4Protocol::Icmp | weft_crds::L4Protocol::Icmpv6 => {
                format!("echo-request/{}", protocol.nft_name())
            }
            _ => format!("{port}/{}", protocol.nft_name()),
        };
        writeln!(out, "{from} -> {to} {what}: {}", decision.summary())?;
        if let Some(n) = note {
            writeln!(out, "  via {n}")?;
        }
        for (word, step) in [
            ("egress ", &decision.egress),
            ("ingress", &decision.ingress),
        ] {
            if let Some(s) = step {
                // The Pass rules that handed the packet on, then the decision.
                for pass in &s.passed {
                    writeln!(out, "  {word} of {:<20} pass    {pass}", s.workload)?;
                }
                writeln!(
                    out,
                    "  {word} of {:<20} {}  {}",
                    s.workload,
                    if s.allowed { "accept" } else { "deny  " },
                    s.reason
                )?;
            }
        }
    }
    Ok(out)
}

impl ProtoMatch {
    /// Does the packet match?
    pub fn matches(&self, p: &Packet) -> bool {
        if self.protocol != p.protocol {
            return false;
        }
        if let Some((lo, hi)) = self.ports
            && !p.port.is_some_and(|x| lo <= x && x <= hi)
        {
            return false;
        }
        if let Some(t) = self.icmp_type
            && p.icmp.map(|i| i.0) != Some(t)
        {
            return false;
        }
        if let Some(c) = self.icmp_code
            && p.icmp.map(|i| i.1) != Some(c)
        {
            return false;
        }
        true
    }
}

impl Compiled {
    fn in_group(&self, g: usize, ip: &IpAddr) -> bool {
        self.group_ips.get(g).is_some_and(|s| s.contains(ip))
    }

    fn rule_matches(&self, r: &Rule, subject: &IpAddr, peer: &IpAddr, p: &Packet) -> bool {
        self.in_group(r.subject, subject)
            && match &r.peer {
                PeerMatch::Any => true,
                PeerMatch::Group(g) => self.in_group(*g, peer),
                PeerMatch::Cidrs(c) => c.iter().any(|n| n.contains(peer)),
            }
            && (r.protocols.is_empty() || r.protocols.iter().any(|m| m.matches(p)))
    }

    fn step(&self, workload: &str, allowed: bool, rule: Option<&Rule>, reason: String) -> Step {
        Step {
            workload: workload.to_string(),
            allowed,
            rule: rule.map(|r| r.origin.clone()),
            rule_id: rule.map(|r| r.id),
            reason,
            passed: Vec::new(),
        }
    }

    fn evaluate(&self, dir: Direction, subject: &IpAddr, peer: &IpAddr, p: &Packet) -> Step {
        let mut passed = Vec::new();
        let mut step = self.evaluate_tiers(dir, subject, peer, p, &mut passed);
        step.passed = passed;
        step
    }

    /// [`evaluate`](Self::evaluate), recording each Pass rule taken in `passed`.
    fn evaluate_tiers(
        &self,
        dir: Direction,
        subject: &IpAddr,
        peer: &IpAddr,
        p: &Packet,
        passed: &mut Vec<String>,
    ) -> Step {
        let rules = match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        };
        let workload = self
            .owners
            .get(subject)
            .map(|o| o.1.clone())
            .unwrap_or_default();
        let mut tier = |name: &str, list: &[Rule]| -> Option<Step> {
            for r in list {
                if self.rule_matches(r, subject, peer, p) {
                    let (allowed, word) = match r.action {
                        RuleAction::Accept | RuleAction::Allow => (true, "Accept"),
                        RuleAction::Deny => (false, "Deny"),
                        RuleAction::Pass => {
                            passed.push(format!("Pass by {} ({name} tier)", r.origin));
                            return None;
                        }
                    };
                    return Some(self.step(
                        &workload,
                        allowed,
                        Some(r),
                        format!("{word} by {} ({name} tier)", r.origin),
                    ));
                }
            }
            None
        };
        if let Some(s) = tier("Admin", &rules.admin) {
            return s;
        }
        if rules.isolated.iter().any(|g| self.in_group(*g, subject)) {
            if let Some(r) = rules
                .ns_deny
                .iter()
                .find(|r| self.rule_matches(r, subject, peer, p))
            {
                return self.step(&workload, false, Some(r), format!("Deny by {}", r.origin));
            }
            if let Some(r) = rules
                .ns_allow
                .iter()
                .find(|r| self.rule_matches(r, subject, peer, p))
            {
                return self.step(&workload, true, Some(r), format!("Allow by {}", r.origin));
            }
            return self.step(
                &workload,
                false,
                None,
                format!(
                    "isolated in {} by a SegmentationPolicy of its namespace and no Allow rule matches",
                    dir.as_str()
                ),
            );
        }
        if let Some(s) = tier("Baseline", &rules.baseline) {
            return s;
        }
        let network = self
            .owners
            .get(subject)
            .map(|o| o.0.clone())
            .unwrap_or_default();
        if self.default_deny.contains(subject) {
            self.step(
                &workload,
                false,
                None,
                format!("no policy decides; Network {network} security.defaultAction is Deny"),
            )
        } else {
            self.step(
                &workload,
                true,
                None,
                format!("no policy decides; Network {network} security.defaultAction is Allow"),
            )
        }
    }

    /// Decides a packet the way the node's rules do: the source's egress (if it is a workload)
    /// and the destination's ingress (if it is one) must both allow it.
    pub fn decide(&self, p: &Packet) -> Decision {
        let egress = self
            .owners
            .contains_key(&p.src)
            .then(|| self.evaluate(Direction::Egress, &p.src, &p.dst, p));
        let ingress = self
            .owners
            .contains_key(&p.dst)
            .then(|| self.evaluate(Direction::Ingress, &p.dst, &p.src, p));
        Decision {
            allowed: egress.as_ref().is_none_or(|s| s.allowed)
                && ingress.as_ref().is_none_or(|s| s.allowed),
            egress,
            ingress,
        }
    }

    /// The rule with this id, and the direction it belongs to.
    pub fn rule_with_direction(&self, id: u32) -> Option<(Direction, &Rule)> {
        [
            (Direction::Ingress, &self.ingress),
            (Direction::Egress, &self.egress),
        ]
        .into_iter()
        .flat_map(|(dir, d)| {
            d.admin
                .iter()
                .chain(&d.ns_deny)
                .chain(&d.ns_allow)
                .chain(&d.baseline)
                .map(move |r| (dir, r))
        })
        .find(|(_, r)| r.id == id)
    }
}

#[cfg(test)]
mod tests;

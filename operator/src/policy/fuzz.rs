//! The policy compiler under arbitrary input, for the fuzz target `policy` and its corpus
//! regression test. One YAML document holds resources (exactly what `kubectl apply` takes) and
//! workload interfaces:
//!
//! ```yaml
//! resources:
//!   - {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {env: prod}}}
//!   - apiVersion: weft.dev/v1alpha1
//!     kind: SegmentationPolicy
//!     metadata: {name: db, namespace: shop}
//!     spec: {subject: {podSelector: {}}, ingress: [{name: none, action: Deny}]}
//! members:
//!   - {namespace: shop, name: db-1, labels: {tier: db}, network: nat, ips: [10.30.0.4]}
//! ```
//!
//! They are compiled and rendered the way the agent does, and traced the way `trace` does; then
//! the properties the compiler promises are checked, and a broken one panics (which is what the
//! fuzzer reports):
//! - workloads change set elements, never rules: compiled without any member, the rules, groups
//!   and problems are the same, and the agent's table differs in set elements only;
//! - every rule's groups exist, rule ids are unique, each rule sits in a stage its action
//!   belongs to; every group address, local address and default-deny address is a member's;
//! - each rule renders one nft rule per family its peer can match and per protocol of that
//!   family, and the rendered rules name only sets and chains the table has;
//! - for every pair of traced addresses and every probe packet, `decide` is consistent (its
//!   verdict is its steps', a deciding rule exists in that direction with that origin and
//!   action) and agrees with the rendered nft rules wherever the subject is enforced here.

use super::{Compiled, Decision, Direction, Member, Packet, PeerMatch, Rule, render};
use crate::agent::firewall;
use crate::model::{self, Resources};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_crds::{L4Protocol, RuleAction};
use weft_dataplane::nft::{Chain, Change, Set, diff, render_table, structure_hash};

/// The fuzz input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Input {
    /// Namespaces, Networks, ClusterSegmentationPolicies, SegmentationPolicies, … .
    #[serde(default)]
    resources: Vec<serde_json::Value>,
    /// Workload interfaces.
    #[serde(default)]
    members: Vec<InputMember>,
}

/// A [`Member`] as written in the input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InputMember {
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    network: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default = "enforced_here")]
    local: bool,
}

fn default_namespace() -> String {
    "default".into()
}

fn enforced_here() -> bool {
    true
}

/// Addresses traced per input (every ordered pair of them is decided).
const MAX_ADDRESSES: usize = 12;
/// Probe packets per pair of addresses.
const MAX_PACKETS: usize = 12;

/// Compiles, renders and traces a fuzz input and checks the compiler's properties (see the
/// module documentation): returns whether the input was read and every resource and policy in
/// it was accepted without a problem. Panics only when a property is broken.
pub fn fuzz_compile(text: &str) -> bool {
    let Ok(input) = serde_saphyr::from_str::<Input>(text) else {
        return false;
    };
    let mut res = Resources::default();
    for (i, doc) in input.resources.into_iter().enumerate() {
        model::add_document(doc, &format!("resource {}", i + 1), &mut res);
    }
    let members: Vec<Member> = input
        .members
        .into_iter()
        .map(|m| Member {
            namespace: m.namespace,
            name: m.name,
            labels: m.labels.into(),
            network: m.network,
            ips: m.ips,
            local: m.local,
            port: None,
        })
        .collect();
    let compiled = super::compile_resources(&res, &members);
    check_structure(&compiled, &members);
    check_table(&res, &compiled);
    let chains = render::chains(&compiled);
    check_rendered_rules(&compiled, &chains);
    let nft = Nft::new(&render::sets(&compiled), &chains);
    check_decisions(&compiled, &nft);
    res.problems.is_empty() && compiled.problems.is_empty()
}

fn stages(c: &Compiled) -> [(Direction, &super::DirectionRules); 2] {
    [
        (Direction::Ingress, &c.ingress),
        (Direction::Egress, &c.egress),
    ]
}

fn check_structure(c: &Compiled, members: &[Member]) {
    let n = c.groups.len();
    assert_eq!(c.group_ips.len(), n, "one address set per group");
    assert_eq!(c.group_members.len(), n, "one member count per group");
    let mut ids = BTreeSet::new();
    for (dir, rules) in stages(c) {
        assert!(
            rules.isolated.iter().all(|g| *g < n),
            "an isolated group that does not exist"
        );
        let lists: [(&str, &[Rule], &[RuleAction]); 4] = [
            (
                "admin",
                &rules.admin,
                &[RuleAction::Accept, RuleAction::Deny, RuleAction::Pass],
            ),
            ("namespace deny", &rules.ns_deny, &[RuleAction::Deny]),
            ("namespace allow", &rules.ns_allow, &[RuleAction::Allow]),
            (
                "baseline",
                &rules.baseline,
                &[RuleAction::Accept, RuleAction::Deny, RuleAction::Pass],
            ),
        ];
        for (stage, list, actions) in lists {
            for r in list {
                assert!(r.subject < n, "rule {} has no subject group", r.id);
                if let PeerMatch::Group(g) = r.peer {
                    assert!(g < n, "rule {} has no peer group", r.id);
                }
                assert!(ids.insert(r.id), "rule id {} is used twice", r.id);
                assert!(
                    actions.contains(&r.action),
                    "{} with action {:?} in the {stage} stage",
                    r.origin,
                    r.action
                );
                assert!(
                    c.rule_with_direction(r.id)
                        .is_some_and(|(d, found)| d == dir && found == r),
                    "rule {} is not found by its id",
                    r.id
                );
                if stage.starts_with("namespace") {
                    assert!(
                        rules.isolated.contains(&r.subject),
                        "{}: a namespace rule whose subject is not isolated",
                        r.origin
                    );
                }
            }
        }
    }
    let known = |ip: &IpAddr| c.owners.contains_key(ip);
    assert!(
        c.group_ips.iter().flatten().all(known),
        "a group holds an address no member has"
    );
    assert!(c.local.iter().all(known), "a local address no member has");
    assert!(
        c.default_deny.iter().all(known),
        "a default-deny address no member has"
    );
    let local = members.iter().filter(|m| m.local).count();
    assert!(
        c.applies_to.values().all(|n| *n <= local),
        "a policy applies to more interfaces than are enforced here"
    );
}

/// The agent's table: "workloads change set elements, never rules" (the module documentation of
/// the compiler), every chain is rendered, and every set and chain a rule names exists.
fn check_table(res: &Resources, c: &Compiled) {
    let bare = super::compile_resources(res, &[]);
    assert_eq!(bare.groups, c.groups, "members changed the groups");
    assert_eq!(bare.ingress, c.ingress, "members changed the ingress rules");
    assert_eq!(bare.egress, c.egress, "members changed the egress rules");
    assert_eq!(bare.problems, c.problems, "members changed the problems");
    let (without, with) = (
        firewall::table(&[], &[], &[], &[], &bare),
        firewall::table(&[], &[], &[], &[], c),
    );
    assert_eq!(
        structure_hash(&without),
        structure_hash(&with),
        "members changed the table beyond set elements"
    );
    assert!(
        diff(&without, &with)
            .0
            .iter()
            .all(|ch| !matches!(ch, Change::ReplaceTable(_))),
        "adding the members replaces the table"
    );
    let text = render_table(&with);
    for chain in &with.chains {
        assert!(
            text.contains(&format!("\tchain {} {{\n", chain.name)),
            "chain {} is not rendered",
            chain.name
        );
    }
    // Every set and chain a rule names exists.
    let sets: BTreeSet<&str> = with
        .sets
        .iter()
        .map(|s| s.name.as_str())
        .chain(with.maps.iter().map(|m| m.name.as_str()))
        .collect();
    let chains: BTreeSet<&str> = with.chains.iter().map(|c| c.name.as_str()).collect();
    for chain in &with.chains {
        for rule in &chain.rules {
            let words: Vec<&str> = rule.split_whitespace().collect();
            assert!(!words.is_empty(), "an empty rule in chain {}", chain.name);
            for w in &words {
                if let Some(set) = w.strip_prefix('@') {
                    assert!(sets.contains(set), "{rule:?} names no set of the table");
                }
            }
            for pair in words.windows(2) {
                if pair[0] == "goto" || pair[0] == "jump" {
                    assert!(chains.contains(pair[1]), "{rule:?}: no such chain");
                }
            }
        }
    }
}

/// Each compiled rule renders one nft rule per family its peer can match and per protocol of
/// that family (one for all traffic); the rules of a stage are in the stage's chain.
fn check_rendered_rules(c: &Compiled, chains: &[Chain]) {
    let lines = |r: &Rule| -> usize {
        [false, true]
            .into_iter()
            .filter(|v6| match &r.peer {
                PeerMatch::Cidrs(nets) => nets.iter().any(|n| n.addr().is_ipv6() == *v6),
                _ => true,
            })
            .map(|v6| {
                if r.protocols.is_empty() {
                    1
                } else {
                    r.protocols
                        .iter()
                        .filter(|p| match p.protocol {
                            L4Protocol::Icmp => !v6,
                            L4Protocol::Icmpv6 => v6,
                            _ => true,
                        })
                        .count()
                }
            })
            .sum()
    };
    for (dir, rules) in stages(c) {
        let d = dir.as_str();
        for (chain, list) in [
            (d.to_string(), rules.admin.iter().collect::<Vec<_>>()),
            (
                format!("{d}_ns"),
                rules.ns_deny.iter().chain(&rules.ns_allow).collect(),
            ),
            (format!("{d}_base"), rules.baseline.iter().collect()),
        ] {
            let expected: usize = list.iter().map(|r| lines(r)).sum();
            let rendered = chains
                .iter()
                .find(|c| c.name == chain)
                .map(|c| {
                    // A rule's first match is its subject group: `ip saddr @g3_4 …`.
                    c.rules
                        .iter()
                        .filter(|l| {
                            l.split_whitespace()
                                .nth(2)
                                .is_some_and(|w| w.starts_with("@g"))
                        })
                        .count()
                })
                .unwrap_or_else(|| panic!("chain {chain} is not rendered"));
            assert_eq!(rendered, expected, "rules rendered in chain {chain}");
        }
    }
}

/// The addresses traced: the members' (those enforced here first), an address of each CIDR
/// peer, and one outside address per family.
fn probe_addresses(c: &Compiled) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = vec![
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    ];
    let cidrs = stages(c).into_iter().flat_map(|(_, d)| {
        d.admin
            .iter()
            .chain(&d.ns_deny)
            .chain(&d.ns_allow)
            .chain(&d.baseline)
            .filter_map(|r| match &r.peer {
                PeerMatch::Cidrs(nets) => Some(nets.iter().map(IpNet::network)),
                _ => None,
            })
            .flatten()
    });
    let candidates = c
        .local
        .iter()
        .copied()
        .chain(c.owners.keys().copied())
        .chain(cidrs);
    for ip in candidates {
        if out.len() >= MAX_ADDRESSES {
            break;
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// One probe packet, without its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    protocol: L4Protocol,
    port: Option<u16>,
    icmp: Option<(u8, u8)>,
}

/// The probe packets: a few common ones, then the edges of every rule's ports and ICMP types.
fn probe_packets(c: &Compiled) -> Vec<Probe> {
    let ports = |protocol, port| Probe {
        protocol,
        port: Some(port),
        icmp: None,
    };
    let icmp = |protocol, t, code| Probe {
        protocol,
        port: None,
        icmp: Some((t, code)),
    };
    let mut out = vec![
        ports(L4Protocol::Tcp, 80),
        ports(L4Protocol::Udp, 53),
        icmp(L4Protocol::Icmp, 8, 0),
        icmp(L4Protocol::Icmpv6, 128, 0),
    ];
    let matches = stages(c).into_iter().flat_map(|(_, d)| {
        d.admin
            .iter()
            .chain(&d.ns_deny)
            .chain(&d.ns_allow)
            .chain(&d.baseline)
            .flat_map(|r| r.protocols.iter())
    });
    for m in matches {
        let more: Vec<Probe> = if m.protocol.has_ports() {
            match m.ports {
                Some((lo, hi)) => vec![
                    ports(m.protocol, lo),
                    ports(m.protocol, hi),
                    ports(m.protocol, hi.wrapping_add(1)),
                ],
                None => vec![ports(m.protocol, 1)],
            }
        } else {
            let t = m.icmp_type.unwrap_or(0);
            let code = m.icmp_code.unwrap_or(0);
            vec![
                icmp(m.protocol, t, code),
                icmp(m.protocol, t, code.wrapping_add(1)),
                icmp(m.protocol, t.wrapping_add(1), code),
            ]
        };
        for p in more {
            if out.len() < MAX_PACKETS && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

fn check_decisions(c: &Compiled, nft: &Nft) {
    let addresses = probe_addresses(c);
    let probes = probe_packets(c);
    for src in &addresses {
        for dst in &addresses {
            let same_family = src.is_ipv6() == dst.is_ipv6();
            for probe in &probes {
                // ICMP is IPv4's, ICMPv6 IPv6's; a pair of two families is only decided.
                let fits = match probe.protocol {
                    L4Protocol::Icmp => src.is_ipv4(),
                    L4Protocol::Icmpv6 => src.is_ipv6(),
                    _ => true,
                };
                if same_family && !fits {
                    continue;
                }
                let p = Packet {
                    src: *src,
                    dst: *dst,
                    protocol: probe.protocol,
                    port: probe.port,
                    icmp: probe.icmp,
                };
                let d = c.decide(&p);
                check_decision(c, &p, &d);
                if same_family {
                    check_rendered_verdicts(c, nft, &p, &d);
                }
            }
        }
    }
}

fn check_decision(c: &Compiled, p: &Packet, d: &Decision) {
    assert_eq!(d.egress.is_some(), c.owners.contains_key(&p.src));
    assert_eq!(d.ingress.is_some(), c.owners.contains_key(&p.dst));
    assert_eq!(
        d.allowed,
        d.steps().all(|(_, s)| s.allowed),
        "the verdict is not its steps'"
    );
    assert!(!d.summary().is_empty());
    for (dir, s) in d.steps() {
        match (s.rule_id, &s.rule) {
            (None, None) => {}
            (Some(id), Some(origin)) => {
                let Some((found_dir, r)) = c.rule_with_direction(id) else {
                    panic!("{p:?}: the deciding rule {id} does not exist");
                };
                assert_eq!(
                    found_dir, dir,
                    "{p:?}: rule {id} decided the other direction"
                );
                assert_eq!(&r.origin, origin, "{p:?}: rule {id} has another origin");
                let allows = match r.action {
                    RuleAction::Accept | RuleAction::Allow => true,
                    RuleAction::Deny => false,
                    RuleAction::Pass => panic!("{p:?}: a Pass rule decided"),
                };
                assert_eq!(s.allowed, allows, "{p:?}: the verdict is not rule {id}'s");
            }
            _ => panic!("{p:?}: a step with a rule id and no rule, or a rule and no id"),
        }
    }
}

/// What `decide` says is what the rendered rules do: for an address enforced here, the nft
/// verdict of each direction is the step's; any other address passes the policy chains.
fn check_rendered_verdicts(c: &Compiled, nft: &Nft, p: &Packet, d: &Decision) {
    for (dir, subject, step) in [
        (Direction::Egress, p.src, &d.egress),
        (Direction::Ingress, p.dst, &d.ingress),
    ] {
        let rendered = nft.allows(dir, p);
        if c.local.contains(&subject) {
            let decided = step.as_ref().map(|s| s.allowed);
            assert_eq!(
                Some(rendered),
                decided,
                "{p:?} {}: the nft rules and trace disagree ({})",
                dir.as_str(),
                d.summary()
            );
        } else {
            assert!(
                rendered,
                "{p:?} {}: the nft rules drop traffic of an address not enforced here",
                dir.as_str()
            );
        }
    }
}

/// The policy chains and sets as nft evaluates them: a small interpreter of the nft rules the
/// renderer writes (anything else in them is a broken property).
struct Nft {
    sets: BTreeMap<String, BTreeSet<IpAddr>>,
    chains: BTreeMap<String, Vec<NftRule>>,
}

#[derive(Debug)]
struct NftRule {
    matches: Vec<NftMatch>,
    verdict: Verdict,
}

#[derive(Debug)]
enum NftMatch {
    /// `ip saddr @set`, `ip6 daddr != { cidr, … }`.
    Address {
        v6: bool,
        src: bool,
        negated: bool,
        set: Addresses,
    },
    /// `meta l4proto tcp`.
    Protocol(L4Protocol),
    /// `tcp dport 80`, `udp dport 1000-2000`.
    Port(L4Protocol, u16, u16),
    /// `icmp type 8`.
    IcmpType(L4Protocol, u8),
    /// `icmp code 0`.
    IcmpCode(L4Protocol, u8),
}

#[derive(Debug)]
enum Addresses {
    Named(String),
    Literal(Vec<IpNet>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Continue,
    Return,
    Drop,
    Goto(String),
}

fn unreadable(rule: &str, why: &str) -> ! {
    panic!("rendered rule {rule:?}: {why}")
}

fn number<T: std::str::FromStr>(rule: &str, word: Option<&str>) -> T {
    word.and_then(|w| w.parse().ok())
        .unwrap_or_else(|| unreadable(rule, "a number is missing"))
}

impl NftRule {
    fn parse(rule: &str) -> NftRule {
        // The audit log statement: `log prefix "weft …" group N`.
        let mut text = rule.to_string();
        if let Some(at) = text.find("log prefix \"") {
            let rest = &text[at + "log prefix \"".len()..];
            let Some(end) = rest.find('"') else {
                unreadable(rule, "an unterminated log prefix")
            };
            let mut after = rest[end + 1..].split_whitespace();
            if after.next() != Some("group") {
                unreadable(rule, "a log prefix without a group");
            }
            let _group: u16 = number(rule, after.next());
            text = format!("{} {}", &text[..at], after.collect::<Vec<_>>().join(" "));
        }
        let mut words = text.split_whitespace();
        let mut matches = Vec::new();
        let mut verdict = Verdict::Continue;
        while let Some(w) = words.next() {
            if verdict != Verdict::Continue {
                unreadable(rule, "words after the verdict");
            }
            match w {
                // `update @set { key counter }`: counts, matches everything.
                "update" => {
                    if !words.next().is_some_and(|s| s.starts_with('@'))
                        || words.next() != Some("{")
                    {
                        unreadable(rule, "an update without a set and a key");
                    }
                    if !words.by_ref().any(|w| w == "}") {
                        unreadable(rule, "an unterminated update");
                    }
                }
                "ip" | "ip6" => {
                    let src = match words.next() {
                        Some("saddr") => true,
                        Some("daddr") => false,
                        _ => unreadable(rule, "saddr or daddr is missing"),
                    };
                    let mut next = words.next();
                    let negated = next == Some("!=");
                    if negated {
                        next = words.next();
                    }
                    let set = match next {
                        Some(name) if name.starts_with('@') => {
                            Addresses::Named(name.trim_start_matches('@').to_string())
                        }
                        Some("{") => {
                            let mut nets = Vec::new();
                            loop {
                                match words.next() {
                                    Some("}") => break,
                                    Some(e) => {
                                        let e = e.trim_end_matches(',');
                                        let net = e
                                            .parse::<IpNet>()
                                            .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                                            .unwrap_or_else(|_| {
                                                unreadable(rule, "an address that does not parse")
                                            });
                                        nets.push(net);
                                    }
                                    None => unreadable(rule, "an unterminated set"),
                                }
                            }
                            if nets.is_empty() {
                                unreadable(rule, "an empty anonymous set");
                            }
                            Addresses::Literal(nets)
                        }
                        _ => unreadable(rule, "an address match without a set"),
                    };
                    matches.push(NftMatch::Address {
                        v6: w == "ip6",
                        src,
                        negated,
                        set,
                    });
                }
                "meta" => {
                    if words.next() != Some("l4proto") {
                        unreadable(rule, "meta without l4proto");
                    }
                    let p = words
                        .next()
                        .and_then(L4Protocol::parse)
                        .unwrap_or_else(|| unreadable(rule, "an unknown protocol"));
                    matches.push(NftMatch::Protocol(p));
                }
                "return" => verdict = Verdict::Return,
                "drop" => verdict = Verdict::Drop,
                "goto" => match words.next() {
                    Some(chain) => verdict = Verdict::Goto(chain.to_string()),
                    None => unreadable(rule, "goto without a chain"),
                },
                other => {
                    let Some(p) = L4Protocol::parse(other) else {
                        unreadable(rule, &format!("unknown word {other:?}"))
                    };
                    match (words.next(), p.has_ports()) {
                        (Some("dport"), true) => {
                            let spec = words.next().unwrap_or_default();
                            let (lo, hi) = spec.split_once('-').unwrap_or((spec, spec));
                            let (lo, hi) = (number(rule, Some(lo)), number(rule, Some(hi)));
                            if lo > hi {
                                unreadable(rule, "a port range that ends before it starts");
                            }
                            matches.push(NftMatch::Port(p, lo, hi));
                        }
                        (Some("type"), false) => {
                            matches.push(NftMatch::IcmpType(p, number(rule, words.next())));
                        }
                        (Some("code"), false) => {
                            matches.push(NftMatch::IcmpCode(p, number(rule, words.next())));
                        }
                        _ => unreadable(rule, &format!("{other} without dport, type or code")),
                    }
                }
            }
        }
        NftRule { matches, verdict }
    }
}

impl Nft {
    /// The interpreter of the rendered sets and chains that judge packets by address. The
    /// port-id sets and the chains of the broadcasts' and multicasts' copies (judged by the
    /// port a copy leaves through, which a unicast packet never is) are left out: the render
    /// tests check that those chains are the ingress chains with the subject matched by port.
    fn new(sets: &[Set], chains: &[Chain]) -> Nft {
        let sets = sets
            .iter()
            .filter(|s| s.key_type != "classid")
            .map(|s| {
                let elements = s
                    .elements
                    .iter()
                    .map(|e| {
                        e.parse::<IpAddr>().unwrap_or_else(|_| {
                            panic!("set {}: element {e:?} is not an address", s.name)
                        })
                    })
                    .collect();
                (s.name.clone(), elements)
            })
            .collect();
        let chains = chains
            .iter()
            .filter(|c| !c.name.starts_with(super::render::COPY_INGRESS))
            .map(|c| {
                assert!(c.base.is_none(), "policy chain {} is a base chain", c.name);
                (
                    c.name.clone(),
                    c.rules.iter().map(|r| NftRule::parse(r)).collect(),
                )
            })
            .collect();
        Nft { sets, chains }
    }

    fn matches(&self, m: &NftMatch, p: &Packet) -> bool {
        let family = |proto: L4Protocol| match proto {
            L4Protocol::Icmp => p.src.is_ipv4(),
            L4Protocol::Icmpv6 => p.src.is_ipv6(),
            _ => true,
        };
        match m {
            NftMatch::Address {
                v6,
                src,
                negated,
                set,
            } => {
                let a = if *src { p.src } else { p.dst };
                // `ip saddr …` only applies to IPv4 packets, negated or not.
                if a.is_ipv6() != *v6 {
                    return false;
                }
                let inside = match set {
                    Addresses::Named(name) => self
                        .sets
                        .get(name)
                        .unwrap_or_else(|| panic!("no set {name}"))
                        .contains(&a),
                    Addresses::Literal(nets) => nets.iter().any(|n| n.contains(&a)),
                };
                inside != *negated
            }
            NftMatch::Protocol(proto) => p.protocol == *proto && family(*proto),
            NftMatch::Port(proto, lo, hi) => {
                p.protocol == *proto && p.port.is_some_and(|x| *lo <= x && x <= *hi)
            }
            NftMatch::IcmpType(proto, t) => {
                p.protocol == *proto && family(*proto) && p.icmp.is_some_and(|i| i.0 == *t)
            }
            NftMatch::IcmpCode(proto, code) => {
                p.protocol == *proto && family(*proto) && p.icmp.is_some_and(|i| i.1 == *code)
            }
        }
    }

    /// Does the direction's chain (jumped to from `forward`) let the packet on? A `return`, or
    /// the end of a chain, does; a `drop` does not; a `goto` continues in another chain.
    fn allows(&self, dir: Direction, p: &Packet) -> bool {
        let mut chain = dir.as_str().to_string();
        // egress → egress_ns → egress_base → egress_default → egress_drop: five chains at most.
        for _ in 0..5 {
            let rules = self
                .chains
                .get(&chain)
                .unwrap_or_else(|| panic!("no chain {chain}"));
            let mut next = None;
            for r in rules {
                if !r.matches.iter().all(|m| self.matches(m, p)) {
                    continue;
                }
                match &r.verdict {
                    Verdict::Continue => {}
                    Verdict::Return => return true,
                    Verdict::Drop => return false,
                    Verdict::Goto(to) => {
                        next = Some(to.clone());
                        break;
                    }
                }
            }
            match next {
                Some(to) => chain = to,
                None => return true,
            }
        }
        panic!("{p:?}: the {} chains loop", dir.as_str())
    }
}

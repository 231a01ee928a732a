//! Renders a [`Compiled`] policy into the sets and chains of weft's `inet weft` table.
//!
//! Sets (`ipv4_addr`/`ipv6_addr`, suffix `4`/`6`): `local` (interfaces enforced on this node),
//! `g<N>` (group N's addresses), `iso_in`/`iso_eg` (isolated by a namespace policy),
//! `deny` (the network's default action is Deny). Chains per direction `D` (`egress`,
//! `ingress`): `D` (gate on local addresses, then the Admin tier), `D_ns`, `D_base`,
//! `D_default`. A rule's Accept is `return` (this direction is done; the other one is still
//! checked), Deny is a `goto` to `D_drop` (which counts the drop per local workload address
//! in the dynamic set `drops_<eg|in><4|6>`, then drops), Pass is a `goto` to the next stage. The base chains jump to
//! `egress` then `ingress` for every new connection; replies pass by conntrack.
//!
//! The copies of a broadcast or multicast that the bridge sends out of a workload's port carry
//! the port's id (`meta priority`, tagged by the guard table) and meet the ingress stages again
//! in `ingress_copy`, `ingress_copy_ns`, `ingress_copy_base` and `ingress_copy_default`, the
//! subject matched by port id: sets `local_p`, `g<N>_p`, `iso_in_p`, `deny_p` (type `classid`),
//! `clash_p` (ids two local ports share), and the dynamic `drops_inp` counting their drops.
//!
//! Only the policies shape the rules; workloads change set elements only.

use super::{Compiled, Direction, Member, PeerMatch, Placement, ProtoMatch, Rule};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;
use weft_crds::{L4Protocol, RuleAction};
use weft_dataplane::nft::{Chain, Set};

/// The NFLOG group of audit records.
pub const LOG_GROUP: u16 = 2727;

/// A CIDR as nft prints it in interval sets: a host prefix is the bare address.
pub fn cidr_text(net: &IpNet) -> String {
    let net = net.trunc();
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn set(name: String, v6: bool, elements: BTreeSet<String>) -> Set {
    Set {
        name,
        key_type: if v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
        flags: vec![],
        elements,
    }
}

fn elements<'a>(ips: impl IntoIterator<Item = &'a IpAddr>, v6: bool) -> BTreeSet<String> {
    ips.into_iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .map(|ip| ip.to_string())
        .collect()
}

/// The sets.
pub fn sets(c: &Compiled) -> Vec<Set> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let f = if v6 { "6" } else { "4" };
        out.push(set(format!("local{f}"), v6, elements(&c.local, v6)));
        out.push(set(format!("deny{f}"), v6, elements(&c.default_deny, v6)));
        for (dir, rules) in [("in", &c.ingress), ("eg", &c.egress)] {
            let ips: BTreeSet<IpAddr> = rules
                .isolated
                .iter()
                .flat_map(|g| c.group_ips[*g].iter().copied())
                .collect();
            out.push(set(format!("iso_{dir}{f}"), v6, elements(&ips, v6)));
        }
        for (i, ips) in c.group_ips.iter().enumerate() {
            out.push(set(format!("g{i}_{f}"), v6, elements(ips, v6)));
        }
        for short in ["eg", "in"] {
            let mut drops = set(drops_set(short, v6), v6, BTreeSet::new());
            drops.flags = vec![weft_dataplane::nft::DYNAMIC_FLAG.into()];
            out.push(drops);
        }
    }
    // The port ids, for the broadcasts' and multicasts' copies (one family for both).
    out.push(port_set("local_p", &c.local_ports));
    out.push(port_set("clash_p", &c.clash_ports));
    out.push(port_set("deny_p", &c.deny_ports));
    let iso: BTreeSet<u32> = c
        .ingress
        .isolated
        .iter()
        .flat_map(|g| c.group_ports[*g].iter().copied())
        .collect();
    out.push(port_set("iso_in_p", &iso));
    let mut drops = port_set(COPY_DROPS_SET, &BTreeSet::new());
    drops.flags = vec![weft_dataplane::nft::DYNAMIC_FLAG.into()];
    out.push(drops);
    for (i, ports) in c.group_ports.iter().enumerate() {
        out.push(port_set(&format!("g{i}_p"), ports));
    }
    out
}

/// A set of port ids ([`crate::policy::Member::port`]), as nft lists a `classid`.
fn port_set(name: &str, ports: &BTreeSet<u32>) -> Set {
    Set {
        name: name.into(),
        key_type: "classid".into(),
        flags: vec![],
        elements: ports
            .iter()
            .map(|p| weft_dataplane::names::classid_text(*p))
            .collect(),
    }
}

/// The dynamic set that counts the policy's drops in one direction (`eg`, `in`) and family,
/// per workload address: `drops_eg4` (keyed by the source), `drops_in6` (by the destination).
pub fn drops_set(short: &str, v6: bool) -> String {
    format!("drops_{short}{}", if v6 { "6" } else { "4" })
}

/// The chain a policy drop in `dir` goes to: it counts the packet under the local workload's
/// address (the source of egress, the destination of ingress) in [`drops_set`], then drops it.
pub fn drop_chain(dir: Direction) -> String {
    format!("{}_drop", dir.as_str())
}

/// The elements one member's interface adds to [`sets`] (set name, element), given where it
/// sits: exactly what [`sets`] holds because of it when no other member has its addresses.
pub fn member_elements(c: &Compiled, m: &Member, place: &Placement) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ip in &m.ips {
        let f = if ip.is_ipv6() { "6" } else { "4" };
        let element = ip.to_string();
        let mut push = |set: String| out.push((set, element.clone()));
        if m.local {
            push(format!("local{f}"));
        }
        if place.deny {
            push(format!("deny{f}"));
        }
        for (dir, rules) in [("in", &c.ingress), ("eg", &c.egress)] {
            if place.groups.iter().any(|g| rules.isolated.contains(g)) {
                push(format!("iso_{dir}{f}"));
            }
        }
        for g in &place.groups {
            push(format!("g{g}_{f}"));
        }
    }
    if let Some(port) = c.port_of(m) {
        let element = weft_dataplane::names::classid_text(port);
        let mut push = |set: String| out.push((set, element.clone()));
        push("local_p".into());
        if place.deny {
            push("deny_p".into());
        }
        if place.groups.iter().any(|g| c.ingress.isolated.contains(g)) {
            push("iso_in_p".into());
        }
        for g in &place.groups {
            push(format!("g{g}_p"));
        }
    }
    out
}

fn proto_text(p: &ProtoMatch, v6: bool) -> Option<String> {
    match p.protocol {
        L4Protocol::Icmp if v6 => None,
        L4Protocol::Icmpv6 if !v6 => None,
        L4Protocol::Icmp | L4Protocol::Icmpv6 => {
            let kw = p.protocol.nft_name();
            let mut s = format!("meta l4proto {kw}");
            if let Some(t) = p.icmp_type {
                s = format!("{kw} type {t}");
            }
            if let Some(c) = p.icmp_code {
                s.push_str(&format!(" {kw} code {c}"));
            }
            Some(s)
        }
        proto => {
            let kw = proto.nft_name();
            Some(match p.ports {
                Some((lo, hi)) if lo == hi => format!("{kw} dport {lo}"),
                Some((lo, hi)) => format!("{kw} dport {lo}-{hi}"),
                None => format!("meta l4proto {kw}"),
            })
        }
    }
}

/// `ip saddr`, `ip6 daddr`, ...
fn addr(v6: bool, src: bool) -> &'static str {
    match (v6, src) {
        (false, true) => "ip saddr",
        (false, false) => "ip daddr",
        (true, true) => "ip6 saddr",
        (true, false) => "ip6 daddr",
    }
}

fn log(prefix: &str) -> String {
    format!("log prefix \"weft {prefix} \" group {LOG_GROUP}")
}

/// The nft rules of one compiled rule (one per family and protocol that can match).
fn rule_lines(r: &Rule, dir: Direction, verdict: &str) -> Vec<String> {
    let subject_is_src = dir == Direction::Egress;
    lines(r, !subject_is_src, verdict, |v6, f| {
        format!("{} @g{}_{f}", addr(v6, subject_is_src), r.subject)
    })
}

/// The nft rules of one compiled ingress rule for the copies of a broadcast or multicast
/// (see [`chains`]): the subject is the copy's port id (`meta priority`), not its destination
/// address, which names no workload; the peer (the source) and protocols as in [`rule_lines`].
fn copy_rule_lines(r: &Rule, verdict: &str) -> Vec<String> {
    lines(r, true, verdict, |v6, _| {
        let family = if v6 { "ipv6" } else { "ipv4" };
        format!("meta nfproto {family} meta priority @g{}_p", r.subject)
    })
}

/// The lines of rule `r` per family (`subject` gives each family's match of the subject, from
/// whether it is IPv6 and the set suffix `4`/`6`): the peer on the source or destination
/// address (`peer_is_src`), then each protocol that can match, the audit log, the verdict.
fn lines(
    r: &Rule,
    peer_is_src: bool,
    verdict: &str,
    subject: impl Fn(bool, &str) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let f = if v6 { "6" } else { "4" };
        let mut head = subject(v6, f);
        match &r.peer {
            PeerMatch::Any => {}
            PeerMatch::Group(g) => {
                head.push_str(&format!(" {} @g{g}_{f}", addr(v6, peer_is_src)));
            }
            PeerMatch::Cidrs(cidrs) => {
                let list: Vec<String> = cidrs
                    .iter()
                    .filter(|c| c.addr().is_ipv6() == v6)
                    .map(cidr_text)
                    .collect();
                if list.is_empty() {
                    continue;
                }
                head.push_str(&format!(
                    " {} {{ {} }}",
                    addr(v6, peer_is_src),
                    list.join(", ")
                ));
            }
        }
        let protos: Vec<Option<String>> = if r.protocols.is_empty() {
            vec![None]
        } else {
            r.protocols
                .iter()
                .filter_map(|p| proto_text(p, v6))
                .map(Some)
                .collect()
        };
        for p in protos {
            let mut line = head.clone();
            if let Some(p) = p {
                line.push(' ');
                line.push_str(&p);
            }
            if r.log {
                line.push(' ');
                line.push_str(&log(&format!("r{} {}", r.id, verdict_word(r.action))));
            }
            line.push(' ');
            line.push_str(verdict);
            out.push(line);
        }
    }
    out
}

/// A tier's rules for broadcast and multicast copies (see [`tier`]).
fn copy_tier(rules: &[Rule], next: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in rules {
        let verdict = match r.action {
            RuleAction::Deny => format!("goto {COPY_DROP}"),
            RuleAction::Pass => format!("goto {next}"),
            _ => "return".to_string(),
        };
        out.extend(copy_rule_lines(r, &verdict));
    }
    out.push(format!("goto {next}"));
    out
}

/// The chain that judges a broadcast's or multicast's copy to a workload port as the
/// receiver's ingress (see [`chains`]).
pub const COPY_INGRESS: &str = "ingress_copy";
/// Where such a copy denied goes: counted per port id in [`COPY_DROPS_SET`], dropped.
const COPY_DROP: &str = "ingress_copy_drop";
/// The dynamic set that counts the copies the receivers' ingress denied, per port id (the
/// agent adds them to the port's workload's policy drops).
pub const COPY_DROPS_SET: &str = "drops_inp";

fn verdict_word(a: RuleAction) -> &'static str {
    match a {
        RuleAction::Accept | RuleAction::Allow => "accept",
        RuleAction::Deny => "deny",
        RuleAction::Pass => "pass",
    }
}

fn chain(name: String, rules: Vec<String>) -> Chain {
    Chain {
        name,
        base: None,
        rules,
    }
}

/// A tier's rules: Accept returns (the direction is done), Deny drops, Pass and the end of
/// the tier go on to the `next` stage.
fn tier(rules: &[Rule], dir: Direction, next: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in rules {
        let verdict = match r.action {
            RuleAction::Deny => format!("goto {}", drop_chain(dir)),
            RuleAction::Pass => format!("goto {next}"),
            _ => "return".to_string(),
        };
        out.extend(rule_lines(r, dir, &verdict));
    }
    out.push(format!("goto {next}"));
    out
}

/// The policy chains.
pub fn chains(c: &Compiled) -> Vec<Chain> {
    let mut out = Vec::new();
    for (dir, rules, short) in [
        (Direction::Egress, &c.egress, "eg"),
        (Direction::Ingress, &c.ingress, "in"),
    ] {
        let d = dir.as_str();
        let src = dir == Direction::Egress;
        let drop = format!("goto {}", drop_chain(dir));
        // Stage 1: only interfaces enforced here; the Admin tier.
        let mut main = vec![
            format!("{} != @local4 return", addr(false, src)),
            format!("{} != @local6 return", addr(true, src)),
        ];
        main.extend(tier(&rules.admin, dir, &format!("{d}_ns")));
        out.push(chain(d.to_string(), main));
        // Stage 2: namespace policies.
        let mut ns = vec![
            format!("{} != @iso_{short}4 goto {d}_base", addr(false, src)),
            format!("{} != @iso_{short}6 goto {d}_base", addr(true, src)),
        ];
        for r in &rules.ns_deny {
            ns.extend(rule_lines(r, dir, &drop));
        }
        for r in &rules.ns_allow {
            ns.extend(rule_lines(r, dir, "return"));
        }
        ns.push(format!("{} {drop}", log(&format!("isolated-{short} deny"))));
        out.push(chain(format!("{d}_ns"), ns));
        // Stage 3: Baseline tier.
        out.push(chain(
            format!("{d}_base"),
            tier(&rules.baseline, dir, &format!("{d}_default")),
        ));
        // Stage 4: the network's default action.
        out.push(chain(
            format!("{d}_default"),
            vec![
                format!(
                    "{} @deny4 {} {drop}",
                    addr(false, src),
                    log(&format!("default-{short} deny"))
                ),
                format!(
                    "{} @deny6 {} {drop}",
                    addr(true, src),
                    log(&format!("default-{short} deny"))
                ),
            ],
        ));
        if dir == Direction::Ingress {
            out.extend(copy_chains(rules));
        }
        // The drops, counted per local workload address.
        out.push(chain(
            drop_chain(dir),
            [false, true]
                .into_iter()
                .map(|v6| {
                    format!(
                        "update @{} {{ {} counter }} drop",
                        drops_set(short, v6),
                        addr(v6, src)
                    )
                })
                .collect(),
        ));
    }
    out
}

/// The ingress stages again for the copies of a broadcast or multicast that the bridge sends
/// out of a workload's port: their destination names no workload, so the bridge tags each copy
/// with its port's id (`meta priority`, see the guard table), and these chains match the
/// subject by that id where the others match its addresses. The caller jumps here only with
/// a local port's id. Same tiers, verdicts and default action as `ingress`; a copy denied is
/// counted per port id ([`COPY_DROPS_SET`]), and audited only by a rule with `log`.
fn copy_chains(rules: &super::DirectionRules) -> Vec<Chain> {
    let (ns_stage, base, default) = (
        format!("{COPY_INGRESS}_ns"),
        format!("{COPY_INGRESS}_base"),
        format!("{COPY_INGRESS}_default"),
    );
    let drop = format!("goto {COPY_DROP}");
    let mut ns = vec![format!("meta priority != @iso_in_p goto {base}")];
    for r in &rules.ns_deny {
        ns.extend(copy_rule_lines(r, &drop));
    }
    for r in &rules.ns_allow {
        ns.extend(copy_rule_lines(r, "return"));
    }
    // A copy an isolation or the default action denies is counted, not audited: it is no
    // connection, and a LAN's chatter would flood the audit log (a rule with `log` audits).
    ns.push(drop.clone());
    vec![
        chain(COPY_INGRESS.to_string(), copy_tier(&rules.admin, &ns_stage)),
        chain(ns_stage, ns),
        chain(base, copy_tier(&rules.baseline, &default)),
        chain(default, vec![format!("meta priority @deny_p {drop}")]),
        chain(
            COPY_DROP.to_string(),
            vec![format!(
                "update @{COPY_DROPS_SET} {{ meta priority counter }} drop"
            )],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_prefixes_render_like_nft() {
        assert_eq!(cidr_text(&"1.2.3.4/32".parse().unwrap()), "1.2.3.4");
        assert_eq!(cidr_text(&"10.0.0.0/8".parse().unwrap()), "10.0.0.0/8");
        assert_eq!(cidr_text(&"::/0".parse().unwrap()), "::/0");
        assert_eq!(cidr_text(&"10.1.2.3/8".parse().unwrap()), "10.0.0.0/8");
    }
}

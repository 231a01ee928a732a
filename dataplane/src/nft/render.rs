//! Rendering tables and transactions to nft text (pure).

use super::{Chain, Change, Family, Map, Set, Table};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

/// An interface name as an nftables string literal (`"wn-nat"`), or `None` when the name is not
/// one weft creates or accepts: nft strings have no escapes, so a `"` (or a newline, `;`, `\\`…)
/// would end the literal and turn the rest into ruleset text. Every interface name that goes
/// into nft text passes through here.
pub fn ifname_literal(name: &str) -> Option<String> {
    let safe = crate::names::is_valid_ifname(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'@'));
    safe.then(|| format!("\"{name}\""))
}

/// Renders `table <family> <name> { … }` in a deterministic layout: the comment, then sets, maps
/// and chains in the given order; set and map elements sorted (one per line), and no
/// `elements = …` line for an empty set or map.
pub fn render_table(table: &Table) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table {} {} {{", table.family, table.name);
    if let Some(comment) = &table.comment {
        let _ = writeln!(out, "\tcomment \"{}\"", comment.replace('"', "'"));
    }
    let mut first = true;
    let mut separate = |out: &mut String| {
        if !first {
            out.push('\n');
        }
        first = false;
    };
    for set in &table.sets {
        separate(&mut out);
        let _ = writeln!(out, "\tset {} {{", set.name);
        set_body(set, &mut out);
        out.push_str("\t}\n");
    }
    for map in &table.maps {
        separate(&mut out);
        let _ = writeln!(out, "\tmap {} {{", map.name);
        map_body(map, &mut out);
        out.push_str("\t}\n");
    }
    for chain in &table.chains {
        separate(&mut out);
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        if let Some(head) = chain_head(chain) {
            let _ = writeln!(out, "\t\t{head}");
        }
        for rule in rule_lines(chain) {
            let _ = writeln!(out, "\t\t{rule}");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

/// The lines of a set's block: its key, flags and elements.
fn set_body(set: &Set, out: &mut String) {
    let _ = writeln!(out, "\t\t{}", key_declaration(&set.key_type));
    render_flags(&set.flags, out);
    render_elements(set.elements.iter().map(String::as_str), out);
}

/// The lines of a map's block: its types, flags and elements.
fn map_body(map: &Map, out: &mut String) {
    let _ = writeln!(out, "\t\ttype {} : {}", map.key_type, map.value_type);
    render_flags(&map.flags, out);
    let pairs: Vec<String> = map
        .elements
        .iter()
        .map(|(k, v)| format!("{k} : {v}"))
        .collect();
    render_elements(pairs.iter().map(String::as_str), out);
}

/// `type … hook … priority …; [policy …;]` of a base chain, `None` for a regular chain.
fn chain_head(chain: &Chain) -> Option<String> {
    chain.base.as_ref().map(|base| {
        let mut head = format!(
            "type {} hook {} priority {};",
            base.kind, base.hook, base.priority
        );
        if let Some(policy) = &base.policy {
            let _ = write!(head, " policy {policy};");
        }
        head
    })
}

/// The comment weft puts on the first rule of `chain`: `weft chain <hash>`, the hash (sha256,
/// first 16 hex characters) of the chain's name, hook registration and rules. The kernel keeps
/// it with the rule, and a listing reads it back, so comparing it with the desired chain's
/// tells whether the chain changed without parsing rules back.
pub fn chain_fingerprint(chain: &Chain) -> String {
    let mut text = format!("chain {}\n", chain.name);
    if let Some(head) = chain_head(chain) {
        text.push_str(&head);
        text.push('\n');
    }
    for rule in &chain.rules {
        text.push_str(rule);
        text.push('\n');
    }
    format!("weft chain {}", short_hash(&text))
}

/// The rules of `chain` as rendered: the first one with the chain's fingerprint as its comment
/// (unless it has a comment of its own; nft takes one per rule).
fn rule_lines(chain: &Chain) -> Vec<String> {
    let mut lines = chain.rules.clone();
    if let Some(first) = lines.first_mut()
        && !first.contains("comment \"")
    {
        let _ = write!(first, " comment \"{}\"", chain_fingerprint(chain));
    }
    lines
}

/// sha256 of `text`, hex, first 16 characters.
fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(16);
    for b in digest.iter().take(8) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// `type <key>`, or the key as written when it is a `typeof …` declaration (see
/// [`super::Set::key_type`]).
fn key_declaration(key: &str) -> String {
    match typeof_key(key) {
        Some(expressions) => format!("typeof {expressions}"),
        None => format!("type {key}"),
    }
}

/// The expressions of a `typeof …` key, `None` for a key type.
pub(super) fn typeof_key(key: &str) -> Option<&str> {
    key.trim_start()
        .strip_prefix("typeof ")
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

fn render_flags(flags: &[String], out: &mut String) {
    if !flags.is_empty() {
        let _ = writeln!(out, "\t\tflags {}", flags.join(","));
    }
}

fn render_elements<'a>(elements: impl ExactSizeIterator<Item = &'a str>, out: &mut String) {
    let n = elements.len();
    if n == 0 {
        return;
    }
    out.push_str("\t\telements = {\n");
    for (i, e) in elements.enumerate() {
        let _ = writeln!(out, "\t\t\t{e}{}", if i + 1 < n { "," } else { "" });
    }
    out.push_str("\t\t}\n");
}

/// sha256 (hex, first 16 characters) of the table rendered with every set and map emptied:
/// equal hashes mean the two tables differ at most in their elements.
pub fn structure_hash(table: &Table) -> String {
    let mut skeleton = table.clone();
    for set in &mut skeleton.sets {
        set.elements.clear();
    }
    for map in &mut skeleton.maps {
        map.elements.clear();
    }
    short_hash(&render_table(&skeleton))
}

fn element_line<'a>(
    verb: &str,
    family: Family,
    table: &str,
    name: &str,
    items: impl Iterator<Item = &'a str>,
    out: &mut String,
) {
    let items: Vec<&str> = items.collect();
    if items.is_empty() {
        return;
    }
    // One element per line: nft then blames the exact element when it rejects one.
    let _ = writeln!(out, "{verb} element {family} {table} {name} {{");
    for (i, item) in items.iter().enumerate() {
        let _ = writeln!(
            out,
            "\t{item}{}",
            if i + 1 < items.len() { "," } else { "" }
        );
    }
    out.push_str("}\n");
}

pub(super) fn render_change(change: &Change, out: &mut String) {
    match change {
        Change::ReplaceTable(t) => {
            let _ = writeln!(out, "add table {} {}", t.family, t.name);
            let _ = writeln!(out, "delete table {} {}", t.family, t.name);
            out.push_str(&render_table(t));
        }
        Change::DeleteTable { family, name } => {
            let _ = writeln!(out, "add table {family} {name}");
            let _ = writeln!(out, "delete table {family} {name}");
        }
        Change::FlushChain {
            family,
            table,
            chain,
        } => {
            let _ = writeln!(out, "flush chain {family} {table} {chain}");
        }
        Change::DeleteChain {
            family,
            table,
            chain,
        } => {
            let _ = writeln!(out, "delete chain {family} {table} {chain}");
        }
        Change::AddChain {
            family,
            table,
            chain,
        } => {
            let _ = write!(out, "add chain {family} {table} {}", chain.name);
            if let Some(head) = chain_head(chain) {
                let _ = write!(out, " {{ {head} }}");
            }
            out.push('\n');
        }
        Change::AddRules {
            family,
            table,
            chain,
        } => {
            for rule in rule_lines(chain) {
                let _ = writeln!(out, "add rule {family} {table} {} {rule}", chain.name);
            }
        }
        Change::DeleteSet { family, table, set } => {
            let _ = writeln!(out, "delete set {family} {table} {set}");
        }
        Change::DeleteMap { family, table, map } => {
            let _ = writeln!(out, "delete map {family} {table} {map}");
        }
        Change::AddSet { family, table, set } => {
            let _ = writeln!(out, "add set {family} {table} {} {{", set.name);
            set_body(set, out);
            out.push_str("}\n");
        }
        Change::AddMap { family, table, map } => {
            let _ = writeln!(out, "add map {family} {table} {} {{", map.name);
            map_body(map, out);
            out.push_str("}\n");
        }
        Change::AddElements {
            family,
            table,
            set,
            elements,
            ..
        } => element_line(
            "add",
            *family,
            table,
            set,
            elements.iter().map(String::as_str),
            out,
        ),
        Change::DeleteElements {
            family,
            table,
            set,
            elements,
            ..
        } => element_line(
            "delete",
            *family,
            table,
            set,
            elements.iter().map(String::as_str),
            out,
        ),
        Change::AddMapElements {
            family,
            table,
            map,
            elements,
            ..
        } => {
            let pairs: Vec<String> = elements.iter().map(|(k, v)| format!("{k} : {v}")).collect();
            element_line(
                "add",
                *family,
                table,
                map,
                pairs.iter().map(String::as_str),
                out,
            );
        }
        Change::DeleteMapElements {
            family,
            table,
            map,
            keys,
            ..
        } => element_line(
            "delete",
            *family,
            table,
            map,
            keys.iter().map(String::as_str),
            out,
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::{BaseChain, Chain, Map, Set, SetKey, Transaction};
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn interface_names_become_literals_only_when_nothing_can_escape_them() {
        assert_eq!(ifname_literal("wn-nat").as_deref(), Some("\"wn-nat\""));
        assert_eq!(ifname_literal("eth0.20").as_deref(), Some("\"eth0.20\""));
        for bad in [
            "wn-a\",\"eth0",
            "a b",
            "a;b",
            "a\\b",
            "",
            "waytoolonginterface",
            "a\nb",
        ] {
            assert_eq!(ifname_literal(bad), None, "{bad:?}");
        }
    }

    fn strings(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn pairs(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base(kind: &str, hook: &str, priority: &str, policy: Option<&str>) -> Option<BaseChain> {
        Some(BaseChain {
            kind: kind.into(),
            hook: hook.into(),
            priority: priority.into(),
            policy: policy.map(Into::into),
        })
    }

    /// A realistic NAT table: masquerade by sets, DNAT through an interval + concatenation map,
    /// isolation through a verdict map.
    pub(crate) fn nat_table() -> Table {
        Table {
            family: Family::Inet,
            name: "weft".into(),
            comment: Some("managed by weft".into()),
            sets: vec![
                Set {
                    name: "bridges".into(),
                    key_type: "ifname".into(),
                    flags: vec![],
                    elements: strings(&["\"wn-blue\"", "\"wn-red\""]),
                },
                Set {
                    name: "nat4".into(),
                    key_type: "ipv4_addr".into(),
                    flags: vec!["interval".into()],
                    elements: strings(&["10.20.0.0/16", "10.10.0.0/16"]),
                },
                Set {
                    name: "empty".into(),
                    key_type: "ipv6_addr".into(),
                    flags: vec!["interval".into()],
                    elements: BTreeSet::new(),
                },
            ],
            maps: vec![
                Map {
                    name: "fwd4".into(),
                    key_type: "ipv4_addr . inet_proto . inet_service".into(),
                    value_type: "ipv4_addr . inet_service".into(),
                    flags: vec!["interval".into()],
                    elements: pairs(&[
                        ("0.0.0.0/0 . tcp . 8080", "10.10.0.5 . 80"),
                        ("192.168.0.0/16 . udp . 5353", "10.10.0.6 . 53"),
                        ("10.0.0.0/8 . tcp . 8000-8010", "10.20.0.7 . 8000"),
                    ]),
                },
                Map {
                    name: "verdicts".into(),
                    key_type: "ipv4_addr . ipv4_addr".into(),
                    value_type: "verdict".into(),
                    flags: vec![],
                    elements: pairs(&[
                        ("10.10.0.5 . 10.20.0.7", "accept"),
                        ("10.10.0.6 . 10.20.0.7", "jump isolate"),
                    ]),
                },
            ],
            chains: vec![
                Chain {
                    name: "isolate".into(),
                    base: None,
                    rules: vec!["counter drop".into()],
                },
                Chain {
                    name: "prerouting".into(),
                    base: base("nat", "prerouting", "dstnat", Some("accept")),
                    rules: vec![
                        "meta l4proto { tcp, udp } fib daddr type local dnat ip addr . port to ip saddr . meta l4proto . th dport map @fwd4"
                            .into(),
                    ],
                },
                Chain {
                    name: "postrouting".into(),
                    base: base("nat", "postrouting", "srcnat", Some("accept")),
                    rules: vec!["ip saddr @nat4 oifname != @bridges masquerade".into()],
                },
                Chain {
                    name: "forward".into(),
                    base: base("filter", "forward", "filter", None),
                    rules: vec![
                        "ct state established,related accept".into(),
                        "iifname @bridges ip saddr . ip daddr vmap @verdicts".into(),
                    ],
                },
            ],
        }
    }

    /// A bridge table with sets keyed by raw payload: `typeof` keys of a 128-bit and a 48-bit
    /// integer next to a `type` key.
    pub(crate) fn typeof_table() -> Table {
        Table {
            family: Family::Bridge,
            name: "weft".into(),
            comment: None,
            sets: vec![
                Set {
                    name: "ips6".into(),
                    key_type: "ifname . ipv6_addr".into(),
                    flags: vec![],
                    elements: strings(&["\"wfa\" . fd77::2"]),
                },
                Set {
                    name: "targets6".into(),
                    key_type: "typeof iifname . @th,64,128".into(),
                    flags: vec![],
                    elements: strings(&[
                        "\"wfa\" . 0xfd770000000000000000000000000002",
                        "\"wfa\" . 0xfe800000000000000858aafffe4d0002",
                        "\"wfb\" . 0x00000000000000000000000000000001",
                    ]),
                },
                Set {
                    name: "lladdrs".into(),
                    key_type: "typeof iifname . @th,208,48".into(),
                    flags: vec![],
                    elements: strings(&["\"wfa\" . 0x0a580a4d0002"]),
                },
            ],
            maps: vec![],
            chains: vec![Chain {
                name: "prerouting".into(),
                base: base("filter", "prerouting", "filter", Some("accept")),
                rules: vec![
                    "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @targets6 drop".into(),
                ],
            }],
        }
    }

    #[test]
    fn typeof_sets_render_as_golden_text() {
        insta::assert_snapshot!(render_table(&typeof_table()));
    }

    #[test]
    fn a_typeof_key_is_structure_and_its_elements_are_not() {
        let a = typeof_table();
        let mut fewer = typeof_table();
        fewer.sets[1].elements.clear();
        assert_eq!(structure_hash(&a), structure_hash(&fewer));
        let mut narrower = typeof_table();
        narrower.sets[1].key_type = "typeof iifname . @th,64,64".into();
        assert_ne!(structure_hash(&a), structure_hash(&narrower));
        let mut typed = typeof_table();
        typed.sets[1].key_type = "ifname . ipv6_addr".into();
        assert_ne!(structure_hash(&a), structure_hash(&typed));
    }

    #[test]
    fn nat_table_renders_as_golden_text() {
        insta::assert_snapshot!(render_table(&nat_table()));
    }

    #[test]
    fn transaction_renders_as_golden_text() {
        let tx = Transaction(vec![
            Change::DeleteElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "nat4".into(),
                key: SetKey {
                    key_type: "ipv4_addr".into(),
                    interval: true,
                },
                elements: vec!["10.20.0.0/16".into()],
            },
            Change::DeleteMapElements {
                family: Family::Inet,
                table: "weft".into(),
                map: "fwd4".into(),
                key: SetKey {
                    key_type: "ipv4_addr . inet_proto . inet_service".into(),
                    interval: true,
                },
                keys: vec!["0.0.0.0/0 . tcp . 8080".into()],
            },
            Change::AddElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "bridges".into(),
                key: SetKey {
                    key_type: "ifname".into(),
                    interval: false,
                },
                elements: vec!["\"wn-green\"".into(), "\"wn-pink\"".into()],
            },
            Change::AddMapElements {
                family: Family::Inet,
                table: "weft".into(),
                map: "verdicts".into(),
                key: SetKey {
                    key_type: "ipv4_addr . ipv4_addr".into(),
                    interval: false,
                },
                value_type: "verdict".into(),
                elements: vec![("10.30.0.2 . 10.30.0.3".into(), "drop".into())],
            },
            Change::DeleteTable {
                family: Family::Bridge,
                name: "weft".into(),
            },
        ]);
        insta::assert_snapshot!(tx.render());
    }

    #[test]
    fn replace_table_adds_and_deletes_before_the_table() {
        let tx = Transaction(vec![Change::ReplaceTable(nat_table())]);
        let text = tx.render();
        assert!(
            text.starts_with("add table inet weft\ndelete table inet weft\ntable inet weft {\n")
        );
    }

    #[test]
    fn empty_transaction_and_empty_element_changes_render_nothing() {
        assert_eq!(Transaction::default().render(), "");
        let tx = Transaction(vec![Change::AddElements {
            family: Family::Inet,
            table: "weft".into(),
            set: "bridges".into(),
            key: SetKey {
                key_type: "ifname".into(),
                interval: false,
            },
            elements: vec![],
        }]);
        assert!(tx.is_empty());
    }

    #[test]
    fn rendering_sorts_elements_whatever_the_insertion_order() {
        let a = nat_table();
        let mut b = nat_table();
        b.sets[1].elements = strings(&["10.10.0.0/16", "10.20.0.0/16"]);
        assert_eq!(render_table(&a), render_table(&b));
    }

    #[test]
    fn structure_hash_ignores_elements_only() {
        let a = nat_table();
        let mut b = nat_table();
        b.sets[0].elements.insert("\"wn-new\"".into());
        b.maps[1].elements.clear();
        assert_eq!(structure_hash(&a), structure_hash(&b));
        assert_eq!(structure_hash(&a).len(), 16);
        let mut c = nat_table();
        c.chains[2].rules.push("counter".into());
        assert_ne!(structure_hash(&a), structure_hash(&c));
        let mut d = nat_table();
        d.comment = None;
        assert_ne!(structure_hash(&a), structure_hash(&d));
        let mut e = nat_table();
        e.sets[1].flags.clear();
        assert_ne!(structure_hash(&a), structure_hash(&e));
    }

    #[test]
    fn comment_quotes_cannot_break_the_syntax() {
        let t = Table {
            comment: Some("say \"hi\"".into()),
            name: "t".into(),
            ..Table::default()
        };
        assert_eq!(
            render_table(&t),
            "table inet t {\n\tcomment \"say 'hi'\"\n}\n"
        );
    }
}

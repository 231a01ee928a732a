//! The diffs between two tables: element by element ([`diff`]) and object by object
//! ([`diff_in_place`]).

use super::{Chain, Change, Map, Set, SetKey, Table, Transaction, structure_hash};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The transaction that turns `current` into `desired`:
/// - nothing when they are equal (elements compared through [`canonical_element`]);
/// - only element deletes (first) and adds (then) when their [`structure_hash`]es are equal;
///   changing the value of an existing map key is a delete plus an add;
/// - one [`Change::ReplaceTable`] with `desired` otherwise.
pub fn diff(current: &Table, desired: &Table) -> Transaction {
    if current.family != desired.family
        || current.name != desired.name
        || structure_hash(current) != structure_hash(desired)
    {
        return Transaction(vec![Change::ReplaceTable(desired.clone())]);
    }
    let (family, table) = (desired.family, desired.name.as_str());
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    // Equal structure hashes mean equal set and map names in the same order.
    for (cur, want) in current.sets.iter().zip(&desired.sets) {
        set_elements(family, table, cur, want, &mut deletes, &mut adds);
    }
    for (cur, want) in current.maps.iter().zip(&desired.maps) {
        map_elements(family, table, cur, want, &mut deletes, &mut adds);
    }
    deletes.extend(adds);
    Transaction(deletes)
}

/// The transaction that turns `current` into `desired` in place, as one batch:
/// 1. every chain whose rules or hook registration changed, that is removed, or one of whose
///    rules uses a set or map about to be deleted is flushed;
/// 2. elements leave the sets and maps that stay (a verdict map element may jump to a chain
///    about to be deleted);
/// 3. removed sets and maps, and those whose definition (key, value type, flags) changed, are
///    deleted;
/// 4. removed chains, and base chains whose hook, type, priority or policy changed (or that
///    became or stopped being base chains), are deleted;
/// 5. new and re-created chains are added, still empty, so that any rule or verdict may jump
///    to them;
/// 6. new and re-created sets and maps are added with their elements;
/// 7. elements join the sets and maps that stay;
/// 8. the flushed and the new chains get their rules.
///
/// Sets that stay keep their elements: only the difference goes (as in [`diff`]), and a
/// dynamic set's elements, the kernel's own, are never touched. Nothing at all when the tables
/// are equal; one [`Change::ReplaceTable`] when they are not the same table (family or name).
///
/// `current` is usually the kernel's table in `desired`'s terms
/// ([`super::TableState::to_table`]): a chain whose fingerprint does not match reads back with
/// placeholder rules, so it differs from the desired chain and is refilled; anything of the
/// kernel's that `desired` does not have is removed.
pub fn diff_in_place(current: &Table, desired: &Table) -> Transaction {
    if current.family != desired.family || current.name != desired.name {
        return Transaction(vec![Change::ReplaceTable(desired.clone())]);
    }
    let (family, table) = (desired.family, desired.name.as_str());
    let mut element_deletes = Vec::new();
    let mut element_adds = Vec::new();
    let mut set_deletes = Vec::new();
    let mut set_adds = Vec::new();
    // Sets and maps deleted in this batch, by name: rules that use them must be flushed first.
    let mut gone: BTreeSet<&str> = BTreeSet::new();

    for want in &desired.sets {
        match current.sets.iter().find(|c| c.name == want.name) {
            Some(cur) if cur.key_type == want.key_type && cur.flags == want.flags => {
                set_elements(
                    family,
                    table,
                    cur,
                    want,
                    &mut element_deletes,
                    &mut element_adds,
                );
            }
            found => {
                if found.is_some() {
                    gone.insert(&want.name);
                    set_deletes.push(Change::DeleteSet {
                        family,
                        table: table.to_string(),
                        set: want.name.clone(),
                    });
                }
                set_adds.push(Change::AddSet {
                    family,
                    table: table.to_string(),
                    set: want.clone(),
                });
            }
        }
    }
    for cur in &current.sets {
        if !desired.sets.iter().any(|d| d.name == cur.name) {
            gone.insert(&cur.name);
            set_deletes.push(Change::DeleteSet {
                family,
                table: table.to_string(),
                set: cur.name.clone(),
            });
        }
    }
    for want in &desired.maps {
        match current.maps.iter().find(|c| c.name == want.name) {
            Some(cur)
                if cur.key_type == want.key_type
                    && cur.value_type == want.value_type
                    && cur.flags == want.flags =>
            {
                map_elements(
                    family,
                    table,
                    cur,
                    want,
                    &mut element_deletes,
                    &mut element_adds,
                );
            }
            found => {
                if found.is_some() {
                    gone.insert(&want.name);
                    set_deletes.push(Change::DeleteMap {
                        family,
                        table: table.to_string(),
                        map: want.name.clone(),
                    });
                }
                set_adds.push(Change::AddMap {
                    family,
                    table: table.to_string(),
                    map: want.clone(),
                });
            }
        }
    }
    for cur in &current.maps {
        if !desired.maps.iter().any(|d| d.name == cur.name) {
            gone.insert(&cur.name);
            set_deletes.push(Change::DeleteMap {
                family,
                table: table.to_string(),
                map: cur.name.clone(),
            });
        }
    }

    let mut flushes = Vec::new();
    let mut chain_deletes = Vec::new();
    let mut chain_adds = Vec::new();
    let mut rule_adds = Vec::new();
    let flush = |name: &str| Change::FlushChain {
        family,
        table: table.to_string(),
        chain: name.to_string(),
    };
    let delete = |name: &str| Change::DeleteChain {
        family,
        table: table.to_string(),
        chain: name.to_string(),
    };
    let add = |chain: &Chain| Change::AddChain {
        family,
        table: table.to_string(),
        chain: Chain {
            rules: Vec::new(),
            ..chain.clone()
        },
    };
    let rules = |chain: &Chain| Change::AddRules {
        family,
        table: table.to_string(),
        chain: chain.clone(),
    };
    for want in &desired.chains {
        match current.chains.iter().find(|c| c.name == want.name) {
            None => {
                chain_adds.push(add(want));
                rule_adds.push(rules(want));
            }
            Some(cur) if cur.base != want.base => {
                flushes.push(flush(&cur.name));
                chain_deletes.push(delete(&cur.name));
                chain_adds.push(add(want));
                rule_adds.push(rules(want));
            }
            Some(cur)
                if cur.rules != want.rules
                    || cur
                        .rules
                        .iter()
                        .any(|r| set_references(r).any(|s| gone.contains(s))) =>
            {
                flushes.push(flush(&cur.name));
                rule_adds.push(rules(want));
            }
            Some(_) => {}
        }
    }
    for cur in &current.chains {
        if !desired.chains.iter().any(|d| d.name == cur.name) {
            flushes.push(flush(&cur.name));
            chain_deletes.push(delete(&cur.name));
        }
    }

    let mut changes = flushes;
    changes.extend(element_deletes);
    changes.extend(set_deletes);
    changes.extend(chain_deletes);
    changes.extend(chain_adds);
    changes.extend(set_adds);
    changes.extend(element_adds);
    changes.extend(rule_adds.into_iter().filter(|c| match c {
        Change::AddRules { chain, .. } => !chain.rules.is_empty(),
        _ => true,
    }));
    Transaction(changes)
}

/// The names of the sets and maps a rule uses (`@name`), a raw payload expression
/// (`@th,64,128`) left out.
pub(super) fn set_references(rule: &str) -> impl Iterator<Item = &str> {
    rule.split('@').skip(1).filter_map(|rest| {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        (!name.is_empty() && !rest[end..].starts_with(',')).then_some(name)
    })
}

/// The element deletes and adds that turn set `cur` into `want` (nothing for a dynamic set:
/// the kernel's own elements, counters of what rules matched, are never weft's to change).
fn set_elements(
    family: super::Family,
    table: &str,
    cur: &Set,
    want: &Set,
    deletes: &mut Vec<Change>,
    adds: &mut Vec<Change>,
) {
    if want.flags.iter().any(|f| f == super::DYNAMIC_FLAG) {
        return;
    }
    let have = canonical_index(cur.elements.iter());
    let wanted = canonical_index(want.elements.iter());
    let gone: Vec<String> = have
        .iter()
        .filter(|(c, _)| !wanted.contains_key(*c))
        .map(|(_, raw)| raw.to_string())
        .collect();
    let new: Vec<String> = wanted
        .iter()
        .filter(|(c, _)| !have.contains_key(*c))
        .map(|(_, raw)| raw.to_string())
        .collect();
    if !gone.is_empty() {
        deletes.push(Change::DeleteElements {
            family,
            table: table.to_string(),
            set: want.name.clone(),
            key: SetKey::of(want),
            elements: gone,
        });
    }
    if !new.is_empty() {
        adds.push(Change::AddElements {
            family,
            table: table.to_string(),
            set: want.name.clone(),
            key: SetKey::of(want),
            elements: new,
        });
    }
}

/// The element deletes and adds that turn map `cur` into `want`; changing the value of an
/// existing key is a delete plus an add.
fn map_elements(
    family: super::Family,
    table: &str,
    cur: &Map,
    want: &Map,
    deletes: &mut Vec<Change>,
    adds: &mut Vec<Change>,
) {
    let have = canonical_pairs(&cur.elements);
    let wanted = canonical_pairs(&want.elements);
    let gone: Vec<String> = have
        .iter()
        .filter(|(c, h)| wanted.get(*c).map(|w| &w.value) != Some(&h.value))
        .map(|(_, h)| h.raw_key.to_string())
        .collect();
    let new: Vec<(String, String)> = wanted
        .iter()
        .filter(|(c, w)| have.get(*c).map(|h| &h.value) != Some(&w.value))
        .map(|(_, w)| (w.raw_key.to_string(), w.raw_value.to_string()))
        .collect();
    if !gone.is_empty() {
        deletes.push(Change::DeleteMapElements {
            family,
            table: table.to_string(),
            map: want.name.clone(),
            key: SetKey::of_map(want),
            keys: gone,
        });
    }
    if !new.is_empty() {
        adds.push(Change::AddMapElements {
            family,
            table: table.to_string(),
            map: want.name.clone(),
            key: SetKey::of_map(want),
            value_type: want.value_type.clone(),
            elements: new,
        });
    }
}

/// canonical → raw.
fn canonical_index<'a>(items: impl Iterator<Item = &'a String>) -> BTreeMap<String, &'a str> {
    items
        .map(|raw| (canonical_element(raw), raw.as_str()))
        .collect()
}

/// One map element, indexed by its canonical key.
struct Entry<'a> {
    raw_key: &'a str,
    raw_value: &'a str,
    value: String,
}

fn canonical_pairs(items: &BTreeMap<String, String>) -> BTreeMap<String, Entry<'_>> {
    items
        .iter()
        .map(|(k, v)| {
            let entry = Entry {
                raw_key: k,
                raw_value: v,
                value: canonical_element(v),
            };
            (canonical_element(k), entry)
        })
        .collect()
}

/// Element text in the form nft lists it, so that equal elements compare equal:
/// concatenation parts are separated by ` . `, whitespace is collapsed, addresses are printed
/// the standard way (`fd00:0::1` → `fd00::1`), prefixes lose their host bits and a full-length
/// prefix becomes the bare address (`10.0.0.1/32` → `10.0.0.1`), an address range that is
/// exactly one prefix becomes that prefix (`10.0.0.0-10.0.0.255` → `10.0.0.0/24`), a range of
/// one value becomes the value (`80-80` → `80`), and numbers, decimal or `0x` hex, become
/// decimal without leading zeros (nft lists an integer key part as a JSON number, or as a hex
/// string past 64 bits: `0x0a580a4d0002` → `11373246218242`). Anything else (names, quoted
/// strings, verdicts) is kept as written.
pub fn canonical_element(text: &str) -> String {
    text.split(" . ")
        .map(|part| canonical_part(&part.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect::<Vec<_>>()
        .join(" . ")
}

fn canonical_part(part: &str) -> String {
    if part.starts_with('"') {
        return part.to_string();
    }
    if let Some(c) = canonical_atom(part) {
        return c;
    }
    if let Some((a, b)) = part.split_once('-') {
        let (a, b) = (a.trim(), b.trim());
        if let (Ok(x), Ok(y)) = (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            if x == y {
                return x.to_string();
            }
            if let Some(net) = range_as_prefix(x, y) {
                return net;
            }
            return format!("{x}-{y}");
        }
        if let (Some(x), Some(y)) = (integer(a), integer(b)) {
            return if x == y {
                x.to_string()
            } else {
                format!("{x}-{y}")
            };
        }
    }
    part.to_string()
}

fn canonical_atom(part: &str) -> Option<String> {
    if let Ok(ip) = part.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    if let Ok(net) = part.parse::<IpNet>() {
        let net = net.trunc();
        return Some(if net.prefix_len() == net.max_prefix_len() {
            net.addr().to_string()
        } else {
            net.to_string()
        });
    }
    integer(part).map(|n| n.to_string())
}

/// A decimal or `0x` hex number of at most 128 bits.
fn integer(part: &str) -> Option<u128> {
    let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (part, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u128::from_str_radix(digits, radix).ok()
}

fn range_as_prefix(a: IpAddr, b: IpAddr) -> Option<String> {
    let (lo, hi, bits) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let span = hi.checked_sub(lo)?.checked_add(1);
    // span == None: the whole address space of IPv6.
    let host_bits = match span {
        Some(s) if s.is_power_of_two() => s.trailing_zeros(),
        Some(_) => return None,
        None => 128,
    };
    if host_bits > bits || (host_bits < 128 && lo & ((1u128 << host_bits) - 1) != 0) {
        return None;
    }
    let len = u8::try_from(bits - host_bits).ok()?;
    IpNet::new(a, len).ok().map(|n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::render::tests::nat_table;
    use super::*;

    #[test]
    fn equal_tables_give_an_empty_transaction() {
        assert!(diff(&nat_table(), &nat_table()).0.is_empty());
    }

    #[test]
    fn one_new_map_element_is_one_add_not_a_replace() {
        let mut desired = nat_table();
        desired
            .maps
            .iter_mut()
            .find(|m| m.name == "fwd4")
            .unwrap()
            .elements
            .insert("0.0.0.0/0 . tcp . 9090".into(), "10.10.0.9 . 90".into());
        let tx = diff(&nat_table(), &desired);
        assert_eq!(
            tx.0,
            vec![Change::AddMapElements {
                family: super::super::Family::Inet,
                table: "weft".into(),
                map: "fwd4".into(),
                key: SetKey {
                    key_type: "ipv4_addr . inet_proto . inet_service".into(),
                    interval: true,
                },
                value_type: "ipv4_addr . inet_service".into(),
                elements: vec![("0.0.0.0/0 . tcp . 9090".into(), "10.10.0.9 . 90".into())],
            }]
        );
    }

    #[test]
    fn the_kernel_s_elements_of_a_dynamic_set_are_left_alone() {
        let mut desired = nat_table();
        desired.sets.push(super::super::Set {
            name: "drops".into(),
            key_type: "ipv4_addr".into(),
            flags: vec![super::super::DYNAMIC_FLAG.into()],
            elements: Default::default(),
        });
        let mut kernel = desired.clone();
        if let Some(set) = kernel.sets.last_mut() {
            set.elements
                .insert("10.10.0.5 counter packets 3 bytes 180".into());
        }
        assert!(diff(&kernel, &desired).0.is_empty());
    }

    #[test]
    fn a_changed_rule_replaces_the_table() {
        let mut desired = nat_table();
        desired.chains[2].rules[0] = "ip saddr @nat4 masquerade".into();
        assert_eq!(
            diff(&nat_table(), &desired).0,
            vec![Change::ReplaceTable(desired.clone())]
        );
    }

    #[test]
    fn a_new_set_or_another_table_name_replaces_the_table() {
        let mut desired = nat_table();
        desired.sets.pop();
        assert!(matches!(
            diff(&nat_table(), &desired).0.as_slice(),
            [Change::ReplaceTable(_)]
        ));
        let mut renamed = nat_table();
        renamed.name = "other".into();
        assert!(matches!(
            diff(&nat_table(), &renamed).0.as_slice(),
            [Change::ReplaceTable(_)]
        ));
    }

    #[test]
    fn deletes_come_before_adds() {
        let mut desired = nat_table();
        desired.sets[0].elements.insert("\"wn-green\"".into());
        desired.sets[1].elements.remove("10.20.0.0/16");
        let tx = diff(&nat_table(), &desired);
        assert!(matches!(
            tx.0.as_slice(),
            [Change::DeleteElements { set: d, elements: de, .. }, Change::AddElements { set: a, elements: ae, .. }]
                if d == "nat4" && de == &["10.20.0.0/16"] && a == "bridges" && ae == &["\"wn-green\""]
        ));
    }

    #[test]
    fn a_changed_map_value_is_a_delete_then_an_add() {
        let mut desired = nat_table();
        desired.maps[1]
            .elements
            .insert("10.10.0.5 . 10.20.0.7".into(), "drop".into());
        let tx = diff(&nat_table(), &desired);
        assert!(matches!(
            tx.0.as_slice(),
            [Change::DeleteMapElements { keys, .. }, Change::AddMapElements { elements, .. }]
                if keys == &["10.10.0.5 . 10.20.0.7"]
                    && elements == &[("10.10.0.5 . 10.20.0.7".to_string(), "drop".to_string())]
        ));
    }

    #[test]
    fn differently_spelled_equal_elements_do_not_churn() {
        let mut current = nat_table();
        current.sets[1].elements = ["10.10.0.0/16", "10.20.0.0/16", "10.0.0.1", "fd00::/64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut desired = nat_table();
        desired.sets[1].elements = [
            "10.10.0.0-10.10.255.255",
            "10.20.5.0/16",
            "10.0.0.1/32",
            "fd00:0:0::/64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(diff(&current, &desired).0.is_empty());
    }

    /// `current` changed into `desired` by `diff_in_place`, in the fake (which refuses what
    /// nft refuses: a set deleted while a rule uses it, a chain deleted while something jumps
    /// to it, a rule that uses what does not exist yet).
    fn applied_in_place(current: &Table, desired: &Table) -> (Transaction, Table) {
        use super::super::{FakeFirewall, Firewall};
        let mut fw = FakeFirewall::new();
        fw.apply(&Transaction(vec![Change::ReplaceTable(current.clone())]))
            .unwrap();
        let tx = diff_in_place(current, desired);
        fw.apply(&tx).unwrap_or_else(|e| panic!("{e}: {tx:#?}"));
        let table = fw.table(desired.family, &desired.name).unwrap().clone();
        (tx, table)
    }

    /// The same table, whatever the order of its sets, maps and chains (the kernel appends what
    /// is added in place).
    fn sorted(mut t: Table) -> Table {
        t.sets.sort_by(|a, b| a.name.cmp(&b.name));
        t.maps.sort_by(|a, b| a.name.cmp(&b.name));
        t.chains.sort_by(|a, b| a.name.cmp(&b.name));
        t
    }

    #[test]
    fn in_place_nothing_changed_is_an_empty_transaction() {
        assert!(diff_in_place(&nat_table(), &nat_table()).0.is_empty());
    }

    #[test]
    fn in_place_element_changes_are_the_element_diff() {
        let mut desired = nat_table();
        desired.sets[0].elements.insert("\"wn-green\"".into());
        desired.sets[1].elements.remove("10.20.0.0/16");
        desired.maps[1]
            .elements
            .insert("10.10.0.5 . 10.20.0.7".into(), "drop".into());
        let tx = diff_in_place(&nat_table(), &desired);
        assert_eq!(tx, diff(&nat_table(), &desired));
        assert!(tx.0.iter().all(Change::is_element_change), "{tx:?}");
    }

    #[test]
    fn in_place_one_changed_rule_flushes_and_refills_only_its_chain() {
        let mut desired = nat_table();
        desired.chains[2].rules[0] = "ip saddr @nat4 masquerade".into();
        let (tx, table) = applied_in_place(&nat_table(), &desired);
        assert_eq!(
            tx.0,
            vec![
                Change::FlushChain {
                    family: super::super::Family::Inet,
                    table: "weft".into(),
                    chain: "postrouting".into(),
                },
                Change::AddRules {
                    family: super::super::Family::Inet,
                    table: "weft".into(),
                    chain: desired.chains[2].clone(),
                },
            ]
        );
        assert_eq!(table, desired);
    }

    #[test]
    fn in_place_a_retyped_set_is_deleted_and_added_after_the_chains_using_it_are_flushed() {
        let mut desired = nat_table();
        // `bridges` is used by postrouting and forward; isolate and prerouting do not use it.
        desired.sets[0].key_type = "ifname . ifname".into();
        desired.sets[0].elements = ["\"wn-blue\" . \"wn-blue\"".to_string()].into();
        let (tx, table) = applied_in_place(&nat_table(), &desired);
        let flushed: Vec<&str> =
            tx.0.iter()
                .filter_map(|c| match c {
                    Change::FlushChain { chain, .. } => Some(chain.as_str()),
                    _ => None,
                })
                .collect();
        assert_eq!(flushed, ["postrouting", "forward"]);
        let at = |want: fn(&Change) -> bool| tx.0.iter().position(want).unwrap();
        let delete = at(|c| matches!(c, Change::DeleteSet { set, .. } if set == "bridges"));
        let add = at(|c| matches!(c, Change::AddSet { set, .. } if set.name == "bridges"));
        let refill = at(|c| matches!(c, Change::AddRules { .. }));
        assert!(delete > 1 && delete < add && add < refill, "{tx:#?}");
        assert!(
            !tx.0
                .iter()
                .any(|c| matches!(c, Change::DeleteChain { .. } | Change::AddChain { .. })),
            "{tx:#?}"
        );
        assert_eq!(sorted(table), sorted(desired));
    }

    #[test]
    fn in_place_a_removed_chain_goes_after_what_jumps_to_it() {
        let mut current = nat_table();
        current.chains[3]
            .rules
            .insert(1, "ip saddr 10.9.0.0/16 jump isolate".into());
        let mut desired = nat_table();
        desired.chains.remove(0);
        desired.maps[1].elements.retain(|_, v| v != "jump isolate");
        let (tx, table) = applied_in_place(&current, &desired);
        let at = |want: &dyn Fn(&Change) -> bool| tx.0.iter().position(want).unwrap();
        let flush_forward =
            at(&|c| matches!(c, Change::FlushChain { chain, .. } if chain == "forward"));
        let flush_isolate =
            at(&|c| matches!(c, Change::FlushChain { chain, .. } if chain == "isolate"));
        let verdict =
            at(&|c| matches!(c, Change::DeleteMapElements { map, .. } if map == "verdicts"));
        let delete = at(&|c| matches!(c, Change::DeleteChain { chain, .. } if chain == "isolate"));
        assert!(
            flush_forward < delete && flush_isolate < delete && verdict < delete,
            "{tx:#?}"
        );
        assert_eq!(table, desired);
    }

    #[test]
    fn in_place_a_new_chain_exists_before_the_rules_and_verdicts_that_jump_to_it() {
        let mut desired = nat_table();
        desired.chains.insert(
            1,
            super::super::Chain {
                name: "audit".into(),
                base: None,
                rules: vec!["counter accept".into()],
            },
        );
        desired.chains[4].rules.push("jump audit".into());
        desired.maps[1]
            .elements
            .insert("10.10.0.9 . 10.20.0.7".into(), "goto audit".into());
        desired.sets.push(super::super::Set {
            name: "meter4".into(),
            key_type: "ipv4_addr".into(),
            flags: vec![super::super::DYNAMIC_FLAG.into()],
            elements: Default::default(),
        });
        let (tx, table) = applied_in_place(&nat_table(), &desired);
        assert!(
            matches!(tx.0.first(), Some(Change::FlushChain { chain, .. }) if chain == "forward"),
            "{tx:#?}"
        );
        assert_eq!(sorted(table), sorted(desired));
    }

    #[test]
    fn in_place_a_base_chain_with_another_hook_is_deleted_and_added_again() {
        let mut desired = nat_table();
        if let Some(base) = desired.chains[3].base.as_mut() {
            base.priority = "filter - 5".into();
            base.policy = Some("drop".into());
        }
        let (tx, table) = applied_in_place(&nat_table(), &desired);
        assert!(
            matches!(
                tx.0.as_slice(),
                [
                    Change::FlushChain { chain: a, .. },
                    Change::DeleteChain { chain: b, .. },
                    Change::AddChain { chain: c, .. },
                    Change::AddRules { chain: d, .. },
                ] if a == "forward" && b == "forward" && c.rules.is_empty() && d == &desired.chains[3]
            ),
            "{tx:#?}"
        );
        assert_eq!(table, desired);
    }

    #[test]
    fn in_place_a_dynamic_set_that_stays_keeps_the_kernel_s_elements() {
        let meter = super::super::Set {
            name: "meter4".into(),
            key_type: "ipv4_addr".into(),
            flags: vec![super::super::DYNAMIC_FLAG.into()],
            elements: Default::default(),
        };
        let mut current = nat_table();
        current.sets.push(meter.clone());
        current.sets[3]
            .elements
            .insert("10.10.0.5 limit rate over 10/second".into());
        let mut desired = nat_table();
        desired.sets.push(meter);
        desired.chains[2].rules.push("counter".into());
        desired.sets.push(super::super::Set {
            name: "more".into(),
            key_type: "ipv4_addr".into(),
            flags: vec![],
            elements: ["192.0.2.1".to_string()].into(),
        });
        let tx = diff_in_place(&current, &desired);
        assert!(
            !tx.0.iter().any(|c| matches!(
                c,
                Change::DeleteSet { set, .. } if set == "meter4"
            ) || matches!(c, Change::DeleteElements { set, .. } if set == "meter4")),
            "{tx:#?}"
        );
    }

    #[test]
    fn in_place_a_kernel_chain_without_this_fingerprint_is_refilled() {
        let desired = nat_table();
        let mut kernel = super::super::TableState::from_table(&desired);
        kernel.chains[0].fingerprint = Some("weft chain 0000000000000000".into());
        kernel.chains[1].fingerprint = None;
        let tx = diff_in_place(&kernel.to_table(&desired), &desired);
        let refilled: Vec<&str> =
            tx.0.iter()
                .filter_map(|c| match c {
                    Change::AddRules { chain, .. } => Some(chain.name.as_str()),
                    _ => None,
                })
                .collect();
        assert_eq!(refilled, ["isolate", "prerouting"], "{tx:#?}");
    }

    #[test]
    fn set_references_leave_raw_payloads_out() {
        let refs: Vec<&str> =
            set_references("iifname . @th,64,128 != @targets6 ip saddr @nat4 vmap @v-1").collect();
        assert_eq!(refs, ["targets6", "nat4", "v-1"]);
    }

    #[test]
    fn canonical_forms_match_what_nft_lists() {
        for (input, want) in [
            ("10.0.0.1/32", "10.0.0.1"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("0.0.0.0/0  .  udp . 053", "0.0.0.0/0 . udp . 53"),
            (
                "10.0.0.0/8 . tcp . 8080-8090",
                "10.0.0.0/8 . tcp . 8080-8090",
            ),
            ("8080-8080", "8080"),
            ("172.16.0.1-172.16.0.9", "172.16.0.1-172.16.0.9"),
            ("10.0.0.0-10.0.0.255", "10.0.0.0/24"),
            ("0.0.0.0-255.255.255.255", "0.0.0.0/0"),
            ("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::/0"),
            ("fd00:0::2 . fd00::3", "fd00::2 . fd00::3"),
            ("\"br0\" . \"br0\"", "\"br0\" . \"br0\""),
            ("jump  isolate", "jump isolate"),
            ("0x0a580a4d0002", "11373246218242"),
            (
                "\"wfa\" . 0xFD770000000000000000000000000002",
                "\"wfa\" . 336912566259749360332458315314104369154",
            ),
            (
                "\"wfb\" . 0x00000000000000000000000000000001",
                "\"wfb\" . 1",
            ),
            ("0x10-0x1f", "16-31"),
            ("0x", "0x"),
            ("accept", "accept"),
        ] {
            assert_eq!(canonical_element(input), want, "{input}");
        }
    }
}

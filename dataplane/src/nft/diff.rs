//! The element-level diff between two tables.

use super::{Change, SetKey, Table, Transaction, structure_hash};
use ipnet::IpNet;
use std::collections::BTreeMap;
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
    let (family, table) = (desired.family, desired.name.clone());
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    // Equal structure hashes mean equal set and map names in the same order.
    for (cur, want) in current.sets.iter().zip(&desired.sets) {
        // The kernel's own elements (counters of what rules matched): never ours to change.
        if want.flags.iter().any(|f| f == super::DYNAMIC_FLAG) {
            continue;
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
                table: table.clone(),
                set: want.name.clone(),
                key: SetKey::of(want),
                elements: gone,
            });
        }
        if !new.is_empty() {
            adds.push(Change::AddElements {
                family,
                table: table.clone(),
                set: want.name.clone(),
                key: SetKey::of(want),
                elements: new,
            });
        }
    }
    for (cur, want) in current.maps.iter().zip(&desired.maps) {
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
                table: table.clone(),
                map: want.name.clone(),
                key: SetKey::of_map(want),
                keys: gone,
            });
        }
        if !new.is_empty() {
            adds.push(Change::AddMapElements {
                family,
                table: table.clone(),
                map: want.name.clone(),
                key: SetKey::of_map(want),
                value_type: want.value_type.clone(),
                elements: new,
            });
        }
    }
    deletes.extend(adds);
    Transaction(deletes)
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

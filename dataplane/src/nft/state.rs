//! What the kernel holds: `nft -j list table` parsed tolerantly into [`TableState`].
//!
//! nft 1.0.6 lists a table as `{"nftables": [{"metainfo": …}, {"table": …}, {"set": …},
//! {"map": …}, {"chain": …}, {"rule": …}, …]}`. Only what weft compares is kept; every object
//! or value this module does not know falls back to [`serde_json::Value`] instead of failing.
//! Elements come back as JSON values (`"10.0.0.1"`, `80`, `{"prefix": {"addr", "len"}}`,
//! `{"range": [a, b]}`, `{"concat": [..]}`, `{"elem": {"val": ..}}`, verdicts such as
//! `{"accept": null}` or `{"jump": {"target": "x"}}`) and are rendered back into the text the
//! renderer takes (`10.0.0.0/8 . tcp . 8080-8090`, `jump x`, `"br0"`).

use super::{BaseChain, Chain, Family, Map, Set, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// One table as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableState {
    /// Family.
    pub family: Family,
    /// Name.
    pub name: String,
    /// The table comment. nft 1.0.6 leaves it out of its JSON, so [`super::NftCli`] reads it from
    /// the terse text listing.
    pub comment: Option<String>,
    /// Sets, in the kernel's order.
    pub sets: Vec<SetState>,
    /// Maps, in the kernel's order.
    pub maps: Vec<MapState>,
    /// Chains, in the kernel's order.
    pub chains: Vec<ChainState>,
}

/// A set as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetState {
    /// Name.
    pub name: String,
    /// Key type, concatenations joined with ` . `; for a set declared with `typeof`, the
    /// datatypes nft lists for it (`ifname . integer` for `typeof iifname . @th,64,128`).
    pub key_type: String,
    /// Flags.
    pub flags: Vec<String>,
    /// Elements in the renderer's text form.
    pub elements: BTreeSet<String>,
    /// The elements that expire (a timeout set's, such as a ban), element text →
    /// `(timeout, seconds left)`, as the kernel listed them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expiring: BTreeMap<String, (u64, u64)>,
}

/// A map as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MapState {
    /// Name.
    pub name: String,
    /// Key type.
    pub key_type: String,
    /// Value type (`verdict`, `ipv4_addr . inet_service`, …).
    pub value_type: String,
    /// Flags.
    pub flags: Vec<String>,
    /// Key text → value text.
    pub elements: BTreeMap<String, String>,
}

/// A chain as the kernel has it (rules are only counted: nft prints them back differently from
/// how they were written).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChainState {
    /// Name.
    pub name: String,
    /// Hook registration of a base chain.
    pub base: Option<BaseChainState>,
    /// Number of rules.
    pub rules: usize,
    /// The comment of its first rule: the chain's fingerprint when weft wrote it
    /// ([`super::chain_fingerprint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// A base chain's hook registration as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BaseChainState {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    /// The hook.
    pub hook: String,
    /// Numeric priority.
    pub priority: i32,
    /// Policy (`accept`/`drop`).
    pub policy: Option<String>,
}

impl TableState {
    /// Parses the output of `nft -j list table <family> <name>`. `Ok(None)` when the listing holds
    /// no such table.
    pub fn from_json(
        json: &str,
        family: Family,
        name: &str,
    ) -> Result<Option<Self>, serde_json::Error> {
        let listing: Listing = serde_json::from_str(json)?;
        let mut found = false;
        let mut state = TableState {
            family,
            name: name.to_string(),
            ..TableState::default()
        };
        let ours = |f: &Option<String>, t: &str| {
            t == name && f.as_deref().is_none_or(|f| f == family.as_str())
        };
        for item in listing.nftables {
            match item {
                Item::Table { table } => {
                    if ours(&table.family, &table.name) {
                        found = true;
                        state.comment = table.comment;
                    }
                }
                Item::Set { set } => {
                    if ours(&set.family, set.table.as_deref().unwrap_or(name)) {
                        let key_types = type_list(&set.key_type);
                        state.sets.push(SetState {
                            name: set.name,
                            key_type: key_types.join(" . "),
                            flags: flag_list(set.flags),
                            elements: set
                                .elem
                                .iter()
                                .map(|e| element_text(e, &key_types))
                                .collect(),
                            expiring: set
                                .elem
                                .iter()
                                .filter_map(|e| expiring_element(e, &key_types))
                                .collect(),
                        });
                    }
                }
                Item::Map { map } => {
                    if ours(&map.family, map.table.as_deref().unwrap_or(name)) {
                        let key_types = type_list(&map.key_type);
                        let value_types = type_list(&map.map);
                        let elements = map
                            .elem
                            .iter()
                            .filter_map(|e| map_element(e, &key_types, &value_types))
                            .collect();
                        state.maps.push(MapState {
                            name: map.name,
                            key_type: key_types.join(" . "),
                            value_type: value_types.join(" . "),
                            flags: flag_list(map.flags),
                            elements,
                        });
                    }
                }
                Item::Chain { chain } => {
                    if ours(&chain.family, chain.table.as_deref().unwrap_or(name)) {
                        let base = match (chain.kind, chain.hook) {
                            (Some(kind), Some(hook)) => Some(BaseChainState {
                                kind,
                                hook,
                                priority: chain
                                    .prio
                                    .as_ref()
                                    .and_then(Value::as_i64)
                                    .and_then(|p| i32::try_from(p).ok())
                                    .unwrap_or(0),
                                policy: chain.policy,
                            }),
                            _ => None,
                        };
                        state.chains.push(ChainState {
                            name: chain.name,
                            base,
                            rules: 0,
                            fingerprint: None,
                        });
                    }
                }
                Item::Rule { rule } => {
                    if ours(&rule.family, rule.table.as_deref().unwrap_or(name))
                        && let Some(c) = state.chains.iter_mut().find(|c| c.name == rule.chain)
                    {
                        if c.rules == 0 {
                            c.fingerprint = rule.comment;
                        }
                        c.rules += 1;
                    }
                }
                Item::Other(_) => {}
            }
        }
        Ok(found.then_some(state))
    }

    /// The kernel view of a [`Table`] (what the kernel would list after applying it, modulo
    /// element spelling). Priorities nft cannot resolve count as 0.
    pub fn from_table(table: &Table) -> Self {
        TableState {
            family: table.family,
            name: table.name.clone(),
            comment: table.comment.clone(),
            sets: table
                .sets
                .iter()
                .map(|s| SetState {
                    name: s.name.clone(),
                    key_type: listed_key_type(&s.key_type),
                    flags: s.flags.clone(),
                    elements: s.elements.clone(),
                    expiring: BTreeMap::new(),
                })
                .collect(),
            maps: table
                .maps
                .iter()
                .map(|m| MapState {
                    name: m.name.clone(),
                    key_type: normalize_type(&m.key_type),
                    value_type: normalize_type(&m.value_type),
                    flags: m.flags.clone(),
                    elements: m.elements.clone(),
                })
                .collect(),
            chains: table
                .chains
                .iter()
                .map(|c| ChainState {
                    name: c.name.clone(),
                    base: c.base.as_ref().map(|b| BaseChainState {
                        kind: b.kind.clone(),
                        hook: b.hook.clone(),
                        priority: b.priority_value(table.family).unwrap_or(0),
                        policy: Some(b.policy.clone().unwrap_or_else(|| "accept".into())),
                    }),
                    rules: c.rules.len(),
                    fingerprint: c.rules.first().map(|first| {
                        // What the kernel keeps: the rule's own comment, if it has one.
                        match first.split_once("comment \"") {
                            Some((_, rest)) => rest.split('"').next().unwrap_or_default().into(),
                            None => super::chain_fingerprint(c),
                        }
                    }),
                })
                .collect(),
        }
    }

    /// The set named `name`.
    pub fn set(&self, name: &str) -> Option<&SetState> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// The map named `name`.
    pub fn map(&self, name: &str) -> Option<&MapState> {
        self.maps.iter().find(|m| m.name == name)
    }

    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&ChainState> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// The elements of set `set` (empty when there is no such set).
    pub fn elements_of(&self, set: &str) -> BTreeSet<String> {
        self.set(set)
            .map(|s| s.elements.clone())
            .unwrap_or_default()
    }

    /// The elements of map `map` (empty when there is no such map).
    pub fn map_elements_of(&self, map: &str) -> BTreeMap<String, String> {
        self.map(map)
            .map(|m| m.elements.clone())
            .unwrap_or_default()
    }

    /// The number of rules in chain `chain`, `None` when there is no such chain.
    pub fn rule_count(&self, chain: &str) -> Option<usize> {
        self.chain(chain).map(|c| c.rules)
    }

    /// `desired` with the elements the kernel added to its sets of both [`super::DYNAMIC_FLAG`]
    /// and `timeout` (a ban: `add @bans4 { ip saddr … timeout 600s }` in a rule) carried over,
    /// each with the time it had left, when the kernel's set of that name has the same type and
    /// flags: what a replace of the table would otherwise forget. Such a set's elements are
    /// never weft's to choose, so nothing of `desired`'s own is changed.
    pub fn carry_expiring(&self, desired: &Table) -> Table {
        let mut out = desired.clone();
        for want in &mut out.sets {
            let timed = |f: &[String]| {
                f.iter().any(|f| f == super::DYNAMIC_FLAG) && f.iter().any(|f| f == "timeout")
            };
            if !timed(&want.flags) {
                continue;
            }
            let Some(have) = self.sets.iter().find(|s| {
                s.name == want.name
                    && s.key_type == listed_key_type(&want.key_type)
                    && same_flags(&s.flags, &want.flags)
            }) else {
                continue;
            };
            want.elements.extend(
                have.expiring
                    .iter()
                    .map(|(e, (timeout, left))| format!("{e} timeout {timeout}s expires {left}s")),
            );
        }
        out
    }

    /// The kernel's table in `desired`'s terms, for [`super::diff`]: sets, maps and chains that
    /// match `desired` in everything nft lets us read back (types, flags, hook, numeric
    /// priority, policy, rule count; a `typeof` key by the datatypes nft lists for its
    /// expressions, not by the expressions) are spelled exactly as in `desired` and carry the kernel's
    /// elements, so [`super::structure_hash`] is equal when only elements differ. Anything that
    /// differs (a missing or extra set, another type, another rule count or chain fingerprint)
    /// is spelled the kernel's way, so the hashes differ: [`super::diff`] replaces the table,
    /// [`super::diff_in_place`] changes what differs. Rules are never parsed back: a chain
    /// counts as unchanged when its first rule carries the desired chain's fingerprint
    /// ([`super::chain_fingerprint`]) and it has as many rules (an empty chain: when both are
    /// empty); otherwise it reads back with placeholder rules.
    pub fn to_table(&self, desired: &Table) -> Table {
        let mut out = Table {
            family: self.family,
            name: self.name.clone(),
            comment: self.comment.clone(),
            sets: Vec::new(),
            maps: Vec::new(),
            chains: Vec::new(),
        };
        for set in ordered(&self.sets, &desired.sets, |s| &s.name, |s| &s.name) {
            let want = desired.sets.iter().find(|d| d.name == set.name);
            let same = want.filter(|d| {
                listed_key_type(&d.key_type) == set.key_type && same_flags(&d.flags, &set.flags)
            });
            out.sets.push(Set {
                name: set.name.clone(),
                key_type: same.map_or_else(|| set.key_type.clone(), |d| d.key_type.clone()),
                flags: same.map_or_else(|| set.flags.clone(), |d| d.flags.clone()),
                elements: set.elements.clone(),
            });
        }
        for map in ordered(&self.maps, &desired.maps, |m| &m.name, |m| &m.name) {
            let want = desired.maps.iter().find(|d| d.name == map.name);
            let same = want.filter(|d| {
                normalize_type(&d.key_type) == map.key_type
                    && normalize_type(&d.value_type) == map.value_type
                    && same_flags(&d.flags, &map.flags)
            });
            out.maps.push(Map {
                name: map.name.clone(),
                key_type: same.map_or_else(|| map.key_type.clone(), |d| d.key_type.clone()),
                value_type: same.map_or_else(|| map.value_type.clone(), |d| d.value_type.clone()),
                flags: same.map_or_else(|| map.flags.clone(), |d| d.flags.clone()),
                elements: map.elements.clone(),
            });
        }
        for chain in ordered(&self.chains, &desired.chains, |c| &c.name, |c| &c.name) {
            let want = desired.chains.iter().find(|d| d.name == chain.name);
            let base = match (&chain.base, want.and_then(|d| d.base.as_ref())) {
                (Some(k), Some(d)) if same_base(k, d, self.family) => Some(d.clone()),
                (Some(k), _) => Some(BaseChain {
                    kind: k.kind.clone(),
                    hook: k.hook.clone(),
                    priority: k.priority.to_string(),
                    policy: k.policy.clone(),
                }),
                (None, _) => None,
            };
            let rules = match want {
                Some(d)
                    if d.rules.len() == chain.rules
                        && (d.rules.is_empty()
                            || chain.fingerprint.as_deref()
                                == Some(super::chain_fingerprint(d).as_str())) =>
                {
                    d.rules.clone()
                }
                _ => (1..=chain.rules)
                    .map(|i| format!("# kernel rule {i} of {} (not read back)", chain.rules))
                    .collect(),
            };
            out.chains.push(Chain {
                name: chain.name.clone(),
                base,
                rules,
            });
        }
        out
    }
}

/// The kernel's items in `desired`'s order first, then the kernel's extra ones.
fn ordered<'a, K, D>(
    kernel: &'a [K],
    desired: &[D],
    kname: impl Fn(&K) -> &String,
    dname: impl Fn(&D) -> &String,
) -> Vec<&'a K> {
    let mut out: Vec<&K> = desired
        .iter()
        .filter_map(|d| kernel.iter().find(|k| kname(k) == dname(d)))
        .collect();
    out.extend(
        kernel
            .iter()
            .filter(|k| !desired.iter().any(|d| dname(d) == kname(k))),
    );
    out
}

/// Equal flags, `dynamic` ([`super::DYNAMIC_FLAG`]) left out on both sides: nft 1.0.6's JSON
/// listing does not name it (its text listing does), so it cannot be read back.
fn same_flags(a: &[String], b: &[String]) -> bool {
    let readable = |flags: &[String]| -> BTreeSet<String> {
        flags
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| s != super::DYNAMIC_FLAG)
            .collect()
    };
    readable(a) == readable(b)
}

fn same_base(kernel: &BaseChainState, desired: &BaseChain, family: Family) -> bool {
    kernel.kind == desired.kind
        && kernel.hook == desired.hook
        && desired.priority_value(family) == Some(kernel.priority)
        && kernel.policy.as_deref().unwrap_or("accept")
            == desired.policy.as_deref().unwrap_or("accept")
}

fn normalize_type(t: &str) -> String {
    t.split('.').map(str::trim).collect::<Vec<_>>().join(" . ")
}

/// The key type nft 1.0.6 lists for a set's key: the type itself, or for a `typeof …` key the
/// datatype of each expression ([`typeof_datatype`]).
fn listed_key_type(key: &str) -> String {
    match super::render::typeof_key(key) {
        Some(expressions) => expressions
            .split('.')
            .map(|e| typeof_datatype(&e.split_whitespace().collect::<Vec<_>>().join(" ")))
            .collect::<Vec<_>>()
            .join(" . "),
        None => normalize_type(key),
    }
}

/// The datatype nft 1.0.6 lists for a `typeof` key expression (checked against its JSON
/// listing): interface names are `ifname`, a raw payload (`@th,64,128`) and `vlan id` are an
/// `integer`, addresses are `ipv4_addr`, `ipv6_addr` or `ether_addr`. Any other expression stays as
/// written, which never equals a listed type: the set then reads as changed and the table is
/// replaced on every pass, correct but no longer an element diff, so add the expression here
/// before using it in a `typeof` key.
fn typeof_datatype(expression: &str) -> String {
    let datatype = match expression {
        "iifname" | "oifname" | "meta iifname" | "meta oifname" | "meta ibrname"
        | "meta obrname" => "ifname",
        "ip saddr" | "ip daddr" => "ipv4_addr",
        "ip6 saddr" | "ip6 daddr" => "ipv6_addr",
        "ether saddr" | "ether daddr" => "ether_addr",
        "vlan id" => "integer",
        raw if raw.starts_with('@') => "integer",
        other => other,
    };
    datatype.to_string()
}

// ---- the JSON listing ------------------------------------------------------------------------

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    nftables: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Item {
    Table { table: JsonTable },
    Set { set: JsonSet },
    Map { map: JsonSet },
    Chain { chain: JsonChain },
    Rule { rule: JsonRule },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct JsonTable {
    #[serde(default)]
    family: Option<String>,
    name: String,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize)]
struct JsonSet {
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    table: Option<String>,
    name: String,
    #[serde(rename = "type", default)]
    key_type: Value,
    /// The value type of a map.
    #[serde(default)]
    map: Value,
    #[serde(default)]
    flags: Value,
    #[serde(default)]
    elem: Vec<Value>,
}

#[derive(Deserialize)]
struct JsonChain {
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    table: Option<String>,
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    hook: Option<String>,
    #[serde(default)]
    prio: Option<Value>,
    #[serde(default)]
    policy: Option<String>,
}

#[derive(Deserialize)]
struct JsonRule {
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    table: Option<String>,
    chain: String,
    #[serde(default)]
    comment: Option<String>,
}

/// `"ipv4_addr"`, `["ipv4_addr", "inet_service"]` or `"ipv4_addr . inet_service"` → the parts.
fn type_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split('.').map(|p| p.trim().to_string()).collect(),
        Value::Array(items) => items.iter().flat_map(type_list).collect(),
        Value::Null => Vec::new(),
        other => vec![other.to_string()],
    }
}

fn flag_list(v: Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Types whose values nft prints as quoted strings.
fn is_string_type(t: Option<&String>) -> bool {
    matches!(t.map(String::as_str), Some("ifname" | "string"))
}

/// An element with a timeout, as `(text, (timeout, seconds left))`; `None` for one without, or
/// one that has (all but) expired.
fn expiring_element(v: &Value, types: &[String]) -> Option<(String, (u64, u64))> {
    let inner = v.get("elem")?;
    let timeout = inner.get("timeout")?.as_u64()?;
    let left = inner.get("expires")?.as_u64().filter(|s| *s > 0)?;
    Some((element_text(v, types), (timeout, left)))
}

/// One element (or key) in the renderer's text form; `types` are the key's concatenated types.
fn element_text(v: &Value, types: &[String]) -> String {
    match v {
        Value::Object(o) => {
            if let Some(inner) = o.get("elem") {
                // {"elem": {"val": …, "timeout": …, "comment": …}}
                return element_text(inner.get("val").unwrap_or(inner), types);
            }
            if let Some(Value::Array(parts)) = o.get("concat") {
                return parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| atom_text(p, types.get(i)))
                    .collect::<Vec<_>>()
                    .join(" . ");
            }
            atom_text(v, types.first())
        }
        _ => atom_text(v, types.first()),
    }
}

fn atom_text(v: &Value, ty: Option<&String>) -> String {
    match v {
        Value::String(s) if is_string_type(ty) => format!("\"{s}\""),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Array(items) => items
            .iter()
            .map(|i| atom_text(i, ty))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").map(|a| atom_text(a, ty)).unwrap_or_default();
                let len = p.get("len").map(|l| atom_text(l, None)).unwrap_or_default();
                return format!("{addr}/{len}");
            }
            if let Some(Value::Array(r)) = o.get("range")
                && let [a, b] = r.as_slice()
            {
                return format!("{}-{}", atom_text(a, ty), atom_text(b, ty));
            }
            if let Some(inner) = o.get("elem") {
                return atom_text(inner.get("val").unwrap_or(inner), ty);
            }
            if let Some(Value::Array(parts)) = o.get("concat") {
                return parts
                    .iter()
                    .map(|p| atom_text(p, ty))
                    .collect::<Vec<_>>()
                    .join(" . ");
            }
            if let Some(Value::Array(items)) = o.get("set") {
                let items: Vec<String> = items.iter().map(|i| atom_text(i, ty)).collect();
                return format!("{{ {} }}", items.join(", "));
            }
            // A verdict: {"accept": null}, {"jump": {"target": "x"}}, {"goto": {"target": "x"}}.
            if o.len() == 1
                && let Some((verb, arg)) = o.iter().next()
            {
                return match arg {
                    Value::Null => verb.clone(),
                    Value::Object(a) => match a.get("target") {
                        Some(Value::String(t)) => format!("{verb} {t}"),
                        _ => v.to_string(),
                    },
                    _ => v.to_string(),
                };
            }
            v.to_string()
        }
    }
}

/// `[key, value]` (or an `elem` wrapper around the key) → (key text, value text).
fn map_element(
    v: &Value,
    key_types: &[String],
    value_types: &[String],
) -> Option<(String, String)> {
    match v {
        Value::Array(kv) => match kv.as_slice() {
            [k, val] => Some((element_text(k, key_types), element_text(val, value_types))),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::render::tests::{nat_table, typeof_table};
    use super::super::{diff, structure_hash};
    use super::*;

    /// Captured from nft 1.0.6 (`nft -j list table inet weft`).
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "weft", "handle": 2}}, {"set": {"family": "inet", "name": "bridges", "table": "weft", "type": "ifname", "handle": 5, "elem": ["br0", "weft-x"]}}, {"set": {"family": "inet", "name": "intra", "table": "weft", "type": ["ifname", "ifname"], "handle": 6, "elem": [{"concat": ["br0", "br0"]}]}}, {"set": {"family": "inet", "name": "nets4", "table": "weft", "type": "ipv4_addr", "handle": 7, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"range": ["172.16.0.1", "172.16.0.9"]}, "192.168.1.5"]}}, {"set": {"family": "inet", "name": "ports", "table": "weft", "type": "inet_service", "handle": 9, "flags": ["interval"], "elem": [80, {"range": [8000, 8010]}]}}, {"map": {"family": "inet", "name": "fwd4", "table": "weft", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 10, "map": "ipv4_addr . inet_service", "flags": ["interval"], "elem": [[{"concat": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "tcp", {"range": [8080, 8090]}]}, {"concat": ["10.1.0.2", 80]}], [{"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}}, "udp", 53]}, {"concat": ["10.1.0.3", 5353]}], [{"concat": ["1.2.3.4", "tcp", 22]}, {"concat": ["10.1.0.4", 2222]}]]}}, {"map": {"family": "inet", "name": "verdicts", "table": "weft", "type": ["ipv4_addr", "ipv4_addr"], "handle": 12, "map": "verdict", "elem": [[{"concat": ["10.0.0.1", "10.0.0.2"]}, {"accept": null}], [{"concat": ["10.0.0.1", "10.0.0.3"]}, {"drop": null}], [{"concat": ["10.0.0.1", "10.0.0.4"]}, {"jump": {"target": "forward_x"}}], [{"concat": ["10.0.0.1", "10.0.0.5"]}, {"goto": {"target": "forward_x"}}]]}}, {"chain": {"family": "inet", "table": "weft", "name": "forward_x", "handle": 1}}, {"chain": {"family": "inet", "table": "weft", "name": "prerouting", "handle": 2, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}, {"rule": {"family": "inet", "table": "weft", "chain": "forward_x", "handle": 14, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "weft", "chain": "prerouting", "handle": 16, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}]}}, {"rule": {"family": "inet", "table": "weft", "chain": "prerouting", "handle": 17, "expr": []}}, {"flowtable": {"family": "inet", "name": "ft", "table": "weft"}}]}"#;

    /// Captured from nft 1.0.6: `render::tests::typeof_table()` applied, then
    /// `nft -j list table bridge weft`. A `typeof` set lists only its datatypes; an integer key
    /// part comes back as a JSON number up to 64 bits and as a hex string past that; the chain's
    /// fingerprint comes back as its first rule's `comment`.
    const TYPEOF_LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "bridge", "name": "weft", "handle": 1}}, {"set": {"family": "bridge", "name": "ips6", "table": "weft", "type": ["ifname", "ipv6_addr"], "handle": 2, "elem": [{"concat": ["wfa", "fd77::2"]}]}}, {"set": {"family": "bridge", "name": "targets6", "table": "weft", "type": ["ifname", "integer"], "handle": 3, "elem": [{"concat": ["wfb", 1]}, {"concat": ["wfa", "0xfd770000000000000000000000000002"]}, {"concat": ["wfa", "0xfe800000000000000858aafffe4d0002"]}]}}, {"set": {"family": "bridge", "name": "lladdrs", "table": "weft", "type": ["ifname", "integer"], "handle": 4, "elem": [{"concat": ["wfa", 11373246218242]}]}}, {"chain": {"family": "bridge", "table": "weft", "name": "prerouting", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}}, {"rule": {"family": "bridge", "table": "weft", "chain": "prerouting", "handle": 5, "comment": "weft chain aa438904154f0801", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}}, "right": "nd-neighbor-advert"}}, {"match": {"op": "!=", "left": {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"base": "th", "offset": 64, "len": 128}}]}, "right": "@targets6"}}, {"drop": null}]}}]}"#;

    fn strings(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_nft_1_0_6_listing_into_renderer_text() {
        let s = TableState::from_json(LISTING, Family::Inet, "weft")
            .unwrap()
            .unwrap();
        assert_eq!(
            s.elements_of("bridges"),
            strings(&["\"br0\"", "\"weft-x\""])
        );
        assert_eq!(s.elements_of("intra"), strings(&["\"br0\" . \"br0\""]));
        assert_eq!(s.set("intra").unwrap().key_type, "ifname . ifname");
        assert_eq!(
            s.elements_of("nets4"),
            strings(&["10.0.0.0/8", "172.16.0.1-172.16.0.9", "192.168.1.5"])
        );
        assert_eq!(s.set("nets4").unwrap().flags, vec!["interval".to_string()]);
        assert_eq!(s.elements_of("ports"), strings(&["80", "8000-8010"]));
        let fwd = s.map("fwd4").unwrap();
        assert_eq!(fwd.key_type, "ipv4_addr . inet_proto . inet_service");
        assert_eq!(fwd.value_type, "ipv4_addr . inet_service");
        assert_eq!(
            fwd.elements
                .get("10.0.0.0/8 . tcp . 8080-8090")
                .map(String::as_str),
            Some("10.1.0.2 . 80")
        );
        assert_eq!(
            fwd.elements.get("0.0.0.0/0 . udp . 53").map(String::as_str),
            Some("10.1.0.3 . 5353")
        );
        let v = s.map_elements_of("verdicts");
        assert_eq!(v["10.0.0.1 . 10.0.0.2"], "accept");
        assert_eq!(v["10.0.0.1 . 10.0.0.3"], "drop");
        assert_eq!(v["10.0.0.1 . 10.0.0.4"], "jump forward_x");
        assert_eq!(v["10.0.0.1 . 10.0.0.5"], "goto forward_x");
        assert_eq!(s.rule_count("forward_x"), Some(1));
        assert_eq!(s.rule_count("prerouting"), Some(2));
        assert_eq!(s.rule_count("nope"), None);
        let pre = s.chain("prerouting").unwrap().base.clone().unwrap();
        assert_eq!((pre.kind.as_str(), pre.priority), ("nat", -100));
        assert!(s.chain("forward_x").unwrap().base.is_none());
    }

    #[test]
    fn a_listing_without_the_table_is_none() {
        assert_eq!(
            TableState::from_json(LISTING, Family::Ip, "weft").unwrap(),
            None
        );
        assert_eq!(
            TableState::from_json(r#"{"nftables": []}"#, Family::Inet, "weft").unwrap(),
            None
        );
        assert!(TableState::from_json("not json", Family::Inet, "weft").is_err());
    }

    #[test]
    fn elements_with_options_and_unknown_shapes_do_not_fail() {
        let json = r#"{"nftables": [{"table": {"family": "inet", "name": "t", "comment": "c"}},
            {"set": {"family": "inet", "name": "s", "table": "t", "type": "ipv4_addr", "flags": "timeout",
              "elem": [{"elem": {"val": "10.0.0.1", "timeout": 30, "expires": 10}}, {"weird": [1, 2]}]}},
            {"map": {"family": "inet", "name": "m", "table": "t", "type": "inet_service", "map": "verdict",
              "elem": [[{"elem": {"val": 80, "counter": {"packets": 0, "bytes": 0}}}, {"return": null}], "garbage"]}},
            {"somethingnew": {"x": 1}}]}"#;
        let s = TableState::from_json(json, Family::Inet, "t")
            .unwrap()
            .unwrap();
        assert_eq!(s.comment.as_deref(), Some("c"));
        let set = s.set("s").unwrap();
        assert_eq!(set.flags, vec!["timeout".to_string()]);
        assert!(set.elements.contains("10.0.0.1"));
        assert_eq!(set.elements.len(), 2);
        assert_eq!(s.map_elements_of("m")["80"], "return");
    }

    #[test]
    fn a_replace_carries_the_kernel_s_timed_elements_of_dynamic_timeout_sets_only() {
        let json = r#"{"nftables": [{"table": {"family": "inet", "name": "t"}},
            {"set": {"family": "inet", "name": "bans4", "table": "t", "type": ["ipv4_addr", "inet_proto", "inet_service"], "flags": ["timeout"],
              "elem": [{"elem": {"val": {"concat": ["192.0.2.7", "tcp", 22]}, "timeout": 600, "expires": 299}},
                       {"elem": {"val": {"concat": ["192.0.2.8", "tcp", 22]}, "timeout": 600, "expires": 0}}]}},
            {"set": {"family": "inet", "name": "retyped", "table": "t", "type": "ipv4_addr", "flags": ["timeout"],
              "elem": [{"elem": {"val": "192.0.2.9", "timeout": 60, "expires": 30}}]}},
            {"set": {"family": "inet", "name": "mine", "table": "t", "type": "ipv4_addr", "flags": ["timeout"],
              "elem": [{"elem": {"val": "192.0.2.10", "timeout": 60, "expires": 30}}]}}]}"#;
        let kernel = TableState::from_json(json, Family::Inet, "t")
            .unwrap()
            .unwrap();
        assert_eq!(
            kernel.set("bans4").unwrap().expiring,
            BTreeMap::from([("192.0.2.7 . tcp . 22".to_string(), (600, 299))]),
            "an element about to expire (0 s left) is not kept"
        );
        let timed = |name: &str, key: &str, dynamic: bool| Set {
            name: name.into(),
            key_type: key.into(),
            flags: if dynamic {
                vec![super::super::DYNAMIC_FLAG.into(), "timeout".into()]
            } else {
                vec!["timeout".into()]
            },
            elements: BTreeSet::new(),
        };
        let desired = Table {
            family: Family::Inet,
            name: "t".into(),
            sets: vec![
                timed("bans4", "ipv4_addr . inet_proto . inet_service", true),
                // Another type now: the old elements would not fit.
                timed("retyped", "ipv6_addr", true),
                // Not dynamic: its elements are weft's own, never carried.
                timed("mine", "ipv4_addr", false),
                timed("new", "ipv4_addr", true),
            ],
            ..Table::default()
        };
        let carried = kernel.carry_expiring(&desired);
        assert_eq!(
            carried.sets[0].elements,
            BTreeSet::from(["192.0.2.7 . tcp . 22 timeout 600s expires 299s".to_string()])
        );
        for set in &carried.sets[1..] {
            assert!(set.elements.is_empty(), "{}: {:?}", set.name, set.elements);
        }
        assert_eq!(structure_hash(&carried), structure_hash(&desired));
    }

    #[test]
    fn to_table_of_an_equal_kernel_diffs_to_nothing() {
        let desired = nat_table();
        let kernel = TableState::from_table(&desired);
        let current = kernel.to_table(&desired);
        assert_eq!(structure_hash(&current), structure_hash(&desired));
        assert!(diff(&current, &desired).0.is_empty());
    }

    #[test]
    fn to_table_carries_the_kernel_elements_and_detects_structure_drift() {
        let desired = nat_table();
        let mut kernel = TableState::from_table(&desired);
        kernel.sets[0].elements.insert("\"wn-old\"".into());
        let tx = diff(&kernel.to_table(&desired), &desired);
        assert!(matches!(
            tx.0.as_slice(),
            [super::super::Change::DeleteElements { .. }]
        ));

        let mut fewer_rules = TableState::from_table(&desired);
        fewer_rules.chains[3].rules = 1;
        let mut other_prio = TableState::from_table(&desired);
        other_prio.chains[1].base.as_mut().unwrap().priority = -90;
        let mut missing_set = TableState::from_table(&desired);
        missing_set.sets.remove(1);
        let mut extra_map = TableState::from_table(&desired);
        extra_map.maps.push(MapState {
            name: "stale".into(),
            key_type: "ipv4_addr".into(),
            value_type: "verdict".into(),
            ..MapState::default()
        });
        for drift in [fewer_rules, other_prio, missing_set, extra_map] {
            let tx = diff(&drift.to_table(&desired), &desired);
            assert_eq!(
                tx.0,
                vec![super::super::Change::ReplaceTable(desired.clone())]
            );
        }
    }

    #[test]
    fn a_typeof_set_reads_back_as_its_datatypes_and_diffs_to_nothing() {
        let desired = typeof_table();
        let s = TableState::from_json(TYPEOF_LISTING, Family::Bridge, "weft")
            .unwrap()
            .unwrap();
        assert_eq!(s.set("targets6").unwrap().key_type, "ifname . integer");
        assert_eq!(s.set("lladdrs").unwrap().key_type, "ifname . integer");
        assert_eq!(
            s.elements_of("targets6"),
            strings(&[
                "\"wfa\" . 0xfd770000000000000000000000000002",
                "\"wfa\" . 0xfe800000000000000858aafffe4d0002",
                "\"wfb\" . 1",
            ])
        );
        assert_eq!(
            s.elements_of("lladdrs"),
            strings(&["\"wfa\" . 11373246218242"])
        );
        let current = s.to_table(&desired);
        assert_eq!(current.sets[1].key_type, "typeof iifname . @th,64,128");
        assert_eq!(structure_hash(&current), structure_hash(&desired));
        assert!(diff(&current, &desired).0.is_empty(), "{current:?}");
        // The fake's view of the same table agrees with the kernel's.
        assert_eq!(
            TableState::from_table(&desired)
                .set("targets6")
                .unwrap()
                .key_type,
            "ifname . integer"
        );
    }

    #[test]
    fn a_typeof_set_changes_by_element_in_the_kernel_spelling() {
        let s = TableState::from_json(TYPEOF_LISTING, Family::Bridge, "weft")
            .unwrap()
            .unwrap();
        let mut desired = typeof_table();
        desired.sets[1]
            .elements
            .remove("\"wfb\" . 0x00000000000000000000000000000001");
        desired.sets[2]
            .elements
            .insert("\"wfb\" . 0x0a580a4d0003".into());
        let tx = diff(&s.to_table(&desired), &desired);
        assert_eq!(
            tx.0,
            vec![
                super::super::Change::DeleteElements {
                    family: Family::Bridge,
                    table: "weft".into(),
                    set: "targets6".into(),
                    key: super::super::SetKey {
                        key_type: "typeof iifname . @th,64,128".into(),
                        interval: false,
                    },
                    elements: vec!["\"wfb\" . 1".into()],
                },
                super::super::Change::AddElements {
                    family: Family::Bridge,
                    table: "weft".into(),
                    set: "lladdrs".into(),
                    key: super::super::SetKey {
                        key_type: "typeof iifname . @th,208,48".into(),
                        interval: false,
                    },
                    elements: vec!["\"wfb\" . 0x0a580a4d0003".into()],
                },
            ]
        );
    }

    #[test]
    fn a_typeof_key_of_other_datatypes_replaces_the_table() {
        let s = TableState::from_json(TYPEOF_LISTING, Family::Bridge, "weft")
            .unwrap()
            .unwrap();
        let mut typed = typeof_table();
        typed.sets[1].key_type = "typeof iifname . ip6 saddr".into();
        let mut unknown = typeof_table();
        unknown.sets[1].key_type = "typeof iifname . icmpv6 id".into();
        for desired in [typed, unknown] {
            assert_eq!(
                diff(&s.to_table(&desired), &desired).0,
                vec![super::super::Change::ReplaceTable(desired.clone())]
            );
        }
    }

    #[test]
    fn typeof_expressions_map_to_the_datatypes_nft_lists() {
        for (key, listed) in [
            ("typeof iifname . @th,64,128", "ifname . integer"),
            ("typeof meta iifname . oifname", "ifname . ifname"),
            (
                "typeof  ip saddr . ip6 daddr . ether saddr",
                "ipv4_addr . ipv6_addr . ether_addr",
            ),
            (
                "typeof @nh,0,8 . @ll,0,48 . meta ibrname",
                "integer . integer . ifname",
            ),
            ("ifname . ipv6_addr", "ifname . ipv6_addr"),
        ] {
            assert_eq!(listed_key_type(key), listed, "{key}");
        }
    }
}

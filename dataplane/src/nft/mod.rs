//! weft's nftables tables as data: a model of one table, its rendering to nft text, the
//! element-level diff between two tables, and the I/O edge that applies transactions.
//!
//! There is no nftables crate here (see `shared/deps.md`, A3):
//! - [`render_table`] and [`Transaction::render`] produce nft *text*, a pure function;
//! - [`NftCli`] applies a whole [`Transaction`] with one `nft -f -`, which the kernel commits
//!   atomically (a failing batch commits nothing) — or, when the transaction only changes
//!   elements of plain sets (a workload's registration), as one nfnetlink batch of its own
//!   (`netlink`), equally atomic and without nft's per-process ruleset cache refresh;
//! - [`NftCli::list_table`] reads the kernel's table back with `nft -j list table` into our own
//!   tolerant serde structs ([`TableState`]), rendering set and map elements in the same text form
//!   the renderer takes, so desired and actual element sets compare directly;
//! - [`diff`] turns "current" and "desired" into element adds and deletes when only elements
//!   changed ([`structure_hash`] is equal), one atomic table replace otherwise;
//! - [`diff_in_place`] changes the table object by object instead, in one batch just as atomic:
//!   only the chains whose rules changed are flushed and refilled, only the sets and maps whose
//!   definition changed are deleted and added again, and every other set keeps its elements,
//!   the kernel's own in a dynamic set included (meters, `ct count` sets, bans).
//!
//! The kernel keeps a fingerprint of each chain so that a listing, which does not parse rules
//! back, still tells which chains changed: the renderer appends `comment "weft chain <hash>"`
//! ([`chain_fingerprint`]) to the first rule of every chain. A chain's own comment would not do:
//! the kernel ignores a new comment for an existing chain (or table), while a flushed and
//! refilled chain gets its first rule, and so its fingerprint, anew. weft's rules therefore
//! carry no comment of their own: a chain whose first rule has one lists as changed on every
//! pass (flushed and refilled, correct but not minimal).
//!
//! Set and map names must not be nft keywords (a map named `policy` is a syntax error): prefer
//! plural nouns such as `verdicts` or `bridges`.
//!
//! Element text is written the way nft lists it: prefixes as `10.0.0.0/8`, host addresses bare
//! (`10.0.0.1`, not `10.0.0.1/32`), ranges as `8000-8010`, concatenations as `a . b . c`,
//! interface names quoted (`"br0"`), protocols by name (`tcp`), ports as numbers, integers
//! in decimal or `0x` hex. [`diff`] compares elements through [`canonical_element`], so a
//! desired `10.0.0.1/32`, `fd00:0::/64` or `0x0a580a4d0002` does not churn against the
//! kernel's `10.0.0.1`, `fd00::/64` or `11373246218242`.

mod cli;
mod diff;
#[cfg(any(test, feature = "testing"))]
mod fake;
mod netlink;
mod render;
mod state;

pub use cli::NftCli;
pub use diff::{canonical_element, diff, diff_in_place};
#[cfg(any(test, feature = "testing"))]
pub use fake::FakeFirewall;
pub use render::{chain_fingerprint, ifname_literal, render_table, structure_hash};
pub use state::{BaseChainState, ChainState, MapState, SetState, TableState};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

/// An nftables address family.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `inet`: IPv4 and IPv6.
    #[default]
    Inet,
    /// `ip`: IPv4.
    Ip,
    /// `ip6`: IPv6.
    Ip6,
    /// `bridge`: frames crossing a Linux bridge.
    Bridge,
    /// `netdev`: ingress/egress of one device.
    Netdev,
}

impl Family {
    /// The keyword nft uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
        }
    }

    /// Parses nft's keyword.
    pub fn parse(s: &str) -> Option<Family> {
        Some(match s {
            "inet" => Family::Inet,
            "ip" => Family::Ip,
            "ip6" => Family::Ip6,
            "bridge" => Family::Bridge,
            "netdev" => Family::Netdev,
            _ => return None,
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One nftables table, everything in it included.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Table {
    /// Address family.
    pub family: Family,
    /// Table name.
    pub name: String,
    /// Table comment (`comment "…"`); a `"` in it is rendered as `'`.
    pub comment: Option<String>,
    /// Named sets, rendered in this order.
    pub sets: Vec<Set>,
    /// Named maps, rendered after the sets in this order.
    pub maps: Vec<Map>,
    /// Chains, rendered after the maps in this order.
    pub chains: Vec<Chain>,
}

/// The set flag of a set whose elements the kernel adds (an `update @set { key counter }`
/// statement in a rule): weft declares it empty and never compares, adds or deletes its
/// elements, which carry the counters of what the rules matched.
pub const DYNAMIC_FLAG: &str = "dynamic";

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Set {
    /// Name (not an nft keyword).
    pub name: String,
    /// Key type, e.g. `ipv4_addr`, `ifname` or `ipv4_addr . inet_proto . inet_service`; or, when
    /// it begins with `typeof `, the expressions the key is taken from, e.g.
    /// `typeof iifname . @th,64,128`, rendered as `typeof …` instead of `type …`.
    ///
    /// nft declares a key one way or the other, never both, so this one field holds either and
    /// every set written with a type stays as it is. `typeof` is what a raw payload key needs: an
    /// `@th,64,128` is a 128-bit integer, which no named type concatenates with. Elements of
    /// such a part are integers (`"wf1" . 0xfe80000000000000000000fffe000001`). nft 1.0.6
    /// lists only the datatypes back (`ifname . integer`), so reading a `typeof` set back knows
    /// the datatypes of a few expressions (see [`TableState::to_table`]).
    pub key_type: String,
    /// Flags, e.g. `interval`.
    pub flags: Vec<String>,
    /// Elements in nft's text form, e.g. `10.0.0.0/8 . tcp . 8080`.
    pub elements: BTreeSet<String>,
}

/// A named map (a verdict map when `value_type` is `verdict`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Map {
    /// Name (not an nft keyword).
    pub name: String,
    /// Key type.
    pub key_type: String,
    /// Value type, e.g. `verdict` or `ipv4_addr . inet_service`.
    pub value_type: String,
    /// Flags, e.g. `interval`.
    pub flags: Vec<String>,
    /// Key text → value text.
    pub elements: BTreeMap<String, String>,
}

/// A chain.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// Hook registration; `None` for a regular chain (a jump target).
    pub base: Option<BaseChain>,
    /// Rules in nft text, e.g. `ip saddr @nat4 oifname != @bridges masquerade`.
    pub rules: Vec<String>,
}

/// The hook registration of a base chain.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BaseChain {
    /// `filter`, `nat` or `route`.
    pub kind: String,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`, `ingress`, …
    pub hook: String,
    /// A number (`-100`) or a standard name, optionally with an offset (`dstnat`, `filter + 5`).
    pub priority: String,
    /// `accept` or `drop`; `None` leaves nft's default (`accept`).
    pub policy: Option<String>,
}

impl BaseChain {
    /// The numeric priority, resolving nft's standard names for `family` (`None` when the text is
    /// neither a number nor a known name with an optional `+ n`/`- n` offset).
    pub fn priority_value(&self, family: Family) -> Option<i32> {
        priority_value(&self.priority, family)
    }
}

/// Resolves an nft priority (`-100`, `dstnat`, `filter + 5`) to its number for `family`.
pub fn priority_value(text: &str, family: Family) -> Option<i32> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i32>() {
        return Some(n);
    }
    let (name, offset) = match text.find(['+', '-']) {
        Some(i) => {
            let n: i32 = text[i + 1..].trim().parse().ok()?;
            let n = if text[i..].starts_with('-') { -n } else { n };
            (text[..i].trim(), n)
        }
        None => (text, 0),
    };
    let base: i32 = if family == Family::Bridge {
        match name {
            "dstnat" => -300,
            "filter" => -200,
            "out" => 100,
            "srcnat" => 300,
            _ => return None,
        }
    } else {
        match name {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            _ => return None,
        }
    };
    base.checked_add(offset)
}

/// What an element change needs to know of its set beyond its name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetKey {
    /// The key type, as in [`Set::key_type`].
    pub key_type: String,
    /// Does the set have the `interval` flag?
    pub interval: bool,
}

impl SetKey {
    /// The key of `set`.
    pub fn of(set: &Set) -> SetKey {
        SetKey {
            key_type: set.key_type.clone(),
            interval: set.flags.iter().any(|f| f == "interval"),
        }
    }

    /// The key of `map`, as a set's.
    pub fn of_map(map: &Map) -> SetKey {
        SetKey {
            key_type: map.key_type.clone(),
            interval: map.flags.iter().any(|f| f == "interval"),
        }
    }
}

/// One step of a [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Replace the whole table atomically, whether or not it exists:
    /// `add table F N`, `delete table F N`, then the full table.
    ReplaceTable(Table),
    /// Delete the table; fine when it does not exist (`add table` first).
    DeleteTable {
        /// Family.
        family: Family,
        /// Table name.
        name: String,
    },
    /// Remove every rule of a chain (`flush chain`): the first step of changing its rules, and
    /// of deleting it or a set one of its rules uses (nft refuses to delete either while a rule
    /// refers to it).
    FlushChain {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
    },
    /// Delete a chain; it must hold no rules and no rule or verdict map element may jump to it.
    DeleteChain {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
    },
    /// Add a chain with its hook registration, without its rules ([`Change::AddRules`] adds
    /// them, once every chain they may jump to exists).
    AddChain {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// The chain; its rules are not rendered here.
        chain: Chain,
    },
    /// Append the rules of a chain to it, in order (the chain exists and was flushed or is new);
    /// the first one carries the chain's fingerprint ([`chain_fingerprint`]).
    AddRules {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// The chain: its name, its rules, and what its fingerprint is taken from.
        chain: Chain,
    },
    /// Delete a set; no rule may use it.
    DeleteSet {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Set name.
        set: String,
    },
    /// Delete a map; no rule may use it.
    DeleteMap {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Map name.
        map: String,
    },
    /// Add a set with its elements.
    AddSet {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// The set.
        set: Set,
    },
    /// Add a map with its elements.
    AddMap {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// The map.
        map: Map,
    },
    /// Add elements to a set (adding an existing element is a no-op in nft).
    AddElements {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Set name.
        set: String,
        /// The set's key type ([`Set::key_type`]) and whether it has the `interval` flag: what
        /// the netlink path needs to encode the elements.
        key: SetKey,
        /// Element text.
        elements: Vec<String>,
    },
    /// Delete elements from a set (nft fails the batch if one is missing).
    DeleteElements {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Set name.
        set: String,
        /// As for [`Change::AddElements`].
        key: SetKey,
        /// Element text.
        elements: Vec<String>,
    },
    /// Add key → value elements to a map (nft fails if a key exists with another value).
    AddMapElements {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Map name.
        map: String,
        /// The map's key type and `interval` flag, as for [`Change::AddElements`].
        key: SetKey,
        /// The map's value type ([`Map::value_type`]).
        value_type: String,
        /// (key, value) text.
        elements: Vec<(String, String)>,
    },
    /// Delete map elements by key.
    DeleteMapElements {
        /// Family.
        family: Family,
        /// Table name.
        table: String,
        /// Map name.
        map: String,
        /// The map's key type and `interval` flag.
        key: SetKey,
        /// Key text.
        keys: Vec<String>,
    },
}

impl Change {
    /// True for a change of set or map elements only (no set, map, chain or rule changes).
    pub fn is_element_change(&self) -> bool {
        matches!(
            self,
            Change::AddElements { .. }
                | Change::DeleteElements { .. }
                | Change::AddMapElements { .. }
                | Change::DeleteMapElements { .. }
        )
    }

    /// A one-line description for logs and apply reports.
    pub fn summary(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match self {
            Change::ReplaceTable(t) => format!("replaced nftables table {} {}", t.family, t.name),
            Change::FlushChain {
                family,
                table,
                chain,
            } => format!("flushed chain {family} {table} {chain}"),
            Change::DeleteChain {
                family,
                table,
                chain,
            } => format!("deleted chain {family} {table} {chain}"),
            Change::AddChain {
                family,
                table,
                chain,
            } => format!("added chain {family} {table} {}", chain.name),
            Change::AddRules {
                family,
                table,
                chain,
            } => format!(
                "added {} rule{} to chain {family} {table} {}",
                chain.rules.len(),
                plural(chain.rules.len()),
                chain.name
            ),
            Change::DeleteSet { family, table, set } => {
                format!("deleted set {family} {table} {set}")
            }
            Change::DeleteMap { family, table, map } => {
                format!("deleted map {family} {table} {map}")
            }
            Change::AddSet { family, table, set } => format!(
                "added set {family} {table} {} with {} element{}",
                set.name,
                set.elements.len(),
                plural(set.elements.len())
            ),
            Change::AddMap { family, table, map } => format!(
                "added map {family} {table} {} with {} element{}",
                map.name,
                map.elements.len(),
                plural(map.elements.len())
            ),
            Change::DeleteTable { family, name } => {
                format!("deleted nftables table {family} {name}")
            }
            Change::AddElements {
                family,
                table,
                set,
                elements,
                ..
            } => format!(
                "added {} element{} to set {family} {table} {set}",
                elements.len(),
                plural(elements.len())
            ),
            Change::DeleteElements {
                family,
                table,
                set,
                elements,
                ..
            } => format!(
                "deleted {} element{} from set {family} {table} {set}",
                elements.len(),
                plural(elements.len())
            ),
            Change::AddMapElements {
                family,
                table,
                map,
                elements,
                ..
            } => format!(
                "added {} element{} to map {family} {table} {map}",
                elements.len(),
                plural(elements.len())
            ),
            Change::DeleteMapElements {
                family,
                table,
                map,
                keys,
                ..
            } => format!(
                "deleted {} element{} from map {family} {table} {map}",
                keys.len(),
                plural(keys.len())
            ),
        }
    }
}

/// An ordered list of changes, applied as ONE atomic nft batch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Transaction(pub Vec<Change>);

impl Transaction {
    /// True when there is nothing to apply (no process is spawned for it).
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|c| match c {
            Change::ReplaceTable(_)
            | Change::DeleteTable { .. }
            | Change::FlushChain { .. }
            | Change::DeleteChain { .. }
            | Change::AddChain { .. }
            | Change::DeleteSet { .. }
            | Change::DeleteMap { .. }
            | Change::AddSet { .. }
            | Change::AddMap { .. } => false,
            Change::AddRules { chain, .. } => chain.rules.is_empty(),
            Change::AddElements { elements, .. } | Change::DeleteElements { elements, .. } => {
                elements.is_empty()
            }
            Change::AddMapElements { elements, .. } => elements.is_empty(),
            Change::DeleteMapElements { keys, .. } => keys.is_empty(),
        })
    }

    /// The nft script of the whole batch (empty for an empty transaction; element changes with
    /// no elements render nothing).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for change in &self.0 {
            render::render_change(change, &mut out);
        }
        out
    }
}

/// The I/O edge to the kernel's nftables (real: [`NftCli`]; fake: `FakeFirewall` under
/// `cfg(any(test, feature = "testing"))`).
pub trait Firewall {
    /// Applies the whole transaction atomically; an empty transaction does nothing.
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError>;
    /// Reads one table back; `Ok(None)` when it does not exist.
    fn list_table(&mut self, family: Family, name: &str) -> Result<Option<TableState>, NftError>;
    /// The comment of a table (weft marks its own tables there), without listing its set
    /// elements: `Ok(None)` when the table does not exist, `Ok(Some(None))` when it has no
    /// comment.
    fn table_comment(
        &mut self,
        family: Family,
        name: &str,
    ) -> Result<Option<Option<String>>, NftError> {
        Ok(self.list_table(family, name)?.map(|t| t.comment))
    }

    /// Whether set `set` of table `table` exists, without listing elements (weft names a set
    /// after its table's structure hash, see `plan::apply_firewall`): `false` when the table
    /// does not exist either.
    fn set_exists(&mut self, family: Family, table: &str, set: &str) -> Result<bool, NftError> {
        Ok(self
            .list_table(family, table)?
            .is_some_and(|t| t.set(set).is_some()))
    }
}

/// Errors talking to nftables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The `nft` binary could not be run (or talked to).
    #[error(
        "cannot run {binary}: install nftables (Debian: apt-get install nftables) or set the path of nft"
    )]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// nft rejected the batch; nothing of it was committed.
    #[error("nft rejected the transaction, nothing was applied: {}{}", cli::shorten(stderr), line.as_deref().map(|l| format!(" (batch line {l})")).unwrap_or_default())]
    Apply {
        /// nft's error output (shortened in the message; nft echoes whole batch lines).
        stderr: String,
        /// The offending line of the batch (`N: text`, shortened), when nft named one.
        line: Option<String>,
    },
    /// nft could not list a table.
    #[error("nft could not list {what}: {}", cli::shorten(stderr))]
    List {
        /// What was listed, e.g. `table inet weft`.
        what: String,
        /// nft's error output.
        stderr: String,
    },
    /// The netfilter netlink socket failed (element changes go over netlink, not `nft`).
    #[error("cannot talk to nf_tables over netlink")]
    Netlink {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused an element change sent over netlink; nothing of the batch was
    /// committed.
    #[error("the kernel refused the nftables change ({what}), nothing was applied")]
    Kernel {
        /// The change, e.g. `added 2 elements to set bridge weft ports`.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// nft's JSON listing did not parse.
    #[error("cannot parse the JSON of nft -j list")]
    Parse {
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

//! An in-memory [`Firewall`] for tests (compiled only under `cfg(any(test, feature = "testing"))`).

use super::diff::set_references;
use super::{Change, Family, Firewall, NftError, Table, TableState, Transaction, render_table};
use std::collections::{BTreeMap, VecDeque};

/// Records every transaction and keeps the tables in memory, applying each transaction
/// all-or-nothing with nft's rules: deleting a missing element, adding a map key that exists with
/// another value, touching a missing table, set, map or chain, adding one that exists with
/// another definition, adding a rule that uses a missing set or jumps to a missing chain, or
/// deleting a chain that holds rules or that a rule or verdict jumps to, or a set or map a rule
/// uses, fails the whole batch.
#[derive(Debug, Default, Clone)]
pub struct FakeFirewall {
    /// The tables "in the kernel".
    pub tables: BTreeMap<(Family, String), Table>,
    /// Every transaction passed to `apply` (empty ones are not recorded: the real one spawns
    /// nothing for them), failed ones included.
    pub applied: Vec<Transaction>,
    /// Queued failures: the next `apply` pops one and fails with it, changing nothing.
    pub fail_next: VecDeque<String>,
    /// Number of `list_table` calls.
    pub lists: usize,
    /// Number of `table_comment` calls.
    pub comment_reads: usize,
    /// Number of `set_exists` calls.
    pub set_reads: usize,
}

impl FakeFirewall {
    /// An empty fake.
    pub fn new() -> Self {
        FakeFirewall::default()
    }

    /// The table, if present.
    pub fn table(&self, family: Family, name: &str) -> Option<&Table> {
        self.tables.get(&(family, name.to_string()))
    }

    /// What `nft list table` would print (weft's own rendering).
    pub fn list_table_text(&self, family: Family, name: &str) -> Option<String> {
        self.table(family, name).map(render_table)
    }
}

fn fail(msg: String) -> NftError {
    NftError::Apply {
        stderr: msg,
        line: None,
    }
}

fn table_mut<'a>(
    tables: &'a mut BTreeMap<(Family, String), Table>,
    family: Family,
    name: &str,
) -> Result<&'a mut Table, NftError> {
    tables.get_mut(&(family, name.to_string())).ok_or_else(|| {
        fail(format!(
            "Error: No such file or directory: table {family} {name}"
        ))
    })
}

/// The chains a rule or a verdict jumps or goes to (`jump name`, `goto name`).
fn chain_references(rule: &str) -> impl Iterator<Item = &str> {
    let words: Vec<&str> = rule
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}' | ';' | ':'))
        .filter(|w| !w.is_empty())
        .collect();
    let targets: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "jump" || w[0] == "goto")
        .map(|w| w[1].trim_matches('"'))
        .collect();
    targets.into_iter()
}

fn busy(what: &str, name: &str) -> NftError {
    fail(format!(
        "Error: Could not process rule: Device or resource busy: {what} {name}"
    ))
}

fn exists(what: &str, name: &str) -> NftError {
    fail(format!(
        "Error: Could not process rule: File exists: {what} {name}"
    ))
}

fn apply_change(
    tables: &mut BTreeMap<(Family, String), Table>,
    change: &Change,
) -> Result<(), NftError> {
    let missing =
        |what: &str, name: &str| fail(format!("Error: No such file or directory: {what} {name}"));
    match change {
        Change::ReplaceTable(t) => {
            tables.insert((t.family, t.name.clone()), t.clone());
        }
        Change::DeleteTable { family, name } => {
            tables.remove(&(*family, name.clone()));
        }
        Change::FlushChain {
            family,
            table,
            chain,
        } => {
            let t = table_mut(tables, *family, table)?;
            let c = t
                .chains
                .iter_mut()
                .find(|c| &c.name == chain)
                .ok_or_else(|| missing("chain", chain))?;
            c.rules.clear();
        }
        Change::DeleteChain {
            family,
            table,
            chain,
        } => {
            let t = table_mut(tables, *family, table)?;
            let i = t
                .chains
                .iter()
                .position(|c| &c.name == chain)
                .ok_or_else(|| missing("chain", chain))?;
            let jumped = t.chains.iter().any(|c| {
                c.rules
                    .iter()
                    .any(|r| chain_references(r).any(|j| j == chain))
            }) || t.maps.iter().any(|m| {
                m.elements
                    .values()
                    .any(|v| chain_references(v).any(|j| j == chain))
            });
            if !t.chains[i].rules.is_empty() || jumped {
                return Err(busy("chain", chain));
            }
            t.chains.remove(i);
        }
        Change::AddChain {
            family,
            table,
            chain,
        } => {
            let t = table_mut(tables, *family, table)?;
            match t.chains.iter().find(|c| c.name == chain.name) {
                Some(c) if c.base != chain.base => return Err(exists("chain", &chain.name)),
                Some(_) => {}
                None => t.chains.push(super::Chain {
                    rules: Vec::new(),
                    ..chain.clone()
                }),
            }
        }
        Change::AddRules {
            family,
            table,
            chain,
        } => {
            let t = table_mut(tables, *family, table)?;
            for rule in &chain.rules {
                if let Some(s) = set_references(rule).find(|s| {
                    !t.sets.iter().any(|x| x.name == *s) && !t.maps.iter().any(|x| x.name == *s)
                }) {
                    return Err(missing("set", s));
                }
                if let Some(j) =
                    chain_references(rule).find(|j| !t.chains.iter().any(|c| c.name == *j))
                {
                    return Err(missing("chain", j));
                }
            }
            let c = t
                .chains
                .iter_mut()
                .find(|c| c.name == chain.name)
                .ok_or_else(|| missing("chain", &chain.name))?;
            c.rules.extend(chain.rules.iter().cloned());
        }
        Change::DeleteSet { family, table, set }
        | Change::DeleteMap {
            family,
            table,
            map: set,
        } => {
            let t = table_mut(tables, *family, table)?;
            if t.chains
                .iter()
                .any(|c| c.rules.iter().any(|r| set_references(r).any(|s| s == set)))
            {
                return Err(busy("set", set));
            }
            let before = t.sets.len() + t.maps.len();
            if matches!(change, Change::DeleteSet { .. }) {
                t.sets.retain(|s| &s.name != set);
            } else {
                t.maps.retain(|m| &m.name != set);
            }
            if t.sets.len() + t.maps.len() == before {
                return Err(missing("set", set));
            }
        }
        Change::AddSet { family, table, set } => {
            let t = table_mut(tables, *family, table)?;
            if t.sets.iter().any(|s| s.name == set.name)
                || t.maps.iter().any(|m| m.name == set.name)
            {
                return Err(exists("set", &set.name));
            }
            t.sets.push(set.clone());
        }
        Change::AddMap { family, table, map } => {
            let t = table_mut(tables, *family, table)?;
            if t.sets.iter().any(|s| s.name == map.name)
                || t.maps.iter().any(|m| m.name == map.name)
            {
                return Err(exists("map", &map.name));
            }
            for v in map.elements.values() {
                if let Some(j) =
                    chain_references(v).find(|j| !t.chains.iter().any(|c| c.name == *j))
                {
                    return Err(missing("chain", j));
                }
            }
            t.maps.push(map.clone());
        }
        Change::AddElements {
            family,
            table,
            set,
            elements,
            ..
        } => {
            let t = table_mut(tables, *family, table)?;
            let s = t
                .sets
                .iter_mut()
                .find(|s| &s.name == set)
                .ok_or_else(|| missing("set", set))?;
            s.elements.extend(elements.iter().cloned());
        }
        Change::DeleteElements {
            family,
            table,
            set,
            elements,
            ..
        } => {
            let t = table_mut(tables, *family, table)?;
            let s = t
                .sets
                .iter_mut()
                .find(|s| &s.name == set)
                .ok_or_else(|| missing("set", set))?;
            for e in elements {
                if !s.elements.remove(e) {
                    return Err(fail(format!("Error: element does not exist: {e}")));
                }
            }
        }
        Change::AddMapElements {
            family,
            table,
            map,
            elements,
            ..
        } => {
            let t = table_mut(tables, *family, table)?;
            for (_, v) in elements {
                if let Some(j) =
                    chain_references(v).find(|j| !t.chains.iter().any(|c| c.name == *j))
                {
                    return Err(missing("chain", j));
                }
            }
            let m = t
                .maps
                .iter_mut()
                .find(|m| &m.name == map)
                .ok_or_else(|| missing("map", map))?;
            for (k, v) in elements {
                match m.elements.get(k) {
                    Some(old) if old != v => {
                        return Err(fail(format!(
                            "Error: Could not process rule: File exists: {k}"
                        )));
                    }
                    _ => {
                        m.elements.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        Change::DeleteMapElements {
            family,
            table,
            map,
            keys,
            ..
        } => {
            let t = table_mut(tables, *family, table)?;
            let m = t
                .maps
                .iter_mut()
                .find(|m| &m.name == map)
                .ok_or_else(|| missing("map", map))?;
            for k in keys {
                if m.elements.remove(k).is_none() {
                    return Err(fail(format!("Error: element does not exist: {k}")));
                }
            }
        }
    }
    Ok(())
}

impl Firewall for FakeFirewall {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        if tx.is_empty() {
            return Ok(());
        }
        self.applied.push(tx.clone());
        if let Some(msg) = self.fail_next.pop_front() {
            return Err(fail(msg));
        }
        let mut next = self.tables.clone();
        for change in &tx.0 {
            apply_change(&mut next, change)?;
        }
        self.tables = next;
        Ok(())
    }

    fn list_table(&mut self, family: Family, name: &str) -> Result<Option<TableState>, NftError> {
        self.lists += 1;
        Ok(self.table(family, name).map(TableState::from_table))
    }

    fn table_comment(
        &mut self,
        family: Family,
        name: &str,
    ) -> Result<Option<Option<String>>, NftError> {
        self.comment_reads += 1;
        Ok(self.table(family, name).map(|t| t.comment.clone()))
    }

    fn set_exists(&mut self, family: Family, table: &str, set: &str) -> Result<bool, NftError> {
        self.set_reads += 1;
        Ok(self
            .table(family, table)
            .is_some_and(|t| t.sets.iter().any(|s| s.name == set)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::render::tests::nat_table;
    use super::super::{SetKey, diff};
    use super::*;

    #[test]
    fn replace_then_element_diff_keeps_the_fake_in_step() {
        let mut fw = FakeFirewall::new();
        let desired = nat_table();
        assert!(fw.list_table(Family::Inet, "weft").unwrap().is_none());
        fw.apply(&Transaction(vec![Change::ReplaceTable(desired.clone())]))
            .unwrap();
        let mut next = desired.clone();
        next.sets[0].elements.insert("\"wn-green\"".into());
        next.maps[0].elements.clear();
        let state = fw.list_table(Family::Inet, "weft").unwrap().unwrap();
        let tx = diff(&state.to_table(&next), &next);
        assert!(!matches!(tx.0.first(), Some(Change::ReplaceTable(_))));
        fw.apply(&tx).unwrap();
        assert_eq!(fw.table(Family::Inet, "weft"), Some(&next));
        let again = fw.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert!(diff(&again.to_table(&next), &next).0.is_empty());
        assert_eq!(fw.applied.len(), 2);
    }

    #[test]
    fn a_failing_change_leaves_everything_as_it_was() {
        let mut fw = FakeFirewall::new();
        fw.apply(&Transaction(vec![Change::ReplaceTable(nat_table())]))
            .unwrap();
        let tx = Transaction(vec![
            Change::AddElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "bridges".into(),
                key: SetKey {
                    key_type: "ifname".into(),
                    interval: false,
                },
                elements: vec!["\"wn-x\"".into()],
            },
            Change::DeleteElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "bridges".into(),
                key: SetKey {
                    key_type: "ifname".into(),
                    interval: false,
                },
                elements: vec!["\"absent\"".into()],
            },
        ]);
        assert!(matches!(fw.apply(&tx), Err(NftError::Apply { .. })));
        assert_eq!(fw.table(Family::Inet, "weft"), Some(&nat_table()));
        fw.fail_next.push_back("Error: injected".into());
        assert!(
            fw.apply(&Transaction(vec![Change::DeleteTable {
                family: Family::Inet,
                name: "weft".into()
            }]))
            .is_err()
        );
        assert!(fw.table(Family::Inet, "weft").is_some());
        fw.apply(&Transaction(vec![Change::DeleteTable {
            family: Family::Inet,
            name: "weft".into(),
        }]))
        .unwrap();
        fw.apply(&Transaction(vec![Change::DeleteTable {
            family: Family::Inet,
            name: "weft".into(),
        }]))
        .unwrap();
        assert!(fw.tables.is_empty());
    }
}

//! The real [`Firewall`]: the `nft` binary.

use super::netlink::{self, NfTablesSocket};
use super::{Change, Family, Firewall, NftError, TableState, Transaction};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use tracing::debug;

/// Longest batch line quoted in an [`NftError::Apply`].
const LINE_MAX: usize = 300;

/// Runs `nft`: `nft -f -` for transactions (one atomic batch), `nft -j list table` to read back.
/// Transactions that only change elements of plain sets go over netlink instead (see
/// `nft::netlink`), also as one atomic batch.
///
/// The process inherits the calling thread's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftCli {
    /// The binary; `nft` (found on `PATH`) by default.
    pub binary: PathBuf,
}

impl Default for NftCli {
    fn default() -> Self {
        NftCli {
            binary: PathBuf::from("nft"),
        }
    }
}

impl NftCli {
    /// Uses `binary` instead of `nft` from `PATH`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        NftCli {
            binary: binary.into(),
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> NftError {
        NftError::Spawn {
            binary: self.binary.clone(),
            source,
        }
    }

    /// Runs nft with `args`, feeding `stdin` (from another thread, so a chatty nft cannot
    /// deadlock against our write).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output, NftError> {
        let mut child = Command::new(&self.binary)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let pipe = child.stdin.take();
        std::thread::scope(|scope| {
            let writer = match (pipe, stdin) {
                (Some(mut pipe), Some(text)) => Some(scope.spawn(move || {
                    // Dropping the pipe at the end closes nft's stdin.
                    pipe.write_all(text.as_bytes())
                })),
                _ => None,
            };
            let output = child.wait_with_output().map_err(|e| self.spawn_error(e))?;
            if let Some(writer) = writer {
                match writer.join() {
                    Ok(Ok(())) => {}
                    // nft exiting early (it rejected the batch) closes the pipe under us; its
                    // stderr says why.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    Ok(Err(e)) => return Err(self.spawn_error(e)),
                    Err(_) => {
                        return Err(self.spawn_error(std::io::Error::other(
                            "the thread writing nft's stdin panicked",
                        )));
                    }
                }
            }
            Ok(output)
        })
    }

    /// `nft list table <family> <name>` as text, for humans and tests; `Ok(None)` when the table
    /// does not exist.
    pub fn list_table_text(&self, family: Family, name: &str) -> Result<Option<String>, NftError> {
        self.list(&["list", "table", family.as_str(), name], family, name)
    }

    /// The elements of a dynamic set (see [`super::DYNAMIC_FLAG`]) with the counters the kernel
    /// keeps in them: `(key, packets, bytes)`, the key as nft's JSON has it (an address, an
    /// interface name). Empty when the table or the set does not exist.
    pub fn set_counters(
        &self,
        family: Family,
        table: &str,
        set: &str,
    ) -> Result<Vec<(String, u64, u64)>, NftError> {
        let Some(json) = self.list(
            &["-j", "list", "set", family.as_str(), table, set],
            family,
            table,
        )?
        else {
            return Ok(Vec::new());
        };
        Ok(parse_set_counters(&json))
    }

    /// How many elements a set holds now (a dynamic set's: what the kernel added and has not
    /// expired); 0 when the table or the set does not exist.
    pub fn set_len(&self, family: Family, table: &str, set: &str) -> Result<usize, NftError> {
        let Some(json) = self.list(
            &["-j", "list", "set", family.as_str(), table, set],
            family,
            table,
        )?
        else {
            return Ok(0);
        };
        Ok(parse_set_len(&json))
    }

    /// Runs a listing command; `Ok(None)` when nft says the table does not exist.
    fn list(&self, args: &[&str], family: Family, name: &str) -> Result<Option<String>, NftError> {
        let out = self.run(args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(NftError::List {
                what: format!("table {family} {name}"),
                stderr,
            });
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// The table comment from a text listing (`\tcomment "…"` before the first set, map or chain).
fn comment_from_text(text: &str) -> Option<String> {
    for line in text.lines().skip(1) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("comment \"") {
            return rest.rfind('"').map(|end| rest[..end].to_string());
        }
        if line.ends_with('{') || line == "}" {
            return None;
        }
    }
    None
}

/// nft's error output for a message: trimmed, every line cut at [`LINE_MAX`] characters, at
/// most 20 lines.
pub(super) fn shorten(stderr: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for (i, line) in stderr.trim_end().lines().enumerate() {
        if i == 20 {
            out.push("…".into());
            break;
        }
        let mut shown: String = line.chars().take(LINE_MAX).collect();
        if shown.len() < line.len() {
            shown.push('…');
        }
        out.push(shown);
    }
    out.join("\n")
}

/// `N: text` of the batch line nft blamed (`/dev/stdin:N:…: Error: …`), shortened.
fn blamed_line(stderr: &str, batch: &str) -> Option<String> {
    let rest = &stderr[stderr.find("/dev/stdin:")? + "/dev/stdin:".len()..];
    let n: usize = rest[..rest.find(':')?].parse().ok()?;
    let line = batch.lines().nth(n.checked_sub(1)?)?;
    let mut shown: String = line.chars().take(LINE_MAX).collect();
    if shown.len() < line.len() {
        shown.push('…');
    }
    Some(format!("{n}: {shown}"))
}

impl NftCli {
    /// Applies `tx` when it only adds set or map elements that netlink encodes: one nfnetlink
    /// batch, no `nft` process, and nothing left for an RCU grace period (a commit that removes
    /// elements leaves their freeing to one, and the release of its socket waits for it);
    /// `None`, with nothing done, for any other transaction. For a caller that must not block
    /// longer than that (an async runtime's worker), and hands the others to a thread that may.
    pub fn apply_additions(&mut self, tx: &Transaction) -> Option<Result<(), NftError>> {
        let additions = tx.0.iter().all(|c| {
            matches!(
                c,
                Change::AddElements { .. } | Change::AddMapElements { .. }
            )
        });
        if tx.is_empty() || !additions {
            return None;
        }
        let batch = netlink::element_batch(tx, 1)?;
        Some(NfTablesSocket::open().and_then(|mut socket| socket.apply(&batch)))
    }
}

impl Firewall for NftCli {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        if tx.is_empty() {
            return Ok(());
        }
        // Element-only transactions (registrations) skip the nft process.
        if let Some(batch) = netlink::element_batch(tx, 1) {
            debug!(
                changes = tx.0.len(),
                "applying nftables element changes over netlink"
            );
            return NfTablesSocket::open()?.apply(&batch);
        }
        let batch = tx.render();
        if batch.is_empty() {
            return Ok(());
        }
        debug!(
            changes = tx.0.len(),
            bytes = batch.len(),
            "applying nftables transaction"
        );
        let out = self.run(&["-f", "-"], Some(&batch))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = blamed_line(&stderr, &batch);
        Err(NftError::Apply { stderr, line })
    }

    fn list_table(&mut self, family: Family, name: &str) -> Result<Option<TableState>, NftError> {
        let Some(json) = self.list(
            &["-j", "list", "table", family.as_str(), name],
            family,
            name,
        )?
        else {
            return Ok(None);
        };
        let Some(mut state) = TableState::from_json(&json, family, name)
            .map_err(|source| NftError::Parse { source })?
        else {
            return Ok(None);
        };
        if state.comment.is_none() {
            // nft 1.0.6 leaves the table comment out of its JSON; the terse text listing has it.
            if let Some(text) = self.list(
                &["-t", "list", "table", family.as_str(), name],
                family,
                name,
            )? {
                state.comment = comment_from_text(&text);
            }
        }
        Ok(Some(state))
    }

    fn table_comment(
        &mut self,
        family: Family,
        name: &str,
    ) -> Result<Option<Option<String>>, NftError> {
        // One netlink request: nft would fetch its whole ruleset cache, elements included
        // (≈ 50 ms for 20,000 elements), even for a terse listing.
        match NfTablesSocket::open().and_then(|mut s| s.table_comment(family, name)) {
            Ok(comment) => Ok(comment),
            Err(e) => {
                debug!(error = %e, "reading the table comment over netlink failed; asking nft");
                Ok(self
                    .list(
                        &["-t", "list", "table", family.as_str(), name],
                        family,
                        name,
                    )?
                    .map(|text| comment_from_text(&text)))
            }
        }
    }

    fn set_exists(&mut self, family: Family, table: &str, set: &str) -> Result<bool, NftError> {
        // One netlink request, for the reason above; nft's `list set` would list the elements.
        match NfTablesSocket::open().and_then(|mut s| s.set_exists(family, table, set)) {
            Ok(exists) => Ok(exists),
            Err(e) => {
                debug!(error = %e, "reading a set over netlink failed; asking nft");
                Ok(self
                    .list_table(family, table)?
                    .is_some_and(|t| t.set(set).is_some()))
            }
        }
    }
}

/// The number of elements in a `nft -j list set` output.
pub fn parse_set_len(json: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| {
            v.get("nftables")?.as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.pointer("/set/elem").and_then(|e| e.as_array()))
                    .map(Vec::len)
                    .sum()
            })
        })
        .unwrap_or(0)
}

/// The `(key, packets, bytes)` of each element with a counter in a `nft -j list set` output.
pub fn parse_set_counters(json: &str) -> Vec<(String, u64, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for item in items {
        let Some(elems) = item.pointer("/set/elem").and_then(|e| e.as_array()) else {
            continue;
        };
        for e in elems {
            let Some(elem) = e.get("elem") else { continue };
            let key = match elem.get("val") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => continue,
            };
            let Some(counter) = elem.get("counter") else {
                continue;
            };
            let n = |k: &str| counter.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            out.push((key, n("packets"), n("bytes")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn set_counters_are_read_from_the_json_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "drops_eg4", "table": "weft", "type": "ipv4_addr", "handle": 3, "size": 65535, "elem": [{"elem": {"val": "10.0.0.2", "counter": {"packets": 2, "bytes": 168}}}, {"elem": {"val": "10.0.0.3", "counter": {"packets": 7, "bytes": 420}}}]}}]}"#;
        assert_eq!(
            parse_set_counters(json),
            vec![
                ("10.0.0.2".to_string(), 2, 168),
                ("10.0.0.3".to_string(), 7, 420)
            ]
        );
        assert!(parse_set_counters("not json").is_empty());
        assert_eq!(parse_set_len(json), 2);
        assert_eq!(parse_set_len("not json"), 0);
    }

    use super::*;

    #[test]
    fn reads_the_table_comment_from_text() {
        let text = "table inet weft {\n\tcomment \"weft structure 0123\"\n\tset s {\n";
        assert_eq!(
            comment_from_text(text).as_deref(),
            Some("weft structure 0123")
        );
        let none = "table inet weft {\n\tset s {\n\t\tcomment \"not the table's\"\n";
        assert_eq!(comment_from_text(none), None);
    }

    #[test]
    fn names_the_blamed_batch_line() {
        let batch = "add table inet t\nadd foo bar\n";
        let stderr = "/dev/stdin:2:12-12: Error: syntax error, unexpected newline\nadd foo bar\n";
        assert_eq!(
            blamed_line(stderr, batch).as_deref(),
            Some("2: add foo bar")
        );
        assert_eq!(blamed_line("Error: something", batch), None);
        let long = format!("add element inet t s {{ {} }}", "1.2.3.4, ".repeat(100));
        let shown = blamed_line("/dev/stdin:1:1-2: Error", &long).unwrap();
        assert!(shown.ends_with('…') && shown.chars().count() < LINE_MAX + 10);
    }

    #[test]
    fn error_messages_stay_short_even_for_huge_lines() {
        let stderr = format!(
            "/dev/stdin:1:1-2: Error: x\n{}\n^^\n",
            "1.2.3.4, ".repeat(10_000)
        );
        let e = NftError::Apply { stderr, line: None };
        assert!(e.to_string().len() < 2 * LINE_MAX, "{e}");
        let many = "e\n".repeat(100);
        assert_eq!(shorten(&many).lines().count(), 21);
    }

    #[test]
    fn empty_transaction_spawns_nothing() {
        let mut nft = NftCli::new("/nonexistent/nft");
        assert!(nft.apply(&Transaction::default()).is_ok());
        assert!(matches!(
            nft.apply(&Transaction(vec![super::super::Change::DeleteTable {
                family: Family::Inet,
                name: "t".into()
            }])),
            Err(NftError::Spawn { .. })
        ));
    }
}

//! Host links of detached workloads, deleted after the DEL has returned, and host links no
//! attachment owns any more (an agent stopped before deleting them), found at every resync.
//!
//! Deleting a veth is synchronous in the kernel and waits for an RCU grace period (≈ 30 ms on
//! the machines measured in docs/benchmarks.md): the CNI's DEL would wait for it too. The link
//! is looked up while the DEL waits (so a new ADD of the same attachment, which reuses the host
//! name, never loses its link to the old one's delete) and deleted by index afterwards.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc;
use tracing::{debug, info, warn};
use weft_dataplane::ipam::IpamStore;
use weft_dataplane::names;
use weft_dataplane::netlink::{LinkInfo, Netlink};

/// A host link to delete: its index, and its name for the log.
type Doomed = (u32, String);

/// Deletes host links on its own thread.
#[derive(Debug, Clone)]
pub struct Reaper {
    queue: mpsc::Sender<Doomed>,
}

impl Reaper {
    /// Starts the thread.
    pub fn spawn() -> std::io::Result<Self> {
        let (queue, doomed) = mpsc::channel::<Doomed>();
        std::thread::Builder::new()
            .name("weft-reaper".into())
            .spawn(move || {
                let mut nl = None;
                for (index, name) in doomed {
                    if nl.is_none() {
                        nl = Netlink::new()
                            .inspect_err(|e| warn!(error = %e, "reaper: no netlink socket"))
                            .ok();
                    }
                    let Some(nl) = nl.as_mut() else { continue };
                    match nl.delete_link(index) {
                        Ok(true) => debug!(link = %name, "deleted the host link of a detached workload"),
                        // Gone already: its namespace was deleted, or an ADD replaced it.
                        Ok(false) => {}
                        Err(e) => warn!(link = %name, error = %e, "cannot delete the host link of a detached workload"),
                    }
                }
            })?;
        Ok(Reaper { queue })
    }

    /// Looks up the host link `name` now and deletes it later; `Ok(false)` when there is none.
    pub fn reap(&self, name: &str) -> Result<bool, weft_dataplane::netlink::NetlinkError> {
        let Some(link) = Netlink::new()?.link_by_name(name)? else {
            return Ok(false);
        };
        if self.queue.send((link.index, link.name)).is_err() {
            // The thread is gone (it never stops by itself): delete it here.
            Netlink::new()?.delete_link(link.index)?;
        }
        Ok(true)
    }

    /// Deletes the workload host links (weft's endpoint alias) that neither a registered
    /// endpoint (`registered`: their host names) nor an attachment of any IPAM store under
    /// `state_dir` owns: a DEL whose agent stopped before deleting the link. The
    /// links are listed before the stores are read, and an ADD records its allocation before it
    /// creates its link: a link listed whose allocation is then not found is nobody's.
    /// Returns the names deleted.
    pub fn sweep(&self, state_dir: &Path, registered: &BTreeSet<String>) -> Vec<String> {
        let links: Vec<LinkInfo> = match Netlink::new().and_then(|mut nl| nl.links()) {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "sweep: cannot list links");
                return Vec::new();
            }
        };
        let prefix = format!("{}ep:", names::ALIAS_PREFIX);
        let candidates: Vec<LinkInfo> = links
            .into_iter()
            .filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with(&prefix)))
            .collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        let mut owned: BTreeSet<String> = BTreeSet::new();
        for network in IpamStore::networks(state_dir) {
            // A store that cannot be read owns whatever it may hold: delete nothing.
            let Ok(allocs) = IpamStore::open(state_dir, &network).and_then(|s| s.list()) else {
                return Vec::new();
            };
            owned.extend(allocs.into_iter().map(|a| {
                a.host_ifname
                    .unwrap_or_else(|| names::host_veth_name(&a.container_id, &a.ifname))
            }));
        }
        let mut out = Vec::new();
        for link in candidates {
            if owned.contains(&link.name) || registered.contains(&link.name) {
                continue;
            }
            if self.queue.send((link.index, link.name.clone())).is_ok() {
                info!(link = %link.name, "deleting a workload host link no attachment owns");
                out.push(link.name);
            }
        }
        out
    }
}

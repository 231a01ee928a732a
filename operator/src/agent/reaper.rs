//! Host links of detached workloads, deleted when their namespace has not taken them along,
//! and host links no attachment owns any more (an agent stopped before deleting them), found at
//! every resync.
//!
//! Deleting a veth is synchronous in the kernel: it holds the RTNL lock through an RCU grace
//! period (≈ 30 ms on the machines measured in docs/benchmarks.md), so a DEL that deletes it
//! waits that long, and so does every netlink change on the node meanwhile. A runtime deletes
//! the workload's namespace right after DEL, which takes the veth pair along (the kernel
//! batches namespace teardowns, one grace period for many). So the DEL only detaches (rules
//! out, addresses released) and the reaper deletes the link [`GRACE`] later if it is still
//! there: the runtime kept the namespace. The link is looked up while the DEL waits and
//! deleted by index, so an ADD of the same attachment, which reuses the host name, never
//! loses its new link to the old one's delete. Meanwhile the port is unregistered: the bridge
//! guard drops whatever it sends.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use weft_dataplane::ipam::{Allocation, IpamStore};
use weft_dataplane::names;
use weft_dataplane::netlink::{LinkInfo, Netlink};

/// How long a detached workload's namespace has to take its link along.
pub const GRACE: Duration = Duration::from_secs(5);

/// A host link to delete: when, its index, and its name (checked again before the delete).
type Doomed = (Instant, u32, String);

/// Deletes host links on its own thread.
#[derive(Debug, Clone)]
pub struct Reaper {
    queue: mpsc::Sender<Doomed>,
}

/// Deletes link `index` if it is still the link `name`.
fn delete(nl: &mut Netlink, index: u32, name: &str) {
    match nl.link_by_index(index) {
        Ok(Some(l)) if l.name == name => match nl.delete_link(index) {
            Ok(_) => debug!(link = %name, "deleted the host link of a detached workload"),
            Err(e) => {
                warn!(link = %name, error = %e, "cannot delete the host link of a detached workload")
            }
        },
        // Gone with its namespace, or renamed: not ours to delete.
        Ok(_) => {}
        Err(e) => {
            warn!(link = %name, error = %e, "cannot look up the host link of a detached workload")
        }
    }
}

impl Reaper {
    /// Starts the thread, which deletes each link [`GRACE`] after it was handed over.
    pub fn spawn() -> std::io::Result<Self> {
        Self::with_grace(GRACE)
    }

    /// Starts the thread with another grace period.
    pub fn with_grace(grace: Duration) -> std::io::Result<Self> {
        let (queue, doomed) = mpsc::channel::<Doomed>();
        std::thread::Builder::new()
            .name("weft-reaper".into())
            .spawn(move || {
                let mut due: BinaryHeap<Reverse<Doomed>> = BinaryHeap::new();
                loop {
                    let next = due.peek().map(|Reverse((at, _, _))| *at);
                    let received = match next {
                        Some(at) => doomed
                            .recv_timeout(at.saturating_duration_since(Instant::now()))
                            .map_err(|e| matches!(e, mpsc::RecvTimeoutError::Disconnected)),
                        None => doomed.recv().map_err(|_| true),
                    };
                    match received {
                        Ok((at, index, name)) => due.push(Reverse((at + grace, index, name))),
                        // Every sender is gone: the agent stops.
                        Err(true) => return,
                        Err(false) => {}
                    }
                    // A socket per round, closed after it: an idle agent holds none.
                    let mut nl = None;
                    while let Some(Reverse((at, _, _))) = due.peek()
                        && *at <= Instant::now()
                    {
                        let Some(Reverse((_, index, name))) = due.pop() else {
                            break;
                        };
                        if nl.is_none() {
                            nl = Netlink::new()
                                .inspect_err(|e| warn!(error = %e, "reaper: no netlink socket"))
                                .ok();
                        }
                        if let Some(nl) = nl.as_mut() {
                            delete(nl, index, &name);
                        }
                    }
                }
            })?;
        Ok(Reaper { queue })
    }

    /// Looks up the host link `name` now and deletes it after the grace period unless its
    /// namespace has taken it along; `Ok(false)` when there is none.
    pub fn reap(&self, name: &str) -> Result<bool, weft_dataplane::netlink::NetlinkError> {
        let mut nl = Netlink::new()?;
        // By ioctl: no routing lock, which the ADDs' link changes hold (every DEL asks).
        let Some(link) = nl.link_index_and_mac(name)? else {
            return Ok(false);
        };
        if self
            .queue
            .send((Instant::now(), link.index, link.name))
            .is_err()
        {
            // The thread is gone (it never stops by itself): delete it here.
            nl.delete_link(link.index)?;
        }
        Ok(true)
    }

    /// Deletes the workload host links (weft's endpoint alias) that neither a registered
    /// endpoint (`registered`: their host names) nor an attachment of any IPAM store under
    /// `state_dir` owns: a DEL whose agent stopped before deleting the link. The
    /// links are listed before the stores are read, and a link carries weft's alias only once
    /// its allocation is recorded (an ADD's veth made while the agent allocates gets it as it
    /// is wired, after the answer): a link listed whose allocation is then not found is
    /// nobody's.
    /// Returns the names deleted.
    pub fn sweep(&self, state_dir: &Path, registered: &BTreeSet<String>) -> Vec<String> {
        let links: Vec<LinkInfo> = match Netlink::new().and_then(|mut nl| nl.links()) {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "sweep: cannot list links");
                return Vec::new();
            }
        };
        let candidates: Vec<LinkInfo> = links
            .into_iter()
            .filter(|l| l.alias.as_deref().is_some_and(names::is_endpoint_alias))
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
            owned.extend(allocs.iter().map(Allocation::host_link_name));
        }
        let mut out = Vec::new();
        for link in candidates {
            if owned.contains(&link.name) || registered.contains(&link.name) {
                continue;
            }
            if self
                .queue
                .send((Instant::now(), link.index, link.name.clone()))
                .is_ok()
            {
                info!(link = %link.name, "deleting a workload host link no attachment owns");
                out.push(link.name);
            }
        }
        out
    }
}

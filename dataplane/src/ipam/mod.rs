//! The node-local IPAM store: one per network per node, file-locked and crash-safe (like the
//! host-local plugin, with round-robin allocation and idempotent ADD).
//!
//! Layout: `<state_dir>/ipam/<network>/`
//! - `lock`: every read-modify-write holds an exclusive `flock` on it for its whole duration,
//!   so concurrent CNI processes (each with its own file descriptor) are serialized; a read
//!   holds it shared while it opens and reads the file;
//! - `allocations.json`: the allocations and the last address handed out per family, as
//!   compact JSON, replaced atomically (written to `allocations.json.tmp`, then exchanged with
//!   it), so a process killed at any point leaves either the old or the new file, never a
//!   torn one. The exchange leaves the old state under the temporary name, and the next write
//!   overwrites that file in place: a pod's ADD and DEL neither create nor unlink an inode
//!   (on ext4 the inode's allocation and freeing cost more than the write). No reader can
//!   have that file open then: it was `allocations.json` only before the last write, and
//!   readers hold the lock shared until they have read it. A torn `allocations.json.tmp` left
//!   by a crash is ignored and overwritten by the next write;
//! - `reservations.json`: the VM reservations, replaced atomically the same way when they
//!   change, and flushed to disk first.
//!
//! Durability: a workload's allocation never needs to outlive a boot, because a reboot ends
//! every network namespace it describes. `allocations.json` records the boot it was written in
//! ([`boot_id`]); read in a later boot, its allocations are gone (its round-robin positions
//! stay). Only the VM reservations must survive a power loss: they have their own file, which
//! only a change of them rewrites, fsynced before its rename. Every pod's ADD and DEL writes
//! `allocations.json` alone and costs no disk flush: the new file is exchanged with the old
//! one (`renameat2(RENAME_EXCHANGE)`) rather than renamed over it, which on ext4 would start
//! the new file's writeback at once (`auto_da_alloc`, a quarter of a millisecond here), a
//! guarantee only a file that outlives a boot needs. A file torn by a power loss (possible
//! only for `allocations.json`, and only in a boot that has ended) is read as empty with a
//! warning instead of failing every ADD; the reservations are not in it. Files of older
//! versions hold the reservations in `allocations.json`: they are read from there until the
//! next change writes `reservations.json`.
//!
//! Reads ([`IpamStore::get`], [`IpamStore::list`]) hold the lock shared, so they wait only for
//! a write under way (microseconds; a VM reservation's flush to disk at most), never for other
//! reads; without waiting ([`IpamStore::without_waiting`]) a write under way makes them
//! [`IpamError::Busy`] as it does a read-modify-write. Every operation reads the file; a
//! process does not parse again a file that holds exactly the bytes it wrote last (it keeps
//! their state), and its next write encodes only the allocations that changed, copying the
//! others' bytes.
//!
//! Allocation rules are in [`IpamStore::allocate`].

mod alloc;

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{debug, info};

pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Name of the lock file in a store's directory.
pub const LOCK_FILE: &str = "lock";
/// Name of the allocations file in a store's directory.
pub const ALLOCATIONS_FILE: &str = "allocations.json";
/// Name of the temporary file the allocations are written to before the exchange.
pub const ALLOCATIONS_TMP_FILE: &str = "allocations.json.tmp";
/// Name of the VM reservations' file in a store's directory.
pub const RESERVATIONS_FILE: &str = "reservations.json";
/// Name of the temporary file the reservations are written to before the rename.
pub const RESERVATIONS_TMP_FILE: &str = "reservations.json.tmp";

/// The addresses one network may hand out on this node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pool {
    /// This node's IPv4 block of the network (addresses are allocated from it only).
    pub block_v4: Option<Ipv4Net>,
    /// This node's IPv6 block.
    pub block_v6: Option<Ipv6Net>,
    /// The network's IPv4 subnet (its broadcast address is never handed out).
    pub subnet_v4: Option<Ipv4Net>,
    /// The network's IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// Gateway addresses, never handed out.
    pub gateways: Vec<IpAddr>,
    /// Ranges never handed out.
    pub exclude: Vec<IpNet>,
}

/// What identifies one attachment of a workload (CNI: container id + interface name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// One attachment's addresses and what weft knows about it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Allocation {
    /// One address per family of the pool (IPv4 first).
    pub ips: Vec<IpAddr>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The workload interface's MAC, when fixed.
    #[serde(default)]
    pub mac: Option<String>,
    /// The host-side interface.
    #[serde(default)]
    pub host_ifname: Option<String>,
    /// The pod's namespace.
    #[serde(default)]
    pub pod_namespace: Option<String>,
    /// The pod's name.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub netns: Option<String>,
    /// When it was allocated (unix seconds).
    #[serde(default)]
    pub created: u64,
    /// The VM it belongs to (a stable identity, see [`AllocRequest::owner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// See [`AllocRequest::parent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A live migration's target that waits for its VM (see `proto::Endpoint::pending`); kept
    /// here so that an agent restarted meanwhile still holds the port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// The VLANs the port carries tagged (the attachment's `vlanTrunk`); kept here so that an
    /// agent restarted meanwhile still admits them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan_trunk: Vec<crate::vlan::VlanRange>,
    /// The workload's host ports; kept here so that the agent, restarted or resyncing, still
    /// forwards them, and forgets them once the addresses are released (DEL, GC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<crate::proto::PortMapping>,
    /// The bandwidth the runtime asked for; kept like the host ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<crate::proto::Bandwidth>,
}

/// Addresses and MAC kept for one interface of a VM across its attachments (restart, live
/// migration): they go back to the next attachment of the same owner and interface, and to
/// nobody else.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reservation {
    /// The VM identity (`namespace/name`).
    pub owner: String,
    /// The interface inside the workload.
    pub ifname: String,
    /// The addresses.
    pub ips: Vec<IpAddr>,
    /// The MAC.
    #[serde(default)]
    pub mac: Option<String>,
    /// When an attachment last took these addresses (Unix seconds): of two nodes' reservations
    /// of one VM interface, the newer is the VM's.
    #[serde(default)]
    pub since: u64,
    /// The identity is a KubeVirt VM's (from its virt-launcher pod's `vm.kubevirt.io/name`
    /// label, not the runtime's `VM_NAME`): the reservation is forgotten once the VM is gone
    /// from the API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kubevirt: bool,
}

impl Allocation {
    /// The attachment it belongs to.
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    fn is(&self, att: &Attachment) -> bool {
        self.container_id == att.container_id && self.ifname == att.ifname
    }

    /// The host side of the attachment: as recorded, or as ADD names it.
    pub fn host_link_name(&self) -> String {
        self.host_ifname
            .clone()
            .unwrap_or_else(|| crate::names::host_veth_name(&self.container_id, &self.ifname))
    }

    /// The MAC its workload uses: the one recorded, else the one ADD derives
    /// ([`crate::names::workload_mac`]).
    pub fn effective_mac(&self) -> [u8; 6] {
        self.mac
            .as_deref()
            .and_then(crate::names::parse_mac)
            .unwrap_or_else(|| {
                crate::names::workload_mac(&self.ips, &self.container_id, &self.ifname)
            })
    }

    /// Who it is, for error messages.
    fn holder(&self) -> String {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) => format!(
                "pod {ns}/{name} (container {} interface {})",
                self.container_id, self.ifname
            ),
            _ => format!("container {} interface {}", self.container_id, self.ifname),
        }
    }
}

/// An allocation request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllocRequest {
    /// Who asks.
    pub attachment: Attachment,
    /// Wanted addresses (at most one per family); families without one get a dynamic address.
    pub static_ips: Vec<IpAddr>,
    /// Recorded as is.
    pub mac: Option<String>,
    /// Recorded as is.
    pub host_ifname: Option<String>,
    /// Recorded as is.
    pub pod_namespace: Option<String>,
    /// Recorded as is.
    pub pod_name: Option<String>,
    /// Recorded as is.
    pub netns: Option<String>,
    /// A VM's stable identity (`namespace/name`, e.g. from KubeVirt's `vm.kubevirt.io/name`):
    /// the first allocation of an owner's interface is reserved for it and every later one
    /// (after a restart, or the migration target while the source still runs) gets the same
    /// addresses and MAC.
    pub owner: Option<String>,
    /// The `CNI_IFNAME` of the ADD that made this extra interface (a pod's `weft.dev/networks`
    /// annotation): that interface's DEL removes it too.
    pub parent: Option<String>,
    /// `static_ips` are a VM's addresses from another node (a live migration's source, or the
    /// node a stopped VM ran on last): they may lie outside this node's block (inside the
    /// subnet), and replace what the VM had reserved here.
    pub adopt: bool,
    /// The allocation starts pending (a live migration's target, until the VM arrives).
    pub pending: bool,
    /// `owner` is a KubeVirt VM's identity (see [`Reservation::kubevirt`]).
    pub owner_kubevirt: bool,
    /// The VM's reservation on the node it ran on last: taken (adopted, as `static_ips`)
    /// unless this store's reservation of the owner's interface is as new or newer.
    pub restore: Option<crate::proto::Restore>,
    /// Recorded as is.
    pub vlan_trunk: Vec<crate::vlan::VlanRange>,
    /// Recorded as is.
    pub port_mappings: Vec<crate::proto::PortMapping>,
    /// Recorded as is.
    pub bandwidth: Option<crate::proto::Bandwidth>,
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> IpFamily {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Errors of the IPAM store.
///
/// [`IpamError::cni_code`] maps each to a CNI error code (spec 1.1, plus weft's own ≥ 100, see
/// `cni-plugin/README.md`):
///
/// | code | errors |
/// |---|---|
/// | 5 (I/O) | [`IpamError::Io`], [`IpamError::Lock`], [`IpamError::Corrupt`] |
/// | 7 (invalid config) | [`IpamError::InvalidNetwork`], [`IpamError::StaticOutOfBlock`], [`IpamError::StaticExcluded`], [`IpamError::StaticInUse`], [`IpamError::MacInUse`], [`IpamError::StaticFamilyTwice`] |
/// | 11 (try again later) | [`IpamError::NoBlock`]: the controller has not given this node a block yet; [`IpamError::Busy`] |
/// | 104 (weft: pool exhausted) | [`IpamError::Exhausted`] |
/// | 107 (weft: interface name taken) | [`IpamError::InterfaceTaken`] |
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The network name is not a DNS-1123 subdomain (so it cannot name a store directory).
    #[error(
        "network name {network:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.'; at most 253), so it cannot name an IPAM store directory"
    )]
    InvalidNetwork {
        /// The name.
        network: String,
    },
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done (`create`, `read`, `write`, `exchange with`, `rename to`, `sync`).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store's lock could not be taken.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store's lock is held by another operation, and the store was opened
    /// [`IpamStore::without_waiting`]: nothing was read or changed.
    #[error("the lock {path} is held by another operation on the store: try again")]
    Busy {
        /// The lock file.
        path: PathBuf,
    },
    /// The allocations file does not parse.
    #[error(
        "{path} is corrupt: fix it by hand, or move it aside to start an empty store (every address of this network on this node then counts as free, so run CNI GC or restart the workloads)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// No free address is left.
    #[error(
        "no free {family} address left in block {block} of network {network} on this node: release unused attachments (CNI GC), shrink the network's exclude list, or give the network larger node blocks"
    )]
    Exhausted {
        /// The network.
        network: String,
        /// The family.
        family: IpFamily,
        /// The node's block.
        block: IpNet,
    },
    /// The pool has no block at all.
    #[error(
        "network {network} has no address block on this node yet: the weft controller assigns one when the Network selects the node; retry later"
    )]
    NoBlock {
        /// The network.
        network: String,
    },
    /// A static address outside the node's block.
    #[error("static address {ip} is outside this node's {} of network {network}: ask for an address inside the block, or run the workload on the node that owns that address", block.map_or_else(|| format!("{} block (there is none)", IpFamily::of(ip)), |b| format!("block {b}")))]
    StaticOutOfBlock {
        /// The address.
        ip: IpAddr,
        /// The node's block of that family, if any.
        block: Option<IpNet>,
        /// The network.
        network: String,
    },
    /// A static address that is reserved or excluded.
    #[error("static address {ip} cannot be handed out: it is {reason}; ask for another address")]
    StaticExcluded {
        /// The address.
        ip: IpAddr,
        /// Why (`the gateway`, `inside exclude 10.0.0.0/28`, …).
        reason: String,
    },
    /// A static address another attachment holds.
    #[error(
        "static address {ip} is already used by container {container_id} interface {ifname}: ask for another address, or remove that workload first"
    )]
    StaticInUse {
        /// The address.
        ip: IpAddr,
        /// The holder.
        container_id: String,
        /// The holder's interface.
        ifname: String,
    },
    /// A MAC another workload of the network on this node holds: two ports with one MAC take
    /// each other's traffic (the bridge delivers a MAC to one port).
    #[error(
        "MAC {mac} is already used on network {network} by {holder}: ask for another MAC, or remove that workload first"
    )]
    MacInUse {
        /// The MAC.
        mac: String,
        /// The network.
        network: String,
        /// Who holds it: `pod <namespace>/<name> (container <id> interface <ifname>)`, or the
        /// container and interface alone.
        holder: String,
    },
    /// The attachment's interface is held on the network by another ADD's interface of the same
    /// container (made from the pod's annotation with another parent, or by the runtime
    /// itself): the two would share one host link.
    #[error(
        "interface {ifname} of container {container_id} is already attached to network {network} by {holder}: choose another interface name"
    )]
    InterfaceTaken {
        /// The network.
        network: String,
        /// The container.
        container_id: String,
        /// The interface.
        ifname: String,
        /// Who made it: the runtime's ADD, or the ADD of its parent interface.
        holder: String,
    },
    /// Two static addresses of one family.
    #[error(
        "static addresses {first} and {second} are both {family}: ask for at most one address per family"
    )]
    StaticFamilyTwice {
        /// The family.
        family: IpFamily,
        /// The first address.
        first: IpAddr,
        /// The second address.
        second: IpAddr,
    },
}

impl IpamError {
    /// The short message of the CNI error.
    pub fn summary(&self) -> &'static str {
        match self {
            IpamError::MacInUse { .. } => "MAC address already in use",
            IpamError::InterfaceTaken { .. } => "interface name already in use",
            _ => "address allocation failed",
        }
    }

    /// Whether the store's lock was held by another operation ([`IpamStore::without_waiting`]):
    /// nothing was read or changed.
    pub fn is_busy(&self) -> bool {
        matches!(self, IpamError::Busy { .. })
    }

    /// The CNI error code (see the table on [`IpamError`]).
    pub fn cni_code(&self) -> u32 {
        use crate::codes::{
            IFNAME_TAKEN, INVALID_CONFIG, IO_FAILURE, POOL_EXHAUSTED, TRY_AGAIN_LATER,
        };
        match self {
            IpamError::Io { .. } | IpamError::Lock { .. } | IpamError::Corrupt { .. } => IO_FAILURE,
            IpamError::InvalidNetwork { .. }
            | IpamError::StaticOutOfBlock { .. }
            | IpamError::StaticExcluded { .. }
            | IpamError::StaticInUse { .. }
            | IpamError::MacInUse { .. }
            | IpamError::StaticFamilyTwice { .. } => INVALID_CONFIG,
            IpamError::NoBlock { .. } | IpamError::Busy { .. } => TRY_AGAIN_LATER,
            IpamError::Exhausted { .. } => POOL_EXHAUSTED,
            IpamError::InterfaceTaken { .. } => IFNAME_TAKEN,
        }
    }
}

/// The allocations themselves, each copied only where another holder shares it.
fn owned(allocations: Vec<Arc<Allocation>>) -> Vec<Allocation> {
    allocations.into_iter().map(Arc::unwrap_or_clone).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
    let path = path.to_path_buf();
    move |source| IpamError::Io { op, path, source }
}

/// The store's state: the content of `allocations.json`, with the reservations of
/// `reservations.json` (or, in files of older versions, its own).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct StoreFile {
    /// Format version (1).
    #[serde(default)]
    version: u32,
    /// The last IPv4 address handed out dynamically (round-robin continues after it).
    #[serde(default)]
    last_v4: Option<Ipv4Addr>,
    /// The last IPv6 address handed out dynamically.
    #[serde(default)]
    last_v6: Option<Ipv6Addr>,
    /// The allocations, shared with [`Encoded::pieces`] and changed only through
    /// `Arc::make_mut`: an allocation still behind the `Arc` an encoding recorded is unchanged.
    #[serde(default)]
    allocations: Vec<Arc<Allocation>>,
    /// VM reservations (written to `reservations.json`; read here from files of older
    /// versions).
    #[serde(default, skip_serializing)]
    reservations: Vec<Reservation>,
    /// The boot the allocations were made in (`/proc/sys/kernel/random/boot_id`); absent in
    /// files of older versions, whose allocations are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
}

/// The content of `reservations.json` (lent to the encoder, owned once read).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct ReservationsFile<'a> {
    /// Format version (1).
    #[serde(default)]
    version: u32,
    /// VM reservations.
    #[serde(default)]
    reservations: Cow<'a, [Reservation]>,
}

/// The allocations file this process wrote last, per store: its exact bytes and the state
/// they encode. A store whose file still holds those bytes is not parsed again; any other
/// writer's file differs in its bytes and is. (In the agent, which writes the store on every
/// pod's ADD and DEL, parsing it was a fifth of its CPU with 400 pods on the node.)
static WRITTEN: std::sync::Mutex<std::collections::BTreeMap<PathBuf, Written>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// See [`WRITTEN`].
struct Written {
    encoded: Encoded,
    state: StoreFile,
}

/// An allocations file as [`encode`] made it: its bytes and, in order, each allocation with
/// the range of the bytes that encodes it.
#[derive(Debug)]
struct Encoded {
    bytes: Vec<u8>,
    pieces: Vec<(Arc<Allocation>, Range<usize>)>,
}

/// How far past the last allocation found [`encode`] looks for the next one of the encoding
/// before: the allocations keep their order (new ones go at the end), so only removed ones
/// lie between.
const LOOKAHEAD: usize = 64;

/// `state` as compact JSON, byte for byte what `serde_json::to_vec` makes of it, with the
/// range of each allocation. The encoding of an allocation that `prev` holds behind the same
/// `Arc` is copied from `prev` rather than made again: the whole store used to be encoded at
/// every ADD and DEL, work that grew with the node's pods (0.3 µs an allocation).
fn encode(state: &mut StoreFile, prev: Option<&Encoded>) -> serde_json::Result<Encoded> {
    // Everything but the allocations, which go between the brackets of the empty list.
    const EMPTY: &[u8] = b"\"allocations\":[]";
    let allocations = std::mem::take(&mut state.allocations);
    let head = serde_json::to_vec(&*state);
    state.allocations = allocations;
    let head = head?;
    // The fields before it are numbers, addresses and nulls: the first match is the field.
    let at = head
        .windows(EMPTY.len())
        .position(|w| w == EMPTY)
        .ok_or_else(|| <serde_json::Error as serde::ser::Error>::custom("no allocations field"))?
        + EMPTY.len()
        - 1;
    let (old, old_bytes) = prev.map_or((&[][..], &[][..]), |p| (&p.pieces[..], &p.bytes[..]));
    let mut bytes = Vec::with_capacity(old_bytes.len().max(head.len()) + 1024);
    bytes.extend_from_slice(&head[..at]);
    let mut pieces = Vec::with_capacity(state.allocations.len());
    let mut next = 0;
    for (i, a) in state.allocations.iter().enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        let start = bytes.len();
        let found = old[next..]
            .iter()
            .take(LOOKAHEAD)
            .position(|(o, _)| Arc::ptr_eq(o, a));
        match found {
            Some(k) => {
                bytes.extend_from_slice(&old_bytes[old[next + k].1.clone()]);
                next += k + 1;
            }
            None => serde_json::to_writer(&mut bytes, &**a)?,
        }
        pieces.push((Arc::clone(a), start..bytes.len()));
    }
    bytes.extend_from_slice(&head[at..]);
    Ok(Encoded { bytes, pieces })
}

/// Writes `bytes` to `tmp`, the temporary file that replaces another; returns the file, still
/// open.
fn write_temp(tmp: &Path, bytes: &[u8]) -> Result<File, IpamError> {
    let mut file = File::create(tmp).map_err(io("create", tmp))?;
    file.write_all(bytes).map_err(io("write", tmp))?;
    Ok(file)
}

/// Writes `bytes` over `tmp`, a temporary file kept from an earlier write (made when there is
/// none), and cuts what the earlier content had beyond them; returns the file, still open.
/// Never cut to nothing first: on ext4, a file truncated to zero and written again has its
/// writeback started when it is closed (`auto_da_alloc`), a flush this file does not need.
fn overwrite_temp(tmp: &Path, bytes: &[u8]) -> Result<File, IpamError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(tmp)
        .map_err(io("open", tmp))?;
    file.write_all(bytes).map_err(io("write", tmp))?;
    file.set_len(bytes.len() as u64)
        .map_err(io("truncate", tmp))?;
    Ok(file)
}

/// The error of a file that cannot be encoded.
fn encode_failed(path: &Path) -> impl FnOnce(serde_json::Error) -> IpamError {
    let path = path.to_path_buf();
    move |e| io("encode", &path)(std::io::Error::other(e))
}

/// The file's content; `None` when it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, IpamError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`), read once; `None` where the
/// kernel does not offer it (the store then keeps allocations across boots).
pub fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// When this boot began (`btime` of `/proc/stat`), in Unix seconds.
fn boot_time() -> Option<u64> {
    fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Who made an interface of a container: the runtime's ADD (no parent), or the ADD of its
/// parent interface, from the pod's annotation. For messages.
pub fn made_by(parent: Option<&str>) -> String {
    match parent {
        None => "the runtime's ADD of it".to_string(),
        Some(p) => format!(
            "the ADD of interface {p}, from the pod's {} annotation",
            crate::proto::NETWORKS_ANNOTATION
        ),
    }
}

/// An interface a container holds on a network (its allocation there), as
/// [`IpamStore::held`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The network.
    pub network: String,
    /// The interface.
    pub ifname: String,
    /// The interface whose ADD made it from the pod's annotation; `None` for one the runtime
    /// asked for (`CNI_IFNAME`).
    pub parent: Option<String>,
}

/// What [`IpamStore::related`] finds of one interface of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Related {
    /// The networks whose store holds the interface itself.
    pub owners: Vec<String>,
    /// `(network, ifname)` of the interfaces whose parent it is.
    pub children: Vec<(String, String)>,
    /// `(network, parent)` where the name is another interface's child: an interface the ADD
    /// of `parent` made from the pod's annotation, which only that interface's DEL removes.
    pub child_of: Vec<(String, String)>,
}

impl Related {
    /// Of `held` (a container's interfaces), what is related to its interface `ifname`.
    pub fn of(held: &[Held], ifname: &str) -> Related {
        let mut out = Related::default();
        for h in held {
            match h.parent.as_deref() {
                None if h.ifname == ifname => out.owners.push(h.network.clone()),
                Some(p) if p == ifname => out.children.push((h.network.clone(), h.ifname.clone())),
                Some(p) if h.ifname == ifname => {
                    out.child_of.push((h.network.clone(), p.to_string()));
                }
                _ => {}
            }
        }
        out
    }

    /// Whether the name is only another interface's child ([`Related::child_of`]): the
    /// runtime's DEL of it (after its ADD of that name was refused) removes nothing, neither
    /// the child's addresses nor its link, which shares the name's host link.
    pub fn is_anothers(&self) -> bool {
        self.owners.is_empty() && !self.child_of.is_empty()
    }

    /// The networks to detach the interface from: those that hold it, or `asked` (the
    /// conflist's network, or the child's; empty for none) when none does. `runtimes`: the
    /// runtime's DEL of this name (not the undo of an ADD, nor a parent's DEL of its child),
    /// which leaves a name that is another interface's child alone ([`Related::is_anothers`]).
    pub fn owners_or(&self, asked: &str, runtimes: bool) -> Vec<String> {
        if !self.owners.is_empty() {
            self.owners.clone()
        } else if asked.is_empty() || (runtimes && self.is_anothers()) {
            Vec::new()
        } else {
            vec![asked.to_string()]
        }
    }
}

/// The IPAM store of one network on this node. Cheap to open; every operation opens its own
/// file descriptors, so one handle may be shared by threads and many processes may open the
/// same store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamStore {
    dir: PathBuf,
    network: String,
    /// Whether a read-modify-write waits for the store's lock (else it fails with
    /// [`IpamError::Busy`]).
    wait: bool,
}

impl IpamStore {
    /// Opens (creating its directories) the store of `network` under `state_dir`.
    pub fn open(state_dir: &Path, network: &str) -> Result<Self, IpamError> {
        if !crate::names::is_dns1123_subdomain(network) {
            return Err(IpamError::InvalidNetwork {
                network: network.to_string(),
            });
        }
        let dir = state_dir.join("ipam").join(network);
        // One look where it exists (every ADD and DEL opens its stores), two calls otherwise.
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        Ok(IpamStore {
            dir,
            network: network.to_string(),
            wait: true,
        })
    }

    /// The store with read-modify-writes that do not wait for its lock: one that finds it held
    /// (another process's or thread's operation on the store) fails at once with
    /// [`IpamError::Busy`], before anything is read or changed. For a caller that must not
    /// block for longer than its own operation takes (an async runtime's worker), and then
    /// waits elsewhere.
    pub fn without_waiting(mut self) -> Self {
        self.wait = false;
        self
    }

    /// The networks that have a store under `state_dir`, sorted.
    pub fn networks(state_dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(state_dir.join("ipam"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// Every interface container `container_id` holds, on every network under `state_dir` but
    /// `skip`, by network. A store that cannot be read is skipped.
    pub fn held(state_dir: &Path, container_id: &str, skip: Option<&str>) -> Vec<Held> {
        // A store that waits for its lock is never busy.
        Self::held_or_busy(state_dir, container_id, skip, true).unwrap_or_default()
    }

    /// [`IpamStore::held`], with stores that wait for their lock or not (`wait`): without
    /// waiting, a store whose lock a write holds makes it [`IpamError::Busy`] (the others that
    /// cannot be read are skipped).
    pub fn held_or_busy(
        state_dir: &Path,
        container_id: &str,
        skip: Option<&str>,
        wait: bool,
    ) -> Result<Vec<Held>, IpamError> {
        let mut out = Vec::new();
        for network in Self::networks(state_dir) {
            if skip == Some(network.as_str()) {
                continue;
            }
            let Ok(mut store) = Self::open(state_dir, &network) else {
                continue;
            };
            store.wait = wait;
            let read = store.read_allocations(|state| {
                out.extend(
                    state
                        .allocations
                        .iter()
                        .filter(|a| a.container_id == container_id)
                        .map(|a| Held {
                            network: network.clone(),
                            ifname: a.ifname.clone(),
                            parent: a.parent.clone(),
                        }),
                );
            });
            if let Err(e) = read
                && e.is_busy()
            {
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Container `container_id`'s allocations related to its interface `ifname`, on every
    /// network under `state_dir`: the networks holding `ifname` itself (no parent: the
    /// conflist's network, or the one the pod's `weft.dev/networks` annotation put it on),
    /// `(network, ifname)` of those whose parent it is (the interfaces its ADD made from the
    /// annotation), and where the name is another interface's child. A store that cannot be
    /// read is skipped.
    pub fn related(state_dir: &Path, container_id: &str, ifname: &str) -> Related {
        Related::of(&Self::held(state_dir, container_id, None), ifname)
    }

    /// [`IpamStore::related`], with stores that wait for their lock or not (`wait`): see
    /// [`IpamStore::held_or_busy`].
    pub fn related_or_busy(
        state_dir: &Path,
        container_id: &str,
        ifname: &str,
        wait: bool,
    ) -> Result<Related, IpamError> {
        let held = Self::held_or_busy(state_dir, container_id, None, wait)?;
        Ok(Related::of(&held, ifname))
    }

    /// `(network, ifname)` of every allocation under `state_dir`, on any network, of container
    /// `container_id` whose parent is `parent` (the interfaces the ADD of `parent` made from
    /// the pod's networks annotation), by network. A store that cannot be read is skipped.
    pub fn children(state_dir: &Path, container_id: &str, parent: &str) -> Vec<(String, String)> {
        Self::related(state_dir, container_id, parent).children
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Allocates addresses for `req.attachment`, or returns its existing allocation unchanged
    /// (an ADD retried after a crash is idempotent).
    ///
    /// One address per family the pool has a block for. A dynamic address comes from the
    /// node's block only and is never: the block's network address, the subnet's network
    /// address, the IPv4 subnet's broadcast address (the block's when there is no subnet), a
    /// gateway, inside an `exclude` range, or in use. Allocation is round-robin per family: it
    /// continues after the last address handed out, wrapping around, so a just-released
    /// address is not reused at once. A static address (at most one per family) must be in
    /// the node's block, not reserved or excluded as above, and not held by another
    /// attachment.
    pub fn allocate(&self, pool: &Pool, req: AllocRequest) -> Result<Allocation, IpamError> {
        self.modify(|state| {
            let mut req = req;
            if let Some(existing) = state.allocations.iter().find(|a| a.is(&req.attachment)) {
                // Another ADD's interface of that name: not this attachment's to take.
                if existing.parent != req.parent {
                    return Err(IpamError::InterfaceTaken {
                        network: self.network.clone(),
                        container_id: existing.container_id.clone(),
                        ifname: existing.ifname.clone(),
                        holder: made_by(existing.parent.as_deref()),
                    });
                }
                debug!(network = %self.network, container_id = %req.attachment.container_id, ifname = %req.attachment.ifname, "attachment already has addresses");
                return Ok((Allocation::clone(existing), false));
            }
            // A stopped VM started here: its newest reservation, wherever it is.
            if let (Some(restore), Some(o)) = (req.restore.take(), &req.owner) {
                let local = state
                    .reservations
                    .iter()
                    .find(|r| &r.owner == o && r.ifname == req.attachment.ifname)
                    .map(|r| r.since);
                if local.is_none_or(|since| since < restore.since) {
                    info!(network = %self.network, vm = %o, from = %restore.node, ips = ?restore.ips, "restoring the VM's addresses from the node it ran on last");
                    req.static_ips = restore.ips;
                    req.adopt = true;
                    if restore.mac.is_some() {
                        req.mac = restore.mac;
                    }
                }
            }
            // A migrating VM brings its addresses: they replace what it had reserved here.
            if req.adopt
                && let Some(o) = &req.owner
            {
                state
                    .reservations
                    .retain(|r| !(&r.owner == o && r.ifname == req.attachment.ifname));
            }
            let now = unix_now();
            let reserved = req.owner.as_ref().and_then(|o| {
                let r = state
                    .reservations
                    .iter_mut()
                    .find(|r| &r.owner == o && r.ifname == req.attachment.ifname)?;
                r.since = now;
                Some(r.clone())
            });
            let (ips, mac) = match reserved {
                Some(r) => {
                    // The owner's addresses; only another attachment of the same owner (a
                    // migration's source) may hold them meanwhile.
                    for ip in &r.ips {
                        if let Some(holder) = state
                            .allocations
                            .iter()
                            .find(|a| a.ips.contains(ip) && a.owner != req.owner)
                        {
                            return Err(IpamError::StaticInUse {
                                ip: *ip,
                                container_id: holder.container_id.clone(),
                                ifname: holder.ifname.clone(),
                            });
                        }
                    }
                    (r.ips, r.mac.or(req.mac))
                }
                None => {
                    let ips =
                        alloc::choose(&self.network, pool, &req.static_ips, req.adopt, state)?;
                    if let Some(owner) = &req.owner {
                        state.reservations.push(Reservation {
                            owner: owner.clone(),
                            ifname: req.attachment.ifname.clone(),
                            ips: ips.clone(),
                            mac: req.mac.clone(),
                            since: now,
                            kubevirt: req.owner_kubevirt,
                        });
                    }
                    (ips, req.mac)
                }
            };
            // One MAC, one workload (the same VM's attachments excepted: a migration's source
            // and target): a second port with it would take the first one's traffic.
            let wanted = mac
                .as_deref()
                .and_then(crate::names::parse_mac)
                .unwrap_or_else(|| {
                    crate::names::workload_mac(
                        &ips,
                        &req.attachment.container_id,
                        &req.attachment.ifname,
                    )
                });
            if let Some(holder) = state.allocations.iter().find(|a| {
                a.effective_mac() == wanted && (req.owner.is_none() || a.owner != req.owner)
            }) {
                return Err(IpamError::MacInUse {
                    mac: crate::names::format_mac(wanted),
                    network: self.network.clone(),
                    holder: holder.holder(),
                });
            }
            let allocation = Allocation {
                ips,
                container_id: req.attachment.container_id,
                ifname: req.attachment.ifname,
                mac,
                host_ifname: req.host_ifname,
                pod_namespace: req.pod_namespace,
                pod_name: req.pod_name,
                netns: req.netns,
                created: now,
                owner: req.owner,
                parent: req.parent,
                pending: req.pending,
                vlan_trunk: req.vlan_trunk,
                port_mappings: req.port_mappings,
                bandwidth: req.bandwidth,
            };
            info!(network = %self.network, container_id = %allocation.container_id, ifname = %allocation.ifname, ips = ?allocation.ips, "allocated");
            state.allocations.push(Arc::new(allocation.clone()));
            Ok((allocation, true))
        })
    }

    /// Releases the attachment's addresses; `Ok(None)` when it had none (release is
    /// idempotent).
    pub fn release(&self, att: &Attachment) -> Result<Option<Allocation>, IpamError> {
        self.modify(|state| {
            let Some(i) = state.allocations.iter().position(|a| a.is(att)) else {
                return Ok((None, false));
            };
            let gone = Arc::unwrap_or_clone(state.allocations.remove(i));
            info!(network = %self.network, container_id = %gone.container_id, ifname = %gone.ifname, ips = ?gone.ips, "released");
            Ok((Some(gone), true))
        })
    }

    /// The VM reservations.
    pub fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        Ok(self.read()?.0.reservations)
    }

    /// The reservations no allocation of this store uses (VMs stopped here, or running on
    /// another node now).
    pub fn idle_reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let (state, _) = self.read()?;
        Ok(state
            .reservations
            .iter()
            .filter(|r| {
                !state
                    .allocations
                    .iter()
                    .any(|a| a.owner.as_deref() == Some(r.owner.as_str()))
            })
            .cloned()
            .collect())
    }

    /// Drops the reservations of a VM that no longer exists (its addresses become free once
    /// no attachment holds them); returns how many there were.
    pub fn forget(&self, owner: &str) -> Result<usize, IpamError> {
        self.modify(|state| {
            let before = state.reservations.len();
            state.reservations.retain(|r| r.owner != owner);
            let n = before - state.reservations.len();
            Ok((n, n > 0))
        })
    }

    /// Drops the reservations of `owner` that `pred` accepts, unless an attachment of `owner`
    /// exists (checked under the store's lock, so an ADD of the VM meanwhile keeps them);
    /// returns how many were dropped.
    pub fn forget_idle(
        &self,
        owner: &str,
        pred: impl Fn(&Reservation) -> bool,
    ) -> Result<usize, IpamError> {
        self.modify(|state| {
            if state
                .allocations
                .iter()
                .any(|a| a.owner.as_deref() == Some(owner))
            {
                return Ok((0, false));
            }
            let before = state.reservations.len();
            state
                .reservations
                .retain(|r| !(r.owner == owner && pred(r)));
            let n = before - state.reservations.len();
            Ok((n, n > 0))
        })
    }

    /// The allocations and the VM reservations, in one read.
    pub fn contents(&self) -> Result<(Vec<Allocation>, Vec<Reservation>), IpamError> {
        let (state, _) = self.read()?;
        Ok((owned(state.allocations), state.reservations))
    }

    /// The attachment's allocation.
    pub fn get(&self, att: &Attachment) -> Result<Option<Allocation>, IpamError> {
        self.read_allocations(|state| {
            state
                .allocations
                .iter()
                .find(|a| a.is(att))
                .map(|a| Allocation::clone(a))
        })
    }

    /// Every allocation, in allocation order.
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        self.read_allocations(|state| owned(state.into_owned().allocations))
    }

    /// Releases every allocation whose attachment is not in `valid`; returns the released ones.
    /// An interface made from the pod's annotation by the ADD of another (its `parent`) is
    /// valid with that one: the runtime knows only the interfaces it asked for.
    pub fn gc(&self, valid: &[Attachment]) -> Result<Vec<Allocation>, IpamError> {
        let valid: std::collections::BTreeSet<&Attachment> = valid.iter().collect();
        let is_valid = |a: &Allocation| {
            valid.contains(&a.attachment())
                || a.parent.as_ref().is_some_and(|parent| {
                    valid.contains(&Attachment {
                        container_id: a.container_id.clone(),
                        ifname: parent.clone(),
                    })
                })
        };
        self.modify(|state| {
            let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut state.allocations)
                .into_iter()
                .partition(|a| is_valid(a));
            state.allocations = keep;
            let gone = owned(gone);
            for a in &gone {
                info!(network = %self.network, container_id = %a.container_id, ifname = %a.ifname, ips = ?a.ips, "gc released");
            }
            let changed = !gone.is_empty();
            Ok((gone, changed))
        })
    }

    /// Changes the metadata of the attachment's allocation under the lock (e.g. records its
    /// `host_ifname`); returns the result, `Ok(None)` when there is no such allocation. The
    /// addresses and the attachment itself cannot change: `f`'s edits of `ips`,
    /// `container_id` and `ifname` are ignored.
    pub fn update<F>(&self, att: &Attachment, f: F) -> Result<Option<Allocation>, IpamError>
    where
        F: FnOnce(&mut Allocation),
    {
        self.modify(|state| {
            let Some(a) = state.allocations.iter_mut().find(|a| a.is(att)) else {
                return Ok((None, false));
            };
            let before = Allocation::clone(a);
            let a = Arc::make_mut(a);
            f(a);
            a.ips = before.ips.clone();
            a.container_id = before.container_id.clone();
            a.ifname = before.ifname.clone();
            let changed = *a != before;
            Ok((Some(a.clone()), changed))
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(ALLOCATIONS_FILE)
    }

    fn reservations_path(&self) -> PathBuf {
        self.dir.join(RESERVATIONS_FILE)
    }

    /// The state, the reservations included; and whether they came from `reservations.json`
    /// (not from the allocations file of an older version).
    fn read(&self) -> Result<(StoreFile, bool), IpamError> {
        let mut state = self.read_allocations(|s| s.into_owned())?;
        let own_file = self.read_reservations(&mut state)?;
        Ok((state, own_file))
    }

    /// Puts the reservations of `reservations.json` in `state`; `false` when there is no such
    /// file (those of an older version's allocations file stay).
    fn read_reservations(&self, state: &mut StoreFile) -> Result<bool, IpamError> {
        let path = self.reservations_path();
        let Some(bytes) = read_file(&path)? else {
            return Ok(false);
        };
        let file: ReservationsFile =
            serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt { path, source })?;
        state.reservations = file.reservations.into_owned();
        Ok(true)
    }

    /// `f` of the content of `allocations.json` (without the allocations of an earlier boot):
    /// the state this process wrote last when the file still holds its bytes ([`WRITTEN`]),
    /// parsed otherwise.
    fn read_allocations<T>(&self, f: impl FnOnce(Cow<'_, StoreFile>) -> T) -> Result<T, IpamError> {
        let path = self.path();
        let shared = self.lock_shared()?;
        let read = read_file(&path);
        // Read whole and closed: the next write may overwrite this file once a write after
        // this one has exchanged it out.
        drop(shared);
        let Some(bytes) = read? else {
            return Ok(f(Cow::Owned(StoreFile::default())));
        };
        if let Some(w) = WRITTEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&path)
            .filter(|w| w.encoded.bytes == bytes)
        {
            return Ok(f(Cow::Borrowed(&w.state)));
        }
        Ok(f(Cow::Owned(self.parse_allocations(&path, &bytes)?)))
    }

    /// The content of `allocations.json` for a read-modify-write: what [`IpamStore::read`]
    /// gives, and, when it is the state this process wrote last, that state taken out of
    /// [`WRITTEN`] with its encoding (the write puts back what it writes).
    fn take(&self) -> Result<(StoreFile, bool, Option<Encoded>), IpamError> {
        let path = self.path();
        let (mut state, prev) = match read_file(&path)? {
            None => (StoreFile::default(), None),
            Some(bytes) => {
                // An entry whose bytes the file no longer holds goes too: it is stale.
                let written = WRITTEN
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&path)
                    .filter(|w| w.encoded.bytes == bytes);
                match written {
                    Some(w) => (w.state, Some(w.encoded)),
                    None => (self.parse_allocations(&path, &bytes)?, None),
                }
            }
        };
        let own_file = self.read_reservations(&mut state)?;
        Ok((state, own_file, prev))
    }

    /// The content of `allocations.json`, `bytes`, without the allocations of an earlier boot.
    fn parse_allocations(&self, path: &Path, bytes: &[u8]) -> Result<StoreFile, IpamError> {
        let mut state: StoreFile = match serde_json::from_slice(bytes) {
            Ok(s) => s,
            Err(source) => {
                // Written in a boot that has ended, and torn by the power loss that ended it
                // (an unsynced write): what it described is gone with that boot.
                let written = fs::metadata(path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                match (written, boot_time()) {
                    (Some(w), Some(b)) if w < b => {
                        tracing::warn!(path = %path.display(), error = %source, "the IPAM store was torn by the power loss that ended the last boot; starting it empty");
                        return Ok(StoreFile::default());
                    }
                    _ => {
                        return Err(IpamError::Corrupt {
                            path: path.to_path_buf(),
                            source,
                        });
                    }
                }
            }
        };
        // Allocations of an earlier boot: their network namespaces ended with it.
        if let (Some(was), Some(now)) = (state.boot_id.as_deref(), boot_id())
            && was != now
        {
            if !state.allocations.is_empty() {
                info!(network = %self.network, allocations = state.allocations.len(), "allocations of an earlier boot dropped");
            }
            state.allocations.clear();
            state.boot_id = None;
        }
        Ok(state)
    }

    /// The store's lock held shared, for a read: `None` where no writer ever made the lock file
    /// (no writer has then written the store's files either).
    fn lock_shared(&self) -> Result<Option<File>, IpamError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = match File::open(&lock_path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IpamError::Lock {
                    path: lock_path,
                    source,
                });
            }
        };
        self.hold(&lock, lock_path, File::lock_shared, File::try_lock_shared)?;
        Ok(Some(lock))
    }

    /// Takes `lock` (the file at `lock_path`) with `wait_for`, or with `try_now` for a store
    /// that does not wait: held by another operation, that is [`IpamError::Busy`].
    fn hold(
        &self,
        lock: &File,
        lock_path: PathBuf,
        wait_for: fn(&File) -> std::io::Result<()>,
        try_now: fn(&File) -> Result<(), fs::TryLockError>,
    ) -> Result<(), IpamError> {
        let failed = |source| IpamError::Lock {
            path: lock_path.clone(),
            source,
        };
        if self.wait {
            return wait_for(lock).map_err(failed);
        }
        match try_now(lock) {
            Ok(()) => Ok(()),
            Err(fs::TryLockError::WouldBlock) => Err(IpamError::Busy { path: lock_path }),
            Err(fs::TryLockError::Error(source)) => Err(failed(source)),
        }
    }

    /// Read-modify-write under the exclusive lock; `f` returns its result and whether it
    /// changed the state (nothing is written otherwise).
    fn modify<T>(
        &self,
        f: impl FnOnce(&mut StoreFile) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|source| IpamError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        self.hold(&lock, lock_path, File::lock, File::try_lock)?;
        let (mut state, own_file, prev) = self.take()?;
        let reservations = state.reservations.clone();
        let (out, changed) = f(&mut state)?;
        if !changed {
            // As read: what the file holds, with the encoding that made it.
            if let Some(encoded) = prev {
                state.reservations = Vec::new();
                WRITTEN
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(self.path(), Written { encoded, state });
            }
        } else {
            state.version = 1;
            state.boot_id = boot_id().map(str::to_string);
            // The reservations first: the allocations file written next no longer holds
            // those an older version put there.
            if state.reservations != reservations || (!own_file && !state.reservations.is_empty()) {
                self.write_reservations(&state.reservations)?;
            }
            let encoded = encode(&mut state, prev.as_ref()).map_err(encode_failed(&self.path()))?;
            drop(prev);
            self.write_allocations(&encoded.bytes)?;
            // What a parse of the new file gives: the reservations are not in it.
            state.reservations = Vec::new();
            WRITTEN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.path(), Written { encoded, state });
        }
        // Closing the descriptor releases the lock, after the replacement.
        drop(lock);
        Ok(out)
    }

    /// Replaces `allocations.json` atomically, without a flush to disk: the new state is
    /// written over the temporary file (the state before the last write, or a crash's torn
    /// write), which is then exchanged with `allocations.json`, and keeps the old state for the
    /// next write to overwrite; a plain rename where the old file does not exist or the file
    /// system cannot exchange. Called with the exclusive lock held: no reader has the
    /// temporary file open (see the module's documentation).
    fn write_allocations(&self, bytes: &[u8]) -> Result<(), IpamError> {
        let tmp = self.dir.join(ALLOCATIONS_TMP_FILE);
        let path = self.path();
        drop(overwrite_temp(&tmp, bytes)?);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            tmp.as_path(),
            rustix::fs::CWD,
            path.as_path(),
            rustix::fs::RenameFlags::EXCHANGE,
        ) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::INVAL => {
                fs::rename(&tmp, &path).map_err(io("rename to", &path))?;
            }
            Err(e) => return Err(io("exchange with", &path)(e.into())),
        }
        Ok(())
    }

    /// Replaces `reservations.json` atomically, flushed to disk before the rename: the VM
    /// reservations outlive a boot. (The directory is never synced: after a power loss the
    /// store may miss the last change of a boot that ended.)
    fn write_reservations(&self, reservations: &[Reservation]) -> Result<(), IpamError> {
        let tmp = self.dir.join(RESERVATIONS_TMP_FILE);
        let path = self.reservations_path();
        let file = ReservationsFile {
            version: 1,
            reservations: Cow::Borrowed(reservations),
        };
        let bytes = serde_json::to_vec(&file).map_err(encode_failed(&path))?;
        let out = write_temp(&tmp, &bytes)?;
        out.sync_all().map_err(io("sync", &tmp))?;
        drop(out);
        fs::rename(&tmp, &path).map_err(io("rename to", &path))
    }
}

#[cfg(test)]
mod tests;

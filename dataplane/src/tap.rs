//! Persistent TAP devices for VMs, made through `/dev/net/tun`.
//!
//! A persistent TAP outlives the file descriptor that created it; the VMM (running as
//! `owner`/`group`) opens it later by name. The device is created in the network namespace of
//! the calling **thread** (the kernel takes the namespace of whoever opens `/dev/net/tun`), so
//! to make one in another namespace call [`create_persistent_tap`] inside
//! [`crate::netns::run_in`].
#![allow(unsafe_code)] // ioctls on /dev/net/tun; each block has its SAFETY comment

use crate::names;
use crate::netlink::{Netlink, NetlinkError};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use tracing::debug;

/// The TUN/TAP clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Raw ioctls of `<linux/if_tun.h>`. The kernel declares them `_IOW('T', n, int)`;
/// `TUNSETIFF` really takes a pointer to a `struct ifreq`, which is passed as the integer
/// argument (as the kernel headers and every tun user do).
mod ioctls {
    nix::ioctl_write_int!(tun_set_iff, b'T', 202);
    nix::ioctl_write_int!(tun_set_persist, b'T', 203);
    nix::ioctl_write_int!(tun_set_owner, b'T', 204);
    nix::ioctl_write_int!(tun_set_group, b'T', 206);
}

/// What TAP to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapSpec<'a> {
    /// Interface name (at most 15 bytes).
    pub name: &'a str,
    /// User allowed to attach to it (`TUNSETOWNER`); `None`: only CAP_NET_ADMIN.
    pub owner: Option<u32>,
    /// Group allowed to attach to it (`TUNSETGROUP`).
    pub group: Option<u32>,
    /// Number of queues the VMM will open: more than 1 makes the device multi-queue
    /// (`IFF_MULTI_QUEUE`); the VMM then attaches one file descriptor per queue.
    pub queues: u32,
    /// Prepend a `virtio_net_hdr` to frames (`IFF_VNET_HDR`), as vhost-net and QEMU expect.
    pub vnet_hdr: bool,
    /// MTU to set.
    pub mtu: Option<u32>,
    /// MAC to set.
    pub mac: Option<[u8; 6]>,
}

/// Errors creating a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A link of that name already exists.
    #[error("cannot create tap {name}: a link of that name exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_DEVICE} to create tap {name}")]
    OpenTun {
        /// The tap.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl on `/dev/net/tun` failed.
    #[error("cannot create tap {name}: {ioctl} failed")]
    Ioctl {
        /// The tap.
        name: String,
        /// Which ioctl (`TUNSETIFF`, `TUNSETOWNER`…).
        ioctl: &'static str,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// Looking the new device up or setting its MTU or MAC failed.
    #[error("cannot configure tap {name}")]
    Configure {
        /// The tap.
        name: String,
        /// The cause.
        #[source]
        source: NetlinkError,
    },
}

impl TapError {
    /// True when the name was taken.
    pub fn is_exists(&self) -> bool {
        matches!(self, TapError::Exists { .. })
    }
}

fn ifreq_for(name: &str, flags: libc::c_int) -> Result<libc::ifreq, TapError> {
    let invalid = |reason| TapError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if let Some(reason) = names::ifname_problem(name) {
        return Err(invalid(reason));
    }
    let flags = libc::c_short::try_from(flags).map_err(|_| invalid("flags overflow"))?;
    // SAFETY: `ifreq` is a plain C struct (a byte array and a union of plain integers,
    // sockaddrs and a pointer); all-zero bytes are a valid value of every field.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    Ok(ifr)
}

/// Creates a persistent TAP in the calling thread's network namespace, owned by
/// `owner`/`group`, with the MTU and MAC of `spec`, and returns its index. It starts down.
///
/// Fails with [`TapError::is_exists`] when a link of that name exists (the kernel would
/// otherwise silently attach to an existing TAP). If anything fails the device is gone.
pub fn create_persistent_tap(spec: &TapSpec<'_>) -> Result<u32, TapError> {
    let name = spec.name;
    let configure = |source| TapError::Configure {
        name: name.to_string(),
        source,
    };
    let mut nl = Netlink::new().map_err(configure)?;
    if nl.link_by_name(name).map_err(configure)?.is_some() {
        return Err(TapError::Exists {
            name: name.to_string(),
        });
    }
    // No such link: TUNSETIFF creates the device.
    let tun = open_tap(name, spec.vnet_hdr, spec.queues > 1)?;
    let fd = tun.as_raw_fd();
    let ioctl_err = |ioctl| {
        move |source| TapError::Ioctl {
            name: name.to_string(),
            ioctl,
            source,
        }
    };
    // From here on the device exists; it disappears when `tun` closes unless persisted.
    if let Some(uid) = spec.owner {
        // SAFETY: `fd` is the open tun descriptor; TUNSETOWNER takes the uid by value.
        unsafe { ioctls::tun_set_owner(fd, libc::c_ulong::from(uid)) }
            .map_err(ioctl_err("TUNSETOWNER"))?;
    }
    if let Some(gid) = spec.group {
        // SAFETY: `fd` is the open tun descriptor; TUNSETGROUP takes the gid by value.
        unsafe { ioctls::tun_set_group(fd, libc::c_ulong::from(gid)) }
            .map_err(ioctl_err("TUNSETGROUP"))?;
    }
    let index = match nl.link_by_name(name).map_err(configure)? {
        Some(l) => l.index,
        None => {
            return Err(configure(NetlinkError::Vanished {
                op: "create tap",
                target: name.to_string(),
            }));
        }
    };
    if let Some(mtu) = spec.mtu {
        nl.set_mtu(index, mtu).map_err(configure)?;
    }
    if let Some(mac) = spec.mac {
        nl.set_mac(index, mac).map_err(configure)?;
    }
    // SAFETY: `fd` is the open tun descriptor; TUNSETPERSIST takes a boolean by value.
    unsafe { ioctls::tun_set_persist(fd, 1) }.map_err(ioctl_err("TUNSETPERSIST"))?;
    drop(tun);
    debug!(tap = %name, index, queues = spec.queues, "created persistent tap");
    Ok(index)
}

/// Opens one queue of the TAP `name` of the calling thread's namespace, as a VMM does: frames
/// the bridge sends to the TAP are read from the file, frames written to it enter the bridge.
/// `vnet_hdr` and `multi_queue` must match how the TAP was created. Without a link of that name
/// the kernel creates the TAP, gone again when the file closes unless made persistent.
pub fn open_tap(name: &str, vnet_hdr: bool, multi_queue: bool) -> Result<File, TapError> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut ifr = ifreq_for(name, flags)?;
    let tun: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|source| TapError::OpenTun {
            name: name.to_string(),
            source,
        })?;
    // SAFETY: `tun` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes `ifr`, a
    // valid `struct ifreq` exclusively borrowed for the call.
    unsafe {
        ioctls::tun_set_iff(
            tun.as_raw_fd(),
            std::ptr::from_mut(&mut ifr) as libc::c_ulong,
        )
    }
    .map_err(|source| TapError::Ioctl {
        name: name.to_string(),
        ioctl: "TUNSETIFF",
        source,
    })?;
    Ok(tun)
}

/// What the kernel reports about a TAP (the tun driver's `IFLA_INFO_DATA`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapInfo {
    /// `IFLA_TUN_OWNER`: the user allowed to attach, if restricted.
    pub owner: Option<u32>,
    /// `IFLA_TUN_GROUP`: the group allowed to attach, if restricted.
    pub group: Option<u32>,
    /// TAP (ethernet frames) rather than TUN (IP packets).
    pub tap: bool,
    /// Frames carry a `virtio_net_hdr`.
    pub vnet_hdr: bool,
    /// Survives the closing of its last file descriptor.
    pub persistent: bool,
    /// Created with `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// Queues currently attached (file descriptors open on it).
    pub attached_queues: u32,
}

/// Reads the TAP/TUN settings of link `index`; `None` when there is no such link or it is
/// not a tun/tap device.
pub fn tap_info(nl: &mut Netlink, index: u32) -> Result<Option<TapInfo>, NetlinkError> {
    use netlink_packet_core::Nla;
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::link::{InfoData, InfoTun, LinkAttribute, LinkInfo};

    let msg = rtnetlink::LinkUnspec::new_with_index(index).build();
    let replies = match nl.request(RouteNetlinkMessage::GetLink(msg), 0) {
        Ok(r) => r,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut found = None;
    for reply in replies {
        let RouteNetlinkMessage::NewLink(link) = reply else {
            continue;
        };
        for attr in link.attributes {
            let LinkAttribute::LinkInfo(infos) = attr else {
                continue;
            };
            for info in infos {
                let LinkInfo::Data(InfoData::Tun(nlas)) = info else {
                    continue;
                };
                let mut t = TapInfo::default();
                for nla in nlas {
                    let InfoTun::Other(nla) = nla else {
                        continue;
                    };
                    let mut v = vec![0u8; nla.value_len()];
                    nla.emit_value(&mut v);
                    let u8v = v.first().copied().unwrap_or(0);
                    let u32v = <[u8; 4]>::try_from(v.get(..4).unwrap_or_default())
                        .map(u32::from_ne_bytes)
                        .ok();
                    match nla.kind() {
                        IFLA_TUN_OWNER => t.owner = u32v.filter(|u| *u != u32::MAX),
                        IFLA_TUN_GROUP => t.group = u32v.filter(|g| *g != u32::MAX),
                        IFLA_TUN_TYPE => t.tap = u8v == IFF_TAP_TYPE,
                        IFLA_TUN_VNET_HDR => t.vnet_hdr = u8v != 0,
                        IFLA_TUN_PERSIST => t.persistent = u8v != 0,
                        IFLA_TUN_MULTI_QUEUE => t.multi_queue = u8v != 0,
                        IFLA_TUN_NUM_QUEUES => t.attached_queues = u32v.unwrap_or(0),
                        _ => {}
                    }
                }
                found = Some(t);
            }
        }
    }
    Ok(found)
}

// <linux/if_link.h>, IFLA_TUN_*.
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_VNET_HDR: u16 = 5;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
/// `IFF_TAP` as the one-byte `IFLA_TUN_TYPE` value.
const IFF_TAP_TYPE: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_carries_name_and_flags() {
        let ifr = ifreq_for("tap0", libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
        let name: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        assert_eq!(name, b"tap0");
        // SAFETY: ifreq_for wrote the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        assert_eq!(i32::from(flags), libc::IFF_TAP | libc::IFF_NO_PI);
    }

    #[test]
    fn bad_tap_names_are_rejected() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "a:b", ".."] {
            assert!(matches!(
                ifreq_for(bad, libc::IFF_TAP),
                Err(TapError::InvalidName { .. })
            ));
        }
    }
}

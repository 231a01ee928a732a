//! A link's index and MAC, and whether it is up, by name: the socket ioctls `SIOCGIFINDEX`,
//! `SIOCGIFHWADDR` and `SIOCGIFFLAGS`, asked on the [`Netlink`] socket itself (netlink hands
//! interface ioctls down to the devices of the socket's namespace).
//!
//! Why not a netlink `RTM_GETLINK`: the kernel serves that under the RTNL lock, which every
//! link, address and route change of every ADD on the node also takes, and answers with the
//! link's every attribute (a bridge's run to a few kilobytes, decoded in full here). An ioctl
//! looks the device up under RCU and copies one field out. The CNI plugin asks for its
//! network's bridge this way on every ADD, and every link made here is found by name this way
//! after its creation instead of echoed back (docs/benchmarks.md).
#![allow(unsafe_code)] // ioctls on a socket; each block has its SAFETY comment

use super::{Netlink, NetlinkError, bad_ifname};
use std::io;
use std::os::fd::AsRawFd;

mod ioctls {
    nix::ioctl_readwrite_bad!(get_index, libc::SIOCGIFINDEX, libc::ifreq);
    nix::ioctl_readwrite_bad!(get_hwaddr, libc::SIOCGIFHWADDR, libc::ifreq);
    nix::ioctl_readwrite_bad!(get_flags, libc::SIOCGIFFLAGS, libc::ifreq);
}

/// The error of ioctl `op` about link `name`.
fn failed(op: &'static str, name: &str) -> impl Fn(nix::errno::Errno) -> NetlinkError {
    move |e| NetlinkError::Io {
        op,
        target: format!("link {name}"),
        source: io::Error::from(e),
    }
}

/// An `ifreq` asking about interface `name` (valid: at most 15 bytes, no NUL).
fn request(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a byte array and a union of plain data); all zeros is a
    // valid value of it, and the name's terminating NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// A link's name, index and MAC: what [`Netlink::link_index_and_mac`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkIndex {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MAC address, for links with an Ethernet link-layer address.
    pub mac: Option<[u8; 6]>,
}

impl Netlink {
    /// Link `name`'s index and MAC (for an Ethernet link), without the RTNL lock; `None` when
    /// there is no such link. [`Netlink::link_by_name`] tells everything else.
    pub fn link_index_and_mac(&mut self, name: &str) -> Result<Option<LinkIndex>, NetlinkError> {
        if bad_ifname(name).is_some() {
            return Ok(None);
        }
        let fd = self.socket.as_raw_fd();
        let mut req = request(name);
        // SAFETY: `fd` is this socket's open descriptor; SIOCGIFINDEX reads the name from and
        // writes the index into the `ifreq`, which outlives the call.
        match unsafe { ioctls::get_index(fd, &mut req) } {
            Err(nix::errno::Errno::ENODEV) => return Ok(None),
            other => other.map_err(failed("get link index", name))?,
        };
        // SAFETY: SIOCGIFINDEX answered: the union holds the index.
        let index = unsafe { req.ifr_ifru.ifru_ifindex };
        let mut req = request(name);
        // SAFETY: as above; SIOCGIFHWADDR writes a `sockaddr` (family and address) into it.
        match unsafe { ioctls::get_hwaddr(fd, &mut req) } {
            Err(nix::errno::Errno::ENODEV) => return Ok(None),
            other => other.map_err(failed("get link address", name))?,
        };
        // SAFETY: SIOCGIFHWADDR answered: the union holds the `sockaddr`.
        let addr = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mac = (addr.sa_family == libc::ARPHRD_ETHER).then(|| {
            let mut mac = [0u8; 6];
            for (dst, src) in mac.iter_mut().zip(addr.sa_data.iter()) {
                *dst = *src as u8;
            }
            mac
        });
        Ok(u32::try_from(index).ok().map(|index| LinkIndex {
            index,
            name: name.to_string(),
            mac,
        }))
    }

    /// Whether link `name` is administratively up (`IFF_UP`), without the RTNL lock; `None`
    /// when there is no such link.
    pub fn is_up(&mut self, name: &str) -> Result<Option<bool>, NetlinkError> {
        if bad_ifname(name).is_some() {
            return Ok(None);
        }
        let mut req = request(name);
        // SAFETY: `fd` is this socket's open descriptor; SIOCGIFFLAGS reads the name from and
        // writes the flags into the `ifreq`, which outlives the call.
        match unsafe { ioctls::get_flags(self.socket.as_raw_fd(), &mut req) } {
            Err(nix::errno::Errno::ENODEV) => return Ok(None),
            other => other.map_err(failed("get link flags", name))?,
        };
        // SAFETY: SIOCGIFFLAGS answered: the union holds the flags.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        Ok(Some(flags & libc::IFF_UP as libc::c_short != 0))
    }
}

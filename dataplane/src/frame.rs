//! Raw Ethernet frames a socket never would send: the agent's gateway check (ARP) and a
//! migrated VM's announcements (gratuitous ARP, unsolicited NA), and the lab's and the tests'
//! forged frames (ARP with a foreign sender address, neighbour discovery with a foreign target
//! or link-layer address, router advertisements, RARP).

//!
//! Also the other way round: [`Capture`] records the frames that arrive on an interface (how
//! the lab and the tests see a mirror's copies).

#![allow(unsafe_code)] // AF_PACKET sendto/recvfrom; each block has its SAFETY comment

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Sends one frame (destination MAC first) out of interface `ifindex` of the calling thread's
/// network namespace.
pub fn send(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: a plain syscall without pointers.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    send_on(&fd, ifindex, frame)
}

/// Sends one frame through the packet socket `fd`.
fn send_on(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    if frame.len() < 14 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an Ethernet frame has at least 14 bytes",
        ));
    }
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: u16::from_ne_bytes([frame[12], frame[13]]),
        sll_ifindex: i32::try_from(ifindex).unwrap_or(0),
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `addr` are valid for the lengths passed and outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A broadcast ARP request from `mac` claiming `sender`, asking for `target`.
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x08, 0x06]); // ARP
    f.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend(mac);
    f.extend(sender.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f
}

/// The RARP request a VMM broadcasts from a VM's MAC when the VM resumes after a live migration
/// (QEMU's `announce-self`): switches learn where the MAC is now.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x80, 0x35]); // RARP
    f.extend([0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
    f.extend(mac);
    f.extend([0; 4]);
    f.extend(mac);
    f.extend([0; 4]);
    f
}

/// An unsolicited neighbour advertisement (RFC 4861 7.2.6) for `ip` from `mac`, to all nodes,
/// with the override flag: IPv6's gratuitous ARP, sent after a migrated VM's port is activated.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    neighbour_advert(mac, ip, ip, &lladdr_option(2, mac))
}

/// A link-layer address option (RFC 4861 4.6.1) of kind 1 (source) or 2 (target).
pub fn lladdr_option(kind: u8, mac: [u8; 6]) -> [u8; 8] {
    let [a, b, c, d, e, f] = mac;
    [kind, 1, a, b, c, d, e, f]
}

/// A neighbour advertisement from `mac` and `src` to all nodes announcing `target`, with the
/// override flag (not solicited) and `options` as given: [`unsolicited_na`]'s, or a forged
/// one whose target or options are not the sender's.
pub fn neighbour_advert(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, options: &[u8]) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0]; // NA, checksum later, flags: override
    icmp.extend(target.octets());
    icmp.extend(options);
    icmpv6_multicast(mac, src, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), icmp)
}

/// A neighbour solicitation from `mac` and `src` (`::` for duplicate address detection) for
/// `target`, to the target's solicited-node multicast address, with `options` as given.
pub fn neighbour_solicit(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, options: &[u8]) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0]; // NS, checksum later, reserved
    icmp.extend(target.octets());
    icmp.extend(options);
    let t = target.octets();
    let dst = Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    icmpv6_multicast(mac, src, dst, icmp)
}

/// A router solicitation from `mac` and `src` to all routers, with `options` as given.
pub fn router_solicit(mac: [u8; 6], src: Ipv6Addr, options: &[u8]) -> Vec<u8> {
    let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0]; // RS, checksum later, reserved
    icmp.extend(options);
    icmpv6_multicast(mac, src, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), icmp)
}

/// A general MLD query (RFC 2710 3, the form every MLD version answers) from `mac` and
/// `src` to all nodes: what a multicast router sends.
pub fn mld_query(mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    // Query, checksum later, maximum response delay 1 s, reserved, the unspecified group.
    let mut icmp = vec![130, 0, 0, 0, 0x03, 0xe8, 0, 0];
    icmp.extend(Ipv6Addr::UNSPECIFIED.octets());
    icmpv6_multicast(mac, src, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), icmp)
}

/// The frame of ICMPv6 message `icmp` (its checksum field is filled in) from `mac` and `src`
/// to the multicast address `dst`, hop limit 255 as neighbour discovery requires.
fn icmpv6_multicast(mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = icmpv6_checksum(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let d = dst.octets();
    let mut f = vec![0x33, 0x33, d[12], d[13], d[14], d[15]];
    f.extend(mac);
    f.extend([0x86, 0xdd]); // IPv6
    f.extend([0x60, 0, 0, 0]);
    f.extend(u16::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    f.extend([58, 255]); // ICMPv6, hop limit 255
    f.extend(src.octets());
    f.extend(d);
    f.extend(icmp);
    f
}

/// The ICMPv6 checksum of `icmp` (its checksum field zero) between `src` and `dst`.
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0))
}

/// Is `frame` an ARP reply (or a gratuitous announcement) whose sender is `from`?
pub fn is_arp_reply_from(frame: &[u8], from: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[14..20] == [0, 1, 0x08, 0x00, 6, 4]
        && frame[21] == 2
        && frame[28..32] == from.octets()
}

/// Is `frame` a neighbour advertisement for `target` (IPv6 without extension headers, as
/// routers send them)?
pub fn is_na_for(frame: &[u8], target: Ipv6Addr) -> bool {
    frame.len() >= 78
        && frame[12..14] == [0x86, 0xdd]
        && frame[20] == 58
        && frame[54] == 136
        && frame[62..78] == target.octets()
}

/// Asks `target` for its MAC from interface `ifindex` (ARP request from `mac`/`sender`, resent
/// every 250 ms) and waits for its answer: `Ok(true)` when it answered within `timeout`. This is
/// how weft checks that the node still reaches its gateway after it moved the node's addresses
/// to a bridge: the kernel's own neighbour cache would answer from stale entries.
pub fn probe_arp(
    ifindex: u32,
    mac: [u8; 6],
    sender: Ipv4Addr,
    target: Ipv4Addr,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    let request = arp_request(mac, sender, target);
    probe(ifindex, 0x0806, &request, timeout, |f| {
        is_arp_reply_from(f, target)
    })
}

/// [`probe_arp`] for IPv6: a neighbour solicitation for `target` from `mac`/`src` (with the
/// source link-layer address option, so the router answers without a solicitation of its own)
/// and its neighbour advertisement.
pub fn probe_ndp(
    ifindex: u32,
    mac: [u8; 6],
    src: Ipv6Addr,
    target: Ipv6Addr,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    let request = neighbour_solicit(mac, src, target, &lladdr_option(1, mac));
    probe(ifindex, 0x86dd, &request, timeout, |f| is_na_for(f, target))
}

/// Sends `request` out of `ifindex` every 250 ms until a frame of `ethertype` that `answers`
/// arrives, for at most `timeout`.
fn probe(
    ifindex: u32,
    ethertype: u16,
    request: &[u8],
    timeout: std::time::Duration,
    answers: impl Fn(&[u8]) -> bool,
) -> std::io::Result<bool> {
    let proto = ethertype.to_be();
    let fd = bound_packet_socket(proto, proto, ifindex)?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: `tv` is a valid timeval for the length passed.
    if unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            send_on(&fd, ifindex, request)?;
            next_send = Instant::now() + Duration::from_millis(250);
        }
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if answers(&buf[..n]) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A packet socket (`AF_PACKET`, raw, close-on-exec) of protocol `socket_proto`, bound to
/// interface `ifindex` (0: every interface) for protocol `bind_proto` (both in network byte
/// order).
fn bound_packet_socket(
    socket_proto: u16,
    bind_proto: u16,
    ifindex: u32,
) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall without pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(socket_proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: bind_proto,
        sll_ifindex: i32::try_from(ifindex).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("interface index {ifindex} is out of range"),
            )
        })?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_ll for the length passed.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// `ETH_P_ALL` in network byte order, as `sll_protocol` takes it.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// The largest frame [`Capture`] keeps whole (longer ones are cut to this).
const CAPTURE_SNAPLEN: usize = 65_536;

/// A packet socket recording the frames that arrive on one interface. Open it before the
/// traffic starts (no frame that arrives after [`Capture::open`] is missed), then
/// [`Capture::collect`].
///
/// It counts as arriving whatever the interface receives, whoever it is addressed to: a
/// mirror's copies carry the original destination MAC and arrive as `PACKET_OTHERHOST`, and
/// are kept. Frames the namespace sends out of the interface (`PACKET_OUTGOING`) are not.
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
    ifindex: u32,
}

impl Capture {
    /// Opens the socket on interface `ifindex` of the calling thread's network namespace (it
    /// stays bound there whatever thread collects); `ifindex` 0 listens on every interface of
    /// the namespace (`lo` included). Needs `CAP_NET_RAW`.
    pub fn open(ifindex: u32) -> std::io::Result<Capture> {
        // Protocol 0: nothing is queued until `bind` names the interface, so no frame of
        // another interface slips in.
        let fd = bound_packet_socket(0, ETH_P_ALL_BE, ifindex)?;
        Ok(Capture { fd, ifindex })
    }

    /// The interface it listens on.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The frames that arrived since [`Capture::open`], waiting until `window` has passed
    /// since this call or `max` frames are in, whichever comes first; Ethernet header first.
    pub fn collect(self, window: Duration, max: usize) -> std::io::Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; CAPTURE_SNAPLEN];
        while frames.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up, so a last fraction of a millisecond is still waited for.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: `pfd` is one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                break;
            }
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is valid for writes of its length, `from` for `from_len` bytes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    std::ptr::from_mut(&mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = usize::try_from(n).unwrap_or(0);
            frames.push(buf[..n].to_vec());
        }
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_requests_are_laid_out_per_rfc826() {
        let f = arp_request(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 99),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "opcode request");
        assert_eq!(&f[28..32], &[10, 0, 0, 99]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert!(send(1, &f[..10]).is_err());
    }

    #[test]
    fn unsolicited_advertisements_carry_a_valid_checksum_and_the_target() {
        let ip: std::net::Ipv6Addr = "fd00:70::22".parse().unwrap();
        let mac = [0x56, 0x99, 0xc4, 0xcd, 0xf8, 0x2a];
        let f = unsolicited_na(mac, ip);
        assert_eq!(&f[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(&icmp[8..24], &ip.octets());
        assert_eq!(&icmp[26..32], &mac);
        // Summing with the checksum in place gives 0xffff (its complement: 0).
        let dst = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(icmpv6_checksum(&ip, &dst, icmp), 0);
    }

    #[test]
    fn solicitations_go_to_the_solicited_node_and_all_routers_groups() {
        let mac = [0x0a, 0x58, 10, 77, 0, 4];
        let target: Ipv6Addr = "fd77::1:2:3".parse().unwrap();
        let f = neighbour_solicit(mac, Ipv6Addr::UNSPECIFIED, target, &[]);
        assert_eq!(&f[..6], &[0x33, 0x33, 0xff, 0x02, 0, 0x03]);
        let dst: Ipv6Addr = "ff02::1:ff02:3".parse().unwrap();
        assert_eq!(&f[38..54], &dst.octets());
        assert_eq!(f[54], 135);
        assert_eq!(&f[62..78], &target.octets());
        assert_eq!(icmpv6_checksum(&Ipv6Addr::UNSPECIFIED, &dst, &f[54..]), 0);
        let src: Ipv6Addr = "fd77::4".parse().unwrap();
        let rs = router_solicit(mac, src, &lladdr_option(1, mac));
        assert_eq!(&rs[..6], &[0x33, 0x33, 0, 0, 0, 2]);
        assert_eq!(rs[54], 133);
        assert_eq!(&rs[62..], &lladdr_option(1, mac));
        let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
        assert_eq!(icmpv6_checksum(&src, &all_routers, &rs[54..]), 0);
    }

    #[test]
    fn only_replies_from_the_target_count() {
        let gw = Ipv4Addr::new(10, 0, 0, 1);
        let mut reply = arp_request([2, 0, 0, 0, 0, 9], gw, Ipv4Addr::new(10, 0, 0, 2));
        assert!(!is_arp_reply_from(&reply, gw), "a request is no answer");
        reply[21] = 2;
        assert!(is_arp_reply_from(&reply, gw));
        assert!(!is_arp_reply_from(&reply, Ipv4Addr::new(10, 0, 0, 3)));
        assert!(!is_arp_reply_from(&reply[..40], gw));
    }
}

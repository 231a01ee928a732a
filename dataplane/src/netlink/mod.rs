//! A small synchronous rtnetlink client: links (bridge, veth, VXLAN, tap lookup), addresses,
//! routes, bridge VLANs and the tc objects of port redirection, traffic mirroring and bandwidth
//! shaping.
//!
//! Messages are built with rtnetlink's builders (`default-features = false`: no runtime) and
//! sent over a blocking [`netlink_sys::Socket`] with a plain request/ACK loop, as netavark does.
//! Nothing here needs tokio: the CNI binary calls it directly, the agent from
//! `spawn_blocking`.
//!
//! A [`Netlink`] talks to the network namespace its socket was opened in, whatever thread
//! later uses it: [`Netlink::new`] binds to the calling thread's namespace,
//! [`Netlink::in_netns`] to another one (opened on a helper thread, see
//! [`crate::netns::run_in`]).
//!
//! This module holds the socket, its request/ACK loop and the errors; the operations live
//! beside their subject: links and bridge ports in `link`, addresses in `addr`, routes in
//! `route`, VLAN links and bridge VLANs in `vlan`, tc qdiscs and filters (port redirection and
//! mirrors) in `tc`, bandwidth shaping (token buckets, IFB links) in `shape`, VXLAN links in
//! `vxlan`. Their public items are re-exported here.

mod addr;
mod ifreq;
mod link;
mod route;
mod shape;
mod tc;
mod vlan;
mod vxlan;

pub use addr::AddrInfo;
pub use ifreq::LinkIndex;
pub use link::{
    CreatedVeth, FdbEntry, LinkInfo, LinkStats, VethSpec, bridge_safeguards_message,
    port_hairpin_message,
};
pub use route::{Family, RouteEntry, RouteInfo, RouteSpec, route_entry_message};
pub use shape::{
    IFB_MTU, QueueCounters, Rate, SHAPE_PREF, Shaping, ShapingCounters, SpareIfbs, is_spare_ifb,
};
pub use tc::{
    MAX_MIRRORS_PER_SIDE, MIRROR_PREF, MirrorCounter, MirrorRule, clsact_qdisc_message,
    ingress_qdisc_message, mirror_filter_message, redirect_filter_message,
};
pub use vlan::{
    bridge_vlan_filtering_message, port_vlans_dump_message, port_vlans_message, port_vlans_of,
    vlan_infos, vlan_message,
};
pub use vxlan::vxlan_message;

use crate::netns::{self, Netns, NetnsError};
use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use tracing::{debug, trace};

/// How often a dump that the kernel flags as inconsistent (`NLM_F_DUMP_INTR`) is retried.
const DUMP_ATTEMPTS: u32 = 5;

/// `NLMSGERR_ATTR_MSG`: the extended-ACK text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Netlink errors. Each names the operation (`op`, e.g. `"create veth"`) and what it was
/// about (`target`, e.g. `"weft1a2b3c (peer eth0)"`).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened, bound or configured.
    #[error("cannot open a netlink socket")]
    Open {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket for another namespace could not be opened there.
    #[error("cannot open a netlink socket in network namespace {path}")]
    OpenInNetns {
        /// The namespace.
        path: PathBuf,
        /// The cause ([`NetnsError::is_gone`] tells a vanished namespace).
        #[source]
        source: NetnsError,
    },
    /// The request could not be sent or the reply not received.
    #[error("{op} {target}: netlink socket I/O failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel's reply could not be decoded.
    #[error("{op} {target}: cannot decode the kernel's reply")]
    Decode {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// The kernel refused the request.
    #[error("{op} {target}: {}", describe_errno(.errno, .message))]
    Kernel {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The positive errno the kernel answered with.
        errno: i32,
        /// The kernel's extended-ACK message, when it gave one.
        message: Option<String>,
    },
    /// A dump kept changing while it was read.
    #[error("{op} {target}: the kernel's dump was interrupted {attempts} times in a row")]
    DumpInterrupted {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// How many times it was tried.
        attempts: u32,
    },
    /// The request was rejected before it was sent (a name too long, mixed address families…).
    #[error("{op} {target}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// Why.
        reason: String,
    },
    /// The kernel acknowledged creating a link that a lookup right after does not find.
    #[error("{op} {target}: the kernel acknowledged it but the link is not there")]
    Vanished {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
    },
}

fn describe_errno(errno: &i32, message: &Option<String>) -> String {
    let base = io::Error::from_raw_os_error(*errno);
    match message {
        Some(m) => format!("{base}: {m}"),
        None => base.to_string(),
    }
}

impl NetlinkError {
    /// The errno the kernel answered with, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True when the object (link, address, route, namespace) does not exist: `ENODEV`,
    /// `ENOENT`, `ESRCH` or `EADDRNOTAVAIL`.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// True when the object already exists (`EEXIST`), e.g. a link name is taken.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// True when the kernel lacks the feature (`EOPNOTSUPP`, or "Unknown device type" for a
    /// link kind whose module is not available).
    pub fn is_not_supported(&self) -> bool {
        matches!(self.errno(), Some(libc::EOPNOTSUPP))
            || matches!(self, NetlinkError::Kernel { message: Some(m), .. } if m.contains("Unknown device type"))
    }

    /// True when [`Netlink::in_netns`] failed because the namespace is gone.
    pub fn is_netns_gone(&self) -> bool {
        matches!(self, NetlinkError::OpenInNetns { source, .. } if source.is_gone())
    }
}

/// What went wrong inside [`Netlink::exchange`], before the operation's context is attached.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Decode(DecodeError),
    Kernel { errno: i32, message: Option<String> },
    Interrupted,
}

impl Failure {
    fn into_error(self, op: &'static str, target: String) -> NetlinkError {
        match self {
            Failure::Io(source) => NetlinkError::Io { op, target, source },
            Failure::Decode(source) => NetlinkError::Decode { op, target, source },
            Failure::Kernel { errno, message } => NetlinkError::Kernel {
                op,
                target,
                errno,
                message,
            },
            Failure::Interrupted => NetlinkError::DumpInterrupted {
                op,
                target,
                attempts: DUMP_ATTEMPTS,
            },
        }
    }
}

pub use crate::names::{format_mac, parse_mac};

/// Why `name` cannot be an interface name, if it cannot (the rule is [`crate::names::ifname_problem`]).
fn bad_ifname(name: &str) -> Option<String> {
    crate::names::ifname_problem(name).map(|why| format!("interface name {name:?}: {why}"))
}

fn check_ifname(op: &'static str, target: &str, name: &str) -> Result<(), NetlinkError> {
    match bad_ifname(name) {
        Some(reason) => Err(NetlinkError::Invalid {
            op,
            target: target.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Aligns a netlink message length to 4 bytes.
fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The extended-ACK message of an `NLMSG_ERROR` payload (after the error code).
fn ext_ack_message(outer_flags: u16, payload: &[u8]) -> Option<String> {
    if outer_flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // The payload starts with the request's header, then (unless capped) its body.
    let header_len = 16;
    let start = if outer_flags & NLM_F_CAPPED != 0 {
        header_len
    } else {
        let len = payload.get(..4)?;
        align4(u32::from_ne_bytes([len[0], len[1], len[2], len[3]]) as usize)
    };
    let mut tlvs = payload.get(start..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let value = &tlvs[4..len];
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            let text = String::from_utf8_lossy(text).trim().to_string();
            return (!text.is_empty()).then_some(text);
        }
        tlvs = tlvs.get(align4(len)..)?;
    }
    None
}

/// A blocking rtnetlink socket bound to one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    /// Where answers are received.
    rx: RxBuffer,
}

/// A receive buffer's first size; it grows to a datagram that did not fit (see
/// [`RxBuffer::receive`]).
const RX_BUFFER: usize = 64 * 1024;

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.socket.as_raw_fd())
            .field("seq", &self.seq)
            .finish()
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let open = |source| NetlinkError::Open { source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(open)?;
        // Best effort: the kernel's reason text on errors, and no echo of our request in them.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            rx: RxBuffer::default(),
        })
    }

    /// Opens a socket inside `ns` (on a helper thread; the caller's thread is not switched).
    /// The socket keeps talking to `ns` from whatever thread uses it.
    pub fn in_netns(ns: &Netns) -> Result<Netlink, NetlinkError> {
        netns::run_in(ns, Netlink::new).map_err(|source| NetlinkError::OpenInNetns {
            path: ns.path().to_path_buf(),
            source,
        })?
    }

    /// Opens a socket inside `ns` from the calling thread, which enters `ns` and comes back
    /// (no helper thread to start): for a process that runs on one thread, as the CNI plugin
    /// does. Never from a thread that runs async tasks: use [`Netlink::in_netns`] there. The
    /// process aborts if the thread cannot come back (see [`netns::enter`]).
    pub fn entering(ns: &Netns) -> Result<Netlink, NetlinkError> {
        let guard = netns::enter(ns).map_err(|source| NetlinkError::OpenInNetns {
            path: ns.path().to_path_buf(),
            source,
        })?;
        let opened = Netlink::new();
        drop(guard);
        opened
    }

    /// Sends one request and collects the kernel's answer.
    ///
    /// `flags` are the `NLM_F_*` request flags beyond `NLM_F_REQUEST` (always set) and
    /// `NLM_F_ACK` (set unless the request is a dump: a get with `NLM_F_DUMP`): e.g.
    /// `NLM_F_DUMP`, or `NLM_F_CREATE | NLM_F_EXCL`. Returns the data messages (the dump, or
    /// the reply of a get); an empty vector for a plain ACK. A kernel refusal is
    /// [`NetlinkError::Kernel`]. A dump the kernel flags as inconsistent (`NLM_F_DUMP_INTR`)
    /// is retried a few times.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let op = "netlink request";
        let target = format!("(message type {})", msg.message_type());
        self.exchange(msg, flags)
            .map_err(|f| f.into_error(op, target))
    }

    /// [`Netlink::request`] with the operation's context attached to errors.
    fn call(
        &mut self,
        op: &'static str,
        target: impl FnOnce() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.exchange(msg, flags)
            .map_err(|f| f.into_error(op, target()))
    }

    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        // Like the kernel: a get (`RTM_GET*`, kind 2 of 4) with NLM_F_ROOT or NLM_F_MATCH is a
        // dump. The same bits mean REPLACE/EXCL on a new or delete request.
        let dump = msg.message_type() & 3 == 2 && flags & NLM_F_DUMP != 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.exchange_once(msg.clone(), flags, dump) {
                Err(Failure::Interrupted) if attempt < DUMP_ATTEMPTS => {
                    debug!(attempt, "netlink dump interrupted; retrying");
                }
                other => return other,
            }
        }
    }

    fn exchange_once(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet = NetlinkMessage::from(msg);
        packet.header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        packet.header.sequence_number = seq;
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        trace!(seq, len = buf.len(), "netlink send");
        loop {
            match self.socket.send(&buf, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            }
        }

        let mut out = Vec::new();
        let mut interrupted = false;
        let mut decode_error = None;
        loop {
            self.receive(dump)?;
            let data = self.rx.data();
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let header = NetlinkBuffer::new_checked(bytes).map_err(Failure::Decode)?;
                let len = header.length() as usize;
                let (msg_seq, msg_flags) = (header.sequence_number(), header.flags());
                if len == 0 {
                    break;
                }
                offset += align4(len);
                if msg_seq != seq {
                    // A leftover of an earlier request that failed half-way.
                    trace!(msg_seq, seq, "skipping stale netlink message");
                    continue;
                }
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let parsed = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        // Keep reading to the end of the answer so the socket stays clean.
                        decode_error.get_or_insert(e);
                        continue;
                    }
                };
                match parsed.payload {
                    NetlinkPayload::Done(done) => {
                        if done.code != 0 {
                            return Err(Failure::Kernel {
                                errno: done.code.abs(),
                                message: None,
                            });
                        }
                        return finish(out, interrupted, decode_error);
                    }
                    NetlinkPayload::Error(err) => match err.code {
                        None => return finish(out, interrupted, decode_error),
                        Some(code) => {
                            return Err(Failure::Kernel {
                                errno: code.get().abs(),
                                message: ext_ack_message(msg_flags, &err.header),
                            });
                        }
                    },
                    // A get without a dump answers with its reply, then the ACK.
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Noop => {}
                    NetlinkPayload::Overrun(_) => {
                        return Err(Failure::Io(io::Error::other("netlink overrun")));
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Netlink {
    /// Receives one datagram into the socket's buffer ([`RxBuffer`]). A datagram larger than
    /// the buffer is retried when it was a dump's ([`Failure::Interrupted`]; the rest of the
    /// old dump is skipped by its sequence number) and fails otherwise.
    fn receive(&mut self, dump: bool) -> Result<(), Failure> {
        match self.rx.receive(&self.socket) {
            Ok(Received::Truncated { .. }) if dump => Err(Failure::Interrupted),
            Ok(received) => received.whole().map_err(Failure::Io),
            Err(e) => Err(Failure::Io(e)),
        }
    }
}

/// Where a netlink socket receives: one buffer for the socket's life, so an answer costs one
/// `recv` a datagram and no allocation (netlink-sys's `recv_from_full` peeks, then reads into
/// a new buffer). The kernel sizes a dump's datagrams to at most 32 KiB, and a single answer
/// to its message.
#[derive(Debug, Default)]
pub(crate) struct RxBuffer(Vec<u8>);

/// What [`RxBuffer::receive`] got.
pub(crate) enum Received {
    /// The datagram, whole, in the buffer.
    Whole,
    /// A datagram of `len` bytes, lost in part (the buffer had `capacity`); the buffer has
    /// grown to its size for the next one.
    Truncated { len: usize, capacity: usize },
}

impl Received {
    /// `Ok` for a whole datagram; an error naming both sizes for one that did not fit.
    pub(crate) fn whole(self) -> io::Result<()> {
        match self {
            Received::Whole => Ok(()),
            Received::Truncated { len, capacity } => Err(io::Error::other(format!(
                "the kernel's answer ({len} bytes) was larger than the receive buffer ({capacity} bytes)"
            ))),
        }
    }
}

impl RxBuffer {
    /// Receives one datagram from `socket` (retrying an interrupted call).
    pub(crate) fn receive(&mut self, socket: &Socket) -> io::Result<Received> {
        if self.0.capacity() < RX_BUFFER {
            self.0.reserve_exact(RX_BUFFER);
        }
        loop {
            self.0.clear();
            let capacity = self.0.capacity();
            match socket.recv(&mut self.0, libc::MSG_TRUNC) {
                Ok(len) if len <= capacity => return Ok(Received::Whole),
                Ok(len) => {
                    self.0.reserve_exact(len);
                    return Ok(Received::Truncated { len, capacity });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The datagram received last.
    pub(crate) fn data(&self) -> &[u8] {
        &self.0
    }
}

fn finish(
    out: Vec<RouteNetlinkMessage>,
    interrupted: bool,
    decode_error: Option<DecodeError>,
) -> Result<Vec<RouteNetlinkMessage>, Failure> {
    if let Some(e) = decode_error {
        return Err(Failure::Decode(e));
    }
    if interrupted {
        return Err(Failure::Interrupted);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let mac = [0x02, 0xab, 0x00, 0x10, 0xfe, 0x7f];
        assert_eq!(format_mac(mac), "02:ab:00:10:fe:7f");
        assert_eq!(parse_mac("02:ab:00:10:fe:7f"), Some(mac));
        assert_eq!(parse_mac("02:AB:00:10:FE:7F"), Some(mac));
        assert_eq!(parse_mac("02-ab-00-10-fe-7f"), Some(mac));
    }

    #[test]
    fn bad_macs_are_rejected() {
        for bad in [
            "",
            "02:ab:00:10:fe",
            "02:ab:00:10:fe:7f:00",
            "2:ab:00:10:fe:7f",
            "02:ab:00:10:fe:7g",
            "02ab0010fe7f",
            "02:ab-00:10:fe:7f",
            "+2:ab:00:10:fe:7f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(bad_ifname("eth0").is_none());
        assert!(bad_ifname("weft-0123456789").is_none());
        assert!(bad_ifname("weft-01234567890").is_some());
        assert!(bad_ifname("").is_some());
        assert!(bad_ifname("a/b").is_some());
        assert!(bad_ifname("a b").is_some());
    }

    #[test]
    fn kernel_errors_classify() {
        let e = |errno| NetlinkError::Kernel {
            op: "x",
            target: String::new(),
            errno,
            message: None,
        };
        assert!(e(libc::ENODEV).is_not_found());
        assert!(e(libc::ESRCH).is_not_found());
        assert!(e(libc::EADDRNOTAVAIL).is_not_found());
        assert!(!e(libc::EEXIST).is_not_found());
        assert!(e(libc::EEXIST).is_exists());
    }

    #[test]
    fn kernel_error_message_includes_ext_ack() {
        let e = NetlinkError::Kernel {
            op: "create veth",
            target: "a (peer b)".into(),
            errno: libc::EOPNOTSUPP,
            message: Some("Unknown device type".into()),
        };
        let s = e.to_string();
        assert!(s.starts_with("create veth a (peer b): "), "{s}");
        assert!(s.ends_with(": Unknown device type"), "{s}");
    }

    #[test]
    fn ext_ack_text_is_found_after_a_capped_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Unknown device type\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        assert_eq!(
            ext_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &payload), None);
    }

    /// Serializes `msg` as the request the socket sends and decodes it back, as the kernel
    /// would read it.
    pub(super) fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut packet = NetlinkMessage::from(msg);
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("not a route message: {other:?}"),
        }
    }
}

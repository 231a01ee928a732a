//! Audit records: the policy rules with `log: true` and every drop decided by a default (a
//! namespace policy's isolation, a Network's `defaultAction: Deny`) carry an nftables `log`
//! statement to NFLOG group [`LOG_GROUP`] with a prefix naming the rule (`weft r<id> <verdict>`)
//! or the stage (`weft default-eg deny`). The agent reads that group over netlink and writes one
//! JSON line per packet: time, node, source and destination workload and address, protocol, port,
//! policy, rule, verdict.

use crate::policy::{Compiled, Direction};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigFlags, ConfigMode, PacketNla, Timeout, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::policy::render::LOG_GROUP;

/// One audit record (a JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// RFC 3339 time.
    pub time: String,
    /// The node.
    pub node: String,
    /// `accept`, `deny` or `pass`.
    pub verdict: String,
    /// `ingress` or `egress` (whose policy decided).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `ClusterSegmentationPolicy name` or `SegmentationPolicy namespace/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The rule's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For a default: what decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source workload (`namespace/name`), when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<String>,
    /// Destination workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<String>,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    /// Destination port (TCP, UDP, SCTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a log prefix says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefix {
    /// A rule of a policy.
    Rule {
        /// Its id in the compilation.
        id: u32,
        /// `accept`, `deny`, `pass`.
        verdict: String,
    },
    /// A stage's default: `isolated-in`, `isolated-eg`, `default-in`, `default-eg`.
    Stage {
        /// The stage.
        stage: String,
        /// The verdict.
        verdict: String,
    },
}

/// Parses `weft r12 deny ` or `weft default-eg deny `.
pub fn parse_prefix(prefix: &str) -> Option<Prefix> {
    let mut parts = prefix.split_whitespace();
    if parts.next()? != "weft" {
        return None;
    }
    let what = parts.next()?;
    let verdict = parts.next()?.to_string();
    if let Some(id) = what.strip_prefix('r').and_then(|n| n.parse().ok()) {
        return Some(Prefix::Rule { id, verdict });
    }
    Some(Prefix::Stage {
        stage: what.to_string(),
        verdict,
    })
}

/// Builds the record of one logged packet (its IP header first), or `None` when the prefix is
/// not weft's or the payload is not an IP packet.
pub fn record(
    compiled: &Compiled,
    node: &str,
    time: String,
    prefix: &str,
    payload: &[u8],
) -> Option<AuditRecord> {
    let prefix = parse_prefix(prefix)?;
    let packet = etherparse::SlicedPacket::from_ip(payload).ok()?;
    let (src, dst, proto): (IpAddr, IpAddr, u8) = match &packet.net {
        Some(etherparse::NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.header().protocol().0,
        ),
        Some(etherparse::NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload().ip_number.0,
        ),
        _ => return None,
    };
    let port = match &packet.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => Some(t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => Some(u.destination_port()),
        // SCTP: the destination port is the second 16-bit word of its common header.
        _ if proto == 132 => packet
            .ip_payload()
            .and_then(|p| p.payload.get(2..4))
            .map(|b| u16::from_be_bytes([b[0], b[1]])),
        _ => None,
    };
    let protocol = weft_crds::L4Protocol::from_number(proto)
        .map_or_else(|| proto.to_string(), |p| p.nft_name().to_string());
    let owner = |ip: &IpAddr| compiled.owners.get(ip).map(|o| o.1.clone());
    let mut rec = AuditRecord {
        time,
        node: node.to_string(),
        verdict: String::new(),
        direction: None,
        policy: None,
        rule: None,
        reason: None,
        src,
        dst,
        src_workload: owner(&src),
        dst_workload: owner(&dst),
        protocol,
        port,
    };
    match prefix {
        Prefix::Rule { id, verdict } => {
            rec.verdict = verdict;
            if let Some((dir, r)) = compiled.rule_with_direction(id) {
                rec.direction = Some(dir);
                rec.policy = Some(format!("{} {}", r.origin.kind, r.origin.policy));
                rec.rule = Some(r.origin.rule.clone());
            }
        }
        Prefix::Stage { stage, verdict } => {
            rec.verdict = verdict;
            let (what, dir) = stage.split_once('-').unwrap_or((stage.as_str(), ""));
            rec.direction = match dir {
                "in" => Some(Direction::Ingress),
                "eg" => Some(Direction::Egress),
                _ => None,
            };
            rec.reason = Some(match what {
                "isolated" => {
                    "isolated by a SegmentationPolicy of its namespace; no Allow rule matches"
                        .into()
                }
                "default" => {
                    "no policy decides; the Network's security.defaultAction is Deny".into()
                }
                "bruteforce" => {
                    "more new connections to the port than its PortForward's spec.bruteForce allows: the source is banned from it for spec.bruteForce.banSeconds".into()
                }
                other => other.to_string(),
            });
        }
    }
    Some(rec)
}

/// The policy the reader names rules from, swapped by the agent after each reconcile.
pub type SharedPolicy = Arc<Mutex<Arc<Compiled>>>;

/// Audit counters by verdict (exported in the agent's status).
pub type Counters = Arc<Mutex<BTreeMap<String, u64>>>;

fn send(
    socket: &netlink_sys::Socket,
    msg: NetlinkMessage<NetfilterMessage>,
) -> std::io::Result<()> {
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;
    let mut reply = vec![0; 4096];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&reply[..n])
        .map_err(|e| std::io::Error::other(format!("nflog config reply: {e}")))?;
    if let NetlinkPayload::Error(e) = msg.payload
        && let Some(code) = e.code
    {
        return Err(std::io::Error::from_raw_os_error(-code.get()));
    }
    Ok(())
}

/// The receive buffer the reader asks for (the kernel doubles it): room for a burst of logged
/// packets (each message up to 256 bytes of the packet and its attributes, batched by the
/// kernel) while the reader writes records.
pub const RECEIVE_BUFFER: usize = 4 << 20;

/// Binds NFLOG group [`LOG_GROUP`] in the current network namespace, with a receive buffer of
/// [`RECEIVE_BUFFER`].
pub fn bind() -> std::io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::constants::NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    enlarge_receive_buffer(&socket);
    let timeout: Timeout = Duration::from_millis(100).into();
    send(
        &socket,
        config_request(
            NetfilterProtoFamily::Unspec,
            LOG_GROUP,
            vec![
                ConfigCmd::Bind.into(),
                ConfigFlags::SEQ_GLOBAL.into(),
                ConfigMode::new_packet(256).into(),
                timeout.into(),
            ],
        ),
    )?;
    Ok(socket)
}

/// Raises the socket's receive buffer to [`RECEIVE_BUFFER`]: past `net.core.rmem_max` with
/// `SO_RCVBUFFORCE` (the agent runs with `CAP_NET_ADMIN`), else up to it with `SO_RCVBUF`.
/// The default (`net.core.rmem_default`, a few hundred kilobytes) overruns in a burst of drops
/// logged by policy.
fn enlarge_receive_buffer(socket: &netlink_sys::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(forced) = setsockopt(socket, sockopt::RcvBufForce, &RECEIVE_BUFFER) {
        match setsockopt(socket, sockopt::RcvBuf, &RECEIVE_BUFFER) {
            Ok(()) => tracing::info!(
                error = %forced,
                "the audit socket's receive buffer is capped by net.core.rmem_max (SO_RCVBUFFORCE refused)"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot raise the audit socket's receive buffer; a burst of logged packets may lose records"
            ),
        }
    }
}

/// How long the reader waits after a failed read before the next: at first, and at most
/// (doubling in between, back to the first after a read that worked).
const BACK_OFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// At most one warning about overruns in this long (the metric counts every one).
const OVERRUN_WARNINGS: Duration = Duration::from_secs(60);

/// What a failed read means to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `ENOBUFS`: the socket overran, the kernel dropped messages; the socket reads on.
    Overrun,
    /// `EINTR`: read again.
    Interrupted,
    /// The socket is gone (`EBADF`, `ENOTSOCK`): nothing more to read.
    Gone,
    /// Anything else: read again after a back-off.
    Other,
}

impl Failure {
    fn of(e: &std::io::Error) -> Failure {
        use nix::errno::Errno;
        match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOBUFS) => Failure::Overrun,
            Some(Errno::EINTR) => Failure::Interrupted,
            Some(Errno::EBADF | Errno::ENOTSOCK) => Failure::Gone,
            _ => Failure::Other,
        }
    }
}

/// Where the reader takes the group's messages from: the bound socket, or a test's stand-in.
pub trait Receive {
    /// Receives one datagram (one or more netlink messages) into `buf`; its length.
    fn receive(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Receive for netlink_sys::Socket {
    fn receive(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.recv(&mut &mut buf[..], 0)
    }
}

/// The audit reader: what it makes of the group's messages.
pub struct Reader {
    /// The node, named in every record.
    pub node: String,
    /// The policy it names rules from.
    pub compiled: SharedPolicy,
    /// Where the records go.
    pub out: super::anomaly::Sink,
    /// The records written, by verdict.
    pub counters: Counters,
    /// A pending port's logged announcement ([`super::guard::ACTIVATE_PREFIX`]) goes here,
    /// with the index of the port it arrived on.
    pub on_activate: Box<dyn Fn(u32) + Send>,
    /// Times the socket overran (`ENOBUFS`): the kernel dropped messages the reader had no
    /// room for, records and announcements lost.
    pub overruns: prometheus_client::metrics::counter::Counter,
    /// The workload (`namespace/name`) whose host port has this index, if any: a logged copy
    /// of a broadcast or multicast names its receiver by the bridge port it was leaving by.
    pub receiver: Box<dyn Fn(u32) -> Option<String> + Send>,
}

impl Reader {
    /// Reads the group (a dedicated thread) until its socket is gone. An overrun (a burst
    /// faster than the reader: the kernel dropped what the socket had no room for) is counted,
    /// warned about at most once a minute, and reading goes on; another failed read is tried
    /// again after a back-off.
    pub fn run(self, mut source: impl Receive) {
        let mut buf = vec![0; 65536];
        let mut back_off = BACK_OFF.0;
        // Overruns since the last warning, and when that was.
        let mut unwarned = 0u64;
        let mut warned: Option<std::time::Instant> = None;
        loop {
            let e = match source.receive(&mut buf) {
                Ok(n) => {
                    back_off = BACK_OFF.0;
                    self.messages(buf.get(..n).unwrap_or_default());
                    continue;
                }
                Err(e) => e,
            };
            match Failure::of(&e) {
                Failure::Overrun => {
                    self.overruns.inc();
                    unwarned += 1;
                    if warned.is_none_or(|w| w.elapsed() >= OVERRUN_WARNINGS) {
                        tracing::warn!(
                            overruns = unwarned,
                            "the audit socket overran: logged packets were lost without records (weft_agent_audit_overruns_total counts them); reading on"
                        );
                        unwarned = 0;
                        warned = Some(std::time::Instant::now());
                    }
                }
                Failure::Interrupted => {}
                Failure::Gone => {
                    tracing::warn!(error = %e, "the audit socket is gone; audit stopped");
                    return;
                }
                Failure::Other => {
                    tracing::warn!(error = %e, retry_in = ?back_off, "reading audit records failed; trying again");
                    std::thread::sleep(back_off);
                    back_off = (back_off * 2).min(BACK_OFF.1);
                }
            }
        }
    }

    /// Handles one datagram's messages.
    fn messages(&self, buf: &[u8]) {
        let n = buf.len();
        let mut offset = 0;
        while offset < n {
            let Ok(msg) = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[offset..n]) else {
                break;
            };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = &msg.payload
            {
                self.packet(nlas);
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }

    /// Handles one logged packet: an announcement, or a record.
    fn packet(&self, nlas: &[PacketNla]) {
        let prefix = nlas.iter().find_map(|n| match n {
            PacketNla::Prefix(p) => Some(p.to_string_lossy().into_owned()),
            _ => None,
        });
        let payload = nlas.iter().find_map(|n| match n {
            PacketNla::Payload(p) => Some(p.as_slice()),
            _ => None,
        });
        if prefix.as_deref().map(str::trim) == Some(super::guard::ACTIVATE_PREFIX.trim()) {
            // Logged in the bridge family, the port is the physical input device (the input
            // device is the bridge) when br_netfilter is loaded.
            let physical = nlas.iter().find_map(|n| match n {
                PacketNla::IfIndexPhysInDev(i) => Some(*i),
                _ => None,
            });
            let input = nlas.iter().find_map(|n| match n {
                PacketNla::IfIndexInDev(i) => Some(*i),
                _ => None,
            });
            if let Some(port) = physical.or(input) {
                (self.on_activate)(port);
            }
            return;
        }
        let (Some(prefix), Some(payload)) = (prefix, payload) else {
            return;
        };
        let time = jiff::Timestamp::now().to_string();
        let current = self.compiled.lock().map(|c| Arc::clone(&c)).ok();
        let Some(mut rec) = current.and_then(|c| record(&c, &self.node, time, &prefix, payload))
        else {
            return;
        };
        // A destination that names no workload (a copy of a broadcast or multicast, judged as
        // the ingress of the workload whose bridge port it was leaving by): the workload of
        // that port (br_netfilter's physical output device) is the receiver.
        if rec.dst_workload.is_none() {
            rec.dst_workload = nlas
                .iter()
                .find_map(|n| match n {
                    PacketNla::IfIndexPhysOutDev(i) => Some(*i),
                    _ => None,
                })
                .and_then(|port| (self.receiver)(port));
        }
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(rec.verdict.clone()).or_default() += 1;
        }
        if let (Ok(mut line), Ok(mut out)) = (serde_json::to_vec(&rec), self.out.lock()) {
            line.push(b'\n');
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP SYN from 192.168.50.1 to 10.0.0.2 port 22.
    fn ssh_syn() -> Vec<u8> {
        let mut payload = Vec::new();
        etherparse::PacketBuilder::ipv4([192, 168, 50, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 22, 1, 1000)
            .syn()
            .write(&mut payload, &[])
            .unwrap();
        payload
    }

    #[test]
    fn prefixes_parse() {
        assert_eq!(
            parse_prefix("weft r12 deny "),
            Some(Prefix::Rule {
                id: 12,
                verdict: "deny".into()
            })
        );
        assert_eq!(
            parse_prefix("weft default-eg deny "),
            Some(Prefix::Stage {
                stage: "default-eg".into(),
                verdict: "deny".into()
            })
        );
        assert_eq!(parse_prefix("other r1 deny"), None);
    }

    /// A test's writer whose lines stay readable.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Hands out its datagrams and errors in order, then fails as a closed socket does.
    struct Script(std::collections::VecDeque<std::io::Result<Vec<u8>>>);

    impl Receive for Script {
        fn receive(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.pop_front() {
                Some(Ok(d)) => {
                    buf[..d.len()].copy_from_slice(&d);
                    Ok(d.len())
                }
                Some(Err(e)) => Err(e),
                None => Err(std::io::Error::from_raw_os_error(nix::libc::EBADF)),
            }
        }
    }

    /// One NFLOG packet message as the kernel sends it.
    fn logged(nlas: Vec<PacketNla>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(
            Default::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                netlink_packet_netfilter::NetfilterHeader::new(
                    NetfilterProtoFamily::Inet,
                    0,
                    LOG_GROUP,
                ),
                ULogMessage::Packet(nlas),
            )),
        );
        msg.finalize();
        let mut buf = vec![0; msg.header.length as usize];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn the_reader_goes_on_after_an_overrun_and_a_failed_read() {
        let payload = ssh_syn();
        let denied = logged(vec![
            PacketNla::Prefix(std::ffi::CString::new("weft default-in deny ").unwrap()),
            PacketNla::Payload(payload),
        ]);
        let announced = logged(vec![
            PacketNla::Prefix(
                std::ffi::CString::new(super::super::guard::ACTIVATE_PREFIX).unwrap(),
            ),
            PacketNla::IfIndexInDev(7),
        ]);
        let os = std::io::Error::from_raw_os_error;
        let lines = Lines::default();
        let activated = Arc::new(Mutex::new(Vec::new()));
        let reader = Reader {
            node: "node-a".into(),
            compiled: SharedPolicy::default(),
            out: Arc::new(Mutex::new(Box::new(lines.clone()))),
            counters: Counters::default(),
            on_activate: Box::new({
                let activated = Arc::clone(&activated);
                move |port| activated.lock().unwrap().push(port)
            }),
            overruns: Default::default(),
            receiver: Box::new(|port| (port == 7).then(|| "default/guarded".to_string())),
        };
        let (counters, overruns) = (Arc::clone(&reader.counters), reader.overruns.clone());
        // A burst overran the socket, then a record; a read that failed otherwise, then an
        // announcement and another overrun and record; then the socket is gone.
        reader.run(Script(
            [
                Err(os(nix::libc::ENOBUFS)),
                Ok(denied.clone()),
                Err(os(nix::libc::ENOMEM)),
                Ok(announced),
                Err(os(nix::libc::ENOBUFS)),
                Ok(denied),
            ]
            .into(),
        ));
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains(r#""verdict":"deny""#), "{text}");
        assert_eq!(counters.lock().unwrap().get("deny"), Some(&2));
        assert_eq!(*activated.lock().unwrap(), [7]);
        assert_eq!(overruns.get(), 2);
    }

    #[test]
    fn a_logged_copy_names_the_workload_of_the_port_it_was_leaving_by() {
        // A UDP broadcast from 10.0.0.9 to port 5355 (checksums are not read).
        let mut broadcast = vec![
            0x45, 0, 0, 29, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 9, 255, 255, 255, 255,
        ];
        broadcast.extend([0x30, 0x39, 0x14, 0xeb, 0, 9, 0, 0, b'x']);
        let copy = |port: u32| {
            logged(vec![
                PacketNla::Prefix(std::ffi::CString::new("weft default-in deny ").unwrap()),
                PacketNla::IfIndexPhysOutDev(port),
                PacketNla::Payload(broadcast.clone()),
            ])
        };
        let lines = Lines::default();
        let reader = Reader {
            node: "node-a".into(),
            compiled: SharedPolicy::default(),
            out: Arc::new(Mutex::new(Box::new(lines.clone()))),
            counters: Counters::default(),
            on_activate: Box::new(|_| {}),
            overruns: Default::default(),
            receiver: Box::new(|port| (port == 7).then(|| "default/guarded".to_string())),
        };
        // The copy out of workload port 7, then one out of a port that is no workload's.
        reader.run(Script([Ok(copy(7)), Ok(copy(8))].into()));
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 2, "{text}");
        assert_eq!(records[0]["dst"], "255.255.255.255");
        assert_eq!(records[0]["dstWorkload"], "default/guarded");
        assert_eq!(records[0]["port"], 5355);
        assert!(records[1].get("dstWorkload").is_none(), "{text}");
    }

    #[test]
    fn a_logged_tcp_packet_becomes_a_record_naming_policy_and_workloads() {
        use crate::model::{Resources, parse_manifests};
        let mut res = Resources::default();
        parse_manifests(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: net}
spec: {mode: NAT, subnets: [10.0.0.0/24]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: no-ssh}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress: [{name: ssh, action: Deny, protocols: [{protocol: TCP, port: 22}], log: true}]
"#,
            "t",
            &mut res,
        );
        let members = vec![crate::policy::Member {
            namespace: "default".into(),
            name: "db".into(),
            labels: Default::default(),
            network: "net".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            local: true,
            port: None,
        }];
        let c = crate::policy::compile_resources(&res, &members);
        let id = c.ingress.admin[0].id;
        let payload = ssh_syn();
        let rec = record(
            &c,
            "node-a",
            "t".into(),
            &format!("weft r{id} deny "),
            &payload,
        )
        .unwrap();
        assert_eq!(rec.verdict, "deny");
        assert_eq!(rec.direction, Some(Direction::Ingress));
        assert_eq!(
            rec.policy.as_deref(),
            Some("ClusterSegmentationPolicy no-ssh")
        );
        assert_eq!(rec.rule.as_deref(), Some("ssh"));
        assert_eq!(rec.dst_workload.as_deref(), Some("default/db"));
        assert_eq!(rec.src_workload, None);
        assert_eq!(rec.protocol, "tcp");
        assert_eq!(rec.port, Some(22));
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["dstWorkload"], "default/db");
        assert!(record(&c, "n", "t".into(), "weft r1 deny", &[1, 2, 3]).is_none());
    }
}

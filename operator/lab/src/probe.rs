//! Echo listeners and probes with real packets, each socket created inside the namespace it
//! belongs to (the socket stays there; the thread that serves it does not need to).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use weft_dataplane::netns::{self, Netns};

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The target answered: who it is and which source address it saw.
    Answered {
        /// The answering host's lab name.
        by: String,
        /// The source address the listener saw.
        seen: IpAddr,
    },
    /// An echo reply came back from this address (an `icmp` probe).
    Echoed(IpAddr),
    /// Connection refused (a RST or ICMP unreachable came back).
    Refused,
    /// Nothing came back in time.
    Timeout,
    /// The source has no route to the target (a private subnet seen from outside it).
    Unreachable(String),
    /// The probe could not be sent (no route, …).
    Error(String),
}

impl ProbeResult {
    /// Did the target answer?
    pub fn allowed(&self) -> bool {
        matches!(self, ProbeResult::Answered { .. } | ProbeResult::Echoed(_))
    }

    /// A short description.
    pub fn describe(&self) -> String {
        match self {
            ProbeResult::Answered { by, seen } => format!("answered by {by}, saw {seen}"),
            ProbeResult::Echoed(from) => format!("echo reply from {from}"),
            ProbeResult::Refused => "refused".into(),
            ProbeResult::Timeout => "no answer (dropped)".into(),
            ProbeResult::Unreachable(e) => format!("unreachable: {e}"),
            ProbeResult::Error(e) => format!("error: {e}"),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    }
}

/// Keeps listener threads alive; they stop when it is dropped.
#[derive(Debug, Default)]
pub struct Listeners {
    stop: Arc<AtomicBool>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Listeners {
    /// Starts a dual-stack echo listener in `ns` answering `weft-lab <name> <source>`.
    pub fn start(&self, ns: &Netns, name: &str, port: u16, udp: bool) -> anyhow::Result<()> {
        let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
        let stop = self.stop.clone();
        let name = name.to_string();
        if udp {
            let sock = netns::run_in(ns, move || UdpSocket::bind(addr))??;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let reply = format!("weft-lab {name} {}\n", canonical(peer.ip()));
                        let _ = sock.send_to(reply.as_bytes(), peer);
                    }
                }
            });
        } else {
            let listener = netns::run_in(ns, move || TcpListener::bind(addr))??;
            listener.set_nonblocking(true)?;
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let name = name.clone();
                            std::thread::spawn(move || {
                                let mut line = String::new();
                                let _ = BufReader::new(&s).read_line(&mut line);
                                let reply = format!("weft-lab {name} {}\n", canonical(peer.ip()));
                                let _ = s.write_all(reply.as_bytes());
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Ok(())
    }
}

fn parse_reply(line: &str) -> Option<ProbeResult> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "weft-lab" {
        return None;
    }
    let by = parts.next()?.to_string();
    let seen: IpAddr = parts.next()?.parse().ok()?;
    Some(ProbeResult::Answered { by, seen })
}

/// Probes `target:port` from inside `ns`.
pub fn probe(ns: &Netns, target: IpAddr, port: u16, udp: bool, timeout: Duration) -> ProbeResult {
    probe_from(ns, None, target, port, udp, timeout)
}

/// A TCP connection from `source` (any port), or from the kernel's choice.
fn connect(
    source: Option<IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Probes `target:port` from inside `ns`, from the address `source` if given (which must be
/// one of the namespace's own addresses).
pub fn probe_from(
    ns: &Netns,
    source: Option<IpAddr>,
    target: IpAddr,
    port: u16,
    udp: bool,
    timeout: Duration,
) -> ProbeResult {
    probe_addr(ns, source, SocketAddr::new(target, port), udp, timeout)
}

/// Probes `addr` (with its scope, for a link-local address) from inside `ns`, from the address
/// `source` if given.
pub fn probe_addr(
    ns: &Netns,
    source: Option<IpAddr>,
    addr: SocketAddr,
    udp: bool,
    timeout: Duration,
) -> ProbeResult {
    if udp {
        let bind: SocketAddr = match source {
            Some(s) => (s, 0).into(),
            None if addr.is_ipv4() => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            None => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = match netns::run_in(ns, move || UdpSocket::bind(bind)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(&e),
            Err(e) => return ProbeResult::Error(e.to_string()),
        };
        if let Err(e) = sock.connect(addr) {
            return failed(&e);
        }
        let _ = sock.set_read_timeout(Some(timeout / 3));
        let mut buf = [0u8; 512];
        // UDP may lose the first datagram while neighbours resolve: try three times.
        for _ in 0..3 {
            if let Err(e) = sock.send(b"probe\n") {
                return match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => ProbeResult::Refused,
                    _ => failed(&e),
                };
            }
            match sock.recv(&mut buf) {
                Ok(n) => {
                    return parse_reply(&String::from_utf8_lossy(&buf[..n]))
                        .unwrap_or_else(|| ProbeResult::Error("unexpected reply".into()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return ProbeResult::Refused;
                }
                Err(_) => continue,
            }
        }
        ProbeResult::Timeout
    } else {
        let stream = match netns::run_in(ns, move || connect(source, addr, timeout)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => ProbeResult::Refused,
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                        ProbeResult::Timeout
                    }
                    _ if e.raw_os_error() == Some(libc_ehostunreach()) => ProbeResult::Timeout,
                    _ => failed(&e),
                };
            }
            Err(e) => return ProbeResult::Error(e.to_string()),
        };
        let _ = stream.set_read_timeout(Some(timeout));
        let mut s = &stream;
        if let Err(e) = s.write_all(b"probe\n") {
            return ProbeResult::Error(e.to_string());
        }
        let mut line = String::new();
        match BufReader::new(&stream).read_line(&mut line) {
            Ok(n) if n > 0 => parse_reply(&line)
                .unwrap_or_else(|| ProbeResult::Error(format!("unexpected reply {line:?}"))),
            Ok(_) => ProbeResult::Error("connection closed without a reply".into()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => ProbeResult::Refused,
            Err(_) => ProbeResult::Timeout,
        }
    }
}

/// Sends echo requests (ICMP, or ICMPv6 to an IPv6 target) from inside `ns` to `target` and
/// waits for an echo reply from it.
pub fn ping(ns: &Netns, target: IpAddr, timeout: Duration) -> ProbeResult {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = target.is_ipv6();
    let socket = netns::run_in(ns, move || {
        if v6 {
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        } else {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        }
    });
    // A raw socket behind the standard UDP socket type: its recv_from reads into plain bytes.
    let socket: UdpSocket = match socket {
        Ok(Ok(s)) => s.into(),
        Ok(Err(e)) => return failed(&e),
        Err(e) => return ProbeResult::Error(e.to_string()),
    };
    let id = (std::process::id() as u16) ^ 0x5746;
    let deadline = std::time::Instant::now() + timeout;
    // The first request may be lost while neighbours resolve: three, a third of the time apart.
    for seq in 1..=3u16 {
        let request = echo_request(v6, id, seq);
        if let Err(e) = socket.send_to(&request, SocketAddr::new(target, 0)) {
            return failed(&e);
        }
        let until = (std::time::Instant::now() + timeout / 3).min(deadline);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = socket.set_read_timeout(Some(left));
            let mut buf = [0u8; 1500];
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                break;
            };
            if canonical(from.ip()) == canonical(target) && is_echo_reply(v6, &buf[..n], id) {
                return ProbeResult::Echoed(target);
            }
        }
    }
    ProbeResult::Timeout
}

/// An ICMP (or ICMPv6: the kernel fills its checksum) echo request.
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"weft-lab");
    if !v6 {
        let sum = internet_checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether a packet read from a raw ICMP socket (IPv4: with its IP header) is an echo reply
/// with identifier `id`.
fn is_echo_reply(v6: bool, data: &[u8], id: u16) -> bool {
    let icmp = if v6 {
        data
    } else {
        let ihl = usize::from(data.first().map_or(0, |b| b & 0x0f)) * 4;
        data.get(ihl..).unwrap_or_default()
    };
    icmp.len() >= 8
        && icmp[0] == if v6 { 129 } else { 0 }
        && u16::from_be_bytes([icmp[4], icmp[5]]) == id
}

const fn libc_ehostunreach() -> i32 {
    113
}

/// A socket error: no route is an answer (the target is unreachable from here); anything
/// else means the probe could not run.
fn failed(e: &std::io::Error) -> ProbeResult {
    const ENETUNREACH: i32 = 101;
    if e.raw_os_error() == Some(ENETUNREACH) {
        ProbeResult::Unreachable(e.to_string())
    } else {
        ProbeResult::Error(e.to_string())
    }
}

/// What a flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodKind {
    /// UDP datagrams, each from a new socket (a new source port, so a new conntrack entry).
    Udp,
    /// TCP connection attempts that are not waited for (their handshakes complete).
    Tcp,
    /// TCP SYNs from random addresses of [`SYN_FLOOD_SOURCES`] that never complete their
    /// handshake (a spoofed SYN flood; IPv4).
    SpoofedSyn,
}

/// The sources of a spoofed SYN flood: the benchmarking range (RFC 2544), never a lab
/// workload's or the LAN's. Answers to them go to the outside host's gateway and end there.
pub const SYN_FLOOD_SOURCES: ipnet::Ipv4Net =
    ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(198, 18, 0, 0), 15);

/// A TCP SYN from `src:sport` to `dst:dport`, with its IPv4 header (the kernel fills in the
/// header's checksum and length on a raw socket).
pub fn syn_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(tcp);
    let sum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Sends `count` new flows to `target:port` from inside `ns`, `per_second` of them a second,
/// and returns when done (see [`FloodKind`]). Bounded by its caller; errors of single sends (a
/// drop shows up as nothing) are ignored.
pub fn flood(
    ns: &Netns,
    target: IpAddr,
    port: u16,
    kind: FloodKind,
    per_second: u32,
    count: u32,
) -> anyhow::Result<()> {
    let addr = SocketAddr::new(target, port);
    let step = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
    weft_dataplane::netns::run_in(ns, || -> anyhow::Result<()> {
        let raw = match (kind, target) {
            (FloodKind::SpoofedSyn, IpAddr::V4(_)) => Some(socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                // IPPROTO_RAW: the packets carry their own IP header.
                Some(socket2::Protocol::from(255)),
            )?),
            (FloodKind::SpoofedSyn, IpAddr::V6(_)) => {
                anyhow::bail!("a spoofed SYN flood is IPv4 only")
            }
            _ => None,
        };
        // A xorshift generator: the sources only need to differ, not to be unpredictable.
        let mut state = u64::from(std::process::id())
            ^ jiff::Timestamp::now().as_nanosecond().unsigned_abs() as u64
            | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let start = std::time::Instant::now();
        let mut held = Vec::new();
        for i in 0..count {
            let due = start + step * i;
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            match kind {
                FloodKind::Udp => {
                    let any: SocketAddr = if target.is_ipv4() {
                        "0.0.0.0:0".parse().unwrap_or(addr)
                    } else {
                        "[::]:0".parse().unwrap_or(addr)
                    };
                    if let Ok(s) = std::net::UdpSocket::bind(any) {
                        let _ = s.send_to(b"weft-lab flood", addr);
                    }
                }
                FloodKind::Tcp => {
                    if let Ok(s) = socket2::Socket::new(
                        socket2::Domain::for_address(addr),
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    ) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.connect(&addr.into());
                        // Kept open until the flood ends: a closed attempt would end its
                        // connection.
                        held.push(s);
                    }
                }
                FloodKind::SpoofedSyn => {
                    if let (Some(raw), IpAddr::V4(dst)) = (&raw, target) {
                        let r = next();
                        #[allow(clippy::cast_possible_truncation)]
                        let host = (r as u32) & !u32::MAX.checked_shl(32 - 15).unwrap_or(0);
                        let src = Ipv4Addr::from(u32::from(SYN_FLOOD_SOURCES.network()) | host);
                        #[allow(clippy::cast_possible_truncation)]
                        let sport = 1024 + ((r >> 32) as u16 % 64_000);
                        #[allow(clippy::cast_possible_truncation)]
                        let seq = (r >> 16) as u32;
                        let packet = syn_packet(src, sport, dst, port, seq);
                        let to = SocketAddr::new(target, 0);
                        let _ = raw.send_to(&packet, &to.into());
                    }
                }
            }
        }
        Ok(())
    })??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_recognized() {
        let request = echo_request(false, 0x1234, 1);
        assert_eq!(request[0], 8);
        assert_eq!(internet_checksum(&request), 0);
        let mut reply = vec![0x45u8; 1];
        reply.extend_from_slice(&[0; 19]);
        reply.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 1]);
        assert!(is_echo_reply(false, &reply, 0x1234));
        assert!(!is_echo_reply(false, &reply, 0x1235));
        assert!(is_echo_reply(
            true,
            &[129, 0, 0, 0, 0x12, 0x34, 0, 1],
            0x1234
        ));
        assert!(!is_echo_reply(
            true,
            &[128, 0, 0, 0, 0x12, 0x34, 0, 1],
            0x1234
        ));
    }

    #[test]
    fn spoofed_syns_carry_a_valid_tcp_checksum() {
        let src = Ipv4Addr::new(198, 19, 7, 9);
        let dst = Ipv4Addr::new(192, 168, 60, 11);
        let p = syn_packet(src, 40000, dst, 8080, 0xdead_beef);
        assert_eq!(&p[12..16], &src.octets());
        assert_eq!(&p[16..20], &dst.octets());
        assert_eq!(p[33], 0x02, "SYN only");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(internet_checksum(&pseudo), 0);
        assert!(SYN_FLOOD_SOURCES.contains(&src));
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply("weft-lab web-1 192.168.50.11\n"),
            Some(ProbeResult::Answered {
                by: "web-1".into(),
                seen: "192.168.50.11".parse().unwrap()
            })
        );
        assert_eq!(parse_reply("HTTP/1.1 200 OK"), None);
    }
}

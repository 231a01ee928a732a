//! Traffic mirrors on a workload's host port, with real frames (tier 3).
//!
//! Each test's own namespace is the node: a bridge (10.77.0.254/24) with workloads A
//! (10.77.0.1, fd77::1) and B (10.77.0.2, fd77::2) behind veth pairs, and analyzers whose host
//! ends are not on the bridge. Mirrors on A's host port copy frames to an analyzer's host
//! port, and the test captures what arrives inside the analyzer's namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, chain, isolate, wait_running};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use weft_dataplane::frame::Capture;
use weft_dataplane::mirror::{L4, MirrorFilter, Side, program};
use weft_dataplane::netlink::{
    MIRROR_PREF, MirrorCounter, MirrorRule, Netlink, VethSpec, clsact_qdisc_message,
    mirror_filter_message,
};
use weft_dataplane::netns::{self, Netns};

const MAC_A: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0b];
const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);

/// How long a capture waits for copies that should (or should not) arrive.
const WINDOW: Duration = Duration::from_millis(600);

struct Workload {
    ns: NamedNs,
    host: u32,
    ip: Ipv4Addr,
}

struct Analyzer {
    ns: NamedNs,
    host: u32,
    inner: u32,
}

struct Node {
    _ns: Netns,
    nl: Netlink,
    a: Workload,
    b: Workload,
}

fn node() -> Node {
    let ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let bridge = nl.create_bridge("wbr0", None, None, None).unwrap();
    nl.add_address(bridge, format!("{NODE}/24").parse().unwrap(), false)
        .unwrap();
    let a = workload(&mut nl, bridge, "wa", MAC_A, 1);
    let b = workload(&mut nl, bridge, "wb", MAC_B, 2);
    // Frames flow once the bridge forwards on both ports, and the node's own once the
    // bridge has its carrier (from its first forwarding port).
    for link in [a.host, b.host, bridge] {
        wait_running(&mut nl, link);
    }
    Node { _ns: ns, nl, a, b }
}

fn workload(nl: &mut Netlink, bridge: u32, tag: &str, mac: [u8; 6], n: u8) -> Workload {
    let ns = NamedNs::new(tag);
    let host = nl
        .create_veth_into_netns(&VethSpec {
            host_name: &format!("{tag}-host"),
            host_alias: None,
            host_master: Some(bridge),
            peer_name: "eth0",
            peer_netns: ns.ns.fd(),
            peer_mac: Some(mac),
            mtu: None,
        })
        .unwrap();
    let mut inner = Netlink::in_netns(&ns.ns).unwrap();
    let lo = inner.link_by_name("lo").unwrap().unwrap().index;
    inner.set_up(lo).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap().index;
    inner.set_up(eth0).unwrap();
    let ip = Ipv4Addr::new(10, 77, 0, n);
    inner
        .add_address(eth0, format!("{ip}/24").parse().unwrap(), false)
        .unwrap();
    inner
        .add_address(eth0, format!("fd77::{n}/64").parse().unwrap(), true)
        .unwrap();
    wait_running(&mut inner, eth0);
    Workload { ns, host, ip }
}

fn analyzer(nl: &mut Netlink, tag: &str) -> Analyzer {
    let ns = NamedNs::new(tag);
    let host = nl
        .create_veth_into_netns(&VethSpec {
            host_name: &format!("{tag}-host"),
            host_alias: None,
            host_master: None,
            peer_name: "eth0",
            peer_netns: ns.ns.fd(),
            peer_mac: None,
            mtu: None,
        })
        .unwrap();
    let mut inner = Netlink::in_netns(&ns.ns).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap().index;
    inner.set_up(eth0).unwrap();
    // A copy redirected to the host end before it runs is dropped.
    wait_running(nl, host);
    wait_running(&mut inner, eth0);
    Analyzer {
        ns,
        host,
        inner: eth0,
    }
}

/// Starts recording what arrives on the analyzer's side of its veth.
fn capture(z: &Analyzer) -> Capture {
    netns::run_in(&z.ns.ns, || Capture::open(z.inner))
        .unwrap()
        .unwrap_or_else(|e| panic!("capture in {}: {e}", z.ns.name))
}

/// A UDP socket of workload `w` on `port` (all its addresses), reads timing out quickly.
fn bind_udp(w: &Workload, port: u16) -> UdpSocket {
    let s = netns::run_in(&w.ns.ns, || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

/// Sends each payload as one datagram from workload `w` to `to`.
fn send_udp(w: &Workload, to: SocketAddr, payloads: &[String]) {
    let ip = w.ip;
    netns::run_in(&w.ns.ns, || {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        for p in payloads {
            s.send_to(p.as_bytes(), to).unwrap();
        }
    })
    .unwrap();
}

fn payloads(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

/// Every datagram that arrives on `s` within `window` (and until it falls quiet).
fn recv_all(s: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(n) => out.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    out
}

fn texts(datagrams: &[Vec<u8>]) -> Vec<String> {
    let mut t: Vec<String> = datagrams
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    t.sort();
    t
}

/// A UDP/IPv4 frame, as far as the tests look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Udp4 {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
}

fn udp4(f: &[u8]) -> Option<Udp4> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4 = 14 + ihl;
    let end = (14 + total).min(f.len());
    if end < l4 + 8 {
        return None;
    }
    Some(Udp4 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        sport: u16::from_be_bytes([f[l4], f[l4 + 1]]),
        dport: u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        payload: f[l4 + 8..end].to_vec(),
    })
}

/// The UDP/IPv4 frames among `frames` from `src` to `dst`.
fn udp_between(frames: &[Vec<u8>], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Udp4> {
    frames
        .iter()
        .filter_map(|f| udp4(f))
        .filter(|u| u.src == src && u.dst == dst)
        .collect()
}

fn payload_texts(frames: &[Udp4]) -> Vec<String> {
    texts(&frames.iter().map(|u| u.payload.clone()).collect::<Vec<_>>())
}

fn udp_filter(port: u16) -> MirrorFilter {
    MirrorFilter {
        protocols: vec![L4::Udp],
        ports: vec![(port, port)],
        cidrs: vec![],
    }
}

fn rule(side: Side, filter: &MirrorFilter, to: u32) -> MirrorRule {
    MirrorRule {
        side,
        program: program(filter, side),
        to,
    }
}

/// The kinds of the qdiscs of link `port`.
fn qdisc_kinds(nl: &mut Netlink, port: u32) -> Vec<String> {
    nl.request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        NLM_F_DUMP,
    )
    .unwrap()
    .into_iter()
    .filter_map(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == port as i32 => {
            q.attributes.into_iter().find_map(|a| match a {
                TcAttribute::Kind(k) => Some(k),
                _ => None,
            })
        }
        _ => None,
    })
    .filter(|k| k != "noqueue")
    .collect()
}

/// The priorities of the filters in the egress hook of link `port`.
fn egress_prefs(nl: &mut Netlink, port: u32) -> Vec<u16> {
    let mut f = TcMessage::with_index(port as i32);
    f.header.parent = TcHandle {
        major: 0xffff,
        minor: TcHandle::MIN_EGRESS,
    };
    let mut prefs: Vec<u16> = nl
        .request(RouteNetlinkMessage::GetTrafficFilter(f), NLM_F_DUMP)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => Some(TcHandle::from(f.header.info).major),
            _ => None,
        })
        .collect();
    prefs.dedup();
    prefs
}

/// The counters of `port` once the first one reached `packets` (the copies are made in the
/// receiving softirq, a moment after the sender's send returns), or after 2 s.
fn counters_once(nl: &mut Netlink, port: u32, packets: u64) -> Vec<MirrorCounter> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let c = nl.mirror_counters(port).unwrap();
        if c.first().is_some_and(|c| c.packets >= packets) || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_from_workload_udp_mirror_copies_only_the_matching_port_and_the_frames_still_arrive() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    let rules = [rule(Side::FromWorkload, &udp_filter(5000), z.host)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());

    let cap = capture(&z);
    let (s5000, s6000) = (bind_udp(&n.b, 5000), bind_udp(&n.b, 6000));
    send_udp(&n.a, (B, 5000).into(), &payloads("to5000", 3));
    send_udp(&n.a, (B, 6000).into(), &payloads("to6000", 3));

    let frames = cap.collect(WINDOW, 1000).unwrap();
    let copies = udp_between(&frames, A, B);
    assert!(copies.iter().all(|u| u.dport == 5000), "{copies:?}");
    assert_eq!(payload_texts(&copies), payloads("to5000", 3));
    assert!(
        copies
            .iter()
            .all(|u| u.src_mac == MAC_A && u.dst_mac == MAC_B),
        "copies are the frames as A sent them: {copies:?}"
    );
    assert_eq!(texts(&recv_all(&s5000, WINDOW)), payloads("to5000", 3));
    assert_eq!(texts(&recv_all(&s6000, WINDOW)), payloads("to6000", 3));
}

#[test]
fn a_to_workload_cidr_mirror_copies_only_what_the_far_end_sends_to_the_workload() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    let only_b = MirrorFilter {
        cidrs: vec![format!("{B}/32").parse().unwrap()],
        ..MirrorFilter::default()
    };
    let rules = [rule(Side::ToWorkload, &only_b, z.host)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());

    let cap = capture(&z);
    let at_a = bind_udp(&n.a, 7000);
    let _at_b = bind_udp(&n.b, 7000);
    send_udp(&n.b, (A, 7000).into(), &payloads("from-b", 3));
    let from_node = UdpSocket::bind((NODE, 0)).unwrap();
    for p in payloads("from-node", 2) {
        from_node.send_to(p.as_bytes(), (A, 7000)).unwrap();
    }
    send_udp(&n.a, (B, 7000).into(), &payloads("from-a", 2));

    let frames = cap.collect(WINDOW, 1000).unwrap();
    assert_eq!(
        payload_texts(&udp_between(&frames, B, A)),
        payloads("from-b", 3)
    );
    assert!(udp_between(&frames, NODE, A).is_empty(), "not from B");
    assert!(udp_between(&frames, A, B).is_empty(), "the other way");
    assert!(
        !frames.iter().any(|f| f[12..14] == [0x08, 0x06]),
        "a CIDR filter copies no ARP"
    );
    assert_eq!(recv_all(&at_a, WINDOW).len(), 5, "A got everything");

    let counters = counters_once(&mut n.nl, n.a.host, 3);
    assert_eq!(counters.len(), 1, "{counters:?}");
    let c = counters[0];
    assert_eq!((c.side, c.index, c.packets), (Side::ToWorkload, 0, 3));
    // At the egress hook the Ethernet header counts too.
    let frame_bytes: u64 = payloads("from-b", 3)
        .iter()
        .map(|p| 14 + 28 + p.len() as u64)
        .sum();
    assert_eq!(c.bytes, frame_bytes, "{c:?}");
}

#[test]
fn the_largest_filter_callers_allow_loads_and_reads_back_unchanged() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    let mut cidrs: Vec<ipnet::IpNet> = (0..8)
        .map(|i| format!("10.{i}.0.0/{}", 16 + i).parse().unwrap())
        .collect();
    cidrs.extend(
        (0..8).map(|i| -> ipnet::IpNet { format!("fd77:{i}::/{}", 33 + 13 * i).parse().unwrap() }),
    );
    let big = MirrorFilter {
        protocols: vec![L4::Tcp, L4::Udp, L4::Sctp, L4::Icmp],
        ports: (0..16).map(|i| (1000 * i + 1, 1000 * i + 500)).collect(),
        cidrs,
    };
    let rules = [
        rule(Side::FromWorkload, &big, z.host),
        rule(Side::ToWorkload, &big, z.host),
    ];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());
    assert!(
        !n.nl.set_mirrors(n.a.host, &rules).unwrap(),
        "the kernel gives the programs back byte for byte"
    );
    let counters = n.nl.mirror_counters(n.a.host).unwrap();
    let sides: Vec<Side> = counters.iter().map(|c| c.side).collect();
    assert_eq!(sides, [Side::FromWorkload, Side::ToWorkload]);
}

#[test]
fn set_mirrors_is_idempotent_counts_copies_and_cleans_up_after_itself() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    let rules = [rule(Side::FromWorkload, &udp_filter(5000), z.host)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap(), "first time");
    assert!(!n.nl.set_mirrors(n.a.host, &rules).unwrap(), "no change");
    assert_eq!(qdisc_kinds(&mut n.nl, n.a.host), ["clsact"]);

    let _sink = bind_udp(&n.b, 5000);
    let sent = payloads("counted", 3);
    send_udp(&n.a, (B, 5000).into(), &sent);
    send_udp(&n.a, (B, 6000).into(), &payloads("not-counted", 2));
    let counters = counters_once(&mut n.nl, n.a.host, 3);
    assert_eq!(counters.len(), 1, "{counters:?}");
    let c = counters[0];
    assert_eq!((c.side, c.index, c.packets), (Side::FromWorkload, 0, 3));
    // At the ingress hook the Ethernet header is already pulled: IP + UDP + payload.
    let ip_bytes: u64 = sent.iter().map(|p| 28 + p.len() as u64).sum();
    assert_eq!(c.bytes, ip_bytes, "{c:?}");

    assert!(n.nl.set_mirrors(n.a.host, &[]).unwrap(), "removed");
    assert!(qdisc_kinds(&mut n.nl, n.a.host).is_empty(), "clsact gone");
    assert!(
        !n.nl.set_mirrors(n.a.host, &[]).unwrap(),
        "nothing left to remove"
    );
    assert_eq!(n.nl.mirror_counters(n.a.host).unwrap(), []);

    let cap = capture(&z);
    send_udp(&n.a, (B, 5000).into(), &payloads("after", 3));
    let frames = cap.collect(WINDOW, 1000).unwrap();
    assert!(udp_between(&frames, A, B).is_empty(), "no copies any more");
}

#[test]
fn two_mirrors_on_one_port_and_side_each_deliver_their_copy() {
    let mut n = node();
    let z1 = analyzer(&mut n.nl, "wz1");
    let z2 = analyzer(&mut n.nl, "wz2");
    let rules = [
        rule(Side::FromWorkload, &udp_filter(5000), z1.host),
        rule(Side::FromWorkload, &MirrorFilter::default(), z2.host),
    ];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());

    let (c1, c2) = (capture(&z1), capture(&z2));
    let sink = bind_udp(&n.b, 5000);
    send_udp(&n.a, (B, 5000).into(), &payloads("twice", 3));
    let f1 = c1.collect(WINDOW, 1000).unwrap();
    let f2 = c2.collect(WINDOW, 1000).unwrap();
    assert_eq!(payload_texts(&udp_between(&f1, A, B)), payloads("twice", 3));
    assert_eq!(payload_texts(&udp_between(&f2, A, B)), payloads("twice", 3));
    assert_eq!(texts(&recv_all(&sink, WINDOW)), payloads("twice", 3));

    let counters = counters_once(&mut n.nl, n.a.host, 3);
    assert_eq!(counters.len(), 2, "{counters:?}");
    assert_eq!((counters[0].index, counters[0].packets), (0, 3));
    assert_eq!(counters[1].index, 1);
    assert!(counters[1].packets >= 3, "everything: ARP too {counters:?}");
}

#[test]
fn a_changed_rule_is_replaced_and_a_dropped_one_removed() {
    let mut n = node();
    let z1 = analyzer(&mut n.nl, "wz1");
    let z2 = analyzer(&mut n.nl, "wz2");
    let f = udp_filter(5000);
    let both = [
        rule(Side::FromWorkload, &f, z1.host),
        rule(Side::ToWorkload, &MirrorFilter::default(), z1.host),
    ];
    assert!(n.nl.set_mirrors(n.a.host, &both).unwrap());
    let moved = [rule(Side::FromWorkload, &f, z2.host)];
    assert!(n.nl.set_mirrors(n.a.host, &moved).unwrap());
    assert!(!n.nl.set_mirrors(n.a.host, &moved).unwrap());
    assert_eq!(egress_prefs(&mut n.nl, n.a.host), [] as [u16; 0]);

    let (c1, c2) = (capture(&z1), capture(&z2));
    send_udp(&n.a, (B, 5000).into(), &payloads("moved", 2));
    let f1 = c1.collect(WINDOW, 1000).unwrap();
    let f2 = c2.collect(WINDOW, 1000).unwrap();
    assert!(udp_between(&f1, A, B).is_empty());
    assert_eq!(payload_texts(&udp_between(&f2, A, B)), payloads("moved", 2));
}

#[test]
fn filters_at_other_priorities_and_their_qdisc_are_left_alone() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    n.nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(clsact_qdisc_message(n.a.host)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .unwrap();
    let foreign = program(&MirrorFilter::default(), Side::ToWorkload);
    n.nl.request(
        RouteNetlinkMessage::NewTrafficFilter(mirror_filter_message(
            n.a.host,
            Side::ToWorkload,
            1,
            &foreign,
            z.host,
        )),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .unwrap();
    let rules = [rule(Side::ToWorkload, &udp_filter(5000), z.host)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());
    assert_eq!(egress_prefs(&mut n.nl, n.a.host), [1, MIRROR_PREF]);
    let counters = n.nl.mirror_counters(n.a.host).unwrap();
    assert_eq!(
        counters.len(),
        1,
        "pref 1 is not a mirror of ours: {counters:?}"
    );

    assert!(n.nl.set_mirrors(n.a.host, &[]).unwrap());
    assert_eq!(egress_prefs(&mut n.nl, n.a.host), [1]);
    assert_eq!(qdisc_kinds(&mut n.nl, n.a.host), ["clsact"], "still in use");
}

#[test]
fn a_port_that_does_not_exist_is_not_found_and_an_ingress_qdisc_is_refused() {
    let mut n = node();
    let z = analyzer(&mut n.nl, "wz");
    let rules = [rule(Side::FromWorkload, &udp_filter(5000), z.host)];
    for r in [&rules[..], &[]] {
        let err = n.nl.set_mirrors(999_999, r).unwrap_err();
        assert!(err.is_not_found(), "{}", chain(&err));
        assert!(err.to_string().contains("link 999999"), "{err}");
    }
    let err = n.nl.mirror_counters(999_999).unwrap_err();
    assert!(err.is_not_found(), "{}", chain(&err));

    let (x, y) = (
        n.nl.create_veth_pair("wx0", "wx1", None, None).unwrap(),
        n.nl.create_veth_pair("wy0", "wy1", None, None).unwrap(),
    );
    n.nl.join_links(x, y).unwrap();
    let err = n.nl.set_mirrors(x, &rules).unwrap_err();
    assert!(err.to_string().contains("\"ingress\" qdisc"), "{err}");
    assert!(!n.nl.set_mirrors(x, &[]).unwrap());
    assert_eq!(qdisc_kinds(&mut n.nl, x), ["ingress"]);

    let bad_target = [rule(Side::FromWorkload, &udp_filter(5000), 999_999)];
    let err = n.nl.set_mirrors(n.a.host, &bad_target).unwrap_err();
    assert!(err.errno().is_some(), "the kernel refuses: {}", chain(&err));
}

/// The frames from A inside VXLAN datagrams, each checked to carry VNI `vni`. (The VXLAN link
/// also sends frames of its own, IPv6 neighbour discovery and MLD, to the remote; a link that was
/// just replaced may still send one late with its own VNI, so only A's frames are checked.)
fn from_a(datagrams: &[Vec<u8>], vni: u8) -> Vec<Udp4> {
    datagrams
        .iter()
        .filter_map(|d| {
            let inner = &d[8..];
            (inner[6..12] == MAC_A).then(|| {
                assert_eq!(
                    &d[..8],
                    &[0x08, 0, 0, 0, 0, 0, vni, 0],
                    "VXLAN header of a copy, VNI {vni}"
                );
                udp4(inner).expect("UDP from A")
            })
        })
        .collect()
}

#[test]
fn copies_reach_a_remote_collector_through_a_vxlan_link() {
    let mut n = node();
    let vxlan = n.nl.ensure_vxlan("wmir0", 42, B.into(), 4789).unwrap();
    assert_eq!(
        n.nl.ensure_vxlan("wmir0", 42, B.into(), 4789).unwrap(),
        vxlan,
        "unchanged"
    );
    let link = n.nl.link_by_index(vxlan).unwrap().unwrap();
    assert_eq!(link.kind.as_deref(), Some("vxlan"));
    assert!(link.up);
    let rules = [rule(Side::FromWorkload, &udp_filter(5000), vxlan)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());

    let collector = bind_udp(&n.b, 4789);
    let _sink = bind_udp(&n.b, 5000);
    send_udp(&n.a, (B, 5000).into(), &payloads("tunnelled", 2));
    send_udp(&n.a, (B, 6000).into(), &payloads("not-tunnelled", 2));
    let copies = from_a(&recv_all(&collector, WINDOW), 42);
    assert_eq!(payload_texts(&copies), payloads("tunnelled", 2));
    assert!(copies.iter().all(|u| u.src == A && u.dport == 5000));

    // Another VNI: the link is made again (new index), and the mirror follows it.
    let vxlan43 = n.nl.ensure_vxlan("wmir0", 43, B.into(), 4789).unwrap();
    assert!(n.nl.link_by_index(vxlan43).unwrap().unwrap().up);
    let rules = [rule(Side::FromWorkload, &udp_filter(5000), vxlan43)];
    assert!(n.nl.set_mirrors(n.a.host, &rules).unwrap());
    send_udp(&n.a, (B, 5000).into(), &payloads("vni43", 1));
    let copies = from_a(&recv_all(&collector, WINDOW), 43);
    assert_eq!(payload_texts(&copies), payloads("vni43", 1));

    let err = n.nl.ensure_vxlan("wbr0", 42, B.into(), 4789).unwrap_err();
    assert!(err.to_string().contains("not a VXLAN link"), "{err}");
    // Someone else's VXLAN link under the name (its alias not weft's) is not made again.
    n.nl.set_alias(vxlan43, "someone's tunnel").unwrap();
    let err = n.nl.ensure_vxlan("wmir0", 44, B.into(), 4789).unwrap_err();
    assert!(
        err.to_string().contains("not weft's mirror tunnel"),
        "{err}"
    );
    assert!(n.nl.link_by_index(vxlan43).unwrap().is_some(), "left alone");
}

//! Bandwidth shaping on a workload's host port, with real packets (tier 3).
//!
//! Each test's own namespace is the node: a bridge (10.78.0.254/24) with workloads A
//! (10.78.0.1) and B (10.78.0.2) behind veth pairs. Shaping goes on A's host port: `ingress`
//! limits what B sends to A, `egress` what A sends to B. The kernel's view is read back with
//! the `tc` binary, run from the test thread (so inside the node's namespace).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, chain, isolate};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};
use weft_dataplane::mirror::{MirrorFilter, Side, program};
use weft_dataplane::names;
use weft_dataplane::netlink::{
    IFB_MTU, MIRROR_PREF, MirrorRule, Netlink, NetlinkError, Rate, SHAPE_PREF, Shaping,
    ShapingCounters, SpareIfbs, VethSpec,
};
use weft_dataplane::netns::{self, Netns};

const A: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 254);

/// 8 Mbit/s (1 MB/s) with a 32 KiB bucket: a workload's burst of 2 MB mostly waits or drops.
const LIMITED: Rate = Rate {
    bits_per_second: 8_000_000,
    burst_bits: 32 * 1024 * 8,
};

/// A second rate, for a workload's egress beside [`LIMITED`] ingress.
const EGRESS: Rate = Rate {
    bits_per_second: 4_000_000,
    burst_bits: 16_000 * 8,
};

/// What a burst sends: 1500 datagrams of 1400 bytes, as fast as the socket goes.
const DATAGRAMS: usize = 1500;
const DATAGRAM: usize = 1400;

struct Workload {
    ns: NamedNs,
    host: u32,
    name: String,
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
    let a = workload(&mut nl, bridge, "sa", 1);
    let b = workload(&mut nl, bridge, "sb", 2);
    Node { _ns: ns, nl, a, b }
}

fn workload(nl: &mut Netlink, bridge: u32, tag: &str, n: u8) -> Workload {
    let ns = NamedNs::new(tag);
    let name = format!("{tag}-host");
    let host = nl
        .create_veth_into_netns(&VethSpec {
            host_name: &name,
            host_alias: None,
            host_master: Some(bridge),
            peer_name: "eth0",
            peer_netns: ns.ns.fd(),
            peer_mac: Some([0x02, 0x78, 0, 0, 0, n]),
            mtu: None,
        })
        .unwrap();
    let mut inner = Netlink::in_netns(&ns.ns).unwrap();
    let lo = inner.link_by_name("lo").unwrap().unwrap().index;
    inner.set_up(lo).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap().index;
    inner.set_up(eth0).unwrap();
    inner
        .add_address(
            eth0,
            format!("{}/24", Ipv4Addr::new(10, 78, 0, n))
                .parse()
                .unwrap(),
            false,
        )
        .unwrap();
    Workload { ns, host, name }
}

fn ifb_of(w: &Workload) -> String {
    names::shaping_ifb_name(&w.name)
}

fn both(ingress: Rate, egress: Rate) -> Shaping {
    Shaping {
        ingress: Some(ingress),
        egress: Some(egress),
    }
}

/// Runs `tc ARGS` in the calling thread's namespace (the node's); its standard output.
fn tc(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().expect("run tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `tc -j -raw qdisc show dev DEV`: one object per qdisc.
fn qdiscs(dev: &str) -> Vec<Value> {
    serde_json::from_str(&tc(&["-j", "-raw", "qdisc", "show", "dev", dev])).unwrap()
}

/// The root qdisc of `dev` as `tc` shows it.
fn root(dev: &str) -> Value {
    qdiscs(dev)
        .into_iter()
        .find(|q| q["root"] == true)
        .unwrap_or_else(|| panic!("{dev} shows no root qdisc"))
}

/// The root tbf of `dev`: rate (bytes/s), burst (bytes), limit (bytes).
fn root_tbf(dev: &str) -> Option<(u64, u64, u64)> {
    let q = root(dev);
    (q["kind"] == "tbf").then(|| {
        let o = &q["options"];
        (
            o["rate"].as_u64().unwrap(),
            o["burst"].as_u64().unwrap(),
            o["limit"].as_u64().unwrap(),
        )
    })
}

/// The kinds of `dev`'s qdiscs, without the kernel's default `noqueue`.
fn qdisc_kinds(dev: &str) -> Vec<String> {
    qdiscs(dev)
        .into_iter()
        .map(|q| q["kind"].as_str().unwrap().to_string())
        .filter(|k| k != "noqueue")
        .collect()
}

/// The filters (not the priorities' heads) in `dev`'s ingress hook.
fn ingress_filters(dev: &str) -> Vec<Value> {
    let out = tc(&["-j", "filter", "show", "dev", dev, "ingress"]);
    if out.trim().is_empty() {
        return Vec::new();
    }
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    all.into_iter()
        .filter(|f| f.get("options").is_some())
        .collect()
}

fn prefs(filters: &[Value]) -> Vec<u64> {
    filters
        .iter()
        .map(|f| f["pref"].as_u64().unwrap())
        .collect()
}

/// Expects `rate`'s tbf on `dev`: `tc` reads the kernel's ticks back as the burst to the byte.
fn assert_tbf(dev: &str, rate: Rate) {
    let bytes = rate.bits_per_second / 8;
    let burst = rate.burst_bits / 8;
    let (r, b, l) = root_tbf(dev).unwrap_or_else(|| panic!("no tbf on {dev}: {:?}", qdiscs(dev)));
    assert_eq!(r, bytes, "rate of {dev}");
    assert!(b.abs_diff(burst) <= 1, "burst of {dev}: {b}, not {burst}");
    assert_eq!(l, bytes * 25 / 1000 + burst, "limit: 25 ms plus the burst");
}

fn mirror_everything(to: u32) -> MirrorRule {
    MirrorRule {
        side: Side::FromWorkload,
        program: program(&MirrorFilter::default(), Side::FromWorkload),
        to,
    }
}

#[test]
fn shaping_is_set_read_back_changed_and_removed_leaving_mirrors_alone() {
    let mut n = node();
    let (port, ifb) = (n.a.name.clone(), ifb_of(&n.a));
    let egress = EGRESS;
    let shaping = both(LIMITED, egress);
    assert!(n.nl.set_shaping(n.a.host, &ifb, &shaping).unwrap());

    assert_tbf(&port, LIMITED);
    assert_eq!(root(&port)["handle"], "1:");
    assert_tbf(&ifb, egress);
    let link = n.nl.link_by_name(&ifb).unwrap().expect("the IFB");
    assert_eq!(link.kind.as_deref(), Some("ifb"));
    assert_eq!(link.alias, Some(names::shaping_ifb_alias(&port)));
    assert!(link.up);
    // Under IPv6's minimum MTU: no IPv6 state at all (no addrgenmode to show, no per-device
    // IPv6 sysctls), so no link-local address, no route of its own.
    assert_eq!(link.mtu, IFB_MTU);
    const { assert!(IFB_MTU < 1280) };
    let mode = Command::new("ip")
        .args(["-d", "link", "show", "dev", &ifb])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&mode.stdout).contains("addrgenmode"),
        "{}",
        String::from_utf8_lossy(&mode.stdout)
    );
    assert!(
        !std::path::Path::new(&format!("/proc/thread-self/net/dev_snmp6/{ifb}")).exists(),
        "no IPv6 device state"
    );
    let addrs = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "dev", &ifb])
        .output()
        .unwrap();
    assert!(addrs.status.success());
    assert_eq!(
        String::from_utf8_lossy(&addrs.stdout),
        "",
        "no IPv6 address on the IFB"
    );
    let filters = ingress_filters(&port);
    assert_eq!(prefs(&filters), [u64::from(SHAPE_PREF)]);
    let f = &filters[0]["options"];
    assert_eq!(f["bytecode"]["length"], 1, "{f}");
    let action = &f["actions"][0];
    assert_eq!(action["kind"], "mirred", "{f}");
    assert_eq!(action["mirred_action"], "redirect");
    assert_eq!(action["direction"], "egress");
    assert_eq!(action["to_dev"], ifb.as_str());
    assert_eq!(action["control_action"]["type"], "stolen");
    assert_eq!(qdisc_kinds(&n.b.name), [] as [String; 0], "B is not shaped");

    assert!(
        !n.nl.set_shaping(n.a.host, &ifb, &shaping).unwrap(),
        "no change"
    );

    let faster = Rate {
        bits_per_second: 16_000_000,
        burst_bits: 64_000 * 8,
    };
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &both(faster, egress))
            .unwrap()
    );
    assert_tbf(&port, faster);
    assert_eq!(root(&port)["handle"], "1:", "changed in place");
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &both(faster, faster))
            .unwrap()
    );
    assert_tbf(&ifb, faster);
    assert_eq!(
        n.nl.link_by_name(&ifb).unwrap().unwrap().index,
        link.index,
        "the same IFB"
    );
    assert!(
        !n.nl
            .set_shaping(n.a.host, &ifb, &both(faster, faster))
            .unwrap()
    );

    // A mirror on the same clsact runs first and outlives the shaping.
    let mirror = [mirror_everything(n.b.host)];
    assert!(n.nl.set_mirrors(n.a.host, &mirror).unwrap());
    assert_eq!(
        prefs(&ingress_filters(&port)),
        [u64::from(MIRROR_PREF), u64::from(SHAPE_PREF)]
    );
    assert!(
        n.nl.shaping_counters(n.a.host, &ifb)
            .unwrap()
            .egress
            .is_some()
    );

    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &Shaping::default())
            .unwrap()
    );
    assert_eq!(root_tbf(&port), None, "no tbf: {:?}", qdiscs(&port));
    assert!(n.nl.link_by_name(&ifb).unwrap().is_none(), "IFB gone");
    assert_eq!(prefs(&ingress_filters(&port)), [u64::from(MIRROR_PREF)]);
    assert_eq!(qdisc_kinds(&port), ["clsact"], "kept for the mirror");
    assert!(
        !n.nl.set_mirrors(n.a.host, &mirror).unwrap(),
        "the mirror is untouched"
    );
    assert_eq!(
        n.nl.shaping_counters(n.a.host, &ifb).unwrap(),
        Default::default()
    );
    assert!(
        !n.nl
            .set_shaping(n.a.host, &ifb, &Shaping::default())
            .unwrap(),
        "nothing left to remove"
    );

    // Egress alone, then nothing: the clsact goes once the mirror has gone too.
    let only_egress = Shaping {
        ingress: None,
        egress: Some(egress),
    };
    assert!(n.nl.set_shaping(n.a.host, &ifb, &only_egress).unwrap());
    assert_eq!(root_tbf(&port), None);
    assert!(n.nl.set_mirrors(n.a.host, &[]).unwrap());
    assert_eq!(qdisc_kinds(&port), ["clsact"], "kept for the redirect");
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &Shaping::default())
            .unwrap()
    );
    assert!(qdisc_kinds(&port).is_empty(), "{:?}", qdiscs(&port));
}

/// A UDP socket of workload `w` on `port`, with room for a whole burst (so what it misses was
/// not delivered, rather than dropped by a full socket).
fn receiver(w: &Workload, port: u16) -> UdpSocket {
    let s = netns::run_in(&w.ns.ns, || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

/// Sends [`DATAGRAMS`] datagrams of [`DATAGRAM`] bytes from workload `w` to `to`, as fast as
/// it can; the bytes sent.
fn burst(w: &Workload, to: SocketAddr) -> usize {
    netns::run_in(&w.ns.ns, || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        let payload = [0x5a; DATAGRAM];
        for _ in 0..DATAGRAMS {
            loop {
                match s.send_to(&payload, to) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("send: {e}"),
                }
            }
        }
    })
    .unwrap();
    DATAGRAMS * DATAGRAM
}

/// The bytes `s` receives until it has been quiet for 300 ms (the shaped queue holds at most
/// 25 ms past the burst), or 5 s.
fn received(s: &UdpSocket) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline && last.elapsed() < Duration::from_millis(300) {
        match s.recv(&mut buf) {
            Ok(n) => {
                total += n;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    total
}

/// Makes sure A and B know each other's MAC, so the bursts' first frames do not wait for ARP
/// (a lost request is sent again only after a second): sends one datagram after another each
/// way until one arrives.
fn warm_up(n: &Node) {
    let at_a = receiver(&n.a, 9);
    let at_b = receiver(&n.b, 9);
    for (from, to, sock) in [(&n.a, B, &at_b), (&n.b, A, &at_a)] {
        let sender = netns::run_in(&from.ns.ns, || UdpSocket::bind(("0.0.0.0", 0)))
            .unwrap()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            assert!(Instant::now() < deadline, "no path to {to}");
            sender.send_to(b"hello", (to, 9)).unwrap();
            if sock.recv(&mut buf).is_ok() {
                break;
            }
        }
    }
    // What the retries left in flight.
    received(&at_a);
    received(&at_b);
}

/// Sends a burst each way, A to B then B to A; the bytes that arrived, in that order.
fn bursts_both_ways(n: &Node) -> (usize, usize) {
    warm_up(n);
    let at_b = receiver(&n.b, 5000);
    let sent = burst(&n.a, (B, 5000).into());
    let a_to_b = received(&at_b);
    assert!(a_to_b <= sent);
    let at_a = receiver(&n.a, 5000);
    let sent = burst(&n.b, (A, 5000).into());
    let b_to_a = received(&at_a);
    assert!(b_to_a <= sent);
    (a_to_b, b_to_a)
}

/// What the shaped direction lets through: clearly less than the burst (the bucket, the
/// queue and the rate for as long as sending took: about 100 KB of the 2.1 MB on a quick
/// machine), but something.
fn assert_shaped(got: usize, what: &str) {
    let sent = DATAGRAMS * DATAGRAM;
    assert!(got > 0, "{what}: nothing arrived");
    assert!(
        got < sent / 2,
        "{what}: {got} of {sent} bytes arrived, as if unshaped"
    );
}

/// What the unshaped direction lets through: nearly everything (a loaded machine may drop a
/// little in its backlog).
fn assert_unshaped(got: usize, what: &str) {
    let sent = DATAGRAMS * DATAGRAM;
    assert!(
        got >= sent * 3 / 4,
        "{what}: only {got} of {sent} bytes arrived"
    );
}

/// Bursts both ways: what A sends is held back (`how`: on which link), what it receives not,
/// and the `tbf` of A's IFB link, found by `ifb`, counted drops.
fn a_egress_held_back(n: &mut Node, ifb: &str, how: &str) {
    let (a_to_b, b_to_a) = bursts_both_ways(n);
    assert_shaped(a_to_b, &format!("A to B, {how}"));
    assert_unshaped(b_to_a, "B to A");
    let egress = n.nl.shaping_counters(n.a.host, ifb).unwrap().egress;
    assert!(
        egress.expect("egress counters by A's IFB name").drops > 0,
        "{egress:?}"
    );
}

/// The sampler's read of many ports at once (two dumps) gives what the read of each port gives:
/// both directions of a port shaped both ways, the ingress of a port shaped into it, nothing
/// for a port without shaping, and no entry for a port that does not exist.
#[test]
fn the_counters_of_many_ports_read_at_once_are_each_port_s() {
    let mut n = node();
    let ifb = ifb_of(&n.a);
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &both(LIMITED, EGRESS))
            .unwrap()
    );
    let (a_to_b, _) = bursts_both_ways(&n);
    assert_shaped(a_to_b, "A to B, egress shaped");
    let one = n.nl.shaping_counters(n.a.host, &ifb).unwrap();
    let (a, b) = (n.a.name.clone(), n.b.name.clone());
    let all = n.nl.shaping_counters_of(&[&a, &b, "nosuch-host"]).unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let got = all[&a];
    let (i1, e1) = (one.ingress.unwrap(), one.egress.unwrap());
    let (i2, e2) = (
        got.ingress.expect("A's ingress"),
        got.egress.expect("A's egress"),
    );
    assert!(e1.drops > 0, "{e1:?}");
    // Read after: the same counters, or grown by a frame or two of the link's own.
    for (before, after) in [(i1, i2), (e1, e2)] {
        assert!(after.packets >= before.packets && after.drops >= before.drops);
        assert!(after.packets - before.packets < 10, "{before:?} {after:?}");
        assert_eq!(after.drops, before.drops, "{before:?} {after:?}");
    }
    assert_eq!(all[&b], ShapingCounters::default(), "B is not shaped");
}

#[test]
fn egress_shaping_holds_back_what_the_workload_sends_and_nothing_else() {
    let mut n = node();
    let ifb = ifb_of(&n.a);
    let shaping = Shaping {
        ingress: None,
        egress: Some(LIMITED),
    };
    assert!(n.nl.set_shaping(n.a.host, &ifb, &shaping).unwrap());
    let before = n.nl.shaping_counters(n.a.host, &ifb).unwrap();
    assert_eq!(before.ingress, None);
    let before = before.egress.expect("egress counters");
    // A mirror of everything A sends, on the same hook, before the redirect.
    let z = n.nl.create_veth_pair("wz0", "wz1", None, None).unwrap();
    let z1 = n.nl.link_by_name("wz1").unwrap().unwrap().index;
    n.nl.set_up(z).unwrap();
    n.nl.set_up(z1).unwrap();
    assert!(n.nl.set_mirrors(n.a.host, &[mirror_everything(z)]).unwrap());

    let (a_to_b, b_to_a) = bursts_both_ways(&n);
    assert_shaped(a_to_b, "A to B, egress shaped");
    assert_unshaped(b_to_a, "B to A");

    // The mirror copied every frame once: also those the tbf dropped, and none again when the
    // IFB gave the frames back to the port.
    let copied = n.nl.mirror_counters(n.a.host).unwrap()[0].packets;
    assert!(
        (DATAGRAMS as u64..2 * DATAGRAMS as u64).contains(&copied),
        "{copied} copies"
    );

    let after = n.nl.shaping_counters(n.a.host, &ifb).unwrap();
    assert_eq!(after.ingress, None);
    let after = after.egress.unwrap();
    assert!(after.drops > before.drops, "{before:?} → {after:?}");
    assert!(after.overlimits > before.overlimits, "{after:?}");
    // What the tbf sent on is what arrived, plus the headers (and the warm-up, ARP…).
    let datagrams = (a_to_b / DATAGRAM) as u64;
    assert!(after.packets - before.packets >= datagrams, "{after:?}");
    assert!(
        after.bytes - before.bytes >= a_to_b as u64 + datagrams * 42,
        "{after:?}, {a_to_b} bytes arrived"
    );
    assert!(after.packets + after.drops >= DATAGRAMS as u64, "{after:?}");
}

#[test]
fn a_departed_ports_ifb_is_kept_as_a_spare_and_shapes_the_next_port_under_its_name() {
    let mut n = node();
    let egress_only = |bits_per_second| Shaping {
        ingress: None,
        egress: Some(Rate {
            bits_per_second,
            burst_bits: 32 * 1024 * 8,
        }),
    };
    // A third port on the bridge, shaped, then gone: its IFB link is retired as a spare.
    let bridge = n.nl.link_by_name("wbr0").unwrap().unwrap().index;
    let gone = workload(&mut n.nl, bridge, "sc", 3);
    let gone_ifb = ifb_of(&gone);
    assert!(
        n.nl.set_shaping(gone.host, &gone_ifb, &egress_only(4_000_000))
            .unwrap()
    );
    let spare = n.nl.link_by_name(&gone_ifb).unwrap().expect("its IFB");
    n.nl.delete_link(gone.host).unwrap();
    // Left in weft's deletion group by a deletion cut short (a crash between the move into
    // the group and the group's deletion): kept as a spare, it leaves the group, and a later
    // deletion of other links together does not take it along.
    let status = std::process::Command::new("ip")
        .args(["link", "set", &gone_ifb, "group"])
        .arg(names::DELETE_GROUP.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    n.nl.retire_ifb(&spare).unwrap();
    let others: Vec<u32> = ["dgx1", "dgx2"]
        .iter()
        .map(|name| n.nl.create_bridge(name, None, None, None).unwrap())
        .collect();
    assert_eq!(n.nl.delete_links(&others).unwrap(), 2);
    let kept = n.nl.link_by_index(spare.index).unwrap().expect("kept");
    assert_eq!(kept.alias.as_deref(), Some(names::SPARE_IFB_ALIAS));
    assert!(kept.up, "a spare stays up");
    assert!(
        names::shaped_port(names::SPARE_IFB_ALIAS).is_none(),
        "a spare names no port"
    );
    // Retiring what is not weft's IFB of a port is refused.
    let not_ours = n.nl.link_by_name("wbr0").unwrap().unwrap();
    assert!(matches!(
        n.nl.retire_ifb(&not_ours),
        Err(NetlinkError::Invalid { .. })
    ));

    // A's egress limit takes the spare: no link created, A's IFB name is the spare's
    // alternative name, and the spare's tbf now has A's rate.
    let ifb = ifb_of(&n.a);
    let mut spares = SpareIfbs {
        links: vec![spare.index],
        cap: 1,
    };
    assert!(
        n.nl.set_shaping_reusing(
            n.a.host,
            &ifb,
            &Shaping {
                ingress: None,
                egress: Some(LIMITED),
            },
            &mut spares
        )
        .unwrap()
    );
    assert!(spares.links.is_empty(), "the spare is taken");
    let taken =
        n.nl.link_by_name(&ifb)
            .unwrap()
            .expect("A's IFB by its name");
    assert_eq!(taken.index, spare.index, "the spare, not a new link");
    assert_eq!(taken.name, gone_ifb, "it keeps its own name");
    assert_eq!(
        taken.alias.as_deref(),
        Some(names::shaping_ifb_alias(&n.a.name).as_str())
    );
    assert_tbf(&gone_ifb, LIMITED);
    let ifb_links = Command::new("ip")
        .args(["-o", "link", "show", "type", "ifb"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ifb_links.stdout).lines().count(),
        1
    );
    // Set again: nothing to change; and it shapes what A sends, not what it receives.
    assert!(
        !n.nl
            .set_shaping(
                n.a.host,
                &ifb,
                &Shaping {
                    ingress: None,
                    egress: Some(LIMITED),
                }
            )
            .unwrap()
    );
    a_egress_held_back(&mut n, &ifb, "through the spare");

    // Retired again: A's name goes with it, and a port that comes back under the spare's own
    // name takes it although no list names it.
    let a_ifb = n.nl.link_by_name(&ifb).unwrap().unwrap();
    n.nl.retire_ifb(&a_ifb).unwrap();
    assert!(
        n.nl.link_by_name(&ifb).unwrap().is_none(),
        "A's name is gone"
    );
    let back = workload(&mut n.nl, bridge, "sc", 4);
    assert_eq!(ifb_of(&back), gone_ifb);
    assert!(
        n.nl.set_shaping(back.host, &gone_ifb, &egress_only(2_000_000))
            .unwrap()
    );
    let again = n.nl.link_by_name(&gone_ifb).unwrap().unwrap();
    assert_eq!(again.index, spare.index);
    assert_eq!(
        again.alias.as_deref(),
        Some(names::shaping_ifb_alias(&back.name).as_str())
    );
    // A list of links that are no spares (deleted, or taken meanwhile) creates a new link.
    let mut stale = SpareIfbs {
        links: vec![spare.index, 999_999],
        cap: 2,
    };
    assert!(
        n.nl.set_shaping_reusing(n.a.host, &ifb, &egress_only(1_000_000), &mut stale)
            .unwrap()
    );
    assert!(stale.links.is_empty());
    let made = n.nl.link_by_name(&ifb).unwrap().unwrap();
    assert_ne!(made.index, spare.index);
    assert_eq!(made.name, ifb, "a new link has A's IFB name as its own");
    // Lifted with no room for a spare: deleted.
    stale.cap = 0;
    assert!(
        n.nl.set_shaping_reusing(n.a.host, &ifb, &Shaping::default(), &mut stale)
            .unwrap()
    );
    assert!(n.nl.link_by_index(made.index).unwrap().is_none(), "deleted");
}

#[test]
fn a_port_moves_off_the_link_under_a_returning_ports_ifb_name_and_stays_shaped() {
    let mut n = node();
    let bridge = n.nl.link_by_name("wbr0").unwrap().unwrap().index;
    let egress = Shaping {
        ingress: None,
        egress: Some(LIMITED),
    };
    // C shaped, then gone: its IFB link, a spare, is taken by A.
    let gone = workload(&mut n.nl, bridge, "sm", 3);
    let c_ifb = ifb_of(&gone);
    n.nl.set_shaping(gone.host, &c_ifb, &egress).unwrap();
    let held = n.nl.link_by_name(&c_ifb).unwrap().unwrap();
    n.nl.delete_link(gone.host).unwrap();
    n.nl.retire_ifb(&held).unwrap();
    let a_ifb = ifb_of(&n.a);
    let mut spares = SpareIfbs {
        links: vec![held.index],
        cap: 1,
    };
    n.nl.set_shaping_reusing(n.a.host, &a_ifb, &egress, &mut spares)
        .unwrap();
    assert_eq!(
        n.nl.shaping_redirect(n.a.host).unwrap(),
        Some(held.index),
        "A is shaped on C's old link"
    );

    // Refused, nothing changed: a link under its own port's IFB name, a link that is not an
    // IFB of weft's, a port without an egress limit.
    let back = workload(&mut n.nl, bridge, "sm", 4);
    assert_eq!(ifb_of(&back), c_ifb, "C's name is back");
    let held = n.nl.link_by_name(&c_ifb).unwrap().unwrap();
    let wbr0 = n.nl.link_by_index(bridge).unwrap().unwrap();
    for (link, shaping) in [(&wbr0, egress), (&held, Shaping::default())] {
        let e = n.nl.move_shaping(link, &shaping, &mut spares).unwrap_err();
        assert!(matches!(e, NetlinkError::Invalid { .. }), "{e}");
    }
    n.nl.set_shaping(n.b.host, &ifb_of(&n.b), &egress).unwrap();
    let b_own = n.nl.link_by_name(&ifb_of(&n.b)).unwrap().unwrap();
    let e = n.nl.move_shaping(&b_own, &egress, &mut spares).unwrap_err();
    assert!(matches!(e, NetlinkError::Invalid { .. }), "{e}");
    n.nl.set_shaping(n.b.host, &ifb_of(&n.b), &Shaping::default())
        .unwrap();
    assert_eq!(n.nl.link_by_name(&c_ifb).unwrap(), Some(held.clone()));
    assert_eq!(n.nl.shaping_redirect(n.a.host).unwrap(), Some(held.index));

    // Moved: A on a link of its own, under its own IFB name; C's old link a spare, which C
    // takes by its name.
    assert!(n.nl.move_shaping(&held, &egress, &mut spares).unwrap());
    let moved = n.nl.link_by_name(&a_ifb).unwrap().expect("A's IFB");
    assert_ne!(moved.index, held.index);
    assert_eq!(moved.name, a_ifb);
    assert_eq!(n.nl.shaping_redirect(n.a.host).unwrap(), Some(moved.index));
    assert_tbf(&a_ifb, LIMITED);
    let spare = n.nl.link_by_index(held.index).unwrap().unwrap();
    assert_eq!(spare.alias.as_deref(), Some(names::SPARE_IFB_ALIAS));
    n.nl.set_shaping(back.host, &c_ifb, &egress).unwrap();
    let taken = n.nl.link_by_name(&c_ifb).unwrap().unwrap();
    assert_eq!(taken.index, held.index, "C takes its old link back");
    assert_eq!(n.nl.shaping_redirect(back.host).unwrap(), Some(held.index));
    assert_eq!(
        n.nl.shaping_redirect(n.b.host).unwrap(),
        None,
        "B's limit lifted"
    );

    // A is still shaped, through its new link.
    a_egress_held_back(&mut n, &a_ifb, "on its new link");
}

#[test]
fn a_spare_takes_its_tbf_whatever_root_qdisc_it_was_left_with() {
    let mut n = node();
    let bridge = n.nl.link_by_name("wbr0").unwrap().unwrap().index;
    let ifb = ifb_of(&n.a);
    let limited = Shaping {
        ingress: None,
        egress: Some(LIMITED),
    };
    // A spare keeps its last port's tbf, and adopting it changes that tbf's rate in one
    // request (see the test above); here its root qdisc was replaced by another kind, then
    // deleted, behind weft's back.
    let another_kind: &[&[&str]] = &[&["del", "root"], &["add", "root", "handle", "1:", "pfifo"]];
    let none: &[&[&str]] = &[&["del", "root"]];
    for (tag, k, changes) in [("sd", 5, another_kind), ("se", 6, none)] {
        let w = workload(&mut n.nl, bridge, tag, k);
        let w_ifb = ifb_of(&w);
        let slow = Shaping {
            ingress: None,
            egress: Some(Rate {
                bits_per_second: 4_000_000,
                burst_bits: 32 * 1024 * 8,
            }),
        };
        assert!(n.nl.set_shaping(w.host, &w_ifb, &slow).unwrap());
        let spare = n.nl.link_by_name(&w_ifb).unwrap().expect("its IFB");
        n.nl.delete_link(w.host).unwrap();
        n.nl.retire_ifb(&spare).unwrap();
        for change in changes {
            let (verb, rest) = change.split_first().unwrap();
            let mut args = vec!["qdisc", verb, "dev", w_ifb.as_str()];
            args.extend(rest);
            tc(&args);
        }

        let mut spares = SpareIfbs {
            links: vec![spare.index],
            cap: 1,
        };
        assert!(
            n.nl.set_shaping_reusing(n.a.host, &ifb, &limited, &mut spares)
                .unwrap()
        );
        assert!(spares.links.is_empty(), "{tag}: the spare is taken");
        let taken = n.nl.link_by_name(&ifb).unwrap().expect("A's IFB");
        assert_eq!(taken.index, spare.index, "{tag}: the spare, not a new link");
        assert_tbf(&w_ifb, LIMITED);
        // A's limit lifted with no room for a spare: the link goes, for the next round.
        let mut none = SpareIfbs {
            links: Vec::new(),
            cap: 0,
        };
        assert!(
            n.nl.set_shaping_reusing(n.a.host, &ifb, &Shaping::default(), &mut none)
                .unwrap()
        );
        assert!(n.nl.link_by_index(spare.index).unwrap().is_none());
    }
}

#[test]
fn ingress_shaping_holds_back_what_the_workload_receives_and_nothing_else() {
    let mut n = node();
    let ifb = ifb_of(&n.a);
    let shaping = Shaping {
        ingress: Some(LIMITED),
        egress: None,
    };
    assert!(n.nl.set_shaping(n.a.host, &ifb, &shaping).unwrap());
    assert!(n.nl.link_by_name(&ifb).unwrap().is_none(), "no IFB");

    let (a_to_b, b_to_a) = bursts_both_ways(&n);
    assert_unshaped(a_to_b, "A to B");
    assert_shaped(b_to_a, "B to A, ingress shaped");

    let counters = n.nl.shaping_counters(n.a.host, &ifb).unwrap();
    assert_eq!(counters.egress, None);
    let c = counters.ingress.expect("ingress counters");
    assert!(c.drops > 0 && c.overlimits > 0, "{c:?}");
    let datagrams = (b_to_a / DATAGRAM) as u64;
    assert!(c.packets >= datagrams, "{c:?}");
    assert!(c.bytes >= b_to_a as u64 + datagrams * 42, "{c:?}");
}

#[test]
fn a_burst_past_the_kernels_32_bit_buffer_still_reads_back_as_set() {
    let mut n = node();
    let ifb = ifb_of(&n.a);
    // What Kubernetes passes when a pod names no burst: 2^31 - 1 bits, 268 MB, at 1 Mbit/s
    // 2147 s, more ticks than the dumped u32 holds.
    let kubelet = Rate {
        bits_per_second: 1_000_000,
        burst_bits: i32::MAX as u64,
    };
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &both(kubelet, kubelet))
            .unwrap()
    );
    assert!(
        !n.nl
            .set_shaping(n.a.host, &ifb, &both(kubelet, kubelet))
            .unwrap()
    );
    let (rate, _, limit) = root_tbf(&n.a.name).unwrap();
    assert_eq!((rate, limit), (125_000, 3_125 + 268_435_455));
}

fn invalid_reason(e: NetlinkError) -> String {
    match e {
        NetlinkError::Invalid { reason, .. } => reason,
        other => panic!("not Invalid: {}", chain(&other)),
    }
}

#[test]
fn bad_limits_foreign_qdiscs_and_missing_ports_are_refused_and_nothing_is_touched() {
    let mut n = node();
    let (port, ifb) = (n.a.name.clone(), ifb_of(&n.a));
    let zero_rate = Shaping {
        ingress: Some(Rate {
            bits_per_second: 0,
            burst_bits: 80_000,
        }),
        egress: Some(LIMITED),
    };
    let reason = invalid_reason(n.nl.set_shaping(n.a.host, &ifb, &zero_rate).unwrap_err());
    assert!(reason.contains("ingress.bits_per_second"), "{reason}");
    let zero_burst = Shaping {
        ingress: None,
        egress: Some(Rate {
            bits_per_second: 8_000_000,
            burst_bits: 0,
        }),
    };
    let reason = invalid_reason(n.nl.set_shaping(n.a.host, &ifb, &zero_burst).unwrap_err());
    assert!(reason.contains("egress.burst_bits"), "{reason}");
    let reason = invalid_reason(
        n.nl.set_shaping(n.a.host, "bad/name", &both(LIMITED, LIMITED))
            .unwrap_err(),
    );
    assert!(reason.contains("bad/name"), "{reason}");
    // A link of that name that is not weft's IFB: B's port.
    let reason = invalid_reason(
        n.nl.set_shaping(n.a.host, &n.b.name, &both(LIMITED, LIMITED))
            .unwrap_err(),
    );
    assert!(reason.contains("not weft's IFB"), "{reason}");
    assert!(qdisc_kinds(&port).is_empty(), "{:?}", qdiscs(&port));
    assert!(n.nl.link_by_name(&ifb).unwrap().is_none());

    // Someone's htb at the root: ingress shaping is refused, before anything is done.
    tc(&["qdisc", "add", "dev", &port, "root", "handle", "5:", "htb"]);
    let reason = invalid_reason(
        n.nl.set_shaping(n.a.host, &ifb, &both(LIMITED, LIMITED))
            .unwrap_err(),
    );
    assert!(
        reason.contains("\"htb\"") && reason.contains("tc qdisc del dev sa-host root"),
        "{reason}"
    );
    assert_eq!(root(&port)["kind"], "htb");
    assert_eq!(root(&port)["handle"], "5:");
    assert!(n.nl.link_by_name(&ifb).unwrap().is_none(), "no IFB made");
    assert!(ingress_filters(&port).is_empty());
    // Egress shaping does not need the root, and going back to none leaves the htb.
    let only_egress = Shaping {
        ingress: None,
        egress: Some(LIMITED),
    };
    assert!(n.nl.set_shaping(n.a.host, &ifb, &only_egress).unwrap());
    assert!(
        n.nl.set_shaping(n.a.host, &ifb, &Shaping::default())
            .unwrap()
    );
    assert_eq!(qdisc_kinds(&port), ["htb"]);
    assert_eq!(
        n.nl.shaping_counters(n.a.host, &ifb).unwrap(),
        Default::default(),
        "an htb is not weft's shaping"
    );

    // A plain ingress qdisc in the ingress slot: egress shaping is refused.
    tc(&["qdisc", "add", "dev", &n.b.name, "ingress"]);
    let b_ifb = ifb_of(&n.b);
    let reason = invalid_reason(
        n.nl.set_shaping(n.b.host, &b_ifb, &only_egress)
            .unwrap_err(),
    );
    assert!(reason.contains("\"ingress\" qdisc"), "{reason}");
    assert!(n.nl.link_by_name(&b_ifb).unwrap().is_none());
    assert_eq!(qdisc_kinds(&n.b.name), ["ingress"]);

    for shaping in [both(LIMITED, LIMITED), Shaping::default()] {
        let err = n.nl.set_shaping(999_999, &ifb, &shaping).unwrap_err();
        assert!(err.is_not_found(), "{}", chain(&err));
        assert!(err.to_string().contains("link 999999"), "{err}");
    }
    let err = n.nl.shaping_counters(999_999, &ifb).unwrap_err();
    assert!(err.is_not_found(), "{}", chain(&err));
}

#[test]
fn shaping_the_links_the_caller_found_does_what_a_lookup_of_its_own_does() {
    let mut n = node();
    let (port, ifb) = (n.a.name.clone(), ifb_of(&n.a));
    let egress = EGRESS;
    // Nothing found under the IFB name: the IFB is made, the port shaped both ways.
    let a = n.nl.link_by_name(&port).unwrap().expect("A's port");
    assert!(
        n.nl.set_shaping_found(
            &a,
            &ifb,
            None,
            &both(LIMITED, egress),
            &mut SpareIfbs::default()
        )
        .unwrap()
    );
    assert_tbf(&port, LIMITED);
    assert_tbf(&ifb, egress);
    assert_eq!(prefs(&ingress_filters(&port)), [u64::from(SHAPE_PREF)]);
    // What the pass finds next time: the same again changes nothing.
    let found = n.nl.link_by_name(&ifb).unwrap();
    assert!(found.is_some(), "the IFB");
    assert!(
        !n.nl
            .set_shaping_found(
                &a,
                &ifb,
                found.clone(),
                &both(LIMITED, egress),
                &mut SpareIfbs::default()
            )
            .unwrap()
    );
    // The egress limit lifted with the IFB found: its link and the redirect go.
    assert!(
        n.nl.set_shaping_found(
            &a,
            &ifb,
            found,
            &Shaping {
                ingress: Some(LIMITED),
                egress: None
            },
            &mut SpareIfbs::default()
        )
        .unwrap()
    );
    assert!(
        n.nl.link_by_name(&ifb).unwrap().is_none(),
        "the IFB is gone"
    );
    assert!(ingress_filters(&port).is_empty());
    assert_tbf(&port, LIMITED);
    // A bad rate is refused before anything is touched, as with a lookup of its own.
    let zero = Shaping {
        ingress: Some(Rate {
            bits_per_second: 0,
            burst_bits: 80_000,
        }),
        egress: None,
    };
    let reason = invalid_reason(
        n.nl.set_shaping_found(&a, &ifb, None, &zero, &mut SpareIfbs::default())
            .unwrap_err(),
    );
    assert!(reason.contains("ingress.bits_per_second"), "{reason}");
    assert_tbf(&port, LIMITED);
    // The port gone since it was found: not found, and nothing made for it.
    n.nl.delete_link(n.a.host).unwrap();
    let e =
        n.nl.set_shaping_found(
            &a,
            &ifb,
            None,
            &both(LIMITED, egress),
            &mut SpareIfbs::default(),
        )
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        n.nl.link_by_name(&ifb).unwrap().is_none(),
        "no IFB for a port that is gone"
    );
}

#[test]
fn a_departing_ports_redirect_goes_and_its_ifb_is_kept_or_deleted_its_tbf_left() {
    let mut n = node();
    let egress = EGRESS;
    // A and B shaped both ways; a mirror filter beside A's redirect.
    for w in [&n.a, &n.b] {
        assert!(
            n.nl.set_shaping(w.host, &ifb_of(w), &both(LIMITED, egress))
                .unwrap()
        );
    }
    n.nl.set_mirrors(n.a.host, &[mirror_everything(n.b.host)])
        .unwrap();
    let (a_port, a_ifb) = (n.a.name.clone(), ifb_of(&n.a));
    let a = n.nl.link_by_index(n.a.host).unwrap().expect("A's port");
    let found = n.nl.link_by_name(&a_ifb).unwrap();
    let a_ifb_index = found.as_ref().expect("A's IFB").index;

    // Room for one spare: A's IFB is kept as one, its port's redirect goes, and the rest (the
    // clsact qdisc with the mirror's filters, the root tbf) is left to go with the port.
    let mut spares = SpareIfbs {
        links: Vec::new(),
        cap: 1,
    };
    let mut surplus = Vec::new();
    assert!(
        n.nl.unshape_departing(&a, found.as_ref(), &mut spares, &mut surplus)
            .unwrap()
    );
    assert_eq!(spares.links, [a_ifb_index]);
    assert!(
        surplus.is_empty(),
        "a spare is kept, not left to delete: {surplus:?}"
    );
    let kept = n.nl.link_by_index(a_ifb_index).unwrap().expect("kept");
    assert_eq!(kept.alias.as_deref(), Some(names::SPARE_IFB_ALIAS));
    let left = prefs(&ingress_filters(&a_port));
    assert!(!left.contains(&u64::from(SHAPE_PREF)), "{left:?}");
    assert!(!left.is_empty(), "the mirror's filter stays on the port");
    assert!(
        qdisc_kinds(&a_port).contains(&"clsact".to_string()),
        "{:?}",
        qdiscs(&a_port)
    );
    assert_tbf(&a_port, LIMITED);
    // Again: nothing left to take off.
    let again = n.nl.link_by_name(&a_ifb).unwrap();
    assert!(
        !n.nl
            .unshape_departing(&a, again.as_ref(), &mut spares, &mut surplus)
            .unwrap()
    );
    assert!(surplus.is_empty(), "{surplus:?}");
    // B's shaping is untouched.
    let b_ifb = ifb_of(&n.b);
    assert_tbf(&n.b.name, LIMITED);
    assert_tbf(&b_ifb, egress);
    assert_eq!(prefs(&ingress_filters(&n.b.name)), [u64::from(SHAPE_PREF)]);

    // An IFB found that is not this port's (B's, under A's name) is left alone.
    let b = n.nl.link_by_index(n.b.host).unwrap().expect("B's port");
    let b_found = n.nl.link_by_name(&b_ifb).unwrap();
    n.nl.unshape_departing(
        &a,
        b_found.as_ref(),
        &mut SpareIfbs::default(),
        &mut surplus,
    )
    .unwrap();
    assert!(surplus.is_empty(), "{surplus:?}");
    assert!(
        n.nl.link_by_name(&b_ifb).unwrap().is_some(),
        "B's IFB stays"
    );
    // No room for a spare: B's IFB is left to the caller, who deletes it (with any others)
    // once B departs; its redirect is gone already. Then B's port goes too, and taking the
    // shaping off it again is no error.
    let b_ifb_index = b_found.as_ref().expect("B's IFB").index;
    assert!(
        n.nl.unshape_departing(
            &b,
            b_found.as_ref(),
            &mut SpareIfbs::default(),
            &mut surplus
        )
        .unwrap()
    );
    assert_eq!(surplus, [b_ifb_index]);
    assert!(
        n.nl.link_by_name(&b_ifb).unwrap().is_some(),
        "B's IFB is left to the caller"
    );
    assert!(
        !prefs(&ingress_filters(&n.b.name)).contains(&u64::from(SHAPE_PREF)),
        "B's redirect is gone"
    );
    assert_eq!(n.nl.delete_links(&surplus).unwrap(), 1);
    assert!(
        n.nl.link_by_name(&b_ifb).unwrap().is_none(),
        "B's IFB is gone"
    );
    n.nl.delete_link(n.b.host).unwrap();
    surplus.clear();
    assert!(
        !n.nl
            .unshape_departing(&b, None, &mut SpareIfbs::default(), &mut surplus)
            .unwrap()
    );
    assert!(surplus.is_empty(), "{surplus:?}");
}

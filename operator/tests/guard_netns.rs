//! Privileged test of the `bridge weft` anti-spoofing table (`agent::guard`) with real packets.
//!
//! Each test builds its own lab of named network namespaces: a "node" with a bridge and one
//! veth port per "workload" namespace (a, b, the attacker m, and sometimes an unregistered u),
//! addresses 10.77.0.x/24 and fd77::x/64, and applies the table in the node with `nft`.
//! Namespace names carry the pid and a counter (tests run in parallel), and [`Lab`]'s `Drop`
//! deletes them, also when a test panics; deleting a workload namespace deletes its veth pair.
//! Needs root; fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
#![allow(unsafe_code)] // AF_PACKET sockets for hand-made frames; each block has a SAFETY note

use std::net::Ipv6Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use weft_dataplane::frame;
use weft_dataplane::netlink::{Netlink, VethSpec};
use weft_dataplane::netns::{self, Netns};
use weft_dataplane::nft::{Change, Firewall, NftCli, Table, Transaction};
use weft_operator::agent::guard::{self, OpenPort, Policing, PortGuard};

static COUNTER: AtomicU32 = AtomicU32::new(0);

const BRIDGE: &str = "wn-guard";

/// One workload: its namespace, its host port and its addresses.
struct Workload {
    name: String,
    ns: Netns,
    port: String,
    mac: [u8; 6],
    v4: String,
    v6: String,
}

impl Workload {
    fn guard(&self) -> PortGuard {
        PortGuard {
            ifname: self.port.clone(),
            mac: self.mac,
            ips: vec![self.v4.parse().unwrap(), self.v6.parse().unwrap()],
            pending: false,
            vlans: vec![],
        }
    }
}

struct Lab {
    /// Every named namespace made so far, deleted on drop.
    made: Vec<String>,
    node: Netns,
    node_name: String,
    bridge: u32,
    workloads: Vec<Workload>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.made {
            if let Err(e) = netns::delete_named(name) {
                eprintln!("cannot delete test netns {name}: {e}");
            }
        }
    }
}

fn write_sysctl(ns: &Netns, pairs: &[(&str, &str)]) {
    netns::run_in(ns, || {
        for (path, value) in pairs {
            std::fs::write(format!("/proc/sys/{path}"), value)
                .unwrap_or_else(|e| panic!("write {value} to /proc/sys/{path}: {e}"));
        }
    })
    .unwrap();
}

fn no_dad(ns: &Netns) {
    write_sysctl(
        ns,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ],
    );
}

impl Lab {
    fn new() -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "privileged guard test: run as root (it creates network namespaces, links and nft tables)"
        );
        let id = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let node_name = format!("weft-guard-node-{id}");
        let mut lab = Lab {
            made: vec![],
            node: netns::create_named(&node_name).expect("create the node netns"),
            node_name: node_name.clone(),
            bridge: 0,
            workloads: vec![],
        };
        lab.made.push(node_name);
        no_dad(&lab.node);
        let mut nl = Netlink::in_netns(&lab.node).unwrap();
        let lo = nl.link_by_name("lo").unwrap().unwrap().index;
        nl.set_up(lo).unwrap();
        lab.bridge = nl.create_bridge(BRIDGE, None, None, None).unwrap();
        nl.set_up(lab.bridge).unwrap();
        lab
    }

    /// Adds workload `role` (host port `wf<role>`) with host number `n`.
    fn add(&mut self, role: &str, n: u8) -> usize {
        let name = format!("{}-{role}", self.node_name.replace("node", "wl"));
        let ns = netns::create_named(&name).expect("create a workload netns");
        self.made.push(name.clone());
        no_dad(&ns);
        let mac = [0x0a, 0x58, 10, 77, 0, n];
        let port = format!("wf{role}");
        let mut nl = Netlink::in_netns(&self.node).unwrap();
        let host = nl
            .create_veth_into_netns(&VethSpec {
                host_name: &port,
                host_alias: None,
                host_master: Some(self.bridge),
                peer_name: "eth0",
                peer_netns: ns.fd(),
                peer_mac: Some(mac),
                mtu: None,
            })
            .unwrap();
        nl.set_up(host).unwrap();
        let mut wl = Netlink::in_netns(&ns).unwrap();
        let lo = wl.link_by_name("lo").unwrap().unwrap().index;
        wl.set_up(lo).unwrap();
        let eth = wl.link_by_name("eth0").unwrap().unwrap().index;
        let v4 = format!("10.77.0.{n}");
        let v6 = format!("fd77::{n}");
        wl.add_address(eth, format!("{v4}/24").parse().unwrap(), true)
            .unwrap();
        wl.add_address(eth, format!("{v6}/64").parse().unwrap(), true)
            .unwrap();
        wl.set_up(eth).unwrap();
        self.workloads.push(Workload {
            name,
            ns,
            port,
            mac,
            v4,
            v6,
        });
        self.workloads.len() - 1
    }

    fn w(&self, i: usize) -> &Workload {
        &self.workloads[i]
    }

    /// Replaces the table in the node namespace.
    fn apply(&self, t: &Table) {
        netns::run_in(&self.node, || {
            NftCli::default()
                .apply(&Transaction(vec![Change::ReplaceTable(t.clone())]))
                .unwrap_or_else(|e| panic!("nft must accept the guard table: {e}"))
        })
        .unwrap();
    }

    /// The guard table with `guarded` registered and `open` open.
    fn table(&self, guarded: &[usize], open: &[usize]) -> Table {
        let g: Vec<PortGuard> = guarded.iter().map(|&i| self.w(i).guard()).collect();
        let o: Vec<OpenPort> = open
            .iter()
            .map(|&i| OpenPort {
                ifname: self.w(i).port.clone(),
                pending: false,
            })
            .collect();
        guard::table(&[BRIDGE.to_string()], &g, &o, &Policing::default())
    }
}

/// `ip netns exec <ns> <args…>`.
fn exec(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip netns exec {ns} {args:?}: {e}"))
}

/// `ip -n <ns> <args…>`, which must succeed; returns stdout.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pings `dst` from `from` (source address `src` when given): true when a reply came back.
fn ping(from: &Workload, src: Option<&str>, dst: &str) -> bool {
    let mut args = vec!["ping", "-c", "2", "-i", "0.2", "-W", "1"];
    if let Some(src) = src {
        args.extend(["-I", src]);
    }
    args.push(dst);
    exec(&from.name, &args).status.success()
}

/// A permanent neighbour entry in `w` (so a test exercises one rule, not ARP).
fn static_neigh(w: &Workload, addr: &str, mac: [u8; 6]) {
    ip(
        &w.name,
        &[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &weft_dataplane::names::format_mac(mac),
            "nud",
            "permanent",
            "dev",
            "eth0",
        ],
    );
}

fn neigh_entry(w: &Workload, addr: &str) -> String {
    ip(&w.name, &["neigh", "show", addr, "dev", "eth0"])
        .trim()
        .to_string()
}

/// The index of `eth0` in `w`'s namespace.
fn eth0_index(w: &Workload) -> u32 {
    Netlink::in_netns(&w.ns)
        .unwrap()
        .link_by_name("eth0")
        .unwrap()
        .unwrap()
        .index
}

/// Sends one raw Ethernet frame out of `eth0` in `w`'s namespace.
fn send_frame(w: &Workload, frame: &[u8]) {
    let ifindex = eth0_index(w);
    let frame = frame.to_vec();
    netns::run_in(&w.ns, move || frame::send(ifindex, &frame))
        .unwrap()
        .unwrap_or_else(|e| panic!("sending a raw frame: {e}"));
}

/// A broadcast ARP request from `mac`/`sender_ip` asking for `target_ip`.
fn arp_request(mac: [u8; 6], sender_ip: &str, target_ip: &str) -> Vec<u8> {
    frame::arp_request(mac, sender_ip.parse().unwrap(), target_ip.parse().unwrap())
}

/// An unsolicited router advertisement from `mac`'s EUI-64 link-local address to ff02::1,
/// announcing a default router (lifetime 1800 s).
fn router_advert(mac: [u8; 6]) -> Vec<u8> {
    let src = guard::eui64_link_local(mac).octets();
    let dst: [u8; 16] = "ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    // type 134, code 0, checksum, hop limit 64, flags 0, router lifetime 1800, reachable 0,
    // retrans 0, source link-layer address option.
    let mut icmp = vec![
        134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
    ];
    icmp.extend(mac);
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u32::from(*b));
            sum += hi | lo;
        }
    };
    add(&src);
    add(&dst);
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());

    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend(mac);
    f.extend([0x86, 0xdd]);
    f.extend([0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, 255]); // ICMPv6, hop limit 255
    f.extend(src);
    f.extend(dst);
    f.extend(icmp);
    f
}

/// Waits until `cond` holds (true) or 3 s passed (false).
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..30 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn guarded_workloads_reach_each_other_over_ipv4_and_ipv6() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    lab.apply(&lab.table(&[a, b], &[]));
    let (wa, wb) = (lab.w(a), lab.w(b));
    assert!(
        ping(wa, None, &wb.v4),
        "a must reach b over IPv4 through the guards (ARP included)"
    );
    assert!(
        ping(wb, None, &wa.v4),
        "b must reach a over IPv4 through the guards"
    );
    assert!(
        ping(wa, None, &wb.v6),
        "a must reach b over IPv6 through the guards (neighbour discovery included)"
    );
    let ll_b = format!("{}%eth0", guard::eui64_link_local(wb.mac));
    assert!(
        ping(wa, None, &ll_b),
        "a must reach b's EUI-64 link-local address"
    );
}

#[test]
fn a_foreign_source_address_does_not_reach_the_victim() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, m], &[]));
    let (wa, wm) = (lab.w(a), lab.w(m));
    ip(&wm.name, &["addr", "add", "10.77.0.99/32", "dev", "eth0"]);
    // Static neighbours on both sides: only the IPv4 source check can stop the ping.
    static_neigh(wm, &wa.v4, wa.mac);
    static_neigh(wa, "10.77.0.99", wm.mac);
    static_neigh(wa, &wm.v4, wm.mac);
    assert!(
        ping(wm, Some(&wm.v4), &wa.v4),
        "m must reach a from its own address (control)"
    );
    assert!(
        !ping(wm, Some("10.77.0.99"), &wa.v4),
        "m must NOT reach a from the foreign address 10.77.0.99"
    );
    // IPv6 likewise.
    ip(
        &wm.name,
        &["addr", "add", "fd77::99/128", "dev", "eth0", "nodad"],
    );
    assert!(
        ping(wm, Some(&wm.v6), &wa.v6),
        "m must reach a over IPv6 from its own address (control)"
    );
    static_neigh(wa, "fd77::99", wm.mac);
    assert!(
        !ping(wm, Some("fd77::99"), &wa.v6),
        "m must NOT reach a over IPv6 from the foreign address fd77::99"
    );
}

#[test]
fn a_foreign_mac_does_not_reach_the_victim() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, m], &[]));
    let (wa, wm) = (lab.w(a), lab.w(m));
    assert!(
        ping(wm, None, &wa.v4),
        "m must reach a with its own MAC (control)"
    );
    let foreign = [0x02, 0, 0, 0, 0, 0x99];
    let eth = eth0_index(wm);
    Netlink::in_netns(&wm.ns)
        .unwrap()
        .set_mac(eth, foreign)
        .unwrap();
    // a keeps m's IP pointed at the foreign MAC, so ARP plays no part: only the source MAC
    // check can stop the ping.
    static_neigh(wa, &wm.v4, foreign);
    static_neigh(wm, &wa.v4, wa.mac);
    assert!(
        !ping(wm, None, &wa.v4),
        "m must NOT reach a with the foreign MAC 02:00:00:00:00:99"
    );
}

#[test]
fn an_arp_request_with_a_foreign_sender_ip_teaches_the_victim_nothing() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, m], &[]));
    let (wa, wm) = (lab.w(a), lab.w(m));
    send_frame(wm, &arp_request(wm.mac, "10.77.0.99", &wa.v4));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        neigh_entry(wa, "10.77.0.99"),
        "",
        "a must NOT learn a neighbour entry for 10.77.0.99 from m's spoofed ARP request"
    );
    // Control: the same request with m's real address does teach a.
    send_frame(wm, &arp_request(wm.mac, &wm.v4, &wa.v4));
    assert!(
        eventually(|| neigh_entry(wa, &wm.v4).contains("0a:58:0a:4d:00:04")),
        "a must learn m's address from m's genuine ARP request (control), got {:?}",
        neigh_entry(wa, &wm.v4)
    );
}

#[test]
fn an_unregistered_port_is_dropped_until_it_is_registered() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let u = lab.add("u", 5);
    lab.apply(&lab.table(&[a], &[]));
    assert!(
        !ping(lab.w(u), None, &lab.w(a).v4),
        "a port on the bridge but in neither `ports` nor `open` must NOT reach a"
    );
    lab.apply(&lab.table(&[a, u], &[]));
    assert!(
        ping(lab.w(u), None, &lab.w(a).v4),
        "the same port must reach a once registered (control)"
    );
    // Open ports are not checked: a foreign source gets through.
    lab.apply(&lab.table(&[a], &[u]));
    let (wa, wu) = (lab.w(a), lab.w(u));
    ip(&wu.name, &["addr", "add", "10.77.0.98/32", "dev", "eth0"]);
    static_neigh(wu, &wa.v4, wa.mac);
    static_neigh(wa, "10.77.0.98", wu.mac);
    assert!(
        ping(wu, Some("10.77.0.98"), &wa.v4),
        "a port in `open` must reach a even from a foreign address (not checked)"
    );
}

#[test]
fn a_router_advertisement_from_a_workload_is_dropped() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    write_sysctl(&lab.w(a).ns, &[("net/ipv6/conf/eth0/accept_ra", "2")]);
    let default_route = |lab: &Lab| ip(&lab.w(a).name, &["-6", "route", "show", "default"]);
    lab.apply(&lab.table(&[a, m], &[]));
    send_frame(lab.w(m), &router_advert(lab.w(m).mac));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        default_route(&lab).trim(),
        "",
        "a must NOT install a default route from m's router advertisement"
    );
    // Control: without the RA rule the same advertisement installs a default route via m.
    let mut t = lab.table(&[a, m], &[]);
    t.chains[0]
        .rules
        .retain(|r| !r.contains("nd-router-advert"));
    lab.apply(&t);
    send_frame(lab.w(m), &router_advert(lab.w(m).mac));
    let ll_m = guard::eui64_link_local(lab.w(m).mac).to_string();
    assert!(
        eventually(|| default_route(&lab).contains(&ll_m)),
        "without the RA rule, m's advertisement must install a default route via {ll_m} (control), got {:?}",
        default_route(&lab)
    );
}

#[test]
fn the_table_lists_back_without_a_diff() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let t = lab.table(&[a, b], &[]);
    lab.apply(&t);
    let state = netns::run_in(&lab.node, || {
        NftCli::default()
            .list_table(weft_dataplane::nft::Family::Bridge, "weft")
            .unwrap()
            .expect("the bridge weft table exists")
    })
    .unwrap();
    let tx = weft_dataplane::nft::diff(&state.to_table(&t), &t);
    assert!(
        tx.is_empty(),
        "the listed table must equal the desired one (elements in nft's text form), diff: {tx:?}"
    );
}

/// Whether `w` sees a frame containing `marker` on its `eth0` (an `ETH_P_ALL` packet socket,
/// which sees frames before the stack drops them) while `during` runs, waiting up to 1.5 s.
fn sniff(w: &Workload, marker: &[u8], during: impl FnOnce()) -> bool {
    sniff_frames(w, marker, false, during)
}

/// [`sniff`], of the frames `w` receives only (not `PACKET_OUTGOING`: not its own).
fn sniff_incoming(w: &Workload, marker: &[u8], during: impl FnOnce()) -> bool {
    sniff_frames(w, marker, true, during)
}

fn sniff_frames(w: &Workload, marker: &[u8], incoming_only: bool, during: impl FnOnce()) -> bool {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ifindex = eth0_index(w);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let sniffer = scope.spawn(|| {
            netns::run_in(&w.ns, || {
                let all = (libc::ETH_P_ALL as u16).to_be();
                // SAFETY: a plain syscall without pointers.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: `fd` is a fresh descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let addr = libc::sockaddr_ll {
                    sll_family: libc::AF_PACKET as u16,
                    sll_protocol: all,
                    sll_ifindex: ifindex as i32,
                    sll_hatype: 0,
                    sll_pkttype: 0,
                    sll_halen: 0,
                    sll_addr: [0; 8],
                };
                // SAFETY: `addr` is valid for the length passed.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        std::ptr::from_ref(&addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                // SAFETY: `tv` is valid for the length passed.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        std::ptr::from_ref(&tv).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
                ready_tx.send(()).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_millis(1500);
                let mut buf = [0u8; 2048];
                while std::time::Instant::now() < deadline {
                    // SAFETY: an all-zero `sockaddr_ll` is valid.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: `buf` and `from` are valid for writes of the lengths passed.
                    let n = unsafe {
                        libc::recvfrom(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            std::ptr::from_mut(&mut from).cast(),
                            &mut len,
                        )
                    };
                    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                    if n > 0
                        && !(incoming_only && outgoing)
                        && buf[..n as usize].windows(marker.len()).any(|x| x == marker)
                    {
                        return true;
                    }
                }
                false
            })
            .unwrap()
        });
        ready_rx.recv().unwrap();
        during();
        sniffer.join().unwrap()
    })
}

/// A broadcast 802.1Q frame (VLAN 5, local experimental ethertype 0x88b5) carrying `marker`.
fn tagged_frame(mac: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x81, 0x00, 0x00, 0x05, 0x88, 0xb5]);
    f.extend(marker);
    f.resize(64, 0);
    f
}

#[test]
fn vlan_tagged_frames_from_a_workload_are_dropped() {
    // This kernel may lack 802.1Q devices: hand-made tagged frames, seen by a packet socket.
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    let marker = b"weft-vlan-probe";
    lab.apply(&lab.table(&[a, m], &[]));
    let frame = tagged_frame(lab.w(m).mac, marker);
    assert!(
        !sniff(lab.w(a), marker, || send_frame(lab.w(m), &frame)),
        "a must NOT see m's 802.1Q-tagged frame (tagged frames are dropped)"
    );
    // Control: without the ethertype rules the tagged frame gets through, since no other rule
    // looks inside a tagged frame.
    let mut t = lab.table(&[a, m], &[]);
    t.chains[0].rules.retain(|r| !r.starts_with("ether type"));
    lab.apply(&t);
    assert!(
        sniff(lab.w(a), marker, || send_frame(lab.w(m), &frame)),
        "without the ethertype rules a must see m's tagged frame (control)"
    );
}

/// A broadcast 802.1Q frame on VLAN `vid` from `src` carrying `marker`.
fn tagged_on(vid: u16, src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(src);
    f.extend([0x81, 0x00]);
    f.extend(vid.to_be_bytes());
    f.extend([0x88, 0xb5]);
    f.extend(marker);
    f.resize(64, 0);
    f
}

#[test]
fn a_trunk_port_passes_its_own_vlans_from_its_own_mac_only() {
    // A bridge without VLAN filtering forwards tagged frames as they are, so the guard's
    // decision is all that stands between m's tagged frames and a.
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    // First registered as an access port; its trunk VLANs are then one element change, which
    // goes over netlink (the element fast path must encode `iifname . vlan id` as nft does).
    lab.apply(&lab.table(&[a, m], &[]));
    let mut trunk = lab.w(m).guard();
    trunk.vlans = vec![20, 100];
    let with_trunk = guard::table(
        &[BRIDGE.to_string()],
        &[lab.w(a).guard(), trunk],
        &[],
        &Policing::default(),
    );
    let tx = weft_dataplane::nft::diff(&lab.table(&[a, m], &[]), &with_trunk);
    assert!(
        tx.0.iter().all(|c| matches!(c, Change::AddElements { .. })),
        "{tx:?}"
    );
    netns::run_in(&lab.node, || NftCli::default().apply(&tx))
        .unwrap()
        .unwrap();
    let state = netns::run_in(&lab.node, || {
        NftCli::default()
            .list_table(weft_dataplane::nft::Family::Bridge, "weft")
            .unwrap()
            .expect("the bridge weft table exists")
    })
    .unwrap();
    let back = weft_dataplane::nft::diff(&state.to_table(&with_trunk), &with_trunk);
    assert!(
        back.is_empty(),
        "the trunk elements must list back as written (\"wfm\" . 20), diff: {back:?}"
    );
    let (wa, wm) = (lab.w(a), lab.w(m));
    let cases: [(&str, u16, [u8; 6], bool); 5] = [
        ("VLAN 20 from m's MAC", 20, wm.mac, true),
        ("VLAN 100 from m's MAC", 100, wm.mac, true),
        ("VLAN 30, not in m's trunk", 30, wm.mac, false),
        (
            "VLAN 20 from a foreign MAC",
            20,
            [0x02, 0, 0, 0, 0, 0x99],
            false,
        ),
        ("priority-tagged (VLAN 0)", 0, wm.mac, false),
    ];
    for (i, (what, vid, src, passes)) in cases.into_iter().enumerate() {
        let marker = format!("weft-trunk-probe-{i}");
        let frame = tagged_on(vid, src, marker.as_bytes());
        assert_eq!(
            sniff(wa, marker.as_bytes(), || send_frame(wm, &frame)),
            passes,
            "{what}: a must {}see m's tagged frame",
            if passes { "" } else { "NOT " }
        );
    }
    // a is an access port: its tagged frames stay dropped, whatever the VLAN.
    let marker = b"weft-access-probe";
    let frame = tagged_on(20, wa.mac, marker);
    assert!(
        !sniff(wm, marker, || send_frame(wa, &frame)),
        "m must NOT see a tagged frame from the access port a"
    );
    // Untagged frames of the trunk port keep every check: m still reaches a from its own
    // address only.
    assert!(
        ping(wm, None, &wa.v4),
        "m's untagged traffic passes (control)"
    );
}

/// Port `t` of a two-workload lab, held pending by the table `with(lab, a, t, true)`: nothing
/// passes it either way, and its VM's announcement is logged; activated
/// (`with(lab, a, t, false)`: one element less), it passes.
fn held_pending_until_activated(with: impl Fn(&Lab, usize, usize, bool) -> Table) {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let t = lab.add("t", 6);
    lab.apply(&with(&lab, a, t, true));
    // Static neighbours: no ARP needed, so only the pending rules can stop the pings.
    let (wa, wt) = (lab.w(a), lab.w(t));
    static_neigh(wa, &wt.v4, wt.mac);
    static_neigh(wt, &wa.v4, wa.mac);
    assert!(!ping(wt, None, &wa.v4), "nothing may leave a pending port");
    assert!(!ping(wa, None, &wt.v4), "nothing may reach a pending port");
    let listed = exec(
        &lab.node_name,
        &["nft", "list", "chain", "bridge", "weft", "prerouting"],
    );
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains("ether type 0x8035 log prefix \"weft activate \" group 2727 drop"),
        "the VM's announcement is logged for the agent:\n{listed}"
    );
    lab.apply(&with(&lab, a, t, false));
    assert!(ping(wt, None, &wa.v4), "an active port passes (control)");
}

#[test]
fn a_pending_migration_target_passes_nothing_either_way_until_activated() {
    held_pending_until_activated(|lab, a, t, pending| {
        let mut g: Vec<PortGuard> = vec![lab.w(a).guard(), lab.w(t).guard()];
        g[1].pending = pending;
        guard::table(&[BRIDGE.to_string()], &g, &[], &Policing::default())
    });
}

#[test]
fn a_pending_target_on_a_network_without_anti_spoofing_waits_too() {
    held_pending_until_activated(|lab, a, t, pending| {
        guard::table(
            &[BRIDGE.to_string()],
            &[lab.w(a).guard()],
            &[OpenPort {
                ifname: lab.w(t).port.clone(),
                pending,
            }],
            &Policing::default(),
        )
    });
}

fn v6(addr: &str) -> Ipv6Addr {
    addr.parse().unwrap()
}

/// A stale neighbour entry in `w` for `addr` at `mac`: an advertisement with the override flag
/// updates it (a cache takes nothing from an unsolicited advertisement for an address it has
/// no entry for), and so does a solicitation's source link-layer address.
fn stale_neigh(w: &Workload, addr: &str, mac: [u8; 6]) {
    ip(
        &w.name,
        &[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &weft_dataplane::names::format_mac(mac),
            "nud",
            "stale",
            "dev",
            "eth0",
        ],
    );
}

/// Whether `w`'s neighbour entry for `addr` points at `mac`.
fn neigh_is(w: &Workload, addr: &str, mac: [u8; 6]) -> bool {
    neigh_entry(w, addr).contains(&format!(
        "lladdr {} ",
        weft_dataplane::names::format_mac(mac)
    ))
}

/// The guard table of `lab` with `guarded` registered, less the rules `drop_rule` picks.
fn table_without(lab: &Lab, guarded: &[usize], drop_rule: impl Fn(&str) -> bool) -> Table {
    let mut t = lab.table(guarded, &[]);
    let before = t.chains[0].rules.len();
    // The checks drop through the counting chain; `drop_rule` names them as they drop.
    let counted = format!(" goto {}", guard::DROP_CHAIN);
    t.chains[0].rules.retain(|r| {
        let plain = r
            .strip_suffix(&counted)
            .map_or_else(|| r.clone(), |m| format!("{m} drop"));
        !drop_rule(&plain)
    });
    assert!(t.chains[0].rules.len() < before, "no rule was left out");
    t
}

const NA_TARGET_RULE: &str =
    "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @targets6 drop";

#[test]
fn a_neighbour_advertisement_for_another_workloads_address_is_dropped() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, b, m], &[]));
    let (wa, wb, wm) = (lab.w(a), lab.w(b), lab.w(m));
    let advert = |target: &str| {
        frame::neighbour_advert(
            wm.mac,
            v6(&wm.v6),
            v6(target),
            &frame::lladdr_option(2, wm.mac),
        )
    };
    // m's own address passes: a's entry for it follows the advertisement.
    stale_neigh(wa, &wm.v6, [0x02, 0, 0, 0, 0, 0x99]);
    send_frame(wm, &advert(&wm.v6));
    assert!(
        eventually(|| neigh_is(wa, &wm.v6, wm.mac)),
        "a must take m's advertisement of its own address (control), got {:?}",
        neigh_entry(wa, &wm.v6)
    );
    // b's address does not: a keeps b's MAC for it.
    stale_neigh(wa, &wb.v6, wb.mac);
    send_frame(wm, &advert(&wb.v6));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        neigh_is(wa, &wb.v6, wb.mac),
        "a must NOT point b's address at m after m advertised it, got {:?}",
        neigh_entry(wa, &wb.v6)
    );
    // Control: without the target rule the same advertisement takes b's address.
    lab.apply(&table_without(&lab, &[a, b, m], |r| r == NA_TARGET_RULE));
    send_frame(wm, &advert(&wb.v6));
    assert!(
        eventually(|| neigh_is(wa, &wb.v6, wm.mac)),
        "without the target rule, m's advertisement must point b's address at m (control), got {:?}",
        neigh_entry(wa, &wb.v6)
    );
}

#[test]
fn a_link_layer_address_option_with_a_foreign_mac_is_dropped() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, b, m], &[]));
    let (wa, wb, wm) = (lab.w(a), lab.w(b), lab.w(m));
    let foreign_tlla = frame::lladdr_option(2, wb.mac);
    // An unknown option first: receivers skip it and take the link-layer address after it.
    let mut smuggled = vec![99, 1, 0, 0, 0, 0, 0, 0];
    smuggled.extend(foreign_tlla);
    let forged = [
        (
            "an advertisement of m's own address with b's MAC as target link-layer address",
            frame::neighbour_advert(wm.mac, v6(&wm.v6), v6(&wm.v6), &foreign_tlla),
        ),
        (
            "the same behind an unknown option",
            frame::neighbour_advert(wm.mac, v6(&wm.v6), v6(&wm.v6), &smuggled),
        ),
        (
            "a solicitation for a's address with b's MAC as source link-layer address",
            frame::neighbour_solicit(
                wm.mac,
                v6(&wm.v6),
                v6(&wa.v6),
                &frame::lladdr_option(1, wb.mac),
            ),
        ),
    ];
    for (what, f) in &forged {
        stale_neigh(wa, &wm.v6, wm.mac);
        send_frame(wm, f);
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            neigh_is(wa, &wm.v6, wm.mac),
            "a must NOT point m's address at b's MAC after {what}, got {:?}",
            neigh_entry(wa, &wm.v6)
        );
    }
    // Control: without the option length and link-layer address rules each of them does.
    lab.apply(&table_without(&lab, &[a, b, m], |r| {
        r == guard::ND_RULES[1] || r == guard::ND_RULES[5]
    }));
    for (what, f) in &forged {
        stale_neigh(wa, &wm.v6, wm.mac);
        send_frame(wm, f);
        assert!(
            eventually(|| neigh_is(wa, &wm.v6, wb.mac)),
            "without the option rules, {what} must point m's address at b's MAC (control), got {:?}",
            neigh_entry(wa, &wm.v6)
        );
    }
}

#[test]
fn solicitations_claiming_what_is_not_the_workloads_own_are_dropped() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let m = lab.add("m", 4);
    // An open port gets every copy that passes the guard (a guarded one only the questions it
    // could answer): what passes m's port is watched there.
    let o = lab.add("o", 5);
    lab.apply(&lab.table(&[a, b, m], &[o]));
    let (wa, wb, wm, wo) = (lab.w(a), lab.w(b), lab.w(m), lab.w(o));
    // Duplicate address detection as Linux sends it: from ::, with a nonce option.
    let nonce = [14, 1, 1, 2, 3, 4, 5, 6];
    let probe =
        |target: &str| frame::neighbour_solicit(wm.mac, Ipv6Addr::UNSPECIFIED, v6(target), &nonce);
    let solicit =
        |mac: [u8; 6]| frame::router_solicit(wm.mac, v6(&wm.v6), &frame::lladdr_option(1, mac));
    // The ICMPv6 message (after the 54 bytes of Ethernet and IPv6 header) is the marker.
    let sees = |w: &Workload, f: Vec<u8>| sniff(w, &f[54..], || send_frame(wm, &f));
    for w in [wa, wo] {
        assert!(
            !sees(w, probe(&wb.v6)),
            "{} must NOT see m's duplicate address probe for b's address",
            w.port
        );
    }
    assert!(
        sees(wo, probe(&wm.v6)),
        "o must see m's probe for its own address (control)"
    );
    assert!(
        !sees(wo, solicit(wb.mac)),
        "o must NOT see m's router solicitation with b's MAC"
    );
    assert!(
        sees(wo, solicit(wm.mac)),
        "o must see m's router solicitation with its own MAC (control)"
    );
}

/// Sends one UDP datagram carrying `marker` from `w`, bound to `src:sport`, to `dst:dport`.
fn udp_send(w: &Workload, src: &str, sport: u16, dst: &str, dport: u16, marker: &[u8]) {
    let src: std::net::IpAddr = src.parse().unwrap();
    let dst: std::net::IpAddr = dst.parse().unwrap();
    netns::run_in(&w.ns, || {
        let s = std::net::UdpSocket::bind((src, sport))
            .unwrap_or_else(|e| panic!("bind {src} port {sport}: {e}"));
        s.send_to(marker, (dst, dport))
            .unwrap_or_else(|e| panic!("send to {dst} port {dport}: {e}"));
    })
    .unwrap();
}

#[test]
fn dhcp_server_messages_are_dropped_whatever_their_source_port() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    lab.apply(&lab.table(&[a, m], &[]));
    let (wa, wm) = (lab.w(a), lab.w(m));
    // Static neighbours: no address resolution, so only the guard decides.
    static_neigh(wm, &wa.v4, wa.mac);
    static_neigh(wm, &wa.v6, wa.mac);
    // (what, source address, source port, destination, destination port, passes)
    let cases: [(&str, &str, u16, &str, u16, bool); 8] = [
        ("a DHCPv4 offer from 67", &wm.v4, 67, &wa.v4, 68, false),
        ("a DHCPv4 offer from 6767", &wm.v4, 6767, &wa.v4, 68, false),
        (
            "a broadcast DHCPv4 offer from 6767",
            &wm.v4,
            6767,
            "10.77.0.255",
            68,
            false,
        ),
        (
            "a DHCPv6 advertise from 547",
            &wm.v6,
            547,
            &wa.v6,
            546,
            false,
        ),
        (
            "a DHCPv6 advertise from 5470",
            &wm.v6,
            5470,
            &wa.v6,
            546,
            false,
        ),
        (
            "m's own DHCPv4 request (68 → 67)",
            &wm.v4,
            68,
            &wa.v4,
            67,
            true,
        ),
        (
            "m's own DHCPv6 solicit (546 → 547)",
            &wm.v6,
            546,
            &wa.v6,
            547,
            true,
        ),
        ("other UDP from 6767", &wm.v4, 6767, &wa.v4, 6768, true),
    ];
    for (i, (what, src, sport, dst, dport, passes)) in cases.into_iter().enumerate() {
        let marker = format!("weft-dhcp-probe-{i}");
        let broadcast = dst.ends_with(".255");
        let send = || {
            if broadcast {
                netns::run_in(&wm.ns, || {
                    let s = std::net::UdpSocket::bind((
                        src.parse::<std::net::IpAddr>().unwrap(),
                        sport,
                    ))
                    .unwrap();
                    s.set_broadcast(true).unwrap();
                    s.send_to(marker.as_bytes(), (dst, dport)).unwrap();
                })
                .unwrap();
            } else {
                udp_send(wm, src, sport, dst, dport, marker.as_bytes());
            }
        };
        assert_eq!(
            sniff(wa, marker.as_bytes(), send),
            passes,
            "{what}: a must {}see it",
            if passes { "" } else { "NOT " }
        );
    }
}

/// The "LAN router" of a bridge network: namespace `r` behind the node's uplink port `up0`
/// (not a `wf…` port, so the guard leaves it alone, like a real uplink), at 10.77.0.1 and
/// fd77::1 with MAC 02:00:00:00:00:01. Returns its namespace name.
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn add_router(lab: &mut Lab) -> String {
    let name = format!("{}-r", lab.node_name.replace("node", "wl"));
    let ns = netns::create_named(&name).expect("create the router netns");
    lab.made.push(name.clone());
    no_dad(&ns);
    let mut nl = Netlink::in_netns(&lab.node).unwrap();
    let up = nl
        .create_veth_into_netns(&VethSpec {
            host_name: "up0",
            host_alias: None,
            host_master: Some(lab.bridge),
            peer_name: "eth0",
            peer_netns: ns.fd(),
            peer_mac: Some(ROUTER_MAC),
            mtu: None,
        })
        .unwrap();
    nl.set_up(up).unwrap();
    let mut r = Netlink::in_netns(&ns).unwrap();
    let eth = r.link_by_name("eth0").unwrap().unwrap().index;
    r.add_address(eth, "10.77.0.1/24".parse().unwrap(), true)
        .unwrap();
    r.add_address(eth, "fd77::1/64".parse().unwrap(), true)
        .unwrap();
    r.set_up(eth).unwrap();
    name
}

/// The bridge port the node's FDB holds `mac` on, if any.
fn fdb_port(lab: &Lab, mac: [u8; 6]) -> Option<String> {
    let mac = weft_dataplane::names::format_mac(mac);
    let out = Command::new("bridge")
        .args(["-n", &lab.node_name, "fdb", "show", "br", BRIDGE])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&mac) && !l.contains("permanent"))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "dev")?;
            words.next().map(str::to_string)
        })
}

/// A frame from `src` to `dst` (ethertype 0x88b5) the attacker sends to move an FDB entry.
fn frame_from(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend(src);
    f.extend(ethertype);
    f.extend(b"weft-fdb-probe");
    f.resize(64, 0);
    f
}

#[test]
fn an_attacker_port_teaches_the_bridge_neither_a_workloads_mac_nor_the_routers() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let m = lab.add("m", 4);
    let router = add_router(&mut lab);
    lab.apply(&lab.table(&[a, m], &[]));
    let (wa, wm) = (lab.w(a), lab.w(m));
    assert!(
        ping(wa, None, "10.77.0.1"),
        "a reaches the router (control)"
    );
    assert_eq!(fdb_port(&lab, wa.mac).as_deref(), Some("wfa"));
    assert_eq!(fdb_port(&lab, ROUTER_MAC).as_deref(), Some("up0"));
    // Link-local destinations: LLDP (learned with no netfilter hook on the way), 802.1X
    // (after the bridge `input` hook), STP's group address; then a broadcast and a unicast
    // frame, which the guard's source MAC check drops in `prerouting`.
    let destinations: [([u8; 6], [u8; 2]); 5] = [
        ([0x01, 0x80, 0xc2, 0, 0, 0x0e], [0x88, 0xcc]),
        ([0x01, 0x80, 0xc2, 0, 0, 0x03], [0x88, 0x8e]),
        ([0x01, 0x80, 0xc2, 0, 0, 0x00], [0x88, 0xb5]),
        ([0xff; 6], [0x88, 0xb5]),
        (ROUTER_MAC, [0x88, 0xb5]),
    ];
    for (victim, holder) in [(wa.mac, "wfa"), (ROUTER_MAC, "up0")] {
        for (dst, ethertype) in destinations {
            send_frame(wm, &frame_from(dst, victim, ethertype));
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                fdb_port(&lab, victim).as_deref(),
                Some(holder),
                "m's frame to {} from {} must NOT move the FDB entry off {holder}",
                weft_dataplane::names::format_mac(dst),
                weft_dataplane::names::format_mac(victim),
            );
        }
    }
    // The victim still gets its traffic, from the router and from m.
    let to_a = exec(
        &router,
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", &wa.v4],
    );
    assert!(
        to_a.status.success(),
        "the router must still reach a: {}",
        String::from_utf8_lossy(&to_a.stdout)
    );
    assert!(ping(wm, None, &wa.v4), "m reaches a at a's own port");
    assert_eq!(fdb_port(&lab, wa.mac).as_deref(), Some("wfa"));
}

#[test]
fn a_hairpin_port_never_gets_its_own_broadcasts_and_multicasts_back() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    // b open: it gets every other copy of a's questions (a guarded port only those it could
    // answer).
    let b = lab.add("b", 3);
    lab.apply(&lab.table(&[a], &[b]));
    let mut nl = Netlink::in_netns(&lab.node).unwrap();
    for w in [a, b] {
        let port = nl.link_by_name(&lab.w(w).port).unwrap().unwrap().index;
        nl.set_port_hairpin(port, true).unwrap();
        let back = nl.link_by_index(port).unwrap().unwrap();
        assert_eq!(back.hairpin, Some(true), "a dump reads hairpin mode back");
    }
    let (wa, wb) = (lab.w(a), lab.w(b));
    // a's own gratuitous ARP (broadcast) and duplicate address probe (multicast, as Linux sends
    // it: from ::, with a nonce), both of a's own address, which a guarded a could answer (so
    // that no other rule keeps them from it); the bytes after the Ethernet and IP headers are
    // the marker.
    let arp = arp_request(wa.mac, &wa.v4, &wa.v4);
    let probe = frame::neighbour_solicit(
        wa.mac,
        Ipv6Addr::UNSPECIFIED,
        v6(&wa.v6),
        &[14, 1, 1, 2, 3, 4, 5, 6],
    );
    let frames = [
        ("a's gratuitous ARP (broadcast)", &arp, &arp[14..]),
        (
            "a's duplicate address probe (multicast)",
            &probe,
            &probe[54..],
        ),
    ];
    for (what, f, marker) in frames {
        assert!(
            !sniff_incoming(wa, marker, || send_frame(wa, f)),
            "{what} must NOT come back to a"
        );
        assert!(
            sniff_incoming(wb, marker, || send_frame(wa, f)),
            "{what} still reaches b (control)"
        );
    }
    // Control: without the rule the bridge floods a's broadcast back to it.
    let mut t = lab.table(&[a], &[b]);
    t.chains[1].rules.retain(|r| r != guard::HAIRPIN_FLOOD_RULE);
    lab.apply(&t);
    for (what, f, marker) in frames {
        assert!(
            sniff_incoming(wa, marker, || send_frame(wa, f)),
            "without the rule {what} comes back to a (control)"
        );
    }
    assert!(ping(wa, None, &wb.v4), "a reaches b with hairpin on");
}

/// Bytes `w`'s `eth0` has received.
fn rx_bytes(w: &Workload) -> u64 {
    Netlink::in_netns(&w.ns)
        .unwrap()
        .link_stats()
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "eth0")
        .map(|(_, s)| s.rx_bytes)
        .unwrap()
}

/// Sends 1,000-byte UDP datagrams from `from` to `to` as fast as it can for `secs` seconds;
/// returns how long it sent, in seconds.
fn udp_flood(from: &Workload, to: &Workload, secs: f64) -> f64 {
    let dst: std::net::SocketAddr = format!("{}:9", to.v4).parse().unwrap();
    netns::run_in(&from.ns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = [0x5au8; 1000];
        let start = std::time::Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            // A full socket buffer is no error here.
            let _ = socket.send_to(&payload, dst);
        }
        start.elapsed().as_secs_f64()
    })
    .unwrap()
}

#[test]
fn a_policed_port_sends_no_more_than_its_rate_and_its_drops_are_counted() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let c = lab.add("c", 4);
    // 4 Mbit/s (500,000 bytes a second), a burst of 32 KiB, for a alone.
    let rate = weft_dataplane::proto::Rate {
        bits_per_second: 4_000_000,
        burst_bits: 32 * 1024 * 8,
    };
    let g: Vec<PortGuard> = [a, b, c].iter().map(|&i| lab.w(i).guard()).collect();
    let policing = Policing {
        ports: [(lab.w(a).port.clone(), rate)].into(),
        standing: Default::default(),
    };
    lab.apply(&guard::table(&[BRIDGE.to_string()], &g, &[], &policing));
    for from in [a, c] {
        static_neigh(lab.w(from), &lab.w(b).v4, lab.w(b).mac);
    }
    let received = |from: usize| {
        let before = rx_bytes(lab.w(b));
        let secs = udp_flood(lab.w(from), lab.w(b), 1.5);
        // What is still in flight arrives.
        std::thread::sleep(Duration::from_millis(200));
        (rx_bytes(lab.w(b)) - before, secs)
    };
    let (policed, secs) = received(a);
    // The meter passes the rate, one second's worth more (its bucket) and the burst; each
    // frame counts 14 bytes of Ethernet header more at the receiver than at the meter.
    let bound = (500_000.0 * (secs + 0.2 + 1.0) + 32_768.0) * 1.02;
    let (free, _) = received(c);
    eprintln!(
        "policed port: {policed} bytes in {secs:.2} s (bound {bound:.0}); unpoliced: {free} bytes"
    );
    assert!(
        (policed as f64) <= bound,
        "a policed port got {policed} bytes through in {secs:.2} s, more than {bound:.0}"
    );
    assert!(
        free as f64 > 2.0 * bound,
        "the unpoliced sender must outrun the bound for the comparison to mean anything: {free}"
    );
    let drops = exec(
        &lab.node_name,
        &[
            "nft",
            "list",
            "set",
            "bridge",
            "weft",
            guard::POLICE_DROPS_SET,
        ],
    );
    let listed = String::from_utf8_lossy(&drops.stdout);
    assert!(
        listed.contains(&format!("\"{}\" counter packets", lab.w(a).port)),
        "{listed}"
    );
    assert!(!listed.contains(&lab.w(c).port), "{listed}");
}

/// Joins IPv6 group `group` (and IPv4 group `group4` when given) on `w`'s `eth0`: its kernel
/// sends the membership reports, as a workload's does. The sockets hold the memberships.
fn join(w: &Workload, group: &str, group4: Option<&str>) -> Vec<std::net::UdpSocket> {
    let ifindex = eth0_index(w);
    let group: Ipv6Addr = group.parse().unwrap();
    let group4: Option<std::net::Ipv4Addr> = group4.map(|g| g.parse().unwrap());
    let local4: std::net::Ipv4Addr = w.v4.parse().unwrap();
    netns::run_in(&w.ns, move || {
        let v6 = std::net::UdpSocket::bind("[::]:0").unwrap();
        v6.join_multicast_v6(&group, ifindex).unwrap();
        let mut held = vec![v6];
        if let Some(g) = group4 {
            let v4 = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            v4.join_multicast_v4(&g, &local4).unwrap();
            held.push(v4);
        }
        held
    })
    .unwrap()
}

/// Which of `receivers` see a frame holding `marker` while `during` runs.
fn seen_by(lab: &Lab, receivers: &[usize], marker: &[u8], during: impl FnOnce()) -> Vec<bool> {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    std::thread::scope(|scope| {
        let sniffers: Vec<_> = receivers
            .iter()
            .map(|&i| {
                let go_rx = &go_rx;
                scope.spawn(move || {
                    sniff_incoming(lab.w(i), marker, || {
                        go_rx.lock().unwrap().recv().unwrap();
                    })
                })
            })
            .collect();
        // Every sniffer waits in its `during` for one go; the last to get it has started too.
        std::thread::sleep(Duration::from_millis(200));
        during();
        for _ in receivers {
            go_tx.send(()).unwrap();
        }
        sniffers.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

#[test]
fn a_guarded_port_gets_only_the_questions_it_can_answer_and_reports_only_as_a_router() {
    let mut lab = Lab::new();
    let a = lab.add("a", 2);
    let b = lab.add("b", 3);
    let c = lab.add("c", 4);
    let o = lab.add("o", 5);
    lab.apply(&lab.table(&[a, b, c], &[o]));
    let (wa, wb) = (lab.w(a), lab.w(b));
    let a_ll = guard::eui64_link_local(wa.mac);

    // An ARP request for b's address: b, which may answer it, and the open port; not c.
    let mut asked = wa
        .v4
        .parse::<std::net::Ipv4Addr>()
        .unwrap()
        .octets()
        .to_vec();
    asked.extend([0; 6]);
    asked.extend(wb.v4.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let arp = arp_request(wa.mac, &wa.v4, &wb.v4);
    assert_eq!(
        seen_by(&lab, &[b, c, o], &asked, || send_frame(wa, &arp)),
        [true, false, true],
        "the ARP request for b's address reaches b, c, o"
    );
    // A neighbour solicitation for b's address likewise; a's duplicate address probe of its
    // own address only the open port (no guarded one holds it).
    let target = v6(&wb.v6);
    let ns = frame::neighbour_solicit(wa.mac, a_ll, target, &[]);
    assert_eq!(
        seen_by(&lab, &[b, c, o], &target.octets(), || send_frame(wa, &ns)),
        [true, false, true],
        "the solicitation for b's address reaches b, c, o"
    );
    let own = v6(&wa.v6);
    let probe = frame::neighbour_solicit(wa.mac, Ipv6Addr::UNSPECIFIED, own, &[]);
    assert_eq!(
        seen_by(&lab, &[b, c, o], &own.octets(), || send_frame(wa, &probe)),
        [false, false, true],
        "a's duplicate address probe reaches b, c, o"
    );
    // A router solicitation: only the open port could answer it.
    let option = frame::lladdr_option(1, wa.mac);
    let rs = frame::router_solicit(wa.mac, a_ll, &option);
    assert_eq!(
        seen_by(&lab, &[b, c, o], &option, || send_frame(wa, &rs)),
        [false, false, true],
        "a router solicitation reaches b, c, o"
    );
    // Membership reports (a's kernel's, as it joins): the open port, no guarded one…
    let group = v6("ff15::77:1");
    let mut held = Vec::new();
    assert_eq!(
        seen_by(&lab, &[b, c, o], &group.octets(), || held =
            join(wa, "ff15::77:1", None)),
        [false, false, true],
        "a's MLD report reaches b, c, o"
    );
    // …until c acts as a multicast router: its query makes it one (IGMP's reports too).
    let wc = lab.w(c);
    send_frame(
        wc,
        &frame::mld_query(wc.mac, guard::eui64_link_local(wc.mac)),
    );
    let group = v6("ff15::77:2");
    assert_eq!(
        seen_by(&lab, &[b, c, o], &group.octets(), || {
            held.extend(join(wa, "ff15::77:2", None));
        }),
        [false, true, true],
        "after c's query, a's MLD report reaches b, c, o"
    );
    let group4 = [239, 77, 0, 2];
    assert_eq!(
        seen_by(&lab, &[b, c, o], &group4, || {
            held.extend(join(wa, "ff15::77:3", Some("239.77.0.2")));
        }),
        [false, true, true],
        "a's IGMP report reaches b, c, o"
    );

    // Without the rules every guarded port gets every copy (and this test would fail).
    let mut t = lab.table(&[a, b, c], &[o]);
    t.chains[1]
        .rules
        .retain(|r| !guard::QUESTION_RULES.contains(&r.as_str()));
    lab.apply(&t);
    assert_eq!(
        seen_by(&lab, &[b, c], &asked, || send_frame(wa, &arp)),
        [true, true],
        "without the rules the ARP request reaches b, c"
    );
    drop(held);
}

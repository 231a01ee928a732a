//! Privileged test of the PortForwards' brute-force guards in a real kernel: forwards of one
//! guard class whose node ports overlap but whose sources do not (one port from one host, a
//! range around it from a subnet) make a table the kernel takes whole, and the guard then
//! counts and bans each source on its own forward's ports only.
//!
//! The test makes its own network namespaces (named with the pid, tests run in parallel) and
//! always deletes them. Needs root; fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;
use weft_dataplane::netns;
use weft_dataplane::nft::{Change, Firewall, NftCli, Transaction};
use weft_operator::agent::firewall::{self, Forward};

#[path = "common/named_netns.rs"]
mod named_netns;
use named_netns::NamedNetns;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nft(ns: &NamedNetns, args: &str) -> String {
    let mut all = vec!["ip", "netns", "exec", &ns.name, "nft"];
    all.extend(args.split(' '));
    run(&all)
}

/// New TCP connections from the client namespace to `to` (each one a SYN of its own, from
/// the client's address on `to`'s subnet); nothing answers them.
fn connect(client: &NamedNetns, to: &str, times: usize) {
    let to: SocketAddr = to.parse().unwrap();
    netns::run_in(&client.ns, || {
        for _ in 0..times {
            let _ = TcpStream::connect_timeout(&to, Duration::from_millis(300));
        }
    })
    .unwrap();
}

#[test]
fn forwards_with_overlapping_ports_from_disjoint_sources_share_a_guard_class() {
    let node = named_netns::create("wbrute-", "n");
    let client = named_netns::create("wbrute-", "c");
    run(&[
        "ip",
        "-n",
        &node.name,
        "link",
        "add",
        "b0",
        "type",
        "veth",
        "peer",
        "name",
        "b1",
        "netns",
        &client.name,
    ]);
    for (ns, link, addrs) in [
        (&node, "b0", ["192.168.50.2/24", "10.99.0.2/16"]),
        (&client, "b1", ["192.168.50.1/24", "10.99.0.1/16"]),
    ] {
        for a in addrs {
            run(&["ip", "-n", &ns.name, "addr", "add", a, "dev", link]);
        }
        run(&["ip", "-n", &ns.name, "link", "set", link, "up"]);
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
    }
    let fwd = |source: &str, ports: (u16, u16), target: &str, owner: &str| Forward {
        source: source.parse().unwrap(),
        protocol: "tcp",
        node_ports: ports,
        target: target.parse().unwrap(),
        target_port: (ports.0 == ports.1).then_some(22),
        owner: owner.into(),
        // One new connection a minute: the second is over the limit.
        guard: Some((1, 600)),
        syn_proxy: None,
    };
    // The range first, as a fresh table (a reboot, the table deleted) writes it.
    let table = firewall::table(
        &[],
        &[
            fwd("10.99.0.0/16", (2200, 2300), "10.0.0.3", "default/b"),
            fwd("192.168.50.1/32", (2222, 2222), "10.0.0.2", "default/a"),
            // IPv6 only, in the same class.
            fwd("fd00:50::/64", (2222, 2222), "fd00::2", "default/c"),
        ],
        &[],
        &[],
        &weft_operator::policy::Compiled::default(),
    );
    netns::run_in(&node.ns, || {
        NftCli::default().apply(&Transaction(vec![Change::ReplaceTable(table.clone())]))
    })
    .unwrap()
    .expect("the whole table applies");

    let bans = || nft(&node, "list set inet weft bans4");
    let meters = || nft(&node, "list set inet weft bfm_1_600_4");
    // 192.168.50.1 is guarded on its own port: its second connection bans it from 2222.
    connect(&client, "192.168.50.2:2222", 2);
    assert!(bans().contains("192.168.50.1 . tcp . 2222"), "{}", bans());
    // Its connections to the range (the subnet's forward, not its own) are not counted.
    connect(&client, "192.168.50.2:2250", 2);
    assert!(
        !meters().contains("192.168.50.1 . tcp . 2250"),
        "{}",
        meters()
    );
    assert!(!bans().contains("2250"), "{}", bans());
    // A source of the subnet is guarded on every port of the range.
    connect(&client, "10.99.0.2:2250", 2);
    assert!(bans().contains("10.99.0.1 . tcp . 2250"), "{}", bans());
    assert!(!bans().contains("10.99.0.1 . tcp . 2222"), "{}", bans());
}

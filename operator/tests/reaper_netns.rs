//! Privileged test of the agent's reaper (`agent::reaper`): host links of detached workloads
//! deleted after the DEL, and workload links nobody owns swept, in a network namespace the test
//! creates (named with the pid; deleted on drop, also when the test panics). Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use weft_dataplane::ipam::{AllocRequest, Attachment, IpamStore, Pool};
use weft_dataplane::names;
use weft_dataplane::netlink::{Netlink, VethSpec};
use weft_dataplane::netns::{self, Netns};
use weft_operator::agent::reaper::Reaper;

#[path = "common/named_netns.rs"]
mod named_netns;

fn node_named(tag: &str) -> named_netns::NamedNetns {
    named_netns::create("wrp", tag)
}

/// A workload's veth pair, both ends in `ns`; the host end `host` carries weft's endpoint
/// alias when `alias` names the attachment.
fn veth(ns: &Netns, host: &str, alias: Option<(&str, &str, &str)>) {
    veth_to(ns, ns, host, alias)
}

/// A veth pair from `ns` (`host`) to `pod` (`<host>p`).
fn veth_to(ns: &Netns, pod: &Netns, host: &str, alias: Option<(&str, &str, &str)>) {
    let alias = alias.map(|(n, c, i)| names::host_veth_alias(n, c, i));
    netns::run_in(ns, || {
        Netlink::new()
            .unwrap()
            .create_veth_into_netns(&VethSpec {
                host_name: host,
                host_alias: alias.as_deref(),
                host_master: None,
                peer_name: &format!("{host}p"),
                peer_netns: pod.fd(),
                peer_mac: None,
                mtu: None,
            })
            .unwrap();
    })
    .unwrap();
}

fn links(ns: &Netns) -> BTreeSet<String> {
    netns::run_in(ns, || {
        Netlink::new()
            .unwrap()
            .links()
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with("wr"))
            .collect()
    })
    .unwrap()
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_reaper_deletes_detached_links_after_the_call_and_sweeps_only_links_nobody_owns() {
    let node = node_named("a");
    let state = tempfile::tempdir().unwrap();
    let pool = Pool {
        block_v4: Some("10.0.0.0/24".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
        ..Pool::default()
    };
    // wra: allocated; wrb: weft's alias, allocated nowhere (a DEL whose agent stopped);
    // wrc: not weft's; wrd: registered with the agent only.
    IpamStore::open(state.path(), "net")
        .unwrap()
        .allocate(
            &pool,
            AllocRequest {
                attachment: Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                },
                host_ifname: Some("wra".into()),
                ..AllocRequest::default()
            },
        )
        .unwrap();
    veth(&node.ns, "wra", Some(("net", "c1", "eth0")));
    veth(&node.ns, "wrb", Some(("net", "c2", "eth0")));
    veth(&node.ns, "wrc", None);
    veth(&node.ns, "wrd", Some(("net", "c3", "eth0")));
    let reaper = netns::run_in(&node.ns, || Reaper::with_grace(Duration::ZERO).unwrap()).unwrap();
    let registered = BTreeSet::from(["wrd".to_string()]);
    let swept = netns::run_in(&node.ns, || reaper.sweep(state.path(), &registered)).unwrap();
    assert_eq!(swept, ["wrb"]);
    eventually("wrb is deleted", || !links(&node.ns).contains("wrb"));
    assert_eq!(
        links(&node.ns),
        BTreeSet::from(["wra", "wrap", "wrc", "wrcp", "wrd", "wrdp"].map(String::from))
    );
    // A detached workload's link goes after the call; a missing one is no error.
    assert!(netns::run_in(&node.ns, || reaper.reap("wra").unwrap()).unwrap());
    assert!(!netns::run_in(&node.ns, || reaper.reap("wrx").unwrap()).unwrap());
    eventually("wra is deleted", || !links(&node.ns).contains("wra"));
    assert!(links(&node.ns).contains("wrc"));
}

#[test]
fn a_detached_link_waits_for_its_namespace_and_a_new_link_of_the_same_name_survives() {
    let node = node_named("b");
    let pod = node_named("c");
    let grace = Duration::from_millis(400);
    let reaper = netns::run_in(&node.ns, || Reaper::with_grace(grace).unwrap()).unwrap();
    // The runtime deletes the namespace: the link goes with it, not waiting for the reaper.
    veth_to(&node.ns, &pod.ns, "wrg", Some(("net", "c1", "eth0")));
    assert!(netns::run_in(&node.ns, || reaper.reap("wrg").unwrap()).unwrap());
    assert!(
        links(&node.ns).contains("wrg"),
        "not deleted before the grace period"
    );
    drop(pod);
    eventually("the namespace takes the link along", || {
        !links(&node.ns).contains("wrg")
    });
    // The runtime keeps the namespace: the reaper deletes the link after the grace period.
    let kept = node_named("d");
    veth_to(&node.ns, &kept.ns, "wrk", Some(("net", "c2", "eth0")));
    assert!(netns::run_in(&node.ns, || reaper.reap("wrk").unwrap()).unwrap());
    std::thread::sleep(grace / 2);
    assert!(links(&node.ns).contains("wrk"));
    eventually("a kept namespace's link is deleted", || {
        !links(&node.ns).contains("wrk")
    });
    // An ADD of the same attachment replaced the link meanwhile (same name, new index): the
    // new one stays.
    veth_to(&node.ns, &kept.ns, "wrn", Some(("net", "c3", "eth0")));
    assert!(netns::run_in(&node.ns, || reaper.reap("wrn").unwrap()).unwrap());
    netns::run_in(&node.ns, || {
        let mut nl = Netlink::new().unwrap();
        let old = nl.link_by_name("wrn").unwrap().unwrap();
        nl.delete_link(old.index).unwrap();
    })
    .unwrap();
    veth_to(&node.ns, &kept.ns, "wrn", Some(("net", "c3", "eth0")));
    std::thread::sleep(grace * 3);
    assert!(links(&node.ns).contains("wrn"), "the new link was deleted");
}

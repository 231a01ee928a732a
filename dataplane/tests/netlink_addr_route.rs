//! Addresses and main-table routes through the sync netlink client, each test in its own
//! network namespace (tier 3).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use ipnet::IpNet;
use netlink_common::isolate;
use std::net::IpAddr;
use weft_dataplane::netlink::{Family, Netlink, RouteEntry, RouteSpec};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A veth pair, both ends up (so the links have carrier and IPv6 DAD really runs).
fn up_veth(nl: &mut Netlink) -> u32 {
    let a = nl.create_veth_pair("wva", "wvb", None, None).unwrap();
    let b = nl.link_by_name("wvb").unwrap().unwrap().index;
    nl.set_up(a).unwrap();
    nl.set_up(b).unwrap();
    a
}

#[test]
fn adding_an_address_twice_is_idempotent_and_deleting_twice_too() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let br = nl.create_bridge("wbr0", None, None, None).unwrap();
    for addr in [net("10.77.0.1/16"), net("fd77::1/64")] {
        assert!(nl.add_address(br, addr, true).unwrap(), "{addr} added");
        assert!(
            !nl.add_address(br, addr, true).unwrap(),
            "{addr} already there"
        );
        let have: Vec<IpNet> = nl
            .addresses(Some(br))
            .unwrap()
            .into_iter()
            .map(|a| a.addr)
            .collect();
        assert!(have.contains(&addr), "{addr} listed in {have:?}");
        assert_eq!(have.iter().filter(|a| **a == addr).count(), 1);

        assert!(nl.del_address(br, addr).unwrap(), "{addr} deleted");
        assert!(!nl.del_address(br, addr).unwrap(), "{addr} already gone");
        assert!(
            !nl.addresses(Some(br))
                .unwrap()
                .iter()
                .any(|a| a.addr == addr)
        );
    }
}

#[test]
fn addresses_are_filtered_by_link_and_keep_host_bits() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = nl.create_bridge("wbr0", None, None, None).unwrap();
    let b = nl.create_bridge("wbr1", None, None, None).unwrap();
    nl.add_address(a, net("10.1.0.5/24"), false).unwrap();
    nl.add_address(b, net("10.2.0.5/24"), false).unwrap();
    // An up bridge also gets an IPv6 link-local address: look at IPv4 only.
    let of_a: Vec<_> = nl
        .addresses(Some(a))
        .unwrap()
        .into_iter()
        .filter(|x| x.addr.addr().is_ipv4())
        .collect();
    assert_eq!(of_a.len(), 1, "{of_a:?}");
    assert_eq!((of_a[0].index, of_a[0].addr), (a, net("10.1.0.5/24")));
    let all = nl.addresses(None).unwrap();
    assert!(
        all.iter()
            .any(|x| x.index == b && x.addr == net("10.2.0.5/24"))
    );
    assert!(
        all.iter().any(|x| x.addr == net("127.0.0.1/8")),
        "lo's address too"
    );
}

#[test]
fn ipv6_nodad_address_is_usable_at_once_and_a_plain_one_is_tentative() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = up_veth(&mut nl);
    nl.add_address(a, net("fd00:1::1/64"), true).unwrap();
    nl.add_address(a, net("fd00:2::1/64"), false).unwrap();
    let addrs = nl.addresses(Some(a)).unwrap();
    let nodad = addrs
        .iter()
        .find(|x| x.addr == net("fd00:1::1/64"))
        .expect("nodad address");
    assert!(
        nodad.nodad && !nodad.tentative && !nodad.dad_failed,
        "{nodad:?}"
    );
    let dad = addrs
        .iter()
        .find(|x| x.addr == net("fd00:2::1/64"))
        .expect("plain address");
    assert!(!dad.nodad && dad.tentative, "{dad:?}");
}

#[test]
fn the_same_ipv6_address_with_another_prefix_is_a_conflict_not_a_duplicate() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let br = nl.create_bridge("wbr0", None, None, None).unwrap();
    nl.add_address(br, net("fd77::1/64"), true).unwrap();
    let err = nl.add_address(br, net("fd77::1/80"), true).unwrap_err();
    assert!(err.is_exists(), "{err}");
}

#[test]
fn replacing_a_route_twice_keeps_one_and_deleting_twice_reports_false() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = up_veth(&mut nl);
    nl.add_address(a, net("10.9.0.2/24"), true).unwrap();
    nl.add_address(a, net("fd09::2/64"), true).unwrap();

    let v4 = RouteSpec {
        dst: net("0.0.0.0/0"),
        gateway: Some(ip("10.9.0.1")),
        oif: Some(a),
        src: None,
    };
    let v6 = RouteSpec {
        dst: net("::/0"),
        gateway: Some(ip("fd09::1")),
        oif: Some(a),
        src: None,
    };
    for (spec, family) in [(&v4, Family::V4), (&v6, Family::V6)] {
        nl.replace_route(spec).unwrap();
        nl.replace_route(spec).unwrap();
        let defaults: Vec<_> = nl
            .routes(family)
            .unwrap()
            .into_iter()
            .filter(|r| r.dst == spec.dst)
            .collect();
        assert_eq!(defaults.len(), 1, "{defaults:?}");
        assert_eq!(defaults[0].gateway, spec.gateway);
        assert_eq!(defaults[0].oif, Some(a));
        assert_eq!(defaults[0].table, 254);
        assert_eq!(defaults[0].protocol, 4, "static");

        assert!(nl.del_route(spec).unwrap());
        assert!(!nl.del_route(spec).unwrap());
        assert!(!nl.routes(family).unwrap().iter().any(|r| r.dst == spec.dst));
    }
}

#[test]
fn replace_changes_the_gateway_of_an_existing_route() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = up_veth(&mut nl);
    nl.add_address(a, net("10.9.0.2/24"), true).unwrap();
    let mut spec = RouteSpec {
        dst: net("192.168.50.0/24"),
        gateway: Some(ip("10.9.0.1")),
        oif: Some(a),
        src: Some(ip("10.9.0.2")),
    };
    nl.replace_route(&spec).unwrap();
    spec.gateway = Some(ip("10.9.0.254"));
    nl.replace_route(&spec).unwrap();
    let routes: Vec<_> = nl
        .routes(Family::V4)
        .unwrap()
        .into_iter()
        .filter(|r| r.dst == spec.dst)
        .collect();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].gateway, Some(ip("10.9.0.254")));
}

#[test]
fn a_device_route_without_gateway_and_the_kernel_connected_routes_are_listed() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = up_veth(&mut nl);
    nl.add_address(a, net("10.9.0.2/24"), true).unwrap();
    let spec = RouteSpec {
        dst: net("172.16.5.9/16"),
        gateway: None,
        oif: Some(a),
        src: None,
    };
    nl.replace_route(&spec).unwrap();
    let routes = nl.routes(Family::V4).unwrap();
    let dev = routes
        .iter()
        .find(|r| r.dst == net("172.16.0.0/16"))
        .expect("host bits cleared");
    assert_eq!((dev.gateway, dev.oif), (None, Some(a)));
    let connected = routes
        .iter()
        .find(|r| r.dst == net("10.9.0.0/24"))
        .expect("connected route of the address");
    assert_eq!(connected.protocol, 2, "proto kernel");
    assert!(
        routes.iter().all(|r| r.table == 254),
        "only the main table: {routes:?}"
    );
    // A deleted route that never existed, or on a link that is gone, is just "not there".
    assert!(nl.del_route(&spec).unwrap());
    nl.delete_link(a).unwrap();
    assert!(!nl.del_route(&spec).unwrap());
}

#[test]
fn deleting_an_address_of_a_missing_link_is_false() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    assert!(!nl.del_address(999_999, net("10.0.0.1/24")).unwrap());
}

#[test]
fn a_recorded_route_is_deleted_though_its_metrics_changed_since() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let a = up_veth(&mut nl);
    nl.add_address(a, net("10.9.0.2/24"), true).unwrap();
    let recorded = RouteEntry {
        dst: net("0.0.0.0/0"),
        gateway: Some(ip("10.9.0.1")),
        table: 254,
        protocol: 4,
        scope: 0,
        metric: Some(100),
        prefsrc: None,
        onlink: false,
        // RTAX_MTU.
        metrics: vec![(2, 1400)],
    };
    nl.replace_route_entry(&recorded, a).unwrap();
    // Something else (a DHCP client) changes its MTU after weft recorded it.
    let changed = RouteEntry {
        metrics: vec![(2, 1300)],
        ..recorded.clone()
    };
    nl.replace_route_entry(&changed, a).unwrap();
    assert_eq!(nl.routes_via(a).unwrap(), [changed]);
    assert!(nl.del_route_entry(&recorded, a).unwrap(), "deleted");
    assert!(nl.routes_via(a).unwrap().is_empty());
}

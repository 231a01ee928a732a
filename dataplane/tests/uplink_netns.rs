//! Bridge mode's uplink takeover on a real kernel: the test thread's own namespace is the node,
//! a named namespace is the LAN with the default gateway, and a veth pair is the node's uplink.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use ipnet::IpNet;
use netlink_common::{NamedNs, isolate};
use std::process::Command;
use weft_dataplane::links::{ApplyReport, BridgePlan, UplinkPlan};
use weft_dataplane::names;
use weft_dataplane::netlink::{Netlink, RouteEntry};
use weft_dataplane::nft::{Family, NftCli, Table};
use weft_dataplane::plan::{self, NodePlan, ProcSysctls};
use weft_dataplane::uplink;
use weft_dataplane::vlan::{PortVlan, PortVlans, VlanFiltering, VlanRange};

const NODE_ADDR: &str = "192.168.77.11/24";
const GATEWAY: &str = "192.168.77.1";

/// The node's uplink `eth0` (address, default route metric 100) wired to a LAN namespace; the
/// LAN answers on the gateway address when `gateway` is true.
fn wire(gateway: bool) -> (NamedNs, Netlink) {
    let lan = NamedNs::new("lan");
    let mut nl = Netlink::new().unwrap();
    nl.create_veth_pair("eth0", "lan0", Some(lan.ns.fd()), None)
        .unwrap();
    let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
    nl.add_address(eth0.index, NODE_ADDR.parse().unwrap(), true)
        .unwrap();
    nl.set_up(eth0.index).unwrap();
    let mut lan_nl = Netlink::in_netns(&lan.ns).unwrap();
    let lan0 = lan_nl.link_by_name("lan0").unwrap().unwrap();
    if gateway {
        lan_nl
            .add_address(lan0.index, format!("{GATEWAY}/24").parse().unwrap(), true)
            .unwrap();
    }
    lan_nl.set_up(lan0.index).unwrap();
    nl.replace_route_entry(&default_route(), eth0.index)
        .unwrap();
    (lan, nl)
}

fn default_route() -> RouteEntry {
    RouteEntry {
        dst: "0.0.0.0/0".parse().unwrap(),
        gateway: Some(GATEWAY.parse().unwrap()),
        table: 254,
        protocol: 4,
        scope: 0,
        metric: Some(100),
        prefsrc: None,
        onlink: false,
        metrics: Vec::new(),
    }
}

fn node_plan(with_lan: bool) -> NodePlan {
    NodePlan {
        node: "n".into(),
        bridges: with_lan
            .then(|| BridgePlan {
                network: "lan".into(),
                name: "wn-lan".into(),
                mtu: 1500,
                mac: names::bridge_mac("lan"),
                addresses: vec![],
                uplink: Some(UplinkPlan {
                    device: "eth0".into(),
                    vlan: None,
                    filtering: None,
                }),
            })
            .into_iter()
            .collect(),
        sysctls: vec![],
        firewall: Table {
            family: Family::Inet,
            name: names::NFT_TABLE.into(),
            comment: None,
            sets: vec![],
            maps: vec![],
            chains: vec![],
        },
        guard: None,
        networks: vec![],
        ports: vec![],
    }
}

fn apply(p: &NodePlan, dir: &std::path::Path) -> ApplyReport {
    plan::apply(
        p,
        &mut Netlink::new().unwrap(),
        &mut NftCli::default(),
        &mut ProcSysctls,
        dir,
    )
    .unwrap()
}

/// The agent's cleanup: everything weft made on the node given back.
fn cleanup(dir: &std::path::Path) {
    plan::cleanup(
        &mut Netlink::new().unwrap(),
        &mut NftCli::default(),
        &mut plan::ProcSysctls,
        dir,
    )
    .unwrap();
}

fn state_of(nl: &mut Netlink, name: &str) -> (Vec<IpNet>, Vec<RouteEntry>, Option<u32>) {
    let l = nl.link_by_name(name).unwrap().unwrap();
    let mut addrs: Vec<IpNet> = nl
        .addresses(Some(l.index))
        .unwrap()
        .into_iter()
        .map(|a| a.addr)
        .filter(|a| a.addr().is_ipv4())
        .collect();
    addrs.sort();
    (addrs, nl.routes_via(l.index).unwrap(), l.master)
}

fn ping(target: &str) -> bool {
    Command::new("ping")
        .args(["-c1", "-W1", target])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn takeover_moves_addresses_and_routes_keeps_the_gateway_and_removal_restores_exactly() {
    let _ns = isolate();
    let (_lan, mut nl) = wire(true);
    let dir = tempfile::tempdir().unwrap();
    let before = state_of(&mut nl, "eth0");
    assert!(ping(GATEWAY), "the gateway answers before");

    let report = apply(&node_plan(true), dir.path());
    assert!(report.failed.is_empty(), "{report:?}");
    let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
    let br = nl.link_by_name("wn-lan").unwrap().unwrap();
    assert_eq!(eth0.master, Some(br.index));
    assert_eq!(br.mac, eth0.mac, "the bridge wears the uplink's MAC");
    let (addrs, routes, _) = state_of(&mut nl, "wn-lan");
    assert_eq!(addrs, before.0);
    assert_eq!(routes, before.1);
    let (addrs, routes, _) = state_of(&mut nl, "eth0");
    assert!(
        addrs.is_empty() && routes.is_empty(),
        "{addrs:?} {routes:?}"
    );
    assert!(ping(GATEWAY), "the node still reaches its gateway");
    assert!(uplink::read_record(dir.path(), "wn-lan").is_some());

    // Idempotent.
    assert!(apply(&node_plan(true), dir.path()).is_noop());

    // The network goes: eth0 is exactly as before.
    let report = apply(&node_plan(false), dir.path());
    assert!(
        report.changes.iter().any(|c| c.contains("detached")),
        "{report:?}"
    );
    assert!(nl.link_by_name("wn-lan").unwrap().is_none());
    assert_eq!(state_of(&mut nl, "eth0"), before);
    assert!(ping(GATEWAY), "and reaches its gateway");
    assert!(uplink::records(dir.path()).is_empty());
}

#[test]
fn an_unreachable_gateway_rolls_back_within_seconds_and_leaves_the_uplink_as_it_was() {
    let _ns = isolate();
    let (_lan, mut nl) = wire(false);
    let dir = tempfile::tempdir().unwrap();
    let before = state_of(&mut nl, "eth0");
    let started = std::time::Instant::now();
    let report = apply(&node_plan(true), dir.path());
    let took = started.elapsed();
    println!("rollback took {took:?}");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(
        report.failed[0].1.contains("rolled back"),
        "{:?}",
        report.failed
    );
    assert!(report.failed[0].1.contains(GATEWAY), "{:?}", report.failed);
    assert_eq!(state_of(&mut nl, "eth0"), before);
    // Not retried while the Network is unchanged: eth0 stays untouched.
    let report = apply(&node_plan(true), dir.path());
    assert!(report.failed[0].1.contains("rolled back earlier"));
    assert_eq!(state_of(&mut nl, "eth0"), before);
    // The agent's cleanup gives everything back and forgets the rollback.
    cleanup(dir.path());
    assert!(nl.link_by_name("wn-lan").unwrap().is_none());
    assert_eq!(state_of(&mut nl, "eth0"), before);
}

#[test]
fn vlan_sub_interfaces_need_802_1q_and_say_so_when_the_kernel_lacks_it() {
    let _ns = isolate();
    let (_lan, mut nl) = wire(true);
    let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut vlan10 = node_plan(true);
    vlan10.bridges[0].uplink = Some(UplinkPlan {
        device: "eth0".into(),
        vlan: Some(10),
        filtering: None,
    });
    match nl.create_vlan("eth0.10", eth0.index, 10, None, Some("weft:vlan:t")) {
        Err(e) if e.is_not_supported() => {
            println!(
                "NOT SUPPORTED BY THIS KERNEL: 802.1Q VLAN links ({e}); the VLAN attachment was checked by the unit tests only"
            );
            let report = apply(&vlan10, dir.path());
            assert!(
                report.failed[0].1.contains("802.1Q"),
                "the failure names the missing kernel support: {:?}",
                report.failed
            );
        }
        Err(e) => panic!("create vlan: {e}"),
        Ok(index) => {
            let l = nl.link_by_index(index).unwrap().unwrap();
            assert_eq!(l.kind.as_deref(), Some("vlan"));
            nl.delete_link(index).unwrap();
            let report = apply(&vlan10, dir.path());
            assert!(report.failed.is_empty(), "{report:?}");
            let sub = nl.link_by_name("eth0.10").unwrap().unwrap();
            let br = nl.link_by_name("wn-lan").unwrap().unwrap();
            assert_eq!(sub.master, Some(br.index));
            apply(&node_plan(false), dir.path());
            assert!(nl.link_by_name("eth0.10").unwrap().is_none());
        }
    }
}

/// A workload namespace behind a port of bridge `bridge` (host end `host`) with `addr` on its
/// `eth0`; the port carries `vlans`.
fn vlan_workload(
    nl: &mut Netlink,
    bridge: u32,
    host: &str,
    addr: &str,
    vlans: &PortVlans,
) -> NamedNs {
    let ws = NamedNs::new("vlanwl");
    let index = nl
        .create_veth_pair(host, "eth0", Some(ws.ns.fd()), None)
        .unwrap();
    nl.set_master(index, Some(bridge)).unwrap();
    nl.set_up(index).unwrap();
    nl.set_port_vlans(index, vlans).unwrap();
    ip(Some(&ws), &["addr", "add", addr, "dev", "eth0"]);
    ip(Some(&ws), &["link", "set", "eth0", "up"]);
    ws
}

#[test]
fn vlan_filtering_makes_the_uplink_a_trunk_or_says_the_kernel_lacks_it() {
    let _ns = isolate();
    let (_lan, mut nl) = wire(true);
    let dir = tempfile::tempdir().unwrap();
    let before = state_of(&mut nl, "eth0");
    let filtering = VlanFiltering {
        own: 10,
        trunk: vec![VlanRange::one(20)],
    };
    let mut trunk = node_plan(true);
    trunk.bridges[0].uplink = Some(UplinkPlan {
        device: "eth0".into(),
        vlan: None,
        filtering: Some(filtering.clone()),
    });
    // Does this kernel filter VLANs on bridges? Ask a scratch bridge.
    let probe = nl.create_bridge("wvprobe", None, None, None).unwrap();
    let supported = nl.set_vlan_filtering(probe, true);
    nl.delete_link(probe).unwrap();
    match supported {
        Err(e) if e.is_not_supported() => {
            println!(
                "NOT SUPPORTED BY THIS KERNEL: VLAN-filtering bridges ({e}); the trunk uplink and ports were checked by the unit tests only"
            );
            let report = apply(&trunk, dir.path());
            assert_eq!(report.failed.len(), 1, "{report:?}");
            assert!(
                report.failed[0].1.contains("spec.bridge.vlanFiltering")
                    && report.failed[0]
                        .1
                        .contains("no VLAN-filtering bridge support"),
                "the failure names the field and the missing kernel support: {:?}",
                report.failed
            );
            assert_eq!(
                state_of(&mut nl, "eth0"),
                before,
                "the uplink is left as it was"
            );
        }
        Err(e) => panic!("set vlan_filtering: {e}"),
        Ok(()) => {
            let report = apply(&trunk, dir.path());
            assert!(report.failed.is_empty(), "{report:?}");
            let br = nl.link_by_name("wn-lan").unwrap().unwrap();
            assert_eq!(br.vlan_filtering, Some(true));
            let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
            assert_eq!(
                eth0.master,
                Some(br.index),
                "the uplink itself is the trunk"
            );
            let mut vlans = nl.port_vlans(eth0.index).unwrap();
            vlans.sort();
            assert_eq!(
                vlans,
                [
                    PortVlan::access(1),
                    PortVlan::tagged(10),
                    PortVlan::tagged(20)
                ],
                "bridge vlan show dev eth0: 1 PVID untagged, 10 and 20 tagged"
            );
            assert!(
                nl.port_vlans(br.index)
                    .unwrap()
                    .contains(&PortVlan::access(1)),
                "the bridge itself keeps VLAN 1 untagged for the node's addresses"
            );
            assert!(ping(GATEWAY), "the node's untagged traffic is unchanged");
            assert!(apply(&trunk, dir.path()).is_noop(), "idempotent");
            // Real frames: two access ports on VLAN 10 meet; one on VLAN 20 sees neither.
            let a = vlan_workload(
                &mut nl,
                br.index,
                "wfa",
                "10.99.0.2/24",
                &filtering.workload(&[]),
            );
            let b = vlan_workload(
                &mut nl,
                br.index,
                "wfb",
                "10.99.0.3/24",
                &filtering.workload(&[]),
            );
            let other = VlanFiltering {
                own: 20,
                trunk: vec![],
            };
            let c = vlan_workload(
                &mut nl,
                br.index,
                "wfc",
                "10.99.0.4/24",
                &other.workload(&[]),
            );
            let pings = |from: &NamedNs, to: &str| {
                Command::new("ip")
                    .args(["netns", "exec", &from.name, "ping", "-c1", "-W1", to])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            };
            assert!(pings(&a, "10.99.0.3"), "VLAN 10 reaches VLAN 10");
            assert!(
                !pings(&a, "10.99.0.4") && !pings(&c, "10.99.0.3"),
                "an access port on VLAN 10 does not see VLAN 20 frames, nor the other way"
            );
            drop((a, b, c));
            // The network goes: the uplink, untagged, holds the node's addresses again.
            apply(&node_plan(false), dir.path());
            assert!(nl.link_by_name("wn-lan").unwrap().is_none());
            assert_eq!(state_of(&mut nl, "eth0"), before);
        }
    }
    cleanup(dir.path());
}

/// `ip` in the test thread's namespace (the node), or in `ns` when given.
fn ip(ns: Option<&NamedNs>, args: &[&str]) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns.name.as_str()]);
    }
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An IPv6-only node: `eth0` holds fd77::11/64 and the default route via fd77::1, which the
/// LAN namespace answers when `gateway` is true.
fn wire6(gateway: bool) -> (NamedNs, Netlink) {
    let lan = NamedNs::new("lan6");
    let mut nl = Netlink::new().unwrap();
    nl.create_veth_pair("eth0", "lan0", Some(lan.ns.fd()), None)
        .unwrap();
    ip(
        None,
        &["addr", "add", "fd77::11/64", "dev", "eth0", "nodad"],
    );
    ip(None, &["link", "set", "eth0", "up"]);
    if gateway {
        ip(
            Some(&lan),
            &["addr", "add", "fd77::1/64", "dev", "lan0", "nodad"],
        );
    }
    ip(Some(&lan), &["link", "set", "lan0", "up"]);
    ip(
        None,
        &[
            "-6", "route", "add", "default", "via", "fd77::1", "dev", "eth0",
        ],
    );
    (lan, nl)
}

fn v6_state(nl: &mut Netlink, name: &str) -> (Vec<IpNet>, usize) {
    let l = nl.link_by_name(name).unwrap().unwrap();
    let mut addrs: Vec<IpNet> = nl
        .addresses(Some(l.index))
        .unwrap()
        .into_iter()
        .map(|a| a.addr)
        .filter(|a| a.addr().is_ipv6() && !a.addr().to_string().starts_with("fe80"))
        .collect();
    addrs.sort();
    let defaults = nl
        .routes_via(l.index)
        .unwrap()
        .into_iter()
        .filter(|r| r.dst.prefix_len() == 0)
        .count();
    (addrs, defaults)
}

#[test]
fn an_ipv6_only_uplink_is_checked_by_neighbour_discovery_and_rolled_back_without_a_gateway() {
    let _ns = isolate();
    for gateway in [true, false] {
        let (lan, mut nl) = wire6(gateway);
        let dir = tempfile::tempdir().unwrap();
        let before = v6_state(&mut nl, "eth0");
        assert_eq!(before.1, 1, "the IPv6 default route is on eth0");
        let report = apply(&node_plan(true), dir.path());
        if gateway {
            assert!(report.failed.is_empty(), "{report:?}");
            assert!(
                report
                    .changes
                    .iter()
                    .any(|c| c.contains("gateway fd77::1 answers")),
                "{report:?}"
            );
            assert_eq!(v6_state(&mut nl, "wn-lan"), before, "moved to the bridge");
            apply(&node_plan(false), dir.path());
        } else {
            assert_eq!(report.failed.len(), 1, "{report:?}");
            assert!(
                report.failed[0].1.contains("fd77::1"),
                "{:?}",
                report.failed
            );
            assert_eq!(v6_state(&mut nl, "eth0"), before, "rolled back");
            cleanup(dir.path());
        }
        assert!(nl.link_by_name("wn-lan").unwrap().is_none());
        assert_eq!(v6_state(&mut nl, "eth0"), before, "eth0 as it was");
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        nl.delete_link(eth0.index).unwrap();
        drop(lan);
    }
}

/// The node's uplink `eth0` with a /32 address and its gateway outside it, as cloud DHCP and
/// netplan's `on-link` make them: a host route to the gateway and the default route through
/// it (`onlink: false`), or the default route alone with the `onlink` flag. The default route
/// has an MTU of its own. The LAN namespace answers on the gateway address.
fn wire_host_route(onlink: bool) -> (NamedNs, Netlink) {
    let lan = NamedNs::new("lan32");
    let mut nl = Netlink::new().unwrap();
    nl.create_veth_pair("eth0", "lan0", Some(lan.ns.fd()), None)
        .unwrap();
    ip(None, &["addr", "add", "192.168.77.11/32", "dev", "eth0"]);
    ip(None, &["link", "set", "eth0", "up"]);
    ip(
        Some(&lan),
        &["addr", "add", &format!("{GATEWAY}/24"), "dev", "lan0"],
    );
    ip(Some(&lan), &["link", "set", "lan0", "up"]);
    let default = [
        "route", "add", "default", "via", GATEWAY, "dev", "eth0", "proto", "dhcp", "metric", "100",
        "mtu", "1400",
    ];
    if onlink {
        let mut args = default.to_vec();
        args.push("onlink");
        ip(None, &args);
    } else {
        ip(
            None,
            &[
                "route", "add", GATEWAY, "dev", "eth0", "proto", "dhcp", "scope", "link", "metric",
                "100",
            ],
        );
        ip(None, &default);
    }
    (lan, nl)
}

/// The routes of `state_of`, ordered so that two dumps compare whatever order the kernel
/// listed them in.
fn sorted(mut s: (Vec<IpNet>, Vec<RouteEntry>, Option<u32>)) -> (Vec<IpNet>, Vec<String>) {
    s.1.sort_by_key(|r| r.dst);
    (s.0, s.1.iter().map(|r| format!("{r:?}")).collect())
}

#[test]
fn a_gateway_outside_the_node_s_subnet_keeps_its_default_route_through_takeover_and_removal() {
    for onlink in [false, true] {
        let _ns = isolate();
        let (_lan, mut nl) = wire_host_route(onlink);
        let dir = tempfile::tempdir().unwrap();
        let before = sorted(state_of(&mut nl, "eth0"));
        assert!(
            before.1.iter().any(|r| r.contains("0.0.0.0/0")),
            "onlink {onlink}: the default route is among the uplink's: {before:?}"
        );
        assert!(ping(GATEWAY), "onlink {onlink}: the gateway answers before");

        let report = apply(&node_plan(true), dir.path());
        assert!(report.failed.is_empty(), "onlink {onlink}: {report:?}");
        // Every route on the bridge as it was on the uplink: flag, MTU, metric and protocol.
        assert_eq!(
            sorted(state_of(&mut nl, "wn-lan")),
            before,
            "onlink {onlink}"
        );
        assert!(
            ping(GATEWAY),
            "onlink {onlink}: the node reaches its gateway"
        );

        let report = apply(&node_plan(false), dir.path());
        assert!(report.failed.is_empty(), "onlink {onlink}: {report:?}");
        assert_eq!(sorted(state_of(&mut nl, "eth0")), before, "onlink {onlink}");
        assert!(ping(GATEWAY), "onlink {onlink}: and after removal");
        assert!(uplink::records(dir.path()).is_empty());
    }
}

#[test]
fn an_attach_the_agent_did_not_live_to_check_is_checked_at_the_next_pass_and_rolled_back() {
    let _ns = isolate();
    let (lan, mut nl) = wire(true);
    let dir = tempfile::tempdir().unwrap();
    let before = state_of(&mut nl, "eth0");
    assert!(apply(&node_plan(true), dir.path()).failed.is_empty());
    assert!(uplink::read_record(dir.path(), "wn-lan").unwrap().verified);
    // As an agent killed during the gateway check leaves it: the port on the bridge, the
    // record not verified. And the gateway no longer answers.
    let mut record = uplink::read_record(dir.path(), "wn-lan").unwrap();
    record.verified = false;
    weft_dataplane::state::write_json(&uplink::record_path(dir.path(), "wn-lan"), &record).unwrap();
    ip(
        Some(&lan),
        &["addr", "del", &format!("{GATEWAY}/24"), "dev", "lan0"],
    );
    let report = apply(&node_plan(true), dir.path());
    assert!(
        report.failed.len() == 1 && report.failed[0].1.contains("rolled back"),
        "{report:?}"
    );
    assert_eq!(state_of(&mut nl, "eth0"), before, "the uplink as it was");
    // A verified record with the port on the bridge is left alone (the idempotent case is
    // in the takeover test): the gateway answers again, the attach is retried once the
    // rollback's marker goes, and verified.
    ip(
        Some(&lan),
        &["addr", "add", &format!("{GATEWAY}/24"), "dev", "lan0"],
    );
    uplink::forget_rollbacks(dir.path());
    assert!(apply(&node_plan(true), dir.path()).failed.is_empty());
    assert!(uplink::read_record(dir.path(), "wn-lan").unwrap().verified);
    assert!(apply(&node_plan(true), dir.path()).is_noop());
    cleanup(dir.path());
    assert_eq!(state_of(&mut nl, "eth0"), before);
}

#[test]
fn a_bridge_planned_again_without_its_uplink_gives_the_node_s_addresses_back_first() {
    let _ns = isolate();
    let (_lan, mut nl) = wire(true);
    let dir = tempfile::tempdir().unwrap();
    let before = state_of(&mut nl, "eth0");
    assert!(apply(&node_plan(true), dir.path()).failed.is_empty());
    // The same bridge, now planned without an uplink (the Network re-created in NAT mode
    // under the same name, or its manifest edited): the node's addresses and routes return to
    // eth0 before the bridge's addresses are made what the plan says.
    let mut nat = node_plan(true);
    nat.bridges[0].uplink = None;
    nat.bridges[0].addresses = vec!["10.99.0.1/24".parse().unwrap()];
    let report = apply(&nat, dir.path());
    assert!(report.failed.is_empty(), "{report:?}");
    let (addrs, routes, master) = state_of(&mut nl, "eth0");
    assert_eq!(
        (addrs, routes, master),
        (before.0.clone(), before.1.clone(), None)
    );
    let (addrs, _, _) = state_of(&mut nl, "wn-lan");
    assert_eq!(addrs, ["10.99.0.1/24".parse::<IpNet>().unwrap()]);
    assert!(uplink::records(dir.path()).is_empty());
    assert!(ping(GATEWAY), "the node reaches its gateway through eth0");
    cleanup(dir.path());
    assert_eq!(state_of(&mut nl, "eth0"), before);
}

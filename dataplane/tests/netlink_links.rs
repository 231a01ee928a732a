//! Links through the sync netlink client, each test in its own network namespace (tier 3).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, isolate};
use weft_dataplane::names;
use weft_dataplane::netlink::{Netlink, VethSpec, format_mac};

const BRIDGE_MAC: [u8; 6] = [0x02, 0x77, 0x65, 0x66, 0x74, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x77, 0x65, 0x66, 0x74, 0x02];

#[test]
fn bridge_is_created_up_with_mtu_mac_and_alias_and_found_by_name_and_index() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let index = nl
        .create_bridge("wbr0", Some(1400), Some(BRIDGE_MAC), Some("weft:net:blue"))
        .unwrap();

    let by_name = nl.link_by_name("wbr0").unwrap().expect("bridge by name");
    assert_eq!(by_name.index, index);
    assert_eq!(by_name.kind.as_deref(), Some("bridge"));
    assert!(by_name.up);
    assert_eq!(by_name.mtu, 1400);
    assert_eq!(by_name.mac, Some(BRIDGE_MAC));
    assert_eq!(by_name.alias.as_deref(), Some("weft:net:blue"));
    assert_eq!(by_name.master, None);

    let by_index = nl.link_by_index(index).unwrap().expect("bridge by index");
    assert_eq!(by_index, by_name);
    assert!(nl.links().unwrap().contains(&by_name));
}

#[test]
fn multicast_snooping_is_switched_and_read_back() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let index = nl.create_bridge("wbr0", None, None, None).unwrap();
    let snooping = |nl: &mut Netlink| nl.link_by_index(index).unwrap().unwrap().multicast_snooping;
    // The kernel's default.
    assert_eq!(snooping(&mut nl), Some(true));
    nl.set_multicast_snooping(index, false).unwrap();
    assert_eq!(snooping(&mut nl), Some(false));
    nl.set_multicast_snooping(index, true).unwrap();
    assert_eq!(snooping(&mut nl), Some(true));
}

#[test]
fn index_and_mac_by_ioctl_agree_with_netlink_in_the_sockets_own_namespace() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let index = nl
        .create_bridge("wbr0", None, Some(BRIDGE_MAC), None)
        .unwrap();
    let found = nl.link_index_and_mac("wbr0").unwrap().expect("bridge");
    let full = nl.link_by_name("wbr0").unwrap().expect("bridge");
    assert_eq!(
        (found.index, found.name.as_str(), found.mac),
        (index, "wbr0", full.mac)
    );
    assert_eq!(found.mac, Some(BRIDGE_MAC));
    // Not Ethernet: no MAC.
    let lo = nl.link_index_and_mac("lo").unwrap().expect("lo");
    assert_eq!((lo.index, lo.mac), (1, None));
    assert_eq!(nl.is_up("wbr0").unwrap(), Some(full.up));
    assert_eq!(nl.is_up("lo").unwrap(), Some(true), "isolate sets lo up");
    let down = nl.create_bridge("wbr1", None, None, None).unwrap();
    let random = nl.link_by_name("wbr1").unwrap().unwrap().mac;
    assert!(random.is_some_and(|m| m != [0; 6]), "{random:?}");
    assert_eq!(nl.link_index_and_mac("wbr1").unwrap().unwrap().mac, random);
    nl.set_down(down).unwrap();
    assert_eq!(nl.is_up("wbr1").unwrap(), Some(false));
    assert_eq!(nl.is_up("nosuchlink").unwrap(), None);
    assert_eq!(nl.link_index_and_mac("nosuchlink").unwrap(), None);
    assert_eq!(
        nl.link_index_and_mac("a-name-longer-than-15").unwrap(),
        None
    );

    // A socket opened in another namespace answers for that namespace, whatever namespace the
    // calling thread is in.
    let other = NamedNs::new("ifreq");
    let mut there = Netlink::in_netns(&other.ns).unwrap();
    assert_eq!(there.link_index_and_mac("wbr0").unwrap(), None);
    let theirs = there
        .create_bridge("wbr0", None, Some(PEER_MAC), None)
        .unwrap();
    let found = there
        .link_index_and_mac("wbr0")
        .unwrap()
        .expect("their bridge");
    assert_eq!((found.index, found.mac), (theirs, Some(PEER_MAC)));
    let ours = nl.link_index_and_mac("wbr0").unwrap().expect("our bridge");
    assert_eq!((ours.index, ours.mac), (index, Some(BRIDGE_MAC)));
}

#[test]
fn creating_a_bridge_whose_name_is_taken_fails_with_exists() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    nl.create_bridge("wbr0", None, None, None).unwrap();
    let err = nl.create_bridge("wbr0", None, None, None).unwrap_err();
    assert!(err.is_exists(), "{err}");
    assert!(err.to_string().contains("create bridge wbr0"), "{err}");
}

#[test]
fn missing_or_impossible_links_are_none() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    assert_eq!(nl.link_by_name("nosuchlink").unwrap(), None);
    assert_eq!(nl.link_by_name("a-name-longer-than-15").unwrap(), None);
    assert_eq!(nl.link_by_index(999_999).unwrap(), None);
    let names: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["lo"], "a fresh namespace has only lo");
}

#[test]
fn veth_peer_is_born_in_the_workload_netns_with_its_name_mac_and_mtu() {
    let _ns = isolate();
    let workload = NamedNs::new("veth");
    let mut nl = Netlink::new().unwrap();
    let bridge = nl.create_bridge("wbr0", Some(1400), None, None).unwrap();

    let host = nl
        .create_veth_into_netns(&VethSpec {
            host_name: "wv-host0",
            host_alias: Some("weft:ep:blue:c1:eth0"),
            host_master: Some(bridge),
            peer_name: "eth0",
            peer_netns: workload.ns.fd(),
            peer_mac: Some(PEER_MAC),
            mtu: Some(1400),
        })
        .unwrap();

    let h = nl.link_by_index(host).unwrap().expect("host end");
    assert_eq!(h.name, "wv-host0");
    assert_eq!(h.kind.as_deref(), Some("veth"));
    assert!(h.up);
    assert_eq!(h.master, Some(bridge));
    assert_eq!(h.mtu, 1400);
    assert_eq!(h.alias.as_deref(), Some("weft:ep:blue:c1:eth0"));
    assert!(h.netns_id.is_some(), "the peer lives in another namespace");
    assert_eq!(nl.link_by_name("eth0").unwrap(), None, "peer not here");

    let mut inner = Netlink::in_netns(&workload.ns).unwrap();
    let peer = inner.link_by_name("eth0").unwrap().expect("peer inside");
    assert_eq!(peer.kind.as_deref(), Some("veth"));
    assert_eq!(peer.mac, Some(PEER_MAC), "{:?}", peer.mac.map(format_mac));
    assert_eq!(peer.mtu, 1400);
    assert!(!peer.up, "the peer starts down");

    // With a socket on the peer's side, both indexes come back.
    let pair = nl
        .create_veth_pair_into_netns(
            &VethSpec {
                host_name: "wv-host1",
                host_alias: None,
                host_master: Some(bridge),
                peer_name: "eth1",
                peer_netns: workload.ns.fd(),
                peer_mac: None,
                mtu: None,
            },
            Some(&mut inner),
        )
        .unwrap();
    let h = nl
        .link_by_name("wv-host1")
        .unwrap()
        .expect("second host end");
    let p = inner.link_by_name("eth1").unwrap().expect("second peer");
    assert_eq!((pair.host, pair.peer), (h.index, Some(p.index)));
    assert_eq!(h.peer, Some(p.index));
}

#[test]
fn veth_with_a_taken_name_fails_with_exists_on_either_side() {
    let _ns = isolate();
    let workload = NamedNs::new("vethex");
    let mut nl = Netlink::new().unwrap();
    let spec = VethSpec {
        host_name: "wv-host0",
        host_alias: None,
        host_master: None,
        peer_name: "eth0",
        peer_netns: workload.ns.fd(),
        peer_mac: None,
        mtu: None,
    };
    nl.create_veth_into_netns(&spec).unwrap();

    let err = nl.create_veth_into_netns(&spec).unwrap_err();
    assert!(err.is_exists(), "host name taken: {err}");

    let err = nl
        .create_veth_into_netns(&VethSpec {
            host_name: "wv-host1",
            ..spec
        })
        .unwrap_err();
    assert!(err.is_exists(), "peer name taken inside: {err}");
    assert_eq!(
        nl.link_by_name("wv-host1").unwrap(),
        None,
        "nothing left behind"
    );
}

#[test]
fn deleting_a_link_twice_reports_false_the_second_time_and_takes_the_peer_along() {
    let _ns = isolate();
    let workload = NamedNs::new("del");
    let mut nl = Netlink::new().unwrap();
    let host = nl
        .create_veth_into_netns(&VethSpec {
            host_name: "wv-host0",
            host_alias: None,
            host_master: None,
            peer_name: "eth0",
            peer_netns: workload.ns.fd(),
            peer_mac: None,
            mtu: None,
        })
        .unwrap();
    assert!(nl.delete_link(host).unwrap());
    assert!(!nl.delete_link(host).unwrap());
    let mut inner = Netlink::in_netns(&workload.ns).unwrap();
    assert_eq!(inner.link_by_name("eth0").unwrap(), None);
}

#[test]
fn move_to_netns_moves_a_link_and_keeps_its_name() {
    let _ns = isolate();
    let other = NamedNs::new("move");
    let mut nl = Netlink::new().unwrap();
    let a = nl.create_veth_pair("wva", "wvb", None, Some(1300)).unwrap();
    let b = nl.link_by_name("wvb").unwrap().expect("b here");
    assert_eq!(nl.link_by_index(a).unwrap().unwrap().mtu, 1300);
    assert_eq!(b.mtu, 1300);

    nl.move_to_netns(b.index, other.ns.fd()).unwrap();
    assert_eq!(nl.link_by_name("wvb").unwrap(), None);
    let mut inner = Netlink::in_netns(&other.ns).unwrap();
    let moved = inner.link_by_name("wvb").unwrap().expect("b moved");
    assert_eq!(moved.kind.as_deref(), Some("veth"));
}

#[test]
fn veth_pair_can_wire_two_namespaces() {
    let _ns = isolate();
    let lan = NamedNs::new("lan");
    let mut nl = Netlink::new().unwrap();
    let a = nl
        .create_veth_pair("eth0", "n0-uplink", Some(lan.ns.fd()), None)
        .unwrap();
    let here = nl.link_by_index(a).unwrap().unwrap();
    assert_eq!(here.name, "eth0");
    assert!(!here.up, "both ends start down");
    assert_eq!(nl.link_by_name("n0-uplink").unwrap(), None);
    let mut lan_nl = Netlink::in_netns(&lan.ns).unwrap();
    assert!(lan_nl.link_by_name("n0-uplink").unwrap().is_some());
}

#[test]
fn link_setters_change_what_the_kernel_reports() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let bridge = nl.create_bridge("wbr0", None, None, None).unwrap();
    let a = nl.create_veth_pair("wva", "wvb", None, None).unwrap();

    nl.set_master(a, Some(bridge)).unwrap();
    nl.set_mtu(a, 1280).unwrap();
    nl.set_mac(a, PEER_MAC).unwrap();
    nl.set_alias(a, "weft:test").unwrap();
    nl.set_up(a).unwrap();
    let l = nl.link_by_index(a).unwrap().unwrap();
    assert_eq!(
        (l.master, l.mtu, l.mac, l.alias.as_deref(), l.up),
        (Some(bridge), 1280, Some(PEER_MAC), Some("weft:test"), true)
    );

    nl.set_master(a, None).unwrap();
    nl.set_alias(a, "").unwrap();
    nl.set_down(a).unwrap();
    nl.set_name(a, "wv-renamed").unwrap();
    let l = nl.link_by_index(a).unwrap().unwrap();
    assert_eq!(
        (l.name.as_str(), l.master, l.alias, l.up),
        ("wv-renamed", None, None, false)
    );
}

#[test]
fn invalid_names_are_rejected_before_reaching_the_kernel() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let err = nl
        .create_bridge("a-name-longer-than-15", None, None, None)
        .unwrap_err();
    assert!(err.to_string().contains("longer than 15"), "{err}");
}

#[test]
fn kernel_refusals_carry_the_operation_and_errno() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let err = nl.set_mtu(999_999, 1500).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.errno(), Some(libc::ENODEV));
    assert!(
        err.to_string().starts_with("set link mtu link 999999"),
        "{err}"
    );
}

#[test]
fn socket_opened_in_another_netns_keeps_talking_to_it_from_this_thread() {
    let _ns = isolate();
    let other = NamedNs::new("sock");
    let before = netlink_common::thread_netns_inode();
    let mut inner = Netlink::in_netns(&other.ns).unwrap();
    assert_eq!(netlink_common::thread_netns_inode(), before);
    let b = inner.create_bridge("wbr-inner", None, None, None).unwrap();
    assert!(inner.link_by_index(b).unwrap().is_some());
    let mut here = Netlink::new().unwrap();
    assert_eq!(here.link_by_name("wbr-inner").unwrap(), None);
}

#[test]
fn opening_a_socket_in_a_deleted_netns_reports_it_gone() {
    let _ns = isolate();
    let gone = NamedNs::new("gone");
    let path = weft_dataplane::netns::named_path(&gone.name);
    drop(gone);
    let err = weft_dataplane::netns::Netns::open(&path).unwrap_err();
    assert!(err.is_gone(), "{err}");
}

#[test]
fn generic_requests_report_the_kernels_extended_ack_text() {
    use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::link::InfoKind;
    use rtnetlink::{LinkMessageBuilder, LinkUnspec};

    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Other(
        "weft-no-such".into(),
    ))
    .name("wx0")
    .build();
    let err = nl
        .request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
    assert!(err.to_string().contains("Unknown device type"), "{err}");

    let dump = nl
        .request(
            RouteNetlinkMessage::GetLink(LinkMessageBuilder::<LinkUnspec>::new().build()),
            NLM_F_DUMP,
        )
        .unwrap();
    assert_eq!(dump.len(), 1, "only lo");
}

#[test]
fn the_port_vlan_dump_decodes_bridge_ports_and_reports_vlan_filtering() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let br = nl.create_bridge("wvbr", None, None, None).unwrap();
    let port = nl.create_veth_pair("wvp0", "wvp1", None, None).unwrap();
    nl.set_master(port, Some(br)).unwrap();
    nl.set_up(port).unwrap();
    // The AF_BRIDGE dump carries more than VLANs (the port's IFLA_PROTINFO...): it must decode.
    let all = nl.all_port_vlans().unwrap();
    assert!(all.contains_key(&port), "the port is in the dump: {all:?}");
    let bridge = nl.link_by_index(br).unwrap().unwrap();
    match nl.set_vlan_filtering(br, true) {
        Err(e) if e.is_not_supported() => {
            println!("NOT SUPPORTED BY THIS KERNEL: VLAN-filtering bridges ({e})");
            assert_eq!(
                bridge.vlan_filtering,
                Some(false),
                "read from the bridge's link info"
            );
            let err = nl
                .change_port_vlans(port, &[weft_dataplane::vlan::PortVlan::tagged(20)], &[])
                .unwrap_err();
            assert!(err.is_not_supported(), "{err}");
        }
        Err(e) => panic!("set vlan_filtering: {e}"),
        Ok(()) => {
            use weft_dataplane::vlan::{PortVlan, PortVlans, VlanRange};
            assert_eq!(
                nl.link_by_index(br).unwrap().unwrap().vlan_filtering,
                Some(true)
            );
            // A new port holds the bridge's default VLAN 1; a trunk replaces it.
            assert_eq!(nl.port_vlans(port).unwrap(), [PortVlan::access(1)]);
            let want = PortVlans::workload(10, &[VlanRange { min: 100, max: 102 }]);
            assert!(nl.set_port_vlans(port, &want).unwrap());
            let mut got = nl.port_vlans(port).unwrap();
            got.sort();
            assert_eq!(got, want.entries());
            assert!(!nl.set_port_vlans(port, &want).unwrap(), "idempotent");
        }
    }
}

#[test]
fn links_deleted_together_leave_the_others_and_lo_in_their_group_is_kept() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let make = |nl: &mut Netlink, name: &str| nl.create_bridge(name, None, None, None).unwrap();
    let (a, b, c) = (
        make(&mut nl, "dla"),
        make(&mut nl, "dlb"),
        make(&mut nl, "dlc"),
    );
    let kept = make(&mut nl, "dlkept");
    // c is gone before the request: skipped, not an error.
    assert!(nl.delete_link(c).unwrap());
    assert_eq!(nl.delete_links(&[a, b, c]).unwrap(), 2);
    for name in ["dla", "dlb", "dlc"] {
        assert!(nl.link_by_name(name).unwrap().is_none(), "{name} left");
    }
    assert!(nl.link_by_name("dlkept").unwrap().is_some());
    assert_eq!(nl.delete_links(&[a]).unwrap(), 0);
    assert_eq!(nl.delete_links(&[]).unwrap(), 0);

    // A link the kernel cannot delete in the group (lo, put there by someone else): the group
    // is refused, and the links asked for are deleted one by one; lo stays.
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "group"])
        .arg(names::DELETE_GROUP.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let (d, e) = (make(&mut nl, "dld"), make(&mut nl, "dle"));
    assert_eq!(nl.delete_links(&[d, e, kept]).unwrap(), 3);
    for name in ["dld", "dle", "dlkept"] {
        assert!(nl.link_by_name(name).unwrap().is_none(), "{name} left");
    }
    assert!(nl.link_by_name("lo").unwrap().is_some());
}

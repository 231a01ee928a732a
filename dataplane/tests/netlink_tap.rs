//! Persistent TAP devices through /dev/net/tun (tier 3), each test in its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, isolate};
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns;
use weft_dataplane::tap::{TapSpec, create_persistent_tap, tap_info};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x7a, 0x70, 0x01];

fn spec(name: &str) -> TapSpec<'_> {
    TapSpec {
        name,
        owner: None,
        group: None,
        queues: 1,
        vnet_hdr: false,
        mtu: None,
        mac: None,
    }
}

#[test]
fn multi_queue_tap_is_persistent_owned_and_reported_as_tun() {
    let _ns = isolate();
    let index = create_persistent_tap(&TapSpec {
        owner: Some(107),
        group: Some(108),
        queues: 4,
        vnet_hdr: true,
        mtu: Some(9000),
        mac: Some(MAC),
        ..spec("wtap0")
    })
    .unwrap();

    let mut nl = Netlink::new().unwrap();
    let link = nl
        .link_by_name("wtap0")
        .unwrap()
        .expect("tap exists after close");
    assert_eq!(link.index, index);
    assert_eq!(link.kind.as_deref(), Some("tun"));
    assert_eq!(link.mtu, 9000);
    assert_eq!(link.mac, Some(MAC));
    assert!(!link.up);

    let info = tap_info(&mut nl, index).unwrap().expect("tun info");
    assert!(info.tap, "{info:?}");
    assert!(info.persistent, "{info:?}");
    assert!(info.multi_queue, "{info:?}");
    assert!(info.vnet_hdr, "{info:?}");
    assert_eq!(info.owner, Some(107));
    assert_eq!(info.group, Some(108));
    assert_eq!(info.attached_queues, 0, "the creating fd is closed");

    assert!(nl.delete_link(index).unwrap());
    assert_eq!(nl.link_by_name("wtap0").unwrap(), None);
}

#[test]
fn single_queue_tap_without_owner() {
    let _ns = isolate();
    let index = create_persistent_tap(&spec("wtap1")).unwrap();
    let mut nl = Netlink::new().unwrap();
    let info = tap_info(&mut nl, index).unwrap().expect("tun info");
    assert!(info.tap && info.persistent && !info.multi_queue && !info.vnet_hdr);
    assert_eq!((info.owner, info.group), (None, None));
}

#[test]
fn creating_a_tap_whose_name_is_taken_fails_with_exists() {
    let _ns = isolate();
    create_persistent_tap(&spec("wtap2")).unwrap();
    let err = create_persistent_tap(&spec("wtap2")).unwrap_err();
    assert!(err.is_exists(), "{err}");
    let mut nl = Netlink::new().unwrap();
    nl.create_bridge("wbr0", None, None, None).unwrap();
    let err = create_persistent_tap(&spec("wbr0")).unwrap_err();
    assert!(err.is_exists(), "{err}");
}

#[test]
fn a_failed_configuration_leaves_no_device() {
    let _ns = isolate();
    // MTU 10 is below the minimum of an ethernet device: the kernel refuses it.
    let err = create_persistent_tap(&TapSpec {
        mtu: Some(10),
        ..spec("wtap3")
    })
    .unwrap_err();
    assert!(err.to_string().contains("wtap3"), "{err}");
    let mut nl = Netlink::new().unwrap();
    assert_eq!(nl.link_by_name("wtap3").unwrap(), None);
}

#[test]
fn tap_is_created_in_the_namespace_of_the_calling_thread() {
    let _ns = isolate();
    let vm = NamedNs::new("tap");
    netns::run_in(&vm.ns, || create_persistent_tap(&spec("wtap4")))
        .unwrap()
        .unwrap();
    let mut here = Netlink::new().unwrap();
    assert_eq!(here.link_by_name("wtap4").unwrap(), None);
    let mut there = Netlink::in_netns(&vm.ns).unwrap();
    let link = there
        .link_by_name("wtap4")
        .unwrap()
        .expect("tap in vm netns");
    assert_eq!(link.kind.as_deref(), Some("tun"));
}

#[test]
fn tap_info_of_a_non_tap_is_none() {
    let _ns = isolate();
    let mut nl = Netlink::new().unwrap();
    let br = nl.create_bridge("wbr0", None, None, None).unwrap();
    assert_eq!(tap_info(&mut nl, br).unwrap(), None);
    assert_eq!(tap_info(&mut nl, 999_999).unwrap(), None);
}

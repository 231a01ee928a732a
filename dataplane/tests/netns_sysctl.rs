//! Sysctls follow the network namespace of the calling thread (tier 3).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, isolate};
use weft_dataplane::{netns, sysctl};

#[test]
fn sysctl_set_and_get_in_an_unshared_netns() {
    let _own = isolate();
    sysctl::set("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        sysctl::get("/proc/sys/net/ipv4/ip_forward").unwrap(),
        "1",
        "path form"
    );
    assert!(!sysctl::set_if_different("net.ipv4.ip_forward", "1").unwrap());
    assert!(sysctl::set_if_different("net.ipv4.ip_forward", "0").unwrap());
    assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "0");
}

#[test]
fn sysctls_belong_to_the_thread_that_reads_them() {
    let _own = isolate();
    let other = NamedNs::new("sysctl");
    let key = "net.ipv6.conf.all.forwarding";
    let get_there = || {
        netns::run_in(&other.ns, || sysctl::get(key))
            .unwrap()
            .unwrap()
    };
    let set_there = |v| {
        netns::run_in(&other.ns, || sysctl::set(key, v))
            .unwrap()
            .unwrap()
    };

    set_there("0");
    sysctl::set(key, "1").unwrap();
    assert_eq!(get_there(), "0", "the other namespace is untouched");
    assert_eq!(sysctl::get(key).unwrap(), "1");

    set_there("1");
    sysctl::set(key, "0").unwrap();
    assert_eq!(get_there(), "1", "ours does not reach theirs");
    assert_eq!(sysctl::get(key).unwrap(), "0");
}

#[test]
fn multi_value_sysctls_compare_by_words() {
    let _own = isolate();
    let key = "net.ipv4.ip_local_port_range";
    sysctl::set(key, "20000 30000").unwrap();
    assert_eq!(sysctl::get(key).unwrap(), "20000\t30000");
    assert!(!sysctl::set_if_different(key, "20000 30000").unwrap());
}

#[test]
fn per_interface_sysctls_of_a_missing_interface_are_not_found() {
    let _own = isolate();
    let err = sysctl::get("net.ipv4.conf.nosuchif0.forwarding").unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let err = sysctl::set("net/ipv4/conf/nosuch.100/forwarding", "1").unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

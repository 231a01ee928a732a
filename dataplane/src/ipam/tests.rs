//! Unit tests of the IPAM store, one per rule.

use super::*;
use tempfile::TempDir;

fn store() -> (TempDir, IpamStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = IpamStore::open(dir.path(), "net").unwrap();
    (dir, s)
}

fn att(id: &str) -> Attachment {
    Attachment {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

fn req(id: &str) -> AllocRequest {
    AllocRequest {
        attachment: att(id),
        ..AllocRequest::default()
    }
}

fn with_static(id: &str, ips: &[&str]) -> AllocRequest {
    AllocRequest {
        static_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        ..req(id)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// 10.0.0.0/16 network; this node has 10.0.1.0/29 (first block: .0 is not the subnet's network
/// address); gateway 10.0.0.1 (outside the block).
fn v4_pool() -> Pool {
    Pool {
        block_v4: Some("10.0.1.0/29".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
        gateways: vec![ip("10.0.0.1")],
        ..Pool::default()
    }
}

fn dual_pool() -> Pool {
    Pool {
        block_v4: Some("10.0.0.0/24".parse().unwrap()),
        block_v6: Some("fd00::/120".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
        subnet_v6: Some("fd00::/64".parse().unwrap()),
        gateways: vec![ip("10.0.0.1"), ip("fd00::1")],
        exclude: vec![],
    }
}

#[test]
fn children_are_the_annotations_interfaces_of_one_interface_on_every_network() {
    let dir = tempfile::tempdir().unwrap();
    let alloc = |network: &str, cid: &str, ifname: &str, parent: Option<&str>| {
        IpamStore::open(dir.path(), network)
            .unwrap()
            .allocate(
                &v4_pool(),
                AllocRequest {
                    attachment: Attachment {
                        container_id: cid.into(),
                        ifname: ifname.into(),
                    },
                    parent: parent.map(str::to_string),
                    ..AllocRequest::default()
                },
            )
            .unwrap();
    };
    alloc("nat", "c1", "eth0", None);
    alloc("lan", "c1", "net1", Some("eth0"));
    alloc("lan", "c1", "net2", None); // a Multus delegate's own attachment
    alloc("lan", "c2", "net1", Some("eth0"));
    alloc("lan", "c1", "net3", Some("net2"));
    alloc("storage", "c1", "net4", Some("eth0"));
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(n, i)| (n.to_string(), i.to_string()))
            .collect()
    };
    assert_eq!(
        IpamStore::children(dir.path(), "c1", "eth0"),
        pairs(&[("lan", "net1"), ("storage", "net4")])
    );
    assert_eq!(
        IpamStore::children(dir.path(), "c1", "net2"),
        pairs(&[("lan", "net3")])
    );
    assert!(IpamStore::children(dir.path(), "c3", "eth0").is_empty());
    // Where an interface itself is: eth0 on nat, the delegate's net2 on lan (a child of
    // eth0, net1, is not an owner of net1's name); none for an unknown one, which is then
    // detached from the network asked for, if any.
    let owners = |cid: &str, ifname: &str| IpamStore::related(dir.path(), cid, ifname).owners;
    assert_eq!(owners("c1", "eth0"), ["nat"]);
    assert_eq!(owners("c1", "net2"), ["lan"]);
    assert!(owners("c1", "net1").is_empty());
    // net1 is eth0's child: a DEL of net1 (the runtime's, after its ADD of net1 was refused)
    // detaches nothing, not even from the network it names, which holds the child.
    let net1 = IpamStore::related(dir.path(), "c1", "net1");
    assert_eq!(net1.child_of, pairs(&[("lan", "eth0")]));
    assert!(net1.is_anothers());
    assert!(net1.owners_or("lan", true).is_empty());
    assert!(net1.owners_or("nat", true).is_empty());
    // eth0's DEL (or the undo of its ADD) detaches its child from the child's network.
    assert_eq!(net1.owners_or("lan", false), ["lan"]);
    assert!(!IpamStore::related(dir.path(), "c1", "net2").is_anothers());
    // Its name is not another ADD's to take on its network: the same interface asked for
    // with another parent (or none) is refused, with eth0's parentage it is found again.
    let taken = IpamStore::open(dir.path(), "lan").unwrap().allocate(
        &v4_pool(),
        AllocRequest {
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "net1".into(),
            },
            ..AllocRequest::default()
        },
    );
    let e = taken.unwrap_err();
    assert!(matches!(e, IpamError::InterfaceTaken { .. }), "{e:?}");
    assert_eq!(e.cni_code(), crate::codes::IFNAME_TAKEN);
    assert!(
        e.to_string().contains("by the ADD of interface eth0"),
        "{e}"
    );
    alloc("lan", "c1", "net1", Some("eth0"));
    let unknown = IpamStore::related(dir.path(), "c9", "eth0");
    assert_eq!(unknown, Related::default());
    assert_eq!(unknown.owners_or("nat", true), ["nat"]);
    assert!(unknown.owners_or("", true).is_empty());
    assert_eq!(
        IpamStore::related(dir.path(), "c1", "eth0").owners_or("lan", true),
        ["nat"],
        "the network that holds it, not the one asked for"
    );
    // Released: no longer a child.
    IpamStore::open(dir.path(), "storage")
        .unwrap()
        .release(&Attachment {
            container_id: "c1".into(),
            ifname: "net4".into(),
        })
        .unwrap();
    assert_eq!(
        IpamStore::children(dir.path(), "c1", "eth0"),
        pairs(&[("lan", "net1")])
    );
    // No store at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(IpamStore::children(empty.path(), "c1", "eth0").is_empty());
}

#[test]
fn a_store_that_does_not_wait_fails_busy_while_another_holds_its_lock_and_changes_nothing() {
    let (dir, s) = store();
    s.allocate(&v4_pool(), req("a")).unwrap();
    let before = fs::read(s.path()).unwrap();
    // Another process's operation: an exclusive lock on its own open file description.
    let held = File::options()
        .read(true)
        .write(true)
        .open(dir.path().join("ipam/net").join(LOCK_FILE))
        .unwrap();
    held.lock().unwrap();
    let quick = s.clone().without_waiting();
    let e = quick.allocate(&v4_pool(), req("b")).unwrap_err();
    assert!(e.is_busy(), "{e}");
    assert_eq!(e.cni_code(), crate::codes::TRY_AGAIN_LATER);
    assert!(e.to_string().contains("held by another operation"), "{e}");
    let e = quick.release(&att("a")).unwrap_err();
    assert!(e.is_busy(), "{e}");
    assert_eq!(fs::read(s.path()).unwrap(), before, "nothing changed");
    // A read holds the lock shared: busy too without waiting, and a waiting one waits.
    assert!(quick.list().unwrap_err().is_busy());
    assert!(quick.get(&att("a")).unwrap_err().is_busy());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || tx.send(s.list().map(|l| l.len())).unwrap())
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(200))
            .is_err(),
        "a read waits while a write holds the lock"
    );
    held.unlock().unwrap();
    assert_eq!(rx.recv().unwrap().unwrap(), 1);
    reader.join().unwrap();
    let b = quick.allocate(&v4_pool(), req("b")).unwrap();
    assert_eq!(quick.get(&att("b")).unwrap(), Some(b));
    assert!(quick.release(&att("a")).unwrap().is_some());
}

#[test]
fn reads_share_the_lock_with_each_other_but_not_with_a_write() {
    let (dir, s) = store();
    s.allocate(&v4_pool(), req("a")).unwrap();
    // Another process's read: a shared lock on its own open file description.
    let reading = File::open(dir.path().join("ipam/net").join(LOCK_FILE)).unwrap();
    reading.lock_shared().unwrap();
    let quick = s.clone().without_waiting();
    assert_eq!(quick.list().unwrap().len(), 1, "reads go on beside a read");
    assert!(quick.allocate(&v4_pool(), req("b")).unwrap_err().is_busy());
    reading.unlock().unwrap();
    quick.allocate(&v4_pool(), req("b")).unwrap();
}

#[test]
fn a_write_overwrites_the_file_the_last_one_replaced_and_makes_no_new_one() {
    let (_d, s) = store();
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let tmp = s.dir().join(ALLOCATIONS_TMP_FILE);
    s.allocate(&v4_pool(), req("a")).unwrap();
    let first = inode(&s.path());
    let after_first = fs::read(s.path()).unwrap();
    s.allocate(&v4_pool(), req("b")).unwrap();
    let second = inode(&s.path());
    assert_ne!(first, second);
    // The state before, kept under the temporary name, whole.
    assert_eq!(inode(&tmp), first);
    assert_eq!(fs::read(&tmp).unwrap(), after_first);
    // Two files from now on, taking turns; shorter states cut what the longer ones left.
    for (i, id) in ["c", "d", "e"].into_iter().enumerate() {
        s.allocate(&v4_pool(), req(id)).unwrap();
        let (now, kept) = if i % 2 == 0 {
            (first, second)
        } else {
            (second, first)
        };
        assert_eq!((inode(&s.path()), inode(&tmp)), (now, kept), "write {i}");
    }
    for id in ["a", "b", "c", "d"] {
        s.release(&att(id)).unwrap();
        let file: serde_json::Value = serde_json::from_slice(&fs::read(s.path()).unwrap()).unwrap();
        assert!([first, second].contains(&inode(&s.path())));
        assert!(
            file["allocations"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["container_id"] != id),
            "{file}"
        );
    }
    assert_eq!(s.list().unwrap().len(), 1);
}

#[test]
fn open_creates_the_store_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = IpamStore::open(dir.path(), "nat-demo").unwrap();
    assert_eq!(s.dir(), dir.path().join("ipam").join("nat-demo"));
    assert!(s.dir().is_dir());
    assert_eq!(s.network(), "nat-demo");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn network_names_that_escape_the_directory_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "../../victim",
        "a\",\"eth0",
        "Upper",
        "-a",
    ] {
        let e = IpamStore::open(dir.path(), bad).unwrap_err();
        assert!(matches!(e, IpamError::InvalidNetwork { .. }), "{bad}");
        assert_eq!(e.cni_code(), 7);
    }
}

#[test]
fn skips_the_block_network_address_and_the_subnet_broadcast() {
    let (_d, s) = store();
    // Block 10.0.255.248/29 is the last of the subnet: .248 is its network address, .255 the
    // subnet's broadcast.
    let pool = Pool {
        block_v4: Some("10.0.255.248/29".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
        ..Pool::default()
    };
    let got: Vec<IpAddr> = (0..6)
        .map(|i| s.allocate(&pool, req(&format!("c{i}"))).unwrap().ips[0])
        .collect();
    let want: Vec<IpAddr> = (249..=254).map(|n| ip(&format!("10.0.255.{n}"))).collect();
    assert_eq!(got, want);
    let e = s.allocate(&pool, req("full")).unwrap_err();
    assert!(matches!(
        e,
        IpamError::Exhausted {
            family: IpFamily::V4,
            ..
        }
    ));
}

#[test]
fn a_block_inside_the_subnet_hands_out_its_last_address() {
    let (_d, s) = store();
    let ips: Vec<IpAddr> = (0..7)
        .map(|i| s.allocate(&v4_pool(), req(&format!("c{i}"))).unwrap().ips[0])
        .collect();
    // .0 is the block's network address; .7 is not the subnet's broadcast, so it is used.
    assert_eq!(ips.first(), Some(&ip("10.0.1.1")));
    assert_eq!(ips.last(), Some(&ip("10.0.1.7")));
}

#[test]
fn without_a_subnet_the_block_broadcast_is_skipped() {
    let (_d, s) = store();
    let pool = Pool {
        block_v4: Some("192.168.5.0/30".parse().unwrap()),
        ..Pool::default()
    };
    let a = s.allocate(&pool, req("a")).unwrap();
    let b = s.allocate(&pool, req("b")).unwrap();
    assert_eq!((a.ips[0], b.ips[0]), (ip("192.168.5.1"), ip("192.168.5.2")));
    assert!(matches!(
        s.allocate(&pool, req("c")),
        Err(IpamError::Exhausted { .. })
    ));
}

#[test]
fn skips_gateways_and_excluded_ranges() {
    let (_d, s) = store();
    let pool = Pool {
        block_v4: Some("10.0.0.0/28".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/24".parse().unwrap()),
        gateways: vec![ip("10.0.0.1")],
        exclude: vec![
            "10.0.0.2/31".parse().unwrap(),
            "10.0.0.4/30".parse().unwrap(),
            "10.0.0.9/32".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ],
        ..Pool::default()
    };
    let got: Vec<IpAddr> = (0..5)
        .map(|i| s.allocate(&pool, req(&format!("c{i}"))).unwrap().ips[0])
        .collect();
    assert_eq!(
        got,
        [
            "10.0.0.8",
            "10.0.0.10",
            "10.0.0.11",
            "10.0.0.12",
            "10.0.0.13"
        ]
        .map(ip)
        .to_vec()
    );
}

#[test]
fn a_huge_excluded_range_is_skipped_in_one_step() {
    let (_d, s) = store();
    let pool = Pool {
        block_v6: Some("fd00::/64".parse().unwrap()),
        exclude: vec!["fd00::/65".parse().unwrap()],
        ..Pool::default()
    };
    let a = s.allocate(&pool, req("a")).unwrap();
    assert_eq!(a.ips, vec![ip("fd00::8000:0:0:0")]);
}

#[test]
fn dual_stack_gets_one_address_per_family_ipv4_first() {
    let (_d, s) = store();
    let a = s.allocate(&dual_pool(), req("a")).unwrap();
    assert_eq!(a.ips, vec![ip("10.0.0.2"), ip("fd00::2")]);
    let v6_only = Pool {
        block_v6: Some("fd00:1::/120".parse().unwrap()),
        ..Pool::default()
    };
    let b = s.allocate(&v6_only, req("b")).unwrap();
    // The block's network address (the subnet-router anycast) is skipped.
    assert_eq!(b.ips, vec![ip("fd00:1::1")]);
}

#[test]
fn allocation_is_round_robin_so_a_freed_address_is_not_reused_at_once() {
    let (_d, s) = store();
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    s.release(&att("a")).unwrap();
    let b = s.allocate(&v4_pool(), req("b")).unwrap();
    assert_ne!(a.ips, b.ips);
    assert_eq!(b.ips, vec![ip("10.0.1.2")]);
    // Wraps around to the freed addresses once the end of the block is reached.
    for i in 0..5 {
        s.allocate(&v4_pool(), req(&format!("c{i}"))).unwrap();
    }
    let wrapped = s.allocate(&v4_pool(), req("wrap")).unwrap();
    assert_eq!(wrapped.ips, vec![ip("10.0.1.1")]);
}

#[test]
fn a_changed_block_starts_from_its_beginning() {
    let (_d, s) = store();
    s.allocate(&v4_pool(), req("a")).unwrap();
    let other = Pool {
        block_v4: Some("10.0.2.0/29".parse().unwrap()),
        ..v4_pool()
    };
    assert_eq!(
        s.allocate(&other, req("b")).unwrap().ips,
        vec![ip("10.0.2.1")]
    );
}

#[test]
fn exhaustion_names_network_family_and_block() {
    let (_d, s) = store();
    for i in 0..7 {
        s.allocate(&v4_pool(), req(&format!("c{i}"))).unwrap();
    }
    let e = s.allocate(&v4_pool(), req("one-too-many")).unwrap_err();
    assert_eq!(e.cni_code(), 104);
    let msg = e.to_string();
    assert!(
        msg.contains("IPv4") && msg.contains("10.0.1.0/29") && msg.contains("net"),
        "{msg}"
    );
    assert!(s.get(&att("one-too-many")).unwrap().is_none());
}

#[test]
fn exhausting_one_family_allocates_nothing_in_the_other() {
    let (_d, s) = store();
    let pool = Pool {
        block_v4: Some("10.0.0.0/30".parse().unwrap()),
        block_v6: Some("fd00::/64".parse().unwrap()),
        ..Pool::default()
    };
    s.allocate(&pool, req("a")).unwrap();
    s.allocate(&pool, req("b")).unwrap();
    assert!(s.allocate(&pool, req("c")).is_err());
    assert_eq!(s.list().unwrap().len(), 2);
}

#[test]
fn a_pool_without_blocks_asks_to_retry_later() {
    let (_d, s) = store();
    let e = s.allocate(&Pool::default(), req("a")).unwrap_err();
    assert!(matches!(e, IpamError::NoBlock { .. }));
    assert_eq!(e.cni_code(), 11);
}

#[test]
fn a_static_address_inside_the_block_is_granted() {
    let (_d, s) = store();
    let a = s
        .allocate(&dual_pool(), with_static("a", &["10.0.0.77"]))
        .unwrap();
    // The family without a static address gets a dynamic one.
    assert_eq!(a.ips, vec![ip("10.0.0.77"), ip("fd00::2")]);
    let b = s
        .allocate(&dual_pool(), with_static("b", &["fd00::99", "10.0.0.78"]))
        .unwrap();
    assert_eq!(b.ips, vec![ip("10.0.0.78"), ip("fd00::99")]);
    // Dynamic allocation never hands out a static address.
    let dynamic: Vec<IpAddr> = (0..100)
        .flat_map(|i| s.allocate(&dual_pool(), req(&format!("d{i}"))).unwrap().ips)
        .collect();
    assert!(!dynamic.contains(&ip("10.0.0.77")) && !dynamic.contains(&ip("10.0.0.78")));
}

#[test]
fn a_static_address_outside_the_block_names_address_and_block() {
    let (_d, s) = store();
    // Inside the subnet but in another node's block.
    let e = s
        .allocate(&v4_pool(), with_static("a", &["10.0.2.5"]))
        .unwrap_err();
    assert!(matches!(e, IpamError::StaticOutOfBlock { .. }));
    assert_eq!(e.cni_code(), 7);
    let msg = e.to_string();
    assert!(
        msg.contains("10.0.2.5") && msg.contains("10.0.1.0/29"),
        "{msg}"
    );
    // A family the pool has no block for.
    let e = s
        .allocate(&v4_pool(), with_static("a", &["fd00::5"]))
        .unwrap_err();
    assert!(e.to_string().contains("IPv6 block (there is none)"), "{e}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn a_static_address_that_is_reserved_or_excluded_is_refused() {
    let (_d, s) = store();
    let pool = Pool {
        block_v4: Some("10.0.0.0/24".parse().unwrap()),
        subnet_v4: Some("10.0.0.0/24".parse().unwrap()),
        gateways: vec![ip("10.0.0.1")],
        exclude: vec!["10.0.0.16/28".parse().unwrap()],
        ..Pool::default()
    };
    for (addr, why) in [
        ("10.0.0.1", "gateway"),
        ("10.0.0.0", "network address"),
        ("10.0.0.255", "broadcast"),
        ("10.0.0.20", "exclude 10.0.0.16/28"),
    ] {
        let e = s.allocate(&pool, with_static("a", &[addr])).unwrap_err();
        assert!(matches!(e, IpamError::StaticExcluded { .. }), "{addr}");
        assert_eq!(e.cni_code(), 7);
        let msg = e.to_string();
        assert!(msg.contains(addr) && msg.contains(why), "{msg}");
    }
}

#[test]
fn a_static_address_in_use_names_its_holder() {
    let (_d, s) = store();
    s.allocate(&v4_pool(), with_static("first", &["10.0.1.5"]))
        .unwrap();
    let e = s
        .allocate(&v4_pool(), with_static("second", &["10.0.1.5"]))
        .unwrap_err();
    assert!(matches!(e, IpamError::StaticInUse { .. }));
    assert_eq!(e.cni_code(), 7);
    assert!(e.to_string().contains("first"), "{e}");
}

#[test]
fn two_static_addresses_of_one_family_are_refused() {
    let (_d, s) = store();
    let e = s
        .allocate(&v4_pool(), with_static("a", &["10.0.1.2", "10.0.1.3"]))
        .unwrap_err();
    assert!(matches!(e, IpamError::StaticFamilyTwice { .. }));
    assert_eq!(e.cni_code(), 7);
}

#[test]
fn allocating_again_for_the_same_attachment_returns_the_same_allocation() {
    let (_d, s) = store();
    let first = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                pod_name: Some("p".into()),
                ..req("a")
            },
        )
        .unwrap();
    // Even with other metadata or a static wish, a retried ADD gets what it already has.
    let again = s
        .allocate(&v4_pool(), with_static("a", &["10.0.1.6"]))
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(s.list().unwrap().len(), 1);
    // Another interface of the same container is another attachment.
    let other = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                attachment: Attachment {
                    container_id: "a".into(),
                    ifname: "net1".into(),
                },
                ..AllocRequest::default()
            },
        )
        .unwrap();
    assert_ne!(other.ips, first.ips);
}

#[test]
fn allocation_records_the_request_metadata() {
    let (_d, s) = store();
    let a = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                attachment: att("c1"),
                static_ips: vec![],
                mac: Some("02:00:00:00:00:01".into()),
                host_ifname: Some("wf0123".into()),
                pod_namespace: Some("default".into()),
                pod_name: Some("web".into()),
                netns: Some("/var/run/netns/x".into()),
                owner: None,
                parent: None,
                vlan_trunk: vec![crate::vlan::VlanRange { min: 100, max: 110 }],
                ..AllocRequest::default()
            },
        )
        .unwrap();
    assert!(a.created > 1_700_000_000);
    assert_eq!(
        a.vlan_trunk,
        [crate::vlan::VlanRange { min: 100, max: 110 }],
        "a trunk port's VLANs outlive an agent restart"
    );
    assert_eq!(s.get(&att("c1")).unwrap(), Some(a.clone()));
    assert_eq!(a.attachment(), att("c1"));
    assert_eq!(a.host_ifname.as_deref(), Some("wf0123"));
}

#[test]
fn release_is_idempotent() {
    let (_d, s) = store();
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    assert_eq!(s.release(&att("a")).unwrap(), Some(a));
    assert_eq!(s.release(&att("a")).unwrap(), None);
    assert_eq!(s.release(&att("never")).unwrap(), None);
    assert!(s.get(&att("a")).unwrap().is_none());
}

#[test]
fn gc_releases_everything_not_in_the_valid_list() {
    let (_d, s) = store();
    for id in ["a", "b", "c", "d"] {
        s.allocate(&v4_pool(), req(id)).unwrap();
    }
    let released = s.gc(&[att("b"), att("d"), att("unknown")]).unwrap();
    let mut gone: Vec<String> = released.into_iter().map(|a| a.container_id).collect();
    gone.sort();
    assert_eq!(gone, vec!["a", "c"]);
    let kept: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(kept, vec!["b", "d"]);
    assert!(s.gc(&[att("b"), att("d")]).unwrap().is_empty());
    assert_eq!(s.gc(&[]).unwrap().len(), 2);
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn gc_keeps_the_annotations_interfaces_of_a_valid_attachment() {
    let (_d, s) = store();
    // eth0 of a and b on this network; net1 on this network made by the ADD of a's and b's
    // eth0 (on another network, as the pod's annotation may put it).
    for id in ["a", "b"] {
        s.allocate(&v4_pool(), req(id)).unwrap();
        s.allocate(
            &v4_pool(),
            AllocRequest {
                attachment: Attachment {
                    container_id: id.into(),
                    ifname: "net1".into(),
                },
                parent: Some("eth0".into()),
                ..AllocRequest::default()
            },
        )
        .unwrap();
    }
    // The runtime knows only the interfaces it asked for: a's eth0.
    let released = s.gc(&[att("a")]).unwrap();
    let mut gone: Vec<String> = released
        .into_iter()
        .map(|a| format!("{}/{}", a.container_id, a.ifname))
        .collect();
    gone.sort();
    assert_eq!(gone, ["b/eth0", "b/net1"]);
    let kept: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .map(|a| format!("{}/{}", a.container_id, a.ifname))
        .collect();
    assert_eq!(kept, ["a/eth0", "a/net1"]);
}

#[test]
fn update_changes_metadata_but_never_addresses_or_identity() {
    let (_d, s) = store();
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    let updated = s
        .update(&att("a"), |alloc| {
            alloc.host_ifname = Some("wfabc".into());
            alloc.ips = vec![ip("10.9.9.9")];
            alloc.container_id = "hijack".into();
        })
        .unwrap()
        .unwrap();
    assert_eq!(updated.host_ifname.as_deref(), Some("wfabc"));
    assert_eq!(updated.ips, a.ips);
    assert_eq!(s.get(&att("a")).unwrap(), Some(updated));
    assert_eq!(s.update(&att("none"), |_| {}).unwrap(), None);
}

#[test]
fn a_stale_temp_file_from_a_crash_is_ignored() {
    let (_d, s) = store();
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    // A crash between writing the temp file and the rename leaves it behind, torn.
    fs::write(
        s.dir().join(ALLOCATIONS_TMP_FILE),
        b"{\"allocations\": [{\"ips\": [",
    )
    .unwrap();
    assert_eq!(s.list().unwrap(), vec![a.clone()]);
    let b = s.allocate(&v4_pool(), req("b")).unwrap();
    assert_eq!(s.list().unwrap(), vec![a, b]);
    // Overwritten: it holds the state before, whole.
    let kept: serde_json::Value =
        serde_json::from_slice(&fs::read(s.dir().join(ALLOCATIONS_TMP_FILE)).unwrap()).unwrap();
    assert_eq!(
        kept["allocations"].as_array().map(Vec::len),
        Some(1),
        "{kept}"
    );
}

#[test]
fn the_store_survives_being_reopened() {
    let (d, s) = store();
    let a = s.allocate(&dual_pool(), req("a")).unwrap();
    drop(s);
    let s = IpamStore::open(d.path(), "net").unwrap();
    assert_eq!(s.list().unwrap(), vec![a]);
    // And the round-robin position survived too.
    let b = s.allocate(&dual_pool(), req("b")).unwrap();
    assert_eq!(b.ips, vec![ip("10.0.0.3"), ip("fd00::3")]);
}

#[test]
fn a_corrupt_allocations_file_is_an_io_error_naming_the_file() {
    let (_d, s) = store();
    fs::write(s.dir().join(ALLOCATIONS_FILE), b"{ not json").unwrap();
    let e = s.allocate(&v4_pool(), req("a")).unwrap_err();
    assert!(matches!(e, IpamError::Corrupt { .. }));
    assert_eq!(e.cni_code(), 5);
    assert!(e.to_string().contains("allocations.json"), "{e}");
    assert!(matches!(s.list(), Err(IpamError::Corrupt { .. })));
}

#[test]
fn the_file_format_is_stable_json() {
    let (_d, s) = store();
    s.allocate(&v4_pool(), req("a")).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(s.dir().join(ALLOCATIONS_FILE)).unwrap()).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["last_v4"], "10.0.1.1");
    assert_eq!(v["allocations"][0]["container_id"], "a");
    assert_eq!(v["allocations"][0]["ips"][0], "10.0.1.1");
    // Files written by an older weft with fewer fields still load.
    fs::write(
        s.dir().join(ALLOCATIONS_FILE),
        br#"{"allocations": [{"ips": ["10.0.1.3"], "container_id": "old", "ifname": "eth0"}]}"#,
    )
    .unwrap();
    assert_eq!(s.list().unwrap()[0].ips, vec![ip("10.0.1.3")]);
}

#[test]
fn io_errors_map_to_code_5() {
    let e = IpamError::Lock {
        path: "/x/lock".into(),
        source: std::io::Error::other("boom"),
    };
    assert_eq!(e.cni_code(), 5);
    let e = IpamError::Io {
        op: "write",
        path: "/x".into(),
        source: std::io::Error::other("boom"),
    };
    assert_eq!(e.cni_code(), 5);
}

/// A VM's request with the MAC ADD gives the VM (one per VM, as `names::vm_mac`).
fn vm(id: &str, owner: &str) -> AllocRequest {
    AllocRequest {
        owner: Some(owner.into()),
        mac: Some(crate::names::format_mac(crate::names::vm_mac(
            owner, "eth0",
        ))),
        ..req(id)
    }
}

#[test]
fn a_vm_keeps_its_addresses_and_mac_across_restart_and_nobody_else_gets_them() {
    let (_d, s) = store();
    let pool = v4_pool();
    let first = s.allocate(&pool, vm("launcher-1", "default/vm-a")).unwrap();
    s.release(&att("launcher-1")).unwrap();
    // Another workload does not get the stopped VM's address.
    for i in 0..4 {
        let other = s.allocate(&pool, req(&format!("pod-{i}"))).unwrap();
        assert_ne!(other.ips, first.ips);
    }
    let err = s
        .allocate(
            &pool,
            with_static("pod-static", &[&first.ips[0].to_string()]),
        )
        .unwrap_err();
    assert!(err.to_string().contains("VM default/vm-a"), "{err}");
    // The restarted VM (another launcher pod and container) gets them back, with its MAC.
    let again = s
        .allocate(
            &pool,
            AllocRequest {
                mac: Some("02:ff:ff:ff:ff:ff".into()),
                ..vm("launcher-2", "default/vm-a")
            },
        )
        .unwrap();
    assert_eq!(again.ips, first.ips);
    assert_eq!(again.mac, vm("x", "default/vm-a").mac);
    // A migration target runs while the source still holds the addresses: same owner, fine.
    let target = s.allocate(&pool, vm("launcher-3", "default/vm-a")).unwrap();
    assert_eq!(target.ips, first.ips);
    // Forgetting the VM frees its addresses once its attachments are gone.
    assert_eq!(s.forget("default/vm-a").unwrap(), 1);
    assert!(s.reservations().unwrap().is_empty());
}

#[test]
fn a_migrating_vm_adopts_its_addresses_outside_the_block_pending_and_replaces_an_old_reservation() {
    let (_d, s) = store();
    let pool = v4_pool();
    // It ran here before (reserved 10.0.1.x), then elsewhere with another address.
    let old = s.allocate(&pool, vm("launcher-1", "default/vm-a")).unwrap();
    s.release(&att("launcher-1")).unwrap();
    let adopted = s
        .allocate(
            &pool,
            AllocRequest {
                static_ips: vec![ip("10.0.9.7")],
                adopt: true,
                pending: true,
                ..vm("launcher-2", "default/vm-a")
            },
        )
        .unwrap();
    assert_eq!(
        adopted.ips,
        [ip("10.0.9.7")],
        "outside this node's block, inside the subnet"
    );
    assert!(adopted.pending);
    assert_ne!(adopted.ips, old.ips);
    let r = s.reservations().unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ips, [ip("10.0.9.7")]);
    // Outside the subnet is still refused.
    let err = s
        .allocate(
            &pool,
            AllocRequest {
                static_ips: vec![ip("192.168.0.7")],
                adopt: true,
                ..vm("launcher-3", "default/vm-b")
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("192.168.0.7"), "{err}");
    // Idle reservations: none while vm-a is attached; after release, vm-a's.
    assert!(s.idle_reservations().unwrap().is_empty());
    s.release(&att("launcher-2")).unwrap();
    let idle = s.idle_reservations().unwrap();
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].owner, "default/vm-a");
}

#[test]
fn a_vm_restored_from_another_node_adopts_its_addresses_active_and_marks_when() {
    let (_d, s) = store();
    let pool = v4_pool();
    let restored = s
        .allocate(
            &pool,
            AllocRequest {
                static_ips: vec![ip("10.0.9.8")],
                adopt: true,
                owner_kubevirt: true,
                ..vm("launcher-1", "default/vm-a")
            },
        )
        .unwrap();
    assert_eq!(restored.ips, [ip("10.0.9.8")]);
    assert!(!restored.pending, "a cold start is not a migration target");
    let r = &s.reservations().unwrap()[0];
    assert!(r.kubevirt);
    assert!(r.since > 0);
}

#[test]
fn a_restore_from_another_node_wins_only_over_an_older_reservation_here() {
    let (_d, s) = store();
    let pool = v4_pool();
    let here = s.allocate(&pool, vm("launcher-1", "default/vm-a")).unwrap();
    s.release(&att("launcher-1")).unwrap();
    let since = s.reservations().unwrap()[0].since;
    let restore = |ip: &str, since: u64| crate::proto::Restore {
        node: "node-b".into(),
        ips: vec![self::ip(ip)],
        mac: Some("02:00:00:00:0b:0b".into()),
        since,
    };
    // node-b's reservation is older: this node's stays.
    let again = s
        .allocate(
            &pool,
            AllocRequest {
                restore: Some(restore("10.0.9.9", since - 10)),
                ..vm("launcher-2", "default/vm-a")
            },
        )
        .unwrap();
    assert_eq!(again.ips, here.ips);
    s.release(&att("launcher-2")).unwrap();
    // The VM ran on node-b after that: node-b's addresses and MAC, active at once.
    let restored = s
        .allocate(
            &pool,
            AllocRequest {
                restore: Some(restore("10.0.9.9", since + 10)),
                ..vm("launcher-3", "default/vm-a")
            },
        )
        .unwrap();
    assert_eq!(restored.ips, [ip("10.0.9.9")]);
    assert_eq!(restored.mac.as_deref(), Some("02:00:00:00:0b:0b"));
    assert!(!restored.pending);
    let r = s.reservations().unwrap();
    assert_eq!(r.len(), 1, "replaced: {r:?}");
    assert_eq!(r[0].ips, [ip("10.0.9.9")]);
    // Its old address here is free again for others.
    s.release(&att("launcher-3")).unwrap();
    assert_eq!(s.forget("default/vm-a").unwrap(), 1);
    let other = s
        .allocate(
            &pool,
            AllocRequest {
                static_ips: here.ips.clone(),
                ..req("pod-x")
            },
        )
        .unwrap();
    assert_eq!(other.ips, here.ips);
}

#[test]
fn forget_idle_keeps_a_vms_reservation_while_it_is_attached() {
    let (_d, s) = store();
    let pool = v4_pool();
    s.allocate(&pool, vm("launcher-1", "default/vm-a")).unwrap();
    s.allocate(&pool, vm("launcher-2", "default/vm-b")).unwrap();
    s.release(&att("launcher-2")).unwrap();
    assert_eq!(s.forget_idle("default/vm-a", |_| true).unwrap(), 0);
    assert_eq!(s.forget_idle("default/vm-b", |_| false).unwrap(), 0);
    assert_eq!(s.forget_idle("default/vm-b", |_| true).unwrap(), 1);
    let left: Vec<String> = s
        .reservations()
        .unwrap()
        .into_iter()
        .map(|r| r.owner)
        .collect();
    assert_eq!(left, ["default/vm-a"]);
}

#[test]
fn a_mac_another_workload_holds_is_refused_naming_the_mac_and_the_holder() {
    let (_d, s) = store();
    let victim = AllocRequest {
        pod_namespace: Some("default".into()),
        pod_name: Some("victim".into()),
        ..req("a")
    };
    let a = s.allocate(&v4_pool(), victim).unwrap();
    // The victim's MAC is the one ADD derives from its address.
    let victim_mac = crate::names::format_mac(a.effective_mac());
    assert_eq!(victim_mac, "0a:58:0a:00:01:01");
    let attacker = AllocRequest {
        mac: Some(victim_mac.clone()),
        ..req("b")
    };
    let err = s.allocate(&v4_pool(), attacker).unwrap_err();
    assert_eq!(err.cni_code(), 7);
    let msg = err.to_string();
    assert!(
        msg.contains("MAC 0a:58:0a:00:01:01")
            && msg.contains("pod default/victim (container a interface eth0)"),
        "{msg}"
    );
    assert!(
        s.get(&att("b")).unwrap().is_none(),
        "a refused ADD keeps nothing"
    );
    // A static MAC held by one workload is refused to the next, whatever the spelling.
    s.allocate(
        &v4_pool(),
        AllocRequest {
            mac: Some("02:00:00:00:00:01".into()),
            ..req("c")
        },
    )
    .unwrap();
    let err = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                mac: Some("02-00-00-00-00-01".into()),
                ..req("d")
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, IpamError::MacInUse { holder, .. } if holder == "container c interface eth0"),
        "{err}"
    );
    // The same attachment again is idempotent, and another MAC is fine.
    s.allocate(&v4_pool(), req("a")).unwrap();
    s.allocate(
        &v4_pool(),
        AllocRequest {
            mac: Some("02:00:00:00:00:02".into()),
            ..req("d")
        },
    )
    .unwrap();
}

#[test]
fn a_vms_migration_target_may_share_the_sources_mac() {
    let (_d, s) = store();
    let mut source = vm("src", "default/vm-a");
    source.mac = Some("02:00:00:00:0a:01".into());
    s.allocate(&v4_pool(), source).unwrap();
    let mut target = vm("dst", "default/vm-a");
    target.mac = Some("02:00:00:00:0a:01".into());
    s.allocate(&v4_pool(), target).unwrap();
    let mut other = vm("other", "default/vm-b");
    other.mac = Some("02:00:00:00:0a:01".into());
    assert!(matches!(
        s.allocate(&v4_pool(), other).unwrap_err(),
        IpamError::MacInUse { .. }
    ));
}

#[test]
fn an_address_whose_derived_mac_a_workload_holds_is_skipped_not_refused() {
    let (_d, s) = store();
    // A workload asks for the MAC the next address (10.0.1.2) would be given.
    let first = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                mac: Some("0a:58:0a:00:01:02".into()),
                ..req("a")
            },
        )
        .unwrap();
    assert_eq!(first.ips, [ip("10.0.1.1")]);
    let next = s.allocate(&v4_pool(), req("b")).unwrap();
    assert_eq!(
        next.ips,
        [ip("10.0.1.3")],
        "10.0.1.2 would share a's MAC: the allocator moves on"
    );
    assert_eq!(
        crate::names::format_mac(next.effective_mac()),
        "0a:58:0a:00:01:03"
    );
}

#[test]
fn allocations_of_an_earlier_boot_are_gone_and_its_vm_reservations_stay() {
    let (_d, s) = store();
    let pod = s.allocate(&v4_pool(), req("pod")).unwrap();
    let vm = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                owner: Some("ns/vm".into()),
                ..req("vm")
            },
        )
        .unwrap();
    assert_eq!(s.list().unwrap().len(), 2);
    // The same file, as a later boot reads it.
    let path = s.dir().join(ALLOCATIONS_FILE);
    let mut file: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(file["boot_id"].as_str(), boot_id(), "the boot is recorded");
    file["boot_id"] = "an-earlier-boot".into();
    fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    assert_eq!(s.list().unwrap(), vec![]);
    let reserved = s.reservations().unwrap();
    assert_eq!(reserved.len(), 1);
    assert_eq!(reserved[0].ips, vm.ips);
    // The VM starting again gets its addresses back; the pod's address is free again but
    // round-robin continues after it.
    let again = s
        .allocate(
            &v4_pool(),
            AllocRequest {
                owner: Some("ns/vm".into()),
                ..req("vm2")
            },
        )
        .unwrap();
    assert_eq!(again.ips, vm.ips);
    let next = s.allocate(&v4_pool(), req("pod2")).unwrap();
    assert_ne!(next.ips, pod.ips);
}

/// Gives the file at `path` a modification time long before this boot began.
fn dated_before_this_boot(path: &Path) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
}

#[test]
fn a_file_torn_in_an_earlier_boot_reads_as_empty_and_one_torn_now_is_an_error() {
    let (_d, s) = store();
    let path = s.dir().join(ALLOCATIONS_FILE);
    fs::write(&path, b"{\"allocations\": [{\"ips\"").unwrap();
    assert!(matches!(s.list(), Err(IpamError::Corrupt { .. })));
    // Written before this boot began.
    dated_before_this_boot(&path);
    assert_eq!(s.list().unwrap(), vec![]);
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    assert_eq!(s.list().unwrap(), vec![a]);
}

fn vm_req(id: &str) -> AllocRequest {
    AllocRequest {
        owner: Some("ns/vm".into()),
        ..req(id)
    }
}

#[test]
fn the_reservations_have_their_own_file_which_a_pod_never_rewrites() {
    let (_d, s) = store();
    let vm = s.allocate(&v4_pool(), vm_req("vm")).unwrap();
    let reservations = s.dir().join(RESERVATIONS_FILE);
    let file: serde_json::Value =
        serde_json::from_slice(&fs::read(&reservations).unwrap()).unwrap();
    assert_eq!(file["version"], 1);
    assert_eq!(file["reservations"][0]["owner"], "ns/vm");
    let allocations: serde_json::Value =
        serde_json::from_slice(&fs::read(s.dir().join(ALLOCATIONS_FILE)).unwrap()).unwrap();
    assert!(allocations.get("reservations").is_none(), "{allocations}");
    // A pod's ADD and DEL leave the reservations' file as it was (same inode: not rewritten).
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let before = inode(&reservations);
    let pod = s.allocate(&v4_pool(), req("pod")).unwrap();
    s.release(&pod.attachment()).unwrap();
    assert_eq!(inode(&reservations), before);
    assert!(!s.dir().join(RESERVATIONS_TMP_FILE).exists());
    assert_eq!(s.reservations().unwrap()[0].ips, vm.ips);
}

#[test]
fn a_power_loss_that_tears_the_allocations_keeps_the_vm_reservations() {
    let (_d, s) = store();
    // The pod first: the VM's address is not the block's first, which an empty store hands
    // out first.
    s.allocate(&v4_pool(), req("pod")).unwrap();
    let vm = s.allocate(&v4_pool(), vm_req("vm")).unwrap();
    assert_ne!(vm.ips, vec![ip("10.0.1.1")]);
    // The allocations file as an unsynced write left it after a power loss in an earlier boot.
    let path = s.dir().join(ALLOCATIONS_FILE);
    fs::write(&path, b"").unwrap();
    dated_before_this_boot(&path);
    assert_eq!(s.list().unwrap(), vec![]);
    let again = s.allocate(&v4_pool(), vm_req("vm2")).unwrap();
    assert_eq!(again.ips, vm.ips, "the VM gets its reserved addresses back");
}

#[test]
fn reservations_in_the_allocations_file_of_an_older_version_move_to_their_own() {
    let (_d, s) = store();
    let older = br#"{"version":1,"last_v4":"10.0.1.2","allocations":[{"ips":["10.0.1.2"],"container_id":"vm","ifname":"eth0","owner":"ns/vm"}],"reservations":[{"owner":"ns/vm","ifname":"eth0","ips":["10.0.1.2"],"since":5}]}"#;
    fs::write(s.dir().join(ALLOCATIONS_FILE), older).unwrap();
    assert!(!s.dir().join(RESERVATIONS_FILE).exists());
    assert_eq!(s.reservations().unwrap()[0].ips, vec![ip("10.0.1.2")]);
    // The next change, a pod's, writes them to their own file before the allocations file
    // drops them.
    s.allocate(&v4_pool(), req("pod")).unwrap();
    let own: serde_json::Value =
        serde_json::from_slice(&fs::read(s.dir().join(RESERVATIONS_FILE)).unwrap()).unwrap();
    assert_eq!(own["reservations"][0]["ips"][0], "10.0.1.2");
    let allocations: serde_json::Value =
        serde_json::from_slice(&fs::read(s.dir().join(ALLOCATIONS_FILE)).unwrap()).unwrap();
    assert!(allocations.get("reservations").is_none(), "{allocations}");
    assert_eq!(s.reservations().unwrap().len(), 1);
    // Released, the VM's address stays reserved for it.
    s.release(&att("vm")).unwrap();
    let pod2 = s.allocate(&v4_pool(), req("pod2")).unwrap();
    assert_ne!(pod2.ips, vec![ip("10.0.1.2")]);
}

#[test]
fn a_corrupt_reservations_file_is_an_error_naming_it() {
    let (_d, s) = store();
    fs::write(s.dir().join(RESERVATIONS_FILE), b"{ not json").unwrap();
    let e = s.allocate(&v4_pool(), req("a")).unwrap_err();
    assert!(matches!(e, IpamError::Corrupt { .. }));
    assert!(e.to_string().contains("reservations.json"), "{e}");
    // Reading the allocations alone does not need it.
    assert_eq!(s.list().unwrap(), vec![]);
}

#[test]
fn another_writers_change_is_read_even_right_after_this_process_wrote() {
    let (d, s) = store();
    let a = s.allocate(&v4_pool(), req("a")).unwrap();
    // Another process (a CNI allocating without the agent) writes the store meanwhile: the
    // same attachment released, another allocated.
    let path = s.dir().join(ALLOCATIONS_FILE);
    let mut file: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    file["allocations"][0]["container_id"] = "b".into();
    fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let other = IpamStore::open(d.path(), "net").unwrap();
    for store in [&s, &other] {
        assert_eq!(store.get(&att("a")).unwrap(), None);
        assert_eq!(store.list().unwrap()[0].container_id, "b");
    }
    // The next allocation starts from the file, not from what this process wrote.
    let c = s.allocate(&v4_pool(), req("c")).unwrap();
    assert_ne!(c.ips, a.ips, "b holds a's address now");
    assert_eq!(s.list().unwrap().len(), 2);
    assert_eq!(s.release(&att("a")).unwrap(), None);
}

/// An allocation with every kind of field set, `n` making it distinct.
fn allocation(n: u8) -> Arc<Allocation> {
    Arc::new(Allocation {
        ips: vec![ip(&format!("10.0.0.{n}")), ip(&format!("fd00::{n:x}"))],
        container_id: format!("c\"{n}\\é"),
        ifname: "eth0".into(),
        mac: n
            .is_multiple_of(2)
            .then(|| format!("02:00:00:00:00:{n:02x}")),
        host_ifname: Some(format!("wv{n}")),
        pod_namespace: Some("ns".into()),
        pod_name: Some(format!("pod-{n}")),
        netns: Some(format!("/run/netns/p{n}")),
        created: 1_700_000_000 + u64::from(n),
        owner: n.is_multiple_of(3).then(|| format!("ns/vm{n}")),
        pending: n.is_multiple_of(5),
        port_mappings: if n.is_multiple_of(4) {
            vec![crate::proto::PortMapping {
                host_port: 20000 + u16::from(n),
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: None,
            }]
        } else {
            vec![]
        },
        ..Allocation::default()
    })
}

/// What `encode` made is what `serde_json` makes of the whole state, and each piece's range
/// encodes its allocation.
fn assert_encodes(state: &mut StoreFile, prev: Option<&Encoded>) -> Encoded {
    let e = encode(state, prev).unwrap();
    assert_eq!(
        String::from_utf8(e.bytes.clone()).unwrap(),
        String::from_utf8(serde_json::to_vec(&*state).unwrap()).unwrap()
    );
    assert_eq!(e.pieces.len(), state.allocations.len());
    for ((a, range), b) in e.pieces.iter().zip(&state.allocations) {
        assert!(Arc::ptr_eq(a, b));
        let parsed: Allocation = serde_json::from_slice(&e.bytes[range.clone()]).unwrap();
        assert_eq!(&parsed, &**b);
    }
    e
}

#[test]
fn the_store_is_encoded_as_serde_json_encodes_it_whatever_changed_since_the_last_encoding() {
    let mut state = StoreFile::default();
    let mut prev = assert_encodes(&mut state, None);
    state.version = 1;
    state.last_v4 = Some("10.0.0.7".parse().unwrap());
    state.boot_id = Some("b00t".into());
    state.allocations.extend((1..=5).map(allocation));
    prev = assert_encodes(&mut state, Some(&prev));
    // One added at the end, one removed in the middle, one changed.
    state.allocations.push(allocation(6));
    state.allocations.remove(2);
    Arc::make_mut(&mut state.allocations[0]).pending = true;
    state.last_v6 = Some("fd00::6".parse().unwrap());
    prev = assert_encodes(&mut state, Some(&prev));
    // More removed at once than the encoder looks ahead, then the first and the last.
    state
        .allocations
        .extend((7..=(7 + 2 * LOOKAHEAD as u8)).map(allocation));
    prev = assert_encodes(&mut state, Some(&prev));
    state.allocations.drain(3..3 + LOOKAHEAD + 5);
    prev = assert_encodes(&mut state, Some(&prev));
    state.allocations.remove(0);
    state.allocations.pop();
    state.boot_id = None;
    prev = assert_encodes(&mut state, Some(&prev));
    // Every allocation gone; then one again.
    state.allocations.clear();
    prev = assert_encodes(&mut state, Some(&prev));
    state.allocations.push(allocation(1));
    assert_encodes(&mut state, Some(&prev));
}

#[test]
fn an_allocation_behind_the_same_arc_is_copied_from_the_last_encoding_not_encoded_again() {
    let mut state = StoreFile {
        allocations: vec![allocation(1), allocation(2)],
        ..StoreFile::default()
    };
    let mut prev = encode(&mut state, None).unwrap();
    // Mark the first allocation's encoding: only a copy carries the mark along.
    let range = prev.pieces[0].1.clone();
    let at = range.start
        + prev.bytes[range]
            .windows(4)
            .position(|w| w == b"eth0")
            .unwrap();
    prev.bytes[at + 3] = b'9';
    // The second changes (a new Arc, as `Arc::make_mut` makes while the encoding holds one).
    Arc::make_mut(&mut state.allocations[1]).pending = true;
    let next = encode(&mut state, Some(&prev)).unwrap();
    let text = String::from_utf8(next.bytes).unwrap();
    assert_eq!(text.matches("eth9").count(), 1, "{text}");
    assert!(
        text.contains(r#""ifname":"eth0","mac":"02:00:00:00:00:02""#),
        "{text}"
    );
    assert!(text.contains(r#""pending":true"#), "{text}");
}

#[test]
fn every_write_of_a_store_holds_what_serde_json_makes_of_its_state() {
    let (_d, s) = store();
    let pool = dual_pool();
    let file = || fs::read(s.dir().join(ALLOCATIONS_FILE)).unwrap();
    let reencoded = |bytes: &[u8]| {
        let state: StoreFile = serde_json::from_slice(bytes).unwrap();
        serde_json::to_vec(&state).unwrap()
    };
    for i in 0..20 {
        s.allocate(&pool, req(&format!("c{i}"))).unwrap();
        let bytes = file();
        assert_eq!(bytes, reencoded(&bytes));
    }
    for i in (0..20).step_by(3) {
        s.release(&att(&format!("c{i}"))).unwrap();
        let bytes = file();
        assert_eq!(bytes, reencoded(&bytes));
    }
    s.update(&att("c1"), |a| a.pod_name = Some("renamed".into()))
        .unwrap()
        .unwrap();
    let bytes = file();
    assert_eq!(bytes, reencoded(&bytes));
    let keep: Vec<Attachment> = (0..20)
        .filter(|i| i % 2 == 1)
        .map(|i| att(&format!("c{i}")))
        .collect();
    s.gc(&keep).unwrap();
    let bytes = file();
    assert_eq!(bytes, reencoded(&bytes));
    let listed = s.list().unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|a| a.container_id.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c5", "c7", "c11", "c13", "c17", "c19"]
    );
    assert_eq!(listed[0].pod_name.as_deref(), Some("renamed"));
}

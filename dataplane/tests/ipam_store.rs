//! Properties and concurrency of the IPAM store through its public API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use weft_dataplane::ipam::{AllocRequest, Attachment, IpNet, IpamError, IpamStore, Pool};

fn att(id: u8) -> Attachment {
    Attachment {
        container_id: format!("c{id}"),
        ifname: "eth0".into(),
    }
}

/// A small dual-stack pool, so that exhaustion happens: 10.1.0.0/27 minus network address,
/// gateway, an excluded /30 and an excluded host; fd00::/123 minus its network address and an
/// excluded /126.
fn pool() -> Pool {
    Pool {
        block_v4: Some("10.1.0.0/27".parse().unwrap()),
        block_v6: Some("fd00::/123".parse().unwrap()),
        subnet_v4: Some("10.1.0.0/16".parse().unwrap()),
        subnet_v6: Some("fd00::/64".parse().unwrap()),
        gateways: vec!["10.1.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        exclude: vec![
            "10.1.0.8/30".parse().unwrap(),
            "10.1.0.20/32".parse().unwrap(),
            "fd00::4/126".parse().unwrap(),
        ],
    }
}

fn allowed(ip: &IpAddr, pool: &Pool) -> bool {
    let in_block = match ip {
        IpAddr::V4(a) => pool
            .block_v4
            .is_some_and(|b| b.contains(a) && *a != b.network()),
        IpAddr::V6(a) => pool
            .block_v6
            .is_some_and(|b| b.contains(a) && *a != b.network()),
    };
    in_block && !pool.gateways.contains(ip) && !pool.exclude.iter().any(|n: &IpNet| n.contains(ip))
}

#[derive(Debug, Clone)]
enum Op {
    Allocate(u8),
    AllocateStatic(u8, u8),
    Release(u8),
    Gc(BTreeSet<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40).prop_map(Op::Allocate),
        1 => (0u8..40, 0u8..32).prop_map(|(a, n)| Op::AllocateStatic(a, n)),
        2 => (0u8..40).prop_map(Op::Release),
        1 => proptest::collection::btree_set(0u8..40, 0..30).prop_map(Op::Gc),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Whatever the interleaving of allocate, release and GC: no address is ever held twice,
    /// every address is an allowed one of the block, and the store holds exactly the
    /// attachments a simple model says it should.
    #[test]
    fn interleavings_never_hand_out_an_address_twice(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), "prop").unwrap();
        let pool = pool();
        let mut model: BTreeMap<u8, Vec<IpAddr>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Allocate(a) | Op::AllocateStatic(a, _) => {
                    let static_ips = match op {
                        Op::AllocateStatic(_, n) => vec![format!("10.1.0.{n}").parse().unwrap()],
                        _ => vec![],
                    };
                    let res = store.allocate(&pool, AllocRequest {
                        attachment: att(a),
                        static_ips: static_ips.clone(),
                        ..AllocRequest::default()
                    });
                    match res {
                        Ok(alloc) => {
                            if let Some(before) = model.get(&a) {
                                prop_assert_eq!(before, &alloc.ips, "a retried allocate changed the addresses");
                            } else if let Some(s) = static_ips.first() {
                                prop_assert_eq!(alloc.ips.first(), Some(s));
                            }
                            prop_assert_eq!(alloc.ips.len(), 2);
                            model.insert(a, alloc.ips);
                        }
                        Err(IpamError::Exhausted { .. }) => prop_assert!(!model.contains_key(&a)),
                        Err(IpamError::StaticExcluded { .. } | IpamError::StaticInUse { .. }) => {
                            prop_assert!(!static_ips.is_empty() && !model.contains_key(&a));
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Release(a) => {
                    let gone = store.release(&att(a)).unwrap();
                    prop_assert_eq!(gone.map(|g| g.ips), model.remove(&a));
                }
                Op::Gc(valid) => {
                    let valid_atts: Vec<Attachment> = valid.iter().map(|a| att(*a)).collect();
                    let released = store.gc(&valid_atts).unwrap();
                    let expected: BTreeSet<u8> = model.keys().filter(|a| !valid.contains(a)).copied().collect();
                    prop_assert_eq!(released.len(), expected.len());
                    model.retain(|a, _| valid.contains(a));
                }
            }
            let all = store.list().unwrap();
            let mut seen = BTreeSet::new();
            for alloc in &all {
                for ip in &alloc.ips {
                    prop_assert!(seen.insert(*ip), "{} handed out twice", ip);
                    prop_assert!(allowed(ip, &pool), "{} is not an allowed address", ip);
                }
            }
            let held: BTreeMap<u8, Vec<IpAddr>> = all
                .iter()
                .map(|a| (a.container_id[1..].parse().unwrap(), a.ips.clone()))
                .collect();
            prop_assert_eq!(&held, &model);
        }
    }
}

#[test]
fn fifty_parallel_allocations_get_fifty_distinct_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = Arc::new(dir.path().to_path_buf());
    let pool = Pool {
        block_v4: Some("10.2.0.0/24".parse().unwrap()),
        block_v6: Some("fd02::/120".parse().unwrap()),
        gateways: vec!["10.2.0.1".parse().unwrap()],
        ..Pool::default()
    };
    let start = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let (state_dir, pool, start) = (state_dir.clone(), pool.clone(), start.clone());
            std::thread::spawn(move || {
                // Its own handle and its own lock descriptor, as separate CNI processes have.
                let store = IpamStore::open(&state_dir, "race").unwrap();
                start.wait();
                store
                    .allocate(
                        &pool,
                        AllocRequest {
                            attachment: Attachment {
                                container_id: format!("ctr-{i}"),
                                ifname: "eth0".into(),
                            },
                            ..AllocRequest::default()
                        },
                    )
                    .unwrap()
            })
        })
        .collect();
    let allocs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ips: BTreeSet<IpAddr> = allocs.iter().flat_map(|a| a.ips.clone()).collect();
    assert_eq!(
        ips.len(),
        100,
        "every thread got its own IPv4 and IPv6 address"
    );
    let store = IpamStore::open(&state_dir, "race").unwrap();
    let listed = store.list().unwrap();
    assert_eq!(
        listed.len(),
        50,
        "no allocation was lost to a concurrent write"
    );
    for a in &allocs {
        assert!(listed.contains(a));
    }
}

#[test]
fn parallel_allocate_and_release_keep_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = Arc::new(dir.path().to_path_buf());
    let pool = Pool {
        block_v4: Some("10.3.0.0/24".parse().unwrap()),
        ..Pool::default()
    };
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (state_dir, pool) = (state_dir.clone(), pool.clone());
            std::thread::spawn(move || {
                let store = IpamStore::open(&state_dir, "churn").unwrap();
                for round in 0..10 {
                    let attachment = Attachment {
                        container_id: format!("t{i}-r{round}"),
                        ifname: "eth0".into(),
                    };
                    store
                        .allocate(
                            &pool,
                            AllocRequest {
                                attachment: attachment.clone(),
                                ..AllocRequest::default()
                            },
                        )
                        .unwrap();
                    if round % 2 == 0 {
                        store.release(&attachment).unwrap().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let store = IpamStore::open(&state_dir, "churn").unwrap();
    let all = store.list().unwrap();
    assert_eq!(all.len(), 16 * 5);
    let ips: BTreeSet<IpAddr> = all.iter().flat_map(|a| a.ips.clone()).collect();
    assert_eq!(ips.len(), all.len());
}

//! Tier-3 tests of `weft_dataplane::nft` against the real `nft` binary and kernel.
//!
//! Every test runs on its own thread that first moves into a fresh network namespace
//! (`unshare(CLONE_NEWNET)`); the `nft` processes it spawns inherit that namespace, so the host's
//! tables are never touched. The tests need root (CAP_SYS_ADMIN for unshare, CAP_NET_ADMIN for
//! nft) and fail, never skip, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use nix::sched::{CloneFlags, unshare};
use std::collections::{BTreeMap, BTreeSet};
use weft_dataplane::nft::{
    BaseChain, Chain, Change, Family, Firewall, Map, NftCli, NftError, Set, SetKey, Table,
    Transaction, diff, structure_hash,
};

/// Runs `f` on a new thread inside a new, empty network namespace.
fn in_netns<F: FnOnce() + Send + 'static>(f: F) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged nft test: run as root (it needs CAP_SYS_ADMIN to unshare a network namespace and CAP_NET_ADMIN for nft), e.g. sudo or `unshare -rn`"
    );
    let handle = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| {
            panic!("privileged nft test: unshare(CLONE_NEWNET) failed ({e}); it needs root/CAP_SYS_ADMIN")
        });
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn pairs(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn set(name: &str, key_type: &str, interval: bool, elements: &[&str]) -> Set {
    Set {
        name: name.into(),
        key_type: key_type.into(),
        flags: if interval {
            vec!["interval".into()]
        } else {
            vec![]
        },
        elements: strings(elements),
    }
}

fn map(name: &str, key: &str, value: &str, interval: bool, elements: &[(&str, &str)]) -> Map {
    Map {
        name: name.into(),
        key_type: key.into(),
        value_type: value.into(),
        flags: if interval {
            vec!["interval".into()]
        } else {
            vec![]
        },
        elements: pairs(elements),
    }
}

fn base(name: &str, kind: &str, hook: &str, priority: &str, rules: &[&str]) -> Chain {
    Chain {
        name: name.into(),
        base: Some(BaseChain {
            kind: kind.into(),
            hook: hook.into(),
            priority: priority.into(),
            policy: Some("accept".into()),
        }),
        rules: rules.iter().map(|r| r.to_string()).collect(),
    }
}

/// The same kind of table the agent builds: NAT by sets, DNAT by an interval + concatenation
/// map, isolation by a verdict map.
fn nat_table() -> Table {
    Table {
        family: Family::Inet,
        name: "weft".into(),
        comment: Some("weft test".into()),
        sets: vec![
            set("bridges", "ifname", false, &["\"wn-blue\"", "\"wn-red\""]),
            set(
                "intra",
                "ifname . ifname",
                false,
                &["\"wn-blue\" . \"wn-blue\""],
            ),
            set("nat4", "ipv4_addr", true, &["10.10.0.0/16", "10.20.0.0/16"]),
            set("nat6", "ipv6_addr", true, &["fd00:10::/64"]),
            set("ports", "inet_service", true, &["80", "8000-8010"]),
        ],
        maps: vec![
            map(
                "fwd4",
                "ipv4_addr . inet_proto . inet_service",
                "ipv4_addr . inet_service",
                true,
                &[
                    ("10.0.0.0/8 . tcp . 8080-8090", "10.10.0.5 . 80"),
                    ("0.0.0.0/0 . udp . 53", "10.10.0.6 . 5353"),
                    ("192.168.1.7 . tcp . 22", "10.20.0.7 . 2222"),
                ],
            ),
            map(
                "fwdr4",
                "ipv4_addr . inet_proto . inet_service",
                "ipv4_addr",
                true,
                &[("172.16.0.0/12 . sctp . 9000-9100", "10.10.0.8")],
            ),
            map(
                "fwd6",
                "ipv6_addr . inet_proto . inet_service",
                "ipv6_addr . inet_service",
                true,
                &[("::/0 . tcp . 443", "fd00:10::5 . 8443")],
            ),
            map(
                "verdicts",
                "ipv4_addr . ipv4_addr",
                "verdict",
                false,
                &[
                    ("10.10.0.5 . 10.20.0.7", "accept"),
                    ("10.10.0.6 . 10.20.0.7", "drop"),
                    ("10.10.0.7 . 10.20.0.7", "jump isolate"),
                    ("10.10.0.8 . 10.20.0.7", "goto isolate"),
                ],
            ),
        ],
        chains: vec![
            Chain {
                name: "isolate".into(),
                base: None,
                rules: vec!["counter drop".into()],
            },
            base(
                "prerouting",
                "nat",
                "prerouting",
                "dstnat",
                &[
                    "meta l4proto { tcp, udp, sctp } fib daddr type local dnat ip addr . port to ip saddr . meta l4proto . th dport map @fwd4",
                    "meta l4proto { tcp, udp, sctp } fib daddr type local dnat ip to ip saddr . meta l4proto . th dport map @fwdr4",
                    "meta l4proto { tcp, udp, sctp } fib daddr type local dnat ip6 addr . port to ip6 saddr . meta l4proto . th dport map @fwd6",
                ],
            ),
            base(
                "postrouting",
                "nat",
                "postrouting",
                "srcnat",
                &[
                    "ip saddr @nat4 oifname != @bridges masquerade",
                    "ip6 saddr @nat6 oifname != @bridges masquerade",
                ],
            ),
            base(
                "forward",
                "filter",
                "forward",
                "filter",
                &[
                    "ct state established,related accept",
                    "iifname . oifname @intra accept",
                    "ip saddr . ip daddr vmap @verdicts",
                ],
            ),
        ],
    }
}

fn replace(t: &Table) -> Transaction {
    Transaction(vec![Change::ReplaceTable(t.clone())])
}

#[test]
fn replacing_twice_gives_the_same_listing() {
    in_netns(|| {
        let mut nft = NftCli::default();
        assert_eq!(nft.list_table_text(Family::Inet, "weft").unwrap(), None);
        nft.apply(&replace(&nat_table())).unwrap();
        let first = nft.list_table_text(Family::Inet, "weft").unwrap().unwrap();
        nft.apply(&replace(&nat_table())).unwrap();
        let second = nft.list_table_text(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(first, second);
        assert!(first.contains("comment \"weft test\""), "{first}");
    });
}

#[test]
fn listing_round_trips_every_element_in_renderer_text() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let desired = nat_table();
        nft.apply(&replace(&desired)).unwrap();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.comment.as_deref(), Some("weft test"));
        for s in &desired.sets {
            assert_eq!(state.elements_of(&s.name), s.elements, "set {}", s.name);
            let got = state.set(&s.name).unwrap();
            assert_eq!((&got.key_type, &got.flags), (&s.key_type, &s.flags));
        }
        for m in &desired.maps {
            assert_eq!(state.map_elements_of(&m.name), m.elements, "map {}", m.name);
            assert_eq!(state.map(&m.name).unwrap().value_type, m.value_type);
        }
        for c in &desired.chains {
            assert_eq!(
                state.rule_count(&c.name),
                Some(c.rules.len()),
                "chain {}",
                c.name
            );
        }
        let current = state.to_table(&desired);
        assert_eq!(structure_hash(&current), structure_hash(&desired));
        assert_eq!(current, desired);
        assert!(diff(&current, &desired).is_empty());
    });
}

#[test]
fn a_verdict_map_on_an_address_pair_round_trips() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let t = Table {
            family: Family::Ip,
            name: "weftvm".into(),
            comment: None,
            sets: vec![],
            maps: vec![map(
                "verdicts",
                "ipv4_addr . ipv4_addr",
                "verdict",
                false,
                &[
                    ("10.0.0.1 . 10.0.0.2", "accept"),
                    ("10.0.0.1 . 10.0.0.3", "drop"),
                    ("10.0.0.1 . 10.0.0.4", "jump policy_a"),
                    ("10.0.0.1 . 10.0.0.5", "goto policy_a"),
                    ("10.0.0.1 . 10.0.0.6", "return"),
                ],
            )],
            chains: vec![
                Chain {
                    name: "policy_a".into(),
                    base: None,
                    rules: vec!["tcp dport 80 accept".into(), "drop".into()],
                },
                base(
                    "forward",
                    "filter",
                    "forward",
                    "filter - 5",
                    &["ip saddr . ip daddr vmap @verdicts"],
                ),
            ],
        };
        nft.apply(&replace(&t)).unwrap();
        let state = nft.list_table(Family::Ip, "weftvm").unwrap().unwrap();
        assert_eq!(state.comment, None);
        assert_eq!(state.map_elements_of("verdicts"), t.maps[0].elements);
        let fwd = state.chain("forward").unwrap().base.clone().unwrap();
        assert_eq!(fwd.priority, -5);
        assert!(diff(&state.to_table(&t), &t).is_empty());
    });
}

#[test]
fn element_changes_go_through_diff_without_a_replace() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let before = nat_table();
        nft.apply(&replace(&before)).unwrap();
        let mut after = nat_table();
        after.sets[0].elements.insert("\"wn-green\"".into());
        after.sets[2].elements.remove("10.20.0.0/16");
        after.sets[2].elements.insert("10.30.0.0/16".into());
        let fwd4 = &mut after.maps[0].elements;
        fwd4.remove("0.0.0.0/0 . udp . 53");
        fwd4.insert(
            "0.0.0.0/0 . udp . 5300-5310".into(),
            "10.10.0.9 . 53".into(),
        );
        fwd4.insert(
            "10.0.0.0/8 . tcp . 8080-8090".into(),
            "10.10.0.50 . 80".into(),
        );
        after.maps[3]
            .elements
            .insert("10.10.0.5 . 10.20.0.7".into(), "jump isolate".into());

        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        let tx = diff(&state.to_table(&after), &after);
        assert!(
            tx.0.iter().all(|c| !matches!(c, Change::ReplaceTable(_))),
            "{tx:?}"
        );
        nft.apply(&tx).unwrap();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.elements_of("bridges"), after.sets[0].elements);
        assert_eq!(state.elements_of("nat4"), after.sets[2].elements);
        assert_eq!(state.map_elements_of("fwd4"), after.maps[0].elements);
        assert_eq!(state.map_elements_of("verdicts"), after.maps[3].elements);
        assert!(diff(&state.to_table(&after), &after).is_empty());

        // And back, deletes included.
        let tx = diff(&state.to_table(&before), &before);
        nft.apply(&tx).unwrap();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.to_table(&before), before);
    });
}

#[test]
fn a_changed_rule_replaces_the_table_in_one_batch() {
    in_netns(|| {
        let mut nft = NftCli::default();
        nft.apply(&replace(&nat_table())).unwrap();
        let mut desired = nat_table();
        desired.chains[3].rules.pop();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        let tx = diff(&state.to_table(&desired), &desired);
        assert!(matches!(tx.0.as_slice(), [Change::ReplaceTable(_)]));
        nft.apply(&tx).unwrap();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.rule_count("forward"), Some(2));
    });
}

#[test]
fn a_failing_batch_commits_nothing() {
    in_netns(|| {
        let mut nft = NftCli::default();
        // A syntax error in the last command: the new table must not appear.
        let mut tx = replace(&nat_table());
        tx.0.push(Change::AddElements {
            family: Family::Inet,
            table: "weft".into(),
            set: "nat4".into(),
            key: SetKey {
                key_type: "ipv4_addr".into(),
                interval: true,
            },
            elements: vec!["10.99.0.0/16 } garbage {".into()],
        });
        let err = nft.apply(&tx).unwrap_err();
        match &err {
            NftError::Apply { stderr, line } => {
                assert!(stderr.contains("syntax error"), "{stderr}");
                assert!(
                    line.as_deref().is_some_and(|l| l.contains("garbage")),
                    "{line:?}"
                );
            }
            other => panic!("expected Apply, got {other:?}"),
        }
        assert!(err.to_string().contains("nothing was applied"));
        assert!(nft.list_table(Family::Inet, "weft").unwrap().is_none());

        // A kernel-side failure later in the batch (deleting a missing element) also rolls
        // back the earlier element add.
        nft.apply(&replace(&nat_table())).unwrap();
        let tx = Transaction(vec![
            Change::AddElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "bridges".into(),
                key: SetKey {
                    key_type: "ifname".into(),
                    interval: false,
                },
                elements: vec!["\"wn-new\"".into()],
            },
            Change::DeleteElements {
                family: Family::Inet,
                table: "weft".into(),
                set: "nat4".into(),
                key: SetKey {
                    key_type: "ipv4_addr".into(),
                    interval: true,
                },
                elements: vec!["10.99.0.0/16".into()],
            },
        ]);
        match nft.apply(&tx) {
            Err(NftError::Apply { line, .. }) => {
                assert!(
                    line.as_deref().is_some_and(|l| l.contains("10.99.0.0/16")),
                    "{line:?}"
                );
            }
            other => panic!("expected Apply, got {other:?}"),
        }
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.elements_of("bridges"), nat_table().sets[0].elements);
    });
}

#[test]
fn deleting_an_absent_table_is_fine() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let delete = Transaction(vec![Change::DeleteTable {
            family: Family::Inet,
            name: "weft".into(),
        }]);
        nft.apply(&delete).unwrap();
        nft.apply(&replace(&nat_table())).unwrap();
        assert!(nft.list_table(Family::Inet, "weft").unwrap().is_some());
        nft.apply(&delete).unwrap();
        assert!(nft.list_table(Family::Inet, "weft").unwrap().is_none());
        nft.apply(&delete).unwrap();
        assert_eq!(nft.list_table_text(Family::Inet, "weft").unwrap(), None);
    });
}

#[test]
fn the_structure_hash_comment_is_read_back() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let mut t = nat_table();
        t.comment = None;
        let hash = structure_hash(&t);
        t.comment = Some(format!("weft structure {hash}"));
        nft.apply(&replace(&t)).unwrap();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.comment, t.comment);
    });
}

#[test]
fn a_bridge_family_table_applies_and_lists() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let t = Table {
            family: Family::Bridge,
            name: "weft".into(),
            comment: None,
            sets: vec![set(
                "ports",
                "ifname . ether_addr . ipv4_addr",
                false,
                &["\"wf0123\" . 02:00:00:00:00:01 . 10.0.0.2"],
            )],
            maps: vec![],
            chains: vec![base(
                "forward",
                "filter",
                "forward",
                "filter",
                &["ether type ip iifname . ether saddr . ip saddr != @ports drop"],
            )],
        };
        nft.apply(&replace(&t)).unwrap();
        let state = nft.list_table(Family::Bridge, "weft").unwrap().unwrap();
        assert_eq!(state.elements_of("ports"), t.sets[0].elements);
        assert!(diff(&state.to_table(&t), &t).is_empty());
        // The inet table of the same name is another table.
        assert!(nft.list_table(Family::Inet, "weft").unwrap().is_none());
    });
}

/// A table with a plain set of every key type a registration touches.
fn element_table(family: Family) -> Table {
    Table {
        family,
        name: "weftel".into(),
        comment: None,
        sets: vec![
            set("ports", "ifname", false, &["\"wf0\""]),
            set("macs", "ifname . ether_addr", false, &[]),
            set("ips4", "ifname . ipv4_addr", false, &[]),
            set("ips6", "ifname . ipv6_addr", false, &[]),
            set("g4", "ipv4_addr", false, &["10.0.0.1"]),
            set("g6", "ipv6_addr", false, &[]),
            set("lladdr", "ether_addr", false, &[]),
            set("svc", "ipv4_addr . inet_proto . inet_service", false, &[]),
            set("targets6", "typeof iifname . @th,64,128", false, &[]),
            set("lladdrs", "typeof iifname . @th,208,48", false, &[]),
            set("ids", "classid", false, &["0:5"]),
        ],
        maps: vec![map("port_ids", "ifname", "classid", false, &[])],
        chains: vec![],
    }
}

#[test]
fn element_changes_go_over_netlink_and_list_as_nft_wrote_them() {
    in_netns(|| {
        let mut nft = NftCli::default();
        // No nft binary at all: only the netlink path can apply element changes.
        let mut netlink_only = NftCli::new("/nonexistent/nft");
        for family in [Family::Inet, Family::Bridge] {
            let before = element_table(family);
            nft.apply(&replace(&before)).unwrap();
            let mut after = before.clone();
            let add = |t: &mut Table, set: usize, items: &[&str]| {
                t.sets[set]
                    .elements
                    .extend(items.iter().map(|s| s.to_string()));
            };
            add(&mut after, 0, &["\"wf1\"", "\"eth1.10\""]);
            add(&mut after, 1, &["\"wf1\" . 0a:58:0a:4d:00:02"]);
            add(
                &mut after,
                2,
                &["\"wf1\" . 10.77.0.2", "\"eth1.10\" . 192.168.1.9"],
            );
            add(
                &mut after,
                3,
                &["\"wf1\" . fd77::2", "\"wf1\" . fe80::858:aff:fe4d:2"],
            );
            add(&mut after, 4, &["10.77.0.2", "10.77.0.3"]);
            add(&mut after, 5, &["fd77::2"]);
            add(&mut after, 6, &["0a:58:0a:4d:00:02"]);
            add(
                &mut after,
                7,
                &["10.77.0.2 . tcp . 8080", "10.77.0.2 . udp . 53"],
            );
            add(
                &mut after,
                8,
                &["\"wf1\" . 0xfd770000000000000000000000000002"],
            );
            add(&mut after, 9, &["\"wf1\" . 0x0a580a4d0002"]);
            // Packet priorities (`meta priority`), as the bridge tags a port's copies.
            add(&mut after, 10, &["1a2b:3c4d", "7fff:ffff"]);
            after.maps[0].elements.extend([
                ("\"wf1\"".to_string(), "1a2b:3c4d".to_string()),
                ("\"eth1.10\"".to_string(), "0:7".to_string()),
            ]);
            after.sets[4].elements.remove("10.0.0.1");
            let tx = diff(&before, &after);
            netlink_only
                .apply(&tx)
                .unwrap_or_else(|e| panic!("{family}: {e:?}"));
            let state = nft.list_table(family, "weftel").unwrap().unwrap();
            for s in after
                .sets
                .iter()
                .filter(|s| !s.key_type.starts_with("typeof"))
            {
                assert_eq!(
                    state.elements_of(&s.name),
                    s.elements,
                    "{family} set {} as listed by nft",
                    s.name
                );
            }
            assert_eq!(
                state.map_elements_of("port_ids"),
                after.maps[0].elements,
                "{family} map port_ids as listed by nft"
            );
            // nft lists raw payload integers in its own spelling; they compare by value.
            assert_eq!(state.elements_of("targets6").len(), 1, "{family}");
            assert_eq!(state.elements_of("lladdrs").len(), 1);
            assert!(diff(&state.to_table(&after), &after).is_empty());
            // Adding what exists is not an error, as with nft.
            let readd = Transaction(
                tx.0.iter()
                    .filter(|c| matches!(c, Change::AddElements { .. }))
                    .cloned()
                    .collect(),
            );
            netlink_only.apply(&readd).unwrap();
            // And back.
            netlink_only.apply(&diff(&after, &before)).unwrap();
            let state = nft.list_table(family, "weftel").unwrap().unwrap();
            assert_eq!(state.to_table(&before), before, "{family}");
        }
    });
}

#[test]
fn additions_alone_are_applied_at_once_and_any_other_transaction_is_left_undone() {
    in_netns(|| {
        let mut nft = NftCli::default();
        // No nft binary: what `apply_additions` takes goes over netlink.
        let mut netlink_only = NftCli::new("/nonexistent/nft");
        let before = element_table(Family::Inet);
        nft.apply(&replace(&before)).unwrap();
        let mut added = before.clone();
        added.sets[4].elements.insert("10.77.0.2".into());
        added.sets[0].elements.insert("\"wf1\"".into());
        let tx = diff(&before, &added);
        assert!(!tx.is_empty());
        netlink_only.apply_additions(&tx).unwrap().unwrap();
        let state = nft.list_table(Family::Inet, "weftel").unwrap().unwrap();
        assert_eq!(state.to_table(&added), added);
        // A removal (its commit waits for a grace period), a mix, a rule: not applied.
        let mut removed = added.clone();
        removed.sets[4].elements.remove("10.0.0.1");
        let mut mixed = removed.clone();
        mixed.sets[5].elements.insert("fd77::2".into());
        for (what, after) in [("removal", &removed), ("mix", &mixed)] {
            let tx = diff(&added, after);
            assert!(netlink_only.apply_additions(&tx).is_none(), "{what}");
        }
        let mut ruled = added.clone();
        ruled
            .chains
            .push(base("in", "filter", "input", "0", &["accept"]));
        assert!(
            netlink_only
                .apply_additions(&diff(&added, &ruled))
                .is_none()
        );
        assert!(netlink_only.apply_additions(&Transaction(vec![])).is_none());
        let state = nft.list_table(Family::Inet, "weftel").unwrap().unwrap();
        assert_eq!(state.to_table(&added), added, "nothing else applied");
    });
}

#[test]
fn a_refused_netlink_batch_commits_nothing() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let t = element_table(Family::Inet);
        nft.apply(&replace(&t)).unwrap();
        let key = |key_type: &str| SetKey {
            key_type: key_type.into(),
            interval: false,
        };
        let add_port = |port: &str| Change::AddElements {
            family: Family::Inet,
            table: "weftel".into(),
            set: "ports".into(),
            key: key("ifname"),
            elements: vec![format!("\"{port}\"")],
        };
        // An address the set does not hold: ENOENT.
        let delete_absent = || Change::DeleteElements {
            family: Family::Inet,
            table: "weftel".into(),
            set: "g4".into(),
            key: key("ipv4_addr"),
            elements: vec!["10.99.0.9".into()],
        };
        let tx = Transaction(vec![add_port("wf9"), delete_absent()]);
        let err = NftCli::new("/nonexistent/nft").apply(&tx).unwrap_err();
        match &err {
            NftError::Kernel { what, source } => {
                assert!(
                    what.contains("deleted 1 element from set inet weftel g4"),
                    "{what}"
                );
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source}");
            }
            other => panic!("expected Kernel, got {other:?}"),
        }
        assert!(err.to_string().contains("nothing was applied"), "{err}");
        let state = nft.list_table(Family::Inet, "weftel").unwrap().unwrap();
        assert_eq!(
            state.elements_of("ports"),
            t.sets[0].elements,
            "the add was rolled back"
        );
        // A set that does not exist.
        let missing = Transaction(vec![Change::AddElements {
            family: Family::Inet,
            table: "weftel".into(),
            set: "nosuchset".into(),
            key: key("ifname"),
            elements: vec!["\"wf9\"".into()],
        }]);
        assert!(matches!(
            NftCli::default().apply(&missing),
            Err(NftError::Kernel { .. })
        ));
        // Only the batch's last message is acknowledged: a message before it that fails is
        // still the error, and nothing of the batch is applied.
        let first_fails = Transaction(vec![delete_absent(), add_port("wf8")]);
        match NftCli::new("/nonexistent/nft").apply(&first_fails) {
            Err(NftError::Kernel { what, source }) => {
                assert!(what.contains("from set inet weftel g4"), "{what}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source}");
            }
            other => panic!("expected Kernel, got {other:?}"),
        }
        let state = nft.list_table(Family::Inet, "weftel").unwrap().unwrap();
        assert_eq!(state.elements_of("ports"), t.sets[0].elements);
    });
}

#[test]
fn the_largest_netlink_batch_applies() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let before = element_table(Family::Inet);
        nft.apply(&replace(&before)).unwrap();
        let mut after = before.clone();
        // 2,000 ports with a MAC each and 2,000 addresses: several messages per set.
        for i in 0..2000u32 {
            let [_, _, hi, lo] = i.to_be_bytes();
            after.sets[1]
                .elements
                .insert(format!("\"wf{i}\" . 0a:58:00:00:{hi:02x}:{lo:02x}"));
            after.sets[4]
                .elements
                .insert(std::net::Ipv4Addr::from(0x0a01_0000 + i).to_string());
        }
        NftCli::new("/nonexistent/nft")
            .apply(&diff(&before, &after))
            .unwrap();
        let state = nft.list_table(Family::Inet, "weftel").unwrap().unwrap();
        assert_eq!(state.elements_of("macs"), after.sets[1].elements);
        assert_eq!(state.elements_of("g4"), after.sets[4].elements);
    });
}

#[test]
fn a_typeof_set_of_raw_payload_round_trips_and_changes_by_element() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let with = |elements: &[&str]| Table {
            family: Family::Bridge,
            name: "weft".into(),
            comment: None,
            sets: vec![set(
                "targets6",
                "typeof iifname . @th,64,128",
                false,
                elements,
            )],
            maps: vec![],
            chains: vec![base(
                "prerouting",
                "filter",
                "prerouting",
                "filter",
                &["icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @targets6 drop"],
            )],
        };
        let before = with(&[
            "\"wfa\" . 0xfd770000000000000000000000000002",
            "\"wfa\" . 0xfe8000000000000008580afffe4d0002",
            "\"wfb\" . 0x00000000000000000000000000000001",
        ]);
        nft.apply(&replace(&before)).unwrap();
        let text = nft
            .list_table_text(Family::Bridge, "weft")
            .unwrap()
            .unwrap();
        assert!(
            text.contains("typeof iifname . @th,64,128"),
            "nft must keep the typeof key:\n{text}"
        );
        let state = nft.list_table(Family::Bridge, "weft").unwrap().unwrap();
        assert_eq!(state.set("targets6").unwrap().key_type, "ifname . integer");
        assert!(diff(&state.to_table(&before), &before).is_empty());

        let after = with(&[
            "\"wfa\" . 0xfd770000000000000000000000000002",
            "\"wfc\" . 0xfd770000000000000000000000000004",
        ]);
        let tx = diff(&state.to_table(&after), &after);
        assert!(
            tx.0.iter().all(|c| !matches!(c, Change::ReplaceTable(_))),
            "{tx:?}"
        );
        nft.apply(&tx).unwrap();
        let state = nft.list_table(Family::Bridge, "weft").unwrap().unwrap();
        assert_eq!(state.elements_of("targets6").len(), 2);
        assert!(diff(&state.to_table(&after), &after).is_empty());
        assert_eq!(
            structure_hash(&state.to_table(&after)),
            structure_hash(&after)
        );
    });
}

#[test]
fn the_table_comment_is_read_over_netlink_without_listing_elements() {
    in_netns(|| {
        let mut fw = NftCli::default();
        assert_eq!(fw.table_comment(Family::Inet, "weft").unwrap(), None);
        let mut t = nat_table();
        t.comment = Some("weft structure 0123abcd".into());
        fw.apply(&replace(&t)).unwrap();
        assert_eq!(
            fw.table_comment(Family::Inet, "weft").unwrap(),
            Some(Some("weft structure 0123abcd".into()))
        );
        // As nft itself lists it.
        assert_eq!(
            fw.list_table(Family::Inet, "weft")
                .unwrap()
                .unwrap()
                .comment,
            Some("weft structure 0123abcd".into())
        );
        // A table without a comment, in another family.
        let mut bare = nat_table();
        bare.family = Family::Bridge;
        bare.comment = None;
        bare.chains.clear();
        bare.maps.clear();
        fw.apply(&replace(&bare)).unwrap();
        assert_eq!(
            fw.table_comment(Family::Bridge, "weft").unwrap(),
            Some(None)
        );
        assert_eq!(fw.table_comment(Family::Inet, "other").unwrap(), None);
    });
}

#[test]
fn host_port_map_elements_of_address_ranges_go_over_netlink_and_list_as_nft_wrote_them() {
    in_netns(|| {
        let mut nft = NftCli::default();
        let mut netlink_only = NftCli::new("/nonexistent/nft");
        let before = Table {
            family: Family::Inet,
            name: "weftmap".into(),
            comment: None,
            sets: vec![],
            maps: vec![
                map(
                    "hport4",
                    "ipv4_addr . inet_proto . inet_service",
                    "ipv4_addr . inet_service",
                    true,
                    &[("10.9.0.1 . tcp . 22", "10.77.0.9 . 22")],
                ),
                map(
                    "hport6",
                    "ipv6_addr . inet_proto . inet_service",
                    "ipv6_addr . inet_service",
                    true,
                    &[],
                ),
                map(
                    "exact4",
                    "ipv4_addr . inet_proto . inet_service",
                    "ipv4_addr . inet_service",
                    false,
                    &[],
                ),
            ],
            chains: vec![],
        };
        nft.apply(&replace(&before)).unwrap();
        let mut after = before.clone();
        after.maps[0].elements = pairs(&[
            ("0.0.0.0/0 . tcp . 8080", "10.77.0.2 . 80"),
            ("192.168.1.10 . udp . 53", "10.77.0.3 . 5353"),
            ("10.0.0.0/8 . tcp . 9000-9010", "10.77.0.4 . 9000"),
        ]);
        after.maps[1].elements = pairs(&[
            ("::/0 . tcp . 8080", "fd77::2 . 80"),
            ("fd00::1 . tcp . 443", "fd77::3 . 8443"),
        ]);
        after.maps[2].elements = pairs(&[("10.9.0.2 . tcp . 80", "10.77.0.5 . 8080")]);
        let tx = diff(&before, &after);
        assert!(
            tx.0.iter()
                .any(|c| matches!(c, Change::DeleteMapElements { .. })),
            "the old element goes: {tx:?}"
        );
        netlink_only.apply(&tx).unwrap_or_else(|e| panic!("{e:?}"));
        let state = nft.list_table(Family::Inet, "weftmap").unwrap().unwrap();
        assert_eq!(state.map_elements_of("hport4").len(), 3);
        assert_eq!(state.map_elements_of("hport6").len(), 2);
        assert_eq!(
            state.map_elements_of("exact4").get("10.9.0.2 . tcp . 80"),
            Some(&"10.77.0.5 . 8080".to_string())
        );
        assert!(
            diff(&state.to_table(&after), &after).is_empty(),
            "listed by nft: {:?}",
            state.to_table(&after).maps
        );
        // And back.
        netlink_only.apply(&diff(&after, &before)).unwrap();
        let state = nft.list_table(Family::Inet, "weftmap").unwrap().unwrap();
        assert_eq!(state.to_table(&before), before);
    });
}

/// A table whose rule bans the source of every TCP SYN to port 22 for ten minutes, and whose
/// `extra` sets stand for the rest of a structure that changes.
fn ban_table(extra: &[&str]) -> Table {
    let mut sets = vec![Set {
        name: "bans4".into(),
        key_type: "ipv4_addr . inet_proto . inet_service".into(),
        flags: vec![weft_dataplane::nft::DYNAMIC_FLAG.into(), "timeout".into()],
        elements: BTreeSet::new(),
    }];
    sets.extend(
        extra
            .iter()
            .map(|n| set(n, "ipv4_addr", false, &["192.0.2.1"])),
    );
    Table {
        family: Family::Inet,
        name: "weft".into(),
        comment: None,
        sets,
        maps: vec![],
        chains: vec![base(
            "input",
            "filter",
            "input",
            "0",
            &["tcp dport 22 add @bans4 { ip saddr . meta l4proto . th dport timeout 600s }"],
        )],
    }
}

fn nft_cmd(args: &str) {
    let out = std::process::Command::new("nft")
        .arg(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "nft {args}: {out:?}");
}

fn apply_firewall(nft: &mut NftCli, t: &Table) -> Vec<String> {
    let mut report = weft_dataplane::links::ApplyReport::default();
    weft_dataplane::plan::apply_firewall(t, nft, &mut report).unwrap();
    report.changes
}

fn ban_left(nft: &mut NftCli) -> u64 {
    let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
    let bans = &state.set("bans4").unwrap().expiring;
    let (timeout, left) = bans
        .get("198.51.100.7 . tcp . 22")
        .copied()
        .unwrap_or_else(|| panic!("the ban is gone: {state:?}"));
    assert_eq!(timeout, 600);
    left
}

#[test]
fn bans_survive_a_replace_of_the_table_with_the_time_they_had_left() {
    in_netns(|| {
        let mut nft = NftCli::default();
        // A table of weft's name that is not weft's (no comment): replaced whole.
        nft.apply(&replace(&ban_table(&[]))).unwrap();
        // What the rule would add for a source: the kernel's element, not weft's.
        nft_cmd(
            "add element inet weft bans4 { 198.51.100.7 . tcp . 22 timeout 600s expires 300s }",
        );
        let changes = apply_firewall(&mut nft, &ban_table(&["more"]));
        assert!(
            changes.iter().any(|c| c.starts_with("replaced")),
            "{changes:?}"
        );
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert!(state.set("more").is_some(), "the new structure is in");
        let left = ban_left(&mut nft);
        assert!((290..=300).contains(&left), "{left} s left");
        // weft's table now: another structure changes it in place, the ban untouched.
        let changes = apply_firewall(&mut nft, &ban_table(&["more", "again"]));
        assert!(
            !changes.iter().any(|c| c.starts_with("replaced")),
            "{changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("added set inet weft again"))
        );
        let left = ban_left(&mut nft);
        assert!((280..=300).contains(&left), "{left} s left");
    });
}

/// A table with a meter (`update @meter4 { … limit … }`), a concurrent-connection count
/// (`add @conns4 { … ct count … }`) and a ban (`add @bans4 { … timeout … }`), all three fed by
/// UDP packets to port 9999 in an output chain, and a chain `other` with `rule`; `extra` adds
/// a set and a chain that uses it.
fn dynamic_table(rule: &str, extra: bool) -> Table {
    let dynamic = |name: &str, key: &str, timeout: bool| Set {
        name: name.into(),
        key_type: key.into(),
        flags: if timeout {
            vec![weft_dataplane::nft::DYNAMIC_FLAG.into(), "timeout".into()]
        } else {
            vec![weft_dataplane::nft::DYNAMIC_FLAG.into()]
        },
        elements: BTreeSet::new(),
    };
    let mut t = Table {
        family: Family::Inet,
        name: "weft".into(),
        comment: None,
        sets: vec![
            dynamic("meter4", "ipv4_addr", false),
            dynamic("conns4", "ipv4_addr", false),
            dynamic("bans4", "ipv4_addr . inet_proto . inet_service", true),
        ],
        maps: vec![],
        chains: vec![
            base(
                "output",
                "filter",
                "output",
                "0",
                &[
                    "udp dport 9999 update @meter4 { ip daddr limit rate over 1000/second } counter",
                    "udp dport 9999 add @conns4 { ip daddr ct count over 100 } counter",
                    "udp dport 9999 add @bans4 { ip daddr . meta l4proto . th dport timeout 600s }",
                ],
            ),
            base("other", "filter", "input", "10", &[rule]),
        ],
    };
    if extra {
        t.sets
            .push(set("blocked", "ipv4_addr", true, &["192.0.2.0/24"]));
        t.chains.push(Chain {
            name: "blocking".into(),
            base: None,
            rules: vec!["ip saddr @blocked drop".into()],
        });
        t.chains[1].rules.push("jump blocking".into());
    }
    t
}

/// Sends UDP datagrams to 127.0.0.1:9999 from the calling thread's netns (loopback brought up).
fn send_udp() {
    let out = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..3 {
        socket.send_to(b"weft", "127.0.0.1:9999").unwrap();
    }
}

#[test]
fn meters_connection_counts_and_bans_stay_when_a_chain_or_a_new_set_changes() {
    in_netns(|| {
        let mut nft = NftCli::default();
        apply_firewall(&mut nft, &dynamic_table("counter", false));
        send_udp();
        let lens = |nft: &NftCli| {
            ["meter4", "conns4", "bans4"].map(|s| nft.set_len(Family::Inet, "weft", s).unwrap())
        };
        assert_eq!(lens(&nft), [1, 1, 1], "the kernel filled the dynamic sets");
        let ban = |nft: &mut NftCli| {
            let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
            state.set("bans4").unwrap().expiring["127.0.0.1 . udp . 9999"]
        };
        let (_, left) = ban(&mut nft);

        // One rule of another chain.
        let changes = apply_firewall(&mut nft, &dynamic_table("meta l4proto tcp counter", false));
        assert!(
            changes.iter().any(|c| c == "flushed chain inet weft other")
                && !changes
                    .iter()
                    .any(|c| c.contains("output") || c.starts_with("replaced")),
            "{changes:?}"
        );
        assert_eq!(
            lens(&nft),
            [1, 1, 1],
            "after a rule of another chain changed"
        );

        // A new set and a new chain (jumped to from a changed chain).
        let changes = apply_firewall(&mut nft, &dynamic_table("meta l4proto tcp counter", true));
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("added set inet weft blocked"))
                && changes
                    .iter()
                    .any(|c| c == "added chain inet weft blocking")
                && !changes.iter().any(|c| c.starts_with("replaced")),
            "{changes:?}"
        );
        assert_eq!(lens(&nft), [1, 1, 1], "after a set and a chain were added");
        let (timeout, still) = ban(&mut nft);
        assert_eq!(timeout, 600);
        assert!(
            still <= left && still + 10 >= left,
            "{still} s left of {left}"
        );
        // The chain that feeds the sets itself: flushed and refilled, the sets stay.
        let mut t = dynamic_table("meta l4proto tcp counter", true);
        t.chains[0].rules.push("counter".into());
        let changes = apply_firewall(&mut nft, &t);
        assert!(
            changes
                .iter()
                .any(|c| c == "flushed chain inet weft output")
                && !changes
                    .iter()
                    .any(|c| ["meter4", "conns4", "bans4"].iter().any(|s| c.contains(s))),
            "{changes:?}"
        );
        assert_eq!(lens(&nft), [1, 1, 1], "after their own chain changed");
        // The meter and the count still work on their old elements: more packets, same keys.
        send_udp();
        assert_eq!(lens(&nft), [1, 1, 1]);
    });
}

/// `nft list table` text with counters zeroed, timers dropped, elements sorted (a hash set
/// lists them in the order of its random seed) and the sets, maps and chains in name order
/// (what is added in place comes last in the kernel's order).
fn normalized(text: &str) -> String {
    let mut head = Vec::new();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut lines = Vec::new();
    let mut elements: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(acc) = elements.as_mut() {
            acc.push_str(line.trim());
        } else if let Some(rest) = line.trim().strip_prefix("elements = {") {
            elements = Some(rest.trim().to_string());
        } else {
            lines.push(line.to_string());
            continue;
        }
        if let Some(acc) = elements.take_if(|acc| acc.ends_with('}')) {
            let mut items: Vec<&str> = acc
                .trim_end_matches('}')
                .split(',')
                .map(str::trim)
                .collect();
            items.sort();
            lines.push(format!("\t\telements = {{ {} }}", items.join(", ")));
        }
    }
    for line in &lines {
        let mut words: Vec<&str> = line.split(' ').collect();
        for i in 0..words.len() {
            if i > 0 && matches!(words[i - 1], "packets" | "bytes") {
                words[i] = "0";
            }
        }
        let line = words.join(" ");
        let line = match line.find(" expires ") {
            Some(i) => line[..i].to_string(),
            None => line,
        };
        let opens = ["\tset ", "\tmap ", "\tchain "]
            .iter()
            .any(|p| line.starts_with(p));
        if opens {
            blocks.push(vec![line]);
        } else if let Some(block) = blocks.last_mut()
            && !(line == "}" || line.is_empty())
        {
            block.push(line);
        } else if !line.is_empty() {
            head.push(line);
        }
    }
    blocks.sort();
    let mut out = head.join("\n");
    for block in blocks {
        out.push('\n');
        out.push_str(&block.join("\n"));
    }
    out
}

/// The listing of `t` applied whole to an empty netns.
fn fresh_listing(t: &Table) -> String {
    let t = t.clone();
    let (send, receive) = std::sync::mpsc::channel();
    in_netns(move || {
        let mut nft = NftCli::default();
        let changes = apply_firewall(&mut nft, &t);
        assert!(changes[0].starts_with("replaced"), "{changes:?}");
        send.send(nft.list_table_text(t.family, &t.name).unwrap().unwrap())
            .unwrap();
    });
    receive.recv().unwrap()
}

/// nat_table, changed step by step: a rule, a set's type, a chain gone and one new, a base
/// chain's priority and policy, elements.
fn nat_table_steps() -> Vec<Table> {
    let mut steps = vec![nat_table()];
    let mut t = nat_table();
    t.chains[3].rules[1] = "iifname . oifname @intra counter accept".into();
    steps.push(t.clone());
    // `intra` used by forward: a concatenation of two names becomes one name.
    t.sets[1] = set("intra", "ifname", false, &["\"wn-blue\""]);
    t.chains[3].rules[1] = "iifname @intra counter accept".into();
    steps.push(t.clone());
    t.chains.remove(0);
    t.maps[3].elements.retain(|_, v| !v.ends_with(" isolate"));
    t.chains.push(Chain {
        name: "audit".into(),
        base: None,
        rules: vec!["counter".into(), "ip daddr @nat4 accept".into()],
    });
    t.chains[2].rules.push("jump audit".into());
    t.maps[3]
        .elements
        .insert("10.10.0.9 . 10.20.0.7".into(), "goto audit".into());
    steps.push(t.clone());
    if let Some(b) = t.chains[1].base.as_mut() {
        b.priority = "srcnat + 5".into();
        b.policy = Some("accept".into());
    }
    t.chains[2].base.as_mut().unwrap().policy = Some("drop".into());
    steps.push(t.clone());
    t.sets[0].elements.insert("\"wn-green\"".into());
    t.maps.remove(1);
    t.chains[0].rules.remove(1);
    steps.push(t.clone());
    steps.push(nat_table());
    steps
}

#[test]
fn a_table_changed_in_place_lists_as_the_same_table_applied_whole() {
    let steps = nat_table_steps();
    let fresh: Vec<String> = steps.iter().map(fresh_listing).collect();
    in_netns(move || {
        let mut nft = NftCli::default();
        for (i, (t, fresh)) in steps.iter().zip(&fresh).enumerate() {
            let changes = apply_firewall(&mut nft, t);
            if i > 0 {
                assert!(
                    !changes.iter().any(|c| c.starts_with("replaced")),
                    "step {i}: {changes:?}"
                );
            }
            let listed = nft.list_table_text(Family::Inet, "weft").unwrap().unwrap();
            assert_eq!(normalized(&listed), normalized(fresh), "step {i}");
            assert!(
                apply_firewall(&mut nft, t).is_empty(),
                "step {i}: a second apply changes nothing"
            );
        }
    });
}

#[test]
fn a_set_retyped_under_a_rule_that_uses_it_changes_in_one_batch() {
    in_netns(|| {
        let mut nft = NftCli::default();
        nft.apply(&replace(&nat_table())).unwrap();
        let mut desired = nat_table();
        // `bridges` is used by both rules of postrouting, which stay as they are: its flags
        // change. `nat6` is used by one of them, which changes with its type.
        desired.sets[0] = set("bridges", "ifname", true, &["\"wn-*\""]);
        desired.sets[3] = set(
            "nat6",
            "ipv6_addr . ifname",
            true,
            &["fd00:10::/64 . \"wn-blue\""],
        );
        desired.chains[2].rules[1] =
            "ip6 saddr . iifname @nat6 oifname != @bridges masquerade".into();
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        let tx = weft_dataplane::nft::diff_in_place(&state.to_table(&desired), &desired);
        assert!(
            tx.0.iter()
                .any(|c| matches!(c, Change::DeleteSet { set, .. } if set == "bridges")),
            "{tx:?}"
        );
        let batch = tx.render();
        nft.apply(&tx).unwrap_or_else(|e| panic!("{e}\n{batch}"));
        let state = nft.list_table(Family::Inet, "weft").unwrap().unwrap();
        assert_eq!(state.set("bridges").unwrap().flags, ["interval"]);
        assert_eq!(state.set("nat6").unwrap().key_type, "ipv6_addr . ifname");
        assert_eq!(state.rule_count("postrouting"), Some(2));
        assert!(
            weft_dataplane::nft::diff_in_place(&state.to_table(&desired), &desired)
                .0
                .is_empty()
        );
    });
}

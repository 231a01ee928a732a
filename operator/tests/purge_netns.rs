//! Privileged test of `agent::firewall::purge_addresses` in a real kernel: a departed
//! workload's per-address elements leave the dynamic sets (limits' meters and `ct count`s,
//! drop and new-connection counters), elements of other addresses stay, and an address the
//! kernel never learned does not fail the batch.
//!
//! The test makes its own network namespace (named with the pid, tests run in parallel) and
//! always deletes it. Needs root; fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::process::Command;
use weft_crds::ConnectionLimits;
use weft_dataplane::nft::{Change, Firewall, NftCli, Transaction};
use weft_dataplane::proto::Rate;
use weft_dataplane::{names, netns};
use weft_operator::agent::firewall::{self, Limited};
use weft_operator::agent::guard;

#[path = "common/named_netns.rs"]
mod named_netns;
use named_netns::NamedNetns;

fn nft(node: &NamedNetns, script: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.name, "nft"])
        .args(script.split(' '))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn departed_addresses_leave_the_dynamic_sets_and_others_stay() {
    let node = named_netns::create("wpurge-", "");
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let limits = ConnectionLimits {
        new_per_second: Some(50),
        concurrent: Some(100),
        conntrack: Some(1000),
    };
    let limited: Vec<Limited> = ["10.0.0.5", "10.0.0.6", "fd00::5"]
        .iter()
        .map(|a| Limited {
            ip: Some(ip(a)),
            limits,
        })
        .collect();
    let mut table = firewall::table(
        &[],
        &[],
        &[],
        &limited,
        &weft_operator::policy::Compiled::default(),
    );
    firewall::count_new_connections(&mut table);
    netns::run_in(&node.ns, || {
        NftCli::default().apply(&Transaction(vec![Change::ReplaceTable(table.clone())]))
    })
    .unwrap()
    .unwrap();
    // What the kernel would have learned from the workloads' traffic: elements with their
    // own expressions (a counter, a token bucket) in the dynamic sets.
    let dynamic: Vec<(String, bool)> = table
        .sets
        .iter()
        .filter(|s| s.flags.iter().any(|f| f == "dynamic"))
        .filter(|s| s.key_type == "ipv4_addr" || s.key_type == "ipv6_addr")
        .map(|s| (s.name.clone(), s.key_type == "ipv6_addr"))
        .collect();
    assert!(
        dynamic.len() >= 10,
        "the limits' and counters' sets: {dynamic:?}"
    );
    for (set, v6) in &dynamic {
        let addresses: &[&str] = if *v6 {
            &["fd00::5"]
        } else {
            &["10.0.0.5", "10.0.0.6"]
        };
        for a in addresses {
            let expr = if set.starts_with("lr_") {
                " limit rate 50/second"
            } else {
                " counter"
            };
            nft(
                &node,
                &format!("add element inet weft {set} {{ {a}{expr} }}"),
            );
        }
    }
    // The copies' drops, per port id: ports `wfgone` and `wfstay`.
    let id = |port: &str| names::classid_text(names::port_id(port));
    for id in [id("wfgone"), id("wfstay")] {
        nft(
            &node,
            &format!("add element inet weft drops_inp {{ {id} counter }}"),
        );
    }
    let held = |set: &str| -> String { nft(&node, &format!("list set inet weft {set}")) };
    assert!(held("conns_out4").contains("10.0.0.5"));
    assert!(held("drops_inp").contains(&id("wfgone")));

    // 10.0.0.5 and fd00::5 left; 10.0.0.9 was never learned.
    let tx = firewall::purge_addresses(
        &table,
        &[ip("10.0.0.5"), ip("fd00::5"), ip("10.0.0.9")],
        &["wfgone".to_string(), "wfnever".to_string()],
    );
    assert!(!tx.is_empty());
    netns::run_in(&node.ns, || NftCli::default().apply(&tx))
        .unwrap()
        .unwrap();
    for (set, v6) in &dynamic {
        let text = held(set);
        assert!(!text.contains("10.0.0.5"), "{set}: {text}");
        assert!(!text.contains("fd00::5"), "{set}: {text}");
        assert!(!text.contains("10.0.0.9"), "{set}: {text}");
        if !v6 {
            assert!(text.contains("10.0.0.6"), "{set} keeps the others: {text}");
        }
    }
    let ports = held("drops_inp");
    assert!(
        !ports.contains(&id("wfgone")) && ports.contains(&id("wfstay")),
        "{ports}"
    );
    // Purging again (nothing left of them) is no error either.
    netns::run_in(&node.ns, || NftCli::default().apply(&tx))
        .unwrap()
        .unwrap();
    // The static member sets are not the purge's: their elements are the plan's.
    assert!(held(&firewall::limit_class_set(&limits, false)).contains("10.0.0.5"));
}

#[test]
fn a_departed_port_leaves_the_guard_s_counters_and_meters_and_others_stay() {
    let node = named_netns::create("wpurgeg-", "");
    let rate = Rate {
        bits_per_second: 8_000_000,
        burst_bits: 800_000,
    };
    let policing = guard::Policing {
        ports: ["wfgone", "wfstay"]
            .iter()
            .map(|p| ((*p).to_string(), rate))
            .collect(),
        standing: Default::default(),
    };
    let open: Vec<guard::OpenPort> = ["wfgone", "wfstay"]
        .iter()
        .map(|p| guard::OpenPort {
            ifname: (*p).to_string(),
            pending: false,
        })
        .collect();
    let table = guard::table(&[], &[], &open, &policing);
    netns::run_in(&node.ns, || {
        NftCli::default().apply(&Transaction(vec![Change::ReplaceTable(table.clone())]))
    })
    .unwrap()
    .unwrap();
    let class = guard::police_class(&rate).unwrap();
    let (members, meter) = (guard::police_set(&class), guard::police_meter(&class));
    // What the kernel would have learned from the ports' frames.
    for port in ["wfgone", "wfstay"] {
        for (set, expr) in [
            (guard::DROPS_SET.to_string(), "counter"),
            (guard::POLICE_DROPS_SET.to_string(), "counter"),
            (
                meter.clone(),
                "limit rate over 1000 bytes/second burst 100 bytes",
            ),
        ] {
            nft(
                &node,
                &format!("add element bridge weft {set} {{ \"{port}\" {expr} }}"),
            );
        }
    }
    let tx = firewall::purge_addresses(&table, &[], &["wfgone".to_string()]);
    netns::run_in(&node.ns, || NftCli::default().apply(&tx))
        .unwrap()
        .unwrap();
    for set in [
        guard::DROPS_SET.to_string(),
        guard::POLICE_DROPS_SET.to_string(),
        meter.clone(),
    ] {
        let text = nft(&node, &format!("list set bridge weft {set}"));
        assert!(!text.contains("wfgone"), "{set}: {text}");
        assert!(text.contains("wfstay"), "{set} keeps the others: {text}");
    }
    // The class's member set is the plan's, not the purge's.
    let members = nft(&node, &format!("list set bridge weft {members}"));
    assert!(members.contains("wfgone"), "{members}");
}

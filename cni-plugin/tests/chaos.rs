//! Faults around the `weft` binary: kill -9 at random points of ADD, many concurrent ADDs and
//! DELs, and a state directory that cannot be written. After each, DEL and GC must leave no
//! address, link or interface behind.
//!
//! The counts are sized for CI; `WEFT_CHAOS_FULL=1` runs the long mode (200 kills, 1000
//! workloads 64-way).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Agent, Node, env, weft};
use serde_json::json;
use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;
use weft_dataplane::ipam::IpamStore;
use weft_dataplane::names;
use weft_dataplane::netlink::Netlink;

fn full() -> bool {
    std::env::var("WEFT_CHAOS_FULL").is_ok_and(|v| v == "1")
}

/// weft's host links of the test network still present.
fn weft_links() -> Vec<String> {
    Netlink::new()
        .unwrap()
        .links()
        .unwrap()
        .into_iter()
        .filter(|l| l.alias.as_deref().is_some_and(names::is_endpoint_alias))
        .map(|l| l.name)
        .collect()
}

#[test]
fn kill_9_at_random_points_of_add_then_del_and_gc_leave_nothing() {
    let mut node = Node::new(Agent::Answers);
    let conf = node.conf("1.1.0");
    let iterations = if full() { 200 } else { 40 };
    // A small deterministic generator: the same kill points on every run.
    let mut seed: u64 = 0x5eed;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed_mid_way = 0;
    let mut workloads = Vec::new();
    for i in 0..iterations {
        let (_, ns) = node.workload();
        let ns = ns.to_str().unwrap().to_string();
        let cid = format!("kill{i}");
        let mut child = common::spawn_weft("ADD", &conf, &env(&cid, &ns, "eth0"));
        std::thread::sleep(Duration::from_micros(next() % 12_000));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !status.success() {
            killed_mid_way += 1;
        }
        workloads.push((cid, ns));
        // Every other one is repaired by DEL right away; the rest by one GC at the end.
        if i % 2 == 0 {
            let (cid, ns) = workloads.pop().unwrap();
            let out = weft("DEL", &conf, &env(&cid, &ns, "eth0"));
            assert!(out.ok, "DEL after kill: {}", out.json);
        }
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = weft("GC", &gc, &[]);
    assert!(out.ok, "GC: {}", out.json);
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert_eq!(store.list().unwrap().len(), 0, "leaked addresses");
    assert_eq!(weft_links(), Vec::<String>::new(), "leaked host links");
    eprintln!(
        "chaos: {iterations} ADDs killed at random points ({killed_mid_way} before finishing); 0 leaks"
    );
    assert!(killed_mid_way > 0, "the kills never hit an ADD in progress");
}

#[test]
fn many_concurrent_adds_and_dels_give_distinct_addresses_and_leak_nothing() {
    let (count, width) = if full() { (1000, 64) } else { (192, 64) };
    let mut node = Node::with_block(Agent::Answers, "10.77.0.0/20", tempfile::tempdir().unwrap());
    let conf = node.conf("1.1.0");
    let workloads: Vec<String> = (0..count)
        .map(|_| node.workload().1.to_str().unwrap().to_string())
        .collect();
    let run = |command: &'static str| -> Vec<common::Out> {
        let chunks: Vec<Vec<(usize, &String)>> = (0..width)
            .map(|w| {
                workloads
                    .iter()
                    .enumerate()
                    .skip(w)
                    .step_by(width)
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let conf = &conf;
                    let vars = common::node_env();
                    s.spawn(move || {
                        common::adopt_node_env(vars);
                        chunk
                            .into_iter()
                            .map(|(i, ns)| weft(command, conf, &env(&format!("cc{i}"), ns, "eth0")))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    };
    let adds = run("ADD");
    let mut seen = BTreeSet::new();
    for r in &adds {
        assert!(r.ok, "{} {}", r.json, r.stderr);
        for ip in r.json["ips"].as_array().unwrap() {
            assert!(
                seen.insert(ip["address"].as_str().unwrap().to_string()),
                "duplicate address {}",
                ip["address"]
            );
        }
    }
    assert_eq!(seen.len(), 2 * count, "one IPv4 and one IPv6 address each");
    for r in run("DEL") {
        assert!(r.ok, "{}", r.json);
    }
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty(), "leaked addresses");
    assert_eq!(weft_links(), Vec::<String>::new(), "leaked host links");
    eprintln!("chaos: {count} workloads {width}-way ADD then DEL: 0 duplicates, 0 leaks");
}

/// A tmpfs mounted on a temp dir for this test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_read_only_or_full_state_dir_fails_add_with_a_code_and_leaves_nothing() {
    for fault in ["read-only", "full"] {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k"),
        )
        .expect("mount a tmpfs (needs root)");
        let path = dir.path().to_path_buf();
        let tmpfs = Tmpfs(dir);
        let mut node =
            Node::with_block(Agent::Answers, "10.77.0.0/24", tempfile::tempdir().unwrap());
        // The network's runtime state lives in the faulty dir, written while it still works.
        std::fs::create_dir_all(path.join("networks")).unwrap();
        std::fs::copy(
            node.state_dir().join("networks/test.json"),
            path.join("networks/test.json"),
        )
        .unwrap();
        match fault {
            "read-only" => nix::mount::mount(
                None::<&str>,
                &path,
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .unwrap(),
            _ => {
                let mut f = std::fs::File::create(path.join("filler")).unwrap();
                let block = vec![0u8; 4096];
                while f.write_all(&block).is_ok() {}
                let _ = f.sync_all();
            }
        }
        let (_, ns) = node.workload();
        let conf = node.conf("1.1.0");
        common::set_node_env("WEFT_STATE_DIR", &path);
        let out = weft(
            "ADD",
            &conf,
            &env(&format!("{fault}-1"), ns.to_str().unwrap(), "eth0"),
        );
        assert!(!out.ok, "{fault}: ADD must fail");
        assert_eq!(out.json["code"], 5, "{fault}: {}", out.json);
        assert!(
            out.json["details"]
                .as_str()
                .unwrap()
                .contains(path.to_str().unwrap())
        );
        assert_eq!(
            weft_links(),
            Vec::<String>::new(),
            "{fault}: a link was left behind"
        );
        drop(tmpfs);
    }
}

//! The real `weft` binary, driven from outside exactly as a container runtime drives it.
//!
//! Each test unshares its own network namespace (the "node") on its thread, creates its own
//! bridge and named workload namespaces with unique names, and a stand-in agent on a socket in a
//! temp dir. Nothing outside the test's namespaces is touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Agent, Node, Out, env, host_link_exists, weft};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use weft_dataplane::ipam::{Attachment, IpamStore};
use weft_dataplane::names;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns::{self, Netns};

#[test]
fn version_lists_1_1_0() {
    let out = weft("VERSION", &json!({"cniVersion": "1.1.0"}), &[]);
    assert!(out.ok);
    assert_eq!(out.json["cniVersion"], "1.1.0");
    let versions: Vec<&str> = out.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&v), "{versions:?}");
    }
}

/// What libcni 1.1 (containerd 1.6/1.7, podman 4) sends for the agent's conflist: 1.0.0. Every
/// answer must be 1.0.0 (it rejects a 1.1.0 result), and GC and STATUS do not exist there.
#[test]
fn a_1_0_0_runtime_gets_1_0_0_answers_and_gc_and_status_are_code_1() {
    let version = weft("VERSION", &json!({"cniVersion": "1.0.0"}), &[]);
    assert!(version.ok);
    assert_eq!(version.json["cniVersion"], "1.0.0");
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let conf = node.conf("1.0.0");
    let add = weft("ADD", &conf, &env("c10", ns, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    assert_eq!(add.json["cniVersion"], "1.0.0");
    assert!(
        add.json["interfaces"][2].get("mtu").is_none(),
        "{}",
        add.json
    );
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = add.json.clone();
    assert!(weft("CHECK", &check_conf, &env("c10", ns, "eth0")).ok);
    for command in ["GC", "STATUS"] {
        let out = weft(command, &conf, &env("c10", ns, "eth0"));
        assert!(!out.ok, "{command}");
        assert_eq!(out.json["code"], 1, "{command}: {}", out.json);
        assert_eq!(out.json["cniVersion"], "1.0.0", "{command}: {}", out.json);
    }
    let mut bad = conf.clone();
    bad["agentTimeoutMs"] = json!(1);
    let out = weft("ADD", &bad, &env("c10b", ns, "eth0"));
    assert_eq!(out.json["code"], 7);
    assert_eq!(
        out.json["cniVersion"], "1.0.0",
        "errors use the asked version"
    );
    assert!(weft("DEL", &conf, &env("c10", ns, "eth0")).ok);
}

#[test]
fn add_check_del_round_trip() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let conf = node.conf("1.1.0");
    // A MAC of its own, as the agent gives its bridges (else the bridge takes its ports').
    let mut host = Netlink::new().unwrap();
    let bridge_mac = [0x02, 0x77, 0x65, 0x66, 0x74, 0x09];
    let br = host.link_by_name("wn-test").unwrap().unwrap();
    host.set_mac(br.index, bridge_mac).unwrap();
    let add = weft("ADD", &conf, &env("c1", ns, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let r = &add.json;
    assert_eq!(r["cniVersion"], "1.1.0");
    let ifaces = r["interfaces"].as_array().unwrap();
    assert_eq!(ifaces[2]["name"], "eth0");
    assert_eq!(ifaces[2]["sandbox"], ns);
    assert_eq!(ifaces[2]["mtu"], 1400);
    // .0 is the network, .1 the gateway, .2 is excluded: the first address is .3.
    assert_eq!(r["ips"][0]["address"], "10.77.0.3/16");
    assert_eq!(r["ips"][0]["gateway"], "10.77.0.1");
    assert_eq!(r["ips"][0]["interface"], 2);
    assert!(r["ips"][0].get("version").is_none());
    assert_eq!(r["ips"][1]["address"], "fd77::2/64");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(ifaces[2]["mac"], "0a:58:0a:4d:00:03");

    // Inside the workload: eth0 up, with the addresses, MTU and default routes.
    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap();
    assert!(eth0.up);
    assert_eq!(eth0.mtu, 1400);
    let addrs: Vec<String> = inner
        .addresses(Some(eth0.index))
        .unwrap()
        .iter()
        .map(|a| a.addr.to_string())
        .collect();
    assert!(addrs.contains(&"10.77.0.3/16".to_string()), "{addrs:?}");
    let routes = inner.routes(weft_dataplane::netlink::Family::V4).unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some("10.77.0.1".parse().unwrap()))
    );
    // The host side is on the bridge.
    let hl = host
        .link_by_name(&names::host_veth_name("c1", "eth0"))
        .unwrap()
        .unwrap();
    assert_eq!(hl.master, Some(br.index));
    assert_eq!(ifaces[0]["name"], "wn-test");
    assert_eq!(ifaces[0]["mac"], names::format_mac(bridge_mac));
    // The namespace's loopback, down in a new namespace, is up.
    assert!(inner.link_by_name("lo").unwrap().unwrap().up);

    let mut check_conf = conf.clone();
    check_conf["prevResult"] = add.json.clone();
    let check = weft("CHECK", &check_conf, &env("c1", ns, "eth0"));
    assert!(check.ok, "{}", check.json);

    // CHECK notices a missing address.
    inner
        .del_address(eth0.index, "10.77.0.3/16".parse().unwrap())
        .unwrap();
    let check = weft("CHECK", &check_conf, &env("c1", ns, "eth0"));
    assert!(!check.ok);
    assert_eq!(check.json["code"], 106);

    let del = weft("DEL", &check_conf, &env("c1", ns, "eth0"));
    assert!(del.ok, "{}", del.json);
    assert!(!host_link_exists("c1", "eth0"));
    assert!(inner.link_by_name("eth0").unwrap().is_none());
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty());
    let again = weft("DEL", &check_conf, &env("c1", ns, "eth0"));
    assert!(again.ok, "DEL twice succeeds: {}", again.json);
}

/// A bridge without a MAC of its own has none (all zeros) once its last port has gone: the
/// next ADD's result names the bridge without a MAC rather than with that one.
#[test]
fn a_bridge_without_a_mac_is_reported_without_one() {
    let mut node = Node::new(Agent::Answers);
    let conf = node.conf("1.1.0");
    let (_, first) = node.workload();
    let add = weft("ADD", &conf, &env("m1", first.to_str().unwrap(), "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let del = weft("DEL", &conf, &env("m1", first.to_str().unwrap(), "eth0"));
    assert!(del.ok, "{}", del.json);
    let mut host = Netlink::new().unwrap();
    let br = host.link_by_name("wn-test").unwrap().unwrap();
    assert_eq!(br.mac, Some([0; 6]), "no port left, no MAC of its own");

    let (_, second) = node.workload();
    let add = weft("ADD", &conf, &env("m2", second.to_str().unwrap(), "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let bridge = &add.json["interfaces"][0];
    assert_eq!(bridge["name"], "wn-test");
    assert!(bridge.get("mac").is_none(), "{bridge}");
    let del = weft("DEL", &conf, &env("m2", second.to_str().unwrap(), "eth0"));
    assert!(del.ok, "{}", del.json);
}

/// A Linux bridge takes at most 1023 ports; the kernel refuses one more with `EXFULL`, which
/// says nothing by itself: the error names the bridge, the limit and the way out, and the
/// refused ADD leaves neither a link nor an address.
#[test]
fn a_bridge_with_every_port_taken_is_named_and_the_add_leaves_nothing() {
    let mut node = Node::new(Agent::Answers);
    // 1023 ports, made by `ip` in this thread's node namespace.
    let mut batch = String::new();
    for i in 0..1023 {
        batch.push_str(&format!(
            "link add full{i} master wn-test type veth peer name fullp{i}\n"
        ));
    }
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip");
    ip.stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(ip.wait().unwrap().success(), "the bridge's 1023 ports");
    let (_, ns_path) = node.workload();
    let e = env("full", ns_path.to_str().unwrap(), "eth0");
    let add = weft("ADD", &node.conf("1.1.0"), &e);
    assert!(!add.ok, "{}", add.json);
    assert_eq!(add.json["code"], 102, "{}", add.json);
    assert_eq!(
        add.json["msg"], "bridge wn-test of network test has no free port",
        "{}",
        add.json
    );
    let details = add.json["details"].as_str().unwrap();
    assert!(
        details.contains("at most 1023 ports") && details.contains("maxPods"),
        "{details}"
    );
    assert_refused_add_left_nothing(&node, "full");
    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    assert!(inner.link_by_name("eth0").unwrap().is_none());
}

/// A refused ADD of container `cid`'s `eth0` left no host link and no address on `node`.
fn assert_refused_add_left_nothing(node: &Node, cid: &str) {
    assert!(
        !host_link_exists(cid, "eth0"),
        "the refused ADD keeps no link"
    );
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(
        store.list().unwrap().is_empty(),
        "the refused ADD keeps no address"
    );
}

#[test]
fn legacy_0_4_0_result_has_ip_versions() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let add = weft("ADD", &node.conf("0.4.0"), &env("c04", ns, "eth0"));
    assert!(add.ok, "{}", add.json);
    assert_eq!(add.json["cniVersion"], "0.4.0");
    assert_eq!(add.json["ips"][0]["version"], "4");
    assert_eq!(add.json["ips"][1]["version"], "6");
    assert!(weft("DEL", &node.conf("0.4.0"), &env("c04", ns, "eth0")).ok);
}

#[test]
fn del_succeeds_when_the_netns_is_gone() {
    let mut node = Node::new(Agent::Answers);
    let (name, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap().to_string();
    assert!(weft("ADD", &node.conf("1.1.0"), &env("gone", &ns, "eth0")).ok);
    netns::delete_named(&name).unwrap();
    let del = weft("DEL", &node.conf("1.1.0"), &env("gone", &ns, "eth0"));
    assert!(del.ok, "{}", del.json);
    assert!(!host_link_exists("gone", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty());
}

/// weft after another plugin in a chain: the previous result goes on, weft's after it, its
/// addresses pointing at its own interfaces.
#[test]
fn a_chained_add_passes_the_previous_result_on_with_its_own_after_it() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "other0", "sandbox": ns}],
        "ips": [{"address": "192.0.2.7/24", "interface": 0}],
        "routes": [{"dst": "198.51.100.0/24", "gw": "192.0.2.1", "mtu": 1400}],
        "dns": {"nameservers": ["192.0.2.53"], "search": ["example.com"]}
    });
    let add = weft("ADD", &conf, &env("chained", ns, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let r = &add.json;
    assert_eq!(r["interfaces"][0]["name"], "other0", "{r}");
    assert_eq!(r["interfaces"][3]["name"], "eth0", "{r}");
    assert_eq!(r["ips"][0]["address"], "192.0.2.7/24", "{r}");
    assert_eq!(r["ips"][0]["interface"], 0, "{r}");
    assert_eq!(
        r["ips"][1]["interface"], 3,
        "weft's address on weft's eth0: {r}"
    );
    assert_eq!(r["routes"][0]["dst"], "198.51.100.0/24", "{r}");
    assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53", "{r}");
    // What weft does not model goes on as it was.
    assert_eq!(r["routes"][0]["mtu"], 1400, "{r}");
    assert_eq!(r["dns"]["search"][0], "example.com", "{r}");
    // An undecodable previous result: code 6, and nothing made.
    let mut bad = node.conf("1.1.0");
    bad["prevResult"] = json!({"interfaces": "no"});
    let out = weft("ADD", &bad, &env("chained2", ns, "eth1"));
    assert_eq!(out.json["code"], 6, "{}", out.json);
    assert!(!host_link_exists("chained2", "eth1"));
    assert!(weft("DEL", &conf, &env("chained", ns, "eth0")).ok);
}

/// What only an ADD uses (static addresses and MAC, port mappings, a tap's queues), written
/// wrong by a workload's or an attachment's author, is refused by the ADD naming the field; a
/// DEL ignores it, so that the runtime can always tear the sandbox down.
#[test]
fn a_del_ignores_what_only_an_add_uses_when_it_is_wrong() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let e = env("lenient", ns, "eth0");
    assert!(weft("ADD", &node.conf("1.1.0"), &e).ok);
    let mut bad = node.conf("1.1.0");
    bad["runtimeConfig"] = json!({"mac": "00:00:00:00:00:00"});
    let refused = weft("ADD", &bad, &env("lenient2", ns, "eth0"));
    assert_eq!(refused.json["code"], 7, "{}", refused.json);
    assert!(
        refused.json["details"]
            .as_str()
            .unwrap()
            .contains("all-zero"),
        "{}",
        refused.json
    );
    for wrong in [
        json!({"mac": "00:00:00:00:00:00"}),
        json!({"mac": "not-a-mac", "ips": ["nope"]}),
        json!({"portMappings": [{"hostPort": 0, "containerPort": 80, "protocol": "tcp"}]}),
    ] {
        let mut conf = node.conf("1.1.0");
        conf["runtimeConfig"] = wrong.clone();
        assert_eq!(
            weft("ADD", &conf, &env("lenient3", ns, "eth0")).json["code"],
            7,
            "{wrong}"
        );
    }
    let mut conf = node.conf("1.1.0");
    conf["runtimeConfig"] = json!({"mac": "not-a-mac", "ips": ["nope"], "portMappings": [{"hostPort": 0, "containerPort": 80, "protocol": "tcp"}]});
    let mut e_bad = e.clone();
    e_bad[4] = ("CNI_ARGS", "IgnoreUnknown=1;MAC=zz;IP=x;TAP_QUEUES=many");
    let del = weft("DEL", &conf, &e_bad);
    assert!(del.ok, "{}", del.json);
    assert!(!host_link_exists("lenient", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn static_ip_and_mac_from_cni_args_are_honoured_and_checked() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let mut e = env("static", ns, "eth0");
    e[4] = (
        "CNI_ARGS",
        "IgnoreUnknown=1;IP=10.77.0.50;MAC=02:00:00:00:00:50",
    );
    let add = weft("ADD", &node.conf("1.1.0"), &e);
    assert!(add.ok, "{}", add.json);
    assert_eq!(add.json["ips"][0]["address"], "10.77.0.50/16");
    assert_eq!(add.json["interfaces"][2]["mac"], "02:00:00:00:00:50");
    // Outside this node's block: a clear invalid-config error, nothing left behind.
    let (_, ns2) = node.workload();
    let mut e2 = env("static2", ns2.to_str().unwrap(), "eth0");
    e2[4] = ("CNI_ARGS", "IgnoreUnknown=1;IP=10.77.9.9");
    let bad = weft("ADD", &node.conf("1.1.0"), &e2);
    assert!(!bad.ok);
    assert_eq!(bad.json["code"], 7, "{}", bad.json);
    assert!(bad.json["details"].as_str().unwrap().contains("10.77.9.9"));
    assert!(!host_link_exists("static2", "eth0"));
    assert!(weft("DEL", &node.conf("1.1.0"), &e).ok);
}

#[test]
fn a_mac_another_workload_holds_is_refused_and_the_add_leaves_nothing() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let victim_env = env("victim", ns_path.to_str().unwrap(), "eth0");
    let victim = weft("ADD", &node.conf("1.1.0"), &victim_env);
    assert!(victim.ok, "{}", victim.json);
    let victim_mac = victim.json["interfaces"][2]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, ns2) = node.workload();
    let mut e = env("attacker", ns2.to_str().unwrap(), "eth0");
    let args = format!("IgnoreUnknown=1;MAC={}", victim_mac.to_uppercase());
    e[4] = ("CNI_ARGS", &args);
    let bad = weft("ADD", &node.conf("1.1.0"), &e);
    assert!(!bad.ok, "{}", bad.json);
    assert_eq!(bad.json["code"], 7, "{}", bad.json);
    let details = bad.json["details"].as_str().unwrap();
    assert!(
        details.contains(&format!("MAC {victim_mac}"))
            && details.contains("container victim interface eth0"),
        "the error must name the MAC and its holder: {details}"
    );
    assert!(!host_link_exists("attacker", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    let left: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(left, ["victim"], "the refused ADD keeps no address");
    let mut inner = Netlink::in_netns(&Netns::open(&ns2).unwrap()).unwrap();
    assert!(inner.link_by_name("eth0").unwrap().is_none());
    assert!(weft("DEL", &node.conf("1.1.0"), &victim_env).ok);
}

#[test]
fn a_mac_the_bridge_places_behind_another_port_is_refused() {
    let mut node = Node::new(Agent::Answers);
    // The LAN side of the bridge: a router whose MAC the bridge has learned.
    let router = [0x02, 0, 0, 0, 0, 0x77];
    let mut nl = Netlink::new().unwrap();
    let bridge = nl.link_by_name("wn-test").unwrap().unwrap().index;
    let port = nl
        .create_veth_pair("lanport", "lanpeer", None, None)
        .unwrap();
    nl.set_master(port, Some(bridge)).unwrap();
    nl.set_up(port).unwrap();
    let peer = nl.link_by_name("lanpeer").unwrap().unwrap().index;
    nl.set_up(peer).unwrap();
    let mut hello = vec![0xff; 6];
    hello.extend(router);
    hello.extend([0x88, 0xb5]);
    hello.resize(64, 0);
    // The frame is sent again until the bridge has it: the port forwards once the veth's
    // carrier is up, which the kernel reports a moment after the link is set up.
    let mut learned = false;
    for _ in 0..40 {
        weft_dataplane::frame::send(peer, &hello).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        learned = nl
            .bridge_fdb(bridge)
            .unwrap()
            .iter()
            .any(|e| e.mac == router && e.port == port && !e.local);
        if learned {
            break;
        }
    }
    assert!(learned, "the bridge learned the router's MAC on lanport");
    let (_, ns) = node.workload();
    let mut e = env("mimic", ns.to_str().unwrap(), "eth0");
    e[4] = ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:00:00:00:00:77");
    let bad = weft("ADD", &node.conf("1.1.0"), &e);
    assert!(!bad.ok, "{}", bad.json);
    assert_eq!(bad.json["code"], 7, "{}", bad.json);
    let details = bad.json["details"].as_str().unwrap();
    assert!(
        details.contains("MAC 02:00:00:00:00:77") && details.contains("behind port lanport"),
        "the error names the MAC and where the bridge has it: {details}"
    );
    assert_refused_add_left_nothing(&node, "mimic");
    // The node's own MACs are refused too: the bridge's, and a port device's.
    nl.set_mac(bridge, [0x02, 0, 0, 0, 0, 0x42]).unwrap();
    let lanport_mac = names::format_mac(nl.link_by_index(port).unwrap().unwrap().mac.unwrap());
    for (mac, holder) in [
        ("02:00:00:00:00:42".to_string(), "the bridge wn-test itself"),
        (lanport_mac, "port lanport (its own MAC)"),
    ] {
        let args = format!("IgnoreUnknown=1;MAC={mac}");
        let mut e = env("mimic", ns.to_str().unwrap(), "eth0");
        e[4] = ("CNI_ARGS", &args);
        let bad = weft("ADD", &node.conf("1.1.0"), &e);
        assert_eq!(bad.json["code"], 7, "{}", bad.json);
        assert!(
            bad.json["details"].as_str().unwrap().contains(holder),
            "{holder}: {}",
            bad.json
        );
    }
}

#[test]
fn add_fails_closed_and_undoes_everything_when_the_agent_does_not_answer() {
    let mut node = Node::new(Agent::Silent);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let add = weft("ADD", &node.conf("1.1.0"), &env("silent", ns, "eth0"));
    assert!(!add.ok);
    assert_eq!(add.json["code"], 11, "{}", add.json);
    assert!(!host_link_exists("silent", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty(), "the address was released");
    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    assert!(inner.link_by_name("eth0").unwrap().is_none());
    drop(node.agent.take());
}

/// The link is wired while the agent considers the registration; its refusal undoes it all.
#[test]
fn an_endpoint_the_agent_refuses_leaves_no_link_and_no_address() {
    let mut node = Node::new(Agent::Refuses);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let add = weft("ADD", &node.conf("1.1.0"), &env("refused", ns, "eth0"));
    assert!(!add.ok);
    assert_eq!(add.json["code"], 105, "{}", add.json);
    assert!(
        add.json["details"]
            .as_str()
            .is_some_and(|d| d.contains("host port 8080/tcp")),
        "{}",
        add.json
    );
    assert!(!host_link_exists("refused", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty(), "the address was released");
    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    assert!(inner.link_by_name("eth0").unwrap().is_none());
    drop(node.agent.take());
}

#[test]
fn a_killed_add_is_repaired_by_del_and_by_gc() {
    let mut node = Node::new(Agent::Silent);
    for (cid, repair) in [("killed-del", "DEL"), ("killed-gc", "GC")] {
        let (_, ns_path) = node.workload();
        let ns = ns_path.to_str().unwrap().to_string();
        let conf = node.conf("1.1.0");
        let mut child = common::spawn_weft("ADD", &conf, &env(cid, &ns, "eth0"));
        // Wait until the allocation is recorded and the link exists (ADD is now waiting for the
        // silent agent), then kill -9. (The link alone is no sign: the veth the plugin makes
        // ahead exists while it asks the agent, before any allocation.)
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let attachment = Attachment {
            container_id: cid.into(),
            ifname: "eth0".into(),
        };
        let allocated = || {
            IpamStore::open(node.state_dir(), "test")
                .and_then(|s| s.get(&attachment))
                .is_ok_and(|a| a.is_some())
        };
        while !(allocated() && host_link_exists(cid, "eth0")) {
            assert!(
                std::time::Instant::now() < deadline,
                "ADD never recorded its allocation and created its link"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let store = IpamStore::open(node.state_dir(), "test").unwrap();
        assert!(
            store
                .get(&Attachment {
                    container_id: cid.into(),
                    ifname: "eth0".into()
                })
                .unwrap()
                .is_some(),
            "the allocation survived the crash"
        );
        let out = if repair == "DEL" {
            weft("DEL", &conf, &env(cid, &ns, "eth0"))
        } else {
            let mut gc = conf.clone();
            gc["cni.dev/valid-attachments"] = json!([]);
            weft("GC", &gc, &[])
        };
        assert!(out.ok, "{repair}: {}", out.json);
        assert!(!host_link_exists(cid, "eth0"), "{repair} removed the link");
        assert!(
            store.list().unwrap().is_empty(),
            "{repair} released the address"
        );
    }
}

#[test]
fn gc_keeps_valid_attachments_and_removes_the_rest() {
    let mut node = Node::new(Agent::Answers);
    let conf = node.conf("1.1.0");
    let (_, a) = node.workload();
    let (_, b) = node.workload();
    assert!(weft("ADD", &conf, &env("keep", a.to_str().unwrap(), "eth0")).ok);
    assert!(weft("ADD", &conf, &env("drop", b.to_str().unwrap(), "eth0")).ok);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let out = weft("GC", &gc, &[]);
    assert!(out.ok, "{}", out.json);
    assert!(host_link_exists("keep", "eth0"));
    assert!(!host_link_exists("drop", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    let left: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(left, vec!["keep"]);
    assert!(weft("DEL", &conf, &env("keep", a.to_str().unwrap(), "eth0")).ok);
}

#[test]
fn status_is_50_until_the_agent_has_prepared_the_node() {
    let node = Node::new(Agent::None);
    let out = weft("STATUS", &node.conf("1.1.0"), &[]);
    assert!(!out.ok);
    assert_eq!(out.json["code"], 50, "{}", out.json);
    drop(node);
    let node = Node::new(Agent::Answers);
    let out = weft("STATUS", &node.conf("1.1.0"), &[]);
    assert!(out.ok, "{}", out.json);
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses() {
    let mut node = Node::new(Agent::Answers);
    let conf = node.conf("1.1.0");
    let workloads: Vec<String> = (0..50)
        .map(|_| node.workload().1.to_str().unwrap().to_string())
        .collect();
    let results: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = workloads
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let conf = &conf;
                let vars = common::node_env();
                s.spawn(move || {
                    common::adopt_node_env(vars);
                    let cid = format!("par{i}");
                    weft("ADD", conf, &env(&cid, ns, "eth0"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs = std::collections::BTreeSet::new();
    for r in &results {
        assert!(r.ok, "{} {}", r.json, r.stderr);
        assert!(addrs.insert(r.json["ips"][0]["address"].as_str().unwrap().to_string()));
    }
    assert_eq!(addrs.len(), 50);
    for (i, ns) in workloads.iter().enumerate() {
        let cid = format!("par{i}");
        assert!(weft("DEL", &conf, &env(&cid, ns, "eth0")).ok);
    }
}

#[test]
fn bad_input_gets_coded_errors_naming_the_field() {
    let node = Node::new(Agent::Answers);
    // Missing CNI_COMMAND: code 4.
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 4);
    // Undecodable configuration: code 6.
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{nope").unwrap();
    let v: Value = serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(v["code"], 6);
    // Missing network: code 7 naming the field.
    let mut conf = node.conf("1.1.0");
    conf.as_object_mut().unwrap().remove("network");
    let out = weft("ADD", &conf, &env("x", "/run/netns/none", "eth0"));
    assert_eq!(out.json["code"], 7);
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .starts_with("network:")
    );
    // Missing CNI_NETNS on ADD: code 4 naming it.
    let out = weft(
        "ADD",
        &node.conf("1.1.0"),
        &[("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")],
    );
    assert_eq!(out.json["code"], 4);
    assert!(out.json["msg"].as_str().unwrap().contains("CNI_NETNS"));
    // A network this node does not have: try again later.
    let mut conf = node.conf("1.1.0");
    conf["network"] = json!("absent");
    let out = weft("ADD", &conf, &env("x", "/run/netns/none", "eth0"));
    assert_eq!(out.json["code"], 11);
    // Nothing was written on stdout but the error object.
    assert!(out.json.is_object());
}

#[test]
fn a_vm_gets_a_tap_joined_by_tc_and_keeps_its_address_and_mac_across_restart() {
    let mut node = Node::new(Agent::Answers);
    let mut conf = node.conf("1.1.0");
    conf["attachment"] = json!("tap");
    conf["tap"] = json!({"queues": 2, "owner": 107, "group": 107});
    let ifname = "pod16477688c0e";
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=vm-launcher-vm-a";
    let add_in = |cid: &str, ns: &str| {
        let mut e = env(cid, ns, ifname);
        e.retain(|(k, _)| *k != "CNI_ARGS");
        e.push(("CNI_ARGS", args));
        weft("ADD", &conf, &e)
    };
    let (_, ns1) = node.workload();
    let ns1 = ns1.to_str().unwrap().to_string();
    let first = add_in("launcher-1", &ns1);
    assert!(first.ok, "{} {}", first.json, first.stderr);
    let tap = &first.json["interfaces"][2];
    assert_eq!(
        tap["name"], "tap16477688c0e",
        "KubeVirt's tap name for {ifname}"
    );
    assert_eq!(tap["sandbox"], ns1.as_str());
    let mac = tap["mac"].as_str().unwrap().to_string();
    assert_eq!(
        mac,
        names::format_mac(names::vm_mac("default/vm-a", ifname)),
        "the MAC comes from the VM's identity"
    );
    assert!(first.json["routes"].as_array().unwrap().is_empty());

    // In the pod: the veth end and the tap, joined by tc (no bridge), no addresses (the guest
    // has them); both wear the VM's MAC, as KubeVirt copies the pod interface's MAC.
    let pod = Netns::open(&ns1).unwrap();
    let mut inner = Netlink::in_netns(&pod).unwrap();
    let t = inner.link_by_name("tap16477688c0e").unwrap().expect("tap");
    let port = inner.link_by_name(ifname).unwrap().expect("veth end");
    assert_eq!((t.master, port.master), (None, None));
    assert!(t.up && port.up);
    assert_eq!(t.mac.map(names::format_mac).as_deref(), Some(mac.as_str()));
    assert_eq!(port.mac, t.mac);
    let ns_name = ns1.rsplit('/').next().unwrap();
    let tc = Command::new("ip")
        .args([
            "netns", "exec", ns_name, "tc", "filter", "show", "dev", ifname, "ingress",
        ])
        .output()
        .unwrap();
    let tc = String::from_utf8_lossy(&tc.stdout);
    assert!(
        tc.contains("Egress Redirect to device tap16477688c0e"),
        "{tc}"
    );
    let info = weft_dataplane::tap::tap_info(&mut inner, t.index)
        .unwrap()
        .expect("tun info");
    assert!(info.multi_queue, "{info:?}");
    assert_eq!(info.owner, Some(107));
    // No address of the pod's own on either link, IPv6 link-local included: the pod's stack
    // would speak with the guest's MAC and link-local address. The kernel gives a link-local
    // address when the carrier comes on (the veth's: its host end is up; the tap's: when the
    // VMM opens it), so each link is told to generate none, and the veth end is looked at
    // once the kernel has seen its carrier.
    for link in [ifname, "tap16477688c0e"] {
        let shown = Command::new("ip")
            .args(["-n", ns_name, "-d", "link", "show", "dev", link])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("addrgenmode none"), "{link}: {shown}");
    }
    carrier_on(ns_name, ifname);
    let own: Vec<_> = inner
        .addresses(None)
        .unwrap()
        .into_iter()
        .filter(|a| a.index == port.index || a.index == t.index)
        .collect();
    assert!(own.is_empty(), "addresses on the veth end or tap: {own:?}");
    assert!(
        inner
            .addresses(None)
            .unwrap()
            .iter()
            .all(|a| a.addr.addr().is_ipv6() || a.addr.addr().is_loopback()),
        "no IPv4 address in the pod"
    );
    let mut check_env = env("launcher-1", &ns1, ifname);
    check_env.retain(|(k, _)| *k != "CNI_ARGS");
    check_env.push(("CNI_ARGS", args));
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = first.json.clone();
    let check = weft("CHECK", &check_conf, &check_env);
    assert!(check.ok, "{} {}", check.json, check.stderr);

    // The VM stops: DEL removes the tap; it starts again in another launcher pod.
    let del = weft("DEL", &conf, &check_env);
    assert!(del.ok, "{} {}", del.json, del.stderr);
    assert!(inner.link_by_name("tap16477688c0e").unwrap().is_none());
    let (_, ns2) = node.workload();
    let second = add_in("launcher-2", ns2.to_str().unwrap());
    assert!(second.ok, "{} {}", second.json, second.stderr);
    assert_eq!(second.json["ips"], first.json["ips"], "same addresses");
    assert_eq!(
        second.json["interfaces"][2]["mac"],
        mac.as_str(),
        "same MAC"
    );
}

/// Rewrites the test network's runtime state as the agent writes it for a Network with
/// `spec.bridge.vlanFiltering` (own VLAN 10, trunk VLANs 20 and 100-110).
fn make_vlan_filtering(node: &Node) {
    use weft_dataplane::state::NetworkState;
    use weft_dataplane::vlan::{VlanFiltering, VlanRange};
    let mut st = NetworkState::read(node.state_dir(), "test").unwrap();
    st.vlan_filtering = Some(VlanFiltering {
        own: 10,
        trunk: vec![VlanRange::one(20), VlanRange { min: 100, max: 110 }],
    });
    st.write(node.state_dir()).unwrap();
}

#[test]
fn vlan_trunk_needs_a_filtering_network_and_its_trunk_vlans_and_sets_the_port_vlans() {
    use weft_dataplane::vlan::PortVlan;
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap().to_string();
    let mut conf = node.conf("1.1.0");
    conf["vlanTrunk"] = json!([{"id": 20}, {"minID": 100, "maxID": 110}]);
    let nothing_left = |cid: &str| {
        assert!(!host_link_exists(cid, "eth0"), "no host port left");
        let store = IpamStore::open(node.state_dir(), "test").unwrap();
        assert!(store.list().unwrap().is_empty(), "no allocation left");
    };
    // A network whose bridge does not filter VLANs has no trunk ports: code 7.
    let out = weft("ADD", &conf, &env("t1", &ns, "eth0"));
    assert!(!out.ok);
    assert_eq!(out.json["code"], 7, "{}", out.json);
    let details = out.json["details"].as_str().unwrap();
    assert!(
        details.starts_with("vlanTrunk:") && details.contains("spec.bridge.vlanFiltering: true"),
        "{details}"
    );
    nothing_left("t1");

    make_vlan_filtering(&node);
    // A VLAN outside the Network's trunkVlans, or its own VLAN: code 7 naming the entry.
    for (trunk, needle) in [
        (
            json!([{"id": 20}, {"id": 30}]),
            "vlanTrunk[1]: VLAN 30 is not among",
        ),
        (
            json!([{"minID": 105, "maxID": 120}]),
            "vlanTrunk[0]: VLAN 105-120",
        ),
        (json!([{"id": 10}]), "VLAN 10 is the network's own"),
    ] {
        let mut c = conf.clone();
        c["vlanTrunk"] = trunk;
        let out = weft("ADD", &c, &env("t2", &ns, "eth0"));
        assert_eq!(out.json["code"], 7, "{}", out.json);
        let details = out.json["details"].as_str().unwrap();
        assert!(
            details.contains(needle) && details.contains("20, 100-110"),
            "{details}"
        );
        nothing_left("t2");
    }

    // Allowed VLANs: the port becomes a trunk, on kernels with VLAN-filtering bridges.
    let mut nl = Netlink::new().unwrap();
    let br = nl.link_by_name("wn-test").unwrap().unwrap().index;
    match nl.set_vlan_filtering(br, true) {
        Err(e) if e.is_not_supported() => {
            println!(
                "NOT SUPPORTED BY THIS KERNEL: VLAN-filtering bridges ({e}); the trunk port's VLANs were checked by the unit tests only"
            );
            // The agent never realizes such a network here; should the state exist anyway,
            // ADD fails and undoes everything.
            let out = weft("ADD", &conf, &env("t3", &ns, "eth0"));
            assert!(!out.ok, "{}", out.json);
            nothing_left("t3");
        }
        Err(e) => panic!("set vlan_filtering: {e}"),
        Ok(()) => {
            for (cid, attachment) in [("t3", "veth"), ("t4", "tap")] {
                let mut c = conf.clone();
                c["attachment"] = json!(attachment);
                let (_, p) = node.workload();
                let p = p.to_str().unwrap().to_string();
                let add = weft("ADD", &c, &env(cid, &p, "eth0"));
                assert!(add.ok, "{attachment}: {} {}", add.json, add.stderr);
                let port = nl
                    .link_by_name(&names::host_veth_name(cid, "eth0"))
                    .unwrap()
                    .unwrap();
                let mut vlans = nl.port_vlans(port.index).unwrap();
                vlans.sort();
                let mut want = vec![PortVlan::access(10), PortVlan::tagged(20)];
                want.extend((100..=110).map(PortVlan::tagged));
                assert_eq!(vlans, want, "{attachment}: access 10, trunk 20 and 100-110");
                let mut del_conf = c.clone();
                del_conf["prevResult"] = add.json.clone();
                let check = weft("CHECK", &del_conf, &env(cid, &p, "eth0"));
                assert!(check.ok, "{attachment}: {}", check.json);
                assert!(weft("DEL", &del_conf, &env(cid, &p, "eth0")).ok);
                assert!(!host_link_exists(cid, "eth0"));
            }
        }
    }
}

/// `CNI_NETNS` naming the node's own namespace (the plugin's, here the test's node namespace)
/// is refused by ADD and CHECK with code 4, and DEL leaves the node's routes alone.
#[test]
fn the_node_s_own_namespace_as_cni_netns_is_refused_and_its_routes_stay() {
    let node = Node::new(Agent::Answers);
    let mut host = Netlink::new().unwrap();
    let br = host.link_by_name("wn-test").unwrap().unwrap();
    let default_v4 = || {
        Netlink::new()
            .unwrap()
            .routes(weft_dataplane::netlink::Family::V4)
            .unwrap()
            .into_iter()
            .filter(|r| r.dst.prefix_len() == 0)
            .map(|r| (r.gateway, r.oif))
            .collect::<Vec<_>>()
    };
    host.replace_route(&weft_dataplane::netlink::RouteSpec {
        dst: "0.0.0.0/0".parse().unwrap(),
        gateway: Some("10.77.0.254".parse().unwrap()),
        oif: Some(br.index),
        src: None,
    })
    .unwrap();
    let before = default_v4();
    assert_eq!(before.len(), 1);
    // The plugin runs in the node's namespace: /proc/self/ns/net is it, and so is this
    // thread's namespace file under another path.
    let thread_ns = format!(
        "/proc/{}/task/{}/ns/net",
        std::process::id(),
        nix::unistd::gettid()
    );
    for path in ["/proc/self/ns/net", thread_ns.as_str()] {
        let add = weft("ADD", &node.conf("1.1.0"), &env("hostns", path, "weft9"));
        assert!(!add.ok, "{path}: {}", add.json);
        assert_eq!(add.json["code"], 4, "{path}: {}", add.json);
        assert!(
            add.json["details"].as_str().unwrap().contains("CNI_NETNS"),
            "{}",
            add.json
        );
        assert!(host.link_by_name("weft9").unwrap().is_none(), "{path}");
        assert_eq!(default_v4(), before, "{path}: ADD touched the node's route");
        let mut check_conf = node.conf("1.1.0");
        check_conf["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [], "ips": [], "routes": [{"dst": "0.0.0.0/0"}]});
        let check = weft("CHECK", &check_conf, &env("hostns", path, "weft9"));
        assert!(!check.ok);
        assert_eq!(check.json["code"], 4, "{}", check.json);
        let mut tap_conf = node.conf("1.1.0");
        tap_conf["attachment"] = json!("tap");
        assert!(weft("DEL", &tap_conf, &env("hostns", path, "weft9")).ok);
        assert!(weft("DEL", &node.conf("1.1.0"), &env("hostns", path, "weft9")).ok);
        assert_eq!(default_v4(), before, "{path}: DEL touched the node's route");
    }
}

/// A network configuration (a NetworkAttachmentDefinition's author's) cannot move weft's state
/// or log: `logFile` and `stateDir` naming other places are refused, nothing is created or
/// written there, and even the node's own log file is never opened through a symlink.
#[test]
fn paths_in_the_configuration_cannot_redirect_state_or_logs() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let victim = elsewhere.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let link = elsewhere.path().join("weft.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    let mut conf = node.conf("1.0.0");
    conf["logFile"] = json!(link);
    conf["logLevel"] = json!("debug");
    let add = weft("ADD", &conf, &env("paths1", ns, "eth0"));
    assert!(!add.ok);
    assert_eq!(add.json["code"], 7, "{}", add.json);
    assert!(
        add.json["details"]
            .as_str()
            .unwrap()
            .starts_with("logFile:"),
        "{}",
        add.json
    );

    // A fake store with a network state of its own: refused, nothing created or read there.
    let fake = elsewhere.path().join("fake");
    std::fs::create_dir_all(fake.join("networks")).unwrap();
    std::fs::copy(
        node.state_dir().join("networks/test.json"),
        fake.join("networks/test.json"),
    )
    .unwrap();
    let mut conf = node.conf("1.0.0");
    conf["stateDir"] = json!(fake);
    let add = weft("ADD", &conf, &env("paths2", ns, "eth0"));
    assert!(!add.ok);
    assert_eq!(add.json["code"], 7, "{}", add.json);
    assert!(
        add.json["details"]
            .as_str()
            .unwrap()
            .starts_with("stateDir:"),
        "{}",
        add.json
    );
    assert!(!fake.join("ipam").exists(), "the fake store was used");
    assert!(!host_link_exists("paths2", "eth0"));

    // The node's own log file, if it is a symlink, is not written through; ADD still works.
    common::set_node_env("WEFT_LOG_FILE", &link);
    let mut conf = node.conf("1.0.0");
    conf["logLevel"] = json!("debug");
    let add = weft("ADD", &conf, &env("paths3", ns, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    assert!(add.stderr.contains("not logging to"), "{}", add.stderr);
    assert!(weft("DEL", &conf, &env("paths3", ns, "eth0")).ok);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // A plain node log file gets the logs; a configuration repeating it is fine.
    let log = elsewhere.path().join("plain.log");
    common::set_node_env("WEFT_LOG_FILE", &log);
    conf["logFile"] = json!(log);
    assert!(weft("DEL", &conf, &env("paths4", ns, "eth0")).ok);
    assert!(!std::fs::read_to_string(&log).unwrap().is_empty());
}

/// The agent has not seen the pod yet: ADD must not attach the default network alone (dropping
/// the pod's extra networks and a VM's identity); it fails with 11 and leaves nothing.
#[test]
fn add_for_a_pod_the_agent_does_not_know_yet_is_try_again_later() {
    let mut node = Node::new(Agent::UnknownPods);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let add = weft("ADD", &node.conf("1.0.0"), &env("early", ns, "eth0"));
    assert!(!add.ok);
    assert_eq!(add.json["code"], 11, "{}", add.json);
    assert!(
        add.json["details"].as_str().unwrap().contains("cache"),
        "{}",
        add.json
    );
    assert!(!host_link_exists("early", "eth0"));
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn names_left_from_before_are_cleared_and_a_foreign_interface_is_refused() {
    let mut node = Node::new(Agent::Answers);
    let conf = node.conf("1.1.0");
    let store = IpamStore::open(node.state_dir(), "test").unwrap();
    let held = |cid: &str| {
        store
            .get(&Attachment {
                container_id: cid.into(),
                ifname: "eth0".into(),
            })
            .unwrap()
            .is_some()
    };
    let mut host = Netlink::new().unwrap();

    // The workload already has an `eth0` that is not weft's: refused, nothing left behind.
    let (_, foreign_path) = node.workload();
    let foreign = foreign_path.to_str().unwrap();
    let mut inner = Netlink::in_netns(&Netns::open(&foreign_path).unwrap()).unwrap();
    inner.create_bridge("eth0", None, None, None).unwrap();
    let add = weft("ADD", &conf, &env("taken", foreign, "eth0"));
    assert!(!add.ok, "{}", add.json);
    assert_eq!(add.json["code"], 107, "{}", add.json);
    assert!(
        add.json["details"].as_str().unwrap().contains("eth0"),
        "{}",
        add.json
    );
    assert!(!host_link_exists("taken", "eth0"));
    assert!(!held("taken"), "the refused ADD released its address");
    assert!(inner.link_by_name("eth0").unwrap().is_some(), "not weft's");

    // A host end left by an ADD that died half-way: the retried ADD replaces it.
    let (_, retried_path) = node.workload();
    let retried = retried_path.to_str().unwrap();
    let stale = names::host_veth_name("retried", "eth0");
    host.create_veth_pair(&stale, "weft-stale0", None, None)
        .unwrap();
    let add = weft("ADD", &conf, &env("retried", retried, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let now = host.link_by_name(&stale).unwrap().unwrap();
    assert_eq!(now.kind.as_deref(), Some("veth"));
    assert!(
        now.netns_id.is_some(),
        "the new host end's peer is in the workload"
    );
    assert!(host.link_by_name("weft-stale0").unwrap().is_none());

    // A runtime that keeps the namespace of a detached attachment (its address released, its
    // veth left to the namespace's teardown) and ADDs into it again.
    let (_, kept_path) = node.workload();
    let kept = kept_path.to_str().unwrap();
    let add = weft("ADD", &conf, &env("first", kept, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    store
        .release(&Attachment {
            container_id: "first".into(),
            ifname: "eth0".into(),
        })
        .unwrap();
    let add = weft("ADD", &conf, &env("second", kept, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    assert!(!host_link_exists("first", "eth0"));
    assert!(host_link_exists("second", "eth0"));
    assert!(held("second"));
    let mut inner = Netlink::in_netns(&Netns::open(&kept_path).unwrap()).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(
        eth0.peer,
        host.link_by_name(&names::host_veth_name("second", "eth0"))
            .unwrap()
            .map(|l| l.index)
    );
}

#[test]
fn the_veth_made_while_the_agent_allocates_becomes_the_interface_it_answers_for() {
    use weft_dataplane::state::NetworkState;
    let mut node = Node::new(Agent::Attaches);
    let conf = node.conf("1.1.0");
    let mut host = Netlink::new().unwrap();
    let test_bridge = host.link_by_name("wn-test").unwrap().unwrap().index;
    let mac_of = |ip: &str, cid: &str| names::workload_mac(&[ip.parse().unwrap()], cid, "eth0");
    let ports_of = |host: &mut Netlink, bridge: u32| {
        host.links()
            .unwrap()
            .iter()
            .filter(|l| l.master == Some(bridge))
            .count()
    };

    // On the configuration's Network: the veth made ahead is the interface; its peer comes up
    // with the allocated MAC (and the IPv6 link-local address derived from it) and address.
    let (_, pod_path) = node.workload();
    let add = weft(
        "ADD",
        &conf,
        &env("ahead", pod_path.to_str().unwrap(), "eth0"),
    );
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let mac = mac_of("10.77.0.9", "ahead");
    assert_eq!(add.json["interfaces"][2]["mac"], names::format_mac(mac));
    let end = host
        .link_by_name(&names::host_veth_name("ahead", "eth0"))
        .unwrap()
        .unwrap();
    assert_eq!(end.master, Some(test_bridge));
    assert!(
        end.alias.as_deref().is_some_and(names::is_endpoint_alias),
        "{end:?}"
    );
    let mut inner = Netlink::in_netns(&Netns::open(&pod_path).unwrap()).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap();
    assert!(eth0.up);
    assert_eq!(eth0.mac, Some(mac));
    assert_eq!(eth0.peer, Some(end.index));
    // The loopback, down in a new namespace, is up (set while the agent allocated).
    assert!(inner.link_by_name("lo").unwrap().unwrap().up);
    let link_local = std::net::IpAddr::V6(names::eui64_link_local(mac));
    let mut addrs = Vec::new();
    // The kernel adds the link-local address as the link's carrier comes up.
    for _ in 0..100 {
        addrs = inner
            .addresses(Some(eth0.index))
            .unwrap()
            .iter()
            .map(|a| a.addr)
            .collect();
        if addrs.iter().any(|a| a.addr() == link_local) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        addrs.contains(&"10.77.0.9/16".parse().unwrap()),
        "{addrs:?}"
    );
    assert!(
        addrs.iter().any(|a| a.addr() == link_local),
        "link-local {link_local} of the allocated MAC: {addrs:?}"
    );
    // The node's end carries no address of its own: none generated as its carrier came up
    // with the workload's (the pod's link-local above is there by now).
    let on_port = host.addresses(Some(end.index)).unwrap();
    assert!(on_port.is_empty(), "{on_port:?}");
    // One queue each way, as asked at creation (no per-CPU queues made and taken down).
    let shown = Command::new("ip")
        .args(["-d", "link", "show", "dev", &end.name])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("numtxqueues 1 numrxqueues 1"), "{shown}");

    // A VM's pod: the veth end goes up with the VM's MAC beside its tap.
    let mut vm_conf = conf.clone();
    vm_conf["attachment"] = json!("tap");
    vm_conf["tap"] = json!({"queues": 1, "vnetHdr": false});
    let (_, vm_path) = node.workload();
    let add = weft(
        "ADD",
        &vm_conf,
        &env("ahead-vm", vm_path.to_str().unwrap(), "eth0"),
    );
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let mut inner = Netlink::in_netns(&Netns::open(&vm_path).unwrap()).unwrap();
    let port = inner.link_by_name("eth0").unwrap().unwrap();
    let tap = inner
        .link_by_name(&names::vm_tap_name("eth0"))
        .unwrap()
        .unwrap();
    assert!(port.up && tap.up);
    assert_eq!(port.mac, Some(mac_of("10.77.0.9", "ahead-vm")));
    assert_eq!(tap.mac, port.mac);

    // The agent attaches it on another Network (as when the pod's annotation picks one): the
    // veth made ahead on the configuration's bridge gives way to one on that Network's.
    let other_bridge = host
        .create_bridge("wn-other", Some(1500), None, None)
        .unwrap();
    host.set_up(other_bridge).unwrap();
    let mut other = NetworkState::read(node.state_dir(), "test").unwrap();
    other.name = "other".into();
    other.bridge = "wn-other".into();
    other.subnet_v4 = Some("10.78.0.0/16".parse().unwrap());
    other.gateway_v4 = Some("10.78.0.1".parse().unwrap());
    other.block_v4 = Some("10.78.0.0/24".parse().unwrap());
    other.exclude.clear();
    other.write(node.state_dir()).unwrap();
    let on_test = ports_of(&mut host, test_bridge);
    let (_, other_path) = node.workload();
    let add = weft(
        "ADD",
        &conf,
        &env("on-other", other_path.to_str().unwrap(), "eth0"),
    );
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let end = host
        .link_by_name(&names::host_veth_name("on-other", "eth0"))
        .unwrap()
        .unwrap();
    assert_eq!(end.master, Some(other_bridge));
    assert_eq!(
        ports_of(&mut host, test_bridge),
        on_test,
        "nothing left on wn-test"
    );
    let mut inner = Netlink::in_netns(&Netns::open(&other_path).unwrap()).unwrap();
    let eth0 = inner.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(eth0.mac, Some(mac_of("10.78.0.9", "on-other")));
    assert_eq!(eth0.peer, Some(end.index));
    assert!(
        inner
            .addresses(Some(eth0.index))
            .unwrap()
            .iter()
            .any(|a| a.addr == "10.78.0.9/16".parse().unwrap())
    );

    // Refused by the agent: the veth made ahead goes with the ADD, nothing is left.
    let (_, refused_path) = node.workload();
    let add = weft(
        "ADD",
        &conf,
        &env("refused", refused_path.to_str().unwrap(), "eth0"),
    );
    assert!(!add.ok, "{}", add.json);
    assert_eq!(add.json["code"], 11, "{}", add.json);
    assert!(!host_link_exists("refused", "eth0"));
    let mut inner = Netlink::in_netns(&Netns::open(&refused_path).unwrap()).unwrap();
    let left: Vec<String> = inner.links().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(left, ["lo"], "only the namespace's own loopback");
    assert_eq!(ports_of(&mut host, test_bridge), on_test);
}

/// A pod on a NAT network without IPv6 goes up without an IPv6 address of its own: its
/// bridge passes no link-local traffic but neighbour discovery, so the address could reach
/// nothing, while its duplicate address probe and MLD reports would be copied to every port.
/// Whether its veth was made while the agent allocated (on the configuration's Network) or
/// after the answer (on another one). A Bridge network's pod keeps its link-local address.
#[test]
fn a_pod_on_a_nat_network_without_ipv6_comes_up_without_an_ipv6_address() {
    use weft_dataplane::state::{NetworkMode, NetworkState};
    let mut node = Node::new(Agent::Attaches);
    let conf = node.conf("1.1.0");
    let mut test = NetworkState::read(node.state_dir(), "test").unwrap();
    (test.subnet_v6, test.gateway_v6, test.block_v6) = (None, None, None);
    test.write(node.state_dir()).unwrap();
    add_other_network(&node);
    // The pod's `eth0` once the kernel has seen its carrier (when a link-local address would
    // be added), with its addresses and `ip -d link` line.
    let settled = |ns: &str, path: &std::path::Path| {
        let shown = carrier_on(ns, "eth0");
        let mut inner = Netlink::in_netns(&Netns::open(path).unwrap()).unwrap();
        let eth0 = inner.link_by_name("eth0").unwrap().unwrap();
        let addrs: Vec<_> = inner
            .addresses(Some(eth0.index))
            .unwrap()
            .into_iter()
            .map(|a| a.addr)
            .collect();
        (addrs, shown)
    };
    for (cid, v4) in [("v4-only", "10.77.0.9/16"), ("on-other-v4", "10.78.0.9/16")] {
        let (ns, path) = node.workload();
        let add = weft("ADD", &conf, &env(cid, path.to_str().unwrap(), "eth0"));
        assert!(add.ok, "{cid}: {} {}", add.json, add.stderr);
        let (addrs, shown) = settled(&ns, &path);
        assert!(shown.contains("addrgenmode none"), "{cid}: {shown}");
        assert_eq!(addrs, [v4.parse().unwrap()], "{cid}: only its IPv4 address");
        // Its IPv6 stack is on: the loopback keeps ::1.
        let lo = Command::new("ip")
            .args(["-n", &ns, "-6", "addr", "show", "dev", "lo"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&lo.stdout).contains("::1/128"));
    }

    // The same Network in Bridge mode: the pod keeps the link-local address of its MAC.
    test.mode = NetworkMode::Bridge;
    test.write(node.state_dir()).unwrap();
    let (ns, path) = node.workload();
    let add = weft(
        "ADD",
        &conf,
        &env("bridged", path.to_str().unwrap(), "eth0"),
    );
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let mac = names::workload_mac(&["10.77.0.9".parse().unwrap()], "bridged", "eth0");
    let link_local = std::net::IpAddr::V6(names::eui64_link_local(mac));
    let (addrs, shown) = settled(&ns, &path);
    assert!(!shown.contains("addrgenmode none"), "{shown}");
    assert!(
        addrs.iter().any(|a| a.addr() == link_local),
        "link-local {link_local}: {addrs:?}"
    );
}

/// Waits until the kernel has seen link `ifname`'s carrier in namespace `ns` (operational state
/// up: a link-local address, if the link gets one, is there by then); returns its
/// `ip -d link show` line.
fn carrier_on(ns: &str, ifname: &str) -> String {
    let mut shown = String::new();
    for _ in 0..300 {
        let out = Command::new("ip")
            .args(["-n", ns, "-d", "link", "show", "dev", ifname])
            .output()
            .unwrap();
        shown = String::from_utf8_lossy(&out.stdout).into_owned();
        if shown.contains("state UP") {
            return shown;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the carrier of {ifname} in {ns} never came on: {shown}");
}

/// Network `other` beside the node's `test` (its bridge `wn-other`, IPv4 only).
fn add_other_network(node: &Node) {
    let mut host = Netlink::new().unwrap();
    let other_bridge = host
        .create_bridge("wn-other", Some(1500), None, None)
        .unwrap();
    host.set_up(other_bridge).unwrap();
    let mut other = weft_dataplane::state::NetworkState::read(node.state_dir(), "test").unwrap();
    other.name = "other".into();
    other.bridge = "wn-other".into();
    other.subnet_v4 = Some("10.78.0.0/16".parse().unwrap());
    other.gateway_v4 = Some("10.78.0.1".parse().unwrap());
    other.block_v4 = Some("10.78.0.0/24".parse().unwrap());
    (other.subnet_v6, other.gateway_v6, other.block_v6) = (None, None, None);
    other.exclude.clear();
    other.write(node.state_dir()).unwrap();
}

/// The environment of pod `two-nets` (whose annotation, as the stand-in agent answers, asks
/// for Networks `test` and `other`), container `cid`, interface `ifname`.
fn two_nets_env<'a>(cid: &'a str, ns: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env = env(cid, ns, ifname);
    for (k, v) in env.iter_mut() {
        if *k == "CNI_ARGS" {
            *v = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=two-nets";
        }
    }
    env
}

/// CHECK of an ADD that made interfaces from the pod's `weft.dev/networks` annotation checks
/// them too: an address gone from `net1` is a mismatch naming it and its Network.
#[test]
fn check_checks_the_interfaces_the_pod_s_annotation_made_too() {
    let mut node = Node::new(Agent::Answers);
    add_other_network(&node);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let env = two_nets_env("two", ns, "eth0");
    let conf = node.conf("1.0.0");
    let add = weft("ADD", &conf, &env);
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let sandboxes: Vec<&str> = add.json["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i.get("sandbox").is_some())
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(sandboxes, ["eth0", "net1"]);
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = add.json.clone();
    let check = weft("CHECK", &check_conf, &env);
    assert!(check.ok, "{}", check.json);

    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    let net1 = inner.link_by_name("net1").unwrap().unwrap();
    let on_net1 = inner.addresses(Some(net1.index)).unwrap();
    let v4 = on_net1
        .iter()
        .find(|a| a.addr.addr().is_ipv4())
        .expect("net1 has an IPv4 address")
        .addr;
    inner.del_address(net1.index, v4).unwrap();
    let check = weft("CHECK", &check_conf, &env);
    assert!(!check.ok, "{}", check.json);
    assert_eq!(check.json["code"], 106, "{}", check.json);
    let details = check.json["details"].as_str().unwrap();
    assert!(
        details.contains(&format!("address {v4} is missing on net1"))
            && details.contains("interface net1 on Network other"),
        "{details}"
    );

    let del = weft("DEL", &conf, &env);
    assert!(del.ok, "{} {}", del.json, del.stderr);
    assert!(!host_link_exists("two", "eth0"), "{}", del.stderr);
    assert!(!host_link_exists("two", "net1"), "{}", del.stderr);
    assert!(
        IpamStore::open(node.state_dir(), "other")
            .unwrap()
            .list()
            .unwrap()
            .is_empty()
    );
}

/// A second runtime attachment of the pod (as Multus adds `net1`) under the name the pod's
/// annotation gave eth0's interface on `other`: refused with code 107 before anything is made,
/// and the runtime's DEL of it that follows leaves that interface whole (its link in the pod,
/// its host veth, its addresses); eth0's DEL then removes it.
#[test]
fn a_second_attachment_under_a_name_the_annotation_gave_is_refused_and_its_del_leaves_it() {
    let mut node = Node::new(Agent::Answers);
    add_other_network(&node);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    let conf = node.conf("1.0.0");
    let add = weft("ADD", &conf, &two_nets_env("multi", ns, "eth0"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    let held = |network: &str| {
        IpamStore::open(node.state_dir(), network)
            .unwrap()
            .list()
            .unwrap()
    };
    let child = held("other");
    assert_eq!(child.len(), 1);
    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    let pod_net1 = inner.link_by_name("net1").unwrap().unwrap();
    let host_net1 = Netlink::new()
        .unwrap()
        .link_by_name(&names::host_veth_name("multi", "net1"))
        .unwrap()
        .unwrap();

    for network in ["other", "test"] {
        let mut second = conf.clone();
        second["network"] = json!(network);
        let env = two_nets_env("multi", ns, "net1");
        let refused = weft("ADD", &second, &env);
        assert!(!refused.ok, "{}", refused.json);
        assert_eq!(refused.json["code"], 107, "{}", refused.json);
        assert!(
            refused.json["details"]
                .as_str()
                .unwrap()
                .contains("interface net1 of container multi is already attached to Network other"),
            "{}",
            refused.json
        );
        let del = weft("DEL", &second, &env);
        assert!(del.ok, "{} {}", del.json, del.stderr);
        assert_eq!(held("other"), child, "net1 keeps its addresses");
        assert_eq!(held("test").len(), 1, "eth0 keeps its addresses");
        assert_eq!(
            inner.link_by_name("net1").unwrap().map(|l| l.index),
            Some(pod_net1.index),
            "net1 stays in the pod"
        );
        assert_eq!(
            Netlink::new()
                .unwrap()
                .link_by_name(&names::host_veth_name("multi", "net1"))
                .unwrap()
                .map(|l| l.index),
            Some(host_net1.index),
            "its host veth stays"
        );
    }
    let del = weft("DEL", &conf, &two_nets_env("multi", ns, "eth0"));
    assert!(del.ok, "{} {}", del.json, del.stderr);
    assert!(!host_link_exists("multi", "net1"));
    assert!(held("other").is_empty() && held("test").is_empty());
}

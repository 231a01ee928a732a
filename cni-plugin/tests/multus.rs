//! weft as a Multus delegate: the configuration exactly as Multus hands it to a delegate
//! (`runtimeConfig` from the network-selection annotation, `CNI_IFNAME` from its `interface`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Agent, Node, env, weft};
use serde_json::json;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns::Netns;

#[test]
fn a_multus_delegate_gets_net1_with_the_annotation_s_ip_and_mac_and_no_default_route() {
    let mut node = Node::new(Agent::Answers);
    let (_, ns_path) = node.workload();
    let ns = ns_path.to_str().unwrap();
    // What Multus sends: the NAD's config (cniVersion 1.0.0, capabilities stripped) plus
    // runtimeConfig with the annotation's ips (as CIDRs) and mac.
    let mut conf = node.conf("1.0.0");
    conf["name"] = json!("nat-demo");
    conf["defaultRoute"] = json!(false);
    conf["runtimeConfig"] = json!({"ips": ["10.77.0.50/16"], "mac": "02:00:00:00:10:50"});
    let add = weft("ADD", &conf, &env("multus1", ns, "net1"));
    assert!(add.ok, "{} {}", add.json, add.stderr);
    assert_eq!(add.json["cniVersion"], "1.0.0");
    assert_eq!(add.json["interfaces"][2]["name"], "net1");
    assert_eq!(add.json["interfaces"][2]["mac"], "02:00:00:00:10:50");
    assert_eq!(add.json["ips"][0]["address"], "10.77.0.50/16");
    assert!(add.json["routes"].as_array().unwrap().is_empty());

    let mut inner = Netlink::in_netns(&Netns::open(&ns_path).unwrap()).unwrap();
    let net1 = inner
        .link_by_name("net1")
        .unwrap()
        .expect("net1 in the pod");
    assert!(net1.up);
    assert_eq!(
        weft_dataplane::names::format_mac(net1.mac.unwrap()),
        "02:00:00:00:10:50"
    );
    let routes = inner.routes(weft_dataplane::netlink::Family::V4).unwrap();
    assert!(
        !routes.iter().any(|r| r.dst.prefix_len() == 0),
        "a secondary interface must not take the default route"
    );

    // The same address for another pod is refused, naming it.
    let (_, ns2) = node.workload();
    let clash = weft("ADD", &conf, &env("multus2", ns2.to_str().unwrap(), "net1"));
    assert!(!clash.ok);
    assert_eq!(clash.json["code"], 7, "{}", clash.json);
    assert!(
        clash.json["details"]
            .as_str()
            .unwrap()
            .contains("10.77.0.50")
    );

    let del = weft("DEL", &conf, &env("multus1", ns, "net1"));
    assert!(del.ok, "{}", del.json);
    assert!(inner.link_by_name("net1").unwrap().is_none());
}

//! [`apply_endpoint_changes`] against the full plan: after any sequence of registrations,
//! removals and changes, the plan changed in place equals the plan computed from scratch, and
//! its transaction takes the kernel's tables from the old plan to the new one.

use super::*;
use crate::model::parse_manifests;
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use weft_dataplane::nft::{FakeFirewall, Firewall, Transaction};

const WORLD: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: blue}
spec: {mode: NAT, subnets: [10.10.0.0/16, "fd10::/64"], ipam: {nodeBlockPrefix: 24}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: red}
spec: {mode: NAT, subnets: [10.20.0.0/16], ipam: {nodeBlockPrefix: 24}, security: {defaultAction: Deny}, limits: {conntrackEntries: 100, maxConnections: 10, egressBandwidth: 10M, egressBandwidthMode: Police}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bank, labels: {team: b}}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {team: b}}}
  ingress:
    - {name: no-ssh, action: Deny, from: [{namespaces: {matchLabels: {team: a}}}], protocols: [{protocol: TCP, port: 22}]}
    - {name: pass, action: Pass, from: [{pods: {podSelector: {matchLabels: {app: web}}}}]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: base}
spec:
  tier: Baseline
  priority: 5
  subject: {pods: {podSelector: {matchExpressions: [{key: app, operator: Exists}]}}, networks: [blue]}
  egress:
    - {name: dns, action: Accept, to: [{cidrs: [10.0.0.53/32]}], protocols: [{protocol: UDP, port: 53}]}
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: db, namespace: shop}
spec:
  subject: {podSelector: {matchLabels: {app: db}}}
  ingress:
    - {name: from-app, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: app}}}}], protocols: [{protocol: TCP, port: 5432}]}
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: web, namespace: bank}
spec:
  subject: {podSelector: {matchLabels: {app: web}}}
  egress:
    - {name: to-db, action: Allow, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}
"#;

const APPS: [&str; 4] = ["web", "app", "db", "none"];
const NAMESPACES: [&str; 3] = ["shop", "bank", "default"];

fn world() -> Resources {
    let mut r = Resources::default();
    parse_manifests(WORLD, "test", &mut r);
    for i in 0..24 {
        let ns = NAMESPACES[i % 3];
        let app = APPS[i % 4];
        // Some pods lower their limits (a limit class of their own, on either network; a
        // police class of their own on red, which polices egress).
        let annotations = match (i % 5, i % 7) {
            (0, 0) => {
                ", annotations: {weft.dev/new-connections-per-second: \"7\", kubernetes.io/egress-bandwidth: 5M}"
            }
            (0, _) => ", annotations: {weft.dev/new-connections-per-second: \"7\"}",
            (_, 0) => ", annotations: {kubernetes.io/egress-bandwidth: 5M}",
            _ => "",
        };
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {ns}, labels: {{app: {app}}}{annotations}}}\n"
        );
        parse_manifests(&pod, "test", &mut r);
    }
    // A workload on another node, which policies here also match.
    r.peers.push(std::sync::Arc::new(Peer {
        node: "n2".into(),
        workload: weft_crds::NodeWorkload {
            network: "blue".into(),
            namespace: "shop".into(),
            name: "remote".into(),
            labels: BTreeMap::from([("app".into(), "app".into())]).into(),
            ips: vec!["10.10.9.9".into()],
            vm: None,
            mac: None,
            active: true,
        },
    }));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    r
}

fn blocks() -> BTreeMap<String, NodeBlocks> {
    BTreeMap::from([
        (
            "blue".to_string(),
            NodeBlocks {
                v4: "10.10.1.0/24".parse().ok(),
                v6: "fd10::/64".parse().ok(),
            },
        ),
        (
            "red".to_string(),
            NodeBlocks {
                v4: "10.20.1.0/24".parse().ok(),
                v6: None,
            },
        ),
    ])
}

fn node() -> NodeContext {
    NodeContext {
        name: "n1".into(),
        labels: BTreeMap::new(),
        syn_proxy: false,
        own_tcp_ports: Vec::new(),
    }
}

/// Endpoint `slot` of pod `pod`, version `v` (a re-registration with other addresses).
fn endpoint(slot: usize, pod: usize, v: u8, pending: bool) -> Endpoint {
    let red = slot % 5 == 4;
    let cid = format!("cid{slot}");
    let host = slot as u8 + 2;
    let mut ips: Vec<IpAddr> = vec![if red {
        format!("10.20.1.{host}")
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]))
    } else {
        format!("10.10.1.{}", host + 64 * v)
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }];
    if !red {
        ips.push(
            format!("fd10::{host}:{v}")
                .parse()
                .unwrap_or(IpAddr::from([0u16; 8])),
        );
    }
    Endpoint {
        network: if red { "red" } else { "blue" }.into(),
        container_id: cid.clone(),
        ifname: "eth0".into(),
        host_ifname: names::host_veth_name(&cid, "eth0"),
        // A red endpoint has the MAC of the blue slot before it (version 0), so the two share
        // a link-local address on two Networks (cloned VMs) while both are registered.
        mac: if red {
            format!("0a:58:0a:0a:00:{:02x}", host - 1)
        } else {
            format!("0a:58:0a:0a:{v:02x}:{host:02x}")
        },
        ips,
        pod_namespace: Some(NAMESPACES[pod % 3].into()),
        pod_name: Some(format!("p{pod}")),
        netns: None,
        vm: None,
        pending,
        vlan_trunk: vec![],
        port_mappings: host_ports(slot, v),
        bandwidth: None,
    }
}

/// A slot no operation touches: its endpoint's host ports keep both families' maps from
/// becoming empty (which takes the full plan).
const KEPT: usize = 20;

/// The host ports of slot `slot`'s endpoint, version `v`: none for most; slots 0, 3 and 9
/// claim one port (a second claim the full plan reports); 6 one on an IPv6 node address.
fn host_ports(slot: usize, v: u8) -> Vec<weft_dataplane::proto::PortMapping> {
    let mapping = |host_port: u16, host_ip: Option<&str>| weft_dataplane::proto::PortMapping {
        host_port,
        container_port: 80 + u16::from(v),
        protocol: "tcp".into(),
        host_ip: host_ip.and_then(|h| h.parse().ok()),
    };
    match slot {
        0 | 3 | 9 => vec![mapping(30000, None)],
        1 => vec![mapping(30001, None), mapping(30002, None)],
        KEPT => vec![mapping(30020, None)],
        6 => vec![mapping(30006, Some("fd00::1"))],
        _ => vec![],
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Register slot's endpoint for a pod (replacing what the slot held).
    Put {
        slot: usize,
        pod: usize,
        v: u8,
        pending: bool,
    },
    /// Remove the slot's endpoint.
    Remove { slot: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..12usize, 0..24usize, 0..2u8, any::<bool>())
            .prop_map(|(slot, pod, v, pending)| Op::Put { slot, pod, v, pending }),
        1 => (0..12usize).prop_map(|slot| Op::Remove { slot }),
    ]
}

fn list(slots: &BTreeMap<usize, Endpoint>) -> Vec<Endpoint> {
    slots.values().cloned().collect()
}

/// (removed, added) from `before` to `now`, by port.
fn changes(before: &[Endpoint], now: &[Endpoint]) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let removed = before
        .iter()
        .filter(|e| !now.contains(e))
        .cloned()
        .collect();
    let added = now
        .iter()
        .filter(|e| !before.contains(e))
        .cloned()
        .collect();
    (removed, added)
}

fn tables(p: &NodePlan) -> Vec<weft_dataplane::nft::Table> {
    p.guard.iter().chain([&p.firewall]).cloned().collect()
}

/// Checks an in-place change against the full plan: `changed` (the plan `out` after the
/// change, with its transaction `tx`) equals `full`, and `tx` changes elements only and takes
/// `fw` (holding `out`'s tables) to `full`'s tables; a refused change left `out` untouched
/// (`fw` then gets `full`'s tables whole). Whether it was made in place.
fn check_change(
    tx: Option<Transaction>,
    changed: &PlanOutput,
    out: &PlanOutput,
    full: &PlanOutput,
    fw: &mut FakeFirewall,
) -> Result<bool, TestCaseError> {
    use weft_dataplane::nft::Change;
    let Some(tx) = tx else {
        prop_assert_eq!(&changed.plan, &out.plan, "untouched when refused");
        let tx = Transaction(
            tables(&full.plan)
                .into_iter()
                .map(Change::ReplaceTable)
                .collect(),
        );
        fw.apply(&tx).unwrap();
        return Ok(false);
    };
    prop_assert_eq!(&changed.plan, &full.plan);
    prop_assert_eq!(&*changed.policy, &*full.policy);
    let elements_only = tx.0.iter().all(|c| {
        matches!(
            c,
            Change::AddElements { .. }
                | Change::DeleteElements { .. }
                | Change::AddMapElements { .. }
                | Change::DeleteMapElements { .. }
        )
    });
    prop_assert!(elements_only, "{:?}", tx);
    fw.apply(&tx)
        .map_err(|e| TestCaseError::fail(format!("{e}: {tx:?}")))?;
    for t in tables(&full.plan) {
        prop_assert_eq!(fw.table(t.family, &t.name), Some(&t));
    }
    Ok(true)
}

/// Cases run and changes made in place, over the property test's run.
static CASES: AtomicUsize = AtomicUsize::new(0);
static IN_PLACE: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn endpoint_changes_in_place_equal_the_full_plan(ops in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..12)) {
        let res = world();
        let mut slots: BTreeMap<usize, Endpoint> =
            BTreeMap::from([(KEPT, endpoint(KEPT, 5, 0, false))]);
        let mut out = plan(&node(), &res, &blocks(), &list(&slots));
        let mut fw = FakeFirewall::default();
        fw.apply(&Transaction(tables(&out.plan).into_iter().map(weft_dataplane::nft::Change::ReplaceTable).collect())).unwrap();
        let mut in_place = 0;
        for batch in ops {
            let before = list(&slots);
            for o in batch {
                match o {
                    Op::Put { slot, pod, v, pending } => {
                        slots.insert(slot, endpoint(slot, pod, v, pending));
                    }
                    Op::Remove { slot } => {
                        slots.remove(&slot);
                    }
                }
            }
            let now = list(&slots);
            let full = plan(&node(), &res, &blocks(), &now);
            let mut changed = out.clone();
            let (removed, added) = changes(&before, &now);
            let tx = apply_endpoint_changes(&mut changed, &res, &removed, &added);
            in_place += usize::from(check_change(tx, &changed, &out, &full, &mut fw)?);
            out = full;
        }
        // Most changes here can be made in place (not: duplicate addresses, a second claim of
        // a host port): over the run, some must have been.
        let cases = CASES.fetch_add(1, Ordering::Relaxed) + 1;
        let total = IN_PLACE.fetch_add(in_place, Ordering::Relaxed) + in_place;
        prop_assert!(cases < 16 || total > 0, "no change in {cases} cases was made in place");
    }
}

#[test]
fn a_migrating_vms_shared_address_takes_the_full_plan() {
    let mut res = world();
    let target = endpoint(0, 1, 0, true);
    res.peers.push(std::sync::Arc::new(Peer {
        node: "n2".into(),
        workload: weft_crds::NodeWorkload {
            network: "blue".into(),
            namespace: "bank".into(),
            name: "source".into(),
            labels: Default::default(),
            ips: target.ips.iter().map(|i| i.to_string()).collect(),
            vm: None,
            mac: None,
            active: true,
        },
    }));
    let mut out = plan(&node(), &res, &blocks(), &[]);
    assert!(apply_endpoint_changes(&mut out, &res, &[], &[target]).is_none());
}

#[test]
fn a_port_forwarded_namespace_takes_the_full_plan() {
    let mut res = world();
    parse_manifests(
        "apiVersion: weft.dev/v1alpha1\nkind: PortForward\nmetadata: {name: web, namespace: shop}\nspec: {network: blue, target: {workload: p0}, ports: [{port: 8080}]}\n",
        "test",
        &mut res,
    );
    assert!(res.problems.is_empty(), "{:?}", res.problems);
    let mut out = plan(&node(), &res, &blocks(), &[]);
    assert!(apply_endpoint_changes(&mut out, &res, &[], &[endpoint(0, 0, 0, false)]).is_none());
    // Another namespace is not affected by it (but host ports are: see `host_port_changes`).
    let tx = apply_endpoint_changes(&mut out, &res, &[], &[endpoint(2, 1, 0, false)]);
    assert!(tx.is_some_and(|t| !t.is_empty()));
}

#[test]
fn host_ports_change_in_place_but_a_second_claim_or_the_last_one_takes_the_full_plan() {
    let res = world();
    let web = endpoint(1, 1, 0, false);
    let first = endpoint(0, 0, 0, false);
    let out = plan(&node(), &res, &blocks(), std::slice::from_ref(&first));
    // Another endpoint's host ports: map elements only, equal to the full plan.
    let mut changed = out.clone();
    let tx = apply_endpoint_changes(&mut changed, &res, &[], std::slice::from_ref(&web)).unwrap();
    let both = plan(&node(), &res, &blocks(), &[first.clone(), web.clone()]);
    assert_eq!(changed.plan, both.plan);
    assert!(tx.0.iter().any(|c| matches!(
        c,
        weft_dataplane::nft::Change::AddMapElements { map, elements, .. }
            if map == "hportany4" && elements.len() == 2
    )));
    // A second claim of port 30000: the full plan reports it and leaves it out.
    let mut refused = out.clone();
    assert!(apply_endpoint_changes(&mut refused, &res, &[], &[endpoint(3, 2, 0, false)]).is_none());
    assert_eq!(refused.plan, out.plan);
    // The last host port of the node: the full plan (the forwarding sysctls follow them).
    let mut last = out.clone();
    assert!(apply_endpoint_changes(&mut last, &res, &[first], &[]).is_none());
}

#[test]
fn a_networks_own_limit_class_stays_so_its_first_and_last_workload_change_elements_only() {
    let class = firewall::limit_class_set(
        &weft_crds::ConnectionLimits {
            new_per_second: None,
            concurrent: Some(10),
            conntrack: Some(100),
        },
        false,
    );
    standing_class_takes_elements_only(&|out: &PlanOutput| {
        out.plan
            .firewall
            .sets
            .iter()
            .find(|s| s.name == class)
            .map(|s| s.elements.len())
    });
}

/// A class of red's own limits (its members counted by `members`) is in the tables before any
/// workload and after the last one, and red's first and last workload change its elements only.
fn standing_class_takes_elements_only(members: &dyn Fn(&PlanOutput) -> Option<usize>) {
    let res = world();
    let mut out = plan(&node(), &res, &blocks(), &[]);
    assert_eq!(members(&out), Some(0));
    let red = endpoint(4, 1, 0, false);
    assert_eq!(red.network, "red");
    let only_elements = |tx: &weft_dataplane::nft::Transaction| {
        !tx.is_empty()
            && tx
                .0
                .iter()
                .all(|c| !matches!(c, weft_dataplane::nft::Change::ReplaceTable(_)))
    };
    let tx = apply_endpoint_changes(&mut out, &res, &[], std::slice::from_ref(&red));
    assert!(tx.as_ref().is_some_and(only_elements), "{tx:?}");
    assert_eq!(members(&out), Some(1));
    let tx = apply_endpoint_changes(&mut out, &res, std::slice::from_ref(&red), &[]);
    assert!(tx.as_ref().is_some_and(only_elements), "{tx:?}");
    assert_eq!(members(&out), Some(0));
    assert_eq!(out.plan, plan(&node(), &res, &blocks(), &[]).plan);
}

#[test]
fn a_networks_own_police_class_stays_so_its_first_and_last_workload_change_elements_only() {
    let rate = weft_dataplane::proto::Rate {
        bits_per_second: 10_000_000,
        burst_bits: super::super::limits::default_burst_bits(10_000_000),
    };
    let class = super::super::guard::police_set(&super::super::guard::police_class(&rate).unwrap());
    standing_class_takes_elements_only(&|out: &PlanOutput| {
        out.plan
            .guard
            .as_ref()?
            .sets
            .iter()
            .find(|s| s.name == class)
            .map(|s| s.elements.len())
    });
    // Red's egress is policed, not shaped.
    let res = world();
    let red = endpoint(4, 1, 0, false);
    let limits = super::super::limits::shaping(&res, std::slice::from_ref(&red));
    assert!(limits.values().all(|s| s.egress.is_none()), "{limits:?}");
    // A pod's lower rate is a class of its own: its first workload takes the full plan.
    let mut out = plan(&node(), &res, &blocks(), &[]);
    let own = endpoint(4, 7, 0, false);
    assert!(apply_endpoint_changes(&mut out, &res, &[], std::slice::from_ref(&own)).is_none());
}

/// Workload `slot` of another node, version `v` (another version: other labels, and for some
/// slots other addresses). Slot 15's second version takes the address of the world's remote
/// workload (an address held twice: the full plan).
fn peer(slot: usize, v: u8) -> std::sync::Arc<Peer> {
    let red = slot % 3 == 2;
    let octet = 20 + slot + usize::from(v) * 100 * usize::from(slot.is_multiple_of(2));
    let ip = match (slot, v, red) {
        (15, 1, _) => "10.10.9.9".to_string(),
        (_, _, true) => format!("10.20.9.{octet}"),
        (_, _, false) => format!("10.10.9.{octet}"),
    };
    let mut ips = vec![ip];
    if !red && slot % 4 == 1 {
        ips.push(format!("fd10::9:{octet}"));
    }
    std::sync::Arc::new(Peer {
        node: format!("n{}", 2 + slot % 2),
        workload: weft_crds::NodeWorkload {
            network: if red { "red" } else { "blue" }.into(),
            namespace: NAMESPACES[slot % 3].into(),
            name: format!("remote-{slot}"),
            labels: BTreeMap::from([(
                "app".to_string(),
                APPS[(slot + usize::from(v)) % 4].to_string(),
            )])
            .into(),
            ips,
            vm: None,
            mac: None,
            active: true,
        },
    })
}

#[derive(Debug, Clone)]
enum PeerOp {
    Put { slot: usize, v: u8 },
    Remove { slot: usize },
}

fn peer_op() -> impl Strategy<Value = PeerOp> {
    prop_oneof![
        3 => (0..16usize, 0..2u8).prop_map(|(slot, v)| PeerOp::Put { slot, v }),
        1 => (0..16usize).prop_map(|slot| PeerOp::Remove { slot }),
    ]
}

static PEER_CASES: AtomicUsize = AtomicUsize::new(0);
static PEERS_IN_PLACE: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// [`apply_peer_changes`] against the full plan, as for endpoints above; each snapshot's
    /// peers are read again (new allocations for the slice that changed, the same for the
    /// others), as the agent's slice watch does.
    #[test]
    fn peer_changes_in_place_equal_the_full_plan(ops in proptest::collection::vec(proptest::collection::vec(peer_op(), 1..4), 1..12)) {
        let world = world();
        let endpoints = vec![endpoint(KEPT, 5, 0, false)];
        let mut slots: BTreeMap<usize, std::sync::Arc<Peer>> = BTreeMap::new();
        let snapshot = |slots: &BTreeMap<usize, std::sync::Arc<Peer>>| {
            let mut r = world.clone();
            r.peers.extend(slots.values().cloned());
            r
        };
        let mut res = snapshot(&slots);
        let mut out = plan(&node(), &res, &blocks(), &endpoints);
        let mut fw = FakeFirewall::default();
        fw.apply(&Transaction(tables(&out.plan).into_iter().map(weft_dataplane::nft::Change::ReplaceTable).collect())).unwrap();
        let mut in_place = 0;
        for batch in ops {
            for o in batch {
                match o {
                    PeerOp::Put { slot, v } => {
                        slots.insert(slot, peer(slot, v));
                    }
                    PeerOp::Remove { slot } => {
                        slots.remove(&slot);
                    }
                }
            }
            // An unchanged entry read again from a rewritten slice: a new allocation.
            if let Some(p) = slots.values_mut().next() {
                *p = std::sync::Arc::new((**p).clone());
            }
            let now = snapshot(&slots);
            prop_assert!(res.same_but_peers(&now));
            let full = plan(&node(), &now, &blocks(), &endpoints);
            let (removed, added) = crate::model::peer_delta(&res.peers, &now.peers);
            let mut changed = out.clone();
            let tx = apply_peer_changes(&mut changed, &now, &removed, &added);
            in_place += usize::from(check_change(tx, &changed, &out, &full, &mut fw)?);
            out = full;
            res = now;
        }
        let cases = PEER_CASES.fetch_add(1, Ordering::Relaxed) + 1;
        let total = PEERS_IN_PLACE.fetch_add(in_place, Ordering::Relaxed) + in_place;
        prop_assert!(cases < 16 || total > 0, "no change in {cases} cases was made in place");
    }
}

#[test]
fn a_peer_read_again_from_a_rewritten_slice_is_no_change() {
    let a = peer(0, 0);
    let again = std::sync::Arc::new((*a).clone());
    let (removed, added) = crate::model::peer_delta(&[a.clone(), peer(1, 0)], &[again, peer(2, 0)]);
    let names = |ps: &[std::sync::Arc<Peer>]| -> Vec<String> {
        ps.iter().map(|p| p.workload.name.clone()).collect()
    };
    assert_eq!(names(&removed), ["remote-1"]);
    assert_eq!(names(&added), ["remote-2"]);
}

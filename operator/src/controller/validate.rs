//! Decide: what CEL cannot check (pure).
//!
//! - Networks: the Rust [`NetworkSpec::validate`](weft_crds::NetworkSpec::validate) rules
//!   (`Invalid`) and subnets that overlap another Network's (`SubnetOverlap`): the older Network
//!   (by creationTimestamp, then name) keeps its subnets, the newer one is rejected. An update
//!   that changes an immutable field of an accepted Network (`ImmutableFieldChanged`, see
//!   `network::desired`) is judged there, as it needs the last accepted spec.
//! - PortForwards: the Rust rules (`Invalid`), a target Network that does not exist
//!   (`NetworkNotFound`) or is not in NAT mode (`NetworkNotNAT`), and node ports that an older
//!   PortForward on the same Network already forwards for an overlapping set of sources
//!   (`PortConflict`).

use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use weft_crds::{FieldError, ForwardPort, Network, NetworkMode, PortForward};

/// Why a resource is not valid: the condition reason and a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The reason of the `Valid=False` condition and the Warning event (PascalCase).
    pub reason: &'static str,
    /// What is wrong and how to fix it, naming the field.
    pub message: String,
}

/// Reason: the Rust `validate()` found field errors.
pub const REASON_INVALID: &str = "Invalid";
/// Reason: an update changed a field that cannot change on a live Network
/// ([`NetworkSpec::validate_update`](weft_crds::NetworkSpec::validate_update)).
pub const REASON_IMMUTABLE: &str = "ImmutableFieldChanged";
/// Reason: a subnet overlaps an older Network's.
pub const REASON_SUBNET_OVERLAP: &str = "SubnetOverlap";
/// How many overlaps a `SubnetOverlap` message names.
const OVERLAPS_IN_MESSAGE: usize = 5;
/// The fix a `SubnetOverlap` message ends with: `spec.subnets` cannot change on a live Network
/// (the API server refuses the edit), so the Network is made again, or the older one removed.
const OVERLAP_FIX: &str = "spec.subnets cannot change on a live Network: delete this Network and create it again with subnets that overlap no other Network's (or delete the older Network)";
/// Reason: the PortForward's Network does not exist.
pub const REASON_NETWORK_NOT_FOUND: &str = "NetworkNotFound";
/// Reason: the PortForward's Network is not a NAT network.
pub const REASON_NETWORK_NOT_NAT: &str = "NetworkNotNAT";
/// Reason: a node port is already forwarded by another PortForward.
pub const REASON_PORT_CONFLICT: &str = "PortConflict";

fn field_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn invalid(errors: &[FieldError]) -> Rejection {
    Rejection {
        reason: REASON_INVALID,
        message: field_errors(errors),
    }
}

/// The verdict on an update that changed immutable fields (`errors` from `validate_update`).
pub fn immutable(errors: &[FieldError]) -> Rejection {
    Rejection {
        reason: REASON_IMMUTABLE,
        message: format!(
            "{}; the nodes keep the blocks of the last accepted spec",
            field_errors(errors)
        ),
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Sort key: oldest first, then by name.
fn age_key(meta: &kube::core::ObjectMeta) -> (Option<jiff::Timestamp>, String, String) {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A subnet as a sortable key: family (4 or 6), first address, prefix length.
fn subnet_key(net: &IpNet) -> (u8, u128, u8) {
    match net {
        IpNet::V4(n) => (4, u128::from(u32::from(n.network())), n.prefix_len()),
        IpNet::V6(n) => (6, u128::from(n.network()), n.prefix_len()),
    }
}

/// The subnets of the accepted Networks, ordered by family and first address, for finding
/// the ones a new subnet overlaps without looking at all of them. Two CIDRs overlap when one
/// holds the other: the ones `mine` holds start inside it; the ones that hold `mine` and start
/// before it are its supernets, one per shorter prefix.
#[derive(Default)]
struct Accepted {
    /// (family, first address, prefix, Network's acceptance number, subnet's position).
    subnets: BTreeSet<(u8, u128, u8, usize, usize)>,
    /// The accepted Networks' names and subnets, in acceptance order.
    networks: Vec<(String, Vec<IpNet>)>,
}

impl Accepted {
    fn add(&mut self, name: String, subnets: Vec<IpNet>) {
        let n = self.networks.len();
        for (k, s) in subnets.iter().enumerate() {
            let (family, first, prefix) = subnet_key(s);
            self.subnets.insert((family, first, prefix, n, k));
        }
        self.networks.push((name, subnets));
    }

    /// The accepted subnets that overlap `mine`, as (Network's acceptance number, subnet's
    /// position), in acceptance order then position.
    fn overlapping(&self, mine: &IpNet) -> Vec<(usize, usize)> {
        let (family, first, prefix) = subnet_key(mine);
        let last = match mine.broadcast() {
            std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
            std::net::IpAddr::V6(a) => u128::from(a),
        };
        // Those that start inside `mine`.
        let mut found: Vec<(usize, usize)> = self
            .subnets
            .range((family, first, 0, 0, 0)..=(family, last, u8::MAX, usize::MAX, usize::MAX))
            .map(|&(_, _, _, n, k)| (n, k))
            .collect();
        // Those that hold `mine` and start before it.
        for p in 0..prefix {
            let Ok(supernet) = IpNet::new(mine.network(), p).map(|s| s.trunc()) else {
                continue;
            };
            let (_, start, _) = subnet_key(&supernet);
            if start < first {
                found.extend(
                    self.subnets
                        .range(
                            (family, start, p, 0, 0)..=(family, start, p, usize::MAX, usize::MAX),
                        )
                        .map(|&(_, _, _, n, k)| (n, k)),
                );
            }
        }
        found.sort_unstable();
        found
    }
}

/// The verdict on every Network, by name (`None`: valid).
pub fn networks<'a>(
    networks: impl IntoIterator<Item = &'a Network>,
) -> BTreeMap<String, Option<Rejection>> {
    let mut all: Vec<&Network> = networks.into_iter().collect();
    all.sort_by_key(|n| age_key(&n.metadata));
    let mut out = BTreeMap::new();
    // The accepted Networks so far (older first) with their subnets.
    let mut accepted = Accepted::default();
    for net in all {
        let name = net.metadata.name.clone().unwrap_or_default();
        if let Err(errors) = net.spec.validate() {
            out.insert(name, Some(invalid(&errors)));
            continue;
        }
        let subnets: Vec<(usize, IpNet)> = net
            .spec
            .subnets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.net().ok()?)))
            .collect();
        let mut clashes: Vec<String> = Vec::new();
        for (i, mine) in &subnets {
            for (n, k) in accepted.overlapping(mine) {
                let (other, theirs) = &accepted.networks[n];
                let t = &theirs[k];
                clashes.push(format!(
                    "spec.subnets[{i}]: {mine} overlaps {t} of Network {other}, which is older"
                ));
            }
        }
        if clashes.is_empty() {
            accepted.add(name.clone(), subnets.into_iter().map(|(_, s)| s).collect());
            out.insert(name, None);
        } else {
            out.insert(
                name,
                Some(Rejection {
                    reason: REASON_SUBNET_OVERLAP,
                    message: overlap_message(clashes),
                }),
            );
        }
    }
    out
}

/// The message of a `SubnetOverlap` of `clashes` (one per overlap): a few of them and how many
/// more, then the fix. A subnet over thousands of Networks' would otherwise make a message
/// longer than a condition holds.
fn overlap_message(mut clashes: Vec<String>) -> String {
    let more = clashes.len().saturating_sub(OVERLAPS_IN_MESSAGE);
    clashes.truncate(OVERLAPS_IN_MESSAGE);
    if more > 0 {
        clashes.push(format!("and {more} more overlaps with older Networks"));
    }
    format!("{}; {OVERLAP_FIX}", clashes.join("; "))
}

/// `namespace/name` of a PortForward.
pub fn port_forward_key(pf: &PortForward) -> String {
    format!(
        "{}/{}",
        pf.metadata.namespace.as_deref().unwrap_or_default(),
        pf.metadata.name.as_deref().unwrap_or_default()
    )
}

fn sources(pf: &PortForward) -> Vec<IpNet> {
    pf.spec
        .allow_from
        .iter()
        .flatten()
        .filter_map(|c| c.net().ok())
        .collect()
}

/// Whether two allowFrom lists share a source (empty allows any source).
fn sources_overlap(a: &[IpNet], b: &[IpNet]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|x| b.iter().any(|y| overlaps(x, y)))
}

fn ports_overlap(a: &ForwardPort, b: &ForwardPort) -> bool {
    a.protocol == b.protocol && a.node_ports.0 <= b.node_ports.1 && b.node_ports.0 <= a.node_ports.1
}

fn describe(p: &ForwardPort) -> String {
    if p.node_ports.0 == p.node_ports.1 {
        format!("{}/{}", p.protocol, p.node_ports.0)
    } else {
        format!("{}/{}-{}", p.protocol, p.node_ports.0, p.node_ports.1)
    }
}

/// An accepted PortForward: its key, forward ports and allowed sources.
type Taken = (String, Vec<ForwardPort>, Vec<IpNet>);

/// The verdict on every PortForward, by `namespace/name` (`None`: valid). `networks` are all
/// Networks (by name) that exist.
pub fn port_forwards<'a>(
    port_forwards: impl IntoIterator<Item = &'a PortForward>,
    networks: &BTreeMap<String, &Network>,
) -> BTreeMap<String, Option<Rejection>> {
    let mut all: Vec<&PortForward> = port_forwards.into_iter().collect();
    all.sort_by_key(|p| age_key(&p.metadata));
    let mut out = BTreeMap::new();
    // Accepted forwards per network: (key, ports, sources).
    let mut taken: BTreeMap<&str, Vec<Taken>> = BTreeMap::new();
    for pf in all {
        let key = port_forward_key(pf);
        if let Err(errors) = pf.spec.validate() {
            out.insert(key, Some(invalid(&errors)));
            continue;
        }
        let network = pf.spec.network.as_str();
        match networks.get(network) {
            None => {
                out.insert(
                    key,
                    Some(Rejection {
                        reason: REASON_NETWORK_NOT_FOUND,
                        message: format!(
                            "spec.network: Network {network:?} does not exist; create it or name an existing NAT Network"
                        ),
                    }),
                );
                continue;
            }
            Some(n) if n.spec.mode != NetworkMode::Nat => {
                out.insert(
                    key,
                    Some(Rejection {
                        reason: REASON_NETWORK_NOT_NAT,
                        message: format!(
                            "spec.network: Network {network:?} is in {} mode; PortForwards need a NAT Network",
                            n.spec.mode
                        ),
                    }),
                );
                continue;
            }
            Some(_) => {}
        }
        let ports = pf.spec.forward_ports();
        let srcs = sources(pf);
        let mut clashes = Vec::new();
        // Node ports are the node's, whatever the Network: one on another Network claims the
        // same node addresses.
        for (i, p) in ports.iter().enumerate() {
            for (their_network, owners) in &taken {
                for (other, their_ports, their_srcs) in owners {
                    if !sources_overlap(&srcs, their_srcs) {
                        continue;
                    }
                    if let Some(t) = their_ports.iter().find(|t| ports_overlap(p, t)) {
                        clashes.push(format!(
                            "spec.ports[{i}]: node port {} is already forwarded on Network {their_network} by PortForward {other} ({}), which is older; use another node port or disjoint allowFrom sources",
                            describe(p),
                            describe(t)
                        ));
                    }
                }
            }
        }
        if clashes.is_empty() {
            taken
                .entry(network)
                .or_default()
                .push((key.clone(), ports, srcs));
            out.insert(key, None);
        } else {
            out.insert(
                key,
                Some(Rejection {
                    reason: REASON_PORT_CONFLICT,
                    message: clashes.join("; "),
                }),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use weft_crds::{
        BridgeSpec, Cidr, ForwardedPort, NetworkSpec, PortForwardSpec, PortForwardTarget,
        PortRange, Protocol,
    };

    fn at(secs: i64) -> Option<Time> {
        Some(Time(jiff::Timestamp::from_second(secs).unwrap()))
    }

    fn net(name: &str, subnets: &[&str], created: i64) -> Network {
        let mut n = Network::new(
            name,
            NetworkSpec {
                subnets: subnets.iter().map(|s| Cidr::from(*s)).collect(),
                ..NetworkSpec::default()
            },
        );
        n.metadata.creation_timestamp = at(created);
        n
    }

    #[test]
    fn the_newer_of_two_overlapping_networks_is_rejected_naming_the_field_and_the_other() {
        let old = net("old", &["10.10.0.0/16"], 10);
        let new = net("new", &["fd00::/64", "10.10.5.0/24"], 20);
        let other = net("other", &["10.20.0.0/16"], 30);
        let v = networks([&new, &old, &other]);
        assert_eq!(v["old"], None);
        assert_eq!(v["other"], None);
        let r = v["new"].clone().unwrap();
        assert_eq!(r.reason, REASON_SUBNET_OVERLAP);
        assert!(
            r.message
                .starts_with("spec.subnets[1]: 10.10.5.0/24 overlaps 10.10.0.0/16 of Network old"),
            "{}",
            r.message
        );
    }

    #[test]
    fn same_age_networks_are_ordered_by_name_and_rejected_ones_block_nobody() {
        let a = net("a", &["10.0.0.0/16"], 10);
        let b = net("b", &["10.0.0.0/8"], 10); // overlaps a (older by name) -> rejected
        let c = net("c", &["10.1.0.0/16"], 10); // overlaps only b, which is rejected
        let v = networks([&c, &b, &a]);
        assert_eq!(v["a"], None);
        assert_eq!(v["b"].as_ref().unwrap().reason, REASON_SUBNET_OVERLAP);
        assert_eq!(v["c"], None);
    }

    #[test]
    fn a_subnet_overlapping_several_older_ones_names_each_in_age_order() {
        let a = net("a", &["10.1.0.0/16", "fd00:1::/64"], 10);
        let b = net("b", &["10.2.0.0/16"], 20);
        let c = net("c", &["10.3.4.0/24"], 5);
        let big = net("big", &["fd00::/16", "10.0.0.0/8"], 30);
        let inner = net("inner", &["10.1.2.0/24"], 40);
        let v = networks([&big, &inner, &b, &a, &c]);
        assert_eq!(v["a"], None);
        assert_eq!(v["b"], None);
        assert_eq!(v["c"], None);
        assert_eq!(
            v["big"].as_ref().unwrap().message,
            "spec.subnets[0]: fd00::/16 overlaps fd00:1::/64 of Network a, which is older; \
             spec.subnets[1]: 10.0.0.0/8 overlaps 10.3.4.0/24 of Network c, which is older; \
             spec.subnets[1]: 10.0.0.0/8 overlaps 10.1.0.0/16 of Network a, which is older; \
             spec.subnets[1]: 10.0.0.0/8 overlaps 10.2.0.0/16 of Network b, which is older; \
             spec.subnets cannot change on a live Network: delete this Network and create it again with subnets that overlap no other Network's (or delete the older Network)"
        );
        // Held by an older one (a supernet that starts before it).
        assert_eq!(
            v["inner"].as_ref().unwrap().message,
            "spec.subnets[0]: 10.1.2.0/24 overlaps 10.1.0.0/16 of Network a, which is older; \
             spec.subnets cannot change on a live Network: delete this Network and create it again with subnets that overlap no other Network's (or delete the older Network)"
        );
    }

    /// A subnet over thousands of older Networks' names a few, and how many more: the message
    /// stays within what a condition holds (32,768 characters).
    #[test]
    fn an_overlap_with_thousands_of_networks_names_a_few() {
        let small: Vec<Network> = (0..5000)
            .map(|i| {
                net(
                    &format!("n{i:04}"),
                    &[&format!("10.{}.{}.0/24", i / 256, i % 256)],
                    i,
                )
            })
            .collect();
        let big = net("big", &["10.0.0.0/8"], 10_000);
        let v = networks(small.iter().chain([&big]));
        let message = &v["big"].as_ref().unwrap().message;
        assert!(message.len() < 1024, "{} characters", message.len());
        assert!(
            message.starts_with(
                "spec.subnets[0]: 10.0.0.0/8 overlaps 10.0.0.0/24 of Network n0000, which is older; "
            ),
            "{message}"
        );
        assert!(
            message.contains(
                "; and 4995 more overlaps with older Networks; spec.subnets cannot change"
            ),
            "{message}"
        );
    }

    /// The verdicts as every subnet against every older accepted one would give them.
    fn networks_pairwise<'a>(
        networks: impl IntoIterator<Item = &'a Network>,
    ) -> BTreeMap<String, Option<Rejection>> {
        let mut all: Vec<&Network> = networks.into_iter().collect();
        all.sort_by_key(|n| age_key(&n.metadata));
        let mut out = BTreeMap::new();
        let mut accepted: Vec<(String, Vec<IpNet>)> = Vec::new();
        for net in all {
            let name = net.metadata.name.clone().unwrap_or_default();
            if let Err(errors) = net.spec.validate() {
                out.insert(name, Some(invalid(&errors)));
                continue;
            }
            let subnets: Vec<(usize, IpNet)> = net
                .spec
                .subnets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.net().ok()?)))
                .collect();
            let mut clashes = Vec::new();
            for (i, mine) in &subnets {
                for (other, theirs) in &accepted {
                    for t in theirs.iter().filter(|t| overlaps(mine, t)) {
                        clashes.push(format!(
                            "spec.subnets[{i}]: {mine} overlaps {t} of Network {other}, which is older"
                        ));
                    }
                }
            }
            if clashes.is_empty() {
                accepted.push((name.clone(), subnets.into_iter().map(|(_, s)| s).collect()));
                out.insert(name, None);
            } else {
                out.insert(
                    name,
                    Some(Rejection {
                        reason: REASON_SUBNET_OVERLAP,
                        message: overlap_message(clashes),
                    }),
                );
            }
        }
        out
    }

    /// Random subnets in a small space (many overlaps, both directions, both families, equal
    /// ages): the same verdicts and messages as the pairwise check.
    #[test]
    fn overlap_verdicts_match_the_pairwise_check() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        };
        for round in 0..40 {
            let mut nets = Vec::new();
            for i in 0..60 {
                let v4 = {
                    let prefix = 8 + u8::try_from(next(23)).unwrap();
                    let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (next(1 << 16) << 8) as u32);
                    IpNet::new(addr.into(), prefix).unwrap().trunc()
                };
                let v6 = {
                    let prefix = 16 + u8::try_from(next(100)).unwrap();
                    let addr = std::net::Ipv6Addr::from(
                        (0xfd00u128 << 112) | (u128::from(next(1 << 20)) << 90),
                    );
                    IpNet::new(addr.into(), prefix).unwrap().trunc()
                };
                let subnets: Vec<String> = match next(3) {
                    0 => vec![v4.to_string()],
                    1 => vec![v6.to_string()],
                    _ => vec![v6.to_string(), v4.to_string()],
                };
                let refs: Vec<&str> = subnets.iter().map(String::as_str).collect();
                nets.push(net(
                    &format!("n{i}"),
                    &refs,
                    i64::try_from(next(20)).unwrap(),
                ));
            }
            let got = networks(&nets);
            assert_eq!(got, networks_pairwise(&nets), "round {round}");
            assert!(got.values().any(Option::is_some), "round {round}");
            assert!(
                got.values().filter(|v| v.is_none()).count() > 1,
                "round {round}"
            );
        }
    }

    #[test]
    fn rust_validation_errors_are_invalid_with_the_field_errors() {
        let bad = net("bad", &["10.0.0.1/16"], 10);
        let r = networks([&bad])["bad"].clone().unwrap();
        assert_eq!(r.reason, REASON_INVALID);
        assert!(r.message.starts_with("spec.subnets[0]: "), "{}", r.message);
    }

    fn pf(
        ns: &str,
        name: &str,
        network: &str,
        ports: &[(Protocol, i32, i32)],
        allow: &[&str],
        created: i64,
    ) -> PortForward {
        let mut p = PortForward::new(
            name,
            PortForwardSpec {
                network: network.into(),
                target: PortForwardTarget {
                    workload: Some("vm".into()),
                    selector: None,
                },
                ports: ports
                    .iter()
                    .map(|&(protocol, s, e)| ForwardedPort {
                        protocol,
                        port: (s == e).then_some(s),
                        port_range: (s != e).then_some(PortRange { start: s, end: e }),
                        ..ForwardedPort::default()
                    })
                    .collect(),
                allow_from: (!allow.is_empty())
                    .then(|| allow.iter().map(|c| Cidr::from(*c)).collect()),
                brute_force: None,
                syn_proxy: None,
            },
        );
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp = at(created);
        p
    }

    #[test]
    fn port_forwards_are_checked_for_network_and_port_conflicts() {
        let blue = net("blue", &["10.10.0.0/16"], 1);
        let mut br = net("br", &["10.30.0.0/16"], 1);
        br.spec.mode = NetworkMode::Bridge;
        br.spec.bridge = Some(BridgeSpec {
            uplink: "eth1".into(),
            ..BridgeSpec::default()
        });
        let mut green = net("green", &["10.40.0.0/16"], 1);
        green.spec.mode = NetworkMode::Nat;
        let nets: BTreeMap<String, &Network> = [
            ("blue".to_owned(), &blue),
            ("br".to_owned(), &br),
            ("green".to_owned(), &green),
        ]
        .into();
        use Protocol::*;
        let first = pf("a", "ssh", "blue", &[(Tcp, 2222, 2222)], &[], 10);
        let range = pf("b", "rtp", "blue", &[(Udp, 2000, 2999)], &[], 11);
        let clash = pf(
            "c",
            "ssh2",
            "blue",
            &[(Udp, 53, 53), (Tcp, 2200, 2300)],
            &[],
            12,
        );
        let udp_ok = pf("c", "dns", "blue", &[(Udp, 3000, 3000)], &[], 13);
        let disjoint_a = pf(
            "d",
            "web1",
            "blue",
            &[(Tcp, 8080, 8080)],
            &["192.168.1.0/24"],
            14,
        );
        let disjoint_b = pf(
            "d",
            "web2",
            "blue",
            &[(Tcp, 8080, 8080)],
            &["192.168.2.0/24"],
            15,
        );
        let elsewhere = pf("f", "ssh", "green", &[(Tcp, 2222, 2222)], &[], 18);
        let missing = pf("e", "gone", "nope", &[(Tcp, 1, 1)], &[], 16);
        let bridge = pf("e", "bridged", "br", &[(Tcp, 1, 1)], &[], 17);
        let v = port_forwards(
            [
                &clash,
                &first,
                &range,
                &udp_ok,
                &disjoint_a,
                &disjoint_b,
                &missing,
                &bridge,
                &elsewhere,
            ],
            &nets,
        );
        // A node port is the node's on every Network: the later one on another is refused.
        let r = v["f/ssh"].clone().unwrap();
        assert_eq!(r.reason, REASON_PORT_CONFLICT);
        assert!(
            r.message
                .contains("already forwarded on Network blue by PortForward a/ssh"),
            "{}",
            r.message
        );
        assert_eq!(v["a/ssh"], None);
        assert_eq!(v["b/rtp"], None);
        assert_eq!(v["c/dns"], None);
        assert_eq!(v["d/web1"], None);
        assert_eq!(v["d/web2"], None);
        let r = v["c/ssh2"].clone().unwrap();
        assert_eq!(r.reason, REASON_PORT_CONFLICT);
        assert!(r.message.starts_with("spec.ports[1]: node port TCP/2200-2300 is already forwarded on Network blue by PortForward a/ssh"), "{}", r.message);
        assert_eq!(
            v["e/gone"].as_ref().unwrap().reason,
            REASON_NETWORK_NOT_FOUND
        );
        assert_eq!(
            v["e/bridged"].as_ref().unwrap().reason,
            REASON_NETWORK_NOT_NAT
        );
    }
}

//! `trace`: "from A to B on port P: accepted or denied, by which policy and rule", computed by
//! the policy compiler the agent uses, over a lab file's resources and workloads.

use super::file::{Family, LabFile};
use std::collections::BTreeMap;
use std::net::IpAddr;
use weft_crds::L4Protocol;
use weft_operator::model::Resources;
use weft_operator::policy::{Compiled, Decision, Member, Packet};

/// Every workload interface of a lab, with its addresses on each network (the lab's real ones
/// once it runs; without a running lab, stand-in addresses from each network's subnet, which
/// identify the interface just as well: policy matches identities, not numbers).
pub fn members(
    lab: &LabFile,
    res: &Resources,
    addresses: Option<&super::topology::Addresses>,
) -> Vec<Member> {
    let mut next: BTreeMap<String, (u128, u128)> = BTreeMap::new();
    let mut out = Vec::new();
    for w in &lab.workloads {
        for network in &w.networks {
            let ips = match addresses {
                Some(a) => a
                    .get(&w.name)
                    .and_then(|l| l.iter().find(|(n, _)| n == network))
                    .map(|(_, ips)| ips.clone())
                    .unwrap_or_default(),
                None => stand_in(res, network, &mut next),
            };
            out.push(Member {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                labels: w.labels.clone().into(),
                network: network.clone(),
                ips,
                local: true,
                port: None,
            });
        }
    }
    out
}

fn stand_in(
    res: &Resources,
    network: &str,
    next: &mut BTreeMap<String, (u128, u128)>,
) -> Vec<IpAddr> {
    let Some(net) = res
        .networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(network))
    else {
        return vec![];
    };
    let counter = next.entry(network.to_string()).or_insert((2, 2));
    let mut ips = Vec::new();
    if let Some(s) = net.spec.subnet_v4() {
        let base = u32::from(s.network()) as u128;
        ips.push(IpAddr::V4(std::net::Ipv4Addr::from(
            (base + counter.0) as u32,
        )));
        counter.0 += 1;
    }
    if let Some(s) = net.spec.subnet_v6() {
        let base = u128::from(s.network());
        ips.push(IpAddr::V6(std::net::Ipv6Addr::from(base + counter.1)));
        counter.1 += 1;
    }
    ips
}

/// A port forward a traced packet takes.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The workload it leads to.
    pub target: String,
    /// What it is, for the output.
    pub description: String,
}

/// Where a packet from `from` to `to:port` really goes (a node's port forward leads to its
/// target): (address, port, the forward taken).
#[allow(clippy::too_many_arguments)]
pub fn resolve(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    from: &str,
    name: &str,
    port: u16,
    protocol: L4Protocol,
    family: Family,
) -> Option<(IpAddr, u16, Option<Forward>)> {
    let v4 = family == Family::Ipv4;
    if let Some(node) = lab.nodes.iter().find(|n| n.name == name) {
        // A port forward of a workload on this node?
        for pf in &res.port_forwards {
            let ns = pf.metadata.namespace.as_deref().unwrap_or("default");
            for fp in pf.spec.forward_ports() {
                if fp.protocol.nft_name() != protocol.nft_name()
                    || port < fp.node_ports.0
                    || port > fp.node_ports.1
                {
                    continue;
                }
                // The first by name, as the agent picks among several matches.
                let target = lab
                    .workloads
                    .iter()
                    .filter(|w| w.node == node.name && w.namespace == ns)
                    .filter(|w| {
                        if let Some(t) = &pf.spec.target.workload {
                            return t == &w.name;
                        }
                        pf.spec
                            .target
                            .selector
                            .as_ref()
                            .is_some_and(|s| weft_crds::selector_matches(s, &w.labels))
                    })
                    .min_by(|a, b| a.name.cmp(&b.name))?;
                let member = members
                    .iter()
                    .find(|m| m.name == target.name && m.network == pf.spec.network)?;
                let ip = member.ips.iter().find(|i| i.is_ipv4() == v4)?;
                let to_port = fp.target_port.unwrap_or(port);
                return Some((
                    *ip,
                    to_port,
                    Some(Forward {
                        target: target.name.clone(),
                        description: format!(
                            "port forward {ns}/{} on {} to {}:{to_port}",
                            pf.metadata.name.as_deref().unwrap_or(""),
                            node.name,
                            target.name
                        ),
                    }),
                ));
            }
        }
    }
    Some((
        address_towards(lab, res, members, name, Some(from), family)?,
        port,
        None,
    ))
}

/// The address of `outside`, a node or a workload in `family`.
pub fn address(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    name: &str,
    family: Family,
) -> Option<IpAddr> {
    address_towards(lab, res, members, name, None, family)
}

/// The node a workload runs on (a node is on itself).
fn node_of<'a>(lab: &'a LabFile, name: &'a str) -> &'a str {
    lab.workloads
        .iter()
        .find(|w| w.name == name)
        .map_or(name, |w| w.node.as_str())
}

fn is_nat(res: &Resources, network: &str) -> bool {
    res.networks.iter().any(|n| {
        n.metadata.name.as_deref() == Some(network) && n.spec.mode == weft_crds::NetworkMode::Nat
    })
}

/// The LAN subnet of `outside` or a node in `family` (the host's address with the LAN prefix).
fn host_net(lab: &LabFile, name: &str, family: Family) -> Option<ipnet::IpNet> {
    let v4 = family == Family::Ipv4;
    let (a4, a6) = if name == "outside" {
        (lab.lan.gateway, lab.lan.gateway6)
    } else {
        let n = lab.nodes.iter().find(|n| n.name == name)?;
        (n.address, n.address6)
    };
    if v4 { Some(a4) } else { a6 }.map(|a| a.trunc())
}

/// The address of `outside`, a node or a workload in `family` that a connection from `peer`
/// reaches: a workload's address on the first of its networks (in its order) that `peer` can
/// use, else its first address of the family.
///
/// - A workload peer uses a network it is on too (a NAT network only on the same node: NAT
///   networks are private to each node).
/// - `outside` and nodes sit on the LAN: they use a Bridge network address of the workload on
///   the LAN's own subnet (no router is needed to reach it), and a node also uses a NAT network
///   of a workload on that node (through its bridge, from the gateway address).
pub fn address_towards(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    name: &str,
    peer: Option<&str>,
    family: Family,
) -> Option<IpAddr> {
    if lab.is_host(name) {
        return lab.host_address(name, family);
    }
    let v4 = family == Family::Ipv4;
    let of = |m: &Member| m.ips.iter().find(|i| i.is_ipv4() == v4).copied();
    let shared = peer.and_then(|peer| {
        let same_node = node_of(lab, peer) == node_of(lab, name);
        if lab.is_host(peer) {
            let lan = host_net(lab, peer, family);
            return members
                .iter()
                .filter(|m| m.name == name)
                .filter(|m| {
                    if is_nat(res, &m.network) {
                        peer != "outside" && same_node
                    } else {
                        of(m).is_some_and(|ip| lan.is_some_and(|l| l.contains(&ip)))
                    }
                })
                .find_map(of);
        }
        members
            .iter()
            .filter(|m| m.name == name)
            .filter(|m| same_node || !is_nat(res, &m.network))
            .filter(|m| {
                members
                    .iter()
                    .any(|p| p.name == peer && p.network == m.network && of(p).is_some())
            })
            .find_map(of)
    });
    shared.or_else(|| members.iter().filter(|m| m.name == name).find_map(of))
}

/// The source address of a connection from `from` to `dst` (an address of `to`): a node's
/// connection to its own NAT workload leaves from the network's gateway; a workload on the
/// network of `dst` sends from its address there; else `from`'s first address of the family.
pub fn source_towards(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    from: &str,
    to: &str,
    dst: IpAddr,
) -> Option<IpAddr> {
    let family = if dst.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    if let Some(src) = node_source(lab, res, members, from, to, dst) {
        return Some(src);
    }
    let network = members
        .iter()
        .find(|m| m.name == to && m.ips.contains(&dst))
        .map(|m| m.network.as_str());
    let on_network = network.and_then(|n| {
        members
            .iter()
            .find(|m| m.name == from && m.network == n)
            .and_then(|m| m.ips.iter().find(|i| i.is_ipv4() == dst.is_ipv4()).copied())
    });
    on_network.or_else(|| source(lab, res, members, from, dst, family))
}

/// The source address of a node's connection to `dst`, a workload of a NAT network on that
/// node: the node reaches its NAT bridge from the network's gateway address there, not from
/// its LAN address.
fn node_source(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    from: &str,
    to: &str,
    dst: IpAddr,
) -> Option<IpAddr> {
    let node = lab.nodes.iter().find(|n| n.name == from)?;
    let w = lab.workloads.iter().find(|w| w.name == to)?;
    if w.node != node.name {
        return None;
    }
    let member = members
        .iter()
        .find(|m| m.name == to && m.ips.contains(&dst))?;
    let network = res
        .networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(member.network.as_str()))?;
    if network.spec.mode != weft_crds::NetworkMode::Nat {
        return None;
    }
    match dst {
        IpAddr::V4(_) => network.spec.gateway_v4().map(IpAddr::V4),
        IpAddr::V6(_) => network.spec.gateway_v6().map(IpAddr::V6),
    }
}

/// The address `from` sends to `dst` from: a workload with interfaces on several Networks uses
/// the one whose subnet holds `dst` (a connected route), else the one with its default route
/// (its `weft.dev/networks` annotation's `defaultRoute`, else its first Network).
pub fn source(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    from: &str,
    dst: IpAddr,
    family: Family,
) -> Option<IpAddr> {
    let v4 = family == Family::Ipv4;
    let mine: Vec<&Member> = members.iter().filter(|m| m.name == from).collect();
    let ip_of = |m: &&Member| m.ips.iter().find(|i| i.is_ipv4() == v4).copied();
    let connected = mine.iter().find(|m| {
        res.networks
            .iter()
            .filter(|n| n.metadata.name.as_deref() == Some(m.network.as_str()))
            .flat_map(|n| n.spec.subnets.iter())
            .filter_map(|c| c.net().ok())
            .any(|net| net.contains(&dst))
    });
    if let Some(ip) = connected.and_then(ip_of) {
        return Some(ip);
    }
    let via = lab
        .workloads
        .iter()
        .find(|w| w.name == from)
        .and_then(|w| {
            w.annotations
                .get(weft_dataplane::proto::NETWORKS_ANNOTATION)
        })
        .and_then(|v| weft_dataplane::proto::parse_networks_annotation(v).ok())
        .and_then(|list| list.into_iter().find(|n| n.default_route))
        .map(|n| n.name);
    via.and_then(|via| mine.iter().find(|m| m.network == via).and_then(ip_of))
        .or_else(|| address(lab, res, members, from, family))
}

/// A traced connection: the first packet as the node sees it (after a port forward) and what
/// the policies decide for it.
#[derive(Debug, Clone)]
pub struct Traced {
    /// The packet.
    pub packet: Packet,
    /// The decision.
    pub decision: Decision,
    /// The port forward the packet took, if any.
    pub via: Option<String>,
}

/// Decides `from -> to:port/protocol`.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    compiled: &Compiled,
    from: &str,
    to: &str,
    port: u16,
    protocol: L4Protocol,
    family: Family,
) -> Result<Traced, String> {
    let (dst, dport, via) = resolve(lab, res, members, from, to, port, protocol, family)
        .ok_or_else(|| format!("{to} has no {family:?} address"))?;
    // A port forward leads to a workload: the source's address towards that one.
    let towards = via.as_ref().map(|f| f.target.as_str()).unwrap_or(to);
    let src = source_towards(lab, res, members, from, towards, dst)
        .ok_or_else(|| format!("{from} has no {family:?} address"))?;
    let via = via.map(|f| f.description);
    let packet = Packet::first(src, dst, protocol, dport);
    Ok(Traced {
        decision: compiled.decide(&packet),
        packet,
        via,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_reaches_its_nat_workloads_from_the_gateway_address() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lab.yaml");
        std::fs::write(
            &p,
            r#"
lan: {gateway: 192.168.44.1/24}
nodes: [{name: host-1, address: 192.168.44.10/24}, {name: host-2, address: 192.168.44.11/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: local}, spec: {mode: NAT, subnets: [10.60.0.0/24]}}
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: no-host}
    spec:
      tier: Admin
      priority: 1
      subject: {pods: {podSelector: {}}}
      ingress: [{name: deny-node, action: Deny, from: [{cidrs: [192.168.44.10/32]}]}]
workloads: [{name: w, node: host-1, networks: [local]}]
"#,
        )
        .unwrap();
        let (lab, res, _) = LabFile::load(&p).unwrap();
        let members = members(&lab, &res, None);
        let compiled = weft_operator::policy::compile_resources(&res, &members);
        let t = |from: &str| {
            decide(
                &lab,
                &res,
                &members,
                &compiled,
                from,
                "w",
                80,
                L4Protocol::Tcp,
                Family::Ipv4,
            )
            .unwrap()
        };
        // Its own node: from the bridge's gateway address, which the rule does not name.
        let own = t("host-1");
        assert_eq!(own.packet.src, "10.60.0.1".parse::<IpAddr>().unwrap());
        assert!(own.decision.allowed);
        // The outside host keeps its own address.
        assert_eq!(
            t("outside").packet.src,
            "192.168.44.1".parse::<IpAddr>().unwrap()
        );
    }

    const HYBRID: &str = r#"
lan: {gateway: 192.168.44.1/24}
nodes: [{name: host-1, address: 192.168.44.10/24}, {name: host-2, address: 192.168.44.11/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: pods}, spec: {mode: NAT, subnets: [10.60.0.0/24]}}
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: lan}
    spec: {mode: Bridge, subnets: [192.168.44.0/24], ipam: {nodeBlockPrefix: 28, exclude: [192.168.44.0/28]}, bridge: {uplink: eth0}}
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: lab-only}, spec: {mode: Bridge, subnets: [10.70.0.0/24], bridge: {uplink: eth0, vlan: 7}}}
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: nat-side-closed}
    spec:
      tier: Admin
      priority: 1
      subject: {pods: {podSelector: {}}, networks: [pods]}
      ingress: [{name: deny-all, action: Deny}]
workloads:
  - {name: hybrid, node: host-1, networks: [lab-only, pods, lan]}
  - {name: nat-only, node: host-1, networks: [pods]}
"#;

    #[test]
    fn outside_and_nodes_reach_a_hybrid_workload_on_its_lan_address() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lab.yaml");
        std::fs::write(&p, HYBRID).unwrap();
        let (lab, res, _) = LabFile::load(&p).unwrap();
        let members = members(&lab, &res, None);
        let compiled = weft_operator::policy::compile_resources(&res, &members);
        let t = |from: &str, to: &str| {
            decide(
                &lab,
                &res,
                &members,
                &compiled,
                from,
                to,
                80,
                L4Protocol::Tcp,
                Family::Ipv4,
            )
            .unwrap()
        };
        let lan_address = address(&lab, &res, &members, "hybrid", Family::Ipv4);
        // Without a peer: the first address (on lab-only).
        assert_eq!(lan_address, Some("10.70.0.2".parse().unwrap()));
        // outside and the other node: its address on lan, the LAN's own subnet, which the
        // policy on pods does not cover.
        for from in ["outside", "host-2"] {
            let traced = t(from, "hybrid");
            assert_eq!(
                traced.packet.dst,
                "192.168.44.2".parse::<IpAddr>().unwrap(),
                "{from}"
            );
            assert!(traced.decision.allowed, "{from}");
        }
        // Its own node: the first network it can use is pods (through its NAT bridge).
        let own = t("host-1", "hybrid");
        assert_eq!(own.packet.dst, "10.60.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(own.packet.src, "10.60.0.1".parse::<IpAddr>().unwrap());
        assert!(!own.decision.allowed);
        // A NAT-only workload: outside has no network to it (only port forwards); the
        // address stays its NAT one and the policy still answers for it.
        assert_eq!(
            t("outside", "nat-only").packet.dst,
            "10.60.0.3".parse::<IpAddr>().unwrap()
        );
    }
}

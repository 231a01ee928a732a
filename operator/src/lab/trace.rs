//! `trace`: "from A to B on port P: accepted or denied, by which policy and rule", computed by
//! the policy compiler the agent uses, over a lab file's resources and workloads.

use super::file::{Family, LabFile};
use crate::agent::source::Resources;
use crate::policy::{Compiled, Decision, Member, Packet};
use std::collections::BTreeMap;
use std::net::IpAddr;
use weft_crds::L4Protocol;

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
                labels: w.labels.clone(),
                network: network.clone(),
                ips,
                local: true,
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

/// Where a packet to `to:port` really goes (a node's port forward leads to its target):
/// (address, port, the forward taken).
pub fn resolve(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    name: &str,
    port: u16,
    protocol: L4Protocol,
    family: Family,
) -> Option<(IpAddr, u16, Option<String>)> {
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
                let target = lab
                    .workloads
                    .iter()
                    .filter(|w| w.node == node.name && w.namespace == ns)
                    .find(|w| {
                        if let Some(t) = &pf.spec.target.workload {
                            return t == &w.name;
                        }
                        pf.spec
                            .target
                            .selector
                            .as_ref()
                            .is_some_and(|s| weft_crds::selector_matches(s, &w.labels))
                    })?;
                let member = members
                    .iter()
                    .find(|m| m.name == target.name && m.network == pf.spec.network)?;
                let ip = member.ips.iter().find(|i| i.is_ipv4() == v4)?;
                let to_port = fp.target_port.unwrap_or(port);
                return Some((
                    *ip,
                    to_port,
                    Some(format!(
                        "port forward {ns}/{} on {} to {}:{to_port}",
                        pf.metadata.name.as_deref().unwrap_or(""),
                        node.name,
                        target.name
                    )),
                ));
            }
        }
    }
    Some((address(lab, members, name, family)?, port, None))
}

/// The address of `outside`, a node or a workload in `family`.
pub fn address(lab: &LabFile, members: &[Member], name: &str, family: Family) -> Option<IpAddr> {
    if lab.is_host(name) {
        return lab.host_address(name, family);
    }
    members
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| m.ips.iter())
        .find(|i| i.is_ipv4() == (family == Family::Ipv4))
        .copied()
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
        .or_else(|| address(lab, members, from, family))
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
    let (dst, dport, via) = resolve(lab, res, members, to, port, protocol, family)
        .ok_or_else(|| format!("{to} has no {family:?} address"))?;
    let src = source(lab, res, members, from, dst, family)
        .ok_or_else(|| format!("{from} has no {family:?} address"))?;
    let packet = Packet::first(src, dst, protocol, dport);
    Ok(Traced {
        decision: compiled.decide(&packet),
        packet,
        via,
    })
}

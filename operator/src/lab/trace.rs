//! `trace`: "from A to B on port P: accepted or denied, by which policy and rule", computed by
//! the policy compiler the agent uses, over a lab file's resources and workloads.

use super::file::{Family, LabFile};
use crate::agent::source::Resources;
use crate::policy::{self, Compiled, Decision, Member, Packet};
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

/// Compiles the lab's policies over its members.
pub fn compile(res: &Resources, members: &[Member]) -> Compiled {
    policy::compile_resources(res, members)
}

/// Where a packet to `to:port` really goes: a node's port forward leads to its target.
/// Returns (destination name, address, port, note).
pub fn resolve(
    lab: &LabFile,
    res: &Resources,
    members: &[Member],
    name: &str,
    port: u16,
    protocol: L4Protocol,
    family: Family,
) -> Option<(String, IpAddr, u16, Option<String>)> {
    let v4 = family == Family::Ipv4;
    if name == "outside" {
        let a = if v4 {
            Some(lab.lan.gateway.addr())
        } else {
            lab.lan.gateway6.map(|g| g.addr())
        }?;
        return Some((name.into(), a, port, None));
    }
    if let Some(node) = lab.nodes.iter().find(|n| n.name == name) {
        let addr = if v4 {
            Some(node.address.addr())
        } else {
            node.address6.map(|a| a.addr())
        }?;
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
                    target.name.clone(),
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
        return Some((name.into(), addr, port, None));
    }
    let m = members.iter().find(|m| m.name == name)?;
    let ip = m.ips.iter().find(|i| i.is_ipv4() == v4)?;
    Some((name.into(), *ip, port, None))
}

/// The source address of `name`.
pub fn source_address(
    lab: &LabFile,
    members: &[Member],
    name: &str,
    family: Family,
) -> Option<IpAddr> {
    let v4 = family == Family::Ipv4;
    if name == "outside" {
        return if v4 {
            Some(lab.lan.gateway.addr())
        } else {
            lab.lan.gateway6.map(|g| g.addr())
        };
    }
    if let Some(node) = lab.nodes.iter().find(|n| n.name == name) {
        return if v4 {
            Some(node.address.addr())
        } else {
            node.address6.map(|a| a.addr())
        };
    }
    members
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| m.ips.iter())
        .find(|i| i.is_ipv4() == v4)
        .copied()
}

/// Decides `from -> to:port/protocol`: (the decision, the note on port forwarding).
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
) -> Result<(Decision, Option<String>), String> {
    let src = source_address(lab, members, from, family)
        .ok_or_else(|| format!("{from} has no {family:?} address"))?;
    let (_, dst, dport, note) = resolve(lab, res, members, to, port, protocol, family)
        .ok_or_else(|| format!("{to} has no {family:?} address"))?;
    let packet = Packet {
        src,
        dst,
        protocol,
        port: protocol.has_ports().then_some(dport),
        icmp: (!protocol.has_ports()).then_some((if family == Family::Ipv4 { 8 } else { 128 }, 0)),
    };
    Ok((compiled.decide(&packet), note))
}

//! `trace` against a cluster: the resources the compiler reads, listed from the Kubernetes API,
//! and every workload interface in the Networks' WorkloadSlices (what the agents publish, as
//! far as the controller lets each node vouch for it, with the pods' own labels) — the same
//! inputs the agents compile, so the answer is what the nodes enforce.

use super::Member;
use crate::model::Resources;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, ObjectList};
use kube::core::PartialObjectMeta;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use weft_crds::{ClusterSegmentationPolicy, Network, SegmentationPolicy, WorkloadSlice};

async fn list<K>(client: &Client) -> anyhow::Result<Vec<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let list: ObjectList<K> = api
        .list(&ListParams::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", K::plural(&())))?;
    Ok(list.items)
}

/// Lists Networks, both policy kinds, Namespaces (labels) and WorkloadSlices; the members are
/// the workload interfaces in the slices, each once (a live migration's waiting target is left
/// out: its VM still runs on the source).
pub async fn snapshot(client: &Client) -> anyhow::Result<(Resources, Vec<Member>)> {
    let mut res = Resources {
        networks: list::<Network>(client).await?,
        cluster_policies: list::<ClusterSegmentationPolicy>(client).await?,
        policies: list::<SegmentationPolicy>(client).await?,
        ..Resources::default()
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespaces: ObjectList<PartialObjectMeta<Namespace>> = namespaces
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list namespaces: {e}"))?;
    for ns in namespaces.items {
        if let Some(name) = ns.metadata.name {
            res.namespaces
                .insert(name, ns.metadata.labels.unwrap_or_default());
        }
    }
    let slices = list::<WorkloadSlice>(client).await?;
    let mut members = Vec::new();
    // An entry two crossed writes left in two slices counts once.
    let mut seen = std::collections::HashSet::new();
    for entry in slices.iter().flat_map(|s| &s.spec.workloads) {
        if !entry.workload.active || !seen.insert(entry.key()) {
            continue;
        }
        let w = &entry.workload;
        members.push(Member {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            labels: w.labels.clone(),
            network: w.network.clone(),
            ips: super::with_link_local(
                w.ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                w.mac.as_deref(),
            ),
            local: true,
            port: None,
        });
    }
    Ok((res, members))
}

/// The address `spec` names: an IP address as it is, or a workload as `namespace/name`
/// (optionally `@network`) with an address of the family asked for.
pub fn address(members: &[Member], spec: &str, v6: bool) -> Result<IpAddr, String> {
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (workload, network) = match spec.split_once('@') {
        Some((w, n)) => (w, Some(n)),
        None => (spec, None),
    };
    let Some((namespace, name)) = workload.split_once('/') else {
        return Err(format!(
            "{spec}: name a workload as namespace/name (optionally @network) or give an address"
        ));
    };
    let family = if v6 { "IPv6" } else { "IPv4" };
    let mut found = false;
    for m in members
        .iter()
        .filter(|m| m.namespace == namespace && m.name == name)
        .filter(|m| network.is_none_or(|n| n == m.network))
    {
        found = true;
        // Its own address, not its link-local one (which only its link reaches).
        if let Some(ip) = m
            .ips
            .iter()
            .find(|ip| ip.is_ipv6() == v6 && !is_link_local(ip))
        {
            return Ok(*ip);
        }
    }
    Err(if found {
        format!("{spec} has no {family} address")
    } else {
        format!("{spec}: no such workload in any WorkloadSlice (is it running on a weft network?)")
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// Decides `from -> to:port/protocol` against the cluster and prints it like the lab's trace;
/// whether it is accepted.
pub async fn trace(
    client: &Client,
    from: &str,
    to: &str,
    port: u16,
    protocol: &str,
    v6: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let protocol = super::Packet::parse_protocol(protocol)?;
    let (res, members) = snapshot(client).await?;
    let decision = decide(&res, &members, from, to, port, protocol, v6)?;
    super::print_trace(from, to, port, protocol, &decision, None, json)?;
    Ok(decision.allowed)
}

/// The decision for `from -> to:port/protocol` over listed resources and members, with the
/// compiler the agents use.
pub fn decide(
    res: &Resources,
    members: &[Member],
    from: &str,
    to: &str,
    port: u16,
    protocol: weft_crds::L4Protocol,
    v6: bool,
) -> anyhow::Result<super::Decision> {
    let (compiled, _) = super::compile_members(res, members.to_vec());
    for p in &compiled.problems {
        eprintln!("warning: {p}");
    }
    let src = address(members, from, v6).map_err(|e| anyhow::anyhow!("--from {e}"))?;
    let dst = address(members, to, v6).map_err(|e| anyhow::anyhow!("--to {e}"))?;
    let packet = super::Packet::first(src, dst, protocol, port);
    Ok(compiled.decide(&packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ns: &str, name: &str, network: &str, ips: &[&str]) -> Member {
        Member {
            namespace: ns.into(),
            name: name.into(),
            labels: Default::default(),
            network: network.into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            local: true,
            port: None,
        }
    }

    #[test]
    fn names_workloads_by_namespace_name_and_network() {
        let members = [
            member("shop", "web", "nat", &["10.0.0.2", "fd00::2"]),
            member("shop", "web", "lan", &["192.168.1.20"]),
        ];
        assert_eq!(
            address(&members, "shop/web", false),
            Ok("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            address(&members, "shop/web@lan", false),
            Ok("192.168.1.20".parse().unwrap())
        );
        assert_eq!(
            address(&members, "shop/web", true),
            Ok("fd00::2".parse().unwrap())
        );
        assert_eq!(
            address(&members, "8.8.8.8", false),
            Ok("8.8.8.8".parse().unwrap())
        );
        assert!(
            address(&members, "shop/web@lan", true)
                .unwrap_err()
                .contains("no IPv6 address")
        );
        assert!(
            address(&members, "shop/db", false)
                .unwrap_err()
                .contains("no such workload")
        );
        assert!(
            address(&members, "web", false)
                .unwrap_err()
                .contains("namespace/name")
        );
    }
}

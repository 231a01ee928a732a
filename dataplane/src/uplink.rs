//! Bridge mode's uplink: attaching a node interface (or a VLAN sub-interface weft makes on it)
//! to a network's bridge, moving the node's own addresses and routes from the interface to the
//! bridge, checking that the node still reaches its default gateway, and putting everything back
//! exactly — when the check fails (rollback, within [`VERIFY_TIMEOUT`]) and when the network is
//! removed.
//!
//! Before the first change the interface's addresses and routes are saved to
//! `<state dir>/uplinks/<bridge>.json`, so a crash half-way or an agent restart still knows what
//! to restore. A rolled-back attachment leaves `<bridge>.failed.json`: the same plan is not tried
//! again (each try would cut the node off for a few seconds) until the Network changes or the
//! file is removed.

use crate::links::{ApplyError, ApplyReport, BridgePlan, Links, UplinkPlan};
use crate::names;
use crate::netlink::{LinkInfo, RouteEntry};
use crate::state;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// How long the default gateway has to answer through the bridge before the change is rolled
/// back.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the change settles before the gateway is asked: a switch that reacts to it (port
/// security on the moved addresses, a BPDU guard, an STP recalculation upstream) does so within
/// a fraction of a second; asking at once could declare success just before the node is cut off.
pub const SETTLE: Duration = Duration::from_millis(500);

/// What the uplink held before weft attached it (persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkRecord {
    /// The network.
    pub network: String,
    /// The bridge.
    pub bridge: String,
    /// The interface named in the Network.
    pub device: String,
    /// The attached link (the device or weft's VLAN sub-interface).
    pub port: String,
    /// Whether weft created `port` (a VLAN sub-interface), and deletes it when detaching.
    pub created_port: bool,
    /// The port's addresses (IPv6 link-local ones excepted), moved to the bridge.
    pub addresses: Vec<IpNet>,
    /// The port's routes (kernel-made ones excepted), moved to the bridge.
    pub routes: Vec<RouteEntry>,
    /// Whether the move was done and the gateway answered. A record without it is that of an
    /// attach the agent did not live to finish or check: the next pass does both again (and
    /// rolls back if the gateway does not answer), even with the port already on the bridge.
    /// Records written before the flag existed are of finished attaches.
    #[serde(default = "finished")]
    pub verified: bool,
}

fn finished() -> bool {
    true
}

/// Why an attachment was rolled back (persisted, so the same plan is not retried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackRecord {
    /// The uplink plan that failed, as text.
    pub plan: String,
    /// What failed.
    pub reason: String,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("uplinks")
}

/// Where the record of `bridge`'s uplink lives.
pub fn record_path(state_dir: &Path, bridge: &str) -> PathBuf {
    dir(state_dir).join(format!("{bridge}.json"))
}

fn failed_path(state_dir: &Path, bridge: &str) -> PathBuf {
    dir(state_dir).join(format!("{bridge}.failed.json"))
}

fn plan_text(bridge: &BridgePlan, up: &UplinkPlan) -> String {
    let mut text = format!(
        "bridge {} uplink {} vlan {:?} mtu {}",
        bridge.name, up.device, up.vlan, bridge.mtu
    );
    if let Some(f) = &up.filtering {
        let trunk: Vec<String> = f.trunk.iter().map(ToString::to_string).collect();
        text.push_str(&format!(
            " vlan filtering own {} trunk [{}]",
            f.own,
            trunk.join(",")
        ));
    }
    text
}

/// Reads the record of `bridge`'s uplink, if weft attached one.
pub fn read_record(state_dir: &Path, bridge: &str) -> Option<UplinkRecord> {
    state::read_json(&record_path(state_dir, bridge)).ok()
}

/// The records of every attached uplink.
pub fn records(state_dir: &Path) -> Vec<UplinkRecord> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<UplinkRecord> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.ends_with(".json") && !n.ends_with(".failed.json")
        })
        .filter_map(|e| state::read_json(&e.path()).ok())
        .collect();
    out.sort_by(|a: &UplinkRecord, b| a.bridge.cmp(&b.bridge));
    out
}

fn uplink_err(network: &str, message: String) -> ApplyError {
    ApplyError::Uplink {
        network: network.to_string(),
        message,
    }
}

/// The gateway to check and the address to ask from: the IPv4 default route's next hop, and the
/// moved address in its subnet (or any moved IPv4 address).
/// The default gateway to check and the address to ask from: IPv4 (ARP) when the node has an
/// IPv4 default route through the uplink, else IPv6 (neighbour discovery; from the node's
/// IPv6 address on the uplink, or the link-local address of `mac` when it has none but the
/// kernel's).
fn gateway_check(record: &UplinkRecord, mac: [u8; 6]) -> Option<(IpAddr, IpAddr)> {
    let default = |v6: bool| {
        record.routes.iter().find_map(|r| match r.gateway {
            Some(g) if r.dst.prefix_len() == 0 && r.table == 254 && g.is_ipv6() == v6 => Some(g),
            _ => None,
        })
    };
    let source = |gw: IpAddr| {
        let same: Vec<&IpNet> = record
            .addresses
            .iter()
            .filter(|a| a.addr().is_ipv6() == gw.is_ipv6())
            .collect();
        same.iter()
            .find(|n| n.contains(&gw))
            .or_else(|| same.first())
            .map(|n| n.addr())
    };
    if let Some(gw) = default(false) {
        return Some((gw, source(gw)?));
    }
    let gw = default(true)?;
    let src = source(gw).unwrap_or(IpAddr::V6(names::eui64_link_local(mac)));
    Some((gw, src))
}

fn is_kernel_managed(addr: &IpNet) -> bool {
    matches!(addr, IpNet::V6(n) if (n.addr().segments()[0] & 0xffc0) == 0xfe80)
}

/// Attaches `bridge`'s uplink to the bridge (link `bridge_index`), see the module docs.
/// Idempotent: an uplink already attached to this bridge is left alone.
pub fn attach(
    bridge: &BridgePlan,
    bridge_index: u32,
    existing: &[LinkInfo],
    links: &mut dyn Links,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let Some(up) = &bridge.uplink else {
        return Ok(());
    };
    let net = bridge.network.as_str();
    let device = existing.iter().find(|l| l.name == up.device).ok_or_else(|| {
        uplink_err(
            net,
            format!(
                "spec.bridge.uplink: interface {} does not exist on this node; create it, or exclude the node with spec.nodeSelector",
                up.device
            ),
        )
    })?;
    let port_name = up.port();
    let mut created_port = false;
    let port = match (up.vlan, existing.iter().find(|l| l.name == port_name)) {
        (None, _) => device.clone(),
        (Some(_), Some(l)) => {
            let alias = vlan_alias(net);
            if l.alias.as_deref() != Some(alias.as_str()) && l.master != Some(bridge_index) {
                return Err(ApplyError::ForeignLink {
                    name: l.name.clone(),
                    alias: l.alias.clone(),
                });
            }
            created_port = true;
            l.clone()
        }
        (Some(id), None) => {
            let index = links
                .create_vlan(&port_name, device.index, id, &vlan_alias(net))
                .map_err(|e| match e {
                    ApplyError::Link { source, .. } if source.is_not_supported() => uplink_err(
                        net,
                        format!(
                            "spec.bridge.vlan: this node's kernel has no 802.1Q VLAN support (module 8021q); load it or remove spec.bridge.vlan ({source})"
                        ),
                    ),
                    other => other,
                })?;
            report.changes.push(format!(
                "created vlan {port_name} (id {id} on {})",
                up.device
            ));
            created_port = true;
            let mut l = device.clone();
            l.index = index;
            l.name = port_name.clone();
            l.master = None;
            l.up = false;
            l
        }
    };
    if let Some(mac) = port.mac {
        // The bridge takes the uplink's MAC: the node keeps its identity on the LAN (switch port
        // security, DHCP reservations, neighbours' ARP caches).
        let current = existing
            .iter()
            .find(|l| l.index == bridge_index)
            .and_then(|l| l.mac);
        if current != Some(mac) {
            links.set_mac(bridge_index, mac)?;
        }
    }
    let earlier = read_record(state_dir, &bridge.name);
    let unverified = earlier
        .as_ref()
        .is_some_and(|r| r.port == port.name && !r.verified);
    match port.master {
        // Attached, and checked unless an interrupted attach left its record unverified.
        Some(m) if m == bridge_index && !unverified => return Ok(()),
        Some(m) if m == bridge_index => {}
        Some(m) => {
            let other = existing
                .iter()
                .find(|l| l.index == m)
                .map(|l| l.name.clone())
                .unwrap_or_else(|| m.to_string());
            return Err(uplink_err(
                net,
                format!(
                    "spec.bridge.uplink: {} is already attached to {other}; weft attaches only a free interface (or a VLAN of it)",
                    port.name
                ),
            ));
        }
        None => {}
    }
    // A record of this port is an earlier interrupted attach's (it holds the original state);
    // one of another port means the Network moved to another interface or VLAN: give that one
    // back first.
    let earlier = match earlier {
        Some(r) if r.port == port.name => Some(r),
        Some(old) => {
            detach(&old, links, state_dir, report)?;
            None
        }
        None => None,
    };
    let failed = failed_path(state_dir, &bridge.name);
    let text = plan_text(bridge, up);
    if let Ok(prev) = state::read_json::<RollbackRecord>(&failed) {
        if prev.plan == text {
            // A record left beside the marker is a rollback that did not finish (a route the
            // kernel refused, a link busy): it is tried again at every pass until it does.
            if let Some(record) = &earlier
                && let Err(e) = detach(record, links, state_dir, report)
            {
                warn!(network = net, port = %port.name, error = %e, "the uplink's rollback is still not complete");
            }
            return Err(uplink_err(
                net,
                format!(
                    "attaching {} was rolled back earlier ({}); not retried until the Network changes or {} is removed",
                    port.name,
                    prev.reason,
                    failed.display()
                ),
            ));
        }
        state::remove_file(&failed).map_err(ApplyError::State)?;
    }

    // 1. Save what the port holds (an earlier interrupted attach's record wins).
    let record = match earlier {
        Some(r) => r,
        None => {
            let addresses: Vec<IpNet> = links
                .addresses(port.index)?
                .into_iter()
                .filter(|a| !is_kernel_managed(a))
                .collect();
            let routes = links.routes_via(port.index)?;
            let r = UplinkRecord {
                network: net.to_string(),
                bridge: bridge.name.clone(),
                device: up.device.clone(),
                port: port.name.clone(),
                created_port,
                addresses,
                routes,
                verified: false,
            };
            state::write_json(&record_path(state_dir, &bridge.name), &r)
                .map_err(ApplyError::State)?;
            r
        }
    };
    // 2. Move.
    let moved = move_to_bridge(&record, port.index, bridge_index, links);
    // 3. Verify.
    let verdict = match moved {
        Err(e) => Err(format!("moving the node's addresses failed: {e}")),
        Ok(()) => match gateway_check(&record, port.mac.unwrap_or(bridge.mac)) {
            None => Ok("no default gateway to check".to_string()),
            Some((gw, src)) => {
                let mac = port.mac.unwrap_or(bridge.mac);
                match links.probe_gateway(bridge_index, mac, src, gw, VERIFY_TIMEOUT) {
                    Ok(true) => Ok(format!("gateway {gw} answers")),
                    Ok(false) => Err(format!(
                        "the default gateway {gw} did not answer through {} within {}s",
                        bridge.name,
                        VERIFY_TIMEOUT.as_secs()
                    )),
                    Err(e) => Err(format!("checking the default gateway {gw} failed: {e}")),
                }
            }
        },
    };
    match verdict {
        Ok(how) => {
            if !record.verified {
                let done = UplinkRecord {
                    verified: true,
                    ..record.clone()
                };
                state::write_json(&record_path(state_dir, &bridge.name), &done)
                    .map_err(ApplyError::State)?;
            }
            info!(network = net, port = %port.name, bridge = %bridge.name, %how, "uplink attached");
            report.changes.push(format!(
                "uplink {} attached to bridge {} ({} addresses, {} routes moved; {how})",
                port.name,
                bridge.name,
                record.addresses.len(),
                record.routes.len()
            ));
            Ok(())
        }
        Err(reason) => {
            warn!(network = net, port = %port.name, %reason, "rolling the uplink change back");
            let restored = detach(&record, links, state_dir, report);
            state::write_json(
                &failed,
                &RollbackRecord {
                    plan: text,
                    reason: reason.clone(),
                },
            )
            .map_err(ApplyError::State)?;
            restored?;
            Err(uplink_err(
                net,
                format!(
                    "attaching {} to {} was rolled back: {reason}; the node's addresses and routes are back on {}",
                    port.name, bridge.name, port.name
                ),
            ))
        }
    }
}

fn move_to_bridge(
    record: &UplinkRecord,
    port: u32,
    bridge: u32,
    links: &mut dyn Links,
) -> Result<(), ApplyError> {
    links.set_master(port, Some(bridge))?;
    links.set_up(port)?;
    links.set_up(bridge)?;
    let on_bridge = links.addresses(bridge)?;
    for a in &record.addresses {
        links.del_address(port, *a)?;
        if !on_bridge.contains(a) {
            links.add_address(bridge, *a)?;
        }
    }
    for r in RouteEntry::in_order(&record.routes) {
        links.replace_route(r, bridge)?;
        links.del_route(r, port)?;
    }
    Ok(())
}

/// Gives the uplink of `record` back: routes and addresses return to the port, the port leaves
/// the bridge, weft's VLAN sub-interface is deleted, and the record is removed. Best effort per
/// step (a missing link or address is fine); the first error is returned after every step ran.
pub fn detach(
    record: &UplinkRecord,
    links: &mut dyn Links,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let all = links.list()?;
    let port = all.iter().find(|l| l.name == record.port).map(|l| l.index);
    let bridge = all
        .iter()
        .find(|l| l.name == record.bridge)
        .map(|l| l.index);
    let mut first: Option<ApplyError> = None;
    let mut note = |r: Result<(), ApplyError>| {
        if let Err(e) = r
            && first.is_none()
        {
            first = Some(e);
        }
    };
    if let Some(b) = bridge {
        for r in RouteEntry::in_order(&record.routes).into_iter().rev() {
            note(links.del_route(r, b));
        }
        let have = links.addresses(b).unwrap_or_default();
        for a in record.addresses.iter().filter(|a| have.contains(a)) {
            note(links.del_address(b, *a));
        }
    }
    if let Some(p) = port {
        note(links.set_master(p, None));
        if record.created_port {
            note(links.delete_link(p));
        } else {
            let have = links.addresses(p).unwrap_or_default();
            for a in record.addresses.iter().filter(|a| !have.contains(a)) {
                note(links.add_address(p, *a));
            }
            // In the order the kernel takes them; one refused (its next hop not reachable
            // yet through routes restored after it) is tried once more after the others.
            let mut refused = Vec::new();
            for r in RouteEntry::in_order(&record.routes) {
                if links.replace_route(r, p).is_err() {
                    refused.push(r);
                }
            }
            for r in refused {
                note(links.replace_route(r, p));
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => {
            state::remove_file(&record_path(state_dir, &record.bridge))
                .map_err(ApplyError::State)?;
            report.changes.push(format!(
                "uplink {} detached from bridge {} ({} addresses, {} routes restored)",
                record.port,
                record.bridge,
                record.addresses.len(),
                record.routes.len()
            ));
            Ok(())
        }
    }
}

/// Forgets rollback markers (the agent's cleanup: a fresh start retries every uplink).
pub fn forget_rollbacks(state_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir(state_dir)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".failed.json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The alias of a VLAN sub-interface weft made for `network`.
pub fn vlan_alias(network: &str) -> String {
    format!("{}vlan:{network}", names::ALIAS_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_ports_are_named_like_the_kernel_or_hashed_when_too_long() {
        let p = |d: &str, v| {
            UplinkPlan {
                device: d.into(),
                vlan: v,
                filtering: None,
            }
            .port()
        };
        assert_eq!(p("eth1", None), "eth1");
        assert_eq!(p("eth1", Some(10)), "eth1.10");
        let long = p("enp0s31f6abcd", Some(4000));
        assert!(long.starts_with("wv") && long.ends_with(".4000"), "{long}");
        assert!(long.len() <= 15, "{long}");
        assert_ne!(long, p("enp0s31f6abce", Some(4000)));
    }

    #[test]
    fn the_gateway_checked_is_the_main_default_route_next_hop_from_its_subnet() {
        let route = |dst: &str, gw: Option<&str>, table| RouteEntry {
            dst: dst.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            table,
            protocol: 4,
            scope: 0,
            metric: None,
            prefsrc: None,
            onlink: false,
            metrics: Vec::new(),
        };
        let mut r = UplinkRecord {
            network: "lan".into(),
            bridge: "br".into(),
            device: "eth0".into(),
            port: "eth0".into(),
            created_port: false,
            addresses: vec![
                "10.9.0.5/24".parse().unwrap(),
                "192.168.1.5/24".parse().unwrap(),
            ],
            routes: vec![
                route("10.0.0.0/8", Some("10.9.0.1"), 254),
                route("0.0.0.0/0", Some("192.168.1.9"), 100),
            ],
            verified: true,
        };
        let mac = [0x02, 0, 0, 0, 0, 1];
        assert_eq!(
            gateway_check(&r, mac),
            None,
            "only the main table's default route"
        );
        // IPv6 only: neighbour discovery, from the node's address or else its link-local one.
        r.routes.push(route("::/0", Some("fe80::1"), 254));
        assert_eq!(
            gateway_check(&r, mac),
            Some((
                "fe80::1".parse().unwrap(),
                "fe80::ff:fe00:1".parse().unwrap()
            ))
        );
        r.addresses.push("fd09::5/64".parse().unwrap());
        assert_eq!(
            gateway_check(&r, mac),
            Some(("fe80::1".parse().unwrap(), "fd09::5".parse().unwrap()))
        );
        // IPv4 first when there is both.
        r.routes.push(route("0.0.0.0/0", Some("192.168.1.1"), 254));
        assert_eq!(
            gateway_check(&r, mac),
            Some((
                "192.168.1.1".parse().unwrap(),
                "192.168.1.5".parse().unwrap()
            ))
        );
    }
}

//! The node plan (what the kernel of one node should hold for weft) and its idempotent apply.
//!
//! The agent computes a [`NodePlan`] with a pure function from the resources; [`apply`] makes
//! the kernel match it through two small I/O traits ([`Links`] and [`crate::nft::Firewall`]), so
//! the same code drives a real node, a lab node namespace, and the fakes of the unit tests.
//! Applying the same plan twice changes nothing the second time: the report is empty, no link is
//! touched and no nftables transaction is sent.

use crate::links::{ApplyError, ApplyReport, BridgePlan, Links};
use crate::names;
use crate::netlink::{LinkInfo, Netlink, NetlinkError, RouteEntry};
use crate::nft::{self, Firewall, Table};
use crate::state::{self, NetworkState};
use crate::uplink;
use crate::vlan::PortVlan;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

/// A workload's host-side port (the veth end the CNI made and attached, `wf…`) and what weft
/// keeps on it: its bridge, and on a VLAN-filtering bridge its VLANs. Hairpin mode is on for
/// every weft port (see [`apply`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortPlan {
    /// The link, e.g. `wf0123456789a`.
    pub name: String,
    /// Its network (the link's alias names it too: only a link whose alias says so is touched).
    pub network: String,
    /// The network's bridge.
    pub bridge: String,
    /// On a VLAN-filtering bridge, the VLANs the port carries tagged besides the network's own
    /// (the attachment's `vlanTrunk` that the network allows); empty for an access port.
    pub trunk: Vec<u16>,
}

/// A sysctl the node needs (forwarding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlPlan {
    /// Dotted key, e.g. `net.ipv4.ip_forward`.
    pub key: String,
    /// Value.
    pub value: String,
    /// Set back when no plan names it any more: the value it replaced is kept in the state
    /// directory ([`SYSCTL_RECORDS`]) until then, and [`cleanup`] sets it back too. For a
    /// setting that only a feature needs and that changes how the whole node behaves (loose
    /// TCP tracking off for a SYN proxy); forwarding, which other software on a node relies on
    /// once on, stays.
    pub restore: bool,
}

/// The folder of the state directory that holds, per sysctl set with
/// [`SysctlPlan::restore`], the value it had before (one file named by the key).
pub const SYSCTL_RECORDS: &str = "sysctl-before";

/// Everything weft wants on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// The node.
    pub node: String,
    /// The bridges of the networks that select this node.
    pub bridges: Vec<BridgePlan>,
    /// Sysctls.
    pub sysctls: Vec<SysctlPlan>,
    /// weft's nftables table (`inet weft`): NAT, port forwards, isolation, policy.
    pub firewall: Table,
    /// weft's bridge-family table (`bridge weft`): per-port anti-spoofing of bridged frames.
    /// `None` removes it.
    pub guard: Option<Table>,
    /// Runtime state for the CNI, one per network.
    pub networks: Vec<NetworkState>,
    /// The host-side ports of the workloads of these networks, sorted: a port that is not a
    /// port of its bridge (the bridge was deleted and made again, which releases its ports) is
    /// attached again. The CNI attaches new ones itself.
    pub ports: Vec<PortPlan>,
}

impl NodePlan {
    /// Whether `other` wants the same links, sysctls, ports and CNI state as this plan, so that
    /// going from one to the other changes weft's nftables tables only.
    pub fn same_but_tables(&self, other: &NodePlan) -> bool {
        self.node == other.node
            && self.bridges == other.bridges
            && self.sysctls == other.sysctls
            && self.networks == other.networks
            && self.ports == other.ports
    }
}

fn link_err(op: impl Into<String>) -> impl FnOnce(NetlinkError) -> ApplyError {
    let op = op.into();
    move |source| ApplyError::Link { op, source }
}

impl Links for Netlink {
    fn list(&mut self) -> Result<Vec<LinkInfo>, ApplyError> {
        self.links().map_err(link_err("list links"))
    }
    fn create_bridge(
        &mut self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
        alias: &str,
    ) -> Result<u32, ApplyError> {
        Netlink::create_bridge(self, name, Some(mtu), Some(mac), Some(alias))
            .map_err(link_err(format!("create bridge {name}")))
    }
    fn set_up(&mut self, index: u32) -> Result<(), ApplyError> {
        Netlink::set_up(self, index).map_err(link_err(format!("set link {index} up")))
    }
    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), ApplyError> {
        Netlink::set_mtu(self, index, mtu).map_err(link_err(format!("set mtu of link {index}")))
    }
    fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), ApplyError> {
        Netlink::set_mac(self, index, mac).map_err(link_err(format!("set mac of link {index}")))
    }
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, ApplyError> {
        Ok(Netlink::addresses(self, Some(index))
            .map_err(link_err(format!("list addresses of link {index}")))?
            .into_iter()
            .map(|a| a.addr)
            .collect())
    }
    fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError> {
        Netlink::add_address(self, index, addr, true)
            .map(|_| ())
            .map_err(link_err(format!("add {addr} to link {index}")))
    }
    fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError> {
        Netlink::del_address(self, index, addr)
            .map(|_| ())
            .map_err(link_err(format!("remove {addr} from link {index}")))
    }
    fn delete_link(&mut self, index: u32) -> Result<(), ApplyError> {
        Netlink::delete_link(self, index)
            .map(|_| ())
            .map_err(link_err(format!("delete link {index}")))
    }
    fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), ApplyError> {
        Netlink::set_master(self, index, master)
            .map_err(link_err(format!("set master of link {index}")))
    }
    fn routes_via(&mut self, index: u32) -> Result<Vec<RouteEntry>, ApplyError> {
        Netlink::routes_via(self, index).map_err(link_err(format!("list routes of link {index}")))
    }
    fn replace_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError> {
        Netlink::replace_route_entry(self, route, oif)
            .map_err(link_err(format!("add route {route} dev {oif}")))
    }
    fn del_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError> {
        Netlink::del_route_entry(self, route, oif)
            .map(|_| ())
            .map_err(link_err(format!("delete route {route} dev {oif}")))
    }
    fn create_vlan(
        &mut self,
        name: &str,
        parent: u32,
        id: u16,
        alias: &str,
    ) -> Result<u32, ApplyError> {
        Netlink::create_vlan(self, name, parent, id, None, Some(alias))
            .map_err(link_err(format!("create vlan {name}")))
    }
    fn set_vlan_filtering(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        Netlink::set_vlan_filtering(self, index, on).map_err(link_err(format!(
            "set vlan_filtering {} on bridge {index}",
            u8::from(on)
        )))
    }
    fn set_bridge_safeguards(&mut self, index: u32) -> Result<(), ApplyError> {
        Netlink::set_bridge_safeguards(self, index).map_err(link_err(format!(
            "set the safeguards (no_linklocal_learn, nf_call_iptables, nf_call_ip6tables) of bridge {index}"
        )))
    }
    fn set_multicast_snooping(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        Netlink::set_multicast_snooping(self, index, on).map_err(link_err(format!(
            "set mcast_snooping {} on bridge {index}",
            u8::from(on)
        )))
    }
    fn set_port_hairpin(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        Netlink::set_port_hairpin(self, index, on).map_err(link_err(format!(
            "set hairpin {} on port {index}",
            if on { "on" } else { "off" }
        )))
    }
    fn port_vlans(&mut self) -> Result<BTreeMap<u32, Vec<PortVlan>>, ApplyError> {
        Netlink::all_port_vlans(self).map_err(link_err("list bridge port vlans"))
    }
    fn change_port_vlans(
        &mut self,
        index: u32,
        add: &[PortVlan],
        del: &[u16],
    ) -> Result<(), ApplyError> {
        Netlink::change_port_vlans(self, index, add, del)
            .map_err(link_err(format!("set vlans of port {index}")))
    }
    fn probe_gateway(
        &mut self,
        index: u32,
        mac: [u8; 6],
        src: std::net::IpAddr,
        gateway: std::net::IpAddr,
        timeout: std::time::Duration,
    ) -> Result<bool, ApplyError> {
        use std::net::IpAddr;
        // Let the change settle first (see `uplink::SETTLE`). The packet socket lives in the
        // calling thread's namespace: the agent's own (the lab's agents enter their node
        // namespace at start).
        std::thread::sleep(uplink::SETTLE);
        let answered = match (src, gateway) {
            (IpAddr::V4(s), IpAddr::V4(g)) => crate::frame::probe_arp(index, mac, s, g, timeout),
            (IpAddr::V6(s), IpAddr::V6(g)) => crate::frame::probe_ndp(index, mac, s, g, timeout),
            _ => Err(std::io::Error::other(
                "source and gateway of different families",
            )),
        };
        answered.map_err(|e| ApplyError::Link {
            op: format!("probe gateway {gateway}"),
            source: NetlinkError::Io {
                op: "probe gateway",
                target: format!("link {index}"),
                source: e,
            },
        })
    }
}

/// Sets sysctls (real: /proc/sys; fake in tests).
pub trait Sysctls {
    /// Sets `key` to `value`; returns whether it changed.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, ApplyError>;
    /// Reads `key`.
    fn get(&mut self, key: &str) -> Result<String, ApplyError>;
}

/// The real sysctls of the calling thread's network namespace.
#[derive(Debug, Default)]
pub struct ProcSysctls;

impl Sysctls for ProcSysctls {
    fn set(&mut self, key: &str, value: &str) -> Result<bool, ApplyError> {
        crate::sysctl::set_if_different(key, value).map_err(|source| ApplyError::Sysctl {
            key: key.to_string(),
            source,
        })
    }

    fn get(&mut self, key: &str) -> Result<String, ApplyError> {
        crate::sysctl::get(key).map_err(|source| ApplyError::Sysctl {
            key: key.to_string(),
            source,
        })
    }
}

/// The record of `key`'s value before weft set it (see [`SysctlPlan::restore`]); `None` for a
/// key that cannot be a file name (and for the temporary files of an atomic write, which begin
/// with a dot).
fn sysctl_record(state_dir: &Path, key: &str) -> Option<std::path::PathBuf> {
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !key.starts_with('.');
    valid.then(|| state_dir.join(SYSCTL_RECORDS).join(key))
}

/// Sets the plan's sysctls; for one to restore, first records the value it replaces (unless a
/// record is there already: the value before weft's first change is the one to go back to).
/// Then sets back every recorded sysctl the plan no longer names, and forgets its record.
fn apply_sysctls(
    plan: &[SysctlPlan],
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    for s in plan {
        if s.restore
            && let Some(record) = sysctl_record(state_dir, &s.key)
            && !record.exists()
        {
            let before = sysctls.get(&s.key)?;
            if before.trim() != s.value.trim() {
                state::write_atomic(&record, before.as_bytes()).map_err(ApplyError::State)?;
            }
        }
        if sysctls.set(&s.key, &s.value)? {
            report.changes.push(format!("sysctl {}={}", s.key, s.value));
        }
    }
    restore_sysctls(
        |key| plan.iter().any(|s| s.restore && s.key == key),
        sysctls,
        state_dir,
        report,
    )
}

/// Sets every recorded sysctl that `keep` does not name back to its value before weft, and
/// removes its record.
fn restore_sysctls(
    keep: impl Fn(&str) -> bool,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let Ok(dir) = std::fs::read_dir(state_dir.join(SYSCTL_RECORDS)) else {
        return Ok(());
    };
    for entry in dir.flatten() {
        let Some(key) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if keep(&key) || sysctl_record(state_dir, &key).is_none() {
            continue;
        }
        let path = entry.path();
        let before = std::fs::read_to_string(&path).map_err(|source| {
            ApplyError::State(state::StateError::Read {
                path: path.clone(),
                source,
            })
        })?;
        if sysctls.set(&key, before.trim())? {
            report
                .changes
                .push(format!("sysctl {key}={} (restored)", before.trim()));
        }
        state::remove_file(&path).map_err(ApplyError::State)?;
    }
    Ok(())
}

/// The addresses of the node's own interfaces (every link but loopback and weft's, weft's
/// bridges that carry the node's uplink included) and the next hops of their routes, each with
/// its interface's name and what it is (`address 10.0.0.5/24`, `gateway 10.0.0.1`); IPv6
/// link-local ones left out.
fn node_addresses_of(
    existing: &[LinkInfo],
    links: &mut dyn Links,
    state_dir: &Path,
) -> Result<Vec<(String, IpAddr, String)>, ApplyError> {
    let mut out = Vec::new();
    for l in existing.iter().filter(|l| {
        l.name != "lo"
            && (!l
                .alias
                .as_deref()
                .is_some_and(|a| a.starts_with(names::ALIAS_PREFIX))
                || uplink::read_record(state_dir, &l.name).is_some())
    }) {
        for a in links.addresses(l.index)? {
            if !kernel_managed(&a) {
                out.push((l.name.clone(), a.addr(), format!("address {a}")));
            }
        }
        for r in links.routes_via(l.index)? {
            if let Some(g) = r.gateway.filter(|g| !kernel_managed(&IpNet::from(*g))) {
                out.push((l.name.clone(), g, format!("gateway {g}")));
            }
        }
    }
    Ok(out)
}

/// Is an address one the kernel manages by itself (IPv6 link-local)?
fn kernel_managed(addr: &IpNet) -> bool {
    match addr {
        IpNet::V6(n) => (n.addr().segments()[0] & 0xffc0) == 0xfe80,
        IpNet::V4(_) => false,
    }
}

/// Makes the node match `plan`: sysctls, bridges and their addresses, the nftables table (an
/// element-only transaction when only elements differ, an atomic table replace otherwise, nothing
/// when equal) and the runtime state files. Links and state of networks no longer in the plan are
/// removed. Only links carrying weft's alias and weft's own table are ever touched.
pub fn apply(
    plan: &NodePlan,
    links: &mut dyn Links,
    firewall: &mut dyn Firewall,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
) -> Result<ApplyReport, ApplyError> {
    apply_trusting(plan, None, links, firewall, sysctls, state_dir)
}

/// [`apply`], each table trusted as [`apply_firewall_trusting`] does when `trusted` (the plan
/// applied last) is given.
fn apply_trusting(
    plan: &NodePlan,
    trusted: Option<&NodePlan>,
    links: &mut dyn Links,
    firewall: &mut dyn Firewall,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
) -> Result<ApplyReport, ApplyError> {
    let mut report = ApplyReport::default();
    apply_sysctls(&plan.sysctls, sysctls, state_dir, &mut report)?;
    apply_bridges(plan, links, state_dir, &mut report)?;
    // The guard first: a new port is never bridged before its anti-spoofing is in place (and
    // a port that left its bridge goes back only once both tables are).
    match &plan.guard {
        Some(guard) => apply_firewall_trusting(
            guard,
            trusted.and_then(|t| t.guard.as_ref()),
            firewall,
            &mut report,
        )?,
        None => delete_table(nft::Family::Bridge, names::NFT_TABLE, firewall, &mut report)?,
    }
    apply_firewall_trusting(
        &plan.firewall,
        trusted.map(|t| &t.firewall),
        firewall,
        &mut report,
    )?;
    apply_ports(plan, links, &mut report)?;
    apply_state(plan, state_dir, &mut report)?;
    Ok(report)
}

/// [`apply`] for a periodic check of a node that holds `previous` (the plan this process
/// applied last): links, addresses, sysctls and state as [`apply`], but a table whose structure
/// set still names `previous`'s structure (one set read, without elements) is trusted to hold
/// `previous`'s elements, so only the element changes go and a table of many thousand elements
/// is not listed. A table deleted or changed by hand (its structure set is gone) is listed and
/// repaired; elements deleted by hand are repaired by the next full [`apply`].
pub fn apply_checked(
    plan: &NodePlan,
    previous: Option<&NodePlan>,
    links: &mut dyn Links,
    firewall: &mut dyn Firewall,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
) -> Result<ApplyReport, ApplyError> {
    apply_trusting(plan, previous, links, firewall, sysctls, state_dir)
}

/// Like [`apply`], but trusts that the node still holds `previous` (the plan this process applied
/// last): when only set and map elements differ, both tables go from `previous` to `plan` in
/// one element-only transaction without listing them first, which keeps a registration cheap
/// however many elements the tables hold. Anything else (no previous plan, other bridges,
/// sysctls or table structure) takes the full [`apply`]. Other ports need no link work: the CNI
/// attached a new one, and DEL deletes a removed one. A node changed by hand since is repaired
/// by the next full apply (the agent's periodic resync).
pub fn apply_since(
    plan: &NodePlan,
    previous: Option<&NodePlan>,
    links: &mut dyn Links,
    firewall: &mut dyn Firewall,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
) -> Result<ApplyReport, ApplyError> {
    let Some(prev) = previous.filter(|p| p.bridges == plan.bridges && p.sysctls == plan.sysctls)
    else {
        return apply(plan, links, firewall, sysctls, state_dir);
    };
    // `diff` answers a structure change with a table replace: that takes the full apply.
    let mut changes = match (&prev.guard, &plan.guard) {
        (Some(a), Some(b)) => nft::diff(a, b).0,
        (None, None) => Vec::new(),
        _ => return apply(plan, links, firewall, sysctls, state_dir),
    };
    changes.extend(nft::diff(&prev.firewall, &plan.firewall).0);
    if changes
        .iter()
        .any(|c| matches!(c, nft::Change::ReplaceTable(_)))
    {
        return apply(plan, links, firewall, sysctls, state_dir);
    }
    let mut report = ApplyReport::default();
    if !changes.is_empty() {
        let tx = nft::Transaction(changes);
        firewall.apply(&tx).map_err(ApplyError::Firewall)?;
        report.changes.extend(tx.0.iter().map(|c| c.summary()));
    }
    apply_state(plan, state_dir, &mut report)?;
    Ok(report)
}

fn apply_bridges(
    plan: &NodePlan,
    links: &mut dyn Links,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let mut existing = links.list()?;
    // The node's own addresses, read once, when a NAT bridge is to get an address.
    let mut node_addresses: Option<Vec<(String, IpAddr, String)>> = None;
    let planned: BTreeSet<String> = plan
        .bridges
        .iter()
        .map(|b| names::bridge_alias(&b.network))
        .collect();
    for bridge in &plan.bridges {
        let alias = names::bridge_alias(&bridge.network);
        // The bridge of a Network no longer planned, under the name this one takes (a Network
        // re-created under another name, both seen in one pass): it goes first, its uplink
        // given back.
        if let Some(stale) = existing.iter().find(|l| {
            l.name == bridge.name
                && l.kind.as_deref() == Some("bridge")
                && l.alias.as_deref().is_some_and(|a| {
                    a != alias
                        && a.starts_with(&format!("{}net:", names::ALIAS_PREFIX))
                        && !planned.contains(a)
                })
        }) {
            if let Some(record) = uplink::read_record(state_dir, &stale.name) {
                uplink::detach(&record, links, state_dir, report)?;
            }
            links.delete_link(stale.index)?;
            report.changes.push(format!(
                "deleted bridge {} (its network removed; the name is network {}'s now)",
                stale.name, bridge.network
            ));
            existing = links.list()?;
        }
        // A bridge that carried an uplink while the plan has none for it now (the Network
        // re-created in another mode under the same bridge name): the node's addresses go
        // back to the uplink before anything on the bridge is changed.
        if bridge.uplink.is_none()
            && let Some(record) = uplink::read_record(state_dir, &bridge.name)
        {
            uplink::detach(&record, links, state_dir, report)?;
            existing = links.list()?;
        }
        // The bridge's addresses now (none when it is still to be made): nothing below
        // changes them before they are made what the plan says.
        let have: BTreeSet<IpNet> = match existing.iter().find(|l| l.name == bridge.name) {
            Some(l) => links.addresses(l.index)?.into_iter().collect(),
            None => BTreeSet::new(),
        };
        // A NAT bridge about to get an address: never one whose subnet holds an address of
        // the node's own interfaces or the next hop of their routes, whose traffic the
        // bridge's route would take.
        if bridge.uplink.is_none() {
            let new: Vec<&IpNet> = bridge
                .addresses
                .iter()
                .filter(|a| !have.contains(a))
                .collect();
            if !new.is_empty() {
                if node_addresses.is_none() {
                    node_addresses = Some(node_addresses_of(&existing, links, state_dir)?);
                }
                let clash = node_addresses
                    .iter()
                    .flatten()
                    .find_map(|(dev, addr, what)| {
                        new.iter()
                            .find(|w| w.trunc().contains(addr))
                            .map(|w| (dev, what, w))
                    });
                if let Some((dev, what, w)) = clash {
                    report.failed.push((
                        bridge.network.clone(),
                        format!(
                            "spec.subnets: {} holds this node's {what} on {dev}: the bridge's route would take the node's own traffic; give the Network a subnet no node uses (delete it and create it again) or leave this node out with spec.nodeSelector",
                            w.trunc()
                        ),
                    ));
                    continue;
                }
            }
        }
        let index = match existing.iter().find(|l| l.name == bridge.name) {
            Some(link) => {
                if link.alias.as_deref() != Some(alias.as_str())
                    || link.kind.as_deref() != Some("bridge")
                {
                    // Someone else's link under the name: this Network fails here, the
                    // others are applied.
                    let e = ApplyError::ForeignLink {
                        name: link.name.clone(),
                        alias: link.alias.clone(),
                    };
                    report
                        .failed
                        .push((bridge.network.clone(), crate::error_chain(&e)));
                    continue;
                }
                if link.mtu != bridge.mtu {
                    links.set_mtu(link.index, bridge.mtu)?;
                    report
                        .changes
                        .push(format!("bridge {} mtu {}", bridge.name, bridge.mtu));
                }
                // With an uplink the bridge wears the uplink's MAC (set by `uplink::attach`).
                if bridge.uplink.is_none() && link.mac != Some(bridge.mac) {
                    links.set_mac(link.index, bridge.mac)?;
                    report.changes.push(format!(
                        "bridge {} mac {}",
                        bridge.name,
                        names::format_mac(bridge.mac)
                    ));
                }
                if !link.up {
                    links.set_up(link.index)?;
                    report.changes.push(format!("bridge {} up", bridge.name));
                }
                // A bridge made before weft created them with its safeguards.
                if link.link_local_learning == Some(true) || link.netfilter_calls == Some(false) {
                    links.set_bridge_safeguards(link.index)?;
                    report.changes.push(format!(
                        "bridge {} no_linklocal_learn 1 nf_call_iptables 1 nf_call_ip6tables 1",
                        bridge.name
                    ));
                }
                link.index
            }
            None => {
                let index = links.create_bridge(&bridge.name, bridge.mtu, bridge.mac, &alias)?;
                links.set_up(index)?;
                report
                    .changes
                    .push(format!("created bridge {}", bridge.name));
                existing = links.list()?;
                index
            }
        };
        // IGMP and MLD snooping only on a bridge with an uplink, whose LAN has a querier for
        // it. weft's own segment has none: there the bridge floods every group whatever it
        // learnt, and snooping costs each port's change a pass over every port's multicast
        // state (with its query timers restarted), a cost of every pod's ADD that grows with
        // the pods on the node.
        let current = existing.iter().find(|l| l.index == index);
        let snooping = bridge.uplink.is_some();
        let snoops = current.and_then(|l| l.multicast_snooping);
        if snoops.is_some_and(|on| on != snooping) {
            links.set_multicast_snooping(index, snooping)?;
            report.changes.push(format!(
                "bridge {} mcast_snooping {}",
                bridge.name,
                u8::from(snooping)
            ));
        }
        let filtering = bridge.uplink.as_ref().and_then(|u| u.filtering.as_ref());
        let filters = current.and_then(|l| l.vlan_filtering).unwrap_or(false);
        if filtering.is_some() != filters {
            match links.set_vlan_filtering(index, filtering.is_some()) {
                Ok(()) => report.changes.push(format!(
                    "bridge {} vlan_filtering {}",
                    bridge.name,
                    u8::from(filtering.is_some())
                )),
                Err(ApplyError::Link { source, .. })
                    if source.is_not_supported() && filtering.is_some() =>
                {
                    // The uplink is not attached to a bridge that would pass every VLAN.
                    report.failed.push((
                        bridge.network.clone(),
                        format!(
                            "spec.bridge.vlanFiltering: this node's kernel has no VLAN-filtering bridge support (CONFIG_BRIDGE_VLAN_FILTERING); remove vlanFiltering (and trunkVlans) to use an 802.1Q sub-interface for spec.bridge.vlan, or exclude the node with spec.nodeSelector ({source})"
                        ),
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let want: BTreeSet<IpNet> = bridge.addresses.iter().copied().collect();
        for addr in want.difference(&have) {
            links.add_address(index, *addr)?;
            report
                .changes
                .push(format!("bridge {} address {addr}", bridge.name));
        }
        // A bridge with an uplink carries the node's own addresses: never remove those.
        if bridge.uplink.is_none() {
            for addr in have.difference(&want) {
                if kernel_managed(addr) {
                    continue;
                }
                links.del_address(index, *addr)?;
                report
                    .changes
                    .push(format!("bridge {} removed address {addr}", bridge.name));
            }
        }
        if let Some(up) = &bridge.uplink {
            let attached = uplink::attach(bridge, index, &existing, links, state_dir, report)
                .and_then(|()| match &up.filtering {
                    Some(f) => {
                        uplink_vlans(&up.port(), f, links, report)?;
                        workload_vlans(bridge, index, f, links, report)
                    }
                    None => Ok(()),
                });
            if let Err(e) = attached {
                let message = match e {
                    ApplyError::Uplink { message, .. } => message,
                    other => crate::error_chain(&other),
                };
                report.failed.push((bridge.network.clone(), message));
            }
        }
    }
    let wanted: BTreeSet<&str> = plan.bridges.iter().map(|b| b.name.as_str()).collect();
    for link in &links.list()? {
        let ours = link
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(&format!("{}net:", names::ALIAS_PREFIX)));
        if ours && !wanted.contains(link.name.as_str()) {
            // The node's addresses go back to the uplink before its bridge goes.
            if let Some(record) = uplink::read_record(state_dir, &link.name) {
                uplink::detach(&record, links, state_dir, report)?;
            }
            links.delete_link(link.index)?;
            report
                .changes
                .push(format!("deleted bridge {} (network removed)", link.name));
        }
    }
    // VLAN sub-interfaces weft made whose bridge is gone.
    let ports: BTreeSet<String> = plan
        .bridges
        .iter()
        .filter_map(|b| b.uplink.as_ref().map(|u| u.port()))
        .collect();
    for link in &links.list()? {
        let vlan = link
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(&format!("{}vlan:", names::ALIAS_PREFIX)));
        if vlan && !ports.contains(&link.name) {
            links.delete_link(link.index)?;
            report
                .changes
                .push(format!("deleted vlan {} (network removed)", link.name));
        }
    }
    Ok(())
}

/// Brings the workloads' host-side ports back to what weft made them: a planned port that is
/// not a port of its bridge (deleting a bridge releases its ports, and they stay so when the
/// bridge is made again) is attached to it again and set up, and on a VLAN-filtering bridge
/// given its access VLAN and trunk again; then every weft workload port of a planned bridge gets
/// hairpin mode (a workload reaches itself through the node's port forwards; the kernel turns
/// it off for a port that left its bridge, and an older weft made ports without it).
///
/// Only links whose alias names them weft's port of the planned network are touched, and
/// only towards that network's weft bridge. A planned port whose link is gone (its workload
/// was deleted; DEL removes the rest) and the ports of a network whose uplink failed are left
/// alone.
fn apply_ports(
    plan: &NodePlan,
    links: &mut dyn Links,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let failed: BTreeSet<&str> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
    let existing = links.list()?;
    let by_name: BTreeMap<&str, &LinkInfo> =
        existing.iter().map(|l| (l.name.as_str(), l)).collect();
    for port in &plan.ports {
        let Some(bridge) = plan
            .bridges
            .iter()
            .find(|b| b.name == port.bridge && b.network == port.network)
        else {
            continue;
        };
        let (Some(link), Some(master)) = (
            by_name.get(port.name.as_str()),
            by_name.get(bridge.name.as_str()),
        ) else {
            continue;
        };
        if failed.contains(port.network.as_str())
            || link
                .alias
                .as_deref()
                .and_then(names::endpoint_alias_network)
                != Some(port.network.as_str())
            || master.alias.as_deref() != Some(names::bridge_alias(&bridge.network).as_str())
            || link.master == Some(master.index)
        {
            continue;
        }
        links.set_master(link.index, Some(master.index))?;
        report.changes.push(format!(
            "port {} attached to bridge {}",
            port.name, bridge.name
        ));
        if !link.up {
            links.set_up(link.index)?;
            report.changes.push(format!("port {} up", port.name));
        }
        if let Some(f) = bridge.uplink.as_ref().and_then(|u| u.filtering.as_ref()) {
            let trunk: Vec<crate::vlan::VlanRange> = port
                .trunk
                .iter()
                .map(|v| crate::vlan::VlanRange::one(*v))
                .collect();
            let current = links.port_vlans()?.remove(&link.index).unwrap_or_default();
            let (add, del) = crate::vlan::changes(&current, &f.workload(&trunk));
            if !add.is_empty() || !del.is_empty() {
                links.change_port_vlans(link.index, &add, &del)?;
                report.changes.push(format!(
                    "port {} vlans: {} untagged, {} tagged",
                    port.name,
                    f.own,
                    trunk.len()
                ));
            }
        }
    }
    let wanted: BTreeSet<&str> = plan.bridges.iter().map(|b| b.name.as_str()).collect();
    let all = links.list()?;
    let bridges: BTreeSet<u32> = all
        .iter()
        .filter(|l| wanted.contains(l.name.as_str()))
        .map(|l| l.index)
        .collect();
    for link in &all {
        let workload_port = link.alias.as_deref().is_some_and(names::is_endpoint_alias);
        if workload_port
            && link.hairpin == Some(false)
            && link.master.is_some_and(|m| bridges.contains(&m))
        {
            links.set_port_hairpin(link.index, true)?;
            report
                .changes
                .push(format!("port {} hairpin on", link.name));
        }
    }
    Ok(())
}

/// Brings the VLANs of the uplink port `port` of a VLAN-filtering bridge to what `filtering`
/// asks (VLAN 1 untagged, the network's own and trunk VLANs tagged).
fn uplink_vlans(
    port: &str,
    filtering: &crate::vlan::VlanFiltering,
    links: &mut dyn Links,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let Some(index) = links
        .list()?
        .into_iter()
        .find(|l| l.name == port)
        .map(|l| l.index)
    else {
        return Ok(());
    };
    let want = filtering.uplink();
    let current = links.port_vlans()?.remove(&index).unwrap_or_default();
    let (add, del) = crate::vlan::changes(&current, &want);
    if add.is_empty() && del.is_empty() {
        return Ok(());
    }
    links.change_port_vlans(index, &add, &del)?;
    let tagged: Vec<String> = want.tagged.iter().map(ToString::to_string).collect();
    report.changes.push(format!(
        "uplink {port} vlans: {} untagged, tagged {}",
        want.pvid,
        tagged.join(",")
    ));
    Ok(())
}

/// Keeps the workload ports of a VLAN-filtering bridge in line with a changed Network: each
/// weft port is an access port on the network's own VLAN and keeps, tagged, those of its trunk
/// VLANs the network still allows (the CNI set them at ADD; a port never gains VLANs here).
fn workload_vlans(
    bridge: &BridgePlan,
    index: u32,
    filtering: &crate::vlan::VlanFiltering,
    links: &mut dyn Links,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let ports: Vec<LinkInfo> = links
        .list()?
        .into_iter()
        .filter(|l| {
            l.master == Some(index)
                && l.alias.as_deref().and_then(names::endpoint_alias_network)
                    == Some(bridge.network.as_str())
        })
        .collect();
    if ports.is_empty() {
        return Ok(());
    }
    let mut all = links.port_vlans()?;
    for port in ports {
        let current = all.remove(&port.index).unwrap_or_default();
        let kept: Vec<crate::vlan::VlanRange> = current
            .iter()
            .filter(|v| !v.pvid && v.vid != filtering.own)
            .filter(|v| filtering.trunk.iter().any(|r| r.contains(v.vid)))
            .map(|v| crate::vlan::VlanRange::one(v.vid))
            .collect();
        let (add, del) = crate::vlan::changes(&current, &filtering.workload(&kept));
        if add.is_empty() && del.is_empty() {
            continue;
        }
        links.change_port_vlans(port.index, &add, &del)?;
        report.changes.push(format!(
            "port {} vlans: {} untagged, {} tagged",
            port.name,
            filtering.own,
            kept.len()
        ));
    }
    Ok(())
}

/// Brings weft's table to `desired`: nothing if equal, element changes if only elements
/// differ, and otherwise, when the kernel's table is weft's, one atomic batch that changes only
/// the chains, sets and maps that differ ([`nft::diff_in_place`]), so the kernel's elements of
/// every dynamic set that stays (meters, `ct count` sets, bans) stay too. A missing table, or a
/// table of that name that is not weft's (its comment is not weft's), is written whole in one
/// atomic replace, which keeps the bans of the kernel's table with the time they had left.
pub fn apply_firewall(
    desired: &Table,
    firewall: &mut dyn Firewall,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    apply_firewall_trusting(desired, None, firewall, report)
}

/// The comment weft gives its tables. The kernel keeps the comment a table was created with
/// (it ignores a new one for an existing table), so it only says whose the table is; tables
/// written before weft changed them in place say `weft structure <hash>`.
const OWNER_COMMENT: &str = "weft";

/// Is a table with this comment weft's?
fn is_weft_table(comment: Option<&str>) -> bool {
    comment.is_some_and(|c| c == OWNER_COMMENT || c.starts_with("weft structure "))
}

/// The name of the empty set that marks `table`'s structure in the kernel
/// (`structure_<structure hash>`, see [`with_structure_mark`]): a table that holds it has
/// `table`'s chains, sets and maps.
pub fn structure_set_name(table: &Table) -> String {
    let mut t = table.clone();
    t.comment = None;
    format!("structure_{}", nft::structure_hash(&t))
}

/// A table as weft writes it: its owner comment, and an empty set named
/// `structure_<structure hash>` last, so that reading one set tells whether the kernel's table
/// has this structure (a comment could not say: the kernel never changes a table's comment).
fn with_structure_mark(table: &Table) -> Table {
    let name = structure_set_name(table);
    let mut t = table.clone();
    t.comment = Some(OWNER_COMMENT.to_string());
    t.sets.push(nft::Set {
        name,
        key_type: "inet_service".into(),
        flags: Vec::new(),
        elements: BTreeSet::new(),
    });
    t
}

/// The name of the structure set of a table made by [`with_structure_mark`].
fn structure_mark(table: &Table) -> &str {
    table.sets.last().map_or("", |s| s.name.as_str())
}

/// [`apply_firewall`], trusting that the kernel's table still holds the elements of `trusted`
/// (the table this process applied last) when its structure set says it has `trusted`'s
/// structure, which `desired` has too: then only the element changes from `trusted` go, and
/// the table's elements are never listed. Anything else lists the table in full.
fn apply_firewall_trusting(
    desired: &Table,
    trusted: Option<&Table>,
    firewall: &mut dyn Firewall,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let desired = with_structure_mark(desired);
    if let Some(trusted) = trusted.map(with_structure_mark)
        && structure_mark(&trusted) == structure_mark(&desired)
        && firewall
            .set_exists(desired.family, &desired.name, structure_mark(&desired))
            .map_err(ApplyError::Firewall)?
    {
        let tx = nft::diff(&trusted, &desired);
        if !tx.0.is_empty() {
            firewall.apply(&tx).map_err(ApplyError::Firewall)?;
            report.changes.extend(tx.0.iter().map(|c| c.summary()));
        }
        return Ok(());
    }
    let current = firewall
        .list_table(desired.family, &desired.name)
        .map_err(ApplyError::Firewall)?;
    let tx = match current {
        Some(state) if is_weft_table(state.comment.as_deref()) => {
            nft::diff_in_place(&state.to_table(&desired), &desired)
        }
        // Not weft's: written whole, keeping what the kernel's rules put in timeout sets
        // (bans), with the time each had left.
        Some(state) => nft::Transaction(vec![nft::Change::ReplaceTable(
            state.carry_expiring(&desired),
        )]),
        None => nft::Transaction(vec![nft::Change::ReplaceTable(desired.clone())]),
    };
    if tx.0.is_empty() {
        return Ok(());
    }
    firewall.apply(&tx).map_err(ApplyError::Firewall)?;
    for change in &tx.0 {
        report.changes.push(change.summary());
    }
    Ok(())
}

/// Deletes one of weft's tables if it exists.
fn delete_table(
    family: nft::Family,
    name: &str,
    firewall: &mut dyn Firewall,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    // Whether it exists: its comment is enough (no elements listed).
    if firewall
        .table_comment(family, name)
        .map_err(ApplyError::Firewall)?
        .is_some()
    {
        let tx = nft::Transaction(vec![nft::Change::DeleteTable {
            family,
            name: name.to_string(),
        }]);
        firewall.apply(&tx).map_err(ApplyError::Firewall)?;
        report
            .changes
            .push(format!("deleted nftables table {family} {name}"));
    }
    Ok(())
}

fn apply_state(
    plan: &NodePlan,
    state_dir: &Path,
    report: &mut ApplyReport,
) -> Result<(), ApplyError> {
    let failed: BTreeSet<&str> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
    for net in plan
        .networks
        .iter()
        .filter(|n| !failed.contains(n.name.as_str()))
    {
        let current = NetworkState::read(state_dir, &net.name).ok();
        if current.as_ref() != Some(net) {
            net.write(state_dir).map_err(ApplyError::State)?;
            report
                .changes
                .push(format!("runtime state of network {}", net.name));
        }
    }
    let wanted: BTreeSet<&str> = plan
        .networks
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| !failed.contains(n))
        .collect();
    for name in NetworkState::list(state_dir).map_err(ApplyError::State)? {
        if !wanted.contains(name.as_str()) {
            state::remove_file(&NetworkState::path(state_dir, &name)).map_err(ApplyError::State)?;
            report
                .changes
                .push(format!("removed runtime state of network {name}"));
        }
    }
    Ok(())
}

/// Removes everything weft created on this node: its links (bridges and host-side ports, found
/// by their `weft:` alias), its nftables table and the runtime state files, and sets back the
/// sysctls it recorded ([`SysctlPlan::restore`]). Idempotent.
pub fn cleanup(
    links: &mut dyn Links,
    firewall: &mut dyn Firewall,
    sysctls: &mut dyn Sysctls,
    state_dir: &Path,
) -> Result<ApplyReport, ApplyError> {
    let mut report = ApplyReport::default();
    for record in uplink::records(state_dir) {
        uplink::detach(&record, links, state_dir, &mut report)?;
    }
    uplink::forget_rollbacks(state_dir);
    for link in links.list()? {
        if link
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(names::ALIAS_PREFIX))
        {
            links.delete_link(link.index)?;
            report.changes.push(format!("deleted link {}", link.name));
        }
    }
    delete_table(nft::Family::Inet, names::NFT_TABLE, firewall, &mut report)?;
    delete_table(nft::Family::Bridge, names::NFT_TABLE, firewall, &mut report)?;
    for name in NetworkState::list(state_dir).map_err(ApplyError::State)? {
        state::remove_file(&NetworkState::path(state_dir, &name)).map_err(ApplyError::State)?;
        report
            .changes
            .push(format!("removed runtime state of network {name}"));
    }
    if state::remove_file(&state::NodeState::path(state_dir)).map_err(ApplyError::State)? {
        report.changes.push("removed node state".to_string());
    }
    restore_sysctls(|_| false, sysctls, state_dir, &mut report)?;
    Ok(report)
}

/// An in-memory [`Links`] for tests: records every mutating call.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeLinks {
    /// Current links.
    pub links: Vec<LinkInfo>,
    /// Addresses per link index.
    pub addrs: std::collections::BTreeMap<u32, BTreeSet<IpNet>>,
    /// Routes per output link index.
    pub routes: std::collections::BTreeMap<u32, Vec<RouteEntry>>,
    /// Whether gateways answer [`Links::probe_gateway`].
    pub gateway_answers: bool,
    /// Whether the kernel has 802.1Q support.
    pub no_vlans: bool,
    /// Whether the kernel lacks VLAN-filtering bridges.
    pub no_vlan_filtering: bool,
    /// The VLANs of each bridge port, by port index.
    pub port_vlans: std::collections::BTreeMap<u32, Vec<PortVlan>>,
    /// Mutating calls, in order.
    pub calls: Vec<String>,
    next_index: u32,
}

#[cfg(any(test, feature = "testing"))]
impl Links for FakeLinks {
    fn list(&mut self) -> Result<Vec<LinkInfo>, ApplyError> {
        Ok(self.links.clone())
    }
    fn create_bridge(
        &mut self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
        alias: &str,
    ) -> Result<u32, ApplyError> {
        self.next_index += 1;
        let index = self.next_index + 100;
        self.links.push(LinkInfo {
            index,
            name: name.into(),
            kind: Some("bridge".into()),
            mac: Some(mac),
            mtu,
            up: false,
            master: None,
            alias: Some(alias.into()),
            netns_id: None,
            peer: None,
            vlan_filtering: Some(false),
            link_local_learning: Some(false),
            netfilter_calls: Some(true),
            multicast_snooping: Some(true),
            hairpin: None,
        });
        self.calls.push(format!("create_bridge {name}"));
        Ok(index)
    }
    fn set_up(&mut self, index: u32) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.up = true;
            }
        }
        self.calls.push(format!("set_up {index}"));
        Ok(())
    }
    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.mtu = mtu;
            }
        }
        self.calls.push(format!("set_mtu {index} {mtu}"));
        Ok(())
    }
    fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.mac = Some(mac);
            }
        }
        self.calls.push(format!("set_mac {index}"));
        Ok(())
    }
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, ApplyError> {
        Ok(self
            .addrs
            .get(&index)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default())
    }
    fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError> {
        self.addrs.entry(index).or_default().insert(addr);
        self.calls.push(format!("add_address {index} {addr}"));
        Ok(())
    }
    fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError> {
        self.addrs.entry(index).or_default().remove(&addr);
        self.calls.push(format!("del_address {index} {addr}"));
        Ok(())
    }
    fn delete_link(&mut self, index: u32) -> Result<(), ApplyError> {
        self.links.retain(|l| l.index != index);
        self.addrs.remove(&index);
        self.routes.remove(&index);
        // Like the kernel: a deleted bridge releases its ports, which lose their port flags.
        for l in &mut self.links {
            if l.master == Some(index) {
                l.master = None;
                l.hairpin = None;
                self.port_vlans.remove(&l.index);
            }
        }
        self.calls.push(format!("delete_link {index}"));
        Ok(())
    }
    fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), ApplyError> {
        // Like the kernel: a new port starts with hairpin off; a leaving one has no port flags.
        for l in &mut self.links {
            if l.index == index {
                l.master = master;
                l.hairpin = master.map(|_| false);
            }
        }
        // Like the kernel: a new port gets the bridge's default VLAN; a leaving one loses all.
        match master {
            Some(_) => {
                self.port_vlans
                    .insert(index, vec![PortVlan::access(crate::vlan::DEFAULT_PVID)]);
            }
            None => {
                self.port_vlans.remove(&index);
            }
        }
        self.calls.push(format!("set_master {index} {master:?}"));
        Ok(())
    }
    fn routes_via(&mut self, index: u32) -> Result<Vec<RouteEntry>, ApplyError> {
        Ok(self.routes.get(&index).cloned().unwrap_or_default())
    }
    fn replace_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError> {
        // Same key (destination, table, metric) anywhere: replaced.
        for rs in self.routes.values_mut() {
            rs.retain(|r| (r.dst, r.table, r.metric) != (route.dst, route.table, route.metric));
        }
        self.routes.entry(oif).or_default().push(route.clone());
        self.calls.push(format!("replace_route {route} dev {oif}"));
        Ok(())
    }
    fn del_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError> {
        if let Some(rs) = self.routes.get_mut(&oif) {
            rs.retain(|r| r != route);
        }
        self.calls.push(format!("del_route {route} dev {oif}"));
        Ok(())
    }
    fn create_vlan(
        &mut self,
        name: &str,
        parent: u32,
        id: u16,
        alias: &str,
    ) -> Result<u32, ApplyError> {
        if self.no_vlans {
            return Err(ApplyError::Link {
                op: format!("create vlan {name}"),
                source: NetlinkError::Kernel {
                    op: "create vlan",
                    target: name.into(),
                    errno: libc::EOPNOTSUPP,
                    message: None,
                },
            });
        }
        self.next_index += 1;
        let index = self.next_index + 100;
        let mac = self
            .links
            .iter()
            .find(|l| l.index == parent)
            .and_then(|l| l.mac);
        self.links.push(LinkInfo {
            index,
            name: name.into(),
            kind: Some("vlan".into()),
            mac,
            mtu: 1500,
            up: false,
            master: None,
            alias: Some(alias.into()),
            netns_id: None,
            peer: None,
            vlan_filtering: None,
            link_local_learning: None,
            netfilter_calls: None,
            multicast_snooping: None,
            hairpin: None,
        });
        self.calls.push(format!("create_vlan {name} {id}"));
        Ok(index)
    }
    fn set_vlan_filtering(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        if self.no_vlan_filtering && on {
            return Err(ApplyError::Link {
                op: format!("set vlan_filtering 1 on bridge {index}"),
                source: NetlinkError::Kernel {
                    op: "set bridge vlan filtering",
                    target: format!("link {index}"),
                    errno: libc::EOPNOTSUPP,
                    message: None,
                },
            });
        }
        for l in &mut self.links {
            if l.index == index {
                l.vlan_filtering = Some(on);
            }
        }
        self.calls
            .push(format!("set_vlan_filtering {index} {}", u8::from(on)));
        Ok(())
    }
    fn set_bridge_safeguards(&mut self, index: u32) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.link_local_learning = Some(false);
                l.netfilter_calls = Some(true);
            }
        }
        self.calls.push(format!("set_bridge_safeguards {index}"));
        Ok(())
    }
    fn set_multicast_snooping(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.multicast_snooping = Some(on);
            }
        }
        self.calls
            .push(format!("set_multicast_snooping {index} {}", u8::from(on)));
        Ok(())
    }
    fn set_port_hairpin(&mut self, index: u32, on: bool) -> Result<(), ApplyError> {
        for l in &mut self.links {
            if l.index == index {
                l.hairpin = Some(on);
            }
        }
        self.calls
            .push(format!("set_port_hairpin {index} {}", u8::from(on)));
        Ok(())
    }
    fn port_vlans(&mut self) -> Result<BTreeMap<u32, Vec<PortVlan>>, ApplyError> {
        Ok(self.port_vlans.clone())
    }
    fn change_port_vlans(
        &mut self,
        index: u32,
        add: &[PortVlan],
        del: &[u16],
    ) -> Result<(), ApplyError> {
        let vlans = self.port_vlans.entry(index).or_default();
        for a in add {
            vlans.retain(|v| v.vid != a.vid);
            vlans.push(*a);
        }
        vlans.retain(|v| !del.contains(&v.vid));
        vlans.sort();
        self.calls
            .push(format!("change_port_vlans {index} +{add:?} -{del:?}"));
        Ok(())
    }
    fn probe_gateway(
        &mut self,
        index: u32,
        _mac: [u8; 6],
        _src: std::net::IpAddr,
        gateway: std::net::IpAddr,
        _timeout: std::time::Duration,
    ) -> Result<bool, ApplyError> {
        self.calls.push(format!("probe_gateway {index} {gateway}"));
        Ok(self.gateway_answers)
    }
}

/// An in-memory [`Sysctls`] for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeSysctls {
    /// Current values.
    pub values: std::collections::BTreeMap<String, String>,
}

#[cfg(any(test, feature = "testing"))]
impl Sysctls for FakeSysctls {
    fn set(&mut self, key: &str, value: &str) -> Result<bool, ApplyError> {
        let old = self.values.insert(key.to_string(), value.to_string());
        Ok(old.as_deref() != Some(value))
    }

    fn get(&mut self, key: &str) -> Result<String, ApplyError> {
        self.values
            .get(key)
            .cloned()
            .ok_or_else(|| ApplyError::Sysctl {
                key: key.to_string(),
                source: crate::sysctl::SysctlError::Read {
                    key: key.to_string(),
                    path: key.into(),
                    source: std::io::ErrorKind::NotFound.into(),
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::UplinkPlan;
    use crate::nft::{Change, FakeFirewall, Family, Set};

    fn table(elements: &[&str], rule: &str) -> Table {
        Table {
            family: Family::Inet,
            name: "weft".into(),
            comment: None,
            sets: vec![Set {
                name: "nets4".into(),
                key_type: "ipv4_addr".into(),
                flags: vec!["interval".into()],
                elements: elements.iter().map(|e| e.to_string()).collect(),
            }],
            maps: vec![],
            chains: vec![crate::nft::Chain {
                name: "forward".into(),
                base: None,
                rules: vec![rule.into()],
            }],
        }
    }

    fn plan(elements: &[&str], rule: &str, bridges: &[&str]) -> NodePlan {
        NodePlan {
            node: "n".into(),
            bridges: bridges
                .iter()
                .map(|b| BridgePlan {
                    network: b.to_string(),
                    name: format!("wn-{b}"),
                    mtu: 1500,
                    mac: names::bridge_mac(b),
                    addresses: vec!["10.0.0.1/24".parse().unwrap()],
                    uplink: None,
                })
                .collect(),
            sysctls: vec![SysctlPlan {
                key: "net.ipv4.ip_forward".into(),
                value: "1".into(),
                restore: false,
            }],
            firewall: table(elements, rule),
            guard: None,
            networks: vec![],
            ports: vec![],
        }
    }

    /// A link weft did not make (no alias), up.
    fn foreign(index: u32, name: &str, kind: Option<&str>, mac: Option<[u8; 6]>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            mac,
            mtu: 1500,
            up: true,
            master: None,
            alias: None,
            netns_id: None,
            peer: None,
            vlan_filtering: None,
            link_local_learning: None,
            netfilter_calls: None,
            multicast_snooping: None,
            hairpin: None,
        }
    }

    struct Node {
        links: FakeLinks,
        fw: FakeFirewall,
        sysctls: FakeSysctls,
        dir: tempfile::TempDir,
    }

    impl Node {
        fn new() -> Self {
            Node {
                links: FakeLinks::default(),
                fw: FakeFirewall::new(),
                sysctls: FakeSysctls::default(),
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn apply(&mut self, p: &NodePlan) -> ApplyReport {
            apply(
                p,
                &mut self.links,
                &mut self.fw,
                &mut self.sysctls,
                self.dir.path(),
            )
            .unwrap()
        }
    }

    #[test]
    fn a_sysctl_to_restore_goes_back_to_its_value_before_weft_when_no_plan_names_it() {
        const LOOSE: &str = "net.netfilter.nf_conntrack_tcp_loose";
        let with = |restore: bool| {
            let mut p = plan(&[], "accept", &[]);
            p.sysctls.push(SysctlPlan {
                key: LOOSE.into(),
                value: "0".into(),
                restore,
            });
            p
        };
        let record = |node: &Node| {
            std::fs::read_to_string(node.dir.path().join(SYSCTL_RECORDS).join(LOOSE)).ok()
        };
        let mut node = Node::new();
        node.sysctls.values.insert(LOOSE.into(), "1".into());
        node.apply(&with(true));
        assert_eq!(node.sysctls.values[LOOSE], "0");
        assert_eq!(record(&node).as_deref(), Some("1"));
        // Applied again (and after someone set it to 0 by hand in between): the value before
        // weft's first change stays the one to go back to.
        node.apply(&with(true));
        assert_eq!(record(&node).as_deref(), Some("1"));
        // No plan names it: back to 1, the record gone.
        let report = node.apply(&plan(&[], "accept", &[]));
        assert_eq!(node.sysctls.values[LOOSE], "1");
        assert_eq!(record(&node), None);
        assert!(
            report.changes.iter().any(|c| c.contains("restored")),
            "{:?}",
            report.changes
        );
        // Forwarding (not to restore) is never recorded, and stays.
        assert_eq!(node.sysctls.values["net.ipv4.ip_forward"], "1");
        assert!(
            !node
                .dir
                .path()
                .join(SYSCTL_RECORDS)
                .join("net.ipv4.ip_forward")
                .exists()
        );
        // Cleanup sets it back too.
        node.apply(&with(true));
        assert_eq!(node.sysctls.values[LOOSE], "0");
        cleanup(
            &mut node.links,
            &mut node.fw,
            &mut node.sysctls,
            node.dir.path(),
        )
        .unwrap();
        assert_eq!(node.sysctls.values[LOOSE], "1");
        assert_eq!(record(&node), None);
        // Set to 0 by the node's owner before weft: nothing to record, nothing to set back.
        let mut node = Node::new();
        node.sysctls.values.insert(LOOSE.into(), "0".into());
        node.apply(&with(true));
        assert_eq!(record(&node), None);
        node.apply(&plan(&[], "accept", &[]));
        assert_eq!(node.sysctls.values[LOOSE], "0");
    }

    #[test]
    fn plans_that_differ_in_their_tables_only_are_told_from_the_others() {
        let first = plan(&["10.0.0.0/24"], "accept", &["a"]);
        assert!(first.same_but_tables(&plan(&["10.1.0.0/24"], "drop", &["a"])));
        assert!(!first.same_but_tables(&plan(&["10.0.0.0/24"], "accept", &["a", "b"])));
        let mut other = first.clone();
        other.sysctls.clear();
        assert!(!first.same_but_tables(&other));
        let mut other = first.clone();
        other.ports.push(PortPlan {
            name: "wf0".into(),
            network: "a".into(),
            bridge: "wn-a".into(),
            trunk: vec![],
        });
        assert!(!first.same_but_tables(&other));
    }

    #[test]
    fn apply_since_sends_element_changes_without_listing_and_falls_back_otherwise() {
        let mut node = Node::new();
        let first = plan(&["10.0.0.0/24"], "accept", &["a"]);
        node.apply(&first);
        let lists = node.fw.lists;
        let calls = node.links.calls.len();
        let second = plan(&["10.0.0.0/24", "10.1.0.0/24"], "accept", &["a"]);
        let report = apply_since(
            &second,
            Some(&first),
            &mut node.links,
            &mut node.fw,
            &mut node.sysctls,
            node.dir.path(),
        )
        .unwrap();
        assert_eq!(node.fw.lists, lists, "no listing of the tables");
        assert_eq!(node.links.calls.len(), calls, "no link work");
        assert!(matches!(
            node.fw.applied.last().unwrap().0.as_slice(),
            [Change::AddElements { .. }]
        ));
        assert_eq!(report.changes.len(), 1);
        let kernel = &node.fw.tables[&(Family::Inet, "weft".to_string())];
        assert!(kernel.sets[0].elements.contains("10.1.0.0/24"));
        // Another rule: the full apply, which lists and changes that chain in place.
        let third = plan(&["10.1.0.0/24"], "drop", &["a"]);
        apply_since(
            &third,
            Some(&second),
            &mut node.links,
            &mut node.fw,
            &mut node.sysctls,
            node.dir.path(),
        )
        .unwrap();
        assert!(node.fw.lists > lists);
        let last = node.fw.applied.last().unwrap();
        assert!(
            last.0
                .iter()
                .any(|c| matches!(c, Change::FlushChain { chain, .. } if chain == "forward")),
            "{last:?}"
        );
        assert!(
            !last.0.iter().any(|c| matches!(c, Change::ReplaceTable(_))),
            "{last:?}"
        );
        assert_eq!(
            node.fw.tables[&(Family::Inet, "weft".to_string())].chains[0].rules,
            ["drop"]
        );
    }

    #[test]
    fn apply_checked_reads_only_the_structure_and_repairs_a_table_deleted_by_hand() {
        let mut node = Node::new();
        let first = plan(&["10.0.0.0/24"], "accept", &["a"]);
        node.apply(&first);
        let lists = node.fw.lists;
        let second = plan(&["10.0.0.0/24", "10.1.0.0/24"], "accept", &["a"]);
        let check = |node: &mut Node, p: &NodePlan, prev: &NodePlan| {
            apply_checked(
                p,
                Some(prev),
                &mut node.links,
                &mut node.fw,
                &mut node.sysctls,
                node.dir.path(),
            )
            .unwrap()
        };
        let report = check(&mut node, &second, &first);
        assert_eq!(node.fw.lists, lists, "no table listed with its elements");
        assert!(node.fw.set_reads >= 1, "the structure set is read");
        assert!(matches!(
            node.fw.applied.last().unwrap().0.as_slice(),
            [Change::AddElements { .. }]
        ));
        assert_eq!(report.changes.len(), 1);
        // Nothing to do: no transaction.
        let txs = node.fw.applied.len();
        assert!(check(&mut node, &second, &second).is_noop());
        assert_eq!(node.fw.applied.len(), txs);
        assert_eq!(node.fw.lists, lists);
        // The table deleted by hand: listed, found missing, written again whole.
        node.fw.tables.remove(&(Family::Inet, "weft".to_string()));
        let report = check(&mut node, &second, &second);
        assert!(node.fw.lists > lists);
        assert!(matches!(
            node.fw.applied.last().unwrap().0.as_slice(),
            [Change::ReplaceTable(_)]
        ));
        assert!(!report.is_noop());
        let kernel = &node.fw.tables[&(Family::Inet, "weft".to_string())];
        assert!(kernel.sets[0].elements.contains("10.1.0.0/24"));
        // Another structure: listed and changed in place, as by the full apply.
        let lists = node.fw.lists;
        let third = plan(&["10.1.0.0/24"], "drop", &["a"]);
        check(&mut node, &third, &second);
        assert!(node.fw.lists > lists);
        let last = node.fw.applied.last().unwrap();
        assert!(
            matches!(last.0.first(), Some(Change::FlushChain { .. })),
            "{last:?}"
        );
        // The structure set followed: the next registration is trusted again, unlisted.
        let lists = node.fw.lists;
        let fourth = plan(&["10.1.0.0/24", "10.2.0.0/24"], "drop", &["a"]);
        check(&mut node, &fourth, &third);
        assert_eq!(node.fw.lists, lists, "no table listed with its elements");
        assert!(matches!(
            node.fw.applied.last().unwrap().0.as_slice(),
            [Change::AddElements { .. }]
        ));
    }

    #[test]
    fn second_apply_of_the_same_plan_changes_nothing() {
        let mut node = Node::new();
        let p = plan(&["10.0.0.0/24"], "accept", &["a"]);
        assert!(!node.apply(&p).is_noop());
        let calls = node.links.calls.len();
        let txs = node.fw.applied.len();
        assert!(node.apply(&p).is_noop());
        assert_eq!(node.links.calls.len(), calls, "no link churn");
        assert_eq!(node.fw.applied.len(), txs, "no nftables transaction");
    }

    #[test]
    fn element_changes_are_element_transactions_and_rule_changes_refill_their_chain() {
        let mut node = Node::new();
        node.apply(&plan(&["10.0.0.0/24"], "accept", &[]));
        node.apply(&plan(&["10.0.0.0/24", "10.1.0.0/24"], "accept", &[]));
        let last = node.fw.applied.last().unwrap();
        assert!(
            matches!(last.0.as_slice(), [Change::AddElements { .. }]),
            "{last:?}"
        );
        node.apply(&plan(&["10.1.0.0/24"], "drop", &[]));
        let last = node.fw.applied.last().unwrap();
        let structure = |c: &Change| match c {
            Change::DeleteSet { set, .. } => set.starts_with("structure_"),
            Change::AddSet { set, .. } => set.name.starts_with("structure_"),
            _ => false,
        };
        assert!(
            matches!(
                last.0.iter().filter(|c| !structure(c)).collect::<Vec<_>>().as_slice(),
                [
                    Change::FlushChain { chain: f, .. },
                    Change::DeleteElements { .. },
                    Change::AddRules { chain: r, .. },
                ] if f == "forward" && r.name == "forward" && r.rules == ["drop"]
            ),
            "{last:?}"
        );
        assert!(node.apply(&plan(&["10.1.0.0/24"], "drop", &[])).is_noop());
    }

    #[test]
    fn bridges_of_removed_networks_are_deleted_and_foreign_links_refused() {
        let mut node = Node::new();
        node.apply(&plan(&[], "accept", &["a", "b"]));
        assert_eq!(node.links.links.len(), 2);
        let r = node.apply(&plan(&[], "accept", &["a"]));
        assert!(
            r.changes.iter().any(|c| c.contains("deleted bridge wn-b")),
            "{r:?}"
        );
        assert_eq!(node.links.links.len(), 1);
        // A link named like weft's bridge but without weft's alias is never adopted: that
        // Network fails, the others are applied.
        node.links
            .links
            .push(foreign(7, "wn-c", Some("bridge"), None));
        let r = apply(
            &plan(&[], "accept", &["a", "c", "d"]),
            &mut node.links,
            &mut node.fw,
            &mut node.sysctls,
            node.dir.path(),
        )
        .unwrap();
        assert_eq!(r.failed.len(), 1, "{r:?}");
        assert_eq!(r.failed[0].0, "c");
        assert!(
            r.failed[0]
                .1
                .contains("wn-c exists but was not created by weft"),
            "{r:?}"
        );
        assert!(node.links.links.iter().any(|l| l.name == "wn-d"), "{r:?}");
        let c = node.links.links.iter().find(|l| l.name == "wn-c").unwrap();
        assert_eq!((c.index, c.alias.as_deref()), (7, None), "left as it was");
    }

    #[test]
    fn a_nat_subnet_holding_an_address_of_the_node_is_refused_and_the_others_applied() {
        let mut node = Node::new();
        // The node's LAN: 10.0.0.5/24 on eth0 (the fixture's bridges ask for 10.0.0.1/24).
        node.links
            .links
            .push(foreign(2, "eth0", Some("veth"), None));
        node.links
            .addrs
            .entry(2)
            .or_default()
            .insert("10.0.0.5/24".parse().unwrap());
        let mut p = plan(&[], "accept", &["a", "b"]);
        p.bridges[1].addresses = vec!["10.1.0.1/24".parse().unwrap()];
        let r = node.apply(&p);
        assert_eq!(r.failed.len(), 1, "{r:?}");
        assert_eq!(r.failed[0].0, "a");
        assert!(
            r.failed[0].1.starts_with(
                "spec.subnets: 10.0.0.0/24 holds this node's address 10.0.0.5/24 on eth0"
            ),
            "{r:?}"
        );
        assert!(!node.links.links.iter().any(|l| l.name == "wn-a"), "{r:?}");
        assert!(node.links.links.iter().any(|l| l.name == "wn-b"), "{r:?}");
        // One holding the node's gateway (of its default route) is refused the same way.
        node.links.routes.entry(2).or_default().push(RouteEntry {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("10.0.0.130".parse().unwrap()),
            table: 254,
            protocol: 4,
            scope: 0,
            metric: None,
            prefsrc: None,
            onlink: false,
            metrics: Vec::new(),
        });
        p.bridges[0].addresses = vec!["10.0.0.129/25".parse().unwrap()];
        let r = node.apply(&p);
        assert!(
            r.failed.len() == 1
                && r.failed[0]
                    .1
                    .contains("holds this node's gateway 10.0.0.130 on eth0"),
            "{r:?}"
        );
        // Inside the node's prefix but holding neither: taken (as it was before; whether the
        // node reaches others of its LAN there is the operator's choice).
        p.bridges[0].addresses = vec!["10.0.0.65/26".parse().unwrap()];
        assert!(node.apply(&p).failed.is_empty());
        // Elsewhere: applied, and applied again as it is (the check only before an address
        // is added).
        p.bridges[0].addresses = vec!["10.2.0.1/24".parse().unwrap()];
        assert!(node.apply(&p).failed.is_empty());
        assert!(node.apply(&p).is_noop());
    }

    #[test]
    fn a_removed_network_s_bridge_under_a_new_network_s_name_goes_first() {
        let mut node = Node::new();
        node.apply(&plan(&[], "accept", &["a"]));
        // Network a removed and b created with a's bridge name, seen in one pass.
        let mut renamed = plan(&[], "accept", &["b"]);
        renamed.bridges[0].name = "wn-a".into();
        let r = node.apply(&renamed);
        assert!(r.failed.is_empty(), "{r:?}");
        assert!(
            r.changes
                .iter()
                .any(|c| c.starts_with("deleted bridge wn-a")),
            "{r:?}"
        );
        assert!(
            r.changes.iter().any(|c| c == "created bridge wn-a"),
            "{r:?}"
        );
        let bridges: Vec<(&str, Option<&str>)> = node
            .links
            .links
            .iter()
            .map(|l| (l.name.as_str(), l.alias.as_deref()))
            .collect();
        assert_eq!(bridges, [("wn-a", Some(names::bridge_alias("b").as_str()))]);
        assert!(node.apply(&renamed).is_noop());
    }

    /// A bridge made by an older weft (the kernel reports link-local learning on), or whose
    /// br_netfilter calls someone turned off, gets weft's safeguards back, once.
    #[test]
    fn a_bridge_without_the_safeguards_is_corrected_once() {
        for older in [true, false] {
            let mut node = Node::new();
            node.apply(&plan(&[], "accept", &["a"]));
            if older {
                node.links.links[0].link_local_learning = Some(true);
            } else {
                node.links.links[0].netfilter_calls = Some(false);
            }
            let r = node.apply(&plan(&[], "accept", &["a"]));
            assert!(
                r.changes.iter().any(|c| c
                    == "bridge wn-a no_linklocal_learn 1 nf_call_iptables 1 nf_call_ip6tables 1"),
                "{r:?}"
            );
            assert_eq!(node.links.links[0].link_local_learning, Some(false));
            assert_eq!(node.links.links[0].netfilter_calls, Some(true));
            let again = node.apply(&plan(&[], "accept", &["a"]));
            assert!(
                !again
                    .changes
                    .iter()
                    .any(|c| c.contains("no_linklocal_learn")),
                "{again:?}"
            );
        }
    }

    /// A bridge without an uplink snoops no IGMP or MLD: it is made so and an older one is
    /// switched over, once; a bridge with an uplink keeps the kernel's default, on.
    #[test]
    fn only_a_bridge_with_an_uplink_snoops_multicast() {
        let mut node = Node::new();
        let r = node.apply(&plan(&[], "accept", &["a"]));
        assert!(
            r.changes
                .iter()
                .any(|c| c == "bridge wn-a mcast_snooping 0"),
            "{r:?}"
        );
        assert_eq!(node.links.links[0].multicast_snooping, Some(false));
        assert!(node.apply(&plan(&[], "accept", &["a"])).is_noop());
        // An older weft's bridge (the kernel's default) is switched over once.
        node.links.links[0].multicast_snooping = Some(true);
        let r = node.apply(&plan(&[], "accept", &["a"]));
        assert_eq!(r.changes, ["bridge wn-a mcast_snooping 0"]);
        assert!(node.apply(&plan(&[], "accept", &["a"])).is_noop());
        // A kernel that does not say is left alone.
        node.links.links[0].multicast_snooping = None;
        assert!(node.apply(&plan(&[], "accept", &["a"])).is_noop());

        let mut node = Node::new();
        node.links.gateway_answers = true;
        add_eth0(&mut node);
        let r = node.apply(&lan_plan(None));
        assert!(r.failed.is_empty(), "{r:?}");
        let br = bridge_index(&node, "wn-lan");
        let lan = node.links.links.iter().find(|l| l.index == br).unwrap();
        assert_eq!(lan.multicast_snooping, Some(true));
        assert!(
            !r.changes.iter().any(|c| c.contains("mcast_snooping")),
            "{r:?}"
        );
    }

    #[test]
    fn workload_ports_of_an_older_weft_get_hairpin_on_once() {
        let mut node = Node::new();
        node.apply(&plan(&[], "accept", &["a"]));
        let bridge = node.links.links[0].index;
        let port = |index, name: &str, alias: Option<&str>, hairpin| LinkInfo {
            master: Some(bridge),
            alias: alias.map(str::to_string),
            hairpin,
            ..foreign(index, name, Some("veth"), None)
        };
        node.links.links.extend([
            port(20, "wfold", Some("weft:ep:a:cid:eth0"), Some(false)),
            port(21, "wfnew", Some("weft:ep:a:cid2:eth0"), Some(true)),
            port(22, "other", None, Some(false)),
        ]);
        let r = node.apply(&plan(&[], "accept", &["a"]));
        assert!(
            r.changes.iter().any(|c| c == "port wfold hairpin on"),
            "{r:?}"
        );
        assert!(
            !r.changes
                .iter()
                .any(|c| c.contains("wfnew") || c.contains("other")),
            "only weft's ports without hairpin: {r:?}"
        );
        let again = node.apply(&plan(&[], "accept", &["a"]));
        assert!(
            !again.changes.iter().any(|c| c.contains("hairpin")),
            "{again:?}"
        );
    }

    /// A workload port the CNI made on bridge `bridge` of network `network`, hairpin on.
    fn workload_port(index: u32, name: &str, network: &str, bridge: u32) -> LinkInfo {
        LinkInfo {
            master: Some(bridge),
            alias: Some(names::host_veth_alias(network, name, "eth0")),
            hairpin: Some(true),
            ..foreign(index, name, Some("veth"), None)
        }
    }

    fn port_plan(name: &str, network: &str, trunk: &[u16]) -> PortPlan {
        PortPlan {
            name: name.into(),
            network: network.into(),
            bridge: format!("wn-{network}"),
            trunk: trunk.to_vec(),
        }
    }

    #[test]
    fn ports_a_deleted_bridge_released_are_attached_to_the_new_one_once() {
        let mut node = Node::new();
        let mut p = plan(&[], "accept", &["a"]);
        p.ports = vec![
            port_plan("wfa", "a", &[]),
            port_plan("wfb", "a", &[]),
            port_plan("wfgone", "a", &[]),
            port_plan("wfnotours", "a", &[]),
            port_plan("wfother", "a", &[]),
        ];
        node.apply(&p);
        let old = bridge_index(&node, "wn-a");
        node.links.links.extend([
            workload_port(20, "wfa", "a", old),
            workload_port(21, "wfb", "a", old),
            // A link of that name weft did not make, and a weft port of another network.
            LinkInfo {
                master: Some(old),
                ..foreign(22, "wfnotours", Some("veth"), None)
            },
            workload_port(23, "wfother", "b", old),
        ]);
        for l in &mut node.links.links {
            if l.name == "wfb" {
                l.up = false;
            }
        }
        assert!(
            node.apply(&p).is_noop(),
            "ports on their bridge are left alone"
        );

        // The bridge is deleted by hand: its ports are released (hairpin goes with them).
        node.links.delete_link(old).unwrap();
        assert!(node.links.links.iter().all(|l| l.master.is_none()));
        let r = node.apply(&p);
        let new = bridge_index(&node, "wn-a");
        for want in [
            "created bridge wn-a",
            "port wfa attached to bridge wn-a",
            "port wfa hairpin on",
            "port wfb attached to bridge wn-a",
            "port wfb up",
            "port wfb hairpin on",
        ] {
            assert!(r.changes.iter().any(|c| c == want), "{want}: {r:?}");
        }
        let link = |name: &str| node.links.links.iter().find(|l| l.name == name).unwrap();
        for name in ["wfa", "wfb"] {
            assert_eq!(link(name).master, Some(new), "{name}");
            assert_eq!(link(name).hairpin, Some(true), "{name}");
            assert!(link(name).up, "{name}");
        }
        for name in ["wfnotours", "wfother"] {
            assert_eq!(link(name).master, None, "{name} is not weft's port of a");
        }
        assert!(
            !r.changes.iter().any(|c| c.contains("wfgone")),
            "a port whose link is gone is skipped: {r:?}"
        );
        // Idempotent: the next apply (a resync) changes nothing.
        let calls = node.links.calls.len();
        assert!(node.apply(&p).is_noop());
        assert_eq!(node.links.calls.len(), calls);
    }

    #[test]
    fn a_trunk_port_attached_again_gets_its_access_vlan_and_trunk_back() {
        use crate::vlan::{PortVlan, VlanRange};
        let mut node = Node::new();
        node.links.gateway_answers = true;
        add_eth0(&mut node);
        let mut p = trunk_plan(&[VlanRange::one(20), VlanRange { min: 100, max: 101 }]);
        p.ports = vec![port_plan("wftrunk", "lan", &[20, 101])];
        assert!(node.apply(&p).failed.is_empty());
        let old = bridge_index(&node, "wn-lan");
        node.links
            .links
            .push(workload_port(60, "wftrunk", "lan", old));
        node.links.port_vlans.insert(
            60,
            vec![
                PortVlan::access(10),
                PortVlan::tagged(20),
                PortVlan::tagged(101),
            ],
        );
        assert!(node.apply(&p).is_noop());
        // Released from the bridge (as deleting the bridge does): its VLANs are gone.
        node.links.set_master(60, None).unwrap();
        assert!(!node.links.port_vlans.contains_key(&60));
        let r = node.apply(&p);
        assert!(r.failed.is_empty(), "{r:?}");
        assert!(
            r.changes
                .iter()
                .any(|c| c == "port wftrunk vlans: 10 untagged, 2 tagged"),
            "{r:?}"
        );
        assert_eq!(
            node.links
                .links
                .iter()
                .find(|l| l.index == 60)
                .unwrap()
                .master,
            Some(old)
        );
        assert_eq!(
            node.links.port_vlans[&60],
            [
                PortVlan::access(10),
                PortVlan::tagged(20),
                PortVlan::tagged(101)
            ],
            "the network's own VLAN untagged, the attachment's trunk tagged, VLAN 1 gone"
        );
        let calls = node.links.calls.len();
        assert!(node.apply(&p).is_noop());
        assert_eq!(node.links.calls.len(), calls);
    }

    #[test]
    fn cleanup_removes_weft_links_table_and_state_only() {
        let mut node = Node::new();
        node.apply(&plan(&["10.0.0.0/24"], "accept", &["a"]));
        node.links.links.push(foreign(9, "eth0", None, None));
        let r = cleanup(
            &mut node.links,
            &mut node.fw,
            &mut node.sysctls,
            node.dir.path(),
        )
        .unwrap();
        assert!(!r.is_noop());
        assert_eq!(node.links.links.len(), 1, "eth0 is not weft's");
        assert!(node.fw.table(Family::Inet, "weft").is_none());
        assert!(
            cleanup(
                &mut node.links,
                &mut node.fw,
                &mut node.sysctls,
                node.dir.path()
            )
            .unwrap()
            .is_noop()
        );
    }

    fn add_eth0(node: &mut Node) -> u32 {
        node.links
            .links
            .push(foreign(2, "eth0", None, Some([0x52, 0x54, 0, 0, 0, 2])));
        node.links.addrs.entry(2).or_default().extend(
            ["192.168.50.11/24", "fe80::5054:ff:fe00:2/64"].map(|a| a.parse::<IpNet>().unwrap()),
        );
        node.links.routes.insert(
            2,
            vec![RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("192.168.50.1".parse().unwrap()),
                table: 254,
                protocol: 16,
                scope: 0,
                metric: Some(100),
                prefsrc: None,
                onlink: false,
                metrics: Vec::new(),
            }],
        );
        2
    }

    fn lan_plan(vlan: Option<u16>) -> NodePlan {
        let mut p = plan(&[], "accept", &[]);
        p.bridges.push(BridgePlan {
            network: "lan".into(),
            name: "wn-lan".into(),
            mtu: 1500,
            mac: names::bridge_mac("lan"),
            addresses: vec![],
            uplink: Some(UplinkPlan {
                device: "eth0".into(),
                vlan,
                filtering: None,
            }),
        });
        p.networks.push(NetworkState {
            name: "lan".into(),
            mode: state::NetworkMode::Bridge,
            bridge: "wn-lan".into(),
            mtu: 1500,
            subnet_v4: Some("192.168.50.0/24".parse().unwrap()),
            subnet_v6: None,
            gateway_v4: Some("192.168.50.1".parse().unwrap()),
            gateway_v6: None,
            block_v4: Some("192.168.50.64/26".parse().unwrap()),
            block_v6: None,
            exclude: vec![],
            anti_spoofing: true,
            vlan_filtering: None,
        });
        p
    }

    fn bridge_index(node: &Node, name: &str) -> u32 {
        node.links
            .links
            .iter()
            .find(|l| l.name == name)
            .unwrap()
            .index
    }

    #[test]
    fn uplink_takeover_moves_the_node_addresses_and_routes_and_removal_restores_them() {
        let mut node = Node::new();
        node.links.gateway_answers = true;
        let eth0 = add_eth0(&mut node);
        let before_addrs = node.links.addrs[&eth0].clone();
        let before_routes = node.links.routes[&eth0].clone();
        let report = node.apply(&lan_plan(None));
        assert!(report.failed.is_empty(), "{report:?}");
        let br = bridge_index(&node, "wn-lan");
        let link = |node: &Node, i| {
            node.links
                .links
                .iter()
                .find(|l| l.index == i)
                .unwrap()
                .clone()
        };
        assert_eq!(link(&node, eth0).master, Some(br));
        assert_eq!(
            link(&node, br).mac,
            Some([0x52, 0x54, 0, 0, 0, 2]),
            "the uplink's MAC"
        );
        assert!(node.links.addrs[&br].contains(&"192.168.50.11/24".parse().unwrap()));
        assert!(!node.links.addrs[&eth0].contains(&"192.168.50.11/24".parse().unwrap()));
        assert_eq!(node.links.routes[&br], before_routes);
        assert!(node.links.routes[&eth0].is_empty());
        assert!(
            node.links
                .calls
                .iter()
                .any(|c| c == &format!("probe_gateway {br} 192.168.50.1"))
        );
        assert!(NetworkState::read(node.dir.path(), "lan").is_ok());
        // Again: nothing to do.
        let calls = node.links.calls.len();
        assert!(node.apply(&lan_plan(None)).is_noop());
        assert_eq!(node.links.calls.len(), calls);
        // The network goes: everything is back on eth0, exactly.
        let report = node.apply(&plan(&[], "accept", &[]));
        assert!(
            report
                .changes
                .iter()
                .any(|c| c.contains("uplink eth0 detached")),
            "{report:?}"
        );
        assert_eq!(link(&node, eth0).master, None);
        assert_eq!(node.links.addrs[&eth0], before_addrs);
        assert_eq!(node.links.routes[&eth0], before_routes);
        assert!(uplink::records(node.dir.path()).is_empty());
    }

    #[test]
    fn an_unreachable_gateway_rolls_the_takeover_back_and_is_not_retried() {
        let mut node = Node::new();
        let eth0 = add_eth0(&mut node);
        let before_addrs = node.links.addrs[&eth0].clone();
        let before_routes = node.links.routes[&eth0].clone();
        let report = node.apply(&lan_plan(None));
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert!(
            report.failed[0].1.contains("rolled back"),
            "{:?}",
            report.failed
        );
        assert!(
            report.failed[0].1.contains("192.168.50.1"),
            "{:?}",
            report.failed
        );
        let l = node.links.links.iter().find(|l| l.index == eth0).unwrap();
        assert_eq!(l.master, None);
        assert_eq!(node.links.addrs[&eth0], before_addrs);
        assert_eq!(node.links.routes[&eth0], before_routes);
        assert!(
            NetworkState::read(node.dir.path(), "lan").is_err(),
            "no runtime state: no workload attaches to a network without its uplink"
        );
        // The same plan again: refused without touching eth0.
        let calls = node.links.calls.len();
        let report = node.apply(&lan_plan(None));
        assert!(
            report.failed[0].1.contains("rolled back earlier"),
            "{:?}",
            report.failed
        );
        assert!(
            !node.links.calls[calls..]
                .iter()
                .any(|c| c.starts_with("set_master"))
        );
        // A changed Network is tried again.
        node.links.gateway_answers = true;
        let mut changed = lan_plan(None);
        changed.bridges[0].mtu = 1400;
        assert!(node.apply(&changed).failed.is_empty());
    }

    #[test]
    fn vlan_networks_attach_a_sub_interface_and_name_missing_kernel_support() {
        let mut node = Node::new();
        node.links.gateway_answers = true;
        let eth0 = add_eth0(&mut node);
        let report = node.apply(&lan_plan(Some(10)));
        assert!(report.failed.is_empty(), "{report:?}");
        let sub = node
            .links
            .links
            .iter()
            .find(|l| l.name == "eth0.10")
            .unwrap()
            .clone();
        assert_eq!(sub.master, Some(bridge_index(&node, "wn-lan")));
        assert_eq!(
            node.links
                .links
                .iter()
                .find(|l| l.index == eth0)
                .unwrap()
                .master,
            None
        );
        assert!(
            node.links.addrs[&eth0].contains(&"192.168.50.11/24".parse().unwrap()),
            "the node's addresses stay on the untagged interface"
        );
        node.apply(&plan(&[], "accept", &[]));
        assert!(
            !node.links.links.iter().any(|l| l.name == "eth0.10"),
            "weft's vlan is removed"
        );

        let mut node = Node::new();
        node.links.no_vlans = true;
        add_eth0(&mut node);
        let report = node.apply(&lan_plan(Some(10)));
        assert!(
            report.failed[0].1.contains("spec.bridge.vlan"),
            "{:?}",
            report.failed
        );
        assert!(report.failed[0].1.contains("802.1Q"), "{:?}", report.failed);
    }

    fn trunk_plan(trunk: &[crate::vlan::VlanRange]) -> NodePlan {
        let filtering = crate::vlan::VlanFiltering {
            own: 10,
            trunk: trunk.to_vec(),
        };
        let mut p = lan_plan(None);
        if let Some(up) = p.bridges[0].uplink.as_mut() {
            up.filtering = Some(filtering.clone());
        }
        p.networks[0].vlan_filtering = Some(filtering);
        p
    }

    #[test]
    fn vlan_filtering_networks_make_the_uplink_a_trunk_and_name_missing_kernel_support() {
        use crate::vlan::{PortVlan, VlanRange};
        let mut node = Node::new();
        node.links.gateway_answers = true;
        let eth0 = add_eth0(&mut node);
        let trunk = [VlanRange::one(20), VlanRange { min: 100, max: 101 }];
        let report = node.apply(&trunk_plan(&trunk));
        assert!(report.failed.is_empty(), "{report:?}");
        let br = bridge_index(&node, "wn-lan");
        let link = |node: &Node, i| node.links.links.iter().find(|l| l.index == i).cloned();
        assert_eq!(link(&node, br).unwrap().vlan_filtering, Some(true));
        assert_eq!(
            link(&node, eth0).unwrap().master,
            Some(br),
            "the uplink itself, no sub-interface"
        );
        assert!(!node.links.links.iter().any(|l| l.name == "eth0.10"));
        assert_eq!(
            node.links.port_vlans[&eth0],
            [
                PortVlan::access(1),
                PortVlan::tagged(10),
                PortVlan::tagged(20),
                PortVlan::tagged(100),
                PortVlan::tagged(101)
            ],
            "the node's untagged traffic stays on VLAN 1; the own VLAN and the trunk are tagged"
        );
        assert!(NetworkState::read(node.dir.path(), "lan").is_ok());
        // Idempotent.
        let calls = node.links.calls.len();
        assert!(node.apply(&trunk_plan(&trunk)).is_noop());
        assert_eq!(node.links.calls.len(), calls);
        // Fewer trunk VLANs: only the difference changes.
        node.apply(&trunk_plan(&[VlanRange::one(20)]));
        assert_eq!(
            node.links.calls.last().unwrap(),
            &format!("change_port_vlans {eth0} +[] -[100, 101]")
        );
        // Filtering off again (the sub-interface mode without a VLAN): the bridge stops filtering.
        node.apply(&lan_plan(None));
        assert_eq!(link(&node, br).unwrap().vlan_filtering, Some(false));
        // The network goes: the uplink leaves the bridge, and its VLANs with it.
        node.apply(&trunk_plan(&trunk));
        node.apply(&plan(&[], "accept", &[]));
        assert_eq!(link(&node, eth0).unwrap().master, None);
        assert!(!node.links.port_vlans.contains_key(&eth0));
        assert!(link(&node, br).is_none());

        // A workload port (made by the CNI) follows a changed Network: the own VLAN moves to
        // 11, trunk VLANs the network dropped go, the others stay.
        node.apply(&trunk_plan(&trunk));
        let br = bridge_index(&node, "wn-lan");
        let mut port = foreign(60, "wfport", Some("veth"), None);
        port.alias = Some(names::host_veth_alias("lan", "cid", "eth0"));
        node.links.links.push(port);
        node.links.set_master(60, Some(br)).unwrap();
        node.links
            .change_port_vlans(
                60,
                &[
                    PortVlan::access(10),
                    PortVlan::tagged(20),
                    PortVlan::tagged(100),
                ],
                &[1],
            )
            .unwrap();
        let mut moved = trunk_plan(&[VlanRange::one(20)]);
        for f in [
            moved.bridges[0]
                .uplink
                .as_mut()
                .and_then(|u| u.filtering.as_mut()),
            moved.networks[0].vlan_filtering.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            f.own = 11;
        }
        node.apply(&moved);
        assert_eq!(
            node.links.port_vlans[&60],
            [PortVlan::access(11), PortVlan::tagged(20)]
        );
        let calls = node.links.calls.len();
        assert!(node.apply(&moved).is_noop());
        assert_eq!(node.links.calls.len(), calls, "idempotent");
        node.apply(&plan(&[], "accept", &[]));

        let mut node = Node::new();
        node.links.no_vlan_filtering = true;
        node.links.gateway_answers = true;
        let eth0 = add_eth0(&mut node);
        let report = node.apply(&trunk_plan(&trunk));
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert!(
            report.failed[0].1.contains("spec.bridge.vlanFiltering")
                && report.failed[0]
                    .1
                    .contains("no VLAN-filtering bridge support"),
            "{:?}",
            report.failed
        );
        assert_eq!(
            link(&node, eth0).unwrap().master,
            None,
            "the uplink is not attached to a bridge that would pass every VLAN"
        );
        assert!(
            NetworkState::read(node.dir.path(), "lan").is_err(),
            "no workload attaches"
        );
    }

    #[test]
    fn a_missing_or_busy_uplink_fails_only_its_network() {
        let mut node = Node::new();
        let mut p = lan_plan(None);
        p.bridges.push(BridgePlan {
            network: "a".into(),
            name: "wn-a".into(),
            mtu: 1500,
            mac: names::bridge_mac("a"),
            addresses: vec!["10.0.0.1/24".parse().unwrap()],
            uplink: None,
        });
        let report = node.apply(&p);
        assert!(
            report.failed[0]
                .1
                .contains("spec.bridge.uplink: interface eth0 does not exist"),
            "{:?}",
            report.failed
        );
        assert!(
            node.links.links.iter().any(|l| l.name == "wn-a"),
            "the other network is realized"
        );
        let eth0 = add_eth0(&mut node);
        node.links
            .links
            .push(foreign(50, "docker0", Some("bridge"), None));
        for l in &mut node.links.links {
            if l.index == eth0 {
                l.master = Some(50);
            }
        }
        let report = node.apply(&lan_plan(None));
        assert!(
            report.failed[0].1.contains("already attached to docker0"),
            "{:?}",
            report.failed
        );
    }
}

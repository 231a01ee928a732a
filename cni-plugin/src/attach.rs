//! ADD, DEL and CHECK: a veth whose peer is born inside the workload's namespace, attached to
//! the network's bridge, with an address from the node's block.

use crate::conf::{AttachmentKind, TapConf};
use crate::conf::{Conf, Env};
use crate::error::{self, CniError};
use crate::reply::{CniResult, Dns, Interface, IpConfig, Route};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use tracing::{debug, info, warn};
use weft_dataplane::ipam::{AllocRequest, Allocation, Attachment, IpamStore, Pool};
use weft_dataplane::names;
use weft_dataplane::netlink::{LinkInfo, Netlink, RouteSpec, VethSpec};
use weft_dataplane::netns::Netns;
use weft_dataplane::proto::{self, Endpoint, Request};
use weft_dataplane::state::{NetworkState, StateError};
use weft_dataplane::tap::{TapSpec, create_persistent_tap};
use weft_dataplane::vlan::{self, VlanRange};

/// The IPAM pool of a network on this node.
pub fn pool_of(net: &NetworkState) -> Pool {
    let mut gateways = Vec::new();
    if let Some(g) = net.gateway_v4 {
        gateways.push(IpAddr::V4(g));
    }
    if let Some(g) = net.gateway_v6 {
        gateways.push(IpAddr::V6(g));
    }
    Pool {
        block_v4: net.block_v4,
        block_v6: net.block_v6,
        subnet_v4: net.subnet_v4,
        subnet_v6: net.subnet_v6,
        gateways,
        exclude: net.exclude.clone(),
    }
}

fn read_network(conf: &Conf, network: &str) -> Result<NetworkState, CniError> {
    NetworkState::read(&conf.state_dir, network).map_err(|e| match e {
        StateError::Read { .. } if e.is_not_found() => CniError::new(
            error::TRY_AGAIN_LATER,
            format!("network {network} is not ready on this node"),
            format!(
                "no runtime state at {}: the weft agent writes it once the Network {network} exists and its nodeSelector selects this node",
                NetworkState::path(&conf.state_dir, network).display()
            ),
        ),
        other => CniError::from_chain(error::IO_FAILURE, "cannot read network state", &other),
    })
}

fn prefixed(ip: IpAddr, net: &NetworkState) -> IpNet {
    match ip {
        IpAddr::V4(a) => {
            let len = net.subnet_v4.map(|s| s.prefix_len()).unwrap_or(32);
            IpNet::new(IpAddr::V4(a), len).unwrap_or(IpNet::from(IpAddr::V4(a)))
        }
        IpAddr::V6(a) => {
            let len = net.subnet_v6.map(|s| s.prefix_len()).unwrap_or(128);
            IpNet::new(IpAddr::V6(a), len).unwrap_or(IpNet::from(IpAddr::V6(a)))
        }
    }
}

fn gateway_for(ip: &IpAddr, net: &NetworkState) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(_) => net.gateway_v4.map(IpAddr::V4),
        IpAddr::V6(_) => net.gateway_v6.map(IpAddr::V6),
    }
}

/// A trunk port (`vlanTrunk`) needs a Network whose bridge filters VLANs, and carries only
/// VLANs of its `spec.bridge.trunkVlans`: otherwise code 7 naming the field and the fix.
fn check_trunk(trunk: &[VlanRange], net: &NetworkState) -> Result<(), CniError> {
    if trunk.is_empty() {
        return Ok(());
    }
    let summary = "invalid network configuration field vlanTrunk";
    let Some(filtering) = &net.vlan_filtering else {
        return Err(CniError::new(
            error::INVALID_CONFIG,
            summary,
            format!(
                "vlanTrunk: the bridge of Network {} does not filter VLANs, so its ports cannot be trunks; set spec.bridge.vlanFiltering: true and list the VLANs in spec.bridge.trunkVlans, or remove vlanTrunk",
                net.name
            ),
        ));
    };
    for (i, r) in trunk.iter().enumerate() {
        if !vlan::covers(&filtering.trunk, r) {
            let allowed: Vec<String> = filtering.trunk.iter().map(ToString::to_string).collect();
            let allowed = if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            };
            let own = if r.contains(filtering.own) {
                format!(
                    " (VLAN {} is the network's own, which every port carries untagged)",
                    filtering.own
                )
            } else {
                String::new()
            };
            return Err(CniError::new(
                error::INVALID_CONFIG,
                summary,
                format!(
                    "vlanTrunk[{i}]: VLAN {r} is not among the trunk VLANs of Network {} (spec.bridge.trunkVlans: {allowed}){own}; add it to trunkVlans or remove it from vlanTrunk",
                    net.name
                ),
            ));
        }
    }
    Ok(())
}

/// Opens `CNI_NETNS`, refusing the node's own network namespace (`/proc/self/ns/net` or a bind
/// mount of it): ADD would replace the node's default route, DEL remove it.
fn open_workload_netns(netns_path: &str) -> Result<Netns, CniError> {
    let ns = Netns::open(Path::new(netns_path)).map_err(|e| {
        CniError::from_chain(
            error::INVALID_ENV,
            format!("cannot open CNI_NETNS {netns_path}"),
            &e,
        )
    })?;
    if is_node_netns(&ns)? {
        return Err(CniError::new(
            error::INVALID_ENV,
            "CNI_NETNS is the node's own network namespace",
            format!(
                "CNI_NETNS {netns_path} is the namespace the plugin runs in (the node's); give the workload's namespace, never the host's"
            ),
        ));
    }
    Ok(ns)
}

fn is_node_netns(ns: &Netns) -> Result<bool, CniError> {
    ns.is_current().map_err(|e| {
        CniError::from_chain(
            error::NETNS_FAILED,
            "cannot compare CNI_NETNS with the node's namespace",
            &e,
        )
    })
}

/// What ADD did so far, undone in reverse if a later step fails.
struct Rollback<'a> {
    store: &'a IpamStore,
    att: Attachment,
    host_index: Option<u32>,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(index) = self.host_index
            && let Ok(mut nl) = Netlink::new()
            && let Err(e) = nl.delete_link(index)
        {
            warn!(error = %e, "rollback: cannot delete host veth");
        }
        if let Err(e) = self.store.release(&self.att) {
            warn!(error = %e, "rollback: cannot release addresses");
        }
    }
}

/// What the agent knows of the pod: the VM it runs, the Networks its annotation asks for.
#[derive(Debug, Default)]
struct PodIdentity {
    vm: Option<String>,
    networks: Option<String>,
    migration: std::collections::BTreeMap<String, proto::MigrationSource>,
    restore: std::collections::BTreeMap<String, proto::Restore>,
}

impl PodIdentity {
    /// What the agent said of the VM's addresses on `network`.
    fn carried(&self, network: &str, kubevirt: bool) -> Carried<'_> {
        Carried {
            migration: self.migration.get(network),
            restore: self.restore.get(network),
            kubevirt,
        }
    }
}

/// A VM's addresses on one network when another node has them: the node it runs on now (this
/// ADD is a live migration's target) or the node it ran on last (a cold start here).
#[derive(Debug, Clone, Copy, Default)]
struct Carried<'a> {
    migration: Option<&'a proto::MigrationSource>,
    restore: Option<&'a proto::Restore>,
    /// The identity is a KubeVirt VM's (the agent's answer, not `VM_NAME`).
    kubevirt: bool,
}

/// The Networks of a pod's `weft.dev/networks` annotation, in order, or a code 7 error naming
/// the annotation.
fn annotated_networks(value: &str) -> Result<Vec<proto::NetworkSelection>, CniError> {
    proto::parse_networks_annotation(value)
        .map_err(|e| CniError::new(error::INVALID_CONFIG, "invalid pod annotation", e))
}

/// ADD: one interface on the configuration's Network; or, when the pod's `weft.dev/networks`
/// annotation lists Networks, one interface on each (`CNI_IFNAME` on the first; the annotation's
/// interface names or `net1`, `net2`… on the others; the default route through the one marked
/// `defaultRoute`, else the first), all or nothing.
pub fn add(conf: &Conf, env: &Env) -> Result<CniResult, CniError> {
    let ifname = env.ifname()?;
    let (pod_namespace, pod_name) = env.pod();
    let pod = match (&pod_namespace, &pod_name) {
        (Some(ns), Some(name)) => identity(conf, ns, name)?,
        _ => PodIdentity::default(),
    };
    let kubevirt = conf.vm.is_none() && pod.vm.is_some();
    let vm = conf.vm.clone().or(pod.vm.clone());
    // Without the annotation (or with an empty one): the configuration's Network alone.
    let list = match pod
        .networks
        .as_deref()
        .map(annotated_networks)
        .transpose()?
    {
        Some(list) if !list.is_empty() => list,
        _ => {
            let network = conf.require_network()?;
            return add_one(
                conf,
                env,
                network,
                ifname,
                conf.default_route,
                vm,
                None,
                pod.carried(network, kubevirt),
            );
        }
    };
    let mut done: Vec<(String, String, CniResult)> = Vec::new();
    let ifnames = interface_names(ifname, &list);
    let via = list.iter().position(|n| n.default_route).unwrap_or(0);
    // A default route asked for on a Network without a gateway would silently be none.
    if let Some(chosen) = list.iter().find(|n| n.default_route) {
        let net = read_network(conf, &chosen.name)?;
        if net.gateway_v4.is_none() && net.gateway_v6.is_none() {
            return Err(CniError::new(
                error::INVALID_CONFIG,
                "invalid pod annotation",
                format!(
                    "{}: Network {} has no gateway (spec.gateway) for the pod's default route; set one, or mark another Network defaultRoute",
                    proto::NETWORKS_ANNOTATION,
                    chosen.name
                ),
            ));
        }
    }
    for (i, (selection, this_if)) in list.iter().zip(ifnames).enumerate() {
        let network = &selection.name;
        let parent = (i > 0).then_some(ifname);
        match add_one(
            conf,
            env,
            network,
            &this_if,
            conf.default_route && i == via,
            vm.clone(),
            parent,
            pod.carried(network, kubevirt),
        ) {
            Ok(r) => done.push((network.clone(), this_if, r)),
            Err(mut e) => {
                for (n, ifn, _) in done.iter().rev() {
                    if let Err(undo) = del_one(conf, env, n, ifn) {
                        warn!(network = %n, ifname = %ifn, error = %undo.details, "cannot undo an interface of a failed ADD");
                    }
                }
                e.details = format!(
                    "{} (interface {this_if} on Network {network} of the pod's {} annotation)",
                    e.details,
                    proto::NETWORKS_ANNOTATION
                );
                return Err(e);
            }
        }
    }
    let mut merged = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: Vec::new(),
        ips: Vec::new(),
        routes: Vec::new(),
        dns: Dns::default(),
    };
    for (_, _, r) in done {
        let offset = merged.interfaces.len();
        merged.interfaces.extend(r.interfaces);
        merged.ips.extend(r.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        merged.routes.extend(r.routes);
    }
    Ok(merged)
}

/// The interface names of the annotation's networks: `primary` (`CNI_IFNAME`) first, then each
/// one's own `interface`, or else `net1`, `net2`… skipping names already taken (a Multus
/// delegate's `CNI_IFNAME` may be `net1`).
fn interface_names(primary: &str, list: &[proto::NetworkSelection]) -> Vec<String> {
    let mut taken: Vec<&str> = vec![primary];
    taken.extend(list.iter().filter_map(|n| n.interface.as_deref()));
    let mut out = Vec::new();
    let mut n = 1;
    for (i, selection) in list.iter().enumerate() {
        if i == 0 {
            out.push(primary.to_string());
            continue;
        }
        if let Some(name) = &selection.interface {
            out.push(name.clone());
            continue;
        }
        let name = loop {
            let name = format!("net{n}");
            n += 1;
            if !taken.contains(&name.as_str()) {
                break name;
            }
        };
        out.push(name);
    }
    out
}

/// One interface `ifname` on `network`. `parent`: the `CNI_IFNAME` of the ADD that made this
/// extra interface (its DEL removes it too). Static addresses and MAC apply to `CNI_IFNAME` only.
/// `migration`: the VM runs on another node now; this is its live migration's target, which
/// keeps the VM's addresses and MAC and stays pending until the VM arrives.
#[allow(clippy::too_many_arguments)]
fn add_one(
    conf: &Conf,
    env: &Env,
    network: &str,
    ifname: &str,
    default_route: bool,
    vm: Option<String>,
    parent: Option<&str>,
    carried: Carried<'_>,
) -> Result<CniResult, CniError> {
    let container_id = env.container_id()?;
    let netns_path = env.netns()?;
    let net = read_network(conf, network)?;
    // Like static addresses and MAC, `vlanTrunk` applies to `CNI_IFNAME`.
    let trunk: &[VlanRange] = if parent.is_none() {
        &conf.vlan_trunk
    } else {
        &[]
    };
    check_trunk(trunk, &net)?;
    // Host ports, like static addresses, belong to `CNI_IFNAME`.
    let port_mappings: &[proto::PortMapping] = if parent.is_none() {
        &conf.port_mappings
    } else {
        &[]
    };
    let ns = open_workload_netns(netns_path)?;
    let mut host = Netlink::new()?;
    let bridge = host.link_by_name(&net.bridge)?.ok_or_else(|| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            format!("bridge {} of network {network} is missing", net.bridge),
            "the weft agent creates it; check that the agent runs on this node",
        )
    })?;
    let store = IpamStore::open(&conf.state_dir, network)?;
    let att = Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    let host_name = names::host_veth_name(container_id, ifname);
    let (pod_namespace, pod_name) = env.pod();
    let tap = match &conf.attachment {
        AttachmentKind::Tap(t) => Some(t.clone()),
        AttachmentKind::Veth => None,
    };
    let statics = parent.is_none();
    // A VM's identity keeps its addresses and MAC across restart and migration.
    let owner = vm;
    let migration = carried
        .migration
        .filter(|_| tap.is_some() && owner.is_some());
    let restore = carried
        .restore
        .filter(|_| tap.is_some() && owner.is_some() && migration.is_none());
    let static_mac = match migration {
        Some(m) => names::parse_mac(&m.mac),
        None => conf.static_mac.filter(|_| statics),
    };
    let requested_mac = static_mac.or_else(|| owner.as_deref().map(|o| names::vm_mac(o, ifname)));
    let alloc = store.allocate(
        &pool_of(&net),
        AllocRequest {
            attachment: att.clone(),
            static_ips: match migration {
                Some(m) => m.ips.clone(),
                None if statics => conf.static_ips.clone(),
                None => Vec::new(),
            },
            adopt: migration.is_some(),
            pending: migration.is_some(),
            owner_kubevirt: carried.kubevirt,
            restore: restore.cloned(),
            vlan_trunk: trunk.to_vec(),
            port_mappings: port_mappings.to_vec(),
            mac: requested_mac.map(names::format_mac),
            host_ifname: Some(host_name.clone()),
            pod_namespace: pod_namespace.clone(),
            pod_name: pod_name.clone(),
            netns: Some(netns_path.to_string()),
            owner: owner.clone(),
            parent: parent.map(str::to_string),
        },
    )?;
    let mut rollback = Rollback {
        store: &store,
        att: att.clone(),
        host_index: None,
        armed: true,
    };
    let mac = alloc
        .mac
        .as_deref()
        .and_then(names::parse_mac)
        .or(static_mac)
        .unwrap_or_else(|| names::workload_mac(&alloc.ips, container_id, ifname));
    // A MAC the runtime asked for must not be one the bridge already delivers elsewhere: a
    // host on the LAN (the router's, on a Bridge network), another port, the node's own.
    // (A migrating or restored VM brings its own MAC, which the LAN may still place on the
    // node it ran on.)
    if conf.static_mac.filter(|_| statics) == Some(mac)
        && migration.is_none()
        && restore.is_none()
        && let Some(holder) = host
            .bridge_fdb(bridge.index)?
            .into_iter()
            .find(|e| e.mac == mac)
    {
        let port = match host.link_by_index(holder.port)? {
            Some(l) if l.index == bridge.index => format!("the bridge {} itself", l.name),
            Some(l) if holder.local => format!("port {} (its own MAC)", l.name),
            Some(l) => format!("a host behind port {}", l.name),
            None => format!("port {}", holder.port),
        };
        return Err(CniError::new(
            error::INVALID_CONFIG,
            "MAC address already in use",
            format!(
                "MAC {} is already in use on bridge {} of network {network}: the bridge delivers it to {port}; ask for another MAC",
                names::format_mac(mac),
                net.bridge
            ),
        ));
    }

    // A previous ADD of the same attachment that crashed half-way may have left its veth.
    if let Some(stale) = host.link_by_name(&host_name)? {
        debug!(link = %host_name, "removing a stale host veth of an interrupted ADD");
        host.delete_link(stale.index)?;
    }
    let mut inner = Netlink::in_netns(&ns)?;
    if let Some(taken) = inner.link_by_name(ifname)? {
        let Some(host_end) = detached_peer(&mut host, conf, &taken)? else {
            return Err(CniError::new(
                error::IFNAME_TAKEN,
                format!("interface {ifname} already exists in the container"),
                format!(
                    "CNI_IFNAME {ifname} is taken in {netns_path}; choose another interface name"
                ),
            ));
        };
        debug!(link = %taken.name, "removing the interface of a detached attachment the runtime's namespace kept");
        host.delete_link(host_end)?;
    }
    // The agent puts the endpoint's rules in place while the link is wired here; ADD returns
    // only once it has answered.
    let registration = Registration::start(
        conf,
        Endpoint {
            network: network.to_string(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            host_ifname: host_name.clone(),
            mac: names::format_mac(mac),
            ips: alloc.ips.clone(),
            pod_namespace,
            pod_name,
            netns: Some(netns_path.to_string()),
            vm: owner.clone(),
            pending: migration.is_some(),
            vlan_trunk: trunk.to_vec(),
            port_mappings: port_mappings.to_vec(),
        },
    )?;
    let alias = names::host_veth_alias(network, container_id, ifname);
    let mut wire = || -> Result<(String, Vec<Route>), CniError> {
        let host_index = host.create_veth_into_netns(&VethSpec {
            host_name: &host_name,
            host_alias: Some(&alias),
            host_master: Some(bridge.index),
            peer_name: ifname,
            peer_netns: ns.fd(),
            peer_mac: Some(mac),
            mtu: Some(net.mtu),
        })?;
        rollback.host_index = Some(host_index);
        // Hairpin: the workload reaches itself through the node's port forwards and host
        // ports (the bridge guard drops the broadcasts and multicasts it would reflect).
        host.set_port_hairpin(host_index, true)?;
        // A VLAN-filtering bridge: an access port on the network's own VLAN, plus the trunk.
        if let Some(f) = &net.vlan_filtering {
            host.set_port_vlans(host_index, &f.workload(trunk))?;
        }
        // A pod's interface gets the addresses and routes; a VM's gets a tap (the guest has
        // them).
        match &tap {
            Some(t) => match wire_tap(&ns, &mut inner, ifname, t, mac, net.mtu) {
                Ok(tap_name) => Ok((tap_name, Vec::new())),
                Err(e) => {
                    unwire_tap(&mut inner, ifname);
                    Err(e)
                }
            },
            None => Ok((
                ifname.to_string(),
                configure_pod_interface(&mut inner, ifname, &alloc.ips, &net, default_route)?,
            )),
        }
    };
    let (sandbox_if, routes) = match wire() {
        Ok(wired) => wired,
        Err(e) => {
            registration.withdraw(conf);
            return Err(e);
        }
    };
    let registered = registration.finish();
    if registered.is_err() && tap.is_some() {
        unwire_tap(&mut inner, ifname);
    }
    registered?;
    rollback.armed = false;
    info!(%network, %container_id, %ifname, interface = %sandbox_if, ips = ?alloc.ips, "attached");

    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: net.bridge.clone(),
                mac: bridge.mac.map(names::format_mac),
                mtu: None,
                sandbox: None,
            },
            Interface {
                name: host_name,
                mac: None,
                mtu: Some(net.mtu),
                sandbox: None,
            },
            Interface {
                name: sandbox_if,
                mac: Some(names::format_mac(mac)),
                mtu: Some(net.mtu),
                sandbox: Some(netns_path.to_string()),
            },
        ],
        ips: alloc
            .ips
            .iter()
            .map(|ip| IpConfig {
                version: None,
                address: prefixed(*ip, &net).to_string(),
                gateway: gateway_for(ip, &net).map(|g| g.to_string()),
                interface: Some(2),
            })
            .collect(),
        routes,
        dns: Dns::default(),
    })
}

/// The host end of `taken`, an interface in the workload's namespace, when it is the pod end of
/// a weft veth whose attachment is gone: DEL leaves the veth to the namespace's teardown (see
/// `del_one`), so a runtime that keeps the namespace and ADDs into it again finds it.
fn detached_peer(
    host: &mut Netlink,
    conf: &Conf,
    taken: &LinkInfo,
) -> Result<Option<u32>, CniError> {
    if taken.kind.as_deref() != Some("veth") {
        return Ok(None);
    }
    let Some(h) = taken
        .peer
        .map(|i| host.link_by_index(i))
        .transpose()?
        .flatten()
    else {
        return Ok(None);
    };
    let network = h.alias.as_deref().and_then(names::endpoint_alias_network);
    let Some(network) = network.filter(|_| h.peer == Some(taken.index)) else {
        return Ok(None);
    };
    let owned = IpamStore::open(&conf.state_dir, network)?
        .list()?
        .iter()
        .any(|a| a.host_link_name() == h.name);
    Ok((!owned).then_some(h.index))
}

/// A pod's interface `ifname` (the veth end): `lo` and it up, its addresses, and the default
/// routes through the network's gateways when `default_route`; returns the routes.
fn configure_pod_interface(
    inner: &mut Netlink,
    ifname: &str,
    ips: &[IpAddr],
    net: &NetworkState,
    default_route: bool,
) -> Result<Vec<Route>, CniError> {
    let peer = inner.link_by_name(ifname)?.ok_or_else(|| {
        CniError::new(
            error::LINK_FAILED,
            format!("interface {ifname} did not appear in the container"),
            "the kernel accepted the veth but its peer is missing",
        )
    })?;
    if let Some(lo) = inner.link_by_name("lo")?
        && !lo.up
    {
        inner.set_up(lo.index)?;
    }
    for ip in ips {
        inner.add_address(peer.index, prefixed(*ip, net), true)?;
    }
    inner.set_up(peer.index)?;
    let mut routes = Vec::new();
    if default_route {
        for ip in ips {
            if let Some(gw) = gateway_for(ip, net) {
                let dst: IpNet = match ip {
                    IpAddr::V4(_) => IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                    IpAddr::V6(_) => IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                }
                .map_err(|e| CniError::new(error::INTERNAL, "route", e.to_string()))?;
                inner.replace_route(&RouteSpec {
                    dst,
                    gateway: Some(gw),
                    oif: Some(peer.index),
                    src: None,
                })?;
                routes.push(Route {
                    dst: dst.to_string(),
                    gw: Some(gw.to_string()),
                });
            }
        }
    }
    Ok(routes)
}

/// Inside the VM's pod: a persistent tap the VMM opens (owner, group, queues, vnet header, MTU
/// and the VM's MAC), joined to weft's veth end `ifname` by tc redirects both ways (no bridge:
/// nothing learns MACs, and the VM's MAC may sit on both links, as KubeVirt copies the pod
/// interface's MAC into the domain). The guest's NIC carries the addresses; the pod holds none.
/// Returns the tap's name.
fn wire_tap(
    ns: &Netns,
    inner: &mut Netlink,
    ifname: &str,
    tap: &TapConf,
    mac: [u8; 6],
    mtu: u32,
) -> Result<String, CniError> {
    let tap_name = names::vm_tap_name(ifname);
    unwire_tap(inner, ifname);
    let port = inner.link_by_name(ifname)?.ok_or_else(|| {
        CniError::new(
            error::LINK_FAILED,
            format!("interface {ifname} did not appear in the container"),
            "the kernel accepted the veth but its peer is missing",
        )
    })?;
    let spec = TapSpec {
        name: &tap_name,
        owner: tap.owner,
        group: tap.group,
        queues: tap.queues,
        vnet_hdr: tap.vnet_hdr,
        mtu: Some(mtu),
        mac: Some(mac),
    };
    let index = weft_dataplane::netns::run_in(ns, || create_persistent_tap(&spec))
        .map_err(|e| CniError::from_chain(error::LINK_FAILED, "cannot enter the pod", &e))?
        .map_err(|e| {
            CniError::from_chain(
                error::LINK_FAILED,
                format!("cannot create tap {tap_name}"),
                &e,
            )
        })?;
    inner.join_links(port.index, index)?;
    inner.set_up(port.index)?;
    inner.set_up(index)?;
    Ok(tap_name)
}

/// Removes a VM's tap of `ifname` (best effort: absent is fine; its tc filters go with it).
fn unwire_tap(inner: &mut Netlink, ifname: &str) {
    let name = names::vm_tap_name(ifname);
    if let Ok(Some(l)) = inner.link_by_name(&name)
        && let Err(e) = inner.delete_link(l.index)
    {
        debug!(link = %name, error = %error::chain(&e), "cannot remove a VM tap");
    }
}

/// Asks the agent what it knows of a pod: the VM it runs (`vm.kubevirt.io/name`) and its
/// `weft.dev/networks` annotation.
fn identity(conf: &Conf, namespace: &str, name: &str) -> Result<PodIdentity, CniError> {
    let reply = proto::call(
        &conf.agent_socket,
        &Request::Identity {
            namespace: namespace.to_string(),
            name: name.to_string(),
            vm: conf.vm.clone(),
        },
        conf.agent_timeout,
    )
    .map_err(unreachable_agent)?;
    // The agent does not know the pod yet (its cache lags the API): attaching without its
    // networks annotation and VM identity would silently drop them, so the runtime retries.
    if !reply.ok {
        return Err(CniError::new(
            error::TRY_AGAIN_LATER,
            format!("the weft agent does not know pod {namespace}/{name} yet"),
            reply.error.unwrap_or_default(),
        ));
    }
    Ok(PodIdentity {
        vm: reply.vm,
        networks: reply.networks,
        migration: reply.migration,
        restore: reply.restore,
    })
}

/// An endpoint's registration with the agent, sent and not answered yet.
struct Registration {
    pending: proto::Pending,
    endpoint: Endpoint,
}

impl Registration {
    /// Sends the registration; an agent that cannot be reached is code 11 (try again later).
    fn start(conf: &Conf, endpoint: Endpoint) -> Result<Registration, CniError> {
        let pending = proto::Pending::start(
            &conf.agent_socket,
            &Request::Register {
                endpoint: endpoint.clone(),
            },
            conf.agent_timeout,
        )
        .map_err(unreachable_agent)?;
        Ok(Registration { pending, endpoint })
    }

    /// Waits for the agent's answer: its refusal is code 105 with its reason.
    fn finish(self) -> Result<(), CniError> {
        let reply = self.pending.finish().map_err(unreachable_agent)?;
        if !reply.ok {
            return Err(CniError::new(
                error::AGENT_REFUSED,
                "the weft agent refused the endpoint",
                reply.error.unwrap_or_default(),
            ));
        }
        Ok(())
    }

    /// Takes back a registration whose link could not be wired (best effort): after the agent's
    /// answer, so the unregistration cannot overtake it.
    fn withdraw(self, conf: &Conf) {
        let endpoint = self.endpoint.clone();
        if self.finish().is_err() {
            return;
        }
        let unregister = Request::Unregister {
            network: endpoint.network,
            container_id: endpoint.container_id,
            ifname: endpoint.ifname,
        };
        if let Err(e) = proto::call(&conf.agent_socket, &unregister, conf.agent_timeout) {
            warn!(error = %error::chain(&e), "cannot withdraw the registration; the agent's resync drops it");
        }
    }
}

fn unreachable_agent(e: proto::ProtoError) -> CniError {
    CniError::from_chain(
        error::TRY_AGAIN_LATER,
        "the weft agent is not reachable",
        &e,
    )
}

/// DEL: best effort and idempotent; a missing netns, link or allocation is success.
pub fn del(conf: &Conf, env: &Env) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let mut errors: Vec<String> = Vec::new();
    if let Some(network) = conf.network.as_deref()
        && let Err(e) = del_one(conf, env, network, ifname)
    {
        errors.push(e.details);
    }
    // The interfaces this ADD made from the pod's weft.dev/networks annotation, wherever they
    // are: the IPAM stores say (the pod may be gone from the API by now).
    for (network, extra) in extra_interfaces(conf, container_id, ifname) {
        if let Err(e) = del_one(conf, env, &network, &extra) {
            errors.push(e.details);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            error::IO_FAILURE,
            "DEL could not remove everything",
            errors.join("; "),
        ))
    }
}

/// `(network, ifname)` of every allocation of `container_id` that the ADD of its interface
/// `ifname` made from the pod's `weft.dev/networks` annotation.
fn extra_interfaces(conf: &Conf, container_id: &str, ifname: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for network in IpamStore::networks(&conf.state_dir) {
        let Ok(allocs) = IpamStore::open(&conf.state_dir, &network).and_then(|s| s.list()) else {
            continue;
        };
        for a in allocs {
            if a.container_id == container_id && a.parent.as_deref() == Some(ifname) {
                out.push((network.clone(), a.ifname));
            }
        }
    }
    out
}

/// Removes one interface: best effort and idempotent; a missing netns, link or allocation is
/// success. The agent unregisters the attachment and releases its addresses before it
/// answers, and takes the rules out and sees to the host link after (see
/// [`Request::Detach`]); without an agent that can, the DEL does it all itself and the agent
/// catches up from the IPAM store at its resync.
fn del_one(conf: &Conf, env: &Env, network: &str, ifname: &str) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    // 1. A VM's tap, when the pod's namespace still exists.
    // Never inside the node's own namespace (a CNI_NETNS of /proc/self/ns/net).
    if matches!(conf.attachment, AttachmentKind::Tap(_))
        && let Some(path) = env.netns.as_deref()
        && let Ok(ns) = Netns::open(Path::new(path))
        && matches!(ns.is_current(), Ok(false))
        && let Ok(mut inner) = Netlink::in_netns(&ns)
    {
        unwire_tap(&mut inner, ifname);
    }
    // 2. The agent: addresses, then the rules and the link.
    let detach = Request::Detach {
        network: network.to_string(),
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    match proto::call(&conf.agent_socket, &detach, conf.agent_timeout) {
        Ok(reply) if reply.ok => {
            info!(%network, %container_id, %ifname, "detached");
            return Ok(());
        }
        Ok(reply) => {
            debug!(error = ?reply.error, "the agent did not detach; removing the attachment here");
            // An agent that answers but cannot detach (an older one) still forgets the
            // endpoint before its addresses go.
            let unregister = Request::Unregister {
                network: network.to_string(),
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            };
            if let Err(e) = proto::call(&conf.agent_socket, &unregister, conf.agent_timeout) {
                debug!(error = %error::chain(&e), "agent not reachable for unregister; it resyncs from the IPAM store");
            }
        }
        Err(e) => {
            debug!(error = %error::chain(&e), "agent not reachable for detach; removing the attachment here")
        }
    }
    let mut errors: Vec<String> = Vec::new();
    // 3. The link (deleting the host end removes the peer in the container too).
    let host_name = names::host_veth_name(container_id, ifname);
    match Netlink::new().and_then(|mut nl| {
        if let Some(l) = nl.link_by_name(&host_name)? {
            nl.delete_link(l.index)?;
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => errors.push(format!("delete {host_name}: {}", error::chain(&e))),
    }
    // 4. The addresses.
    match IpamStore::open(&conf.state_dir, network).and_then(|s| {
        s.release(&Attachment {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    }) {
        Ok(_) => {}
        Err(e) => errors.push(format!("release addresses: {}", error::chain(&e))),
    }
    if errors.is_empty() {
        info!(%network, %container_id, %ifname, "detached");
        Ok(())
    } else {
        Err(CniError::new(
            error::IO_FAILURE,
            "DEL could not remove everything",
            errors.join("; "),
        ))
    }
}

/// CHECK: the attachment is still as ADD left it.
pub fn check(conf: &Conf, env: &Env) -> Result<(), CniError> {
    let network = conf.require_network()?;
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let ns = open_workload_netns(netns_path)?;
    let mismatch = |what: String| {
        CniError::new(
            error::CHECK_MISMATCH,
            "the attachment differs from what ADD created",
            what,
        )
    };
    let prev: CniResult = match &conf.prev_result {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                error::DECODE,
                "cannot decode prevResult",
                format!("prevResult: {e}"),
            )
        })?,
        None => {
            return Err(CniError::new(
                error::INVALID_CONFIG,
                "CHECK needs prevResult",
                "prevResult: missing; the runtime passes the result of ADD",
            ));
        }
    };
    let net = read_network(conf, network)?;
    let store = IpamStore::open(&conf.state_dir, network)?;
    let alloc: Allocation = store
        .get(&Attachment {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })?
        .ok_or_else(|| {
            mismatch(format!(
                "no address is allocated to {container_id}/{ifname}"
            ))
        })?;
    let mut host = Netlink::new()?;
    let host_name = names::host_veth_name(container_id, ifname);
    let host_link = host
        .link_by_name(&host_name)?
        .ok_or_else(|| mismatch(format!("host veth {host_name} is missing")))?;
    let bridge = host
        .link_by_name(&net.bridge)?
        .ok_or_else(|| mismatch(format!("bridge {} is missing", net.bridge)))?;
    if host_link.master != Some(bridge.index) {
        return Err(mismatch(format!(
            "host veth {host_name} is not attached to bridge {}",
            net.bridge
        )));
    }
    if let Some(f) = &net.vlan_filtering {
        let want = f.workload(&alloc.vlan_trunk).entries();
        let mut have = host.port_vlans(host_link.index)?;
        have.sort();
        if have != want {
            return Err(mismatch(format!(
                "host veth {host_name} carries VLANs {have:?}, not {want:?} (the network's own VLAN untagged and vlanTrunk tagged)"
            )));
        }
    }
    let mut inner = Netlink::in_netns(&ns)?;
    if matches!(conf.attachment, AttachmentKind::Tap(_)) {
        // A VM's addresses live in the guest: check the wiring up to its tap.
        let tap = names::vm_tap_name(ifname);
        for name in [ifname, tap.as_str()] {
            let l = inner
                .link_by_name(name)?
                .ok_or_else(|| mismatch(format!("interface {name} is missing in the pod")))?;
            if !l.up {
                return Err(mismatch(format!("interface {name} is down")));
            }
        }
        return Ok(());
    }
    let link = inner
        .link_by_name(ifname)?
        .ok_or_else(|| mismatch(format!("interface {ifname} is missing in the container")))?;
    if !link.up {
        return Err(mismatch(format!("interface {ifname} is down")));
    }
    if let Some(iface) = prev.interfaces.iter().find(|i| i.sandbox.is_some())
        && let Some(mac) = &iface.mac
        && link.mac.map(names::format_mac).as_deref() != Some(mac.as_str())
    {
        return Err(mismatch(format!("interface {ifname} MAC is not {mac}")));
    }
    let have: Vec<IpNet> = inner
        .addresses(Some(link.index))?
        .into_iter()
        .map(|a| a.addr)
        .collect();
    for ip in &prev.ips {
        let want: IpNet = ip.address.parse().map_err(|_| {
            CniError::new(
                error::DECODE,
                "cannot decode prevResult",
                format!("prevResult.ips: {:?} is not a CIDR", ip.address),
            )
        })?;
        if !have.contains(&want) {
            return Err(mismatch(format!("address {want} is missing on {ifname}")));
        }
        if !alloc.ips.contains(&want.addr()) {
            return Err(mismatch(format!(
                "address {want} is not allocated to this attachment"
            )));
        }
    }
    for route in &prev.routes {
        let dst: IpNet = route.dst.parse().map_err(|_| {
            CniError::new(
                error::DECODE,
                "cannot decode prevResult",
                format!("prevResult.routes: {:?} is not a CIDR", route.dst),
            )
        })?;
        let family = if dst.addr().is_ipv4() {
            weft_dataplane::netlink::Family::V4
        } else {
            weft_dataplane::netlink::Family::V6
        };
        let gw: Option<IpAddr> = route.gw.as_deref().and_then(|g| g.parse().ok());
        let found = inner
            .routes(family)?
            .iter()
            .any(|r| r.dst == dst && (gw.is_none() || r.gateway == gw));
        if !found {
            return Err(mismatch(format!(
                "route to {dst} is missing in the container"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_networks_annotation_lists_names_in_order_once_each() {
        let names: Vec<String> = annotated_networks(" nat-demo, lan ,")
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["nat-demo", "lan"]);
        for bad in [
            "nat-demo,LAN",
            "a,b,a",
            "lan@net1",
            r#"[{"name": "a", "mac": "x"}]"#,
        ] {
            let e = annotated_networks(bad).unwrap_err();
            assert_eq!(e.code, error::INVALID_CONFIG, "{bad}");
            assert!(e.details.contains("weft.dev/networks"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn extra_interfaces_are_named_net_n_and_never_clash_with_cni_ifname() {
        let list = |v: &str| annotated_networks(v).unwrap();
        assert_eq!(
            interface_names("eth0", &list("a,b,c")),
            ["eth0", "net1", "net2"]
        );
        assert_eq!(
            interface_names("net1", &list("a,b,c")),
            ["net1", "net2", "net3"]
        );
        assert_eq!(interface_names("eth0", &list("a")), ["eth0"]);
        // Named interfaces keep their names; the others skip them.
        assert_eq!(
            interface_names(
                "eth0",
                &list(r#"[{"name": "a"}, {"name": "b"}, {"name": "c", "interface": "net1"}]"#)
            ),
            ["eth0", "net2", "net1"]
        );
    }

    #[test]
    fn del_finds_the_interfaces_its_add_made_from_the_annotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = crate::conf::Env::default();
        env.node.state_dir = dir.path().to_path_buf();
        let conf = crate::conf::parse_conf(
            br#"{"cniVersion":"1.0.0","name":"n","type":"weft","network":"nat"}"#,
            &env,
        )
        .unwrap();
        let pool = Pool {
            block_v4: Some("10.0.0.0/24".parse().unwrap()),
            subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
            ..Pool::default()
        };
        let alloc = |network: &str, cid: &str, ifname: &str, parent: Option<&str>| {
            IpamStore::open(dir.path(), network)
                .unwrap()
                .allocate(
                    &pool,
                    AllocRequest {
                        attachment: Attachment {
                            container_id: cid.into(),
                            ifname: ifname.into(),
                        },
                        parent: parent.map(str::to_string),
                        ..AllocRequest::default()
                    },
                )
                .unwrap();
        };
        alloc("nat", "c1", "eth0", None);
        alloc("lan", "c1", "net1", Some("eth0"));
        alloc("lan", "c1", "net2", None); // a Multus delegate's own attachment
        alloc("lan", "c2", "net1", Some("eth0"));
        assert_eq!(
            extra_interfaces(&conf, "c1", "eth0"),
            [("lan".to_string(), "net1".to_string())]
        );
    }
}

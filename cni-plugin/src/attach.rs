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
use weft_dataplane::attachment::{self, Ask, AskError, Attached, Identity};
use weft_dataplane::ipam::{Allocation, Attachment, IpamStore, Related};
use weft_dataplane::names;
use weft_dataplane::netlink::{
    CreatedVeth, LinkIndex, LinkInfo, Netlink, NetlinkError, RouteSpec, VethSpec,
};
use weft_dataplane::netns::Netns;
use weft_dataplane::proto::{self, Endpoint, Request};
use weft_dataplane::state::{NetworkMode, NetworkState, StateError};
use weft_dataplane::tap::{TapSpec, create_persistent_tap};
use weft_dataplane::vlan::VlanRange;

/// The loopback link's index in every network namespace (the kernel registers it first).
const LOOPBACK_INDEX: u32 = 1;

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

/// Whether a pod's interface on `net` goes without IPv6 addresses of its own (`addrgenmode
/// none`: no link-local address, so no duplicate address probe, MLD reports or router
/// solicitations as it comes up). So on a NAT network without an IPv6 subnet: its bridge drops
/// every workload's link-local traffic but neighbour discovery, and with no other IPv6
/// address to discover, the link-local address could reach nothing, while the multicasts it
/// sends as it comes up are copied to every port of the bridge. A Bridge network's pods keep
/// theirs (the LAN's IPv6 hosts and the policies judge it), as does every pod of a network
/// with IPv6. The pod's IPv6 stack stays on: `::1`, and addresses the pod adds itself.
fn pod_without_v6(net: &NetworkState) -> bool {
    net.mode == NetworkMode::Nat && net.subnet_v6.is_none()
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

fn ask_error(e: AskError) -> CniError {
    CniError::new(e.code, e.msg, e.details)
}

/// What the ADD asks for.
fn ask_of(conf: &Conf, env: &Env) -> Result<Ask, CniError> {
    let (pod_namespace, pod_name) = env.pod();
    Ok(Ask {
        container_id: env.container_id()?.to_string(),
        ifname: env.ifname()?.to_string(),
        netns: env.netns()?.to_string(),
        pod_namespace,
        pod_name,
        network: conf.network.clone(),
        vm: conf.vm.clone(),
        tap: matches!(conf.attachment, AttachmentKind::Tap(_)),
        static_ips: conf.static_ips.clone(),
        static_mac: conf.static_mac.map(names::format_mac),
        vlan_trunk: conf.vlan_trunk.clone(),
        port_mappings: conf.port_mappings.clone(),
        bandwidth: conf.bandwidth,
    })
}

/// The agent connection of an ADD or DEL that went through, kept open for the report that
/// follows the result ([`proto::Pending::follow_with`]).
#[derive(Debug, Default)]
pub struct Kept(pub Option<proto::Pending>);

/// ADD: one interface on the configuration's Network; or, when the pod's `weft.dev/networks`
/// annotation lists Networks, one interface on each (`CNI_IFNAME` on the first; the annotation's
/// interface names or `net1`, `net2`… on the others; the default route through the one marked
/// `defaultRoute`, else the first), all or nothing.
///
/// One request to the agent ([`Request::Attach`]): it finds the pod's VM and Networks and
/// allocates each interface's addresses, answers with them, and puts their rules in place while
/// the links are wired here; ADD returns after its second answer. While the agent allocates,
/// the veth it will most likely answer for is made here ([`Ahead`]). An agent that does not
/// know the request (an older one) leaves the allocation and registration to the plugin
/// ([`add_here`]).
pub fn add(conf: &Conf, env: &Env, kept: &mut Kept) -> Result<CniResult, CniError> {
    let ask = ask_of(conf, env)?;
    let mut pending = proto::Pending::start(
        &conf.agent_socket,
        &Request::Attach { ask: ask.clone() },
        conf.agent_timeout,
    )
    .map_err(unreachable_agent)?;
    let ns = open_workload_netns(&ask.netns);
    let ahead = ns.as_ref().ok().and_then(|ns| Ahead::make(conf, ns, &ask));
    let first = pending.answer().map_err(unreachable_agent)?;
    if first.is_bad_request() {
        debug!("the agent does not attach (an older one): allocating here");
        drop((pending, ahead));
        return add_here(conf, env, &ask);
    }
    if !first.ok {
        return Err(agent_failure(first, error::TRY_AGAIN_LATER));
    }
    // The configuration and the pod first, then the environment (as without an agent).
    let ns = match ns {
        Ok(ns) => ns,
        Err(e) => {
            let _ = pending.answer();
            undo_attach(conf, env, None, &first.attached, &[]);
            return Err(e);
        }
    };
    // A veth made ahead that no interface takes goes now, before its names are wired anew.
    let mut ahead = ahead.filter(|h| first.attached.iter().any(|a| h.fits(a)));
    let mut wired: Vec<Wired> = Vec::new();
    for a in &first.attached {
        let done = match ahead.as_mut().and_then(|h| h.take(a)) {
            Some((net, made)) => wire(conf, &ns, &net, &ask.container_id, a, Some(made)),
            None => read_network(conf, &a.interface.network)
                .and_then(|net| wire(conf, &ns, &net, &ask.container_id, a, None)),
        };
        match done {
            Ok(w) => wired.push(w),
            Err(mut e) => {
                // After the agent's second answer, so the detach cannot overtake the
                // registration.
                let _ = pending.answer();
                undo_attach(conf, env, Some(&ns), &first.attached, &wired);
                e.details = a.interface.annotate(&e.details);
                return Err(e);
            }
        }
    }
    match pending.answer() {
        Ok(second) if second.ok => kept.0 = Some(pending),
        // Refused: the agent has released the addresses.
        Ok(second) => {
            for w in &wired {
                w.undo(&ns);
            }
            return Err(agent_failure(second, error::AGENT_REFUSED));
        }
        Err(e) => {
            undo_attach(conf, env, Some(&ns), &first.attached, &wired);
            return Err(unreachable_agent(e));
        }
    }
    info!(container_id = %ask.container_id, interfaces = wired.len(), "attached");
    Ok(merged(conf, wired))
}

/// The veth of the interface an ADD most likely gets, `CNI_IFNAME` on the configuration's
/// Network, made while the agent allocates: the two take about as long, and run side by side
/// (a pod's loopback goes up then too).
/// The peer has the kernel's MAC until it goes up with the allocated one. The interface the
/// agent answers for with that Network, name and host link takes it; if none does (the pod's
/// annotation chose other Networks, the agent refused or is an older one, the ADD failed
/// first) it is deleted when dropped. Made only where nothing is in the way: a taken name is
/// left to the wiring after the answer, which clears what is stale ([`clear_names`]).
struct Ahead {
    network: String,
    host_ifname: String,
    ifname: String,
    /// The veth and the network state it was made for, until an interface takes them.
    made: Option<(NetworkState, Made)>,
}

impl Ahead {
    fn make(conf: &Conf, ns: &Netns, ask: &Ask) -> Option<Ahead> {
        let network = ask.network.clone()?;
        let net = read_network(conf, &network).ok()?;
        let host_ifname = names::host_veth_name(&ask.container_id, &ask.ifname);
        let veth = VethNames {
            network: &network,
            host: &host_ifname,
            peer: &ask.ifname,
        };
        match make_veth(conf, ns, &net, &veth, None, false) {
            Ok(mut made) => {
                // A pod's loopback too, which needs no answer either (a VM's pod keeps its
                // own; `configure_pod_interface` sets it up when this could not), and the
                // peer's IPv6 addresses off where it has no use for them (before it comes up).
                if matches!(conf.attachment, AttachmentKind::Veth) {
                    match loopback_up(&mut made.inner) {
                        Ok(()) => made.lo_up = true,
                        Err(e) => debug!(error = %e.details, "loopback not set up ahead"),
                    }
                    if let Some(peer) = made.created.peer.filter(|_| pod_without_v6(&net)) {
                        match made.inner.set_no_v6_addresses(peer) {
                            Ok(()) => made.without_v6 = true,
                            Err(e) => debug!(error = %e, "IPv6 addresses not turned off ahead"),
                        }
                    }
                }
                Some(Ahead {
                    network,
                    host_ifname,
                    ifname: ask.ifname.clone(),
                    made: Some((net, made)),
                })
            }
            Err(e) => {
                debug!(error = %e.details, "no veth made ahead: it is made after the agent's answer");
                None
            }
        }
    }

    /// Whether it is the veth of interface `a`.
    fn fits(&self, a: &Attached) -> bool {
        a.interface.network == self.network
            && a.interface.ifname == self.ifname
            && a.host_ifname == self.host_ifname
    }

    /// The veth, with the network state it was made for, when it is `a`'s.
    fn take(&mut self, a: &Attached) -> Option<(NetworkState, Made)> {
        if !self.fits(a) {
            return None;
        }
        self.made.take()
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some((_, made)) = self.made.take() {
            made.discard();
        }
    }
}

/// The error the agent answered, with its code (`default` when it gave none).
fn agent_failure(reply: proto::Reply, default: u32) -> CniError {
    CniError::new(
        reply.code.unwrap_or(default),
        reply
            .msg
            .unwrap_or_else(|| "the weft agent could not attach".to_string()),
        reply.error.unwrap_or_default(),
    )
}

/// Undoes an ADD the agent attached: the links wired here at once, then every interface as
/// its DEL would (the agent's detach, or here when it cannot).
fn undo_attach(conf: &Conf, env: &Env, ns: Option<&Netns>, attached: &[Attached], wired: &[Wired]) {
    if let Some(ns) = ns {
        for w in wired {
            w.undo(ns);
        }
    }
    for a in attached {
        let (network, ifname) = (&a.interface.network, &a.interface.ifname);
        if let Err(e) = del_one(conf, env, network, ifname, false, &mut Kept::default()) {
            warn!(%network, %ifname, error = %e.details, "cannot undo an interface of a failed ADD");
        }
    }
}

/// One interface wired: its part of the result, and what undoes it.
struct Wired {
    result: CniResult,
    host_index: u32,
    ifname: String,
    tap: bool,
}

impl Wired {
    /// Deletes the link (its peer in the workload goes with it) and a VM's tap.
    fn undo(&self, ns: &Netns) {
        if self.tap
            && let Ok(mut inner) = Netlink::entering(ns)
        {
            unwire_tap(&mut inner, &self.ifname);
        }
        if let Ok(mut nl) = Netlink::new()
            && let Err(e) = nl.delete_link(self.host_index)
        {
            warn!(error = %e, "cannot delete the host veth of a failed ADD");
        }
    }
}

/// The results of every interface, as one.
fn merged(conf: &Conf, wired: Vec<Wired>) -> CniResult {
    let mut merged = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: Vec::new(),
        ips: Vec::new(),
        routes: Vec::new(),
        dns: Dns::default(),
    };
    for w in wired {
        let r = w.result;
        let offset = merged.interfaces.len();
        merged.interfaces.extend(r.interfaces);
        merged.ips.extend(r.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        merged.routes.extend(r.routes);
    }
    merged
}

/// ADD without an agent that attaches: the plugin asks the agent about the pod, allocates
/// from the IPAM store itself and registers each endpoint.
fn add_here(conf: &Conf, env: &Env, ask: &Ask) -> Result<CniResult, CniError> {
    let identity = match (&ask.pod_namespace, &ask.pod_name) {
        (Some(namespace), Some(name)) => identity(conf, namespace, name)?,
        _ => Identity::default(),
    };
    let held = attachment::held(&conf.state_dir, ask, &identity, true)?;
    let list = attachment::interfaces(ask, &identity, &held).map_err(ask_error)?;
    if let Some(network) = attachment::marked_default_route(&identity) {
        attachment::check_default_route(&read_network(conf, &network)?).map_err(ask_error)?;
    }
    // A Network not ready here (try again later) before the environment, as with an agent.
    if let Some(first) = list.first() {
        read_network(conf, &first.network)?;
    }
    let ns = &open_workload_netns(&ask.netns)?;
    let mut done: Vec<(&attachment::Interface, Wired)> = Vec::new();
    for iface in &list {
        match add_one_here(conf, ask, &identity, iface, ns) {
            Ok(w) => done.push((iface, w)),
            Err(mut e) => {
                for (i, _) in done.iter().rev() {
                    if let Err(undo) = del_one(
                        conf,
                        env,
                        &i.network,
                        &i.ifname,
                        false,
                        &mut Kept::default(),
                    ) {
                        warn!(network = %i.network, ifname = %i.ifname, error = %undo.details, "cannot undo an interface of a failed ADD");
                    }
                }
                e.details = iface.annotate(&e.details);
                return Err(e);
            }
        }
    }
    info!(container_id = %ask.container_id, interfaces = done.len(), "attached");
    Ok(merged(conf, done.into_iter().map(|(_, w)| w).collect()))
}

/// One interface of [`add_here`]: allocated here, registered with the agent while it is wired.
fn add_one_here(
    conf: &Conf,
    ask: &Ask,
    identity: &Identity,
    iface: &attachment::Interface,
    ns: &Netns,
) -> Result<Wired, CniError> {
    let net = read_network(conf, &iface.network)?;
    let (req, carried) = attachment::alloc_request(ask, identity, iface);
    attachment::check_trunk(&req.vlan_trunk, &net).map_err(ask_error)?;
    let store = IpamStore::open(&conf.state_dir, &iface.network)?;
    let att = req.attachment.clone();
    let alloc = store.allocate(&net.pool(), req)?;
    let rollback = Release {
        store: &store,
        att,
        armed: true,
    };
    let attached = Attached {
        interface: iface.clone(),
        ips: alloc.ips.clone(),
        mac: names::format_mac(alloc.effective_mac()),
        host_ifname: alloc.host_link_name(),
        carried,
    };
    // The agent puts the endpoint's rules in place while the link is wired here.
    let registration =
        Registration::start(conf, Endpoint::from_allocation(&iface.network, &alloc))?;
    let wired = match wire(conf, ns, &net, &ask.container_id, &attached, None) {
        Ok(w) => w,
        Err(e) => {
            registration.withdraw(conf);
            return Err(e);
        }
    };
    if let Err(e) = registration.finish() {
        wired.undo(ns);
        return Err(e);
    }
    rollback.disarm();
    Ok(wired)
}

/// Releases an allocation made here unless disarmed (a failed ADD keeps no address).
struct Release<'a> {
    store: &'a IpamStore,
    att: Attachment,
    armed: bool,
}

impl Release<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.store.release(&self.att)
        {
            warn!(error = %e, "rollback: cannot release addresses");
        }
    }
}

/// Wires one allocated interface: the veth with its peer born in the workload's namespace,
/// on the network's bridge (`made` when it was made ahead, [`Ahead`]), with hairpin and VLANs;
/// in the workload, the addresses and routes of a pod or the tap of a VM. On failure nothing
/// of it is left.
fn wire(
    conf: &Conf,
    ns: &Netns,
    net: &NetworkState,
    container_id: &str,
    a: &Attached,
    made: Option<Made>,
) -> Result<Wired, CniError> {
    let network = &a.interface.network;
    let ifname = a.interface.ifname.as_str();
    let own = a.interface.parent.is_none();
    let Some(mac) = names::parse_mac(&a.mac) else {
        if let Some(made) = made {
            made.discard();
        }
        return Err(CniError::new(
            error::INTERNAL,
            "the allocation's MAC does not parse",
            format!("MAC {:?} of interface {ifname}", a.mac),
        ));
    };
    let veth = VethNames {
        network,
        host: &a.host_ifname,
        peer: ifname,
    };
    let Made {
        mut host,
        mut inner,
        bridge,
        created,
        peer_mac,
        lo_up,
        without_v6,
    } = match made {
        Some(made) => made,
        None => make_veth(conf, ns, net, &veth, Some(mac), true)?,
    };
    let tap = match &conf.attachment {
        AttachmentKind::Tap(t) => Some(t),
        AttachmentKind::Veth => None,
    };
    let trunk: &[VlanRange] = if own { &conf.vlan_trunk } else { &[] };
    let alias = names::host_veth_alias(network, container_id, ifname);
    // The peer of a veth made ahead takes its MAC as it goes up.
    let set_mac = (peer_mac != Some(mac)).then_some(mac);
    let host_index = created.host;
    let mut wired = Wired {
        result: CniResult {
            cni_version: conf.cni_version.clone(),
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Dns::default(),
        },
        host_index,
        ifname: ifname.to_string(),
        tap: tap.is_some(),
    };
    let mut finish = || -> Result<(String, Vec<Route>), CniError> {
        // A MAC the runtime asked for must not be one the bridge already delivers elsewhere:
        // a host on the LAN (the router's, on a Bridge network), another port, the node's own.
        // (A migrating or restored VM brings its own MAC, which the LAN may still place on
        // the node it ran on.) The new peer is down: the bridge has not learnt its MAC.
        if own && conf.static_mac == Some(mac) && !a.carried {
            check_mac_free(&mut host, &bridge, mac, &veth)?;
        }
        // Hairpin: the workload reaches itself through the node's port forwards and host
        // ports (the bridge guard drops the broadcasts and multicasts it would reflect).
        host.set_workload_port(host_index, true, &alias)?;
        // A VLAN-filtering bridge: an access port on the network's own VLAN, plus the trunk.
        if let Some(f) = &net.vlan_filtering {
            host.set_port_vlans(host_index, &f.workload(trunk))?;
        }
        // A pod's interface gets the addresses and routes; a VM's gets a tap (the guest has
        // them).
        match tap {
            Some(t) => Ok((
                wire_tap(ns, &mut inner, ifname, t, mac, set_mac, net.mtu)?,
                Vec::new(),
            )),
            None => Ok((
                ifname.to_string(),
                configure_pod_interface(
                    &mut inner,
                    &PodInterface {
                        name: ifname,
                        index: created.peer,
                        mac: set_mac,
                        set_lo_up: !lo_up,
                        without_v6: pod_without_v6(net) && !without_v6,
                    },
                    &a.ips,
                    net,
                    conf.default_route && a.interface.default_route,
                )?,
            )),
        }
    };
    let (sandbox_if, routes) = match finish() {
        Ok(done) => done,
        Err(e) => {
            wired.undo(ns);
            return Err(e);
        }
    };
    wired.result.interfaces = vec![
        Interface {
            name: net.bridge.clone(),
            // A bridge without a MAC of its own takes its ports' lowest, and has none
            // (00:00:00:00:00:00) while it has no port: nothing to report then.
            mac: bridge.mac.filter(|m| *m != [0; 6]).map(names::format_mac),
            mtu: None,
            sandbox: None,
        },
        Interface {
            name: a.host_ifname.clone(),
            mac: None,
            mtu: Some(net.mtu),
            sandbox: None,
        },
        Interface {
            name: sandbox_if,
            mac: Some(names::format_mac(mac)),
            mtu: Some(net.mtu),
            sandbox: Some(ns.path().display().to_string()),
        },
    ];
    wired.result.ips = a
        .ips
        .iter()
        .map(|ip| IpConfig {
            version: None,
            address: prefixed(*ip, net).to_string(),
            gateway: gateway_for(ip, net).map(|g| g.to_string()),
            interface: Some(2),
        })
        .collect();
    wired.result.routes = routes;
    info!(%network, %ifname, ips = ?a.ips, "interface wired");
    Ok(wired)
}

/// The names of one interface's veth: its Network, its host end and its peer in the workload.
struct VethNames<'a> {
    network: &'a str,
    host: &'a str,
    peer: &'a str,
}

/// A veth made for one interface, with the sockets that made it (the node's and the
/// workload's) and the network's bridge it is on.
struct Made {
    host: Netlink,
    inner: Netlink,
    bridge: LinkIndex,
    created: CreatedVeth,
    /// The MAC the peer was born with, if it was given one.
    peer_mac: Option<[u8; 6]>,
    /// The workload's loopback was found or set up (made ahead, see [`Ahead`]).
    lo_up: bool,
    /// The peer was told to generate no IPv6 address of its own (see [`pod_without_v6`]).
    without_v6: bool,
}

impl Made {
    /// Deletes the veth (its peer goes with it).
    fn discard(mut self) {
        if let Err(e) = self.host.delete_link(self.created.host) {
            warn!(error = %e, "cannot delete a veth made for a failed ADD");
        }
    }
}

/// The error of a veth's creation on `bridge`, network `network`'s bridge. A Linux bridge
/// takes at most 1023 ports (`BR_MAX_PORTS`); one more is refused with `EXFULL`, which says
/// nothing by itself ("No error information" with musl), so that one is named.
fn veth_failed(e: NetlinkError, bridge: &str, network: &str) -> CniError {
    if e.errno() != Some(nix::errno::Errno::EXFULL as i32) {
        return e.into();
    }
    CniError::new(
        error::LINK_FAILED,
        format!("bridge {bridge} of network {network} has no free port"),
        format!(
            "a Linux bridge takes at most 1023 ports, and {bridge} has them all: spread network \
             {network}'s workloads over more nodes (a lower maxPods for kubelet) or more \
             Networks ({})",
            error::chain(&e)
        ),
    )
}

/// Makes the veth `veth` on `net`'s bridge, up on the node's side, its peer born down in `ns`
/// (with `mac` when given). `clear`: names left from before are cleared ([`clear_names`]) and
/// the veth made once more; otherwise a taken name is the error.
fn make_veth(
    conf: &Conf,
    ns: &Netns,
    net: &NetworkState,
    veth: &VethNames<'_>,
    mac: Option<[u8; 6]>,
    clear: bool,
) -> Result<Made, CniError> {
    let mut host = Netlink::new()?;
    // Its index and MAC only, without the RTNL lock every ADD's link changes take.
    let bridge = host.link_index_and_mac(&net.bridge)?.ok_or_else(|| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            format!(
                "bridge {} of network {} is missing",
                net.bridge, veth.network
            ),
            "the weft agent creates it; check that the agent runs on this node",
        )
    })?;
    let mut inner = Netlink::entering(ns)?;
    // The alias goes on with the hairpin, in one request, after the agent's answer: the
    // agent's sweep deletes a link with weft's alias that no recorded allocation owns.
    let spec = VethSpec {
        host_name: veth.host,
        host_alias: None,
        host_master: Some(bridge.index),
        peer_name: veth.peer,
        peer_netns: ns.fd(),
        peer_mac: mac,
        mtu: Some(net.mtu),
    };
    // A name taken: on either side, what `clear_names` may remove, then once more.
    let failed = |e| veth_failed(e, &net.bridge, veth.network);
    let created = match host.create_veth_pair_into_netns(&spec, Some(&mut inner)) {
        Err(e) if clear && e.is_exists() => {
            clear_names(conf, ns, &mut host, &mut inner, veth.host, veth.peer)?;
            host.create_veth_pair_into_netns(&spec, Some(&mut inner))
                .map_err(failed)?
        }
        other => other.map_err(failed)?,
    };
    Ok(Made {
        host,
        inner,
        bridge,
        created,
        peer_mac: mac,
        lo_up: false,
        without_v6: false,
    })
}

/// Refuses MAC `mac` when `bridge`'s forwarding database places it on some port already.
fn check_mac_free(
    host: &mut Netlink,
    bridge: &LinkIndex,
    mac: [u8; 6],
    veth: &VethNames<'_>,
) -> Result<(), CniError> {
    let Some(holder) = host
        .bridge_fdb(bridge.index)?
        .into_iter()
        .find(|e| e.mac == mac)
    else {
        return Ok(());
    };
    let port = match host.link_by_index(holder.port)? {
        Some(l) if l.index == bridge.index => format!("the bridge {} itself", l.name),
        Some(l) if holder.local => format!("port {} (its own MAC)", l.name),
        Some(l) => format!("a host behind port {}", l.name),
        None => format!("port {}", holder.port),
    };
    Err(CniError::new(
        error::INVALID_CONFIG,
        "MAC address already in use",
        format!(
            "MAC {} is already in use on bridge {} of network {}: the bridge delivers it to {port}; ask for another MAC",
            names::format_mac(mac),
            bridge.name,
            veth.network
        ),
    ))
}

/// Frees the names of an attachment's veth when they are left from before: the host end of
/// an ADD that crashed half-way, or the workload's end of a detached attachment whose
/// namespace the runtime kept (see [`detached_peer`]). Any other interface of that name in the
/// workload is an error naming it.
fn clear_names(
    conf: &Conf,
    ns: &Netns,
    host: &mut Netlink,
    inner: &mut Netlink,
    host_ifname: &str,
    ifname: &str,
) -> Result<(), CniError> {
    if let Some(stale) = host.link_by_name(host_ifname)? {
        debug!(link = %host_ifname, "removing a stale host veth of an interrupted ADD");
        host.delete_link(stale.index)?;
    }
    if let Some(taken) = inner.link_by_name(ifname)? {
        let Some(host_end) = detached_peer(host, conf, &taken)? else {
            return Err(CniError::new(
                error::IFNAME_TAKEN,
                format!("interface {ifname} already exists in the container"),
                format!(
                    "CNI_IFNAME {ifname} is taken in {}; choose another interface name",
                    ns.path().display()
                ),
            ));
        };
        debug!(link = %taken.name, "removing the interface of a detached attachment the runtime's namespace kept");
        host.delete_link(host_end)?;
    }
    Ok(())
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

/// A pod's interface, the veth end in its namespace, as [`configure_pod_interface`] brings
/// it up.
struct PodInterface<'a> {
    name: &'a str,
    /// Its index, when the kernel said so.
    index: Option<u32>,
    /// The MAC it goes up with, when it has another.
    mac: Option<[u8; 6]>,
    /// The namespace's loopback is to be found or set up too (not done ahead).
    set_lo_up: bool,
    /// Told to generate no IPv6 address of its own before it goes up (see [`pod_without_v6`]).
    without_v6: bool,
}

/// A pod's interface `pod`: `lo` (when `pod.set_lo_up`) and it up, its addresses, and the default
/// routes through the network's gateways when `default_route`; returns the routes.
fn configure_pod_interface(
    inner: &mut Netlink,
    pod: &PodInterface<'_>,
    ips: &[IpAddr],
    net: &NetworkState,
    default_route: bool,
) -> Result<Vec<Route>, CniError> {
    let ifname = pod.name;
    let index = match pod.index {
        Some(i) => i,
        None => {
            inner
                .link_by_name(ifname)?
                .ok_or_else(|| {
                    CniError::new(
                        error::LINK_FAILED,
                        format!("interface {ifname} did not appear in the container"),
                        "the kernel accepted the veth but its peer is missing",
                    )
                })?
                .index
        }
    };
    if pod.set_lo_up {
        loopback_up(inner)?;
    }
    for ip in ips {
        inner.add_address(index, prefixed(*ip, net), true)?;
    }
    if pod.without_v6 {
        inner.set_no_v6_addresses(index)?;
    }
    inner.set_address_and_up(index, pod.mac)?;
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
                    oif: Some(index),
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

/// Sets up the loopback of the namespace `inner` talks to, the first link of every network
/// namespace (index 1). Runtimes usually have set it up already (containerd and CRI-O with their
/// loopback plugin): then it is left alone, which spares a request under the RTNL lock.
fn loopback_up(inner: &mut Netlink) -> Result<(), CniError> {
    if inner.is_up("lo")? != Some(true) {
        inner.set_up(LOOPBACK_INDEX)?;
    }
    Ok(())
}

/// Inside the VM's pod: a persistent tap the VMM opens (owner, group, queues, vnet header, MTU
/// and the VM's MAC), joined to weft's veth end `ifname` by tc redirects both ways (no bridge:
/// nothing learns MACs, and the VM's MAC may sit on both links, as KubeVirt copies the pod
/// interface's MAC into the domain). The guest's NIC carries the addresses; the pod holds none.
/// The veth end goes up with `veth_mac` when given (a veth made ahead). Returns the tap's name.
fn wire_tap(
    ns: &Netns,
    inner: &mut Netlink,
    ifname: &str,
    tap: &TapConf,
    mac: [u8; 6],
    veth_mac: Option<[u8; 6]>,
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
    // The pod's own IPv6 stack stays off both links: they wear the VM's MAC, so a link-local
    // address of theirs would be the guest's, and its duplicate address detection, MLD
    // reports and router solicitations would reach the guest (through the tap) and the
    // network (through the veth) as if the guest sent them; an NS for the guest's own
    // tentative address fails the guest's DAD. Told before each link comes up: the veth's
    // host end is up already, so its carrier comes on with it.
    inner.set_no_v6_addresses(port.index)?;
    inner.set_no_v6_addresses(index)?;
    inner.set_address_and_up(port.index, veth_mac)?;
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
fn identity(conf: &Conf, namespace: &str, name: &str) -> Result<Identity, CniError> {
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
    Ok(Identity::of(&reply))
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
pub fn del(conf: &Conf, env: &Env, kept: &mut Kept) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let mut errors: Vec<String> = Vec::new();
    // The agent detaches the interfaces this ADD made from the pod's weft.dev/networks
    // annotation with the one named; without an agent that does, they are found here.
    let mut extras_detached = false;
    // The interface itself goes from the network that holds it, which the annotation may have
    // chosen instead of the conflist's (or without one): found in the stores, by the agent or
    // below.
    let network = conf.network.as_deref().unwrap_or_default();
    match del_one(conf, env, network, ifname, true, kept) {
        Ok(detached) => extras_detached = detached.is_some(),
        Err(e) => errors.push(e.details),
    }
    if !extras_detached {
        // Wherever they are: the IPAM stores say (the pod may be gone from the API by now).
        for (network, extra) in IpamStore::children(&conf.state_dir, container_id, ifname) {
            if let Err(e) = del_one(conf, env, &network, &extra, false, kept) {
                errors.push(e.details);
            }
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

/// Removes one interface: best effort and idempotent; a missing netns, link or allocation is
/// success. The agent unregisters the attachment and releases its addresses before it
/// answers, and takes the rules out and sees to the host link after (see
/// [`Request::Detach`]); without an agent that can, the DEL does it all itself and the agent
/// catches up from the IPAM store at its resync. `with_extras`: the agent is asked to detach
/// the interfaces the ADD of this one made from the pod's annotation as well; returns them when
/// it did (`None`: it was not asked, or did not).
fn del_one(
    conf: &Conf,
    env: &Env,
    network: &str,
    ifname: &str,
    with_extras: bool,
    kept: &mut Kept,
) -> Result<Option<Vec<proto::DetachedInterface>>, CniError> {
    let container_id = env.container_id()?;
    let related = || IpamStore::related(&conf.state_dir, container_id, ifname);
    let tap = matches!(conf.attachment, AttachmentKind::Tap(_));
    // A VM's DEL reads the stores before its tap goes; the others only without the agent.
    let mut known = tap.then(related);
    // 1. A VM's tap, when the pod's namespace still exists (and the name is not another
    // interface's child, whose tap it is: see step 3).
    // Never inside the node's own namespace (a CNI_NETNS of /proc/self/ns/net).
    if tap
        && !(with_extras && known.as_ref().is_some_and(Related::is_anothers))
        && let Some(path) = env.netns.as_deref()
        && let Ok(ns) = Netns::open(Path::new(path))
        && matches!(ns.is_current(), Ok(false))
        && let Ok(mut inner) = Netlink::entering(&ns)
    {
        unwire_tap(&mut inner, ifname);
    }
    // 2. The agent: addresses, then the rules and the link.
    let detach = Request::Detach {
        network: network.to_string(),
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        with_extras,
    };
    let answered = proto::Pending::start(&conf.agent_socket, &detach, conf.agent_timeout)
        .and_then(|mut p| Ok((p.answer()?, p)));
    let answered = match answered {
        Ok((reply, pending)) if reply.ok => {
            info!(%network, %container_id, %ifname, extras = ?reply.detached, "detached");
            kept.0 = Some(pending);
            return Ok(reply.detached);
        }
        other => other,
    };
    // Without the agent's detach: the networks that hold the interface, read once.
    let related = known.take().unwrap_or_else(related);
    let held = related.owners_or(network, with_extras);
    match answered {
        Ok((reply, _)) => {
            debug!(error = ?reply.error, "the agent did not detach; removing the attachment here");
            // An agent that answers but cannot detach (an older one) still forgets the
            // endpoint before its addresses go.
            for network in &held {
                let unregister = Request::Unregister {
                    network: network.clone(),
                    container_id: container_id.to_string(),
                    ifname: ifname.to_string(),
                };
                if let Err(e) = proto::call(&conf.agent_socket, &unregister, conf.agent_timeout) {
                    debug!(error = %error::chain(&e), "agent not reachable for unregister; it resyncs from the IPAM store");
                }
            }
        }
        Err(e) => {
            debug!(error = %error::chain(&e), "agent not reachable for detach; removing the attachment here")
        }
    }
    let mut errors: Vec<String> = Vec::new();
    // 3. The link (deleting the host end removes the peer in the container too), unless this
    // is the runtime's DEL of a name that is another interface's child: that one's link.
    let host_name = names::host_veth_name(container_id, ifname);
    if !(with_extras && related.is_anothers())
        && let Err(e) = Netlink::new().and_then(|mut nl| {
            if let Some(l) = nl.link_by_name(&host_name)? {
                nl.delete_link(l.index)?;
            }
            Ok(())
        })
    {
        errors.push(format!("delete {host_name}: {}", error::chain(&e)));
    }
    // 4. The addresses.
    for network in &held {
        match IpamStore::open(&conf.state_dir, network).and_then(|s| {
            s.release(&Attachment {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            })
        }) {
            Ok(_) => {}
            Err(e) => errors.push(format!("release addresses: {}", error::chain(&e))),
        }
    }
    if errors.is_empty() {
        info!(%network, %container_id, %ifname, "detached");
        Ok(None)
    } else {
        Err(CniError::new(
            error::IO_FAILURE,
            "DEL could not remove everything",
            errors.join("; "),
        ))
    }
}

/// What of ADD's result `prev` belongs to the pod's interface `ifname`: its entry (the
/// sandbox's interface of that name, else the first in a sandbox) and its addresses. The
/// result of an ADD that made interfaces from the pod's annotation lists them and their
/// addresses too, which are not on `ifname`; a result that names no interface `ifname` has
/// all its addresses taken as `ifname`'s.
fn own_part<'a>(prev: &'a CniResult, ifname: &str) -> (Option<&'a Interface>, Vec<&'a IpConfig>) {
    let own = prev
        .interfaces
        .iter()
        .position(|i| i.sandbox.is_some() && i.name == ifname);
    let iface = own
        .and_then(|i| prev.interfaces.get(i))
        .or_else(|| prev.interfaces.iter().find(|i| i.sandbox.is_some()));
    let ips = prev
        .ips
        .iter()
        .filter(|ip| own.is_none() || ip.interface.is_none() || ip.interface == own)
        .collect();
    (iface, ips)
}

/// What of ADD's result `prev` belongs to the sandbox interface named `ifname` (an interface
/// of the pod's annotation): its entry and the addresses on it; none when `prev` does not name
/// it.
fn named_part<'a>(prev: &'a CniResult, ifname: &str) -> (Option<&'a Interface>, Vec<&'a IpConfig>) {
    let Some(k) = prev
        .interfaces
        .iter()
        .position(|i| i.sandbox.is_some() && i.name == ifname)
    else {
        return (None, Vec::new());
    };
    let ips = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(k))
        .collect();
    (prev.interfaces.get(k), ips)
}

/// CHECK: the attachment is still as ADD left it, the interfaces its ADD made from the pod's
/// annotation too.
pub fn check(conf: &Conf, env: &Env) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    // The network that holds the interface: the conflist's, unless the pod's annotation put it
    // on another; and the interfaces its ADD made from the annotation.
    let related = IpamStore::related(&conf.state_dir, container_id, ifname);
    let owners = related.owners_or(conf.network.as_deref().unwrap_or_default(), true);
    let network = match owners.first() {
        Some(n) => n.as_str(),
        None => conf.require_network()?,
    };
    let netns_path = env.netns()?;
    let ns = open_workload_netns(netns_path)?;
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
    let mut host = Netlink::new()?;
    let mut inner = Netlink::entering(&ns)?;
    let mut checked = Checked {
        conf,
        container_id,
        prev: &prev,
        host: &mut host,
        inner: &mut inner,
    };
    checked.interface(network, ifname, true)?;
    for (network, extra) in &related.children {
        checked.interface(network, extra, false).map_err(|mut e| {
            e.details = format!(
                "{} (interface {extra} on Network {network}, which the ADD of {ifname} made from the pod's {} annotation)",
                e.details,
                proto::NETWORKS_ANNOTATION
            );
            e
        })?;
    }
    if matches!(conf.attachment, AttachmentKind::Tap(_)) {
        // A VM's routes live in the guest.
        return Ok(());
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

fn mismatch(what: String) -> CniError {
    CniError::new(
        error::CHECK_MISMATCH,
        "the attachment differs from what ADD created",
        what,
    )
}

/// What a CHECK compares each of its interfaces with.
struct Checked<'a> {
    conf: &'a Conf,
    container_id: &'a str,
    prev: &'a CniResult,
    host: &'a mut Netlink,
    inner: &'a mut Netlink,
}

impl Checked<'_> {
    /// Interface `ifname` on `network` as ADD left it: its allocation, its host veth on the
    /// bridge (with its VLANs), and in the workload the link up (and a VM's tap), with the MAC
    /// and addresses `prevResult` gives it. `own`: `CNI_IFNAME` itself, whose entry in
    /// `prevResult` may be found without its name ([`own_part`]); an interface of the pod's
    /// annotation is found by name, and without an entry only its wiring is checked.
    fn interface(&mut self, network: &str, ifname: &str, own: bool) -> Result<(), CniError> {
        let (conf, container_id) = (self.conf, self.container_id);
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
        let host = &mut *self.host;
        let host_name = alloc.host_link_name();
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
        let inner = &mut *self.inner;
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
        let (iface, ips) = if own {
            own_part(self.prev, ifname)
        } else {
            named_part(self.prev, ifname)
        };
        if let Some(iface) = iface
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
        for ip in ips {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(errno: nix::errno::Errno) -> NetlinkError {
        NetlinkError::Kernel {
            op: "create veth",
            target: "wf0123456789a (peer eth0)".into(),
            errno: errno as i32,
            message: None,
        }
    }

    #[test]
    fn a_full_bridge_is_named_with_its_limit_and_the_way_out() {
        let e = veth_failed(refused(nix::errno::Errno::EXFULL), "wn-lan", "lan");
        assert_eq!(e.code, error::LINK_FAILED);
        assert_eq!(e.msg, "bridge wn-lan of network lan has no free port");
        assert!(e.details.contains("at most 1023 ports"), "{}", e.details);
        assert!(e.details.contains("maxPods"), "{}", e.details);
        assert!(
            e.details.contains("create veth wf0123456789a"),
            "{}",
            e.details
        );
        // Any other refusal stays the kernel's own.
        let other = veth_failed(refused(nix::errno::Errno::EPERM), "wn-lan", "lan");
        assert_eq!(other.msg, "netlink operation failed");
    }

    #[test]
    fn check_looks_at_its_own_interface_s_part_of_a_result_with_the_annotation_s_too() {
        let result: CniResult = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "wf0123456789a", "mac": "0a:58:00:00:00:01"},
                {"name": "eth0", "mac": "0a:58:0a:4d:00:02", "sandbox": "/run/netns/p"},
                {"name": "wf0123456789b", "mac": "0a:58:00:00:00:02"},
                {"name": "net1", "mac": "0a:58:0a:4e:00:02", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"address": "10.77.0.2/16", "interface": 1},
                {"address": "10.78.0.2/16", "interface": 3}
            ]
        }))
        .unwrap();
        let part = |ifname: &str| {
            let (iface, ips) = own_part(&result, ifname);
            (
                iface.and_then(|i| i.mac.clone()),
                ips.iter().map(|i| i.address.clone()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            part("eth0"),
            (
                Some("0a:58:0a:4d:00:02".into()),
                vec!["10.77.0.2/16".into()]
            )
        );
        assert_eq!(
            part("net1"),
            (
                Some("0a:58:0a:4e:00:02".into()),
                vec!["10.78.0.2/16".into()]
            )
        );
        // A result that names no such interface: the first in a sandbox, every address.
        assert_eq!(part("eth9").1.len(), 2);
    }
}

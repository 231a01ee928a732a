//! The node plan: a pure function from resources, this node's blocks and its endpoints to the
//! kernel state weft wants on the node ([`NodePlan`]), plus the problems found on the way
//! (reported in status and logs; a bad resource never stops the others).

use super::firewall::{self, Forward, NetRules};
use crate::controller::allocator::nth_block;
use crate::model::{NodeBlocks, Peer, Problem, Resources, WorkloadMeta, WorkloadReason};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use weft_crds::{Network, NetworkMode, PortForward};
use weft_dataplane::links::{BridgePlan, UplinkPlan};
use weft_dataplane::names;
use weft_dataplane::plan::{NodePlan, PortPlan, SysctlPlan};
use weft_dataplane::proto::Endpoint;
use weft_dataplane::state::{self, NetworkState};
use weft_dataplane::vlan::{self, VlanFiltering, VlanRange};

/// The node the plan is for.
#[derive(Debug, Clone, Default)]
pub struct NodeContext {
    /// The node's name.
    pub name: String,
    /// The node's labels (matched against `Network.spec.nodeSelector`).
    pub labels: BTreeMap<String, String>,
    /// SYN proxies allowed (the agent's `--syn-proxy`): PortForwards' `spec.synProxy` is
    /// realized, and the node's loose TCP tracking is off.
    pub syn_proxy: bool,
    /// TCP ports the agent itself listens on, on the node's addresses (its metrics and health
    /// endpoint, which kubelet probes): no PortForward takes them on this node.
    pub own_tcp_ports: Vec<u16>,
}

/// The plan and what was wrong on the way.
#[derive(Debug, Clone)]
pub struct PlanOutput {
    /// The plan.
    pub plan: NodePlan,
    /// Problems, one per rejected resource or part of one.
    pub problems: Vec<Problem>,
    /// Port forwards realized: `namespace/name` → target addresses.
    pub forwards: BTreeMap<String, Vec<IpAddr>>,
    /// The compiled segmentation policy (audit records name its rules).
    pub policy: std::sync::Arc<crate::policy::Compiled>,
}

/// Does the network select this node?
pub fn selects(net: &Network, node: &NodeContext) -> bool {
    match &net.spec.node_selector {
        None => true,
        Some(sel) => weft_crds::selector_matches(sel, &node.labels),
    }
}

/// The blocks the plan keeps while this node's `NodeNetwork` is missing from the API
/// ([`Resources::node_network_missing`]). The controller writes it again when it is deleted,
/// and for a Node deleted and re-created (it goes with the Node), so its absence is no reason
/// to take down a network whose workloads run here: each Network keeps the block it has on
/// the node (`realized`, the runtime state of the networks realized here) while it exists, is
/// not being deleted and still selects the node. A Network deleted, being deleted or no longer
/// selecting the node is not kept, and goes as it does with the `NodeNetwork` there; one
/// without a realized block waits for the `NodeNetwork`. Empty while the `NodeNetwork` is
/// there: then its blocks alone count (the controller takes a Network off a node, and a
/// deleted Network off every node, by taking its block out of the spec).
///
/// There is no time limit: the controller writes the `NodeNetwork` as soon as it runs, and
/// while it does not run, no other node can be given the block either.
pub fn held_blocks(
    res: &Resources,
    node: &NodeContext,
    realized: &BTreeMap<String, NodeBlocks>,
) -> BTreeMap<String, NodeBlocks> {
    if !res.node_network_missing {
        return BTreeMap::new();
    }
    res.networks
        .iter()
        .filter(|net| net.metadata.deletion_timestamp.is_none() && selects(net, node))
        .filter_map(|net| {
            let name = net.metadata.name.as_deref()?;
            Some((name.to_string(), *realized.get(name)?))
        })
        .collect()
}

/// The reason and message of a Network's `Valid=False` condition for its current spec (the
/// controller's verdict; a condition about an older generation does not count).
fn rejected(net: &Network) -> Option<(&str, &str)> {
    let c = net.status.as_ref()?.conditions.iter().find(|c| {
        c.type_ == weft_crds::constants::CONDITION_VALID
            && c.status == "False"
            && (c.observed_generation.is_none()
                || net.metadata.generation.is_none()
                || c.observed_generation == net.metadata.generation)
    })?;
    Some((c.reason.as_str(), c.message.as_str()))
}

/// The standalone block assignment: node `i` of the sorted cluster node list gets the `i`-th
/// block of each subnet. The controller replaces this with allocations it records in the API.
pub fn standalone_blocks(
    net: &Network,
    nodes: &[String],
    node: &str,
) -> Result<NodeBlocks, String> {
    let mut sorted: Vec<&String> = nodes.iter().collect();
    sorted.sort();
    sorted.dedup();
    let index = sorted
        .iter()
        .position(|n| n.as_str() == node)
        .unwrap_or(sorted.len());
    let mut blocks = NodeBlocks::default();
    // Blocks wholly inside spec.ipam.exclude are skipped, as the controller does.
    let excludes = net.spec.excludes();
    let too_few = |s: IpNet, prefix: u8, field: &str| {
        format!(
            "spec.ipam.{field}: {s} has too few /{prefix} blocks outside spec.ipam.exclude for node number {} of {}; use a longer prefix or a larger subnet",
            index + 1,
            sorted.len().max(index + 1)
        )
    };
    if let Some(s) = net.spec.subnet_v4() {
        let prefix = net.spec.block_prefix_v4();
        match nth_block(IpNet::V4(s), prefix, &excludes, index) {
            Some(IpNet::V4(b)) => blocks.v4 = Some(b),
            _ => return Err(too_few(IpNet::V4(s), prefix, "nodeBlockPrefix")),
        }
    }
    if let Some(s) = net.spec.subnet_v6() {
        let prefix = net.spec.block_prefix_v6();
        match nth_block(IpNet::V6(s), prefix, &excludes, index) {
            Some(IpNet::V6(b)) => blocks.v6 = Some(b),
            _ => return Err(too_few(IpNet::V6(s), prefix, "nodeBlockPrefixV6")),
        }
    }
    Ok(blocks)
}

fn workload_labels<'a>(
    workloads: &'a [WorkloadMeta],
    namespace: &str,
    name: &str,
) -> Option<&'a BTreeMap<String, String>> {
    workloads
        .iter()
        .find(|w| w.namespace == namespace && w.name == name)
        .map(|w| &w.labels)
}

/// The sysctl a SYN proxy needs (set to 0 with `--syn-proxy`).
pub const SYN_PROXY_SYSCTL: &str = "net.netfilter.nf_conntrack_tcp_loose";

/// Computes the node plan.
pub fn plan(
    node: &NodeContext,
    res: &Resources,
    blocks: &BTreeMap<String, NodeBlocks>,
    endpoints: &[Endpoint],
) -> PlanOutput {
    let mut problems = Vec::new();
    let mut bridges = Vec::new();
    let mut states = Vec::new();
    let mut rules = Vec::new();
    let mut any_v6 = false;
    let mut networks: Vec<&Network> = res.networks.iter().collect();
    networks.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut seen = BTreeSet::new();
    let mut accepted: BTreeMap<String, &Network> = BTreeMap::new();
    // Uplink port → network, bridge name → network: one of each per node.
    let mut ports: BTreeMap<String, String> = BTreeMap::new();
    let mut bridge_names: BTreeMap<String, String> = BTreeMap::new();
    // Uplink device → the networks with VLANs on it, and those VLANs.
    let mut vlan_users: BTreeMap<String, Vec<(String, Vec<u16>)>> = BTreeMap::new();
    for net in networks {
        let name = net.metadata.name.clone().unwrap_or_default();
        let problem = |message: String| Problem {
            kind: "Network",
            object: name.clone(),
            message,
            reason: None,
        };
        if !seen.insert(name.clone()) {
            problems.push(problem(
                "defined twice; the first definition is used".into(),
            ));
            continue;
        }
        if let Err(errs) = net.spec.validate() {
            for e in errs {
                problems.push(problem(e.to_string()));
            }
            continue;
        }
        if !selects(net, node) {
            continue;
        }
        let bridge_mode = net.spec.mode == NetworkMode::Bridge;
        let vlan_filtering = net.spec.vlan_filtering().then(|| VlanFiltering {
            own: net.spec.vlan().unwrap_or(vlan::DEFAULT_PVID),
            trunk: net
                .spec
                .trunk_vlans()
                .into_iter()
                .map(|(min, max)| VlanRange { min, max })
                .collect(),
        });
        let uplink = net
            .spec
            .bridge
            .as_ref()
            .filter(|_| bridge_mode)
            .map(|b| UplinkPlan {
                device: b.uplink.clone(),
                // A filtering bridge carries the VLAN on the uplink itself.
                vlan: net.spec.vlan().filter(|_| vlan_filtering.is_none()),
                filtering: vlan_filtering.clone(),
            });
        // A VLAN-filtering bridge's uplink and an 802.1Q sub-interface of the same device must
        // not share a VLAN: the sub-interface would take its frames before the bridge sees them.
        if let Some(up) = &uplink
            && let Some((other, vid)) = vlan_users.get(&up.device).and_then(|users| {
                users.iter().find_map(|(other, theirs)| {
                    vlan_ids(up)
                        .into_iter()
                        .find(|v| theirs.contains(v))
                        .filter(|_| up.filtering.is_some() || !theirs.is_empty())
                        .map(|v| (other.clone(), v))
                })
            })
        {
            problems.push(problem(format!(
                "spec.bridge: VLAN {vid} on interface {} is already network {other}'s on node {}; a VLAN-filtering network's own and trunk VLANs and the sub-interface VLANs of the same uplink must differ",
                up.device, node.name
            )));
            continue;
        }
        if let Some(up) = &uplink
            && let Some(other) = ports.get(&up.port())
        {
            problems.push(problem(format!(
                "spec.bridge: interface {} is already the uplink of network {other} on node {}; give this network another uplink or a spec.bridge.vlan",
                up.port(),
                node.name
            )));
            continue;
        }
        let Some(b) = blocks.get(&name).copied() else {
            problems.push(problem(match rejected(net) {
                // The controller gives a rejected Network no blocks: say why, not "yet".
                Some((reason, message)) => format!(
                    "not realized on node {}: the controller rejected the Network ({reason}): {message}",
                    node.name
                ),
                None => format!("no address block is assigned to node {} yet", node.name),
            }));
            continue;
        };
        let bridge = net
            .spec
            .bridge
            .as_ref()
            .and_then(|b| b.bridge_name.clone())
            .filter(|_| bridge_mode)
            .unwrap_or_else(|| names::bridge_name(&name));
        if let Some(other) = bridge_names.insert(bridge.clone(), name.clone()) {
            problems.push(problem(format!(
                "spec.bridge.bridgeName: bridge {bridge} is already network {other}'s; choose another name"
            )));
            continue;
        }
        if let Some(up) = &uplink {
            ports.insert(up.port(), name.clone());
            let ids = vlan_ids(up);
            if up.filtering.is_some() || !ids.is_empty() {
                vlan_users
                    .entry(up.device.clone())
                    .or_default()
                    .push((name.clone(), ids));
            }
        }
        // A NAT network's bridge answers on the gateway addresses; a Bridge network's gateway is
        // the LAN's router, and its bridge carries the node's own addresses (moved from the
        // uplink when the uplink held them).
        let mut addresses = Vec::new();
        if !bridge_mode {
            if let (Some(s), Some(g)) = (net.spec.subnet_v4(), net.spec.gateway_v4())
                && let Ok(a) = IpNet::new(IpAddr::V4(g), s.prefix_len())
            {
                addresses.push(a);
            }
            if let (Some(s), Some(g)) = (net.spec.subnet_v6(), net.spec.gateway_v6())
                && let Ok(a) = IpNet::new(IpAddr::V6(g), s.prefix_len())
            {
                addresses.push(a);
            }
        }
        any_v6 |= !bridge_mode && net.spec.subnet_v6().is_some();
        bridges.push(BridgePlan {
            network: name.clone(),
            name: bridge.clone(),
            mtu: net.spec.mtu(),
            mac: names::bridge_mac(&name),
            addresses,
            uplink,
        });
        states.push(NetworkState {
            name: name.clone(),
            mode: if bridge_mode {
                state::NetworkMode::Bridge
            } else {
                state::NetworkMode::Nat
            },
            bridge: bridge.clone(),
            mtu: net.spec.mtu(),
            subnet_v4: net.spec.subnet_v4(),
            subnet_v6: net.spec.subnet_v6(),
            gateway_v4: net.spec.gateway_v4(),
            gateway_v6: net.spec.gateway_v6(),
            block_v4: b.v4,
            block_v6: b.v6,
            exclude: net.spec.excludes(),
            anti_spoofing: net.spec.anti_spoofing(),
            vlan_filtering: vlan_filtering.clone(),
        });
        rules.push(NetRules {
            bridge,
            subnet_v4: net.spec.subnet_v4(),
            subnet_v6: net.spec.subnet_v6(),
            masquerade: net.spec.masquerade(),
            sealed: !bridge_mode,
        });
        accepted.insert(name, net);
    }

    let (forwards, realized) = plan_forwards(res, &accepted, endpoints, node, &mut problems);
    // The workloads whose TCP host ports ask for a SYN proxy (the Network's
    // `spec.limits.synProxy`, the pod's `weft.dev/syn-proxy`), by host port name: they get one
    // when the agent allows them, else each says why.
    // With the pod's own MSS and window scale, if its annotations set them.
    let wants_syn: BTreeMap<&str, (Option<u16>, Option<u8>)> = endpoints
        .iter()
        .filter(|e| {
            accepted.contains_key(&e.network) && e.port_mappings.iter().any(|m| m.protocol == "tcp")
        })
        .filter_map(|e| {
            let l = super::limits::of(res, e).0;
            l.syn_proxy
                .then_some((e.host_ifname.as_str(), (l.syn_mss, l.syn_window_scale)))
        })
        .collect();
    let host_syn = |e: &Endpoint, v6: bool| -> Option<firewall::SynOptions> {
        if !node.syn_proxy {
            return None;
        }
        let (mss, wscale) = wants_syn.get(e.host_ifname.as_str())?;
        let net = accepted.get(&e.network)?;
        let defaults = firewall::SynOptions::for_mtu(net.spec.mtu(), v6);
        Some(firewall::SynOptions {
            mss: mss.unwrap_or(defaults.mss),
            wscale: wscale.unwrap_or(defaults.wscale),
        })
    };
    if !node.syn_proxy {
        for e in endpoints
            .iter()
            .filter(|e| wants_syn.contains_key(e.host_ifname.as_str()))
        {
            problems.push(endpoint_problem(
                e,
                WorkloadReason::SynProxyUnavailable,
                format!(
                    "{} (or its Network's spec.limits.synProxy): the agent on this node runs without --syn-proxy (chart value agent.synProxy: true), so its host ports are forwarded without a SYN proxy; enable it there or remove the setting",
                    weft_crds::limits::SYN_PROXY_ANNOTATION
                ),
            ));
        }
    }
    let host_ports = plan_host_ports(
        &|n| accepted.contains_key(n),
        endpoints,
        &forwards,
        &host_syn,
        &mut problems,
    );
    let limited = plan_limits(res, &|n| accepted.contains_key(n), endpoints, &mut problems);
    let (policy, unshared) = crate::policy::compile_members(res, members(res, endpoints));
    problems.extend(unshared);
    problems.extend(policy.problems.iter().cloned());
    let mut sysctls = Vec::new();
    // Only NAT networks and port forwards route: a node with Bridge networks alone stays a
    // host (IPv6 forwarding would also stop it from accepting router advertisements).
    let nat = bridges.iter().any(|b| b.uplink.is_none());
    if nat
        || forwards.iter().any(|f| f.target.is_ipv4())
        || host_ports.iter().any(|h| h.target.is_ipv4())
    {
        sysctls.push(SysctlPlan {
            key: "net.ipv4.ip_forward".into(),
            value: "1".into(),
            restore: false,
        });
    }
    if (nat && any_v6)
        || forwards.iter().any(|f| f.target.is_ipv6())
        || host_ports.iter().any(|h| h.target.is_ipv6())
    {
        sysctls.push(SysctlPlan {
            key: "net.ipv6.conf.all.forwarding".into(),
            value: "1".into(),
            restore: false,
        });
    }
    if node.syn_proxy {
        // A SYN proxy needs the handshake's last ACK to be a new packet to connection
        // tracking, not the pick-up of a connection in mid-stream.
        sysctls.push(SysctlPlan {
            key: SYN_PROXY_SYSCTL.into(),
            value: "0".into(),
            restore: true,
        });
    }
    let policing = super::guard::Policing {
        ports: super::limits::policing(res, endpoints),
        standing: super::limits::standing_police_rates(res, &|n| accepted.contains_key(n)),
    };
    let guard = guard_table(&bridges, &states, endpoints, &policing);
    let ports = port_plans(&bridges, &states, endpoints);
    PlanOutput {
        plan: NodePlan {
            node: node.name.clone(),
            bridges,
            sysctls,
            firewall: firewall::table(&rules, &forwards, &host_ports, &limited, &policy),
            guard: Some(guard),
            networks: states,
            ports,
        },
        problems,
        forwards: realized,
        policy: std::sync::Arc::new(policy),
    }
}

/// The connection limits of the endpoints on realized networks, by address; a pod whose limit
/// annotations are invalid is reported (its Network's limits still apply).
fn plan_limits(
    res: &Resources,
    realized: &dyn Fn(&str) -> bool,
    endpoints: &[Endpoint],
    problems: &mut Vec<Problem>,
) -> Vec<firewall::Limited> {
    let mut out = Vec::new();
    for e in endpoints.iter().filter(|e| realized(&e.network)) {
        let (limits, problem) = super::limits::of(res, e);
        if let Some(message) = problem {
            let problem = endpoint_problem(e, WorkloadReason::InvalidLimitAnnotation, message);
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
        let limits = limits.connections();
        if !limits.is_none() {
            out.extend(addresses_of(e).into_iter().map(|ip| firewall::Limited {
                ip: Some(ip),
                limits,
            }));
        }
    }
    out.extend(
        standing_limit_classes(res, realized)
            .into_iter()
            .map(|limits| firewall::Limited { ip: None, limits }),
    );
    out
}

/// The connection limits of the realized Networks themselves: their classes stay in the table
/// while the Network does, with or without workloads (see [`firewall::Limited`]).
fn standing_limit_classes(
    res: &Resources,
    realized: &dyn Fn(&str) -> bool,
) -> BTreeSet<weft_crds::ConnectionLimits> {
    super::limits::of_networks(res, realized)
        .map(|l| l.connections())
        .filter(|c| !c.is_none())
        .collect()
}

/// The VLANs a network's uplink takes on its device: its sub-interface's, or a filtering
/// bridge's own and trunk VLANs (VLAN 1, the untagged one, excepted).
fn vlan_ids(up: &UplinkPlan) -> Vec<u16> {
    match &up.filtering {
        Some(f) => vlan::ids(&f.uplink().tagged),
        None => up.vlan.into_iter().collect(),
    }
}

/// The anti-spoofing table: every endpoint of a realized network is a port, guarded unless its
/// network turned `security.antiSpoofing` off; with the meters of `policing` (the ports it
/// names that are not among them have none).
fn guard_table(
    bridges: &[BridgePlan],
    networks: &[NetworkState],
    endpoints: &[Endpoint],
    policing: &super::guard::Policing,
) -> weft_dataplane::nft::Table {
    let names: Vec<String> = bridges.iter().map(|b| b.name.clone()).collect();
    let mut guarded = Vec::new();
    let mut open = Vec::new();
    for e in endpoints {
        let Some(net) = networks.iter().find(|n| n.name == e.network) else {
            continue;
        };
        match names::parse_mac(&e.mac) {
            Some(mac) if net.anti_spoofing => guarded.push(super::guard::PortGuard {
                ifname: e.host_ifname.clone(),
                mac,
                ips: e.ips.clone(),
                pending: e.pending,
                // Only VLANs the network allows (the CNI checked; the guard does not trust it).
                vlans: allowed_trunk(net, e),
            }),
            // An endpoint with an unreadable MAC stays unregistered: its port drops everything.
            None if net.anti_spoofing => {}
            _ => open.push(super::guard::OpenPort {
                ifname: e.host_ifname.clone(),
                pending: e.pending,
            }),
        }
    }
    super::guard::table(&names, &guarded, &open, policing)
}

/// The VLANs of an endpoint's `vlanTrunk` that its network allows (none on a network whose
/// bridge does not filter VLANs).
fn allowed_trunk(net: &NetworkState, e: &Endpoint) -> Vec<u16> {
    net.vlan_filtering
        .as_ref()
        .map(|f| {
            vlan::ids(&e.vlan_trunk)
                .into_iter()
                .filter(|id| f.trunk.iter().any(|r| r.contains(*id)))
                .collect()
        })
        .unwrap_or_default()
}

/// The host-side ports of the endpoints of realized networks, sorted: the apply attaches one
/// that left its bridge again (see [`PortPlan`]).
fn port_plans(
    bridges: &[BridgePlan],
    networks: &[NetworkState],
    endpoints: &[Endpoint],
) -> Vec<PortPlan> {
    let mut ports: Vec<PortPlan> = endpoints
        .iter()
        .filter_map(|e| {
            let net = networks.iter().find(|n| n.name == e.network)?;
            let bridge = bridges.iter().find(|b| b.network == e.network)?;
            Some(PortPlan {
                name: e.host_ifname.clone(),
                network: e.network.clone(),
                bridge: bridge.name.clone(),
                trunk: allowed_trunk(net, e),
            })
        })
        .collect();
    ports.sort();
    ports
}

/// The policy members of this node: its endpoints, with their workloads' labels.
pub fn members(res: &Resources, endpoints: &[Endpoint]) -> Vec<crate::policy::Member> {
    // Other nodes' workloads are members of the groups too (their policy is enforced there);
    // on a Bridge network their link-local addresses reach this node's over the LAN.
    let bridged = bridged_networks(res);
    let peers = res
        .peers
        .iter()
        .map(|p| peer_member(p, bridged.contains(p.workload.network.as_str())));
    let pods = Pods::of(res);
    endpoints
        .iter()
        .map(|e| endpoint_member(res, Some(&pods), e))
        .chain(peers)
        .collect()
}

/// The names of `res`'s Bridge networks.
fn bridged_networks(res: &Resources) -> BTreeSet<&str> {
    res.networks
        .iter()
        .filter(|n| n.spec.mode == NetworkMode::Bridge)
        .filter_map(|n| n.metadata.name.as_deref())
        .collect()
}

/// A workload of another node as a policy member (addresses that do not parse are left out),
/// with its link-local address when `bridged` (see [`crate::policy::with_link_local`]).
fn peer_member(p: &Peer, bridged: bool) -> crate::policy::Member {
    let ips = p
        .workload
        .ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mac = p.workload.mac.as_deref().filter(|_| bridged);
    crate::policy::Member {
        namespace: p.workload.namespace.clone(),
        name: p.workload.name.clone(),
        labels: p.workload.labels.clone(),
        network: p.workload.network.clone(),
        ips: crate::policy::with_link_local(ips, mac),
        local: false,
        port: None,
    }
}

/// Every address endpoint `e` sends from: its own and its link-local one (see
/// [`crate::policy::with_link_local`]); its connection limits, counters and policies hold them all.
pub fn addresses_of(e: &Endpoint) -> Vec<IpAddr> {
    crate::policy::with_link_local(e.ips.clone(), Some(&e.mac))
}

/// The workloads (pods) of a snapshot by namespace and name, for lookups of many endpoints.
pub(crate) struct Pods<'a>(
    std::collections::HashMap<(&'a str, &'a str), &'a BTreeMap<String, String>>,
);

impl<'a> Pods<'a> {
    /// The index of `res`'s workloads.
    pub(crate) fn of(res: &'a Resources) -> Self {
        let mut index = std::collections::HashMap::with_capacity(res.workloads.len());
        for w in &res.workloads {
            // The first of a name wins, as with a search in order.
            index
                .entry((w.namespace.as_str(), w.name.as_str()))
                .or_insert(&w.labels);
        }
        Pods(index)
    }

    /// The labels of pod `namespace/name`.
    pub(crate) fn labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<&'a BTreeMap<String, String>> {
        self.0.get(&(namespace, name)).copied()
    }
}

/// An endpoint of this node as a policy member (`pods`: an index of `res`'s workloads, for
/// many endpoints; without, a search).
fn endpoint_member(res: &Resources, pods: Option<&Pods>, e: &Endpoint) -> crate::policy::Member {
    let (namespace, name, labels) = pod_of(res, pods, e);
    crate::policy::Member {
        labels,
        namespace,
        name,
        network: e.network.clone(),
        ips: addresses_of(e),
        local: true,
        port: Some(weft_dataplane::names::port_id(&e.host_ifname)),
    }
}

/// The most endpoint changes [`apply_endpoint_changes`] takes at once; more take a full plan.
pub const ENDPOINT_DELTA_MAX: usize = 64;

/// Changes `out` — the plan of `res` with some endpoints — in place into the plan of `res`
/// with the endpoints `removed` taken out and `added` put in (an endpoint that changed is in
/// both, old and new version), and returns the element-only transaction that takes the kernel
/// from one to the other. Nothing is recompiled or rendered again: groups and rules depend on
/// the policies only, so a workload's registration costs in proportion to that workload, not to
/// the node's thousands of workloads and policies.
///
/// `None`, with `out` untouched, when the change is not of that kind and the plan must be
/// computed in full: more than [`ENDPOINT_DELTA_MAX`] endpoints changed, an address held by
/// two members (a migrating VM's), a PortForward that could target a changed endpoint, no
/// guard table, a port name in use, host ports that change more than their map elements (see
/// [`host_port_changes`]). The result equals the full plan (property-tested).
pub fn apply_endpoint_changes(
    out: &mut PlanOutput,
    res: &Resources,
    removed: &[Endpoint],
    added: &[Endpoint],
) -> Option<weft_dataplane::nft::Transaction> {
    use weft_dataplane::nft::Transaction;
    if removed.is_empty() && added.is_empty() {
        return Some(Transaction::default());
    }
    if removed.len() + added.len() > ENDPOINT_DELTA_MAX {
        return None;
    }
    let guard = out.plan.guard.as_ref()?;
    // A port name must be new (or the removed endpoint's).
    let freed: BTreeSet<&str> = removed.iter().map(|e| e.host_ifname.as_str()).collect();
    let mut names = BTreeSet::new();
    for e in added {
        let quoted = weft_dataplane::nft::ifname_literal(&e.host_ifname)?;
        let taken = guard
            .sets
            .iter()
            .filter(|s| s.name == "ports" || s.name == "open")
            .any(|s| s.elements.contains(&quoted));
        if !names.insert(e.host_ifname.as_str())
            || (taken && !freed.contains(e.host_ifname.as_str()))
        {
            return None;
        }
    }
    let forwarded = |e: &Endpoint| {
        res.port_forwards.iter().any(|pf| {
            pf.spec.network == e.network
                && pf.metadata.namespace.as_deref().unwrap_or("default")
                    == e.pod_namespace.as_deref().unwrap_or("default")
        })
    };
    if removed.iter().chain(added).any(forwarded) {
        return None;
    }
    let host_ports = host_port_changes(out, res, removed, added)?;
    let limit_changes = limit_changes(out, res, removed, added)?;
    // The ports' egress meters, of the endpoints removed and added.
    let policed = [
        super::limits::policing(res, removed),
        super::limits::policing(res, added),
    ];
    if !police_changes_fit(out, res, &policed) {
        return None;
    }
    let gone: Vec<_> = removed
        .iter()
        .map(|e| endpoint_member(res, None, e))
        .collect();
    let came: Vec<_> = added
        .iter()
        .map(|e| endpoint_member(res, None, e))
        .collect();
    if !members_fit(&out.policy, &gone, &came) {
        return None;
    }

    let mut changes = ElementChanges::new();
    // The guard's maps (the ports' ids): keys gone, elements come.
    let mut guard_maps: BTreeMap<String, (BTreeSet<String>, BTreeMap<String, String>)> =
        BTreeMap::new();
    for ((eps, add), ports) in [(removed, false), (added, true)].into_iter().zip(policed) {
        let policing = super::guard::Policing {
            ports,
            standing: BTreeSet::new(),
        };
        let part = guard_table(&out.plan.bridges, &out.plan.networks, eps, &policing);
        for set in part.sets.iter().filter(|s| s.name != "bridges") {
            let entry = changes.entry((true, set.name.clone())).or_default();
            let side = if add { &mut entry.1 } else { &mut entry.0 };
            side.extend(set.elements.iter().cloned());
        }
        for map in &part.maps {
            let entry = guard_maps.entry(map.name.clone()).or_default();
            if add {
                entry.1.extend(map.elements.clone());
            } else {
                entry.0.extend(map.elements.keys().cloned());
            }
        }
    }
    for (set, (del, add)) in limit_changes {
        let entry = changes.entry((false, set)).or_default();
        entry.0.extend(del);
        entry.1.extend(add);
    }
    let (mut deletes, mut adds) = change_members(out, res, &gone, &came, changes);
    for (name, (gone, came)) in firewall::HOST_PORT_MAPS.iter().zip(host_ports) {
        change_map(
            &mut out.plan.firewall,
            name,
            gone,
            came,
            &mut deletes,
            &mut adds,
        );
    }
    if let Some(table) = out.plan.guard.as_mut() {
        for (name, (gone, came)) in guard_maps {
            // A key both gone and come (a changed endpoint) keeps its element when its value
            // stays.
            let current = table.maps.iter().find(|m| m.name == name);
            let held = |k: &String| current.and_then(|m| m.elements.get(k));
            let gone: Vec<String> = gone
                .into_iter()
                .filter(|k| came.get(k).is_none_or(|v| held(k) != Some(v)))
                .collect();
            let came: Vec<(String, String)> = came
                .into_iter()
                .filter(|(k, v)| held(k) != Some(v) || gone.contains(k))
                .collect();
            change_map(table, &name, gone, came, &mut deletes, &mut adds);
        }
    }
    deletes.extend(adds);
    // The ports: no kernel work (the CNI attaches a new port, and DEL deletes a removed one).
    let ports = &mut out.plan.ports;
    for gone in port_plans(&out.plan.bridges, &out.plan.networks, removed) {
        if let Some(i) = ports.iter().position(|p| *p == gone) {
            ports.remove(i);
        }
    }
    ports.extend(port_plans(&out.plan.bridges, &out.plan.networks, added));
    ports.sort();
    Some(Transaction(deletes))
}

/// Takes keys `gone` out of map `name` of `table` and puts elements `came` in, adding the
/// kernel's changes to `deletes` and `adds` (nothing for a map the table lacks).
fn change_map(
    table: &mut weft_dataplane::nft::Table,
    name: &str,
    gone: Vec<String>,
    came: Vec<(String, String)>,
    deletes: &mut Vec<weft_dataplane::nft::Change>,
    adds: &mut Vec<weft_dataplane::nft::Change>,
) {
    use weft_dataplane::nft::{Change, SetKey};
    let Some(map) = table.maps.iter_mut().find(|m| m.name == name) else {
        return;
    };
    for k in &gone {
        map.elements.remove(k);
    }
    map.elements.extend(came.iter().cloned());
    if !gone.is_empty() {
        deletes.push(Change::DeleteMapElements {
            family: table.family,
            table: table.name.clone(),
            map: map.name.clone(),
            key: SetKey::of_map(map),
            keys: gone,
        });
    }
    if !came.is_empty() {
        adds.push(Change::AddMapElements {
            family: table.family,
            table: table.name.clone(),
            map: map.name.clone(),
            key: SetKey::of_map(map),
            value_type: map.value_type.clone(),
            elements: came,
        });
    }
}

/// Set elements an in-place change deletes and adds: (guard table?, set) → (deleted, added).
type ElementChanges = BTreeMap<(bool, String), (BTreeSet<String>, BTreeSet<String>)>;

/// Whether members `gone` can leave and `came` join `policy` in place: no address of theirs is
/// held by two members (a migrating VM's), and no joining address is held by a member that
/// stays or by another joining one.
fn members_fit(
    policy: &crate::policy::Compiled,
    gone: &[crate::policy::Member],
    came: &[crate::policy::Member],
) -> bool {
    // A port id two members share is the full plan's to sort out (see `Compiled::clash_ports`).
    let gone_ports: BTreeSet<u32> = gone.iter().filter_map(|m| m.port).collect();
    let mut came_ports = BTreeSet::new();
    if came.iter().filter_map(|m| m.port).any(|p| {
        (policy.local_ports.contains(&p) && !gone_ports.contains(&p))
            || policy.clash_ports.contains(&p)
            || !came_ports.insert(p)
    }) || gone
        .iter()
        .filter_map(|m| m.port)
        .any(|p| policy.clash_ports.contains(&p))
    {
        return false;
    }
    let gone_ips: BTreeSet<IpAddr> = gone.iter().flat_map(|m| m.ips.iter().copied()).collect();
    if gone
        .iter()
        .chain(came)
        .flat_map(|m| &m.ips)
        .any(|ip| policy.shared.contains(ip))
    {
        return false;
    }
    let mut came_ips = BTreeSet::new();
    came.iter().flat_map(|m| &m.ips).all(|ip| {
        came_ips.insert(*ip) && (!policy.owners.contains_key(ip) || gone_ips.contains(ip))
    })
}

/// Takes members `gone` out of the plan's policy and puts `came` in (see [`members_fit`]), and
/// makes their set elements' changes, with the other `changes`, in its tables (see
/// [`change_elements`]).
fn change_members(
    out: &mut PlanOutput,
    res: &Resources,
    gone: &[crate::policy::Member],
    came: &[crate::policy::Member],
    mut changes: ElementChanges,
) -> (
    Vec<weft_dataplane::nft::Change>,
    Vec<weft_dataplane::nft::Change>,
) {
    let policy = std::sync::Arc::make_mut(&mut out.policy);
    for m in gone {
        let place = policy.remove_member(m, &res.networks, &res.namespaces);
        for (set, element) in crate::policy::render::member_elements(policy, m, &place) {
            changes.entry((false, set)).or_default().0.insert(element);
        }
    }
    for m in came {
        let place = policy.add_member(m, &res.networks, &res.namespaces);
        for (set, element) in crate::policy::render::member_elements(policy, m, &place) {
            changes.entry((false, set)).or_default().1.insert(element);
        }
    }
    change_elements(&mut out.plan, changes)
}

/// Makes `changes` in the plan's tables' sets; returns the changes that delete elements and
/// those that add them, for the kernel. An element both deleted and added (a workload that
/// changed but kept an address) stays.
fn change_elements(
    plan: &mut NodePlan,
    changes: ElementChanges,
) -> (
    Vec<weft_dataplane::nft::Change>,
    Vec<weft_dataplane::nft::Change>,
) {
    use weft_dataplane::nft::{Change, SetKey};
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for ((in_guard, name), (del, add)) in changes {
        let table = if in_guard {
            match plan.guard.as_mut() {
                Some(t) => t,
                None => continue,
            }
        } else {
            &mut plan.firewall
        };
        let (family, table_name) = (table.family, table.name.clone());
        let Some(set) = table.sets.iter_mut().find(|s| s.name == name) else {
            continue;
        };
        let key = SetKey::of(set);
        let (del, add): (Vec<String>, Vec<String>) = (
            del.difference(&add).cloned().collect(),
            add.difference(&del).cloned().collect(),
        );
        for e in &del {
            set.elements.remove(e);
        }
        set.elements.extend(add.iter().cloned());
        if !del.is_empty() {
            deletes.push(Change::DeleteElements {
                family,
                table: table_name.clone(),
                set: name.clone(),
                key: key.clone(),
                elements: del,
            });
        }
        if !add.is_empty() {
            adds.push(Change::AddElements {
                family,
                table: table_name,
                set: name,
                key,
                elements: add,
            });
        }
    }
    (deletes, adds)
}

/// The most peer changes [`apply_peer_changes`] takes at once; more take a full plan.
pub const PEER_DELTA_MAX: usize = 256;

/// Changes `out` — the plan of `res` with other peers — in place into the plan of `res` (whose
/// peers are those of the plan with `removed` taken out and `added` put in), and returns the
/// element-only transaction that takes the kernel from one to the other: a workload that came
/// or went on another node changes the groups' sets, never the rules. `None`, with `out`
/// untouched, when more than [`PEER_DELTA_MAX`] changed or an address is held twice (see
/// [`members_fit`]). The result equals the full plan (property-tested).
pub fn apply_peer_changes(
    out: &mut PlanOutput,
    res: &Resources,
    removed: &[std::sync::Arc<Peer>],
    added: &[std::sync::Arc<Peer>],
) -> Option<weft_dataplane::nft::Transaction> {
    if removed.len() + added.len() > PEER_DELTA_MAX {
        return None;
    }
    let bridged = bridged_networks(res);
    let member =
        |p: &std::sync::Arc<Peer>| peer_member(p, bridged.contains(p.workload.network.as_str()));
    let gone: Vec<_> = removed.iter().map(member).collect();
    let came: Vec<_> = added.iter().map(member).collect();
    if !members_fit(&out.policy, &gone, &came) {
        return None;
    }
    let (mut deletes, adds) = change_members(out, res, &gone, &came, ElementChanges::new());
    deletes.extend(adds);
    Some(weft_dataplane::nft::Transaction(deletes))
}

/// Per host-port map ([`firewall::HOST_PORT_MAPS`]): the keys to delete and the elements to add.
type HostPortChange = (Vec<String>, Vec<(String, String)>);

/// The host-port map changes of an in-place endpoint change ([`apply_endpoint_changes`]).
/// `None` when the change would touch more of the plan than those maps' elements: a host port
/// the plan reports a problem about, now or after (a second claim, a protocol weft does not
/// forward, a PortForward's node port: the first claim in the full plan's order wins, and a
/// removal can let a waiting claim in); a key another endpoint holds; or the first or last
/// host port of an address family (the forwarding sysctls follow them).
fn host_port_changes(
    out: &PlanOutput,
    res: &Resources,
    removed: &[Endpoint],
    added: &[Endpoint],
) -> Option<[HostPortChange; firewall::HOST_PORT_MAPS.len()]> {
    let mapped = |eps: &[Endpoint]| eps.iter().any(|e| !e.port_mappings.is_empty());
    if !mapped(removed) && !mapped(added) {
        return Some(Default::default());
    }
    if !res.port_forwards.is_empty() || out.problems.iter().any(|p| p.kind == "Pod") {
        return None;
    }
    let realized: BTreeSet<&str> = out.plan.networks.iter().map(|n| n.name.as_str()).collect();
    let realized = |n: &str| realized.contains(n);
    let mut problems = Vec::new();
    // A SYN proxy's host ports are set elements of their own: the full plan places them.
    if removed
        .iter()
        .chain(added)
        .any(|e| !e.port_mappings.is_empty() && super::limits::of(res, e).0.syn_proxy)
    {
        return None;
    }
    let none = |_: &Endpoint, _: bool| None;
    let gone = firewall::host_port_elements(&plan_host_ports(
        &realized,
        removed,
        &[],
        &none,
        &mut problems,
    ));
    let came = firewall::host_port_elements(&plan_host_ports(
        &realized,
        added,
        &[],
        &none,
        &mut problems,
    ));
    if !problems.is_empty() {
        return None;
    }
    let mut changes: [HostPortChange; firewall::HOST_PORT_MAPS.len()] = Default::default();
    for (i, name) in firewall::HOST_PORT_MAPS.iter().enumerate() {
        let map = out.plan.firewall.maps.iter().find(|m| m.name == *name)?;
        // What a removed endpoint had is in the map as its own.
        if gone[i].iter().any(|(k, v)| map.elements.get(k) != Some(v)) {
            return None;
        }
        let (del, add) = &mut changes[i];
        let mut len = map.elements.len();
        for (k, v) in &came[i] {
            match map.elements.get(k) {
                // Another endpoint's.
                Some(_) if !gone[i].contains_key(k) => return None,
                // The same endpoint's, unchanged.
                Some(old) if old == v => {}
                Some(_) => {
                    del.push(k.clone());
                    add.push((k.clone(), v.clone()));
                }
                None => {
                    add.push((k.clone(), v.clone()));
                    len += 1;
                }
            }
        }
        for k in gone[i].keys().filter(|k| !came[i].contains_key(*k)) {
            del.push(k.clone());
            len -= 1;
        }
        if map.elements.is_empty() != (len == 0) {
            return None;
        }
    }
    Some(changes)
}

/// Whether the egress meters' classes can take an in-place endpoint change
/// ([`apply_endpoint_changes`]) as element changes: every class a port joins is in the guard
/// table already, and every class a port leaves keeps a port or is a Network's own (the full
/// plan adds and drops the others). `policed`: the egress rates of the ports removed, and of
/// those added ([`super::limits::policing`]).
fn police_changes_fit(
    out: &PlanOutput,
    res: &Resources,
    policed: &[BTreeMap<String, weft_dataplane::proto::Rate>; 2],
) -> bool {
    let Some(guard) = out.plan.guard.as_ref() else {
        return false;
    };
    let class_of = |rate: &weft_dataplane::proto::Rate| {
        super::guard::police_class(rate).map(|c| super::guard::police_set(&c))
    };
    let mut left: BTreeMap<String, usize> = BTreeMap::new();
    for (ports, add) in policed.iter().zip([false, true]) {
        for rate in ports.values() {
            let Some(name) = class_of(rate) else {
                continue;
            };
            let Some(set) = guard.sets.iter().find(|s| s.name == name) else {
                return false;
            };
            let n = left.entry(name).or_insert(set.elements.len());
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
        }
    }
    let realized: BTreeSet<&str> = out.plan.networks.iter().map(|n| n.name.as_str()).collect();
    let standing: BTreeSet<String> =
        super::limits::standing_police_rates(res, &|n| realized.contains(n))
            .iter()
            .filter_map(class_of)
            .collect();
    left.iter()
        .all(|(name, n)| *n > 0 || standing.contains(name))
}

/// A set's elements to delete and to add.
type ElementChange = (BTreeSet<String>, BTreeSet<String>);

/// The limit-class set changes of an in-place endpoint change ([`apply_endpoint_changes`]):
/// set → (addresses to delete, addresses to add). `None` when the change would touch more than
/// those elements: a class the table does not have yet, a class it would leave empty (the full
/// plan drops it), or a pod with invalid limit annotations (the full plan reports it).
fn limit_changes(
    out: &PlanOutput,
    res: &Resources,
    removed: &[Endpoint],
    added: &[Endpoint],
) -> Option<BTreeMap<String, ElementChange>> {
    let mut changes: BTreeMap<String, ElementChange> = BTreeMap::new();
    for (eps, add) in [(removed, false), (added, true)] {
        for e in eps {
            let (limits, problem) = super::limits::of(res, e);
            if problem.is_some() {
                return None;
            }
            let limits = limits.connections();
            if limits.is_none() {
                continue;
            }
            for ip in &addresses_of(e) {
                let set = firewall::limit_class_set(&limits, ip.is_ipv6());
                let entry = changes.entry(set).or_default();
                if add { &mut entry.1 } else { &mut entry.0 }.insert(ip.to_string());
            }
        }
    }
    // A class that would be left empty goes from the table (a structure change), unless it is
    // a Network's own, which stays.
    let realized: BTreeSet<&str> = out.plan.networks.iter().map(|n| n.name.as_str()).collect();
    let standing: BTreeSet<String> = standing_limit_classes(res, &|n| realized.contains(n))
        .iter()
        .flat_map(|l| {
            [
                firewall::limit_class_set(l, false),
                firewall::limit_class_set(l, true),
            ]
        })
        .collect();
    for (name, (del, add)) in &changes {
        let set = out.plan.firewall.sets.iter().find(|s| s.name == *name)?;
        let left = set
            .elements
            .iter()
            .filter(|e| !del.contains(*e) || add.contains(*e))
            .count()
            + add.iter().filter(|a| !set.elements.contains(*a)).count();
        if left == 0 && !standing.contains(name) {
            return None;
        }
    }
    Some(changes)
}

/// An endpoint's pod: namespace (`default` when unknown), name and labels.
fn pod_of(
    res: &Resources,
    pods: Option<&Pods>,
    e: &Endpoint,
) -> (String, String, weft_crds::Labels) {
    let namespace = e.pod_namespace.clone().unwrap_or_else(|| "default".into());
    let name = e.pod_name.clone().unwrap_or_default();
    let labels = match pods {
        Some(p) => p.0.get(&(namespace.as_str(), name.as_str())).copied(),
        None => workload_labels(&res.workloads, &namespace, &name),
    }
    .map(|l| std::sync::Arc::new(l.clone()))
    .unwrap_or_default();
    (namespace, name, labels)
}

/// This node's workload interfaces as the other nodes' agents need them (for their groups, and
/// a migrating VM's addresses and MAC).
pub fn published<'a>(
    res: &Resources,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> Vec<weft_crds::NodeWorkload> {
    let pods = Pods::of(res);
    let mut out: Vec<weft_crds::NodeWorkload> = endpoints
        .into_iter()
        .map(|e| {
            let (namespace, name, labels) = pod_of(res, Some(&pods), e);
            weft_crds::NodeWorkload {
                network: e.network.clone(),
                labels,
                namespace,
                name,
                ips: e.ips.iter().map(|ip| ip.to_string()).collect(),
                vm: e.vm.clone(),
                mac: Some(e.mac.clone()).filter(|m| !m.is_empty()),
                active: !e.pending,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.network, &a.namespace, &a.name, &a.ips).cmp(&(
            &b.network,
            &b.namespace,
            &b.name,
            &b.ips,
        ))
    });
    out
}

/// Where VM `vm` runs now on other nodes, by network (a live migration's source).
pub fn migration_sources(
    res: &Resources,
    vm: &str,
) -> std::collections::BTreeMap<String, weft_dataplane::proto::MigrationSource> {
    res.peers
        .iter()
        .filter(|p| p.workload.active && p.workload.vm.as_deref() == Some(vm))
        .filter_map(|p| {
            Some((
                p.workload.network.clone(),
                weft_dataplane::proto::MigrationSource {
                    node: p.node.clone(),
                    ips: p
                        .workload
                        .ips
                        .iter()
                        .filter_map(|i| i.parse().ok())
                        .collect(),
                    mac: p.workload.mac.clone()?,
                },
            ))
        })
        .collect()
}

/// The newest reservation of VM `vm` that another node publishes, by network (the node it ran
/// on last), while it runs on no other node there. Addresses that do not parse are left out.
pub fn restore_sources(
    res: &Resources,
    vm: &str,
) -> std::collections::BTreeMap<String, weft_dataplane::proto::Restore> {
    let running: std::collections::BTreeSet<&str> = res
        .peers
        .iter()
        .filter(|p| p.workload.vm.as_deref() == Some(vm))
        .map(|p| p.workload.network.as_str())
        .collect();
    let mut out: std::collections::BTreeMap<String, weft_dataplane::proto::Restore> =
        std::collections::BTreeMap::new();
    for p in &res.peer_reservations {
        let r = &p.reservation;
        if r.vm != vm || running.contains(r.network.as_str()) {
            continue;
        }
        let Ok(ips) = r
            .ips
            .iter()
            .map(|i| i.parse())
            .collect::<Result<Vec<IpAddr>, _>>()
        else {
            continue;
        };
        let since = u64::try_from(r.since).unwrap_or(0);
        // The newest wins; of two as new, the first node by name (every node picks the same).
        if out.get(&r.network).is_some_and(|o| {
            (o.since, std::cmp::Reverse(&o.node)) >= (since, std::cmp::Reverse(&p.node))
        }) {
            continue;
        }
        out.insert(
            r.network.clone(),
            weft_dataplane::proto::Restore {
                node: p.node.clone(),
                ips,
                mac: r.mac.clone(),
                since,
            },
        );
    }
    out
}

/// The host ports of the endpoints on networks realized here (pending migration targets
/// excepted: their VM still runs elsewhere), one per workload address of the mapping's family
/// (all of them when it names no host address; an unspecified one, `0.0.0.0` or `::`, is any
/// address of its family, as the portmap plugin takes it). Two endpoints claiming
/// one host port: the agent refuses the second at registration; one found anyway (in the IPAM
/// store) is reported and left out. A host port that is also a PortForward's node port is reported: the
/// PortForward's rules come first and take the connections from its sources.
fn plan_host_ports(
    realized: &dyn Fn(&str) -> bool,
    endpoints: &[Endpoint],
    forwards: &[Forward],
    syn_proxy: &dyn Fn(&Endpoint, bool) -> Option<firewall::SynOptions>,
    problems: &mut Vec<Problem>,
) -> Vec<firewall::HostPort> {
    let mut out = Vec::new();
    let mut taken: Vec<(&weft_dataplane::proto::PortMapping, &Endpoint)> = Vec::new();
    for e in endpoints {
        if e.pending || !realized(&e.network) {
            continue;
        }
        for m in &e.port_mappings {
            // The protocol goes into nftables text; the plugin sends only these.
            if !matches!(m.protocol.as_str(), "tcp" | "udp" | "sctp") {
                problems.push(endpoint_problem(
                    e,
                    WorkloadReason::UnsupportedHostPortProtocol,
                    format!(
                        "{m}: protocol {:?} is not tcp, udp or sctp; it is not forwarded",
                        m.protocol
                    ),
                ));
                continue;
            }
            if let Some((_, holder)) = taken.iter().find(|(t, _)| t.clashes(m)) {
                problems.push(endpoint_problem(
                    e,
                    WorkloadReason::HostPortConflict,
                    format!(
                        "{m} is already used by {}; it is not forwarded",
                        endpoint_name(holder)
                    ),
                ));
                continue;
            }
            taken.push((m, e));
            if let Some(f) = forwards.iter().find(|f| {
                f.protocol == m.protocol
                    && (f.node_ports.0..=f.node_ports.1).contains(&m.host_port)
                    && m.family().is_none_or(|v4| v4 == f.target.is_ipv4())
            }) {
                problems.push(endpoint_problem(
                    e,
                    WorkloadReason::HostPortShadowedByPortForward,
                    format!(
                        "{m} is also a node port of PortForward {}, which takes the connections of its allowed sources",
                        f.owner
                    ),
                ));
            }
            for ip in &e.ips {
                // An unspecified host address (`0.0.0.0`, `::`) is any of its family: a key of
                // `0.0.0.0` would match no connection.
                if m.family().is_some_and(|v4| v4 != ip.is_ipv4()) {
                    continue;
                }
                let host = match m.host_address() {
                    Some(h) => IpNet::from(h),
                    None if ip.is_ipv4() => IpNet::V4(Ipv4Net::default()),
                    None => IpNet::V6(Ipv6Net::default()),
                };
                out.push(firewall::HostPort {
                    host,
                    protocol: m.protocol.clone(),
                    port: m.host_port,
                    target: *ip,
                    target_port: m.container_port,
                    syn_proxy: if m.protocol == "tcp" {
                        syn_proxy(e, ip.is_ipv6())
                    } else {
                        None
                    },
                });
            }
        }
    }
    out
}

/// The workload on another node that already uses `ep`'s MAC on `ep`'s network, when that
/// network is a Bridge network (one LAN across the nodes, where two ports with one MAC take
/// each other's traffic; a NAT network is private to each node). The interfaces of one VM (a
/// live migration's source and target) share their MAC.
pub fn peer_with_mac<'a>(res: &'a Resources, ep: &Endpoint) -> Option<&'a Peer> {
    let bridge_mode = res.networks.iter().any(|n| {
        n.metadata.name.as_deref() == Some(ep.network.as_str())
            && n.spec.mode == NetworkMode::Bridge
    });
    let mac = names::parse_mac(&ep.mac)?;
    if !bridge_mode {
        return None;
    }
    res.peers.iter().map(|p| &**p).find(|p| {
        p.workload.network == ep.network
            && p.workload.mac.as_deref().and_then(names::parse_mac) == Some(mac)
            && (ep.vm.is_none() || p.workload.vm != ep.vm)
    })
}

/// A problem of workload `e`: of its pod (`namespace/name`), or of its container when the
/// runtime named no pod.
fn endpoint_problem(e: &Endpoint, reason: WorkloadReason, message: String) -> Problem {
    let (kind, object) = match (&e.pod_namespace, &e.pod_name) {
        (Some(ns), Some(name)) => ("Pod", format!("{ns}/{name}")),
        _ => ("Container", e.container_id.clone()),
    };
    Problem {
        kind,
        object,
        message,
        reason: Some(reason),
    }
}

/// `pod namespace/name` of an endpoint's pod, or `container <id>`.
pub fn endpoint_name(e: &Endpoint) -> String {
    match (&e.pod_namespace, &e.pod_name) {
        (Some(ns), Some(name)) => format!("pod {ns}/{name}"),
        _ => format!("container {}", e.container_id),
    }
}

fn plan_forwards(
    res: &Resources,
    networks: &BTreeMap<String, &Network>,
    endpoints: &[Endpoint],
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> (Vec<Forward>, BTreeMap<String, Vec<IpAddr>>) {
    let syn_proxy_allowed = node.syn_proxy;
    let mut out: Vec<Forward> = Vec::new();
    let mut realized = BTreeMap::new();
    // The controller's verdict on every PortForward, computed here by the same function (the
    // agent does not read their status): of two that claim one node port for overlapping
    // sources the older is valid, judged whole and on every Network, whether or not its target
    // runs on this node; the other is forwarded nowhere.
    let all: BTreeMap<String, &Network> = res
        .networks
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect();
    let verdicts = crate::controller::validate::port_forwards(res.port_forwards.iter(), &all);
    // Oldest first, as the controller judges them: of two PortForwards that claim the same
    // node port, the older one is forwarded on every node (a later one, whatever its name,
    // never takes a port over), and the controller's PortConflict names the other.
    let mut pfs: Vec<&PortForward> = res.port_forwards.iter().collect();
    pfs.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    });
    for pf in pfs {
        let namespace = pf
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let object = format!(
            "{namespace}/{}",
            pf.metadata.name.clone().unwrap_or_default()
        );
        let problem = |message: String| Problem {
            kind: "PortForward",
            object: object.clone(),
            message,
            reason: None,
        };
        if let Err(errs) = pf.spec.validate() {
            for e in errs {
                problems.push(problem(e.to_string()));
            }
            continue;
        }
        if let Some(Some(r)) = verdicts.get(&crate::controller::validate::port_forward_key(pf))
            && r.reason == crate::controller::validate::REASON_PORT_CONFLICT
        {
            problems.push(problem(r.message.clone()));
            continue;
        }
        let Some(net) = networks.get(&pf.spec.network) else {
            if !res
                .networks
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(pf.spec.network.as_str()))
            {
                problems.push(problem(format!(
                    "spec.network: Network {} does not exist; create it or fix the name",
                    pf.spec.network
                )));
            }
            // A network that does not select this node: nothing to forward here.
            continue;
        };
        let mut targets: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.network == pf.spec.network)
            .filter(|e| e.pod_namespace.as_deref().unwrap_or("default") == namespace)
            .filter(|e| {
                let Some(pod) = e.pod_name.as_deref() else {
                    return false;
                };
                if let Some(w) = &pf.spec.target.workload {
                    return w == pod;
                }
                if let Some(sel) = &pf.spec.target.selector {
                    return workload_labels(&res.workloads, &namespace, pod)
                        .is_some_and(|labels| weft_crds::selector_matches(sel, labels));
                }
                false
            })
            .collect();
        targets.sort_by(|a, b| (&a.pod_name, &a.container_id).cmp(&(&b.pod_name, &b.container_id)));
        let Some(target) = targets.first() else {
            // No target on this node (yet): nothing to forward here.
            continue;
        };
        if targets.len() > 1 {
            problems.push(problem(format!(
                "spec.target matches {} workloads on this node; forwarding to {} only (narrow the selector)",
                targets.len(),
                target.pod_name.clone().unwrap_or_default()
            )));
        }
        let allow: Vec<IpNet> = match &pf.spec.allow_from {
            Some(list) if !list.is_empty() => list.iter().filter_map(|c| c.parse().ok()).collect(),
            _ => vec![
                "0.0.0.0/0".parse().unwrap_or(IpNet::V4(Ipv4Net::default())),
                "::/0".parse().unwrap_or(IpNet::V6(Ipv6Net::default())),
            ],
        };
        if pf.spec.syn_proxy.is_some() && !syn_proxy_allowed {
            problems.push(problem(
                "spec.synProxy: the agent on this node runs without --syn-proxy (chart value agent.synProxy: true), so the TCP ports are forwarded without a SYN proxy; enable it there or remove synProxy".into(),
            ));
        }
        let syn_options = |v6: bool| {
            let p = pf.spec.syn_proxy.filter(|_| syn_proxy_allowed)?;
            let defaults = firewall::SynOptions::for_mtu(net.spec.mtu(), v6);
            Some(firewall::SynOptions {
                mss: p
                    .mss
                    .and_then(|m| u16::try_from(m).ok())
                    .unwrap_or(defaults.mss),
                wscale: p
                    .window_scale
                    .and_then(|w| u8::try_from(w).ok())
                    .unwrap_or(defaults.wscale),
            })
        };
        let mut used = Vec::new();
        for port in pf.spec.forward_ports() {
            if port.protocol == weft_crds::Protocol::Tcp
                && let Some(own) = node
                    .own_tcp_ports
                    .iter()
                    .find(|p| (port.node_ports.0..=port.node_ports.1).contains(*p))
            {
                problems.push(problem(format!(
                    "spec.ports: TCP node port {own} is the weft agent's own on this node (its metrics and health endpoint, which kubelet probes); choose another node port"
                )));
                continue;
            }
            for ip in &target.ips {
                for src in allow.iter().filter(|s| s.addr().is_ipv4() == ip.is_ipv4()) {
                    let fwd = Forward {
                        source: *src,
                        protocol: port.protocol.nft_name(),
                        node_ports: port.node_ports,
                        target: *ip,
                        target_port: if port.node_ports.0 == port.node_ports.1 {
                            Some(port.target_port.unwrap_or(port.node_ports.0))
                        } else {
                            None
                        },
                        owner: object.clone(),
                        guard: pf.spec.brute_force.and_then(|g| g.limits()),
                        syn_proxy: if port.protocol == weft_crds::Protocol::Tcp {
                            syn_options(ip.is_ipv6())
                        } else {
                            None
                        },
                    };
                    if let Some(clash) = out.iter().find(|o| o.overlaps(&fwd)) {
                        problems.push(problem(format!(
                            "spec.ports: {} port {} is already forwarded by PortForward {}; choose another node port",
                            fwd.protocol,
                            firewall::port_text(fwd.node_ports),
                            clash.owner
                        )));
                        continue;
                    }
                    if !used.contains(ip) {
                        used.push(*ip);
                    }
                    out.push(fwd);
                }
            }
        }
        realized.insert(object, used);
    }
    (out, realized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PeerReservation, parse_manifests};

    fn resources(yaml: &str) -> Resources {
        let mut r = Resources::default();
        parse_manifests(yaml, "test", &mut r);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        r
    }

    fn endpoint(network: &str, pod: &str, ips: &[&str]) -> Endpoint {
        Endpoint {
            network: network.into(),
            container_id: format!("cid-{pod}"),
            ifname: "eth0".into(),
            host_ifname: names::host_veth_name(&format!("cid-{pod}"), "eth0"),
            mac: "0a:58:0a:0a:00:02".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod_namespace: Some("default".into()),
            pod_name: Some(pod.into()),
            netns: None,
            vm: None,
            pending: false,
            vlan_trunk: vec![],
            port_mappings: vec![],
            bandwidth: None,
        }
    }

    /// The elements of map `name` of the plan's table, `key : value`.
    fn map_elements(out: &PlanOutput, name: &str) -> Vec<String> {
        out.plan
            .firewall
            .maps
            .iter()
            .find(|m| m.name == name)
            .unwrap()
            .elements
            .iter()
            .map(|(k, v)| format!("{k} : {v}"))
            .collect()
    }

    const NETS: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: nat-demo}
spec: {mode: NAT, subnets: [10.10.0.0/16, "fd10::/64"], ipam: {nodeBlockPrefix: 24}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: other}
spec: {mode: NAT, subnets: [10.20.0.0/24], nat: {masquerade: false}, nodeSelector: {matchLabels: {zone: a}}}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: web, namespace: default}
spec:
  network: nat-demo
  target: {selector: {matchLabels: {app: web}}}
  ports: [{port: 8080, targetPort: 80}, {protocol: UDP, portRange: {start: 5000, end: 5010}}]
  allowFrom: [192.168.50.0/24]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
"#;

    fn node(labels: &[(&str, &str)]) -> NodeContext {
        NodeContext {
            name: "node-a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            syn_proxy: false,
            own_tcp_ports: Vec::new(),
        }
    }

    fn all_blocks(res: &Resources, nodes: &[&str]) -> BTreeMap<String, NodeBlocks> {
        let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        res.networks
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap(),
                    standalone_blocks(n, &nodes, "node-a").unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_network_the_controller_rejected_says_so_instead_of_waiting_for_a_block() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let mut res = resources(NETS);
        let net = &mut res.networks[0];
        net.metadata.generation = Some(3);
        let condition = |generation: i64| Condition {
            type_: "Valid".into(),
            status: "False".into(),
            reason: "SubnetOverlap".into(),
            message: "spec.subnets[0]: 10.10.0.0/16 overlaps 10.0.0.0/8 of Network old".into(),
            observed_generation: Some(generation),
            last_transition_time: Time(Default::default()),
        };
        net.status = Some(weft_crds::NetworkStatus {
            conditions: vec![condition(3)],
            ..Default::default()
        });
        let problems = |res: &Resources| -> Vec<String> {
            plan(&node(&[]), res, &BTreeMap::new(), &[])
                .problems
                .iter()
                .map(|p| p.to_string())
                .filter(|p| p.contains("nat-demo"))
                .collect()
        };
        let got = problems(&res);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("the controller rejected the Network (SubnetOverlap): spec.subnets[0]")
                && !got[0].contains("yet"),
            "{got:?}"
        );
        // A verdict on an older generation: the new spec waits for its block.
        if let Some(s) = res.networks[0].status.as_mut() {
            s.conditions = vec![condition(2)];
        }
        let got = problems(&res);
        assert!(got[0].contains("no address block is assigned"), "{got:?}");
    }

    #[test]
    fn standalone_blocks_are_distinct_per_node() {
        let res = resources(NETS);
        let nodes: Vec<String> = vec!["node-b".into(), "node-a".into()];
        let a = standalone_blocks(&res.networks[0], &nodes, "node-a").unwrap();
        let b = standalone_blocks(&res.networks[0], &nodes, "node-b").unwrap();
        assert_eq!(a.v4.unwrap().to_string(), "10.10.0.0/24");
        assert_eq!(b.v4.unwrap().to_string(), "10.10.1.0/24");
        assert_eq!(a.v6.unwrap().to_string(), "fd10::/122");
        assert_eq!(b.v6.unwrap().to_string(), "fd10::40/122");
        // A /24 with /26 blocks holds four nodes, not five.
        let many: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        assert!(standalone_blocks(&res.networks[1], &many, "n3").is_ok());
        let err = standalone_blocks(&res.networks[1], &many, "n4").unwrap_err();
        assert!(err.contains("nodeBlockPrefix"), "{err}");
    }

    #[test]
    fn plan_has_one_bridge_per_selected_nat_network_with_gateways() {
        let res = resources(NETS);
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &[]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.plan.bridges.len(), 1, "other does not select this node");
        let b = &out.plan.bridges[0];
        assert_eq!(b.name, "wn-nat-demo");
        assert_eq!(
            b.addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            vec!["10.10.0.1/16", "fd10::1/64"]
        );
        assert_eq!(
            out.plan.networks[0].block_v4.unwrap().to_string(),
            "10.10.0.0/24"
        );
        assert!(
            out.plan
                .sysctls
                .iter()
                .any(|s| s.key == "net.ipv6.conf.all.forwarding")
        );

        let out = plan(
            &node(&[("zone", "a")]),
            &res,
            &all_blocks(&res, &["node-a"]),
            &[],
        );
        assert_eq!(out.plan.bridges.len(), 2);
    }

    #[test]
    fn masquerade_set_holds_only_masquerading_networks() {
        let res = resources(NETS);
        let out = plan(
            &node(&[("zone", "a")]),
            &res,
            &all_blocks(&res, &["node-a"]),
            &[],
        );
        let fw = &out.plan.firewall;
        let masq4 = fw.sets.iter().find(|s| s.name == "masq4").unwrap();
        assert_eq!(
            masq4.elements.iter().cloned().collect::<Vec<_>>(),
            vec!["10.10.0.0/16"]
        );
        let nets4 = fw.sets.iter().find(|s| s.name == "nets4").unwrap();
        assert_eq!(nets4.elements.len(), 2);
    }

    /// The firewall's rules that answer SYNs with cookies.
    fn synproxy_rules(out: &PlanOutput) -> Vec<&String> {
        out.plan
            .firewall
            .chains
            .iter()
            .flat_map(|c| &c.rules)
            .filter(|r| r.contains("synproxy"))
            .collect()
    }

    #[test]
    fn a_pod_asks_for_a_syn_proxy_on_its_tcp_host_ports() {
        let res = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: nat-demo}
spec: {mode: NAT, subnets: [10.10.0.0/16, "fd10::/64"]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, annotations: {weft.dev/syn-proxy: "true"}}
"#,
        );
        let blocks = all_blocks(&res, &["node-a"]);
        let m = |port, protocol: &str| weft_dataplane::proto::PortMapping {
            host_port: port,
            container_port: 80,
            protocol: protocol.into(),
            host_ip: None,
        };
        let mut web = endpoint("nat-demo", "web", &["10.10.0.5", "fd10::5"]);
        web.port_mappings = vec![m(8080, "tcp"), m(5353, "udp")];
        let mut plain = endpoint("nat-demo", "plain", &["10.10.0.6"]);
        plain.port_mappings = vec![m(9090, "tcp")];
        let eps = [web.clone(), plain];
        let elements = |out: &PlanOutput, prefix: &str| -> Vec<String> {
            out.plan
                .firewall
                .sets
                .iter()
                .filter(|s| s.name.starts_with(prefix))
                .flat_map(|s| s.elements.iter().cloned())
                .collect()
        };
        let mut with_flag = node(&[]);
        with_flag.syn_proxy = true;
        let on = plan(&with_flag, &res, &blocks, &eps);
        assert!(on.problems.is_empty(), "{:?}", on.problems);
        // Its TCP host port, IPv4 and IPv6; not its UDP one, nor another pod's.
        let mut proxied = elements(&on, "synh");
        proxied.sort();
        assert_eq!(proxied, ["0.0.0.0/0 . 8080", "::/0 . 8080"]);
        let rules = synproxy_rules(&on);
        assert!(
            rules.iter().any(|r| r.contains("mss 1460 wscale 7")),
            "{rules:?}"
        );
        assert!(
            rules.iter().any(|r| r.contains("mss 1440 wscale 7")),
            "{rules:?}"
        );
        // The host port itself is forwarded as ever.
        let hport = on
            .plan
            .firewall
            .maps
            .iter()
            .find(|m| m.name == "hportany4")
            .unwrap();
        assert!(hport.elements.contains_key("tcp . 8080"));
        // A pod with a SYN proxy's host ports never changes in place: its elements need the
        // full plan.
        let mut base = plan(&with_flag, &res, &blocks, &eps[1..]);
        assert!(apply_endpoint_changes(&mut base, &res, &[], &[web]).is_none());
        // Without the agent's flag: forwarded unproxied, and the pod says why.
        let off = plan(&node(&[]), &res, &blocks, &eps);
        assert!(elements(&off, "synh").is_empty());
        assert_eq!(off.problems.len(), 1, "{:?}", off.problems);
        assert!(off.problems[0].message.contains("weft.dev/syn-proxy"));
        assert!(off.problems[0].message.contains("--syn-proxy"));
        assert_eq!(
            off.problems[0].reason,
            Some(WorkloadReason::SynProxyUnavailable)
        );
    }

    #[test]
    fn a_pod_s_annotations_choose_its_host_ports_syn_proxy_options() {
        let res = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: nat-demo}
spec: {mode: NAT, subnets: [10.10.0.0/16, "fd10::/64"], limits: {synProxy: true}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
  annotations: {weft.dev/syn-proxy-mss: "1400", weft.dev/syn-proxy-window-scale: "9"}
"#,
        );
        let blocks = all_blocks(&res, &["node-a"]);
        let mut web = endpoint("nat-demo", "web", &["10.10.0.5", "fd10::5"]);
        web.port_mappings = vec![weft_dataplane::proto::PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: None,
        }];
        let mut with_flag = node(&[]);
        with_flag.syn_proxy = true;
        let out = plan(&with_flag, &res, &blocks, &[web]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let rules = synproxy_rules(&out);
        // One class, both families: the pod's values, not the Network MTU's.
        assert!(!rules.is_empty());
        assert!(
            rules.iter().all(|r| r.contains("mss 1400 wscale 9")),
            "{rules:?}"
        );
    }

    #[test]
    fn host_ports_become_map_elements_per_address_family_and_a_second_claim_is_reported() {
        let res = resources(NETS);
        let blocks = all_blocks(&res, &["node-a"]);
        let m = |port, protocol: &str, host_ip: Option<&str>| weft_dataplane::proto::PortMapping {
            host_port: port,
            container_port: 80,
            protocol: protocol.into(),
            host_ip: host_ip.map(|h| h.parse().unwrap()),
        };
        let mut web = endpoint("nat-demo", "host-1", &["10.10.0.5", "fd10::5"]);
        web.port_mappings = vec![
            m(8080, "tcp", None),
            m(5353, "udp", Some("192.168.50.11")),
            m(5354, "udp", Some("fd00::11")),
        ];
        let mut late = endpoint("nat-demo", "host-2", &["10.10.0.6"]);
        late.port_mappings = vec![m(8080, "tcp", None)];
        let mut pending = endpoint("nat-demo", "host-3", &["10.10.0.7"]);
        pending.pending = true;
        pending.port_mappings = vec![m(9090, "tcp", None)];
        let out = plan(&node(&[]), &res, &blocks, &[web, late, pending]);
        let elements = |name: &str| map_elements(&out, name);
        assert_eq!(
            elements("hport4"),
            ["192.168.50.11 . udp . 5353 : 10.10.0.5 . 80"],
            "a host IP of the other family is left out; a pending target gets nothing"
        );
        assert_eq!(elements("hportany4"), ["tcp . 8080 : 10.10.0.5 . 80"]);
        assert_eq!(elements("hport6"), ["fd00::11 . udp . 5354 : fd10::5 . 80"]);
        assert_eq!(elements("hportany6"), ["tcp . 8080 : fd10::5 . 80"]);
        assert!(
            out.problems.iter().any(|p| p.object == "default/host-2"
                && p.reason == Some(WorkloadReason::HostPortConflict)
                && p.message.contains("host port 8080/tcp")
                && p.message.contains("pod default/host-1")),
            "{:?}",
            out.problems
        );
        // NETS forwards node port 8080/tcp to web-1 (PortForward default/web).
        let forwarded = plan(
            &node(&[]),
            &res,
            &blocks,
            &[endpoint("nat-demo", "web-1", &["10.10.0.2"]), {
                let mut e = endpoint("nat-demo", "host-1", &["10.10.0.5"]);
                e.port_mappings = vec![m(8080, "tcp", None)];
                e
            }],
        );
        assert!(
            forwarded
                .problems
                .iter()
                .any(|p| p.object == "default/host-1"
                    && p.reason == Some(WorkloadReason::HostPortShadowedByPortForward)
                    && p.message.contains("PortForward default/web")),
            "{:?}",
            forwarded.problems
        );
    }

    #[test]
    fn an_unspecified_host_ip_is_any_address_of_the_node() {
        let res = resources(NETS);
        let blocks = all_blocks(&res, &["node-a"]);
        let m = |port, host_ip: Option<&str>| weft_dataplane::proto::PortMapping {
            host_port: port,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: host_ip.map(|h| h.parse().unwrap()),
        };
        let mut web = endpoint("nat-demo", "host-1", &["10.10.0.5", "fd10::5"]);
        web.port_mappings = vec![m(8080, Some("0.0.0.0")), m(8081, Some("::"))];
        // Unset, and on one address of the family: both claim what 0.0.0.0 holds; an IPv6
        // address does not (0.0.0.0 is any IPv4 address, as the portmap plugin takes it).
        let mut unset = endpoint("nat-demo", "host-2", &["10.10.0.6"]);
        unset.port_mappings = vec![m(8080, None)];
        let mut one = endpoint("nat-demo", "host-3", &["10.10.0.7"]);
        one.port_mappings = vec![m(8080, Some("192.168.50.11"))];
        let mut v6 = endpoint("nat-demo", "host-4", &["fd10::8"]);
        v6.port_mappings = vec![m(8080, Some("fd00::11"))];
        let out = plan(&node(&[]), &res, &blocks, &[web, unset, one, v6]);
        let elements = |name: &str| map_elements(&out, name);
        assert_eq!(elements("hportany4"), ["tcp . 8080 : 10.10.0.5 . 80"]);
        assert_eq!(elements("hportany6"), ["tcp . 8081 : fd10::5 . 80"]);
        assert!(elements("hport4").is_empty(), "{:?}", elements("hport4"));
        assert_eq!(elements("hport6").len(), 1, "{:?}", elements("hport6"));
        for (pod, port) in [("default/host-2", "8080"), ("default/host-3", "8080")] {
            assert!(
                out.problems.iter().any(|p| p.object == pod
                    && p.reason == Some(WorkloadReason::HostPortConflict)
                    && p.message.contains(&format!("host port {port}/tcp"))
                    && p.message.contains("pod default/host-1")),
                "{pod}: {:?}",
                out.problems
            );
        }
        assert_eq!(out.problems.len(), 2, "{:?}", out.problems);
    }

    #[test]
    fn port_forwards_become_map_elements_not_rules() {
        let res = resources(NETS);
        let blocks = all_blocks(&res, &["node-a"]);
        let empty = plan(&node(&[]), &res, &blocks, &[]);
        let eps = [endpoint("nat-demo", "web-1", &["10.10.0.2", "fd10::2"])];
        let with = plan(&node(&[]), &res, &blocks, &eps);
        assert!(with.problems.is_empty(), "{:?}", with.problems);
        let rules = |p: &PlanOutput| -> usize {
            p.plan.firewall.chains.iter().map(|c| c.rules.len()).sum()
        };
        assert_eq!(rules(&empty), rules(&with), "forwards add elements only");
        let fwd4 = with
            .plan
            .firewall
            .maps
            .iter()
            .find(|m| m.name == "fwd4")
            .unwrap();
        assert_eq!(
            fwd4.elements
                .iter()
                .map(|(k, v)| format!("{k} : {v}"))
                .collect::<Vec<_>>(),
            vec!["192.168.50.0/24 . tcp . 8080 : 10.10.0.2 . 80"]
        );
        let fwdr4 = with
            .plan
            .firewall
            .maps
            .iter()
            .find(|m| m.name == "fwdr4")
            .unwrap();
        assert_eq!(
            fwdr4
                .elements
                .iter()
                .map(|(k, v)| format!("{k} : {v}"))
                .collect::<Vec<_>>(),
            vec!["192.168.50.0/24 . udp . 5000-5010 : 10.10.0.2"]
        );
        // allowFrom has no IPv6 source: no IPv6 forward.
        let fwd6 = with
            .plan
            .firewall
            .maps
            .iter()
            .find(|m| m.name == "fwd6")
            .unwrap();
        assert!(fwd6.elements.is_empty());
        assert_eq!(
            with.forwards["default/web"],
            vec!["10.10.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn syn_proxies_need_the_agent_s_flag_and_announce_the_network_s_mss() {
        let res = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: jumbo}
spec: {mode: NAT, subnets: [10.30.0.0/16, "fd30::/64"], mtu: 9000}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: shop, namespace: default}
spec:
  network: jumbo
  target: {workload: shop}
  ports: [{port: 8443, targetPort: 443}, {protocol: UDP, port: 8443}]
  synProxy: {}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: ssh, namespace: default}
spec:
  network: jumbo
  target: {workload: shop}
  ports: [{port: 2222, targetPort: 22}]
  synProxy: {mss: 1400, windowScale: 9}
"#,
        );
        let blocks = all_blocks(&res, &["node-a"]);
        let eps = [endpoint("jumbo", "shop", &["10.30.0.2", "fd30::2"])];
        let elements = |p: &PlanOutput, name: &str| -> Vec<String> {
            p.plan
                .firewall
                .sets
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.elements.iter().cloned().collect())
                .unwrap_or_default()
        };
        let loose = |p: &PlanOutput| {
            p.plan
                .sysctls
                .iter()
                .find(|s| s.key == SYN_PROXY_SYSCTL)
                .map(|s| s.value.clone())
        };
        // Without --syn-proxy: forwarded unproxied, and each PortForward says why.
        let off = plan(&node(&[]), &res, &blocks, &eps);
        assert_eq!(off.problems.len(), 2, "{:?}", off.problems);
        assert!(off.problems[0].message.starts_with("spec.synProxy:"));
        assert!(off.problems[0].message.contains("agent.synProxy"));
        assert!(elements(&off, "syn0_4").is_empty());
        assert_eq!(loose(&off), None);
        assert_eq!(off.forwards["default/shop"].len(), 2);
        // With it: the TCP ports only, the MTU's MSS unless the PortForward names one.
        let mut with_flag = node(&[]);
        with_flag.syn_proxy = true;
        let on = plan(&with_flag, &res, &blocks, &eps);
        assert!(on.problems.is_empty(), "{:?}", on.problems);
        assert_eq!(loose(&on).as_deref(), Some("0"));
        let input = &on
            .plan
            .firewall
            .chains
            .iter()
            .find(|c| c.name == "input")
            .unwrap()
            .rules;
        let proxies: Vec<&String> = input.iter().filter(|r| r.contains("synproxy")).collect();
        // Three classes (the IPv4 and IPv6 MSS differ), each with a rule per family.
        assert_eq!(proxies.len(), 6, "{proxies:?}");
        let class = |mss: &str| -> String {
            let rule = proxies
                .iter()
                .find(|r| {
                    r.contains(&format!(" synproxy mss {mss} "))
                        && r.contains("ip6 saddr") == (mss == "8940")
                })
                .unwrap_or_else(|| panic!("no class with mss {mss}: {proxies:?}"));
            let at = rule.find("@syn").unwrap() + 1;
            rule[at..].split(' ').next().unwrap().to_string()
        };
        assert!(
            proxies
                .iter()
                .any(|r| r.ends_with("synproxy mss 1400 wscale 9 timestamp sack-perm"))
        );
        assert_eq!(elements(&on, &class("1400")), ["0.0.0.0/0 . 2222"]);
        assert_eq!(elements(&on, &class("8960")), ["0.0.0.0/0 . 8443"]);
        assert_eq!(elements(&on, &class("8940")), ["::/0 . 8443"]);
    }

    #[test]
    fn clashing_node_ports_are_reported_and_the_first_wins() {
        let mut res = resources(NETS);
        let extra = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: zz-clash, namespace: default}
spec: {network: nat-demo, target: {workload: web-1}, ports: [{port: 8080}]}
"#,
        );
        res.port_forwards.extend(extra.port_forwards);
        let eps = [endpoint("nat-demo", "web-1", &["10.10.0.2"])];
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &eps);
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert_eq!(out.problems[0].object, "default/zz-clash");
        assert!(
            out.problems[0]
                .message
                .contains("already forwarded on Network nat-demo by PortForward default/web")
        );
    }

    #[test]
    fn of_clashing_node_ports_the_older_port_forward_wins_whatever_its_name() {
        let mut res = resources(NETS);
        let extra = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: aa-late, namespace: aa, creationTimestamp: "2026-12-01T10:00:00Z"}
spec: {network: nat-demo, target: {workload: aa-web}, ports: [{port: 8080}]}
"#,
        );
        for pf in &mut res.port_forwards {
            pf.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-11-01T10:00:00Z".parse().unwrap(),
                ));
        }
        res.port_forwards.extend(extra.port_forwards);
        let theirs = Endpoint {
            pod_namespace: Some("aa".into()),
            ..endpoint("nat-demo", "aa-web", &["10.10.0.3"])
        };
        let eps = [endpoint("nat-demo", "web-1", &["10.10.0.2"]), theirs];
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &eps);
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert_eq!(out.problems[0].object, "aa/aa-late");
        assert!(
            out.problems[0]
                .message
                .contains("already forwarded on Network nat-demo by PortForward default/web"),
            "{:?}",
            out.problems
        );
    }

    /// As the controller judges them: a PortForward is refused whole when one of its ports
    /// clashes with an older one's (so a newer one on its other port is forwarded), and an
    /// older PortForward holds its ports on every node, whether or not its target runs there.
    #[test]
    fn port_forwards_are_judged_whole_and_hold_their_ports_where_their_target_is_not() {
        let pfs = r#"
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: a, namespace: t, creationTimestamp: "2026-12-01T10:00:00Z"}
spec: {network: nat-demo, target: {workload: pod-a}, ports: [{port: 2222}]}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: b, namespace: t, creationTimestamp: "2026-12-01T11:00:00Z"}
spec: {network: nat-demo, target: {workload: pod-b}, ports: [{port: 2222}, {port: 3333}]}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: c, namespace: t, creationTimestamp: "2026-12-01T12:00:00Z"}
spec: {network: nat-demo, target: {workload: pod-c}, ports: [{port: 3333}]}
"#;
        let mut res = resources(NETS);
        res.port_forwards = resources(pfs).port_forwards;
        let ep = |pod: &str, ip: &str| Endpoint {
            pod_namespace: Some("t".into()),
            ..endpoint("nat-demo", pod, &[ip])
        };
        let blocks = all_blocks(&res, &["node-a"]);
        let forwarded = |out: &PlanOutput| -> Vec<String> {
            map_elements(out, "fwd4")
                .into_iter()
                .filter(|e| e.contains("2222") || e.contains("3333"))
                .collect()
        };
        // All three targets here: a on 2222, c on 3333; b nowhere.
        let out = plan(
            &node(&[]),
            &res,
            &blocks,
            &[
                ep("pod-a", "10.10.0.2"),
                ep("pod-b", "10.10.0.3"),
                ep("pod-c", "10.10.0.4"),
            ],
        );
        let f = forwarded(&out);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f.iter()
                .any(|e| e.contains("2222") && e.contains("10.10.0.2")),
            "{f:?}"
        );
        assert!(
            f.iter()
                .any(|e| e.contains("3333") && e.contains("10.10.0.4")),
            "{f:?}"
        );
        let refused: Vec<&str> = out.problems.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(refused, ["t/b"], "{:?}", out.problems);
        // a's target elsewhere: b is still not forwarded here.
        let out = plan(
            &node(&[]),
            &res,
            &blocks,
            &[ep("pod-b", "10.10.0.3"), ep("pod-c", "10.10.0.4")],
        );
        assert!(
            !forwarded(&out).iter().any(|e| e.contains("10.10.0.3")),
            "{:?}",
            forwarded(&out)
        );
    }

    #[test]
    fn the_agent_s_own_port_is_not_forwarded_on_its_node() {
        let res = resources(NETS);
        let eps = [endpoint("nat-demo", "web-1", &["10.10.0.2"])];
        let blocks = all_blocks(&res, &["node-a"]);
        let forwarded = |out: &PlanOutput| {
            out.plan
                .firewall
                .maps
                .iter()
                .any(|m| m.name == "fwd4" && m.elements.keys().any(|k| k.contains("8080")))
        };
        let free = plan(&node(&[]), &res, &blocks, &eps);
        assert!(free.problems.is_empty(), "{:?}", free.problems);
        assert!(forwarded(&free));
        // The fixture's PortForward forwards TCP 8080: the agent listening there refuses it.
        let agent_on_8080 = NodeContext {
            own_tcp_ports: vec![8080],
            ..node(&[])
        };
        let out = plan(&agent_on_8080, &res, &blocks, &eps);
        assert!(
            out.problems.iter().any(|p| p.object == "default/web"
                && p.message
                    .contains("TCP node port 8080 is the weft agent's own")),
            "{:?}",
            out.problems
        );
        assert!(!forwarded(&out), "not forwarded");
    }

    #[test]
    fn invalid_resources_are_reported_not_planned() {
        let res = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: bad}
spec: {mode: NAT, subnets: [10.0.0.0/8, 11.0.0.0/8]}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: lost, namespace: default}
spec: {network: nowhere, target: {workload: x}, ports: [{port: 80}]}
"#,
        );
        let out = plan(&node(&[]), &res, &BTreeMap::new(), &[]);
        assert!(out.plan.bridges.is_empty());
        assert!(
            out.problems
                .iter()
                .any(|p| p.object == "bad" && p.message.contains("spec.subnets")),
            "{:?}",
            out.problems
        );
        assert!(
            out.problems
                .iter()
                .any(|p| p.object == "default/lost" && p.message.contains("spec.network"))
        );
    }

    #[test]
    fn plan_is_deterministic() {
        let res = resources(NETS);
        let blocks = all_blocks(&res, &["node-a"]);
        let eps = [endpoint("nat-demo", "web-1", &["10.10.0.2"])];
        let a = plan(&node(&[]), &res, &blocks, &eps);
        let b = plan(&node(&[]), &res, &blocks, &eps);
        assert_eq!(a.plan, b.plan);
    }

    const HELD: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: blue}
spec: {mode: NAT, subnets: [10.30.0.0/16]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: green}
spec: {mode: NAT, subnets: [10.31.0.0/16], nodeSelector: {matchLabels: {pool: x}}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: fresh}
spec: {mode: NAT, subnets: [10.32.0.0/16]}
"#;

    fn planned(out: &PlanOutput) -> Vec<&str> {
        out.plan.networks.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn a_missing_node_network_keeps_the_networks_realized_here_while_they_select_the_node() {
        // The snapshot of a cluster whose NodeNetwork for this node is gone for a moment.
        let mut res = resources(HELD);
        res.node_blocks = Some(BTreeMap::new());
        res.node_network_missing = true;
        let here = node(&[("pool", "x")]);
        // What the node realized before: blue and green (fresh never was), and a Network
        // deleted since.
        let mut realized = all_blocks(&res, &["node-a"]);
        realized.remove("fresh");
        realized.insert(
            "deleted".into(),
            NodeBlocks {
                v4: "10.33.0.0/24".parse().ok(),
                v6: None,
            },
        );
        let held = held_blocks(&res, &here, &realized);
        assert_eq!(held.keys().collect::<Vec<_>>(), ["blue", "green"]);
        assert_eq!(held["blue"], realized["blue"], "the block it has here");
        let web = endpoint("blue", "web-1", &["10.30.0.2"]);
        let out = plan(&here, &res, &held, std::slice::from_ref(&web));
        assert_eq!(planned(&out), ["blue", "green"]);
        assert_eq!(out.plan.ports.len(), 1);
        assert_eq!(out.plan.ports[0].name, web.host_ifname);
        assert_eq!(out.plan.ports[0].bridge, "wn-blue");
        let waits: Vec<String> = out.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            waits,
            ["Network fresh: no address block is assigned to node node-a yet"],
            "a Network not realized here waits for the NodeNetwork"
        );

        // The NodeNetwork is there again: its blocks alone count.
        res.node_network_missing = false;
        assert!(held_blocks(&res, &here, &realized).is_empty());
        res.node_network_missing = true;

        // A Network that no longer selects the node goes.
        let elsewhere = node(&[("pool", "y")]);
        let held = held_blocks(&res, &elsewhere, &realized);
        assert_eq!(held.keys().collect::<Vec<_>>(), ["blue"]);
        assert_eq!(planned(&plan(&elsewhere, &res, &held, &[])), ["blue"]);

        // A Network being deleted goes, and so does one deleted.
        res.networks[1].metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        res.networks
            .retain(|n| n.metadata.name.as_deref() != Some("blue"));
        let held = held_blocks(&res, &here, &realized);
        assert!(held.is_empty(), "{held:?}");
        let out = plan(&here, &res, &held, std::slice::from_ref(&web));
        assert!(out.plan.bridges.is_empty(), "{:?}", out.plan.bridges);
        assert!(
            out.plan.ports.is_empty(),
            "no port of a network not realized"
        );
    }

    #[test]
    fn every_endpoint_of_a_realized_network_is_a_port_of_its_bridge_with_its_allowed_trunk() {
        let res = resources(TRUNK);
        let mut vm = endpoint("trunk", "vm-1", &["10.70.0.66"]);
        vm.vlan_trunk = vec![VlanRange::one(20), VlanRange { min: 100, max: 105 }];
        let eps = [
            vm.clone(),
            endpoint("sub-30", "web-1", &["10.71.0.5"]),
            // vlan-20 is refused (its VLAN is trunk's): no port of it.
            endpoint("vlan-20", "web-2", &["10.72.0.5"]),
        ];
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &eps);
        let mut want = vec![
            PortPlan {
                name: vm.host_ifname.clone(),
                network: "trunk".into(),
                bridge: "wn-trunk".into(),
                trunk: vec![20, 100, 101],
            },
            PortPlan {
                name: eps[1].host_ifname.clone(),
                network: "sub-30".into(),
                bridge: "wn-sub-30".into(),
                trunk: vec![],
            },
        ];
        want.sort();
        assert_eq!(out.plan.ports, want);
    }

    const LAN: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: lan}
spec:
  mode: Bridge
  subnets: [192.168.50.0/24]
  gateway: [192.168.50.1]
  ipam: {nodeBlockPrefix: 27, exclude: [192.168.50.0/26]}
  bridge: {uplink: eth0}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: lan-10}
spec:
  mode: Bridge
  subnets: [10.60.0.0/24]
  bridge: {uplink: eth0, vlan: 10, bridgeName: br-v10}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: lan-dup}
spec: {mode: Bridge, subnets: [10.61.0.0/24], bridge: {uplink: eth0}}
"#;

    #[test]
    fn bridge_networks_attach_their_uplink_carry_no_gateway_and_are_not_sealed() {
        let mut res = resources(LAN);
        res.networks.extend(resources(NETS).networks);
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &[]);
        let lan = out
            .plan
            .bridges
            .iter()
            .find(|b| b.network == "lan")
            .unwrap();
        assert_eq!(lan.name, "wn-lan");
        assert!(lan.addresses.is_empty(), "the LAN router is the gateway");
        assert_eq!(
            lan.uplink,
            Some(UplinkPlan {
                device: "eth0".into(),
                vlan: None,
                filtering: None,
            })
        );
        let v10 = out
            .plan
            .bridges
            .iter()
            .find(|b| b.network == "lan-10")
            .unwrap();
        assert_eq!(v10.name, "br-v10");
        assert_eq!(v10.uplink.as_ref().unwrap().port(), "eth0.10");
        // Two networks cannot share one untagged uplink.
        assert!(!out.plan.bridges.iter().any(|b| b.network == "lan-dup"));
        let dup = out.problems.iter().find(|p| p.object == "lan-dup").unwrap();
        assert!(
            dup.message.contains("already the uplink of network lan"),
            "{dup}"
        );
        let st = out.plan.networks.iter().find(|n| n.name == "lan").unwrap();
        assert_eq!(st.mode, state::NetworkMode::Bridge);
        assert_eq!(st.gateway_v4, Some("192.168.50.1".parse().unwrap()));
        let sealed = out
            .plan
            .firewall
            .sets
            .iter()
            .find(|s| s.name == "sealed")
            .unwrap();
        assert!(sealed.elements.contains("\"wn-nat-demo\""));
        assert!(
            !sealed.elements.contains("\"wn-lan\""),
            "LAN hosts reach bridged workloads"
        );
        let masq = out
            .plan
            .firewall
            .sets
            .iter()
            .find(|s| s.name == "masq4")
            .unwrap();
        assert!(!masq.elements.contains("192.168.50.0/24"));
    }

    const TRUNK: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: trunk}
spec:
  mode: Bridge
  subnets: [10.70.0.0/24]
  bridge: {uplink: eth1, vlanFiltering: true, vlan: 10, trunkVlans: [{id: 20}, {minId: 100, maxId: 101}]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: sub-30}
spec: {mode: Bridge, subnets: [10.71.0.0/24], bridge: {uplink: eth1, vlan: 30}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: vlan-20}
spec: {mode: Bridge, subnets: [10.72.0.0/24], bridge: {uplink: eth1, vlan: 20}}
"#;

    #[test]
    fn vlan_filtering_networks_trunk_the_uplink_itself_and_guard_only_allowed_vlans() {
        let res = resources(TRUNK);
        let mut ep = endpoint("trunk", "vm-1", &["10.70.0.66"]);
        ep.vlan_trunk = vec![VlanRange::one(20), VlanRange { min: 100, max: 105 }];
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &[ep]);
        let trunk = out
            .plan
            .bridges
            .iter()
            .find(|b| b.network == "trunk")
            .unwrap();
        let filtering = VlanFiltering {
            own: 10,
            trunk: vec![VlanRange::one(20), VlanRange { min: 100, max: 101 }],
        };
        assert_eq!(
            trunk.uplink,
            Some(UplinkPlan {
                device: "eth1".into(),
                vlan: None,
                filtering: Some(filtering.clone()),
            }),
            "the uplink itself, no sub-interface"
        );
        assert_eq!(trunk.uplink.as_ref().unwrap().port(), "eth1");
        let st = out
            .plan
            .networks
            .iter()
            .find(|n| n.name == "trunk")
            .unwrap();
        assert_eq!(st.vlan_filtering, Some(filtering));
        // A sub-interface on another VLAN of the same device is fine; one on a trunk VLAN not.
        assert!(out.plan.bridges.iter().any(|b| b.network == "sub-30"));
        assert!(!out.plan.bridges.iter().any(|b| b.network == "vlan-20"));
        let p = out.problems.iter().find(|p| p.object == "vlan-20").unwrap();
        assert!(
            p.message
                .contains("VLAN 20 on interface eth1 is already network trunk's"),
            "{p}"
        );
        // The guard admits the port's tagged VLANs the network allows, not 102-105.
        let guard = out.plan.guard.as_ref().unwrap();
        let trunks = &guard
            .sets
            .iter()
            .find(|s| s.name == "trunks")
            .unwrap()
            .elements;
        let port = names::host_veth_name("cid-vm-1", "eth0");
        let want: BTreeSet<String> = [20, 100, 101]
            .iter()
            .map(|v| format!("\"{port}\" . {v}"))
            .collect();
        assert_eq!(trunks, &want);
    }

    #[test]
    fn a_node_with_bridge_networks_only_does_not_become_a_router() {
        let res = resources(LAN);
        let out = plan(&node(&[]), &res, &all_blocks(&res, &["node-a"]), &[]);
        assert_eq!(out.plan.bridges.len(), 2);
        assert!(out.plan.sysctls.is_empty(), "{:?}", out.plan.sysctls);
    }

    fn reservation(node: &str, vm: &str, ip: &str, since: i64) -> PeerReservation {
        PeerReservation {
            node: node.into(),
            reservation: weft_crds::NodeReservation {
                vm: vm.into(),
                network: "lan".into(),
                ifname: "eth0".into(),
                ips: vec![ip.into()],
                mac: Some("02:00:00:00:00:01".into()),
                since,
            },
        }
    }

    fn running(node: &str, vm: &str, ip: &str, active: bool) -> Peer {
        Peer {
            node: node.into(),
            workload: weft_crds::NodeWorkload {
                network: "lan".into(),
                namespace: "default".into(),
                name: "virt-launcher-x".into(),
                labels: Default::default(),
                ips: vec![ip.into()],
                vm: Some(vm.into()),
                mac: Some("02:00:00:00:00:01".into()),
                active,
            },
        }
    }

    /// Two workloads with one MAC on two Networks (cloned VMs) share a link-local address: it
    /// is in neither's identity but denied by default (local, in the default-deny set), held as
    /// shared (a registration touching it takes the full plan), and a problem names both; on
    /// one Network (a live migration's two ends) it stays theirs.
    #[test]
    fn a_link_local_address_on_two_networks_is_no_one_s() {
        let res = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: a}
spec: {mode: NAT, subnets: [10.61.0.0/16]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: b}
spec: {mode: NAT, subnets: [10.62.0.0/16]}
"#,
        );
        let ll: IpAddr = "fe80::858:aff:fe0a:2".parse().unwrap();
        let blocks = all_blocks(&res, &["node-a"]);
        let two = [
            endpoint("a", "p1", &["10.61.0.2"]),
            endpoint("b", "p2", &["10.62.0.2"]),
        ];
        let out = plan(&node(&[]), &res, &blocks, &two);
        assert!(out.policy.shared.contains(&ll));
        assert!(out.policy.local.contains(&ll) && out.policy.default_deny.contains(&ll));
        assert!(!out.policy.owners.contains_key(&ll), "no one's identity");
        let problem = out
            .problems
            .iter()
            .find(|p| p.message.contains("have one MAC"))
            .expect("a problem names them");
        assert_eq!(
            problem.message,
            format!(
                "default/p1 on Network a and default/p2 on Network b have one MAC, so one IPv6 link-local address {ll}: no policy names it, and its traffic is denied unless a rule allows it by address (cidrs); give one of them another MAC"
            )
        );
        let one = [
            endpoint("a", "p1", &["10.61.0.2"]),
            endpoint("a", "p2", &["10.61.0.3"]),
        ];
        let out = plan(&node(&[]), &res, &blocks, &one);
        assert!(out.policy.local.contains(&ll) && !out.policy.default_deny.contains(&ll));
        assert!(
            !out.problems
                .iter()
                .any(|p| p.message.contains("have one MAC"))
        );
    }

    /// A Bridge network and a NAT network.
    const LAN_AND_NAT: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: lan}
spec: {mode: Bridge, subnets: [10.61.0.0/24], bridge: {uplink: eth0}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: nat}
spec: {mode: NAT, subnets: [10.62.0.0/16]}
"#;

    /// A workload interface's policy addresses include its link-local address (the EUI-64 one
    /// of its MAC): here, and on another node on a Bridge network (reached over the LAN), not
    /// on another node's NAT network (not on this link).
    #[test]
    fn policy_members_carry_their_link_local_address() {
        let mut res = resources(LAN_AND_NAT);
        let mut on_nat = running("node-b", "default/v2", "10.62.0.9", true);
        on_nat.workload.network = "nat".into();
        res.peers = vec![
            std::sync::Arc::new(running("node-b", "default/v1", "10.61.0.9", true)),
            std::sync::Arc::new(on_nat),
        ];
        let members = members(&res, &[endpoint("nat", "p", &["10.62.0.2"])]);
        let ips: Vec<Vec<String>> = members
            .iter()
            .map(|m| m.ips.iter().map(ToString::to_string).collect())
            .collect();
        assert_eq!(
            ips,
            [
                vec!["10.62.0.2", "fe80::858:aff:fe0a:2"],
                vec!["10.61.0.9", "fe80::ff:fe00:1"],
                vec!["10.62.0.9"],
            ]
        );
    }

    #[test]
    fn a_mac_a_workload_on_another_node_uses_is_found_on_bridge_networks_only() {
        let mut res = resources(LAN_AND_NAT);
        res.peers = vec![running("node-b", "default/db", "10.61.0.40", true).into()];
        let mut ep = endpoint("lan", "thief", &["10.61.0.41"]);
        ep.mac = "02:00:00:00:00:01".into();
        assert_eq!(
            peer_with_mac(&res, &ep).map(|p| p.node.as_str()),
            Some("node-b")
        );
        // The same VM (a live migration's target) shares it; another MAC, or a NAT network
        // (private to each node), is no clash.
        ep.vm = Some("default/db".into());
        assert!(peer_with_mac(&res, &ep).is_none());
        ep.vm = None;
        ep.mac = "02:00:00:00:00:02".into();
        assert!(peer_with_mac(&res, &ep).is_none());
        ep.mac = "02:00:00:00:00:01".into();
        ep.network = "nat".into();
        std::sync::Arc::make_mut(&mut res.peers[0]).workload.network = "nat".into();
        assert!(peer_with_mac(&res, &ep).is_none());
    }

    #[test]
    fn a_stopped_vm_gets_the_newest_reservation_of_the_other_nodes_back() {
        let mut res = Resources {
            peer_reservations: vec![
                reservation("node-b", "default/db", "10.70.0.40", 100),
                reservation("node-c", "default/db", "10.70.0.50", 200),
                reservation("node-d", "default/db", "10.70.0.60", 200),
                reservation("node-b", "default/other", "10.70.0.41", 900),
            ],
            ..Resources::default()
        };
        let r = restore_sources(&res, "default/db");
        assert_eq!(r.len(), 1);
        assert_eq!(
            r["lan"].node, "node-c",
            "the newest; of two as new, the first by name"
        );
        assert_eq!(r["lan"].ips, ["10.70.0.50".parse::<IpAddr>().unwrap()]);
        assert_eq!(r["lan"].since, 200);
        assert!(restore_sources(&res, "default/nobody").is_empty());
        // The identity reply carries it for the VM's pod…
        let reply = crate::agent::identity_reply(
            Some(&res),
            true,
            "default",
            "virt-launcher-db",
            Some("default/db"),
        );
        assert_eq!(reply.restore["lan"].node, "node-c");
        assert!(reply.migration.is_empty());
        // …but not while the VM runs on another node (a live migration takes its addresses
        // from there), pending or active.
        for active in [true, false] {
            res.peers = vec![running("node-e", "default/db", "10.70.0.50", active).into()];
            assert!(restore_sources(&res, "default/db").is_empty());
        }
        res.peers = vec![running("node-e", "default/db", "10.70.0.50", true).into()];
        let reply = crate::agent::identity_reply(
            Some(&res),
            true,
            "default",
            "virt-launcher-db",
            Some("default/db"),
        );
        assert!(reply.restore.is_empty());
        assert_eq!(reply.migration["lan"].node, "node-e");
    }

    proptest::proptest! {
        // The Network API's interface-name pattern (crds) is stricter than the kernel's rule
        // (dataplane), and neither crate sees the other: the plan hands one to the other.
        #[test]
        fn every_interface_name_the_network_api_admits_is_one_the_kernel_accepts(
            name in weft_crds::validate::IFNAME_PATTERN.trim_start_matches('^').trim_end_matches('$')
        ) {
            proptest::prop_assert!(weft_crds::validate::matches_ifname_pattern(&name));
            proptest::prop_assert!(weft_dataplane::names::is_valid_ifname(&name), "{name:?}");
        }
    }
}

#[cfg(test)]
mod delta_tests;

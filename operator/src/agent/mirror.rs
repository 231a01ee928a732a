//! Traffic mirrors on this node: which workload ports copy which frames to which analyzer port
//! or tunnel ([`plan`], pure), and the task that keeps the kernel's tc filters to that plan
//! ([`Mirrors`]). The same task keeps the ports' bandwidth shaping ([`MirrorPlan::shaping`],
//! planned by `limits::shaping`): both are tc on the workloads' host ports, which wait for the
//! CNI alike.
//!
//! A copy is taken on the source's host port (veth or VM tap) by a `cls_bpf` filter whose
//! classic BPF program is the mirror's filter and whose action is `mirred egress mirror`: frames
//! from the workload at the port's ingress hook (before the bridge and its policy), frames to
//! the workload at its egress hook (after them). The copy leaves through the analyzer's host
//! port, so it arrives on the analyzer's interface, or through the mirror's VXLAN link to a
//! remote collector.
//!
//! The CNI wires a port after the agent has registered it, so a port (or an analyzer's port)
//! may not exist yet when its plan arrives: a changed plan is applied when an ADD reports that
//! it finished, or [`PLAN_DELAY`] after the change at the latest; a port still missing then
//! waits, and is tried again at the next ADD's report and at every resync.

use crate::model::Resources;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use weft_crds::{MirrorProtocol, NodeMirror, TrafficMirror, selector_matches};
use weft_dataplane::mirror::{Insn, L4, MirrorFilter, Side, program};
use weft_dataplane::names;
use weft_dataplane::netlink::{
    LinkInfo, MirrorRule, Netlink, NetlinkError, Shaping, SpareIfbs, is_spare_ifb,
};
use weft_dataplane::proto::Endpoint;

/// One copy a source port makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The TrafficMirror, `namespace/name`.
    pub mirror: String,
    /// Which frames: to or from the workload.
    pub side: Side,
    /// The filter as a classic BPF program.
    pub program: Vec<Insn>,
    /// The link the copies leave through: an analyzer's host port or a mirror's tunnel.
    pub to: String,
}

/// A mirror's VXLAN link to its remote collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// The TrafficMirror, `namespace/name`.
    pub mirror: String,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The collector.
    pub remote: IpAddr,
    /// Its UDP port.
    pub port: u16,
}

/// What one mirror does on this node, as planned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    /// Source interfaces on this node.
    pub sources: usize,
    /// Why it cannot mirror here, if it cannot.
    pub error: Option<String>,
}

/// The mirrors of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorPlan {
    /// Source host port → its copies, in order.
    pub ports: BTreeMap<String, Vec<PortRule>>,
    /// Tunnel link name → tunnel.
    pub tunnels: BTreeMap<String, Tunnel>,
    /// `namespace/name` → what it does here.
    pub mirrors: BTreeMap<String, Planned>,
    /// Host port → its bandwidth shaping (ports without limits are absent).
    pub shaping: BTreeMap<String, Shaping>,
}

fn l4(p: MirrorProtocol) -> L4 {
    match p {
        MirrorProtocol::Tcp => L4::Tcp,
        MirrorProtocol::Udp => L4::Udp,
        MirrorProtocol::Sctp => L4::Sctp,
        MirrorProtocol::Icmp => L4::Icmp,
    }
}

/// The dataplane's filter for a TrafficMirror's `spec.filter`.
pub fn filter_of(m: &TrafficMirror) -> MirrorFilter {
    let f = m.spec.filter.clone().unwrap_or_default();
    MirrorFilter {
        protocols: f.protocols.iter().copied().map(l4).collect(),
        ports: m.spec.port_ranges(),
        cidrs: f.cidrs.iter().filter_map(|c| c.net().ok()).collect(),
    }
}

fn namespace_of(e: &Endpoint) -> &str {
    e.pod_namespace.as_deref().unwrap_or("default")
}

/// Computes this node's mirrors from the TrafficMirrors in `res` and the node's endpoints.
/// `collectors`: the CIDRs a remote collector may be in.
pub fn plan(res: &Resources, endpoints: &[Endpoint], collectors: &[IpNet]) -> MirrorPlan {
    let mut out = MirrorPlan::default();
    let pods = super::plan::Pods::of(res);
    let labels = |e: &Endpoint| {
        e.pod_name
            .as_deref()
            .and_then(|pod| pods.labels(namespace_of(e), pod))
    };
    let mut mirrors: Vec<&TrafficMirror> = res.mirrors.iter().collect();
    mirrors.sort_by_key(|m| (m.metadata.namespace.clone(), m.metadata.name.clone()));
    for m in mirrors {
        let namespace = m
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = format!(
            "{namespace}/{}",
            m.metadata.name.clone().unwrap_or_default()
        );
        let mut planned = Planned::default();
        if let Err(errors) = m.spec.validate() {
            let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            planned.error = Some(format!("invalid: {}", text.join("; ")));
            out.mirrors.insert(key, planned);
            continue;
        }
        // The analyzer on this node: the first matching pod by name, its interface on the
        // analyzer's network (or its first weft interface).
        let mut analyzers: Vec<&Endpoint> = Vec::new();
        if let Some(a) = &m.spec.destination.analyzer {
            analyzers = endpoints
                .iter()
                .filter(|e| !e.pending && namespace_of(e) == namespace)
                .filter(|e| a.network.as_ref().is_none_or(|n| *n == e.network))
                .filter(|e| labels(e).is_some_and(|l| selector_matches(&a.selector, l)))
                .collect();
            analyzers.sort_by(|x, y| (&x.pod_name, &x.ifname).cmp(&(&y.pod_name, &y.ifname)));
        }
        let analyzer_pod = analyzers.first().and_then(|a| a.pod_name.clone());
        let sources: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| namespace_of(e) == namespace)
            .filter(|e| {
                m.spec
                    .sources
                    .network
                    .as_ref()
                    .is_none_or(|n| *n == e.network)
            })
            .filter(|e| analyzer_pod.is_none() || e.pod_name != analyzer_pod)
            .filter(|e| labels(e).is_some_and(|l| selector_matches(&m.spec.sources.selector, l)))
            .collect();
        if sources.is_empty() {
            out.mirrors.insert(key, planned);
            continue;
        }
        let to = if let Some(a) = analyzers.first() {
            a.host_ifname.clone()
        } else if let Some(r) = &m.spec.destination.remote {
            let Ok(remote) = r.address.addr() else {
                continue;
            };
            if !collectors.iter().any(|c| c.contains(&remote)) {
                planned.error = Some(format!(
                    "spec.destination.remote.address: {remote} is outside the CIDRs this node's agent may send copies to ({}); the cluster administrator allows collectors with the chart value agent.mirrorCollectors (--mirror-collectors)",
                    if collectors.is_empty() {
                        "none allowed".to_string()
                    } else {
                        collectors
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
                out.mirrors.insert(key, planned);
                continue;
            }
            let name = names::mirror_tunnel_name(&key);
            out.tunnels.insert(
                name.clone(),
                Tunnel {
                    mirror: key.clone(),
                    vni: u32::try_from(r.vni).unwrap_or(1),
                    remote,
                    port: r.udp_port(),
                },
            );
            name
        } else {
            planned.error = Some(format!(
                "no analyzer pod (spec.destination.analyzer.selector) runs on this node: the {} source interface(s) here are not mirrored; run the analyzer on every node with sources (a DaemonSet)",
                sources.len()
            ));
            out.mirrors.insert(key, planned);
            continue;
        };
        // One program per direction, whatever the number of sources.
        let filter = filter_of(m);
        let copies: Vec<PortRule> = [
            (m.spec.direction.egress(), Side::FromWorkload),
            (m.spec.direction.ingress(), Side::ToWorkload),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, side)| PortRule {
            mirror: key.clone(),
            side,
            program: program(&filter, side),
            to: to.clone(),
        })
        .collect();
        for s in &sources {
            out.ports
                .entry(s.host_ifname.clone())
                .or_default()
                .extend(copies.iter().cloned());
        }
        planned.sources = sources.len();
        out.mirrors.insert(key, planned);
    }
    out
}

/// What the kernel has of a plan, kept between passes.
#[derive(Debug, Default)]
struct Applied {
    /// Port → the rules installed on it.
    ports: BTreeMap<String, Vec<PortRule>>,
    /// Ports whose rules (or whose analyzer) wait for their link.
    waiting: BTreeSet<String>,
    /// Tunnels up.
    tunnels: BTreeMap<String, Tunnel>,
    /// Port → the shaping in force on it.
    shaping: BTreeMap<String, Shaping>,
    /// Ports whose IFB link this agent may have made and has not seen go (a shaping that
    /// failed half way, after the link was made, is in force nowhere but leaves it).
    ifbs: BTreeSet<String>,
    /// Spare IFB links (of ports that left) for the next ports shaped: at most [`SPARE_IFBS`].
    spares: SpareIfbs,
    /// When a port last had an egress limit (spares go after [`SPARE_IDLE`] without one).
    last_egress: Option<std::time::Instant>,
}

impl Applied {
    /// Nothing to follow: no port waiting for its link, none mirrored.
    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.ports.is_empty()
    }
}

/// How many IFB links of departed ports the agent keeps for the next ports with an egress
/// limit, instead of deleting them: creating and deleting the link are the dearest of a
/// shaped port's requests (its registration, sysfs entries and sysctl tables; a grace period
/// when it goes), and on a node where pods come and go (a rollout replaces them a batch at a
/// time) the next pod takes a spare. Each idle spare holds about 50 KiB of kernel memory (200
/// IFB links up with a `tbf`: 10 MB); kubelet's default of 110 pods per node gives the scale.
/// More room measured no faster (docs/benchmarks.md: 128 links made ahead, then 256 spares).
const SPARE_IFBS: usize = 64;

/// Spares are deleted at a full pass when no port has had an egress limit for this long.
const SPARE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Brings the kernel to `plan`. `full`: also take stale filters off every weft port and delete
/// stale tunnels (at the first pass and every resync). `departed`: shaped host ports whose
/// workload was detached ([`Mirrors::departed`]), `true` for those a workload has registered on
/// again since ([`Mirrors::arrived`]). Returns each mirror's state here.
fn apply(
    nl: &mut Netlink,
    plan: &MirrorPlan,
    applied: &mut Applied,
    full: bool,
    departed: &BTreeMap<String, bool>,
) -> Result<BTreeMap<String, NodeMirror>, NetlinkError> {
    apply_capped(nl, plan, applied, full, departed, SPARE_IFBS)
}

/// What a pass that is not full looked up by name: the link each name found.
type Found = Option<BTreeMap<String, Option<LinkInfo>>>;

/// Takes the links `changed` says the pass has changed (retired, deleted, moved) out of
/// `found`, so that a port's shaping looks its names up again.
fn forget_changed(found: &mut Found, changed: impl Fn(u32) -> bool) {
    if let Some(found) = found.as_mut() {
        found.retain(|_, l| l.as_ref().is_none_or(|l| !changed(l.index)));
    }
}

/// Deletes at once those of `doomed` (IFB links to go after the pass's ports are shaped) that
/// `links` names with one of `ifb_names`, the IFB names of this pass's ports with an egress
/// limit, and takes them out of `doomed` and `found`. Such a link was made for a port whose
/// name is back (the same attachment added anew) and served another port since, now gone or
/// departing: left until after the pass, it would hold the returning port's IFB name, and that
/// port would stay unshaped.
fn delete_in_the_way(
    nl: &mut Netlink,
    links: &[LinkInfo],
    ifb_names: &BTreeSet<String>,
    doomed: &mut Vec<u32>,
    found: &mut Found,
) -> Result<(), NetlinkError> {
    // A link looked up under two names (its own, and a port's as its alternative name) is in
    // `links` twice: each index once.
    let in_the_way: Vec<u32> = links
        .iter()
        .filter(|l| doomed.contains(&l.index) && ifb_names.contains(&l.name))
        .map(|l| l.index)
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect();
    if in_the_way.is_empty() {
        return Ok(());
    }
    doomed.retain(|i| !in_the_way.contains(i));
    forget_changed(found, |i| in_the_way.contains(&i));
    let deleted = nl.delete_links(&in_the_way)?;
    info!(
        deleted,
        "deleted shaping links under the IFB name of a port to shape"
    );
    Ok(())
}

/// Moves the shaping of a port with an egress limit off its IFB link when `links` names that
/// link with one of `ifb_names` (the IFB names of this pass's ports with an egress limit) and
/// it is not the port's own IFB name: a spare made for a port whose name is back (the same
/// attachment added anew), which the other port took. The other port gets another link
/// ([`Netlink::move_shaping`]) and the returning one takes this one by its name; the links
/// moved are taken out of `found`, for the ports' shaping to look them up again. Without the
/// move the returning port would stay unshaped for as long as the other port lives.
fn move_out_of_the_way(
    nl: &mut Netlink,
    links: &[LinkInfo],
    ifb_names: &BTreeSet<String>,
    plan: &MirrorPlan,
    spares: &mut SpareIfbs,
    found: &mut Found,
) {
    let mut seen = BTreeSet::new();
    for held in links {
        if !ifb_names.contains(&held.name) || !seen.insert(held.index) {
            continue;
        }
        let Some(other) = held.alias.as_deref().and_then(names::shaped_port) else {
            continue;
        };
        let own = names::shaping_ifb_name(other);
        let Some(shaping) = plan.shaping.get(other).filter(|s| s.egress.is_some()) else {
            continue;
        };
        if own == held.name {
            continue;
        }
        match nl.move_shaping(held, shaping, spares) {
            Ok(moved) => info!(
                ifb = %held.name,
                port = other,
                moved,
                "freed a port's IFB name held by another port's shaping link"
            ),
            Err(e) => warn!(
                ifb = %held.name,
                port = other,
                error = %e,
                "cannot free a port's IFB name held by another port's shaping link"
            ),
        }
        // Found under its own name and under the other port's (its alternative name until now).
        forget_changed(found, |i| i == held.index);
    }
}

/// [`apply`], keeping at most `cap` spare IFB links.
fn apply_capped(
    nl: &mut Netlink,
    plan: &MirrorPlan,
    applied: &mut Applied,
    full: bool,
    departed: &BTreeMap<String, bool>,
    cap: usize,
) -> Result<BTreeMap<String, NodeMirror>, NetlinkError> {
    // A detached workload's port goes with its namespace, or the reaper deletes it: its `tbf`
    // goes along, and taking it off first would cost the node's routing lock for nothing. Its
    // IFB link is another matter: it would become a spare while the port's redirect still
    // points at it, so the redirect goes first (`shape`, `departing`). A full pass, which
    // repairs, unshapes them in full.
    // A port a workload came back to (the same attachment added again, on a new link under
    // the same name) is shaped anew, whatever the old link had.
    let departing = |port: &str| {
        !full && departed.get(port) == Some(&false) && !plan.shaping.contains_key(port)
    };
    for (port, back) in departed {
        if *back || (departing(port) && !applied.ifbs.contains(port)) {
            applied.shaping.remove(port);
        }
    }
    // Ports: those whose rules changed, those waiting, and at a full pass every weft port.
    let mut touch: BTreeSet<String> = plan
        .ports
        .iter()
        .filter(|(p, rules)| applied.ports.get(*p) != Some(*rules))
        .map(|(p, _)| p.clone())
        .collect();
    touch.extend(applied.waiting.iter().cloned());
    touch.extend(
        applied
            .ports
            .keys()
            .filter(|p| !plan.ports.contains_key(*p))
            .cloned(),
    );
    touch.extend(
        plan.shaping
            .iter()
            .filter(|(p, s)| applied.shaping.get(*p) != Some(*s))
            .map(|(p, _)| p.clone()),
    );
    touch.extend(
        applied
            .shaping
            .keys()
            .filter(|p| !plan.shaping.contains_key(*p))
            .cloned(),
    );
    // Ports that copy into a tunnel about to be made again (a collector's VNI, address or port
    // changed: a new link, a new index), whose filters would copy to the old one's.
    let remade: BTreeSet<&String> = plan
        .tunnels
        .iter()
        .filter(|(name, t)| applied.tunnels.get(*name).is_some_and(|old| old != *t))
        .map(|(name, _)| name)
        .collect();
    touch.extend(
        plan.ports
            .iter()
            .filter(|(_, rules)| rules.iter().any(|r| remade.contains(&r.to)))
            .map(|(p, _)| p.clone()),
    );
    // Ports that may still have an IFB link they no longer want.
    touch.extend(
        applied
            .ifbs
            .iter()
            .filter(|p| plan.shaping.get(*p).is_none_or(|s| s.egress.is_none()))
            .cloned(),
    );
    // The links this pass reads: at a full pass every link of the node (one dump); otherwise
    // only those it may change or read, each looked up by name, so that a pass for one new
    // workload costs the same with 10 ports on the node as with 500.
    // In a pass that is not full: what each name looked up found (a spare IFB answers to the
    // name of the port it serves as its alternative name, so not every link found is listed
    // under its own name).
    let mut found: Found = None;
    let links = if full {
        let links = nl.links()?;
        touch.extend(plan.ports.keys().cloned());
        touch.extend(
            links
                .iter()
                .filter(|l| l.alias.as_deref().is_some_and(names::is_endpoint_alias))
                .map(|l| l.name.clone()),
        );
        links
    } else {
        let mut wanted: BTreeSet<String> = touch.clone();
        for port in &touch {
            wanted.extend(
                plan.ports
                    .get(port)
                    .into_iter()
                    .flatten()
                    .map(|r| r.to.clone()),
            );
            // Its IFB link: one it no longer wants may have to go, and the shaping below
            // takes what was found here instead of asking again.
            wanted.insert(names::shaping_ifb_name(port));
        }
        wanted.extend(plan.tunnels.keys().cloned());
        wanted.extend(applied.tunnels.keys().cloned());
        // Their counters are read below.
        wanted.extend(applied.ports.keys().cloned());
        let mut links = Vec::with_capacity(wanted.len());
        let mut asked = BTreeMap::new();
        for name in &wanted {
            let link = nl.link_by_name(name)?;
            if let Some(l) = &link {
                links.push(l.clone());
            }
            asked.insert(name.clone(), link);
        }
        found = Some(asked);
        links
    };
    applied.spares.cap = cap;
    if full {
        applied.spares.links = links
            .iter()
            .filter(|l| is_spare_ifb(l))
            .map(|l| l.index)
            .collect();
    }
    let mut index: BTreeMap<String, u32> =
        links.iter().map(|l| (l.name.clone(), l.index)).collect();
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Tunnels first: ports mirror into them.
    for (name, t) in &plan.tunnels {
        if !full && applied.tunnels.get(name) == Some(t) && index.contains_key(name) {
            continue;
        }
        match nl.ensure_vxlan(name, t.vni, t.remote, t.port) {
            Ok(i) => {
                index.insert(name.clone(), i);
                if let Err(e) = nl.set_alias(i, &names::mirror_tunnel_alias(&t.mirror)) {
                    warn!(tunnel = %name, error = %e, "cannot name the mirror tunnel");
                }
                applied.tunnels.insert(name.clone(), t.clone());
            }
            Err(e) => {
                applied.tunnels.remove(name);
                problems.entry(t.mirror.clone()).or_default().push(format!(
                    "cannot create VXLAN link {name} to {}: {e}",
                    t.remote
                ));
            }
        }
    }
    let stale_tunnels: Vec<(String, u32)> = links
        .iter()
        .filter(|l| {
            l.alias
                .as_deref()
                .is_some_and(names::is_mirror_tunnel_alias)
        })
        .filter(|l| !plan.tunnels.contains_key(&l.name))
        .filter(|l| full || applied.tunnels.contains_key(&l.name))
        .map(|l| (l.name.clone(), l.index))
        .collect();
    for (name, i) in stale_tunnels {
        nl.delete_link(i)?;
        applied.tunnels.remove(&name);
        info!(tunnel = %name, "deleted a mirror tunnel no mirror uses");
    }
    // IFB links of ports no longer shaped (their port gone with its namespace, or its egress
    // limit lifted while the port was away): at a full pass every one of weft's. Kept as spares
    // before the ports are shaped, so that a pod replacing another in the same pass takes its
    // link; the others deleted after them, with the departing ports' (below). A spare answers
    // to the IFB name of the port it serves as an alternative name, so they are told by the
    // port their alias names, not by their own name.
    let egress_ports: BTreeSet<&str> = plan
        .shaping
        .iter()
        .filter(|(_, s)| s.egress.is_some())
        .map(|(p, _)| p.as_str())
        .collect();
    let stale_ifbs: Vec<&LinkInfo> = links
        .iter()
        .filter(|l| {
            let Some(port) = l.alias.as_deref().and_then(names::shaped_port) else {
                return false;
            };
            !egress_ports.contains(port) && (full || !index.contains_key(port))
        })
        .collect();
    let now = std::time::Instant::now();
    if !egress_ports.is_empty() {
        applied.last_egress = Some(now);
    }
    let idle = applied
        .last_egress
        .is_none_or(|t| now.duration_since(t) >= SPARE_IDLE);
    // Kept as spares up to SPARE_IFBS; the others (and, at a full pass after SPARE_IDLE
    // without an egress limit, the spares) deleted together: each deletion alone would hold
    // up the node's link changes (ADDs') for a grace period, and a pass after many DELs has
    // many.
    let mut doomed: Vec<&LinkInfo> = Vec::new();
    let mut kept = 0;
    for l in stale_ifbs {
        if full && idle {
            doomed.push(l);
            continue;
        }
        match nl.keep_as_spare(l, &mut applied.spares) {
            Some(Ok(true)) => kept += 1,
            Some(Ok(false)) => {}
            Some(Err(e)) => {
                warn!(ifb = %l.name, error = %e, "cannot keep the shaping link as a spare; deleting it");
                doomed.push(l);
            }
            None => doomed.push(l),
        }
    }
    let mut indexes: Vec<u32> = doomed.iter().map(|l| l.index).collect();
    if full && idle && !applied.spares.links.is_empty() {
        info!(
            spares = applied.spares.links.len(),
            "no port had an egress limit for {} s: deleting the spare shaping links",
            SPARE_IDLE.as_secs()
        );
        indexes.append(&mut applied.spares.links);
    }
    if kept > 0 {
        info!(
            kept,
            spares = applied.spares.links.len(),
            "kept the shaping links of ports no longer shaped as spares"
        );
    }
    // The IFB links retired or deleted above are no longer what was found.
    forget_changed(&mut found, |i| {
        indexes.contains(&i) || applied.spares.links.contains(&i)
    });
    if !doomed.is_empty() {
        info!(
            ifbs = ?doomed.iter().map(|l| &l.name).collect::<Vec<_>>(),
            "deleting the shaping links of ports no longer shaped"
        );
    }
    applied.waiting.clear();
    // The IFB links deleted in this pass, together after the loop: those above, and those of
    // the ports departing in this pass that are not kept as spares.
    let mut surplus: Vec<u32> = indexes;
    let ifb_names: BTreeSet<String> = egress_ports
        .iter()
        .map(|p| names::shaping_ifb_name(p))
        .collect();
    delete_in_the_way(nl, &links, &ifb_names, &mut surplus, &mut found)?;
    // A link under the IFB name of a port shaped in this pass (made for that port, whose name
    // is back), once a spare, is that port's, which takes it by its name: no other port takes
    // it first. Those kept as spares in the loop (departing ports') are taken out again after.
    let reserved: BTreeSet<u32> = links
        .iter()
        .filter(|l| ifb_names.contains(&l.name))
        .map(|l| l.index)
        .collect();
    applied.spares.links.retain(|i| !reserved.contains(i));
    move_out_of_the_way(
        nl,
        &links,
        &ifb_names,
        plan,
        &mut applied.spares,
        &mut found,
    );
    // Ports with a shaping link: shaped by this agent or an earlier one.
    let shaped_before: BTreeSet<&str> = links
        .iter()
        .filter_map(|l| names::shaped_port(l.alias.as_deref()?))
        .collect();
    // Departing ports first: a new port shaped in the same pass takes a departing one's IFB
    // link as a spare instead of creating one, whatever their names.
    let mut touch: Vec<String> = touch.into_iter().collect();
    touch.sort_by_key(|p| !departing(p));
    let mut departures_done = false;
    for port in touch {
        if !departures_done && !departing(&port) {
            departures_done = true;
            // The departed ports' IFB links, kept as spares or left to delete, are no longer
            // what was found (a port back under one's name takes it by looking again).
            forget_changed(&mut found, |i| {
                applied.spares.links.contains(&i) || surplus.contains(&i)
            });
            applied.spares.links.retain(|i| !reserved.contains(i));
            if let Err(e) = delete_in_the_way(nl, &links, &ifb_names, &mut surplus, &mut found) {
                warn!(error = %e, "cannot delete the departed ports' shaping links in the way");
            }
        }
        let Some(&port_index) = index.get(&port) else {
            applied.ports.remove(&port);
            applied.shaping.remove(&port);
            // Its IFB link, if any, is deleted below with those of the other departed ports.
            applied.ifbs.remove(&port);
            if plan.shaping.contains_key(&port) {
                applied.waiting.insert(port.clone());
            }
            if let Some(rules) = plan.ports.get(&port) {
                applied.waiting.insert(port.clone());
                for r in rules {
                    problems
                        .entry(r.mirror.clone())
                        .or_default()
                        .push(format!("source port {port} does not exist yet"));
                }
            }
            continue;
        };
        let wanted: &[PortRule] = plan.ports.get(&port).map_or(&[], Vec::as_slice);
        let mut rules = Vec::new();
        let mut installed = Vec::new();
        for r in wanted {
            match index.get(&r.to) {
                Some(&to) => {
                    rules.push(MirrorRule {
                        side: r.side,
                        program: r.program.clone(),
                        to,
                    });
                    installed.push(r.clone());
                }
                None => {
                    applied.waiting.insert(port.clone());
                    problems
                        .entry(r.mirror.clone())
                        .or_default()
                        .push(format!("destination link {} does not exist yet", r.to));
                }
            }
        }
        let stale = full && shaped_before.contains(port.as_str());
        shape(
            nl,
            port_index,
            &port,
            plan,
            applied,
            stale,
            found.as_ref(),
            departing(&port).then_some(&mut surplus),
        );
        // A port that neither has nor wants copies: only a full pass looks for stale filters.
        if !full && wanted.is_empty() && !applied.ports.contains_key(&port) {
            continue;
        }
        match nl.set_mirrors(port_index, &rules) {
            Ok(changed) => {
                if changed {
                    info!(%port, copies = rules.len(), "mirror filters changed");
                }
                if installed.is_empty() {
                    applied.ports.remove(&port);
                } else {
                    applied.ports.insert(port.clone(), installed);
                }
            }
            Err(e) if e.is_not_found() => {
                applied.ports.remove(&port);
                if plan.ports.contains_key(&port) {
                    applied.waiting.insert(port.clone());
                }
            }
            Err(e) => {
                applied.ports.remove(&port);
                for r in wanted {
                    problems
                        .entry(r.mirror.clone())
                        .or_default()
                        .push(format!("cannot install the copy on port {port}: {e}"));
                }
            }
        }
    }
    // The IFB links no longer needed, together and after this pass's ports are shaped: one
    // deletion each would hold every link change of the node (the next ADDs', this pass's
    // shaping of new ports) for a grace period apiece. A link left by a failure here still
    // carries its port's alias, and a later pass deletes it with the stale ones (a full pass,
    // if its port is still there unshaped).
    if !surplus.is_empty() {
        match nl.delete_links(&surplus) {
            Ok(deleted) => info!(
                deleted,
                spares = applied.spares.links.len(),
                "deleted the shaping links no longer needed"
            ),
            Err(e) => warn!(error = %e, "cannot delete the shaping links no longer needed"),
        }
    }
    // Each mirror's state: its planned sources, what it copied, its problems.
    let mut report: BTreeMap<String, NodeMirror> = plan
        .mirrors
        .iter()
        .map(|(key, p)| {
            (
                key.clone(),
                NodeMirror {
                    mirror: key.clone(),
                    sources: i32::try_from(p.sources).unwrap_or(i32::MAX),
                    packets: 0,
                    bytes: 0,
                    error: p.error.clone(),
                },
            )
        })
        .collect();
    for (port, rules) in &applied.ports {
        let Some(&i) = index.get(port) else { continue };
        let counters = match nl.mirror_counters(i) {
            Ok(c) => c,
            Err(_) => continue,
        };
        for c in counters {
            // The counter's rule: the `index`th rule of its side, in the order installed.
            let Some(rule) = rules.iter().filter(|r| r.side == c.side).nth(c.index) else {
                continue;
            };
            if let Some(m) = report.get_mut(&rule.mirror) {
                m.packets = m
                    .packets
                    .saturating_add(i64::try_from(c.packets).unwrap_or(i64::MAX));
                m.bytes = m
                    .bytes
                    .saturating_add(i64::try_from(c.bytes).unwrap_or(i64::MAX));
            }
        }
    }
    for (mirror, mut list) in problems {
        list.sort();
        list.dedup();
        if let Some(m) = report.get_mut(&mirror)
            && m.error.is_none()
        {
            m.error = Some(list.join("; "));
        }
    }
    Ok(report)
}

/// Brings port `port`'s bandwidth shaping to the plan's (none when the plan has none). A port
/// this agent never shaped is left alone unless `stale` (it has a shaping link: an earlier
/// agent shaped it). `found`: the links the pass looked up by name, when it did; the port and
/// its IFB name are then not asked for again. `departing`: the port's workload was detached
/// and the port is about to go; its redirect goes, its IFB link becomes a spare or is left in
/// the vector given, for the caller to delete with the others, and the rest goes with the
/// port ([`Netlink::unshape_departing`]).
#[allow(clippy::too_many_arguments)]
fn shape(
    nl: &mut Netlink,
    index: u32,
    port: &str,
    plan: &MirrorPlan,
    applied: &mut Applied,
    stale: bool,
    found: Option<&BTreeMap<String, Option<LinkInfo>>>,
    departing: Option<&mut Vec<u32>>,
) {
    let wanted = plan.shaping.get(port).copied();
    if wanted.is_none()
        && !applied.shaping.contains_key(port)
        && !applied.ifbs.contains(port)
        && !stale
    {
        return;
    }
    let wanted = wanted.unwrap_or_default();
    if wanted.egress.is_some() {
        applied.ifbs.insert(port.to_string());
    }
    let ifb = names::shaping_ifb_name(port);
    let known = found.and_then(|f| {
        let link = f.get(port)?.as_ref().filter(|l| l.index == index)?;
        Some((link, f.get(&ifb)?.clone()))
    });
    let done = match (known, departing) {
        (Some((link, found_ifb)), Some(surplus)) if wanted == Shaping::default() => {
            match nl.unshape_departing(link, found_ifb.as_ref(), &mut applied.spares, surplus) {
                Ok(changed) => {
                    if changed {
                        info!(%port, "bandwidth shaping taken off a departing port");
                    }
                    applied.shaping.remove(port);
                    applied.ifbs.remove(port);
                }
                Err(e) => {
                    applied.shaping.remove(port);
                    warn!(%port, error = %e, "cannot take the shaping off a departing port");
                }
            }
            return;
        }
        (Some((link, found_ifb)), _) => {
            nl.set_shaping_found(link, &ifb, found_ifb, &wanted, &mut applied.spares)
        }
        (None, _) => nl.set_shaping_reusing(index, &ifb, &wanted, &mut applied.spares),
    };
    match done {
        Ok(changed) => {
            if wanted.egress.is_none() {
                applied.ifbs.remove(port);
            }
            if changed {
                info!(%port, ingress = ?wanted.ingress, egress = ?wanted.egress, "bandwidth shaping changed");
            }
            if wanted == Shaping::default() {
                applied.shaping.remove(port);
            } else {
                applied.shaping.insert(port.to_string(), wanted);
            }
        }
        Err(e) if e.is_not_found() => {
            applied.shaping.remove(port);
            if plan.shaping.contains_key(port) {
                applied.waiting.insert(port.to_string());
            }
        }
        Err(e) => {
            applied.shaping.remove(port);
            warn!(%port, error = %e, "cannot shape the port's bandwidth");
        }
    }
}

/// How long a changed plan may wait before its pass. A registration changes the plan before
/// the CNI has wired the port (the agent answers first), and the ADD's report of its wired
/// links kicks a pass at once: waiting for it keeps the pass's netlink work (IFB link, qdiscs,
/// filters) from competing with the ADD's own for the routing lock and the CPU, and finds the
/// port there. A change no ADD reports (a DEL, a Network's or a mirror's change) waits this
/// long, and the changes of a burst of DELs share one pass.
const PLAN_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The task that keeps the kernel's mirrors to the latest plan.
#[derive(Clone)]
pub struct Mirrors {
    plan: Arc<watch::Sender<Arc<MirrorPlan>>>,
    kick: Arc<Notify>,
    full: Arc<std::sync::atomic::AtomicBool>,
    report: Arc<Mutex<Vec<NodeMirror>>>,
    changed: Arc<Notify>,
    /// Shaped host ports whose workload was detached since the last pass; `true` once a
    /// workload registered on the port's name again.
    departed: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Whether a link that appears can need a pass ([`Mirrors::links_changed`]): [`NO_PLAN`],
    /// [`IDLE`] or [`BUSY`].
    stance: Arc<std::sync::atomic::AtomicU8>,
}

/// No plan yet: the task makes no pass.
const NO_PLAN: u8 = 0;
/// The last pass left nothing to follow (no port waiting for its link, none mirrored or
/// shaped), and no pass runs or is due.
const IDLE: u8 = 1;
/// A pass runs or is due, or the last one left something to follow.
const BUSY: u8 = 2;

impl Mirrors {
    /// Starts the task (on the current tokio runtime). Its first pass is a full one.
    pub fn spawn() -> Self {
        let (tx, mut rx) = watch::channel(Arc::new(MirrorPlan::default()));
        let me = Mirrors {
            plan: Arc::new(tx),
            kick: Arc::new(Notify::new()),
            full: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            report: Arc::new(Mutex::new(Vec::new())),
            changed: Arc::new(Notify::new()),
            departed: Arc::new(Mutex::new(BTreeMap::new())),
            stance: Arc::new(std::sync::atomic::AtomicU8::new(NO_PLAN)),
        };
        let task = me.clone();
        tokio::spawn(async move {
            let mut applied = Some(Applied::default());
            let mut seen_plan = false;
            // When a changed plan is applied at the latest (see `PLAN_DELAY`).
            let mut due: Option<tokio::time::Instant> = None;
            // The plan changed since the last pass.
            let mut changed = false;
            loop {
                let deadline = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = rx.changed() => {
                        if r.is_err() {
                            break;
                        }
                        if seen_plan {
                            due.get_or_insert_with(|| tokio::time::Instant::now() + PLAN_DELAY);
                            changed = true;
                            // A link that appears meanwhile still brings the pass forward.
                            task.stance.store(BUSY, std::sync::atomic::Ordering::SeqCst);
                            continue;
                        }
                        seen_plan = true;
                    }
                    _ = task.kick.notified() => {}
                    _ = deadline => {}
                }
                due = None;
                if !seen_plan {
                    continue;
                }
                let full = task.full.swap(false, std::sync::atomic::Ordering::SeqCst);
                let departed = task.departed.lock().map(|d| d.clone()).unwrap_or_default();
                // A kick (every ADD's report) that leaves the pass nothing to do: the plan
                // unchanged since the last pass, no port waiting for its link, none departed,
                // no mirror's counters to read. No thread, no netlink socket.
                let idle = applied.as_ref().is_some_and(Applied::is_idle);
                if !full && !changed && departed.is_empty() && idle {
                    continue;
                }
                // Busy while the pass runs: a link that appears meanwhile, after the pass read
                // the links, kicks another.
                task.stance.store(BUSY, std::sync::atomic::Ordering::SeqCst);
                changed = false;
                let plan = Arc::clone(&rx.borrow_and_update());
                let mut state = applied.take().unwrap_or_default();
                // Served by this pass: the ports a workload came back to, and those the plan no
                // longer shapes (one it still shapes is an older plan's).
                let served: Vec<(String, bool)> = departed
                    .iter()
                    .filter(|(p, back)| **back || !plan.shaping.contains_key(*p))
                    .map(|(p, back)| (p.clone(), *back))
                    .collect();
                let joined = tokio::task::spawn_blocking(move || {
                    let result = Netlink::new()
                        .and_then(|mut nl| apply(&mut nl, &plan, &mut state, full, &departed));
                    (state, result)
                })
                .await;
                if let Ok(mut d) = task.departed.lock() {
                    // Unless it changed meanwhile (departed again, or back).
                    for (p, back) in &served {
                        if d.get(p) == Some(back) {
                            d.remove(p);
                        }
                    }
                }
                let result = match joined {
                    Ok((state, result)) => {
                        task.stance.store(
                            if state.is_idle() { IDLE } else { BUSY },
                            std::sync::atomic::Ordering::SeqCst,
                        );
                        applied = Some(state);
                        Ok(result)
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(Ok(report)) => {
                        let report: Vec<NodeMirror> = report.into_values().collect();
                        let mut current = match task.report.lock() {
                            Ok(c) => c,
                            Err(_) => break,
                        };
                        // Counters alone change at every pass: only a change of sources or
                        // problems asks for a new status right away.
                        let shape = |v: &[NodeMirror]| -> Vec<(String, i32, Option<String>)> {
                            v.iter()
                                .map(|m| (m.mirror.clone(), m.sources, m.error.clone()))
                                .collect()
                        };
                        let notify = shape(&current) != shape(&report);
                        *current = report;
                        drop(current);
                        if notify {
                            task.changed.notify_one();
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "applying the mirrors failed; retrying at the next change or resync");
                        task.full.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => warn!(error = %e, "mirror task failed"),
                }
            }
        });
        me
    }

    /// A new plan (ignored when it equals the current one).
    pub fn update(&self, plan: MirrorPlan) {
        self.plan.send_if_modified(|p| {
            if **p == plan {
                false
            } else {
                *p = Arc::new(plan);
                true
            }
        });
    }

    /// The workload of host port `port` was detached (a DEL): its port is about to go, with
    /// its namespace or by the reaper. Noted only when the plan shapes the port.
    pub fn departed(&self, port: &str) {
        if self.plan.borrow().shaping.contains_key(port)
            && let Ok(mut d) = self.departed.lock()
        {
            d.insert(port.to_string(), false);
        }
    }

    /// A workload registered on host port `port`. When the port's name is a departed one's, or
    /// one the plan shapes already (the same attachment added anew, on a new link: after a DEL,
    /// or an ADD that was interrupted), the next pass shapes the port anew instead of trusting
    /// what it applied to the old link.
    pub fn arrived(&self, port: &str) {
        let shaped = self.plan.borrow().shaping.contains_key(port);
        if let Ok(mut d) = self.departed.lock() {
            match d.get_mut(port) {
                Some(back) => *back = true,
                None if shaped => {
                    d.insert(port.to_string(), true);
                }
                None => {}
            }
        }
    }

    /// A link may have appeared (an ADD finished): retry the waiting ports. The task is not
    /// woken (at every ADD) when that pass would have nothing to do: before the first plan, or
    /// when the last pass left the mirrors idle, no pass is asked for in full and no shaped
    /// port departed.
    pub fn links_changed(&self) {
        if self.needs_pass() {
            self.kick.notify_one();
        }
    }

    /// Whether a link that appears now may need a pass (see [`Mirrors::links_changed`]).
    fn needs_pass(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        match self.stance.load(SeqCst) {
            NO_PLAN => false,
            IDLE => self.full.load(SeqCst) || self.departed.lock().map_or(true, |d| !d.is_empty()),
            _ => true,
        }
    }

    /// The periodic resync: a full pass (stale filters and tunnels removed, counters read).
    pub fn resync(&self) {
        self.full.store(true, std::sync::atomic::Ordering::SeqCst);
        self.kick.notify_one();
    }

    /// Each mirror's state after the last pass.
    pub fn report(&self) -> Vec<NodeMirror> {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Resolves when a pass changed a mirror's sources or problems.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::WorkloadMeta;

    fn endpoint(pod: &str, network: &str, host: &str) -> Endpoint {
        Endpoint {
            network: network.into(),
            container_id: format!("c-{pod}"),
            ifname: "eth0".into(),
            host_ifname: host.into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec![],
            pod_namespace: Some("prod".into()),
            pod_name: Some(pod.into()),
            netns: None,
            vm: None,
            pending: false,
            vlan_trunk: vec![],
            port_mappings: vec![],
            bandwidth: None,
        }
    }

    fn pod(name: &str, app: &str) -> WorkloadMeta {
        WorkloadMeta {
            namespace: "prod".into(),
            name: name.into(),
            labels: BTreeMap::from([("app".into(), app.into())]),
            networks: None,
            limits: Default::default(),
        }
    }

    fn mirror(yaml: &str) -> TrafficMirror {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn resources(m: &str) -> Resources {
        Resources {
            mirrors: vec![mirror(m)],
            workloads: vec![
                pod("web-1", "web"),
                pod("web-2", "web"),
                pod("ids-a", "ids"),
                pod("db", "db"),
            ],
            ..Default::default()
        }
    }

    const TO_ANALYZER: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: TrafficMirror
metadata: {name: tap, namespace: prod}
spec:
  sources: {selector: {matchLabels: {app: web}}}
  direction: Egress
  filter: {protocols: [UDP], ports: [{port: 53}]}
  destination: {analyzer: {selector: {matchLabels: {app: ids}}}}
"#;

    #[test]
    fn sources_copy_to_the_analyzer_on_their_node() {
        let eps = [
            endpoint("web-1", "lan", "wfa"),
            endpoint("web-2", "lan", "wfb"),
            endpoint("ids-a", "lan", "wfz"),
            endpoint("db", "lan", "wfd"),
        ];
        let p = plan(&resources(TO_ANALYZER), &eps, &[]);
        assert_eq!(p.ports.keys().collect::<Vec<_>>(), ["wfa", "wfb"]);
        let r = &p.ports["wfa"];
        assert_eq!(r.len(), 1, "egress only");
        assert_eq!(r[0].side, Side::FromWorkload);
        assert_eq!(r[0].to, "wfz");
        assert_eq!(
            p.mirrors["prod/tap"],
            Planned {
                sources: 2,
                error: None
            }
        );
        assert!(p.tunnels.is_empty());
    }

    #[test]
    fn without_an_analyzer_here_the_mirror_says_so() {
        let eps = [endpoint("web-1", "lan", "wfa")];
        let p = plan(&resources(TO_ANALYZER), &eps, &[]);
        assert!(p.ports.is_empty());
        let e = p.mirrors["prod/tap"].error.clone().unwrap();
        assert!(e.contains("no analyzer pod"), "{e}");
    }

    #[test]
    fn a_selector_matching_the_analyzer_does_not_mirror_it_into_itself() {
        let m = TO_ANALYZER.replace("{matchLabels: {app: web}}", "{}");
        let eps = [
            endpoint("web-1", "lan", "wfa"),
            endpoint("ids-a", "lan", "wfz"),
        ];
        let p = plan(&resources(&m), &eps, &[]);
        assert_eq!(p.ports.keys().collect::<Vec<_>>(), ["wfa"]);
    }

    #[test]
    fn remote_collectors_need_the_administrators_consent() {
        let m = TO_ANALYZER.replace(
            "{analyzer: {selector: {matchLabels: {app: ids}}}}",
            "{remote: {address: 192.0.2.10, vni: 42}}",
        );
        let eps = [endpoint("web-1", "lan", "wfa")];
        let refused = plan(&resources(&m), &eps, &[]);
        assert!(refused.ports.is_empty());
        assert!(
            refused.mirrors["prod/tap"]
                .error
                .as_ref()
                .unwrap()
                .contains("agent.mirrorCollectors")
        );
        let allowed = plan(&resources(&m), &eps, &["192.0.2.0/24".parse().unwrap()]);
        let tunnel = names::mirror_tunnel_name("prod/tap");
        assert_eq!(allowed.ports["wfa"][0].to, tunnel);
        assert_eq!(allowed.tunnels[&tunnel].vni, 42);
        assert_eq!(allowed.tunnels[&tunnel].port, 4789);
    }

    #[test]
    fn both_directions_and_a_network_narrow_the_copies() {
        let m = TO_ANALYZER
            .replace("direction: Egress", "direction: Both")
            .replace(
                "sources: {selector: {matchLabels: {app: web}}}",
                "sources: {selector: {matchLabels: {app: web}}, network: lan}",
            );
        let eps = [
            endpoint("web-1", "lan", "wfa"),
            endpoint("web-1", "other", "wfo"),
            endpoint("ids-a", "lan", "wfz"),
        ];
        let p = plan(&resources(&m), &eps, &[]);
        assert_eq!(p.ports.keys().collect::<Vec<_>>(), ["wfa"]);
        let sides: Vec<Side> = p.ports["wfa"].iter().map(|r| r.side).collect();
        assert_eq!(sides, [Side::FromWorkload, Side::ToWorkload]);
    }

    #[test]
    fn an_invalid_mirror_is_reported_not_applied() {
        let m = TO_ANALYZER.replace("ports: [{port: 53}]", "ports: [{port: 99999}]");
        let eps = [
            endpoint("web-1", "lan", "wfa"),
            endpoint("ids-a", "lan", "wfz"),
        ];
        let p = plan(&resources(&m), &eps, &[]);
        assert!(p.ports.is_empty());
        assert!(
            p.mirrors["prod/tap"]
                .error
                .as_ref()
                .unwrap()
                .contains("spec.filter.ports[0].port")
        );
    }
}

#[cfg(test)]
mod departed_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Waits (up to 5 s) until `m`'s task is idle and wants no pass for a new link.
    async fn settles(m: &Mirrors) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let idle = || m.stance.load(std::sync::atomic::Ordering::SeqCst) == IDLE;
        let settled = || idle() && !m.needs_pass();
        while !settled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(settled());
    }

    /// Every ADD's report says links appeared: the task is woken only when a pass may have
    /// something to do then.
    #[tokio::test]
    async fn a_new_link_wakes_the_task_only_when_a_pass_may_have_something_to_do() {
        let m = Mirrors::spawn();
        assert!(!m.needs_pass(), "no plan yet: no pass");
        // A port shaped whose link is not there (it waits for it), then none.
        let mut plan = MirrorPlan::default();
        plan.shaping.insert(
            "wfnolink0".into(),
            Shaping {
                ingress: Some(weft_dataplane::netlink::Rate {
                    bits_per_second: 8_000_000,
                    burst_bits: 80_000,
                }),
                egress: None,
            },
        );
        m.update(plan);
        // Nothing left to follow: idle once the changed plan's pass ran.
        m.update(MirrorPlan::default());
        settles(&m).await;
        // A full pass asked for (after a failed pass), until the kick's pass ran.
        m.full.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(m.needs_pass());
        m.links_changed();
        settles(&m).await;
        // A shaped port departed, or a pass that left ports to follow.
        m.departed.lock().unwrap().insert("wfgone0".into(), false);
        assert!(m.needs_pass());
        m.departed.lock().unwrap().clear();
        m.stance.store(BUSY, std::sync::atomic::Ordering::SeqCst);
        assert!(m.needs_pass());
    }

    #[tokio::test]
    async fn only_shaped_ports_are_noted_as_departed_and_a_workload_back_on_a_shaped_name_is_noted()
    {
        let m = Mirrors::spawn();
        let rate = weft_dataplane::netlink::Rate {
            bits_per_second: 8_000_000,
            burst_bits: 80_000,
        };
        let mut plan = MirrorPlan::default();
        plan.shaping.insert(
            "wfshaped".into(),
            Shaping {
                ingress: Some(rate),
                egress: None,
            },
        );
        plan.shaping.insert(
            "wfagain".into(),
            Shaping {
                ingress: Some(rate),
                egress: None,
            },
        );
        m.update(plan);
        m.departed("wfshaped");
        m.departed("wfplain");
        // A new workload on a port the plan does not shape yet: nothing to note.
        m.arrived("wfnew");
        let noted = || m.departed.lock().unwrap().clone();
        assert_eq!(noted(), BTreeMap::from([("wfshaped".to_string(), false)]));
        // The same names registered again (after its DEL; without one, as after an
        // interrupted ADD): both ports are shaped anew at the next pass.
        m.arrived("wfshaped");
        m.arrived("wfagain");
        assert_eq!(
            noted(),
            BTreeMap::from([
                ("wfagain".to_string(), true),
                ("wfshaped".to_string(), true)
            ])
        );
    }
}

/// The pass against the kernel, in a network namespace of the test thread's own.
#[cfg(test)]
mod kernel_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use weft_dataplane::netlink::Rate;

    const RATE: Rate = Rate {
        bits_per_second: 8_000_000,
        burst_bits: 32 * 1024 * 8,
    };

    /// An egress limit alone.
    const EGRESS: Shaping = Shaping {
        ingress: None,
        egress: Some(RATE),
    };

    /// A port with a veth peer beside it, in the thread's namespace.
    fn port(nl: &mut Netlink, name: &str, peer: &str) -> u32 {
        nl.create_veth_pair(name, peer, None, None).unwrap();
        let index = nl.link_by_name(name).unwrap().expect("the port").index;
        nl.set_up(index).unwrap();
        index
    }

    /// Moves this test's thread into a network namespace of its own; a socket there.
    fn own_netns() -> Netlink {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CAP_NET_ADMIN) for a network namespace; run the tests as root"
        );
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        Netlink::new().unwrap()
    }

    fn plan(shaped: &[(&str, Shaping)]) -> MirrorPlan {
        MirrorPlan {
            shaping: shaped.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
            ..MirrorPlan::default()
        }
    }

    /// The index of the link under port `port`'s IFB name, if any.
    fn ifb_index(nl: &mut Netlink, port: &str) -> Option<u32> {
        nl.link_by_name(&names::shaping_ifb_name(port))
            .unwrap()
            .map(|l| l.index)
    }

    /// Makes port wfn and runs a pass that gives it an egress limit while the ports of
    /// `departed` depart, keeping at most `cap` spare IFB links; checks that wfn is shaped.
    fn pass_shaping_a_new_port(
        nl: &mut Netlink,
        applied: &mut Applied,
        departed: &BTreeMap<String, bool>,
        cap: usize,
    ) {
        let new = port(nl, "wfn", "pn");
        apply_capped(nl, &plan(&[("wfn", EGRESS)]), applied, false, departed, cap).unwrap();
        let s = nl
            .shaping_counters(new, &names::shaping_ifb_name("wfn"))
            .unwrap();
        assert!(s.egress.is_some(), "wfn: {s:?}");
    }

    #[test]
    fn a_departed_port_keeps_its_tbf_and_gives_up_its_ifb_a_live_one_is_unshaped_a_new_one_shaped()
    {
        let mut nl = own_netns();
        let both = Shaping {
            ingress: Some(RATE),
            egress: Some(RATE),
        };
        let ingress = Shaping {
            ingress: Some(RATE),
            egress: None,
        };
        // A shaped both ways, B and C ingress only.
        let (a, b, c) = (
            port(&mut nl, "wfa", "pa"),
            port(&mut nl, "wfb", "pb"),
            port(&mut nl, "wfc", "pc"),
        );
        let mut applied = Applied::default();
        let none = BTreeMap::new();
        let first = plan(&[("wfa", both), ("wfb", ingress), ("wfc", ingress)]);
        apply(&mut nl, &first, &mut applied, true, &none).unwrap();
        let ifb = |p: &str| names::shaping_ifb_name(p);
        let counters = |nl: &mut Netlink, i: u32, p: &str| nl.shaping_counters(i, &ifb(p)).unwrap();
        let s = counters(&mut nl, a, "wfa");
        assert!(s.ingress.is_some() && s.egress.is_some(), "{s:?}");
        assert!(counters(&mut nl, b, "wfb").ingress.is_some());
        assert!(counters(&mut nl, c, "wfc").ingress.is_some());
        let a_ifb = nl.link_by_name(&ifb("wfa")).unwrap().expect("A's IFB");

        // A and B departed (their workloads detached, the ports not yet gone), C's limit
        // lifted: B keeps its tbf (it goes with the port), A keeps its tbf but loses its
        // redirect, and its IFB is a spare; C is unshaped.
        let departed: BTreeMap<String, bool> =
            ["wfa", "wfb"].map(|p| (p.to_string(), false)).into();
        apply(&mut nl, &plan(&[]), &mut applied, false, &departed).unwrap();
        let s = counters(&mut nl, a, "wfa");
        assert!(s.ingress.is_some() && s.egress.is_none(), "{s:?}");
        let kept = nl.link_by_index(a_ifb.index).unwrap().expect("kept");
        assert_eq!(kept.alias.as_deref(), Some(names::SPARE_IFB_ALIAS));
        assert_eq!(applied.spares.links, [a_ifb.index]);
        assert!(counters(&mut nl, b, "wfb").ingress.is_some());
        assert!(counters(&mut nl, c, "wfc").ingress.is_none());
        assert!(applied.shaping.is_empty() && applied.ifbs.is_empty());

        // A workload back on B's port name (departed no more) with both limits: shaped in
        // full, taking the spare.
        apply(&mut nl, &plan(&[("wfb", both)]), &mut applied, false, &none).unwrap();
        let s = counters(&mut nl, b, "wfb");
        assert!(s.ingress.is_some() && s.egress.is_some(), "{s:?}");
        let taken = nl.link_by_name(&ifb("wfb")).unwrap().expect("B's IFB");
        assert_eq!(taken.index, a_ifb.index, "the spare");
        // A full pass keeps B as it is (A's tbf is left to go with its port).
        apply(
            &mut nl,
            &plan(&[("wfb", both)]),
            &mut applied,
            true,
            &departed,
        )
        .unwrap();
        let s = counters(&mut nl, b, "wfb");
        assert!(s.ingress.is_some() && s.egress.is_some(), "{s:?}");
        assert!(counters(&mut nl, a, "wfa").ingress.is_some());

        // B's attachment deleted and added again before any pass: a new link under the same
        // name, the same plan. Told that a workload is back on it, the pass shapes the new link
        // (what it applied was the old link's).
        nl.delete_link(b).unwrap();
        let b2 = port(&mut nl, "wfb", "pb");
        assert!(counters(&mut nl, b2, "wfb").ingress.is_none());
        let back: BTreeMap<String, bool> = [("wfb".to_string(), true)].into();
        apply(&mut nl, &plan(&[("wfb", both)]), &mut applied, false, &back).unwrap();
        let s = counters(&mut nl, b2, "wfb");
        assert!(s.ingress.is_some() && s.egress.is_some(), "{s:?}");
    }

    /// A remote collector's VNI changed: its tunnel is made again (a new link, a new index),
    /// and a pass that is not full moves the copies of the ports that copy into it to the new
    /// link in the same pass (they named the tunnel, not its index, so their rules did not
    /// change).
    #[test]
    fn the_ports_copying_into_a_tunnel_made_again_copy_into_the_new_link() {
        let mut nl = own_netns();
        let source = port(&mut nl, "wfs", "ps");
        let program = weft_dataplane::mirror::program(
            &weft_dataplane::mirror::MirrorFilter::default(),
            Side::FromWorkload,
        );
        let tunnel = |vni| Tunnel {
            mirror: "default/m".into(),
            vni,
            remote: "10.99.0.2".parse().unwrap(),
            port: 4789,
        };
        let with = |vni| MirrorPlan {
            tunnels: [("wxm".to_string(), tunnel(vni))].into(),
            ports: [(
                "wfs".to_string(),
                vec![PortRule {
                    mirror: "default/m".into(),
                    side: Side::FromWorkload,
                    program: program.clone(),
                    to: "wxm".into(),
                }],
            )]
            .into(),
            ..MirrorPlan::default()
        };
        let mut applied = Applied::default();
        let none = BTreeMap::new();
        let copies_to = |nl: &mut Netlink| {
            let to = nl.link_by_name("wxm").unwrap().expect("the tunnel").index;
            let rules = [MirrorRule {
                side: Side::FromWorkload,
                program: program.clone(),
                to,
            }];
            // Nothing to change: the port's filter copies to this link already.
            !nl.set_mirrors(source, &rules).unwrap()
        };
        apply(&mut nl, &with(7), &mut applied, true, &none).unwrap();
        let first = nl.link_by_name("wxm").unwrap().unwrap().index;
        assert!(copies_to(&mut nl));
        apply(&mut nl, &with(8), &mut applied, false, &none).unwrap();
        assert_ne!(
            nl.link_by_name("wxm").unwrap().unwrap().index,
            first,
            "made again"
        );
        assert!(copies_to(&mut nl), "the copies follow the new link");
    }

    /// A burst of departures past the spares' cap, in the same pass as a new port: the cap's
    /// worth of IFB links are kept as spares, every other one is gone when the pass ends (all
    /// deleted together after the ports), their redirects first; the new port is shaped in
    /// that pass, on a spare; the departing ports themselves stay (they go with their pods).
    #[test]
    fn departures_past_the_spares_cap_lose_their_ifbs_in_the_pass_that_shapes_a_new_port() {
        let mut nl = own_netns();
        let names: Vec<String> = (0..6).map(|i| format!("wfd{i}")).collect();
        let ports: Vec<u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| port(&mut nl, n, &format!("pd{i}")))
            .collect();
        let shaped: Vec<(&str, Shaping)> = names.iter().map(|n| (n.as_str(), EGRESS)).collect();
        let mut applied = Applied::default();
        apply(
            &mut nl,
            &plan(&shaped),
            &mut applied,
            true,
            &BTreeMap::new(),
        )
        .unwrap();
        let ifbs: Vec<u32> = names
            .iter()
            .map(|n| ifb_index(&mut nl, n).expect("an IFB"))
            .collect();
        // Room for two spares; all six depart while a new port, wfn, wants a limit.
        let departed: BTreeMap<String, bool> = names.iter().map(|n| (n.clone(), false)).collect();
        pass_shaping_a_new_port(&mut nl, &mut applied, &departed, 2);
        let left: Vec<u32> = ifbs
            .iter()
            .copied()
            .filter(|&i| nl.link_by_index(i).unwrap().is_some())
            .collect();
        // Two were kept as spares, and wfn took one of them.
        assert_eq!(left.len(), 2, "{left:?} of {ifbs:?}");
        let taken = ifb_index(&mut nl, "wfn").expect("wfn's IFB");
        assert!(left.contains(&taken), "wfn took a spare");
        assert_eq!(applied.spares.links.len(), 1);
        for (n, &p) in names.iter().zip(&ports) {
            assert!(nl.link_by_index(p).unwrap().is_some(), "{n} stays");
            let s = nl.shaping_counters(p, &names::shaping_ifb_name(n)).unwrap();
            assert!(s.egress.is_none(), "{n}: {s:?}");
        }
    }

    /// With no room for spares, the IFB link of a port gone without a departure (stale) and
    /// that of a departing port both go in the pass that finds them, deleted together after a
    /// new port is shaped.
    #[test]
    fn a_stale_ifb_and_a_departing_ports_ifb_go_in_the_same_pass() {
        let mut nl = own_netns();
        let gone = port(&mut nl, "wfs", "ps");
        port(&mut nl, "wfe", "pe");
        let mut applied = Applied::default();
        let both = plan(&[("wfs", EGRESS), ("wfe", EGRESS)]);
        apply_capped(&mut nl, &both, &mut applied, true, &BTreeMap::new(), 0).unwrap();
        let stale = ifb_index(&mut nl, "wfs").expect("wfs's IFB");
        let departing = ifb_index(&mut nl, "wfe").expect("wfe's IFB");
        // wfs's port goes with no DEL seen; wfe's workload departs; wfn is new.
        nl.delete_link(gone).unwrap();
        let departed = BTreeMap::from([("wfe".to_string(), false)]);
        pass_shaping_a_new_port(&mut nl, &mut applied, &departed, 0);
        for (what, index) in [("stale", stale), ("departing", departing)] {
            assert!(
                nl.link_by_index(index).unwrap().is_none(),
                "the {what} IFB link {index} is gone"
            );
        }
        assert!(applied.spares.links.is_empty());
    }

    /// Port `name` (peer `peer`) gets an IFB link for an egress limit, departs and goes; its
    /// link becomes a spare, which port `other` (peer `other_peer`) takes. Returns the link's
    /// index and `other`'s.
    fn ifb_passed_on(
        nl: &mut Netlink,
        applied: &mut Applied,
        (name, peer): (&str, &str),
        (other, other_peer): (&str, &str),
    ) -> (u32, u32) {
        let first = port(nl, name, peer);
        let none = BTreeMap::new();
        apply_capped(nl, &plan(&[(name, EGRESS)]), applied, true, &none, 1).unwrap();
        let made = ifb_index(nl, name).expect("an IFB");
        let departed = BTreeMap::from([(name.to_string(), false)]);
        apply_capped(nl, &plan(&[]), applied, false, &departed, 1).unwrap();
        nl.delete_link(first).unwrap();
        let taker = port(nl, other, other_peer);
        apply_capped(nl, &plan(&[(other, EGRESS)]), applied, false, &none, 1).unwrap();
        assert_eq!(ifb_index(nl, other), Some(made), "{other} took the spare");
        (made, taker)
    }

    /// Port `name` back (peer `peer`) and shaped in a pass keeping at most `cap` spares, where
    /// the ports of `departed` depart: with room for a spare, `name` is shaped on IFB link
    /// `made`; without, `made` is gone and `name` is shaped on another.
    fn back_and_shaped(
        nl: &mut Netlink,
        applied: &mut Applied,
        (name, peer): (&str, &str),
        departed: &BTreeMap<String, bool>,
        (made, cap): (u32, usize),
    ) {
        let back = port(nl, name, peer);
        apply_capped(nl, &plan(&[(name, EGRESS)]), applied, false, departed, cap).unwrap();
        if cap > 0 {
            shaped_on(nl, name, back, made);
            return;
        }
        assert!(
            nl.link_by_index(made).unwrap().is_none(),
            "link {made} is gone"
        );
        let s = nl
            .shaping_counters(back, &names::shaping_ifb_name(name))
            .unwrap();
        assert!(s.egress.is_some(), "{name} is shaped again: {s:?}");
    }

    /// A port name back (the same attachment added anew) while the IFB link it once made
    /// serves another port, under its old name, and that port is gone: the link, past the
    /// spares' cap, is deleted before the port is shaped, and the port gets a link of its own.
    #[test]
    fn a_port_back_gets_its_ifb_name_from_the_stale_link_that_held_it() {
        let mut nl = own_netns();
        let mut applied = Applied::default();
        let (made, other) = ifb_passed_on(&mut nl, &mut applied, ("wfr", "pr"), ("wfp", "pp"));
        // wfp goes with no DEL seen.
        nl.delete_link(other).unwrap();
        back_and_shaped(
            &mut nl,
            &mut applied,
            ("wfr", "pr"),
            &BTreeMap::new(),
            (made, 0),
        );
    }

    /// The same with the other port departing in the pass where the name comes back; and with
    /// room for a spare, where that link, kept as a spare, is taken by the returning port in
    /// that pass.
    #[test]
    fn a_port_back_gets_its_ifb_name_from_a_departing_ports_link_that_held_it() {
        for cap in [0, 1] {
            let mut nl = own_netns();
            let mut applied = Applied::default();
            let (made, _) = ifb_passed_on(&mut nl, &mut applied, ("wfq", "pq"), ("wfo", "po"));
            let departed = BTreeMap::from([("wfo".to_string(), false)]);
            back_and_shaped(&mut nl, &mut applied, ("wfq", "pq"), &departed, (made, cap));
        }
    }

    /// Port `port` (index `index`) is shaped on IFB link `ifb`, found under its IFB name.
    fn shaped_on(nl: &mut Netlink, port: &str, index: u32, ifb: u32) {
        assert_eq!(ifb_index(nl, port), Some(ifb), "{port}'s IFB link");
        let s = nl
            .shaping_counters(index, &names::shaping_ifb_name(port))
            .unwrap();
        assert!(s.egress.is_some(), "{port}: {s:?}");
        assert_eq!(
            nl.shaping_redirect(index).unwrap(),
            Some(ifb),
            "{port}'s redirect"
        );
    }

    /// A port name back (the same attachment added anew) while the IFB link it once made
    /// serves another port, under its old name, and that port keeps its egress limit: the
    /// other port moves to a link of its own, and the returning port takes its name back,
    /// in a pass that is not full and in a full one.
    #[test]
    fn a_port_back_gets_its_ifb_name_from_a_live_ports_link_that_held_it() {
        for full in [false, true] {
            let mut nl = own_netns();
            let mut applied = Applied::default();
            let (made, other) = ifb_passed_on(&mut nl, &mut applied, ("wfl", "pl"), ("wfk", "pk"));
            let back = port(&mut nl, "wfl", "pl");
            let both = plan(&[("wfk", EGRESS), ("wfl", EGRESS)]);
            apply_capped(&mut nl, &both, &mut applied, full, &BTreeMap::new(), 1).unwrap();
            shaped_on(&mut nl, "wfl", back, made);
            let moved = ifb_index(&mut nl, "wfk").expect("wfk's IFB link");
            assert_ne!(moved, made, "full: {full}");
            shaped_on(&mut nl, "wfk", other, moved);
            // The next pass changes nothing.
            apply_capped(&mut nl, &both, &mut applied, full, &BTreeMap::new(), 1).unwrap();
            shaped_on(&mut nl, "wfl", back, made);
            shaped_on(&mut nl, "wfk", other, moved);
        }
    }

    /// A port name back while the IFB link it once made is a spare, in the same pass as a new
    /// port whose name sorts before it: the spare is kept for the returning port, which takes
    /// it by its name, and the new port gets a link of its own.
    #[test]
    fn a_spare_under_a_returning_ports_ifb_name_is_kept_for_that_port() {
        let mut nl = own_netns();
        let mut applied = Applied::default();
        let first = port(&mut nl, "wfv", "pv");
        let none = BTreeMap::new();
        apply_capped(
            &mut nl,
            &plan(&[("wfv", EGRESS)]),
            &mut applied,
            true,
            &none,
            1,
        )
        .unwrap();
        let made = ifb_index(&mut nl, "wfv").expect("an IFB");
        let departed = BTreeMap::from([("wfv".to_string(), false)]);
        apply_capped(&mut nl, &plan(&[]), &mut applied, false, &departed, 1).unwrap();
        assert_eq!(applied.spares.links, [made], "kept as a spare");
        nl.delete_link(first).unwrap();
        let back = port(&mut nl, "wfv", "pv");
        let new = port(&mut nl, "wfa", "pa");
        let both = plan(&[("wfa", EGRESS), ("wfv", EGRESS)]);
        apply_capped(&mut nl, &both, &mut applied, false, &none, 1).unwrap();
        shaped_on(&mut nl, "wfv", back, made);
        let own = ifb_index(&mut nl, "wfa").expect("wfa's IFB link");
        assert_ne!(own, made);
        shaped_on(&mut nl, "wfa", new, own);
    }

    /// A port departing in the same pass as a new one whose name sorts before it: the new port
    /// takes the departing one's IFB link as a spare, no link is created.
    #[test]
    fn a_new_port_takes_the_ifb_of_a_port_departing_in_the_same_pass_whatever_their_names() {
        let mut nl = own_netns();
        port(&mut nl, "wfz", "pz");
        let mut applied = Applied::default();
        apply(
            &mut nl,
            &plan(&[("wfz", EGRESS)]),
            &mut applied,
            true,
            &BTreeMap::new(),
        )
        .unwrap();
        let old = nl
            .link_by_name(&names::shaping_ifb_name("wfz"))
            .unwrap()
            .expect("wfz's IFB");
        let new = port(&mut nl, "wfa", "pa");
        let departed = BTreeMap::from([("wfz".to_string(), false)]);
        apply(
            &mut nl,
            &plan(&[("wfa", EGRESS)]),
            &mut applied,
            false,
            &departed,
        )
        .unwrap();
        let taken = nl
            .link_by_name(&names::shaping_ifb_name("wfa"))
            .unwrap()
            .expect("wfa's IFB");
        assert_eq!(taken.index, old.index, "wfa took wfz's IFB link");
        let ifbs = nl
            .links()
            .unwrap()
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("ifb"))
            .count();
        assert_eq!(ifbs, 1, "no IFB link created");
        let s = nl
            .shaping_counters(new, &names::shaping_ifb_name("wfa"))
            .unwrap();
        assert!(s.egress.is_some(), "{s:?}");
    }
}

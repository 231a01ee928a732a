//! The lab: the embedded default. Network namespaces stand in for a LAN with an outside host,
//! for nodes (each runs the real agent) and for workloads (each started by invoking the real
//! `weft` CNI binary exactly as a container runtime does); every expectation is checked with
//! real packets, and everything is removed afterwards (also on failure and Ctrl-C).

pub mod cli;
pub mod file;
pub mod probe;
pub mod topology;
pub mod trace;
pub mod vmm;

use file::{Family, LabFile, Listen, Outcome};
use probe::{Listeners, ProbeResult};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use topology::Lab;
use weft_dataplane::netns;

/// Runs the lab on `file`; returns whether every expectation held.
pub fn run(path: &Path, name: Option<&str>, keep: bool) -> anyhow::Result<bool> {
    let (spec, resources, docs) = LabFile::load(path)?;
    let vlans: Vec<String> = resources
        .networks
        .iter()
        // Sub-interfaces: a VLAN-filtering Network's own VLAN is on its bridge, not one.
        .filter(|n| n.spec.vlan().is_some() && !n.spec.vlan_filtering())
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if !vlans.is_empty()
        && let Err(why) = topology::kernel_has_vlans(&topology::lab_name(path, name))
    {
        println!(
            "NOT SUPPORTED BY THIS KERNEL: 802.1Q VLANs ({why}); the VLAN networks of this lab ({}) cannot be built here, so nothing was checked",
            vlans.join(", ")
        );
        return Err(NotSupported.into());
    }
    let filtering: Vec<String> = resources
        .networks
        .iter()
        .filter(|n| n.spec.vlan_filtering())
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if !filtering.is_empty()
        && let Err(why) = topology::kernel_has_vlan_filtering(&topology::lab_name(path, name))
    {
        println!(
            "NOT SUPPORTED BY THIS KERNEL: VLAN-filtering bridges ({why}); the VLAN-filtering networks of this lab ({}) cannot be built here, so nothing was checked",
            filtering.join(", ")
        );
        return Err(NotSupported.into());
    }
    let lab_name = topology::lab_name(path, name);
    // A lab of the same name left behind (a --keep run, or a killed one) is removed first.
    topology::down_by_name(&lab_name)?;
    let lab = Lab::new(&lab_name, spec, docs)?;
    let guard_name = lab_name.clone();
    let _ = ctrlc::set_handler(move || {
        let _ = writeln!(std::io::stderr(), "\ninterrupted");
        topology::abandon(&guard_name, 130);
    });
    // A panic (standard output closed early, say) must not leave the lab behind either; the
    // release build aborts on panic, so this is done in the hook, before the abort.
    let hook_name = lab_name.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        topology::abandon(&hook_name, 101);
    }));
    let result = run_lab(&lab, &resources);
    if keep && result.is_ok() {
        println!(
            "\nlab {lab_name} is up: `ip netns list | grep wl-{lab_name}`; remove it with `weft-lab down {}{}`",
            path.display(),
            name.map(|n| format!(" --name {n}")).unwrap_or_default()
        );
        std::mem::forget(lab);
    } else {
        lab.teardown();
    }
    result
}

/// The lab needs a kernel feature this machine lacks (it says which on standard output).
#[derive(Debug, thiserror::Error)]
#[error("the lab needs a kernel feature this machine lacks")]
pub struct NotSupported;

/// `weft-lab trace --file FILE --from A --to B`: what the policies decide, without running the
/// lab.
pub fn run_trace(
    path: &Path,
    from: &str,
    to: &str,
    port: u16,
    protocol: &str,
    family: Family,
    json: bool,
) -> anyhow::Result<bool> {
    let (spec, resources, _) = LabFile::load(path)?;
    let protocol = weft_operator::policy::Packet::parse_protocol(protocol)?;
    let members = trace::members(&spec, &resources, None);
    let compiled = weft_operator::policy::compile_resources(&resources, &members);
    for p in &compiled.problems {
        eprintln!("warning: {p}");
    }
    let trace::Traced {
        decision,
        via: note,
        ..
    } = trace::decide(
        &spec, &resources, &members, &compiled, from, to, port, protocol, family,
    )
    .map_err(anyhow::Error::msg)?;
    weft_operator::policy::print_trace(from, to, port, protocol, &decision, note.as_deref(), json)?;
    Ok(decision.allowed)
}

/// Removes a lab left up.
pub fn down(path: &Path, name: Option<&str>) -> anyhow::Result<()> {
    let lab_name = topology::lab_name(path, name);
    if topology::down_by_name(&lab_name)? {
        println!("removed lab {lab_name}");
    } else {
        println!("no lab named {lab_name} is up");
    }
    Ok(())
}

/// The policy view of a running lab: its members with their real addresses, compiled.
struct PolicyView<'a> {
    /// The lab file with every migrated VM on the node it runs on now (port forwards follow it).
    spec: LabFile,
    res: &'a weft_operator::model::Resources,
    members: Vec<weft_operator::policy::Member>,
    compiled: weft_operator::policy::Compiled,
}

impl PolicyView<'_> {
    fn decide(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: weft_crds::L4Protocol,
        family: Family,
    ) -> Option<trace::Traced> {
        trace::decide(
            &self.spec,
            self.res,
            &self.members,
            &self.compiled,
            from,
            to,
            port,
            protocol,
            family,
        )
        .ok()
    }
}

fn run_lab(lab: &Lab, res: &weft_operator::model::Resources) -> anyhow::Result<bool> {
    let spec = &lab.spec;
    println!("weft lab {}", lab.name);
    lab.build_network()?;
    let _port_guards = lab.start_port_guards()?;
    lab.start_agents()?;
    lab.wait_ready(Duration::from_secs(20))?;
    for node in spec.nodes.iter().filter(|n| n.port_guard) {
        let report = lab.wait_rollback(&node.name, Duration::from_secs(20))?;
        println!("  {}: the switch shut its port; {report}", node.name);
    }
    let listeners = Listeners::default();
    let mut outside_ports: Vec<Listen> = spec
        .lan
        .listen
        .iter()
        .filter_map(|l| Listen::parse(l).ok())
        .collect();
    for e in spec
        .expect
        .iter()
        .filter(|e| e.to == "outside" && !e.is_icmp())
    {
        outside_ports.push(Listen {
            port: e.port,
            udp: e.protocol == "udp",
        });
    }
    outside_ports.sort();
    outside_ports.dedup();
    let lan_ns = lab.lan_ns()?;
    for l in &outside_ports {
        listeners.start(&lan_ns, "outside", l.port, l.udp)?;
    }
    // Each workload's listeners start as soon as it is up; `atStart` expectations are probed
    // right after the ADD of the later of their two ends returned.
    let mut started: Vec<String> = vec!["outside".into()];
    let mut early: BTreeMap<usize, ProbeResult> = BTreeMap::new();
    let listen = listen_ports(spec, res);
    let attached = lab.start_workloads(|w| {
        let ns = lab.workload_ns(&w.name)?;
        for l in listen.get(&w.name).into_iter().flatten() {
            listeners.start(&ns, &w.name, l.port, l.udp)?;
        }
        started.push(w.name.clone());
        let members = trace::members(spec, res, Some(&lab.addresses()));
        for (i, e) in spec.expect.iter().enumerate() {
            let due = e.at_start
                && !early.contains_key(&i)
                && (e.from == w.name || e.to == w.name)
                && started.contains(&e.from)
                && started.contains(&e.to);
            if !due {
                continue;
            }
            let result = match address_of(spec, res, &members, &e.to, Some(&e.from), e.family) {
                Some(target) => probe_for(lab, e, target)?,
                None => ProbeResult::Error(format!("{} has no address", e.to)),
            };
            early.insert(i, result);
        }
        Ok(())
    })?;
    // Each agent learns the other nodes' workloads from their published files a moment later:
    // wait for that, so policies naming pods on other nodes are complete before probing.
    lab.wait_peers(Duration::from_secs(15))?;
    for w in &spec.workloads {
        if let Some(to) = &w.migrate_to {
            println!("  {}", lab.migrate(w, to)?);
        }
        if let Some(to) = &w.restart_on {
            println!("  {}", lab.restart_on(w, to)?);
        }
    }

    let addresses = lab.addresses();
    let members = trace::members(spec, res, Some(&addresses));
    let mut now = spec.clone();
    for w in &mut now.workloads {
        w.node = lab.node_now(&w.name);
    }
    let view = PolicyView {
        spec: now,
        res,
        compiled: weft_operator::policy::compile_resources(res, &members),
        members,
    };
    print_built(lab, &attached);
    let ok = check_expectations(lab, &view, &early)?;
    print_matrix(lab, &outside_ports, &view);
    Ok(ok)
}

/// Probes an expectation's target from its source: a connection, or an echo request.
fn probe_for(lab: &Lab, e: &file::Expectation, target: IpAddr) -> anyhow::Result<ProbeResult> {
    let ns = lab.ns_of(&e.from)?;
    let timeout = Duration::from_millis(1500);
    Ok(if e.is_icmp() {
        probe::ping(&ns, target, timeout)
    } else {
        probe::probe(&ns, target, e.port, e.protocol == "udp", timeout)
    })
}

/// What each workload listens on: its `listen`, the port of every expectation that targets it
/// and the target port of every port forward an expectation to a node may lead to it. A `deny`
/// is then checked against a listener: it holds because the packets are dropped, not because
/// nothing listens.
fn listen_ports(
    spec: &LabFile,
    res: &weft_operator::model::Resources,
) -> BTreeMap<String, Vec<Listen>> {
    let mut out: BTreeMap<String, Vec<Listen>> = BTreeMap::new();
    for w in &spec.workloads {
        let ports = out.entry(w.name.clone()).or_default();
        ports.extend(w.listen.iter().filter_map(|l| Listen::parse(l).ok()));
    }
    for e in spec.expect.iter().filter(|e| !e.is_icmp()) {
        let udp = e.protocol == "udp";
        if let Some(ports) = out.get_mut(&e.to) {
            ports.push(Listen { port: e.port, udp });
            continue;
        }
        if !spec.nodes.iter().any(|n| n.name == e.to) {
            continue;
        }
        for pf in &res.port_forwards {
            let ns = pf.metadata.namespace.as_deref().unwrap_or("default");
            for fp in pf.spec.forward_ports() {
                if (fp.protocol.nft_name() == "udp") != udp
                    || e.port < fp.node_ports.0
                    || e.port > fp.node_ports.1
                {
                    continue;
                }
                let port = fp.target_port.unwrap_or(e.port);
                for w in spec.workloads.iter().filter(|w| w.namespace == ns) {
                    let targeted = match (&pf.spec.target.workload, &pf.spec.target.selector) {
                        (Some(t), _) => t == &w.name,
                        (None, Some(s)) => weft_crds::selector_matches(s, &w.labels),
                        (None, None) => false,
                    };
                    if targeted && let Some(ports) = out.get_mut(&w.name) {
                        ports.push(Listen { port, udp });
                    }
                }
            }
        }
    }
    for ports in out.values_mut() {
        // The first listener stays first: the matrix probes it.
        let mut seen = Vec::new();
        ports.retain(|l| {
            let new = !seen.contains(l);
            seen.push(*l);
            new
        });
    }
    out
}

/// The address of `outside`, a node or a workload in `family` that `peer` connects to (a
/// workload on several networks is reached on one it shares with its peer).
fn address_of(
    spec: &LabFile,
    res: &weft_operator::model::Resources,
    members: &[weft_operator::policy::Member],
    name: &str,
    peer: Option<&str>,
    family: Family,
) -> Option<IpAddr> {
    trace::address_towards(spec, res, members, name, peer, family)
}

/// The node `name` is or runs on now (a migrated VM: its target).
fn node_of<'a>(lab: &'a Lab, name: &str) -> Option<&'a file::Node> {
    let node = lab.node_now(name);
    lab.spec.nodes.iter().find(|n| n.name == node)
}

fn print_built(lab: &Lab, attached: &BTreeMap<String, Vec<IpAddr>>) {
    println!("\nbuilt:");
    println!(
        "  lan     outside host {}{}",
        lab.spec.lan.gateway,
        lab.spec
            .lan
            .gateway6
            .map(|g| format!(", {g}"))
            .unwrap_or_default()
    );
    for n in &lab.spec.nodes {
        let status = lab.agent_status(&n.name);
        let bridges = status
            .as_ref()
            .and_then(|s| s.get("bridges"))
            .and_then(|b| b.as_array())
            .map(|b| {
                b.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "  node    {:<12} {}{}  bridges: {}",
            n.name,
            n.address,
            n.address6.map(|a| format!(", {a}")).unwrap_or_default(),
            if bridges.is_empty() { "-" } else { &bridges }
        );
        if let Some(s) = &status {
            if let Some(f) = s.get("forwards").and_then(|f| f.as_object()) {
                for (pf, targets) in f {
                    println!("          port forward {pf} -> {targets}");
                }
            }
            if let Some(p) = s.get("policies").and_then(|p| p.as_object()) {
                for (policy, n) in p {
                    println!("          policy {policy} applies to {n} interface(s)");
                }
            }
            if let Some(p) = s.get("problems").and_then(|p| p.as_array()) {
                for problem in p.iter().filter_map(|x| x.as_str()) {
                    println!("          problem: {problem}");
                }
            }
        }
    }
    for w in &lab.spec.workloads {
        let ips = attached
            .get(&w.name)
            .map(|v| {
                v.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "  {:<7} {:<12} on {:<10} {} [{}]",
            w.kind.to_ascii_lowercase(),
            w.name,
            lab.node_now(&w.name),
            ips,
            w.networks.join(", ")
        );
    }
}

fn check_expectations(
    lab: &Lab,
    view: &PolicyView<'_>,
    early: &BTreeMap<usize, ProbeResult>,
) -> anyhow::Result<bool> {
    let mut all_ok = true;
    if lab.spec.expect.is_empty() {
        return Ok(true);
    }
    println!("\nexpectations:");
    for (i, e) in lab.spec.expect.iter().enumerate() {
        let fam = match (e.family, e.link_local) {
            (Family::Ipv6, true) => "v6 link-local",
            (Family::Ipv6, false) => "v6",
            _ => "v4",
        };
        let label = format!(
            "{} -> {} {} {}{}{}{}{}",
            e.from,
            e.to,
            if e.is_icmp() {
                "icmp echo".to_string()
            } else {
                format!("{}/{}", e.port, e.protocol)
            },
            fam,
            if e.at_start { " at start" } else { "" },
            if e.repeat > 1 {
                format!(" (attempt {} in a row)", e.repeat)
            } else {
                String::new()
            },
            e.flood
                .map(|f| {
                    format!(
                        " after a {}flood of {}/s for {}s",
                        if f.spoofed { "spoofed SYN " } else { "" },
                        f.per_second,
                        f.seconds
                    )
                })
                .unwrap_or_default(),
            e.spoof
                .as_ref()
                .map(|s| format!(" {}", s.describe()))
                .unwrap_or_default()
        );
        let link_local = if e.link_local {
            match lab.link_local_target(&e.from, &e.to) {
                Ok(a) => Some(a),
                Err(err) => {
                    println!("  FAIL  {label}: {err:#}");
                    all_ok = false;
                    continue;
                }
            }
        } else {
            None
        };
        let Some(target) = link_local.map(|a| IpAddr::V6(*a.ip())).or_else(|| {
            address_of(
                &view.spec,
                view.res,
                &view.members,
                &e.to,
                Some(&e.from),
                e.family,
            )
        }) else {
            println!("  FAIL  {label}: {} has no {fam} address", e.to);
            all_ok = false;
            continue;
        };
        // The nodes' policy drop counters before a probe that should be dropped (see below;
        // reading them costs an `nft` per node and set, so not before the others).
        let drops_before = (e.result == Outcome::Deny && e.spoof.is_none() && !e.at_start)
            .then(|| policy_drops(lab));
        // Captures on the analyzers of the expectation's mirror checks, opened before the probe.
        let mut captures = Vec::new();
        let mut copy_lines: Vec<String> = Vec::new();
        for analyzer in e.copied_to.iter().chain(&e.not_copied_to) {
            let ns = lab.ns_of(analyzer)?;
            // A workload: every interface of its namespace; the outside host: its own, the
            // LAN's bridge (not also the bridge's ports, which carry the same frames).
            let outside = analyzer == "outside";
            let capture = weft_dataplane::netns::run_in(&ns, || {
                let ifindex = if outside {
                    weft_dataplane::netlink::Netlink::new()
                        .and_then(|mut nl| nl.link_by_name("lan0"))
                        .ok()
                        .flatten()
                        .map_or(0, |l| l.index)
                } else {
                    0
                };
                weft_dataplane::frame::Capture::open(ifindex)
            })??;
            captures.push((analyzer.clone(), capture));
        }
        let mut flood_started = None;
        let got = if let Some(sp) = &e.spoof {
            spoofed(lab, e, sp, target)?
        } else if e.at_start {
            early
                .get(&i)
                .cloned()
                .unwrap_or_else(|| ProbeResult::Error("never probed at start".into()))
        } else {
            if let Some(f) = e.flood {
                let started = jiff::Timestamp::now();
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let count = (f64::from(f.per_second) * f.seconds).round() as u32;
                probe::flood(
                    &lab.ns_of(&e.from)?,
                    target,
                    e.port,
                    if f.spoofed {
                        probe::FloodKind::SpoofedSyn
                    } else if e.protocol == "udp" {
                        probe::FloodKind::Udp
                    } else {
                        probe::FloodKind::Tcp
                    },
                    f.per_second,
                    count,
                )?;
                flood_started = Some(started);
            }
            // Repeated probes: the earlier ones only count against a brute-force guard.
            let probe = || match link_local {
                Some(mut a) => {
                    a.set_port(e.port);
                    Ok(probe::probe_addr(
                        &lab.ns_of(&e.from)?,
                        None,
                        a.into(),
                        e.protocol == "udp",
                        Duration::from_millis(1500),
                    ))
                }
                None => probe_for(lab, e, target),
            };
            for _ in 1..e.repeat {
                probe()?;
            }
            probe()?
        };
        let copies: Vec<(String, usize)> = captures
            .into_iter()
            .map(|(analyzer, capture)| {
                let frames = capture
                    .collect(Duration::from_millis(300), 10_000)
                    .unwrap_or_default();
                // The outside host is a remote collector: only VXLAN copies count there (it
                // also sees the probe itself).
                let n = frames
                    .iter()
                    .filter(|f| match analyzer.as_str() {
                        "outside" => {
                            vxlan_inner(f).is_some_and(|inner| is_probe_frame(inner, e, target))
                        }
                        _ => is_probe_frame(f, e, target),
                    })
                    .count();
                (analyzer, n)
            })
            .collect();
        let mut ok = got.allowed() == (e.result == Outcome::Allow);
        let mut why = String::new();
        let mut anomaly_line = None;
        if let (Some(want), Some(started)) = (&e.anomaly, flood_started) {
            let found = anomaly_after(lab, want, started);
            anomaly_line = Some(match found {
                Some(after) if after <= want.detect_within => format!(
                    "          anomaly: {} on {} reported {after:.2}s after the flood started (within {}s)",
                    want.kind, want.on, want.detect_within
                ),
                Some(after) => {
                    ok = false;
                    why.push_str(" (anomaly reported too late)");
                    format!(
                        "          anomaly: {} on {} reported {after:.2}s after the flood started (WRONG: later than {}s)",
                        want.kind, want.on, want.detect_within
                    )
                }
                None => {
                    ok = false;
                    why.push_str(" (no anomaly reported)");
                    format!(
                        "          anomaly: MISSING {} on {} within {}s",
                        want.kind, want.on, want.detect_within
                    )
                }
            });
        }
        for (analyzer, frames) in &copies {
            let want = e.copied_to.contains(analyzer);
            copy_lines.push(format!(
                "          mirror: {analyzer} received {frames} cop{} of the probe's frames{}",
                if *frames == 1 { "y" } else { "ies" },
                if want == (*frames > 0) {
                    ""
                } else {
                    " (WRONG)"
                }
            ));
            if want != (*frames > 0) {
                ok = false;
                why.push_str(&format!(
                    " ({analyzer} {} copies)",
                    if want { "received no" } else { "received" }
                ));
            }
        }
        if let ProbeResult::Error(_) = got {
            // A probe that could not run proves nothing, a denial least of all.
            ok = false;
            why = " (the probe could not run)".into();
        }
        let note = nat_private(lab, view, &e.from, &e.to, target);
        if ok && let ProbeResult::Answered { by, seen } = &got {
            if let Some(want) = &e.answered_by
                && want != by
            {
                ok = false;
                why = format!(" (expected an answer from {want})");
            }
            if let Some(want) = &e.source_seen_as {
                let expected: Option<IpAddr> = match want.as_str() {
                    "node" => node_of(lab, &e.from).and_then(|n| {
                        if e.family == Family::Ipv4 {
                            Some(n.address.addr())
                        } else {
                            n.address6.map(|a| a.addr())
                        }
                    }),
                    "self" => trace::source_towards(
                        &view.spec,
                        view.res,
                        &view.members,
                        &e.from,
                        &e.to,
                        target,
                    ),
                    literal => literal.parse().ok(),
                };
                if expected != Some(*seen) {
                    ok = false;
                    why = format!(
                        " (expected the source to be seen as {want} = {})",
                        expected
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| "?".into())
                    );
                }
            }
        }
        let expected = match e.result {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        };
        // What the policy compiler says; it must never deny what the packets did.
        let traced = view.decide(&e.from, &e.to, e.port, e.l4(), e.family);
        let decision = traced.as_ref().map(|t| &t.decision);
        if let Some(d) = decision
            && !d.allowed
            && got.allowed()
        {
            ok = false;
            why.push_str(" (trace says denied, but the packets passed)");
        }
        // A denial by a logged rule or by a default must have left its audit record.
        let mut audit_line = None;
        // A policy's drop is counted for the workload (the metrics' reason="policy").
        let mut counted_line = None;
        if let Some(t) = &traced
            && !t.decision.allowed
            && !got.allowed()
            && let Some(before) = drops_before
            && note.is_none()
        {
            let counted = policy_drops(lab).saturating_sub(before);
            if counted == 0 {
                ok = false;
                why.push_str(" (the drop was not counted)");
            }
            counted_line = Some(format!("          counted: {counted} policy drop(s)"));
        }
        // (An audit record names the link-local addresses, which the trace does not know.)
        if let Some(t) = &traced
            && !t.decision.allowed
            && !got.allowed()
            && e.spoof.is_none()
            && !e.link_local
            && note.is_none()
            && let Some(found) = audit_record_for(lab, view, t)
        {
            audit_line = Some(match found {
                Ok(rec) => format!("          audit: {rec}"),
                Err(wanted) => {
                    ok = false;
                    why.push_str(" (no audit record)");
                    format!("          audit: MISSING a record {wanted}")
                }
            });
        }
        println!(
            "  {}  {label} ({target}): expected {expected}, {}{why}",
            if ok { "ok  " } else { "FAIL" },
            got.describe()
        );
        for line in audit_line.iter().chain(&anomaly_line) {
            println!("{line}");
        }
        for line in copy_lines.iter().chain(&counted_line) {
            println!("{line}");
        }
        if let Some(n) = &note
            && !got.allowed()
        {
            println!("          note: {n}");
        }
        if let Some(d) = decision
            && (view.compiled.egress != Default::default()
                || view.compiled.ingress != Default::default()
                || !view.compiled.default_deny.is_empty())
        {
            println!("          policy: {}", d.summary());
        }
        all_ok &= ok;
    }
    println!(
        "\n{}",
        if all_ok {
            "all expectations hold"
        } else {
            "SOME EXPECTATIONS FAILED"
        }
    );
    let _ = std::io::stdout().flush();
    Ok(all_ok)
}

/// Packets the segmentation policy dropped on every node of the lab, all workloads together
/// (the kernel's counters in the `drops_*` sets of each node's `inet weft` table).
fn policy_drops(lab: &Lab) -> u64 {
    let mut total = 0;
    for node in &lab.spec.nodes {
        let Ok(ns) = lab.node_ns(&node.name) else {
            continue;
        };
        let counted = weft_dataplane::netns::run_in(&ns, || {
            let nft = weft_dataplane::nft::NftCli::default();
            let mut n = 0;
            for short in ["eg", "in"] {
                for v6 in [false, true] {
                    let set = weft_operator::policy::render::drops_set(short, v6);
                    n += nft
                        .set_counters(weft_dataplane::nft::Family::Inet, "weft", &set)
                        .map(|list| list.iter().map(|(_, p, _)| p).sum::<u64>())
                        .unwrap_or(0);
                }
            }
            n
        });
        total += counted.unwrap_or(0);
    }
    total
}

/// The Ethernet frame a VXLAN datagram (in Ethernet, IPv4 or IPv6, UDP) carries: the UDP
/// payload after its 8-byte VXLAN header with the I flag set.
fn vxlan_inner(frame: &[u8]) -> Option<&[u8]> {
    use etherparse::{SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        return None;
    };
    let payload = u.payload();
    (payload.len() > 8 + 14 && payload[0] & 0x08 != 0).then(|| &payload[8..])
}

/// Whether `frame` (Ethernet) belongs to expectation `e`'s probe of `target`: its protocol, to
/// or from `target`, and for TCP and UDP to or from its port.
fn is_probe_frame(frame: &[u8], e: &file::Expectation, target: IpAddr) -> bool {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let (src, dst): (IpAddr, IpAddr) = match &p.net {
        Some(NetSlice::Ipv4(v4)) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(v6)) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        _ => return false,
    };
    if src != target && dst != target {
        return false;
    }
    match (&p.transport, e.protocol.as_str()) {
        (Some(TransportSlice::Tcp(t)), "tcp") => {
            t.source_port() == e.port || t.destination_port() == e.port
        }
        (Some(TransportSlice::Udp(u)), "udp") => {
            u.source_port() == e.port || u.destination_port() == e.port
        }
        (Some(TransportSlice::Icmpv4(_)), "icmp") | (Some(TransportSlice::Icmpv6(_)), "icmp") => {
            true
        }
        _ => false,
    }
}

/// When `to` is reached at `target` on a NAT network of another node than `from`'s: why no
/// packet can get there, whatever the policies say.
fn nat_private(
    lab: &Lab,
    view: &PolicyView<'_>,
    from: &str,
    to: &str,
    target: IpAddr,
) -> Option<String> {
    if from == "outside" {
        return None;
    }
    let network = view
        .members
        .iter()
        .find(|m| m.name == to && m.ips.contains(&target))?
        .network
        .clone();
    let nat = view.res.networks.iter().any(|n| {
        n.metadata.name.as_deref() == Some(network.as_str())
            && n.spec.mode == weft_crds::NetworkMode::Nat
    });
    let (from_node, to_node) = (lab.node_now(from), lab.node_now(to));
    (nat && from_node != to_node).then(|| {
        format!(
            "{to} is on NAT network {network} on {to_node}, and {from} is on {from_node}: a NAT network is private to each node, so this is unreachable whatever the policies say (from another node, use a PortForward on {to_node})"
        )
    })
}

/// Seconds from `started` to the first anomaly record of `want.kind` on workload `want.on` in
/// a node's audit log (waiting up to `detectWithin` and a second for it), `None` if there is
/// none.
fn anomaly_after(lab: &Lab, want: &file::ExpectedAnomaly, started: jiff::Timestamp) -> Option<f64> {
    let w = lab.spec.workloads.iter().find(|w| w.name == want.on)?;
    let workload = format!("{}/{}", w.namespace, w.name);
    let deadline = std::time::Instant::now()
        + Duration::from_secs_f64(want.detect_within)
        + Duration::from_secs(1);
    loop {
        for node in &lab.spec.nodes {
            let path = lab.dir.join(&node.name).join("audit.jsonl");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let first = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| {
                    v["verdict"] == "anomaly"
                        && v["state"] == "started"
                        && v["kind"] == want.kind.as_str()
                        && v["workload"] == workload.as_str()
                })
                .filter_map(|v| v["time"].as_str()?.parse::<jiff::Timestamp>().ok())
                .filter(|t| *t >= started - jiff::SignedDuration::from_secs(1))
                .min();
            if let Some(t) = first {
                return Some(t.duration_since(started).as_secs_f64().max(0.0));
            }
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// For a denied expectation whose deciding rule logs (a rule with `log: true`, or an isolation
/// or default drop): `Some(Ok(record))` when a node's audit log has the matching record,
/// `Some(Err(what))` when none does; `None` when no record is due.
fn audit_record_for(
    lab: &Lab,
    view: &PolicyView<'_>,
    t: &trace::Traced,
) -> Option<Result<String, String>> {
    let (direction, step) = t.decision.steps().find(|(_, s)| !s.allowed)?;
    let direction = direction.as_str();
    let (policy, rule) = match step.rule_id {
        Some(id) => {
            let (_, r) = view.compiled.rule_with_direction(id)?;
            if !r.log {
                return None;
            }
            (
                Some(format!("{} {}", r.origin.kind, r.origin.policy)),
                Some(r.origin.rule.clone()),
            )
        }
        None => (None, None),
    };
    let (src, dst) = (t.packet.src, t.packet.dst);
    let port = t.packet.port.unwrap_or(0);
    let wanted = format!(
        "{src} -> {dst}:{port} {direction} {}",
        rule.clone().unwrap_or_else(|| "(default)".into())
    );
    let matches = |v: &serde_json::Value| {
        v["src"].as_str() == Some(src.to_string().as_str())
            && v["dst"].as_str() == Some(dst.to_string().as_str())
            && v["port"].as_u64().unwrap_or(0) == u64::from(port)
            && v["verdict"] == "deny"
            && v["direction"] == direction
            && v["policy"].as_str() == policy.as_deref()
            && v["rule"].as_str() == rule.as_deref()
    };
    // The reader writes as packets pass; give it a moment.
    for _ in 0..10 {
        for node in &lab.spec.nodes {
            let path = lab.dir.join(&node.name).join("audit.jsonl");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(v) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| matches(v))
            {
                return Some(Ok(format!(
                    "{} on {}: {} {} -> {}{} {}",
                    v["verdict"].as_str().unwrap_or(""),
                    node.name,
                    v["direction"].as_str().unwrap_or(""),
                    v["srcWorkload"].as_str().unwrap_or(&src.to_string()),
                    v["dstWorkload"].as_str().unwrap_or(&dst.to_string()),
                    t.packet.port.map(|p| format!(":{p}")).unwrap_or_default(),
                    match (v["policy"].as_str(), v["rule"].as_str()) {
                        (Some(p), Some(r)) => format!("{p} rule {r}"),
                        _ => v["reason"].as_str().unwrap_or("").to_string(),
                    }
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Err(wanted))
}

/// A probe with a forged identity from a workload's `eth0`; the identity is restored after.
fn spoofed(
    lab: &Lab,
    e: &file::Expectation,
    sp: &file::Spoof,
    target: IpAddr,
) -> anyhow::Result<ProbeResult> {
    use weft_dataplane::netlink::Netlink;
    let ns = lab.workload_ns(&e.from)?;
    let mut nl = Netlink::in_netns(&ns)?;
    let eth0 = nl
        .link_by_name("eth0")?
        .ok_or_else(|| anyhow::anyhow!("{} has no eth0", e.from))?;
    let udp = e.protocol == "udp";
    let timeout = Duration::from_millis(1500);
    if let Some(ip) = sp.ip {
        let net = ipnet::IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 })?;
        nl.add_address(eth0.index, net, true)?;
        let got = probe::probe_from(&ns, Some(ip), target, e.port, udp, timeout);
        nl.del_address(eth0.index, net)?;
        return Ok(got);
    }
    if let Some(mac) = sp.mac.as_deref().and_then(weft_dataplane::names::parse_mac) {
        let own = eth0
            .mac
            .ok_or_else(|| anyhow::anyhow!("{}'s eth0 has no MAC", e.from))?;
        nl.set_mac(eth0.index, mac)?;
        let got = probe::probe(&ns, target, e.port, udp, timeout);
        nl.set_mac(eth0.index, own)?;
        return Ok(got);
    }
    if let Some(claimed) = sp.arp {
        let IpAddr::V4(target4) = target else {
            anyhow::bail!("spoof.arp needs an IPv4 target");
        };
        let mac = eth0
            .mac
            .ok_or_else(|| anyhow::anyhow!("{}'s eth0 has no MAC", e.from))?;
        let frame = weft_dataplane::frame::arp_request(mac, claimed, target4);
        let index = eth0.index;
        let victim = lab.ns_name_of(&e.to);
        let flush = || {
            std::process::Command::new("ip")
                .args(["-n", &victim, "neigh", "flush", "to", &claimed.to_string()])
                .output()
        };
        // The target may know the claimed address already (its real owner talked to it): only
        // an entry pointing at the forger's MAC, made after this request, counts.
        flush()?;
        netns::run_in(&ns, move || weft_dataplane::frame::send(index, &frame))??;
        std::thread::sleep(Duration::from_millis(300));
        let out = std::process::Command::new("ip")
            .args(["-n", &victim, "neigh", "show", &claimed.to_string()])
            .output()?;
        let learned = arp_learned(&String::from_utf8_lossy(&out.stdout), mac);
        let _ = flush();
        return Ok(if learned {
            ProbeResult::Answered {
                by: e.to.clone(),
                seen: IpAddr::V4(claimed),
            }
        } else {
            ProbeResult::Timeout
        });
    }
    anyhow::bail!("spoof: set exactly one of ip, mac, arp")
}

/// Whether `ip neigh show ADDRESS` output maps the address to `mac`.
fn arp_learned(neigh: &str, mac: [u8; 6]) -> bool {
    let mac = weft_dataplane::names::format_mac(mac);
    neigh.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.any(|w| w == "lladdr") && words.next().is_some_and(|m| m.eq_ignore_ascii_case(&mac))
    })
}

fn print_matrix(lab: &Lab, outside: &[Listen], view: &PolicyView<'_>) {
    // Who reaches whom over IPv4 on each target's first listener.
    let mut targets: Vec<(String, Listen)> = Vec::new();
    for w in &lab.spec.workloads {
        if let Some(l) = w.listen.first().and_then(|l| Listen::parse(l).ok()) {
            targets.push((w.name.clone(), l));
        }
    }
    if let Some(l) = outside.first() {
        targets.push(("outside".into(), *l));
    }
    if targets.is_empty() {
        return;
    }
    let mut sources: Vec<String> = lab.spec.workloads.iter().map(|w| w.name.clone()).collect();
    sources.push("outside".into());
    let cells: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let targets = &targets;
                s.spawn(move || {
                    targets
                        .iter()
                        .map(|(t, l)| {
                            if t == src {
                                return "-".to_string();
                            }
                            let Some(addr) = address_of(
                                &view.spec,
                                view.res,
                                &view.members,
                                t,
                                Some(src),
                                Family::Ipv4,
                            ) else {
                                return "?".to_string();
                            };
                            let Ok(ns) = lab.ns_of(src) else {
                                return "?".to_string();
                            };
                            match probe::probe(&ns, addr, l.port, l.udp, Duration::from_millis(700))
                            {
                                r if r.allowed() => "yes".to_string(),
                                _ => "no".to_string(),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    println!("\nconnectivity (IPv4, each target's first listener; rows reach columns):");
    let width = targets
        .iter()
        .map(|(t, _)| t.len())
        .chain(sources.iter().map(|s| s.len()))
        .max()
        .unwrap_or(8)
        .max(8);
    print!("  {:width$}", "");
    for (t, l) in &targets {
        let head = format!("{t}:{}", l.port);
        print!(" {head:>w$}", w = width.max(head.len()));
    }
    println!();
    for (src, row) in sources.iter().zip(&cells) {
        print!("  {src:width$}");
        for ((t, l), cell) in targets.iter().zip(row) {
            let head = format!("{t}:{}", l.port);
            print!(" {cell:>w$}", w = width.max(head.len()));
        }
        println!();
    }
    // Name the deciding rule of every pair the policies deny.
    let mut denied = Vec::new();
    for (src, row) in sources.iter().zip(&cells) {
        for ((t, l), cell) in targets.iter().zip(row) {
            if cell != "no" {
                continue;
            }
            let protocol = if l.udp {
                weft_crds::L4Protocol::Udp
            } else {
                weft_crds::L4Protocol::Tcp
            };
            if let Some(traced) = view.decide(src, t, l.port, protocol, Family::Ipv4)
                && !traced.decision.allowed
            {
                denied.push(format!(
                    "  {src} -> {t}:{}  {}",
                    l.port,
                    traced.decision.summary()
                ));
            }
        }
    }
    if !denied.is_empty() {
        println!("\ndenied by policy (the deciding rule):");
        for line in denied {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arp_claim_counts_only_when_it_points_at_the_forger() {
        let forger = [0x02, 0, 0, 0, 0, 0x99];
        // The target knew the claimed address already, from its real owner.
        assert!(!arp_learned(
            "10.1.2.50 dev eth0 lladdr 52:54:00:12:34:56 REACHABLE\n",
            forger
        ));
        assert!(arp_learned(
            "10.1.2.50 dev eth0 lladdr 02:00:00:00:00:99 STALE\n",
            forger
        ));
        assert!(!arp_learned("10.1.2.50 dev eth0 FAILED\n", forger));
        assert!(!arp_learned("", forger));
    }

    #[test]
    fn targets_listen_on_the_ports_expectations_and_forwards_lead_to() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lab.yaml");
        std::fs::write(
            &p,
            r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: net}, spec: {mode: NAT, subnets: [10.10.0.0/16]}}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: pf}
    spec:
      network: net
      target: {selector: {matchLabels: {app: web}}}
      ports: [{protocol: TCP, port: 8080, targetPort: 80}, {protocol: UDP, portRange: {start: 5000, end: 5009}}]
workloads:
  - {name: web, node: node-a, labels: {app: web}, networks: [net], listen: [443/tcp]}
  - {name: db, node: node-a, networks: [net]}
expect:
  - {from: web, to: db, port: 5432, result: deny}
  - {from: outside, to: node-a, port: 8080, result: deny}
  - {from: outside, to: node-a, port: 5003, protocol: udp, result: allow}
  - {from: outside, to: node-a, port: 9999, result: deny}
"#,
        )
        .unwrap();
        let (spec, res, _) = LabFile::load(&p).unwrap();
        let ports = listen_ports(&spec, &res);
        let tcp = |port| Listen { port, udp: false };
        let udp = |port| Listen { port, udp: true };
        assert_eq!(ports["db"], vec![tcp(5432)]);
        assert_eq!(ports["web"], vec![tcp(443), tcp(80), udp(5003)]);
    }
}

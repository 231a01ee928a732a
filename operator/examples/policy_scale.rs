//! Policy scale benchmark: W workloads and P policies on one node. Measures the pure compile,
//! rendering the `inet weft` table, applying it with nft (one atomic transaction, in a throw-away
//! network namespace), and adding one more workload: by recompiling (compile, render, element
//! diff, one transaction) and the way the agent's registration does it — the node plan with
//! every workload as a local endpoint, changed in place (`plan::apply_endpoint_changes`), its
//! elements sent over netlink.
//!
//!   cargo run --release -p weft-operator --example policy_scale -- [WORKLOADS] [POLICIES]
//!
//! Needs root (it unshares a network namespace for nft). Figures: docs/benchmarks.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
use weft_dataplane::proto::Endpoint;
use weft_operator::agent::firewall;
use weft_operator::agent::plan::{self as aplan, NodeContext};
use weft_operator::model::{NodeBlocks, Resources, WorkloadMeta, parse_manifests};
use weft_operator::policy::{self, Member};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let workloads = args.first().copied().unwrap_or(10_000);
    let policies = args.get(1).copied().unwrap_or(1_000);
    let namespaces = 100;
    let apps = 50;

    let mut yaml = String::from(
        "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: net}\nspec: {mode: NAT, subnets: [10.0.0.0/8]}\n",
    );
    for n in 0..namespaces {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{}}}}}\n",
            n % 10
        ));
    }
    for p in 0..policies {
        if p % 20 == 0 {
            yaml.push_str(&format!(
                "---\napiVersion: weft.dev/v1alpha1\nkind: ClusterSegmentationPolicy\nmetadata: {{name: c{p}}}\nspec:\n  tier: {}\n  priority: {}\n  subject: {{namespaces: {{matchLabels: {{team: t{}}}}}}}\n  ingress:\n    - {{name: a, action: Deny, from: [{{namespaces: {{matchLabels: {{team: t{}}}}}}}], protocols: [{{protocol: TCP, port: 22}}]}}\n    - {{name: b, action: Pass, from: [{{cidrs: [192.168.0.0/16]}}]}}\n",
                if p % 40 == 0 { "Admin" } else { "Baseline" },
                p % 1000,
                p % 10,
                (p + 1) % 10
            ));
        } else {
            yaml.push_str(&format!(
                "---\napiVersion: weft.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{p}, namespace: ns{}}}\nspec:\n  subject: {{podSelector: {{matchLabels: {{app: a{}}}}}}}\n  ingress:\n    - {{name: from-peer, action: Allow, from: [{{pods: {{podSelector: {{matchLabels: {{app: a{}}}}}}}}}], protocols: [{{protocol: TCP, port: {}}}]}}\n    - {{name: no-ssh, action: Deny, protocols: [{{protocol: TCP, port: 22}}]}}\n",
                p % namespaces,
                p % apps,
                (p + 1) % apps,
                8000 + p % 100
            ));
        }
    }
    let mut res = Resources::default();
    // One document at a time: the YAML reader caps a single stream at 1024 documents.
    for doc in yaml.split("---\n") {
        parse_manifests(doc, "bench", &mut res);
    }
    anyhow::ensure!(res.problems.is_empty(), "{:?}", res.problems);
    let member = |i: usize| Member {
        namespace: format!("ns{}", i % namespaces),
        name: format!("w{i}"),
        labels: BTreeMap::from([("app".to_string(), format!("a{}", i % apps))]).into(),
        network: "net".into(),
        ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + 2 + i as u32))],
        local: true,
        port: None,
    };
    let mut members: Vec<Member> = (0..workloads).map(member).collect();
    let compile = |members: &[Member]| policy::compile_resources(&res, members);
    let nets = [firewall::NetRules {
        bridge: "wn-net".into(),
        subnet_v4: Some("10.0.0.0/8".parse()?),
        subnet_v6: None,
        masquerade: true,
        sealed: true,
    }];

    let t = Instant::now();
    let compiled = compile(&members);
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let table = firewall::table(&nets, &[], &[], &[], &compiled);
    let render_ms = t.elapsed().as_secs_f64() * 1e3;
    let rules: usize = table.chains.iter().map(|c| c.rules.len()).sum();
    let elements: usize = table.sets.iter().map(|s| s.elements.len()).sum();
    println!(
        "{workloads} workloads, {policies} policies: {} groups, {rules} rules, {elements} set elements",
        compiled.groups.len()
    );
    println!("compile            {compile_ms:8.1} ms");
    println!("render table       {render_ms:8.1} ms");

    // nft runs in a throw-away network namespace: a scoped thread that unshares its own.
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| -> anyhow::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut nft = weft_dataplane::nft::NftCli::default();
            let mut report = weft_dataplane::links::ApplyReport::default();
            let t = Instant::now();
            weft_dataplane::plan::apply_firewall(&table, &mut nft, &mut report)?;
            println!(
                "apply (nft, atomic) {:8.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            // One more workload, as a registration does: compile again, then one element-only
            // transaction from the table applied last (`plan::apply_since`), no listing.
            members.push(member(workloads));
            let t = Instant::now();
            let compiled = compile(&members);
            let compile_ms = t.elapsed().as_secs_f64() * 1e3;
            let next = firewall::table(&nets, &[], &[], &[], &compiled);
            let tx = weft_dataplane::nft::diff(&table, &next);
            use weft_dataplane::nft::Firewall;
            nft.apply(&tx)?;
            println!(
                "add one workload   {:8.1} ms  (recompiling: compile {compile_ms:.1} ms; {})",
                t.elapsed().as_secs_f64() * 1e3,
                tx.0.iter()
                    .map(|c| c.summary())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            inlined(&table, &next)?;
            agent_path(&res, workloads)
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("the nft thread panicked"))?
    })
}

/// The same rules without sets for the groups: each group's addresses written into every rule
/// that uses it (an empty group's rules dropped), as a ruleset without named sets must. Applied
/// whole, and again with one more workload: its rules change, so the table is replaced.
fn inlined(
    table: &weft_dataplane::nft::Table,
    next: &weft_dataplane::nft::Table,
) -> anyhow::Result<()> {
    use weft_dataplane::nft::{Change, Firewall, NftCli, Transaction};
    let inline = |t: &weft_dataplane::nft::Table| {
        let mut t = t.clone();
        let groups: BTreeMap<String, String> = t
            .sets
            .iter()
            .filter(|s| s.name.starts_with('g') && s.name.contains('_'))
            .map(|s| {
                let items: Vec<&str> = s.elements.iter().map(String::as_str).collect();
                (format!("@{}", s.name), items.join(", "))
            })
            .collect();
        let mut rules = 0;
        for chain in &mut t.chains {
            chain.rules = chain
                .rules
                .iter()
                .filter_map(|r| {
                    let mut out = Vec::new();
                    for word in r.split(' ') {
                        match groups.get(word) {
                            Some(items) if items.is_empty() => return None,
                            Some(items) => out.push(format!("{{ {items} }}")),
                            None => out.push(word.to_string()),
                        }
                    }
                    Some(out.join(" "))
                })
                .collect();
            rules += chain.rules.len();
        }
        t.sets
            .retain(|s| !groups.contains_key(&format!("@{}", s.name)));
        (t, rules)
    };
    let (first, rules) = inline(table);
    let (second, _) = inline(next);
    let mut nft = NftCli::default();
    let t = Instant::now();
    nft.apply(&Transaction(vec![Change::ReplaceTable(first)]))?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    nft.apply(&Transaction(vec![Change::ReplaceTable(second)]))?;
    println!(
        "inlined: apply    {apply_ms:8.1} ms  ({rules} rules, group addresses written into them)"
    );
    println!(
        "inlined: add one  {:8.1} ms  (the table replaced)",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The agent's registration: every workload a local endpoint of the node plan (guard table
/// included), one more registered by changing the applied plan in place.
fn agent_path(res: &Resources, workloads: usize) -> anyhow::Result<()> {
    let mut res = res.clone();
    let endpoint = |i: usize| {
        let cid = format!("c{i:08}");
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + 2 + i as u32));
        Endpoint {
            network: "net".into(),
            host_ifname: weft_dataplane::names::host_veth_name(&cid, "eth0"),
            mac: weft_dataplane::names::format_mac(weft_dataplane::names::workload_mac(
                &[ip],
                &cid,
                "eth0",
            )),
            ips: vec![ip],
            container_id: cid,
            ifname: "eth0".into(),
            pod_namespace: Some(format!("ns{}", i % 100)),
            pod_name: Some(format!("w{i}")),
            netns: None,
            vm: None,
            pending: false,
            vlan_trunk: vec![],
            port_mappings: vec![],
            bandwidth: None,
        }
    };
    for i in 0..=workloads {
        res.workloads.push(WorkloadMeta {
            namespace: format!("ns{}", i % 100),
            name: format!("w{i}"),
            labels: BTreeMap::from([("app".to_string(), format!("a{}", i % 50))]),
            networks: None,
            limits: Default::default(),
        });
    }
    let node = NodeContext {
        name: "bench".into(),
        labels: BTreeMap::new(),
        syn_proxy: false,
        own_tcp_ports: Vec::new(),
    };
    let blocks = BTreeMap::from([(
        "net".to_string(),
        NodeBlocks {
            v4: Some("10.0.0.0/8".parse()?),
            v6: None,
        },
    )]);
    let before: Vec<Endpoint> = (0..workloads).map(endpoint).collect();
    let t = Instant::now();
    let mut out = aplan::plan(&node, &res, &blocks, &before);
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut nft = weft_dataplane::nft::NftCli::default();
    let mut report = weft_dataplane::links::ApplyReport::default();
    weft_dataplane::plan::apply_firewall(&out.plan.firewall, &mut nft, &mut report)?;
    if let Some(guard) = &out.plan.guard {
        weft_dataplane::plan::apply_firewall(guard, &mut nft, &mut report)?;
    }
    // Twenty more, one registration each: the median and the slowest.
    let mut took = Vec::new();
    let mut in_place = Vec::new();
    let mut elements = 0;
    for i in workloads..workloads + 20 {
        let t = Instant::now();
        let tx = aplan::apply_endpoint_changes(&mut out, &res, &[], &[endpoint(i)])
            .ok_or_else(|| anyhow::anyhow!("the registration could not be made in place"))?;
        in_place.push(t.elapsed().as_secs_f64() * 1e3);
        use weft_dataplane::nft::Firewall;
        nft.apply(&tx)?;
        took.push(t.elapsed().as_secs_f64() * 1e3);
        elements =
            tx.0.iter()
                .map(|c| match c {
                    weft_dataplane::nft::Change::AddElements { elements, .. } => elements.len(),
                    _ => 0,
                })
                .sum::<usize>();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (p50, max) = median(&mut took);
    let (in_p50, _) = median(&mut in_place);
    // A resync's table work: every tenth lists both tables and diffs them against the plan
    // (what every resync did before); the others read each table's structure set (no elements).
    let mut full = Vec::new();
    let mut check = Vec::new();
    use weft_dataplane::plan::structure_set_name;
    let inet_mark = structure_set_name(&out.plan.firewall);
    for _ in 0..5 {
        let mut report = weft_dataplane::links::ApplyReport::default();
        let t = Instant::now();
        weft_dataplane::plan::apply_firewall(&out.plan.firewall, &mut nft, &mut report)?;
        if let Some(guard) = &out.plan.guard {
            weft_dataplane::plan::apply_firewall(guard, &mut nft, &mut report)?;
        }
        full.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            report.is_noop(),
            "the resync found changes: {:?}",
            report.changes
        );
        use weft_dataplane::nft::{Family, Firewall};
        let t = Instant::now();
        let inet = nft.set_exists(Family::Inet, "weft", &inet_mark)?;
        let bridge = match &out.plan.guard {
            Some(guard) => nft.set_exists(Family::Bridge, "weft", &structure_set_name(guard))?,
            None => true,
        };
        check.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(inet && bridge, "a table does not hold its structure set");
    }
    let (full_p50, _) = median(&mut full);
    let (check_p50, _) = median(&mut check);
    println!("agent: full plan  {plan_ms:8.1} ms  ({workloads} endpoints, guard table included)");
    println!(
        "agent: resync     {full_p50:8.1} ms  listing both tables (every tenth), {check_p50:.2} ms checking their structure (the others); medians of 5"
    );
    println!(
        "agent: register   {p50:8.2} ms  median of 20, max {max:.2} ms (in place {in_p50:.2} ms, then netlink; {elements} elements each)"
    );
    Ok(())
}

//! The lab file: a LAN with an outside host, nodes, resources (exactly what `kubectl apply`
//! takes), workloads and the expectations checked with real packets.

use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use weft_operator::model::{self, Resources};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabFile {
    /// The LAN and its outside host.
    pub lan: Lan,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Resources inline.
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
    /// Resource files, relative to the lab file.
    #[serde(default)]
    pub resource_files: Vec<PathBuf>,
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Expectations.
    #[serde(default)]
    pub expect: Vec<Expectation>,
}

/// The LAN: a switch with the outside host on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lan {
    /// The outside host's IPv4 address with the LAN prefix; the nodes' default gateway.
    pub gateway: IpNet,
    /// The outside host's IPv6 address, for dual-stack labs.
    #[serde(default)]
    pub gateway6: Option<IpNet>,
    /// Extra listeners on the outside host (`80/tcp`); the ports of expectations that target
    /// `outside` are always listened on.
    #[serde(default)]
    pub listen: Vec<String>,
}

/// A node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its LAN address with prefix.
    pub address: IpNet,
    /// Its IPv6 LAN address.
    #[serde(default)]
    pub address6: Option<IpNet>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The LAN switch shuts this node's port while the node's `eth0` is attached to a bridge
    /// (what BPDU guard or port security do): a Bridge network's uplink takeover on this node
    /// must roll back, and the lab checks that it did and that the node still reaches the LAN.
    #[serde(default)]
    pub port_guard: bool,
}

/// A workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Name (the pod or VM name).
    pub name: String,
    /// Kubernetes namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The node it runs on.
    pub node: String,
    /// `Pod`, or `VM`: a launcher namespace holding the tap weft made, and a guest namespace
    /// behind it (its NIC is a tap the lab's VMM stand-in relays frames to).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// weft networks, one interface each: `eth0`, `net1`, … (one CNI ADD per network, as
    /// Multus delegates them). Leave out when `annotations` has `weft.dev/networks`.
    #[serde(default)]
    pub networks: Vec<String>,
    /// The pod's annotations. `weft.dev/networks: "nat-demo,lan"` makes the lab run a single
    /// CNI ADD that creates every interface, as kubelet would with weft as the cluster's CNI.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Listeners (`80/tcp`, `53/udp`).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Static addresses (CNI_ARGS `IP=`).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Static MAC (CNI_ARGS `MAC=`).
    #[serde(default)]
    pub mac: Option<String>,
    /// Host ports (`runtimeConfig.portMappings`, a pod's `hostPort`):
    /// `{hostPort: 8080, containerPort: 80, protocol: tcp}`, with `hostIP` to use one node
    /// address only.
    #[serde(default)]
    pub host_ports: Vec<weft_dataplane::proto::PortMapping>,
    /// A VM only: live-migrate it to this node once every workload is up (before the
    /// expectations): a target launcher is attached there (pending), the guest switches over and
    /// announces itself, the target activates, the source launcher is removed.
    #[serde(default)]
    pub migrate_to: Option<String>,
    /// A VM only: stop it and start it on this node once every workload is up (before the
    /// expectations), as a VM started again elsewhere: its launcher is deleted, a new one is
    /// attached there and must get the VM's addresses and MAC back, active at once.
    #[serde(default)]
    pub restart_on: Option<String>,
}

impl Workload {
    /// The networks of the `weft.dev/networks` annotation, if it has one.
    pub fn annotated_networks(&self) -> Option<Vec<String>> {
        self.annotations
            .get(weft_dataplane::proto::NETWORKS_ANNOTATION)
            .map(|v| {
                weft_dataplane::proto::parse_networks_annotation(v)
                    .map(|list| list.into_iter().map(|n| n.name).collect())
                    .unwrap_or_default()
            })
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn default_kind() -> String {
    "Pod".into()
}

/// The expected outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The target answers.
    Allow,
    /// The target does not answer.
    Deny,
}

/// Address family of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    #[default]
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// One expectation.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expectation {
    /// `outside`, a node name or a workload name.
    pub from: String,
    /// `outside`, a node name (reaching its port forwards) or a workload name.
    pub to: String,
    /// Destination port (not with `icmp`).
    #[serde(default)]
    pub port: u16,
    /// `tcp`, `udp` or `icmp` (an echo request: ICMP, or ICMPv6 with `family: ipv6`).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Expected outcome.
    pub result: Outcome,
    /// Address family.
    #[serde(default)]
    pub family: Family,
    /// When allowed: the workload (or `outside`) that must answer.
    #[serde(default)]
    pub answered_by: Option<String>,
    /// When allowed: the source address the target must see: `node` (masqueraded to the
    /// source's node), `self` (the source's own address) or a literal address.
    #[serde(default)]
    pub source_seen_as: Option<String>,
    /// Between two pods: to `to`'s IPv6 link-local address on a network both are attached to,
    /// through `from`'s interface there (with `family: ipv6`, TCP or UDP). On a Bridge network
    /// policies judge link-local traffic by the workloads' identity, as their other addresses';
    /// a NAT network's bridge passes it for neighbour discovery alone.
    #[serde(default)]
    pub link_local: bool,
    /// Send with a forged identity (anti-spoofing): exactly one of `ip`, `mac`, `arp`.
    #[serde(default)]
    pub spoof: Option<Spoof>,
    /// Probe right after the CNI ADD of the later-started of `from` and `to` returns, before
    /// any other workload starts: the first packets already meet the policy.
    #[serde(default)]
    pub at_start: bool,
    /// Probe this many times in a row (default 1); the result is the last probe's (a source
    /// over a PortForward's brute-force limit is banned by then).
    #[serde(default = "one")]
    pub repeat: u32,
    /// Workloads (analyzers of a TrafficMirror) that must receive copies of the probe's
    /// frames, captured in their namespace while it runs; `outside`: the outside host as a
    /// remote collector, which must receive them in VXLAN.
    #[serde(default)]
    pub copied_to: Vec<String>,
    /// Workloads that must receive no copy of the probe's frames.
    #[serde(default)]
    pub not_copied_to: Vec<String>,
    /// Before the probe: a bounded flood from `from` to `to`'s port (UDP: each datagram a new
    /// flow from a new source port; TCP: connection attempts), which stops by itself.
    #[serde(default)]
    pub flood: Option<Flood>,
    /// An anomaly the flood must raise (an audit record of the workload's node).
    #[serde(default)]
    pub anomaly: Option<ExpectedAnomaly>,
}

/// A flood of new flows, between the lab's own namespaces only.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Flood {
    /// New flows per second, 1 to 20000.
    pub per_second: u32,
    /// How long, 0.1 to 10 seconds.
    pub seconds: f64,
    /// TCP over IPv4 only: SYNs from random addresses of 198.18.0.0/15 (the benchmarking
    /// range) that never complete their handshake, a spoofed SYN flood, sent from the outside
    /// host (`from: outside`).
    #[serde(default)]
    pub spoofed: bool,
}

/// An anomaly the agent must report.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpectedAnomaly {
    /// The workload it is about.
    pub on: String,
    /// Its kind: `connection-limit`, `conntrack-budget`, `bandwidth`, `packet-rate` or
    /// `connection-rate`.
    pub kind: String,
    /// At the latest this many seconds after the flood started (default 3).
    #[serde(default = "three_seconds")]
    pub detect_within: f64,
}

fn three_seconds() -> f64 {
    3.0
}

impl Expectation {
    /// An echo request rather than a connection.
    pub fn is_icmp(&self) -> bool {
        self.protocol == "icmp"
    }

    /// The protocol the policies see.
    pub fn l4(&self) -> weft_crds::L4Protocol {
        use weft_crds::L4Protocol;
        match (self.protocol.as_str(), self.family) {
            ("udp", _) => L4Protocol::Udp,
            ("icmp", Family::Ipv6) => L4Protocol::Icmpv6,
            ("icmp", Family::Ipv4) => L4Protocol::Icmp,
            _ => L4Protocol::Tcp,
        }
    }
}

/// A forged identity for an expectation.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spoof {
    /// Connect from this address, added to the source's `eth0` for the probe.
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
    /// Connect with this MAC on the source's `eth0` for the probe.
    #[serde(default)]
    pub mac: Option<String>,
    /// Instead of connecting, send an ARP request for the target's address claiming this
    /// sender address; `allow` means the target learned it (a neighbour entry appeared).
    #[serde(default)]
    pub arp: Option<std::net::Ipv4Addr>,
}

impl Spoof {
    /// Which probe this is and what it forges, for the expectation's line: `spoofed ip
    /// 10.30.0.99`, `spoofed mac 02:00:00:00:00:99`, `spoofed arp claim 10.30.0.99` (a file
    /// check makes sure exactly one is set; several are listed all the same).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ip) = self.ip {
            parts.push(format!("spoofed ip {ip}"));
        }
        if let Some(mac) = &self.mac {
            parts.push(format!("spoofed mac {mac}"));
        }
        if let Some(arp) = self.arp {
            parts.push(format!("spoofed arp claim {arp}"));
        }
        parts.join(", ")
    }
}

fn one() -> u32 {
    1
}

fn default_protocol() -> String {
    "tcp".into()
}

/// A listener spec `port/proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listen {
    /// Port.
    pub port: u16,
    /// UDP (else TCP).
    pub udp: bool,
}

impl Listen {
    /// Parses `80/tcp`, `53/udp` or `80` (TCP).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| format!("listen {s:?}: the port is not a number 1-65535"))?;
        let udp = match proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => false,
            "udp" => true,
            other => {
                return Err(format!(
                    "listen {s:?}: protocol {other:?} is not tcp or udp"
                ));
            }
        };
        Ok(Listen { port, udp })
    }
}

impl LabFile {
    /// Reads and checks a lab file; resources from `resourceFiles` are resolved relative to it.
    pub fn load(path: &Path) -> anyhow::Result<(LabFile, Resources, Vec<serde_json::Value>)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read lab file {}: {e}", path.display()))?;
        let mut lab: LabFile = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, w) in lab.workloads.iter_mut().enumerate() {
            if let Some(value) = w
                .annotations
                .get(weft_dataplane::proto::NETWORKS_ANNOTATION)
                && let Err(e) = weft_dataplane::proto::parse_networks_annotation(value)
            {
                anyhow::bail!("workloads[{i}].annotations: {e}");
            }
            if let Some(list) = w.annotated_networks() {
                if !w.networks.is_empty() {
                    anyhow::bail!(
                        "workloads[{i}].networks: leave it out when annotations {} lists the networks",
                        weft_dataplane::proto::NETWORKS_ANNOTATION
                    );
                }
                w.networks = list;
            }
        }
        let mut docs = lab.resources.clone();
        let mut origins: Vec<String> = (0..docs.len()).map(|i| format!("resources[{i}]")).collect();
        let base = path.parent().unwrap_or(Path::new("."));
        for (k, f) in lab.resource_files.iter().enumerate() {
            let p = base.join(f);
            let text = std::fs::read_to_string(&p).map_err(|e| {
                anyhow::anyhow!("resourceFiles[{k}]: cannot read {}: {e}", p.display())
            })?;
            let more: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
                .map_err(|e| anyhow::anyhow!("resourceFiles[{k}]: {}: {e}", p.display()))?;
            for (j, d) in more.into_iter().filter(|d| !d.is_null()).enumerate() {
                docs.push(d);
                origins.push(format!(
                    "resourceFiles[{k}] ({}) document {}",
                    f.display(),
                    j + 1
                ));
            }
        }
        let mut res = Resources::default();
        for (d, origin) in docs.iter().zip(&origins) {
            model::add_document(d.clone(), origin, &mut res);
        }
        let mut errors = lab.errors();
        errors.extend(lab.resource_errors(&res));
        if !errors.is_empty() {
            anyhow::bail!("invalid lab file:\n  {}", errors.join("\n  "));
        }
        Ok((lab, res, docs))
    }

    /// What `kubectl apply` would refuse (a resource that does not parse or breaks a CRD rule) and
    /// the workloads' references to Networks the resources lack. A lab whose policy was dropped
    /// for a typo would check the wrong thing, so these are errors, not warnings.
    pub fn resource_errors(&self, res: &Resources) -> Vec<String> {
        fn name(m: &kube::core::ObjectMeta) -> String {
            match (&m.namespace, &m.name) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                (_, n) => n.clone().unwrap_or_default(),
            }
        }
        let mut errors: Vec<String> = res.problems.clone();
        let mut field_errors =
            |kind: &str,
             meta: &kube::core::ObjectMeta,
             r: Result<(), Vec<weft_crds::FieldError>>| {
                for e in r.err().into_iter().flatten() {
                    errors.push(format!("{kind} {}: {e}", name(meta)));
                }
            };
        for n in &res.networks {
            field_errors("Network", &n.metadata, n.spec.validate());
        }
        for p in &res.port_forwards {
            field_errors("PortForward", &p.metadata, p.spec.validate());
        }
        for p in &res.cluster_policies {
            field_errors("ClusterSegmentationPolicy", &p.metadata, p.spec.validate());
        }
        for p in &res.policies {
            field_errors("SegmentationPolicy", &p.metadata, p.spec.validate());
        }
        let known: Vec<&str> = res
            .networks
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        for (i, w) in self.workloads.iter().enumerate() {
            let field = if w.annotated_networks().is_some() {
                format!(
                    "workloads[{i}].annotations.{}",
                    weft_dataplane::proto::NETWORKS_ANNOTATION
                )
            } else {
                format!("workloads[{i}].networks")
            };
            for (j, n) in w.networks.iter().enumerate() {
                if !known.contains(&n.as_str()) {
                    errors.push(format!(
                        "{field}[{j}]: no Network {n:?} among the resources (Networks: {}); add it under resources or fix the name",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ));
                }
            }
        }
        errors.extend(self.static_address_errors(res));
        errors.extend(self.link_local_errors(res));
        errors
    }

    /// `linkLocal` expectations between pods that meet on a NAT network without an IPv6
    /// subnet (the first of `to`'s networks that `from` is on, as the probe picks it): the CNI
    /// gives such a network's pods no IPv6 address of their own, link-local included (its
    /// bridge passes their link-local traffic for neighbour discovery alone), so there is no
    /// address to probe.
    fn link_local_errors(&self, res: &Resources) -> Vec<String> {
        let networks_of = |name: &str| {
            self.workloads
                .iter()
                .find(|w| w.name == name)
                .map(|w| w.networks.clone())
                .unwrap_or_default()
        };
        let mut errors = Vec::new();
        for (i, e) in self.expect.iter().enumerate().filter(|(_, e)| e.link_local) {
            let mine = networks_of(&e.from);
            let Some(shared) = networks_of(&e.to).into_iter().find(|n| mine.contains(n)) else {
                continue;
            };
            let Some(net) = res
                .networks
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(shared.as_str()))
            else {
                continue;
            };
            if net.spec.mode == weft_crds::NetworkMode::Nat && net.spec.subnet_v6().is_none() {
                errors.push(format!(
                    "expect[{i}].linkLocal: {} and {} meet on NAT network {shared}, which has no IPv6 subnet: its pods have no IPv6 address, link-local included, so there is nothing to probe; probe them on a Bridge network or on one with an IPv6 subnet",
                    e.from, e.to
                ));
            }
        }
        errors
    }

    /// Static addresses (`ips`) that the CNI ADD would refuse: each must lie in the block the
    /// workload's node gets of one of the workload's Networks (node i of the nodes sorted by
    /// name gets block i of each subnet, as the lab's agents assign them).
    fn static_address_errors(&self, res: &Resources) -> Vec<String> {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let mut errors = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let networks: Vec<&weft_crds::Network> = w
                .networks
                .iter()
                .filter_map(|n| {
                    res.networks
                        .iter()
                        .find(|net| net.metadata.name.as_deref() == Some(n.as_str()))
                })
                .collect();
            for (j, ip) in w.ips.iter().enumerate() {
                let field = format!("workloads[{i}].ips[{j}]");
                let subnet_of = |net: &weft_crds::Network| -> Option<IpNet> {
                    match ip {
                        std::net::IpAddr::V4(_) => net.spec.subnet_v4().map(IpNet::V4),
                        std::net::IpAddr::V6(_) => net.spec.subnet_v6().map(IpNet::V6),
                    }
                };
                let Some(net) = networks
                    .iter()
                    .find(|net| subnet_of(net).is_some_and(|s| s.contains(ip)))
                else {
                    let subnets: Vec<String> = networks
                        .iter()
                        .filter_map(|net| {
                            Some(format!(
                                "{} {}",
                                net.metadata.name.as_deref()?,
                                subnet_of(net)?
                            ))
                        })
                        .collect();
                    errors.push(format!(
                        "{field}: {ip} of workload {} is in no subnet of its networks ({}); use an address of one of them",
                        w.name,
                        if subnets.is_empty() { "none of this family".into() } else { subnets.join(", ") }
                    ));
                    continue;
                };
                let name = net.metadata.name.clone().unwrap_or_default();
                let Ok(blocks) =
                    weft_operator::agent::plan::standalone_blocks(net, &nodes, &w.node)
                else {
                    continue; // reported for the Network by the agent's plan
                };
                let block = match ip {
                    std::net::IpAddr::V4(_) => blocks.v4.map(IpNet::V4),
                    std::net::IpAddr::V6(_) => blocks.v6.map(IpNet::V6),
                };
                if let Some(block) = block
                    && !block.contains(ip)
                {
                    errors.push(format!(
                        "{field}: {ip} of workload {} is outside node {}'s block {block} of Network {name} (node i of the nodes sorted by name gets block i of each subnet); use an address of that block",
                        w.name, w.node
                    ));
                }
            }
        }
        errors
    }

    /// Is `name` the outside host or a node (not a workload)?
    pub fn is_host(&self, name: &str) -> bool {
        name == "outside" || self.nodes.iter().any(|n| n.name == name)
    }

    /// The address of `outside` or a node in `family`; `None` for any other name or when the
    /// host has no address of that family.
    pub fn host_address(&self, name: &str, family: Family) -> Option<std::net::IpAddr> {
        let v4 = family == Family::Ipv4;
        let (a4, a6) = if name == "outside" {
            (self.lan.gateway, self.lan.gateway6)
        } else {
            let n = self.nodes.iter().find(|n| n.name == name)?;
            (n.address, n.address6)
        };
        if v4 {
            Some(a4.addr())
        } else {
            a6.map(|a| a.addr())
        }
    }

    /// Cross-checks names and specs; errors name the field.
    pub fn check(&self) -> anyhow::Result<()> {
        let errors = self.errors();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "invalid lab file:\n  {}",
                errors.join("\n  ")
            ))
        }
    }

    /// The errors [`LabFile::check`] reports, each naming its field.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.nodes.is_empty() {
            errors.push("nodes: at least one node is needed".to_string());
        }
        let mut names: Vec<&str> = vec!["outside"];
        for (i, n) in self.nodes.iter().enumerate() {
            if names.contains(&n.name.as_str()) {
                errors.push(format!("nodes[{i}].name: {:?} is used twice", n.name));
            }
            if !valid_name(&n.name) {
                errors.push(format!(
                    "nodes[{i}].name: {:?} must be lowercase letters, digits and '-', at most 20 characters",
                    n.name
                ));
            }
            if !self.lan.gateway.contains(&n.address.addr()) {
                errors.push(format!(
                    "nodes[{i}].address: {} is not on the LAN {}",
                    n.address,
                    self.lan.gateway.trunc()
                ));
            }
            names.push(&n.name);
        }
        for (i, w) in self.workloads.iter().enumerate() {
            if names.contains(&w.name.as_str()) {
                errors.push(format!("workloads[{i}].name: {:?} is used twice", w.name));
            }
            if !valid_name(&w.name) {
                errors.push(format!(
                    "workloads[{i}].name: {:?} must be lowercase letters, digits and '-', at most 20 characters",
                    w.name
                ));
            }
            if !self.nodes.iter().any(|n| n.name == w.node) {
                errors.push(format!("workloads[{i}].node: no node named {:?}", w.node));
            }
            if w.networks.is_empty() {
                errors.push(format!(
                    "workloads[{i}].networks: name at least one network"
                ));
            }
            if let Some(to) = &w.migrate_to {
                if w.kind != "VM" {
                    errors.push(format!(
                        "workloads[{i}].migrateTo: only a VM migrates; set kind: VM or remove migrateTo"
                    ));
                }
                if !self.nodes.iter().any(|n| &n.name == to) || to == &w.node {
                    errors.push(format!(
                        "workloads[{i}].migrateTo: {to:?} is not another node of the lab"
                    ));
                }
            }
            if let Some(to) = &w.restart_on {
                if w.kind != "VM" {
                    errors.push(format!(
                        "workloads[{i}].restartOn: only a VM restarts elsewhere; set kind: VM or remove restartOn"
                    ));
                }
                if !self.nodes.iter().any(|n| &n.name == to) || to == &w.node {
                    errors.push(format!(
                        "workloads[{i}].restartOn: {to:?} is not another node of the lab"
                    ));
                }
                if w.migrate_to.is_some() {
                    errors.push(format!(
                        "workloads[{i}]: migrateTo and restartOn both move the VM; keep one"
                    ));
                }
            }
            if w.kind != "Pod" && w.kind != "VM" {
                errors.push(format!("workloads[{i}].kind: {:?}; use Pod or VM", w.kind));
            }
            for l in &w.listen {
                if let Err(e) = Listen::parse(l) {
                    errors.push(format!("workloads[{i}].{e}"));
                }
            }
            names.push(&w.name);
        }
        for l in &self.lan.listen {
            if let Err(e) = Listen::parse(l) {
                errors.push(format!("lan.{e}"));
            }
        }
        for (i, e) in self.expect.iter().enumerate() {
            for (field, v) in [("from", &e.from), ("to", &e.to)] {
                if !names.contains(&v.as_str()) {
                    errors.push(format!(
                        "expect[{i}].{field}: {v:?} is not outside, a node or a workload"
                    ));
                }
            }
            if !["tcp", "udp", "icmp"].contains(&e.protocol.as_str()) {
                errors.push(format!(
                    "expect[{i}].protocol: {:?} is not tcp, udp or icmp",
                    e.protocol
                ));
            }
            if e.is_icmp() {
                if e.port != 0 {
                    errors.push(format!("expect[{i}].port: icmp has no port; leave it out"));
                }
                if e.spoof.is_some() || e.answered_by.is_some() || e.source_seen_as.is_some() {
                    errors.push(format!(
                        "expect[{i}]: icmp (an echo request) takes none of spoof, answeredBy, sourceSeenAs"
                    ));
                }
            } else if e.port == 0 {
                errors.push(format!(
                    "expect[{i}].port: set the destination port (1-65535)"
                ));
            }
            if let Some(sp) = &e.spoof {
                let n = [sp.ip.is_some(), sp.mac.is_some(), sp.arp.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if n != 1 {
                    errors.push(format!(
                        "expect[{i}].spoof: set exactly one of ip, mac, arp"
                    ));
                }
                if sp
                    .mac
                    .as_deref()
                    .is_some_and(|m| weft_dataplane::names::parse_mac(m).is_none())
                {
                    errors.push(format!(
                        "expect[{i}].spoof.mac: not a MAC address like 02:00:00:00:00:99"
                    ));
                }
                if !self.workloads.iter().any(|w| w.name == e.from) {
                    errors.push(format!(
                        "expect[{i}].spoof: from must be a workload (its eth0 sends the forged packets)"
                    ));
                }
                if let Some(ip) = sp.ip
                    && ip.is_ipv4() != (e.family == Family::Ipv4)
                {
                    errors.push(format!(
                        "expect[{i}].spoof.ip: {ip} is not of the expectation's family {}; set family to match",
                        if e.family == Family::Ipv4 { "ipv4" } else { "ipv6" }
                    ));
                }
                if sp.arp.is_some() && e.family == Family::Ipv6 {
                    errors.push(format!(
                        "expect[{i}].spoof.arp: ARP is IPv4 only; leave out family: ipv6"
                    ));
                }
                if e.at_start {
                    errors.push(format!("expect[{i}]: spoof and atStart do not combine"));
                }
            }
            if e.at_start
                && [&e.from, &e.to]
                    .iter()
                    .any(|n| self.nodes.iter().any(|x| &x.name == *n))
            {
                errors.push(format!(
                    "expect[{i}].atStart: only between workloads and outside, not nodes"
                ));
            }
            if e.link_local {
                let pod = |n: &str| self.workloads.iter().any(|w| w.name == n && w.kind != "VM");
                if e.family != Family::Ipv6 || e.is_icmp() {
                    errors.push(format!(
                        "expect[{i}].linkLocal: needs family: ipv6 and protocol tcp or udp"
                    ));
                }
                if !pod(&e.from) || !pod(&e.to) {
                    errors.push(format!(
                        "expect[{i}].linkLocal: from and to must be pods (a VM's guest interface is not the lab's to read)"
                    ));
                }
                if e.at_start
                    || e.spoof.is_some()
                    || e.flood.is_some()
                    || e.source_seen_as.is_some()
                {
                    errors.push(format!(
                        "expect[{i}].linkLocal: does not combine with atStart, spoof, flood or sourceSeenAs"
                    ));
                }
            }
            if e.family == Family::Ipv6 && self.lan.gateway6.is_none() {
                errors.push(format!(
                    "expect[{i}].family: ipv6 needs lan.gateway6 and node address6"
                ));
            }
            if let Some(by) = &e.answered_by
                && by != "outside"
                && !self.workloads.iter().any(|w| &w.name == by)
            {
                errors.push(format!(
                    "expect[{i}].answeredBy: {by:?} is not outside or a workload"
                ));
            }
            if let Some(f) = &e.flood {
                if !(1..=20_000).contains(&f.per_second) {
                    errors.push(format!(
                        "expect[{i}].flood.perSecond: {} is out of range; use 1 to 20000",
                        f.per_second
                    ));
                }
                if !(0.1..=10.0).contains(&f.seconds) {
                    errors.push(format!(
                        "expect[{i}].flood.seconds: {} is out of range; use 0.1 to 10",
                        f.seconds
                    ));
                }
                if e.is_icmp() || e.spoof.is_some() || e.at_start {
                    errors.push(format!(
                        "expect[{i}].flood: floods are UDP or TCP, without spoof or atStart"
                    ));
                }
                if f.spoofed
                    && (e.protocol != "tcp" || e.family != Family::Ipv4 || e.from != "outside")
                {
                    errors.push(format!(
                        "expect[{i}].flood.spoofed: a spoofed SYN flood is TCP over IPv4 from outside; set protocol: tcp, family: ipv4 and from: outside, or remove spoofed"
                    ));
                }
            }
            if let Some(a) = &e.anomaly {
                if e.flood.is_none() {
                    errors.push(format!(
                        "expect[{i}].anomaly: needs a flood to measure from; add flood"
                    ));
                }
                if !self.workloads.iter().any(|w| w.name == a.on) {
                    errors.push(format!(
                        "expect[{i}].anomaly.on: {:?} is not a workload",
                        a.on
                    ));
                }
                if !(0.1..=60.0).contains(&a.detect_within) {
                    errors.push(format!(
                        "expect[{i}].anomaly.detectWithin: {} is out of range; use 0.1 to 60 seconds",
                        a.detect_within
                    ));
                }
            }
            if let Some(seen) = &e.source_seen_as
                && seen != "node"
                && seen != "self"
                && seen.parse::<std::net::IpAddr>().is_err()
            {
                errors.push(format!(
                    "expect[{i}].sourceSeenAs: {seen:?} is not node, self or an address"
                ));
            }
            if (e.answered_by.is_some() || e.source_seen_as.is_some()) && e.result == Outcome::Deny
            {
                errors.push(format!(
                    "expect[{i}]: answeredBy and sourceSeenAs only go with result: allow"
                ));
            }
        }
        errors
    }
}

/// Parses and checks a lab file's text (the fuzz target and its corpus regression test use it):
/// returns whether it was accepted. Never panics.
pub fn fuzz_parse(text: &str) -> bool {
    match serde_saphyr::from_str::<LabFile>(text) {
        Ok(lab) => lab.check().is_ok(),
        Err(_) => false,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        assert_eq!(
            Listen::parse("80/tcp").unwrap(),
            Listen {
                port: 80,
                udp: false
            }
        );
        assert_eq!(
            Listen::parse("53/UDP").unwrap(),
            Listen {
                port: 53,
                udp: true
            }
        );
        assert_eq!(
            Listen::parse("8080").unwrap(),
            Listen {
                port: 8080,
                udp: false
            }
        );
        assert!(Listen::parse("x/tcp").is_err());
        assert!(Listen::parse("80/icmp").is_err());
    }

    #[test]
    fn bad_names_and_references_are_reported_by_field() {
        let lab: LabFile = serde_saphyr::from_str(
            r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 10.0.0.5/24}]
workloads:
  - {name: w, node: node-z, networks: []}
expect:
  - {from: w, to: nowhere, port: 80, result: allow, family: ipv6}
"#,
        )
        .unwrap();
        let e = lab.check().unwrap_err().to_string();
        assert!(e.contains("nodes[0].address"), "{e}");
        assert!(e.contains("workloads[0].node"), "{e}");
        assert!(e.contains("workloads[0].networks"), "{e}");
        assert!(e.contains("expect[0].to"), "{e}");
        assert!(e.contains("expect[0].family"), "{e}");
    }

    fn load_text(text: &str) -> anyhow::Result<(LabFile, Resources, Vec<serde_json::Value>)> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lab.yaml");
        std::fs::write(&p, text).unwrap();
        LabFile::load(&p)
    }

    #[test]
    fn resources_kubectl_would_refuse_and_unknown_networks_are_errors() {
        let e = load_text(
            r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
resources:
  - {apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {name: nat-demo}, spec: {mode: NAT, subnets: [10.10.0.1/16]}}
  - apiVersion: weft.dev/v1alpha1
    kind: ClusterSegmentationPolicy
    metadata: {name: p}
    spec: {tier: admin, priority: 10, subject: {namespaces: {}}}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: s, namespace: default}
    spec:
      subject: {podSelector: {}}
      ingress: [{name: r, action: Allow, from: [{namespaces: {}, pods: {podSelector: {}}}]}]
workloads:
  - {name: w, node: node-a, networks: [nat-demo, nat-dem]}
  - {name: v, node: node-a, annotations: {weft.dev/networks: "lan"}}
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Network nat-demo: spec.subnets[0]"), "{e}");
        assert!(
            e.contains("resources[1]: invalid ClusterSegmentationPolicy"),
            "{e}"
        );
        assert!(
            e.contains("SegmentationPolicy default/s: spec.ingress[0].from[0]"),
            "{e}"
        );
        assert!(
            e.contains("workloads[0].networks[1]: no Network \"nat-dem\""),
            "{e}"
        );
        assert!(
            e.contains("workloads[1].annotations.weft.dev/networks[0]: no Network \"lan\""),
            "{e}"
        );
    }

    #[test]
    fn link_local_probes_on_a_nat_network_without_ipv6_are_errors() {
        let text = |subnets: &str, mode: &str| {
            format!(
                r#"
lan: {{gateway: 192.168.50.1/24, gateway6: "fd00:50::1/64"}}
nodes: [{{name: node-a, address: 192.168.50.11/24, address6: "fd00:50::11/64"}}]
resources:
  - {{apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {{name: net}}, spec: {{mode: {mode}, subnets: {subnets}}}}}
workloads:
  - {{name: a, node: node-a, networks: [net], listen: [80/tcp]}}
  - {{name: b, node: node-a, networks: [net], listen: [80/tcp]}}
expect:
  - {{from: a, to: b, port: 80, family: ipv6, linkLocal: true, result: deny}}
"#
            )
        };
        let e = load_text(&text("[10.10.0.0/16]", "NAT"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "expect[0].linkLocal: a and b meet on NAT network net, which has no IPv6 subnet"
            ),
            "{e}"
        );
        // With an IPv6 subnet, or on a Bridge network, the pods have their link-local addresses.
        load_text(&text("[10.10.0.0/16, \"fd10::/64\"]", "NAT")).unwrap();
        let bridged = text("[192.168.50.0/24]", "Bridge").replace(
            "subnets: [192.168.50.0/24]",
            "subnets: [192.168.50.0/24], gateway: [192.168.50.1], bridge: {uplink: eth0}",
        );
        load_text(&bridged).unwrap();
    }

    #[test]
    fn static_addresses_outside_the_node_s_block_are_errors() {
        let text = |ip: &str| {
            format!(
                r#"
lan: {{gateway: 192.168.50.1/24}}
nodes: [{{name: node-b, address: 192.168.50.12/24}}, {{name: node-a, address: 192.168.50.11/24}}]
resources:
  - {{apiVersion: weft.dev/v1alpha1, kind: Network, metadata: {{name: nat-demo}}, spec: {{mode: NAT, subnets: [10.10.0.0/16, "fd10::/64"]}}}}
workloads:
  - {{name: w, node: node-b, networks: [nat-demo], ips: [{ip}]}}
"#
            )
        };
        // node-b is second by name: block 10.10.0.64/26 (and fd10::40/122).
        assert!(load_text(&text("10.10.0.70")).is_ok());
        assert!(load_text(&text("\"fd10::41\"")).is_ok());
        let e = load_text(&text("10.10.0.50")).unwrap_err().to_string();
        assert!(
            e.contains("workloads[0].ips[0]: 10.10.0.50 of workload w is outside node node-b's block 10.10.0.64/26 of Network nat-demo"),
            "{e}"
        );
        let e = load_text(&text("\"fd10::5\"")).unwrap_err().to_string();
        assert!(
            e.contains("outside node node-b's block fd10::40/122"),
            "{e}"
        );
        let e = load_text(&text("10.20.0.5")).unwrap_err().to_string();
        assert!(
            e.contains("workloads[0].ips[0]: 10.20.0.5 of workload w is in no subnet of its networks (nat-demo 10.10.0.0/16)"),
            "{e}"
        );
    }

    #[test]
    fn spoof_expectations_say_which_probe_they_are() {
        let spoof = |yaml: &str| serde_saphyr::from_str::<Spoof>(yaml).unwrap().describe();
        assert_eq!(spoof("{ip: 10.30.0.99}"), "spoofed ip 10.30.0.99");
        assert_eq!(
            spoof("{mac: \"02:00:00:00:00:99\"}"),
            "spoofed mac 02:00:00:00:00:99"
        );
        assert_eq!(spoof("{arp: 10.30.0.99}"), "spoofed arp claim 10.30.0.99");
    }

    #[test]
    fn answered_by_and_source_seen_as_are_checked() {
        let lab: LabFile = serde_saphyr::from_str(
            r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
workloads: [{name: w, node: node-a, networks: [n]}]
expect:
  - {from: w, to: outside, port: 80, result: allow, answeredBy: w9, sourceSeenAs: nodes}
  - {from: outside, to: w, port: 80, result: deny, sourceSeenAs: self}
"#,
        )
        .unwrap();
        let e = lab.check().unwrap_err().to_string();
        assert!(e.contains("expect[0].answeredBy: \"w9\""), "{e}");
        assert!(
            e.contains("expect[0].sourceSeenAs: \"nodes\" is not node, self or an address"),
            "{e}"
        );
        assert!(
            e.contains("expect[1]: answeredBy and sourceSeenAs only go with result: allow"),
            "{e}"
        );
    }

    #[test]
    fn a_spoofed_address_has_the_expectation_s_family() {
        let lab: LabFile = serde_saphyr::from_str(
            r#"
lan: {gateway: 192.168.50.1/24, gateway6: "fd00::1/64"}
nodes: [{name: node-a, address: 192.168.50.11/24}]
workloads: [{name: w, node: node-a, networks: [net]}, {name: v, node: node-a, networks: [net]}]
expect:
  - {from: w, to: v, port: 80, result: deny, family: ipv6, spoof: {ip: 10.0.0.9}}
  - {from: w, to: v, port: 80, result: deny, family: ipv6, spoof: {arp: 10.0.0.9}}
  - {from: w, to: v, port: 80, result: deny, family: ipv6, spoof: {ip: "fd00::9"}}
"#,
        )
        .unwrap();
        let e = lab.check().unwrap_err().to_string();
        assert!(
            e.contains("expect[0].spoof.ip: 10.0.0.9 is not of the expectation's family ipv6"),
            "{e}"
        );
        assert!(e.contains("expect[1].spoof.arp: ARP is IPv4 only"), "{e}");
        assert!(!e.contains("expect[2]"), "{e}");
    }

    #[test]
    fn icmp_expectations_take_no_port_and_connections_need_one() {
        let lab: LabFile = serde_saphyr::from_str(
            r#"
lan: {gateway: 192.168.50.1/24}
nodes: [{name: node-a, address: 192.168.50.11/24}]
workloads: [{name: w, node: node-a, networks: [net]}]
expect:
  - {from: w, to: outside, protocol: icmp, result: allow}
  - {from: w, to: outside, protocol: icmp, port: 8, result: allow}
  - {from: w, to: outside, result: allow}
  - {from: w, to: outside, protocol: icmp, result: allow, sourceSeenAs: node}
"#,
        )
        .unwrap();
        let e = lab.check().unwrap_err().to_string();
        assert!(!e.contains("expect[0]"), "{e}");
        assert!(e.contains("expect[1].port: icmp has no port"), "{e}");
        assert!(
            e.contains("expect[2].port: set the destination port"),
            "{e}"
        );
        assert!(
            e.contains("expect[3]: icmp (an echo request) takes none of"),
            "{e}"
        );
        assert_eq!(lab.expect[0].l4(), weft_crds::L4Protocol::Icmp);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<LabFile, _> =
            serde_saphyr::from_str("lan: {gateway: 192.168.50.1/24}\nnodes: []\nworkloadz: []\n");
        assert!(r.is_err());
    }
}

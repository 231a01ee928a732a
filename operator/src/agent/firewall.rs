//! weft's nftables table, as data.
//!
//! The rules are fixed; networks and port forwards only add set and map elements, so adding a
//! forward or a network never adds a rule:
//! - `prerouting`/`output` (nat): traffic to one of the node's own addresses whose
//!   source . protocol . port is in `fwd4`/`fwd6` (single ports, with target port) or
//!   `fwdr4`/`fwdr6` (port ranges, port kept) is DNATed to the workload; then traffic whose
//!   destination . protocol . port is in `hport4`/`hport6` (workloads' host ports on one node
//!   address), or whose protocol . port is in `hportany4`/`hportany6` (host ports on any of
//!   the node's addresses), likewise;
//! - `postrouting` (nat): a NAT network's traffic leaving through a non-weft interface is
//!   masqueraded (never traffic that stays inside a network), and forwarded traffic a workload
//!   sends to a port forward of its own network is masqueraded so the reply comes back the same
//!   way (hairpin);
//! - `forward` (filter): traffic between two different NAT networks is dropped (isolation),
//!   except connections a port forward let in; a Bridge network's bridge counts as outside (it
//!   carries the node's uplink), so NAT traffic leaves through it masqueraded.

use crate::policy::render::cidr_text;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use weft_crds::ConnectionLimits;
use weft_dataplane::names;
use weft_dataplane::nft::{self, BaseChain, Chain, Family, Map, Set, Table};

/// What the table needs to know of one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRules {
    /// The bridge.
    pub bridge: String,
    /// IPv4 subnet.
    pub subnet_v4: Option<Ipv4Net>,
    /// IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// Masquerade egress.
    pub masquerade: bool,
    /// NAT mode: every source on the bridge is a registered workload (fail closed), and the
    /// bridge is isolated from other NAT networks. A Bridge network's bridge also carries the
    /// LAN and the node itself, so it is not sealed: its ports are vetted by the guard table.
    pub sealed: bool,
}

/// One forwarded node port (or range) for one source CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Allowed source.
    pub source: IpNet,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    /// Node port range (start == end for a single port).
    pub node_ports: (u16, u16),
    /// The workload address.
    pub target: IpAddr,
    /// Target port for single ports; `None` keeps the port (ranges).
    pub target_port: Option<u16>,
    /// The PortForward it comes from (`namespace/name`).
    pub owner: String,
    /// Its brute-force guard: new connections a source may open to one node port per minute,
    /// and how long (seconds) a source above that is banned from the port.
    pub guard: Option<(u32, u32)>,
    /// Its SYN proxy (TCP only): the options announced on the workload's behalf.
    pub syn_proxy: Option<SynOptions>,
}

/// The TCP options a SYN proxy announces for the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SynOptions {
    /// Maximum segment size.
    pub mss: u16,
    /// Window scale.
    pub wscale: u8,
}

impl SynOptions {
    /// The defaults for a network of this MTU: its MSS (the MTU less 40 bytes of IPv4 or 60 of
    /// IPv6 headers, at least 536) and window scale 7 (Linux's with its default buffers).
    pub fn for_mtu(mtu: u32, v6: bool) -> SynOptions {
        let headers = if v6 { 60 } else { 40 };
        let min = weft_crds::portforward::MIN_SYN_PROXY_MSS.unsigned_abs();
        SynOptions {
            mss: u16::try_from(mtu.saturating_sub(headers).max(min)).unwrap_or(u16::MAX),
            wscale: u8::try_from(weft_crds::portforward::DEFAULT_WINDOW_SCALE).unwrap_or(7),
        }
    }
}

/// The SYN proxies' sets and rules: one class per distinct [`SynOptions`], with its
/// PortForwards' `source . node ports` (`syn<i>_4`, `syn<i>_6`) and its host ports'
/// `node address . port` (`synh<i>_4`, `synh<i>_6`). A client's SYN to such a port is left
/// untracked (raw prerouting) and answered by the node with a SYN cookie (filter input); only
/// the ACK that completes the handshake makes the kernel open the connection to the node port,
/// as a locally generated SYN that the nat `output` chain forwards (and counts against the
/// brute-force guard and the workload's limits). Returns the sets, the raw prerouting rules and
/// the rules that go first in filter input.
fn syn_proxies(
    forwards: &[Forward],
    host_ports: &[HostPort],
) -> (Vec<Set>, Vec<String>, Vec<String>) {
    // Per class: [forwards v4, v6, host ports v4, v6].
    let mut classes: BTreeMap<SynOptions, [BTreeSet<String>; 4]> = BTreeMap::new();
    for f in forwards.iter().filter(|f| f.protocol == "tcp") {
        if let Some(o) = f.syn_proxy {
            classes.entry(o).or_default()[usize::from(f.target.is_ipv6())].insert(format!(
                "{} . {}",
                cidr_text(&f.source),
                port_text(f.node_ports)
            ));
        }
    }
    for h in host_ports.iter().filter(|h| h.protocol == "tcp") {
        if let Some(o) = h.syn_proxy {
            classes.entry(o).or_default()[2 + usize::from(h.target.is_ipv6())].insert(format!(
                "{} . {}",
                cidr_text(&h.host),
                h.port
            ));
        }
    }
    let (mut sets, mut raw, mut input) = (Vec::new(), Vec::new(), Vec::new());
    let syn = "tcp flags syn / syn,ack,rst,fin fib daddr type local";
    for (i, (o, [f4, f6, h4, h6])) in classes.into_iter().enumerate() {
        // A class's forwards' part and host ports' part each only when it has any.
        let (forwards_too, hosts_too) = (
            !(f4.is_empty() && f6.is_empty()),
            !(h4.is_empty() && h6.is_empty()),
        );
        for (v, ip, key, forwarded, hosted) in [
            ("4", "ip", "ipv4_addr . inet_service", f4, h4),
            ("6", "ip6", "ipv6_addr . inet_service", f6, h6),
        ] {
            let mut matches = Vec::new();
            if forwards_too {
                let name = format!("syn{i}_{v}");
                sets.push(set(&name, key, true, forwarded));
                let matched = format!("{ip} saddr . tcp dport @{name}");
                // A banned source's SYNs never get a cookie (its established connections go
                // on).
                raw.push(format!(
                    "{syn} {matched} {ip} saddr . meta l4proto . th dport @bans{v} drop"
                ));
                raw.push(format!("{syn} {matched} notrack"));
                matches.push(matched);
            }
            if hosts_too {
                let name = format!("synh{i}_{v}");
                sets.push(set(&name, key, true, hosted));
                let matched = format!("{ip} daddr . tcp dport @{name}");
                raw.push(format!("{syn} {matched} notrack"));
                matches.push(matched);
            }
            for m in &matches {
                input.push(format!(
                    "ct state invalid,untracked {m} synproxy mss {} wscale {} timestamp sack-perm",
                    o.mss, o.wscale
                ));
                input.push(format!("ct state invalid,untracked {m} drop"));
            }
        }
    }
    (sets, raw, input)
}

/// The dynamic sets of banned sources, `address . protocol . node port` with a timeout each
/// (IPv4, IPv6): filled by the kernel when a source exceeds a forward's brute-force guard, and
/// kept across agent restarts and every change of the table (weft changes it in place).
pub const BAN_SETS: [&str; 2] = ["bans4", "bans6"];

/// The log prefix of a ban (an audit record with verdict `ban`).
pub const BAN_LOG_PREFIX: &str = "weft bruteforce ban ";

/// The brute-force guards' sets and rules: one class per distinct `(per minute, ban)`, with
/// its forwards per address family (`bfp_<per minute>_<ban>_4`, `…_6`: source . protocol .
/// node ports, as in the forwards' maps) and its rate meters (`bfm_<per minute>_<ban>_4`,
/// `…_6`, dynamic, an element per source address and port that expires after a minute without
/// connections). The sources are part of the key: the forwards of one class may share node
/// ports from disjoint sources (one port from one host, a range around it from a subnet), and
/// an interval set of their ports alone would hold overlapping elements, which the kernel
/// refuses when the table is written whole; elements with their sources overlap no more than
/// the forwards do, and [`Forward::overlaps`] keeps those apart. Both families' sets stay with
/// the class, filled or not, and are named by its values, so another guard coming or going
/// never renames a class (which would restart its meters).
fn brute_force(forwards: &[Forward], log: &str) -> (Vec<Set>, Vec<String>) {
    let mut classes: BTreeMap<(u32, u32), [BTreeSet<String>; 2]> = BTreeMap::new();
    for f in forwards {
        if let Some(g) = f.guard {
            classes.entry(g).or_default()[usize::from(f.source.addr().is_ipv6())].insert(format!(
                "{} . {} . {}",
                cidr_text(&f.source),
                f.protocol,
                port_text(f.node_ports)
            ));
        }
    }
    let mut sets = vec![
        dynamic_set(BAN_SETS[0], "ipv4_addr . inet_proto . inet_service", true),
        dynamic_set(BAN_SETS[1], "ipv6_addr . inet_proto . inet_service", true),
    ];
    let l4 = "meta l4proto { tcp, udp, sctp } fib daddr type local";
    // A banned source's new connections to the port go nowhere.
    let mut rules = vec![
        format!(
            "{l4} ip saddr . meta l4proto . th dport @{} drop",
            BAN_SETS[0]
        ),
        format!(
            "{l4} ip6 saddr . meta l4proto . th dport @{} drop",
            BAN_SETS[1]
        ),
    ];
    for ((per_minute, ban), [v4, v6]) in classes {
        let class = format!("{per_minute}_{ban}");
        for (v, ip, key, guarded) in [
            ("4", "ip", "ipv4_addr . inet_proto . inet_service", v4),
            ("6", "ip6", "ipv6_addr . inet_proto . inet_service", v6),
        ] {
            sets.push(set(&format!("bfp_{class}_{v}"), key, true, guarded));
            sets.push(dynamic_set(&format!("bfm_{class}_{v}"), key, true));
            rules.push(format!(
                "{l4} {ip} saddr . meta l4proto . th dport @bfp_{class}_{v} update @bfm_{class}_{v} {{ {ip} saddr . meta l4proto . th dport timeout 60s limit rate over {per_minute}/minute burst {per_minute} packets }} add @bans{v} {{ {ip} saddr . meta l4proto . th dport timeout {ban}s }} {log} drop"
            ));
        }
    }
    (sets, rules)
}

/// A workload address with connection limits, or (`ip: None`) a limit class that stays in
/// the table without members: a Network's own limits, so that its workloads coming and going
/// change set elements only, never the table's structure (which would take the class's sets
/// out of the table, and its meters and connection counts with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The address; `None` for a standing class.
    pub ip: Option<IpAddr>,
    /// Its limits (at least one set).
    pub limits: ConnectionLimits,
}

/// The ICMPv6 messages of the link itself (neighbour and router discovery, multicast listener
/// discovery), which workloads send from their link-local addresses and no policy judges: the
/// guard table vets those of a workload's port. (Redirects, which connection tracking takes
/// for invalid, are dropped before.)
pub const LINK_ICMPV6: &str = "{ mld-listener-query, mld-listener-report, mld-listener-done, nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report }";
/// A DHCPv6 client's messages to its servers and relays (from its link-local address).
pub const DHCPV6_CLIENT: &str = "ip6 daddr ff02::1:2 udp dport 547";
/// A DHCPv6 server's (or relay's) messages to a client's link-local address; a workload's port
/// sends none (the guard drops them).
pub const DHCPV6_SERVER: &str = "ip6 daddr fe80::/10 udp sport 547 udp dport 546";
/// A DHCPv4 server's (or relay's) messages to its clients' port, by broadcast to a client
/// without an address yet; a workload's port sends none (the guard drops them).
pub const DHCPV4_SERVER_BROADCAST: &str = "udp sport 67 udp dport 68";

/// The set of the addresses of one limit class and family:
/// `lim_r<per second>_c<concurrent>_t<conntrack>_<4|6>`, 0 for no limit. Named by its values,
/// so a workload's registration finds its class without the rest of the plan.
pub fn limit_class_set(l: &ConnectionLimits, v6: bool) -> String {
    format!("lim_{}_{}", limit_class(l), if v6 { "6" } else { "4" })
}

fn limit_class(l: &ConnectionLimits) -> String {
    format!(
        "r{}_c{}_t{}",
        l.new_per_second.unwrap_or(0),
        l.concurrent.unwrap_or(0),
        l.conntrack.unwrap_or(0)
    )
}

/// The dynamic sets that count the connections the limits dropped, per workload address:
/// from the workload (IPv4, IPv6), and to it (an inbound connection over its conntrack
/// budget).
pub const LIMIT_DROP_SETS: [[&str; 2]; 2] =
    [["drops_lo4", "drops_lo6"], ["drops_li4", "drops_li6"]];

/// The connection limits' sets and chains: a `limits` chain, jumped to by every new
/// connection from or to a workload, with the rules of each class (distinct limit values) and
/// family: the class's new-connection meter (`lr_…`, a token bucket per address that expires
/// after a minute idle), its concurrent connections (`lc_…`, `ct count` per address) and its
/// conntrack budget (`lt_…`, `ct count` per address of the connections it opens and receives);
/// a connection over a limit goes to `limit_out` or `limit_in`, which count it per address
/// ([`LIMIT_DROP_SETS`]) and drop it. Adding a workload to an existing class adds one element.
fn limits(limited: &[Limited]) -> (Vec<Set>, Vec<Chain>) {
    let mut classes: BTreeMap<ConnectionLimits, [BTreeSet<String>; 2]> = BTreeMap::new();
    for l in limited.iter().filter(|l| !l.limits.is_none()) {
        let class = classes.entry(l.limits).or_default();
        if let Some(ip) = l.ip {
            class[usize::from(ip.is_ipv6())].insert(ip.to_string());
        }
    }
    let mut sets = Vec::new();
    for names in LIMIT_DROP_SETS {
        sets.push(dynamic_set(names[0], "ipv4_addr", false));
        sets.push(dynamic_set(names[1], "ipv6_addr", false));
    }
    let mut rules = Vec::new();
    for (l, members) in classes {
        let class = limit_class(&l);
        for (v, ip, key) in [(0, "ip", "ipv4_addr"), (1, "ip6", "ipv6_addr")] {
            let f = if v == 1 { "6" } else { "4" };
            let members_set = limit_class_set(&l, v == 1);
            sets.push(set(&members_set, key, false, members[v].clone()));
            if let Some(r) = l.new_per_second {
                sets.push(dynamic_set(&format!("lr_{class}_{f}"), key, true));
                rules.push(format!(
                    "{ip} saddr @{members_set} update @lr_{class}_{f} {{ {ip} saddr timeout 60s limit rate over {r}/second burst {r} packets }} goto limit_out"
                ));
            }
            if let Some(c) = l.concurrent {
                sets.push(dynamic_set(&format!("lc_{class}_{f}"), key, false));
                rules.push(format!(
                    "{ip} saddr @{members_set} add @lc_{class}_{f} {{ {ip} saddr ct count over {c} }} goto limit_out"
                ));
            }
            if let Some(t) = l.conntrack {
                sets.push(dynamic_set(&format!("lt_{class}_{f}"), key, false));
                rules.push(format!(
                    "{ip} saddr @{members_set} add @lt_{class}_{f} {{ {ip} saddr ct count over {t} }} goto limit_out"
                ));
                rules.push(format!(
                    "{ip} daddr @{members_set} add @lt_{class}_{f} {{ {ip} daddr ct count over {t} }} goto limit_in"
                ));
            }
        }
    }
    let drop_chain = |name: &str, sets: [&str; 2], side: &str| Chain {
        name: name.into(),
        base: None,
        rules: vec![
            format!("update @{} {{ ip {side} counter }} drop", sets[0]),
            format!("update @{} {{ ip6 {side} counter }} drop", sets[1]),
        ],
    };
    let chains = vec![
        Chain {
            name: "limits".into(),
            base: None,
            rules,
        },
        drop_chain("limit_out", LIMIT_DROP_SETS[0], "saddr"),
        drop_chain("limit_in", LIMIT_DROP_SETS[1], "daddr"),
    ];
    (sets, chains)
}

/// One host port of a workload (a pod's `hostPort`, the runtime's `portMappings`), for one of
/// the workload's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The node address it is on: one address, or `0.0.0.0/0` / `::/0` for any.
    pub host: IpNet,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// The node's port.
    pub port: u16,
    /// The workload address.
    pub target: IpAddr,
    /// The workload's port.
    pub target_port: u16,
    /// Its SYN proxy (TCP only): the options announced on the workload's behalf.
    pub syn_proxy: Option<SynOptions>,
}

impl Forward {
    /// Would both forwards claim the same packets?
    pub fn overlaps(&self, other: &Forward) -> bool {
        self.protocol == other.protocol
            && self.target.is_ipv4() == other.target.is_ipv4()
            && self.node_ports.0 <= other.node_ports.1
            && other.node_ports.0 <= self.node_ports.1
            && (self.source.contains(&other.source.network())
                || other.source.contains(&self.source.network()))
    }
}

/// `8080` or `8000-8010`.
pub fn port_text(ports: (u16, u16)) -> String {
    if ports.0 == ports.1 {
        ports.0.to_string()
    } else {
        format!("{}-{}", ports.0, ports.1)
    }
}

/// A set the kernel fills (`dynamic`, with per-element timeouts when `timeout`): declared
/// empty, its elements are never compared or rewritten by weft.
pub(crate) fn dynamic_set(name: &str, key_type: &str, timeout: bool) -> Set {
    let mut flags = vec![nft::DYNAMIC_FLAG.into()];
    if timeout {
        flags.push("timeout".into());
    }
    Set {
        name: name.into(),
        key_type: key_type.into(),
        flags,
        elements: BTreeSet::new(),
    }
}

fn set(name: &str, key_type: &str, interval: bool, elements: BTreeSet<String>) -> Set {
    Set {
        name: name.into(),
        key_type: key_type.into(),
        flags: if interval {
            vec!["interval".into()]
        } else {
            vec![]
        },
        elements,
    }
}

fn map(name: &str, key: &str, value: &str, elements: BTreeMap<String, String>) -> Map {
    Map {
        name: name.into(),
        key_type: key.into(),
        value_type: value.into(),
        flags: vec!["interval".into()],
        elements,
    }
}

/// A map whose keys are exact values (a hash map in the kernel).
fn exact_map(name: &str, key: &str, value: &str, elements: BTreeMap<String, String>) -> Map {
    Map {
        flags: Vec::new(),
        ..map(name, key, value, elements)
    }
}

fn base(name: &str, kind: &str, hook: &str, priority: &str, rules: Vec<String>) -> Chain {
    Chain {
        name: name.into(),
        base: Some(BaseChain {
            kind: kind.into(),
            hook: hook.into(),
            priority: priority.into(),
            policy: Some("accept".into()),
        }),
        rules,
    }
}

/// Drops new connections from weft's workloads on this node (`@local4`/`@local6`, through a
/// network's bridge) to the agent's own TCP `ports` (its `/metrics` and probe endpoints): a
/// pod would otherwise reach them through its gateway. Everyone else (the kubelet's probes,
/// Prometheus on the LAN or the node) is unaffected.
pub fn shield_agent_ports(table: &mut Table, ports: &[u16]) {
    if ports.is_empty() {
        return;
    }
    let Some(input) = table.chains.iter_mut().find(|c| c.name == "input") else {
        return;
    };
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // After "iifname != @bridges accept": only traffic from a bridge gets here.
    let at = input
        .rules
        .iter()
        .position(|r| r == "iifname != @bridges accept")
        .map_or(0, |i| i + 1);
    input.rules.splice(
        at..at,
        [
            format!("ip saddr @local4 tcp dport {{ {list} }} drop"),
            format!("ip6 saddr @local6 tcp dport {{ {list} }} drop"),
        ],
    );
}

/// Counts every local workload's new connections per address, opened and received
/// ([`super::anomaly::NEW_CONNECTION_SETS`]), at the head of the `limits` chain: for
/// `--workload-metrics` and a connection-rate anomaly threshold, the only readers. A departed
/// workload's element is purged ([`purge_addresses`]).
pub fn count_new_connections(table: &mut Table) {
    let [out, inn] = super::anomaly::NEW_CONNECTION_SETS;
    let Some(chain) = table.chains.iter_mut().find(|c| c.name == "limits") else {
        return;
    };
    chain.rules.splice(
        0..0,
        [
            format!("ip saddr @local4 update @{} {{ ip saddr counter }}", out[0]),
            format!(
                "ip6 saddr @local6 update @{} {{ ip6 saddr counter }}",
                out[1]
            ),
            format!("ip daddr @local4 update @{} {{ ip daddr counter }}", inn[0]),
            format!(
                "ip6 daddr @local6 update @{} {{ ip6 daddr counter }}",
                inn[1]
            ),
        ],
    );
    for (name, key) in [
        (out[0], "ipv4_addr"),
        (out[1], "ipv6_addr"),
        (inn[0], "ipv4_addr"),
        (inn[1], "ipv6_addr"),
    ] {
        table.sets.push(dynamic_set(name, key, false));
    }
}

/// Forgets what the kernel learned about addresses no workload of this node holds any more:
/// the elements of `gone` in the table's dynamic per-address sets (the limits' meters and
/// `ct count`s, the drop and new-connection counters). The kernel owns those elements and
/// never drops most of them on its own, so a workload that later gets the same address would
/// inherit the old one's counts. Each element is added, then deleted, in one batch: adding an
/// element a set already holds changes nothing, and the delete then always finds it.
/// The same for the per-port sets (the copies' drop counters by port id; in the guard table the
/// forged frames' and the egress meters' counters by port name) and `gone_ports`, the ports no
/// workload of this node has any more.
pub fn purge_addresses(table: &Table, gone: &[IpAddr], gone_ports: &[String]) -> nft::Transaction {
    use nft::{Change, SetKey};
    let mut adds = Vec::new();
    let mut deletes = Vec::new();
    for set in table
        .sets
        .iter()
        .filter(|s| s.flags.iter().any(|f| f == nft::DYNAMIC_FLAG))
    {
        let elements: Vec<String> = match set.key_type.as_str() {
            "ipv4_addr" | "ipv6_addr" => {
                let v6 = set.key_type == "ipv6_addr";
                gone.iter()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .map(IpAddr::to_string)
                    .collect()
            }
            "classid" => gone_ports
                .iter()
                .map(|p| names::classid_text(names::port_id(p)))
                .collect(),
            "ifname" => gone_ports
                .iter()
                .filter_map(|p| nft::ifname_literal(p))
                .collect(),
            _ => continue,
        };
        if elements.is_empty() {
            continue;
        }
        let (table_name, set_name, key) = (table.name.clone(), set.name.clone(), SetKey::of(set));
        adds.push(Change::AddElements {
            family: table.family,
            table: table_name.clone(),
            set: set_name.clone(),
            key: key.clone(),
            elements: elements.clone(),
        });
        deletes.push(Change::DeleteElements {
            family: table.family,
            table: table_name,
            set: set_name,
            key,
            elements,
        });
    }
    adds.extend(deletes);
    nft::Transaction(adds)
}

/// The names of the maps of host ports to workload addresses: on one node address (IPv4,
/// IPv6), then on any of them (IPv4, IPv6). Each is a hash map, its keys exact: an element
/// comes and goes at the cost of one, however many host ports the node has (a key with the
/// node address as a prefix, `0.0.0.0/0` for any, would make an interval map, which nftables
/// keeps as a `pipapo` set and copies whole at every change).
pub const HOST_PORT_MAPS: [&str; 4] = ["hport4", "hport6", "hportany4", "hportany6"];

/// The elements of the host-port maps ([`HOST_PORT_MAPS`], in its order): `node address .
/// protocol . port` → `workload address . port` for a host port on one node address, and
/// `protocol . port` → `workload address . port` for one on any (`0.0.0.0/0`, `::/0`).
pub fn host_port_elements(
    host_ports: &[HostPort],
) -> [BTreeMap<String, String>; HOST_PORT_MAPS.len()] {
    let mut hport: [BTreeMap<String, String>; HOST_PORT_MAPS.len()] = Default::default();
    for h in host_ports {
        let any = h.host.prefix_len() == 0;
        let key = if any {
            format!("{} . {}", h.protocol, h.port)
        } else {
            format!("{} . {} . {}", h.host.addr(), h.protocol, h.port)
        };
        hport[usize::from(h.target.is_ipv6()) + 2 * usize::from(any)]
            .insert(key, format!("{} . {}", h.target, h.target_port));
    }
    hport
}

/// Builds weft's `inet weft` table, with the segmentation policy's sets and chains.
pub fn table(
    nets: &[NetRules],
    forwards: &[Forward],
    host_ports: &[HostPort],
    limited: &[Limited],
    policy: &crate::policy::Compiled,
) -> Table {
    // A bridge whose name cannot be an nft string is left out (with a warning) rather than
    // breaking every transaction of the node.
    let quoted = |s: &str| {
        let literal = nft::ifname_literal(s);
        if literal.is_none() {
            tracing::warn!(bridge = %s, "bridge name cannot be written into nftables; leaving it out");
        }
        literal
    };
    let bridges: BTreeSet<String> = nets.iter().filter_map(|n| quoted(&n.bridge)).collect();
    let sealed: BTreeSet<String> = nets
        .iter()
        .filter(|n| n.sealed)
        .filter_map(|n| quoted(&n.bridge))
        .collect();
    let intra: BTreeSet<String> = nets
        .iter()
        .filter_map(|n| quoted(&n.bridge))
        .map(|b| format!("{b} . {b}"))
        .collect();
    let v4 = |only_masq: bool| -> BTreeSet<String> {
        nets.iter()
            .filter(|n| !only_masq || n.masquerade)
            .filter_map(|n| n.subnet_v4)
            .map(|s| cidr_text(&IpNet::V4(s)))
            .collect()
    };
    let v6 = |only_masq: bool| -> BTreeSet<String> {
        nets.iter()
            .filter(|n| !only_masq || n.masquerade)
            .filter_map(|n| n.subnet_v6)
            .map(|s| cidr_text(&IpNet::V6(s)))
            .collect()
    };
    // The hairpin sources: NAT networks' subnets. A Bridge network's subnet is the LAN's (or a
    // VLAN's): its clients reach a forward through the node and get their answer back the same
    // way, so they keep their address.
    let sealed_v4: BTreeSet<String> = nets
        .iter()
        .filter(|n| n.sealed)
        .filter_map(|n| n.subnet_v4)
        .map(|s| cidr_text(&IpNet::V4(s)))
        .collect();
    let sealed_v6: BTreeSet<String> = nets
        .iter()
        .filter(|n| n.sealed)
        .filter_map(|n| n.subnet_v6)
        .map(|s| cidr_text(&IpNet::V6(s)))
        .collect();
    let mut fwd = [
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
    ];
    for f in forwards {
        let key = format!(
            "{} . {} . {}",
            cidr_text(&f.source),
            f.protocol,
            port_text(f.node_ports)
        );
        let v6 = usize::from(f.target.is_ipv6());
        match f.target_port {
            Some(p) => {
                fwd[v6].insert(key, format!("{} . {p}", f.target));
            }
            None => {
                fwd[2 + v6].insert(key, f.target.to_string());
            }
        }
    }
    let [fwd4, fwd6, fwdr4, fwdr6] = fwd;
    let (guard_sets, guard_rules) = brute_force(
        forwards,
        &format!(
            "log prefix \"{BAN_LOG_PREFIX}\" group {}",
            crate::policy::render::LOG_GROUP
        ),
    );
    let (syn_sets, syn_raw, syn_input) = syn_proxies(forwards, host_ports);
    // The SYN proxy's ACK that completes the workload's handshake leaves with the timestamp
    // option already right, and the kernel's proxy then shifts its echo a second time on the
    // way out to a remote (non-loopback) server: the workload rejects the ACK (TSEcrRejected)
    // and the connection waits a second for its SYN-ACK's retransmission, so a server that
    // speaks first (SSH, SMTP) answers a second late. That ACK is the only locally generated
    // packet with a source address that is not the node's: it leaves without the option (the
    // client's later segments carry it, adjusted once).
    let syn_output: Vec<String> = if syn_input.is_empty() {
        Vec::new()
    } else {
        vec!["tcp flags == ack fib saddr type != local reset tcp option timestamp".into()]
    };
    let [hport4, hport6, hportany4, hportany6] = host_port_elements(host_ports);
    let (limit_sets, limit_chains) = limits(limited);
    let l4 = "meta l4proto { tcp, udp, sctp }";
    let dnat_rules = |local4: &str, local6: &str| -> Vec<String> {
        vec![
            format!(
                "{l4} {local4} dnat ip addr . port to ip saddr . meta l4proto . th dport map @fwd4"
            ),
            format!("{l4} {local4} dnat ip to ip saddr . meta l4proto . th dport map @fwdr4"),
            format!(
                "{l4} {local6} dnat ip6 addr . port to ip6 saddr . meta l4proto . th dport map @fwd6"
            ),
            format!("{l4} {local6} dnat ip6 to ip6 saddr . meta l4proto . th dport map @fwdr6"),
            format!(
                "{l4} {local4} dnat ip addr . port to ip daddr . meta l4proto . th dport map @hport4"
            ),
            format!(
                "{l4} {local6} dnat ip6 addr . port to ip6 daddr . meta l4proto . th dport map @hport6"
            ),
            format!("{l4} {local4} dnat ip addr . port to meta l4proto . th dport map @hportany4"),
            format!("{l4} {local6} dnat ip6 addr . port to meta l4proto . th dport map @hportany6"),
        ]
    };
    Table {
        family: Family::Inet,
        name: names::NFT_TABLE.into(),
        comment: None,
        sets: [
            set("bridges", "ifname", false, bridges),
            set("sealed", "ifname", false, sealed),
            set("intra", "ifname . ifname", false, intra),
            set("nets4", "ipv4_addr", true, sealed_v4),
            set("nets6", "ipv6_addr", true, sealed_v6),
            set("masq4", "ipv4_addr", true, v4(true)),
            set("masq6", "ipv6_addr", true, v6(true)),
        ]
        .into_iter()
        .chain(crate::policy::render::sets(policy))
        .chain(guard_sets)
        .chain(syn_sets)
        .chain(limit_sets)
        .collect(),
        maps: vec![
            map(
                "fwd4",
                "ipv4_addr . inet_proto . inet_service",
                "ipv4_addr . inet_service",
                fwd4,
            ),
            map(
                "fwdr4",
                "ipv4_addr . inet_proto . inet_service",
                "ipv4_addr",
                fwdr4,
            ),
            map(
                "fwd6",
                "ipv6_addr . inet_proto . inet_service",
                "ipv6_addr . inet_service",
                fwd6,
            ),
            map(
                "fwdr6",
                "ipv6_addr . inet_proto . inet_service",
                "ipv6_addr",
                fwdr6,
            ),
            exact_map(
                HOST_PORT_MAPS[0],
                "ipv4_addr . inet_proto . inet_service",
                "ipv4_addr . inet_service",
                hport4,
            ),
            exact_map(
                HOST_PORT_MAPS[1],
                "ipv6_addr . inet_proto . inet_service",
                "ipv6_addr . inet_service",
                hport6,
            ),
            exact_map(
                HOST_PORT_MAPS[2],
                "inet_proto . inet_service",
                "ipv4_addr . inet_service",
                hportany4,
            ),
            exact_map(
                HOST_PORT_MAPS[3],
                "inet_proto . inet_service",
                "ipv6_addr . inet_service",
                hportany6,
            ),
        ],
        chains: vec![
            base(
                "prerouting",
                "nat",
                "prerouting",
                "dstnat",
                // The brute-force guards first: a nat chain sees each connection's first
                // packet only, which is what they count.
                guard_rules
                    .iter()
                    .cloned()
                    .chain(dnat_rules("fib daddr type local", "fib daddr type local"))
                    .collect(),
            ),
            // Node-local clients reaching a forward on one of the node's own addresses
            // (loopback excluded: DNAT from 127.0.0.0/8 would need route_localnet).
            base(
                "output",
                "nat",
                "output",
                // The `dstnat` keyword is only defined for prerouting; -100 is its value.
                "-100",
                // The guards count here too: a SYN proxy's connection to the forward starts
                // as the node's own SYN, once the client has completed its handshake.
                guard_rules
                    .into_iter()
                    .chain(dnat_rules(
                        "fib daddr type local ip daddr != 127.0.0.0/8",
                        "fib daddr type local ip6 daddr != ::1",
                    ))
                    .collect(),
            ),
            base(
                "postrouting",
                "nat",
                "postrouting",
                "srcnat",
                vec![
                    // Leaving through a Bridge network's bridge is leaving the node (the node's
                    // own addresses and routes live there).
                    "ip saddr @masq4 oifname != @sealed masquerade".into(),
                    "ip6 saddr @masq6 oifname != @sealed masquerade".into(),
                    "ct status dnat ip saddr @nets4 oifname @sealed masquerade".into(),
                    "ct status dnat ip6 saddr @nets6 oifname @sealed masquerade".into(),
                    // A port forward to a Bridge network's workload: its client is usually on
                    // the same LAN and would get the answer straight from the workload; the
                    // node answers instead (the workload sees the node's address).
                    "ct status dnat oifname @bridges oifname != @sealed masquerade".into(),
                ],
            ),
            base(
                "forward",
                "filter",
                "forward",
                "filter",
                vec![
                    "ct state established,related accept".into(),
                    "iifname @bridges ct state invalid drop".into(),
                    "oifname @bridges ct state invalid drop".into(),
                    // Neighbour discovery between two ports of a bridge (seen here through
                    // br_netfilter) uses link-local addresses; the guard table vets them.
                    "iifname @bridges icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept".into(),
                    // Fail closed: from a NAT network's bridge, only registered workload
                    // addresses (a Bridge network's ports are held to theirs by the guard
                    // table), and link-local ones for neighbour discovery alone.
                    "iifname @sealed ip saddr != @local4 drop".into(),
                    "iifname @sealed ip6 saddr fe80::/10 drop".into(),
                    "iifname @sealed ip6 saddr != @local6 drop".into(),
                    // The rest of the link's own business on a Bridge network, from link-local
                    // addresses, which are the workloads' too: router discovery, multicast
                    // listeners, and DHCPv6 between a client and a server (the guard table
                    // vets a workload's messages, and drops its router advertisements and
                    // DHCPv6 server messages). Everything else from or to a link-local address
                    // meets the policies as the workloads' other addresses do.
                    format!("iifname @bridges icmpv6 type {LINK_ICMPV6} accept"),
                    format!("iifname @bridges {DHCPV6_CLIENT} accept"),
                    format!("iifname @bridges {DHCPV6_SERVER} accept"),
                    "ct state new jump limits".into(),
                    "jump egress".into(),
                    "jump ingress".into(),
                    // A broadcast's or multicast's copy to a workload's port, tagged with the
                    // port's id by the guard table: the receiver's ingress too. Except a DHCPv4
                    // server's broadcast to clients, the link's own business as DHCPv6's is
                    // (above): no workload's port sends one (the guard drops them).
                    format!("meta pkttype broadcast {DHCPV4_SERVER_BROADCAST} accept"),
                    "meta pkttype { broadcast, multicast } meta priority @clash_p drop".into(),
                    format!(
                        "meta pkttype {{ broadcast, multicast }} meta priority @local_p jump {}",
                        crate::policy::render::COPY_INGRESS
                    ),
                    "ct status dnat accept".into(),
                    "iifname @sealed oifname @sealed iifname . oifname != @intra drop".into(),
                ],
            ),
            // SYN proxies: their clients' SYNs stay untracked (before connection tracking).
            base("raw_prerouting", "filter", "prerouting", "raw", syn_raw),
            // Workloads reaching the node itself: their egress policy (cidrs peers).
            base(
                "input",
                "filter",
                "input",
                "filter",
                syn_input.into_iter().chain([
                    "iifname != @bridges accept".into(),
                    "ct state established,related accept".into(),
                    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept".into(),
                    "iifname @sealed ct state invalid drop".into(),
                    "iifname @sealed ip saddr != @local4 drop".into(),
                    "iifname @sealed ip6 saddr fe80::/10 drop".into(),
                    "iifname @sealed ip6 saddr != @local6 drop".into(),
                    // A Bridge network's workloads: the link's own messages, unjudged.
                    format!("icmpv6 type {LINK_ICMPV6} accept"),
                    format!("{DHCPV6_CLIENT} accept"),
                    // On a Bridge network's bridge, other sources are the LAN reaching the node.
                    "ip saddr != @local4 accept".into(),
                    "ip6 saddr != @local6 accept".into(),
                    "ct state new jump limits".into(),
                    "jump egress".into(),
                ])
                .collect(),
            ),
            // The node reaching its workloads: their ingress policy (cidrs peers).
            base(
                "local_out",
                "filter",
                "output",
                "filter",
                syn_output.into_iter().chain([
                    // A node-local connection DNATed to a workload (a forward on the node's own
                    // address, a SYN proxy's connection to its workload) still shows the output
                    // interface it had before the DNAT here: the workload's limits and ingress
                    // policy apply to it all the same.
                    "oifname != @bridges ct state new ct status dnat jump limits".into(),
                    "oifname != @bridges ct state new ct status dnat jump ingress".into(),
                    "oifname != @bridges accept".into(),
                    "ct state established,related accept".into(),
                    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept".into(),
                    // A DHCPv6 server on the node answering a workload's link-local address.
                    format!("{DHCPV6_SERVER} accept"),
                    "ct state new jump limits".into(),
                    "jump ingress".into(),
                ])
                .collect(),
            ),
        ]
        .into_iter()
        .chain(limit_chains)
        .chain(crate::policy::render::chains(policy))
        .collect(),
    }
}

/// The elements of set `name` of `t` (which must have it); for the tests of the tables.
#[cfg(test)]
pub(crate) fn set_elements(t: &Table, name: &str) -> Vec<String> {
    t.sets
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no set {name}"))
        .elements
        .iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of chain `name` of table `t`.
    fn chain(t: &Table, name: &str) -> Vec<String> {
        t.chains
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .rules
            .clone()
    }

    #[test]
    fn a_dhcp_server_s_broadcast_passes_before_the_receivers_ingress_judges_copies() {
        let t = table(&[], &[], &[], &[], &crate::policy::Compiled::default());
        let forward = chain(&t, "forward");
        let at = |r: &str| forward.iter().position(|x| x == r);
        let dhcp = at("meta pkttype broadcast udp sport 67 udp dport 68 accept").unwrap();
        let copies = forward
            .iter()
            .position(|r| r.contains("jump ingress_copy"))
            .unwrap();
        assert!(dhcp < copies, "{forward:#?}");
        assert!(
            dhcp < at("meta pkttype { broadcast, multicast } meta priority @clash_p drop").unwrap()
        );
    }

    #[test]
    fn only_nat_networks_are_hairpin_sources() {
        let net = |bridge: &str, v4: &str, v6: &str, sealed| NetRules {
            bridge: bridge.into(),
            subnet_v4: Some(v4.parse().unwrap()),
            subnet_v6: Some(v6.parse().unwrap()),
            masquerade: sealed,
            sealed,
        };
        let t = table(
            &[
                net("wn-nat", "10.40.0.0/24", "fd40::/64", true),
                net("wn-lan", "192.168.40.0/24", "fd00:40::/64", false),
            ],
            &[],
            &[],
            &[],
            &crate::policy::Compiled::default(),
        );
        let elements = |name: &str| set_elements(&t, name);
        // A LAN client of a Bridge network on the LAN's subnet keeps its address through a
        // forward into a NAT network.
        assert_eq!(elements("nets4"), vec!["10.40.0.0/24"]);
        assert_eq!(elements("nets6"), vec!["fd40::/64"]);
    }

    #[test]
    fn host_ports_are_elements_of_exact_maps_keyed_by_node_address_or_by_protocol_and_port() {
        let hp = |host: &str, protocol: &str, port, target: &str, target_port| HostPort {
            host: host.parse().unwrap(),
            protocol: protocol.into(),
            port,
            target: target.parse().unwrap(),
            target_port,
            syn_proxy: None,
        };
        let empty = table(&[], &[], &[], &[], &crate::policy::Compiled::default());
        let t = table(
            &[],
            &[],
            &[
                hp("0.0.0.0/0", "tcp", 8080, "10.40.0.2", 80),
                hp("192.0.2.10/32", "udp", 5353, "10.40.0.2", 53),
                hp("::/0", "tcp", 8080, "fd40::2", 80),
            ],
            &[],
            &crate::policy::Compiled::default(),
        );
        let elements = |name: &str| -> Vec<(String, String)> {
            t.maps
                .iter()
                .find(|m| m.name == name)
                .unwrap()
                .elements
                .clone()
                .into_iter()
                .collect()
        };
        assert_eq!(
            elements("hport4"),
            [("192.0.2.10 . udp . 5353".into(), "10.40.0.2 . 53".into())]
        );
        assert_eq!(elements("hport6"), []);
        assert_eq!(
            elements("hportany4"),
            [("tcp . 8080".into(), "10.40.0.2 . 80".into())]
        );
        assert_eq!(
            elements("hportany6"),
            [("tcp . 8080".into(), "fd40::2 . 80".into())]
        );
        // Exact keys: hash maps, whose elements come and go one at a time.
        for name in HOST_PORT_MAPS {
            let m = t.maps.iter().find(|m| m.name == name).unwrap();
            assert!(m.flags.is_empty(), "{name}: {:?}", m.flags);
        }
        assert_eq!(
            weft_dataplane::nft::structure_hash(&empty),
            weft_dataplane::nft::structure_hash(&t),
            "host ports add elements only"
        );
        let pre = &t.chains[0].rules;
        let at = |r: &str| pre.iter().position(|x| x.ends_with(r)).unwrap();
        assert!(
            at("map @fwdr6") < at("map @hport4"),
            "PortForwards come first: {pre:?}"
        );
        assert!(
            at("map @hport4") < at("map @hportany4") && at("map @hport6") < at("map @hportany6"),
            "a host port on one address before those on any: {pre:?}"
        );
        for name in HOST_PORT_MAPS {
            assert!(
                t.chains[1]
                    .rules
                    .iter()
                    .any(|r| r.ends_with(&format!("map @{name}"))),
                "{name} in output too"
            );
        }
    }

    #[test]
    fn a_bridge_name_that_would_escape_an_nft_string_is_left_out() {
        let net = |bridge: &str, v4: &str| NetRules {
            bridge: bridge.into(),
            subnet_v4: Some(v4.parse().unwrap()),
            subnet_v6: None,
            masquerade: true,
            sealed: true,
        };
        let t = table(
            &[
                net("wn-nat", "10.40.0.0/24"),
                net("wn-a\",\"eth0", "10.41.0.0/24"),
            ],
            &[],
            &[],
            &[],
            &crate::policy::Compiled::default(),
        );
        let text = weft_dataplane::nft::render_table(&t);
        assert!(!text.contains("eth0"), "{text}");
        let bridges = &t
            .sets
            .iter()
            .find(|s| s.name == "bridges")
            .unwrap()
            .elements;
        assert_eq!(bridges.iter().collect::<Vec<_>>(), ["\"wn-nat\""]);
    }

    #[test]
    fn workloads_cannot_open_connections_to_the_agent_s_ports() {
        let mut t = table(&[], &[], &[], &[], &crate::policy::Compiled::default());
        let before = t.clone();
        shield_agent_ports(&mut t, &[]);
        assert_eq!(t, before);
        shield_agent_ports(&mut t, &[9465]);
        let input = &t.chains.iter().find(|c| c.name == "input").unwrap().rules;
        assert_eq!(input[0], "iifname != @bridges accept");
        assert_eq!(input[1], "ip saddr @local4 tcp dport { 9465 } drop");
        assert_eq!(input[2], "ip6 saddr @local6 tcp dport { 9465 } drop");
        assert_eq!(input[3], "ct state established,related accept");
        let text = weft_dataplane::nft::render_table(&t);
        assert!(
            text.contains("ip saddr @local4 tcp dport { 9465 } drop"),
            "{text}"
        );
    }

    #[test]
    fn syn_proxies_untrack_their_ports_syns_and_answer_them_before_anything_else() {
        let fwd =
            |port: u16, protocol, source: &str, target: &str, o: Option<SynOptions>| Forward {
                source: source.parse().unwrap(),
                protocol,
                node_ports: (port, port),
                target: target.parse().unwrap(),
                target_port: Some(80),
                owner: "x".into(),
                guard: None,
                syn_proxy: o,
            };
        let policy = crate::policy::Compiled::default();
        let plain = table(
            &[],
            &[fwd(8080, "tcp", "0.0.0.0/0", "10.0.0.2", None)],
            &[],
            &[],
            &policy,
        );
        assert!(chain(&plain, "raw_prerouting").is_empty());
        assert_eq!(chain(&plain, "input")[0], "iifname != @bridges accept");
        let default = SynOptions {
            mss: 1460,
            wscale: 7,
        };
        let small = SynOptions {
            mss: 1400,
            wscale: 7,
        };
        let t = table(
            &[],
            &[
                fwd(8080, "tcp", "0.0.0.0/0", "10.0.0.2", Some(default)),
                fwd(8080, "tcp", "::/0", "fd00::2", Some(default)),
                fwd(8081, "tcp", "192.168.0.0/16", "10.0.0.3", Some(small)),
                // A UDP port is never proxied.
                fwd(5353, "udp", "0.0.0.0/0", "10.0.0.2", Some(default)),
            ],
            &[
                HostPort {
                    host: "0.0.0.0/0".parse().unwrap(),
                    protocol: "tcp".into(),
                    port: 8443,
                    target: "10.0.0.4".parse().unwrap(),
                    target_port: 443,
                    syn_proxy: Some(default),
                },
                HostPort {
                    host: "192.168.1.10/32".parse().unwrap(),
                    protocol: "udp".into(),
                    port: 8443,
                    target: "10.0.0.4".parse().unwrap(),
                    target_port: 443,
                    syn_proxy: Some(default),
                },
            ],
            &[],
            &policy,
        );
        let elements = |name: &str| set_elements(&t, name);
        // Classes in the order of their options.
        assert_eq!(elements("syn0_4"), ["192.168.0.0/16 . 8081"]);
        assert!(elements("syn0_6").is_empty());
        assert_eq!(elements("syn1_4"), ["0.0.0.0/0 . 8080"]);
        assert_eq!(elements("syn1_6"), ["::/0 . 8080"]);
        // Host ports by node address (the TCP one only).
        assert_eq!(elements("synh1_4"), ["0.0.0.0/0 . 8443"]);
        assert!(elements("synh1_6").is_empty());
        assert!(
            !t.sets.iter().any(|s| s.name == "synh0_4"),
            "no host port in class 0"
        );
        let raw = chain(&t, "raw_prerouting");
        assert_eq!(raw.len(), 10);
        assert_eq!(
            raw[5],
            "tcp flags syn / syn,ack,rst,fin fib daddr type local ip saddr . tcp dport @syn1_4 notrack"
        );
        assert_eq!(
            raw[6],
            "tcp flags syn / syn,ack,rst,fin fib daddr type local ip daddr . tcp dport @synh1_4 notrack"
        );
        // A banned source is dropped before it is untracked.
        assert!(raw[4].ends_with("ip saddr . meta l4proto . th dport @bans4 drop"));
        let input = chain(&t, "input");
        assert_eq!(
            input[4],
            "ct state invalid,untracked ip saddr . tcp dport @syn1_4 synproxy mss 1460 wscale 7 timestamp sack-perm"
        );
        assert_eq!(
            input[5],
            "ct state invalid,untracked ip saddr . tcp dport @syn1_4 drop"
        );
        assert_eq!(
            input[6],
            "ct state invalid,untracked ip daddr . tcp dport @synh1_4 synproxy mss 1460 wscale 7 timestamp sack-perm"
        );
        assert!(input[0].contains("@syn0_4 synproxy mss 1400 wscale 7"));
        assert_eq!(input[12], "iifname != @bridges accept");
        // The agent's shield still goes right after the bridge test.
        let mut shielded = t.clone();
        shield_agent_ports(&mut shielded, &[9465]);
        assert_eq!(
            chain(&shielded, "input")[13],
            "ip saddr @local4 tcp dport { 9465 } drop"
        );
        // The proxy's own ACK to the workload leaves without its timestamp option.
        assert_eq!(
            chain(&t, "local_out")[0],
            "tcp flags == ack fib saddr type != local reset tcp option timestamp"
        );
        assert_eq!(
            chain(&plain, "local_out")[..3],
            [
                "oifname != @bridges ct state new ct status dnat jump limits",
                "oifname != @bridges ct state new ct status dnat jump ingress",
                "oifname != @bridges accept"
            ]
        );
        let text = weft_dataplane::nft::render_table(&t);
        assert!(
            text.contains("type filter hook prerouting priority raw"),
            "{text}"
        );
    }

    #[test]
    fn brute_force_guards_share_a_class_per_limit_and_ban_sources_per_port() {
        let fwd = |port: u16, guard: Option<(u32, u32)>| Forward {
            source: "0.0.0.0/0".parse().unwrap(),
            protocol: "tcp",
            node_ports: (port, port),
            target: "10.0.0.2".parse().unwrap(),
            target_port: Some(22),
            owner: "x".into(),
            guard,
            syn_proxy: None,
        };
        let policy = crate::policy::Compiled::default();
        let plain = table(&[], &[fwd(2222, None)], &[], &[], &policy);
        let set_names = |t: &Table| -> Vec<String> {
            t.sets
                .iter()
                .filter(|s| s.name.starts_with("b"))
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(set_names(&plain), ["bridges", "bans4", "bans6"]);
        let guarded = table(
            &[],
            &[
                fwd(2222, Some((10, 600))),
                fwd(2223, Some((10, 600))),
                fwd(3389, Some((5, 3600))),
            ],
            &[],
            &[],
            &policy,
        );
        assert_eq!(
            set_names(&guarded),
            [
                "bridges",
                "bans4",
                "bans6",
                "bfp_5_3600_4",
                "bfm_5_3600_4",
                "bfp_5_3600_6",
                "bfm_5_3600_6",
                "bfp_10_600_4",
                "bfm_10_600_4",
                "bfp_10_600_6",
                "bfm_10_600_6"
            ]
        );
        let ports = |name: &str| {
            guarded
                .sets
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .elements
                .clone()
        };
        assert_eq!(
            ports("bfp_5_3600_4").into_iter().collect::<Vec<_>>(),
            ["0.0.0.0/0 . tcp . 3389"]
        );
        assert_eq!(
            ports("bfp_10_600_4").into_iter().collect::<Vec<_>>(),
            ["0.0.0.0/0 . tcp . 2222", "0.0.0.0/0 . tcp . 2223"]
        );
        assert!(ports("bfp_10_600_6").is_empty());
        let bans = guarded.sets.iter().find(|s| s.name == "bans4").unwrap();
        assert!(bans.flags.contains(&nft::DYNAMIC_FLAG.to_string()));
        let pre = &guarded.chains[0].rules;
        assert!(
            pre[0].ends_with("ip saddr . meta l4proto . th dport @bans4 drop"),
            "{pre:?}"
        );
        assert!(
            pre.iter().any(|r| r.contains("ip6 saddr . meta l4proto . th dport @bfp_10_600_6 update @bfm_10_600_6 { ip6 saddr . meta l4proto . th dport timeout 60s limit rate over 10/minute burst 10 packets } add @bans6 { ip6 saddr . meta l4proto . th dport timeout 600s }")),
            "{pre:?}"
        );
        // The guards come before the forwards' DNAT.
        let first_dnat = pre.iter().position(|r| r.contains("dnat")).unwrap();
        assert!(pre.iter().rposition(|r| r.contains("@bans")).unwrap() < first_dnat);
        // A forward added to an existing class changes elements only.
        let more = table(
            &[],
            &[
                fwd(2222, Some((10, 600))),
                fwd(2223, Some((10, 600))),
                fwd(2224, Some((10, 600))),
                fwd(3389, Some((5, 3600))),
            ],
            &[],
            &[],
            &policy,
        );
        assert_eq!(
            weft_dataplane::nft::structure_hash(&guarded),
            weft_dataplane::nft::structure_hash(&more)
        );
        // A guard with a new limit, sorted before the others, renames none of them: their
        // meters (the kernel's counts per source) stay.
        let stricter = table(
            &[],
            &[
                fwd(2222, Some((10, 600))),
                fwd(2223, Some((10, 600))),
                fwd(3389, Some((5, 3600))),
                fwd(2200, Some((3, 60))),
            ],
            &[],
            &[],
            &policy,
        );
        let meter_rule = |t: &Table, name: &str| {
            t.chains[0]
                .rules
                .iter()
                .find(|r| r.contains(&format!("update @{name} ")))
                .cloned()
        };
        for name in set_names(&guarded).iter().filter(|n| n.starts_with("bfm")) {
            assert!(meter_rule(&guarded, name).is_some(), "{name}");
            assert_eq!(
                meter_rule(&guarded, name),
                meter_rule(&stricter, name),
                "{name} counts for another guard now"
            );
        }
    }

    #[test]
    fn a_guard_class_keys_its_ports_by_source_so_forwards_with_disjoint_sources_never_overlap() {
        let fwd = |source: &str, ports: (u16, u16), target: &str| Forward {
            source: source.parse().unwrap(),
            protocol: "tcp",
            node_ports: ports,
            target: target.parse().unwrap(),
            target_port: (ports.0 == ports.1).then_some(22),
            owner: "x".into(),
            guard: Some((10, 600)),
            syn_proxy: None,
        };
        // One port from one host and a range around it from a subnet: both valid, neither
        // overlaps the other (their sources are disjoint). An IPv6-only forward in the same
        // class.
        let forwards = [
            fwd("10.99.0.0/16", (2200, 2300), "10.0.0.3"),
            fwd("192.168.50.1/32", (2222, 2222), "10.0.0.2"),
            fwd("fd00:50::/64", (2222, 2222), "fd00::2"),
        ];
        for (i, a) in forwards.iter().enumerate() {
            for b in &forwards[i + 1..] {
                assert!(!a.overlaps(b), "{a:?} {b:?}");
            }
        }
        let t = table(
            &[],
            &forwards,
            &[],
            &[],
            &crate::policy::Compiled::default(),
        );
        let chain = |name: &str| chain(&t, name);
        let set = |name: &str| t.sets.iter().find(|s| s.name == name);
        assert!(set("bfp_10_600").is_none(), "no set without sources");
        let v4 = set("bfp_10_600_4").unwrap();
        assert_eq!(v4.key_type, "ipv4_addr . inet_proto . inet_service");
        assert_eq!(v4.flags, ["interval"]);
        assert_eq!(
            v4.elements.iter().collect::<Vec<_>>(),
            [
                "10.99.0.0/16 . tcp . 2200-2300",
                "192.168.50.1 . tcp . 2222"
            ]
        );
        let v6 = set("bfp_10_600_6").unwrap();
        assert_eq!(v6.key_type, "ipv6_addr . inet_proto . inet_service");
        assert_eq!(
            v6.elements.iter().collect::<Vec<_>>(),
            ["fd00:50::/64 . tcp . 2222"]
        );
        // Each family's rule looks its own set up by source, protocol and port; the meters and
        // bans stay per source address and node port.
        let pre = chain("prerouting");
        for (v, ip) in [("4", "ip"), ("6", "ip6")] {
            let want = format!(
                "meta l4proto {{ tcp, udp, sctp }} fib daddr type local {ip} saddr . meta l4proto . th dport @bfp_10_600_{v} update @bfm_10_600_{v} {{ {ip} saddr . meta l4proto . th dport timeout 60s limit rate over 10/minute burst 10 packets }} add @bans{v} {{ {ip} saddr . meta l4proto . th dport timeout 600s }}"
            );
            assert!(pre.iter().any(|r| r.starts_with(&want)), "{want}\n{pre:?}");
        }
        assert_eq!(chain("output")[..4], pre[..4], "the same guards");
        // The class's sets stay when its last forward of a family goes: elements change only.
        let fewer = table(
            &[],
            &forwards[..2],
            &[],
            &[],
            &crate::policy::Compiled::default(),
        );
        assert_eq!(
            weft_dataplane::nft::structure_hash(&t),
            weft_dataplane::nft::structure_hash(&fewer)
        );
    }

    #[test]
    fn overlap_needs_same_protocol_family_ports_and_sources() {
        let f = |src: &str, proto, a, b, target: &str| Forward {
            source: src.parse().unwrap(),
            protocol: proto,
            node_ports: (a, b),
            target: target.parse().unwrap(),
            target_port: None,
            owner: "x".into(),
            guard: None,
            syn_proxy: None,
        };
        let base = f("0.0.0.0/0", "tcp", 8000, 8010, "10.0.0.2");
        assert!(base.overlaps(&f("10.0.0.0/8", "tcp", 8010, 8010, "10.0.0.3")));
        assert!(!base.overlaps(&f("0.0.0.0/0", "udp", 8000, 8010, "10.0.0.3")));
        assert!(!base.overlaps(&f("0.0.0.0/0", "tcp", 8011, 8020, "10.0.0.3")));
        assert!(!base.overlaps(&f("::/0", "tcp", 8000, 8000, "fd00::3")));
        let narrow = f("192.168.1.0/24", "tcp", 80, 80, "10.0.0.2");
        assert!(!narrow.overlaps(&f("192.168.2.0/24", "tcp", 80, 80, "10.0.0.3")));
    }
}

//! Per-port anti-spoofing for weft's bridges: the `bridge weft` nftables table, as data.
//!
//! The rules are fixed; ports only change set elements, so registering or removing a workload
//! is an element diff, never a table replace:
//! - `bridges` (`ifname`): weft's bridges (see [`UNREGISTERED_SCOPE`] for why no rule reads it
//!   on kernels without `CONFIG_NFT_BRIDGE_META`);
//! - `ports` (`ifname`): host-side ports with anti-spoofing on;
//! - `open` (`ifname`): ports of networks with `spec.security.antiSpoofing: false`;
//! - `macs` (`ifname . ether_addr`): the MAC each guarded port's workload uses;
//! - `ips4` (`ifname . ipv4_addr`), `ips6` (`ifname . ipv6_addr`): its addresses; `ips6` also
//!   holds the EUI-64 link-local address derived from the MAC;
//! - `targets6` (`typeof iifname . @th,64,128`): the addresses of `ips6` again, as 128-bit
//!   integers (`"wfa" . 0xfd770000000000000000000000000002`), for the target address of
//!   neighbour discovery. nft 1.0.6 has no `icmpv6 taddr`, and the raw payload `@th,64,128` is
//!   an integer, which nft refuses to compare with an `ifname . ipv6_addr` set;
//! - `lladdrs` (`typeof iifname . @th,208,48`): the MAC again, as a 48-bit integer
//!   (`"wfa" . 0x0a580a4d0002`), for the link-layer address options of neighbour discovery;
//! - `pending` (`ifname`): live migration targets that wait for their VM (see
//!   [`PortGuard::pending`]);
//! - `trunks` (`typeof iifname . vlan id`): the VLANs each trunk port may send tagged (its
//!   attachment's `vlanTrunk`, on a network with `spec.bridge.vlanFiltering`), one element per
//!   VLAN (`"wfa" . 20`);
//! - `hairpin` (`ifname . ifname`): each port paired with itself (`"wfa" . "wfa"`), guarded and
//!   open alike;
//! - `bw_<bytes per second>_<burst bytes>` (`ifname`): the ports of one egress meter class, and
//!   `bwm_…` its meter (see [`Policing`]).
//!
//! One base chain, `prerouting` (`type filter hook prerouting priority filter`, -200 in the
//! bridge family, before br_netfilter's hooks at 0), sees every frame a bridge port receives,
//! in this order:
//! 1. frames of ports that are not weft's pass untouched;
//! 2. a port in a meter class: a frame over its egress rate is counted and dropped
//!    ([`POLICE_DROP_CHAIN`]); then ports in `open` pass unchecked;
//! 3. a weft port in neither `ports` nor `open` (not registered yet) is dropped: fail closed;
//! 4. guarded ports: an 802.1Q tagged frame passes only on a trunk port, for one of that port's
//!    `trunks` VLANs, from the port's own MAC (a tagged frame of the network's own VLAN, or
//!    priority-tagged, is dropped: it would dodge the checks below); no IP-level check looks
//!    inside it. Other tagged frames (802.1ad too) are dropped, and so is every ethertype but
//!    IPv4, ARP and IPv6 (PPPoE or MPLS could carry IP the checks below never see);
//! 5. the source MAC, the ARP sender MAC and sender IP, and the IPv4 source must be the port's;
//!    DHCPv4 server messages (anything to udp port 68, the client port, whatever its source
//!    port) are dropped;
//! 6. neighbour discovery ([`ND_RULES`]): router and neighbour solicitations and neighbour
//!    advertisements carry no extension header and at most one option; the target of a
//!    neighbour advertisement, and of a duplicate address detection probe, must be one of the
//!    port's IPv6 addresses; a link-layer address option must carry the port's MAC;
//! 7. IPv6 from `::` passes only as a DAD neighbour solicitation (or the MLDv2 report a host
//!    sends while its link-local address is still tentative); any other IPv6 source must be
//!    the port's, link-local included;
//! 8. router advertisements, redirects and DHCPv6 server messages (anything to udp port 546,
//!    the client port) are dropped.
//!
//! A second base chain, `forward`, drops what goes to a pending port, and the broadcasts and
//! multicasts a port would get back from itself: workload ports are in hairpin mode, so that
//! a workload reaches itself through the node's port forwards (the DNATed packet leaves
//! through the port it came in on), and the bridge would otherwise flood a port's own ARP
//! requests and neighbour solicitations (a duplicate address probe included) back to it. It
//! then tags every other broadcast's or multicast's copy leaving a workload's port with the
//! port's id from the map `port_ids` ([`COPY_TAG_RULE`]), so that the `inet` table judges the
//! copy as that receiver's ingress.
//!
//! So a workload can neither announce another workload's IPv6 address as its own (the IPv6
//! counterpart of an ARP reply with a foreign sender IP) nor point its own address at another
//! MAC. Neighbour solicitations for other addresses (address resolution, not from `::`) are
//! questions, not claims, and pass. A workload that answers for addresses not its own (proxy
//! NDP, like any foreign source) needs a network with anti-spoofing off.

use super::firewall::dynamic_set;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use weft_dataplane::names;
use weft_dataplane::nft::{self, BaseChain, Chain, Family, Map, Set, Table};
use weft_dataplane::proto::Rate;

/// One guarded bridge port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGuard {
    /// The host-side port (the veth end enslaved to the bridge), e.g. `wf0123456789a`.
    pub ifname: String,
    /// The MAC the workload uses on the other end of the port (not the host end's MAC): the
    /// raw bytes, as [`names::workload_mac`] returns them and `Netlink::set_mac` takes them.
    pub mac: [u8; 6],
    /// The workload's addresses on this port; the EUI-64 link-local address is added by
    /// [`table`], do not list it.
    pub ips: Vec<IpAddr>,
    /// A live migration's target port: nothing passes it, either way, until the VM announces
    /// itself there (its RARP is logged with [`ACTIVATE_PREFIX`] for the agent) or the agent
    /// activates it because the source is gone.
    pub pending: bool,
    /// The VLAN IDs the port may send tagged (a trunk port's `vlanTrunk`); empty for an
    /// access port, which sends untagged frames only.
    pub vlans: Vec<u16>,
}

/// The log prefix of a pending port's RARP (QEMU's announcement when a migrated VM resumes).
pub const ACTIVATE_PREFIX: &str = "weft activate ";

/// What the first rule uses to tell weft's ports from other bridges' ports.
///
/// `meta ibrname @bridges` (the input port's bridge) would be exact, but it needs the kernel's
/// `nft_meta_bridge` (`CONFIG_NFT_BRIDGE_META`); without it nft rejects the rule with
/// "Operation not supported", and the whole table with it. Every port weft enslaves to its
/// bridges is a host veth named `wf…` ([`names::HOST_VETH_PREFIX`]), and weft never enslaves
/// them to other bridges, so the name prefix is the equivalent that works on every kernel.
/// The `bridges` set is kept (it names the bridges this table is for) so the rule can become
/// `meta ibrname != @bridges accept` without a structure change elsewhere.
pub const UNREGISTERED_SCOPE: &str = "iifname != \"wf*\" accept";

fn set(name: &str, key_type: &str, elements: BTreeSet<String>) -> Set {
    Set {
        name: name.into(),
        key_type: key_type.into(),
        flags: vec![],
        elements,
    }
}

/// An interface name as an nft string, or `None` (with a warning) when it cannot be one. A
/// port left out of the table is not in `ports` or `open`, so the guard drops its frames (fail
/// closed).
fn quoted(s: &str) -> Option<String> {
    let literal = nft::ifname_literal(s);
    if literal.is_none() {
        tracing::warn!(ifname = %s, "interface name cannot be written into nftables; leaving it out");
    }
    literal
}

/// An IPv6 address as the 128-bit integer of a `targets6` element: `0x` and 32 hex digits.
fn ipv6_integer(ip: Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(ip))
}

/// A MAC as the 48-bit integer of an `lladdrs` element: `0x` and 12 hex digits.
fn mac_integer(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("0x{:012x}", u64::from_be_bytes([0, 0, a, b, c, d, e, f]))
}

pub use weft_dataplane::names::eui64_link_local;

/// The neighbour discovery rules of `prerouting` (step 6 of the module doc), after the IPv4
/// checks and before the DAD exception for `::`.
///
/// The target address is at bit 64 of a neighbour solicitation or advertisement, after type,
/// code, checksum and 32 bits of flags; options follow at bit 192, a link-layer address option
/// as type (1 source, 2 target), length 1 (8 bytes) and the MAC at bit 208; a router
/// solicitation has its options at bit 64. An option is read only where it is the only one,
/// which the length checks make the only legitimate case: without extension headers
/// `ip6 length` is the ICMPv6 length, 24 bytes of solicitation or advertisement (8 of router
/// solicitation) plus 8 for the option. More options (SEND's, or an unknown option before a
/// link-layer address one, which receivers skip) could hide a second link-layer address the
/// rules never read, so they are dropped; no stack sends extension headers with neighbour
/// discovery (fragments are forbidden, RFC 6980). A message too short to hold the target fails
/// the payload read and passes these rules, but every receiver discards it (RFC 4861 7.1).
pub const ND_RULES: [&str; 7] = [
    // 58 is ICMPv6: a number, so that nft needs no /etc/protocols (minimal images have none).
    "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 nexthdr != 58 drop",
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 length > 32 drop",
    "icmpv6 type nd-router-solicit ip6 length > 16 drop",
    // Announcing another workload's address would take its traffic.
    "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @targets6 drop",
    // Probing for another workload's tentative address makes it give the address up.
    "ip6 saddr :: icmpv6 type nd-neighbor-solicit iifname . @th,64,128 != @targets6 drop",
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 length 32 @th,192,8 { 1, 2 } iifname . @th,208,48 != @lladdrs drop",
    "icmpv6 type nd-router-solicit ip6 length 16 @th,64,8 1 iifname . @th,80,48 != @lladdrs drop",
];

/// The map of every workload port's id ([`names::port_id`], as a `classid`), by port name.
pub const PORT_IDS_MAP: &str = "port_ids";

/// Tags a broadcast's or multicast's copy leaving a workload's port with the port's id, in the
/// packet's priority: the copies of one frame are judged in the `inet` table (which
/// br_netfilter hands each of them, but with the bridge's name for output interface) as the
/// receiver's ingress by that id, since their destination names no workload. Not the mark:
/// kube-proxy masquerades packets carrying its mark bit, and every copy crosses the `inet`
/// postrouting hook too. A copy out of any other port (the uplink) is left as it is.
pub const COPY_TAG_RULE: &str =
    "meta pkttype { broadcast, multicast } meta priority set oifname map @port_ids";

/// The `forward` rule that keeps a hairpin port's own broadcasts and multicasts from coming
/// back to it.
pub const HAIRPIN_FLOOD_RULE: &str =
    "meta pkttype { broadcast, multicast } iifname . oifname @hairpin drop";

/// The `forward` rules that keep from a guarded port the copies of questions it cannot answer
/// and of reports meant for multicast routers, before the copies are tagged and judged (every
/// copy the bridge floods otherwise crosses br_netfilter's `inet` hooks and the workload's
/// stack): a cost of every pod's start (its duplicate address detection, MLD reports and router
/// solicitations) that grows with the ports on the bridge, and neighbour questions that tell
/// every workload who talks to whom. Lossless, because the guard's `prerouting` checks decide
/// what a guarded port may answer:
/// - an ARP request goes only to the port that holds the address asked for (a guarded port's
///   ARP carries its own sender address). A gratuitous ARP (the sender's own address asked
///   for) goes to no guarded port: a guarded workload's address keeps its MAC while it holds
///   the address (the checks see to it), and an entry left from an address's earlier holder
///   is corrected by the kernel's reachability probes, which reach the new holder;
/// - a neighbour solicitation likewise (a guarded port's advertisements name its own
///   addresses as target), a duplicate address probe included;
/// - a router solicitation to no guarded port (its router advertisements are dropped);
/// - MLD and IGMP membership reports and leaves only to the ports that have sent a query or a
///   PIM message in the last [`MROUTER_TIMEOUT`] (set [`MROUTERS_SET`]), as a snooping switch
///   sends them only to its multicast router ports (RFC 4541, 2.1.1).
///
/// Open ports (anti-spoofing off) and the uplink get every copy, as before.
pub const QUESTION_RULES: [&str; 5] = [
    "oifname @ports arp operation request oifname . arp daddr ip != @ips4 drop",
    "oifname @ports icmpv6 type nd-neighbor-solicit oifname . @th,64,128 != @targets6 drop",
    "oifname @ports icmpv6 type nd-router-solicit drop",
    "oifname @ports icmpv6 type { mld-listener-report, mld-listener-done, mld2-listener-report } oifname != @mrouters drop",
    "oifname @ports igmp type { membership-report-v1, membership-report-v2, membership-report-v3, leave-group } oifname != @mrouters drop",
];

/// The dynamic set of the ports that act as multicast routers (see [`QUESTION_RULES`]).
pub const MROUTERS_SET: &str = "mrouters";

/// How long a port stays a multicast router after its last query or PIM message: the other
/// querier present interval of MLDv2 and IGMPv3 with their defaults (RFC 3810 9.5, RFC 3376
/// 8.5: robustness 2 × query interval 125 s + half the response interval).
pub const MROUTER_TIMEOUT: &str = "255s";

/// The last rules of `prerouting`, for a registered port's frames that passed every check:
/// a query or a PIM message makes its port a multicast router ([`MROUTERS_SET`]). 103 is PIM,
/// a number, as 58 for ICMPv6 in [`ND_RULES`].
fn mrouter_rules() -> [String; 3] {
    let update = format!("update @{MROUTERS_SET} {{ iifname timeout {MROUTER_TIMEOUT} }}");
    [
        format!("icmpv6 type mld-listener-query {update}"),
        format!("igmp type membership-query {update}"),
        format!("meta l4proto 103 {update}"),
    ]
}

/// The chain every forged frame of a registered port goes to: it counts the frame in the
/// port's element of the dynamic set [`DROPS_SET`] (the kernel adds the element at the first
/// drop), then drops it.
pub const DROP_CHAIN: &str = "guard_drop";
/// The dynamic set of the drops of [`DROP_CHAIN`]: `iifname` → packets and bytes dropped.
pub const DROPS_SET: &str = "drops";

/// The chain the frames over a port's egress rate go to: it counts them in the port's element
/// of the dynamic set [`POLICE_DROPS_SET`], then drops them.
pub const POLICE_DROP_CHAIN: &str = "police_drop";
/// The dynamic set of the drops of [`POLICE_DROP_CHAIN`]: `iifname` → packets and bytes.
pub const POLICE_DROPS_SET: &str = "police_drops";

/// The egress limits this table polices (the ports of Networks with `egressBandwidthMode:
/// Police`).
///
/// Ports of one rate and burst form a class: a set of their names (`bw_<bytes per second>_<burst
/// bytes>`) and a meter (`bwm_…`, a token bucket per port, which expires after a minute
/// without traffic). Frames a port receives, i.e. its workload's egress, over its class's rate
/// go to [`POLICE_DROP_CHAIN`]. nftables's byte meter holds one second of traffic at the rate
/// plus the burst.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policing {
    /// Port name → its egress rate.
    pub ports: BTreeMap<String, Rate>,
    /// Rates whose class stays in the table without ports: the Networks' own, so that their
    /// workloads coming and going change set elements only.
    pub standing: BTreeSet<Rate>,
}

/// The most bytes per second (rate plus burst) a meter can hold: nftables computes its bucket
/// in nanoseconds, one second times rate plus burst, in 64 bits (about 147 Gbit/s).
const MAX_POLICED_BYTES_PER_SECOND: u64 = u64::MAX / 1_000_000_000;

/// A meter class: bytes per second and burst bytes.
pub type PoliceClass = (u64, u64);

/// A rate's class, or `None` for a rate too high for a meter (above 147 Gbit/s, more than a
/// host port carries: not policed).
pub fn police_class(rate: &Rate) -> Option<PoliceClass> {
    let bytes = (rate.bits_per_second / 8).max(1);
    let burst = (rate.burst_bits / 8).clamp(1, u64::from(u32::MAX));
    (bytes.checked_add(burst)? <= MAX_POLICED_BYTES_PER_SECOND).then_some((bytes, burst))
}

/// The set of class `class`'s ports: `bw_<bytes per second>_<burst bytes>`.
pub fn police_set((bytes, burst): &PoliceClass) -> String {
    format!("bw_{bytes}_{burst}")
}

/// The meter of class `class`: `bwm_<bytes per second>_<burst bytes>`.
pub fn police_meter((bytes, burst): &PoliceClass) -> String {
    format!("bwm_{bytes}_{burst}")
}

/// The meter rule of class `class` (see [`police_class`]).
fn police_rule(class: &PoliceClass) -> String {
    let (bytes, burst) = class;
    format!(
        "iifname @{} update @{} {{ iifname timeout 60s limit rate over {bytes} bytes/second burst {burst} bytes }} goto {POLICE_DROP_CHAIN}",
        police_set(class),
        police_meter(class),
    )
}

/// The rules of `prerouting`, with the meters of `classes`. The checks of a registered port's
/// frames (from its VLANs on) drop through [`DROP_CHAIN`], which counts them per port; frames
/// of pending, open or unknown ports are no workload's forgery and are dropped uncounted.
fn rules(classes: &BTreeSet<PoliceClass>) -> Vec<String> {
    let counted = |rule: &str| match rule.strip_suffix(" drop") {
        Some(matched) => format!("{matched} goto {DROP_CHAIN}"),
        None => rule.to_string(),
    };
    [
        UNREGISTERED_SCOPE,
        // A live migration's target, guarded or open: the VM's announcement activates it;
        // nothing else passes.
        "iifname @pending ether type 0x8035 log prefix \"weft activate \" group 2727 drop",
        "iifname @pending drop",
    ]
    .into_iter()
    .map(String::from)
    // Egress limits, guarded and open ports alike.
    .chain(classes.iter().map(police_rule))
    .chain(
        [
            "iifname @open accept",
            // A weft port the agent has not registered (yet): fail closed.
            "iifname != @ports drop",
        ]
        .into_iter()
        .map(String::from),
    )
    .chain(checks().iter().map(|r| counted(r)))
    .chain(mrouter_rules())
    .collect()
}

/// The checks of a registered port's frames, each ending in `drop` or `accept`.
fn checks() -> Vec<String> {
    [
        // A trunk port's tagged frames: its own VLANs, its own MAC, nothing else checked.
        "ether type 8021q iifname . vlan id != @trunks drop",
        "ether type 8021q iifname . ether saddr != @macs drop",
        "ether type 8021q accept",
        "ether type { 8021q, 8021ad } drop",
        "ether type != { ip, arp, ip6 } drop",
        "iifname . ether saddr != @macs drop",
        "iifname . arp saddr ether != @macs drop",
        "iifname . arp saddr ip != @ips4 drop",
        // DHCPv4 server messages go to the client port, whatever port they come from.
        "udp dport 68 drop",
        "iifname . ip saddr != @ips4 drop",
    ]
    .into_iter()
    .chain(ND_RULES)
    .chain([
        // Duplicate address detection (and the MLD report sent while the address is tentative).
        "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report } accept",
        "iifname . ip6 saddr != @ips6 drop",
        "icmpv6 type { nd-router-advert, nd-redirect } drop",
        // DHCPv6 server (and relay) messages to clients likewise.
        "udp dport 546 drop",
    ])
    .map(String::from)
    .collect()
}

/// A port of a network with `spec.security.antiSpoofing: false`: nothing is checked, but a
/// live migration's target still waits for its VM (the LAN must not see the MAC twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPort {
    /// The host-side port.
    pub ifname: String,
    /// A live migration's target waiting for its VM (see [`PortGuard::pending`]).
    pub pending: bool,
}

/// Builds weft's `bridge weft` table.
///
/// `bridges`: weft's bridge names; `guarded`: ports with anti-spoofing on; `open`: ports of
/// networks with `spec.security.antiSpoofing: false`; `policing`: their egress limits policed
/// here. A port listed both guarded and open is guarded (the safe choice).
pub fn table(
    bridges: &[String],
    guarded: &[PortGuard],
    open: &[OpenPort],
    policing: &Policing,
) -> Table {
    // Every port name once, as an nft string; a port whose name cannot be one is left out.
    let guarded: Vec<(String, &PortGuard)> = guarded
        .iter()
        .filter_map(|p| Some((quoted(&p.ifname)?, p)))
        .collect();
    let guarded_names: BTreeSet<String> = guarded.iter().map(|(name, _)| name.clone()).collect();
    let open_ports: Vec<(String, &OpenPort)> = open
        .iter()
        .filter_map(|p| Some((quoted(&p.ifname)?, p)))
        .filter(|(name, _)| !guarded_names.contains(name))
        .collect();
    let pending: BTreeSet<String> = guarded
        .iter()
        .filter(|(_, p)| p.pending)
        .map(|(name, _)| name.clone())
        .chain(
            open_ports
                .iter()
                .filter(|(_, p)| p.pending)
                .map(|(name, _)| name.clone()),
        )
        .collect();
    let open: BTreeSet<String> = open_ports.iter().map(|(name, _)| name.clone()).collect();
    let hairpin: BTreeSet<String> = guarded_names
        .iter()
        .chain(&open)
        .map(|p| format!("{p} . {p}"))
        .collect();
    let port_ids: BTreeMap<String, String> = guarded
        .iter()
        .map(|(name, p)| (name, &p.ifname))
        .chain(open_ports.iter().map(|(name, p)| (name, &p.ifname)))
        .map(|(name, ifname)| (name.clone(), names::classid_text(names::port_id(ifname))))
        .collect();
    let mut macs = BTreeSet::new();
    let mut ips4 = BTreeSet::new();
    let mut ips6 = BTreeSet::new();
    let mut targets6 = BTreeSet::new();
    let mut lladdrs = BTreeSet::new();
    let mut trunks = BTreeSet::new();
    for (port, p) in &guarded {
        trunks.extend(p.vlans.iter().map(|v| format!("{port} . {v}")));
        macs.insert(format!("{port} . {}", names::format_mac(p.mac)));
        lladdrs.insert(format!("{port} . {}", mac_integer(p.mac)));
        let v6s = p.ips.iter().filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        for v6 in std::iter::once(eui64_link_local(p.mac)).chain(v6s) {
            ips6.insert(format!("{port} . {v6}"));
            targets6.insert(format!("{port} . {}", ipv6_integer(v6)));
        }
        for ip in &p.ips {
            if let IpAddr::V4(v4) = ip {
                ips4.insert(format!("{port} . {v4}"));
            }
        }
    }
    // The meters' classes: the standing ones, and those of the ports written here.
    let mut classes: BTreeMap<PoliceClass, BTreeSet<String>> = policing
        .standing
        .iter()
        .filter_map(police_class)
        .map(|c| (c, BTreeSet::new()))
        .collect();
    // A port this table does not hold (its name cannot be written) has no meter either.
    for (port, rate) in &policing.ports {
        if let (Some(name), Some(class)) = (nft::ifname_literal(port), police_class(rate))
            && (guarded_names.contains(&name) || open.contains(&name))
        {
            classes.entry(class).or_default().insert(name);
        }
    }
    let police_sets = classes.iter().flat_map(|(class, ports)| {
        [
            set(&police_set(class), "ifname", ports.clone()),
            dynamic_set(&police_meter(class), "ifname", true),
        ]
    });
    let class_names: BTreeSet<PoliceClass> = classes.keys().copied().collect();
    Table {
        family: Family::Bridge,
        name: names::NFT_TABLE.into(),
        comment: None,
        sets: vec![
            set(
                "bridges",
                "ifname",
                bridges.iter().filter_map(|b| quoted(b)).collect(),
            ),
            set("ports", "ifname", guarded_names),
            set("open", "ifname", open),
            set("macs", "ifname . ether_addr", macs),
            set("ips4", "ifname . ipv4_addr", ips4),
            set("ips6", "ifname . ipv6_addr", ips6),
            set("targets6", "typeof iifname . @th,64,128", targets6),
            set("lladdrs", "typeof iifname . @th,208,48", lladdrs),
            set("pending", "ifname", pending),
            set("trunks", "typeof iifname . vlan id", trunks),
            set("hairpin", "ifname . ifname", hairpin),
            dynamic_set(DROPS_SET, "ifname", false),
            dynamic_set(POLICE_DROPS_SET, "ifname", false),
            dynamic_set(MROUTERS_SET, "ifname", true),
        ]
        .into_iter()
        .chain(police_sets)
        .collect(),
        maps: vec![Map {
            name: PORT_IDS_MAP.into(),
            key_type: "ifname".into(),
            value_type: "classid".into(),
            flags: vec![],
            elements: port_ids,
        }],
        chains: vec![
            Chain {
                name: "prerouting".into(),
                base: Some(BaseChain {
                    kind: "filter".into(),
                    hook: "prerouting".into(),
                    priority: "filter".into(),
                    policy: Some("accept".into()),
                }),
                rules: rules(&class_names),
            },
            // Nothing reaches a pending port: the LAN keeps delivering the VM's MAC to the
            // node the VM still runs on. A port in hairpin mode gets its own unicast back (a
            // port forward to itself), never its own broadcasts and multicasts. A guarded
            // port gets no question it cannot answer ([`QUESTION_RULES`]). Every other copy
            // of a broadcast or multicast leaving a workload's port is tagged with the port's
            // id, for the receiver's ingress policy (see [`COPY_TAG_RULE`]).
            Chain {
                name: "forward".into(),
                base: Some(BaseChain {
                    kind: "filter".into(),
                    hook: "forward".into(),
                    priority: "filter".into(),
                    policy: Some("accept".into()),
                }),
                rules: ["oifname @pending drop", HAIRPIN_FLOOD_RULE]
                    .into_iter()
                    .chain(QUESTION_RULES)
                    .chain([COPY_TAG_RULE])
                    .map(String::from)
                    .collect(),
            },
            Chain {
                name: DROP_CHAIN.into(),
                base: None,
                rules: vec![format!("update @{DROPS_SET} {{ iifname counter }} drop")],
            },
            Chain {
                name: POLICE_DROP_CHAIN.into(),
                base: None,
                rules: vec![format!(
                    "update @{POLICE_DROPS_SET} {{ iifname counter }} drop"
                )],
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::firewall::set_elements;
    use weft_dataplane::nft::{Change, diff, render_table, structure_hash};

    /// A check's rule as the table holds it: its drop goes through the counting chain.
    fn counted(rule: &str) -> String {
        format!(
            "{} goto {DROP_CHAIN}",
            rule.strip_suffix(" drop").unwrap_or(rule)
        )
    }

    fn port(ifname: &str, mac: [u8; 6], ips: &[&str]) -> PortGuard {
        PortGuard {
            ifname: ifname.into(),
            mac,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pending: false,
            vlans: vec![],
        }
    }

    fn open(ifname: &str, pending: bool) -> OpenPort {
        OpenPort {
            ifname: ifname.into(),
            pending,
        }
    }

    #[test]
    fn policed_ports_share_a_meter_per_rate_before_any_port_is_accepted() {
        let rate = |mbit: u64| Rate {
            bits_per_second: mbit * 1_000_000,
            burst_bits: 400_000,
        };
        let policing = Policing {
            ports: BTreeMap::from([
                ("wfa".to_string(), rate(8)),
                ("wfo".to_string(), rate(8)),
                ("wfb".to_string(), rate(16)),
                // Not a port of the table: no meter.
                ("wfx".to_string(), rate(8)),
                // Beyond what a meter holds: not policed.
                ("wfc".to_string(), rate(1_000_000)),
            ]),
            standing: BTreeSet::from([rate(8), rate(32)]),
        };
        let mac = [0x0a, 0x58, 10, 77, 0, 2];
        let t = table(
            &[],
            &[
                port("wfa", mac, &["10.77.0.2"]),
                port("wfb", mac, &["10.77.0.3"]),
                port("wfc", mac, &["10.77.0.4"]),
            ],
            &[open("wfo", false)],
            &policing,
        );
        assert_eq!(set_elements(&t, "bw_1000000_50000"), ["\"wfa\"", "\"wfo\""]);
        assert_eq!(set_elements(&t, "bw_2000000_50000"), ["\"wfb\""]);
        // A Network's own rate, without ports yet.
        assert!(set_elements(&t, "bw_4000000_50000").is_empty());
        assert!(t.sets.iter().any(|s| s.name == "bwm_4000000_50000"));
        assert_eq!(
            t.sets.iter().filter(|s| s.name.starts_with("bw_")).count(),
            3
        );
        let rules = &t.chains[0].rules;
        let at = |r: &str| rules.iter().position(|x| x == r).unwrap();
        let meter = at(
            "iifname @bw_1000000_50000 update @bwm_1000000_50000 { iifname timeout 60s limit rate over 1000000 bytes/second burst 50000 bytes } goto police_drop",
        );
        // After the pending ports (which pass nothing), before the open ports' accept.
        assert!(at("iifname @pending drop") < meter && meter < at("iifname @open accept"));
        assert_eq!(police_class(&rate(200_000)), None);
        let text = render_table(&t);
        assert!(
            text.contains("update @police_drops { iifname counter } drop"),
            "{text}"
        );
    }

    #[test]
    fn questions_are_kept_from_guarded_ports_before_copies_are_tagged_and_queries_mark_routers() {
        let t = table(
            &[],
            &[port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2"])],
            &[],
            &Policing::default(),
        );
        let forward = &t.chains[1].rules;
        let at = |r: &str| forward.iter().position(|x| x == r).unwrap();
        for rule in QUESTION_RULES {
            assert!(
                at(HAIRPIN_FLOOD_RULE) < at(rule) && at(rule) < at(COPY_TAG_RULE),
                "{rule} must come after the hairpin rule and before the tag: {forward:?}"
            );
            assert!(
                rule.starts_with("oifname @ports "),
                "{rule}: guarded ports only"
            );
        }
        // Routers are learnt from frames that passed every check: the last rules.
        let prerouting = &t.chains[0].rules;
        let learnt = mrouter_rules();
        assert_eq!(prerouting[prerouting.len() - learnt.len()..], learnt);
        assert!(
            prerouting
                .iter()
                .any(|r| r == "iifname . ip6 saddr != @ips6 goto guard_drop")
        );
        let routers = t.sets.iter().find(|s| s.name == MROUTERS_SET).unwrap();
        assert!(routers.flags.iter().any(|f| f == "timeout"), "{routers:?}");
        let text = render_table(&t);
        assert!(
            text.contains(
                "icmpv6 type mld-listener-query update @mrouters { iifname timeout 255s }"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_open_port_can_wait_for_its_vm_too() {
        let t = table(
            &[],
            &[],
            &[open("wfo", true), open("wfp", false)],
            &Policing::default(),
        );
        assert_eq!(set_elements(&t, "open"), ["\"wfo\"", "\"wfp\""]);
        assert_eq!(set_elements(&t, "pending"), ["\"wfo\""]);
        let rules = &t.chains[0].rules;
        let at = |r: &str| rules.iter().position(|x| x == r).unwrap();
        assert!(
            at("iifname @pending drop") < at("iifname @open accept"),
            "pending must come before open: {rules:?}"
        );
    }

    #[test]
    fn eui64_flips_the_universal_local_bit() {
        assert_eq!(
            eui64_link_local([0x0a, 0x58, 10, 77, 0, 2]).to_string(),
            "fe80::858:aff:fe4d:2"
        );
        assert_eq!(
            eui64_link_local([0x02, 0, 0, 0, 0, 1]).to_string(),
            "fe80::ff:fe00:1"
        );
    }

    #[test]
    fn ports_change_elements_never_the_structure() {
        let bridges = vec!["wn-blue".to_string()];
        let empty = table(&bridges, &[], &[], &Policing::default());
        let one = table(
            &bridges,
            &[port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2"])],
            &[],
            &Policing::default(),
        );
        let many = table(
            &["wn-blue".into(), "wn-red".into()],
            &[
                port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2", "fd77::2"]),
                port("wfb", [0x0a, 0x58, 10, 77, 0, 3], &["10.77.0.3"]),
            ],
            &[open("wfo", false)],
            &Policing::default(),
        );
        assert_eq!(structure_hash(&empty), structure_hash(&one));
        assert_eq!(structure_hash(&empty), structure_hash(&many));
        assert_eq!(empty.chains, many.chains, "rules must not depend on ports");
        let tx = diff(&empty, &many);
        assert!(
            tx.0.iter().all(|c| matches!(
                c,
                Change::AddElements { .. } | Change::AddMapElements { .. }
            )),
            "adding ports must be an element diff, got {tx:?}"
        );
        // Every port, guarded or open, has its id for the copies of broadcasts and multicasts.
        let ids = &many.maps[0];
        assert_eq!(ids.name, PORT_IDS_MAP);
        assert_eq!(ids.elements.len(), 3);
        assert_eq!(
            ids.elements["\"wfo\""],
            names::classid_text(names::port_id("wfo"))
        );
        assert!(many.chains[1].rules.iter().any(|r| r == COPY_TAG_RULE));
        assert_eq!(empty.family, Family::Bridge);
        assert_eq!(empty.name, "weft");
    }

    #[test]
    fn elements_name_each_port_its_mac_and_addresses() {
        let t = table(
            &["wn-blue".into()],
            &[port(
                "wfa",
                [0x0a, 0x58, 10, 77, 0, 2],
                &["10.77.0.2", "fd77::2"],
            )],
            &[open("wfo", false), open("wfa", false)],
            &Policing::default(),
        );
        assert_eq!(set_elements(&t, "bridges"), ["\"wn-blue\""]);
        assert_eq!(set_elements(&t, "ports"), ["\"wfa\""]);
        assert_eq!(
            set_elements(&t, "open"),
            ["\"wfo\""],
            "a port both guarded and open must stay guarded"
        );
        assert_eq!(set_elements(&t, "macs"), ["\"wfa\" . 0a:58:0a:4d:00:02"]);
        assert_eq!(set_elements(&t, "ips4"), ["\"wfa\" . 10.77.0.2"]);
        assert_eq!(
            set_elements(&t, "ips6"),
            ["\"wfa\" . fd77::2", "\"wfa\" . fe80::858:aff:fe4d:2"],
            "ips6 must hold the configured address and the EUI-64 link-local one"
        );
        assert_eq!(
            set_elements(&t, "targets6"),
            [
                "\"wfa\" . 0xfd770000000000000000000000000002",
                "\"wfa\" . 0xfe8000000000000008580afffe4d0002"
            ],
            "targets6 must hold the addresses of ips6 as 128-bit integers"
        );
        assert_eq!(set_elements(&t, "lladdrs"), ["\"wfa\" . 0x0a580a4d0002"]);
    }

    #[test]
    fn nd_targets_and_link_layer_addresses_are_typeof_sets_the_rules_read() {
        let t = table(&[], &[], &[], &Policing::default());
        let key = |name: &str| {
            t.sets
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .key_type
                .clone()
        };
        assert_eq!(key("targets6"), "typeof iifname . @th,64,128");
        assert_eq!(key("lladdrs"), "typeof iifname . @th,208,48");
        let text = render_table(&t);
        assert!(text.contains("\t\ttypeof iifname . @th,64,128\n"), "{text}");
        let rules = &t.chains[0].rules;
        let at = |rule: &str| rules.iter().position(|r| r == rule).unwrap();
        let dad =
            at("ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report } accept");
        for rule in ND_RULES {
            assert!(
                at(&counted(rule)) < dad,
                "{rule} must come before the DAD exception"
            );
        }
    }

    #[test]
    fn trunk_ports_admit_their_tagged_vlans_as_elements_and_others_stay_dropped() {
        let mac = [0x0a, 0x58, 10, 77, 0, 2];
        let access = table(
            &[],
            &[port("wfa", mac, &["10.77.0.2"])],
            &[],
            &Policing::default(),
        );
        let mut vm = port("wfv", [0x0a, 0x58, 10, 77, 0, 3], &["10.77.0.3"]);
        vm.vlans = vec![20, 100, 101];
        let trunked = table(
            &[],
            &[port("wfa", mac, &["10.77.0.2"]), vm],
            &[],
            &Policing::default(),
        );
        assert_eq!(
            set_elements(&trunked, "trunks"),
            ["\"wfv\" . 100", "\"wfv\" . 101", "\"wfv\" . 20"]
        );
        assert!(set_elements(&access, "trunks").is_empty());
        assert_eq!(structure_hash(&access), structure_hash(&trunked));
        let tx = diff(&access, &trunked);
        assert!(
            tx.0.iter().all(|c| matches!(
                c,
                Change::AddElements { .. } | Change::AddMapElements { .. }
            )),
            "a trunk port is an element diff, got {tx:?}"
        );
        let rules = &trunked.chains[0].rules;
        let at = |r: &str| rules.iter().position(|x| x == r).unwrap();
        let vid = at(&counted(
            "ether type 8021q iifname . vlan id != @trunks drop",
        ));
        let mac_check = at(&counted(
            "ether type 8021q iifname . ether saddr != @macs drop",
        ));
        let pass = at("ether type 8021q accept");
        assert!(at("iifname != @ports drop") < vid, "only registered ports");
        assert!(
            at("iifname @pending drop") < vid,
            "a pending port passes nothing"
        );
        assert!(vid < pass && mac_check < pass, "{rules:?}");
        assert!(
            pass < at(&counted("ether type { 8021q, 8021ad } drop")),
            "other tagged frames stay dropped"
        );
        assert!(
            pass < at(&counted("iifname . ip saddr != @ips4 drop")),
            "tagged frames get MAC checks only"
        );
        let text = render_table(&trunked);
        assert!(text.contains("\t\ttypeof iifname . vlan id\n"), "{text}");
    }

    #[test]
    fn every_port_is_paired_with_itself_for_the_hairpin_flood_rule() {
        let t = table(
            &[],
            &[port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2"])],
            &[open("wfo", false)],
            &Policing::default(),
        );
        assert_eq!(
            set_elements(&t, "hairpin"),
            ["\"wfa\" . \"wfa\"", "\"wfo\" . \"wfo\""]
        );
        assert_eq!(
            structure_hash(&t),
            structure_hash(&table(&[], &[], &[], &Policing::default()))
        );
        assert!(t.chains[1].rules.iter().any(|r| r == HAIRPIN_FLOOD_RULE));
    }

    #[test]
    fn a_port_name_that_would_escape_an_nft_string_is_left_out_and_so_dropped() {
        let bad = "wfa\",\"eth0";
        let t = table(
            &["wn-lan".into(), "br\"x".into()],
            &[
                port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2"]),
                port(bad, [0x0a, 0x58, 10, 77, 0, 3], &["10.77.0.3"]),
            ],
            &[open(bad, true)],
            &Policing::default(),
        );
        let text = render_table(&t);
        assert!(!text.contains("eth0"), "{text}");
        assert!(!text.contains("br\"x"), "{text}");
        assert_eq!(set_elements(&t, "ports"), ["\"wfa\""]);
        assert!(set_elements(&t, "open").is_empty());
        assert!(set_elements(&t, "pending").is_empty());
        assert_eq!(set_elements(&t, "hairpin"), ["\"wfa\" . \"wfa\""]);
        assert_eq!(set_elements(&t, "bridges"), ["\"wn-lan\""]);
        // Neither guarded nor open: `iifname != @ports drop` drops its frames.
        assert!(
            t.chains[0]
                .rules
                .iter()
                .any(|r| r == "iifname != @ports drop")
        );
    }

    #[test]
    fn renders_one_prerouting_filter_chain() {
        let text = render_table(&table(&[], &[], &[], &Policing::default()));
        assert!(text.starts_with("table bridge weft {"), "{text}");
        assert!(
            text.contains("type filter hook prerouting priority filter; policy accept;"),
            "{text}"
        );
        assert!(text.contains("\t\tiifname != @ports drop\n"), "{text}");
    }
}

//! A small synchronous rtnetlink client: links (bridge, veth, tap lookup), addresses and
//! main-table routes.
//!
//! Messages are built with rtnetlink's builders (`default-features = false`: no runtime) and
//! sent over a blocking [`netlink_sys::Socket`] with a plain request/ACK loop, as netavark does.
//! Nothing here needs tokio: the CNI binary calls it directly, the agent from
//! `spawn_blocking`.
//!
//! A [`Netlink`] talks to the network namespace its socket was opened in, whatever thread
//! later uses it: [`Netlink::new`] binds to the calling thread's namespace,
//! [`Netlink::in_netns`] to another one (opened on a helper thread, see
//! [`crate::netns::run_in`]).

use crate::netns::{self, Netns, NetnsError};
use ipnet::IpNet;
use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeBooleanOptionFlags, BridgeBooleanOptions, BridgeVlanInfo,
    BridgeVlanInfoFlags, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth,
    LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    RouteVia,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    LinkVlan, RouteMessageBuilder,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use tracing::{debug, trace};

/// How often a dump that the kernel flags as inconsistent (`NLM_F_DUMP_INTR`) is retried.
const DUMP_ATTEMPTS: u32 = 5;

/// `NLMSGERR_ATTR_MSG`: the extended-ACK text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Netlink errors. Each names the operation (`op`, e.g. `"create veth"`) and what it was
/// about (`target`, e.g. `"weft1a2b3c (peer eth0)"`).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened, bound or configured.
    #[error("cannot open a netlink socket")]
    Open {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket for another namespace could not be opened there.
    #[error("cannot open a netlink socket in network namespace {path}")]
    OpenInNetns {
        /// The namespace.
        path: PathBuf,
        /// The cause ([`NetnsError::is_gone`] tells a vanished namespace).
        #[source]
        source: NetnsError,
    },
    /// The request could not be sent or the reply not received.
    #[error("{op} {target}: netlink socket I/O failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel's reply could not be decoded.
    #[error("{op} {target}: cannot decode the kernel's reply")]
    Decode {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// The kernel refused the request.
    #[error("{op} {target}: {}", describe_errno(.errno, .message))]
    Kernel {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// The positive errno the kernel answered with.
        errno: i32,
        /// The kernel's extended-ACK message, when it gave one.
        message: Option<String>,
    },
    /// A dump kept changing while it was read.
    #[error("{op} {target}: the kernel's dump was interrupted {attempts} times in a row")]
    DumpInterrupted {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// How many times it was tried.
        attempts: u32,
    },
    /// The request was rejected before it was sent (a name too long, mixed address families…).
    #[error("{op} {target}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
        /// Why.
        reason: String,
    },
    /// The kernel acknowledged creating a link that a lookup right after does not find.
    #[error("{op} {target}: the kernel acknowledged it but the link is not there")]
    Vanished {
        /// The operation.
        op: &'static str,
        /// What it was about.
        target: String,
    },
}

fn describe_errno(errno: &i32, message: &Option<String>) -> String {
    let base = io::Error::from_raw_os_error(*errno);
    match message {
        Some(m) => format!("{base}: {m}"),
        None => base.to_string(),
    }
}

impl NetlinkError {
    /// The errno the kernel answered with, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True when the object (link, address, route, namespace) does not exist: `ENODEV`,
    /// `ENOENT`, `ESRCH` or `EADDRNOTAVAIL`.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// True when the object already exists (`EEXIST`), e.g. a link name is taken.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// True when the kernel lacks the feature (`EOPNOTSUPP`, or "Unknown device type" for a
    /// link kind whose module is not available).
    pub fn is_not_supported(&self) -> bool {
        matches!(self.errno(), Some(libc::EOPNOTSUPP))
            || matches!(self, NetlinkError::Kernel { message: Some(m), .. } if m.contains("Unknown device type"))
    }

    /// True when [`Netlink::in_netns`] failed because the namespace is gone.
    pub fn is_netns_gone(&self) -> bool {
        matches!(self, NetlinkError::OpenInNetns { source, .. } if source.is_gone())
    }
}

/// What went wrong inside [`Netlink::exchange`], before the operation's context is attached.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Decode(DecodeError),
    Kernel { errno: i32, message: Option<String> },
    Interrupted,
}

impl Failure {
    fn into_error(self, op: &'static str, target: String) -> NetlinkError {
        match self {
            Failure::Io(source) => NetlinkError::Io { op, target, source },
            Failure::Decode(source) => NetlinkError::Decode { op, target, source },
            Failure::Kernel { errno, message } => NetlinkError::Kernel {
                op,
                target,
                errno,
                message,
            },
            Failure::Interrupted => NetlinkError::DumpInterrupted {
                op,
                target,
                attempts: DUMP_ATTEMPTS,
            },
        }
    }
}

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind (`IFLA_INFO_KIND`): `"bridge"`, `"veth"`, `"tun"`…; `None` for physical
    /// devices and `lo`.
    pub kind: Option<String>,
    /// MAC address, for links with a 6-byte link-layer address.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge (or other controller) it is attached to.
    pub master: Option<u32>,
    /// `IFLA_IFALIAS`; weft marks its links with an alias starting `weft:`.
    pub alias: Option<String>,
    /// `IFLA_LINK_NETNSID`: for a veth, the id (in this namespace) of the namespace that holds
    /// its peer, when that is another one.
    pub netns_id: Option<i32>,
    /// For a bridge, whether it filters VLANs (`IFLA_BR_VLAN_FILTERING`); `None` for other
    /// links.
    pub vlan_filtering: Option<bool>,
    /// For a bridge, whether it learns source MACs from link-local frames
    /// (`01:80:c2:00:00:0x`; `BR_BOOLOPT_NO_LL_LEARN` off); `None` for other links and
    /// kernels that do not report it.
    pub link_local_learning: Option<bool>,
    /// For a bridge port, whether hairpin mode is on (`IFLA_BRPORT_MODE`: the bridge may send
    /// a frame back out of the port it came in on); `None` for other links.
    pub hairpin: Option<bool>,
}

/// One entry of a bridge's forwarding database: a MAC and the port the bridge sends it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// The port (the bridge's own index for the bridge's MAC).
    pub port: u32,
    /// The MAC.
    pub mac: [u8; 6],
    /// A MAC of the bridge or of a port's own device (`NUD_PERMANENT`): frames to it are the
    /// node's, not a host's behind the port.
    pub local: bool,
}

/// One address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    /// Interface index.
    pub index: u32,
    /// The address with its prefix length (host bits kept: `10.0.0.5/24`).
    pub addr: IpNet,
    /// `IFA_F_NODAD`: duplicate address detection is off for it (IPv6).
    pub nodad: bool,
    /// `IFA_F_TENTATIVE`: IPv6 DAD has not finished; the address is not usable yet.
    pub tentative: bool,
    /// `IFA_F_DADFAILED`: IPv6 DAD found a duplicate.
    pub dad_failed: bool,
}

/// IP version of a route dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// One unicast route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination (`0.0.0.0/0` or `::/0` for a default route).
    pub dst: IpNet,
    /// Next hop, if any (an IPv6 next hop of an IPv4 route is reported as is).
    pub gateway: Option<IpAddr>,
    /// Output interface, if any (multipath routes have none).
    pub oif: Option<u32>,
    /// Routing table id (254, main).
    pub table: u32,
    /// `rtm_protocol`: 2 kernel, 3 boot, 4 static (what [`Netlink::replace_route`] uses)…
    pub protocol: u8,
}

/// A route to add, replace or delete in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination; host bits are cleared before sending (`10.0.0.5/24` means `10.0.0.0/24`).
    pub dst: IpNet,
    /// Next hop, or `None` for a route straight out of `oif` (scope link).
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Preferred source address (`src` in `ip route`).
    pub src: Option<IpAddr>,
}

/// A route of any table, with everything needed to put it back exactly: what weft saves when it
/// moves a node's routes from an uplink to a bridge, and restores when it gives the uplink back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// Destination.
    pub dst: IpNet,
    /// Next hop, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Routing table id.
    pub table: u32,
    /// `rtm_protocol` (3 boot, 4 static, 16 dhcp…).
    pub protocol: u8,
    /// `rtm_scope` (0 universe, 253 link).
    pub scope: u8,
    /// Metric (`RTA_PRIORITY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    /// Preferred source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefsrc: Option<IpAddr>,
}

impl fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        if self.table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// A veth pair whose peer is born inside another network namespace, see
/// [`Netlink::create_veth_into_netns`].
#[derive(Debug, Clone, Copy)]
pub struct VethSpec<'a> {
    /// Name of the end that stays in the socket's namespace.
    pub host_name: &'a str,
    /// Alias (`IFLA_IFALIAS`) for the host end.
    pub host_alias: Option<&'a str>,
    /// Bridge to attach the host end to.
    pub host_master: Option<u32>,
    /// Name of the peer inside `peer_netns`.
    pub peer_name: &'a str,
    /// The namespace the peer is created in.
    pub peer_netns: BorrowedFd<'a>,
    /// MAC of the peer.
    pub peer_mac: Option<[u8; 6]>,
    /// MTU of both ends.
    pub mtu: Option<u32>,
}

pub use crate::names::{format_mac, parse_mac};

/// Why `name` cannot be an interface name, if it cannot (the rule is [`crate::names::ifname_problem`]).
fn bad_ifname(name: &str) -> Option<String> {
    crate::names::ifname_problem(name).map(|why| format!("interface name {name:?}: {why}"))
}

fn check_ifname(op: &'static str, target: &str, name: &str) -> Result<(), NetlinkError> {
    match bad_ifname(name) {
        Some(reason) => Err(NetlinkError::Invalid {
            op,
            target: target.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Aligns a netlink message length to 4 bytes.
fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The extended-ACK message of an `NLMSG_ERROR` payload (after the error code).
fn ext_ack_message(outer_flags: u16, payload: &[u8]) -> Option<String> {
    if outer_flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // The payload starts with the request's header, then (unless capped) its body.
    let header_len = 16;
    let start = if outer_flags & NLM_F_CAPPED != 0 {
        header_len
    } else {
        let len = payload.get(..4)?;
        align4(u32::from_ne_bytes([len[0], len[1], len[2], len[3]]) as usize)
    };
    let mut tlvs = payload.get(start..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let value = &tlvs[4..len];
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            let text = String::from_utf8_lossy(text).trim().to_string();
            return (!text.is_empty()).then_some(text);
        }
        tlvs = tlvs.get(align4(len)..)?;
    }
    None
}

/// `msg` as an entry of bridge `bridge`'s forwarding database, if it is one.
fn fdb_entry(msg: NeighbourMessage, bridge: u32) -> Option<FdbEntry> {
    if msg.header.family != netlink_packet_route::AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut master = None;
    for attr in msg.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => {
                mac = <[u8; 6]>::try_from(a.as_slice()).ok();
            }
            NeighbourAttribute::Controller(m) => master = Some(m),
            _ => {}
        }
    }
    (master == Some(bridge) || msg.header.ifindex == bridge).then_some(FdbEntry {
        port: msg.header.ifindex,
        mac: mac?,
        local: msg.header.state == NeighbourState::Permanent,
    })
}

fn link_info(msg: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        master: None,
        alias: None,
        netns_id: None,
        vlan_filtering: None,
        link_local_learning: None,
        hairpin: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Address(a) => info.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => info.mtu = m,
            LinkAttribute::Controller(m) if m != 0 => info.master = Some(m),
            LinkAttribute::IfAlias(a) if !a.is_empty() => info.alias = Some(a),
            LinkAttribute::LinkNetNsId(id) => info.netns_id = Some(id),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(k.to_string()),
                        NlLinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                            for d in data {
                                if let InfoBridgePort::HairpinMode(on) = d {
                                    info.hairpin = Some(on);
                                }
                            }
                        }
                        NlLinkInfo::Data(InfoData::Bridge(data)) => {
                            for d in data {
                                match d {
                                    InfoBridge::VlanFiltering(on) => {
                                        info.vlan_filtering = Some(on);
                                    }
                                    InfoBridge::MultiBoolOpt(o)
                                        if o.mask.contains(
                                            BridgeBooleanOptionFlags::NoLinkLocalLearn,
                                        ) =>
                                    {
                                        info.link_local_learning =
                                            Some(!o.value.contains(
                                                BridgeBooleanOptionFlags::NoLinkLocalLearn,
                                            ));
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn addr_info(msg: AddressMessage) -> Option<AddrInfo> {
    let mut local = None;
    let mut address = None;
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(a),
            AddressAttribute::Address(a) => address = Some(a),
            AddressAttribute::Flags(f) => flags = f,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
    // links and the same as IFA_LOCAL (or alone, for IPv6) otherwise.
    let ip = local.or(address)?;
    let addr = IpNet::new(ip, msg.header.prefix_len).ok()?;
    Some(AddrInfo {
        index: msg.header.index,
        addr,
        nodad: flags.contains(AddressFlags::Nodad),
        tentative: flags.contains(AddressFlags::Tentative),
        dad_failed: flags.contains(AddressFlags::Dadfailed),
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_info(msg: &RouteMessage, family: Family) -> Option<RouteInfo> {
    let (e, oif) = route_entry(msg, family)?;
    Some(RouteInfo {
        dst: e.dst,
        gateway: e.gateway,
        oif,
        table: e.table,
        protocol: e.protocol,
    })
}

/// Reads a route dump message as a [`RouteEntry`] with its output interface (multipath routes
/// have none).
fn route_entry(msg: &RouteMessage, family: Family) -> Option<(RouteEntry, Option<u32>)> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = None;
    let mut prefsrc = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_addr(a),
            RouteAttribute::Gateway(a) => gateway = route_addr(a),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::PrefSource(a) => prefsrc = route_addr(a),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    Some((
        RouteEntry {
            dst: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
            gateway,
            table,
            protocol: u8::from(msg.header.protocol),
            scope: u8::from(msg.header.scope),
            metric,
            prefsrc,
        },
        oif,
    ))
}

/// The `RTM_NEWROUTE` / `RTM_DELROUTE` message of `entry` out of `oif`.
pub fn route_entry_message(entry: &RouteEntry, oif: u32) -> Result<RouteMessage, NetlinkError> {
    let invalid = |reason: String| NetlinkError::Invalid {
        op: "route",
        target: entry.to_string(),
        reason,
    };
    let dst = entry.dst.trunc();
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| invalid(e.to_string()))?
        .output_interface(oif)
        .table_id(entry.table)
        .protocol(RouteProtocol::from(entry.protocol))
        .scope(RouteScope::from(entry.scope));
    if let Some(gw) = entry.gateway {
        b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(src) = entry.prefsrc {
        b = b.pref_source(src).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(m) = entry.metric {
        b = b.priority(m);
    }
    Ok(b.build())
}

/// The `RTM_NEWLINK` message creating VLAN `id` on top of link `parent` (802.1Q).
pub fn vlan_message(name: &str, parent: u32, id: u16, mtu: Option<u32>) -> LinkMessage {
    let mut b = LinkVlan::new(name, parent, id);
    if let Some(mtu) = mtu {
        b = b.mtu(mtu);
    }
    b.build()
}

/// `RTM_NEWLINK` on the existing bridge `index`: VLAN filtering on or off
/// (`IFLA_INFO_DATA` → `IFLA_BR_VLAN_FILTERING`).
pub fn bridge_vlan_filtering_message(index: u32, on: bool) -> LinkMessage {
    LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
        .index(index)
        .vlan_filtering(on)
        .build()
}

/// `RTM_NEWLINK` on the existing bridge `index`: no MAC learning from link-local frames
/// (`IFLA_BR_MULTI_BOOLOPT` → `BR_BOOLOPT_NO_LL_LEARN`).
///
/// The bridge learns the source MAC of a frame to `01:80:c2:00:00:0x` (LLDP, 802.1X, …)
/// before any bridge-family netfilter hook sees it (LLDP with no hook at all), so without
/// this a port could teach the bridge another workload's MAC, or the LAN router's, past the
/// `bridge weft` guard, which checks source MACs in `prerouting`.
pub fn bridge_no_link_local_learning_message(index: u32) -> LinkMessage {
    LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
        .index(index)
        .append_info_data(InfoBridge::MultiBoolOpt(no_link_local_learning()))
        .build()
}

/// `RTM_NEWLINK` on bridge port `index`: hairpin mode on or off (`IFLA_INFO_SLAVE_DATA` →
/// `IFLA_BRPORT_MODE`).
///
/// A workload port needs it on to reach its own workload through the node: a packet the
/// workload sends to one of the node's port forwards (or host ports) that leads back to itself
/// is DNATed on the bridge and must leave through the port it came in on. The `bridge weft`
/// table drops the broadcasts and multicasts it would also reflect.
pub fn port_hairpin_message(index: u32, on: bool) -> LinkMessage {
    LinkBridgePort::new(index)
        .append_info_data(InfoBridgePort::HairpinMode(on))
        .build()
}

fn no_link_local_learning() -> BridgeBooleanOptions {
    BridgeBooleanOptions {
        value: BridgeBooleanOptionFlags::NoLinkLocalLearn,
        mask: BridgeBooleanOptionFlags::NoLinkLocalLearn,
    }
}

/// The `IFLA_BRIDGE_VLAN_INFO` entries of `vlans` (sorted by ID): a run of consecutive VLANs
/// with the same flags and no PVID becomes one range (`RANGE_BEGIN` … `RANGE_END`, as
/// `bridge vlan add vid 100-199` sends it); the PVID entry stays single (the kernel refuses a
/// range with PVID).
pub fn vlan_infos(vlans: &[crate::vlan::PortVlan]) -> Vec<AfSpecBridge> {
    let flags = |v: &crate::vlan::PortVlan| {
        let mut f = BridgeVlanInfoFlags::empty();
        if v.pvid {
            f |= BridgeVlanInfoFlags::Pvid;
        }
        if v.untagged {
            f |= BridgeVlanInfoFlags::Untagged;
        }
        f
    };
    let mut sorted = vlans.to_vec();
    sorted.sort();
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let mut last = first;
        if !first.pvid {
            while let Some(next) = sorted.get(i + 1)
                && !next.pvid
                && next.untagged == first.untagged
                && next.vid == last.vid + 1
            {
                last = *next;
                i += 1;
            }
        }
        let f = flags(&first);
        if last.vid == first.vid {
            out.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: f,
                vid: first.vid,
            }));
        } else {
            out.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: f | BridgeVlanInfoFlags::RangeBegin,
                vid: first.vid,
            }));
            out.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: f | BridgeVlanInfoFlags::RangeEnd,
                vid: last.vid,
            }));
        }
        i += 1;
    }
    out
}

/// The `AF_BRIDGE` link message about the VLANs of bridge port `index` (`IFLA_AF_SPEC` holding
/// [`vlan_infos`]): sent as `RTM_SETLINK` it adds them (or updates their flags), as
/// `RTM_DELLINK` it deletes them, like `bridge vlan add|del dev PORT vid …`.
pub fn port_vlans_message(index: u32, vlans: &[crate::vlan::PortVlan]) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.interface_family = netlink_packet_route::AddressFamily::Bridge;
    msg.header.index = index;
    msg.attributes
        .push(LinkAttribute::AfSpecBridge(vlan_infos(vlans)));
    msg
}

/// The `RTM_GETLINK` dump of every bridge port's VLANs (`AF_BRIDGE`, `RTEXT_FILTER_BRVLAN`:
/// one `IFLA_BRIDGE_VLAN_INFO` per VLAN, as `bridge vlan show` asks).
pub fn port_vlans_dump_message() -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.interface_family = netlink_packet_route::AddressFamily::Bridge;
    msg.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Brvlan]));
    msg
}

/// The port and its VLANs in one answer of [`port_vlans_dump_message`]'s dump (ranges, should
/// the kernel send any, expanded).
pub fn port_vlans_of(msg: &LinkMessage) -> (u32, Vec<crate::vlan::PortVlan>) {
    let mut out = Vec::new();
    let mut begin: Option<BridgeVlanInfo> = None;
    for attr in &msg.attributes {
        let LinkAttribute::AfSpecBridge(spec) = attr else {
            continue;
        };
        for a in spec {
            let AfSpecBridge::VlanInfo(info) = a else {
                continue;
            };
            let entry = |vid| crate::vlan::PortVlan {
                vid,
                pvid: info.flags.contains(BridgeVlanInfoFlags::Pvid),
                untagged: info.flags.contains(BridgeVlanInfoFlags::Untagged),
            };
            if info.flags.contains(BridgeVlanInfoFlags::RangeBegin) {
                begin = Some(*info);
            } else if info.flags.contains(BridgeVlanInfoFlags::RangeEnd) {
                let first = begin.take().map_or(info.vid, |b| b.vid);
                out.extend((first..=info.vid).map(entry));
            } else {
                out.push(entry(info.vid));
            }
        }
    }
    (msg.header.index, out)
}

/// A blocking rtnetlink socket bound to one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.socket.as_raw_fd())
            .field("seq", &self.seq)
            .finish()
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let open = |source| NetlinkError::Open { source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(open)?;
        // Best effort: the kernel's reason text on errors, and no echo of our request in them.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Netlink { socket, seq: 0 })
    }

    /// Opens a socket inside `ns` (on a helper thread; the caller's thread is not switched).
    /// The socket keeps talking to `ns` from whatever thread uses it.
    pub fn in_netns(ns: &Netns) -> Result<Netlink, NetlinkError> {
        netns::run_in(ns, Netlink::new).map_err(|source| NetlinkError::OpenInNetns {
            path: ns.path().to_path_buf(),
            source,
        })?
    }

    /// Sends one request and collects the kernel's answer.
    ///
    /// `flags` are the `NLM_F_*` request flags beyond `NLM_F_REQUEST` (always set) and
    /// `NLM_F_ACK` (set unless the request is a dump: a get with `NLM_F_DUMP`): e.g.
    /// `NLM_F_DUMP`, or `NLM_F_CREATE | NLM_F_EXCL`. Returns the data messages (the dump, or
    /// the reply of a get); an empty vector for a plain ACK. A kernel refusal is
    /// [`NetlinkError::Kernel`]. A dump the kernel flags as inconsistent (`NLM_F_DUMP_INTR`)
    /// is retried a few times.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let op = "netlink request";
        let target = format!("(message type {})", msg.message_type());
        self.exchange(msg, flags)
            .map_err(|f| f.into_error(op, target))
    }

    /// [`Netlink::request`] with the operation's context attached to errors.
    fn call(
        &mut self,
        op: &'static str,
        target: impl FnOnce() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.exchange(msg, flags)
            .map_err(|f| f.into_error(op, target()))
    }

    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        // Like the kernel: a get (`RTM_GET*`, kind 2 of 4) with NLM_F_ROOT or NLM_F_MATCH is a
        // dump. The same bits mean REPLACE/EXCL on a new or delete request.
        let dump = msg.message_type() & 3 == 2 && flags & NLM_F_DUMP != 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.exchange_once(msg.clone(), flags, dump) {
                Err(Failure::Interrupted) if attempt < DUMP_ATTEMPTS => {
                    debug!(attempt, "netlink dump interrupted; retrying");
                }
                other => return other,
            }
        }
    }

    fn exchange_once(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet = NetlinkMessage::from(msg);
        packet.header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        packet.header.sequence_number = seq;
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        trace!(seq, len = buf.len(), "netlink send");
        loop {
            match self.socket.send(&buf, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            }
        }

        let mut out = Vec::new();
        let mut interrupted = false;
        let mut decode_error = None;
        loop {
            let (data, _) = match self.socket.recv_from_full() {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            };
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let header = NetlinkBuffer::new_checked(bytes).map_err(Failure::Decode)?;
                let len = header.length() as usize;
                let (msg_seq, msg_flags) = (header.sequence_number(), header.flags());
                if len == 0 {
                    break;
                }
                offset += align4(len);
                if msg_seq != seq {
                    // A leftover of an earlier request that failed half-way.
                    trace!(msg_seq, seq, "skipping stale netlink message");
                    continue;
                }
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let parsed = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        // Keep reading to the end of the answer so the socket stays clean.
                        decode_error.get_or_insert(e);
                        continue;
                    }
                };
                match parsed.payload {
                    NetlinkPayload::Done(done) => {
                        if done.code != 0 {
                            return Err(Failure::Kernel {
                                errno: done.code.abs(),
                                message: None,
                            });
                        }
                        return finish(out, interrupted, decode_error);
                    }
                    NetlinkPayload::Error(err) => match err.code {
                        None => return finish(out, interrupted, decode_error),
                        Some(code) => {
                            return Err(Failure::Kernel {
                                errno: code.get().abs(),
                                message: ext_ack_message(msg_flags, &err.header),
                            });
                        }
                    },
                    // A get without a dump answers with its reply, then the ACK.
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Noop => {}
                    NetlinkPayload::Overrun(_) => {
                        return Err(Failure::Io(io::Error::other("netlink overrun")));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Looks a link up by name; `None` when there is none (or the name cannot exist).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        if bad_ifname(name).is_some() {
            return Ok(None);
        }
        let msg = LinkUnspec::new_with_name(name)
            .append_extra_attribute(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]))
            .build();
        self.get_link(msg, || format!("link {name}"))
    }

    /// Looks a link up by index; `None` when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]))
            .build();
        self.get_link(msg, || format!("link {index}"))
    }

    fn get_link(
        &mut self,
        msg: LinkMessage,
        target: impl FnOnce() -> String,
    ) -> Result<Option<LinkInfo>, NetlinkError> {
        match self.call("get link", target, RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_info(l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .append_extra_attribute(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]))
            .build();
        let replies = self.call(
            "list links",
            String::new,
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_info(l)),
                _ => None,
            })
            .collect())
    }

    /// The forwarding database of bridge `bridge`: what it learned, what was added by hand,
    /// and its own and its ports' MACs.
    pub fn bridge_fdb(&mut self, bridge: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = netlink_packet_route::AddressFamily::Bridge;
        let replies = self.call(
            "list bridge fdb",
            || format!("bridge {bridge}"),
            RouteNetlinkMessage::GetNeighbour(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => fdb_entry(n, bridge),
                _ => None,
            })
            .collect())
    }

    /// Index of a link that was just created.
    fn created_index(
        &mut self,
        op: &'static str,
        name: &str,
        target: impl FnOnce() -> String,
    ) -> Result<u32, NetlinkError> {
        match self.link_by_name(name)? {
            Some(l) => Ok(l.index),
            None => Err(NetlinkError::Vanished {
                op,
                target: target(),
            }),
        }
    }

    /// Creates a bridge, up, with an optional MTU, MAC and alias; returns its index.
    /// Fails with [`NetlinkError::is_exists`] when the name is taken.
    pub fn create_bridge(
        &mut self,
        name: &str,
        mtu: Option<u32>,
        mac: Option<[u8; 6]>,
        alias: Option<&str>,
    ) -> Result<u32, NetlinkError> {
        const OP: &str = "create bridge";
        check_ifname(OP, name, name)?;
        // See `bridge_no_link_local_learning_message`.
        let mut b = LinkBridge::new(name).no_linklocal_learn(true);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        if let Some(mac) = mac {
            b = b.address(mac.to_vec());
        }
        self.call(
            OP,
            || name.to_string(),
            RouteNetlinkMessage::NewLink(b.build()),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        let index = self.created_index(OP, name, || name.to_string())?;
        self.alias_new_link(index, alias)?;
        debug!(bridge = %name, index, "created bridge");
        Ok(index)
    }

    /// Creates a veth pair with one `RTM_NEWLINK`: the host end here (attached to
    /// `host_master`, with `host_alias`, up) and the peer born directly inside `peer_netns`
    /// (`IFLA_NET_NS_FD` in the peer's info; much cheaper than moving it afterwards) with
    /// `peer_mac`, down. Returns the host end's index.
    ///
    /// Fails with [`NetlinkError::is_exists`] when a name is taken.
    pub fn create_veth_into_netns(&mut self, spec: &VethSpec<'_>) -> Result<u32, NetlinkError> {
        const OP: &str = "create veth";
        let target = || format!("{} (peer {})", spec.host_name, spec.peer_name);
        check_ifname(OP, &target(), spec.host_name)?;
        check_ifname(OP, &target(), spec.peer_name)?;
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.peer_name)
            .setns_by_fd(spec.peer_netns.as_raw_fd());
        if let Some(mac) = spec.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .up();
        if let Some(mtu) = spec.mtu {
            host = host.mtu(mtu);
        }
        if let Some(master) = spec.host_master {
            host = host.controller(master);
        }
        self.call(
            OP,
            target,
            RouteNetlinkMessage::NewLink(host.build()),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        let index = self.created_index(OP, spec.host_name, target)?;
        self.alias_new_link(index, spec.host_alias)?;
        debug!(host = %spec.host_name, peer = %spec.peer_name, index, "created veth");
        Ok(index)
    }

    /// Creates a veth pair `a`/`b`, with `b` born inside `b_netns` when given (here
    /// otherwise). Both ends start down. Returns the index of `a`.
    pub fn create_veth_pair(
        &mut self,
        a: &str,
        b: &str,
        b_netns: Option<BorrowedFd<'_>>,
        mtu: Option<u32>,
    ) -> Result<u32, NetlinkError> {
        const OP: &str = "create veth";
        let target = || format!("{a} (peer {b})");
        check_ifname(OP, &target(), a)?;
        check_ifname(OP, &target(), b)?;
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(b);
        if let Some(fd) = b_netns {
            peer = peer.setns_by_fd(fd.as_raw_fd());
        }
        if let Some(mtu) = mtu {
            peer = peer.mtu(mtu);
        }
        let mut host =
            LinkVeth::new(a, b).set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = mtu {
            host = host.mtu(mtu);
        }
        self.call(
            OP,
            target,
            RouteNetlinkMessage::NewLink(host.build()),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.created_index(OP, a, target)
    }

    fn set_link(
        &mut self,
        op: &'static str,
        index: u32,
        msg: LinkMessage,
    ) -> Result<(), NetlinkError> {
        self.call(
            op,
            || format!("link {index}"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )?;
        Ok(())
    }

    /// Sets a link administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.set_link(
            "set link up",
            index,
            LinkUnspec::new_with_index(index).up().build(),
        )
    }

    /// Sets a link administratively down.
    pub fn set_down(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.set_link(
            "set link down",
            index,
            LinkUnspec::new_with_index(index).down().build(),
        )
    }

    /// Attaches a link to a bridge (`Some`), or detaches it (`None`).
    pub fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), NetlinkError> {
        let b = LinkUnspec::new_with_index(index);
        let b = match master {
            Some(m) => b.controller(m),
            None => b.nocontroller(),
        };
        self.set_link("set link master", index, b.build())
    }

    /// Sets a link's MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.set_link(
            "set link mtu",
            index,
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
        )
    }

    /// Sets a link's MAC address.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.set_link(
            "set link address",
            index,
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
        )
    }

    /// Gives a link just created its alias (the kernel ignores IFLA_IFALIAS when it creates a
    /// link, so it takes a second step); if that fails the link is deleted again.
    fn alias_new_link(&mut self, index: u32, alias: Option<&str>) -> Result<(), NetlinkError> {
        if let Some(alias) = alias
            && let Err(e) = self.set_alias(index, alias)
        {
            let _ = self.delete_link(index);
            return Err(e);
        }
        Ok(())
    }

    /// Sets a link's alias (`IFLA_IFALIAS`); an empty string removes it.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NetlinkError> {
        self.set_link(
            "set link alias",
            index,
            LinkUnspec::new_with_index(index).alias(alias).build(),
        )
    }

    /// Renames a link. The kernel refuses (`EBUSY`) to rename a link that is up.
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        const OP: &str = "rename link";
        check_ifname(OP, &format!("link {index}"), name)?;
        self.set_link(
            OP,
            index,
            LinkUnspec::new_with_index(index).name(name).build(),
        )
    }

    /// Moves a link into another network namespace (it keeps its name; it goes down). Prefer
    /// creating links in place ([`Netlink::create_veth_into_netns`]): a move costs ~15 ms.
    pub fn move_to_netns(&mut self, index: u32, netns: BorrowedFd<'_>) -> Result<(), NetlinkError> {
        self.set_link(
            "move link to netns",
            index,
            LinkUnspec::new_with_index(index)
                .setns_by_fd(netns.as_raw_fd())
                .build(),
        )
    }

    /// Deletes a link (for a veth, both ends). `Ok(false)` when there was no such link.
    pub fn delete_link(&mut self, index: u32) -> Result<bool, NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).build();
        match self.call(
            "delete link",
            || format!("link {index}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        ) {
            Ok(_) => {
                debug!(index, "deleted link");
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The addresses of one link, or of all links (`None`).
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<AddrInfo>, NetlinkError> {
        let msg = AddressMessage::default();
        let replies = self.call(
            "list addresses",
            || index.map(|i| format!("of link {i}")).unwrap_or_default(),
            RouteNetlinkMessage::GetAddress(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => addr_info(a),
                _ => None,
            })
            .filter(|a| index.is_none_or(|i| a.index == i))
            .collect())
    }

    fn address_message(index: u32, addr: IpNet) -> AddressMessage {
        match addr {
            IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
            IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
        }
    }

    /// Adds an address (`10.0.0.5/24`: the prefix length sets the connected route). With
    /// `nodad`, an IPv6 address skips duplicate address detection and is usable at once
    /// (`IFA_F_NODAD`; ignored for IPv4). Returns `Ok(false)` when exactly this address is
    /// already there.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: IpNet,
        nodad: bool,
    ) -> Result<bool, NetlinkError> {
        let mut msg = Self::address_message(index, addr);
        if nodad && matches!(addr, IpNet::V6(_)) {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.call(
            "add address",
            || format!("{addr} to link {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => {
                // IPv6 keys addresses without their prefix length: the same address with
                // another prefix is a conflict, not "already present".
                let present = self.addresses(Some(index))?.iter().any(|a| a.addr == addr);
                if present { Ok(false) } else { Err(e) }
            }
            Err(e) => Err(e),
        }
    }

    /// Removes an address. `Ok(false)` when it (or the link) was not there.
    pub fn del_address(&mut self, index: u32, addr: IpNet) -> Result<bool, NetlinkError> {
        let msg = Self::address_message(index, addr);
        match self.call(
            "delete address",
            || format!("{addr} from link {index}"),
            RouteNetlinkMessage::DelAddress(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The unicast routes of the main table, for one IP version.
    pub fn routes(&mut self, family: Family) -> Result<Vec<RouteInfo>, NetlinkError> {
        Ok(self
            .unicast_routes(family)?
            .iter()
            .filter_map(|r| route_info(r, family))
            .filter(|r| r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    /// Every unicast route of one IP version, all tables.
    fn unicast_routes(&mut self, family: Family) -> Result<Vec<RouteMessage>, NetlinkError> {
        let msg = match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let replies = self.call(
            "list routes",
            || format!("{family:?}"),
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.kind == RouteType::Unicast
                        && Family::of_header(&r.header) == Some(family) =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect())
    }

    fn route_message(op: &'static str, spec: &RouteSpec) -> Result<RouteMessage, NetlinkError> {
        let invalid = |reason: String| NetlinkError::Invalid {
            op,
            target: spec.dst.to_string(),
            reason,
        };
        let dst = spec.dst.trunc();
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(gw) = spec.gateway {
            b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(src) = spec.src {
            if Family::of(src) != Family::of(dst.addr()) {
                return Err(invalid(format!(
                    "source {src} is not of the destination's family"
                )));
            }
            b = b.pref_source(src).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(oif) = spec.oif {
            b = b.output_interface(oif);
        }
        if spec.gateway.is_none() && spec.oif.is_some() && dst.addr().is_ipv4() {
            b = b.scope(RouteScope::Link);
        }
        Ok(b.build())
    }

    /// Adds or replaces a main-table route (`ip route replace`, protocol static).
    pub fn replace_route(&mut self, spec: &RouteSpec) -> Result<(), NetlinkError> {
        const OP: &str = "replace route";
        let msg = Self::route_message(OP, spec)?;
        self.call(
            OP,
            || describe_route(spec),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Deletes a main-table route matching `spec` (any protocol and scope). `Ok(false)` when
    /// there was none.
    pub fn del_route(&mut self, spec: &RouteSpec) -> Result<bool, NetlinkError> {
        const OP: &str = "delete route";
        let mut msg = Self::route_message(OP, spec)?;
        // Like `ip route del`: match whatever protocol, scope and type the route has.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
        match self.call(
            OP,
            || describe_route(spec),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Netlink {
    /// The unicast routes (every table but `local`) whose output interface is `index`, both IP
    /// versions, except those the kernel made itself (connected and prefix routes, which follow
    /// their addresses).
    pub fn routes_via(&mut self, index: u32) -> Result<Vec<RouteEntry>, NetlinkError> {
        const RT_TABLE_LOCAL: u32 = 255;
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            for r in self.unicast_routes(family)? {
                if r.header.protocol == RouteProtocol::Kernel {
                    continue;
                }
                if let Some((entry, Some(oif))) = route_entry(&r, family)
                    && oif == index
                    && entry.table != RT_TABLE_LOCAL
                {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// Adds `entry` out of `oif`, replacing a route with the same key (destination, table,
    /// metric): moving a route between links is one message.
    pub fn replace_route_entry(
        &mut self,
        entry: &RouteEntry,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let msg = route_entry_message(entry, oif)?;
        self.call(
            "replace route",
            || format!("{entry} dev {oif}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Deletes `entry` out of `oif`; `Ok(false)` when there was none.
    pub fn del_route_entry(&mut self, entry: &RouteEntry, oif: u32) -> Result<bool, NetlinkError> {
        let msg = route_entry_message(entry, oif)?;
        match self.call(
            "delete route",
            || format!("{entry} dev {oif}"),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates VLAN `id` on link `parent` (an 802.1Q sub-interface, down) with an alias;
    /// returns its index. A kernel without 802.1Q support answers `EOPNOTSUPP`
    /// ([`NetlinkError::is_not_supported`]).
    pub fn create_vlan(
        &mut self,
        name: &str,
        parent: u32,
        id: u16,
        mtu: Option<u32>,
        alias: Option<&str>,
    ) -> Result<u32, NetlinkError> {
        const OP: &str = "create vlan";
        let target = || format!("{name} (vlan {id} on link {parent})");
        check_ifname(OP, &target(), name)?;
        self.call(
            OP,
            target,
            RouteNetlinkMessage::NewLink(vlan_message(name, parent, id, mtu)),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        let index = self.created_index(OP, name, target)?;
        self.alias_new_link(index, alias)?;
        Ok(index)
    }
}

impl Netlink {
    /// Turns hairpin mode of bridge port `index` on or off (see [`port_hairpin_message`]).
    pub fn set_port_hairpin(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        self.call(
            "set bridge port hairpin",
            || format!("link {index} hairpin {}", if on { "on" } else { "off" }),
            RouteNetlinkMessage::NewLink(port_hairpin_message(index, on)),
            0,
        )?;
        Ok(())
    }

    /// Stops bridge `index` from learning MACs from link-local frames (see
    /// [`bridge_no_link_local_learning_message`]).
    pub fn set_no_link_local_learning(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.call(
            "set bridge no_linklocal_learn",
            || format!("link {index} no_linklocal_learn 1"),
            RouteNetlinkMessage::NewLink(bridge_no_link_local_learning_message(index)),
            0,
        )?;
        Ok(())
    }

    /// Turns VLAN filtering of bridge `index` on or off. A kernel without it
    /// (`CONFIG_BRIDGE_VLAN_FILTERING` unset) answers `EOPNOTSUPP`
    /// ([`NetlinkError::is_not_supported`]).
    pub fn set_vlan_filtering(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        self.call(
            "set bridge vlan filtering",
            || format!("link {index} vlan_filtering {}", u8::from(on)),
            RouteNetlinkMessage::NewLink(bridge_vlan_filtering_message(index, on)),
            0,
        )?;
        Ok(())
    }

    /// The VLANs of every port of every VLAN-filtering bridge, by port index (the bridges
    /// themselves included, for their own VLANs).
    pub fn all_port_vlans(
        &mut self,
    ) -> Result<std::collections::BTreeMap<u32, Vec<crate::vlan::PortVlan>>, NetlinkError> {
        let replies = self.call(
            "list bridge port vlans",
            String::new,
            RouteNetlinkMessage::GetLink(port_vlans_dump_message()),
            NLM_F_DUMP,
        )?;
        let mut out = std::collections::BTreeMap::new();
        for m in replies {
            if let RouteNetlinkMessage::NewLink(l) = m {
                let (index, vlans) = port_vlans_of(&l);
                out.entry(index).or_insert_with(Vec::new).extend(vlans);
            }
        }
        Ok(out)
    }

    /// The VLANs of bridge port `index` (empty when it is none, or its bridge does not filter).
    pub fn port_vlans(&mut self, index: u32) -> Result<Vec<crate::vlan::PortVlan>, NetlinkError> {
        Ok(self.all_port_vlans()?.remove(&index).unwrap_or_default())
    }

    /// Adds `add` to bridge port `index` (or updates their flags), then deletes the VLANs `del`.
    pub fn change_port_vlans(
        &mut self,
        index: u32,
        add: &[crate::vlan::PortVlan],
        del: &[u16],
    ) -> Result<(), NetlinkError> {
        if !add.is_empty() {
            self.call(
                "add bridge port vlans",
                || format!("link {index}"),
                RouteNetlinkMessage::SetLink(port_vlans_message(index, add)),
                0,
            )?;
        }
        if !del.is_empty() {
            let del: Vec<crate::vlan::PortVlan> = del
                .iter()
                .map(|v| crate::vlan::PortVlan::tagged(*v))
                .collect();
            self.call(
                "delete bridge port vlans",
                || format!("link {index}"),
                RouteNetlinkMessage::DelLink(port_vlans_message(index, &del)),
                0,
            )?;
        }
        Ok(())
    }

    /// Brings the VLANs of bridge port `index` to `want`; `Ok(false)` when they already were.
    pub fn set_port_vlans(
        &mut self,
        index: u32,
        want: &crate::vlan::PortVlans,
    ) -> Result<bool, NetlinkError> {
        let current = self.port_vlans(index)?;
        let (add, del) = crate::vlan::changes(&current, want);
        if add.is_empty() && del.is_empty() {
            return Ok(false);
        }
        self.change_port_vlans(index, &add, &del)?;
        Ok(true)
    }
}

/// `RTM_NEWQDISC`: the ingress qdisc of link `index`.
pub fn ingress_qdisc_message(index: u32) -> netlink_packet_route::tc::TcMessage {
    use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
    let mut q = TcMessage::with_index(i32::try_from(index).unwrap_or(0));
    q.header.parent = TcHandle::INGRESS;
    q.header.handle = TcHandle::from(0xffff_0000);
    q.attributes.push(TcAttribute::Kind("ingress".into()));
    q
}

/// `RTM_NEWTFILTER`: every frame entering link `from` leaves through link `to` (`tc filter add
/// dev FROM ingress protocol all u32 match u8 0 0 action mirred egress redirect dev TO`).
pub fn redirect_filter_message(from: u32, to: u32) -> netlink_packet_route::tc::TcMessage {
    use netlink_packet_route::tc::{
        TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
        TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle,
        TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector,
        TcU32SelectorFlags,
    };
    let mut f = TcMessage::with_index(i32::try_from(from).unwrap_or(0));
    f.header.parent = TcHandle {
        major: 0xffff,
        minor: TcHandle::MIN_INGRESS,
    };
    // Priority 1, protocol ETH_P_ALL in network byte order.
    f.header.info = u32::from(TcHandle {
        major: 1,
        minor: 0x0003u16.to_be(),
    });
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    f.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
    f.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    f
}

impl Netlink {
    /// Joins two links of this namespace back to back with tc: every frame entering one leaves
    /// through the other, both ways (how a VM's tap meets weft's veth end in its pod, as Kata's
    /// `tcfilter` does: no bridge, no MAC learning, the guest's MAC may sit on both links).
    pub fn join_links(&mut self, a: u32, b: u32) -> Result<(), NetlinkError> {
        for (from, to) in [(a, b), (b, a)] {
            match self.call(
                "add ingress qdisc",
                || format!("link {from}"),
                RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc_message(from)),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(_) => {}
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e),
            }
            self.call(
                "add redirect filter",
                || format!("link {from} to link {to}"),
                RouteNetlinkMessage::NewTrafficFilter(redirect_filter_message(from, to)),
                NLM_F_CREATE | NLM_F_EXCL,
            )?;
        }
        Ok(())
    }
}

fn describe_route(spec: &RouteSpec) -> String {
    let mut s = spec.dst.trunc().to_string();
    if let Some(gw) = spec.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = spec.oif {
        s.push_str(&format!(" dev {oif}"));
    }
    s
}

impl Family {
    fn of_header(h: &RouteHeader) -> Option<Family> {
        match h.address_family {
            netlink_packet_route::AddressFamily::Inet => Some(Family::V4),
            netlink_packet_route::AddressFamily::Inet6 => Some(Family::V6),
            _ => None,
        }
    }
}

fn finish(
    out: Vec<RouteNetlinkMessage>,
    interrupted: bool,
    decode_error: Option<DecodeError>,
) -> Result<Vec<RouteNetlinkMessage>, Failure> {
    if let Some(e) = decode_error {
        return Err(Failure::Decode(e));
    }
    if interrupted {
        return Err(Failure::Interrupted);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let mac = [0x02, 0xab, 0x00, 0x10, 0xfe, 0x7f];
        assert_eq!(format_mac(mac), "02:ab:00:10:fe:7f");
        assert_eq!(parse_mac("02:ab:00:10:fe:7f"), Some(mac));
        assert_eq!(parse_mac("02:AB:00:10:FE:7F"), Some(mac));
        assert_eq!(parse_mac("02-ab-00-10-fe-7f"), Some(mac));
    }

    #[test]
    fn bad_macs_are_rejected() {
        for bad in [
            "",
            "02:ab:00:10:fe",
            "02:ab:00:10:fe:7f:00",
            "2:ab:00:10:fe:7f",
            "02:ab:00:10:fe:7g",
            "02ab0010fe7f",
            "02:ab-00:10:fe:7f",
            "+2:ab:00:10:fe:7f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(bad_ifname("eth0").is_none());
        assert!(bad_ifname("weft-0123456789").is_none());
        assert!(bad_ifname("weft-01234567890").is_some());
        assert!(bad_ifname("").is_some());
        assert!(bad_ifname("a/b").is_some());
        assert!(bad_ifname("a b").is_some());
    }

    #[test]
    fn kernel_errors_classify() {
        let e = |errno| NetlinkError::Kernel {
            op: "x",
            target: String::new(),
            errno,
            message: None,
        };
        assert!(e(libc::ENODEV).is_not_found());
        assert!(e(libc::ESRCH).is_not_found());
        assert!(e(libc::EADDRNOTAVAIL).is_not_found());
        assert!(!e(libc::EEXIST).is_not_found());
        assert!(e(libc::EEXIST).is_exists());
    }

    #[test]
    fn kernel_error_message_includes_ext_ack() {
        let e = NetlinkError::Kernel {
            op: "create veth",
            target: "a (peer b)".into(),
            errno: libc::EOPNOTSUPP,
            message: Some("Unknown device type".into()),
        };
        let s = e.to_string();
        assert!(s.starts_with("create veth a (peer b): "), "{s}");
        assert!(s.ends_with(": Unknown device type"), "{s}");
    }

    #[test]
    fn ext_ack_text_is_found_after_a_capped_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Unknown device type\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        assert_eq!(
            ext_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &payload), None);
    }

    #[test]
    fn route_messages_clear_host_bits_and_use_link_scope_without_gateway() {
        let spec = RouteSpec {
            dst: "10.1.2.3/24".parse().unwrap(),
            gateway: None,
            oif: Some(3),
            src: None,
        };
        let msg = Netlink::route_message("t", &spec).unwrap();
        assert_eq!(msg.header.destination_prefix_length, 24);
        assert_eq!(msg.header.scope, RouteScope::Link);
        assert!(
            msg.attributes
                .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                    "10.1.2.0".parse().unwrap()
                )))
        );
    }

    #[test]
    fn route_entries_keep_table_metric_source_and_protocol() {
        let entry = RouteEntry {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("192.168.50.1".parse().unwrap()),
            table: 254,
            protocol: 16,
            scope: 0,
            metric: Some(100),
            prefsrc: Some("192.168.50.11".parse().unwrap()),
        };
        let msg = route_entry_message(&entry, 7).unwrap();
        let (back, oif) = route_entry(&msg, Family::V4).unwrap();
        assert_eq!(back, entry);
        assert_eq!(oif, Some(7));
        assert_eq!(entry.to_string(), "0.0.0.0/0 via 192.168.50.1 metric 100");
        let v6 = RouteEntry {
            dst: "fd00:1::/64".parse().unwrap(),
            gateway: Some("fd00::1".parse().unwrap()),
            table: 100,
            protocol: 4,
            scope: 0,
            metric: None,
            prefsrc: None,
        };
        let (back, _) = route_entry(&route_entry_message(&v6, 3).unwrap(), Family::V6).unwrap();
        assert_eq!(back, v6);
        let saved = serde_json::to_string(&v6).unwrap();
        assert_eq!(serde_json::from_str::<RouteEntry>(&saved).unwrap(), v6);
    }

    #[test]
    fn vlan_messages_carry_kind_id_and_parent() {
        use netlink_packet_route::link::InfoVlan;
        let msg = vlan_message("eth1.10", 4, 10, Some(1500));
        assert!(msg.attributes.contains(&LinkAttribute::Link(4)));
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1500)));
        assert!(
            msg.attributes
                .contains(&LinkAttribute::IfName("eth1.10".into()))
        );
        let info = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap();
        assert!(info.contains(&NlLinkInfo::Kind(InfoKind::Vlan)));
        assert!(info.contains(&NlLinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(10)]))));
    }

    /// Serializes `msg` as the request the socket sends and decodes it back, as the kernel
    /// would read it.
    fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut packet = NetlinkMessage::from(msg);
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("not a route message: {other:?}"),
        }
    }

    #[test]
    fn fdb_entries_of_the_bridge_are_read_and_others_skipped() {
        let entry = |family, ifindex, master: Option<u32>, state| {
            let mut m = NeighbourMessage::default();
            m.header.family = family;
            m.header.ifindex = ifindex;
            m.header.state = state;
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 7]));
            if let Some(master) = master {
                m.attributes.push(NeighbourAttribute::Controller(master));
            }
            m
        };
        let bridge = netlink_packet_route::AddressFamily::Bridge;
        assert_eq!(
            fdb_entry(entry(bridge, 5, Some(3), NeighbourState::Reachable), 3),
            Some(FdbEntry {
                port: 5,
                mac: [2, 0, 0, 0, 0, 7],
                local: false
            })
        );
        assert_eq!(
            fdb_entry(entry(bridge, 3, Some(3), NeighbourState::Permanent), 3).map(|e| e.local),
            Some(true),
            "the bridge's own MAC"
        );
        assert_eq!(
            fdb_entry(entry(bridge, 9, Some(8), NeighbourState::Reachable), 3),
            None,
            "another bridge's"
        );
        assert_eq!(
            fdb_entry(
                entry(
                    netlink_packet_route::AddressFamily::Inet,
                    5,
                    Some(3),
                    NeighbourState::Reachable
                ),
                3
            ),
            None,
            "an ARP entry"
        );
    }

    #[test]
    fn the_hairpin_message_carries_the_port_kind_and_mode_and_a_dump_reads_it_back() {
        for on in [true, false] {
            let RouteNetlinkMessage::NewLink(msg) =
                round_trip(RouteNetlinkMessage::NewLink(port_hairpin_message(9, on)))
            else {
                panic!("not RTM_NEWLINK");
            };
            assert_eq!(msg.header.index, 9);
            assert_eq!(
                msg.attributes,
                [LinkAttribute::LinkInfo(vec![
                    NlLinkInfo::PortKind(netlink_packet_route::link::InfoPortKind::Bridge),
                    NlLinkInfo::PortData(InfoPortData::BridgePort(vec![
                        InfoBridgePort::HairpinMode(on)
                    ])),
                ])]
            );
            assert_eq!(link_info(msg).hairpin, Some(on));
        }
    }

    #[test]
    fn the_no_link_local_learning_message_sets_the_boolopt_and_a_dump_reads_it_back() {
        let RouteNetlinkMessage::NewLink(msg) = round_trip(RouteNetlinkMessage::NewLink(
            bridge_no_link_local_learning_message(7),
        )) else {
            panic!("not RTM_NEWLINK");
        };
        assert_eq!(msg.header.index, 7);
        assert_eq!(
            msg.attributes,
            [LinkAttribute::LinkInfo(vec![
                NlLinkInfo::Kind(InfoKind::Bridge),
                NlLinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MultiBoolOpt(
                    no_link_local_learning()
                )])),
            ])]
        );
        assert_eq!(link_info(msg).link_local_learning, Some(false));
    }

    #[test]
    fn vlan_filtering_messages_carry_the_bridge_kind_and_the_flag() {
        for on in [true, false] {
            let RouteNetlinkMessage::NewLink(msg) = round_trip(RouteNetlinkMessage::NewLink(
                bridge_vlan_filtering_message(7, on),
            )) else {
                panic!("not RTM_NEWLINK");
            };
            assert_eq!(msg.header.index, 7);
            assert_eq!(
                msg.header.interface_family,
                netlink_packet_route::AddressFamily::Unspec
            );
            assert_eq!(
                msg.attributes,
                [LinkAttribute::LinkInfo(vec![
                    NlLinkInfo::Kind(InfoKind::Bridge),
                    NlLinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(on)])),
                ])]
            );
            // The same attributes in a link dump say whether a bridge filters.
            assert_eq!(link_info(msg).vlan_filtering, Some(on));
        }
    }

    #[test]
    fn port_vlan_messages_are_af_bridge_af_spec_vlan_infos() {
        use crate::vlan::{PortVlan, PortVlans, VlanRange};
        let want = PortVlans::workload(10, &[VlanRange::one(20), VlanRange { min: 100, max: 110 }]);
        let RouteNetlinkMessage::SetLink(msg) = round_trip(RouteNetlinkMessage::SetLink(
            port_vlans_message(9, &want.entries()),
        )) else {
            panic!("not RTM_SETLINK");
        };
        assert_eq!(
            msg.header.interface_family,
            netlink_packet_route::AddressFamily::Bridge
        );
        assert_eq!(msg.header.index, 9);
        let info =
            |flags: BridgeVlanInfoFlags, vid| AfSpecBridge::VlanInfo(BridgeVlanInfo { flags, vid });
        assert_eq!(
            msg.attributes,
            [LinkAttribute::AfSpecBridge(vec![
                info(
                    BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
                    10
                ),
                info(BridgeVlanInfoFlags::empty(), 20),
                info(BridgeVlanInfoFlags::RangeBegin, 100),
                info(BridgeVlanInfoFlags::RangeEnd, 110),
            ])],
            "no bridge flags: the port's master (the bridge) takes it, like `bridge vlan add`"
        );
        // The dump's answer reads back to the same VLANs.
        let (index, back) = port_vlans_of(&msg);
        assert_eq!(index, 9);
        assert_eq!(back, want.entries());
        // Deleting the default VLAN 1: one entry, flags irrelevant.
        let RouteNetlinkMessage::DelLink(del) = round_trip(RouteNetlinkMessage::DelLink(
            port_vlans_message(9, &[PortVlan::tagged(1)]),
        )) else {
            panic!("not RTM_DELLINK");
        };
        assert_eq!(
            del.attributes,
            [LinkAttribute::AfSpecBridge(vec![info(
                BridgeVlanInfoFlags::empty(),
                1
            )])]
        );
    }

    #[test]
    fn the_port_vlan_dump_asks_af_bridge_for_vlan_info() {
        let RouteNetlinkMessage::GetLink(msg) =
            round_trip(RouteNetlinkMessage::GetLink(port_vlans_dump_message()))
        else {
            panic!("not RTM_GETLINK");
        };
        assert_eq!(
            msg.header.interface_family,
            netlink_packet_route::AddressFamily::Bridge
        );
        assert_eq!(msg.header.index, 0);
        assert_eq!(
            msg.attributes,
            [LinkAttribute::ExtMask(vec![LinkExtentMask::Brvlan])]
        );
    }

    #[test]
    fn vlan_info_ranges_never_hold_the_pvid_or_mixed_flags() {
        use crate::vlan::PortVlan;
        let untagged = |vid| PortVlan {
            vid,
            pvid: false,
            untagged: true,
        };
        let infos = vlan_infos(&[
            PortVlan::tagged(3),
            PortVlan::access(2),
            PortVlan::tagged(4),
            untagged(5),
            untagged(6),
            PortVlan::tagged(8),
        ]);
        let got: Vec<(u16, BridgeVlanInfoFlags)> = infos
            .iter()
            .map(|a| match a {
                AfSpecBridge::VlanInfo(i) => (i.vid, i.flags),
                other => panic!("{other:?}"),
            })
            .collect();
        use BridgeVlanInfoFlags as F;
        assert_eq!(
            got,
            [
                (2, F::Pvid | F::Untagged),
                (3, F::RangeBegin),
                (4, F::RangeEnd),
                (5, F::Untagged | F::RangeBegin),
                (6, F::Untagged | F::RangeEnd),
                (8, F::empty()),
            ]
        );
    }

    #[test]
    fn route_with_foreign_source_is_invalid() {
        let spec = RouteSpec {
            dst: "10.1.2.0/24".parse().unwrap(),
            gateway: None,
            oif: Some(3),
            src: Some("fd00::1".parse().unwrap()),
        };
        assert!(matches!(
            Netlink::route_message("t", &spec),
            Err(NetlinkError::Invalid { .. })
        ));
    }
}

//! Links: looking them up and listing them, creating bridges and veth pairs, setting their
//! state, MTU, MAC, alias, name, controller and namespace, deleting them; and the bridge and
//! bridge-port options weft sets (hairpin mode, no learning from link-local frames) along with
//! a bridge's forwarding database.

use super::{Netlink, NetlinkError, bad_ifname, check_ifname};
use crate::names;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, BridgeBooleanOptionFlags, BridgeBooleanOptions, In6AddrGenMode,
    InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute,
    LinkExtentMask, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth};
use std::os::fd::{AsRawFd, BorrowedFd};
use tracing::debug;

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
    /// `IFLA_LINK`: for a veth, its peer's index (in the namespace [`LinkInfo::netns_id`]
    /// names, or this one).
    pub peer: Option<u32>,
    /// For a bridge, whether it filters VLANs (`IFLA_BR_VLAN_FILTERING`); `None` for other
    /// links.
    pub vlan_filtering: Option<bool>,
    /// For a bridge, whether it learns source MACs from link-local frames
    /// (`01:80:c2:00:00:0x`; `BR_BOOLOPT_NO_LL_LEARN` off); `None` for other links and
    /// kernels that do not report it.
    pub link_local_learning: Option<bool>,
    /// For a bridge, whether br_netfilter passes its bridged IPv4 and IPv6 to the `inet` hooks
    /// whatever the node's `net.bridge.bridge-nf-call-*` switches say
    /// (`IFLA_BR_NF_CALL_IPTABLES` and `IFLA_BR_NF_CALL_IP6TABLES` both on); `None` for other
    /// links and kernels without br_netfilter support.
    pub netfilter_calls: Option<bool>,
    /// For a bridge, whether it snoops IGMP and MLD (`IFLA_BR_MCAST_SNOOPING`); `None` for
    /// other links and kernels built without it.
    pub multicast_snooping: Option<bool>,
    /// For a bridge port, whether hairpin mode is on (`IFLA_BRPORT_MODE`: the bridge may send
    /// a frame back out of the port it came in on); `None` for other links.
    pub hairpin: Option<bool>,
}

/// A link's traffic counters (`IFLA_STATS64`), as the link counts them: `rx` is what it
/// received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets dropped on receipt.
    pub rx_dropped: u64,
    /// Packets dropped on sending.
    pub tx_dropped: u64,
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

/// The indexes of a veth pair made by [`Netlink::create_veth_pair_into_netns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedVeth {
    /// The host end's index.
    pub host: u32,
    /// The peer's index in its namespace, when asked for (see
    /// [`Netlink::create_veth_pair_into_netns`]).
    pub peer: Option<u32>,
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

pub(super) fn link_info(msg: LinkMessage) -> LinkInfo {
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
        peer: None,
        vlan_filtering: None,
        link_local_learning: None,
        netfilter_calls: None,
        multicast_snooping: None,
        hairpin: None,
    };
    // br_netfilter's calls for IPv4 and IPv6, as the bridge reports them.
    let mut calls: (Option<bool>, Option<bool>) = (None, None);
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Address(a) => info.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => info.mtu = m,
            LinkAttribute::Controller(m) if m != 0 => info.master = Some(m),
            LinkAttribute::IfAlias(a) if !a.is_empty() => info.alias = Some(a),
            LinkAttribute::LinkNetNsId(id) => info.netns_id = Some(id),
            LinkAttribute::Link(i) => info.peer = Some(i),
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
                                    InfoBridge::NfCallIpTables(on) => calls.0 = Some(on),
                                    InfoBridge::NfCallIp6Tables(on) => calls.1 = Some(on),
                                    InfoBridge::MulticastSnooping(on) => {
                                        info.multicast_snooping = Some(on);
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
    info.netfilter_calls = match calls {
        (Some(v4), Some(v6)) => Some(v4 && v6),
        (Some(false), None) | (None, Some(false)) => Some(false),
        _ => None,
    };
    info
}

/// `RTM_NEWLINK` on the existing bridge `index`: the safeguards every weft bridge has.
///
/// - No MAC learning from link-local frames (`IFLA_BR_MULTI_BOOLOPT` →
///   `BR_BOOLOPT_NO_LL_LEARN`): the bridge learns the source MAC of a frame to
///   `01:80:c2:00:00:0x` (LLDP, 802.1X, …) before any bridge-family netfilter hook sees it
///   (LLDP with no hook at all), so without this a port could teach the bridge another
///   workload's MAC, or the LAN router's, past the `bridge weft` guard, which checks source
///   MACs in `prerouting`.
/// - br_netfilter's calls on for this bridge (`IFLA_BR_NF_CALL_IPTABLES`,
///   `IFLA_BR_NF_CALL_IP6TABLES`): traffic between two of its ports meets the policies of the
///   `inet weft` table only through them. The bridge's own switches, not the node's
///   `net.bridge.bridge-nf-call-*`, on which other bridges of the node depend.
pub fn bridge_safeguards_message(index: u32) -> LinkMessage {
    LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
        .index(index)
        .append_info_data(InfoBridge::MultiBoolOpt(no_link_local_learning()))
        .append_info_data(InfoBridge::NfCallIpTables(true))
        .append_info_data(InfoBridge::NfCallIp6Tables(true))
        .build()
}

/// `RTM_NEWLINK` on the existing bridge `index`: IGMP and MLD snooping on or off
/// (`IFLA_BR_MCAST_SNOOPING`).
pub fn bridge_multicast_snooping_message(index: u32, on: bool) -> LinkMessage {
    LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
        .index(index)
        .append_info_data(InfoBridge::MulticastSnooping(on))
        .build()
}

/// The attribute that tells a link to generate no IPv6 address of its own (`addrgenmode none`).
fn no_v6_addresses() -> LinkAttribute {
    LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
        In6AddrGenMode::None,
    )])])
}

/// A switch's state as errors name it.
fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
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

impl Netlink {
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

    /// Every link of the namespace, with its counters or without (`IFLA_EXT_MASK`).
    fn dump_links(
        &mut self,
        op: &'static str,
        stats: bool,
    ) -> Result<Vec<LinkMessage>, NetlinkError> {
        let mut msg = LinkMessageBuilder::<LinkUnspec>::new();
        if !stats {
            msg =
                msg.append_extra_attribute(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        }
        let replies = self.call(
            op,
            String::new,
            RouteNetlinkMessage::GetLink(msg.build()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The traffic counters of every link of the namespace, by name.
    pub fn link_stats(&mut self) -> Result<Vec<(String, LinkStats)>, NetlinkError> {
        Ok(self
            .dump_links("list link counters", true)?
            .into_iter()
            .filter_map(|l| {
                let mut name = None;
                let mut stats = None;
                for attr in l.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::Stats64(s) => {
                            stats = Some(LinkStats {
                                rx_packets: s.rx_packets,
                                tx_packets: s.tx_packets,
                                rx_bytes: s.rx_bytes,
                                tx_bytes: s.tx_bytes,
                                rx_dropped: s.rx_dropped,
                                tx_dropped: s.tx_dropped,
                            })
                        }
                        _ => {}
                    }
                }
                Some((name?, stats?))
            })
            .collect())
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        Ok(self
            .dump_links("list links", false)?
            .into_iter()
            .map(link_info)
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

    /// Sends `msg`, an `RTM_NEWLINK` that creates link `name` (failing with
    /// [`NetlinkError::is_exists`] when the name is taken), and returns the new link's index,
    /// looked up by name ([`Netlink::link_index_and_mac`], without the RTNL lock) rather than
    /// echoed by the kernel: an echo is the new link's every attribute, built while the lock,
    /// which every other link change on the node waits for, is held.
    pub(super) fn create_link(
        &mut self,
        op: &'static str,
        name: &str,
        msg: LinkMessage,
        target: impl Fn() -> String,
    ) -> Result<u32, NetlinkError> {
        self.call(
            op,
            &target,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        match self.link_index_and_mac(name)? {
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
        // See `bridge_safeguards_message`.
        let mut b = LinkBridge::new(name)
            .no_linklocal_learn(true)
            .nf_call_iptables(true)
            .nf_call_ip6tables(true);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        if let Some(mac) = mac {
            b = b.address(mac.to_vec());
        }
        let index = self.create_link(OP, name, b.build(), || name.to_string())?;
        self.alias_new_link(index, alias)?;
        debug!(bridge = %name, index, "created bridge");
        Ok(index)
    }

    /// Creates a veth pair with one `RTM_NEWLINK`: the host end here (attached to
    /// `host_master`, with `host_alias`, up) and the peer born directly inside `peer_netns`
    /// (`IFLA_NET_NS_FD` in the peer's info; much cheaper than moving it afterwards) with
    /// `peer_mac`, down (the kernel cannot open a veth end before its peer exists). Returns
    /// the host end's index.
    ///
    /// Fails with [`NetlinkError::is_exists`] when a name is taken.
    pub fn create_veth_into_netns(&mut self, spec: &VethSpec<'_>) -> Result<u32, NetlinkError> {
        Ok(self.create_veth_pair_into_netns(spec, None)?.host)
    }

    /// [`Netlink::create_veth_into_netns`], returning the peer's index too when `peer_side`, a
    /// socket in the peer's namespace, is given. The kernel echoes nothing back: both indexes
    /// are looked up by name ([`Netlink::link_index_and_mac`]), without the RTNL lock, where
    /// an echo would be the new link's every attribute, built while the lock is held.
    pub fn create_veth_pair_into_netns(
        &mut self,
        spec: &VethSpec<'_>,
        peer_side: Option<&mut Netlink>,
    ) -> Result<CreatedVeth, NetlinkError> {
        const OP: &str = "create veth";
        let target = || format!("{} (peer {})", spec.host_name, spec.peer_name);
        check_ifname(OP, &target(), spec.host_name)?;
        check_ifname(OP, &target(), spec.peer_name)?;
        // One queue each way on both ends, as the kernel uses by default: asked for at
        // creation, no per-CPU queue is registered (in sysfs) and then taken down again.
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.peer_name)
            .setns_by_fd(spec.peer_netns.as_raw_fd())
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1));
        if let Some(mac) = spec.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
            .up();
        if let Some(mtu) = spec.mtu {
            host = host.mtu(mtu);
        }
        if let Some(master) = spec.host_master {
            host = host.controller(master);
        }
        let index = self.create_link(OP, spec.host_name, host.build(), target)?;
        self.alias_new_link(index, spec.host_alias)?;
        let peer = match peer_side {
            Some(nl) => nl.link_index_and_mac(spec.peer_name)?.map(|l| l.index),
            None => None,
        };
        debug!(host = %spec.host_name, peer = %spec.peer_name, index, "created veth");
        Ok(CreatedVeth { host: index, peer })
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
        self.create_link(OP, a, host.build(), target)
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

    /// Sends `msg`, a change to an existing link that the kernel takes only as `RTM_NEWLINK`:
    /// a bridge's or a bridge port's options are link info, which `RTM_SETLINK` does not
    /// read. `target` names the change in an error.
    pub(super) fn change_link(
        &mut self,
        op: &'static str,
        target: impl Fn() -> String,
        msg: LinkMessage,
    ) -> Result<(), NetlinkError> {
        self.call(op, target, RouteNetlinkMessage::NewLink(msg), 0)?;
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

    /// Sets a link up, giving it MAC `mac` first when one is given, in one request (the kernel
    /// applies the address before the flags, so the link comes up with it: an IPv6 link-local
    /// address is derived from it).
    pub fn set_address_and_up(
        &mut self,
        index: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<(), NetlinkError> {
        let Some(mac) = mac else {
            return self.set_up(index);
        };
        self.set_link(
            "set link address and up",
            index,
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .up()
                .build(),
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
    pub(super) fn alias_new_link(
        &mut self,
        index: u32,
        alias: Option<&str>,
    ) -> Result<(), NetlinkError> {
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

    /// Deletes links `indexes` together: the kernel waits for one grace period for all of
    /// them instead of one per link (about 20 ms each on a busy node, holding the lock every
    /// other link change waits for). They are moved into link group
    /// [`names::DELETE_GROUP`], which is then deleted as a whole (`ip link del group`); links
    /// gone meanwhile are skipped. Returns how many were deleted. Should the kernel refuse the
    /// group (a link someone else put in it cannot be deleted), each of `indexes` is deleted
    /// on its own.
    pub fn delete_links(&mut self, indexes: &[u32]) -> Result<usize, NetlinkError> {
        const OP: &str = "delete links";
        if let [index] = indexes {
            return Ok(usize::from(self.delete_link(*index)?));
        }
        let mut moved = Vec::with_capacity(indexes.len());
        for &index in indexes {
            match self.set_group(OP, index, names::DELETE_GROUP) {
                Ok(()) => moved.push(index),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    // None is left where a later deletion of the group would take it along.
                    self.regroup(OP, &moved);
                    return Err(e);
                }
            }
        }
        if moved.is_empty() {
            return Ok(0);
        }
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::Group(names::DELETE_GROUP));
        match self.call(
            OP,
            || format!("link group {:#x}", names::DELETE_GROUP),
            RouteNetlinkMessage::DelLink(msg),
            0,
        ) {
            Ok(_) => {
                debug!(links = ?moved, "deleted links");
                Ok(moved.len())
            }
            Err(e) if e.is_not_found() => Ok(0),
            Err(_) => {
                let mut deleted = 0;
                for (i, &index) in moved.iter().enumerate() {
                    match self.delete_link(index) {
                        Ok(gone) => deleted += usize::from(gone),
                        Err(e) => {
                            self.regroup(OP, &moved[i..]);
                            return Err(e);
                        }
                    }
                }
                Ok(deleted)
            }
        }
    }

    /// Puts link `index` into link group `group`.
    fn set_group(&mut self, op: &'static str, index: u32, group: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes.push(LinkAttribute::Group(group));
        self.set_link(op, index, msg)
    }

    /// Links `indexes`, moved into [`names::DELETE_GROUP`] and not deleted, back into the
    /// default group (best effort: one that cannot be moved is logged; weft resets the group of
    /// an IFB link whenever it keeps one as a spare or adopts one).
    fn regroup(&mut self, op: &'static str, indexes: &[u32]) {
        for &index in indexes {
            if let Err(e) = self.set_group(op, index, 0)
                && !e.is_not_found()
            {
                tracing::warn!(index, error = %e, "a link left in weft's deletion group");
            }
        }
    }

    /// Turns hairpin mode of bridge port `index` on or off (see [`port_hairpin_message`]).
    pub fn set_port_hairpin(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        self.change_link(
            "set bridge port hairpin",
            || format!("link {index} hairpin {}", on_off(on)),
            port_hairpin_message(index, on),
        )
    }

    /// Prepares a workload's host port in one request: hairpin `on`, alias `alias`, and no
    /// IPv6 address of the node's own on it (`addrgenmode none`). The port only carries the
    /// workload's frames (the node's addresses are on the bridge), so the kernel neither gives
    /// it a link-local address nor sends duplicate address detection, router solicitations and
    /// MLD reports into the workload when its carrier comes up, and has none to remove when
    /// it goes. A kernel without IPv6 (`ipv6.disable=1`) gets the request without that part.
    pub fn set_workload_port(
        &mut self,
        index: u32,
        on: bool,
        alias: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = port_hairpin_message(index, on);
        msg.attributes
            .push(LinkAttribute::IfAlias(alias.to_string()));
        self.call_without_v6_addresses(
            "set bridge port hairpin and alias",
            || format!("link {index} hairpin {} alias {alias}", on_off(on)),
            msg,
            RouteNetlinkMessage::NewLink,
        )
    }

    /// Tells link `index` to generate no IPv6 address of its own (`addrgenmode none`): no
    /// link-local address, so no duplicate address detection, router solicitations or MLD
    /// reports from it. It removes no address the link has: send it before the link's carrier
    /// comes on. A kernel without IPv6 (`ipv6.disable=1`) has nothing to tell: nothing is sent
    /// a second time.
    pub fn set_no_v6_addresses(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes.push(no_v6_addresses());
        match self.call(
            "set link addrgenmode none",
            || format!("link {index} addrgenmode none"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Sends `msg`, a request about one link (`wrap` makes it the message type), with the
    /// link told to generate no IPv6 address of its own (`addrgenmode none`: no link-local
    /// address, duplicate address detection or MLD reports). A kernel without IPv6
    /// (`ipv6.disable=1`) refuses that address family: it gets `msg` as it is.
    pub(super) fn call_without_v6_addresses(
        &mut self,
        op: &'static str,
        target: impl Fn() -> String,
        msg: LinkMessage,
        wrap: fn(LinkMessage) -> RouteNetlinkMessage,
    ) -> Result<(), NetlinkError> {
        let mut without = msg.clone();
        without.attributes.push(no_v6_addresses());
        match self.call(op, &target, wrap(without), 0) {
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => {
                self.call(op, &target, wrap(msg), 0)?;
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Turns IGMP and MLD snooping of bridge `index` on or off (see
    /// [`bridge_multicast_snooping_message`]). A kernel built without snooping ignores it.
    pub fn set_multicast_snooping(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        self.change_link(
            "set bridge multicast snooping",
            || format!("link {index} mcast_snooping {}", u8::from(on)),
            bridge_multicast_snooping_message(index, on),
        )
    }

    /// Gives bridge `index` weft's safeguards (see [`bridge_safeguards_message`]).
    pub fn set_bridge_safeguards(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.change_link(
            "set bridge safeguards",
            || format!("link {index} no_linklocal_learn 1 nf_call_iptables 1 nf_call_ip6tables 1"),
            bridge_safeguards_message(index),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::round_trip;
    use super::*;

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
    fn the_safeguards_message_sets_the_boolopt_and_netfilter_calls_and_a_dump_reads_them_back() {
        let RouteNetlinkMessage::NewLink(msg) =
            round_trip(RouteNetlinkMessage::NewLink(bridge_safeguards_message(7)))
        else {
            panic!("not RTM_NEWLINK");
        };
        assert_eq!(msg.header.index, 7);
        assert_eq!(
            msg.attributes,
            [LinkAttribute::LinkInfo(vec![
                NlLinkInfo::Kind(InfoKind::Bridge),
                NlLinkInfo::Data(InfoData::Bridge(vec![
                    InfoBridge::MultiBoolOpt(no_link_local_learning()),
                    InfoBridge::NfCallIpTables(true),
                    InfoBridge::NfCallIp6Tables(true),
                ])),
            ])]
        );
        let info = link_info(msg);
        assert_eq!(info.link_local_learning, Some(false));
        assert_eq!(info.netfilter_calls, Some(true));
        assert_eq!(info.multicast_snooping, None);
    }

    #[test]
    fn the_snooping_message_sets_the_switch_and_a_dump_reads_it_back() {
        for on in [false, true] {
            let RouteNetlinkMessage::NewLink(msg) = round_trip(RouteNetlinkMessage::NewLink(
                bridge_multicast_snooping_message(9, on),
            )) else {
                panic!("not RTM_NEWLINK");
            };
            assert_eq!(msg.header.index, 9);
            assert_eq!(link_info(msg).multicast_snooping, Some(on));
        }
    }
}

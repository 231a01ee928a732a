//! What the node plan's apply and the uplink share: the bridge of a network as the plan wants it
//! ([`BridgePlan`], with its uplink [`UplinkPlan`]), the link operations that make it
//! ([`Links`]), the errors of an apply ([`ApplyError`]) and what it changed ([`ApplyReport`]).
//! [`crate::uplink`] attaches and detaches uplinks with these; [`crate::plan`] applies the
//! whole node plan.

use crate::names;
use crate::netlink::{LinkInfo, NetlinkError, RouteEntry};
use crate::nft;
use crate::state;
use crate::vlan::PortVlan;
use ipnet::IpNet;
use std::collections::BTreeMap;

/// One Linux bridge weft owns for a network, with the gateway addresses on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    /// The network it belongs to.
    pub network: String,
    /// The link name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its fixed MAC.
    pub mac: [u8; 6],
    /// Gateway addresses, with the subnet's prefix length (NAT mode).
    pub addresses: Vec<IpNet>,
    /// Bridge mode: the node interface (or VLAN of it) attached to the bridge. The bridge then
    /// takes that interface's MAC instead of `mac`, and the node's addresses and routes move
    /// from the interface to the bridge (see [`crate::uplink`]).
    pub uplink: Option<UplinkPlan>,
}

/// The uplink of a Bridge network on one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UplinkPlan {
    /// The node interface named in `spec.bridge.uplink`.
    pub device: String,
    /// `spec.bridge.vlan`: weft makes an 802.1Q sub-interface of `device` and attaches that.
    pub vlan: Option<u16>,
    /// `spec.bridge.vlanFiltering`: the bridge filters VLANs and `device` itself is its trunk
    /// port, carrying the network's own VLAN and trunk VLANs tagged (`vlan` is then `None`).
    pub filtering: Option<crate::vlan::VlanFiltering>,
}

impl UplinkPlan {
    /// The link attached to the bridge: `device`, or its VLAN sub-interface (`eth1.10`, or a
    /// hashed `wv…` name when that would exceed 15 characters).
    pub fn port(&self) -> String {
        match self.vlan {
            None => self.device.clone(),
            Some(id) => {
                let natural = format!("{}.{id}", self.device);
                if natural.len() <= names::IFNAME_MAX {
                    natural
                } else {
                    let mac = names::hashed_mac(&[&self.device, &id.to_string()]);
                    format!(
                        "wv{:02x}{:02x}{:02x}{:02x}.{id}",
                        mac[2], mac[3], mac[4], mac[5]
                    )
                }
            }
        }
    }
}

/// Errors applying a plan.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A netlink operation failed.
    #[error("{op} failed")]
    Link {
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: NetlinkError,
    },
    /// A link with weft's name exists but is not weft's.
    #[error(
        "link {name} exists but was not created by weft (alias {alias:?}); rename or remove it, or choose another network name"
    )]
    ForeignLink {
        /// The link.
        name: String,
        /// Its alias.
        alias: Option<String>,
    },
    /// The nftables transaction failed.
    #[error("nftables transaction failed")]
    Firewall(#[source] nft::NftError),
    /// A sysctl could not be set.
    #[error("cannot set sysctl {key}")]
    Sysctl {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: crate::sysctl::SysctlError,
    },
    /// A state file could not be written.
    #[error("cannot write runtime state")]
    State(#[source] state::StateError),
    /// A Bridge network's uplink could not be attached (or was rolled back); the network is not
    /// realized, the others are.
    #[error("network {network}: {message}")]
    Uplink {
        /// The network.
        network: String,
        /// What happened and what to do.
        message: String,
    },
}

/// The link operations [`crate::plan::apply`] and the uplink need (real:
/// [`crate::netlink::Netlink`]; fake: `FakeLinks` in tests).
pub trait Links {
    /// All links of the namespace.
    fn list(&mut self) -> Result<Vec<LinkInfo>, ApplyError>;
    /// Creates a bridge, returns its index.
    fn create_bridge(
        &mut self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
        alias: &str,
    ) -> Result<u32, ApplyError>;
    /// Sets a link up.
    fn set_up(&mut self, index: u32) -> Result<(), ApplyError>;
    /// Sets the MTU.
    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), ApplyError>;
    /// Sets the MAC.
    fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), ApplyError>;
    /// Addresses of a link.
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, ApplyError>;
    /// Adds an address.
    fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError>;
    /// Removes an address.
    fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), ApplyError>;
    /// Deletes a link.
    fn delete_link(&mut self, index: u32) -> Result<(), ApplyError>;
    /// Attaches a link to a bridge (`None`: detaches it).
    fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), ApplyError>;
    /// The routes out of a link (kernel-made ones excepted).
    fn routes_via(&mut self, index: u32) -> Result<Vec<RouteEntry>, ApplyError>;
    /// Adds a route out of `oif`, replacing one with the same key.
    fn replace_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError>;
    /// Deletes a route out of `oif` (absent is fine).
    fn del_route(&mut self, route: &RouteEntry, oif: u32) -> Result<(), ApplyError>;
    /// Turns VLAN filtering of bridge `index` on or off (a kernel without it answers
    /// `EOPNOTSUPP`).
    fn set_vlan_filtering(&mut self, index: u32, on: bool) -> Result<(), ApplyError>;
    /// Gives bridge `index` weft's safeguards: no MAC learning from link-local frames, and
    /// br_netfilter's calls on (bridges are created that way; this corrects older ones; see
    /// `netlink::bridge_safeguards_message`).
    fn set_bridge_safeguards(&mut self, index: u32) -> Result<(), ApplyError>;
    /// Turns IGMP and MLD snooping of bridge `index` on or off (see
    /// `netlink::bridge_multicast_snooping_message`).
    fn set_multicast_snooping(&mut self, index: u32, on: bool) -> Result<(), ApplyError>;
    /// Turns hairpin mode of bridge port `index` on or off (the CNI makes workload ports with
    /// it on; this corrects older ones).
    fn set_port_hairpin(&mut self, index: u32, on: bool) -> Result<(), ApplyError>;
    /// The VLANs of every bridge port, by port index (ports of bridges that do not filter
    /// VLANs hold none).
    fn port_vlans(&mut self) -> Result<BTreeMap<u32, Vec<PortVlan>>, ApplyError>;
    /// Adds (or updates the flags of) `add` on bridge port `index`, then deletes `del`.
    fn change_port_vlans(
        &mut self,
        index: u32,
        add: &[PortVlan],
        del: &[u16],
    ) -> Result<(), ApplyError>;
    /// Creates VLAN `id` on `parent` with an alias; returns its index.
    fn create_vlan(
        &mut self,
        name: &str,
        parent: u32,
        id: u16,
        alias: &str,
    ) -> Result<u32, ApplyError>;
    /// Does `gateway` answer ARP (IPv4) or neighbour discovery (IPv6) from `src` out of link
    /// `index` within `timeout`?
    fn probe_gateway(
        &mut self,
        index: u32,
        mac: [u8; 6],
        src: std::net::IpAddr,
        gateway: std::net::IpAddr,
        timeout: std::time::Duration,
    ) -> Result<bool, ApplyError>;
}

/// What an apply changed; empty when the node already matched the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// One line per change, for logs and the lab's output.
    pub changes: Vec<String>,
    /// Networks that could not be realized (their uplink), with the reason: the rest of the
    /// plan is applied, these networks' runtime state is withheld so no workload attaches.
    pub failed: Vec<(String, String)>,
}

impl ApplyReport {
    /// True when nothing changed.
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }
}

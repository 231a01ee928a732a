//! Addresses: listing the addresses of one link or of all, adding one (optionally without
//! IPv6 duplicate address detection) and removing one.

use super::{Netlink, NetlinkError};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::AddressMessageBuilder;
use std::net::{Ipv4Addr, Ipv6Addr};

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

impl Netlink {
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
}

//! VLANs: 802.1Q sub-interfaces of a link, a bridge's VLAN filtering, and the VLANs of bridge
//! ports (`bridge vlan add|del|show`), with the messages that carry them.

use super::{Netlink, NetlinkError, check_ifname};
use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoKind, LinkAttribute, LinkExtentMask,
    LinkMessage,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkVlan};

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

impl Netlink {
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
        let index = self.create_link(OP, name, vlan_message(name, parent, id, mtu), target)?;
        self.alias_new_link(index, alias)?;
        Ok(index)
    }

    /// Turns VLAN filtering of bridge `index` on or off. A kernel without it
    /// (`CONFIG_BRIDGE_VLAN_FILTERING` unset) answers `EOPNOTSUPP`
    /// ([`NetlinkError::is_not_supported`]).
    pub fn set_vlan_filtering(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        self.change_link(
            "set bridge vlan filtering",
            || format!("link {index} vlan_filtering {}", u8::from(on)),
            bridge_vlan_filtering_message(index, on),
        )
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

#[cfg(test)]
mod tests {
    use super::super::link::link_info;
    use super::super::tests::round_trip;
    use super::*;
    use netlink_packet_route::link::{InfoBridge, InfoData, LinkInfo as NlLinkInfo};

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
}

//! Traffic control: an ingress qdisc and a `u32` filter whose `mirred` action redirects every
//! frame entering one link out of another, which is how two links are joined back to back.

use super::{Netlink, NetlinkError};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;

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

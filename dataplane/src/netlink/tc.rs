//! Traffic control: an ingress qdisc and a `u32` filter whose `mirred` action redirects every
//! frame entering one link out of another, which is how two links are joined back to back;
//! and mirrors: a `clsact` qdisc on a workload's host port whose classic-BPF filters copy the
//! frames [`crate::mirror::program`] picks to another link (`mirred egress mirror`).

use super::link::link_info;
use super::{LinkInfo, Netlink, NetlinkError};
use crate::mirror::{Insn, Side};
use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, Nla,
    NlaBuffer, NlasIterator, Parseable,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption,
    TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcStats2,
};
use tracing::debug;

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
        TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
        TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
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
    let action = mirred_action(to, TcMirrorActionType::EgressRedir, TcActionType::Stolen);
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

/// `TCA_BPF_ACT`, `TCA_BPF_OPS_LEN` and `TCA_BPF_OPS` (linux/pkt_cls.h: ACT 1, POLICE 2,
/// CLASSID 3, OPS_LEN 4, OPS 5, FD 6), which netlink-packet-route does not name: the filter's
/// actions and its classic BPF program.
const TCA_BPF_ACT: u16 = 1;
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;

/// `TCA_STATS_PKT64`: the packet count when it no longer fits the 32 bits of
/// `TCA_STATS_BASIC`.
const TCA_STATS_PKT64: u16 = 8;

/// `ETH_P_ALL`: the filter sees frames of every ethertype.
const ETH_P_ALL: u16 = 0x0003;

/// The handle of the one `cls_bpf` program at each priority weft fills (each mirror priority,
/// and the shaping redirect's).
const BPF_HANDLE: u32 = 1;

/// Priority of the first mirror filter in each hook; mirrors take [`MIRROR_PREF`] to
/// `MIRROR_PREF + 255`, the rule at index `i` of its side's list at `MIRROR_PREF + i`.
/// Filters at other priorities are not weft's mirrors and are left alone.
pub const MIRROR_PREF: u16 = 0x4000;

/// How many mirrors one hook (side) of a port can have.
pub const MAX_MIRRORS_PER_SIDE: usize = 256;

/// A mirror on a host port: copy the frames `program` matches, travelling `side`, out of link
/// `to` (`mirred egress mirror`, verdict continue: the frame itself goes on untouched and the
/// next mirror gets its copy too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRule {
    /// The hook: [`Side::FromWorkload`] is the port's ingress, [`Side::ToWorkload`] its egress.
    pub side: Side,
    /// Which frames (see [`crate::mirror::program`]); at most 4096 instructions.
    pub program: Vec<Insn>,
    /// The index of the link the copies leave through: an analyzer's host port, or a VXLAN
    /// link to a remote collector ([`Netlink::ensure_vxlan`]).
    pub to: u32,
}

/// Packets and bytes one mirror filter copied (since the filter was installed; a changed rule
/// starts again from zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorCounter {
    /// The hook the filter sits in.
    pub side: Side,
    /// Its position among the rules of its side, in the order [`Netlink::set_mirrors`] got them.
    pub index: usize,
    /// Frames copied.
    pub packets: u64,
    /// Bytes copied, as the hook counts them: from the IP header on at the ingress hook
    /// ([`Side::FromWorkload`]), Ethernet header included at the egress hook.
    pub bytes: u64,
}

/// The tc hook of `side` on a host port: `ffff:fff2` (ingress) or `ffff:fff3` (egress).
fn hook(side: Side) -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: match side {
            Side::FromWorkload => TcHandle::MIN_INGRESS,
            Side::ToWorkload => TcHandle::MIN_EGRESS,
        },
    }
}

/// `RTM_NEWQDISC` (or `RTM_DELQDISC`): the clsact qdisc of link `index`, which holds its
/// ingress and egress filter hooks (`tc qdisc add dev X clsact`).
pub fn clsact_qdisc_message(index: u32) -> TcMessage {
    let mut q = TcMessage::with_index(i32::try_from(index).unwrap_or(0));
    q.header.parent = TcHandle::CLSACT;
    q.header.handle = TcHandle::from(0xffff_0000);
    q.attributes.push(TcAttribute::Kind("clsact".into()));
    q
}

/// The `mirred egress mirror` action to link `to`, verdict continue (`TC_ACT_UNSPEC`).
fn mirror_action(to: u32) -> TcAction {
    mirred_action(to, TcMirrorActionType::EgressMirror, TcActionType::Unspec)
}

/// A `mirred` action: `eaction` (mirror or redirect) out of link `to`, then `verdict`.
pub(super) fn mirred_action(
    to: u32,
    eaction: TcMirrorActionType,
    verdict: TcActionType,
) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = verdict;
    mirror.eaction = eaction;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    action
}

/// The bytes of a classic BPF program as `TCA_BPF_OPS` carries it (`struct sock_filter[]`).
pub(super) fn program_bytes(program: &[Insn]) -> Vec<u8> {
    program.iter().flat_map(|i| i.to_ne_bytes()).collect()
}

/// `RTM_NEWTFILTER`: a mirror in `side`'s hook of link `port` at priority `pref`, protocol
/// all, handle 1: `cls_bpf` running the classic `program` (not direct action), whose match runs
/// `mirred egress mirror dev TO continue` (`tc filter add dev PORT ingress|egress pref PREF
/// protocol all bpf bytecode '…' action mirred egress mirror dev TO continue`).
pub fn mirror_filter_message(
    port: u32,
    side: Side,
    pref: u16,
    program: &[Insn],
    to: u32,
) -> TcMessage {
    bpf_filter_message(port, side, pref, program, mirror_action(to))
}

/// `RTM_NEWTFILTER`: a `cls_bpf` filter in `side`'s hook of link `port` at priority `pref`,
/// protocol all, handle 1, running the classic `program` (not direct action) and, on a match,
/// `action`.
pub(super) fn bpf_filter_message(
    port: u32,
    side: Side,
    pref: u16,
    program: &[Insn],
    action: TcAction,
) -> TcMessage {
    let mut f = TcMessage::with_index(i32::try_from(port).unwrap_or(0));
    f.header.parent = hook(side);
    f.header.handle = TcHandle::from(BPF_HANDLE);
    // Priority, and protocol ETH_P_ALL in network byte order.
    f.header.info = u32::from(TcHandle {
        major: pref,
        minor: ETH_P_ALL.to_be(),
    });
    let actions = [action];
    let mut act = vec![0u8; actions.as_slice().buffer_len()];
    actions.as_slice().emit(&mut act);
    let len = u16::try_from(program.len()).unwrap_or(u16::MAX);
    f.attributes
        .push(TcAttribute::Kind(TcFilterBpf::KIND.to_string()));
    f.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
            TCA_BPF_OPS_LEN,
            len.to_ne_bytes().to_vec(),
        ))),
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
            TCA_BPF_OPS,
            program_bytes(program),
        ))),
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
            TCA_BPF_ACT | NLA_F_NESTED,
            act,
        ))),
    ]));
    f
}

/// `RTM_DELTFILTER`: every filter at priority `pref` of `side`'s hook of link `port`.
pub(super) fn delete_pref_message(port: u32, side: Side, pref: u16) -> TcMessage {
    let mut f = TcMessage::with_index(i32::try_from(port).unwrap_or(0));
    f.header.parent = hook(side);
    f.header.info = u32::from(TcHandle {
        major: pref,
        minor: 0,
    });
    f
}

/// `RTM_GETTFILTER` with `NLM_F_DUMP`: the filters of `side`'s hook of link `port`.
fn dump_filters_message(port: u32, side: Side) -> TcMessage {
    let mut f = TcMessage::with_index(i32::try_from(port).unwrap_or(0));
    f.header.parent = hook(side);
    f
}

/// The value of an attribute netlink-packet-route does not know.
pub(super) fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0u8; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

/// One filter of a hook, as a dump shows it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct DumpedFilter {
    pub(super) pref: u16,
    /// In network byte order, as the header carries it.
    protocol: u16,
    handle: u32,
    kind: Option<String>,
    /// `TCA_BPF_OPS`: the classic program (`None` for an eBPF program or another kind).
    ops: Option<Vec<u8>>,
    /// `TCA_BPF_FLAGS` has direct action.
    direct_action: bool,
    /// `TCA_BPF_CLASSID`.
    classid: bool,
    actions: Vec<DumpedAction>,
    /// The dump's head of a priority (no handle, no options), not a filter itself.
    pub(super) head: bool,
}

/// One action of a filter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DumpedAction {
    kind: String,
    /// For `mirred`: its parameters.
    mirror: Option<TcMirror>,
    packets: u64,
    bytes: u64,
}

impl DumpedFilter {
    /// The target of a mirror exactly as [`mirror_filter_message`] makes it, with `ops` as its
    /// program: `Some(to)`; `None` for anything else.
    fn mirror_target(&self, ops: &[u8]) -> Option<u32> {
        self.mirred_target(ops, TcMirrorActionType::EgressMirror, TcActionType::Unspec)
    }

    /// The target of a filter exactly as [`bpf_filter_message`] makes it, with `ops` as its
    /// program and a `mirred` action `eaction` with verdict `verdict`: `Some(to)`; `None` for
    /// anything else.
    pub(super) fn mirred_target(
        &self,
        ops: &[u8],
        eaction: TcMirrorActionType,
        verdict: TcActionType,
    ) -> Option<u32> {
        if self.kind.as_deref() != Some(TcFilterBpf::KIND)
            || self.protocol != ETH_P_ALL.to_be()
            || self.handle != BPF_HANDLE
            || self.direct_action
            || self.classid
            || self.ops.as_deref() != Some(ops)
        {
            return None;
        }
        self.single_mirror()
            .filter(|m| m.eaction == eaction)
            .filter(|m| m.generic.action == verdict)
            .map(|m| m.ifindex)
    }

    /// The filter's only action, if it is a `mirred` one.
    fn single_mirror(&self) -> Option<&TcMirror> {
        match self.actions.as_slice() {
            [a] if a.kind == TcActionMirror::KIND => a.mirror.as_ref(),
            _ => None,
        }
    }
}

pub(super) fn dumped_filter(msg: TcMessage) -> DumpedFilter {
    let info = TcHandle::from(msg.header.info);
    let mut f = DumpedFilter {
        pref: info.major,
        protocol: info.minor,
        handle: u32::from(msg.header.handle),
        head: true,
        ..DumpedFilter::default()
    };
    for attr in msg.attributes {
        match attr {
            TcAttribute::Kind(k) => f.kind = Some(k),
            TcAttribute::Options(opts) => {
                f.head = false;
                for opt in opts {
                    match opt {
                        TcOption::Bpf(TcFilterBpfOption::Flags(flags)) => {
                            f.direct_action = flags.contains(TcBpfFlags::DirectAction);
                        }
                        TcOption::Bpf(TcFilterBpfOption::ClassId(_)) => f.classid = true,
                        TcOption::Bpf(TcFilterBpfOption::Other(nla)) => {
                            match nla.kind() & NLA_TYPE_MASK {
                                TCA_BPF_OPS => f.ops = Some(nla_value(&nla)),
                                TCA_BPF_ACT => f.actions = dumped_actions(&nla_value(&nla)),
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// The actions nested in `TCA_BPF_ACT`, in order; one that does not parse is kept as an
/// action of unknown kind (so the filter is not taken for a mirror of ours).
fn dumped_actions(nested: &[u8]) -> Vec<DumpedAction> {
    let mut out = Vec::new();
    for nla in NlasIterator::new(nested) {
        let parsed = nla
            .ok()
            .and_then(|nla: NlaBuffer<&[u8]>| TcAction::parse(&nla).ok());
        let Some(action) = parsed else {
            out.push(DumpedAction::default());
            continue;
        };
        let mut a = DumpedAction::default();
        for attr in action.attributes {
            match attr {
                TcActionAttribute::Kind(k) => a.kind = k,
                TcActionAttribute::Options(opts) => {
                    for o in opts {
                        if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = o {
                            a.mirror = Some(m);
                        }
                    }
                }
                TcActionAttribute::Stats(stats) => (a.bytes, a.packets) = basic_counters(&stats),
                _ => {}
            }
        }
        out.push(a);
    }
    out
}

/// Bytes and packets from `TCA_STATS_BASIC` (the packets from `TCA_STATS_PKT64` when they
/// outgrew its 32 bits); zero when absent.
pub(super) fn basic_counters(stats: &[TcStats2]) -> (u64, u64) {
    let (mut bytes, mut packets, mut pkt64) = (0, 0, None);
    for s in stats {
        match s {
            TcStats2::Basic(b) => {
                bytes = b.bytes;
                packets = u64::from(b.packets);
            }
            TcStats2::Other(nla) if nla.kind() & NLA_TYPE_MASK == TCA_STATS_PKT64 => {
                let v = nla_value(nla);
                if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
                    pkt64 = Some(u64::from_ne_bytes(b));
                }
            }
            _ => {}
        }
    }
    (bytes, pkt64.unwrap_or(packets))
}

/// Is `pref` one of the mirror priorities? Its rule index if so.
fn mirror_index(pref: u16) -> Option<usize> {
    let i = usize::from(pref.checked_sub(MIRROR_PREF)?);
    (i < MAX_MIRRORS_PER_SIDE).then_some(i)
}

pub(super) const SIDES: [Side; 2] = [Side::FromWorkload, Side::ToWorkload];

/// The kind of the qdisc in link `port`'s ingress slot among `qdiscs` (see
/// [`Netlink::qdiscs_of`]), if any.
pub(super) fn ingress_slot_kind(qdiscs: &[TcMessage], port: u32) -> Option<String> {
    qdiscs.iter().find_map(|q| {
        if i64::from(q.header.index) != i64::from(port) || q.header.parent != TcHandle::CLSACT {
            return None;
        }
        q.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
    })
}

impl Netlink {
    /// Link `port` as the kernel reports it; fails with the kernel's own "no such device"
    /// ([`NetlinkError::is_not_found`]) when it does not exist.
    pub(super) fn require_link(
        &mut self,
        op: &'static str,
        port: u32,
    ) -> Result<LinkInfo, NetlinkError> {
        let msg = rtnetlink::LinkUnspec::new_with_index(port).build();
        let replies = self.call(
            op,
            || format!("link {port}"),
            RouteNetlinkMessage::GetLink(msg),
            0,
        )?;
        replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_info(l)),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::Vanished {
                op,
                target: format!("link {port}"),
            })
    }

    /// Every qdisc of the namespace (roots, their children and the ingress or clsact ones), in
    /// one dump.
    pub(super) fn all_qdiscs(&mut self, op: &'static str) -> Result<Vec<TcMessage>, NetlinkError> {
        Ok(self
            .call(
                op,
                || "dump qdiscs".to_string(),
                RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
                netlink_packet_core::NLM_F_DUMP,
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
                _ => None,
            })
            .collect())
    }

    /// The root qdisc and the ingress-slot qdisc (`clsact`, `ingress`) of each of links
    /// `links`, asked for link by link: a dump would list every qdisc of the namespace, which
    /// grows with its shaped ports, on every change of one port. A link without one of them
    /// (or gone) shows fewer.
    pub(super) fn qdiscs_of(
        &mut self,
        op: &'static str,
        links: &[u32],
    ) -> Result<Vec<TcMessage>, NetlinkError> {
        let mut out = Vec::new();
        for &link in links {
            for parent in [TcHandle::ROOT, TcHandle::CLSACT] {
                let mut q = TcMessage::with_index(i32::try_from(link).unwrap_or(0));
                q.header.parent = parent;
                match self.call(
                    op,
                    || format!("link {link}: get qdisc {parent}"),
                    RouteNetlinkMessage::GetQueueDiscipline(q),
                    // The kernel answers a qdisc get as a notification: to the asker only
                    // when it asks for the echo.
                    netlink_packet_core::NLM_F_ECHO,
                ) {
                    Ok(replies) => out.extend(replies.into_iter().filter_map(|m| match m {
                        RouteNetlinkMessage::NewQueueDiscipline(q)
                            if i64::from(q.header.index) == i64::from(link) =>
                        {
                            Some(q)
                        }
                        _ => None,
                    })),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// The kind of the qdisc in link `port`'s ingress slot (`"clsact"`, `"ingress"`), if any.
    fn ingress_slot_qdisc(
        &mut self,
        op: &'static str,
        port: u32,
    ) -> Result<Option<String>, NetlinkError> {
        Ok(ingress_slot_kind(&self.qdiscs_of(op, &[port])?, port))
    }

    /// The filters of `side`'s hook of link `port` (none without a clsact or ingress qdisc).
    pub(super) fn hook_filters(
        &mut self,
        op: &'static str,
        port: u32,
        side: Side,
    ) -> Result<Vec<DumpedFilter>, NetlinkError> {
        let replies = self.call(
            op,
            || format!("link {port}: list {side:?} filters"),
            RouteNetlinkMessage::GetTrafficFilter(dump_filters_message(port, side)),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(dumped_filter(f)),
                _ => None,
            })
            .collect())
    }

    /// Adds a clsact qdisc to link `port`: `Ok(true)` when added, `Ok(false)` when one was made
    /// meanwhile (if that is not a clsact, adding filters to it fails).
    pub(super) fn add_clsact(&mut self, op: &'static str, port: u32) -> Result<bool, NetlinkError> {
        match self.call(
            op,
            || format!("link {port}: add clsact qdisc"),
            RouteNetlinkMessage::NewQueueDiscipline(clsact_qdisc_message(port)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the mirror filters of link `port` exactly `rules`.
    ///
    /// Ensures the clsact qdisc, then keeps one `cls_bpf` filter per rule in its side's hook
    /// (ingress for [`Side::FromWorkload`], egress for [`Side::ToWorkload`]) at
    /// [`MIRROR_PREF`] + its index among the rules of that side, whose action is `mirred
    /// egress mirror` to the rule's `to` with verdict continue: every mirror on the port gets
    /// its copy and the frame itself goes on untouched. Filters at other priorities are left
    /// alone; mirror priorities not in `rules` are emptied. With no rules left, the clsact
    /// qdisc is removed when nothing else is on it.
    ///
    /// Idempotent: `Ok(false)`, and no change sent, when the kernel already has exactly these
    /// filters (same program bytes and target link). A changed rule is replaced (delete then
    /// add: for a moment that mirror copies nothing, and its counters start again).
    ///
    /// Errors: a `port` that does not exist → [`NetlinkError::is_not_found`]; more than
    /// [`MAX_MIRRORS_PER_SIDE`] rules on one side, or a port whose ingress slot holds a plain
    /// `ingress` qdisc (e.g. one [`Netlink::join_links`] made) → [`NetlinkError::Invalid`]; a
    /// program the kernel refuses (over 4096 instructions, a jump out of it) or a `to` that
    /// does not exist → [`NetlinkError::Kernel`].
    pub fn set_mirrors(&mut self, port: u32, rules: &[MirrorRule]) -> Result<bool, NetlinkError> {
        const OP: &str = "set mirrors";
        self.require_link(OP, port)?;
        let mut wanted: Vec<(Side, u16, &MirrorRule)> = Vec::with_capacity(rules.len());
        for side in SIDES {
            for (i, rule) in rules.iter().filter(|r| r.side == side).enumerate() {
                let pref = u16::try_from(i)
                    .ok()
                    .filter(|_| i < MAX_MIRRORS_PER_SIDE)
                    .map(|i| MIRROR_PREF + i);
                let Some(pref) = pref else {
                    return Err(NetlinkError::Invalid {
                        op: OP,
                        target: format!("link {port}"),
                        reason: format!(
                            "{} {side:?} mirrors; a port takes at most {MAX_MIRRORS_PER_SIDE} per \
                             side: merge filters that copy to the same link",
                            rules.iter().filter(|r| r.side == side).count()
                        ),
                    });
                };
                wanted.push((side, pref, rule));
            }
        }

        let qdisc = self.ingress_slot_qdisc(OP, port)?;
        let mut changed = false;
        match qdisc.as_deref() {
            Some("clsact") => {}
            Some(other) if !rules.is_empty() => {
                return Err(NetlinkError::Invalid {
                    op: OP,
                    target: format!("link {port}"),
                    reason: format!(
                        "its ingress slot holds a {other:?} qdisc, and mirrors need a clsact \
                         qdisc there: remove that qdisc (tc qdisc del dev … {other}) or mirror \
                         another link"
                    ),
                });
            }
            // Nothing of ours can be there: no clsact, no mirrors.
            Some(_) => return Ok(false),
            None if rules.is_empty() => return Ok(false),
            None => changed |= self.add_clsact(OP, port)?,
        }

        let mut others_left = false;
        for side in SIDES {
            let dumped = self.hook_filters(OP, port, side)?;
            let mut present: Vec<u16> = Vec::new();
            for f in &dumped {
                if mirror_index(f.pref).is_none() {
                    others_left = true;
                } else if !present.contains(&f.pref) {
                    present.push(f.pref);
                }
            }
            for pref in present {
                let filters: Vec<&DumpedFilter> = dumped
                    .iter()
                    .filter(|f| f.pref == pref && !f.head)
                    .collect();
                let keep = wanted
                    .iter()
                    .find(|(s, p, _)| *s == side && *p == pref)
                    .is_some_and(|(_, _, rule)| {
                        let ops = program_bytes(&rule.program);
                        matches!(filters.as_slice(), [f] if f.mirror_target(&ops) == Some(rule.to))
                    });
                if keep {
                    wanted.retain(|(s, p, _)| !(*s == side && *p == pref));
                    continue;
                }
                match self.call(
                    OP,
                    || format!("link {port}: delete {side:?} filter pref {pref}"),
                    RouteNetlinkMessage::DelTrafficFilter(delete_pref_message(port, side, pref)),
                    0,
                ) {
                    Ok(_) => changed = true,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }

        for (side, pref, rule) in &wanted {
            self.call(
                OP,
                || {
                    format!(
                        "link {port}: add {side:?} mirror pref {pref} to link {}",
                        rule.to
                    )
                },
                RouteNetlinkMessage::NewTrafficFilter(mirror_filter_message(
                    port,
                    *side,
                    *pref,
                    &rule.program,
                    rule.to,
                )),
                NLM_F_CREATE | NLM_F_EXCL,
            )?;
            changed = true;
        }

        if rules.is_empty() && !others_left {
            match self.call(
                OP,
                || format!("link {port}: delete clsact qdisc"),
                RouteNetlinkMessage::DelQueueDiscipline(clsact_qdisc_message(port)),
                0,
            ) {
                Ok(_) => changed = true,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        if changed {
            debug!(port, rules = rules.len(), "set mirrors");
        }
        Ok(changed)
    }

    /// The counters of the mirror filters on link `port` (from a filter dump: the `mirred`
    /// action's statistics), by side and then index. Filters at the mirror priorities that
    /// are not mirrors are skipped. A `port` that does not exist →
    /// [`NetlinkError::is_not_found`].
    pub fn mirror_counters(&mut self, port: u32) -> Result<Vec<MirrorCounter>, NetlinkError> {
        const OP: &str = "read mirror counters";
        self.require_link(OP, port)?;
        let mut out = Vec::new();
        for side in SIDES {
            for f in self.hook_filters(OP, port, side)? {
                let Some(index) = mirror_index(f.pref) else {
                    continue;
                };
                if f.kind.as_deref() != Some(TcFilterBpf::KIND) || f.single_mirror().is_none() {
                    continue;
                }
                for a in &f.actions {
                    out.push(MirrorCounter {
                        side,
                        index,
                        packets: a.packets,
                        bytes: a.bytes,
                    });
                }
            }
        }
        out.sort_by_key(|c| (c.side, c.index));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::round_trip;
    use super::*;
    use crate::mirror::{L4, MirrorFilter, program};

    fn prog() -> Vec<Insn> {
        program(
            &MirrorFilter {
                protocols: vec![L4::Udp],
                ports: vec![(53, 53)],
                cidrs: vec![],
            },
            Side::FromWorkload,
        )
    }

    #[test]
    fn the_mirror_filter_carries_the_program_and_a_mirred_mirror_that_continues() {
        let p = prog();
        let msg = mirror_filter_message(7, Side::ToWorkload, MIRROR_PREF + 3, &p, 9);
        let RouteNetlinkMessage::NewTrafficFilter(back) =
            round_trip(RouteNetlinkMessage::NewTrafficFilter(msg))
        else {
            panic!("not RTM_NEWTFILTER");
        };
        assert_eq!(back.header.index, 7);
        assert_eq!(u32::from(back.header.parent), 0xffff_fff3);
        assert_eq!(
            back.header.info,
            (u32::from(MIRROR_PREF + 3) << 16) | 0x0300
        );
        let f = dumped_filter(back);
        assert!(!f.head);
        assert_eq!(f.pref, MIRROR_PREF + 3);
        assert_eq!(f.ops.as_deref(), Some(program_bytes(&p).as_slice()));
        assert_eq!(f.ops.as_ref().map(|o| o.len()), Some(8 * p.len()));
        assert_eq!(f.mirror_target(&program_bytes(&p)), Some(9));
        assert_eq!(
            f.mirror_target(&program_bytes(&p[1..])),
            None,
            "other program"
        );
        let m = f.single_mirror().unwrap();
        assert_eq!(m.eaction, TcMirrorActionType::EgressMirror);
        assert_eq!(i32::from(m.generic.action), -1, "TC_ACT_UNSPEC: continue");
    }

    #[test]
    fn the_ops_length_is_a_native_u16_and_the_actions_nest_at_type_1() {
        let p = prog();
        let msg = mirror_filter_message(1, Side::FromWorkload, MIRROR_PREF, &p, 2);
        let Some(TcAttribute::Options(opts)) = msg.attributes.get(1) else {
            panic!("no options");
        };
        let kinds: Vec<u16> = opts.iter().map(|o| o.kind() & NLA_TYPE_MASK).collect();
        assert_eq!(kinds, [TCA_BPF_OPS_LEN, TCA_BPF_OPS, TCA_BPF_ACT]);
        let TcOption::Bpf(TcFilterBpfOption::Other(len)) = &opts[0] else {
            panic!("ops len");
        };
        assert_eq!(nla_value(len), (p.len() as u16).to_ne_bytes());
        assert_eq!(u32::from(msg.header.parent), 0xffff_fff2);
    }

    #[test]
    fn a_filter_with_another_action_or_protocol_is_not_our_mirror() {
        let p = prog();
        let ops = program_bytes(&p);
        let mut f = dumped_filter(mirror_filter_message(
            1,
            Side::FromWorkload,
            MIRROR_PREF,
            &p,
            2,
        ));
        assert_eq!(f.mirror_target(&ops), Some(2));
        let mut other = f.clone();
        other.protocol = 0x0008; // ETH_P_IP
        assert_eq!(other.mirror_target(&ops), None);
        let mut da = f.clone();
        da.direct_action = true;
        assert_eq!(da.mirror_target(&ops), None);
        if let Some(m) = f.actions[0].mirror.as_mut() {
            m.eaction = TcMirrorActionType::EgressRedir;
        }
        assert_eq!(f.mirror_target(&ops), None, "a redirect steals the frame");
    }

    #[test]
    fn the_clsact_qdisc_sits_in_the_ingress_slot() {
        let q = clsact_qdisc_message(4);
        assert_eq!(u32::from(q.header.parent), 0xffff_fff1);
        assert_eq!(u32::from(q.header.handle), 0xffff_0000);
        assert_eq!(q.attributes, [TcAttribute::Kind("clsact".into())]);
    }

    #[test]
    fn mirror_priorities_are_a_window_of_256() {
        assert_eq!(mirror_index(MIRROR_PREF), Some(0));
        assert_eq!(mirror_index(MIRROR_PREF + 255), Some(255));
        assert_eq!(mirror_index(MIRROR_PREF + 256), None);
        assert_eq!(mirror_index(MIRROR_PREF - 1), None);
        assert_eq!(mirror_index(1), None);
    }
}

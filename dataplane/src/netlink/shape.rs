//! Bandwidth shaping on a workload's host port, as the CNI `bandwidth` plugin does it: a `tbf`
//! qdisc at the port's root limits what goes to the workload; what the workload sends enters
//! the port, where nothing can be queued, so a filter in the port's clsact ingress hook
//! redirects every frame to an IFB link whose root `tbf` limits it, and the IFB hands the
//! frames back to the port's receive path (the bridge, nftables and the rest see them as
//! before, only later or not at all).
//!
//! Of the redirects this kernel offers, tc's is the cheapest to set up and take down: an eBPF
//! program attached with tcx waits a whole RCU grace period under the routing lock at every
//! attach and detach, and a per-port nftables `netdev` chain that `fwd`s to the IFB halves the
//! throughput of concurrent ADDs (docs/benchmarks.md, "Two redirects without a `clsact`").

use super::tc::{
    DumpedFilter, SIDES, basic_counters, bpf_filter_message, clsact_qdisc_message,
    delete_pref_message, ingress_slot_kind, mirred_action, nla_value, program_bytes,
};
use super::{LinkInfo, Netlink, NetlinkError, check_ifname};
use crate::mirror::{Insn, MirrorFilter, Side, program};
use crate::names;
use netlink_packet_core::{
    DefaultNla, NLA_TYPE_MASK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, Nla, NlaBuffer,
    NlasIterator,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage, Prop};
use netlink_packet_route::tc::{
    TcActionType, TcAttribute, TcHandle, TcMessage, TcMirrorActionType, TcOption, TcStats2,
};
use rtnetlink::{LinkIfb, LinkUnspec};
use tracing::debug;

/// Priority of the filter in a host port's clsact ingress hook that redirects what the
/// workload sends to its IFB link. Mirrors ([`super::MIRROR_PREF`] and up) sit before it, so
/// they still see every frame; the redirect steals the frame, so filters after it see none.
/// Whatever is at this priority of a port's ingress hook is taken for weft's redirect.
pub const SHAPE_PREF: u16 = 0x7000;

/// One direction's limit (the CNI `bandwidth` capability's units): the long-term rate in bits
/// per second, at least 8 (the kernel counts whole bytes), and the burst in bits, how much may
/// pass at once above the rate (the token bucket's size), at least 8, at most 2^32 - 1 bytes. A
/// frame longer than the burst never passes: give at least the port's MTU plus 14 bytes.
pub use crate::proto::Rate;

/// The MTU of weft's IFB links: under IPv6's minimum (1280), so that the kernel gives them no
/// IPv6 state at all (no `inet6_dev` with its per-device sysctls and `/proc` entries at
/// creation, nothing of it to tear down at deletion): with the per-device IPv4 state and the
/// link itself, most of what creating and deleting one costs. An IFB link carries no address,
/// and its MTU limits nothing: a frame redirected to it is queued and handed back whatever its
/// length.
pub const IFB_MTU: u32 = 1279;

/// Spare IFB links ([`Netlink::retire_ifb`]) for [`Netlink::set_shaping_reusing`]: the links
/// kept, by index, and how many may be kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpareIfbs {
    /// The spares, by index (the last is taken first).
    pub links: Vec<u32>,
    /// How many spares may be kept: an IFB link a port no longer needs is kept while there are
    /// fewer, deleted otherwise.
    pub cap: usize,
}

/// A host port's shaping. `ingress`: into the workload; `egress`: from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shaping {
    /// What the workload receives (leaves through the host port): `None` for no limit.
    pub ingress: Option<Rate>,
    /// What the workload sends (enters the host port): `None` for no limit.
    pub egress: Option<Rate>,
}

/// The counters of one direction's `tbf` qdisc (since it was added; a changed rate keeps
/// them, a direction shaped again after none starts from zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Bytes the qdisc sent on, Ethernet headers included.
    pub bytes: u64,
    /// Frames the qdisc sent on.
    pub packets: u64,
    /// Frames dropped: the queue was full (it holds the burst and 25 ms at the rate), or the
    /// frame was longer than the burst.
    pub drops: u64,
    /// How often a frame had to wait for tokens (the qdisc was over its rate).
    pub overlimits: u64,
}

/// The counters of a host port's shaping, by direction; `None` for a direction without.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapingCounters {
    /// The `tbf` at the port's root: what the workload receives.
    pub ingress: Option<QueueCounters>,
    /// The `tbf` at the IFB's root: what the workload sends.
    pub egress: Option<QueueCounters>,
}

/// `TCA_OPTIONS` (linux/rtnetlink.h), the nest that holds a qdisc's own attributes.
const TCA_OPTIONS: u16 = 2;

/// `TCA_TBF_PARMS`, `TCA_TBF_RATE64` and `TCA_TBF_BURST` (linux/pkt_sched.h: UNSPEC 0, PARMS 1,
/// RTAB 2, PTAB 3, RATE64 4, PRATE64 5, BURST 6, PBURST 7, PAD 8), which netlink-packet-route
/// does not name.
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;

/// `sizeof(struct tc_tbf_qopt)`: two `tc_ratespec` (12 bytes each), then limit, buffer, mtu.
const TBF_QOPT_LEN: usize = 36;

/// `TC_LINKLAYER_ETHERNET`: the kernel computes transmit times itself and needs no rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;

/// How long a frame may wait in the queue, past the burst (the reference plugin's 25 ms).
const LATENCY_MS: u128 = 25;

/// `PSCHED_SHIFT`: a psched tick is 64 ns (`PSCHED_TICKS2NS(x)` is `x << 6`; the first two
/// fields of `/proc/net/psched`, 1000 and 64, say the same).
const PSCHED_SHIFT: u32 = 6;

/// The handle of the `tbf` weft adds (`1:`, as the reference plugin).
const TBF_HANDLE: u32 = 0x0001_0000;

/// The `tbf` of one direction, from a [`Rate`] (like the reference plugin: `tc qdisc add dev X
/// root tbf rate R burst B latency 25ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tbf {
    /// Bytes per second.
    rate: u64,
    /// The bucket, in bytes (`TCA_TBF_BURST`).
    burst: u32,
    /// The queue behind it, in bytes: 25 ms at the rate plus the burst (at most `u32::MAX`).
    limit: u32,
    /// The time to send `burst` at `rate`, in psched ticks, as the kernel computes and dumps
    /// it (see [`kernel_buffer_ticks`]).
    buffer: u32,
}

impl Tbf {
    /// The `tbf` for `rate`, or why there is none (naming the field of `direction`).
    fn of(rate: &Rate, direction: &str) -> Result<Tbf, String> {
        let bytes = rate.bits_per_second / 8;
        if bytes == 0 {
            return Err(format!(
                "{direction}.bits_per_second is {}, less than one byte per second: give a rate \
                 of at least 8 bits per second, or leave {direction} unshaped (None)",
                rate.bits_per_second
            ));
        }
        let Ok(burst) = u32::try_from(rate.burst_bits / 8) else {
            return Err(format!(
                "{direction}.burst_bits is {}, over the kernel's largest burst of {} bytes \
                 ({} bits): give a smaller burst",
                rate.burst_bits,
                u32::MAX,
                u64::from(u32::MAX) * 8
            ));
        };
        if burst == 0 {
            return Err(format!(
                "{direction}.burst_bits is {}, less than one byte: give a burst of at least the \
                 port's MTU plus 14 bytes, in bits, or leave {direction} unshaped (None)",
                rate.burst_bits
            ));
        }
        let queue = u128::from(bytes) * LATENCY_MS / 1000 + u128::from(burst);
        Ok(Tbf {
            rate: bytes,
            burst,
            limit: u32::try_from(queue).unwrap_or(u32::MAX),
            buffer: kernel_buffer_ticks(bytes, burst),
        })
    }

    /// `TCA_TBF_PARMS`: `struct tc_tbf_qopt`, native endian. The rate's link layer is Ethernet
    /// (no rate table); no peak rate; `buffer` is ignored by the kernel, which computes it
    /// from `TCA_TBF_BURST`.
    fn parms(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TBF_QOPT_LEN);
        // rate: cell_log, linklayer, overhead, cell_align, mpu, rate (u32::MAX: see RATE64).
        b.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(&u32::try_from(self.rate).unwrap_or(u32::MAX).to_ne_bytes());
        // peakrate: none.
        b.extend_from_slice(&[0; 12]);
        b.extend_from_slice(&self.limit.to_ne_bytes());
        b.extend_from_slice(&self.buffer.to_ne_bytes());
        // mtu: only for a peak rate.
        b.extend_from_slice(&0u32.to_ne_bytes());
        b
    }

    /// The `TCA_OPTIONS` of the qdisc: parameters, burst, and the 64-bit rate when it does
    /// not fit the 32 bits of the parameters.
    fn options(&self) -> Vec<TcOption> {
        let mut o = vec![
            TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, self.parms())),
            TcOption::Other(DefaultNla::new(
                TCA_TBF_BURST,
                self.burst.to_ne_bytes().to_vec(),
            )),
        ];
        if self.rate > u64::from(u32::MAX) {
            o.push(TcOption::Other(DefaultNla::new(
                TCA_TBF_RATE64,
                self.rate.to_ne_bytes().to_vec(),
            )));
        }
        o
    }

    /// Does the kernel's `tbf` have these parameters? The buffer may be a tick off (a kernel
    /// rounding otherwise than [`kernel_buffer_ticks`]): bursts that differ by less than what
    /// the rate sends in 128 ns compare equal.
    fn is(&self, dumped: &DumpedTbf) -> bool {
        dumped.rate == self.rate
            && dumped.peak_rate == 0
            && dumped.limit == self.limit
            && (dumped.buffer.wrapping_sub(self.buffer) <= 1
                || self.buffer.wrapping_sub(dumped.buffer) <= 1)
    }
}

/// The buffer of a `tbf` with `burst` bytes at `rate` bytes/s as the kernel dumps it: the
/// nanoseconds its `psched_l2t_ns()` gives with the `mult` and `shift` of
/// `psched_ratecfg_precompute__()` (net/sched/sch_generic.c), in ticks (`>> 6`), cut to the 32
/// bits of `tc_tbf_qopt.buffer` (it wraps past 2^32 ticks, about 275 s).
fn kernel_buffer_ticks(rate: u64, burst: u32) -> u32 {
    const NSEC_PER_SEC: u64 = 1_000_000_000;
    let (mut factor, mut mult, mut shift) = (NSEC_PER_SEC, 1u32, 0u32);
    // (A rate of 0 leaves mult 1, shift 0, as in the kernel.)
    while let Some(m) = factor.checked_div(rate) {
        // The kernel keeps `mult` in a u32.
        mult = m as u32;
        if mult & (1 << 31) != 0 || factor & (1 << 63) != 0 {
            break;
        }
        factor <<= 1;
        shift += 1;
    }
    let ns = (u64::from(burst) * u64::from(mult)) >> shift;
    (ns >> PSCHED_SHIFT) as u32
}

/// A `tbf` as a qdisc dump shows it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct DumpedTbf {
    /// Bytes per second (`TCA_TBF_RATE64` when present).
    rate: u64,
    /// The peak rate's bytes per second (32 bits), 0 for none.
    peak_rate: u32,
    limit: u32,
    /// psched ticks.
    buffer: u32,
}

/// One qdisc of a dump, as far as shaping looks at it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DumpedQdisc {
    index: u32,
    parent: u32,
    handle: u32,
    kind: Option<String>,
    /// For a `tbf`: its parameters.
    tbf: Option<DumpedTbf>,
    counters: QueueCounters,
}

impl DumpedQdisc {
    /// The kernel's default qdisc (noqueue, pfifo_fast, fq_codel, mq…): handle 0.
    fn is_default(&self) -> bool {
        self.handle == 0
    }

    /// A `tbf` weft can take as its own.
    fn is_tbf(&self) -> bool {
        self.tbf.is_some()
    }
}

fn dumped_qdisc(msg: TcMessage) -> DumpedQdisc {
    let mut q = DumpedQdisc {
        index: u32::try_from(msg.header.index).unwrap_or(0),
        parent: u32::from(msg.header.parent),
        handle: u32::from(msg.header.handle),
        ..DumpedQdisc::default()
    };
    let mut options = Vec::new();
    let mut stats2 = None;
    let mut stats = None;
    for attr in msg.attributes {
        match attr {
            TcAttribute::Kind(k) => q.kind = Some(k),
            TcAttribute::Options(o) => options = o,
            TcAttribute::Stats2(s) => stats2 = Some(s),
            TcAttribute::Stats(s) => stats = Some(s),
            _ => {}
        }
    }
    if q.kind.as_deref() == Some("tbf") {
        q.tbf = dumped_tbf(&options);
    }
    if let Some(s) = stats2 {
        (q.counters.bytes, q.counters.packets) = basic_counters(&s);
        for s in s {
            if let TcStats2::Queue(queue) = s {
                q.counters.drops = u64::from(queue.drops);
                q.counters.overlimits = u64::from(queue.overlimits);
            }
        }
    } else if let Some(s) = stats {
        q.counters = QueueCounters {
            bytes: s.bytes,
            packets: u64::from(s.packets),
            drops: u64::from(s.drops),
            overlimits: u64::from(s.overlimits),
        };
    }
    q
}

/// The parameters in a `tbf`'s options. netlink-packet-route does not know the kind, so the
/// whole `TCA_OPTIONS` nest comes as one attribute.
fn dumped_tbf(options: &[TcOption]) -> Option<DumpedTbf> {
    let nest = options.iter().find_map(|o| match o {
        TcOption::Other(nla) if nla.kind() & NLA_TYPE_MASK == TCA_OPTIONS => Some(nla_value(nla)),
        _ => None,
    })?;
    let mut tbf = None;
    let mut rate64 = None;
    for nla in NlasIterator::new(nest.as_slice()) {
        let Ok(nla): Result<NlaBuffer<&[u8]>, _> = nla else {
            continue;
        };
        let v = nla.value();
        match nla.kind() {
            TCA_TBF_PARMS if v.len() >= TBF_QOPT_LEN => {
                let u32_at = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
                tbf = Some(DumpedTbf {
                    rate: u64::from(u32_at(8)),
                    peak_rate: u32_at(20),
                    limit: u32_at(24),
                    buffer: u32_at(28),
                });
            }
            TCA_TBF_RATE64 => {
                rate64 = <[u8; 8]>::try_from(v).ok().map(u64::from_ne_bytes);
            }
            _ => {}
        }
    }
    let mut tbf = tbf?;
    if let Some(r) = rate64 {
        tbf.rate = r;
    }
    Some(tbf)
}

/// The root qdisc of link `index` among `qdiscs`, if it shows one.
fn root_of(qdiscs: &[DumpedQdisc], index: u32) -> Option<&DumpedQdisc> {
    qdiscs
        .iter()
        .find(|q| q.index == index && q.parent == u32::from(TcHandle::ROOT))
}

/// `RTM_NEWQDISC`: `tbf` as the root qdisc of link `index` with handle `handle` (`tc qdisc add
/// dev X root handle 1: tbf rate R burst B limit L`; with the handle of the `tbf` already
/// there and no flags, `tc qdisc change`).
fn tbf_qdisc_message(index: u32, handle: u32, tbf: &Tbf) -> TcMessage {
    let mut q = root_qdisc_message(index, handle);
    q.attributes.push(TcAttribute::Kind("tbf".into()));
    q.attributes.push(TcAttribute::Options(tbf.options()));
    q
}

/// `RTM_DELQDISC`: the root qdisc of link `index`, with handle `handle`.
fn root_qdisc_message(index: u32, handle: u32) -> TcMessage {
    let mut q = TcMessage::with_index(i32::try_from(index).unwrap_or(0));
    q.header.parent = TcHandle::ROOT;
    q.header.handle = TcHandle::from(handle);
    q
}

/// The classic BPF program of the redirect: every frame matches (`ret #-1`).
fn every_frame() -> Vec<Insn> {
    program(&MirrorFilter::default(), Side::FromWorkload)
}

/// `RTM_NEWTFILTER`: every frame entering link `port` goes to link `ifb` instead (`tc filter
/// add dev PORT ingress pref 0x7000 protocol all bpf bytecode '1,6 0 0 4294967295' action
/// mirred egress redirect dev IFB`, verdict stolen).
fn redirect_to_ifb_message(port: u32, ifb: u32) -> TcMessage {
    bpf_filter_message(
        port,
        Side::FromWorkload,
        SHAPE_PREF,
        &every_frame(),
        mirred_action(ifb, TcMirrorActionType::EgressRedir, TcActionType::Stolen),
    )
}

/// Is `filters` (those at [`SHAPE_PREF`]) exactly weft's redirect to link `ifb`?
fn redirects_to(filters: &[&DumpedFilter], ifb: u32) -> bool {
    redirect_target(filters) == Some(ifb)
}

/// The link `filters` (those at [`SHAPE_PREF`]) redirect every frame to, when they are
/// exactly weft's redirect ([`redirect_to_ifb_message`]).
fn redirect_target(filters: &[&DumpedFilter]) -> Option<u32> {
    match filters {
        [f] => f.mirred_target(
            &program_bytes(&every_frame()),
            TcMirrorActionType::EgressRedir,
            TcActionType::Stolen,
        ),
        _ => None,
    }
}

/// The operation [`Netlink::set_shaping`] names in its errors.
const SET_SHAPING: &str = "set shaping";

/// The `tbf`s of `shaping` (ingress, egress), checked with IFB name `ifb` before anything is
/// looked up or changed.
fn shaping_tbfs(
    port: u32,
    ifb: &str,
    shaping: &Shaping,
) -> Result<(Option<Tbf>, Option<Tbf>), NetlinkError> {
    let target = format!("link {port}");
    check_ifname(SET_SHAPING, &target, ifb)?;
    let invalid = |reason: String| NetlinkError::Invalid {
        op: SET_SHAPING,
        target: target.clone(),
        reason,
    };
    let ingress = shaping
        .ingress
        .map(|r| Tbf::of(&r, "ingress"))
        .transpose()
        .map_err(invalid)?;
    let egress = shaping
        .egress
        .map(|r| Tbf::of(&r, "egress"))
        .transpose()
        .map_err(invalid)?;
    Ok((ingress, egress))
}

impl Netlink {
    /// Makes link `port`'s shaping exactly `shaping`.
    ///
    /// Ingress (what the workload receives): a `tbf` qdisc at the port's root with the rate,
    /// the burst, and a queue of the burst plus 25 ms at the rate; what does not fit the queue
    /// is dropped. Egress (what the workload sends): IFB link `ifb` (created with the port's
    /// MTU, up, and alias [`names::shaping_ifb_alias`] of the port's name) with such a `tbf` at
    /// its root, and in the port's clsact ingress hook a `cls_bpf` filter at [`SHAPE_PREF`]
    /// that redirects every frame to it (`mirred egress redirect`, verdict stolen); the IFB
    /// gives the frames back to the port's receive path, past tc (mirrors see each frame once,
    /// before it is shaped). An IFB made anew or changed is ready before the redirect points
    /// at it. Egress shaping does not touch the port's root qdisc, whoever made it.
    ///
    /// Idempotent: `Ok(false)`, and no change sent, when the kernel already has exactly this
    /// (the kernel keeps the burst as the time to send it, in 64 ns ticks: bursts that differ
    /// by less than what the rate sends in 128 ns count as the same). A changed rate is
    /// changed in place (counters kept); a redirect to another link is replaced (delete then
    /// add: for a moment what the workload sends is not shaped).
    ///
    /// Removes only what weft made: a `tbf` at the port's root (any root `tbf` is taken for
    /// weft's, the reference plugin's too), the filter at [`SHAPE_PREF`] of the port's ingress
    /// hook, and IFB link `ifb` if it carries the port's alias. Filters at other priorities
    /// are left alone; with no egress shaping the clsact qdisc is removed only when nothing
    /// else is on it. Anything else on weft's IFB is replaced. Deleting the port leaves the
    /// IFB: shape it to nothing first, or delete link `ifb` too.
    ///
    /// Errors: a `port` that does not exist → [`NetlinkError::is_not_found`]; a rate or burst
    /// under one byte, a burst over 4 GiB, an `ifb` that is not an interface name, ingress
    /// shaping on a port whose root qdisc is another one (an `htb` someone put there…), egress
    /// shaping on a port whose ingress slot holds a plain `ingress` qdisc, or a link `ifb`
    /// that is not weft's IFB for this port → [`NetlinkError::Invalid`], before anything is
    /// changed.
    pub fn set_shaping(
        &mut self,
        port: u32,
        ifb: &str,
        shaping: &Shaping,
    ) -> Result<bool, NetlinkError> {
        self.set_shaping_reusing(port, ifb, shaping, &mut SpareIfbs::default())
    }

    /// [`Netlink::set_shaping`], taking the IFB link an egress limit needs from `spares` (links
    /// [`Netlink::retire_ifb`] kept; the one used, and any that is no spare any more, is taken
    /// out of the list) instead of creating one, and keeping the IFB link of an egress limit
    /// lifted as a spare while `spares` has fewer than its cap, instead of deleting it.
    /// Creating and deleting a link are the dearest of a shaped port's requests (per-device
    /// sysctl tables, sysfs entries, a grace period when it goes), though not most of what
    /// shaping costs: the port's `clsact` and redirect weigh more (docs/benchmarks.md); a
    /// spare costs an alternative name, an alias and a `tbf` change. The spare keeps its own
    /// name and answers to `ifb` as its alternative name, so `ifb` finds it wherever a name is
    /// looked up. A spare named `ifb` (the same port name again) is taken whether or not it is
    /// listed.
    pub fn set_shaping_reusing(
        &mut self,
        port: u32,
        ifb: &str,
        shaping: &Shaping,
        spares: &mut SpareIfbs,
    ) -> Result<bool, NetlinkError> {
        let tbfs = shaping_tbfs(port, ifb, shaping)?;
        let link = self.require_link(SET_SHAPING, port)?;
        let existing_ifb = self.link_by_name(ifb)?;
        self.shape(&link, ifb, existing_ifb, tbfs, spares)
    }

    /// [`Netlink::set_shaping_reusing`] for a port and an IFB name the caller has just looked
    /// up: `port` as the kernel gave it, `ifb` what [`Netlink::link_by_name`] found for the IFB
    /// name (a spare answers to it as its alternative name), so that neither is asked for
    /// again. A port gone since it was looked up fails with [`NetlinkError::is_not_found`] at
    /// the first change to it; an IFB link made for it just before is left with the port's
    /// alias, as weft's IFB of a port that is gone (the caller's next pass retires it).
    pub fn set_shaping_found(
        &mut self,
        port: &LinkInfo,
        ifb: &str,
        found_ifb: Option<LinkInfo>,
        shaping: &Shaping,
        spares: &mut SpareIfbs,
    ) -> Result<bool, NetlinkError> {
        let tbfs = shaping_tbfs(port.index, ifb, shaping)?;
        self.shape(port, ifb, found_ifb, tbfs, spares)
    }

    /// The work of [`Netlink::set_shaping_reusing`], once the port and the link named `ifb`
    /// are known.
    fn shape(
        &mut self,
        link: &LinkInfo,
        ifb: &str,
        existing_ifb: Option<LinkInfo>,
        (ingress, egress): (Option<Tbf>, Option<Tbf>),
        spares: &mut SpareIfbs,
    ) -> Result<bool, NetlinkError> {
        const OP: &str = SET_SHAPING;
        let port = link.index;
        let target = format!("link {port}");
        let invalid = |reason: String| NetlinkError::Invalid {
            op: OP,
            target: target.clone(),
            reason,
        };
        let alias = names::shaping_ifb_alias(&link.name);
        let ours = existing_ifb.as_ref().filter(|l| is_our_ifb(l, &alias));
        let mut links = vec![port];
        links.extend(ours.map(|l| l.index));
        let raw = self.qdiscs_of(OP, &links)?;
        let slot = ingress_slot_kind(&raw, port);
        let qdiscs: Vec<DumpedQdisc> = raw.into_iter().map(dumped_qdisc).collect();
        let root = root_of(&qdiscs, port);

        if ingress.is_some()
            && let Some(q) = root.filter(|q| !q.is_default() && !q.is_tbf())
        {
            let kind = q.kind.as_deref().unwrap_or("qdisc of no kind");
            return Err(invalid(format!(
                "its root qdisc is a {kind:?} (handle {:x}:) that weft did not make, and ingress \
                 shaping needs a tbf there: remove it (tc qdisc del dev {} root) or leave \
                 ingress unshaped",
                q.handle >> 16,
                link.name
            )));
        }
        if egress.is_some() {
            if let Some(other) = slot.as_deref().filter(|k| *k != "clsact") {
                return Err(invalid(format!(
                    "its ingress slot holds a {other:?} qdisc, and egress shaping needs a clsact \
                     qdisc there: remove that qdisc (tc qdisc del dev {} {other}) or leave \
                     egress unshaped",
                    link.name
                )));
            }
            if let Some(l) = existing_ifb
                .as_ref()
                .filter(|l| !is_our_ifb(l, &alias) && !is_spare_ifb(l))
            {
                return Err(invalid(format!(
                    "link {ifb} exists and is not weft's IFB for {} (kind {}, alias {:?}): \
                     delete it or choose another name",
                    link.name,
                    l.kind.as_deref().unwrap_or("none"),
                    l.alias.as_deref().unwrap_or("")
                )));
            }
        }

        let mut changed = self.set_root_tbf(OP, port, root, ingress.as_ref())?;
        match egress {
            Some(tbf) => {
                let index = match ours {
                    Some(l) => {
                        if l.mtu != IFB_MTU {
                            self.set_mtu(l.index, IFB_MTU)?;
                            changed = true;
                        }
                        changed |=
                            self.set_root_tbf(OP, l.index, root_of(&qdiscs, l.index), Some(&tbf))?;
                        if !l.up {
                            self.set_up(l.index)?;
                            changed = true;
                        }
                        l.index
                    }
                    None => {
                        changed = true;
                        let named = existing_ifb.as_ref().filter(|l| is_spare_ifb(l));
                        match self.adopt_spare(OP, ifb, &alias, &tbf, named, spares)? {
                            Some(index) => index,
                            None => self.create_ifb(OP, ifb, &alias, &tbf)?,
                        }
                    }
                };
                changed |= self.set_redirect(OP, port, slot.is_some(), index)?;
            }
            None => {
                if slot.as_deref() == Some("clsact") {
                    changed |= self.remove_redirect(OP, port)?;
                }
                if let Some(l) = ours {
                    changed |= self.keep_or_delete_ifb(l, spares)?;
                }
            }
        }
        if changed {
            debug!(port, ifb, ?ingress, ?egress, "set shaping");
        }
        Ok(changed)
    }

    /// Takes the shaping off port `port`, whose workload is gone and which is about to be
    /// deleted (with its namespace, or by the agent's reaper), at the least cost: the redirect
    /// to its IFB link (the filter at [`SHAPE_PREF`] of its ingress hook) is deleted, and
    /// nothing else: the clsact qdisc, its other filters and the `tbf` at the port's root go
    /// with the port (deleting a qdisc of a link that is up stops the link's queues and waits
    /// for an RCU grace period, holding the routing lock every ADD's link changes need). Then
    /// `ifb`, the link found under the port's IFB name, when it is weft's IFB of this port, is
    /// kept as a spare ([`Netlink::retire_ifb`]) while `spares` has fewer than its cap; else
    /// its index goes into `surplus`, for the caller to delete with the other departed ports'
    /// in one request ([`Netlink::delete_links`]): each deletion alone holds the routing lock
    /// for a grace period (about 25 ms here), and a burst of DELs departs many ports at once,
    /// whose deletions one by one kept the next ADDs' ports waiting for their shaping for as
    /// long. The IFB's redirect is gone by then, so nothing sends to it. A port gone already
    /// is no error: its redirect went with it. Returns whether anything changed (or is left
    /// in `surplus` to change).
    pub fn unshape_departing(
        &mut self,
        port: &LinkInfo,
        ifb: Option<&LinkInfo>,
        spares: &mut SpareIfbs,
        surplus: &mut Vec<u32>,
    ) -> Result<bool, NetlinkError> {
        let mut changed = match self.delete_shape_pref("unshape a departing port", port.index) {
            Ok(changed) => changed,
            // No clsact qdisc: the port never had one ("Parent Qdisc doesn't exists").
            Err(e) if e.errno() == Some(libc::EINVAL) => false,
            Err(e) => return Err(e),
        };
        let alias = names::shaping_ifb_alias(&port.name);
        if let Some(l) = ifb.filter(|l| is_our_ifb(l, &alias)) {
            match self.keep_as_spare(l, spares) {
                Some(Ok(kept)) => changed |= kept,
                None | Some(Err(_)) => {
                    surplus.push(l.index);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// Keeps `ifb`, an IFB link weft's shaping no longer uses, as a spare
    /// ([`Netlink::retire_ifb`]; its index added to `spares`) while `spares` has fewer than its
    /// cap: `Some(Ok(true))` when kept, `Some(Ok(false))` when the link is gone already,
    /// `Some(Err(_))` when it cannot be retired, `None` when there is no room. In the last two
    /// cases the caller deletes it.
    pub fn keep_as_spare(
        &mut self,
        ifb: &LinkInfo,
        spares: &mut SpareIfbs,
    ) -> Option<Result<bool, NetlinkError>> {
        if spares.links.len() >= spares.cap {
            return None;
        }
        Some(match self.retire_ifb(ifb) {
            Ok(()) => {
                spares.links.push(ifb.index);
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        })
    }

    /// Keeps `ifb`, an IFB link weft's shaping no longer uses, as a spare while `spares` has
    /// fewer than its cap ([`Netlink::keep_as_spare`]), else (or when it cannot be retired)
    /// deletes it. Returns whether anything changed (a link gone already: nothing).
    fn keep_or_delete_ifb(
        &mut self,
        ifb: &LinkInfo,
        spares: &mut SpareIfbs,
    ) -> Result<bool, NetlinkError> {
        match self.keep_as_spare(ifb, spares) {
            Some(Ok(kept)) => Ok(kept),
            None | Some(Err(_)) => self.delete_link(ifb.index),
        }
    }

    /// Deletes link `port`'s clsact qdisc, with every filter on its hooks; `Ok(false)` when the
    /// kernel finds none (or no such link).
    fn delete_clsact(&mut self, op: &'static str, port: u32) -> Result<bool, NetlinkError> {
        match self.call(
            op,
            || format!("link {port}: delete clsact qdisc"),
            RouteNetlinkMessage::DelQueueDiscipline(clsact_qdisc_message(port)),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The counters of link `port`'s shaping, per direction (from a qdisc dump: the `tbf`'s
    /// `TCA_STATS2`), `None` for a direction without: no `tbf` at the port's root (ingress);
    /// no redirect at [`SHAPE_PREF`] to IFB link `ifb` with the port's alias, or no `tbf` at
    /// its root (egress).
    ///
    /// Errors: a `port` that does not exist → [`NetlinkError::is_not_found`]; an `ifb` that is
    /// not an interface name → [`NetlinkError::Invalid`].
    pub fn shaping_counters(
        &mut self,
        port: u32,
        ifb: &str,
    ) -> Result<ShapingCounters, NetlinkError> {
        const OP: &str = "read shaping counters";
        check_ifname(OP, &format!("link {port}"), ifb)?;
        let link = self.require_link(OP, port)?;
        let alias = names::shaping_ifb_alias(&link.name);
        let ours = self
            .link_by_name(ifb)?
            .filter(|l| is_our_ifb(l, &alias))
            .map(|l| l.index);
        let mut links = vec![port];
        links.extend(ours);
        let raw = self.qdiscs_of(OP, &links)?;
        let slot = ingress_slot_kind(&raw, port);
        let qdiscs: Vec<DumpedQdisc> = raw.into_iter().map(dumped_qdisc).collect();
        let counters = |index| {
            root_of(&qdiscs, index)
                .filter(|q| q.is_tbf())
                .map(|q| q.counters)
        };
        let ingress = counters(port);
        let egress = match ours {
            Some(index) if slot.as_deref() == Some("clsact") => {
                let filters = self.hook_filters(OP, port, Side::FromWorkload)?;
                let at_pref: Vec<&DumpedFilter> = filters
                    .iter()
                    .filter(|f| f.pref == SHAPE_PREF && !f.head)
                    .collect();
                if redirects_to(&at_pref, index) {
                    counters(index)
                } else {
                    None
                }
            }
            _ => None,
        };
        Ok(ShapingCounters { ingress, egress })
    }

    /// [`Netlink::shaping_counters`] of many host ports at once, by name, for a sampler: one
    /// dump of the links and one of every qdisc of the namespace, whatever the number of ports
    /// (one port alone takes seven requests). A port that does not exist is left out. The
    /// egress counters are those of the `tbf` at the root of the port's IFB link (weft's, by
    /// its alias) while the port has a `clsact`; the redirect filter between them is not read
    /// (the reconciler keeps it: without it the IFB's counters stand still).
    pub fn shaping_counters_of(
        &mut self,
        ports: &[&str],
    ) -> Result<std::collections::HashMap<String, ShapingCounters>, NetlinkError> {
        const OP: &str = "read shaping counters";
        let links = self.links()?;
        let by_name: std::collections::HashMap<&str, &LinkInfo> =
            links.iter().map(|l| (l.name.as_str(), l)).collect();
        let raw = self.all_qdiscs(OP)?;
        // The ports whose ingress slot holds a `clsact` (read before the dump is taken apart).
        let clsact: std::collections::HashSet<u32> = ports
            .iter()
            .filter_map(|name| by_name.get(name))
            .map(|l| l.index)
            .filter(|i| ingress_slot_kind(&raw, *i).as_deref() == Some("clsact"))
            .collect();
        let qdiscs: Vec<DumpedQdisc> = raw.into_iter().map(dumped_qdisc).collect();
        let counters = |index| {
            root_of(&qdiscs, index)
                .filter(|q| q.is_tbf())
                .map(|q| q.counters)
        };
        let mut out = std::collections::HashMap::new();
        for &name in ports {
            let Some(port) = by_name.get(name) else {
                continue;
            };
            let alias = names::shaping_ifb_alias(name);
            let egress = by_name
                .get(names::shaping_ifb_name(name).as_str())
                .filter(|l| is_our_ifb(l, &alias) && clsact.contains(&port.index))
                .and_then(|l| counters(l.index));
            out.insert(
                name.to_string(),
                ShapingCounters {
                    ingress: counters(port.index),
                    egress,
                },
            );
        }
        Ok(out)
    }

    /// Makes the root qdisc of link `index` (`current` as dumped) the `tbf` `want`, or for
    /// `None` no `tbf`. A root qdisc that is neither the kernel's default nor a `tbf` is
    /// deleted first (callers refuse that on a host port before).
    fn set_root_tbf(
        &mut self,
        op: &'static str,
        index: u32,
        current: Option<&DumpedQdisc>,
        want: Option<&Tbf>,
    ) -> Result<bool, NetlinkError> {
        let current = current.filter(|q| !q.is_default());
        match (current, want) {
            (None, None) => Ok(false),
            (Some(q), None) if !q.is_tbf() => Ok(false),
            (Some(q), None) => {
                match self.call(
                    op,
                    || format!("link {index}: delete root tbf"),
                    RouteNetlinkMessage::DelQueueDiscipline(root_qdisc_message(index, q.handle)),
                    0,
                ) {
                    Ok(_) => Ok(true),
                    Err(e) if e.is_not_found() => Ok(false),
                    Err(e) => Err(e),
                }
            }
            (Some(q), Some(t)) if q.is_tbf() => {
                if q.tbf.is_some_and(|d| t.is(&d)) {
                    return Ok(false);
                }
                self.call(
                    op,
                    || format!("link {index}: change root tbf to {t:?}"),
                    RouteNetlinkMessage::NewQueueDiscipline(tbf_qdisc_message(index, q.handle, t)),
                    0,
                )?;
                Ok(true)
            }
            (current, Some(t)) => {
                if let Some(q) = current {
                    self.call(
                        op,
                        || format!("link {index}: delete root qdisc {:?}", q.kind),
                        RouteNetlinkMessage::DelQueueDiscipline(root_qdisc_message(
                            index, q.handle,
                        )),
                        0,
                    )?;
                }
                self.call(
                    op,
                    || format!("link {index}: add root tbf {t:?}"),
                    RouteNetlinkMessage::NewQueueDiscipline(tbf_qdisc_message(
                        index, TBF_HANDLE, t,
                    )),
                    NLM_F_CREATE | NLM_F_EXCL,
                )?;
                Ok(true)
            }
        }
    }

    /// Keeps IFB link `ifb`, weft's shaping link of a port that has left (or lost its egress
    /// limit), as a spare for the next port shaped ([`Netlink::set_shaping_reusing`]) instead
    /// of deleting it: its alias becomes [`names::SPARE_IFB_ALIAS`], and the port's IFB name
    /// is taken off when the link carried it as an alternative name (a spare reused before).
    /// It stays up with its `tbf`: no redirect points at it, so it shapes nothing, and taking
    /// a link down would stop its queues and wait for a grace period.
    ///
    /// Errors: `ifb` is not weft's IFB of a port (kind `ifb`, a [`names::shaping_ifb_alias`])
    /// → [`NetlinkError::Invalid`], before anything is changed; a link gone meanwhile →
    /// [`NetlinkError::is_not_found`].
    pub fn retire_ifb(&mut self, ifb: &LinkInfo) -> Result<(), NetlinkError> {
        const OP: &str = "retire shaping link";
        let port = ifb
            .alias
            .as_deref()
            .and_then(names::shaped_port)
            .filter(|_| ifb.kind.as_deref() == Some("ifb"))
            .ok_or_else(|| NetlinkError::Invalid {
                op: OP,
                target: format!("link {} ({})", ifb.name, ifb.index),
                reason: format!(
                    "it is not weft's shaping link of a port (kind {}, alias {:?})",
                    ifb.kind.as_deref().unwrap_or("none"),
                    ifb.alias.as_deref().unwrap_or("")
                ),
            })?;
        let port_name = names::shaping_ifb_name(port);
        // In the default link group too: a link left in weft's deletion group by a deletion cut
        // short is not deleted with a later one's.
        let mut spare = LinkUnspec::new_with_index(ifb.index)
            .alias(names::SPARE_IFB_ALIAS)
            .build();
        spare.attributes.push(LinkAttribute::Group(0));
        self.call(
            OP,
            || format!("link {} ({})", ifb.name, ifb.index),
            RouteNetlinkMessage::SetLink(spare),
            0,
        )?;
        if port_name != ifb.name {
            match self.alt_name(OP, ifb.index, &port_name, false) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        debug!(ifb = %ifb.name, port, "kept the shaping link as a spare");
        Ok(())
    }

    /// The index of the link weft's redirect on port `port`'s ingress hook sends every frame
    /// to (the port's IFB link), read back from the kernel; `None` when the port has no such
    /// redirect.
    pub fn shaping_redirect(&mut self, port: u32) -> Result<Option<u32>, NetlinkError> {
        let filters = self.hook_filters("read shaping redirect", port, Side::FromWorkload)?;
        let ours: Vec<&DumpedFilter> = filters
            .iter()
            .filter(|f| f.pref == SHAPE_PREF && !f.head)
            .collect();
        Ok(redirect_target(&ours))
    }

    /// Frees the name of `held`, weft's IFB link of another port that serves it under that
    /// port's IFB name as its alternative name (a spare made for a first port and taken by
    /// the other, whose own name is the first port's IFB name), for that first port, whose
    /// name has come back (the same attachment added anew). The other port is shaped to
    /// `shaping`, its wanted limits, on another IFB link (a spare, else a new one under its own
    /// IFB name), its redirect moved there; then `held` is a spare, which the first port takes
    /// by its name ([`Netlink::set_shaping_reusing`]). A port gone already leaves nothing to
    /// move: `held` becomes a spare at once. Returns whether the other port was moved.
    ///
    /// Errors: `held` is not such a link, or `shaping` has no egress limit →
    /// [`NetlinkError::Invalid`], before anything is changed; a failure to shape the other
    /// port leaves `held` as it was.
    pub fn move_shaping(
        &mut self,
        held: &LinkInfo,
        shaping: &Shaping,
        spares: &mut SpareIfbs,
    ) -> Result<bool, NetlinkError> {
        const OP: &str = "move a port's shaping link";
        let other = held
            .alias
            .as_deref()
            .and_then(names::shaped_port)
            .filter(|p| {
                held.kind.as_deref() == Some("ifb") && names::shaping_ifb_name(p) != held.name
            });
        let Some(other) = other else {
            return Err(NetlinkError::Invalid {
                op: OP,
                target: format!("link {} ({})", held.name, held.index),
                reason: format!(
                    "it is not weft's shaping link of a port under another name (kind {}, alias \
                     {:?})",
                    held.kind.as_deref().unwrap_or("none"),
                    held.alias.as_deref().unwrap_or("")
                ),
            });
        };
        let own = names::shaping_ifb_name(other);
        if shaping.egress.is_none() {
            return Err(NetlinkError::Invalid {
                op: OP,
                target: format!("port {other}"),
                reason: "its shaping has no egress limit, so it needs no shaping link".into(),
            });
        }
        let Some(port) = self.link_by_name(other)? else {
            self.retire_ifb(held)?;
            return Ok(false);
        };
        // The name first, for the other port's new link; its redirect still sends to `held`.
        match self.alt_name(OP, held.index, &own, false) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        if let Err(e) = self.set_shaping_reusing(port.index, &own, shaping, spares) {
            let _ = self.alt_name(OP, held.index, &own, true);
            return Err(e);
        }
        self.set_alias(held.index, names::SPARE_IFB_ALIAS)?;
        debug!(ifb = %held.name, port = other, "moved a port's shaping off the link under another port's IFB name");
        Ok(true)
    }

    /// Makes a spare IFB link (`named`, the spare already called `name`, else the first of
    /// `spares` that still is one) the IFB link `name` of the port with alias `alias`: `name`
    /// as its alternative name, the alias and the MTU, `tbf` at its root, up. `None` when no
    /// spare is left.
    fn adopt_spare(
        &mut self,
        op: &'static str,
        name: &str,
        alias: &str,
        tbf: &Tbf,
        named: Option<&LinkInfo>,
        spares: &mut SpareIfbs,
    ) -> Result<Option<u32>, NetlinkError> {
        let spare = match named {
            Some(l) => {
                spares.links.retain(|&s| s != l.index);
                l.clone()
            }
            None => loop {
                let Some(index) = spares.links.pop() else {
                    return Ok(None);
                };
                if let Some(l) = self.link_by_index(index)?.filter(is_spare_ifb) {
                    break l;
                }
            },
        };
        if spare.name != name {
            self.alt_name(op, spare.index, name, true)?;
        }
        let mut set = LinkUnspec::new_with_index(spare.index)
            .alias(alias)
            .mtu(IFB_MTU)
            .up()
            .build();
        // Out of weft's deletion group, should a deletion cut short have left it there.
        set.attributes.push(LinkAttribute::Group(0));
        if let Err(e) = self.call(
            op,
            || format!("{name} (spare ifb {})", spare.index),
            RouteNetlinkMessage::SetLink(set),
            0,
        ) {
            let _ = self.retire_or_delete(&spare, name);
            return Err(e);
        }
        // The spare kept the `tbf` of its last port (or has none): one request changes its
        // rate in place, or adds it; only a root qdisc of another kind there (not weft's) needs
        // the look at its qdiscs and the full change.
        let replaced = self.call(
            op,
            || format!("link {}: replace root tbf with {tbf:?}", spare.index),
            RouteNetlinkMessage::NewQueueDiscipline(tbf_qdisc_message(
                spare.index,
                TBF_HANDLE,
                tbf,
            )),
            NLM_F_CREATE | NLM_F_REPLACE,
        );
        if replaced.is_err() {
            let raw = self.qdiscs_of(op, &[spare.index])?;
            let qdiscs: Vec<DumpedQdisc> = raw.into_iter().map(dumped_qdisc).collect();
            self.set_root_tbf(op, spare.index, root_of(&qdiscs, spare.index), Some(tbf))?;
        }
        debug!(ifb = %name, spare = %spare.name, index = spare.index, "took a spare IFB link");
        Ok(Some(spare.index))
    }

    /// After a failed adoption: the spare back as it was (spare alias, without `name`), or
    /// deleted when that fails too.
    fn retire_or_delete(&mut self, spare: &LinkInfo, name: &str) -> Result<(), NetlinkError> {
        let back = self
            .set_alias(spare.index, names::SPARE_IFB_ALIAS)
            .and_then(|()| {
                if spare.name == name {
                    return Ok(());
                }
                match self.alt_name("retire shaping link", spare.index, name, false) {
                    Err(e) if !e.is_not_found() => Err(e),
                    _ => Ok(()),
                }
            });
        if back.is_err() {
            self.delete_link(spare.index)?;
        }
        back
    }

    /// Adds (`add`) or removes alternative name `name` of link `index` (`ip link property add
    /// dev X altname NAME`): a name the link also answers to wherever a name is looked up,
    /// without renaming it (a rename needs the link down and re-registers its sysctls).
    fn alt_name(
        &mut self,
        op: &'static str,
        index: u32,
        name: &str,
        add: bool,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::PropList(vec![Prop::AltIfName(
                name.to_string(),
            )]));
        let (request, verb, flags) = if add {
            (
                RouteNetlinkMessage::NewLinkProp(msg),
                "add",
                NLM_F_CREATE | NLM_F_EXCL,
            )
        } else {
            (RouteNetlinkMessage::DelLinkProp(msg), "delete", 0)
        };
        self.call(
            op,
            || format!("link {index}: {verb} alternative name {name}"),
            request,
            flags,
        )?;
        Ok(())
    }

    /// Creates IFB link `name` with MTU [`IFB_MTU`] (so without IPv6), alias `alias` and `tbf`
    /// at its root, up; returns its index. The `tbf` goes on while the link is down: a root
    /// qdisc grafted on a link that is up first stops its queues and waits for an RCU grace
    /// period, with the routing lock held.
    fn create_ifb(
        &mut self,
        op: &'static str,
        name: &str,
        alias: &str,
        tbf: &Tbf,
    ) -> Result<u32, NetlinkError> {
        let target = || format!("{name} (ifb)");
        let index = self.create_link(op, name, LinkIfb::new(name).mtu(IFB_MTU).build(), target)?;
        // Its alias at once (the kernel takes none in the creating request): a link with the
        // IFB name but not weft's alias would be refused as someone else's.
        let named = LinkUnspec::new_with_index(index).alias(alias).build();
        let up = LinkUnspec::new_with_index(index).up().build();
        if let Err(e) = self
            .call(op, target, RouteNetlinkMessage::SetLink(named), 0)
            .and_then(|_| self.set_root_tbf(op, index, None, Some(tbf)))
            .and_then(|_| self.call(op, target, RouteNetlinkMessage::SetLink(up), 0))
        {
            let _ = self.delete_link(index);
            return Err(e);
        }
        debug!(ifb = %name, index, "created IFB link");
        Ok(index)
    }

    /// Makes the filter at [`SHAPE_PREF`] of link `port`'s ingress hook weft's redirect to
    /// link `ifb`, adding the clsact qdisc unless `has_clsact`.
    fn set_redirect(
        &mut self,
        op: &'static str,
        port: u32,
        has_clsact: bool,
        ifb: u32,
    ) -> Result<bool, NetlinkError> {
        let mut changed = false;
        let filters = if has_clsact {
            self.hook_filters(op, port, Side::FromWorkload)?
        } else {
            changed |= self.add_clsact(op, port)?;
            Vec::new()
        };
        let at_pref: Vec<&DumpedFilter> = filters.iter().filter(|f| f.pref == SHAPE_PREF).collect();
        let ours: Vec<&DumpedFilter> = at_pref.iter().copied().filter(|f| !f.head).collect();
        if redirects_to(&ours, ifb) {
            return Ok(changed);
        }
        if !at_pref.is_empty() {
            self.delete_shape_pref(op, port)?;
        }
        self.call(
            op,
            || format!("link {port}: add redirect pref {SHAPE_PREF} to link {ifb}"),
            RouteNetlinkMessage::NewTrafficFilter(redirect_to_ifb_message(port, ifb)),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(true)
    }

    /// Removes the filters at [`SHAPE_PREF`] of link `port`'s ingress hook, and its clsact
    /// qdisc when nothing else is on it.
    fn remove_redirect(&mut self, op: &'static str, port: u32) -> Result<bool, NetlinkError> {
        let mut changed = false;
        let mut others_left = false;
        for side in SIDES {
            let filters = self.hook_filters(op, port, side)?;
            let (ours, others): (Vec<&DumpedFilter>, Vec<&DumpedFilter>) = filters
                .iter()
                .partition(|f| side == Side::FromWorkload && f.pref == SHAPE_PREF);
            others_left |= !others.is_empty();
            if !ours.is_empty() {
                changed |= self.delete_shape_pref(op, port)?;
            }
        }
        if !others_left {
            changed |= self.delete_clsact(op, port)?;
        }
        Ok(changed)
    }

    /// Deletes every filter at [`SHAPE_PREF`] of link `port`'s ingress hook.
    fn delete_shape_pref(&mut self, op: &'static str, port: u32) -> Result<bool, NetlinkError> {
        match self.call(
            op,
            || format!("link {port}: delete ingress filter pref {SHAPE_PREF}"),
            RouteNetlinkMessage::DelTrafficFilter(delete_pref_message(
                port,
                Side::FromWorkload,
                SHAPE_PREF,
            )),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Is `link` weft's IFB with alias `alias`?
fn is_our_ifb(link: &LinkInfo, alias: &str) -> bool {
    link.kind.as_deref() == Some("ifb") && link.alias.as_deref() == Some(alias)
}

/// Is `link` a spare IFB link ([`Netlink::retire_ifb`])?
pub fn is_spare_ifb(link: &LinkInfo) -> bool {
    is_our_ifb(link, names::SPARE_IFB_ALIAS)
}

#[cfg(test)]
mod tests {
    use super::super::tests::round_trip;
    use super::*;

    fn rate(bits_per_second: u64, burst_bits: u64) -> Rate {
        Rate {
            bits_per_second,
            burst_bits,
        }
    }

    #[test]
    fn the_tbf_follows_the_reference_plugin() {
        // 8 Mbit/s, 256 kbit: 1 MB/s, 32 KiB, 25 ms of queue past the burst.
        let t = Tbf::of(&rate(8_000_000, 262_144), "ingress").unwrap();
        assert_eq!(t.rate, 1_000_000);
        assert_eq!(t.burst, 32_768);
        assert_eq!(t.limit, 25_000 + 32_768);
        // 32768 bytes at 1 MB/s: 32.768 ms, 512000 ticks of 64 ns.
        assert_eq!(t.buffer, 512_000);
    }

    #[test]
    fn the_buffer_is_the_kernels_to_the_tick() {
        // What 6.18 dumps for `tc qdisc add … tbf rate R burst B` (`tc -raw`'s burst_raw), R
        // and B in bytes: the exact time in 64 ns ticks, or a tick less.
        for (rate, burst, ticks) in [
            (1_000_000, 32_768, 512_000u32),
            (125_000, 10_000, 1_250_000),
            (1_250_000_000, 1_000_000, 12_499),
            (3, 7, 36_458_333),
            // Kubernetes' default burst (2^31 - 1 bits) at 1 Mbit/s: 2147 s, past the 2^32
            // ticks of the dump's u32, which wraps.
            (125_000, 268_435_455, 3_489_660_803),
        ] {
            assert_eq!(kernel_buffer_ticks(rate, burst), ticks, "{rate} {burst}");
        }
        assert_eq!(
            kernel_buffer_ticks(0, 1),
            0,
            "a rate of 0 does not divide by 0"
        );
    }

    #[test]
    fn rates_and_bursts_under_a_byte_or_over_the_kernels_u32_are_refused_by_name() {
        for (r, field) in [
            (rate(0, 80_000), "egress.bits_per_second is 0"),
            (rate(7, 80_000), "egress.bits_per_second is 7"),
            (rate(8_000, 0), "egress.burst_bits is 0"),
            (rate(8_000, 7), "egress.burst_bits is 7"),
            (
                rate(8_000, (1 << 35) + 8),
                "egress.burst_bits is 34359738376",
            ),
        ] {
            let err = Tbf::of(&r, "egress").unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
        assert!(Tbf::of(&rate(8, 8), "egress").is_ok());
        assert!(Tbf::of(&rate(8, u64::from(u32::MAX) * 8), "egress").is_ok());
    }

    #[test]
    fn the_limit_saturates_and_a_rate_past_32_bits_goes_in_rate64() {
        let t = Tbf::of(&rate(u64::MAX, u64::from(u32::MAX) * 8), "ingress").unwrap();
        assert_eq!(t.limit, u32::MAX);
        let opts = t.options();
        let kinds: Vec<u16> = opts.iter().map(|o| o.kind()).collect();
        assert_eq!(kinds, [TCA_TBF_PARMS, TCA_TBF_BURST, TCA_TBF_RATE64]);
        let small = Tbf::of(&rate(8_000_000, 262_144), "ingress").unwrap();
        assert_eq!(small.options().len(), 2, "no RATE64 under 2^32 bytes/s");
    }

    /// The qdisc `msg` as a dump would show it (the kernel nests the options in TCA_OPTIONS
    /// just as the request does).
    fn dumped(msg: TcMessage) -> DumpedQdisc {
        let RouteNetlinkMessage::NewQueueDiscipline(back) =
            round_trip(RouteNetlinkMessage::NewQueueDiscipline(msg))
        else {
            panic!("not RTM_NEWQDISC");
        };
        dumped_qdisc(back)
    }

    #[test]
    fn the_tbf_message_reads_back_as_what_set_shaping_compares() {
        for bits in [8_000_000, 80_000_000_000] {
            let t = Tbf::of(&rate(bits, 262_144), "ingress").unwrap();
            let q = dumped(tbf_qdisc_message(7, TBF_HANDLE, &t));
            assert_eq!((q.index, q.parent, q.handle), (7, 0xffff_ffff, 0x0001_0000));
            assert_eq!(q.kind.as_deref(), Some("tbf"));
            let d = q.tbf.unwrap();
            assert_eq!(d.rate, bits / 8);
            assert_eq!((d.limit, d.buffer, d.peak_rate), (t.limit, t.buffer, 0));
            assert!(t.is(&d));
            assert!(q.is_tbf() && !q.is_default());
        }
    }

    #[test]
    fn the_parameters_are_a_tc_tbf_qopt_with_an_ethernet_rate() {
        let t = Tbf::of(&rate(80_000_000_000, 262_144), "ingress").unwrap();
        let p = t.parms();
        assert_eq!(p.len(), TBF_QOPT_LEN);
        assert_eq!(p[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(p[8..12], u32::MAX.to_ne_bytes(), "the rate is in RATE64");
        assert_eq!(p[12..24], [0; 12], "no peak rate");
        assert_eq!(p[24..28], t.limit.to_ne_bytes());
        assert_eq!(p[28..32], t.buffer.to_ne_bytes());
        assert_eq!(p[32..36], [0; 4]);
    }

    #[test]
    fn another_rate_limit_peak_or_buffer_is_not_the_same_tbf() {
        let t = Tbf::of(&rate(8_000_000, 262_144), "ingress").unwrap();
        let d = DumpedTbf {
            rate: t.rate,
            peak_rate: 0,
            limit: t.limit,
            buffer: t.buffer,
        };
        assert!(t.is(&d));
        assert!(t.is(&DumpedTbf {
            buffer: t.buffer - 1,
            ..d
        }));
        for other in [
            DumpedTbf { rate: 1, ..d },
            DumpedTbf { peak_rate: 1, ..d },
            DumpedTbf { limit: 1, ..d },
            DumpedTbf {
                buffer: t.buffer + 2,
                ..d
            },
        ] {
            assert!(!t.is(&other), "{other:?}");
        }
    }

    #[test]
    fn the_redirect_steals_every_frame_for_the_ifb() {
        let RouteNetlinkMessage::NewTrafficFilter(back) = round_trip(
            RouteNetlinkMessage::NewTrafficFilter(redirect_to_ifb_message(4, 9)),
        ) else {
            panic!("not RTM_NEWTFILTER");
        };
        assert_eq!(u32::from(back.header.parent), 0xffff_fff2, "ingress hook");
        assert_eq!(back.header.info, (u32::from(SHAPE_PREF) << 16) | 0x0300);
        let f = super::super::tc::dumped_filter(back);
        assert!(redirects_to(&[&f], 9));
        assert!(!redirects_to(&[&f], 8), "another IFB");
        assert!(!redirects_to(&[&f, &f], 9), "two filters");
        assert_eq!(every_frame().len(), 1, "one instruction: ret #-1");
        assert_eq!(every_frame()[0].k, u32::MAX);
    }

    #[test]
    fn the_default_root_is_not_a_foreign_one() {
        let mut q = TcMessage::with_index(3);
        q.header.parent = TcHandle::ROOT;
        q.attributes.push(TcAttribute::Kind("noqueue".into()));
        let q = dumped(q);
        assert!(q.is_default() && !q.is_tbf());
        assert_eq!(root_of(std::slice::from_ref(&q), 3), Some(&q));
        assert_eq!(root_of(std::slice::from_ref(&q), 4), None);
    }
}

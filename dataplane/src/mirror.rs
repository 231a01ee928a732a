//! Traffic mirroring: which frames a mirror copies ([`MirrorFilter`]) and the classic BPF
//! program ([`program`]) that picks them out on a workload's host port, for tc's `cls_bpf`.
//!
//! A workload's host port is the host end of its veth (or a VM's tap) in the node's
//! namespace. Frames from the workload enter it (the port's tc ingress hook); frames to the
//! workload leave through it (the egress hook). On both hooks `cls_bpf` runs a classic program
//! with the packet data starting at the Ethernet header, so every offset below counts from
//! there.
//!
//! Pure: nothing here talks to the kernel. `Netlink::set_mirrors` (in `netlink`) installs the
//! programs.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Which way the copied frames travel, seen from the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Side {
    /// Frames the workload sends: they enter its host port (the port's tc ingress hook).
    FromWorkload,
    /// Frames sent to the workload: they leave through its host port (the tc egress hook).
    ToWorkload,
}

/// A transport protocol a filter names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum L4 {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
    /// ICMP (1) in IPv4 frames, ICMPv6 (58) in IPv6 frames.
    Icmp,
}

impl L4 {
    /// The IPv4 protocol number (`ipv6: false`) or IPv6 next header (`ipv6: true`).
    pub fn number(self, ipv6: bool) -> u8 {
        match self {
            L4::Tcp => 6,
            L4::Udp => 17,
            L4::Sctp => 132,
            L4::Icmp if ipv6 => 58,
            L4::Icmp => 1,
        }
    }

    /// Whether its header starts with a source and a destination port (TCP, UDP, SCTP).
    pub fn has_ports(self) -> bool {
        !matches!(self, L4::Icmp)
    }
}

/// Which frames a mirror copies. Every field that is not empty narrows the choice; empty in
/// every field, the mirror copies every frame (ARP, IPv6 neighbour discovery, anything).
///
/// Any field not empty → only IPv4 and IPv6 frames (ethertype 0x0800 / 0x86dd) can match:
///
/// - `cidrs`: the far end's address is in one of them; for [`Side::FromWorkload`] frames that
///   is the destination address, for [`Side::ToWorkload`] frames the source. IPv4 CIDRs match
///   only IPv4 frames and IPv6 CIDRs only IPv6 frames: with IPv4 CIDRs only, no IPv6 frame
///   matches (and the other way round).
/// - `protocols`: the IPv4 protocol or the IPv6 next header is one of them. IPv6 extension
///   headers are not walked: a TCP segment behind a hop-by-hop or fragment header is not
///   TCP to this filter.
/// - `ports`: TCP, UDP and SCTP frames whose source *or* destination port is in one of the
///   ranges (both ends inclusive; a range whose start is after its end matches nothing).
///   With ports and no protocols, the protocols are TCP, UDP and SCTP. Ports never match an
///   IPv4 fragment other than the first (it carries no ports); IPv4 options are skipped
///   (the header length comes from the IHL field). [`L4::Icmp`] among the protocols matches
///   ICMP frames whatever the ports: ports only narrow TCP, UDP and SCTP.
///
/// The program grows linearly with the fields; callers bound them (at most 4 protocols,
/// 16 port ranges and 16 CIDRs keep it under about 400 instructions, a tenth of the kernel's
/// 4096).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MirrorFilter {
    /// Transport protocols; empty: any (or TCP, UDP and SCTP when `ports` are given).
    pub protocols: Vec<L4>,
    /// Inclusive port ranges, `(first, last)`; empty: any port.
    pub ports: Vec<(u16, u16)>,
    /// Networks the far end's address is in; empty: any address.
    pub cidrs: Vec<IpNet>,
}

impl MirrorFilter {
    /// True when the filter copies every frame.
    pub fn is_everything(&self) -> bool {
        self.protocols.is_empty() && self.ports.is_empty() && self.cidrs.is_empty()
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Insn {
    /// The opcode (`BPF_LD | BPF_H | BPF_ABS`, …).
    pub code: u16,
    /// Conditional jumps: how many instructions to skip when the condition holds.
    pub jt: u8,
    /// Conditional jumps: how many instructions to skip when it does not.
    pub jf: u8,
    /// The constant operand (offset, immediate, jump distance of `ja`, return value).
    pub k: u32,
}

impl Insn {
    /// The instruction as the kernel reads it (`TCA_BPF_OPS`): native-endian `code`, `jt`,
    /// `jf`, native-endian `k`.
    pub fn to_ne_bytes(self) -> [u8; 8] {
        let [c0, c1] = self.code.to_ne_bytes();
        let [k0, k1, k2, k3] = self.k.to_ne_bytes();
        [c0, c1, self.jt, self.jf, k0, k1, k2, k3]
    }

    /// The instruction [`Insn::to_ne_bytes`] wrote.
    pub fn from_ne_bytes(b: [u8; 8]) -> Insn {
        Insn {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// What the program returns for a frame it matches (`cls_bpf` without direct action: -1 runs
/// the filter's actions with the filter's default class).
pub const MATCHED: u32 = u32::MAX;

/// The kernel's limit on classic BPF programs (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

// Opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MSH: u16 = 0xa0;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_AND: u16 = 0x50;
const BPF_K: u16 = 0x00;

const LD_W_ABS: u16 = BPF_LD | BPF_W | BPF_ABS;
const LD_H_ABS: u16 = BPF_LD | BPF_H | BPF_ABS;
const LD_B_ABS: u16 = BPF_LD | BPF_B | BPF_ABS;
const LD_H_IND: u16 = BPF_LD | BPF_H | BPF_IND;
const LDX_B_MSH: u16 = BPF_LDX | BPF_B | BPF_MSH;
const AND_K: u16 = BPF_ALU | BPF_AND | BPF_K;
const JA: u16 = BPF_JMP | BPF_JA;
const JEQ_K: u16 = BPF_JMP | BPF_JEQ | BPF_K;
const JGT_K: u16 = BPF_JMP | BPF_JGT | BPF_K;
const JGE_K: u16 = BPF_JMP | BPF_JGE | BPF_K;
const JSET_K: u16 = BPF_JMP | BPF_JSET | BPF_K;
const RET_K: u16 = BPF_RET | BPF_K;

/// Ethernet header length: where the IP header starts.
const ETH: u32 = 14;

/// The classic BPF program, for `cls_bpf` without direct action, that matches the frames of
/// `filter` travelling `side`: it returns [`MATCHED`] (0xffffffff: the filter's action runs)
/// for them and 0 for every other frame (also for a frame too short for a field it reads:
/// the kernel then ends the program with 0).
///
/// Its length is linear in the filter's fields (see [`MirrorFilter`] for the bounds callers
/// keep). Conditional jumps only ever skip one or two instructions; anything further goes
/// through `ja`, whose 32-bit offset reaches anywhere, so no input can overflow the 8-bit
/// `jt`/`jf`. Every jump goes forward and the last instruction returns, as the kernel's
/// checker demands.
pub fn program(filter: &MirrorFilter, side: Side) -> Vec<Insn> {
    if filter.is_everything() {
        return vec![insn(RET_K, 0, 0, MATCHED)];
    }
    let mut asm = Asm::default();
    let fail = asm.new_label();
    let matched = asm.new_label();
    let v4: Vec<Cidr> = filter
        .cidrs
        .iter()
        .filter_map(|c| match c {
            IpNet::V4(n) => Some(Cidr::new(&n.network().octets(), n.prefix_len())),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Cidr> = filter
        .cidrs
        .iter()
        .filter_map(|c| match c {
            IpNet::V6(n) => Some(Cidr::new(&n.network().octets(), n.prefix_len())),
            IpNet::V4(_) => None,
        })
        .collect();
    let mut families = Vec::new();
    if filter.cidrs.is_empty() || !v4.is_empty() {
        families.push((Family::V4, v4, asm.new_label()));
    }
    if filter.cidrs.is_empty() || !v6.is_empty() {
        families.push((Family::V6, v6, asm.new_label()));
    }

    asm.op(LD_H_ABS, 0, 0, 12);
    for (family, _, start) in &families {
        asm.jump_if(JEQ_K, family.ethertype(), *start);
    }
    asm.ja(fail);
    for (family, cidrs, start) in &families {
        asm.label(*start);
        family_block(&mut asm, *family, cidrs, filter, side, fail, matched);
    }
    asm.label(fail);
    asm.op(RET_K, 0, 0, 0);
    asm.label(matched);
    asm.op(RET_K, 0, 0, MATCHED);
    asm.finish()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn ethertype(self) -> u32 {
        match self {
            Family::V4 => 0x0800,
            Family::V6 => 0x86dd,
        }
    }

    /// Offset of the far end's address: the destination of frames from the workload, the
    /// source of frames to it.
    fn far_address(self, side: Side) -> u32 {
        match (self, side) {
            (Family::V4, Side::FromWorkload) => ETH + 16,
            (Family::V4, Side::ToWorkload) => ETH + 12,
            (Family::V6, Side::FromWorkload) => ETH + 24,
            (Family::V6, Side::ToWorkload) => ETH + 8,
        }
    }

    /// Offset of the protocol (IPv4) or next header (IPv6) byte.
    fn protocol(self) -> u32 {
        match self {
            Family::V4 => ETH + 9,
            Family::V6 => ETH + 6,
        }
    }
}

/// A CIDR as the 32-bit words the program compares: `(mask, network)` per word the prefix
/// covers at least partly.
struct Cidr {
    words: Vec<(u32, u32)>,
}

impl Cidr {
    fn new(octets: &[u8], prefix: u8) -> Cidr {
        let prefix = u32::from(prefix);
        let words = octets
            .chunks(4)
            .zip(0u32..)
            .filter_map(|(chunk, i)| {
                let covered = prefix.saturating_sub(32 * i).min(32);
                if covered == 0 {
                    return None;
                }
                let mask = u32::MAX << (32 - covered);
                let mut word = [0u8; 4];
                word.copy_from_slice(chunk);
                Some((mask, u32::from_be_bytes(word) & mask))
            })
            .collect();
        Cidr { words }
    }
}

/// The checks of one address family, entered once the ethertype is known: the far end's
/// address, then the protocol, then the ports. Ends by jumping to `fail` or `matched`.
fn family_block(
    asm: &mut Asm,
    family: Family,
    cidrs: &[Cidr],
    filter: &MirrorFilter,
    side: Side,
    fail: Label,
    matched: Label,
) {
    if !cidrs.is_empty() {
        let address_ok = asm.new_label();
        let base = family.far_address(side);
        for cidr in cidrs {
            let next = asm.new_label();
            for ((mask, net), i) in cidr.words.iter().zip(0u32..) {
                asm.op(LD_W_ABS, 0, 0, base + 4 * i);
                if *mask != u32::MAX {
                    asm.op(AND_K, 0, 0, *mask);
                }
                asm.jump_unless(JEQ_K, *net, next);
            }
            asm.ja(address_ok);
            asm.label(next);
        }
        asm.ja(fail);
        asm.label(address_ok);
    }

    let mut protocols: Vec<L4> = if filter.protocols.is_empty() && !filter.ports.is_empty() {
        vec![L4::Tcp, L4::Udp, L4::Sctp]
    } else {
        filter.protocols.clone()
    };
    protocols.sort();
    protocols.dedup();
    if protocols.is_empty() {
        asm.ja(matched);
        return;
    }
    let check_ports = !filter.ports.is_empty() && protocols.iter().any(|p| p.has_ports());
    let ports = asm.new_label();
    asm.op(LD_B_ABS, 0, 0, family.protocol());
    for p in &protocols {
        let target = if check_ports && p.has_ports() {
            ports
        } else {
            matched
        };
        asm.jump_if(JEQ_K, u32::from(p.number(family == Family::V6)), target);
    }
    asm.ja(fail);
    if !check_ports {
        return;
    }

    asm.label(ports);
    match family {
        Family::V4 => {
            // Flags and fragment offset: a later fragment carries no transport header.
            asm.op(LD_H_ABS, 0, 0, ETH + 6);
            asm.jump_if(JSET_K, 0x1fff, fail);
            // X = the IPv4 header's length, options included.
            asm.op(LDX_B_MSH, 0, 0, ETH);
            asm.op(LD_H_IND, 0, 0, ETH);
            port_ranges(asm, &filter.ports, matched);
            asm.op(LD_H_IND, 0, 0, ETH + 2);
            port_ranges(asm, &filter.ports, matched);
        }
        Family::V6 => {
            asm.op(LD_H_ABS, 0, 0, ETH + 40);
            port_ranges(asm, &filter.ports, matched);
            asm.op(LD_H_ABS, 0, 0, ETH + 42);
            port_ranges(asm, &filter.ports, matched);
        }
    }
    asm.ja(fail);
}

/// Jumps to `matched` when A is in one of `ranges`; falls through otherwise.
fn port_ranges(asm: &mut Asm, ranges: &[(u16, u16)], matched: Label) {
    for &(lo, hi) in ranges {
        let (lo32, hi32) = (u32::from(lo), u32::from(hi));
        match (lo, hi) {
            _ if lo > hi => {}
            (0, u16::MAX) => asm.ja(matched),
            _ if lo == hi => asm.jump_if(JEQ_K, lo32, matched),
            (0, _) => {
                asm.op(JGT_K, 1, 0, hi32);
                asm.ja(matched);
            }
            (_, u16::MAX) => asm.jump_if(JGE_K, lo32, matched),
            _ => {
                asm.op(JGE_K, 0, 2, lo32);
                asm.op(JGT_K, 1, 0, hi32);
                asm.ja(matched);
            }
        }
    }
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// A place in the program that `ja` can jump to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

#[derive(Debug)]
enum Op {
    Insn(Insn),
    Ja(Label),
    Here(Label),
}

/// A tiny assembler: conditional jumps only skip a fixed one or two instructions, and far
/// jumps are `ja` to a label, resolved in [`Asm::finish`].
#[derive(Debug, Default)]
struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

impl Asm {
    fn new_label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    fn op(&mut self, code: u16, jt: u8, jf: u8, k: u32) {
        self.ops.push(Op::Insn(insn(code, jt, jf, k)));
    }

    fn ja(&mut self, to: Label) {
        self.ops.push(Op::Ja(to));
    }

    fn label(&mut self, here: Label) {
        self.ops.push(Op::Here(here));
    }

    /// To `to` when the condition (`code` against `k`) holds; on otherwise.
    fn jump_if(&mut self, code: u16, k: u32, to: Label) {
        self.op(code, 0, 1, k);
        self.ja(to);
    }

    /// To `to` when the condition does not hold; on otherwise.
    fn jump_unless(&mut self, code: u16, k: u32, to: Label) {
        self.op(code, 1, 0, k);
        self.ja(to);
    }

    fn finish(self) -> Vec<Insn> {
        // A `ja` to the very next instruction (only labels between) does nothing: drop it.
        let no_op = |i: usize| match &self.ops[i] {
            Op::Ja(to) => self.ops[i + 1..]
                .iter()
                .take_while(|o| matches!(o, Op::Here(_)))
                .any(|o| matches!(o, Op::Here(l) if l == to)),
            _ => false,
        };
        let ops: Vec<&Op> = (0..self.ops.len())
            .filter(|i| !no_op(*i))
            .map(|i| &self.ops[i])
            .collect();

        let mut at = vec![None; self.labels];
        let mut pc = 0usize;
        for op in &ops {
            match op {
                Op::Here(Label(l)) => at[*l] = Some(pc),
                Op::Insn(_) | Op::Ja(_) => pc += 1,
            }
        }
        let mut out = Vec::with_capacity(pc);
        for op in ops {
            match op {
                Op::Here(_) => {}
                Op::Insn(i) => out.push(*i),
                Op::Ja(Label(l)) => {
                    let from = out.len() + 1;
                    // Every label is placed after the jumps to it (they all go forward).
                    let to = at[*l].unwrap_or(from);
                    debug_assert!(at[*l].is_some_and(|t| t >= from), "label {l} not ahead");
                    let k = u32::try_from(to.saturating_sub(from)).unwrap_or(0);
                    out.push(insn(JA, 0, 0, k));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// Runs `prog` on `frame` like the kernel's classic BPF interpreter (the subset the
    /// compiler emits); panics on a jump out of the program or an unknown opcode.
    fn run(prog: &[Insn], frame: &[u8]) -> u32 {
        let load = |off: u32, size: usize| -> Option<u32> {
            let off = usize::try_from(off).ok()?;
            let bytes = frame.get(off..off.checked_add(size)?)?;
            Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
        };
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = *prog.get(pc).expect("pc inside the program");
            pc += 1;
            let jump = |cond: bool| {
                if cond {
                    usize::from(i.jt)
                } else {
                    usize::from(i.jf)
                }
            };
            match i.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS | LD_H_IND => {
                    let size = match i.code & 0x18 {
                        BPF_W => 4,
                        BPF_H => 2,
                        _ => 1,
                    };
                    let off = if i.code & 0xe0 == BPF_IND {
                        x.wrapping_add(i.k)
                    } else {
                        i.k
                    };
                    match load(off, size) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                LDX_B_MSH => match load(i.k, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                AND_K => a &= i.k,
                JA => pc += usize::try_from(i.k).unwrap(),
                JEQ_K => pc += jump(a == i.k),
                JGT_K => pc += jump(a > i.k),
                JGE_K => pc += jump(a >= i.k),
                JSET_K => pc += jump(a & i.k != 0),
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// The kernel checker's rules: not empty, at most 4096 instructions, every jump lands
    /// inside the program going forward, the last instruction returns.
    fn assert_well_formed(prog: &[Insn]) {
        assert!(!prog.is_empty());
        assert!(prog.len() < MAX_INSNS, "{} instructions", prog.len());
        assert_eq!(prog.last().unwrap().code, RET_K, "ends with ret");
        for (pc, i) in prog.iter().enumerate() {
            let next = pc + 1;
            match i.code {
                JA => {
                    assert!(
                        next + (i.k as usize) < prog.len(),
                        "ja at {pc} out of range"
                    );
                    assert!(i.k > 0, "ja to the next instruction at {pc}");
                }
                JEQ_K | JGT_K | JGE_K | JSET_K => {
                    assert!(next + usize::from(i.jt) < prog.len(), "jt at {pc}");
                    assert!(next + usize::from(i.jf) < prog.len(), "jf at {pc}");
                }
                RET_K => {}
                LD_W_ABS | LD_H_ABS | LD_B_ABS | LD_H_IND | LDX_B_MSH | AND_K => {
                    assert!(next < prog.len(), "falls off the end at {pc}");
                }
                other => panic!("unexpected opcode {other:#x} at {pc}"),
            }
        }
    }

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = MAC_B.to_vec();
        f.extend(MAC_A);
        f.extend(ethertype.to_be_bytes());
        f
    }

    /// A transport header: ports (or ICMP type/code), then padding.
    fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut t = Vec::new();
        if matches!(proto, 1 | 58) {
            t.extend([8, 0, 0, 0, 0, 1, 0, 1]);
        } else {
            t.extend(sport.to_be_bytes());
            t.extend(dport.to_be_bytes());
            t.extend([0; 16]);
        }
        t
    }

    #[derive(Debug, Clone)]
    struct V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        ihl: u8,
        frag: u16,
        sport: u16,
        dport: u16,
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> V4 {
        V4 {
            src: src.into(),
            dst: dst.into(),
            proto,
            ihl: 5,
            frag: 0,
            sport,
            dport,
        }
    }

    impl V4 {
        fn frame(&self) -> Vec<u8> {
            let mut f = eth(0x0800);
            let t = l4(self.proto, self.sport, self.dport);
            let len = u16::from(self.ihl) * 4 + t.len() as u16;
            f.push(0x40 | self.ihl);
            f.push(0);
            f.extend(len.to_be_bytes());
            f.extend([0, 1]);
            f.extend(self.frag.to_be_bytes());
            f.extend([64, self.proto, 0, 0]);
            f.extend(self.src.octets());
            f.extend(self.dst.octets());
            for _ in 5..self.ihl {
                f.extend([1, 1, 1, 1]); // NOP options
            }
            f.extend(t);
            f
        }
    }

    #[derive(Debug, Clone)]
    struct V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next: u8,
        sport: u16,
        dport: u16,
    }

    impl V6 {
        fn frame(&self) -> Vec<u8> {
            let mut f = eth(0x86dd);
            let t = l4(self.next, self.sport, self.dport);
            f.extend([0x60, 0, 0, 0]);
            f.extend((t.len() as u16).to_be_bytes());
            f.extend([self.next, 64]);
            f.extend(self.src.octets());
            f.extend(self.dst.octets());
            f.extend(t);
            f
        }
    }

    fn v6(src: &str, dst: &str, next: u8, sport: u16, dport: u16) -> V6 {
        V6 {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            next,
            sport,
            dport,
        }
    }

    fn arp() -> Vec<u8> {
        crate::frame::arp_request(
            MAC_A,
            Ipv4Addr::new(10, 1, 0, 1),
            Ipv4Addr::new(10, 1, 0, 2),
        )
    }

    fn matches(filter: &MirrorFilter, side: Side, frame: &[u8]) -> bool {
        let prog = program(filter, side);
        assert_well_formed(&prog);
        match run(&prog, frame) {
            MATCHED => true,
            0 => false,
            other => panic!("returned {other:#x}"),
        }
    }

    fn filter(protocols: &[L4], ports: &[(u16, u16)], cidrs: &[&str]) -> MirrorFilter {
        MirrorFilter {
            protocols: protocols.to_vec(),
            ports: ports.to_vec(),
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    const SIDES: [Side; 2] = [Side::FromWorkload, Side::ToWorkload];

    #[test]
    fn the_empty_filter_matches_every_frame_arp_included() {
        let f = MirrorFilter::default();
        assert_eq!(
            program(&f, Side::FromWorkload),
            [insn(RET_K, 0, 0, MATCHED)]
        );
        for side in SIDES {
            assert!(matches(&f, side, &arp()));
            assert!(matches(
                &f,
                side,
                &v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 1, 2).frame()
            ));
            assert!(matches(&f, side, &[0u8; 14]));
        }
    }

    #[test]
    fn a_non_empty_filter_never_matches_arp_or_other_ethertypes() {
        let f = filter(&[], &[], &["0.0.0.0/0", "::/0"]);
        for side in SIDES {
            assert!(!matches(&f, side, &arp()));
            assert!(!matches(&f, side, &crate::frame::rarp_announce(MAC_A)));
            assert!(matches(
                &f,
                side,
                &v4([10, 0, 0, 1], [10, 0, 0, 2], 47, 0, 0).frame()
            ));
        }
    }

    #[test]
    fn udp_port_53_matches_either_port_in_either_direction_and_nothing_else() {
        let f = filter(&[L4::Udp], &[(53, 53)], &[]);
        for side in SIDES {
            let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
            assert!(
                matches(&f, side, &v4(a, b, 17, 40000, 53).frame()),
                "dst 53"
            );
            assert!(
                matches(&f, side, &v4(b, a, 17, 53, 40000).frame()),
                "src 53"
            );
            assert!(
                !matches(&f, side, &v4(a, b, 17, 40000, 54).frame()),
                "udp 54"
            );
            assert!(
                !matches(&f, side, &v4(a, b, 6, 40000, 53).frame()),
                "tcp 53"
            );
            assert!(!matches(&f, side, &v4(a, b, 1, 0, 0).frame()), "icmp");
            assert!(matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 17, 5, 53).frame()
            ));
            assert!(!matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 6, 5, 53).frame()
            ));
        }
    }

    #[test]
    fn ports_without_protocols_mean_tcp_udp_and_sctp() {
        let f = filter(&[], &[(5000, 5010)], &[]);
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        for proto in [6, 17, 132] {
            assert!(matches(
                &f,
                Side::FromWorkload,
                &v4(a, b, proto, 1, 5005).frame()
            ));
            assert!(!matches(
                &f,
                Side::FromWorkload,
                &v4(a, b, proto, 1, 5011).frame()
            ));
            assert!(!matches(
                &f,
                Side::FromWorkload,
                &v4(a, b, proto, 1, 4999).frame()
            ));
        }
        assert!(!matches(&f, Side::FromWorkload, &v4(a, b, 1, 0, 0).frame()));
    }

    #[test]
    fn port_ranges_at_the_edges_of_the_port_space_match_inclusively() {
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let m = |ranges: &[(u16, u16)], port| {
            matches(
                &filter(&[L4::Tcp], ranges, &[]),
                Side::FromWorkload,
                &v4(a, b, 6, port, port).frame(),
            )
        };
        assert!(m(&[(0, 10)], 0) && m(&[(0, 10)], 10) && !m(&[(0, 10)], 11));
        assert!(m(&[(65000, 65535)], 65535) && m(&[(65000, 65535)], 65000));
        assert!(!m(&[(65000, 65535)], 64999));
        assert!(m(&[(0, 65535)], 12345));
        assert!(!m(&[(10, 5)], 7), "an inverted range matches nothing");
        assert!(m(&[(10, 5), (7, 7)], 7));
    }

    #[test]
    fn cidrs_match_the_far_end_destination_from_and_source_to_the_workload() {
        let f = filter(&[], &[], &["10.1.0.0/16"]);
        let out = v4([192, 168, 0, 5], [10, 1, 2, 3], 17, 1, 2).frame();
        let back = v4([10, 1, 2, 3], [192, 168, 0, 5], 17, 1, 2).frame();
        assert!(matches(&f, Side::FromWorkload, &out));
        assert!(!matches(&f, Side::FromWorkload, &back));
        assert!(matches(&f, Side::ToWorkload, &back));
        assert!(!matches(&f, Side::ToWorkload, &out));
        assert!(!matches(
            &f,
            Side::FromWorkload,
            &v4([0; 4], [10, 2, 0, 1], 6, 1, 2).frame()
        ));
        assert!(
            !matches(
                &f,
                Side::FromWorkload,
                &v6("fd00::1", "fd00::2", 17, 1, 2).frame()
            ),
            "only IPv4 CIDRs: no IPv6 frame"
        );
    }

    #[test]
    fn ipv6_cidrs_compare_every_word_the_prefix_covers() {
        let f = filter(&[], &[], &["fd77:1:2:3:4::/72"]);
        let m = |dst: &str| matches(&f, Side::FromWorkload, &v6("fd00::1", dst, 6, 1, 2).frame());
        assert!(m("fd77:1:2:3:4:ff::9"));
        assert!(m("fd77:1:2:3:00ff::9"), "bits past /72 are free");
        assert!(!m("fd77:1:2:3:0100::9"), "bit 72 counts");
        assert!(!m("fd77:1:2:4:4::9"));
        assert!(!m("fd78:1:2:3:4::9"));
        let to = filter(&[], &[], &["fd77::/64"]);
        let frame = v6("fd77::5", "fd00::1", 17, 1, 2).frame();
        assert!(matches(&to, Side::ToWorkload, &frame));
        assert!(!matches(&to, Side::FromWorkload, &frame));
        assert!(!matches(
            &to,
            Side::ToWorkload,
            &v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 1, 2).frame()
        ));
    }

    #[test]
    fn mixed_family_cidrs_match_each_family_with_its_own() {
        let f = filter(&[L4::Tcp], &[], &["10.0.0.0/8", "fd77::/16"]);
        let s = Side::FromWorkload;
        assert!(matches(
            &f,
            s,
            &v4([1, 1, 1, 1], [10, 9, 9, 9], 6, 1, 2).frame()
        ));
        assert!(!matches(
            &f,
            s,
            &v4([1, 1, 1, 1], [11, 9, 9, 9], 6, 1, 2).frame()
        ));
        assert!(!matches(
            &f,
            s,
            &v4([1, 1, 1, 1], [10, 9, 9, 9], 17, 1, 2).frame()
        ));
        assert!(matches(&f, s, &v6("fd00::1", "fd77:9::1", 6, 1, 2).frame()));
        assert!(!matches(&f, s, &v6("fd00::1", "fd78::1", 6, 1, 2).frame()));
    }

    #[test]
    fn ipv4_options_move_the_ports() {
        let f = filter(&[L4::Udp], &[(5000, 5000)], &[]);
        for ihl in [6, 15] {
            let mut p = v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 1234, 5000);
            p.ihl = ihl;
            assert!(matches(&f, Side::FromWorkload, &p.frame()), "ihl {ihl}");
            // Where the ports would be without options: 5000 there must not count.
            let mut q = p.clone();
            q.dport = 7;
            let mut frame = q.frame();
            frame[36..38].copy_from_slice(&5000u16.to_be_bytes());
            assert!(!matches(&f, Side::FromWorkload, &frame), "ihl {ihl}");
        }
    }

    #[test]
    fn later_fragments_never_match_ports_but_first_fragments_do() {
        let f = filter(&[L4::Udp, L4::Icmp], &[(5000, 5000)], &[]);
        let mut p = v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 5000, 5000);
        p.frag = 0x2000; // more fragments, offset 0: the first
        assert!(matches(&f, Side::FromWorkload, &p.frame()));
        p.frag = 0x0010; // offset 128 bytes, last fragment
        assert!(!matches(&f, Side::FromWorkload, &p.frame()));
        p.frag = 0x2001;
        assert!(!matches(&f, Side::FromWorkload, &p.frame()));
        p.frag = 0x4000; // don't fragment
        assert!(matches(&f, Side::FromWorkload, &p.frame()));
        let mut icmp = v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 0, 0);
        icmp.frag = 0x0010;
        assert!(
            matches(&f, Side::FromWorkload, &icmp.frame()),
            "ICMP is not narrowed by ports"
        );
    }

    #[test]
    fn ipv6_tcp_ports_match() {
        let f = filter(&[L4::Tcp], &[(443, 443), (8000, 8080)], &[]);
        for side in SIDES {
            assert!(matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 6, 50000, 443).frame()
            ));
            assert!(matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 6, 8080, 1).frame()
            ));
            assert!(!matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 6, 8081, 1).frame()
            ));
            assert!(!matches(
                &f,
                side,
                &v6("fd00::1", "fd00::2", 17, 443, 443).frame()
            ));
        }
    }

    #[test]
    fn icmp_means_icmpv4_and_icmpv6_and_ignores_ports() {
        let f = filter(&[L4::Icmp], &[(80, 80)], &[]);
        let s = Side::FromWorkload;
        assert!(matches(
            &f,
            s,
            &v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 0, 0).frame()
        ));
        assert!(matches(&f, s, &v6("fd00::1", "fd00::2", 58, 0, 0).frame()));
        assert!(!matches(&f, s, &v6("fd00::1", "fd00::2", 1, 0, 0).frame()));
        assert!(!matches(
            &f,
            s,
            &v4([10, 0, 0, 1], [10, 0, 0, 2], 58, 0, 0).frame()
        ));
        assert!(!matches(
            &f,
            s,
            &v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 80, 80).frame()
        ));
    }

    #[test]
    fn truncated_frames_do_not_match() {
        let f = filter(&[L4::Udp], &[(53, 53)], &[]);
        let frame = v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 53, 53).frame();
        assert!(matches(&f, Side::FromWorkload, &frame));
        assert!(!matches(&f, Side::FromWorkload, &frame[..35]));
        assert!(!matches(&f, Side::FromWorkload, &frame[..13]));
    }

    #[test]
    fn the_largest_filter_callers_allow_compiles_well_formed_and_small() {
        let ports: Vec<(u16, u16)> = (0..16).map(|i| (1000 * i + 1, 1000 * i + 500)).collect();
        let mut cidrs: Vec<IpNet> = (0..8)
            .map(|i| format!("10.{i}.0.0/{}", 16 + i).parse().unwrap())
            .collect();
        cidrs.extend(
            (0..8).map(|i| -> IpNet { format!("fd77:{i}::/{}", 33 + 13 * i).parse().unwrap() }),
        );
        // The longest CIDRs to compare: IPv6 with a partial last word.
        let v6_127: Vec<IpNet> = (0..16)
            .map(|i| format!("fd77::{i:x}00/127").parse().unwrap())
            .collect();
        let mut split: Vec<IpNet> = v6_127[..8].to_vec();
        split.extend((0..8).map(|i| -> IpNet { format!("10.0.{i}.0/31").parse().unwrap() }));
        for cidrs in [cidrs, v6_127, split] {
            let f = MirrorFilter {
                protocols: vec![L4::Tcp, L4::Udp, L4::Sctp, L4::Icmp],
                ports: ports.clone(),
                cidrs,
            };
            for side in SIDES {
                let prog = program(&f, side);
                assert_well_formed(&prog);
                assert!(prog.len() < 400, "{} instructions", prog.len());
                for i in &prog {
                    if matches!(i.code, JEQ_K | JGT_K | JGE_K | JSET_K) {
                        assert!(i.jt <= 2 && i.jf <= 2, "{i:?}");
                    }
                }
            }
        }
        // Far more than any caller allows still stays well formed: jumps never overflow.
        let huge = MirrorFilter {
            protocols: vec![L4::Tcp],
            ports: (0..1000).map(|p| (p, p)).collect(),
            cidrs: (0..200)
                .map(|i| format!("fd77:{i:x}::/64").parse().unwrap())
                .collect(),
        };
        let prog = program(&huge, Side::FromWorkload);
        assert!(
            prog.len() > 4096,
            "this one is too long to load, but well formed"
        );
        assert_eq!(prog.last().unwrap().code, RET_K);
        for (pc, i) in prog.iter().enumerate() {
            if i.code == JA {
                assert!(pc + 1 + (i.k as usize) < prog.len());
            }
        }
        let frame = v6("fd00::1", "fd77:c7::9", 6, 1, 999).frame();
        assert!(matches_unchecked(&huge, &frame));
    }

    fn matches_unchecked(f: &MirrorFilter, frame: &[u8]) -> bool {
        run(&program(f, Side::FromWorkload), frame) == MATCHED
    }

    #[test]
    fn instructions_encode_as_struct_sock_filter() {
        let i = insn(JEQ_K, 1, 2, 0x0800);
        let b = i.to_ne_bytes();
        assert_eq!(&b[..2], &JEQ_K.to_ne_bytes());
        assert_eq!((b[2], b[3]), (1, 2));
        assert_eq!(&b[4..], &0x0800u32.to_ne_bytes());
        assert_eq!(Insn::from_ne_bytes(b), i);
    }

    #[test]
    fn serde_names_are_camel_case() {
        let f = filter(&[L4::Icmp, L4::Sctp], &[(1, 2)], &["10.0.0.0/8"]);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"protocols":["icmp","sctp"],"ports":[[1,2]],"cidrs":["10.0.0.0/8"]}"#
        );
        assert_eq!(serde_json::from_str::<MirrorFilter>(&json).unwrap(), f);
        assert_eq!(
            serde_json::from_str::<MirrorFilter>("{}").unwrap(),
            MirrorFilter::default()
        );
        assert_eq!(
            serde_json::to_string(&Side::ToWorkload).unwrap(),
            r#""toWorkload""#
        );
    }

    // Property: the program agrees with a plain reading of the filter on every frame.

    fn reference(f: &MirrorFilter, side: Side, frame: &Frame) -> bool {
        if f.is_everything() {
            return true;
        }
        let (src, dst, proto, later_fragment, sport, dport, ipv6) = match frame {
            Frame::Arp => return false,
            Frame::V4(p) => (
                IpAddr::V4(p.src),
                IpAddr::V4(p.dst),
                p.proto,
                p.frag & 0x1fff != 0,
                p.sport,
                p.dport,
                false,
            ),
            Frame::V6(p) => (
                IpAddr::V6(p.src),
                IpAddr::V6(p.dst),
                p.next,
                false,
                p.sport,
                p.dport,
                true,
            ),
        };
        let far = match side {
            Side::FromWorkload => dst,
            Side::ToWorkload => src,
        };
        if !f.cidrs.is_empty() && !f.cidrs.iter().any(|c| c.contains(&far)) {
            return false;
        }
        let protocols = if f.protocols.is_empty() && !f.ports.is_empty() {
            vec![L4::Tcp, L4::Udp, L4::Sctp]
        } else {
            f.protocols.clone()
        };
        if protocols.is_empty() {
            return true;
        }
        let Some(p) = protocols.iter().find(|p| p.number(ipv6) == proto) else {
            return false;
        };
        if f.ports.is_empty() || !p.has_ports() {
            return true;
        }
        !later_fragment
            && f.ports
                .iter()
                .any(|(lo, hi)| (lo..=hi).contains(&&sport) || (lo..=hi).contains(&&dport))
    }

    #[derive(Debug, Clone)]
    enum Frame {
        Arp,
        V4(V4),
        V6(V6),
    }

    impl Frame {
        fn bytes(&self) -> Vec<u8> {
            match self {
                Frame::Arp => arp(),
                Frame::V4(p) => p.frame(),
                Frame::V6(p) => p.frame(),
            }
        }
    }

    const V4_POOL: [[u8; 4]; 4] = [
        [10, 1, 2, 3],
        [10, 1, 200, 3],
        [10, 2, 0, 1],
        [192, 168, 1, 1],
    ];
    const V6_POOL: [&str; 4] = ["fd77::1", "fd77:0:0:1::1", "fd77:8000::1", "2001:db8::1"];
    const PORT_POOL: [u16; 6] = [0, 53, 80, 443, 5000, 65535];

    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![prop::sample::select(PORT_POOL.to_vec()), any::<u16>()]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let protos = prop::sample::select(vec![1u8, 6, 17, 47, 58, 132]);
        let v4f = (
            0..4usize,
            0..4usize,
            protos.clone(),
            5u8..8,
            prop::sample::select(vec![0u16, 0x2000, 0x4000, 0x0001, 0x2010]),
            port(),
            port(),
        )
            .prop_map(|(s, d, proto, ihl, frag, sport, dport)| {
                Frame::V4(V4 {
                    src: V4_POOL[s].into(),
                    dst: V4_POOL[d].into(),
                    proto,
                    ihl,
                    frag,
                    sport,
                    dport,
                })
            });
        let v6f = (0..4usize, 0..4usize, protos, port(), port()).prop_map(
            |(s, d, next, sport, dport)| {
                Frame::V6(V6 {
                    src: V6_POOL[s].parse().unwrap(),
                    dst: V6_POOL[d].parse().unwrap(),
                    next,
                    sport,
                    dport,
                })
            },
        );
        prop_oneof![1 => Just(Frame::Arp), 4 => v4f, 4 => v6f]
    }

    fn mirror_filter() -> impl Strategy<Value = MirrorFilter> {
        let l4 = prop::sample::select(vec![L4::Tcp, L4::Udp, L4::Sctp, L4::Icmp]);
        let cidr = prop_oneof![
            (0..4usize, 0u8..=32)
                .prop_map(|(i, p)| IpNet::new(V4_POOL[i].into(), p).unwrap().trunc()),
            (0..4usize, 0u8..=128).prop_map(|(i, p)| IpNet::new(
                V6_POOL[i].parse::<IpAddr>().unwrap(),
                p
            )
            .unwrap()
            .trunc()),
        ];
        (
            prop::collection::vec(l4, 0..4),
            prop::collection::vec((port(), port()), 0..4),
            prop::collection::vec(cidr, 0..4),
        )
            .prop_map(|(protocols, ports, cidrs)| MirrorFilter {
                protocols,
                ports,
                cidrs,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_program_agrees_with_the_filter_on_every_frame(
            f in mirror_filter(),
            frame in frame(),
            to in any::<bool>(),
        ) {
            let side = if to { Side::ToWorkload } else { Side::FromWorkload };
            let prog = program(&f, side);
            assert_well_formed(&prog);
            let got = run(&prog, &frame.bytes());
            prop_assert!(got == 0 || got == MATCHED);
            prop_assert_eq!(got == MATCHED, reference(&f, side, &frame), "{:?}", prog);
        }
    }
}

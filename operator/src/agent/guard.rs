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
//!   holds the EUI-64 link-local address derived from the MAC.
//!
//! - `pending` (`ifname`): live migration targets that wait for their VM (see
//!   [`PortGuard::pending`]).
//!
//! One base chain, `prerouting` (`type filter hook prerouting priority filter`, -200 in the
//! bridge family, before br_netfilter's hooks at 0), sees every frame a bridge port receives,
//! in this order:
//! 1. frames of ports that are not weft's pass untouched;
//! 2. ports in `open` pass unchecked;
//! 3. a weft port in neither `ports` nor `open` (not registered yet) is dropped: fail closed;
//! 4. guarded ports: 802.1Q/802.1ad tagged frames are dropped, and so is every ethertype but
//!    IPv4, ARP and IPv6 (PPPoE or MPLS could carry IP the checks below never see);
//! 5. the source MAC, the ARP sender MAC and sender IP, and the IPv4 source must be the port's;
//!    DHCPv4 server replies (udp 67 → 68) are dropped;
//! 6. IPv6 from `::` passes only as a DAD neighbour solicitation (or the MLDv2 report a host
//!    sends while its link-local address is still tentative); any other IPv6 source must be
//!    the port's, link-local included;
//! 7. router advertisements, redirects and DHCPv6 server replies (udp 547 → 546) are dropped.
//!
//! Not expressed: the target address of neighbour advertisements. nft 1.0.6 has no
//! `icmpv6 taddr`; a raw payload (`@th,64,128`) is a plain integer, which nft refuses to
//! concatenate with `iifname` against an `ifname . ipv6_addr` set (datatype mismatch). It
//! works against a `typeof iifname . @th,64,128` set with elements written as 128-bit
//! integers, e.g. `"wf1" . 0xfe80000000000000000000fffe000001`, which nft accepts; but weft's
//! [`Set`] model renders only `type …` and reads the listing back as `ifname . integer`, so that
//! set needs a model extension first. Until then an NA's *source* is checked (rule 6) but a
//! workload may advertise another workload's address as target.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use weft_dataplane::names;
use weft_dataplane::nft::{BaseChain, Chain, Family, Set, Table};

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

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// The EUI-64 (modified, RFC 4291 appendix A) link-local address of a MAC: `fe80::/64` with
/// the U/L bit of the first octet flipped and `ff:fe` in the middle.
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        a ^ 0x02,
        b,
        c,
        0xff,
        0xfe,
        d,
        e,
        f,
    ])
}

/// The fixed rules of `prerouting`.
fn rules() -> Vec<String> {
    [
        UNREGISTERED_SCOPE,
        "iifname @open accept",
        // A weft port the agent has not registered (yet): fail closed.
        "iifname != @ports drop",
        // A live migration's target: the VM's announcement activates it; nothing else passes.
        "iifname @pending ether type 0x8035 log prefix \"weft activate \" group 2727 drop",
        "iifname @pending drop",
        "ether type { 8021q, 8021ad } drop",
        "ether type != { ip, arp, ip6 } drop",
        "iifname . ether saddr != @macs drop",
        "iifname . arp saddr ether != @macs drop",
        "iifname . arp saddr ip != @ips4 drop",
        "udp sport 67 udp dport 68 drop",
        "iifname . ip saddr != @ips4 drop",
        // Duplicate address detection (and the MLD report sent while the address is tentative).
        "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report } accept",
        "iifname . ip6 saddr != @ips6 drop",
        "icmpv6 type { nd-router-advert, nd-redirect } drop",
        "udp sport 547 udp dport 546 drop",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// Builds weft's `bridge weft` table.
///
/// `bridges`: weft's bridge names; `guarded`: ports with anti-spoofing on; `open`: ports of
/// networks with `spec.security.antiSpoofing: false`. A port listed both guarded and open is
/// guarded (the safe choice).
pub fn table(bridges: &[String], guarded: &[PortGuard], open: &[String]) -> Table {
    let guarded_names: BTreeSet<String> = guarded.iter().map(|p| quoted(&p.ifname)).collect();
    let open: BTreeSet<String> = open
        .iter()
        .map(|p| quoted(p))
        .filter(|p| !guarded_names.contains(p))
        .collect();
    let pending: BTreeSet<String> = guarded
        .iter()
        .filter(|p| p.pending)
        .map(|p| quoted(&p.ifname))
        .collect();
    let mut macs = BTreeSet::new();
    let mut ips4 = BTreeSet::new();
    let mut ips6 = BTreeSet::new();
    for p in guarded {
        let port = quoted(&p.ifname);
        macs.insert(format!("{port} . {}", names::format_mac(p.mac)));
        ips6.insert(format!("{port} . {}", eui64_link_local(p.mac)));
        for ip in &p.ips {
            match ip {
                IpAddr::V4(v4) => ips4.insert(format!("{port} . {v4}")),
                IpAddr::V6(v6) => ips6.insert(format!("{port} . {v6}")),
            };
        }
    }
    Table {
        family: Family::Bridge,
        name: names::NFT_TABLE.into(),
        comment: None,
        sets: vec![
            set(
                "bridges",
                "ifname",
                bridges.iter().map(|b| quoted(b)).collect(),
            ),
            set("ports", "ifname", guarded_names),
            set("open", "ifname", open),
            set("macs", "ifname . ether_addr", macs),
            set("ips4", "ifname . ipv4_addr", ips4),
            set("ips6", "ifname . ipv6_addr", ips6),
            set("pending", "ifname", pending),
        ],
        maps: vec![],
        chains: vec![
            Chain {
                name: "prerouting".into(),
                base: Some(BaseChain {
                    kind: "filter".into(),
                    hook: "prerouting".into(),
                    priority: "filter".into(),
                    policy: Some("accept".into()),
                }),
                rules: rules(),
            },
            // Nothing reaches a pending port: the LAN keeps delivering the VM's MAC to the
            // node the VM still runs on.
            Chain {
                name: "forward".into(),
                base: Some(BaseChain {
                    kind: "filter".into(),
                    hook: "forward".into(),
                    priority: "filter".into(),
                    policy: Some("accept".into()),
                }),
                rules: vec!["oifname @pending drop".into()],
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_dataplane::nft::{Change, diff, render_table, structure_hash};

    fn port(ifname: &str, mac: [u8; 6], ips: &[&str]) -> PortGuard {
        PortGuard {
            ifname: ifname.into(),
            mac,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pending: false,
        }
    }

    fn elements(t: &Table, name: &str) -> Vec<String> {
        t.sets
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .elements
            .iter()
            .cloned()
            .collect()
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
        let empty = table(&bridges, &[], &[]);
        let one = table(
            &bridges,
            &[port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2"])],
            &[],
        );
        let many = table(
            &["wn-blue".into(), "wn-red".into()],
            &[
                port("wfa", [0x0a, 0x58, 10, 77, 0, 2], &["10.77.0.2", "fd77::2"]),
                port("wfb", [0x0a, 0x58, 10, 77, 0, 3], &["10.77.0.3"]),
            ],
            &["wfo".into()],
        );
        assert_eq!(structure_hash(&empty), structure_hash(&one));
        assert_eq!(structure_hash(&empty), structure_hash(&many));
        assert_eq!(empty.chains, many.chains, "rules must not depend on ports");
        let tx = diff(&empty, &many);
        assert!(
            tx.0.iter().all(|c| matches!(c, Change::AddElements { .. })),
            "adding ports must be an element diff, got {tx:?}"
        );
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
            &["wfo".into(), "wfa".into()],
        );
        assert_eq!(elements(&t, "bridges"), ["\"wn-blue\""]);
        assert_eq!(elements(&t, "ports"), ["\"wfa\""]);
        assert_eq!(
            elements(&t, "open"),
            ["\"wfo\""],
            "a port both guarded and open must stay guarded"
        );
        assert_eq!(elements(&t, "macs"), ["\"wfa\" . 0a:58:0a:4d:00:02"]);
        assert_eq!(elements(&t, "ips4"), ["\"wfa\" . 10.77.0.2"]);
        assert_eq!(
            elements(&t, "ips6"),
            ["\"wfa\" . fd77::2", "\"wfa\" . fe80::858:aff:fe4d:2"],
            "ips6 must hold the configured address and the EUI-64 link-local one"
        );
    }

    #[test]
    fn renders_one_prerouting_filter_chain() {
        let text = render_table(&table(&[], &[], &[]));
        assert!(text.starts_with("table bridge weft {"), "{text}");
        assert!(
            text.contains("type filter hook prerouting priority filter; policy accept;"),
            "{text}"
        );
        assert!(text.contains("\t\tiifname != @ports drop\n"), "{text}");
    }
}

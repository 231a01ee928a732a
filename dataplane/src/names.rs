//! Names, paths and constants that the agent, the CNI binary and the lab must agree on.
//!
//! Host-side link names are derived from a hash of what identifies them (container id and
//! interface name, or the network name), so DEL and cleanup need no state to find them.

use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// Every link weft creates carries an alias (IFLA_IFALIAS) starting with this prefix.
pub const ALIAS_PREFIX: &str = "weft:";

/// The link group (`IFLA_GROUP`) weft moves its links into to delete them in one request
/// ([`crate::netlink::Netlink::delete_links`]): "weft" in ASCII. Reserved: every link in it is
/// deleted when weft deletes the group.
pub const DELETE_GROUP: u32 = 0x7765_6674;
/// The nftables table (family `inet`) that weft owns on every node.
pub const NFT_TABLE: &str = "weft";
/// Prefix of host-side veth names.
pub const HOST_VETH_PREFIX: &str = "wf";
/// Prefix of the bridges weft creates for its networks.
pub const BRIDGE_PREFIX: &str = "wn-";
/// The CNI `type` of weft's plugin, and the name of its binary.
pub const CNI_TYPE: &str = "weft";
/// File name of the conflist the agent writes into the CNI conf dir.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// Default directory of weft's node state (IPAM store, runtime network state).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";
/// Default path of the agent's CNI socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weft/agent.sock";
/// Default CNI binary directory.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// Default CNI configuration directory.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Linux' IFNAMSIZ: an interface name and its trailing NUL fit in 16 bytes.
pub const IFNAMSIZ: usize = 16;
/// The longest interface name in bytes: [`IFNAMSIZ`] minus the trailing NUL.
pub const IFNAME_MAX: usize = IFNAMSIZ - 1;

fn hex_digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a workload's host port `host_ifname` in the nftables tables: the bridge tags each
/// broadcast and multicast copy it sends out of the port with it (in the packet's priority,
/// `meta priority`), so that the policies can judge the copy as the receiver's ingress. 31 bits
/// of sha256(`port-id`, name), never 0 (an untagged packet); two ports of a node share one with
/// a chance of about n² / 2³² (1.5 in 100,000 with 250 ports), which the agent detects.
pub fn port_id(host_ifname: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(b"port-id\0");
    h.update(host_ifname.as_bytes());
    let d = h.finalize();
    let id = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff;
    id.max(1)
}

/// A [`port_id`] as nftables writes and lists a `classid` (the type of `meta priority`):
/// major and minor in hex, `1a2b:3c4d`.
pub fn classid_text(id: u32) -> String {
    format!("{:x}:{:x}", id >> 16, id & 0xffff)
}

/// The host-side veth name of one attachment: `wf` + 11 hex digits of
/// sha256(container id, ifname). 13 bytes, stable across weft versions.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let d = hex_digest(&[container_id, ifname]);
    format!("{HOST_VETH_PREFIX}{}", &d[..11])
}

/// Whether `alias` is the one weft puts on a workload's host link ([`host_veth_alias`]).
pub fn is_endpoint_alias(alias: &str) -> bool {
    alias
        .strip_prefix(ALIAS_PREFIX)
        .is_some_and(|a| a.starts_with("ep:"))
}

/// The network that weft's alias of a workload's host link ([`host_veth_alias`]) names.
pub fn endpoint_alias_network(alias: &str) -> Option<&str> {
    let (network, _) = alias
        .strip_prefix(ALIAS_PREFIX)?
        .strip_prefix("ep:")?
        .split_once(':')?;
    Some(network)
}

/// The alias weft puts on a host-side veth: names the network and the attachment.
pub fn host_veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    // IFLA_IFALIAS holds up to 128 bytes: keep the container id short enough.
    let cid: String = container_id.chars().take(64).collect();
    format!("{ALIAS_PREFIX}ep:{network}:{cid}:{ifname}")
        .chars()
        .take(127)
        .collect()
}

/// The tap a VM's NIC opens for the attachment `ifname`, named as KubeVirt's tap domain
/// attachment looks for it: `pod<hash>` → `tap<hash>`, `eth0` → `tap0`; otherwise `tap-` and
/// the interface name, cut to 15 bytes.
pub fn vm_tap_name(ifname: &str) -> String {
    if let Some(hash) = ifname.strip_prefix("pod")
        && !hash.is_empty()
    {
        return format!("tap{hash}");
    }
    if let Some(n) = ifname.strip_prefix("eth") {
        return format!("tap{n}");
    }
    format!("tap-{ifname}").chars().take(IFNAME_MAX).collect()
}

/// The bridge inside a VM's pod that joins weft's veth end to the VM's tap.
pub fn vm_bridge_name(ifname: &str) -> String {
    format!("wb-{ifname}").chars().take(IFNAME_MAX).collect()
}

/// The MAC of a VM's interface: derived from its stable identity, so it survives restart and
/// migration.
pub fn vm_mac(owner: &str, ifname: &str) -> [u8; 6] {
    hashed_mac(&["vm", owner, ifname])
}

/// The VXLAN link that carries one TrafficMirror's copies to its remote collector: `wx-` + 12
/// hex digits of the hash of `namespace/name`.
pub fn mirror_tunnel_name(mirror: &str) -> String {
    format!("wx-{}", &hex_digest(&["mirror", mirror])[..12])
}

/// The alias weft puts on a mirror's VXLAN link.
pub fn mirror_tunnel_alias(mirror: &str) -> String {
    format!("{ALIAS_PREFIX}mirror:{mirror}")
        .chars()
        .take(127)
        .collect()
}

/// Whether `alias` is the one weft puts on a mirror's VXLAN link ([`mirror_tunnel_alias`]).
pub fn is_mirror_tunnel_alias(alias: &str) -> bool {
    alias
        .strip_prefix(ALIAS_PREFIX)
        .is_some_and(|a| a.starts_with("mirror:"))
}

/// The IFB link that shapes what the workload behind host port `host_port` sends
/// ([`crate::netlink::Netlink::set_shaping`]): `wi` + 11 hex digits of the hash of the port's
/// name. 13 bytes, like the port's own name ([`host_veth_name`]).
pub fn shaping_ifb_name(host_port: &str) -> String {
    format!("wi{}", &hex_digest(&["shape", host_port])[..11])
}

/// The alias weft puts on the IFB link of host port `host_port` ([`shaping_ifb_name`]):
/// `weft:shape:<port>`.
pub fn shaping_ifb_alias(host_port: &str) -> String {
    format!("{ALIAS_PREFIX}shape:{host_port}")
        .chars()
        .take(127)
        .collect()
}

/// The alias of a spare shaping IFB link: one whose port has left, kept for the next port
/// shaped (see [`crate::netlink::Netlink::retire_ifb`]). Not a [`shaping_ifb_alias`]: it names
/// no port.
pub const SPARE_IFB_ALIAS: &str = "weft:shape-spare";

/// The host port a shaping IFB link's alias ([`shaping_ifb_alias`]) names; `None` for any
/// other alias.
pub fn shaped_port(alias: &str) -> Option<&str> {
    alias.strip_prefix(ALIAS_PREFIX)?.strip_prefix("shape:")
}

/// The alias weft puts on a network's bridge.
pub fn bridge_alias(network: &str) -> String {
    format!("{ALIAS_PREFIX}net:{network}")
        .chars()
        .take(127)
        .collect()
}

/// The bridge name of a network: `wn-<name>` when that fits in IFNAMSIZ and is a valid
/// interface name, else `wn-` + 12 hex digits of the name's hash.
pub fn bridge_name(network: &str) -> String {
    let candidate = format!("{BRIDGE_PREFIX}{network}");
    if candidate.len() <= IFNAME_MAX
        && is_valid_ifname(&candidate)
        && candidate
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        candidate
    } else {
        let d = hex_digest(&[network]);
        format!("{BRIDGE_PREFIX}{}", &d[..12])
    }
}

/// Whether `name` is a DNS-1123 subdomain (what the API server requires of a Network's name):
/// at most 253 characters, dot-separated labels of lowercase letters, digits and '-' that start
/// and end with a letter or digit. Every source of Network names (API, manifests dir, lab, CNI
/// netconf) is held to it, since the name becomes a file name and an nftables string.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        let b = l.as_bytes();
        let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        matches!((b.first(), b.last()), (Some(f), Some(e)) if ok(f) && ok(e))
            && b.iter().all(|c| ok(c) || *c == b'-')
    };
    name.len() <= 253 && name.split('.').all(label)
}

/// Why `name` is not a valid Network name, or `None` when it is (see [`is_dns1123_subdomain`]).
pub fn network_name_problem(name: &str) -> Option<String> {
    (!is_dns1123_subdomain(name)).then(|| {
        format!(
            "{name:?} is not a valid Network name: use at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (a DNS-1123 subdomain, as the Kubernetes API requires)"
        )
    })
}

/// Why `name` is not an interface name the kernel accepts, or `None` when it is one. This is
/// the kernel's `dev_valid_name()`: not empty, shorter than [`IFNAMSIZ`] bytes, not `.` or `..`,
/// no `/`, `:` or whitespace (its `isspace()`, which also counts the byte 0xA0, so some
/// non-ASCII names are refused; any Unicode whitespace is refused too). A NUL would cut the
/// name short in the kernel's C string, so it is refused as well.
///
/// This is weft's one interface-name rule; a caller with a stricter rule of its own (nft string
/// literals, the Network API's pattern) checks this one and adds its own on top.
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    // The kernel's isspace(): space, \t, \n, \v, \f, \r, and 0xA0 (its ctype table is Latin-1).
    let kernel_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0);
    if name.is_empty() {
        Some("empty")
    } else if name.len() > IFNAME_MAX {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not interface names")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains(':') {
        Some("contains ':'")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else if name.bytes().any(kernel_space) || name.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else {
        None
    }
}

/// Whether `name` is an interface name the kernel accepts (see [`ifname_problem`]).
pub fn is_valid_ifname(name: &str) -> bool {
    ifname_problem(name).is_none()
}

/// A locally administered unicast MAC derived from the given seed strings.
pub fn hashed_mac(parts: &[&str]) -> [u8; 6] {
    let d = hex_digest(parts);
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&d[i * 2..i * 2 + 2], 16).unwrap_or(0);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The MAC of a workload interface: `0a:58:` + its IPv4 address when it has one (the
/// convention of OVN-Kubernetes, readable in packet captures), else a hash of the attachment.
pub fn workload_mac(ips: &[IpAddr], container_id: &str, ifname: &str) -> [u8; 6] {
    for ip in ips {
        if let IpAddr::V4(v4) = ip {
            let o = v4.octets();
            return [0x0a, 0x58, o[0], o[1], o[2], o[3]];
        }
    }
    hashed_mac(&[container_id, ifname])
}

/// The fixed MAC of a network's bridge, so it does not change as ports come and go.
pub fn bridge_mac(network: &str) -> [u8; 6] {
    hashed_mac(&["bridge", network])
}

/// Formats a MAC as lowercase `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with dashes, not mixed), case-insensitive.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// The EUI-64 (modified, RFC 4291 appendix A) link-local address of a MAC: `fe80::/64` with
/// the U/L bit of the first octet flipped and `ff:fe` in the middle.
pub fn eui64_link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    std::net::Ipv6Addr::from([
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

#[cfg(test)]
mod tests {
    #[test]
    fn port_ids_are_31_bit_stable_distinct_and_written_as_nft_lists_a_classid() {
        let a = port_id("wf0123456789a");
        assert_eq!(a, port_id("wf0123456789a"));
        assert_ne!(a, port_id("wf0123456789b"));
        assert!((1..=0x7fff_ffff).contains(&a));
        assert_eq!(classid_text(0x1a2b_3c4d), "1a2b:3c4d");
        assert_eq!(classid_text(5), "0:5");
        assert_eq!(classid_text(0x7fff_0000), "7fff:0");
    }

    #[test]
    fn an_endpoint_alias_names_its_network() {
        let alias = host_veth_alias("lan.v2", "c1", "eth0");
        assert!(is_endpoint_alias(&alias));
        assert_eq!(endpoint_alias_network(&alias), Some("lan.v2"));
        let bridge = bridge_alias("lan.v2");
        assert!(!is_endpoint_alias(&bridge));
        assert_eq!(endpoint_alias_network(&bridge), None);
        assert_eq!(endpoint_alias_network("other:ep:lan:c1:eth0"), None);
        assert_eq!(endpoint_alias_network("weft:ep:lan"), None);
    }

    #[test]
    fn network_names_are_dns_1123_subdomains() {
        for ok in ["nat-demo", "a", "lan.v2", "0a"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
            assert!(network_name_problem(ok).is_none());
        }
        for bad in [
            "",
            "..",
            "a\",\"eth0",
            "../../victim",
            "Nat",
            "-a",
            "a-",
            "a..b",
            "a_b",
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn a_bridge_name_carries_no_character_nftables_would_parse() {
        // A name the kernel accepts but that would close an nftables string.
        let b = bridge_name("a\",\"eth0");
        assert!(b.starts_with(BRIDGE_PREFIX) && !b.contains('"'), "{b}");
        assert_eq!(bridge_name("nat-demo"), "wn-nat-demo");
    }

    use super::*;

    #[test]
    fn host_veth_name_is_short_stable_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("wf"));
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "net1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        // The separator keeps ("ab","ceth0") and ("abc","eth0") apart.
        assert_ne!(host_veth_name("ab", "ceth0"), a);
    }

    #[test]
    fn a_shaping_ifb_name_is_a_short_stable_interface_name_of_its_own() {
        let port = host_veth_name("abc", "eth0");
        let ifb = shaping_ifb_name(&port);
        assert_eq!(ifb.len(), 13);
        assert!(ifb.starts_with("wi"), "{ifb}");
        assert!(ifb[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{ifb}");
        assert!(is_valid_ifname(&ifb));
        assert_eq!(ifb, shaping_ifb_name(&port));
        assert_ne!(ifb, shaping_ifb_name(&host_veth_name("abc", "net1")));
        assert_ne!(ifb, port);
        assert!(!ifb.starts_with(HOST_VETH_PREFIX) && !ifb.starts_with(BRIDGE_PREFIX));
    }

    #[test]
    fn a_shaping_ifb_alias_names_its_port_and_is_told_apart() {
        let alias = shaping_ifb_alias("wf0123456789a");
        assert_eq!(alias, "weft:shape:wf0123456789a");
        assert_eq!(shaped_port(&alias), Some("wf0123456789a"));
        assert!(!is_endpoint_alias(&alias));
        assert!(!is_mirror_tunnel_alias(&alias));
        for other in [
            host_veth_alias("lan", "c1", "eth0"),
            mirror_tunnel_alias("ns/m"),
            bridge_alias("lan"),
            "shape:wf0123456789a".to_string(),
            "other:shape:x".to_string(),
        ] {
            assert_eq!(shaped_port(&other), None, "{other}");
        }
        assert_eq!(shaping_ifb_alias(&"x".repeat(200)).chars().count(), 127);
    }

    #[test]
    fn ifnames_the_kernel_accepts_are_valid() {
        for ok in [
            "eth0",
            "a",
            "abcdefghijklmno",
            "bond0.100",
            "br-lan",
            "veth_x",
            "-eth",
            "...",
            "eth0@x",
            "ëth0",
        ] {
            assert!(is_valid_ifname(ok), "{ok:?}");
            assert_eq!(ifname_problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn ifnames_the_kernel_refuses_are_rejected_with_the_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("abcdefghijklmnop", "longer than 15 bytes"),
            ("ëëëëëëëë", "longer than 15 bytes"),
            (".", "\".\" and \"..\" are not interface names"),
            ("..", "\".\" and \"..\" are not interface names"),
            ("eth/1", "contains '/'"),
            ("eth0:1", "contains ':'"),
            ("eth\0x", "contains NUL"),
            ("eth 1", "contains whitespace"),
            ("eth\t1", "contains whitespace"),
            ("eth\n1", "contains whitespace"),
            ("eth\u{0b}1", "contains whitespace"),
            ("eth\u{0c}1", "contains whitespace"),
            ("eth\r1", "contains whitespace"),
            ("eth\u{a0}1", "contains whitespace"),
            ("eth\u{2003}1", "contains whitespace"),
            // 'à' is C3 A0 in UTF-8, and the kernel's isspace() counts the byte 0xA0.
            ("à", "contains whitespace"),
        ] {
            assert!(!is_valid_ifname(bad), "{bad:?}");
            assert_eq!(ifname_problem(bad), Some(why), "{bad:?}");
        }
        assert_eq!(IFNAME_MAX, 15);
    }

    #[test]
    fn bridge_names_fit_ifnamsiz() {
        assert_eq!(bridge_name("nat-demo"), "wn-nat-demo");
        let long = bridge_name("a-very-long-network-name");
        assert!(long.len() <= IFNAME_MAX);
        assert!(long.starts_with("wn-"));
        assert_ne!(long, bridge_name("a-very-long-network-name2"));
    }

    #[test]
    fn workload_mac_embeds_ipv4() {
        let mac = workload_mac(&["10.1.2.3".parse().unwrap()], "c", "eth0");
        assert_eq!(format_mac(mac), "0a:58:0a:01:02:03");
        let v6only = workload_mac(&["fd00::5".parse().unwrap()], "c", "eth0");
        assert_eq!(v6only[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn mac_round_trips() {
        let m = parse_mac("0A:58:0a:01:02:03").unwrap();
        assert_eq!(format_mac(m), "0a:58:0a:01:02:03");
        assert!(parse_mac("0a:58:0a:01:02").is_none());
        assert!(parse_mac("zz:58:0a:01:02:03").is_none());
    }
}

//! VXLAN links: the tunnel a mirror's copies take to a remote collector.

use super::{Netlink, NetlinkError, check_ifname};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
use std::net::IpAddr;
use tracing::debug;

/// The largest VXLAN network identifier (24 bits).
const MAX_VNI: u32 = (1 << 24) - 1;

/// What a link found by name is, for [`Netlink::ensure_vxlan`].
#[derive(Debug, Default)]
struct Found {
    index: u32,
    up: bool,
    kind: Option<String>,
    vni: Option<u32>,
    remote: Option<IpAddr>,
    port: Option<u16>,
    learning: Option<bool>,
    alias: Option<String>,
}

fn found(msg: LinkMessage) -> Found {
    let mut f = Found {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Found::default()
    };
    for attr in msg.attributes {
        let infos = match attr {
            LinkAttribute::LinkInfo(infos) => infos,
            LinkAttribute::IfAlias(a) => {
                f.alias = Some(a);
                continue;
            }
            _ => continue,
        };
        for info in infos {
            match info {
                NlLinkInfo::Kind(k) => f.kind = Some(k.to_string()),
                NlLinkInfo::Data(InfoData::Vxlan(data)) => {
                    for d in data {
                        match d {
                            InfoVxlan::Id(v) => f.vni = Some(v),
                            InfoVxlan::Group(a) => f.remote = Some(a.into()),
                            InfoVxlan::Group6(a) => f.remote = Some(a.into()),
                            InfoVxlan::Port(p) => f.port = Some(p),
                            InfoVxlan::Learning(l) => f.learning = Some(l),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    f
}

/// `RTM_NEWLINK`: VXLAN link `name` with VNI `vni` to `remote`, UDP destination port
/// `dst_port`, no learning, up (`ip link add NAME type vxlan id VNI remote REMOTE dstport
/// PORT nolearning`, then up).
pub fn vxlan_message(name: &str, vni: u32, remote: IpAddr, dst_port: u16) -> LinkMessage {
    let b = LinkMessageBuilder::<LinkVxlan>::new(name)
        .id(vni)
        .port(dst_port)
        .learning(false);
    let b = match remote {
        IpAddr::V4(a) => b.remote(a),
        IpAddr::V6(a) => b.remote6(a),
    };
    b.up().build()
}

impl Netlink {
    /// Creates (or corrects) VXLAN link `name`: VNI `vni`, remote `remote`, UDP destination
    /// port `dst_port`, no learning, up; returns its index. Remote collectors get a mirror's
    /// copies through it: each copied frame leaves as the payload of a UDP datagram to
    /// `remote:dst_port`, behind an 8-byte VXLAN header carrying `vni`.
    ///
    /// An existing VXLAN link `name` with other settings is deleted and made again (the kernel
    /// cannot change a VXLAN link's VNI or port in place), so its index changes; one with these
    /// settings is only set up. A link `name` of another kind is an error
    /// ([`NetlinkError::Invalid`]): weft does not delete what it did not make.
    pub fn ensure_vxlan(
        &mut self,
        name: &str,
        vni: u32,
        remote: IpAddr,
        dst_port: u16,
    ) -> Result<u32, NetlinkError> {
        const OP: &str = "ensure vxlan";
        let target = || format!("{name} (vni {vni}, remote {remote} port {dst_port})");
        check_ifname(OP, &target(), name)?;
        let invalid = |reason: String| NetlinkError::Invalid {
            op: OP,
            target: target(),
            reason,
        };
        if vni > MAX_VNI {
            return Err(invalid(format!(
                "VNI {vni} does not fit in 24 bits: use one from 0 to {MAX_VNI}"
            )));
        }
        if remote.is_unspecified() || remote.is_multicast() {
            return Err(invalid(format!(
                "remote {remote} is not a unicast address: give the collector's address"
            )));
        }
        let msg = LinkUnspec::new_with_name(name).build();
        let existing = match self.call(OP, target, RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(found(l)),
                _ => None,
            }),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        if let Some(link) = existing {
            if link.kind.as_deref() != Some("vxlan") {
                return Err(invalid(format!(
                    "link {name} exists and is {}, not a VXLAN link: delete it or choose another \
                     name",
                    link.kind.as_deref().unwrap_or("a device of no kind")
                )));
            }
            // Another's VXLAN link under the name (one with no alias yet is weft's, made by
            // an agent stopped before it named it).
            if let Some(alias) = link
                .alias
                .as_deref()
                .filter(|a| !crate::names::is_mirror_tunnel_alias(a))
            {
                return Err(invalid(format!(
                    "link {name} exists and is not weft's mirror tunnel (alias {alias:?}): delete it or rename the TrafficMirror"
                )));
            }
            let same = link.vni == Some(vni)
                && link.remote == Some(remote)
                && link.port == Some(dst_port)
                && link.learning == Some(false);
            if same {
                if !link.up {
                    self.set_up(link.index)?;
                }
                return Ok(link.index);
            }
            debug!(vxlan = %name, "recreating VXLAN link with new settings");
            self.delete_link(link.index)?;
        }
        let index =
            self.create_link(OP, name, vxlan_message(name, vni, remote, dst_port), target)?;
        debug!(vxlan = %name, index, vni, %remote, dst_port, "created VXLAN link");
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::round_trip;
    use super::*;

    #[test]
    fn the_vxlan_message_reads_back_as_what_ensure_vxlan_compares() {
        for remote in ["10.77.0.2", "fd77::2"] {
            let remote: IpAddr = remote.parse().unwrap();
            let RouteNetlinkMessage::NewLink(msg) = round_trip(RouteNetlinkMessage::NewLink(
                vxlan_message("wmir0", 42, remote, 4789),
            )) else {
                panic!("not RTM_NEWLINK");
            };
            let f = found(msg);
            assert_eq!(f.kind.as_deref(), Some("vxlan"));
            assert_eq!(f.vni, Some(42));
            assert_eq!(f.remote, Some(remote));
            assert_eq!(f.port, Some(4789));
            assert_eq!(f.learning, Some(false));
            assert!(f.up);
        }
    }
}

//! Routes: the unicast routes of the main table as [`RouteInfo`], replacing and deleting one
//! described by a [`RouteSpec`], and the routes of any table out of one link as
//! [`RouteEntry`], kept exactly so that they can be moved to another link and back.

use super::{Netlink, NetlinkError};
use ipnet::IpNet;
use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope, RouteType, RouteVia,
};
use rtnetlink::RouteMessageBuilder;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP version of a route dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl Family {
    fn of_header(h: &RouteHeader) -> Option<Family> {
        match h.address_family {
            netlink_packet_route::AddressFamily::Inet => Some(Family::V4),
            netlink_packet_route::AddressFamily::Inet6 => Some(Family::V6),
            _ => None,
        }
    }
}

/// One unicast route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination (`0.0.0.0/0` or `::/0` for a default route).
    pub dst: IpNet,
    /// Next hop, if any (an IPv6 next hop of an IPv4 route is reported as is).
    pub gateway: Option<IpAddr>,
    /// Output interface, if any (multipath routes have none).
    pub oif: Option<u32>,
    /// Routing table id (254, main).
    pub table: u32,
    /// `rtm_protocol`: 2 kernel, 3 boot, 4 static (what [`Netlink::replace_route`] uses)…
    pub protocol: u8,
}

/// A route to add, replace or delete in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination; host bits are cleared before sending (`10.0.0.5/24` means `10.0.0.0/24`).
    pub dst: IpNet,
    /// Next hop, or `None` for a route straight out of `oif` (scope link).
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Preferred source address (`src` in `ip route`).
    pub src: Option<IpAddr>,
}

/// A route of any table, with everything needed to put it back exactly: what weft saves when it
/// moves a node's routes from an uplink to a bridge, and restores when it gives the uplink back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// Destination.
    pub dst: IpNet,
    /// Next hop, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Routing table id.
    pub table: u32,
    /// `rtm_protocol` (3 boot, 4 static, 16 dhcp…).
    pub protocol: u8,
    /// `rtm_scope` (0 universe, 253 link).
    pub scope: u8,
    /// Metric (`RTA_PRIORITY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    /// Preferred source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefsrc: Option<IpAddr>,
    /// `onlink`: the next hop is on the link whatever the link's addresses say (a node with a
    /// /32 address and its gateway outside it, as cloud DHCP and netplan's `on-link` make).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onlink: bool,
    /// The route's metrics (`RTA_METRICS`: `mtu`, `advmss`, `initcwnd`…) as `(RTAX_*, value)`;
    /// the congestion control algorithm, a name, is not kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<(u16, u32)>,
}

impl RouteEntry {
    /// `routes` in an order the kernel takes them in: routes straight out of the link first,
    /// then those through a next hop, which the kernel refuses while no route reaches the next
    /// hop (a default route via a gateway outside the link's subnets needs the host route to the
    /// gateway in first).
    pub fn in_order(routes: &[RouteEntry]) -> Vec<&RouteEntry> {
        let mut out: Vec<&RouteEntry> = routes.iter().collect();
        out.sort_by_key(|r| r.gateway.is_some());
        out
    }
}

impl fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        if self.table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_info(msg: &RouteMessage, family: Family) -> Option<RouteInfo> {
    let (e, oif) = route_entry(msg, family)?;
    Some(RouteInfo {
        dst: e.dst,
        gateway: e.gateway,
        oif,
        table: e.table,
        protocol: e.protocol,
    })
}

/// Reads a route dump message as a [`RouteEntry`] with its output interface (multipath routes
/// have none).
fn route_entry(msg: &RouteMessage, family: Family) -> Option<(RouteEntry, Option<u32>)> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = None;
    let mut prefsrc = None;
    let mut metrics = Vec::new();
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_addr(a),
            RouteAttribute::Gateway(a) => gateway = route_addr(a),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::PrefSource(a) => prefsrc = route_addr(a),
            RouteAttribute::Metrics(ms) => {
                metrics = ms.iter().filter_map(metric_value).collect();
            }
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    Some((
        RouteEntry {
            dst: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
            gateway,
            table,
            protocol: u8::from(msg.header.protocol),
            scope: u8::from(msg.header.scope),
            metric,
            prefsrc,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
            metrics,
        },
        oif,
    ))
}

/// A metric as `(RTAX_*, value)`; `None` for one whose value is not a number (the congestion
/// control algorithm's name).
fn metric_value(m: &RouteMetric) -> Option<(u16, u32)> {
    if matches!(m, RouteMetric::CcAlgo(_)) || m.value_len() != 4 {
        return None;
    }
    let mut v = [0u8; 4];
    m.emit_value(&mut v);
    Some((m.kind(), u32::from_ne_bytes(v)))
}

/// The `RTM_NEWROUTE` / `RTM_DELROUTE` message of `entry` out of `oif`.
pub fn route_entry_message(entry: &RouteEntry, oif: u32) -> Result<RouteMessage, NetlinkError> {
    let invalid = |reason: String| NetlinkError::Invalid {
        op: "route",
        target: entry.to_string(),
        reason,
    };
    let dst = entry.dst.trunc();
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| invalid(e.to_string()))?
        .output_interface(oif)
        .table_id(entry.table)
        .protocol(RouteProtocol::from(entry.protocol))
        .scope(RouteScope::from(entry.scope));
    if let Some(gw) = entry.gateway {
        b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(src) = entry.prefsrc {
        b = b.pref_source(src).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(m) = entry.metric {
        b = b.priority(m);
    }
    let mut msg = b.build();
    if entry.onlink {
        msg.header.flags |= RouteFlags::Onlink;
    }
    if !entry.metrics.is_empty() {
        msg.attributes.push(RouteAttribute::Metrics(
            entry
                .metrics
                .iter()
                .map(|&(kind, value)| {
                    RouteMetric::Other(DefaultNla::new(kind, value.to_ne_bytes().to_vec()))
                })
                .collect(),
        ));
    }
    Ok(msg)
}

fn describe_route(spec: &RouteSpec) -> String {
    let mut s = spec.dst.trunc().to_string();
    if let Some(gw) = spec.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = spec.oif {
        s.push_str(&format!(" dev {oif}"));
    }
    s
}

impl Netlink {
    /// The unicast routes of the main table, for one IP version.
    pub fn routes(&mut self, family: Family) -> Result<Vec<RouteInfo>, NetlinkError> {
        Ok(self
            .unicast_routes(family)?
            .iter()
            .filter_map(|r| route_info(r, family))
            .filter(|r| r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    /// Every unicast route of one IP version, all tables.
    fn unicast_routes(&mut self, family: Family) -> Result<Vec<RouteMessage>, NetlinkError> {
        let msg = match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let replies = self.call(
            "list routes",
            || format!("{family:?}"),
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.kind == RouteType::Unicast
                        && Family::of_header(&r.header) == Some(family) =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect())
    }

    fn route_message(op: &'static str, spec: &RouteSpec) -> Result<RouteMessage, NetlinkError> {
        let invalid = |reason: String| NetlinkError::Invalid {
            op,
            target: spec.dst.to_string(),
            reason,
        };
        let dst = spec.dst.trunc();
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(gw) = spec.gateway {
            b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(src) = spec.src {
            if Family::of(src) != Family::of(dst.addr()) {
                return Err(invalid(format!(
                    "source {src} is not of the destination's family"
                )));
            }
            b = b.pref_source(src).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(oif) = spec.oif {
            b = b.output_interface(oif);
        }
        if spec.gateway.is_none() && spec.oif.is_some() && dst.addr().is_ipv4() {
            b = b.scope(RouteScope::Link);
        }
        Ok(b.build())
    }

    /// Adds or replaces a main-table route (`ip route replace`, protocol static).
    pub fn replace_route(&mut self, spec: &RouteSpec) -> Result<(), NetlinkError> {
        const OP: &str = "replace route";
        let msg = Self::route_message(OP, spec)?;
        self.call(
            OP,
            || describe_route(spec),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Deletes a main-table route matching `spec` (any protocol and scope). `Ok(false)` when
    /// there was none.
    pub fn del_route(&mut self, spec: &RouteSpec) -> Result<bool, NetlinkError> {
        const OP: &str = "delete route";
        let mut msg = Self::route_message(OP, spec)?;
        // Like `ip route del`: match whatever protocol, scope and type the route has.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
        match self.call(
            OP,
            || describe_route(spec),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The unicast routes (every table but `local`) whose output interface is `index`, both IP
    /// versions, except those the kernel made itself (connected and prefix routes, which follow
    /// their addresses).
    pub fn routes_via(&mut self, index: u32) -> Result<Vec<RouteEntry>, NetlinkError> {
        const RT_TABLE_LOCAL: u32 = 255;
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            for r in self.unicast_routes(family)? {
                if r.header.protocol == RouteProtocol::Kernel {
                    continue;
                }
                if let Some((entry, Some(oif))) = route_entry(&r, family)
                    && oif == index
                    && entry.table != RT_TABLE_LOCAL
                {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// Adds `entry` out of `oif`, replacing a route with the same key (destination, table,
    /// metric): moving a route between links is one message.
    pub fn replace_route_entry(
        &mut self,
        entry: &RouteEntry,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let msg = route_entry_message(entry, oif)?;
        self.call(
            "replace route",
            || format!("{entry} dev {oif}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Deletes `entry` out of `oif`; `Ok(false)` when there was none. Its metrics are not
    /// part of what the kernel matches here: one changed since it was recorded (a DHCP client's
    /// new MTU) would make the kernel find no such route and leave it.
    pub fn del_route_entry(&mut self, entry: &RouteEntry, oif: u32) -> Result<bool, NetlinkError> {
        let mut msg = route_entry_message(entry, oif)?;
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::Metrics(_)));
        match self.call(
            "delete route",
            || format!("{entry} dev {oif}"),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_messages_clear_host_bits_and_use_link_scope_without_gateway() {
        let spec = RouteSpec {
            dst: "10.1.2.3/24".parse().unwrap(),
            gateway: None,
            oif: Some(3),
            src: None,
        };
        let msg = Netlink::route_message("t", &spec).unwrap();
        assert_eq!(msg.header.destination_prefix_length, 24);
        assert_eq!(msg.header.scope, RouteScope::Link);
        assert!(
            msg.attributes
                .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                    "10.1.2.0".parse().unwrap()
                )))
        );
    }

    #[test]
    fn route_entries_keep_table_metric_source_and_protocol() {
        let entry = RouteEntry {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("192.168.50.1".parse().unwrap()),
            table: 254,
            protocol: 16,
            scope: 0,
            metric: Some(100),
            prefsrc: Some("192.168.50.11".parse().unwrap()),
            onlink: true,
            // RTAX_MTU, RTAX_INITCWND.
            metrics: vec![(2, 1400), (11, 20)],
        };
        let msg = route_entry_message(&entry, 7).unwrap();
        let (back, oif) = route_entry(&msg, Family::V4).unwrap();
        assert_eq!(back, entry);
        assert_eq!(oif, Some(7));
        assert_eq!(
            entry.to_string(),
            "0.0.0.0/0 via 192.168.50.1 onlink metric 100"
        );
        let v6 = RouteEntry {
            dst: "fd00:1::/64".parse().unwrap(),
            gateway: Some("fd00::1".parse().unwrap()),
            table: 100,
            protocol: 4,
            scope: 0,
            metric: None,
            prefsrc: None,
            onlink: false,
            metrics: Vec::new(),
        };
        let (back, _) = route_entry(&route_entry_message(&v6, 3).unwrap(), Family::V6).unwrap();
        assert_eq!(back, v6);
        let saved = serde_json::to_string(&v6).unwrap();
        assert_eq!(serde_json::from_str::<RouteEntry>(&saved).unwrap(), v6);
    }

    #[test]
    fn route_with_foreign_source_is_invalid() {
        let spec = RouteSpec {
            dst: "10.1.2.0/24".parse().unwrap(),
            gateway: None,
            oif: Some(3),
            src: Some("fd00::1".parse().unwrap()),
        };
        assert!(matches!(
            Netlink::route_message("t", &spec),
            Err(NetlinkError::Invalid { .. })
        ));
    }
}

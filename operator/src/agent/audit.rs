//! Audit records: the policy rules with `log: true` and every drop decided by a default (a
//! namespace policy's isolation, a Network's `defaultAction: Deny`) carry an nftables `log`
//! statement to NFLOG group [`LOG_GROUP`] with a prefix naming the rule (`weft r<id> <verdict>`)
//! or the stage (`weft default-eg deny`). The agent reads that group over netlink and writes one
//! JSON line per packet: time, node, source and destination workload and address, protocol, port,
//! policy, rule, verdict.

use crate::policy::{Compiled, Direction};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigFlags, ConfigMode, PacketNla, Timeout, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::policy::render::LOG_GROUP;

/// One audit record (a JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// RFC 3339 time.
    pub time: String,
    /// The node.
    pub node: String,
    /// `accept`, `deny` or `pass`.
    pub verdict: String,
    /// `ingress` or `egress` (whose policy decided).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `ClusterSegmentationPolicy name` or `SegmentationPolicy namespace/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The rule's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For a default: what decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source workload (`namespace/name`), when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<String>,
    /// Destination workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<String>,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    /// Destination port (TCP, UDP, SCTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a log prefix says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefix {
    /// A rule of a policy.
    Rule {
        /// Its id in the compilation.
        id: u32,
        /// `accept`, `deny`, `pass`.
        verdict: String,
    },
    /// A stage's default: `isolated-in`, `isolated-eg`, `default-in`, `default-eg`.
    Stage {
        /// The stage.
        stage: String,
        /// The verdict.
        verdict: String,
    },
}

/// Parses `weft r12 deny ` or `weft default-eg deny `.
pub fn parse_prefix(prefix: &str) -> Option<Prefix> {
    let mut parts = prefix.split_whitespace();
    if parts.next()? != "weft" {
        return None;
    }
    let what = parts.next()?;
    let verdict = parts.next()?.to_string();
    if let Some(id) = what.strip_prefix('r').and_then(|n| n.parse().ok()) {
        return Some(Prefix::Rule { id, verdict });
    }
    Some(Prefix::Stage {
        stage: what.to_string(),
        verdict,
    })
}

/// Builds the record of one logged packet (its IP header first), or `None` when the prefix is
/// not weft's or the payload is not an IP packet.
pub fn record(
    compiled: &Compiled,
    node: &str,
    time: String,
    prefix: &str,
    payload: &[u8],
) -> Option<AuditRecord> {
    let prefix = parse_prefix(prefix)?;
    let packet = etherparse::SlicedPacket::from_ip(payload).ok()?;
    let (src, dst, proto): (IpAddr, IpAddr, u8) = match &packet.net {
        Some(etherparse::NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.header().protocol().0,
        ),
        Some(etherparse::NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload().ip_number.0,
        ),
        _ => return None,
    };
    let port = match &packet.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => Some(t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => Some(u.destination_port()),
        // SCTP: the destination port is the second 16-bit word of its common header.
        _ if proto == 132 => packet
            .ip_payload()
            .and_then(|p| p.payload.get(2..4))
            .map(|b| u16::from_be_bytes([b[0], b[1]])),
        _ => None,
    };
    let protocol = weft_crds::L4Protocol::from_number(proto)
        .map_or_else(|| proto.to_string(), |p| p.nft_name().to_string());
    let owner = |ip: &IpAddr| compiled.owners.get(ip).map(|o| o.1.clone());
    let mut rec = AuditRecord {
        time,
        node: node.to_string(),
        verdict: String::new(),
        direction: None,
        policy: None,
        rule: None,
        reason: None,
        src,
        dst,
        src_workload: owner(&src),
        dst_workload: owner(&dst),
        protocol,
        port,
    };
    match prefix {
        Prefix::Rule { id, verdict } => {
            rec.verdict = verdict;
            if let Some((dir, r)) = compiled.rule_with_direction(id) {
                rec.direction = Some(dir);
                rec.policy = Some(format!("{} {}", r.origin.kind, r.origin.policy));
                rec.rule = Some(r.origin.rule.clone());
            }
        }
        Prefix::Stage { stage, verdict } => {
            rec.verdict = verdict;
            let (what, dir) = stage.split_once('-').unwrap_or((stage.as_str(), ""));
            rec.direction = match dir {
                "in" => Some(Direction::Ingress),
                "eg" => Some(Direction::Egress),
                _ => None,
            };
            rec.reason = Some(match what {
                "isolated" => {
                    "isolated by a SegmentationPolicy of its namespace; no Allow rule matches"
                        .into()
                }
                "default" => {
                    "no policy decides; the Network's security.defaultAction is Deny".into()
                }
                "bruteforce" => {
                    "more new connections to the port than its PortForward's spec.bruteForce allows: the source is banned from it for spec.bruteForce.banSeconds".into()
                }
                other => other.to_string(),
            });
        }
    }
    Some(rec)
}

/// The policy the reader names rules from, swapped by the agent after each reconcile.
pub type SharedPolicy = Arc<Mutex<Arc<Compiled>>>;

/// Audit counters by verdict (exported in the agent's status).
pub type Counters = Arc<Mutex<BTreeMap<String, u64>>>;

fn send(
    socket: &netlink_sys::Socket,
    msg: NetlinkMessage<NetfilterMessage>,
) -> std::io::Result<()> {
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;
    let mut reply = vec![0; 4096];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&reply[..n])
        .map_err(|e| std::io::Error::other(format!("nflog config reply: {e}")))?;
    if let NetlinkPayload::Error(e) = msg.payload
        && let Some(code) = e.code
    {
        return Err(std::io::Error::from_raw_os_error(-code.get()));
    }
    Ok(())
}

/// Binds NFLOG group [`LOG_GROUP`] in the current network namespace.
pub fn bind() -> std::io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::constants::NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    let timeout: Timeout = Duration::from_millis(100).into();
    send(
        &socket,
        config_request(
            NetfilterProtoFamily::Unspec,
            LOG_GROUP,
            vec![
                ConfigCmd::Bind.into(),
                ConfigFlags::SEQ_GLOBAL.into(),
                ConfigMode::new_packet(256).into(),
                timeout.into(),
            ],
        ),
    )?;
    Ok(socket)
}

/// Reads the group forever (a dedicated thread), writing records to `out`. A pending port's
/// logged announcement ([`super::guard::ACTIVATE_PREFIX`]) goes to `on_activate` with the
/// index of the port it arrived on.
pub fn run(
    socket: netlink_sys::Socket,
    node: String,
    compiled: SharedPolicy,
    out: super::anomaly::Sink,
    counters: Counters,
    on_activate: Box<dyn Fn(u32) + Send>,
) {
    let mut buf = vec![0; 65536];
    loop {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reading audit records failed; audit stopped");
                return;
            }
        };
        let mut offset = 0;
        while offset < n {
            let Ok(msg) = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[offset..n]) else {
                break;
            };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = &msg.payload
            {
                let prefix = nlas.iter().find_map(|n| match n {
                    PacketNla::Prefix(p) => Some(p.to_string_lossy().into_owned()),
                    _ => None,
                });
                let payload = nlas.iter().find_map(|n| match n {
                    PacketNla::Payload(p) => Some(p.as_slice()),
                    _ => None,
                });
                if prefix.as_deref().map(str::trim) == Some(super::guard::ACTIVATE_PREFIX.trim()) {
                    // Logged in the bridge family, the port is the physical input device
                    // (the input device is the bridge) when br_netfilter is loaded.
                    let physical = nlas.iter().find_map(|n| match n {
                        PacketNla::IfIndexPhysInDev(i) => Some(*i),
                        _ => None,
                    });
                    let input = nlas.iter().find_map(|n| match n {
                        PacketNla::IfIndexInDev(i) => Some(*i),
                        _ => None,
                    });
                    if let Some(port) = physical.or(input) {
                        on_activate(port);
                    }
                    if len == 0 {
                        break;
                    }
                    offset += len;
                    continue;
                }
                if let (Some(prefix), Some(payload)) = (prefix, payload) {
                    let time = jiff::Timestamp::now().to_string();
                    let current = compiled.lock().map(|c| Arc::clone(&c)).ok();
                    let rec = current.and_then(|c| record(&c, &node, time, &prefix, payload));
                    if let Some(rec) = rec {
                        if let Ok(mut c) = counters.lock() {
                            *c.entry(rec.verdict.clone()).or_default() += 1;
                        }
                        if let (Ok(mut line), Ok(mut out)) = (serde_json::to_vec(&rec), out.lock())
                        {
                            line.push(b'\n');
                            let _ = out.write_all(&line);
                            let _ = out.flush();
                        }
                    }
                }
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse() {
        assert_eq!(
            parse_prefix("weft r12 deny "),
            Some(Prefix::Rule {
                id: 12,
                verdict: "deny".into()
            })
        );
        assert_eq!(
            parse_prefix("weft default-eg deny "),
            Some(Prefix::Stage {
                stage: "default-eg".into(),
                verdict: "deny".into()
            })
        );
        assert_eq!(parse_prefix("other r1 deny"), None);
    }

    #[test]
    fn a_logged_tcp_packet_becomes_a_record_naming_policy_and_workloads() {
        use crate::model::{Resources, parse_manifests};
        let mut res = Resources::default();
        parse_manifests(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: net}
spec: {mode: NAT, subnets: [10.0.0.0/24]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: no-ssh}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress: [{name: ssh, action: Deny, protocols: [{protocol: TCP, port: 22}], log: true}]
"#,
            "t",
            &mut res,
        );
        let members = vec![crate::policy::Member {
            namespace: "default".into(),
            name: "db".into(),
            labels: Default::default(),
            network: "net".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            local: true,
        }];
        let c = crate::policy::compile_resources(&res, &members);
        let id = c.ingress.admin[0].id;
        let mut payload = Vec::new();
        etherparse::PacketBuilder::ipv4([192, 168, 50, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 22, 1, 1000)
            .syn()
            .write(&mut payload, &[])
            .unwrap();
        let rec = record(
            &c,
            "node-a",
            "t".into(),
            &format!("weft r{id} deny "),
            &payload,
        )
        .unwrap();
        assert_eq!(rec.verdict, "deny");
        assert_eq!(rec.direction, Some(Direction::Ingress));
        assert_eq!(
            rec.policy.as_deref(),
            Some("ClusterSegmentationPolicy no-ssh")
        );
        assert_eq!(rec.rule.as_deref(), Some("ssh"));
        assert_eq!(rec.dst_workload.as_deref(), Some("default/db"));
        assert_eq!(rec.src_workload, None);
        assert_eq!(rec.protocol, "tcp");
        assert_eq!(rec.port, Some(22));
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["dstWorkload"], "default/db");
        assert!(record(&c, "n", "t".into(), "weft r1 deny", &[1, 2, 3]).is_none());
    }
}

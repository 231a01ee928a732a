//! Set element changes straight over nf_tables netlink, without the `nft` process.
//!
//! Registering a workload changes set elements only (its port, MAC and addresses in the guard
//! and policy sets). Through `nft -f` that costs a process and, worse, nft's refresh of its
//! ruleset cache before every transaction, which grows with the rules (≈ 9 ms on a table with a
//! few hundred rules). Here the same change is one nfnetlink batch — `NFNL_MSG_BATCH_BEGIN`,
//! one `NFT_MSG_NEWSETELEM`/`NFT_MSG_DELSETELEM` per set, `NFNL_MSG_BATCH_END` — sent with one
//! `sendmsg`: the kernel commits it atomically or not at all, exactly as it commits nft's batch.
//!
//! Only what is simple to encode goes this way: element changes of sets and maps whose key
//! (and value) is made of `ifname`, `ipv4_addr`, `ipv6_addr`, `ether_addr`, `inet_proto`,
//! `inet_service` and raw payload integers of `typeof` keys (concatenations included), without
//! the `interval` flag or else concatenations (a range element is its key's start and end, as
//! nft sends it to a `pipapo` set: the host-port maps), in a batch of moderate size.
//! [`element_batch`] answers `None` for anything else — table replaces, intervals of one field
//! (kept as two elements, the end flagged), verdicts and other types, elements it cannot parse —
//! and the caller gives the transaction to `nft -f` unchanged.
//!
//! Key encoding is nft's: addresses and ports in network byte order, an interface name as 16
//! bytes zero-padded (`IFNAMSIZ`), a protocol as one byte; in a concatenation every field is
//! padded to a multiple of 4 bytes (nft's register size), so `ifname . ether_addr` is 16 + 8.

use super::{Change, Family, NftError, Transaction};
use crate::netlink::{Received, RxBuffer};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetAttribute, SetElementAttribute,
    SetElementList, SetElementMessage, SetMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily, NetfilterSubsystem,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The most element bytes in one message: netlink attributes are at most 64 KiB long, so a
/// set's elements beyond this go in another message of the same batch.
const MAX_MESSAGE_BYTES: usize = 60 * 1024;

/// The most element bytes sent over netlink in one batch; larger changes (a full resync after
/// many changes) go to `nft -f`, which sizes its socket buffer for them. Well under the
/// default socket send buffer (208 KiB).
const MAX_BATCH_BYTES: usize = 160 * 1024;

/// The attribute headers around one element's key: the list element, the key, the value.
const ELEMENT_OVERHEAD: usize = 12;

/// An encoded batch, ready to send: the messages and what each one changes (for errors).
#[derive(Debug)]
pub(super) struct ElementBatch {
    bytes: Vec<u8>,
    /// (sequence number, summary) of each element message.
    messages: Vec<(u32, String)>,
    /// The sequence number of the batch begin message.
    begin: u32,
    /// The sequence number of the last element message, the only one acknowledged: the
    /// kernel reports a failing message whether or not it asked for an acknowledgement, and
    /// in order, so its error comes before the last message's answer.
    last: u32,
}

impl ElementBatch {
    /// The number of element messages.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }
}

fn proto_family(family: Family) -> NetfilterProtoFamily {
    match family {
        Family::Inet => NetfilterProtoFamily::Inet,
        Family::Ip => NetfilterProtoFamily::IPv4,
        Family::Ip6 => NetfilterProtoFamily::IPv6,
        Family::Bridge => NetfilterProtoFamily::Bridge,
        Family::Netdev => NetfilterProtoFamily::NetDev,
    }
}

/// One field of a key, in nft's byte encoding; `None` for a type or text not handled here.
fn encode_field(key_type: &str, text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    Some(match key_type {
        "ifname" => {
            let name = text
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .unwrap_or(text);
            if name.is_empty() || name.len() > 15 || name.contains(['"', '*', '\\']) {
                return None;
            }
            let mut bytes = name.as_bytes().to_vec();
            bytes.resize(16, 0);
            bytes
        }
        "ipv4_addr" => text.parse::<Ipv4Addr>().ok()?.octets().to_vec(),
        "ipv6_addr" => text.parse::<Ipv6Addr>().ok()?.octets().to_vec(),
        "ether_addr" => {
            let parts: Vec<u8> = text
                .split(':')
                .map(|p| (p.len() <= 2).then(|| u8::from_str_radix(p, 16).ok())?)
                .collect::<Option<_>>()?;
            if parts.len() != 6 {
                return None;
            }
            parts
        }
        "inet_proto" => vec![match text {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            "icmpv6" => 58,
            "sctp" => 132,
            n => n.parse().ok()?,
        }],
        "inet_service" => text.parse::<u16>().ok()?.to_be_bytes().to_vec(),
        // A packet's priority, `major:minor` in hex, in host byte order (as the kernel holds
        // `skb->priority` and nft's `classid` type declares).
        "classid" => {
            let (major, minor) = text.split_once(':')?;
            let major = u32::from_str_radix(major, 16)
                .ok()
                .filter(|m| *m <= 0xffff)?;
            let minor = u32::from_str_radix(minor, 16)
                .ok()
                .filter(|m| *m <= 0xffff)?;
            ((major << 16) | minor).to_ne_bytes().to_vec()
        }
        t => encode_integer(t.strip_prefix("int:")?, text)?,
    })
}

/// A `typeof` key expression as the datatype it stands for: interface name expressions are
/// `ifname`, a raw payload `@base,offset,length` is an integer of `length` bits (`int:<bits>`),
/// `vlan id` a 16-bit one; addresses by their type.
fn typeof_field(expr: &str) -> Option<String> {
    let expr = expr.trim();
    if let Some(raw) = expr.strip_prefix('@') {
        let bits: u32 = raw.rsplit(',').next()?.trim().parse().ok()?;
        return (bits > 0 && bits.is_multiple_of(8) && bits <= 128).then(|| format!("int:{bits}"));
    }
    Some(
        match expr {
            "iifname" | "oifname" | "meta iifname" | "meta oifname" | "meta ibrname"
            | "meta obrname" => "ifname",
            "ip saddr" | "ip daddr" => "ipv4_addr",
            "ip6 saddr" | "ip6 daddr" => "ipv6_addr",
            "ether saddr" | "ether daddr" => "ether_addr",
            "meta priority" => "classid",
            // 12 bits, loaded as two bytes in network byte order.
            "vlan id" => "int:16",
            _ => return None,
        }
        .to_string(),
    )
}

/// A raw payload integer (`0x…` or decimal, as nft writes and lists it) as `bits / 8` bytes in
/// network byte order, the order a payload is loaded from the packet.
fn encode_integer(bits: &str, text: &str) -> Option<Vec<u8>> {
    let bytes: usize = bits.parse::<usize>().ok()? / 8;
    let text = text.trim();
    let value = match text.strip_prefix("0x") {
        Some(hex) => u128::from_str_radix(hex, 16).ok()?,
        None => text.parse::<u128>().ok()?,
    };
    let all = value.to_be_bytes();
    let (high, low) = all.split_at(16 - bytes);
    high.iter().all(|b| *b == 0).then(|| low.to_vec())
}

/// The key bytes of one element of a set keyed by `key_type` (`a . b . c` for a
/// concatenation, or `typeof` expressions); `None` when a field cannot be encoded here.
pub(super) fn encode_key(key_type: &str, element: &str) -> Option<Vec<u8>> {
    let types: Vec<String> = match key_type.trim().strip_prefix("typeof ") {
        Some(exprs) => exprs
            .split(" . ")
            .map(typeof_field)
            .collect::<Option<_>>()?,
        None => key_type
            .split(" . ")
            .map(|t| t.trim().to_string())
            .collect(),
    };
    let values: Vec<&str> = element.split(" . ").collect();
    if types.len() != values.len() {
        return None;
    }
    let concat = types.len() > 1;
    let mut key = Vec::new();
    for (t, v) in types.iter().zip(values) {
        let mut field = encode_field(t, v)?;
        if concat {
            field.resize(field.len().next_multiple_of(4), 0);
        }
        key.extend(field);
    }
    Some(key)
}

/// `NFTA_DATA_VALUE`: the attribute a key's end is nested in.
const NFTA_DATA_VALUE: u16 = 1;

/// The start and end of a concatenation's element whose fields may be ranges: an address
/// prefix (`10.0.0.0/8`, `0.0.0.0/0`), `a-b`, or one value (start and end alike); every field
/// padded to 4 bytes, as in [`encode_key`]. `None` for a single field or text it cannot parse.
pub(super) fn encode_range(key_type: &str, element: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let types: Vec<&str> = key_type.split(" . ").map(str::trim).collect();
    let values: Vec<&str> = element.split(" . ").collect();
    if types.len() < 2 || types.len() != values.len() {
        return None;
    }
    let (mut start, mut end) = (Vec::new(), Vec::new());
    for (t, v) in types.into_iter().zip(values) {
        let v = v.trim();
        let (mut a, mut b) = match (t, v.split_once('/'), v.split_once('-')) {
            ("ipv4_addr" | "ipv6_addr", Some(_), _) => {
                let net: ipnet::IpNet = v.parse().ok()?;
                let (lo, hi) = match net {
                    ipnet::IpNet::V4(n) => (
                        n.network().octets().to_vec(),
                        n.broadcast().octets().to_vec(),
                    ),
                    ipnet::IpNet::V6(n) => (
                        n.network().octets().to_vec(),
                        n.broadcast().octets().to_vec(),
                    ),
                };
                if (t == "ipv4_addr") != (lo.len() == 4) {
                    return None;
                }
                (lo, hi)
            }
            (_, _, Some((lo, hi))) if t != "ifname" && t != "ether_addr" => {
                (encode_field(t, lo)?, encode_field(t, hi)?)
            }
            _ => {
                let one = encode_field(t, v)?;
                (one.clone(), one)
            }
        };
        a.resize(a.len().next_multiple_of(4), 0);
        b.resize(b.len().next_multiple_of(4), 0);
        start.extend(a);
        end.extend(b);
    }
    Some((start, end))
}

fn serialize(mut msg: NetlinkMessage<NetfilterMessage>, flags: u16, seq: u32, out: &mut Vec<u8>) {
    msg.header.flags = NLM_F_REQUEST | flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let start = out.len();
    out.resize(start + msg.buffer_len(), 0);
    msg.serialize(&mut out[start..]);
}

fn control(message: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
    let subsys = u16::from(u8::from(NetfilterSubsystem::NfTables));
    NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, subsys),
        message,
    ))
}

/// One element change of a set or map: each element as (key text, value text of a map's add).
struct ElementChange<'a> {
    add: bool,
    family: &'a Family,
    table: &'a String,
    set: &'a String,
    key: &'a super::SetKey,
    value_type: Option<&'a str>,
    elements: Vec<(&'a str, Option<&'a str>)>,
}

/// `change` as an element change; `None` for any other change.
fn element_change(change: &Change) -> Option<ElementChange<'_>> {
    Some(match change {
        Change::AddElements {
            family,
            table,
            set,
            key,
            elements,
        } => ElementChange {
            add: true,
            family,
            table,
            set,
            key,
            value_type: None,
            elements: elements.iter().map(|e| (e.as_str(), None)).collect(),
        },
        Change::DeleteElements {
            family,
            table,
            set,
            key,
            elements,
        } => ElementChange {
            add: false,
            family,
            table,
            set,
            key,
            value_type: None,
            elements: elements.iter().map(|e| (e.as_str(), None)).collect(),
        },
        Change::AddMapElements {
            family,
            table,
            map,
            key,
            value_type,
            elements,
        } => ElementChange {
            add: true,
            family,
            table,
            set: map,
            key,
            value_type: Some(value_type.as_str()),
            elements: elements
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_str())))
                .collect(),
        },
        Change::DeleteMapElements {
            family,
            table,
            map,
            key,
            keys,
        } => ElementChange {
            add: false,
            family,
            table,
            set: map,
            key,
            value_type: None,
            elements: keys.iter().map(|k| (k.as_str(), None)).collect(),
        },
        _ => return None,
    })
}

/// The whole transaction as one nfnetlink batch, or `None` when some change of it is not a
/// plain set element change this module encodes (see the module doc). Sequence numbers start
/// at `seq`.
pub(super) fn element_batch(tx: &Transaction, seq: u32) -> Option<ElementBatch> {
    let mut bytes = Vec::new();
    let mut messages = Vec::new();
    let mut encoded: Vec<(NetlinkMessage<NetfilterMessage>, u16)> = Vec::new();
    serialize(control(ControlMessage::BatchBegin), 0, seq, &mut bytes);
    let mut next = seq;
    let mut element_bytes = 0;
    for change in &tx.0 {
        let ElementChange {
            add,
            family,
            table,
            set,
            key,
            value_type,
            elements,
        } = element_change(change)?;
        // An interval set of one field keeps each range as two elements (its end flagged);
        // a concatenation keeps one with the range's start and end (nft's `pipapo` set).
        let ranged = key.interval;
        if ranged && !key.key_type.contains(" . ") {
            return None;
        }
        if elements.is_empty() {
            continue;
        }
        // The elements in messages of at most MAX_MESSAGE_BYTES each.
        let mut chunks = vec![Vec::new()];
        let mut chunk_bytes = 0;
        for (e, value) in elements {
            let mut attributes = Vec::new();
            let mut size = ELEMENT_OVERHEAD;
            if ranged {
                let (start, end) = encode_range(&key.key_type, e)?;
                size += start.len().next_multiple_of(4) + ELEMENT_OVERHEAD + end.len();
                attributes.push(SetElementAttribute::Key(DataAttribute::Value(start)));
                attributes.push(SetElementAttribute::KeyEnd(vec![DefaultNla::new(
                    NFTA_DATA_VALUE,
                    end,
                )]));
            } else {
                let k = encode_key(&key.key_type, e)?;
                size += k.len().next_multiple_of(4);
                attributes.push(SetElementAttribute::Key(DataAttribute::Value(k)));
            }
            if let Some(v) = value {
                let data = encode_key(value_type?, v)?;
                size += ELEMENT_OVERHEAD + data.len().next_multiple_of(4);
                attributes.push(SetElementAttribute::Data(DataAttribute::Value(data)));
            }
            element_bytes += size;
            if element_bytes > MAX_BATCH_BYTES {
                return None;
            }
            if chunk_bytes + size > MAX_MESSAGE_BYTES {
                chunks.push(Vec::new());
                chunk_bytes = 0;
            }
            chunk_bytes += size;
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(ListAttribute::Element(attributes));
            }
        }
        for list in chunks {
            let body = SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.clone()),
                    SetElementList::Set(set.clone()),
                    SetElementList::Elements(list),
                ],
            };
            let inner = if add {
                NfTablesMessage::NewSetElement(body)
            } else {
                NfTablesMessage::DeleteSetElement(body)
            };
            let msg = NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(proto_family(*family), 0, 0),
                inner,
            ));
            next = next.wrapping_add(1);
            // NLM_F_CREATE without NLM_F_EXCL: adding an element that exists is not an error,
            // as with nft's `add element`.
            encoded.push((msg, if add { NLM_F_CREATE } else { 0 }));
            messages.push((next, change.summary()));
        }
    }
    // Only the last is acknowledged (see `ElementBatch::last`): one answer to receive, not
    // one per message.
    let count = encoded.len();
    for (i, ((msg, flags), (seq, _))) in encoded.into_iter().zip(&messages).enumerate() {
        let ack = if i + 1 == count { NLM_F_ACK } else { 0 };
        serialize(msg, flags | ack, *seq, &mut bytes);
    }
    serialize(
        control(ControlMessage::BatchEnd),
        0,
        next.wrapping_add(1),
        &mut bytes,
    );
    Some(ElementBatch {
        bytes,
        last: next,
        messages,
        begin: seq,
    })
}

/// A netfilter netlink socket in the calling thread's network namespace.
pub(super) struct NfTablesSocket {
    socket: Socket,
    rx: RxBuffer,
}

fn io_error(source: io::Error) -> NftError {
    NftError::Netlink { source }
}

impl NfTablesSocket {
    /// Opens the socket.
    pub(super) fn open() -> Result<NfTablesSocket, NftError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io_error)?;
        socket.bind_auto().map_err(io_error)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io_error)?;
        let _ = socket.set_cap_ack(true);
        Ok(NfTablesSocket {
            socket,
            rx: RxBuffer::default(),
        })
    }

    /// Receives one datagram (see [`RxBuffer`]); one larger than the buffer is an error (the
    /// kernel's acknowledgements and a set's or table's description are far smaller).
    fn receive(&mut self) -> Result<&[u8], NftError> {
        self.rx
            .receive(&self.socket)
            .and_then(Received::whole)
            .map_err(io_error)?;
        Ok(self.rx.data())
    }

    /// Sends the batch and waits for the kernel's answer to its last element message, after
    /// any error of the messages before it. The kernel processes a batch synchronously within
    /// the send, so every answer is queued by the time `send` returns.
    pub(super) fn apply(&mut self, batch: &ElementBatch) -> Result<(), NftError> {
        if batch.messages.is_empty() {
            return Ok(());
        }
        loop {
            match self.socket.send(&batch.bytes, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            }
        }
        let mut waiting = true;
        while waiting {
            let data = self.receive()?;
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let header = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| io_error(io::Error::other(e.to_string())))?;
                let len = header.length() as usize;
                let seq = header.sequence_number();
                if len == 0 {
                    break;
                }
                offset += len.next_multiple_of(4);
                let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
                    continue;
                };
                let NetlinkPayload::Error(err) = msg.payload else {
                    continue;
                };
                if let Some(code) = err.code {
                    let what = if seq == batch.begin {
                        "the batch".to_string()
                    } else {
                        batch
                            .messages
                            .iter()
                            .find(|(s, _)| *s == seq)
                            .map(|(_, what)| what.clone())
                            .unwrap_or_else(|| format!("message {seq}"))
                    };
                    return Err(NftError::Kernel {
                        what,
                        source: io::Error::from_raw_os_error(code.get().abs()),
                    });
                }
                if seq == batch.last {
                    waiting = false;
                }
            }
        }
        Ok(())
    }
}

/// The `NFT_MSG_GETTABLE` request for one table.
fn get_table(family: Family, name: &str, seq: u32) -> Vec<u8> {
    let msg = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(proto_family(family), 0, 0),
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(name.to_string())],
        }),
    ));
    let mut bytes = Vec::new();
    serialize(msg, NLM_F_ACK, seq, &mut bytes);
    bytes
}

/// The comment nft keeps in a table's user data: the `NFTNL_UDATA_TABLE_COMMENT` (type 0)
/// entry of its type-length-value list, a NUL-terminated string.
fn comment_from_userdata(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while let [kind, len, tail @ ..] = rest {
        let len = usize::from(*len);
        let value = tail.get(..len)?;
        if *kind == 0 {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return String::from_utf8(text.to_vec()).ok();
        }
        rest = &tail[len..];
    }
    None
}

/// The `NFT_MSG_GETSET` request for one set (the kernel answers with its definition, not its
/// elements).
fn get_set(family: Family, table: &str, name: &str, seq: u32) -> Vec<u8> {
    let msg = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(proto_family(family), 0, 0),
        NfTablesMessage::GetSet(SetMessage {
            attributes: vec![
                SetAttribute::Table(table.to_string()),
                SetAttribute::Name(name.to_string()),
            ],
        }),
    ));
    let mut bytes = Vec::new();
    serialize(msg, NLM_F_ACK, seq, &mut bytes);
    bytes
}

impl NfTablesSocket {
    /// A table's comment, read with `NFT_MSG_GETTABLE` (its sets and elements are not read):
    /// `Ok(None)` when the table does not exist, `Ok(Some(None))` when it has no comment.
    pub(super) fn table_comment(
        &mut self,
        family: Family,
        name: &str,
    ) -> Result<Option<Option<String>>, NftError> {
        let reply = self.ask(
            &get_table(family, name, SEQ),
            &format!("table {family} {name}"),
        )?;
        Ok(reply.map(|reply| match reply {
            NfTablesMessage::NewTable(table) => table.attributes.iter().find_map(|a| match a {
                TableAttribute::UserData(d) => comment_from_userdata(d),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Whether a set exists, read with `NFT_MSG_GETSET` (its elements are not read); `false`
    /// when its table does not exist either.
    pub(super) fn set_exists(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
    ) -> Result<bool, NftError> {
        let reply = self.ask(
            &get_set(family, table, name, SEQ),
            &format!("set {family} {table} {name}"),
        )?;
        Ok(matches!(reply, Some(NfTablesMessage::NewSet(_))))
    }

    /// Sends one request (sequence number [`SEQ`]) and returns the object the kernel answered
    /// with before its acknowledgement: `Ok(None)` when the kernel says there is no such
    /// object (`ENOENT`).
    fn ask(&mut self, request: &[u8], what: &str) -> Result<Option<NfTablesMessage>, NftError> {
        loop {
            match self.socket.send(request, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            }
        }
        let mut found: Option<NfTablesMessage> = None;
        loop {
            let data = self.receive()?;
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let header = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| io_error(io::Error::other(e.to_string())))?;
                let len = header.length() as usize;
                if len == 0 {
                    break;
                }
                offset += len.next_multiple_of(4);
                if header.sequence_number() != SEQ {
                    continue;
                }
                let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
                    continue;
                };
                match msg.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code.map(|c| c.get().abs()) {
                            // The acknowledgement, after the object.
                            None => Ok(found),
                            Some(ENOENT) => Ok(None),
                            Some(code) => Err(NftError::Kernel {
                                what: format!("reading {what}"),
                                source: io::Error::from_raw_os_error(code),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: netlink_packet_netfilter::NetfilterMessageInner::NfTables(reply),
                        ..
                    }) => found = Some(reply),
                    _ => {}
                }
            }
        }
    }
}

/// The sequence number of a single request ([`NfTablesSocket::ask`]).
const SEQ: u32 = 1;

/// `ENOENT`: no such table.
const ENOENT: i32 = 2;

#[cfg(test)]
mod tests {
    use super::super::SetKey;
    use super::*;

    #[test]
    fn asks_for_one_table_by_name_and_reads_nfts_comment_from_its_user_data() {
        let bytes = get_table(Family::Inet, "weft", 7);
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).unwrap();
        assert_eq!(msg.header.sequence_number, 7);
        assert_eq!(msg.header.flags, NLM_F_REQUEST | NLM_F_ACK, "no dump");
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner:
                netlink_packet_netfilter::NetfilterMessageInner::NfTables(NfTablesMessage::GetTable(t)),
            ..
        }) = msg.payload
        else {
            panic!("not a GETTABLE: {:?}", msg.payload);
        };
        assert_eq!(t.attributes, [TableAttribute::Name("weft".into())]);
        // nftables' user data: type 0 (comment), length, NUL-terminated text; other entries
        // before it are skipped.
        let mut data = vec![5, 2, 0xaa, 0xbb, 0, 4];
        data.extend_from_slice(b"abc\0");
        assert_eq!(comment_from_userdata(&data).as_deref(), Some("abc"));
        assert_eq!(comment_from_userdata(&[5, 2, 0xaa, 0xbb]), None);
        assert_eq!(comment_from_userdata(&[0, 9, b'x']), None, "truncated");
    }

    #[test]
    fn encodes_keys_the_way_nft_does() {
        let wf = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.resize(16, 0);
            v
        };
        assert_eq!(encode_key("ifname", "\"wf1\""), Some(wf("wf1")));
        assert_eq!(encode_key("ipv4_addr", "10.0.0.1"), Some(vec![10, 0, 0, 1]));
        assert_eq!(
            encode_key("ipv6_addr", "fd00::1").map(|k| k.len()),
            Some(16)
        );
        assert_eq!(
            encode_key("ether_addr", "0a:58:0a:4d:00:02"),
            Some(vec![0x0a, 0x58, 0x0a, 0x4d, 0, 2])
        );
        // Concatenations pad every field to 4 bytes.
        let mut mac = wf("wf1");
        mac.extend([0x0a, 0x58, 0x0a, 0x4d, 0, 2, 0, 0]);
        assert_eq!(
            encode_key("ifname . ether_addr", "\"wf1\" . 0a:58:0a:4d:00:02"),
            Some(mac)
        );
        assert_eq!(
            encode_key(
                "ipv4_addr . inet_proto . inet_service",
                "10.0.0.1 . tcp . 8080"
            ),
            Some(vec![10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0])
        );
        // A packet priority: host byte order, as the kernel holds it.
        assert_eq!(
            encode_key("classid", "1a2b:3c4d"),
            Some(0x1a2b_3c4d_u32.to_ne_bytes().to_vec())
        );
        assert_eq!(
            encode_key("typeof meta priority", "0:5"),
            Some(5_u32.to_ne_bytes().to_vec())
        );
        assert_eq!(
            encode_key("classid", "1:10000"),
            None,
            "a minor past 16 bits"
        );
        assert_eq!(encode_key("classid", "root"), None, "left to nft");
        // A dotted interface name is one field.
        let mut vlan = wf("eth1.10");
        vlan.extend([10, 0, 0, 1]);
        assert_eq!(
            encode_key("ifname . ipv4_addr", "\"eth1.10\" . 10.0.0.1"),
            Some(vlan)
        );
    }

    #[test]
    fn encodes_ranges_of_concatenations_as_start_and_end() {
        let key = "ipv4_addr . inet_proto . inet_service";
        assert_eq!(
            encode_range(key, "0.0.0.0/0 . tcp . 8080"),
            Some((
                vec![0, 0, 0, 0, 6, 0, 0, 0, 0x1f, 0x90, 0, 0],
                vec![255, 255, 255, 255, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]
            ))
        );
        assert_eq!(
            encode_range(key, "10.1.2.3 . udp . 53-54"),
            Some((
                vec![10, 1, 2, 3, 17, 0, 0, 0, 0, 53, 0, 0],
                vec![10, 1, 2, 3, 17, 0, 0, 0, 0, 54, 0, 0]
            ))
        );
        let (start, end) = encode_range(
            "ipv6_addr . inet_proto . inet_service",
            "fd00::/64 . tcp . 1",
        )
        .unwrap();
        assert_eq!((start.len(), end.len()), (24, 24));
        assert_eq!(&end[8..16], &[0xff; 8]);
        // One field: an interval set keeps a range as two elements; not encoded here.
        assert_eq!(encode_range("ipv4_addr", "10.0.0.0/8"), None);
        // A v6 prefix where a v4 address goes.
        assert_eq!(encode_range(key, "::/0 . tcp . 1"), None);
    }

    #[test]
    fn encodes_typeof_keys_of_raw_payloads() {
        let mut target = b"wfa".to_vec();
        target.resize(16, 0);
        let mut addr = vec![0xfd, 0x77];
        addr.resize(15, 0);
        addr.push(2);
        target.extend(&addr);
        let key = "typeof iifname . @th,64,128";
        assert_eq!(
            encode_key(key, "\"wfa\" . 0xfd770000000000000000000000000002"),
            Some(target.clone())
        );
        // The kernel's listing: no leading zeros, or decimal.
        let decimal = u128::from_be_bytes(addr.try_into().unwrap()).to_string();
        assert_eq!(
            encode_key(key, &format!("\"wfa\" . {decimal}")),
            Some(target)
        );
        let mut mac = b"wfa".to_vec();
        mac.resize(16, 0);
        mac.extend([0x0a, 0x58, 0x0a, 0x4d, 0, 2, 0, 0]);
        assert_eq!(
            encode_key("typeof iifname . @th,208,48", "\"wfa\" . 0x0a580a4d0002"),
            Some(mac)
        );
        assert_eq!(
            encode_key("typeof iifname . @th,208,48", "\"wfa\" . 0x010a580a4d0002"),
            None,
            "a value wider than the payload"
        );
        assert_eq!(encode_key("typeof meta mark", "1"), None);
    }

    #[test]
    fn leaves_what_it_does_not_encode_to_nft() {
        assert_eq!(encode_key("ipv4_addr", "10.0.0.0/8"), None);
        assert_eq!(encode_key("ifname", "\"wf*\""), None);
        assert_eq!(encode_key("ifname", "\"sixteen-chars-xx\""), None);
        assert_eq!(encode_key("mark", "1"), None);
        assert_eq!(encode_key("ifname . ipv4_addr", "\"wf1\""), None);
        assert_eq!(encode_key("ether_addr", "0a:58:0a:4d:00"), None);
        let change = |key_type: &str, interval: bool, element: &str| Change::AddElements {
            family: Family::Inet,
            table: "weft".into(),
            set: "s".into(),
            key: SetKey {
                key_type: key_type.into(),
                interval,
            },
            elements: vec![element.into()],
        };
        let tx = |c: Change| Transaction(vec![c]);
        assert!(element_batch(&tx(change("ipv4_addr", false, "10.0.0.1")), 1).is_some());
        assert!(element_batch(&tx(change("ipv4_addr", true, "10.0.0.1")), 1).is_none());
        assert!(element_batch(&tx(change("ipv4_addr", false, "nonsense")), 1).is_none());
        assert!(
            element_batch(
                &tx(Change::DeleteTable {
                    family: Family::Inet,
                    name: "weft".into()
                }),
                1
            )
            .is_none()
        );
        let addresses = |n: u32| Change::AddElements {
            family: Family::Inet,
            table: "weft".into(),
            set: "s".into(),
            key: SetKey {
                key_type: "ipv4_addr".into(),
                interval: false,
            },
            elements: (0..n)
                .map(|i| Ipv4Addr::from(0x0a00_0000u32 + i).to_string())
                .collect(),
        };
        assert!(
            element_batch(&tx(addresses(12_000)), 1).is_none(),
            "a huge batch goes to nft"
        );
        assert_eq!(
            element_batch(&tx(addresses(6_000)), 1).map(|b| b.len()),
            Some(2),
            "6,000 addresses fit, in two messages"
        );
    }

    #[test]
    fn one_message_per_set_between_begin_and_end() {
        let key = SetKey {
            key_type: "ifname".into(),
            interval: false,
        };
        let tx = Transaction(vec![
            Change::DeleteElements {
                family: Family::Bridge,
                table: "weft".into(),
                set: "ports".into(),
                key: key.clone(),
                elements: vec!["\"wfa\"".into()],
            },
            Change::AddElements {
                family: Family::Bridge,
                table: "weft".into(),
                set: "ports".into(),
                key: key.clone(),
                elements: vec!["\"wfb\"".into(), "\"wfc\"".into()],
            },
            Change::AddElements {
                family: Family::Bridge,
                table: "weft".into(),
                set: "open".into(),
                key,
                elements: vec![],
            },
        ]);
        let batch = element_batch(&tx, 7).unwrap();
        assert_eq!(batch.len(), 2, "empty changes send nothing");
        let mut offset = 0;
        let mut types = Vec::new();
        while offset < batch.bytes.len() {
            let msg = NetlinkBuffer::new_checked(&batch.bytes[offset..]).unwrap();
            types.push((msg.message_type(), msg.sequence_number()));
            offset += (msg.length() as usize).next_multiple_of(4);
        }
        // BATCH_BEGIN (16), DELSETELEM (10 << 8 | 14), NEWSETELEM (10 << 8 | 12), BATCH_END.
        assert_eq!(
            types,
            [(16, 7), ((10 << 8) | 14, 8), ((10 << 8) | 12, 9), (17, 10)]
        );
    }
}

//! Address and CIDR fields.
//!
//! They are strings on the wire and in the schema (`type: string` plus CEL rules such as
//! `isCIDR(self)`), never `ipnet::IpNet`: schemars renders `IpNet` as `oneOf` without a `type`,
//! which is not a structural schema, so the apiserver would reject the CRD. The newtypes keep
//! the text the user wrote, so that [`NetworkSpec::validate`](crate::NetworkSpec::validate)
//! can report a bad value with its field path; parse them with [`Cidr::net`], [`IpAddress::addr`]
//! and [`IpOrCidr::net`].
//!
//! Parsing follows the apiserver's CEL `isIP`/`isCIDR` (Go `netip`): no zones, no leading zeros
//! in IPv4 octets or in the prefix length, and no IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`).

use crate::cel::{self, CelRule};
use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::ops::Deref;

/// Longest textual IP address: `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
pub const MAX_IP_LEN: u32 = 45;
/// Longest textual CIDR: the longest address plus `/128`.
pub const MAX_CIDR_LEN: u32 = 49;

/// Why an address or CIDR string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// Not `address/prefix-length`.
    NotCidr {
        /// The text.
        text: String,
    },
    /// Not an IPv4 or IPv6 address.
    NotIp {
        /// The text.
        text: String,
    },
    /// Neither an address nor a CIDR.
    NotIpOrCidr {
        /// The text.
        text: String,
    },
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), which Kubernetes refuses.
    Ipv4Mapped {
        /// The text.
        text: String,
    },
    /// A CIDR whose host bits are not zero.
    NotCanonical {
        /// The text.
        text: String,
        /// The canonical form (host bits cleared).
        canonical: IpNet,
    },
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::NotCidr { text } => write!(
                f,
                "{text:?} is not a CIDR; write address/prefix-length, e.g. 10.10.0.0/16 or fd10::/64"
            ),
            AddressError::NotIp { text } => write!(
                f,
                "{text:?} is not an IP address; write e.g. 10.10.0.1 or fd10::1"
            ),
            AddressError::NotIpOrCidr { text } => write!(
                f,
                "{text:?} is neither an IP address nor a CIDR; write e.g. 10.10.0.5 or 10.10.0.0/28"
            ),
            AddressError::Ipv4Mapped { text } => write!(
                f,
                "{text:?} is an IPv4-mapped IPv6 address, which Kubernetes does not accept; write the IPv4 form"
            ),
            AddressError::NotCanonical { text, canonical } => write!(
                f,
                "{text:?} has host bits set; write the network address: {canonical}"
            ),
        }
    }
}

impl std::error::Error for AddressError {}

fn is_ipv4_mapped(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// Parses an IP address the way the apiserver's `isIP` does.
pub fn parse_ip(text: &str) -> Result<IpAddr, AddressError> {
    let addr: IpAddr = text.parse().map_err(|_| AddressError::NotIp {
        text: text.to_owned(),
    })?;
    if is_ipv4_mapped(&addr) {
        return Err(AddressError::Ipv4Mapped {
            text: text.to_owned(),
        });
    }
    Ok(addr)
}

/// Parses a CIDR the way the apiserver's `isCIDR` does, without the canonical-form check.
pub fn parse_cidr_lenient(text: &str) -> Result<IpNet, AddressError> {
    let not_cidr = || AddressError::NotCidr {
        text: text.to_owned(),
    };
    let (addr, prefix) = text.split_once('/').ok_or_else(not_cidr)?;
    // Decimal digits only and no leading zero, as Go's netip.ParsePrefix requires.
    if prefix.is_empty()
        || !prefix.bytes().all(|b| b.is_ascii_digit())
        || (prefix.len() > 1 && prefix.starts_with('0'))
    {
        return Err(not_cidr());
    }
    let prefix: u8 = prefix.parse().map_err(|_| not_cidr())?;
    let addr: IpAddr = addr.parse().map_err(|_| not_cidr())?;
    if is_ipv4_mapped(&addr) {
        return Err(AddressError::Ipv4Mapped {
            text: text.to_owned(),
        });
    }
    IpNet::new(addr, prefix).map_err(|_| not_cidr())
}

/// Parses a CIDR in canonical form (host bits zero), as weft requires everywhere.
pub fn parse_cidr(text: &str) -> Result<IpNet, AddressError> {
    let net = parse_cidr_lenient(text)?;
    if net.addr() != net.network() {
        return Err(AddressError::NotCanonical {
            text: text.to_owned(),
            canonical: net.trunc(),
        });
    }
    Ok(net)
}

/// Parses an IP address (a `/32` or `/128` network) or a canonical CIDR.
pub fn parse_ip_or_cidr(text: &str) -> Result<IpNet, AddressError> {
    if text.contains('/') {
        match parse_cidr(text) {
            Err(AddressError::NotCidr { .. }) => Err(AddressError::NotIpOrCidr {
                text: text.to_owned(),
            }),
            other => other,
        }
    } else {
        match parse_ip(text) {
            Ok(addr) => Ok(IpNet::from(addr)),
            Err(AddressError::NotIp { .. }) => Err(AddressError::NotIpOrCidr {
                text: text.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }
}

fn string_schema(max_length: u32, rules: &[&CelRule]) -> Schema {
    let rules: Vec<serde_json::Value> = rules.iter().map(|r| r.to_json()).collect();
    json_schema!({
        "type": "string",
        "maxLength": max_length,
        "x-kubernetes-validations": rules,
    })
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The text as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_newtype! {
    /// A CIDR in canonical form, e.g. `10.10.0.0/16` or `fd10::/64`.
    ///
    /// Schema: `type: string` with the CEL rules [`cel::CIDR_VALID`] and [`cel::CIDR_CANONICAL`].
    Cidr
}

string_newtype! {
    /// An IPv4 or IPv6 address, e.g. `10.10.0.1` or `fd10::1`.
    ///
    /// Schema: `type: string` with the CEL rule [`cel::IP_VALID`].
    IpAddress
}

string_newtype! {
    /// An IP address or a CIDR in canonical form, e.g. `10.10.0.5` or `10.10.0.0/28`.
    ///
    /// Schema: `type: string` with the CEL rules [`cel::IP_OR_CIDR_VALID`] and
    /// [`cel::IP_OR_CIDR_CANONICAL`].
    IpOrCidr
}

impl Cidr {
    /// The network; an error names what is wrong with the text.
    pub fn net(&self) -> Result<IpNet, AddressError> {
        parse_cidr(&self.0)
    }
}

impl IpAddress {
    /// The address; an error names what is wrong with the text.
    pub fn addr(&self) -> Result<IpAddr, AddressError> {
        parse_ip(&self.0)
    }
}

impl IpOrCidr {
    /// The network (a single address becomes a `/32` or `/128`).
    pub fn net(&self) -> Result<IpNet, AddressError> {
        parse_ip_or_cidr(&self.0)
    }
}

impl JsonSchema for Cidr {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string_schema(MAX_CIDR_LEN, &[&cel::CIDR_VALID, &cel::CIDR_CANONICAL])
    }
}

impl JsonSchema for IpAddress {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "IpAddress".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string_schema(MAX_IP_LEN, &[&cel::IP_VALID])
    }
}

impl JsonSchema for IpOrCidr {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "IpOrCidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        string_schema(
            MAX_CIDR_LEN,
            &[&cel::IP_OR_CIDR_VALID, &cel::IP_OR_CIDR_CANONICAL],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_in_canonical_form() {
        assert_eq!(
            parse_cidr("10.10.0.0/16").unwrap().to_string(),
            "10.10.0.0/16"
        );
        assert_eq!(
            parse_cidr("fd10:10::/64").unwrap().to_string(),
            "fd10:10::/64"
        );
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().prefix_len(), 0);
        assert_eq!(parse_cidr("192.168.1.7/32").unwrap().prefix_len(), 32);
    }

    #[test]
    fn cidr_with_host_bits_names_the_canonical_form() {
        let err = parse_cidr("10.10.0.1/16").unwrap_err();
        assert!(matches!(err, AddressError::NotCanonical { .. }));
        assert!(err.to_string().contains("10.10.0.0/16"), "{err}");
        assert!(parse_cidr_lenient("10.10.0.1/16").is_ok());
    }

    #[test]
    fn malformed_cidrs_are_rejected() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/08",
            "10.0.0.0/+8",
            "010.0.0.0/8",
            "10.0.0.0/8/8",
            "fe80::%eth0/64",
            "::ffff:10.0.0.0/104",
            "x/8",
            " 10.0.0.0/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ips_parse_like_the_apiserver() {
        assert!(parse_ip("10.0.0.1").is_ok());
        assert!(parse_ip("fd10::1").is_ok());
        assert!(parse_ip("::1.2.3.4").is_ok());
        for bad in [
            "",
            "10.0.0.01",
            "10.0.0.1/32",
            "fe80::1%eth0",
            "::ffff:10.0.0.1",
            "1.2.3",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            parse_ip("::ffff:10.0.0.1"),
            Err(AddressError::Ipv4Mapped { .. })
        ));
    }

    #[test]
    fn ip_or_cidr_turns_an_address_into_a_host_network() {
        assert_eq!(
            parse_ip_or_cidr("10.0.0.5").unwrap().to_string(),
            "10.0.0.5/32"
        );
        assert_eq!(
            parse_ip_or_cidr("fd10::5").unwrap().to_string(),
            "fd10::5/128"
        );
        assert_eq!(
            parse_ip_or_cidr("10.0.0.0/28").unwrap().to_string(),
            "10.0.0.0/28"
        );
        assert!(matches!(
            parse_ip_or_cidr("10.0.0.5/28"),
            Err(AddressError::NotCanonical { .. })
        ));
        assert!(matches!(
            parse_ip_or_cidr("nope"),
            Err(AddressError::NotIpOrCidr { .. })
        ));
        assert!(matches!(
            parse_ip_or_cidr("10.0.0.0/40"),
            Err(AddressError::NotIpOrCidr { .. })
        ));
    }

    #[test]
    fn newtypes_deref_to_their_text() {
        let c = Cidr::from("10.0.0.0/8");
        let net: IpNet = c.parse().unwrap();
        assert_eq!(net.prefix_len(), 8);
        assert_eq!(c, "10.0.0.0/8");
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"10.0.0.0/8\"");
    }

    #[test]
    fn schemas_are_plain_strings_with_cel_rules() {
        let mut generator = SchemaGenerator::default();
        let schema = serde_json::to_value(Cidr::json_schema(&mut generator)).unwrap();
        assert_eq!(schema["type"], "string");
        assert_eq!(schema["maxLength"], MAX_CIDR_LEN);
        assert_eq!(
            schema["x-kubernetes-validations"][0]["rule"],
            cel::CIDR_VALID.rule
        );
    }
}

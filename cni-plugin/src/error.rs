//! The one error type of the CNI binary, with the CNI spec's codes.
//!
//! Codes (CNI spec 1.1): 1 incompatible version · 2 unsupported field · 3 container unknown ·
//! 4 invalid environment variables · 5 I/O · 6 decode · 7 invalid config · 11 try again later ·
//! 50 plugin not available (STATUS). weft's own codes start at 100 and are listed in
//! `cni-plugin/README.md`.

use serde::Serialize;

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Unsupported field in the network configuration.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// Container unknown or does not exist.
pub const CONTAINER_UNKNOWN: u32 = 3;
/// Invalid necessary environment variables.
pub const INVALID_ENV: u32 = 4;
/// I/O failure.
pub const IO_FAILURE: u32 = 5;
/// Failed to decode content.
pub const DECODE: u32 = 6;
/// Invalid network config.
pub const INVALID_CONFIG: u32 = 7;
/// Try again later.
pub const TRY_AGAIN_LATER: u32 = 11;
/// The plugin is not available (STATUS).
pub const NOT_AVAILABLE: u32 = 50;
/// weft: internal error (a bug; includes panics).
pub const INTERNAL: u32 = 100;
/// weft: a netlink operation failed.
pub const LINK_FAILED: u32 = 102;
/// weft: a network namespace could not be opened or entered.
pub const NETNS_FAILED: u32 = 103;
/// weft: the node's address block of the network is exhausted.
pub const POOL_EXHAUSTED: u32 = 104;
/// weft: the agent refused the endpoint.
pub const AGENT_REFUSED: u32 = 105;
/// weft: CHECK found the attachment differs from what ADD created.
pub const CHECK_MISMATCH: u32 = 106;
/// weft: the interface name is already used inside the container.
pub const IFNAME_TAKEN: u32 = 107;

/// A CNI error: printed as the spec's JSON error object on stdout, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg} ({details})")]
pub struct CniError {
    /// The CNI error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details: the field involved and how to fix it.
    pub details: String,
}

impl CniError {
    /// A new error.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Builds an error from any error chain: the message is `msg`, the details are the chain.
    pub fn from_chain(code: u32, msg: impl Into<String>, err: &dyn std::error::Error) -> Self {
        CniError::new(code, msg, chain(err))
    }
}

pub use weft_dataplane::error_chain as chain;

impl From<weft_dataplane::ipam::IpamError> for CniError {
    fn from(e: weft_dataplane::ipam::IpamError) -> Self {
        CniError::from_chain(e.cni_code(), e.summary(), &e)
    }
}

impl From<weft_dataplane::netlink::NetlinkError> for CniError {
    fn from(e: weft_dataplane::netlink::NetlinkError) -> Self {
        CniError::from_chain(LINK_FAILED, "netlink operation failed", &e)
    }
}

impl From<weft_dataplane::netns::NetnsError> for CniError {
    fn from(e: weft_dataplane::netns::NetnsError) -> Self {
        CniError::from_chain(NETNS_FAILED, "network namespace operation failed", &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(7, "invalid config", "field network: missing");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "invalid config");
        assert_eq!(v["details"], "field network: missing");
    }
}

//! The one error type of the CNI binary, with the CNI spec's codes
//! ([`weft_dataplane::codes`]).

use serde::Serialize;

pub use weft_dataplane::codes::*;

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

//! The CNI error codes weft answers with, shared by the plugin (which prints them) and the
//! agent (which tells the plugin which one an attach failed with).
//!
//! Codes (CNI spec 1.1): 1 incompatible version · 2 unsupported field · 3 container unknown ·
//! 4 invalid environment variables · 5 I/O · 6 decode · 7 invalid config · 11 try again later ·
//! 50 plugin not available (STATUS). weft's own codes start at 100 and are listed in
//! `cni-plugin/README.md`.

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

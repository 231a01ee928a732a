//! Privileged test of the audit reader's socket in a real kernel: bound to the NFLOG group, it
//! has room for a burst of logged packets (asked for with SO_RCVBUFFORCE, the agent runs as
//! root), not the default `net.core.rmem_default`.
//!
//! The test makes its own network namespace (named with the pid, tests run in parallel) and
//! always deletes it. Needs root; fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use weft_dataplane::netns;
use weft_operator::agent::audit;

#[path = "common/named_netns.rs"]
mod named_netns;

#[test]
fn the_audit_socket_gets_its_large_receive_buffer() {
    let node = named_netns::create("waudit-", "");
    let size = netns::run_in(&node.ns, || audit::bind().unwrap().get_rx_buf_sz().unwrap()).unwrap();
    // The kernel doubles what it was asked for.
    assert!(size >= audit::RECEIVE_BUFFER, "{size}");
}

//! weft's node dataplane, shared by the node agent, the `weft` CNI binary and the lab.
//!
//! Everything here talks to the kernel of one node (netlink, network namespaces, nftables,
//! sysctls) or to weft's on-node state (the IPAM store, the runtime state files), and nothing
//! here knows about Kubernetes.

pub mod attachment;
pub mod codes;
pub mod frame;
pub mod ipam;
pub mod links;
pub mod mirror;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod proto;
pub mod state;
pub mod sysctl;
pub mod tap;
pub mod uplink;
pub mod vlan;

/// Renders an error and its sources as `a: b: c` (messages never repeat their source, so the
/// chain reads once).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

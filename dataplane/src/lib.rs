//! weft's node dataplane, shared by the node agent, the `weft` CNI binary and the lab.
//!
//! Everything here talks to the kernel of one node (netlink, network namespaces, nftables,
//! sysctls) or to weft's on-node state (the IPAM store, the runtime state files), and nothing
//! here knows about Kubernetes.

pub mod ipam;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod proto;
pub mod state;
pub mod sysctl;
pub mod tap;

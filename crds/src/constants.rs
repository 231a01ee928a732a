//! Names and fixed values of weft's API.

/// The API group of every weft resource.
pub const GROUP: &str = "weft.dev";
/// The API version of the types in this crate.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the types in this crate (`weft.dev/v1alpha1`).
pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// Kind of [`crate::Network`].
pub const NETWORK_KIND: &str = "Network";
/// Kind of [`crate::PortForward`].
pub const PORT_FORWARD_KIND: &str = "PortForward";

/// The finalizer the controller keeps on a Network until no agent realizes it any more (and the
/// uninstall hook takes off once the controller is gone).
pub const NETWORK_FINALIZER: &str = "weft.dev/cleanup";

/// The condition type that says whether a resource is realized.
pub const CONDITION_READY: &str = "Ready";

/// The condition type that says whether the controller accepted a resource's spec.
pub const CONDITION_VALID: &str = "Valid";

/// Default IPv4 per-node block prefix length (`spec.ipam.nodeBlockPrefix`): 64 addresses.
pub const DEFAULT_NODE_BLOCK_PREFIX_V4: u8 = 26;
/// Default IPv6 per-node block prefix length (`spec.ipam.nodeBlockPrefixV6`): 64 addresses.
pub const DEFAULT_NODE_BLOCK_PREFIX_V6: u8 = 122;
/// Default MTU of a network's links (`spec.mtu`).
pub const DEFAULT_MTU: u32 = 1500;

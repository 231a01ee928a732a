//! The controller's flags (`weft-operator controller`).

use clap::Args;

/// Controller flags.
#[derive(Debug, Args, Clone)]
pub struct ControllerOpts {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "WEFT_LEASE_NAMESPACE", default_value = "weft-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WEFT_LEASE_NAME", default_value = "weft-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name / hostname).
    #[arg(long, env = "POD_NAME", default_value_t = crate::default_hostname())]
    pub identity: String,
}

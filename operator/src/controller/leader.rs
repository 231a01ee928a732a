//! Leader election: every replica computes, only the holder of the Lease writes.

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// Whether this replica may write to the API right now.
pub trait Leadership: Send + Sync {
    /// True while this replica holds the Lease.
    fn is_leader(&self) -> bool;
}

impl Leadership for watch::Receiver<bool> {
    fn is_leader(&self) -> bool {
        *self.borrow()
    }
}

impl Leadership for AtomicBool {
    fn is_leader(&self) -> bool {
        self.load(Ordering::Relaxed)
    }
}

/// A fixed answer (tests, or a single replica without election).
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub bool);

impl Leadership for Fixed {
    fn is_leader(&self) -> bool {
        self.0
    }
}

/// Joins the election for the Lease `namespace/name` as `identity` (kube-lease-manager,
/// field manager `weft-controller`). The receiver says whether this replica leads; the task
/// keeps renewing (or trying to acquire) the Lease until the receiver is dropped.
pub async fn elect(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> Result<
    (
        watch::Receiver<bool>,
        tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
    ),
    kube_lease_manager::LeaseManagerError,
> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_field_manager(super::FIELD_MANAGER)
        .build()
        .await?;
    Ok(manager.watch().await)
}

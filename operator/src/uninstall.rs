//! `weft-operator uninstall-wait`: the Helm post-delete hook Job that waits until the cleanup
//! DaemonSet has run `agent cleanup` on every node it was scheduled to, then deletes it.
//!
//! Helm waits for a hook Job, not for a hook DaemonSet, so the Job is what makes `helm
//! uninstall` return only once the nodes are clean.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DeleteParams};

/// How far the cleanup DaemonSet got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Nodes the DaemonSet is scheduled to.
    pub desired: i32,
    /// Nodes whose cleanup init container has finished (the pod is ready).
    pub done: i32,
}

impl Progress {
    /// Reads the DaemonSet's status; `None` until the DaemonSet controller has observed it.
    pub fn of(ds: &DaemonSet) -> Option<Self> {
        let status = ds.status.as_ref()?;
        let generation = ds.metadata.generation.unwrap_or(0);
        if status.observed_generation.unwrap_or(0) < generation {
            return None;
        }
        Some(Self {
            desired: status.desired_number_scheduled,
            done: status.number_ready,
        })
    }

    /// Every scheduled node is clean.
    pub fn complete(&self) -> bool {
        self.done >= self.desired
    }
}

/// Waits up to `timeout` for the DaemonSet `name` in `namespace` to be ready on every node it
/// is scheduled to, then deletes it. Returns the last progress seen; a timeout is reported,
/// not an error, so that an unreachable node does not leave the release half uninstalled.
pub async fn wait_and_delete(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Option<Progress>, kube::Error> {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(ds) = api.get_opt(name).await? {
            last = Progress::of(&ds);
            if last.is_some_and(|p| p.complete()) {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;

    fn ds(generation: i64, observed: i64, desired: i32, ready: i32) -> DaemonSet {
        let mut ds = DaemonSet::default();
        ds.metadata.generation = Some(generation);
        ds.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            number_ready: ready,
            ..Default::default()
        });
        ds
    }

    #[test]
    fn complete_only_when_every_scheduled_node_is_ready() {
        assert!(Progress::of(&ds(1, 1, 2, 2)).is_some_and(|p| p.complete()));
        assert!(!Progress::of(&ds(1, 1, 2, 1)).is_some_and(|p| p.complete()));
    }

    #[test]
    fn unobserved_status_is_no_progress() {
        assert_eq!(Progress::of(&ds(2, 1, 2, 2)), None);
        assert_eq!(Progress::of(&DaemonSet::default()), None);
    }
}

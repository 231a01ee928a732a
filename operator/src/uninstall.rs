//! `weft-operator uninstall-wait`: the Helm post-delete hook Job that waits until the cleanup
//! DaemonSet has run `agent cleanup` on every node it was scheduled to, then deletes it.
//!
//! Helm waits for a hook Job, not for a hook DaemonSet, so the Job is what makes `helm
//! uninstall` return only once the nodes are clean.
//!
//! Then it takes the controller's `weft.dev/cleanup` finalizer off every Network
//! ([`release_networks`]): with the controller and the agents gone, nothing would ever remove
//! it, and a later `kubectl delete network` (or of weft's CRDs) would wait forever. With the
//! agents gone the finalizer waits for nothing that can still happen: the nodes' state it
//! stood for is what the cleanup removes, and a node the cleanup did not reach (named in the
//! Job's log) keeps its state either way.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use weft_crds::Network;

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

/// Takes the controller's finalizer off every Network that carries it (no other finalizer
/// is touched; a Network changed meanwhile is read again); returns how many were released.
pub async fn release_networks(client: kube::Client) -> Result<usize, kube::Error> {
    let api: Api<Network> = Api::all(client);
    let mut released = 0;
    for net in api.list(&ListParams::default()).await? {
        let mut net = net;
        for _ in 0..5 {
            let finalizers = net.finalizers().to_vec();
            if !finalizers
                .iter()
                .any(|f| f == weft_crds::constants::NETWORK_FINALIZER)
            {
                break;
            }
            let kept: Vec<&String> = finalizers
                .iter()
                .filter(|f| *f != weft_crds::constants::NETWORK_FINALIZER)
                .collect();
            // Only if the Network is still what was read (its resourceVersion): a finalizer
            // added meanwhile is kept.
            let patch = serde_json::json!({
                "metadata": {"finalizers": kept, "resourceVersion": net.resource_version()},
            });
            match api
                .patch(
                    &net.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    released += 1;
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => break,
                // Changed meanwhile: read it again.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    match api.get_opt(&net.name_any()).await? {
                        Some(n) => net = n,
                        None => break,
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(released)
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

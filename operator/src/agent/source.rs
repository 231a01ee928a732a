//! Where the agent's resources come from. The standalone source reads the YAML files that
//! `kubectl apply` takes from a directory and re-reads them when they change; the Kubernetes API
//! source ([`super::kube::KubeSource`]) plugs in behind the same trait.

use crate::model::{Peer, PeerReservation, Resources, parse_manifests};
use std::path::PathBuf;
use std::sync::Arc;

/// What a node publishes for the others: its workload interfaces and its VM reservations.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// Workload interfaces.
    #[serde(default)]
    pub workloads: Vec<weft_crds::NodeWorkload>,
    /// VM reservations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<weft_crds::NodeReservation>,
}

/// A peers file: [`Published`], or the bare list of workloads of earlier versions.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PeerFile {
    Full(Published),
    Workloads(Vec<weft_crds::NodeWorkload>),
}

/// Errors of a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory could not be read.
    #[error("cannot read manifests from {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes API source has not had the first complete list of every kind yet; the
    /// agent waits rather than take an unlisted cluster for an empty one.
    #[error("waiting for the first list of {what} from the Kubernetes API")]
    NotSynced {
        /// The kinds not listed yet, e.g. `pods, nodenetworks`.
        what: String,
    },
    /// This node's Node object is not in the Kubernetes API.
    #[error(
        "node {node} is not in the Kubernetes API; the agent's node name (--node-name, WEFT_NODE_NAME) must be the name of its Node"
    )]
    NodeNotFound {
        /// The node name the agent was given.
        node: String,
    },
}

/// A source of resources.
pub trait ResourceSource: Send {
    /// The current resources.
    fn snapshot(&mut self) -> Result<Resources, SourceError>;
    /// A fingerprint that changes whenever the resources may have changed (cheap to compute).
    fn fingerprint(&mut self) -> Result<u64, SourceError>;
    /// Signalled on every change, when the source learns of changes as they happen (cluster
    /// mode: the watches). The agent then reconciles at once instead of at its next poll of
    /// [`ResourceSource::fingerprint`]; a source without it (files) is polled.
    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// Reports what the agent realized after a reconcile (cluster mode writes it to the node's
    /// `NodeNetwork` status). The standalone source has nowhere to write it.
    fn report(&mut self, _status: &super::AgentStatus) {}
    /// Publishes this node's workload interfaces (for the other nodes' policies) and VM
    /// reservations (for VMs started elsewhere) — cluster mode: the `NodeNetwork` status;
    /// standalone: a file in the shared peers directory, if any.
    fn publish(&mut self, _published: &Published) {}
    /// Does [`ResourceSource::publish`] go anywhere? (When not, the list is not built.)
    fn publishes(&self) -> bool {
        false
    }
    /// Does the source know every pod of the node (cluster mode: the pod watch)? Then a pod
    /// the CNI asks about and the snapshot lacks is one the cache has not seen yet, and the
    /// answer waits for it. A standalone source knows only the pods in its manifests.
    fn knows_every_pod(&self) -> bool {
        false
    }
    /// Where anomalies go besides the audit log (cluster mode: Events on the pods). Called once.
    fn anomaly_publisher(&mut self) -> Option<super::anomaly::Publish> {
        None
    }
    /// Takes one reconcile's problems and publishes the pods' own where their users look
    /// (cluster mode: a Warning Event on the pod when a problem appears or its message
    /// changes; see [`super::pod_events`]). The standalone source has no pods to publish on:
    /// the agent's log and status file have them.
    fn pod_problems(&mut self, _problems: &[crate::model::Problem]) {}
}

/// Reads `*.yaml`, `*.yml` and `*.json` files (multi-document YAML allowed) from a directory.
/// With a peers directory shared by the nodes' agents, each agent writes its workload interfaces
/// to `<peers>/<node>.json` and reads the other nodes' files.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    dir: PathBuf,
    peers: Option<(PathBuf, String)>,
    published: Option<Published>,
    watch: Option<Arc<Watch>>,
}

/// Whether an inotify event changes what the directory holds: a file made, removed, renamed,
/// written (or closed after writing); not an open, a read or a close without writing.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// The directories' inotify watch: every change in them wakes the agent (which then compares
/// the files' fingerprint, so its own writes to the peers directory cost a comparison only).
struct Watch {
    changed: Arc<tokio::sync::Notify>,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

impl ManifestSource {
    /// A source on `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            peers: None,
            published: None,
            watch: None,
        }
    }

    /// Watches the manifests directory and the peers directory (made if missing) with inotify,
    /// so a change wakes the agent at once instead of at its next poll; where inotify cannot
    /// (its limits), says so and leaves the source to be polled.
    pub fn watched(mut self) -> Self {
        // Only what changes a file wakes the agent: its own reads of the files (opens,
        // accesses, closes without writing) would otherwise wake it to read them again.
        let changed = Arc::new(tokio::sync::Notify::new());
        let wake = Arc::clone(&changed);
        let mut dirs = vec![self.dir.clone()];
        if let Some((peers, _)) = &self.peers {
            if let Err(e) = std::fs::create_dir_all(peers) {
                tracing::warn!(dir = %peers.display(), error = %e, "cannot make the peers directory");
            }
            dirs.push(peers.clone());
        }
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| is_change(&e.kind)) {
                wake.notify_one();
            }
        })
        .and_then(|mut w| {
            use notify::Watcher as _;
            for dir in &dirs {
                w.watch(dir, notify::RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        });
        match watcher {
            Ok(w) => {
                self.watch = Some(Arc::new(Watch {
                    changed,
                    _watcher: w,
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the manifests with inotify; polling them instead")
            }
        }
        self
    }

    /// Shares workload interfaces with the other nodes' agents through `dir`, as node `node`.
    pub fn with_peers(mut self, dir: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        self.peers = Some((dir.into(), node.into()));
        self
    }

    /// The other nodes' files in the peers directory.
    fn peer_files(&self) -> Vec<(String, PathBuf)> {
        let Some((dir, me)) = &self.peers else {
            return Vec::new();
        };
        let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let node = name.strip_suffix(".json")?.to_string();
                (node != *me).then(|| (node, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SourceError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

impl ResourceSource for ManifestSource {
    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.watch.as_ref().map(|w| Arc::clone(&w.changed))
    }

    fn snapshot(&mut self) -> Result<Resources, SourceError> {
        let mut res = Resources::default();
        for file in self.files()? {
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_manifests(&text, &file.display().to_string(), &mut res),
                Err(e) => res
                    .problems
                    .push(format!("{}: cannot read: {e}", file.display())),
            }
        }
        for (node, file) in self.peer_files() {
            match weft_dataplane::state::read_json::<PeerFile>(&file) {
                Ok(file) => {
                    let published = match file {
                        PeerFile::Full(p) => p,
                        PeerFile::Workloads(workloads) => Published {
                            workloads,
                            ..Published::default()
                        },
                    };
                    res.peers
                        .extend(published.workloads.into_iter().map(|workload| {
                            std::sync::Arc::new(Peer {
                                node: node.clone(),
                                workload,
                            })
                        }));
                    res.peer_reservations
                        .extend(published.reservations.into_iter().map(|reservation| {
                            PeerReservation {
                                node: node.clone(),
                                reservation,
                            }
                        }));
                }
                Err(e) => res
                    .problems
                    .push(format!("peers of node {node}: {}", crate::error_chain(&e))),
            }
        }
        Ok(res)
    }

    fn fingerprint(&mut self) -> Result<u64, SourceError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let peers = self.peer_files().into_iter().map(|(_, f)| f);
        for file in self.files()?.into_iter().chain(peers) {
            file.hash(&mut h);
            if let Ok(bytes) = std::fs::read(&file) {
                bytes.hash(&mut h);
            }
        }
        Ok(h.finish())
    }

    fn publishes(&self) -> bool {
        self.peers.is_some()
    }

    fn publish(&mut self, published: &Published) {
        let Some((dir, me)) = &self.peers else {
            return;
        };
        if self.published.as_ref() == Some(published) {
            return;
        }
        let path = dir.join(format!("{me}.json"));
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                weft_dataplane::state::write_json_unsynced(&path, published)
                    .map_err(|e| crate::error_chain(&e))
            });
        match written {
            Ok(()) => self.published = Some(published.clone()),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot publish the node's workloads")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written to the manifests or the peers directory wakes the agent (no poll).
    #[tokio::test]
    async fn a_watched_source_announces_changes_to_its_files() {
        let manifests = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        let peers = shared.path().join("peers");
        let src = ManifestSource::new(manifests.path())
            .with_peers(&peers, "node-a")
            .watched();
        let changed = src.changes().expect("inotify watches the directories");
        assert!(peers.is_dir(), "the peers directory is made to be watched");
        for file in [manifests.path().join("net.yaml"), peers.join("node-b.json")] {
            let woken = changed.notified();
            std::fs::write(&file, "[]").unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(5), woken)
                .await
                .unwrap_or_else(|_| panic!("writing {} woke nobody", file.display()));
        }
        // Reading the files (as the agent does at every wake) wakes nobody: an agent that woke
        // itself reading would never rest.
        // (First the wake-ups the writes left: one write is several events.)
        while tokio::time::timeout(std::time::Duration::from_millis(200), changed.notified())
            .await
            .is_ok()
        {}
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for file in [manifests.path().join("net.yaml"), peers.join("node-b.json")] {
            std::fs::read(&file).unwrap();
        }
        std::fs::read_dir(manifests.path()).unwrap().for_each(drop);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(500), woken)
                .await
                .is_err(),
            "reading the files woke the agent"
        );
        // Unwatched, a source is polled.
        assert!(ManifestSource::new(manifests.path()).changes().is_none());
    }

    #[test]
    fn reads_networks_portforwards_and_pods_and_reports_bad_documents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: nat-demo}
spec: {mode: NAT, subnets: [10.10.0.0/16]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
---
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: web}
spec: {network: nat-demo, target: {workload: web-1}, ports: [{port: 8080, targetPort: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: broken}
spec: {mode: Sideways}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        // Names the API server refuses never get in: they would become file names and
        // nftables strings.
        std::fs::write(
            dir.path().join("c.yaml"),
            r#"
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: 'a","eth0'}
spec: {mode: NAT, subnets: [10.11.0.0/16]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: ../../victim}
spec: {mode: NAT, subnets: [10.12.0.0/16]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: 'Bad NS'}
"#,
        )
        .unwrap();
        let mut src = ManifestSource::new(dir.path());
        let res = src.snapshot().unwrap();
        assert_eq!(res.networks.len(), 1);
        assert_eq!(res.port_forwards.len(), 1);
        assert_eq!(
            res.port_forwards[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(res.workloads[0].labels["app"], "web");
        assert_eq!(res.problems.len(), 4, "{:?}", res.problems);
        assert!(res.problems[0].contains("invalid Network"));
        assert!(
            res.problems[1].contains("invalid Network: metadata.name: \"a\\\",\\\"eth0\""),
            "{:?}",
            res.problems
        );
        assert!(
            res.problems[2].contains("../../victim"),
            "{:?}",
            res.problems
        );
        assert!(
            res.problems[3].contains("invalid Pod: metadata.namespace"),
            "{:?}",
            res.problems
        );
        let f1 = src.fingerprint().unwrap();
        assert_eq!(f1, src.fingerprint().unwrap());
        std::fs::write(dir.path().join("b.yaml"), "").unwrap();
        assert_ne!(f1, src.fingerprint().unwrap());
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    #[test]
    fn agents_sharing_a_peers_directory_see_each_others_workloads_and_not_their_own() {
        let manifests = tempfile::tempdir().unwrap();
        let peers = tempfile::tempdir().unwrap();
        let mut a = ManifestSource::new(manifests.path()).with_peers(peers.path(), "node-a");
        let mut b = ManifestSource::new(manifests.path()).with_peers(peers.path(), "node-b");
        let web = weft_crds::NodeWorkload {
            network: "lan".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: std::sync::Arc::new([("app".to_string(), "web".to_string())].into()),
            ips: vec!["10.0.0.5".into()],
            vm: None,
            mac: Some("0a:58:0a:00:00:05".into()),
            active: true,
        };
        let kept = weft_crds::NodeReservation {
            vm: "shop/db".into(),
            network: "lan".into(),
            ifname: "eth0".into(),
            ips: vec!["10.0.0.9".into()],
            mac: Some("02:00:00:00:00:09".into()),
            since: 1_700_000_000,
        };
        let published = Published {
            workloads: vec![web.clone()],
            reservations: vec![kept.clone()],
        };
        let before = a.fingerprint().unwrap();
        b.publish(&published);
        assert_ne!(
            a.fingerprint().unwrap(),
            before,
            "a peer's change is a change"
        );
        let snapshot = a.snapshot().unwrap();
        assert_eq!(
            snapshot.peers,
            [std::sync::Arc::new(Peer {
                node: "node-b".into(),
                workload: web.clone()
            })]
        );
        assert_eq!(
            snapshot.peer_reservations,
            [PeerReservation {
                node: "node-b".into(),
                reservation: kept
            }]
        );
        assert!(b.snapshot().unwrap().peers.is_empty(), "not its own");
        // Unchanged workloads are not rewritten.
        let file = peers.path().join("node-b.json");
        let written = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.publish(&published.clone());
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            written
        );
    }

    #[test]
    fn a_peers_file_of_workloads_alone_still_reads() {
        let manifests = tempfile::tempdir().unwrap();
        let peers = tempfile::tempdir().unwrap();
        std::fs::write(
            peers.path().join("node-b.json"),
            r#"[{"network":"lan","namespace":"shop","name":"web-1","ips":["10.0.0.5"]}]"#,
        )
        .unwrap();
        let mut a = ManifestSource::new(manifests.path()).with_peers(peers.path(), "node-a");
        let res = a.snapshot().unwrap();
        assert_eq!(res.peers.len(), 1);
        assert!(res.peer_reservations.is_empty());
        assert!(res.problems.is_empty(), "{:?}", res.problems);
    }
}

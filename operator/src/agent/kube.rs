//! The agent's resources from the Kubernetes API (`weft-operator agent --kube`).
//!
//! [`KubeSource`] runs one reflector per kind on the agent's runtime: every Network,
//! PortForward, ClusterSegmentationPolicy and SegmentationPolicy; the labels of every
//! Namespace; this node's Node (for its labels) and NodeNetwork (for its address blocks); the
//! Pods scheduled on this node; and the WorkloadSlices of the Networks with a block on this node
//! (the other nodes' workloads and VM reservations, which the controller publishes there as far
//! as each node may vouch for them: see [`SliceWatch`]). Namespaces, the Node and Pods are watched as metadata only:
//! their labels (and a pod's `weft.dev/networks` and limit annotations) are all the agent needs;
//! managed fields and other annotations are dropped before
//! they reach the cache. Watch errors are logged and retried with kube-runtime's default
//! backoff.
//!
//! [`ResourceSource::snapshot`] reads the stores without waiting. Until every reflector has
//! had its first complete list it returns [`SourceError::NotSynced`], so the agent never takes
//! a cluster it has not listed yet for an empty one (and removes nothing at startup). This
//! node's NodeNetwork missing after that (deleted, or gone with a re-created Node, until the
//! controller writes it again) is said so in the snapshot
//! ([`Resources::node_network_missing`]): the plan keeps the Networks realized on the node
//! meanwhile rather than take them down.
//!
//! [`ResourceSource::report`] turns the agent's status into the NodeNetwork status
//! ([`node_network_status`]) and hands it to a task that writes it with server-side apply,
//! field manager [`FIELD_MANAGER`]. Only the newest status is written, an unchanged one is not
//! written again, and a failed write is retried with backoff.
//!
//! Anomalies ([`ResourceSource::anomaly_publisher`]) and the pods' own problems
//! ([`ResourceSource::pod_problems`], published when they appear or change: see
//! [`super::pod_events`]) become Warning Events on the pods, sent by one task with
//! kube-runtime's event recorder.

use super::AgentStatus;
use super::pod_events::{Announced, PodEvent};
use super::source::{Published, ResourceSource, SourceError};
use crate::controller::status::{READY, condition};
use crate::model::shared::LabelSets;
use crate::model::{NodeBlocks, Peer, PeerReservation, Resources, WorkloadMeta};
use ::kube::api::{Patch, PatchParams};
use ::kube::core::PartialObjectMeta;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{WatchStreamExt, watcher};
use ::kube::{Api, Client, Resource, ResourceExt};
use backon::BackoffBuilder as _;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use weft_crds::{
    ClusterSegmentationPolicy, Network, NodeNetwork, NodeNetworkSpec, NodeNetworkStatus,
    PortForward, SegmentationPolicy, TrafficMirror, WorkloadSlice,
};

/// The field manager of the agent's server-side apply of its NodeNetwork status.
pub const FIELD_MANAGER: &str = "weft-agent";
/// Condition type: the last apply on the node failed.
pub const DEGRADED: &str = "Degraded";
/// Condition type: which Network the node's conflist names for pods without the
/// `weft.dev/networks` annotation, and why (False: none, new pods fail).
pub const DEFAULT_NETWORK: &str = "DefaultNetwork";
/// Longest delay between retries of a failed status write.
pub const MAX_STATUS_BACKOFF: Duration = Duration::from_secs(60);
/// Most VM reservations published in the NodeNetwork status (its schema's `maxItems`).
const MAX_RESERVATIONS: usize = 4096;
/// Longest condition message written (the API allows 32768 bytes).
const MAX_MESSAGE: usize = 4096;
/// Longest Event note written, before the ellipsis of a cut one (the API allows 1024 bytes).
const MAX_NOTE: usize = 1000;

/// The reflector stores the agent reads.
#[derive(Clone)]
struct Stores {
    networks: Store<Network>,
    port_forwards: Store<PortForward>,
    cluster_policies: Store<ClusterSegmentationPolicy>,
    policies: Store<SegmentationPolicy>,
    mirrors: Store<TrafficMirror>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    nodes: Store<PartialObjectMeta<Node>>,
    node_networks: Store<NodeNetwork>,
    pods: Store<PartialObjectMeta<Pod>>,
}

/// Resources from the Kubernetes API, for one node.
pub struct KubeSource {
    node: String,
    stores: Stores,
    /// Per reflector: what it watches, and whether its first list is complete.
    synced: Vec<(&'static str, Arc<AtomicBool>)>,
    /// Bumped by every watch event of every reflector.
    changes: Arc<Changes>,
    /// The NodeNetwork the last snapshot used (its spec, generation and status).
    used: Option<Arc<NodeNetwork>>,
    /// The newest status to write; the writer task writes what it holds.
    status: watch::Sender<Option<NodeNetworkStatus>>,
    /// What the last snapshot failed with (logged on change).
    last_error: Option<String>,
    /// Whether a snapshot ever succeeded.
    listed: bool,
    /// This node's workload interfaces and VM reservations, published in its NodeNetwork
    /// status.
    published: Published,
    /// The KubeVirt VMs and VM instances, when KubeVirt is installed and they are listed.
    vms: VmWatch,
    /// The WorkloadSlices of the Networks with a block here.
    slices: SliceWatch,
    /// Where the Warning Events on pods go (anomalies, pod problems): one task publishes them.
    events: tokio::sync::mpsc::UnboundedSender<PodEvent>,
    /// The pod problems published as Events, so that one that stays is not published again.
    announced: Announced,
    /// The pod problems' Events the API server did not take: forgotten by `announced` at the
    /// next reconcile, which publishes them again if the problem is still there.
    unpublished: tokio::sync::mpsc::UnboundedReceiver<PodEvent>,
    /// The last publication had more reservations than the status holds (warned once).
    capped: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the reflectors and the status writer for node `node` on the current tokio
    /// runtime (call it from within the agent's runtime).
    pub fn start(client: Client, node: &str) -> Self {
        let changes = Arc::new(Changes::default());
        let mut synced = Vec::new();
        let mut tasks = Vec::new();
        let all = watcher::Config::default().any_semantic();
        let this_node = all.clone().fields(&format!("metadata.name={node}"));
        let on_node = all.clone().fields(&format!("spec.nodeName={node}"));
        let mut spawn = |what: &'static str, task: BoxedTask, flag: Arc<AtomicBool>| {
            synced.push((what, flag));
            tasks.push(tokio::spawn(task));
        };
        macro_rules! reflect {
            ($what:literal, $api:expr, $config:expr) => {
                reflect!($what, $api, $config, |_| {}, None)
            };
            // weft's own kinds: what the plan reads of them is kept (see `trim_status`), and
            // an event that leaves that unchanged (a status write of the controller's) does
            // not wake the agent.
            ($what:literal, $api:expr, $config:expr, weft) => {
                reflect!($what, $api, $config, trim_status, Some(|a, b| a == b))
            };
            ($what:literal, $api:expr, $config:expr, $keep:expr, $same:expr) => {{
                let (store, flag, task) =
                    reflect($what, $api, $config.clone(), changes.clone(), $keep, $same);
                spawn($what, task, flag);
                store
            }};
        }
        let stores = Stores {
            networks: reflect!("networks", Api::all(client.clone()), all, weft),
            port_forwards: reflect!("portforwards", Api::all(client.clone()), all, weft),
            cluster_policies: reflect!(
                "clustersegmentationpolicies",
                Api::all(client.clone()),
                all,
                weft
            ),
            policies: reflect!("segmentationpolicies", Api::all(client.clone()), all, weft),
            mirrors: reflect!("trafficmirrors", Api::all(client.clone()), all, weft),
            namespaces: reflect!("namespaces", Api::all(client.clone()), all),
            nodes: reflect!("nodes", Api::all(client.clone()), this_node),
            // This node's, for its blocks (the other nodes' workloads come in WorkloadSlices).
            node_networks: reflect!("nodenetworks", Api::all(client.clone()), this_node),
            pods: reflect!("pods", Api::all(client.clone()), on_node),
        };
        let vms = VmWatch::default();
        for (kind, plural, set) in [
            ("VirtualMachine", "virtualmachines", vms.vms.clone()),
            (
                "VirtualMachineInstance",
                "virtualmachineinstances",
                vms.instances.clone(),
            ),
        ] {
            tasks.push(tokio::spawn(watch_vms(client.clone(), kind, plural, set)));
        }
        let (status, rx) = watch::channel(None);
        tasks.push(tokio::spawn(write_status(
            Api::all(client.clone()),
            node.to_owned(),
            rx,
        )));
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let (failed, unpublished) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(publish_pod_events(
            client.clone(),
            node.to_owned(),
            stores.pods.clone(),
            rx,
            failed,
        )));
        let slices = SliceWatch {
            client: client.clone(),
            changes: changes.clone(),
            running: None,
            previous: None,
        };
        KubeSource {
            node: node.to_owned(),
            slices,
            events,
            announced: Announced::default(),
            unpublished,
            stores,
            synced,
            changes,
            used: None,
            published: Published::default(),
            vms,
            capped: false,
            status,
            last_error: None,
            listed: false,
            tasks,
        }
    }

    fn read(&mut self) -> Result<Resources, SourceError> {
        let waiting: Vec<&str> = self
            .synced
            .iter()
            .filter(|(_, done)| !done.load(Ordering::Acquire))
            .map(|(what, _)| *what)
            .collect();
        if !waiting.is_empty() {
            return Err(SourceError::NotSynced {
                what: waiting.join(", "),
            });
        }
        let named = |meta: &::kube::core::ObjectMeta| meta.name.as_deref() == Some(&self.node);
        let node = self
            .stores
            .nodes
            .find(|n| named(&n.metadata))
            .ok_or_else(|| SourceError::NodeNotFound {
                node: self.node.clone(),
            })?;
        let node_network = self.stores.node_networks.find(|n| named(&n.metadata));
        let (blocks, problems) = match &node_network {
            Some(nn) => node_blocks(&self.node, &nn.spec),
            // The controller has not written this node's NodeNetwork (yet, or again): no blocks
            // of its own (the plan keeps what the node realized meanwhile).
            None => (BTreeMap::new(), Vec::new()),
        };
        // The other nodes' workloads and VM reservations on the Networks with a block here. While
        // this node's NodeNetwork is missing, the slices of the Networks it had stay watched.
        if node_network.is_some() {
            self.slices.want(blocks.keys().cloned().collect());
        }
        let (peers, peer_reservations) = self.slices.peers(&self.node)?;
        let mut res = Resources {
            networks: sorted(&self.stores.networks),
            port_forwards: sorted(&self.stores.port_forwards),
            cluster_policies: sorted(&self.stores.cluster_policies),
            policies: sorted(&self.stores.policies),
            mirrors: sorted(&self.stores.mirrors),
            workloads: sorted(&self.stores.pods)
                .into_iter()
                .map(|p| WorkloadMeta {
                    namespace: p.namespace().unwrap_or_default(),
                    name: p.name_any(),
                    networks: p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(weft_dataplane::proto::NETWORKS_ANNOTATION))
                        .cloned(),
                    limits: p
                        .metadata
                        .annotations
                        .as_ref()
                        .map(WorkloadMeta::limit_annotations)
                        .unwrap_or_default(),
                    labels: p.metadata.labels.unwrap_or_default(),
                })
                .collect(),
            namespaces: self
                .stores
                .namespaces
                .state()
                .iter()
                .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
                .collect(),
            node_labels: Some(node.metadata.labels.clone().unwrap_or_default()),
            peers,
            peer_reservations,
            vms: self.vms.known(),
            ..Resources::default()
        };
        res.node_blocks = Some(blocks);
        res.node_network_missing = node_network.is_none();
        res.problems = problems;
        self.used = node_network;
        Ok(res)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Most Networks named in the label selector of the WorkloadSlice watch; with more, every
/// slice is watched and those of other Networks are ignored.
const MAX_SELECTED_NETWORKS: usize = 100;

/// One watch of WorkloadSlices, for a set of Networks.
struct SliceReflector {
    networks: BTreeSet<String>,
    store: Store<WorkloadSlice>,
    synced: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for SliceReflector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The WorkloadSlices of the Networks with a block on this node: one watch, selected by the
/// label `weft.dev/network` (`in (...)` the Networks' label values), so that the agent hears of
/// the workloads of its own Networks only. When the set of Networks changes, a new watch starts
/// and the previous one answers until the new one has listed.
struct SliceWatch {
    client: Client,
    changes: Arc<Changes>,
    running: Option<SliceReflector>,
    previous: Option<SliceReflector>,
}

impl SliceWatch {
    /// Watches the slices of `networks` from now on (a new watch if they changed).
    fn want(&mut self, networks: BTreeSet<String>) {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.networks == networks)
        {
            return;
        }
        let next = if networks.is_empty() {
            None
        } else {
            let mut config = watcher::Config::default().any_semantic();
            if networks.len() <= MAX_SELECTED_NETWORKS {
                let values: Vec<String> = networks
                    .iter()
                    .map(|n| weft_crds::workloadslice::network_label_value(n))
                    .collect();
                config = config.labels(&format!(
                    "{} in ({})",
                    weft_crds::NETWORK_LABEL,
                    values.join(",")
                ));
            }
            // The pods of one Deployment carry one label set: the store keeps it once.
            let mut label_sets = LabelSets::default();
            let (store, synced, task) = reflect(
                "workloadslices",
                Api::all(self.client.clone()),
                config,
                self.changes.clone(),
                move |slice: &mut WorkloadSlice| label_sets.share_slice(slice),
                None,
            );
            Some(SliceReflector {
                networks: networks.clone(),
                store,
                synced,
                task: tokio::spawn(task),
            })
        };
        debug!(
            networks = networks.len(),
            "watching the WorkloadSlices of the node's Networks"
        );
        // The running watch answers until the new one has listed (unless it never listed).
        let old = self
            .running
            .take()
            .filter(|r| r.synced.load(Ordering::Acquire));
        if old.is_some() {
            self.previous = old;
        }
        self.running = next;
        if self.running.is_none() {
            self.previous = None;
        }
    }

    /// The other nodes' workload interfaces and VM reservations on the Networks watched, each
    /// once; `NotSynced` until a watch has listed.
    fn peers(&mut self, me: &str) -> Result<(Vec<Arc<Peer>>, Vec<PeerReservation>), SourceError> {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.synced.load(Ordering::Acquire))
        {
            self.previous = None;
        }
        let answering = match (&self.running, &self.previous) {
            (None, _) => return Ok((Vec::new(), Vec::new())),
            (Some(r), _) if r.synced.load(Ordering::Acquire) => r,
            (_, Some(p)) => p,
            (Some(_), None) => {
                return Err(SourceError::NotSynced {
                    what: "workloadslices".into(),
                });
            }
        };
        let mut slices = answering.store.state();
        Ok(slice_peers(&mut slices, &answering.networks, me))
    }
}

/// The other nodes' workloads and VM reservations in `slices` (sorted by name here) of the
/// Networks `networks`, as node `me` reads them: its own entries left out, an entry found in
/// two slices (two writes that crossed) once.
pub fn slice_peers(
    slices: &mut [Arc<WorkloadSlice>],
    networks: &BTreeSet<String>,
    me: &str,
) -> (Vec<Arc<Peer>>, Vec<PeerReservation>) {
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut seen_workloads = std::collections::HashSet::new();
    let mut seen_reservations = std::collections::HashSet::new();
    let mut peers = Vec::new();
    let mut reservations = Vec::new();
    for slice in slices.iter().filter(|s| networks.contains(&s.spec.network)) {
        let network = &slice.spec.network;
        for w in slice
            .spec
            .workloads
            .iter()
            .filter(|w| w.node != me && &w.workload.network == network)
        {
            if seen_workloads.insert(w.key()) {
                peers.push(w.clone());
            }
        }
        for r in slice
            .spec
            .reservations
            .iter()
            .filter(|r| r.node != me && &r.reservation.network == network)
        {
            if seen_reservations.insert(r.key()) {
                reservations.push(r.clone());
            }
        }
    }
    (peers, reservations)
}

/// Publishes each Warning Event of `rx` on its pod (events.k8s.io), with the pod's uid from
/// the pod store when it has the pod (`kubectl describe pod` shows only the Events that name
/// the pod's uid). Events that fold ([`PodEvent::folds`]) go through one recorder, which
/// patches a repeat within a few minutes into a series on the first Event; the others get an
/// Event of their own. Those the API server does not take go back through `failed` (an
/// anomaly's, which folds, is not sent back: the next anomaly publishes again).
async fn publish_pod_events(
    client: Client,
    node: String,
    pods: Store<PartialObjectMeta<Pod>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<PodEvent>,
    failed: tokio::sync::mpsc::UnboundedSender<PodEvent>,
) {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: "weft-agent".into(),
        instance: Some(node),
    };
    let folding = Recorder::new(client.clone(), reporter.clone());
    while let Some(e) = rx.recv().await {
        let uid = pods
            .get(&reflector::ObjectRef::new(&e.pod).within(&e.namespace))
            .and_then(|p| p.metadata.uid.clone());
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(e.namespace.clone()),
            name: Some(e.pod.clone()),
            uid,
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: e.reason.into(),
            note: Some(truncated_to(&e.note, MAX_NOTE)),
            action: e.action.into(),
            secondary: None,
        };
        let own;
        let recorder = if e.folds {
            &folding
        } else {
            own = Recorder::new(client.clone(), reporter.clone());
            &own
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            warn!(pod = %format!("{}/{}", e.namespace, e.pod), reason = e.reason, error = %err, "cannot publish the Event on the pod (a pod problem's is tried again at the next reconcile)");
            if !e.folds {
                let _ = failed.send(e);
            }
        }
    }
}

impl ResourceSource for KubeSource {
    fn anomaly_publisher(&mut self) -> Option<super::anomaly::Publish> {
        let tx = self.events.clone();
        Some(Box::new(move |a| {
            let _ = tx.send(PodEvent {
                namespace: a.namespace,
                pod: a.pod,
                reason: a.kind.reason(),
                action: "Detect",
                note: a.note,
                folds: true,
            });
        }))
    }

    fn pod_problems(&mut self, problems: &[crate::model::Problem]) {
        while let Ok(e) = self.unpublished.try_recv() {
            self.announced.forget(&e);
        }
        for e in self.announced.update(problems) {
            debug!(pod = %format!("{}/{}", e.namespace, e.pod), reason = e.reason, "publishing a pod problem as an Event on the pod");
            let _ = self.events.send(e);
        }
    }

    fn snapshot(&mut self) -> Result<Resources, SourceError> {
        let result = self.read();
        let error = result.as_ref().err().map(ToString::to_string);
        if error != self.last_error {
            match &result {
                Err(SourceError::NotSynced { what }) => {
                    info!(node = %self.node, waiting_for = %what, "waiting for the first list from the Kubernetes API")
                }
                Err(e) => {
                    warn!(node = %self.node, error = %e, "cannot use the resources of the Kubernetes API")
                }
                Ok(_) if !self.listed => {
                    info!(node = %self.node, "listed every kind from the Kubernetes API")
                }
                Ok(_) => info!(node = %self.node, "the Kubernetes API resources are usable again"),
            }
            self.last_error = error;
        }
        if result.is_ok() {
            self.listed = true;
        }
        result
    }

    fn fingerprint(&mut self) -> Result<u64, SourceError> {
        Ok(self.changes.count.load(Ordering::Acquire))
    }

    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.changes.notify.clone())
    }

    fn publishes(&self) -> bool {
        true
    }

    fn knows_every_pod(&self) -> bool {
        true
    }

    fn publish(&mut self, published: &Published) {
        // Written with the next status (the agent publishes before it reports).
        self.published = published.clone();
        // The schema's bound: the newest reservations win (the others' VMs get new addresses
        // when started on another node).
        let reservations = &mut self.published.reservations;
        let over = reservations.len() > MAX_RESERVATIONS;
        if over && !std::mem::replace(&mut self.capped, true) {
            warn!(
                kept = reservations.len(),
                published = MAX_RESERVATIONS,
                "more VM reservations than the NodeNetwork status holds: the newest are published"
            );
        }
        self.capped = over;
        if over {
            reservations.sort_by_key(|r| std::cmp::Reverse(r.since));
            reservations.truncate(MAX_RESERVATIONS);
        }
    }

    fn report(&mut self, status: &AgentStatus) {
        let Some(nn) = self.used.clone() else {
            debug!(node = %self.node, "no NodeNetwork for this node yet; its status is not written");
            return;
        };
        let written = nn.status.as_ref();
        let previous: Vec<Condition> = match self.status.borrow().as_ref().or(written) {
            Some(s) => s.conditions.clone(),
            None => Vec::new(),
        };
        let mut new = node_network_status(
            status,
            &nn.spec,
            nn.metadata.generation,
            &previous,
            jiff::Timestamp::now(),
        );
        new.workloads = self.published.workloads.clone();
        new.reservations = self.published.reservations.clone();
        self.status.send_if_modified(|current| {
            if current.as_ref() == Some(&new) {
                return false;
            }
            // The first status since the agent started needs no write when the NodeNetwork
            // already has it.
            let write = current.is_some() || written != Some(&new);
            *current = Some(new);
            write
        });
    }
}

type BoxedTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The identities (`namespace/name`) of one KubeVirt kind; `None` until listed.
type VmSet = Arc<std::sync::RwLock<Option<std::collections::BTreeSet<String>>>>;

/// The KubeVirt VirtualMachines and VirtualMachineInstances of the cluster, watched as
/// metadata. Neither is a condition of the agent's readiness: without KubeVirt they stay
/// unlisted and VM reservations are kept.
#[derive(Clone, Default)]
struct VmWatch {
    vms: VmSet,
    instances: VmSet,
}

impl VmWatch {
    /// Every VM and VM instance, once both kinds are listed.
    fn known(&self) -> Option<std::collections::BTreeSet<String>> {
        let vms = self.vms.read().ok()?.clone()?;
        let instances = self.instances.read().ok()?.clone()?;
        Some(vms.into_iter().chain(instances).collect())
    }
}

/// Watches the metadata of KubeVirt's `kind` (`kubevirt.io/v1`, all namespaces) into `set`.
/// Its events are no reason to reconcile (a VM's status changes often): the agent reads the set
/// at its next resync.
/// While the kind does not exist (KubeVirt not installed) the list fails with 404: that is
/// logged once, and asked again with backoff.
async fn watch_vms(client: Client, kind: &'static str, plural: &'static str, set: VmSet) {
    use ::kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", kind),
        plural,
    );
    let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client, &resource);
    let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    futures::pin_mut!(stream);
    let id = |o: &PartialObjectMeta<DynamicObject>| {
        format!(
            "{}/{}",
            o.metadata.namespace.as_deref().unwrap_or_default(),
            o.metadata.name.as_deref().unwrap_or_default()
        )
    };
    let mut building: std::collections::BTreeSet<String> = Default::default();
    let mut absent_logged = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                let missing = matches!(&e, watcher::Error::InitialListFailed(::kube::Error::Api(s)) if s.code == 404)
                    || matches!(&e, watcher::Error::WatchFailed(::kube::Error::Api(s)) if s.code == 404);
                if missing {
                    if !absent_logged {
                        info!(
                            kind,
                            "KubeVirt is not installed: VM reservations are kept until it is"
                        );
                        absent_logged = true;
                    }
                } else {
                    warn!(kind, error = %crate::error_chain(&e), "watch failed; retrying with backoff");
                }
                continue;
            }
        };
        let Ok(mut current) = set.write() else {
            return;
        };
        match event {
            watcher::Event::Init => building.clear(),
            watcher::Event::InitApply(o) => {
                building.insert(id(&o));
            }
            watcher::Event::InitDone => {
                *current = Some(std::mem::take(&mut building));
                debug!(kind, "first list complete");
            }
            watcher::Event::Apply(o) => {
                current.get_or_insert_default().insert(id(&o));
            }
            watcher::Event::Delete(o) => {
                if let Some(c) = current.as_mut() {
                    c.remove(&id(&o));
                }
            }
        }
    }
}

/// What the watches tell the agent: a counter of events (the fingerprint) and a wake-up for the
/// agent's loop, so that a change is reconciled as soon as it arrives (events that arrive during a
/// reconcile wake it once more, not once each).
#[derive(Default)]
struct Changes {
    count: AtomicU64,
    notify: Arc<tokio::sync::Notify>,
}

impl Changes {
    fn bump(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// What the agent keeps of one of weft's own kinds (Networks, PortForwards, policies,
/// TrafficMirrors): everything but the resource version and the status the controller writes,
/// except a Network's `Valid` condition (the plan leaves out a Network the controller
/// rejected). So a status write alone leaves the stored object as it was.
trait TrimStatus: Resource {
    fn trim_status(&mut self);
}

macro_rules! without_status {
    ($($kind:ty),*) => {$(
        impl TrimStatus for $kind {
            fn trim_status(&mut self) {
                self.status = None;
            }
        }
    )*};
}
without_status!(
    weft_crds::PortForward,
    weft_crds::ClusterSegmentationPolicy,
    weft_crds::SegmentationPolicy,
    weft_crds::TrafficMirror
);

impl TrimStatus for weft_crds::Network {
    fn trim_status(&mut self) {
        self.status = self.status.take().and_then(|s| {
            let conditions: Vec<Condition> = s
                .conditions
                .into_iter()
                .filter(|c| c.type_ == weft_crds::constants::CONDITION_VALID)
                .collect();
            (!conditions.is_empty()).then(|| weft_crds::NetworkStatus {
                conditions,
                ..Default::default()
            })
        });
    }
}

fn trim_status<K: TrimStatus>(o: &mut K) {
    o.meta_mut().resource_version = None;
    o.trim_status();
}

/// A reflector for `api` into a new store, `keep` applied to each object before the store
/// keeps it: its stream bumps `changes` on every event, but (with `same`) for a changed
/// object that `same` finds equal to the one stored, and sets the returned flag once the
/// first list is complete; errors are logged and retried.
fn reflect<K>(
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<Changes>,
    mut keep: impl FnMut(&mut K) + Send + 'static,
    same: Option<fn(&K, &K) -> bool>,
) -> (Store<K>, Arc<AtomicBool>, BoxedTask)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let synced = Arc::new(AtomicBool::new(false));
    let flag = synced.clone();
    // Whether the object of the last event, as kept, equals the one the store held.
    let unchanged = Arc::new(AtomicBool::new(false));
    let (stored, seen) = (reader.clone(), unchanged.clone());
    // The agent reads no managed fields and a few annotations (a pod's `weft.dev/networks` and
    // its limits): keep the rest out of the cache.
    let trimmed = watcher(api, config).modify(move |o: &mut K| {
        o.meta_mut().managed_fields = None;
        let kept = o.meta_mut().annotations.take().map(|a| {
            let mut kept = WorkloadMeta::limit_annotations(&a);
            if let Some(v) = a.get(weft_dataplane::proto::NETWORKS_ANNOTATION) {
                kept.insert(
                    weft_dataplane::proto::NETWORKS_ANNOTATION.to_string(),
                    v.clone(),
                );
            }
            kept
        });
        o.meta_mut().annotations = kept.filter(|k| !k.is_empty());
        keep(o);
        if let Some(same) = same {
            let before = stored.get(&reflector::ObjectRef::from_obj(o));
            seen.store(before.is_some_and(|b| same(&b, o)), Ordering::Release);
        }
    });
    let stream = reflector::reflector(writer, trimmed).default_backoff();
    let task = async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone)
                        && !flag.swap(true, Ordering::AcqRel)
                    {
                        debug!(what, "first list complete");
                    }
                    let same = unchanged.swap(false, Ordering::AcqRel);
                    if matches!(event, watcher::Event::Apply(_)) && same {
                        continue;
                    }
                    changes.bump();
                }
                Err(e) => {
                    warn!(what, error = %crate::error_chain(&e), "watch failed; retrying with backoff")
                }
            }
        }
    };
    (reader, synced, Box::pin(task))
}

/// The objects of a store, ordered by namespace and name.
fn sorted<K: Resource + Clone>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut all: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    all.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    all
}

/// This node's address blocks per network from its NodeNetwork spec, with a problem for each
/// block that does not parse or is of the wrong family. A network without a usable block is
/// left out (the plan then reports that no block is assigned).
pub fn node_blocks(
    node: &str,
    spec: &NodeNetworkSpec,
) -> (BTreeMap<String, NodeBlocks>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, block) in spec.blocks.iter().enumerate() {
        let mut blocks = NodeBlocks::default();
        let mut problem = |field: &str, message: String| {
            problems.push(format!(
                "NodeNetwork {node}: spec.blocks[{i}].{field} (network {}): {message}",
                block.network
            ));
        };
        if let Some(cidr) = &block.ipv4 {
            match cidr.net() {
                Ok(IpNet::V4(net)) => blocks.v4 = Some(net),
                Ok(IpNet::V6(_)) => problem("ipv4", format!("{cidr} is not an IPv4 block")),
                Err(e) => problem("ipv4", e.to_string()),
            }
        }
        if let Some(cidr) = &block.ipv6 {
            match cidr.net() {
                Ok(IpNet::V6(net)) => blocks.v6 = Some(net),
                Ok(IpNet::V4(_)) => problem("ipv6", format!("{cidr} is not an IPv6 block")),
                Err(e) => problem("ipv6", e.to_string()),
            }
        }
        if blocks.v4.is_some() || blocks.v6.is_some() {
            out.insert(block.network.clone(), blocks);
        }
    }
    (out, problems)
}

fn truncated(text: &str) -> String {
    truncated_to(text, MAX_MESSAGE)
}

/// `text` cut to at most `max` bytes (on a character boundary), and an ellipsis if cut.
fn truncated_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The NodeNetwork status for what the agent realized: `Ready` when the last apply succeeded
/// and every network with a block in `spec` is realized, `Degraded` when the last apply
/// failed. `lastTransitionTime` is kept from `previous` while a condition's status stays.
pub fn node_network_status(
    agent: &AgentStatus,
    spec: &NodeNetworkSpec,
    generation: Option<i64>,
    previous: &[Condition],
    now: jiff::Timestamp,
) -> NodeNetworkStatus {
    let missing: Vec<&str> = spec
        .blocks
        .iter()
        .map(|b| b.network.as_str())
        .filter(|n| !agent.networks.iter().any(|r| r == n))
        .collect();
    let ready = match &agent.last_error {
        Some(e) => condition(
            READY,
            false,
            "ApplyFailed",
            truncated(e),
            generation,
            previous,
            now,
        ),
        None if !missing.is_empty() => {
            let mut message = format!("not realized yet: {}", missing.join(", "));
            let why: Vec<&str> = agent
                .problems
                .iter()
                .filter(|p| {
                    missing.iter().any(|n| {
                        p.starts_with(&format!("Network {n}: "))
                            || p.contains(&format!("(network {n})"))
                    })
                })
                .map(String::as_str)
                .collect();
            if !why.is_empty() {
                message.push_str(&format!(" ({})", why.join("; ")));
            }
            condition(
                READY,
                false,
                "Pending",
                truncated(&message),
                generation,
                previous,
                now,
            )
        }
        None => condition(
            READY,
            true,
            "Realized",
            format!(
                "every network of the spec is realized ({})",
                spec.blocks.len()
            ),
            generation,
            previous,
            now,
        ),
    };
    let degraded = match &agent.last_error {
        Some(e) => condition(
            DEGRADED,
            true,
            "ApplyFailed",
            truncated(e),
            generation,
            previous,
            now,
        ),
        None => condition(
            DEGRADED,
            false,
            "AsExpected",
            "the last apply succeeded",
            generation,
            previous,
            now,
        ),
    };
    let mut conditions = vec![ready, degraded];
    if let Some(d) = &agent.default_network {
        conditions.push(condition(
            DEFAULT_NETWORK,
            d.name.is_some(),
            d.reason,
            truncated(&d.message),
            generation,
            previous,
            now,
        ));
    }
    NodeNetworkStatus {
        observed_generation: generation,
        conditions,
        networks: agent.networks.clone(),
        bridges: agent.bridges.clone(),
        endpoints: Some(i64::try_from(agent.endpoints).unwrap_or(i64::MAX)),
        last_error: agent.last_error.as_deref().map(truncated),
        workloads: Vec::new(),
        policies: node_policies(agent),
        mirrors: agent.mirrors.clone(),
        forwards: node_forwards(agent),
        reservations: Vec::new(),
    }
}

/// Each port forward the agent installs or could not install as asked, with its targets and
/// its problems here.
pub fn node_forwards(agent: &AgentStatus) -> Vec<weft_crds::NodeForward> {
    let names: std::collections::BTreeSet<&String> = agent
        .forwards
        .keys()
        .chain(agent.forward_problems.keys())
        .collect();
    names
        .into_iter()
        .take(1024)
        .map(|forward| weft_crds::NodeForward {
            forward: forward.clone(),
            targets: agent
                .forwards
                .get(forward)
                .into_iter()
                .flatten()
                .take(16)
                .map(ToString::to_string)
                .collect(),
            // The schema's maxLength (characters).
            error: agent
                .forward_problems
                .get(forward)
                .map(|e| e.chars().take(1024).collect()),
        })
        .collect()
}

/// Each policy the agent enforces or could not enforce, with its interfaces and its problems
/// here.
pub fn node_policies(agent: &AgentStatus) -> Vec<weft_crds::NodePolicy> {
    let names: std::collections::BTreeSet<&String> = agent
        .policies
        .keys()
        .chain(agent.policy_problems.keys())
        .collect();
    names
        .into_iter()
        .map(|policy| weft_crds::NodePolicy {
            policy: policy.clone(),
            interfaces: agent
                .policies
                .get(policy)
                .map_or(0, |n| i32::try_from(*n).unwrap_or(i32::MAX)),
            error: agent.policy_problems.get(policy).map(|e| truncated(e)),
        })
        .collect()
}

/// Writes the newest status from `rx` to the NodeNetwork `node` (server-side apply of the
/// status subresource) until the sender is dropped.
async fn write_status(
    api: Api<NodeNetwork>,
    node: String,
    mut rx: watch::Receiver<Option<NodeNetworkStatus>>,
) {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    while rx.changed().await.is_ok() {
        let mut backoff = crate::backoff(MAX_STATUS_BACKOFF).build();
        loop {
            let Some(status) = rx.borrow_and_update().clone() else {
                break;
            };
            let body = serde_json::json!({
                "apiVersion": NodeNetwork::api_version(&()),
                "kind": NodeNetwork::kind(&()),
                "status": status,
            });
            match api.patch_status(&node, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    debug!(node = %node, "wrote the NodeNetwork status");
                    break;
                }
                Err(e) => {
                    let retry_in = backoff.next().unwrap_or(MAX_STATUS_BACKOFF);
                    warn!(node = %node, error = %crate::error_chain(&e), retry_in = ?retry_in, "cannot write the NodeNetwork status");
                    tokio::select! {
                        _ = tokio::time::sleep(retry_in) => {}
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::spec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// The API refuses an Event whose note is over 1024 bytes: a note of wide characters is
    /// cut by bytes, on a character boundary.
    #[test]
    fn an_event_note_is_cut_to_what_the_api_takes() {
        let note = "é".repeat(700);
        let cut = truncated_to(&note, MAX_NOTE);
        assert!(cut.len() <= 1024, "{} bytes", cut.len());
        assert!(cut.ends_with("é…"), "{cut}");
        assert_eq!(truncated_to("short", MAX_NOTE), "short");
    }

    #[test]
    fn node_blocks_parse_each_family_and_report_bad_ones() {
        let (blocks, problems) = node_blocks(
            "node-a",
            &spec(&[
                ("blue", Some("10.10.0.64/26"), Some("fd10::40/122")),
                ("green", Some("10.20.0.0/26"), None),
                ("swapped", Some("fd30::/122"), None),
                ("broken", Some("10.40.0.1/26"), Some("nonsense")),
                ("empty", None, None),
            ]),
        );
        assert_eq!(
            blocks["blue"],
            NodeBlocks {
                v4: Some("10.10.0.64/26".parse().unwrap()),
                v6: Some("fd10::40/122".parse().unwrap()),
            }
        );
        assert_eq!(blocks["green"].v4, Some("10.20.0.0/26".parse().unwrap()));
        assert_eq!(blocks["green"].v6, None);
        assert_eq!(
            blocks.keys().collect::<Vec<_>>(),
            ["blue", "green"],
            "networks without a usable block have none"
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("NodeNetwork node-a: spec.blocks[2].ipv4 (network swapped): ")
        );
        assert!(problems[0].contains("not an IPv4 block"));
        assert!(problems[1].contains("spec.blocks[3].ipv4 (network broken)"));
        assert!(problems[2].contains("spec.blocks[3].ipv6 (network broken)"));
    }

    fn agent(networks: &[&str], last_error: Option<&str>) -> AgentStatus {
        AgentStatus {
            node: "node-a".into(),
            networks: networks.iter().map(|s| (*s).to_owned()).collect(),
            bridges: vec!["wbr-blue".into()],
            endpoints: 4,
            last_error: last_error.map(str::to_owned),
            ..AgentStatus::default()
        }
    }

    #[test]
    fn each_policy_is_reported_with_its_interfaces_and_problems_here() {
        let mut a = agent(&["blue"], None);
        a.policies = [
            ("SegmentationPolicy shop/db".to_string(), 2),
            ("ClusterSegmentationPolicy lockdown".to_string(), 0),
        ]
        .into();
        a.policy_problems = [(
            "SegmentationPolicy shop/lost".to_string(),
            "spec.subject.networks[0]: Network lan does not exist".to_string(),
        )]
        .into();
        let got = node_policies(&a);
        assert_eq!(
            got.iter()
                .map(|p| (p.policy.as_str(), p.interfaces, p.error.is_some()))
                .collect::<Vec<_>>(),
            [
                ("ClusterSegmentationPolicy lockdown", 0, false),
                ("SegmentationPolicy shop/db", 2, false),
                ("SegmentationPolicy shop/lost", 0, true),
            ]
        );
    }

    #[test]
    fn each_port_forward_is_reported_with_its_targets_and_problems_here() {
        let mut a = agent(&["blue"], None);
        a.forwards = [(
            "shop/ssh".to_string(),
            vec!["10.10.0.5".parse().unwrap(), "fd10::5".parse().unwrap()],
        )]
        .into();
        a.forward_problems = [
            (
                "shop/ssh".to_string(),
                "spec.synProxy: without --syn-proxy".to_string(),
            ),
            ("shop/web".to_string(), "x".repeat(5000)),
        ]
        .into();
        let got = node_forwards(&a);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].forward, "shop/ssh");
        assert_eq!(got[0].targets, ["10.10.0.5", "fd10::5"]);
        assert_eq!(
            got[0].error.as_deref(),
            Some("spec.synProxy: without --syn-proxy")
        );
        // Not installed here at all, and its message cut to the schema's 1024 characters.
        assert!(got[1].targets.is_empty());
        assert_eq!(got[1].error.as_ref().map(|e| e.chars().count()), Some(1024));
    }

    fn find<'a>(s: &'a NodeNetworkStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn status_is_ready_when_every_block_of_the_spec_is_realized() {
        let t0 = jiff::Timestamp::from_second(100).unwrap();
        let s = node_network_status(
            &agent(&["blue"], None),
            &spec(&[("blue", Some("10.10.0.0/26"), None)]),
            Some(3),
            &[],
            t0,
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.networks, ["blue"]);
        assert_eq!(s.bridges, ["wbr-blue"]);
        assert_eq!(s.endpoints, Some(4));
        assert_eq!(s.last_error, None);
        let ready = find(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Realized")
        );
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(ready.last_transition_time, Time(t0));
        let degraded = find(&s, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("False", "AsExpected")
        );

        // Same outcome later: nothing changes, so the status compares equal (no write).
        let t1 = jiff::Timestamp::from_second(200).unwrap();
        let again = node_network_status(
            &agent(&["blue"], None),
            &spec(&[("blue", Some("10.10.0.0/26"), None)]),
            Some(3),
            &s.conditions,
            t1,
        );
        assert_eq!(again, s);
    }

    #[test]
    fn status_is_pending_with_the_reason_while_a_block_is_not_realized() {
        let mut a = agent(&["blue"], None);
        a.problems = vec![
            "Network green: attaching eth0 to wn-green was rolled back: the default gateway did not answer".into(),
            "NodeNetwork node-a: spec.blocks[2].ipv4 (network red): \"x\" is not a CIDR".into(),
            "Network other: unrelated".into(),
        ];
        let s = node_network_status(
            &a,
            &spec(&[
                ("blue", Some("10.10.0.0/26"), None),
                ("green", Some("10.20.0.0/26"), None),
                ("red", Some("x"), None),
            ]),
            Some(1),
            &[],
            jiff::Timestamp::from_second(100).unwrap(),
        );
        let ready = find(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Pending")
        );
        assert!(
            ready.message.starts_with("not realized yet: green, red ("),
            "{}",
            ready.message
        );
        assert!(ready.message.contains("is not a CIDR"), "{}", ready.message);
        assert!(ready.message.contains("rolled back"), "{}", ready.message);
        assert!(!ready.message.contains("unrelated"), "{}", ready.message);
        assert_eq!(find(&s, DEGRADED).status, "False");
    }

    #[test]
    fn a_failed_apply_is_degraded_and_not_ready_and_keeps_transition_times() {
        let t0 = jiff::Timestamp::from_second(100).unwrap();
        let t1 = jiff::Timestamp::from_second(200).unwrap();
        let ok = node_network_status(
            &agent(&["blue"], None),
            &spec(&[("blue", Some("10.10.0.0/26"), None)]),
            Some(2),
            &[],
            t0,
        );
        let failed = node_network_status(
            &agent(&["blue"], Some("nft: syntax error")),
            &spec(&[("blue", Some("10.10.0.0/26"), None)]),
            Some(2),
            &ok.conditions,
            t1,
        );
        assert_eq!(failed.last_error.as_deref(), Some("nft: syntax error"));
        for type_ in [READY, DEGRADED] {
            let c = find(&failed, type_);
            assert_eq!(c.reason, "ApplyFailed");
            assert_eq!(c.message, "nft: syntax error");
            assert_eq!(c.last_transition_time, Time(t1), "{type_} flipped");
        }
        assert_eq!(find(&failed, READY).status, "False");
        assert_eq!(find(&failed, DEGRADED).status, "True");
        let long = "x".repeat(MAX_MESSAGE * 2);
        let s = node_network_status(&agent(&[], Some(&long)), &spec(&[]), None, &[], t0);
        assert!(find(&s, READY).message.len() <= MAX_MESSAGE + '…'.len_utf8());
    }

    #[test]
    fn the_default_network_condition_says_which_and_why() {
        let t0 = jiff::Timestamp::from_second(100).unwrap();
        let mut a = agent(&["blue", "green"], None);
        a.default_network = Some(super::super::install::choose_default_network(
            None,
            &a.networks,
            &[],
        ));
        let s = node_network_status(&a, &spec(&[]), None, &[], t0);
        let c = find(&s, DEFAULT_NETWORK);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "First"));
        assert!(c.message.starts_with("blue, "), "{}", c.message);
        assert!(c.message.contains("--default-network"), "{}", c.message);
        let mut none = agent(&[], None);
        none.default_network = Some(super::super::install::choose_default_network(
            None,
            &[],
            &[],
        ));
        let s = node_network_status(&none, &spec(&[]), None, &[], t0);
        let c = find(&s, DEFAULT_NETWORK);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoNetwork")
        );
    }
}

//! The cluster controller (`weft-operator controller`).
//!
//! Four kube-runtime controllers share one [`Context`]:
//! - [`network`]: validates Networks, allocates per-node blocks ([`allocator`]) into the
//!   `NodeNetwork` of every node (server-side apply), writes Network status, and holds the
//!   `weft.dev/cleanup` finalizer until no agent realizes a deleted Network any more;
//! - [`portforward`]: validates PortForwards ([`validate`]) and writes their status;
//! - [`policy`]: writes the segmentation policies' status from what the agents report in
//!   their NodeNetwork status (workloads and nodes each applies to, problems).
//!
//! Every reconcile runs observe (reflector stores) → decide (pure: [`validate`],
//! [`allocator`]) → act (server-side apply with field manager [`FIELD_MANAGER`], Events).
//! Every replica computes; only the holder of the Lease ([`leader`]) acts.

pub mod allocator;
pub mod compact;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod network;
pub mod opts;
pub mod pods;
pub mod policy;
pub mod portforward;
pub mod slices;
pub mod status;
pub mod validate;

use crate::model::shared::LabelSets;
pub use error::Error;
pub use leader::Leadership;
pub use metrics::Metrics;

use backon::BackoffBuilder as _;
use compact::{
    Blocks, CompactNodeNetwork, Entry, InUse, Names, Published, Realized, keep_node_network,
};
use futures::{FutureExt, StreamExt, TryStreamExt, channel::mpsc};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller::Action, watcher};
use kube::{Api, Client, Resource};
use opts::ControllerOpts;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_crds::{
    ClusterSegmentationPolicy, Network, NodeNetwork, PortForward, SegmentationPolicy,
    TrafficMirror, WorkloadSlice,
};

/// The field manager of every server-side apply of the controller.
pub const FIELD_MANAGER: &str = "weft-controller";
/// The finalizer the controller puts on Networks.
pub const FINALIZER: &str = weft_crds::constants::NETWORK_FINALIZER;
/// Longest requeue delay after transient errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The reflector stores the controller observes.
#[derive(Clone)]
pub struct Stores {
    /// All Networks.
    pub networks: Store<Network>,
    /// All Nodes.
    pub nodes: Store<Node>,
    /// All NodeNetworks, as [`keep_node_network`] keeps them.
    pub node_networks: Store<CompactNodeNetwork>,
    /// All PortForwards.
    pub port_forwards: Store<PortForward>,
    /// All WorkloadSlices (kept as [`trim`] leaves them).
    pub slices: Store<WorkloadSlice>,
    /// How many WorkloadSlice deletions the watch has seen (a [`slices::Book`] read before
    /// one is read again: the store alone cannot tell a slice deleted from one not yet seen).
    pub slice_deletions: Arc<AtomicU64>,
    /// The pods bound to nodes, which the nodes' publications are checked against.
    pub pods: Arc<tokio::sync::RwLock<pods::PodDirectory>>,
}

/// Shared state of the reconcilers.
pub struct Context {
    /// The API client (used only by the act steps).
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Whether this replica may write.
    pub leader: Arc<dyn Leadership>,
    /// What the controller observes.
    pub stores: Stores,
    /// Metrics.
    pub metrics: Metrics,
    /// NodeNetwork specs this replica applied, newer than the store until its watch catches up.
    /// Dropped once the store shows the same spec.
    written: Mutex<BTreeMap<String, Arc<Blocks>>>,
    /// The last accepted version of each Network (see `network::Observed::accepted`).
    accepted: Mutex<BTreeMap<String, Arc<weft_crds::Network>>>,
    /// Serializes allocate + apply, so two reconciles never allocate from the same snapshot.
    allocation: tokio::sync::Mutex<()>,
    /// The last decision and the fingerprint of its inputs ([`network::allocation_inputs`]):
    /// reused while they are unchanged, so the events that change no input (the agents'
    /// status reports, Node heartbeats, the Networks' own status) cost no allocation pass.
    decided: Mutex<Option<(u64, Arc<network::Decision>)>>,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, backon::ExponentialBackoff>>,
    /// Per Network, what this replica keeps of its WorkloadSlices between reconciles.
    slice_books: Mutex<HashMap<String, slices::Book>>,
    /// Per Network, what its WorkloadSlices last left out (published, not vouched for).
    refused: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Context {
    /// A context; `leader` decides whether this replica writes.
    pub fn new(
        client: Client,
        stores: Stores,
        leader: Arc<dyn Leadership>,
        metrics: Metrics,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            leader,
            stores,
            metrics,
            written: Mutex::default(),
            accepted: Mutex::default(),
            allocation: tokio::sync::Mutex::new(()),
            decided: Mutex::default(),
            failures: Mutex::default(),
            slice_books: Mutex::default(),
            refused: Mutex::default(),
        }
    }

    fn is_leader(&self) -> bool {
        let leader = self.leader.is_leader();
        self.metrics.set_leader(leader);
        if !leader {
            // Another replica writes now; what we wrote may be outdated.
            if let Ok(mut w) = self.written.lock() {
                w.clear();
            }
            if let Ok(mut b) = self.slice_books.lock() {
                b.clear();
            }
        }
        leader
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// The delay before retrying `key` after a transient error: 1 s, 2 s, 4 s, ... up to
    /// [`MAX_BACKOFF`].
    pub fn backoff(&self, key: &str) -> Duration {
        match self.failures.lock() {
            Ok(mut f) => f
                .entry(key.to_owned())
                .or_insert_with(|| crate::backoff(MAX_BACKOFF).build())
                .next()
                .unwrap_or(MAX_BACKOFF),
            Err(_) => Duration::from_secs(1),
        }
    }
}

fn object_key<K: Resource>(obj: &K) -> String {
    format!(
        "{}/{}",
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// `error_policy` of both controllers: transient errors requeue with exponential backoff;
/// permanent ones were reported (status, Warning event) and wait for a change.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&());
    warn!(kind = %kind, object = %object_key(obj.as_ref()), reason = err.reason(), error = %crate::error_chain(err), "reconcile failed");
    if err.is_transient() {
        Action::requeue(ctx.backoff(&object_key(obj.as_ref())))
    } else {
        Action::await_change()
    }
}

/// A stream that yields `()` whenever `rx` gets a message (for `reconcile_all_on`).
fn trigger_stream(rx: mpsc::UnboundedReceiver<()>) -> impl futures::Stream<Item = ()> + Send {
    rx
}

/// What the controller keeps of a watched object: all but its managed fields, which it never
/// reads.
fn trim<K: Resource>(mut object: K) -> K {
    object.meta_mut().managed_fields = None;
    object
}

/// Sends `()` to `triggers` for every object `stream` yields; logs its errors.
async fn forward<K>(
    stream: impl futures::Stream<Item = Result<K, watcher::Error>>,
    triggers: Vec<mpsc::UnboundedSender<()>>,
) {
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            warn!(error = %crate::error_chain(&e), "watch failed; retrying");
            continue;
        }
        for t in &triggers {
            let _ = t.unbounded_send(());
        }
    }
}

/// What a Node event changes of what the Networks see of the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    /// Nothing (a status heartbeat).
    Nothing,
    /// The Node was added, deleted or re-created (another uid).
    Membership,
    /// The Node was relabelled; its labels before.
    Labels(BTreeMap<String, String>),
}

/// What a Node event changes for the Networks ([`NodeChange`]). `last` remembers each Node's
/// uid and labels.
pub fn node_changed(
    last: &mut HashMap<String, (Option<String>, BTreeMap<String, String>)>,
    node: &Node,
    deleted: bool,
) -> NodeChange {
    let name = node.metadata.name.clone().unwrap_or_default();
    if deleted {
        last.remove(&name);
        return NodeChange::Membership;
    }
    let now = (
        node.metadata.uid.clone(),
        node.metadata.labels.clone().unwrap_or_default(),
    );
    match last.insert(name, now.clone()) {
        None => NodeChange::Membership,
        Some((uid, _)) if uid != now.0 => NodeChange::Membership,
        Some((_, labels)) if labels != now.1 => NodeChange::Labels(labels),
        Some(_) => NodeChange::Nothing,
    }
}

/// The Networks a relabelling of a node (from `before` to `after`) concerns: those whose
/// `nodeSelector` selects it before and not after or the other way round (a Network without
/// one selects every node, whatever its labels), and those whose status says they are not
/// valid (the allocation may hold their last accepted spec, whose selector may differ).
pub fn reselected(
    networks: &[Arc<Network>],
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    networks
        .iter()
        .filter(|net| {
            let invalid = net.status.as_ref().is_some_and(|s| {
                status::find(&s.conditions, status::VALID).is_some_and(|c| c.status == "False")
            });
            invalid
                || allocator::selects_labels(&net.spec, before)
                    != allocator::selects_labels(&net.spec, after)
        })
        .filter_map(|net| net.metadata.name.clone())
        .collect()
}

/// A kind the controller watches: a static Kubernetes type its watches decode and share.
pub trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// The watch event `event` with each object as `keep` makes it.
fn kept<K, T>(event: watcher::Event<K>, mut keep: impl FnMut(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(keep(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(keep(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(keep(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Runs a reflector for `api` into a new store of what `keep` makes of each object, and calls
/// `on_event` with every object applied or deleted (and whether it was deleted), and with
/// `None` at the end of every full list (a relist may have missed deletions); watch errors are
/// logged and retried.
fn reflect_with<K, T>(
    api: Api<K>,
    mut keep: impl FnMut(K) -> T + Send + 'static,
    mut on_event: impl FnMut(Option<(&T, bool)>) + Send + 'static,
) -> (Store<T>, impl Future<Output = ()> + Send)
where
    K: Watched,
    T: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).map_ok(move |e| kept(e, &mut keep)),
    )
    .default_backoff();
    let run = async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match &event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    on_event(Some((o, false)));
                }
                Ok(watcher::Event::Delete(o)) => on_event(Some((o, true))),
                Ok(watcher::Event::InitDone) => on_event(None),
                Ok(watcher::Event::Init) => {}
                Err(e) => warn!(error = %crate::error_chain(e), "watch failed; retrying"),
            }
        }
    };
    (reader, run)
}

/// Runs a reflector of Nodes (kept as [`trim`] leaves them). A Node added, deleted or
/// re-created ([`node_changed`]) sends `()` to `triggers`, and so does the end of every full
/// list; a relabelled Node wakes the Network controller for the Networks of `networks` it
/// concerns ([`reselected`]) only.
fn reflect_nodes(
    api: Api<Node>,
    networks: Store<Network>,
    network_refs: mpsc::UnboundedSender<ObjectRef<Network>>,
    triggers: Vec<mpsc::UnboundedSender<()>>,
) -> (Store<Node>, impl Future<Output = ()> + Send) {
    let mut last = HashMap::new();
    reflect_with(api, trim, move |event| {
        let change = match event {
            Some((node, deleted)) => node_changed(&mut last, node, deleted),
            None => NodeChange::Membership,
        };
        match change {
            NodeChange::Nothing => {}
            NodeChange::Membership => {
                for t in &triggers {
                    let _ = t.unbounded_send(());
                }
            }
            NodeChange::Labels(before) => {
                let Some((node, _)) = event else { return };
                let after = node.metadata.labels.clone().unwrap_or_default();
                for network in reselected(&networks.state(), &before, &after) {
                    let _ = network_refs.unbounded_send(ObjectRef::new(&network));
                }
            }
        }
    })
}

/// The Networks a NodeNetwork names: those with a block in its spec and those its agent reports
/// realized.
pub fn networks_named(nn: &CompactNodeNetwork) -> BTreeSet<String> {
    names_of(nn.spec.entries(), &nn.realized)
}

fn names_of(entries: &[Entry], realized: &Realized) -> BTreeSet<String> {
    entries
        .iter()
        .map(|b| &*b.network)
        .chain(realized.names())
        .map(str::to_owned)
        .collect()
}

/// The Networks whose entry in a NodeNetwork's spec came, went or changed from `old` to `new`.
fn entries_changed(old: &[Entry], new: &[Entry]) -> BTreeSet<String> {
    let old: HashMap<&str, &Entry> = old.iter().map(|e| (&*e.network, e)).collect();
    let new: HashMap<&str, &Entry> = new.iter().map(|e| (&*e.network, e)).collect();
    old.keys()
        .chain(new.keys())
        .filter(|n| old.get(*n) != new.get(*n))
        .map(|n| (*n).to_owned())
        .collect()
}

/// What [`networks_touched`] remembers of a NodeNetwork: its spec's entries, its agent's list
/// of the Networks it realizes and the addresses its workloads hold per Network (all shared
/// with the store, not copied).
pub type Named = (Arc<[Entry]>, Realized, InUse);

/// The Networks whose status a NodeNetwork event may change. A NodeNetwork seen for the first
/// time, or deleted, touches every Network it names (blocks in its spec, or realized by its
/// agent) and named before. Otherwise only what changed: the Networks whose entry in the spec
/// came, went or changed (the controller's own writes: one Network added touches that Network
/// alone, not every Network on each node), those the agent began or stopped realizing, and
/// those whose workloads' addresses on the node changed in number (a pod started or gone: its
/// Network's addresses in use). `last` remembers each NodeNetwork's last event; a deleted one
/// is forgotten.
pub fn networks_touched(
    last: &mut HashMap<String, Named>,
    nn: &CompactNodeNetwork,
    deleted: bool,
) -> BTreeSet<String> {
    let name = nn.metadata.name.clone().unwrap_or_default();
    let before = if deleted {
        last.remove(&name)
    } else {
        last.insert(
            name,
            (
                nn.spec.shared_entries(),
                nn.realized.clone(),
                nn.in_use.clone(),
            ),
        )
    };
    let (entries, realized, was_in_use) = match before {
        Some(b) if !deleted => b,
        before => {
            let mut touched = networks_named(nn);
            if let Some((entries, realized, _)) = before {
                touched.extend(names_of(&entries, &realized));
            }
            return touched;
        }
    };
    let mut touched = entries_changed(&entries, nn.spec.entries());
    let was: BTreeSet<&str> = realized.names().collect();
    let is: BTreeSet<&str> = nn.realized.names().collect();
    touched.extend(was.symmetric_difference(&is).map(|n| (*n).to_owned()));
    touched.extend(was_in_use.changed(&nn.in_use).map(str::to_owned));
    touched
}

/// What [`slices_touched`] remembers of a NodeNetwork: its spec's entries and the
/// fingerprints of what its agent publishes (shared with the store, not copied).
pub type PublishedBy = (Arc<[Entry]>, Published);

/// The Networks whose WorkloadSlices a NodeNetwork event may change: those whose entries its
/// agent publishes changed (a pod started, gone or relabelled there), and those whose block on
/// the node changed (what the node may vouch for). A NodeNetwork seen for the first time, or
/// deleted, touches every Network it publishes entries of. `last` remembers each NodeNetwork's
/// last event; a deleted one is forgotten.
pub fn slices_touched(
    last: &mut HashMap<String, PublishedBy>,
    nn: &CompactNodeNetwork,
    deleted: bool,
) -> BTreeSet<String> {
    let name = nn.metadata.name.clone().unwrap_or_default();
    let empty = Published::default();
    let before = if deleted {
        last.remove(&name)
    } else {
        last.insert(name, (nn.spec.shared_entries(), nn.published.clone()))
    };
    let (entries, published) = match &before {
        Some((entries, published)) => (&entries[..], published),
        None => (&[][..], &empty),
    };
    let now = if deleted { &empty } else { &nn.published };
    let mut touched: BTreeSet<String> = published.changed(now).map(str::to_owned).collect();
    if !deleted && before.is_some() {
        touched.extend(entries_changed(entries, nn.spec.entries()));
    }
    touched
}

/// Runs a reflector of NodeNetworks (kept as [`keep_node_network`] makes them, the Network
/// names shared between all of them); every change wakes the Network controller for the
/// Networks it touches ([`networks_touched`]), the WorkloadSlice controller for the Networks
/// whose published entries it changes ([`slices_touched`]), and the other controllers for the objects whose
/// entry in the agent's report changed ([`reports_touched`]); the end of every full list sends
/// `()` to `relisted`.
fn reflect_node_networks(
    api: Api<NodeNetwork>,
    networks: mpsc::UnboundedSender<ObjectRef<Network>>,
    slices: mpsc::UnboundedSender<ObjectRef<Network>>,
    reported: ReportedRefs,
    relisted: Vec<mpsc::UnboundedSender<()>>,
    label_sets: Arc<std::sync::Mutex<LabelSets>>,
) -> (Store<CompactNodeNetwork>, impl Future<Output = ()> + Send) {
    let mut last = HashMap::new();
    let mut last_published = HashMap::new();
    let mut last_reports = HashMap::new();
    let mut names = Names::default();
    let keep = move |nn| {
        let mut labels = label_sets.lock().unwrap_or_else(|e| e.into_inner());
        keep_node_network(nn, &mut names, &mut labels)
    };
    reflect_with(api, keep, move |event| {
        if let Some((nn, deleted)) = event {
            for network in networks_touched(&mut last, nn, deleted) {
                let _ = networks.unbounded_send(ObjectRef::new(&network));
            }
            for network in slices_touched(&mut last_published, nn, deleted) {
                let _ = slices.unbounded_send(ObjectRef::new(&network));
            }
            reported.wake(&reports_touched(&mut last_reports, nn, deleted));
        } else {
            // A full list is in: NodeNetworks deleted while the watch was away were never seen
            // go, so every object reported on is reconciled once.
            for t in &relisted {
                let _ = t.unbounded_send(());
            }
        }
    })
}

/// How many objects a shared watch holds for its `Controller` before it waits for it.
const SHARED_BUFFER: usize = 1024;

/// The one watch of a kind that has a `Controller`: it fills a shared store, hands every applied
/// object to the `Controller` (the returned [`Shared`]), sends `()` to `triggers` on every
/// change, and turns `listed` true once the first full list is in.
fn watch_shared<K>(
    api: Api<K>,
    triggers: Vec<mpsc::UnboundedSender<()>>,
    listed: watch::Sender<bool>,
    controllers: usize,
) -> (Shared<K>, impl Future<Output = ()> + Send)
where
    K: Watched,
{
    let (store, writer) = reflector::store_shared::<K>(SHARED_BUFFER);
    let shared = Shared {
        store,
        // A writer made by `store_shared` always hands out subscriptions. Each is read by one
        // `Controller`: one not read would stop the watch once the buffer is full.
        events: (0..controllers.max(1))
            .filter_map(|_| writer.subscribe())
            .collect(),
    };
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect_shared(writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                listed.send_replace(true);
            }
        })
        .touched_objects();
    (shared, forward(stream, triggers))
}

/// A kind's shared watch, as its `Controller` reads it.
pub struct Shared<K: Resource<DynamicType = ()> + Clone + 'static> {
    /// Every object of the kind.
    pub store: Store<K>,
    /// The objects as they are applied, one subscription per `Controller` to run on them.
    pub events: Vec<reflector::ReflectHandle<K>>,
}

impl<K> Shared<K>
where
    K: Watched,
{
    /// A `Controller` of the kind on this watch (no watch of its own), for each subscription.
    pub fn controllers(self) -> Vec<Controller<K>> {
        let store = self.store;
        self.events
            .into_iter()
            .map(|events| Controller::for_shared_stream(events, store.clone()))
            .collect()
    }
}

/// The channels that wake the controllers to reconcile every object of their kind.
pub struct Triggers {
    /// Wakes the Network controller for every Network.
    pub networks: mpsc::UnboundedSender<()>,
    /// Wakes the Network controller for the Networks named.
    pub network_refs: mpsc::UnboundedSender<ObjectRef<Network>>,
    /// Wakes the WorkloadSlice controller for every Network.
    pub slices: mpsc::UnboundedSender<()>,
    /// Wakes the WorkloadSlice controller for the Networks named.
    pub slice_refs: mpsc::UnboundedSender<ObjectRef<Network>>,
    /// Wakes the PortForward controller.
    pub port_forwards: mpsc::UnboundedSender<()>,
    /// Wakes the ClusterSegmentationPolicy controller.
    pub cluster_policies: mpsc::UnboundedSender<()>,
    /// Wakes the SegmentationPolicy controller.
    pub policies: mpsc::UnboundedSender<()>,
    /// Wakes the TrafficMirror controller.
    pub mirrors: mpsc::UnboundedSender<()>,
    /// Wake the controllers of the objects the agents report on, for the objects named.
    pub reported: ReportedRefs,
}

/// Senders that wake the controllers of the objects an agent reports on in its NodeNetwork
/// status (besides Networks), for the objects named.
#[derive(Clone)]
pub struct ReportedRefs {
    /// ClusterSegmentationPolicies.
    pub cluster_policies: mpsc::UnboundedSender<ObjectRef<ClusterSegmentationPolicy>>,
    /// SegmentationPolicies.
    pub policies: mpsc::UnboundedSender<ObjectRef<SegmentationPolicy>>,
    /// TrafficMirrors.
    pub mirrors: mpsc::UnboundedSender<ObjectRef<TrafficMirror>>,
    /// PortForwards.
    pub port_forwards: mpsc::UnboundedSender<ObjectRef<PortForward>>,
}

impl ReportedRefs {
    /// Wakes each object of `touched`. Keys the controller cannot read as an object of their
    /// kind (an agent's report is not trusted to be well formed) wake nothing.
    fn wake(&self, touched: &Reported) {
        for key in &touched.policies {
            if let Some(name) = key.strip_prefix("ClusterSegmentationPolicy ") {
                let _ = self.cluster_policies.unbounded_send(ObjectRef::new(name));
            } else if let Some((ns, name)) = key
                .strip_prefix("SegmentationPolicy ")
                .and_then(|k| k.split_once('/'))
            {
                let _ = self
                    .policies
                    .unbounded_send(ObjectRef::new(name).within(ns));
            }
        }
        for key in &touched.mirrors {
            if let Some((ns, name)) = key.split_once('/') {
                let _ = self.mirrors.unbounded_send(ObjectRef::new(name).within(ns));
            }
        }
        for key in &touched.forwards {
            if let Some((ns, name)) = key.split_once('/') {
                let _ = self
                    .port_forwards
                    .unbounded_send(ObjectRef::new(name).within(ns));
            }
        }
    }
}

/// Keys of the objects an agent reports on, by kind: `ClusterSegmentationPolicy <name>` and
/// `SegmentationPolicy <namespace>/<name>` (`status.policies`), `<namespace>/<name>` of
/// TrafficMirrors (`status.mirrors`) and of PortForwards (`status.forwards`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Policies.
    pub policies: BTreeSet<String>,
    /// TrafficMirrors.
    pub mirrors: BTreeSet<String>,
    /// PortForwards.
    pub forwards: BTreeSet<String>,
}

/// What [`reports_touched`] remembers of a NodeNetwork's status: its agent's reports on
/// policies, mirrors and PortForwards.
#[derive(Debug, Default, Clone)]
pub struct Reports {
    policies: Vec<weft_crds::NodePolicy>,
    mirrors: Vec<weft_crds::NodeMirror>,
    forwards: Vec<weft_crds::NodeForward>,
}

/// The policies, mirrors and PortForwards whose status a NodeNetwork event may change: those
/// whose entry in its agent's report came, went or changed (a deleted NodeNetwork: every one it
/// reported on). A pod's start changes the node's workloads and count of endpoints but, unless
/// a policy applies to it, no such entry: it wakes none of them. `last` remembers each
/// NodeNetwork's last report; a deleted one is forgotten.
pub fn reports_touched(
    last: &mut HashMap<String, Reports>,
    nn: &CompactNodeNetwork,
    deleted: bool,
) -> Reported {
    let name = nn.metadata.name.clone().unwrap_or_default();
    let now = match (&nn.status, deleted) {
        (Some(s), false) => Reports {
            policies: s.policies.clone(),
            mirrors: s.mirrors.clone(),
            forwards: s.forwards.clone(),
        },
        _ => Reports::default(),
    };
    let before = if deleted {
        last.remove(&name).unwrap_or_default()
    } else {
        last.insert(name, now.clone()).unwrap_or_default()
    };
    Reported {
        policies: changed_keys(&before.policies, &now.policies, |p| &p.policy),
        mirrors: changed_keys(&before.mirrors, &now.mirrors, |m| &m.mirror),
        forwards: changed_keys(&before.forwards, &now.forwards, |f| &f.forward),
    }
}

/// The keys of the entries that are in `before` or `after` but not equal in both.
fn changed_keys<T: PartialEq>(
    before: &[T],
    after: &[T],
    key: fn(&T) -> &String,
) -> BTreeSet<String> {
    let old: HashMap<&str, &T> = before.iter().map(|e| (key(e).as_str(), e)).collect();
    let new: HashMap<&str, &T> = after.iter().map(|e| (key(e).as_str(), e)).collect();
    old.keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| (*k).to_owned())
        .collect()
}

/// What the controller watches: the Node and NodeNetwork stores, and whether the watches of
/// Networks and PortForwards (which their `Controller`s share, see [`observe_cluster`]) have
/// had their first full list.
#[derive(Clone)]
pub struct Observation {
    /// All Nodes.
    pub nodes: Store<Node>,
    /// All NodeNetworks, as [`keep_node_network`] keeps them.
    pub node_networks: Store<CompactNodeNetwork>,
    /// All WorkloadSlices.
    pub slices: Store<WorkloadSlice>,
    /// How many WorkloadSlice deletions the watch has seen.
    pub slice_deletions: Arc<AtomicU64>,
    /// The pods bound to nodes ([`pods`]).
    pub pods: Arc<tokio::sync::RwLock<pods::PodDirectory>>,
    /// True once the pod watch has listed every pod bound to a node.
    pub pods_listed: watch::Receiver<bool>,
    /// True once the Network watch has listed every Network.
    pub networks_listed: watch::Receiver<bool>,
    /// True once the PortForward watch has listed every PortForward.
    pub port_forwards_listed: watch::Receiver<bool>,
}

/// Starts the watches of the [`Observation`]; every change wakes the controllers that depend
/// on it. The returned future runs them all.
///
/// Readiness never waits on a `Controller`'s store: kube-runtime's `Store::wait_until_ready`
/// wakes only the last task that polled it, and the `Controller`'s applier waits on its store,
/// so a second waiter may never see it become ready. The Network and PortForward watches
/// report their first full list on channels of their own instead.
///
/// One watch per kind: the Network and PortForward `Controller`s run on the watches made here
/// (the returned [`Shared`]s), not on watches of their own.
pub fn observe_cluster(
    client: &Client,
    triggers: &Triggers,
) -> (
    Observation,
    Shared<Network>,
    Shared<PortForward>,
    impl Future<Output = ()> + Send + use<>,
) {
    // The workloads' label sets, kept once for the NodeNetworks' statuses and the slices (which
    // copy them) together.
    let label_sets = Arc::new(std::sync::Mutex::new(LabelSets::default()));
    // A NodeNetwork's change concerns the Networks it names (their blocks there, the agent's
    // report of them): only those are reconciled, not every Network. The agents' reports are
    // the policies', mirrors' and PortForwards' status too: only those whose entry changed.
    let (node_networks, nn_fut) = reflect_node_networks(
        Api::<NodeNetwork>::all(client.clone()),
        triggers.network_refs.clone(),
        triggers.slice_refs.clone(),
        triggers.reported.clone(),
        vec![
            triggers.slices.clone(),
            triggers.cluster_policies.clone(),
            triggers.policies.clone(),
            triggers.mirrors.clone(),
            triggers.port_forwards.clone(),
        ],
        label_sets.clone(),
    );
    // Network changes re-check every Network (overlaps) and every PortForward.
    let (networks_tx, networks_listed) = watch::channel(false);
    let (networks, net_fut) = watch_shared(
        Api::<Network>::all(client.clone()),
        vec![triggers.networks.clone(), triggers.port_forwards.clone()],
        networks_tx,
        2,
    );
    // Nodes matter to Networks by their names, uids and labels (node selectors): a Node's
    // status heartbeat wakes no Network, a relabelled one only the Networks whose selection
    // of it changes.
    let (nodes, nodes_fut) = reflect_nodes(
        Api::<Node>::all(client.clone()),
        networks.store.clone(),
        triggers.network_refs.clone(),
        vec![triggers.networks.clone()],
    );
    let (port_forwards_tx, port_forwards_listed) = watch::channel(false);
    let (port_forwards, pf_fut) = watch_shared(
        Api::<PortForward>::all(client.clone()),
        vec![triggers.port_forwards.clone()],
        port_forwards_tx,
        1,
    );
    // A WorkloadSlice deleted (or changed by another writer) is written again; a full list
    // checks every Network's.
    let slice_deletions = Arc::new(AtomicU64::new(0));
    let (slices, slices_fut) = {
        let (refs, all) = (triggers.slice_refs.clone(), triggers.slices.clone());
        let deletions = slice_deletions.clone();
        let label_sets = label_sets.clone();
        reflect_with(
            Api::<WorkloadSlice>::all(client.clone()),
            move |slice| {
                let mut slice = trim(slice);
                let mut labels = label_sets.lock().unwrap_or_else(|e| e.into_inner());
                labels.share_slice(&mut slice);
                slice
            },
            move |event| match event {
                Some((slice, deleted)) => {
                    if deleted {
                        deletions.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(network) = slices::network_of(slice) {
                        let _ = refs.unbounded_send(ObjectRef::new(&network));
                    }
                }
                None => {
                    let _ = all.unbounded_send(());
                }
            },
        )
    };
    // A pod bound, relabelled, moved or deleted changes what its node may vouch for.
    let pod_directory = Arc::new(tokio::sync::RwLock::new(pods::PodDirectory::default()));
    let (pods_tx, pods_listed) = watch::channel(false);
    let pods_fut = watch_pods(
        Api::<Pod>::all(client.clone()),
        pod_directory.clone(),
        node_networks.clone(),
        (triggers.slice_refs.clone(), triggers.slices.clone()),
        label_sets,
        pods_tx,
    );
    let observation = Observation {
        nodes,
        node_networks,
        slices,
        slice_deletions,
        pods: pod_directory,
        pods_listed,
        networks_listed,
        port_forwards_listed,
    };
    let run = async move {
        futures::future::join(
            futures::future::join5(nodes_fut, nn_fut, net_fut, pf_fut, slices_fut),
            pods_fut,
        )
        .await;
    };
    (observation, networks, port_forwards, run)
}

/// Watches the pods bound to nodes into `directory` (as [`pods::facts_of`] keeps them, the
/// label sets shared through `label_sets`). A pod whose node or labels change, or that is
/// bound or deleted, wakes the WorkloadSlice controller (`slices.0`) for the Networks its
/// nodes publish entries of (in `node_networks`); a full list wakes it for every Network
/// (`slices.1`) and turns `listed` true. Status updates, most of a pod's events, wake nothing.
async fn watch_pods(
    api: Api<Pod>,
    directory: Arc<tokio::sync::RwLock<pods::PodDirectory>>,
    node_networks: Store<CompactNodeNetwork>,
    slices: (
        mpsc::UnboundedSender<ObjectRef<Network>>,
        mpsc::UnboundedSender<()>,
    ),
    label_sets: Arc<std::sync::Mutex<LabelSets>>,
    listed: watch::Sender<bool>,
) {
    // Pods not yet scheduled are no node's.
    let config = watcher::Config::default().fields("spec.nodeName!=");
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut building: Option<crate::model::peers::Pods> = None;
    let wake = |nodes: BTreeSet<String>| {
        for node in nodes {
            if let Some(nn) = node_networks.get(&ObjectRef::new(&node)) {
                for network in nn.published.networks() {
                    let _ = slices.0.unbounded_send(ObjectRef::new(network));
                }
            }
        }
    };
    let mut nodes = crate::model::shared::Names::default();
    let mut facts = |pod: &Pod| {
        let mut labels = label_sets.lock().unwrap_or_else(|e| e.into_inner());
        pods::facts_of(pod, &mut nodes, &mut labels)
    };
    let id = |pod: &Pod| {
        (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        )
    };
    // Departed pods are forgotten once their grace is over (see [`pods::DEPARTED_GRACE`]).
    let mut expiry = tokio::time::interval(pods::DEPARTED_GRACE / 6);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(event) => event,
                None => break,
            },
            _ = expiry.tick() => {
                let changed = directory.write().await.expire(std::time::Instant::now());
                wake(changed);
                continue;
            }
        };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "pod watch failed; retrying");
                continue;
            }
        };
        // The directory is locked only to change it (a full list is built beside it), and only
        // for the change itself.
        match event {
            watcher::Event::Init => building = Some(Default::default()),
            watcher::Event::InitApply(pod) => {
                if let (Some(all), Some((ns, name, f))) = (building.as_mut(), facts(&pod)) {
                    all.insert(&ns, &name, f);
                }
            }
            watcher::Event::InitDone => {
                let all = building.take().unwrap_or_default();
                // Every Network is woken below.
                let _ = directory
                    .write()
                    .await
                    .relist(all, std::time::Instant::now());
                listed.send_replace(true);
                let _ = slices.1.unbounded_send(());
            }
            watcher::Event::Apply(pod) => {
                let (ns, name) = id(&pod);
                let now = facts(&pod).map(|(_, _, f)| f);
                let changed =
                    directory
                        .write()
                        .await
                        .apply(&ns, &name, now, std::time::Instant::now());
                wake(changed);
            }
            watcher::Event::Delete(pod) => {
                let (ns, name) = id(&pod);
                let changed =
                    directory
                        .write()
                        .await
                        .apply(&ns, &name, None, std::time::Instant::now());
                wake(changed);
            }
        }
    }
}

/// A watch of [`observe_cluster`] stopped before its first full list.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} watch stopped before its first full list")]
pub struct WatchStopped {
    /// The kind watched.
    pub kind: &'static str,
}

/// Resolves once every watch of `observation` has had its first full list (what `/readyz`
/// reports).
pub async fn caches_synced(observation: &Observation) -> Result<(), WatchStopped> {
    let stopped = |kind| WatchStopped { kind };
    observation
        .nodes
        .wait_until_ready()
        .await
        .map_err(|_| stopped("Node"))?;
    observation
        .node_networks
        .wait_until_ready()
        .await
        .map_err(|_| stopped("NodeNetwork"))?;
    observation
        .slices
        .wait_until_ready()
        .await
        .map_err(|_| stopped("WorkloadSlice"))?;
    observation
        .pods_listed
        .clone()
        .wait_for(|l| *l)
        .await
        .map_err(|_| stopped("Pod"))?;
    observation
        .networks_listed
        .clone()
        .wait_for(|l| *l)
        .await
        .map_err(|_| stopped("Network"))?;
    observation
        .port_forwards_listed
        .clone()
        .wait_for(|l| *l)
        .await
        .map_err(|_| stopped("PortForward"))?;
    Ok(())
}

/// Runs the controller until SIGTERM/SIGINT.
/// How many objects of one kind the controller reconciles at once.
const RECONCILE_CONCURRENCY: u16 = 16;

pub async fn run(opts: ControllerOpts) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(metrics::serve(
        opts.metrics_addr,
        Arc::new(registry),
        ready.clone(),
    ));

    // The replica joins the election once its caches are synced (`leader::Elector::run`).
    // SIGTERM or SIGINT: the Lease is released at once (the standby takes over within about a
    // second), while the controllers below finish what they are doing without writing.
    let (synced_tx, mut synced_rx) = watch::channel(false);
    let (leader_rx, lease_task) = leader::elect(
        client.clone(),
        &opts.lease_namespace,
        &opts.lease_name,
        &opts.identity,
        async move {
            let _ = synced_rx.wait_for(|s| *s).await;
        },
        shutdown_signal(),
    );
    info!(identity = %opts.identity, lease = %format!("{}/{}", opts.lease_namespace, opts.lease_name), "standing for the leader election once the caches are synced");

    let (net_tx, net_rx) = mpsc::unbounded();
    let (net_ref_tx, net_ref_rx) = mpsc::unbounded();
    let (ws_tx, ws_rx) = mpsc::unbounded();
    let (ws_ref_tx, ws_ref_rx) = mpsc::unbounded();
    let (pf_tx, pf_rx) = mpsc::unbounded();
    let (csp_tx, csp_rx) = mpsc::unbounded();
    let (sp_tx, sp_rx) = mpsc::unbounded();
    let (tm_tx, tm_rx) = mpsc::unbounded();
    let (pf_ref_tx, pf_ref_rx) = mpsc::unbounded();
    let (csp_ref_tx, csp_ref_rx) = mpsc::unbounded();
    let (sp_ref_tx, sp_ref_rx) = mpsc::unbounded();
    let (tm_ref_tx, tm_ref_rx) = mpsc::unbounded();
    // Leadership gained: reconcile everything.
    let notify = {
        let mut rx = leader_rx.clone();
        let (net_tx, pf_tx, ws_tx) = (net_tx.clone(), pf_tx.clone(), ws_tx.clone());
        let (csp_tx, sp_tx, tm_tx) = (csp_tx.clone(), sp_tx.clone(), tm_tx.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if *rx.borrow() {
                    info!("became leader");
                    let _ = net_tx.unbounded_send(());
                    let _ = ws_tx.unbounded_send(());
                    let _ = pf_tx.unbounded_send(());
                    let _ = csp_tx.unbounded_send(());
                    let _ = sp_tx.unbounded_send(());
                    let _ = tm_tx.unbounded_send(());
                } else {
                    warn!("lost leadership; writes stop");
                }
            }
        })
    };
    let triggers = Triggers {
        networks: net_tx.clone(),
        network_refs: net_ref_tx,
        slices: ws_tx,
        slice_refs: ws_ref_tx,
        port_forwards: pf_tx.clone(),
        cluster_policies: csp_tx.clone(),
        policies: sp_tx.clone(),
        mirrors: tm_tx.clone(),
        reported: ReportedRefs {
            cluster_policies: csp_ref_tx,
            policies: sp_ref_tx,
            mirrors: tm_ref_tx,
            port_forwards: pf_ref_tx,
        },
    };
    let (observation, networks, port_forwards, observing) = observe_cluster(&client, &triggers);
    tokio::spawn(observing);

    // At most `RECONCILE_CONCURRENCY` reconciles of a kind at once: a thousand Networks whose
    // status all change (a node joined) are written a few at a time instead of all together,
    // which made the API server time out (504) and the controller retry.
    let config = kube::runtime::controller::Config::default()
        .debounce(Duration::from_millis(500))
        .concurrency(RECONCILE_CONCURRENCY);
    let shared = |kind| anyhow::anyhow!("the {kind} watch is not shared");
    let mut net_controllers = networks.controllers().into_iter();
    let net_controller = net_controllers
        .next()
        .ok_or_else(|| shared("Network"))?
        .with_config(config.clone());
    // The WorkloadSlices carry a pod's start to the other nodes' policy groups: no debounce.
    let slice_controller = net_controllers
        .next()
        .ok_or_else(|| shared("Network"))?
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        );
    let pf_controller = port_forwards
        .controllers()
        .into_iter()
        .next()
        .ok_or_else(|| shared("PortForward"))?
        .with_config(config);
    let stores = Stores {
        networks: net_controller.store(),
        nodes: observation.nodes.clone(),
        node_networks: observation.node_networks.clone(),
        port_forwards: pf_controller.store(),
        slices: observation.slices.clone(),
        slice_deletions: observation.slice_deletions.clone(),
        pods: observation.pods.clone(),
    };
    let ctx = Arc::new(Context::new(client, stores, Arc::new(leader_rx), metrics));

    {
        let ready = ready.clone();
        tokio::spawn(async move {
            match caches_synced(&observation).await {
                Ok(()) => {
                    ready.store(true, Ordering::Relaxed);
                    info!("caches synced; ready");
                    synced_tx.send_replace(true);
                }
                Err(e) => warn!(error = %e, "not ready"),
            }
        });
    }

    let nets = net_controller
        .reconcile_all_on(trigger_stream(net_rx))
        .reconcile_on(net_ref_rx)
        .shutdown_on_signal()
        .run(network::reconcile, error_policy::<Network>, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let slices = slice_controller
        .reconcile_all_on(trigger_stream(ws_rx))
        .reconcile_on(ws_ref_rx)
        .shutdown_on_signal()
        .run(slices::reconcile, slices::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let pfs = pf_controller
        .reconcile_all_on(trigger_stream(pf_rx))
        .reconcile_on(pf_ref_rx)
        .shutdown_on_signal()
        .run(
            portforward::reconcile,
            error_policy::<PortForward>,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let csps = Controller::new(
        Api::<ClusterSegmentationPolicy>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_secs(1)))
    .reconcile_all_on(trigger_stream(csp_rx))
    .reconcile_on(csp_ref_rx)
    .shutdown_on_signal()
    .run(
        policy::reconcile_cluster,
        error_policy::<ClusterSegmentationPolicy>,
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));
    let sps = Controller::new(
        Api::<SegmentationPolicy>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_secs(1)))
    .reconcile_all_on(trigger_stream(sp_rx))
    .reconcile_on(sp_ref_rx)
    .shutdown_on_signal()
    .run(
        policy::reconcile_namespaced,
        error_policy::<SegmentationPolicy>,
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));
    let tms = Controller::new(
        Api::<TrafficMirror>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_secs(1)))
    .reconcile_all_on(trigger_stream(tm_rx))
    .reconcile_on(tm_ref_rx)
    .shutdown_on_signal()
    .run(mirror::reconcile, error_policy::<TrafficMirror>, ctx)
    .for_each(|_| futures::future::ready(()));
    futures::future::join(futures::future::join5(nets, pfs, csps, sps, tms), slices).await;
    info!("controllers stopped");
    // Dropping the last leadership receiver makes the lease task release the Lease, so
    // another replica takes over without waiting for it to expire.
    notify.abort();
    let _ = notify.await;
    if tokio::time::timeout(Duration::from_secs(5), lease_task)
        .await
        .is_err()
    {
        warn!("the Lease was not released within 5 s");
    }
    server.abort();
    let _ = server.now_or_never();
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT (the signals the controllers' graceful shutdown
/// listens to as well).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; the Lease is released when the controllers stop");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down: releasing the Lease");
}

/// The name of an object, or [`Error::Unnamed`].
fn name_of<K: Resource<DynamicType = ()>>(obj: &K) -> Result<String, Error> {
    obj.meta().name.clone().ok_or(Error::Unnamed {
        kind: kind_of::<K>(),
    })
}

fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Network" => "Network",
        "PortForward" => "PortForward",
        "NodeNetwork" => "NodeNetwork",
        "ClusterSegmentationPolicy" => "ClusterSegmentationPolicy",
        "SegmentationPolicy" => "SegmentationPolicy",
        "TrafficMirror" => "TrafficMirror",
        _ => "object",
    }
}

#[cfg(test)]
mod trigger_tests {
    use super::*;
    use weft_crds::{NodeNetworkBlock, NodeNetworkSpec, NodeNetworkStatus};

    fn nn(blocks: &[&str], realized: &[&str]) -> CompactNodeNetwork {
        with_workloads(blocks, realized, &[])
    }

    /// A workload of `network` with `ips` addresses; `active: false` for a migration's target.
    fn workload(network: &str, ips: usize, active: bool) -> weft_crds::NodeWorkload {
        weft_crds::NodeWorkload {
            network: network.into(),
            namespace: "default".into(),
            name: format!("pod-{network}-{ips}"),
            labels: Default::default(),
            ips: (0..ips).map(|i| format!("10.0.0.{}", i + 2)).collect(),
            vm: None,
            mac: None,
            active,
        }
    }

    fn with_workloads(
        blocks: &[&str],
        realized: &[&str],
        workloads: &[weft_crds::NodeWorkload],
    ) -> CompactNodeNetwork {
        let mut nn = NodeNetwork::new(
            "node-a",
            NodeNetworkSpec {
                blocks: blocks
                    .iter()
                    .map(|n| NodeNetworkBlock {
                        network: (*n).into(),
                        ipv4: Some("10.0.0.0/24".into()),
                        ipv6: None,
                    })
                    .collect(),
            },
        );
        nn.status = Some(NodeNetworkStatus {
            networks: realized.iter().map(|n| (*n).to_string()).collect(),
            endpoints: Some(i64::try_from(workloads.len()).unwrap()),
            workloads: workloads.to_vec(),
            ..Default::default()
        });
        nn.into()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_string()).collect()
    }

    #[test]
    fn a_node_network_event_touches_the_slices_of_the_networks_whose_entries_changed() {
        let mut last = HashMap::new();
        let web = workload("a", 1, true);
        // First seen: the Networks it publishes entries of.
        assert_eq!(
            slices_touched(
                &mut last,
                &with_workloads(&["a", "b"], &["a"], std::slice::from_ref(&web)),
                false
            ),
            set(&["a"])
        );
        // The same again (a status write of something else): nothing.
        assert!(
            slices_touched(
                &mut last,
                &with_workloads(&["a", "b"], &["a", "b"], std::slice::from_ref(&web)),
                false
            )
            .is_empty()
        );
        // A label changed (the count of addresses did not): a.
        let mut relabelled = web.clone();
        std::sync::Arc::make_mut(&mut relabelled.labels).insert("app".into(), "web".into());
        assert_eq!(
            slices_touched(
                &mut last,
                &with_workloads(&["a", "b"], &["a", "b"], &[relabelled.clone()]),
                false
            ),
            set(&["a"])
        );
        // A pod of b started: b alone; b's block taken out: b (what the node vouches for).
        let both = [relabelled, workload("b", 1, true)];
        assert_eq!(
            slices_touched(
                &mut last,
                &with_workloads(&["a", "b"], &["a", "b"], &both),
                false
            ),
            set(&["b"])
        );
        assert_eq!(
            slices_touched(
                &mut last,
                &with_workloads(&["a"], &["a", "b"], &both),
                false
            ),
            set(&["b"])
        );
        // Deleted: every Network it published entries of.
        assert_eq!(
            slices_touched(&mut last, &with_workloads(&["a"], &["a", "b"], &both), true),
            set(&["a", "b"])
        );
        assert!(last.is_empty());
    }

    #[test]
    fn a_node_network_event_touches_the_networks_whose_part_of_it_changed() {
        let mut last = HashMap::new();
        assert_eq!(
            networks_touched(&mut last, &nn(&["a", "b"], &["a", "c"]), false),
            set(&["a", "b", "c"])
        );
        // b's block is taken out and the agent no longer realizes c: both are told, a is not.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a"], &["a"]), false),
            set(&["b", "c"])
        );
        // The same again (a relist, or a change of nothing a Network's status shows): none.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a"], &["a"]), false),
            set(&[])
        );
        // The controller adds b's block again (b added): b alone, not a.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a", "b"], &["a"]), false),
            set(&["b"])
        );
        // The agent reports b realized: b alone.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a", "b"], &["a", "b"]), false),
            set(&["b"])
        );
        // A pod of b started (the addresses b's workloads hold changed): b alone.
        let busier = with_workloads(&["a", "b"], &["a", "b"], &[workload("b", 2, true)]);
        assert_eq!(networks_touched(&mut last, &busier, false), set(&["b"]));
        // A migration's target port of a waits for its VM: its addresses are held on the
        // source node, so nothing changes here.
        let waiting = [workload("b", 2, true), workload("a", 1, false)];
        assert_eq!(
            networks_touched(
                &mut last,
                &with_workloads(&["a", "b"], &["a", "b"], &waiting),
                false
            ),
            set(&[])
        );
        // a's block changes (renumbered): a alone.
        let mut moved = with_workloads(&["a", "b"], &["a", "b"], &waiting);
        let blocks = moved.spec.entries().to_vec();
        let renumbered: Vec<_> = blocks
            .into_iter()
            .map(|mut e| {
                if &*e.network == "a" {
                    e.ipv4 = Some("10.0.1.0/24".parse().unwrap());
                }
                e
            })
            .collect();
        moved.spec = compact::Blocks::new(renumbered);
        assert_eq!(networks_touched(&mut last, &moved, false), set(&["a"]));
        // b's block is taken out, the agent no longer realizes b, and its pod is gone: b; and a,
        // whose block is back at its first number.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a"], &["a"]), false),
            set(&["a", "b"])
        );
        // Deleted (with its Node): what it named, then forgotten.
        assert_eq!(
            networks_touched(&mut last, &nn(&["a"], &["a"]), true),
            set(&["a"])
        );
        assert!(last.is_empty());
    }
}

#[cfg(test)]
mod report_trigger_tests {
    use super::*;
    use weft_crds::{NodeForward, NodeMirror, NodeNetworkSpec, NodeNetworkStatus, NodePolicy};

    fn nn(status: NodeNetworkStatus) -> CompactNodeNetwork {
        let mut nn = NodeNetwork::new("node-a", NodeNetworkSpec::default());
        nn.status = Some(status);
        nn.into()
    }

    fn policy(key: &str, interfaces: i32) -> NodePolicy {
        NodePolicy {
            policy: key.into(),
            interfaces,
            error: None,
        }
    }

    fn keys(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_string()).collect()
    }

    #[test]
    fn a_node_network_event_wakes_only_the_objects_whose_report_changed() {
        let mut last = HashMap::new();
        let mut status = NodeNetworkStatus {
            policies: vec![
                policy("ClusterSegmentationPolicy base", 3),
                policy("SegmentationPolicy prod/db", 1),
            ],
            mirrors: vec![NodeMirror {
                mirror: "prod/tap".into(),
                sources: 1,
                ..NodeMirror::default()
            }],
            forwards: vec![NodeForward {
                forward: "prod/ssh".into(),
                targets: vec!["10.0.0.2".into()],
                error: None,
            }],
            endpoints: Some(3),
            ..NodeNetworkStatus::default()
        };
        // Seen first: everything it reports on.
        let first = reports_touched(&mut last, &nn(status.clone()), false);
        assert_eq!(
            first.policies,
            keys(&[
                "ClusterSegmentationPolicy base",
                "SegmentationPolicy prod/db"
            ])
        );
        assert_eq!(first.mirrors, keys(&["prod/tap"]));
        assert_eq!(first.forwards, keys(&["prod/ssh"]));
        // A pod started that no policy applies to: the node's count of endpoints changed,
        // nothing reported on did.
        status.endpoints = Some(4);
        assert_eq!(
            reports_touched(&mut last, &nn(status.clone()), false),
            Reported::default()
        );
        // The cluster policy applies to one more interface, the forward moved: those alone.
        status.policies[0].interfaces = 4;
        status.forwards[0].targets = vec!["10.0.0.9".into()];
        let moved = reports_touched(&mut last, &nn(status.clone()), false);
        assert_eq!(moved.policies, keys(&["ClusterSegmentationPolicy base"]));
        assert!(moved.mirrors.is_empty());
        assert_eq!(moved.forwards, keys(&["prod/ssh"]));
        // The mirror's entry goes: the mirror.
        status.mirrors.clear();
        let gone = reports_touched(&mut last, &nn(status.clone()), false);
        assert_eq!(gone.mirrors, keys(&["prod/tap"]));
        assert!(gone.policies.is_empty() && gone.forwards.is_empty());
        // Deleted: every object it reported on, then forgotten.
        let deleted = reports_touched(&mut last, &nn(status), true);
        assert_eq!(deleted.policies.len(), 2);
        assert_eq!(deleted.forwards, keys(&["prod/ssh"]));
        assert!(last.is_empty());
    }

    #[test]
    fn reported_keys_wake_their_objects_and_malformed_ones_nothing() {
        let (csp, mut csp_rx) = mpsc::unbounded();
        let (sp, mut sp_rx) = mpsc::unbounded();
        let (tm, mut tm_rx) = mpsc::unbounded();
        let (pf, mut pf_rx) = mpsc::unbounded();
        let refs = ReportedRefs {
            cluster_policies: csp,
            policies: sp,
            mirrors: tm,
            port_forwards: pf,
        };
        refs.wake(&Reported {
            policies: keys(&[
                "ClusterSegmentationPolicy base",
                "SegmentationPolicy prod/db",
                "SegmentationPolicy no-namespace",
                "Something else",
            ]),
            mirrors: keys(&["prod/tap", "bare"]),
            forwards: keys(&["prod/ssh"]),
        });
        drop(refs);
        fn all<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
            let mut v = Vec::new();
            while let Ok(r) = rx.try_recv() {
                v.push(r);
            }
            v
        }
        assert_eq!(
            all(&mut csp_rx),
            [ObjectRef::<ClusterSegmentationPolicy>::new("base")]
        );
        assert_eq!(
            all(&mut sp_rx),
            [ObjectRef::<SegmentationPolicy>::new("db").within("prod")]
        );
        assert_eq!(
            all(&mut tm_rx),
            [ObjectRef::<TrafficMirror>::new("tap").within("prod")]
        );
        assert_eq!(
            all(&mut pf_rx),
            [ObjectRef::<PortForward>::new("ssh").within("prod")]
        );
    }
}

#[cfg(test)]
mod node_trigger_tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use weft_crds::{NetworkSpec, NetworkStatus};

    fn node(uid: &str, labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("node-a".into());
        n.metadata.uid = Some(uid.into());
        n.metadata.labels = Some(labels_of(labels));
        n
    }

    fn labels_of(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn only_a_new_relabelled_re_created_or_deleted_node_changes_anything() {
        let mut last = HashMap::new();
        assert_eq!(
            node_changed(&mut last, &node("u1", &[("zone", "a")]), false),
            NodeChange::Membership,
            "new"
        );
        // A status heartbeat: same uid and labels.
        assert_eq!(
            node_changed(&mut last, &node("u1", &[("zone", "a")]), false),
            NodeChange::Nothing
        );
        assert_eq!(
            node_changed(&mut last, &node("u1", &[("zone", "b")]), false),
            NodeChange::Labels(labels_of(&[("zone", "a")])),
            "relabelled: the labels before"
        );
        assert_eq!(
            node_changed(&mut last, &node("u2", &[("zone", "c")]), false),
            NodeChange::Membership,
            "re-created (and relabelled)"
        );
        assert_eq!(
            node_changed(&mut last, &node("u2", &[("zone", "c")]), true),
            NodeChange::Membership,
            "deleted"
        );
        assert!(last.is_empty());
    }

    fn network(name: &str, selector: Option<LabelSelector>) -> Arc<Network> {
        Arc::new(Network::new(
            name,
            NetworkSpec {
                node_selector: selector,
                ..NetworkSpec::default()
            },
        ))
    }

    fn match_labels(labels: &[(&str, &str)]) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Some(labels_of(labels)),
            ..LabelSelector::default()
        })
    }

    #[test]
    fn a_relabelled_node_concerns_only_the_networks_whose_selection_of_it_changes() {
        let mut invalid = (*network("invalid", match_labels(&[("pool", "x")]))).clone();
        invalid.status = Some(NetworkStatus {
            conditions: vec![status::condition(
                status::VALID,
                false,
                "Immutable",
                "spec.subnets cannot change".to_string(),
                Some(2),
                &[],
                jiff::Timestamp::UNIX_EPOCH,
            )],
            ..NetworkStatus::default()
        });
        let networks = [
            network("everywhere", None),
            network("zone-a", match_labels(&[("zone", "a")])),
            network("zone-b", match_labels(&[("zone", "b")])),
            network("pool-x", match_labels(&[("pool", "x")])),
            network(
                "has-gpu",
                Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "gpu".into(),
                        operator: "Exists".into(),
                        values: None,
                    }]),
                    ..LabelSelector::default()
                }),
            ),
            Arc::new(invalid),
        ];
        let set = |names: &[&str]| -> BTreeSet<String> {
            names.iter().map(|n| (*n).to_string()).collect()
        };
        let woken = |before: &[(&str, &str)], after: &[(&str, &str)]| {
            reselected(&networks, &labels_of(before), &labels_of(after))
        };
        // Moved from zone a to zone b: the two zone Networks; a Network without a selector
        // selects the node either way, pool-x selects it neither way.
        assert_eq!(
            woken(&[("zone", "a")], &[("zone", "b")]),
            set(&["invalid", "zone-a", "zone-b"])
        );
        // A label no selector reads: none but the one whose accepted spec is not known here.
        assert_eq!(
            woken(&[("zone", "a")], &[("zone", "a"), ("rack", "7")]),
            set(&["invalid"])
        );
        assert_eq!(
            woken(
                &[("zone", "a")],
                &[("zone", "a"), ("gpu", "1"), ("pool", "x")]
            ),
            set(&["has-gpu", "invalid", "pool-x"])
        );
    }
}

//! The node agent: turns the resources that select this node into bridges, addresses and
//! nftables rules, installs the CNI binary and conflist, and serves the CNI on a Unix socket.

pub mod anomaly;
pub mod audit;
pub mod cni_server;
mod conn;
pub mod endpoints;
pub mod firewall;
pub mod guard;
pub mod install;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod plan;
pub mod pod_events;
pub mod reaper;
pub mod source;

use crate::model::{NodeBlocks, Problem, Resources};
use backon::BackoffBuilder as _;
use endpoints::{Changes, EndpointStore};
use install::CniInstall;
use plan::{NodeContext, PlanOutput};
use serde::Serialize;
use source::ResourceSource;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use weft_dataplane::links::{ApplyError, ApplyReport};
use weft_dataplane::netlink::Netlink;
use weft_dataplane::nft::NftCli;
use weft_dataplane::plan::{self as dplan, ProcSysctls};
use weft_dataplane::proto::{Endpoint, Reply, Request};
use weft_dataplane::state::{self, NodeState};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node.
    pub node: NodeContext,
    /// All nodes of the cluster (standalone block assignment).
    pub nodes: Vec<String>,
    /// weft's state dir.
    pub state_dir: PathBuf,
    /// The CNI socket.
    pub socket: PathBuf,
    /// CNI installation.
    pub cni: CniInstall,
    /// The network named in the conflist (default: the only network on the node).
    pub default_network: Option<String>,
    /// TCP ports of the agent's own HTTP server on the node (`/metrics`, probes): weft's
    /// workloads may not reach them. [`run`] sets them from its metrics address.
    pub agent_ports: Vec<u16>,
    /// Remove the conflist when the agent exits (links and rules stay).
    pub cleanup_config_on_exit: bool,
    /// Full resync period (repairs drift: a table or bridge deleted by hand).
    pub resync: Duration,
    /// How often a source without change notifications (files) is polled, and a failed
    /// reconcile retried; the watches of cluster mode wake the agent as changes arrive.
    pub poll: Duration,
    /// Where audit records go (JSON lines); `None`: standard output.
    pub audit_log: Option<PathBuf>,
    /// Export each workload interface's traffic (`weft_agent_workload_*`, one series per
    /// interface and direction).
    pub workload_metrics: bool,
    /// The CIDRs a TrafficMirror's remote collector may be in (none: remote collectors refused).
    pub mirror_collectors: Vec<ipnet::IpNet>,
    /// The rates above which a workload interface's traffic is an anomaly (besides its limits).
    pub anomaly_thresholds: anomaly::Thresholds,
}

/// What the agent reports after each reconcile (`<state>/status.json`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The node.
    pub node: String,
    /// Reconciles so far.
    pub generation: u64,
    /// Bridges in the plan.
    pub bridges: Vec<String>,
    /// Networks realized: those of the plan; after a failed apply, also those realized before.
    pub networks: Vec<String>,
    /// Endpoints known.
    pub endpoints: usize,
    /// Workload interfaces of other nodes in this node's policy groups.
    #[serde(default)]
    pub peers: usize,
    /// Live migration targets waiting for their VM.
    #[serde(default)]
    pub pending: usize,
    /// Port forwards realized: `namespace/name` → target addresses.
    pub forwards: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Problems with resources.
    pub problems: Vec<String>,
    /// The conflist's default Network and why (`None` before the first successful reconcile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_network: Option<install::DefaultNetwork>,
    /// The last apply error, if the last reconcile failed.
    pub last_error: Option<String>,
    /// What the last apply changed.
    pub last_changes: Vec<String>,
    /// Audit records written, by verdict.
    pub audit: BTreeMap<String, u64>,
    /// Segmentation policies in force: `Kind name` → workload interfaces they apply to here.
    pub policies: BTreeMap<String, usize>,
    /// What the policy compiler could not enforce here: `Kind name` → its problems, joined.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policy_problems: BTreeMap<String, String>,
    /// The traffic mirrors on the node: sources, what they copied, problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<weft_crds::NodeMirror>,
    /// What keeps port forwards from being installed as asked here: `namespace/name` → its
    /// problems, joined.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forward_problems: BTreeMap<String, String>,
}

/// Problems by object (`key`), the messages of one object joined with `; `.
fn problems_by_object<'a>(
    problems: impl IntoIterator<Item = &'a Problem>,
    key: impl Fn(&Problem) -> String,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for p in problems {
        out.entry(key(p))
            .and_modify(|m| {
                m.push_str("; ");
                m.push_str(&p.message);
            })
            .or_insert_with(|| p.message.clone());
    }
    out
}

/// A request from the socket server to the reconciler.
pub struct Message {
    /// The request.
    pub request: Request,
    /// Where the reply goes.
    pub reply: oneshot::Sender<Reply>,
}

/// Computes the plan for the current resources and endpoints. `realized`: this node's blocks
/// of the networks realized on it ([`realized_blocks`]), which the networks keep while the
/// node's `NodeNetwork` is missing (see [`plan::held_blocks`]).
pub fn compute(
    cfg: &AgentConfig,
    res: &Resources,
    endpoints: &EndpointStore,
    realized: &BTreeMap<String, NodeBlocks>,
) -> PlanOutput {
    let mut blocks: BTreeMap<String, NodeBlocks> = BTreeMap::new();
    let mut block_problems = Vec::new();
    let mut nodes = cfg.nodes.clone();
    if !nodes.contains(&cfg.node.name) {
        nodes.push(cfg.node.name.clone());
    }
    // Cluster mode: the Node object's labels; standalone: the configured ones.
    let node = match &res.node_labels {
        Some(labels) => NodeContext {
            name: cfg.node.name.clone(),
            labels: labels.clone(),
            syn_proxy: cfg.node.syn_proxy,
            own_tcp_ports: cfg.node.own_tcp_ports.clone(),
        },
        None => cfg.node.clone(),
    };
    if let Some(assigned) = &res.node_blocks {
        blocks = assigned.clone();
        let held = plan::held_blocks(res, &node, realized);
        if !held.is_empty() {
            let names: Vec<&str> = held.keys().map(String::as_str).collect();
            block_problems.push(Problem {
                kind: "NodeNetwork",
                object: node.name.clone(),
                message: format!(
                    "not in the Kubernetes API; networks {} keep the blocks they have on this node until the controller writes it again",
                    names.join(", ")
                ),
                reason: None,
            });
        }
        for (network, b) in held {
            blocks.entry(network).or_insert(b);
        }
    } else {
        for net in &res.networks {
            let name = net.metadata.name.clone().unwrap_or_default();
            match plan::standalone_blocks(net, &nodes, &cfg.node.name) {
                Ok(b) => {
                    blocks.insert(name, b);
                }
                Err(message) => block_problems.push(Problem {
                    kind: "Network",
                    object: name,
                    message,
                    reason: None,
                }),
            }
        }
    }
    let mut out = plan::plan(&node, res, &blocks, &endpoints.list());
    firewall::shield_agent_ports(&mut out.plan.firewall, &cfg.agent_ports);
    if cfg.workload_metrics || cfg.anomaly_thresholds.connections_per_second.is_some() {
        firewall::count_new_connections(&mut out.plan.firewall);
    }
    for p in block_problems {
        if !out.problems.contains(&p) {
            out.problems.push(p);
        }
    }
    out
}

/// This node's blocks of the networks realized on it, from their runtime state (written by
/// each successful apply, so it survives an agent restart).
pub fn realized_blocks(state_dir: &std::path::Path) -> BTreeMap<String, NodeBlocks> {
    weft_dataplane::state::NetworkState::list(state_dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| {
            let st = weft_dataplane::state::NetworkState::read(state_dir, &name).ok()?;
            Some((
                name,
                NodeBlocks {
                    v4: st.block_v4,
                    v6: st.block_v6,
                },
            ))
        })
        .collect()
}

/// The periodic check of this node against a plan (blocking): links, addresses and the tables'
/// structure as a full apply, set elements trusted to be those of `previous` (see
/// [`dplan::apply_checked`]).
pub fn check_blocking(
    plan: &dplan::NodePlan,
    previous: Option<&dplan::NodePlan>,
    state_dir: &std::path::Path,
) -> Result<ApplyReport, ApplyError> {
    with_kernel(|links, fw, sysctls| {
        dplan::apply_checked(plan, previous, links, fw, sysctls, state_dir)
    })
}

/// Applies a plan to this node's kernel (blocking: call from `spawn_blocking`); with the plan
/// applied last as `previous`, element changes go without listing the tables first.
pub fn apply_blocking(
    plan: &dplan::NodePlan,
    previous: Option<&dplan::NodePlan>,
    state_dir: &std::path::Path,
) -> Result<ApplyReport, ApplyError> {
    with_kernel(|links, fw, sysctls| {
        dplan::apply_since(plan, previous, links, fw, sysctls, state_dir)
    })
}

/// Runs `f`, system calls that block for a short while (an allocation, a release, a batch of
/// set elements), on the calling task's thread ([`tokio::task::block_in_place`]: a worker
/// hands its other tasks to the runtime meanwhile): no hop to the blocking pool and back on
/// the way to the CNI's answer. A single-threaded runtime (tests) runs it as it is.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// An IPAM store's lock found held by another operation ([`IpamStore::without_waiting`]):
/// nothing was done, and the operation runs again waiting ([`at_once`]).
///
/// [`IpamStore::without_waiting`]: weft_dataplane::ipam::IpamStore::without_waiting
#[derive(Debug)]
pub struct Busy;

/// Runs `f`, operations on IPAM stores, at once on the calling task's thread with stores that
/// do not wait for their lock (`f(false)`): each is then a few system calls on small files in
/// the page cache, shorter than handing the worker over ([`blocking`]) on the way to the CNI's
/// answer. Where `f` found a store's lock held (another process's operation on it, which can
/// last), it runs again through [`blocking`], waiting for the lock (`f(true)`).
pub(crate) fn at_once<T>(f: impl Fn(bool) -> Result<T, Busy>) -> T {
    match f(false) {
        Ok(t) => t,
        Err(Busy) => blocking(|| {
            loop {
                // A store that waits for its lock is never busy.
                if let Ok(t) = f(true) {
                    break t;
                }
            }
        }),
    }
}

/// What keeps the policies from the traffic between two ports of a bridge on this node, if
/// anything: such traffic meets the `inet` policy chains only through br_netfilter,
/// whose calls weft turns on for its own bridges (see
/// `weft_dataplane::netlink::bridge_safeguards_message`); the module must be loaded, which its
/// sysctls tell.
pub fn bridge_netfilter_problem() -> Option<String> {
    match weft_dataplane::sysctl::get(BRIDGE_NETFILTER_SYSCTL) {
        Err(e) if e.is_not_found() => Some(
            "the br_netfilter module is not loaded on this node: traffic between workloads on the same bridge passes no policy; load it (modprobe br_netfilter, and name it in /etc/modules-load.d/ for the next boot; a kernel built without CONFIG_BRIDGE_NETFILTER cannot enforce them)"
                .to_string(),
        ),
        _ => None,
    }
}

/// A sysctl that exists when br_netfilter is loaded.
const BRIDGE_NETFILTER_SYSCTL: &str = "net.bridge.bridge-nf-call-iptables";

/// Runs `f` with this node's real links, nftables and sysctls.
fn with_kernel<T>(
    f: impl FnOnce(&mut Netlink, &mut NftCli, &mut ProcSysctls) -> Result<T, ApplyError>,
) -> Result<T, ApplyError> {
    let mut links = Netlink::new().map_err(|source| ApplyError::Link {
        op: "open netlink socket".into(),
        source,
    })?;
    f(&mut links, &mut NftCli::default(), &mut ProcSysctls)
}

/// Forgets the reservations of VM `vm` (`namespace/name`) in every network's IPAM store under
/// `state_dir`; returns the networks where they were forgotten and those where the VM is
/// attached (its reservations kept there).
pub fn forget_vm(
    state_dir: &std::path::Path,
    vm: &str,
) -> Result<(Vec<String>, Vec<String>), weft_dataplane::ipam::IpamError> {
    let mut forgotten = Vec::new();
    let mut attached = Vec::new();
    for network in weft_dataplane::ipam::IpamStore::networks(state_dir) {
        let store = weft_dataplane::ipam::IpamStore::open(state_dir, &network)?;
        if store.forget_idle(vm, |_| true)? > 0 {
            forgotten.push(network);
        } else if store.list()?.iter().any(|a| a.owner.as_deref() == Some(vm)) {
            attached.push(network);
        }
    }
    Ok((forgotten, attached))
}

/// Every how many resyncs the tables are listed with their elements (the others check their
/// structure only): with a 30 s resync, every 5 minutes.
const FULL_RESYNC_EVERY: u64 = 10;

/// A deleted VM's reservation is forgotten only once it is this old (seconds): a VM whose
/// first attachment outran the agent's watch of the KubeVirt API keeps its addresses.
const RESERVATION_MIN_AGE: u64 = 300;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The plan last applied and what it was computed from.
struct Applied {
    /// The resource snapshot.
    resources: Arc<Resources>,
    /// The plan (with the compiled policy).
    out: PlanOutput,
    /// Was it applied successfully? (A registration only changes a plan the kernel has.)
    ok: bool,
    /// Networks whose uplink could not be attached, with why: not realized on this node.
    failed: Vec<(String, String)>,
}

/// Runs `change` on the plan applied last (`out`), which changes its compiled policy in place.
/// The audit reader shares that policy: it is lent an empty one meanwhile, so the change does
/// not copy it (thousands of groups' addresses); a record read meanwhile waits for the lock.
fn change_in_place<T>(
    policy: &audit::SharedPolicy,
    out: &mut PlanOutput,
    change: impl FnOnce(&mut PlanOutput) -> T,
) -> T {
    let mut shared = policy.lock().ok();
    if let Some(p) = shared.as_deref_mut() {
        *p = Arc::default();
    }
    let result = change(out);
    if let Some(p) = shared.as_deref_mut() {
        *p = Arc::clone(&out.policy);
    }
    result
}

/// What started a reconcile; its name is the `trigger` label of the agent's metrics and the
/// `reason` of its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The agent started.
    Start,
    /// Endpoints were registered or unregistered: the resources are those of the last
    /// snapshot, and the applied plan changes in place when it can.
    Endpoints,
    /// The resources changed.
    ResourcesChanged,
    /// The last reconcile failed.
    Retry,
    /// The periodic resync: checks the kernel (and repairs drift).
    Resync,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Endpoints => "endpoints",
            Trigger::ResourcesChanged => "resources changed",
            Trigger::Retry => "retry",
            Trigger::Resync => "resync",
        }
    }
}

/// The shortest time between two writes of `<state>/status.json`: while pods start by the
/// hundred, every registration changes the status, and a write (a new file renamed over the
/// old) costs the node more than the registration's own rules.
const STATUS_WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// Writes `<state>/status.json` off the reconcile's path (a registration's reply does not wait
/// for it): one task writes, the newest status wins, writes never overlap, and at most one
/// starts every [`STATUS_WRITE_INTERVAL`] (what changes meanwhile waits for the next, which
/// writes the newest).
#[derive(Debug)]
struct StatusFile {
    tx: tokio::sync::watch::Sender<Option<AgentStatus>>,
    writer: tokio::task::JoinHandle<()>,
}

impl StatusFile {
    fn spawn(path: PathBuf) -> Self {
        let (tx, mut rx) = tokio::sync::watch::channel(None::<AgentStatus>);
        let writer = tokio::spawn(async move {
            // A value sent before the sender is dropped is still seen (see `flush`).
            while rx.changed().await.is_ok() {
                let Some(status) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let path = path.clone();
                let started = tokio::time::Instant::now();
                let written =
                    tokio::task::spawn_blocking(move || state::write_json_unsynced(&path, &status))
                        .await;
                if let Ok(Err(e)) = written {
                    warn!(error = %crate::error_chain(&e), "cannot write status");
                }
                tokio::time::sleep_until(started + STATUS_WRITE_INTERVAL).await;
            }
        });
        StatusFile { tx, writer }
    }

    fn publish(&self, status: &AgentStatus) {
        self.tx.send_replace(Some(status.clone()));
    }

    /// Writes the last status published and stops.
    async fn flush(self) {
        drop(self.tx);
        if tokio::time::timeout(Duration::from_secs(5), self.writer)
            .await
            .is_err()
        {
            warn!("the last status was not written within 5 s");
        }
    }
}

/// Brings `ports`, the workload ports of the metrics, up to date: by the endpoints' `changes`
/// when given (`ports` was last brought up to date with these resources, `res`: a port's
/// limits depend on them), else anew from every endpoint of `endpoints`. The order of the
/// ports is not kept.
fn follow_workload_ports<'a>(
    ports: &mut Vec<metrics::WorkloadPort>,
    res: &Resources,
    changes: Option<&Changes>,
    endpoints: impl Iterator<Item = &'a Endpoint>,
) {
    let port = |e: &Endpoint| metrics::WorkloadPort {
        limits: limits::of(res, e).0,
        host_ifname: e.host_ifname.clone(),
        namespace: e.pod_namespace.clone().unwrap_or_else(|| "default".into()),
        pod: e.pod_name.clone().unwrap_or_default(),
        network: e.network.clone(),
        interface: e.ifname.clone(),
        ips: plan::addresses_of(e),
    };
    let Some(c) = changes else {
        *ports = endpoints.map(port).collect();
        return;
    };
    for e in &c.removed {
        let of = |p: &metrics::WorkloadPort| {
            p.host_ifname == e.host_ifname && p.network == e.network && p.interface == e.ifname
        };
        if let Some(i) = ports.iter().position(of) {
            ports.swap_remove(i);
        }
    }
    ports.extend(c.added.iter().map(port));
}

struct Reconciler {
    status_file: StatusFile,
    /// The workload interfaces the `workload_*` metrics report (`--workload-metrics`).
    workload_ports: metrics::WorkloadPorts,
    /// The resources `workload_ports` was last brought up to date with, which the endpoints'
    /// changes since can update; `None`: it is built anew from every endpoint.
    ports_of: Option<Arc<Resources>>,
    /// Whether `<state>/node.json` says this agent is ready, as the last look at it found or
    /// its write made it: a registration then does not read it again.
    node_state_ready: bool,
    cfg: AgentConfig,
    source: Box<dyn ResourceSource>,
    endpoints: EndpointStore,
    ready: Arc<AtomicBool>,
    status: AgentStatus,
    last_problems: Vec<String>,
    /// What keeps the policies from the traffic between two ports of a bridge here (see
    /// [`bridge_netfilter_problem`]), as the last pass that was not a registration's found.
    bridge_netfilter: Option<String>,
    networks: Vec<String>,
    /// The plan last applied, what it was computed from, and whether it was applied: a
    /// registration changes it in place, or needs no kernel work when it does not change it
    /// (drift is repaired by the periodic resync).
    applied: Option<Applied>,
    /// Resyncs so far: most check the tables' structure only, every [`FULL_RESYNC_EVERY`]th
    /// lists them with their elements.
    resyncs: u64,
    /// The last snapshot of the source.
    resources: Option<Arc<Resources>>,
    /// The last snapshot, shared with the socket server: it answers identity questions itself,
    /// so an ADD does not wait behind other pods' registrations in the reconcile queue.
    shared: cni_server::Snapshot,
    /// The compiled policy the audit reader names rules from.
    policy: audit::SharedPolicy,
    /// Audit counters.
    audit: audit::Counters,
    /// Ports activated since the last apply (their VM is announced on the LAN after it).
    activated: Vec<Endpoint>,
    /// Metrics.
    metrics: metrics::AgentMetrics,
    /// The default network of the conflist installed last (`None`: not installed yet).
    installed: Option<Option<String>>,
    /// Deletes host links no attachment owns (found at resync).
    reaper: reaper::Reaper,
    /// Keeps the kernel's traffic mirrors to the plan.
    mirrors: mirror::Mirrors,
    /// The workload addresses and ports of this node's endpoints, and those that left since
    /// the last successful apply: a gone address has its per-address state purged from the
    /// kernel's dynamic sets, a gone port its counters.
    departures: endpoints::Departures,
    /// The registrations the reconcile under way serves: answered as soon as their rules are
    /// in force ([`answer_applied`]), before the status and metrics are brought
    /// up to date; whatever is left here is answered after the reconcile.
    waiting: Vec<oneshot::Sender<Reply>>,
}

/// Answers the registrations a reconcile serves once its apply went through: their rules are
/// in force. (An agent not ready yet answers them after the reconcile, which makes it ready.)
/// What follows the apply never fails a reconcile whose apply went through, so the answer is the
/// one the reconcile's end would give, only sooner: the CNI's ADD does not wait for the status
/// and the metrics.
fn answer_applied(ready: &AtomicBool, waiting: &mut Vec<oneshot::Sender<Reply>>) {
    if !ready.load(Ordering::SeqCst) {
        return;
    }
    for reply in waiting.drain(..) {
        let _ = reply.send(Reply::ok(true));
    }
}

/// Why a reconcile did not bring the node to its plan.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The resources could not be read (or have not been listed yet: see
    /// [`ReconcileError::is_waiting_first_list`]).
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// Applying the plan failed: the kernel refused a change, or a link in the way is not
    /// weft's.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The blocking task that applies the plan panicked or was cancelled.
    #[error("the task applying the plan failed")]
    Task(#[from] tokio::task::JoinError),
}

impl ReconcileError {
    /// The source has not had its first complete list yet: how every start in a cluster
    /// begins, not a failure.
    pub fn is_waiting_first_list(&self) -> bool {
        matches!(
            self,
            ReconcileError::Source(source::SourceError::NotSynced { .. })
        )
    }
}

impl Reconciler {
    async fn reconcile(&mut self, reason: Trigger) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let result = self.reconcile_once(reason).await;
        let failed = result.as_ref().is_err_and(|e| !e.is_waiting_first_list());
        self.metrics
            .reconciled(reason.as_str(), started.elapsed(), !failed, &self.status);
        result
    }

    /// Purges the kernel's per-address state of the workload addresses that left this node
    /// since the last apply ([`firewall::purge_addresses`]); a failure is logged and the
    /// elements stay (they are counts, not permissions).
    async fn purge_gone_addresses(&mut self) {
        if !self.departures.any_gone() {
            return;
        }
        let (gone, gone_ports) = self.departures.take_gone();
        let Some(applied) = self.applied.as_ref() else {
            return;
        };
        let plan = &applied.out.plan;
        let mut tx = firewall::purge_addresses(&plan.firewall, &gone, &gone_ports);
        if let Some(guard) = &plan.guard {
            tx.0.extend(firewall::purge_addresses(guard, &[], &gone_ports).0);
        }
        if tx.is_empty() {
            return;
        }
        match tokio::task::spawn_blocking(move || {
            weft_dataplane::nft::Firewall::apply(&mut NftCli::default(), &tx)
        })
        .await
        {
            Ok(Ok(())) => {
                debug!(addresses = ?gone, "purged the limits' and counters' state of departed workloads")
            }
            Ok(Err(e)) => {
                warn!(error = %crate::error_chain(&e), addresses = ?gone, "cannot purge departed workloads' per-address state")
            }
            Err(e) => warn!(error = %e, "purge task failed"),
        }
    }

    async fn reconcile_once(&mut self, reason: Trigger) -> Result<(), ReconcileError> {
        // A registration changes endpoints, not resources: reuse the last snapshot.
        let res = match (&self.resources, reason) {
            (Some(r), Trigger::Endpoints) => Arc::clone(r),
            _ => {
                let r = Arc::new(self.source.snapshot()?);
                self.resources = Some(Arc::clone(&r));
                self.shared.publish(Arc::clone(&r));
                r
            }
        };
        // A pending migration target whose VM runs on no other node any more (the source is
        // gone, or the VM never announced itself): activate it.
        for ep in self.endpoints.pending() {
            let Some(vm) = ep.vm.as_deref() else {
                continue;
            };
            if plan::migration_sources(&res, vm).is_empty()
                && let Some(ep) = self
                    .endpoints
                    .activate(&ep.host_ifname, &self.cfg.state_dir)
            {
                info!(port = %ep.host_ifname, %vm, "the VM runs on no other node: port activated");
                self.activated.push(ep);
            }
        }
        // A registration changes the plan applied last in place when it can: its elements
        // only, no recompile (see `plan::apply_endpoint_changes`).
        let changes = self.endpoints.take_changes();
        // Counted at each change rather than over every endpoint after each registration.
        self.departures
            .follow(changes.as_ref(), self.endpoints.iter());
        // Until they follow these changes (a return on the way leaves them to a full build).
        let ports_of = self.ports_of.take();
        let in_place = match (self.applied.as_mut(), changes.as_ref()) {
            (Some(a), Some(c))
                if reason == Trigger::Endpoints && a.ok && Arc::ptr_eq(&a.resources, &res) =>
            {
                let tx = change_in_place(&self.policy, &mut a.out, |out| {
                    plan::apply_endpoint_changes(out, &res, &c.removed, &c.added)
                });
                tx.map(|tx| (tx, a.failed.clone()))
            }
            // Another node's workload came or went (a WorkloadSlice changed) and nothing else
            // did: the groups' sets change in place, no recompile (see
            // `plan::apply_peer_changes`). Not while a pending VM port waits for its source, or
            // a network's uplink for another attempt: those take the full plan.
            (Some(a), None)
                if reason == Trigger::ResourcesChanged
                    && a.ok
                    && a.failed.is_empty()
                    && self.endpoints.pending_count() == 0
                    && !Arc::ptr_eq(&a.resources, &res)
                    && a.resources.same_but_peers(&res) =>
            {
                let (removed, added) = crate::model::peer_delta(&a.resources.peers, &res.peers);
                let tx = change_in_place(&self.policy, &mut a.out, |out| {
                    plan::apply_peer_changes(out, &res, &removed, &added)
                });
                if tx.is_some() {
                    a.resources = Arc::clone(&res);
                }
                tx.map(|tx| (tx, a.failed.clone()))
            }
            _ => None,
        };
        let result = match in_place {
            Some((tx, failed)) => {
                let report = ApplyReport {
                    changes: tx.0.iter().map(|c| c.summary()).collect(),
                    failed,
                };
                if tx.is_empty() {
                    Ok(report)
                } else {
                    // The changed elements (a registration's, another node's workloads'):
                    // one batch, applied on this thread. Additions alone, at once: their
                    // commit is a few microseconds of the kernel's, shorter than handing the
                    // worker over; any other batch hands the worker over first ([`blocking`]):
                    // the release of a socket that removed elements waits for a grace period.
                    let mut nft = NftCli::default();
                    match nft.apply_additions(&tx) {
                        Some(applied) => applied,
                        None => blocking(|| weft_dataplane::nft::Firewall::apply(&mut nft, &tx)),
                    }
                    .map(|()| report)
                    .map_err(ApplyError::Firewall)
                }
            }
            None => {
                // Read only while the NodeNetwork is missing (see `plan::held_blocks`).
                let realized = if res.node_network_missing {
                    realized_blocks(&self.cfg.state_dir)
                } else {
                    BTreeMap::new()
                };
                let out = compute(&self.cfg, &res, &self.endpoints, &realized);
                // A network whose uplink could not be attached is tried again by the next
                // full apply: none is pending when the last plan is trusted.
                let all_attached = self.applied.as_ref().is_some_and(|a| a.failed.is_empty());
                let previous = self.applied.take().filter(|a| a.ok).map(|a| a.out.plan);
                let result = if reason == Trigger::Endpoints && previous.as_ref() == Some(&out.plan)
                {
                    Ok(ApplyReport::default())
                } else {
                    let plan = out.plan.clone();
                    let state_dir = self.cfg.state_dir.clone();
                    // A registration trusts the last applied plan; so does a change of the
                    // resources that changes the tables only (another node's workload came or
                    // went: its address in the groups' sets), which then costs the elements
                    // that changed, not a listing of every set. A resync checks the tables'
                    // structure and trusts their elements, but every `FULL_RESYNC_EVERY`th; it
                    // repairs what changed behind the agent's back. Everything else applies in
                    // full.
                    let checked = reason == Trigger::Resync && {
                        self.resyncs += 1;
                        !self.resyncs.is_multiple_of(FULL_RESYNC_EVERY)
                    };
                    let tables_only = reason == Trigger::ResourcesChanged
                        && all_attached
                        && previous
                            .as_ref()
                            .is_some_and(|p| p.same_but_tables(&out.plan));
                    let previous =
                        previous.filter(|_| reason == Trigger::Endpoints || checked || tables_only);
                    tokio::task::spawn_blocking(move || {
                        if checked {
                            check_blocking(&plan, previous.as_ref(), &state_dir)
                        } else {
                            apply_blocking(&plan, previous.as_ref(), &state_dir)
                        }
                    })
                    .await?
                };
                self.applied = Some(Applied {
                    resources: Arc::clone(&res),
                    out,
                    ok: false,
                    failed: result
                        .as_ref()
                        .map(|r| r.failed.clone())
                        .unwrap_or_default(),
                });
                result
            }
        };
        // Both ways above leave the plan they applied (or changed in place) here.
        let Some(applied) = self.applied.as_mut() else {
            return result.map(|_| ()).map_err(ReconcileError::from);
        };
        applied.ok = result.is_ok();
        if result.is_ok() {
            answer_applied(&self.ready, &mut self.waiting);
        }
        let out = &applied.out;
        let mut problems: Vec<String> = res.problems.clone();
        problems.extend(out.problems.iter().map(|p| p.to_string()));
        if problems != self.last_problems {
            for p in &problems {
                warn!(problem = %p, "resource problem");
            }
            self.last_problems = problems.clone();
        }
        self.source.pod_problems(&out.problems);
        if result.is_ok() {
            for ep in std::mem::take(&mut self.activated) {
                announce(&out.plan, &ep);
            }
        }
        self.status.generation += 1;
        self.status.node = self.cfg.node.name.clone();
        self.status.bridges = out.plan.bridges.iter().map(|b| b.name.clone()).collect();
        self.status.endpoints = self.endpoints.len();
        self.status.peers = res.peers.len();
        self.status.pending = self.endpoints.pending_count();
        self.status.forwards = out.forwards.clone();
        self.status.policies = out.policy.applies_to.clone();
        self.status.policy_problems =
            problems_by_object(&out.policy.problems, |p| format!("{} {}", p.kind, p.object));
        self.status.forward_problems = problems_by_object(
            out.problems.iter().filter(|p| p.kind == "PortForward"),
            |p| p.object.clone(),
        );
        if let Ok(mut p) = self.policy.lock() {
            *p = Arc::clone(&out.policy);
        }
        if let Ok(a) = self.audit.lock() {
            self.status.audit = a.clone();
        }
        self.status.problems = problems;
        // Without br_netfilter no policy sees the traffic between two ports of a bridge: every
        // policy enforced here says so, and the node. Looked at again by every pass but a
        // registration's.
        if reason != Trigger::Endpoints {
            let now = (!out.plan.bridges.is_empty())
                .then(bridge_netfilter_problem)
                .flatten();
            if let Some(p) = now
                .as_ref()
                .filter(|p| self.bridge_netfilter.as_ref() != Some(*p))
            {
                warn!(problem = %p, "policies not enforced on the bridges");
            }
            self.bridge_netfilter = now;
        }
        if let Some(p) = &self.bridge_netfilter {
            self.status.problems.push(p.clone());
            for (policy, _) in out.policy.applies_to.iter().filter(|(_, n)| **n > 0) {
                let e = self
                    .status
                    .policy_problems
                    .entry(policy.clone())
                    .or_default();
                if !e.is_empty() {
                    e.push_str("; ");
                }
                e.push_str(p);
            }
        }
        self.networks = out.plan.networks.iter().map(|n| n.name.clone()).collect();
        // Mirrors change with the resources and the endpoints; their task applies them. (The
        // endpoints are lent, not copied, to the shaping, the publication and the workload
        // ports: work after every registration, on every endpoint of the node.)
        let mut tc = if res.mirrors.is_empty() {
            mirror::MirrorPlan::default()
        } else {
            mirror::plan(&res, &self.endpoints.list(), &self.cfg.mirror_collectors)
        };
        tc.shaping = limits::shaping(&res, self.endpoints.iter());
        self.mirrors.update(tc);
        self.status.mirrors = self.mirrors.report();
        let outcome = match result {
            Ok(report) => {
                // Networks whose uplink could not be attached are not realized here: no
                // registration is accepted for them, and they are reported like bad resources.
                for (network, message) in &report.failed {
                    self.networks.retain(|n| n != network);
                    let p = format!("Network {network}: {message}");
                    if !self.status.problems.contains(&p) {
                        warn!(problem = %p, "network not realized");
                        self.status.problems.push(p);
                    }
                }
                if !report.is_noop() {
                    if reason == Trigger::Resync {
                        // Nothing in the resources changed: someone changed the kernel under us.
                        warn!(changes = ?report.changes, "repaired drift: weft's links or rules had been changed by hand");
                    } else {
                        info!(reason = reason.as_str(), changes = ?report.changes, "applied node plan");
                    }
                }
                self.status.last_error = None;
                self.status.last_changes = report.changes;
                let choice = install::choose_default_network(
                    self.cfg.default_network.as_deref(),
                    &self.networks,
                    &res.networks,
                );
                if self.status.default_network.as_ref() != Some(&choice) {
                    info!(network = ?choice.name, reason = choice.reason, message = %choice.message, "default network of the conflist");
                }
                let default = choice.name.clone();
                self.status.default_network = Some(choice);
                // The binary and conflist change with the networks only: a registration does
                // not re-read them (the binary alone is megabytes); every other reconcile,
                // resyncs included, checks and repairs them.
                if reason != Trigger::Endpoints || self.installed.as_ref() != Some(&default) {
                    match self.cfg.cni.install(default.as_deref()) {
                        Ok(_) => self.installed = Some(default),
                        Err(e) => {
                            self.installed = None;
                            warn!(error = %crate::error_chain(&e), "cannot install the CNI binary and conflist");
                        }
                    }
                }
                self.metrics.ready();
                if !self.ready.swap(true, Ordering::SeqCst) {
                    info!(node = %self.cfg.node.name, "node ready");
                }
                let node_state = NodeState {
                    node: self.cfg.node.name.clone(),
                    agent_socket: self.cfg.socket.clone(),
                    ready: true,
                    reconciled_at: now(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                };
                // A registration trusts what the last look found or the last write made;
                // every other reconcile looks (someone may have removed the file).
                if reason != Trigger::Endpoints || !self.node_state_ready {
                    self.node_state_ready = NodeState::read(&self.cfg.state_dir)
                        .ok()
                        .is_some_and(|s| s.ready && s.agent_socket == node_state.agent_socket);
                }
                if !self.node_state_ready {
                    match node_state.write(&self.cfg.state_dir) {
                        Ok(()) => self.node_state_ready = true,
                        Err(e) => {
                            warn!(error = %crate::error_chain(&e), "cannot write node state");
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                let msg = crate::error_chain(&e);
                if self.status.last_error.as_deref() != Some(msg.as_str()) {
                    error!(error = %msg, "applying the node plan failed; retrying with backoff");
                }
                self.status.last_error = Some(msg);
                Err(ReconcileError::Apply(e))
            }
        };
        if outcome.is_ok() {
            self.purge_gone_addresses().await;
        }
        // Realized: the networks registrations are accepted for; after a failed apply, also
        // those realized before (they may still exist).
        let mut realized = self.networks.clone();
        if outcome.is_err() {
            realized.extend(self.status.networks.iter().cloned());
            realized.sort();
            realized.dedup();
        }
        self.status.networks = realized;
        if self.source.publishes() {
            self.source.publish(&source::Published {
                workloads: plan::published(&res, self.endpoints.iter()),
                reservations: self.endpoints.reservations(),
            });
        }
        self.source.report(&self.status);
        self.status_file.publish(&self.status);
        let same = ports_of.is_some_and(|r| Arc::ptr_eq(&r, &res));
        self.update_workload_ports(&res, changes.as_ref().filter(|_| same));
        outcome
    }

    /// Brings the workload ports of the metrics up to date ([`follow_workload_ports`]).
    fn update_workload_ports(&mut self, res: &Arc<Resources>, changes: Option<&Changes>) {
        let Ok(mut ports) = self.workload_ports.lock() else {
            return;
        };
        follow_workload_ports(&mut ports, res, changes, self.endpoints.iter());
        self.ports_of = Some(Arc::clone(res));
    }

    fn handle(&mut self, req: &Request) -> Option<Reply> {
        let ready = self.ready.load(Ordering::SeqCst);
        match req {
            Request::Ping => Some(Reply::ok(ready)),
            Request::Report {
                command,
                ok,
                micros,
            } => {
                // The socket server records the reports it reads; one queued here is recorded
                // the same way.
                cni_server::record_report(&self.metrics, &self.mirrors, command, *ok, *micros);
                Some(Reply::ok(ready))
            }
            Request::Identity {
                namespace,
                name,
                vm: given,
            } => Some(identity_reply(
                self.resources.as_deref(),
                ready,
                namespace,
                name,
                given.as_deref(),
            )),
            Request::Activate { host_ifname } => {
                match self.endpoints.activate(host_ifname, &self.cfg.state_dir) {
                    Some(ep) => {
                        info!(port = %host_ifname, vm = ?ep.vm, "the migrated VM announced itself: port activated");
                        self.activated.push(ep);
                        None
                    }
                    None => Some(Reply::ok(ready)),
                }
            }
            Request::Register { endpoint } => {
                if !self.networks.contains(&endpoint.network) {
                    return Some(Reply::error(
                        ready,
                        format!(
                            "network {} is not realized on node {}",
                            endpoint.network, self.cfg.node.name
                        ),
                    ));
                }
                // Its interface names go into nftables text.
                if let Some(bad) = [&endpoint.host_ifname, &endpoint.ifname]
                    .into_iter()
                    .find(|n| weft_dataplane::nft::ifname_literal(n).is_none())
                {
                    return Some(Reply::error(
                        ready,
                        format!("interface name {bad:?} is not one weft can write into nftables"),
                    ));
                }
                // Two ports with one MAC on one LAN would take each other's traffic.
                if let Some(peer) = self
                    .resources
                    .as_deref()
                    .and_then(|res| plan::peer_with_mac(res, endpoint))
                {
                    return Some(Reply::error(
                        ready,
                        format!(
                            "MAC {} is already used on network {} by pod {}/{} on node {}; ask for another MAC, or remove that workload first",
                            endpoint.mac,
                            endpoint.network,
                            peer.workload.namespace,
                            peer.workload.name,
                            peer.node
                        ),
                    ));
                }
                // Two workloads on one host port would take each other's connections.
                if let Some((m, holder)) = self.endpoints.host_port_clash(endpoint) {
                    return Some(Reply::error(
                        ready,
                        format!(
                            "{m} is already used on node {} by {} (container {} interface {}); choose another hostPort, or remove that workload first",
                            self.cfg.node.name,
                            plan::endpoint_name(holder),
                            holder.container_id,
                            holder.ifname
                        ),
                    ));
                }
                self.mirrors.arrived(&endpoint.host_ifname);
                self.endpoints.register(endpoint.clone());
                None
            }
            Request::Unregister {
                network,
                container_id,
                ifname,
            } => {
                if let Some(ep) = self.endpoints.unregister(network, container_id, ifname) {
                    self.mirrors.departed(&ep.host_ifname);
                }
                None
            }
            // The socket server attaches and detaches (see `cni_server::Attachments`) and queues
            // Registers and Unregisters.
            Request::Detach { .. } | Request::Attach { .. } => Some(Reply::error(
                ready,
                "an attach or detach goes to the socket server, not the reconciler",
            )),
        }
    }
}

/// The answer to [`Request::Identity`] from the last snapshot: the VM the pod runs (the given
/// identity, or its `vm.kubevirt.io/name` label), its `weft.dev/networks` annotation, and where
/// the VM runs now if on other nodes (this ADD is then a live migration's target), or else which
/// node keeps its newest reservation (the VM stopped there and starts here).
pub fn identity_reply(
    res: Option<&Resources>,
    ready: bool,
    namespace: &str,
    name: &str,
    given: Option<&str>,
) -> Reply {
    let pod = res.and_then(|r| {
        r.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    });
    let vm = given.map(str::to_string).or_else(|| {
        pod.and_then(|w| w.labels.get(weft_dataplane::proto::VM_NAME_LABEL))
            .map(|vm| format!("{namespace}/{vm}"))
    });
    let networks = pod.and_then(|w| w.networks.clone());
    let (migration, restore) = match (&vm, res) {
        (Some(vm), Some(res)) => {
            let migration = plan::migration_sources(res, vm);
            let restore = plan::restore_sources(res, vm)
                .into_iter()
                .filter(|(network, _)| !migration.contains_key(network))
                .collect();
            (migration, restore)
        }
        _ => Default::default(),
    };
    Reply {
        vm,
        networks,
        migration,
        restore,
        ..Reply::ok(ready)
    }
}

/// Tells the LAN where a just-activated VM is: a gratuitous ARP per IPv4 address and an
/// unsolicited neighbour advertisement per IPv6 address, from the VM's MAC, sent on its
/// network's bridge (the switches move the MAC to this node's uplink at once).
fn announce(plan: &dplan::NodePlan, ep: &Endpoint) {
    let (Some(net), Some(mac)) = (
        plan.networks.iter().find(|n| n.name == ep.network),
        weft_dataplane::names::parse_mac(&ep.mac),
    ) else {
        return;
    };
    let bridge = match Netlink::new().and_then(|mut nl| nl.link_by_name(&net.bridge)) {
        Ok(Some(l)) => l.index,
        _ => return,
    };
    for ip in &ep.ips {
        let frame = match ip {
            IpAddr::V4(v4) => weft_dataplane::frame::arp_request(mac, *v4, *v4),
            IpAddr::V6(v6) => weft_dataplane::frame::unsolicited_na(mac, *v6),
        };
        if let Err(e) = weft_dataplane::frame::send(bridge, &frame) {
            warn!(error = %e, bridge = %net.bridge, "cannot announce the migrated VM");
        }
    }
}

/// The longest wait before retrying a failed reconcile.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential backoff (1 s to [`MAX_RETRY_BACKOFF`]) for retrying a failed reconcile.
#[derive(Debug)]
struct Retry {
    at: Option<std::time::Instant>,
    backoff: backon::ExponentialBackoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            at: None,
            backoff: crate::backoff(MAX_RETRY_BACKOFF).build(),
        }
    }
}

impl Retry {
    fn record(&mut self, ok: bool) {
        if ok {
            *self = Retry::default();
        } else {
            let delay = self.backoff.next().unwrap_or(MAX_RETRY_BACKOFF);
            self.at = Some(std::time::Instant::now() + delay);
        }
    }

    fn due(&self) -> bool {
        self.at.is_some_and(|t| std::time::Instant::now() >= t)
    }
}

/// Raises the soft limit of open descriptors to the hard limit: every ADD holds a socket
/// connection for a moment, and a node starting many pods at once needs more than the usual
/// soft 1024. Best effort.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Runs the agent until SIGINT/SIGTERM; with `metrics_addr`, serves `/metrics`, `/healthz`
/// and `/readyz` there.
pub async fn run(
    cfg: AgentConfig,
    source: Box<dyn ResourceSource>,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    let ready = Arc::new(AtomicBool::new(false));
    let audit_counters = audit::Counters::default();
    let mut registry = prometheus_client::registry::Registry::default();
    let agent_metrics = metrics::AgentMetrics::register(&mut registry, audit_counters.clone());
    let workload_ports = metrics::WorkloadPorts::default();
    if cfg.workload_metrics {
        metrics::register_workload_traffic(&mut registry, workload_ports.clone());
    }
    let anomalies = anomaly::Counts::default();
    metrics::register_anomalies(&mut registry, anomalies.clone());
    raise_descriptor_limit();
    let mut cfg = cfg;
    // weft's own workloads may not reach the agent's HTTP port (its table drops them).
    cfg.agent_ports = metrics_addr.map(|a| vec![a.port()]).unwrap_or_default();
    let metrics_server = match metrics_addr {
        Some(addr) => {
            // At most a few connections, idle ones closed: the HTTP side cannot use up the
            // descriptors the CNI socket needs.
            let listener = crate::controller::metrics::BoundedListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
            let routes = crate::controller::metrics::router(Arc::new(registry), ready.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, routes).await {
                    warn!(error = %e, "the metrics server stopped");
                }
            }))
        }
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    let listener = cni_server::bind(&cfg.socket)?;
    let shared = cni_server::Snapshot::default();
    let reaper = reaper::Reaper::spawn()?;
    let mirrors = mirror::Mirrors::spawn();
    let server = tokio::spawn(cni_server::serve(
        listener,
        cni_server::Server {
            tx: tx.clone(),
            ready: ready.clone(),
            snapshot: shared.clone(),
            pod_wait: source
                .knows_every_pod()
                .then_some(cni_server::IDENTITY_WAIT),
            attachments: cni_server::Attachments {
                state_dir: cfg.state_dir.clone(),
                reaper: reaper.clone(),
            },
            reports: cni_server::Reports {
                metrics: agent_metrics.clone(),
                mirrors: mirrors.clone(),
            },
        },
    ));
    let mut rec = Reconciler {
        workload_ports,
        status_file: StatusFile::spawn(cfg.state_dir.join("status.json")),
        endpoints: EndpointStore::load(&cfg.state_dir),
        cfg: cfg.clone(),
        source,
        ready,
        status: AgentStatus::default(),
        last_problems: Vec::new(),
        bridge_netfilter: None,
        networks: Vec::new(),
        applied: None,
        resources: None,
        shared,
        policy: Arc::default(),
        audit: audit_counters,
        metrics: agent_metrics,
        activated: Vec::new(),
        installed: None,
        resyncs: 0,
        reaper,
        mirrors,
        departures: endpoints::Departures::default(),
        ports_of: None,
        node_state_ready: false,
        waiting: Vec::new(),
    };
    let mirrors = rec.mirrors.clone();
    if let Some(sink) = audit_sink(&cfg) {
        start_audit(
            &cfg,
            sink.clone(),
            rec.policy.clone(),
            rec.audit.clone(),
            rec.metrics.audit_overruns(),
            tx.clone(),
            rec.workload_ports.clone(),
        );
        let detector = anomaly::Detector {
            node: cfg.node.name.clone(),
            ports: rec.workload_ports.clone(),
            thresholds: cfg.anomaly_thresholds,
            sink,
            counts: anomalies,
            publish: rec.source.anomaly_publisher(),
        };
        std::thread::spawn(move || detector.run());
    }
    info!(node = %cfg.node.name, socket = %cfg.socket.display(), endpoints = rec.endpoints.len(), "weft agent starting");
    let mut fingerprint = rec.source.fingerprint().ok();
    let mut retry = Retry::default();
    retry.record(rec.reconcile(Trigger::Start).await.is_ok());
    // Watches (the API's, inotify's on the manifests) wake the loop as changes arrive; a source
    // without them is polled. The tick also retries a failed reconcile.
    let changes = rec.source.changes();
    let mut poll = tokio::time::interval(cfg.poll);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(first) = rx.recv() => {
                // Batch every queued request into one reconcile.
                let mut batch = vec![first];
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                let mut pending = Vec::new();
                for m in batch {
                    match rec.handle(&m.request) {
                        Some(reply) => { let _ = m.reply.send(reply); }
                        None => pending.push(m),
                    }
                }
                if !pending.is_empty() {
                    rec.waiting = pending.into_iter().map(|m| m.reply).collect();
                    let result = rec.reconcile(Trigger::Endpoints).await;
                    retry.record(result.is_ok());
                    let ready = rec.ready.load(Ordering::SeqCst);
                    for reply in std::mem::take(&mut rec.waiting) {
                        let _ = reply.send(match &result {
                            Ok(()) => Reply::ok(ready),
                            Err(e) => Reply::error(ready, crate::error_chain(e)),
                        });
                    }
                }
            }
            _ = async { changes.as_ref()?.notified().await; Some(()) }, if changes.is_some() => {
                let fp = rec.source.fingerprint().ok();
                if fp != fingerprint {
                    fingerprint = fp;
                    retry.record(rec.reconcile(Trigger::ResourcesChanged).await.is_ok());
                }
            }
            _ = poll.tick() => {
                // A source that announces its changes (watches, inotify) is not polled for them;
                // the tick still retries a failed reconcile, and the resync re-reads it anyway.
                let fp = match changes {
                    Some(_) => fingerprint,
                    None => rec.source.fingerprint().ok(),
                };
                if fp != fingerprint {
                    fingerprint = fp;
                    retry.record(rec.reconcile(Trigger::ResourcesChanged).await.is_ok());
                } else if retry.due() {
                    retry.record(rec.reconcile(Trigger::Retry).await.is_ok());
                }
            }
            _ = resync.tick() => {
                rec.endpoints.resync(&cfg.state_dir);
                let registered = rec.endpoints.iter().map(|e| e.host_ifname.clone()).collect();
                rec.reaper.sweep(&cfg.state_dir, &registered);
                if let Some(vms) = rec.resources.as_ref().and_then(|r| r.vms.as_ref()) {
                    let exists = |vm: &str| vms.contains(vm);
                    for (network, vm) in rec.endpoints.forget_deleted(
                        &cfg.state_dir,
                        &exists,
                        now(),
                        RESERVATION_MIN_AGE,
                    ) {
                        info!(%network, %vm, "forgot the reservation of a deleted VM");
                    }
                }
                rec.mirrors.resync();
                retry.record(rec.reconcile(Trigger::Resync).await.is_ok());
            }
            _ = mirrors.changed() => {
                // A mirror's sources or problems changed: report them without a reconcile.
                rec.status.mirrors = mirrors.report();
                rec.source.report(&rec.status);
                rec.status_file.publish(&rec.status);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("weft agent stopping; workloads keep their network");
    if cfg.cleanup_config_on_exit {
        // Without a running agent the conflist would send every new pod to a CNI that fails;
        // the next agent writes it again on its first reconcile.
        match weft_dataplane::state::remove_file(&cfg.cni.conflist_path()) {
            Ok(true) => info!(path = %cfg.cni.conflist_path().display(), "removed the conflist"),
            Ok(false) => {}
            Err(e) => warn!(error = %crate::error_chain(&e), "cannot remove the conflist"),
        }
    }
    server.abort();
    rec.status_file.flush().await;
    if let Some(m) = metrics_server {
        m.abort();
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// Opens the audit log (standard output without `--audit-log`), shared by the audit reader
/// and the anomaly detector; `None` when it cannot be opened (both are then off).
fn audit_sink(cfg: &AgentConfig) -> Option<anomaly::Sink> {
    let out: Box<dyn std::io::Write + Send> = match &cfg.audit_log {
        None => Box::new(std::io::stdout()),
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot open the audit log; audit records and anomalies are off");
                return None;
            }
        },
    };
    Some(Arc::new(std::sync::Mutex::new(out)))
}

/// Starts the audit reader (a thread on NFLOG group 2727); without it the agent still works.
fn start_audit(
    cfg: &AgentConfig,
    out: anomaly::Sink,
    policy: audit::SharedPolicy,
    counters: audit::Counters,
    overruns: prometheus_client::metrics::counter::Counter,
    queue: mpsc::Sender<Message>,
    ports: metrics::WorkloadPorts,
) {
    match audit::bind() {
        Ok(socket) => {
            let node = cfg.node.name.clone();
            // A pending port's announcement: the reconciler activates the port.
            let on_activate = Box::new(move |index: u32| {
                let Ok(Some(link)) = Netlink::new().and_then(|mut nl| nl.link_by_index(index))
                else {
                    return;
                };
                let (reply, _) = oneshot::channel();
                let request = Request::Activate {
                    host_ifname: link.name,
                };
                let _ = queue.blocking_send(Message { request, reply });
            });
            // A logged copy's receiver: the workload of the port it was leaving by.
            let receiver = Box::new(move |index: u32| {
                let link = Netlink::new()
                    .and_then(|mut nl| nl.link_by_index(index))
                    .ok()??;
                let ports = ports.lock().ok()?;
                ports
                    .iter()
                    .find(|p| p.host_ifname == link.name)
                    .map(|p| format!("{}/{}", p.namespace, p.pod))
            });
            let reader = audit::Reader {
                node,
                compiled: policy,
                out,
                counters,
                on_activate,
                overruns,
                receiver,
            };
            std::thread::spawn(move || reader.run(socket));
        }
        Err(e) => {
            warn!(error = %e, "cannot bind NFLOG group {}; audit records are off", audit::LOG_GROUP)
        }
    }
}

/// Removes everything weft created on this node (`weft-operator agent cleanup`).
pub fn cleanup(cfg: &AgentConfig) -> anyhow::Result<Vec<String>> {
    let mut links = Netlink::new()?;
    let mut fw = NftCli::default();
    let mut report = dplan::cleanup(&mut links, &mut fw, &mut ProcSysctls, &cfg.state_dir)?;
    report.changes.extend(cfg.cni.uninstall()?);
    let ipam = cfg.state_dir.join("ipam");
    if ipam.exists() {
        std::fs::remove_dir_all(&ipam)?;
        report.changes.push(format!("removed {}", ipam.display()));
    }
    let _ = state::remove_file(&cfg.state_dir.join("status.json"));
    // The state dir's own subdirectories, once emptied above (a file weft does not know is kept).
    for dir in ["networks", "uplinks", dplan::SYSCTL_RECORDS] {
        let path = cfg.state_dir.join(dir);
        if std::fs::remove_dir(&path).is_ok() {
            report.changes.push(format!("removed {}", path.display()));
        }
    }
    Ok(report.changes)
}

#[cfg(test)]
mod workload_ports_tests {
    use super::*;

    fn ep(cid: &str, ip: &str, pod: &str) -> Endpoint {
        Endpoint {
            pod_namespace: Some("ns".into()),
            pod_name: Some(pod.into()),
            ..endpoints::tests::ep(cid, ip, false)
        }
    }

    fn sorted(ports: &[metrics::WorkloadPort]) -> Vec<(String, String, Vec<IpAddr>)> {
        let mut v: Vec<_> = ports
            .iter()
            .map(|p| (p.host_ifname.clone(), p.pod.clone(), p.ips.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_ports_followed_change_by_change_are_those_built_from_every_endpoint() {
        let res = Resources::default();
        let mut eps = EndpointStore::default();
        let mut ports = Vec::new();
        let follow = |eps: &mut EndpointStore, ports: &mut Vec<metrics::WorkloadPort>| {
            let changes = eps.take_changes();
            follow_workload_ports(ports, &res, changes.as_ref(), eps.iter());
            let mut all = Vec::new();
            follow_workload_ports(&mut all, &res, None, eps.iter());
            assert_eq!(sorted(ports), sorted(&all));
        };
        for (cid, ip) in [("a", "10.0.0.2"), ("b", "10.0.0.3"), ("c", "10.0.0.4")] {
            eps.register(ep(cid, ip, cid));
        }
        follow(&mut eps, &mut ports);
        assert_eq!(ports.len(), 3);
        eps.unregister("n", "b", "eth0");
        eps.register(ep("d", "10.0.0.5", "d"));
        // A changed endpoint: its old port goes, the new one comes.
        eps.register(ep("c", "10.0.0.4", "c-renamed"));
        follow(&mut eps, &mut ports);
        assert_eq!(
            sorted(&ports)
                .iter()
                .map(|p| p.1.as_str())
                .collect::<Vec<_>>(),
            ["a", "c-renamed", "d"]
        );
        eps.unregister("n", "a", "eth0");
        eps.unregister("n", "c", "eth0");
        eps.unregister("n", "d", "eth0");
        follow(&mut eps, &mut ports);
        assert!(ports.is_empty());
    }
}

#[cfg(test)]
mod reconcile_error_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_source_not_listed_yet_is_a_healthy_wait_and_each_error_keeps_its_cause() {
        let waiting = ReconcileError::from(source::SourceError::NotSynced {
            what: "pods".into(),
        });
        assert!(waiting.is_waiting_first_list());
        assert_eq!(
            crate::error_chain(&waiting),
            "waiting for the first list of pods from the Kubernetes API"
        );
        let missing = ReconcileError::from(source::SourceError::NodeNotFound { node: "n1".into() });
        assert!(!missing.is_waiting_first_list());
        assert!(crate::error_chain(&missing).starts_with("node n1 is not in the Kubernetes API"));
        let foreign = ReconcileError::from(ApplyError::ForeignLink {
            name: "wn-lan".into(),
            alias: None,
        });
        assert!(!foreign.is_waiting_first_list());
        assert!(
            crate::error_chain(&foreign)
                .starts_with("link wn-lan exists but was not created by weft"),
            "{foreign}"
        );
    }
}

#[cfg(test)]
mod status_file_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn generation(path: &std::path::Path) -> Option<u64> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["generation"].as_u64()
    }

    #[tokio::test]
    async fn a_burst_of_statuses_is_written_as_its_newest_and_flush_writes_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let file = StatusFile::spawn(path.clone());
        let status = |generation| AgentStatus {
            generation,
            ..AgentStatus::default()
        };
        let first = Instant::now();
        file.publish(&status(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while generation(&path) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "the first status was never written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Within the interval after a write, a burst waits for the next write, which takes
        // its newest status.
        for g in 2..=50 {
            file.publish(&status(g));
        }
        // The first write started after `first`: the next cannot start before `first` and
        // the interval (checked while that holds; a machine too slow to get here in time
        // skips the check).
        tokio::time::sleep(STATUS_WRITE_INTERVAL / 4).await;
        let seen = generation(&path);
        if first.elapsed() < STATUS_WRITE_INTERVAL {
            assert_eq!(seen, Some(1), "no write within the interval");
        }
        tokio::time::sleep(STATUS_WRITE_INTERVAL * 3).await;
        assert_eq!(generation(&path), Some(50));
        // Shutting down writes the last status at once, whatever the interval.
        file.publish(&status(51));
        file.flush().await;
        assert_eq!(generation(&path), Some(51));
    }
}

#[cfg(test)]
mod answer_applied_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Registrations are answered once their apply went through, by a ready agent only (one
    /// not ready yet answers after the reconcile that makes it ready, with its `ready`).
    #[test]
    fn a_ready_agent_answers_the_waiting_registrations_once_applied() {
        let ready = AtomicBool::new(false);
        let (tx, mut rx) = oneshot::channel();
        let mut waiting = vec![tx];
        answer_applied(&ready, &mut waiting);
        assert_eq!(waiting.len(), 1, "not ready: left for the reconcile's end");
        assert!(rx.try_recv().is_err());
        ready.store(true, Ordering::SeqCst);
        answer_applied(&ready, &mut waiting);
        assert!(waiting.is_empty());
        let reply = rx.try_recv().unwrap();
        assert!(reply.ok && reply.ready, "{reply:?}");
    }
}

//! The agent's Unix socket: one JSON request line in, one JSON reply line out.

use super::conn::{self, Conn};
use super::{Busy, Message, at_once, blocking};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;
use tracing::warn;
use weft_dataplane::attachment::{self, Ask, AskError, Attached, Identity};
use weft_dataplane::codes::{AGENT_REFUSED, INVALID_CONFIG, IO_FAILURE, TRY_AGAIN_LATER};
use weft_dataplane::ipam::IpamStore;
use weft_dataplane::proto::{DetachedInterface, Endpoint, Reply, Request};
use weft_dataplane::state::NetworkState;

/// Binds the socket (replacing a stale one), readable and writable by root only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The agent's last snapshot of its resources (none before the first), shared with the socket
/// server; waiting on it is event-driven (a `watch` channel), not polling.
#[derive(Debug, Clone)]
pub struct Snapshot {
    tx: watch::Sender<Option<Arc<crate::model::Resources>>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            tx: watch::channel(None).0,
        }
    }
}

impl Snapshot {
    /// Replaces the snapshot and wakes whoever waits for a pod.
    pub fn publish(&self, resources: Arc<crate::model::Resources>) {
        self.tx.send_replace(Some(resources));
    }

    /// The current snapshot.
    pub fn current(&self) -> Option<Arc<crate::model::Resources>> {
        self.tx.borrow().clone()
    }

    /// The first snapshot (the current one or a later one) that knows pod `namespace/name`,
    /// or `None` when none does within `wait`.
    pub async fn wait_for_pod(
        &self,
        namespace: &str,
        name: &str,
        wait: Duration,
    ) -> Option<Arc<crate::model::Resources>> {
        let mut rx = self.tx.subscribe();
        let found = rx.wait_for(|s| s.as_deref().is_some_and(|r| has_pod(r, namespace, name)));
        match tokio::time::timeout(wait, found).await {
            Ok(Ok(s)) => s.clone(),
            _ => None,
        }
    }
}

fn has_pod(res: &crate::model::Resources, namespace: &str, name: &str) -> bool {
    res.workloads
        .iter()
        .any(|w| w.namespace == namespace && w.name == name)
}

/// What attaches and detaches workloads: the node's IPAM stores, which the agent keeps, and
/// the reaper of host links.
#[derive(Debug, Clone)]
pub struct Attachments {
    /// The agent's state directory (the IPAM stores, the networks' runtime state).
    pub state_dir: PathBuf,
    /// Deletes the host link if the namespace's teardown does not.
    pub reaper: super::reaper::Reaper,
}

/// Why an allocation failed: a store's lock held (`wait` false), or the error to answer.
enum AllocFailure {
    Busy,
    Refused(AskError),
}

impl From<AskError> for AllocFailure {
    fn from(e: AskError) -> Self {
        AllocFailure::Refused(e)
    }
}

impl Attachments {
    /// The IPAM store of `network`, waiting for its lock or not.
    fn store(
        &self,
        network: &str,
        wait: bool,
    ) -> Result<IpamStore, weft_dataplane::ipam::IpamError> {
        let store = IpamStore::open(&self.state_dir, network)?;
        Ok(if wait { store } else { store.without_waiting() })
    }

    /// Allocates every interface of `ask`, each with the endpoint it registers: all or nothing
    /// (on failure, what was allocated is released). Without `wait`, a store's lock held is
    /// [`Busy`], and so is any failure after an interface was allocated: what was allocated
    /// is kept for the same call with `wait`, which finds those allocations (an attachment's
    /// allocation is idempotent) and releases them if it fails.
    pub fn allocate(
        &self,
        ask: &Ask,
        identity: &Identity,
        wait: bool,
    ) -> Result<Result<Vec<(Attached, Endpoint)>, AskError>, Busy> {
        match self.allocate_all(ask, identity, wait) {
            Ok(done) => Ok(Ok(done)),
            Err(AllocFailure::Refused(e)) => Ok(Err(e)),
            Err(AllocFailure::Busy) => Err(Busy),
        }
    }

    fn allocate_all(
        &self,
        ask: &Ask,
        identity: &Identity,
        wait: bool,
    ) -> Result<Vec<(Attached, Endpoint)>, AllocFailure> {
        // Its only error is a busy store (one that cannot be read is skipped).
        let held = attachment::held(&self.state_dir, ask, identity, wait)
            .map_err(|_| AllocFailure::Busy)?;
        let list = attachment::interfaces(ask, identity, &held)?;
        if let Some(network) = attachment::marked_default_route(identity) {
            attachment::check_default_route(&self.network(&network)?)?;
        }
        let mut done: Vec<(Attached, Endpoint)> = Vec::new();
        for iface in &list {
            match self.allocate_one(ask, identity, iface, wait) {
                Ok(a) => done.push(a),
                Err(AllocFailure::Refused(mut e)) if wait || done.is_empty() => {
                    self.release_all(&ask.container_id, done.iter().map(|(a, _)| a));
                    e.details = iface.annotate(&e.details);
                    return Err(AllocFailure::Refused(e));
                }
                // A lock held; or a failure with allocations to undo, which the call that
                // waits undoes (it fails the same way, and its releases wait for the locks).
                Err(_) => return Err(AllocFailure::Busy),
            }
        }
        Ok(done)
    }

    fn allocate_one(
        &self,
        ask: &Ask,
        identity: &Identity,
        iface: &attachment::Interface,
        wait: bool,
    ) -> Result<(Attached, Endpoint), AllocFailure> {
        let net = self.network(&iface.network)?;
        let (req, carried) = attachment::alloc_request(ask, identity, iface);
        attachment::check_trunk(&req.vlan_trunk, &net)?;
        let alloc = self
            .store(&iface.network, wait)
            .and_then(|s| s.allocate(&net.pool(), req))
            .map_err(|e| {
                if e.is_busy() {
                    return AllocFailure::Busy;
                }
                AllocFailure::Refused(AskError {
                    code: e.cni_code(),
                    msg: e.summary().to_string(),
                    details: crate::error_chain(&e),
                })
            })?;
        Ok((
            Attached {
                interface: iface.clone(),
                ips: alloc.ips.clone(),
                mac: weft_dataplane::names::format_mac(alloc.effective_mac()),
                host_ifname: alloc.host_link_name(),
                carried,
            },
            Endpoint::from_allocation(&iface.network, &alloc),
        ))
    }

    /// The runtime state of `network` on this node: code 11 while the agent has not realized it.
    fn network(&self, network: &str) -> Result<NetworkState, AskError> {
        NetworkState::read(&self.state_dir, network).map_err(|e| {
            if e.is_not_found() {
                AskError {
                    code: TRY_AGAIN_LATER,
                    msg: format!("network {network} is not ready on this node"),
                    details: format!(
                        "no runtime state at {}: the weft agent writes it once the Network {network} exists and its nodeSelector selects this node",
                        NetworkState::path(&self.state_dir, network).display()
                    ),
                }
            } else {
                AskError {
                    code: IO_FAILURE,
                    msg: "cannot read network state".into(),
                    details: crate::error_chain(&e),
                }
            }
        })
    }

    fn release(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
        wait: bool,
    ) -> Result<Result<Option<weft_dataplane::ipam::Allocation>, String>, Busy> {
        let released = self.store(network, wait).and_then(|s| {
            s.release(&weft_dataplane::ipam::Attachment {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            })
        });
        match released {
            Err(e) if e.is_busy() => Err(Busy),
            other => Ok(other
                .map_err(|e| format!("cannot release the addresses: {}", crate::error_chain(&e)))),
        }
    }

    /// Where `container_id`'s interface `ifname` is allocated, and the interfaces its ADD made
    /// from the pod's annotation, still allocated ([`IpamStore::related_or_busy`]). Without
    /// `wait`, a store whose lock a write holds is [`Busy`].
    fn related(
        &self,
        container_id: &str,
        ifname: &str,
        wait: bool,
    ) -> Result<weft_dataplane::ipam::Related, Busy> {
        IpamStore::related_or_busy(&self.state_dir, container_id, ifname, wait).map_err(|_| Busy)
    }

    /// Releases the addresses of the interfaces of an ADD that failed or was refused (best
    /// effort: what cannot be released is logged, and GC or a resync finds it).
    fn release_all<'a>(&self, container_id: &str, interfaces: impl Iterator<Item = &'a Attached>) {
        for a in interfaces {
            let released = self.release(
                &a.interface.network,
                container_id,
                &a.interface.ifname,
                true,
            );
            if let Ok(Err(e)) = released {
                warn!(error = %e, network = %a.interface.network, ifname = %a.interface.ifname, "cannot release an interface of a failed ADD");
            }
        }
    }

    /// Hands the host link of `container_id`'s interface `ifname` to the reaper, if there is
    /// one (an interface with no addresses left to release).
    fn reap_host_link(&self, container_id: &str, ifname: &str) {
        let host = weft_dataplane::names::host_veth_name(container_id, ifname);
        if let Err(e) = self.reaper.reap(&host) {
            debug!(%host, error = %e, "no host link to reap");
        }
    }

    /// Releases the attachment's addresses and hands its host link to the reaper: what must be
    /// done before its DEL returns. Its rules are taken out by the reconciler. Without `wait`,
    /// the store's lock held is [`Busy`] (nothing done).
    pub fn detach(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
        wait: bool,
    ) -> Result<Result<(), String>, Busy> {
        let released = match self.release(network, container_id, ifname, wait)? {
            Ok(released) => released,
            Err(e) => return Ok(Err(e)),
        };
        let host = released.map_or_else(
            || weft_dataplane::names::host_veth_name(container_id, ifname),
            |a| a.host_link_name(),
        );
        Ok(self
            .reaper
            .reap(&host)
            .map(|_| ())
            .map_err(|e| format!("cannot find host link {host}: {e}")))
    }
}

/// How long an identity question waits for a pod the agent's cache has not seen yet (cluster
/// mode) before the CNI is told to try again later. Below the CNI's default agent timeout (5 s),
/// so the CNI hears the reason rather than a timeout.
pub const IDENTITY_WAIT: Duration = Duration::from_secs(3);

/// Accepts connections forever. Serves the CNI's requests with `server`: identity questions
/// straight from its snapshot; an ADD's attach and a DEL's detach with its IPAM stores, their
/// registrations then (without waiting) through the reconciler's queue, where the rules go
/// before those of any later request; everything else through the queue. With `pod_wait` (the
/// source knows every pod of the node) an identity question about a pod the snapshot lacks
/// waits that long for it, then fails (the CNI answers "try again later"); never a silent
/// answer without the pod's networks and VM.
pub async fn serve(listener: UnixListener, server: Server) {
    // Shared by the connections, not copied for each.
    let server = Arc::new(server);
    // Its connections are registered for reading only (see [`Conn`]), and so is it.
    let listener = match listener.into_std().and_then(conn::reading) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "the CNI socket cannot be served");
            return;
        }
    };
    loop {
        let accepted = match listener.readable().await {
            Ok(mut ready) => match ready.try_io(|l| l.get_ref().accept()) {
                Ok(accepted) => accepted.and_then(|(stream, _)| Conn::new(stream)),
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        match accepted {
            Ok(conn) => {
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    if let Err(e) = connection(conn, &server).await {
                        debug!(error = %e, "cni connection ended");
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// What every connection of the socket server shares.
#[derive(Debug, Clone)]
pub struct Server {
    /// The reconciler's queue.
    pub tx: mpsc::Sender<Message>,
    /// The agent has reconciled the node.
    pub ready: Arc<AtomicBool>,
    /// The agent's last snapshot of its resources.
    pub snapshot: Snapshot,
    /// How long an identity question waits for a pod the snapshot lacks (see [`serve`]).
    pub pod_wait: Option<Duration>,
    /// The IPAM stores and the reaper.
    pub attachments: Attachments,
    /// Where the CNI's reports of its operations go.
    pub reports: Reports,
}

/// Where a CNI's report of an ADD or DEL ([`Request::Report`]) goes, on the connection's own
/// thread (the reconciler is not woken for it): the metrics, and the mirrors, which an ADD's
/// new links may concern.
#[derive(Clone)]
pub struct Reports {
    /// The agent's metrics.
    pub metrics: super::metrics::AgentMetrics,
    /// The mirrors' task.
    pub mirrors: super::mirror::Mirrors,
}

impl std::fmt::Debug for Reports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reports").finish_non_exhaustive()
    }
}

impl Reports {
    /// Records an operation's report.
    pub fn record(&self, command: &str, ok: bool, micros: u64) {
        record_report(&self.metrics, &self.mirrors, command, ok, micros);
    }
}

/// Records a CNI's report of an operation in `metrics`, and tells `mirrors` of an ADD's links.
pub fn record_report(
    metrics: &super::metrics::AgentMetrics,
    mirrors: &super::mirror::Mirrors,
    command: &str,
    ok: bool,
    micros: u64,
) {
    metrics.cni(command, ok, Duration::from_micros(micros));
    // An ADD wired its links: a mirror waiting for them can be installed.
    if ok && command == "ADD" {
        mirrors.links_changed();
    }
}

impl Server {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Queues the unregistration of an attachment for the reconciler, without waiting for its
    /// answer; `false` when the reconciler is gone (the agent is shutting down).
    async fn unregister(&self, network: &str, container_id: &str, ifname: &str) -> bool {
        let (reply, _) = oneshot::channel();
        let request = Request::Unregister {
            network: network.to_string(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        };
        self.tx.send(Message { request, reply }).await.is_ok()
    }
}

/// The answer to an identity question: from the snapshot that knows the pod; when the source
/// knows every pod (`pod_wait`) and none does within the wait, an error naming the pod.
pub async fn identity(
    snapshot: &Snapshot,
    ready: bool,
    namespace: &str,
    name: &str,
    vm: Option<&str>,
    pod_wait: Option<Duration>,
) -> Reply {
    let res = match pod_wait {
        None => snapshot.current(),
        Some(wait) => match snapshot.wait_for_pod(namespace, name, wait).await {
            Some(r) => Some(r),
            None => {
                return Reply::error(
                    ready,
                    format!(
                        "pod {namespace}/{name} is not in the agent's cache yet (waited {} ms): its networks and VM identity are unknown; try again later",
                        wait.as_millis()
                    ),
                );
            }
        },
    };
    super::identity_reply(res.as_deref(), ready, namespace, name, vm)
}

/// What is wrong with pod `namespace/name`'s limit annotations, if anything.
fn limit_problem(snapshot: &Snapshot, namespace: &str, name: &str) -> Option<String> {
    let res = snapshot.current()?;
    let pod = res
        .workloads
        .iter()
        .find(|w| w.namespace == namespace && w.name == name)?;
    weft_crds::Limits::from_annotations(&pod.limits).err()
}

/// Writes one reply line.
async fn answer(write: &mut (impl AsyncWrite + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(reply).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

/// An ADD ([`Request::Attach`]): the pod's identity, every interface's allocation and its
/// registration queued, the first answer (the interfaces, which the CNI wires meanwhile), then
/// the second once the rules are in force; a refusal unregisters what was accepted and
/// releases every address before it is answered.
async fn attach(
    ask: Ask,
    write: &mut (impl AsyncWrite + Unpin),
    server: &Server,
) -> std::io::Result<()> {
    let is_ready = || server.is_ready();
    let identity = match (&ask.pod_namespace, &ask.pod_name) {
        (Some(namespace), Some(name)) => {
            let reply = identity(
                &server.snapshot,
                is_ready(),
                namespace,
                name,
                ask.vm.as_deref(),
                server.pod_wait,
            )
            .await;
            if !reply.ok {
                let details = reply.error.clone().unwrap_or_default();
                return answer(
                    write,
                    &Reply::failed(
                        is_ready(),
                        TRY_AGAIN_LATER,
                        format!("the weft agent does not know pod {namespace}/{name} yet"),
                        details,
                    ),
                )
                .await;
            }
            // Limit annotations that do not parse: the pod does not start (a later change to
            // them is reported, and its Network's limits stay).
            if let Some(problem) = limit_problem(&server.snapshot, namespace, name) {
                return answer(
                    write,
                    &Reply::failed(
                        is_ready(),
                        INVALID_CONFIG,
                        format!("pod {namespace}/{name} has an invalid limit annotation"),
                        problem,
                    ),
                )
                .await;
            }
            Identity::of(&reply)
        }
        _ => Identity::default(),
    };
    let allocated = match at_once(|wait| server.attachments.allocate(&ask, &identity, wait)) {
        Ok(a) => a,
        Err(e) => {
            return answer(write, &Reply::failed(is_ready(), e.code, e.msg, e.details)).await;
        }
    };
    let mut waiting = Vec::new();
    for (_, endpoint) in &allocated {
        let (reply, answered) = oneshot::channel();
        let request = Request::Register {
            endpoint: endpoint.clone(),
        };
        if server.tx.send(Message { request, reply }).await.is_err() {
            break;
        }
        waiting.push(answered);
    }
    let first = Reply {
        attached: allocated.iter().map(|(a, _)| a.clone()).collect(),
        ..Reply::ok(is_ready())
    };
    // A CNI gone meanwhile (killed) leaves the attachment to the runtime's DEL.
    let written = answer(write, &first).await;
    let mut refused =
        (waiting.len() < allocated.len()).then(|| "the agent is shutting down".to_string());
    for answered in waiting {
        match answered.await {
            Ok(r) if r.ok => {}
            Ok(r) => {
                refused.get_or_insert(r.error.unwrap_or_default());
            }
            Err(_) => {
                refused.get_or_insert("the agent dropped the request".into());
            }
        }
    }
    let second = match refused {
        None => Reply::ok(is_ready()),
        Some(reason) => {
            for (a, _) in &allocated {
                let (network, ifname) = (&a.interface.network, &a.interface.ifname);
                server.unregister(network, &ask.container_id, ifname).await;
            }
            blocking(|| {
                server
                    .attachments
                    .release_all(&ask.container_id, allocated.iter().map(|(a, _)| a));
            });
            Reply::failed(
                is_ready(),
                AGENT_REFUSED,
                "the weft agent refused the endpoint",
                reason,
            )
        }
    };
    written?;
    answer(write, &second).await?;
    write.shutdown().await
}

/// How long a connection's follow-up line is waited for after its answers: a CNI sends its
/// report at once, or exits and so closes the connection.
const FOLLOW_UP_WAIT: Duration = Duration::from_secs(5);

/// One connection: a request, its answers, then at most one follow-up line ([`follow_up`]).
async fn connection(conn: Conn, server: &Server) -> std::io::Result<()> {
    let mut read = BufReader::new(conn);
    let mut line = String::new();
    read.read_line(&mut line).await?;
    respond(&line, read.get_mut(), server).await?;
    follow_up(read, server).await
}

/// The line a client may send after the answers
/// ([`weft_dataplane::proto::Pending::follow_with`]): a CNI's report of the operation the
/// connection served, for the metrics; anything else is ignored.
async fn follow_up(mut read: BufReader<Conn>, server: &Server) -> std::io::Result<()> {
    let mut line = String::new();
    match tokio::time::timeout(FOLLOW_UP_WAIT, read.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return Ok(()),
    }
    match serde_json::from_str::<Request>(&line) {
        Ok(Request::Report {
            command,
            ok,
            micros,
        }) => server.reports.record(&command, ok, micros),
        _ => debug!("a line after the answers that is not a report: ignored"),
    }
    Ok(())
}

/// A DEL's detach of interface `ifname` and, `with_extras`, of the interfaces its ADD made
/// from the pod's annotation (named in the reply). The addresses are free and the links in the
/// reaper's hands when the DEL returns; the rules follow in the reconciler's next batch
/// (removing set elements waits for an RCU grace period, which the DEL need not), ahead of
/// every request queued after this one.
async fn detach(
    server: &Server,
    network: &str,
    container_id: &str,
    ifname: &str,
    with_extras: bool,
) -> Reply {
    let ready = server.is_ready();
    // Reads of the stores, which hold their locks shared: on this thread, unless a write holds
    // one. The interface is detached from the network that holds it: the conflist's, unless
    // the pod's annotation put it on another (its first entry), which the DEL does not name.
    let related = at_once(|wait| server.attachments.related(container_id, ifname, wait));
    // The runtime's DEL (with extras) of a name that is another interface's child leaves it.
    let own = related.owners_or(network, with_extras);
    let anothers = with_extras && related.is_anothers();
    let extras = if with_extras {
        related.children
    } else {
        Vec::new()
    };
    let all: Vec<(&str, &str)> = own
        .iter()
        .map(|n| (n.as_str(), ifname))
        .chain(extras.iter().map(|(n, i)| (n.as_str(), i.as_str())))
        .collect();
    if own.is_empty() && !anothers {
        // Allocated nowhere, and no network named: only its link may be left. (A name that is
        // another interface's child is that one's: its link too.)
        server.attachments.reap_host_link(container_id, ifname);
    }
    // Unregistered first, so their rules go before those of any request that could follow the
    // release (an ADD given the same address). The reconciler does not wait for the release: a
    // resync meanwhile keeps the endpoints out (their tombstones).
    for &(network, ifname) in &all {
        if !server.unregister(network, container_id, ifname).await {
            return Reply::error(false, "the agent is shutting down");
        }
    }
    let errors: Vec<String> = all
        .iter()
        .filter_map(|&(network, ifname)| {
            let done = at_once(|wait| {
                server
                    .attachments
                    .detach(network, container_id, ifname, wait)
            });
            done.err().map(|e| format!("{network}/{ifname}: {e}"))
        })
        .collect();
    if !errors.is_empty() {
        return Reply::error(ready, errors.join("; "));
    }
    Reply {
        detached: with_extras.then(|| {
            extras
                .into_iter()
                .map(|(network, ifname)| DetachedInterface { network, ifname })
                .collect()
        }),
        ..Reply::ok(ready)
    }
}

/// Answers request `line` on `write`, and shuts the writing side.
async fn respond(
    line: &str,
    write: &mut (impl AsyncWrite + Unpin),
    server: &Server,
) -> std::io::Result<()> {
    let reply = match serde_json::from_str::<Request>(line) {
        Err(e) => Reply::error(
            server.is_ready(),
            format!("{}{e}", weft_dataplane::proto::BAD_REQUEST),
        ),
        // Answered twice: written there.
        Ok(Request::Attach { ask }) => return attach(ask, write, server).await,
        Ok(Request::Identity {
            namespace,
            name,
            vm,
        }) => {
            identity(
                &server.snapshot,
                server.is_ready(),
                &namespace,
                &name,
                vm.as_deref(),
                server.pod_wait,
            )
            .await
        }
        Ok(Request::Detach {
            network,
            container_id,
            ifname,
            with_extras,
        }) => detach(server, &network, &container_id, &ifname, with_extras).await,
        Ok(Request::Report {
            command,
            ok,
            micros,
        }) => {
            server.reports.record(&command, ok, micros);
            Reply::ok(server.is_ready())
        }
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if server
                .tx
                .send(Message {
                    request,
                    reply: reply_tx,
                })
                .await
                .is_err()
            {
                Reply::error(false, "the agent is shutting down")
            } else {
                reply_rx
                    .await
                    .unwrap_or_else(|_| Reply::error(false, "the agent dropped the request"))
            }
        }
    };
    answer(write, &reply).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Resources, WorkloadMeta};

    fn with_pod(name: &str) -> Arc<Resources> {
        Arc::new(Resources {
            workloads: vec![WorkloadMeta {
                namespace: "default".into(),
                name: name.into(),
                networks: Some("nat-demo,lan".into()),
                limits: Default::default(),
                ..WorkloadMeta::default()
            }],
            ..Resources::default()
        })
    }

    fn network(dir: &Path, name: &str, block: &str) {
        NetworkState {
            name: name.into(),
            mode: weft_dataplane::state::NetworkMode::Nat,
            bridge: format!("wn-{name}"),
            mtu: 1500,
            subnet_v4: Some("10.9.0.0/16".parse().unwrap()),
            subnet_v6: None,
            gateway_v4: Some("10.9.0.1".parse().unwrap()),
            gateway_v6: None,
            block_v4: Some(block.parse().unwrap()),
            block_v6: None,
            exclude: vec![],
            anti_spoofing: true,
            vlan_filtering: None,
        }
        .write(dir)
        .unwrap();
    }

    /// A ready server on the IPAM stores under `dir`, its reconciler's queue `tx`.
    fn server_on(dir: &Path, tx: mpsc::Sender<Message>) -> Server {
        Server {
            tx,
            ready: Arc::new(AtomicBool::new(true)),
            snapshot: Snapshot::default(),
            pod_wait: None,
            attachments: Attachments {
                state_dir: dir.to_path_buf(),
                reaper: super::super::reaper::Reaper::spawn().unwrap(),
            },
            reports: reports(),
        }
    }

    /// Fresh metrics and a mirrors' task without a plan (inside a runtime).
    fn reports() -> Reports {
        Reports {
            metrics: super::super::metrics::AgentMetrics::default(),
            mirrors: super::super::mirror::Mirrors::spawn(),
        }
    }

    /// How many allocations `network`'s store holds, read from its file (without the store's
    /// lock, which some tests hold).
    fn held(dir: &Path, network: &str) -> usize {
        let path = IpamStore::open(dir, network)
            .unwrap()
            .dir()
            .join(weft_dataplane::ipam::ALLOCATIONS_FILE);
        let Ok(bytes) = std::fs::read(path) else {
            return 0;
        };
        let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        file["allocations"].as_array().map_or(0, Vec::len)
    }

    /// Networks `a` and `b` in a fresh state directory, the attachments over it, pod p1's ADD
    /// on `a`, and its identity, whose annotation asks for both.
    fn two_networks() -> (tempfile::TempDir, Attachments, Ask, Identity) {
        let dir = tempfile::tempdir().unwrap();
        network(dir.path(), "a", "10.9.1.0/24");
        network(dir.path(), "b", "10.9.2.0/24");
        let attachments = Attachments {
            state_dir: dir.path().to_path_buf(),
            reaper: super::super::reaper::Reaper::spawn().unwrap(),
        };
        let ask = Ask {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p1".into(),
            pod_namespace: Some("default".into()),
            pod_name: Some("p1".into()),
            network: Some("a".into()),
            ..Ask::default()
        };
        let identity = Identity {
            networks: Some("a,b".into()),
            ..Identity::default()
        };
        (dir, attachments, ask, identity)
    }

    #[test]
    fn an_attach_allocates_every_interface_or_none() {
        let (dir, attachments, ask, identity) = two_networks();
        let ask = Ask {
            port_mappings: vec![weft_dataplane::proto::PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: None,
            }],
            ..ask
        };
        let done = attachments
            .allocate(&ask, &identity, true)
            .unwrap()
            .unwrap();
        let names: Vec<(&str, &str)> = done
            .iter()
            .map(|(a, _)| (a.interface.network.as_str(), a.interface.ifname.as_str()))
            .collect();
        assert_eq!(names, [("a", "eth0"), ("b", "net1")]);
        // One record: the endpoint registered is the allocation's, host ports on CNI_IFNAME.
        let (a, ep) = &done[0];
        assert_eq!(
            (ep.ips.clone(), ep.mac.clone()),
            (a.ips.clone(), a.mac.clone())
        );
        assert_eq!(ep.port_mappings.len(), 1);
        assert!(done[1].1.port_mappings.is_empty());
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (1, 1));
        // A Network not ready on the node: code 11 naming it, and nothing kept.
        let missing = Identity {
            networks: Some("a,c".into()),
            ..Identity::default()
        };
        let other = Ask {
            container_id: "c2".into(),
            ..ask.clone()
        };
        let e = attachments
            .allocate(&other, &missing, true)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, TRY_AGAIN_LATER, "{e:?}");
        assert!(e.msg.contains("network c"), "{e:?}");
        assert!(e.details.contains("weft.dev/networks"), "{e:?}");
        assert_eq!(held(dir.path(), "a"), 1, "c2's interface on a was released");
        // Its DEL: the addresses go.
        attachments
            .detach("a", "c1", "eth0", true)
            .unwrap()
            .unwrap();
        attachments
            .detach("b", "c1", "net1", true)
            .unwrap()
            .unwrap();
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (0, 0));
    }

    /// Without waiting, a store whose lock another operation holds makes the whole attach
    /// [`Busy`], keeping what it allocated before for the call that waits, which finds the
    /// same allocations; so does any failure after an allocation; a detach is busy before it
    /// releases anything.
    #[test]
    fn a_store_locked_elsewhere_makes_the_attach_busy_and_the_waiting_one_finds_its_allocations() {
        let (dir, attachments, ask, identity) = two_networks();
        // Another process's operation on b's store.
        let lock = IpamStore::open(dir.path(), "b")
            .unwrap()
            .dir()
            .join(weft_dataplane::ipam::LOCK_FILE);
        let other = std::fs::File::create(&lock).unwrap();
        other.lock().unwrap();
        // Busy at the read of the stores the annotation's interfaces may be on, before any
        // allocation (a read holds a store's lock shared).
        assert!(attachments.allocate(&ask, &identity, false).is_err());
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (0, 0));
        other.unlock().unwrap();
        let done = attachments
            .allocate(&ask, &identity, false)
            .unwrap()
            .unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (1, 1));
        other.lock().unwrap();
        assert!(attachments.detach("b", "c1", "net1", false).is_err());
        assert_eq!(held(dir.path(), "b"), 1, "nothing released");
        other.unlock().unwrap();
        attachments
            .detach("b", "c1", "net1", false)
            .unwrap()
            .unwrap();
        assert_eq!(held(dir.path(), "b"), 0);
        // A failure after an interface was allocated: busy too, and undone by the call that
        // waits, which fails the same way.
        let missing = Identity {
            networks: Some("a,c".into()),
            ..Identity::default()
        };
        let c2 = Ask {
            container_id: "c2".into(),
            ..ask.clone()
        };
        assert!(attachments.allocate(&c2, &missing, false).is_err());
        assert_eq!(
            held(dir.path(), "a"),
            2,
            "c2's interface on a kept for the call that waits"
        );
        let e = attachments
            .allocate(&c2, &missing, true)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, TRY_AGAIN_LATER, "{e:?}");
        assert_eq!(held(dir.path(), "a"), 1, "c2's interface on a released");
    }

    /// A CNI's report after the answers, on the connection it used (`Pending::follow_with`),
    /// is recorded in the metrics by the server, as one sent on its own is, and never queued
    /// for the reconciler; a connection closed after its answer reports nothing, and any other
    /// line after the answers is ignored.
    #[tokio::test]
    async fn a_report_after_the_answer_on_the_same_connection_is_recorded_without_the_reconciler() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let (tx, mut rx) = mpsc::channel::<Message>(8);
        let server = server_on(dir.path(), tx);
        let metrics = server.reports.metrics.clone();
        tokio::spawn(serve(UnixListener::bind(&socket).unwrap(), server));
        let report = Request::Report {
            command: "DEL".into(),
            ok: true,
            micros: 640,
        };
        let timeout = Duration::from_secs(5);
        // A ping (answered by the reconciler), then the report on the same connection.
        let client = {
            let socket = socket.clone();
            let report = report.clone();
            tokio::task::spawn_blocking(move || {
                let mut pending =
                    weft_dataplane::proto::Pending::start(&socket, &Request::Ping, timeout)
                        .unwrap();
                let reply = pending.answer().unwrap();
                pending.follow_with(&report).unwrap();
                reply
            })
        };
        let ping = rx.recv().await.unwrap();
        assert!(matches!(ping.request, Request::Ping));
        let _ = ping.reply.send(Reply::ok(true));
        assert!(client.await.unwrap().ok);
        let recorded = || metrics.cni_operations("DEL", true);
        let deadline = tokio::time::Instant::now() + timeout;
        while recorded() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(recorded(), 1, "the report is in the metrics");
        // One on a connection of its own is answered by the server.
        let alone = {
            let socket = socket.clone();
            let report = report.clone();
            tokio::task::spawn_blocking(move || {
                weft_dataplane::proto::call(&socket, &report, timeout).unwrap()
            })
        };
        assert!(alone.await.unwrap().ok);
        assert_eq!(recorded(), 2);
        // Closed after the answer, or followed by something else: nothing more is recorded.
        for follow in [None, Some(Request::Ping)] {
            let socket = socket.clone();
            let client = tokio::task::spawn_blocking(move || {
                let mut pending =
                    weft_dataplane::proto::Pending::start(&socket, &Request::Ping, timeout)
                        .unwrap();
                let reply = pending.answer().unwrap();
                if let Some(req) = follow {
                    pending.follow_with(&req).unwrap();
                }
                reply
            });
            let ping = rx.recv().await.unwrap();
            let _ = ping.reply.send(Reply::ok(true));
            assert!(client.await.unwrap().ok);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "nothing goes to the reconciler after the answers"
        );
        assert_eq!(recorded(), 2);
        assert_eq!(metrics.cni_operations("DEL", false), 0);
    }

    /// The two answers of an attach: the interfaces, then the reconciler's verdict; a refusal
    /// releases the addresses before it is answered.
    /// On a runtime of several workers, as the agent's: the allocation runs on the task's own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attach_answers_twice_and_a_refusal_releases_the_addresses() {
        let dir = tempfile::tempdir().unwrap();
        network(dir.path(), "a", "10.9.1.0/24");
        let attachments = Attachments {
            state_dir: dir.path().to_path_buf(),
            reaper: super::super::reaper::Reaper::spawn().unwrap(),
        };
        for refuse in [false, true] {
            let (tx, mut rx) = mpsc::channel::<Message>(8);
            let reconciler = tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(m) = rx.recv().await {
                    let reply = match &m.request {
                        Request::Register { .. } if refuse => {
                            Reply::error(true, "host port 8080/tcp is already used")
                        }
                        _ => Reply::ok(true),
                    };
                    seen.push(m.request);
                    let _ = m.reply.send(reply);
                }
                seen
            });
            let (client, server) = tokio::net::UnixStream::pair().unwrap();
            let (_, mut write) = server.into_split();
            let ask = Ask {
                container_id: format!("c-{refuse}"),
                ifname: "eth0".into(),
                netns: "/run/netns/p".into(),
                network: Some("a".into()),
                ..Ask::default()
            };
            let server = Server {
                tx,
                ready: Arc::new(AtomicBool::new(true)),
                snapshot: Snapshot::default(),
                pod_wait: None,
                attachments: attachments.clone(),
                reports: reports(),
            };
            attach(ask, &mut write, &server).await.unwrap();
            drop(server);
            drop(write);
            let mut lines = BufReader::new(client).lines();
            let first: Reply =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let second: Reply =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert!(first.ok, "{first:?}");
            assert_eq!(first.attached.len(), 1);
            assert_eq!(
                first.attached[0].host_ifname,
                weft_dataplane::names::host_veth_name(&format!("c-{refuse}"), "eth0")
            );
            let seen = reconciler.await.unwrap();
            if refuse {
                assert!(!second.ok);
                assert_eq!(second.code, Some(AGENT_REFUSED));
                assert!(second.error.unwrap().contains("8080"));
                assert!(
                    matches!(
                        seen.as_slice(),
                        [Request::Register { .. }, Request::Unregister { .. }]
                    ),
                    "{seen:?}"
                );
                assert_eq!(
                    held(dir.path(), "a"),
                    1,
                    "only the accepted attachment keeps its address"
                );
            } else {
                assert!(second.ok, "{second:?}");
                assert!(
                    matches!(seen.as_slice(), [Request::Register { .. }]),
                    "{seen:?}"
                );
                assert_eq!(held(dir.path(), "a"), 1);
            }
        }
    }

    /// The unregistrations sent to the reconciler so far, `network/container/ifname`; any
    /// other request fails the test.
    fn unregistered(rx: &mut mpsc::Receiver<Message>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m.request {
                Request::Unregister {
                    network,
                    container_id,
                    ifname,
                } => out.push(format!("{network}/{container_id}/{ifname}")),
                other => panic!("only unregistrations: {other:?}"),
            }
        }
        out
    }

    /// A DEL's detach with `with_extras` also unregisters and releases the interfaces the ADD
    /// made from the pod's annotation, and names them; without, it touches only the one named.
    #[tokio::test]
    async fn a_detach_with_extras_takes_the_annotations_interfaces_along_and_names_them() {
        let dir = tempfile::tempdir().unwrap();
        network(dir.path(), "a", "10.9.1.0/24");
        network(dir.path(), "b", "10.9.2.0/24");
        let (tx, mut rx) = mpsc::channel::<Message>(16);
        let server = server_on(dir.path(), tx);
        let identity = Identity {
            networks: Some("a,b".into()),
            ..Identity::default()
        };
        for cid in ["c1", "c2"] {
            let ask = Ask {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: format!("/run/netns/{cid}"),
                network: Some("a".into()),
                ..Ask::default()
            };
            assert_eq!(
                server
                    .attachments
                    .allocate(&ask, &identity, true)
                    .unwrap()
                    .unwrap()
                    .len(),
                2
            );
        }
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (2, 2));

        let reply = detach(&server, "a", "c1", "eth0", true).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(
            reply.detached,
            Some(vec![DetachedInterface {
                network: "b".into(),
                ifname: "net1".into()
            }])
        );
        assert_eq!(unregistered(&mut rx), ["a/c1/eth0", "b/c1/net1"]);
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (1, 1));

        // Asked again: nothing left, nothing named.
        let again = detach(&server, "a", "c1", "eth0", true).await;
        assert_eq!(again.detached, Some(vec![]));
        // Without: only the interface named; the reply names none (the CNI finds the others).
        let plain = detach(&server, "a", "c2", "eth0", false).await;
        assert!(plain.ok && plain.detached.is_none(), "{plain:?}");
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (0, 1));
    }

    /// The pod's annotation may put the runtime's interface on another Network than the
    /// conflist's (its first entry): a DEL, which names the conflist's (or none), detaches it
    /// from the one that holds it, with the annotation's other interfaces.
    #[tokio::test]
    async fn a_detach_finds_the_interface_on_the_network_the_annotation_put_it_on() {
        let dir = tempfile::tempdir().unwrap();
        network(dir.path(), "a", "10.9.1.0/24");
        network(dir.path(), "b", "10.9.2.0/24");
        let (tx, mut rx) = mpsc::channel::<Message>(16);
        let server = server_on(dir.path(), tx);
        let identity = Identity {
            networks: Some("b,a".into()),
            ..Identity::default()
        };
        for (cid, asked) in [("c1", "a"), ("c2", "")] {
            let ask = Ask {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: format!("/run/netns/{cid}"),
                network: (!asked.is_empty()).then(|| asked.to_string()),
                ..Ask::default()
            };
            let made = server
                .attachments
                .allocate(&ask, &identity, true)
                .unwrap()
                .unwrap();
            assert_eq!(
                made[0].0.interface.network, "b",
                "eth0 on the annotation's first"
            );
            let reply = detach(&server, asked, cid, "eth0", true).await;
            assert!(reply.ok, "{reply:?}");
            assert_eq!(
                reply.detached,
                Some(vec![DetachedInterface {
                    network: "a".into(),
                    ifname: "net1".into()
                }])
            );
            assert_eq!(
                unregistered(&mut rx),
                [format!("b/{cid}/eth0"), format!("a/{cid}/net1")],
                "asked {asked:?}"
            );
            assert_eq!(
                (held(dir.path(), "a"), held(dir.path(), "b")),
                (0, 0),
                "asked {asked:?}: nothing left allocated"
            );
        }
    }

    /// A second runtime attachment of a pod (Multus's `net1`) whose name the ADD of `eth0` gave
    /// an interface of the pod's annotation: refused (code 107) before anything is allocated,
    /// and the runtime's DEL of it that follows touches nothing of eth0's `net1`, whichever
    /// network it names; the undo of eth0's ADD (not the runtime's DEL) takes it.
    #[tokio::test]
    async fn a_runtime_interface_under_a_name_the_annotation_gave_is_refused_and_its_del_leaves_it()
    {
        let (dir, attachments, ask, identity) = two_networks();
        network(dir.path(), "c", "10.9.3.0/24");
        let (tx, mut rx) = mpsc::channel::<Message>(16);
        let server = Server {
            attachments,
            ..server_on(dir.path(), tx)
        };
        let made = server
            .attachments
            .allocate(&ask, &identity, true)
            .unwrap()
            .unwrap();
        assert_eq!(made[1].0.interface.ifname, "net1");
        let b_net1 = made[1].0.ips.clone();
        for network in ["b", "c"] {
            let multus = Ask {
                ifname: "net1".into(),
                network: Some(network.into()),
                ..ask.clone()
            };
            let e = server
                .attachments
                .allocate(&multus, &Identity::default(), true)
                .unwrap()
                .unwrap_err();
            assert_eq!(e.code, weft_dataplane::codes::IFNAME_TAKEN, "{e:?}");
            assert!(
                e.details
                    .to_lowercase()
                    .contains("network b by the add of interface eth0"),
                "{e:?}"
            );
            assert_eq!(
                (
                    held(dir.path(), "a"),
                    held(dir.path(), "b"),
                    held(dir.path(), "c")
                ),
                (1, 1, 0),
                "nothing allocated"
            );
            let reply = detach(&server, network, "c1", "net1", true).await;
            assert!(reply.ok, "{reply:?}");
            assert_eq!(reply.detached, Some(vec![]));
            assert!(
                unregistered(&mut rx).is_empty(),
                "eth0's net1 stays registered"
            );
            let kept = IpamStore::open(dir.path(), "b").unwrap().list().unwrap();
            assert_eq!(kept.len(), 1);
            assert_eq!(kept[0].ips, b_net1, "eth0's net1 keeps its addresses");
        }
        // Not the runtime's DEL (the undo of eth0's ADD, which names the child's network):
        // the child goes.
        let reply = detach(&server, "b", "c1", "net1", false).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(unregistered(&mut rx), ["b/c1/net1"]);
        assert_eq!(held(dir.path(), "b"), 0);
        let reply = detach(&server, "a", "c1", "eth0", true).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(unregistered(&mut rx), ["a/c1/eth0"]);
        assert_eq!((held(dir.path(), "a"), held(dir.path(), "b")), (0, 0));
    }

    #[tokio::test]
    async fn an_identity_question_waits_for_a_pod_the_cache_has_not_seen_yet() {
        let snapshot = Snapshot::default();
        snapshot.publish(with_pod("other"));
        let asking = {
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                identity(&snapshot, true, "default", "web", None, Some(IDENTITY_WAIT)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !asking.is_finished(),
            "it answered before the pod was known"
        );
        snapshot.publish(with_pod("web"));
        let reply = asking.await.unwrap();
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.networks.as_deref(), Some("nat-demo,lan"));
    }

    #[tokio::test]
    async fn a_pod_still_unknown_after_the_wait_is_an_error_not_a_silent_default() {
        let snapshot = Snapshot::default();
        snapshot.publish(with_pod("other"));
        let wait = Duration::from_millis(200);
        let started = tokio::time::Instant::now();
        let reply = identity(&snapshot, true, "default", "web", None, Some(wait)).await;
        assert!(!reply.ok);
        assert!(reply.networks.is_none());
        assert!(
            reply.error.as_deref().unwrap().contains("default/web"),
            "{reply:?}"
        );
        assert!(started.elapsed() >= wait);
        // A standalone source knows only its manifests' pods: no wait, no error.
        let reply = identity(&snapshot, true, "default", "web", None, None).await;
        assert!(reply.ok);
    }
}

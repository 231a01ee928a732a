//! Reconciles Networks: validation, per-node blocks in every `NodeNetwork`, status, and the
//! `weft.dev/cleanup` finalizer.
//!
//! `status.addressesInUse` counts the addresses of the Network's workloads as the agents of the
//! nodes that realize it publish them (`status.workloads` of their NodeNetworks; a live
//! migration's waiting target not counted twice).

use super::allocator::{self, Allocation, NodeInfo};
use super::compact::{Blocks, CompactNodeNetwork, Current};
use super::status::{self, READY, VALID};
use super::validate::{self, Rejection};
use super::{Context, Error, FIELD_MANAGER, FINALIZER, name_of};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, instrument, warn};
use weft_crds::{Network, NetworkStatus, NodeBlock, NodeNetwork, NodeNetworkSpec};

/// Reason of `Ready=False` while some selected nodes have not realized the Network.
pub const REASON_PENDING: &str = "Pending";
/// Reason of `Ready=False` when a subnet has no free block for a selected node.
pub const REASON_EXHAUSTED: &str = "BlocksExhausted";
/// Reason of `Ready=False` when no node is selected.
pub const REASON_NO_NODES: &str = "NoNodesSelected";
/// Reason of `Ready=True`.
pub const REASON_REALIZED: &str = "Realized";
/// Reason of `Valid=True`.
pub const REASON_VALID: &str = "Valid";

/// What the reconciler observed: a snapshot of the stores.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every Network.
    pub networks: Vec<Arc<Network>>,
    /// Every Node, with its uid.
    pub nodes: Vec<(NodeInfo, Option<String>)>,
    /// Every NodeNetwork by name.
    pub node_networks: BTreeMap<String, Arc<CompactNodeNetwork>>,
    /// The current NodeNetwork specs (the store, overlaid with what this replica applied).
    pub specs: BTreeMap<String, ObservedSpec>,
    /// The last accepted version of each Network (what the blocks were allocated for), as
    /// far as this replica has seen since it started.
    pub accepted: BTreeMap<String, Arc<Network>>,
}

/// A current NodeNetwork spec (in compact form), shared with where it was observed (not
/// copied).
#[derive(Clone, Debug)]
pub enum ObservedSpec {
    /// The spec of the NodeNetwork in the store.
    Stored(Arc<CompactNodeNetwork>),
    /// A spec this replica applied that the store does not show yet.
    Written(Arc<Blocks>),
}

impl std::ops::Deref for ObservedSpec {
    type Target = Blocks;
    fn deref(&self) -> &Blocks {
        match self {
            ObservedSpec::Stored(nn) => &nn.spec,
            ObservedSpec::Written(blocks) => blocks,
        }
    }
}

impl Current for ObservedSpec {
    fn blocks(&self) -> Cow<'_, Blocks> {
        Cow::Borrowed(self)
    }
}

impl From<NodeNetworkSpec> for ObservedSpec {
    fn from(spec: NodeNetworkSpec) -> Self {
        ObservedSpec::Written(Arc::new(Blocks::from(&spec)))
    }
}

/// What should be: the verdicts, the blocks of every node, and which specs must be written.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    /// Verdict per Network name (`None`: valid).
    pub verdicts: BTreeMap<String, Option<Rejection>>,
    /// Every node's blocks.
    pub allocation: Allocation,
    /// The nodes whose NodeNetwork spec differs from the desired one.
    pub changed: Vec<String>,
    /// The version of each Network the allocation is for: the current one, or the last
    /// accepted one when the current one changed an immutable field.
    pub accepted: BTreeMap<String, Arc<Network>>,
}

/// Observe: a snapshot of the stores.
pub fn observe(ctx: &Context) -> Observed {
    let nodes: Vec<(NodeInfo, Option<String>)> = ctx
        .stores
        .nodes
        .state()
        .iter()
        .map(|n: &Arc<Node>| {
            (
                NodeInfo {
                    name: n.name_any(),
                    labels: n.labels().clone(),
                },
                n.metadata.uid.clone(),
            )
        })
        .collect();
    let node_networks: BTreeMap<String, Arc<CompactNodeNetwork>> = ctx
        .stores
        .node_networks
        .state()
        .into_iter()
        .map(|nn| (nn.name_any(), nn))
        .collect();
    let mut specs: BTreeMap<String, ObservedSpec> = node_networks
        .iter()
        .map(|(k, v)| (k.clone(), ObservedSpec::Stored(v.clone())))
        .collect();
    if let Ok(mut written) = ctx.written.lock() {
        // What the store already shows needs no overlay (nor a copy kept here).
        written.retain(|k, v| node_networks.get(k).is_none_or(|nn| nn.spec != **v));
        specs.extend(
            written
                .iter()
                .map(|(k, v)| (k.clone(), ObservedSpec::Written(v.clone()))),
        );
    }
    let accepted = ctx.accepted.lock().map(|a| a.clone()).unwrap_or_default();
    Observed {
        networks: ctx.stores.networks.state(),
        nodes,
        node_networks,
        specs,
        accepted,
    }
}

/// Each Network as the allocation must see it: an update that changes an immutable field
/// (`NetworkSpec::validate_update` against the last accepted version of the same object) is
/// rejected, and the last accepted version stands in for it, so no node's block is renumbered.
fn effective(observed: &Observed) -> (Vec<Arc<Network>>, BTreeMap<String, Rejection>) {
    let mut rejected = BTreeMap::new();
    let networks = observed
        .networks
        .iter()
        .map(|net| {
            let name = net.name_any();
            let Some(old) = observed.accepted.get(&name).filter(|old| {
                old.metadata.uid == net.metadata.uid
                    && old.spec != net.spec
                    && net.metadata.deletion_timestamp.is_none()
            }) else {
                return net.clone();
            };
            match net.spec.validate_update(&old.spec) {
                Ok(()) => net.clone(),
                Err(errors) => {
                    rejected.insert(name, validate::immutable(&errors));
                    old.clone()
                }
            }
        })
        .collect();
    (networks, rejected)
}

/// Decide (pure): validation and allocation over the whole cluster.
pub fn desired(observed: &Observed) -> Decision {
    let (networks, immutable) = effective(observed);
    let mut verdicts = validate::networks(networks.iter().map(AsRef::as_ref));
    let eligible: Vec<&Arc<Network>> = networks
        .iter()
        .filter(|n| {
            verdicts
                .get(n.metadata.name.as_deref().unwrap_or_default())
                .is_some_and(Option::is_none)
        })
        .collect();
    let accepted = eligible
        .iter()
        .map(|n| (n.name_any(), Arc::clone(n)))
        .collect();
    for (name, rejection) in immutable {
        verdicts.insert(name, Some(rejection));
    }
    let nodes: Vec<NodeInfo> = observed.nodes.iter().map(|(n, _)| n.clone()).collect();
    let allocation = allocator::allocate(
        eligible.into_iter().map(AsRef::as_ref),
        &nodes,
        &observed.specs,
    );
    // Each node's spec is built, compared and dropped: never all of them at once. A node
    // without a NodeNetwork has no blocks (the agent reads it so), so it needs none written
    // until it gets a block.
    let empty = Blocks::default();
    let changed = allocation
        .nodes()
        .filter(|node| {
            let have = observed.specs.get(*node).map_or(&empty, |s| &**s);
            allocation
                .blocks(node)
                .as_ref()
                .is_some_and(|want| want != have)
        })
        .map(str::to_owned)
        .collect();
    Decision {
        verdicts,
        allocation,
        changed,
        accepted,
    }
}

/// Remembers the Network versions `decision` allocated for, for the next [`observe`].
fn remember_accepted(ctx: &Context, decision: &Decision) {
    if let Ok(mut accepted) = ctx.accepted.lock() {
        accepted.clone_from(&decision.accepted);
    }
}

/// A fingerprint of what [`desired`] depends on: each Network's identity, spec generation and
/// deletion, the last accepted version of each, each Node's name, uid and labels, and each NodeNetwork spec (its generation, which
/// a status write does not change, or the spec this replica wrote). Equal fingerprints give
/// equal decisions. (Generations are the API server's; wrapping casts only feed the hash.)
pub fn allocation_inputs(observed: &Observed) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // An object without a generation (the API server always sets one) counts as new each time.
    let generation = |g: Option<i64>, object: *const ()| g.map_or(object as usize, |g| g as usize);
    for n in &observed.networks {
        let m = &n.metadata;
        let g = generation(m.generation, Arc::as_ptr(n).cast());
        (&m.name, &m.uid, g, m.deletion_timestamp.is_some()).hash(&mut h);
    }
    for (n, uid) in &observed.nodes {
        (&n.name, uid, &n.labels).hash(&mut h);
    }
    for (name, n) in &observed.accepted {
        let g = generation(n.metadata.generation, Arc::as_ptr(n).cast());
        (name, &n.metadata.uid, g).hash(&mut h);
    }
    for (name, spec) in &observed.specs {
        name.hash(&mut h);
        match spec {
            ObservedSpec::Stored(nn) => {
                let g = generation(nn.metadata.generation, Arc::as_ptr(nn).cast());
                (0u8, &nn.metadata.uid, g).hash(&mut h);
            }
            ObservedSpec::Written(spec) => (1u8, Arc::as_ptr(spec) as usize).hash(&mut h),
        }
    }
    h.finish()
}

/// [`desired`], or the decision last made from the same inputs ([`allocation_inputs`]).
pub fn decide(ctx: &Context, observed: &Observed) -> Arc<Decision> {
    let key = allocation_inputs(observed);
    if let Ok(cache) = ctx.decided.lock()
        && let Some((k, d)) = cache.as_ref()
        && *k == key
    {
        ctx.metrics.allocation_reused();
        return d.clone();
    }
    let start = Instant::now();
    let decision = Arc::new(desired(observed));
    ctx.metrics.allocated(start.elapsed());
    if let Ok(mut cache) = ctx.decided.lock() {
        *cache = Some((key, decision.clone()));
    }
    decision
}

/// Addresses that can be assigned: each subnet without network, broadcast (IPv4), gateway and
/// excluded addresses, saturated at i64::MAX.
pub fn addresses_total(net: &Network) -> i64 {
    let size = |n: IpNet| -> u128 {
        let host_bits = u32::from(n.max_prefix_len() - n.prefix_len());
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    };
    let mut total: u128 = 0;
    if let Some(s) = net.spec.subnet_v4() {
        total = total.saturating_add(size(IpNet::V4(s)).saturating_sub(3));
    }
    if let Some(s) = net.spec.subnet_v6() {
        total = total.saturating_add(size(IpNet::V6(s)).saturating_sub(2));
    }
    let excluded: u128 = net
        .spec
        .excludes()
        .into_iter()
        .fold(0u128, |acc, e| acc.saturating_add(size(e)));
    i64::try_from(total.saturating_sub(excluded)).unwrap_or(i64::MAX)
}

/// The status of `net` under `decision` (conditions keep their transition times).
pub fn desired_status(
    net: &Network,
    observed: &Observed,
    decision: &Decision,
    now: jiff::Timestamp,
) -> NetworkStatus {
    let name = net.name_any();
    let generation = net.metadata.generation;
    let previous = net
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let verdict = decision.verdicts.get(&name).cloned().flatten();
    let blocks = decision.allocation.blocks_of(&name);
    let nodes = blocks.len();
    let node_blocks: Vec<NodeBlock> = if nodes <= weft_crds::NODE_BLOCKS_LISTED {
        blocks
            .into_iter()
            .map(|(node, blocks)| NodeBlock { node, blocks })
            .collect()
    } else {
        Vec::new()
    };
    let selected: Vec<&str> = observed
        .nodes
        .iter()
        .filter(|(n, _)| allocator::selects(&net.spec, n))
        .map(|(n, _)| n.name.as_str())
        .collect();
    let (realized, waiting): (Vec<&str>, Vec<&str>) = selected.iter().partition(|n| {
        observed
            .node_networks
            .get(**n)
            .is_some_and(|nn| nn.lists_network(&name))
    });
    let in_use: i64 = realized
        .iter()
        .filter_map(|n| observed.node_networks.get(*n))
        .map(|nn| nn.in_use.of(&name))
        .fold(0, i64::saturating_add);
    let (valid, ready) = match &verdict {
        Some(r) => (
            status::condition(
                VALID, false, r.reason, &r.message, generation, previous, now,
            ),
            status::condition(
                READY,
                false,
                r.reason,
                if r.reason == validate::REASON_IMMUTABLE {
                    "the update is refused (see the Valid condition); the nodes keep the blocks of the last accepted spec"
                } else {
                    "the Network is not valid; see the Valid condition"
                },
                generation,
                previous,
                now,
            ),
        ),
        None => {
            let valid = status::condition(
                VALID,
                true,
                REASON_VALID,
                "the spec passed every check",
                generation,
                previous,
                now,
            );
            let ready = if let Some(problems) = decision.allocation.problems.get(&name) {
                status::condition(
                    READY,
                    false,
                    REASON_EXHAUSTED,
                    problems.join("; "),
                    generation,
                    previous,
                    now,
                )
            } else if selected.is_empty() {
                status::condition(
                    READY,
                    false,
                    REASON_NO_NODES,
                    "spec.nodeSelector selects no node",
                    generation,
                    previous,
                    now,
                )
            } else if realized.len() == selected.len() {
                status::condition(
                    READY,
                    true,
                    REASON_REALIZED,
                    format!("realized on all {} selected nodes", selected.len()),
                    generation,
                    previous,
                    now,
                )
            } else {
                status::condition(
                    READY,
                    false,
                    REASON_PENDING,
                    format!(
                        "realized on {} of {} selected nodes; waiting for {}",
                        realized.len(),
                        selected.len(),
                        status::some_of(&waiting)
                    ),
                    generation,
                    previous,
                    now,
                )
            };
            (valid, ready)
        }
    };
    NetworkStatus {
        conditions: vec![valid, ready],
        observed_generation: generation,
        node_blocks,
        nodes: Some(i64::try_from(nodes).unwrap_or(i64::MAX)),
        addresses_in_use: verdict.is_none().then_some(in_use),
        addresses_total: verdict.is_none().then(|| addresses_total(net)),
    }
}

/// Reconciles one Network (the `Controller::run` callback).
#[instrument(skip(net, ctx), fields(name = %net.name_any()))]
pub async fn reconcile(net: Arc<Network>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = reconcile_inner(net.clone(), &ctx).await;
    ctx.metrics.reconciled("Network", start.elapsed());
    match &result {
        Ok(_) => ctx.succeeded(&super::object_key(net.as_ref())),
        Err(e) => ctx.metrics.failed("Network", e.reason()),
    }
    result
}

async fn reconcile_inner(net: Arc<Network>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let name = name_of(net.as_ref())?;
    if !ctx.is_leader() {
        // Compute anyway (metrics, warm caches); only the leader writes.
        let decision = decide(ctx, &observe(ctx));
        remember_accepted(ctx, &decision);
        record_blocks(ctx, &name, &decision);
        return Ok(Action::await_change());
    }
    let api: Api<Network> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, net, |event| async {
        match event {
            Finalizer::Apply(net) => apply(&net, ctx).await,
            Finalizer::Cleanup(net) => cleanup(&net, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer {
        network: name,
        source: Box::new(e),
    })
}

fn record_blocks(ctx: &Context, name: &str, decision: &Decision) {
    ctx.metrics
        .set_blocks_in_use(name, decision.allocation.block_count(name));
}

/// Observe, decide and apply the NodeNetwork specs that changed (under the allocation lock).
async fn sync_blocks(ctx: &Context) -> Result<(Observed, Arc<Decision>), Error> {
    let _guard = ctx.allocation.lock().await;
    let observed = observe(ctx);
    let decision = decide(ctx, &observed);
    remember_accepted(ctx, &decision);
    let api: Api<NodeNetwork> = Api::all(ctx.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // A few at a time: one Network added changes every node's NodeNetwork, and one by one a
    // thousand of them took minutes of round trips.
    let mut writes = Vec::new();
    for node in &decision.changed {
        let Some(blocks) = decision.allocation.blocks(node) else {
            continue;
        };
        let uid = observed
            .nodes
            .iter()
            .find(|(n, _)| &n.name == node)
            .and_then(|(_, uid)| uid.clone());
        writes.push(write_node_network(&api, &params, node.clone(), uid, blocks));
    }
    let mut results = futures::stream::iter(writes).buffer_unordered(NODE_NETWORK_WRITES);
    let mut failed = None;
    while let Some(result) = results.next().await {
        match result {
            Ok((node, blocks)) => {
                if let Ok(mut w) = ctx.written.lock() {
                    w.insert(node, Arc::new(blocks));
                }
            }
            // The others are still written; the reconcile fails with the first error.
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    drop(results);
    if let Some(e) = failed {
        return Err(e);
    }
    // Nodes that are gone: their NodeNetworks are garbage-collected; forget what we wrote.
    if let Ok(mut w) = ctx.written.lock() {
        w.retain(|n, _| decision.allocation.contains_node(n));
    }
    Ok((observed, decision))
}

/// How many NodeNetwork specs the controller writes at once.
const NODE_NETWORK_WRITES: usize = 16;

/// Writes `blocks` as the spec of the NodeNetwork of `node` (owned by its Node, whose uid is
/// `uid`, so that it is garbage-collected with it): a server-side apply, or for no blocks at
/// all a merge patch (see [`empty_blocks`]). Returns what it wrote.
async fn write_node_network(
    api: &Api<NodeNetwork>,
    params: &PatchParams,
    node: String,
    uid: Option<String>,
    blocks: Blocks,
) -> Result<(String, Blocks), Error> {
    if blocks.is_empty() {
        empty_blocks(api, &node).await?;
        return Ok((node, blocks));
    }
    let spec = blocks.to_spec();
    let mut metadata = json!({ "name": &node });
    if let Some(uid) = uid {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "v1",
            "kind": "Node",
            "name": node,
            "uid": uid,
        }]);
    }
    let body = json!({
        "apiVersion": weft_crds::constants::API_VERSION,
        "kind": weft_crds::NODE_NETWORK_KIND,
        "metadata": metadata,
        "spec": spec,
    });
    api.patch(&node, params, &Patch::Apply(&body))
        .await
        .map_err(|source| Error::Api {
            action: "apply",
            kind: "NodeNetwork",
            name: node.clone(),
            source,
        })?;
    info!(node = %node, blocks = spec.blocks.len(), "applied NodeNetwork spec");
    Ok((node, blocks))
}

/// Empties the blocks of the NodeNetwork of `node` with a JSON merge patch.
///
/// Not a server-side apply: an applied `spec: {blocks: []}` releases the controller's
/// entries, and with them its last field of the spec, so the API server drops `spec` and
/// refuses the object (`spec: Required value`). The NodeNetwork itself stays: its agent
/// reports there until it has removed the Network, which the finalizer waits for.
async fn empty_blocks(api: &Api<NodeNetwork>, node: &str) -> Result<(), Error> {
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(node, &params, &Patch::Merge(&empty_blocks_patch()))
        .await
        .map_err(|source| Error::Api {
            action: "empty the blocks of",
            kind: "NodeNetwork",
            name: node.to_owned(),
            source,
        })?;
    info!(node = %node, "emptied NodeNetwork spec");
    Ok(())
}

/// The merge patch of [`empty_blocks`].
fn empty_blocks_patch() -> serde_json::Value {
    json!({ "spec": { "blocks": [] } })
}

async fn publish(
    ctx: &Context,
    net: &Network,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &net.object_ref(&())).await {
        warn!(error = %crate::error_chain(&e), "cannot publish event");
    }
}

async fn apply(net: &Network, ctx: &Context) -> Result<Action, Error> {
    let name = name_of(net)?;
    let (observed, decision) = sync_blocks(ctx).await?;
    record_blocks(ctx, &name, &decision);
    let new = desired_status(net, &observed, &decision, jiff::Timestamp::now());
    let previous = net.status.clone().unwrap_or_default();
    if previous != new {
        let api: Api<Network> = Api::all(ctx.client.clone());
        let body = json!({
            "apiVersion": weft_crds::constants::API_VERSION,
            "kind": weft_crds::constants::NETWORK_KIND,
            "status": new,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Api {
            action: "apply status of",
            kind: "Network",
            name: name.clone(),
            source,
        })?;
    }
    for c in &new.conditions {
        if c.status == "False"
            && c.reason != REASON_PENDING
            && c.reason != REASON_NO_NODES
            && status::changed(&previous.conditions, c)
        {
            // Valid=False, or Ready=False for a reason other than "Invalid" (reported by Valid).
            if c.type_ == READY
                && status::find(&new.conditions, VALID).is_some_and(|v| v.status == "False")
            {
                continue;
            }
            warn!(reason = %c.reason, message = %c.message, "network rejected");
            publish(
                ctx,
                net,
                EventType::Warning,
                &c.reason,
                c.message.clone(),
                "Validate",
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

/// The finalizer's cleanup: the Network's blocks leave every NodeNetwork spec (it is being
/// deleted, so the allocator skips it); the finalizer goes once no agent of an existing node
/// still lists it in its NodeNetwork status.
async fn cleanup(net: &Network, ctx: &Context) -> Result<Action, Error> {
    let name = name_of(net)?;
    let (observed, _) = sync_blocks(ctx).await?;
    let nodes: Vec<String> = observed
        .node_networks
        .values()
        .filter(|nn| observed.nodes.iter().any(|(n, _)| n.name == nn.name_any()))
        .filter(|nn| nn.lists_network(&name))
        .map(|nn| nn.name_any())
        .collect();
    if !nodes.is_empty() {
        // Said on the Network, which otherwise only stays Terminating: a node whose agent is
        // gone for good (the node powered off, weft removed from it) holds it until its
        // NodeNetwork goes.
        publish(
            ctx,
            net,
            EventType::Warning,
            "WaitingForAgents",
            format!(
                "deleting: the weft agents of node(s) {} still realize this Network; the Network goes once they have removed it. For a node whose agent will not come back, delete its NodeNetwork: kubectl delete nodenetwork NODE",
                nodes.join(", ")
            ),
            "Delete",
        )
        .await;
        return Err(Error::AgentsStillRealize {
            network: name,
            nodes,
        });
    }
    info!(network = %name, "no agent realizes the network any more; removing the finalizer");
    ctx.metrics.forget_network(&name);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crds::{Cidr, NetworkSpec};

    fn net(subnet: &str, mtu: Option<i32>) -> Arc<Network> {
        let mut n = Network::new(
            "blue",
            NetworkSpec {
                subnets: vec![Cidr::from(subnet)],
                mtu,
                ..NetworkSpec::default()
            },
        );
        n.metadata.uid = Some("uid-1".into());
        Arc::new(n)
    }

    fn observed(current: Arc<Network>, accepted: Option<Arc<Network>>) -> Observed {
        Observed {
            networks: vec![current],
            nodes: vec![(NodeInfo::new("node-a", &[]), None)],
            accepted: accepted
                .map(|a| ("blue".to_owned(), a))
                .into_iter()
                .collect(),
            ..Observed::default()
        }
    }

    fn block_of(decision: &Decision) -> Vec<(String, Vec<String>)> {
        decision.allocation.blocks_of("blue")
    }

    #[test]
    fn changed_subnets_are_refused_and_the_blocks_of_the_accepted_spec_are_kept() {
        let old = net("10.50.0.0/16", None);
        let first = desired(&observed(old.clone(), None));
        assert_eq!(first.verdicts["blue"], None);
        assert_eq!(
            block_of(&first),
            [("node-a".to_owned(), vec!["10.50.0.0/26".to_owned()])]
        );
        let mut observed = observed(net("10.60.0.0/16", None), Some(old.clone()));
        observed.specs = first
            .allocation
            .specs()
            .into_iter()
            .map(|(k, v)| (k, ObservedSpec::from(v)))
            .collect();
        let second = desired(&observed);
        let verdict = second.verdicts["blue"].clone().expect("refused");
        assert_eq!(verdict.reason, validate::REASON_IMMUTABLE);
        assert!(
            verdict.message.contains("spec.subnets")
                && verdict.message.contains("10.50.0.0/16")
                && verdict.message.contains("10.60.0.0/16"),
            "{}",
            verdict.message
        );
        // Nothing renumbered, nothing to write; the accepted spec stays the old one.
        assert_eq!(block_of(&second), block_of(&first));
        assert!(second.changed.is_empty());
        assert_eq!(second.accepted["blue"].spec, old.spec);
        let status = desired_status(
            &observed.networks[0],
            &observed,
            &second,
            jiff::Timestamp::UNIX_EPOCH,
        );
        let valid = status::find(&status.conditions, VALID).expect("Valid");
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", validate::REASON_IMMUTABLE)
        );
    }

    #[test]
    fn past_a_hundred_nodes_the_status_counts_them_and_names_only_a_few() {
        let blue = net("10.50.0.0/16", None);
        let mut observed = observed(blue.clone(), None);
        observed.nodes = (0..101)
            .map(|k| (NodeInfo::new(format!("node-{k:03}"), &[]), None))
            .collect();
        let decision = desired(&observed);
        assert_eq!(block_of(&decision).len(), 101);
        let status = desired_status(&blue, &observed, &decision, jiff::Timestamp::UNIX_EPOCH);
        assert!(status.node_blocks.is_empty(), "{:?}", status.node_blocks);
        assert_eq!(status.nodes, Some(101));
        let ready = status::find(&status.conditions, READY).expect("Ready");
        assert_eq!(
            ready.message,
            "realized on 0 of 101 selected nodes; waiting for node-000, node-001, node-002, \
             node-003, node-004, node-005, node-006, node-007, node-008, node-009 and 91 more"
        );

        // A hundred are still listed, each with its blocks.
        observed.nodes.truncate(100);
        let decision = desired(&observed);
        let status = desired_status(&blue, &observed, &decision, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(status.node_blocks.len(), 100);
        assert_eq!(status.node_blocks[0].node, "node-000");
        assert_eq!(status.node_blocks[0].blocks, ["10.50.0.0/26"]);
        assert_eq!(status.nodes, Some(100));
    }

    #[test]
    fn the_exhausted_ready_message_names_only_a_few_nodes() {
        // A /24 holds four /26 blocks: 996 of a thousand nodes go without. The message, written
        // again at every node that joins, names ten of them, not each.
        let blue = net("10.50.0.0/24", None);
        let mut observed = observed(blue.clone(), None);
        observed.nodes = (0..1000)
            .map(|k| (NodeInfo::new(format!("node-{k:04}"), &[]), None))
            .collect();
        let decision = desired(&observed);
        assert_eq!(block_of(&decision).len(), 4);
        let status = desired_status(&blue, &observed, &decision, jiff::Timestamp::UNIX_EPOCH);
        let ready = status::find(&status.conditions, READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_EXHAUSTED)
        );
        assert!(
            ready.message.starts_with(
                "subnet 10.50.0.0/24 has no free /26 block left for 996 nodes: node-0004, \
                 node-0005, node-0006, node-0007, node-0008, node-0009, node-0010, node-0011, \
                 node-0012, node-0013 and 986 more (4 blocks, all assigned or excluded); "
            ),
            "{}",
            ready.message
        );
        assert!(ready.message.len() < 600, "{}", ready.message.len());
    }

    #[test]
    fn addresses_in_use_count_the_networks_own_workloads_on_the_nodes_that_realize_it() {
        let blue = net("10.50.0.0/16", None);
        let mut observed = observed(blue.clone(), None);
        observed.nodes = ["node-a", "node-b", "node-c"]
            .into_iter()
            .map(|n| (NodeInfo::new(n, &[]), None))
            .collect();
        let workload = |network: &str, ips: &[&str], active: bool| weft_crds::NodeWorkload {
            network: network.into(),
            namespace: "default".into(),
            name: format!("w-{}", ips.join("-")),
            labels: Default::default(),
            ips: ips.iter().map(|ip| (*ip).to_string()).collect(),
            vm: None,
            mac: None,
            active,
        };
        let node_network = |node: &str, realized: &[&str], workloads| {
            let mut nn = NodeNetwork::new(node, weft_crds::NodeNetworkSpec::default());
            nn.status = Some(weft_crds::NodeNetworkStatus {
                networks: realized.iter().map(|n| (*n).to_string()).collect(),
                endpoints: Some(100),
                workloads,
                ..Default::default()
            });
            (node.to_owned(), Arc::new(CompactNodeNetwork::from(nn)))
        };
        observed.node_networks = [
            // Two of blue's workloads (one dual-stack) and many of another Network.
            node_network(
                "node-a",
                &["blue", "red"],
                vec![
                    workload("blue", &["10.50.0.2", "fd50::2"], true),
                    workload("blue", &["10.50.0.3"], true),
                    workload("red", &["10.60.0.2"], true),
                    workload("red", &["10.60.0.3"], true),
                ],
            ),
            // A live migration's target waiting for its VM: its source holds the address.
            node_network(
                "node-b",
                &["blue"],
                vec![
                    workload("blue", &["10.50.1.2"], true),
                    workload("blue", &["10.50.0.9"], false),
                ],
            ),
            // Not realized here (yet): its workloads are not counted.
            node_network(
                "node-c",
                &["red"],
                vec![workload("blue", &["10.50.2.2"], true)],
            ),
        ]
        .into();
        let decision = desired(&observed);
        let status = desired_status(&blue, &observed, &decision, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(
            status.addresses_in_use,
            Some(4),
            "3 addresses on node-a, 1 on node-b; not the nodes' counts of endpoints (100 each)"
        );
    }

    #[test]
    fn mutable_changes_are_accepted_and_remembered() {
        let old = net("10.50.0.0/16", None);
        let new = net("10.50.0.0/16", Some(9000));
        let d = desired(&observed(new.clone(), Some(old)));
        assert_eq!(d.verdicts["blue"], None);
        assert_eq!(d.accepted["blue"].spec, new.spec);
    }

    #[test]
    fn a_recreated_network_is_not_compared_with_its_predecessor() {
        let old = net("10.50.0.0/16", None);
        let mut new = (*net("10.60.0.0/16", None)).clone();
        new.metadata.uid = Some("uid-2".into());
        let d = desired(&observed(Arc::new(new), Some(old)));
        assert_eq!(d.verdicts["blue"], None);
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;
    use weft_crds::{NetworkSpec, NodeNetworkBlock};

    fn observed() -> Observed {
        let mut net = Network::new(
            "blue",
            serde_json::from_value::<NetworkSpec>(
                json!({"mode": "NAT", "subnets": ["10.10.0.0/16"]}),
            )
            .unwrap(),
        );
        net.metadata.generation = Some(1);
        let mut nn = NodeNetwork::new(
            "node-a",
            NodeNetworkSpec {
                blocks: vec![NodeNetworkBlock {
                    network: "blue".into(),
                    ipv4: Some("10.10.0.0/24".into()),
                    ipv6: None,
                }],
            },
        );
        nn.metadata.generation = Some(1);
        let nn = Arc::new(CompactNodeNetwork::from(nn));
        Observed {
            networks: vec![Arc::new(net)],
            nodes: vec![(
                NodeInfo {
                    name: "node-a".into(),
                    labels: BTreeMap::new(),
                },
                Some("uid-a".into()),
            )],
            node_networks: [("node-a".to_owned(), nn.clone())].into(),
            specs: [("node-a".to_owned(), ObservedSpec::Stored(nn))].into(),
            accepted: BTreeMap::new(),
        }
    }

    #[test]
    fn status_writes_leave_the_allocation_inputs_alone_and_spec_or_label_changes_do_not() {
        let base = observed();
        let key = allocation_inputs(&base);

        // An agent's status report and the Network's own status: same inputs.
        let mut o = base.clone();
        let mut nn = (*o.node_networks["node-a"]).clone();
        nn.status = Some(weft_crds::NodeNetworkStatus {
            endpoints: Some(7),
            ..Default::default()
        });
        nn.metadata.resource_version = Some("99".into());
        let nn = Arc::new(nn);
        o.node_networks.insert("node-a".into(), nn.clone());
        o.specs.insert("node-a".into(), ObservedSpec::Stored(nn));
        let mut net = (*o.networks[0]).clone();
        net.status = Some(NetworkStatus::default());
        o.networks[0] = Arc::new(net);
        assert_eq!(allocation_inputs(&o), key);

        // A new spec generation, a deletion, a node's labels, a NodeNetwork's spec: new inputs.
        let changed = |f: &dyn Fn(&mut Observed)| {
            let mut o = base.clone();
            f(&mut o);
            allocation_inputs(&o)
        };
        let keys = [
            changed(&|o| {
                let mut net = (*o.networks[0]).clone();
                net.metadata.generation = Some(2);
                o.networks[0] = Arc::new(net);
            }),
            changed(&|o| {
                let mut net = (*o.networks[0]).clone();
                net.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
                );
                o.networks[0] = Arc::new(net);
            }),
            changed(&|o| {
                o.nodes[0].0.labels.insert("zone".into(), "a".into());
            }),
            changed(&|o| {
                let mut nn = (*o.node_networks["node-a"]).clone();
                nn.metadata.generation = Some(2);
                o.specs
                    .insert("node-a".into(), ObservedSpec::Stored(Arc::new(nn)));
            }),
            changed(&|o| {
                o.specs.insert(
                    "node-a".into(),
                    ObservedSpec::from(NodeNetworkSpec::default()),
                );
            }),
            changed(&|o| o.networks.clear()),
            changed(&|o| {
                o.accepted.insert("blue".into(), o.networks[0].clone());
            }),
        ];
        for (i, k) in keys.iter().enumerate() {
            assert_ne!(*k, key, "change {i} left the inputs unchanged");
        }
    }
}

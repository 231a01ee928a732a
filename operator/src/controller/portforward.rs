//! Reconciles PortForwards: checks what CEL cannot (network exists and is NAT, node ports not
//! taken by an older PortForward on the same network) and writes `Valid` and `Ready`.
//!
//! `Ready=True` (reason `Accepted`) means the controller accepted the forward; the agents of
//! the nodes where the target runs install it and report, in their `NodeNetwork` status
//! (`status.forwards`), the addresses they forward it to and what keeps them from forwarding
//! it as asked (a `synProxy` without the agent's `--syn-proxy`, a node port another
//! PortForward holds there). The controller sums them: `status.targets`, and a `Degraded`
//! condition (True, reason `NodeProblems`) while a node reports a problem.

use super::compact::CompactNodeNetwork;
use super::status::{self, READY, VALID};
use super::validate::{self, Rejection};
use super::{Context, Error, FIELD_MANAGER, name_of};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{instrument, warn};
use weft_crds::{Network, PortForward};

/// Reason of `Valid=True` and `Ready=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// The condition a node's problem with the forward sets.
pub const DEGRADED: &str = "Degraded";
/// Reason of `Degraded=True`.
pub const REASON_NODE_PROBLEMS: &str = "NodeProblems";
/// Most node problems named in the `Degraded` message.
const MAX_PROBLEMS: usize = 16;

/// What the nodes report about one PortForward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// The workload addresses it is forwarded to, all nodes together, sorted.
    pub targets: Vec<String>,
    /// `node: problem`, sorted, at most [`MAX_PROBLEMS`].
    pub problems: Vec<String>,
}

/// Decide (pure): sums what every NodeNetwork's status says about PortForward `key`
/// (`namespace/name`).
pub fn forwarding(key: &str, node_networks: &[Arc<CompactNodeNetwork>]) -> Forwarding {
    let mut targets = std::collections::BTreeSet::new();
    let mut problems = std::collections::BTreeSet::new();
    for nn in node_networks {
        let Some(f) = nn
            .status
            .as_ref()
            .and_then(|s| s.forwards.iter().find(|f| f.forward == key))
        else {
            continue;
        };
        targets.extend(f.targets.iter().cloned());
        if let Some(e) = &f.error {
            problems.insert(format!("{}: {e}", nn.name_any()));
        }
    }
    Forwarding {
        targets: targets.into_iter().collect(),
        problems: problems.into_iter().take(MAX_PROBLEMS).collect(),
    }
}

/// Decide (pure): the verdict on `pf` among all PortForwards and Networks.
///
/// `all` is the store, which usually holds `pf` already (perhaps an older version of it): that
/// entry is left out and `pf` itself takes its place, so a PortForward never conflicts with
/// itself.
pub fn verdict(
    pf: &PortForward,
    all: &[Arc<PortForward>],
    networks: &[Arc<Network>],
) -> Option<Rejection> {
    let nets: BTreeMap<String, &Network> = networks
        .iter()
        .map(|n| (n.name_any(), n.as_ref()))
        .collect();
    let key = validate::port_forward_key(pf);
    let others = all
        .iter()
        .map(AsRef::as_ref)
        .filter(|other| validate::port_forward_key(other) != key);
    let mut v = validate::port_forwards(others.chain([pf]), &nets);
    v.remove(&key).flatten()
}

/// The conditions of `pf` under `verdict`.
pub fn desired_conditions(
    pf: &PortForward,
    verdict: Option<&Rejection>,
    nodes: &Forwarding,
    now: jiff::Timestamp,
) -> Vec<Condition> {
    let generation = pf.metadata.generation;
    let previous = pf
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    match verdict {
        Some(r) => vec![
            status::condition(
                VALID, false, r.reason, &r.message, generation, previous, now,
            ),
            status::condition(
                READY,
                false,
                r.reason,
                "the PortForward is not valid; see the Valid condition",
                generation,
                previous,
                now,
            ),
        ],
        None => {
            let mut conditions = vec![
                status::condition(
                    VALID,
                    true,
                    REASON_ACCEPTED,
                    "the spec passed every check",
                    generation,
                    previous,
                    now,
                ),
                status::condition(
                    READY,
                    true,
                    REASON_ACCEPTED,
                    "accepted; the agents of the target's nodes forward it",
                    generation,
                    previous,
                    now,
                ),
            ];
            // Only while a node reports a problem (the status is applied whole, so the
            // condition goes when they do).
            if !nodes.problems.is_empty() {
                conditions.push(status::condition(
                    DEGRADED,
                    true,
                    REASON_NODE_PROBLEMS,
                    nodes.problems.join("; "),
                    generation,
                    previous,
                    now,
                ));
            }
            conditions
        }
    }
}

/// Reconciles one PortForward.
#[instrument(skip(pf, ctx), fields(name = %pf.name_any(), namespace = pf.namespace().unwrap_or_default()))]
pub async fn reconcile(pf: Arc<PortForward>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = reconcile_inner(&pf, &ctx).await;
    ctx.metrics.reconciled("PortForward", start.elapsed());
    match &result {
        Ok(_) => ctx.succeeded(&super::object_key(pf.as_ref())),
        Err(e) => ctx.metrics.failed("PortForward", e.reason()),
    }
    result
}

async fn reconcile_inner(pf: &PortForward, ctx: &Context) -> Result<Action, Error> {
    let name = name_of(pf)?;
    if pf.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let verdict = verdict(
        pf,
        &ctx.stores.port_forwards.state(),
        &ctx.stores.networks.state(),
    );
    let nodes = forwarding(&super::object_key(pf), &ctx.stores.node_networks.state());
    let conditions = desired_conditions(pf, verdict.as_ref(), &nodes, jiff::Timestamp::now());
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let status = pf.status.clone().unwrap_or_default();
    if status.conditions != conditions
        || status.observed_generation != pf.metadata.generation
        || status.targets != nodes.targets
    {
        let ns = pf.namespace().unwrap_or_default();
        let api: Api<PortForward> = Api::namespaced(ctx.client.clone(), &ns);
        let body = json!({
            "apiVersion": weft_crds::constants::API_VERSION,
            "kind": weft_crds::constants::PORT_FORWARD_KIND,
            "status": {
                "conditions": conditions,
                "observedGeneration": pf.metadata.generation,
                "targets": nodes.targets,
            },
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Api {
            action: "apply status of",
            kind: "PortForward",
            name: name.clone(),
            source,
        })?;
    }
    if let Some(r) = &verdict
        && let Some(valid) = conditions.iter().find(|c| c.type_ == VALID)
        && status::changed(&status.conditions, valid)
    {
        warn!(reason = r.reason, message = %r.message, "port forward rejected");
        let event = Event {
            type_: EventType::Warning,
            reason: r.reason.to_owned(),
            note: Some(r.message.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &pf.object_ref(&())).await {
            warn!(error = %crate::error_chain(&e), "cannot publish event");
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use weft_crds::{
        Cidr, ForwardedPort, NetworkSpec, PortForwardSpec, PortForwardTarget, Protocol,
    };

    fn nat(name: &str) -> Arc<Network> {
        Arc::new(Network::new(
            name,
            NetworkSpec {
                subnets: vec![Cidr::from("10.10.0.0/16")],
                ..NetworkSpec::default()
            },
        ))
    }

    fn forward(name: &str, port: i32, created: i64) -> PortForward {
        let mut pf = PortForward::new(
            name,
            PortForwardSpec {
                network: "blue".into(),
                target: PortForwardTarget {
                    workload: Some("vm".into()),
                    selector: None,
                },
                ports: vec![ForwardedPort {
                    protocol: Protocol::Tcp,
                    port: Some(port),
                    ..ForwardedPort::default()
                }],
                allow_from: None,
                brute_force: None,
                syn_proxy: None,
            },
        );
        pf.metadata.namespace = Some("default".into());
        pf.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        pf
    }

    fn node(name: &str, forwards: Vec<weft_crds::NodeForward>) -> Arc<CompactNodeNetwork> {
        let mut nn = weft_crds::NodeNetwork::new(name, weft_crds::NodeNetworkSpec::default());
        nn.status = Some(weft_crds::NodeNetworkStatus {
            forwards,
            ..weft_crds::NodeNetworkStatus::default()
        });
        Arc::new(nn.into())
    }

    fn f(forward: &str, targets: &[&str], error: Option<&str>) -> weft_crds::NodeForward {
        weft_crds::NodeForward {
            forward: forward.into(),
            targets: targets.iter().map(|t| (*t).to_string()).collect(),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn the_nodes_targets_and_problems_make_the_status() {
        let nodes = [
            node("a", vec![f("default/ssh", &["10.10.0.5", "fd10::5"], None)]),
            node(
                "b",
                vec![
                    f(
                        "default/ssh",
                        &["10.10.1.7"],
                        Some("spec.synProxy: the agent on this node runs without --syn-proxy"),
                    ),
                    f("default/web", &["10.10.1.8"], None),
                ],
            ),
            node("c", vec![]),
        ];
        let got = forwarding("default/ssh", &nodes);
        assert_eq!(got.targets, ["10.10.0.5", "10.10.1.7", "fd10::5"]);
        assert_eq!(
            got.problems,
            ["b: spec.synProxy: the agent on this node runs without --syn-proxy"]
        );
        let ssh = forward("ssh", 2222, 10);
        let conditions = desired_conditions(&ssh, None, &got, jiff::Timestamp::now());
        let degraded = conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, REASON_NODE_PROBLEMS);
        assert!(degraded.message.starts_with("b: spec.synProxy"));
        // No problem, no Degraded condition; nobody reports it, no targets.
        let web = forwarding("default/web", &nodes);
        assert!(web.problems.is_empty());
        let conditions = desired_conditions(&ssh, None, &web, jiff::Timestamp::now());
        assert!(conditions.iter().all(|c| c.type_ != DEGRADED));
        assert_eq!(forwarding("default/none", &nodes), Forwarding::default());
    }

    #[test]
    fn a_port_forward_in_the_store_does_not_conflict_with_itself() {
        let ssh = forward("ssh", 2222, 10);
        let store = [Arc::new(ssh.clone())];
        assert_eq!(verdict(&ssh, &store, &[nat("blue")]), None);
        let conditions =
            desired_conditions(&ssh, None, &Forwarding::default(), jiff::Timestamp::now());
        assert!(conditions.iter().all(|c| c.status == "True"));
    }

    #[test]
    fn a_changed_port_forward_is_judged_by_its_new_spec_not_the_stored_one() {
        // The store still holds generation 1 (port 2222); the reconciled object moved to 3333,
        // where an older forward already sits.
        let old = forward("ssh", 2222, 10);
        let mut new = old.clone();
        new.spec.ports[0].port = Some(3333);
        let web = forward("web", 3333, 5);
        let store = [Arc::new(old), Arc::new(web.clone())];
        let r = verdict(&new, &store, &[nat("blue")]).unwrap();
        assert_eq!(r.reason, validate::REASON_PORT_CONFLICT);
        assert_eq!(verdict(&web, &store, &[nat("blue")]), None);
    }

    #[test]
    fn of_two_forwards_of_one_port_the_newer_is_flagged() {
        let older = forward("ssh", 2222, 10);
        let newer = forward("ssh2", 2222, 20);
        let store = [Arc::new(older.clone()), Arc::new(newer.clone())];
        let nets = [nat("blue")];
        assert_eq!(verdict(&older, &store, &nets), None);
        let r = verdict(&newer, &store, &nets).unwrap();
        assert_eq!(r.reason, validate::REASON_PORT_CONFLICT);
        assert!(
            r.message.contains("PortForward default/ssh"),
            "{}",
            r.message
        );
    }
}

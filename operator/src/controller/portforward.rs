//! Reconciles PortForwards: checks what CEL cannot (network exists and is NAT, node ports not
//! taken by an older PortForward on the same network) and writes `Valid` and `Ready`.
//!
//! `Ready=True` (reason `Accepted`) means the controller accepted the forward; the agents of
//! the nodes where the target runs install it. What an agent cannot install as asked (a
//! `synProxy` without the agent's `--syn-proxy`, a node port another PortForward holds there)
//! is in that agent's log and its status file, not yet in the PortForward's status, and
//! `status.targets` is not written yet.

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
        None => vec![
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
        ],
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
    let conditions = desired_conditions(pf, verdict.as_ref(), jiff::Timestamp::now());
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let status = pf.status.clone().unwrap_or_default();
    if status.conditions != conditions || status.observed_generation != pf.metadata.generation {
        let ns = pf.namespace().unwrap_or_default();
        let api: Api<PortForward> = Api::namespaced(ctx.client.clone(), &ns);
        let body = json!({
            "apiVersion": weft_crds::constants::API_VERSION,
            "kind": weft_crds::constants::PORT_FORWARD_KIND,
            "status": {
                "conditions": conditions,
                "observedGeneration": pf.metadata.generation,
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

    #[test]
    fn a_port_forward_in_the_store_does_not_conflict_with_itself() {
        let ssh = forward("ssh", 2222, 10);
        let store = [Arc::new(ssh.clone())];
        assert_eq!(verdict(&ssh, &store, &[nat("blue")]), None);
        let conditions = desired_conditions(&ssh, None, jiff::Timestamp::now());
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

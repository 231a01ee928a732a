//! Reconciles ClusterSegmentationPolicies and SegmentationPolicies: their status says how many
//! workload interfaces and nodes each applies to, summed from what every node's agent reports
//! in its `NodeNetwork` status (`status.policies`), and whether it is valid: the checks of the
//! CRD's CEL rules (for objects that reached the API some other way) and the agents' problems
//! with it (an unknown network, a selector that cannot match).

use super::compact::CompactNodeNetwork;
use super::status::{self, READY, VALID};
use super::{Context, Error, FIELD_MANAGER, name_of};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use weft_crds::{ClusterSegmentationPolicy, PolicyStatus, SegmentationPolicy};

/// Reason of `Valid=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason of `Valid=False` for a spec the CRD rules reject.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of `Valid=False` for a problem an agent reported.
pub const REASON_NOT_ENFORCEABLE: &str = "NotEnforceable";
/// Reason of `Ready=True`.
pub const REASON_ENFORCED: &str = "Enforced";
/// Reason of `Ready=False` while no node enforces the policy on any workload.
pub const REASON_NO_WORKLOADS: &str = "NoWorkloads";

/// What the nodes report about one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// Workload interfaces it applies to, all nodes together.
    pub workloads: i32,
    /// Nodes with at least one of them.
    pub nodes: i32,
    /// The agents' problems with it: `node: message`, sorted.
    pub errors: Vec<String>,
}

/// Decide (pure): sums what every NodeNetwork's status says about policy `key` (`Kind name`).
pub fn enforcement(key: &str, node_networks: &[Arc<CompactNodeNetwork>]) -> Enforcement {
    let mut out = Enforcement::default();
    let mut errors = BTreeSet::new();
    for nn in node_networks {
        let Some(p) = nn
            .status
            .as_ref()
            .and_then(|s| s.policies.iter().find(|p| p.policy == key))
        else {
            continue;
        };
        out.workloads = out.workloads.saturating_add(p.interfaces.max(0));
        if p.interfaces > 0 {
            out.nodes += 1;
        }
        if let Some(e) = &p.error {
            errors.insert(format!("{}: {e}", nn.name_any()));
        }
    }
    out.errors = errors.into_iter().collect();
    out
}

/// The nodes' problems with a policy (`node: message`) for its condition: a few of them and how
/// many more, so that a thousand nodes without br_netfilter make no message the status cannot
/// hold.
fn some_errors(errors: &[String]) -> String {
    let shown = errors.len().min(status::NAMES_IN_MESSAGE);
    let mut out = errors[..shown].join("; ");
    if errors.len() > shown {
        out.push_str(&format!("; and {} more", errors.len() - shown));
    }
    out
}

/// Decide (pure): the status of a policy with `generation`, the problems of its spec, and what
/// the nodes report.
pub fn desired_status(
    generation: Option<i64>,
    previous: &[Condition],
    spec_errors: &[String],
    e: &Enforcement,
    now: jiff::Timestamp,
) -> PolicyStatus {
    let valid = if !spec_errors.is_empty() {
        status::condition(
            VALID,
            false,
            REASON_INVALID_SPEC,
            spec_errors.join("; "),
            generation,
            previous,
            now,
        )
    } else if !e.errors.is_empty() {
        status::condition(
            VALID,
            false,
            REASON_NOT_ENFORCEABLE,
            some_errors(&e.errors),
            generation,
            previous,
            now,
        )
    } else {
        status::condition(
            VALID,
            true,
            REASON_ACCEPTED,
            "the spec passed every check and every node enforces it",
            generation,
            previous,
            now,
        )
    };
    let ready = if !spec_errors.is_empty() {
        // Not ready as written, but not open either: what the nodes enforce until it is fixed.
        status::condition(
            READY,
            false,
            REASON_INVALID_SPEC,
            "not enforced as written (see Valid); until it is fixed it fails closed: a namespace policy's subject stays isolated where it has rules, allowed nothing by them; a cluster policy's valid rules hold, each invalid Deny or Pass rule denies all of the subject's traffic its way and each invalid Accept rule is left out; with an invalid subject, nothing is enforced",
            generation,
            previous,
            now,
        )
    } else if e.workloads > 0 {
        status::condition(
            READY,
            true,
            REASON_ENFORCED,
            format!(
                "enforced for {} workload interface(s) on {} node(s)",
                e.workloads, e.nodes
            ),
            generation,
            previous,
            now,
        )
    } else {
        status::condition(
            READY,
            false,
            REASON_NO_WORKLOADS,
            "no workload matches its subject on any node yet",
            generation,
            previous,
            now,
        )
    };
    PolicyStatus {
        conditions: vec![valid, ready],
        observed_generation: generation,
        workloads: Some(e.workloads),
        nodes: Some(e.nodes),
    }
}

/// The problems of a spec, as `validate()` names them.
pub(super) fn spec_errors(result: Result<(), Vec<weft_crds::FieldError>>) -> Vec<String> {
    result
        .err()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Writes the status of one object of `kind` (server-side apply of the status subresource).
pub(super) async fn write<K>(
    api: Api<K>,
    name: &str,
    kind: &'static str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({
        "apiVersion": weft_crds::constants::API_VERSION,
        "kind": kind,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error::Api {
        action: "apply status of",
        kind,
        name: name.to_owned(),
        source,
    })
}

/// One policy of either kind: its reports key, its status, its spec's problems, and where its
/// status is written.
struct Policy<'a, K> {
    kind: &'static str,
    object: &'a K,
    status: Option<&'a PolicyStatus>,
    spec_errors: Vec<String>,
    api: Api<K>,
    /// `name` or `namespace/name`, as the agents report it after the kind.
    reported_as: String,
}

async fn reconcile<K>(p: Policy<'_, K>, ctx: &Context) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    let result = async {
        let name = name_of(p.object)?;
        if p.object.meta().deletion_timestamp.is_some() || !ctx.is_leader() {
            return Ok(Action::await_change());
        }
        let e = enforcement(
            &format!("{} {}", p.kind, p.reported_as),
            &ctx.stores.node_networks.state(),
        );
        let new = desired_status(
            p.object.meta().generation,
            p.status
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default(),
            &p.spec_errors,
            &e,
            jiff::Timestamp::now(),
        );
        if p.status != Some(&new) {
            write(p.api, &name, p.kind, &new).await?;
        }
        Ok(Action::await_change())
    }
    .await;
    finish(ctx, p.kind, &super::object_key(p.object), start, result)
}

/// Reconciles one ClusterSegmentationPolicy.
pub async fn reconcile_cluster(
    p: Arc<ClusterSegmentationPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let policy = Policy {
        kind: "ClusterSegmentationPolicy",
        object: p.as_ref(),
        status: p.status.as_ref(),
        spec_errors: spec_errors(p.spec.validate()),
        api: Api::all(ctx.client.clone()),
        reported_as: p.name_any(),
    };
    reconcile(policy, &ctx).await
}

/// Reconciles one SegmentationPolicy.
pub async fn reconcile_namespaced(
    p: Arc<SegmentationPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = p.namespace().unwrap_or_default();
    let policy = Policy {
        kind: "SegmentationPolicy",
        object: p.as_ref(),
        status: p.status.as_ref(),
        spec_errors: spec_errors(p.spec.validate()),
        api: Api::namespaced(ctx.client.clone(), &namespace),
        reported_as: format!("{namespace}/{}", p.name_any()),
    };
    reconcile(policy, &ctx).await
}

/// Records a reconcile of `kind`: its duration, and its success or its error's reason.
pub(super) fn finish(
    ctx: &Context,
    kind: &'static str,
    key: &str,
    start: Instant,
    result: Result<Action, Error>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled(kind, start.elapsed());
    match &result {
        Ok(_) => ctx.succeeded(key),
        Err(e) => ctx.metrics.failed(kind, e.reason()),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crds::{NodeNetworkSpec, NodeNetworkStatus, NodePolicy};

    fn node(name: &str, policies: Vec<NodePolicy>) -> Arc<CompactNodeNetwork> {
        let mut nn = weft_crds::NodeNetwork::new(name, NodeNetworkSpec::default());
        nn.status = Some(NodeNetworkStatus {
            policies,
            ..NodeNetworkStatus::default()
        });
        Arc::new(nn.into())
    }

    fn p(policy: &str, interfaces: i32, error: Option<&str>) -> NodePolicy {
        NodePolicy {
            policy: policy.into(),
            interfaces,
            error: error.map(Into::into),
        }
    }

    /// A problem on a thousand nodes (br_netfilter not loaded) names a few of them.
    #[test]
    fn the_nodes_problems_with_a_policy_are_named_a_few() {
        let key = "SegmentationPolicy shop/db";
        let nodes: Vec<_> = (0..1000)
            .map(|i| {
                node(
                    &format!("n{i:04}"),
                    vec![p(key, 1, Some("br_netfilter is not loaded"))],
                )
            })
            .collect();
        let e = enforcement(key, &nodes);
        let t = jiff::Timestamp::from_second(100).unwrap();
        let st = desired_status(Some(1), &[], &[], &e, t);
        let valid = status::find(&st.conditions, VALID).unwrap();
        assert_eq!(valid.reason, REASON_NOT_ENFORCEABLE);
        assert!(valid.message.len() < 1024, "{}", valid.message.len());
        assert!(
            valid
                .message
                .starts_with("n0000: br_netfilter is not loaded; n0001: ")
                && valid.message.ends_with("; and 990 more"),
            "{}",
            valid.message
        );
    }

    #[test]
    fn workloads_and_nodes_are_summed_and_errors_name_the_node() {
        let key = "SegmentationPolicy shop/db";
        let nodes = [
            node(
                "a",
                vec![p(key, 2, None), p("SegmentationPolicy shop/x", 5, None)],
            ),
            node(
                "b",
                vec![p(
                    key,
                    0,
                    Some("spec.subject.networks[0]: unknown network lan"),
                )],
            ),
            node("c", vec![p(key, 1, None)]),
            node("d", vec![]),
        ];
        let e = enforcement(key, &nodes);
        assert_eq!((e.workloads, e.nodes), (3, 2));
        assert_eq!(
            e.errors,
            ["b: spec.subject.networks[0]: unknown network lan"]
        );
        let t = jiff::Timestamp::from_second(100).unwrap();
        let s = desired_status(Some(4), &[], &[], &e, t);
        assert_eq!(
            (s.workloads, s.nodes, s.observed_generation),
            (Some(3), Some(2), Some(4))
        );
        let valid = s.conditions.iter().find(|c| c.type_ == VALID).unwrap();
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", REASON_NOT_ENFORCEABLE)
        );
        assert!(
            valid.message.contains("unknown network lan"),
            "{}",
            valid.message
        );
        let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", REASON_ENFORCED)
        );
        assert!(
            ready
                .message
                .contains("3 workload interface(s) on 2 node(s)")
        );
    }

    #[test]
    fn an_invalid_spec_is_not_ready_and_an_unmatched_policy_waits() {
        let t = jiff::Timestamp::from_second(100).unwrap();
        let e = Enforcement {
            workloads: 4,
            nodes: 1,
            errors: vec![],
        };
        let s = desired_status(
            Some(1),
            &[],
            &["spec.priority: 2000 is out of range".into()],
            &e,
            t,
        );
        let valid = s.conditions.iter().find(|c| c.type_ == VALID).unwrap();
        assert_eq!(valid.reason, REASON_INVALID_SPEC);
        assert!(valid.message.contains("spec.priority"));
        let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_INVALID_SPEC)
        );
        assert!(ready.message.contains("fails closed"), "{}", ready.message);
        let s = desired_status(Some(1), &[], &[], &Enforcement::default(), t);
        let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_NO_WORKLOADS)
        );
        assert_eq!(
            s.conditions
                .iter()
                .find(|c| c.type_ == VALID)
                .unwrap()
                .status,
            "True"
        );
        // The same outcome later writes nothing: equal status, transition times kept.
        let again = desired_status(
            Some(1),
            &s.conditions,
            &[],
            &Enforcement::default(),
            t + jiff::SignedDuration::from_secs(60),
        );
        assert_eq!(again, s);
    }
}

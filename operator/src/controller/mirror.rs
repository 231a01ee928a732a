//! Reconciles TrafficMirrors: their status sums what every node's agent reports in its
//! `NodeNetwork` status (`status.mirrors`: sources mirrored, frames and bytes copied, problems)
//! and says whether the spec passes the CRD's rules (for objects that reached the API some
//! other way).

use super::compact::CompactNodeNetwork;
use super::policy::{finish, spec_errors, write};
use super::status::{self, READY, VALID};
use super::{Context, Error, name_of};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use weft_crds::{TRAFFIC_MIRROR_KIND, TrafficMirror, TrafficMirrorStatus};

/// Reason of `Ready=True`.
pub const REASON_MIRRORING: &str = "Mirroring";
/// Reason of `Ready=False` while no node has a source.
pub const REASON_NO_SOURCES: &str = "NoSources";
/// Reason of `Ready=False` when a node cannot mirror its sources.
pub const REASON_NOT_MIRRORED: &str = "NotMirrored";
/// Reason of `Valid=False` for a spec the CRD rules reject.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of `Valid=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Most problems kept in the status (its schema's `maxItems`).
const MAX_PROBLEMS: usize = 64;

/// What the nodes report about one mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirroring {
    /// Source interfaces, all nodes together.
    pub sources: i32,
    /// Nodes with at least one source mirrored, sorted.
    pub nodes: Vec<String>,
    /// Frames copied.
    pub packets: i64,
    /// Bytes copied.
    pub bytes: i64,
    /// `node: problem`, sorted.
    pub problems: Vec<String>,
}

/// Decide (pure): sums what every NodeNetwork's status says about mirror `key`
/// (`namespace/name`).
pub fn mirroring(key: &str, node_networks: &[Arc<CompactNodeNetwork>]) -> Mirroring {
    let mut out = Mirroring::default();
    let mut problems = BTreeSet::new();
    for nn in node_networks {
        let Some(m) = nn
            .status
            .as_ref()
            .and_then(|s| s.mirrors.iter().find(|m| m.mirror == key))
        else {
            continue;
        };
        out.sources = out.sources.saturating_add(m.sources.max(0));
        out.packets = out.packets.saturating_add(m.packets.max(0));
        out.bytes = out.bytes.saturating_add(m.bytes.max(0));
        if m.sources > 0 && m.error.is_none() {
            out.nodes.push(nn.name_any());
        }
        if let Some(e) = &m.error {
            problems.insert(format!("{}: {e}", nn.name_any()));
        }
    }
    out.nodes.sort();
    out.problems = problems.into_iter().take(MAX_PROBLEMS).collect();
    out
}

/// Decide (pure): the status of a mirror with `generation`, the problems of its spec, and what
/// the nodes report.
pub fn desired_status(
    generation: Option<i64>,
    previous: &[Condition],
    spec_errors: &[String],
    m: &Mirroring,
    now: jiff::Timestamp,
) -> TrafficMirrorStatus {
    let valid = if spec_errors.is_empty() {
        status::condition(
            VALID,
            true,
            REASON_ACCEPTED,
            "the spec passed every check",
            generation,
            previous,
            now,
        )
    } else {
        status::condition(
            VALID,
            false,
            REASON_INVALID_SPEC,
            spec_errors.join("; "),
            generation,
            previous,
            now,
        )
    };
    let ready = if !spec_errors.is_empty() {
        status::condition(
            READY,
            false,
            REASON_INVALID_SPEC,
            spec_errors.join("; "),
            generation,
            previous,
            now,
        )
    } else if !m.problems.is_empty() {
        status::condition(
            READY,
            false,
            REASON_NOT_MIRRORED,
            m.problems.join("; "),
            generation,
            previous,
            now,
        )
    } else if m.sources == 0 {
        status::condition(
            READY,
            false,
            REASON_NO_SOURCES,
            "no workload interface matches spec.sources on any node yet",
            generation,
            previous,
            now,
        )
    } else {
        status::condition(
            READY,
            true,
            REASON_MIRRORING,
            format!(
                "mirroring {} source interface(s) on {} node(s)",
                m.sources,
                m.nodes.len()
            ),
            generation,
            previous,
            now,
        )
    };
    TrafficMirrorStatus {
        conditions: vec![valid, ready],
        observed_generation: generation,
        sources: Some(m.sources),
        nodes: m.nodes.clone(),
        packets: Some(m.packets),
        bytes: Some(m.bytes),
        problems: m.problems.clone(),
    }
}

/// Reconciles one TrafficMirror.
pub async fn reconcile(m: Arc<TrafficMirror>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = async {
        let name = name_of(m.as_ref())?;
        if m.meta().deletion_timestamp.is_some() || !ctx.is_leader() {
            return Ok(Action::await_change());
        }
        let namespace = m.namespace().unwrap_or_default();
        let report = mirroring(
            &format!("{namespace}/{name}"),
            &ctx.stores.node_networks.state(),
        );
        let new = desired_status(
            m.meta().generation,
            m.status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default(),
            &spec_errors(m.spec.validate()),
            &report,
            jiff::Timestamp::now(),
        );
        if m.status.as_ref() != Some(&new) {
            write(
                Api::<TrafficMirror>::namespaced(ctx.client.clone(), &namespace),
                &name,
                TRAFFIC_MIRROR_KIND,
                &new,
            )
            .await?;
        }
        Ok(Action::await_change())
    }
    .await;
    finish(
        &ctx,
        TRAFFIC_MIRROR_KIND,
        &super::object_key(m.as_ref()),
        start,
        result,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_crds::{NodeMirror, NodeNetworkSpec, NodeNetworkStatus};

    fn node(name: &str, mirrors: Vec<NodeMirror>) -> Arc<CompactNodeNetwork> {
        let mut nn = weft_crds::NodeNetwork::new(name, NodeNetworkSpec::default());
        nn.status = Some(NodeNetworkStatus {
            mirrors,
            ..NodeNetworkStatus::default()
        });
        Arc::new(nn.into())
    }

    fn m(mirror: &str, sources: i32, packets: i64, error: Option<&str>) -> NodeMirror {
        NodeMirror {
            mirror: mirror.into(),
            sources,
            packets,
            bytes: packets * 100,
            error: error.map(Into::into),
        }
    }

    #[test]
    fn nodes_reports_are_summed_and_problems_name_the_node() {
        let nodes = [
            node(
                "a",
                vec![m("prod/tap", 2, 10, None), m("prod/other", 9, 9, None)],
            ),
            node("b", vec![m("prod/tap", 1, 5, None)]),
            node("c", vec![m("prod/tap", 0, 0, Some("no analyzer pod"))]),
            node("d", vec![]),
        ];
        let got = mirroring("prod/tap", &nodes);
        assert_eq!(
            got,
            Mirroring {
                sources: 3,
                nodes: vec!["a".into(), "b".into()],
                packets: 15,
                bytes: 1500,
                problems: vec!["c: no analyzer pod".into()],
            }
        );
        let now = jiff::Timestamp::now();
        let st = desired_status(Some(1), &[], &[], &got, now);
        let ready = st.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_NOT_MIRRORED)
        );
        assert!(ready.message.contains("c: no analyzer pod"));
        let fine = mirroring("prod/tap", &nodes[..2]);
        let st = desired_status(Some(1), &[], &[], &fine, now);
        let ready = st.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", REASON_MIRRORING)
        );
        assert_eq!(st.sources, Some(3));
        assert_eq!(st.packets, Some(15));
    }

    #[test]
    fn no_sources_is_not_ready() {
        let st = desired_status(
            None,
            &[],
            &[],
            &Mirroring::default(),
            jiff::Timestamp::now(),
        );
        let ready = st.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.reason, REASON_NO_SOURCES);
    }
}

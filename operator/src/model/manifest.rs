//! Reading manifests (YAML, possibly several documents, or a `List`) into [`Resources`].

use super::{Resources, WorkloadMeta};
use serde::Deserialize;
use std::collections::BTreeMap;
use weft_crds::{
    ClusterSegmentationPolicy, Network, PortForward, SegmentationPolicy, TrafficMirror,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize)]
struct PodLike {
    metadata: PodMeta,
}

#[derive(Deserialize)]
struct PodMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Parses one manifest text (YAML, possibly several documents, or a `List`) into resources.
pub fn parse_manifests(text: &str, origin: &str, into: &mut Resources) {
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(e) => {
            into.problems.push(format!("{origin}: not valid YAML: {e}"));
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        add_document(doc, &format!("{origin} document {}", i + 1), into);
    }
}

/// What the API server would refuse in an object's `metadata.name` and `metadata.namespace`
/// (DNS-1123 subdomain; a namespace is a DNS-1123 label).
fn metadata_problem(doc: &serde_json::Value) -> Option<String> {
    let meta = doc.get("metadata");
    let text = |key: &str| meta.and_then(|m| m.get(key)).and_then(|v| v.as_str());
    let Some(name) = text("name") else {
        return Some("metadata.name: missing".to_string());
    };
    if let Some(problem) = weft_dataplane::names::network_name_problem(name) {
        return Some(format!(
            "metadata.name: {}",
            problem.replace("a valid Network name", "a valid object name")
        ));
    }
    if let Some(ns) = text("namespace")
        && (ns.len() > 63 || ns.contains('.') || !weft_dataplane::names::is_dns1123_subdomain(ns))
    {
        return Some(format!(
            "metadata.namespace: {ns:?} is not a valid namespace: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    None
}

/// Adds one decoded object (or the items of a `List`).
pub fn add_document(doc: serde_json::Value, origin: &str, into: &mut Resources) {
    if doc.is_null() {
        return;
    }
    let tm: TypeMeta = match serde_json::from_value(doc.clone()) {
        Ok(t) => t,
        Err(e) => {
            into.problems.push(format!("{origin}: {e}"));
            return;
        }
    };
    let kind = tm.kind.unwrap_or_default();
    let api = tm.api_version.unwrap_or_default();
    // The names the API server would refuse: here they would become file names and nftables
    // strings (a Network `a","eth0` or `../../victim`).
    if kind != "List"
        && (api.starts_with("weft.dev/")
            || (api == "v1" && matches!(kind.as_str(), "Pod" | "Namespace")))
        && let Some(problem) = metadata_problem(&doc)
    {
        into.problems
            .push(format!("{origin}: invalid {kind}: {problem}"));
        return;
    }
    match (api.as_str(), kind.as_str()) {
        (_, "List") => {
            if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
                for (j, item) in items.iter().enumerate() {
                    add_document(item.clone(), &format!("{origin} item {}", j + 1), into);
                }
            }
        }
        ("weft.dev/v1alpha1", "Network") => match serde_json::from_value::<Network>(doc) {
            Ok(n) => into.networks.push(n),
            Err(e) => into
                .problems
                .push(format!("{origin}: invalid Network: {e}")),
        },
        ("weft.dev/v1alpha1", "PortForward") => match serde_json::from_value::<PortForward>(doc) {
            Ok(mut p) => {
                if p.metadata.namespace.is_none() {
                    p.metadata.namespace = Some("default".into());
                }
                into.port_forwards.push(p)
            }
            Err(e) => into
                .problems
                .push(format!("{origin}: invalid PortForward: {e}")),
        },
        ("weft.dev/v1alpha1", "ClusterSegmentationPolicy") => {
            match serde_json::from_value::<ClusterSegmentationPolicy>(doc) {
                Ok(p) => into.cluster_policies.push(p),
                Err(e) => into
                    .problems
                    .push(format!("{origin}: invalid ClusterSegmentationPolicy: {e}")),
            }
        }
        ("weft.dev/v1alpha1", "SegmentationPolicy") => {
            match serde_json::from_value::<SegmentationPolicy>(doc) {
                Ok(mut p) => {
                    if p.metadata.namespace.is_none() {
                        p.metadata.namespace = Some("default".into());
                    }
                    into.policies.push(p)
                }
                Err(e) => into
                    .problems
                    .push(format!("{origin}: invalid SegmentationPolicy: {e}")),
            }
        }
        ("weft.dev/v1alpha1", "TrafficMirror") => {
            match serde_json::from_value::<TrafficMirror>(doc) {
                Ok(mut m) => {
                    if m.metadata.namespace.is_none() {
                        m.metadata.namespace = Some("default".into());
                    }
                    into.mirrors.push(m)
                }
                Err(e) => into
                    .problems
                    .push(format!("{origin}: invalid TrafficMirror: {e}")),
            }
        }
        ("v1", "Namespace") => match serde_json::from_value::<PodLike>(doc) {
            Ok(n) => {
                into.namespaces.insert(n.metadata.name, n.metadata.labels);
            }
            Err(e) => into
                .problems
                .push(format!("{origin}: invalid Namespace: {e}")),
        },
        ("v1", "Pod") => match serde_json::from_value::<PodLike>(doc) {
            Ok(p) => into.workloads.push(WorkloadMeta {
                namespace: p.metadata.namespace.unwrap_or_else(|| "default".into()),
                name: p.metadata.name,
                labels: p.metadata.labels,
                networks: p
                    .metadata
                    .annotations
                    .get(weft_dataplane::proto::NETWORKS_ANNOTATION)
                    .cloned(),
                limits: WorkloadMeta::limit_annotations(&p.metadata.annotations),
            }),
            Err(e) => into.problems.push(format!("{origin}: invalid Pod: {e}")),
        },
        (api, kind) if api.starts_with("weft.dev/") => into.problems.push(format!(
            "{origin}: unsupported kind {kind} of {api}; this agent knows Network, PortForward, ClusterSegmentationPolicy, SegmentationPolicy and TrafficMirror of weft.dev/v1alpha1"
        )),
        _ => {} // other kinds are someone else's business
    }
}

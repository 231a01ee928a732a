//! What `kubectl weft` prints, from what it read: pure, so it is tested without a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::{Value, json};
use weft_crds::NodeNetwork;

/// One node's line of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    /// The node.
    pub node: String,
    /// Its `Ready` condition (`True`, `False`, or `Unknown` when the agent has not reported).
    pub ready: String,
    /// The Networks realized on it.
    pub networks: Vec<String>,
    /// weft's bridges on it.
    pub bridges: Vec<String>,
    /// Its workload endpoints.
    pub endpoints: i64,
    /// What is wrong there: the `Degraded` condition's message, else the agent's last error.
    pub problem: Option<String>,
}

fn condition<'a>(nn: &'a NodeNetwork, kind: &str) -> Option<&'a Condition> {
    nn.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
}

/// `status`: one line per NodeNetwork (one per node weft runs on), sorted by node.
pub fn node_lines(nodes: &[NodeNetwork]) -> Vec<NodeLine> {
    let mut out: Vec<NodeLine> = nodes
        .iter()
        .map(|nn| {
            let status = nn.status.clone().unwrap_or_default();
            let degraded = condition(nn, "Degraded")
                .filter(|c| c.status == "True")
                .map(|c| c.message.clone());
            NodeLine {
                node: nn.metadata.name.clone().unwrap_or_default(),
                ready: condition(nn, "Ready")
                    .map_or_else(|| "Unknown".into(), |c| c.status.clone()),
                networks: status.networks,
                bridges: status.bridges,
                endpoints: status.endpoints.unwrap_or(0),
                problem: degraded.or(status.last_error),
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// `status` as JSON.
pub fn node_lines_json(lines: &[NodeLine]) -> Value {
    Value::Array(
        lines
            .iter()
            .map(|l| {
                json!({"node": l.node, "ready": l.ready, "networks": l.networks,
                       "bridges": l.bridges, "endpoints": l.endpoints, "problem": l.problem})
            })
            .collect(),
    )
}

/// `status` as a table.
pub fn node_table(lines: &[NodeLine]) -> String {
    let dash = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    table(
        &[
            "NODE",
            "READY",
            "NETWORKS",
            "BRIDGES",
            "ENDPOINTS",
            "PROBLEM",
        ],
        lines
            .iter()
            .map(|l| {
                vec![
                    l.node.clone(),
                    l.ready.clone(),
                    dash(&l.networks),
                    dash(&l.bridges),
                    l.endpoints.to_string(),
                    l.problem.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

/// One weft interface of a pod, as its node's agent publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The node.
    pub node: String,
    /// The Network.
    pub network: String,
    /// Its addresses.
    pub ips: Vec<String>,
    /// Its MAC.
    pub mac: Option<String>,
    /// The VM it belongs to.
    pub vm: Option<String>,
    /// False for a live migration's target whose VM has not arrived yet.
    pub active: bool,
}

/// `endpoints`: the interfaces of pod `namespace/name` on every node.
pub fn interfaces_of(nodes: &[NodeNetwork], namespace: &str, name: &str) -> Vec<Interface> {
    let mut out = Vec::new();
    for nn in nodes {
        let node = nn.metadata.name.clone().unwrap_or_default();
        for w in nn.status.iter().flat_map(|s| &s.workloads) {
            if w.namespace == namespace && w.name == name {
                out.push(Interface {
                    node: node.clone(),
                    network: w.network.clone(),
                    ips: w.ips.clone(),
                    mac: w.mac.clone(),
                    vm: w.vm.clone(),
                    active: w.active,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.node, &a.network).cmp(&(&b.node, &b.network)));
    out
}

/// `endpoints` as a table, then the policies.
pub fn interface_table(interfaces: &[Interface], policies: &[String]) -> String {
    let mut out = table(
        &["NODE", "NETWORK", "ADDRESSES", "MAC", "VM", "ACTIVE"],
        interfaces
            .iter()
            .map(|i| {
                vec![
                    i.node.clone(),
                    i.network.clone(),
                    i.ips.join(","),
                    i.mac.clone().unwrap_or_else(|| "-".into()),
                    i.vm.clone().unwrap_or_else(|| "-".into()),
                    i.active.to_string(),
                ]
            })
            .collect(),
    );
    out.push_str("\nPOLICIES\n");
    if policies.is_empty() {
        out.push_str("  none: its Networks' default actions decide\n");
    }
    for p in policies {
        out.push_str(&format!("  {p}\n"));
    }
    out
}

/// `endpoints` as JSON.
pub fn interfaces_json(interfaces: &[Interface], policies: &[String]) -> Value {
    json!({
        "interfaces": interfaces.iter().map(|i| json!({"node": i.node, "network": i.network,
            "ips": i.ips, "mac": i.mac, "vm": i.vm, "active": i.active})).collect::<Vec<_>>(),
        "policies": policies,
    })
}

/// A line of an agent's log that is an audit record (a JSON object with the record's `verdict`,
/// and `src` and `dst`, or for an anomaly its `workload` and `kind`), not one of the agent's
/// own log lines.
pub fn audit_record(line: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let o = v.as_object()?;
    let packet = o.contains_key("src") && o.contains_key("dst");
    let anomaly = o.get("verdict").and_then(Value::as_str) == Some("anomaly")
        && o.contains_key("workload")
        && o.contains_key("kind");
    (o.contains_key("verdict") && (packet || anomaly)).then_some(v)
}

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 < n {
                s.push_str(&format!("{c:<w$}  "));
            } else {
                s.push_str(&c);
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, status: Value) -> NodeNetwork {
        serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "NodeNetwork",
            "metadata": {"name": name},
            "spec": {"blocks": []},
            "status": status,
        }))
        .unwrap()
    }

    fn nodes() -> Vec<NodeNetwork> {
        vec![
            node(
                "node2",
                json!({
                    "conditions": [
                        {"type": "Ready", "status": "False", "reason": "ApplyFailed", "message": "", "lastTransitionTime": "2026-12-03T10:00:00Z"},
                        {"type": "Degraded", "status": "True", "reason": "ApplyFailed", "message": "uplink eth9 is missing", "lastTransitionTime": "2026-12-03T10:00:00Z"}],
                    "networks": [], "endpoints": 0,
                }),
            ),
            node(
                "node1",
                json!({
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Applied", "message": "", "lastTransitionTime": "2026-12-03T10:00:00Z"}],
                    "networks": ["lan", "nat"], "bridges": ["wb-lan", "wn-nat"], "endpoints": 2,
                    "workloads": [
                        {"network": "nat", "namespace": "shop", "name": "web", "ips": ["10.10.0.5", "fd10::5"], "mac": "0a:58:0a:0a:00:05"},
                        {"network": "lan", "namespace": "shop", "name": "web", "ips": ["192.168.1.40"], "active": false},
                        {"network": "nat", "namespace": "bank", "name": "web", "ips": ["10.10.0.6"]}],
                }),
            ),
        ]
    }

    #[test]
    fn status_has_a_line_per_node_with_its_problem() {
        let lines = node_lines(&nodes());
        assert_eq!(lines[0].node, "node1");
        assert_eq!((lines[0].ready.as_str(), lines[0].endpoints), ("True", 2));
        assert_eq!(lines[1].problem.as_deref(), Some("uplink eth9 is missing"));
        let text = node_table(&lines);
        let rows: Vec<&str> = text.lines().collect();
        assert!(rows[0].starts_with("NODE   READY  NETWORKS"), "{text}");
        assert!(
            rows[1].contains("lan,nat") && rows[1].contains("wb-lan,wn-nat"),
            "{text}"
        );
        assert!(rows[2].ends_with("uplink eth9 is missing"), "{text}");
        assert_eq!(node_lines_json(&lines)[1]["ready"], "False");
    }

    #[test]
    fn endpoints_are_the_pods_interfaces_on_every_network() {
        let found = interfaces_of(&nodes(), "shop", "web");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].network, "lan");
        assert!(!found[0].active, "a migration target not yet active");
        assert_eq!(found[1].ips, ["10.10.0.5", "fd10::5"]);
        let text = interface_table(&found, &["SegmentationPolicy shop/db".into()]);
        assert!(
            text.contains("POLICIES\n  SegmentationPolicy shop/db\n"),
            "{text}"
        );
        assert!(interfaces_of(&nodes(), "shop", "nope").is_empty());
    }

    #[test]
    fn audit_records_are_told_from_the_agent_s_own_log_lines() {
        let record = r#"{"time":"2026-12-03T10:00:00Z","node":"node1","verdict":"deny","src":"10.10.0.5","dst":"10.10.0.6","protocol":"tcp","port":22}"#;
        assert_eq!(audit_record(record).unwrap()["verdict"], "deny");
        let anomaly = r#"{"time":"2026-12-03T10:00:01Z","node":"node1","verdict":"anomaly","kind":"conntrack-budget","state":"started","workload":"shop/web","network":"nat","interface":"eth0","rate":520.0,"limit":"40 conntrack entries"}"#;
        assert_eq!(audit_record(anomaly).unwrap()["kind"], "conntrack-budget");
        let log = r#"{"timestamp":"2026-12-03T10:00:00Z","level":"INFO","fields":{"message":"applied node plan"}}"#;
        assert!(audit_record(log).is_none());
        assert!(audit_record("not json").is_none());
    }
}

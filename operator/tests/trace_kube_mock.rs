//! `trace --kube` against a mocked API server (tower-test): the resources and the workloads the
//! agents publish are listed from the API, and the answer names the deciding policy and rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use weft_crds::L4Protocol;
use weft_operator::policy::cluster;

fn meta(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let mut m = json!({"name": name, "resourceVersion": "1", "uid": format!("uid-{name}"), "labels": labels});
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// A fake apiserver answering each collection's list from `lists`; records the paths asked.
fn start(lists: BTreeMap<&'static str, Vec<Value>>) -> (Client, Arc<Mutex<Vec<String>>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Some((request, reply)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            seen.lock().unwrap().push(path.clone());
            let (status, body) = match lists.get(path.as_str()) {
                Some(items) => (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "7"}, "items": items}),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                ),
            };
            reply.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), asked)
}

fn cluster_lists() -> BTreeMap<&'static str, Vec<Value>> {
    BTreeMap::from([
        (
            "/apis/weft.dev/v1alpha1/networks",
            vec![
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Network", "metadata": meta("blue", None, &[]),
                        "spec": {"mode": "NAT", "subnets": ["10.10.0.0/16"]}}),
            ],
        ),
        (
            "/apis/weft.dev/v1alpha1/clustersegmentationpolicies",
            vec![
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "ClusterSegmentationPolicy",
                        "metadata": meta("no-ssh", None, &[]),
                        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
                                 "ingress": [{"name": "ssh", "action": "Deny", "protocols": [{"protocol": "TCP", "port": 22}]}]}}),
            ],
        ),
        (
            "/apis/weft.dev/v1alpha1/segmentationpolicies",
            vec![
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "SegmentationPolicy",
                        "metadata": meta("db-from-app", Some("shop"), &[]),
                        "spec": {"subject": {"podSelector": {"matchLabels": {"tier": "db"}}},
                                 "ingress": [{"name": "sql", "action": "Allow",
                                              "from": [{"pods": {"podSelector": {"matchLabels": {"tier": "app"}}}}],
                                              "protocols": [{"protocol": "TCP", "port": 5432}]}]}}),
            ],
        ),
        (
            "/api/v1/namespaces",
            vec![
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": meta("shop", None, &[("env", "prod")])}),
            ],
        ),
        (
            "/apis/weft.dev/v1alpha1/workloadslices",
            vec![
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "WorkloadSlice", "metadata": meta("blue.0", None, &[]),
                       "spec": {"network": "blue", "workloads": [
                           {"node": "node-a", "network": "blue", "namespace": "shop", "name": "db-1", "labels": {"tier": "db"}, "ips": ["10.10.0.2"]},
                           // A live migration's waiting target: its VM still runs on node-b.
                           {"node": "node-a", "network": "blue", "namespace": "shop", "name": "app-1-target", "labels": {"tier": "app"},
                            "ips": ["10.10.0.66"], "active": false},
                           {"node": "node-b", "network": "blue", "namespace": "shop", "name": "app-1", "labels": {"tier": "app"}, "ips": ["10.10.0.66"]}]}}),
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "WorkloadSlice", "metadata": meta("blue.1", None, &[]),
                       "spec": {"network": "blue", "workloads": [
                           // Also in blue.0 (two writes that crossed): one member.
                           {"node": "node-b", "network": "blue", "namespace": "shop", "name": "app-1", "labels": {"tier": "app"}, "ips": ["10.10.0.66"]},
                           {"node": "node-b", "network": "blue", "namespace": "shop", "name": "web-1", "labels": {"tier": "web"}, "ips": ["10.10.0.67"]}]}}),
            ],
        ),
    ])
}

#[tokio::test]
async fn trace_answers_from_the_clusters_resources_and_published_workloads() {
    let (client, asked) = start(cluster_lists());
    let (res, members) = cluster::snapshot(&client).await.unwrap();
    assert_eq!(res.networks.len(), 1);
    assert_eq!(res.cluster_policies.len(), 1);
    assert_eq!(res.policies.len(), 1);
    assert_eq!(res.namespaces["shop"]["env"], "prod");
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["db-1", "app-1", "web-1"],
        "the waiting target is not a member"
    );
    let asked = asked.lock().unwrap().clone();
    for path in [
        "/api/v1/namespaces",
        "/apis/weft.dev/v1alpha1/workloadslices",
    ] {
        assert!(asked.iter().any(|p| p == path), "{asked:?}");
    }

    let decide = |from: &str, to: &str, port: u16| {
        cluster::decide(&res, &members, from, to, port, L4Protocol::Tcp, false).unwrap()
    };
    // The namespace policy admits the app tier on 5432 and isolates the database otherwise.
    let sql = decide("shop/app-1", "shop/db-1", 5432);
    assert!(sql.allowed, "{sql:?}");
    let rule = sql.ingress.as_ref().and_then(|s| s.rule.as_ref()).unwrap();
    assert_eq!(
        (rule.policy.as_str(), rule.rule.as_str()),
        ("shop/db-from-app", "sql")
    );
    let web = decide("shop/web-1", "shop/db-1", 5432);
    assert!(!web.allowed, "{web:?}");
    // The Admin tier's Deny comes first, whatever the namespace policies say.
    let ssh = decide("shop/app-1", "shop/db-1", 22);
    assert!(!ssh.allowed);
    let rule = ssh.ingress.as_ref().and_then(|s| s.rule.as_ref()).unwrap();
    assert_eq!(
        (rule.policy.as_str(), rule.rule.as_str()),
        ("no-ssh", "ssh")
    );
    // Addresses work as well as names; an unknown workload is an error naming the flag.
    assert!(decide("10.10.0.66", "10.10.0.2", 5432).allowed);
    let err = cluster::decide(
        &res,
        &members,
        "shop/nope",
        "shop/db-1",
        1,
        L4Protocol::Tcp,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("--from shop/nope: no such workload"),
        "{err}"
    );
}

#[tokio::test]
async fn an_api_error_names_what_could_not_be_listed() {
    let mut lists = cluster_lists();
    lists.remove("/apis/weft.dev/v1alpha1/segmentationpolicies");
    let (client, _) = start(lists);
    let err = cluster::snapshot(&client).await.unwrap_err().to_string();
    assert!(err.contains("cannot list segmentationpolicies"), "{err}");
}

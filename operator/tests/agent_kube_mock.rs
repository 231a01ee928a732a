//! The agent's Kubernetes API source against a mocked API server (tower-test): its
//! reflectors list and watch through a fake apiserver that answers lists from a table, holds
//! watches open until a test pushes events into them, and hands every write to the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use weft_crds::NodeNetworkSpec;
use weft_operator::agent::AgentStatus;
use weft_operator::agent::kube::{FIELD_MANAGER, KubeSource, node_network_status};
use weft_operator::agent::plan::PlanOutput;
use weft_operator::agent::source::{ResourceSource, SourceError};
use weft_operator::model::{NodeBlocks, Resources};

type Reply = tower_test::mock::SendResponse<Response<Body>>;

const NETWORKS: &str = "/apis/weft.dev/v1alpha1/networks";
const PORT_FORWARDS: &str = "/apis/weft.dev/v1alpha1/portforwards";
const CLUSTER_POLICIES: &str = "/apis/weft.dev/v1alpha1/clustersegmentationpolicies";
const POLICIES: &str = "/apis/weft.dev/v1alpha1/segmentationpolicies";
const NODE_NETWORKS: &str = "/apis/weft.dev/v1alpha1/nodenetworks";
const MIRRORS: &str = "/apis/weft.dev/v1alpha1/trafficmirrors";
const SLICES: &str = "/apis/weft.dev/v1alpha1/workloadslices";
const NAMESPACES: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const VMS: &str = "/apis/kubevirt.io/v1/virtualmachines";
const VMIS: &str = "/apis/kubevirt.io/v1/virtualmachineinstances";
const ALL: [&str; 12] = [
    NETWORKS,
    SLICES,
    PORT_FORWARDS,
    CLUSTER_POLICIES,
    POLICIES,
    MIRRORS,
    NODE_NETWORKS,
    NAMESPACES,
    NODES,
    PODS,
    VMS,
    VMIS,
];

/// A write the source sent, for the test to check and answer.
struct Write {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
    reply: Reply,
}

#[derive(Default)]
struct State {
    /// Items of the next list of each collection.
    lists: HashMap<&'static str, Vec<Value>>,
    /// Collections whose lists are not answered until released.
    gated: HashSet<String>,
    held_lists: HashMap<String, Vec<Reply>>,
    /// Lists to fail (500) before answering.
    failures: HashMap<String, u32>,
    /// Collections the apiserver does not serve (404: a CRD not installed).
    missing: HashSet<String>,
    /// Watch bodies not yet asked for, and watches waiting for a body.
    watch_bodies: HashMap<String, VecDeque<String>>,
    held_watches: HashMap<String, Vec<Reply>>,
    /// Every GET: path, query and Accept header.
    gets: Vec<(String, String, String)>,
    resource_version: u64,
}

/// The fake apiserver.
#[derive(Clone)]
struct FakeApi(Arc<Mutex<State>>);

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn list_body(state: &mut State, path: &str) -> Value {
    state.resource_version += 1;
    let items = state.lists.get(path).cloned().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    })
}

impl FakeApi {
    /// A client whose requests this fake answers, and the channel of the writes it receives.
    fn start() -> (Self, Client, mpsc::UnboundedReceiver<Write>) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi(Arc::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let state = api.0.clone();
        tokio::spawn(async move {
            while let Some((request, reply)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                if request.method() != Method::GET {
                    let content_type = request
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let method = request.method().clone();
                    let bytes = request.into_body().collect_bytes().await.unwrap();
                    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    let _ = tx.send(Write {
                        method,
                        path,
                        query,
                        content_type,
                        body,
                        reply,
                    });
                    continue;
                }
                let accept = request
                    .headers()
                    .get(http::header::ACCEPT)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let mut s = state.lock().unwrap();
                s.gets.push((path.clone(), query.clone(), accept));
                if s.missing.contains(&path) {
                    reply.send_response(json_response(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404}),
                    ));
                } else if query.split('&').any(|p| p == "watch=true") {
                    match s.watch_bodies.get_mut(&path).and_then(VecDeque::pop_front) {
                        Some(body) => {
                            reply.send_response(Response::new(Body::from(body.into_bytes())))
                        }
                        None => s.held_watches.entry(path).or_default().push(reply),
                    }
                } else if let Some(n) = s.failures.get_mut(&path).filter(|n| **n > 0) {
                    *n -= 1;
                    reply.send_response(json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "message": "etcd is having a bad day", "reason": "InternalError", "code": 500}),
                    ));
                } else if s.gated.contains(&path) {
                    s.held_lists.entry(path).or_default().push(reply);
                } else {
                    let body = list_body(&mut s, &path);
                    reply.send_response(json_response(StatusCode::OK, &body));
                }
            }
        });
        let client = Client::new(svc, "default");
        (api, client, rx)
    }

    fn list(&self, path: &'static str, items: Vec<Value>) -> &Self {
        self.0.lock().unwrap().lists.insert(path, items);
        self
    }

    fn remove(&self, path: &str) {
        self.0.lock().unwrap().missing.insert(path.to_owned());
    }

    fn gate(&self, path: &str) {
        self.0.lock().unwrap().gated.insert(path.to_owned());
    }

    fn fail_lists(&self, path: &str, times: u32) {
        self.0
            .lock()
            .unwrap()
            .failures
            .insert(path.to_owned(), times);
    }

    /// Answers the held lists of `path` and stops holding new ones.
    fn release(&self, path: &str) {
        let mut s = self.0.lock().unwrap();
        s.gated.remove(path);
        for reply in s.held_lists.remove(path).unwrap_or_default() {
            let body = list_body(&mut s, path);
            reply.send_response(json_response(StatusCode::OK, &body));
        }
    }

    /// Sends watch events (`(type, object)`) on the next watch of `path`; the watch then ends
    /// and the watcher opens a new one.
    fn push_watch(&self, path: &str, events: &[(&str, Value)]) {
        let body: String = events
            .iter()
            .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
            .collect();
        let mut s = self.0.lock().unwrap();
        match s.held_watches.get_mut(path).and_then(Vec::pop) {
            Some(reply) => reply.send_response(Response::new(Body::from(body.into_bytes()))),
            None => s
                .watch_bodies
                .entry(path.to_owned())
                .or_default()
                .push_back(body),
        }
    }

    fn gets(&self, path: &str) -> Vec<String> {
        let s = self.0.lock().unwrap();
        s.gets
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, q, _)| q.clone())
            .collect()
    }

    fn accepts(&self, path: &str) -> Vec<String> {
        let s = self.0.lock().unwrap();
        s.gets
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, _, a)| a.clone())
            .collect()
    }
}

fn meta(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let mut m = json!({"name": name, "resourceVersion": "1", "uid": format!("uid-{name}"), "labels": labels});
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// A metadata-only object, as the apiserver returns for `as=PartialObjectMetadata`.
fn partial(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta(name, namespace, labels)})
}

fn network(name: &str, subnet: &str, node_selector: Option<Value>) -> Value {
    let mut spec = json!({"mode": "NAT", "subnets": [subnet]});
    if let Some(sel) = node_selector {
        spec["nodeSelector"] = sel;
    }
    json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Network", "metadata": meta(name, None, &[]), "spec": spec})
}

fn node_network(node: &str, generation: i64, blocks: Value, status: Option<Value>) -> Value {
    let mut metadata = meta(node, None, &[]);
    metadata["generation"] = json!(generation);
    let mut nn = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "NodeNetwork", "metadata": metadata, "spec": {"blocks": blocks}});
    if let Some(s) = status {
        nn["status"] = s;
    }
    nn
}

/// A cluster of one node, `node-a` (labelled `pool=x`), with two Networks: `blue` for every
/// node, with a block in the NodeNetwork, and `green` for `pool=x` nodes, without a block yet.
fn slice(network: &str, workloads: Value, reservations: Value) -> Value {
    let mut meta = meta(
        &format!("{network}.0"),
        None,
        &[("weft.dev/network", network)],
    );
    meta["ownerReferences"] = json!([{"apiVersion": "weft.dev/v1alpha1", "kind": "Network",
                                      "name": network, "uid": format!("uid-{network}")}]);
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "WorkloadSlice",
        "metadata": meta,
        "spec": {"network": network, "workloads": workloads, "reservations": reservations},
    })
}

fn seed(api: &FakeApi) {
    api.list(
        NETWORKS,
        vec![
            network("green", "10.20.0.0/16", Some(json!({"matchLabels": {"pool": "x"}}))),
            {
                let mut blue = network("blue", "10.10.0.0/16", None);
                blue["metadata"]["annotations"] =
                    json!({"kubectl.kubernetes.io/last-applied-configuration": "{}"});
                blue["metadata"]["managedFields"] =
                    json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "weft.dev/v1alpha1"}]);
                blue
            },
        ],
    )
    .list(
        PORT_FORWARDS,
        vec![json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "PortForward",
            "metadata": meta("web", Some("shop"), &[]),
            "spec": {"network": "blue", "target": {"workload": "web-1"}, "ports": [{"port": 8080, "targetPort": 80}]},
        })],
    )
    .list(
        CLUSTER_POLICIES,
        vec![json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "ClusterSegmentationPolicy",
            "metadata": meta("lockdown-db", None, &[]),
            "spec": {"tier": "Admin", "priority": 20, "subject": {"pods": {"podSelector": {"matchLabels": {"tier": "db"}}}},
                     "ingress": [{"name": "deny-rest", "action": "Deny"}]},
        })],
    )
    .list(
        POLICIES,
        vec![json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "SegmentationPolicy",
            "metadata": meta("db-from-app", Some("shop"), &[]),
            "spec": {"subject": {"podSelector": {"matchLabels": {"tier": "db"}}},
                     "ingress": [{"name": "sql", "action": "Allow", "from": [{"pods": {"podSelector": {"matchLabels": {"tier": "app"}}}}],
                                  "protocols": [{"protocol": "TCP", "port": 5432}]}]},
        })],
    )
    .list(
        NAMESPACES,
        vec![
            partial("shop", None, &[("kubernetes.io/metadata.name", "shop"), ("env", "prod")]),
            partial("default", None, &[("kubernetes.io/metadata.name", "default")]),
        ],
    )
    .list(NODES, vec![partial("node-a", None, &[("pool", "x")])])
    .list(
        NODE_NETWORKS,
        vec![
            node_network(
                "node-a",
                4,
                json!([{"network": "blue", "ipv4": "10.10.0.64/26"}]),
                None,
            ),
        ],
    )
    // Another node's workloads, as the controller publishes them: peers for the policies.
    // node-a's own entry and a Network without a block here are not peers.
    .list(
        SLICES,
        vec![
            slice(
                "blue",
                json!([
                    {"node": "node-b", "network": "blue", "namespace": "shop", "name": "app-1",
                     "labels": {"tier": "app"}, "ips": ["10.10.0.130"]},
                    {"node": "node-a", "network": "blue", "namespace": "shop", "name": "web-1",
                     "ips": ["10.10.0.66"]},
                ]),
                json!([]),
            ),
            {
                let mut second = slice(
                    "blue",
                    json!([{"node": "node-c", "network": "blue", "namespace": "shop",
                            "name": "app-2", "labels": {"tier": "app"}, "ips": ["10.10.0.200"]}]),
                    json!([]),
                );
                second["metadata"]["name"] = json!("blue.1");
                second
            },
            slice(
                "green",
                json!([{"node": "node-b", "network": "green", "namespace": "shop", "name": "g-1",
                        "ips": ["10.20.0.5"]}]),
                json!([]),
            ),
        ],
    )
    .list(
        PODS,
        vec![
            {
                let mut web = partial("web-1", Some("shop"), &[("tier", "web")]);
                web["metadata"]["annotations"] = json!({
                    "weft.dev/networks": "blue",
                    "kubernetes.io/egress-bandwidth": "10M",
                    "weft.dev/conntrack-entries": "500",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                });
                web
            },
            partial("db-1", Some("shop"), &[("tier", "db")]),
        ],
    );
}

/// Polls `snapshot()` until it succeeds (5 s at most).
async fn synced(source: &mut KubeSource) -> Resources {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match source.snapshot() {
            Ok(r) => return r,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("not synced after 5 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls `snapshot()` until `done` holds (5 s at most), checking `each` on every snapshot.
async fn until(
    source: &mut KubeSource,
    done: impl Fn(&Resources) -> bool,
    each: impl Fn(&Resources),
) -> Resources {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = source.snapshot().unwrap();
        each(&r);
        if done(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn workloads(r: &Resources) -> Vec<String> {
    r.workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

fn names<T: kube::Resource>(objects: &[T]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn config() -> weft_operator::agent::AgentConfig {
    let dir = std::path::PathBuf::from("/nonexistent");
    weft_operator::agent::AgentConfig {
        node: weft_operator::agent::plan::NodeContext {
            name: "node-a".into(),
            labels: BTreeMap::new(),
            syn_proxy: false,
            own_tcp_ports: Vec::new(),
        },
        nodes: vec![],
        state_dir: dir.clone(),
        socket: dir.join("agent.sock"),
        cni: weft_operator::agent::install::CniInstall {
            bin_dir: dir.clone(),
            conf_dir: dir.clone(),
            binary: dir.join("weft"),
            state_dir: dir.clone(),
            socket: dir.join("agent.sock"),
        },
        default_network: None,
        agent_ports: Vec::new(),
        cleanup_config_on_exit: false,
        resync: Duration::from_secs(30),
        poll: Duration::from_millis(500),
        audit_log: None,
        workload_metrics: false,
        mirror_collectors: Vec::new(),
        anomaly_thresholds: Default::default(),
    }
}

#[tokio::test]
async fn snapshot_holds_the_listed_resources_node_labels_and_node_blocks() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;

    assert_eq!(names(&res.networks), ["blue", "green"], "sorted by name");
    assert_eq!(res.networks[0].metadata.annotations, None, "not cached");
    assert_eq!(res.networks[0].metadata.managed_fields, None, "not cached");
    assert_eq!(names(&res.port_forwards), ["web"]);
    assert_eq!(names(&res.cluster_policies), ["lockdown-db"]);
    assert_eq!(names(&res.policies), ["db-from-app"]);
    assert_eq!(workloads(&res), ["shop/db-1", "shop/web-1"]);
    // A pod's networks and limit annotations reach the snapshot; the others are not cached.
    let web = res.workloads.iter().find(|w| w.name == "web-1").unwrap();
    assert_eq!(web.networks.as_deref(), Some("blue"));
    assert_eq!(
        web.limits,
        BTreeMap::from([
            (
                "kubernetes.io/egress-bandwidth".to_string(),
                "10M".to_string()
            ),
            ("weft.dev/conntrack-entries".to_string(), "500".to_string()),
        ])
    );
    assert_eq!(res.workloads[1].labels["tier"], "web");
    assert_eq!(res.namespaces["shop"]["env"], "prod");
    assert_eq!(
        res.node_labels,
        Some([("pool".to_owned(), "x".to_owned())].into())
    );
    let blocks = res.node_blocks.as_ref().unwrap();
    assert_eq!(blocks.keys().collect::<Vec<_>>(), ["blue"]);
    assert_eq!(blocks["blue"].v4, Some("10.10.0.64/26".parse().unwrap()));
    assert!(res.problems.is_empty(), "{:?}", res.problems);
    assert_eq!(res.peers.len(), 2, "{:?}", res.peers);
    assert_eq!(res.peers[0].node, "node-b");
    assert_eq!(res.peers[0].workload.ips, ["10.10.0.130"]);
    assert_eq!(res.peers[0].workload.labels["tier"], "app");
    assert_eq!(res.peers[1].node, "node-c");
    // Equal label sets, read from two slices, are one copy in the agent's memory.
    assert!(std::sync::Arc::ptr_eq(
        &res.peers[0].workload.labels,
        &res.peers[1].workload.labels
    ));

    // Node-scoped watches: only this node's Node, NodeNetwork and Pods; the WorkloadSlices of
    // the Networks with a block here; labels-only kinds as metadata.
    for (path, selector) in [
        (NODES, "fieldSelector=metadata.name%3Dnode-a"),
        (NODE_NETWORKS, "fieldSelector=metadata.name%3Dnode-a"),
        (PODS, "fieldSelector=spec.nodeName%3Dnode-a"),
        (SLICES, "labelSelector=weft.dev%2Fnetwork+in+%28blue%29"),
    ] {
        let gets = api.gets(path);
        assert!(!gets.is_empty(), "{path} was not listed");
        for q in gets {
            assert!(
                q.split('&').any(|p| p == selector),
                "{path}?{q} lacks {selector}"
            );
        }
    }
    for path in [NETWORKS, NAMESPACES] {
        assert!(api.gets(path).iter().all(|q| !q.contains("fieldSelector")));
    }
    for path in ALL {
        let gets = api.gets(path);
        let lists = gets.iter().filter(|q| !q.contains("watch=true")).count();
        assert_eq!(lists, 1, "{path}: {gets:?}");
        let metadata_only = [NAMESPACES, NODES, PODS, VMS, VMIS].contains(&path);
        for accept in api.accepts(path) {
            assert_eq!(
                accept.contains("as=PartialObjectMetadata"),
                metadata_only,
                "{path}: Accept {accept}"
            );
        }
    }

    // The plan: blue gets the NodeNetwork's block; green selects node-a through the Node's
    // labels (the agent was configured with none) and waits for its block.
    let out = weft_operator::agent::compute(
        &config(),
        &res,
        &weft_operator::agent::endpoints::EndpointStore::default(),
        &BTreeMap::new(),
    );
    let planned: Vec<&str> = out.plan.networks.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(planned, ["blue"]);
    let problems: Vec<String> = out.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p == "Network green: no address block is assigned to node node-a yet"),
        "{problems:?}"
    );

    // Watch events change the fingerprint and the next snapshot.
    let before = source.fingerprint().unwrap();
    api.push_watch(
        PODS,
        &[("ADDED", partial("app-1", Some("shop"), &[("tier", "app")]))],
    );
    api.push_watch(
        NODES,
        &[("MODIFIED", partial("node-a", None, &[("pool", "y")]))],
    );
    let mut n = source.fingerprint().unwrap();
    for _ in 0..250 {
        if n >= before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        n = source.fingerprint().unwrap();
    }
    assert!(n >= before + 2, "fingerprint {before} -> {n}");
    let res = source.snapshot().unwrap();
    assert_eq!(workloads(&res), ["shop/app-1", "shop/db-1", "shop/web-1"]);
    assert_eq!(res.node_labels.unwrap()["pool"], "y");
}

#[tokio::test]
async fn snapshot_is_an_error_until_every_kind_is_listed() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    api.gate(NODE_NETWORKS);
    // The first list of namespaces fails: the watcher retries with backoff, nothing crashes.
    api.fail_lists(NAMESPACES, 1);
    let mut source = KubeSource::start(client, "node-a");
    match source.snapshot() {
        Err(SourceError::NotSynced { what }) => {
            assert!(
                what.contains("pods") && what.contains("nodenetworks"),
                "{what}"
            )
        }
        other => panic!("expected NotSynced, got {other:?}"),
    }
    // Everything but the NodeNetworks gets listed; the snapshot still refuses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match source.snapshot() {
            Err(SourceError::NotSynced { what }) if what == "nodenetworks" => break,
            Err(SourceError::NotSynced { .. }) => {}
            other => panic!("expected NotSynced, got {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "namespaces never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        api.gets(NAMESPACES).len() >= 2,
        "the failed list was retried"
    );
    api.release(NODE_NETWORKS);
    let res = synced(&mut source).await;
    assert_eq!(names(&res.networks), ["blue", "green"]);
    assert!(res.node_blocks.unwrap().contains_key("blue"));
}

#[tokio::test]
async fn a_node_missing_from_the_api_is_an_error_not_an_empty_node() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    api.list(NODES, vec![]).list(NODE_NETWORKS, vec![]);
    let mut source = KubeSource::start(client, "node-a");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match source.snapshot() {
            Err(SourceError::NodeNotFound { node }) => {
                assert_eq!(node, "node-a");
                break;
            }
            Err(SourceError::NotSynced { .. }) => {}
            other => panic!("expected NodeNotFound, got {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The Node appears; its NodeNetwork does not exist yet: no blocks at all.
    api.push_watch(NODES, &[("ADDED", partial("node-a", None, &[]))]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let res = loop {
        if let Ok(r) = source.snapshot() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(res.node_blocks, Some(BTreeMap::new()));
}

/// The plan of a snapshot, and this node's blocks of the networks it realizes (what the agent
/// reads back from its runtime state while the NodeNetwork is missing).
fn plan_of(
    res: &Resources,
    realized: &BTreeMap<String, NodeBlocks>,
) -> (PlanOutput, BTreeMap<String, NodeBlocks>) {
    let out = weft_operator::agent::compute(
        &config(),
        res,
        &weft_operator::agent::endpoints::EndpointStore::default(),
        realized,
    );
    let blocks = out
        .plan
        .networks
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                NodeBlocks {
                    v4: n.block_v4,
                    v6: n.block_v6,
                },
            )
        })
        .collect();
    (out, blocks)
}

fn planned(out: &PlanOutput) -> Vec<&str> {
    out.plan.networks.iter().map(|n| n.name.as_str()).collect()
}

#[tokio::test]
async fn a_node_network_deleted_and_written_again_or_a_node_re_created_keeps_the_networks_here() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    assert!(!res.node_network_missing);
    let (first, realized) = plan_of(&res, &BTreeMap::new());
    assert_eq!(planned(&first), ["blue"]);
    let blue_block = json!([{"network": "blue", "ipv4": "10.10.0.64/26"}]);

    // The NodeNetwork is deleted: the snapshot says so, and blue keeps its block and plan.
    api.push_watch(
        NODE_NETWORKS,
        &[(
            "DELETED",
            node_network("node-a", 4, blue_block.clone(), None),
        )],
    );
    let res = until(&mut source, |r| r.node_network_missing, |_| {}).await;
    assert_eq!(res.node_blocks, Some(BTreeMap::new()));
    let (held, _) = plan_of(&res, &realized);
    assert_eq!(planned(&held), ["blue"]);
    assert_eq!(held.plan, first.plan, "nothing on the node changes");
    let problems: Vec<String> = held.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems.iter().any(|p| p
            == "NodeNetwork node-a: not in the Kubernetes API; networks blue keep the blocks they have on this node until the controller writes it again"),
        "{problems:?}"
    );

    // The controller writes it again: its blocks count again, the same plan.
    api.push_watch(
        NODE_NETWORKS,
        &[("ADDED", node_network("node-a", 1, blue_block.clone(), None))],
    );
    let res = until(&mut source, |r| !r.node_network_missing, |_| {}).await;
    let (again, _) = plan_of(&res, &BTreeMap::new());
    assert_eq!(again.plan, first.plan);

    // The Node is deleted (its NodeNetwork goes with it) and re-created: no snapshot while the
    // Node is gone, then the NodeNetwork is missing until the controller writes it.
    api.push_watch(
        NODES,
        &[("DELETED", partial("node-a", None, &[("pool", "x")]))],
    );
    api.push_watch(
        NODE_NETWORKS,
        &[(
            "DELETED",
            node_network("node-a", 1, blue_block.clone(), None),
        )],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(source.snapshot(), Err(SourceError::NodeNotFound { .. })) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Node never went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.push_watch(
        NODES,
        &[("ADDED", partial("node-a", None, &[("pool", "x")]))],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let res = loop {
        match source.snapshot() {
            Ok(r) if r.node_network_missing => break r,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Node never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (held, _) = plan_of(&res, &realized);
    assert_eq!(held.plan, first.plan, "the re-created Node keeps blue");

    // The Network is deleted meanwhile: it goes, NodeNetwork or not.
    api.push_watch(
        NETWORKS,
        &[("DELETED", network("blue", "10.10.0.0/16", None))],
    );
    let res = until(&mut source, |r| r.networks.len() == 1, |_| {}).await;
    let (gone, _) = plan_of(&res, &realized);
    assert!(gone.plan.bridges.is_empty(), "{:?}", gone.plan.bridges);
}

fn agent_status(last_error: Option<&str>) -> AgentStatus {
    AgentStatus {
        node: "node-a".into(),
        networks: vec!["blue".into()],
        bridges: vec!["wbr-blue".into()],
        endpoints: 2,
        last_error: last_error.map(str::to_owned),
        ..AgentStatus::default()
    }
}

async fn next_write(writes: &mut mpsc::UnboundedReceiver<Write>, within: Duration) -> Write {
    tokio::time::timeout(within, writes.recv())
        .await
        .expect("timed out waiting for a write")
        .expect("the fake apiserver stopped")
}

async fn no_write(writes: &mut mpsc::UnboundedReceiver<Write>) {
    if let Ok(Some(w)) = tokio::time::timeout(Duration::from_millis(300), writes.recv()).await {
        panic!("unexpected {} {}?{}", w.method, w.path, w.query);
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

const STATUS_PATH: &str = "/apis/weft.dev/v1alpha1/nodenetworks/node-a/status";

#[tokio::test]
async fn report_applies_the_node_network_status_once_per_change() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;

    source.report(&agent_status(None));
    let w = next_write(&mut writes, Duration::from_secs(1)).await;
    assert_eq!(w.method, Method::PATCH);
    assert_eq!(w.path, STATUS_PATH);
    assert_eq!(w.query, format!("&force=true&fieldManager={FIELD_MANAGER}"));
    assert_eq!(w.content_type, "application/apply-patch+yaml");
    assert_eq!(w.body["apiVersion"], "weft.dev/v1alpha1");
    assert_eq!(w.body["kind"], "NodeNetwork");
    let status = &w.body["status"];
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(status["networks"], json!(["blue"]));
    assert_eq!(status["bridges"], json!(["wbr-blue"]));
    assert_eq!(status["endpoints"], 2);
    assert!(status.get("lastError").is_none(), "{status}");
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "True");
    assert_eq!(ready["reason"], "Realized");
    assert_eq!(ready["observedGeneration"], 4);
    assert!(ready["lastTransitionTime"].is_string());
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["status"], "False");
    assert_eq!(degraded["reason"], "AsExpected");
    let first_body = w.body.clone();
    w.reply
        .send_response(json_response(StatusCode::OK, &w.body));

    // The same outcome again: nothing to write.
    source.report(&agent_status(None));
    no_write(&mut writes).await;

    // A failed apply: written; the server refuses once, the write is retried with the same
    // body after a backoff.
    source.report(&agent_status(Some("nft: table weft is busy")));
    let w = next_write(&mut writes, Duration::from_secs(1)).await;
    let status = w.body["status"].clone();
    assert_eq!(status["lastError"], "nft: table weft is busy");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Ready")["reason"], "ApplyFailed");
    assert_eq!(condition(&status, "Degraded")["status"], "True");
    assert_ne!(
        condition(&status, "Degraded")["lastTransitionTime"],
        json!(null)
    );
    assert_ne!(w.body, first_body);
    w.reply.send_response(json_response(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409}),
    ));
    let retry = next_write(&mut writes, Duration::from_secs(3)).await;
    assert_eq!(retry.path, STATUS_PATH);
    assert_eq!(retry.body["status"], status);
    retry
        .reply
        .send_response(json_response(StatusCode::OK, &retry.body));
    no_write(&mut writes).await;
}

#[tokio::test]
async fn report_writes_nothing_when_the_node_network_already_has_the_status() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    // What an earlier agent on this node wrote (Ready since t=100).
    let spec: NodeNetworkSpec =
        serde_json::from_value(json!({"blocks": [{"network": "blue", "ipv4": "10.10.0.64/26"}]}))
            .unwrap();
    let earlier = node_network_status(
        &agent_status(None),
        &spec,
        Some(4),
        &[],
        jiff::Timestamp::from_second(100).unwrap(),
    );
    api.list(
        NODE_NETWORKS,
        vec![node_network(
            "node-a",
            4,
            json!([{"network": "blue", "ipv4": "10.10.0.64/26"}]),
            Some(serde_json::to_value(&earlier).unwrap()),
        )],
    );
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    source.report(&agent_status(None));
    no_write(&mut writes).await;
    // A change is written, and keeps the Ready transition time of the earlier agent.
    let mut more = agent_status(None);
    more.endpoints = 3;
    source.report(&more);
    let w = next_write(&mut writes, Duration::from_secs(1)).await;
    assert_eq!(w.body["status"]["endpoints"], 3);
    assert_eq!(
        condition(&w.body["status"], "Ready")["lastTransitionTime"],
        "1970-01-01T00:01:40Z"
    );
}

#[tokio::test]
async fn report_waits_for_the_node_network_to_exist() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    api.list(NODE_NETWORKS, vec![]);
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    source.report(&agent_status(None));
    no_write(&mut writes).await;
}

#[tokio::test]
async fn a_watch_restart_relists_and_replaces_the_store_at_once() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    assert_eq!(workloads(&res), ["shop/db-1", "shop/web-1"]);
    let lists_before = api
        .gets(PODS)
        .iter()
        .filter(|q| !q.contains("watch=true"))
        .count();

    // The watch expires (410 Gone) while pods changed: web-1 left, cache-1 came. The watcher
    // backs off, lists again, and the store swaps to the new list in one step.
    api.list(
        PODS,
        vec![
            partial("db-1", Some("shop"), &[("tier", "db")]),
            partial("cache-1", Some("shop"), &[("tier", "cache")]),
        ],
    );
    api.push_watch(
        PODS,
        &[(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}),
        )],
    );
    let old = vec!["shop/db-1".to_owned(), "shop/web-1".to_owned()];
    let new = vec!["shop/cache-1".to_owned(), "shop/db-1".to_owned()];
    let res = until(
        &mut source,
        |r| workloads(r) == new,
        |r| {
            let w = workloads(r);
            assert!(
                w == old || w == new,
                "inconsistent store during the relist: {w:?}"
            );
            // The other kinds are untouched by the pods' restart.
            assert_eq!(names(&r.networks), ["blue", "green"]);
        },
    )
    .await;
    assert_eq!(res.workloads[0].labels["tier"], "cache");
    let lists_after = api
        .gets(PODS)
        .iter()
        .filter(|q| !q.contains("watch=true"))
        .count();
    assert_eq!(lists_after, lists_before + 1, "one relist");
}

#[tokio::test]
async fn a_watch_event_wakes_the_agent_with_the_store_already_updated() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    assert_eq!(workloads(&res), ["shop/db-1", "shop/web-1"]);
    let wake = source.changes().expect("the watches wake the agent");
    // The first lists left a wake-up behind: take it.
    let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
    let before = source.fingerprint().unwrap();

    api.push_watch(
        PODS,
        &[(
            "ADDED",
            partial("cache-1", Some("shop"), &[("tier", "cache")]),
        )],
    );
    // (The timeout only keeps a broken wake-up from hanging the test.)
    tokio::time::timeout(Duration::from_secs(20), wake.notified())
        .await
        .expect("a pod event wakes the agent");
    assert_ne!(source.fingerprint().unwrap(), before);
    let res = source.snapshot().unwrap();
    assert_eq!(
        workloads(&res),
        ["shop/cache-1", "shop/db-1", "shop/web-1"],
        "the store holds the event when the agent wakes"
    );
}

/// The source's change count once it has not moved for 100 ms (the store takes an event
/// just before the count does).
async fn settled(source: &mut KubeSource) -> u64 {
    let mut last = source.fingerprint().unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = source.fingerprint().unwrap();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The controller's status writes on weft's own kinds (a Network's counts and Ready condition,
/// a policy's counts) change nothing the plan reads: they do not wake the agent, and its
/// snapshot keeps of a Network's status its `Valid` condition alone. A spec change and a
/// `Valid=False` verdict do wake it.
#[tokio::test]
async fn the_controllers_status_writes_do_not_wake_the_agent_but_a_spec_or_verdict_does() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    let wake = source.changes().expect("the watches wake the agent");
    let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
    let blue = |rv: &str, subnet: &str, status: Value| {
        let mut b = network("blue", subnet, None);
        b["metadata"]["resourceVersion"] = json!(rv);
        b["metadata"]["generation"] = json!(1);
        b["status"] = status;
        b
    };
    let ready = |in_use: i64| {
        json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Realized",
                               "message": "every node", "lastTransitionTime": "2026-12-04T00:00:00Z"}],
               "observedGeneration": 1, "nodes": 1, "addressesInUse": in_use})
    };
    // The Network as the controller has seen it once (generation 1).
    api.push_watch(
        NETWORKS,
        &[("MODIFIED", blue("6", "10.10.0.0/16", ready(2)))],
    );
    until(
        &mut source,
        |r| r.networks.iter().any(|n| n.metadata.generation == Some(1)),
        |_| {},
    )
    .await;
    let before = settled(&mut source).await;
    // Two status writes, then a spec change: one wake-up, for the spec change.
    api.push_watch(
        NETWORKS,
        &[
            ("MODIFIED", blue("7", "10.10.0.0/16", ready(3))),
            ("MODIFIED", blue("8", "10.10.0.0/16", ready(4))),
            ("MODIFIED", blue("9", "10.10.0.0/15", ready(4))),
        ],
    );
    let res = until(
        &mut source,
        |r| {
            r.networks
                .iter()
                .any(|n| n.spec.subnets.iter().any(|s| *s == "10.10.0.0/15"))
        },
        |_| {},
    )
    .await;
    assert_eq!(
        settled(&mut source).await,
        before + 1,
        "the status writes woke the agent"
    );
    let kept = res
        .networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("blue"))
        .unwrap();
    assert_eq!(kept.status, None, "no Valid condition: no status kept");
    assert_eq!(kept.metadata.resource_version, None);

    // A policy's status write alone: no wake-up either (a spec change of the same policy
    // after it marks that the watch has delivered both).
    let policy = |rv: &str, priority: i64, workloads: i64| {
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "ClusterSegmentationPolicy",
               "metadata": {"name": "quiet", "resourceVersion": rv, "generation": 1},
               "spec": {"tier": "Admin", "priority": priority, "subject": {"pods": {"podSelector": {}}},
                        "ingress": [{"name": "all", "action": "Accept", "from": [{"pods": {"podSelector": {}}}]}]},
               "status": {"observedGeneration": 1, "workloads": workloads, "nodes": 1}})
    };
    api.push_watch(CLUSTER_POLICIES, &[("ADDED", policy("20", 10, 1))]);
    until(&mut source, |r| r.cluster_policies.len() == 1, |_| {}).await;
    let before = settled(&mut source).await;
    api.push_watch(
        CLUSTER_POLICIES,
        &[
            ("MODIFIED", policy("21", 10, 2)),
            ("MODIFIED", policy("22", 11, 2)),
        ],
    );
    let res = until(
        &mut source,
        |r| r.cluster_policies.iter().any(|p| p.spec.priority == 11),
        |_| {},
    )
    .await;
    assert_eq!(settled(&mut source).await, before + 1);
    assert_eq!(res.cluster_policies[0].status, None);

    // The controller rejects the Network: that wakes the agent, and the condition is kept.
    let before = settled(&mut source).await;
    let mut rejected = ready(4);
    rejected["conditions"] = json!([
        {"type": "Ready", "status": "False", "reason": "Invalid", "message": "see Valid",
         "lastTransitionTime": "2026-12-04T00:00:00Z"},
        {"type": "Valid", "status": "False", "reason": "Overlap",
         "message": "spec.subnets[0] overlaps Network green", "observedGeneration": 1,
         "lastTransitionTime": "2026-12-04T00:00:00Z"}]);
    api.push_watch(
        NETWORKS,
        &[("MODIFIED", blue("10", "10.10.0.0/15", rejected))],
    );
    let res = until(
        &mut source,
        |r| {
            r.networks
                .iter()
                .any(|n| n.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
        },
        |_| {},
    )
    .await;
    assert_eq!(settled(&mut source).await, before + 1);
    let status = res.networks.iter().find_map(|n| n.status.as_ref()).unwrap();
    let kinds: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(kinds, ["Valid"], "the Valid condition alone");
    assert_eq!(status.addresses_in_use, None);
}

#[tokio::test]
async fn a_bad_block_in_the_node_network_is_a_problem_and_the_network_has_none() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    api.list(
        NODE_NETWORKS,
        vec![node_network(
            "node-a",
            2,
            json!([{"network": "blue", "ipv4": "10.10.0.65/26"}, {"network": "green", "ipv4": "10.20.0.0/26"}]),
            None,
        )],
    );
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    let blocks = res.node_blocks.unwrap();
    assert_eq!(blocks.keys().collect::<Vec<_>>(), ["green"]);
    assert_eq!(res.problems.len(), 1, "{:?}", res.problems);
    assert!(
        res.problems[0].starts_with("NodeNetwork node-a: spec.blocks[0].ipv4 (network blue): "),
        "{}",
        res.problems[0]
    );
}

#[tokio::test]
async fn kubevirt_vms_are_known_once_listed_and_vm_reservations_go_both_ways() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    api.list(VMS, vec![partial("db", Some("shop"), &[])])
        .list(VMIS, vec![partial("batch-7", Some("jobs"), &[])])
        .list(
            SLICES,
            vec![slice(
                "blue",
                json!([]),
                json!([{"node": "node-b", "vm": "shop/db", "network": "blue", "ifname": "eth0",
                        "ips": ["10.10.0.131"], "mac": "02:00:00:00:00:31", "since": 1_700_000_000}]),
            )],
        );
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    let res = until(&mut source, |r| r.vms.is_some(), |_| {}).await;
    assert_eq!(
        res.vms.unwrap().into_iter().collect::<Vec<_>>(),
        ["jobs/batch-7", "shop/db"],
        "VirtualMachines and VirtualMachineInstances"
    );
    assert_eq!(res.peer_reservations.len(), 1);
    assert_eq!(res.peer_reservations[0].node, "node-b");
    assert_eq!(res.peer_reservations[0].reservation.ips, ["10.10.0.131"]);
    // Watched as metadata.
    assert!(
        api.accepts(VMS)
            .iter()
            .all(|a| a.contains("as=PartialObjectMetadata")),
        "{:?}",
        api.accepts(VMS)
    );
    // This node's reservations go into its NodeNetwork status with its workloads.
    source.publish(&weft_operator::agent::source::Published {
        workloads: vec![],
        reservations: vec![weft_crds::NodeReservation {
            vm: "shop/web-vm".into(),
            network: "blue".into(),
            ifname: "eth0".into(),
            ips: vec!["10.10.0.70".into()],
            mac: Some("02:00:00:00:00:70".into()),
            since: 1_700_000_100,
        }],
    });
    source.report(&agent_status(None));
    let w = next_write(&mut writes, Duration::from_secs(1)).await;
    assert_eq!(
        w.body["status"]["reservations"],
        json!([{"vm": "shop/web-vm", "network": "blue", "ifname": "eth0", "ips": ["10.10.0.70"],
                "mac": "02:00:00:00:00:70", "since": 1_700_000_100}])
    );
}

#[tokio::test]
async fn without_kubevirt_the_agent_syncs_and_keeps_every_reservation() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    api.remove(VMS);
    api.remove(VMIS);
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    // The lists were asked (and refused) while the rest synced.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while api.gets(VMS).is_empty() || api.gets(VMIS).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "VMs never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(source.snapshot().unwrap().vms, None);
}

#[derive(serde::Deserialize)]
struct Rule {
    #[serde(rename = "apiGroups")]
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

/// `(group, resource)` of a request path: `/api/v1/pods` → `("", "pods")`,
/// `/apis/events.k8s.io/v1/namespaces/prod/events/x` → `("events.k8s.io", "events")`,
/// `/apis/weft.dev/v1alpha1/nodenetworks/node-a/status` → `("weft.dev", "nodenetworks/status")`.
fn group_resource(path: &str) -> (String, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("unexpected path {path}"),
    };
    // A namespaced object: `namespaces/<ns>/<resource>/...` (a namespace itself is `namespaces`).
    let rest = match rest {
        ["namespaces", _, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let resource = match rest {
        [resource] | [resource, _] => (*resource).to_owned(),
        [resource, _, sub] => format!("{resource}/{sub}"),
        _ => panic!("unexpected path {path}"),
    };
    (group.to_owned(), resource)
}

#[tokio::test]
async fn the_charts_agent_rbac_grants_exactly_what_the_source_uses() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    synced(&mut source).await;
    source.report(&agent_status(None));
    let w = next_write(&mut writes, Duration::from_secs(1)).await;

    let mut used: HashSet<(String, String, String)> = HashSet::new();
    for path in ALL {
        let (group, resource) = group_resource(path);
        for verb in ["list", "watch"] {
            used.insert((group.clone(), resource.clone(), verb.to_owned()));
        }
    }
    let (group, resource) = group_resource(&w.path);
    used.insert((group, resource, "patch".to_owned()));

    // An anomaly on a pod: an Event created, and patched into a series when it comes back.
    let publish = source.anomaly_publisher().unwrap();
    let anomaly = weft_operator::agent::anomaly::Anomaly {
        namespace: "prod".into(),
        pod: "web".into(),
        kind: weft_operator::agent::anomaly::Kind::ConntrackBudget,
        note:
            "interface eth0 on Network nat-demo (node node-a): 120/s, over 1000 conntrack entries"
                .into(),
    };
    publish(anomaly.clone());
    let created = next_write(&mut writes, Duration::from_secs(2)).await;
    assert_eq!(created.method, Method::POST);
    assert_eq!(
        created.path,
        "/apis/events.k8s.io/v1/namespaces/prod/events"
    );
    assert_eq!(created.body["type"], "Warning");
    assert_eq!(created.body["reason"], "ConntrackBudgetReached");
    assert_eq!(created.body["regarding"]["name"], "web");
    assert_eq!(created.body["reportingController"], "weft-agent");
    let mut echo = created.body.clone();
    echo["metadata"]["name"] = Value::from("web.1");
    echo["metadata"]["namespace"] = Value::from("prod");
    created
        .reply
        .send_response(json_response(StatusCode::CREATED, &echo));
    publish(anomaly);
    let again = next_write(&mut writes, Duration::from_secs(2)).await;
    assert_eq!(again.method, Method::PATCH, "{}", again.path);
    used.insert(("events.k8s.io".into(), "events".into(), "create".into()));
    let (group, resource) = group_resource(&again.path);
    used.insert((group, resource, "patch".to_owned()));

    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/weft/files/agent-rules.yaml");
    let rules: Vec<Rule> =
        serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let mut granted: HashSet<(String, String, String)> = HashSet::new();
    for r in &rules {
        for g in &r.api_groups {
            for res in &r.resources {
                for v in &r.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "{} lacks {missing:?}", file.display());
    // Beyond what the agent sends, only `get` on what it watches (for people debugging with
    // the agent's credentials).
    let extra: Vec<_> = granted
        .difference(&used)
        .filter(|(g, r, v)| {
            !(v == "get" && used.contains(&(g.clone(), r.clone(), "list".to_owned())))
        })
        .collect();
    assert!(
        extra.is_empty(),
        "{} grants unused {extra:?}",
        file.display()
    );
}

/// web-1 of `seed`, with `max_connections` as its `weft.dev/max-connections` annotation.
fn web_with_max_connections(max_connections: &str) -> Value {
    let mut web = partial("web-1", Some("shop"), &[("tier", "web")]);
    web["metadata"]["annotations"] = json!({
        "weft.dev/networks": "blue",
        "weft.dev/max-connections": max_connections,
    });
    web
}

/// A workload interface on `blue` at `ip`: of pod `shop/<pod>`, or of a container the runtime
/// named no pod for; with `mappings` as its host ports.
fn blue_endpoint(
    container: &str,
    pod: Option<&str>,
    ip: &str,
    mappings: &[(u16, &str)],
) -> weft_dataplane::proto::Endpoint {
    weft_dataplane::proto::Endpoint {
        network: "blue".into(),
        container_id: container.into(),
        ifname: "eth0".into(),
        host_ifname: format!("wf{container:0>11}"),
        mac: "02:00:0a:0a:00:46".into(),
        ips: vec![ip.parse().unwrap()],
        pod_namespace: pod.map(|_| "shop".to_owned()),
        pod_name: pod.map(str::to_owned),
        netns: None,
        vm: None,
        pending: false,
        vlan_trunk: vec![],
        port_mappings: mappings
            .iter()
            .map(|(port, protocol)| weft_dataplane::proto::PortMapping {
                host_port: *port,
                container_port: 80,
                protocol: (*protocol).into(),
                host_ip: None,
            })
            .collect(),
        bandwidth: None,
    }
}

/// The pods' own problems reach the pods as Warning Events: one POST when a problem appears,
/// none while it stays, a new Event (not a series on the old one) when its message changes;
/// a container without a pod gets none.
#[tokio::test]
async fn a_pod_problem_is_one_warning_event_on_the_pod_until_its_message_changes() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    api.list(
        PODS,
        vec![
            web_with_max_connections("lots"),
            partial("db-1", Some("shop"), &[]),
        ],
    );
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    let mut endpoints = weft_operator::agent::endpoints::EndpointStore::default();
    endpoints.register(blue_endpoint("web", Some("web-1"), "10.10.0.70", &[]));
    // No pod named, and a host port weft does not forward: a Container problem.
    endpoints.register(blue_endpoint("bare", None, "10.10.0.71", &[(9000, "icmp")]));
    let compute = |res: &Resources| {
        weft_operator::agent::compute(&config(), res, &endpoints, &BTreeMap::new()).problems
    };
    let problems = compute(&res);
    let (containers, pods): (Vec<_>, Vec<_>) = problems
        .iter()
        .filter(|p| p.reason.is_some())
        .cloned()
        .partition(|p| p.kind == "Container");
    assert_eq!(containers.len(), 1, "{problems:?}");
    assert_eq!(pods.len(), 1, "{problems:?}");

    source.pod_problems(&containers);
    no_write(&mut writes).await;

    source.pod_problems(&problems);
    let created = next_write(&mut writes, Duration::from_secs(2)).await;
    assert_eq!(created.method, Method::POST);
    assert_eq!(
        created.path,
        "/apis/events.k8s.io/v1/namespaces/shop/events"
    );
    let e = &created.body;
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidLimitAnnotation");
    assert_eq!(e["action"], "Apply");
    assert_eq!(e["reportingController"], "weft-agent");
    assert_eq!(e["reportingInstance"], "node-a");
    let note = e["note"].as_str().unwrap();
    assert!(
        note.starts_with("annotation weft.dev/max-connections: \"lots\" is not a whole number"),
        "{note}"
    );
    assert_eq!(
        e["regarding"],
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "uid-web-1"}),
        "the pod's uid too: `kubectl describe pod` selects Events by it"
    );
    let mut echo = created.body.clone();
    echo["metadata"]["namespace"] = Value::from("shop");
    created
        .reply
        .send_response(json_response(StatusCode::CREATED, &echo));

    // The next reconciles find the same problems: nothing new.
    source.pod_problems(&compute(&res));
    source.pod_problems(&problems);
    no_write(&mut writes).await;

    // The annotation changes and is still invalid: a new Event with the new note.
    api.push_watch(PODS, &[("MODIFIED", web_with_max_connections("many"))]);
    let res = until(
        &mut source,
        |r| {
            r.workloads.iter().any(|w| {
                w.limits.get("weft.dev/max-connections").map(String::as_str) == Some("many")
            })
        },
        |_| {},
    )
    .await;
    source.pod_problems(&compute(&res));
    let changed = next_write(&mut writes, Duration::from_secs(2)).await;
    assert_eq!(changed.method, Method::POST, "{}", changed.path);
    assert_eq!(changed.body["reason"], "InvalidLimitAnnotation");
    assert!(
        changed.body["note"]
            .as_str()
            .unwrap()
            .contains("\"many\" is not a whole number"),
        "{}",
        changed.body["note"]
    );
    changed
        .reply
        .send_response(json_response(StatusCode::CREATED, &changed.body));
    no_write(&mut writes).await;
}

/// A pod problem's Event that the API server does not take is published again by the next
/// reconcile that still finds the problem (not lost because it was tried once); once taken,
/// it is not published again.
#[tokio::test]
async fn a_pod_problem_event_the_api_server_did_not_take_is_published_again() {
    let (api, client, mut writes) = FakeApi::start();
    seed(&api);
    api.list(PODS, vec![web_with_max_connections("lots")]);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    let mut endpoints = weft_operator::agent::endpoints::EndpointStore::default();
    endpoints.register(blue_endpoint("web", Some("web-1"), "10.10.0.70", &[]));
    let problems: Vec<_> =
        weft_operator::agent::compute(&config(), &res, &endpoints, &BTreeMap::new())
            .problems
            .into_iter()
            .filter(|p| p.kind == "Pod")
            .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");

    source.pod_problems(&problems);
    let refused = next_write(&mut writes, Duration::from_secs(2)).await;
    assert_eq!(refused.method, Method::POST);
    assert_eq!(refused.body["reason"], "InvalidLimitAnnotation");
    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "the server is currently unable to handle the request",
        "reason": "ServiceUnavailable", "code": 503});
    refused
        .reply
        .send_response(json_response(StatusCode::SERVICE_UNAVAILABLE, &unavailable));

    // The next reconciles still find the problem: the Event is posted again (once the
    // publisher has reported the refusal).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let again = loop {
        source.pod_problems(&problems);
        if let Ok(Some(w)) = tokio::time::timeout(Duration::from_millis(50), writes.recv()).await {
            break w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused Event was not published again"
        );
    };
    assert_eq!(again.method, Method::POST);
    assert_eq!(again.path, refused.path);
    assert_eq!(again.body["reason"], "InvalidLimitAnnotation");
    assert_eq!(again.body["note"], refused.body["note"]);
    let mut echo = again.body.clone();
    echo["metadata"]["namespace"] = Value::from("shop");
    again
        .reply
        .send_response(json_response(StatusCode::CREATED, &echo));

    // Taken: the reconciles after it publish nothing.
    for _ in 0..5 {
        source.pod_problems(&problems);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    no_write(&mut writes).await;
}

#[tokio::test]
async fn a_new_block_here_widens_the_workload_slice_watch_to_its_network() {
    let (api, client, _writes) = FakeApi::start();
    seed(&api);
    let mut source = KubeSource::start(client, "node-a");
    let res = synced(&mut source).await;
    let peers: Vec<&str> = res.peers.iter().map(|p| p.workload.name.as_str()).collect();
    assert_eq!(
        peers,
        ["app-1", "app-2"],
        "blue's only: node-a has no block of green"
    );
    // The controller gives node-a a block of green: green's slices are watched too, and blue's
    // peers stay while the new watch lists.
    api.push_watch(
        NODE_NETWORKS,
        &[(
            "MODIFIED",
            node_network(
                "node-a",
                5,
                json!([{"network": "blue", "ipv4": "10.10.0.64/26"},
                       {"network": "green", "ipv4": "10.20.0.64/26"}]),
                None,
            ),
        )],
    );
    let res = until(&mut source, |r| r.peers.len() == 3, |_| {}).await;
    let mut peers: Vec<&str> = res.peers.iter().map(|p| p.workload.name.as_str()).collect();
    peers.sort_unstable();
    assert_eq!(peers, ["app-1", "app-2", "g-1"]);
    assert!(
        api.gets(SLICES)
            .iter()
            .any(|q| q.contains("labelSelector=weft.dev%2Fnetwork+in+%28blue%2Cgreen%29")),
        "{:?}",
        api.gets(SLICES)
    );
}

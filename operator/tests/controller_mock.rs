//! The controller's act steps against a mocked API server (tower-test), in the style of
//! kube-rs's controller-rs: each test seeds the reflector stores, runs one reconcile, and a
//! verifier checks every request the controller sends (method, path, query, body).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use weft_crds::{
    Cidr, ForwardedPort, Network, NetworkSpec, NodeNetwork, NodeNetworkBlock, NodeNetworkSpec,
    NodeNetworkStatus, NodeWorkload, PortForward, PortForwardSpec, PortForwardTarget,
    WorkloadSlice,
};
use weft_operator::controller::compact::CompactNodeNetwork;
use weft_operator::controller::leader::Fixed;
use weft_operator::controller::pods::PodDirectory;
use weft_operator::controller::{
    Context, FINALIZER, Metrics, Stores, network, portforward, slices,
};
use weft_operator::model::peers::{PodFacts, Pods};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

struct World {
    pods: Arc<tokio::sync::RwLock<PodDirectory>>,
    networks: Writer<Network>,
    nodes: Writer<Node>,
    node_networks: Writer<CompactNodeNetwork>,
    port_forwards: Writer<PortForward>,
    slices: Writer<WorkloadSlice>,
}

impl World {
    fn net(&mut self, n: &Network) -> &mut Self {
        self.networks
            .apply_watcher_event(&watcher::Event::Apply(n.clone()));
        self
    }
    fn node(&mut self, name: &str, labels: &[(&str, &str)]) -> &mut Self {
        let mut node = Node::default();
        node.metadata.name = Some(name.into());
        node.metadata.uid = Some(format!("uid-{name}"));
        node.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        self.nodes.apply_watcher_event(&watcher::Event::Apply(node));
        self
    }
    fn node_network(
        &mut self,
        name: &str,
        blocks: &[(&str, &str)],
        realized: &[&str],
    ) -> &mut Self {
        let mut nn = NodeNetwork::new(
            name,
            NodeNetworkSpec {
                blocks: blocks
                    .iter()
                    .map(|(net, cidr)| NodeNetworkBlock {
                        network: (*net).into(),
                        ipv4: Some(Cidr::from(*cidr)),
                        ipv6: None,
                    })
                    .collect(),
            },
        );
        nn.status = Some(NodeNetworkStatus {
            networks: realized.iter().map(|s| (*s).to_owned()).collect(),
            endpoints: Some(2),
            ..NodeNetworkStatus::default()
        });
        self.node_networks
            .apply_watcher_event(&watcher::Event::Apply(nn.into()));
        self
    }
    fn pf(&mut self, pf: &PortForward) -> &mut Self {
        self.port_forwards
            .apply_watcher_event(&watcher::Event::Apply(pf.clone()));
        self
    }
}

fn setup(leader: bool) -> (Arc<Context>, Handle, World) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (networks, nw) = reflector::store();
    let (nodes, ndw) = reflector::store();
    let (node_networks, nnw) = reflector::store();
    let (port_forwards, pfw) = reflector::store();
    let (slices, sw) = reflector::store();
    // Every pod is listed (none yet): see `World::bound`.
    let mut directory = PodDirectory::default();
    directory.relist(Pods::default(), std::time::Instant::now());
    let pods = Arc::new(tokio::sync::RwLock::new(directory));
    let stores = Stores {
        networks,
        nodes,
        node_networks,
        port_forwards,
        slices,
        slice_deletions: Default::default(),
        pods: pods.clone(),
    };
    let ctx = Context::new(client, stores, Arc::new(Fixed(leader)), Metrics::default());
    (
        Arc::new(ctx),
        handle,
        World {
            pods,
            networks: nw,
            nodes: ndw,
            node_networks: nnw,
            port_forwards: pfw,
            slices: sw,
        },
    )
}

fn network(name: &str, subnet: &str, created: i64) -> Network {
    let mut n = Network::new(
        name,
        NetworkSpec {
            subnets: vec![Cidr::from(subnet)],
            ..NetworkSpec::default()
        },
    );
    n.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
    n.metadata.generation = Some(1);
    n.metadata.finalizers = Some(vec![FINALIZER.into()]);
    n.metadata.uid = Some(format!("uid-{name}"));
    n
}

/// One expected request: what the controller must send.
struct Expect {
    method: Method,
    path: String,
    /// Query pairs that must be present.
    query: &'static [&'static str],
}

/// The request as the verifier saw it.
struct Seen {
    body: Value,
    content_type: String,
}

const APPLY: &[&str] = &["fieldManager=weft-controller", "force=true"];

/// Waits for the next request, checks it, answers with `reply(body)` and returns what it saw.
async fn expect(handle: &mut Handle, want: Expect, reply: impl FnOnce(&Value) -> Value) -> Seen {
    let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {} {}", want.method, want.path))
        .expect("service not called");
    assert_eq!(request.method(), want.method, "{}", request.uri());
    assert_eq!(request.uri().path(), want.path);
    let query = request.uri().query().unwrap_or_default().to_owned();
    for q in want.query {
        assert!(
            query.split('&').any(|p| p == *q),
            "{} lacks {q}: {query}",
            want.path
        );
    }
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let answer = reply(&body);
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    Seen { body, content_type }
}

fn echo(body: &Value) -> Value {
    body.clone()
}

fn network_reply(net: &Network) -> impl FnOnce(&Value) -> Value {
    let net = net.clone();
    move |body| {
        let mut v = serde_json::to_value(&net).unwrap();
        if let Some(s) = body.get("status") {
            v["status"] = s.clone();
        }
        v
    }
}

fn event_reply(body: &Value) -> Value {
    let mut v = body.clone();
    v["metadata"]["name"] = json!("ev");
    v
}

/// Waits for an Event created in `namespace` and answers as the API server does.
async fn expect_event(handle: &mut Handle, namespace: &str) -> Seen {
    expect(
        handle,
        Expect {
            method: Method::POST,
            path: format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"),
            query: &[],
        },
        event_reply,
    )
    .await
}

/// Waits for the write that empties the blocks of the NodeNetwork of `node` and answers as
/// kube-apiserver does: a server-side apply of `spec: {blocks: []}` drops the controller's last
/// field of the spec, and the API server refuses the object without one (422, `spec: Required
/// value`); a merge patch to `blocks: []` keeps the spec.
async fn expect_blocks_emptied(handle: &mut Handle, node: &str) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the NodeNetwork {node}"))
        .expect("service not called");
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(
        request.uri().path(),
        format!("/apis/weft.dev/v1alpha1/nodenetworks/{node}")
    );
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["spec"]["blocks"], json!([]), "{body}");
    if content_type == "application/apply-patch+yaml" {
        send.send_response(
            Response::builder()
                .status(422)
                .body(Body::from(
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": format!("NodeNetwork.weft.dev \"{node}\" is invalid: spec: Required value"),
                        "reason": "Invalid", "code": 422,
                    }))
                    .unwrap(),
                ))
                .unwrap(),
        );
        panic!(
            "the NodeNetwork {node} was emptied with a server-side apply, which the API server refuses"
        );
    }
    assert_eq!(content_type, "application/merge-patch+json");
    let mut nn = NodeNetwork::new(node, NodeNetworkSpec::default());
    nn.metadata.resource_version = Some("2".into());
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&nn).unwrap()))
            .unwrap(),
    );
}

async fn no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((req, _))) = next {
        panic!("unexpected request {} {}", req.method(), req.uri());
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

#[tokio::test]
async fn blocks_are_allocated_into_node_networks_with_server_side_apply() {
    let (ctx, mut handle, mut world) = setup(true);
    let blue = network("blue", "10.10.0.0/24", 1);
    world.net(&blue).node("a", &[]).node("b", &[]);
    let verifier = tokio::spawn(async move {
        for (node, block) in [("a", "10.10.0.0/26"), ("b", "10.10.0.64/26")] {
            let seen = expect(
                &mut handle,
                Expect {
                    method: Method::PATCH,
                    path: format!("/apis/weft.dev/v1alpha1/nodenetworks/{node}"),
                    query: APPLY,
                },
                echo,
            )
            .await;
            assert_eq!(seen.content_type, "application/apply-patch+yaml");
            assert_eq!(seen.body["kind"], "NodeNetwork");
            assert_eq!(seen.body["metadata"]["ownerReferences"][0]["kind"], "Node");
            assert_eq!(
                seen.body["metadata"]["ownerReferences"][0]["uid"],
                format!("uid-{node}")
            );
            assert_eq!(
                seen.body["spec"]["blocks"],
                json!([{"network": "blue", "ipv4": block}])
            );
        }
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue/status".into(),
                query: APPLY,
            },
            network_reply(&blue),
        )
        .await;
        let status = &seen.body["status"];
        assert_eq!(condition(status, "Valid")["status"], "True");
        assert_eq!(condition(status, "Ready")["reason"], "Pending");
        assert_eq!(condition(status, "Ready")["observedGeneration"], 1);
        assert_eq!(
            status["nodeBlocks"],
            json!([{"node": "a", "blocks": ["10.10.0.0/26"]}, {"node": "b", "blocks": ["10.10.0.64/26"]}])
        );
        assert_eq!(status["addressesTotal"], 253);
        no_more_requests(&mut handle).await;
    });
    network::reconcile(world_network(&ctx, "blue"), ctx)
        .await
        .unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn blocks_of_removed_and_unselected_nodes_are_released() {
    let (ctx, mut handle, mut world) = setup(true);
    let mut blue = network("blue", "10.10.0.0/24", 1);
    blue.spec.node_selector = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("pool".to_owned(), "x".to_owned())].into()),
            ..Default::default()
        },
    );
    // Node b is gone (its NodeNetwork remains until garbage collection), a is no longer
    // selected, c is new: c gets the lowest free block, which b and a held before.
    world
        .net(&blue)
        .node("a", &[])
        .node("c", &[("pool", "x")])
        .node("d", &[("pool", "x")])
        .node_network("a", &[("blue", "10.10.0.0/26")], &["blue"])
        .node_network("b", &[("blue", "10.10.0.64/26")], &["blue"])
        .node_network("d", &[("blue", "10.10.0.128/26")], &["blue"]);
    let verifier = tokio::spawn(async move {
        expect_blocks_emptied(&mut handle, "a").await;
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/nodenetworks/c".into(),
                query: APPLY,
            },
            echo,
        )
        .await;
        assert_eq!(
            seen.body["spec"]["blocks"],
            json!([{"network": "blue", "ipv4": "10.10.0.0/26"}])
        );
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue/status".into(),
                query: APPLY,
            },
            network_reply(&blue),
        )
        .await;
        assert_eq!(
            seen.body["status"]["nodeBlocks"],
            json!([{"node": "c", "blocks": ["10.10.0.0/26"]}, {"node": "d", "blocks": ["10.10.0.128/26"]}])
        );
        no_more_requests(&mut handle).await;
    });
    network::reconcile(world_network(&ctx, "blue"), ctx)
        .await
        .unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn an_overlapping_network_gets_valid_false_and_a_warning_event() {
    let (ctx, mut handle, mut world) = setup(true);
    let old = network("old", "10.10.0.0/16", 1);
    let new = network("new", "10.10.5.0/24", 2);
    world.net(&old).net(&new).node("a", &[]).node_network(
        "a",
        &[("old", "10.10.0.0/26")],
        &["old"],
    );
    let verifier = tokio::spawn(async move {
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/new/status".into(),
                query: APPLY,
            },
            network_reply(&new),
        )
        .await;
        let valid = condition(&seen.body["status"], "Valid");
        assert_eq!(valid["status"], "False");
        assert_eq!(valid["reason"], "SubnetOverlap");
        let message = valid["message"].as_str().unwrap();
        assert!(
            message.contains("spec.subnets[0]") && message.contains("Network old"),
            "{message}"
        );
        assert_eq!(condition(&seen.body["status"], "Ready")["status"], "False");
        assert!(seen.body["status"].get("nodeBlocks").is_none());
        let seen = expect_event(&mut handle, "default").await;
        assert_eq!(seen.body["type"], "Warning");
        assert_eq!(seen.body["reason"], "SubnetOverlap");
        assert_eq!(seen.body["regarding"]["name"], "new");
        assert_eq!(seen.body["regarding"]["kind"], "Network");
        no_more_requests(&mut handle).await;
    });
    let new_obj = world_network(&ctx, "new");
    network::reconcile(new_obj, ctx).await.unwrap();
    verifier.await.unwrap();
}

fn world_network(ctx: &Context, name: &str) -> Arc<Network> {
    ctx.stores
        .networks
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .unwrap()
}

#[tokio::test]
async fn the_finalizer_waits_for_agents_and_is_removed_once_none_realizes_the_network() {
    let (ctx, mut handle, mut world) = setup(true);
    let mut blue = network("blue", "10.10.0.0/24", 1);
    blue.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(100).unwrap()));
    world
        .net(&blue)
        .node("a", &[])
        .node("b", &[])
        .node_network("a", &[("blue", "10.10.0.0/26")], &["blue"])
        .node_network("b", &[("blue", "10.10.0.64/26")], &[])
        // The node of "gone" no longer exists: its stale status does not hold the finalizer.
        .node_network("gone", &[], &["blue"]);
    // First pass: the blocks leave every spec; agent a still realizes blue, which a Warning
    // Event on the Network says, naming the node and what to do for one that is gone.
    let verifier = tokio::spawn(async move {
        for node in ["a", "b"] {
            expect_blocks_emptied(&mut handle, node).await;
        }
        let seen = expect_event(&mut handle, "default").await;
        assert_eq!(seen.body["reason"], "WaitingForAgents", "{}", seen.body);
        assert_eq!(seen.body["type"], "Warning");
        let note = seen.body["note"].as_str().unwrap();
        assert!(
            note.contains("node(s) a ") && note.contains("kubectl delete nodenetwork NODE"),
            "{note}"
        );
        assert!(
            !note.contains("gone"),
            "a node that no longer exists is not named: {note}"
        );
        no_more_requests(&mut handle).await;
        handle
    });
    let err = network::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "WaitingForAgents");
    assert!(err.is_transient());
    let mut handle = verifier.await.unwrap();

    // The agent of a removed the network: the finalizer goes (JSON patch on the Network).
    world
        .node_network("a", &[], &[])
        .node_network("b", &[], &[]);
    let verifier = tokio::spawn(async move {
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue".into(),
                query: &[],
            },
            network_reply(&blue),
        )
        .await;
        assert_eq!(seen.content_type, "application/json-patch+json");
        let ops = seen.body.as_array().unwrap();
        assert!(
            ops.iter()
                .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
            "{}",
            seen.body
        );
        no_more_requests(&mut handle).await;
    });
    let blue = world_network(&ctx, "blue");
    network::reconcile(blue, ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn deleting_the_last_network_of_a_node_empties_its_node_network_and_removes_the_finalizer() {
    let (ctx, mut handle, mut world) = setup(true);
    let mut blue = network("blue", "10.10.0.0/24", 1);
    blue.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(100).unwrap()));
    // The agent has already removed blue (or never realized it): once the spec is empty,
    // nothing holds the finalizer.
    world
        .net(&blue)
        .node("a", &[])
        .node_network("a", &[("blue", "10.10.0.0/26")], &[]);
    let verifier = tokio::spawn(async move {
        expect_blocks_emptied(&mut handle, "a").await;
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue".into(),
                query: &[],
            },
            network_reply(&blue),
        )
        .await;
        assert_eq!(seen.content_type, "application/json-patch+json");
        assert!(
            seen.body
                .as_array()
                .unwrap()
                .iter()
                .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
            "{}",
            seen.body
        );
        no_more_requests(&mut handle).await;
    });
    let blue = world_network(&ctx, "blue");
    network::reconcile(blue, ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_node_without_blocks_or_node_network_gets_none_written() {
    let (ctx, mut handle, mut world) = setup(true);
    let mut blue = network("blue", "10.10.0.0/24", 1);
    blue.spec.node_selector = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("pool".to_owned(), "x".to_owned())].into()),
            ..Default::default()
        },
    );
    world.net(&blue).node("a", &[]);
    let verifier = tokio::spawn(async move {
        expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue/status".into(),
                query: APPLY,
            },
            network_reply(&blue),
        )
        .await;
        no_more_requests(&mut handle).await;
    });
    network::reconcile(world_network(&ctx, "blue"), ctx)
        .await
        .unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_network_without_the_finalizer_gets_it_first() {
    let (ctx, mut handle, mut world) = setup(true);
    let mut blue = network("blue", "10.10.0.0/24", 1);
    blue.metadata.finalizers = None;
    world.net(&blue);
    let verifier = tokio::spawn(async move {
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/networks/blue".into(),
                query: &[],
            },
            network_reply(&blue),
        )
        .await;
        assert!(seen.body.to_string().contains(FINALIZER), "{}", seen.body);
        no_more_requests(&mut handle).await;
    });
    let blue = world_network(&ctx, "blue");
    network::reconcile(blue, ctx).await.unwrap();
    verifier.await.unwrap();
}

fn port_forward(name: &str, network: &str) -> PortForward {
    let mut pf = PortForward::new(
        name,
        PortForwardSpec {
            network: network.into(),
            target: PortForwardTarget {
                workload: Some("vm1".into()),
                selector: None,
            },
            ports: vec![ForwardedPort {
                port: Some(2222),
                ..ForwardedPort::default()
            }],
            allow_from: None,
            brute_force: None,
            syn_proxy: None,
        },
    );
    pf.metadata.namespace = Some("apps".into());
    pf.metadata.generation = Some(3);
    pf
}

#[tokio::test]
async fn a_port_forward_to_a_missing_network_is_rejected_with_status_and_event() {
    let (ctx, mut handle, mut world) = setup(true);
    let pf = port_forward("ssh", "nope");
    world.pf(&pf);
    let reply = {
        let pf = pf.clone();
        move |body: &Value| {
            let mut v = serde_json::to_value(&pf).unwrap();
            v["status"] = body["status"].clone();
            v
        }
    };
    let verifier = tokio::spawn(async move {
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/namespaces/apps/portforwards/ssh/status".into(),
                query: APPLY,
            },
            reply,
        )
        .await;
        let valid = condition(&seen.body["status"], "Valid");
        assert_eq!(valid["reason"], "NetworkNotFound");
        assert_eq!(valid["observedGeneration"], 3);
        assert_eq!(seen.body["status"]["observedGeneration"], 3);
        let seen = expect_event(&mut handle, "apps").await;
        assert_eq!(seen.body["type"], "Warning");
        assert_eq!(seen.body["reason"], "NetworkNotFound");
        no_more_requests(&mut handle).await;
    });
    portforward::reconcile(Arc::new(pf), ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_replica_that_does_not_hold_the_lease_writes_nothing() {
    let (ctx, mut handle, mut world) = setup(false);
    let old = network("old", "10.10.0.0/16", 1);
    let new = network("new", "10.10.5.0/24", 2);
    let mut no_finalizer = network("fresh", "10.20.0.0/24", 3);
    no_finalizer.metadata.finalizers = None;
    let pf = port_forward("ssh", "nope");
    world
        .net(&old)
        .net(&new)
        .net(&no_finalizer)
        .node("a", &[])
        .pf(&pf);
    for n in [&old, &new, &no_finalizer] {
        network::reconcile(Arc::new(n.clone()), ctx.clone())
            .await
            .unwrap();
    }
    portforward::reconcile(Arc::new(pf), ctx).await.unwrap();
    no_more_requests(&mut handle).await;
}

#[tokio::test]
async fn a_policy_status_sums_what_the_agents_report_and_names_their_problems() {
    let (ctx, mut handle, mut world) = setup(true);
    for (node, n, error) in [
        ("node-a", 2, None),
        (
            "node-b",
            1,
            Some("spec.subject.networks[0]: no Network lan"),
        ),
        ("node-c", 0, None),
    ] {
        let mut nn = NodeNetwork::new(node, NodeNetworkSpec::default());
        nn.status = Some(NodeNetworkStatus {
            policies: vec![weft_crds::NodePolicy {
                policy: "SegmentationPolicy shop/db".into(),
                interfaces: n,
                error: error.map(Into::into),
            }],
            ..NodeNetworkStatus::default()
        });
        world
            .node_networks
            .apply_watcher_event(&watcher::Event::Apply(nn.into()));
    }
    let policy: weft_crds::SegmentationPolicy = serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "SegmentationPolicy",
        "metadata": {"name": "db", "namespace": "shop", "generation": 2},
        "spec": {"subject": {"podSelector": {"matchLabels": {"app": "db"}}},
                 "ingress": [{"name": "app", "action": "Allow",
                              "from": [{"pods": {"podSelector": {"matchLabels": {"app": "web"}}}}]}]}
    }))
    .unwrap();
    let reply = {
        let p = policy.clone();
        move |body: &Value| {
            let mut v = serde_json::to_value(&p).unwrap();
            v["status"] = body["status"].clone();
            v
        }
    };
    let verifier = tokio::spawn(async move {
        let seen = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path: "/apis/weft.dev/v1alpha1/namespaces/shop/segmentationpolicies/db/status"
                    .into(),
                query: APPLY,
            },
            reply,
        )
        .await;
        let status = &seen.body["status"];
        assert_eq!(status["workloads"], 3);
        assert_eq!(status["nodes"], 2);
        assert_eq!(status["observedGeneration"], 2);
        let valid = condition(status, "Valid");
        assert_eq!(valid["status"], "False");
        assert_eq!(valid["reason"], "NotEnforceable");
        assert!(
            valid["message"]
                .as_str()
                .unwrap()
                .contains("node-b: spec.subject.networks[0]: no Network lan"),
            "{valid}"
        );
        assert_eq!(condition(status, "Ready")["status"], "True");
        no_more_requests(&mut handle).await;
    });
    weft_operator::controller::policy::reconcile_namespaced(Arc::new(policy), ctx)
        .await
        .unwrap();
    verifier.await.unwrap();
}

fn workload(name: &str, ip: &str) -> NodeWorkload {
    NodeWorkload {
        network: "blue".into(),
        namespace: "shop".into(),
        name: name.into(),
        labels: std::sync::Arc::new([("app".to_owned(), "web".to_owned())].into()),
        ips: vec![ip.into()],
        vm: None,
        mac: None,
        active: true,
    }
}

impl World {
    /// Binds the pod `namespace/name` to `node` with the label `app` (`None`: no such pod, not
    /// even one deleted moments ago).
    fn bound(&mut self, namespace: &str, name: &str, node: &str, app: Option<&str>) -> &mut Self {
        let facts = app.map(|app| PodFacts {
            node: node.into(),
            labels: Arc::new([("app".to_owned(), app.to_owned())].into()),
            mirror: false,
            departed: false,
        });
        let now = std::time::Instant::now();
        let mut pods = self.pods.try_write().unwrap();
        pods.apply(namespace, name, facts, now);
        pods.expire(now + weft_operator::controller::pods::DEPARTED_GRACE);
        drop(pods);
        self
    }

    /// `node` publishes `workloads` on network blue from its `block`; the pods of those not
    /// bound yet are bound to it, with their published labels.
    fn publishing(&mut self, node: &str, block: &str, workloads: Vec<NodeWorkload>) -> &mut Self {
        for w in &workloads {
            let known = self
                .pods
                .try_read()
                .unwrap()
                .pods()
                .get(&w.namespace, &w.name)
                .is_some();
            if !known {
                let app = w.labels.get("app").cloned().unwrap_or_default();
                self.bound(&w.namespace, &w.name, node, Some(&app));
            }
        }
        let mut nn = NodeNetwork::new(
            node,
            NodeNetworkSpec {
                blocks: vec![NodeNetworkBlock {
                    network: "blue".into(),
                    ipv4: Some(Cidr::from(block)),
                    ipv6: None,
                }],
            },
        );
        nn.status = Some(NodeNetworkStatus {
            networks: vec!["blue".into()],
            workloads,
            ..NodeNetworkStatus::default()
        });
        self.node_networks
            .apply_watcher_event(&watcher::Event::Apply(nn.into()));
        self
    }
}

/// Waits for the server-side apply of the WorkloadSlice `name` and answers it.
async fn expect_slice(handle: &mut Handle, name: &str) -> Seen {
    expect(
        handle,
        Expect {
            method: Method::PATCH,
            path: format!("/apis/weft.dev/v1alpha1/workloadslices/{name}"),
            query: APPLY,
        },
        echo,
    )
    .await
}

#[tokio::test]
async fn the_vouched_workloads_of_a_network_are_applied_as_its_slice_owned_by_it() {
    let (ctx, mut handle, mut world) = setup(true);
    let blue = network("blue", "10.10.0.0/24", 1);
    world
        .net(&blue)
        .publishing("a", "10.10.0.0/26", vec![workload("web-1", "10.10.0.2")])
        .publishing(
            "b",
            "10.10.0.64/26",
            // web-2 is b's own; "stolen" claims an address of a's block.
            vec![
                workload("web-2", "10.10.0.66"),
                workload("stolen", "10.10.0.3"),
            ],
        );
    let verifier = tokio::spawn(async move {
        let seen = expect_slice(&mut handle, "blue.0").await;
        assert_eq!(seen.content_type, "application/apply-patch+yaml");
        let b = &seen.body;
        assert_eq!(b["kind"], "WorkloadSlice");
        assert_eq!(b["metadata"]["labels"]["weft.dev/network"], "blue");
        assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "Network");
        assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "uid-blue");
        assert_eq!(b["spec"]["network"], "blue");
        let names: Vec<(&str, &str)> = b["spec"]["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["node"].as_str().unwrap(), w["name"].as_str().unwrap()))
            .collect();
        assert_eq!(names, [("a", "web-1"), ("b", "web-2")]);
        assert_eq!(b["spec"]["workloads"][0]["labels"]["app"], "web");
        let written = b.clone();
        // The refused one is named in a Warning Event on the Network.
        let seen = expect_event(&mut handle, "default").await;
        assert_eq!(seen.body["reason"], "PublishedAddressRefused");
        assert!(
            seen.body["note"]
                .as_str()
                .unwrap()
                .contains("shop/stolen on network blue left out"),
            "{}",
            seen.body
        );
        (handle, written)
    });
    slices::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap();
    let (mut handle, written) = verifier.await.unwrap();
    // Nothing changed: nothing is written again (the store has not caught up yet; what was
    // written counts), and the refusal is not said twice.
    let again = tokio::spawn(async move {
        no_more_requests(&mut handle).await;
        handle
    });
    slices::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap();
    let mut handle = again.await.unwrap();
    // The store catches up; web-1 stops on a: the slice is written without it.
    let mut slice: WorkloadSlice = serde_json::from_value(written).unwrap();
    slice.metadata.resource_version = Some("2".into());
    world
        .slices
        .apply_watcher_event(&watcher::Event::Apply(slice.clone()));
    world.publishing("a", "10.10.0.0/26", vec![]);
    let verifier = tokio::spawn(async move {
        let seen = expect_slice(&mut handle, "blue.0").await;
        let names: Vec<&str> = seen.body["spec"]["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web-2"]);
        no_more_requests(&mut handle).await;
        handle
    });
    slices::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap();
    let mut handle = verifier.await.unwrap();
    // Someone empties the slice by hand (the store shows a version after the write): it is
    // written again.
    slice.metadata.resource_version = Some("4".into());
    slice.spec.workloads.clear();
    world
        .slices
        .apply_watcher_event(&watcher::Event::Apply(slice));
    let verifier = tokio::spawn(async move {
        let seen = expect_slice(&mut handle, "blue.0").await;
        assert_eq!(seen.body["spec"]["workloads"][0]["name"], "web-2");
        no_more_requests(&mut handle).await;
    });
    slices::reconcile(Arc::new(blue), ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_slice_carries_the_pods_own_labels_and_no_pod_of_another_node() {
    let (ctx, mut handle, mut world) = setup(true);
    let blue = network("blue", "10.10.0.0/24", 1);
    let mut forged = workload("db", "10.10.0.66");
    forged.labels = Arc::new([("app".to_owned(), "db".to_owned())].into());
    world
        .net(&blue)
        // The API server says: db is labelled app=web, a-pod runs on node a.
        .bound("shop", "db", "b", Some("web"))
        .bound("shop", "a-pod", "a", Some("web"))
        .publishing("a", "10.10.0.0/26", vec![])
        .publishing(
            "b",
            "10.10.0.64/26",
            vec![forged, workload("a-pod", "10.10.0.67")],
        );
    let verifier = tokio::spawn(async move {
        let seen = expect_slice(&mut handle, "blue.0").await;
        let workloads = seen.body["spec"]["workloads"].as_array().unwrap().clone();
        assert_eq!(workloads.len(), 1, "{workloads:?}");
        assert_eq!(workloads[0]["name"], "db");
        // The pod's label, not the one node b published.
        assert_eq!(workloads[0]["labels"]["app"], "web");
        let seen = expect_event(&mut handle, "default").await;
        assert!(
            seen.body["note"]
                .as_str()
                .unwrap()
                .contains("shop/a-pod on network blue left out of policy groups: pod shop/a-pod runs on node a, not on b"),
            "{}",
            seen.body
        );
        (handle, seen.body)
    });
    slices::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap();
    let (mut handle, _) = verifier.await.unwrap();
    // The pod is relabelled: the slice follows, though node b published nothing new.
    world.bound("shop", "db", "b", Some("api"));
    let verifier = tokio::spawn(async move {
        let seen = expect_slice(&mut handle, "blue.0").await;
        assert_eq!(seen.body["spec"]["workloads"][0]["labels"]["app"], "api");
        no_more_requests(&mut handle).await;
        handle
    });
    slices::reconcile(Arc::new(blue.clone()), ctx.clone())
        .await
        .unwrap();
    let mut handle = verifier.await.unwrap();
    // Until every pod is listed again (a new replica, a relist), nothing is written.
    *world.pods.try_write().unwrap() = PodDirectory::default();
    world.publishing("a", "10.10.0.0/26", vec![workload("web-1", "10.10.0.2")]);
    let verifier = tokio::spawn(async move {
        no_more_requests(&mut handle).await;
    });
    slices::reconcile(Arc::new(blue), ctx).await.unwrap();
    verifier.await.unwrap();
}

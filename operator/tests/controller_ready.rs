//! The controller's readiness (`/readyz`) against a mocked API server (tower-test): it turns
//! ready once the initial list of every watched kind is in, while the `Controller`s run on
//! the same client beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use futures::channel::mpsc;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::json;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use weft_crds::Network;
use weft_operator::controller::{ReportedRefs, Triggers, caches_synced, observe_cluster};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers every list with an empty list of its kind, except lists of `held` (left
/// unanswered), and leaves every watch open; records the path of every list in `lists`.
async fn api_server(
    mut handle: Handle,
    held: Option<&'static str>,
    lists: Arc<Mutex<Vec<String>>>,
) {
    let mut open = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let query = request.uri().query().unwrap_or_default().to_owned();
        let path = request.uri().path().to_owned();
        if !query.split('&').any(|p| p == "watch=true") {
            lists.lock().unwrap().push(path.clone());
        }
        if path == "/api/v1/pods" {
            // Only the pods bound to a node.
            assert!(
                query.contains("fieldSelector=spec.nodeName%21%3D"),
                "{query}"
            );
        }
        if query.split('&').any(|p| p == "watch=true")
            || held.is_some_and(|h| path.ends_with(&format!("/{h}")))
        {
            open.push(send);
            continue;
        }
        let (api_version, kind) = match path.rsplit('/').next().unwrap_or_default() {
            "nodes" => ("v1", "NodeList"),
            "pods" => ("v1", "PodList"),
            "networks" => ("weft.dev/v1alpha1", "NetworkList"),
            "nodenetworks" => ("weft.dev/v1alpha1", "NodeNetworkList"),
            "portforwards" => ("weft.dev/v1alpha1", "PortForwardList"),
            "workloadslices" => ("weft.dev/v1alpha1", "WorkloadSliceList"),
            other => panic!("unexpected request for {other}: {path}?{query}"),
        };
        let list = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": "1"},
            "items": [],
        });
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).unwrap()))
                .unwrap(),
        );
    }
}

async fn nothing<K>(_: Arc<K>, _: Arc<()>) -> Result<Action, kube::Error> {
    Ok(Action::await_change())
}

fn retry<K>(_: Arc<K>, _: &kube::Error, _: Arc<()>) -> Action {
    Action::await_change()
}

#[tokio::test]
async fn the_controller_is_ready_once_the_initial_lists_are_in_while_its_controllers_run() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let lists = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(api_server(handle, None, lists.clone()));
    let client = Client::new(svc, "default");
    let (networks, _n) = mpsc::unbounded();
    let (network_refs, _r) = mpsc::unbounded();
    let (port_forwards, _p) = mpsc::unbounded();
    let (cluster_policies, _c) = mpsc::unbounded();
    let (policies, _s) = mpsc::unbounded();
    let (mirrors, _m) = mpsc::unbounded();
    let (slices, _w) = mpsc::unbounded();
    let (slice_refs, _wr) = mpsc::unbounded();
    let triggers = Triggers {
        networks,
        network_refs,
        slices,
        slice_refs,
        port_forwards,
        cluster_policies,
        policies,
        mirrors,
        reported: reported(),
    };
    let (observation, networks, port_forwards, observing) = observe_cluster(&client, &triggers);
    tokio::spawn(observing);
    // The Controllers run on the same watches and wait for their stores' initial lists too,
    // as in `run`; readiness does not wait on their stores.
    let ctx = Arc::new(());
    // Two on the Networks' watch (the Networks and their WorkloadSlices), one on the
    // PortForwards'.
    let networks = networks.controllers();
    assert_eq!(networks.len(), 2);
    for c in networks {
        tokio::spawn(c.run(nothing, retry, ctx.clone()).for_each(|_| async {}));
    }
    for c in port_forwards.controllers() {
        tokio::spawn(c.run(nothing, retry, ctx.clone()).for_each(|_| async {}));
    }
    tokio::time::timeout(Duration::from_secs(2), caches_synced(&observation))
        .await
        .expect("not ready 2 s after the initial lists")
        .unwrap();
    // One watch per kind: the Controllers list nothing of their own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut lists = lists.lock().unwrap().clone();
    lists.sort();
    assert_eq!(
        lists,
        [
            "/api/v1/nodes",
            "/api/v1/pods",
            "/apis/weft.dev/v1alpha1/networks",
            "/apis/weft.dev/v1alpha1/nodenetworks",
            "/apis/weft.dev/v1alpha1/portforwards",
            "/apis/weft.dev/v1alpha1/workloadslices",
        ]
    );
}

/// Senders whose receivers are gone: these tests look at readiness, not at what is woken.
fn reported() -> ReportedRefs {
    ReportedRefs {
        cluster_policies: mpsc::unbounded().0,
        policies: mpsc::unbounded().0,
        mirrors: mpsc::unbounded().0,
        port_forwards: mpsc::unbounded().0,
    }
}

#[tokio::test]
async fn the_controller_is_not_ready_while_a_list_is_outstanding() {
    not_ready_while_outstanding("portforwards").await;
    // Until every pod is known, no node's workloads can be vouched for.
    not_ready_while_outstanding("pods").await;
}

async fn not_ready_while_outstanding(held: &'static str) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(api_server(handle, Some(held), Arc::default()));
    let client = Client::new(svc, "default");
    let (tx, _rx) = mpsc::unbounded();
    let (network_refs, _r) = mpsc::unbounded();
    let (slice_refs, _wr) = mpsc::unbounded();
    let triggers = Triggers {
        networks: tx.clone(),
        network_refs,
        slices: tx.clone(),
        slice_refs,
        port_forwards: tx.clone(),
        cluster_policies: tx.clone(),
        policies: tx.clone(),
        mirrors: tx,
        reported: reported(),
    };
    let (observation, _networks, _port_forwards, observing) = observe_cluster(&client, &triggers);
    tokio::spawn(observing);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), caches_synced(&observation))
            .await
            .is_err(),
        "ready before the {held} were listed"
    );
    assert!(*observation.networks_listed.borrow());
}

#[tokio::test]
async fn a_store_wakes_only_the_last_of_two_waiters() {
    // Why readiness never waits on a Controller's store: kube-runtime's
    // `Store::wait_until_ready` keeps one waker, so of two tasks waiting on one store (a
    // Controller's applier and a readiness check) only the one that polled last is woken.
    let (store, mut writer) = reflector::store::<Network>();
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.wait_until_ready().await }
    });
    tokio::task::yield_now().await;
    let second = tokio::spawn(async move { store.wait_until_ready().await });
    tokio::task::yield_now().await;
    writer.apply_watcher_event(&watcher::Event::InitDone);
    tokio::time::timeout(Duration::from_secs(1), second)
        .await
        .expect("the last waiter is woken")
        .unwrap()
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), first)
            .await
            .is_err(),
        "kube-runtime now wakes every waiter; readiness could wait on the Controllers' stores"
    );
}

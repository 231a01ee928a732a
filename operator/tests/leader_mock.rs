//! Leader election against a mocked API server (tower-test): the holder releases the Lease
//! when the controller stops, and a standby takes a released Lease at its next read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::watch;
use weft_operator::controller::leader::{Elector, Timing};

mod api_mock;

use api_mock::{Handle, next, respond};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/weft/leases/weft-controller";

fn lease(holder: Option<&str>, duration: i32, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "weft-controller", "namespace": "weft", "resourceVersion": version},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "leaseTransitions": 3,
            "renewTime": "2026-12-01T10:00:00.000000Z",
        },
    })
}

fn elector(timing: Timing) -> (Elector, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    (
        Elector::new(client, "weft", "weft-controller", "replica-a", timing),
        handle,
    )
}

#[tokio::test]
async fn the_holder_releases_the_lease_at_shutdown_and_stops_writing_first() {
    let (elector, mut handle) = elector(Timing::DEFAULT);
    let (tx, mut rx) = watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(elector.run(tx, std::future::ready(()), async move {
        let _ = stop_rx.await;
    }));

    // No Lease yet: the elector creates it, held by itself.
    let (method, path, _, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::GET, LEASE));
    respond(
        send,
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    );
    let (method, path, body, send) = next(&mut handle).await;
    assert_eq!(method, Method::POST);
    assert_eq!(path, "/apis/coordination.k8s.io/v1/namespaces/weft/leases");
    assert_eq!(body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    respond(send, 201, &lease(Some("replica-a"), 15, "1"));
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|l| *l))
        .await
        .expect("leads after creating the Lease")
        .unwrap();

    // SIGTERM: the replica stops writing, then releases the Lease while the controllers may
    // still be draining (the receiver is still there).
    stop_tx.send(()).unwrap();
    let (method, path, _, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::GET, LEASE));
    assert!(!*rx.borrow(), "no writes once the release is under way");
    respond(send, 200, &lease(Some("replica-a"), 15, "2"));
    let (method, path, body, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::PUT, LEASE));
    assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(body["metadata"]["resourceVersion"], "2");
    respond(send, 200, &body);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the elector ends after the release")
        .unwrap();
    assert!(!*rx.borrow());
}

#[tokio::test]
async fn the_lease_is_released_when_the_controllers_drop_their_receivers() {
    let (elector, mut handle) = elector(Timing::DEFAULT);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(elector.run(tx, std::future::ready(()), std::future::pending()));
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, &lease(Some("replica-a"), 15, "4"));
    let (method, _, _, send) = next(&mut handle).await;
    assert_eq!(method, Method::PUT);
    respond(send, 200, &lease(Some("replica-a"), 15, "5"));
    drop(rx);
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, &lease(Some("replica-a"), 15, "5"));
    let (method, _, body, send) = next(&mut handle).await;
    assert_eq!(method, Method::PUT);
    assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
    respond(send, 200, &body);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the elector ends after the release")
        .unwrap();
}

#[tokio::test]
async fn a_standby_takes_a_released_lease_at_its_next_read() {
    let timing = Timing {
        retry_period: Duration::from_millis(50),
        ..Timing::DEFAULT
    };
    let (elector, mut handle) = elector(timing);
    let (tx, mut rx) = watch::channel(false);
    let _task = tokio::spawn(elector.run(tx, std::future::ready(()), std::future::pending()));

    // Held by another replica: wait.
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, &lease(Some("replica-b"), 15, "7"));
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, &lease(Some("replica-b"), 15, "8"));
    assert!(!*rx.borrow());
    // replica-b released it: taken at the next read, with the resourceVersion read.
    let (_, _, _, send) = next(&mut handle).await;
    respond(send, 200, &lease(None, 1, "9"));
    let (method, path, body, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::PUT, LEASE));
    assert_eq!(body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(body["spec"]["leaseTransitions"], 4);
    assert_eq!(body["metadata"]["resourceVersion"], "9");
    respond(send, 200, &body);
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|l| *l))
        .await
        .expect("leads after taking the released Lease")
        .unwrap();
}

#[tokio::test]
async fn a_lost_race_for_the_lease_leaves_the_replica_standing_by() {
    let (mut elector, mut handle) = elector(Timing::DEFAULT);
    let verifier = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut handle).await;
        respond(send, 200, &lease(None, 1, "3"));
        let (method, _, _, send) = next(&mut handle).await;
        assert_eq!(method, Method::PUT);
        respond(
            send,
            409,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        );
    });
    assert!(!elector.try_acquire_or_renew().await.unwrap());
    verifier.await.unwrap();
}

#[test]
fn the_chart_grants_the_verbs_the_elector_uses_on_leases() {
    // GET reads, POST creates, PUT (replace) renews, takes and releases.
    #[derive(serde::Deserialize)]
    struct Rule {
        #[serde(rename = "apiGroups")]
        api_groups: Vec<String>,
        resources: Vec<String>,
        verbs: Vec<String>,
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/weft/files/controller-lease-rules.yaml");
    let rules: Vec<Rule> =
        serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let granted: Vec<&str> = rules
        .iter()
        .filter(|r| r.resources.iter().any(|res| res == "leases"))
        .flat_map(|r| r.verbs.iter().map(String::as_str))
        .collect();
    assert_eq!(
        granted,
        ["get", "create", "update"],
        "exactly what the elector uses"
    );
    for verb in ["get", "create", "update"] {
        assert!(
            rules
                .iter()
                .any(|r| r.api_groups.iter().any(|g| g == "coordination.k8s.io")
                    && r.resources.iter().any(|res| res == "leases")
                    && r.verbs.iter().any(|v| v == verb)),
            "{} lacks {verb} on leases",
            file.display()
        );
    }
}

#[tokio::test]
async fn a_replica_stands_for_the_lease_only_once_its_caches_are_synced() {
    let (elector, mut handle) = elector(Timing::DEFAULT);
    let (tx, rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(elector.run(
        tx,
        async move {
            let _ = ready_rx.await;
        },
        std::future::pending(),
    ));
    // Not synced: the Lease is not even read, and the replica does not lead.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), handle.next_request())
            .await
            .is_err(),
        "the Lease was asked for before the caches were synced"
    );
    assert!(!*rx.borrow());
    ready_tx.send(()).unwrap();
    let (method, path, _, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::GET, LEASE));
    respond(send, 200, &lease(Some("replica-a"), 15, "7"));
    let (method, _, _, send) = next(&mut handle).await;
    assert_eq!(method, Method::PUT);
    respond(send, 200, &lease(Some("replica-a"), 15, "8"));
    tokio::time::timeout(Duration::from_secs(1), rx.clone().wait_for(|l| *l))
        .await
        .expect("leads once synced")
        .unwrap();
    task.abort();
}

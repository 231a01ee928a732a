//! The uninstall hook against a mocked API server (tower-test): with the controller gone, it
//! takes the controller's finalizer off every Network left behind, and only that finalizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::time::Duration;

mod api_mock;

use api_mock::{next, respond};

const NETWORKS: &str = "/apis/weft.dev/v1alpha1/networks";

fn network(name: &str, finalizers: &[&str], version: &str) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "Network",
        "metadata": {"name": name, "resourceVersion": version, "finalizers": finalizers},
        "spec": {"mode": "NAT", "subnets": ["10.10.0.0/16"]},
    })
}

#[tokio::test]
async fn the_controllers_finalizer_comes_off_every_network_and_no_other_finalizer_does() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let task = tokio::spawn(weft_operator::uninstall::release_networks(client));

    let (method, path, _, send) = next(&mut handle).await;
    assert_eq!((method, path.as_str()), (Method::GET, NETWORKS));
    respond(
        send,
        200,
        &json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "NetworkList",
            "metadata": {"resourceVersion": "10"},
            "items": [
                network("a", &["weft.dev/cleanup"], "3"),
                network("b", &["weft.dev/cleanup", "example.com/keep"], "4"),
                network("c", &[], "5"),
            ],
        }),
    );
    // a: the finalizer off, at the version read.
    let (method, path, body, send) = next(&mut handle).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, "/apis/weft.dev/v1alpha1/networks/a")
    );
    assert_eq!(
        body,
        json!({"metadata": {"finalizers": [], "resourceVersion": "3"}})
    );
    respond(send, 200, &network("a", &[], "6"));
    // b: changed meanwhile (another finalizer added): read again, and both others kept.
    let (method, path, body, send) = next(&mut handle).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, "/apis/weft.dev/v1alpha1/networks/b")
    );
    assert_eq!(
        body,
        json!({"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "4"}})
    );
    respond(
        send,
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    );
    let (method, path, _, send) = next(&mut handle).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::GET, "/apis/weft.dev/v1alpha1/networks/b")
    );
    respond(
        send,
        200,
        &network(
            "b",
            &["weft.dev/cleanup", "example.com/keep", "example.com/new"],
            "7",
        ),
    );
    let (method, _, body, send) = next(&mut handle).await;
    assert_eq!(method, Method::PATCH);
    assert_eq!(
        body,
        json!({"metadata": {"finalizers": ["example.com/keep", "example.com/new"], "resourceVersion": "7"}})
    );
    respond(
        send,
        200,
        &network("b", &["example.com/keep", "example.com/new"], "8"),
    );
    // c has none: no request; two released.
    let released = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("done")
        .unwrap()
        .unwrap();
    assert_eq!(released, 2);
}

//! What the tests against a mocked API server (tower-test) share: the handle, an answer, and
//! the next request read whole.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::Value;
use std::time::Duration;

/// The mocked API server's side.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers a request with `status` and `body`.
pub fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

/// The next request (within 2 s): method, path and body.
pub async fn next(
    handle: &mut Handle,
) -> (
    Method,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(2), handle.next_request())
        .await
        .expect("timed out waiting for a request")
        .expect("service not called");
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (method, path, body, send)
}

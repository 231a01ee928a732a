//! Idle connections to the agent's metrics port cannot starve its CNI socket: the agent holds
//! at most a few HTTP connections at once (the rest wait in the kernel) and closes idle ones, so
//! an ADD's request is still served. Its own test binary: it lowers the process's descriptor
//! limit, which the other tests must not share.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weft_operator::agent::source::ManifestSource;

mod common;
use common::{config, isolate};

/// The process's descriptor limit: about twice the idle connections (without a cap the agent
/// holds one end of each, the test the other) plus the agent's own baseline would not fit.
const LIMIT: u64 = 300;
/// Within the listen backlog (somaxconn may be 128) plus the agent's cap, so that every
/// connect completes at once.
const IDLE_CONNECTIONS: usize = 150;

#[test]
fn many_idle_metrics_connections_leave_the_cni_socket_serving() {
    isolate();
    // A small descriptor budget for the whole process (the agent and these clients): without
    // a cap the agent would accept every idle connection and run out.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, LIMIT, LIMIT)
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(
        manifests.path().join("net.yaml"),
        "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: alpha}\nspec: {mode: NAT, subnets: [10.64.0.0/16]}\n",
    )
    .unwrap();
    let addr: SocketAddr = "127.0.0.1:9466".parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = state.path().join("agent.sock");
    rt.block_on(async {
        let agent = tokio::spawn(weft_operator::agent::run(
            config(state.path()),
            Box::new(ManifestSource::new(manifests.path())),
            Some(addr),
        ));
        // The agent is up once its socket answers.
        let ping = |socket: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || {
                weft_dataplane::proto::call(
                    &socket,
                    &weft_dataplane::proto::Request::Ping,
                    Duration::from_secs(5),
                )
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok(r)) = ping(socket.clone()).await
                && r.ready
            {
                break;
            }
            assert!(Instant::now() < deadline, "the agent never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Open connections to the metrics port and leave them idle.
        let mut idle = Vec::new();
        let mut refused = None;
        for _ in 0..IDLE_CONNECTIONS {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => idle.push(s),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The CNI's requests are still served, several in a row.
        for _ in 0..3 {
            let reply = ping(socket.clone()).await.unwrap();
            assert!(
                reply.as_ref().is_ok_and(|r| r.ok),
                "the CNI socket stopped serving: {reply:?}"
            );
        }
        assert!(
            refused.is_none(),
            "{} connections, then {refused:?}: the agent held them all",
            idle.len()
        );
        drop(idle);
        agent.abort();
    });
}

//! The agent's Unix socket: one JSON request line in, one JSON reply line out.

use super::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;
use weft_dataplane::proto::{Reply, Request};

/// Binds the socket (replacing a stale one), readable and writable by root only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts connections forever.
/// The agent's last snapshot of its resources (none before the first).
pub type Snapshot = Arc<std::sync::Mutex<Option<Arc<super::source::Resources>>>>;

/// Serves the CNI's requests: identity questions straight from `snapshot`, everything else
/// through the reconciler's queue `tx`.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<Message>,
    ready: Arc<AtomicBool>,
    snapshot: Snapshot,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tx = tx.clone();
                let ready = ready.clone();
                let snapshot = snapshot.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, tx, ready, snapshot).await {
                        debug!(error = %e, "cni connection ended");
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: UnixStream,
    tx: mpsc::Sender<Message>,
    ready: Arc<AtomicBool>,
    snapshot: Snapshot,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::error(ready.load(Ordering::SeqCst), format!("bad request: {e}")),
        Ok(Request::Identity {
            namespace,
            name,
            vm,
        }) => {
            let res = snapshot.lock().ok().and_then(|s| s.clone());
            super::identity_reply(
                res.as_deref(),
                ready.load(Ordering::SeqCst),
                &namespace,
                &name,
                vm.as_deref(),
            )
        }
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx
                .send(Message {
                    request,
                    reply: reply_tx,
                })
                .await
                .is_err()
            {
                Reply::error(false, "the agent is shutting down")
            } else {
                reply_rx
                    .await
                    .unwrap_or_else(|_| Reply::error(false, "the agent dropped the request"))
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

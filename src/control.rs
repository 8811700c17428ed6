//! The control socket: how admin commands reach a running relay.
//!
//! A Unix socket in the data dir, mode 0600, so only the relay's own user can use it. One JSON
//! request line in, one JSON response line out. It exists because sled allows a single process per
//! database, and because a running relay must drop its cached token when a grant changes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::{AdminContext, Request, Response};

const MAX_REQUEST: u64 = 1 << 20;

/// Binds the socket, replacing a stale one left by a relay that did not shut down cleanly.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another relay is already running with this data_dir (control socket {} answers); stop it first",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict control socket {}: {e}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, ctx: Arc<AdminContext>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(request) => crate::admin::execute(&ctx, request).await,
                Err(e) => Response {
                    ok: false,
                    text: format!("bad control request: {e}"),
                },
            };
            if let Ok(mut json) = serde_json::to_string(&response) {
                json.push('\n');
                let _ = write.write_all(json.as_bytes()).await;
            }
        });
    }
}

/// Sends `request` to a running relay; `None` when no relay listens on `path`.
pub async fn call(path: &Path, request: &Request) -> Result<Option<Response>, String> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "cannot reach the running relay at {}: {e}",
                path.display()
            ))
        }
    };
    let (read, mut write) = stream.into_split();
    let mut json = serde_json::to_string(request).map_err(|e| e.to_string())?;
    json.push('\n');
    write
        .write_all(json.as_bytes())
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| format!("control socket {}: unreadable answer: {e}", path.display()))
}

//! The command line's end of the control socket.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::wire::{Request, Response};
use super::MAX_MESSAGE;

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
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "cannot reach the running relay at {}: {e}; admin commands run as the relay's user \
                 (e.g. `sudo -u xoauth-relay XOAUTH_RELAY_CONFIG=/etc/xoauth-relay/relay.toml \
                 xoauth-relay ...`)",
                path.display()
            ))
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
    BufReader::new(read.take(MAX_MESSAGE))
        .read_line(&mut line)
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| format!("control socket {}: unreadable answer: {e}", path.display()))
}

/// The process id of the relay listening on `path`, if one does (from the socket's peer
/// credentials: no request needed).
pub async fn running_pid(path: &Path) -> Option<i32> {
    let stream = UnixStream::connect(path).await.ok()?;
    stream.peer_cred().ok()?.pid()
}

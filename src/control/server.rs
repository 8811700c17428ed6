//! The relay's end of the control socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{Request, Response};
use super::MAX_MESSAGE;
use crate::util::BoxFuture;

/// Whoever carries out control requests (the admin room, wired in by the app).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> BoxFuture<'_, Response>;
}

/// Binds the socket, replacing a stale one left by a relay that did not shut down cleanly (and
/// never anything at that path that is not a socket). It is created `0600` from the start: the
/// umask is tightened around `bind`, so there is no moment at which another user could connect.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "control socket {} exists and is not a socket; move it away or set [server] control_socket \
                 to another path",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another relay is already running with this data_dir (control socket {} answers); stop it first",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let private = rustix::fs::Mode::from_raw_mode(0o077);
    let old = rustix::process::umask(private);
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener =
        bound.map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict control socket {}: {e}", path.display()))?;
    Ok(listener)
}

/// Whether a peer may use the control socket: the relay's own user, or root.
fn trusted(stream: &UnixStream) -> bool {
    let me = rustix::process::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == me || cred.uid() == 0)
}

/// Serves requests until `stop`; each request runs as a task in `tracker`.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !trusted(&stream) {
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            tracing::warn!(
                uid,
                "control socket: a connection from another user refused"
            );
            continue;
        }
        tracker.spawn(answer(stream, handler.clone()));
    }
}

async fn answer(stream: UnixStream, handler: Arc<dyn Handler>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handler.handle(request).await,
        Err(e) => Response::fail(format!("bad control request: {e}")),
    };
    if let Ok(mut json) = serde_json::to_string(&response) {
        json.push('\n');
        let _ = write.write_all(json.as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_and_a_file_in_its_place_is_never_deleted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_file(&path).unwrap();
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let stream = UnixStream::connect(&path).await.unwrap();
        assert!(trusted(&stream), "our own user");
        // A second relay on it is told so, and the live socket stays.
        let err = bind(&path).unwrap_err();
        assert!(err.contains("already running"), "{err}");
    }
}

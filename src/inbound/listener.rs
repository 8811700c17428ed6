//! The listeners: accept, admit (the connection limit), and hand each connection to
//! [`connection`](super::connection). Sessions run in the app's task tracker, so shutdown can wait
//! for them and cut what is left.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::connection::{self, Shared};
use crate::config::TlsMode;
use crate::smtp::Reply;

/// A bound listener and the TLS mode of its port.
pub struct Listener {
    pub tcp: TcpListener,
    pub mode: TlsMode,
    /// The address as configured (`127.0.0.1:587`), which names it in logs and metrics.
    pub configured: SocketAddr,
}

impl Listener {
    pub async fn bind(address: SocketAddr, mode: TlsMode) -> Result<Listener, String> {
        let tcp = TcpListener::bind(address).await.map_err(|e| {
            format!("cannot listen on {address} ({e}); change [[listeners]] address or stop what uses the port")
        })?;
        Ok(Listener {
            tcp,
            mode,
            configured: address,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }
}

/// What all accept loops share: the connection slots and session ids.
pub struct Admission {
    permits: Arc<Semaphore>,
    ids: AtomicU64,
    tracker: TaskTracker,
}

impl Admission {
    pub fn new(max_connections: usize, tracker: TaskTracker) -> Arc<Admission> {
        Arc::new(Admission {
            permits: Arc::new(Semaphore::new(max_connections)),
            ids: AtomicU64::new(1),
            tracker,
        })
    }
}

/// Accepts until the relay stops. Accept errors (out of file descriptors and the like) back off
/// instead of spinning.
pub async fn accept_loop(listener: Listener, shared: Arc<Shared>, admission: Arc<Admission>) {
    if let Some(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = %listener.mode, "listening");
    }
    let stop = shared.stop.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.tcp.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = admission.permits.clone().try_acquire_owned() else {
            admission.tracker.spawn(async move {
                let mut tcp = tcp;
                let reply = Reply::new(421, "4.3.2 Too many connections, try again later");
                let _ = tcp.write_all(&reply.to_bytes()).await;
                let _ = tcp.shutdown().await;
            });
            tracing::warn!(%peer, "connection refused: max_connections reached");
            continue;
        };
        let id = admission.ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let mode = listener.mode;
        admission.tracker.spawn(async move {
            connection::handle(shared, Box::new(tcp), peer, mode, id).await;
            drop(permit);
        });
    }
}

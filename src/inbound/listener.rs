//! The listeners: accept, admit (the connection limit), and hand each connection to
//! [`connection`](super::connection). Sessions run in the app's task tracker, so shutdown can wait
//! for them and cut what is left.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::connection;
use super::shared::Shared;
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
        let tcp = TcpListener::bind(address)
            .await
            .map_err(|e| bind_error("[[listeners]] address", address, &e))?;
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

/// Accepts until the relay stops. Accept errors (out of file descriptors and the like) back off
/// instead of spinning.
pub async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let admission = shared.admission.clone();
    if let Some(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = %listener.mode, "listening");
    }
    let stop = shared.stop.clone();
    let label = listener.configured.to_string();
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
        let mode = listener.mode;
        let Some(ip_permit) = admission.admit_ip(peer.ip()) else {
            let reply = Reply::new(
                421,
                "4.7.0 Too many connections from your address, try again later",
            );
            admission.refuse(tcp, mode, reply);
            tracing::warn!(%peer, "connection refused: max_connections_per_ip reached");
            continue;
        };
        let Some(permit) = admission.admit() else {
            let reply = Reply::new(421, "4.3.2 Too many connections, try again later");
            admission.refuse(tcp, mode, reply);
            tracing::warn!(%peer, "connection refused: max_connections reached");
            continue;
        };
        let id = admission.ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let active = shared.observer.metrics.session(&label);
        admission.tracker.spawn(async move {
            connection::handle(shared, Box::new(tcp), peer, mode, id).await;
            drop(active);
            drop(permit);
            drop(ip_permit);
        });
    }
}

/// Why a port could not be bound, with the fix for that reason.
pub fn bind_error(key: &str, address: SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot listen on {address} ({e}): ports below 1024 need root or CAP_NET_BIND_SERVICE (the \
             systemd unit grants it); use a port above 1024 in {key}, or grant the capability"
        ),
        std::io::ErrorKind::AddrInUse => format!(
            "cannot listen on {address} ({e}); change {key} or stop what uses the port"
        ),
        _ => format!("cannot listen on {address} ({e}); check {key}"),
    }
}

//! The listeners: accept, admit (the connection limit), and hand each connection to
//! [`connection`](super::connection). Sessions run in the app's task tracker, so shutdown can wait
//! for them and cut what is left.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::connection::{self, Shared};
use crate::config::TlsMode;
use crate::smtp::Reply;
use crate::util::sync::lock;

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

/// What all accept loops share: the connection slots, the per-address counts, session ids.
pub struct Admission {
    /// Connections open now, and `max_connections` (a reload may change it).
    open: AtomicUsize,
    max: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: AtomicUsize,
    ids: AtomicU64,
    tracker: TaskTracker,
}

/// One connection counted against `max_connections` until dropped.
struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection counted against its address until dropped.
struct IpSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.admission.per_ip);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(max_connections: usize, max_per_ip: usize, tracker: TaskTracker) -> Arc<Admission> {
        Arc::new(Admission {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max_connections),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: AtomicUsize::new(max_per_ip),
            ids: AtomicU64::new(1),
            tracker,
        })
    }

    /// Counts a connection from `ip` (IPv4-mapped IPv6 as IPv4, IPv6 per /64, the smallest block a
    /// host is given), or `None` past the limit.
    fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = super::lockout::source_key(ip);
        let mut counts = lock(&self.per_ip);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            admission: self.clone(),
            ip,
        })
    }

    /// New limits (a reload); connections already open stay.
    pub fn set_limits(&self, max_connections: usize, max_per_ip: usize) {
        self.max.store(max_connections, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// A connection slot under `max_connections`, or `None` at the limit.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.clone()))
    }

    /// Turns a connection away: a `421` on a clear-text port; on an implicit-TLS port only a close,
    /// since clear text there is garbage to a TLS client.
    fn refuse(&self, mut tcp: tokio::net::TcpStream, mode: TlsMode, reply: Reply) {
        if mode == TlsMode::Implicit {
            return drop(tcp);
        }
        self.tracker.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = tcp.write_all(&reply.to_bytes()).await;
                let _ = tcp.shutdown().await;
            })
            .await;
        });
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
        let Some(ip_slot) = admission.admit_ip(peer.ip()) else {
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
        let active = shared.upstream.observer.metrics.session(&label);
        admission.tracker.spawn(async move {
            connection::handle(shared, Box::new(tcp), peer, mode, id).await;
            drop(active);
            drop(permit);
            drop(ip_slot);
        });
    }
}

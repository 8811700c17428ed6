//! Admission: the connection slots (`max_connections`) and the per-address counts
//! (`max_connections_per_ip`) every accept loop shares, and the session ids.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_util::task::TaskTracker;

use crate::config::TlsMode;
use crate::smtp::Reply;
use crate::util::sync::lock;

/// What all accept loops share: the connection slots, the per-address counts, session ids.
pub struct Admission {
    /// Connections open now, and `max_connections` (a reload may change it).
    open: AtomicUsize,
    max: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: AtomicUsize,
    pub(super) ids: AtomicU64,
    pub(super) tracker: TaskTracker,
}

/// One connection counted against `max_connections` until dropped.
pub(super) struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection counted against its address until dropped.
pub(super) struct IpPermit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpPermit {
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
    pub(super) fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpPermit> {
        let ip = super::lockout::source_key(ip);
        let mut counts = lock(&self.per_ip);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(IpPermit {
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
    pub(super) fn admit(self: &Arc<Self>) -> Option<Permit> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(self.clone()))
    }

    /// Turns a connection away: a `421` on a clear-text port; on an implicit-TLS port only a close,
    /// since clear text there is garbage to a TLS client.
    pub(super) fn refuse(&self, mut tcp: tokio::net::TcpStream, mode: TlsMode, reply: Reply) {
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

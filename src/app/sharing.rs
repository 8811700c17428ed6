//! Where the rooms meet the store several relays share, for what the rooms do not know about:
//! failed-login counts (inbound) counted across relays, and idle connections (delivery) given
//! up when another relay waits for a slot. The store carries rows and signals; the rules stay in
//! their rooms (`inbound::lockout`, `delivery::pool`).

use std::net::IpAddr;
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use crate::delivery::pool::Pool;
use crate::inbound::lockout::WINDOW;
use crate::inbound::shared::Shared as Inbound;
use crate::store::Shared;

/// A failure count as the relays share it: when each failure was (unix ms), and until when the
/// key is locked out.
#[derive(Default, Serialize, Deserialize)]
struct Count {
    failures: Vec<u64>,
    locked_until: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Counts one failure of `key` under `limit`; whether this one reached it.
async fn count(store: &dyn Shared, kind: &str, key: &str, limit: usize, lockout_ms: u64) -> bool {
    let now = unix_ms();
    let mut reached = false;
    let mut change = |old: Option<&[u8]>| {
        let mut c: Count = old
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        c.failures.retain(|t| t + WINDOW.as_millis() as u64 > now);
        c.failures.push(now);
        if c.failures.len() >= limit && c.locked_until <= now {
            c.locked_until = now + lockout_ms;
            c.failures.clear();
            reached = true;
        }
        serde_json::to_vec(&c).ok()
    };
    if let Err(e) = store.update_row(kind, key, &mut change).await {
        tracing::debug!(error = %e, "failed login not counted across relays");
        return false;
    }
    reached
}

/// Failed logins counted across relays too: a limit reached by the relays together locks the
/// address (or the login from it) out on every relay, through a signal each one applies.
pub(super) fn share_lockouts(inbound: &Arc<Inbound>, store: Arc<dyn Shared>) {
    let reporter = store.clone();
    let weak = Arc::downgrade(inbound);
    inbound
        .lockout
        .set_report(Box::new(move |ip: IpAddr, login: &str| {
            let Some(inbound) = weak.upgrade() else {
                return;
            };
            let (per_login, per_ip, lockout) = inbound.lockout.limits();
            let lockout_ms = lockout.as_millis() as u64;
            let store = reporter.clone();
            let login_key = serde_json::to_string(&(ip, login)).unwrap_or_default();
            tokio::spawn(async move {
                if per_login > 0
                    && count(&*store, "fail-login", &login_key, per_login, lockout_ms).await
                {
                    store.signal("lock-login", &login_key).await;
                }
                let ip_key = ip.to_string();
                if per_ip > 0 && count(&*store, "fail-ip", &ip_key, per_ip, lockout_ms).await {
                    store.signal("lock-ip", &ip_key).await;
                }
            });
        }));
    let mut signals = store.signals();
    let weak = Arc::downgrade(inbound);
    tokio::spawn(async move {
        loop {
            let (kind, key) = match signals.recv().await {
                Ok(signal) => signal,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let Some(inbound) = weak.upgrade() else {
                return;
            };
            let now = tokio::time::Instant::now();
            match kind.as_str() {
                "lock-ip" => {
                    if let Ok(ip) = key.parse::<IpAddr>() {
                        tracing::warn!(address = %ip, "address locked out: too many failed logins across the relays");
                        inbound.lockout.lock(ip, None, now);
                    }
                }
                "lock-login" => {
                    if let Ok((ip, login)) = serde_json::from_str::<(IpAddr, String)>(&key) {
                        tracing::warn!(address = %ip, login, "login locked out at this address: too many failed logins across the relays");
                        inbound.lockout.lock(ip, Some(&login), now);
                    }
                }
                "unlock" => {
                    let ip = key.parse::<IpAddr>().ok();
                    inbound.lockout.unlock(ip, now);
                }
                _ => {}
            }
        }
    });
}

/// `unlock` on one relay lifts the lockout on all of them.
pub(super) fn announce_unlock(store: &Arc<dyn Shared>, address: Option<IpAddr>) {
    let store = store.clone();
    let key = address.map_or_else(|| "*".to_string(), |ip| ip.to_string());
    tokio::spawn(async move { store.signal("unlock", &key).await });
}

/// Another relay waits for a slot of an account: an idle connection here gives its slot up.
pub(super) fn follow_wants(store: &Arc<dyn Shared>, pool: Weak<Pool>) {
    let mut signals = store.signals();
    tokio::spawn(async move {
        loop {
            let account = match signals.recv().await {
                Ok((kind, account)) if kind == "want" => account,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let Some(pool) = pool.upgrade() else { return };
            pool.yield_idle(&account);
        }
    });
}

//! Time-limited claims in the database: an account's refresh lease and a relay's registration.
//!
//! Both are rows with a holder and an expiry, taken by one conditional upsert (taken when free,
//! expired, or already ours), so a relay that dies holding one loses it after `lease_secs`
//! without anyone cleaning up.

use std::collections::HashMap;
use std::time::Duration;

use super::{describe_pool, PgStore};
use crate::store::StoreError;

/// How often a relay waiting for another's refresh looks again: a refresh takes a token request
/// (tens to hundreds of milliseconds), so waiters see the new token soon after it is stored.
const LEASE_POLL: Duration = Duration::from_millis(25);

/// The refresh lease of one account, released (in the background) when dropped.
pub struct Lease {
    release: Option<(
        deadpool_postgres::Pool,
        String,
        String,
        tokio::runtime::Handle,
    )>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some((pool, account, holder, handle)) = self.release.take() {
            handle.spawn(async move {
                if let Ok(client) = pool.get().await {
                    let _ = client
                        .execute(
                            "DELETE FROM xoauth_refresh_leases WHERE account = $1 AND holder = $2",
                            &[&account, &holder],
                        )
                        .await;
                }
            });
        }
    }
}

impl PgStore {
    /// Takes `account`'s refresh lease, waiting while another relay holds it; gives up (an error
    /// the session turns into `454`) once the holder has had it longer than a lease lasts.
    pub(super) async fn take_lease(&self, account: &str) -> Result<Lease, StoreError> {
        let give_up = tokio::time::Instant::now() + self.lease + Duration::from_secs(5);
        let secs = self.lease.as_secs_f64();
        loop {
            let client = self.client().await?;
            let taken = client
                .query_opt(
                    "INSERT INTO xoauth_refresh_leases (account, holder, until) \
                     VALUES ($1, $2, now() + make_interval(secs => $3)) \
                     ON CONFLICT (account) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
                     WHERE xoauth_refresh_leases.until < now() OR xoauth_refresh_leases.holder = EXCLUDED.holder \
                     RETURNING holder",
                    &[&account, &self.holder, &secs],
                )
                .await
                .map_err(|e| self.failed("taking the refresh lease", &e))?;
            drop(client);
            if taken.is_some() {
                return Ok(Lease {
                    release: Some((
                        self.pool.clone(),
                        account.to_string(),
                        self.holder.clone(),
                        self.handle.clone(),
                    )),
                });
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(StoreError(format!(
                    "account `{account}`: another relay has been refreshing its token for over {} s",
                    self.lease.as_secs()
                )));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Registers this relay under its instance name, or says which live relay holds the name.
    pub(super) async fn register(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let secs = self.lease.as_secs_f64();
        let host = crate::util::hostname();
        let pid = std::process::id() as i32;
        let taken = client
            .query_opt(
                "INSERT INTO xoauth_relays (instance, holder, host, pid, version, started_at, seen_at) \
                 VALUES ($1, $2, $3, $4, $5, now(), now()) \
                 ON CONFLICT (instance) DO UPDATE SET holder = EXCLUDED.holder, host = EXCLUDED.host, \
                   pid = EXCLUDED.pid, version = EXCLUDED.version, \
                   started_at = CASE WHEN xoauth_relays.holder = EXCLUDED.holder THEN xoauth_relays.started_at ELSE now() END, \
                   seen_at = now() \
                 WHERE xoauth_relays.seen_at < now() - make_interval(secs => $6) \
                   OR xoauth_relays.holder = EXCLUDED.holder \
                 RETURNING holder",
                &[
                    &self.instance,
                    &self.holder,
                    &host,
                    &pid,
                    &env!("CARGO_PKG_VERSION"),
                    &secs,
                ],
            )
            .await
            .map_err(|e| self.failed("registering this relay", &e))?;
        if taken.is_some() {
            return Ok(());
        }
        let row = client
            .query_opt(
                "SELECT host, pid, extract(epoch FROM now() - seen_at)::float8 FROM xoauth_relays WHERE instance = $1",
                &[&self.instance],
            )
            .await
            .map_err(|e| self.failed("registering this relay", &e))?;
        let (host, pid, ago): (String, i32, f64) = row
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap_or_default();
        Err(StoreError(format!(
            "another relay named `{}` is alive on database {} (pid {pid} on host {host}, seen {:.0} s ago); \
             give each relay its own [store] instance, or stop the other one (its name is free {} s after it stops \
             answering)",
            self.instance,
            self.target.shown,
            ago.max(0.0),
            self.lease.as_secs()
        )))
    }

    /// Says this relay is still alive; `false` if its registration was taken over meanwhile.
    pub(super) async fn heartbeat(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE xoauth_relays SET seen_at = now() WHERE instance = $1 AND holder = $2",
                &[&self.instance, &self.holder],
            )
            .await
            .map_err(|e| self.failed("the relay's heartbeat", &e))?;
        Ok(n == 1)
    }

    /// Gives up the registration and any lease this relay still holds (a clean stop).
    pub(super) async fn unregister(&self) {
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "DELETE FROM xoauth_relays WHERE instance = $1 AND holder = $2",
                    &[&self.instance, &self.holder],
                )
                .await;
            // Leases, slots and claims too: the others need not wait for them to run out.
            for sql in [
                "DELETE FROM xoauth_refresh_leases WHERE holder = $1",
                "DELETE FROM xoauth_slots WHERE holder = $1",
                "UPDATE xoauth_queue SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = $1",
            ] {
                let _ = client.execute(sql, &[&self.holder]).await;
            }
        }
    }

    /// What each live relay holds: (instance, queued messages it owns, messages it is sending,
    /// upstream connection slots, refresh leases).
    pub(super) async fn holdings(
        &self,
    ) -> Result<HashMap<String, (i64, i64, i64, i64)>, StoreError> {
        let client = self.pool.get().await.map_err(|e| describe_pool(&e))?;
        let rows = client
            .query(
                "SELECT r.instance, \
                   (SELECT count(*) FROM xoauth_queue q WHERE q.owner = r.instance), \
                   (SELECT count(*) FROM xoauth_queue q WHERE q.claimed_by = r.holder AND q.claim_until > now()), \
                   (SELECT count(*) FROM xoauth_slots s WHERE s.holder = r.holder AND s.until > now()), \
                   (SELECT count(*) FROM xoauth_refresh_leases l WHERE l.holder = r.holder AND l.until > now()) \
                 FROM xoauth_relays r",
                &[],
            )
            .await
            .map_err(|e| self.failed("listing what relays hold", &e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
            .collect())
    }

    /// The relays seen alive within a lease: (instance, host, pid, seconds since seen).
    pub(super) async fn live_relays(&self) -> Result<Vec<(String, String, i32, f64)>, StoreError> {
        let client = self.pool.get().await.map_err(|e| describe_pool(&e))?;
        let rows = client
            .query(
                "SELECT instance, host, pid, extract(epoch FROM now() - seen_at)::float8 FROM xoauth_relays \
                 WHERE seen_at >= now() - make_interval(secs => $1) ORDER BY instance",
                &[&self.lease.as_secs_f64()],
            )
            .await
            .map_err(|e| self.failed("listing relays", &e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

//! [`PgStore`] behind the store's two traits: [`GrantStore`] (reads from the mirror, writes on
//! the blocking pool) and [`Shared`] (what several relays add).

use tokio::sync::broadcast;

use super::{Change, Lease, PgStore, CHANNEL};
use crate::store::{Grant, GrantStore, Shared, Status, StoreError};
use crate::util::sync::lock;
use crate::util::BoxFuture;

impl GrantStore for PgStore {
    fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        let sealed = {
            let m = lock(&self.mirror);
            if !m.loaded {
                let why = lock(&self.trouble).clone().unwrap_or_default();
                return Err(StoreError(format!(
                    "database {} not reached yet: {why}",
                    self.target.shown
                )));
            }
            m.grants.get(account).cloned()
        };
        sealed
            .map(|s| self.sealer.open_grant(account, &s))
            .transpose()
    }

    fn put(&self, account: &str, grant: &Grant) -> Result<(), StoreError> {
        let sealed = self.sealer.seal_grant(account, grant)?;
        self.blocking(self.put_async(account, sealed))
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        self.blocking(self.remove_async(account))
    }

    fn status(&self, account: &str) -> Status {
        lock(&self.mirror)
            .status
            .get(account)
            .cloned()
            .unwrap_or_default()
    }

    fn update_status(&self, account: &str, f: &dyn Fn(&mut Status)) {
        let mut m = lock(&self.mirror);
        let old = m.status.get(account).cloned().unwrap_or_default();
        let mut new = old.clone();
        f(&mut new);
        if new == old {
            return;
        }
        let mut dirty = lock(&self.dirty);
        let p = dirty.entry(account.to_string()).or_default();
        if new.last_use != old.last_use {
            p.last_use = p.last_use.max(new.last_use);
        }
        if new.last_error != old.last_error {
            p.last_error = Some(new.last_error.clone());
        }
        if new.revoked != old.revoked {
            p.revoked = Some(new.revoked);
        }
        m.status.insert(account.to_string(), new);
    }

    fn flush(&self) -> Result<(), StoreError> {
        if lock(&self.dirty).is_empty() {
            return Ok(());
        }
        self.blocking(self.flush_async())
    }
}

impl Shared for PgStore {
    fn lease<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(self.take_lease(account))
    }

    fn current<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<Grant>, StoreError>> {
        Box::pin(async move {
            self.reload(account)
                .await?
                .map(|s| self.sealer.open_grant(account, &s))
                .transpose()
        })
    }

    fn replaced<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.replaced_async(account))
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn trouble(&self) -> Option<String> {
        lock(&self.trouble)
            .clone()
            .map(|why| format!("database {} unreachable: {why}", self.target.shown))
    }

    fn relays(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let holdings = self.holdings().await.unwrap_or_default();
            Ok(self
                .live_relays()
                .await?
                .into_iter()
                .map(|(instance, host, pid, ago)| {
                    let me = if instance == self.instance { " (this one)" } else { "" };
                    let (queued, sending, slots, leases) =
                        holdings.get(&instance).copied().unwrap_or_default();
                    format!(
                        "{instance}{me}: pid {pid} on {host}, seen {ago:.0} s ago; {queued} queued, \
                         {sending} being sent, {slots} upstream connection(s), {leases} token refresh(es)"
                    )
                })
                .collect())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop.cancel();
            self.unregister().await;
        })
    }

    fn database(&self) -> &str {
        self.shown()
    }

    fn relays_seen(&self) -> usize {
        self.relays_seen
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1)
    }

    fn update_row<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
        change: Change<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.update_row(kind, key, change))
    }

    fn read_row<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(self.read_row(kind, key))
    }

    fn read_rows<'a>(
        &'a self,
        kind: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::store::Record>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT key, value FROM xoauth_rows WHERE kind = $1 AND value IS NOT NULL",
                    &[&kind],
                )
                .await
                .map_err(|e| self.error("reading shared state", &e))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn take_slot<'a>(
        &'a self,
        account: &'a str,
        cap: usize,
    ) -> BoxFuture<'a, Result<(Option<i64>, usize), StoreError>> {
        Box::pin(self.take_slot(account, cap))
    }

    fn free_slot(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.free_slot(id))
    }

    fn renew_slots(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.renew_slots(&ids).await })
    }

    fn slots_of_others(&self) -> BoxFuture<'_, Result<Vec<(String, usize)>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT account, count(*) FROM xoauth_slots WHERE holder <> $1 AND until > now() \
                     GROUP BY account",
                    &[&self.holder()],
                )
                .await
                .map_err(|e| self.error("counting connection slots", &e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as usize))
                .collect())
        })
    }

    fn lease_time(&self) -> std::time::Duration {
        self.lease()
    }

    fn signal<'a>(&'a self, kind: &'static str, account: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(client) = self.pool.get().await {
                let _ = client
                    .execute(
                        "SELECT pg_notify($1, $2)",
                        &[&CHANNEL, &format!("{kind}:{account}")],
                    )
                    .await;
            }
        })
    }

    fn signals(&self) -> broadcast::Receiver<(String, String)> {
        self.signals.subscribe()
    }

    fn others_state<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT value FROM xoauth_rows WHERE kind LIKE 'state:%' AND kind <> $1 \
                     AND key = $2 AND value IS NOT NULL",
                    &[&format!("state:{}", self.instance), &name],
                )
                .await
                .map_err(|e| self.failed("reading other relays' state", &e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }
}

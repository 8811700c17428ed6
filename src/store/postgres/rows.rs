//! Small shared records every relay reads and writes in one transaction: pacing usage, pauses,
//! lockout counts, usage figures. The caller's rules run on the row's bytes under `FOR UPDATE`,
//! so two relays never both count from the same old value.

use super::PgStore;
use crate::store::StoreError;

/// `f` sees the row's bytes (`None`: no row yet) and returns what to write (`None`: leave it).
pub type Change<'a> = &'a mut (dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send);

impl PgStore {
    pub(super) async fn update_row(
        &self,
        kind: &str,
        key: &str,
        f: Change<'_>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("updating shared state", &e))?;
        // The row must exist to be locked: two relays inserting it at once meet on the key.
        tx.execute(
            "INSERT INTO xoauth_rows (kind, key, value) VALUES ($1, $2, NULL) ON CONFLICT DO NOTHING",
            &[&kind, &key],
        )
        .await
        .map_err(|e| self.failed("updating shared state", &e))?;
        let row = tx
            .query_one(
                "SELECT value FROM xoauth_rows WHERE kind = $1 AND key = $2 FOR UPDATE",
                &[&kind, &key],
            )
            .await
            .map_err(|e| self.failed("updating shared state", &e))?;
        let old: Option<Vec<u8>> = row.get(0);
        if let Some(new) = f(old.as_deref()) {
            tx.execute(
                "UPDATE xoauth_rows SET value = $3, updated_at = now() WHERE kind = $1 AND key = $2",
                &[&kind, &key, &new],
            )
            .await
            .map_err(|e| self.failed("updating shared state", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| self.failed("updating shared state", &e))
    }

    pub(super) async fn read_row(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT value FROM xoauth_rows WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )
            .await
            .map_err(|e| self.failed("reading shared state", &e))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Takes one of `account`'s connection slots if the relays together hold fewer than `cap`;
    /// the slot's id (`None` at the cap), and how many were held before. Serialized per account
    /// by an advisory lock.
    pub(super) async fn take_slot(
        &self,
        account: &str,
        cap: usize,
    ) -> Result<(Option<i64>, usize), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("taking a connection slot", &e))?;
        let err = |e| self.failed("taking a connection slot", &e);
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('xoauth-slots:' || $1))",
            &[&account],
        )
        .await
        .map_err(err)?;
        let held: i64 = tx
            .query_one(
                "SELECT count(*) FROM xoauth_slots WHERE account = $1 AND until > now()",
                &[&account],
            )
            .await
            .map_err(err)?
            .get(0);
        let before = held.max(0) as usize;
        if before >= cap {
            return Ok((None, before));
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO xoauth_slots (account, holder, until) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING id",
                &[&account, &self.holder, &self.lease.as_secs_f64()],
            )
            .await
            .map_err(err)?
            .get(0);
        tx.commit().await.map_err(err)?;
        Ok((Some(id), before))
    }

    pub(super) async fn free_slot(&self, id: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM xoauth_slots WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.failed("freeing a connection slot", &e))?;
        Ok(())
    }

    /// The slots `ids` stay this relay's (renewed every third of a lease while held; a slot
    /// whose release failed is not among them, and runs out).
    pub(super) async fn renew_slots(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE xoauth_slots SET until = now() + make_interval(secs => $2) \
                 WHERE holder = $1 AND id = ANY($3)",
                &[&self.holder, &self.lease.as_secs_f64(), &ids],
            )
            .await
            .map_err(|e| self.failed("renewing connection slots", &e))?;
        Ok(())
    }
}

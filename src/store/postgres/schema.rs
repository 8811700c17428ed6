//! The schema, embedded, and its migrations: run at start under a transaction-scoped advisory
//! lock, so two relays starting at once migrate one after the other (the second finds nothing to
//! do). Tables carry an `xoauth_` prefix: the database may be shared with other software.

use tokio_postgres::GenericClient;

use crate::store::StoreError;

/// The advisory lock's key: any fixed number other software is unlikely to pick ("xoauth" in
/// ASCII).
const MIGRATION_LOCK: i64 = 0x786f_6175_7468;

/// Each entry takes the schema from its index to the next version; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: grants and status as sled keeps them, the refresh leases and the relays' registry.
    r#"
    CREATE TABLE xoauth_grants (
        account     text PRIMARY KEY,
        sealed      bytea NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        updated_by  text NOT NULL
    );
    CREATE TABLE xoauth_grant_status (
        account     text PRIMARY KEY,
        last_use    bigint,
        last_error  text,
        revoked     boolean NOT NULL DEFAULT false
    );
    CREATE TABLE xoauth_refresh_leases (
        account     text PRIMARY KEY,
        holder      text NOT NULL,
        until       timestamptz NOT NULL
    );
    CREATE TABLE xoauth_relays (
        instance    text PRIMARY KEY,
        holder      text NOT NULL,
        host        text NOT NULL,
        pid         integer NOT NULL,
        version     text NOT NULL,
        started_at  timestamptz NOT NULL,
        seen_at     timestamptz NOT NULL
    );
    "#,
    // 2: shared records (pacing, pauses, lockouts, usage) and connection slots.
    r#"
    CREATE TABLE xoauth_rows (
        kind        text NOT NULL,
        key         text NOT NULL,
        value       bytea,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, key)
    );
    CREATE TABLE xoauth_slots (
        id          bigserial PRIMARY KEY,
        account     text NOT NULL,
        holder      text NOT NULL,
        until       timestamptz NOT NULL
    );
    CREATE INDEX xoauth_slots_account ON xoauth_slots (account, until);
    "#,
    // 3: the queue: messages with their progress, bodies in chunks, claims while a relay sends.
    r#"
    CREATE TABLE xoauth_queue (
        id          text PRIMARY KEY,
        account     text NOT NULL,
        owner       text NOT NULL,
        envelope    bytea NOT NULL,
        progress    bytea,
        size        bigint NOT NULL,
        claimed_by  text,
        claim_until timestamptz,
        queued_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX xoauth_queue_owner ON xoauth_queue (owner);
    CREATE TABLE xoauth_queue_body (
        id          text NOT NULL REFERENCES xoauth_queue (id) ON DELETE CASCADE,
        seq         integer NOT NULL,
        data        bytea NOT NULL,
        PRIMARY KEY (id, seq)
    );
    "#,
];

/// The version this relay's schema has.
pub const CURRENT: i32 = MIGRATIONS.len() as i32;

fn db(what: &str, e: tokio_postgres::Error) -> StoreError {
    StoreError(format!("{what}: {}", super::describe(&e)))
}

/// Brings the schema to [`CURRENT`]; returns the version found before.
pub async fn migrate(client: &mut deadpool_postgres::Object) -> Result<i32, StoreError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db("database migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db("database migration lock", e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS xoauth_schema (version integer NOT NULL)")
        .await
        .map_err(|e| db("database migration", e))?;
    let found = version(&*tx).await?.unwrap_or(0);
    if found > CURRENT {
        return Err(StoreError(format!(
            "the database's schema is version {found}, newer than this relay knows ({CURRENT}): another \
             relay of a later release migrated it; upgrade this one to that release"
        )));
    }
    for (at, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(step)
            .await
            .map_err(|e| db(&format!("database migration to version {}", at + 1), e))?;
    }
    if found < CURRENT {
        tx.execute("DELETE FROM xoauth_schema", &[])
            .await
            .map_err(|e| db("database migration", e))?;
        tx.execute(
            "INSERT INTO xoauth_schema (version) VALUES ($1)",
            &[&CURRENT],
        )
        .await
        .map_err(|e| db("database migration", e))?;
    }
    tx.commit().await.map_err(|e| db("database migration", e))?;
    if found < CURRENT {
        tracing::info!(from = found, to = CURRENT, "database schema migrated");
    }
    Ok(found)
}

/// The schema's version, or `None` on a database this relay never touched.
pub async fn version(client: &impl GenericClient) -> Result<Option<i32>, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('xoauth_schema') IS NOT NULL", &[])
        .await
        .map_err(|e| db("reading the schema version", e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT version FROM xoauth_schema", &[])
        .await
        .map_err(|e| db("reading the schema version", e))?;
    Ok(Some(row.map(|r| r.get(0)).unwrap_or(0)))
}

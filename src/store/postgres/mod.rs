//! The grant store on PostgreSQL, shared by several relays.
//!
//! Grants are sealed exactly as in sled (the same [`Sealer`], the account as associated data), so
//! the database never sees a token in clear and a sealed value moves between backends as it is.
//! Each relay keeps a mirror of the grants and statuses in memory: a session's lookups cost no
//! round trip. Every change is announced with `NOTIFY xoauth_relay` in the transaction that makes
//! it, and each relay `LISTEN`s and reloads that account, so a grant stored, deleted or found
//! revoked on one relay is seen by the others within milliseconds; a relay whose listening
//! connection broke reloads everything when it is back. A refresh first takes the account's lease
//! ([`lease`]) and reads the grant from the database itself, so a token another relay just got is
//! used instead of asking the provider again.
//!
//! [`GrantStore`]'s writes come on the blocking pool (see [`crate::store::Store`]); they run their
//! queries there on the runtime's handle.

pub mod connect;
mod lease;
mod listen;
mod rows;
pub mod schema;
mod traits;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::connect::Target;
pub use self::lease::Lease;
pub use self::rows::Change;
use super::seal::Sealer;
use super::{Status, StoreError};
use crate::util::secret::Secret;
use crate::util::sync::lock;

const CHANNEL: &str = "xoauth_relay";

/// A value the first relay on a database seals (`xoauth_rows`, kind `key-check`): a relay with
/// another key cannot open it and is refused before it stores anything.
const KEY_CHECK: &str = "xoauth-relay key check";

/// Connections per relay: grant writes are few, but in queue mode every accepted message is a
/// commit, and commits in parallel share the database's fsync (group commit).
const POOL_SIZE: usize = 12;

/// How long a relay waits before reconnecting its listening connection, at most.
const RECONNECT_AT_MOST: Duration = Duration::from_secs(10);

/// What opening the store needs.
pub struct Settings {
    pub url: Secret,
    pub key_file: PathBuf,
    pub instance: String,
    pub lease: Duration,
    /// `serve`: register the instance, listen for changes, retry while the database is down.
    pub serve: bool,
}

#[derive(Default)]
struct Mirror {
    /// Everything was read at least once since the process started.
    loaded: bool,
    grants: HashMap<String, Vec<u8>>,
    status: HashMap<String, Status>,
}

/// Status fields changed here and not yet written: only those, so one relay's last-use update
/// never overwrites an error another relay recorded.
#[derive(Default, Clone)]
struct Patch {
    last_use: Option<u64>,
    last_error: Option<Option<String>>,
    revoked: Option<bool>,
}

pub struct PgStore {
    target: Target,
    key_file: PathBuf,
    /// The key file was made by this start (there was none).
    new_key: bool,
    pool: deadpool_postgres::Pool,
    sealer: Sealer,
    instance: String,
    /// Unique per process: a restarted relay of the same name is a new holder.
    holder: String,
    lease: Duration,
    handle: tokio::runtime::Handle,
    mirror: Mutex<Mirror>,
    dirty: Mutex<HashMap<String, Patch>>,
    changes: broadcast::Sender<String>,
    signals: broadcast::Sender<(String, String)>,
    trouble: Mutex<Option<String>>,
    stop: CancellationToken,
    /// Relays seen alive at the last heartbeat.
    relays_seen: std::sync::atomic::AtomicUsize,
    /// Registered once since the start (a later registration is a lost one made again).
    registered: std::sync::atomic::AtomicBool,
}

/// A database error as an operator reads it: the server's message, or why no connection came.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    }
}

fn describe_pool(e: &deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    StoreError(match e {
        PoolError::Backend(e) => describe(e),
        PoolError::Timeout(_) => format!(
            "no database connection within {} s",
            connect::CONNECT_TIMEOUT.as_secs()
        ),
        other => other.to_string(),
    })
}

impl PgStore {
    /// Connects, migrates, loads the mirror and (for `serve`) registers. `serve` starts with the
    /// database down (not ready, retrying); an admin command needs it now.
    pub async fn open(settings: Settings) -> Result<Arc<PgStore>, StoreError> {
        let target = Target::parse(settings.url.expose())?;
        let pool = target.pool(POOL_SIZE)?;
        let new_key = !settings.key_file.exists();
        let sealer = Sealer::from_key_file(&settings.key_file)?;
        let holder = format!(
            "{}/{}/{:08x}",
            settings.instance,
            std::process::id(),
            rand::random::<u32>()
        );
        let store = Arc::new(PgStore {
            target,
            key_file: settings.key_file,
            new_key,
            pool,
            sealer,
            instance: settings.instance,
            holder,
            lease: settings.lease,
            handle: tokio::runtime::Handle::current(),
            mirror: Mutex::new(Mirror::default()),
            dirty: Mutex::new(HashMap::new()),
            changes: broadcast::channel(64).0,
            signals: broadcast::channel(256).0,
            trouble: Mutex::new(None),
            stop: CancellationToken::new(),
            relays_seen: std::sync::atomic::AtomicUsize::new(1),
            registered: std::sync::atomic::AtomicBool::new(false),
        });
        match store.prepare(settings.serve).await {
            Ok(()) => {}
            // A name held by a live relay, or a schema from a later release: starting would be wrong.
            Err(Prepare::Refused(e)) => return Err(e),
            Err(Prepare::Unreachable(e)) if settings.serve => {
                tracing::warn!(database = %store.target.shown, error = %e, "database unreachable; starting not ready and retrying");
                store.set_trouble(Some(e.0));
            }
            Err(Prepare::Unreachable(e)) => {
                return Err(StoreError(format!(
                    "cannot reach the database {}: {e}; check [store] and that PostgreSQL is up",
                    store.target.shown
                )))
            }
        }
        if settings.serve {
            let weak = Arc::downgrade(&store);
            let stop = store.stop.clone();
            store.handle.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = listen::listen(weak) => {}
                }
            });
        }
        Ok(store)
    }

    /// Renews the registration; registers again if it was lost (unreachable longer than a
    /// lease, or the relay started with the database down), unless the relay is stopping.
    async fn keep_registered(&self) -> Result<(), StoreError> {
        if self.heartbeat().await? || self.stop.is_cancelled() {
            return Ok(());
        }
        if self
            .registered
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::error!(instance = %self.instance, "this relay's registration was lost (the database was out of reach longer than lease_secs); registering again");
        }
        self.register().await
    }

    /// The database answers: any trouble remembered is over.
    fn reachable(&self) {
        if lock(&self.trouble).take().is_some() {
            tracing::info!(database = %self.target.shown, "database reachable again");
        }
    }

    /// Failed-login counts older than any lockout can last (a guesser's random logins must not
    /// grow the table).
    async fn forget_old_counts(&self) {
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "DELETE FROM xoauth_rows WHERE kind IN ('fail-login', 'fail-ip') \
                     AND updated_at < now() - interval '1 day'",
                    &[],
                )
                .await;
        }
    }

    async fn count_relays(&self) -> Result<(), StoreError> {
        let n = self.live_relays().await?.len();
        self.relays_seen
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Where the database is, without the password: for messages.
    pub fn shown(&self) -> &str {
        &self.target.shown
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// This process among the relays (claims carry it).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// A pooled connection; a database out of reach is remembered as the store's trouble (every
    /// query of the store and the shared queue comes through here).
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.trouble_from(&e))
    }

    /// A failed query of the queue's, as the store words it (a lost connection is remembered as
    /// the database's trouble).
    pub fn error(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        self.failed(what, e)
    }

    fn set_trouble(&self, why: Option<String>) {
        *lock(&self.trouble) = why;
    }

    /// A failed query: remembered as the database's trouble when it is a lost connection.
    fn failed(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        let text = describe(e);
        if e.as_db_error().is_none() {
            self.set_trouble(Some(text.clone()));
        }
        StoreError(format!("database {}: {what}: {text}", self.target.shown))
    }

    fn trouble_from(&self, e: &deadpool_postgres::PoolError) -> StoreError {
        use deadpool_postgres::{PoolError, TimeoutType};
        // Every pooled connection busy (a burst) is not the database being down.
        let busy = matches!(e, PoolError::Timeout(TimeoutType::Wait));
        let e = describe_pool(e);
        if !busy {
            self.set_trouble(Some(e.0.clone()));
        }
        StoreError(format!("database {}: {e}", self.target.shown))
    }

    async fn prepare(&self, serve: bool) -> Result<(), Prepare> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Prepare::Unreachable(describe_pool(&e)))?;
        schema::migrate(&mut client).await.map_err(|e| {
            if e.0.contains("newer than this relay") {
                Prepare::Refused(e)
            } else {
                Prepare::Unreachable(e)
            }
        })?;
        drop(client);
        self.reload_all().await.map_err(Prepare::Unreachable)?;
        self.same_key().await?;
        if serve {
            self.registered
                .store(true, std::sync::atomic::Ordering::Release);
            self.register().await.map_err(|e| {
                if e.0.contains("is alive on database") {
                    Prepare::Refused(e)
                } else {
                    Prepare::Unreachable(e)
                }
            })?;
        }
        Ok(())
    }

    /// Every relay on the database must seal with the same key: one grant that does not open,
    /// or the database's key check (a value sealed by the first relay that started on it), means
    /// this relay's key_file is another one (or new), and it could use none of the grants.
    async fn same_key(&self) -> Result<(), Prepare> {
        let sample = lock(&self.mirror)
            .grants
            .iter()
            .next()
            .map(|(a, s)| (a.clone(), s.clone()));
        if let Some((account, sealed)) = sample {
            if self.sealer.open(&account, &sealed).is_err() {
                return Err(Prepare::Refused(self.wrong_key()));
            }
        }
        let unreachable =
            |e: &tokio_postgres::Error| Prepare::Unreachable(self.failed("the key check", e));
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Prepare::Unreachable(describe_pool(&e)))?;
        let mine = self
            .sealer
            .seal(KEY_CHECK, KEY_CHECK.as_bytes())
            .map_err(Prepare::Refused)?;
        client
            .execute(
                "INSERT INTO xoauth_rows (kind, key, value) VALUES ('key-check', 'v1', $1) ON CONFLICT DO NOTHING",
                &[&mine],
            )
            .await
            .map_err(|e| unreachable(&e))?;
        let stored: Option<Vec<u8>> = client
            .query_one(
                "SELECT value FROM xoauth_rows WHERE kind = 'key-check' AND key = 'v1'",
                &[],
            )
            .await
            .map_err(|e| unreachable(&e))?
            .get(0);
        match stored.map(|v| self.sealer.open(KEY_CHECK, &v)) {
            Some(Ok(_)) => Ok(()),
            _ => Err(Prepare::Refused(self.wrong_key())),
        }
    }

    fn wrong_key(&self) -> StoreError {
        let made = if self.new_key {
            let _ = std::fs::remove_file(&self.key_file);
            " (there was none; the one just made was removed again)"
        } else {
            ""
        };
        StoreError(format!(
            "key_file {}{made} is not the key that sealed the grants in database {}: every relay sharing \
             the database needs the same key_file; copy it (mode 0600) from a relay that uses this database",
            self.key_file.display(),
            self.target.shown
        ))
    }

    /// Reads every grant and status into the mirror.
    async fn reload_all(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let grants = client
            .query("SELECT account, sealed FROM xoauth_grants", &[])
            .await
            .map_err(|e| self.failed("reading grants", &e))?;
        let status = client
            .query(
                "SELECT account, last_use, last_error, revoked FROM xoauth_grant_status",
                &[],
            )
            .await
            .map_err(|e| self.failed("reading grants", &e))?;
        let mut m = lock(&self.mirror);
        m.grants = grants.iter().map(|r| (r.get(0), r.get(1))).collect();
        m.status = status.iter().map(|r| (r.get(0), status_of(r))).collect();
        m.loaded = true;
        Ok(())
    }

    /// Reads one account into the mirror; returns its sealed grant.
    async fn reload(&self, account: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let grant = client
            .query_opt(
                "SELECT sealed FROM xoauth_grants WHERE account = $1",
                &[&account],
            )
            .await
            .map_err(|e| self.failed("reading the grant", &e))?
            .map(|r| r.get::<_, Vec<u8>>(0));
        let status = client
            .query_opt(
                "SELECT account, last_use, last_error, revoked FROM xoauth_grant_status WHERE account = $1",
                &[&account],
            )
            .await
            .map_err(|e| self.failed("reading the grant", &e))?
            .map(|r| status_of(&r))
            .unwrap_or_default();
        let mut m = lock(&self.mirror);
        match &grant {
            Some(sealed) => m.grants.insert(account.to_string(), sealed.clone()),
            None => m.grants.remove(account),
        };
        m.status.insert(account.to_string(), status);
        Ok(grant)
    }

    /// A notice from any relay (this one included): the account changed in the database.
    async fn on_notice(&self, payload: &str) {
        let Some((kind, account)) = payload.split_once(':') else {
            return;
        };
        if !matches!(kind, "grant" | "replaced" | "status") {
            let _ = self.signals.send((kind.to_string(), account.to_string()));
            return;
        }
        if self.reload(account).await.is_err() {
            return;
        }
        let revoked = lock(&self.mirror)
            .status
            .get(account)
            .is_some_and(|s| s.revoked);
        // A grant replaced or deleted, or found dead: cached tokens of the old one must go.
        if kind == "replaced" || (kind == "status" && revoked) {
            let _ = self.changes.send(account.to_string());
        }
    }

    /// Runs `work` with a connection, from a blocking-pool thread ([`GrantStore`]'s writes).
    fn blocking<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.handle.block_on(work)
    }

    /// Writes the pending status changes of `only` (or of every account) inside `tx`; returns
    /// what was taken, to be put back if the transaction fails.
    async fn write_patches(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        only: Option<&str>,
    ) -> Result<HashMap<String, Patch>, StoreError> {
        let taken: HashMap<String, Patch> = {
            let mut dirty = lock(&self.dirty);
            match only {
                Some(a) => dirty
                    .remove(a)
                    .map(|p| (a.to_string(), p))
                    .into_iter()
                    .collect(),
                None => std::mem::take(&mut *dirty),
            }
        };
        for (account, p) in &taken {
            let last_use = p.last_use.map(|t| t as i64);
            let set_error = p.last_error.is_some();
            let error = p.last_error.clone().flatten();
            let r = tx
                .execute(
                    "INSERT INTO xoauth_grant_status (account, last_use, last_error, revoked) \
                     VALUES ($1, $2, $3, COALESCE($5, false)) \
                     ON CONFLICT (account) DO UPDATE SET \
                       last_use = GREATEST(xoauth_grant_status.last_use, EXCLUDED.last_use), \
                       last_error = CASE WHEN $4 THEN EXCLUDED.last_error ELSE xoauth_grant_status.last_error END, \
                       revoked = COALESCE($5, xoauth_grant_status.revoked)",
                    &[account, &last_use, &error, &set_error, &p.revoked],
                )
                .await;
            if let Err(e) = r {
                self.put_back(taken.clone());
                return Err(self.failed("writing the account's status", &e));
            }
            if set_error || p.revoked.is_some() {
                notify(tx, "status", account).await.inspect_err(|_| {
                    self.put_back(taken.clone());
                })?;
            }
        }
        Ok(taken)
    }

    /// Patches whose transaction failed go back under whatever changed since.
    fn put_back(&self, taken: HashMap<String, Patch>) {
        let mut dirty = lock(&self.dirty);
        for (account, old) in taken {
            let newer = dirty.remove(&account).unwrap_or_default();
            dirty.insert(
                account,
                Patch {
                    last_use: newer.last_use.max(old.last_use),
                    last_error: newer.last_error.or(old.last_error),
                    revoked: newer.revoked.or(old.revoked),
                },
            );
        }
    }

    async fn put_async(&self, account: &str, sealed: Vec<u8>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("saving the grant", &e))?;
        tx.execute(
            "INSERT INTO xoauth_grants (account, sealed, updated_at, updated_by) VALUES ($1, $2, now(), $3) \
             ON CONFLICT (account) DO UPDATE SET sealed = EXCLUDED.sealed, updated_at = now(), \
               updated_by = EXCLUDED.updated_by",
            &[&account, &sealed, &self.instance],
        )
        .await
        .map_err(|e| self.failed("saving the grant", &e))?;
        let taken = self.write_patches(&tx, Some(account)).await?;
        notify(&tx, "grant", account).await?;
        if let Err(e) = tx.commit().await {
            self.put_back(taken);
            return Err(self.failed("saving the grant", &e));
        }
        lock(&self.mirror)
            .grants
            .insert(account.to_string(), sealed);
        Ok(())
    }

    async fn remove_async(&self, account: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("deleting the grant", &e))?;
        let n = tx
            .execute("DELETE FROM xoauth_grants WHERE account = $1", &[&account])
            .await
            .map_err(|e| self.failed("deleting the grant", &e))?;
        notify(&tx, "replaced", account).await?;
        tx.commit()
            .await
            .map_err(|e| self.failed("deleting the grant", &e))?;
        lock(&self.mirror).grants.remove(account);
        Ok(n > 0)
    }

    async fn flush_async(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("writing statuses", &e))?;
        let taken = self.write_patches(&tx, None).await?;
        if let Err(e) = tx.commit().await {
            self.put_back(taken);
            return Err(self.failed("writing statuses", &e));
        }
        Ok(())
    }

    /// A grant stored by `authorize` or `import-token`, or deleted by `revoke`: a clean status,
    /// and every relay drops what it cached of the old grant.
    async fn replaced_async(&self, account: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("announcing the new grant", &e))?;
        tx.execute(
            "UPDATE xoauth_grant_status SET revoked = false, last_error = NULL WHERE account = $1",
            &[&account],
        )
        .await
        .map_err(|e| self.failed("announcing the new grant", &e))?;
        notify(&tx, "replaced", account).await?;
        tx.commit()
            .await
            .map_err(|e| self.failed("announcing the new grant", &e))?;
        Ok(())
    }

    /// Every sealed grant and status, as stored (`store migrate-from-sled` writes these).
    pub async fn import(
        &self,
        grants: Vec<(String, Vec<u8>)>,
        statuses: Vec<(String, Status)>,
    ) -> Result<(usize, usize), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.failed("importing", &e))?;
        let (mut copied, mut kept) = (0, 0);
        for (account, sealed) in &grants {
            let n = tx
                .execute(
                    "INSERT INTO xoauth_grants (account, sealed, updated_by) VALUES ($1, $2, $3) \
                     ON CONFLICT (account) DO NOTHING",
                    &[account, sealed, &self.instance],
                )
                .await
                .map_err(|e| self.failed("importing grants", &e))?;
            if n == 1 {
                copied += 1;
                notify(&tx, "replaced", account).await?;
            } else {
                kept += 1;
            }
        }
        for (account, s) in &statuses {
            tx.execute(
                "INSERT INTO xoauth_grant_status (account, last_use, last_error, revoked) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (account) DO NOTHING",
                &[account, &s.last_use.map(|t| t as i64), &s.last_error, &s.revoked],
            )
            .await
            .map_err(|e| self.failed("importing statuses", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| self.failed("importing", &e))?;
        Ok((copied, kept))
    }

    /// The schema version the database has (`check --verbose`).
    pub async fn schema_version(&self) -> Result<Option<i32>, StoreError> {
        let client = self.pool.get().await.map_err(|e| describe_pool(&e))?;
        schema::version(&**client).await
    }
}

/// Whether the database answers and where its schema stands, without changing anything (`check`).
pub async fn probe(url: &Secret) -> Result<String, StoreError> {
    let target = Target::parse(url.expose())?;
    let pool = target.pool(1)?;
    let client = pool.get().await.map_err(|e| {
        StoreError(format!(
            "database {} unreachable: {}",
            target.shown,
            describe_pool(&e)
        ))
    })?;
    let state = match schema::version(&**client).await? {
        None => format!(
            "no schema yet (`serve` creates version {})",
            schema::CURRENT
        ),
        Some(v) if v == schema::CURRENT => format!("schema version {v}, current"),
        Some(v) if v < schema::CURRENT => format!(
            "schema version {v}; `serve` migrates it to {}",
            schema::CURRENT
        ),
        Some(v) => format!(
            "schema version {v}, newer than this relay knows ({}): upgrade this relay",
            schema::CURRENT
        ),
    };
    Ok(format!("database {}: reachable, {state}", target.shown))
}

enum Prepare {
    Refused(StoreError),
    Unreachable(StoreError),
}

fn status_of(r: &tokio_postgres::Row) -> Status {
    Status {
        last_use: r.get::<_, Option<i64>>(1).map(|t| t.max(0) as u64),
        last_error: r.get(2),
        revoked: r.get(3),
    }
}

async fn notify(
    tx: &tokio_postgres::Transaction<'_>,
    kind: &str,
    account: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANNEL, &format!("{kind}:{account}")],
    )
    .await
    .map(|_| ())
    .map_err(|e| StoreError(format!("database: announcing a change: {}", describe(&e))))
}

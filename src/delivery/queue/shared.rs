//! The queue in the PostgreSQL database several relays share: another [`Spool`].
//!
//! A message is one row (envelope and progress as JSON, the relay that indexes it as `owner`)
//! and its body in chunks of 256 KiB (`bytea`), so no relay needs a shared filesystem. The
//! `250 queued` follows the commit of both. Each relay delivers what it owns, claiming a message
//! for the time of a transfer (a conditional update carrying the relay's holder id, renewed every
//! third of `lease_secs` while it lasts, so a 35 MB transfer may outlast a lease). A relay that
//! stops or dies leaves its messages owned by a name no live relay holds: the others adopt them
//! (`FOR UPDATE SKIP LOCKED`, so one relay each) once its claims have run out, and deliver them.
//! Delivered twice only in the window every spool has, between the upstream's `250` and the
//! commit that removes the message.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::task::TaskTracker;

use super::model::{Envelope, Progress};
use super::spool::{Body, Claim, Incoming, Listed, Spool, Stored};
use crate::delivery::api::spill::{Spill, IN_MEMORY};
use crate::store::postgres::PgStore;
use crate::util::sync::lock;
use crate::util::BoxFuture;

/// How long shutdown waits for removals still running.
const FLUSH_AT_MOST: Duration = Duration::from_secs(5);

/// Bodies up to this size are read whole for a transfer; larger ones stream chunk by chunk.
const WHOLE: u64 = 1 << 20;

/// Where this relay's small state (pacing windows, usage figures) is kept: `xoauth_rows`, kind
/// `state:<instance>`.
fn state_kind(instance: &str) -> String {
    format!("state:{instance}")
}

pub struct SharedSpool {
    db: Arc<PgStore>,
    /// Bodies being received wait here (memory, then a temporary file) until their commit.
    spill_dir: Arc<PathBuf>,
    /// The ids this relay has claimed, renewed together, with when each was last confirmed.
    claims: Arc<Mutex<HashMap<String, Instant>>>,
    /// Removals running in the background, for [`Spool::flush`].
    detached: TaskTracker,
    /// This relay's state rows, read at open (`read_state` is not async).
    state: Mutex<HashMap<String, Vec<u8>>>,
    /// The database was out of reach at open: this relay's own messages are still to be read.
    unloaded: std::sync::atomic::AtomicBool,
}

fn io_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl SharedSpool {
    /// Opens the queue: the messages this relay owns, and its state rows. `serve`: claims are
    /// renewed in the background while the relay runs.
    pub async fn open(
        db: Arc<PgStore>,
        data_dir: &std::path::Path,
        serve: bool,
    ) -> io::Result<(SharedSpool, Vec<Stored>)> {
        let spill_dir = crate::delivery::api::spill::prepare_dir(data_dir)?;
        let spool = SharedSpool {
            db,
            spill_dir: Arc::new(spill_dir),
            claims: Arc::new(Mutex::new(HashMap::new())),
            detached: TaskTracker::new(),
            state: Mutex::new(HashMap::new()),
            unloaded: std::sync::atomic::AtomicBool::new(false),
        };
        // The database may be down at start: the relay starts not ready, with an empty queue
        // here, and adopts its own messages back when the database answers.
        let stored = match spool.load().await {
            Ok(stored) => stored,
            Err(e) if serve => {
                tracing::warn!(error = %e, "the queue's database is out of reach; its messages are picked up when it answers");
                spool
                    .unloaded
                    .store(true, std::sync::atomic::Ordering::Release);
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        if serve {
            tokio::spawn(renew_claims(
                Arc::downgrade(&spool.claims),
                spool.db.clone(),
            ));
        }
        Ok((spool, stored))
    }

    async fn client(&self) -> io::Result<deadpool_postgres::Object> {
        self.db.client().await.map_err(io_error)
    }

    async fn load(&self) -> io::Result<Vec<Stored>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT envelope, progress, size FROM xoauth_queue WHERE owner = $1 ORDER BY id",
                &[&self.db.instance()],
            )
            .await
            .map_err(|e| io_error(self.db.error("reading the queue", &e)))?;
        let state = client
            .query(
                "SELECT key, value FROM xoauth_rows WHERE kind = $1 AND value IS NOT NULL",
                &[&state_kind(self.db.instance())],
            )
            .await
            .map_err(|e| io_error(self.db.error("reading the queue's state", &e)))?;
        *lock(&self.state) = state.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(rows.iter().filter_map(stored_of).collect())
    }

    /// Messages of relays no longer alive (stopped, or dead longer than `lease_secs` with their
    /// claims run out), now this relay's.
    pub async fn adopt(&self, accounts: &[String]) -> io::Result<Vec<Stored>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE xoauth_queue q SET owner = $1, claimed_by = NULL, claim_until = NULL \
                 FROM (SELECT id FROM xoauth_queue \
                       WHERE owner <> $1 AND account = ANY($3) \
                         AND owner NOT IN (SELECT instance FROM xoauth_relays \
                                           WHERE seen_at > now() - make_interval(secs => $2)) \
                         AND (claim_until IS NULL OR claim_until < now()) \
                       ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) free \
                 WHERE q.id = free.id \
                 RETURNING q.envelope, q.progress, q.size",
                &[
                    &self.db.instance(),
                    &self.db.lease().as_secs_f64(),
                    &accounts,
                ],
            )
            .await
            .map_err(|e| io_error(self.db.error("adopting messages", &e)))?;
        Ok(rows.iter().filter_map(stored_of).collect())
    }

    /// Every queued id in the database (`store migrate-from-sled` skips those).
    pub async fn ids(&self) -> io::Result<HashSet<String>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT id FROM xoauth_queue", &[])
            .await
            .map_err(|e| io_error(self.db.error("reading the queue", &e)))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn remove_now(db: &PgStore, id: &str) -> io::Result<()> {
        let client = db.client().await.map_err(io_error)?;
        run(&client, "DELETE FROM xoauth_queue WHERE id = $1", &[&id])
            .await
            .map_err(|e| io_error(db.error("removing a message", &e)))?;
        Ok(())
    }

    /// Removes until it is durable: 200 ms, doubling to 30 s (as the local spool does).
    fn remove_task(&self, id: String) -> impl std::future::Future<Output = io::Result<()>> {
        let db = self.db.clone();
        async move {
            let mut wait = Duration::from_millis(200);
            loop {
                match SharedSpool::remove_now(&db, &id).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(id, error = %e, "cannot remove a delivered message from the queue yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

/// `sql` prepared once per connection (deadpool keeps it): one round trip a use instead of two,
/// on the paths every message takes.
async fn run(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.execute(&statement, params).await
}

async fn rows(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query(&statement, params).await
}

fn stored_of(r: &tokio_postgres::Row) -> Option<Stored> {
    let mut envelope: Envelope = serde_json::from_slice(r.get::<_, &[u8]>(0)).ok()?;
    envelope.size = r.get::<_, i64>(2).max(0) as u64;
    let progress = r
        .get::<_, Option<&[u8]>>(1)
        .and_then(|p| serde_json::from_slice::<Progress>(p).ok());
    Some(Stored { envelope, progress })
}

/// Renews this relay's claims every third of a lease, until the spool is dropped.
async fn renew_claims(claims: std::sync::Weak<Mutex<HashMap<String, Instant>>>, db: Arc<PgStore>) {
    let mut every = tokio::time::interval(db.lease() / 3);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(claims) = claims.upgrade() else {
            return;
        };
        let ids: Vec<String> = lock(&claims).keys().cloned().collect();
        if ids.is_empty() {
            continue;
        }
        let Ok(client) = db.client().await else {
            continue;
        };
        // Taken before the query: the database's claim_until counts from its statement's start.
        let now = Instant::now();
        // Only the claims the database confirms count as renewed: one lost (taken over while
        // this relay was out of reach) grows stale, and its transfer stops before the end.
        let renewed = client
            .query(
                "UPDATE xoauth_queue SET claim_until = now() + make_interval(secs => $3) \
                 WHERE id = ANY($1) AND claimed_by = $2 RETURNING id",
                &[&ids, &db.holder(), &db.lease().as_secs_f64()],
            )
            .await
            .unwrap_or_default();
        let mut held = lock(&claims);
        for r in renewed {
            if let Some(at) = held.get_mut(r.get::<_, &str>(0)) {
                *at = now;
            }
        }
    }
}

/// A body on its way in: memory, then a temporary file; into the database at commit.
struct SharedIncoming {
    db: Arc<PgStore>,
    spill: Spill,
    failed: Option<io::Error>,
}

impl Incoming for SharedIncoming {
    fn size(&self) -> u64 {
        self.spill.len()
    }

    fn push<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.failed.is_none() {
                if let Err(e) = self.spill.push(chunk).await {
                    self.failed = Some(e);
                }
            }
        })
    }

    /// The message row and its chunks in one transaction: after the commit, any relay can
    /// deliver it.
    fn commit<'a>(mut self: Box<Self>, env: &'a mut Envelope) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            self.spill.done().await?;
            env.size = self.spill.len();
            let envelope = serde_json::to_vec(&*env).map_err(io_error)?;
            let db = &self.db;
            let mut client = db.client().await.map_err(io_error)?;
            let err = |e: tokio_postgres::Error| io_error(db.error("queueing a message", &e));
            let (id, size) = (&env.id, env.size as i64);
            if self.spill.len() <= IN_MEMORY as u64 {
                // The common case, one chunk: message and body in one statement, one round trip
                // and one commit (the foreign key is checked at the statement's end).
                let body = self.spill.all().await?;
                let insert = client
                    .prepare_cached(
                        "WITH m AS (INSERT INTO xoauth_queue (id, account, owner, envelope, size) \
                                    VALUES ($1, $2, $3, $4, $5)) \
                         INSERT INTO xoauth_queue_body (id, seq, data) VALUES ($1, 0, $6)",
                    )
                    .await
                    .map_err(err)?;
                client
                    .execute(
                        &insert,
                        &[id, &env.account, &db.instance(), &envelope, &size, &body],
                    )
                    .await
                    .map_err(err)?;
                return Ok(());
            }
            let tx = client.transaction().await.map_err(err)?;
            let message = tx
                .prepare_cached(
                    "INSERT INTO xoauth_queue (id, account, owner, envelope, size) VALUES ($1, $2, $3, $4, $5)",
                )
                .await
                .map_err(err)?;
            tx.execute(
                &message,
                &[id, &env.account, &db.instance(), &envelope, &size],
            )
            .await
            .map_err(err)?;
            let insert = tx
                .prepare_cached("INSERT INTO xoauth_queue_body (id, seq, data) VALUES ($1, $2, $3)")
                .await
                .map_err(err)?;
            let mut chunks = Box::pin(self.spill.stream(Bytes::new(), 0));
            let mut seq = 0i32;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                tx.execute(&insert, &[id, &seq, &chunk.as_ref()])
                    .await
                    .map_err(err)?;
                seq += 1;
            }
            tx.commit().await.map_err(err)?;
            Ok(())
        })
    }
}

impl SharedSpool {
    /// The body from its chunks: whole when small, else streamed chunk by chunk.
    async fn read_body(&self, env: &Envelope) -> io::Result<Body> {
        if env.size <= WHOLE {
            let client = self.client().await?;
            let rows = rows(
                &client,
                "SELECT data FROM xoauth_queue_body WHERE id = $1 ORDER BY seq",
                &[&env.id],
            )
            .await
            .map_err(|e| io_error(self.db.error("reading a message", &e)))?;
            let mut body = Vec::with_capacity(env.size as usize);
            for r in &rows {
                body.extend_from_slice(r.get::<_, &[u8]>(0));
            }
            // A body cut short (rows gone meanwhile) is never sent as the message.
            if body.len() as u64 != env.size {
                return Err(io_error(format!(
                    "message {}: {} of its {} bytes in the database",
                    env.id,
                    body.len(),
                    env.size
                )));
            }
            return Ok(Body::Bytes(body));
        }
        // Chunk by chunk, each its own query: memory stays at a chunk or two whatever the size.
        let (db, id) = (self.db.clone(), env.id.clone());
        let chunks = futures_util::stream::unfold(0i32, move |seq| {
            let (db, id) = (db.clone(), id.clone());
            async move {
                let client = match db.client().await {
                    Ok(c) => c,
                    Err(e) => return Some((Err(io_error(e)), seq)),
                };
                let row = client
                    .query_opt(
                        "SELECT data FROM xoauth_queue_body WHERE id = $1 AND seq = $2",
                        &[&id, &seq],
                    )
                    .await;
                match row {
                    Ok(Some(r)) => Some((Ok(Bytes::from(r.get::<_, Vec<u8>>(0))), seq + 1)),
                    Ok(None) => None,
                    Err(e) => Some((Err(io_error(db.error("reading a message", &e))), seq)),
                }
            }
        });
        Ok(Body::Stream(Box::new(tokio_util::io::StreamReader::new(
            Box::pin(chunks),
        ))))
    }

    /// Whether this relay's claim on `id` was confirmed recently enough to send it: renewals come
    /// every third of a lease, so two missed ones mean the database may have handed it on.
    fn still_claimed(&self, id: &str) -> io::Result<()> {
        fresh(&self.claims, id, self.db.lease())
    }
}

fn fresh(claims: &Mutex<HashMap<String, Instant>>, id: &str, lease: Duration) -> io::Result<()> {
    match lock(claims).get(id) {
        Some(at) if at.elapsed() < lease * 2 / 3 => Ok(()),
        _ => Err(io::Error::other(format!(
            "message {id}: this relay's claim on it was not renewed in time (the database out of reach); \
             not sending it, another relay may"
        ))),
    }
}

/// A streamed body that ends only while the claim holds: a transfer that outlasted a lost claim
/// stops before its final dot (or the API request's end), so the upstream never takes a message
/// another relay may be sending.
struct Guarded {
    inner: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    claims: Arc<Mutex<HashMap<String, Instant>>>,
    lease: Duration,
    id: String,
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(()))
                if buf.filled().len() == before && buf.remaining() > 0 =>
            {
                std::task::Poll::Ready(fresh(&this.claims, &this.id, this.lease))
            }
            other => other,
        }
    }
}

impl Spool for SharedSpool {
    fn incoming(&self, _env: &Envelope) -> Box<dyn Incoming> {
        Box::new(SharedIncoming {
            db: self.db.clone(),
            spill: Spill::new(self.spill_dir.clone()),
            failed: None,
        })
    }

    fn record<'a>(
        &'a self,
        env: &'a mut Envelope,
        progress: &'a Progress,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let bytes = serde_json::to_vec(progress).map_err(io_error)?;
            let client = self.client().await?;
            run(
                &client,
                // Only while it is this relay's: progress of a message another relay adopted
                // meanwhile is that relay's to write (this one drops it at its next claim).
                "UPDATE xoauth_queue SET progress = $2 WHERE id = $1 AND owner = $3",
                &[&env.id, &bytes, &self.db.instance()],
            )
            .await
            .map_err(|e| io_error(self.db.error("recording a message's progress", &e)))?;
            Ok(())
        })
    }

    fn remove(&self, env: &Envelope) -> BoxFuture<'static, io::Result<()>> {
        lock(&self.claims).remove(&env.id);
        let task = self.detached.track_future(self.remove_task(env.id.clone()));
        Box::pin(task)
    }

    fn remove_detached(&self, env: &Envelope) {
        lock(&self.claims).remove(&env.id);
        self.detached.spawn(self.remove_task(env.id.clone()));
    }

    fn open_body<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, io::Result<Body>> {
        Box::pin(async move {
            let body = self.read_body(env).await?;
            self.still_claimed(&env.id)?;
            // Small bodies too: the transaction may wait for a connection slot and the
            // recipients long after the body was read.
            let inner: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match body {
                Body::Stream(inner) => inner,
                Body::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
            };
            Ok(Body::Stream(Box::new(Guarded {
                inner,
                claims: self.claims.clone(),
                lease: self.db.lease(),
                id: env.id.clone(),
            })))
        })
    }

    fn read_head<'a>(&'a self, env: &'a Envelope, limit: u64) -> BoxFuture<'a, Vec<u8>> {
        Box::pin(async move {
            let chunks = limit.div_ceil(IN_MEMORY as u64).max(1) as i64;
            let Ok(client) = self.client().await else {
                return Vec::new();
            };
            let rows = client
                .query(
                    "SELECT data FROM xoauth_queue_body WHERE id = $1 ORDER BY seq LIMIT $2",
                    &[&env.id, &chunks],
                )
                .await
                .unwrap_or_default();
            let mut head = Vec::new();
            for r in &rows {
                head.extend_from_slice(r.get::<_, &[u8]>(0));
            }
            head.truncate(limit as usize);
            head
        })
    }

    fn pins_storage(&self, _env: &Envelope) -> bool {
        false
    }

    fn upkeep(&self) {}

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // At most a few seconds: with the database down a removal cannot finish, and the
            // message then stays queued (delivered, not yet removed: the documented window).
            self.detached.close();
            let _ = tokio::time::timeout(FLUSH_AT_MOST, self.detached.wait()).await;
            self.detached.reopen();
        })
    }

    fn quarantine(&self) -> super::spool::Quarantine {
        super::spool::Quarantine::default()
    }

    fn space(&self) -> Option<(u64, u64)> {
        None
    }

    fn write_state<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO xoauth_rows (kind, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                    &[&state_kind(self.db.instance()), &name, &bytes],
                )
                .await
                .map_err(|e| io_error(self.db.error("writing the queue's state", &e)))?;
            lock(&self.state).insert(name.to_string(), bytes);
            Ok(())
        })
    }

    fn read_state(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.state).get(name).cloned()
    }

    fn claim<'a>(&'a self, id: &'a str) -> BoxFuture<'a, io::Result<Claim>> {
        Box::pin(async move {
            let client = self.client().await?;
            let asked = Instant::now();
            let taken = rows(
                &client,
                "UPDATE xoauth_queue SET claimed_by = $2, claim_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND owner = $4 \
                   AND (claimed_by IS NULL OR claimed_by = $2 OR claim_until < now()) \
                 RETURNING id",
                &[&id, &self.db.holder(), &self.db.lease().as_secs_f64(), &self.db.instance()],
            )
            .await
            .map_err(|e| io_error(self.db.error("claiming a message", &e)))?
            .pop();
            if taken.is_some() {
                lock(&self.claims).insert(id.to_string(), asked);
                return Ok(Claim::Taken);
            }
            let owner: Option<String> = rows(
                &client,
                "SELECT owner FROM xoauth_queue WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| io_error(self.db.error("claiming a message", &e)))?
            .pop()
            .map(|r| r.get(0));
            Ok(match owner {
                Some(owner) if owner == self.db.instance() => Claim::Held,
                _ => Claim::Gone,
            })
        })
    }

    fn renew<'a>(&'a self, id: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE xoauth_queue SET claim_until = now() + make_interval(secs => $3) \
                     WHERE id = $1 AND claimed_by = $2",
                    &[&id, &self.db.holder(), &self.db.lease().as_secs_f64()],
                )
                .await
                .map_err(|e| io_error(self.db.error("renewing a claim", &e)))?;
            Ok(())
        })
    }

    fn release(&self, id: &str) {
        // A message removed meanwhile has no claim left to give back.
        if lock(&self.claims).remove(id).is_none() {
            return;
        }
        let (db, id) = (self.db.clone(), id.to_string());
        // A release that fails leaves the claim to run out after lease_secs.
        tokio::spawn(async move {
            if let Ok(client) = db.client().await {
                let _ = run(
                    &client,
                    "UPDATE xoauth_queue SET claimed_by = NULL, claim_until = NULL \
                     WHERE id = $1 AND claimed_by = $2",
                    &[&id, &db.holder()],
                )
                .await;
            }
        });
    }

    fn listing<'a>(
        &'a self,
        account: Option<&'a str>,
    ) -> BoxFuture<'a, io::Result<Option<Vec<Listed>>>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT envelope, progress, size, owner, \
                       CASE WHEN claim_until > now() THEN claimed_by END \
                     FROM xoauth_queue WHERE $1::text IS NULL OR account = $1 ORDER BY id",
                    &[&account],
                )
                .await
                .map_err(|e| io_error(self.db.error("listing the queue", &e)))?;
            Ok(Some(
                rows.iter()
                    .filter_map(|r| {
                        Some(Listed {
                            stored: stored_of(r)?,
                            owner: r.get(3),
                            claimed_by: r.get(4),
                        })
                    })
                    .collect(),
            ))
        })
    }

    fn adopt_every(&self) -> Option<Duration> {
        Some(self.db.lease() / 3)
    }

    fn adopt<'a>(&'a self, accounts: &'a [String]) -> BoxFuture<'a, io::Result<Vec<Stored>>> {
        Box::pin(async move {
            // Its own messages first, when the database was out of reach at start.
            let mut found = Vec::new();
            if self
                .unloaded
                .swap(false, std::sync::atomic::Ordering::AcqRel)
            {
                match self.load().await {
                    Ok(own) => found = own,
                    Err(e) => {
                        self.unloaded
                            .store(true, std::sync::atomic::Ordering::Release);
                        return Err(e);
                    }
                }
            }
            found.extend(SharedSpool::adopt(self, accounts).await?);
            Ok(found)
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_streamed_body_ends_only_while_its_claim_holds() {
        let lease = Duration::from_secs(60);
        let claims = Arc::new(Mutex::new(HashMap::new()));
        let read = |claims: &Arc<Mutex<HashMap<String, Instant>>>| {
            let mut body = Guarded {
                inner: Box::new(&b"Subject: x\r\n\r\nbody\r\n"[..]),
                claims: claims.clone(),
                lease,
                id: "m1".into(),
            };
            async move {
                let mut out = Vec::new();
                body.read_to_end(&mut out).await.map(|_| out)
            }
        };
        lock(&claims).insert("m1".to_string(), Instant::now());
        assert_eq!(read(&claims).await.unwrap(), b"Subject: x\r\n\r\nbody\r\n");
        // Last confirmed longer ago than two renewals: the end of the body is refused.
        lock(&claims).insert("m1".to_string(), Instant::now() - lease);
        let e = read(&claims).await.unwrap_err();
        assert!(e.to_string().contains("claim on it was not renewed"), "{e}");
        // Given back (delivered, removed): no claim, no end.
        lock(&claims).clear();
        assert!(read(&claims).await.is_err());
    }
}

//! `store migrate-from-sled`: one relay's sled data dir (grants, statuses, queue) copied into the
//! database several relays will share. The grants go sealed as they are (the key never travels:
//! every relay gets the same `key_file`); what the database already has is kept, so running it
//! again copies only what is new.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::AsyncReadExt;

use crate::config::Config;
use crate::delivery::queue::local::LocalSpool;
use crate::delivery::queue::shared::SharedSpool;
use crate::delivery::queue::spool::{Body, Spool};
use crate::store::postgres::{PgStore, Settings};
use crate::store::sled_store::SledStore;

pub async fn migrate_from_sled(config: Config, from: Option<PathBuf>) -> Result<String, String> {
    if !config.store.shared() {
        return Err(format!(
            "[store] backend in {} is \"sled\": set backend = \"postgres\" and url_env or url_file first; \
             this command copies a sled data dir into that database",
            config.path.display()
        ));
    }
    let data_dir = from.unwrap_or_else(|| config.server.data_dir.clone());
    let db_path = SledStore::database_path(&data_dir);
    if !db_path.exists() {
        return Err(format!(
            "no sled database at {}; name the old data dir with --data-dir",
            db_path.display()
        ));
    }
    let key = config.key_file();
    if !key.exists() {
        return Err(format!(
            "no key at {} (key_file): the sealed grants need the key that sealed them; copy it from the old relay",
            key.display()
        ));
    }
    let (grants, statuses) = {
        let (data_dir, key) = (data_dir.clone(), key.clone());
        tokio::task::spawn_blocking(move || SledStore::open(&data_dir, &key)?.export())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let db = PgStore::open(Settings {
        url: config
            .store
            .url
            .clone()
            .ok_or("[store]: no connection string was read")?,
        key_file: key,
        instance: config.store.instance(),
        lease: config.store.lease(),
        serve: false,
    })
    .await
    .map_err(|e| e.to_string())?;
    let (copied, kept) = db
        .import(grants, statuses)
        .await
        .map_err(|e| e.to_string())?;
    let (queued, skipped) = copy_queue(&db, &data_dir).await?;
    Ok(format!(
        "copied into database {}: {copied} grant(s) ({kept} already there, kept), {queued} queued message(s) \
         ({skipped} already there), owned by relay `{}`. The sled data dir {} is left as it was: start the \
         relays on the database, then move it away",
        db.shown(),
        db.instance(),
        data_dir.display()
    ))
}

/// The queued messages of `data_dir/queue`, with their progress and bodies.
async fn copy_queue(
    db: &Arc<PgStore>,
    data_dir: &std::path::Path,
) -> Result<(usize, usize), String> {
    if !data_dir.join("queue").exists() {
        return Ok((0, 0));
    }
    let disk = Arc::new(crate::delivery::queue::local::disk::Os);
    let dir = data_dir.to_path_buf();
    let (local, opened) = tokio::task::spawn_blocking(move || LocalSpool::open(&dir, disk))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the queue in {}: {e}", data_dir.display()))?;
    let (shared, _) = SharedSpool::open(db.clone(), data_dir, false)
        .await
        .map_err(|e| e.to_string())?;
    let present = shared.ids().await.map_err(|e| e.to_string())?;
    let (mut copied, mut skipped) = (0, 0);
    for stored in opened.stored {
        let mut env = stored.envelope;
        if present.contains(&env.id) {
            skipped += 1;
            continue;
        }
        let mut incoming = shared.incoming(&env);
        match local.open_body(&env).await.map_err(|e| e.to_string())? {
            Body::Bytes(bytes) => incoming.push(&bytes).await,
            Body::Stream(mut reader) => {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = reader.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    incoming.push(&buf[..n]).await;
                }
            }
        }
        incoming
            .commit(&mut env)
            .await
            .map_err(|e| format!("message {}: {e}", env.id))?;
        if let Some(progress) = &stored.progress {
            shared
                .record(&mut env, progress)
                .await
                .map_err(|e| format!("message {}: {e}", env.id))?;
        }
        copied += 1;
    }
    local.flush().await;
    Ok((copied, skipped))
}

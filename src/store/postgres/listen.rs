//! The listening connection: `LISTEN xoauth_relay` for the changes every relay announces, the
//! relay's heartbeat, and reconnection with backoff (everything is read again on each connect).

use std::sync::Weak;
use std::time::Duration;

use super::{describe, PgStore, Prepare, CHANNEL, RECONNECT_AT_MOST};
use crate::store::StoreError;
use crate::util::sync::lock;

/// The listening connection: reconnects with backoff, reloads everything on each (re)connect,
/// keeps the relay's registration alive. Ends when the store is dropped.
pub(super) async fn listen(store: Weak<PgStore>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = listen_once(&store).await;
        let Some(s) = store.upgrade() else { return };
        match result {
            Ok(()) => return,
            Err(e) => {
                let first = lock(&s.trouble).is_none();
                s.set_trouble(Some(e.0.clone()));
                if first {
                    tracing::warn!(database = %s.target.shown, error = %e, "database connection lost; reconnecting");
                } else {
                    tracing::debug!(database = %s.target.shown, error = %e, "database still unreachable");
                }
            }
        }
        drop(s);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_AT_MOST);
    }
}

/// One listening connection, until it breaks (`Err`) or the store is dropped (`Ok`). The store
/// is held only while a notice or a heartbeat is handled, so dropping it ends the loop.
async fn listen_once(store: &Weak<PgStore>) -> Result<(), StoreError> {
    let Some(s) = store.upgrade() else {
        return Ok(());
    };
    let (client, mut connection) = s
        .target
        .config
        .connect(s.target.tls.clone())
        .await
        .map_err(|e| StoreError(describe(&e)))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let _abort = AbortOnDrop(driver);
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| StoreError(describe(&e)))?;
    // Whatever changed while nobody listened is read now. The registration made at open is
    // only renewed here, and made again only if it was lost (never after a clean stop began).
    s.prepare(false).await.map_err(|e| match e {
        Prepare::Refused(e) | Prepare::Unreachable(e) => e,
    })?;
    s.keep_registered().await?;
    s.count_relays().await?;
    s.reachable();
    let mut beat = tokio::time::interval(s.lease / 3);
    beat.tick().await;
    drop(s);
    loop {
        tokio::select! {
            notice = rx.recv() => {
                let Some(payload) = notice else {
                    return Err(StoreError("the database closed the listening connection".into()));
                };
                let Some(s) = store.upgrade() else { return Ok(()) };
                s.on_notice(&payload).await;
            }
            _ = beat.tick() => {
                let Some(s) = store.upgrade() else { return Ok(()) };
                s.keep_registered().await?;
                s.count_relays().await?;
                s.forget_old_counts().await;
                // A query failure meanwhile (not the listening connection) has passed.
                s.reachable();
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

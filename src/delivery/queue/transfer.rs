//! One upstream transaction for a queued message, through the account's transport: its
//! recipients, the body from the spool, and a status per recipient.
//!
//! Every recipient comes back with the status that decides its fate (its own recipient stage,
//! or the DATA / end-of-data status that applied to it), so the queue never has to guess. A
//! status about the account rather than the message (throttling, quota, busy connections, an
//! unreachable upstream, token trouble) stops the transfer instead, and nothing of it counts.

use std::sync::Arc;

use tokio::io::AsyncReadExt;

use super::model::Envelope;
use super::spool::Body;
use crate::config::Account;
use crate::delivery::status::{Cause, Status};
use crate::delivery::transport::{MailStart, Transaction, Transport};
use crate::smtp::body::BodyChunk;
use crate::smtp::Reply;

const READ_CHUNK: usize = 128 * 1024;

pub enum Transfer {
    /// Each recipient's status, in the order asked.
    Decided(Vec<Status>),
    /// Nothing was decided: a status about the account, and the recipient (its index in the
    /// batch) whose stage drew it, if it came to one.
    Stopped {
        status: Status,
        recipient: Option<usize>,
    },
}

/// Whether a status at the start speaks of the account (stop) rather than of the message.
fn about_the_account(status: &Status) -> bool {
    matches!(
        status.cause(),
        Some(Cause::Throttled | Cause::Quota | Cause::Connection | Cause::Token | Cause::Busy)
    )
}

/// Runs one transaction for `rcpts` (addresses) of `env`, its body from `body`.
pub async fn transfer(
    transport: &dyn Transport,
    account: &Arc<Account>,
    env: &Envelope,
    rcpts: &[String],
    body: std::io::Result<Body>,
) -> Transfer {
    let start = MailStart {
        from: &env.sender,
        size: Some(env.size),
        eight_bit: env.eight_bit,
        smtputf8: env.smtputf8,
        ahead: rcpts,
        data_ahead: true,
    };
    let (mail, tx) = transport.begin(account, start).await;
    let Some(mut tx) = tx else {
        if about_the_account(&mail) {
            return Transfer::Stopped {
                status: mail,
                recipient: None,
            };
        }
        // The sender refused: every recipient shares that fate.
        return Transfer::Decided(vec![mail; rcpts.len()]);
    };
    let mut statuses: Vec<Status> = Vec::with_capacity(rcpts.len());
    for (i, to) in rcpts.iter().enumerate() {
        let status = tx.recipient(to).await;
        if status.is_throttling() {
            tx.reset().await;
            return Transfer::Stopped {
                status,
                recipient: Some(i),
            };
        }
        let broken = status.cause() == Some(Cause::Connection);
        statuses.push(status);
        if broken {
            // The rest lost their answer with the connection.
            let last = statuses.last().expect("just pushed").clone();
            statuses.resize(rcpts.len(), last);
            tx.abort();
            return Transfer::Decided(deliveries_lost(statuses));
        }
    }
    let accepted: Vec<usize> = (0..statuses.len())
        .filter(|i| statuses[*i].is_accepted())
        .collect();
    if accepted.is_empty() {
        tx.reset().await;
        return Transfer::Decided(statuses);
    }
    let data = tx.data().await;
    if !data.is_accepted() {
        if data.is_throttling() {
            tx.reset().await;
            return Transfer::Stopped {
                status: data,
                recipient: None,
            };
        }
        tx.reset().await;
        for i in &accepted {
            statuses[*i] = data.clone();
        }
        return Transfer::Decided(statuses);
    }
    if let Err(e) = send_body(&mut tx, body).await {
        tx.abort();
        let unreadable = Status::temporary(
            Cause::Deferred,
            Reply::new(451, format!("4.3.0 Cannot read the spooled message ({e})")),
        );
        for i in &accepted {
            statuses[*i] = unreadable.clone();
        }
        return Transfer::Decided(statuses);
    }
    let end = tx.finish().await;
    if end.is_throttling() {
        return Transfer::Stopped {
            status: end,
            recipient: None,
        };
    }
    for i in &accepted {
        statuses[*i] = end.clone();
    }
    Transfer::Decided(statuses)
}

/// A recipient accepted at RCPT is not delivered when the transaction broke before the end of
/// data: it lost its answer with the connection.
fn deliveries_lost(mut statuses: Vec<Status>) -> Vec<Status> {
    let lost = statuses
        .iter()
        .find(|s| s.cause() == Some(Cause::Connection))
        .cloned();
    if let Some(lost) = lost {
        for s in statuses.iter_mut().filter(|s| s.is_accepted()) {
            *s = lost.clone();
        }
    }
    statuses
}

/// Streams the spooled body into the transaction.
async fn send_body(
    tx: &mut Box<dyn Transaction>,
    body: std::io::Result<Body>,
) -> std::io::Result<()> {
    match body? {
        Body::Bytes(bytes) => {
            tx.body(&BodyChunk::decoded(bytes)).await;
            Ok(())
        }
        Body::Stream(mut reader) => {
            // Each chunk is handed on as a share of the buffer, not a copy.
            let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
            loop {
                buf.reserve(READ_CHUNK);
                if reader.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
                tx.body(&BodyChunk::decoded(buf.split().freeze())).await;
            }
        }
    }
}

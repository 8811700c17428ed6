//! Direct mode: each step goes upstream while the mailer waits, and the mailer gets the upstream's
//! status for it, so a `250` means the upstream said `250`. The account's pacing is asked before
//! MAIL (waiting up to `upstream_wait_secs` for a turn) and for each recipient.

use std::sync::Arc;

use super::{Common, Delivery, MessageStats};
use crate::config::Account;
use crate::delivery::pacing::Pace;
use crate::delivery::status::{Cause, Status};
use crate::delivery::transport::{MailStart, Transaction};
use crate::observe::MessageOutcome;
use crate::smtp::body::BodyChunk;
use crate::smtp::session::{Ahead, MailParams};
use crate::smtp::{Reply, Severity};

pub struct Direct {
    delivery: Arc<Delivery>,
    account: Arc<Account>,
    /// The transaction in progress.
    tx: Option<Box<dyn Transaction>>,
    /// RCPTs forwarded in the transaction in progress (for `max_recipients_per_message`).
    rcpts: usize,
    /// RCPTs sent ahead with MAIL, already counted against pacing; the session asks for them
    /// next, in order.
    prepaid: usize,
    pacer: Option<Arc<dyn Pace>>,
    pub(super) common: Common,
}

fn lost() -> Status {
    Status::temporary(
        Cause::Connection,
        Reply::new(451, "4.4.1 Upstream connection lost"),
    )
}

impl Direct {
    pub(super) fn new(delivery: Arc<Delivery>, account: Arc<Account>, common: Common) -> Direct {
        Direct {
            pacer: delivery.pacers.get(&account.name),
            delivery,
            account,
            tx: None,
            rcpts: 0,
            prepaid: 0,
            common,
        }
    }

    /// Waits for the account's turn under its pacing (up to `upstream_wait_secs`), or says why not.
    async fn paced(&self) -> Result<(), Reply> {
        let Some(pacer) = &self.pacer else {
            return Ok(());
        };
        let clock = &self.delivery.clock;
        let wait = self
            .delivery
            .pacing_wait
            .load(std::sync::atomic::Ordering::Relaxed);
        let deadline = clock.now() + std::time::Duration::from_millis(wait);
        loop {
            match pacer.take(0, self.delivery.pacers.now_ms()).await {
                Ok(()) => return Ok(()),
                Err(wait) if clock.now() + wait.after <= deadline => {
                    tokio::time::sleep(wait.after).await;
                }
                Err(wait) => {
                    let text = wait.describe(&self.account.name);
                    tracing::warn!(account = %self.account.name, "{text}");
                    return Err(Reply::new(451, format!("4.7.0 {text}; try again later")));
                }
            }
        }
    }

    /// Whether one more RCPT may go upstream in this transaction (direct mode's share of pacing).
    async fn recipient_allowed(&self) -> Result<(), Reply> {
        let Some(pacer) = &self.pacer else {
            return Ok(());
        };
        let cap = pacer.recipients_per_message();
        if cap > 0 && self.rcpts >= cap {
            return Err(Reply::new(
                452,
                format!(
                    "4.5.3 Too many recipients for one message to this provider (at most {cap}); send the rest in another message"
                ),
            ));
        }
        pacer
            .take_recipient(self.delivery.pacers.now_ms())
            .await
            .map_err(|wait| {
                let text = wait.describe(&self.account.name);
                tracing::warn!(account = %self.account.name, "{text}");
                Reply::new(451, format!("4.7.0 {text}; try again later"))
            })
    }

    pub async fn mail(&mut self, from: &str, params: &MailParams, ahead: &Ahead) -> Status {
        self.common.stats = MessageStats {
            sender: from.to_string(),
            ..MessageStats::default()
        };
        if let Some(tx) = self.tx.take() {
            // The mailer abandoned its last transaction without telling us (the session reports
            // RSET, so this is only a safety net).
            tx.reset().await;
        }
        self.rcpts = 0;
        self.prepaid = 0;
        let status = match self.paced().await {
            Err(reply) => Status::temporary(Cause::Throttled, reply),
            Ok(()) => {
                // Only as many RCPTs as pacing allows go ahead; the rest are asked one by one.
                let mut allowed = Vec::with_capacity(ahead.rcpts.len());
                for to in &ahead.rcpts {
                    if self.recipient_allowed().await.is_err() {
                        break;
                    }
                    self.rcpts += 1;
                    allowed.push(to.clone());
                }
                self.prepaid = allowed.len();
                let start = MailStart {
                    from,
                    size: params.size.map(|s| s as u64),
                    eight_bit: params.eight_bit,
                    smtputf8: params.smtputf8,
                    data_ahead: ahead.data && allowed.len() == ahead.rcpts.len(),
                    ahead: &allowed,
                };
                let (status, tx) = self.delivery.transport.begin(&self.account, start).await;
                self.tx = tx;
                status
            }
        };
        // A message that never got started upstream (unreachable, busy, paced, refused) is
        // counted here; the others at their end.
        match status.reply().severity() {
            Severity::Transient => self.common.record(MessageOutcome::Failed),
            Severity::Permanent => self.common.record(MessageOutcome::Rejected),
            _ => {}
        }
        status
    }

    pub async fn rcpt(&mut self, to: &str) -> Status {
        if self.prepaid > 0 {
            self.prepaid -= 1;
        } else {
            if let Err(reply) = self.recipient_allowed().await {
                return Status::from_reply(reply);
            }
            self.rcpts += 1;
        }
        let Some(tx) = self.tx.as_mut() else {
            return lost();
        };
        let status = tx.recipient(to).await;
        if status.is_accepted() {
            self.common.stats.recipients += 1;
        } else {
            self.common.counters.rejected();
        }
        status
    }

    pub async fn data(&mut self) -> Status {
        match self.tx.as_mut() {
            Some(tx) => tx.data().await,
            None => lost(),
        }
    }

    pub async fn body(&mut self, chunk: &BodyChunk) {
        self.common.stats.size += chunk.len();
        if let Some(tx) = self.tx.as_mut() {
            tx.body(chunk).await;
        }
    }

    pub async fn end_data(&mut self) -> Status {
        let Some(tx) = self.tx.take() else {
            return Status::temporary(
                Cause::Connection,
                Reply::new(
                    451,
                    "4.4.1 Upstream connection lost during DATA; message not sent",
                ),
            );
        };
        let status = tx.finish().await;
        if status.is_accepted() {
            let now = self.delivery.clock.unix();
            self.delivery.activity.touch(&self.account.name, now);
        }
        status
    }

    pub async fn reset(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.reset().await;
        }
    }

    pub fn abort(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.abort();
        }
    }

    pub fn answer_ready(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.answer_ready())
    }
}

//! Returning mail to its sender: the bounce (RFC 3464, built by [`super::dsn`]) for recipients
//! that failed for good, queued like any other message through the account's own upstream.

use super::dsn;
use super::model::Envelope;
use super::spool::Incoming;
use super::Queue;
use crate::config::Account;
use crate::observe::Event;

impl Queue {
    /// The bounce for `failed` recipients of `env` to its sender, written but not yet committed;
    /// `None` when none is due (a null sender, or the message is itself automatic).
    pub(super) async fn prepare_bounce(
        &self,
        account: &Account,
        env: &Envelope,
        failed: &[dsn::Failed],
    ) -> Option<(Box<dyn Incoming>, Envelope)> {
        if failed.is_empty() {
            return None;
        }
        // A damaged body has no headers worth quoting.
        let headers = match env.damaged {
            Some(_) => Vec::new(),
            None => self.headers(env).await,
        };
        if env.bounce || env.sender.is_empty() || dsn::is_automatic(&headers) {
            tracing::info!(id = %env.id, "no bounce sent (null sender or an automatic message)");
            return None;
        }
        let report = dsn::build(&dsn::Bounce {
            reporting_mta: &self.hostname,
            from: &account.mailbox,
            to: &env.sender,
            queue_id: &env.id,
            arrival_unix: env.received,
            now_unix: self.clock.unix(),
            headers: &headers,
            failed,
        });
        let mut bounce = Envelope {
            account: account.name.clone(),
            sender: account.mailbox.clone(),
            recipients: vec![env.sender.clone()],
            bounce: true,
            ..Envelope::default()
        };
        let mut writer = self.writer(&mut bounce);
        writer.push(&report).await;
        Some((writer, bounce))
    }

    /// Queues a prepared bounce; `false` when it could not be (the original then stays queued,
    /// and its bounce is tried again).
    pub(super) async fn commit_bounce(
        &self,
        env: &Envelope,
        writer: Box<dyn Incoming>,
        bounce: Envelope,
    ) -> bool {
        match self.accept(writer, bounce).await {
            Ok(bid) => {
                tracing::info!(id = %env.id, bounce = %bid, to = %env.sender, "bounce queued");
                true
            }
            Err(e) => {
                tracing::warn!(id = %env.id, error = %e, "cannot queue the bounce; the message stays queued and its bounce is tried again");
                false
            }
        }
    }

    /// Counts recipients that just failed for good (their status `codes`) and raises
    /// `message_bounced`.
    pub(super) fn bounced(&self, account: &str, env: &Envelope, codes: &[String]) {
        if codes.is_empty() {
            return;
        }
        let metrics = &self.observer.metrics;
        metrics.recipients(account, "bounced", codes.len() as u64);
        // Status codes only: the upstream's text often repeats the recipient's address.
        let mut distinct: Vec<&str> = codes.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let detail = format!(
            "message {}: {} recipient(s) failed for good ({})",
            env.id,
            codes.len(),
            distinct.join(", ")
        );
        let hint = if env.sender.is_empty() || env.bounce {
            "no delivery status notification is sent for a message with a null sender"
        } else {
            "the sender gets a delivery status notification naming each failed recipient"
        };
        self.observer
            .alerts
            .raise(Event::MessageBounced, account, &detail, hint);
    }

    /// The header section of a queued message (never the body).
    pub(super) async fn headers(&self, env: &Envelope) -> Vec<u8> {
        let start = self.spool.read_head(env, 64 * 1024).await;
        dsn::header_block(&start).to_vec()
    }
}

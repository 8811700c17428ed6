//! Queue mode's way in: MAIL, RCPT and DATA are answered by the relay itself and the body goes
//! into the spool; the mailer's `250` comes once the message is durable (`250 ... queued as ID`).

use std::sync::Arc;

use super::{Common, Delivery, MessageStats};
use crate::config::Account;
use crate::delivery::api;
use crate::delivery::queue::model::Envelope;
use crate::delivery::queue::spool::Incoming;
use crate::delivery::status::{Cause, Status};
use crate::observe::MessageOutcome;
use crate::smtp::body::{BodyChunk, BodyEncoder};
use crate::smtp::session::MailParams;
use crate::smtp::Reply;

pub struct Intake {
    delivery: Arc<Delivery>,
    account: Arc<Account>,
    /// The message being received into the spool (boxed: most sessions hold none).
    spooled: Option<Box<Spooled>>,
    pub(super) common: Common,
}

struct Spooled {
    env: Envelope,
    writer: Option<Box<dyn Incoming>>,
    /// For an API transport: the start of the message, whose header section must agree with the
    /// envelope before the message is queued (nothing is queued that cannot go exactly).
    head: Option<Head>,
}

/// The start of a message as the API transport will read it (bare line ends made CRLF).
#[derive(Default)]
struct Head {
    bytes: Vec<u8>,
    encoder: BodyEncoder,
}

impl Head {
    const WANTED: usize = api::envelope::MAX_HEADER + 2;

    fn push(&mut self, chunk: &[u8]) {
        if self.bytes.len() >= Self::WANTED {
            return;
        }
        let take = &chunk[..chunk.len().min(Self::WANTED)];
        self.encoder.encode(take, &mut self.bytes);
        self.bytes.truncate(Self::WANTED);
    }
}

impl Intake {
    pub(super) fn new(delivery: Arc<Delivery>, account: Arc<Account>, common: Common) -> Intake {
        Intake {
            delivery,
            account,
            spooled: None,
            common,
        }
    }

    pub fn mail(&mut self, from: &str, params: &MailParams) -> Status {
        self.common.stats = MessageStats {
            sender: from.to_string(),
            ..MessageStats::default()
        };
        if !self.delivery.queue.has_room() {
            self.common.record(MessageOutcome::Failed);
            return Status::temporary(
                Cause::Deferred,
                Reply::new(452, "4.3.1 Insufficient system storage; try again later"),
            );
        }
        self.spooled = Some(Box::new(Spooled {
            env: Envelope {
                account: self.account.name.clone(),
                sender: from.to_string(),
                eight_bit: params.eight_bit,
                smtputf8: params.smtputf8,
                ..Envelope::default()
            },
            writer: None,
            head: self.account.provider.transport.is_api().then(|| Head {
                encoder: BodyEncoder::unstuffed(),
                ..Head::default()
            }),
        }));
        if let Some(status) = params
            .size
            .and_then(|size| api::envelope::too_large(&self.account, size as u64))
        {
            self.spooled = None;
            return status;
        }
        Status::from_reply(Reply::new(250, "2.1.0 Ok"))
    }

    pub fn rcpt(&mut self, to: &str) -> Status {
        if let Some(spooled) = self.spooled.as_mut() {
            if spooled.head.is_some() {
                let so_far = spooled.env.recipients.len();
                if let Err(reply) = api::envelope::recipient_allowed(&self.account, so_far) {
                    return Status::temporary(Cause::Deferred, reply);
                }
            }
            spooled.env.recipients.push(to.to_string());
            self.common.stats.recipients += 1;
        }
        Status::from_reply(Reply::new(250, "2.1.5 Ok"))
    }

    pub fn data(&mut self) -> Status {
        if let Some(spooled) = self.spooled.as_mut() {
            spooled.writer = Some(self.delivery.queue.writer(&mut spooled.env));
        }
        Status::from_reply(Reply::new(354, "End data with <CR><LF>.<CR><LF>"))
    }

    pub async fn body(&mut self, chunk: &BodyChunk) {
        self.common.stats.size += chunk.len();
        let Some(spooled) = self.spooled.as_mut() else {
            return;
        };
        if let Some(head) = spooled.head.as_mut() {
            head.push(chunk.bytes());
        }
        if let Some(writer) = spooled.writer.as_mut() {
            writer.push(chunk.bytes()).await;
        }
    }

    pub async fn end_data(&mut self) -> Status {
        let Some(Spooled {
            env,
            writer: Some(writer),
            head,
        }) = self.spooled.take().map(|s| *s)
        else {
            return Status::temporary(
                Cause::Deferred,
                Reply::new(451, "4.3.0 No message to queue; try again"),
            );
        };
        if let Some(mut head) = head {
            head.bytes
                .extend_from_slice(head.encoder.finish_unstuffed());
            // A message wholly read into `head` is as long as it; a longer one at least its size.
            let size = match head.bytes.len() < Head::WANTED {
                true => head.bytes.len() as u64,
                false => self.common.stats.size as u64,
            };
            let checked = api::envelope::check(&head.bytes, size, &env.recipients, &self.account);
            if let Err(refused) = checked {
                // The spool writer is dropped unused: nothing of the message stays.
                return refused.counted(&self.delivery.observer, &self.account.name);
            }
        }
        match self.delivery.queue.accept(writer, env).await {
            Ok(id) => {
                let reply = crate::delivery::queue::queued_reply(&id);
                self.common.stats.queued_as = Some(id);
                Status::from_reply(reply)
            }
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e, "cannot queue a message");
                Status::temporary(
                    Cause::Deferred,
                    Reply::new(
                        451,
                        "4.3.0 Cannot queue the message right now; try again later",
                    ),
                )
            }
        }
    }

    /// A half-received message is thrown away with its spool file.
    pub fn reset(&mut self) {
        self.spooled = None;
    }
}

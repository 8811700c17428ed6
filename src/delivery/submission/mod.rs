//! The one interface the inbound connection calls for a mailer's messages, and the way in.
//!
//! [`Delivery::admit`] decides at AUTH whether an account's mail can go at all (a usable grant,
//! and no lasting refusal by the upstream), so a dead grant is a `454` at AUTH, not at every
//! MAIL. [`Delivery::submission`] gives the session its [`Submission`]: [`direct::Direct`] takes a
//! transaction step by step through the account's transport, passing each upstream status on to
//! the mailer as it comes; [`intake::Intake`] answers MAIL, RCPT and DATA itself and puts the
//! message into the queue. Either way each step's [`Status`] carries the reply the mailer sees.

pub mod direct;
pub mod intake;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::activity::Activity;
use super::pacing::Pacers;
use super::queue::Queue;
use super::status::Status;
use super::transport::Transport;
use crate::config::{Account, DeliveryMode};
use crate::oauth::tokens::{TokenError, TokenManager};
use crate::observe::metrics::AccountCounters;
use crate::observe::{MessageOutcome, Observer};
use crate::smtp::body::BodyChunk;
use crate::smtp::session::{Ahead, MailParams};
use crate::util::clock::SharedClock;

/// What the inbound side may ask of delivery.
pub struct Delivery {
    pub(super) transport: Arc<dyn Transport>,
    pub(super) queue: Arc<Queue>,
    pub(super) pacers: Arc<Pacers>,
    pub(super) activity: Arc<Activity>,
    tokens: Arc<TokenManager>,
    /// How long a direct-mode message waits for its turn under the account's pacing, in
    /// milliseconds (`upstream_wait_secs`, which a reload may change).
    pub(super) pacing_wait: AtomicU64,
    pub(super) observer: Observer,
    pub(super) clock: SharedClock,
}

/// Why an account's mail cannot go now, for the mailer (`454`) and the metrics.
#[derive(Debug)]
pub struct Refusal {
    /// `xoauth_relay_auth_failures_total{reason}`.
    pub reason: &'static str,
    pub text: String,
}

/// What the per-message log line says of the upstream half of a message.
#[derive(Debug, Default, Clone)]
pub struct MessageStats {
    pub sender: String,
    pub recipients: usize,
    pub size: usize,
    /// Queue mode: the id the message was queued as.
    pub queued_as: Option<String>,
}

pub struct Services {
    pub transport: Arc<dyn Transport>,
    pub queue: Arc<Queue>,
    pub pacers: Arc<Pacers>,
    pub activity: Arc<Activity>,
    pub tokens: Arc<TokenManager>,
    pub observer: Observer,
    pub clock: SharedClock,
    pub pacing_wait: std::time::Duration,
}

impl Delivery {
    pub fn new(s: Services) -> Delivery {
        Delivery {
            transport: s.transport,
            queue: s.queue,
            pacers: s.pacers,
            activity: s.activity,
            tokens: s.tokens,
            pacing_wait: AtomicU64::new(s.pacing_wait.as_millis() as u64),
            observer: s.observer,
            clock: s.clock,
        }
    }

    /// `upstream_wait_secs` from a reloaded config.
    pub fn set_pacing_wait(&self, wait: std::time::Duration) {
        self.pacing_wait.store(
            wait.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether `account` may send now: a token can be had (queued mail may wait for a token
    /// endpoint that is merely down), and the upstream has not refused the account lastingly.
    pub async fn admit(&self, account: &Account) -> Result<(), Refusal> {
        match self.tokens.token(&account.name).await {
            Ok(_) => {}
            // Queued mail can wait for the token endpoint to come back; a missing or revoked grant
            // would only pile up mail that cannot go.
            Err(e) if account.delivery == DeliveryMode::Queue && e.is_passing() => {
                tracing::info!(error = %e, "token endpoint unavailable; accepting mail into the queue");
            }
            // The token endpoint is out of reach: not the grant's fault.
            Err(e @ TokenError::Unreachable { .. }) => {
                tracing::info!(error = %e, "password accepted, but no access token can be had now");
                return Err(Refusal {
                    reason: "token_unavailable",
                    text: e.for_mailer(),
                });
            }
            Err(e) => {
                tracing::info!(error = %e, "password accepted, but the account has no usable grant");
                return Err(Refusal {
                    reason: "no_grant",
                    text: e.for_mailer(),
                });
            }
        }
        if let Some(why) = self.transport.known_refusal(account) {
            tracing::info!(reason = %why, "password accepted, but the upstream refuses the account");
            return Err(Refusal {
                reason: "upstream_refused",
                text: why,
            });
        }
        Ok(())
    }

    /// The session's way in for `account`'s messages.
    pub fn submission(self: &Arc<Self>, account: Arc<Account>) -> Submission {
        let counters = self.observer.metrics.account(&account.name);
        let usage = self.observer.usage.account(&account.name);
        let common = Common {
            counters,
            usage,
            stats: MessageStats::default(),
        };
        match account.delivery {
            DeliveryMode::Direct => {
                Submission::Direct(direct::Direct::new(self.clone(), account, common))
            }
            DeliveryMode::Queue => {
                Submission::Intake(intake::Intake::new(self.clone(), account, common))
            }
        }
    }
}

/// What both kinds of submission keep: the account's counters and the message's figures.
pub struct Common {
    counters: AccountCounters,
    usage: crate::observe::usage::AccountHandle,
    pub stats: MessageStats,
}

impl Common {
    /// Counts the message that just ended (metrics and usage).
    pub fn record(&self, outcome: MessageOutcome) {
        let s = &self.stats;
        self.counters.message(outcome, s.size);
        match outcome {
            MessageOutcome::Relayed => {
                self.counters.accepted(s.recipients as u64);
                self.usage.message(s.recipients as u64, s.size as u64);
            }
            MessageOutcome::Queued => self.usage.message(s.recipients as u64, s.size as u64),
            _ => {}
        }
    }
}

/// One mailer session's messages on their way: directly, or into the queue.
pub enum Submission {
    Direct(direct::Direct),
    Intake(intake::Intake),
}

impl Submission {
    fn common(&self) -> &Common {
        match self {
            Submission::Direct(d) => &d.common,
            Submission::Intake(i) => &i.common,
        }
    }

    pub fn stats(&self) -> &MessageStats {
        &self.common().stats
    }

    pub fn record(&self, outcome: MessageOutcome) {
        self.common().record(outcome)
    }

    pub async fn mail(&mut self, from: &str, params: &MailParams, ahead: &Ahead) -> Status {
        match self {
            Submission::Direct(d) => d.mail(from, params, ahead).await,
            Submission::Intake(i) => i.mail(from, params),
        }
    }

    pub async fn rcpt(&mut self, to: &str) -> Status {
        match self {
            Submission::Direct(d) => d.rcpt(to).await,
            Submission::Intake(i) => i.rcpt(to),
        }
    }

    pub async fn data(&mut self) -> Status {
        match self {
            Submission::Direct(d) => d.data().await,
            Submission::Intake(i) => i.data(),
        }
    }

    /// Streams part of the body. A failure shows at [`Submission::end_data`].
    pub async fn body(&mut self, chunk: &BodyChunk) {
        match self {
            Submission::Direct(d) => d.body(chunk).await,
            Submission::Intake(i) => i.body(chunk).await,
        }
    }

    pub async fn end_data(&mut self) -> Status {
        match self {
            Submission::Direct(d) => d.end_data().await,
            Submission::Intake(i) => i.end_data().await,
        }
    }

    /// The mailer abandoned its transaction (RSET, EHLO, ...).
    pub async fn reset(&mut self) {
        match self {
            Submission::Direct(d) => d.reset().await,
            Submission::Intake(i) => i.reset(),
        }
    }

    /// Abandons the message mid-DATA (too large, refused, the mailer gone): nothing of it goes.
    pub fn abort(&mut self) {
        match self {
            Submission::Direct(d) => d.abort(),
            Submission::Intake(i) => i.reset(),
        }
    }

    /// The next step's answer is at hand (pipelining): answering it will not wait.
    pub fn answer_ready(&self) -> bool {
        match self {
            Submission::Direct(d) => d.answer_ready(),
            Submission::Intake(_) => false,
        }
    }

    /// The mailer's session is over: whatever it held goes back (or, mid-DATA, is closed).
    pub async fn finish(&mut self) {
        self.reset().await;
    }
}

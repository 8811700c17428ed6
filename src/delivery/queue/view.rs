//! What the operator sees of the queue and does to it: `queue`, `queue show`, `accounts`' queue
//! columns, `queue retry` and `queue delete`.

use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use super::index::{AccountQueue, Entry};
use super::model::Envelope;
use super::pauses::Pause;
use super::spool::Quarantine;
use super::Queue;
use crate::util::sync::lock;

/// One queued message as `queue` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub id: String,
    pub account: String,
    pub sender: String,
    pub size: u64,
    pub age_secs: u64,
    pub attempts: u32,
    pub next_attempt_secs: u64,
    pub last_reply: Option<String>,
    /// Why it is not being attempted at all (damaged in the spool, account gone), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    pub recipients: Vec<RecipientView>,
    /// With a store several relays share: the relay that holds it (and, while one sends it,
    /// `sending` names that process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientView {
    pub address: String,
    pub state: &'static str,
    pub last_reply: Option<String>,
}

/// An account's queue at a glance, for `accounts`.
pub struct AccountView {
    pub queued: usize,
    pub paused: Option<String>,
    pub oldest_secs: Option<u64>,
}

/// What `queue retry` applies to.
pub enum Target {
    Id(String),
    Account(String),
    All,
}

impl Queue {
    fn view(
        &self,
        e: &Entry,
        now: Instant,
        paused: Option<&Pause>,
        held: Option<&str>,
    ) -> MessageView {
        let next = paused.map_or(e.due, |p| p.until.max(e.due));
        let env = &e.env;
        let held = env.damaged.as_deref().or(held).map(str::to_string);
        MessageView {
            id: env.id.clone(),
            account: env.account.clone(),
            sender: env.sender.clone(),
            size: env.size,
            age_secs: self.clock.unix().saturating_sub(env.received),
            attempts: e.progress.attempts,
            next_attempt_secs: next.saturating_duration_since(now).as_secs(),
            last_reply: e
                .progress
                .last_reply()
                .or_else(|| paused.map(|p| p.why.clone()))
                .or_else(|| held.clone()),
            held,
            recipients: env
                .recipients
                .iter()
                .zip(&e.progress.recipients)
                .map(|(address, r)| RecipientView {
                    address: address.clone(),
                    state: r.status.as_str(),
                    last_reply: r.last_reply(),
                })
                .collect(),
            relay: None,
            sending: None,
        }
    }

    /// [`Queue::list`], and with a store several relays share, every relay's messages, each
    /// with the relay that holds it.
    pub async fn list_all(&self, account: Option<&str>) -> Vec<MessageView> {
        let mut out = self.list(account);
        let Ok(Some(listing)) = self.spool.listing(account).await else {
            return out;
        };
        let mine: std::collections::HashSet<String> = out.iter().map(|m| m.id.clone()).collect();
        let now = self.clock.now();
        for m in &mut out {
            if let Some(l) = listing.iter().find(|l| l.stored.envelope.id == m.id) {
                m.relay = Some(l.owner.clone());
                m.sending = l.claimed_by.clone();
            }
        }
        for l in listing {
            let env = &l.stored.envelope;
            if mine.contains(&env.id) {
                continue;
            }
            let progress = l
                .stored
                .progress
                .clone()
                .unwrap_or_else(|| super::model::Progress::fresh(env.recipients.len()));
            let wait = progress.next_attempt.saturating_sub(self.clock.unix());
            let entry = Entry {
                tried: Vec::new(),
                env: Arc::new(env.clone()),
                progress,
                due: now + std::time::Duration::from_secs(wait),
                expires: now,
                busy: false,
                strikes: 0,
            };
            let mut view = self.view(&entry, now, None, None);
            view.relay = Some(l.owner);
            view.sending = l.claimed_by;
            out.push(view);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Queued messages, oldest first.
    pub fn list(&self, account: Option<&str>) -> Vec<MessageView> {
        let now = self.clock.now();
        let mut out: Vec<MessageView> = self
            .accounts
            .all()
            .values()
            .filter(|aq| account.is_none_or(|a| a == aq.name))
            .flat_map(|aq| {
                let held = aq.held.load_full();
                let paused = self.pauses.current(&aq.name, now);
                let inner = lock(&aq.inner);
                inner
                    .messages
                    .values()
                    .map(|e| {
                        self.view(e, now, paused.as_ref(), held.as_deref().map(String::as_str))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One message and its headers (never the body).
    pub async fn show(&self, id: &str) -> Option<(MessageView, String)> {
        let view = self.list(None).into_iter().find(|m| m.id == id)?;
        let env = self
            .accounts
            .get(&view.account)
            .and_then(|aq| lock(&aq.inner).messages.get(id).map(|e| e.env.clone()))?;
        let headers = match env.damaged {
            Some(_) => Vec::new(),
            None => self.headers(&env).await,
        };
        Some((view, String::from_utf8_lossy(&headers).into_owned()))
    }

    /// Damaged spool data kept aside in `queue/corrupt/`.
    pub fn quarantine(&self) -> Quarantine {
        self.spool.quarantine()
    }

    pub fn account_view(&self, account: &str) -> AccountView {
        let Some(aq) = self.accounts.get(account) else {
            return AccountView {
                queued: 0,
                paused: None,
                oldest_secs: None,
            };
        };
        let now = self.clock.now();
        let unix = self.clock.unix();
        let held = aq.held.load_full();
        let paused = self.pauses.current(account, now);
        let inner = lock(&aq.inner);
        AccountView {
            queued: inner.messages.len(),
            paused: match held {
                Some(why) => Some(why.to_string()),
                None => paused.map(|p| {
                    format!(
                        "{} (until {}s from now)",
                        p.why,
                        p.until.saturating_duration_since(now).as_secs()
                    )
                }),
            },
            oldest_secs: inner
                .messages
                .values()
                .map(|e| unix.saturating_sub(e.env.received))
                .max(),
        }
    }

    /// Attempt now: lifts the pause and the backoff (pacing still applies), also for a relay
    /// started later. Returns how many messages it applies to.
    pub async fn retry(&self, target: &Target) -> usize {
        let now = self.clock.now();
        let mut count = 0;
        let mut records: Vec<(Arc<AccountQueue>, Arc<Envelope>, super::model::Progress)> =
            Vec::new();
        for aq in self.accounts.all().values() {
            let mut inner = lock(&aq.inner);
            let mut touched = false;
            let ids: Vec<String> = inner
                .messages
                .keys()
                .filter(|id| match target {
                    Target::All => true,
                    Target::Account(a) => *a == aq.name,
                    Target::Id(wanted) => wanted == *id,
                })
                .cloned()
                .collect();
            for id in ids {
                inner.set_due(&id, now);
                let e = inner.messages.get_mut(&id).expect("listed above");
                e.progress.next_attempt = 0;
                // A logged message has no progress file, and a busy one is recorded by its
                // worker; the others need the new time on disk for a relay started later.
                if e.env.logged.is_none() && !e.busy {
                    records.push((aq.clone(), e.env.clone(), e.progress.clone()));
                    // Held while its record is written, so that no worker's newer one is overwritten.
                    inner.take(&id);
                }
                count += 1;
                touched = true;
            }
            // `--all` and `--account` lift the account's pause even with nothing queued here:
            // with a shared store, the pause may hold another relay's mail.
            if touched
                || matches!(target, Target::All)
                || matches!(target, Target::Account(a) if *a == aq.name)
            {
                drop(inner);
                self.pauses.lift(&aq.name, false);
                aq.wake.notify_waiters();
            }
        }
        for (aq, env, progress) in records {
            self.record_progress(&aq, &env, &progress, "record the retry in the spool")
                .await;
            lock(&aq.inner).release(&env.id);
            aq.wake.notify_one();
        }
        count
    }

    /// Deletes a message without a bounce. `false` when there is no such message (or a worker is
    /// sending it right now).
    pub async fn delete(&self, id: &str) -> Result<bool, String> {
        for aq in self.accounts.all().values() {
            let removed = {
                let mut inner = lock(&aq.inner);
                match inner.messages.get(id) {
                    Some(e) if e.busy => {
                        return Err(format!(
                            "message {id} is being delivered right now; try again in a moment"
                        ))
                    }
                    Some(_) => inner.remove(id),
                    None => None,
                }
            };
            if let Some(e) = removed {
                self.spool
                    .remove(&e.env)
                    .await
                    .map_err(|e| format!("message {id}: cannot remove it from the spool: {e}"))?;
                tracing::info!(id, account = %e.env.account, sender = %e.env.sender, "message deleted from the queue by the operator");
                return Ok(true);
            }
        }
        Ok(false)
    }
}

//! What the spool held at start-up, put back in order: mail of accounts no longer configured
//! (delivered through the provider it recorded, or held in view), and damaged data reported.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::index::AccountQueue;
use super::model::Envelope;
use super::spool::Damage;
use super::Queue;
use crate::config::{Account, Provider};
use crate::observe::Event;
use crate::util::sync::lock;

impl Queue {
    /// The queue of an account that is no longer configured, for its queued mail: delivered
    /// through the provider and mailbox the message recorded, if that provider is still there;
    /// otherwise held (listed, alerted as `queue_stuck`) until `queue delete`.
    pub(super) fn retired(
        &self,
        env: &Envelope,
        providers: &BTreeMap<String, Arc<Provider>>,
    ) -> (Arc<AccountQueue>, Option<Arc<Account>>) {
        let name = &env.account;
        let provider = providers
            .get(&*env.provider)
            .filter(|_| !env.mailbox.is_empty());
        let (account, why) = match provider {
            Some(p) => (
                Arc::new(Account::retired(name, p.clone(), &env.mailbox, env.grant)),
                None,
            ),
            None => {
                let missing = Arc::new(Provider::missing(&env.provider));
                let why = if env.provider.is_empty() {
                    format!(
                        "held: account `{name}` is no longer configured, and the message does not say \
                         through which provider it was to go (queued by an older release); add the account \
                         back to the config, or `xoauth-relay queue delete ID`"
                    )
                } else {
                    format!(
                        "held: account `{name}` and its provider `{}` are no longer configured; add them back \
                         to the config, or `xoauth-relay queue delete ID`",
                        env.provider
                    )
                };
                (
                    Arc::new(Account::retired(name, missing, &env.mailbox, env.grant)),
                    Some(why),
                )
            }
        };
        let mut made = None;
        let aq = self.accounts.insert_missing(name, || {
            made = Some(account.clone());
            AccountQueue::new(&account)
        });
        if let Some(why) = &why {
            tracing::warn!(account = %name, "{why}");
            aq.held.store(Some(Arc::new(why.clone())));
        } else if made.is_some() {
            tracing::info!(account = %name, provider = %env.provider, "queued mail of an account that is no longer configured is delivered through its provider");
        }
        let deliverable = why.is_none();
        (aq, made.filter(|_| deliverable))
    }

    /// Logs, counts and alerts spool data found damaged at start-up.
    pub(super) fn report_damage(&self, damage: &[Damage]) {
        for d in damage {
            let kept = d
                .kept
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "nowhere (the segment is kept instead)".into());
            let whose = d
                .envelope
                .as_deref()
                .and_then(|e| serde_json::from_slice::<Envelope>(e).ok());
            if d.known {
                tracing::warn!(segment = d.segment, offset = d.offset, bytes = d.len, kept = %kept, "damaged spool log record (found before)");
                continue;
            }
            self.observer.metrics.queue_corrupt();
            let message = whose
                .as_ref()
                .map(|e| format!("message {} of account `{}`", e.id, e.account))
                .unwrap_or_else(|| "records of unknown messages".into());
            tracing::error!(segment = d.segment, offset = d.offset, bytes = d.len, kept = %kept, "damaged spool log record: {message} cannot be delivered; the records after it are read as usual");
            let detail = format!(
                "spool log segment {} offset {}: {} damaged bytes ({message}), kept in {kept}",
                d.segment, d.offset, d.len
            );
            let account = whose.as_ref().map(|e| e.account.as_str()).unwrap_or("");
            self.observer.alerts.raise(
                Event::QueueCorrupt,
                account,
                &detail,
                "check the disk (dmesg, SMART); `xoauth-relay queue` lists what is damaged; a damaged \
                 message is returned to its sender at max_queue_age_secs, or `queue delete ID` removes it",
            );
        }
    }
}

impl Queue {
    /// Looks for messages this relay takes over (a store several relays share: those of a relay
    /// that stopped or died) every `every`, and indexes them for its workers.
    pub(super) fn adopt_loop(
        self: &Arc<Self>,
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let queue = Arc::downgrade(self);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(queue) = queue.upgrade() else { return };
                // Accounts this relay delivers for (not those it only holds mail of).
                let accounts: Vec<String> = queue
                    .accounts
                    .all()
                    .iter()
                    .filter(|(_, aq)| aq.held.load().is_none())
                    .map(|(name, _)| name.clone())
                    .collect();
                match queue.spool.adopt(&accounts).await {
                    Ok(found) if !found.is_empty() => queue.index_adopted(found),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot look for messages to take over"),
                }
            }
        });
    }

    fn index_adopted(&self, found: Vec<super::spool::Stored>) {
        let mut by_account: BTreeMap<String, usize> = BTreeMap::new();
        for s in found {
            let Some(aq) = self.accounts.get(&s.envelope.account) else {
                // Relays sharing a store share their accounts; one missing here is the
                // operator's to fix, and the message stays listed in the database.
                tracing::error!(
                    id = %s.envelope.id,
                    account = %s.envelope.account,
                    "took over a queued message of an account this relay's config does not have; \
                     add the account to this relay's config (every relay sharing the database needs it)"
                );
                continue;
            };
            let progress = s
                .progress
                .unwrap_or_else(|| super::model::Progress::fresh(s.envelope.recipients.len()));
            let entry = self.entry(Arc::new(s.envelope), progress);
            {
                let mut inner = lock(&aq.inner);
                // Already indexed (its own messages read again after a start with the database
                // down, one of them perhaps being sent now): the index keeps its entry.
                if inner.messages.contains_key(&entry.env.id) {
                    continue;
                }
                *by_account.entry(entry.env.account.clone()).or_default() += 1;
                inner.insert(entry);
            }
            aq.wake.notify_one();
        }
        for (account, n) in by_account {
            tracing::info!(
                account,
                messages = n,
                "took over queued messages of a relay no longer running"
            );
        }
    }
}

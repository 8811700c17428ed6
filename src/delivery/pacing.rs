//! How fast one account may send: what the provider accepts per mailbox.
//!
//! Microsoft 365 takes 30 messages a minute and 10,000 recipients a day from a mailbox, Gmail 2,000
//! messages a day; going faster earns throttling replies and, repeated, a blocked mailbox. Each
//! account has one [`Pacer`], asked before every upstream transaction in both delivery modes:
//! - messages per minute: a token bucket whose burst is a twentieth of the limit (at least 1) and
//!   which refills so that no 60-second window holds more than the limit (burst included), so a
//!   backlog drains evenly instead of in bursts the provider reads as abuse;
//! - messages and recipients per day: rolling 24-hour windows (what providers count), kept in
//!   one-minute buckets and persisted across restarts ([`Pacers::snapshot`]).
//!
//! An upstream transaction counts as one message; each recipient in it counts once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Account, Pacing};
use crate::store::Shared;
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;
use crate::util::sync::lock;
use crate::util::BoxFuture;

const DAY_SECS: u64 = 86_400;
/// Daily windows are kept in buckets this wide: a day of traffic is at most 1,440 entries.
const BUCKET_SECS: u64 = 60;

/// Why a transaction must wait, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub after: Duration,
    /// The config key of the limit that was reached.
    pub limit: &'static str,
    pub value: u32,
}

impl Wait {
    /// For the mailer and the log: "account `news`: max_messages_per_minute (30) reached; next in 2s".
    pub fn describe(&self, account: &str) -> String {
        format!(
            "account `{account}`: {} ({}) reached; resets in {}s",
            self.limit,
            self.value,
            self.after.as_secs().max(1)
        )
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Day {
    /// (unix minute start, messages, recipients), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
}

impl Day {
    fn expire(&mut self, now: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|(t, _, _)| t + BUCKET_SECS + DAY_SECS <= now)
        {
            self.buckets.pop_front();
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(m, r), (_, bm, br)| {
            (m + u64::from(*bm), r + u64::from(*br))
        })
    }

    /// When enough of the window will have rolled off for `need` more to fit under `limit`.
    fn frees_after(
        &self,
        now: u64,
        limit: u64,
        need: u64,
        pick: impl Fn(&(u64, u32, u32)) -> u64,
    ) -> Duration {
        let mut total: u64 = self.buckets.iter().map(&pick).sum();
        for b in &self.buckets {
            if total + need <= limit {
                break;
            }
            total -= pick(b);
            if total + need <= limit {
                return Duration::from_secs(
                    (b.0 + BUCKET_SECS + DAY_SECS).saturating_sub(now).max(1),
                );
            }
        }
        Duration::from_secs(1)
    }

    fn add(&mut self, now: u64, messages: u32, recipients: u32) {
        let minute = now - now % BUCKET_SECS;
        match self.buckets.back_mut() {
            Some(b) if b.0 == minute => {
                b.1 += messages;
                b.2 += recipients;
            }
            _ => self.buckets.push_back((minute, messages, recipients)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    /// Messages the per-minute bucket holds now (fractional: it refills continuously).
    tokens: f64,
    /// Unix time in milliseconds of the last refill.
    refilled_ms: u64,
    /// When the messages of the last minute went (for limits too small for the bucket alone).
    minute: VecDeque<u64>,
    day: Day,
}

fn burst_of(limits: Pacing) -> u32 {
    (limits.max_messages_per_minute / 20).max(1)
}

/// The rules, on what has been used: one place, whether the usage is this relay's (in memory) or
/// the relays' together (a row read and written in one database transaction).
impl Usage {
    pub fn new(limits: Pacing) -> Usage {
        Usage {
            tokens: f64::from(burst_of(limits)),
            refilled_ms: 0,
            minute: VecDeque::new(),
            day: Day::default(),
        }
    }

    pub fn take(&mut self, l: Pacing, recipients: u32, now_ms: u64) -> Result<(), Wait> {
        let now = now_ms / 1000;
        let s = self;
        let per_minute = l.max_messages_per_minute;
        if per_minute > 0 {
            let burst = burst_of(l);
            // Refilling at (limit - burst) a minute keeps any 60 s window within the limit.
            let refill = per_minute.saturating_sub(burst).max(1);
            let rate = f64::from(refill) / 60_000.0;
            let elapsed = now_ms.saturating_sub(s.refilled_ms) as f64;
            s.tokens = (s.tokens + elapsed * rate).min(f64::from(burst));
            s.refilled_ms = now_ms;
            while s.minute.front().is_some_and(|t| t + 60_000 <= now_ms) {
                s.minute.pop_front();
            }
            let full = s.minute.len() >= per_minute as usize;
            if s.tokens < 1.0 || full {
                let bucket = ((1.0 - s.tokens).max(0.0) / rate).ceil() as u64;
                let window = match (full, s.minute.front()) {
                    (true, Some(t)) => t + 60_000 - now_ms,
                    _ => 0,
                };
                return Err(Wait {
                    after: Duration::from_millis(bucket.max(window).max(1)),
                    limit: "max_messages_per_minute",
                    value: per_minute,
                });
            }
        }
        s.day.expire(now);
        let (messages, rcpts) = s.day.totals();
        if l.max_messages_per_day > 0 && messages + 1 > u64::from(l.max_messages_per_day) {
            return Err(Wait {
                after: s
                    .day
                    .frees_after(now, l.max_messages_per_day.into(), 1, |b| b.1.into()),
                limit: "max_messages_per_day",
                value: l.max_messages_per_day,
            });
        }
        let limit = u64::from(l.max_recipients_per_day);
        if limit > 0 && rcpts + u64::from(recipients) > limit {
            return Err(Wait {
                after: s
                    .day
                    .frees_after(now, limit, recipients.into(), |b| b.2.into()),
                limit: "max_recipients_per_day",
                value: l.max_recipients_per_day,
            });
        }
        if per_minute > 0 {
            s.tokens -= 1.0;
            s.minute.push_back(now_ms);
        }
        s.day.add(now, 1, recipients);
        Ok(())
    }

    /// Spends a turn of the per-minute bucket and window without asking (a message another
    /// relay could not see being sent).
    fn spend_minute(&mut self, l: Pacing, now_ms: u64) {
        let burst = burst_of(l);
        let refill = l.max_messages_per_minute.saturating_sub(burst).max(1);
        let rate = f64::from(refill) / 60_000.0;
        let elapsed = now_ms.saturating_sub(self.refilled_ms) as f64;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst)) - 1.0;
        self.refilled_ms = self.refilled_ms.max(now_ms);
        self.minute.push_back(now_ms);
    }

    pub fn give_back(&mut self, l: Pacing, recipients: u32, now_ms: u64) {
        if l.max_messages_per_minute > 0 {
            let burst = f64::from(burst_of(l));
            self.tokens = (self.tokens + 1.0).min(burst);
            self.minute.pop_back();
        }
        self.day.expire(now_ms / 1000);
        if let Some(b) = self.day.buckets.back_mut() {
            b.1 = b.1.saturating_sub(1);
            b.2 = b.2.saturating_sub(recipients);
        }
    }

    pub fn recipients_left(&mut self, l: Pacing, now_ms: u64) -> usize {
        let cap = l.max_recipients_per_message as usize;
        let per_day = u64::from(l.max_recipients_per_day);
        if per_day == 0 {
            return cap;
        }
        self.day.expire(now_ms / 1000);
        let left = per_day.saturating_sub(self.day.totals().1).max(1) as usize;
        if cap == 0 {
            left
        } else {
            cap.min(left)
        }
    }

    pub fn add_recipient(&mut self, l: Pacing, now_ms: u64) -> Result<(), Wait> {
        let limit = l.max_recipients_per_day;
        let now = now_ms / 1000;
        self.day.expire(now);
        if limit > 0 && self.day.totals().1 + 1 > u64::from(limit) {
            return Err(Wait {
                after: self.day.frees_after(now, limit.into(), 1, |b| b.2.into()),
                limit: "max_recipients_per_day",
                value: limit,
            });
        }
        self.day.add(now, 0, 1);
        Ok(())
    }

    /// Messages and recipients of the last 24 hours.
    pub fn used_today(&mut self, now_ms: u64) -> (u64, u64) {
        self.day.expire(now_ms / 1000);
        self.day.totals()
    }
}

/// An account's sending limits as the message paths ask them (direct submission, queue
/// workers). [`Pacer`] keeps the counts in this relay's memory; a store shared by several relays
/// keeps them in one row every relay updates in a transaction, with the same rules ([`Usage`]),
/// without the callers changing.
pub trait Pace: Send + Sync {
    /// Recipients one upstream transaction may carry (0: no limit).
    fn recipients_per_message(&self) -> usize;
    /// Takes one message with `recipients` recipients at `now_ms` (unix milliseconds), or says
    /// how long until it would fit. Nothing is taken when it does not fit.
    fn take(&self, recipients: u32, now_ms: u64) -> BoxFuture<'_, Result<(), Wait>>;
    /// Gives back a turn taken for a transaction that never reached the provider.
    fn refund(&self, recipients: u32, now_ms: u64);
    /// Recipients one transaction may carry now (the per-message cap and what is left of the
    /// day's; 0: no limit).
    fn recipients_now(&self, now_ms: u64) -> usize;
    /// Counts one more recipient of a transaction already counted (direct mode's RCPTs).
    fn take_recipient(&self, now_ms: u64) -> BoxFuture<'_, Result<(), Wait>>;
}

/// Where a shared store keeps an account's usage (`xoauth_rows`, kind `pace`).
const ROW: &str = "pace";

/// One account's limits and what it has used of them.
pub struct Pacer {
    /// Swapped by a reload; what has been used stays.
    limits: arc_swap::ArcSwap<Pacing>,
    /// This relay's usage; with a shared store, the relays' usage as last read, which this relay
    /// paces by, on its share of the limits, while the database is out of reach.
    state: Mutex<Usage>,
    shared: Option<SharedUsage>,
}

/// The usage of all relays in one database row.
struct SharedUsage {
    store: Arc<dyn Shared>,
    account: String,
    /// The last try failed (one warning per outage).
    offline: AtomicBool,
    /// Turns taken while the database was out of reach, added to the row when it answers.
    counted_offline: Arc<Mutex<Vec<Turn>>>,
    /// A task adding them is running.
    merging: Arc<AtomicBool>,
}

impl SharedUsage {
    /// Adds the turns counted while the database was away to the row once it answers, even if
    /// this relay takes no further turn of the account (one task at a time, every few seconds).
    fn merge_later(&self, l: Pacing) {
        if self.merging.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, account) = (self.store.clone(), self.account.clone());
        let (pending, merging) = (self.counted_offline.clone(), self.merging.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(MERGE_EVERY).await;
                let turns = std::mem::take(&mut *lock(&pending));
                if turns.is_empty() {
                    merging.store(false, Ordering::Release);
                    return;
                }
                let mut change = |old: Option<&[u8]>| {
                    let mut usage = old
                        .and_then(|b| serde_json::from_slice::<Usage>(b).ok())
                        .unwrap_or_else(|| Usage::new(l));
                    for t in &turns {
                        t.count(&mut usage, l);
                    }
                    serde_json::to_vec(&usage).ok()
                };
                if store.update_row(ROW, &account, &mut change).await.is_err() {
                    lock(&pending).splice(0..0, turns);
                }
            }
        });
    }
}

/// How often turns counted offline are offered to the database again.
const MERGE_EVERY: Duration = Duration::from_secs(5);

/// What one call counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// An upstream transaction with this many recipients.
    Message { recipients: u32, now_ms: u64 },
    /// One more recipient of a transaction already counted (direct mode's RCPTs).
    Recipient { now_ms: u64 },
}

impl Turn {
    /// The rules: counted if they allow it.
    fn check(self, usage: &mut Usage, l: Pacing) -> Result<(), Wait> {
        match self {
            Turn::Message { recipients, now_ms } => usage.take(l, recipients, now_ms),
            Turn::Recipient { now_ms } => usage.add_recipient(l, now_ms),
        }
    }

    /// Counted whatever the rules say: it happened (while the others could not see it).
    fn count(self, usage: &mut Usage, l: Pacing) {
        let unlimited = Pacing {
            max_messages_per_minute: 0,
            max_recipients_per_message: 0,
            max_messages_per_day: 0,
            max_recipients_per_day: 0,
        };
        match self {
            Turn::Message { recipients, now_ms } => {
                if l.max_messages_per_minute > 0 {
                    usage.spend_minute(l, now_ms);
                }
                let _ = usage.take(unlimited, recipients, now_ms);
            }
            Turn::Recipient { now_ms } => {
                let _ = usage.add_recipient(unlimited, now_ms);
            }
        }
    }
}

/// Each limit divided among `relays` (at least 1 where there is a limit): what one relay may do
/// alone while it cannot see the others' counts.
fn share_of(l: Pacing, relays: usize) -> Pacing {
    let part = |v: u32| {
        if v == 0 {
            0
        } else {
            (v / relays.max(1) as u32).max(1)
        }
    };
    Pacing {
        max_messages_per_minute: part(l.max_messages_per_minute),
        max_recipients_per_message: l.max_recipients_per_message,
        max_messages_per_day: part(l.max_messages_per_day),
        max_recipients_per_day: part(l.max_recipients_per_day),
    }
}

impl Pacer {
    pub fn new(limits: Pacing) -> Pacer {
        Pacer {
            limits: arc_swap::ArcSwap::from_pointee(limits),
            state: Mutex::new(Usage::new(limits)),
            shared: None,
        }
    }

    /// A pacer whose usage is the relays' together, in `store`.
    fn shared(limits: Pacing, store: Arc<dyn Shared>, account: &str) -> Pacer {
        Pacer {
            shared: Some(SharedUsage {
                store,
                account: account.to_string(),
                offline: AtomicBool::new(false),
                counted_offline: Arc::new(Mutex::new(Vec::new())),
                merging: Arc::new(AtomicBool::new(false)),
            }),
            ..Pacer::new(limits)
        }
    }

    pub fn limits(&self) -> Pacing {
        **self.limits.load()
    }

    /// Counts `turn` in the relays' usage in the database (written back when the rules allow
    /// it); while the database is out of reach, in this relay's copy under its share of the
    /// limits, and those turns are added to the row once it answers again.
    async fn shared_turn(&self, sh: &SharedUsage, turn: Turn) -> Result<(), Wait> {
        let l = self.limits();
        // Turns counted while the database was away go in with this one (taken out, so that two
        // callers never add them twice; put back if the database is still away).
        let offline: Vec<Turn> = std::mem::take(&mut *lock(&sh.counted_offline));
        let mut outcome = None;
        let mut seen = None;
        let mut change = |old: Option<&[u8]>| {
            let mut usage = old
                .and_then(|b| serde_json::from_slice::<Usage>(b).ok())
                .unwrap_or_else(|| Usage::new(l));
            for t in &offline {
                t.count(&mut usage, l);
            }
            let allowed = turn.check(&mut usage, l);
            let write = (allowed.is_ok() || !offline.is_empty())
                .then(|| serde_json::to_vec(&usage).ok())
                .flatten();
            seen = Some(usage);
            outcome = Some(allowed);
            write
        };
        let done = sh.store.update_row(ROW, &sh.account, &mut change).await;
        match (done, outcome) {
            (Ok(()), Some(allowed)) => {
                if sh.offline.swap(false, Ordering::Relaxed) {
                    tracing::info!(account = %sh.account, "pacing shared with the other relays again");
                }
                if let Some(usage) = seen {
                    *lock(&self.state) = usage;
                }
                allowed
            }
            (done, _) => {
                lock(&sh.counted_offline).splice(0..0, offline);
                let relays = sh.store.relays_seen();
                if !sh.offline.swap(true, Ordering::Relaxed) {
                    let error = done.err().map(|e| e.0).unwrap_or_default();
                    tracing::warn!(account = %sh.account, %error, relays, "the database is out of reach: pacing this relay alone on its share of the limits");
                }
                let allowed = turn.check(&mut lock(&self.state), share_of(l, relays));
                if allowed.is_ok() {
                    lock(&sh.counted_offline).push(turn);
                    sh.merge_later(l);
                }
                allowed
            }
        }
    }

    fn limited(&self) -> bool {
        let l = self.limits();
        l.max_messages_per_minute > 0 || l.max_messages_per_day > 0 || l.max_recipients_per_day > 0
    }

    /// Messages and recipients of the last 24 hours.
    #[cfg(test)]
    fn used_today(&self, now_ms: u64) -> (u64, u64) {
        lock(&self.state).used_today(now_ms)
    }

    /// [`Pace::take`] without the future, for the rules' tests.
    #[cfg(test)]
    fn take(&self, recipients: u32, now_ms: u64) -> Result<(), Wait> {
        lock(&self.state).take(self.limits(), recipients, now_ms)
    }
}

impl Pace for Pacer {
    fn recipients_per_message(&self) -> usize {
        self.limits().max_recipients_per_message as usize
    }

    fn take(&self, recipients: u32, now_ms: u64) -> BoxFuture<'_, Result<(), Wait>> {
        match &self.shared {
            // Without limits there is nothing to count together: no round trip.
            Some(sh) if self.limited() => {
                Box::pin(self.shared_turn(sh, Turn::Message { recipients, now_ms }))
            }
            _ => {
                let taken = lock(&self.state).take(self.limits(), recipients, now_ms);
                Box::pin(std::future::ready(taken))
            }
        }
    }

    fn refund(&self, recipients: u32, now_ms: u64) {
        let l = self.limits();
        lock(&self.state).give_back(l, recipients, now_ms);
        if let Some(sh) = self.shared.as_ref().filter(|_| self.limited()) {
            // A turn counted while the database was away is taken back here, not in the row.
            {
                let mut pending = lock(&sh.counted_offline);
                let same = pending.iter().rposition(
                    |t| matches!(t, Turn::Message { recipients: r, .. } if *r == recipients),
                );
                if let Some(at) = same {
                    pending.remove(at);
                    return;
                }
            }
            let (store, account) = (sh.store.clone(), sh.account.clone());
            tokio::spawn(async move {
                let mut change = |old: Option<&[u8]>| {
                    let mut usage: Usage = serde_json::from_slice(old?).ok()?;
                    usage.give_back(l, recipients, now_ms);
                    serde_json::to_vec(&usage).ok()
                };
                let _ = store.update_row(ROW, &account, &mut change).await;
            });
        }
    }

    fn recipients_now(&self, now_ms: u64) -> usize {
        lock(&self.state).recipients_left(self.limits(), now_ms)
    }

    fn take_recipient(&self, now_ms: u64) -> BoxFuture<'_, Result<(), Wait>> {
        match &self.shared {
            Some(sh) if self.limits().max_recipients_per_day > 0 => {
                Box::pin(self.shared_turn(sh, Turn::Recipient { now_ms }))
            }
            _ => {
                let taken = lock(&self.state).add_recipient(self.limits(), now_ms);
                Box::pin(std::future::ready(taken))
            }
        }
    }
}

/// Every account's pacer, and the daily windows as they are persisted.
pub struct Pacers {
    accounts: Keyed<Pacer>,
    clock: SharedClock,
    /// The monotonic clock at start and the wall clock then: pacing follows the monotonic clock
    /// (which tests can pause), in wall-clock milliseconds (which can be persisted).
    origin: (tokio::time::Instant, u64),
    shared: Option<Arc<dyn Shared>>,
}

impl Pacers {
    /// `shared`: a store several relays share, where the accounts' usage is counted together.
    pub fn new(
        accounts: &[Arc<Account>],
        clock: SharedClock,
        shared: Option<Arc<dyn Shared>>,
    ) -> Pacers {
        let origin = (clock.now(), clock.unix() * 1000);
        let pacers = Pacers {
            accounts: Keyed::default(),
            clock,
            origin,
            shared,
        };
        pacers.reconfigure(accounts);
        pacers
    }

    fn pacer_for(&self, a: &Account) -> Pacer {
        match &self.shared {
            Some(store) => Pacer::shared(a.pacing, store.clone(), &a.name),
            None => Pacer::new(a.pacing),
        }
    }

    /// Unix milliseconds as pacing counts them.
    pub fn now_ms(&self) -> u64 {
        let since = self.clock.now().saturating_duration_since(self.origin.0);
        self.origin.1 + since.as_millis() as u64
    }

    pub fn get(&self, account: &str) -> Option<Arc<dyn Pace>> {
        self.accounts.get(account).map(|p| p as Arc<dyn Pace>)
    }

    /// A reloaded config: new accounts get a pacer, changed limits apply from the next turn on,
    /// with what each account already used kept.
    pub fn reconfigure(&self, accounts: &[Arc<Account>]) {
        for a in accounts {
            let p = self.accounts.insert_missing(&a.name, || self.pacer_for(a));
            if p.limits() != a.pacing {
                p.limits.store(Arc::new(a.pacing));
            }
        }
    }

    /// The daily windows, for the file they are kept in between runs.
    pub fn snapshot(&self) -> Vec<u8> {
        let all = self.accounts.all();
        let days: HashMap<&str, Day> = all
            .iter()
            .map(|(name, p)| (name.as_str(), lock(&p.state).day.clone()))
            .collect();
        serde_json::to_vec(&days).unwrap_or_default()
    }

    /// Restores what [`Pacers::snapshot`] wrote; unknown accounts and a damaged file are ignored
    /// (a lost window errs towards the provider's throttling, never towards losing mail).
    pub fn restore(&self, bytes: &[u8]) {
        let Ok(days) = serde_json::from_slice::<HashMap<String, Day>>(bytes) else {
            return;
        };
        for (name, day) in days {
            if let Some(p) = self.accounts.get(&name) {
                lock(&p.state).day = day;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(per_minute: u32, per_day: u32, rcpts_per_day: u32) -> Pacer {
        Pacer::new(Pacing {
            max_messages_per_minute: per_minute,
            max_recipients_per_message: 0,
            max_messages_per_day: per_day,
            max_recipients_per_day: rcpts_per_day,
        })
    }

    #[test]
    fn the_minute_bucket_allows_a_twentieth_as_burst_and_no_window_holds_more_than_the_limit() {
        let p = pacer(600, 0, 0);
        let t0 = 1_000_000_000;
        // Burst of 30 at once, then 570 a minute.
        for _ in 0..30 {
            p.take(1, t0).unwrap();
        }
        let wait = p.take(1, t0).unwrap_err();
        assert_eq!(wait.limit, "max_messages_per_minute");
        assert_eq!(wait.after, Duration::from_millis(106));
        let mut times = vec![t0; 30];
        for ms in (1..=180_000).step_by(10) {
            if p.take(1, t0 + ms).is_ok() {
                times.push(t0 + ms);
            }
        }
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|u| **u < t + 60_000).count();
            assert!(in_window <= 600, "{in_window} in the minute from {t}");
        }
        // A backlog of 300 goes in about 28 s.
        assert!(
            (28_300..28_500).contains(&(times[299] - t0)),
            "{}",
            times[299] - t0
        );
    }

    #[test]
    fn a_small_limit_still_has_a_burst_of_one_and_keeps_the_minute() {
        let p = pacer(1, 0, 0);
        p.take(1, 0).unwrap();
        assert_eq!(p.take(1, 0).unwrap_err().after, Duration::from_secs(60));
        p.take(1, 60_000).unwrap();
        let p = pacer(10, 0, 0);
        p.take(1, 0).unwrap();
        assert_eq!(p.take(1, 0).unwrap_err().after, Duration::from_millis(6667));
    }

    #[test]
    fn relays_taking_turns_from_one_stored_usage_keep_every_minute_within_the_limit() {
        // What two relays sharing a store do for each message: read the row, apply the rule,
        // write it back (in one transaction).
        let l = Pacing {
            max_messages_per_minute: 20,
            max_recipients_per_message: 0,
            max_messages_per_day: 0,
            max_recipients_per_day: 0,
        };
        let mut row: Option<Vec<u8>> = None;
        let mut sent = Vec::new();
        for ms in (0..180_000u64).step_by(100) {
            for _relay in 0..2 {
                let mut usage = row
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<Usage>(b).ok())
                    .unwrap_or_else(|| Usage::new(l));
                if usage.take(l, 1, ms).is_ok() {
                    row = Some(serde_json::to_vec(&usage).unwrap());
                    sent.push(ms);
                }
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..].iter().take_while(|u| **u < t + 60_000).count();
            assert!(in_window <= 20, "{in_window} in the minute from {t}");
        }
        // Together at the limit's pace (19 a minute after the burst of 1), not twice it.
        assert!((55..=60).contains(&sent.len()), "{}", sent.len());
    }

    #[test]
    fn turns_taken_while_the_database_was_away_count_when_it_answers() {
        let l = Pacing {
            max_messages_per_minute: 20,
            max_recipients_per_message: 0,
            max_messages_per_day: 100,
            max_recipients_per_day: 0,
        };
        // The stored row, and three messages one relay sent on its share meanwhile.
        let mut row = Usage::new(l);
        let t0 = 1_000_000_000;
        for _ in 0..3 {
            Turn::Message {
                recipients: 2,
                now_ms: t0,
            }
            .count(&mut row, l);
        }
        assert_eq!(row.used_today(t0 + 1_000), (3, 6));
        // The bucket owes them too: the next turn waits until they are paid off (about 9.5 s
        // at 19 a minute), instead of making four within a second.
        let wait = row.take(l, 1, t0 + 1_000).unwrap_err();
        assert_eq!(wait.limit, "max_messages_per_minute");
        assert!(wait.after > Duration::from_secs(8), "{:?}", wait.after);
    }

    #[test]
    fn a_refund_gives_the_turn_back() {
        let p = pacer(10, 2, 0);
        p.take(3, 0).unwrap();
        assert!(p.take(1, 0).is_err());
        p.refund(3, 0);
        assert_eq!(p.used_today(0), (0, 0));
        p.take(1, 0).unwrap();
    }

    #[test]
    fn daily_windows_roll_and_survive_a_restart() {
        let pacers = Pacers {
            accounts: Keyed::new([("news".to_string(), pacer(0, 2, 5))]),
            clock: crate::util::clock::system(),
            origin: (tokio::time::Instant::now(), 0),
            shared: None,
        };
        let p = pacers.accounts.get("news").unwrap();
        let t0 = 10 * DAY_SECS * 1000;
        p.take(3, t0).unwrap();
        let wait = p.take(3, t0 + 60_000).unwrap_err();
        assert_eq!(wait.limit, "max_recipients_per_day");
        p.take(2, t0 + 60_000).unwrap();
        let wait = p.take(1, t0 + 120_000).unwrap_err();
        assert_eq!(wait.limit, "max_messages_per_day");
        // The first message rolls off a day after its minute ended.
        assert_eq!(wait.after, Duration::from_secs(DAY_SECS - 60));

        let restarted = Pacers {
            accounts: Keyed::new([("news".to_string(), pacer(0, 2, 5))]),
            clock: crate::util::clock::system(),
            origin: (tokio::time::Instant::now(), 0),
            shared: None,
        };
        restarted.restore(&pacers.snapshot());
        let p = restarted.accounts.get("news").unwrap();
        assert_eq!(p.used_today(t0 + 120_000), (2, 5));
        assert!(p.take(1, t0 + 120_000).is_err());
        p.take(1, t0 + (DAY_SECS + 60) * 1000).unwrap();
    }
}

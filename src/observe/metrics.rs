//! The relay's Prometheus metrics, under the names the operator's dashboards and alert rules use.
//!
//! Counters and histograms are bumped where things happen (`inbound`, `delivery`, `oauth`); gauges
//! that describe state (open upstream connections, token expiry, queue depth) are filled in at
//! scrape time by a [`Gauges`] callback the app installs, so no code path has to keep them in step.
//! Labels carry configured names and fixed words only: never an address, a token or a body.

use crate::util::sync::lock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    pub account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountOutcome {
    account: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountEvent {
    account: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

/// Why a login was refused (`xoauth_relay_auth_failures_total{reason}`).
pub const AUTH_FAILURE_REASONS: [&str; 6] = [
    "bad_credentials",
    "tls_required",
    "locked_out",
    "no_grant",
    "token_unavailable",
    "upstream_refused",
];

/// `xoauth_relay_recipients_total{outcome}`.
const RECIPIENT_OUTCOMES: [&str; 4] = ["accepted", "rejected", "deferred", "bounced"];

/// `xoauth_relay_token_refreshes_total{outcome}`.
const REFRESH_OUTCOMES: [&str; 3] = ["ok", "invalid_grant", "error"];

/// What became of a message the mailer handed over (`xoauth_relay_messages_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Direct mode: the upstream said 250.
    Relayed,
    /// Queue mode: on disk.
    Queued,
    /// The upstream refused it for good (5xx), or the relay did.
    Rejected,
    /// A temporary failure the mailer has to retry.
    Failed,
    /// Queue mode: returned to the sender.
    Bounced,
}

impl MessageOutcome {
    const ALL: [MessageOutcome; 5] = [
        MessageOutcome::Relayed,
        MessageOutcome::Queued,
        MessageOutcome::Rejected,
        MessageOutcome::Failed,
        MessageOutcome::Bounced,
    ];

    fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Relayed => "relayed",
            MessageOutcome::Queued => "queued",
            MessageOutcome::Rejected => "rejected",
            MessageOutcome::Failed => "failed",
            MessageOutcome::Bounced => "bounced",
        }
    }
}

/// A step of the upstream dialogue, for `xoauth_relay_upstream_reply_seconds{step}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// One HTTP API request (Graph, the Gmail API).
    Api,
}

impl Step {
    const ALL: [Step; 6] = [
        Step::Connect,
        Step::Auth,
        Step::Mail,
        Step::Rcpt,
        Step::Data,
        Step::Api,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Auth => "auth",
            Step::Mail => "mail",
            Step::Rcpt => "rcpt",
            Step::Data => "data",
            Step::Api => "api",
        }
    }

    /// The step a command line belongs to, if it is one that is timed (`data` is the reply to the
    /// end of the body, timed where it is sent).
    pub fn of_command(line: &str) -> Option<Step> {
        let verb = line.get(..4)?;
        if verb.eq_ignore_ascii_case("MAIL") {
            Some(Step::Mail)
        } else if verb.eq_ignore_ascii_case("RCPT") {
            Some(Step::Rcpt)
        } else {
            None
        }
    }
}

/// The state-describing gauges, cleared and refilled at each scrape.
pub struct Gauges {
    pub upstream_connections: Family<AccountLabel, Gauge>,
    pub token_expiry_seconds: Family<AccountLabel, Gauge>,
    pub grant_ok: Family<AccountLabel, Gauge>,
    pub queue_messages: Family<AccountLabel, Gauge>,
    pub queue_oldest_seconds: Family<AccountLabel, Gauge>,
    pub account_paused: Family<AccountLabel, Gauge>,
    /// With a store several relays share: 1 while its database answers.
    pub database_up: Family<DatabaseLabel, Gauge>,
}

/// The shared database, as `user@host:port/db` (never the password).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabaseLabel {
    pub database: String,
}

impl Gauges {
    fn all(&self) -> [&Family<AccountLabel, Gauge>; 6] {
        [
            &self.upstream_connections,
            &self.token_expiry_seconds,
            &self.grant_ok,
            &self.queue_messages,
            &self.queue_oldest_seconds,
            &self.account_paused,
        ]
    }

    pub fn set_database(&self, database: &str, up: bool) {
        self.database_up
            .get_or_create(&DatabaseLabel {
                database: database.to_string(),
            })
            .set(i64::from(up));
    }

    pub fn set(family: &Family<AccountLabel, Gauge>, account: &str, value: i64) {
        family
            .get_or_create(&AccountLabel {
                account: account.to_string(),
            })
            .set(value);
    }
}

fn reply_histogram() -> Histogram {
    // 5 ms to about 2.7 minutes: a local fake answers in the first bucket, a slow provider's end of
    // data in the last ones.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Every metric of one relay process.
pub struct Metrics {
    registry: Registry,
    sessions_active: Gauge,
    sessions: Family<ListenerLabel, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    messages: Family<AccountOutcome, Counter>,
    message_bytes: Family<AccountLabel, Counter>,
    recipients: Family<AccountOutcome, Counter>,
    upstream_reply: Family<StepLabel, Histogram, fn() -> Histogram>,
    token_refreshes: Family<AccountOutcome, Counter>,
    alerts: Family<AccountEvent, Counter>,
    queue_corrupt: Counter,
    header_refused: Family<AccountLabel, Counter>,
    pub gauges: Gauges,
    /// One scrape at a time: each clears and refills the shared gauges.
    scraping: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sessions_active = Gauge::default();
        let sessions = Family::default();
        let auth_failures = Family::default();
        let messages = Family::default();
        let message_bytes = Family::default();
        let recipients = Family::default();
        let upstream_reply =
            Family::<StepLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                reply_histogram,
            );
        let token_refreshes = Family::default();
        let alerts = Family::default();
        let queue_corrupt = Counter::default();
        let header_refused = Family::default();
        let gauges = Gauges {
            upstream_connections: Family::default(),
            token_expiry_seconds: Family::default(),
            grant_ok: Family::default(),
            queue_messages: Family::default(),
            queue_oldest_seconds: Family::default(),
            account_paused: Family::default(),
            database_up: Family::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        let r = &mut registry;
        r.register(
            "xoauth_relay_sessions_active",
            "Mailer sessions open now",
            sessions_active.clone(),
        );
        r.register(
            "xoauth_relay_sessions",
            "Mailer sessions accepted, by listener",
            sessions.clone(),
        );
        r.register(
            "xoauth_relay_auth_failures",
            "Refused logins, by reason",
            auth_failures.clone(),
        );
        r.register(
            "xoauth_relay_messages",
            "Messages handed over by mailers, by account and outcome",
            messages.clone(),
        );
        r.register(
            "xoauth_relay_message_bytes",
            "Bytes of message bodies relayed or queued, by account",
            message_bytes.clone(),
        );
        r.register(
            "xoauth_relay_recipients",
            "Recipients, by account and outcome",
            recipients.clone(),
        );
        r.register(
            "xoauth_relay_upstream_reply_seconds",
            "Time until the upstream's reply, by step",
            upstream_reply.clone(),
        );
        r.register(
            "xoauth_relay_token_refreshes",
            "Requests to the token endpoint, by account and outcome",
            token_refreshes.clone(),
        );
        r.register(
            "xoauth_relay_alerts",
            "Alerts fired, by account and event",
            alerts.clone(),
        );
        r.register(
            "xoauth_relay_queue_corrupt",
            "Damaged spool records found (their bytes kept in queue/corrupt/)",
            queue_corrupt.clone(),
        );
        r.register(
            "xoauth_relay_header_recipients_refused",
            "Messages refused for an API transport because To/Cc/Bcc name an address the envelope does not \
             (header_recipients = \"refuse\"), by account",
            header_refused.clone(),
        );
        let g = &gauges;
        r.register(
            "xoauth_relay_upstream_connections",
            "Open upstream connections (idle ones included), by account",
            g.upstream_connections.clone(),
        );
        r.register(
            "xoauth_relay_token_expiry_seconds",
            "Seconds until the cached access token expires, by account",
            g.token_expiry_seconds.clone(),
        );
        r.register(
            "xoauth_relay_grant_ok",
            "1 when the account's grant is usable, 0 when missing, revoked or failing",
            g.grant_ok.clone(),
        );
        r.register(
            "xoauth_relay_queue_messages",
            "Messages waiting in the queue, by account",
            g.queue_messages.clone(),
        );
        r.register(
            "xoauth_relay_queue_oldest_seconds",
            "Age of the oldest queued message, by account",
            g.queue_oldest_seconds.clone(),
        );
        r.register(
            "xoauth_relay_account_paused",
            "1 while the account's deliveries are paused (throttled or held)",
            g.account_paused.clone(),
        );
        r.register(
            "xoauth_relay_database_up",
            "1 while the database several relays share answers, 0 while it does not (only with [store] backend = \"postgres\")",
            g.database_up.clone(),
        );
        Metrics {
            registry,
            sessions_active,
            sessions,
            auth_failures,
            messages,
            message_bytes,
            recipients,
            upstream_reply,
            token_refreshes,
            alerts,
            queue_corrupt,
            header_refused,
            gauges,
            scraping: std::sync::Mutex::new(()),
        }
    }

    /// A damaged spool record was found.
    pub fn queue_corrupt(&self) {
        self.queue_corrupt.inc();
    }

    /// A message for an API transport was refused for its header recipients.
    pub fn header_recipients_refused(&self, account: &str) {
        self.header_refused
            .get_or_create(&AccountLabel {
                account: account.to_string(),
            })
            .inc();
    }

    /// A session started on `listener` (its configured address); the guard ends it.
    pub fn session(&self, listener: &str) -> SessionGuard {
        self.sessions
            .get_or_create(&ListenerLabel {
                listener: listener.to_string(),
            })
            .inc();
        self.sessions_active.inc();
        SessionGuard(self.sessions_active.clone())
    }

    /// Every series of these listeners and accounts at 0, so that a rate or `increase()` rule
    /// has a series to work on before the first event (absent is not zero to Prometheus).
    pub fn prepare(&self, listeners: &[String], accounts: &[&str], events: &[&'static str]) {
        for listener in listeners {
            let label = ListenerLabel {
                listener: listener.clone(),
            };
            self.sessions.get_or_create_owned(&label);
        }
        for reason in AUTH_FAILURE_REASONS {
            self.auth_failures
                .get_or_create_owned(&ReasonLabel { reason });
        }
        self.step_timers();
        for &account in accounts {
            self.account(account);
            self.header_refused.get_or_create_owned(&AccountLabel {
                account: account.to_string(),
            });
            let with = |outcome| AccountOutcome {
                account: account.to_string(),
                outcome,
            };
            for outcome in RECIPIENT_OUTCOMES {
                self.recipients.get_or_create_owned(&with(outcome));
            }
            for outcome in REFRESH_OUTCOMES {
                self.token_refreshes.get_or_create_owned(&with(outcome));
            }
            for &event in events {
                let label = AccountEvent {
                    account: account.to_string(),
                    event,
                };
                self.alerts.get_or_create_owned(&label);
            }
        }
    }

    /// A refused login; `reason` is one of [`AUTH_FAILURE_REASONS`].
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The message counters of `account`, looked up once (a session holds them) so that counting
    /// a message is an atomic add, not a label lookup.
    pub fn account(&self, account: &str) -> AccountCounters {
        let with = |outcome| AccountOutcome {
            account: account.to_string(),
            outcome,
        };
        AccountCounters {
            messages: MessageOutcome::ALL
                .map(|o| self.messages.get_or_create_owned(&with(o.as_str()))),
            bytes: self.message_bytes.get_or_create_owned(&AccountLabel {
                account: account.to_string(),
            }),
            accepted: self.recipients.get_or_create_owned(&with("accepted")),
            rejected: self.recipients.get_or_create_owned(&with("rejected")),
        }
    }

    /// The reply-time histograms, looked up once per upstream connection.
    pub fn step_timers(&self) -> StepTimers {
        StepTimers(Step::ALL.map(|s| {
            self.upstream_reply
                .get_or_create_owned(&StepLabel { step: s.as_str() })
        }))
    }

    /// Recipients of `account` with `outcome` (one of `RECIPIENT_OUTCOMES`).
    pub fn recipients(&self, account: &str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.recipients
                .get_or_create(&AccountOutcome {
                    account: account.to_string(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    /// A token request for `account`: `ok`, `invalid_grant` or `error`.
    pub fn token_refresh(&self, account: &str, outcome: &'static str) {
        self.token_refreshes
            .get_or_create(&AccountOutcome {
                account: account.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn alert(&self, account: &str, event: &'static str) {
        self.alerts
            .get_or_create(&AccountEvent {
                account: account.to_string(),
                event,
            })
            .inc();
    }

    /// The text exposition, after `fill` has set the gauges afresh.
    pub fn encode(&self, fill: &dyn Fn(&Gauges)) -> String {
        let _one = lock(&self.scraping);
        for family in self.gauges.all() {
            family.clear();
        }
        self.gauges.database_up.clear();
        fill(&self.gauges);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The OpenMetrics exposition rewritten as Prometheus text 0.0.4, for scrapers that do not ask
/// for OpenMetrics (curl, older agents): counters are named with their `_total` in `# HELP` and
/// `# TYPE`, and `# UNIT` and `# EOF` are left out. Samples are the same.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(&line.replace(" unknown", " untyped"));
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// One account's message and recipient counters (see [`Metrics::account`]).
#[derive(Clone)]
pub struct AccountCounters {
    messages: [Counter; 5],
    bytes: Counter,
    accepted: Counter,
    rejected: Counter,
}

impl AccountCounters {
    /// A message's end; the bytes of those relayed or queued are counted too.
    pub fn message(&self, outcome: MessageOutcome, bytes: usize) {
        let i = MessageOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.messages[i].inc();
        if matches!(outcome, MessageOutcome::Relayed | MessageOutcome::Queued) {
            self.bytes.inc_by(bytes as u64);
        }
    }

    /// Recipients the upstream accepted (direct mode: with the message).
    pub fn accepted(&self, n: u64) {
        self.accepted.inc_by(n);
    }

    /// A recipient the upstream refused at RCPT.
    pub fn rejected(&self) {
        self.rejected.inc();
    }
}

/// `xoauth_relay_upstream_reply_seconds` by step, for one connection.
#[derive(Clone)]
pub struct StepTimers([Histogram; 6]);

impl StepTimers {
    pub fn observe(&self, step: Step, elapsed: std::time::Duration) {
        let i = Step::ALL.iter().position(|s| *s == step).unwrap_or(0);
        self.0[i].observe(elapsed.as_secs_f64());
    }
}

/// Counts a session as active until dropped.
pub struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones() {
        let m = Metrics::new();
        let _s = m.session("127.0.0.1:587");
        m.auth_failure("bad_credentials");
        let news = m.account("news");
        news.message(MessageOutcome::Relayed, 100);
        news.accepted(2);
        m.step_timers()
            .observe(Step::Data, std::time::Duration::from_millis(3));
        m.token_refresh("news", "ok");
        let text = m.encode(&|g| Gauges::set(&g.grant_ok, "news", 1));
        for line in [
            "xoauth_relay_sessions_active 1",
            "xoauth_relay_sessions_total{listener=\"127.0.0.1:587\"} 1",
            "xoauth_relay_auth_failures_total{reason=\"bad_credentials\"} 1",
            "xoauth_relay_messages_total{account=\"news\",outcome=\"relayed\"} 1",
            "xoauth_relay_message_bytes_total{account=\"news\"} 100",
            "xoauth_relay_recipients_total{account=\"news\",outcome=\"accepted\"} 2",
            "xoauth_relay_upstream_reply_seconds_count{step=\"data\"} 1",
            "xoauth_relay_token_refreshes_total{account=\"news\",outcome=\"ok\"} 1",
            "xoauth_relay_grant_ok{account=\"news\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(_s);
        assert!(m.encode(&|_| {}).contains("xoauth_relay_sessions_active 0"));
    }

    #[test]
    fn prometheus_text_names_counters_with_their_total() {
        let m = Metrics::new();
        m.auth_failure("bad_credentials");
        m.step_timers()
            .observe(Step::Data, std::time::Duration::from_millis(3));
        let open = m.encode(&|g| Gauges::set(&g.grant_ok, "news", 1));
        assert!(open.contains("# TYPE xoauth_relay_auth_failures counter"));
        assert!(open.ends_with("# EOF\n"));
        let text = prometheus_text(&open);
        for line in [
            "# TYPE xoauth_relay_auth_failures_total counter",
            "xoauth_relay_auth_failures_total{reason=\"bad_credentials\"} 1",
            "# TYPE xoauth_relay_grant_ok gauge",
            "xoauth_relay_grant_ok{account=\"news\"} 1",
            "# TYPE xoauth_relay_upstream_reply_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(text.contains("# HELP xoauth_relay_auth_failures_total "));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }
}

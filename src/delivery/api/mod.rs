//! The HTTP API transports: Microsoft Graph `sendMail` and the Gmail API, for tenants where SMTP
//! AUTH is off. The mailer side does not change: it still speaks SMTP to the relay.
//!
//! An API takes a whole message in one request (or, for Graph's large way, a few), so the
//! transaction answers the recipient and DATA stages itself, keeps the body where a retry can
//! read it again ([`spill`]), and sends at the end of data. Before sending, the copy's header
//! section is made to say what the envelope says ([`envelope`]). One request covers all
//! recipients: they share its outcome, read once by [`answer`]. Requests for one account run at
//! most `max_upstream_connections` at once (the pool's [`Slots`]); a refused token is refreshed
//! and the request made once more; a refusal of the grant is remembered for a minute and alerted,
//! like an SMTP `535`.

pub mod answer;
pub mod envelope;
pub mod gmail;
pub mod graph;
pub mod spill;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use self::answer::{api_name, reading, Answer, Reading};
use self::spill::Spill;
use super::slots::Slots;
use super::status::{Cause, Status};
use super::transport::{Begun, MailStart, Transaction, Transport};
use crate::config::{Account, Provider, TransportKind};
use crate::oauth::tokens::{TokenError, TokenManager};
use crate::observe::alerts::Event;
use crate::observe::metrics::Step;
use crate::observe::Observer;
use crate::smtp::body::{BodyChunk, BodyEncoder};
use crate::smtp::Reply;
use crate::util::sync::lock;
use crate::util::BoxFuture;

/// How long a refusal of the account's grant is answered from memory.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

/// Longest answer body read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the relay's limits say about API requests (a reload replaces them).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Connect, and each read of an answer.
    pub timeout: Duration,
    /// How long a message waits for one of the account's request slots.
    pub wait: Duration,
    /// An idle HTTP connection is closed after this.
    pub idle: Duration,
}

impl Settings {
    pub fn of(limits: &crate::config::Limits) -> Settings {
        Settings {
            timeout: Duration::from_secs(limits.upstream_timeout_secs),
            wait: Duration::from_secs(limits.upstream_wait_secs),
            idle: Duration::from_secs(limits.upstream_idle_secs),
        }
    }
}

#[derive(Default)]
struct AccountState {
    /// A request slot was given back.
    freed: Notify,
    /// The API refused the grant: this text until then.
    refused: Mutex<Option<(Instant, String)>>,
}

/// What the API transports share: token manager, HTTP clients, request slots.
pub struct Api {
    tokens: Arc<TokenManager>,
    observer: Observer,
    spill_dir: Arc<PathBuf>,
    slots: Arc<dyn Slots>,
    accounts: Mutex<HashMap<String, Arc<AccountState>>>,
    /// One client per provider (its CA, connection reuse), made again when the provider changes.
    clients: Mutex<HashMap<String, (Arc<Provider>, reqwest::Client)>>,
    settings: arc_swap::ArcSwap<Settings>,
}

pub struct ApiTransport {
    api: Arc<Api>,
}

/// The copy that is submitted: the (rewritten) header section, then the message from `from` on.
pub struct Outgoing {
    head: Bytes,
    from: u64,
    spill: Spill,
}

impl Outgoing {
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.spill.len() - self.from
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The copy as a request body (made again for a retry).
    pub fn stream(
        &self,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        self.spill.stream(self.head.clone(), self.from)
    }

    /// The whole copy in memory.
    pub async fn all(&self) -> std::io::Result<Vec<u8>> {
        let rest = self.spill.all().await?;
        let mut out = Vec::with_capacity(self.len() as usize);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&rest[self.from as usize..]);
        Ok(out)
    }
}

/// What a grant whose token answer listed `granted` (space-separated scopes) lacks for the
/// account's transport, worded with the fix; `None` when it has what it needs (or the transport
/// is SMTP, whose scopes the provider checks at AUTH).
pub fn scope_problem(account: &Account, granted: &str) -> Option<String> {
    // A scope as granted, or with its resource's prefix (Microsoft lists `Mail.Send` or
    // `https://graph.microsoft.com/Mail.Send`; an Outlook `Mail.Send` is another resource's).
    let has = |prefix: &str, names: &[&str]| {
        granted.split_whitespace().any(|s| {
            let s = s.to_ascii_lowercase();
            let bare = s.strip_prefix(prefix).unwrap_or(&s);
            names.iter().any(|n| bare == n.to_ascii_lowercase())
        })
    };
    let graph = "https://graph.microsoft.com/";
    let google = "https://www.googleapis.com/auth/";
    let needed = match account.provider.transport {
        TransportKind::Smtp => return None,
        TransportKind::Graph if has(graph, &["Mail.Send", ".default"]) => return None,
        TransportKind::Graph => "https://graph.microsoft.com/Mail.Send",
        TransportKind::GmailApi
            if has(google, &["gmail.send", "gmail.compose", "gmail.modify"])
                || has("", &["https://mail.google.com/"]) =>
        {
            return None
        }
        TransportKind::GmailApi => "https://www.googleapis.com/auth/gmail.send",
    };
    Some(format!(
        "the grant's scopes ({granted}) lack {needed}, which transport = \"{}\" needs; add it to the \
         provider's `scopes` if they are set, and run `{}` again",
        account.provider.transport.as_str(),
        crate::hints::grant_command(account)
    ))
}

/// `250 2.0.0 OK <id>`: the API took the message.
fn sent(a: &Answer) -> Status {
    let id = a.id.as_deref().unwrap_or("accepted");
    Status::Accepted {
        reply: Reply::new(250, format!("2.0.0 OK {id}")),
    }
}

/// The message could not be kept for the request (the disk).
fn local_error(e: &std::io::Error) -> Status {
    Status::temporary(
        Cause::Deferred,
        Reply::new(
            451,
            format!("4.3.0 Local error keeping the message for the API ({e}); try again later"),
        ),
    )
}

impl ApiTransport {
    pub fn new(
        tokens: Arc<TokenManager>,
        observer: Observer,
        data_dir: &std::path::Path,
        settings: Settings,
        slots: Arc<dyn Slots>,
    ) -> Result<ApiTransport, String> {
        let spill_dir = spill::prepare_dir(data_dir).map_err(|e| {
            format!(
                "cannot prepare {} for API transports: {e}",
                data_dir.join("api-tmp").display()
            )
        })?;
        Ok(ApiTransport {
            api: Arc::new(Api {
                tokens,
                observer,
                spill_dir: Arc::new(spill_dir),
                slots,
                accounts: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                settings: arc_swap::ArcSwap::from_pointee(settings),
            }),
        })
    }

    /// New limits from a reloaded config; clients are made again with them.
    pub fn reconfigure(&self, settings: Settings) {
        self.api.settings.store(Arc::new(settings));
        lock(&self.api.clients).clear();
    }

    /// Requests of `account` running now.
    pub fn requests(&self, account: &str) -> usize {
        self.api.slots.held(account)
    }
}

impl Api {
    fn state(&self, account: &str) -> Arc<AccountState> {
        lock(&self.accounts)
            .entry(account.to_string())
            .or_default()
            .clone()
    }

    fn remembered(&self, account: &str) -> Option<String> {
        let state = self.state(account);
        let mut refused = lock(&state.refused);
        match refused.as_ref() {
            Some((until, text)) if *until > Instant::now() => Some(text.clone()),
            Some(_) => {
                *refused = None;
                None
            }
            None => None,
        }
    }

    fn client(&self, provider: &Arc<Provider>) -> Result<reqwest::Client, String> {
        let mut clients = lock(&self.clients);
        if let Some((p, c)) = clients.get(&provider.name) {
            if **p == **provider {
                return Ok(c.clone());
            }
        }
        let s = **self.settings.load();
        // HTTP/2 where the API offers it: one connection carries the account's requests.
        let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
        let client = crate::util::tls::http_client_builder(provider.http_ca_file.as_deref(), alpn)
            .map_err(|e| format!("provider `{}`: http_ca_file: {e}", provider.name))?
            // Each request gets its deadline from its size (`exchange_once`).
            .connect_timeout(s.timeout)
            .pool_idle_timeout(s.idle)
            .build()
            .map_err(|e| crate::oauth::http::describe(e).0)?;
        clients.insert(provider.name.clone(), (provider.clone(), client.clone()));
        Ok(client)
    }

    /// Waits (up to `upstream_wait_secs`) for one of the account's request slots.
    async fn slot(&self, account: &Account) -> Result<SlotGuard<'_>, Status> {
        let state = self.state(&account.name);
        let cap = account.max_upstream_connections;
        let deadline = Instant::now() + self.settings.load().wait;
        loop {
            let freed = state.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.slots.acquire(&account.name, cap).await {
                return Ok(SlotGuard {
                    api: self,
                    account: account.name.clone(),
                    state: state.clone(),
                });
            }
            // A slot freed by another relay wakes nobody here: look again now and then.
            let look = match self.slots.recheck() {
                Some(every) => (Instant::now() + every).min(deadline),
                None => deadline,
            };
            if tokio::time::timeout_at(look, freed).await.is_err() && look >= deadline {
                tracing::warn!(account = %account.name, cap, "all API request slots busy");
                return Err(Status::temporary(
                    Cause::Busy,
                    Reply::new(
                        451,
                        format!(
                            "4.4.5 account `{}`: all {cap} API requests are busy; try again later",
                            account.name
                        ),
                    ),
                ));
            }
        }
    }

    /// One request with the account's access token; a `401` gets one refresh and one more try.
    /// `Err` is the status that ends the message there (no token, a refused grant, no answer).
    pub async fn call<F>(&self, account: &Account, make: F) -> Result<Answer, Status>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        self.call_as(account, Refusals::OfTheGrant, make).await
    }

    /// [`Api::call`], with a `403` read as `refusals` says.
    pub async fn call_as<F>(
        &self,
        account: &Account,
        refusals: Refusals,
        make: F,
    ) -> Result<Answer, Status>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let client = self.client(&account.provider).map_err(|e| {
            Status::temporary(Cause::Connection, Reply::new(451, format!("4.3.5 {e}")))
        })?;
        let name = &account.name;
        let mut token = self
            .tokens
            .token(name)
            .await
            .map_err(|e| no_token(name, &e))?;
        for attempt in 0.. {
            let answer = self
                .exchange(|| make(&client, token.secret.expose()))
                .await?;
            match reading(&answer) {
                Reading::TokenRefused if attempt == 0 => {
                    tracing::info!(account = %name, answer = %answer.summary(), "the API refused the access token; refreshing and retrying once");
                    token = self
                        .tokens
                        .token_after_rejection(name, &token.secret)
                        .await
                        .map_err(|e| no_token(name, &e))?;
                }
                Reading::GrantRefused if refusals == Refusals::OfTheStep => return Ok(answer),
                Reading::TokenRefused | Reading::GrantRefused => {
                    return Err(self.grant_refused(account, &answer))
                }
                Reading::Sent | Reading::Other => return Ok(answer),
            }
        }
        unreachable!("the loop returns by its second turn")
    }

    /// A request to a pre-authenticated URL (a Graph upload session): no token.
    pub async fn call_unauthenticated<F>(
        &self,
        account: &Account,
        make: F,
    ) -> Result<Answer, Status>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let client = self.client(&account.provider).map_err(|e| {
            Status::temporary(Cause::Connection, Reply::new(451, format!("4.3.5 {e}")))
        })?;
        self.exchange(|| make(&client)).await
    }

    /// One request and its answer; a request whose connection could not be made is made once
    /// more (the API cannot have seen it). One that broke later is not: it may have been taken.
    async fn exchange(&self, make: impl Fn() -> reqwest::RequestBuilder) -> Result<Answer, Status> {
        match self.exchange_once(make()).await {
            Err(e) if e.is_connect() => {
                tracing::info!(error = %crate::oauth::http::describe(e), "API connection failed; trying once more");
                self.exchange_once(make()).await
            }
            other => other,
        }
        .map_err(unreachable_status)
    }

    async fn exchange_once(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, reqwest::Error> {
        let (client, request) = request.build_split();
        let mut request = request?;
        // The whole request has a deadline that grows with its body: `upstream_timeout_secs`
        // for the answer, plus the body at a slow 256 KiB/s (a 35 MB upload: 140 s more).
        let len = request
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let base = self.settings.load().timeout;
        *request.timeout_mut() = Some(base + Duration::from_secs(len / (256 * 1024)));
        let started = Instant::now();
        let mut response = client.execute(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        self.observer
            .metrics
            .step_timers()
            .observe(Step::Api, started.elapsed());
        Ok(Answer::read(status, &headers, &body))
    }

    /// The API refused the grant (a 401 after a refresh, or a 403 about the grant): held,
    /// remembered, alerted.
    fn grant_refused(&self, account: &Account, a: &Answer) -> Status {
        let kind = account.provider.transport;
        let api = api_name(kind);
        let name = &account.name;
        let status = if a.status == 401 {
            Status::temporary(
                Cause::Token,
                Reply::new(
                    454,
                    format!(
                        "4.7.0 account `{name}`: {api} refused the access token also after a refresh ({}); \
                         run `{}`, and `{}` if it persists",
                        crate::hints::command(&format!("test {name}")),
                        crate::hints::command(&format!("authorize {name}")),
                        a.summary()
                    ),
                ),
            )
        } else {
            answer::status_of(kind, name, a)
        };
        let text = status.reply().lines.join(" ");
        let text = text.trim_start_matches("4.7.0 ").to_string();
        tracing::warn!(account = %name, answer = %a.summary(), "{text}");
        let state = self.state(name);
        *lock(&state.refused) = Some((Instant::now() + REFUSAL_MEMORY, text));
        self.observer.alerts.raise(
            Event::UpstreamAuthRejected,
            name,
            &format!("{api}: {}", a.summary()),
            &answer::grant_hint(kind, name),
        );
        status
    }

    /// The status for an answer that is not a success (logged for the operator).
    pub fn refused(&self, account: &Account, a: &Answer) -> Status {
        let status = answer::status_of(account.provider.transport, &account.name, a);
        tracing::warn!(account = %account.name, http = a.status, answer = %a.summary(), reply = %status.reply().summary(), "the API did not take the message");
        status
    }

    /// Sends one message: its header section checked against the envelope, then the request.
    async fn deliver(&self, account: &Account, rcpts: &[String], spill: Spill) -> Status {
        let prefix = match spill.prefix(envelope::MAX_HEADER + 2).await {
            Ok(p) => p,
            Err(e) => return local_error(&e),
        };
        let (header, end) = match envelope::check(&prefix, spill.len(), rcpts, account) {
            Ok(planned) => planned,
            Err(refused) => return refused.counted(&self.observer, &account.name),
        };
        let out = Outgoing {
            head: Bytes::from(header),
            from: end as u64,
            spill,
        };
        let _slot = match self.slot(account).await {
            Ok(slot) => slot,
            Err(status) => return status,
        };
        match account.provider.transport {
            TransportKind::Graph => graph::send(self, account, &out).await,
            _ => gmail::send(self, account, &out).await,
        }
    }
}

/// What a `403` about permissions speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusals {
    /// The grant: the account's mail is held (Mail.Send, gmail.send missing).
    OfTheGrant,
    /// This step only (Graph's large way needs Mail.ReadWrite, which small messages do not).
    OfTheStep,
}

/// A request slot; given back when dropped.
struct SlotGuard<'a> {
    api: &'a Api,
    account: String,
    state: Arc<AccountState>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.api.slots.release(&self.account);
        self.state.freed.notify_one();
    }
}

/// No access token could be had.
fn no_token(account: &str, e: &TokenError) -> Status {
    tracing::warn!(account = %account, error = %e, "no access token for the API");
    Status::temporary(
        Cause::Token,
        Reply::new(454, format!("4.7.0 {}", e.for_mailer())),
    )
}

/// The API could not be reached, or the answer broke off.
fn unreachable_status(e: reqwest::Error) -> Status {
    let e = crate::oauth::http::describe(e);
    tracing::warn!(error = %e, "API request failed");
    Status::temporary(
        Cause::Connection,
        Reply::new(
            451,
            format!("4.4.1 API not available ({e}); try again later"),
        ),
    )
}

impl Api {
    /// A new grant: a remembered refusal of the old one no longer stands.
    fn forget_refusal(&self, account: &str) {
        *lock(&self.state(account).refused) = None;
    }
}

impl Transport for ApiTransport {
    fn begin<'a>(
        &'a self,
        account: &'a Arc<Account>,
        start: MailStart<'a>,
    ) -> BoxFuture<'a, Begun> {
        Box::pin(async move {
            if let Some(why) = self.api.remembered(&account.name) {
                return (
                    Status::temporary(Cause::Token, Reply::new(454, format!("4.7.0 {why}"))),
                    None,
                );
            }
            if let Some(status) = start
                .size
                .and_then(|size| envelope::too_large(account, size))
            {
                return (status, None);
            }
            let tx = ApiTransaction {
                api: self.api.clone(),
                account: account.clone(),
                rcpts: Vec::with_capacity(start.ahead.len()),
                spill: Spill::new(self.api.spill_dir.clone()),
                encoder: BodyEncoder::unstuffed(),
                error: None,
            };
            let ok = Status::Accepted {
                reply: Reply::new(250, "2.1.0 Ok"),
            };
            (ok, Some(Box::new(tx) as Box<dyn Transaction>))
        })
    }

    fn known_refusal(&self, account: &Account) -> Option<String> {
        self.api.remembered(&account.name)
    }

    fn grant_changed(&self, account: &str) {
        self.api.forget_refusal(account);
    }
}

/// A message for an API: its recipients and its body, kept until the end of data.
struct ApiTransaction {
    api: Arc<Api>,
    account: Arc<Account>,
    rcpts: Vec<String>,
    spill: Spill,
    /// Bare CR and LF made CRLF, as for SMTP; no dot-stuffing (this is not DATA).
    encoder: BodyEncoder,
    /// A write to the spill failed: the message fails at its end.
    error: Option<std::io::Error>,
}

impl ApiTransaction {
    async fn keep(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.spill.push(bytes).await {
                self.error = Some(e);
            }
        }
    }
}

impl Transaction for ApiTransaction {
    fn recipient<'a>(&'a mut self, to: &'a str) -> BoxFuture<'a, Status> {
        Box::pin(async move {
            if let Err(reply) = envelope::recipient_allowed(&self.account, self.rcpts.len()) {
                return Status::temporary(Cause::Deferred, reply);
            }
            self.rcpts.push(to.to_string());
            Status::Accepted {
                reply: Reply::new(250, "2.1.5 Ok"),
            }
        })
    }

    fn data(&mut self) -> BoxFuture<'_, Status> {
        Box::pin(async move {
            Status::Accepted {
                reply: Reply::new(354, "End data with <CR><LF>.<CR><LF>"),
            }
        })
    }

    fn body<'a>(&'a mut self, chunk: &'a BodyChunk) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(bytes) = self.encoder.as_is(chunk) {
                self.keep(bytes).await;
            } else {
                let mut out = Vec::with_capacity(chunk.len() + 16);
                self.encoder.encode(chunk.bytes(), &mut out);
                self.keep(&out).await;
            }
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Status> {
        Box::pin(async move {
            let tail = self.encoder.finish_unstuffed();
            self.keep(tail).await;
            if let Some(e) = self.error.take() {
                return local_error(&e);
            }
            if let Err(e) = self.spill.done().await {
                return local_error(&e);
            }
            let ApiTransaction {
                api,
                account,
                rcpts,
                spill,
                ..
            } = *self;
            api.deliver(&account, &rcpts, spill).await
        })
    }

    fn reset(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn abort(self: Box<Self>) {}

    fn answer_ready(&self) -> bool {
        // Every stage before the end is answered here.
        true
    }
}

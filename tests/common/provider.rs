//! The fake provider: its test PKI, what it knows and counts (`State`), and how it starts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use super::*;

/// Test PKI: one CA that signs the fake provider's and the relay's certificates.
#[derive(Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        )
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct Message {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
    /// When the end of data was answered `250`.
    pub at: Option<std::time::Instant>,
    /// Graph's large way: each attachment's name and bytes.
    pub attachments: Vec<(String, Vec<u8>)>,
}

/// A scripted HTTP answer: status, body, extra headers.
pub type Scripted = (u16, String, Vec<(String, String)>);

/// Everything the fake provider knows and counts.
pub struct State {
    pub mailbox: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// Lifetime of issued access tokens, seconds.
    pub lifetime: u64,
    /// Issue a new refresh token on every refresh and invalidate the old one (Microsoft-style).
    pub rotate: bool,
    pub refresh_tokens: HashSet<String>,
    pub access_tokens: HashMap<String, Instant>,
    pub refresh_count: usize,
    pub token_requests: usize,
    pub auth_ok: usize,
    pub auth_rejected: usize,
    /// Lines the SMTP client sent after a 334 error challenge.
    pub challenge_answers: Vec<String>,
    pub messages: Vec<Message>,
    /// Every secret handed out, so tests can look for them in logs and files.
    pub issued: Vec<String>,
    pub counter: u64,
    /// Close the connection after each accepted message, as an upstream with a short idle timeout does.
    pub close_after_message: bool,
    /// Answer AUTH with `432 4.3.2` while this many connections of the user are authenticated
    /// (Exchange Online's per-mailbox limit is 3).
    pub max_authed: Option<usize>,
    /// Authenticated connections open now, and the most seen at once.
    pub authed_now: usize,
    pub authed_peak: usize,
    /// SMTP connections accepted, and QUITs received.
    pub connections: usize,
    pub quits: usize,
    /// Offer no 8BITMIME (a 7-bit server).
    pub seven_bit: bool,
    /// Answer the next end of data with this (then close, if it is a 421).
    pub after_data_reply: Option<String>,
    /// Hold every end of data unanswered while set (clear it and notify `changed` to let go).
    pub hold_data: bool,
    /// Commands that had arrived before the reply to the previous one (the client pipelined).
    pub pipelined: usize,
    /// Notified whenever the SMTP side changes something above.
    pub changed: Arc<tokio::sync::Notify>,
    /// Answer every AUTH with this reply instead of checking the token (e.g. Microsoft's 5.7.139).
    pub auth_reply: Option<String>,
    /// The token endpoint answers 503 with an HTML page.
    pub token_outage: bool,
    /// The SMTP server closes every connection at once, without a greeting (the upstream is down).
    pub down: bool,
    /// Answer every MAIL with this (a quota or throttling reply, say).
    pub mail_reply: Option<String>,
    /// Recipients starting with "once" that have had their one `450` already.
    pub deferred_once: HashSet<String>,
    /// Extra flows (authorization code, device code, ...) register here.
    pub extra: HashMap<String, String>,
    /// Say `refresh_token_expires_in` (what Google tells a Testing-status app).
    pub refresh_lifetime: Option<u64>,
    /// The scopes the token endpoint grants (and says it granted).
    pub token_scope: String,
    /// The scope each access token was issued with.
    pub access_scopes: HashMap<String, String>,
    /// The fake APIs (Graph, Gmail): the next answers, given instead of doing the request.
    pub api_script: std::collections::VecDeque<Scripted>,
    /// Every API request: "METHOD /path".
    pub api_requests: Vec<String>,
    /// API requests running now, and the most at once.
    pub api_now: usize,
    pub api_peak: usize,
    /// Graph drafts and upload sessions.
    pub drafts: HashMap<String, super::api::Draft>,
    pub uploads: HashMap<String, super::api::Upload>,
}

impl State {
    pub fn new_secret(&mut self, kind: &str) -> String {
        self.counter += 1;
        let s = format!("{kind}-{}-{:08x}SECRET", self.counter, rand_u32());
        self.issued.push(s.clone());
        s
    }

    pub fn add_refresh_token(&mut self) -> String {
        let rt = self.new_secret("rt");
        self.refresh_tokens.insert(rt.clone());
        rt
    }

    pub fn issue_access(&mut self) -> String {
        let at = self.new_secret("ya29.at");
        self.access_tokens.insert(
            at.clone(),
            Instant::now() + Duration::from_secs(self.lifetime),
        );
        self.access_scopes
            .insert(at.clone(), self.token_scope.clone());
        at
    }

    pub fn token_json(&mut self, refresh: Option<String>) -> String {
        let at = self.issue_access();
        let mut v = serde_json::json!({"access_token": at, "token_type": "Bearer", "expires_in": self.lifetime, "scope": self.token_scope});
        if let Some(rt) = refresh {
            v["refresh_token"] = rt.into();
        }
        if let Some(secs) = self.refresh_lifetime {
            v["refresh_token_expires_in"] = secs.into();
        }
        v.to_string()
    }

    pub fn token_valid(&self, token: &str) -> bool {
        self.access_tokens
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u32::from_le_bytes(b)
}

pub type Shared = Arc<Mutex<State>>;

/// A parsed HTTP request to the fake token endpoint.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub form: HashMap<String, String>,
}

/// A route of the fake authorization server: `(status, content type, body, extra headers)`.
pub type Handler = Arc<
    dyn Fn(&HttpRequest, &Shared) -> Option<(u16, String, Vec<(String, String)>)> + Send + Sync,
>;

pub struct FakeProvider {
    pub state: Shared,
    pub http_addr: SocketAddr,
    pub smtp_addr: SocketAddr,
    /// The fake Graph (under `/graph/v1.0`) and Gmail API.
    pub api_addr: SocketAddr,
    pub pki: Arc<Pki>,
    pub smtp_mode: &'static str,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mech {
    Xoauth2,
    Oauthbearer,
}

impl FakeProvider {
    /// Starts the token endpoint and an SMTP server in `smtp_mode` ("implicit" or "starttls").
    pub async fn start(smtp_mode: &'static str, extra_routes: Option<Handler>) -> FakeProvider {
        let state = Arc::new(Mutex::new(State {
            mailbox: "news@example.com".into(),
            client_id: "test-client".into(),
            client_secret: Some("test-client-SECRET".into()),
            lifetime: 3600,
            rotate: false,
            refresh_tokens: HashSet::new(),
            access_tokens: HashMap::new(),
            refresh_count: 0,
            token_requests: 0,
            auth_ok: 0,
            auth_rejected: 0,
            challenge_answers: Vec::new(),
            messages: Vec::new(),
            issued: vec!["test-client-SECRET".into()],
            counter: 0,
            close_after_message: false,
            max_authed: None,
            authed_now: 0,
            authed_peak: 0,
            connections: 0,
            quits: 0,
            pipelined: 0,
            seven_bit: false,
            after_data_reply: None,
            hold_data: false,
            down: false,
            mail_reply: None,
            deferred_once: HashSet::new(),
            changed: Arc::new(tokio::sync::Notify::new()),
            auth_reply: None,
            token_outage: false,
            extra: HashMap::new(),
            refresh_lifetime: None,
            token_scope: "https://mail.google.com/".into(),
            access_scopes: HashMap::new(),
            api_script: Default::default(),
            api_requests: Vec::new(),
            api_now: 0,
            api_peak: 0,
            drafts: HashMap::new(),
            uploads: HashMap::new(),
        }));
        let pki = Arc::new(Pki::new());
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        tokio::spawn(http_server(http, state.clone(), extra_routes));
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let smtp_addr = smtp.local_addr().unwrap();
        tokio::spawn(smtp_server(
            smtp,
            state.clone(),
            pki.server_config(),
            smtp_mode == "implicit",
        ));
        let api_addr = super::api::start(state.clone()).await;
        FakeProvider {
            state,
            http_addr,
            smtp_addr,
            api_addr,
            pki,
            smtp_mode,
        }
    }

    /// `api_url` for a provider table with `transport` = "graph" or "gmail_api".
    pub fn api_url(&self, transport: &str) -> String {
        match transport {
            "graph" => format!("http://{}/graph/v1.0", self.api_addr),
            _ => format!("http://{}", self.api_addr),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_addr.port())
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Waits until the fake's state satisfies `done` (no polling: the SMTP side notifies).
    pub async fn until(&self, done: impl Fn(&State) -> bool) {
        let changed = self.state().changed.clone();
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.state()) {
                return;
            }
            notified.await;
        }
    }
}

/// Returns once `hold_data` is clear.
pub async fn held(state: &Shared) {
    let changed = state.lock().unwrap().changed.clone();
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !state.lock().unwrap().hold_data {
            return;
        }
        notified.await;
    }
}

//! Test harness: a fake OAuth provider (token endpoint + SMTP server that checks XOAUTH2 / OAUTHBEARER
//! the way Gmail does), an in-process relay wired to it, and a small SMTP client for the mailer side.
//! Everything listens on 127.0.0.1 with ports chosen by the OS.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}
pub type BoxIo = Box<dyn Io>;

pub fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn b64d(data: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .unwrap_or_default()
}

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
}

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
        at
    }

    pub fn token_json(&mut self, refresh: Option<String>) -> String {
        let at = self.issue_access();
        let mut v = serde_json::json!({"access_token": at, "token_type": "Bearer", "expires_in": self.lifetime});
        if let Some(rt) = refresh {
            v["refresh_token"] = rt.into();
        }
        if let Some(secs) = self.refresh_lifetime {
            v["refresh_token_expires_in"] = secs.into();
        }
        v.to_string()
    }

    fn token_valid(&self, token: &str) -> bool {
        self.access_tokens
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }
}

fn rand_u32() -> u32 {
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
        FakeProvider {
            state,
            http_addr,
            smtp_addr,
            pki,
            smtp_mode,
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
async fn held(state: &Shared) {
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

// ---------------------------------------------------------------------------------------------
// Token endpoint

fn parse_form(s: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(s.as_bytes())
        .into_owned()
        .collect()
}

async fn read_http(stream: &mut TcpStream) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            break (pos + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut first = head.lines().next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Some(HttpRequest {
        method,
        path: path.to_string(),
        query: parse_form(query),
        form: parse_form(&String::from_utf8_lossy(&buf[head_end..head_end + len])),
    })
}

pub fn json_error(code: &str, description: &str) -> (u16, String, Vec<(String, String)>) {
    (
        400,
        serde_json::json!({"error": code, "error_description": description}).to_string(),
        vec![],
    )
}

fn token_route(req: &HttpRequest, state: &Shared) -> (u16, String, Vec<(String, String)>) {
    let mut s = state.lock().unwrap();
    s.token_requests += 1;
    if s.token_outage {
        return (
            503,
            "<html>Service Unavailable</html>".into(),
            vec![("Content-Type".into(), "text/html".into())],
        );
    }
    let grant = req.form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant == "refresh_token" {
        if req.form.get("client_id") != Some(&s.client_id)
            || s.client_secret.is_some()
                && req.form.get("client_secret") != s.client_secret.as_ref()
        {
            return json_error("invalid_client", "bad client credentials");
        }
        s.refresh_count += 1;
        let rt = req.form.get("refresh_token").cloned().unwrap_or_default();
        if !s.refresh_tokens.contains(&rt) {
            return json_error("invalid_grant", "Token has been expired or revoked.");
        }
        let new_rt = if s.rotate {
            s.refresh_tokens.remove(&rt);
            Some(s.add_refresh_token())
        } else {
            None
        };
        return (200, s.token_json(new_rt), vec![]);
    }
    json_error("unsupported_grant_type", grant)
}

async fn http_server(listener: TcpListener, state: Shared, extra: Option<Handler>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let Some(req) = read_http(&mut stream).await else {
                return;
            };
            let routed = extra.as_ref().and_then(|h| h(&req, &state));
            let (status, body, headers) = match routed {
                Some(r) => r,
                None if req.path == "/token" && req.method == "POST" => token_route(&req, &state),
                None => (404, "{}".to_string(), vec![]),
            };
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("Content-Type: application/json\r\n");
            }
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP server

struct Lines {
    io: BoxIo,
    buf: Vec<u8>,
}

impl Lines {
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                );
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads a DATA body up to CRLF.CRLF and undoes dot-stuffing.
    async fn data(&mut self) -> Option<Vec<u8>> {
        let mut raw = b"\r\n".to_vec();
        loop {
            if let Some(pos) = raw.windows(5).position(|w| w == b"\r\n.\r\n") {
                let rest = raw.split_off(pos + 5);
                self.buf = [rest, std::mem::take(&mut self.buf)].concat();
                raw.truncate(pos + 2);
                let body = &raw[2..];
                let mut out = Vec::with_capacity(body.len());
                let mut i = 0;
                while i < body.len() {
                    let at_line_start = i == 0 || (i >= 2 && &body[i - 2..i] == b"\r\n");
                    if at_line_start && body[i] == b'.' {
                        i += 1;
                    }
                    if i < body.len() {
                        out.push(body[i]);
                    }
                    i += 1;
                }
                return Some(out);
            }
            if !self.buf.is_empty() {
                raw.append(&mut self.buf);
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, s: &str) -> Option<()> {
        self.io
            .write_all(format!("{s}\r\n").as_bytes())
            .await
            .ok()?;
        self.io.flush().await.ok()
    }
}

async fn smtp_server(
    listener: TcpListener,
    state: Shared,
    tls: Arc<rustls::ServerConfig>,
    implicit: bool,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        tokio::spawn(async move {
            let io: BoxIo = if implicit {
                match acceptor.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                }
            } else {
                Box::new(tcp)
            };
            {
                let mut s = state.lock().unwrap();
                s.connections += 1;
                s.changed.notify_waiters();
            }
            let _ = smtp_session(
                Lines {
                    io,
                    buf: Vec::new(),
                },
                state,
                acceptor,
                implicit,
            )
            .await;
        });
    }
}

/// Checks an XOAUTH2 or OAUTHBEARER initial response the way Gmail does.
fn check_sasl(mech: Mech, decoded: &str, state: &State) -> bool {
    let parts: Vec<&str> = decoded.split('\x01').collect();
    let (user, auth) = match mech {
        Mech::Xoauth2 => (
            parts.first().and_then(|p| p.strip_prefix("user=")),
            parts.get(1).and_then(|p| p.strip_prefix("auth=Bearer ")),
        ),
        Mech::Oauthbearer => (
            parts
                .first()
                .and_then(|p| p.strip_prefix("n,a="))
                .and_then(|p| p.strip_suffix(',')),
            parts.iter().find_map(|p| p.strip_prefix("auth=Bearer ")),
        ),
    };
    let well_formed = decoded.ends_with("\x01\x01");
    well_formed
        && user == Some(state.mailbox.as_str())
        && auth.is_some_and(|t| state.token_valid(t))
}

/// Counts an authenticated connection until it closes.
struct Authed(Shared);

impl Drop for Authed {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.authed_now -= 1;
        s.changed.notify_waiters();
    }
}

async fn smtp_session(
    mut c: Lines,
    state: Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    mut tls: bool,
) -> Option<()> {
    if state.lock().unwrap().down {
        return None;
    }
    c.send("220 fake.provider ESMTP ready").await?;
    let mut authed = false;
    let mut _authed_guard: Option<Authed> = None;
    let mut msg: Option<Message> = None;
    loop {
        if c.buf.contains(&b'\n') {
            state.lock().unwrap().pipelined += 1;
        }
        let line = c.line().await?;
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let mut caps = vec!["fake.provider", "SIZE 40000000", "SMTPUTF8", "PIPELINING"];
            if !state.lock().unwrap().seven_bit {
                caps.push("8BITMIME");
            }
            if !tls {
                caps.push("STARTTLS");
            }
            caps.push("AUTH XOAUTH2 OAUTHBEARER");
            for (i, cap) in caps.iter().enumerate() {
                let sep = if i + 1 == caps.len() { ' ' } else { '-' };
                c.send(&format!("250{sep}{cap}")).await?;
            }
        } else if upper == "STARTTLS" && !tls {
            c.send("220 2.0.0 go ahead").await?;
            let io = std::mem::replace(&mut c.io, Box::new(tokio::io::duplex(1).0));
            c.io = Box::new(acceptor.accept(io).await.ok()?);
            c.buf.clear();
            tls = true;
        } else if let Some(rest) = upper.strip_prefix("AUTH ") {
            let mech = if rest.starts_with("XOAUTH2") {
                Mech::Xoauth2
            } else {
                Mech::Oauthbearer
            };
            if !tls {
                c.send("530 5.7.0 Must issue a STARTTLS command first")
                    .await?;
                continue;
            }
            let arg = line.split_whitespace().nth(2).unwrap_or("");
            let decoded = String::from_utf8_lossy(&b64d(arg)).to_string();
            let fixed = state.lock().unwrap().auth_reply.clone();
            if let Some(reply) = fixed {
                state.lock().unwrap().auth_rejected += 1;
                c.send(&reply).await?;
                continue;
            }
            let ok = check_sasl(mech, &decoded, &state.lock().unwrap());
            let full = {
                let s = state.lock().unwrap();
                s.max_authed.is_some_and(|max| s.authed_now >= max)
            };
            if ok && full {
                state.lock().unwrap().auth_rejected += 1;
                c.send("432 4.3.2 STOREDRV.ClientSubmit; mailbox concurrent connections limit exceeded")
                    .await?;
            } else if ok {
                {
                    let mut s = state.lock().unwrap();
                    s.auth_ok += 1;
                    s.authed_now += 1;
                    s.authed_peak = s.authed_peak.max(s.authed_now);
                    s.changed.notify_waiters();
                }
                _authed_guard = Some(Authed(state.clone()));
                authed = true;
                c.send("235 2.7.0 Accepted").await?;
            } else {
                state.lock().unwrap().auth_rejected += 1;
                let challenge = match mech {
                    Mech::Xoauth2 => {
                        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
                    }
                    Mech::Oauthbearer => {
                        r#"{"status":"invalid_token","scope":"https://mail.google.com/"}"#
                    }
                };
                c.send(&format!("334 {}", b64(challenge))).await?;
                let answer = c.line().await?;
                state.lock().unwrap().challenge_answers.push(answer.clone());
                let expected = if mech == Mech::Xoauth2 { "" } else { "AQ==" };
                if answer == expected {
                    c.send(
                        "535-5.7.8 Username and Password not accepted. For more information, go to",
                    )
                    .await?;
                    c.send("535 5.7.8  https://support.google.com/mail/?p=BadCredentials x")
                        .await?;
                } else {
                    c.send("501 5.5.2 Cannot Decode response").await?;
                }
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !authed {
                c.send("530 5.7.0 Authentication Required").await?;
                continue;
            }
            let fixed = state.lock().unwrap().mail_reply.clone();
            if let Some(reply) = fixed {
                c.send(&reply).await?;
                continue;
            }
            msg = Some(Message {
                mail_from: line[10..].to_string(),
                ..Default::default()
            });
            c.send("250 2.1.0 OK").await?;
        } else if upper.starts_with("RCPT TO:") {
            let Some(m) = msg.as_mut() else {
                c.send("503 5.5.1 MAIL first").await?;
                continue;
            };
            let addr = line[8..].trim_matches(['<', '>', ' ']).to_string();
            if addr.starts_with("reject") {
                c.send(&format!(
                    "550 5.1.1 The email account that you tried to reach does not exist: {addr}"
                ))
                .await?;
            } else if addr.starts_with("throttle")
                && state
                    .lock()
                    .unwrap()
                    .deferred_once
                    .insert(format!("throttle:{addr}"))
            {
                c.send("451 4.7.500 Server busy. Please try again later")
                    .await?;
            } else if addr.starts_with("stuck") {
                // Throttled every time: one recipient the provider never takes right now.
                c.send("451 4.7.500 Server busy. Please try again later")
                    .await?;
            } else if addr.starts_with("once")
                && state.lock().unwrap().deferred_once.insert(addr.clone())
            {
                c.send("450 4.2.1 Mailbox busy, try again later").await?;
            } else if addr.starts_with("later") {
                c.send(
                    "450 4.2.1 The user you are trying to contact is receiving mail too quickly",
                )
                .await?;
            } else {
                m.rcpts.push(addr);
                c.send("250 2.1.5 OK").await?;
            }
        } else if upper == "DATA" {
            match msg.as_ref() {
                Some(m) if !m.rcpts.is_empty() => {}
                _ => {
                    c.send("503 5.5.1 RCPT first").await?;
                    continue;
                }
            }
            c.send("354 Go ahead").await?;
            let body = c.data().await?;
            held(&state).await;
            let mut m = msg.take().unwrap();
            m.body = body;
            m.at = Some(std::time::Instant::now());
            let big = m.body.len() > 30_000_000;
            let close = {
                let mut s = state.lock().unwrap();
                s.messages.push(m);
                s.changed.notify_waiters();
                s.close_after_message
            };
            let after_data = state.lock().unwrap().after_data_reply.take();
            if let Some(reply) = after_data {
                c.send(&reply).await?;
                if reply.starts_with("421") {
                    return Some(());
                }
            } else if big {
                c.send("552 5.3.4 Your message exceeded Google's message size limits")
                    .await?;
            } else {
                c.send("250 2.0.0 OK 1700000000 x-fake-id").await?;
            }
            if close {
                return Some(());
            }
        } else if upper == "RSET" {
            msg = None;
            c.send("250 2.1.5 Flushed").await?;
        } else if upper == "NOOP" {
            c.send("250 2.0.0 OK").await?;
        } else if upper == "QUIT" {
            {
                let mut s = state.lock().unwrap();
                s.quits += 1;
                s.changed.notify_waiters();
            }
            c.send("221 2.0.0 closing connection").await?;
            return Some(());
        } else {
            c.send("502 5.5.1 Unrecognized command").await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay under test

pub struct RelayOptions {
    pub mechanism: &'static str,
    pub allowed_senders: Option<Vec<String>>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
    pub smtp_port_override: Option<u16>,
    pub token_url_override: Option<String>,
    pub require_tls_for_auth: bool,
    pub extra_provider_toml: String,
    pub extra_accounts_toml: String,
    /// More `[limits]` keys, one per line.
    pub extra_limits_toml: String,
    /// More `[server]` keys, one per line.
    pub extra_server_toml: String,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            mechanism: "xoauth2",
            allowed_senders: None,
            max_message_bytes: 36_700_160,
            max_connections: 1000,
            idle_timeout_secs: 300,
            smtp_port_override: None,
            token_url_override: None,
            require_tls_for_auth: true,
            extra_provider_toml: String::new(),
            extra_accounts_toml: String::new(),
            extra_limits_toml: String::new(),
            extra_server_toml: String::new(),
        }
    }
}

pub const LOGIN: &str = "newsletter";
pub const PASSWORD: &str = "mailer-pw-SECRET";

pub struct Relay {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub starttls: SocketAddr,
    pub implicit: SocketAddr,
    pub plain: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, when `[metrics] address` is set.
    pub metrics: Option<SocketAddr>,
    pub probe: xoauth_relay::app::Probe,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Writes a config for a relay with a `starttls` and an `implicit` listener in front of
/// `provider`, into `dir`.
pub fn write_config(
    dir: &Path,
    provider: &FakeProvider,
    opts: &RelayOptions,
    password_hash: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("certs/upstream-ca.pem"), &provider.pki.ca_pem).unwrap();
    std::fs::write(dir.join("certs/relay.crt"), &provider.pki.cert_pem).unwrap();
    std::fs::write(dir.join("certs/relay.key"), &provider.pki.key_pem).unwrap();
    let allowed = opts
        .allowed_senders
        .as_ref()
        .map(|v| format!("allowed_senders = {v:?}\n"))
        .unwrap_or_default();
    let token_url = opts
        .token_url_override
        .clone()
        .unwrap_or_else(|| format!("{}/token", provider.base_url()));
    let config = format!(
        r#"
[server]
hostname = "relay.test"
data_dir = "{dir}/data"
require_tls_for_auth = {require_tls}
allow_plaintext_loopback = false
{extra_server}

[[listeners]]
address = "127.0.0.1:0"
tls = "starttls"

[[listeners]]
address = "127.0.0.1:0"
tls = "implicit"

[tls]
certificate = "{dir}/certs/relay.crt"
private_key = "{dir}/certs/relay.key"

[limits]
max_message_bytes = {max}
max_recipients = 5
max_connections = {maxconn}
idle_timeout_secs = {idle}
upstream_timeout_secs = 10
{extra_limits}

[providers.fake]
token_url = "{token_url}"
revocation_url = "{base}/revoke"
scopes = ["https://mail.google.com/"]
client_id = "test-client"
client_secret = "test-client-SECRET"
smtp_host = "localhost"
smtp_port = {smtp_port}
smtp_tls = "{smtp_tls}"
smtp_ca_file = "{dir}/certs/upstream-ca.pem"
mechanism = "{mech}"
{extra_provider}

[[accounts]]
name = "news"
login = "{login}"
password_hash = "{hash}"
provider = "fake"
mailbox = "news@example.com"
{allowed}
{extra_accounts}
"#,
        dir = dir.display(),
        require_tls = opts.require_tls_for_auth,
        max = opts.max_message_bytes,
        maxconn = opts.max_connections,
        idle = opts.idle_timeout_secs,
        base = provider.base_url(),
        smtp_port = opts.smtp_port_override.unwrap_or(provider.smtp_addr.port()),
        smtp_tls = provider.smtp_mode,
        mech = opts.mechanism,
        extra_provider = opts.extra_provider_toml,
        login = LOGIN,
        hash = password_hash,
        extra_accounts = opts.extra_accounts_toml,
        extra_limits = opts.extra_limits_toml,
        extra_server = opts.extra_server_toml,
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, config).unwrap();
    path
}

static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn password_hash() -> String {
    HASH.get_or_init(|| xoauth_relay::auth::hash_password(PASSWORD))
        .clone()
}

impl Relay {
    /// Starts a relay in this runtime with a grant for `news` already imported.
    pub async fn start(dir: &Path, provider: &FakeProvider, opts: RelayOptions) -> Relay {
        let config_path = write_config(dir, provider, &opts, &password_hash());
        Relay::start_from(dir, config_path).await
    }

    pub async fn start_from(dir: &Path, config_path: PathBuf) -> Relay {
        let disk = std::sync::Arc::new(xoauth_relay::delivery::queue::disk::Os);
        Relay::start_from_on(dir, config_path, disk).await
    }

    /// A relay whose spool is on `disk` (one that fails on request, say).
    pub async fn start_from_on(
        dir: &Path,
        config_path: PathBuf,
        disk: std::sync::Arc<dyn xoauth_relay::delivery::queue::disk::Disk>,
    ) -> Relay {
        let config = xoauth_relay::config::Config::load(&config_path).unwrap();
        let server = xoauth_relay::app::Relay::bind_on(config, disk)
            .await
            .unwrap();
        let addrs = server.local_addrs();
        let metrics = server.metrics_addr();
        let probe = server.probe();
        let find = |mode| addrs.iter().find(|(_, m)| *m == mode).unwrap().0;
        use xoauth_relay::config::TlsMode;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Relay {
            dir: dir.to_path_buf(),
            config_path,
            starttls: find(TlsMode::Starttls),
            implicit: find(TlsMode::Implicit),
            // Clear text on the STARTTLS port, before STARTTLS.
            plain: find(TlsMode::Starttls),
            metrics,
            probe,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A handle to the same relay for another task (it cannot stop the relay).
    pub fn view(&self) -> Relay {
        Relay {
            dir: self.dir.clone(),
            config_path: self.config_path.clone(),
            starttls: self.starttls,
            implicit: self.implicit,
            plain: self.plain,
            metrics: self.metrics,
            probe: self.probe.clone(),
            shutdown: None,
            handle: None,
        }
    }

    /// Stores `refresh_token` as the grant of `account` through the running relay's control socket.
    pub async fn import(&self, account: &str, refresh_token: &str) {
        let config = xoauth_relay::config::Config::load(&self.config_path).unwrap();
        let response = xoauth_relay::app::admin(
            config,
            xoauth_relay::control::wire::Request::StoreGrant {
                account: account.into(),
                refresh_token: Some(xoauth_relay::util::secret::Secret::new(refresh_token)),
                access_token: None,
                expires_in: None,
                refresh_expires_in: None,
            },
        )
        .await
        .unwrap();
        assert!(response.ok, "{}", response.text);
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mailer-side client

pub struct Client {
    lines: Lines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    StartTls,
    Implicit,
    Plain,
}

impl Client {
    pub async fn connect(relay: &Relay, mode: Conn, pki: &Pki) -> Client {
        let addr = match mode {
            Conn::StartTls => relay.starttls,
            Conn::Implicit => relay.implicit,
            Conn::Plain => relay.plain,
        };
        Client::connect_addr(addr, mode, pki).await
    }

    /// Like `connect`, to a relay at `addr` (one running as another process, say).
    pub async fn connect_addr(addr: SocketAddr, mode: Conn, pki: &Pki) -> Client {
        Client::connect_from(addr, None, mode, pki).await
    }

    /// From a chosen local address (any of 127.0.0.0/8 works on loopback), to test per-address limits.
    pub async fn connect_from(
        addr: SocketAddr,
        from: Option<std::net::IpAddr>,
        mode: Conn,
        pki: &Pki,
    ) -> Client {
        let tcp = connect_tcp(addr, from).await;
        let io: BoxIo = if mode == Conn::Implicit {
            Box::new(tls_connect(tcp, pki).await)
        } else {
            Box::new(tcp)
        };
        let mut c = Client {
            lines: Lines {
                io,
                buf: Vec::new(),
            },
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        let ehlo = c.cmd("EHLO mailer.test").await;
        assert!(ehlo.starts_with("250"), "{ehlo}");
        if mode == Conn::StartTls {
            assert!(ehlo.contains("STARTTLS"), "{ehlo}");
            assert!(
                !ehlo.contains("AUTH"),
                "AUTH must not be offered before TLS: {ehlo}"
            );
            assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");
            let io = std::mem::replace(&mut c.lines.io, Box::new(tokio::io::duplex(1).0));
            c.lines.io = Box::new(tls_connect(io, pki).await);
            let ehlo = c.cmd("EHLO mailer.test").await;
            assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
        }
        c
    }

    pub async fn plain(relay: &Relay) -> Client {
        let tcp = TcpStream::connect(relay.plain).await.unwrap();
        let mut c = Client {
            lines: Lines {
                io: Box::new(tcp),
                buf: Vec::new(),
            },
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        c
    }

    /// Reads one (possibly multi-line) reply; lines joined with '\n'. Empty string on EOF.
    pub async fn reply(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let Some(line) = self.lines.line().await else {
                return out.join("\n");
            };
            let last = line.as_bytes().get(3) != Some(&b'-');
            out.push(line);
            if last {
                return out.join("\n");
            }
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.lines.io.write_all(bytes).await.unwrap();
        self.lines.io.flush().await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    pub async fn login_plain(&mut self, login: &str, password: &str) -> String {
        self.cmd(&format!(
            "AUTH PLAIN {}",
            b64(format!("\0{login}\0{password}"))
        ))
        .await
    }

    pub async fn login_login(&mut self, login: &str, password: &str) -> String {
        assert_eq!(self.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
        assert_eq!(self.cmd(&b64(login)).await, "334 UGFzc3dvcmQ6");
        self.cmd(&b64(password)).await
    }

    /// Sends a whole message; returns the replies to MAIL, each RCPT, DATA and the end of data.
    /// Like `send_mail`, but MAIL, the RCPTs and DATA go in one write (RFC 2920), as Postfix sends.
    pub async fn send_mail_pipelined(
        &mut self,
        from: &str,
        rcpts: &[&str],
        body: &[u8],
    ) -> Vec<String> {
        let mut batch = format!("MAIL FROM:<{from}>\r\n");
        for r in rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        self.send_raw(batch.as_bytes()).await;
        let mut replies = Vec::new();
        for _ in 0..rcpts.len() + 2 {
            replies.push(self.reply().await);
        }
        if replies.last().is_some_and(|r| r.starts_with("354")) {
            self.send_raw(&stuff(body)).await;
            replies.push(self.reply().await);
        }
        replies
    }

    /// Like `send_mail`, but `None` once the connection is gone (the relay was killed, say).
    pub async fn try_send_mail(
        &mut self,
        from: &str,
        rcpts: &[&str],
        body: &[u8],
    ) -> Option<Vec<String>> {
        let mut lines = vec![format!("MAIL FROM:<{from}>")];
        lines.extend(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
        lines.push("DATA".into());
        let mut replies = Vec::new();
        for line in lines {
            self.lines
                .io
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .ok()?;
            let reply = self.reply().await;
            if reply.is_empty() {
                return None;
            }
            replies.push(reply);
        }
        if !replies.last()?.starts_with("354") {
            return Some(replies);
        }
        self.lines.io.write_all(&stuff(body)).await.ok()?;
        let reply = self.reply().await;
        if reply.is_empty() {
            return None;
        }
        replies.push(reply);
        Some(replies)
    }

    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Vec<String> {
        let mut replies = vec![self.cmd(&format!("MAIL FROM:<{from}>")).await];
        for r in rcpts {
            replies.push(self.cmd(&format!("RCPT TO:<{r}>")).await);
        }
        let data = self.cmd("DATA").await;
        let go = data.starts_with("354");
        replies.push(data);
        if go {
            self.send_raw(&stuff(body)).await;
            replies.push(self.reply().await);
        }
        replies
    }
}

/// A TCP connection to `addr`, from `from` when given.
pub async fn connect_tcp(addr: SocketAddr, from: Option<std::net::IpAddr>) -> TcpStream {
    let Some(from) = from else {
        return TcpStream::connect(addr).await.unwrap();
    };
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Dot-stuffs a body and appends the terminator, as a mailer does.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_start = true;
    for (i, &b) in body.iter().enumerate() {
        if at_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_start = b == b'\n' && i > 0 && body[i - 1] == b'\r';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
    io: S,
    pki: &Pki,
) -> tokio_rustls::client::TlsStream<S> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(name, io)
        .await
        .unwrap()
}

/// Test time that moves only when told: tokio's clock paused, and its auto-advance held off (a
/// blocking task inhibits it) so that waiting on loopback IO does not fast-forward timeouts.
pub struct ManualTime {
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl ManualTime {
    pub fn start() -> ManualTime {
        tokio::time::pause();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = wait.recv();
        });
        ManualTime {
            release: Some(release),
        }
    }

    pub async fn advance(&self, by: Duration) {
        tokio::time::advance(by).await;
    }
}

impl Drop for ManualTime {
    fn drop(&mut self) {
        drop(self.release.take());
        tokio::time::resume();
    }
}

/// Captures everything the relay logs (all levels) while the guard lives.
#[derive(Clone, Default)]
pub struct LogCapture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn install() -> (LogCapture, tracing::subscriber::DefaultGuard) {
        let capture = LogCapture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Test set-ups

/// A fake provider in `smtp_mode`, a relay in front of it, and a grant for `news` imported.
pub async fn setup(
    opts: RelayOptions,
    smtp_mode: &'static str,
) -> (tempfile::TempDir, FakeProvider, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start(smtp_mode, None).await;
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    (dir, provider, relay)
}

/// A relay in `dir` in front of `provider`, with a grant for `news` imported.
pub async fn start_with_grant(dir: &Path, provider: &FakeProvider, opts: RelayOptions) -> Relay {
    let relay = Relay::start(dir, provider, opts).await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    relay
}

/// A mailer logged in as the test account.
pub async fn logged_in(relay: &Relay, provider: &FakeProvider, mode: Conn) -> Client {
    let mut c = Client::connect(relay, mode, &provider.pki).await;
    assert_eq!(
        c.login_plain(LOGIN, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    c
}

/// Options adding an account `shop` (login `shop`, password hash `hash`). With the relay's
/// directory, it uses a provider `fake2` of its own (the same fake endpoints under another name).
pub fn shop_account(hash: &str, provider: &FakeProvider, fake2: Option<&Path>) -> RelayOptions {
    let (name, table) = if let Some(dir) = fake2 {
        let table = format!(
            "\n[providers.fake2]\ntoken_url = \"{base}/token\"\nscopes = [\"https://mail.google.com/\"]\n\
             client_id = \"test-client\"\nclient_secret = \"test-client-SECRET\"\nsmtp_host = \"localhost\"\n\
             smtp_port = {port}\nsmtp_tls = \"{tls}\"\nsmtp_ca_file = \"{ca}\"\n",
            base = provider.base_url(),
            port = provider.smtp_addr.port(),
            tls = provider.smtp_mode,
            ca = dir.join("certs/upstream-ca.pem").display(),
        );
        ("fake2", table)
    } else {
        ("fake", String::new())
    };
    RelayOptions {
        extra_accounts_toml: format!(
            "\n[[accounts]]\nname = \"shop\"\nlogin = \"shop\"\npassword_hash = \"{hash}\"\nprovider = \"{name}\"\nmailbox = \"news@example.com\"\n{table}"
        ),
        ..RelayOptions::default()
    }
}

/// Runs an admin request in the running relay (over its control socket).
pub async fn admin(
    relay: &Relay,
    request: xoauth_relay::control::wire::Request,
) -> xoauth_relay::control::wire::Response {
    let config = xoauth_relay::config::Config::load(&relay.config_path).unwrap();
    xoauth_relay::app::admin(config, request).await.unwrap()
}

/// `GET path` over plain HTTP/1.1: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Every reply positive (2xx or 354).
pub fn all_ok(replies: &[String]) -> bool {
    replies
        .iter()
        .all(|r| r.starts_with('2') || r.starts_with("354"))
}

// ---------------------------------------------------------------------------------------------
// Proxies for upstream SMTP

/// What a test proxy saw: the targets it was asked for, and the credentials it got.
#[derive(Default)]
pub struct ProxyLog {
    pub targets: Vec<String>,
    pub credentials: Vec<String>,
}

/// A proxy on loopback: `serve` handles each client connection with the shared log.
async fn proxy<F, Fut>(serve: F) -> (SocketAddr, Arc<Mutex<ProxyLog>>)
where
    F: Fn(TcpStream, Arc<Mutex<ProxyLog>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(ProxyLog::default()));
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            if let Ok((c, _)) = listener.accept().await {
                tokio::spawn(serve(c, seen.clone()));
            }
        }
    });
    (addr, log)
}

/// A SOCKS5 proxy on loopback (no auth, or user/password), tunnelling to what it is asked for.
pub async fn socks5_proxy() -> (SocketAddr, Arc<Mutex<ProxyLog>>) {
    proxy(|mut c, seen| async move {
        let mut head = [0u8; 2];
        c.read_exact(&mut head).await.ok()?;
        let mut methods = vec![0u8; usize::from(head[1])];
        c.read_exact(&mut methods).await.ok()?;
        if methods.contains(&2) {
            c.write_all(&[5, 2]).await.ok()?;
            let mut v = [0u8; 2];
            c.read_exact(&mut v).await.ok()?;
            let mut user = vec![0u8; usize::from(v[1])];
            c.read_exact(&mut user).await.ok()?;
            let mut plen = [0u8; 1];
            c.read_exact(&mut plen).await.ok()?;
            let mut pass = vec![0u8; usize::from(plen[0])];
            c.read_exact(&mut pass).await.ok()?;
            seen.lock().unwrap().credentials.push(format!(
                "{}:{}",
                String::from_utf8_lossy(&user),
                String::from_utf8_lossy(&pass)
            ));
            c.write_all(&[1, 0]).await.ok()?;
        } else {
            c.write_all(&[5, 0]).await.ok()?;
        }
        let mut req = [0u8; 4];
        c.read_exact(&mut req).await.ok()?;
        let host = match req[3] {
            3 => {
                let mut len = [0u8; 1];
                c.read_exact(&mut len).await.ok()?;
                let mut name = vec![0u8; usize::from(len[0])];
                c.read_exact(&mut name).await.ok()?;
                String::from_utf8_lossy(&name).to_string()
            }
            1 => {
                let mut ip = [0u8; 4];
                c.read_exact(&mut ip).await.ok()?;
                std::net::Ipv4Addr::from(ip).to_string()
            }
            _ => return None,
        };
        let mut port = [0u8; 2];
        c.read_exact(&mut port).await.ok()?;
        let target = format!("{host}:{}", u16::from_be_bytes(port));
        seen.lock().unwrap().targets.push(target.clone());
        let mut upstream = TcpStream::connect(&target).await.ok()?;
        c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.ok()?;
        let _ = tokio::io::copy_bidirectional(&mut c, &mut upstream).await;
        Some(())
    })
    .await
}

/// An HTTP CONNECT proxy on loopback.
pub async fn connect_proxy() -> (SocketAddr, Arc<Mutex<ProxyLog>>) {
    proxy(|mut c, seen| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).await.ok()?;
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let target = text.split_whitespace().nth(1)?.to_string();
        seen.lock().unwrap().targets.push(target.clone());
        let mut upstream = TcpStream::connect(&target).await.ok()?;
        c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .ok()?;
        let _ = tokio::io::copy_bidirectional(&mut c, &mut upstream).await;
        Some(())
    })
    .await
}

//! The relay as its own process, measured: msgs/s beside a no-relay baseline, the relay's CPU per
//! message (`/proc/PID/stat`) and its peak RSS (`VmHWM`).
//!
//!     cargo build --release && cargo run --release --example bench [-- quick]
//!
//! This process runs a fake provider (token endpoint, and an SMTP server doing STARTTLS + XOAUTH2
//! that checks every body's SHA-256) and the load generator; the relay binary
//! (`target/release/xoauth-relay`, or `RELAY_BIN`) runs as a child, started afresh for every cell so
//! that its peak RSS is that cell's. The baseline sends the same load straight to the fake provider.
//! The machine is shared: compare ratios, not absolute times.

#[allow(dead_code)]
#[path = "../tests/common/pg.rs"]
mod pg;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const LOGIN: &str = "bench";
const PASSWORD: &str = "bench-password";
const MAILBOX: &str = "bench@example.com";

fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------------------------
// Fake provider

#[derive(Default)]
struct Provider {
    /// Valid access tokens and their expiry.
    tokens: Mutex<HashMap<String, Instant>>,
    lifetime_secs: AtomicU64,
    token_requests: AtomicU64,
    auth_failures: AtomicU64,
    delivered: AtomicU64,
    corrupt: AtomicU64,
    /// SHA-256 every body must have.
    expected: Mutex<Vec<u8>>,
    counter: AtomicU64,
    /// The upstream is unavailable: every connection gets `421` (queue cells fill the queue first).
    closed: AtomicBool,
}

impl Provider {
    fn issue(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let token = format!("at-{n}-bench");
        let life = Duration::from_secs(self.lifetime_secs.load(Ordering::Relaxed));
        self.tokens
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + life);
        token
    }

    fn valid(&self, token: &str) -> bool {
        self.tokens
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|e| *e > Instant::now())
    }
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = cert.pem();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client), pem)
}

async fn token_endpoint(listener: TcpListener, p: Arc<Provider>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let p = p.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Ok(n) = s.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= head + 4 + len {
                    break;
                }
            }
            p.token_requests.fetch_add(1, Ordering::Relaxed);
            let body = format!(
                r#"{{"access_token":"{}","token_type":"Bearer","expires_in":{}}}"#,
                p.issue(),
                p.lifetime_secs.load(Ordering::Relaxed)
            );
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        });
    }
}

trait Io: tokio::io::AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn smtp_upstream(listener: TcpListener, p: Arc<Provider>, tls: Arc<rustls::ServerConfig>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let p = p.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        tokio::spawn(async move {
            let _ = upstream_session(tcp, p, acceptor).await;
        });
    }
}

async fn upstream_session(
    tcp: TcpStream,
    p: Arc<Provider>,
    acceptor: tokio_rustls::TlsAcceptor,
) -> std::io::Result<()> {
    let mut io: BufReader<Box<dyn Io>> = BufReader::with_capacity(64 * 1024, Box::new(tcp));
    if p.closed.load(Ordering::Relaxed) {
        return io
            .get_mut()
            .write_all(b"421 4.3.2 Service not available\r\n")
            .await;
    }
    io.get_mut().write_all(b"220 fake ESMTP\r\n").await?;
    let mut tls = false;
    let mut authed = false;
    let mut line = Vec::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            out.extend_from_slice(
                b"250-fake\r\n250-PIPELINING\r\n250-SIZE 40000000\r\n250-8BITMIME\r\n",
            );
            if !tls {
                out.extend_from_slice(b"250-STARTTLS\r\n");
            }
            out.extend_from_slice(b"250 AUTH XOAUTH2\r\n");
        } else if upper == "STARTTLS" {
            io.get_mut().write_all(b"220 go\r\n").await?;
            let inner = io.into_inner();
            let stream: Box<dyn Io> = Box::new(acceptor.accept(inner).await?);
            io = BufReader::with_capacity(64 * 1024, stream);
            tls = true;
            continue;
        } else if let Some(arg) = upper.strip_prefix("AUTH XOAUTH2 ") {
            let _ = arg;
            let raw = cmd["AUTH XOAUTH2 ".len()..].trim();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&decoded);
            let token = text
                .split('\x01')
                .find_map(|f| f.strip_prefix("auth=Bearer "))
                .unwrap_or("");
            let user_ok = text.starts_with(&format!("user={MAILBOX}\x01"));
            if tls && user_ok && p.valid(token) {
                authed = true;
                out.extend_from_slice(b"235 2.7.0 Accepted\r\n");
            } else {
                p.auth_failures.fetch_add(1, Ordering::Relaxed);
                out.extend_from_slice(b"535 5.7.8 Username and Password not accepted\r\n");
            }
        } else if upper.starts_with("MAIL FROM:") {
            out.extend_from_slice(if authed {
                b"250 2.1.0 OK\r\n".as_slice()
            } else {
                b"530 5.7.0 Authentication Required\r\n".as_slice()
            });
        } else if upper.starts_with("RCPT TO:") {
            out.extend_from_slice(b"250 2.1.5 OK\r\n");
        } else if upper == "DATA" {
            io.get_mut().write_all(&out).await?;
            out.clear();
            io.get_mut().write_all(b"354 Go ahead\r\n").await?;
            let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
            loop {
                line.clear();
                if io.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                hash.update(&line);
            }
            let ok = hash.finish().as_ref() == p.expected.lock().unwrap().as_slice();
            p.delivered.fetch_add(1, Ordering::Relaxed);
            if !ok {
                p.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            out.extend_from_slice(b"250 2.0.0 OK queued\r\n");
        } else if upper == "RSET" || upper == "NOOP" {
            out.extend_from_slice(b"250 2.0.0 OK\r\n");
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            out.extend_from_slice(b"502 5.5.1 Unrecognized\r\n");
        }
        // Reply once the client's pipelined group has been read (RFC 2920).
        if io.buffer().is_empty() {
            io.get_mut().write_all(&out).await?;
            out.clear();
        }
    }
}

/// The Gmail API's send, as a fake: a valid bearer token, the body hashed as it streams in.
async fn gmail_api(listener: TcpListener, p: Arc<Provider>) {
    use futures_util::StreamExt;
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Body| {
            let p = p.clone();
            async move {
                let token = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or_default();
                if !p.valid(token) {
                    p.auth_failures.fetch_add(1, Ordering::Relaxed);
                    return (axum::http::StatusCode::UNAUTHORIZED, String::new());
                }
                let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
                let mut stream = body.into_data_stream();
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => hash.update(&c),
                        Err(_) => return (axum::http::StatusCode::BAD_REQUEST, String::new()),
                    }
                }
                let ok = hash.finish().as_ref() == p.expected.lock().unwrap().as_slice();
                p.delivered.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    p.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                let n = p.counter.fetch_add(1, Ordering::Relaxed);
                (axum::http::StatusCode::OK, format!(r#"{{"id":"gm-{n}"}}"#))
            }
        },
    );
    let _ = axum::serve(listener, app).await;
}

// ---------------------------------------------------------------------------------------------
// Load generator

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Plain AUTH PLAIN to the relay on loopback.
    Relay(SocketAddr),
    /// STARTTLS + XOAUTH2 straight to the fake provider.
    Direct(SocketAddr),
}

struct Mailer {
    io: BufReader<Box<dyn Io>>,
    line: String,
}

impl Mailer {
    async fn reply(&mut self) -> std::io::Result<u16> {
        loop {
            self.line.clear();
            if self.io.read_line(&mut self.line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(self.line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> std::io::Result<u16> {
        self.io.get_mut().write_all(line.as_bytes()).await?;
        self.io.get_mut().write_all(b"\r\n").await?;
        self.reply().await
    }

    async fn connect(
        target: Target,
        tls: &Arc<rustls::ClientConfig>,
        provider: &Provider,
        password: &str,
    ) -> std::io::Result<(Mailer, bool)> {
        let addr = match target {
            Target::Relay(a) | Target::Direct(a) => a,
        };
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut m = Mailer {
            io: BufReader::with_capacity(16 * 1024, Box::new(tcp)),
            line: String::new(),
        };
        m.reply().await?;
        m.cmd("EHLO load.test").await?;
        let ok = match target {
            Target::Relay(_) => {
                let plain = b64(format!("\0{LOGIN}\0{password}"));
                m.cmd(&format!("AUTH PLAIN {plain}")).await? == 235
            }
            Target::Direct(_) => {
                m.cmd("STARTTLS").await?;
                let inner = m.io.into_inner();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, inner)
                    .await?;
                m.io = BufReader::with_capacity(16 * 1024, Box::new(stream));
                m.cmd("EHLO load.test").await?;
                let token = provider.issue();
                let sasl = b64(format!("user={MAILBOX}\x01auth=Bearer {token}\x01\x01"));
                m.cmd(&format!("AUTH XOAUTH2 {sasl}")).await? == 235
            }
        };
        Ok((m, ok))
    }

    /// One message, MAIL/RCPT/DATA pipelined as Postfix does; true when the final reply is 250.
    async fn send(&mut self, body: &[u8]) -> std::io::Result<bool> {
        self.io
            .get_mut()
            .write_all(
                format!("MAIL FROM:<{MAILBOX}>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
                    .as_bytes(),
            )
            .await?;
        let mail = self.reply().await?;
        let rcpt = self.reply().await?;
        let data = self.reply().await?;
        if data != 354 {
            return Ok(false);
        }
        self.io.get_mut().write_all(body).await?;
        self.io.get_mut().write_all(b".\r\n").await?;
        Ok(self.reply().await? == 250 && mail == 250 && rcpt == 250)
    }
}

struct Load {
    sessions: usize,
    body: Arc<Vec<u8>>,
    /// Messages per connection; 0 = one connection for the whole run.
    per_connection: usize,
    duration: Duration,
    password: &'static str,
}

struct Counts {
    sent: u64,
    failed: u64,
    logins_failed: u64,
}

async fn run_load(
    target: Target,
    load: &Load,
    tls: &Arc<rustls::ClientConfig>,
    provider: &Arc<Provider>,
) -> Counts {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let logins_failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..load.sessions {
        let (stop, sent, failed, logins_failed) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            logins_failed.clone(),
        );
        let (tls, provider, body) = (tls.clone(), provider.clone(), load.body.clone());
        let per_connection = load.per_connection;
        let password = load.password;
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut m, ok)) = Mailer::connect(target, &tls, &provider, password).await
                else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if !ok {
                    logins_failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && (per_connection == 0 || n < per_connection) {
                    match m.send(&body).await {
                        Ok(true) => sent.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
                    n += 1;
                }
                let _ = m.cmd("QUIT").await;
            }
        }));
    }
    tokio::time::sleep(load.duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Counts {
        sent: sent.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        logins_failed: logins_failed.load(Ordering::Relaxed),
    }
}

/// A message of about `size` bytes in 78-octet lines, no line starting with ".".
fn body(size: usize) -> Vec<u8> {
    let mut b =
        b"From: <bench@example.com>\r\nTo: <rcpt@example.org>\r\nSubject: bench\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again!!!!\r\n";
    while b.len() < size {
        b.extend_from_slice(line);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// The relay process

struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

fn relay_bin() -> PathBuf {
    std::env::var_os("RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/xoauth-relay"))
}

/// /proc/PID/stat utime + stime, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields after the command: state is index 0, utime is field 14 overall (index 11 here).
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    ticks as f64 * 1000.0 / hz
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

use pg::free_port;

impl RelayProcess {
    async fn start(dir: &Path, config: &str) -> RelayProcess {
        let path = dir.join("relay.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("relay.log")).unwrap();
        let port: u16 = config
            .lines()
            .find_map(|l| l.strip_prefix("address = \"127.0.0.1:"))
            .and_then(|r| r.trim_end_matches('"').parse().ok())
            .unwrap();
        let child = Command::new(relay_bin())
            .args(["--config", path.to_str().unwrap(), "serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("relay binary: build it with `cargo build --release` or set RELAY_BIN");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        RelayProcess { child, addr }
    }

    fn import(&self, config: &Path, refresh_token: &str) {
        let mut c = Command::new(relay_bin())
            .args([
                "--config",
                config.to_str().unwrap(),
                "import-token",
                "bench",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(refresh_token.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "import-token failed");
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Env {
    dir: tempfile::TempDir,
    /// A `[store]` table every relay config ends with (the postgres cells), or nothing.
    store: std::sync::Mutex<String>,
    provider: Arc<Provider>,
    smtp: SocketAddr,
    http: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    hash: String,
}

impl Env {
    /// `provider_extra`: more keys for the provider table (an API transport).
    fn config(&self, extra_limits: &str, provider_extra: &str) -> String {
        let dir = self.dir.path().display();
        format!(
            r#"
[server]
hostname = "relay.bench"
data_dir = "{dir}/data-{n}"
allow_plaintext_loopback = true

[[listeners]]
address = "127.0.0.1:{port}"
tls = "none"

[limits]
max_connections = 2000
{extra_limits}

[providers.fake]
token_url = "http://{http}/token"
scopes = ["https://mail.google.com/"]
client_id = "bench-client"
client_secret = "bench-secret"
smtp_host = "localhost"
smtp_port = {smtp_port}
smtp_tls = "starttls"
smtp_ca_file = "{dir}/ca.pem"
{provider_extra}

[[accounts]]
name = "bench"
login = "{LOGIN}"
password_hash = "{hash}"
provider = "fake"
mailbox = "{MAILBOX}"
"#,
            n = self.provider.counter.fetch_add(1, Ordering::Relaxed),
            port = free_port(),
            http = self.http,
            smtp_port = self.smtp.port(),
            hash = self.hash,
        )
    }

    async fn relay(&self, extra_limits: &str, provider_extra: &str) -> RelayProcess {
        let config = self.config(extra_limits, provider_extra);
        self.started(&config).await
    }

    /// With more keys for the account.
    async fn relay_with(&self, extra_limits: &str, account_extra: &str) -> RelayProcess {
        let config = format!("{}{account_extra}\n", self.config(extra_limits, ""));
        self.started(&config).await
    }

    async fn started(&self, config: &str) -> RelayProcess {
        let config = format!("{config}\n{}", self.store.lock().unwrap());
        let relay = RelayProcess::start(self.dir.path(), &config).await;
        relay.import(&self.dir.path().join("relay.toml"), "rt-bench");
        relay
    }
}

struct Row {
    cell: String,
    base: Option<f64>,
    rate: f64,
    cpu_per_msg: f64,
    rss: f64,
    note: String,
}

/// `BENCH_ONLY=text` runs only the cells whose name contains it.
fn selected(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| name.contains(&only))
}

/// `BENCH_PERF=file` records the relay with `perf` during the (single) selected cell.
fn perf_attach(pid: u32) -> Option<Child> {
    let out = std::env::var("BENCH_PERF").ok()?;
    Command::new("perf")
        .args([
            "record",
            "-F",
            "999",
            "-g",
            "-o",
            &out,
            "-p",
            &pid.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Stops a `perf record` started by [`perf_attach`] and lets it write its file.
fn perf_stop(perf: Option<Child>) {
    if let Some(perf) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait_with_output();
    }
}

async fn cell(
    env: &Env,
    name: &str,
    load: Load,
    baseline: bool,
    (extra_limits, provider_extra): (&str, &str),
) -> Row {
    *env.provider.expected.lock().unwrap() =
        ring::digest::digest(&ring::digest::SHA256, &load.body)
            .as_ref()
            .to_vec();
    let direct = || {
        run_load(
            Target::Direct(env.smtp),
            &load,
            &env.client_tls,
            &env.provider,
        )
    };
    let rate = |c: Counts| c.sent as f64 / load.duration.as_secs_f64();
    // This process's CPU per message (load generator and fake provider): beside the relay's, it
    // tells whether the machine's two cores were the limit.
    let me = std::process::id();
    let mut base_cpu = (0.0, 0u64);
    // The baseline runs before and after the relay: the machine is shared, so its mean is the
    // fairer ceiling.
    let before = if baseline {
        let cpu0 = cpu_ms(me);
        let c = direct().await;
        base_cpu = (cpu_ms(me) - cpu0, c.sent);
        Some(rate(c))
    } else {
        None
    };
    let relay = env.relay(extra_limits, provider_extra).await;
    let pid = relay.child.id();
    let delivered_before = env.provider.delivered.load(Ordering::Relaxed);
    let corrupt_before = env.provider.corrupt.load(Ordering::Relaxed);
    let perf = perf_attach(pid);
    let cpu0 = cpu_ms(pid);
    let own0 = cpu_ms(me);
    let c = run_load(
        Target::Relay(relay.addr),
        &load,
        &env.client_tls,
        &env.provider,
    )
    .await;
    let cpu = cpu_ms(pid) - cpu0;
    let own = cpu_ms(me) - own0;
    perf_stop(perf);
    let rss = peak_rss_mb(pid);
    let delivered = env.provider.delivered.load(Ordering::Relaxed) - delivered_before;
    let corrupt = env.provider.corrupt.load(Ordering::Relaxed) - corrupt_before;
    relay.stop();
    let messages = c.sent.max(1) as f64;
    let sent = c.sent;
    let (failed, logins_failed) = (c.failed, c.logins_failed);
    let relay_rate = rate(c);
    let base = match before {
        Some(b) => {
            let cpu0 = cpu_ms(me);
            let c = direct().await;
            base_cpu = (base_cpu.0 + cpu_ms(me) - cpu0, base_cpu.1 + c.sent);
            Some((b + rate(c)) / 2.0)
        }
        None => None,
    };
    let load_cpu = match base_cpu {
        (ms, sent) if sent > 0 => format!(
            "; load side {:.3} ms/msg (baseline {:.3})",
            own / messages,
            ms / sent as f64
        ),
        _ => format!("; load side {:.3} ms/msg", own / messages),
    };
    Row {
        cell: name.to_string(),
        base,
        rate: relay_rate,
        cpu_per_msg: cpu / messages,
        rss,
        note: format!(
            "{sent} sent, {delivered} delivered, {corrupt} corrupt, {failed} failed, {logins_failed} logins refused{load_cpu}"
        ),
    }
}

/// A queue-mode relay. With `backlog` = None: `load` submits while the upstream is closed (the
/// queueing rate), then the upstream opens, `queue retry --all` runs, and the queue drains (the
/// delivery rate). With a backlog: exactly that many messages are submitted with the upstream open,
/// and the cell waits until all are delivered (pacing).
async fn queue_cell(
    env: &Env,
    name: &str,
    load: Load,
    account_extra: &str,
    backlog: Option<u64>,
) -> Row {
    *env.provider.expected.lock().unwrap() =
        ring::digest::digest(&ring::digest::SHA256, &load.body)
            .as_ref()
            .to_vec();
    let extra = "\n[delivery]\nmode = \"queue\"\n";
    let relay = env.relay_with(extra, account_extra).await;
    let pid = relay.child.id();
    let delivered0 = env.provider.delivered.load(Ordering::Relaxed);
    let corrupt0 = env.provider.corrupt.load(Ordering::Relaxed);
    let cpu0 = cpu_ms(pid);
    env.provider
        .closed
        .store(backlog.is_none(), Ordering::Relaxed);
    let started = Instant::now();
    let sent = match backlog {
        None => {
            run_load(
                Target::Relay(relay.addr),
                &load,
                &env.client_tls,
                &env.provider,
            )
            .await
            .sent
        }
        Some(n) => {
            let per = n.div_ceil(load.sessions as u64);
            let mut tasks = Vec::new();
            for _ in 0..load.sessions {
                let (tls, provider, body) = (
                    env.client_tls.clone(),
                    env.provider.clone(),
                    load.body.clone(),
                );
                let addr = relay.addr;
                tasks.push(tokio::spawn(async move {
                    let (mut m, _) =
                        Mailer::connect(Target::Relay(addr), &tls, &provider, PASSWORD)
                            .await
                            .unwrap();
                    let mut ok = 0;
                    for _ in 0..per {
                        if m.send(&body).await.unwrap_or(false) {
                            ok += 1;
                        }
                    }
                    ok
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap_or(0);
            }
            total
        }
    };
    let submitted = started.elapsed();
    let drain_started = Instant::now();
    let cpu_queued = cpu_ms(pid) - cpu0;
    // Profiled: the delivery half.
    let perf = perf_attach(pid);
    if backlog.is_none() {
        env.provider.closed.store(false, Ordering::Relaxed);
        let retried = Command::new(relay_bin())
            .args([
                "--config",
                env.dir.path().join("relay.toml").to_str().unwrap(),
                "queue",
                "retry",
                "--all",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(retried.success(), "queue retry --all failed");
    }
    while env.provider.delivered.load(Ordering::Relaxed) - delivered0 < sent {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = drain_started.elapsed();
    let cpu = cpu_ms(pid) - cpu0;
    let cpu_drain = cpu - cpu_queued;
    perf_stop(perf);
    let rss = peak_rss_mb(pid);
    let corrupt = env.provider.corrupt.load(Ordering::Relaxed) - corrupt0;
    relay.stop();
    let rate = sent as f64 / submitted.as_secs_f64();
    let drain_rate = sent as f64 / drained.as_secs_f64();
    Row {
        cell: name.to_string(),
        base: None,
        rate,
        cpu_per_msg: cpu / sent.max(1) as f64,
        rss,
        note: if backlog.is_none() {
            format!(
                "queued {sent} at {rate:.0} msg/s with the upstream closed ({:.3} ms CPU each), then drained at \
                 {drain_rate:.0} msg/s ({:.3} ms CPU each); {corrupt} corrupt; CPU column: queued and delivered",
                cpu_queued / sent.max(1) as f64,
                cpu_drain / sent.max(1) as f64
            )
        } else {
            format!(
                "{sent} queued in {:.1} s, all delivered {:.1} s after the first; {corrupt} corrupt",
                submitted.as_secs_f64(),
                (submitted + drained).as_secs_f64()
            )
        },
    }
}

/// The `[store]` table of a relay named `instance` on the bench's database.
fn store_table(dir: &Path, instance: &str) -> String {
    format!(
        "\n[store]\nbackend = \"postgres\"\nurl_file = \"{}/db-url\"\ninstance = \"{instance}\"\n",
        dir.display()
    )
}

/// Two relays on one database, `load` against each at once: together, their CPU per message.
async fn two_relays(env: &Env, load: Load, store: impl Fn(&str) -> String) -> Row {
    *env.provider.expected.lock().unwrap() =
        ring::digest::digest(&ring::digest::SHA256, &load.body)
            .as_ref()
            .to_vec();
    *env.store.lock().unwrap() = store("bench-a");
    let a = env.relay("", "").await;
    *env.store.lock().unwrap() = store("bench-b");
    let b = env.relay("", "").await;
    let pids = [a.child.id(), b.child.id()];
    let cpu0: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let (ca, cb) = tokio::join!(
        run_load(Target::Relay(a.addr), &load, &env.client_tls, &env.provider),
        run_load(Target::Relay(b.addr), &load, &env.client_tls, &env.provider),
    );
    let cpu: f64 = pids.iter().map(|p| cpu_ms(*p)).sum::<f64>() - cpu0;
    let rss = pids.iter().map(|p| peak_rss_mb(*p)).fold(0.0, f64::max);
    a.stop();
    b.stop();
    let sent = ca.sent + cb.sent;
    Row {
        cell: "postgres: two relays, persistent, 10 KiB, C=5 each".into(),
        base: None,
        rate: sent as f64 / load.duration.as_secs_f64(),
        cpu_per_msg: cpu / sent.max(1) as f64,
        rss,
        note: format!(
            "{} + {} sent; CPU of both relays per message, the larger peak RSS",
            ca.sent, cb.sent
        ),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(quick));
}

async fn bench(quick: bool) {
    let secs = |s: u64| Duration::from_secs(if quick { s.div_ceil(3) } else { s });
    let dir = tempfile::tempdir().unwrap();
    let (server_tls, client_tls, ca) = tls_pair();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    let provider = Arc::new(Provider::default());
    provider.lifetime_secs.store(3600, Ordering::Relaxed);
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = api.local_addr().unwrap();
    tokio::spawn(gmail_api(api, provider.clone()));
    let env = Env {
        store: std::sync::Mutex::new(String::new()),
        http: http.local_addr().unwrap(),
        smtp: smtp.local_addr().unwrap(),
        dir,
        provider: provider.clone(),
        client_tls,
        hash: xoauth_relay::auth::hash_password(PASSWORD),
    };
    tokio::spawn(token_endpoint(http, provider.clone()));
    tokio::spawn(smtp_upstream(smtp, provider.clone(), server_tls));
    println!("relay binary: {}", relay_bin().display());

    let kib10 = Arc::new(body(10 * 1024));
    let mib1 = Arc::new(body(1024 * 1024));
    let persistent = |sessions, body: &Arc<Vec<u8>>, d| Load {
        sessions,
        body: body.clone(),
        per_connection: 0,
        duration: d,
        password: PASSWORD,
    };
    let mut rows = Vec::new();
    let cells = [
        (
            "persistent, 10 KiB, C=10",
            persistent(10, &kib10, secs(6)),
            true,
        ),
        (
            "persistent, 10 KiB, C=50",
            persistent(50, &kib10, secs(6)),
            true,
        ),
        (
            "persistent, 10 KiB, C=50, 4x longer",
            persistent(50, &kib10, secs(24)),
            false,
        ),
        (
            "persistent, 1 MiB, C=10",
            persistent(10, &mib1, secs(6)),
            true,
        ),
        (
            "persistent, 1 MiB, C=50",
            persistent(50, &mib1, secs(6)),
            false,
        ),
        (
            "one message per connection, C=10, 10 KiB",
            Load {
                per_connection: 1,
                ..persistent(10, &kib10, secs(6))
            },
            true,
        ),
    ];
    for (name, load, baseline) in cells {
        if selected(name) {
            rows.push(cell(&env, name, load, baseline, ("", "")).await);
        }
    }

    // 1,000 failed logins, then the relay's peak RSS.
    if selected("1,000 failed logins") {
        // Without a lockout: every attempt runs argon2 (the memory this cell is about) instead of
        // getting `421` after the tenth. (A relay from before `auth_failures_per_login` refuses
        // the key: leave this cell out with BENCH_ONLY when measuring one.)
        let relay = env
            .relay(
                "auth_failures_per_ip = 1000000\nauth_failures_per_login = 1000000",
                "",
            )
            .await;
        let pid = relay.child.id();
        let cpu0 = cpu_ms(pid);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (tls, provider) = (env.client_tls.clone(), env.provider.clone());
            let addr = relay.addr;
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    if let Ok((mut m, _)) =
                        Mailer::connect(Target::Relay(addr), &tls, &provider, "wrong").await
                    {
                        let _ = m.cmd("QUIT").await;
                    }
                }
            }));
        }
        let started = Instant::now();
        for t in tasks {
            let _ = t.await;
        }
        rows.push(Row {
            cell: "1,000 failed logins, C=10".into(),
            base: None,
            rate: 1000.0 / started.elapsed().as_secs_f64(),
            cpu_per_msg: (cpu_ms(pid) - cpu0) / 1000.0,
            rss: peak_rss_mb(pid),
            note: "rate = logins/s, CPU per login".into(),
        });
        relay.stop();
    }

    // Short-lived tokens: 5 s lifetime, 10 sessions reconnecting every 20 messages, 20 s.
    if selected("5 s tokens") {
        provider.lifetime_secs.store(5, Ordering::Relaxed);
        let requests0 = provider.token_requests.load(Ordering::Relaxed);
        let failures0 = provider.auth_failures.load(Ordering::Relaxed);
        let load = Load {
            per_connection: 20,
            ..persistent(10, &kib10, secs(20))
        };
        let mut row = cell(
            &env,
            "5 s tokens, reconnect every 20, C=10",
            load,
            false,
            ("", ""),
        )
        .await;
        let requests = provider.token_requests.load(Ordering::Relaxed) - requests0;
        let failures = provider.auth_failures.load(Ordering::Relaxed) - failures0;
        row.note = format!(
            "{}; {requests} token requests, {failures} upstream AUTH failures",
            row.note
        );
        rows.push(row);
        provider.lifetime_secs.store(3600, Ordering::Relaxed);
    }

    // The Gmail API transport against a fake of it (plain HTTP on loopback: no TLS on this hop,
    // unlike the SMTP cells' STARTTLS), each message streamed through.
    // Pacing off: the preset's 150 a minute is the API's limit, not the relay's.
    let gmail = format!(
        "transport = \"gmail_api\"\napi_url = \"http://{api_addr}\"\nmax_messages_per_minute = 0\n\
         max_messages_per_day = 0\nmax_recipients_per_day = 0\n"
    );
    let mib10 = Arc::new(body(10 * 1024 * 1024));
    for (name, load) in [
        ("gmail api, 10 KiB, C=10", persistent(10, &kib10, secs(6))),
        ("gmail api, 10 MiB, C=10", persistent(10, &mib10, secs(12))),
    ] {
        if selected(name) {
            rows.push(cell(&env, name, load, false, ("", &gmail)).await);
        }
    }

    // Queue mode: submission rate, delivery (drain) rate, CPU per message queued and delivered.
    if selected("queue mode, 10 KiB") {
        rows.push(
            queue_cell(
                &env,
                "queue mode, 10 KiB, C=10",
                persistent(10, &kib10, secs(6)),
                "",
                None,
            )
            .await,
        );
    }
    if selected("queue mode, backlog") {
        rows.push(
            queue_cell(
                &env,
                "queue mode, backlog of 300 at max_messages_per_minute = 600",
                persistent(10, &kib10, secs(6)),
                "max_messages_per_minute = 600",
                Some(300),
            )
            .await,
        );
    }

    // The same cells with the store in PostgreSQL (fsync on), and two relays sharing it.
    let pg_cells = [
        "postgres: persistent, 10 KiB, C=10",
        "postgres: queue mode, 10 KiB, C=10",
        "postgres: two relays, persistent, 10 KiB, C=5 each",
    ];
    if pg_cells.iter().any(|c| selected(c)) {
        if let Some(pg) = pg::Postgres::start_with(true).await {
            std::fs::write(env.dir.path().join("db-url"), pg.url()).unwrap();
            let dir = env.dir.path().to_path_buf();
            let store = move |instance: &str| store_table(&dir, instance);
            *env.store.lock().unwrap() = store_table(env.dir.path(), "bench");
            if selected("postgres: persistent, 10 KiB, C=10") {
                pg.reset().await;
                let name = "postgres: persistent, 10 KiB, C=10";
                rows.push(cell(&env, name, persistent(10, &kib10, secs(6)), true, ("", "")).await);
            }
            if selected("postgres: queue mode, 10 KiB, C=10") {
                pg.reset().await;
                let name = "postgres: queue mode, 10 KiB, C=10";
                rows.push(queue_cell(&env, name, persistent(10, &kib10, secs(6)), "", None).await);
            }
            if selected(pg_cells[2]) {
                pg.reset().await;
                rows.push(two_relays(&env, persistent(5, &kib10, secs(6)), store).await);
            }
            env.store.lock().unwrap().clear();
        }
    }

    println!();
    println!(
        "| cell | no relay msg/s | relay msg/s | ratio | relay CPU ms/msg | relay peak RSS MB | notes |"
    );
    println!("|---|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let (base, ratio) = match r.base {
            Some(b) => (format!("{b:.0}"), format!("{:.2}", r.rate / b.max(1.0))),
            None => ("".into(), "".into()),
        };
        println!(
            "| {} | {base} | {:.0} | {ratio} | {:.3} | {:.1} | {} |",
            r.cell, r.rate, r.cpu_per_msg, r.rss, r.note
        );
    }
}

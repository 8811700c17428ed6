//! Set-ups the tests share: a provider, a relay with a grant, a logged-in mailer.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

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

/// A provider table `fake2`: the same fake endpoints under another name (the relay's directory
/// `dir` holds its CA).
pub fn fake2_table(provider: &FakeProvider, dir: &Path) -> String {
    format!(
        "\n[providers.fake2]\ntoken_url = \"{base}/token\"\nscopes = [\"https://mail.google.com/\"]\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-SECRET\"\nsmtp_host = \"localhost\"\n\
         smtp_port = {port}\nsmtp_tls = \"{tls}\"\nsmtp_ca_file = \"{ca}\"\n",
        base = provider.base_url(),
        port = provider.smtp_addr.port(),
        tls = provider.smtp_mode,
        ca = dir.join("certs/upstream-ca.pem").display(),
    )
}

/// Options adding an account `shop` (login `shop`, password hash `hash`). With the relay's
/// directory, it uses a provider `fake2` of its own (the same fake endpoints under another name).
pub fn shop_account(hash: &str, provider: &FakeProvider, fake2: Option<&Path>) -> RelayOptions {
    let (name, table) = if let Some(dir) = fake2 {
        ("fake2", fake2_table(provider, dir))
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

/// `sessions` mailers at once, spread over `relays` in turn, each logging in (implicit TLS) and
/// sending `each` messages; every session's replies.
pub async fn sessions_sending(
    relays: &[&Relay],
    pki: &Pki,
    sessions: usize,
    each: usize,
) -> Vec<Vec<String>> {
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let relay = relays[i % relays.len()].view();
        let pki = pki.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&relay, Conn::Implicit, &pki).await;
            assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
            let mut replies = Vec::new();
            for n in 0..each {
                let body = format!("Subject: {i}/{n}\r\n\r\nbody {i} {n}\r\n");
                replies.extend(
                    c.send_mail("news@example.com", &["a@x.org"], body.as_bytes())
                        .await,
                );
            }
            replies
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

//! Authorization flows, driven through the real binary against a fake authorization server that
//! checks what a real one checks (PKCE, state, single-use codes, exact redirect URIs, device polling,
//! client assertions and service-account JWTs).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_xoauth-relay");
const SA_EMAIL: &str = "relay-sa@project.iam.gserviceaccount.com";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn b64url_decode(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap_or_default()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Verifies an RS256 JWT against the fixture key; returns (header, claims).
fn verify_jwt(jwt: &str) -> Result<(serde_json::Value, serde_json::Value), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWT".into());
    }
    let key = xoauth_relay::oauth::jwt::rsa_key_from_pem(
        &std::fs::read_to_string(fixture("test-rsa-key.pem")).unwrap(),
    )
    .unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        key.public().as_ref().to_vec(),
    );
    public
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &b64url_decode(parts[2]),
        )
        .map_err(|_| "bad signature".to_string())?;
    let header: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts[0])).map_err(|e| e.to_string())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts[1])).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err("alg must be RS256".into());
    }
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if exp <= now() || exp > now() + 3600 {
        return Err("exp out of range".into());
    }
    Ok((header, claims))
}

/// The authorization-server half of the fake provider.
fn auth_routes() -> Handler {
    Arc::new(|req: &HttpRequest, state: &Shared| {
        let mut s = state.lock().unwrap();
        let token_url = format!(
            "http://127.0.0.1:{}/token",
            s.extra.get("port").cloned().unwrap_or_default()
        );
        let f = |k: &str| req.form.get(k).cloned().unwrap_or_default();
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/authorize") => {
                let q = |k: &str| req.query.get(k).cloned().unwrap_or_default();
                let registered = s.extra.get("redirect_uri").cloned().unwrap_or_default();
                if q("client_id") != s.client_id {
                    return Some(json_error("invalid_client", "unknown client"));
                }
                if q("redirect_uri") != registered {
                    return Some(json_error(
                        "redirect_uri_mismatch",
                        &format!("{} is not registered", q("redirect_uri")),
                    ));
                }
                if q("code_challenge_method") != "S256"
                    || q("code_challenge").len() < 43
                    || q("response_type") != "code"
                {
                    return Some(json_error("invalid_request", "PKCE S256 required"));
                }
                let code = s.new_secret("code");
                s.extra.insert(
                    format!("code:{code}"),
                    format!("{}|{}", q("code_challenge"), q("redirect_uri")),
                );
                let location = format!("{}?code={}&state={}", q("redirect_uri"), code, q("state"));
                Some((302, String::new(), vec![("Location".into(), location)]))
            }
            ("GET", "/verify") => {
                let code = req.query.get("user_code").cloned().unwrap_or_default();
                s.extra.insert(format!("approved:{code}"), "yes".into());
                Some((200, "{}".into(), vec![]))
            }
            ("POST", "/device") => {
                if f("client_id") != s.client_id {
                    return Some(json_error("invalid_client", "unknown client"));
                }
                s.extra.insert("device_code".into(), "dev-code-1".into());
                let port = s.extra.get("port").cloned().unwrap_or_default();
                let body = serde_json::json!({
                    "device_code": "dev-code-1", "user_code": "WDJB-MJHT",
                    "verification_uri": format!("http://127.0.0.1:{port}/verify"),
                    "expires_in": 600, "interval": 1
                });
                Some((200, body.to_string(), vec![]))
            }
            ("POST", "/revoke") => {
                let token = f("token");
                let known = s.refresh_tokens.remove(&token);
                *s.extra.entry("revocations".into()).or_default() += if known { "x" } else { "?" };
                Some((200, String::new(), vec![]))
            }
            ("POST", "/token") => {
                let grant = f("grant_type");
                let client_ok = f("client_id") == s.client_id
                    && s.client_secret.as_ref() == Some(&f("client_secret"));
                match grant.as_str() {
                    "authorization_code" => {
                        if !client_ok {
                            return Some(json_error("invalid_client", "bad client credentials"));
                        }
                        let Some(entry) = s.extra.remove(&format!("code:{}", f("code"))) else {
                            return Some(json_error(
                                "invalid_grant",
                                "code unknown or already redeemed",
                            ));
                        };
                        let (challenge, redirect) = entry.split_once('|').unwrap();
                        let digest = ring::digest::digest(
                            &ring::digest::SHA256,
                            f("code_verifier").as_bytes(),
                        );
                        let computed =
                            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
                        if computed != challenge {
                            return Some(json_error("invalid_grant", "PKCE verification failed"));
                        }
                        if f("redirect_uri") != redirect {
                            return Some(json_error(
                                "invalid_grant",
                                "redirect_uri differs from the authorization request",
                            ));
                        }
                        *s.extra.entry("codes_redeemed".into()).or_default() += "x";
                        let rt = s.add_refresh_token();
                        Some((200, s.token_json(Some(rt)), vec![]))
                    }
                    "urn:ietf:params:oauth:grant-type:device_code" => {
                        if f("device_code") != "dev-code-1" {
                            return Some(json_error("invalid_grant", "unknown device code"));
                        }
                        let n = {
                            let polls = s.extra.entry("polls".into()).or_default();
                            polls.push('x');
                            polls.len()
                        };
                        // After the slow_down answered to poll 1, the interval grows by 5 s.
                        let min_gap_ms: u128 = if n == 2 { 6000 } else { 1000 };
                        let t = now_ms();
                        if let Some(prev) = s
                            .extra
                            .get("last_poll")
                            .and_then(|p| p.parse::<u128>().ok())
                        {
                            if t - prev + 50 < min_gap_ms {
                                s.extra.insert(
                                    "too_fast".into(),
                                    format!("poll {n} after {} ms", t - prev),
                                );
                            }
                        }
                        s.extra.insert("last_poll".into(), t.to_string());
                        if n == 1 {
                            return Some(json_error("slow_down", "polling too fast"));
                        }
                        if !s.extra.contains_key("approved:WDJB-MJHT") {
                            return Some(json_error(
                                "authorization_pending",
                                "waiting for the user",
                            ));
                        }
                        let rt = s.add_refresh_token();
                        Some((200, s.token_json(Some(rt)), vec![]))
                    }
                    "client_credentials" => {
                        if f("scope") != "https://outlook.office365.com/.default" {
                            return Some(json_error("invalid_scope", "scope must be .default"));
                        }
                        let assertion_ok = f("client_id") == s.client_id
                            && f("client_assertion_type")
                                == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                            && verify_jwt(&f("client_assertion")).is_ok_and(|(h, c)| {
                                h["x5t"].as_str().is_some_and(|t| !t.is_empty())
                                    && c["aud"] == token_url.as_str()
                                    && c["iss"] == s.client_id.as_str()
                                    && c["sub"] == s.client_id.as_str()
                            });
                        if !(client_ok || assertion_ok) {
                            return Some(json_error(
                                "invalid_client",
                                "AADSTS7000215: Invalid client secret provided.",
                            ));
                        }
                        *s.extra.entry("cc_grants".into()).or_default() += "x";
                        Some((200, s.token_json(None), vec![]))
                    }
                    "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
                        match verify_jwt(&f("assertion")) {
                            Ok((_, c))
                                if c["iss"] == SA_EMAIL
                                    && c["sub"] == s.mailbox.as_str()
                                    && c["aud"] == token_url.as_str()
                                    && c["scope"] == "https://mail.google.com/" =>
                            {
                                *s.extra.entry("sa_grants".into()).or_default() += "x";
                                Some((200, s.token_json(None), vec![]))
                            }
                            Ok((_, c)) => {
                                Some(json_error("invalid_grant", &format!("bad claims {c}")))
                            }
                            Err(e) => Some(json_error("invalid_grant", &e)),
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    })
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

async fn start(
    extra_provider: &str,
    extra_accounts: &str,
) -> (tempfile::TempDir, FakeProvider, Relay, u16) {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", Some(auth_routes())).await;
    let redirect_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    {
        let mut s = provider.state();
        s.extra
            .insert("port".into(), provider.http_addr.port().to_string());
        s.extra.insert(
            "redirect_uri".into(),
            format!("http://127.0.0.1:{redirect_port}/"),
        );
    }
    let base = provider.base_url();
    let opts = RelayOptions {
        extra_provider_toml: format!(
            "authorize_url = \"{base}/authorize\"\ndevice_authorization_url = \"{base}/device\"\nredirect_port = {redirect_port}\n{extra_provider}"
        ),
        extra_accounts_toml: extra_accounts.to_string(),
        ..RelayOptions::default()
    };
    let relay = Relay::start(dir.path(), &provider, opts).await;
    (dir, provider, relay, redirect_port)
}

fn command(relay: &Relay, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("--config").arg(&relay.config_path).args(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Minimal HTTP GET, as the operator's browser would do; returns (status, Location, body).
async fn browser_get(url: &str) -> (u16, Option<String>, String) {
    let u = url::Url::parse(url).unwrap();
    let mut stream = TcpStream::connect((u.host_str().unwrap(), u.port().unwrap()))
        .await
        .unwrap();
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                u.host_str().unwrap()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let location = raw
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").map(str::to_string));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, location, body)
}

/// Reads the child's stdout until a line satisfies `pick`.
async fn line_matching(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pick: impl Fn(&str) -> bool,
) -> String {
    while let Some(line) = lines.next_line().await.unwrap() {
        if pick(&line) {
            return line;
        }
    }
    panic!("the command ended without printing the expected line");
}

async fn mailer_sends(relay: &Relay, provider: &FakeProvider, login: &str) -> Vec<String> {
    let mut c = Client::connect(relay, Conn::Implicit, &provider.pki).await;
    assert_eq!(
        c.login_plain(login, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    c.send_mail("news@example.com", &["a@x.org"], b"after authorize\r\n")
        .await
}

#[tokio::test]
async fn loopback_flow_with_pkce_while_the_relay_runs() {
    let (_dir, provider, relay, redirect_port) = start("", "").await;
    let mut child = command(&relay, &["authorize", "news", "--no-browser"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = line_matching(&mut out, |l| l.starts_with("http://")).await;
    assert!(
        url.starts_with(&format!("{}/authorize?", provider.base_url())),
        "{url}"
    );
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("login_hint=news%40example.com"),
        "{url}"
    );

    let (status, location, _) = browser_get(&url).await;
    assert_eq!(status, 302);
    let location = location.unwrap();
    assert!(
        location.starts_with(&format!("http://127.0.0.1:{redirect_port}/?code=")),
        "{location}"
    );
    // A request with a forged state is refused and does not end the wait.
    let (status, _, body) = browser_get(&format!(
        "http://127.0.0.1:{redirect_port}/?code=x&state=forged"
    ))
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("state does not match"), "{body}");
    let (status, _, body) = browser_get(&location).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Authorization received"), "{body}");
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rest: Vec<String> = {
        let mut v = Vec::new();
        while let Some(l) = out.next_line().await.unwrap() {
            v.push(l);
        }
        v
    };
    assert!(
        rest.iter()
            .any(|l| l == "account `news`: grant stored; the next session uses it"),
        "{rest:?}"
    );
    assert_eq!(
        provider
            .state()
            .extra
            .get("codes_redeemed")
            .map(String::len),
        Some(1)
    );

    // The running relay uses the new grant; the access token from the exchange is reused.
    assert!(mailer_sends(&relay, &provider, LOGIN)
        .await
        .last()
        .unwrap()
        .starts_with("250"));
    assert_eq!(
        provider.state().refresh_count,
        0,
        "the access token from the code exchange is used first"
    );
}

#[tokio::test]
async fn paste_back_flow_through_stdin() {
    let (_dir, provider, relay, _) = start("", "").await;
    // A pasted URL with the wrong state is refused.
    let mut child = command(&relay, &["authorize", "news", "--manual"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = line_matching(&mut out, |l| l.starts_with("http://")).await;
    let (_, location, _) = browser_get(&url).await;
    let forged = location.unwrap().replace("state=", "state=x");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{forged}\n").as_bytes())
        .await
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("state does not match"));

    let mut child = command(&relay, &["authorize", "news", "--manual"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = line_matching(&mut out, |l| l.starts_with("http://")).await;
    let (status, location, _) = browser_get(&url).await;
    assert_eq!(status, 302);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{}\n", location.unwrap()).as_bytes())
        .await
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(mailer_sends(&relay, &provider, LOGIN)
        .await
        .last()
        .unwrap()
        .starts_with("250"));
}

#[tokio::test]
async fn device_flow_honours_interval_and_slow_down() {
    let (_dir, provider, relay, _) = start("", "").await;
    let started = std::time::Instant::now();
    let mut child = command(&relay, &["authorize", "news", "--device"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let verify = line_matching(&mut out, |l| l.starts_with("http://")).await;
    assert_eq!(verify, format!("{}/verify", provider.base_url()));
    let code_line = line_matching(&mut out, |l| l.contains("enter the code")).await;
    let code = code_line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(code, "WDJB-MJHT");
    browser_get(&format!("{verify}?user_code={code}")).await;
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    {
        let s = provider.state();
        assert_eq!(s.extra.get("too_fast"), None, "polled faster than allowed");
        assert!(s.extra.get("polls").unwrap().len() >= 2);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "slow_down adds 5 s to the interval"
    );
    assert!(mailer_sends(&relay, &provider, LOGIN)
        .await
        .last()
        .unwrap()
        .starts_with("250"));
}

#[tokio::test]
async fn device_flow_refuses_gmail_scope_up_front() {
    let (_dir, _provider, relay, _) = start("", "").await;
    // A google preset account: Google rejects mail scopes in the device flow.
    let text = std::fs::read_to_string(&relay.config_path).unwrap()
        + "\n[providers.google]\nclient_id = \"x.apps.googleusercontent.com\"\nclient_secret = \"s\"\n\n[[accounts]]\nname = \"g\"\npassword_hash = \""
        + &password_hash()
        + "\"\nprovider = \"google\"\nmailbox = \"g@gmail.com\"\n";
    let path = relay.dir.join("google.toml");
    std::fs::write(&path, text).unwrap();
    let output = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["authorize", "g", "--device"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("Google does not allow the Gmail scope"),
        "{err}"
    );
}

fn write_sa_key(dir: &Path) -> String {
    let key = serde_json::json!({
        "type": "service_account",
        "client_email": SA_EMAIL,
        "private_key_id": "kid-1",
        "private_key": std::fs::read_to_string(fixture("test-rsa-key.pem")).unwrap(),
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let path = dir.join("sa.json");
    std::fs::write(&path, key.to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn client_credentials_and_service_account_need_no_authorize() {
    let provider = FakeProvider::start("implicit", Some(auth_routes())).await;
    let dir = tempfile::tempdir().unwrap();
    let sa = write_sa_key(dir.path());
    provider
        .state()
        .extra
        .insert("port".into(), provider.http_addr.port().to_string());
    let base = provider.base_url();
    let common = format!(
        "token_url = \"{base}/token\"\nclient_id = \"test-client\"\nsmtp_host = \"localhost\"\nsmtp_port = {}\nsmtp_tls = \"implicit\"\nsmtp_ca_file = \"{}/certs/upstream-ca.pem\"\n",
        provider.smtp_addr.port(),
        dir.path().display()
    );
    let extra = format!(
        r#"
[[accounts]]
name = "app"
login = "app"
password_hash = "{hash}"
provider = "m365app"
mailbox = "news@example.com"

[[accounts]]
name = "sa"
login = "sa"
password_hash = "{hash}"
provider = "workspace"
mailbox = "news@example.com"

[providers.m365app]
{common}grant = "client_credentials"
scopes = ["https://outlook.office365.com/.default"]
client_certificate_file = "{cert}"
client_private_key_file = "{key}"

[providers.workspace]
{common}grant = "service_account"
scopes = ["https://mail.google.com/"]
service_account_key_file = "{sa}"
"#,
        hash = password_hash(),
        cert = fixture("test-rsa-cert.pem"),
        key = fixture("test-rsa-key.pem"),
    );
    let opts = RelayOptions {
        extra_accounts_toml: extra,
        ..RelayOptions::default()
    };
    let relay = Relay::start(dir.path(), &provider, opts).await;
    for login in ["app", "sa"] {
        let replies = mailer_sends(&relay, &provider, login).await;
        assert_eq!(
            replies.last().unwrap(),
            "250 2.0.0 OK 1700000000 x-fake-id",
            "{login}"
        );
    }
    {
        let s = provider.state();
        assert_eq!(s.extra.get("cc_grants").map(String::len), Some(1));
        assert_eq!(s.extra.get("sa_grants").map(String::len), Some(1));
    }
    let output = command(&relay, &["authorize", "app"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no authorization needed"));
    let output = command(&relay, &["accounts"]).output().await.unwrap();
    let table = String::from_utf8_lossy(&output.stdout).to_string();
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        row("app ").contains("client_credentials") && row("app ").contains(" ok "),
        "{table}"
    );
    assert!(
        row("sa ").contains("service_account") && row("sa ").contains(" ok "),
        "{table}"
    );
    assert!(row("news ").contains("needs authorization"), "{table}");
}

#[tokio::test]
async fn revoke_and_test_commands_while_serving() {
    let (_dir, provider, relay, _) = start("", "").await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;

    let output = command(&relay, &["test", "news", "--to", "check@example.org"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("token: ok"), "{text}");
    assert!(
        text.contains("authenticate XOAUTH2 as news@example.com: ok"),
        "{text}"
    );
    assert!(text.contains("message: 250 2.0.0 OK"), "{text}");
    assert_eq!(
        provider.state().messages.last().unwrap().rcpts,
        vec!["check@example.org"]
    );

    let output = command(&relay, &["revoke", "news"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("grant deleted; revoked at the provider"),
        "{text}"
    );
    assert_eq!(
        provider
            .state()
            .extra
            .get("revocations")
            .map(String::as_str),
        Some("x")
    );
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    let reply = c.login_plain(LOGIN, PASSWORD).await;
    assert!(
        reply.starts_with("454 4.7.0 account `news`: no grant stored yet"),
        "{reply}"
    );
}

//! What an operator watches: `/metrics` after traffic, `/healthz` and `/readyz`, `accounts --json`
//! and `--usage`, and an alert command told about a revoked grant once.

mod common;

use common::*;
use xoauth_relay::control::wire::Request;

fn with_metrics(extra: &str) -> RelayOptions {
    RelayOptions {
        extra_accounts_toml: format!("\n[metrics]\naddress = \"127.0.0.1:0\"\n{extra}"),
        ..RelayOptions::default()
    }
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn accounts_json(relay: &Relay, usage: bool) -> serde_json::Value {
    let r = admin(relay, Request::Accounts { json: true, usage }).await;
    assert!(r.ok, "{}", r.text);
    serde_json::from_str(&r.text).unwrap()
}

#[tokio::test]
async fn metrics_health_and_account_facts_follow_traffic() {
    let (_dir, provider, relay) = setup(with_metrics(""), "starttls").await;
    // As Google answers a Testing-status app: the refresh token lives 7 days.
    provider.state().refresh_lifetime = Some(7 * 86_400);
    let addr = relay.metrics.expect("metrics endpoint");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
    // Before any traffic, the counters an alert rule watches are there, at 0.
    let fresh = http_get(addr, "/metrics").await.1;
    for series in [
        "xoauth_relay_auth_failures_total{reason=\"bad_credentials\"} 0",
        "xoauth_relay_token_refreshes_total{account=\"news\",outcome=\"invalid_grant\"} 0",
        "xoauth_relay_recipients_total{account=\"news\",outcome=\"bounced\"} 0",
        "xoauth_relay_alerts_total{account=\"news\",event=\"grant_revoked\"} 0",
        "xoauth_relay_upstream_reply_seconds_count{step=\"connect\"} 0",
        // The listeners' configured addresses (port 0 here: the tests' relays take any port).
        "xoauth_relay_sessions_total{listener=\"127.0.0.1:0\"} 0",
    ] {
        assert!(fresh.contains(series), "{series} missing from\n{fresh}");
    }

    let mut wrong = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    assert!(wrong.login_plain(LOGIN, "wrong").await.starts_with("535"));
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let body = b"Subject: hi\r\n\r\nhello\r\n";
    let replies = c
        .send_mail(
            "alice@example.com",
            &["bob@example.net", "carol@example.net"],
            body,
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");

    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let news = |name: &str, extra: &str| format!("{name}{{account=\"news\"{extra}}}");
    for (series, want) in [
        (
            news("xoauth_relay_messages_total", ",outcome=\"relayed\""),
            1.0,
        ),
        (
            news("xoauth_relay_recipients_total", ",outcome=\"accepted\""),
            2.0,
        ),
        (
            news("xoauth_relay_message_bytes_total", ""),
            body.len() as f64,
        ),
        (
            news("xoauth_relay_token_refreshes_total", ",outcome=\"ok\""),
            1.0,
        ),
        (news("xoauth_relay_grant_ok", ""), 1.0),
        (news("xoauth_relay_upstream_connections", ""), 1.0),
        (news("xoauth_relay_queue_messages", ""), 0.0),
        (
            "xoauth_relay_auth_failures_total{reason=\"bad_credentials\"}".into(),
            1.0,
        ),
        (
            "xoauth_relay_sessions_total{listener=\"127.0.0.1:0\"}".into(),
            2.0,
        ),
        ("xoauth_relay_sessions_active".into(), 2.0),
        (
            "xoauth_relay_upstream_reply_seconds_count{step=\"data\"}".into(),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), Some(want), "{series} in\n{text}");
    }
    let expiry = sample(&text, &news("xoauth_relay_token_expiry_seconds", "")).unwrap();
    assert!(expiry > 3000.0 && expiry <= 3600.0, "{expiry}");
    assert!(
        !text.contains("bob@example.net"),
        "a recipient in a label:\n{text}"
    );

    let accounts = accounts_json(&relay, false).await;
    let news_row = &accounts[0];
    assert_eq!(news_row["name"], "news");
    assert_eq!(news_row["login"], LOGIN);
    assert_eq!(news_row["state"], "ok");
    assert_eq!(news_row["grant"], "refresh_token");
    assert!(news_row["last_use"].as_str().unwrap().ends_with('Z'));
    assert!(news_row["token_expires_in_secs"].as_i64().unwrap() > 3000);
    assert!(news_row.get("usage").is_none());
    let dies = news_row["refresh_token_expires_in_secs"].as_i64().unwrap();
    assert!(dies > 7 * 86_400 - 60 && dies <= 7 * 86_400, "{news_row}");

    let usage = &accounts_json(&relay, true).await[0];
    for window in ["last_24h", "last_7d"] {
        let w = &usage[window];
        assert_eq!(w["messages"], 1, "{usage}");
        assert_eq!(w["recipients"], 2);
        assert_eq!(w["bytes"], body.len());
        assert_eq!(w["failed_logins"], 1);
        assert_eq!(w["sources"], 1);
    }
    assert_eq!(usage["last_source"], "127.0.0.1");
    let table = admin(
        &relay,
        Request::Accounts {
            json: false,
            usage: true,
        },
    )
    .await
    .text;
    assert!(
        table.contains("MESSAGES 24H/7D") && table.contains("1/1"),
        "{table}"
    );
    drop(c);
    drop(wrong);
    relay.stop().await;
}

#[tokio::test]
async fn an_alert_command_hears_of_a_revoked_grant_once() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("alert.sh");
    let out = dir.path().join("alerts.jsonl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >> {}\necho >> {}\n",
            out.display(),
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = with_metrics(&format!("\n[alerts]\ncommand = \"{}\"\n", script.display()));
    let provider = FakeProvider::start("implicit", None).await;
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    provider.state().refresh_tokens.clear();

    let login = || async {
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, PASSWORD).await;
        assert!(reply.starts_with("454 4.7.0"), "{reply}");
    };
    login().await;
    // The command runs in the background: its output is the only thing to wait for.
    let line = loop {
        if let Some(l) = std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.ends_with('\n'))
        {
            break l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(event["event"], "grant_revoked");
    assert_eq!(event["account"], "news");
    assert!(
        event["detail"].as_str().unwrap().contains("invalid_grant"),
        "{event}"
    );
    assert!(
        event["hint"]
            .as_str()
            .unwrap()
            .contains("xoauth-relay authorize news"),
        "{event}"
    );
    assert!(event["time"].as_str().unwrap().ends_with('Z'));
    for secret in provider.state().issued.clone() {
        assert!(!line.contains(&secret), "a secret in the alert");
    }
    // A new (also dead) grant is refused again, within repeat_secs: no second alert.
    relay.import("news", "another-dead-token").await;
    login().await;
    let text = http_get(relay.metrics.unwrap(), "/metrics").await.1;
    let fired = "xoauth_relay_alerts_total{account=\"news\",event=\"grant_revoked\"}";
    assert_eq!(sample(&text, fired), Some(1.0), "{text}");
    let refused = "xoauth_relay_token_refreshes_total{account=\"news\",outcome=\"invalid_grant\"}";
    assert_eq!(sample(&text, refused), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "xoauth_relay_grant_ok{account=\"news\"}"),
        Some(0.0)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
    relay.stop().await;
}

/// A webhook on loopback that takes one POST and hands over its body.
async fn one_webhook() -> (String, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut data = Vec::new();
        let mut chunk = [0u8; 4096];
        let body = loop {
            let n = tcp.read(&mut chunk).await.unwrap();
            data.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&data).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    assert!(head.starts_with("POST /hook "), "{head}");
                    break body.to_string();
                }
            }
            assert!(n > 0, "connection closed early");
        };
        tcp.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let _ = tx.send(body);
    });
    (url, rx)
}

#[tokio::test]
async fn a_webhook_gets_the_alert_as_json() {
    let (url, hook) = one_webhook().await;
    let opts = with_metrics(&format!("\n[alerts]\nwebhook_url = \"{url}\"\n"));
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    provider.state().refresh_tokens.clear();
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert!(c
        .login_plain(LOGIN, PASSWORD)
        .await
        .starts_with("454 4.7.0"));
    let event: serde_json::Value = serde_json::from_str(&hook.await.unwrap()).unwrap();
    assert_eq!(event["event"], "grant_revoked");
    assert_eq!(event["account"], "news");
    assert!(event["hint"].as_str().unwrap().contains("authorize news"));
    relay.stop().await;
}

/// `GET /metrics` with an `Accept` header (or none): the content type and the body.
async fn scrape(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: relay\r\n{accept}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

#[tokio::test]
async fn metrics_speak_what_the_scraper_asks_for_and_the_packaged_rules_name_only_real_metrics() {
    let (_dir, provider, relay) = setup(with_metrics(""), "starttls").await;
    let addr = relay.metrics.unwrap();
    // A message relayed: a token with its expiry, a reply latency.
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let replies = c
        .send_mail("alice@example.com", &["bob@example.net"], b"hi\r\n")
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    // Prometheus asks for OpenMetrics first.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (kind, open) = scrape(addr, Some(prometheus)).await;
    assert_eq!(
        kind,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.contains("# TYPE xoauth_relay_auth_failures counter"));
    assert!(open.ends_with("# EOF\n"));
    // curl and older agents get the Prometheus text format.
    let (kind, text) = scrape(addr, None).await;
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    assert!(text.contains("# TYPE xoauth_relay_auth_failures_total counter"));
    assert!(!text.contains("# EOF"));

    // Every metric the dashboard and the alert rules name is one the relay exports (the
    // database's only with a shared store: tests/shared.rs scrapes it there).
    let mut exported = std::collections::HashSet::from(["xoauth_relay_database_up".to_string()]);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    for file in [
        "packaging/grafana-dashboard.json",
        "packaging/prometheus-rules.yml",
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        let mut named = 0;
        for (at, _) in text.match_indices("xoauth_relay_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            named += 1;
            assert!(
                exported.contains(&name),
                "{file} names {name}, which the relay does not export"
            );
        }
        assert!(named > 5, "{file} names the relay's metrics");
    }
}

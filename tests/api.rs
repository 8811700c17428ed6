//! Microsoft Graph and the Gmail API as upstream transports: a mailer speaking SMTP to the relay,
//! the relay speaking HTTP to fakes that check what the real APIs check.

mod common;

use std::time::Duration;

use common::*;
use xoauth_relay::control::wire::Request;

/// Options for `news` on the fake provider with `transport`; the fake grants that API's scope.
fn via(
    provider: &FakeProvider,
    transport: &str,
    provider_keys: &str,
    account_keys: &str,
) -> RelayOptions {
    provider.state().token_scope = api_scope(transport).into();
    RelayOptions {
        extra_provider_toml: format!(
            "transport = \"{transport}\"\napi_url = \"{}\"\n{provider_keys}",
            provider.api_url(transport)
        ),
        extra_accounts_toml: account_keys.into(),
        ..RelayOptions::default()
    }
}

async fn api_relay(
    transport: &str,
    provider_keys: &str,
    account_keys: &str,
) -> (tempfile::TempDir, FakeProvider, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    let opts = via(&provider, transport, provider_keys, account_keys);
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    (dir, provider, relay)
}

const TRANSPORTS: [&str; 2] = ["graph", "gmail_api"];

/// Account keys that also turn on `/metrics`.
const METRICS: &str = "\n[metrics]\naddress = \"127.0.0.1:0\"\n";

async fn metrics(relay: &Relay) -> String {
    http_get(relay.metrics.unwrap(), "/metrics").await.1
}

fn message(to: &str) -> String {
    format!(
        "From: News <news@example.com>\r\nTo: {to}\r\nSubject: hello\r\n\r\n.a line with a leading dot\r\nthe end\r\n"
    )
}

/// The test message, addressed in its header to `to`, sent to bob@example.org by envelope.
async fn to_bob(c: &mut Client, to: &str) -> Vec<String> {
    c.send_mail(
        "news@example.com",
        &["bob@example.org"],
        message(to).as_bytes(),
    )
    .await
}

/// A reply's text on one line: `454-a\n454 b` is "454 a b".
fn one_line(reply: &str) -> String {
    let code = &reply[..3];
    let text: Vec<&str> = reply
        .lines()
        .map(|l| l.get(4..).unwrap_or_default())
        .collect();
    format!("{code} {}", text.join(" "))
}

/// Nothing left in the directory where messages wait for their request.
fn spill_dir_empty(relay: &Relay) -> bool {
    std::fs::read_dir(relay.dir.join("data/api-tmp"))
        .unwrap()
        .count()
        == 0
}

#[tokio::test]
async fn direct_mode_sends_through_either_api_with_the_envelope_exact() {
    for transport in TRANSPORTS {
        let (_dir, provider, relay) = api_relay(transport, "", "").await;
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        let body = message("\"Bob\" <bob@example.org>");
        let replies = c
            .send_mail(
                "news@example.com",
                &["bob@example.org", "dave@example.org"],
                body.as_bytes(),
            )
            .await;
        assert!(all_ok(&replies), "{transport}: {replies:?}");
        let last = replies.last().unwrap();
        let id = if transport == "graph" { "req-" } else { "gm-" };
        assert!(last.starts_with(&format!("250 2.0.0 OK {id}")), "{last}");
        {
            let s = provider.state();
            assert_eq!(s.messages.len(), 1);
            let m = &s.messages[0];
            // The API sends to the header recipients: the envelope's dave came in as Bcc.
            assert_eq!(m.rcpts, ["bob@example.org", "dave@example.org"]);
            let want = body.replace(
                "Subject: hello\r\n",
                "Subject: hello\r\nBcc: <dave@example.org>\r\n",
            );
            assert_eq!(
                String::from_utf8_lossy(&m.body),
                want,
                "{transport}: nothing else changes"
            );
            assert_eq!(s.api_requests.len(), 1, "{:?}", s.api_requests);
            let path = &s.api_requests[0];
            match transport {
                "graph" => assert_eq!(path, "POST /graph/v1.0/users/news%40example.com/sendMail"),
                _ => assert_eq!(path, "POST /upload/gmail/v1/users/me/messages/send"),
            }
        }
        assert!(spill_dir_empty(&relay));
        // `test --to` sends through the same path and prints each step.
        let to = Some("check@example.org".to_string());
        let test = admin(
            &relay,
            Request::Test {
                account: "news".into(),
                to,
            },
        )
        .await;
        assert!(test.ok, "{}", test.text);
        assert!(
            test.text
                .contains(&format!("send through {transport}: 250 2.0.0 OK")),
            "{}",
            test.text
        );
        assert_eq!(provider.state().messages[1].rcpts, ["check@example.org"]);
        relay.stop().await;
    }
}

#[tokio::test]
async fn header_recipients_outside_the_envelope_are_refused_or_stripped() {
    for transport in TRANSPORTS {
        let (_dir, provider, relay) = api_relay(transport, "", METRICS).await;
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        let body = message("list@example.org, bob@example.org");
        let replies = c
            .send_mail("news@example.com", &["bob@example.org"], body.as_bytes())
            .await;
        let last = replies.last().unwrap();
        assert!(last.starts_with("554 5.7.0 "), "{last}");
        assert!(
            last.contains("<list@example.org>") && last.contains("header_recipients"),
            "{last}"
        );
        assert!(provider.state().messages.is_empty(), "nothing sent");
        assert!(provider.state().api_requests.is_empty(), "not even asked");
        let counted = "xoauth_relay_header_recipients_refused_total{account=\"news\"} 1";
        assert!(metrics(&relay).await.contains(counted));
        relay.stop().await;

        let (_dir, provider, relay) =
            api_relay(transport, "", "header_recipients = \"strip\"").await;
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        let replies = c
            .send_mail("news@example.com", &["bob@example.org"], body.as_bytes())
            .await;
        assert!(all_ok(&replies), "{replies:?}");
        {
            let s = provider.state();
            assert_eq!(s.messages[0].rcpts, ["bob@example.org"], "never the list");
            let sent = String::from_utf8_lossy(&s.messages[0].body).to_string();
            assert!(
                sent.starts_with("From: News <news@example.com>\r\nTo: <bob@example.org>\r\n"),
                "{sent}"
            );
        }
        relay.stop().await;
    }
}

#[tokio::test]
async fn queue_mode_refuses_at_the_end_of_data_what_cannot_go_exactly_and_delivers_the_rest() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = api_relay("gmail_api", "", "delivery = \"queue\"").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let refused = to_bob(&mut c, "list@example.org").await;
    assert!(
        refused.last().unwrap().starts_with("554 5.7.0 "),
        "{refused:?}"
    );
    assert!(queue_json(&relay).await.is_empty(), "nothing queued");
    let id = queue_one(
        &mut c,
        &["bob@example.org", "carol@example.org"],
        message("bob@example.org").as_bytes(),
    )
    .await;
    time.advance(Duration::from_millis(10)).await;
    provider.until(|s| s.messages.len() == 1).await;
    wait_for_empty_queue(&relay).await;
    {
        let s = provider.state();
        assert_eq!(
            s.messages[0].rcpts,
            ["bob@example.org", "carol@example.org"],
            "{id}"
        );
        assert!(
            String::from_utf8_lossy(&s.messages[0].body).contains(".a line with a leading dot\r\n")
        );
    }
    assert!(spill_dir_empty(&relay));
    relay.stop().await;
}

#[tokio::test]
async fn an_api_never_splits_a_message_recipients_beyond_the_cap_are_refused_at_rcpt() {
    for account in ["", "delivery = \"queue\""] {
        let (_dir, provider, relay) =
            api_relay("graph", "max_recipients_per_message = 2", account).await;
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        assert!(c
            .cmd("MAIL FROM:<news@example.com>")
            .await
            .starts_with("250"));
        for to in ["a@example.org", "b@example.org"] {
            assert!(c
                .cmd(&format!("RCPT TO:<{to}>"))
                .await
                .starts_with("250 2.1.5"));
        }
        let third = c.cmd("RCPT TO:<c@example.org>").await;
        assert!(
            third.starts_with("452 4.5.3 ") && third.contains("at most 2"),
            "{account}: {third}"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_the_request_made_again() {
    let (_dir, provider, relay) = api_relay("graph", "", "").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let before = provider.state().token_requests;
    let expired = r#"{"error":{"code":"InvalidAuthenticationToken","message":"Lifetime validation failed, the token is expired."}}"#;
    provider
        .state()
        .api_script
        .push_back((401, expired.into(), vec![]));
    let replies = to_bob(&mut c, "bob@example.org").await;
    assert!(all_ok(&replies), "{replies:?}");
    {
        let s = provider.state();
        assert_eq!(s.token_requests, before + 1, "one refresh");
        assert_eq!(s.api_requests.len(), 2, "the request made once more");
        assert_eq!(s.messages.len(), 1);
    }
    relay.stop().await;
}

#[tokio::test]
async fn retry_after_pauses_the_account_exactly_that_long_and_is_not_an_attempt() {
    let (_dir, provider, relay) = api_relay("gmail_api", "", "").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let limited = r#"{"error":{"code":429,"message":"User-rate limit exceeded","errors":[{"reason":"userRateLimitExceeded"}]}}"#;
    let after = vec![("Retry-After".to_string(), "37".to_string())];
    provider
        .state()
        .api_script
        .push_back((429, limited.into(), after.clone()));
    let replies = to_bob(&mut c, "bob@example.org").await;
    let last = replies.last().unwrap();
    assert!(
        last.starts_with("451 4.7.0 ") && last.contains("Try again in 37 seconds"),
        "{last}"
    );
    relay.stop().await;

    let time = ManualTime::start();
    let (_dir, provider, relay) = api_relay("gmail_api", "", "delivery = \"queue\"").await;
    provider
        .state()
        .api_script
        .push_back((429, limited.into(), after));
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(
        &mut c,
        &["bob@example.org"],
        message("bob@example.org").as_bytes(),
    )
    .await;
    let table = until_paused(&relay).await;
    assert!(table.contains("userRateLimitExceeded"), "{table}");
    let listed = queue_json(&relay).await;
    assert_eq!(listed[0]["attempts"], 0, "{listed:?}");
    time.advance(Duration::from_secs(36)).await;
    assert!(
        until_paused(&relay).await.contains("until 1s"),
        "still paused"
    );
    assert!(provider.state().messages.is_empty());
    time.advance(Duration::from_secs(2)).await;
    provider.until(|s| s.messages.len() == 1).await;
    wait_for_empty_queue(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_grant_without_the_api_scope_is_held_alerted_and_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    let opts = via(&provider, "graph", "", METRICS);
    // The grant is for SMTP only: Graph refuses it.
    provider.state().token_scope = "https://outlook.office.com/SMTP.Send offline_access".into();
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let replies = to_bob(&mut c, "bob@example.org").await;
    let last = one_line(replies.last().unwrap());
    assert!(
        last.starts_with("454 4.7.0 ")
            && last.contains("Mail.Send")
            && last.contains("authorize news"),
        "{last}"
    );
    assert!(provider.state().messages.is_empty());
    let alert = "xoauth_relay_alerts_total{account=\"news\",event=\"upstream_auth_rejected\"} 1";
    assert!(metrics(&relay).await.contains(alert));
    // Remembered: the next login is told at AUTH.
    let mut c = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    let auth = one_line(&c.login_plain(LOGIN, PASSWORD).await);
    assert!(
        auth.starts_with("454 4.7.0 ") && auth.contains("ErrorAccessDenied"),
        "{auth}"
    );
    // `accounts` and `test` name the missing scope and the fix.
    let accounts = admin(
        &relay,
        Request::Accounts {
            json: true,
            usage: false,
        },
    )
    .await;
    let rows: serde_json::Value = serde_json::from_str(&accounts.text).unwrap();
    assert_eq!(rows[0]["state"], "scope_missing", "{rows}");
    assert_eq!(rows[0]["transport"], "graph");
    let detail = rows[0]["state_detail"].as_str().unwrap();
    assert!(
        detail.contains("https://graph.microsoft.com/Mail.Send")
            && detail.contains("authorize news"),
        "{detail}"
    );
    let test = admin(
        &relay,
        Request::Test {
            account: "news".into(),
            to: None,
        },
    )
    .await;
    assert!(
        !test.ok && test.text.contains("scopes: the grant's scopes"),
        "{}",
        test.text
    );
    relay.stop().await;
}

/// A MIME message with an HTML body, a small attachment and one larger than a Graph request.
fn large_message(small: &[u8], big: &[u8]) -> Vec<u8> {
    let wrap = |b: &[u8]| {
        b64(b)
            .as_bytes()
            .chunks(76)
            .map(|l| format!("{}\r\n", String::from_utf8_lossy(l)))
            .collect::<String>()
    };
    format!(
        "From: News <news@example.com>\r\nTo: bob@example.org\r\nSubject: Quarterly report\r\n\
         X-Campaign: q3\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
         --XX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>See attached.</p>\r\n\
         --XX\r\nContent-Type: text/csv; name=\"small.csv\"\r\nContent-Disposition: attachment; filename=\"small.csv\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}--XX\r\nContent-Type: application/pdf; name=\"big.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"big.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--XX--\r\n",
        wrap(small),
        wrap(big)
    )
    .into_bytes()
}

#[tokio::test]
async fn graph_takes_a_large_message_as_a_draft_with_an_upload_session() {
    let (_dir, provider, relay) = api_relay("graph", "", "").await;
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let big: Vec<u8> = (0..5_500_000u32)
        .map(|i| (i.wrapping_mul(7) % 256) as u8)
        .collect();
    // Without Mail.ReadWrite the large way is refused: that message waits, the account does not.
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let large = large_message(&small, &big);
    let replies = c
        .send_mail("news@example.com", &["bob@example.org"], &large)
        .await;
    let last = one_line(replies.last().unwrap());
    assert!(
        last.starts_with("451 4.7.0 ") && last.contains("Mail.ReadWrite"),
        "{last}"
    );
    let small_message = message("bob@example.org");
    let replies = c
        .send_mail(
            "news@example.com",
            &["bob@example.org"],
            small_message.as_bytes(),
        )
        .await;
    assert!(all_ok(&replies), "small messages still go: {replies:?}");
    drop(c);
    // With it, on a new token.
    {
        let mut s = provider.state();
        s.token_scope = "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.ReadWrite offline_access".into();
        s.access_tokens.clear();
        s.messages.clear();
        s.api_requests.clear();
    }
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let replies = c
        .send_mail(
            "news@example.com",
            &["bob@example.org", "dave@example.org"],
            &large_message(&small, &big),
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    {
        let s = provider.state();
        let m = &s.messages[0];
        assert_eq!(m.rcpts, ["bob@example.org", "dave@example.org"]);
        let draft: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(draft["subject"], "Quarterly report");
        assert_eq!(draft["body"]["contentType"], "HTML");
        assert_eq!(draft["internetMessageHeaders"][0]["value"], "q3");
        assert_eq!(m.attachments.len(), 2);
        assert_eq!(m.attachments[0], ("small.csv".to_string(), small));
        assert_eq!(m.attachments[1].0, "big.pdf");
        assert!(
            m.attachments[1].1 == big,
            "the upload's ranges add up to the attachment"
        );
        let puts = s
            .api_requests
            .iter()
            .filter(|r| r.starts_with("PUT "))
            .count();
        assert_eq!(puts, 2, "{:?}", s.api_requests);
        assert!(s.drafts.is_empty() && s.uploads.is_empty());
    }
    assert!(spill_dir_empty(&relay));
    relay.stop().await;
}

#[tokio::test]
async fn a_ten_mib_message_streams_to_the_gmail_api_byte_for_byte() {
    let (_dir, provider, relay) = api_relay("gmail_api", "", "").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let mut body = message("bob@example.org").into_bytes();
    let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567\r\n";
    while body.len() < 10 * 1024 * 1024 {
        body.extend_from_slice(line);
    }
    let replies = c
        .send_mail("news@example.com", &["bob@example.org"], &body)
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    assert!(provider.state().messages[0].body == body);
    assert!(spill_dir_empty(&relay), "the temporary copy is gone");
    relay.stop().await;
}

#[tokio::test]
async fn graph_requests_of_one_account_run_at_most_four_at_once() {
    let (_dir, provider, relay) = api_relay("graph", "", "").await;
    provider.state().hold_data = true;
    let mut sessions = Vec::new();
    for i in 0..6 {
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        sessions.push(tokio::spawn(async move {
            let to = format!("r{i}@example.org");
            c.send_mail("news@example.com", &[&to], message(&to).as_bytes())
                .await
        }));
    }
    provider.until(|s| s.api_now == 4).await;
    {
        let mut s = provider.state();
        s.hold_data = false;
        s.changed.notify_waiters();
    }
    for session in sessions {
        let replies = session.await.unwrap();
        assert!(all_ok(&replies), "{replies:?}");
    }
    {
        let s = provider.state();
        assert_eq!(s.messages.len(), 6);
        assert_eq!(s.api_peak, 4, "the preset cap for graph");
    }
    relay.stop().await;
}

#[tokio::test]
async fn api_answers_reach_the_mailer_with_the_code_the_table_gives() {
    let (_dir, provider, relay) = api_relay("graph", "", "").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let cases = [
        (
            403,
            r#"{"error":{"code":"ErrorSendAsDenied","message":"no right to send as"}}"#,
            "550 5.7.1 ",
        ),
        (
            400,
            r#"{"error":{"code":"ErrorInvalidRecipients","message":"At least one recipient isn't valid."}}"#,
            "554 5.6.0 ",
        ),
        (
            413,
            r#"{"error":{"code":"RequestEntityTooLarge","message":"too large"}}"#,
            "552 5.3.4 ",
        ),
        (
            500,
            r#"{"error":{"code":"UnknownError","message":""}}"#,
            "451 4.4.1 ",
        ),
    ];
    for (status, body, want) in cases {
        provider
            .state()
            .api_script
            .push_back((status, body.into(), vec![]));
        let replies = to_bob(&mut c, "bob@example.org").await;
        let last = replies.last().unwrap();
        assert!(last.starts_with(want), "{status}: {last}");
    }
    assert!(provider.state().messages.is_empty());
    relay.stop().await;
}

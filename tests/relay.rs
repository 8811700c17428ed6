//! End to end: mailer → relay → fake provider, over loopback sockets.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn plain_and_login_over_starttls_and_implicit_tls() {
    for smtp_mode in ["implicit", "starttls"] {
        let (_dir, provider, relay) = setup(RelayOptions::default(), smtp_mode).await;
        for (mode, use_login) in [
            (Conn::StartTls, false),
            (Conn::StartTls, true),
            (Conn::Implicit, false),
            (Conn::Implicit, true),
        ] {
            let mut c = Client::connect(&relay, mode, &provider.pki).await;
            let auth = if use_login {
                c.login_login(LOGIN, PASSWORD).await
            } else {
                c.login_plain(LOGIN, PASSWORD).await
            };
            assert_eq!(auth, "235 2.7.0 Authentication successful");
            let body = format!("Subject: {mode:?} {use_login}\r\n\r\nhello\r\n");
            let replies = c
                .send_mail("news@example.com", &["to@example.org"], body.as_bytes())
                .await;
            assert!(all_ok(&replies), "{replies:?}");
            assert_eq!(
                replies.last().unwrap(),
                "250 2.0.0 OK 1700000000 x-fake-id",
                "upstream's own reply"
            );
            assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
            let state = provider.state();
            let m = state.messages.last().unwrap();
            assert_eq!(m.body, body.as_bytes());
            assert_eq!(m.rcpts, vec!["to@example.org"]);
        }
        {
            let state = provider.state();
            assert_eq!(state.messages.len(), 4);
            assert_eq!(state.refresh_count, 1, "one token serves every session");
        }
        relay.stop().await;
    }
}

#[tokio::test]
async fn bodies_arrive_byte_identical() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut big = Vec::new();
    let mut i = 0u32;
    while big.len() < 3 * 1024 * 1024 {
        big.extend_from_slice(
            format!(".line {i} with a leading dot and \u{e9}\u{1f600}\r\n").as_bytes(),
        );
        i += 1;
    }
    // Mostly plain lines (passed on as they came, in writes larger than a batch) with a dotted one
    // now and then (through the decoder).
    let mut mixed = Vec::new();
    let mut i = 0u32;
    while mixed.len() < 3 * 1024 * 1024 {
        let dot = if i.is_multiple_of(997) { "." } else { "" };
        mixed.extend_from_slice(format!("{dot}plain line {i} of a large message\r\n").as_bytes());
        i += 1;
    }
    let bodies: Vec<Vec<u8>> = vec![
        b".leading dot\r\n..two dots\r\n.\r\nend\r\n".to_vec(),
        "Subject: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln, \u{65e5}\u{672c}\r\n"
            .as_bytes()
            .to_vec(),
        b"ends with a blank line\r\n\r\n".to_vec(),
        b"ends without a blank line\r\n".to_vec(),
        Vec::new(),
        big,
        mixed,
    ];
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    for body in &bodies {
        let mut replies = vec![c.cmd("MAIL FROM:<news@example.com> BODY=8BITMIME").await];
        replies.push(c.cmd("RCPT TO:<a@example.org>").await);
        replies.push(c.cmd("DATA").await);
        c.send_raw(&stuff(body)).await;
        replies.push(c.reply().await);
        assert!(all_ok(&replies), "{replies:?}");
        let got = provider.state().messages.last().unwrap().body.clone();
        assert_eq!(got.len(), body.len());
        assert!(got == *body, "body changed in transit");
    }
    // Bare CR and LF are sent upstream as CRLF (RFC 5321 §2.3.8); everything else is untouched.
    let replies = c
        .send_mail(
            "news@example.com",
            &["a@example.org"],
            b"bare\nlf and lone\r cr\r\n",
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    assert_eq!(
        provider.state().messages.last().unwrap().body,
        b"bare\r\nlf and lone\r\n cr\r\n"
    );
    let state = provider.state();
    assert!(
        state.messages[1].mail_from.contains("BODY=8BITMIME"),
        "{}",
        state.messages[1].mail_from
    );
    assert_eq!(state.messages.len(), bodies.len() + 1);
}

#[tokio::test]
async fn fifty_sessions_after_expiry_cause_one_refresh() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"first\r\n")
            .await
    ));
    assert_eq!(provider.state().refresh_count, 1);

    // Move past the refresh margin (token lifetime 3600 s, margin 300 s).
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3400)).await;
    tokio::time::resume();

    let mut tasks = Vec::new();
    for i in 0..50 {
        let relay = relay.view();
        let pki = provider.pki.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&relay, Conn::Implicit, &pki).await;
            let auth = c.login_plain(LOGIN, PASSWORD).await;
            let replies = c
                .send_mail(
                    "news@example.com",
                    &["a@x.org"],
                    format!("parallel {i}\r\n").as_bytes(),
                )
                .await;
            (auth, replies)
        }));
    }
    for t in tasks {
        let (auth, replies) = t.await.unwrap();
        assert_eq!(auth, "235 2.7.0 Authentication successful");
        assert!(all_ok(&replies), "{replies:?}");
    }
    let state = provider.state();
    assert_eq!(
        state.refresh_count, 2,
        "50 sessions after expiry must share one refresh"
    );
    assert_eq!(state.messages.len(), 51);
    assert_eq!(state.auth_rejected, 0);
}

#[tokio::test]
async fn rotated_refresh_token_survives_restart_and_rejected_token_is_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    provider.state().rotate = true;
    let first_rt = provider.state().add_refresh_token();
    let relay = Relay::start(dir.path(), &provider, RelayOptions::default()).await;
    relay.import("news", &first_rt).await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"one\r\n")
            .await
    ));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    drop(c);
    relay.stop().await;
    {
        let mut s = provider.state();
        assert!(
            !s.refresh_tokens.contains(&first_rt),
            "provider rotated the refresh token"
        );
        // The provider forgets every access token: the one persisted by the relay is now refused.
        s.access_tokens.clear();
    }

    let config_path = dir.path().join("relay.toml");
    let relay = Relay::start_from(dir.path(), config_path).await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let replies = c
        .send_mail("news@example.com", &["a@x.org"], b"two\r\n")
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    let s = provider.state();
    assert_eq!(
        s.refresh_count, 2,
        "second refresh used the rotated token from disk"
    );
    assert_eq!(
        s.auth_rejected, 1,
        "the stale token was refused once, then retried"
    );
    assert_eq!(
        s.challenge_answers,
        vec![String::new()],
        "Gmail's 334 challenge answered with an empty line"
    );
    assert_eq!(s.messages.len(), 2);
}

#[tokio::test]
async fn oauthbearer_and_its_error_challenge() {
    let opts = RelayOptions {
        mechanism: "oauthbearer",
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"hi\r\n")
            .await
    ));
    provider.state().access_tokens.clear();
    // The upstream hangs up after this message, so the next one needs a new upstream connection.
    provider.state().close_after_message = true;
    let replies = c
        .send_mail("news@example.com", &["a@x.org"], b"again\r\n")
        .await;
    // Same upstream connection: still authenticated there.
    assert!(all_ok(&replies), "{replies:?}");
    let mut c2 = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c2.send_mail("news@example.com", &["a@x.org"], b"new session\r\n")
            .await
    ));
    let s = provider.state();
    assert_eq!(s.challenge_answers, vec!["AQ==".to_string()]);
    assert_eq!(s.refresh_count, 2);
    assert_eq!(s.messages.len(), 3);
}

#[tokio::test]
async fn revoked_and_missing_grants_are_reported_at_auth() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    provider.state().refresh_tokens.clear();
    let (logs, _guard) = LogCapture::install();
    for _ in 0..3 {
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, PASSWORD).await;
        assert!(
            reply.starts_with(
                "454 4.7.0 account `news`: grant revoked by the provider (invalid_grant"
            ),
            "{reply}"
        );
        assert!(
            reply.contains("run `xoauth-relay authorize news`"),
            "{reply}"
        );
        assert_eq!(
            c.cmd("MAIL FROM:<news@example.com>").await,
            "530 5.7.0 Authentication required"
        );
    }
    assert_eq!(
        provider.state().refresh_count,
        1,
        "a revoked grant is not retried in a loop"
    );
    assert_eq!(
        logs.text().matches("token request failed").count(),
        1,
        "logged once:\n{}",
        logs.text()
    );

    // A new grant takes effect for the next session, without a restart.
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"back\r\n")
            .await
    ));

    // An account that was never authorized.
    let dir = tempfile::tempdir().unwrap();
    let relay2 = Relay::start(dir.path(), &provider, RelayOptions::default()).await;
    let mut c = Client::connect(&relay2, Conn::Implicit, &provider.pki).await;
    let reply = c.login_plain(LOGIN, PASSWORD).await;
    assert_eq!(
        reply,
        "454 4.7.0 account `news`: no grant stored yet; run `xoauth-relay authorize news`"
    );
}

#[tokio::test]
async fn smtp_auth_disabled_is_explained_without_refreshing() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "starttls").await;
    provider.state().auth_reply = Some(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
    );
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let reply = c.cmd("MAIL FROM:<news@example.com>").await;
    assert!(
        reply.starts_with("454-4.7.0 Upstream rejected the account's token (535 5.7.139"),
        "{reply}"
    );
    assert!(reply.contains("Set-CASMailbox"), "{reply}");
    let s = provider.state();
    assert_eq!(s.auth_rejected, 1, "a new token cannot help: no retry");
    assert_eq!(s.refresh_count, 1, "no refresh beyond the first token");
}

#[tokio::test]
async fn a_token_endpoint_outage_costs_one_request_not_one_per_session() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    provider.state().token_outage = true;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let relay = relay.view();
        let pki = provider.pki.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&relay, Conn::Implicit, &pki).await;
            c.login_plain(LOGIN, PASSWORD).await
        }));
    }
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(
            reply.starts_with(
                "454 4.7.0 account `news`: the provider's token endpoint cannot be reached right now"
            ),
            "{reply}"
        );
        // The endpoint's address and the transport error are for the log, not the mailer.
        assert!(
            !reply.contains("127.0.0.1") && !reply.contains("http") && !reply.contains("503"),
            "{reply}"
        );
    }
    assert_eq!(provider.state().token_requests, 1);
}

#[tokio::test]
async fn upstream_down_gives_451() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let opts = RelayOptions {
        smtp_port_override: Some(port),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    let reply = c.cmd("MAIL FROM:<news@example.com>").await;
    assert!(
        reply.starts_with("451 4.4.1 Upstream not available"),
        "{reply}"
    );
    assert_eq!(
        c.cmd("RCPT TO:<a@x.org>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );

    // Token endpoint unreachable: reported at AUTH.
    let dir = tempfile::tempdir().unwrap();
    let opts = RelayOptions {
        token_url_override: Some(format!("http://127.0.0.1:{port}/token")),
        ..RelayOptions::default()
    };
    let relay = Relay::start(dir.path(), &provider, opts).await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    let reply = c.login_plain(LOGIN, PASSWORD).await;
    assert!(
        reply.starts_with(
            "454 4.7.0 account `news`: the provider's token endpoint cannot be reached right now"
        ),
        "{reply}"
    );
    assert!(!reply.contains(&port.to_string()), "no address: {reply}");
}

#[tokio::test]
async fn per_recipient_replies_pass_through() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    let replies = c
        .send_mail(
            "news@example.com",
            &["ok1@x.org", "reject-me@x.org", "later@x.org", "ok2@x.org"],
            b"mixed\r\n",
        )
        .await;
    assert_eq!(replies[1], "250 2.1.5 OK");
    assert_eq!(
        replies[2],
        "550 5.1.1 The email account that you tried to reach does not exist: reject-me@x.org"
    );
    assert_eq!(
        replies[3],
        "450 4.2.1 The user you are trying to contact is receiving mail too quickly"
    );
    assert_eq!(replies[4], "250 2.1.5 OK");
    assert_eq!(replies[6], "250 2.0.0 OK 1700000000 x-fake-id");
    assert_eq!(
        provider.state().messages[0].rcpts,
        vec!["ok1@x.org", "ok2@x.org"]
    );

    // Upstream rejects the message itself: its code reaches the mailer.
    let replies = c
        .send_mail("news@example.com", &["reject-only@x.org"], b"x\r\n")
        .await;
    assert!(replies[1].starts_with("550 5.1.1"));
    assert_eq!(replies[2], "554 5.5.1 No valid recipients");
}

#[tokio::test]
async fn error_replies() {
    let opts = RelayOptions {
        allowed_senders: Some(vec!["news@example.com".into(), "*@news.example.com".into()]),
        max_message_bytes: 1000,
        // This session makes a dozen mistakes on purpose (tests/hostile.rs covers the limit).
        extra_limits_toml: "max_errors_per_session = 20".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;

    // Without TLS on a port that requires it.
    let mut c = Client::plain(&relay).await;
    let ehlo = c.cmd("EHLO x").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(c.cmd("FOO bar").await, "500 5.5.1 Unknown command");
    assert!(c
        .cmd("MAIL FROM:<news@example.com>")
        .await
        .starts_with("530 5.7.0"));
    assert!(c
        .login_plain(LOGIN, PASSWORD)
        .await
        .starts_with("538 5.7.11"));
    let long = "NOOP ".to_string() + &"x".repeat(20_000);
    assert_eq!(c.cmd(&long).await, "500 5.5.6 Line too long");
    assert_eq!(
        c.cmd("NOOP").await,
        "250 2.0.0 OK",
        "the session goes on after a long line"
    );

    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert_eq!(
        c.cmd("AUTH PLAIN not*base64").await,
        "501 5.5.2 Invalid base64 data"
    );
    assert_eq!(
        c.login_plain(LOGIN, "wrong").await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert_eq!(
        c.login_plain("nobody", PASSWORD).await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert_eq!(
        c.login_plain(LOGIN, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    assert!(
        c.cmd("MAIL FROM:news@example.com")
            .await
            .starts_with("501 5.5.2"),
        "syntax error"
    );
    assert_eq!(
        c.cmd("RCPT TO:<a@x.org>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );
    assert_eq!(c.cmd("DATA").await, "503 5.5.1 Need MAIL before DATA");
    assert_eq!(
        c.cmd("MAIL FROM:<news@example.com> SIZE=5000").await,
        "552 5.3.4 Message size exceeds the limit of 1000 bytes"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<boss@example.com>").await,
        "550 5.7.1 Sender <boss@example.com> is not allowed for account news"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@news.example.com>").await,
        "250 2.1.0 OK"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@news.example.com>").await,
        "503 5.5.1 Nested MAIL command"
    );
    for i in 0..5 {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<r{i}@x.org>")).await,
            "250 2.1.5 OK"
        );
    }
    assert_eq!(
        c.cmd("RCPT TO:<r6@x.org>").await,
        "452 4.5.3 Too many recipients"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    let big = "y".repeat(3000) + "\r\n";
    c.send_raw(&stuff(big.as_bytes())).await;
    assert_eq!(
        c.reply().await,
        "552 5.3.4 Message size exceeds the limit of 1000 bytes"
    );
    assert_eq!(
        c.cmd("VRFY someone").await,
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    );
    assert!(c.cmd("HELP").await.starts_with("214 2.0.0"));
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 OK");
    // After the oversized message the next one goes through on a fresh upstream connection.
    let replies = c
        .send_mail("news@example.com", &["a@x.org"], b"small\r\n")
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    // Bare LF is not an end of data, and the upstream never sees one that it might take for one.
    assert_eq!(c.cmd("MAIL FROM:<news@example.com>").await, "250 2.1.0 OK");
    assert_eq!(c.cmd("RCPT TO:<a@x.org>").await, "250 2.1.5 OK");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send_raw(b"one\n.\nsmuggled\r\n.\r\n").await;
    assert_eq!(c.reply().await, "250 2.0.0 OK 1700000000 x-fake-id");
    assert_eq!(
        provider.state().messages.last().unwrap().body,
        b"one\r\n.\r\nsmuggled\r\n"
    );
    assert_eq!(
        provider.state().messages.len(),
        2,
        "the oversized message never completed upstream"
    );
}

#[tokio::test]
async fn idle_timeout_and_connection_limit() {
    let opts = RelayOptions {
        idle_timeout_secs: 1,
        max_connections: 1,
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    let mut first = Client::plain(&relay).await;
    let mut second = tokio::net::TcpStream::connect(relay.plain).await.unwrap();
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut second, &mut buf)
        .await
        .unwrap();
    assert_eq!(buf, b"421 4.3.2 Too many connections, try again later\r\n");
    assert_eq!(
        first.reply().await,
        "421 4.4.2 Idle timeout, closing connection"
    );
    drop(provider);
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_is_transparent() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "starttls").await;
    provider.state().close_after_message = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    for i in 0..3 {
        let replies = c
            .send_mail(
                "news@example.com",
                &["a@x.org"],
                format!("msg {i}\r\n").as_bytes(),
            )
            .await;
        assert!(all_ok(&replies), "{replies:?}");
    }
    let s = provider.state();
    assert_eq!(s.messages.len(), 3);
    assert_eq!(
        s.auth_ok, 3,
        "one upstream connection per message, reopened transparently"
    );
    assert_eq!(s.refresh_count, 1);
}

#[tokio::test]
async fn shutdown_lets_a_message_finish_and_sends_idle_sessions_away() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut idle = logged_in(&relay, &provider, Conn::Implicit).await;
    let mut busy = logged_in(&relay, &provider, Conn::Implicit).await;
    assert_eq!(
        busy.cmd("MAIL FROM:<news@example.com>").await,
        "250 2.1.0 OK"
    );
    assert_eq!(busy.cmd("RCPT TO:<a@x.org>").await, "250 2.1.5 OK");
    assert!(busy.cmd("DATA").await.starts_with("354"));
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n")
        .await;
    let stopping = tokio::spawn(relay.stop());
    assert_eq!(
        idle.reply().await,
        "421 4.3.2 Service shutting down, try again later"
    );
    busy.send_raw(b"second half\r\n.\r\n").await;
    assert_eq!(busy.reply().await, "250 2.0.0 OK 1700000000 x-fake-id");
    busy.send_raw(b"NOOP\r\n").await;
    assert_eq!(
        busy.reply().await,
        "421 4.3.2 Service shutting down, try again later"
    );
    stopping.await.unwrap();
    assert_eq!(
        provider.state().messages[0].body,
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

#[tokio::test]
async fn client_dropping_mid_data_aborts_upstream() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert_eq!(c.cmd("MAIL FROM:<news@example.com>").await, "250 2.1.0 OK");
    assert_eq!(c.cmd("RCPT TO:<a@x.org>").await, "250 2.1.5 OK");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send_raw(b"Subject: half\r\n\r\npartial body").await;
    drop(c);
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"whole\r\n")
            .await
    ));
    let s = provider.state();
    assert_eq!(
        s.messages.len(),
        1,
        "the half message never completed upstream"
    );
    assert_eq!(s.messages[0].body, b"whole\r\n");
}

#[tokio::test]
async fn secrets_never_reach_logs_or_the_database_file() {
    let (logs, _guard) = LogCapture::install();
    let (dir, provider, relay) = setup(RelayOptions::default(), "starttls").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    assert!(all_ok(
        &c.send_mail(
            "news@example.com",
            &["a@x.org"],
            b"Subject: s\r\n\r\nBODY-SECRET-TEXT\r\n"
        )
        .await
    ));
    provider.state().access_tokens.clear();
    let mut c2 = logged_in(&relay, &provider, Conn::StartTls).await;
    assert!(all_ok(
        &c2.send_mail("news@example.com", &["a@x.org"], b"again\r\n")
            .await
    ));
    let mut c3 = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    c3.login_plain(LOGIN, "wrong-pw-SECRET").await;
    drop((c, c2, c3));
    relay.stop().await;

    let text = logs.text();
    assert!(text.contains("message relayed"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("message relayed")
            && l.contains("account=news")
            && l.contains("recipients=1")),
        "{text}"
    );
    let mut secrets = provider.state().issued.clone();
    secrets.extend([
        PASSWORD.to_string(),
        "wrong-pw-SECRET".into(),
        "BODY-SECRET-TEXT".into(),
    ]);
    assert!(secrets.len() >= 5);
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "secret {s} in logs");
    }
    let mut files = Vec::new();
    collect_files(&dir.path().join("data"), &mut files);
    assert!(
        !files.iter().any(|f| f.ends_with("master.key")),
        "the key is not in data_dir"
    );
    assert!(
        dir.path().join("master.key").exists(),
        "but beside the config"
    );
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{s} in clear in {}",
                f.display()
            );
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        if !f.ends_with("control.sock") {
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
        }
    }
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn python_smtplib_sends_through_the_relay() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("python3 not installed; skipping the stock-client check");
        return;
    }
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile=None)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", {port}, timeout=30)
s.starttls(context=ctx)
s.login("{login}", "{password}")
s.sendmail("news@example.com", ["a@example.org", "b@example.org"], "Subject: smtplib\r\n\r\n.dot first\r\nhello\r\n")
s.quit()
s = smtplib.SMTP_SSL("127.0.0.1", {iport}, timeout=30, context=ctx)
s.login("{login}", "{password}")
s.sendmail("news@example.com", ["c@example.org"], "Subject: implicit\r\n\r\nhi\r\n")
s.quit()
print("sent")
"#,
        port = relay.starttls.port(),
        iport = relay.implicit.port(),
        login = LOGIN,
        password = PASSWORD
    );
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent");
    let s = provider.state();
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.messages[0].rcpts, vec!["a@example.org", "b@example.org"]);
    assert_eq!(
        s.messages[0].body,
        b"Subject: smtplib\r\n\r\n.dot first\r\nhello\r\n"
    );
}

#[tokio::test]
async fn a_data_dir_open_to_others_is_tightened_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = write_config(
        dir.path(),
        &provider,
        &RelayOptions::default(),
        &password_hash(),
    );
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    assert!(
        config
            .warnings()
            .iter()
            .any(|w| w.contains("open to other users")),
        "check reports it: {:?}",
        config.warnings()
    );
    let relay = Relay::start_from(dir.path(), path).await;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    relay.stop().await;
}

#[tokio::test]
async fn a_device_at_its_source_address_sends_without_a_login_and_others_may_not() {
    let opts = RelayOptions {
        // A scanner's account: its address, no login, no password.
        extra_accounts_toml: "\n[[accounts]]\nname = \"scanner\"\nprovider = \"fake\"\nmailbox = \"news@example.com\"\nsources = [\"127.0.0.2\", \"127.0.9.0/24\"]\nallowed_senders = [\"scanner@example.com\"]\n".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "starttls").await;
    let rt = provider.state().add_refresh_token();
    relay.import("scanner", &rt).await;
    let device: std::net::IpAddr = "127.0.9.7".parse().unwrap();
    // No STARTTLS, no AUTH: its MAIL is the scanner account's.
    let mut c =
        Client::connect_from(relay.starttls, Some(device), Conn::Plain, &provider.pki).await;
    let replies = c
        .send_mail(
            "scanner@example.com",
            &["bob@example.org"],
            b"Subject: scan\r\n\r\npage 1\r\n",
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    // Its allowed_senders still apply.
    assert!(c
        .cmd("MAIL FROM:<ceo@example.com>")
        .await
        .starts_with("550 5.7.1"));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    {
        let s = provider.state();
        assert_eq!(s.messages.len(), 1);
        assert!(s.messages[0].body.ends_with(b"page 1\r\n"));
    }
    // Any other address: MAIL without AUTH is refused as before.
    let mut other = Client::connect_from(
        relay.starttls,
        Some("127.0.0.3".parse().unwrap()),
        Conn::Plain,
        &provider.pki,
    )
    .await;
    assert_eq!(
        other.cmd("MAIL FROM:<scanner@example.com>").await,
        "530 5.7.0 Authentication required"
    );
    // From the device's address, a login still works, as that login's account.
    let mut c = Client::connect_from(
        relay.starttls,
        Some("127.0.0.2".parse().unwrap()),
        Conn::StartTls,
        &provider.pki,
    )
    .await;
    assert_eq!(
        c.login_plain(LOGIN, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    assert!(all_ok(
        &c.send_mail("news@example.com", &["carol@example.org"], b"hi\r\n")
            .await
    ));
    // Usage names the device's address.
    let usage = admin(
        &relay,
        xoauth_relay::control::wire::Request::Accounts {
            json: true,
            usage: true,
        },
    )
    .await;
    let accounts: serde_json::Value = serde_json::from_str(&usage.text).unwrap();
    let scanner = accounts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "scanner")
        .unwrap();
    assert_eq!(scanner["last_source"], "127.0.9.7", "{scanner}");
    assert_eq!(scanner["last_24h"]["messages"], 1, "{scanner}");
    assert_eq!(scanner["last_24h"]["sources"], 1, "{scanner}");
    assert!(scanner["login"].is_null(), "devices only: {scanner}");
}

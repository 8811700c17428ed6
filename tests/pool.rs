//! The fast path: upstream connections pooled per account and capped, pipelining, the login cache,
//! short-lived tokens. Mailer → relay → fake provider over loopback sockets.

mod common;

use std::time::Duration;

use common::*;

fn capped(cap: usize) -> RelayOptions {
    RelayOptions {
        extra_provider_toml: format!("max_upstream_connections = {cap}"),
        ..RelayOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_share_three_upstream_connections() {
    let (_dir, provider, relay) = setup(capped(3), "implicit").await;
    // Like Exchange Online: a fourth concurrent authenticated connection gets 432 4.3.2.
    provider.state().max_authed = Some(3);
    for replies in sessions_sending(&[&relay], &provider.pki, 20, 3).await {
        assert!(all_ok(&replies), "{replies:?}");
    }
    {
        let s = provider.state();
        assert_eq!(s.messages.len(), 60, "every message delivered");
        assert!(
            s.authed_peak <= 3,
            "at most 3 upstream connections at once, saw {}",
            s.authed_peak
        );
        assert!(
            s.auth_ok <= 3,
            "connections are reused: {} AUTHs",
            s.auth_ok
        );
        assert_eq!(s.auth_rejected, 0, "no 432 from the upstream");
    }
    assert!(relay.probe.upstream_connections("news") <= 3);
    relay.stop().await;
}

#[tokio::test]
async fn connections_are_reused_across_sessions_and_closed_when_idle() {
    let opts = RelayOptions {
        extra_limits_toml: "upstream_idle_secs = 30".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    for i in 0..5 {
        let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
        let body = format!("message {i}\r\n");
        assert!(all_ok(
            &c.send_mail("news@example.com", &["a@x.org"], body.as_bytes())
                .await
        ));
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    }
    {
        let s = provider.state();
        assert_eq!(s.messages.len(), 5);
        assert_eq!(s.auth_ok, 1, "one upstream AUTH for five sessions");
        assert_eq!(s.connections, 1);
        assert_eq!(
            s.quits, 0,
            "the idle connection stays open for the next session"
        );
    }
    let clock = ManualTime::start();
    clock.advance(Duration::from_secs(31)).await;
    provider.until(|s| s.quits == 1 && s.authed_now == 0).await;
    drop(clock);
    // The next message opens (and authenticates) a new connection.
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"later\r\n")
            .await
    ));
    assert_eq!(provider.state().auth_ok, 2);
}

#[tokio::test]
async fn a_new_grant_or_a_revoke_drops_the_pooled_connections() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"one\r\n")
            .await
    ));
    assert_eq!(provider.state().auth_ok, 1);
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    provider.until(|s| s.quits == 1).await;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"two\r\n")
            .await
    ));
    assert_eq!(
        provider.state().auth_ok,
        2,
        "the next message authenticates with the new grant"
    );
}

#[tokio::test]
async fn a_mailer_gone_mid_data_never_returns_its_connection() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut first = logged_in(&relay, &provider, Conn::Implicit).await;
    assert!(all_ok(
        &first
            .send_mail("news@example.com", &["a@x.org"], b"first\r\n")
            .await
    ));
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    assert_eq!(c.cmd("MAIL FROM:<news@example.com>").await, "250 2.1.0 OK");
    assert_eq!(c.cmd("RCPT TO:<a@x.org>").await, "250 2.1.5 OK");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send_raw(b"Subject: half\r\n\r\npartial body").await;
    drop(c);
    // The pooled connection carried the half message: it is closed, and the upstream discards it.
    provider.until(|s| s.authed_now == 0).await;
    assert!(all_ok(
        &first
            .send_mail("news@example.com", &["a@x.org"], b"whole\r\n")
            .await
    ));
    let s = provider.state();
    assert_eq!(s.messages.len(), 2, "the half message never completed");
    assert_eq!(s.messages[1].body, b"whole\r\n");
    assert_eq!(s.auth_ok, 2, "a new connection for the next message");
}

#[tokio::test]
async fn pipelined_commands_go_upstream_in_one_write_with_each_reply_kept() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    let replies = c
        .send_mail_pipelined(
            "news@example.com",
            &["a@x.org", "reject-me@x.org", "b@x.org"],
            b"piped\r\n",
        )
        .await;
    assert_eq!(replies[0], "250 2.1.0 OK");
    assert_eq!(replies[1], "250 2.1.5 OK");
    assert!(replies[2].starts_with("550 5.1.1"), "{replies:?}");
    assert_eq!(replies[3], "250 2.1.5 OK");
    assert!(replies[4].starts_with("354"), "{replies:?}");
    assert!(replies[5].starts_with("250 2.0.0"), "{replies:?}");
    {
        let s = provider.state();
        assert_eq!(s.messages[0].rcpts, ["a@x.org", "b@x.org"]);
        assert!(
            s.pipelined >= 4,
            "RCPTs and DATA sent ahead: {}",
            s.pipelined
        );
    }
    // No recipient accepted: the mailer's DATA gets its 554, and no message goes upstream.
    let replies = c
        .send_mail_pipelined("news@example.com", &["reject-a@x.org"], b"none\r\n")
        .await;
    assert!(replies[1].starts_with("550"), "{replies:?}");
    assert!(replies[2].starts_with("554 5.5.1"), "{replies:?}");
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 OK");
    assert!(all_ok(
        &c.send_mail("news@example.com", &["c@x.org"], b"after\r\n")
            .await
    ));
    let s = provider.state();
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.messages[1].body, b"after\r\n");
}

#[tokio::test]
async fn a_repeated_login_is_served_from_the_cache_and_a_wrong_one_still_refused() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    for _ in 0..3 {
        let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    }
    assert_eq!(
        relay.probe.login_cache_hits(),
        2,
        "one argon2 run, then two logins from the cache"
    );
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert_eq!(
        c.login_plain(LOGIN, "wrong-password").await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert_eq!(relay.probe.login_cache_hits(), 2);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_once_per_lifetime() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    provider.state().lifetime = 5;
    let clock = ManualTime::start();
    // 50 sessions over 12 s, one message each; tokens live 5 s, the margin is 300 s.
    for i in 0..50u64 {
        clock.advance(Duration::from_millis(240)).await;
        let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
        let replies = c
            .send_mail("news@example.com", &["a@x.org"], b"short\r\n")
            .await;
        assert!(all_ok(&replies), "session {i}: {replies:?}");
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    }
    let s = provider.state();
    assert_eq!(s.messages.len(), 50);
    assert!(
        s.refresh_count <= 4,
        "{} refreshes for 12 s of 5 s tokens",
        s.refresh_count
    );
    assert_eq!(s.auth_rejected, 0, "no upstream AUTH failure");
}

//! Queue mode: what a bulk sender sees (a `250 ... queued as ID` at once) and what the provider
//! gets (every message, byte for byte, at the pace it accepts), with retries, pauses and bounces.

mod common;

use std::time::Duration;

use common::*;
use xoauth_relay::control::wire::Request;

/// Options for a relay whose `news` account queues, with `account` and `delivery` keys added.
fn queued(account: &str, delivery: &str) -> RelayOptions {
    RelayOptions {
        extra_accounts_toml: format!("delivery = \"queue\"\n{account}\n\n[delivery]\n{delivery}\n"),
        ..RelayOptions::default()
    }
}

/// Message `n`; message 2 is larger than what the spool keeps in memory (it gets a file of its own).
fn body(n: usize) -> Vec<u8> {
    let filler = if n == 2 {
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789\r\n"
            .repeat(4000)
    } else {
        String::new()
    };
    format!(
        "Subject: issue {n}\r\nFrom: alice@example.com\r\n\r\nHello {n}\r\n{filler}.leading dot\r\nlast line without end"
    )
    .into_bytes()
}

#[tokio::test]
async fn queued_while_the_upstream_is_down_and_delivered_byte_identical_after_a_restart() {
    let time = ManualTime::start();
    let (dir, provider, relay) = setup(queued("", ""), "starttls").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(queue_one(&mut c, &["bob@example.org"], &body(n)).await);
    }
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    // The first attempt finds the upstream down and holds the account's mail.
    until_paused(&relay).await;
    let listed = queue_json(&relay).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0]["id"], ids[0]);
    assert_eq!(listed[0]["recipients"][0]["state"], "pending");
    let config_path = relay.config_path.clone();
    relay.stop().await;

    // A new process on the same spool; the upstream is back.
    provider.state().down = false;
    let relay = Relay::start_from(dir.path(), config_path).await;
    time.advance(Duration::from_secs(1)).await;
    provider.until(|s| s.messages.len() == 3).await;
    let mut got: Vec<Vec<u8>> = provider
        .state()
        .messages
        .iter()
        .map(|m| m.body.clone())
        .collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..3).map(body).collect();
    want.sort();
    // The fake provider completes an unfinished last line, as every SMTP transfer does.
    for w in &mut want {
        w.extend_from_slice(b"\r\n");
    }
    assert_eq!(got, want);
    assert!(provider
        .state()
        .messages
        .iter()
        .all(|m| m.rcpts == ["bob@example.org"]));
    wait_for_empty_queue(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn each_recipient_has_its_own_fate_and_only_the_failed_one_is_bounced() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = setup(queued("", "retry_min_secs = 60"), "starttls").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let id = queue_one(
        &mut c,
        &[
            "reject-me@example.org",
            "once-busy@example.org",
            "ok@example.org",
        ],
        &body(1),
    )
    .await;
    // First attempt: ok delivered, reject bounced (the bounce goes to the sender), once deferred.
    provider.until(|s| s.messages.len() == 2).await;
    let listed = queue_json(&relay).await;
    let m = listed.iter().find(|m| m["id"] == id).unwrap();
    let states: Vec<&str> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["bounced", "pending", "delivered"]);
    assert_eq!(m["attempts"], 1);
    time.advance(Duration::from_secs(61)).await;
    provider.until(|s| s.messages.len() == 3).await;
    wait_for_empty_queue(&relay).await;

    {
        let s = provider.state();
        let copies = |addr: &str| {
            s.messages
                .iter()
                .filter(|m| m.rcpts.iter().any(|r| r == addr))
                .count()
        };
        assert_eq!(copies("ok@example.org"), 1);
        assert_eq!(copies("once-busy@example.org"), 1);
        assert_eq!(copies("reject-me@example.org"), 0);
        let bounces: Vec<_> = s
            .messages
            .iter()
            .filter(|m| m.rcpts == ["alice@example.com"])
            .collect();
        assert_eq!(bounces.len(), 1);
        assert!(
            bounces[0].mail_from.starts_with("<news@example.com>"),
            "{}",
            bounces[0].mail_from
        );
        use mail_parser::MimeHeaders;
        let parsed = mail_parser::MessageParser::default()
            .parse(&bounces[0].body)
            .unwrap();
        let ct = parsed.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        let text = String::from_utf8_lossy(&bounces[0].body);
        assert!(
            text.contains("Final-Recipient: rfc822; reject-me@example.org"),
            "{text}"
        );
        assert!(text.contains("Status: 5.1.1"), "{text}");
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{text}");
        assert!(!text.contains("Final-Recipient: rfc822; ok@"), "{text}");
        assert!(
            !text.contains("Final-Recipient: rfc822; once-busy@"),
            "{text}"
        );
        assert!(
            text.contains("Subject: issue 1"),
            "the original headers: {text}"
        );
        assert!(text.contains("Auto-Submitted: auto-replied"), "{text}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_quota_reply_pauses_the_account_without_a_bounce_and_it_resumes_after_the_window() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = setup(queued("", "quota_pause_secs = 600"), "starttls").await;
    provider.state().mail_reply = Some("550 5.4.5 Daily user sending limit exceeded.".into());
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(&mut c, &["bob@example.org"], &body(1)).await;
    // The quota reply reaches the relay; the account is paused, nothing bounced, nothing attempted.
    let table = until_paused(&relay).await;
    assert!(table.contains("1 (oldest"), "{table}");
    assert!(table.contains("5.4.5"), "{table}");
    let listed = queue_json(&relay).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["attempts"], 0, "{listed:?}");
    assert!(provider.state().messages.is_empty());

    provider.state().mail_reply = None;
    time.advance(Duration::from_secs(590)).await;
    assert!(
        until_paused(&relay).await.contains("until 10s"),
        "still paused"
    );
    time.advance(Duration::from_secs(11)).await;
    provider.until(|s| s.messages.len() == 1).await;
    assert!(provider
        .state()
        .messages
        .iter()
        .all(|m| m.rcpts != ["alice@example.com"]));
    relay.stop().await;
}

#[tokio::test]
async fn throttling_at_rcpt_pauses_the_account_and_is_not_the_message_s_attempt() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = setup(queued("", ""), "starttls").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(
        &mut c,
        &["ok@example.org", "throttle@example.org"],
        &body(1),
    )
    .await;
    let table = until_paused(&relay).await;
    assert!(table.contains("4.7.500"), "{table}");
    let listed = queue_json(&relay).await;
    assert_eq!(listed[0]["attempts"], 0, "{listed:?}");
    assert!(listed[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "pending"));
    assert!(
        provider.state().messages.is_empty(),
        "the transaction was dropped"
    );
    time.advance(Duration::from_secs(61)).await;
    provider.until(|s| s.messages.len() == 1).await;
    assert_eq!(
        provider.state().messages[0].rcpts,
        ["ok@example.org", "throttle@example.org"]
    );
    relay.stop().await;
}

#[tokio::test]
async fn pacing_spreads_a_backlog_and_recipients_are_split_at_the_cap() {
    let time = ManualTime::start();
    // 60 a minute: a burst of 3, then 57 a minute (so that no minute holds more than 60).
    let (_dir, provider, relay) = setup(
        queued(
            "max_messages_per_minute = 60\nmax_recipients_per_message = 2",
            "",
        ),
        "starttls",
    )
    .await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(
        &mut c,
        &[
            "a@example.org",
            "b@example.org",
            "c@example.org",
            "d@example.org",
            "e@example.org",
        ],
        &body(0),
    )
    .await;
    for n in 1..4 {
        queue_one(&mut c, &["x@example.org"], &body(n)).await;
    }
    provider.until(|s| s.messages.len() == 3).await;
    for k in 3..6 {
        time.advance(Duration::from_millis(1053)).await;
        provider.until(|s| s.messages.len() > k).await;
        assert_eq!(provider.state().messages.len(), k + 1, "one per 60/57 s");
    }
    // The five recipients went in transactions of at most two, each one a message to pacing.
    let split: Vec<Vec<String>> = provider
        .state()
        .messages
        .iter()
        .map(|m| m.rcpts.clone())
        .filter(|r| r[0] != "x@example.org")
        .collect();
    assert_eq!(
        split,
        [
            vec!["a@example.org".to_string(), "b@example.org".into()],
            vec!["c@example.org".to_string(), "d@example.org".into()],
            vec!["e@example.org".to_string()],
        ]
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_message_still_pending_at_the_maximum_age_is_bounced() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = setup(
        queued("", "retry_min_secs = 60\nmax_queue_age_secs = 150"),
        "starttls",
    )
    .await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(&mut c, &["later@example.org"], &body(1)).await;
    until_queue(&relay, |q| q[0]["attempts"] == 1).await;
    time.advance(Duration::from_secs(61)).await;
    // The second retry would come after the maximum age.
    until_queue(&relay, |q| q[0]["attempts"] == 2).await;
    time.advance(Duration::from_secs(90)).await;
    provider.until(|s| s.messages.len() == 1).await;
    let bounce = provider.state().messages[0].clone();
    assert_eq!(bounce.rcpts, ["alice@example.com"]);
    let text = String::from_utf8_lossy(&bounce.body);
    assert!(
        text.contains("Final-Recipient: rfc822; later@example.org"),
        "{text}"
    );
    assert!(text.contains("Status: 4.4.7"), "{text}");
    assert!(text.contains("450 4.2.1"), "the last reply: {text}");
    wait_for_empty_queue(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_token_endpoint_down_at_submission_queues_and_delivers_when_it_returns() {
    let time = ManualTime::start();
    let (_dir, provider, relay) = setup(queued("", "retry_min_secs = 60"), "starttls").await;
    provider.state().token_outage = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    queue_one(&mut c, &["bob@example.org"], &body(1)).await;
    let table = until_paused(&relay).await;
    assert!(table.contains("token"), "held for the token: {table}");
    provider.state().token_outage = false;
    time.advance(Duration::from_secs(61)).await;
    provider.until(|s| s.messages.len() == 1).await;
    assert_eq!(provider.state().messages[0].rcpts, ["bob@example.org"]);
    relay.stop().await;
}

#[tokio::test]
async fn a_revoked_grant_is_refused_at_auth_in_queue_mode_too() {
    let (_dir, provider, relay) = setup(queued("", ""), "starttls").await;
    provider.state().refresh_tokens.clear();
    let mut c = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    let reply = c.login_plain(LOGIN, PASSWORD).await;
    assert!(reply.starts_with("454 4.7.0"), "{reply}");
    assert!(reply.contains("invalid_grant"), "{reply}");
    relay.stop().await;
}

#[tokio::test]
async fn queue_retry_and_delete_work_while_serving() {
    let _time = ManualTime::start();
    let (_dir, provider, relay) = setup(queued("", ""), "starttls").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let first = queue_one(&mut c, &["bob@example.org"], &body(1)).await;
    let second = queue_one(&mut c, &["carol@example.org"], &body(2)).await;
    until_paused(&relay).await;

    let shown = admin(&relay, Request::QueueShow { id: first.clone() }).await;
    assert!(shown.ok, "{}", shown.text);
    assert!(
        shown.text.contains("bob@example.org pending"),
        "{}",
        shown.text
    );
    assert!(shown.text.contains("Subject: issue 1"), "{}", shown.text);
    assert!(
        !shown.text.contains("Hello 1"),
        "never the body: {}",
        shown.text
    );

    // The worker that tried it may still be writing its attempt down (the pause is in force
    // first): the operator is told to try again in a moment, and does.
    let deleted = loop {
        let r = admin(&relay, Request::QueueDelete { id: first.clone() }).await;
        if !r.text.contains("is being delivered right now") {
            break r;
        }
        tokio::task::yield_now().await;
    };
    assert!(deleted.ok, "{}", deleted.text);
    let listed = queue_json(&relay).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], second);
    let missing = admin(&relay, Request::QueueDelete { id: first }).await;
    assert!(
        !missing.ok && missing.text.contains("no queued message"),
        "{}",
        missing.text
    );

    // Back up: `queue retry --all` sends now instead of after the backoff.
    provider.state().down = false;
    let retried = retry_all(&relay).await;
    assert!(
        retried.ok && retried.text.starts_with("1 message"),
        "{}",
        retried.text
    );
    provider.until(|s| s.messages.len() == 1).await;
    assert_eq!(provider.state().messages[0].rcpts, ["carol@example.org"]);
    wait_for_empty_queue(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn direct_mode_refuses_recipients_beyond_the_cap_and_waits_for_the_pace() {
    let _time = ManualTime::start();
    let (_dir, provider, relay) = setup(
        RelayOptions {
            extra_accounts_toml: "max_recipients_per_message = 2\nmax_messages_per_minute = 20"
                .into(),
            extra_limits_toml: "upstream_wait_secs = 1".into(),
            ..RelayOptions::default()
        },
        "starttls",
    )
    .await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let replies = c
        .send_mail(
            "alice@example.com",
            &["a@example.org", "b@example.org", "c@example.org"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    assert!(replies[3].starts_with("452 4.5.3"), "{replies:?}");
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    assert_eq!(provider.state().messages[0].rcpts.len(), 2);
    // 20 a minute is one per 3 s with a burst of one: the next waits longer than upstream_wait_secs.
    let reply = c.cmd("MAIL FROM:<alice@example.com>").await;
    assert!(
        reply.starts_with("451 4.7.0 account `news`: max_messages_per_minute (20)"),
        "{reply}"
    );
    relay.stop().await;
}

/// Kills the relay process with SIGKILL at a random point of a burst, restarts it on the same
/// spool, and again, several times, while it queues and delivers: every message that got its
/// `250` arrives, and a second copy only of one whose first copy the upstream took just before a
/// kill (the documented window between the upstream's `250` and its recording).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_relay_is_killed_again_and_again() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    let path = write_config(dir.path(), &provider, &queued("", ""), &password_hash());
    let bin = env!("CARGO_BIN_EXE_xoauth-relay");
    let rt = provider.state().add_refresh_token();
    let mut import = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&path)
        .args(["import-token", "news"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = import.stdin.take().unwrap();
        stdin.write_all(rt.as_bytes()).await.unwrap();
    }
    assert!(import.wait().await.unwrap().success());

    let serve = |path: std::path::PathBuf| async move {
        let (child, addr) = serve_process(&path, "starttls").await;
        (child, addr.port())
    };

    let acked = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let mut kills = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..5 {
        let (mut child, port) = serve(path.clone()).await;
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Killed after 5 to 44 more receipts, while earlier ones are being delivered.
        let target = acked.lock().unwrap().len() + 5 + (seed % 40) as usize;
        let enough = Arc::new(tokio::sync::Notify::new());
        let mut senders = Vec::new();
        for s in 0..4 {
            let pki = provider.pki.clone();
            let acked = acked.clone();
            let enough = enough.clone();
            senders.push(tokio::spawn(async move {
                let mut c = Client::connect_addr(addr, Conn::StartTls, &pki).await;
                assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
                for n in 0..1000 {
                    let body =
                        format!("Subject: burst {round}-{s}-{n}\r\n\r\nbody {round}-{s}-{n}\r\n")
                            .into_bytes();
                    let Some(replies) = c
                        .try_send_mail("alice@example.com", &["bob@example.org"], &body)
                        .await
                    else {
                        return;
                    };
                    if replies
                        .last()
                        .is_some_and(|r| r.starts_with("250 2.0.0 Ok: queued"))
                    {
                        let mut acked = acked.lock().unwrap();
                        acked.push(body);
                        if acked.len() == target {
                            enough.notify_one();
                        }
                    }
                }
            }));
        }
        // Every sender ending before the target would leave the test waiting: say why instead.
        let mut senders_done = futures_util::future::join_all(senders);
        let senders = tokio::select! {
            _ = enough.notified() => senders_done,
            results = &mut senders_done => {
                let results: Vec<_> = results.into_iter().map(|r| r.map_err(|e| e.to_string())).collect();
                panic!("round {round}: the senders stopped at {} of {target} receipts: {results:?}", acked.lock().unwrap().len());
            }
            // A relay that stops answering would otherwise hang the suite without a word.
            _ = tokio::time::sleep(Duration::from_secs(120)) => {
                panic!("round {round}: no progress, {} of {target} receipts after 120 s", acked.lock().unwrap().len());
            }
        };
        child.start_kill().unwrap();
        kills.push(std::time::Instant::now());
        child.wait().await.unwrap();
        for s in senders.await {
            s.unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    let (_child, _) = serve(path.clone()).await;
    let all_delivered = provider.until(|s| {
        acked
            .iter()
            .all(|b| s.messages.iter().any(|m| m.body == *b))
    });
    if tokio::time::timeout(Duration::from_secs(60), all_delivered)
        .await
        .is_err()
    {
        let s = provider.state();
        let missing: Vec<String> = acked
            .iter()
            .filter(|b| !s.messages.iter().any(|m| m.body == **b))
            .map(|b| {
                String::from_utf8_lossy(b)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        panic!("acknowledged but not delivered after 60 s: {missing:?}");
    }
    // A second copy only of a message whose first copy was taken just before a kill: between
    // the upstream's 250 and the durable done record. That gap is one group commit, but on a
    // loaded machine (the whole suite on two cores) an fsync has been seen to take seconds.
    let window = Duration::from_secs(10);
    let s = provider.state();
    for b in &acked {
        let copies: Vec<std::time::Instant> = s
            .messages
            .iter()
            .filter(|m| m.body == *b)
            .filter_map(|m| m.at)
            .collect();
        if copies.len() > 1 {
            let first = copies[0];
            // On either side of the kill: bytes the relay wrote just before it may be read by
            // the fake upstream just after the kill was recorded.
            let near = |k: &std::time::Instant| {
                let gap = if *k >= first { *k - first } else { first - *k };
                gap < window
            };
            assert!(
                kills.iter().any(near),
                "{} copies of {}, the first not just before a kill",
                copies.len(),
                String::from_utf8_lossy(b)
            );
        }
    }
}

#[tokio::test]
async fn a_reload_that_raises_the_connection_cap_gives_the_queue_more_workers() {
    let one = queued("max_upstream_connections = 1", "");
    let (_dir, provider, relay) = setup(one, "starttls").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    for n in 0..8 {
        queue_one(&mut c, &["bob@example.org"], &body(n + 10)).await;
    }
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    until_paused(&relay).await;

    let four = queued("max_upstream_connections = 4", "");
    let path = write_config(&relay.dir, &provider, &four, &password_hash());
    assert_eq!(path, relay.config_path);
    let socket = relay.dir.join("data/control.sock");
    let reloaded = xoauth_relay::control::client::call(&socket, &Request::Reload { config: None })
        .await
        .unwrap()
        .expect("the relay answers");
    assert!(reloaded.ok, "{}", reloaded.text);

    // Each end of data is held: a second message can only go over a second connection.
    {
        let mut s = provider.state();
        s.down = false;
        s.hold_data = true;
    }
    let retried = retry_all(&relay).await;
    assert!(retried.ok, "{}", retried.text);
    let four_at_once = provider.until(|s| s.authed_now == 4);
    tokio::time::timeout(Duration::from_secs(20), four_at_once)
        .await
        .expect("four workers, one upstream connection each, after the reload");
    {
        let mut s = provider.state();
        s.hold_data = false;
        s.changed.notify_waiters();
    }
    provider.until(|s| s.messages.len() == 8).await;
    assert_eq!(provider.state().authed_peak, 4, "the cap still holds");
    wait_for_empty_queue(&relay).await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// What a 250 promises when the disk misbehaves, a record is damaged, or the config moves on.

use std::sync::Arc;
use xoauth_relay::delivery::queue::disk::{Faulty, Op};

/// A fake provider and a queue-mode relay whose spool is on a disk that fails on request, with a
/// grant for `news`.
async fn on_faulty_disk(delivery: &str) -> (tempfile::TempDir, FakeProvider, Arc<Faulty>, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    let disk = Arc::new(Faulty::default());
    let path = write_config(
        dir.path(),
        &provider,
        &queued("", delivery),
        &password_hash(),
    );
    let relay = Relay::start_from_on(dir.path(), path, disk.clone()).await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    (dir, provider, disk, relay)
}

#[tokio::test]
async fn a_done_record_that_cannot_be_written_is_retried_and_the_message_never_comes_back() {
    let _time = ManualTime::start();
    let (dir, provider, disk, relay) = on_faulty_disk("").await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    // The log's sync for the message itself succeeds (its `250 queued`); the next three, the
    // done record after delivery, fail.
    disk.fail(Op::Sync, "seg/", 1, 3);
    queue_one(&mut c, &["bob@example.org"], &body(1)).await;
    provider.until(|s| s.messages.len() == 1).await;
    // Tried until it took (after 0.2 + 0.4 + 0.8 s).
    while disk.failed(Op::Sync) < 3 || !queue_json(&relay).await.is_empty() {
        tokio::task::yield_now().await;
    }
    let synced = disk.done(Op::Sync);
    while disk.done(Op::Sync) == synced {
        tokio::task::yield_now().await;
    }
    let path = relay.config_path.clone();
    relay.stop().await;
    let relay = Relay::start_from(dir.path(), path).await;
    assert!(
        queue_json(&relay).await.is_empty(),
        "recorded as done, not delivered again"
    );
    assert_eq!(provider.state().messages.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_bounce_that_cannot_be_queued_keeps_the_original_until_it_can() {
    let time = ManualTime::start();
    let (_dir, provider, disk, relay) = on_faulty_disk("retry_min_secs = 60").await;
    // Held by throttling (not an attempt: the message stays in the log, and nothing of its own
    // is still being written when the fault is armed).
    provider.state().mail_reply = Some("451 4.7.500 Server busy. Please try again later".into());
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let id = queue_one(&mut c, &["reject-me@example.org"], &body(1)).await;
    until_paused(&relay).await;
    // The next append to the log is the bounce: it fails.
    disk.fail(Op::Write, "seg/", 0, 1);
    provider.state().mail_reply = None;
    assert!(retry_all(&relay).await.ok);
    // Until its bounce is scheduled again (the clock only moves when the test moves it).
    until_queue(&relay, |q| {
        q.len() == 1
            && q[0]["recipients"][0]["state"] == "bounced"
            && disk.failed(Op::Write) == 1
            && q[0]["next_attempt_secs"].as_u64().is_some_and(|s| s > 0)
    })
    .await;
    let listed = queue_json(&relay).await;
    assert_eq!(
        listed[0]["id"],
        id.as_str(),
        "the original stays: {listed:?}"
    );
    assert!(provider.state().messages.is_empty(), "no bounce went out");
    // Its bounce is tried again after the backoff, and the original then goes.
    time.advance(Duration::from_secs(61)).await;
    provider.until(|s| s.messages.len() == 1).await;
    wait_for_empty_queue(&relay).await;
    let bounce = provider.state().messages[0].clone();
    assert_eq!(bounce.rcpts, ["alice@example.com"]);
    assert!(String::from_utf8_lossy(&bounce.body).contains("reject-me@example.org"));
    relay.stop().await;
}

#[tokio::test]
async fn a_large_message_that_cannot_be_placed_is_refused_and_never_delivered_later() {
    let _time = ManualTime::start();
    let (dir, provider, disk, relay) = on_faulty_disk("").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    // Renamed into msg/, but the directory sync fails; then the rename itself fails.
    for op in [Op::SyncDir, Op::Rename] {
        disk.fail(op, "msg/", 0, 1);
        let replies = c
            .send_mail("alice@example.com", &["bob@example.org"], &body(2))
            .await;
        assert!(
            replies.last().unwrap().starts_with("451 4.3.0"),
            "{op:?}: {replies:?}"
        );
        let left = std::fs::read_dir(dir.path().join("data/queue/msg"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "{op:?}: nothing left behind in msg/");
        assert!(queue_json(&relay).await.is_empty());
    }
    let path = relay.config_path.clone();
    relay.stop().await;
    provider.state().down = false;
    let relay = Relay::start_from(dir.path(), path).await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    // The mailer sends it again; that one copy is all the upstream gets.
    queue_one(&mut c, &["bob@example.org"], &body(2)).await;
    provider.until(|s| s.messages.len() == 1).await;
    wait_for_empty_queue(&relay).await;
    assert_eq!(provider.state().messages.len(), 1);
    relay.stop().await;
}

/// The octets of the oldest spool log segment.
fn oldest_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let seg = dir.join("data/queue/seg");
    let mut all: Vec<_> = std::fs::read_dir(&seg)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    all.into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 16)
        .expect("a segment with records")
}

#[tokio::test]
async fn a_damaged_byte_costs_at_most_its_own_record_and_is_reported() {
    let _time = ManualTime::start();
    // Offsets into the segment, spread over its records (a fixed seed: the same run every time).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..6 {
        let (dir, provider, relay) = setup(queued("", ""), "starttls").await;
        provider.state().down = true;
        let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
        let mut bodies = Vec::new();
        for n in 0..5 {
            let b =
                format!("Subject: record {n}\r\n\r\nbody {n} of round {round}\r\n").into_bytes();
            queue_one(&mut c, &["bob@example.org"], &b).await;
            bodies.push(b);
        }
        let path = relay.config_path.clone();
        relay.stop().await;
        let segment = oldest_segment(dir.path());
        let mut bytes = std::fs::read(&segment).unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = 16 + (seed as usize) % (bytes.len() - 16);
        bytes[at] ^= 0x20;
        std::fs::write(&segment, &bytes).unwrap();

        provider.state().down = false;
        let relay = Relay::start_from(dir.path(), path).await;
        provider.until(|s| s.messages.len() >= 4).await;
        let listed = until_settled(&relay).await;
        let delivered: Vec<Vec<u8>> = provider
            .state()
            .messages
            .iter()
            .map(|m| m.body.clone())
            .collect();
        // All but the damaged record's message (none, when the damage hit a record whose
        // message had moved out of the log after a failed attempt), each once.
        assert!(
            delivered.len() >= 4,
            "offset {at}: all but at most one: {}",
            delivered.len()
        );
        for b in &delivered {
            assert_eq!(
                delivered.iter().filter(|d| *d == b).count(),
                1,
                "offset {at}: once"
            );
            assert!(bodies.contains(b), "offset {at}");
        }
        // What could not be read is kept aside and reported.
        let corrupt = dir.path().join("data/queue/corrupt");
        assert_eq!(
            std::fs::read_dir(&corrupt).unwrap().count(),
            1,
            "offset {at}"
        );
        let text = queue_table(&relay).await;
        assert!(
            text.contains("quarantined: 1 file(s)"),
            "offset {at}: {text}"
        );
        // A damaged body whose envelope survived is listed, held, and says what is lost.
        if let Some(m) = listed.first() {
            assert!(
                m["held"].as_str().unwrap().contains("damaged"),
                "offset {at}: {m}"
            );
            let id = m["id"].as_str().unwrap().to_string();
            let shown = admin(&relay, Request::QueueShow { id }).await;
            assert!(
                shown
                    .text
                    .contains("held: its body in the spool was found damaged"),
                "{}",
                shown.text
            );
        }
        relay.stop().await;
    }
}

/// The queue listing once the delivered messages are recorded (what is left is held).
async fn until_settled(relay: &Relay) -> Vec<serde_json::Value> {
    loop {
        let q = queue_json(relay).await;
        if q.iter().all(|m| !m["held"].is_null()) {
            return q;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_spool_written_by_the_first_release_still_loads_and_delivers() {
    let _time = ManualTime::start();
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    // The first release's spool: a logged message (no segment header, records `len | crc | kind |
    // envelope line \n body`), and one in a file of its own with its progress.
    let queue = dir.path().join("data/queue");
    for sub in ["seg", "msg", "tmp"] {
        std::fs::create_dir_all(queue.join(sub)).unwrap();
    }
    let envelope = |id: &str, to: &str| {
        format!(
            r#"{{"id":"{id}","account":"news","sender":"alice@example.com","recipients":["{to}"],"received":{},"eight_bit":false,"smtputf8":false,"bounce":false}}"#,
            xoauth_relay::util::clock::now_unix()
        )
    };
    let mut payload = vec![1u8];
    payload.extend_from_slice(envelope("00061A2B3C4D5E00010001", "logged@example.org").as_bytes());
    payload.extend_from_slice(b"\nSubject: old log\r\n\r\nfrom the log\r\n");
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32fast_hash(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    std::fs::write(queue.join("seg/0000000000"), &record).unwrap();
    let id = "00061A2B3C4D5E00020002";
    std::fs::write(
        queue.join("msg").join(id),
        format!(
            "{}\nSubject: old file\r\n\r\nfrom a file\r\n",
            envelope(id, "filed@example.org")
        ),
    )
    .unwrap();
    std::fs::write(
        queue.join("msg").join(format!("{id}.state")),
        r#"{"attempts":1,"next_attempt":0,"last_reply":"451 4.4.1 down","recipients":[{"status":"pending","last_reply":"451 4.4.1 down"}]}"#,
    )
    .unwrap();
    let relay = start_with_grant(dir.path(), &provider, queued("", "")).await;
    assert!(retry_all(&relay).await.ok);
    provider.until(|s| s.messages.len() == 2).await;
    wait_for_empty_queue(&relay).await;
    let mut got: Vec<(Vec<String>, String)> = provider
        .state()
        .messages
        .iter()
        .map(|m| {
            (
                m.rcpts.clone(),
                String::from_utf8_lossy(&m.body).into_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                vec!["filed@example.org".to_string()],
                "Subject: old file\r\n\r\nfrom a file\r\n".to_string()
            ),
            (
                vec!["logged@example.org".to_string()],
                "Subject: old log\r\n\r\nfrom the log\r\n".to_string()
            ),
        ]
    );
    relay.stop().await;
}

/// CRC-32 (IEEE), as the spool log uses it; written out so the test does not lean on the crate.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `news` queues; `shop` (login `newsletter-shop`) queues through its own provider table `fake2`,
/// which `with_provider` keeps in the file.
fn with_shop(
    dir: &std::path::Path,
    provider: &FakeProvider,
    shop: bool,
    fake2: bool,
) -> RelayOptions {
    let mut extra = String::from("delivery = \"queue\"\n");
    if shop {
        extra.push_str(&format!(
            "\n[[accounts]]\nname = \"shop\"\nlogin = \"newsletter-shop\"\npassword_hash = \"{}\"\n\
             provider = \"fake2\"\nmailbox = \"news@example.com\"\ndelivery = \"queue\"\n",
            password_hash()
        ));
    }
    if fake2 {
        extra.push_str(&fake2_table(provider, dir));
    }
    RelayOptions {
        extra_accounts_toml: extra,
        ..RelayOptions::default()
    }
}

/// Queues one message as `shop` while the upstream is down, then stops the relay.
async fn queue_as_shop(dir: &std::path::Path, provider: &FakeProvider) -> String {
    provider.state().down = true;
    let relay = start_with_grant(dir, provider, with_shop(dir, provider, true, true)).await;
    let rt = provider.state().add_refresh_token();
    relay.import("shop", &rt).await;
    let mut c = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    assert!(c
        .login_plain("newsletter-shop", PASSWORD)
        .await
        .starts_with("235"));
    let id = queue_one(&mut c, &["bob@example.org"], &body(7)).await;
    relay.stop().await;
    id
}

#[tokio::test]
async fn mail_of_an_account_removed_from_the_config_is_still_delivered_or_held_in_view() {
    let _time = ManualTime::start();
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    // The account is gone, its provider is not: delivered through it, with the stored grant.
    queue_as_shop(dir.path(), &provider).await;
    provider.state().down = false;
    let path = write_config(
        dir.path(),
        &provider,
        &with_shop(dir.path(), &provider, false, true),
        &password_hash(),
    );
    let relay = Relay::start_from(dir.path(), path).await;
    assert!(retry_all(&relay).await.ok);
    provider.until(|s| s.messages.len() == 1).await;
    wait_for_empty_queue(&relay).await;
    let mut c = Client::connect(&relay, Conn::StartTls, &provider.pki).await;
    assert!(
        c.login_plain("newsletter-shop", PASSWORD)
            .await
            .starts_with("535"),
        "nobody logs in as a removed account"
    );
    relay.stop().await;

    // Its provider is gone too: held, listed with the reason, until deleted.
    let id = queue_as_shop(dir.path(), &provider).await;
    provider.state().down = false;
    let path = write_config(
        dir.path(),
        &provider,
        &with_shop(dir.path(), &provider, false, false),
        &password_hash(),
    );
    let relay = Relay::start_from(dir.path(), path).await;
    let listed = queue_json(&relay).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let held = listed[0]["held"].as_str().unwrap();
    assert!(
        held.contains("account `shop` and its provider `fake2` are no longer configured"),
        "{held}"
    );
    let deleted = admin(&relay, Request::QueueDelete { id: id.clone() }).await;
    assert!(deleted.ok, "{}", deleted.text);
    assert!(queue_json(&relay).await.is_empty());
    let path = relay.config_path.clone();
    relay.stop().await;
    let relay = Relay::start_from(dir.path(), path).await;
    assert!(queue_json(&relay).await.is_empty(), "deleted for good");
    assert_eq!(provider.state().messages.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn one_recipient_that_is_always_throttled_does_not_hold_the_others() {
    let time = ManualTime::start();
    // One connection, so that the messages go one after the other.
    let one = queued("max_upstream_connections = 1", "retry_min_secs = 300");
    let (_dir, provider, relay) = setup(one, "starttls").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let stuck = queue_one(&mut c, &["stuck@example.org"], &body(1)).await;
    queue_one(&mut c, &["b@example.org"], &body(3)).await;
    queue_one(&mut c, &["c@example.org"], &body(4)).await;
    until_paused(&relay).await;
    provider.state().down = false;
    assert!(retry_all(&relay).await.ok);
    // The oldest draws the throttling: the account pauses, and that message goes behind. (The
    // retry's record of it may let another go first.)
    until_queue(&relay, |q| {
        q.iter().any(|m| {
            m["id"] == stuck.as_str()
                && m["last_reply"]
                    .as_str()
                    .is_some_and(|r| r.contains("4.7.500"))
        })
    })
    .await;
    time.advance(Duration::from_secs(61)).await;
    provider.until(|s| s.messages.len() == 2).await;
    // Throttled again: that is the recipient's trouble now, deferred with backoff, no pause (its
    // second attempt: the first found the upstream down).
    time.advance(Duration::from_secs(2)).await;
    until_queue(&relay, |q| q.len() == 1 && q[0]["attempts"] == 2).await;
    let listed = queue_json(&relay).await;
    assert_eq!(listed[0]["id"], stuck.as_str());
    assert!(
        !accounts_table(&relay).await.contains("paused"),
        "the account is not paused for it"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_new_mail_at_mail_with_452() {
    let (_dir, provider, relay) = setup(
        queued("", "min_free_bytes = 4611686018427387904"),
        "starttls",
    )
    .await;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.com>").await,
        "452 4.3.1 Insufficient system storage; try again later"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_failed_connect_is_an_attempt_and_the_offline_queue_shows_what_the_relay_did() {
    let (_dir, provider, relay) = setup(queued("", ""), "starttls").await;
    provider.state().down = true;
    let mut c = logged_in(&relay, &provider, Conn::StartTls).await;
    let id = queue_one(&mut c, &["bob@example.org"], &body(1)).await;
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    until_paused(&relay).await;
    let running = queue_json(&relay).await;
    assert_eq!(running[0]["attempts"], 1, "{running:?}");
    let last_reply = running[0]["last_reply"].as_str().unwrap().to_string();
    assert!(last_reply.starts_with("451 4.4.1"), "{last_reply}");
    let config_path = relay.config_path.clone();
    relay.stop().await;

    // No relay: the queue as the relay left it, from the spool.
    let offline = |request| async {
        let config = xoauth_relay::config::Config::load(&config_path).unwrap();
        xoauth_relay::app::admin(config, request).await.unwrap()
    };
    let listed = offline(Request::Queue {
        account: None,
        json: true,
    })
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.text).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["attempts"], 1, "{listed:?}");
    assert_eq!(listed[0]["last_reply"], last_reply.as_str());
    assert!(
        listed[0]["next_attempt_secs"].as_u64().unwrap() > 0,
        "{listed:?}"
    );
    // A retry without a relay says when it takes effect.
    let retried = offline(Request::QueueRetry {
        id: None,
        account: None,
        all: true,
    })
    .await;
    assert!(retried.ok, "{}", retried.text);
    assert_eq!(
        retried.text,
        "1 message(s) due now; no relay is running, so they go out when `xoauth-relay serve` starts\n"
    );
    let listed = offline(Request::Queue {
        account: None,
        json: true,
    })
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.text).unwrap();
    assert_eq!(listed[0]["next_attempt_secs"], 0, "{listed:?}");
}

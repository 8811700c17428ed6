//! Several relays on one PostgreSQL database (`[store] backend = "postgres"`): one token request
//! for a crowd spread over them, a revoke on one refused on the others, instance names, the
//! database down and back, and a sled install moved over. Each test starts its own PostgreSQL
//! server ([`common::Postgres`]).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use xoauth_relay::control::wire::Request;

/// Options for relay `instance` in `root/instance`, on `pg`, with the key every relay shares.
fn shared_opts(root: &Path, pg: &Postgres, instance: &str) -> RelayOptions {
    std::fs::write(root.join("db-url"), pg.url()).unwrap();
    RelayOptions {
        extra_server_toml: format!("key_file = \"{}/shared.key\"", root.display()),
        extra_toml: format!(
            "[store]\nbackend = \"postgres\"\nurl_file = \"{}/db-url\"\ninstance = \"{instance}\"\nlease_secs = 10\n",
            root.display()
        ),
        ..RelayOptions::default()
    }
}

/// PostgreSQL, a directory for the relays and a fake provider; `None` where PostgreSQL is not
/// installed (the test is then skipped, saying so).
async fn setup() -> Option<(Postgres, tempfile::TempDir, FakeProvider)> {
    let pg = Postgres::start().await?;
    let root = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    Some((pg, root, provider))
}

/// Relays `names` on `pg`, each in its own directory, with options from `opts` changed by `tweak`.
async fn start_relays(
    (root, pg, provider): (&Path, &Postgres, &FakeProvider),
    names: &[&str],
    opts: fn(&Path, &Postgres, &str) -> RelayOptions,
    tweak: impl Fn(&mut RelayOptions),
) -> Vec<Relay> {
    let mut relays = Vec::new();
    for name in names {
        let mut o = opts(root, pg, name);
        tweak(&mut o);
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        relays.push(Relay::start(&dir, provider, o).await);
    }
    relays
}

async fn shared_relay(root: &Path, pg: &Postgres, provider: &FakeProvider, name: &str) -> Relay {
    let mut relays = start_relays((root, pg, provider), &[name], shared_opts, |_| {}).await;
    relays.remove(0)
}

/// One message through `relay` from a new session; the replies.
async fn send_one(relay: &Relay, pki: &Pki, n: usize) -> Vec<String> {
    let mut c = Client::connect(relay, Conn::Implicit, pki).await;
    let auth = c.login_plain(LOGIN, PASSWORD).await;
    if !auth.starts_with("235") {
        return vec![auth];
    }
    c.send_mail(
        "news@example.com",
        &["bob@example.org"],
        format!("Subject: {n}\r\n\r\nmessage {n}\r\n").as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_sessions_over_three_relays_cause_one_token_request() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    // Started together on an empty database: one migrates, the others wait on its lock.
    let (a, b, c) = tokio::join!(
        shared_relay(root.path(), &pg, &provider, "relay-a"),
        shared_relay(root.path(), &pg, &provider, "relay-b"),
        shared_relay(root.path(), &pg, &provider, "relay-c"),
    );
    let relays = [a, b, c];
    let rt = provider.state().add_refresh_token();
    relays[0].import("news", &rt).await;
    assert_eq!(provider.state().token_requests, 0);
    let mut tasks = Vec::new();
    for n in 0..40 {
        let relay = relays[n % 3].view();
        let pki = provider.pki.clone();
        tasks.push(tokio::spawn(async move { send_one(&relay, &pki, n).await }));
    }
    for t in tasks {
        let replies = t.await.unwrap();
        assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    }
    let (delivered, token_requests) = {
        let s = provider.state();
        (s.messages.len(), s.token_requests)
    };
    assert_eq!(delivered, 40);
    assert_eq!(
        token_requests, 1,
        "one token request for the three relays together"
    );
    // The database never saw the token in clear: only sealed bytes.
    let client = pg.client().await;
    let rows = client
        .query(
            "SELECT sealed FROM xoauth_grants WHERE account = 'news'",
            &[],
        )
        .await
        .unwrap();
    let sealed: Vec<u8> = rows[0].get(0);
    let issued = provider.state().issued.clone();
    for secret in issued {
        assert!(
            !sealed.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a token in clear in the database"
        );
    }
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_relay_is_refused_on_the_other_at_once() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let a = shared_relay(root.path(), &pg, &provider, "relay-a").await;
    let b = shared_relay(root.path(), &pg, &provider, "relay-b").await;
    let rt = provider.state().add_refresh_token();
    a.import("news", &rt).await;
    // B has a cached token now.
    let replies = send_one(&b, &provider.pki, 1).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    let done = admin(
        &a,
        Request::Revoke {
            account: "news".into(),
        },
    )
    .await;
    assert!(done.ok, "{}", done.text);
    // The news travels by NOTIFY: B refuses within moments, not at its token's expiry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let mut c = Client::connect(&b, Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, PASSWORD).await;
        if reply.starts_with("454") {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay B still accepts the revoked account: {reply}"
        );
        tokio::task::yield_now().await;
    };
    assert!(refused.contains("no grant stored"), "{refused}");
    // A new grant on B is used on A at its next session.
    let rt = provider.state().add_refresh_token();
    b.import("news", &rt).await;
    let replies = send_one(&a, &provider.pki, 2).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_relay_s_instance_name_is_refused_and_a_stopped_one_s_is_free() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let a = shared_relay(root.path(), &pg, &provider, "relay-a").await;
    // A second relay (its own directory) that calls itself relay-a too.
    let dir = root.path().join("other");
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_config(
        &dir,
        &provider,
        &shared_opts(root.path(), &pg, "relay-a"),
        &password_hash(),
    );
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    let refused = match xoauth_relay::app::Relay::bind(config).await {
        Ok(_) => panic!("a second relay-a started"),
        Err(e) => e,
    };
    assert!(
        refused.contains("another relay named `relay-a` is alive on database relay@127.0.0.1"),
        "{refused}"
    );
    assert!(
        refused.contains(&format!("pid {}", std::process::id())),
        "{refused}"
    );
    let health = admin(&a, Request::Health).await;
    assert!(
        health.text.contains("relay-a (this one): pid"),
        "{}",
        health.text
    );
    a.stop().await;
    // A clean stop gives the name up at once.
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    let again = xoauth_relay::app::Relay::bind(config).await;
    assert!(again.is_ok(), "{:?}", again.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_shared_key_is_refused_by_name() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let a = shared_relay(root.path(), &pg, &provider, "relay-a").await;
    // No grant yet: the database's key check, sealed by the first relay, tells.
    // Relay B with a key_file of its own.
    let dir = root.path().join("relay-b");
    std::fs::create_dir_all(&dir).unwrap();
    let mut opts = shared_opts(root.path(), &pg, "relay-b");
    opts.extra_server_toml = String::new();
    let path = write_config(&dir, &provider, &opts, &password_hash());
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    let refused = match xoauth_relay::app::Relay::bind(config).await {
        Ok(_) => panic!("a relay with another key started"),
        Err(e) => e,
    };
    assert!(
        refused.contains("is not the key that sealed the grants in database"),
        "{refused}"
    );
    assert!(
        refused.contains("the one just made was removed again"),
        "{refused}"
    );
    assert!(!dir.join("master.key").exists());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_counts_the_relays_together() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    // Burst of 1: a second message within seconds must wait, whichever relay takes it.
    let relays = start_relays(
        (root.path(), &pg, &provider),
        &["relay-a", "relay-b"],
        shared_opts,
        |o| {
            o.extra_accounts_toml = "max_messages_per_minute = 20".into();
            o.extra_limits_toml = "upstream_wait_secs = 1".into();
        },
    )
    .await;
    let rt = provider.state().add_refresh_token();
    relays[0].import("news", &rt).await;
    let first = send_one(&relays[0], &provider.pki, 1).await;
    assert!(first.last().unwrap().starts_with("250"), "{first:?}");
    // Relay B alone would have a turn of its own; together there is none for about 3 s.
    let second = send_one(&relays[1], &provider.pki, 2).await;
    assert!(
        second[0].starts_with("451 4.7.0 account `news`: max_messages_per_minute (20) reached"),
        "{second:?}"
    );
    assert_eq!(provider.state().messages.len(), 1);
    let client = pg.client().await;
    let rows = client
        .query(
            "SELECT count(*) FROM xoauth_rows WHERE kind = 'pace' AND key = 'news'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1, "one row for the account");
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cap_of_three_holds_across_two_relays() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    // Like Exchange Online: a fourth concurrent authenticated connection gets 432 4.3.2.
    provider.state().max_authed = Some(3);
    let relays = start_relays(
        (root.path(), &pg, &provider),
        &["relay-a", "relay-b"],
        shared_opts,
        |o| {
            o.extra_provider_toml = "max_upstream_connections = 3".into();
        },
    )
    .await;
    let rt = provider.state().add_refresh_token();
    relays[0].import("news", &rt).await;
    let views: Vec<&Relay> = relays.iter().collect();
    for replies in sessions_sending(&views, &provider.pki, 16, 3).await {
        assert!(all_ok(&replies), "{replies:?}");
    }
    {
        let s = provider.state();
        assert_eq!(s.messages.len(), 48, "every message delivered");
        assert!(
            s.authed_peak <= 3,
            "at most 3 upstream connections at once across both relays, saw {}",
            s.authed_peak
        );
        assert_eq!(s.auth_rejected, 0, "no 432 from the upstream");
    }
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_s_throttling_pauses_the_account_on_the_other() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let relays = start_relays(
        (root.path(), &pg, &provider),
        &["relay-a", "relay-b"],
        shared_opts,
        |o| {
            o.extra_accounts_toml = "delivery = \"queue\"".into();
        },
    )
    .await;
    let rt = provider.state().add_refresh_token();
    relays[0].import("news", &rt).await;
    // Microsoft's throttling reply to relay A's message.
    provider.state().mail_reply = Some("451 4.7.500 Server busy. Please try again later".into());
    let mut c = Client::connect(&relays[0], Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    queue_one(&mut c, &["bob@example.org"], b"Subject: 1\r\n\r\none\r\n").await;
    until_paused(&relays[0]).await;
    // Relay B holds the account too, without having tried anything itself.
    let table = until_paused(&relays[1]).await;
    assert!(table.contains("Server busy"), "{table}");
    // A relay started now holds it too, from the shared record.
    let late = start_relays(
        (root.path(), &pg, &provider),
        &["relay-c"],
        shared_opts,
        |o| o.extra_accounts_toml = "delivery = \"queue\"".into(),
    )
    .await
    .remove(0);
    let table = until_paused(&late).await;
    assert!(table.contains("Server busy"), "{table}");
    late.stop().await;
    assert_eq!(provider.state().messages.len(), 0);
    // `queue retry` on B lifts it everywhere: A delivers its message.
    provider.state().mail_reply = None;
    assert!(retry_all(&relays[1]).await.ok);
    provider.until(|s| s.messages.len() == 1).await;
    for r in relays {
        r.stop().await;
    }
}

/// Queue-mode options for relay `name` on `pg`: retries a second apart, so a test waits for the
/// takeover, not for a backoff.
fn queue_opts(root: &Path, pg: &Postgres, name: &str) -> RelayOptions {
    let mut opts = shared_opts(root, pg, name);
    opts.extra_accounts_toml = "delivery = \"queue\"\n\n[delivery]\nretry_min_secs = 1".into();
    opts
}

async fn queued_rows(pg: &Postgres) -> Vec<(String, String, i64)> {
    let client = pg.client().await;
    client
        .query(
            "SELECT q.id, q.owner, (SELECT count(*) FROM xoauth_queue_body b WHERE b.id = q.id) \
             FROM xoauth_queue q ORDER BY q.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_s_queue_is_delivered_by_the_other() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let mut relays = start_relays(
        (root.path(), &pg, &provider),
        &["relay-a", "relay-b"],
        queue_opts,
        |_| {},
    )
    .await;
    let rt = provider.state().add_refresh_token();
    relays[0].import("news", &rt).await;
    // The upstream is down: relay A keeps what it accepts.
    provider.state().down = true;
    let mut c = Client::connect(&relays[0], Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    // One message large enough for several body chunks, byte for byte.
    let big: Vec<u8> = (0..700_000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i as usize % 36])
        .collect();
    let mut big_mail = b"Subject: big\r\n\r\n".to_vec();
    for line in big.chunks(70) {
        big_mail.extend_from_slice(line);
        big_mail.extend_from_slice(b"\r\n");
    }
    let mut ids = Vec::new();
    for n in 0..3 {
        let body = format!("Subject: {n}\r\n\r\nmessage {n}\r\n").into_bytes();
        ids.push(queue_one(&mut c, &["bob@example.org"], &body).await);
    }
    ids.push(queue_one(&mut c, &["carol@example.org"], &big_mail).await);
    drop(c);
    // In the database, owned by A, bodies in chunks; not in A's data_dir.
    let rows = queued_rows(&pg).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows.iter().all(|(_, owner, _)| owner == "relay-a"),
        "{rows:?}"
    );
    assert!(rows.iter().any(|(_, _, chunks)| *chunks >= 3), "{rows:?}");
    assert!(!root.path().join("relay-a/data/queue").exists());
    // Any relay lists them, with the relay that holds them.
    let listed = queue_json(&relays[1]).await;
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(listed.iter().all(|m| m["relay"] == "relay-a"), "{listed:?}");
    let table = queue_table(&relays[1]).await;
    assert!(
        table.contains("RELAY") && table.contains("relay-a"),
        "{table}"
    );
    // A stops (a rolling upgrade, say); the upstream comes back; B takes A's mail over.
    let a = relays.remove(0);
    a.stop().await;
    provider.state().down = false;
    provider.until(|s| s.messages.len() == 4).await;
    let delivered = provider.state().messages.clone();
    let big_copy = delivered
        .iter()
        .find(|m| m.rcpts == ["carol@example.org"])
        .unwrap();
    assert!(
        big_copy.body.ends_with(&big_mail),
        "the large message arrived byte for byte"
    );
    // Delivered once each, and gone from the database.
    assert_eq!(delivered.len(), 4);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !queued_rows(&pg).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not empty"
        );
        tokio::task::yield_now().await;
    }
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_transfer_has_its_queue_delivered_by_another() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let short_lease = |name: &str| {
        let mut opts = queue_opts(root.path(), &pg, name);
        opts.extra_toml = opts.extra_toml.replace("lease_secs = 10", "lease_secs = 6");
        opts
    };
    let dir_a = root.path().join("relay-a");
    std::fs::create_dir_all(&dir_a).unwrap();
    let config_a = write_config(&dir_a, &provider, &short_lease("relay-a"), &password_hash());
    let (mut a, addr_a) = serve_process(&config_a, "implicit").await;
    let dir_b = root.path().join("relay-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let b = Relay::start(&dir_b, &provider, short_lease("relay-b")).await;
    let rt = provider.state().add_refresh_token();
    b.import("news", &rt).await;
    // The upstream takes A's first transfer and never answers it.
    provider.state().hold_data = true;
    let mut c = Client::connect_addr(addr_a, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    for n in 0..5 {
        let body = format!("Subject: m{n}\r\n\r\nmessage {n}\r\n").into_bytes();
        queue_one(&mut c, &["bob@example.org"], &body).await;
    }
    drop(c);
    // Mid-transfer: the first message is claimed by A and its data is at the upstream.
    let claimed = loop {
        let client = pg.client().await;
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM xoauth_queue WHERE claimed_by LIKE 'relay-a/%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break n;
        }
        tokio::task::yield_now().await;
    };
    assert!(claimed >= 1);
    a.kill().await.unwrap();
    {
        let mut s = provider.state();
        s.hold_data = false;
        s.changed.notify_waiters();
    }
    // B adopts A's messages once A's registration and claims have run out (6 s), and delivers.
    let want: Vec<String> = (0..5).map(|n| format!("Subject: m{n}")).collect();
    provider
        .until(|s| {
            want.iter().all(|w| {
                s.messages
                    .iter()
                    .any(|m| String::from_utf8_lossy(&m.body).contains(w.as_str()))
            })
        })
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !queued_rows(&pg).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not empty"
        );
        tokio::task::yield_now().await;
    }
    // A second copy only of the one whose data the upstream had when A died.
    let delivered = provider.state().messages.len();
    assert!(
        (5..=6).contains(&delivered),
        "{delivered} deliveries of 5 messages"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_install_moves_into_the_database_with_its_grant_and_queue() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let dir = root.path().join("relay-a");
    std::fs::create_dir_all(&dir).unwrap();
    // One relay on sled, in queue mode, with a grant and a message it could not deliver yet.
    let mut sled_opts = queue_opts(root.path(), &pg, "relay-a");
    sled_opts.extra_toml = String::new();
    let relay = Relay::start(&dir, &provider, sled_opts).await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;
    provider.state().down = true;
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    queue_one(
        &mut c,
        &["bob@example.org"],
        b"Subject: kept\r\n\r\nkept\r\n",
    )
    .await;
    drop(c);
    relay.stop().await;
    let requests_before = provider.state().token_requests;
    // The same file, now on the database.
    let path = write_config(
        &dir,
        &provider,
        &queue_opts(root.path(), &pg, "relay-a"),
        &password_hash(),
    );
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    let text = xoauth_relay::app::migrate_from_sled(config, None)
        .await
        .unwrap();
    assert!(
        text.contains("1 grant(s) (0 already there, kept), 1 queued message(s) (0 already there)"),
        "{text}"
    );
    // Once only: a second run copies nothing.
    let config = xoauth_relay::config::Config::load(&path).unwrap();
    let again = xoauth_relay::app::migrate_from_sled(config, None)
        .await
        .unwrap();
    assert!(
        again.contains("0 grant(s) (1 already there, kept), 0 queued message(s) (1 already there)"),
        "{again}"
    );
    // The relay on the database delivers the old message with the old grant: no new authorization.
    provider.state().down = false;
    let relay = Relay::start_from(&dir, path).await;
    provider.until(|s| s.messages.len() == 1).await;
    let replies = send_one(&relay, &provider.pki, 2).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    // The access token the sled store had was still good, or one refresh of the copied grant.
    assert!(provider.state().token_requests <= requests_before + 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_down_loses_nothing_acknowledged_and_direct_mode_goes_on() {
    let Some((mut pg, root, provider)) = setup().await else {
        return;
    };
    let start = |name: &str, queue: bool| {
        let mut opts = if queue {
            queue_opts(root.path(), &pg, name)
        } else {
            shared_opts(root.path(), &pg, name)
        };
        opts.extra_toml
            .push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\n");
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        (dir, opts)
    };
    let (dir_q, opts_q) = start("queued", true);
    let queued = Relay::start(&dir_q, &provider, opts_q).await;
    let (dir_d, opts_d) = start("direct", false);
    let direct = Relay::start(&dir_d, &provider, opts_d).await;
    let rt = provider.state().add_refresh_token();
    queued.import("news", &rt).await;
    // Both have a token now; one message each.
    let mut acknowledged = 0;
    for relay in [&queued, &direct] {
        let replies = send_one(relay, &provider.pki, 0).await;
        assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
        acknowledged += 1;
    }
    provider.until(|s| s.messages.len() == 2).await;
    let ready = |relay: &Relay| {
        let addr = relay.metrics.unwrap();
        async move { http_get(addr, "/readyz").await }
    };
    assert_eq!(ready(&queued).await.0, 200);

    pg.stop();
    // Queue mode: no 250 without the commit; the mailer is told to come back.
    let replies = send_one(&queued, &provider.pki, 1).await;
    let last = replies.last().unwrap();
    assert!(last.starts_with("451 4.3.0"), "{replies:?}");
    // Direct mode relays on with its cached token.
    let replies = send_one(&direct, &provider.pki, 2).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    acknowledged += 1;
    let (code, body) = ready(&queued).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    let database = format!("relay@127.0.0.1:{}/postgres", pg.port);
    let up = |value: u8| format!("xoauth_relay_database_up{{database=\"{database}\"}} {value}");
    let metrics = http_get(queued.metrics.unwrap(), "/metrics").await.1;
    assert!(metrics.contains(&up(0)), "{metrics}");

    pg.restart().await;
    // Each relay reconnects on its own and says so.
    for relay in [&queued, &direct] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while ready(relay).await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "not ready again");
            tokio::task::yield_now().await;
        }
    }
    let metrics = http_get(queued.metrics.unwrap(), "/metrics").await.1;
    assert!(metrics.contains(&up(1)), "{metrics}");
    let replies = send_one(&queued, &provider.pki, 3).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    acknowledged += 1;
    provider.until(|s| s.messages.len() == acknowledged).await;
    queued.stop().await;
    direct.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_count_across_relays_and_unlock_on_one_lifts_all() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let relays = start_relays(
        (root.path(), &pg, &provider),
        &["relay-a", "relay-b"],
        shared_opts,
        |o| {
            o.extra_limits_toml = "auth_failures_per_login = 4\nauth_failures_per_ip = 50".into();
        },
    )
    .await;
    const LOCKED: &str = "421 4.7.0 too many failed logins, try again later";
    // Two wrong passwords on each relay: four together, the limit.
    for (n, relay) in [&relays[0], &relays[0], &relays[1], &relays[1]]
        .iter()
        .enumerate()
    {
        let mut c = Client::connect(relay, Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, &format!("wrong-{n}")).await;
        assert!(reply.starts_with("535 5.7.8"), "failure {n}: {reply}");
    }
    // Either relay refuses that login from this address now, the right password too.
    for relay in &relays {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut c = Client::connect(relay, Conn::Implicit, &provider.pki).await;
            let reply = c.login_plain(LOGIN, PASSWORD).await;
            if reply == LOCKED {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not locked out: {reply}"
            );
            tokio::task::yield_now().await;
        }
    }
    // `unlock` on relay B lifts it on A too.
    let done = admin(
        &relays[1],
        Request::Unlock {
            address: Some("127.0.0.1".into()),
        },
    )
    .await;
    assert!(done.ok, "{}", done.text);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(&relays[0], Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, PASSWORD).await;
        if reply.starts_with("235") || reply.starts_with("454") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still locked out: {reply}"
        );
        tokio::task::yield_now().await;
    }
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_usage_counts_every_relay() {
    let Some((pg, root, provider)) = setup().await else {
        return;
    };
    let a = shared_relay(root.path(), &pg, &provider, "relay-a").await;
    let b = shared_relay(root.path(), &pg, &provider, "relay-b").await;
    let rt = provider.state().add_refresh_token();
    a.import("news", &rt).await;
    for (n, relay) in [&a, &b, &b].iter().enumerate() {
        let replies = send_one(relay, &provider.pki, n).await;
        assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    }
    // B writes its figures at shutdown (and every 30 s while it runs).
    b.stop().await;
    let listed = admin(
        &a,
        Request::Accounts {
            json: true,
            usage: true,
        },
    )
    .await;
    assert!(listed.ok, "{}", listed.text);
    let json: serde_json::Value = serde_json::from_str(&listed.text).unwrap();
    assert_eq!(json[0]["last_24h"]["messages"], 3, "{json}");
    assert_eq!(json[0]["last_7d"]["recipients"], 3, "{json}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_starts_with_the_database_down_and_serves_once_it_answers() {
    let Some((mut pg, root, provider)) = setup().await else {
        return;
    };
    // A grant stored while the database is up.
    let first = shared_relay(root.path(), &pg, &provider, "relay-a").await;
    let rt = provider.state().add_refresh_token();
    first.import("news", &rt).await;
    first.stop().await;
    pg.stop();
    let dir = root.path().join("relay-a");
    let mut opts = queue_opts(root.path(), &pg, "relay-a");
    opts.extra_toml
        .push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\n");
    let relay = Relay::start(&dir, &provider, opts).await;
    let addr = relay.metrics.unwrap();
    // Past "starting", it says why it is not ready.
    let (code, body) = loop {
        let (code, body) = http_get(addr, "/readyz").await;
        if !body.contains("starting") {
            break (code, body);
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    // Nothing is acknowledged meanwhile.
    let replies = send_one(&relay, &provider.pki, 1).await;
    assert!(
        replies.last().unwrap().starts_with("451 4.3.0"),
        "{replies:?}"
    );
    pg.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready after the database came up"
        );
        tokio::task::yield_now().await;
    }
    let replies = send_one(&relay, &provider.pki, 2).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    provider.until(|s| s.messages.len() == 1).await;
    relay.stop().await;
}

//! Hot reload: `reload` and SIGHUP put a changed file in force for new sessions (a new account, a
//! new password, a new certificate) while a session opened before finishes its message; an
//! invalid file or one that needs a restart is refused whole.

mod common;

use common::*;
use xoauth_relay::control::wire::Request;

/// Rewrites the relay's config with `opts` (and the same password hash for `news` unless given).
fn rewrite(relay: &Relay, provider: &FakeProvider, opts: &RelayOptions, news_hash: &str) {
    let path = write_config(&relay.dir, provider, opts, news_hash);
    assert_eq!(path, relay.config_path);
}

/// `reload` straight to the control socket (the command line would stop at the broken file).
async fn reload(relay: &Relay) -> xoauth_relay::control::wire::Response {
    let socket = relay.dir.join("data/control.sock");
    xoauth_relay::control::client::call(&socket, &Request::Reload { config: None })
        .await
        .unwrap()
        .expect("the relay answers")
}

/// Whether an implicit-TLS handshake with the relay succeeds when trusting `pki`'s CA.
async fn trusts(relay: &Relay, pki: &Pki) -> bool {
    let tcp = tokio::net::TcpStream::connect(relay.implicit)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn reload_adds_an_account_changes_a_password_and_swaps_the_certificate() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "starttls").await;
    // A session that started before the reload, in the middle of a transaction.
    let mut before = logged_in(&relay, &provider, Conn::StartTls).await;
    assert!(before
        .cmd("MAIL FROM:<alice@example.com>")
        .await
        .starts_with("250"));
    assert!(before
        .cmd("RCPT TO:<bob@example.net>")
        .await
        .starts_with("250"));

    let new_news = "new-news-PASSWORD";
    let shop_pw = "shop-PASSWORD";
    let opts = RelayOptions {
        // Limits follow too: two failed logins now lock an address out.
        extra_limits_toml: "auth_failures_per_ip = 2".into(),
        ..shop_account(
            &xoauth_relay::auth::hash_password(shop_pw),
            &provider,
            Some(&relay.dir),
        )
    };
    rewrite(
        &relay,
        &provider,
        &opts,
        &xoauth_relay::auth::hash_password(new_news),
    );
    let new_pki = Pki::new();
    std::fs::write(relay.dir.join("certs/relay.crt"), &new_pki.cert_pem).unwrap();
    std::fs::write(relay.dir.join("certs/relay.key"), &new_pki.key_pem).unwrap();

    let r = admin(&relay, Request::Reload { config: None }).await;
    assert!(r.ok, "{}", r.text);
    assert!(r.text.contains("accounts added: shop"), "{}", r.text);
    assert!(r.text.contains("accounts changed: news"), "{}", r.text);
    assert!(r.text.contains("TLS certificate"), "{}", r.text);
    assert!(
        r.text.contains("[limits] auth_failures_per_ip"),
        "{}",
        r.text
    );

    // The session from before finishes on what it started with.
    assert!(before.cmd("DATA").await.starts_with("354"));
    before
        .send_raw(b"Subject: before\r\n\r\nstarted before the reload\r\n.\r\n")
        .await;
    assert!(before.reply().await.starts_with("250"));

    // New TLS sessions see the new certificate.
    assert!(trusts(&relay, &new_pki).await);
    assert!(!trusts(&relay, &provider.pki).await);

    // The old password is refused, the new one accepted.
    let mut c = Client::connect(&relay, Conn::Implicit, &new_pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("535"));
    let mut c = Client::connect(&relay, Conn::Implicit, &new_pki).await;
    assert!(c.login_plain(LOGIN, new_news).await.starts_with("235"));

    // The added account can be given a grant right away, and send.
    let rt = provider.state().add_refresh_token();
    relay.import("shop", &rt).await;
    let mut shop = Client::connect(&relay, Conn::Implicit, &new_pki).await;
    assert_eq!(
        shop.login_plain("shop", shop_pw).await,
        "235 2.7.0 Authentication successful"
    );
    let replies = shop
        .send_mail(
            "shop@example.com",
            &["carol@example.net"],
            b"Subject: shop\r\n\r\nhi\r\n",
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    let accounts = admin(
        &relay,
        Request::Accounts {
            json: true,
            usage: false,
        },
    )
    .await
    .text;
    assert!(accounts.contains("\"name\": \"shop\""), "{accounts}");
    assert_eq!(provider.state().messages.len(), 2);

    // The old password's 535 was the first failure; the second locks the address out.
    let mut c = Client::connect(&relay, Conn::Implicit, &new_pki).await;
    assert!(c.login_plain(LOGIN, "wrong").await.starts_with("535"));
    let mut greeting = [0u8; 9];
    let mut tcp = tokio::net::TcpStream::connect(relay.starttls)
        .await
        .unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut greeting)
        .await
        .unwrap();
    assert_eq!(&greeting, b"421 4.7.0");
    relay.stop().await;
}

#[tokio::test]
async fn an_invalid_file_or_a_restart_only_change_is_refused_and_the_old_config_stays() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    std::fs::write(&relay.config_path, "[server\nbroken").unwrap();
    let r = reload(&relay).await;
    assert!(!r.ok);
    assert!(
        r.text
            .contains("config not reloaded, the running one stays"),
        "{}",
        r.text
    );
    assert!(r.text.contains("relay.toml:1"), "{}", r.text);

    let opts = RelayOptions {
        extra_server_toml: "control_socket = \"/tmp/elsewhere.sock\"".into(),
        ..RelayOptions::default()
    };
    rewrite(&relay, &provider, &opts, &password_hash());
    let r = reload(&relay).await;
    assert!(!r.ok);
    assert!(
        r.text
            .contains("[server] control_socket changed, which needs a restart"),
        "{}",
        r.text
    );

    // Still the old config: the old password works and mail goes.
    let mut c = logged_in(&relay, &provider, Conn::Implicit).await;
    let replies = c
        .send_mail(
            "alice@example.com",
            &["bob@example.net"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    relay.stop().await;
}

//! Upstream SMTP through a proxy: SOCKS5 (with user and password) and HTTP CONNECT, each a test
//! proxy of our own on loopback that records what it was asked for.

mod common;

use common::*;

async fn send_one(relay: &Relay, provider: &FakeProvider) -> Vec<String> {
    let mut c = Client::connect(relay, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    c.send_mail("news@example.com", &["a@x.org"], b"via proxy\r\n")
        .await
}

#[tokio::test]
async fn upstream_smtp_goes_through_a_socks5_proxy_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    let (proxy, log) = socks5_proxy().await;
    std::fs::write(dir.path().join("proxy-pass"), "proxy-pw-SECRET\n").unwrap();
    let opts = RelayOptions {
        extra_server_toml: format!(
            "upstream_proxy = \"socks5://relay@{proxy}\"\nupstream_proxy_password_file = \"{}/proxy-pass\"",
            dir.path().display()
        ),
        ..RelayOptions::default()
    };
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    let replies = send_one(&relay, &provider).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    assert_eq!(provider.state().messages.len(), 1);
    let log = log.lock().unwrap();
    // By name: the proxy resolves it, and TLS inside the tunnel is verified against it.
    assert_eq!(
        log.targets,
        [format!("localhost:{}", provider.smtp_addr.port())]
    );
    assert_eq!(log.credentials, ["relay:proxy-pw-SECRET"]);
}

#[tokio::test]
async fn a_provider_can_use_its_own_http_connect_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("starttls", None).await;
    let (socks, socks_log) = socks5_proxy().await;
    let (connect, connect_log) = connect_proxy().await;
    let opts = RelayOptions {
        extra_server_toml: format!("upstream_proxy = \"socks5://{socks}\""),
        extra_provider_toml: format!("upstream_proxy = \"http://{connect}\""),
        ..RelayOptions::default()
    };
    let relay = start_with_grant(dir.path(), &provider, opts).await;
    let replies = send_one(&relay, &provider).await;
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    assert_eq!(
        connect_log.lock().unwrap().targets,
        [format!("localhost:{}", provider.smtp_addr.port())]
    );
    assert!(socks_log.lock().unwrap().targets.is_empty());
}

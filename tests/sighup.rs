//! SIGHUP reloads the config. Alone in its test binary: the signal reaches every relay of the
//! process.

mod common;

use common::*;

#[tokio::test]
async fn sighup_reloads() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let shop_pw = "shop-PASSWORD";
    let opts = shop_account(&xoauth_relay::auth::hash_password(shop_pw), &provider, None);
    write_config(&relay.dir, &provider, &opts, &password_hash());
    assert_eq!(sighup_to_self(), 0);
    // The reload runs in the relay's task; the login succeeding is what there is to wait for.
    loop {
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        // 454: the account exists now, and has no grant yet.
        if c.login_plain("shop", shop_pw).await.starts_with("454") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Given a grant, the account added by SIGHUP sends.
    let rt = provider.state().add_refresh_token();
    relay.import("shop", &rt).await;
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain("shop", shop_pw).await.starts_with("235"));
    let replies = c
        .send_mail(
            "shop@example.com",
            &["bob@example.net"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(all_ok(&replies), "{replies:?}");
    assert_eq!(provider.state().messages.len(), 1);
    relay.stop().await;
}

/// SIGHUP to this process, through the `kill` command (no unsafe code for it).
fn sighup_to_self() -> i32 {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    status.code().unwrap_or(-1)
}

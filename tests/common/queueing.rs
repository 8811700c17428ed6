//! Queue mode from the outside: a message queued, the listing, waiting for a pause or an empty
//! queue (through the control socket, as an operator would).

use super::*;
use xoauth_relay::control::wire::Request;

/// Sends one message and returns its queue id, asserting the queue-mode receipt.
pub async fn queue_one(c: &mut Client, rcpts: &[&str], body: &[u8]) -> String {
    let replies = c.send_mail("alice@example.com", rcpts, body).await;
    assert!(all_ok(&replies), "{replies:?}");
    let last = replies.last().unwrap();
    last.strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a queue receipt: {last}"))
        .to_string()
}

/// `queue retry --all` through the control socket.
pub async fn retry_all(relay: &Relay) -> xoauth_relay::control::wire::Response {
    let all = Request::QueueRetry {
        id: None,
        account: None,
        all: true,
    };
    admin(relay, all).await
}

pub async fn queue_json(relay: &Relay) -> Vec<serde_json::Value> {
    let r = admin(
        relay,
        Request::Queue {
            account: None,
            json: true,
        },
    )
    .await;
    assert!(r.ok, "{}", r.text);
    serde_json::from_str(&r.text).unwrap()
}

/// Waits until the queue listing satisfies `done` (the relay's work between two advances of the
/// test clock must be over before the clock moves, or its upstream timeouts would fire).
pub async fn until_queue(relay: &Relay, mut done: impl FnMut(&[serde_json::Value]) -> bool) {
    loop {
        if done(&queue_json(relay).await) {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// The `queue` table of the running relay.
pub async fn queue_table(relay: &Relay) -> String {
    admin(
        relay,
        Request::Queue {
            account: None,
            json: false,
        },
    )
    .await
    .text
}

/// The `accounts` table of the running relay.
pub async fn accounts_table(relay: &Relay) -> String {
    admin(
        relay,
        Request::Accounts {
            json: false,
            usage: false,
        },
    )
    .await
    .text
}

/// Waits until `accounts` shows the account paused, and returns the table.
pub async fn until_paused(relay: &Relay) -> String {
    loop {
        let table = accounts_table(relay).await;
        if table.contains("paused") {
            return table;
        }
        tokio::task::yield_now().await;
    }
}

/// The spool is empty once delivery is recorded.
pub async fn wait_for_empty_queue(relay: &Relay) {
    let msg_dir = relay.dir.join("data/queue/msg");
    for _ in 0..1000 {
        if queue_json(relay).await.is_empty() && std::fs::read_dir(&msg_dir).unwrap().count() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the queue did not empty: {:?}", queue_json(relay).await);
}

//! Throughput and memory figures for the relay path, against the test suite's fake provider:
//!
//!     cargo run --release --example throughput -- [sessions] [messages_per_session] [body_bytes]
//!
//! Mailer sessions (implicit TLS, AUTH PLAIN) send messages in parallel through an in-process relay
//! to the fake upstream (implicit TLS, XOAUTH2). Everything runs in this one process on loopback, so
//! the figures include the client and the fake upstream: treat them as a floor for the relay alone.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = args.first().copied().unwrap_or(20);
    let per_session = args.get(1).copied().unwrap_or(50);
    let body_bytes = args.get(2).copied().unwrap_or(10 * 1024);

    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start("implicit", None).await;
    let relay = Relay::start(dir.path(), &provider, RelayOptions::default()).await;
    let rt = provider.state().add_refresh_token();
    relay.import("news", &rt).await;

    let mut body = Vec::with_capacity(body_bytes + 80);
    while body.len() < body_bytes {
        body.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n",
        );
    }
    let body = std::sync::Arc::new(body);

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let relay = relay.view();
        let pki = provider.pki.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&relay, Conn::Implicit, &pki).await;
            assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
            let mut latencies = Vec::with_capacity(per_session);
            for _ in 0..per_session {
                let t = Instant::now();
                let replies = c
                    .send_mail("news@example.com", &["a@example.org"], &body)
                    .await;
                assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
                latencies.push(t.elapsed());
            }
            c.cmd("QUIT").await;
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let total = latencies.len();
    let pct = |p: f64| latencies[((total as f64 * p) as usize).min(total - 1)];
    let delivered = provider.state().messages.len();
    assert_eq!(delivered, total);
    let mib = (total * body.len()) as f64 / (1024.0 * 1024.0);
    println!(
        "sessions={sessions} messages={total} body={} bytes",
        body.len()
    );
    println!(
        "elapsed {:.2}s  {:.0} msg/s  {:.1} MiB/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
    println!(
        "latency per message: p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        latencies[total - 1]
    );
    println!("token refreshes: {}", provider.state().refresh_count);
    println!(
        "peak RSS of the whole process (relay + fake upstream + clients): {:.1} MiB",
        peak_rss_mib()
    );
}

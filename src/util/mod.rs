//! Small helpers every room may use; nothing here knows about mail, tokens or the config.
//!
//! `secret` (a string that never prints) · `clock` (time that tests can move) · `fs` (private files
//! and directories) · `keyed` (per-account state a reload extends) · `tls` (certificate loading and client roots) · `logging` (subscriber setup) · `sync` (the poison-tolerant lock).

pub mod clock;
pub mod fs;
pub mod keyed;
pub mod logging;
pub mod secret;
pub mod sync;
pub mod tls;

/// A boxed future, for the few traits whose implementations are async (`dyn`-compatible).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// `localhost` or a loopback address (brackets allowed): a peer on this machine.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The machine's name (a relay's default `[store] instance`, and what `health` shows).
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_string(),
        _ => "relay".to_string(),
    }
}

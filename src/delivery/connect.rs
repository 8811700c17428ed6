//! Reaching the provider's SMTP server: directly, racing its addresses (RFC 8305 Happy Eyeballs:
//! IPv6 first, the next address 250 ms later, first to answer wins), or through a SOCKS5 or HTTP
//! CONNECT proxy, in which case the proxy resolves the name and the TLS that follows runs inside the
//! tunnel, verified against the provider's name as always.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::{ErrorKind, UpstreamError};
use crate::config::{ProxyKind, UpstreamProxy};

/// RFC 8305's "connection attempt delay".
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// Longest proxy reply header read (HTTP CONNECT).
const MAX_PROXY_REPLY: usize = 8 * 1024;

/// A TCP connection to `host:port`, through `proxy` when given, within `timeout`.
pub async fn connect(
    host: &str,
    port: u16,
    proxy: Option<&UpstreamProxy>,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let work = async {
        match proxy {
            None => connect_any(host, port)
                .await
                .map_err(|e| UpstreamError::new(ErrorKind::Connect, host, "connect", e)),
            Some(p) => {
                let via = format!("proxy {}:{}", p.host, p.port);
                let mut tcp = connect_any(&p.host, p.port)
                    .await
                    .map_err(|e| UpstreamError::new(ErrorKind::Connect, host, &via, e))?;
                match p.kind {
                    ProxyKind::Socks5 => socks5(&mut tcp, p, host, port).await,
                    ProxyKind::HttpConnect => http_connect(&mut tcp, p, host, port).await,
                }
                .map_err(|e| UpstreamError::new(ErrorKind::Connect, host, &via, e))?;
                Ok(tcp)
            }
        }
    };
    let tcp = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| UpstreamError::new(ErrorKind::Timeout, host, "connect", "timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Resolves `host` and races its addresses.
async fn connect_any(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    race(interleave(addrs), TcpStream::connect).await
}

/// IPv6 and IPv4 addresses alternating, IPv6 first (RFC 8305 §4).
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (mut v6, mut v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    v6.reverse();
    v4.reverse();
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    loop {
        match (v6.pop(), v4.pop()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Starts `attempt` on each address in turn, the next one [`ATTEMPT_DELAY`] after the last or as
/// soon as it fails; the first success wins, and the others are dropped.
async fn race<T, F, Fut>(addrs: Vec<SocketAddr>, attempt: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = std::io::Result<T>> + Send + 'static,
{
    let mut pending = addrs.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut last_error =
        std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
    loop {
        if running.is_empty() {
            match pending.next() {
                Some(addr) => {
                    running.spawn(attempt(addr));
                }
                None => return Err(last_error),
            }
        }
        let more = pending.len() > 0;
        tokio::select! {
            done = running.join_next() => match done {
                Some(Ok(Ok(stream))) => return Ok(stream),
                Some(Ok(Err(e))) => {
                    last_error = e;
                    // A failure starts the next attempt at once.
                    if let Some(addr) = pending.next() {
                        running.spawn(attempt(addr));
                    }
                }
                Some(Err(e)) => last_error = std::io::Error::other(e.to_string()),
                None => {}
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {
                if let Some(addr) = pending.next() {
                    running.spawn(attempt(addr));
                }
            }
        }
    }
}

fn proxy_err(text: impl Into<String>) -> std::io::Error {
    std::io::Error::other(text.into())
}

/// RFC 1928 CONNECT by name (the proxy resolves it), with RFC 1929 user/password when configured.
async fn socks5(
    tcp: &mut TcpStream,
    proxy: &UpstreamProxy,
    host: &str,
    port: u16,
) -> std::io::Result<()> {
    let credentials = proxy
        .user
        .as_deref()
        .map(|u| (u, proxy.password.as_ref().map(|p| p.expose()).unwrap_or("")));
    let method = if credentials.is_some() { 0x02 } else { 0x00 };
    tcp.write_all(&[0x05, 0x01, method]).await?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await?;
    if choice[0] != 0x05 || choice[1] != method {
        return Err(proxy_err(if choice[1] == 0xff {
            "SOCKS5: the proxy accepts none of our authentication methods (set or remove the user)"
        } else {
            "SOCKS5: unexpected method choice"
        }));
    }
    if let Some((user, password)) = credentials {
        if user.len() > 255 || password.len() > 255 {
            return Err(proxy_err("SOCKS5: user or password longer than 255 bytes"));
        }
        let mut auth = vec![0x01, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        tcp.write_all(&auth).await?;
        let mut status = [0u8; 2];
        tcp.read_exact(&mut status).await?;
        if status != [0x01, 0x00] {
            return Err(proxy_err("SOCKS5: the proxy refused the user and password"));
        }
    }
    if host.len() > 255 {
        return Err(proxy_err("SOCKS5: host name longer than 255 bytes"));
    }
    let mut request = vec![0x05, 0x01, 0x00];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            request.push(0x01);
            request.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            request.push(0x04);
            request.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            request.push(0x03);
            request.push(host.len() as u8);
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&request).await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Err(proxy_err("SOCKS5: malformed reply"));
    }
    if head[1] != 0 {
        let why = match head[1] {
            0x02 => "not allowed by the proxy's rules",
            0x03 => "network unreachable",
            0x04 => "host unreachable",
            0x05 => "connection refused",
            0x06 => "TTL expired",
            _ => "general failure",
        };
        return Err(proxy_err(format!(
            "SOCKS5: the proxy could not connect to {host}:{port} ({why})"
        )));
    }
    let skip = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => {
            let mut len = [0u8; 1];
            tcp.read_exact(&mut len).await?;
            usize::from(len[0])
        }
        _ => return Err(proxy_err("SOCKS5: malformed reply")),
    };
    let mut rest = vec![0u8; skip + 2];
    tcp.read_exact(&mut rest).await?;
    Ok(())
}

/// HTTP CONNECT (RFC 9110 §9.3.6), with Basic proxy authentication when configured.
async fn http_connect(
    tcp: &mut TcpStream,
    proxy: &UpstreamProxy,
    host: &str,
    port: u16,
) -> std::io::Result<()> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(user) = &proxy.user {
        let password = proxy.password.as_ref().map(|p| p.expose()).unwrap_or("");
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    // Read the answer's head byte by byte: nothing of the tunnelled stream may be taken.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_REPLY || tcp.read(&mut byte).await? == 0 {
            return Err(proxy_err(
                "HTTP CONNECT: the proxy closed or sent an over-long answer",
            ));
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or("");
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') {
        return Err(proxy_err(format!(
            "HTTP CONNECT to {authority} refused: {status_line:.120}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_first_then_alternating() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = interleave(vec![
            a("192.0.2.1:25"),
            a("192.0.2.2:25"),
            a("[2001:db8::1]:25"),
        ]);
        assert_eq!(
            got,
            vec![a("[2001:db8::1]:25"), a("192.0.2.1:25"), a("192.0.2.2:25")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_first_address_costs_250_ms_not_the_timeout() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let dead = a("[2001:db8::1]:25");
        let started = tokio::time::Instant::now();
        let winner = race(vec![dead, a("192.0.2.1:25")], move |addr| async move {
            if addr == dead {
                // A route that swallows the SYN: no answer, ever.
                std::future::pending::<()>().await;
            }
            Ok(addr)
        })
        .await
        .unwrap();
        assert_eq!(winner, a("192.0.2.1:25"));
        assert_eq!(started.elapsed(), ATTEMPT_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_address_moves_on_at_once_and_all_failing_reports_the_last() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let started = tokio::time::Instant::now();
        let err = race(
            vec![a("192.0.2.1:25"), a("192.0.2.2:25")],
            |addr| async move {
                Err::<SocketAddr, _>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    addr.to_string(),
                ))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "192.0.2.2:25");
        assert!(started.elapsed() < ATTEMPT_DELAY);
    }
}

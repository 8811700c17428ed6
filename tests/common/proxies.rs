//! Proxies for upstream SMTP (SOCKS5, HTTP CONNECT) that log what they were asked.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a test proxy saw: the targets it was asked for, and the credentials it got.
#[derive(Default)]
pub struct ProxyLog {
    pub targets: Vec<String>,
    pub credentials: Vec<String>,
}

/// A proxy on loopback: `serve` handles each client connection with the shared log.
pub async fn proxy<F, Fut>(serve: F) -> (SocketAddr, Arc<Mutex<ProxyLog>>)
where
    F: Fn(TcpStream, Arc<Mutex<ProxyLog>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(ProxyLog::default()));
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            if let Ok((c, _)) = listener.accept().await {
                tokio::spawn(serve(c, seen.clone()));
            }
        }
    });
    (addr, log)
}

/// A SOCKS5 proxy on loopback (no auth, or user/password), tunnelling to what it is asked for.
pub async fn socks5_proxy() -> (SocketAddr, Arc<Mutex<ProxyLog>>) {
    proxy(|mut c, seen| async move {
        let mut head = [0u8; 2];
        c.read_exact(&mut head).await.ok()?;
        let mut methods = vec![0u8; usize::from(head[1])];
        c.read_exact(&mut methods).await.ok()?;
        if methods.contains(&2) {
            c.write_all(&[5, 2]).await.ok()?;
            let mut v = [0u8; 2];
            c.read_exact(&mut v).await.ok()?;
            let mut user = vec![0u8; usize::from(v[1])];
            c.read_exact(&mut user).await.ok()?;
            let mut plen = [0u8; 1];
            c.read_exact(&mut plen).await.ok()?;
            let mut pass = vec![0u8; usize::from(plen[0])];
            c.read_exact(&mut pass).await.ok()?;
            seen.lock().unwrap().credentials.push(format!(
                "{}:{}",
                String::from_utf8_lossy(&user),
                String::from_utf8_lossy(&pass)
            ));
            c.write_all(&[1, 0]).await.ok()?;
        } else {
            c.write_all(&[5, 0]).await.ok()?;
        }
        let mut req = [0u8; 4];
        c.read_exact(&mut req).await.ok()?;
        let host = match req[3] {
            3 => {
                let mut len = [0u8; 1];
                c.read_exact(&mut len).await.ok()?;
                let mut name = vec![0u8; usize::from(len[0])];
                c.read_exact(&mut name).await.ok()?;
                String::from_utf8_lossy(&name).to_string()
            }
            1 => {
                let mut ip = [0u8; 4];
                c.read_exact(&mut ip).await.ok()?;
                std::net::Ipv4Addr::from(ip).to_string()
            }
            _ => return None,
        };
        let mut port = [0u8; 2];
        c.read_exact(&mut port).await.ok()?;
        let target = format!("{host}:{}", u16::from_be_bytes(port));
        seen.lock().unwrap().targets.push(target.clone());
        let mut upstream = TcpStream::connect(&target).await.ok()?;
        c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.ok()?;
        let _ = tokio::io::copy_bidirectional(&mut c, &mut upstream).await;
        Some(())
    })
    .await
}

/// An HTTP CONNECT proxy on loopback.
pub async fn connect_proxy() -> (SocketAddr, Arc<Mutex<ProxyLog>>) {
    proxy(|mut c, seen| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).await.ok()?;
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let target = text.split_whitespace().nth(1)?.to_string();
        seen.lock().unwrap().targets.push(target.clone());
        let mut upstream = TcpStream::connect(&target).await.ok()?;
        c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .ok()?;
        let _ = tokio::io::copy_bidirectional(&mut c, &mut upstream).await;
        Some(())
    })
    .await
}

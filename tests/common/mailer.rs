//! The mailer side: a small SMTP client, and test time and log capture.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

pub struct Client {
    lines: Lines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    StartTls,
    Implicit,
    Plain,
}

impl Client {
    pub async fn connect(relay: &Relay, mode: Conn, pki: &Pki) -> Client {
        let addr = match mode {
            Conn::StartTls => relay.starttls,
            Conn::Implicit => relay.implicit,
            Conn::Plain => relay.plain,
        };
        Client::connect_addr(addr, mode, pki).await
    }

    /// Like `connect`, to a relay at `addr` (one running as another process, say).
    pub async fn connect_addr(addr: SocketAddr, mode: Conn, pki: &Pki) -> Client {
        Client::connect_from(addr, None, mode, pki).await
    }

    /// From a chosen local address (any of 127.0.0.0/8 works on loopback), to test per-address limits.
    pub async fn connect_from(
        addr: SocketAddr,
        from: Option<std::net::IpAddr>,
        mode: Conn,
        pki: &Pki,
    ) -> Client {
        let tcp = connect_tcp(addr, from).await;
        let io: BoxIo = if mode == Conn::Implicit {
            Box::new(tls_connect(tcp, pki).await)
        } else {
            Box::new(tcp)
        };
        let mut c = Client {
            lines: Lines {
                io,
                buf: Vec::new(),
            },
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        let ehlo = c.cmd("EHLO mailer.test").await;
        assert!(ehlo.starts_with("250"), "{ehlo}");
        if mode == Conn::StartTls {
            assert!(ehlo.contains("STARTTLS"), "{ehlo}");
            assert!(
                !ehlo.contains("AUTH"),
                "AUTH must not be offered before TLS: {ehlo}"
            );
            assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");
            let io = std::mem::replace(&mut c.lines.io, Box::new(tokio::io::duplex(1).0));
            c.lines.io = Box::new(tls_connect(io, pki).await);
            let ehlo = c.cmd("EHLO mailer.test").await;
            assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
        }
        c
    }

    pub async fn plain(relay: &Relay) -> Client {
        let tcp = TcpStream::connect(relay.plain).await.unwrap();
        let mut c = Client {
            lines: Lines {
                io: Box::new(tcp),
                buf: Vec::new(),
            },
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        c
    }

    /// Reads one (possibly multi-line) reply; lines joined with '\n'. Empty string on EOF.
    pub async fn reply(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let Some(line) = self.lines.line().await else {
                return out.join("\n");
            };
            let last = line.as_bytes().get(3) != Some(&b'-');
            out.push(line);
            if last {
                return out.join("\n");
            }
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.lines.io.write_all(bytes).await.unwrap();
        self.lines.io.flush().await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    pub async fn login_plain(&mut self, login: &str, password: &str) -> String {
        self.cmd(&format!(
            "AUTH PLAIN {}",
            b64(format!("\0{login}\0{password}"))
        ))
        .await
    }

    pub async fn login_login(&mut self, login: &str, password: &str) -> String {
        assert_eq!(self.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
        assert_eq!(self.cmd(&b64(login)).await, "334 UGFzc3dvcmQ6");
        self.cmd(&b64(password)).await
    }

    /// Sends a whole message; returns the replies to MAIL, each RCPT, DATA and the end of data.
    /// Like `send_mail`, but MAIL, the RCPTs and DATA go in one write (RFC 2920), as Postfix sends.
    pub async fn send_mail_pipelined(
        &mut self,
        from: &str,
        rcpts: &[&str],
        body: &[u8],
    ) -> Vec<String> {
        let mut batch = format!("MAIL FROM:<{from}>\r\n");
        for r in rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        self.send_raw(batch.as_bytes()).await;
        let mut replies = Vec::new();
        for _ in 0..rcpts.len() + 2 {
            replies.push(self.reply().await);
        }
        if replies.last().is_some_and(|r| r.starts_with("354")) {
            self.send_raw(&stuff(body)).await;
            replies.push(self.reply().await);
        }
        replies
    }

    /// Like `send_mail`, but `None` once the connection is gone (the relay was killed, say).
    pub async fn try_send_mail(
        &mut self,
        from: &str,
        rcpts: &[&str],
        body: &[u8],
    ) -> Option<Vec<String>> {
        let mut lines = vec![format!("MAIL FROM:<{from}>")];
        lines.extend(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
        lines.push("DATA".into());
        let mut replies = Vec::new();
        for line in lines {
            self.lines
                .io
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .ok()?;
            let reply = self.reply().await;
            if reply.is_empty() {
                return None;
            }
            replies.push(reply);
        }
        if !replies.last()?.starts_with("354") {
            return Some(replies);
        }
        self.lines.io.write_all(&stuff(body)).await.ok()?;
        let reply = self.reply().await;
        if reply.is_empty() {
            return None;
        }
        replies.push(reply);
        Some(replies)
    }

    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Vec<String> {
        let mut replies = vec![self.cmd(&format!("MAIL FROM:<{from}>")).await];
        for r in rcpts {
            replies.push(self.cmd(&format!("RCPT TO:<{r}>")).await);
        }
        let data = self.cmd("DATA").await;
        let go = data.starts_with("354");
        replies.push(data);
        if go {
            self.send_raw(&stuff(body)).await;
            replies.push(self.reply().await);
        }
        replies
    }
}

/// A TCP connection to `addr`, from `from` when given.
pub async fn connect_tcp(addr: SocketAddr, from: Option<std::net::IpAddr>) -> TcpStream {
    let Some(from) = from else {
        return TcpStream::connect(addr).await.unwrap();
    };
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Dot-stuffs a body and appends the terminator, as a mailer does.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_start = true;
    for (i, &b) in body.iter().enumerate() {
        if at_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_start = b == b'\n' && i > 0 && body[i - 1] == b'\r';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

pub async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
    io: S,
    pki: &Pki,
) -> tokio_rustls::client::TlsStream<S> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(name, io)
        .await
        .unwrap()
}

/// Test time that moves only when told: tokio's clock paused, and its auto-advance held off (a
/// blocking task inhibits it) so that waiting on loopback IO does not fast-forward timeouts.
pub struct ManualTime {
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl ManualTime {
    pub fn start() -> ManualTime {
        tokio::time::pause();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = wait.recv();
        });
        ManualTime {
            release: Some(release),
        }
    }

    pub async fn advance(&self, by: Duration) {
        tokio::time::advance(by).await;
    }
}

impl Drop for ManualTime {
    fn drop(&mut self) {
        drop(self.release.take());
        tokio::time::resume();
    }
}

/// Captures everything the relay logs (all levels) while the guard lives.
#[derive(Clone, Default)]
pub struct LogCapture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn install() -> (LogCapture, tracing::subscriber::DefaultGuard) {
        let capture = LogCapture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

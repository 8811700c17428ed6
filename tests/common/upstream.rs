//! The fake upstream SMTP server: implicit TLS or STARTTLS, XOAUTH2 / OAUTHBEARER checked the
//! way Gmail does (including the `334` error challenge), recipients and replies scripted by address.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

pub struct Lines {
    pub io: BoxIo,
    pub buf: Vec<u8>,
}

impl Lines {
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                );
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads a DATA body up to CRLF.CRLF and undoes dot-stuffing.
    pub async fn data(&mut self) -> Option<Vec<u8>> {
        let mut raw = b"\r\n".to_vec();
        loop {
            if let Some(pos) = raw.windows(5).position(|w| w == b"\r\n.\r\n") {
                let rest = raw.split_off(pos + 5);
                self.buf = [rest, std::mem::take(&mut self.buf)].concat();
                raw.truncate(pos + 2);
                let body = &raw[2..];
                let mut out = Vec::with_capacity(body.len());
                let mut i = 0;
                while i < body.len() {
                    let at_line_start = i == 0 || (i >= 2 && &body[i - 2..i] == b"\r\n");
                    if at_line_start && body[i] == b'.' {
                        i += 1;
                    }
                    if i < body.len() {
                        out.push(body[i]);
                    }
                    i += 1;
                }
                return Some(out);
            }
            if !self.buf.is_empty() {
                raw.append(&mut self.buf);
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn send(&mut self, s: &str) -> Option<()> {
        self.io
            .write_all(format!("{s}\r\n").as_bytes())
            .await
            .ok()?;
        self.io.flush().await.ok()
    }
}

pub async fn smtp_server(
    listener: TcpListener,
    state: Shared,
    tls: Arc<rustls::ServerConfig>,
    implicit: bool,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        tokio::spawn(async move {
            let io: BoxIo = if implicit {
                match acceptor.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                }
            } else {
                Box::new(tcp)
            };
            {
                let mut s = state.lock().unwrap();
                s.connections += 1;
                s.changed.notify_waiters();
            }
            let _ = smtp_session(
                Lines {
                    io,
                    buf: Vec::new(),
                },
                state,
                acceptor,
                implicit,
            )
            .await;
        });
    }
}

/// Checks an XOAUTH2 or OAUTHBEARER initial response the way Gmail does.
pub fn check_sasl(mech: Mech, decoded: &str, state: &State) -> bool {
    let parts: Vec<&str> = decoded.split('\x01').collect();
    let (user, auth) = match mech {
        Mech::Xoauth2 => (
            parts.first().and_then(|p| p.strip_prefix("user=")),
            parts.get(1).and_then(|p| p.strip_prefix("auth=Bearer ")),
        ),
        Mech::Oauthbearer => (
            parts
                .first()
                .and_then(|p| p.strip_prefix("n,a="))
                .and_then(|p| p.strip_suffix(',')),
            parts.iter().find_map(|p| p.strip_prefix("auth=Bearer ")),
        ),
    };
    let well_formed = decoded.ends_with("\x01\x01");
    well_formed
        && user == Some(state.mailbox.as_str())
        && auth.is_some_and(|t| state.token_valid(t))
}

/// Counts an authenticated connection until it closes.
pub struct Authed(Shared);

impl Drop for Authed {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.authed_now -= 1;
        s.changed.notify_waiters();
    }
}

pub async fn smtp_session(
    mut c: Lines,
    state: Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    mut tls: bool,
) -> Option<()> {
    if state.lock().unwrap().down {
        return None;
    }
    c.send("220 fake.provider ESMTP ready").await?;
    let mut authed = false;
    let mut _authed_guard: Option<Authed> = None;
    let mut msg: Option<Message> = None;
    loop {
        if c.buf.contains(&b'\n') {
            state.lock().unwrap().pipelined += 1;
        }
        let line = c.line().await?;
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let mut caps = vec!["fake.provider", "SIZE 40000000", "SMTPUTF8", "PIPELINING"];
            if !state.lock().unwrap().seven_bit {
                caps.push("8BITMIME");
            }
            if !tls {
                caps.push("STARTTLS");
            }
            caps.push("AUTH XOAUTH2 OAUTHBEARER");
            for (i, cap) in caps.iter().enumerate() {
                let sep = if i + 1 == caps.len() { ' ' } else { '-' };
                c.send(&format!("250{sep}{cap}")).await?;
            }
        } else if upper == "STARTTLS" && !tls {
            c.send("220 2.0.0 go ahead").await?;
            let io = std::mem::replace(&mut c.io, Box::new(tokio::io::duplex(1).0));
            c.io = Box::new(acceptor.accept(io).await.ok()?);
            c.buf.clear();
            tls = true;
        } else if let Some(rest) = upper.strip_prefix("AUTH ") {
            let mech = if rest.starts_with("XOAUTH2") {
                Mech::Xoauth2
            } else {
                Mech::Oauthbearer
            };
            if !tls {
                c.send("530 5.7.0 Must issue a STARTTLS command first")
                    .await?;
                continue;
            }
            let arg = line.split_whitespace().nth(2).unwrap_or("");
            let decoded = String::from_utf8_lossy(&b64d(arg)).to_string();
            let fixed = state.lock().unwrap().auth_reply.clone();
            if let Some(reply) = fixed {
                state.lock().unwrap().auth_rejected += 1;
                c.send(&reply).await?;
                continue;
            }
            let ok = check_sasl(mech, &decoded, &state.lock().unwrap());
            let full = {
                let s = state.lock().unwrap();
                s.max_authed.is_some_and(|max| s.authed_now >= max)
            };
            if ok && full {
                state.lock().unwrap().auth_rejected += 1;
                c.send("432 4.3.2 STOREDRV.ClientSubmit; mailbox concurrent connections limit exceeded")
                    .await?;
            } else if ok {
                {
                    let mut s = state.lock().unwrap();
                    s.auth_ok += 1;
                    s.authed_now += 1;
                    s.authed_peak = s.authed_peak.max(s.authed_now);
                    s.changed.notify_waiters();
                }
                _authed_guard = Some(Authed(state.clone()));
                authed = true;
                c.send("235 2.7.0 Accepted").await?;
            } else {
                state.lock().unwrap().auth_rejected += 1;
                let challenge = match mech {
                    Mech::Xoauth2 => {
                        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
                    }
                    Mech::Oauthbearer => {
                        r#"{"status":"invalid_token","scope":"https://mail.google.com/"}"#
                    }
                };
                c.send(&format!("334 {}", b64(challenge))).await?;
                let answer = c.line().await?;
                state.lock().unwrap().challenge_answers.push(answer.clone());
                let expected = if mech == Mech::Xoauth2 { "" } else { "AQ==" };
                if answer == expected {
                    c.send(
                        "535-5.7.8 Username and Password not accepted. For more information, go to",
                    )
                    .await?;
                    c.send("535 5.7.8  https://support.google.com/mail/?p=BadCredentials x")
                        .await?;
                } else {
                    c.send("501 5.5.2 Cannot Decode response").await?;
                }
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !authed {
                c.send("530 5.7.0 Authentication Required").await?;
                continue;
            }
            let fixed = state.lock().unwrap().mail_reply.clone();
            if let Some(reply) = fixed {
                c.send(&reply).await?;
                continue;
            }
            msg = Some(Message {
                mail_from: line[10..].to_string(),
                ..Default::default()
            });
            c.send("250 2.1.0 OK").await?;
        } else if upper.starts_with("RCPT TO:") {
            let Some(m) = msg.as_mut() else {
                c.send("503 5.5.1 MAIL first").await?;
                continue;
            };
            let addr = line[8..].trim_matches(['<', '>', ' ']).to_string();
            if addr.starts_with("reject") {
                c.send(&format!(
                    "550 5.1.1 The email account that you tried to reach does not exist: {addr}"
                ))
                .await?;
            } else if addr.starts_with("throttle")
                && state
                    .lock()
                    .unwrap()
                    .deferred_once
                    .insert(format!("throttle:{addr}"))
            {
                c.send("451 4.7.500 Server busy. Please try again later")
                    .await?;
            } else if addr.starts_with("stuck") {
                // Throttled every time: one recipient the provider never takes right now.
                c.send("451 4.7.500 Server busy. Please try again later")
                    .await?;
            } else if addr.starts_with("once")
                && state.lock().unwrap().deferred_once.insert(addr.clone())
            {
                c.send("450 4.2.1 Mailbox busy, try again later").await?;
            } else if addr.starts_with("later") {
                c.send(
                    "450 4.2.1 The user you are trying to contact is receiving mail too quickly",
                )
                .await?;
            } else {
                m.rcpts.push(addr);
                c.send("250 2.1.5 OK").await?;
            }
        } else if upper == "DATA" {
            match msg.as_ref() {
                Some(m) if !m.rcpts.is_empty() => {}
                _ => {
                    c.send("503 5.5.1 RCPT first").await?;
                    continue;
                }
            }
            c.send("354 Go ahead").await?;
            let body = c.data().await?;
            held(&state).await;
            let mut m = msg.take().unwrap();
            m.body = body;
            m.at = Some(std::time::Instant::now());
            let big = m.body.len() > 30_000_000;
            let close = {
                let mut s = state.lock().unwrap();
                s.messages.push(m);
                s.changed.notify_waiters();
                s.close_after_message
            };
            let after_data = state.lock().unwrap().after_data_reply.take();
            if let Some(reply) = after_data {
                c.send(&reply).await?;
                if reply.starts_with("421") {
                    return Some(());
                }
            } else if big {
                c.send("552 5.3.4 Your message exceeded Google's message size limits")
                    .await?;
            } else {
                c.send("250 2.0.0 OK 1700000000 x-fake-id").await?;
            }
            if close {
                return Some(());
            }
        } else if upper == "RSET" {
            msg = None;
            c.send("250 2.1.5 Flushed").await?;
        } else if upper == "NOOP" {
            c.send("250 2.0.0 OK").await?;
        } else if upper == "QUIT" {
            {
                let mut s = state.lock().unwrap();
                s.quits += 1;
                s.changed.notify_waiters();
            }
            c.send("221 2.0.0 closing connection").await?;
            return Some(());
        } else {
            c.send("502 5.5.1 Unrecognized command").await?;
        }
    }
}

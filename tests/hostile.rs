//! Clients that misbehave, over real sockets: each gets its documented reply or a close, and a
//! well-behaved mailer sending at the same time is served normally.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mailer that logs in and sends `n` messages, checking every reply.
async fn well_behaved(relay: Relay, pki: std::sync::Arc<Pki>, n: usize) {
    let mut c = Client::connect(&relay, Conn::Implicit, &pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    for i in 0..n {
        let body = format!("Subject: {i}\r\n\r\nfine\r\n");
        let replies = c
            .send_mail("news@example.com", &["a@x.org"], body.as_bytes())
            .await;
        assert!(all_ok(&replies), "{replies:?}");
    }
}

/// Reads until the relay closes; returns what it sent.
async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tcp.read_to_end(&mut all).await;
    all
}

/// Every reply line is `DDD[ -]` + text, at most 512 octets, CRLF-terminated.
fn well_formed(wire: &[u8]) -> bool {
    wire.split_inclusive(|b| *b == b'\n').all(|line| {
        line.len() <= 512
            && line.ends_with(b"\r\n")
            && line.len() >= 6
            && line[..3].iter().all(u8::is_ascii_digit)
            && matches!(line[3], b' ' | b'-')
            && !line[4..line.len() - 2].iter().any(|b| *b < 0x20)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_and_garbage_get_their_replies_while_a_mailer_is_served() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mailer = tokio::spawn(well_behaved(relay.view(), provider.pki.clone(), 20));

    // 64 KiB of bare LF: empty commands, refused until the error limit closes the session.
    let mut tcp = TcpStream::connect(relay.plain).await.unwrap();
    tcp.write_all(&vec![b'\n'; 64 * 1024]).await.unwrap();
    let wire = read_to_close(&mut tcp).await;
    assert!(well_formed(&wire), "{}", String::from_utf8_lossy(&wire));
    let text = String::from_utf8_lossy(&wire);
    assert!(text.starts_with("220 "), "{text}");
    assert_eq!(text.matches("\r\n500 ").count(), 10, "{text}");
    assert!(
        text.ends_with("421 4.7.0 Too many errors, closing connection\r\n"),
        "{text}"
    );

    // A 1 MB line: one refusal, and the session goes on.
    let mut c = Client::plain(&relay).await;
    let mut line = vec![b'A'; 1 << 20];
    line.extend_from_slice(b"\r\n");
    c.send_raw(&line).await;
    assert_eq!(c.reply().await, "500 5.5.6 Line too long");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");

    // NUL and a bare CR in a command: refused, and never echoed.
    assert_eq!(
        c.cmd("EHLO evil\0host").await,
        "501 5.5.2 Control characters are not allowed in commands"
    );
    assert_eq!(
        c.cmd("EHLO a\rb").await,
        "501 5.5.2 Control characters are not allowed in commands"
    );

    // TLS garbage on the clear-text port: refused line by line, then closed.
    let mut tcp = TcpStream::connect(relay.plain).await.unwrap();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for i in 0..4000u32 {
        hello.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    tcp.write_all(&hello).await.unwrap();
    tcp.shutdown().await.unwrap();
    let wire = read_to_close(&mut tcp).await;
    assert!(well_formed(&wire), "{}", String::from_utf8_lossy(&wire));

    // Clear text on the implicit-TLS port: no clear-text reply, just a close (or a TLS alert).
    let mut tcp = TcpStream::connect(relay.implicit).await.unwrap();
    tcp.write_all(b"EHLO plain.text\r\n").await.unwrap();
    let wire = read_to_close(&mut tcp).await;
    assert!(
        !wire.starts_with(b"220") && !wire.starts_with(b"421") && !wire.starts_with(b"5"),
        "{wire:?}"
    );

    mailer.await.unwrap();
    assert_eq!(provider.state().messages.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_pipelined_noops_are_all_answered() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mailer = tokio::spawn(well_behaved(relay.view(), provider.pki.clone(), 5));
    let tcp = TcpStream::connect(relay.plain).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let noops = b"NOOP\r\n".repeat(100_000);
        write.write_all(&noops).await.unwrap();
        write.write_all(b"QUIT\r\n").await.unwrap();
        write
    });
    let mut all = Vec::new();
    read.read_to_end(&mut all).await.unwrap();
    let _write = writer.await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("250 2.0.0 OK\r\n").count(), 100_000);
    assert!(text.ends_with("221 2.0.0 Bye\r\n"));
    mailer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_at_the_idle_timeout() {
    let opts = RelayOptions {
        idle_timeout_secs: 1,
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    let mailer = tokio::spawn(well_behaved(relay.view(), provider.pki.clone(), 5));
    let mut tcp = TcpStream::connect(relay.plain).await.unwrap();
    // Write NOOPs and never read: once the relay's replies fill the socket buffers, its write
    // blocks, the idle timeout ends the session, and our writes fail.
    let chunk = b"NOOP\r\n".repeat(10_000);
    let mut written = 0usize;
    while tcp.write_all(&chunk).await.is_ok() {
        written += chunk.len();
        assert!(written < 1 << 30, "the relay kept reading without bound");
    }
    mailer.await.unwrap();
}

#[tokio::test]
async fn a_client_that_does_not_authenticate_in_time_is_closed() {
    let opts = RelayOptions {
        extra_limits_toml: "preauth_timeout_secs = 2".into(),
        ..RelayOptions::default()
    };
    let (_dir, _provider, relay) = setup(opts, "implicit").await;
    let mut c = Client::plain(&relay).await;
    // A byte every half second keeps the idle timeout from firing, not the pre-auth one.
    for b in b"EHL" {
        c.send_raw(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Not authenticated in time, closing connection"
    );
    assert_eq!(c.reply().await, "", "closed");
}

#[tokio::test]
async fn one_address_gets_at_most_its_share_of_connections() {
    let opts = RelayOptions {
        extra_limits_toml: "max_connections_per_ip = 3".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::plain(&relay).await);
    }
    let mut fourth = TcpStream::connect(relay.plain).await.unwrap();
    let wire = read_to_close(&mut fourth).await;
    assert_eq!(
        wire,
        b"421 4.7.0 Too many connections from your address, try again later\r\n"
    );
    // On the implicit-TLS port the refusal is a close, never clear text.
    let mut tls_port = TcpStream::connect(relay.implicit).await.unwrap();
    assert!(read_to_close(&mut tls_port).await.is_empty());
    // Another address is not affected (127.0.0.2 is loopback too, and counted on its own).
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = other.connect(relay.plain).await.unwrap();
    let mut greeting = [0u8; 4];
    other.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 ");
    drop(held);
    drop(provider);
}

#[tokio::test]
async fn a_lasting_token_refusal_costs_one_refresh_for_ten_messages() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    provider.state().auth_reply = Some("535 5.7.3 Authentication unsuccessful".into());
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    let reply = c.cmd("MAIL FROM:<news@example.com>").await;
    assert!(
        reply.starts_with("454")
            && reply.contains("Upstream rejected the account's token (535 5.7.3"),
        "{reply}"
    );
    for _ in 0..9 {
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        let reply = c.login_plain(LOGIN, PASSWORD).await;
        assert!(reply.starts_with("454"), "{reply}");
        assert!(reply.contains("SMTP.Send"), "the hint: {reply}");
    }
    let s = provider.state();
    assert_eq!(
        s.refresh_count, 2,
        "the first token, and one refresh after the first rejection"
    );
    assert_eq!(s.auth_rejected, 2, "two upstream AUTHs for ten sessions");
}

#[tokio::test]
async fn protocol_corners_toward_the_upstream() {
    let (_dir, provider, relay) = setup(RelayOptions::default(), "implicit").await;
    let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
    assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
    // A 421 after the end of data: a temporary failure for the mailer, and a new connection next.
    provider.state().after_data_reply = Some("421 4.3.2 Service shutting down".into());
    let replies = c
        .send_mail("news@example.com", &["a@x.org"], b"one\r\n")
        .await;
    let last = replies.last().unwrap();
    assert!(
        last.starts_with("451 4.4.1 Upstream closed the connection (421 4.3.2"),
        "{replies:?}"
    );
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"two\r\n")
            .await
    ));
    assert_eq!(provider.state().auth_ok, 2);
    // 8-bit content towards a server without 8BITMIME (RFC 6152): refused, not sent.
    provider.state().seven_bit = true;
    provider.state().close_after_message = true;
    assert!(all_ok(
        &c.send_mail("news@example.com", &["a@x.org"], b"three\r\n")
            .await
    ));
    assert_eq!(
        c.cmd("MAIL FROM:<news@example.com> BODY=8BITMIME").await,
        "554 5.6.3 The upstream does not accept 8-bit content (no 8BITMIME); send it 7-bit encoded"
    );
    assert_eq!(provider.state().messages.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_finishes_frees_its_slot() {
    let opts = RelayOptions {
        max_connections: 1,
        extra_limits_toml: "tls_handshake_timeout_secs = 1".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "implicit").await;
    // Connects to the implicit-TLS port and says nothing: closed after the handshake timeout.
    let mut silent = TcpStream::connect(relay.implicit).await.unwrap();
    assert!(read_to_close(&mut silent).await.is_empty());
    // The one connection slot is free again.
    well_behaved(relay.view(), provider.pki.clone(), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_outlive_the_preauth_deadline() {
    let opts = RelayOptions {
        extra_limits_toml: "preauth_timeout_secs = 2".into(),
        ..RelayOptions::default()
    };
    let (_dir, _provider, relay) = setup(opts, "implicit").await;
    let mut tcp = TcpStream::connect(relay.plain).await.unwrap();
    // A megabyte of NOOPs, replies never read: the relay's writes block, and the pre-auth deadline
    // (not the 300 s idle timeout) ends the session, so our writes start failing.
    let noops = b"NOOP\r\n".repeat(200_000);
    let started = std::time::Instant::now();
    let _ = tcp.write_all(&noops).await;
    let mut sink = [0u8; 1 << 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while tcp.write_all(&noops[..6000]).await.is_ok() {}
    })
    .await;
    let _ = tcp.read(&mut sink).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "cut off at the pre-auth deadline, not the idle timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_login_that_keeps_failing_is_refused_from_that_address_and_spraying_locks_the_address() {
    let opts = RelayOptions {
        extra_limits_toml: "auth_failures_per_login = 4\nauth_failures_per_ip = 8".into(),
        ..RelayOptions::default()
    };
    let (_dir, provider, relay) = setup(opts, "starttls").await;
    let attacker: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let connect =
        |ip| Client::connect_from(relay.starttls, Some(ip), Conn::StartTls, &provider.pki);
    let greeting = |ip| async move {
        let mut tcp = connect_tcp(relay.starttls, Some(ip)).await;
        let mut line = vec![0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut line)
            .await
            .unwrap();
        String::from_utf8_lossy(&line[..n]).to_string()
    };
    const LOCKED: &str = "421 4.7.0 too many failed logins, try again later";
    // A session that opened before the lockout.
    let mut early = connect(attacker).await;
    // What Python's smtplib does with a wrong password: PLAIN, then LOGIN with the same one. One
    // mistake, counted once.
    let mut c = connect(attacker).await;
    assert!(c
        .login_plain(LOGIN, "wrong-0")
        .await
        .starts_with("535 5.7.8"));
    assert!(c
        .login_login(LOGIN, "wrong-0")
        .await
        .starts_with("535 5.7.8"));
    assert!(c
        .login_plain(LOGIN, "wrong-1")
        .await
        .starts_with("535 5.7.8"));
    // Two more wrong passwords reach auth_failures_per_login = 4.
    let mut c = connect(attacker).await;
    for n in 2..4 {
        let reply = c.login_plain(LOGIN, &format!("wrong-{n}")).await;
        assert!(reply.starts_with("535 5.7.8"), "failure {n}: {reply}");
    }
    // That login from that address is refused at AUTH, even with its password...
    assert_eq!(early.login_plain(LOGIN, PASSWORD).await, LOCKED);
    // ... but the address still gets its greeting, and other logins are only told they are wrong.
    assert!(greeting(attacker).await.starts_with("220 "));
    let mut c = connect(attacker).await;
    assert!(c
        .login_plain("someone-else", "pw")
        .await
        .starts_with("535 5.7.8"));
    // The same login from another address logs in.
    let mut c = connect(other).await;
    assert_eq!(
        c.login_plain(LOGIN, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    // Guessing across logins: 4 + 1 failures so far, 3 more reach auth_failures_per_ip = 8.
    let mut c = connect(attacker).await;
    for n in 0..3 {
        let reply = c.login_plain(&format!("guess-{n}"), "pw").await;
        assert!(reply.starts_with("535 5.7.8"), "guess {n}: {reply}");
    }
    assert_eq!(greeting(attacker).await, format!("{LOCKED}\r\n"));
    assert!(greeting(other).await.starts_with("220 "));
    // The operator lifts both (`xoauth-relay unlock 127.0.0.1`): the address logs in again.
    let unlocked = admin(
        &relay,
        xoauth_relay::control::wire::Request::Unlock {
            address: Some("127.0.0.1".into()),
        },
    )
    .await;
    assert!(unlocked.ok, "{}", unlocked.text);
    assert_eq!(unlocked.text, "127.0.0.1 unlocked\n");
    let mut again = connect(attacker).await;
    assert_eq!(
        again.login_plain(LOGIN, PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    relay.stop().await;
}

/// What the upstream must end up with for a DATA stream, written from RFC 5321 alone: the body
/// ends at the first exact CRLF.CRLF, a line-start dot is unstuffed, and every CR or LF that is not
/// part of a CRLF pair reaches the upstream as CRLF.
fn upstream_body(wire: &[u8]) -> Vec<u8> {
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(wire);
    let end = stream.windows(5).position(|w| w == b"\r\n.\r\n").unwrap();
    let content = &stream[2..end + 2];
    let mut body = Vec::new();
    for (i, &b) in content.iter().enumerate() {
        let line_start = i == 0 || (i >= 2 && &content[i - 2..i] == b"\r\n");
        if !(line_start && b == b'.') {
            body.push(b);
        }
    }
    let mut out = Vec::new();
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\r' if body.get(i + 1) == Some(&b'\n') => out.push(b'\r'),
            b'\n' if i > 0 && body[i - 1] == b'\r' => out.push(b'\n'),
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            _ => out.push(b),
        }
    }
    out
}

/// The line ends that smuggled a second message through other relays: none of them ends DATA
/// here, in direct or queue mode; the upstream gets one transaction with all of it, and with
/// `bare_line_endings = "reject"` the message is refused and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_crlf_dot_crlf_ends_a_message_so_nothing_is_smuggled() {
    let variants: [&[u8]; 7] = [
        b"\r\n.\r\r\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\rX",
        b"\r.\r\n",
    ];
    for (mode, extra) in [("direct", ""), ("queue", "delivery = \"queue\"")] {
        let opts = RelayOptions {
            extra_accounts_toml: extra.into(),
            ..RelayOptions::default()
        };
        let (_dir, provider, relay) = setup(opts, "implicit").await;
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
        for (n, variant) in variants.iter().enumerate() {
            let mut wire = b"hello".to_vec();
            wire.extend_from_slice(variant);
            wire.extend_from_slice(
                b"MAIL FROM:<d@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            assert!(c
                .cmd("MAIL FROM:<news@example.com>")
                .await
                .starts_with("250"));
            assert!(c.cmd("RCPT TO:<a@x.org>").await.starts_with("250"));
            assert!(c.cmd("DATA").await.starts_with("354"));
            c.send_raw(&wire).await;
            c.send_raw(b"NOOP\r\n").await;
            let end = c.reply().await;
            assert!(end.starts_with("250 2.0.0"), "{mode} {variant:?}: {end}");
            assert_eq!(c.reply().await, "250 2.0.0 OK", "{mode} {variant:?}");
            provider.until(|s| s.messages.len() > n).await;
            let s = provider.state();
            assert_eq!(
                s.messages.len(),
                n + 1,
                "{mode} {variant:?}: one transaction"
            );
            let m = s.messages.last().unwrap();
            assert_eq!(m.rcpts, ["a@x.org"], "{mode} {variant:?}");
            assert_eq!(
                String::from_utf8_lossy(&m.body),
                String::from_utf8_lossy(&upstream_body(&wire)),
                "{mode} {variant:?}"
            );
        }
        assert!(!provider
            .state()
            .messages
            .iter()
            .any(|m| m.rcpts.iter().any(|r| r.contains("victim"))));
        relay.stop().await;
    }

    // Refused instead, with the session open for the next message.
    for extra in ["", "delivery = \"queue\""] {
        let opts = RelayOptions {
            extra_accounts_toml: extra.into(),
            extra_limits_toml: "bare_line_endings = \"reject\"".into(),
            ..RelayOptions::default()
        };
        let (_dir, provider, relay) = setup(opts, "implicit").await;
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
        for variant in variants {
            assert!(c
                .cmd("MAIL FROM:<news@example.com>")
                .await
                .starts_with("250"));
            assert!(c.cmd("RCPT TO:<a@x.org>").await.starts_with("250"));
            assert!(c.cmd("DATA").await.starts_with("354"));
            let mut wire = b"hello".to_vec();
            wire.extend_from_slice(variant);
            wire.extend_from_slice(b"more\r\n.\r\n");
            c.send_raw(&wire).await;
            assert_eq!(
                c.reply().await,
                "554 5.5.2 Bare CR or LF in the message; lines must end with CRLF",
                "{extra} {variant:?}"
            );
        }
        let replies = c
            .send_mail("news@example.com", &["a@x.org"], b"clean\r\n")
            .await;
        assert!(all_ok(&replies), "{replies:?}");
        provider.until(|s| !s.messages.is_empty()).await;
        assert_eq!(provider.state().messages.len(), 1, "only the clean one");
        relay.stop().await;
    }
}

/// `<postmaster>` is an address (RFC 5321 §4.5.1), never the null sender: it reaches the upstream
/// as written, as sender and as recipient, in both modes; only `<>` is the null sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_reaches_the_upstream_as_postmaster_and_only_angle_brackets_are_null() {
    for extra in ["", "delivery = \"queue\""] {
        let opts = RelayOptions {
            extra_accounts_toml: extra.into(),
            ..RelayOptions::default()
        };
        let (_dir, provider, relay) = setup(opts, "implicit").await;
        let mut c = Client::connect(&relay, Conn::Implicit, &provider.pki).await;
        assert!(c.login_plain(LOGIN, PASSWORD).await.starts_with("235"));
        for (from, rcpt) in [("postmaster", "Postmaster"), ("", "a@x.org")] {
            let replies = c.send_mail(from, &[rcpt], b"hi\r\n").await;
            assert!(all_ok(&replies), "{extra}: {replies:?}");
        }
        provider.until(|s| s.messages.len() == 2).await;
        let mut seen: Vec<(String, Vec<String>)> = provider
            .state()
            .messages
            .iter()
            .map(|m| {
                // Queue mode adds SIZE=.
                let from = m.mail_from.split(' ').next().unwrap().to_string();
                (from, m.rcpts.clone())
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("<>".to_string(), vec!["a@x.org".to_string()]),
                ("<postmaster>".to_string(), vec!["Postmaster".to_string()]),
            ],
            "{extra}"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_client_on_the_wrong_kind_of_port_is_named_in_the_log() {
    let opts = RelayOptions {
        extra_limits_toml: "tls_handshake_timeout_secs = 1".into(),
        ..RelayOptions::default()
    };
    let (_dir, _provider, relay) = setup(opts, "starttls").await;
    let (logs, _guard) = LogCapture::install();
    // A TLS client on the STARTTLS port: its ClientHello is not answered as commands.
    {
        let mut tcp = connect_tcp(relay.starttls, None).await;
        let hello = [
            0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
        ];
        tcp.write_all(&hello).await.unwrap();
        let mut seen = String::new();
        tcp.read_to_string(&mut seen).await.unwrap();
        assert!(seen.starts_with("220 "), "{seen}");
        assert!(
            !seen.contains("501"),
            "no replies to the handshake bytes: {seen}"
        );
        // (The tests' relays let the system pick ports: the log names the port where one is set.)
        let expected =
            "client started TLS on a STARTTLS port; use the implicit TLS port or STARTTLS";
        assert!(logs.text().contains(expected), "{}", logs.text());
    }
    // A plain or STARTTLS client on the implicit-TLS port waits for a greeting that never comes.
    let mut tcp = connect_tcp(relay.implicit, None).await;
    let mut seen = Vec::new();
    tcp.read_to_end(&mut seen).await.unwrap();
    assert!(
        seen.is_empty(),
        "nothing in clear text on the implicit-TLS port"
    );
    assert!(
        logs.text()
            .contains("no TLS handshake: a STARTTLS or plain client on the implicit-TLS port?"),
        "{}",
        logs.text()
    );
    // One that speaks first, in clear text.
    let mut tcp = connect_tcp(relay.implicit, None).await;
    tcp.write_all(b"EHLO mailer.test\r\n").await.unwrap();
    let mut seen = Vec::new();
    let _ = tcp.read_to_end(&mut seen).await;
    assert!(
        logs.text().contains(
            "plain-text SMTP on the implicit-TLS port: set the mailer to SSL/TLS, or point it at the STARTTLS port"
        ),
        "{}",
        logs.text()
    );
}

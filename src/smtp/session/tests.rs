use super::*;
use crate::smtp::body::BodyEncoder;

fn session(tls: bool) -> Session {
    Session::new(SessionConfig {
        hostname: "relay.test".into(),
        tls_active: tls,
        starttls_available: true,
        implicit_tls_port: Some(465),
        plaintext_auth_allowed: false,
        max_message_bytes: 100,
        max_recipients: 2,
        max_errors: 10,
        reject_bare_line_endings: false,
    })
}

/// Feeds `input`, answers upstream actions with `upstream`, and returns the replies' first lines.
fn run(
    s: &mut Session,
    input: &str,
    upstream: &mut dyn FnMut(&Action) -> Option<Reply>,
) -> Vec<String> {
    s.push_input(input.as_bytes());
    let mut seen = Vec::new();
    while let Some(action) = s.next_action() {
        match &action {
            Action::Reply(r) => seen.push(r.summary()),
            Action::Authenticate { login, password } => {
                let ok = login == "news" && password.expose() == "pw";
                s.auth_result(if ok {
                    AuthOutcome::Ok(Authorized {
                        account: "news".into(),
                        allowed_senders: Some(vec!["*@example.com".into()]),
                    })
                } else {
                    AuthOutcome::BadCredentials
                });
            }
            // Chunk boundaries are the session's business: the body is what counts.
            Action::BodyChunk(c) => {
                let text = String::from_utf8_lossy(c.bytes());
                match seen.last_mut() {
                    Some(last) if last.starts_with("chunk:") => last.push_str(&text),
                    _ => seen.push(format!("chunk:{text}")),
                }
            }
            Action::StartTls => {
                seen.push("starttls".into());
                s.tls_started();
            }
            other => {
                if let Some(r) = upstream(other) {
                    s.upstream_reply(r);
                } else {
                    seen.push(format!("{other:?}"));
                }
            }
        }
    }
    seen
}

fn accept_all(a: &Action) -> Option<Reply> {
    match a {
        Action::Mail { .. } | Action::Rcpt { .. } => Some(Reply::new(250, "2.1.0 OK")),
        Action::Data => Some(Reply::new(354, "go")),
        Action::EndOfData => Some(Reply::new(250, "2.0.0 queued")),
        _ => None,
    }
}

#[test]
fn auth_requires_tls_and_mail_requires_auth() {
    let mut s = session(false);
    let r = run(
        &mut s,
        "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\n",
        &mut accept_all,
    );
    assert!(r[0].starts_with("250 "), "{r:?}");
    assert!(r[1].starts_with("538 5.7.11"), "{r:?}");
    assert!(r[1].ends_with("use STARTTLS or port 465"), "{r:?}");
    assert!(r[2].starts_with("530 5.7.0"), "{r:?}");
}

#[test]
fn starttls_discards_pipelined_commands_and_resets_ehlo() {
    let mut s = session(false);
    let r = run(
        &mut s,
        "EHLO x\r\nSTARTTLS\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
        &mut accept_all,
    );
    assert_eq!(r[1], "220 2.0.0 Ready to start TLS");
    assert_eq!(r[2], "starttls");
    assert_eq!(r.len(), 3, "pipelined AUTH must be discarded: {r:?}");
    let r = run(&mut s, "AUTH PLAIN AG5ld3MAcHc=\r\n", &mut accept_all);
    assert_eq!(r[0], "503 5.5.1 Send EHLO first");
}

#[test]
fn full_transaction_with_limits_and_sender_policy() {
    let mut s = session(true);
    let r = run(
            &mut s,
            "EHLO x\r\nAUTH LOGIN\r\nbmV3cw==\r\ncHc=\r\nMAIL FROM:<a@other.org>\r\nMAIL FROM:<a@example.com> SIZE=500\r\n\
             MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n\
             ..leading\r\nline\r\n.\r\n",
            &mut accept_all,
        );
    let expect = [
        "250 relay.test greets x",
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "235 2.7.0 Authentication successful",
        "550 5.7.1 Sender <a@other.org> is not allowed for account news",
        "552 5.3.4 Message size exceeds the limit of 100 bytes",
        "250 2.1.0 OK",
        "250 2.1.0 OK",
        "250 2.1.0 OK",
        "452 4.5.3 Too many recipients",
        "354 Start mail input; end with <CRLF>.<CRLF>",
        "chunk:.leading\r\nline\r\n",
        "250 2.0.0 queued",
    ];
    assert_eq!(r, expect);
}

#[test]
fn body_split_anywhere_is_unstuffed_the_same() {
    let body = ".a\r\n..b\r\nc\n.d\r\n\r\n";
    let wire = format!("{body}.\r\n");
    for split in 0..wire.len() {
        let mut s = session(true);
        run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
        let mut got = String::new();
        let mut end = false;
        for part in [&wire[..split], &wire[split..]] {
            for item in run(&mut s, part, &mut accept_all) {
                if let Some(c) = item.strip_prefix("chunk:") {
                    got.push_str(c);
                } else if item.starts_with("250 2.0.0") {
                    end = true;
                }
            }
        }
        assert!(end, "split {split}");
        assert_eq!(got, "a\r\n.b\r\nc\n.d\r\n\r\n", "split {split}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
    /// Whatever the reads, the body handed on is RFC 5321's decoding (a reference written from
    /// the RFC, not the decoder under test), one end of data ends it, the upstream gets the
    /// encoding of that body, and with `reject_bare_line_endings` a body with a bare CR or LF
    /// is refused instead.
    #[test]
    fn the_session_decodes_as_rfc_5321_says_and_the_upstream_gets_the_encoding(
        wire in crate::smtp::data::tests::wire_strategy(),
        reads in proptest::collection::vec(1usize..300, 1..8),
        reject in proptest::prelude::any::<bool>(),
    ) {
        // What follows the first end of data is commands (junk ones, mostly).
        let mut wire = wire;
        wire.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (expected, _, taken) = crate::smtp::data::tests::reference(&wire);
        let bare = crate::smtp::data::tests::has_bare_line_ending(&wire[..taken - 3]);
        let mut s = Session::new(SessionConfig {
            max_message_bytes: 1 << 20,
            reject_bare_line_endings: reject,
            ..session(true).config
        });
        run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
        let (mut body, mut sent, mut ends, mut aborted) = (Vec::new(), Vec::new(), 0, false);
        let mut replies = Vec::new();
        let mut encoder = BodyEncoder::default();
        let mut rest = wire.as_slice();
        let mut sizes = reads.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).min(rest.len());
            s.push_input(&rest[..n]);
            rest = &rest[n..];
            while let Some(action) = s.next_action() {
                match action {
                    Action::BodyChunk(c) => {
                        body.extend_from_slice(c.bytes());
                        match encoder.as_is(&c) {
                            Some(bytes) => sent.extend_from_slice(bytes),
                            None => encoder.encode(c.bytes(), &mut sent),
                        }
                    }
                    Action::EndOfData => {
                        ends += 1;
                        s.upstream_reply(Reply::new(250, "2.0.0 ok"));
                    }
                    Action::AbortTransaction => aborted = true,
                    Action::Reply(r) => replies.push(r.summary()),
                    _ => {}
                }
            }
        }
        sent.extend_from_slice(encoder.finish());
        if reject && bare {
            proptest::prop_assert_eq!(ends, 0);
            proptest::prop_assert!(aborted);
            proptest::prop_assert_eq!(
                &replies[0],
                "554 5.5.2 Bare CR or LF in the message; lines must end with CRLF"
            );
        } else {
            proptest::prop_assert_eq!(ends, 1);
            proptest::prop_assert!(!aborted);
            let mut once = BodyEncoder::default();
            let mut encoded = Vec::new();
            once.encode(&expected, &mut encoded);
            encoded.extend_from_slice(once.finish());
            proptest::prop_assert_eq!(&body, &expected);
            proptest::prop_assert_eq!(&sent, &encoded);
            proptest::prop_assert_eq!(&replies[0], "250 2.0.0 ok");
        }
    }
}

#[test]
fn a_body_line_without_end_is_not_held_beyond_the_wait_limit() {
    let mut s = Session::new(SessionConfig {
        max_message_bytes: 1 << 20,
        ..session(true).config
    });
    run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
    let line = "z".repeat(100_000);
    let mut body = String::new();
    for piece in line.as_bytes().chunks(4096) {
        for item in run(&mut s, std::str::from_utf8(piece).unwrap(), &mut accept_all) {
            body.push_str(item.strip_prefix("chunk:").unwrap_or(""));
        }
        assert!(s.buffered() < BODY_LINE_WAIT, "{}", s.buffered());
    }
    let r = run(&mut s, "\r\n.\r\n", &mut accept_all);
    body.push_str(r[0].strip_prefix("chunk:").unwrap_or(""));
    assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
    assert_eq!(body, format!("{line}\r\n"));
}

#[test]
fn quoted_addresses_and_unsupported_parameters_are_refused() {
    let mut s = session(true);
    let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<\"ceo@corp.com> ENVID=x\"@example.com>\r\n\
             MAIL FROM:<a@example.com> RET=HDRS\r\nMAIL FROM:<a@example.com> REQUIRETLS\r\n\
             MAIL FROM:<a@example.com> AUTH=<>\r\nRCPT TO:<b@x> NOTIFY=NEVER\r\nRCPT TO:<\"b c\"@x>\r\nRCPT TO:<b@x>\r\n",
            &mut accept_all,
        );
    assert!(r[2].starts_with("553 5.1.7"), "{r:?}");
    assert!(r[3].starts_with("555 5.5.4"), "{r:?}");
    assert!(r[4].starts_with("555 5.5.4 REQUIRETLS"), "{r:?}");
    assert_eq!(
        r[5], "250 2.1.0 OK",
        "AUTH= is part of the advertised AUTH extension"
    );
    assert!(r[6].starts_with("555 5.5.4"), "{r:?}");
    assert!(r[7].starts_with("553 5.1.3"), "{r:?}");
    assert_eq!(r[8], "250 2.1.0 OK");
}

#[test]
fn empty_body_and_oversized_body() {
    let mut s = session(true);
    let pre = "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n";
    let r = run(&mut s, &format!("{pre}.\r\n"), &mut accept_all);
    assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
    let big = "x".repeat(150);
    let r = run(
        &mut s,
        &format!("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n{big}\r\n.\r\nNOOP\r\n"),
        &mut accept_all,
    );
    assert!(r.iter().any(|l| l == "AbortTransaction"), "{r:?}");
    assert_eq!(
        r[r.len() - 2],
        "552 5.3.4 Message size exceeds the limit of 100 bytes"
    );
    assert_eq!(r[r.len() - 1], "250 2.0.0 OK");
}

#[test]
fn rcpts_and_data_behind_mail_are_offered_for_pipelining() {
    let mut s = session(true);
    run(
        &mut s,
        "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
        &mut accept_all,
    );
    s.push_input(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nRCPT TO:<\"q q\"@x>\r\nDATA\r\n");
    let Some(Action::Mail { ahead, .. }) = s.next_action() else {
        panic!("MAIL expected");
    };
    // The quoted address would be refused by the session, so nothing from it on goes ahead.
    assert_eq!(
        ahead,
        Ahead {
            rcpts: vec!["b@x".into()],
            data: false
        }
    );
    let mut s = session(true);
    run(
        &mut s,
        "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
        &mut accept_all,
    );
    s.push_input(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n",
    );
    let Some(Action::Mail { ahead, .. }) = s.next_action() else {
        panic!("MAIL expected");
    };
    // At most max_recipients (2) go ahead; DATA waits for the third RCPT's local refusal.
    assert_eq!(
        ahead,
        Ahead {
            rcpts: vec!["b@x".into(), "c@x".into()],
            data: false
        }
    );
}

#[test]
fn postmaster_is_a_recipient_and_never_a_null_sender() {
    let mut s = session(true);
    let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<Postmaster>\r\n",
            &mut |a| {
                if let Action::Rcpt { to } = a {
                    Some(Reply::new(250, format!("2.1.5 {to}")))
                } else {
                    accept_all(a)
                }
            },
        );
    assert_eq!(r[3], "250 2.1.5 postmaster", "{r:?}");
    assert_eq!(r[4], "250 2.1.5 Postmaster", "{r:?}");
    let mut s = session(true);
    s.auth = Some(Authorized {
        account: "news".into(),
        allowed_senders: None,
    });
    let mut senders = Vec::new();
    run(
            &mut s,
            "EHLO x\r\nMAIL FROM:<postmaster@example.com>\r\nRSET\r\nMAIL FROM:<postmaster>\r\nRSET\r\n\
             MAIL FROM:<PostMaster>\r\nRSET\r\nMAIL FROM:<>\r\n",
            &mut |a| {
                if let Action::Mail { from, .. } = a {
                    senders.push(from.clone());
                }
                accept_all(a)
            },
        );
    // Only the literal <> is the null sender.
    assert_eq!(
        senders,
        ["postmaster@example.com", "postmaster", "PostMaster", ""]
    );
}

#[test]
fn errors_end_the_session_at_the_limit_and_a_delivered_message_resets_the_count() {
    let mut s = session(true);
    let r = run(&mut s, &"FOO\r\n".repeat(9), &mut accept_all);
    assert_eq!(r.len(), 9);
    let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n",
            &mut accept_all,
        );
    assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
    let r = run(&mut s, &"FOO\r\n".repeat(10), &mut accept_all);
    assert_eq!(r[9], "500 5.5.1 Unknown command");
    assert_eq!(r[10], "421 4.7.0 Too many errors, closing connection");
    assert_eq!(r.last().unwrap(), "Close");
    assert!(s.is_closed());
}

#[test]
fn errors_and_long_lines() {
    let mut s = session(true);
    let long = "A".repeat(MAX_LINE + 10);
    let r = run(
            &mut s,
            &format!("FOO\r\n{long}\r\nNOOP\r\nRCPT TO:<a@b>\r\nEHLO x\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN AG5ld3MAbm8=\r\nVRFY x\r\nQUIT\r\n"),
            &mut accept_all,
        );
    assert_eq!(r[0], "500 5.5.1 Unknown command");
    assert_eq!(r[1], "500 5.5.6 Line too long");
    assert_eq!(r[2], "250 2.0.0 OK");
    assert_eq!(r[3], "503 5.5.1 Need MAIL before RCPT");
    assert_eq!(r[5], "501 5.5.2 Invalid base64 data");
    assert!(r[6].starts_with("504 5.5.4"));
    assert_eq!(r[7], "535 5.7.8 Authentication credentials invalid");
    assert!(r[8].starts_with("252 2.5.0"));
    assert_eq!(r[9], "221 2.0.0 Bye");
    assert!(s.is_closed());
}

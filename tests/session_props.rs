//! Property test of the SMTP session state machine: random command streams, split at random
//! places, answered at random by a pretend upstream. Whatever arrives, the session must not panic,
//! keep its buffer bounded, write only well-formed replies, never open DATA without an accepted
//! recipient, and never pass MAIL on before a successful AUTH.

use proptest::prelude::*;
use xoauth_relay::smtp::session::{
    Action, AuthOutcome, Authorized, Session, SessionConfig, MAX_LINE,
};
use xoauth_relay::smtp::Reply;

/// A piece of what a mailer (or an attacker) might send.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let fixed = prop_oneof![
        Just(b"EHLO client.example\r\n".to_vec()),
        Just(b"HELO client.example\r\n".to_vec()),
        Just(b"AUTH PLAIN AG5ld3MAcHc=\r\n".to_vec()),
        Just(b"AUTH PLAIN AG5ld3MAd3Jvbmc=\r\n".to_vec()),
        Just(b"AUTH LOGIN\r\nbmV3cw==\r\ncHc=\r\n".to_vec()),
        Just(b"AUTH PLAIN\r\n*\r\n".to_vec()),
        Just(b"MAIL FROM:<a@example.com>\r\n".to_vec()),
        Just(b"MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=10\r\n".to_vec()),
        Just(b"MAIL FROM:<>\r\n".to_vec()),
        Just(b"RCPT TO:<b@example.org>\r\n".to_vec()),
        Just(b"RCPT TO:<postmaster>\r\n".to_vec()),
        Just(b"RCPT TO:<\"q q\"@x>\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"Subject: hi\r\n\r\nbody line\r\n".to_vec()),
        Just(b"..dotted\r\n".to_vec()),
        Just(b".\r\n".to_vec()),
        Just(b"\n.\n".to_vec()),
        Just(b"RSET\r\n".to_vec()),
        Just(b"NOOP\r\n".to_vec()),
        Just(b"STARTTLS\r\n".to_vec()),
        Just(b"QUIT\r\n".to_vec()),
        Just(b"EHLO a\0b\r\n".to_vec()),
        Just(b"\n\n\n\n".to_vec()),
        Just(vec![b'A'; MAX_LINE + 100]),
    ];
    prop_oneof![
        8 => fixed,
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

/// How the pretend upstream answers.
fn upstream_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(250),
        Just(250),
        Just(354),
        Just(421),
        Just(451),
        Just(550),
        Just(503)
    ]
}

fn check_reply(reply: &Reply) {
    let wire = reply.to_bytes();
    for line in wire.split_inclusive(|b| *b == b'\n') {
        assert!(line.len() <= 512, "reply line over 512 octets");
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF");
        assert!(line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(matches!(line.get(3), Some(b' ' | b'-') | Some(b'\r')));
        let text = &line[4.min(line.len() - 2)..line.len() - 2];
        assert!(
            !text.iter().any(|b| *b < 0x20),
            "control byte in a reply: {line:?}"
        );
    }
    assert!((200..600).contains(&reply.code));
    if reply.code >= 400 {
        assert!(
            reply.enhanced().is_some(),
            "error without enhanced code: {reply:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_session_holds_its_rules_whatever_arrives(
        pieces in proptest::collection::vec(piece(), 1..40),
        splits in proptest::collection::vec(1usize..64, 1..40),
        answers in proptest::collection::vec(upstream_code(), 64),
        tls in any::<bool>(),
    ) {
        let mut s = Session::new(SessionConfig {
            hostname: "relay.test".into(),
            tls_active: tls,
            starttls_available: true,
            implicit_tls_port: None,
            plaintext_auth_allowed: false,
            max_message_bytes: 1000,
            max_recipients: 3,
            max_errors: 10,
            reject_bare_line_endings: tls,
        });
        let stream: Vec<u8> = pieces.concat();
        let mut answer = answers.iter().cycle();
        let mut authenticated = false;
        let mut mail_accepted = false;
        let mut accepted_rcpts = 0usize;
        let mut at = 0;
        let mut split = splits.iter().cycle();
        while at < stream.len() && !s.is_closed() {
            let end = (at + split.next().unwrap()).min(stream.len());
            s.push_input(&stream[at..end]);
            at = end;
            while let Some(action) = s.next_action() {
                match action {
                    Action::Reply(r) => check_reply(&r),
                    Action::StartTls => {
                        authenticated = false;
                        mail_accepted = false;
                        accepted_rcpts = 0;
                        s.tls_started();
                    }
                    Action::Authenticate { password, .. } => {
                        if password.expose() == "pw" {
                            authenticated = true;
                            s.auth_result(AuthOutcome::Ok(Authorized {
                                account: "news".into(),
                                allowed_senders: None,
                            }));
                        } else {
                            s.auth_result(AuthOutcome::BadCredentials);
                        }
                    }
                    Action::Mail { .. } => {
                        prop_assert!(authenticated, "MAIL passed on before AUTH");
                        let code = *answer.next().unwrap();
                        let code = if code == 354 { 250 } else { code };
                        mail_accepted = code == 250;
                        accepted_rcpts = 0;
                        s.upstream_reply(Reply::new(code, format!("{}.0.0 mail", code / 100)));
                    }
                    Action::Rcpt { .. } => {
                        prop_assert!(mail_accepted, "RCPT passed on without an accepted MAIL");
                        let code = *answer.next().unwrap();
                        let code = if code == 354 { 250 } else { code };
                        if code == 250 {
                            accepted_rcpts += 1;
                        }
                        s.upstream_reply(Reply::new(code, format!("{}.1.5 rcpt", code / 100)));
                    }
                    Action::Data => {
                        prop_assert!(accepted_rcpts > 0, "DATA without an accepted recipient");
                        let code = if *answer.next().unwrap() == 451 { 451 } else { 354 };
                        s.upstream_reply(Reply::new(code, "go ahead"));
                    }
                    Action::EndOfData => {
                        mail_accepted = false;
                        accepted_rcpts = 0;
                        s.upstream_reply(Reply::new(250, "2.0.0 queued"));
                    }
                    Action::Reset | Action::AbortTransaction => {
                        mail_accepted = false;
                        accepted_rcpts = 0;
                    }
                    Action::BodyChunk(_) | Action::Close => {}
                }
            }
            prop_assert!(s.buffered() <= MAX_LINE + 64, "input buffer grew to {}", s.buffered());
        }
    }
}

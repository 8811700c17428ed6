//! The mailer-facing session fed arbitrary bytes in arbitrary pieces, every upstream step accepted:
//! it must not panic, and its input buffer must stay bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth_relay::smtp::session::{
    Action, AuthOutcome, Authorized, Session, SessionConfig, MAX_LINE,
};
use xoauth_relay::smtp::Reply;

fuzz_target!(|data: &[u8]| {
    let mut s = Session::new(SessionConfig {
        hostname: "fuzz".into(),
        tls_active: true,
        starttls_available: true,
        implicit_tls_port: None,
        plaintext_auth_allowed: false,
        max_message_bytes: 4096,
        max_recipients: 5,
        max_errors: 50,
        reject_bare_line_endings: data.first().is_some_and(|b| b & 0x80 != 0),
    });
    // The first byte sets the piece size, so the fuzzer explores splits too.
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    for piece in rest.chunks(usize::from(size).max(1)) {
        s.push_input(piece);
        while let Some(action) = s.next_action() {
            match action {
                Action::Authenticate { .. } => s.auth_result(AuthOutcome::Ok(Authorized {
                    account: "fuzz".into(),
                    allowed_senders: None,
                })),
                Action::StartTls => s.tls_started(),
                Action::Mail { .. } | Action::Rcpt { .. } | Action::EndOfData => {
                    s.upstream_reply(Reply::new(250, "2.0.0 ok"))
                }
                Action::Data => s.upstream_reply(Reply::new(354, "go")),
                Action::Reply(r) => {
                    assert!(r.to_bytes().split(|b| *b == b'\n').all(|l| l.len() <= 512))
                }
                _ => {}
            }
        }
        assert!(s.buffered() <= MAX_LINE + usize::from(size).max(1));
    }
});

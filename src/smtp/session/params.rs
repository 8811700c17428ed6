//! What a command's arguments may be: addresses the relay can write back upstream as they are,
//! the parameters of extensions it offers, senders an account may use.

use smtp_proto::{Request, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};

use crate::smtp::Reply;

/// smtp-proto hands back an empty address for `<postmaster>` (RFC 5321 §4.5.1), as for the null
/// sender `<>`. Only the literal `<>` is the null sender: `postmaster` gets its name back, as the
/// mailer wrote it, and any other written address that came back empty is refused rather than
/// turned into `<>` upstream.
pub(super) fn written_address(
    request: Request<String>,
    line: &[u8],
) -> Result<Request<String>, Reply> {
    let written = || {
        let text = String::from_utf8_lossy(line);
        text.split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(inner, _)| inner.to_string())
            .unwrap_or_default()
    };
    let restore = |address: &mut String, code: &str| {
        let inner = written();
        if inner.eq_ignore_ascii_case("postmaster") {
            *address = inner;
            Ok(())
        } else if inner.is_empty() {
            Ok(())
        } else {
            Err(Reply::new(
                553,
                format!("{code} Address syntax not understood"),
            ))
        }
    };
    match request {
        Request::Mail { mut from } if from.address.is_empty() => {
            restore(&mut from.address, "5.1.7")?;
            Ok(Request::Mail { from })
        }
        Request::Rcpt { mut to } if to.address.is_empty() => {
            restore(&mut to.address, "5.1.3")?;
            Ok(Request::Rcpt { to })
        }
        other => Ok(other),
    }
}

/// NUL, bare CR and the other C0 controls (and DEL) have no place in a command line.
pub(super) fn has_control(line: &[u8]) -> bool {
    line.iter().any(|b| *b < 0x20 || *b == 0x7f)
}

/// The address of a RCPT the relay forwards, or the refusal.
pub(super) fn rcpt_address(to: smtp_proto::RcptTo<String>) -> Result<String, Reply> {
    if to.orcpt.is_some() || to.flags != 0 || to.rrvs != 0 {
        Err(Reply::new(
            555,
            "5.5.4 RCPT parameters (NOTIFY, ORCPT, RRVS) are not supported",
        ))
    } else if to.address.is_empty() || !plain_address(&to.address) {
        Err(Reply::new(
            553,
            "5.1.3 Recipient address must not need quoting (no spaces, quotes, <, >, \\)",
        ))
    } else {
        Ok(to.address)
    }
}

/// Whether `address` can be written back between angle brackets as it is. smtp-proto removes the
/// quotes of a quoted local part, so an address that needed them (spaces, `>`, ...) could smuggle
/// parameters into the upstream's MAIL/RCPT line; such addresses are refused instead.
pub(super) fn plain_address(address: &str) -> bool {
    address
        .chars()
        .all(|c| !c.is_control() && !c.is_whitespace() && !matches!(c, '<' | '>' | '"' | '\\'))
}

/// The first MAIL parameter of an extension the relay does not advertise (RFC 5321 §4.1.1.11:
/// refuse rather than drop, which would silently lose e.g. REQUIRETLS).
pub(super) fn unsupported_mail_param(from: &smtp_proto::MailFrom<String>) -> Option<&'static str> {
    use smtp_proto::{MAIL_BODY_7BIT, MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS};
    let allowed = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
    if from.flags & MAIL_REQUIRETLS != 0 {
        Some("REQUIRETLS")
    } else if from.flags & MAIL_BODY_BINARYMIME != 0 {
        Some("BODY=BINARYMIME")
    } else if from.flags & !allowed != 0 || from.env_id.is_some() {
        Some("DSN (RET/ENVID)")
    } else if from.trans_id.is_some()
        || from.mtrk.is_some()
        || from.by != 0
        || from.hold_for != 0
        || from.hold_until != 0
        || from.mt_priority != 0
        || from.solicit.is_some()
    {
        Some("this MAIL parameter")
    } else {
        None
    }
}

/// Whether MAIL FROM `sender` matches `allowed` (exact addresses or `*@domain`, case-insensitive);
/// no list means any sender.
pub fn sender_allowed(allowed: Option<&[String]>, sender: &str) -> bool {
    let Some(list) = allowed else {
        return true;
    };
    let sender = sender.to_ascii_lowercase();
    list.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix("*@") {
            Some(domain) => sender.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => pattern == sender,
        }
    })
}

/// At a line start whose first line is not in wire form as it is (a leading dot, a bare CR or LF, the
/// end of data): that line and the ones after it that are not either, which go through the DATA
/// decoder together; `None` while the first line has not fully arrived.
pub(super) fn decoder_run(input: &[u8]) -> Option<usize> {
    let mut end = 0;
    while let Some(lf) = memchr::memchr(b'\n', &input[end..]) {
        end += lf + 1;
        let next = &input[end..];
        match memchr::memchr(b'\n', next) {
            Some(lf) if crate::smtp::body::verbatim_lines(&next[..=lf], false) == 0 => {}
            _ => break,
        }
    }
    (end > 0).then_some(end)
}

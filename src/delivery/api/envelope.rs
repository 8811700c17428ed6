//! The envelope stays exact: both APIs deliver to the addresses in `To`, `Cc` and `Bcc`, not to
//! an SMTP envelope, so the copy that is submitted is made to say what the envelope says.
//!
//! - An envelope recipient the headers do not name is added in one `Bcc:` field (merged with the
//!   message's own; both APIs remove `Bcc` on delivery).
//! - A header address the envelope does not have cannot be left out through these APIs: with
//!   `header_recipients = "refuse"` the message is refused; with `"strip"` the address is taken
//!   out of the copy's field (a field left empty goes).
//!
//! Nothing else changes: fields that need no change keep their bytes, and a message whose header
//! recipients already match the envelope goes out byte for byte.

use base64::Engine;
use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue;

use crate::config::{Account, HeaderRecipients};
use crate::delivery::status::Status;
use crate::observe::Observer;
use crate::smtp::Reply;

/// The longest header section looked at; a longer one is refused (no mail needs it).
pub const MAX_HEADER: usize = 256 * 1024;

/// The end of the header section in `message`: the offset just past its blank line; `None` when
/// `message` ends before one (then it is all header section).
pub fn header_end(message: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < message.len() {
        let line_end = memchr::memchr(b'\n', &message[at..]).map(|i| at + i + 1)?;
        let line = &message[at..line_end];
        if line == b"\r\n" || line == b"\n" {
            return Some(line_end);
        }
        at = line_end;
    }
    None
}

/// What the submitted copy's header section is, or why the message cannot go.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// The header section to send instead of the message's own (the same bytes when nothing
    /// had to change), and whether anything did.
    Send { header: Vec<u8>, changed: bool },
    /// Header addresses that are not envelope recipients (with `refuse`).
    Refuse { extra: Vec<String> },
    /// A `To`/`Cc`/`Bcc` field names more addresses than can be read from it: what the API would
    /// make of it is unknown, so the message does not go (fail closed).
    Unreadable { field: String },
}

/// One field of the header section: its name and its whole text (continuation lines included).
struct Field<'a> {
    name: &'a [u8],
    raw: &'a [u8],
}

fn fields(header: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field> = Vec::new();
    let mut at = 0;
    while at < header.len() {
        let end = memchr::memchr(b'\n', &header[at..]).map_or(header.len(), |i| at + i + 1);
        let line = &header[at..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match (line.first(), out.last_mut()) {
            // A continuation line belongs to the field before it.
            (Some(b' ' | b'\t'), Some(last)) => {
                let start = last.raw.as_ptr() as usize - header.as_ptr() as usize;
                last.raw = &header[start..end];
            }
            _ => {
                let name = line
                    .iter()
                    .position(|b| *b == b':')
                    .map_or(&line[..0], |i| trim(&line[..i]));
                out.push(Field { name, raw: line });
            }
        }
        at = end;
    }
    out
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &s[start..end]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    To,
    Cc,
    Bcc,
}

fn kind(name: &[u8]) -> Option<Kind> {
    [
        (b"to".as_ref(), Kind::To),
        (b"cc", Kind::Cc),
        (b"bcc", Kind::Bcc),
    ]
    .into_iter()
    .find(|(n, _)| name.eq_ignore_ascii_case(n))
    .map(|(_, k)| k)
}

/// An address as written in a header: its display name and address.
#[derive(Clone, Debug)]
struct Named {
    name: Option<String>,
    address: String,
}

/// How many `@` a field value has outside quoted strings and comments: at least how many
/// addresses a reader may find in it.
fn at_signs(value: &[u8]) -> usize {
    let (mut quoted, mut depth, mut escaped, mut n) = (false, 0usize, false, 0);
    for &b in value {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' if depth == 0 => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted => depth = depth.saturating_sub(1),
            b'@' if !quoted && depth == 0 => n += 1,
            _ => {}
        }
    }
    n
}

/// The addresses in a `To`/`Cc`/`Bcc` field (groups flattened); `None` when the field names
/// more than can be read from it.
fn addresses(raw: &[u8]) -> Option<Vec<Named>> {
    let colon = raw
        .iter()
        .position(|b| *b == b':')
        .map_or(raw.len(), |i| i + 1);
    let mut value = raw[colon..].to_vec();
    if !value.ends_with(b"\n") {
        value.extend_from_slice(b"\r\n");
    }
    let mut stream = MessageStream::new(&value);
    let list: Vec<Named> = match stream.parse_address() {
        HeaderValue::Address(list) => list
            .iter()
            .filter_map(|a| {
                let address = a.address.as_deref()?.trim();
                address.contains('@').then(|| Named {
                    name: a.name.as_deref().map(str::to_string),
                    address: address.to_string(),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    (list.len() >= at_signs(&value)).then_some(list)
}

fn key(address: &str) -> String {
    address.to_ascii_lowercase()
}

/// `Name <address>` as RFC 5322 writes it: a display name of atoms as it is, other ASCII quoted,
/// anything else as RFC 2047 encoded words, which must not stand inside quotes (RFC 2047 §5).
fn mailbox(n: &Named) -> String {
    let address = format!("<{}>", n.address);
    let Some(name) = n.name.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return address;
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c);
    let phrase = if name.chars().all(atext) {
        name.to_string()
    } else if name.is_ascii() {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        // Words of at most 45 bytes: 60 base64 characters, 72 with the `=?UTF-8?B?` frame.
        let mut words = Vec::new();
        let mut word = String::new();
        for c in name.chars() {
            if word.len() + c.len_utf8() > 45 {
                words.push(std::mem::take(&mut word));
            }
            word.push(c);
        }
        words.push(word);
        let b64 = base64::engine::general_purpose::STANDARD;
        words
            .iter()
            .map(|w| format!("=?UTF-8?B?{}?=", b64.encode(w)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("{phrase} {address}")
}

/// Writes `Name: a, b` for `list`, folded before a line passes 78 characters.
fn write_field(out: &mut Vec<u8>, name: &str, list: &[Named]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b":");
    let mut column = name.len() + 1;
    for (i, n) in list.iter().enumerate() {
        let item = mailbox(n);
        if i > 0 {
            out.push(b',');
            column += 1;
        }
        if i > 0 && column + 1 + item.len() > 78 {
            out.extend_from_slice(b"\r\n ");
            column = 1;
        } else {
            out.push(b' ');
            column += 1;
        }
        out.extend_from_slice(item.as_bytes());
        column += item.len();
    }
    out.extend_from_slice(b"\r\n");
}

/// The plan for a message whose header section is `header` (as [`header_end`] found it, blank
/// line included) and whose envelope recipients are `envelope`.
pub fn plan(header: &[u8], envelope: &[String], mode: HeaderRecipients) -> Plan {
    let fields = fields(header);
    let in_envelope: std::collections::HashSet<String> = envelope.iter().map(|a| key(a)).collect();
    let mut named = std::collections::HashSet::new();
    let mut extra: Vec<String> = Vec::new();
    let mut unreadable = None;
    let parsed: Vec<Option<(Kind, Vec<Named>)>> = fields
        .iter()
        .map(|f| {
            let kind = kind(f.name)?;
            let Some(list) = addresses(f.raw) else {
                unreadable.get_or_insert_with(|| String::from_utf8_lossy(f.name).into_owned());
                return Some((kind, Vec::new()));
            };
            for a in &list {
                let k = key(&a.address);
                if !in_envelope.contains(&k) && !extra.iter().any(|e| key(e) == k) {
                    extra.push(a.address.clone());
                }
                named.insert(k);
            }
            Some((kind, list))
        })
        .collect();
    if let Some(field) = unreadable {
        return Plan::Unreadable { field };
    }
    if !extra.is_empty() && mode == HeaderRecipients::Refuse {
        return Plan::Refuse { extra };
    }
    let mut missing: Vec<Named> = Vec::new();
    for a in envelope {
        let k = key(a);
        if !named.contains(&k) && !missing.iter().any(|m| key(&m.address) == k) {
            missing.push(Named {
                name: None,
                address: a.clone(),
            });
        }
    }
    if extra.is_empty() && missing.is_empty() {
        return Plan::Send {
            header: header.to_vec(),
            changed: false,
        };
    }
    let keep = |list: &[Named]| -> Vec<Named> {
        list.iter()
            .filter(|a| in_envelope.contains(&key(&a.address)))
            .cloned()
            .collect()
    };
    // Every Bcc address that stays, and the missing ones, go into the first Bcc field.
    let mut bcc: Vec<Named> = parsed
        .iter()
        .flatten()
        .filter(|(k, _)| *k == Kind::Bcc)
        .flat_map(|(_, list)| keep(list))
        .collect();
    bcc.extend(missing);
    let mut out = Vec::with_capacity(header.len() + 64 * bcc.len());
    let mut bcc_written = false;
    for (field, parsed) in fields.iter().zip(&parsed) {
        match parsed {
            None => out.extend_from_slice(field.raw),
            Some((Kind::Bcc, _)) => {
                if !bcc_written && !bcc.is_empty() {
                    write_field(&mut out, &String::from_utf8_lossy(field.name), &bcc);
                }
                bcc_written = true;
            }
            Some((_, list)) => {
                let kept = keep(list);
                if kept.len() == list.len() {
                    out.extend_from_slice(field.raw);
                } else if !kept.is_empty() {
                    write_field(&mut out, &String::from_utf8_lossy(field.name), &kept);
                }
            }
        }
    }
    if !bcc_written && !bcc.is_empty() {
        // A header section that ends without a line end (a message of headers only).
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        write_field(&mut out, "Bcc", &bcc);
    }
    // The blank line that ends the section (when the message has one).
    let body_start = fields.last().map_or(0, |f| {
        f.raw.as_ptr() as usize - header.as_ptr() as usize + f.raw.len()
    });
    out.extend_from_slice(&header[body_start..]);
    Plan::Send {
        header: out,
        changed: true,
    }
}

/// Whether a message of `account` may have one more recipient than `so_far`: an API never splits
/// a message, so a recipient beyond `max_recipients_per_message` is refused at RCPT.
pub fn recipient_allowed(account: &Account, so_far: usize) -> Result<(), Reply> {
    let cap = account.pacing.max_recipients_per_message as usize;
    if cap > 0 && so_far >= cap {
        return Err(Reply::new(
            452,
            format!(
                "4.5.3 Too many recipients for one message through {} (at most {cap}); send the rest in \
                 another message",
                super::answer::api_name(account.provider.transport)
            ),
        ));
    }
    Ok(())
}

/// Why a message cannot go through the API as it is.
pub struct Refused {
    pub status: Status,
    /// Its header recipients are not its envelope (`xoauth_relay_header_recipients_refused_total`).
    header_recipients: bool,
}

impl Refused {
    fn message(code: u16, text: String) -> Refused {
        Refused {
            status: Status::Permanent {
                reply: Reply::new(code, text),
            },
            header_recipients: false,
        }
    }

    /// The status, counted where it is a header-recipient refusal.
    pub fn counted(self, observer: &Observer, account: &str) -> Status {
        if self.header_recipients {
            observer.metrics.header_recipients_refused(account);
        }
        self.status
    }
}

/// What an API takes at most, when it says (the Gmail API: 35 MB).
pub fn too_large(account: &Account, size: u64) -> Option<Status> {
    let max = match account.provider.transport {
        crate::config::TransportKind::GmailApi => super::gmail::MAX_MESSAGE,
        _ => return None,
    };
    (size > max).then(|| Status::Permanent {
        reply: Reply::new(
            552,
            format!(
                "5.3.4 Message too large for the Gmail API ({size} bytes; it takes at most {max})"
            ),
        ),
    })
}

/// The submitted copy's header section and where the message's own ends, for a message that
/// starts with `prefix` (at least [`MAX_HEADER`] + 2 bytes of it, or all), `len` bytes long,
/// with envelope recipients `rcpts`; or why it cannot go.
pub fn check(
    prefix: &[u8],
    len: u64,
    rcpts: &[String],
    account: &Account,
) -> Result<(Vec<u8>, usize), Refused> {
    let end = match header_end(prefix) {
        Some(end) if end <= MAX_HEADER + 2 => end,
        // No blank line: the message is all header section.
        None if len <= MAX_HEADER as u64 && len as usize == prefix.len() => prefix.len(),
        _ => {
            return Err(Refused::message(
                554,
                format!(
                    "5.6.0 The message's header section is longer than {} KiB",
                    MAX_HEADER / 1024
                ),
            ))
        }
    };
    let (header, _) = match plan(&prefix[..end], rcpts, account.header_recipients) {
        Plan::Send { header, changed } => (header, changed),
        Plan::Refuse { extra } => {
            return Err(Refused {
                status: refusal(account, &extra),
                header_recipients: true,
            })
        }
        Plan::Unreadable { field } => {
            return Err(Refused::message(
                554,
                format!(
                    "5.6.0 The message's {field} field names addresses that cannot be read; the API might send to \
                     them, so it is not sent"
                ),
            ))
        }
    };
    // The copy may have grown by its Bcc.
    let copy = len + header.len() as u64 - end as u64;
    if let Some(status) = too_large(account, copy) {
        return Err(Refused {
            status,
            header_recipients: false,
        });
    }
    Ok((header, end))
}

/// `554 5.7.0`: the headers name addresses the envelope does not.
pub fn refusal(account: &Account, extra: &[String]) -> Status {
    let more = match extra.len() {
        1 => String::new(),
        n => format!(" and {} more", n - 1),
    };
    tracing::info!(account = %account.name, addresses = extra.len(), "message refused: its To/Cc/Bcc name addresses that are not in RCPT TO");
    Status::Permanent {
        reply: Reply::new(
            554,
            format!(
                "5.7.0 To/Cc/Bcc name <{}>{more}, not a recipient of this message (RCPT TO), and {} would \
                 send to it; give every header recipient in RCPT TO, or set header_recipients = \"strip\" for \
                 account `{}`",
                extra[0],
                super::answer::api_name(account.provider.transport),
                account.name
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn sent(header: &str, env: &[&str], mode: HeaderRecipients) -> String {
        match plan(header.as_bytes(), &envelope(env), mode) {
            Plan::Send { header, .. } => String::from_utf8(header).unwrap(),
            other => panic!("not sent: {other:?}"),
        }
    }

    #[test]
    fn the_header_section_ends_at_the_first_blank_line() {
        assert_eq!(header_end(b"A: b\r\n\r\nbody\r\n\r\n"), Some(8));
        assert_eq!(header_end(b"A: b\n\nbody"), Some(6));
        assert_eq!(header_end(b"\r\nbody"), Some(2));
        assert_eq!(header_end(b"A: b\r\nC: d\r\n"), None);
    }

    #[test]
    fn a_message_whose_headers_match_its_envelope_is_unchanged() {
        let h = "From: a@x.org\r\nTo: \"Bob B\" <Bob@Example.org>,\r\n carol@example.org\r\nSubject: hi\r\n\r\n";
        let p = plan(
            h.as_bytes(),
            &envelope(&["bob@example.org", "carol@example.org"]),
            HeaderRecipients::Refuse,
        );
        assert_eq!(
            p,
            Plan::Send {
                header: h.as_bytes().to_vec(),
                changed: false
            }
        );
    }

    #[test]
    fn envelope_recipients_the_headers_lack_are_added_in_one_bcc_field() {
        let h = "To: bob@example.org\r\nSubject: hi\r\n\r\n";
        let out = sent(
            h,
            &["bob@example.org", "dave@example.org"],
            HeaderRecipients::Refuse,
        );
        assert_eq!(
            out,
            "To: bob@example.org\r\nSubject: hi\r\nBcc: <dave@example.org>\r\n\r\n"
        );
        // Merged with the message's own Bcc (and a second Bcc field folded into it).
        let h = "Bcc: eve@example.org\r\nTo: bob@example.org\r\nBcc: <fay@example.org>\r\n\r\n";
        let out = sent(
            h,
            &[
                "bob@example.org",
                "eve@example.org",
                "fay@example.org",
                "dave@example.org",
            ],
            HeaderRecipients::Refuse,
        );
        assert_eq!(
            out,
            "Bcc: <eve@example.org>, <fay@example.org>, <dave@example.org>\r\nTo: bob@example.org\r\n\r\n"
        );
    }

    #[test]
    fn header_addresses_outside_the_envelope_refuse_or_are_stripped() {
        let h = "To: list@example.org, \"Bob\" <bob@example.org>\r\nCc: boss@example.org\r\nSubject: x\r\n\r\n";
        assert_eq!(
            plan(
                h.as_bytes(),
                &envelope(&["bob@example.org"]),
                HeaderRecipients::Refuse
            ),
            Plan::Refuse {
                extra: vec!["list@example.org".into(), "boss@example.org".into()]
            }
        );
        let out = sent(h, &["bob@example.org"], HeaderRecipients::Strip);
        assert_eq!(out, "To: Bob <bob@example.org>\r\nSubject: x\r\n\r\n");
        // A list tool's `To: list@` with the members in the envelope: the To goes, they get Bcc.
        let h = "From: a@x.org\r\nTo: list@example.org\r\n\r\n";
        let out = sent(
            h,
            &["m1@example.org", "m2@example.org"],
            HeaderRecipients::Strip,
        );
        assert_eq!(
            out,
            "From: a@x.org\r\nBcc: <m1@example.org>, <m2@example.org>\r\n\r\n"
        );
    }

    #[test]
    fn names_groups_and_encoded_words_are_read_as_mail_readers_read_them() {
        let h =
            "To: =?UTF-8?Q?J=C3=BCrgen?= <j@example.de>, team: a@example.org, b@example.org;\r\n\
                 Cc: undisclosed-recipients:;\r\n\r\n";
        let out = sent(
            h,
            &["j@example.de", "a@example.org", "b@example.org"],
            HeaderRecipients::Refuse,
        );
        assert_eq!(out, h, "all named: unchanged");
        let out = sent(
            h,
            &["j@example.de", "a@example.org"],
            HeaderRecipients::Strip,
        );
        // An encoded name is written as encoded words, never inside quotes (RFC 2047 §5).
        assert_eq!(
            out,
            "To: =?UTF-8?B?SsO8cmdlbg==?= <j@example.de>, <a@example.org>\r\n\
             Cc: undisclosed-recipients:;\r\n\r\n"
        );
    }

    #[test]
    fn a_field_that_names_more_than_can_be_read_stops_the_message() {
        let h = "To: bob@example.org, carol@@example.org\r\n\r\n";
        assert_eq!(
            plan(
                h.as_bytes(),
                &envelope(&["bob@example.org"]),
                HeaderRecipients::Strip
            ),
            Plan::Unreadable { field: "To".into() }
        );
        // An @ in a quoted name or a comment is no address.
        let h = "To: \"bob@home\" <bob@example.org> (was: bob@old.example)\r\n\r\n";
        assert!(matches!(
            plan(
                h.as_bytes(),
                &envelope(&["bob@example.org"]),
                HeaderRecipients::Refuse
            ),
            Plan::Send { changed: false, .. }
        ));
    }

    #[test]
    fn a_message_of_headers_only_gets_its_bcc_on_a_line_of_its_own() {
        let out = sent(
            "To: bob@example.org",
            &["bob@example.org", "dave@example.org"],
            HeaderRecipients::Refuse,
        );
        assert_eq!(out, "To: bob@example.org\r\nBcc: <dave@example.org>\r\n");
    }

    #[test]
    fn long_fields_are_folded_and_names_quoted_where_they_must_be() {
        let env: Vec<String> = (0..6)
            .map(|i| format!("member-{i}@lists.example.org"))
            .collect();
        let refs: Vec<&str> = env.iter().map(String::as_str).collect();
        let out = sent(
            "To: \"Smith, Bob\" <bob@example.org>\r\n\r\n",
            &[&["bob@example.org"][..], &refs].concat(),
            HeaderRecipients::Refuse,
        );
        assert!(
            out.starts_with("To: \"Smith, Bob\" <bob@example.org>\r\nBcc: <member-0@"),
            "{out}"
        );
        assert!(out.lines().all(|l| l.len() <= 78), "{out}");
        assert_eq!(out.matches('@').count(), 7, "{out}");
    }
}

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

use mail_builder::headers::address::Address as Out;
use mail_builder::headers::Header;
use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue;

use crate::config::{Account, HeaderRecipients};
use crate::delivery::status::Status;
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

/// The addresses in a `To`/`Cc`/`Bcc` field (groups flattened).
fn addresses(raw: &[u8]) -> Vec<Named> {
    let colon = raw
        .iter()
        .position(|b| *b == b':')
        .map_or(raw.len(), |i| i + 1);
    let mut value = raw[colon..].to_vec();
    if !value.ends_with(b"\n") {
        value.extend_from_slice(b"\r\n");
    }
    let mut stream = MessageStream::new(&value);
    let HeaderValue::Address(list) = stream.parse_address() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|a| {
            let address = a.address.as_deref()?.trim();
            address.contains('@').then(|| Named {
                name: a.name.as_deref().map(str::to_string),
                address: address.to_string(),
            })
        })
        .collect()
}

fn key(address: &str) -> String {
    address.to_ascii_lowercase()
}

/// Writes `Name: a, b` for `list` (display names kept, encoded where they need it).
fn write_field(out: &mut Vec<u8>, name: &str, list: &[Named]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    let items: Vec<Out> = list
        .iter()
        .map(|n| Out::new_address(n.name.clone(), n.address.clone()))
        .collect();
    // Writing into a Vec cannot fail.
    let _ = Out::new_list(items).write_header(&mut *out, name.len() + 2);
}

/// The plan for a message whose header section is `header` (as [`header_end`] found it, blank
/// line included) and whose envelope recipients are `envelope`.
pub fn plan(header: &[u8], envelope: &[String], mode: HeaderRecipients) -> Plan {
    let fields = fields(header);
    let in_envelope: std::collections::HashSet<String> = envelope.iter().map(|a| key(a)).collect();
    let mut named = std::collections::HashSet::new();
    let mut extra: Vec<String> = Vec::new();
    let parsed: Vec<Option<(Kind, Vec<Named>)>> = fields
        .iter()
        .map(|f| {
            let kind = kind(f.name)?;
            let list = addresses(f.raw);
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

/// The submitted copy's header section and where the message's own ends, for a message that
/// starts with `prefix` (at least [`MAX_HEADER`] + 2 bytes of it, or all), `len` bytes long,
/// with envelope recipients `rcpts`; or why it cannot go.
pub fn check(
    prefix: &[u8],
    len: u64,
    rcpts: &[String],
    account: &Account,
) -> Result<(Vec<u8>, usize), Status> {
    let end = match header_end(prefix) {
        Some(end) if end <= MAX_HEADER + 2 => end,
        // No blank line: the message is all header section.
        None if len <= MAX_HEADER as u64 && len as usize == prefix.len() => prefix.len(),
        _ => {
            return Err(Status::Permanent {
                reply: Reply::new(
                    554,
                    format!(
                        "5.6.0 The message's header section is longer than {} KiB",
                        MAX_HEADER / 1024
                    ),
                ),
            })
        }
    };
    match plan(&prefix[..end], rcpts, account.header_recipients) {
        Plan::Send { header, .. } => Ok((header, end)),
        Plan::Refuse { extra } => Err(refusal(account, &extra)),
    }
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
            Plan::Refuse { extra } => panic!("refused: {extra:?}"),
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
            // Folded where the line would pass 76 characters.
            "Bcc: <eve@example.org>, <fay@example.org>, \r\n\t<dave@example.org>\r\nTo: bob@example.org\r\n\r\n"
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
        assert_eq!(out, "To: \"Bob\" <bob@example.org>\r\nSubject: x\r\n\r\n");
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
        assert!(
            out.starts_with("To: \"Jürgen\" <j@example.de>, <a@example.org>\r\n")
                || out.contains("<a@example.org>"),
            "{out}"
        );
        assert!(!out.contains("b@example.org"), "{out}");
    }
}

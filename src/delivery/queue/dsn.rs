//! Delivery status notifications (RFC 3464): the bounce for recipients that failed for good.
//!
//! A bounce goes to the original envelope sender through the account's own upstream, from the
//! account's mailbox. Submission servers accept only the authenticated identity as sender, so the
//! RFC 5321 null sender, which normally keeps bounces from being bounced, is not available.
//! Instead the report is marked `Auto-Submitted: auto-replied` (RFC 3834), and [`is_automatic`]
//! is how the queue avoids bouncing such a message again.
//!
//! Addresses, reply texts and the original headers come from the network. A CR or LF in them
//! would start a new header line or a new report field, so none reaches one. The report is also
//! kept 7-bit, because it is queued without 8BITMIME or SMTPUTF8.

use mail_builder::encoders::base64::base64_encode_mime;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{make_boundary, BodyPart, MimePart};
use mail_builder::MessageBuilder;

/// One recipient that failed for good.
pub struct Failed {
    pub address: String,
    /// Enhanced status code, like "5.1.1" (use "5.0.0" when the reply had none; "4.4.7" for a message that expired in the queue).
    pub status: String,
    /// The upstream's reply as text, like "550 5.1.1 No such user" (goes into Diagnostic-Code: smtp; ...).
    pub diagnostic: String,
}

pub struct Bounce<'a> {
    /// Our host name, for Reporting-MTA: dns; NAME.
    pub reporting_mta: &'a str,
    /// The account's mailbox: header From (as "Mail Delivery System <mailbox>").
    pub from: &'a str,
    /// The original envelope sender: header To.
    pub to: &'a str,
    /// The queue id of the original message (X-Original-Queue-Id or in the text, and Original-Envelope-Id is NOT used).
    pub queue_id: &'a str,
    /// Unix seconds the original arrived (Arrival-Date, RFC 5322 date format).
    pub arrival_unix: u64,
    /// Unix seconds now (Date header).
    pub now_unix: u64,
    /// The original message's header block, as received (bytes up to, not including, the blank line).
    pub headers: &'a [u8],
    pub failed: &'a [Failed],
}

/// The most of a network-supplied value that goes on one line: with a field name in front it
/// stays well within SMTP's 998-octet line limit.
const MAX_VALUE: usize = 900;

/// As much of a message as [`header_block`] looks at: the queue reads no more to find headers,
/// and a bounce carrying more would mostly be carrying somebody's body.
const MAX_HEADERS: usize = 64 * 1024;

/// The whole report message in wire form: CRLF line endings, ready to be queued as a message body.
pub fn build(b: &Bounce) -> Vec<u8> {
    let mta = field(b.reporting_mta);
    let queue_id = field(b.queue_id);

    let mut text = format!(
        "This is the mail system at {mta}.\r\n\
         \r\n\
         Your message (queue id {queue_id}) could not be delivered to the recipients\r\n\
         below, and no further attempts will be made for them. Other recipients of the\r\n\
         message, if any, are not affected by this report and may have received it.\r\n\
         \r\n"
    );
    let mut status = format!(
        "Reporting-MTA: dns; {mta}\r\n\
         Arrival-Date: {}\r\n\
         X-Original-Queue-Id: {queue_id}\r\n",
        Date::from(b.arrival_unix).to_rfc822()
    );
    for f in b.failed {
        let (kind, address) = recipient(&f.address);
        let diagnostic = field(&f.diagnostic);
        text += &format!("<{address}>:\r\n    {diagnostic}\r\n\r\n");
        status += &format!(
            "\r\n\
             Final-Recipient: {kind}; {address}\r\n\
             Action: failed\r\n\
             Status: {}\r\n\
             Diagnostic-Code: smtp; {diagnostic}\r\n",
            field(&f.status)
        );
    }
    text += "The delivery report and the headers of your message are attached.\r\n";

    // mail-builder can say all of this: a report-type parameter on the multipart, and parts that
    // are written as given once they carry a Content-Transfer-Encoding. Without one it would
    // re-encode them (base64 for message/delivery-status, quoted-printable for any text line
    // over 77 characters), which is why every part names its own.
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new(
                ContentType::new("text/plain").attribute("charset", "us-ascii"),
                text,
            )
            .transfer_encoding("7bit"),
            MimePart::new("message/delivery-status", status.into_bytes()).transfer_encoding("7bit"),
            original_headers(b.headers),
        ],
    );
    MessageBuilder::new()
        .date(b.now_unix)
        .from(Address::new_address(
            Some("Mail Delivery System"),
            header_address(b.from),
        ))
        .to(Address::new_address(None::<&str>, header_address(b.to)))
        .subject("Undelivered Mail Returned to Sender")
        .message_id(format!("{}@{mta}", make_boundary(".")))
        .header("MIME-Version", Raw::new("1.0"))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .expect("writing to a Vec cannot fail")
}

/// The header block of a message: everything before the first empty line (CRLF CRLF or LF LF), capped at 64 KiB.
pub fn header_block(message_start: &[u8]) -> &[u8] {
    let m = &message_start[..message_start.len().min(MAX_HEADERS)];
    let blank = |s: &[u8]| s.starts_with(b"\n") || s.starts_with(b"\r\n");
    if blank(m) {
        return &[];
    }
    match (0..m.len()).find(|&i| m[i] == b'\n' && blank(&m[i + 1..])) {
        Some(i) => &m[..=i],
        None => m,
    }
}

/// Whether a message (given its header block) is itself an automatic report that must not be bounced:
/// Auto-Submitted present with any value other than "no", or Content-Type multipart/report.
pub fn is_automatic(headers: &[u8]) -> bool {
    fields(headers).iter().any(|(name, value)| {
        // The value proper, without parameters (`; owner-email=...`) or a comment (`no (manual)`).
        let token = value
            .split(|&c| c == b';' || c == b'(')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if name.eq_ignore_ascii_case(b"Auto-Submitted") {
            !token.eq_ignore_ascii_case(b"no")
        } else if name.eq_ignore_ascii_case(b"Content-Type") {
            token.eq_ignore_ascii_case(b"multipart/report")
        } else {
            false
        }
    })
}

/// The fields of a header block as (name, unfolded value): a value may continue on following
/// lines that start with white space.
fn fields(headers: &[u8]) -> Vec<(&[u8], Vec<u8>)> {
    let mut out: Vec<(&[u8], Vec<u8>)> = Vec::new();
    for line in headers.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if let Some((_, value)) = out.last_mut() {
                value.push(b' ');
                value.extend_from_slice(line);
            }
        } else if let Some(colon) = line.iter().position(|&c| c == b':') {
            out.push((line[..colon].trim_ascii(), line[colon + 1..].to_vec()));
        }
    }
    out
}

/// The original headers as a text/rfc822-headers part. Their lines get CRLF endings, which the
/// canonical form of text requires; a block that is not plain 7-bit text (8-bit or control
/// bytes, overlong lines) is sent as base64 rather than altered.
fn original_headers(headers: &[u8]) -> MimePart<'static> {
    let mut crlf = Vec::with_capacity(headers.len() + 64);
    for line in headers.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        crlf.extend_from_slice(line);
        crlf.extend_from_slice(b"\r\n");
    }
    // The last piece is what follows the final LF (normally nothing): it had no line ending.
    crlf.truncate(crlf.len() - 2);
    let seven_bit = crlf.split(|&c| c == b'\n').all(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.len() <= 998
            && line
                .iter()
                .all(|&c| c == b'\t' || (b' '..=b'~').contains(&c))
    });
    let (contents, encoding) = if seven_bit {
        (crlf, "7bit")
    } else {
        let mut encoded = Vec::new();
        base64_encode_mime(&crlf, &mut encoded, false).expect("writing to a Vec cannot fail");
        (encoded, "base64")
    };
    MimePart::new("text/rfc822-headers", BodyPart::Binary(contents.into()))
        .transfer_encoding(encoding)
}

/// A value for a header or report field: control characters (CR and LF among them) become
/// spaces and anything outside ASCII a `?`, since report fields are ASCII text.
fn field(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            c if c.is_control() => ' ',
            c if !c.is_ascii() => '?',
            c => c,
        })
        .collect();
    out.truncate(MAX_VALUE);
    out
}

/// A recipient's address type and address for Final-Recipient (and the readable text). An
/// address beyond ASCII cannot be `rfc822`, so it gets RFC 6533's `utf-8` type in its 7-bit
/// xtext form, where `\x{HEX}` stands for any character outside printable ASCII or one of `+=\`.
fn recipient(address: &str) -> (&'static str, String) {
    let address: String = address.chars().filter(|c| !c.is_control()).collect();
    let (kind, mut out) = if address.is_ascii() {
        ("rfc822", address)
    } else {
        let xtext = address
            .chars()
            .map(|c| match c {
                '!'..='~' if !matches!(c, '+' | '=' | '\\') => c.to_string(),
                c => format!("\\x{{{:02X}}}", c as u32),
            })
            .collect();
        ("utf-8", xtext)
    };
    out.truncate(MAX_VALUE);
    (kind, out)
}

/// An address for the From and To headers, where mail-builder writes it verbatim between angle
/// brackets: control characters go, and so does whatever would overrun the line.
fn header_address(address: &str) -> String {
    let mut out: String = address.chars().filter(|c| !c.is_control()).collect();
    if out.len() > MAX_VALUE {
        let mut cut = MAX_VALUE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};

    const ORIGINAL: &[u8] = b"From: Sender <sender@example.org>\r\n\
        To: alice@example.com, bob@example.net\r\n\
        Subject: Quarterly figures\r\n\
        Message-ID: <abc123@example.org>\r\n\
        Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n";

    fn failed(address: &str, status: &str, diagnostic: &str) -> Failed {
        Failed {
            address: address.into(),
            status: status.into(),
            diagnostic: diagnostic.into(),
        }
    }

    fn bounce<'a>(to: &'a str, headers: &'a [u8], failed: &'a [Failed]) -> Vec<u8> {
        build(&Bounce {
            reporting_mta: "relay.example.org",
            from: "account@example.org",
            to,
            queue_id: "Q0001",
            arrival_unix: 1_704_103_200,
            now_unix: 1_704_106_800,
            headers,
            failed,
        })
    }

    /// Wire form: every LF is preceded by CR, no CR stands alone, and nothing is 8-bit.
    fn assert_wire_form(out: &[u8]) {
        for (i, &c) in out.iter().enumerate() {
            assert!(c.is_ascii(), "8-bit byte at {i}");
            if c == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i}");
            }
            if c == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(out.ends_with(b"\r\n"));
    }

    fn status_part(out: &[u8]) -> String {
        let message = MessageParser::default().parse(out).unwrap();
        String::from_utf8(message.parts[2].contents().to_vec()).unwrap()
    }

    #[test]
    fn a_report_with_two_recipients() {
        let failed = [
            failed("alice@example.com", "5.1.1", "550 5.1.1 No such user"),
            failed("bob@example.net", "5.7.1", "554 5.7.1 Relaying denied"),
        ];
        let out = bounce("sender@example.org", ORIGINAL, &failed);
        assert_wire_form(&out);

        let message = MessageParser::default().parse(&out).unwrap();
        let ct = message.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));

        let kids = message.root_part().sub_parts().unwrap();
        let types: Vec<String> = kids
            .iter()
            .map(|&id| {
                let ct = message.parts[id as usize].content_type().unwrap();
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect();
        assert_eq!(
            types,
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );

        let text = message.parts[kids[0] as usize].text_contents().unwrap();
        assert!(text.contains("<alice@example.com>:\r\n    550 5.1.1 No such user"));
        assert!(text.contains("<bob@example.net>:\r\n    554 5.7.1 Relaying denied"));
        assert!(text.contains("Q0001"));

        let status = status_part(&out);
        assert!(status.contains("Reporting-MTA: dns; relay.example.org\r\n"));
        assert!(status.contains("Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"));
        assert!(status.contains("X-Original-Queue-Id: Q0001\r\n"));
        assert!(!status.contains("Original-Envelope-Id"));
        assert!(status.contains("Final-Recipient: rfc822; alice@example.com\r\n"));
        assert!(status.contains("Final-Recipient: rfc822; bob@example.net\r\n"));
        assert_eq!(status.matches("Action: failed\r\n").count(), 2);
        assert!(status.contains("Status: 5.1.1\r\n"));
        assert!(status.contains("Status: 5.7.1\r\n"));
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n"));
        assert!(status.contains("Diagnostic-Code: smtp; 554 5.7.1 Relaying denied\r\n"));
        // One per-message block, then one per recipient, each after a blank line.
        let blocks: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(blocks.len(), 3);
        assert!(blocks[0].starts_with("Reporting-MTA:"));
        assert!(blocks[1].starts_with("Final-Recipient: rfc822; alice@"));
        assert!(blocks[2].starts_with("Final-Recipient: rfc822; bob@"));

        let headers = message.parts[kids[2] as usize].contents();
        assert_eq!(headers, ORIGINAL);

        assert_eq!(
            message.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(
            message.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
        let from = message.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Mail Delivery System"));
        assert_eq!(from.address(), Some("account@example.org"));
        let to = message.to().unwrap().first().unwrap();
        assert_eq!(to.address(), Some("sender@example.org"));
        assert_eq!(message.date().unwrap().to_timestamp(), 1_704_106_800);
        assert!(message
            .message_id()
            .unwrap()
            .ends_with("@relay.example.org"));
        // The report is itself automatic, so it would never be bounced in turn.
        assert!(is_automatic(header_block(&out)));
    }

    #[test]
    fn an_expired_message_uses_4_4_7() {
        let failed = [failed(
            "alice@example.com",
            "4.4.7",
            "delivery time expired before the upstream could be reached",
        )];
        let status = status_part(&bounce("sender@example.org", ORIGINAL, &failed));
        assert!(status.contains("Action: failed\r\nStatus: 4.4.7\r\n"));
    }

    #[test]
    fn network_text_cannot_start_a_line() {
        let failed = [failed(
            "alice@example.com\r\nX-Evil: 1",
            "5.1.1\r\nAction: delivered",
            "550 no\r\nBcc: victim@example.com\r\n\r\nInjected\nbody\rX-More: 2",
        )];
        let out = bounce(
            "sender@example.org\r\nBcc: victim@example.com",
            ORIGINAL,
            &failed,
        );
        assert_wire_form(&out);
        for line in out.split(|&c| c == b'\n') {
            for evil in [&b"Bcc"[..], b"X-Evil", b"Injected", b"body", b"X-More"] {
                assert!(!line.starts_with(evil), "{}", String::from_utf8_lossy(line));
            }
            assert!(!line.starts_with(b"Action: delivered"));
        }
        let message = MessageParser::default().parse(&out).unwrap();
        assert!(message.bcc().is_none());
        assert!(message.header_raw("X-Evil").is_none());
        let status = status_part(&out);
        assert!(status.contains(
            "Diagnostic-Code: smtp; 550 no  Bcc: victim@example.com    Injected body X-More: 2\r\n"
        ));
        assert_eq!(status.matches("\r\nAction:").count(), 1);
    }

    #[test]
    fn lf_headers_get_crlf() {
        let out = bounce(
            "sender@example.org",
            b"Subject: Hi\nX-A: 1\n",
            &[failed("a@example.com", "5.0.0", "550 no")],
        );
        assert_wire_form(&out);
        let message = MessageParser::default().parse(&out).unwrap();
        assert_eq!(message.parts[3].contents(), b"Subject: Hi\r\nX-A: 1\r\n");
    }

    #[test]
    fn eight_bit_stays_out_of_the_report() {
        let headers = "Subject: Grüße\r\nTo: jörg@exämple.de\r\n".as_bytes();
        let failed = [failed(
            "jörg@exämple.de",
            "5.1.1",
            "550 5.1.1 Unbekannt: jörg",
        )];
        let out = bounce("sender@example.org", headers, &failed);
        assert_wire_form(&out);
        let message = MessageParser::default().parse(&out).unwrap();
        assert_eq!(message.parts[3].contents(), headers);
        let status = status_part(&out);
        assert!(status.contains("Final-Recipient: utf-8; j\\x{F6}rg@ex\\x{E4}mple.de\r\n"));
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.1.1 Unbekannt: j?rg\r\n"));
    }

    #[test]
    fn header_block_stops_at_the_first_empty_line() {
        assert_eq!(
            header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n"),
            b"A: 1\r\nB: 2\r\n"
        );
        assert_eq!(header_block(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\nB: 2\n");
        assert_eq!(header_block(b"\r\nbody"), b"");
        assert_eq!(header_block(b"\nbody"), b"");
        assert_eq!(header_block(b""), b"");
        assert_eq!(header_block(b"A: 1\r\nB: 2"), b"A: 1\r\nB: 2");
        let long = [b"X: ".as_ref(), &[b'a'; 100_000]].concat();
        assert_eq!(header_block(&long), &long[..64 * 1024]);
    }

    #[test]
    fn automatic_messages() {
        for h in [
            &b"Subject: x\r\nAuto-Submitted: auto-replied\r\n"[..],
            b"auto-submitted: Auto-Generated\r\n",
            b"Auto-Submitted: auto-notified; owner-email=\"a@b\"\r\n",
            b"Auto-Submitted:\r\n auto-replied\r\n",
            b"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=x\r\n",
            b"content-type:\r\n MULTIPART/REPORT;\r\n report-type=disposition-notification\r\n",
        ] {
            assert!(is_automatic(h), "{}", String::from_utf8_lossy(h));
        }
        for h in [
            &b""[..],
            b"Subject: multipart/report\r\n",
            b"Auto-Submitted: no\r\n",
            b"Auto-Submitted: No (sent by hand)\r\n",
            b"X-Auto-Submitted: yes\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n",
            b"Content-Type: text/plain\r\n X-Note: multipart/report\r\n",
        ] {
            assert!(!is_automatic(h), "{}", String::from_utf8_lossy(h));
        }
    }
}

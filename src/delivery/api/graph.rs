//! Microsoft Graph. A message whose base64 fits one request (4,000,000 bytes) goes in one
//! `POST {api_url}/users/{mailbox}/sendMail` (`text/plain`, the base64 of the MIME message,
//! streamed). A larger one goes the large way: a draft built from the parsed message
//! (`POST .../messages`), its attachments one `POST` each while they fit a request, through an
//! upload session (`PUT`s of at most 4,000,000 bytes to a pre-authenticated URL) when not, then
//! `POST .../messages/{id}/send`. The large way rebuilds the message on Microsoft's side: what it
//! cannot keep is in the README.

use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use mail_parser::{MessageParser, MimeHeaders};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE};
use serde_json::{json, Value};

use super::answer::{reading, Answer, Reading};
use super::{Api, Outgoing};
use crate::config::Account;
use crate::delivery::status::{Cause, Status};
use crate::smtp::Reply;

/// The most one Graph request may carry.
pub const MAX_REQUEST: u64 = 4_000_000;

/// The base64 length of `n` bytes (padded, no line breaks).
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

pub async fn send(api: &Api, account: &Account, message: &Outgoing) -> Status {
    if base64_len(message.len()) <= MAX_REQUEST {
        mime(api, account, message).await
    } else {
        large(api, account, message).await
    }
}

fn mailbox_url(account: &Account) -> String {
    let mut url = format!("{}/users/", account.provider.api_url);
    url.extend(url::form_urlencoded::byte_serialize(
        account.mailbox.as_bytes(),
    ));
    url
}

async fn mime(api: &Api, account: &Account, message: &Outgoing) -> Status {
    let url = format!("{}/sendMail", mailbox_url(account));
    let answer = api
        .call(account, |client, token| {
            client
                .post(&url)
                .bearer_auth(token)
                .header(CONTENT_TYPE, "text/plain")
                .header(CONTENT_LENGTH, base64_len(message.len()))
                .body(reqwest::Body::wrap_stream(base64_stream(message.stream())))
        })
        .await;
    match answer {
        Ok(a) if reading(&a) == Reading::Sent => super::sent(&a),
        Ok(a) => api.refused(account, &a),
        Err(status) => status,
    }
}

/// The base64 of a byte stream, chunk by chunk (a few bytes carried between chunks).
pub fn base64_stream<S>(input: S) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
    futures_util::stream::unfold(
        (Box::pin(input), Vec::<u8>::new(), false),
        move |(mut input, mut carry, ended)| async move {
            if ended {
                return None;
            }
            loop {
                match input.next().await {
                    Some(Ok(chunk)) => {
                        carry.extend_from_slice(&chunk);
                        let whole = carry.len() / 3 * 3;
                        if whole == 0 {
                            continue;
                        }
                        let out = ENGINE.encode(&carry[..whole]);
                        carry.drain(..whole);
                        return Some((Ok(Bytes::from(out)), (input, carry, false)));
                    }
                    Some(Err(e)) => return Some((Err(e), (input, carry, true))),
                    None if carry.is_empty() => return None,
                    None => {
                        let out = ENGINE.encode(&carry);
                        return Some((Ok(Bytes::from(out)), (input, Vec::new(), true)));
                    }
                }
            }
        },
    )
}

fn too_large(what: &str) -> Status {
    Status::Permanent {
        reply: Reply::new(
            552,
            format!("5.3.4 Message too large for Microsoft Graph: {what} exceeds its 4 MB request limit"),
        ),
    }
}

/// `{"emailAddress": {"address", "name"}}` for each address of a header.
fn recipients(list: Option<&mail_parser::Address>) -> Value {
    let items: Vec<Value> = list
        .map(|l| {
            l.iter()
                .filter_map(|a| {
                    let address = a.address.as_deref()?;
                    let mut e = json!({ "address": address });
                    if let Some(name) = a.name.as_deref() {
                        e["name"] = name.into();
                    }
                    Some(json!({ "emailAddress": e }))
                })
                .collect()
        })
        .unwrap_or_default();
    Value::Array(items)
}

/// The draft's JSON: what Graph's message resource can carry of the parsed message.
fn draft(message: &mail_parser::Message) -> Value {
    let mut d = json!({
        "subject": message.subject().unwrap_or_default(),
        "toRecipients": recipients(message.to()),
        "ccRecipients": recipients(message.cc()),
        "bccRecipients": recipients(message.bcc()),
    });
    if let Some(html) = message.body_html(0) {
        d["body"] = json!({ "contentType": "HTML", "content": html });
    } else if let Some(text) = message.body_text(0) {
        d["body"] = json!({ "contentType": "Text", "content": text });
    }
    if let Some(from) = recipients(message.from())
        .as_array()
        .and_then(|a| a.first())
    {
        d["from"] = from.clone();
    }
    let reply_to = recipients(message.reply_to());
    if reply_to.as_array().is_some_and(|a| !a.is_empty()) {
        d["replyTo"] = reply_to;
    }
    // Graph takes only `x-` headers here.
    let headers: Vec<Value> = message
        .headers_raw()
        .filter(|(name, _)| name.len() > 2 && name[..2].eq_ignore_ascii_case("x-"))
        .map(|(name, value)| {
            let value: String = value.split_whitespace().collect::<Vec<_>>().join(" ");
            json!({ "name": name, "value": value })
        })
        .collect();
    if !headers.is_empty() {
        d["internetMessageHeaders"] = Value::Array(headers);
    }
    d
}

/// One attachment as Graph takes it.
struct Attachment<'a> {
    name: String,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
    bytes: std::borrow::Cow<'a, [u8]>,
}

/// A part's bytes as sent, transfer encoding undone. The parser's own reading of a text part is
/// its text, charset-converted (and lossy for bytes that are not text): an attachment must keep
/// its bytes, so a text part is decoded here from the raw message.
fn part_bytes<'a>(
    raw: &'a [u8],
    part: &'a mail_parser::MessagePart<'a>,
) -> std::borrow::Cow<'a, [u8]> {
    if !(part.is_text() || part.is_text_html()) {
        return std::borrow::Cow::Borrowed(part.contents());
    }
    let start = part.raw_body_offset() as usize;
    let end = (part.raw_end_offset() as usize).min(raw.len());
    let body = &raw[start.min(end)..end];
    let encoding = part
        .content_transfer_encoding()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let decoded = match encoding.as_str() {
        "base64" => mail_parser::decoders::base64::base64_decode(body),
        "quoted-printable" => {
            mail_parser::decoders::quoted_printable::quoted_printable_decode(body)
        }
        _ => None,
    };
    decoded.map_or(std::borrow::Cow::Borrowed(body), std::borrow::Cow::Owned)
}

fn attachments<'a>(raw: &'a [u8], message: &'a mail_parser::Message<'a>) -> Vec<Attachment<'a>> {
    message
        .attachments()
        .enumerate()
        .map(|(i, part)| {
            let content_type = part
                .content_type()
                .map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{sub}", ct.ctype()),
                    None => ct.ctype().to_string(),
                })
                .unwrap_or_else(|| "application/octet-stream".into());
            let name = part
                .attachment_name()
                .map(str::to_string)
                .unwrap_or_else(|| match part.is_message() {
                    true => format!("message-{}.eml", i + 1),
                    false => format!("attachment-{}", i + 1),
                });
            let content_id = part
                .content_id()
                .map(|id| id.trim_matches(['<', '>']).to_string());
            let inline = part.content_disposition().is_some_and(|d| d.is_inline())
                || (content_id.is_some() && part.content_disposition().is_none());
            Attachment {
                name,
                content_type,
                content_id,
                inline,
                bytes: part_bytes(raw, part),
            }
        })
        .collect()
}

async fn large(api: &Api, account: &Account, message: &Outgoing) -> Status {
    let bytes = match message.all().await {
        Ok(b) => b,
        Err(e) => return super::local_error(&e),
    };
    let Some(parsed) = MessageParser::default().parse(&bytes) else {
        return Status::Permanent {
            reply: Reply::new(
                554,
                "5.6.0 The message cannot be parsed as MIME for Microsoft Graph",
            ),
        };
    };
    let draft_json = draft(&parsed).to_string();
    if draft_json.len() as u64 > MAX_REQUEST {
        return too_large("the message's text");
    }
    let base = mailbox_url(account);
    let created = api
        .call(account, |client, token| {
            client
                .post(format!("{base}/messages"))
                .bearer_auth(token)
                .header(CONTENT_TYPE, "application/json")
                .body(draft_json.clone())
        })
        .await;
    let id = match created {
        Ok(a) if reading(&a) == Reading::Sent => match a.id.clone() {
            Some(id) if a.status == 201 || a.status == 200 => id,
            _ => {
                return Status::temporary(
                    Cause::Connection,
                    Reply::new(
                        451,
                        "4.4.1 Microsoft Graph created no draft id; try again later",
                    ),
                )
            }
        },
        Ok(a) => return api.refused(account, &a),
        Err(status) => return status,
    };
    let message_url = format!("{base}/messages/{}", encode_segment(&id));
    let status = attach_and_send(api, account, &message_url, &bytes, &parsed).await;
    if !status.is_accepted() {
        // A draft left behind would sit in the mailbox's Drafts folder.
        let _ = api
            .call(account, |client, token| {
                client.delete(&message_url).bearer_auth(token)
            })
            .await;
    }
    status
}

fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn attach_and_send(
    api: &Api,
    account: &Account,
    message_url: &str,
    raw: &[u8],
    parsed: &mail_parser::Message<'_>,
) -> Status {
    let b64 = base64::engine::general_purpose::STANDARD;
    for a in attachments(raw, parsed) {
        let mut item = json!({
            "name": a.name,
            "contentType": a.content_type,
            "isInline": a.inline,
        });
        if let Some(id) = &a.content_id {
            item["contentId"] = id.clone().into();
        }
        // JSON around the base64: a little over the base64's own length.
        let fits = base64_len(a.bytes.len() as u64) + 1024 <= MAX_REQUEST;
        let status = if fits {
            item["@odata.type"] = "#microsoft.graph.fileAttachment".into();
            item["contentBytes"] = b64.encode(&a.bytes).into();
            let body = item.to_string();
            step(
                api.call(account, |client, token| {
                    client
                        .post(format!("{message_url}/attachments"))
                        .bearer_auth(token)
                        .header(CONTENT_TYPE, "application/json")
                        .body(body.clone())
                })
                .await,
                api,
                account,
            )
        } else {
            upload(api, account, message_url, item, &a.bytes).await
        };
        if !status.is_accepted() {
            return status;
        }
    }
    step(
        api.call(account, |client, token| {
            client
                .post(format!("{message_url}/send"))
                .bearer_auth(token)
                .header(CONTENT_LENGTH, 0)
        })
        .await,
        api,
        account,
    )
}

/// A step's answer: accepted, or the status that ends the large way.
fn step(answer: Result<Answer, Status>, api: &Api, account: &Account) -> Status {
    match answer {
        Ok(a) if reading(&a) == Reading::Sent => super::sent(&a),
        Ok(a) => api.refused(account, &a),
        Err(status) => status,
    }
}

/// An attachment too large for one request: an upload session, then `PUT`s of at most
/// [`MAX_REQUEST`] bytes, in order, with no bearer token (the URL is pre-authenticated).
async fn upload(
    api: &Api,
    account: &Account,
    message_url: &str,
    mut item: Value,
    bytes: &[u8],
) -> Status {
    item["attachmentType"] = "file".into();
    item["size"] = bytes.len().into();
    let body = json!({ "AttachmentItem": item }).to_string();
    let session = api
        .call(account, |client, token| {
            client
                .post(format!("{message_url}/attachments/createUploadSession"))
                .bearer_auth(token)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await;
    let upload_url = match session {
        Ok(a) if reading(&a) == Reading::Sent => match a.upload_url.clone() {
            Some(url) => url,
            None => {
                return Status::temporary(
                    Cause::Connection,
                    Reply::new(
                        451,
                        "4.4.1 Microsoft Graph opened no upload session; try again later",
                    ),
                )
            }
        },
        Ok(a) => return api.refused(account, &a),
        Err(status) => return status,
    };
    let total = bytes.len();
    let mut at = 0;
    while at < total {
        let end = (at + MAX_REQUEST as usize).min(total);
        let chunk = Bytes::copy_from_slice(&bytes[at..end]);
        let answer = api
            .call_unauthenticated(account, |client| {
                client
                    .put(&upload_url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, chunk.len())
                    .header(CONTENT_RANGE, format!("bytes {at}-{}/{total}", end - 1))
                    .body(chunk.clone())
            })
            .await;
        match answer {
            Ok(a) if reading(&a) == Reading::Sent => {}
            Ok(a) => return api.refused(account, &a),
            Err(status) => return status,
        }
        at = end;
    }
    Status::Accepted {
        reply: Reply::new(250, "2.0.0 attached"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn base64_across_chunk_boundaries_is_the_base64_of_the_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        for split in [1, 2, 3, 4, 5, 7, 100, 999] {
            let chunks: Vec<std::io::Result<Bytes>> = data
                .chunks(split)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let mut out = Vec::new();
            let mut s = std::pin::pin!(base64_stream(futures_util::stream::iter(chunks)));
            while let Some(c) = s.next().await {
                out.extend_from_slice(&c.unwrap());
            }
            let want = base64::engine::general_purpose::STANDARD.encode(&data);
            assert_eq!(String::from_utf8(out).unwrap(), want, "split {split}");
            assert_eq!(base64_len(data.len() as u64), want.len() as u64);
        }
    }

    #[test]
    fn a_draft_carries_what_graph_can_take_of_the_message() {
        let raw = b"From: \"News\" <news@example.com>\r\nTo: a@example.org\r\nBcc: b@example.org\r\n\
            Subject: Big one\r\nX-Campaign: 42\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
            --b\r\nContent-Type: text/html\r\n\r\n<p>Hi</p>\r\n--b\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\n\
            Content-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n\
            --b\r\nContent-Type: text/csv; charset=utf-8\r\nContent-Disposition: attachment; filename=\"x.csv\"\r\n\
            Content-Transfer-Encoding: base64\r\n\r\n/wAB\r\n--b\r\nContent-Type: text/plain\r\n\
            Content-Disposition: attachment; filename=\"q.txt\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
            a=3Db=\r\nc\r\n--b--\r\n";
        let parsed = MessageParser::default().parse(&raw[..]).unwrap();
        let d = draft(&parsed);
        assert_eq!(d["subject"], "Big one");
        assert_eq!(d["body"]["contentType"], "HTML");
        assert_eq!(
            d["toRecipients"][0]["emailAddress"]["address"],
            "a@example.org"
        );
        assert_eq!(
            d["bccRecipients"][0]["emailAddress"]["address"],
            "b@example.org"
        );
        assert_eq!(d["from"]["emailAddress"]["name"], "News");
        assert_eq!(d["internetMessageHeaders"][0]["name"], "X-Campaign");
        let a = attachments(&raw[..], &parsed);
        assert_eq!(a.len(), 3);
        assert_eq!(
            (a[0].name.as_str(), a[0].content_type.as_str()),
            ("r.pdf", "application/pdf")
        );
        assert_eq!(&*a[0].bytes, b"%PDF");
        // Text attachments keep their bytes, not the parser's reading of them as text.
        assert_eq!(&*a[1].bytes, [0xff, 0x00, 0x01]);
        // The CRLF before a boundary belongs to the boundary (RFC 2046 §5.1.1).
        assert_eq!(&*a[2].bytes, b"a=bc");
    }
}

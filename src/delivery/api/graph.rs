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
use super::{Api, Outgoing, Refusals};
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
    // The first HTML body, else the first text body (the parser would offer either converted
    // into the other: only a part of that very type is taken).
    let html = message.html_part(0).filter(|p| p.is_text_html());
    let text = message
        .text_part(0)
        .filter(|p| p.is_text() && !p.is_text_html());
    if let Some(html) = html.and_then(|p| p.text_contents()) {
        d["body"] = json!({ "contentType": "HTML", "content": html });
    } else if let Some(text) = text.and_then(|p| p.text_contents()) {
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
struct Attachment {
    name: String,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
    bytes: Vec<u8>,
}

/// A part's bytes as sent, transfer encoding undone. The parser's own reading of a text part is
/// its text, charset-converted (and lossy for bytes that are not text): an attachment must keep
/// its bytes, so a text part is decoded here from the raw message.
fn part_bytes(raw: &[u8], part: &mail_parser::MessagePart<'_>) -> Vec<u8> {
    if !part.is_text() {
        return part.contents().to_vec();
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
    decoded.unwrap_or_else(|| body.to_vec())
}

fn attachments(raw: &[u8], message: &mail_parser::Message<'_>) -> Vec<Attachment> {
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

/// What the large way sends: the draft's JSON and the attachments.
struct Prepared {
    draft: String,
    attachments: Vec<Attachment>,
}

/// Parses the message (on the blocking pool: a 35 MB message is tens of milliseconds of work).
async fn prepare(bytes: Vec<u8>) -> Result<Prepared, Status> {
    let parsed = tokio::task::spawn_blocking(move || {
        let parsed = MessageParser::default().parse(&bytes)?;
        Some(Prepared {
            draft: draft(&parsed).to_string(),
            attachments: attachments(&bytes, &parsed),
        })
    })
    .await
    .ok()
    .flatten();
    let Some(prepared) = parsed else {
        return Err(Status::Permanent {
            reply: Reply::new(
                554,
                "5.6.0 The message cannot be parsed as MIME for Microsoft Graph",
            ),
        });
    };
    if prepared.draft.len() as u64 > MAX_REQUEST {
        return Err(too_large("the message's text"));
    }
    Ok(prepared)
}

/// A step of the large way: accepted, or the status that ends it. A 403 here is about the large
/// way (it needs Mail.ReadWrite, which small messages do not): the message waits, the account
/// does not.
async fn step<F>(api: &Api, account: &Account, make: F) -> Result<Answer, Status>
where
    F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
{
    let a = api.call_as(account, Refusals::OfTheStep, make).await?;
    match reading(&a) {
        Reading::Sent => Ok(a),
        Reading::GrantRefused => {
            let name = &account.name;
            tracing::warn!(account = %name, answer = %a.summary(), "Microsoft Graph refused a draft step: Mail.ReadWrite missing?");
            Err(Status::temporary(
                Cause::Deferred,
                Reply::new(
                    451,
                    format!(
                        "4.7.0 account `{name}`: Microsoft Graph refused to build this message as a draft ({}); \
                         messages over about 3 MB need the Mail.ReadWrite permission: add \
                         https://graph.microsoft.com/Mail.ReadWrite to the provider's scopes and run \
                         `{}` again (smaller messages are not affected)",
                        a.summary(),
                        crate::hints::command(&format!("authorize {name}"))
                    ),
                ),
            ))
        }
        _ => Err(api.refused(account, &a)),
    }
}

async fn large(api: &Api, account: &Account, message: &Outgoing) -> Status {
    let bytes = match message.all().await {
        Ok(b) => b,
        Err(e) => return super::local_error(&e),
    };
    let prepared = match prepare(bytes).await {
        Ok(p) => p,
        Err(status) => return status,
    };
    let base = mailbox_url(account);
    let created = step(api, account, |client, token| {
        client
            .post(format!("{base}/messages"))
            .bearer_auth(token)
            .header(CONTENT_TYPE, "application/json")
            .body(prepared.draft.clone())
    })
    .await;
    let id = match created.map(|a| a.id.filter(|_| a.status == 201 || a.status == 200)) {
        Ok(Some(id)) => id,
        Ok(None) => {
            return Status::temporary(
                Cause::Connection,
                Reply::new(
                    451,
                    "4.4.1 Microsoft Graph created no draft id; try again later",
                ),
            )
        }
        Err(status) => return status,
    };
    let message_url = format!("{base}/messages/{}", encode_segment(&id));
    let status = match attach_and_send(api, account, &message_url, &prepared.attachments).await {
        Ok(a) => super::sent(&a),
        Err(status) => status,
    };
    if !status.is_accepted() {
        // A draft left behind would sit in the mailbox's Drafts folder.
        let _ = step(api, account, |client, token| {
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
    attachments: &[Attachment],
) -> Result<Answer, Status> {
    let b64 = base64::engine::general_purpose::STANDARD;
    for a in attachments {
        let mut item = json!({
            "name": a.name,
            "contentType": a.content_type,
            "isInline": a.inline,
        });
        if let Some(id) = &a.content_id {
            item["contentId"] = id.clone().into();
        }
        // JSON around the base64: a little over the base64's own length.
        if base64_len(a.bytes.len() as u64) + 1024 <= MAX_REQUEST {
            item["@odata.type"] = "#microsoft.graph.fileAttachment".into();
            item["contentBytes"] = b64.encode(&a.bytes).into();
            let body = item.to_string();
            step(api, account, |client, token| {
                client
                    .post(format!("{message_url}/attachments"))
                    .bearer_auth(token)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        } else {
            upload(api, account, message_url, item, &a.bytes).await?;
        }
    }
    step(api, account, |client, token| {
        client
            .post(format!("{message_url}/send"))
            .bearer_auth(token)
            .header(CONTENT_LENGTH, 0)
    })
    .await
}

/// An attachment too large for one request: an upload session, then `PUT`s of at most
/// [`MAX_REQUEST`] bytes, in order, with no bearer token (the URL is pre-authenticated).
async fn upload(
    api: &Api,
    account: &Account,
    message_url: &str,
    mut item: Value,
    bytes: &[u8],
) -> Result<(), Status> {
    item["attachmentType"] = "file".into();
    item["size"] = bytes.len().into();
    let body = json!({ "AttachmentItem": item }).to_string();
    let session = step(api, account, |client, token| {
        client
            .post(format!("{message_url}/attachments/createUploadSession"))
            .bearer_auth(token)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
    })
    .await?;
    let lost = |what: String| {
        Status::temporary(
            Cause::Connection,
            Reply::new(
                451,
                format!("4.4.1 Microsoft Graph upload session: {what}; try again later"),
            ),
        )
    };
    let Some(upload_url) = session.upload_url else {
        return Err(lost("no upload URL in the answer".into()));
    };
    let total = bytes.len();
    let mut at = 0;
    while at < total {
        let end = (at + MAX_REQUEST as usize).min(total);
        let chunk = Bytes::copy_from_slice(&bytes[at..end]);
        let a = api
            .call_unauthenticated(account, |client| {
                client
                    .put(&upload_url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, chunk.len())
                    .header(CONTENT_RANGE, format!("bytes {at}-{}/{total}", end - 1))
                    .body(chunk.clone())
            })
            .await?;
        match a.status {
            200..=299 => {}
            413 => return Err(api.refused(account, &a)),
            // The session expired or was lost: nothing about the message or the grant.
            _ => return Err(lost(a.summary())),
        }
        at = end;
    }
    Ok(())
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
    fn a_text_only_message_stays_text_in_its_draft() {
        let raw = b"To: a@example.org\r\nSubject: plain\r\n\r\nJust <text>.\r\n";
        let parsed = MessageParser::default().parse(&raw[..]).unwrap();
        let d = draft(&parsed);
        assert_eq!(d["body"]["contentType"], "Text");
        assert_eq!(d["body"]["content"], "Just <text>.\r\n");
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

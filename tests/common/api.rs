//! Fakes of Microsoft Graph (under `/graph/v1.0`) and the Gmail API, checking what the real ones
//! check: a bearer token the fake token endpoint issued, for the mailbox and with the scope the
//! API needs; the exact paths and content types; base64 that decodes; Graph's 4,000,000-byte
//! request limit (`413` above it); upload sessions whose ranges add up, with no bearer token on
//! them. Recipients are read from the headers, as the APIs do (so a test sees the `Bcc` the
//! relay added). A scripted answer (`State::api_script`) replaces the next request's work.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use mail_parser::MessageParser;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::*;

/// Graph's limit on one request's body.
pub const GRAPH_MAX_REQUEST: usize = 4_000_000;
/// The Gmail API's limit on a message.
pub const GMAIL_MAX: usize = 36_700_160;

#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub json: Value,
    pub attachments: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, Default)]
pub struct Upload {
    pub draft: String,
    pub name: String,
    pub size: usize,
    pub received: Vec<u8>,
}

pub async fn start(state: Shared) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { serve(state, addr, method, uri, headers, body).await }
            },
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn answer(status: u16, body: Value, headers: &[(&str, String)]) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap(),
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    )
        .into_response();
    for (k, v) in headers {
        r.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

fn graph_error(status: u16, code: &str, message: &str) -> Response {
    answer(
        status,
        json!({"error": {"code": code, "message": message}}),
        &[],
    )
}

fn gmail_error(status: u16, reason: &str, message: &str) -> Response {
    answer(
        status,
        json!({"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}),
        &[],
    )
}

/// The addresses in To, Cc and Bcc of a MIME message.
pub fn header_recipients(mime: &[u8]) -> Vec<String> {
    let Some(m) = MessageParser::default().parse_headers(mime) else {
        return Vec::new();
    };
    [m.to(), m.cc(), m.bcc()]
        .into_iter()
        .flatten()
        .flat_map(|a| a.iter())
        .filter_map(|a| a.address.as_deref().map(str::to_string))
        .collect()
}

async fn serve(
    state: Shared,
    addr: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    {
        let mut s = state.lock().unwrap();
        s.api_requests.push(format!("{method} {path}"));
        s.api_now += 1;
        s.api_peak = s.api_peak.max(s.api_now);
        s.changed.notify_waiters();
    }
    held(&state).await;
    let scripted = state.lock().unwrap().api_script.pop_front();
    let response = match scripted {
        Some((status, body, extra)) => {
            let extra: Vec<(&str, String)> =
                extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let mut r = answer(status, Value::Null, &extra);
            *r.body_mut() = body.into();
            r
        }
        None => route(&state, addr, &method, &uri, &headers, &body),
    };
    let mut s = state.lock().unwrap();
    s.api_now -= 1;
    s.changed.notify_waiters();
    response
}

/// Which API a path is for, and the scope words its token must carry.
fn needs(path: &str) -> (&'static str, &'static [&'static str]) {
    if path.starts_with("/graph/") {
        ("graph", &["Mail.Send", ".default"])
    } else {
        ("gmail", &["gmail.send", "mail.google.com", "gmail.compose"])
    }
}

fn route(
    state: &Shared,
    addr: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let path = uri.path();
    if path.starts_with("/upload-session/") {
        return upload(state, path, headers, body);
    }
    let (api, scopes) = needs(path);
    let refuse = |status, code: &str, message: &str| match api {
        "graph" => graph_error(status, code, message),
        _ => gmail_error(status, code, message),
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut s = state.lock().unwrap();
    if !s.token_valid(token) {
        return match api {
            "graph" => graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            ),
            _ => gmail_error(401, "authError", "Invalid Credentials"),
        };
    }
    let granted = s.access_scopes.get(token).cloned().unwrap_or_default();
    // Drafts (Graph's large way) need Mail.ReadWrite besides Mail.Send.
    let drafts = api == "graph" && path.contains("/messages");
    let read_write = granted.contains("Mail.ReadWrite") || granted.contains(".default");
    if !scopes.iter().any(|w| granted.contains(w)) || (drafts && !read_write) {
        return match api {
            "graph" => graph_error(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
            _ => gmail_error(
                403,
                "insufficientPermissions",
                "Request had insufficient authentication scopes.",
            ),
        };
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if api == "gmail" {
        if method != Method::POST
            || path != "/upload/gmail/v1/users/me/messages/send"
            || uri.query() != Some("uploadType=media")
        {
            return refuse(404, "notFound", "Not Found");
        }
        if content_type != "message/rfc822" {
            return refuse(400, "badContent", "Media type not supported");
        }
        if body.len() > GMAIL_MAX {
            return refuse(413, "uploadTooLarge", "Request entity too large");
        }
        return record(&mut s, body.to_vec(), Vec::new(), |n| {
            answer(200, json!({"id": format!("gm-{n}"), "threadId": format!("t-{n}"), "labelIds": ["SENT"]}), &[])
        })
        .unwrap_or_else(|| refuse(400, "invalidArgument", "Recipient address required"));
    }
    if body.len() > GRAPH_MAX_REQUEST {
        return graph_error(
            413,
            "RequestEntityTooLarge",
            "The maximum request length supported is 4MB.",
        );
    }
    let Some(rest) = path.strip_prefix("/graph/v1.0/users/") else {
        return graph_error(404, "ResourceNotFound", "Resource not found");
    };
    let (mailbox, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let mailbox = url::form_urlencoded::parse(format!("m={mailbox}").as_bytes())
        .next()
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    if mailbox != s.mailbox {
        return graph_error(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        );
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.clone(), parts.as_slice()) {
        (Method::POST, ["sendMail"]) => {
            if content_type != "text/plain" {
                return graph_error(
                    400,
                    "ErrorInvalidRequest",
                    "MIME content must be text/plain",
                );
            }
            let Ok(mime) = base64::engine::general_purpose::STANDARD.decode(body) else {
                return graph_error(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                );
            };
            record(&mut s, mime, Vec::new(), |n| {
                answer(202, Value::Null, &[("request-id", format!("req-{n}"))])
            })
            .unwrap_or_else(|| {
                graph_error(
                    400,
                    "ErrorInvalidRecipients",
                    "A message can't be sent because it contains no recipients.",
                )
            })
        }
        (Method::POST, ["messages"]) => {
            let Ok(json) = serde_json::from_slice::<Value>(body) else {
                return graph_error(400, "BadRequest", "Invalid JSON");
            };
            s.counter += 1;
            let id = format!("draft-{}/{}=", s.counter, rand_u32());
            s.drafts.insert(
                id.clone(),
                Draft {
                    json,
                    attachments: Vec::new(),
                },
            );
            answer(201, json!({"id": id}), &[])
        }
        (m, ["messages", id, tail @ ..]) => {
            let id = url::form_urlencoded::parse(format!("i={id}").as_bytes())
                .next()
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            if !s.drafts.contains_key(&id) {
                return graph_error(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                );
            }
            match (m, tail) {
                (Method::DELETE, []) => {
                    s.drafts.remove(&id);
                    answer(204, Value::Null, &[])
                }
                (Method::POST, ["attachments"]) => {
                    let json: Value = serde_json::from_slice(body).unwrap_or_default();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(json["contentBytes"].as_str().unwrap_or_default());
                    let Ok(bytes) = bytes else {
                        return graph_error(
                            400,
                            "ErrorInvalidRequest",
                            "contentBytes is not base64",
                        );
                    };
                    let name = json["name"].as_str().unwrap_or_default().to_string();
                    s.drafts
                        .get_mut(&id)
                        .unwrap()
                        .attachments
                        .push((name, bytes));
                    answer(201, json!({"id": "att"}), &[])
                }
                (Method::POST, ["attachments", "createUploadSession"]) => {
                    let json: Value = serde_json::from_slice(body).unwrap_or_default();
                    let item = &json["AttachmentItem"];
                    if item["attachmentType"] != "file" {
                        return graph_error(
                            400,
                            "ErrorInvalidRequest",
                            "attachmentType must be file",
                        );
                    }
                    s.counter += 1;
                    let session = format!("s{}", s.counter);
                    s.uploads.insert(
                        session.clone(),
                        Upload {
                            draft: id.clone(),
                            name: item["name"].as_str().unwrap_or_default().to_string(),
                            size: item["size"].as_u64().unwrap_or(0) as usize,
                            received: Vec::new(),
                        },
                    );
                    answer(
                        201,
                        json!({"uploadUrl": format!("http://{addr}/upload-session/{session}?authtoken=x"), "nextExpectedRanges": ["0-"]}),
                        &[],
                    )
                }
                (Method::POST, ["send"]) => {
                    if s.uploads.values().any(|u| u.draft == id) {
                        return graph_error(
                            400,
                            "ErrorInvalidRequest",
                            "an attachment upload is not complete",
                        );
                    }
                    let draft = s.drafts.remove(&id).unwrap();
                    let rcpts: Vec<String> = ["toRecipients", "ccRecipients", "bccRecipients"]
                        .iter()
                        .flat_map(|k| draft.json[k].as_array().cloned().unwrap_or_default())
                        .filter_map(|r| r["emailAddress"]["address"].as_str().map(str::to_string))
                        .collect();
                    if rcpts.is_empty() {
                        return graph_error(
                            400,
                            "ErrorInvalidRecipients",
                            "A message can't be sent because it contains no recipients.",
                        );
                    }
                    let from = draft.json["from"]["emailAddress"]["address"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    s.messages.push(Message {
                        mail_from: from,
                        rcpts,
                        body: draft.json.to_string().into_bytes(),
                        at: Some(std::time::Instant::now()),
                        attachments: draft.attachments,
                    });
                    s.changed.notify_waiters();
                    answer(202, Value::Null, &[("request-id", "req-send".to_string())])
                }
                _ => graph_error(405, "ErrorInvalidRequest", "Method not allowed"),
            }
        }
        _ => graph_error(404, "ResourceNotFound", "Resource not found"),
    }
}

/// Records a message whose recipients are its header recipients; `None` when it has none.
fn record(
    s: &mut State,
    mime: Vec<u8>,
    attachments: Vec<(String, Vec<u8>)>,
    ok: impl FnOnce(u64) -> Response,
) -> Option<Response> {
    let rcpts = header_recipients(&mime);
    if rcpts.is_empty() {
        return None;
    }
    let from = MessageParser::default()
        .parse_headers(&mime[..])
        .and_then(|m| {
            m.from()
                .and_then(|f| f.first())
                .and_then(|a| a.address.as_deref().map(str::to_string))
        })
        .unwrap_or_default();
    s.counter += 1;
    let n = s.counter;
    s.messages.push(Message {
        mail_from: from,
        rcpts,
        body: mime,
        at: Some(std::time::Instant::now()),
        attachments,
    });
    s.changed.notify_waiters();
    Some(ok(n))
}

/// A `PUT` to an upload session: pre-authenticated (a bearer token is an error), ranges in order.
fn upload(state: &Shared, path: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    if headers.contains_key("authorization") {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "Do not send an Authorization header to the upload URL",
        );
    }
    if body.len() > GRAPH_MAX_REQUEST {
        return graph_error(
            413,
            "RequestEntityTooLarge",
            "The maximum request length supported is 4MB.",
        );
    }
    let mut s = state.lock().unwrap();
    let session = path.trim_start_matches("/upload-session/").to_string();
    let Some(up) = s.uploads.get_mut(&session) else {
        return graph_error(404, "ErrorItemNotFound", "no such upload session");
    };
    let range = headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| {
            let (span, total) = v.split_once('/')?;
            let (a, b) = span.split_once('-')?;
            Some((
                a.parse::<usize>().ok()?,
                b.parse::<usize>().ok()?,
                total.parse::<usize>().ok()?,
            ))
        });
    let Some((a, b, total)) = range else {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "Content-Range missing or malformed",
        );
    };
    if a != up.received.len() || b + 1 - a != body.len() || total != up.size {
        return graph_error(
            416,
            "ErrorInvalidRange",
            "the range does not continue the upload",
        );
    }
    up.received.extend_from_slice(body);
    if up.received.len() < up.size {
        let next = up.received.len();
        return answer(
            200,
            json!({"nextExpectedRanges": [format!("{next}-")]}),
            &[],
        );
    }
    let up = s.uploads.remove(&session).unwrap();
    if let Some(d) = s.drafts.get_mut(&up.draft) {
        d.attachments.push((up.name, up.received));
    }
    answer(201, Value::Null, &[("location", "attachment".to_string())])
}

/// A provider table for an API transport on the fake (`transport` = "graph" or "gmail_api"),
/// named `name`, with the relay directory `dir`'s certificates.
pub fn api_table(provider: &FakeProvider, name: &str, transport: &str, extra: &str) -> String {
    format!(
        "\n[providers.{name}]\ntoken_url = \"{base}/token\"\nclient_id = \"test-client\"\n\
         client_secret = \"test-client-SECRET\"\ntransport = \"{transport}\"\napi_url = \"{api}\"\n{extra}\n",
        base = provider.base_url(),
        api = provider.api_url(transport),
    )
}

/// The scope the fake grants for `transport`.
pub fn api_scope(transport: &str) -> &'static str {
    match transport {
        "graph" => "https://graph.microsoft.com/Mail.Send offline_access",
        _ => "https://www.googleapis.com/auth/gmail.send",
    }
}

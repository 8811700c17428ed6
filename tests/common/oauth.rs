//! The fake OAuth endpoints: token (refresh, client credentials, JWT bearer, authorization code
//! with PKCE), device code, revocation; each request parsed and checked as a provider would.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

pub fn parse_form(s: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(s.as_bytes())
        .into_owned()
        .collect()
}

pub async fn read_http(stream: &mut TcpStream) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            break (pos + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut first = head.lines().next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Some(HttpRequest {
        method,
        path: path.to_string(),
        query: parse_form(query),
        form: parse_form(&String::from_utf8_lossy(&buf[head_end..head_end + len])),
    })
}

pub fn json_error(code: &str, description: &str) -> (u16, String, Vec<(String, String)>) {
    (
        400,
        serde_json::json!({"error": code, "error_description": description}).to_string(),
        vec![],
    )
}

pub fn token_route(req: &HttpRequest, state: &Shared) -> (u16, String, Vec<(String, String)>) {
    let mut s = state.lock().unwrap();
    s.token_requests += 1;
    if s.token_outage {
        return (
            503,
            "<html>Service Unavailable</html>".into(),
            vec![("Content-Type".into(), "text/html".into())],
        );
    }
    let grant = req.form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant == "refresh_token" {
        if req.form.get("client_id") != Some(&s.client_id)
            || s.client_secret.is_some()
                && req.form.get("client_secret") != s.client_secret.as_ref()
        {
            return json_error("invalid_client", "bad client credentials");
        }
        s.refresh_count += 1;
        let rt = req.form.get("refresh_token").cloned().unwrap_or_default();
        if !s.refresh_tokens.contains(&rt) {
            return json_error("invalid_grant", "Token has been expired or revoked.");
        }
        let new_rt = if s.rotate {
            s.refresh_tokens.remove(&rt);
            Some(s.add_refresh_token())
        } else {
            None
        };
        return (200, s.token_json(new_rt), vec![]);
    }
    json_error("unsupported_grant_type", grant)
}

pub async fn http_server(listener: TcpListener, state: Shared, extra: Option<Handler>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let Some(req) = read_http(&mut stream).await else {
                return;
            };
            let routed = extra.as_ref().and_then(|h| h(&req, &state));
            let (status, body, headers) = match routed {
                Some(r) => r,
                None if req.path == "/token" && req.method == "POST" => token_route(&req, &state),
                None => (404, "{}".to_string(), vec![]),
            };
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("Content-Type: application/json\r\n");
            }
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

//! A small HTTP/1.1 client for the OAuth endpoints (token, device, revocation).
//!
//! Token endpoints take one form POST and answer with a small JSON body, so a request per connection
//! (`Connection: close`) over tokio + rustls is all that is needed; it keeps hyper/reqwest and their
//! second TLS stack out of the build. It plugs into the `oauth2` crate as its `AsyncHttpClient`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use oauth2::http;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug)]
pub struct HttpError(pub String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(tls: Arc<rustls::ClientConfig>, timeout: Duration) -> HttpClient {
        HttpClient { tls, timeout }
    }

    pub async fn send(
        &self,
        request: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, HttpError> {
        tokio::time::timeout(self.timeout, self.send_inner(request))
            .await
            .map_err(|_| HttpError(format!("no answer within {}s", self.timeout.as_secs())))?
    }

    async fn send_inner(
        &self,
        request: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, HttpError> {
        let uri = request.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| HttpError(format!("{uri}: no host")))?
            .to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(HttpError(format!(
                    "{uri}: only http and https are supported"
                )))
            }
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| HttpError(format!("cannot connect to {host}:{port}: {e}")))?;
        let head = request_head(&request, &host, port, https);
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| HttpError(format!("{host}: not a valid TLS server name")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError(format!("TLS with {host}: {e}")))?;
            exchange(tls, head, request.body()).await
        } else {
            exchange(tcp, head, request.body()).await
        }
    }
}

fn request_head(request: &oauth2::HttpRequest, host: &str, port: u16, https: bool) -> String {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let default_port = if https { 443 } else { 80 };
    let host_header = if port == default_port {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        request.method(),
        path,
        host_header
    );
    for (name, value) in request.headers() {
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nUser-Agent: xoauth-relay\r\n\r\n",
        request.body().len()
    ));
    head
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    head: String,
    body: &[u8],
) -> Result<oauth2::HttpResponse, HttpError> {
    let io = |e: std::io::Error| HttpError(format!("connection error: {e}"));
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // Servers often close TLS without close_notify; what arrived is complete per Content-Length.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io(e)),
        }
        if raw.len() > MAX_RESPONSE {
            return Err(HttpError("response larger than 1 MiB".into()));
        }
        if response_complete(&raw) {
            break;
        }
    }
    parse_response(&raw)
}

fn split_head(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&raw[..end], &raw[end + 4..]))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn response_complete(raw: &[u8]) -> bool {
    let Some((head, body)) = split_head(raw) else {
        return false;
    };
    let head = String::from_utf8_lossy(head);
    if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= len;
    }
    if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return body.windows(5).any(|w| w == b"0\r\n\r\n");
    }
    false
}

fn parse_response(raw: &[u8]) -> Result<oauth2::HttpResponse, HttpError> {
    let (head, body) =
        split_head(raw).ok_or_else(|| HttpError("incomplete HTTP response".into()))?;
    let head = String::from_utf8_lossy(head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError("malformed HTTP status line".into()))?;
    let body = if header(&head, "transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        body.get(..len)
            .ok_or_else(|| HttpError("HTTP body shorter than Content-Length".into()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    let mut response = http::Response::builder().status(status);
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            response = response.header(k.trim(), v.trim());
        }
    }
    response
        .body(body)
        .map_err(|e| HttpError(format!("bad HTTP response: {e}")))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, HttpError> {
    let bad = || HttpError("malformed chunked body".into());
    let mut out = Vec::new();
    loop {
        let nl = body.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&body[..nl]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        body = &body[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or_else(bad)?);
        body = body.get(size + 2..).ok_or_else(bad)?;
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future =
        Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body(), b"{\"a\":1}");
        let r = parse_response(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r.status().as_u16(), 400);
        assert_eq!(r.body(), b"{}");
        assert!(response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}"
        ));
    }
}

//! The HTTP client for the OAuth endpoints (token, device, revocation): reqwest on rustls with the
//! ring provider, so proxies (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`), connection reuse, IPv6
//! literals, chunked bodies and 1xx answers behave as HTTP does. It plugs into the `oauth2` crate
//! as its `AsyncHttpClient`.
//!
//! Each provider gets its own client: the public roots plus the provider's `http_ca_file`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::{Config, Provider};

/// Longest answer read from an OAuth endpoint.
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
    client: reqwest::Client,
}

/// reqwest's error with its causes ("error sending request" alone says nothing); never a body.
pub fn describe(e: reqwest::Error) -> HttpError {
    // The URL without its query: a device or token request never carries secrets there, but an
    // authorize URL might carry state.
    let url = e
        .url()
        .map(|u| format!("{}{}", u.origin().ascii_serialization(), u.path()));
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    HttpError(match url {
        Some(url) => format!("{url}: {text}"),
        None => text,
    })
}

impl HttpClient {
    /// A client trusting the public roots plus `extra_ca`; `timeout` bounds each request.
    pub fn new(
        extra_ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<HttpClient, String> {
        let client = crate::util::tls::http_client_builder(extra_ca, &[])?
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| describe(e).0)?;
        Ok(HttpClient { client })
    }

    /// The client for `provider`'s endpoints.
    pub fn for_provider(provider: &Provider, timeout: Duration) -> Result<HttpClient, String> {
        HttpClient::new(provider.http_ca_file.as_deref(), timeout)
            .map_err(|e| format!("provider `{}`: http_ca_file: {e}", provider.name))
    }

    pub async fn send(
        &self,
        request: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        let mut builder = oauth2::http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        // Token answers are a few hundred bytes; more is not an answer.
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(HttpError(format!(
                    "answer longer than {} KiB",
                    MAX_RESPONSE / 1024
                )));
            }
            body.extend_from_slice(&chunk);
        }
        builder
            .body(body)
            .map_err(|e| HttpError(format!("unusable answer: {e}")))
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

/// One [`HttpClient`] per provider of a config. Clones share one set, which a reload replaces.
#[derive(Clone)]
pub struct HttpClients(std::sync::Arc<arc_swap::ArcSwap<HashMap<String, HttpClient>>>);

impl HttpClients {
    pub fn new(config: &Config) -> Result<HttpClients, String> {
        let timeout = Duration::from_secs(config.limits.upstream_timeout_secs);
        let map: HashMap<String, HttpClient> = config
            .providers
            .iter()
            .map(|(name, p)| Ok((name.clone(), HttpClient::for_provider(p, timeout)?)))
            .collect::<Result<_, String>>()?;
        Ok(HttpClients(std::sync::Arc::new(
            arc_swap::ArcSwap::from_pointee(map),
        )))
    }

    pub fn get(&self, provider: &Provider) -> Result<HttpClient, String> {
        self.0
            .load()
            .get(&provider.name)
            .cloned()
            .ok_or_else(|| format!("provider `{}`: no HTTP client", provider.name))
    }

    /// Puts `other`'s clients in force for every clone of this set (a reloaded config).
    pub fn replace(&self, other: HttpClients) {
        self.0.store(other.0.load_full());
    }
}

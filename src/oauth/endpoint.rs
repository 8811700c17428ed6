//! Requests to a provider's OAuth endpoints: refresh, and the grants that need no user
//! (client credentials, Google service accounts). Interactive flows live in `authorize.rs`.
//!
//! Everything here returns a [`TokenSet`] or a [`ProviderError`] that keeps the provider's own error
//! code, so the operator sees `invalid_grant` or `AADSTS700082`, not "request failed".

use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, DeviceAuthorizationUrl, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, ErrorResponseType, ExtraTokenFields, RefreshToken,
    RequestTokenError, RevocationUrl, StandardErrorResponse, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};

use super::http::HttpClient;
use crate::config::Provider;
use crate::util::secret::Secret;

/// What a token endpoint gave back.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    pub expires_in: Option<Duration>,
    /// Present when the provider issued (or rotated) a refresh token.
    pub refresh_token: Option<Secret>,
    /// How long the refresh token lives, when the provider says (Google, for Testing-status apps).
    pub refresh_expires_in: Option<Duration>,
    /// The scopes granted (space-separated), when the answer lists them.
    pub scope: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ProviderError {
    /// The grant is dead: revoked, expired, or the user changed password (`invalid_grant`).
    InvalidGrant(String),
    /// Any other error the provider answered with: `code` and description.
    Refused { code: String, description: String },
    /// No usable answer (network, TLS, timeout, unparseable body).
    Unreachable(String),
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderError::InvalidGrant(d) if d.is_empty() => f.write_str("invalid_grant"),
            ProviderError::InvalidGrant(d) => write!(f, "invalid_grant: {d}"),
            ProviderError::Refused { code, description } if description.is_empty() => {
                f.write_str(code)
            }
            ProviderError::Refused { code, description } => write!(f, "{code}: {description}"),
            ProviderError::Unreachable(d) => write!(f, "no usable answer from the provider: {d}"),
        }
    }
}

impl ProviderError {
    /// The OAuth error code (`invalid_grant`, `invalid_client`, ...), or `unreachable`.
    pub fn code(&self) -> &str {
        match self {
            ProviderError::InvalidGrant(_) => "invalid_grant",
            ProviderError::Refused { code, .. } => code,
            ProviderError::Unreachable(_) => "unreachable",
        }
    }

    /// The provider's `error_description` (where Microsoft puts its `AADSTS` code).
    pub fn description(&self) -> &str {
        match self {
            ProviderError::InvalidGrant(d) | ProviderError::Unreachable(d) => d,
            ProviderError::Refused { description, .. } => description,
        }
    }

    /// What the operator should do about it, when known.
    pub fn hint(&self, family: crate::config::Family) -> Option<&'static str> {
        crate::hints::for_provider_error(family, self.code(), self.description())
    }
}

/// What a token response carries beyond RFC 6749: Google's `refresh_token_expires_in`, which a
/// Testing-status app gets (7 days) and which tells us when the grant dies.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GrantExtras {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_in: Option<u64>,
}

impl ExtraTokenFields for GrantExtras {}

pub type OAuthTokenResponse = StandardTokenResponse<GrantExtras, BasicTokenType>;

pub type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    OAuthTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointMaybeSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointSet,
>;

fn bad_url(provider: &Provider, what: &str) -> ProviderError {
    ProviderError::Refused {
        code: "configuration".into(),
        description: format!("provider `{}`: {what} is not a valid URL", provider.name),
    }
}

/// An `oauth2` client for `provider`. Credentials go in the request body: every provider we target
/// accepts that, and public clients (no secret) need it.
pub fn client(provider: &Provider) -> Result<OAuthClient, ProviderError> {
    let token =
        TokenUrl::new(provider.token_url.clone()).map_err(|_| bad_url(provider, "token_url"))?;
    let auth = provider
        .authorize_url
        .clone()
        .map(AuthUrl::new)
        .transpose()
        .map_err(|_| bad_url(provider, "authorize_url"))?;
    let device = provider
        .device_authorization_url
        .clone()
        .map(DeviceAuthorizationUrl::new)
        .transpose()
        .map_err(|_| bad_url(provider, "device_authorization_url"))?;
    let revoke = provider
        .revocation_url
        .clone()
        .map(RevocationUrl::new)
        .transpose()
        .map_err(|_| bad_url(provider, "revocation_url"))?;
    let mut c = oauth2::Client::new(ClientId::new(provider.client_id.clone()))
        .set_auth_uri_option(auth)
        .set_device_authorization_url_option(device)
        .set_revocation_url_option(revoke)
        .set_token_uri(token)
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &provider.client_secret {
        c = c.set_client_secret(ClientSecret::new(secret.expose().to_string()));
    }
    Ok(c)
}

pub fn token_set(response: &OAuthTokenResponse) -> TokenSet {
    TokenSet {
        access_token: Secret::new(response.access_token().secret().clone()),
        expires_in: response.expires_in(),
        refresh_token: response
            .refresh_token()
            .map(|r| Secret::new(r.secret().clone())),
        refresh_expires_in: response
            .extra_fields()
            .refresh_token_expires_in
            .map(Duration::from_secs),
        scope: response.scopes().map(|scopes| {
            scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        }),
    }
}

pub fn classify<RE, T>(error: RequestTokenError<RE, StandardErrorResponse<T>>) -> ProviderError
where
    RE: std::error::Error + 'static,
    T: ErrorResponseType + AsRef<str> + std::fmt::Display,
{
    match error {
        RequestTokenError::ServerResponse(e) => {
            let code = e.error().as_ref().to_string();
            let description = e.error_description().cloned().unwrap_or_default();
            if code == "invalid_grant" {
                ProviderError::InvalidGrant(description)
            } else {
                ProviderError::Refused { code, description }
            }
        }
        RequestTokenError::Request(e) => ProviderError::Unreachable(e.to_string()),
        RequestTokenError::Parse(_, body) => {
            ProviderError::Unreachable(format!("unparseable answer ({} bytes)", body.len()))
        }
        RequestTokenError::Other(s) => ProviderError::Unreachable(s),
    }
}

/// Redeems a refresh token for a new access token (and maybe a rotated refresh token).
pub async fn refresh(
    provider: &Provider,
    http: &HttpClient,
    refresh_token: &Secret,
) -> Result<TokenSet, ProviderError> {
    let client = client(provider)?;
    let token = RefreshToken::new(refresh_token.expose().to_string());
    let response = client
        .exchange_refresh_token(&token)
        .request_async(http)
        .await
        .map_err(classify)?;
    Ok(token_set(&response))
}

fn now_secs() -> u64 {
    crate::util::clock::now_unix()
}

/// Posts a form to a token endpoint and reads the standard token or error answer. Used for grants the
/// `oauth2` crate has no builder for (JWT bearer).
/// POSTs an `application/x-www-form-urlencoded` body to a provider endpoint.
async fn post_form(
    http: &HttpClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<oauth2::HttpResponse, ProviderError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let request = oauth2::http::Request::post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .body(body.into_bytes())
        .map_err(|e| ProviderError::Unreachable(format!("bad request to {url}: {e}")))?;
    http.send(request)
        .await
        .map_err(|e| ProviderError::Unreachable(e.to_string()))
}

pub async fn post_token_form(
    http: &HttpClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<TokenSet, ProviderError> {
    let response = post_form(http, url, form).await?;
    let json: serde_json::Value = serde_json::from_slice(response.body()).map_err(|_| {
        ProviderError::Unreachable(format!(
            "HTTP {} from {url} without a JSON body",
            response.status()
        ))
    })?;
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).map(str::to_string);
    if let Some(code) = field("error") {
        let description = field("error_description").unwrap_or_default();
        return Err(if code == "invalid_grant" {
            ProviderError::InvalidGrant(description)
        } else {
            ProviderError::Refused { code, description }
        });
    }
    let access_token = field("access_token").ok_or_else(|| {
        ProviderError::Unreachable(format!(
            "HTTP {} from {url} without access_token",
            response.status()
        ))
    })?;
    Ok(TokenSet {
        access_token: Secret::new(access_token),
        expires_in: json
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .map(Duration::from_secs),
        refresh_token: field("refresh_token").map(Secret::new),
        refresh_expires_in: json
            .get("refresh_token_expires_in")
            .and_then(|v| v.as_u64())
            .map(Duration::from_secs),
        scope: field("scope"),
    })
}

/// RFC 7009 revocation of a refresh token (by hand: the `oauth2` crate insists on https even for a
/// loopback test provider).
pub async fn revoke(
    provider: &Provider,
    http: &HttpClient,
    refresh_token: &Secret,
) -> Result<(), ProviderError> {
    let Some(url) = &provider.revocation_url else {
        return Ok(());
    };
    let mut form = vec![
        ("token", refresh_token.expose()),
        ("token_type_hint", "refresh_token"),
        ("client_id", provider.client_id.as_str()),
    ];
    if let Some(secret) = &provider.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    let response = post_form(http, url, &form).await?;
    // RFC 7009: 200 also for a token that was already invalid.
    if response.status().is_success() {
        return Ok(());
    }
    // The OAuth error code when the body is an RFC 6749 error object; never the body itself, which
    // may echo the token back.
    let code = serde_json::from_slice::<serde_json::Value>(response.body())
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()));
    Err(ProviderError::Refused {
        code: match code {
            Some(code) => format!("HTTP {} {code}", response.status().as_u16()),
            None => format!("HTTP {}", response.status().as_u16()),
        },
        description: String::new(),
    })
}

fn config_error(provider: &Provider, detail: String) -> ProviderError {
    ProviderError::Refused {
        code: "configuration".into(),
        description: format!("provider `{}`: {detail}", provider.name),
    }
}

/// App-only token (Microsoft 365 SMTP.SendAsApp): client secret, or a certificate-signed assertion.
pub async fn client_credentials(
    provider: &Provider,
    http: &HttpClient,
) -> Result<TokenSet, ProviderError> {
    let client = client(provider)?;
    let mut request = client.exchange_client_credentials();
    for scope in &provider.scopes {
        request = request.add_scope(oauth2::Scope::new(scope.clone()));
    }
    let assertion;
    if let (Some(cert), Some(key)) = (
        &provider.client_certificate_file,
        &provider.client_private_key_file,
    ) {
        let (p, cert, key) = (provider.clone(), cert.clone(), key.clone());
        assertion = off_runtime(move || client_assertion(&p, &cert, &key))
            .await
            .map_err(|e| config_error(provider, e))?;
        request = request
            .add_extra_param(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .add_extra_param("client_assertion", assertion.expose());
    } else if provider.client_secret.is_none() {
        return Err(config_error(
            provider,
            "grant = \"client_credentials\" needs a client secret or client_certificate_file + client_private_key_file".into(),
        ));
    }
    let response = request.request_async(http).await.map_err(classify)?;
    Ok(token_set(&response))
}

/// Key files are read and RSA signatures computed on the blocking pool, not on a runtime worker.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("key task failed: {e}"))?
}

/// RFC 7523 §2.2 client assertion, with the certificate thumbprints Microsoft looks the key up by.
fn client_assertion(
    provider: &Provider,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Secret, String> {
    let pem = std::fs::read_to_string(key)
        .map_err(|e| format!("client_private_key_file {}: {e}", key.display()))?;
    let key =
        super::jwt::rsa_key_from_pem(&pem).map_err(|e| format!("client_private_key_file: {e}"))?;
    let (x5t, x5t256) = super::jwt::certificate_thumbprints(cert)?;
    let now = now_secs();
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| "no randomness")?;
    let claims = serde_json::json!({
        "aud": provider.token_url,
        "iss": provider.client_id,
        "sub": provider.client_id,
        "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    });
    let header = serde_json::json!({ "x5t": x5t, "x5t#S256": x5t256 });
    super::jwt::sign(&key, header, &claims).map(Secret::new)
}

/// Google service account with domain-wide delegation: a JWT for `mailbox`, exchanged with the
/// JWT-bearer grant (RFC 7523 §2.1).
pub async fn service_account(
    provider: &Provider,
    mailbox: &str,
    http: &HttpClient,
) -> Result<TokenSet, ProviderError> {
    let Some(path) = &provider.service_account_key_file else {
        return Err(config_error(
            provider,
            "`service_account_key_file` is not set".into(),
        ));
    };
    let path = path.clone();
    let key = off_runtime(move || super::jwt::load_service_account_key(&path))
        .await
        .map_err(|e| config_error(provider, e))?;
    let now = now_secs();
    let claims = serde_json::json!({
        "iss": key.client_email,
        "sub": mailbox,
        "scope": provider.scopes.join(" "),
        "aud": provider.token_url,
        "iat": now,
        "exp": now + 3600,
    });
    let header = match &key.private_key_id {
        Some(kid) => serde_json::json!({ "kid": kid }),
        None => serde_json::json!({}),
    };
    let jwt = super::jwt::sign(&key.key, header, &claims).map_err(|e| config_error(provider, e))?;
    post_token_form(
        http,
        &provider.token_url,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", &jwt),
        ],
    )
    .await
}

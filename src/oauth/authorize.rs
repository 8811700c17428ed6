//! `xoauth-relay authorize NAME`: getting the first grant, on a laptop or a headless server.
//!
//! - loopback (default): PKCE (S256) authorization code with a redirect to `http://127.0.0.1:PORT/`
//!   served by this command (RFC 8252); `--no-browser` only prints the URL;
//! - `--manual` (paste-back): the same URL, but the operator pastes the redirected URL, or the bare
//!   code, back on stdin, for servers whose loopback the browser cannot reach;
//! - `--device`: the device authorization grant (RFC 8628).
//!
//! Each returns the token set; the caller stores it through the running relay if there is one.
//! Accounts with `grant = "client_credentials"` or `"service_account"` need none of this.

use std::time::Duration;

use oauth2::{
    AuthorizationCode, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardDeviceAuthorizationResponse,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::endpoint::{self as oauth, ProviderError, TokenSet};
use super::http::HttpClient;
use crate::config::{Account, Config, Family, GrantKind, Provider};

pub enum Mode {
    Loopback { open_browser: bool },
    Manual,
    Device,
}

/// How long the loopback listener waits for the browser.
const LOOPBACK_WAIT: Duration = Duration::from_secs(600);
/// Redirect port for paste-back when the provider sets none: nothing listens there, the operator
/// copies the URL from the browser's address bar.
const MANUAL_PORT: u16 = 8765;

fn fail(account: &Account, e: &ProviderError) -> String {
    let hint = e
        .hint(account.provider.family)
        .map(|h| format!("\n  hint: {h}"))
        .unwrap_or_default();
    format!(
        "account `{}`: authorization failed ({e}){hint}",
        account.name
    )
}

/// Runs the flow and returns the tokens to store (always with a refresh token).
pub async fn run(config: &Config, name: &str, mode: Mode) -> Result<TokenSet, String> {
    let account = config.account(name).map_err(|e| e.to_string())?.clone();
    if account.grant != GrantKind::RefreshToken {
        return Err(format!(
            "account `{name}` uses grant = \"{}\": the relay obtains its tokens itself, no authorization needed; \
             check it with `xoauth-relay test {name}`",
            account.grant.as_str()
        ));
    }
    if let Some(placeholder) = config
        .placeholders()
        .into_iter()
        .find(|p| p.starts_with(&format!("[providers.{}]", account.provider.name)))
    {
        return Err(placeholder);
    }
    let http = HttpClient::for_provider(
        &account.provider,
        Duration::from_secs(config.limits.upstream_timeout_secs),
    )?;
    let set = match mode {
        Mode::Device => device(&account, &http).await?,
        Mode::Loopback { open_browser } => loopback(&account, &http, open_browser).await?,
        Mode::Manual => manual(&account, &http).await?,
    };
    if set.refresh_token.is_none() {
        return Err(format!(
            "account `{name}`: the provider issued no refresh token. Google returns one only with \
             access_type=offline and prompt=consent (the relay asks for both: remove the app's access at \
             myaccount.google.com/permissions and retry); Microsoft needs the offline_access scope"
        ));
    }
    Ok(set)
}

struct Pending {
    url: String,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
    redirect: String,
}

fn authorization_url(account: &Account, redirect: String) -> Result<Pending, String> {
    let p = &account.provider;
    if p.authorize_url.is_none() {
        return Err(format!(
            "provider `{}` has no authorize_url; set it, or use `--device` / `import-token`",
            p.name
        ));
    }
    let client = oauth::client(p)
        .map_err(|e| e.to_string())?
        .set_redirect_uri(RedirectUrl::new(redirect.clone()).map_err(|e| e.to_string())?);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .map_err(|e| e.to_string())?
        .set_pkce_challenge(challenge)
        .add_scopes(p.scopes.iter().cloned().map(Scope::new))
        .add_extra_param("login_hint", account.mailbox.clone());
    if p.family == Family::Google {
        // Without both, Google issues no refresh token on a repeated consent.
        request = request
            .add_extra_param("access_type", "offline")
            .add_extra_param("prompt", "consent");
    }
    let (url, state) = request.url();
    Ok(Pending {
        url: url.to_string(),
        state,
        verifier,
        redirect,
    })
}

async fn exchange(
    account: &Account,
    http: &HttpClient,
    pending: Pending,
    code: String,
) -> Result<TokenSet, String> {
    let client = oauth::client(&account.provider)
        .map_err(|e| e.to_string())?
        .set_redirect_uri(RedirectUrl::new(pending.redirect.clone()).map_err(|e| e.to_string())?);
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(pending.verifier)
        .request_async(http)
        .await
        .map_err(|e| fail(account, &oauth::classify(e)))?;
    Ok(oauth::token_set(&response))
}

fn print_url(provider: &Provider, pending: &Pending) {
    println!("Open this URL in a browser and sign in as the account's mailbox:");
    println!("{}", pending.url);
    println!(
        "(redirect URI: {} — it must be registered for client {} of provider `{}`)",
        pending.redirect, provider.client_id, provider.name
    );
}

async fn loopback(
    account: &Account,
    http: &HttpClient,
    open_browser: bool,
) -> Result<TokenSet, String> {
    let port = account.provider.redirect_port.unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|e| {
        format!("cannot listen on 127.0.0.1:{port} for the redirect ({e}); free the port or set another redirect_port")
    })?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let pending = authorization_url(account, format!("http://127.0.0.1:{port}/"))?;
    print_url(&account.provider, &pending);
    let opened = open_browser
        && ["xdg-open", "open"].iter().any(|opener| {
            std::process::Command::new(opener)
                .arg(&pending.url)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .is_ok()
        });
    if open_browser && !opened {
        println!("(no browser could be opened here: open the URL yourself)");
    }
    println!(
        "Waiting for the browser to come back to 127.0.0.1:{port} (up to {} minutes). The browser must run on \
         this machine or reach it through `ssh -L {port}:127.0.0.1:{port}`; otherwise stop and use --manual.",
        LOOPBACK_WAIT.as_secs() / 60
    );
    let result = tokio::time::timeout(LOOPBACK_WAIT, async {
        loop {
            let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
            if let Some(outcome) = serve_redirect(stream, account, http, &pending).await {
                return outcome;
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "no redirect within {} minutes; run the command again",
            LOOPBACK_WAIT.as_secs() / 60
        )
    })?;
    let set = result?;
    println!("Authorization received.");
    Ok(set)
}

/// Handles one browser request to the loopback listener; `None` for requests that are not the
/// redirect (a favicon, say).
async fn serve_redirect(
    mut stream: TcpStream,
    account: &Account,
    http: &HttpClient,
    pending: &Pending,
) -> Option<Result<TokenSet, String>> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf[len..]))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]).to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let query = match target.split_once('?') {
        Some(("/", q)) => q.to_string(),
        _ => {
            let _ = respond(&mut stream, 404, "Not found").await;
            return None;
        }
    };
    if !state_matches(pending, &query) {
        // Not our request (an old tab, a forged link): refuse it and keep waiting for the real one.
        let _ = respond(&mut stream, 400, &stale_state(&account.name)).await;
        return None;
    }
    let outcome = redirect_outcome(account, http, pending, &query).await;
    let (status, page) = match &outcome {
        Ok(_) => (
            200,
            "Authorization received: xoauth-relay is storing the grant (see the terminal). You can close this window."
                .to_string(),
        ),
        Err(e) => (400, format!("Authorization failed: {e}")),
    };
    let _ = respond(&mut stream, status, &page).await;
    Some(outcome)
}

async fn redirect_outcome(
    account: &Account,
    http: &HttpClient,
    pending: &Pending,
    query: &str,
) -> Result<TokenSet, String> {
    let params: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    if let Some(error) = params.get("error") {
        let description = params.get("error_description").cloned().unwrap_or_default();
        return Err(fail(
            account,
            &ProviderError::Refused {
                code: error.clone(),
                description,
            },
        ));
    }
    if !state_matches(pending, query) {
        return Err(stale_state(&account.name));
    }
    let code = params
        .get("code")
        .cloned()
        .ok_or("the redirect carries no code")?;
    exchange(account, http, clone_pending(pending), code).await
}

fn state_matches(pending: &Pending, query: &str) -> bool {
    url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| k == "state" && v.as_ref() == pending.state.secret().as_str())
}

fn stale_state(account: &str) -> String {
    format!(
        "account `{account}`: the redirect's state does not match this request (an old or foreign link?); \
         use the URL printed by this run"
    )
}

fn clone_pending(p: &Pending) -> Pending {
    Pending {
        url: p.url.clone(),
        state: p.state.clone(),
        verifier: PkceCodeVerifier::new(p.verifier.secret().clone()),
        redirect: p.redirect.clone(),
    }
}

async fn respond(stream: &mut TcpStream, status: u16, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>xoauth-relay</title></head>\
         <body style=\"font-family:sans-serif\"><p>{}</p></body></html>",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    let reason = if status == 200 { "OK" } else { "Bad Request" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn manual(account: &Account, http: &HttpClient) -> Result<TokenSet, String> {
    let port = account.provider.redirect_port.unwrap_or(MANUAL_PORT);
    let pending = authorization_url(account, format!("http://127.0.0.1:{port}/"))?;
    print_url(&account.provider, &pending);
    println!("After consenting, the browser goes to 127.0.0.1:{port} and shows an error page: that is expected.");
    println!("Paste the full URL from its address bar (or just the code) here, then press Enter:");
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let input = line.trim();
    if input.is_empty() {
        return Err("nothing pasted; run the command again".into());
    }
    let code = if input.contains("code=") || input.contains("error=") {
        let query = input.split_once('?').map(|(_, q)| q).unwrap_or(input);
        let query = query.split('#').next().unwrap_or(query).to_string();
        return redirect_outcome(account, http, &pending, &query).await;
    } else {
        input.to_string()
    };
    exchange(account, http, pending, code).await
}

async fn device(account: &Account, http: &HttpClient) -> Result<TokenSet, String> {
    let p = &account.provider;
    if p.family == Family::Google && p.scopes.iter().any(|s| s.contains("mail.google.com")) {
        return Err(format!(
            "account `{}`: Google does not allow the Gmail scope (https://mail.google.com/) in the device flow; \
             use `xoauth-relay authorize {}` (loopback) or `--manual` (paste-back) instead",
            account.name, account.name
        ));
    }
    if p.device_authorization_url.is_none() {
        return Err(format!(
            "provider `{}` has no device_authorization_url; set it, use the loopback flow if it has an authorize_url, or `import-token`",
            p.name
        ));
    }
    let client = oauth::client(p).map_err(|e| e.to_string())?;
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .map_err(|e| e.to_string())?
        .add_scopes(p.scopes.iter().cloned().map(Scope::new))
        .request_async(http)
        .await
        .map_err(|e| fail(account, &oauth::classify(e)))?;
    let uri = details
        .verification_uri_complete()
        .map(|u| u.secret().to_string())
        .unwrap_or_else(|| details.verification_uri().to_string());
    println!("On any device, open:");
    println!("{}", details.verification_uri().as_str());
    println!("and enter the code: {}", details.user_code().secret());
    if uri != details.verification_uri().as_str() {
        println!("(or open {uri})");
    }
    println!(
        "Waiting for sign-in (the code expires in {} minutes) ...",
        details.expires_in().as_secs() / 60
    );
    let response = client
        .exchange_device_access_token(&details)
        .request_async(http, tokio::time::sleep, Some(details.expires_in()))
        .await
        .map_err(|e| {
            let error = oauth::classify(e);
            let text = error.to_string();
            if text.starts_with("expired_token") {
                format!(
                    "account `{}`: the code expired before sign-in finished; run the command again",
                    account.name
                )
            } else if text.starts_with("access_denied") {
                format!(
                    "account `{}`: sign-in was declined at the consent screen; nothing stored",
                    account.name
                )
            } else {
                fail(account, &error)
            }
        })?;
    println!("Authorization received.");
    Ok(oauth::token_set(&response))
}

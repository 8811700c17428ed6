//! Access tokens per account: cached, refreshed before expiry, one refresh at a time.
//!
//! Each account has a slot with the cached token and an async mutex. A caller that finds no fresh
//! token takes the mutex and looks again before refreshing, so a hundred sessions arriving after
//! expiry cause one call to the token endpoint. A rotated refresh token is sealed and flushed to the
//! store before the new access token is handed out. Once the provider says `invalid_grant`, the
//! account is marked revoked and no further refresh is tried until a new grant is stored; this is what
//! turns a dead grant into one clear log line instead of a retry loop.
//!
//! Expiry uses tokio's clock so tests can move time; what is persisted uses wall-clock seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Account, GrantKind};
use crate::http::HttpClient;
use crate::oauth::{self, ProviderError, TokenSet};
use crate::secret::Secret;
use crate::store::{now_unix, Grant, GrantStore};

/// Used when the provider does not say how long a token lives.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct AccessToken {
    pub secret: Secret,
    pub expires_at: Instant,
}

/// Why an account has no token; the text says what the operator should do.
#[derive(Debug, Clone)]
pub enum TokenError {
    UnknownAccount(String),
    NeedsAuthorization(String),
    Revoked {
        account: String,
        detail: String,
    },
    Refused {
        account: String,
        error: ProviderError,
    },
    Unreachable {
        account: String,
        detail: String,
    },
    Store(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::UnknownAccount(a) => write!(f, "account `{a}` is not configured"),
            TokenError::NeedsAuthorization(a) => write!(
                f,
                "account `{a}`: no grant stored yet; run `xoauth-relay authorize {a}` (or `import-token {a}`)"
            ),
            TokenError::Revoked { account, detail } => write!(
                f,
                "account `{account}`: grant revoked by the provider ({detail}); run `xoauth-relay authorize {account}` \
                 (Google apps in Testing status lose grants after 7 days; Microsoft after 90 days unused)"
            ),
            TokenError::Refused { account, error } => {
                write!(f, "account `{account}`: the provider refused a token ({error})")?;
                if let Some(hint) = crate::hints::for_provider_error(error) {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            TokenError::Unreachable { account, detail } => write!(
                f,
                "account `{account}`: cannot get a token, {detail}; check the network path to the provider"
            ),
            TokenError::Store(e) => f.write_str(e),
        }
    }
}

struct Slot {
    account: Arc<Account>,
    cached: Mutex<Option<AccessToken>>,
    refresh: tokio::sync::Mutex<()>,
}

pub struct TokenManager {
    store: GrantStore,
    http: HttpClient,
    margin: Duration,
    slots: HashMap<String, Slot>,
}

impl TokenManager {
    pub fn new(
        store: GrantStore,
        http: HttpClient,
        margin: Duration,
        accounts: &[Arc<Account>],
    ) -> TokenManager {
        let slots = accounts
            .iter()
            .map(|a| {
                let slot = Slot {
                    account: a.clone(),
                    cached: Mutex::new(None),
                    refresh: tokio::sync::Mutex::new(()),
                };
                (a.name.clone(), slot)
            })
            .collect();
        TokenManager {
            store,
            http,
            margin,
            slots,
        }
    }

    pub fn store(&self) -> &GrantStore {
        &self.store
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    fn slot(&self, account: &str) -> Result<&Slot, TokenError> {
        self.slots
            .get(account)
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    fn fresh(&self, slot: &Slot) -> Option<AccessToken> {
        let cached = slot.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|t| t.expires_at > Instant::now() + self.margin)
            .cloned()
    }

    /// A token valid for at least the safety margin, refreshing if needed.
    pub async fn token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        if let Some(t) = self.fresh(slot) {
            return Ok(t);
        }
        let _guard = slot.refresh.lock().await;
        if let Some(t) = self.fresh(slot) {
            return Ok(t);
        }
        // A token persisted by an earlier run may still be good, but only an empty cache means we
        // have not looked at it yet; a stale cached token is the stored one.
        let first_use = slot
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        self.obtain(slot, first_use).await
    }

    /// A new token after the upstream rejected `rejected`: unless another session already replaced it,
    /// the cached and stored copies are skipped and a new one is requested.
    pub async fn token_after_rejection(
        &self,
        account: &str,
        rejected: &Secret,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        let _guard = slot.refresh.lock().await;
        if let Some(t) = self.fresh(slot).filter(|t| &t.secret != rejected) {
            return Ok(t);
        }
        self.obtain(slot, false).await
    }

    /// Forgets the cached token (after a grant was imported, authorized or revoked).
    pub fn invalidate(&self, account: &str) {
        if let Ok(slot) = self.slot(account) {
            *slot.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn cache(&self, slot: &Slot, secret: Secret, lifetime: Duration) -> AccessToken {
        let token = AccessToken {
            secret,
            expires_at: Instant::now() + lifetime,
        };
        *slot.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        token
    }

    /// Called with the slot's refresh lock held.
    async fn obtain(&self, slot: &Slot, reuse_stored: bool) -> Result<AccessToken, TokenError> {
        let account = &slot.account;
        let name = account.name.clone();
        let stored = self
            .store
            .get(&name)
            .map_err(|e| TokenError::Store(e.to_string()))?;
        let status = self.store.status(&name);
        let now = now_unix();
        if reuse_stored {
            // A token persisted by an earlier run is still good: no need to ask the provider.
            if let Some(g) = &stored {
                if let (Some(tok), Some(exp)) = (&g.access_token, g.access_expires_at) {
                    if exp > now + self.margin.as_secs() {
                        return Ok(self.cache(slot, tok.clone(), Duration::from_secs(exp - now)));
                    }
                }
            }
        }
        let result = match account.grant {
            GrantKind::RefreshToken => {
                let Some(refresh_token) = stored.as_ref().and_then(|g| g.refresh_token.clone())
                else {
                    return Err(TokenError::NeedsAuthorization(name));
                };
                if status.revoked {
                    return Err(TokenError::Revoked {
                        account: name,
                        detail: status.last_error.unwrap_or_else(|| "invalid_grant".into()),
                    });
                }
                oauth::refresh(&account.provider, &self.http, &refresh_token).await
            }
            GrantKind::ClientCredentials => {
                oauth::client_credentials(&account.provider, &self.http).await
            }
            GrantKind::ServiceAccount => {
                oauth::service_account(&account.provider, &account.mailbox, &self.http).await
            }
        };
        match result {
            Ok(set) => self.persist(slot, stored, set).await,
            Err(error) => {
                let text = error.to_string();
                let revoked = matches!(error, ProviderError::InvalidGrant(_))
                    && account.grant == GrantKind::RefreshToken;
                // One warning per new failure, not one per mailer session that runs into it.
                if status.last_error.as_deref() == Some(text.as_str()) {
                    tracing::debug!(account = %name, error = %error, "token request failed again");
                } else {
                    let hint = crate::hints::for_provider_error(&error).unwrap_or("");
                    tracing::warn!(account = %name, provider = %account.provider.name, error = %error, hint, "token request failed");
                }
                self.store.update_status(&name, |s| {
                    s.last_error = Some(text.clone());
                    s.revoked = revoked;
                });
                self.store.flush();
                Err(match error {
                    ProviderError::InvalidGrant(_) if revoked => TokenError::Revoked {
                        account: name,
                        detail: text,
                    },
                    ProviderError::Unreachable(detail) => TokenError::Unreachable {
                        account: name,
                        detail,
                    },
                    error => TokenError::Refused {
                        account: name,
                        error,
                    },
                })
            }
        }
    }

    async fn persist(
        &self,
        slot: &Slot,
        stored: Option<Grant>,
        set: TokenSet,
    ) -> Result<AccessToken, TokenError> {
        let name = slot.account.name.clone();
        let now = now_unix();
        let lifetime = set.expires_in.unwrap_or(DEFAULT_LIFETIME);
        let mut grant = stored.unwrap_or(Grant {
            kind: slot.account.grant,
            refresh_token: None,
            access_token: None,
            access_expires_at: None,
            obtained_at: now,
            last_refresh: None,
        });
        let rotated = set.refresh_token.is_some() && set.refresh_token != grant.refresh_token;
        if rotated {
            grant.refresh_token = set.refresh_token.clone();
            grant.obtained_at = now;
        }
        grant.access_token = Some(set.access_token.clone());
        grant.access_expires_at = Some(now + lifetime.as_secs());
        grant.last_refresh = Some(now);
        let store = self.store.clone();
        let key = name.clone();
        // put() flushes to disk; keep that off the async workers.
        tokio::task::spawn_blocking(move || {
            store.put(&key, &grant)?;
            store.update_status(&key, |s| {
                s.last_error = None;
                s.revoked = false;
            });
            Ok::<_, crate::store::StoreError>(())
        })
        .await
        .map_err(|e| TokenError::Store(e.to_string()))?
        .map_err(|e| TokenError::Store(e.to_string()))?;
        tracing::info!(account = %name, rotated, expires_in_secs = lifetime.as_secs(), "access token refreshed");
        Ok(self.cache(slot, set.access_token, lifetime))
    }
}

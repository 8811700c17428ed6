//! Where new access tokens come from, by grant kind: a refresh token, client credentials, or a
//! service-account assertion. A trait so that the token manager's caching, single flight and
//! backoff can be unit-tested against a scripted issuer.

use super::endpoint::{self, ProviderError, TokenSet};
use super::http::HttpClients;
use crate::config::{Account, GrantKind};
use crate::util::secret::Secret;
use crate::util::BoxFuture;

pub trait Issuer: Send + Sync + 'static {
    /// A new token set for `account`; `refresh_token` is given for refresh-token grants.
    fn issue<'a>(
        &'a self,
        account: &'a Account,
        refresh_token: Option<&'a Secret>,
    ) -> BoxFuture<'a, Result<TokenSet, ProviderError>>;
}

/// The provider's real endpoints.
pub struct ProviderIssuer {
    pub http: HttpClients,
}

impl Issuer for ProviderIssuer {
    fn issue<'a>(
        &'a self,
        account: &'a Account,
        refresh_token: Option<&'a Secret>,
    ) -> BoxFuture<'a, Result<TokenSet, ProviderError>> {
        Box::pin(async move {
            let provider = &account.provider;
            let http = &self
                .http
                .get(provider)
                .map_err(|e| ProviderError::Refused {
                    code: "configuration".into(),
                    description: e,
                })?;
            match (account.grant, refresh_token) {
                (GrantKind::RefreshToken, Some(rt)) => endpoint::refresh(provider, http, rt).await,
                (GrantKind::RefreshToken, None) => Err(ProviderError::InvalidGrant(
                    "no refresh token stored".into(),
                )),
                (GrantKind::ClientCredentials, _) => {
                    endpoint::client_credentials(provider, http).await
                }
                (GrantKind::ServiceAccount, _) => {
                    endpoint::service_account(provider, &account.mailbox, http).await
                }
            }
        })
    }
}

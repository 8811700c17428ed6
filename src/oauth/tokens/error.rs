//! Why an account has no token, and where its grant stands: worded for the operator (the log,
//! `accounts`) and, separately, for the mailer (a `454`, without endpoint addresses).

use super::super::endpoint::ProviderError;
use crate::config::Family;

/// Why an account has no token; the text says what the operator should do.
#[derive(Debug, Clone)]
pub enum TokenError {
    UnknownAccount(String),
    NeedsAuthorization {
        account: String,
        /// The command that gives it a grant, as the operator types it.
        command: String,
    },
    Revoked {
        account: String,
        detail: String,
        fix: String,
    },
    Refused {
        account: String,
        error: ProviderError,
        family: Family,
    },
    Unreachable {
        account: String,
        detail: String,
    },
    Store(String),
    /// The database several relays share cannot be reached (or another relay's refresh never
    /// ended): passing, like an unreachable token endpoint.
    Database(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::UnknownAccount(a) => write!(f, "account `{a}` is not configured"),
            TokenError::NeedsAuthorization { account, command } => write!(
                f,
                "account `{account}`: no grant stored yet; run `{command}`"
            ),
            TokenError::Revoked {
                account,
                detail,
                fix,
            } => write!(
                f,
                "account `{account}`: grant revoked by the provider ({detail}); {fix}"
            ),
            TokenError::Refused {
                account,
                error,
                family,
            } => {
                write!(f, "account `{account}`: the provider refused a token ({error})")?;
                if let Some(hint) = error.hint(*family) {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            TokenError::Unreachable { account, detail } => write!(
                f,
                "account `{account}`: cannot get a token, {detail}; check the network path to the provider"
            ),
            TokenError::Store(e) | TokenError::Database(e) => f.write_str(e),
        }
    }
}

impl TokenError {
    /// What a mailer is told (`454 4.7.0 ...`): the account's state and the fix, never an
    /// endpoint's URL, a transport error or a provider's free text (those go to the log, where
    /// [`std::fmt::Display`] has them).
    pub fn for_mailer(&self) -> String {
        match self {
            TokenError::Revoked { account, fix, .. } => format!(
                "account `{account}`: grant revoked by the provider (invalid_grant); {fix}"
            ),
            TokenError::Refused {
                account,
                error,
                family,
            } => {
                let hint = error
                    .hint(*family)
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                format!(
                    "account `{account}`: the provider refused a token ({}){hint}",
                    error.code()
                )
            }
            TokenError::Unreachable { account, .. } => format!(
                "account `{account}`: the provider's token endpoint cannot be reached right now; try \
                 again later (the relay's log has the details)"
            ),
            TokenError::Store(_) => {
                "the relay cannot read its grant store right now; try again later (the relay's log \
                 has the details)"
                    .into()
            }
            TokenError::Database(_) => {
                "the relay cannot reach its shared database right now; try again later (the relay's \
                 log has the details)"
                    .into()
            }
            TokenError::UnknownAccount(_) | TokenError::NeedsAuthorization { .. } => {
                self.to_string()
            }
        }
    }
}

/// Where an account's grant stands (`accounts`, `xoauth_relay_grant_ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantState {
    Ok,
    NeedsAuthorization,
    Revoked,
    /// The last token request failed with this.
    Failing(String),
    /// The store could not be read.
    Unreadable(String),
}

impl GrantState {
    /// The word scripts read (`accounts --json` `state`).
    pub fn as_str(&self) -> &'static str {
        match self {
            GrantState::Ok => "ok",
            GrantState::NeedsAuthorization => "needs_authorization",
            GrantState::Revoked => "revoked",
            GrantState::Failing(_) | GrantState::Unreadable(_) => "failing",
        }
    }
}

/// Failures a still-valid cached token may ride out: the provider being down or refusing for now,
/// or the shared database out of reach; not a revoked grant or a damaged store.
pub(super) fn passing(error: &TokenError) -> bool {
    matches!(
        error,
        TokenError::Unreachable { .. } | TokenError::Refused { .. } | TokenError::Database(_)
    )
}

impl TokenError {
    /// The token endpoint is down or refusing for now, not the grant gone: queued mail can wait.
    pub fn is_passing(&self) -> bool {
        passing(self)
    }
}

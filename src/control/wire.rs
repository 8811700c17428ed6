//! The control socket's messages: one JSON line each way.

use serde::{Deserialize, Serialize};

use crate::util::secret::Secret;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Accounts {
        #[serde(default)]
        json: bool,
        #[serde(default)]
        usage: bool,
    },
    /// Store a grant obtained by `authorize` or given to `import-token`.
    StoreGrant {
        account: String,
        refresh_token: Option<Secret>,
        access_token: Option<Secret>,
        expires_in: Option<u64>,
        /// The refresh token's lifetime, when the provider gave one.
        #[serde(default)]
        refresh_expires_in: Option<u64>,
        /// The scopes the provider granted, when its answer listed them.
        #[serde(default)]
        scope: Option<String>,
    },
    Revoke {
        account: String,
    },
    Test {
        account: String,
        to: Option<String>,
    },
    Queue {
        account: Option<String>,
        json: bool,
    },
    QueueShow {
        id: String,
    },
    /// One of: `id`, `account`, `all`.
    QueueRetry {
        id: Option<String>,
        account: Option<String>,
        all: bool,
    },
    QueueDelete {
        id: String,
    },
    /// Re-read the config file (what SIGHUP does); answered once the new config is in force.
    /// `config`: the file the caller means; refused when the relay reads another one.
    Reload {
        #[serde(default)]
        config: Option<std::path::PathBuf>,
    },
    /// Whether the relay is up and serving (for `health` without `[metrics] address`).
    Health,
    /// Lift the failed-login lockout of one address, or of every address when `None`.
    Unlock {
        address: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub text: String,
}

impl Response {
    pub fn ok(text: impl Into<String>) -> Response {
        Response {
            ok: true,
            text: text.into(),
        }
    }

    pub fn fail(text: impl Into<String>) -> Response {
        Response {
            ok: false,
            text: text.into(),
        }
    }
}

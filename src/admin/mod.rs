//! Administration: the operations behind `accounts`, `import-token`, `authorize` (storing the grant),
//! `revoke` and `test`.
//!
//! Each operation is a control [`Request`] executed against an [`AdminContext`], the same code
//! whether the request came over the control socket to a running relay or the command line opened
//! the store itself (the app decides which).

mod accounts;
mod grants;
mod queue;
mod test;

use std::sync::Arc;

use crate::config::{Account, Config};
use crate::control::server::Handler;
use crate::control::wire::{Request, Response};
use crate::delivery::activity::Activity;
use crate::delivery::pool::Pool;
use crate::delivery::queue::{Queue, Target};
use crate::oauth::http::HttpClients;
use crate::oauth::tokens::TokenManager;
use crate::observe::Observer;
use crate::util::clock::SharedClock;
use crate::util::BoxFuture;

/// What administration works with: grants through the token manager, the queue, the pool (to
/// retire connections of a replaced grant, and `test`'s dialer), last use and usage.
pub struct AdminContext {
    /// Swapped by a reload of the running relay.
    pub config: arc_swap::ArcSwap<Config>,
    pub tokens: Arc<TokenManager>,
    pub pool: Arc<Pool>,
    /// Where `test --to` sends through an HTTP API (the same path as the relay's messages).
    pub transport: Arc<dyn crate::delivery::transport::Transport>,
    pub queue: Arc<Queue>,
    pub activity: Arc<Activity>,
    pub observer: Observer,
    pub clock: SharedClock,
    /// For the providers' revocation endpoints.
    pub http: HttpClients,
}

/// The answer to `reload` and `unlock` when no relay runs: the config in force and the lockouts
/// live in a running relay's memory only.
pub const RELAY_ONLY: &str = "no relay is running with this config's data_dir (its control socket \
                              does not answer): only a running relay can reload or unlock";

pub async fn execute(ctx: &AdminContext, request: Request) -> Response {
    let tokens = &ctx.tokens;
    let result = match request {
        Request::Accounts { json, usage } => {
            // With a shared store, `--usage` counts every relay's figures.
            let others = match ctx.tokens.store().sharing() {
                Some(store) if usage => store
                    .others_state(crate::delivery::queue::USAGE_FILE)
                    .await
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            accounts::list(ctx, json, usage, &others)
        }
        Request::StoreGrant {
            account,
            refresh_token,
            access_token,
            expires_in,
            refresh_expires_in,
            scope,
        } => {
            let issued = grants::Issued {
                expires_in,
                refresh_expires_in,
                scope,
            };
            let change = grants::store_grant(ctx, &account, refresh_token, access_token, issued);
            let result = tokens.replace_grant(&account, change).await;
            // Connections authenticated with the old grant are not used again, and mail held for
            // the old one's trouble may go.
            ctx.transport.grant_changed(&account);
            ctx.queue.grant_changed(&account);
            result
        }
        Request::Revoke { account } => {
            let change = grants::revoke(ctx, &account);
            let result = tokens.replace_grant(&account, change).await;
            ctx.transport.grant_changed(&account);
            result
        }
        Request::Test { account, to } => return test::test(ctx, &account, to.as_deref()).await,
        Request::Queue { account, json } => queue::list(ctx, account.as_deref(), json).await,
        Request::QueueShow { id } => queue::show(ctx, &id).await,
        Request::QueueRetry { id, account, all } => {
            let target = match (id, account) {
                (Some(id), _) => Target::Id(id),
                (None, Some(a)) => Target::Account(a),
                (None, None) if all => Target::All,
                (None, None) => {
                    return Response::fail("say which: a message id, --account NAME or --all")
                }
            };
            queue::retry(ctx, target).await
        }
        Request::QueueDelete { id } => queue::delete(ctx, &id).await,
        // The running relay's control handler answers these before they get here.
        Request::Reload { .. } | Request::Unlock { .. } | Request::Health => Err(RELAY_ONLY.into()),
    };
    match result {
        Ok(text) => Response::ok(text),
        Err(text) => Response::fail(text),
    }
}

impl Handler for AdminContext {
    fn handle(&self, request: Request) -> BoxFuture<'_, Response> {
        Box::pin(execute(self, request))
    }
}

fn account(ctx: &AdminContext, name: &str) -> Result<Arc<Account>, String> {
    ctx.config
        .load()
        .account(name)
        .cloned()
        .map_err(|e| e.to_string())
}

/// Rows as left-aligned columns, the first row the header.
fn columns(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "3m", "5h", "12d"
pub fn span_text(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn ago(t: Option<u64>, now: u64) -> String {
    t.map(|t| format!("{} ago", span_text(now.saturating_sub(t))))
        .unwrap_or_else(|| "-".into())
}

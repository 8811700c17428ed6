//! Changing an account's grant: storing one (`authorize`, `import-token`) and deleting it
//! (`revoke`, which also revokes it at the provider where there is an endpoint).

use super::{account, AdminContext};
use crate::store::Grant;
use crate::util::secret::Secret;

/// What the provider said of a grant it issued, beside the tokens.
pub(super) struct Issued {
    pub expires_in: Option<u64>,
    pub refresh_expires_in: Option<u64>,
    pub scope: Option<String>,
}

pub(super) async fn store_grant(
    ctx: &AdminContext,
    name: &str,
    refresh_token: Option<Secret>,
    access_token: Option<Secret>,
    issued: Issued,
) -> Result<String, String> {
    account(ctx, name)?;
    if refresh_token
        .as_ref()
        .is_none_or(|t| t.expose().trim().is_empty())
    {
        return Err(format!(
            "account `{name}`: the provider returned no refresh token; nothing stored"
        ));
    }
    let now = ctx.clock.unix();
    let grant = Grant {
        refresh_token,
        access_expires_at: access_token
            .as_ref()
            .map(|_| now + issued.expires_in.unwrap_or(3600)),
        access_token,
        obtained_at: now,
        last_refresh: None,
        refresh_expires_at: issued.refresh_expires_in.map(|s| now + s),
        scope: issued.scope,
    };
    ctx.tokens.save_grant(name, grant).await?;
    tracing::info!(account = %name, "grant stored");
    if ctx.queue.delivering() {
        Ok(format!(
            "account `{name}`: grant stored; the next session uses it"
        ))
    } else {
        Ok(format!(
            "account `{name}`: grant stored; no relay is running, `{}` uses it when it starts",
            crate::hints::command("serve")
        ))
    }
}

pub(super) async fn revoke(ctx: &AdminContext, name: &str) -> Result<String, String> {
    let acct = account(ctx, name)?;
    let grant = ctx.tokens.stored_grant(name)?;
    let mut notes = Vec::new();
    if let Some(rt) = grant.as_ref().and_then(|g| g.refresh_token.clone()) {
        if acct.provider.revocation_url.is_some() {
            match revoke_at_provider(ctx, &acct, &rt).await {
                Ok(()) => notes.push("revoked at the provider".to_string()),
                Err(e) => notes.push(format!("the provider's revocation endpoint failed ({e}); revoke the app's access in the account's security settings")),
            }
        } else {
            notes.push(format!(
                "provider `{}` has no revocation endpoint; remove the app's consent in the provider's account settings",
                acct.provider.name
            ));
        }
    }
    let existed = ctx.tokens.delete_grant(name).await?;
    if !existed {
        return Ok(format!("account `{name}`: no grant was stored"));
    }
    notes.insert(0, format!("account `{name}`: grant deleted"));
    tracing::info!(account = %name, "grant deleted");
    Ok(notes.join("; "))
}

async fn revoke_at_provider(
    ctx: &AdminContext,
    acct: &crate::config::Account,
    rt: &Secret,
) -> Result<(), String> {
    let http = ctx.http.get(&acct.provider)?;
    crate::oauth::endpoint::revoke(&acct.provider, &http, rt)
        .await
        .map_err(|e| e.to_string())
}

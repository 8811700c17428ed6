//! Provider error codes turned into something an operator can act on.
//!
//! Providers answer with codes (`AADSTS700082`, `535 5.7.139`) whose meaning lives in support
//! articles; the relay appends the fix to its log lines, to the `454` it gives the mailer, and to the
//! output of `test` and `authorize`.

use crate::config::Family;
use crate::oauth::ProviderError;
use crate::reply::Reply;

/// A fix for an error from a token or authorization endpoint.
pub fn for_provider_error(error: &ProviderError) -> Option<&'static str> {
    let text = error.to_string();
    let has = |needle: &str| text.contains(needle);
    Some(if has("AADSTS50011") {
        "the redirect URI is not registered for the app: add the exact URI that `authorize` prints under \
         Authentication > Mobile and desktop applications"
    } else if has("AADSTS700082") || has("AADSTS70008") {
        "the refresh token expired (Microsoft drops grants unused for 90 days); run `xoauth-relay authorize` again"
    } else if has("AADSTS7000218") {
        "the app expects a client secret: set client_secret_env / client_secret_file for this provider, or turn \
         on \"Allow public client flows\" under Authentication in the app registration"
    } else if has("AADSTS7000215") || has("AADSTS7000222") {
        "the client secret is wrong or expired: create a new one under Certificates & secrets"
    } else if has("AADSTS65001") {
        "the user or an admin has not consented to the app's permissions: grant consent and authorize again"
    } else if has("AADSTS50076") || has("AADSTS50079") {
        "the tenant requires MFA for this sign-in: use `authorize` (interactive) rather than a scripted flow"
    } else if has("redirect_uri_mismatch") {
        "the redirect URI is not registered for the OAuth client: register the exact URI that `authorize` prints \
         (Google: use a \"Desktop app\" client, which accepts any loopback port)"
    } else if has("Invalid JWT") {
        "the service account's assertion was refused: check that service_account_key_file is the account's \
         current JSON key and that this machine's clock is right"
    } else if has("unauthorized_client") && has("scope") {
        "domain-wide delegation is missing: in the Workspace Admin console (Security > API controls > \
         Domain-wide delegation) allow the service account's client ID the scope https://mail.google.com/"
    } else if has("invalid_client") || has("unauthorized_client") {
        "check client_id and the client secret/certificate, and that the app is allowed to use this grant type"
    } else if has("invalid_scope") {
        "the app is not allowed the requested scopes: add them to the app registration (Google: the Gmail API \
         scope https://mail.google.com/, Microsoft: SMTP.Send)"
    } else if matches!(error, ProviderError::InvalidGrant(_)) {
        "the grant was revoked, expired, or the password changed; Google apps left in \"Testing\" lose their \
         grants after 7 days (publish the app on the OAuth consent screen); Microsoft drops grants unused for 90 days"
    } else {
        return None;
    })
}

/// Whether `code` (an enhanced status code like `5.7.3`) appears in the reply as a whole token.
fn has_code(reply: &Reply, code: &str) -> bool {
    reply
        .lines
        .iter()
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_digit() || c == '.')))
        .any(|token| token == code)
}

/// Rejections that a new access token cannot cure (SMTP AUTH disabled, basic auth off): refreshing
/// would only cost a token request, and on Microsoft a refresh-token rotation, per message.
pub fn refresh_cannot_help(reply: &Reply) -> bool {
    has_code(reply, "5.7.139") || has_code(reply, "5.7.30")
}

/// A fix for an upstream SMTP reply (mostly authentication failures).
pub fn for_smtp_reply(family: Family, reply: &Reply) -> Option<&'static str> {
    let text = reply.lines.join(" ");
    let has = |code: &str| has_code(reply, code);
    Some(if has("5.7.139") {
        "SMTP AUTH is disabled for the tenant or this mailbox: enable Authenticated SMTP for the mailbox \
         (Microsoft 365 admin center > user > Mail > Email apps, or Set-CASMailbox -SmtpClientAuthenticationDisabled \
         $false) and check the tenant setting (Set-TransportConfig) and security defaults"
    } else if has("5.7.3") {
        "the token was refused for this mailbox: the token must carry SMTP.Send, `mailbox` must be the address of \
         the user who authorized (a shared mailbox needs Send As / Full Access for that user), and SMTP AUTH must be \
         enabled for it"
    } else if has("5.7.30") {
        "basic authentication is off for this tenant; the relay must authenticate with OAuth (mechanism xoauth2)"
    } else if has("5.2.252") || text.contains("SendAsDenied") {
        "SendAsDenied: the authorized user may not send as this sender; grant Send As on that address or send \
         from the mailbox's own address"
    } else if family == Family::Google && reply.code == 535 {
        "Gmail refused the token: `mailbox` must be the Google account that authorized, and the grant must include \
         the https://mail.google.com/ scope"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_and_google_codes_get_fixes() {
        let reply = |text: &str| Reply::new(535, text);
        let ms = |text| for_smtp_reply(Family::Microsoft, &reply(text)).unwrap_or("");
        assert!(ms("5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant").contains("Set-CASMailbox"));
        assert!(ms("5.7.3 Authentication unsuccessful").contains("SMTP.Send"));
        assert!(
            ms("5.7.30 Basic authentication is not supported for Client Submission")
                .contains("basic authentication")
        );
        assert!(refresh_cannot_help(&reply(
            "5.7.139 Authentication unsuccessful"
        )));
        assert!(!refresh_cannot_help(&reply(
            "5.7.3 Authentication unsuccessful"
        )));
        assert!(for_smtp_reply(
            Family::Microsoft,
            &Reply::new(554, "5.2.252 SendAsDenied; x not allowed")
        )
        .unwrap()
        .contains("Send As"));
        assert!(for_smtp_reply(
            Family::Google,
            &reply("5.7.8 Username and Password not accepted")
        )
        .unwrap()
        .contains("mail.google.com"));
        let refused = |code: &str, d: &str| ProviderError::Refused {
            code: code.into(),
            description: d.into(),
        };
        assert!(for_provider_error(&refused(
            "invalid_request",
            "AADSTS50011: The redirect URI ..."
        ))
        .unwrap()
        .contains("redirect URI"));
        assert!(for_provider_error(&refused(
            "invalid_client",
            "AADSTS7000218: ... client_assertion or client_secret"
        ))
        .unwrap()
        .contains("Allow public client flows"));
        assert!(for_provider_error(&ProviderError::InvalidGrant(
            "AADSTS700082: The refresh token has expired due to inactivity".into()
        ))
        .unwrap()
        .contains("90 days"));
        assert!(for_provider_error(&ProviderError::InvalidGrant(
            "Token has been expired or revoked.".into()
        ))
        .unwrap()
        .contains("Testing"));
        assert!(for_provider_error(&refused("redirect_uri_mismatch", ""))
            .unwrap()
            .contains("Desktop app"));
    }
}

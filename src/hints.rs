//! Provider error codes turned into something an operator can act on.
//!
//! Providers answer with codes (`AADSTS700082`, `535 5.7.139`) whose meaning lives in support
//! articles; the relay appends the fix to its log lines, to the `454` it gives the mailer, and to the
//! output of `test` and `authorize`.
//!
//! Classification reads codes, never display text: the OAuth `error` code and the `AADSTS` number
//! Microsoft puts in `error_description`, and an SMTP reply's enhanced status code. This module sits
//! below `oauth` and `delivery` (it imports neither), so both can ask it.

use crate::config::{Account, Family};
use crate::smtp::{EnhancedCode, Reply};

/// How the operator invokes the relay, set once by the command line: `xoauth-relay`, with
/// `--config PATH` when the config is not the default one (from the flag or the environment).
static INVOCATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the config file the commands in hints must name; `default`: it is the default path, so
/// hints need not name it.
pub fn set_invocation(config: &std::path::Path, default: bool) {
    let text = if default {
        "xoauth-relay".to_string()
    } else {
        let path = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
        let path = path.display().to_string();
        // Quoted for a shell only where it needs it.
        if path.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
            format!("xoauth-relay --config '{}'", path.replace('\'', "'\\''"))
        } else {
            format!("xoauth-relay --config {path}")
        }
    };
    let _ = INVOCATION.set(text);
}

/// `args` as the operator must type it: `xoauth-relay [--config PATH] args`.
pub fn command(args: &str) -> String {
    let invocation = INVOCATION.get().map_or("xoauth-relay", String::as_str);
    format!("{invocation} {args}")
}

/// The command that gives `account` a new grant: `authorize NAME`, or for a provider without a
/// consent page the device flow or `import-token`, never a command that would then fail.
pub fn grant_command(account: &Account) -> String {
    let name = &account.name;
    let provider = &account.provider;
    command(&if provider.authorize_url.is_some() {
        format!("authorize {name}")
    } else if provider.device_authorization_url.is_some() {
        format!("authorize {name} --device")
    } else {
        format!("import-token {name} < refresh-token.txt")
    })
}

/// What to do about a grant the provider revoked.
pub fn revoked_fix(account: &Account) -> String {
    let why = match account.provider.family {
        Family::Google => {
            " (Google apps in Testing status lose grants after 7 days: publish the app)"
        }
        Family::Microsoft => " (Microsoft drops grants unused for 90 days)",
        Family::Generic => "",
    };
    format!("run `{}`{why}", grant_command(account))
}

/// The `AADSTSnnnn` numbers in a Microsoft error description.
fn aadsts_codes(description: &str) -> impl Iterator<Item = u32> + '_ {
    description.match_indices("AADSTS").filter_map(|(i, m)| {
        let digits: String = description[i + m.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// A fix for an error from a token or authorization endpoint: `code` is the OAuth `error` field,
/// `description` its `error_description`.
pub fn for_provider_error(family: Family, code: &str, description: &str) -> Option<&'static str> {
    let aadsts: Vec<u32> = aadsts_codes(description).collect();
    let has = |n: u32| aadsts.contains(&n);
    let scope_related = description.contains("scope");
    Some(if has(50011) {
        "the redirect URI is not registered for the app: add the exact URI that `authorize` prints under \
         Authentication > Mobile and desktop applications"
    } else if has(700082) || has(70008) {
        "the refresh token expired (Microsoft drops grants unused for 90 days); run `xoauth-relay authorize` again"
    } else if has(7000218) {
        "the app expects a client secret: set client_secret_env / client_secret_file for this provider, or turn \
         on \"Allow public client flows\" under Authentication in the app registration"
    } else if has(7000215) || has(7000222) {
        "the client secret is wrong or expired: create a new one under Certificates & secrets"
    } else if has(65001) {
        "the user or an admin has not consented to the app's permissions: grant consent and authorize again"
    } else if has(50076) || has(50079) {
        "the tenant requires MFA for this sign-in: use `authorize` (interactive) rather than a scripted flow"
    } else if code == "redirect_uri_mismatch" {
        "the redirect URI is not registered for the OAuth client: register the exact URI that `authorize` prints \
         (Google: use a \"Desktop app\" client, which accepts any loopback port)"
    } else if code == "invalid_grant" && description.contains("Invalid JWT") {
        "the service account's assertion was refused: check that service_account_key_file is the account's \
         current JSON key and that this machine's clock is right"
    } else if code == "unauthorized_client" && scope_related {
        "domain-wide delegation is missing: in the Workspace Admin console (Security > API controls > \
         Domain-wide delegation) allow the service account's client ID the scope https://mail.google.com/"
    } else if code == "invalid_client" || code == "unauthorized_client" {
        "check client_id and the client secret/certificate, and that the app is allowed to use this grant type"
    } else if code == "invalid_scope" {
        "the app is not allowed the requested scopes: add them to the app registration (Google: the Gmail API \
         scope https://mail.google.com/, Microsoft: SMTP.Send)"
    } else if code == "invalid_grant" {
        match family {
            Family::Google => {
                "the grant was revoked, expired, or the password changed; Google apps left in \"Testing\" \
                 lose their grants after 7 days (publish the app on the OAuth consent screen)"
            }
            Family::Microsoft => {
                "the grant was revoked, expired, or the password changed; Microsoft drops grants unused \
                 for 90 days"
            }
            Family::Generic => "the grant was revoked, expired, or the password changed",
        }
    } else {
        return None;
    })
}

const SMTP_AUTH_DISABLED: EnhancedCode = EnhancedCode(5, 7, 139);
const BASIC_AUTH_OFF: EnhancedCode = EnhancedCode(5, 7, 30);
const TOKEN_REFUSED_FOR_MAILBOX: EnhancedCode = EnhancedCode(5, 7, 3);
const SEND_AS_DENIED: EnhancedCode = EnhancedCode(5, 2, 252);

/// Rejections that a new access token cannot cure (SMTP AUTH disabled, basic auth off): refreshing
/// would only cost a token request, and on Microsoft a refresh-token rotation, per message.
pub fn refresh_cannot_help(reply: &Reply) -> bool {
    reply.mentions(SMTP_AUTH_DISABLED) || reply.mentions(BASIC_AUTH_OFF)
}

/// A fix for an upstream SMTP reply (mostly authentication failures).
pub fn for_smtp_reply(family: Family, reply: &Reply) -> Option<&'static str> {
    let has = |code: EnhancedCode| reply.mentions(code);
    Some(if has(SMTP_AUTH_DISABLED) {
        "SMTP AUTH is disabled for the tenant or this mailbox: enable Authenticated SMTP for the mailbox \
         (Microsoft 365 admin center > user > Mail > Email apps, or Set-CASMailbox -SmtpClientAuthenticationDisabled \
         $false) and check the tenant setting (Set-TransportConfig) and security defaults"
    } else if has(TOKEN_REFUSED_FOR_MAILBOX) {
        "the token was refused for this mailbox: the token must carry SMTP.Send, `mailbox` must be the address of \
         the user who authorized (a shared mailbox needs Send As / Full Access for that user), and SMTP AUTH must be \
         enabled for it"
    } else if has(BASIC_AUTH_OFF) {
        "basic authentication is off for this tenant; the relay must authenticate with OAuth (mechanism xoauth2)"
    } else if has(SEND_AS_DENIED) {
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
        let refused = |code: &str, d: &str| for_provider_error(Family::Microsoft, code, d);
        assert!(
            (refused("invalid_request", "AADSTS50011: The redirect URI ..."))
                .unwrap()
                .contains("redirect URI")
        );
        assert!((refused(
            "invalid_client",
            "AADSTS7000218: ... client_assertion or client_secret"
        ))
        .unwrap()
        .contains("Allow public client flows"));
        assert!(refused(
            "invalid_grant",
            "AADSTS700082: The refresh token has expired due to inactivity"
        )
        .unwrap()
        .contains("90 days"));
        // Each family's reasons, and only its own.
        let revoked = |family| {
            for_provider_error(
                family,
                "invalid_grant",
                "Token has been expired or revoked.",
            )
            .unwrap()
        };
        assert!(revoked(Family::Google).contains("Testing"));
        assert!(!revoked(Family::Google).contains("90 days"));
        assert!(revoked(Family::Microsoft).contains("90 days"));
        assert!(!revoked(Family::Microsoft).contains("Testing"));
        let generic = revoked(Family::Generic);
        assert!(!generic.contains("Testing") && !generic.contains("90 days"));
        assert!(refused("redirect_uri_mismatch", "")
            .unwrap()
            .contains("Desktop app"));
    }
}

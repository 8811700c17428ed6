//! An HTTP API's answer, read once into a [`Status`] (the API transports' counterpart of
//! [`Status::from_reply`]): which answers are the message's fate (a bounce), which are about the
//! account (a pause, a hold), and what the mailer is told.

use std::time::Duration;

use crate::config::TransportKind;
use crate::delivery::status::{Cause, Status};
use crate::smtp::Reply;

/// What came back from one API request.
#[derive(Debug, Default, Clone)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After`, in seconds or as an HTTP date.
    pub retry_after: Option<Duration>,
    /// Graph's `error.code`; the Gmail API's `errors[].reason` (else its `status`).
    pub code: String,
    pub message: String,
    /// The Gmail message `id`, a Graph draft's `id`, else Graph's `request-id` header.
    pub id: Option<String>,
    /// A Graph upload session's `uploadUrl`.
    pub upload_url: Option<String>,
}

/// Longest error message quoted to the mailer.
const MAX_QUOTE: usize = 200;

impl Answer {
    /// Reads an answer's status, headers and (JSON) body.
    pub fn read(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> Answer {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let error = &json["error"];
        // Graph: {"error": {"code": "ErrorSendAsDenied", "message": ...}}; Gmail: {"error":
        // {"code": 403, "message": ..., "errors": [{"reason": ...}], "status": ...}}.
        let code = error["code"]
            .as_str()
            .or_else(|| error["errors"][0]["reason"].as_str())
            .or_else(|| error["status"].as_str())
            .unwrap_or_default()
            .to_string();
        let mut message: String = error["message"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_QUOTE)
            .collect();
        if message.is_empty() && code.is_empty() && status >= 400 {
            message = format!("HTTP {status}");
        }
        Answer {
            status,
            retry_after: header("retry-after").and_then(|v| retry_after(&v)),
            code,
            message,
            id: json["id"]
                .as_str()
                .map(str::to_string)
                .or_else(|| header("request-id")),
            upload_url: json["uploadUrl"].as_str().map(str::to_string),
        }
    }

    /// "ErrorSendAsDenied: The user account ..." (what is known of it).
    pub fn summary(&self) -> String {
        match (self.code.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.code, self.message),
            (false, true) => self.code.clone(),
            (true, false) => self.message.clone(),
            (true, true) => format!("HTTP {}", self.status),
        }
    }

    fn code_is(&self, codes: &[&str]) -> bool {
        codes.iter().any(|c| self.code.eq_ignore_ascii_case(c))
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3), at least 1 s, at most a day.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs_f64().ceil() as u64)
        }
    };
    Some(Duration::from_secs(secs.clamp(1, 86_400)))
}

/// The API's name as the mailer and the operator read it.
pub fn api_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Graph => "Microsoft Graph",
        TransportKind::GmailApi => "Gmail API",
        TransportKind::Smtp => "SMTP",
    }
}

/// What an answer is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// The message is sent.
    Sent,
    /// The access token was refused (401): refresh once and retry.
    TokenRefused,
    /// The grant cannot send (scope, consent, policy): held, and the operator alerted.
    GrantRefused,
    /// Any other status.
    Other,
}

pub fn reading(a: &Answer) -> Reading {
    match a.status {
        200..=299 => Reading::Sent,
        401 => Reading::TokenRefused,
        403 if grant_refusal(a) => Reading::GrantRefused,
        400 if a.code_is(&["failedPrecondition", "FAILED_PRECONDITION"]) => Reading::GrantRefused,
        _ => Reading::Other,
    }
}

/// A 403 that speaks of the grant rather than the message or a rate.
fn grant_refusal(a: &Answer) -> bool {
    !a.code_is(&["ErrorSendAsDenied"]) && throttle(a).is_none()
}

/// Throttling (rate) or quota, whatever the status.
fn throttle(a: &Answer) -> Option<Cause> {
    let lower = format!("{} {}", a.code, a.message).to_ascii_lowercase();
    let quota = a.code_is(&["dailyLimitExceeded", "quotaExceeded"])
        || [
            "quota",
            "exceededmessagelimit",
            "submissionquota",
            "mail sending",
        ]
        .iter()
        .any(|w| lower.contains(w));
    if quota && a.status != 413 {
        return Some(Cause::Quota);
    }
    // A 503 is throttling when it says when to come back; without, it is an outage (backoff).
    let rate = a.status == 429
        || (a.status == 503 && a.retry_after.is_some())
        || a.code_is(&[
            "rateLimitExceeded",
            "userRateLimitExceeded",
            "ApplicationThrottled",
            "MailboxConcurrency",
            "TooManyRequests",
        ]);
    rate.then_some(Cause::Throttled)
}

/// The hint for a grant that cannot send through `kind`.
pub fn grant_hint(kind: TransportKind, account: &str) -> String {
    let again = crate::hints::command(&format!("authorize {account}"));
    match kind {
        TransportKind::Graph => format!(
            "the app needs the Mail.Send permission (delegated for a user grant, application with admin consent \
             for client_credentials; Mail.ReadWrite too for messages over about 3 MB), and an application access \
             policy must not exclude the mailbox; then run `{again}` again"
        ),
        _ => format!(
            "the grant needs the https://www.googleapis.com/auth/gmail.send scope (a service account: domain-wide \
             delegation with that scope, and Gmail enabled for the user); run `{again}` again"
        ),
    }
}

/// The status for an answer other than a success or a token refusal.
pub fn status_of(kind: TransportKind, account: &str, a: &Answer) -> Status {
    let api = api_name(kind);
    let what = a.summary();
    if let Some(cause) = throttle(a) {
        return match (cause, a.retry_after) {
            (Cause::Quota, None) => Status::temporary(
                Cause::Quota,
                Reply::new(
                    451,
                    format!("4.7.0 {api}: the account's sending quota is used up ({what}); try again later"),
                ),
            ),
            (cause, after) => {
                // "in N seconds" is what the queue's pause reads: the first such phrase, so it
                // comes before the API's own words (which may name another time).
                let secs = after.unwrap_or(crate::delivery::queue::retry::RATE_PAUSE).as_secs();
                Status::temporary(
                    cause,
                    Reply::new(
                        451,
                        format!("4.7.0 Try again in {secs} seconds: {api} is throttling the account ({what})"),
                    ),
                )
            }
        };
    }
    match a.status {
        400 | 422 if reading(a) != Reading::GrantRefused => Status::Permanent {
            reply: Reply::new(554, format!("5.6.0 {api} refused the message ({what})")),
        },
        403 if a.code_is(&["ErrorSendAsDenied"]) => Status::Permanent {
            reply: Reply::new(
                550,
                format!(
                    "5.7.1 {api} refused the sender ({what}); the mailbox needs Send As (or Send on Behalf) \
                     rights for the From address"
                ),
            ),
        },
        400 | 403 => Status::temporary(
            Cause::Token,
            Reply::new(
                454,
                format!(
                    "4.7.0 account `{account}`: {api} refused the grant ({what}); {}",
                    grant_hint(kind, account)
                ),
            ),
        ),
        413 => Status::Permanent {
            reply: Reply::new(552, format!("5.3.4 {api}: message too large ({what})")),
        },
        404 => Status::temporary(
            Cause::Connection,
            Reply::new(
                451,
                format!(
                    "4.4.1 {api}: mailbox not found or not enabled for the API ({what}); check the account's \
                     `mailbox`"
                ),
            ),
        ),
        400..=499 => Status::Permanent {
            reply: Reply::new(554, format!("5.6.0 {api} refused the message ({what})")),
        },
        _ => Status::temporary(
            Cause::Connection,
            Reply::new(451, format!("4.4.1 {api} not available ({what}); try again later")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, code: &str, retry: Option<u64>) -> Answer {
        Answer {
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: retry.map(Duration::from_secs),
            ..Answer::default()
        }
    }

    fn of(a: &Answer) -> (u16, Option<Cause>) {
        let s = status_of(TransportKind::GmailApi, "news", a);
        (s.reply().code, s.cause())
    }

    #[test]
    fn every_row_of_the_reply_table() {
        assert_eq!(of(&answer(400, "invalidArgument", None)), (554, None));
        assert_eq!(of(&answer(403, "ErrorSendAsDenied", None)), (550, None));
        assert_eq!(
            of(&answer(403, "ErrorAccessDenied", None)),
            (454, Some(Cause::Token))
        );
        assert_eq!(
            of(&answer(403, "insufficientPermissions", None)),
            (454, Some(Cause::Token))
        );
        assert_eq!(of(&answer(413, "", None)), (552, None));
        assert_eq!(
            of(&answer(429, "", Some(37))),
            (451, Some(Cause::Throttled))
        );
        assert_eq!(
            of(&answer(403, "userRateLimitExceeded", None)),
            (451, Some(Cause::Throttled))
        );
        assert_eq!(
            of(&answer(403, "dailyLimitExceeded", None)),
            (451, Some(Cause::Quota))
        );
        assert_eq!(
            of(&answer(429, "quotaExceeded", Some(600))),
            (451, Some(Cause::Quota))
        );
        assert_eq!(of(&answer(500, "", None)), (451, Some(Cause::Connection)));
        assert_eq!(of(&answer(503, "", Some(5))), (451, Some(Cause::Throttled)));
        assert_eq!(of(&answer(503, "", None)), (451, Some(Cause::Connection)));
        assert_eq!(reading(&answer(401, "", None)), Reading::TokenRefused);
        assert_eq!(reading(&answer(202, "", None)), Reading::Sent);
    }

    #[test]
    fn the_pause_is_exactly_what_retry_after_says() {
        let config = crate::config::DeliveryConfig::default();
        let pause = |a: &Answer| {
            let s = status_of(TransportKind::Graph, "news", a);
            crate::delivery::queue::retry::pause_for(s.reply(), s.cause().unwrap(), &config)
        };
        assert_eq!(
            pause(&answer(429, "ApplicationThrottled", Some(37))),
            Duration::from_secs(37)
        );
        assert_eq!(pause(&answer(429, "", None)), Duration::from_secs(60));
        // The API's own words naming another time do not win over Retry-After.
        let mut worded = answer(429, "TooManyRequests", Some(37));
        worded.message = "try again in 5 minutes".into();
        assert_eq!(pause(&worded), Duration::from_secs(37));
        assert_eq!(
            pause(&answer(403, "dailyLimitExceeded", None)),
            Duration::from_secs(config.quota_pause_secs)
        );
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(90));
        let d = retry_after(&later).unwrap().as_secs();
        assert!((88..=91).contains(&d), "{d}");
    }
}

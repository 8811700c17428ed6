//! What an upstream step came to, typed once where the reply or the error arrives; everything
//! after decides from the type (the queue's retry, pause and bounce; the mailer's reply is the
//! reply the status carries).
//!
//! Modelled on Stalwart's `outbound::Status`: one conversion from an SMTP reply
//! ([`Status::from_reply`]) and one per kind of local trouble, so a new provider quirk is taught
//! here and nowhere else. A provider saying "slow down" (`421`, `432 4.3.2`, `451 4.7.x`) or "quota
//! used up" is not saying anything about the message: such a reply is a [`Cause::Throttled`] or
//! [`Cause::Quota`], never a bounce, even when its code is a 5xx (Microsoft `554 5.2.0 ...
//! SubmissionQuotaExceeded`, Gmail `550 5.4.5 Daily user sending limit exceeded`).

use serde::{Deserialize, Serialize};

use super::error::UpstreamError;
use crate::smtp::{EnhancedCode, Reply, Severity};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Status {
    /// The upstream took it (2xx; 354 for DATA).
    Accepted { reply: Reply },
    /// Try again later, for this reason.
    Temporary { cause: Cause, reply: Reply },
    /// Do not repeat it as it is (5xx).
    Permanent { reply: Reply },
}

/// Why a step must be tried again later; the queue's decisions follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A 4xx about this recipient or message: retried with backoff.
    Deferred,
    /// The provider is throttling the account (rate, connections): the account pauses.
    Throttled,
    /// The account's sending quota is used up: a longer pause, never a bounce.
    Quota,
    /// The upstream could not be reached, or the connection broke: the account's mail is held.
    Connection,
    /// No usable token, or the upstream refused it: held too, until a grant works.
    Token,
    /// Every upstream connection of the account is in use.
    Busy,
}

impl Status {
    /// The one reading of an upstream reply.
    pub fn from_reply(reply: Reply) -> Status {
        if let Some(cause) = throttling(&reply) {
            return Status::Temporary { cause, reply };
        }
        match reply.severity() {
            Severity::Positive | Severity::Intermediate => Status::Accepted { reply },
            Severity::Transient => Status::Temporary {
                cause: Cause::Deferred,
                reply,
            },
            Severity::Permanent => Status::Permanent { reply },
        }
    }

    /// A temporary failure of `cause` that the relay words itself (`451 4.4.1 ...`).
    pub fn temporary(cause: Cause, reply: Reply) -> Status {
        Status::Temporary { cause, reply }
    }

    /// The connection broke or could not be made: the mailer tries again later.
    pub fn connection(e: &UpstreamError) -> Status {
        Status::temporary(
            Cause::Connection,
            Reply::new(
                451,
                format!("4.4.1 Upstream not available, try again later ({e})"),
            ),
        )
    }

    /// The upstream said it is closing (`421`): our connection ends, not the mailer's session.
    pub fn closed_by_upstream(reply: &Reply) -> Status {
        let cause = throttling(reply).unwrap_or(Cause::Connection);
        Status::temporary(
            cause,
            Reply::new(
                451,
                format!(
                    "4.4.1 Upstream closed the connection ({}), try again later",
                    reply.summary()
                ),
            ),
        )
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Status::Accepted { reply }
            | Status::Temporary { reply, .. }
            | Status::Permanent { reply } => reply,
        }
    }

    pub fn into_reply(self) -> Reply {
        match self {
            Status::Accepted { reply }
            | Status::Temporary { reply, .. }
            | Status::Permanent { reply } => reply,
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Status::Accepted { .. })
    }

    pub fn cause(&self) -> Option<Cause> {
        match self {
            Status::Temporary { cause, .. } => Some(*cause),
            _ => None,
        }
    }

    /// The provider is throttling the account (rate or quota), whatever the code.
    pub fn is_throttling(&self) -> bool {
        matches!(self.cause(), Some(Cause::Throttled | Cause::Quota))
    }
}

/// Whether `reply` is the provider throttling the account, and how.
fn throttling(reply: &Reply) -> Option<Cause> {
    // Every reply passes here: an accepting one costs nothing more.
    if reply.code < 400 {
        return None;
    }
    let text = reply.lines.join(" ").to_ascii_lowercase();
    // X.2.2 is the recipient's mailbox being full ("over quota"): that recipient's fate, not the
    // account's sending quota.
    let mailbox_full = reply.enhanced().is_some_and(|c| c.1 == 2 && c.2 == 2);
    let quota = !mailbox_full
        && (reply.enhanced() == Some(EnhancedCode(5, 4, 5))
            || ["submissionquotaexceeded", "sending limit exceeded", "quota"]
                .iter()
                .any(|w| text.contains(w)));
    if quota {
        return Some(Cause::Quota);
    }
    let rate = match reply.code {
        421 => true,
        432 => reply.mentions(EnhancedCode(4, 3, 2)),
        451 => reply.enhanced().is_some_and(|c| c.0 == 4 && c.1 == 7),
        _ => false,
    };
    rate.then_some(Cause::Throttled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(code: u16, text: &str) -> Option<Cause> {
        Status::from_reply(Reply::new(code, text)).cause()
    }

    #[test]
    fn provider_throttling_and_quota_replies_are_recognised_whatever_their_code() {
        assert_eq!(
            cause(
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
            ),
            Some(Cause::Quota)
        );
        assert_eq!(
            cause(550, "5.4.5 Daily user sending limit exceeded."),
            Some(Cause::Quota)
        );
        for (code, text) in [
            (421, "4.7.0 Try again later, closing connection."),
            (
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            ),
            (451, "4.7.500 Server busy. Please try again later"),
        ] {
            assert_eq!(cause(code, text), Some(Cause::Throttled), "{code} {text}");
        }
        assert_eq!(cause(450, "4.2.1 Mailbox busy"), Some(Cause::Deferred));
        assert_eq!(cause(451, "4.3.0 Local error"), Some(Cause::Deferred));
        // A full mailbox is the recipient's trouble.
        assert_eq!(
            cause(
                452,
                "4.2.2 The email account that you tried to reach is over quota"
            ),
            Some(Cause::Deferred)
        );
        assert!(matches!(
            Status::from_reply(Reply::new(550, "5.1.1 No such user")),
            Status::Permanent { .. }
        ));
        assert!(Status::from_reply(Reply::new(354, "go")).is_accepted());
    }

    #[test]
    fn a_status_survives_the_spool_as_json() {
        let s = Status::from_reply(Reply::new(451, "4.7.500 Server busy"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }
}

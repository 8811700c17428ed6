//! The queue's own data: a message's envelope (fixed at submission) and its progress (each
//! recipient's state, replaced after every attempt), as they are kept on disk (JSON).

use serde::{Deserialize, Serialize};

use crate::config::GrantKind;
use crate::delivery::status::Status;

/// Where a message's body is in the local spool's log (a segment, and the body's offset in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAt {
    pub segment: u64,
    pub offset: u64,
}

/// Who sent a message to whom, fixed at submission.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub account: String,
    /// The provider and mailbox the account had when the message was queued, and its grant kind:
    /// enough to deliver it after a restart that no longer configures the account (its grant
    /// stays in the store under the account's name).
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub mailbox: String,
    #[serde(default)]
    pub grant: Option<GrantKind>,
    /// The envelope sender; empty for a null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// Unix seconds.
    pub received: u64,
    /// Bytes of body (not stored: the file's length tells).
    #[serde(skip)]
    pub size: u64,
    /// Where the body starts in its file (after the envelope line).
    #[serde(skip)]
    pub body_offset: u64,
    /// Where the body is in the log, for a logged message.
    #[serde(skip)]
    pub logged: Option<LogAt>,
    #[serde(default)]
    pub eight_bit: bool,
    #[serde(default)]
    pub smtputf8: bool,
    /// A delivery status notification made by the relay: never bounced itself.
    #[serde(default)]
    pub bounce: bool,
    /// The spool's copy of the body was found damaged: what was lost (never delivered).
    #[serde(skip)]
    pub damaged: Option<String>,
}

/// Ids are made by the queue (hex); anything else in a spool file is not ours, and is never used
/// to build a path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    Pending,
    Delivered,
    Bounced,
}

impl RcptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Bounced => "bounced",
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcptState {
    pub status: RcptStatus,
    /// What the last attempt came to for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Status>,
    /// A progress file of the first release has the reply's text instead.
    #[serde(default, rename = "last_reply", skip_serializing)]
    legacy: Option<String>,
    /// A bounced recipient's delivery status notification has been queued (or none is due). A
    /// bounce that could not be queued leaves this false, and is tried again.
    #[serde(default = "yes")]
    pub notified: bool,
    /// A bounced recipient's status code for its notification (RFC 3464 `Status:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_status: Option<String>,
}

impl RcptState {
    /// The last reply's text, for the operator and the bounce.
    pub fn last_reply(&self) -> Option<String> {
        self.last
            .as_ref()
            .map(|s| s.reply().summary())
            .or_else(|| self.legacy.clone())
    }
}

/// What has happened to a message so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Delivery attempts that ended in a temporary failure.
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: u64,
    /// What the last attempt came to (for any of its recipients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Status>,
    #[serde(default, rename = "last_reply", skip_serializing)]
    legacy: Option<String>,
    /// One per envelope recipient, in order.
    pub recipients: Vec<RcptState>,
}

impl Progress {
    pub fn fresh(recipients: usize) -> Progress {
        Progress {
            attempts: 0,
            next_attempt: 0,
            last: None,
            legacy: None,
            recipients: vec![
                RcptState {
                    status: RcptStatus::Pending,
                    last: None,
                    legacy: None,
                    notified: true,
                    dsn_status: None,
                };
                recipients
            ],
        }
    }

    /// The last reply's text, for the operator.
    pub fn last_reply(&self) -> Option<String> {
        self.last
            .as_ref()
            .map(|s| s.reply().summary())
            .or_else(|| self.legacy.clone())
    }

    /// Bounced recipients whose notification is still to be queued.
    pub fn unnotified(&self) -> impl Iterator<Item = usize> + '_ {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Bounced && !r.notified)
            .map(|(i, _)| i)
    }
}

//! The queue's own data: a message's envelope (fixed at submission) and its progress (each
//! recipient's state, replaced after every attempt), as they are kept on disk (JSON).

use std::sync::Arc;

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
    /// Shared by every message of the account (a queue may hold many thousands).
    #[serde(default)]
    pub provider: Arc<str>,
    #[serde(default)]
    pub mailbox: Arc<str>,
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
    pub damaged: Option<Box<str>>,
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

/// One recipient's fate so far. Kept small (a queue may hold many thousands): the last status is
/// boxed, and what an older release wrote is read into the same fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "RcptWire")]
pub struct RcptState {
    pub status: RcptStatus,
    /// A bounced recipient's delivery status notification has been queued (or none is due). A
    /// bounce that could not be queued leaves this false, and is tried again.
    pub notified: bool,
    /// What the last attempt came to for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Box<Status>>,
    /// A bounced recipient's status code for its notification (RFC 3464 `Status:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_status: Option<Box<str>>,
}

/// A recipient as a progress file has it (the first release wrote `last_reply` text).
#[derive(Deserialize)]
struct RcptWire {
    status: RcptStatus,
    #[serde(default = "yes")]
    notified: bool,
    #[serde(default)]
    last: Option<Box<Status>>,
    #[serde(default)]
    last_reply: Option<String>,
    #[serde(default)]
    dsn_status: Option<Box<str>>,
}

impl From<RcptWire> for RcptState {
    fn from(w: RcptWire) -> RcptState {
        RcptState {
            status: w.status,
            notified: w.notified,
            last: w
                .last
                .or_else(|| w.last_reply.as_deref().map(legacy_status)),
            dsn_status: w.dsn_status,
        }
    }
}

/// The status a first-release progress file's reply text stands for ("451 4.4.1 ...").
fn legacy_status(text: &str) -> Box<Status> {
    let (code, rest) = text.split_once(' ').unwrap_or((text, ""));
    let code = code.parse().unwrap_or(451);
    Box::new(Status::from_reply(crate::smtp::Reply::new(code, rest)))
}

impl RcptState {
    /// The last reply's text, for the operator and the bounce.
    pub fn last_reply(&self) -> Option<String> {
        self.last.as_ref().map(|s| s.reply().summary())
    }
}

/// What has happened to a message so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "ProgressWire")]
pub struct Progress {
    /// Delivery attempts that ended in a temporary failure.
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: u64,
    /// What the last attempt came to (for any of its recipients).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Box<Status>>,
    /// One per envelope recipient, in order.
    pub recipients: Vec<RcptState>,
}

#[derive(Deserialize)]
struct ProgressWire {
    attempts: u32,
    next_attempt: u64,
    #[serde(default)]
    last: Option<Box<Status>>,
    #[serde(default)]
    last_reply: Option<String>,
    recipients: Vec<RcptState>,
}

impl From<ProgressWire> for Progress {
    fn from(w: ProgressWire) -> Progress {
        Progress {
            attempts: w.attempts,
            next_attempt: w.next_attempt,
            last: w
                .last
                .or_else(|| w.last_reply.as_deref().map(legacy_status)),
            recipients: w.recipients,
        }
    }
}

impl Progress {
    pub fn fresh(recipients: usize) -> Progress {
        Progress {
            attempts: 0,
            next_attempt: 0,
            last: None,
            recipients: vec![
                RcptState {
                    status: RcptStatus::Pending,
                    notified: true,
                    last: None,
                    dsn_status: None,
                };
                recipients
            ],
        }
    }

    /// The last reply's text, for the operator.
    pub fn last_reply(&self) -> Option<String> {
        self.last.as_ref().map(|s| s.reply().summary())
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

//! The seam between a message and the way it goes upstream.
//!
//! A [`Transport`] begins a message for an account (the MAIL stage) and hands back a
//! [`Transaction`] that takes it stage by stage: one status per recipient, the body streamed, the
//! final status at the end. Direct mode passes each status on to the mailer as it comes; the queue
//! collects them per recipient. Today's one implementation is SMTP with XOAUTH2 through the pooled
//! connections ([`super::smtp::SmtpTransport`]); an HTTP API transport (Microsoft Graph, the
//! Gmail API) answers the recipient stage itself and sends at the end.

use std::sync::Arc;

use super::status::Status;
use crate::config::Account;
use crate::smtp::body::BodyChunk;
use crate::util::BoxFuture;

/// What a message starts with.
#[derive(Debug, Clone, Copy)]
pub struct MailStart<'a> {
    /// The envelope sender; empty for the null sender.
    pub from: &'a str,
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// The recipients the caller will ask for next, in order (and whether DATA follows them):
    /// a transport may send them ahead (SMTP pipelining, RFC 2920); each is still answered by
    /// [`Transaction::recipient`].
    pub ahead: &'a [String],
    pub data_ahead: bool,
}

/// A message begun: the status of its start, and the transaction when that was accepted.
pub type Begun = (Status, Option<Box<dyn Transaction>>);

pub trait Transport: Send + Sync + 'static {
    /// Begins a message for `account` (the MAIL stage).
    fn begin<'a>(&'a self, account: &'a Arc<Account>, start: MailStart<'a>)
        -> BoxFuture<'a, Begun>;

    /// Why the upstream will not take the account's messages right now, if it said so lastingly
    /// (a token refused for good, say): the mailer is told at AUTH instead of at every MAIL.
    fn known_refusal(&self, account: &Account) -> Option<String>;

    /// The account's grant was replaced or revoked: nothing authenticated with the old one is
    /// used again, and a refusal remembered for it no longer stands.
    fn grant_changed(&self, account: &str);
}

/// One message on its way, stage by stage. Dropped or aborted before [`Transaction::finish`],
/// nothing of it is delivered.
pub trait Transaction: Send + Sync {
    fn recipient<'a>(&'a mut self, to: &'a str) -> BoxFuture<'a, Status>;

    /// The body may follow (when accepted).
    fn data(&mut self) -> BoxFuture<'_, Status>;

    /// Part of the body, dot-stuffing undone; a failure shows in [`Transaction::finish`].
    fn body<'a>(&'a mut self, chunk: &'a BodyChunk) -> BoxFuture<'a, ()>;

    /// The end of the body: the message's final status.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Status>;

    /// Ends the transaction without a message (the mailer's RSET, or no recipient accepted).
    fn reset(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// Abandons it mid-way (the mailer left, the message is refused).
    fn abort(self: Box<Self>);

    /// The answer to the next `recipient` or `data` is already at hand (it came with MAIL's).
    fn answer_ready(&self) -> bool;
}

/// Each account's messages go the way its provider's `transport` says: SMTP, or an HTTP API.
pub struct Routes {
    pub smtp: Arc<dyn Transport>,
    pub api: Arc<dyn Transport>,
}

impl Routes {
    fn of(&self, account: &Account) -> &dyn Transport {
        if account.provider.transport.is_api() {
            &*self.api
        } else {
            &*self.smtp
        }
    }
}

impl Transport for Routes {
    fn begin<'a>(
        &'a self,
        account: &'a Arc<Account>,
        start: MailStart<'a>,
    ) -> BoxFuture<'a, Begun> {
        self.of(account).begin(account, start)
    }

    fn known_refusal(&self, account: &Account) -> Option<String> {
        self.of(account).known_refusal(account)
    }

    fn grant_changed(&self, account: &str) {
        // Either may hold something of the old grant (an account can have moved transports).
        self.smtp.grant_changed(account);
        self.api.grant_changed(account);
    }
}

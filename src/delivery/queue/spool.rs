//! The seam between the queue and where its messages are kept.
//!
//! The index, the workers and pacing talk to a [`Spool`], never to files. One implementation is
//! the local disk ([`super::local::LocalSpool`]: a segment log plus a file per staying message,
//! with group commit); the other the database several relays share
//! ([`super::shared::SharedSpool`]), whose claims keep two relays from sending the same message
//! ([`Spool::claim`]) and whose messages of a stopped or dead relay another adopts
//! ([`Spool::adopt`]).

use std::io;
use std::path::PathBuf;

use super::model::{Envelope, Progress};
use crate::util::BoxFuture;

/// A queued message's body, as a transfer reads it: whole when it is small (or already in
/// memory), else a stream.
pub enum Body {
    Bytes(Vec<u8>),
    Stream(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
}

/// A message found when the spool was opened.
pub struct Stored {
    pub envelope: Envelope,
    pub progress: Option<Progress>,
}

/// Stored bytes that could not be read as records.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Where they were: a segment and an offset in it.
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    /// Where the bytes were copied to (`None`: they could not be, and their place is kept).
    pub kept: Option<PathBuf>,
    /// The envelope of the message whose body was damaged, when it survived.
    pub envelope: Option<Vec<u8>>,
    /// Found when the spool was opened before (reported then).
    pub known: bool,
}

/// What opening a spool found.
#[derive(Default)]
pub struct Opened {
    pub stored: Vec<Stored>,
    pub damage: Vec<Damage>,
}

/// Damaged data kept aside, for `queue`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Quarantine {
    pub dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
}

/// A body being received; committed by [`Incoming::commit`], thrown away when dropped.
pub trait Incoming: Send + Sync {
    /// Body bytes so far.
    fn size(&self) -> u64;

    /// Adds body bytes (a failure shows at commit).
    fn push<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, ()>;

    /// Makes the message durable (envelope and body) and says in `env` where its body is.
    fn commit<'a>(self: Box<Self>, env: &'a mut Envelope) -> BoxFuture<'a, io::Result<()>>;
}

pub trait Spool: Send + Sync + 'static {
    /// Somewhere to receive the body of `env` (its id and arrival already set).
    fn incoming(&self, env: &Envelope) -> Box<dyn Incoming>;

    /// Records a message's progress durably; `env` says afterwards where its body is.
    fn record<'a>(
        &'a self,
        env: &'a mut Envelope,
        progress: &'a Progress,
    ) -> BoxFuture<'a, io::Result<()>>;

    /// Removes a message that is done with (delivered, bounced or deleted), durably: a crash
    /// afterwards must not deliver it again. Tried until it is durable; the future says when.
    fn remove(&self, env: &Envelope) -> BoxFuture<'static, io::Result<()>>;

    /// [`Spool::remove`] without waiting (the common delivered case); shutdown's
    /// [`Spool::flush`] still waits for it.
    fn remove_detached(&self, env: &Envelope);

    /// The body, to send.
    fn open_body<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, io::Result<Body>>;

    /// Up to `limit` bytes from the start of the body (its headers, for a bounce or `queue show`).
    fn read_head<'a>(&'a self, env: &'a Envelope, limit: u64) -> BoxFuture<'a, Vec<u8>>;

    /// Whether a message waiting this long keeps storage from being reclaimed (recording its
    /// progress frees it).
    fn pins_storage(&self, env: &Envelope) -> bool;

    /// Periodic upkeep (storage freed since gives its space back).
    fn upkeep(&self);

    /// Waits until everything handed over before is durable (shutdown).
    fn flush(&self) -> BoxFuture<'_, ()>;

    /// Damaged data kept aside.
    fn quarantine(&self) -> Quarantine;

    /// Free and total bytes of the storage, where that is known.
    fn space(&self) -> Option<(u64, u64)>;

    /// Small state kept beside the queue (the pacing windows), durably.
    fn write_state<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, io::Result<()>>;
    fn read_state(&self, name: &str) -> Option<Vec<u8>>;

    /// This relay works on message `id` now, unless another process has it or it is no longer
    /// this relay's. Renewed while a transfer lasts ([`Spool::renew`]) and given back with
    /// [`Spool::release`]. One relay on a local spool always has every claim.
    fn claim<'a>(&'a self, id: &'a str) -> BoxFuture<'a, io::Result<Claim>>;
    fn renew<'a>(&'a self, id: &'a str) -> BoxFuture<'a, io::Result<()>>;
    fn release(&self, id: &str);

    /// How often to look for messages this relay should take over ([`Spool::adopt`]); `None`:
    /// never (one relay's own spool).
    fn adopt_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// Messages of `accounts` that became this relay's since the spool was opened (another relay
    /// stopped or died), to index and deliver. Other accounts' wait for a relay that has them.
    fn adopt<'a>(&'a self, _accounts: &'a [String]) -> BoxFuture<'a, io::Result<Vec<Stored>>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Every relay's messages (of `account`), each with the relay holding it, where several
    /// share the spool; `None` for one relay's own.
    fn listing<'a>(
        &'a self,
        _account: Option<&'a str>,
    ) -> BoxFuture<'a, io::Result<Option<Vec<Listed>>>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// What claiming a message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This process sends it now.
    Taken,
    /// Another process has it for now (this relay's previous run, restarted within its claim's
    /// lease): try again later.
    Held,
    /// No longer this relay's (another adopted it while this one was out of reach): out of the
    /// index.
    Gone,
}

/// A message as a shared spool lists it.
pub struct Listed {
    pub stored: Stored,
    /// The relay (instance) that delivers it.
    pub owner: String,
    /// The process sending it now, if one is.
    pub claimed_by: Option<String>,
}

//! Which grant store a command opens: sled in `data_dir`, or the PostgreSQL database several
//! relays share (`[store] backend`); and, for an admin command that finds no relay running,
//! whether it may create a local store at all.

use std::sync::Arc;

use crate::config::{Backend, Config};
use crate::delivery::queue::local::LocalSpool;
use crate::delivery::queue::shared::SharedSpool;
use crate::delivery::queue::spool::{Opened, Spool};
use crate::store::postgres::{PgStore, Settings};
use crate::store::sled_store::SledStore;
use crate::store::Store;

/// Opens the store the config names; with PostgreSQL also the handle the queue uses. Blocking
/// (a sled open, or the database's first round trips on the runtime's handle): call it from the
/// blocking pool. `serve`: the relay itself, which registers its instance and starts with the
/// database down rather than not at all.
pub(super) fn open_store(
    config: &Config,
    serve: bool,
) -> Result<(Store, Option<Arc<PgStore>>), String> {
    match config.store.backend {
        Backend::Sled => SledStore::open(&config.server.data_dir, &config.key_file())
            .map(|s| (Store::new(s), None))
            .map_err(|e| e.to_string()),
        Backend::Postgres => {
            let url = config.store.url.clone().ok_or_else(|| {
                "[store] backend = \"postgres\" but no connection string was read (url_env or url_file)".to_string()
            })?;
            let settings = Settings {
                url,
                key_file: config.key_file(),
                instance: config.store.instance(),
                lease: config.store.lease(),
                serve,
            };
            let store = tokio::runtime::Handle::current()
                .block_on(PgStore::open(settings))
                .map_err(|e| e.to_string())?;
            Ok((Store::shared(store.clone()), Some(store)))
        }
    }
}

/// The queue's spool: `data_dir/queue`, or the shared database's tables. Blocking, like
/// [`open_store`].
pub(super) fn open_spool(
    config: &Config,
    shared: Option<&Arc<PgStore>>,
    disk: Arc<dyn crate::delivery::queue::local::disk::Disk>,
    serve: bool,
) -> Result<(Arc<dyn Spool>, Opened), String> {
    let data_dir = &config.server.data_dir;
    match shared {
        None => {
            let (spool, opened) = LocalSpool::open(data_dir, disk).map_err(|e| {
                format!(
                    "cannot open the queue in {}: {e}",
                    data_dir.join("queue").display()
                )
            })?;
            Ok((Arc::new(spool), opened))
        }
        Some(db) => {
            let (spool, stored) = tokio::runtime::Handle::current()
                .block_on(SharedSpool::open(db.clone(), data_dir, serve))
                .map_err(|e| format!("cannot open the queue in database {}: {e}", db.shown()))?;
            Ok((
                Arc::new(spool),
                Opened {
                    stored,
                    damage: Vec::new(),
                },
            ))
        }
    }
}

/// May an admin command run without a relay create the store where none exists?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewStore {
    /// No: there is nothing to show or change.
    Refuse,
    /// Storing a grant on a fresh install (neither database nor key yet) may.
    FreshInstall,
    /// `--init`: the operator asked for it.
    Init,
}

/// An admin command that finds no relay opens the store itself: it must not make a new, empty
/// database or a new key that `serve` for this file would not use, nor quietly start over beside
/// a key whose database is gone (a moved data_dir). It creates one only on a fresh install when
/// storing a grant, or with `--init`, and says where.
pub(super) fn local_store_check(
    config: &Config,
    socket: &std::path::Path,
    new_store: NewStore,
    creates: bool,
    announce: bool,
) -> Result<(), String> {
    if config.store.shared() {
        // The grants are in the database; whether it answers is the command's own first error.
        return Ok(());
    }
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let db = SledStore::database_path(&config.server.data_dir);
    let key = config.key_file();
    match (db.exists(), key.exists()) {
        (true, true) => Ok(()),
        (true, false) => Err(format!(
            "no relay answers on {}, and the database at {} has no key at {} (key_file): a new key \
             could not read its grants. Restore the key from its backup; if it is lost, move the \
             database away and authorize every account again",
            socket.display(),
            absolute(&db).display(),
            absolute(&key).display(),
        )),
        (false, key_exists) => {
            let may = match new_store {
                NewStore::Init => true,
                NewStore::FreshInstall => !key_exists,
                NewStore::Refuse => false,
            };
            if may && !announce {
                return Ok(());
            }
            if may {
                tracing::warn!(
                    database = %absolute(&db).display(),
                    key = %absolute(&key).display(),
                    "no relay answers on {} and there is no database yet: creating one here",
                    socket.display()
                );
                return Ok(());
            }
            let key_note = if key_exists {
                format!(
                    " although the key at {} exists (was data_dir moved?)",
                    absolute(&key).display()
                )
            } else {
                String::new()
            };
            if creates {
                Err(format!(
                    "no relay answers on {}, and there is no database at {}{key_note}: this would \
                     create a new, empty one. If that is what you want (a new install), run the \
                     command again with --init; otherwise point data_dir in {} at the relay's data",
                    socket.display(),
                    absolute(&db).display(),
                    config.path.display()
                ))
            } else {
                Err(format!(
                    "no relay answers on {}, and there is no database at {} yet{key_note}: nothing \
                     to show or change. On a new install, run `{}` or store a grant first \
                     (`{}`, `{}`)",
                    socket.display(),
                    absolute(&db).display(),
                    crate::hints::command("serve"),
                    crate::hints::command("authorize NAME"),
                    crate::hints::command("import-token NAME")
                ))
            }
        }
    }
}

/// Before `authorize` or `import-token` asks for anything: would the grant have a store to go to?
/// (Refusing after a finished consent flow would throw the new token away.)
pub async fn grant_store_preflight(config: &Config, init: bool) -> Result<(), String> {
    let socket = config.server.control_socket();
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Ok(());
    }
    let new_store = if init {
        NewStore::Init
    } else {
        NewStore::FreshInstall
    };
    // Quiet: the command that then stores the grant says where the new store is.
    local_store_check(config, &socket, new_store, true, false)
}

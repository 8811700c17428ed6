//! The listeners: accept, enforce the connection limit, hand each connection to `connection.rs`, and
//! shut down gracefully (stop accepting, let sessions finish for a while).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::AdminContext;
use crate::auth::Authenticator;
use crate::config::{Config, GrantKind, TlsMode};
use crate::connection::{self, Shared};
use crate::http::HttpClient;
use crate::reply::Reply;
use crate::store::GrantStore;
use crate::tokens::TokenManager;
use crate::upstream::UpstreamContext;

/// How long running sessions may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Opens the grant store and builds what delivery and administration share: token manager, HTTP
/// client, upstream TLS configurations.
pub fn open_core(config: &Arc<Config>) -> Result<Arc<UpstreamContext>, String> {
    let store = GrantStore::open(&config.server.data_dir, &config.server.key_file())
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(config.limits.upstream_timeout_secs);
    let public = crate::tls::client_config(None).map_err(|e| e.to_string())?;
    let http = HttpClient::new(public.clone(), timeout);
    let mut tls = HashMap::new();
    for (name, provider) in &config.providers {
        let cfg = match &provider.smtp_ca_file {
            Some(ca) => crate::tls::client_config(Some(ca))
                .map_err(|e| format!("provider `{name}`: smtp_ca_file: {e}"))?,
            None => public.clone(),
        };
        tls.insert(name.clone(), cfg);
    }
    let margin = Duration::from_secs(config.server.refresh_margin_secs);
    let tokens = Arc::new(TokenManager::new(store, http, margin, &config.accounts));
    Ok(Arc::new(UpstreamContext {
        tokens,
        tls,
        helo_name: config.server.hostname.clone(),
        timeout,
    }))
}

pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, TlsMode)>,
    control: tokio::net::UnixListener,
    admin: Arc<AdminContext>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Binds every listener and the control socket; fails with an operator-readable message.
    pub async fn bind(config: Config) -> Result<Server, String> {
        let config = Arc::new(config);
        // Ports first: a port in use is the likeliest failure, and nothing is created on disk before it.
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let listener = TcpListener::bind(l.address).await.map_err(|e| {
                format!("cannot listen on {} ({e}); change [[listeners]] address or stop what uses the port", l.address)
            })?;
            listeners.push((listener, l.tls));
        }
        crate::store::create_private_dir(&config.server.data_dir).map_err(|e| e.to_string())?;
        // Before the database, so that a second relay on the same data_dir is told so instead of a lock error.
        let control = crate::control::bind(&config.server.control_socket())?;
        let upstream = open_core(&config)?;
        let needs_tls = config.listeners.iter().any(|l| l.tls != TlsMode::None);
        let tls = if needs_tls {
            let cfg = crate::tls::server_config(&config.tls, &config.server.hostname)
                .map_err(|e| e.to_string())?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        } else {
            None
        };
        for account in &config.accounts {
            if account.grant == GrantKind::RefreshToken
                && matches!(upstream.tokens.store().get(&account.name), Ok(None))
            {
                tracing::warn!(account = %account.name, "no grant stored; run `xoauth-relay authorize {}`", account.name);
            }
        }
        let admin = Arc::new(AdminContext {
            config: config.clone(),
            upstream: upstream.clone(),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            stop: stop_rx,
            authenticator: Authenticator::new(&config.accounts),
            config,
            upstream,
            tls,
        });
        Ok(Server {
            shared,
            listeners,
            control,
            admin,
            stop,
        })
    }

    pub fn local_addrs(&self) -> Vec<(SocketAddr, TlsMode)> {
        self.listeners
            .iter()
            .filter_map(|(l, mode)| l.local_addr().ok().map(|a| (a, *mode)))
            .collect()
    }

    /// Serves until `shutdown` completes, then waits (bounded) for running sessions.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let max = self.shared.config.limits.max_connections;
        let permits = Arc::new(Semaphore::new(max));
        let ids = Arc::new(AtomicU64::new(1));
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, mode) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, tls = %mode, "listening");
            }
            tasks.spawn(accept_loop(
                listener,
                mode,
                self.shared.clone(),
                permits.clone(),
                ids.clone(),
            ));
        }
        tasks.spawn(crate::control::serve(self.control, self.admin.clone()));
        shutdown.await;
        tracing::info!("shutting down: no new connections, waiting for sessions to finish");
        tasks.abort_all();
        let _ = self.stop.send(true);
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions still running after {}s; closing them",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        let _ = std::fs::remove_file(self.shared.config.server.control_socket());
        self.shared.upstream.tokens.store().flush();
    }
}

async fn accept_loop(
    listener: TcpListener,
    mode: TlsMode,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    ids: Arc<AtomicU64>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut tcp = tcp;
                let reply = Reply::new(421, "4.3.2 Too many connections, try again later");
                let _ = tcp.write_all(&reply.to_bytes()).await;
                let _ = tcp.shutdown().await;
            });
            tracing::warn!(%peer, "connection refused: max_connections reached");
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            connection::handle(shared, Box::new(tcp), peer, mode, id).await;
            drop(permit);
        });
    }
}

//! Builds the running relay from a [`Config`]: the services (store, token manager, upstream
//! context, authenticator), the tasks (listeners, control socket, sessions) and their shutdown.
//!
//! Every task the relay starts is tracked: listeners and the control socket stop on the shutdown
//! signal, sessions get [`SHUTDOWN_GRACE`] to finish and are then cut. This is the one place that
//! knows every room; nothing imports it but the command line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminContext;
use crate::auth::Authenticator;
use crate::config::{Config, GrantKind, TlsMode};
use crate::control::wire::{Request, Response};
use crate::delivery::UpstreamContext;
use crate::inbound::connection::Shared;
use crate::inbound::listener::{self, Admission, Listener};
use crate::oauth::http::HttpClient;
use crate::oauth::issuer::ProviderIssuer;
use crate::oauth::tokens::TokenManager;
use crate::store::sled_store::SledStore;
use crate::store::Store;
use crate::util::clock;

/// How long running sessions may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What delivery and administration share: the store, the token manager, the upstream TLS
/// configurations, the HTTP client for provider endpoints.
pub struct Core {
    pub config: Arc<Config>,
    pub upstream: Arc<UpstreamContext>,
    pub http: HttpClient,
}

impl Core {
    /// Opens the grant store (blocking: at start-up, or in a one-shot command).
    pub fn open(config: Arc<Config>) -> Result<Core, String> {
        let store = SledStore::open(&config.server.data_dir, &config.server.key_file())
            .map_err(|e| e.to_string())?;
        let timeout = Duration::from_secs(config.limits.upstream_timeout_secs);
        let public = crate::util::tls::client_config(None).map_err(|e| e.to_string())?;
        let http = HttpClient::new(public.clone(), timeout);
        let mut tls = HashMap::new();
        for (name, provider) in &config.providers {
            let cfg = match &provider.smtp_ca_file {
                Some(ca) => crate::util::tls::client_config(Some(ca))
                    .map_err(|e| format!("provider `{name}`: smtp_ca_file: {e}"))?,
                None => public.clone(),
            };
            tls.insert(name.clone(), cfg);
        }
        let margin = Duration::from_secs(config.server.refresh_margin_secs);
        let issuer = Arc::new(ProviderIssuer { http: http.clone() });
        let tokens = Arc::new(TokenManager::new(
            Store::new(store),
            issuer,
            clock::system(),
            margin,
            &config.accounts,
        ));
        let upstream = Arc::new(UpstreamContext {
            tokens,
            tls,
            helo_name: config.server.hostname.clone(),
            timeout,
        });
        Ok(Core {
            config,
            upstream,
            http,
        })
    }

    fn admin(&self) -> AdminContext {
        AdminContext {
            config: self.config.clone(),
            upstream: self.upstream.clone(),
            http: self.http.clone(),
        }
    }
}

/// Runs `request` in the running relay if there is one (over its control socket), else against
/// the store opened here.
pub async fn admin(config: Config, request: Request) -> Result<Response, String> {
    let socket = config.server.control_socket();
    if let Some(response) = crate::control::client::call(&socket, &request).await? {
        return Ok(response);
    }
    let config = Arc::new(config);
    let core = tokio::task::spawn_blocking(move || Core::open(config))
        .await
        .map_err(|e| e.to_string())??;
    let response = crate::admin::execute(&core.admin(), request).await;
    core.upstream
        .tokens
        .store()
        .flush()
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// A relay with its ports bound, ready to [`Relay::run`].
pub struct Relay {
    core: Core,
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    control: tokio::net::UnixListener,
}

impl Relay {
    /// Binds every listener and the control socket; fails with an operator-readable message.
    pub async fn bind(config: Config) -> Result<Relay, String> {
        let config = Arc::new(config);
        // Ports first: a port in use is the likeliest failure, and nothing is created on disk before it.
        let mut listeners = Vec::new();
        for l in &config.listeners {
            listeners.push(Listener::bind(l.address, l.tls).await?);
        }
        crate::util::fs::create_private_dir(&config.server.data_dir).map_err(|e| {
            format!(
                "cannot create data_dir {}: {e}",
                config.server.data_dir.display()
            )
        })?;
        // Before the database, so that a second relay on the same data_dir is told so instead of a
        // lock error.
        let control = crate::control::server::bind(&config.server.control_socket())?;
        let setup = config.clone();
        let (core, tls) = tokio::task::spawn_blocking(move || {
            let core = Core::open(setup.clone())?;
            let tls = if setup.listeners.iter().any(|l| l.tls != TlsMode::None) {
                let cfg = crate::util::tls::server_config(
                    &setup.tls.certificate,
                    &setup.tls.private_key,
                    &setup.server.hostname,
                )
                .map_err(|e| e.to_string())?;
                Some(tokio_rustls::TlsAcceptor::from(cfg))
            } else {
                None
            };
            Ok::<_, String>((core, tls))
        })
        .await
        .map_err(|e| e.to_string())??;
        for account in &config.accounts {
            if account.grant == GrantKind::RefreshToken
                && matches!(core.upstream.tokens.store().get(&account.name), Ok(None))
            {
                tracing::warn!(account = %account.name, "no grant stored; run `xoauth-relay authorize {}`", account.name);
            }
        }
        let shared = Arc::new(Shared {
            authenticator: Authenticator::new(&config.accounts),
            config,
            upstream: core.upstream.clone(),
            tls,
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
        });
        Ok(Relay {
            core,
            shared,
            listeners,
            control,
        })
    }

    pub fn local_addrs(&self) -> Vec<(SocketAddr, TlsMode)> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().map(|a| (a, l.mode)))
            .collect()
    }

    /// Serves until `shutdown` completes, then waits (bounded) for running sessions.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let sessions = TaskTracker::new();
        let admission = Admission::new(self.shared.config.limits.max_connections, sessions.clone());
        let mut services = tokio::task::JoinSet::new();
        for l in self.listeners {
            services.spawn(listener::accept_loop(
                l,
                self.shared.clone(),
                admission.clone(),
            ));
        }
        services.spawn(crate::control::server::serve(
            self.control,
            Arc::new(self.core.admin()),
            self.shared.stop.clone(),
            sessions.clone(),
        ));
        shutdown.await;
        tracing::info!("shutting down: no new connections, waiting for sessions to finish");
        self.shared.stop.cancel();
        while services.join_next().await.is_some() {}
        sessions.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions still running after {}s; closing them",
                SHUTDOWN_GRACE.as_secs()
            );
            self.shared.cut.cancel();
            sessions.wait().await;
        }
        let _ = std::fs::remove_file(self.shared.config.server.control_socket());
        if let Err(e) = self.core.upstream.tokens.store().flush().await {
            tracing::warn!(error = %e, "cannot flush the database at shutdown");
        }
    }
}

//! Builds the running relay from a [`Config`]: the services (store, token manager, upstream
//! context, authenticator), the tasks (listeners, control socket, sessions) and their shutdown.
//!
//! Every task the relay starts is tracked: listeners and the control socket stop on the shutdown
//! signal, sessions get [`SHUTDOWN_GRACE`] to finish and are then cut. This is the one place that
//! knows every room; nothing imports it but the command line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminContext;
use crate::auth::Authenticator;
use crate::config::{Account, Config, GrantKind, TlsMode};
use crate::control::wire::{Request, Response};
use crate::delivery::activity::{Activity, PERSIST_EVERY};
use crate::delivery::api::{ApiTransport, Settings as ApiSettings};
use crate::delivery::pacing::Pacers;
use crate::delivery::pool::{Dialer, Pool};
use crate::delivery::queue::{Queue, Setup as QueueSetup};
use crate::delivery::slots::{LocalSlots, SharedSlots, Slots};
use crate::delivery::smtp::SmtpTransport;
use crate::delivery::submission::Services as DeliveryServices;
use crate::delivery::transport::{Routes, Transport};
use crate::delivery::Delivery;
use crate::inbound::admission::Admission;
use crate::inbound::listener::{self, Listener};
use crate::inbound::shared::{Live, Shared};
use crate::oauth::http::HttpClients;
use crate::oauth::issuer::ProviderIssuer;
use crate::oauth::tokens::TokenManager;
use crate::observe::http::{Fill, Health};
use crate::observe::metrics::Gauges;
use crate::observe::Observer;
use crate::util::clock::{self, SharedClock};

mod migrate;
pub mod preflight;
mod reload;
mod sharing;
mod stores;

pub use self::migrate::migrate_from_sled;
use self::reload::Reloader;
use self::stores::local_store_check;
pub use self::stores::{grant_store_preflight, NewStore};

/// How long running sessions may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Every service of the relay, built once here; each room is handed the ones it uses.
pub struct Services {
    pub tokens: Arc<TokenManager>,
    pub pool: Arc<Pool>,
    /// The HTTP API transports (their limits follow a reload).
    pub api: Arc<ApiTransport>,
    pub transport: Arc<dyn Transport>,
    pub pacers: Arc<Pacers>,
    pub queue: Arc<Queue>,
    pub activity: Arc<Activity>,
    /// The inbound side's way in.
    pub delivery: Arc<Delivery>,
    pub observer: Observer,
    pub clock: SharedClock,
}

/// What delivery and administration share: the services, the config they were built from, the
/// HTTP client for provider endpoints.
pub struct Core {
    pub config: Arc<Config>,
    pub services: Arc<Services>,
    pub http: HttpClients,
}

impl Core {
    /// Opens the grant store (blocking: at start-up, or in a one-shot command). Background work
    /// (closing retired upstream connections) runs in `tasks`.
    /// `alerts`: whether alert channels are live (the relay) or not (a one-shot command, which
    /// must not page anyone about what it happens to see).
    pub fn open(config: Arc<Config>, tasks: TaskTracker, alerts: bool) -> Result<Core, String> {
        Core::open_on(
            config,
            tasks,
            alerts,
            Arc::new(crate::delivery::queue::disk::Os),
        )
    }

    /// [`Core::open`] with the spool on `disk` (tests hand in one that fails on request).
    pub fn open_on(
        config: Arc<Config>,
        tasks: TaskTracker,
        alerts: bool,
        disk: Arc<dyn crate::delivery::queue::disk::Disk>,
    ) -> Result<Core, String> {
        let (store, database) = stores::open_store(&config, alerts)?;
        let timeout = Duration::from_secs(config.limits.upstream_timeout_secs);
        let http = HttpClients::new(&config)?;
        let tls = preflight::client_tls(&config)?;
        let margin = Duration::from_secs(config.server.refresh_margin_secs);
        let issuer = Arc::new(ProviderIssuer { http: http.clone() });
        let clock = clock::system();
        let observer = if alerts {
            Observer::new(&config.alerts, clock.clone())?
        } else {
            Observer::quiet(clock.clone())
        };
        observer.prepare(&config);
        // The queue first: mail queued by accounts no longer configured brings those accounts
        // back (without a login) for the token manager, the pool and pacing.
        let (spool, opened) = stores::open_spool(&config, database.as_ref(), disk, alerts)?;
        let (queue, retired) = Queue::open(QueueSetup {
            spool,
            opened,
            config: config.delivery.clone(),
            accounts: &config.accounts,
            providers: &config.providers,
            clock: clock.clone(),
            hostname: &config.server.hostname,
            observer: observer.clone(),
            shared: store.sharing().cloned(),
        });
        let accounts: Vec<Arc<Account>> = config.accounts.iter().chain(&retired).cloned().collect();
        let tokens = Arc::new(TokenManager::new(
            store,
            issuer,
            clock.clone(),
            margin,
            &accounts,
            tasks.clone(),
            observer.clone(),
        ));
        tokens.follow_shared();
        let dialer = Dialer {
            tokens: tokens.clone(),
            tls: arc_swap::ArcSwap::from_pointee(tls),
            helo_name: config.server.hostname.clone(),
            timeout: crate::delivery::pool::millis(timeout),
            observer: observer.clone(),
        };
        let limits = &config.limits;
        // Upstream connections (SMTP) and requests (APIs) count against one cap per account;
        // across relays when the store is shared.
        let sharing = tokens.store().sharing().cloned();
        let slots = || -> Arc<dyn Slots> {
            match &sharing {
                Some(store) => Arc::new(SharedSlots::new(store.clone())),
                None => Arc::new(LocalSlots::default()),
            }
        };
        let pool = Pool::new(
            &accounts,
            dialer,
            Duration::from_secs(limits.upstream_idle_secs),
            Duration::from_secs(limits.upstream_wait_secs),
            tasks.clone(),
            clock.clone(),
            slots(),
        );
        if let Some(store) = &sharing {
            sharing::follow_wants(store, Arc::downgrade(&pool));
        }
        let pacers = Arc::new(Pacers::new(&accounts, clock.clone(), sharing.clone()));
        queue.load_pacing(&pacers);
        queue.load_usage(&observer.usage);
        let queue = Arc::new(queue);
        let api = Arc::new(ApiTransport::new(
            tokens.clone(),
            observer.clone(),
            &config.server.data_dir,
            ApiSettings::of(limits),
            slots(),
        )?);
        let transport: Arc<dyn Transport> = Arc::new(Routes {
            smtp: Arc::new(SmtpTransport::new(pool.clone())),
            api: api.clone(),
        });
        let activity = Arc::new(Activity::new(&config.accounts));
        let delivery = Arc::new(Delivery::new(DeliveryServices {
            transport: transport.clone(),
            queue: queue.clone(),
            pacers: pacers.clone(),
            activity: activity.clone(),
            tokens: tokens.clone(),
            observer: observer.clone(),
            clock: clock.clone(),
            pacing_wait: Duration::from_secs(limits.upstream_wait_secs),
        }));
        Ok(Core {
            config,
            services: Arc::new(Services {
                tokens,
                pool,
                api,
                transport,
                pacers,
                queue,
                activity,
                delivery,
                observer,
                clock,
            }),
            http,
        })
    }

    fn admin(&self) -> AdminContext {
        let s = &self.services;
        AdminContext {
            config: arc_swap::ArcSwap::new(self.config.clone()),
            tokens: s.tokens.clone(),
            pool: s.pool.clone(),
            transport: s.transport.clone(),
            queue: s.queue.clone(),
            activity: s.activity.clone(),
            observer: s.observer.clone(),
            clock: s.clock.clone(),
            http: self.http.clone(),
        }
    }
}

/// Control requests of the running relay: `reload` here, the rest in the admin room.
/// `health` through the control socket: running, and with a shared store, whether the database
/// answers and which relays share it.
async fn health_text(admin: &AdminContext) -> Response {
    let pid = std::process::id();
    let Some(shared) = admin.tokens.store().sharing() else {
        return Response::ok(format!("ready: relay running (pid {pid})\n"));
    };
    if let Some(why) = shared.trouble() {
        return Response::fail(format!("not ready: {why} (relay running, pid {pid})\n"));
    }
    let relays = shared.relays().await.unwrap_or_default();
    Response::ok(format!(
        "ready: relay running (pid {pid}); relays sharing the database:\n{}",
        relays
            .iter()
            .map(|r| format!("  {r}\n"))
            .collect::<String>()
    ))
}

struct Control {
    admin: Arc<AdminContext>,
    reloader: Arc<Reloader>,
    /// The failed-login lockouts live here, in memory.
    shared: Arc<Shared>,
}

impl crate::control::server::Handler for Control {
    fn handle(&self, request: Request) -> crate::util::BoxFuture<'_, Response> {
        Box::pin(async move {
            match request {
                Request::Reload { config } => match self.reloader.reload(config).await {
                    Ok(text) => Response::ok(text),
                    Err(text) => Response::fail(text),
                },
                Request::Unlock { address } => {
                    let response = unlock(&self.shared, address.as_deref());
                    if let (true, Some(store)) = (response.ok, self.admin.tokens.store().sharing())
                    {
                        let ip = address.as_deref().and_then(|a| a.parse().ok());
                        sharing::announce_unlock(store, ip);
                    }
                    response
                }
                // Control requests are served only once the relay serves mail.
                Request::Health => health_text(&self.admin).await,
                other => crate::admin::execute(&self.admin, other).await,
            }
        })
    }
}

/// `unlock [ADDRESS]`: lifts a failed-login lockout (an operator's own monitoring, say).
fn unlock(shared: &Shared, address: Option<&str>) -> Response {
    let ip = match address.map(str::parse::<std::net::IpAddr>).transpose() {
        Ok(ip) => ip,
        Err(e) => return Response::fail(format!("not an IP address: {e}")),
    };
    let lifted = shared.lockout.unlock(ip, tokio::time::Instant::now());
    let whom = address.unwrap_or("every address");
    tracing::info!(
        address = whom,
        lifted,
        "failed-login lockout lifted by the operator"
    );
    Response::ok(match (address, lifted) {
        (Some(a), 0) => format!("{a} was not locked out; its failed logins are forgotten\n"),
        (Some(a), _) => format!("{a} unlocked\n"),
        (None, n) => format!("{n} address(es) unlocked; every failed-login count is forgotten\n"),
    })
}

/// Runs `request` in the running relay if there is one (over its control socket), else against
/// the store opened here.
pub async fn admin(config: Config, request: Request) -> Result<Response, String> {
    admin_with(config, request, false).await
}

/// [`admin`]; `init`: without a relay, a command that needs a store may create a new one
/// (`--init`).
pub async fn admin_with(config: Config, request: Request, init: bool) -> Result<Response, String> {
    let socket = config.server.control_socket();
    if let Some(response) = crate::control::client::call(&socket, &request).await? {
        return Ok(response);
    }
    if matches!(
        request,
        Request::Reload { .. } | Request::Unlock { .. } | Request::Health
    ) {
        return Err(crate::admin::RELAY_ONLY.into());
    }
    let creates = matches!(request, Request::StoreGrant { .. } | Request::Test { .. });
    let new_store = match request {
        _ if init => NewStore::Init,
        Request::StoreGrant { .. } => NewStore::FreshInstall,
        _ => NewStore::Refuse,
    };
    local_store_check(&config, &socket, new_store, creates, true)?;
    let config = Arc::new(config);
    let tasks = TaskTracker::new();
    let background = tasks.clone();
    let core = tokio::task::spawn_blocking(move || Core::open(config, background, false))
        .await
        .map_err(|e| e.to_string())??;
    let response = crate::admin::execute(&core.admin(), request).await;
    core.services.pool.close();
    tasks.close();
    tasks.wait().await;
    core.services
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
    /// Sessions, control requests and background work: everything shutdown waits for.
    tasks: TaskTracker,
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    control: tokio::net::UnixListener,
    /// `[metrics] address`, bound with the other ports.
    metrics: Option<tokio::net::TcpListener>,
    health: Arc<Health>,
    hangup: tokio::signal::unix::Signal,
}

impl Relay {
    /// Binds every listener and the control socket; fails with an operator-readable message.
    pub async fn bind(config: Config) -> Result<Relay, String> {
        Relay::bind_on(config, Arc::new(crate::delivery::queue::disk::Os)).await
    }

    /// [`Relay::bind`] with the spool on `disk` (tests hand in one that fails on request).
    pub async fn bind_on(
        config: Config,
        disk: Arc<dyn crate::delivery::queue::disk::Disk>,
    ) -> Result<Relay, String> {
        let config = Arc::new(config);
        let findings = preflight::run(&config);
        for warning in &findings.warnings {
            tracing::warn!("{warning}");
        }
        if !findings.refusals.is_empty() {
            return Err(findings.refusals.join("\n"));
        }
        raise_file_limit()?;
        // A second `serve` on the same file would otherwise meet its own ports in use first.
        let socket = config.server.control_socket();
        if let Some(pid) = crate::control::client::running_pid(&socket).await {
            return Err(format!(
                "another relay is already running with this config (pid {pid}, control socket {}); \
                 stop it first, or apply a changed config with `{}`",
                socket.display(),
                crate::hints::command("reload")
            ));
        }
        // Ports first: a port in use is the likeliest failure, and nothing is created on disk before it.
        let mut listeners = Vec::new();
        for l in &config.listeners {
            listeners.push(Listener::bind(l.address, l.tls).await?);
        }
        let metrics = match config.metrics.address {
            None => None,
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| listener::bind_error("[metrics] address", addr, &e))?,
            ),
        };
        crate::util::fs::create_private_dir(&config.server.data_dir).map_err(|e| {
            format!(
                "cannot create data_dir {}: {e}",
                config.server.data_dir.display()
            )
        })?;
        tighten_data_dir(&config.server.data_dir)?;
        // Before the database, so that a second relay on the same data_dir is told so instead of a
        // lock error.
        let control = crate::control::server::bind(&config.server.control_socket())?;
        let setup = config.clone();
        let tasks = TaskTracker::new();
        let background = tasks.clone();
        let (core, tls) = tokio::task::spawn_blocking(move || {
            let core = Core::open_on(setup.clone(), background, true, disk)?;
            let tls = preflight::server_tls(&setup)?;
            Ok::<_, String>((core, tls))
        })
        .await
        .map_err(|e| e.to_string())??;
        for account in &config.accounts {
            if account.grant == GrantKind::RefreshToken
                && matches!(core.services.tokens.stored_grant(&account.name), Ok(None))
            {
                tracing::warn!(account = %account.name, "no grant stored; run `{}`", crate::hints::grant_command(account));
            }
        }
        let live = Live {
            authenticator: Authenticator::new(
                &config.accounts,
                Duration::from_secs(config.limits.auth_cache_secs),
                core.services.clock.clone(),
            ),
            config: config.clone(),
            tls,
        };
        let limits = &config.limits;
        let shared = Arc::new(Shared {
            admission: Admission::new(
                limits.max_connections,
                limits.max_connections_per_ip,
                tasks.clone(),
            ),
            lockout: crate::inbound::lockout::Lockout::new(
                config.limits.auth_failures_per_login,
                config.limits.auth_failures_per_ip,
                Duration::from_secs(config.limits.auth_lockout_secs),
            ),
            live: arc_swap::ArcSwap::from_pointee(live),
            delivery: core.services.delivery.clone(),
            observer: core.services.observer.clone(),
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
        });
        if let Some(store) = core.services.tokens.store().sharing() {
            sharing::share_lockouts(&shared, store.clone());
        }
        // Installed before the relay reports ready: SIGHUP's default action would end the process.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
        Ok(Relay {
            core,
            tasks,
            shared,
            listeners,
            control,
            metrics,
            health: Arc::new(Health::starting()),
            hangup,
        })
    }

    /// A read-only view of the running relay's counters, for tests and diagnostics.
    pub fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
            services: self.core.services.clone(),
        }
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if `[metrics] address` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addrs(&self) -> Vec<(SocketAddr, TlsMode)> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().map(|a| (a, l.mode)))
            .collect()
    }

    /// Serves until `shutdown` completes, then waits (bounded) for running sessions.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let sessions = self.tasks;
        let config = self.shared.live.load().config.clone();
        let stop = self.shared.stop.clone();
        let upstream = self.core.services.clone();
        let mut services = tokio::task::JoinSet::new();
        for l in self.listeners {
            services.spawn(listener::accept_loop(l, self.shared.clone()));
        }
        let admin = Arc::new(self.core.admin());
        let reloader = Arc::new(Reloader::new(
            self.shared.clone(),
            admin.clone(),
            upstream.clone(),
            &config,
        ));
        services.spawn(crate::control::server::serve(
            self.control,
            Arc::new(Control {
                admin,
                reloader: reloader.clone(),
                shared: self.shared.clone(),
            }),
            stop.clone(),
            sessions.clone(),
        ));
        services.spawn(reload::on_hangup(self.hangup, reloader, stop.clone()));
        services.spawn(housekeeping(
            self.shared.clone(),
            upstream.clone(),
            stop.clone(),
        ));
        services.spawn(upstream.tokens.clone().run_upkeep(stop.clone()));
        // Served until the very end, so that /readyz says 503 while sessions drain.
        let endpoint_stop = CancellationToken::new();
        let endpoint = self.metrics.map(|listener| {
            // Said here, not at bind: a start that fails later never claims to serve.
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            }
            tokio::spawn(crate::observe::http::serve(
                listener,
                upstream.observer.metrics.clone(),
                gauges(self.shared.clone(), upstream.clone()),
                self.health.clone(),
                endpoint_stop.clone(),
            ))
        });
        upstream.queue.start(
            upstream.transport.clone(),
            upstream.pacers.clone(),
            stop.clone(),
            self.shared.cut.clone(),
            &sessions,
        );
        // Under systemd (Type=notify): the listeners are bound and accepting now.
        notify(sd_notify::NotifyState::Ready);
        if let Some(shared) = upstream.tokens.store().sharing().cloned() {
            self.health.set_check(Box::new(move || shared.trouble()));
        }
        self.health.set(None);
        shutdown.await;
        self.health.set(Some("shutting down"));
        notify(sd_notify::NotifyState::Stopping);
        tracing::info!("shutting down: no new connections, waiting for sessions to finish");
        stop.cancel();
        while services.join_next().await.is_some() {}
        if tokio::time::timeout(SHUTDOWN_GRACE, wait_for_sessions(&sessions, &upstream))
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions still running after {}s; closing them",
                SHUTDOWN_GRACE.as_secs()
            );
            self.shared.cut.cancel();
            wait_for_sessions(&sessions, &upstream).await;
        }
        let _ = std::fs::remove_file(config.server.control_socket());
        persist_state(&upstream).await;
        upstream.queue.flush().await;
        if let Err(e) = upstream.tokens.store().flush().await {
            tracing::warn!(error = %e, "cannot flush the database at shutdown");
        }
        if let Some(shared) = upstream.tokens.store().sharing() {
            shared.close().await;
        }
        endpoint_stop.cancel();
        if let Some(endpoint) = endpoint {
            let _ = endpoint.await;
        }
    }
}

/// Fills the state gauges from the pool, the token manager and the queue at scrape time.
fn gauges(shared: Arc<Shared>, upstream: Arc<Services>) -> Fill {
    Arc::new(move |g: &Gauges| {
        if let Some(store) = upstream.tokens.store().sharing() {
            g.set_database(store.database(), store.trouble().is_none());
        }
        for a in &shared.live.load().config.accounts {
            let name = &a.name;
            let open = upstream.pool.open_connections(name);
            Gauges::set(&g.upstream_connections, name, open as i64);
            if let Some(left) = upstream.tokens.cached_for(name) {
                Gauges::set(&g.token_expiry_seconds, name, left.as_secs() as i64);
            }
            Gauges::set(&g.grant_ok, name, upstream.tokens.grant_ok(a) as i64);
            let q = upstream.queue.account_view(name);
            Gauges::set(&g.queue_messages, name, q.queued as i64);
            Gauges::set(
                &g.queue_oldest_seconds,
                name,
                q.oldest_secs.unwrap_or(0) as i64,
            );
            Gauges::set(&g.account_paused, name, q.paused.is_some() as i64);
        }
    })
}

/// `data_dir` holds sealed grants and queued mail: an existing one that others may read (a 0755
/// made by a container image, say) is tightened to 0700, or `serve` refuses.
fn tighten_data_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !crate::util::fs::readable_by_others(dir) {
        return Ok(());
    }
    let mode = std::fs::metadata(dir)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        format!(
            "data_dir {} is open to other users (mode {mode:o}) and cannot be tightened ({e}); run `chmod 700 {}`",
            dir.display(),
            dir.display()
        )
    })?;
    tracing::warn!(data_dir = %dir.display(), mode = %format!("{mode:o}"), "data_dir was open to other users; tightened to 0700");
    Ok(())
}

/// Raises the soft limit on open files to the hard one (which [`preflight::file_limit`] checked).
fn raise_file_limit() -> Result<(), String> {
    rlimit::increase_nofile_limit(u64::MAX)
        .map(drop)
        .map_err(|e| format!("cannot raise the open-files limit: {e}"))
}

/// Tells systemd (when it started us with a notify socket) what the relay is doing.
fn notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Counters of a running relay.
#[derive(Clone)]
pub struct Probe {
    shared: Arc<Shared>,
    services: Arc<Services>,
}

impl Probe {
    /// Logins answered from the login cache (without argon2).
    pub fn login_cache_hits(&self) -> u64 {
        self.shared.live.load().authenticator.cache_hits()
    }

    /// Open upstream connections of `account`, idle ones included.
    pub fn upstream_connections(&self, account: &str) -> usize {
        self.services.pool.open_connections(account)
    }
}

/// Sessions end, then the pool says QUIT to what they left idle, and the tracker drains.
async fn wait_for_sessions(tasks: &TaskTracker, upstream: &Services) {
    tasks.close();
    tasks.wait().await;
    // Sessions hand connections back while they finish; only then close the pool, and wait for
    // the QUITs it starts.
    upstream.pool.close();
    tasks.wait().await;
}

/// Periodic upkeep until the relay stops (tokens have their own, `TokenManager::run_upkeep`):
/// idle upstream connections closed, quiet grants kept alive, grants that could not be saved saved, last-use times and pacing windows saved,
/// waiting messages moved out of old log segments, stuck queues reported.
async fn housekeeping(shared: Arc<Shared>, upstream: Arc<Services>, stop: CancellationToken) {
    let every = |secs| {
        let mut i = tokio::time::interval(Duration::from_secs(secs));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    };
    let (mut reap, mut keepalive) = (every(1), every(3600));
    let mut persist = tokio::time::interval(PERSIST_EVERY);
    persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = reap.tick() => upstream.pool.reap(),
            _ = keepalive.tick() => {
                let days = shared.live.load().config.server.keepalive_days;
                upstream.tokens.keep_alive_behind(Duration::from_secs(days * 86_400));
            }
            _ = persist.tick() => {
                upstream.tokens.save_unsaved().await;
                persist_state(&upstream).await;
                upstream.queue.compact().await;
                stuck_queues(&upstream);
            }
        }
    }
}

/// What lives in memory and must outlast the process: last-use times, pacing windows, usage
/// figures. Every [`PERSIST_EVERY`] and at shutdown.
async fn persist_state(upstream: &Services) {
    upstream.activity.persist(upstream.tokens.store()).await;
    upstream.queue.save_pacing(&upstream.pacers).await;
    upstream.queue.save_usage(&upstream.observer.usage).await;
}

/// `queue_stuck` for each account whose oldest queued message is older than
/// `alert_queue_age_secs`.
fn stuck_queues(upstream: &Services) {
    let alerts = &upstream.observer.alerts;
    let limit = alerts.thresholds().alert_queue_age_secs;
    // Every account with a queue: one removed from the config may still have mail held.
    for name in upstream.queue.account_names() {
        let q = upstream.queue.account_view(&name);
        let Some(oldest) = q.oldest_secs.filter(|age| *age >= limit) else {
            continue;
        };
        let detail = format!(
            "{} message(s) queued, the oldest for {}s{}",
            q.queued,
            oldest,
            q.paused
                .map(|p| format!("; paused: {p}"))
                .unwrap_or_default()
        );
        let cmd = |args: String| crate::hints::command(&args);
        let hint = format!(
            "see `{}` for each message's last reply, and `{}` for the grant; `{}` tries again now",
            cmd(format!("queue --account {name}")),
            cmd("accounts".into()),
            cmd(format!("queue retry --account {name}"))
        );
        alerts.raise(crate::observe::Event::QueueStuck, &name, &detail, &hint);
    }
}

//! Command line: `serve`, `check`, `hash-password`, `import-token`, `authorize`, `accounts`,
//! `revoke`, `test`. Argument parsing and printing only: every operation is the app's or the admin
//! room's.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{strip_one_newline, Config, RelayAddress};
use crate::control::wire::{Request, Response};
use crate::oauth::authorize;
use crate::util::logging::{self, LogFormat};
use crate::util::secret::Secret;

/// `--config` when neither the flag nor `XOAUTH_RELAY_CONFIG` says otherwise.
const DEFAULT_CONFIG: &str = "config/relay.toml";

#[derive(Parser)]
#[command(
    name = "xoauth-relay",
    version,
    about = "SMTP relay: password AUTH in, OAuth 2.0 (XOAUTH2) out"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "XOAUTH_RELAY_CONFIG",
        default_value = DEFAULT_CONFIG
    )]
    config: PathBuf,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "XOAUTH_RELAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve,
    /// Validate the configuration and exit.
    Check {
        /// Also print each account's delivery mode and effective limits.
        #[arg(long)]
        verbose: bool,
    },
    /// Print an argon2id hash for an account's password_hash (reads the password from stdin or a prompt).
    HashPassword,
    /// Store a refresh token (read from stdin) as the account's grant.
    ImportToken {
        /// Account name (`name` in [[accounts]]).
        account: String,
        /// Without a relay or a database: create a new database (a new install).
        #[arg(long)]
        init: bool,
    },
    /// Obtain a grant for an account through the provider's consent page or device code.
    Authorize {
        /// Account name (`name` in [[accounts]]).
        account: String,
        /// Print the URL instead of opening a browser.
        #[arg(long)]
        no_browser: bool,
        /// Paste-back: print the URL, then read the redirected URL (or the code) from stdin.
        #[arg(long, conflicts_with = "device")]
        manual: bool,
        /// Device code flow: print a code to enter on another device.
        #[arg(long)]
        device: bool,
        /// Without a relay or a database: create a new database (a new install).
        #[arg(long)]
        init: bool,
    },
    /// List accounts with their grant state.
    Accounts {
        /// One JSON array with an object per account, for scripts.
        #[arg(long)]
        json: bool,
        /// Rolling 24 h / 7 day usage: messages, recipients, bytes, failed logins, source addresses.
        #[arg(long)]
        usage: bool,
    },
    /// Delete an account's grant (and revoke it at the provider where possible).
    Revoke {
        /// Account name (`name` in [[accounts]]).
        account: String,
    },
    /// List queued messages; `queue show|retry|delete` act on them.
    Queue {
        #[command(subcommand)]
        action: Option<QueueAction>,
        /// Only this account's messages.
        #[arg(long)]
        account: Option<String>,
        /// One JSON array with an object per message, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the running relay is ready (`/readyz` on `[metrics] address`), else 1: for
    /// container health checks.
    Health,
    /// Make the running relay re-read its config file (what SIGHUP does); fails, and changes
    /// nothing, when the file is invalid or changes what needs a restart.
    Reload,
    /// Lift the failed-login lockout of an address (or, with --all, of every address).
    Unlock {
        /// The locked-out IP address (an IPv6 address stands for its /64).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        address: Option<String>,
        /// Every address that is locked out (and every failed-login count).
        #[arg(long)]
        all: bool,
    },
    /// Get a token and authenticate to the upstream; with --to, send a short test message.
    Test {
        /// Account name (`name` in [[accounts]]).
        account: String,
        /// Also send a short test message to this address.
        #[arg(long)]
        to: Option<String>,
        /// Without a relay or a database: create a new database (an account with client
        /// credentials or a service account on a new install).
        #[arg(long)]
        init: bool,
    },
    /// The shared store ([store] backend = "postgres").
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Copy a sled data dir (grants, statuses, queue) into the [store] database, once: grants
    /// sealed as they are, what the database already has kept.
    MigrateFromSled {
        /// The old data dir (default: the config's data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Envelope, each recipient's state and last reply, and the headers (never the body).
    Show { id: String },
    /// Attempt now: lifts a pause and the backoff (pacing still applies).
    Retry {
        /// A message id.
        #[arg(conflicts_with_all = ["all", "account"])]
        id: Option<String>,
        /// Every message of this account.
        #[arg(long, conflicts_with = "all")]
        account: Option<String>,
        /// Every queued message.
        #[arg(long)]
        all: bool,
    },
    /// Delete a message without a bounce (no confirmation; logged).
    Delete { id: String },
}

/// The program: parse arguments, run the command, print its result; the exit code says whether it
/// worked.
pub fn main() -> ExitCode {
    private_umask();
    let cli = Cli::parse();
    crate::hints::set_invocation(&cli.config, cli.config == Path::new(DEFAULT_CONFIG));
    logging::init(cli.log_format);
    let format = cli.log_format;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // A log collector reading JSON lines gets the reason as one more line.
                LogFormat::Json => tracing::error!("{e}"),
                LogFormat::Text => eprintln!("error: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Everything the relay creates (database, key, socket, certificates, spool) is private to its user,
/// whatever library creates it.
#[allow(unsafe_code)] // The one unsafe call: libc's umask has no safe wrapper in std.
fn private_umask() {
    // SAFETY: umask only swaps the process's file-mode mask; it touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

fn load(cli: &Cli) -> Result<Config, String> {
    Config::load(&cli.config).map_err(|e| e.to_string())
}

/// Reads a secret: from stdin when it is not a terminal (one trailing newline dropped), else from a
/// prompt without echo.
fn read_secret(prompt: &str) -> Result<String, String> {
    if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt)
            .map_err(|e| format!("cannot read from the terminal: {e}"))
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(strip_one_newline(s))
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match &cli.command {
        Command::Serve => {
            let config = load(&cli)?;
            let shutdown = shutdown_signal()?;
            let relay = crate::app::Relay::bind(config).await?;
            relay.run(shutdown).await;
            Ok(())
        }
        Command::Check { verbose } => {
            let config = load(&cli)?;
            if *verbose {
                for a in &config.accounts {
                    let api = a.provider.transport.is_api();
                    println!(
                        "account `{}`: provider {}, transport {} at {}{}, delivery {}, max_upstream_connections {}, limits: {}",
                        a.name,
                        a.provider.name,
                        a.provider.transport.as_str(),
                        a.endpoint(),
                        if api {
                            format!(", header_recipients {}", a.header_recipients.as_str())
                        } else {
                            String::new()
                        },
                        match a.delivery {
                            crate::config::DeliveryMode::Direct => "direct",
                            crate::config::DeliveryMode::Queue => "queue",
                        },
                        a.max_upstream_connections,
                        a.pacing.describe()
                    );
                }
            }
            let mut findings = crate::app::preflight::run(&config);
            let usable = findings.refusals.is_empty();
            if let Some(url) = config
                .store
                .url
                .as_ref()
                .filter(|_| config.store.shared() && usable)
            {
                // Unreachable is a warning: `serve` starts with the database down, not ready.
                match crate::store::postgres::probe(url).await {
                    Ok(state) if *verbose => println!("{state}"),
                    Ok(_) => {}
                    Err(e) => findings.warnings.push(format!(
                        "{e}; `serve` would start not ready and keep trying"
                    )),
                }
            }
            for warning in &findings.warnings {
                match cli.log_format {
                    LogFormat::Json => tracing::warn!("{warning}"),
                    LogFormat::Text => eprintln!("warning: {warning}"),
                }
            }
            if !findings.refusals.is_empty() {
                return Err(format!(
                    "{}\n{}: `serve` would refuse to start",
                    findings.refusals.join("\n"),
                    config.path.display()
                ));
            }
            println!(
                "{}: ok ({} listener(s), {} provider(s), {} account(s))",
                config.path.display(),
                config.listeners.len(),
                config.providers.len(),
                config.accounts.len()
            );
            Ok(())
        }
        Command::HashPassword => {
            let password = read_secret("Password: ")?;
            if password.is_empty() {
                return Err("empty password".into());
            }
            if std::io::stdin().is_terminal() && read_secret("Again: ")? != password {
                return Err("the two passwords differ; nothing printed".into());
            }
            println!("{}", crate::auth::hash_password(&password));
            Ok(())
        }
        Command::ImportToken { account, init } => {
            let config = load(&cli)?;
            config.account(account).map_err(|e| e.to_string())?;
            crate::app::grant_store_preflight(&config, *init).await?;
            let token = read_secret("Refresh token: ")?;
            if token.trim().is_empty() {
                return Err(format!(
                    "no refresh token on stdin; pipe it in, like `{}`",
                    crate::hints::command(&format!("import-token {account} < token.txt"))
                ));
            }
            let request = Request::StoreGrant {
                account: account.clone(),
                refresh_token: Some(Secret::new(token.trim())),
                access_token: None,
                expires_in: None,
                refresh_expires_in: None,
                scope: None,
            };
            finish(crate::app::admin_with(config, request, *init).await?)
        }
        Command::Accounts { json, usage } => finish(
            admin(
                &cli,
                Request::Accounts {
                    json: *json,
                    usage: *usage,
                },
            )
            .await?,
        ),
        Command::Reload => reload(&cli).await,
        Command::Unlock { address, .. } => finish(
            admin(
                &cli,
                Request::Unlock {
                    address: address.clone(),
                },
            )
            .await?,
        ),
        Command::Health => health(&cli).await,
        Command::Store {
            action: StoreAction::MigrateFromSled { data_dir },
        } => {
            let text = crate::app::migrate_from_sled(load(&cli)?, data_dir.clone()).await?;
            println!("{text}");
            Ok(())
        }
        Command::Queue {
            action,
            account,
            json,
        } => {
            let request = match action {
                None => Request::Queue {
                    account: account.clone(),
                    json: *json,
                },
                Some(QueueAction::Show { id }) => Request::QueueShow { id: id.clone() },
                Some(QueueAction::Retry { id, account, all })
                    if id.is_none() && account.is_none() && !all =>
                {
                    return Err(format!(
                        "say what to retry: `{}` (one message), `{}` or `{}`",
                        crate::hints::command("queue retry ID"),
                        crate::hints::command("queue retry --all"),
                        crate::hints::command("queue retry --account NAME")
                    ));
                }
                Some(QueueAction::Retry { id, account, all }) => Request::QueueRetry {
                    id: id.clone(),
                    account: account.clone(),
                    all: *all,
                },
                Some(QueueAction::Delete { id }) => Request::QueueDelete { id: id.clone() },
            };
            finish(admin(&cli, request).await?)
        }
        Command::Revoke { account } => finish(
            admin(
                &cli,
                Request::Revoke {
                    account: account.clone(),
                },
            )
            .await?,
        ),
        Command::Test { account, to, init } => {
            let request = Request::Test {
                account: account.clone(),
                to: to.clone(),
            };
            let response = admin_init(&cli, request, *init).await?;
            // Every step is worth seeing, the failed one included.
            print!("{}", response.text);
            if response.ok {
                Ok(())
            } else {
                Err(format!("test of account `{account}` failed"))
            }
        }
        Command::Authorize {
            account,
            no_browser,
            manual,
            device,
            init,
        } => {
            let config = load(&cli)?;
            let mode = if *device {
                authorize::Mode::Device
            } else if *manual {
                authorize::Mode::Manual
            } else {
                authorize::Mode::Loopback {
                    open_browser: !no_browser,
                }
            };
            crate::app::grant_store_preflight(&config, *init).await?;
            let set = authorize::run(&config, account, mode).await?;
            let request = Request::StoreGrant {
                account: account.clone(),
                refresh_token: set.refresh_token,
                access_token: Some(set.access_token),
                expires_in: set.expires_in.map(|d| d.as_secs()),
                refresh_expires_in: set.refresh_expires_in.map(|d| d.as_secs()),
                scope: set.scope,
            };
            finish(crate::app::admin_with(config, request, *init).await?)
        }
    }
}

/// An admin request goes to the running relay for this file when one answers (its own config
/// applies, whatever state the file is in now), else runs against the store with the file loaded
/// here.
async fn admin(cli: &Cli, request: Request) -> Result<Response, String> {
    admin_init(cli, request, false).await
}

/// [`admin`]; `init`: without a relay, a new store may be created (`--init`).
async fn admin_init(cli: &Cli, request: Request, init: bool) -> Result<Response, String> {
    let relay = RelayAddress::read(&cli.config).map_err(|e| e.to_string())?;
    if let Some(response) = crate::control::client::call(&relay.control_socket, &request).await? {
        return Ok(response);
    }
    crate::app::admin_with(load(cli)?, request, init).await
}

/// `reload`: only a running relay can, and only the file it reads.
async fn reload(cli: &Cli) -> Result<(), String> {
    let relay = RelayAddress::read(&cli.config).map_err(|e| e.to_string())?;
    let config = std::path::absolute(&cli.config).unwrap_or_else(|_| cli.config.clone());
    let request = Request::Reload {
        config: Some(config),
    };
    if let Some(response) = crate::control::client::call(&relay.control_socket, &request).await? {
        return finish(response);
    }
    // No relay: say what is wrong with the file first, if anything.
    load(cli).map_err(|e| format!("{e}\nnothing reloaded"))?;
    Err(format!(
        "no relay answers on {}; nothing reloaded. If a relay runs with another data_dir or \
         control_socket than this file now names, that change needs a restart (systemctl \
         restart xoauth-relay)",
        relay.control_socket.display()
    ))
}

/// `health`: asks the running relay (`/readyz` on `[metrics] address`, else its control socket),
/// reading nothing else from the file: a half-edited config must not mark a healthy relay
/// unhealthy.
async fn health(cli: &Cli) -> Result<(), String> {
    let relay = RelayAddress::read(&cli.config).map_err(|e| e.to_string())?;
    let Some(mut addr) = relay.metrics else {
        return match crate::control::client::call(&relay.control_socket, &Request::Health).await? {
            Some(response) => finish(response),
            None => Err(format!(
                "no relay answers on {}: is it running with this config?",
                relay.control_socket.display()
            )),
        };
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .map_err(|e| {
            let why = if e.is_connect() {
                "nothing answers there: is the relay running with this config?".to_string()
            } else if e.is_timeout() {
                "no answer within 5 s".to_string()
            } else {
                e.to_string()
            };
            format!("http://{addr}/readyz: {why}")
        })?;
    let ok = response.status().is_success();
    let body = response.text().await.unwrap_or_default();
    if ok {
        print!("{body}");
        Ok(())
    } else {
        Err(body.trim_end().to_string())
    }
}

fn finish(response: Response) -> Result<(), String> {
    if response.ok {
        print!("{}", response.text);
        if !response.text.ends_with('\n') {
            println!();
        }
        Ok(())
    } else {
        Err(response.text.trim_end().to_string())
    }
}

/// SIGTERM or SIGINT. The handlers are installed here, before the relay binds and reports ready,
/// so a stop request right after start-up is a graceful shutdown, not the default kill.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let handler = |kind| signal(kind).map_err(|e| format!("cannot install a signal handler: {e}"));
    let mut term = handler(SignalKind::terminate())?;
    let mut int = handler(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

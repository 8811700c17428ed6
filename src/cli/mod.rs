//! Command line: `serve`, `check`, `hash-password`, `import-token`, `authorize`, `accounts`,
//! `revoke`, `test`. Argument parsing and printing only: every operation is the app's or the admin
//! room's.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{strip_one_newline, Config};
use crate::control::wire::{Request, Response};
use crate::oauth::authorize;
use crate::util::logging::{self, LogFormat};
use crate::util::secret::Secret;

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
        default_value = "config/relay.toml"
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
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Envelope, each recipient's state and last reply, and the headers (never the body).
    Show { id: String },
    /// Attempt now: lifts a pause and the backoff (pacing still applies).
    Retry {
        /// A message id.
        #[arg(required_unless_present_any = ["all", "account"], conflicts_with_all = ["all", "account"])]
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
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
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
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
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
        Command::ImportToken { account } => {
            let config = load(&cli)?;
            config.account(account).map_err(|e| e.to_string())?;
            crate::app::grant_store_preflight(&config).await?;
            let token = read_secret("Refresh token: ")?;
            if token.trim().is_empty() {
                return Err(format!(
                    "no refresh token on stdin; pipe it in, like `xoauth-relay import-token {account} < token.txt`"
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
            finish(crate::app::admin(config, request).await?)
        }
        Command::Accounts { json, usage } => finish(
            crate::app::admin(
                load(&cli)?,
                Request::Accounts {
                    json: *json,
                    usage: *usage,
                },
            )
            .await?,
        ),
        Command::Reload => reload(&cli).await,
        Command::Unlock { address, .. } => finish(
            crate::app::admin(
                load(&cli)?,
                Request::Unlock {
                    address: address.clone(),
                },
            )
            .await?,
        ),
        Command::Health => health(&load(&cli)?).await,
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
                Some(QueueAction::Retry { id, account, all }) => Request::QueueRetry {
                    id: id.clone(),
                    account: account.clone(),
                    all: *all,
                },
                Some(QueueAction::Delete { id }) => Request::QueueDelete { id: id.clone() },
            };
            finish(crate::app::admin(load(&cli)?, request).await?)
        }
        Command::Revoke { account } => finish(
            crate::app::admin(
                load(&cli)?,
                Request::Revoke {
                    account: account.clone(),
                },
            )
            .await?,
        ),
        Command::Test { account, to } => {
            let request = Request::Test {
                account: account.clone(),
                to: to.clone(),
            };
            let response = crate::app::admin(load(&cli)?, request).await?;
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
            crate::app::grant_store_preflight(&config).await?;
            let set = authorize::run(&config, account, mode).await?;
            let request = Request::StoreGrant {
                account: account.clone(),
                refresh_token: set.refresh_token,
                access_token: Some(set.access_token),
                expires_in: set.expires_in.map(|d| d.as_secs()),
                refresh_expires_in: set.refresh_expires_in.map(|d| d.as_secs()),
                scope: set.scope,
            };
            finish(crate::app::admin(config, request).await?)
        }
    }
}

/// `reload`: only a running relay can; the file is refused here already when it does not load
/// (the relay then keeps what it runs).
async fn reload(cli: &Cli) -> Result<(), String> {
    let config = load(cli)
        .map_err(|e| format!("{e}\nnothing reloaded: the running relay keeps its config"))?;
    let socket = config.server.control_socket();
    match crate::control::client::call(&socket, &Request::Reload).await? {
        Some(response) => finish(response),
        None => Err(format!(
            "no relay answers on {}; nothing reloaded. If a relay runs with another data_dir or \
             control_socket than this file now names, that change needs a restart (systemctl \
             restart xoauth-relay)",
            socket.display()
        )),
    }
}

/// `GET /readyz` on the configured metrics address.
async fn health(config: &crate::config::Config) -> Result<(), String> {
    let Some(mut addr) = config.metrics.address else {
        return Err("set [metrics] address in the config to serve /readyz".into());
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

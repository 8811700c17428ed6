//! The relay under test: its config written for the fake provider, started in this runtime.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::*;

pub struct RelayOptions {
    pub mechanism: &'static str,
    pub allowed_senders: Option<Vec<String>>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
    pub smtp_port_override: Option<u16>,
    pub token_url_override: Option<String>,
    pub require_tls_for_auth: bool,
    pub extra_provider_toml: String,
    pub extra_accounts_toml: String,
    /// More `[limits]` keys, one per line.
    pub extra_limits_toml: String,
    /// More `[server]` keys, one per line.
    pub extra_server_toml: String,
    /// More tables, at the end of the file (`[store]`, say).
    pub extra_toml: String,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            mechanism: "xoauth2",
            allowed_senders: None,
            max_message_bytes: 36_700_160,
            max_connections: 1000,
            idle_timeout_secs: 300,
            smtp_port_override: None,
            token_url_override: None,
            require_tls_for_auth: true,
            extra_provider_toml: String::new(),
            extra_accounts_toml: String::new(),
            extra_limits_toml: String::new(),
            extra_server_toml: String::new(),
            extra_toml: String::new(),
        }
    }
}

pub const LOGIN: &str = "newsletter";
pub const PASSWORD: &str = "mailer-pw-SECRET";

pub struct Relay {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub starttls: SocketAddr,
    pub implicit: SocketAddr,
    pub plain: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, when `[metrics] address` is set.
    pub metrics: Option<SocketAddr>,
    pub probe: xoauth_relay::app::Probe,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Writes a config for a relay with a `starttls` and an `implicit` listener in front of
/// `provider`, into `dir`.
pub fn write_config(
    dir: &Path,
    provider: &FakeProvider,
    opts: &RelayOptions,
    password_hash: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("certs/upstream-ca.pem"), &provider.pki.ca_pem).unwrap();
    std::fs::write(dir.join("certs/relay.crt"), &provider.pki.cert_pem).unwrap();
    std::fs::write(dir.join("certs/relay.key"), &provider.pki.key_pem).unwrap();
    let allowed = opts
        .allowed_senders
        .as_ref()
        .map(|v| format!("allowed_senders = {v:?}\n"))
        .unwrap_or_default();
    let token_url = opts
        .token_url_override
        .clone()
        .unwrap_or_else(|| format!("{}/token", provider.base_url()));
    let config = format!(
        r#"
[server]
hostname = "relay.test"
data_dir = "{dir}/data"
require_tls_for_auth = {require_tls}
allow_plaintext_loopback = false
{extra_server}

[[listeners]]
address = "127.0.0.1:0"
tls = "starttls"

[[listeners]]
address = "127.0.0.1:0"
tls = "implicit"

[tls]
certificate = "{dir}/certs/relay.crt"
private_key = "{dir}/certs/relay.key"

[limits]
max_message_bytes = {max}
max_recipients = 5
max_connections = {maxconn}
idle_timeout_secs = {idle}
upstream_timeout_secs = 10
{extra_limits}

[providers.fake]
token_url = "{token_url}"
{authorize_url}
revocation_url = "{base}/revoke"
scopes = ["https://mail.google.com/"]
client_id = "test-client"
client_secret = "test-client-SECRET"
smtp_host = "localhost"
smtp_port = {smtp_port}
smtp_tls = "{smtp_tls}"
smtp_ca_file = "{dir}/certs/upstream-ca.pem"
mechanism = "{mech}"
{extra_provider}

[[accounts]]
name = "news"
login = "{login}"
password_hash = "{hash}"
provider = "fake"
mailbox = "news@example.com"
{allowed}
{extra_accounts}

{extra}
"#,
        dir = dir.display(),
        require_tls = opts.require_tls_for_auth,
        max = opts.max_message_bytes,
        maxconn = opts.max_connections,
        idle = opts.idle_timeout_secs,
        base = provider.base_url(),
        smtp_port = opts.smtp_port_override.unwrap_or(provider.smtp_addr.port()),
        smtp_tls = provider.smtp_mode,
        mech = opts.mechanism,
        extra_provider = opts.extra_provider_toml,
        // A consent page, so that hints name `authorize` (tests of the flows set their own).
        authorize_url = if opts.extra_provider_toml.contains("authorize_url") {
            String::new()
        } else {
            format!("authorize_url = \"{}/authorize\"", provider.base_url())
        },
        login = LOGIN,
        hash = password_hash,
        extra_accounts = opts.extra_accounts_toml,
        extra_limits = opts.extra_limits_toml,
        extra_server = opts.extra_server_toml,
        extra = opts.extra_toml,
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, config).unwrap();
    path
}

pub static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn password_hash() -> String {
    HASH.get_or_init(|| xoauth_relay::auth::hash_password(PASSWORD))
        .clone()
}

impl Relay {
    /// Starts a relay in this runtime with a grant for `news` already imported.
    pub async fn start(dir: &Path, provider: &FakeProvider, opts: RelayOptions) -> Relay {
        let config_path = write_config(dir, provider, &opts, &password_hash());
        Relay::start_from(dir, config_path).await
    }

    pub async fn start_from(dir: &Path, config_path: PathBuf) -> Relay {
        let disk = std::sync::Arc::new(xoauth_relay::delivery::queue::disk::Os);
        Relay::start_from_on(dir, config_path, disk).await
    }

    /// A relay whose spool is on `disk` (one that fails on request, say).
    pub async fn start_from_on(
        dir: &Path,
        config_path: PathBuf,
        disk: std::sync::Arc<dyn xoauth_relay::delivery::queue::disk::Disk>,
    ) -> Relay {
        let config = xoauth_relay::config::Config::load(&config_path).unwrap();
        let server = xoauth_relay::app::Relay::bind_on(config, disk)
            .await
            .unwrap();
        let addrs = server.local_addrs();
        let metrics = server.metrics_addr();
        let probe = server.probe();
        let find = |mode| addrs.iter().find(|(_, m)| *m == mode).unwrap().0;
        use xoauth_relay::config::TlsMode;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Relay {
            dir: dir.to_path_buf(),
            config_path,
            starttls: find(TlsMode::Starttls),
            implicit: find(TlsMode::Implicit),
            // Clear text on the STARTTLS port, before STARTTLS.
            plain: find(TlsMode::Starttls),
            metrics,
            probe,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A handle to the same relay for another task (it cannot stop the relay).
    pub fn view(&self) -> Relay {
        Relay {
            dir: self.dir.clone(),
            config_path: self.config_path.clone(),
            starttls: self.starttls,
            implicit: self.implicit,
            plain: self.plain,
            metrics: self.metrics,
            probe: self.probe.clone(),
            shutdown: None,
            handle: None,
        }
    }

    /// Stores `refresh_token` as the grant of `account` through the running relay's control socket.
    pub async fn import(&self, account: &str, refresh_token: &str) {
        let config = xoauth_relay::config::Config::load(&self.config_path).unwrap();
        let response = xoauth_relay::app::admin(
            config,
            xoauth_relay::control::wire::Request::StoreGrant {
                account: account.into(),
                refresh_token: Some(xoauth_relay::util::secret::Secret::new(refresh_token)),
                access_token: None,
                expires_in: None,
                refresh_expires_in: None,
                scope: None,
            },
        )
        .await
        .unwrap();
        assert!(response.ok, "{}", response.text);
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }
}

/// `serve` as its own process (so that a test can kill it); the address of its listener with
/// `tls` ("starttls" or "implicit") once it listens.
pub async fn serve_process(config: &Path, tls: &str) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xoauth-relay"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("serve exited early");
        if line.contains("listening") && line.contains(tls) {
            if let Some(p) = line
                .split(|c: char| c.is_whitespace())
                .find_map(|w| w.strip_prefix("addr=127.0.0.1:"))
                .and_then(|p| p.parse::<u16>().ok())
            {
                break p;
            }
        }
    };
    // Keep reading its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, ([127, 0, 0, 1], port).into())
}

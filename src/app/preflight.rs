//! What `serve` checks before it binds a port, in one list that `check` runs too: `check` passing
//! means `serve` starts, short of a port another program holds. Nothing here binds, creates or
//! writes anything that stays (a writable directory is proven by a temporary file, removed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ListenerConfig};

/// Refusals stop `serve`; warnings are printed by `check` and logged by `serve`.
#[derive(Debug, Default)]
pub struct Findings {
    pub refusals: Vec<String>,
    pub warnings: Vec<String>,
}

/// Every check `serve` makes before it binds.
pub fn run(config: &Config) -> Findings {
    let mut f = Findings {
        refusals: Vec::new(),
        warnings: config.warnings(),
    };
    let published = config.example_password_accounts();
    if let (Some(name), Some(addr)) = (published.first(), config.public_listeners().first()) {
        f.refusals.push(format!(
            "account `{name}` still has the example config's published password, and listener {addr} is \
             reachable from other machines; set its password_hash (`xoauth-relay hash-password`) or listen on \
             loopback only"
        ));
    }
    if let Err(e) = file_limit(config.limits.max_connections) {
        f.refusals.push(e);
    }
    let server = &config.server;
    f.refusals
        .extend(writable_dir("[server] data_dir", &server.data_dir).err());
    let key = config.key_file();
    let key_check = if key.exists() {
        crate::store::seal::verify_key_file(&key).map_err(|e| e.to_string())
    } else {
        writable_dir("[server] key_file (its directory)", parent(&key))
    };
    f.refusals.extend(key_check.err());
    // The default socket lives in data_dir, checked above.
    if server.control_socket.is_some() {
        let socket = server.control_socket();
        f.refusals
            .extend(writable_dir("[server] control_socket (its directory)", parent(&socket)).err());
    }
    // A connection string serve could not use (the database being down is only a warning, from
    // `check`'s probe: serve starts not ready and keeps trying).
    if let Some(url) = config.store.url.as_ref().filter(|_| config.store.shared()) {
        if let Err(e) = crate::store::postgres::connect::Target::parse(url.expose()) {
            f.refusals.push(e.0);
        }
    }
    f.refusals.extend(listener_tls_usable(config).err());
    f.refusals.extend(client_tls(config).err());
    if !may_bind_privileged() {
        let addresses = config
            .listeners
            .iter()
            .map(|l| l.address)
            .chain(config.metrics.address);
        f.warnings.extend(privileged_ports(
            addresses,
            unprivileged_port_start(),
            &user(),
        ));
    }
    f
}

/// The addresses below `start` (the first port anyone may bind), for a user without the
/// privilege to bind them.
fn privileged_ports(
    addresses: impl Iterator<Item = std::net::SocketAddr>,
    start: u16,
    user: &str,
) -> Vec<String> {
    addresses
        .filter(|a| a.port() != 0 && a.port() < start)
        .map(|a| {
            format!(
                "{a}: ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit grants it); \
                 {user} has neither, so a `serve` run like this `check` could not bind it"
            )
        })
        .collect()
}

/// The listeners' certificate and key load, or (neither there yet) `serve` may create a
/// self-signed pair where they are named.
fn listener_tls_usable(config: &Config) -> Result<(), String> {
    let tls = &config.tls;
    let uses_tls = ListenerConfig::any_tls(&config.listeners);
    if uses_tls && !tls.certificate.exists() && !tls.private_key.exists() {
        writable_dir(
            "[tls] certificate (its directory)",
            parent(&tls.certificate),
        )?;
        return writable_dir(
            "[tls] private_key (its directory)",
            parent(&tls.private_key),
        );
    }
    server_tls(config).map(drop)
}

/// The listeners' certificate and key, when a listener uses TLS (a self-signed pair is made
/// where neither exists).
pub fn server_tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    if !ListenerConfig::any_tls(&config.listeners) {
        return Ok(None);
    }
    let cfg = crate::util::tls::server_config(
        &config.tls.certificate,
        &config.tls.private_key,
        &config.server.hostname,
    )
    .map_err(|e| e.to_string())?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(cfg)))
}

/// The provider-side TLS configuration: the public roots plus each provider's `smtp_ca_file`.
pub fn client_tls(config: &Config) -> Result<HashMap<String, Arc<rustls::ClientConfig>>, String> {
    let public = crate::util::tls::client_config(None).map_err(|e| e.to_string())?;
    let mut tls = HashMap::new();
    for (name, provider) in &config.providers {
        let cfg = match &provider.smtp.ca_file {
            Some(ca) => crate::util::tls::client_config(Some(ca))
                .map_err(|e| format!("provider `{name}`: smtp_ca_file: {e}"))?,
            None => public.clone(),
        };
        tls.insert(name.clone(), cfg);
    }
    Ok(tls)
}

/// Each mailer session holds two descriptors (its socket and its upstream connection's), plus the
/// listeners, the store and the control socket; `serve` raises its soft limit to the hard one.
pub fn file_limit(max_connections: usize) -> Result<u64, String> {
    let need = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    let (_, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(|e| format!("cannot read the open-files limit: {e}"))?;
    if hard < need {
        return Err(format!(
            "[limits] max_connections = {max_connections} needs about {need} open files (two per mailer \
             session), but this process may open only {hard}; raise the limit (systemd LimitNOFILE=, \
             `ulimit -n`) or lower max_connections"
        ));
    }
    Ok(need)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `dir` exists and this user may create files in it, or the nearest existing directory above it
/// lets this user create it.
pub fn writable_dir(key: &str, dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    if !probe.is_dir() {
        return Err(format!(
            "{key} {}: {} is not a directory; point {key} at a directory",
            absolute(dir).display(),
            absolute(probe).display()
        ));
    }
    let what = if probe == dir { "write in" } else { "create" };
    tempfile::Builder::new()
        .prefix(".xoauth-relay-check")
        .tempfile_in(probe)
        .map(drop)
        // The kind only: the error's own text names the probe file, which the operator never set.
        .map_err(|e| cannot(key, dir, what, &std::io::Error::from(e.kind())))
}

/// "[server] data_dir /abs/path: cannot create it as user relay (uid 999): Permission denied".
pub fn cannot(key: &str, path: &Path, what: &str, e: &std::io::Error) -> String {
    format!(
        "{key} {}: cannot {what} it as {} ({e}); fix the permissions or change {key}",
        absolute(path).display(),
        user()
    )
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The user this process runs as, by name where `/etc/passwd` has it.
pub fn user() -> String {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "this user".into();
    };
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Root, or the effective capability CAP_NET_BIND_SERVICE (bit 10 of CapEff).
fn may_bind_privileged() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << 10) != 0)
}

/// Linux lets a machine lower the privileged range (`net.ipv4.ip_unprivileged_port_start`).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_privileged_port_is_named_with_the_capability_it_needs() {
        let addrs = ["127.0.0.1:587", "127.0.0.1:2587", "0.0.0.0:0"]
            .map(|a| a.parse::<std::net::SocketAddr>().unwrap());
        let warned = privileged_ports(addrs.into_iter(), 1024, "user nobody (uid 65534)");
        assert_eq!(
            warned,
            ["127.0.0.1:587: ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit \
              grants it); user nobody (uid 65534) has neither, so a `serve` run like this `check` \
              could not bind it"]
        );
        // A machine that lowered the privileged range.
        assert!(privileged_ports(addrs.into_iter(), 0, "root").is_empty());
    }
}

//! Paths: relative ones in the file are taken from the file's own directory, the old place (the
//! working directory) is noticed, and the running relay for a file is found without the rest of
//! the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::{Config, ConfigError, ListenerConfig, ServerConfig};

/// Where the running relay for a config file answers: read from the file leniently, one line at
/// a time, so that a half-edited file (an error anywhere else in it) still finds the relay that
/// runs on the last good version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddress {
    pub control_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
}

impl RelayAddress {
    pub fn read(path: &Path) -> Result<RelayAddress, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let (mut data_dir, mut socket, mut metrics) = (PathBuf::from("data"), None, None);
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(header) = line.strip_prefix('[') {
                section = header.trim_end_matches(']').trim().to_string();
                continue;
            }
            let Ok(table) = toml::from_str::<toml::Table>(line) else {
                continue;
            };
            let value = |key| table.get(key).and_then(|v| v.as_str()).map(str::to_string);
            match section.as_str() {
                "server" => {
                    data_dir = value("data_dir").map(PathBuf::from).unwrap_or(data_dir);
                    socket = value("control_socket").map(PathBuf::from).or(socket);
                }
                "metrics" => metrics = value("address").and_then(|a| a.parse().ok()).or(metrics),
                _ => {}
            }
        }
        // The same anchoring as the full load: relative to the file's directory.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new(""));
        let server = ServerConfig {
            data_dir: base.join(data_dir),
            control_socket: socket.map(|s| base.join(s)),
            ..ServerConfig::default()
        };
        Ok(RelayAddress {
            control_socket: server.control_socket(),
            metrics,
        })
    }
}

/// A path the file gave relative, taken from the file's directory instead of the working one.
#[derive(Debug, Clone)]
pub struct Anchored {
    /// Where it is set, like `[server] data_dir`.
    pub key: String,
    pub written: PathBuf,
    pub anchored: PathBuf,
}

/// Relative paths in the file are taken from the file's own directory (as Prometheus does for its
/// rule files), so every command reaches the database, key and certificates `serve` uses, wherever
/// it is run from. Returns each path so anchored, as written, for [`Config::moved_paths`].
pub(super) fn anchor(raw: &mut RawConfig, base: &Path) -> Vec<Anchored> {
    let mut out = Vec::new();
    let mut anchor = |key: String, p: &mut PathBuf| {
        if p.is_relative() {
            let written = std::mem::replace(p, lexical(&base.join(&*p)));
            out.push(Anchored {
                key,
                written,
                anchored: p.clone(),
            });
        }
    };
    let server = &mut raw.server;
    anchor("[server] data_dir".into(), &mut server.data_dir);
    for (key, p) in [
        ("key_file", &mut server.key_file),
        ("control_socket", &mut server.control_socket),
        (
            "upstream_proxy_password_file",
            &mut server.upstream_proxy_password_file,
        ),
    ] {
        if let Some(p) = p {
            anchor(format!("[server] {key}"), p);
        }
    }
    if let Some(file) = &mut raw.store.url_file {
        anchor("[store] url_file".into(), file);
    }
    // The defaults count only where a listener uses them.
    if ListenerConfig::any_tls(&raw.listeners) {
        anchor("[tls] certificate".into(), &mut raw.tls.certificate);
        anchor("[tls] private_key".into(), &mut raw.tls.private_key);
    }
    // A bare program name is looked up in PATH; a path to a script is a path.
    if let Some(command) = &mut raw.alerts.command {
        if command.components().count() > 1 {
            anchor("[alerts] command".into(), command);
        }
    }
    for (name, p) in &mut raw.providers {
        for (key, file) in [
            ("client_secret_file", &mut p.client_secret_file),
            ("smtp_ca_file", &mut p.smtp_ca_file),
            ("http_ca_file", &mut p.http_ca_file),
            ("service_account_key_file", &mut p.service_account_key_file),
            ("client_certificate_file", &mut p.client_certificate_file),
            ("client_private_key_file", &mut p.client_private_key_file),
        ] {
            if let Some(file) = file {
                anchor(format!("[providers.{name}] {key}"), file);
            }
        }
    }
    out
}

impl Config {
    /// Relative paths used to be taken from the working directory: where that old place holds a
    /// file or directory and the new one does not (an upgrade, or a command run elsewhere), starting
    /// would open an empty database or a new key. Refused, naming both.
    pub fn moved_paths(&self) -> Result<(), ConfigError> {
        let Ok(cwd) = std::env::current_dir() else {
            return Ok(());
        };
        let moved: Vec<String> = self
            .anchored
            .iter()
            .filter(|a| cwd.join(&a.written).exists() && !a.anchored.exists())
            .map(|a| {
                format!(
                    "{}: {} exists but {} does not. Relative paths are now taken from the config \
                     file's directory, not the working directory: move it there, or write the \
                     absolute path {} in {}",
                    a.key,
                    cwd.join(&a.written).display(),
                    std::path::absolute(&a.anchored)
                        .unwrap_or_else(|_| a.anchored.clone())
                        .display(),
                    cwd.join(&a.written).display(),
                    self.path.display()
                )
            })
            .collect();
        if moved.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(moved.join("\n")))
        }
    }
}

/// `a/b/../c` as `a/c`: the path as written, without the detour (what an operator reads in
/// messages). Lexical, like `filepath.Clean`: a `..` after a symlink is taken literally, which is
/// what the config file's author wrote.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let popped = matches!(out.components().next_back(), Some(Component::Normal(_)));
                if popped {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_paths_read_as_written_without_detours() {
        for (path, clean) in [
            ("/etc/relay/../data", "/etc/data"),
            ("/etc/relay/./keys/master.key", "/etc/relay/keys/master.key"),
            ("config/../data", "data"),
            ("../data", "../data"),
            ("/../data", "/data"),
        ] {
            assert_eq!(lexical(Path::new(path)), Path::new(clean), "{path}");
        }
    }
}

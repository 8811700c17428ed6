//! From a libpq connection string to a pool: the `sslmode` rules of the issue, on rustls.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and never verifies a certificate
//! itself: the TLS connector does. So the mode is taken out of the URL here and turned into a
//! rustls configuration: `verify-full` checks the chain (webpki roots, or `sslrootcert`) and the
//! host name; `require` encrypts without checking, as libpq's `require` does.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How long connecting (and a pool's wait for a connection) may take before the database counts
/// as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Require,
    VerifyFull,
}

/// A parsed connection string: what to connect to and how, and a password-free name for logs.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub mode: TlsMode,
    /// `user@host:port/db`, never the password: for log lines and errors.
    pub shown: String,
}

fn bad(msg: String) -> StoreError {
    StoreError(msg)
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, StoreError> {
        let mut parsed = url::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "postgres" | "postgresql"))
            .ok_or_else(|| {
                bad(
                    "[store] the connection string is not a postgres:// URL; write it as \
                     postgres://USER@HOST:5432/DATABASE?sslmode=verify-full"
                        .into(),
                )
            })?;
        let mut mode = None;
        let mut root = None;
        let kept: Vec<(String, String)> = parsed
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "sslmode" => {
                    mode = Some(v.to_string());
                    None
                }
                "sslrootcert" => {
                    root = Some(v.to_string());
                    None
                }
                _ => Some((k.to_string(), v.to_string())),
            })
            .collect();
        parsed.set_query(None);
        if !kept.is_empty() {
            parsed.query_pairs_mut().extend_pairs(kept);
        }
        let mut config = tokio_postgres::Config::from_str(parsed.as_str())
            .map_err(|e| bad(format!("[store] the connection string is not valid: {e}")))?;
        let local = config.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => crate::util::is_loopback_host(name),
        });
        let mode = match mode.as_deref() {
            None if local => TlsMode::Disable,
            None | Some("verify-full") => TlsMode::VerifyFull,
            Some("require") => TlsMode::Require,
            Some("disable") => TlsMode::Disable,
            Some(other) => {
                return Err(bad(format!(
                    "[store] sslmode={other} is not supported: use verify-full (the default), require \
                     (encrypted, certificate not checked) or disable (loopback or a Unix socket only makes \
                     sense)"
                )))
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        match &root {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad(format!(
                        "[store] sslrootcert={path}: {e}; check the path and that the relay's user can read it"
                    ))
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| bad(format!("[store] sslrootcert={path}: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad(format!("[store] sslrootcert={path}: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?;
        let tls = match mode {
            TlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth(),
            _ => builder.with_root_certificates(roots).with_no_client_auth(),
        };
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            _ => SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        // No statement, lock wait or open transaction may hang a relay (or hold a row another
        // relay waits for) when a peer or the network stalls; the operator's own `options` win.
        let ours = "-c statement_timeout=15s -c lock_timeout=10s -c idle_in_transaction_session_timeout=30s";
        let theirs = config.get_options().map(str::to_string);
        config.options(&match theirs {
            Some(t) => format!("{ours} {t}"),
            None => ours.to_string(),
        });
        // A peer gone without a FIN is noticed in about a minute, not the kernel's hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(Duration::from_secs(60));
        config.application_name("xoauth-relay");
        let shown = shown(&config);
        Ok(Target {
            config,
            tls: MakeRustlsConnect::new(tls),
            mode,
            shown,
        })
    }

    pub fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool, StoreError> {
        let manager = deadpool_postgres::Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| bad(format!("database pool: {e}")))
    }
}

fn shown(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

/// `sslmode=require`: encrypted, with any certificate (libpq's meaning). The handshake's signatures
/// are still checked, so the session is with whoever holds the presented key.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_defaults_to_verify_full_except_on_loopback() {
        let mode = |url: &str| Target::parse(url).map(|t| t.mode);
        assert_eq!(
            mode("postgres://u@db.example.com/relay").unwrap(),
            TlsMode::VerifyFull
        );
        assert_eq!(
            mode("postgres://u@127.0.0.1:5433/relay").unwrap(),
            TlsMode::Disable
        );
        assert_eq!(
            mode("postgres://u@localhost/relay").unwrap(),
            TlsMode::Disable
        );
        assert_eq!(
            mode("postgresql://u@db/relay?sslmode=require").unwrap(),
            TlsMode::Require
        );
        assert_eq!(
            mode("postgres://u@localhost/relay?sslmode=verify-full").unwrap(),
            TlsMode::VerifyFull
        );
        let e = mode("postgres://u@db/relay?sslmode=prefer").unwrap_err();
        assert!(e.0.contains("sslmode=prefer is not supported"), "{e}");
        assert!(mode("host=db user=u").is_err());
        let t = Target::parse("postgres://relay:s3cret@db.example.com:6432/mail?connect_timeout=3")
            .unwrap();
        assert_eq!(t.shown, "relay@db.example.com:6432/mail");
        assert!(!t.shown.contains("s3cret"));
    }
}

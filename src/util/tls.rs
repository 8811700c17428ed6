//! TLS material: the listener's certificate (generated self-signed when missing, so a first start
//! works) and client configurations for the upstream SMTP servers and token endpoints.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read certificate {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "certificate {} is not valid PEM: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read private key {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| {
            TlsError(format!(
                "private key {} is not valid PEM: {e}",
                path.display()
            ))
        })?
        .ok_or_else(|| TlsError(format!("{} holds no PEM private key", path.display())))
}

/// Writes a self-signed certificate for `hostname`, `localhost` and 127.0.0.1 (key file 0600).
pub fn generate_self_signed(
    certificate: &Path,
    private_key: &Path,
    hostname: &str,
) -> Result<(), TlsError> {
    let names = vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let generate = || {
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok::<_, rcgen::Error>((cert, key))
    };
    let (cert, key) =
        generate().map_err(|e| TlsError(format!("cannot generate a certificate: {e}")))?;
    for path in [certificate, private_key] {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| TlsError(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    let write = |path: &Path, pem: String, mode: u32| -> Result<(), TlsError> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .map_err(|e| TlsError(format!("cannot write {}: {e}", path.display())))
    };
    write(private_key, key.serialize_pem(), 0o600)?;
    write(certificate, cert.pem(), 0o644)?;
    Ok(())
}

/// Server config for the listeners; generates a self-signed pair (with a warning) when both files
/// are missing.
pub fn server_config(
    certificate: &Path,
    private_key: &Path,
    hostname: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    if !certificate.exists() && !private_key.exists() {
        generate_self_signed(certificate, private_key, hostname)?;
        tracing::warn!(
            certificate = %certificate.display(),
            "no TLS certificate found: generated a self-signed one; mailers that verify certificates \
             need it trusted, or put a real certificate at [tls] certificate / private_key"
        );
    }
    let certs = read_certs(certificate)?;
    let key = read_key(private_key)?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError(format!(
                "certificate and private key do not fit together: {e}"
            ))
        })?;
    Ok(Arc::new(config))
}

/// Client config trusting the public roots, plus the certificates in `extra_ca` when given.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| {
                TlsError(format!(
                    "{}: not a usable CA certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Every HTTP client of the relay: rustls with the ring provider, the public roots plus
/// `extra_ca`, the protocols `alpn` offers (none: HTTP/1.1), and no redirects: a redirect would
/// re-post a refresh token, a client secret or a bearer token to wherever it points.
pub fn http_client_builder(
    extra_ca: Option<&std::path::Path>,
    alpn: &[&[u8]],
) -> Result<reqwest::ClientBuilder, String> {
    let roots = client_config(extra_ca).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConfig::clone(&roots);
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("xoauth-relay/", env!("CARGO_PKG_VERSION"))))
}

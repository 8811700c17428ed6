//! RS256 JSON Web Tokens for the grants that sign instead of asking a user: Google service accounts
//! (RFC 7523 §2.1, JWT-bearer) and Microsoft certificate credentials (RFC 7523 §2.2, client assertion).
//! ring does the RSA signing, so no extra crypto crate is needed.

use std::path::Path;

use base64::Engine;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde_json::Value;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Loads an RSA private key from PEM text (PKCS#8 or PKCS#1).
pub fn rsa_key_from_pem(pem: &str) -> Result<RsaKeyPair, String> {
    let key = rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("not PEM: {e}"))?
        .ok_or("no private key in the PEM text")?;
    match key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(der) => {
            RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        }
        rustls::pki_types::PrivateKeyDer::Pkcs1(der) => {
            RsaKeyPair::from_der(der.secret_pkcs1_der())
        }
        _ => return Err("the key must be an RSA key (PKCS#8 or PKCS#1)".into()),
    }
    .map_err(|e| format!("not a usable RSA key: {e}"))
}

/// `header.claims.signature`, signed with RS256.
pub fn sign(key: &RsaKeyPair, mut header: Value, claims: &Value) -> Result<String, String> {
    header["alg"] = "RS256".into();
    header["typ"] = "JWT".into();
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "RSA signing failed".to_string())?;
    Ok(format!("{signing_input}.{}", b64url(&signature)))
}

/// The fields of a Google service-account JSON key that the relay uses.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub key: RsaKeyPair,
}

pub fn load_service_account_key(path: &Path) -> Result<ServiceAccountKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let field = |name: &str| json.get(name).and_then(Value::as_str).map(str::to_string);
    let client_email = field("client_email").ok_or_else(|| {
        format!(
            "{}: no client_email; use the JSON key Google issues for the service account",
            path.display()
        )
    })?;
    let pem = field("private_key").ok_or_else(|| format!("{}: no private_key", path.display()))?;
    let key = rsa_key_from_pem(&pem).map_err(|e| format!("{}: private_key {e}", path.display()))?;
    Ok(ServiceAccountKey {
        client_email,
        private_key_id: field("private_key_id"),
        key,
    })
}

/// Base64url SHA-1 and SHA-256 thumbprints of the first certificate in a PEM file (`x5t`, `x5t#S256`).
pub fn certificate_thumbprints(path: &Path) -> Result<(String, String), String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cert = rustls_pemfile::certs(&mut data.as_slice())
        .next()
        .ok_or_else(|| format!("{}: no PEM certificate", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert);
    Ok((b64url(sha1.as_ref()), b64url(sha256.as_ref())))
}

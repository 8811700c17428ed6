//! xoauth-relay: an SMTP relay that accepts `AUTH PLAIN`/`LOGIN` from legacy mailers and delivers
//! through providers that require OAuth 2.0 (`XOAUTH2` / `OAUTHBEARER`).
//!
//! Module map (each file one concern):
//! - `server` listeners and shutdown · `connection` IO for one mailer · `session` SMTP state machine
//!   (no IO) · `reply` SMTP reply frames
//! - `auth` local passwords (argon2id)
//! - `tokens` access-token cache and single-flight refresh · `oauth` token endpoint requests ·
//!   `authorize` interactive grant flows · `jwt` signed assertions · `http` minimal HTTP client
//! - `store` sealed grants (the only place that sees ciphertext)
//! - `upstream` delivery to the provider's SMTP server
//! - `admin` + `control` administration, locally or through the running relay
//! - `config`, `tls`, `hints`, `secret`, `logging`

pub mod admin;
pub mod auth;
pub mod authorize;
pub mod config;
pub mod connection;
pub mod control;
pub mod hints;
pub mod http;
pub mod jwt;
pub mod logging;
pub mod oauth;
pub mod reply;
pub mod secret;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod upstream;

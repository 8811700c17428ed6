//! OAuth 2.0: getting, caching and refreshing access tokens, and the flows that obtain a grant.
//!
//! `tokens` (cache + single-flight refresh; the only holder of refresh tokens at run time) ·
//! `endpoint` (requests to token, device and revocation endpoints) · `issuer` (which request an
//! account's grant kind needs) · `jwt` (signed assertions) · `authorize` (interactive flows) ·
//! `http` (the HTTP client those requests use).
//!
//! Delivery asks [`tokens::TokenManager`] for an access token and never sees a refresh token.

pub mod authorize;
pub mod endpoint;
pub mod http;
pub mod issuer;
pub mod jwt;
pub mod tokens;

//! xoauth-relay: an SMTP relay that accepts `AUTH PLAIN`/`LOGIN` from legacy mailers and delivers
//! through providers that require OAuth 2.0 (`XOAUTH2` / `OAUTHBEARER`).
//!
//! Rooms, with arrows pointing down only (ARCHITECTURE.md draws them):
//! - `cli` arguments and printing · `app` builds and runs the relay from a config
//! - `inbound` listeners, admission, the IO driver of a mailer connection
//! - `admin` operations behind the admin commands · `control` the control socket (wire, server, client)
//! - `delivery` submission interface, upstream SMTP client, typed outcomes
//! - `auth` local logins · `oauth` tokens, endpoints, flows
//! - `observe` metrics, health endpoints, alerts
//! - `store` the grant-store trait, sled and memory stores, sealing
//! - `smtp` replies, session state machine, body codec (no IO) · `hints` error codes to fixes
//! - `config` raw → resolved configuration · `util` secret, clock, fs, tls, logging

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod hints;
pub mod inbound;
pub mod oauth;
pub mod observe;
pub mod smtp;
pub mod store;
pub mod util;

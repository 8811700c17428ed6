//! Test harness: a fake OAuth provider ([`provider`]: its token endpoint in [`oauth`], its SMTP
//! server in [`upstream`], checking XOAUTH2 / OAUTHBEARER the way Gmail does), the relay under test
//! wired to it ([`relay`]), a small SMTP client for the mailer side ([`mailer`]), upstream proxies
//! ([`proxies`]), fakes of Microsoft Graph and the Gmail API ([`api`]) and the set-ups the tests share ([`setups`]). Everything listens on 127.0.0.1
//! with ports chosen by the OS.
#![allow(dead_code)]

mod api;
mod mailer;
mod oauth;
mod pg;
mod provider;
mod proxies;
mod queueing;
mod relay;
mod setups;
mod upstream;

// Each test binary uses a part of the harness.
#[allow(unused_imports)]
pub use {
    api::*, mailer::*, oauth::*, pg::*, provider::*, proxies::*, queueing::*, relay::*, setups::*,
    upstream::*,
};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}
pub type BoxIo = Box<dyn Io>;

pub fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn b64d(data: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .unwrap_or_default()
}

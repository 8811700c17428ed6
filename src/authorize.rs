//! Interactive authorization flows (loopback + PKCE, paste-back, device code).

use crate::admin::Request;
use crate::config::Config;

pub enum Mode {
    Loopback { open_browser: bool },
    Manual,
    Device,
}

pub async fn run(_config: &Config, _account: &str, _mode: Mode) -> Result<Request, String> {
    Err("not yet".into())
}

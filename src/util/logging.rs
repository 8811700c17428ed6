//! Log setup: human-readable lines by default, JSON with `--log-format json`
//! (or `XOAUTH_RELAY_LOG_FORMAT=json`); level from `RUST_LOG`, default `info`.
//!
//! Nothing secret is ever passed to a log macro: passwords and tokens travel as
//! [`crate::util::secret::Secret`], whose `Debug`/`Display` print `[redacted]`.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // The innermost span is the last entry of `spans`; writing it again as `span` would
            // repeat the session in every line.
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

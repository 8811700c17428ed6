//! What an operator watches: Prometheus metrics and health endpoints ([`metrics`], [`http`]) and
//! alerts to a command or webhook before mail stops ([`alerts`]), and per-account usage for
//! `accounts --usage` ([`usage`]).
//!
//! Below `inbound`, `delivery` and `oauth`, which report into it; it reads nothing of theirs. The
//! app installs the callback that fills state gauges at scrape time.

pub mod alerts;
pub mod http;
pub mod metrics;
pub mod usage;

pub use alerts::{Alerts, Event};
pub use metrics::{MessageOutcome, Metrics, Step};

use std::sync::Arc;

use crate::config::AlertsConfig;
use crate::util::clock::SharedClock;

/// What the rooms that report hold: the metrics and the alert channels.
#[derive(Clone)]
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub alerts: Arc<Alerts>,
    pub usage: Arc<usage::Usage>,
}

impl Observer {
    pub fn new(config: &AlertsConfig, clock: SharedClock) -> Result<Observer, String> {
        let metrics = Arc::new(Metrics::new());
        let usage = Arc::new(usage::Usage::new(clock.clone()));
        let alerts = Arc::new(Alerts::new(config.clone(), clock, metrics.clone())?);
        Ok(Observer {
            metrics,
            alerts,
            usage,
        })
    }

    /// Every counter series of the configured listeners and accounts, at 0 (and on reload, those
    /// of added ones).
    pub fn prepare(&self, config: &crate::config::Config) {
        let listeners: Vec<String> = config
            .listeners
            .iter()
            .map(|l| l.address.to_string())
            .collect();
        let accounts: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        let events = Event::ALL.map(Event::as_str);
        self.metrics.prepare(&listeners, &accounts, &events);
    }

    /// Metrics nobody scrapes and no alert channel: for one-shot commands and unit tests.
    pub fn quiet(clock: SharedClock) -> Observer {
        Observer::new(&AlertsConfig::default(), clock).expect("no webhook, nothing can fail")
    }
}

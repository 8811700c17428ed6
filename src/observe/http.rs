//! The metrics and health endpoint (`[metrics] address`): plain HTTP on axum.
//!
//! `/metrics` is the Prometheus text exposition; `/healthz` answers while the process serves;
//! `/readyz` answers 200 only between "every listener is bound and the store is open" and the start
//! of shutdown, with the reason in the body otherwise, so a load balancer or a compose healthcheck
//! sends mail only to a relay that can take it.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::metrics::{Gauges, Metrics};
use crate::util::sync::lock;

/// A condition outside the relay's own start and stop that makes it not ready (the shared
/// database out of reach), asked at each probe.
pub type Check = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Whether the relay can take mail, and if not, why.
#[derive(Default)]
pub struct Health {
    not_ready: Mutex<Option<&'static str>>,
    check: Mutex<Option<Check>>,
}

impl Health {
    pub fn starting() -> Health {
        Health {
            not_ready: Mutex::new(Some("starting")),
            check: Mutex::new(None),
        }
    }

    pub fn set(&self, not_ready: Option<&'static str>) {
        *lock(&self.not_ready) = not_ready;
    }

    pub fn set_check(&self, check: Check) {
        *lock(&self.check) = Some(check);
    }

    pub fn reason(&self) -> Option<String> {
        if let Some(why) = *lock(&self.not_ready) {
            return Some(why.to_string());
        }
        lock(&self.check).as_ref().and_then(|c| c())
    }
}

/// Fills the state gauges at scrape time; installed by the app, which sees every room.
pub type Fill = Arc<dyn Fn(&Gauges) + Send + Sync>;

#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    fill: Fill,
    health: Arc<Health>,
}

/// Serves until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    fill: Fill,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoint {
            metrics,
            fill,
            health,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), Prometheus text 0.0.4 to anyone
/// else, as exporters do.
async fn scrape(State(ep): State<Endpoint>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let body = ep.metrics.encode(&*ep.fill);
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prefers_openmetrics(&accept.join(",")) {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::observe::metrics::prometheus_text(&body),
        )
    }
}

/// Whether an `Accept` header ranks OpenMetrics above the Prometheus text format (q-values as
/// RFC 9110 §12.4.2 has them; `text/plain` or a wildcard stands for the text format).
fn prefers_openmetrics(accept: &str) -> bool {
    let (mut open, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    open > 0.0 && open >= text
}

async fn ready(State(ep): State<Endpoint>) -> impl IntoResponse {
    match ep.health.reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::prefers_openmetrics;

    #[test]
    fn the_scraper_s_ranking_decides_the_format() {
        // Prometheus's own header.
        assert!(prefers_openmetrics("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(!prefers_openmetrics(""));
        assert!(!prefers_openmetrics("*/*"));
        assert!(!prefers_openmetrics(
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.1"
        ));
        assert!(!prefers_openmetrics("application/openmetrics-text;q=0"));
    }
}

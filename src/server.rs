//! HTTP endpoints: `/metrics` on the metrics address, `/healthz` and
//! `/readyz` on the health address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What the readiness probe reports.
#[derive(Default)]
pub struct Health {
    started: AtomicBool,
    watch_errors: Mutex<BTreeMap<String, String>>,
}

impl Health {
    /// Marks start-up as done: the API server answered and the CRDs exist.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Records a failing watch; the process is not ready until it recovers.
    pub fn watch_failed(&self, resource: &str, error: String) {
        self.watch_errors
            .lock()
            .expect("health lock")
            .insert(resource.to_string(), error);
    }

    /// Clears a watch failure.
    pub fn watch_recovered(&self, resource: &str) {
        self.watch_errors
            .lock()
            .expect("health lock")
            .remove(resource);
    }

    /// Problems that make the process unready, empty when it is ready.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.started.load(Ordering::SeqCst) {
            problems.push("starting".to_string());
        }
        for (resource, error) in self.watch_errors.lock().expect("health lock").iter() {
            problems.push(format!("watch of {resource} failing: {error}"));
        }
        problems
    }
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let problems = health.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// Binds both listeners; binding errors surface before the operator starts.
pub async fn bind(
    metrics_address: SocketAddr,
    health_address: SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let metrics = tokio::net::TcpListener::bind(metrics_address).await?;
    let health = tokio::net::TcpListener::bind(health_address).await?;
    Ok((metrics, health))
}

/// Serves metrics and health until shutdown.
pub async fn serve(
    listeners: (tokio::net::TcpListener, tokio::net::TcpListener),
    metrics_state: Arc<Metrics>,
    health_state: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let metrics_app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(metrics_state);
    let health_app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health_state);
    let (metrics_listener, health_listener) = listeners;
    let a = axum::serve(metrics_listener, metrics_app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let b =
        axum::serve(health_listener, health_app).with_graceful_shutdown(shutdown.cancelled_owned());
    tokio::try_join!(a, b)?;
    Ok(())
}

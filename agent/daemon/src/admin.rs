//! The admin HTTP endpoint: `/healthz` (the process is alive), `/readyz` (the sockets are
//! serving) and `/metrics` (Prometheus text). Bound to 127.0.0.1 by default.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use nencache_engine::Engine;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct AdminState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the sockets serve; cleared when shutdown starts.
    pub ready: AtomicBool,
}

/// The router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Ready while the sockets serve. A degraded lower tier does not make the agent unready
/// (it serves from the other tiers); each tier's state is listed below the first line.
async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string());
    }
    let mut body = "ready\n".to_string();
    for t in s.engine.tier_stats() {
        let state = t
            .degraded
            .map_or_else(|| "ok".to_string(), |why| format!("degraded: {why}"));
        body.push_str(&format!("tier {}: {state}\n", t.tier.name()));
    }
    (StatusCode::OK, body)
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.engine),
    )
}

/// Serves until `shutdown` resolves.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

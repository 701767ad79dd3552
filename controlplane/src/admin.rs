//! The control plane's admin endpoint (axum): `GET /status` (JSON), `GET /metrics`
//! (Prometheus), `POST /apply` (reload the configuration and wait for the gateways),
//! `GET /healthz`. Keep it on loopback or a management network: it is not authenticated.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::serve::{ApplyGateway, Hub};

/// Longest `wait_ms` an apply may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub(crate) async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) {
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/apply", post(apply))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(hub);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}

async fn status(State(hub): State<Arc<Hub>>) -> Response {
    Json(hub.status()).into_response()
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics.encode(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ApplyQuery {
    /// Wait this long for every connected gateway to answer the new generation.
    #[serde(default)]
    wait_ms: u64,
}

/// The answer to `POST /apply`.
#[derive(Debug, Serialize)]
struct ApplyAnswer {
    generation: String,
    changed: bool,
    error: Option<String>,
    gateways: Vec<ApplyGateway>,
    /// Milliseconds from the request to the last gateway's answer (or the end of the wait).
    elapsed_ms: f64,
}

async fn apply(State(hub): State<Arc<Hub>>, Query(q): Query<ApplyQuery>) -> Response {
    let started = std::time::Instant::now();
    let outcome = hub.request_reload().await;
    if let Some(error) = outcome.error {
        let answer = ApplyAnswer {
            generation: outcome.generation,
            changed: false,
            error: Some(error),
            gateways: Vec::new(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response();
    }
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let generation = hub.current().generation();
    let gateways = hub.wait_for(generation, wait).await;
    Json(ApplyAnswer {
        generation: outcome.generation,
        changed: outcome.changed,
        error: None,
        gateways,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
    .into_response()
}

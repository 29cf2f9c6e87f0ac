//! The HTTP operator surface: a dashboard, a JSON API and Prometheus metrics, all read-only views
//! of the broker's state. Nothing here can change the broker; the admin text protocol (with
//! ACLs when configured) does that.
//!
//! | path | what |
//! |---|---|
//! | `/` | the dashboard (HTML, refreshes itself from the JSON API) |
//! | `/metrics` | Prometheus text format |
//! | `/api/leases` | TEs leased now |
//! | `/api/history` | the last ended leases, newest first |
//! | `/api/status` | functions: queued by priority, running, workers |
//! | `/api/connections` | connections and what they registered |
//! | `/api/metrics` | the same numbers as `/metrics`, as JSON |
//! | `/healthz` | `ok` |

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

const DASHBOARD: &str = include_str!("dashboard.html");

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route(
            "/api/leases",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(s.inspect(|b, now| b.leases(now)))
            }),
        )
        .route(
            "/api/history",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(s.inspect(|b, _| b.lease_history()))
            }),
        )
        .route(
            "/api/status",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(s.inspect(|b, _| b.function_status()))
            }),
        )
        .route(
            "/api/connections",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(s.inspect(|b, _| b.connections()))
            }),
        )
        .route(
            "/api/metrics",
            get(|State(s): State<Arc<Shared>>| async move { Json(s.inspect(|b, _| b.metrics())) }),
        )
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (numbers, functions) = shared.inspect(|b, _| (b.metrics(), b.function_status()));
    let mut registry = Registry::with_prefix("tebroker");
    for m in numbers {
        if m.counter {
            let c: Counter = Counter::default();
            c.inc_by(m.value);
            registry.register(m.name, m.help, c);
        } else {
            let g: Gauge = Gauge::default();
            g.set(m.value as i64);
            registry.register(m.name, m.help, g);
        }
    }
    // Per-function queue depths, labelled; a family keeps the label set typed.
    let queued =
        prometheus_client::metrics::family::Family::<Vec<(String, String)>, Gauge>::default();
    let workers =
        prometheus_client::metrics::family::Family::<Vec<(String, String)>, Gauge>::default();
    let running =
        prometheus_client::metrics::family::Family::<Vec<(String, String)>, Gauge>::default();
    for f in functions {
        let fname = ("function".to_string(), f.name.clone());
        for (prio, n) in [
            ("high", f.queued_high),
            ("normal", f.queued_normal),
            ("low", f.queued_low),
        ] {
            queued
                .get_or_create(&vec![fname.clone(), ("priority".into(), prio.into())])
                .set(n as i64);
        }
        workers
            .get_or_create(&vec![fname.clone()])
            .set(f.workers as i64);
        running.get_or_create(&vec![fname]).set(f.running as i64);
    }
    registry.register(
        "function_queued_jobs",
        "Jobs waiting, by function and priority",
        queued,
    );
    registry.register(
        "function_running_jobs",
        "Jobs running, by function",
        running,
    );
    registry.register(
        "function_workers",
        "Workers registered, by function",
        workers,
    );
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed",
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Serves the operator surface on `addr` until `stop` is cancelled; returns the bound address.
pub async fn serve(
    addr: &str,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = router(shared);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(bound)
}

//! The HTTP operator surface: a dashboard, a JSON API and Prometheus metrics, read-only views of
//! the broker's state, plus API v1's control (`http_api`), which needs a token or a client
//! certificate. Plain HTTP, or HTTPS with `--http-tls-cert/--http-tls-key` (a client certificate
//! of `--http-client-ca` is optional and, when verified, becomes a [`ClientCert`] extension).
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
//! | `/healthz` | `ok` if the broker core answers within 2 s, else 503 |
//!
//! Bounded: at most [`MAX_CONNECTIONS`] HTTP connections at once (more get 503), request
//! headers must arrive within [`HEADER_TIMEOUT`], a connection lives at most
//! [`CONNECTION_LIFETIME`], and a handler waits at most [`CORE_WAIT`] for the broker lock,
//! which it holds only to copy what it shows.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use broker_core::{Broker, Now};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

const DASHBOARD: &str = include_str!("dashboard.html");

/// HTTP connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (keep-alive included) is closed after this long.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a request waits for the broker lock before answering 503.
pub const CORE_WAIT: Duration = Duration::from_secs(2);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/api/leases",
            get(|State(s): State<Arc<Shared>>| async move { json(&s, |b, now| b.leases(now)).await }),
        )
        .route(
            "/api/history",
            get(|State(s): State<Arc<Shared>>| async move { json(&s, |b, _| b.lease_history()).await }),
        )
        .route(
            "/api/status",
            get(|State(s): State<Arc<Shared>>| async move {
                json(&s, |b, _| b.function_status()).await
            }),
        )
        .route(
            "/api/connections",
            get(|State(s): State<Arc<Shared>>| async move { json(&s, |b, _| b.connections()).await }),
        )
        .route(
            "/api/metrics",
            get(|State(s): State<Arc<Shared>>| async move { json(&s, |b, _| b.metrics()).await }),
        )
        .merge(crate::http_api::routes())
        .with_state(shared)
}

fn unavailable(e: crate::server::CoreUnavailable) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("unavailable: {e}\n"),
    )
        .into_response()
}

/// Copies what `f` picks under the lock; serializes after releasing it.
async fn json<R: serde::Serialize>(shared: &Shared, f: impl FnOnce(&Broker, Now) -> R) -> Response {
    match shared.inspect_within(CORE_WAIT, f).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `ok` only if the broker core answers: its lock is free within [`CORE_WAIT`] and not poisoned.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    match shared
        .inspect_within(CORE_WAIT, |b, _| b.connection_count())
        .await
    {
        Ok(_) => "ok\n".into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            unavailable(e)
        }
    }
}

/// A label value in the text exposition format: backslash, double quote and line feed
/// escaped. (prometheus-client writes label values as given.)
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let edge = shared.edge.clone();
    let copied = shared
        .inspect_within(CORE_WAIT, |b, now| {
            (b.metrics(), b.function_status(), b.envs(now))
        })
        .await;
    let (numbers, functions, envs) = match copied {
        Ok(v) => v,
        Err(e) => return unavailable(e),
    };
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
    for (name, value, help) in edge.extra() {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    }
    // Per-function queue depths, labelled; a family keeps the label set typed.
    let queued = Family::<Vec<(String, String)>, Gauge>::default();
    let workers = Family::<Vec<(String, String)>, Gauge>::default();
    let running = Family::<Vec<(String, String)>, Gauge>::default();
    for f in functions {
        let fname = ("function".to_string(), escape_label_value(&f.name));
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
    let by_state = Family::<Vec<(String, String)>, Gauge>::default();
    for e in &envs {
        by_state
            .get_or_create(&vec![("state".to_string(), e.state.as_str().to_string())])
            .inc();
    }
    registry.register("envs", "TEs the broker knows, by state", by_state);
    registry.register(
        "lease_wait_seconds",
        "How long lock requests waited for a TE (granted ones)",
        shared.lease_metrics.wait.clone(),
    );
    registry.register(
        "lease_duration_seconds",
        "How long ended leases lasted",
        shared.lease_metrics.duration.clone(),
    );
    if let Some(store) = shared.store() {
        let w = store.stats();
        let depth: Gauge = Gauge::default();
        depth.set((w.queue_depth + w.pending) as i64);
        registry.register(
            "store_backlog",
            "Records queued or held for the store, not yet written",
            depth,
        );
        let up: Gauge = Gauge::default();
        up.set(i64::from(w.store_up));
        registry.register(
            "store_up",
            "1 if the store's last write or open succeeded",
            up,
        );
    }
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response();
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

/// Runs the operator surface on a thread and runtime of its own, so that a core stuck while it
/// holds the broker lock cannot stall the surface along with the runtime thread it blocks:
/// `/healthz` still answers, with 503. Returns the bound address once it listens.
pub fn serve_on_own_thread(
    addr: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tebroker-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = bound_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let bound = serve(&addr, shared, stop.clone()).await;
                let listening = bound.is_ok();
                let _ = bound_tx.send(bound);
                if listening {
                    stop.cancelled().await;
                }
            });
        })?;
    bound_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the HTTP thread ended before it listened"))?
}

/// Histograms of how long lock requests waited and leases lasted, in seconds, filled as leases
/// end (outside the broker lock).
#[derive(Clone)]
pub struct LeaseHistograms {
    wait: Histogram,
    duration: Histogram,
}

impl Default for LeaseHistograms {
    fn default() -> LeaseHistograms {
        // 1 s to ~9 h for waits; 10 s to ~28 h for leases.
        LeaseHistograms {
            wait: Histogram::new(exponential_buckets(1.0, 3.0, 10)),
            duration: Histogram::new(exponential_buckets(10.0, 3.0, 10)),
        }
    }
}

impl LeaseHistograms {
    pub fn observe(&self, ended: &[broker_core::EndedLease]) {
        for l in ended {
            self.wait.observe(l.waited_ms as f64 / 1000.0);
            self.duration
                .observe(l.ended_ms.saturating_sub(l.started_ms) as f64 / 1000.0);
        }
    }
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
    if let Some(files) = &shared.settings().http_tls {
        let acceptor = crate::tls::http_acceptor(files).context("HTTPS files (--http-tls-*)")?;
        shared.set_http_tls_acceptor(acceptor);
    }
    let app = router(shared.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (mut stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Read per connection: SIGHUP may have loaded a new certificate.
            let tls = shared.http_tls_acceptor();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = MAX_CONNECTIONS, "too many HTTP connections; answering 503");
                if tls.is_some() {
                    // No plain-text answer on a TLS port: the connection is just closed.
                    continue;
                }
                tokio::spawn(async move {
                    let busy = "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
                                content-length: 0\r\n\r\n";
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, stream.write_all(busy.as_bytes()))
                        .await;
                });
                continue;
            };
            let (app, stop, tls) = (app.clone(), stop.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, app, peer, stop).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream));
                        let stream = match handshake.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "HTTPS handshake timed out");
                                return;
                            }
                        };
                        // rustls has checked the certificate against --http-client-ca.
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|der| ClientCert {
                                common_name: crate::tls::common_name(der).unwrap_or_default(),
                            });
                        let app = match cert {
                            Some(cert) => app.layer(axum::Extension(cert)),
                            None => app,
                        };
                        serve_connection(stream, app, peer, stop).await
                    }
                }
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// A verified client certificate of an HTTPS connection (signed by `--http-client-ca`): it
/// authorizes control. Set as a request extension on that connection's requests only.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub common_name: String,
}

/// Serves one HTTP/1.1 connection until it ends, [`CONNECTION_LIFETIME`] passes or `stop`.
async fn serve_connection<S>(
    stream: S,
    app: Router,
    peer: std::net::SocketAddr,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut()) => {
            if let Ok(Err(e)) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = stop.cancelled() => {}
    }
}

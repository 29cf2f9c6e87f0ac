//! API v1: JSON views of the TEs, leases, queue, workers and history, and TE control.
//!
//! | Path | What |
//! | --- | --- |
//! | `GET /api/v1/envs` | every TE: the broker's live inventory, plus TEs only the store knows (`live: false`: seen before a restart, or by another broker sharing the database) |
//! | `GET /api/v1/envs/{name}` | one TE with its recent leases and state changes |
//! | `GET /api/v1/leases` | TEs leased now |
//! | `GET /api/v1/queue` | lock requests waiting, in serving order, with the estimated wait |
//! | `GET /api/v1/workers` | connections and what they registered |
//! | `GET /api/v1/history?env=&job=&since=&until=&outcome=&limit=&cursor=` | ended leases, newest first; `next` is the cursor of the following page |
//! | `GET /api/v1/stats` | the store writer's counters |
//! | `GET /api/v1/charts?hours=` | the dashboard's series: queue length and mean wait per 15 minutes, leases per hour by outcome |
//! | `POST /api/v1/envs/{name}/{drain,undrain,hold,release,rebuild}` | control (bearer token from `--api-token-file`); `hold` takes `?secs=` |
//!
//! Read-only endpoints are open; errors are `{"error": CODE, "message": TEXT}` with the status.
//! The broker lock is held only to copy; store queries run on blocking threads.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use broker_core::ControlOutcome;
use serde::{Deserialize, Serialize};
use tebroker_store::{Cursor, HistoryQuery, InventoryQuery, Outcome, WaitQuery};
use testenv_proto::agent::ControlOp;

use crate::http::{ClientCert, CORE_WAIT};
use crate::server::{ControlDone, Shared};
use crate::shared_read::SharedRead;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/envs", get(envs))
        .route("/api/v1/envs/{name}", get(env))
        .route("/api/v1/envs/{name}/{op}", post(control))
        .route("/api/v1/leases", get(leases))
        .route("/api/v1/queue", get(queue))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/history", get(history))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/charts", get(charts))
        .route("/api/v1/{*rest}", get(not_found).post(not_found))
}

/// An error answer: status plus `{"error", "message"}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn no_store() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_store",
            "this broker runs with --no-store: no history is kept",
        )
    }
    fn store(e: tebroker_store::StoreError) -> ApiError {
        tracing::warn!(error = %e, "store query failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
    fn core(e: crate::server::CoreUnavailable) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "core_unavailable",
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok<T: Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API path")
}

/// A TE as the API shows it: what the broker knows now, or the store's last record of a TE
/// it does not know now (`live` says which).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ApiEnv {
    Live {
        #[serde(flatten)]
        info: broker_core::EnvInfo,
        live: bool,
    },
    Stored {
        name: String,
        #[serde(flatten)]
        info: serde_json::Value,
        live: bool,
    },
}

impl ApiEnv {
    fn name(&self) -> &str {
        match self {
            ApiEnv::Live { info, .. } => &info.name,
            ApiEnv::Stored { name, .. } => name,
        }
    }
}

fn inventory_query() -> InventoryQuery {
    InventoryQuery {
        last_outcomes: broker_core::OUTCOMES_KEPT as u32,
        window_start_ms: tebroker_store::now_ms().saturating_sub(7 * 86_400_000),
    }
}

async fn all_envs(shared: &Arc<Shared>) -> Result<Vec<ApiEnv>, ApiError> {
    let live = shared
        .http_reads
        .live_envs
        .get((), || {
            shared.inspect_within(CORE_WAIT, |b, now| b.envs(now))
        })
        .await
        .map_err(ApiError::core)?;
    let live_names: std::collections::HashSet<String> =
        live.iter().map(|e| e.name.clone()).collect();
    let mut out: Vec<ApiEnv> = live
        .iter()
        .map(|info| ApiEnv::Live {
            info: info.clone(),
            live: true,
        })
        .collect();
    if let Some(store) = shared.store() {
        // A store that is down leaves the live view standing.
        let stored = shared
            .http_reads
            .inventory
            .get((), || store.read(|s| s.inventory(&inventory_query())))
            .await;
        if let Ok(stored) = stored {
            for s in stored.iter() {
                if live_names.contains(&s.latest.env) {
                    continue;
                }
                out.push(ApiEnv::Stored {
                    name: s.latest.env.clone(),
                    info: stored_env_json(s),
                    live: false,
                });
            }
        }
    }
    out.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(out)
}

/// A stored TE in the live inventory's shape (its name aside).
fn stored_env_json(s: &tebroker_store::EnvSummary) -> serde_json::Value {
    serde_json::json!({
        "source": "store",
        "agent": s.latest.agent,
        "host": "",
        "labels": s.latest.labels,
        "state": s.latest.state.as_str(),
        "since_ms": s.latest.since_ms,
        "holder": s.latest.holder,
        "detail": s.latest.detail,
        "last_outcomes": s.last_outcomes.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
        "failure_rate": s.failure_rate(),
    })
}

async fn envs(State(shared): State<Arc<Shared>>) -> ApiResult {
    ok(all_envs(&shared).await?)
}

async fn env(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> ApiResult {
    let all = all_envs(&shared).await?;
    let Some(found) = all.into_iter().find(|e| e.name() == name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_te",
            format!("no TE named {name}"),
        ));
    };
    let (recent, states) = match shared.store() {
        Some(store) => {
            let n = name.clone();
            store
                .read(move |s| {
                    let page = s.history(&HistoryQuery {
                        env: Some(n.clone()),
                        limit: 20,
                        ..HistoryQuery::default()
                    })?;
                    Ok((page.leases, s.env_states(&n, 20)?))
                })
                .await
                .map_err(ApiError::store)?
        }
        None => (Vec::new(), Vec::new()),
    };
    ok(serde_json::json!({
        "env": found,
        "recent_leases": recent,
        "state_changes": states,
    }))
}

async fn leases(State(shared): State<Arc<Shared>>) -> ApiResult {
    let leases = shared
        .http_reads
        .leases
        .get((), || {
            shared.inspect_within(CORE_WAIT, |b, now| b.leases(now))
        })
        .await
        .map_err(ApiError::core)?;
    ok(&*leases)
}

async fn workers(State(shared): State<Arc<Shared>>) -> ApiResult {
    ok(shared
        .inspect_within(CORE_WAIT, |b, _| b.connections())
        .await
        .map_err(ApiError::core)?)
}

#[derive(Debug, Serialize)]
struct QueuedRequest<'a> {
    #[serde(flatten)]
    request: &'a broker_core::WaitingRequest,
    /// Position × the mean time between recent grants (rounded up to seconds); `None` without
    /// history.
    estimated_wait_ms: Option<u64>,
}

async fn queue(State(shared): State<Arc<Shared>>) -> ApiResult {
    let waiting = shared
        .http_reads
        .waiting
        .get((), || {
            shared.inspect_within(CORE_WAIT, |b, now| b.waiting_requests(now))
        })
        .await
        .map_err(ApiError::core)?;
    let store = shared.store();
    ok(waiting
        .iter()
        .map(|request| QueuedRequest {
            estimated_wait_ms: store
                .and_then(|s| s.estimate_secs(request.position as u64))
                .map(|secs| secs.saturating_mul(1000)),
            request,
        })
        .collect::<Vec<_>>())
}

#[derive(Debug, Deserialize)]
pub struct HistoryParams {
    env: Option<String>,
    job: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    outcome: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn history(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let outcome = match &p.outcome {
        Some(o) => Some(Outcome::parse_known(o).map_err(|e| ApiError::bad_request(e.to_string()))?),
        None => None,
    };
    let after = match &p.cursor {
        Some(c) => Some(
            c.parse::<Cursor>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        ),
        None => None,
    };
    let q = HistoryQuery {
        env: p.env,
        job: p.job,
        since: p.since,
        until: p.until,
        outcome,
        limit: p.limit.unwrap_or(0),
        after,
    };
    let store = shared.store().ok_or_else(ApiError::no_store)?;
    ok(store
        .read(move |s| s.history(&q))
        .await
        .map_err(ApiError::store)?)
}

async fn stats(State(shared): State<Arc<Shared>>) -> ApiResult {
    let Some(store) = shared.store() else {
        return ok(serde_json::json!({"store": null}));
    };
    let w = store.stats();
    ok(serde_json::json!({
        "store": store.database().to_string(),
        "recorded": w.recorded,
        "written": w.written,
        "dropped": w.dropped,
        "errors": w.errors,
        "queue_depth": w.queue_depth,
        "pending": w.pending,
        "store_up": w.store_up,
    }))
}

#[derive(Debug, Deserialize)]
pub struct ControlParams {
    secs: Option<u64>,
}

/// Whether the request may control: it came with a client certificate signed by
/// `--http-client-ca` (rustls verified it), or it carries the bearer token (compared in
/// constant time). Returns who asked, for the logs and the agent.
fn authorized(
    shared: &Shared,
    cert: Option<&ClientCert>,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    if let Some(cert) = cert {
        return Ok(format!("http api (certificate {})", cert.common_name));
    }
    let client_ca = shared
        .settings()
        .http_tls
        .as_ref()
        .is_some_and(|t| t.ca.is_some());
    let Some(token) = shared.api_token() else {
        if client_ca {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "control needs a client certificate signed by the broker's --http-client-ca",
            ));
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "control_disabled",
            "control over HTTP needs the broker started with --api-token-file or --http-client-ca",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    use subtle::ConstantTimeEq;
    if bool::from(given.as_bytes().ct_eq(token)) && !given.is_empty() {
        Ok("http api".to_string())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer TOKEN` is required",
        ))
    }
}

async fn control(
    State(shared): State<Arc<Shared>>,
    Path((name, op)): Path<(String, String)>,
    cert: Option<axum::Extension<ClientCert>>,
    headers: HeaderMap,
    params: Result<Query<ControlParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let requested_by = authorized(&shared, cert.as_ref().map(|c| &c.0), &headers)?;
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let op = ControlOp::parse(&op)
        .filter(|o| *o != ControlOp::Status)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_operation",
                "operations: drain, undrain, hold, release, rebuild",
            )
        })?;
    let done = shared.control_env(op, &name, p.secs, &requested_by).await;
    // The caller reads the TE's new state next.
    shared.http_reads.live_envs.forget().await;
    match done {
        Ok(ControlDone::Agent {
            agent,
            handle,
            outcome,
        }) => agent_answer(&name, op, agent, handle, outcome),
        Ok(ControlDone::Broker) => ok(serde_json::json!({
            "env": name, "op": op.as_str(), "applied_by": "broker",
        })),
        Err(e) => {
            let (code, text) = e.code_and_text();
            let status = match e {
                broker_core::ControlError::UnknownTe(_) => StatusCode::NOT_FOUND,
                broker_core::ControlError::AmbiguousTe(_) => StatusCode::CONFLICT,
                broker_core::ControlError::AgentUnreachable(_) => StatusCode::BAD_GATEWAY,
                broker_core::ControlError::NotSupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            Err(ApiError::new(status, code, text))
        }
    }
}

/// The answer to a control command an agent carried out, refused, failed or left unanswered.
fn agent_answer(
    env: &str,
    op: ControlOp,
    agent: String,
    handle: String,
    outcome: ControlOutcome,
) -> ApiResult {
    match outcome {
        ControlOutcome::Replied {
            ok: true, message, ..
        } => ok(serde_json::json!({
            "env": env, "op": op.as_str(), "applied_by": "agent", "agent": agent,
            "handle": handle, "reply": message,
        })),
        ControlOutcome::Replied {
            ok: false, message, ..
        } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused",
            format!("agent {agent}: {message}"),
        )),
        ControlOutcome::Failed { why, .. } => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_failed",
            format!("agent {agent}: {why}"),
        )),
        timed_out @ ControlOutcome::TimedOut { .. } => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "agent_timeout",
            timed_out.timeout_text(),
        )),
    }
}

#[derive(Debug, Deserialize)]
pub struct ChartParams {
    hours: Option<u32>,
}

/// Buckets of the wait series.
const WAIT_BUCKET_MS: i64 = 15 * 60 * 1000;
const HOUR_MS: i64 = 3_600_000;
/// Most leases and waits a chart reads.
const CHART_ROWS: u32 = 50_000;

#[derive(Debug, Serialize, PartialEq)]
struct WaitPoint {
    at_ms: i64,
    /// Requests waiting at `at_ms`.
    queued: usize,
    /// Mean wait of the requests granted in the bucket ending at `at_ms`; `None` if none.
    mean_wait_ms: Option<i64>,
}

#[derive(Debug, Serialize, PartialEq)]
struct HourPoint {
    start_ms: i64,
    /// Leases that ended in the hour, by outcome.
    outcomes: std::collections::BTreeMap<String, u64>,
}

/// Buckets from `from` to `now`, the last one cut at `now` so that the waits of the current
/// quarter hour show at once. `still_waiting` holds when each request waiting now was queued
/// (the store only has waits that ended).
fn wait_series(
    waits: &[tebroker_store::WaitRecord],
    still_waiting: &[i64],
    from: i64,
    now: i64,
) -> Vec<WaitPoint> {
    let mut out = Vec::new();
    let mut t = from;
    while t < now {
        let end = t.saturating_add(WAIT_BUCKET_MS).min(now);
        let queued = waits
            .iter()
            .filter(|w| w.queued_ms <= end && w.end.at_ms() > end)
            .count()
            + still_waiting.iter().filter(|&&q| q <= end).count();
        let granted: Vec<i64> = waits
            .iter()
            .filter(|w| {
                matches!(w.end, tebroker_store::WaitEnd::Granted { .. })
                    && w.end.at_ms() > t
                    && w.end.at_ms() <= end
            })
            .map(|w| w.waited_ms())
            .collect();
        let mean =
            (!granted.is_empty()).then(|| granted.iter().sum::<i64>() / granted.len() as i64);
        out.push(WaitPoint {
            at_ms: end,
            queued,
            mean_wait_ms: mean,
        });
        t = end;
    }
    out
}

fn hour_series(leases: &[tebroker_store::StoredLease], from: i64, to: i64) -> Vec<HourPoint> {
    let mut out: Vec<HourPoint> = Vec::new();
    let mut t = from;
    while t < to {
        out.push(HourPoint {
            start_ms: t,
            outcomes: Default::default(),
        });
        t = t.saturating_add(HOUR_MS);
    }
    for l in leases {
        let i = (l.lease.ended_ms - from).div_euclid(HOUR_MS);
        if let Some(p) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
            *p.outcomes
                .entry(l.lease.outcome.as_str().to_string())
                .or_default() += 1;
        }
    }
    out
}

async fn charts(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<ChartParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let hours = p.hours.unwrap_or(12).clamp(1, 7 * 24);
    let store = shared.store().ok_or_else(ApiError::no_store)?;
    let chart = shared
        .http_reads
        .charts
        .get(hours, || read_charts(&shared, store, hours))
        .await?;
    ok(&*chart)
}

async fn read_charts(
    shared: &Shared,
    store: &Arc<crate::server_store::StoreLink>,
    hours: u32,
) -> Result<serde_json::Value, ApiError> {
    let now = tebroker_store::now_ms();
    let since = now.saturating_sub(i64::from(hours) * HOUR_MS);
    let (waits, leases) = store
        .read(move |s| {
            let waits = s.waits(&WaitQuery {
                function: None,
                since: Some(since),
                granted_only: false,
                limit: CHART_ROWS,
            })?;
            let mut leases = Vec::new();
            let mut q = HistoryQuery {
                since: Some(since),
                limit: tebroker_store::MAX_PAGE,
                ..HistoryQuery::default()
            };
            loop {
                let page = s.history(&q)?;
                leases.extend(page.leases);
                match page.next {
                    Some(c) if leases.len() < CHART_ROWS as usize => q.after = Some(c),
                    _ => break,
                }
            }
            Ok((waits, leases))
        })
        .await
        .map_err(ApiError::store)?;
    let still_waiting: Vec<i64> = shared
        .inspect_within(CORE_WAIT, |b, now| b.waiting_requests(now))
        .await
        .map_err(ApiError::core)?
        .iter()
        .map(|w| now.saturating_sub(i64::try_from(w.waited_ms).unwrap_or(i64::MAX)))
        .collect();
    let hour_start = since - since.rem_euclid(HOUR_MS);
    let bucket_start = since - since.rem_euclid(WAIT_BUCKET_MS);
    Ok(serde_json::json!({
        "now_ms": now,
        "hours": hours,
        "waits": wait_series(&waits, &still_waiting, bucket_start, now),
        "leases_per_hour": hour_series(&leases, hour_start, now),
    }))
}

const CORE_VIEW_FRESH: Duration = Duration::from_millis(500);

/// The reads the dashboard repeats on every refresh, shared between its readers (see
/// [`crate::shared_read`]).
pub struct HttpReads {
    /// The stored inventory: a week of every TE's leases for its failure rate.
    inventory: SharedRead<(), Vec<tebroker_store::EnvSummary>>,
    /// `/api/v1/charts` by its hours: the leases and waits of those hours.
    charts: SharedRead<u32, serde_json::Value>,
    /// The core's views: TEs, leases, waiting requests.
    live_envs: SharedRead<(), Vec<broker_core::EnvInfo>>,
    leases: SharedRead<(), Vec<broker_core::Lease>>,
    waiting: SharedRead<(), Vec<broker_core::WaitingRequest>>,
}

impl Default for HttpReads {
    fn default() -> HttpReads {
        HttpReads {
            // Fresh enough for a page that refreshes every 3 s.
            inventory: SharedRead::new(Duration::from_secs(1)),
            // Buckets of minutes and hours: a few seconds behind is not visible.
            charts: SharedRead::new(Duration::from_secs(5)),
            // Half a second: no reader tells, and the lock is taken twice a second at most.
            live_envs: SharedRead::new(CORE_VIEW_FRESH),
            leases: SharedRead::new(CORE_VIEW_FRESH),
            waiting: SharedRead::new(CORE_VIEW_FRESH),
        }
    }
}

//! Monitoring: Prometheus metrics and `/healthz`, one endpoint per process.
//!
//! Counters are recorded where things happen through the `metrics` facade (a no-op until
//! [`serve`] installs the recorder, so `--once`, the tests and Python pay nothing); the
//! Prometheus exporter renders them, and a small axum app serves them beside `/healthz`,
//! which judges every manager loop of this process as `ccat-wfm health` does.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::health;

/// Runs created by the trigger-manager, per pipeline.
pub const RUNS_CREATED: &str = "ccat_wfm_runs_created_total";
/// Runs claimed by a workflow-manager, per pipeline.
pub const RUNS_CLAIMED: &str = "ccat_wfm_runs_claimed_total";
/// Runs whose job was submitted to the backend, per pipeline.
pub const RUNS_SUBMITTED: &str = "ccat_wfm_runs_submitted_total";
/// Runs completed with their products registered, per pipeline.
pub const RUNS_COMPLETED: &str = "ccat_wfm_runs_completed_total";
/// Failed attempts (retried or final), per pipeline.
pub const RUNS_FAILED: &str = "ccat_wfm_runs_failed_total";
pub const CYCLE_DURATION: &str = "ccat_wfm_cycle_duration_seconds";
pub const CYCLES: &str = "ccat_wfm_cycles_total";
pub const CYCLE_ERRORS: &str = "ccat_wfm_cycle_errors_total";
pub const BACKEND_CALLS: &str = "ccat_wfm_backend_calls_total";
pub const BACKEND_ERRORS: &str = "ccat_wfm_backend_errors_total";
/// Hand-offs recorded in the outbox and not yet published to Redis.
pub const DISPATCH_BACKLOG: &str = "ccat_wfm_dispatch_backlog";
pub const DISPATCH_PUBLISHED: &str = "ccat_wfm_dispatch_published_total";
/// Jobs submitted while their run's lease was lost (cancelled or taken over meanwhile),
/// cancelled at once.
pub const FENCED_JOBS: &str = "ccat_wfm_fenced_jobs_total";

/// Cycle durations from a millisecond (a quiet cycle) to ten minutes (a full re-evaluation).
const CYCLE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Counts `n` runs of `pipeline` under the counter `name`.
pub fn count_runs(name: &'static str, pipeline: &str, n: u64) {
    if n > 0 {
        metrics::counter!(name, "pipeline" => pipeline.to_owned()).increment(n);
    }
}

/// Counts one job cancelled because it was submitted under a lost lease.
pub fn count_fenced_job() {
    metrics::counter!(FENCED_JOBS).increment(1);
}

/// Records one finished cycle of `manager`.
pub fn record_cycle(manager: &'static str, seconds: f64, failed: bool) {
    metrics::histogram!(CYCLE_DURATION, "manager" => manager).record(seconds);
    metrics::counter!(CYCLES, "manager" => manager).increment(1);
    if failed {
        metrics::counter!(CYCLE_ERRORS, "manager" => manager).increment(1);
    }
}

/// Records one call to a backend and whether it failed.
pub fn record_backend_call(backend: &'static str, operation: &'static str, failed: bool) {
    metrics::counter!(BACKEND_CALLS, "backend" => backend, "operation" => operation).increment(1);
    if failed {
        metrics::counter!(BACKEND_ERRORS, "backend" => backend, "operation" => operation)
            .increment(1);
    }
}

/// Records what a publishing pass left behind and published.
pub fn record_dispatch(manager: &'static str, backlog: i64, published: usize) {
    metrics::gauge!(DISPATCH_BACKLOG, "manager" => manager).set(backlog as f64);
    metrics::counter!(DISPATCH_PUBLISHED, "manager" => manager).increment(published as u64);
}

/// The process-wide recorder, installed on first use.
fn handle() -> anyhow::Result<&'static PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CYCLE_DURATION.into()), &CYCLE_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// Serves `GET /metrics` and `GET /healthz` on `address` until `stop` is set. Binds before
/// returning, so a busy or invalid address is an error at start-up, not a log line later.
pub async fn serve(address: &str, mut stop: watch::Receiver<bool>) -> anyhow::Result<SocketAddr> {
    let handle = handle()?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for metrics (METRICS_ADDRESS)"))?;
    let bound = listener
        .local_addr()
        .context("the metrics listener's address")?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { handle.render() }),
        )
        .route("/healthz", axum::routing::get(healthz));
    // Histograms are summarised by upkeep; without it their samples only pile up.
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            handle.run_upkeep();
        }
    });
    tokio::spawn(async move {
        let stopped = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "metrics and /healthz served");
    Ok(bound)
}

/// 200 when every manager loop of this process is healthy, 503 (with the reasons) when
/// one is stuck or none has started.
async fn healthz() -> impl IntoResponse {
    let now = chrono::Utc::now();
    let assessed: Vec<_> = health::local_services()
        .into_iter()
        .map(|s| (health::assess(true, Some(&s), now), s))
        .collect();
    let healthy = !assessed.is_empty() && assessed.iter().all(|(h, _)| h.is_ok());
    let services: Vec<serde_json::Value> = assessed
        .iter()
        .map(|(state, s)| {
            serde_json::json!({
                "service": s.service,
                "health": state,
                "last_cycle_end": s.last_cycle_end,
                "last_error": s.last_error,
            })
        })
        .collect();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "healthy": healthy, "services": services })),
    )
}

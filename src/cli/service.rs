//! The commands that run the managers — `run` (all three in one process),
//! `trigger-manager`, `workflow-manager`, `result-manager` — and `health`, which reads
//! the heartbeats they publish.

use anyhow::Context;

use super::{EXIT_PROBLEM, views};
use crate::config::Settings;
use crate::db::Database;
use crate::health::{self, Health, HealthKeys};
use crate::managers::{self, ManagerKind};

/// Runs a manager: one cycle with `--once` (its report printed as JSON), else its loop
/// until SIGTERM or SIGINT.
pub(super) async fn manager(
    kind: ManagerKind,
    settings: &Settings,
    db: &Database,
    once: bool,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    if once {
        let (report, errors) = managers::cycle_once(kind, settings, db, launcher).await?;
        println!("{report}");
        return Ok(if errors == 0 { 0 } else { EXIT_PROBLEM });
    }
    let stop = stop_on_signals()?;
    serve_metrics(settings, &stop).await?;
    managers::run(kind, settings, db, launcher, stop).await?;
    Ok(0)
}

/// The three manager loops in one process, stopped together.
pub(super) async fn run_all(
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    match db.dialect() {
        // The embedded database is ours to create.
        crate::db::Dialect::Sqlite => {
            db.migrate().await?;
        }
        // ops-db owns a PostgreSQL schema: only check it.
        crate::db::Dialect::Postgres => {
            let report = db.check().await?;
            if !report.is_complete() {
                eprintln!(
                    "error: {} lacks tables or columns the managers need; see `ccat-wfm db check`",
                    db.describe()
                );
                return Ok(EXIT_PROBLEM);
            }
        }
    }
    let stop = stop_on_signals()?;
    serve_metrics(settings, &stop).await?;
    managers::run_all(settings, db, launcher, stop).await?;
    Ok(0)
}

/// Starts the `/metrics` and `/healthz` endpoint when `METRICS_ADDRESS` asks for one.
async fn serve_metrics(
    settings: &Settings,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !settings.metrics_address.is_empty() {
        crate::metrics::serve(&settings.metrics_address, stop.clone()).await?;
    }
    Ok(())
}

/// A stop request set by SIGINT or SIGTERM. The handlers are installed before the loop
/// starts, so a signal during a cycle is not lost: the cycle finishes, then the loop ends.
pub(super) fn stop_on_signals() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// `ccat-wfm health`: the services' heartbeats in Redis; exit 1 unless all are well.
pub(super) async fn health(
    settings: &Settings,
    service: Option<String>,
    json: bool,
) -> anyhow::Result<u8> {
    let client = health::redis_client(&settings.redis).context("Redis settings")?;
    let keys = HealthKeys::default();
    let redis_at = format!("{}:{}", settings.redis.host, settings.redis.port);
    let service_asked = service.is_some();
    let result = match service {
        Some(name) => health::service(&client, &keys, &name)
            .await
            .map(|s| vec![s]),
        None => health::report(&client, &keys).await,
    };
    let services = match result {
        Ok(services) => services,
        Err(e) => {
            eprintln!("error: cannot read health from Redis at {redis_at}: {e}");
            return Ok(EXIT_PROBLEM);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&services)?);
    } else {
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                let (state, reason) = match &s.health {
                    Health::Healthy => ("healthy", String::new()),
                    Health::Starting => ("starting", "no cycle finished yet".to_owned()),
                    Health::Stopped { at } => {
                        ("stopped", format!("stopped cleanly at {}", at.to_rfc3339()))
                    }
                    Health::Down => (
                        "down",
                        "no heartbeat: the process died or cannot reach Redis".to_owned(),
                    ),
                    Health::Stale { reason } => ("stale", reason.clone()),
                };
                let st = s.status.as_ref();
                vec![
                    s.service.clone(),
                    state.to_owned(),
                    st.map_or_else(String::new, |st| format!("{}:{}", st.host, st.pid)),
                    st.and_then(|st| st.last_cycle_end)
                        .map_or_else(String::new, |t| t.to_rfc3339()),
                    st.and_then(|st| st.last_cycle_seconds)
                        .map_or_else(String::new, |d| format!("{d:.3}")),
                    if reason.is_empty() {
                        st.and_then(|st| st.last_error.clone()).unwrap_or_default()
                    } else {
                        reason
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            views::render_table(
                &[
                    "SERVICE",
                    "STATE",
                    "PROCESS",
                    "LAST CYCLE END",
                    "SECONDS",
                    "NOTE"
                ],
                &rows
            )
        );
        if services.is_empty() {
            println!("no service reports to Redis at {redis_at}");
        }
    }
    // A service asked for by name must be running; in the whole report, a service that
    // stopped cleanly is no alarm.
    let ok = !services.is_empty()
        && services.iter().all(|s| {
            s.health.is_ok() && !(service_asked && matches!(s.health, Health::Stopped { .. }))
        });
    Ok(if ok { 0 } else { EXIT_PROBLEM })
}

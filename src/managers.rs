//! The three manager loops (SPEC §8), shared by `ccat-wfm` and Python: a cycle every
//! poll interval, a Redis heartbeat for as long as the loop runs, and a clean stop — the
//! current cycle finishes — when the stop signal is set (SIGTERM/SIGINT in the CLI,
//! Ctrl-C seen by the interpreter in Python).

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio::sync::watch;

use crate::backend::AnyBackend;
use crate::config::Settings;
use crate::db::Database;
use crate::dispatch::PublishReport;
use crate::health::ManagerHeartbeat;
use crate::metrics;
use crate::results::{ResultManager, ResultOptions, ResultReport};
use crate::trigger::{self, TriggerOptions};
use crate::workflow::{WorkflowManager, WorkflowOptions, WorkflowReport};

/// Which manager a loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerKind {
    Trigger,
    Workflow,
    Result,
}

impl ManagerKind {
    /// The service name (`health:workflow:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            ManagerKind::Trigger => "trigger-manager",
            ManagerKind::Workflow => "workflow-manager",
            ManagerKind::Result => "result-manager",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            ManagerKind::Trigger,
            ManagerKind::Workflow,
            ManagerKind::Result,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }

    fn interval(self, settings: &Settings) -> Duration {
        match self {
            ManagerKind::Trigger => settings.poll_intervals.trigger(),
            ManagerKind::Workflow => settings.poll_intervals.workflow(),
            ManagerKind::Result => settings.poll_intervals.result(),
        }
    }
}

/// What one cycle reports to the loop: items handled and the first problem.
struct CycleOutcome {
    items: u64,
    error: Option<String>,
}

/// Runs the loop of `kind` until `stop` becomes true. `launcher` starts the local
/// backend's job wrapper (None: this executable).
pub async fn run(
    kind: ManagerKind,
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let service = kind.name();
    let interval = kind.interval(settings);
    match kind {
        ManagerKind::Trigger => {
            let options = TriggerOptions::from_settings(settings, false);
            // Kept between cycles: each cycle then costs what changed, not the archive.
            let evaluator = tokio::sync::Mutex::new(trigger::Evaluator::default());
            run_loop(settings, service, interval, stop, || async {
                let started = Instant::now();
                let report = evaluator
                    .lock()
                    .await
                    .cycle(db, &options, Utc::now())
                    .await?;
                tracing::info!(
                    pipelines = report.pipelines.len(),
                    runs_created = report.created(),
                    errors = report.errors.len(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "trigger cycle done"
                );
                for p in &report.pipelines {
                    metrics::count_runs(metrics::RUNS_CREATED, &p.pipeline, p.created as u64);
                }
                Ok(CycleOutcome {
                    items: report.created() as u64,
                    error: report.errors.first().cloned(),
                })
            })
            .await
        }
        ManagerKind::Workflow | ManagerKind::Result => {
            let manager = JobManager::new(kind, settings, db, launcher)?;
            run_loop(settings, service, interval, stop, || async {
                let started = Instant::now();
                match &manager {
                    JobManager::Workflow(m) => {
                        job_cycle_done(service, &m.cycle(Utc::now()).await?, started)
                    }
                    JobManager::Result(m) => {
                        job_cycle_done(service, &m.cycle(Utc::now()).await?, started)
                    }
                }
            })
            .await
        }
    }
}

/// The loop of a manager that drives jobs: the workflow-manager submits them, the
/// result-manager follows them and collects their outputs.
enum JobManager {
    Workflow(WorkflowManager<AnyBackend>),
    Result(ResultManager<AnyBackend>),
}

impl JobManager {
    fn new(
        kind: ManagerKind,
        settings: &Settings,
        db: &Database,
        launcher: Option<Vec<String>>,
    ) -> anyhow::Result<Self> {
        let backend = crate::backend::from_settings(settings, launcher)?;
        let publisher = crate::dispatch::publisher_for(settings)
            .context("the Redis settings for Celery dispatch")?;
        Ok(match kind {
            ManagerKind::Workflow => JobManager::Workflow(
                WorkflowManager::new(
                    db.clone(),
                    backend,
                    WorkflowOptions::from_settings(settings),
                )
                .with_publisher(publisher),
            ),
            ManagerKind::Result => JobManager::Result(
                ResultManager::new(db.clone(), backend, ResultOptions::from_settings(settings))
                    .with_publisher(publisher),
            ),
            ManagerKind::Trigger => anyhow::bail!("the trigger-manager drives no jobs"),
        })
    }
}

/// One cycle of `kind` (`--once`): its report as pretty JSON, and its number of errors.
pub async fn cycle_once(
    kind: ManagerKind,
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<(String, usize)> {
    let now = Utc::now();
    Ok(match kind {
        ManagerKind::Trigger => {
            let options = TriggerOptions::from_settings(settings, false);
            let report = trigger::run_cycle(db, &options, now).await?;
            (serde_json::to_string_pretty(&report)?, report.errors.len())
        }
        ManagerKind::Workflow | ManagerKind::Result => {
            match JobManager::new(kind, settings, db, launcher)? {
                JobManager::Workflow(m) => {
                    let report = m.cycle(now).await?;
                    (serde_json::to_string_pretty(&report)?, report.errors.len())
                }
                JobManager::Result(m) => {
                    let report = m.cycle(now).await?;
                    (serde_json::to_string_pretty(&report)?, report.errors.len())
                }
            }
        }
    })
}

/// What the job managers' cycle reports give the loop.
trait JobCycleReport {
    /// The cycle's log event, its counts as fields.
    fn log(&self, duration_ms: u64);
    /// Items handled, the first error, and what was published to Celery.
    fn outcome(&self) -> (u64, Option<&String>, Option<&PublishReport>);
}

impl JobCycleReport for WorkflowReport {
    fn log(&self, duration_ms: u64) {
        tracing::info!(
            claimed = self.claimed,
            submitted = self.submitted,
            adopted = self.adopted,
            staging_requested = self.staging_requested,
            waiting_for_staging = self.waiting_for_staging,
            failed = self.failed,
            duration_ms,
            "workflow cycle done"
        );
    }
    fn outcome(&self) -> (u64, Option<&String>, Option<&PublishReport>) {
        (self.handled(), self.errors.first(), self.dispatch.as_ref())
    }
}

impl JobCycleReport for ResultReport {
    fn log(&self, duration_ms: u64) {
        tracing::info!(
            polled = self.polled,
            started = self.started,
            succeeded = self.succeeded,
            failed = self.failed,
            retried = self.retried,
            cancelled = self.cancelled,
            completed = self.completed,
            duration_ms,
            "result cycle done"
        );
    }
    fn outcome(&self) -> (u64, Option<&String>, Option<&PublishReport>) {
        (self.handled(), self.errors.first(), self.dispatch.as_ref())
    }
}

/// Logs a job manager's cycle and exports its dispatch figures.
fn job_cycle_done(
    service: &'static str,
    report: &impl JobCycleReport,
    started: Instant,
) -> anyhow::Result<CycleOutcome> {
    report.log(started.elapsed().as_millis() as u64);
    let (items, error, dispatch) = report.outcome();
    if let Some(dispatch) = dispatch {
        metrics::record_dispatch(service, dispatch.backlog, dispatch.published);
    }
    Ok(CycleOutcome {
        items,
        error: error.cloned(),
    })
}

/// The three loops in this one process (the embedded setup), stopped together.
pub async fn run_all(
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tokio::try_join!(
        run(
            ManagerKind::Trigger,
            settings,
            db,
            launcher.clone(),
            stop.clone()
        ),
        run(
            ManagerKind::Workflow,
            settings,
            db,
            launcher.clone(),
            stop.clone()
        ),
        run(ManagerKind::Result, settings, db, launcher, stop),
    )?;
    Ok(())
}

/// The poll–work–sleep loop with its heartbeat.
async fn run_loop<F, Fut>(
    settings: &Settings,
    service: &'static str,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut cycle: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<CycleOutcome>>,
{
    let heartbeat = ManagerHeartbeat::start(&settings.redis, service, interval);
    tracing::info!(
        service,
        interval_s = interval.as_secs_f64(),
        "manager started"
    );
    loop {
        heartbeat.reporter.cycle_started();
        let started = Instant::now();
        let outcome = cycle().await;
        metrics::record_cycle(
            service,
            started.elapsed().as_secs_f64(),
            !matches!(outcome, Ok(CycleOutcome { error: None, .. })),
        );
        match outcome {
            Ok(outcome) => heartbeat
                .reporter
                .cycle_finished(outcome.items, outcome.error),
            // The database may come back: log and try again next cycle.
            Err(e) => {
                tracing::error!(service, error = %describe(&e), "cycle failed");
                heartbeat.reporter.cycle_finished(0, Some(e.to_string()));
            }
        }
        // A stop requested during the cycle ends the loop now; otherwise sleep until the
        // next cycle or a stop request, whichever comes first.
        let stopping = *stop.borrow() || {
            tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                changed = stop.changed() => changed.is_err() || *stop.borrow(),
            }
        };
        if stopping {
            tracing::info!(service, "manager stopping");
            heartbeat.stop().await;
            return Ok(());
        }
    }
}

/// An error with its causes, each said once: library errors already include their
/// source in their message, and repeating it would only add noise.
pub fn describe(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        // The database layer says what a server error means; the driver's own text and
        // the server's error below it (with its internal source position) add nothing an
        // operator needs.
        if matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(_))
        ) {
            break;
        }
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

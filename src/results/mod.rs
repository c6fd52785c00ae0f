//! The result-manager (SPEC §7): follows the jobs of one backend with one batched status
//! query per cycle and moves their runs on — SUBMITTED → RUNNING → COLLECTING_RESULTS, or
//! FAILED with the reason and the tail of the job's log (and back to PENDING while
//! retries are left) —, stops the jobs of runs an operator cancelled, and collects the
//! outputs of succeeded jobs as data products ([`collect`]) → COMPLETED.

pub mod collect;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::backend::{Backend, JobRef, JobState};
use crate::config::Settings;
use crate::db::runs::{ActiveJob, NewProduct, RunMetrics};
use crate::db::{Database, DbError};
use crate::workflow::layout::RunLayout;

/// Bytes of a failed job's log kept on its run.
pub const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Debug, Clone)]
pub struct ResultOptions {
    pub processing_location_id: i64,
    pub pipeline_base_dir: PathBuf,
    pub retry_backoff: chrono::Duration,
    /// A job the backend does not know is failed only once it was submitted this long
    /// ago (the controller may not list a job submitted a moment before).
    pub vanish_grace: chrono::Duration,
    /// In celery mode, a collection handed to the workers and not done after this long
    /// is handed off again (its message may have been lost with Redis or a worker).
    pub handoff_timeout: chrono::Duration,
}

impl ResultOptions {
    pub fn from_settings(settings: &Settings) -> Self {
        ResultOptions {
            processing_location_id: settings.processing_location_id,
            pipeline_base_dir: settings.pipeline_base_dir.clone(),
            retry_backoff: crate::workflow::seconds(settings.workflow.retry_backoff_seconds),
            vanish_grace: chrono::Duration::seconds(30),
            handoff_timeout: crate::workflow::seconds(settings.workflow.lease_seconds),
        }
    }
}

/// What one cycle did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResultReport {
    pub polled: usize,
    pub started: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Of the failed: put back to PENDING for another attempt.
    pub retried: usize,
    pub cancelled: usize,
    /// Runs whose outputs were registered (→ COMPLETED), and how many products.
    pub completed: usize,
    /// The publishing of recorded hand-offs, in celery mode.
    pub dispatch: Option<crate::dispatch::PublishReport>,
    pub products: usize,
    pub errors: Vec<String>,
}

impl ResultReport {
    pub fn handled(&self) -> u64 {
        (self.started + self.succeeded + self.failed + self.cancelled + self.completed) as u64
    }
}

pub struct ResultManager<B> {
    db: Database,
    backend: B,
    options: ResultOptions,
    /// Set in celery mode: collections are handed to workers and published by this.
    publisher: Option<tokio::sync::Mutex<crate::dispatch::Publisher>>,
    /// The deployment's job tag prefix, read once (see [`crate::workflow::tag_prefix`]).
    tag_prefix: tokio::sync::OnceCell<String>,
}

impl<B: Backend> ResultManager<B> {
    pub fn new(db: Database, backend: B, options: ResultOptions) -> Self {
        ResultManager {
            db,
            backend,
            options,
            publisher: None,
            tag_prefix: tokio::sync::OnceCell::new(),
        }
    }

    async fn tag_prefix(&self) -> Result<&str, DbError> {
        self.tag_prefix
            .get_or_try_init(|| crate::workflow::deployment_tag_prefix(&self.db))
            .await
            .map(String::as_str)
    }

    /// Hands collections to Celery workers through `publisher` instead of collecting.
    pub fn with_publisher(mut self, publisher: Option<crate::dispatch::Publisher>) -> Self {
        self.publisher = publisher.map(tokio::sync::Mutex::new);
        self
    }

    /// A worker's part of a hand-off (`ccat_workflow_manager.tasks.collect_run`): collects
    /// one run if it still waits for collection.
    pub async fn collect_handed_off(&self, run_id: i64) -> Result<ResultReport, DbError> {
        let mut report = ResultReport::default();
        if let Some(run) = self
            .db
            .collecting_run(run_id, self.options.processing_location_id)
            .await?
        {
            self.collect_one(&run, &mut report).await?;
        }
        Ok(report)
    }

    fn layout(&self, job: &ActiveJob) -> RunLayout {
        RunLayout::new(
            &self.options.pipeline_base_dir,
            &job.pipeline_name,
            &job.sub_group_key,
            &job.step_name,
            job.id,
            job.retry_count + 1,
        )
    }

    fn job_ref(&self, job: &ActiveJob) -> JobRef {
        JobRef {
            job_id: job.hpc_job_id.clone(),
            attempt_dir: self.layout(job).attempt_dir(),
        }
    }

    /// One cycle: cancellations, the status of every active job, then collection.
    pub async fn cycle(&self, now: DateTime<Utc>) -> Result<ResultReport, DbError> {
        let mut report = ResultReport::default();
        self.track(&mut report, now).await?;
        match &self.publisher {
            None => self.collect(&mut report).await?,
            Some(publisher) => {
                let again = self
                    .db
                    .redispatch_stale_collections(
                        self.options.processing_location_id,
                        now - self.options.handoff_timeout,
                        now,
                        |run_id| {
                            crate::dispatch::collect_run(
                                run_id,
                                self.options.processing_location_id,
                            )
                        },
                    )
                    .await?;
                if !again.is_empty() {
                    tracing::warn!(runs = ?again, "collections not done in time handed off again");
                }
                report.dispatch = Some(publisher.lock().await.publish_pending(&self.db).await?);
            }
        }
        Ok(report)
    }

    /// Registers the outputs of every run whose job succeeded.
    async fn collect(&self, report: &mut ResultReport) -> Result<(), DbError> {
        for run in self
            .db
            .collecting_runs(self.options.processing_location_id)
            .await?
        {
            // One run that cannot be registered must not hold up the others' collection.
            if let Err(e) = self.collect_one(&run, report).await {
                tracing::error!(run_id = run.id, error = %e, "outputs not registered; trying again next cycle");
                report.errors.push(format!("run {}: {e}", run.id));
            }
        }
        Ok(())
    }

    /// Registers one run's outputs.
    async fn collect_one(
        &self,
        run: &crate::db::runs::CollectRun,
        report: &mut ResultReport,
    ) -> Result<(), DbError> {
        let location = run.processing_location_id;
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let layout = RunLayout::new(
            &self.options.pipeline_base_dir,
            &run.pipeline_name,
            &run.sub_group_key,
            &run.step_name,
            run.id,
            run.retry_count + 1,
        );
        // Checksumming terabytes takes a while: the run is marked alive meanwhile, so its
        // hand-off is not given to a second worker (`redispatch_stale_collections`).
        let every = (self.options.handoff_timeout / 3)
            .to_std()
            .unwrap_or_default()
            .max(std::time::Duration::from_millis(50));
        let (collected, mut problems) = while_renewing(&self.db, run.id, every, async {
            let (found, problems) = collect::discover(&layout, run.is_final);
            (collect::checksum_all(found, parallelism).await, problems)
        })
        .await;
        problems.extend(collected.problems);
        for problem in &problems {
            tracing::warn!(run_id = run.id, %problem, "output not collected as it is");
        }
        let note = (!problems.is_empty()).then(|| {
            format!(
                "collected with {} problem(s): {}",
                problems.len(),
                problems.join("; ")
            )
        });
        if collected.products.is_empty() && run.is_final && !run.allow_empty_output {
            // The software exited 0 but left no product: its contract was not met.
            let reason = format!(
                "the final step registered no product{}",
                note.as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
            tracing::warn!(run_id = run.id, %reason, "run failed at collection");
            let tail = crate::backend::read_tail(
                &layout.attempt_dir().join(crate::backend::JOB_LOG),
                LOG_TAIL_BYTES,
            );
            let metrics = RunMetrics {
                exit_code: run.exit_code,
                wall_time_seconds: run.wall_time_seconds,
                cpu_hours: run.cpu_hours,
                peak_memory_gb: run.peak_memory_gb,
            };
            let status = self
                .db
                .fail_run(
                    run.id,
                    "COLLECTING_RESULTS",
                    None,
                    &reason,
                    &metrics,
                    tail.as_deref(),
                    self.options.retry_backoff,
                    Utc::now(),
                )
                .await?;
            count_failure(report, &run.pipeline_name, status);
            return Ok(());
        }
        let products: Vec<NewProduct<'_>> = collected
            .products
            .iter()
            .map(|p| NewProduct {
                name: &p.name,
                product_type: p.product_type,
                relative_path: &p.relative_path,
                full_path: &p.full_path,
                size_bytes: p.size_bytes,
                checksum: &p.checksum,
                quality_metrics: p.quality_metrics.as_ref(),
            })
            .collect();
        if self
            .db
            .register_outputs(run.id, location, &products, note.as_deref(), Utc::now())
            .await?
        {
            tracing::info!(run_id = run.id, products = products.len(), "run completed");
            crate::metrics::count_runs(crate::metrics::RUNS_COMPLETED, &run.pipeline_name, 1);
            report.completed += 1;
            report.products += products.len();
        }
        Ok(())
    }

    /// Cancellations, then the status of every active job.
    async fn track(&self, report: &mut ResultReport, now: DateTime<Utc>) -> Result<(), DbError> {
        for job in self
            .db
            .cancelled_jobs(self.backend.name(), self.options.processing_location_id)
            .await?
        {
            let mut job_ref = self.job_ref(&job);
            if job_ref.job_id.is_empty() {
                // Cancelled after its submission was intended but before a job id was
                // recorded: the submitter may have died right after submitting.
                let tag =
                    crate::workflow::job_tag(self.tag_prefix().await?, job.id, job.retry_count + 1);
                match self.backend.find(&tag, &job_ref.attempt_dir).await {
                    Ok(Some(job_id)) => job_ref.job_id = job_id,
                    Ok(None) => {
                        self.db.mark_cancel_done(job.id, now).await?;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(run_id = job.id, %tag, error = %e,
                            "looking for the job of a cancelled run failed");
                        report.errors.push(format!("run {}: {e}", job.id));
                        continue;
                    }
                }
            }
            // Best effort: a job that already ended cannot be cancelled, which is fine.
            if let Err(e) = self.backend.cancel(&job_ref).await {
                tracing::warn!(run_id = job.id, job_id = %job_ref.job_id, error = %e,
                    "cancelling the job of a cancelled run failed");
            } else {
                tracing::info!(run_id = job.id, job_id = %job_ref.job_id, "job cancelled");
            }
            self.db.mark_cancel_done(job.id, now).await?;
            report.cancelled += 1;
        }

        let jobs = self
            .db
            .active_jobs(self.backend.name(), self.options.processing_location_id)
            .await?;
        report.polled = jobs.len();
        if jobs.is_empty() {
            return Ok(());
        }
        let refs: Vec<JobRef> = jobs.iter().map(|j| self.job_ref(j)).collect();
        let states = match self.backend.status(&refs).await {
            Ok(states) => states,
            // The controller may be back next cycle; nothing is decided without it.
            Err(e) => {
                tracing::error!(backend = self.backend.name(), error = %e, "job status query failed");
                report.errors.push(e.to_string());
                return Ok(());
            }
        };
        for (job, job_ref) in jobs.iter().zip(&refs) {
            let state = states
                .get(&job.hpc_job_id)
                .cloned()
                .unwrap_or(JobState::Vanished);
            let fail = |reason: String, metrics: RunMetrics| async move {
                let tail = self.backend.log_tail(job_ref, LOG_TAIL_BYTES);
                // What the attempt wrote is no product: it goes beside the attempt's log,
                // so the output directory holds only registered products.
                let out = self.layout(job).step_output(job.is_final);
                let kept = job_ref.attempt_dir.join("left-output");
                if let Err(e) =
                    crate::workflow::outputs::move_leftovers(&self.layout(job).root, &out, &kept)
                {
                    tracing::warn!(run_id = job.id, error = %e, "a failed attempt's output not moved");
                }
                tracing::warn!(run_id = job.id, job_id = %job.hpc_job_id, %reason, "job failed");
                self.db
                    .fail_run(
                        job.id,
                        &job.status,
                        None,
                        &reason,
                        &metrics,
                        tail.as_deref(),
                        self.options.retry_backoff,
                        now,
                    )
                    .await
            };
            match state {
                JobState::Queued => {}
                JobState::Running => {
                    if job.status == "SUBMITTED" && self.db.mark_running(job.id, now).await? {
                        report.started += 1;
                    }
                }
                JobState::Succeeded(m) => {
                    if self
                        .db
                        .mark_job_succeeded(
                            job.id,
                            &metrics(&m),
                            self.publisher
                                .is_some()
                                .then(|| {
                                    crate::dispatch::collect_run(
                                        job.id,
                                        self.options.processing_location_id,
                                    )
                                })
                                .as_ref(),
                            now,
                        )
                        .await?
                    {
                        tracing::info!(run_id = job.id, job_id = %job.hpc_job_id, "job succeeded");
                        report.succeeded += 1;
                    }
                }
                JobState::Failed { reason, metrics: m } => {
                    count_failure(report, &job.pipeline_name, fail(reason, metrics(&m)).await?);
                }
                JobState::Cancelled => {
                    let reason = "the job was cancelled on the backend".to_owned();
                    count_failure(
                        report,
                        &job.pipeline_name,
                        fail(reason, RunMetrics::default()).await?,
                    );
                }
                JobState::Vanished => {
                    let recent = job
                        .submitted_at
                        .is_some_and(|t| now - t < self.options.vanish_grace);
                    if !recent {
                        let reason = format!(
                            "job {} vanished from {} without a record of how it ended",
                            job.hpc_job_id,
                            self.backend.name()
                        );
                        count_failure(
                            report,
                            &job.pipeline_name,
                            fail(reason, RunMetrics::default()).await?,
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs `work` (a run's collection) while marking the run alive every `every`, from the
/// start: a collection that outlasts the hand-off timeout is not handed off again.
pub async fn while_renewing<T>(
    db: &Database,
    run_id: i64,
    every: std::time::Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    // The first renewal after `every`: a short collection costs no write at all.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => {
                if let Err(e) = db.renew_collection(run_id, Utc::now()).await {
                    tracing::warn!(run_id, error = %e, "a collection's lease not renewed");
                }
            }
        }
    }
}

fn metrics(m: &crate::backend::JobMetrics) -> RunMetrics {
    RunMetrics {
        exit_code: m.exit_code,
        wall_time_seconds: m.wall_time_seconds,
        cpu_hours: m.cpu_hours,
        peak_memory_gb: m.peak_memory_gb,
    }
}

fn count_failure(report: &mut ResultReport, pipeline: &str, status: Option<String>) {
    if status.is_some() {
        crate::metrics::count_runs(crate::metrics::RUNS_FAILED, pipeline, 1);
    }
    match status.as_deref() {
        Some("PENDING") => {
            report.failed += 1;
            report.retried += 1;
        }
        Some(_) => report.failed += 1,
        None => {}
    }
}

//! The result-manager (SPEC §7): follows the jobs of one backend with one batched status
//! query per cycle and moves their runs on — SUBMITTED → RUNNING → COLLECTING_RESULTS, or
//! FAILED with the reason and the tail of the job's log (and back to PENDING while
//! retries are left) — and stops the jobs of runs an operator cancelled.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::backend::{Backend, JobRef, JobState};
use crate::config::Settings;
use crate::db::runs::{ActiveJob, RunMetrics};
use crate::db::{Database, DbError};
use crate::workflow::layout::RunLayout;

/// Bytes of a failed job's log kept on its run.
pub const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Debug, Clone)]
pub struct ResultOptions {
    pub pipeline_base_dir: PathBuf,
    pub retry_backoff: chrono::Duration,
    /// A job the backend does not know is failed only once it was submitted this long
    /// ago (the controller may not list a job submitted a moment before).
    pub vanish_grace: chrono::Duration,
}

impl ResultOptions {
    pub fn from_settings(settings: &Settings) -> Self {
        ResultOptions {
            pipeline_base_dir: settings.pipeline_base_dir.clone(),
            retry_backoff: crate::workflow::seconds(settings.workflow.retry_backoff_seconds),
            vanish_grace: chrono::Duration::seconds(30),
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
    pub errors: Vec<String>,
}

impl ResultReport {
    pub fn handled(&self) -> u64 {
        (self.started + self.succeeded + self.failed + self.cancelled) as u64
    }
}

pub struct ResultManager<B> {
    db: Database,
    backend: B,
    options: ResultOptions,
}

impl<B: Backend> ResultManager<B> {
    pub fn new(db: Database, backend: B, options: ResultOptions) -> Self {
        ResultManager {
            db,
            backend,
            options,
        }
    }

    fn job_ref(&self, job: &ActiveJob) -> JobRef {
        let layout = RunLayout::new(
            &self.options.pipeline_base_dir,
            &job.pipeline_name,
            &job.sub_group_key,
            &job.step_name,
            job.retry_count + 1,
        );
        JobRef {
            job_id: job.hpc_job_id.clone(),
            attempt_dir: layout.attempt_dir(),
        }
    }

    /// One cycle: cancellations, then the status of every active job.
    pub async fn cycle(&self, now: DateTime<Utc>) -> Result<ResultReport, DbError> {
        let mut report = ResultReport::default();
        for job in self.db.cancelled_jobs(self.backend.name()).await? {
            let job_ref = self.job_ref(&job);
            // Best effort: a job that already ended cannot be cancelled, which is fine.
            if let Err(e) = self.backend.cancel(&job_ref).await {
                tracing::warn!(run_id = job.id, job_id = %job.hpc_job_id, error = %e,
                    "cancelling the job of a cancelled run failed");
            } else {
                tracing::info!(run_id = job.id, job_id = %job.hpc_job_id, "job cancelled");
            }
            self.db.mark_cancel_done(job.id, now).await?;
            report.cancelled += 1;
        }

        let jobs = self.db.active_jobs(self.backend.name()).await?;
        report.polled = jobs.len();
        if jobs.is_empty() {
            return Ok(report);
        }
        let refs: Vec<JobRef> = jobs.iter().map(|j| self.job_ref(j)).collect();
        let states = match self.backend.status(&refs).await {
            Ok(states) => states,
            // The controller may be back next cycle; nothing is decided without it.
            Err(e) => {
                tracing::error!(backend = self.backend.name(), error = %e, "job status query failed");
                report.errors.push(e.to_string());
                return Ok(report);
            }
        };
        for (job, job_ref) in jobs.iter().zip(&refs) {
            let state = states
                .get(&job.hpc_job_id)
                .cloned()
                .unwrap_or(JobState::Vanished);
            let fail = |reason: String, metrics: RunMetrics| async move {
                let tail = self.backend.log_tail(job_ref, LOG_TAIL_BYTES);
                tracing::warn!(run_id = job.id, job_id = %job.hpc_job_id, %reason, "job failed");
                self.db
                    .fail_run(
                        job.id,
                        &job.status,
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
                        .mark_job_succeeded(job.id, &metrics(&m), now)
                        .await?
                    {
                        tracing::info!(run_id = job.id, job_id = %job.hpc_job_id, "job succeeded");
                        report.succeeded += 1;
                    }
                }
                JobState::Failed { reason, metrics: m } => {
                    count_failure(&mut report, fail(reason, metrics(&m)).await?);
                }
                JobState::Cancelled => {
                    let reason = "the job was cancelled on the backend".to_owned();
                    count_failure(&mut report, fail(reason, RunMetrics::default()).await?);
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
                        count_failure(&mut report, fail(reason, RunMetrics::default()).await?);
                    }
                }
            }
        }
        Ok(report)
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

fn count_failure(report: &mut ResultReport, status: Option<String>) {
    match status.as_deref() {
        Some("PENDING") => {
            report.failed += 1;
            report.retried += 1;
        }
        Some(_) => report.failed += 1,
        None => {}
    }
}

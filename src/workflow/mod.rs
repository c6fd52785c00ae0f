//! The workflow-manager (SPEC §6): claims PENDING runs, stages their inputs, lays out
//! their directories and manifest, builds their command and submits them to the backend.
//!
//! A cycle: find leases of dead instances, claim what the limits allow, then move each
//! run this instance holds one step on. A run that cannot go on (an input missing for
//! good, a failed staging job, a rejected submission) fails with the reason; the others
//! are not held up by it.

pub mod command;
pub mod layout;
pub mod outputs;
mod plan;

use plan::{confined, run_layout};

pub use plan::{
    JobPlan, deployment_tag_prefix, job_tag, plan_job, prepare, preview_job, tag_prefix,
};

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::Instrument;

use crate::backend::{AttemptIdentity, Backend, JobRef, JobSpec};
use crate::config::{Settings, StagingMode};
use crate::db::runs::{ClaimLimits, ProductInput, RawInput, RunMetrics, RunWork};
use crate::db::{Database, DbError};
use crate::metrics;
use command::{BoundInput, CommandRequest, ContainerRuntime};
use layout::{Manifest, ManifestInput, ManifestProduct, RunLayout};

/// What the workflow-manager needs to know, from [`Settings`].
#[derive(Debug, Clone)]
pub struct WorkflowOptions {
    pub processing_location_id: i64,
    pub pipeline_base_dir: PathBuf,
    pub sif_cache_dir: PathBuf,
    pub runtime: ContainerRuntime,
    pub apptainer: String,
    pub staging_mode: StagingMode,
    pub claim_batch_size: i64,
    pub max_active_jobs: i64,
    pub lease: chrono::Duration,
    pub retry_backoff: chrono::Duration,
}

impl WorkflowOptions {
    pub fn from_settings(settings: &Settings) -> Self {
        let w = &settings.workflow;
        WorkflowOptions {
            processing_location_id: settings.processing_location_id,
            pipeline_base_dir: settings.pipeline_base_dir.clone(),
            sif_cache_dir: settings.sif_cache_dir.clone(),
            runtime: w.container_runtime,
            apptainer: w.apptainer.clone(),
            staging_mode: w.staging_mode,
            claim_batch_size: w.claim_batch_size,
            max_active_jobs: w.max_active_jobs,
            lease: seconds(w.lease_seconds),
            retry_backoff: seconds(w.retry_backoff_seconds),
        }
    }
}

pub(crate) fn seconds(s: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((s * 1000.0) as i64)
}

/// What one cycle did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkflowReport {
    pub claimed: usize,
    /// Runs held in STAGING_DATA this cycle (new claims, earlier ones, taken-over ones).
    pub held: usize,
    pub staging_requested: usize,
    pub waiting_for_staging: usize,
    pub submitted: usize,
    /// Jobs found by their tag after a crash and recorded, not submitted again.
    pub adopted: usize,
    /// Jobs submitted while the lease was lost (cancelled or taken over meanwhile) and
    /// therefore cancelled at once.
    pub fenced: usize,
    pub failed: usize,
    /// Handed to Celery workers for submission (`DISPATCH_MODE=celery`).
    pub dispatched: usize,
    /// The publishing of recorded hand-offs, in celery mode.
    pub dispatch: Option<crate::dispatch::PublishReport>,
    /// Problems that did not fail a run (the database, a lease lost): retried next cycle.
    pub errors: Vec<String>,
}

impl WorkflowReport {
    pub fn handled(&self) -> u64 {
        (self.claimed + self.submitted + self.dispatched + self.adopted + self.failed) as u64
    }
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// The run fails with this reason (retried per its `max_retries`).
    #[error("{0}")]
    Fail(String),
    /// Not the run's fault and maybe not final (the backend did not answer): the run
    /// stays as it is and the next cycle tries again.
    #[error("{0}")]
    Transient(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

enum Outcome {
    StagingRequested,
    WaitingForStaging,
    Submitted,
    /// Inputs ready; handed to a Celery worker to submit.
    Dispatched,
    Adopted,
    LeaseLost,
    /// Submitted, but the lease was lost meanwhile (a cancel, a takeover): the job was
    /// cancelled at once.
    Fenced,
}

/// How long the lease is extended when a submission is about to be made: longer than
/// [`SUBMIT_TIMEOUT`], so no other instance takes the run over while the backend is
/// called.
const SUBMIT_WINDOW: chrono::Duration = chrono::Duration::seconds(300);
/// The longest a submission is waited for (SLURM's own command timeout is 120 s).
const SUBMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(240);

/// This attempt's identity: the one its directory records for `tag`, or a new one. A
/// directory that records another tag (another incarnation of the database, the same
/// path) or none at all is set aside first, so that no record in it (a pid, an exit
/// status, a log) is ever read as this attempt's.
fn attempt_identity(attempt_dir: &Path, tag: &str) -> std::io::Result<AttemptIdentity> {
    if let Some(identity) = AttemptIdentity::read_for(tag, attempt_dir) {
        return Ok(identity);
    }
    if attempt_dir.exists() {
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.f");
        let name = attempt_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside = attempt_dir.with_file_name(format!("{name}.foreign-{stamp}"));
        std::fs::rename(attempt_dir, &aside).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("setting {} aside: {e}", attempt_dir.display()),
            )
        })?;
        tracing::warn!(from = %attempt_dir.display(), to = %aside.display(),
            "an attempt directory not made for this job set aside");
    }
    Ok(AttemptIdentity::new(tag))
}

/// One workflow-manager instance.
pub struct WorkflowManager<B> {
    db: Database,
    backend: B,
    options: WorkflowOptions,
    /// `host:pid:nonce`: unique per process, so a restart never mistakes itself for
    /// the instance that held a lease before.
    owner: String,
    /// Starts every job tag: carries the deployment id (read once from the database), so
    /// deployments sharing a cluster, or a database re-created under the same name, never
    /// mistake each other's jobs for their own.
    tag_prefix: tokio::sync::OnceCell<String>,
    /// Set in celery mode: submissions are handed to workers and published by this.
    publisher: Option<tokio::sync::Mutex<crate::dispatch::Publisher>>,
}

impl<B: Backend> WorkflowManager<B> {
    pub fn new(db: Database, backend: B, options: WorkflowOptions) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        WorkflowManager {
            db,
            backend,
            options,
            owner: owner_name(&host, &nonce[..8]),
            tag_prefix: tokio::sync::OnceCell::new(),
            publisher: None,
        }
    }

    /// An instance whose lease owner is the same for every instance this process makes
    /// (one-cycle calls from Python): each call continues what the previous one held.
    pub fn for_process(db: Database, backend: B, options: WorkflowOptions) -> Self {
        static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let mut manager = Self::new(db, backend, options);
        let nonce = NONCE.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        // The pid is read now: a forked child gets an owner of its own.
        manager.owner = owner_name(&host, nonce);
        manager
    }

    /// Hands submissions to Celery workers through `publisher` instead of submitting.
    pub fn with_publisher(mut self, publisher: Option<crate::dispatch::Publisher>) -> Self {
        self.publisher = publisher.map(tokio::sync::Mutex::new);
        self
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The tag of a run's attempt, as its job carries it.
    pub async fn job_tag(&self, run_id: i64, attempt: i32) -> Result<String, DbError> {
        Ok(job_tag(self.tag_prefix().await?, run_id, attempt))
    }

    async fn tag_prefix(&self) -> Result<&str, DbError> {
        self.tag_prefix
            .get_or_try_init(|| deployment_tag_prefix(&self.db))
            .await
            .map(String::as_str)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// One cycle. Errors are the database's; everything about single runs is reported.
    pub async fn cycle(&self, now: DateTime<Utc>) -> Result<WorkflowReport, DbError> {
        let mut report = WorkflowReport::default();
        let lease_until = now + self.options.lease;
        let dead = self.dead_owners().await?;
        if !dead.is_empty() {
            tracing::warn!(owners = ?dead, "taking over runs of dead workflow-manager instances");
        }
        let claimed = self
            .db
            .claim_runs(
                &self.owner,
                lease_until,
                now,
                &ClaimLimits {
                    processing_location_id: self.options.processing_location_id,
                    backend: self.backend.name(),
                    batch: self.options.claim_batch_size,
                    max_active_jobs: self.options.max_active_jobs,
                },
            )
            .await?;
        report.claimed = claimed.len();
        let runs = self
            .db
            .hold_staging_runs(&self.owner, &dead, lease_until, now)
            .await?;
        report.held = runs.len();
        for run in runs.iter().filter(|r| claimed.contains(&r.id)) {
            metrics::count_runs(metrics::RUNS_CLAIMED, &run.pipeline_name, 1);
        }
        for run in &runs {
            self.handle(run, now, &mut report).await?;
        }
        if let Some(publisher) = &self.publisher {
            report.dispatch = Some(publisher.lock().await.publish_pending(&self.db).await?);
        }
        Ok(report)
    }

    /// A worker's part of a hand-off (`ccat_workflow_manager.tasks.submit_run`): takes the
    /// run handed to it and submits it. Returns the cycle-style report of that one run.
    pub async fn submit_handed_off(
        &self,
        run_id: i64,
        now: DateTime<Utc>,
    ) -> Result<WorkflowReport, DbError> {
        let mut report = WorkflowReport::default();
        if !self
            .db
            .take_dispatched_run(
                run_id,
                self.options.processing_location_id,
                &self.owner,
                now + self.options.lease,
                now,
            )
            .await?
        {
            // Submitted already, cancelled, or held by a live instance: nothing to do.
            return Ok(report);
        }
        if let Some(run) = self.db.run_work(run_id).await? {
            report.held = 1;
            self.handle(&run, now, &mut report).await?;
        }
        Ok(report)
    }

    /// Moves one held run on and counts the outcome.
    async fn handle(
        &self,
        run: &RunWork,
        now: DateTime<Utc>,
        report: &mut WorkflowReport,
    ) -> Result<(), DbError> {
        let span = tracing::info_span!("run", run_id = run.id, pipeline = %run.pipeline_name,
            step = %run.step_name, sub_group = %run.sub_group_key, attempt = run.attempt());
        match self.advance(run, now).instrument(span).await {
            Ok(Outcome::StagingRequested) => report.staging_requested += 1,
            Ok(Outcome::WaitingForStaging) => report.waiting_for_staging += 1,
            Ok(Outcome::Submitted) => {
                metrics::count_runs(metrics::RUNS_SUBMITTED, &run.pipeline_name, 1);
                report.submitted += 1;
            }
            Ok(Outcome::Dispatched) => report.dispatched += 1,
            Ok(Outcome::Adopted) => report.adopted += 1,
            Ok(Outcome::LeaseLost) => {
                report
                    .errors
                    .push(format!("run {}: lease lost to another instance", run.id));
            }
            Ok(Outcome::Fenced) => {
                report.fenced += 1;
                report.errors.push(format!(
                    "run {}: its lease was lost during the submission; the job was cancelled",
                    run.id
                ));
            }
            Err(RunError::Fail(reason)) => {
                tracing::warn!(%reason, "run failed before its job started");
                let status = self
                    .db
                    .fail_run(
                        run.id,
                        "STAGING_DATA",
                        Some(&self.owner),
                        &reason,
                        &RunMetrics::default(),
                        None,
                        self.options.retry_backoff,
                        Utc::now(),
                    )
                    .await?;
                if status.is_some() {
                    metrics::count_runs(metrics::RUNS_FAILED, &run.pipeline_name, 1);
                    report.failed += 1;
                }
            }
            Err(RunError::Db(e)) => {
                tracing::error!(error = %e, "run not advanced");
                report.errors.push(format!("run {}: {e}", run.id));
            }
            Err(RunError::Transient(reason)) => {
                tracing::warn!(%reason, "run not advanced; trying again next cycle");
                report.errors.push(format!("run {}: {reason}", run.id));
            }
        }
        Ok(())
    }

    /// Empties the step's output directory for this attempt (see [`outputs`]): earlier
    /// runs' products to `superseded/`, their copies re-pointed one by one after each
    /// move; what else is there to this attempt's `previous-output/`.
    async fn clear_output(&self, run: &RunWork, layout: &RunLayout) -> Result<(), RunError> {
        let out = layout.step_output(run.is_final);
        let aside = layout.attempt_dir().join("previous-output");
        // A link planted above or at the output directory is set aside first: neither
        // products nor leftovers are ever moved through it.
        if outputs::set_aside_link(&layout.root, &out, &aside).map_err(|e| {
            RunError::Transient(format!("setting aside a link in the output path: {e}"))
        })? {
            tracing::warn!("a symbolic link in the output directory's path set aside");
        }
        let copies = self
            .db
            .earlier_product_copies(run.id, run.processing_location_id)
            .await?;
        for copy in copies {
            let from = PathBuf::from(&copy.full_path);
            if !from.starts_with(&out) {
                continue;
            }
            let to = layout.superseded(copy.run_id, &copy.relative_path);
            match outputs::move_product(&from, &to) {
                Ok(true) => {
                    self.db
                        .move_product_copy(copy.copy_id, &to.to_string_lossy())
                        .await?;
                    tracing::info!(product_of_run = copy.run_id, to = %to.display(),
                        "earlier run's product set aside");
                }
                Ok(false) => tracing::warn!(product_of_run = copy.run_id, path = %from.display(),
                    "a registered product's file is missing"),
                Err(e) => {
                    return Err(RunError::Transient(format!(
                        "setting aside run {}'s product: {e}",
                        copy.run_id
                    )));
                }
            }
        }
        let moved = outputs::move_leftovers(&layout.root, &out, &aside)
            .map_err(|e| RunError::Transient(format!("clearing the output directory: {e}")))?;
        if moved > 0 {
            tracing::warn!(
                entries = moved,
                "unregistered output of an earlier attempt moved to previous-output"
            );
        }
        Ok(())
    }

    /// Lease owners on this host and in this PID namespace whose process is gone: their
    /// runs are taken over at once rather than when the lease expires. Containers that
    /// share a host name but not a PID namespace never judge each other's pids.
    async fn dead_owners(&self) -> Result<Vec<String>, DbError> {
        let Some(me) = OwnerName::parse(&self.owner) else {
            return Ok(Vec::new());
        };
        Ok(self
            .db
            .lease_owners(&self.owner)
            .await?
            .into_iter()
            .filter(|owner| {
                OwnerName::parse(owner).is_some_and(|o| {
                    o.host == me.host
                        && o.pid_namespace == me.pid_namespace
                        && o.pid
                            .parse::<u32>()
                            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
                })
            })
            .collect())
    }

    async fn advance(&self, run: &RunWork, now: DateTime<Utc>) -> Result<Outcome, RunError> {
        let layout = run_layout(&self.options.pipeline_base_dir, run);
        let tag = job_tag(self.tag_prefix().await?, run.id, run.attempt());
        let attempt_dir = layout.attempt_dir();
        // An earlier holder recorded its intent and may have submitted before it died:
        // the backend is asked before anything is submitted again. The attempt's
        // directory (per run and attempt, made just before the intent is recorded) is
        // asked about too, so a submission is found even if the database lost the
        // intent's commit in a crash. The backend adopts only a job whose identity
        // matches the one recorded in that directory.
        if run.submitted_at.is_some() || attempt_dir.exists() {
            let found =
                self.backend.find(&tag, &attempt_dir).await.map_err(|e| {
                    RunError::Transient(format!("looking for job {tag} failed: {e}"))
                })?;
            if let Some(job_id) = found {
                tracing::warn!(%job_id, %tag, "adopting a job submitted before a crash");
                return Ok(
                    if self
                        .db
                        .record_submitted(run.id, &self.owner, &job_id, now)
                        .await?
                    {
                        Outcome::Adopted
                    } else {
                        Outcome::LeaseLost
                    },
                );
            }
        }
        let location = run.processing_location_id;
        let raw = self.db.run_raw_input_copies(run.id, location).await?;
        if let Some(waiting) = self.stage(run, &raw).await? {
            return Ok(waiting);
        }
        if self.publisher.is_some() {
            let handoff = crate::dispatch::submit_run(run.id, location);
            let lease_until = now + self.options.lease;
            return Ok(
                if self
                    .db
                    .dispatch_submission(run.id, &self.owner, &handoff, lease_until, now)
                    .await?
                {
                    tracing::info!(task_id = %handoff.task_id, "submission handed to a worker");
                    Outcome::Dispatched
                } else {
                    Outcome::LeaseLost
                },
            );
        }
        let identity = attempt_identity(&attempt_dir, &tag)
            .map_err(|e| RunError::Transient(format!("the attempt directory: {e}")))?;
        let products = self.db.run_product_input_copies(run.id, location).await?;
        let plan = plan_job(&self.options, &identity, run, &raw, &products, now)
            .map_err(RunError::Fail)?;
        self.clear_output(run, &plan.layout).await?;
        prepare(&plan.layout, run.is_final, &plan.inputs, &plan.manifest)
            .map_err(|e| RunError::Fail(format!("preparing the run directory: {e}")))?;
        identity
            .write(&attempt_dir)
            .map_err(|e| RunError::Fail(format!("recording the attempt's identity: {e}")))?;
        let spec = plan.spec;
        // The fence: the intent is recorded only while this instance's lease is still
        // valid, and extends it over the longest a submission may take, so no other
        // instance takes the run over while the backend is being called.
        if !self
            .db
            .record_submit_intent(run.id, &self.owner, SUBMIT_WINDOW, now)
            .await?
        {
            return Ok(Outcome::LeaseLost);
        }
        let submitted = tokio::time::timeout(SUBMIT_TIMEOUT, self.backend.submit(&spec))
            .await
            .unwrap_or_else(|_| {
                Err(crate::backend::BackendError::Timeout {
                    command: format!("submitting to {}", self.backend.name()),
                    seconds: SUBMIT_TIMEOUT.as_secs(),
                })
            });
        let job_id = submitted.map_err(|e| {
            let reason = format!("submission to {} failed: {e}", self.backend.name());
            // With the intent recorded, an unclear outcome is settled next cycle by
            // looking the job up by its tag.
            if e.is_refusal() {
                RunError::Fail(reason)
            } else {
                RunError::Transient(reason)
            }
        })?;
        tracing::info!(%job_id, %tag, backend = self.backend.name(), "job submitted");
        if self
            .db
            .record_submitted(run.id, &self.owner, &job_id, Utc::now())
            .await?
        {
            return Ok(Outcome::Submitted);
        }
        // The run was cancelled, or taken over, while the backend was called: the job
        // must not run on unseen. Unless the run records this very job (adopted by the
        // instance that took it over), it is cancelled now.
        let job = JobRef {
            job_id: job_id.clone(),
            attempt_dir,
        };
        if self.db.run_job_id(run.id).await?.as_deref() == Some(job_id.as_str()) {
            return Ok(Outcome::LeaseLost);
        }
        metrics::count_fenced_job();
        match self.backend.cancel(&job).await {
            Ok(()) => {
                tracing::warn!(%job_id, %tag, "job submitted under a lost lease cancelled");
                Ok(Outcome::Fenced)
            }
            Err(e) => Err(RunError::Transient(format!(
                "job {job_id} was submitted under a lost lease and could not be cancelled: {e}"
            ))),
        }
    }

    /// Makes sure every raw input is where the job can read it. `Some` while the run
    /// waits for data-transfer; `None` when all inputs are present.
    async fn stage(&self, run: &RunWork, raw: &[RawInput]) -> Result<Option<Outcome>, RunError> {
        let location = run.processing_location_id;
        for package in raw {
            confined(package).map_err(RunError::Fail)?;
        }
        match self.options.staging_mode {
            StagingMode::Local => {
                for package in raw {
                    let readable = package
                        .full_path
                        .as_deref()
                        .is_some_and(|p| Path::new(p).is_file());
                    if !readable {
                        return Err(RunError::Fail(format!(
                            "raw data package {} ({}) has no copy readable on this host{}",
                            package.name,
                            package.raw_data_package_id,
                            package
                                .full_path
                                .as_deref()
                                .map(|p| format!(" (looked at {p})"))
                                .unwrap_or_default()
                        )));
                    }
                }
                Ok(None)
            }
            StagingMode::DataTransfer => {
                let missing: Vec<&RawInput> = raw
                    .iter()
                    .filter(|p| p.data_location_id != Some(location) || p.full_path.is_none())
                    .collect();
                if missing.is_empty() {
                    return Ok(None);
                }
                let names = || {
                    missing
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                match self.db.staging_job_of_run(run.id).await? {
                    None => {
                        let ids: Vec<i64> = missing.iter().map(|p| p.raw_data_package_id).collect();
                        let job = self.db.create_staging_job(run.id, location, &ids).await?;
                        tracing::info!(
                            staging_job = job,
                            packages = ids.len(),
                            "staging requested"
                        );
                        Ok(Some(Outcome::StagingRequested))
                    }
                    Some(job) => match job.status.as_str() {
                        "FAILED" => Err(RunError::Fail(format!(
                            "staging job {} failed: {}",
                            job.id,
                            job.failure_error_message
                                .as_deref()
                                .unwrap_or("no reason given")
                        ))),
                        "COMPLETED" => Err(RunError::Fail(format!(
                            "staging job {} completed but these packages have no copy at \
                             processing location {location}: {}",
                            job.id,
                            names()
                        ))),
                        _ => Ok(Some(Outcome::WaitingForStaging)),
                    },
                }
            }
        }
    }
}

/// A lease owner's name, `host:pid-namespace:pid:nonce`: unique per process, and enough
/// to tell, on the same host and in the same PID namespace, that its process is gone.
fn owner_name(host: &str, nonce: &str) -> String {
    format!("{host}:{}:{}:{nonce}", pid_namespace(), std::process::id())
}

/// The inode of this process's PID namespace (`/proc/self/ns/pid` → `pid:[4026531836]`),
/// or 0 where it cannot be read.
fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let text = link.to_string_lossy().into_owned();
            text.trim_start_matches("pid:[")
                .trim_end_matches(']')
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The parts of an [`owner_name`]; None for other holders (a Celery hand-off).
struct OwnerName<'a> {
    host: &'a str,
    pid_namespace: &'a str,
    pid: &'a str,
}

impl<'a> OwnerName<'a> {
    fn parse(owner: &'a str) -> Option<Self> {
        let mut parts = owner.split(':');
        let (host, pid_namespace, pid, _nonce) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (parts.next().is_none() && pid_namespace != "0").then_some(OwnerName {
            host,
            pid_namespace,
            pid,
        })
    }
}

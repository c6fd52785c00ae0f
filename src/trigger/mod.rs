//! The trigger-manager: for each enabled pipeline, find the (step, sub-group) pairs whose
//! current fingerprint has no run yet (gaps) and create PENDING runs for them (SPEC §5).
//!
//! Evaluation is incremental. An [`Evaluator`] keeps, between cycles, each selection's
//! packages split into sub-groups ([`view::View`]) and a change horizon. A cycle asks the
//! database what was written since ([`crate::db::changes`]), brings the views up to date,
//! and evaluates only the sub-groups touched by a change (their own packages or runs, or
//! those of a sub-group upstream), plus the gaps an earlier cycle held back. A cycle in
//! which nothing changed reads a few small tables and nothing else. A pipeline whose
//! definition changed, a CRON or MANUAL pipeline that fires, and every pipeline on the
//! first cycle are evaluated in full.
//!
//! The pure parts (version policy, fingerprints, cron, definitions, views) live in
//! submodules of their own; [`evaluator`] sequences a cycle over the database, keeping
//! the [`selection`]s up to date, [`pass`] evaluates one pipeline and [`step`] one of its
//! steps. One pipeline's error is reported and the others are still evaluated.

mod evaluator;
pub mod fingerprint;
mod pass;
pub mod plan;
mod selection;
mod step;
pub mod view;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::{Database, DbError};

pub use evaluator::{Evaluator, HORIZON_STUCK_CYCLES};

/// How a cycle behaves.
#[derive(Debug, Clone)]
pub struct TriggerOptions {
    pub processing_location_id: i64,
    /// The most runs one pipeline may create in one cycle.
    pub max_new_runs_per_pipeline: usize,
    /// Only report gaps; create nothing and consume no trigger request.
    pub dry_run: bool,
    /// Evaluate only this pipeline (by name).
    pub only_pipeline: Option<String>,
    /// List every gap found in the report, not only those a run was created for.
    pub list_gaps: bool,
}

impl TriggerOptions {
    /// The options a configured manager runs with.
    pub fn from_settings(settings: &crate::config::Settings, dry_run: bool) -> Self {
        TriggerOptions {
            processing_location_id: settings.processing_location_id,
            max_new_runs_per_pipeline: settings.max_new_runs_per_cycle,
            dry_run,
            only_pipeline: None,
            list_gaps: dry_run,
        }
    }
}

/// Why a gap exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The sub-group never had a run.
    New,
    /// It had runs, but with other data, software or configuration.
    Changed,
    /// An operator forced a run.
    Forced,
}

/// One (step, sub-group) to run.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub pipeline: String,
    pub step: String,
    pub sub_group_key: String,
    pub fingerprint: String,
    pub software_version: String,
    pub inputs: usize,
    pub reason: GapReason,
    /// Set when the step's cooldown holds the run back until this time.
    pub cooldown_until: Option<DateTime<Utc>>,
    /// The run created for it (not in a dry run).
    pub run_id: Option<i64>,
}

/// Where a cycle's gaps go as they are found, when not into its report: `ccat-wfm gaps
/// --json` writes each at once, so that a cycle finding hundreds of thousands of gaps
/// never holds them all.
pub trait GapSink: Send {
    fn gap(&mut self, gap: Gap);
    /// A pipeline's evaluation ended (with its gaps, if any, handed over before).
    fn pipeline_done(&mut self, report: &PipelineReport);
}

/// How much of a pipeline a cycle looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The trigger did not fire (CRON not ticked, MANUAL without request).
    #[default]
    Skipped,
    /// Every sub-group.
    Full,
    /// Only the sub-groups touched by a change, and held-back gaps.
    Incremental,
}

/// What one pipeline's evaluation found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineReport {
    pub pipeline: String,
    /// False when the trigger did not fire.
    pub evaluated: bool,
    pub mode: Mode,
    /// (step, sub-group) pairs looked at.
    pub sub_groups_evaluated: usize,
    pub gaps_found: usize,
    /// The gaps runs were created for; every gap found with `list_gaps` (empty when a
    /// [`GapSink`] took them).
    pub gaps: Vec<Gap>,
    pub created: usize,
    /// Gaps found in this cycle and left for a later one by the per-cycle bound.
    pub deferred: usize,
}

/// What a cycle did, over all pipelines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub pipelines: Vec<PipelineReport>,
    /// Pipelines that could not be evaluated, with the reason.
    pub errors: Vec<String>,
    /// Packages re-selected because they (or a row they join) changed.
    pub changed_packages: usize,
    /// Runs written since the last cycle (by any manager).
    pub changed_runs: usize,
    /// Set when the change horizon has not moved for [`HORIZON_STUCK_CYCLES`] cycles
    /// while writes piled up: the transaction that holds it (pid, age, query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub horizon_blocked_by: Option<String>,
}

impl CycleReport {
    pub fn created(&self) -> usize {
        self.pipelines.iter().map(|p| p.created).sum()
    }
}

/// Runs one trigger cycle from a cold start (every pipeline in full). A long-running
/// manager keeps an [`Evaluator`] instead.
pub async fn run_cycle(
    db: &Database,
    options: &TriggerOptions,
    now: DateTime<Utc>,
) -> Result<CycleReport, DbError> {
    Evaluator::default().cycle(db, options, now).await
}

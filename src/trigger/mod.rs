//! The trigger-manager: for each enabled pipeline, find the (step, sub-group) pairs whose
//! current fingerprint has no run yet (gaps) and create PENDING runs for them (SPEC §5).
//!
//! The pure parts (version policy, fingerprints, cron) live in submodules; this module
//! sequences them over the database. One pipeline's error is reported and the others are
//! still evaluated.

pub mod cron;
pub mod fingerprint;
pub mod version;

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::db::filter_sql::Selection;
use crate::db::pipelines::{NewRun, PipelineRow, StepRow, TriggerRequestRow};
use crate::db::{Database, DbError};
use crate::filter::{self, SubGroup};
use fingerprint::{InputRef, SoftwareRef};
use version::{Candidate, VersionPolicy};

/// Why a pipeline could not be evaluated. The message names the pipeline and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("pipeline {pipeline}: {message}")]
    Definition { pipeline: String, message: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

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

/// What one pipeline's evaluation found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineReport {
    pub pipeline: String,
    /// False when the trigger did not fire (CRON not ticked, MANUAL without request).
    pub evaluated: bool,
    pub gaps: Vec<Gap>,
    pub created: usize,
    /// Gaps left for a later cycle by the per-cycle bound.
    pub deferred: usize,
    /// Steps not evaluated, with the reason.
    pub skipped_steps: Vec<String>,
}

/// What a cycle did, over all pipelines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub pipelines: Vec<PipelineReport>,
    /// Pipelines that could not be evaluated, with the reason.
    pub errors: Vec<String>,
}

impl CycleReport {
    pub fn created(&self) -> usize {
        self.pipelines.iter().map(|p| p.created).sum()
    }
}

/// Runs one trigger cycle.
pub async fn run_cycle(
    db: &Database,
    options: &TriggerOptions,
    now: DateTime<Utc>,
) -> Result<CycleReport, DbError> {
    let mut report = CycleReport::default();
    let pipelines = db.enabled_pipelines(options.processing_location_id).await?;
    for pipeline in pipelines {
        if options
            .only_pipeline
            .as_ref()
            .is_some_and(|name| *name != pipeline.name)
        {
            continue;
        }
        match evaluate_pipeline(db, &pipeline, options, now).await {
            Ok(r) => report.pipelines.push(r),
            Err(TriggerError::Db(e)) => return Err(e),
            Err(e) => {
                tracing::warn!(pipeline = %pipeline.name, error = %e, "pipeline skipped");
                report.errors.push(e.to_string());
            }
        }
    }
    Ok(report)
}

/// What a trigger request restricts an evaluation to.
#[derive(Debug, Clone, Copy)]
struct Request<'a> {
    row: &'a TriggerRequestRow,
}

impl Request<'_> {
    fn covers_step(&self, step_id: i64) -> bool {
        self.row.reduction_step_id.is_none_or(|s| s == step_id)
    }
    fn covers_sub_group(&self, key: &str) -> bool {
        self.row.sub_group_key.as_deref().is_none_or(|k| k == key)
    }
}

async fn evaluate_pipeline(
    db: &Database,
    pipeline: &PipelineRow,
    options: &TriggerOptions,
    now: DateTime<Utc>,
) -> Result<PipelineReport, TriggerError> {
    let definition = |message: String| TriggerError::Definition {
        pipeline: pipeline.name.clone(),
        message,
    };
    let mut report = PipelineReport {
        pipeline: pipeline.name.clone(),
        ..Default::default()
    };

    // When does the trigger fire?
    let mut cron_tick = None;
    let requests = db.pending_trigger_requests(pipeline.id).await?;
    let scheduled = match pipeline.trigger_type.as_str() {
        "CONTINUOUS" => true,
        "CRON" => {
            let expression = pipeline
                .trigger_config
                .0
                .get("cron")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    definition(
                        "trigger_config of a CRON pipeline needs a \"cron\" expression".into(),
                    )
                })?;
            let schedule = cron::parse(expression).map_err(definition)?;
            cron_tick = cron::due_tick(&schedule, pipeline.last_cron_tick, now);
            cron_tick.is_some()
        }
        "MANUAL" => false,
        other => return Err(definition(format!("unknown trigger_type {other:?}"))),
    };
    if !scheduled && requests.is_empty() {
        return Ok(report);
    }
    report.evaluated = true;

    let rules = filter::parse_rules(&pipeline.filter_rules.0).map_err(|e| {
        definition(format!(
            "data grouping {}: {e}",
            pipeline.data_grouping_name
        ))
    })?;
    let steps = db.pipeline_steps(pipeline.id).await?;
    let upstream: HashSet<i64> = db
        .step_dependencies(pipeline.id)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();

    // A scheduled evaluation covers everything; requests add forced or targeted runs.
    let mut passes: Vec<Option<Request<'_>>> = Vec::new();
    if scheduled {
        passes.push(None);
    }
    // A scheduled pass already covers what a plain request asks for; forced ones add runs.
    passes.extend(
        requests
            .iter()
            .filter(|row| !scheduled || row.force)
            .map(|row| Some(Request { row })),
    );

    let mut budget = options.max_new_runs_per_pipeline;
    for pass in &passes {
        for step in &steps {
            if pass.is_some_and(|r| !r.covers_step(step.id)) {
                continue;
            }
            if upstream.contains(&step.id) {
                let note = format!("{}: steps with depends_on are not evaluated yet", step.name);
                if !report.skipped_steps.contains(&note) {
                    report.skipped_steps.push(note);
                }
                continue;
            }
            let gaps = step_gaps(db, pipeline, step, &rules, *pass, now)
                .await
                .map_err(|e| match e {
                    TriggerError::Definition { message, .. } => {
                        definition(format!("step {}: {message}", step.name))
                    }
                    other => other,
                })?;
            for (gap, new_run) in gaps {
                let mut gap = gap;
                if gap.cooldown_until.is_none() && !options.dry_run {
                    if budget == 0 {
                        report.deferred += 1;
                        report.gaps.push(gap);
                        continue;
                    }
                    gap.run_id = db.create_run(&new_run, now).await?;
                    if gap.run_id.is_some() {
                        report.created += 1;
                        budget -= 1;
                        tracing::info!(pipeline = %gap.pipeline, step = %gap.step, sub_group = %gap.sub_group_key,
                            run_id = gap.run_id, reason = ?gap.reason, "run created");
                    }
                }
                report.gaps.push(gap);
            }
        }
    }

    if !options.dry_run {
        for row in &requests {
            db.finish_trigger_request(
                row.id,
                false,
                &format!("{} run(s) created in this cycle", report.created),
            )
            .await?;
        }
        db.record_evaluation(pipeline.id, cron_tick, now).await?;
    }
    Ok(report)
}

/// The gaps of one first step (inputs: the raw data packages of each sub-group).
async fn step_gaps(
    db: &Database,
    pipeline: &PipelineRow,
    step: &StepRow,
    rules: &[filter::Rule],
    request: Option<Request<'_>>,
    now: DateTime<Utc>,
) -> Result<Vec<(Gap, NewRun)>, TriggerError> {
    let definition = |message: String| TriggerError::Definition {
        pipeline: pipeline.name.clone(),
        message,
    };
    let dims = filter::parse_group_by(&step.group_by.0).map_err(definition)?;
    let policy = VersionPolicy::from_db(&step.version_policy)
        .ok_or_else(|| definition(format!("unknown version_policy {:?}", step.version_policy)))?;
    let versions = db.software_versions(step.reduction_software_id).await?;
    let candidates: Vec<Candidate> = versions
        .iter()
        .map(|v| Candidate {
            id: v.id,
            version: v.version.clone(),
            deprecated: v.deprecated,
        })
        .collect();
    let chosen = version::resolve(policy, step.reduction_software_version_id, &candidates)
        .map_err(definition)?;
    let software = versions
        .iter()
        .find(|v| v.id == chosen.id)
        .expect("chosen from these versions");
    let config = step
        .parameters
        .as_ref()
        .map_or(Value::Object(Default::default()), |p| p.0.clone());

    let selection = Selection {
        rules,
        instrument_module_id: pipeline.instrument_module_id,
        group_by: &dims,
        only_archived: true,
    };
    let mut groups: BTreeMap<SubGroup, Vec<i64>> = BTreeMap::new();
    for row in db.select_packages(&selection).await? {
        let sub_group = SubGroup {
            values: dims.iter().copied().zip(row.dimensions).collect(),
        };
        groups.entry(sub_group).or_default().push(row.id);
    }

    // Existing fingerprints and the newest creation time per sub-group.
    let mut history: HashMap<String, (HashSet<String>, DateTime<Utc>)> = HashMap::new();
    for stamp in db.step_run_stamps(step.id).await? {
        let entry = history
            .entry(stamp.sub_group_key)
            .or_insert_with(|| (HashSet::new(), stamp.created_at));
        entry.0.insert(stamp.fingerprint);
        entry.1 = entry.1.max(stamp.created_at);
    }

    let forced_by = request.filter(|r| r.row.force).map(|r| r.row.id);
    let software_ref = SoftwareRef {
        version_id: software.id,
        version: &software.version,
        image_ref: &software.image_ref,
        image_digest: software.image_digest.as_deref(),
    };
    let cooldown = chrono::Duration::seconds(i64::from(step.cooldown_seconds.max(0)));
    let mut gaps = Vec::new();
    for (sub_group, packages) in groups {
        let key = sub_group.key();
        if request.is_some_and(|r| !r.covers_sub_group(&key)) {
            continue;
        }
        let inputs: Vec<InputRef> = packages
            .iter()
            .map(|id| InputRef::RawDataPackage(*id))
            .collect();
        let mut fp_config = config.clone();
        if let (Some(id), Value::Object(map)) = (forced_by, &mut fp_config) {
            // A forced run differs from every other run by the request that forced it.
            map.insert("__forced_by_trigger_request".into(), Value::from(id));
        }
        let fp = fingerprint::fingerprint(&inputs, &software_ref, &fp_config);
        let previous = history.get(&key);
        if previous.is_some_and(|(fps, _)| fps.contains(&fp)) {
            continue;
        }
        let reason = match (forced_by, previous) {
            (Some(_), _) => GapReason::Forced,
            (None, None) => GapReason::New,
            (None, Some(_)) => GapReason::Changed,
        };
        let cooldown_until = match (reason, previous) {
            (GapReason::Forced, _) | (_, None) => None,
            (_, Some((_, last))) => Some(*last + cooldown).filter(|until| *until > now),
        };
        let gap = Gap {
            pipeline: pipeline.name.clone(),
            step: step.name.clone(),
            sub_group_key: key.clone(),
            fingerprint: fp.clone(),
            software_version: software.version.clone(),
            inputs: packages.len(),
            reason,
            cooldown_until,
            run_id: None,
        };
        let run = NewRun {
            reduction_step_id: step.id,
            sub_group_key: key,
            sub_group: sub_group.to_json(),
            fingerprint: fp,
            reduction_software_version_id: software.id,
            config_snapshot: config.clone(),
            max_retries: step.max_retries,
            raw_inputs: packages,
        };
        gaps.push((gap, run));
    }
    Ok(gaps)
}

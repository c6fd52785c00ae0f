//! The trigger-manager: for each enabled pipeline, find the (step, sub-group) pairs whose
//! current fingerprint has no run yet (gaps) and create PENDING runs for them (SPEC §5).
//!
//! The pure parts (version policy, fingerprints, cron) live in submodules; this module
//! sequences them over the database. One pipeline's error is reported and the others are
//! still evaluated.

pub mod cron;
pub mod fingerprint;
pub mod version;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::db::filter_sql::Selection;
use crate::db::pipelines::{NewRun, PipelineRow, RunStamp, StepRow, TriggerRequestRow};
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

impl TriggerOptions {
    /// The options a configured manager runs with.
    pub fn from_settings(settings: &crate::config::Settings, dry_run: bool) -> Self {
        TriggerOptions {
            processing_location_id: settings.processing_location_id,
            max_new_runs_per_pipeline: settings.max_new_runs_per_cycle,
            dry_run,
            only_pipeline: None,
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
                // An operator's request for a broken pipeline gets the reason, not silence.
                if !options.dry_run {
                    for request in db.pending_trigger_requests(pipeline.id).await? {
                        db.finish_trigger_request(request.id, true, &e.to_string())
                            .await?;
                    }
                }
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
    let dependencies = db.step_dependencies(pipeline.id).await?;

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

    // Upstream steps of each step, checked to come earlier in step order.
    let mut upstream_of: HashMap<i64, Vec<i64>> = HashMap::new();
    for (step_id, upstream_id) in dependencies {
        upstream_of.entry(step_id).or_default().push(upstream_id);
    }
    for step in &steps {
        for up in upstream_of.get(&step.id).into_iter().flatten() {
            let up_step = steps.iter().find(|s| s.id == *up);
            if up_step.is_none_or(|u| (u.step_order, u.id) >= (step.step_order, step.id)) {
                return Err(definition(format!(
                    "step {} depends on a step that does not come before it in step_order",
                    step.name
                )));
            }
        }
    }

    let mut budget = options.max_new_runs_per_pipeline;
    for pass in &passes {
        let mut states: HashMap<i64, StepState> = HashMap::new();
        for step in &steps {
            let upstream: Vec<&StepState> = upstream_of
                .get(&step.id)
                .into_iter()
                .flatten()
                .map(|id| states.get(id).expect("upstream steps are evaluated first"))
                .collect();
            let (gaps, state) = evaluate_step(db, pipeline, step, &rules, *pass, &upstream, now)
                .await
                .map_err(|e| match e {
                    TriggerError::Definition { message, .. } => {
                        definition(format!("step {}: {message}", step.name))
                    }
                    other => other,
                })?;
            states.insert(step.id, state);
            if pass.is_some_and(|r| !r.covers_step(step.id)) {
                continue;
            }
            for (mut gap, new_run) in gaps {
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

/// Where a sub-group of an evaluated step stands, for the steps downstream of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Its run for the current fingerprint completed.
    Completed { run_id: i64 },
    /// Its run is pending, in flight or will be retried, or not created yet.
    InFlight,
    /// Its run failed with no retry left, or was cancelled: downstream leaves it out.
    FailedForGood,
}

/// One evaluated step, as its downstream steps see it.
#[derive(Debug, Default)]
struct StepState {
    name: String,
    /// The step's sub-group of every selected package.
    key_of_package: HashMap<i64, String>,
    progress: HashMap<String, Progress>,
    /// The products of its completed runs, by run.
    products: HashMap<i64, Vec<i64>>,
}

impl StepState {
    /// The inputs a downstream sub-group made of `packages` gets from this step: its
    /// products, whether to wait, and the upstream sub-groups left out.
    fn inputs_for(
        &self,
        packages: &[i64],
        products: &mut Vec<i64>,
        excluded: &mut Vec<Value>,
    ) -> bool {
        let keys: BTreeSet<&String> = packages
            .iter()
            .filter_map(|p| self.key_of_package.get(p))
            .collect();
        let mut wait = false;
        for key in keys {
            match self
                .progress
                .get(key)
                .copied()
                .unwrap_or(Progress::InFlight)
            {
                Progress::Completed { run_id } => {
                    products.extend(self.products.get(&run_id).into_iter().flatten().copied());
                }
                Progress::InFlight => wait = true,
                Progress::FailedForGood => {
                    excluded.push(serde_json::json!({"step": self.name, "sub_group_key": key}));
                }
            }
        }
        wait
    }
}

/// The gaps of one step, and its state for the steps downstream of it. A first step's
/// inputs are the raw data packages of each sub-group; a step with `depends_on` takes the
/// products of the completed upstream runs covering the sub-group's packages, waits while
/// any of them is in flight, and leaves out those that failed for good.
async fn evaluate_step(
    db: &Database,
    pipeline: &PipelineRow,
    step: &StepRow,
    rules: &[filter::Rule],
    request: Option<Request<'_>>,
    upstream: &[&StepState],
    now: DateTime<Utc>,
) -> Result<(Vec<(Gap, NewRun)>, StepState), TriggerError> {
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

    let mut history: HashMap<String, Vec<RunStamp>> = HashMap::new();
    for stamp in db.step_run_stamps(step.id).await? {
        history
            .entry(stamp.sub_group_key.clone())
            .or_default()
            .push(stamp);
    }

    let forced_by = request.filter(|r| r.row.force).map(|r| r.row.id);
    let software_ref = SoftwareRef {
        version_id: software.id,
        version: &software.version,
        image_ref: &software.image_ref,
        image_digest: software.image_digest.as_deref(),
    };
    let cooldown = chrono::Duration::seconds(i64::from(step.cooldown_seconds.max(0)));
    let mut state = StepState {
        name: step.name.clone(),
        ..Default::default()
    };
    let mut gaps = Vec::new();
    for (sub_group, packages) in groups {
        let key = sub_group.key();
        state
            .key_of_package
            .extend(packages.iter().map(|p| (*p, key.clone())));

        let mut products = Vec::new();
        let mut excluded = Vec::new();
        let mut wait = false;
        for up in upstream {
            wait |= up.inputs_for(&packages, &mut products, &mut excluded);
        }
        if wait {
            state.progress.insert(key, Progress::InFlight);
            continue;
        }
        let inputs: Vec<InputRef> = if upstream.is_empty() {
            packages
                .iter()
                .map(|id| InputRef::RawDataPackage(*id))
                .collect()
        } else {
            products
                .iter()
                .map(|id| InputRef::DataProduct(*id))
                .collect()
        };
        if inputs.is_empty() {
            // Every upstream sub-group failed for good: nothing to process.
            state.progress.insert(key, Progress::FailedForGood);
            continue;
        }

        let fp = fingerprint::fingerprint(&inputs, &software_ref, &config);
        let runs = history.get(&key).map(Vec::as_slice).unwrap_or_default();
        let current = runs
            .iter()
            .filter(|r| r.fingerprint == fp)
            .max_by_key(|r| r.id);
        state.progress.insert(key.clone(), progress_of(current));
        if let Some(run) = current.filter(|r| r.status == "COMPLETED") {
            state.products.insert(run.id, Vec::new());
        }

        if request.is_some_and(|r| !r.covers_sub_group(&key)) {
            continue;
        }
        // A forced run differs from every other run by the request that forced it.
        let fp = match forced_by {
            Some(id) => {
                let mut salted = config.clone();
                if let Value::Object(map) = &mut salted {
                    map.insert("__forced_by_trigger_request".into(), Value::from(id));
                }
                fingerprint::fingerprint(&inputs, &software_ref, &salted)
            }
            None => fp,
        };
        if runs.iter().any(|r| r.fingerprint == fp) {
            continue;
        }
        let reason = match (forced_by, runs.is_empty()) {
            (Some(_), _) => GapReason::Forced,
            (None, true) => GapReason::New,
            (None, false) => GapReason::Changed,
        };
        let last_created = runs.iter().map(|r| r.created_at).max();
        let cooldown_until = match (reason, last_created) {
            (GapReason::Forced, _) | (_, None) => None,
            (_, Some(last)) => Some(last + cooldown).filter(|until| *until > now),
        };
        let gap = Gap {
            pipeline: pipeline.name.clone(),
            step: step.name.clone(),
            sub_group_key: key.clone(),
            fingerprint: fp.clone(),
            software_version: software.version.clone(),
            inputs: inputs.len(),
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
            raw_inputs: if upstream.is_empty() {
                packages
            } else {
                Vec::new()
            },
            product_inputs: products,
            excluded_upstream: Value::Array(excluded),
        };
        gaps.push((gap, run));
    }

    // The products of completed runs, for the steps downstream.
    let completed: Vec<i64> = state.products.keys().copied().collect();
    for (run_id, product_id) in db.products_of_runs(&completed).await? {
        state.products.entry(run_id).or_default().push(product_id);
    }
    Ok((gaps, state))
}

fn progress_of(run: Option<&RunStamp>) -> Progress {
    match run {
        None => Progress::InFlight,
        Some(r) if r.status == "COMPLETED" => Progress::Completed { run_id: r.id },
        Some(r) if r.status == "CANCELLED" => Progress::FailedForGood,
        Some(r) if r.status == "FAILED" && r.retry_count >= r.max_retries => {
            Progress::FailedForGood
        }
        Some(_) => Progress::InFlight,
    }
}

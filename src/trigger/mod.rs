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
//! submodules; this module sequences them over the database. One pipeline's error is
//! reported and the others are still evaluated.

pub mod cron;
pub mod fingerprint;
pub mod plan;
pub mod version;
pub mod view;

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use fixedbitset::FixedBitSet;
use serde::Serialize;
use serde_json::Value;

use crate::db::changes::Changes;
use crate::db::filter_sql::SelectionSpec;
use crate::db::pipelines::{NewRun, RunStamp, TriggerRequestRow};
use crate::db::{Database, DbError};
use crate::filter::{Dimension, Rule};
use fingerprint::{InputRef, SoftwareRef};
use plan::{Definitions, PipelinePlan, SelectionKey, StepPlan};
use view::{GroupId, View, ViewBuilder};

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
    /// The gaps runs were created for; every gap found with `list_gaps`.
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

/// A re-selection of more packages than this rebuilds the selection instead.
const REBUILD_ABOVE: usize = 50_000;

/// Each group of a view with the groups of an upstream view holding its packages.
type Cover = std::sync::Arc<Vec<Vec<GroupId>>>;

/// A selection to build: its rules, instrument-module scope and the `group_by`s wanted.
type SelectionToBuild<'a> = (&'a [Rule], Option<i64>, &'a BTreeSet<Vec<Dimension>>);

/// One selection's packages, split by each `group_by` its pipelines use.
#[derive(Debug)]
struct SelectionCache {
    /// The dimensions the query reads: every view's, each once.
    dims: Vec<Dimension>,
    views: Vec<View>,
    /// Per view, the groups whose membership changed in this cycle.
    dirty: Vec<Vec<GroupId>>,
    /// Built in this cycle: every pipeline on it is evaluated in full.
    rebuilt: bool,
    /// Per (view, upstream view), each group's upstream groups: computed once a cycle
    /// when a full pass needs it, and shared by the pipelines on this selection.
    covers: std::sync::Mutex<HashMap<(usize, usize), Cover>>,
}

impl SelectionCache {
    /// Each group of view `down` with the groups of view `up` holding its packages.
    fn cover(&self, down: usize, up: usize) -> Cover {
        let mut covers = self
            .covers
            .lock()
            .expect("never poisoned: no panics inside");
        covers
            .entry((down, up))
            .or_insert_with(|| std::sync::Arc::new(self.views[down].cover_in(&self.views[up])))
            .clone()
    }

    fn view_index(&self, dims: &[Dimension]) -> usize {
        self.views
            .iter()
            .position(|v| v.dims() == dims)
            .expect("the selection was built for every step's dimensions")
    }

    /// Builds the caches of several selections from one pass over the packages.
    async fn build_many(
        db: &Database,
        wanted: &[SelectionToBuild<'_>],
    ) -> Result<Vec<SelectionCache>, DbError> {
        let started = std::time::Instant::now();
        // Every dimension any view needs, each once: the query's dimension columns.
        let mut all_dims: Vec<Dimension> = Vec::new();
        for (_, _, sets) in wanted {
            for d in sets.iter().flatten() {
                if !all_dims.contains(d) {
                    all_dims.push(*d);
                }
            }
        }
        let position = |d: &Dimension| all_dims.iter().position(|x| x == d).expect("collected");
        // Per selection, per view: its builder and where its values sit in a row.
        let mut builders: Vec<Vec<(ViewBuilder, Vec<usize>)>> = wanted
            .iter()
            .map(|(_, _, sets)| {
                sets.iter()
                    .map(|set| (ViewBuilder::new(set), set.iter().map(position).collect()))
                    .collect()
            })
            .collect();
        let specs: Vec<SelectionSpec<'_>> = wanted
            .iter()
            .map(|(rules, scope, _)| SelectionSpec {
                rules,
                instrument_module_id: *scope,
            })
            .collect();
        db.for_each_shared(
            &specs,
            &all_dims,
            None,
            |id, values: &[&str], matches: &[bool]| {
                for (s, matched) in matches.iter().enumerate() {
                    if *matched {
                        for (builder, positions) in &mut builders[s] {
                            builder.push(id, positions.iter().map(|p| values[*p]));
                        }
                    }
                }
            },
        )
        .await?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "selection rows read"
        );
        Ok(builders
            .into_iter()
            .zip(wanted)
            .map(|(views, (_, _, sets))| {
                let dims: Vec<Dimension> = sets.iter().flatten().fold(Vec::new(), |mut acc, d| {
                    if !acc.contains(d) {
                        acc.push(*d);
                    }
                    acc
                });
                let views: Vec<View> = views.into_iter().map(|(b, _)| b.finish()).collect();
                SelectionCache {
                    dims,
                    dirty: vec![Vec::new(); views.len()],
                    views,
                    rebuilt: true,
                    covers: Default::default(),
                }
            })
            .collect())
    }

    /// Applies the re-selected changed packages (`current`: id → values of the
    /// dimensions `dims`) to every view, noting which groups changed.
    fn apply(
        &mut self,
        changes: &Changes,
        dims: &[Dimension],
        current: &HashMap<i64, Vec<String>>,
    ) {
        let mut changed: Vec<i64> = changes
            .packages
            .iter()
            .chain(&changes.deleted_packages)
            .copied()
            .collect();
        changed.sort_unstable();
        changed.dedup();
        for (v, view) in self.views.iter_mut().enumerate() {
            let positions: Vec<usize> = view
                .dims()
                .iter()
                .map(|d| {
                    dims.iter()
                        .position(|x| x == d)
                        .expect("read for every view")
                })
                .collect();
            let projected: HashMap<i64, Vec<String>> = current
                .iter()
                .map(|(id, values)| (*id, positions.iter().map(|p| values[*p].clone()).collect()))
                .collect();
            self.dirty[v] = view.apply(&changed, &projected);
        }
    }
}

/// What the evaluator remembers of a pipeline between cycles.
#[derive(Debug)]
struct PipelineMemo {
    digest: u64,
    selection: SelectionKey,
    /// Per step, the groups with a gap no run was created for yet (bound or cooldown).
    held_back: Vec<FixedBitSet>,
}

/// The trigger-manager's memory between cycles. Dropped (and rebuilt from the database by
/// one full cycle) whenever a cycle fails midway, so it never drifts from the database.
#[derive(Debug, Default)]
pub struct Evaluator {
    horizon: Option<i64>,
    /// The definitions of a processing location's pipelines, read again when changed.
    definitions: Option<(i64, Definitions)>,
    selections: HashMap<SelectionKey, SelectionCache>,
    memos: HashMap<i64, PipelineMemo>,
    errors: HashMap<i64, String>,
    pruned_at: Option<DateTime<Utc>>,
    /// Cycles in a row whose horizon did not move although something was written since:
    /// a transaction open somewhere pins it, and every cycle reads the same changes again.
    stuck: u32,
}

/// Cycles with a pinned horizon before the blocking transaction is named in a warning
/// (and again every as many cycles while it stays).
pub const HORIZON_STUCK_CYCLES: u32 = 10;

impl Evaluator {
    /// Runs one cycle.
    pub async fn cycle(
        &mut self,
        db: &Database,
        options: &TriggerOptions,
        now: DateTime<Utc>,
    ) -> Result<CycleReport, DbError> {
        let result = self.cycle_inner(db, options, now).await;
        if result.is_err() {
            *self = Evaluator::default();
        }
        result
    }

    async fn cycle_inner(
        &mut self,
        db: &Database,
        options: &TriggerOptions,
        now: DateTime<Utc>,
    ) -> Result<CycleReport, DbError> {
        let mut report = CycleReport::default();
        let started = std::time::Instant::now();
        let phase = |name: &str| {
            tracing::debug!(
                phase = name,
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "trigger cycle phase"
            );
        };
        // A full evaluation (the first, or after a reset) checks the configured location
        // first: a mistyped PROCESSING_LOCATION_ID would otherwise find nothing to do,
        // silently and for ever. The horizon stays unset, so each cycle asks again.
        if self.horizon.is_none()
            && !db
                .is_processing_location(options.processing_location_id)
                .await?
        {
            report.errors.push(format!(
                "processing location {} (PROCESSING_LOCATION_ID) does not exist or is not of type PROCESSING",
                options.processing_location_id
            ));
            return Ok(report);
        }
        // The horizon comes first: whatever is written after it is seen again next cycle.
        let marks = db.change_marks().await?;
        let horizon = marks.horizon;
        if self.horizon == Some(horizon) && marks.data_changed_since(horizon) {
            self.stuck += 1;
            if self.stuck.is_multiple_of(HORIZON_STUCK_CYCLES) {
                let blocker = db.oldest_open_transaction().await?;
                tracing::warn!(cycles = self.stuck, blocker = ?blocker,
                    "the change horizon has not moved: an open transaction keeps every \
                     trigger cycle reading the same changes again");
                report.horizon_blocked_by = Some(blocker.map_or_else(
                    || "an open transaction (not visible to this role)".to_owned(),
                    |b| b.to_string(),
                ));
            }
        } else {
            self.stuck = 0;
        }
        let changes = match self.horizon {
            // Nothing written since: no need to ask what.
            Some(h) if !marks.data_changed_since(h) => Some(Changes::default()),
            Some(h) => Some(db.changes_since(h, &marks).await?),
            None => None,
        };
        let changes = match changes {
            // A deleted run may have been anything's history: start afresh.
            Some(c) if c.runs_deleted => {
                self.selections.clear();
                self.memos.clear();
                None
            }
            other => other,
        };
        if let Some(c) = &changes {
            report.changed_packages = c.packages.len() + c.deleted_packages.len();
            report.changed_runs = c.runs.len();
        }

        phase("changes read");
        let location = options.processing_location_id;
        let defs = match self.definitions.take() {
            Some((at, defs))
                if at == location
                    && self
                        .horizon
                        .is_some_and(|h| !marks.definitions_changed_since(h)) =>
            {
                defs
            }
            _ => load_definitions(db, location).await?,
        };
        phase("definitions read");
        let mut plans = Vec::new();
        for pipeline in &defs.pipelines {
            if options
                .only_pipeline
                .as_ref()
                .is_some_and(|name| *name != pipeline.name)
            {
                continue;
            }
            let requests = defs
                .requests
                .get(&pipeline.id)
                .map_or(&[][..], Vec::as_slice);
            let planned = plan::firing(pipeline, now)
                .and_then(|firing| plan::plan(pipeline, &defs).map(|p| (p, firing)));
            match planned {
                Ok(p) => {
                    self.errors.remove(&pipeline.id);
                    plans.push(p);
                }
                Err(message) => {
                    let e = format!("pipeline {}: {message}", pipeline.name);
                    if self.errors.get(&pipeline.id) != Some(&e) {
                        tracing::warn!(pipeline = %pipeline.name, error = %e, "pipeline skipped");
                        self.errors.insert(pipeline.id, e.clone());
                    }
                    // An operator's request for a broken pipeline gets the reason, not silence.
                    if !options.dry_run {
                        for request in requests {
                            db.finish_trigger_request(request.id, true, &e).await?;
                        }
                    }
                    self.memos.remove(&pipeline.id);
                    report.errors.push(e);
                }
            }
        }

        self.refresh_selections(db, &plans, changes.as_ref())
            .await?;
        phase("selections up to date");

        // Runs written since the last cycle, by step.
        let mut changed_runs: HashMap<i64, Vec<&str>> = HashMap::new();
        if let Some(c) = &changes {
            for (step, key) in &c.runs {
                changed_runs.entry(*step).or_default().push(key);
            }
        }

        for (plan, firing) in &plans {
            let requests = defs
                .requests
                .get(&plan.row.id)
                .map_or(&[][..], Vec::as_slice);
            let cache = &self.selections[&plan.selection];
            let r = evaluate_pipeline(
                db,
                plan,
                *firing,
                requests,
                cache,
                &mut self.memos,
                changes.is_some(),
                &changed_runs,
                options,
                now,
            )
            .await?;
            report.pipelines.push(r);
        }
        phase("pipelines evaluated");
        // Pipelines gone or disabled are forgotten.
        let live: HashSet<i64> = plans.iter().map(|(p, _)| p.row.id).collect();
        self.memos.retain(|id, _| live.contains(id));

        if !options.dry_run
            && self
                .pruned_at
                .is_none_or(|t| now - t > chrono::Duration::hours(1))
        {
            db.prune_tombstones(now - chrono::Duration::days(1)).await?;
            self.pruned_at = Some(now);
        }
        drop(plans);
        self.definitions = Some((location, defs));
        self.horizon = Some(horizon);
        Ok(report)
    }

    /// Builds the selections new pipelines need, brings the others up to date from the
    /// changed packages, and forgets those no pipeline uses any more.
    async fn refresh_selections(
        &mut self,
        db: &Database,
        plans: &[(PipelinePlan<'_>, plan::Firing)],
        changes: Option<&Changes>,
    ) -> Result<(), DbError> {
        let mut wanted: HashMap<&SelectionKey, (&[Rule], BTreeSet<Vec<Dimension>>)> =
            HashMap::new();
        for (plan, _) in plans {
            let entry = wanted
                .entry(&plan.selection)
                .or_insert_with(|| (&plan.rules, BTreeSet::new()));
            entry.1.extend(plan.steps.iter().map(|s| s.dims.clone()));
        }
        self.selections.retain(|key, _| wanted.contains_key(key));
        let changed = changes.map_or(0, |c| c.packages.len() + c.deleted_packages.len());
        let mut to_build = Vec::new();
        let mut to_refresh: Vec<(&SelectionKey, &[Rule])> = Vec::new();
        for (key, (rules, dim_sets)) in &wanted {
            let reusable = changes.is_some()
                && changed <= REBUILD_ABOVE
                && self.selections.get(*key).is_some_and(|c| {
                    dim_sets
                        .iter()
                        .all(|d| c.views.iter().any(|v| v.dims() == d.as_slice()))
                });
            if !reusable {
                to_build.push((*key, *rules, dim_sets));
                continue;
            }
            let cache = self.selections.get_mut(*key).expect("checked above");
            cache.rebuilt = false;
            cache.covers.get_mut().expect("never poisoned").clear();
            cache.dirty.iter_mut().for_each(Vec::clear);
            if changed > 0 {
                to_refresh.push((*key, *rules));
            }
        }
        if let (Some(c), false) = (changes, to_refresh.is_empty()) {
            // One re-selection of the changed packages serves every selection.
            let mut dims: Vec<Dimension> = Vec::new();
            for (key, _) in &to_refresh {
                for d in &self.selections[*key].dims {
                    if !dims.contains(d) {
                        dims.push(*d);
                    }
                }
            }
            let specs: Vec<SelectionSpec<'_>> = to_refresh
                .iter()
                .map(|(key, rules)| SelectionSpec {
                    rules,
                    instrument_module_id: key.instrument_module_id,
                })
                .collect();
            let mut current: Vec<HashMap<i64, Vec<String>>> = vec![HashMap::new(); specs.len()];
            db.for_each_shared(&specs, &dims, Some(&c.packages), |id, values, matches| {
                for (s, matched) in matches.iter().enumerate() {
                    if *matched {
                        current[s].insert(id, values.iter().map(|v| (*v).to_owned()).collect());
                    }
                }
            })
            .await?;
            for ((key, _), rows) in to_refresh.iter().zip(&current) {
                let cache = self.selections.get_mut(*key).expect("checked above");
                cache.apply(c, &dims, rows);
            }
        }
        if !to_build.is_empty() {
            let specs: Vec<SelectionToBuild<'_>> = to_build
                .iter()
                .map(|(key, rules, sets)| (*rules, key.instrument_module_id, *sets))
                .collect();
            let built = SelectionCache::build_many(db, &specs).await?;
            for ((key, _, _), cache) in to_build.iter().zip(built) {
                self.selections.insert((*key).clone(), cache);
            }
        }
        Ok(())
    }
}

async fn load_definitions(db: &Database, location: i64) -> Result<Definitions, DbError> {
    let mut defs = Definitions {
        pipelines: db.enabled_pipelines(location).await?,
        ..Default::default()
    };
    for step in db.enabled_steps(location).await? {
        defs.steps.entry(step.pipeline_id).or_default().push(step);
    }
    for (step, upstream) in db.enabled_step_dependencies(location).await? {
        defs.upstream.entry(step).or_default().push(upstream);
    }
    for version in db.enabled_software_versions(location).await? {
        defs.versions
            .entry(version.reduction_software_id)
            .or_default()
            .push(version);
    }
    for request in db.enabled_trigger_requests(location).await? {
        defs.requests
            .entry(request.pipeline_id)
            .or_default()
            .push(request);
    }
    Ok(defs)
}

/// One pass over a pipeline's steps: which groups to look for gaps in.
#[derive(Debug)]
struct Pass<'a> {
    /// Per step, the groups whose gaps are considered.
    targets: Vec<FixedBitSet>,
    /// The request this pass serves (forced or targeted), if any.
    request: Option<&'a TriggerRequestRow>,
}

#[allow(clippy::too_many_arguments)]
async fn evaluate_pipeline(
    db: &Database,
    plan: &PipelinePlan<'_>,
    firing: plan::Firing,
    requests: &[TriggerRequestRow],
    cache: &SelectionCache,
    memos: &mut HashMap<i64, PipelineMemo>,
    warm: bool,
    changed_runs: &HashMap<i64, Vec<&str>>,
    options: &TriggerOptions,
    now: DateTime<Utc>,
) -> Result<PipelineReport, DbError> {
    let pipeline = plan.row;
    let mut report = PipelineReport {
        pipeline: pipeline.name.clone(),
        ..Default::default()
    };
    if !firing.scheduled && requests.is_empty() {
        return Ok(report);
    }
    report.evaluated = true;
    let view_index: Vec<usize> = plan
        .steps
        .iter()
        .map(|s| cache.view_index(&s.dims))
        .collect();
    let views: Vec<&View> = view_index.iter().map(|v| &cache.views[*v]).collect();

    // Incremental only for a continuous pipeline whose definition and selection are as
    // they were; a firing cron or manual pipeline is looked at in full.
    let incremental = warm
        && pipeline.trigger_type == "CONTINUOUS"
        && !cache.rebuilt
        && memos
            .get(&pipeline.id)
            .is_some_and(|m| m.digest == plan.digest && m.selection == plan.selection);
    if !incremental {
        memos.insert(
            pipeline.id,
            PipelineMemo {
                digest: plan.digest,
                selection: plan.selection.clone(),
                held_back: views
                    .iter()
                    .map(|v| FixedBitSet::with_capacity(v.group_count()))
                    .collect(),
            },
        );
    }
    let memo = memos.get_mut(&pipeline.id).expect("inserted above");
    for (bits, view) in memo.held_back.iter_mut().zip(&views) {
        bits.grow(view.group_count());
    }
    report.mode = if incremental {
        Mode::Incremental
    } else {
        Mode::Full
    };

    let mut budget = if options.dry_run {
        0
    } else {
        options.max_new_runs_per_pipeline
    };
    let mut passes: Vec<Pass<'_>> = Vec::new();
    if firing.scheduled {
        let targets = if incremental {
            incremental_targets(
                plan,
                &views,
                &view_index,
                cache,
                &memo.held_back,
                changed_runs,
                budget,
            )
        } else {
            views.iter().map(|v| all_groups(v)).collect()
        };
        passes.push(Pass {
            targets,
            request: None,
        });
    }
    // A full scheduled pass already covers what a plain request asks for; forced requests
    // add runs, and under incremental evaluation a plain one re-checks its whole scope.
    for row in requests
        .iter()
        .filter(|r| r.force || !firing.scheduled || incremental)
    {
        let targets = plan
            .steps
            .iter()
            .zip(&views)
            .map(|(step, view)| {
                let mut bits = FixedBitSet::with_capacity(view.group_count());
                if row.reduction_step_id.is_none_or(|s| s == step.row.id) {
                    match &row.sub_group_key {
                        Some(key) => {
                            if let Some(g) = view.group_by_key(key) {
                                bits.insert(g as usize);
                            }
                        }
                        None => bits.insert_range(..),
                    }
                }
                bits
            })
            .collect();
        passes.push(Pass {
            targets,
            request: Some(row),
        });
    }

    for pass in &passes {
        let needed = needed_groups(plan, &views, &pass.targets);
        // The runs of every needed group of every step, in one or two queries.
        let mut whole = Vec::new();
        let mut some: Vec<(i64, &str)> = Vec::new();
        for ((step, view), bits) in plan.steps.iter().zip(&views).zip(&needed) {
            let count = bits.count_ones(..);
            if count == view.group_count() && count > 0 {
                whole.push(step.row.id);
            } else {
                some.extend(
                    bits.ones()
                        .map(|g| (step.row.id, view.group(g as GroupId).key.as_str())),
                );
            }
        }
        let mut history: HashMap<i64, Vec<RunStamp>> = HashMap::new();
        for (step, stamp) in db.run_stamps(&whole, &some).await? {
            history.entry(step).or_default().push(stamp);
        }
        let mut states: Vec<StepState> = Vec::with_capacity(plan.steps.len());
        for (i, step) in plan.steps.iter().enumerate() {
            let upstream: Vec<Upstream<'_>> = step
                .upstream
                .iter()
                .map(|u| Upstream {
                    state: &states[*u],
                    view: views[*u],
                    same_view: view_index[*u] == view_index[i],
                    cover: (view_index[*u] != view_index[i] && needed[i].is_full())
                        .then(|| cache.cover(view_index[i], view_index[*u])),
                })
                .collect();
            let outcome = evaluate_step(
                db,
                plan,
                step,
                history.get(&step.row.id).map_or(&[][..], Vec::as_slice),
                views[i],
                &needed[i],
                &pass.targets[i],
                pass.request,
                &upstream,
                &mut memo.held_back[i],
                &mut budget,
                options,
                now,
            )
            .await?;
            report.sub_groups_evaluated += outcome.evaluated;
            report.gaps_found += outcome.gaps_found;
            report.deferred += outcome.deferred;
            report.created += outcome.created;
            report.gaps.extend(outcome.gaps);
            states.push(outcome.state);
        }
    }

    if report.created > 0 {
        tracing::info!(pipeline = %pipeline.name, mode = ?report.mode, created = report.created,
            deferred = report.deferred, sub_groups = report.sub_groups_evaluated, "runs created");
    }
    if !options.dry_run {
        for row in requests {
            db.finish_trigger_request(
                row.id,
                false,
                &format!("{} run(s) created in this cycle", report.created),
            )
            .await?;
        }
        // Only a cycle that looked at something is worth a write: a steady-state cycle
        // writes nothing (and its own bookkeeping is no change to read next cycle).
        if firing.cron_tick.is_some() || !requests.is_empty() || report.sub_groups_evaluated > 0 {
            db.record_evaluation(pipeline.id, firing.cron_tick, now)
                .await?;
        }
    }
    Ok(report)
}

fn all_groups(view: &View) -> FixedBitSet {
    let mut bits = FixedBitSet::with_capacity(view.group_count());
    bits.insert_range(..);
    bits
}

/// The groups of `to` that hold the packages of the groups `from` marks in `from_view`.
fn cover(from: &FixedBitSet, from_view: &View, to_view: &View, into: &mut FixedBitSet) {
    if std::ptr::eq(from_view, to_view) {
        into.union_with(from);
        return;
    }
    for g in from.ones() {
        for p in &from_view.group(g as GroupId).members {
            if let Some(t) = to_view.group_of(*p) {
                into.insert(t as usize);
            }
        }
    }
}

/// The groups an incremental pass looks at: those whose packages or runs changed, those
/// downstream of them, and held-back gaps (up to the bound).
fn incremental_targets(
    plan: &PipelinePlan<'_>,
    views: &[&View],
    view_index: &[usize],
    cache: &SelectionCache,
    held_back: &[FixedBitSet],
    changed_runs: &HashMap<i64, Vec<&str>>,
    budget: usize,
) -> Vec<FixedBitSet> {
    let mut targets: Vec<FixedBitSet> = Vec::with_capacity(plan.steps.len());
    let mut picks = budget;
    for (i, step) in plan.steps.iter().enumerate() {
        let view = views[i];
        let mut bits = FixedBitSet::with_capacity(view.group_count());
        for g in &cache.dirty[view_index[i]] {
            bits.insert(*g as usize);
        }
        for key in changed_runs.get(&step.row.id).into_iter().flatten() {
            if let Some(g) = view.group_by_key(key) {
                bits.insert(g as usize);
            }
        }
        for g in held_back[i].ones() {
            if picks == 0 {
                break;
            }
            bits.insert(g);
            picks -= 1;
        }
        for u in &step.upstream {
            cover(&targets[*u], views[*u], view, &mut bits);
        }
        targets.push(bits);
    }
    targets
}

/// Every group whose state a pass needs: its targets and, upwards, the groups feeding them.
fn needed_groups(
    plan: &PipelinePlan<'_>,
    views: &[&View],
    targets: &[FixedBitSet],
) -> Vec<FixedBitSet> {
    let mut needed: Vec<FixedBitSet> = targets.to_vec();
    for i in (0..plan.steps.len()).rev() {
        for u in &plan.steps[i].upstream {
            let (before, after) = needed.split_at_mut(i);
            if after[0].is_full() {
                // All of a step needs all of its upstream steps.
                before[*u].insert_range(..);
            } else {
                cover(&after[0], views[i], views[*u], &mut before[*u]);
            }
        }
    }
    needed
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

/// One evaluated step, as its downstream steps see it (for the groups a pass needed).
#[derive(Debug, Default)]
struct StepState {
    name: String,
    /// By group id; `None` for groups the pass did not need.
    progress: Vec<Option<Progress>>,
    /// The products of its completed runs, by run.
    products: HashMap<i64, Vec<i64>>,
}

impl StepState {
    /// Adds what a downstream sub-group made of `packages` gets from this step: its
    /// products and the upstream sub-groups left out; returns whether to wait.
    fn inputs_for(
        &self,
        view: &View,
        groups: &[GroupId],
        products: &mut Vec<i64>,
        excluded: &mut Vec<Value>,
    ) -> bool {
        let mut wait = false;
        for &g in groups {
            match self
                .progress
                .get(g as usize)
                .copied()
                .flatten()
                .unwrap_or(Progress::InFlight)
            {
                Progress::Completed { run_id } => {
                    products.extend(self.products.get(&run_id).into_iter().flatten().copied());
                }
                Progress::InFlight => wait = true,
                Progress::FailedForGood => excluded.push(serde_json::json!({
                    "step": self.name,
                    "sub_group_key": view.group(g).key,
                })),
            }
        }
        wait
    }
}

/// An upstream step as a downstream step reads it.
struct Upstream<'a> {
    state: &'a StepState,
    view: &'a View,
    /// The downstream step groups the same way: group g is upstream group g.
    same_view: bool,
    /// Every downstream group's upstream groups, when the pass needs them all.
    cover: Option<Cover>,
}

/// What evaluating one step found.
#[derive(Debug, Default)]
struct StepOutcome {
    state: StepState,
    evaluated: usize,
    gaps_found: usize,
    gaps: Vec<Gap>,
    created: usize,
    deferred: usize,
}

/// The gaps of one step over the groups of a pass, and its state for the steps
/// downstream. A first step's inputs are the raw data packages of each sub-group; a step
/// with `depends_on` takes the products of the completed upstream runs covering the
/// sub-group's packages, waits while any of them is in flight, and leaves out those that
/// failed for good. Fingerprints are computed only where they decide something: a
/// sub-group with no run at all is a gap whatever its fingerprint.
#[allow(clippy::too_many_arguments)]
async fn evaluate_step(
    db: &Database,
    plan: &PipelinePlan<'_>,
    step: &StepPlan<'_>,
    stamps: &[RunStamp],
    view: &View,
    needed: &FixedBitSet,
    targets: &FixedBitSet,
    request: Option<&TriggerRequestRow>,
    upstream: &[Upstream<'_>],
    held_back: &mut FixedBitSet,
    budget: &mut usize,
    options: &TriggerOptions,
    now: DateTime<Utc>,
) -> Result<StepOutcome, DbError> {
    let mut out = StepOutcome {
        state: StepState {
            name: step.row.name.clone(),
            progress: vec![None; view.group_count()],
            ..Default::default()
        },
        ..Default::default()
    };
    if needed.is_clear() {
        return Ok(out);
    }
    let mut history: HashMap<&str, Vec<&RunStamp>> = HashMap::new();
    for stamp in stamps {
        history
            .entry(stamp.sub_group_key.as_str())
            .or_default()
            .push(stamp);
    }

    let forced_by = request.filter(|r| r.force).map(|r| r.id);
    let software = SoftwareRef {
        version_id: step.software.id,
        version: &step.software.version,
        image_ref: &step.software.image_ref,
        image_digest: step.software.image_digest.as_deref(),
    };
    let cooldown = chrono::Duration::seconds(i64::from(step.row.cooldown_seconds.max(0)));
    let salted_config = forced_by.map(|id| {
        let mut salted = step.config.clone();
        if let Value::Object(map) = &mut salted {
            map.insert("__forced_by_trigger_request".into(), Value::from(id));
        }
        salted
    });
    let mut to_create: Vec<(Gap, NewRun)> = Vec::new();

    for g in needed.ones() {
        let group = view.group(g as GroupId);
        let is_target = targets.contains(g);
        if group.members.is_empty() {
            // Every package left: nothing to process any more.
            held_back.set(g, false);
            continue;
        }
        out.evaluated += 1;
        let mut products = Vec::new();
        let mut excluded = Vec::new();
        let mut wait = false;
        for up in upstream {
            // The upstream groups holding this group's packages.
            let same = [g as GroupId];
            let looked_up;
            let groups: &[GroupId] = match &up.cover {
                _ if up.same_view => &same,
                Some(cover) => &cover[g],
                None => {
                    looked_up = up.view.groups_of(&group.members);
                    &looked_up
                }
            };
            wait |= up
                .state
                .inputs_for(up.view, groups, &mut products, &mut excluded);
        }
        if wait {
            out.state.progress[g] = Some(Progress::InFlight);
            if is_target {
                held_back.set(g, false);
            }
            continue;
        }
        // Built only where a fingerprint is needed.
        let inputs = || -> Vec<InputRef> {
            if upstream.is_empty() {
                group
                    .members
                    .iter()
                    .map(|id| InputRef::RawDataPackage(*id))
                    .collect()
            } else {
                products
                    .iter()
                    .map(|id| InputRef::DataProduct(*id))
                    .collect()
            }
        };
        let input_count = if upstream.is_empty() {
            group.members.len()
        } else {
            products.len()
        };
        if input_count == 0 {
            // Every upstream sub-group failed for good: nothing to process.
            out.state.progress[g] = Some(Progress::FailedForGood);
            if is_target {
                held_back.set(g, false);
            }
            continue;
        }

        let runs: &[&RunStamp] = history.get(group.key.as_str()).map_or(&[], Vec::as_slice);
        let fingerprint_of =
            |config: &Value| fingerprint::fingerprint(&inputs(), &software, config);
        let mut current_fp = None;
        let progress = if runs.is_empty() {
            Progress::InFlight
        } else {
            let fp = fingerprint_of(&step.config);
            let current = runs
                .iter()
                .filter(|r| r.fingerprint == fp)
                .max_by_key(|r| r.id);
            current_fp = Some(fp);
            progress_of(current.copied())
        };
        out.state.progress[g] = Some(progress);
        if !is_target {
            continue;
        }

        // Is there a gap? A forced run differs from every other run by its request.
        let fp = match (&salted_config, &current_fp) {
            (Some(salted), _) => Some(fingerprint_of(salted)),
            (None, Some(fp)) => Some(fp.clone()),
            (None, None) => None,
        };
        if let Some(fp) = &fp
            && runs.iter().any(|r| r.fingerprint == *fp)
        {
            held_back.set(g, false);
            continue;
        }
        out.gaps_found += 1;
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
        let create = cooldown_until.is_none() && *budget > 0;
        if create {
            *budget -= 1;
        } else {
            held_back.insert(g);
            if cooldown_until.is_none() && !options.dry_run {
                out.deferred += 1;
            }
        }
        if !create && !options.list_gaps {
            continue;
        }
        let fp = fp.unwrap_or_else(|| fingerprint_of(&step.config));
        let gap = Gap {
            pipeline: plan.row.name.clone(),
            step: step.row.name.clone(),
            sub_group_key: group.key.clone(),
            fingerprint: fp.clone(),
            software_version: step.software.version.clone(),
            inputs: input_count,
            reason,
            cooldown_until,
            run_id: None,
        };
        if !create {
            out.gaps.push(gap);
            continue;
        }
        held_back.set(g, false);
        let run = NewRun {
            reduction_step_id: step.row.id,
            sub_group_key: group.key.clone(),
            sub_group: group.sub_group.to_json(),
            fingerprint: fp,
            reduction_software_version_id: step.software.id,
            config_snapshot: step.config.clone(),
            max_retries: step.row.max_retries,
            raw_inputs: if upstream.is_empty() {
                group.members.clone()
            } else {
                Vec::new()
            },
            product_inputs: products,
            excluded_upstream: Value::Array(excluded),
        };
        to_create.push((gap, run));
    }

    if !to_create.is_empty() {
        let runs: Vec<NewRun> = to_create.iter().map(|(_, r)| r.clone()).collect();
        let ids = db.create_runs(&runs, now).await?;
        for ((mut gap, _), id) in to_create.into_iter().zip(ids) {
            gap.run_id = id;
            if id.is_some() {
                out.created += 1;
                tracing::debug!(pipeline = %gap.pipeline, step = %gap.step, sub_group = %gap.sub_group_key,
                    run_id = id, reason = ?gap.reason, "run created");
            }
            out.gaps.push(gap);
        }
    }

    // The products of completed runs, for the steps downstream.
    let completed: Vec<i64> = out
        .state
        .progress
        .iter()
        .filter_map(|p| match p {
            Some(Progress::Completed { run_id }) => Some(*run_id),
            _ => None,
        })
        .collect();
    for (run_id, product_id) in db.products_of_runs(&completed).await? {
        out.state
            .products
            .entry(run_id)
            .or_default()
            .push(product_id);
    }
    Ok(out)
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

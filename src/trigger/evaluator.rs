//! The trigger-manager's memory between cycles and the cycle itself: the change marks
//! read, the selections brought up to date, each pipeline evaluated.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use fixedbitset::FixedBitSet;
use tracing::Instrument;

use crate::db::changes::Changes;
use crate::db::filter_sql::SelectionSpec;
use crate::db::{Database, DbError};
use crate::filter::{Dimension, Rule};

use super::pass::CycleContext;
use super::plan::{self, Definitions, PipelinePlan, SelectionKey};
use super::selection::{REBUILD_ABOVE, SelectionCache, SelectionToBuild};
use super::step::ProductIndex;
use super::{CycleReport, GapSink, PipelineReport, TriggerOptions};

/// What the evaluator remembers of a pipeline between cycles.
#[derive(Debug)]
pub(super) struct PipelineMemo {
    pub(super) digest: u64,
    pub(super) selection: SelectionKey,
    /// Per step, the groups with a gap no run was created for yet (bound or cooldown).
    pub(super) held_back: Vec<FixedBitSet>,
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

/// Pipelines evaluated at once on PostgreSQL (the database works on one while the
/// process works on another).
const PIPELINES_AT_ONCE: usize = 2;

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
        self.cycle_into(db, options, now, None).await
    }

    /// Runs one cycle, handing each gap to `sink` as it is found instead of keeping it
    /// in the report (whose pipelines' `gaps` stay empty).
    pub async fn cycle_streaming(
        &mut self,
        db: &Database,
        options: &TriggerOptions,
        now: DateTime<Utc>,
        sink: &mut dyn GapSink,
    ) -> Result<CycleReport, DbError> {
        self.cycle_into(db, options, now, Some(sink)).await
    }

    async fn cycle_into(
        &mut self,
        db: &Database,
        options: &TriggerOptions,
        now: DateTime<Utc>,
        sink: Option<&mut dyn GapSink>,
    ) -> Result<CycleReport, DbError> {
        let result = self.cycle_inner(db, options, now, sink).await;
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
        mut sink: Option<&mut dyn GapSink>,
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
        // Each plan's pipeline (its index in the definitions) and firing.
        let mut chosen: Vec<(usize, plan::Firing)> = Vec::new();
        for (index, pipeline) in defs.pipelines.iter().enumerate() {
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
                    chosen.push((index, p.1));
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
                    report.errors.push(e);
                }
            }
        }

        self.refresh_selections(db, &plans, changes.as_ref())
            .await?;
        phase("selections up to date");

        // Runs written since the last cycle, by step.
        let mut changed_runs: HashMap<i64, Vec<String>> = HashMap::new();
        if let Some(c) = &changes {
            for (step, key) in &c.runs {
                changed_runs.entry(*step).or_default().push(key.clone());
            }
        }

        // A cold cycle evaluates every pipeline in full: the products of completed runs
        // are read in one scan, not in a query per step.
        let feeds_downstream = plans
            .iter()
            .filter(|(_, firing)| firing.scheduled)
            .any(|(plan, _)| plan.steps.iter().any(|s| s.feeds_downstream));
        let products = match &changes {
            None if feeds_downstream => Some(ProductIndex {
                rows: db.products_by_run().await?,
            }),
            _ => None,
        };
        phase("products read");
        // The plans borrow the definitions, which the evaluations share: made again there.
        drop(plans);
        let shared = Arc::new(Shared {
            db: db.clone(),
            defs,
            selections: std::mem::take(&mut self.selections),
            warm: changes.is_some(),
            changed_runs,
            options: options.clone(),
            now,
            products,
        });
        // Each pipeline's memo is lent to its evaluation and given back after; those of
        // pipelines gone or disabled are not, and are forgotten.
        let mut previous = std::mem::take(&mut self.memos);
        let jobs: Vec<Job> = chosen
            .into_iter()
            .map(|(index, firing)| {
                let memo = previous.remove(&shared.defs.pipelines[index].id);
                (index, firing, memo)
            })
            .collect();
        drop(previous);
        let ids: Vec<i64> = jobs
            .iter()
            .map(|(index, ..)| shared.defs.pipelines[*index].id)
            .collect();
        let ticks: Vec<(bool, Option<DateTime<Utc>>)> = jobs
            .iter()
            .map(|(index, firing, _)| {
                let id = shared.defs.pipelines[*index].id;
                (
                    shared.defs.requests.get(&id).is_some_and(|r| !r.is_empty()),
                    firing.cron_tick,
                )
            })
            .collect();
        let evaluated = match sink.as_mut() {
            // A sink takes each gap as it is found, so one pipeline at a time.
            Some(sink) => {
                let mut evaluated = Vec::with_capacity(jobs.len());
                for (index, firing, mut memo) in jobs {
                    let plan = shared.plan(index);
                    let mut emit = |gap| sink.gap(gap);
                    let r = shared
                        .context()
                        .evaluate_pipeline(&plan, firing, &mut memo, &mut emit)
                        .await?;
                    sink.pipeline_done(&r);
                    evaluated.push((r, memo));
                }
                evaluated
            }
            None => evaluate_in_parallel(&shared, jobs).await?,
        };
        let Shared {
            defs, selections, ..
        } = Arc::into_inner(shared).expect("every evaluation has ended");
        self.selections = selections;
        let (reports, memos): (Vec<_>, Vec<_>) = evaluated.into_iter().unzip();
        if !options.dry_run {
            // Only a pipeline that was looked at is worth a write: a steady-state cycle
            // writes nothing (its own bookkeeping would be a change to read next cycle).
            // One statement for all of them, not a round trip each.
            let looked_at: Vec<(i64, Option<DateTime<Utc>>)> = ids
                .iter()
                .zip(&ticks)
                .zip(&reports)
                .filter(|((_, (requested, tick)), r)| {
                    r.evaluated && (tick.is_some() || *requested || r.sub_groups_evaluated > 0)
                })
                .map(|((id, (_, tick)), _)| (*id, *tick))
                .collect();
            db.record_evaluations(&looked_at, now).await?;
        }
        self.memos = ids
            .into_iter()
            .zip(memos)
            .filter_map(|(id, memo)| Some((id, memo?)))
            .collect();
        report.pipelines = reports;
        phase("pipelines evaluated");

        if !options.dry_run
            && self
                .pruned_at
                .is_none_or(|t| now - t > chrono::Duration::hours(1))
        {
            db.prune_tombstones(now - chrono::Duration::days(1)).await?;
            self.pruned_at = Some(now);
        }
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

/// What the evaluations of a cycle's pipelines share, owned so that each can run as a
/// task of its own (on another core: a restart's evaluation is mostly in-process work).
struct Shared {
    db: Database,
    defs: Definitions,
    selections: HashMap<SelectionKey, SelectionCache>,
    warm: bool,
    changed_runs: HashMap<i64, Vec<String>>,
    options: TriggerOptions,
    now: DateTime<Utc>,
    products: Option<ProductIndex>,
}

impl Shared {
    fn context(&self) -> CycleContext<'_> {
        CycleContext {
            db: &self.db,
            defs: &self.defs,
            selections: &self.selections,
            warm: self.warm,
            changed_runs: &self.changed_runs,
            options: &self.options,
            now: self.now,
            products: self.products.as_ref(),
        }
    }

    /// The plan of the pipeline at `index` of the definitions, which planned without
    /// error earlier in the cycle (planning is a pure function of the definitions).
    fn plan(&self, index: usize) -> PipelinePlan<'_> {
        plan::plan(&self.defs.pipelines[index], &self.defs).expect("planned earlier in the cycle")
    }
}

/// A pipeline to evaluate: its index in the definitions, its firing and its memo.
type Job = (usize, plan::Firing, Option<PipelineMemo>);

/// Evaluates the pipelines of `jobs` in a few tasks (lanes), each taking the next
/// pipeline when done with one: one pipeline's queries run while another's sub-groups
/// are evaluated, on both cores. A lane per pipeline would cost a quiet cycle a task
/// hand-off per pipeline. Reports keep their gaps and come back in the jobs' order.
async fn evaluate_in_parallel(
    shared: &Arc<Shared>,
    jobs: Vec<Job>,
) -> Result<Vec<(PipelineReport, Option<PipelineMemo>)>, DbError> {
    let lanes = match shared.db {
        Database::Postgres(_) => PIPELINES_AT_ONCE,
        Database::Sqlite(_) => 1,
    };
    let count = jobs.len();
    let queue: Arc<Mutex<std::vec::IntoIter<(usize, Job)>>> = Arc::new(Mutex::new(
        jobs.into_iter().enumerate().collect::<Vec<_>>().into_iter(),
    ));
    // Dropped on an error: the lanes still running are aborted with it.
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..lanes.min(count) {
        let (shared, queue) = (Arc::clone(shared), Arc::clone(&queue));
        running.spawn(
            async move {
                let mut done = Vec::new();
                loop {
                    let next = queue
                        .lock()
                        .expect("never poisoned: no panics inside")
                        .next();
                    let Some((slot, (index, firing, mut memo))) = next else {
                        return Ok::<_, DbError>(done);
                    };
                    let plan = shared.plan(index);
                    let mut gaps = Vec::new();
                    let mut emit = |gap| gaps.push(gap);
                    let report = shared
                        .context()
                        .evaluate_pipeline(&plan, firing, &mut memo, &mut emit)
                        .await?;
                    done.push((slot, PipelineReport { gaps, ..report }, memo));
                }
            }
            .in_current_span(),
        );
    }
    let mut done: Vec<Option<(PipelineReport, Option<PipelineMemo>)>> =
        (0..count).map(|_| None).collect();
    while let Some(lane) = running.join_next().await {
        let lane = lane.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => unreachable!("the set is never cancelled while awaited: {e}"),
        });
        for (slot, report, memo) in lane? {
            done[slot] = Some((report, memo));
        }
    }
    Ok(done
        .into_iter()
        .map(|d| d.expect("every job was taken by a lane"))
        .collect())
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

//! One pipeline in one cycle: which sub-groups of which steps to look at (all of them, or
//! those a change touched), the runs they have, and each step evaluated in order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use fixedbitset::FixedBitSet;

use crate::db::pipelines::{RunStamp, TriggerRequestRow};
use crate::db::{Database, DbError};

use super::evaluator::PipelineMemo;
use super::plan::{self, Definitions, PipelinePlan, SelectionKey};
use super::selection::SelectionCache;
use super::step::{ProductIndex, StepState, Upstream, evaluate_step};
use super::view::{GroupId, View};
use super::{Gap, Mode, PipelineReport, TriggerOptions};

/// One pass over a pipeline's steps: which groups to look for gaps in.
#[derive(Debug)]
struct Pass<'a> {
    /// Per step, the groups whose gaps are considered.
    targets: Vec<FixedBitSet>,
    /// The request this pass serves (forced or targeted), if any.
    request: Option<&'a TriggerRequestRow>,
}

/// What every pipeline of a cycle is evaluated against.
pub(super) struct CycleContext<'a> {
    pub db: &'a Database,
    pub defs: &'a Definitions,
    pub selections: &'a HashMap<SelectionKey, SelectionCache>,
    /// Not the first cycle: changes since the last are known.
    pub warm: bool,
    /// Runs written since the last cycle, by step.
    pub changed_runs: &'a HashMap<i64, Vec<String>>,
    pub options: &'a TriggerOptions,
    pub now: DateTime<Utc>,
    /// The products of completed runs, when read once for the whole cycle.
    pub products: Option<&'a ProductIndex>,
}

impl CycleContext<'_> {
    /// Evaluates one pipeline, handing its gaps to `emit`; its report (without them).
    /// `memo` is what the evaluator remembers of it (None: nothing yet).
    pub(super) async fn evaluate_pipeline(
        &self,
        plan: &PipelinePlan<'_>,
        firing: plan::Firing,
        memo: &mut Option<PipelineMemo>,
        emit: &mut (dyn FnMut(Gap) + Send),
    ) -> Result<PipelineReport, DbError> {
        let (db, options) = (self.db, self.options);
        let requests = self
            .defs
            .requests
            .get(&plan.row.id)
            .map_or(&[][..], Vec::as_slice);
        let cache = &self.selections[&plan.selection];
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
        let incremental = self.warm
            && pipeline.trigger_type == "CONTINUOUS"
            && !cache.rebuilt
            && memo
                .as_ref()
                .is_some_and(|m| m.digest == plan.digest && m.selection == plan.selection);
        if !incremental {
            *memo = Some(PipelineMemo {
                digest: plan.digest,
                selection: plan.selection.clone(),
                held_back: views
                    .iter()
                    .map(|v| FixedBitSet::with_capacity(v.group_count()))
                    .collect(),
            });
        }
        let memo = memo.as_mut().expect("set above");
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
                    self.changed_runs,
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
                    self,
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
                    emit,
                )
                .await?;
                report.sub_groups_evaluated += outcome.evaluated;
                report.gaps_found += outcome.gaps_found;
                report.deferred += outcome.deferred;
                report.created += outcome.created;
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
        }
        Ok(report)
    }
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
    changed_runs: &HashMap<i64, Vec<String>>,
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

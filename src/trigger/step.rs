//! One step of a pipeline over the sub-groups a pass needs: their inputs (packages, or
//! upstream products), fingerprints, gaps, and the runs created for them.

use std::collections::HashMap;

use fixedbitset::FixedBitSet;
use serde_json::Value;

use crate::db::DbError;
use crate::db::pipelines::{NewRun, RunStamp, TriggerRequestRow};

use super::fingerprint::{Fingerprinter, InputRef, SoftwareRef};
use super::pass::CycleContext;
use super::plan::{PipelinePlan, StepPlan};
use super::selection::Cover;
use super::view::{GroupId, View};
use super::{Gap, GapReason};

/// Where a sub-group of an evaluated step stands, for the steps downstream of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Its run for the current fingerprint completed.
    Completed { run_id: i64 },
    /// Its run is pending, in flight or will be retried, or not created yet.
    InFlight,
    /// Its run failed with no retry left, or was cancelled: downstream leaves it out.
    FailedForGood,
}

/// One evaluated step, as its downstream steps see it (for the groups a pass needed).
#[derive(Debug, Default)]
pub(super) struct StepState {
    pub(super) name: String,
    /// By group id; `None` for groups the pass did not need.
    pub(super) progress: Vec<Option<Progress>>,
}

impl StepState {
    /// Adds what a downstream sub-group made of `packages` gets from this step: its
    /// products and the upstream sub-groups left out; returns whether to wait.
    fn inputs_for(
        &self,
        view: &View,
        groups: &[GroupId],
        products_of: &HashMap<i64, Vec<i64>>,
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
                    products.extend(products_of.get(&run_id).into_iter().flatten().copied());
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

/// The products of every run as they stood when read, read once for a cycle that
/// evaluates many pipelines in full (a restart) rather than a query per step.
#[derive(Debug)]
pub(super) struct ProductIndex {
    /// `(run, product)`, sorted.
    pub(super) rows: Vec<(i64, i64)>,
}

impl ProductIndex {
    /// A completed run's products; None when the index has none of them: the run
    /// completed after the index was read, or has no products, and is asked for on its
    /// own (a run's products are registered with its completion, all at once).
    fn of(&self, run: i64) -> Option<impl Iterator<Item = i64> + '_> {
        let start = self.rows.partition_point(|(r, _)| *r < run);
        let len = self.rows[start..].partition_point(|(r, _)| *r == run);
        (len > 0).then(|| self.rows[start..start + len].iter().map(|(_, p)| *p))
    }
}

/// An upstream step as a downstream step reads it.
pub(super) struct Upstream<'a> {
    pub(super) state: &'a StepState,
    pub(super) view: &'a View,
    /// The downstream step groups the same way: group g is upstream group g.
    pub(super) same_view: bool,
    /// Every downstream group's upstream groups, when the pass needs them all.
    pub(super) cover: Option<Cover>,
}

impl Upstream<'_> {
    /// The groups of this upstream step that hold the packages of downstream group `g`
    /// (`members`).
    fn groups_for(&self, g: usize, members: &[i64]) -> UpstreamGroups<'_> {
        match &self.cover {
            _ if self.same_view => UpstreamGroups::Same([g as GroupId]),
            Some(cover) => UpstreamGroups::Covered(&cover[g]),
            None => UpstreamGroups::LookedUp(self.view.groups_of(members)),
        }
    }
}

/// [`Upstream::groups_for`]: without an allocation where the groups are known already.
enum UpstreamGroups<'a> {
    Same([GroupId; 1]),
    Covered(&'a [GroupId]),
    LookedUp(Vec<GroupId>),
}

impl std::ops::Deref for UpstreamGroups<'_> {
    type Target = [GroupId];
    fn deref(&self) -> &[GroupId] {
        match self {
            UpstreamGroups::Same(one) => one,
            UpstreamGroups::Covered(groups) => groups,
            UpstreamGroups::LookedUp(groups) => groups,
        }
    }
}

/// What evaluating one step found.
#[derive(Debug, Default)]
pub(super) struct StepOutcome {
    pub(super) state: StepState,
    pub(super) evaluated: usize,
    pub(super) gaps_found: usize,
    pub(super) created: usize,
    pub(super) deferred: usize,
}

/// The gaps of one step over the groups of a pass, and its state for the steps
/// downstream. A first step's inputs are the raw data packages of each sub-group; a step
/// with `depends_on` takes the products of the completed upstream runs covering the
/// sub-group's packages, waits while any of them is in flight, and leaves out those that
/// failed for good. Fingerprints are computed only where they decide something: a
/// sub-group with no run at all is a gap whatever its fingerprint.
#[allow(clippy::too_many_arguments)]
pub(super) async fn evaluate_step(
    cx: &CycleContext<'_>,
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
    emit: &mut (dyn FnMut(Gap) + Send),
) -> Result<StepOutcome, DbError> {
    let (db, options, now) = (cx.db, cx.options, cx.now);
    let mut out = StepOutcome {
        state: StepState {
            name: step.row.name.clone(),
            progress: vec![None; view.group_count()],
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
    let plain = Fingerprinter::new(&software, &step.config);
    let salted = forced_by.map(|id| {
        let mut salted = step.config.clone();
        if let Value::Object(map) = &mut salted {
            map.insert("__forced_by_trigger_request".into(), Value::from(id));
        }
        Fingerprinter::new(&software, &salted)
    });
    let mut to_create: Vec<(Gap, NewRun)> = Vec::new();
    let products_of = upstream_products(cx, view, needed, upstream).await?;

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
            let groups = up.groups_for(g, &group.members);
            wait |=
                up.state
                    .inputs_for(up.view, &groups, &products_of, &mut products, &mut excluded);
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
        let mut current_fp = None;
        let progress = if runs.is_empty() {
            Progress::InFlight
        } else {
            let fp = plain.of(&inputs());
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
        let fp = match (&salted, &current_fp) {
            (Some(salted), _) => Some(salted.of(&inputs())),
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
        let fp = fp.unwrap_or_else(|| plain.of(&inputs()));
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
            emit(gap);
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
            emit(gap);
        }
    }

    Ok(out)
}

/// The products of the completed upstream runs that the groups of `needed` which can go
/// ahead take as inputs, by run. A group waiting for an upstream run in flight needs
/// none: most groups an incremental pass looks at wait (a source whose new scan is not
/// calibrated yet), and reading the products of all of the source's scans for them cost
/// a query per step and cycle.
async fn upstream_products(
    cx: &CycleContext<'_>,
    view: &View,
    needed: &FixedBitSet,
    upstream: &[Upstream<'_>],
) -> Result<HashMap<i64, Vec<i64>>, DbError> {
    let mut products: HashMap<i64, Vec<i64>> = HashMap::new();
    if upstream.is_empty() {
        return Ok(products);
    }
    let mut runs = Vec::new();
    let mut completed = Vec::new();
    for g in needed.ones() {
        let group = view.group(g as GroupId);
        completed.clear();
        let mut wait = false;
        for up in upstream {
            for &u in up.groups_for(g, &group.members).iter() {
                match up.state.progress.get(u as usize).copied().flatten() {
                    Some(Progress::Completed { run_id }) => completed.push(run_id),
                    Some(Progress::FailedForGood) => {}
                    Some(Progress::InFlight) | None => wait = true,
                }
            }
        }
        if !wait {
            runs.extend_from_slice(&completed);
        }
    }
    runs.sort_unstable();
    runs.dedup();
    let ask = match cx.products {
        // A cold cycle's index of every run's products; runs completed since it was read
        // are asked for.
        Some(index) => runs
            .into_iter()
            .filter(|run| match index.of(*run) {
                Some(found) => {
                    products.entry(*run).or_default().extend(found);
                    false
                }
                None => true,
            })
            .collect(),
        None => runs,
    };
    for (run, product) in cx.db.products_of_runs(&ask).await? {
        products.entry(run).or_default().push(product);
    }
    Ok(products)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_index_finds_each_runs_products_and_nothing_for_others() {
        let index = ProductIndex {
            rows: vec![(3, 30), (3, 31), (8, 80)],
        };
        let of = |run| index.of(run).map(|p| p.collect::<Vec<_>>());
        assert_eq!(of(3), Some(vec![30, 31]));
        assert_eq!(of(8), Some(vec![80]));
        // Not in the index (completed since, or without products): asked for on its own.
        assert_eq!(of(4), None);
        assert_eq!(of(1), None);
        assert_eq!(of(9), None);
    }
}

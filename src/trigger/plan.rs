//! A pipeline's definition checked and resolved for one cycle: its rules parsed, each
//! step's dimensions, software version and upstream steps. Pure; a definition error names
//! the pipeline's part that is wrong and leaves the other pipelines alone.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::db::pipelines::{PipelineRow, SoftwareVersionRow, StepRow, TriggerRequestRow};
use crate::definitions::cron;
use crate::definitions::version::{self, Candidate, VersionPolicy};
use crate::filter::{self, Dimension, Rule};

/// Everything the trigger-manager reads of the enabled pipelines, read in a few queries.
#[derive(Debug, Default)]
pub struct Definitions {
    pub pipelines: Vec<PipelineRow>,
    pub steps: HashMap<i64, Vec<StepRow>>,
    /// Upstream steps of each step.
    pub upstream: HashMap<i64, Vec<i64>>,
    /// Versions of each software.
    pub versions: HashMap<i64, Vec<SoftwareVersionRow>>,
    /// Pending trigger requests of each pipeline, oldest first.
    pub requests: HashMap<i64, Vec<TriggerRequestRow>>,
}

/// Which packages a pipeline reads: pipelines with the same key share one selection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SelectionKey {
    /// The filter rules as canonical JSON (object keys sorted).
    pub rules: String,
    pub instrument_module_id: Option<i64>,
}

/// One step, resolved.
#[derive(Debug)]
pub struct StepPlan<'a> {
    pub row: &'a StepRow,
    pub dims: Vec<Dimension>,
    pub software: &'a SoftwareVersionRow,
    pub config: Value,
    /// Indexes of the upstream steps in the pipeline's step list (all earlier).
    pub upstream: Vec<usize>,
    /// Some later step depends on this one (only then are its products read).
    pub feeds_downstream: bool,
}

/// One pipeline, resolved.
#[derive(Debug)]
pub struct PipelinePlan<'a> {
    pub row: &'a PipelineRow,
    pub rules: Vec<Rule>,
    pub selection: SelectionKey,
    pub steps: Vec<StepPlan<'a>>,
    /// Changes whenever anything in the definition that decides gaps changes.
    pub digest: u64,
}

/// Whether a pipeline's trigger fires now, and the cron tick it fires for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    pub scheduled: bool,
    pub cron_tick: Option<DateTime<Utc>>,
}

/// Decides whether a pipeline's own trigger fires at `now` (requests aside).
pub fn firing(pipeline: &PipelineRow, now: DateTime<Utc>) -> Result<Firing, String> {
    match pipeline.trigger_type.as_str() {
        "CONTINUOUS" => Ok(Firing {
            scheduled: true,
            cron_tick: None,
        }),
        "CRON" => {
            let config = pipeline.trigger_config.value("trigger_config")?;
            let expression = config
                .get("cron")
                .and_then(Value::as_str)
                .ok_or("trigger_config of a CRON pipeline needs a \"cron\" expression")?;
            let schedule = cron::parse(expression)?;
            let cron_tick = cron::due_tick(&schedule, pipeline.last_cron_tick, now);
            Ok(Firing {
                scheduled: cron_tick.is_some(),
                cron_tick,
            })
        }
        "MANUAL" => Ok(Firing {
            scheduled: false,
            cron_tick: None,
        }),
        other => Err(format!("unknown trigger_type {other:?}")),
    }
}

/// Resolves a pipeline's definition, or says what is wrong with it.
pub fn plan<'a>(
    pipeline: &'a PipelineRow,
    defs: &'a Definitions,
) -> Result<PipelinePlan<'a>, String> {
    let grouping_error = |e: String| format!("data grouping {}: {e}", pipeline.data_grouping_name);
    let filter_rules = pipeline
        .filter_rules
        .value("filter_rules")
        .map_err(grouping_error)?;
    let rules = filter::parse_rules(&filter_rules).map_err(|e| grouping_error(e.to_string()))?;
    let rows: &[StepRow] = defs.steps.get(&pipeline.id).map_or(&[], Vec::as_slice);
    let mut steps = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        let step_error = |message: String| format!("step {}: {message}", row.name);
        let group_by = row.group_by.value("group_by").map_err(step_error)?;
        let dims = filter::parse_group_by(&group_by).map_err(step_error)?;
        let policy = VersionPolicy::from_db(&row.version_policy).ok_or_else(|| {
            step_error(format!("unknown version_policy {:?}", row.version_policy))
        })?;
        let versions: &[SoftwareVersionRow] = defs
            .versions
            .get(&row.reduction_software_id)
            .map_or(&[], Vec::as_slice);
        let candidates: Vec<Candidate> = versions
            .iter()
            .map(|v| Candidate {
                id: v.id,
                version: v.version.clone(),
                deprecated: v.deprecated,
            })
            .collect();
        let chosen = version::resolve(policy, row.reduction_software_version_id, &candidates)
            .map_err(step_error)?;
        let software = versions
            .iter()
            .find(|v| v.id == chosen.id)
            .expect("chosen from these versions");
        let mut upstream = Vec::new();
        for up in defs.upstream.get(&row.id).into_iter().flatten() {
            // Steps come in (step_order, id) order: an upstream step must come earlier.
            match rows[..index].iter().position(|s| s.id == *up) {
                Some(i) => upstream.push(i),
                None => {
                    return Err(step_error(
                        "depends on a step that does not come before it in step_order".into(),
                    ));
                }
            }
        }
        let config = match &row.parameters {
            Some(p) => p.value("the step configuration").map_err(step_error)?,
            None => Value::Object(Default::default()),
        };
        steps.push(StepPlan {
            row,
            dims,
            software,
            config,
            upstream,
            feeds_downstream: false,
        });
    }
    let fed: Vec<usize> = steps.iter().flat_map(|s| s.upstream.clone()).collect();
    for u in fed {
        steps[u].feeds_downstream = true;
    }

    let selection = SelectionKey {
        rules: filter_rules.to_string(),
        instrument_module_id: pipeline.instrument_module_id,
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    selection.hash(&mut hasher);
    pipeline.trigger_type.hash(&mut hasher);
    for step in &steps {
        (
            step.row.id,
            &step.row.name,
            &step.dims,
            step.row.cooldown_seconds,
            step.row.max_retries,
            &step.upstream,
        )
            .hash(&mut hasher);
        (
            step.software.id,
            &step.software.version,
            &step.software.image_ref,
            &step.software.image_digest,
        )
            .hash(&mut hasher);
        step.config.to_string().hash(&mut hasher);
    }
    Ok(PipelinePlan {
        row: pipeline,
        rules,
        selection,
        steps,
        digest: hasher.finish(),
    })
}

//! Dispatch: where the managers' per-run work runs.
//!
//! - `inline` (the default; no broker needed): in the manager's own process.
//! - `celery`: handed to the Python Celery workers. A hand-off is recorded in the outbox
//!   ([`crate::db::outbox`]) in the same transaction as the state change that needs it,
//!   then published by [`Publisher`] at the end of the cycle. Redis away: the hand-offs
//!   stay recorded and the next cycles publish them, in order, with the ids they were
//!   recorded with. A message delivered twice does no harm: the tasks check the run's
//!   state before acting.
//!
//! The hand-offs: a run whose inputs are ready is submitted by
//! `ccat_workflow_manager.tasks.submit_run` (queue `workflow.hpc`), a run whose job
//! succeeded is collected by `ccat_workflow_manager.tasks.collect_run` (`workflow.results`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::celery::{BrokerOptions, Producer, QUEUE_HPC, QUEUE_RESULTS, Task};
use crate::config::RedisSettings;
use crate::db::outbox::Handoff;
use crate::db::{Database, DbError};

pub const TASK_SUBMIT_RUN: &str = "ccat_workflow_manager.tasks.submit_run";
pub const TASK_COLLECT_RUN: &str = "ccat_workflow_manager.tasks.collect_run";
/// Hand-offs published per Redis round trip.
const BATCH: i64 = 500;

pub use crate::config::DispatchMode;

fn handoff(task_name: &str, queue: &str, run_id: i64, location: i64) -> Handoff {
    Handoff {
        processing_location_id: Some(location),
        task_id: uuid::Uuid::new_v4().to_string(),
        task_name: task_name.to_owned(),
        queue: queue.to_owned(),
        priority: 0,
        args: json!([run_id]),
        kwargs: json!({}),
    }
}

/// Submit a run (of processing location `location`) whose inputs are ready.
pub fn submit_run(run_id: i64, location: i64) -> Handoff {
    handoff(TASK_SUBMIT_RUN, QUEUE_HPC, run_id, location)
}

/// Collect the outputs of a run (of processing location `location`) whose job succeeded.
pub fn collect_run(run_id: i64, location: i64) -> Handoff {
    handoff(TASK_COLLECT_RUN, QUEUE_RESULTS, run_id, location)
}

/// What one publishing pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishReport {
    pub published: usize,
    /// Hand-offs still waiting (Redis away).
    pub backlog: i64,
    pub error: Option<String>,
}

/// Publishes the outbox to the Redis broker; reconnects after an outage.
pub struct Publisher {
    client: redis::Client,
    options: BrokerOptions,
    producer: Option<Producer>,
    /// Publishes only the hand-offs of this processing location (and those recorded
    /// without one): two deployments on one ops-db never publish each other's.
    location: Option<i64>,
    /// Set while Redis is away, so the outage is logged once, not every cycle.
    outage: bool,
}

impl Publisher {
    pub fn new(redis: &RedisSettings, global_keyprefix: &str) -> redis::RedisResult<Self> {
        Ok(Publisher {
            client: crate::health::redis_client(redis)?,
            options: BrokerOptions {
                global_keyprefix: global_keyprefix.to_owned(),
                ..Default::default()
            },
            producer: None,
            location: None,
            outage: false,
        })
    }

    /// Publishes only the hand-offs recorded for `location`.
    pub fn for_location(mut self, location: i64) -> Self {
        self.location = Some(location);
        self
    }

    /// Publishes every unpublished hand-off, oldest first, in pipelined batches.
    pub async fn publish_pending(&mut self, db: &Database) -> Result<PublishReport, DbError> {
        let mut report = PublishReport::default();
        loop {
            let rows = db.unpublished_handoffs(BATCH, self.location).await?;
            if rows.is_empty() {
                break;
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let tasks: Vec<Task> = rows
                .into_iter()
                .map(|r| Task {
                    name: r.task_name,
                    id: r.task_id,
                    args: match r.args.0 {
                        Value::Array(items) => items,
                        other => vec![other],
                    },
                    kwargs: match r.kwargs.0 {
                        Value::Object(map) => map,
                        _ => Default::default(),
                    },
                    queue: r.queue,
                    priority: r.priority.clamp(0, 9) as u8,
                    eta: None,
                    expires: None,
                    time_limit: None,
                    soft_time_limit: None,
                })
                .collect();
            let result = match self.producer.as_mut() {
                Some(producer) => producer.publish(&tasks).await,
                None => match Producer::connect(self.client.clone(), self.options.clone()).await {
                    Ok(producer) => self.producer.insert(producer).publish(&tasks).await,
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    db.finish_publish(&ids, None, chrono::Utc::now()).await?;
                    report.published += ids.len();
                    if self.outage {
                        tracing::info!("Redis reachable again; publishing the recorded hand-offs");
                        self.outage = false;
                    }
                }
                Err(e) => {
                    let error = e.to_string();
                    db.finish_publish(&ids, Some(&error), chrono::Utc::now())
                        .await?;
                    // A fresh connection next time.
                    self.producer = None;
                    if !self.outage {
                        tracing::warn!(%error, "Redis unavailable: hand-offs kept for the next cycles");
                        self.outage = true;
                    }
                    report.error = Some(error);
                    break;
                }
            }
        }
        report.backlog = db.handoff_backlog(self.location).await?;
        Ok(report)
    }
}

/// The publisher `DISPATCH_MODE` asks for: None when work runs inline.
pub fn publisher_for(settings: &crate::config::Settings) -> redis::RedisResult<Option<Publisher>> {
    match settings.workflow.dispatch_mode {
        DispatchMode::Inline => Ok(None),
        DispatchMode::Celery => {
            Publisher::new(&settings.redis, &settings.workflow.celery_global_keyprefix)
                .map(|p| Some(p.for_location(settings.processing_location_id)))
        }
    }
}

//! The trigger-manager's steady state: with the three managers running and nothing new
//! (runs held in staging, their leases renewed every cycle), a trigger cycle reads the
//! change marks and nothing else.
//!
//! The queries are counted, not timed: sqlx reports every statement as a `sqlx::query`
//! tracing event, and a process-wide subscriber counts them. That is why this test has a
//! binary of its own: nothing else runs beside it.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::ResultManager;
use ccat_workflow_manager::trigger::{self, TriggerOptions};
use ccat_workflow_manager::workflow::WorkflowManager;
use chrono::Utc;
use common::TestDatabase;
use common::lifecycle::{self, command_json, pipeline_sql};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Every statement sent so far, by its summary (sqlx's first words of it).
static QUERIES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Rounds of the three managers before a steady state must have been seen (PostgreSQL
/// only; SQLite must be quiet from the second).
const ROUNDS: usize = 200;

struct RecordQueries;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecordQueries {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            let mut summary = Summary(String::new());
            event.record(&mut summary);
            QUERIES.lock().unwrap().push(summary.0);
        }
    }
}

struct Summary(String);

impl tracing::field::Visit for Summary {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "summary" {
            value.clone_into(&mut self.0);
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" {
            self.0 = format!("{value:?}");
        }
    }
}

/// The statements `work` sent to the database, but for a new connection's setup: the
/// pool opens one whenever the connections just used are still on their way back to it
/// (sqlx returns them from a task of their own), and its PRAGMAs are no work of the cycle.
async fn queries<T>(work: impl std::future::Future<Output = T>) -> (T, Vec<String>) {
    let before = QUERIES.lock().unwrap().len();
    let out = work.await;
    let sent = QUERIES.lock().unwrap()[before..]
        .iter()
        .filter(|s| !s.starts_with("PRAGMA"))
        .cloned()
        .collect();
    (out, sent)
}

async fn max_lease(db: &Database) -> Option<chrono::DateTime<Utc>> {
    const SQL: &str = "SELECT MAX(lease_expires_at) FROM executed_reduction_step";
    match db {
        Database::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await.unwrap(),
    }
}

#[tokio::test]
async fn with_all_three_managers_running_a_quiet_trigger_cycle_reads_only_the_marks() {
    tracing_subscriber::registry().with(RecordQueries).init();
    for t in TestDatabase::both_migrated("steady").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        let options = TriggerOptions {
            processing_location_id: 1,
            max_new_runs_per_pipeline: 10_000,
            dry_run: false,
            only_pipeline: None,
            list_gaps: false,
        };
        let local = || LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()]);
        let mut evaluator = trigger::Evaluator::default();
        // Staging through data-transfer, which never answers: the runs stay in
        // STAGING_DATA and the workflow-manager renews their leases every cycle.
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::DataTransfer));
        let rm = ResultManager::new(db.clone(), local(), site.result_options());
        let report = evaluator.cycle(db, &options, Utc::now()).await.unwrap();
        assert_eq!(report.created(), 3, "{}", t.url);
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().staging_requested, 3);

        // PostgreSQL's horizon is the oldest open transaction of the whole server: while
        // another process holds one, recent writes are reported again (correctly). So
        // the cycles are repeated until three in a row are quiet; SQLite is exact.
        let mut quiet_in_a_row = 0;
        let mut leases = Vec::new();
        for round in 0..ROUNDS {
            tokio::time::sleep(Duration::from_millis(50)).await;
            wm.cycle(Utc::now()).await.unwrap();
            rm.cycle(Utc::now()).await.unwrap();
            leases.push(max_lease(db).await);
            let (report, sent) = queries(evaluator.cycle(db, &options, Utc::now())).await;
            let report = report.unwrap();
            assert_eq!(report.created(), 0, "{}", t.url);
            if sent.len() == 1 {
                quiet_in_a_row += 1;
                if quiet_in_a_row == 3 {
                    break;
                }
            } else {
                quiet_in_a_row = 0;
                let blocker = db.oldest_open_transaction().await.unwrap();
                assert!(
                    matches!(db, Database::Postgres(_)) && round < ROUNDS - 1 || round == 0,
                    "round {round}: a steady-state trigger cycle sent {sent:?}: {report:?} \
                     (oldest open transaction: {blocker:?}) {}",
                    t.url
                );
            }
        }
        assert_eq!(quiet_in_a_row, 3, "never quiet: {}", t.url);
        leases.dedup();
        assert!(
            leases.len() > 2,
            "the leases were renewed meanwhile: {leases:?}"
        );
    }
}

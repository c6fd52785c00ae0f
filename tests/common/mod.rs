//! Test support: a fresh database per test, on SQLite and on PostgreSQL.
//!
//! PostgreSQL comes from `CCAT_TEST_POSTGRES_URL` (a role that may create databases);
//! `scripts/services.sh` provides one, and `nox -s tests` sets it. Without it the
//! PostgreSQL half of a test fails with a message saying so: it is never skipped.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use ccat_workflow_manager::db::Database;
use sqlx::Connection;

pub mod lifecycle;
pub mod slurm;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn postgres_admin_url() -> String {
    std::env::var("CCAT_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "CCAT_TEST_POSTGRES_URL is not set: run the tests with `nox -s tests`, or \
             `eval \"$(bash scripts/services.sh up)\"` first"
        )
    })
}

/// A unique, valid database name for this test.
fn unique_name(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    format!(
        "wfm_{label}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub use ccat_workflow_manager::db::with_database;

/// A database that exists for one test and is removed afterwards.
pub struct TestDatabase {
    pub db: Database,
    pub url: String,
    cleanup: Cleanup,
    _dir: Option<tempfile::TempDir>,
}

enum Cleanup {
    Nothing,
    DropPostgres { admin_url: String, name: String },
}

impl TestDatabase {
    pub async fn sqlite(label: &str) -> TestDatabase {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}",
            dir.path()
                .join(format!("{}.db", unique_name(label)))
                .display()
        );
        let db = Database::connect_url(&url).await.expect("open sqlite");
        TestDatabase {
            db,
            url,
            cleanup: Cleanup::Nothing,
            _dir: Some(dir),
        }
    }

    pub async fn postgres(label: &str) -> TestDatabase {
        let admin_url = postgres_admin_url();
        let name = unique_name(label);
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test PostgreSQL");
        // The name is generated above from [a-z0-9_] only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let db = Database::connect_url(&url)
            .await
            .expect("open test database");
        TestDatabase {
            db,
            url,
            cleanup: Cleanup::DropPostgres { admin_url, name },
            _dir: None,
        }
    }

    /// Drops the database and creates an empty one under the same name (the same URL),
    /// as an operator re-creating ops-db would.
    pub async fn recreate(&mut self) {
        self.db.close().await;
        match &self.cleanup {
            Cleanup::DropPostgres { admin_url, name } => {
                let mut admin = sqlx::PgConnection::connect(admin_url).await.unwrap();
                for sql in [
                    format!("DROP DATABASE \"{name}\" WITH (FORCE)"),
                    format!("CREATE DATABASE \"{name}\""),
                ] {
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut admin)
                        .await
                        .unwrap();
                }
                admin.close().await.ok();
            }
            Cleanup::Nothing => {
                let path = self.url.trim_start_matches("sqlite://").to_owned();
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{path}{suffix}"));
                }
            }
        }
        self.db = Database::connect_url(&self.url).await.unwrap();
    }

    /// Both kinds, SQLite first: the body of a test runs once on each.
    pub async fn both(label: &str) -> Vec<TestDatabase> {
        vec![Self::sqlite(label).await, Self::postgres(label).await]
    }

    /// Same, with the product's migrations applied.
    pub async fn both_migrated(label: &str) -> Vec<TestDatabase> {
        let dbs = Self::both(label).await;
        for t in &dbs {
            t.db.migrate().await.expect("migrate");
        }
        dbs
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::DropPostgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's (blocked) runtime, so a separate thread with its
            // own runtime does the work; FORCE ends the pool's connections, which belong
            // to the test's runtime and cannot be closed from here.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        )))
                        .execute(&mut admin)
                        .await;
                    }
                });
            })
            .join()
            .ok();
        }
    }
}

/// Runs a test's own SQL text (schema surgery, fixtures) on either database.
pub async fn exec(db: &Database, sql: &str) -> Result<(), sqlx::Error> {
    // Test-authored SQL only; product SQL lives in the db module.
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Database::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    }
}

/// A small archive: CHAI (modules LFA, HFA) and PrimeCam scans of three sources over
/// four nights; package 6 is still transferring.
pub const ARCHIVE: &str = r#"
INSERT INTO instrument (id, name) VALUES (1, 'CHAI'), (2, 'PrimeCam');
INSERT INTO instrument_module (id, name, instrument_id) VALUES (1, 'LFA', 1), (2, 'HFA', 1), (3, '280GHz', 2);
INSERT INTO source (id, name) VALUES (1, 'NGC253'), (2, 'M82'), (3, 'Orion/../KL');
INSERT INTO line (id, name) VALUES (1, 'CO43'), (2, 'CII');
INSERT INTO obs_unit (id, name, source_id, line_id) VALUES (1, 'ou-ngc', 1, 1), (2, 'ou-m82', 2, 2), (3, 'ou-orion', 3, NULL);
INSERT INTO executed_obs_unit (id, obs_unit_id, start_time) VALUES
  (1, 1, '2026-01-10T23:30:00+00:00'),
  (2, 1, '2026-01-11T01:30:00+02:00'),
  (3, 2, '2026-01-12T05:00:00+00:00'),
  (4, 3, '2026-01-13T10:00:00+00:00');
INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state, size_bytes, metadata) VALUES
  (1, 'p1', 1, 1, 'ARCHIVED', 10, '{"observation": {"frequency_ghz": 230.5, "mode": "otf"}, "quality": {"ok": true}}'),
  (2, 'p2', 1, 2, 'ARCHIVED', 20, '{"observation": {"frequency_ghz": 460, "mode": "otf"}}'),
  (3, 'p3', 2, 1, 'ARCHIVED', 30, '{"observation": {"frequency_ghz": 230.5, "mode": "pointing"}, "quality": {"ok": false}}'),
  (4, 'p4', 3, 1, 'ARCHIVED', 40, '{"observation": {"frequency_ghz": "unknown"}}'),
  (5, 'p5', 4, 3, 'ARCHIVED', 50, '{}'),
  (6, 'p6', 3, 2, 'TRANSFERRING', 60, '{"observation": {"mode": "otf"}}');
"#;

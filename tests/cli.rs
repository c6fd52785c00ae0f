//! The `ccat-wfm` binary as an operator uses it.

mod common;

use std::process::{Command, Output};

use common::TestDatabase;

fn wfm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(args).env_remove("RUST_LOG");
    // Keep the developer's own settings out of the test.
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_")
            || key.starts_with("CCAT_OPS_DB_")
            || key.ends_with("_FOR_DYNACONF")
        {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(std::env::temp_dir());
    cmd.envs(env.iter().copied());
    cmd.output().expect("run ccat-wfm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_command_has_help_and_version_works() {
    for args in [
        vec!["--help"],
        vec!["db", "--help"],
        vec!["db", "migrate", "--help"],
        vec!["db", "check", "--help"],
        vec!["config", "--help"],
        vec!["config", "show", "--help"],
        vec!["gaps", "--help"],
        vec!["trigger", "--help"],
        vec!["trigger-manager", "--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
        vec!["demo", "--help"],
        vec!["retry", "--help"],
        vec!["enable", "--help"],
        vec!["disable", "--help"],
        vec!["runs", "show", "--help"],
        vec!["workflow-manager", "--help"],
        vec!["result-manager", "--help"],
        vec!["cancel", "--help"],
        vec!["lineage", "product", "--help"],
        vec!["lineage", "package", "--help"],
    ]
    .into_iter()
    .chain(
        // The benchmarks are built with the cargo feature `bench` only.
        cfg!(feature = "bench")
            .then(|| {
                [
                    vec!["bench", "slurm", "--help"],
                    vec!["bench", "checksum", "--help"],
                ]
            })
            .into_iter()
            .flatten(),
    ) {
        let out = wfm(&args, &[]);
        assert!(out.status.success(), "{args:?}");
        assert!(
            stdout(&out).contains("Usage: ccat-wfm"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
    let out = wfm(&["--version"], &[]);
    assert_eq!(
        stdout(&out).trim(),
        format!("ccat-wfm {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_commands_do_not_pretend_to_succeed() {
    let out = wfm(&["trigger-manager-that-does-not-exist"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn migrate_then_check_on_both_databases_and_a_missing_column_fails() {
    for t in TestDatabase::both("cli").await {
        let out = wfm(&["db", "migrate", "--database-url", &t.url], &[]);
        assert!(out.status.success(), "{}: {:?}", t.url, out);
        assert!(
            stdout(&out).contains("applied migration(s) 1, 2"),
            "{}",
            stdout(&out)
        );
        let out = wfm(&["db", "check", "--database-url", &t.url], &[]);
        assert!(out.status.success(), "{}: {:?}", t.url, out);

        common::exec(&t.db, "ALTER TABLE pipeline DROP COLUMN description")
            .await
            .unwrap();
        let out = wfm(&["db", "check", "--database-url", &t.url], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", t.url);
        assert!(
            stdout(&out).contains("missing column pipeline.description"),
            "{}",
            stdout(&out)
        );
        let out = wfm(&["db", "check", "--json", "--database-url", &t.url], &[]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["missing_columns"],
            serde_json::json!([["pipeline", "description"]])
        );
    }
}

#[test]
fn configured_sqlite_database_is_created_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/ops.sqlite");
    let env = [(
        "CCAT_OPS_DB_DATABASE_SQLITE_DATABASE",
        path.to_str().unwrap(),
    )];
    assert!(wfm(&["db", "migrate"], &env).status.success());
    assert!(path.exists());
    let out = wfm(&["db", "check"], &env);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn config_show_masks_secrets_and_reports_the_settings_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.toml");
    std::fs::write(
        &file,
        "[default]\nhpc_backend = \"slurm\"\n[localdev]\nredis_password = \"redis-secret\"\n",
    )
    .unwrap();
    let env = [
        ("CCAT_OPS_DB_DATABASE_TYPE", "postgresql"),
        ("CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD", "db-secret"),
    ];
    let out = wfm(
        &["--settings", file.to_str().unwrap(), "config", "show"],
        &env,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("hpc_backend") && text.contains("slurm"),
        "{text}"
    );
    assert!(text.contains("********"), "{text}");
    assert!(
        !text.contains("redis-secret") && !text.contains("db-secret"),
        "{text}"
    );
    let out = wfm(
        &[
            "--settings",
            file.to_str().unwrap(),
            "config",
            "show",
            "--json",
        ],
        &env,
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["database"]["type"], "postgresql");
    assert_eq!(json["redis"]["password"], "********");
}

#[test]
fn invalid_settings_are_named_and_exit_2() {
    let out = wfm(
        &["config", "show"],
        &[("CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID", "zero")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PROCESSING_LOCATION_ID"), "{err}");
}

#[test]
fn a_mistyped_setting_is_warned_about_with_the_nearest_key_and_refused_when_strict() {
    let typo = [("CCAT_WORKFLOW_MANAGER_HPC_BACKED", "slurm")];
    let out = wfm(&["config", "show", "--json"], &typo);
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["unknown_keys"][0]["key"], "HPC_BACKED", "{shown}");
    assert_eq!(shown["unknown_keys"][0]["did_you_mean"], "HPC_BACKEND");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean HPC_BACKEND?"), "{err}");
    let strict = wfm(
        &["config", "show"],
        &[typo[0], ("CCAT_WORKFLOW_MANAGER_STRICT_SETTINGS", "true")],
    );
    assert_eq!(strict.status.code(), Some(2), "{strict:?}");
    assert!(String::from_utf8_lossy(&strict.stderr).contains("HPC_BACKED"));
}

#[test]
fn a_database_url_of_another_kind_is_refused_not_guessed() {
    let out = wfm(
        &[
            "db",
            "check",
            "--database-url",
            "mysql://u:secret@127.0.0.1/ops",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"mysql\" is not a database this product speaks"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}

#[tokio::test]
async fn a_missing_table_is_named_without_server_internals_with_what_to_run() {
    for t in common::TestDatabase::both("unmigrated").await {
        let out = wfm(&["status", "--database-url", &t.url], &[]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ccat-wfm db check"), "{}: {err}", t.url);
        assert!(!err.contains(" at line "), "{}: {err}", t.url);
    }
}

/// A CONTINUOUS pipeline over the common archive, one per-night step.
const NIGHTLY: &str = r#"
INSERT INTO data_location (id, name, location_type) VALUES (1, 'proc', 'PROCESSING');
INSERT INTO data_grouping (id, name, filter_rules) VALUES (1, 'everything', '[]');
INSERT INTO reduction_software (id, name) VALUES (1, 'mapper');
INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref) VALUES (1, 1, '1.0.0', 'm:1');
INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type) VALUES (1, 'nightly', 1, 1, 'MANUAL');
INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id, group_by)
  VALUES (1, 1, 'map', 1, 1, '["night"]');
"#;

#[tokio::test]
async fn gaps_trigger_and_trigger_manager_from_the_command_line() {
    for t in TestDatabase::both_migrated("cli_trigger").await {
        common::exec(&t.db, common::ARCHIVE).await.unwrap();
        common::exec(&t.db, NIGHTLY).await.unwrap();
        common::exec(&t.db, "UPDATE pipeline SET trigger_type = 'CONTINUOUS'")
            .await
            .unwrap();
        let db = ["--database-url", t.url.as_str()];

        let out = wfm(&[&["gaps"][..], &db].concat(), &[]);
        assert!(out.status.success(), "{out:?}");
        let text = stdout(&out);
        assert!(
            text.contains("night=2026-01-10") && text.contains("3 gap(s)"),
            "{text}"
        );
        let out = wfm(&[&["gaps", "--json"][..], &db].concat(), &[]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["pipelines"][0]["gaps"].as_array().unwrap().len(), 3);
        assert_eq!(
            wfm(&[&["gaps", "--pipeline", "nope"][..], &db].concat(), &[])
                .status
                .code(),
            Some(2)
        );

        let out = wfm(&[&["trigger-manager", "--once"][..], &db].concat(), &[]);
        assert!(out.status.success(), "{out:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["pipelines"][0]["created"], 3, "{report}");
        let out = wfm(&[&["gaps"][..], &db].concat(), &[]);
        assert!(stdout(&out).contains("0 gap(s)"), "{}", stdout(&out));

        // MANUAL: a forced request for one night makes one more run.
        common::exec(&t.db, "UPDATE pipeline SET trigger_type = 'MANUAL'")
            .await
            .unwrap();
        let out = wfm(
            &[
                &[
                    "trigger",
                    "nightly",
                    "--step",
                    "map",
                    "--sub-group",
                    "night=2026-01-12",
                    "--force",
                ][..],
                &db,
            ]
            .concat(),
            &[],
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            wfm(&[&["trigger", "nope"][..], &db].concat(), &[])
                .status
                .code(),
            Some(2)
        );
        assert_eq!(
            wfm(
                &[&["trigger", "nightly", "--step", "nope"][..], &db].concat(),
                &[]
            )
            .status
            .code(),
            Some(2)
        );

        // The loop handles the request, then stops cleanly on SIGTERM.
        // Its heartbeat goes to the test Redis.
        let redis = std::env::var("CCAT_TEST_REDIS_URL").expect("CCAT_TEST_REDIS_URL");
        let (redis_host, redis_port) = redis
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, p)| (h.to_owned(), p.to_owned()))
            .expect("redis://host:port/db");
        let child = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"))
            .args([&["trigger-manager"][..], &db].concat())
            .env("CCAT_WORKFLOW_MANAGER_TRIGGER_MANAGER_POLL_INTERVAL", "0.2")
            .env("CCAT_WORKFLOW_MANAGER_REDIS_HOST", &redis_host)
            .env("CCAT_WORKFLOW_MANAGER_REDIS_PORT", &redis_port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let runs: i64 = match &t.db {
                ccat_workflow_manager::db::Database::Postgres(p) => {
                    sqlx::query_scalar("SELECT COUNT(*) FROM executed_reduction_step")
                        .fetch_one(p)
                        .await
                }
                ccat_workflow_manager::db::Database::Sqlite(p) => {
                    sqlx::query_scalar("SELECT COUNT(*) FROM executed_reduction_step")
                        .fetch_one(p)
                        .await
                }
            }
            .unwrap();
            if runs == 4 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the forced run was not created"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let health = |code: i32| {
            let out = wfm(
                &["health", "--service", "trigger-manager"],
                &[
                    ("CCAT_WORKFLOW_MANAGER_REDIS_HOST", redis_host.as_str()),
                    ("CCAT_WORKFLOW_MANAGER_REDIS_PORT", redis_port.as_str()),
                ],
            );
            assert_eq!(out.status.code(), Some(code), "{out:?}");
        };
        // The first beat is written as the loop starts; allow it a moment.
        for _ in 0..50 {
            let out = wfm(
                &["health", "--service", "trigger-manager"],
                &[
                    ("CCAT_WORKFLOW_MANAGER_REDIS_HOST", redis_host.as_str()),
                    ("CCAT_WORKFLOW_MANAGER_REDIS_PORT", redis_port.as_str()),
                ],
            );
            if out.status.success() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        health(0);
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("manager stopping") && stderr.contains("trigger-manager"),
            "{stderr}"
        );
        // A clean stop removes the health key: down at once.
        health(1);
        let client = redis::Client::open(redis.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::AsyncCommands::del(&mut c, "health:workflow:trigger-manager:status")
            .await
            .unwrap();
    }
}

#[test]
fn an_unreachable_database_is_named_with_its_cause_and_without_its_password() {
    let out = wfm(
        &[
            "db",
            "check",
            "--database-url",
            "postgres://wfm:hunter2@127.0.0.1:1/ops",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("postgres://wfm@127.0.0.1:1/ops") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn json_logs_carry_fields_and_no_secret_reaches_a_log_line() {
    let t = TestDatabase::sqlite("cli_logs").await;
    t.db.migrate().await.unwrap();
    common::exec(&t.db, common::ARCHIVE).await.unwrap();
    common::exec(&t.db, NIGHTLY).await.unwrap();
    common::exec(&t.db, "UPDATE pipeline SET trigger_type = 'CONTINUOUS'")
        .await
        .unwrap();
    let path = t.url.trim_start_matches("sqlite://").to_owned();
    let env = [
        ("CCAT_OPS_DB_DATABASE_SQLITE_DATABASE", path.as_str()),
        (
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD",
            "pg-secret-value",
        ),
        ("CCAT_WORKFLOW_MANAGER_REDIS_PASSWORD", "redis-secret-value"),
    ];
    let out = wfm(
        &[
            "--log-format",
            "json",
            "--log-level",
            "trace",
            "trigger-manager",
            "--once",
        ],
        &env,
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("secret-value"), "{stderr}");
    let created: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|v| v["message"] == "run created")
        .collect();
    assert_eq!(created.len(), 3, "{stderr}");
    assert_eq!(created[0]["pipeline"], "nightly");
    assert!(created[0]["run_id"].is_number() && created[0]["sub_group"].is_string());
}

#[tokio::test]
async fn run_drives_a_pipeline_to_completion_with_the_three_managers_in_one_process() {
    use common::lifecycle;
    let t = common::TestDatabase::sqlite("run_all").await;
    t.db.migrate().await.unwrap();
    let site = lifecycle::setup_site(
        &t.db,
        &lifecycle::pipeline_sql(&lifecycle::command_json(&["ok"]), 1.0, 0),
        None,
    )
    .await;
    common::exec(&t.db, lifecycle::MORE_STEPS).await.unwrap();
    let metrics_address = free_local_address();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    child
        .args(["run", "--database-url", &t.url])
        .args(["--metrics-address", &metrics_address])
        .current_dir(site.dir.path())
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("CCAT_OPS_DB_") {
            child.env_remove(key);
        }
    }
    for manager in ["TRIGGER", "WORKFLOW", "RESULT"] {
        child.env(
            format!("CCAT_WORKFLOW_MANAGER_{manager}_MANAGER_POLL_INTERVAL"),
            "0.2",
        );
    }
    // No heartbeat to a shared Redis: nothing listens on port 1.
    child
        .env("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "1")
        .env("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", site.base());
    let child = child.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut all = Vec::new();
    while std::time::Instant::now() < deadline {
        all = lifecycle::runs(&t.db).await;
        if all.len() == 8 && all.iter().all(|r| r.status == "COMPLETED") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The metrics endpoint counted every run of the pipeline through each stage, the
    // backend's calls and the cycles; /healthz finds all three loops healthy.
    // (The counter moves just after the run's COMPLETED is committed.)
    let mut scraped = http_get(&metrics_address, "/metrics");
    let series = "ccat_wfm_runs_completed_total{pipeline=\"calib\"}";
    while sample(&scraped.1, series) != Some(8.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        scraped = http_get(&metrics_address, "/metrics");
    }
    let (code, metrics) = scraped;
    let (health_code, health) = http_get(&metrics_address, "/healthz");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 200, "{metrics}\n{stderr}");
    for name in ["created", "claimed", "submitted", "completed"] {
        assert_eq!(
            sample(
                &metrics,
                &format!("ccat_wfm_runs_{name}_total{{pipeline=\"calib\"}}")
            ),
            Some(8.0),
            "{name}:\n{metrics}"
        );
    }
    assert_eq!(
        sample(&metrics, "ccat_wfm_runs_failed_total{pipeline=\"calib\"}"),
        None
    );
    assert_eq!(
        sample(
            &metrics,
            "ccat_wfm_backend_calls_total{backend=\"local\",operation=\"submit\"}"
        ),
        Some(8.0),
        "{metrics}"
    );
    for manager in ["trigger-manager", "workflow-manager", "result-manager"] {
        let cycles = sample(
            &metrics,
            &format!("ccat_wfm_cycles_total{{manager=\"{manager}\"}}"),
        );
        assert!(cycles.is_some_and(|n| n >= 1.0), "{manager}: {metrics}");
        let durations = sample(
            &metrics,
            &format!("ccat_wfm_cycle_duration_seconds_count{{manager=\"{manager}\"}}"),
        );
        assert_eq!(durations, cycles, "{manager}: {metrics}");
    }
    assert_eq!(health_code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["healthy"], true);
    assert_eq!(health["services"].as_array().map(Vec::len), Some(3));
    assert_eq!(all.len(), 8, "{all:?}\n{stderr}");
    assert!(
        all.iter().all(|r| r.status == "COMPLETED"),
        "{all:?}\n{stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    for manager in ["trigger-manager", "workflow-manager", "result-manager"] {
        assert!(
            stderr.contains("manager stopping") && stderr.contains(manager),
            "{manager}: {stderr}"
        );
    }

    // What an operator sees now: eight completed runs, nothing in flight, no failure.
    let out = wfm(&["status", "--json", "--database-url", &t.url], &[]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        status["pipelines"],
        serde_json::json!([{"pipeline": "calib", "enabled": true, "status": "COMPLETED", "runs": 8}])
    );
    assert_eq!(status["active"], serde_json::json!([]));
    assert_eq!(status["failures"], serde_json::json!([]));
    let out = wfm(&["status", "--database-url", &t.url], &[]);
    let text = stdout(&out);
    assert!(
        text.contains("calib") && text.contains("active runs (0)"),
        "{text}"
    );

    // One run, in detail; a retry of a completed run is refused with exit code 1, of a
    // failed one accepted.
    let id = all[0].id.to_string();
    let base = site.base().display().to_string();
    let out = wfm(
        &["runs", "show", &id, "--database-url", &t.url],
        &[("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", base.as_str())],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("status") && text.contains("COMPLETED"),
        "{text}"
    );
    assert!(
        text.contains("log tail:") && text.contains("of step calibrate"),
        "{text}"
    );
    let out = wfm(
        &["runs", "show", &id, "--json", "--database-url", &t.url],
        &[],
    );
    let run: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(run["exit_code"], 0);
    assert_eq!(
        wfm(&["runs", "show", "999", "--database-url", &t.url], &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        wfm(&["retry", &id, "--database-url", &t.url], &[])
            .status
            .code(),
        Some(1)
    );
    common::exec(
        &t.db,
        &format!("UPDATE executed_reduction_step SET status = 'FAILED' WHERE id = {id}"),
    )
    .await
    .unwrap();
    assert!(
        wfm(&["retry", &id, "--database-url", &t.url], &[])
            .status
            .success()
    );
    let run = lifecycle::runs(&t.db).await.remove(0);
    assert_eq!((run.status.as_str(), run.retry_count), ("PENDING", 1));

    // Disable and enable by name; an unknown name is exit 1.
    let disabled = wfm(&["disable", "calib", "--database-url", &t.url], &[]);
    assert!(disabled.status.success(), "{disabled:?}");
    let out = wfm(&["status", "--database-url", &t.url], &[]);
    assert!(stdout(&out).contains("calib (disabled)"), "{out:?}");
    let enabled = wfm(&["enable", "calib", "--database-url", &t.url], &[]);
    assert!(enabled.status.success(), "{enabled:?}");
    let unknown = wfm(&["enable", "nope", "--database-url", &t.url], &[]);
    assert_eq!(unknown.status.code(), Some(1));

    // A forced rerun of one step: `trigger` records the request, the next trigger cycle
    // creates the runs; one of them is cancelled (twice: the second is refused), then
    // retried.
    let unknown = wfm(&["trigger", "nope", "--database-url", &t.url], &[]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    let out = wfm(
        &[
            "trigger",
            "calib",
            "--step",
            "map",
            "--force",
            "--database-url",
            &t.url,
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let out = wfm(
        &["trigger-manager", "--once", "--database-url", &t.url],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        report["pipelines"][0]["created"].as_u64() >= Some(1),
        "{report}"
    );
    let forced = lifecycle::runs(&t.db).await.into_iter().last().unwrap();
    assert_eq!(forced.status, "PENDING");
    let forced_id = forced.id.to_string();
    let out = wfm(&["cancel", &forced_id, "--database-url", &t.url], &[]);
    assert!(
        out.status.success() && stdout(&out).contains("cancelled"),
        "{out:?}"
    );
    let again = wfm(&["cancel", &forced_id, "--database-url", &t.url], &[]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("run {forced_id} is already CANCELLED")),
        "{again:?}"
    );
    let none = wfm(&["cancel", "987654", "--database-url", &t.url], &[]);
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("there is no run 987654"));
    let out = wfm(&["status", "--json", "--database-url", &t.url], &[]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        status["pipelines"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"pipeline": "calib", "enabled": true, "status": "CANCELLED", "runs": 1})),
        "{status}"
    );
    let out = wfm(&["retry", &forced_id, "--database-url", &t.url], &[]);
    assert!(out.status.success(), "{out:?}");
    let out = wfm(
        &[
            "runs",
            "show",
            &forced_id,
            "--json",
            "--database-url",
            &t.url,
        ],
        &[],
    );
    let run: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(run["status"], "PENDING", "{run}");
}

/// An address on this host nobody listens on now.
fn free_local_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A plain HTTP/1.1 GET: status code and body.
fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the endpoint");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// The value of one sample (`name{labels}`) in a Prometheus text exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

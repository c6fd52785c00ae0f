//! A real one-node SLURM cluster for the tests (slurmctld + slurmd + munge, started by
//! `scripts/services.sh`, found through `CCAT_TEST_SLURM_CONF`), reached through small
//! wrappers around its commands: each logs its call, so the tests can count how the
//! managers treat the controller, and some misbehave on purpose (see [`Sbatch`],
//! [`Controller`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use ccat_workflow_manager::backend::slurm::SlurmBackend;
use ccat_workflow_manager::db::Database;

use super::lifecycle::{self, Site, command_json, pipeline_sql};
use super::{TestDatabase, exec};

pub const COMMANDS: [&str; 5] = ["sbatch", "squeue", "scontrol", "sacct", "scancel"];

pub fn slurm_conf() -> String {
    std::env::var("CCAT_TEST_SLURM_CONF").expect(
        "CCAT_TEST_SLURM_CONF is not set: start a test cluster with \
         `eval \"$(bash scripts/services.sh up)\"` (nox -s tests does)",
    )
}

/// How the wrapped `sbatch` misbehaves after submitting for real.
#[derive(Clone, Copy, PartialEq)]
pub enum Sbatch {
    Honest,
    /// Kills its caller (the manager) once the job is submitted.
    KillsCaller,
    /// Prints something that is not a job id.
    Garbles,
    /// Creates `sbatch.waiting` in the test's directory, then waits until the test
    /// creates `sbatch.go` before submitting: the test acts while `sbatch` runs.
    Gated,
}

/// What the wrapped controller remembers.
#[derive(Clone, Copy, PartialEq)]
pub enum Controller {
    Honest,
    /// `squeue` no longer lists finished jobs, in any query: the controller purged them
    /// (`MinJobAge` passed), as after a result-manager was down for a while.
    ForgetsFinishedJobs,
}

/// A directory of wrappers around the real SLURM commands: each appends its name to
/// `calls.log` and runs the real one with the test cluster's configuration. With
/// `kill_after_sbatch`, sbatch kills its caller once the job is submitted.
pub fn wrappers(dir: &Path, kill_after_sbatch: bool) -> PathBuf {
    wrappers_with(
        dir,
        if kill_after_sbatch {
            Sbatch::KillsCaller
        } else {
            Sbatch::Honest
        },
    )
}

pub fn wrappers_with(dir: &Path, sbatch: Sbatch) -> PathBuf {
    wrappers_for(dir, sbatch, Controller::Honest)
}

pub fn wrappers_for(dir: &Path, sbatch: Sbatch, controller: Controller) -> PathBuf {
    let bin = dir.join(format!(
        "bin-{}-{}",
        match sbatch {
            Sbatch::Honest => "honest",
            Sbatch::KillsCaller => "crash",
            Sbatch::Garbles => "garble",
            Sbatch::Gated => "gated",
        },
        match controller {
            Controller::Honest => "remembers",
            Controller::ForgetsFinishedJobs => "forgets",
        }
    ));
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("calls.log");
    let (waiting, go) = (dir.join("sbatch.waiting"), dir.join("sbatch.go"));
    for name in COMMANDS {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .unwrap();
        let real = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(!real.is_empty(), "{name} is not installed");
        let run = match (name, sbatch, controller) {
            ("sbatch", Sbatch::KillsCaller, _) => {
                format!("out=$({real} \"$@\") || exit $?\necho \"$out\"\nkill -9 $PPID\n")
            }
            ("sbatch", Sbatch::Garbles, _) => {
                format!("{real} \"$@\" >/dev/null || exit $?\necho 'Submitted, probably'\n")
            }
            ("sbatch", Sbatch::Gated, _) => format!(
                "touch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.05; done\nexec {real} \"$@\"\n",
                waiting.display(),
                go.display()
            ),
            ("scontrol", _, Controller::ForgetsFinishedJobs) => "exit 0\n".to_owned(),
            // Every line whose first field is a finished job's id is left out.
            ("squeue", _, Controller::ForgetsFinishedJobs) => format!(
                "gone=$({real} --noheader --states=all --me --format='%i %T' | \
                 awk '$2 !~ /^(PENDING|RUNNING|CONFIGURING|COMPLETING|SUSPENDED)/ {{print $1}}' | tr '\\n' ' ')\n\
                 {real} \"$@\" | awk -F'[| ]' -v gone=\"$gone\" \
                 'BEGIN {{ n = split(gone, g, \" \"); for (i = 1; i <= n; i++) skip[g[i]] = 1 }} !($1 in skip)'\n"
            ),
            _ => format!("exec {real} \"$@\"\n"),
        };
        let script = format!(
            "#!/bin/sh\necho {name} >> '{}'\nSLURM_CONF='{}'\nexport SLURM_CONF\n{run}",
            log.display(),
            slurm_conf()
        );
        let path = bin.join(name);
        std::fs::write(&path, script).unwrap();
        std::process::Command::new("chmod")
            .args(["+x", path.to_str().unwrap()])
            .status()
            .unwrap();
    }
    bin
}

/// Waits until a [`Sbatch::Gated`] sbatch is waiting, then lets it go after `act`.
pub async fn while_sbatch_waits<F: std::future::Future<Output = ()>>(dir: &Path, act: F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !dir.join("sbatch.waiting").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "sbatch was never called"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    act.await;
    std::fs::write(dir.join("sbatch.go"), b"").unwrap();
}

/// The SLURM state of job `id` as the controller reports it, once it is `want` (or
/// after ten seconds, whatever it is then).
pub async fn job_state(site: &Site, id: &str, want: &str) -> String {
    let mut state = String::new();
    for _ in 0..100 {
        let out = Command::new(wrappers(site.dir.path(), false).join("squeue"))
            .args(["--noheader", "--states=all", "--jobs", id, "--format=%T"])
            .output()
            .unwrap();
        state = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        if state == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    state
}

/// Cancels jobs left running by a test.
pub fn scancel(site: &Site, ids: &[String]) {
    if !ids.is_empty() {
        Command::new(wrappers(site.dir.path(), false).join("scancel"))
            .args(ids)
            .status()
            .unwrap();
    }
}

/// Calls per command since the log was last taken.
pub fn take_calls(dir: &Path) -> std::collections::BTreeMap<String, usize> {
    let log = dir.join("calls.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    counts
}

pub fn backend(site: &Site) -> SlurmBackend {
    SlurmBackend {
        bin_dir: wrappers(site.dir.path(), false),
        ..Default::default()
    }
}

pub async fn setup(
    label: &str,
    command: &[&str],
    time_hours: f64,
    max_retries: i32,
) -> (TestDatabase, Site) {
    let t = TestDatabase::postgres(label).await;
    t.db.migrate().await.unwrap();
    let site = lifecycle::setup_site(
        &t.db,
        &pipeline_sql(&command_json(command), time_hours, max_retries),
        None,
    )
    .await;
    (t, site)
}

/// The jobs the cluster holds with this name (any state).
pub fn jobs_named(site: &Site, name: &str) -> Vec<String> {
    let out = Command::new(wrappers(site.dir.path(), false).join("squeue"))
        .args([
            "--noheader",
            "--states=all",
            &format!("--name={name}"),
            "--format=%i",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `n` runs of step 1 without retries, each on package 1 (whose copy is in the archive).
pub async fn insert_runs(db: &Database, n: usize) {
    exec(
        db,
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
             INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
               reduction_software_version_id, max_retries) SELECT 1, 'k' || i, 'f', 1, 0 FROM n; \
             INSERT INTO executed_reduction_step_raw_input (executed_reduction_step_id, raw_data_package_id) \
             SELECT id, 1 FROM executed_reduction_step WHERE reduction_step_id = 1;"
        ),
    )
    .await
    .unwrap();
}

/// One cycle of the `ccat-wfm workflow-manager` command on SLURM (commands in `bin`), as
/// a process of its own that a wrapper can kill.
pub fn workflow_manager_once(url: &str, site: &Site, bin: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(["workflow-manager", "--once", "--database-url", url])
        .current_dir(site.dir.path())
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("CCAT_OPS_DB_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs([
        ("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "slurm".to_owned()),
        (
            "CCAT_WORKFLOW_MANAGER_SLURM_BIN_DIR",
            bin.display().to_string(),
        ),
        (
            "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR",
            site.base().display().to_string(),
        ),
        ("CCAT_WORKFLOW_MANAGER_STAGING_MODE", "local".to_owned()),
        // The test software runs on the host (no Apptainer here).
        ("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "none".to_owned()),
    ]);
    cmd.output().unwrap()
}

//! The `slurm` backend: one batch script per attempt, submitted with `sbatch`; the status
//! of every followed job from one `squeue --states=all --jobs=…` per cycle (our jobs only,
//! including those finished within the controller's `MinJobAge`), and for jobs the
//! controller has forgotten, one `sacct` (accounting on), then the attempt's own record.
//!
//! The batch script writes that record: it prints the job's identity (tag, nonce, SLURM
//! id) at the head of the job log and, when the software ends, its exit status to
//! `exit.json` in the attempt directory. A result-manager that was down for longer than
//! `MinJobAge` therefore still learns how a job ended, without accounting, and a
//! takeover still finds a job the controller forgot, instead of submitting it again.
//!
//! The batch script is the one place a shell sees our data: every word in it is quoted
//! ([`shlex`]), so names and configuration from the database arrive verbatim.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, BackendError, JobMetrics, JobRef, JobSpec, JobState};

/// File name of the batch script in the attempt directory.
pub const SCRIPT: &str = "job.sbatch";
/// File name of the batch script's record of how the software ended.
pub const EXIT_FILE: &str = "exit.json";
/// Most job ids on one `squeue`/`sacct` command line: one argument of at most ~110 KB
/// (Linux takes 128 KiB an argument).
const IDS_PER_CALL: usize = 10_000;

/// What the batch script records when the software ends (see [`batch_script`]).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ExitRecord {
    /// The attempt's token (`{tag}:{nonce}`): the record is this attempt's own.
    pub job: String,
    /// The SLURM job id the script ran as.
    pub job_id: String,
    pub exit_code: i32,
    pub wall_time_seconds: f64,
    /// Wall time × the CPUs allocated to the task.
    pub cpu_seconds: f64,
}

impl ExitRecord {
    /// The record in `attempt_dir`, if it is that of job `job_id` of this attempt.
    pub fn read(attempt_dir: &Path, job_id: &str) -> Option<Self> {
        let record = Self::read_any(attempt_dir)?;
        let token = super::AttemptIdentity::read(attempt_dir)?.token();
        (record.job == token && record.job_id == job_id).then_some(record)
    }

    /// Whatever record `attempt_dir` holds.
    fn read_any(attempt_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(attempt_dir.join(EXIT_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn metrics(&self) -> JobMetrics {
        JobMetrics {
            exit_code: Some(self.exit_code),
            wall_time_seconds: Some(self.wall_time_seconds),
            cpu_hours: Some(self.cpu_seconds / 3600.0),
            peak_memory_gb: None,
        }
    }

    /// How the job ended, from its own record.
    pub fn state(&self) -> JobState {
        map_state("COMPLETED", self.metrics())
    }
}

/// The head line of a job's log naming the job, as the batch script prints it.
fn log_header(token: &str, job_id: &str) -> String {
    format!("ccat-wfm: job {token} is SLURM job {job_id}")
}

/// The SLURM id of the job whose batch script started in `attempt_dir` for `token`, as
/// it recorded itself (its exit record, or the head line of its log).
fn recorded_job_id(attempt_dir: &Path, token: &str) -> Option<String> {
    if let Some(record) = ExitRecord::read_any(attempt_dir)
        && record.job == token
        && is_job_id(&record.job_id)
    {
        return Some(record.job_id);
    }
    let head = super::read_head(&attempt_dir.join(super::JOB_LOG), 4096)?;
    let prefix = log_header(token, "");
    head.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .find(|id| is_job_id(id))
        .map(str::to_owned)
}
/// Longest we wait for one SLURM command before calling it failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Default)]
pub struct SlurmBackend {
    /// Where `sbatch`, `squeue`, … live; empty = found on `PATH`.
    pub bin_dir: PathBuf,
    pub partition: String,
    pub account: String,
    /// Further `sbatch` options, one argument each (e.g. `--qos=science`).
    pub extra_options: Vec<String>,
    /// Whether `sacct` can be asked about finished jobs (slurmdbd is configured).
    pub accounting: bool,
    /// Calls made to each SLURM command (how the controller is treated, for benchmarks
    /// and monitoring).
    pub calls: CallCounts,
}

/// Calls per SLURM command, shared by clones of a backend.
#[derive(Debug, Clone, Default)]
pub struct CallCounts(Arc<Mutex<BTreeMap<String, u64>>>);

impl CallCounts {
    fn add(&self, command: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(command.to_owned()).or_default() += 1;
    }

    /// The counts so far, starting again from zero.
    pub fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl SlurmBackend {
    fn program(&self, name: &str) -> PathBuf {
        if self.bin_dir.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            self.bin_dir.join(name)
        }
    }

    /// Runs one SLURM command and returns its stdout.
    async fn run(&self, name: &str, args: &[String]) -> Result<String, BackendError> {
        let program = self.program(name);
        self.calls.add(name);
        let shown = format!("{} {}", program.display(), args.join(" "));
        let output = tokio::time::timeout(
            COMMAND_TIMEOUT,
            tokio::process::Command::new(&program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| BackendError::Timeout {
            command: shown.clone(),
            seconds: COMMAND_TIMEOUT.as_secs(),
        })?
        .map_err(BackendError::io(format!("running {}", program.display())))?;
        if !output.status.success() {
            return Err(BackendError::Command {
                command: shown,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The `sbatch` arguments for one attempt (the script path last).
    pub fn sbatch_args(&self, spec: &JobSpec, script: &Path) -> Vec<String> {
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={}", spec.tag),
            // The attempt's token: a job found by its name is adopted only with it.
            format!("--comment={}", spec.token()),
            format!("--output={}", spec.log_path().display()),
            "--open-mode=append".to_owned(),
            format!("--chdir={}", spec.attempt_dir.display()),
            format!("--cpus-per-task={}", spec.cpus.max(1)),
            format!("--mem={}M", spec.memory_mb.max(1)),
            format!("--time={}", slurm_duration(spec.time_limit_seconds)),
            // The manager's environment (and any secret in it) stays out of the job.
            "--export=NONE".to_owned(),
        ];
        if !self.partition.is_empty() {
            args.push(format!("--partition={}", self.partition));
        }
        if !self.account.is_empty() {
            args.push(format!("--account={}", self.account));
        }
        args.extend(self.extra_options.iter().cloned());
        args.push(script.display().to_string());
        args
    }

    /// Cancels many jobs with as few `scancel` calls as the command line allows.
    pub async fn cancel_all(&self, job_ids: &[String]) -> Result<(), BackendError> {
        let job_ids: Vec<String> = job_ids.iter().filter(|id| is_job_id(id)).cloned().collect();
        for chunk in job_ids.chunks(500) {
            self.run("scancel", chunk).await?;
        }
        Ok(())
    }

    /// States of `ids` as the controller knows them, finished ones included (within
    /// its `MinJobAge`): one `squeue` per [`IDS_PER_CALL`] jobs, about our jobs only.
    async fn controller_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, BackendError> {
        let mut states = HashMap::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let args = [
                "--noheader".to_owned(),
                "--states=all".to_owned(),
                format!("--jobs={}", chunk.join(",")),
                "--format=%i|%T".to_owned(),
            ];
            let out = match self.run("squeue", &args).await {
                Ok(out) => out,
                // Asked about one job it has forgotten, squeue fails; about several, it
                // leaves them out.
                Err(BackendError::Command { stderr, .. }) if stderr.contains("Invalid job id") => {
                    String::new()
                }
                Err(e) => return Err(e),
            };
            for line in out.lines() {
                if let Some((id, state)) = line.trim().split_once('|') {
                    states.insert(id.to_owned(), state.to_owned());
                }
            }
        }
        Ok(states)
    }

    /// Final states of jobs the controller has forgotten, from accounting (one `sacct`
    /// per [`IDS_PER_CALL`] jobs); empty without accounting.
    async fn accounted_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, JobState>, BackendError> {
        let mut states = HashMap::new();
        if !self.accounting {
            return Ok(states);
        }
        for chunk in ids.chunks(IDS_PER_CALL) {
            let out = self
                .run(
                    "sacct",
                    &[
                        "--noheader".into(),
                        "--parsable2".into(),
                        format!("--jobs={}", chunk.join(",")),
                        "--format=JobID,State,ExitCode,ElapsedRaw,TotalCPU,MaxRSS".into(),
                    ],
                )
                .await?;
            states.extend(parse_sacct(&out));
        }
        Ok(states)
    }
}

/// Seconds as SLURM's `D-HH:MM:SS`, at least one second.
pub fn slurm_duration(seconds: u64) -> String {
    let s = seconds.max(1);
    format!(
        "{}-{:02}:{:02}:{:02}",
        s / 86_400,
        s % 86_400 / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// The batch script: the job's identity at the head of its log, the environment, `cd`,
/// the argument vector, then its exit status recorded in the attempt's `exit.json`. Every
/// word is quoted for the shell.
pub fn batch_script(spec: &JobSpec) -> Result<String, String> {
    let quote = |s: &str| {
        shlex::try_quote(s)
            .map(|q| q.into_owned())
            .map_err(|_| format!("a NUL byte in {s:?} cannot be passed to a job"))
    };
    let token = spec.token();
    let mut script = format!("#!/bin/sh\n# {} (ccat-workflow-manager)\n", spec.tag);
    script.push_str(&format!(
        "echo {}\"$SLURM_JOB_ID\"\n",
        quote(&log_header(&token, ""))?
    ));
    // --export=NONE leaves PATH unset; give the job the manager's search path.
    if let Ok(path) = std::env::var("PATH") {
        script.push_str(&format!("export PATH={}\n", quote(&path)?));
    }
    for (key, value) in &spec.command.env {
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("{key:?} is not a valid environment variable name"));
        }
        script.push_str(&format!("export {key}={}\n", quote(value)?));
    }
    script.push_str(&format!(
        "cd {} || exit 1\n",
        quote(&spec.command.workdir.display().to_string())?
    ));
    let argv: Result<Vec<String>, String> = spec.command.argv().iter().map(|w| quote(w)).collect();
    let record = spec.attempt_dir.join(EXIT_FILE).display().to_string();
    script.push_str("ccat_t0=$(date +%s)\n");
    script.push_str(&format!("{}\n", argv?.join(" ")));
    script.push_str("ccat_code=$?\nccat_wall=$(( $(date +%s) - ccat_t0 ))\n");
    // Written aside, then renamed: a reader never sees half a record.
    script.push_str(&format!(
        "printf '{{\"job\":\"%s\",\"job_id\":\"%s\",\"exit_code\":%d,\
         \"wall_time_seconds\":%d,\"cpu_seconds\":%d}}\\n' {} \"$SLURM_JOB_ID\" \"$ccat_code\" \
         \"$ccat_wall\" \"$(( ccat_wall * ${{SLURM_CPUS_PER_TASK:-1}} ))\" > {} && mv -f {} {}\n",
        quote(&token)?,
        quote(&format!("{record}.tmp"))?,
        quote(&format!("{record}.tmp"))?,
        quote(&record)?,
    ));
    script.push_str("exit \"$ccat_code\"\n");
    Ok(script)
}

/// `sacct --parsable2` rows: the job's own row gives state and exit code, its steps the
/// peak memory.
pub fn parse_sacct(out: &str) -> HashMap<String, JobState> {
    let mut rows: HashMap<String, (String, JobMetrics)> = HashMap::new();
    let mut peak: HashMap<String, f64> = HashMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 6 {
            continue;
        }
        let (job, step) = f[0].split_once('.').unwrap_or((f[0], ""));
        if let Some(kb) = parse_memory_kb(f[5]) {
            let gb = kb / (1024.0 * 1024.0);
            let e = peak.entry(job.to_owned()).or_default();
            *e = e.max(gb);
        }
        if step.is_empty() {
            let metrics = JobMetrics {
                exit_code: parse_exit_code(f[2]),
                wall_time_seconds: f[3].parse().ok(),
                cpu_hours: parse_elapsed(f[4]).map(|s| s / 3600.0),
                peak_memory_gb: None,
            };
            // "CANCELLED by 0" → "CANCELLED".
            let state = f[1].split(' ').next().unwrap_or("").to_owned();
            rows.insert(job.to_owned(), (state, metrics));
        }
    }
    rows.into_iter()
        .map(|(id, (state, mut metrics))| {
            metrics.peak_memory_gb = peak.get(&id).copied();
            let state = map_state(&state, metrics);
            (id, state)
        })
        .collect()
}

/// A SLURM job state as a [`JobState`].
pub fn map_state(state: &str, metrics: JobMetrics) -> JobState {
    let failed = |reason: &str| JobState::Failed {
        reason: reason.to_owned(),
        metrics: metrics.clone(),
    };
    match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" | "SUSPENDED" | "STOPPED" | "RESIZING" => JobState::Queued,
        "RUNNING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" => JobState::Running,
        "COMPLETED" => match metrics.exit_code {
            Some(0) | None => JobState::Succeeded(metrics),
            Some(code) => failed(&format!("exit code {code}")),
        },
        "FAILED" => failed(&match metrics.exit_code {
            Some(code) => format!("exit code {code}"),
            None => "failed".to_owned(),
        }),
        "TIMEOUT" => failed("time limit exceeded (SLURM TIMEOUT)"),
        "OUT_OF_MEMORY" => failed("out of memory (SLURM OUT_OF_MEMORY)"),
        "NODE_FAIL" => failed("node failure (SLURM NODE_FAIL)"),
        "PREEMPTED" => failed("preempted (SLURM PREEMPTED)"),
        "BOOT_FAIL" => failed("node boot failure (SLURM BOOT_FAIL)"),
        "DEADLINE" => failed("deadline reached (SLURM DEADLINE)"),
        "CANCELLED" => JobState::Cancelled,
        other => failed(&format!("unexpected SLURM state {other}")),
    }
}

/// `3:0` (exit code, signal) → 3; a signal alone → 128 + signal, as shells report it.
fn parse_exit_code(text: &str) -> Option<i32> {
    let (code, signal) = text.split_once(':').unwrap_or((text, "0"));
    let code: i32 = code.parse().ok()?;
    let signal: i32 = signal.parse().unwrap_or(0);
    Some(if code == 0 && signal != 0 {
        128 + signal
    } else {
        code
    })
}

/// `[D-]HH:MM:SS[.fff]` or `MM:SS[.fff]` → seconds.
fn parse_elapsed(text: &str) -> Option<f64> {
    let (days, rest) = match text.split_once('-') {
        Some((d, r)) => (d.parse::<f64>().ok()?, r),
        None => (0.0, text),
    };
    let parts: Vec<f64> = rest
        .split(':')
        .map(|p| p.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    let secs = parts.iter().fold(0.0, |acc, p| acc * 60.0 + p);
    (!parts.is_empty() && parts.len() <= 3).then_some(days * 86_400.0 + secs)
}

/// `123456K`, `1.5G` … → KiB.
fn parse_memory_kb(text: &str) -> Option<f64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (number, unit) = text.split_at(text.len() - 1);
    let factor = match unit {
        "K" => 1.0,
        "M" => 1024.0,
        "G" => 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0,
        _ => return text.parse::<f64>().ok().map(|b| b / 1024.0),
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

impl Backend for SlurmBackend {
    fn name(&self) -> &'static str {
        "slurm"
    }

    async fn submit(&self, spec: &JobSpec) -> Result<String, BackendError> {
        let script_path = spec.attempt_dir.join(SCRIPT);
        let script = batch_script(spec).map_err(BackendError::Invalid)?;
        super::write_private(&script_path, script.as_bytes()).map_err(BackendError::io(
            format!("writing {}", script_path.display()),
        ))?;
        let out = self
            .run("sbatch", &self.sbatch_args(spec, &script_path))
            .await?;
        // --parsable prints "jobid" or "jobid;cluster".
        let id = out.trim().split(';').next().unwrap_or("").to_owned();
        if !is_job_id(&id) {
            return Err(BackendError::Parse {
                command: "sbatch".into(),
                detail: format!("no job id in {:?}", out.trim()),
            });
        }
        Ok(id)
    }

    async fn find(&self, tag: &str, dir: &Path) -> Result<Option<String>, BackendError> {
        // Only the job this attempt directory was made for: its token is in the job's
        // comment, so a job of the same name from another incarnation is never adopted.
        let Some(token) = super::AttemptIdentity::token_for(tag, dir) else {
            return Ok(None);
        };
        let out = self
            .run(
                "squeue",
                &[
                    "--noheader".into(),
                    "--me".into(),
                    "--states=all".into(),
                    format!("--name={tag}"),
                    "--format=%i|%k".into(),
                ],
            )
            .await?;
        let mut foreign = Vec::new();
        for line in out.lines() {
            let Some((id, comment)) = line.trim().split_once('|') else {
                continue;
            };
            if !is_job_id(id) {
                continue;
            }
            if comment == token {
                return Ok(Some(id.to_owned()));
            }
            foreign.push(id.to_owned());
        }
        if !foreign.is_empty() {
            tracing::warn!(%tag, jobs = ?foreign,
                "jobs of this name but of another attempt's identity: not adopted");
        }
        if self.accounting {
            let out = self
                .run(
                    "sacct",
                    &[
                        "--noheader".into(),
                        "--parsable2".into(),
                        "--allocations".into(),
                        format!("--name={tag}"),
                        "--format=JobID,Comment".into(),
                    ],
                )
                .await?;
            // Accounting keeps comments only with AccountingStoreFlags=job_comment; an
            // empty one is judged by the name, which carries the deployment id.
            for line in out.lines() {
                if let Some((id, comment)) = line.trim().split_once('|')
                    && is_job_id(id)
                    && (comment.is_empty() || comment == token)
                {
                    return Ok(Some(id.to_owned()));
                }
            }
        }
        // Forgotten by the controller (finished longer than MinJobAge ago, no
        // accounting): the job's own records in the attempt directory still name it.
        Ok(recorded_job_id(dir, &token))
    }

    async fn status(&self, jobs: &[JobRef]) -> Result<HashMap<String, JobState>, BackendError> {
        if jobs.is_empty() {
            return Ok(HashMap::new());
        }
        // Only ids SLURM could have given reach a command line.
        let ids: Vec<&str> = jobs
            .iter()
            .map(|j| j.job_id.as_str())
            .filter(|id| is_job_id(id))
            .collect();
        let known = self.controller_states(&ids).await?;
        let forgotten: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !known.contains_key(*id))
            .collect();
        let accounted = if forgotten.is_empty() {
            HashMap::new()
        } else {
            self.accounted_states(&forgotten).await?
        };
        let mut result = HashMap::with_capacity(jobs.len());
        for job in jobs {
            let record = || ExitRecord::read(&job.attempt_dir, &job.job_id);
            let state = match known.get(&job.job_id) {
                Some(state) => match map_state(state, JobMetrics::default()) {
                    // The controller's word on the state; for a job that ended, the job's
                    // own record gives the exit code and times, which squeue does not
                    // show (read only then: not a file per running job and cycle).
                    ended if ended.is_final() => {
                        map_state(state, record().map(|r| r.metrics()).unwrap_or_default())
                    }
                    going => going,
                },
                None => match accounted.get(&job.job_id) {
                    Some(state) => state.clone(),
                    None => record().map_or(JobState::Vanished, |r| r.state()),
                },
            };
            result.insert(job.job_id.clone(), state);
        }
        Ok(result)
    }

    async fn cancel(&self, job: &JobRef) -> Result<(), BackendError> {
        // The id comes from the database: never let it become an scancel option.
        if !is_job_id(&job.job_id) {
            return Err(BackendError::Parse {
                command: "scancel".into(),
                detail: format!("{:?} is not a SLURM job id", job.job_id),
            });
        }
        self.run("scancel", std::slice::from_ref(&job.job_id))
            .await
            .map(|_| ())
    }
}

/// A SLURM job id as sbatch prints it: digits, and `_` for array tasks.
fn is_job_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_job_ids_slurm_could_have_given_reach_its_commands() {
        assert!(is_job_id("12345") && is_job_id("77_3"));
        for bad in ["", "--user=wfm", "1 2", "1;2", "-1", "1,2"] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn durations_are_slurm_time_limits() {
        assert_eq!(slurm_duration(0), "0-00:00:01");
        assert_eq!(slurm_duration(3_600), "0-01:00:00");
        assert_eq!(slurm_duration(90_061), "1-01:01:01");
    }

    #[test]
    fn a_jobs_own_record_counts_only_for_its_attempt_and_job() {
        let dir = tempfile::tempdir().unwrap();
        let identity = crate::backend::AttemptIdentity {
            tag: "ccat-abc-run-1-a1".into(),
            nonce: "n1".into(),
        };
        identity.write(dir.path()).unwrap();
        let write = |job: &str, id: &str, code: i32| {
            std::fs::write(
                dir.path().join(EXIT_FILE),
                format!(
                    r#"{{"job":"{job}","job_id":"{id}","exit_code":{code},"wall_time_seconds":7,"cpu_seconds":14}}"#
                ),
            )
            .unwrap()
        };
        write("ccat-abc-run-1-a1:n1", "42", 3);
        match ExitRecord::read(dir.path(), "42").unwrap().state() {
            JobState::Failed { reason, metrics } => {
                assert_eq!(reason, "exit code 3");
                assert_eq!(metrics.cpu_hours, Some(14.0 / 3600.0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ExitRecord::read(dir.path(), "43"), None, "another job");
        write("ccat-abc-run-1-a1:n0", "42", 0);
        assert_eq!(ExitRecord::read(dir.path(), "42"), None, "another nonce");
        assert_eq!(recorded_job_id(dir.path(), "ccat-abc-run-1-a1:n1"), None);
        std::fs::write(
            dir.path().join(crate::backend::JOB_LOG),
            "ccat-wfm: job ccat-abc-run-1-a1:n1 is SLURM job 77\nhello\n",
        )
        .unwrap();
        assert_eq!(
            recorded_job_id(dir.path(), "ccat-abc-run-1-a1:n1").as_deref(),
            Some("77")
        );
    }

    #[test]
    fn sacct_rows_give_state_and_peak_memory() {
        let out = "7|OUT_OF_MEMORY|0:125|61|00:01:00|\n7.batch|OUT_OF_MEMORY|0:125|61|00:01:00|2097152K\n\
                   8|CANCELLED by 0|0:15|5|00:00:01|\n";
        let states = parse_sacct(out);
        match &states["7"] {
            JobState::Failed { reason, metrics } => {
                assert!(reason.contains("out of memory"));
                assert_eq!(metrics.peak_memory_gb, Some(2.0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(states["8"], JobState::Cancelled);
    }
}

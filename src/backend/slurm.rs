//! The `slurm` backend: one batch script per attempt, submitted with `sbatch`; the status
//! of every active job from one `squeue` per cycle, and for the jobs that left the queue
//! since, one `sacct` (accounting on) or one `scontrol show job` (accounting off).
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
            format!("--comment={}", spec.tag),
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

    /// Final states of jobs that left the queue: one `sacct` or one `scontrol` call.
    async fn finished_states(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, JobState>, BackendError> {
        if self.accounting {
            let out = self
                .run(
                    "sacct",
                    &[
                        "--noheader".into(),
                        "--parsable2".into(),
                        format!("--jobs={}", ids.join(",")),
                        "--format=JobID,State,ExitCode,ElapsedRaw,TotalCPU,MaxRSS".into(),
                    ],
                )
                .await?;
            Ok(parse_sacct(&out))
        } else {
            let out = self
                .run(
                    "scontrol",
                    &["--oneliner".into(), "show".into(), "job".into()],
                )
                .await?;
            Ok(parse_scontrol(&out))
        }
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

/// The batch script: `cd`, the environment and `exec` of the argument vector, every word
/// quoted for the shell.
pub fn batch_script(spec: &JobSpec) -> Result<String, String> {
    let quote = |s: &str| {
        shlex::try_quote(s)
            .map(|q| q.into_owned())
            .map_err(|_| format!("a NUL byte in {s:?} cannot be passed to a job"))
    };
    let mut script = format!("#!/bin/sh\n# {} (ccat-workflow-manager)\n", spec.tag);
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
    script.push_str(&format!("exec {}\n", argv?.join(" ")));
    Ok(script)
}

/// `JobId=1 JobName=x JobState=FAILED …` lines of `scontrol --oneliner show job`.
pub fn parse_scontrol(out: &str) -> HashMap<String, JobState> {
    let mut states = HashMap::new();
    for line in out.lines() {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for token in line.split(' ') {
            if let Some((k, v)) = token.split_once('=') {
                // The first occurrence wins: later free-text fields cannot shadow it.
                fields.entry(k).or_insert(v);
            }
        }
        let (Some(id), Some(state)) = (fields.get("JobId"), fields.get("JobState")) else {
            continue;
        };
        let wall = fields.get("RunTime").and_then(|t| parse_elapsed(t));
        let cpus: Option<f64> = fields.get("NumCPUs").and_then(|n| n.parse().ok());
        let metrics = JobMetrics {
            exit_code: fields.get("ExitCode").and_then(|c| parse_exit_code(c)),
            wall_time_seconds: wall,
            cpu_hours: wall.zip(cpus).map(|(w, c)| w * c / 3600.0),
            peak_memory_gb: None,
        };
        states.insert((*id).to_owned(), map_state(state, metrics));
    }
    states
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

    async fn find(&self, tag: &str, _dir: &Path) -> Result<Option<String>, BackendError> {
        // Jobs in any state the controller still holds (finished ones for MinJobAge).
        let out = self
            .run(
                "squeue",
                &[
                    "--noheader".into(),
                    "--me".into(),
                    "--states=all".into(),
                    format!("--name={tag}"),
                    "--format=%i".into(),
                ],
            )
            .await?;
        if let Some(id) = out.split_whitespace().next().filter(|id| is_job_id(id)) {
            return Ok(Some(id.to_owned()));
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
                        "--format=JobID".into(),
                    ],
                )
                .await?;
            return Ok(out
                .split_whitespace()
                .next()
                .filter(|id| is_job_id(id))
                .map(str::to_owned));
        }
        Ok(None)
    }

    async fn status(&self, jobs: &[JobRef]) -> Result<HashMap<String, JobState>, BackendError> {
        if jobs.is_empty() {
            return Ok(HashMap::new());
        }
        // One squeue for every job of ours still in the queue.
        let out = self
            .run(
                "squeue",
                &["--noheader".into(), "--me".into(), "--format=%i|%T".into()],
            )
            .await?;
        let mut queued: HashMap<String, JobState> = HashMap::new();
        for line in out.lines() {
            if let Some((id, state)) = line.trim().split_once('|') {
                let state = map_state(state, JobMetrics::default());
                if !state.is_final() {
                    queued.insert(id.to_owned(), state);
                }
            }
        }
        let mut result = HashMap::with_capacity(jobs.len());
        let mut left: Vec<&str> = Vec::new();
        for job in jobs {
            match queued.get(&job.job_id) {
                Some(state) => {
                    result.insert(job.job_id.clone(), state.clone());
                }
                // Only ids SLURM could have given reach a command line.
                None if is_job_id(&job.job_id) => left.push(&job.job_id),
                None => {
                    result.insert(job.job_id.clone(), JobState::Vanished);
                }
            }
        }
        if !left.is_empty() {
            let finished = self.finished_states(&left).await?;
            for id in left {
                let state = finished.get(id).cloned().unwrap_or(JobState::Vanished);
                result.insert(id.to_owned(), state);
            }
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
    fn scontrol_lines_become_states() {
        let out = "JobId=1 JobName=ccat-run-1-a1 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 RunTime=00:00:02 NumCPUs=2 WorkDir=/x JobState=COMPLETED\n\
                   JobId=3 JobName=wrap JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 RunTime=00:01:12 NumCPUs=1\n\
                   JobId=4 JobState=COMPLETED ExitCode=0:0 RunTime=1-00:00:00 NumCPUs=1\n";
        let states = parse_scontrol(out);
        match &states["1"] {
            JobState::Failed { reason, metrics } => {
                assert_eq!(reason, "exit code 3");
                assert_eq!(metrics.exit_code, Some(3));
                assert_eq!(metrics.cpu_hours, Some(4.0 / 3600.0));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&states["3"], JobState::Failed { reason, .. } if reason.contains("time limit"))
        );
        assert!(
            matches!(&states["4"], JobState::Succeeded(m) if m.wall_time_seconds == Some(86_400.0))
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

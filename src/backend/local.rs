//! The `local` backend: each attempt runs as a detached process group on this machine,
//! under a small wrapper (`ccat-wfm job-wrapper`, [`run_wrapper`]) that writes its pid
//! and, when the job ends, its exit status and resource use to files in the attempt
//! directory. The state lives in those files, so a manager restart loses nothing: the
//! job keeps running, and whoever looks next reads how it ended.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, JOB_LOG, JobMetrics, JobRef, JobSpec, JobState};

/// Written by the wrapper once the job ended.
pub const EXIT_FILE: &str = "exit.json";
/// Written by the wrapper when it starts: its pid (the job id).
pub const PID_FILE: &str = "job.pid";
/// Written by the manager just before it starts the wrapper (see [`LocalBackend::find`]).
const LAUNCH_FILE: &str = "job.launch";

/// How a job ended, as the wrapper records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Set when the command could not be started at all.
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub wall_time_seconds: f64,
    pub cpu_seconds: f64,
    pub max_rss_kb: i64,
}

impl ExitRecord {
    pub fn state(&self) -> JobState {
        let metrics = JobMetrics {
            exit_code: self.exit_code,
            wall_time_seconds: Some(self.wall_time_seconds),
            cpu_hours: Some(self.cpu_seconds / 3600.0),
            peak_memory_gb: Some(self.max_rss_kb as f64 / (1024.0 * 1024.0)),
        };
        let reason = if let Some(e) = &self.error {
            format!("the command could not be started: {e}")
        } else if self.timed_out {
            format!("time limit exceeded after {:.0} s", self.wall_time_seconds)
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            match self.exit_code {
                Some(0) => return JobState::Succeeded(metrics),
                Some(code) => format!("exit code {code}"),
                None => "ended without an exit status".into(),
            }
        };
        JobState::Failed { reason, metrics }
    }
}

#[derive(Debug, Clone)]
pub struct LocalBackend {
    /// The program (and leading arguments) that runs `job-wrapper`: this executable, or
    /// `python -m ccat_workflow_manager.cli` inside Python.
    launcher: Vec<String>,
}

impl LocalBackend {
    pub fn new(launcher: Vec<String>) -> Self {
        assert!(!launcher.is_empty(), "the launcher needs a program");
        LocalBackend { launcher }
    }

    /// The launcher of the running `ccat-wfm` executable.
    pub fn from_current_exe() -> Result<Self, BackendError> {
        let exe = std::env::current_exe().map_err(BackendError::io("finding this executable"))?;
        Ok(Self::new(vec![exe.display().to_string()]))
    }
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn read_exit(dir: &Path) -> Option<Result<ExitRecord, String>> {
    let text = std::fs::read_to_string(dir.join(EXIT_FILE)).ok()?;
    Some(parse_exit_record(&text))
}

/// An `exit.json` as the wrapper writes it (fuzzed: `fuzz/`).
pub fn parse_exit_record(text: &str) -> Result<ExitRecord, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Whether `pid` is alive and is the wrapper of this attempt (pids are reused).
fn wrapper_alive(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == needle)
}

/// The variables of the manager's environment a local job inherits.
fn passed_to_jobs(name: &std::ffi::OsStr) -> bool {
    const KEPT: [&str; 11] = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "LD_LIBRARY_PATH",
    ];
    name.to_str()
        .is_some_and(|n| KEPT.contains(&n) || n.starts_with("LC_"))
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn submit(&self, spec: &JobSpec) -> Result<String, BackendError> {
        let dir = &spec.attempt_dir;
        super::write_private(&dir.join(LAUNCH_FILE), Utc::now().to_rfc3339().as_bytes()).map_err(
            BackendError::io(format!("writing {}", dir.join(LAUNCH_FILE).display())),
        )?;
        let log = super::open_private(&spec.log_path(), true).map_err(BackendError::io(
            format!("opening {}", spec.log_path().display()),
        ))?;
        let log2 = log
            .try_clone()
            .map_err(BackendError::io("duplicating the log handle"))?;
        let mut cmd = tokio::process::Command::new(&self.launcher[0]);
        cmd.args(&self.launcher[1..])
            .arg("job-wrapper")
            .arg("--dir")
            .arg(dir)
            .arg("--time-limit")
            .arg(spec.time_limit_seconds.to_string())
            .arg("--")
            .args(spec.command.argv())
            // Like SLURM's --export=NONE: the manager's settings and secrets stay out of
            // the job, which gets only what a login session would have, and its own.
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| passed_to_jobs(k)))
            .envs(spec.command.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.command.workdir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: Ctrl-C on the manager's terminal does not reach it,
            // and cancel stops the whole group.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(BackendError::io(format!("starting {}", self.launcher[0])))?;
        let pid = child.id().unwrap_or_default() as i32;
        // Dropped unwaited: tokio reaps it when it ends; the job does not depend on us.
        drop(child);
        // The pid file is the wrapper's first act; wait for it so that `find` after a
        // crash of this manager sees the job.
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_pid(dir).is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(pid.to_string())
    }

    async fn find(&self, tag: &str, dir: &Path) -> Result<Option<String>, BackendError> {
        // Only a job launched from a directory made for this very attempt (its identity
        // names the tag, which carries the deployment id): never the records of another
        // incarnation of the database that used the same path.
        if super::AttemptIdentity::token_for(tag, dir).is_none() || !dir.join(LAUNCH_FILE).exists()
        {
            return Ok(None);
        }
        // Launched just before a crash: give the wrapper a moment to write its pid.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = read_pid(dir) {
                return Ok(Some(pid.to_string()));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn status(&self, jobs: &[JobRef]) -> Result<HashMap<String, JobState>, BackendError> {
        let mut out = HashMap::with_capacity(jobs.len());
        for job in jobs {
            let state = match read_exit(&job.attempt_dir) {
                Some(Ok(record)) => record.state(),
                Some(Err(e)) => JobState::Failed {
                    reason: format!("unreadable {EXIT_FILE}: {e}"),
                    metrics: JobMetrics::default(),
                },
                None => {
                    let pid: i32 = job.job_id.parse().unwrap_or(-1);
                    if wrapper_alive(pid, &job.attempt_dir) {
                        JobState::Running
                    } else {
                        // It may have ended between the two reads.
                        match read_exit(&job.attempt_dir) {
                            Some(Ok(record)) => record.state(),
                            _ => JobState::Vanished,
                        }
                    }
                }
            };
            out.insert(job.job_id.clone(), state);
        }
        Ok(out)
    }

    async fn cancel(&self, job: &JobRef) -> Result<(), BackendError> {
        let Ok(pid) = job.job_id.parse::<i32>() else {
            return Ok(());
        };
        if pid > 1 && wrapper_alive(pid, &job.attempt_dir) {
            // SAFETY: killpg only sends a signal; the group is the job's own.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
        Ok(())
    }

    fn log_tail(&self, job: &JobRef, max_bytes: u64) -> Option<String> {
        super::read_tail(&job.attempt_dir.join(JOB_LOG), max_bytes)
    }
}

/// Kills every other process of the wrapper's process group (the job's), so that what
/// the job started in the background does not outlive its time limit. The wrapper
/// itself lives on to record how the job ended.
fn kill_rest_of_group() {
    // SAFETY: getpgrp and getpid cannot fail and touch no memory.
    let (group, me) = unsafe { (libc::getpgrp(), libc::getpid()) };
    // Only a group of our own (as the backend starts us): never a shell's or a caller's.
    if group != me {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Field 5 of /proc/<pid>/stat is the process group; the name before it (in
        // parentheses) may hold spaces, so count from its closing parenthesis.
        let in_group = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(2)?
                    .parse()
                    .ok()
            })
            == Some(group);
        if in_group && pid != me {
            // SAFETY: only sends a signal, to a process of the job's own group.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Writes `contents` to `path` atomically (temporary file, then rename), so a reader
/// never sees half a record.
fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    super::write_private(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// The wrapper: runs `argv`, enforces the time limit, records how it ended.
/// Returns the wrapper's exit status (the job's, or 1 when it could not record it).
pub fn run_wrapper(dir: &Path, time_limit: Duration, argv: &[String]) -> u8 {
    if let Err(e) = write_atomic(
        &dir.join(PID_FILE),
        std::process::id().to_string().as_bytes(),
    ) {
        eprintln!(
            "job-wrapper: cannot write {}: {e}",
            dir.join(PID_FILE).display()
        );
        return 1;
    }
    let started_at = Utc::now();
    let start = Instant::now();
    let mut record = ExitRecord {
        exit_code: None,
        signal: None,
        timed_out: false,
        error: None,
        started_at,
        finished_at: started_at,
        wall_time_seconds: 0.0,
        cpu_seconds: 0.0,
        max_rss_kb: 0,
    };
    match std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .spawn()
    {
        Err(e) => {
            record.exit_code = Some(127);
            record.error = Some(format!("{}: {e}", argv[0]));
        }
        Ok(mut child) => {
            let pid = child.id() as i32;
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let timer = (!time_limit.is_zero()).then(|| {
                std::thread::spawn(move || {
                    if done_rx.recv_timeout(time_limit).is_err() {
                        // SAFETY: signals our own child, which has not been reaped yet.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        kill_rest_of_group();
                        true
                    } else {
                        false
                    }
                })
            });
            let status = child.wait();
            let _ = done_tx.send(());
            record.timed_out = timer.map(|t| t.join().unwrap_or(false)).unwrap_or(false);
            match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    record.exit_code = status.code();
                    record.signal = status.signal();
                }
                Err(e) => record.error = Some(format!("waiting for the job: {e}")),
            }
        }
    }
    record.finished_at = Utc::now();
    record.wall_time_seconds = start.elapsed().as_secs_f64();
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN covers the reaped job.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    record.cpu_seconds = secs(usage.ru_utime) + secs(usage.ru_stime);
    record.max_rss_kb = usage.ru_maxrss;
    let text = serde_json::to_vec_pretty(&record).expect("a record serialises");
    if let Err(e) = write_atomic(&dir.join(EXIT_FILE), &text) {
        eprintln!(
            "job-wrapper: cannot write {}: {e}",
            dir.join(EXIT_FILE).display()
        );
        return 1;
    }
    match record.exit_code {
        Some(code) => code.clamp(0, 255) as u8,
        None => 1,
    }
}

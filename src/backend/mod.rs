//! Backends: where jobs run. One interface ([`Backend`]) over SLURM ([`slurm`]), local
//! processes ([`local`]) and Kubernetes ([`kubernetes`]), so the managers never care which.
//!
//! A job is known by the id the backend gave it and by its *tag*, which carries the
//! run id and attempt; the tag is what makes submission crash-safe: a manager that died
//! between submitting and recording the id finds the job again by its tag
//! ([`Backend::find`]) instead of submitting a second one.

pub mod kubernetes;
pub mod local;
pub mod slurm;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{command}: no answer within {seconds} s")]
    Timeout { command: String, seconds: u64 },
    /// The job cannot be expressed for this backend (checked before submitting).
    #[error("{0}")]
    Invalid(String),
    #[error("{command} answered something unexpected: {detail}")]
    Parse { command: String, detail: String },
    /// The request may or may not have reached the backend (connection lost).
    #[error("{command}: no clear answer: {detail}")]
    Unclear { command: String, detail: String },
}

impl BackendError {
    /// Whether the backend certainly refused (a job was not created): the run can fail.
    /// Otherwise (no answer, an answer we could not read) a job may exist, and the run
    /// is looked up by its tag next cycle before anything is submitted again.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            BackendError::Timeout { .. }
                | BackendError::Parse { .. }
                | BackendError::Unclear { .. }
        )
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
        let what = what.into();
        move |source| BackendError::Io { what, source }
    }
}

/// A program, its arguments and the environment it adds; nothing here is parsed by a shell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobCommand {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    /// With the `pod` runtime: the image and what the pod mounts where.
    pub container: Option<PodContainer>,
}

/// The image a pod runs and the host paths it sees inside.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodContainer {
    pub image: String,
    pub mounts: Vec<Mount>,
}

/// A host path seen inside the container.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mount {
    pub host: PathBuf,
    pub inside: String,
    pub read_only: bool,
}

impl JobCommand {
    /// `program` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// Everything a backend needs to start one attempt of one run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `ccat-{database}-run-{run_id}-a{attempt}`: unique per attempt, findable after a
    /// crash (see [`crate::workflow::job_tag`]).
    pub tag: String,
    /// Random per attempt, kept in its [`IDENTITY_FILE`]; the job carries it where the
    /// backend can keep it (SLURM: the comment), so adoption checks both.
    pub nonce: String,
    pub command: JobCommand,
    /// Per-attempt directory on the host: job log, exit record, batch script.
    pub attempt_dir: PathBuf,
    pub cpus: u32,
    pub memory_mb: u64,
    pub time_limit_seconds: u64,
}

impl JobSpec {
    /// What the job carries to be recognised as this attempt's: `{tag}:{nonce}` (see
    /// [`AttemptIdentity::token`]).
    pub fn token(&self) -> String {
        format!("{}:{}", self.tag, self.nonce)
    }

    /// The combined stdout/stderr of the job.
    pub fn log_path(&self) -> PathBuf {
        self.attempt_dir.join(JOB_LOG)
    }
}

/// File name of a job's combined output in its attempt directory.
pub const JOB_LOG: &str = "job.log";

/// File of the attempt directory naming the job submitted for it, `{tag} {nonce}`,
/// written before the submission is even recorded as intended. A job found by its tag
/// after a crash is adopted only when this file names the same tag (and, on SLURM, the
/// job carries the same nonce): a directory or a job left by another incarnation of the
/// database is never taken for this attempt's.
pub const IDENTITY_FILE: &str = "job.identity";

/// The identity of an attempt's job: its tag and a nonce (see [`IDENTITY_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptIdentity {
    pub tag: String,
    pub nonce: String,
}

impl AttemptIdentity {
    /// A new identity for `tag`.
    pub fn new(tag: &str) -> Self {
        AttemptIdentity {
            tag: tag.to_owned(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The identity recorded in `attempt_dir` (None: no file, or not one we wrote).
    pub fn read(attempt_dir: &std::path::Path) -> Option<Self> {
        let text = std::fs::read_to_string(attempt_dir.join(IDENTITY_FILE)).ok()?;
        let (tag, nonce) = text.trim().split_once(' ')?;
        (!tag.is_empty() && !nonce.is_empty() && !nonce.contains(' ')).then(|| AttemptIdentity {
            tag: tag.to_owned(),
            nonce: nonce.to_owned(),
        })
    }

    pub fn write(&self, attempt_dir: &std::path::Path) -> std::io::Result<()> {
        let path = attempt_dir.join(IDENTITY_FILE);
        write_private(&path, format!("{} {}\n", self.tag, self.nonce).as_bytes())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// What the job itself carries: `{tag}:{nonce}`.
    pub fn token(&self) -> String {
        format!("{}:{}", self.tag, self.nonce)
    }

    /// The identity recorded in `attempt_dir` if it was made for `tag`.
    pub fn read_for(tag: &str, attempt_dir: &std::path::Path) -> Option<Self> {
        Self::read(attempt_dir).filter(|id| id.tag == tag)
    }

    /// The token of the attempt in `attempt_dir` if it was made for `tag`.
    pub fn token_for(tag: &str, attempt_dir: &std::path::Path) -> Option<String> {
        Self::read_for(tag, attempt_dir).map(|id| id.token())
    }
}

/// A job the managers follow: its backend id and where its attempt lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobRef {
    pub job_id: String,
    pub attempt_dir: PathBuf,
}

/// Where a job stands, as far as the run lifecycle cares.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for resources.
    Queued,
    Running,
    Succeeded(JobMetrics),
    /// Ended unsuccessfully; `reason` says how (exit code, timeout, out of memory, …).
    Failed {
        reason: String,
        metrics: JobMetrics,
    },
    Cancelled,
    /// The backend no longer knows the job and left no record of how it ended.
    Vanished,
}

impl JobState {
    pub fn is_final(&self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// What the backend measured of a finished job (whatever it knows).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobMetrics {
    pub exit_code: Option<i32>,
    pub wall_time_seconds: Option<f64>,
    pub cpu_hours: Option<f64>,
    pub peak_memory_gb: Option<f64>,
}

/// One interface over every place jobs run. Status is asked for many jobs at once:
/// a backend answers with as few calls to its controller as it can (SLURM: one).
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// The name recorded on runs (`hpc_backend`).
    fn name(&self) -> &'static str;

    /// Starts a job; returns its backend id.
    async fn submit(&self, spec: &JobSpec) -> Result<String, BackendError>;

    /// A job submitted with this tag, if the backend has one (crash recovery).
    async fn find(
        &self,
        tag: &str,
        attempt_dir: &std::path::Path,
    ) -> Result<Option<String>, BackendError>;

    /// The state of each job; jobs the backend does not know are [`JobState::Vanished`].
    async fn status(&self, jobs: &[JobRef]) -> Result<HashMap<String, JobState>, BackendError>;

    /// Best effort: stops the job if it still runs.
    async fn cancel(&self, job: &JobRef) -> Result<(), BackendError>;

    /// The last `max_bytes` of the job's output.
    fn log_tail(&self, job: &JobRef, max_bytes: u64) -> Option<String> {
        read_tail(&job.attempt_dir.join(JOB_LOG), max_bytes)
    }
}

/// The last `max_bytes` of a file, cut at a character boundary.
pub fn read_tail(path: &std::path::Path, max_bytes: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))
        .ok()?;
    // At most max_bytes even if the log grows meanwhile.
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The first `max_bytes` of a file, as text.
pub fn read_head(path: &std::path::Path, max_bytes: u64) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max_bytes)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Writes a file of a run directory as the managers do: owner read-write, group read
/// (0640, whatever the umask lets through), and never through a link planted at `path`.
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    open_private(path, false)?.write_all(contents)
}

/// Opens a file of a run directory for writing (appending or truncating), 0640 when
/// created, refusing a link at `path`.
pub fn open_private(path: &std::path::Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The backend `HPC_BACKEND` names. `launcher` starts the local backend's job wrapper
/// (None: this executable).
pub fn from_settings(
    settings: &crate::config::Settings,
    launcher: Option<Vec<String>>,
) -> Result<AnyBackend, BackendError> {
    use crate::config::HpcBackend;
    match settings.hpc_backend {
        HpcBackend::Local => Ok(AnyBackend::Local(match launcher {
            Some(launcher) => local::LocalBackend::new(launcher),
            None => local::LocalBackend::from_current_exe()?,
        })),
        HpcBackend::Slurm => Ok(AnyBackend::Slurm(slurm::SlurmBackend {
            bin_dir: settings.slurm.bin_dir.clone(),
            partition: settings.slurm_partition.clone(),
            account: settings.slurm.account.clone(),
            extra_options: settings.slurm.extra_options.clone(),
            accounting: settings.slurm.accounting,
            calls: Default::default(),
        })),
        HpcBackend::Kubernetes => Ok(AnyBackend::Kubernetes(kubernetes::KubernetesBackend::new(
            kubernetes::KubernetesOptions::from_settings(settings),
        ))),
    }
}

/// The backends a manager can use, chosen by `HPC_BACKEND`.
#[derive(Debug)]
pub enum AnyBackend {
    Local(local::LocalBackend),
    Slurm(slurm::SlurmBackend),
    Kubernetes(kubernetes::KubernetesBackend),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $body:expr) => {
        match $self {
            AnyBackend::Local($b) => $body,
            AnyBackend::Slurm($b) => $body,
            AnyBackend::Kubernetes($b) => $body,
        }
    };
}

/// Counts the call to the backend (`ccat_wfm_backend_calls_total`, and its errors).
fn counted<T>(
    backend: &'static str,
    operation: &'static str,
    result: Result<T, BackendError>,
) -> Result<T, BackendError> {
    crate::metrics::record_backend_call(backend, operation, result.is_err());
    result
}

impl Backend for AnyBackend {
    fn name(&self) -> &'static str {
        dispatch!(self, b => b.name())
    }
    async fn submit(&self, spec: &JobSpec) -> Result<String, BackendError> {
        counted(
            self.name(),
            "submit",
            dispatch!(self, b => b.submit(spec).await),
        )
    }
    async fn find(
        &self,
        tag: &str,
        attempt_dir: &std::path::Path,
    ) -> Result<Option<String>, BackendError> {
        let found = dispatch!(self, b => b.find(tag, attempt_dir).await);
        counted(self.name(), "find", found)
    }
    async fn status(&self, jobs: &[JobRef]) -> Result<HashMap<String, JobState>, BackendError> {
        counted(
            self.name(),
            "status",
            dispatch!(self, b => b.status(jobs).await),
        )
    }
    async fn cancel(&self, job: &JobRef) -> Result<(), BackendError> {
        counted(
            self.name(),
            "cancel",
            dispatch!(self, b => b.cancel(job).await),
        )
    }
    fn log_tail(&self, job: &JobRef, max_bytes: u64) -> Option<String> {
        dispatch!(self, b => b.log_tail(job, max_bytes))
    }
}

//! Configuration: the typed settings of SPEC §8, read the way the data center's Python
//! services read theirs (Dynaconf, see [`dynaconf`]), with database settings following
//! ops-db's `CCAT_OPS_DB_*` convention.

pub mod dynaconf;
mod secret;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

pub use dynaconf::{DynaconfError, LoadContext};
pub use secret::Secret;

/// Prefix of ops-db's environment variables, read for the database connection.
pub const OPS_DB_PREFIX: &str = "CCAT_OPS_DB_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] DynaconfError),
    #[error("setting {key} (from {origin}): expected {expected}, got {got}")]
    Invalid {
        key: String,
        origin: String,
        expected: String,
        got: String,
    },
    /// With `STRICT_SETTINGS = true`, keys that are no setting.
    #[error("unknown setting(s), refused with STRICT_SETTINGS: {}", list_unknown(.0))]
    Unknown(Vec<UnknownKey>),
}

/// A key of the settings that the product does not read (a typo, most likely).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownKey {
    pub key: String,
    pub origin: String,
    /// The known key it most resembles, if any is close.
    pub did_you_mean: Option<String>,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (from {}) is not a setting", self.key, self.origin)?;
        match &self.did_you_mean {
            Some(known) => write!(f, "; did you mean {known}?"),
            None => Ok(()),
        }
    }
}

fn list_unknown(keys: &[UnknownKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Keys that are none of ours and no typo: Dynaconf's own.
fn is_foreign(key: &str) -> bool {
    key.ends_with("_FOR_DYNACONF") || key.starts_with("DYNACONF_")
}

/// The known key closest to `key`, when it is close enough to be a typo of it.
fn nearest<'a>(key: &str, known: impl Iterator<Item = &'a String>) -> Option<String> {
    known
        .map(|k| (strsim::levenshtein(key, k), k))
        .filter(|(d, _)| *d > 0 && *d <= 3 && *d * 3 <= key.len().max(3))
        .min()
        .map(|(_, k)| k.clone())
}

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HpcBackend {
    Kubernetes,
    Slurm,
    Local,
}

impl HpcBackend {
    const NAMES: &'static [(&'static str, HpcBackend)] = &[
        ("kubernetes", HpcBackend::Kubernetes),
        ("slurm", HpcBackend::Slurm),
        ("local", HpcBackend::Local),
    ];
}

/// How raw data reaches a processing location (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StagingMode {
    /// Link the packages' files from their physical-copy paths (standalone).
    Local,
    /// Ask data-transfer with a StagingJob and wait for it.
    DataTransfer,
}

impl StagingMode {
    const NAMES: &'static [(&'static str, StagingMode)] = &[
        ("local", StagingMode::Local),
        ("data-transfer", StagingMode::DataTransfer),
    ];
}

/// How the software is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    /// `apptainer exec` with the bind mounts of SPEC §6.
    Apptainer,
    /// The command itself, with the same environment and host paths (development, tests).
    None,
    /// The backend runs the image itself (Kubernetes): the command with container paths,
    /// and the mounts the pod must provide.
    Pod,
}

/// Where per-run work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchMode {
    Inline,
    Celery,
}

const RUNTIMES: &[(&str, ContainerRuntime)] = &[
    ("apptainer", ContainerRuntime::Apptainer),
    ("none", ContainerRuntime::None),
    ("pod", ContainerRuntime::Pod),
];

/// The kubernetes backend's settings (besides `K8S_NAMESPACE`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KubernetesSettings {
    /// Where the pods find `PIPELINE_BASE_DIR`: empty for the same host path on every
    /// node, or `pvc:NAME`.
    pub pipeline_volume: String,
    /// Further trees the pods see at the same path (where staged inputs link to): `PATH`
    /// (a host path) or `PATH=pvc:NAME`.
    pub data_volumes: Vec<String>,
    /// How long a finished Job, its pod and its log are kept.
    pub job_ttl_seconds: i64,
}

/// The SLURM backend's settings (besides `SLURM_PARTITION`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlurmSettings {
    pub account: String,
    /// Further `sbatch` options, one argument each.
    pub extra_options: Vec<String>,
    /// Where the SLURM commands are; empty = on `PATH`.
    pub bin_dir: PathBuf,
    /// slurmdbd is configured: final states of jobs the controller forgot come from
    /// `sacct`, else from the job's own exit record.
    pub accounting: bool,
}

/// What the workflow-manager needs beyond the common settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkflowSettings {
    pub container_runtime: ContainerRuntime,
    /// The apptainer executable.
    pub apptainer: String,
    pub staging_mode: StagingMode,
    /// Most runs claimed per cycle.
    pub claim_batch_size: i64,
    /// Most runs of the backend staging, submitted or running at once.
    pub max_active_jobs: i64,
    /// How long a claim holds a run in STAGING_DATA without being renewed.
    pub lease_seconds: f64,
    /// First retry delay; it doubles with each retry.
    pub retry_backoff_seconds: f64,
    /// Where per-run work runs: in the manager (`inline`) or on Celery workers.
    pub dispatch_mode: DispatchMode,
    /// The Celery broker's `global_keyprefix` (must match the workers').
    pub celery_global_keyprefix: String,
}

/// The operations database to connect to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DatabaseSettings {
    Sqlite {
        path: PathBuf,
    },
    Postgresql {
        host: String,
        port: u16,
        user: String,
        password: Secret,
        database: String,
    },
}

impl fmt::Display for DatabaseSettings {
    /// The target without its password, fit for logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseSettings::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            DatabaseSettings::Postgresql {
                host,
                port,
                user,
                database,
                ..
            } => write!(f, "postgresql://{user}@{host}:{port}/{database}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    pub password: Secret,
}

/// Seconds between two cycles of each manager.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PollIntervals {
    pub trigger_manager: f64,
    pub workflow_manager: f64,
    pub result_manager: f64,
}

impl PollIntervals {
    pub fn trigger(&self) -> Duration {
        Duration::from_secs_f64(self.trigger_manager)
    }
    pub fn workflow(&self) -> Duration {
        Duration::from_secs_f64(self.workflow_manager)
    }
    pub fn result(&self) -> Duration {
        Duration::from_secs_f64(self.result_manager)
    }
}

/// The effective configuration of a manager process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// The Dynaconf environment(s) that were loaded, e.g. `localdev`.
    pub env: String,
    pub hpc_backend: HpcBackend,
    pub pipeline_base_dir: PathBuf,
    pub processing_location_id: i64,
    pub k8s_namespace: String,
    pub slurm_partition: String,
    pub slurm: SlurmSettings,
    pub kubernetes: KubernetesSettings,
    pub workflow: WorkflowSettings,
    pub sif_cache_dir: PathBuf,
    pub redis: RedisSettings,
    pub poll_intervals: PollIntervals,
    /// The most runs the trigger-manager creates per pipeline in one cycle.
    pub max_new_runs_per_cycle: usize,
    /// `host:port` of the Prometheus `/metrics` and `/healthz` endpoint; empty: none.
    pub metrics_address: String,
    pub database: DatabaseSettings,
    /// The settings files that were read, in order.
    pub files: Vec<PathBuf>,
    /// Keys of the settings that the product does not read (typos), with a suggestion.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_keys: Vec<UnknownKey>,
}

impl Settings {
    /// Loads settings from the files and environment of this process.
    pub fn load(settings_files: Option<&[PathBuf]>) -> Result<Settings, ConfigError> {
        Self::load_with(&LoadContext::from_process(), settings_files)
    }

    pub fn load_with(
        ctx: &LoadContext,
        settings_files: Option<&[PathBuf]>,
    ) -> Result<Settings, ConfigError> {
        let loaded = dynaconf::load(ctx, settings_files)?;
        let mut settings = Self::from_values(&loaded.values, &loaded.origins, ctx)?;
        settings.files = loaded.files;
        Ok(settings)
    }

    /// Builds typed settings from Dynaconf-style values (upper-case top-level keys), for
    /// example what Python's `settings.as_dict()` returns. `ctx` supplies the `CCAT_OPS_DB_*`
    /// variables and the environment name.
    pub fn from_values(
        values: &Map<String, Value>,
        origins: &std::collections::BTreeMap<String, String>,
        ctx: &LoadContext,
    ) -> Result<Settings, ConfigError> {
        let read = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let r = Reader {
            values,
            origins,
            read: &read,
        };
        let strict = r.boolean("STRICT_SETTINGS", false)?;
        let redis_port = r.port("REDIS_PORT", 6379)?;
        let hpc_backend = r.choice("HPC_BACKEND", HpcBackend::NAMES, HpcBackend::Local)?;
        // Apptainer is what production runs; the local backend is for development,
        // where the command itself is the useful default.
        let default_runtime = match hpc_backend {
            HpcBackend::Local => ContainerRuntime::None,
            // The pod is the container.
            HpcBackend::Kubernetes => ContainerRuntime::Pod,
            HpcBackend::Slurm => ContainerRuntime::Apptainer,
        };
        let container_runtime = r.choice("CONTAINER_RUNTIME", RUNTIMES, default_runtime)?;
        // A pod is a container already; elsewhere nothing would start the image.
        if (container_runtime == ContainerRuntime::Pod) != (hpc_backend == HpcBackend::Kubernetes) {
            let got = r.get("CONTAINER_RUNTIME").cloned().unwrap_or(Value::Null);
            return Err(r.invalid(
                "CONTAINER_RUNTIME",
                "pod with HPC_BACKEND=kubernetes (and only there)",
                &got,
            ));
        }
        let mut settings = Settings {
            env: ctx.environments().join(","),
            hpc_backend,
            pipeline_base_dir: r.string("PIPELINE_BASE_DIR", "/data/pipelines")?.into(),
            processing_location_id: r.positive_int("PROCESSING_LOCATION_ID", 1)?,
            k8s_namespace: r.string("K8S_NAMESPACE", "ccat-workflows")?,
            slurm: SlurmSettings {
                account: r.string("SLURM_ACCOUNT", "")?,
                extra_options: r.string_list("SLURM_EXTRA_OPTIONS")?,
                bin_dir: r.string("SLURM_BIN_DIR", "")?.into(),
                accounting: r.boolean("SLURM_ACCOUNTING", false)?,
            },
            slurm_partition: r.string("SLURM_PARTITION", "")?,
            kubernetes: KubernetesSettings {
                pipeline_volume: r.volume("K8S_PIPELINE_VOLUME", false)?,
                data_volumes: r
                    .string_list("K8S_DATA_VOLUMES")?
                    .into_iter()
                    .map(|v| check_volume("K8S_DATA_VOLUMES", &v, true, &r))
                    .collect::<Result<_, _>>()?,
                job_ttl_seconds: r.positive_int("K8S_JOB_TTL_SECONDS", 86400)?,
            },
            workflow: WorkflowSettings {
                container_runtime,
                apptainer: r.string("APPTAINER_BIN", "apptainer")?,
                staging_mode: r.choice("STAGING_MODE", StagingMode::NAMES, StagingMode::Local)?,
                claim_batch_size: r.positive_int("CLAIM_BATCH_SIZE", 100)?,
                max_active_jobs: r.positive_int("MAX_ACTIVE_JOBS", 500)?,
                lease_seconds: r.seconds("LEASE_SECONDS", 300.0)?,
                retry_backoff_seconds: r.seconds("RETRY_BACKOFF_SECONDS", 60.0)?,
                // Work goes to the Celery workers where a Redis is configured; without one
                // (or with an empty REDIS_HOST) it runs in the manager (the embedded default).
                dispatch_mode: r.choice(
                    "DISPATCH_MODE",
                    &[
                        ("inline", DispatchMode::Inline),
                        ("celery", DispatchMode::Celery),
                    ],
                    if r.get("REDIS_HOST").is_some_and(|h| h.as_str() != Some("")) {
                        DispatchMode::Celery
                    } else {
                        DispatchMode::Inline
                    },
                )?,
                celery_global_keyprefix: r.string("CELERY_GLOBAL_KEYPREFIX", "")?,
            },
            sif_cache_dir: r.string("SIF_CACHE_DIR", "/data/sif-cache")?.into(),
            redis: RedisSettings {
                host: r.string("REDIS_HOST", "localhost")?,
                port: redis_port,
                password: Secret::new(r.string("REDIS_PASSWORD", "")?),
            },
            poll_intervals: PollIntervals {
                trigger_manager: r.seconds("TRIGGER_MANAGER_POLL_INTERVAL", 30.0)?,
                workflow_manager: r.seconds("WORKFLOW_MANAGER_POLL_INTERVAL", 10.0)?,
                result_manager: r.seconds("RESULT_MANAGER_POLL_INTERVAL", 10.0)?,
            },
            max_new_runs_per_cycle: r.positive_int("MAX_NEW_RUNS_PER_CYCLE", 500)? as usize,
            metrics_address: r.listen_address("METRICS_ADDRESS")?,
            database: database_settings(&r, ctx)?,
            files: Vec::new(),
            unknown_keys: Vec::new(),
        };
        let read = read.into_inner();
        settings.unknown_keys = values
            .keys()
            .filter(|k| !read.contains(*k) && !is_foreign(k))
            .map(|k| UnknownKey {
                key: k.clone(),
                origin: origins.get(k).cloned().unwrap_or_else(|| "settings".into()),
                did_you_mean: nearest(k, read.iter()),
            })
            .collect();
        if strict && !settings.unknown_keys.is_empty() {
            return Err(ConfigError::Unknown(settings.unknown_keys));
        }
        for unknown in &settings.unknown_keys {
            tracing::warn!(key = %unknown.key, origin = %unknown.origin,
                did_you_mean = unknown.did_you_mean.as_deref().unwrap_or(""),
                "{unknown}; it is ignored");
        }
        Ok(settings)
    }
}

/// Database settings: ops-db's defaults, then `DATABASE_*` keys of our settings files,
/// then `CCAT_OPS_DB_DATABASE_*` environment variables (parsed as Dynaconf parses them).
fn database_settings(r: &Reader<'_>, ctx: &LoadContext) -> Result<DatabaseSettings, ConfigError> {
    let mut values = r.values.clone();
    let mut origins = r.origins.clone();
    for (name, raw) in &ctx.env_vars {
        if let Some(key) = name.strip_prefix(OPS_DB_PREFIX) {
            let key = key.to_uppercase();
            if !key.starts_with("DATABASE_") {
                continue;
            }
            let value = dynaconf::parse_env_text(raw).map_err(|message| ConfigError::Invalid {
                key: key.clone(),
                origin: format!("environment variable {name}"),
                expected: "a valid value".into(),
                got: dynaconf::hide_if_secret(&key, message),
            })?;
            origins.insert(key.clone(), format!("environment variable {name}"));
            values.insert(key, value);
        }
    }
    let r = Reader {
        values: &values,
        origins: &origins,
        read: r.read,
    };
    let kind = r.string("DATABASE_TYPE", "sqlite")?.to_lowercase();
    match kind.as_str() {
        "sqlite" => Ok(DatabaseSettings::Sqlite {
            path: r
                .string("DATABASE_SQLITE_DATABASE", "/tmp/dev_ccat_ops_db.sqlite")?
                .into(),
        }),
        "postgresql" | "postgres" => Ok(DatabaseSettings::Postgresql {
            host: r.string("DATABASE_POSTGRESQL_HOST", "localhost")?,
            port: r.port("DATABASE_POSTGRESQL_PORT", 5432)?,
            user: r.string("DATABASE_POSTGRESQL_USER", "ccat")?,
            password: Secret::new(r.string("DATABASE_POSTGRESQL_PASSWORD", "pw4ccat")?),
            database: r.string("DATABASE_POSTGRESQL_DATABASE", "ccat_ops_db")?,
        }),
        other => Err(r.invalid(
            "DATABASE_TYPE",
            "sqlite or postgresql",
            &Value::String(other.into()),
        )),
    }
}

/// `[PATH=]pvc:NAME`, a bare absolute `PATH` (when `with_path`), or empty (when not).
fn check_volume(
    key: &str,
    value: &str,
    with_path: bool,
    r: &Reader<'_>,
) -> Result<String, ConfigError> {
    let (path, source) = match value.split_once('=') {
        Some((path, source)) => (Some(path), Some(source)),
        None if with_path => (Some(value), None),
        None => (None, (!value.is_empty()).then_some(value)),
    };
    let path_ok = path.is_none_or(|p| p.starts_with('/'));
    let source_ok =
        source.is_none_or(|s| s.strip_prefix("pvc:").is_some_and(|name| !name.is_empty()));
    if path_ok && source_ok && (with_path || path.is_none()) {
        Ok(value.to_owned())
    } else {
        let expected = if with_path {
            "an absolute PATH, or PATH=pvc:NAME"
        } else {
            "empty (a host path) or pvc:NAME"
        };
        Err(r.invalid(key, expected, &Value::String(value.to_owned())))
    }
}

/// Typed access to the loaded values, with errors that name the key and its origin.
struct Reader<'a> {
    values: &'a Map<String, Value>,
    origins: &'a std::collections::BTreeMap<String, String>,
    /// Every key asked for: the known keys, to tell unknown ones (typos) from them.
    read: &'a std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Reader<'_> {
    fn invalid(&self, key: &str, expected: &str, got: &Value) -> ConfigError {
        let got = if key.contains("PASSWORD") {
            "a value that is not shown".to_owned()
        } else {
            got.to_string()
        };
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: self
                .origins
                .get(key)
                .cloned()
                .unwrap_or_else(|| "settings".into()),
            expected: expected.to_owned(),
            got,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.read.borrow_mut().insert(key.to_owned());
        self.values.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            // Dynaconf turns `CCAT_..._SLURM_PARTITION=123` into an int; a name is meant.
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(self.invalid(key, "a string", other)),
        }
    }

    /// `host:port` to listen on, or empty.
    fn listen_address(&self, key: &str) -> Result<String, ConfigError> {
        let address = self.string(key, "")?;
        let valid = address.is_empty()
            || address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if valid {
            Ok(address)
        } else {
            Err(self.invalid(key, "host:port (or empty)", &Value::String(address)))
        }
    }

    /// A kubernetes volume setting (see [`KubernetesSettings`]).
    fn volume(&self, key: &str, with_path: bool) -> Result<String, ConfigError> {
        let value = self.string(key, "")?;
        check_volume(key, &value, with_path, self)
    }

    fn int(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().expect("checked")),
            // ops-db's own file writes the port as a string.
            Some(v @ Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| self.invalid(key, "an integer", v)),
            Some(other) => Err(self.invalid(key, "an integer", other)),
        }
    }

    fn positive_int(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        let value = self.int(key, default)?;
        if value < 1 {
            return Err(self.invalid(key, "a positive integer", &Value::from(value)));
        }
        Ok(value)
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v @ Value::String(s)) => match s.trim().to_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" | "" => Ok(false),
                _ => Err(self.invalid(key, "true or false", v)),
            },
            Some(other) => Err(self.invalid(key, "true or false", other)),
        }
    }

    /// A list of strings: a TOML/JSON list, or one string split as a shell would.
    fn string_list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.invalid(key, "a list of strings", other)),
                })
                .collect(),
            Some(v @ Value::String(s)) => {
                shlex::split(s).ok_or_else(|| self.invalid(key, "options quoted as in a shell", v))
            }
            Some(other) => Err(self.invalid(key, "a list of strings", other)),
        }
    }

    fn port(&self, key: &str, default: u16) -> Result<u16, ConfigError> {
        let value = self.int(key, i64::from(default))?;
        u16::try_from(value)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| self.invalid(key, "a port number (1-65535)", &Value::from(value)))
    }

    fn seconds(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        let value = match self.get(key) {
            None => default,
            Some(Value::Number(n)) => n.as_f64().unwrap_or(-1.0),
            Some(other) => return Err(self.invalid(key, "a number of seconds", other)),
        };
        if !(value > 0.0 && value.is_finite()) {
            return Err(self.invalid(key, "a positive number of seconds", &Value::from(value)));
        }
        Ok(value)
    }

    fn choice<T: Copy>(
        &self,
        key: &str,
        names: &[(&str, T)],
        default: T,
    ) -> Result<T, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let wanted = value.as_str().map(str::to_lowercase);
        names
            .iter()
            .find(|(name, _)| Some(*name) == wanted.as_deref())
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let allowed: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                self.invalid(key, &format!("one of {}", allowed.join(", ")), value)
            })
    }
}

#[cfg(test)]
mod tests;

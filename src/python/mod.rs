//! The Python extension module `ccat_workflow_manager._core`.
//!
//! Thin: it converts between Python and Rust values and maps errors to the documented
//! exception classes; the behaviour lives in the rest of the crate. Blocking work runs
//! with the GIL released.

mod calls;
mod logging;
mod managers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};

use crate::config::{self, ConfigError, LoadContext};

create_exception!(
    _core,
    WorkflowManagerError,
    PyException,
    "Base class of every error raised by the Rust core."
);
create_exception!(
    _core,
    DatabaseError,
    WorkflowManagerError,
    "The operations database could not be reached or a statement on it failed."
);
create_exception!(
    _core,
    ConfigurationError,
    WorkflowManagerError,
    "The settings are invalid: a key has a value of the wrong kind, or a file cannot be read."
);

fn config_error(err: ConfigError) -> PyErr {
    ConfigurationError::new_err(err.to_string())
}

fn database_error(err: crate::db::DbError) -> PyErr {
    DatabaseError::new_err(err.to_string())
}

/// The tokio runtime of this process. Celery's prefork pool forks after import: a runtime
/// made before the fork has no threads in the child, so a new one is made when the
/// process id changes (the parent's is leaked in the child: joining its threads would hang).
fn runtime() -> Arc<tokio::runtime::Runtime> {
    static RUNTIME: Mutex<Option<(u32, Arc<tokio::runtime::Runtime>)>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match slot.as_ref() {
        Some((owner, rt)) if *owner == pid => rt.clone(),
        _ => {
            if let Some((_, stale)) = slot.take() {
                std::mem::forget(stale);
            }
            let rt = Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime can be built"),
            );
            *slot = Some((pid, rt.clone()));
            rt
        }
    }
}

fn to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    pythonize::depythonize(obj).map_err(|e| ConfigurationError::new_err(format!("{what}: {e}")))
}

fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    pythonize::pythonize(py, value).map_err(|e| WorkflowManagerError::new_err(e.to_string()))
}

fn context(env: Option<BTreeMap<String, String>>) -> LoadContext {
    let mut ctx = LoadContext::from_process();
    if let Some(env) = env {
        ctx.env_vars = env;
    }
    ctx
}

/// The typed settings of a manager (SPEC §8).
#[pyclass(name = "Settings", module = "ccat_workflow_manager._core", frozen)]
struct PySettings {
    inner: config::Settings,
}

#[pymethods]
impl PySettings {
    /// Loads settings the way the Rust managers do: settings files found like Dynaconf
    /// finds them (or `settings_files`), then environment variables.
    #[staticmethod]
    #[pyo3(signature = (settings_files=None, env=None))]
    fn load(
        py: Python<'_>,
        settings_files: Option<Vec<PathBuf>>,
        env: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let ctx = context(env);
        let inner = py
            .detach(|| config::Settings::load_with(&ctx, settings_files.as_deref()))
            .map_err(config_error)?;
        Ok(PySettings { inner })
    }

    /// Builds settings from a mapping such as Dynaconf's `settings.as_dict()`.
    /// `CCAT_OPS_DB_*` variables are read from `env` (default: this process).
    #[staticmethod]
    #[pyo3(signature = (values, env=None))]
    fn from_dict(
        values: &Bound<'_, PyDict>,
        env: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let Value::Object(values) = to_json(values.as_any(), "settings")? else {
            return Err(ConfigurationError::new_err("settings must be a mapping"));
        };
        // Dynaconf upper-cases top-level keys; a plain dict may not have.
        let values: Map<String, Value> = values
            .into_iter()
            .map(|(k, v)| (k.to_uppercase(), v))
            .collect();
        let inner = config::Settings::from_values(&values, &BTreeMap::new(), &context(env))
            .map_err(config_error)?;
        Ok(PySettings { inner })
    }

    /// The settings as a dict, secrets masked.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(&self.inner)
            .map_err(|e| WorkflowManagerError::new_err(e.to_string()))?;
        to_python(py, &value)
    }

    fn __repr__(&self) -> String {
        format!(
            "Settings(env={:?}, hpc_backend={:?}, database={})",
            self.inner.env, self.inner.hpc_backend, self.inner.database
        )
    }

    /// Equal configuration values, wherever they were read from.
    fn __eq__(&self, other: &Self) -> bool {
        let values = |s: &config::Settings| config::Settings {
            files: Vec::new(),
            unknown_keys: Vec::new(),
            ..s.clone()
        };
        values(&self.inner) == values(&other.inner)
    }
}

/// The raw values the Rust Dynaconf loader reads (what `settings.as_dict()` shows in
/// Python), with the list of files read. Used to prove both loaders agree.
#[pyfunction]
#[pyo3(signature = (settings_files=None, env=None, cwd=None))]
fn dynaconf_values<'py>(
    py: Python<'py>,
    settings_files: Option<Vec<PathBuf>>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<PathBuf>,
) -> PyResult<(Bound<'py, PyAny>, Vec<PathBuf>)> {
    let mut ctx = context(env);
    if let Some(cwd) = cwd {
        ctx.cwd = cwd;
    }
    let loaded = py
        .detach(|| config::dynaconf::load(&ctx, settings_files.as_deref()))
        .map_err(|e| config_error(e.into()))?;
    Ok((to_python(py, &Value::Object(loaded.values))?, loaded.files))
}

/// The local backend's job wrapper, run by this interpreter (`sys.executable`).
fn python_launcher(py: Python<'_>) -> PyResult<Vec<String>> {
    let executable: String = py.import("sys")?.getattr("executable")?.extract()?;
    Ok(vec![
        executable,
        "-m".into(),
        "ccat_workflow_manager.cli".into(),
    ])
}

fn backend_for(
    py: Python<'_>,
    settings: &config::Settings,
) -> PyResult<crate::backend::AnyBackend> {
    crate::backend::from_settings(settings, Some(python_launcher(py)?))
        .map_err(|e| ConfigurationError::new_err(e.to_string()))
}

/// The Celery publisher `DISPATCH_MODE` asks for (None: inline).
fn publisher_for(settings: &config::Settings) -> PyResult<Option<crate::dispatch::Publisher>> {
    crate::dispatch::publisher_for(settings)
        .map_err(|e| ConfigurationError::new_err(format!("the Redis settings: {e}")))
}

/// A report as Python data (dicts, lists, …).
fn report_to_python<'py>(
    py: Python<'py>,
    report: &impl serde::Serialize,
) -> PyResult<Bound<'py, PyAny>> {
    let value =
        serde_json::to_value(report).map_err(|e| WorkflowManagerError::new_err(e.to_string()))?;
    to_python(py, &value)
}

/// A run's job as the workflow-manager would submit it now: `argv`, `env`, `workdir`,
/// `manifest`, `attempt_dir`, `tag` and resources. Reads the database, writes nothing.
#[pyfunction]
fn build_job<'py>(
    py: Python<'py>,
    settings: &PySettings,
    run_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    let plan = py.detach(|| {
        runtime().block_on(async move {
            let db = crate::db::Database::connect(&settings.database).await?;
            let options = crate::workflow::WorkflowOptions::from_settings(&settings);
            let plan = crate::workflow::preview_job(&db, &options, run_id).await;
            db.close().await;
            plan
        })
    });
    let plan = match plan.map_err(database_error)? {
        None => {
            return Err(pyo3::exceptions::PyLookupError::new_err(format!(
                "no run with id {run_id}"
            )));
        }
        Some(Err(reason)) => return Err(WorkflowManagerError::new_err(reason)),
        Some(Ok(plan)) => plan,
    };
    let value = serde_json::json!({
        "argv": plan.spec.command.argv(),
        "env": plan.spec.command.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        "workdir": plan.spec.command.workdir,
        "manifest": plan.manifest,
        "attempt_dir": plan.spec.attempt_dir,
        "tag": plan.spec.tag,
        "cpus": plan.spec.cpus,
        "memory_mb": plan.spec.memory_mb,
        "time_limit_seconds": plan.spec.time_limit_seconds,
    });
    to_python(py, &value)
}

/// A service's Redis heartbeat (`health:workflow:<service>`, TTL 90 s, refreshed every
/// 30 s) kept by this process until `stop()`: what a Celery worker runs.
#[pyclass(name = "Heartbeat", module = "ccat_workflow_manager._core", frozen)]
struct PyHeartbeat {
    beat: Mutex<Option<crate::health::ManagerHeartbeat>>,
}

#[pymethods]
impl PyHeartbeat {
    /// Stops beating and removes the health key (the service shows as down at once).
    fn stop(&self, py: Python<'_>) {
        let beat = self.beat.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(beat) = beat {
            py.detach(|| runtime().block_on(beat.stop()));
        }
    }
}

/// Starts the heartbeat of an idle-capable service such as a Celery worker.
#[pyfunction]
fn start_heartbeat(service: &str, settings: &PySettings) -> PyHeartbeat {
    logging::install();
    let rt = runtime();
    let _context = rt.enter();
    let beat = crate::health::ManagerHeartbeat::start_idle(&settings.inner.redis, service);
    PyHeartbeat {
        beat: Mutex::new(Some(beat)),
    }
}

/// Runs a manager's loop (`trigger-manager`, `workflow-manager` or `result-manager`)
/// until Ctrl-C (or another signal Python turns into an exception): the GIL is released
/// while it runs, the interpreter's signal handlers are run every 100 ms, and on a
/// signal the current cycle finishes before the exception is raised here (also when the
/// handler raised inside a Rust log event that was being written through `logging`).
#[pyfunction]
fn run_manager(py: Python<'_>, name: &str, settings: &PySettings) -> PyResult<()> {
    // Inside Python, Rust's log events go to Python's logging.
    logging::install();
    let Some(kind) = crate::managers::ManagerKind::from_name(name) else {
        return Err(ConfigurationError::new_err(format!(
            "no manager named {name:?}: trigger-manager, workflow-manager or result-manager"
        )));
    };
    let settings = settings.inner.clone();
    let launcher = python_launcher(py)?;
    py.detach(|| {
        runtime().block_on(async move {
            let db = crate::db::Database::connect(&settings.database)
                .await
                .map_err(database_error)?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let manager = crate::managers::run(kind, &settings, &db, Some(launcher), stopped);
            tokio::pin!(manager);
            let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
            let mut interrupted: Option<PyErr> = None;
            // Both futures are polled on this (the calling) thread: Python runs signal
            // handlers only in the main thread.
            let result = loop {
                tokio::select! {
                    result = &mut manager => break result,
                    _ = ticks.tick(), if interrupted.is_none() => {
                        // A signal handler may also have raised inside a logging call.
                        let signalled = Python::attach(|py| py.check_signals())
                            .err()
                            .or_else(logging::take_interrupt);
                        if let Some(e) = signalled {
                            interrupted = Some(e);
                            let _ = stop.send(true);
                        }
                    }
                }
            };
            db.close().await;
            if let Some(e) = interrupted {
                return Err(e);
            }
            result.map_err(|e| WorkflowManagerError::new_err(crate::managers::describe(&e)))
        })
    })
}

/// Applies the product's migrations to the configured database; returns the versions applied.
#[pyfunction]
fn migrate(py: Python<'_>, settings: &PySettings) -> PyResult<Vec<i64>> {
    // Inside Python, Rust's log events go to Python's logging.
    logging::install();
    let target = settings.inner.database.clone();
    py.detach(|| {
        runtime().block_on(async move {
            let db = crate::db::Database::connect(&target).await?;
            let applied = db.migrate().await;
            db.close().await;
            applied
        })
    })
    .map_err(database_error)
}

/// Runs the `ccat-wfm` command line with `argv` (program name first); returns the exit code.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    // Local jobs are started by this interpreter's `ccat_workflow_manager.cli`, not by
    // the interpreter itself.
    let launcher = match python_launcher(py) {
        Ok(launcher) => launcher,
        Err(e) => {
            e.print(py);
            return 1;
        }
    };
    let code = py.detach(|| crate::cli::run_with_launcher(argv, Some(launcher)));
    i32::from(code)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", crate::VERSION)?;
    m.add(
        "WorkflowManagerError",
        py.get_type::<WorkflowManagerError>(),
    )?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("DatabaseError", py.get_type::<DatabaseError>())?;
    m.add_class::<PySettings>()?;
    m.add_function(wrap_pyfunction!(dynaconf_values, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(run_manager, m)?)?;
    m.add_function(wrap_pyfunction!(build_job, m)?)?;
    m.add_function(wrap_pyfunction!(start_heartbeat, m)?)?;
    m.add_class::<PyHeartbeat>()?;
    m.add_class::<managers::PyTriggerManager>()?;
    m.add_class::<managers::PyWorkflowManager>()?;
    m.add_class::<managers::PyResultManager>()?;
    calls::register(m)?;
    m.add_function(wrap_pyfunction!(migrate, m)?)?;
    Ok(())
}

//! The Python extension module `ccat_workflow_manager._core`.
//!
//! Thin: it converts between Python and Rust values and maps errors to the documented
//! exception classes; the behaviour lives in the rest of the crate. Blocking work runs
//! with the GIL released.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    ConfigurationError,
    WorkflowManagerError,
    "The settings are invalid: a key has a value of the wrong kind, or a file cannot be read."
);

fn config_error(err: ConfigError) -> PyErr {
    ConfigurationError::new_err(err.to_string())
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

/// Runs the `ccat-wfm` command line with `argv` (program name first); returns the exit code.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    let code = py.detach(|| crate::cli::run_to_code(argv));
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
    m.add_class::<PySettings>()?;
    m.add_function(wrap_pyfunction!(dynaconf_values, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    Ok(())
}

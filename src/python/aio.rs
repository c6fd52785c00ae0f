//! The asyncio face: awaitable versions of the entry points for asyncio services (the
//! data center's FastAPI ops-db-api). Each returns a Python awaitable at once; the work
//! runs on pyo3-async-runtimes' tokio runtime, so the event loop is never blocked.

use pyo3::prelude::*;

use super::{PySettings, WorkflowManagerError, backend_for, database_error, publisher_for};
use crate::config::Settings;
use crate::db::{Database, DbError};

/// Runs `work` with a connection to the configured database and converts its result
/// to Python when the awaitable completes.
fn awaitable<'py, F, Fut, T>(
    py: Python<'py>,
    settings: Settings,
    work: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: FnOnce(Database) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, DbError>> + Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    super::logging::install();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let db = Database::connect(&settings.database)
            .await
            .map_err(database_error)?;
        let result = work(db.clone()).await;
        db.close().await;
        let value = serde_json::to_value(result.map_err(database_error)?)
            .map_err(|e| WorkflowManagerError::new_err(e.to_string()))?;
        Python::attach(|py| -> PyResult<Py<PyAny>> { Ok(super::to_python(py, &value)?.unbind()) })
    })
}

/// One trigger-manager cycle.
#[pyfunction]
#[pyo3(signature = (settings, dry_run=false))]
pub fn aio_process_triggers<'py>(
    py: Python<'py>,
    settings: &PySettings,
    dry_run: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    let options = crate::trigger::TriggerOptions::from_settings(&settings, dry_run);
    awaitable(py, settings, move |db| async move {
        crate::trigger::run_cycle(&db, &options, chrono::Utc::now()).await
    })
}

/// The gaps the trigger-manager would turn into runs now, creating nothing.
#[pyfunction]
#[pyo3(signature = (settings, pipeline=None))]
pub fn aio_preview_gaps<'py>(
    py: Python<'py>,
    settings: &PySettings,
    pipeline: Option<String>,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    let mut options = crate::trigger::TriggerOptions::from_settings(&settings, true);
    options.only_pipeline = pipeline;
    awaitable(py, settings, move |db| async move {
        crate::trigger::run_cycle(&db, &options, chrono::Utc::now()).await
    })
}

/// One workflow-manager cycle.
#[pyfunction]
pub fn aio_process_pending_runs<'py>(
    py: Python<'py>,
    settings: &PySettings,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    let backend = backend_for(py, &settings)?;
    let publisher = publisher_for(&settings)?;
    let options = crate::workflow::WorkflowOptions::from_settings(&settings);
    awaitable(py, settings, move |db| async move {
        crate::workflow::WorkflowManager::for_process(db, backend, options)
            .with_publisher(publisher)
            .cycle(chrono::Utc::now())
            .await
    })
}

/// One result-manager cycle.
#[pyfunction]
pub fn aio_process_running_steps<'py>(
    py: Python<'py>,
    settings: &PySettings,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    let backend = backend_for(py, &settings)?;
    let publisher = publisher_for(&settings)?;
    let options = crate::results::ResultOptions::from_settings(&settings);
    awaitable(py, settings, move |db| async move {
        crate::results::ResultManager::new(db, backend, options)
            .with_publisher(publisher)
            .cycle(chrono::Utc::now())
            .await
    })
}

/// A product's lineage (None when there is no such product).
#[pyfunction]
pub fn aio_product_lineage<'py>(
    py: Python<'py>,
    settings: &PySettings,
    product_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    awaitable(py, settings, move |db| async move {
        db.product_lineage(product_id).await
    })
}

/// Every product derived from a raw data package.
#[pyfunction]
pub fn aio_derived_products<'py>(
    py: Python<'py>,
    settings: &PySettings,
    package_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let settings = settings.inner.clone();
    awaitable(py, settings, move |db| async move {
        db.derived_products(package_id).await
    })
}

/// Sync lineage queries, for code that is not async.
#[pyfunction]
pub fn product_lineage<'py>(
    py: Python<'py>,
    settings: &PySettings,
    product_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    super::blocking(py, settings.inner.clone(), move |db| async move {
        db.product_lineage(product_id).await
    })
}

#[pyfunction]
pub fn derived_products<'py>(
    py: Python<'py>,
    settings: &PySettings,
    package_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    super::blocking(py, settings.inner.clone(), move |db| async move {
        db.derived_products(package_id).await
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(aio_process_triggers, m)?)?;
    m.add_function(wrap_pyfunction!(aio_preview_gaps, m)?)?;
    m.add_function(wrap_pyfunction!(aio_process_pending_runs, m)?)?;
    m.add_function(wrap_pyfunction!(aio_process_running_steps, m)?)?;
    m.add_function(wrap_pyfunction!(aio_product_lineage, m)?)?;
    m.add_function(wrap_pyfunction!(aio_derived_products, m)?)?;
    m.add_function(wrap_pyfunction!(product_lineage, m)?)?;
    m.add_function(wrap_pyfunction!(derived_products, m)?)?;
    Ok(())
}

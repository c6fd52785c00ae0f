//! The one-call entry points: each opens a connection to the configured database, does
//! one thing, closes it, and returns the result as Python data. Each is defined once and
//! exists in two forms: `name`, which blocks with the GIL released (for Celery tasks and
//! scripts), and `aio_name`, which returns an awaitable at once and runs on
//! pyo3-async-runtimes' tokio runtime (for asyncio services such as the data center's
//! FastAPI ops-db-api). Connections are opened per call, so both are safe in forked workers.

use std::future::Future;

use pyo3::prelude::*;

use super::{
    PySettings, WorkflowManagerError, backend_for, database_error, logging, publisher_for,
    report_to_python, runtime,
};
use crate::config::Settings;
use crate::db::{Database, DbError};

/// Runs `work` on a fresh connection with the GIL released; its result as Python data.
fn blocking<'py, F, Fut, T>(
    py: Python<'py>,
    settings: Settings,
    work: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: FnOnce(Database) -> Fut + Send,
    Fut: Future<Output = Result<T, DbError>> + Send,
    T: serde::Serialize + Send,
{
    // Inside Python, Rust's log events go to Python's logging.
    logging::install();
    let result = py.detach(|| runtime().block_on(on_connection(settings, work)));
    report_to_python(py, &result.map_err(database_error)?)
}

/// An awaitable of `work` on a fresh connection; its result as Python data.
fn awaitable<'py, F, Fut, T>(
    py: Python<'py>,
    settings: Settings,
    work: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: FnOnce(Database) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, DbError>> + Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    logging::install();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let result = on_connection(settings, work)
            .await
            .map_err(database_error)?;
        let value = serde_json::to_value(result)
            .map_err(|e| WorkflowManagerError::new_err(e.to_string()))?;
        Python::attach(|py| -> PyResult<Py<PyAny>> { Ok(super::to_python(py, &value)?.unbind()) })
    })
}

async fn on_connection<F, Fut, T>(settings: Settings, work: F) -> Result<T, DbError>
where
    F: FnOnce(Database) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let db = Database::connect(&settings.database).await?;
    let result = work(db.clone()).await;
    db.close().await;
    result
}

/// Defines an entry point once, in both forms. Its body runs with the GIL held (reading
/// the arguments, building the backend) and evaluates to the work to run on the
/// connection: `move |db| async move { … }`.
macro_rules! entry_point {
    (
        $(#[doc = $doc:literal])*
        fn $name:ident / $aio:ident ($py:ident, $settings:ident $(, $arg:ident : $ty:ty)*)
        $(signature = $sig:tt)?
        $body:block
    ) => {
        $(#[doc = $doc])*
        #[pyfunction]
        $(#[pyo3(signature = $sig)])?
        pub(super) fn $name<'py>(
            $py: Python<'py>,
            $settings: &PySettings,
            $($arg: $ty),*
        ) -> PyResult<Bound<'py, PyAny>> {
            let work = $body;
            blocking($py, $settings.inner.clone(), work)
        }

        $(#[doc = $doc])*
        /// An awaitable, returned at once.
        #[pyfunction]
        $(#[pyo3(signature = $sig)])?
        pub(super) fn $aio<'py>(
            $py: Python<'py>,
            $settings: &PySettings,
            $($arg: $ty),*
        ) -> PyResult<Bound<'py, PyAny>> {
            let work = $body;
            awaitable($py, $settings.inner.clone(), work)
        }
    };
}

entry_point! {
    /// One trigger-manager cycle from a cold start; its report.
    fn process_triggers / aio_process_triggers(py, settings, dry_run: bool)
    signature = (settings, dry_run=false)
    {
        let options = crate::trigger::TriggerOptions::from_settings(&settings.inner, dry_run);
        move |db: Database| async move {
            crate::trigger::run_cycle(&db, &options, chrono::Utc::now()).await
        }
    }
}

entry_point! {
    /// The gaps the trigger-manager would turn into runs now, per pipeline; creates nothing.
    fn preview_gaps / aio_preview_gaps(py, settings, pipeline: Option<String>)
    signature = (settings, pipeline=None)
    {
        let mut options = crate::trigger::TriggerOptions::from_settings(&settings.inner, true);
        options.only_pipeline = pipeline;
        move |db: Database| async move {
            crate::trigger::run_cycle(&db, &options, chrono::Utc::now()).await
        }
    }
}

entry_point! {
    /// One workflow-manager cycle (claim, stage, submit); its report.
    fn process_pending_runs / aio_process_pending_runs(py, settings) {
        let backend = backend_for(py, &settings.inner)?;
        let publisher = publisher_for(&settings.inner)?;
        let options = crate::workflow::WorkflowOptions::from_settings(&settings.inner);
        move |db: Database| async move {
            // One lease owner for every call of this process: runs waiting for staging
            // are picked up again by the next call, not after their lease expires.
            crate::workflow::WorkflowManager::for_process(db, backend, options)
                .with_publisher(publisher)
                .cycle(chrono::Utc::now())
                .await
        }
    }
}

entry_point! {
    /// One result-manager cycle (job status, failures and retries, cancellations,
    /// collection); its report.
    fn process_running_steps / aio_process_running_steps(py, settings) {
        let backend = backend_for(py, &settings.inner)?;
        let publisher = publisher_for(&settings.inner)?;
        let options = crate::results::ResultOptions::from_settings(&settings.inner);
        move |db: Database| async move {
            crate::results::ResultManager::new(db, backend, options)
                .with_publisher(publisher)
                .cycle(chrono::Utc::now())
                .await
        }
    }
}

entry_point! {
    /// A product's lineage (None when there is no such product).
    fn product_lineage / aio_product_lineage(py, settings, product_id: i64) {
        move |db: Database| async move { db.product_lineage(product_id).await }
    }
}

entry_point! {
    /// Every product derived from a raw data package.
    fn derived_products / aio_derived_products(py, settings, package_id: i64) {
        move |db: Database| async move { db.derived_products(package_id).await }
    }
}

// The Celery workers' hand-offs: blocking only (Celery tasks are not coroutines).

/// A Celery worker's part of a submission hand-off: takes the run and submits it.
#[pyfunction]
pub(super) fn submit_run<'py>(
    py: Python<'py>,
    settings: &PySettings,
    run_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let backend = backend_for(py, &settings.inner)?;
    let options = crate::workflow::WorkflowOptions::from_settings(&settings.inner);
    blocking(py, settings.inner.clone(), move |db| async move {
        crate::workflow::WorkflowManager::for_process(db, backend, options)
            .submit_handed_off(run_id, chrono::Utc::now())
            .await
    })
}

/// A Celery worker's part of a collection hand-off: registers the run's outputs.
#[pyfunction]
pub(super) fn collect_run<'py>(
    py: Python<'py>,
    settings: &PySettings,
    run_id: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let backend = backend_for(py, &settings.inner)?;
    let options = crate::results::ResultOptions::from_settings(&settings.inner);
    blocking(py, settings.inner.clone(), move |db| async move {
        crate::results::ResultManager::new(db, backend, options)
            .collect_handed_off(run_id)
            .await
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for function in [
        wrap_pyfunction!(process_triggers, m)?,
        wrap_pyfunction!(aio_process_triggers, m)?,
        wrap_pyfunction!(preview_gaps, m)?,
        wrap_pyfunction!(aio_preview_gaps, m)?,
        wrap_pyfunction!(process_pending_runs, m)?,
        wrap_pyfunction!(aio_process_pending_runs, m)?,
        wrap_pyfunction!(process_running_steps, m)?,
        wrap_pyfunction!(aio_process_running_steps, m)?,
        wrap_pyfunction!(product_lineage, m)?,
        wrap_pyfunction!(aio_product_lineage, m)?,
        wrap_pyfunction!(derived_products, m)?,
        wrap_pyfunction!(aio_derived_products, m)?,
        wrap_pyfunction!(submit_run, m)?,
        wrap_pyfunction!(collect_run, m)?,
    ] {
        m.add_function(function)?;
    }
    Ok(())
}

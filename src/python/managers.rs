//! The long-lived managers of the Python API: `TriggerManager`, `WorkflowManager` and
//! `ResultManager`. Each keeps what makes its next cycle cheap — the connection pool,
//! the trigger-manager's evaluator, the workflow-manager's lease owner — between calls,
//! and cycles blocking (the GIL released) or as an awaitable. The one-call functions
//! (`process_triggers`, …) stay the cold, one-shot convenience.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pyo3::prelude::*;

use super::{
    ConfigurationError, PySettings, backend_for, database_error, logging, publisher_for,
    report_to_python, runtime,
};
use crate::backend::AnyBackend;
use crate::config::Settings;
use crate::db::{Database, DbError};
use crate::results::ResultManager;
use crate::trigger::{Evaluator, TriggerOptions};
use crate::workflow::WorkflowManager;

/// What a manager keeps between cycles.
trait Kept: Send + 'static {
    type Report: serde::Serialize + Send;
    fn cycle(
        &mut self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Self::Report, DbError>> + Send;
}

struct KeptTrigger {
    db: Database,
    options: TriggerOptions,
    evaluator: Evaluator,
}

impl Kept for KeptTrigger {
    type Report = crate::trigger::CycleReport;
    async fn cycle(&mut self, now: DateTime<Utc>) -> Result<Self::Report, DbError> {
        self.evaluator.cycle(&self.db, &self.options, now).await
    }
}

impl Kept for WorkflowManager<AnyBackend> {
    type Report = crate::workflow::WorkflowReport;
    async fn cycle(&mut self, now: DateTime<Utc>) -> Result<Self::Report, DbError> {
        WorkflowManager::cycle(self, now).await
    }
}

impl Kept for ResultManager<AnyBackend> {
    type Report = crate::results::ResultReport;
    async fn cycle(&mut self, now: DateTime<Utc>) -> Result<Self::Report, DbError> {
        ResultManager::cycle(self, now).await
    }
}

/// Makes a manager on the pool of its first cycle (so one built before a fork opens its
/// pool in the process that uses it).
type Make<K> = Arc<dyn Fn(Database) -> Result<K, String> + Send + Sync>;

/// A manager and its pool, made on first use; the body of the three classes.
struct Keeper<K> {
    settings: Settings,
    make: Make<K>,
    state: Arc<tokio::sync::Mutex<Option<(Database, K)>>>,
}

enum CycleError {
    Database(DbError),
    Configuration(String),
}

impl From<CycleError> for PyErr {
    fn from(e: CycleError) -> Self {
        match e {
            CycleError::Database(e) => database_error(e),
            CycleError::Configuration(e) => ConfigurationError::new_err(e),
        }
    }
}

impl<K: Kept> Keeper<K> {
    fn new(settings: Settings, make: Make<K>) -> Self {
        Keeper {
            settings,
            make,
            state: Default::default(),
        }
    }

    fn run(&self) -> impl Future<Output = Result<K::Report, CycleError>> + Send + 'static {
        let (settings, make, state) =
            (self.settings.clone(), self.make.clone(), self.state.clone());
        async move {
            let mut state = state.lock().await;
            if state.is_none() {
                let db = Database::connect(&settings.database)
                    .await
                    .map_err(CycleError::Database)?;
                let kept = make(db.clone()).map_err(CycleError::Configuration)?;
                *state = Some((db, kept));
            }
            let (_, kept) = state.as_mut().expect("made above");
            kept.cycle(Utc::now()).await.map_err(CycleError::Database)
        }
    }

    fn cycle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        logging::install();
        let work = self.run();
        let report = py.detach(|| runtime().block_on(work))?;
        report_to_python(py, &report)
    }

    fn acycle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        logging::install();
        let work = self.run();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let report = work.await?;
            Python::attach(|py| Ok(report_to_python(py, &report)?.unbind()))
        })
    }

    /// Closes the pool and forgets the manager: a later cycle starts afresh.
    fn close(&self, py: Python<'_>) {
        let state = self.state.clone();
        py.detach(|| {
            runtime().block_on(async move {
                if let Some((db, kept)) = state.lock().await.take() {
                    drop(kept);
                    db.close().await;
                }
            })
        });
    }
}

/// What the workflow- and result-manager are made of besides their pool: the backend
/// `HPC_BACKEND` names and the Celery publisher, made anew with each pool.
struct Parts {
    settings: Settings,
    launcher: Vec<String>,
}

impl Parts {
    /// Checks the backend and the Redis settings now, so that a bad setting fails the
    /// constructor rather than the first cycle.
    fn check(py: Python<'_>, settings: &Settings) -> PyResult<Self> {
        backend_for(py, settings)?;
        publisher_for(settings)?;
        Ok(Parts {
            settings: settings.clone(),
            launcher: super::python_launcher(py)?,
        })
    }

    fn make(&self) -> Result<(AnyBackend, Option<crate::dispatch::Publisher>), String> {
        let backend = crate::backend::from_settings(&self.settings, Some(self.launcher.clone()))
            .map_err(|e| e.to_string())?;
        let publisher = crate::dispatch::publisher_for(&self.settings)
            .map_err(|e| format!("the Redis settings: {e}"))?;
        Ok((backend, publisher))
    }

    /// Makes the manager `build` returns on each new pool, with fresh parts.
    fn maker<M: 'static, O: Clone + Send + Sync + 'static>(
        self,
        options: O,
        build: fn(Database, AnyBackend, O, Option<crate::dispatch::Publisher>) -> M,
    ) -> Make<M> {
        Arc::new(move |db| {
            let (backend, publisher) = self.make()?;
            Ok(build(db, backend, options.clone(), publisher))
        })
    }
}

/// A `#[pymethods]` block: the class's constructor, then `cycle`, `acycle` and `close`
/// delegated to its [`Keeper`] (one macro, as PyO3 takes one methods block per class).
macro_rules! kept_manager_methods {
    ($class:ident, $constructor:item) => {
        #[pymethods]
        impl $class {
            $constructor

            /// One cycle, blocking (the GIL released); returns its report.
            fn cycle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                self.0.cycle(py)
            }

            /// One cycle as an awaitable for asyncio.
            fn acycle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                self.0.acycle(py)
            }

            /// Closes the pool; a later cycle opens a new one and starts afresh.
            fn close(&self, py: Python<'_>) {
                self.0.close(py);
            }
        }
    };
}

/// A trigger-manager that keeps its pool and its evaluator between cycles: on an archive
/// where nothing changed, a cycle after the first reads the change marks and stops.
#[pyclass(
    name = "TriggerManager",
    module = "ccat_workflow_manager._core",
    frozen
)]
pub struct PyTriggerManager(Keeper<KeptTrigger>);

kept_manager_methods!(
    PyTriggerManager,
    #[new]
    #[pyo3(signature = (settings, dry_run=false))]
    fn new(settings: &PySettings, dry_run: bool) -> PyResult<Self> {
        let options = TriggerOptions::from_settings(&settings.inner, dry_run);
        let make: Make<KeptTrigger> = Arc::new(move |db| {
            Ok(KeptTrigger {
                db,
                options: options.clone(),
                evaluator: Evaluator::default(),
            })
        });
        Ok(Self(Keeper::new(settings.inner.clone(), make)))
    }
);

/// A workflow-manager that keeps its pool and its lease owner between cycles: runs it
/// holds for staging are picked up again by its next cycle.
#[pyclass(
    name = "WorkflowManager",
    module = "ccat_workflow_manager._core",
    frozen
)]
pub struct PyWorkflowManager(Keeper<WorkflowManager<AnyBackend>>);

kept_manager_methods!(
    PyWorkflowManager,
    #[new]
    fn new(py: Python<'_>, settings: &PySettings) -> PyResult<Self> {
        let options = crate::workflow::WorkflowOptions::from_settings(&settings.inner);
        let make =
            Parts::check(py, &settings.inner)?.maker(options, |db, backend, o, publisher| {
                WorkflowManager::new(db, backend, o).with_publisher(publisher)
            });
        Ok(Self(Keeper::new(settings.inner.clone(), make)))
    }
);

/// A result-manager that keeps its pool between cycles.
#[pyclass(name = "ResultManager", module = "ccat_workflow_manager._core", frozen)]
pub struct PyResultManager(Keeper<ResultManager<AnyBackend>>);

kept_manager_methods!(
    PyResultManager,
    #[new]
    fn new(py: Python<'_>, settings: &PySettings) -> PyResult<Self> {
        let options = crate::results::ResultOptions::from_settings(&settings.inner);
        let make =
            Parts::check(py, &settings.inner)?.maker(options, |db, backend, o, publisher| {
                ResultManager::new(db, backend, o).with_publisher(publisher)
            });
        Ok(Self(Keeper::new(settings.inner.clone(), make)))
    }
);

//! Rust `tracing` events as Python `logging` records, when the core runs inside Python.
//!
//! Each event goes to the logger named after its target (`ccat_workflow_manager.workflow`,
//! `sqlx.query`, …) at the matching level, as `message key=value …`; the fields are also
//! attached as `record.rust_fields` (a dict) for structured handlers. Python's own
//! configuration decides what is shown; `RUST_LOG` (default `info,sqlx=warn`) decides
//! what is worth crossing into Python at all.

use std::fmt::Write;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Installs the bridge as this process's tracing subscriber, unless one exists.
pub fn install() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(PythonLogging)
        .try_init();
}

struct PythonLogging;

/// The message and the fields of an event.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name().to_owned(), value.to_owned()));
        }
    }
}

fn python_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

impl<S: Subscriber> Layer<S> for PythonLogging {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut text = fields.message.clone();
        for (key, value) in &fields.pairs {
            let _ = write!(text, " {key}={value}");
        }
        let logger_name = meta.target().replace("::", ".");
        let level = python_level(meta.level());
        // Not while the interpreter shuts down: the record would have nowhere to go.
        let _ = Python::try_attach(|py| {
            let logged = log_to_python(py, &logger_name, level, &text, &fields.pairs);
            if let Err(e) = logged {
                keep_if_interrupt(py, e);
            }
        });
    }
}

/// A `KeyboardInterrupt` or `SystemExit` raised by a signal handler while a record was
/// being logged: Python runs pending handlers whenever it runs bytecode on the main
/// thread, so Ctrl-C can surface inside a logging call, where it must not be lost.
static INTERRUPT: Mutex<Option<PyErr>> = Mutex::new(None);

fn keep_if_interrupt(py: Python<'_>, e: PyErr) {
    // Ordinary exceptions of a handler are logging's business (it reports them itself).
    if !e.is_instance_of::<pyo3::exceptions::PyException>(py) {
        let mut slot = INTERRUPT.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }
}

/// The interrupt a logging call caught, if any; taken once.
pub fn take_interrupt() -> Option<PyErr> {
    INTERRUPT.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn log_to_python(
    py: Python<'_>,
    logger_name: &str,
    level: u8,
    text: &str,
    pairs: &[(String, String)],
) -> PyResult<()> {
    let logger = py
        .import("logging")?
        .call_method1("getLogger", (logger_name,))?;
    if !logger
        .call_method1("isEnabledFor", (level,))?
        .extract::<bool>()?
    {
        return Ok(());
    }
    let rust_fields = PyDict::new(py);
    for (key, value) in pairs {
        rust_fields.set_item(key, value)?;
    }
    let extra = PyDict::new(py);
    extra.set_item("rust_fields", rust_fields)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("extra", extra)?;
    logger.call_method("log", (level, text), Some(&kwargs))?;
    Ok(())
}

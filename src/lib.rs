//! CCAT Workflow Manager: the science-pipeline orchestrator of the CCAT Data Center.
//!
//! The crate is at once a library (this), the `ccat-wfm` command line ([`cli`]) and,
//! with the `python` feature, the extension module `ccat_workflow_manager._core`.

pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
pub mod celery;
pub mod cli;
pub mod config;
pub mod db;
pub mod definitions;
pub mod dispatch;
pub mod filter;
pub mod health;
pub mod logging;
pub mod managers;
pub mod metrics;
pub mod results;
pub mod trigger;
pub mod workflow;

#[cfg(feature = "python")]
mod python;

/// The product version, as `ccat-wfm --version` and the Python package report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! The `ccat-wfm` command line. The Rust binary and the Python entry point both call
//! [`main`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::config::Settings;
use crate::db::Database;
use crate::logging::{self, LogFormat};

/// Exit code of a command that ran but found a problem (e.g. `db check`).
const EXIT_PROBLEM: u8 = 1;
/// Exit code of bad usage or an unusable configuration.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "ccat-wfm",
    version = crate::VERSION,
    about = "CCAT Workflow Manager: decides what archived data needs processing, runs it, \
             and records the results with their lineage",
    propagate_version = true
)]
struct Cli {
    /// Settings file to read instead of Dynaconf's search for settings.toml and
    /// .secrets.toml (repeatable; like SETTINGS_FILE_FOR_DYNACONF).
    #[arg(long = "settings", value_name = "FILE", global = true)]
    settings: Vec<PathBuf>,

    /// Log output format.
    #[arg(
        long,
        value_enum,
        global = true,
        default_value = "text",
        env = "CCAT_WORKFLOW_MANAGER_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// Log level or filter directive (RUST_LOG wins when set).
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "CCAT_WORKFLOW_MANAGER_LOG_LEVEL"
    )]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or verify the database schema.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, clap::Args)]
struct DatabaseArg {
    /// Database to use instead of the configured one (postgres://… or sqlite://…).
    /// Note that a password in a URL is visible to other users of this machine.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Apply the product's migrations (for standalone use; ops-db owns production).
    Migrate {
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Report every table and column the product needs that the database lacks;
    /// exits 1 when anything is missing.
    Check {
        #[command(flatten)]
        db: DatabaseArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration, secrets masked.
    Show {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line with `args` (the first being the program name) and returns the
/// process exit code.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    ExitCode::from(run_to_code(args))
}

/// [`main`] with the exit code as a number, for callers that are not a process (Python).
pub fn run_to_code<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are "errors" that print to stdout and succeed.
            let _ = err.print();
            return if err.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    logging::init(cli.log_format, &cli.log_level);

    let explicit = (!cli.settings.is_empty()).then_some(cli.settings.as_slice());
    let settings = match Settings::load(explicit) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: invalid configuration: {err}");
            return EXIT_USAGE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return EXIT_PROBLEM;
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            EXIT_PROBLEM
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<u8> {
    match command {
        Command::Config {
            command: ConfigCommand::Show { json },
        } => {
            let value = serde_json::to_value(&settings).context("serialising the settings")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_flat(&value));
            }
            Ok(0)
        }
        Command::Db {
            command: DbCommand::Migrate { db },
        } => {
            let db = open_database(&settings, &db).await?;
            let applied = db.migrate().await?;
            if applied.is_empty() {
                println!("{} is up to date", db.describe());
            } else {
                let versions: Vec<String> = applied.iter().map(i64::to_string).collect();
                println!(
                    "applied migration(s) {} to {}",
                    versions.join(", "),
                    db.describe()
                );
            }
            db.close().await;
            Ok(0)
        }
        Command::Db {
            command: DbCommand::Check { db, json },
        } => {
            let db = open_database(&settings, &db).await?;
            let report = db.check().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.is_complete() {
                println!(
                    "{}: every table and column the workflow manager needs is present",
                    db.describe()
                );
            } else {
                println!("{} lacks what the workflow manager needs:", db.describe());
                for table in &report.missing_tables {
                    println!("  missing table  {table}");
                }
                for (table, column) in &report.missing_columns {
                    println!("  missing column {table}.{column}");
                }
            }
            db.close().await;
            Ok(if report.is_complete() {
                0
            } else {
                EXIT_PROBLEM
            })
        }
    }
}

async fn open_database(settings: &Settings, arg: &DatabaseArg) -> anyhow::Result<Database> {
    Ok(match &arg.database_url {
        Some(url) => Database::connect_url(url).await?,
        None => Database::connect(&settings.database).await?,
    })
}

/// Renders a JSON value as aligned `dotted.key  value` lines for people.
fn render_flat(value: &Value) -> String {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, item, out);
                }
            }
            Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            Value::Array(items) if items.iter().all(Value::is_string) => out.push((
                prefix.to_owned(),
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut rows = Vec::new();
    walk("", value, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:width$}  {v}\n"))
        .collect()
}

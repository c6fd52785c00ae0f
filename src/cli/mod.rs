//! The `ccat-wfm` command line. The Rust binary and the Python entry point both call
//! [`main`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::db::Database;
use crate::logging::{self, LogFormat};
use crate::managers::{ManagerKind, describe};

mod admin;
#[cfg(feature = "bench")]
mod bench;
mod demo;
mod pipelines;
mod runs;
mod service;
mod views;

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

    /// Log level or filter directive (RUST_LOG wins when set) [default: info; warn for
    /// `demo`, whose progress display is the output].
    #[arg(long, global = true, env = "CCAT_WORKFLOW_MANAGER_LOG_LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// See the product work: seeds a small archive into a demo database under DIR, applies
    /// the demo pipeline (examples/demo/), runs the managers until every run is
    /// COMPLETED, then prints the data products and the lineage of a map. Safe to re-run.
    Demo {
        /// Where the demo database, archive, software and run directories go.
        #[arg(long, default_value = demo::DEFAULT_DIR)]
        dir: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
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
    /// Show the runs the trigger-manager would create now, creating nothing.
    Gaps {
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Print the gaps as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Run the trigger-manager: find gaps and create runs, every poll interval.
    TriggerManager {
        /// Run one cycle, print what it did, and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        db: DatabaseArg,
        #[command(flatten)]
        serve: MetricsArg,
    },
    /// Run the three managers in this one process, each its own loop, until SIGTERM or
    /// SIGINT (the embedded setup; production runs one process per manager). An SQLite
    /// database is created and migrated; any other must already have the schema.
    Run {
        #[command(flatten)]
        db: DatabaseArg,
        #[command(flatten)]
        serve: MetricsArg,
    },
    /// Run the workflow-manager: claim pending runs, stage their inputs, submit their jobs.
    WorkflowManager {
        /// Run one cycle, print what it did, and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        db: DatabaseArg,
        #[command(flatten)]
        serve: MetricsArg,
    },
    /// Run the result-manager: follow submitted jobs, record how they ended, retry
    /// failures, stop the jobs of cancelled runs.
    ResultManager {
        /// Run one cycle, print what it did, and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        db: DatabaseArg,
        #[command(flatten)]
        serve: MetricsArg,
    },
    /// What is going on: runs per pipeline and state, runs in flight with their age and
    /// job, and the latest failures with their reason.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every this many seconds until Ctrl-C.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<f64>,
        /// Rows of active runs and of failures shown, at most.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Create or update software versions, groupings, pipelines and steps from a TOML
    /// file (pipelines as code; see examples/). Idempotent; everything is validated first.
    Apply {
        /// The definitions file.
        file: PathBuf,
        /// Show what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Write the current definitions in the format `apply` reads.
    Export {
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Let a pipeline create and run work again.
    Enable {
        /// The pipeline's name.
        pipeline: String,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Stop a pipeline from creating new runs and from having pending ones claimed
    /// (runs already submitted finish).
    Disable {
        /// The pipeline's name.
        pipeline: String,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Put a FAILED or CANCELLED run back to PENDING for one more attempt now.
    Retry {
        /// The run's id.
        run_id: i64,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Look at runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Cancel a run: it is never collected, and its job is stopped by the result-manager.
    Cancel {
        /// The run's id.
        run_id: i64,
        /// Why (kept on the run).
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Where a data product comes from, or what was derived from a raw data package.
    Lineage {
        #[command(subcommand)]
        command: LineageCommand,
    },
    /// The local backend's job wrapper (started by the workflow-manager, not by hand).
    #[command(hide = true)]
    JobWrapper {
        /// The attempt directory: pid and exit records are written there.
        #[arg(long)]
        dir: PathBuf,
        /// Seconds after which the job is killed (0: no limit).
        #[arg(long, default_value_t = 0)]
        time_limit: u64,
        /// The job's command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Show the health of every manager reporting to Redis; exits 1 when any is down or
    /// stale (usable as a container health check with --service).
    Health {
        /// Only this service, e.g. trigger-manager (down when unknown).
        #[arg(long)]
        service: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the trigger-manager to evaluate a pipeline now (MANUAL pipelines, forced runs).
    Trigger {
        /// The pipeline's name.
        pipeline: String,
        /// Only this step.
        #[arg(long)]
        step: Option<String>,
        /// Only this sub-group key (as shown by `gaps`).
        #[arg(long)]
        sub_group: Option<String>,
        /// Create runs even where the current fingerprint already has one.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Publish a task to the Celery workers by hand (protocol 2, on the configured Redis).
    Send {
        /// The registered task name.
        task: String,
        /// The queue (workflow.staging, workflow.hpc, workflow.results).
        #[arg(long, default_value = crate::celery::QUEUE_HPC)]
        queue: String,
        /// 0 (highest) to 9.
        #[arg(long, default_value_t = 0)]
        priority: u8,
        /// Positional arguments as a JSON list.
        #[arg(long, default_value = "[]")]
        args: String,
        /// Keyword arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        kwargs: String,
        /// The broker's global_keyprefix (must match the workers').
        #[arg(long, default_value = "")]
        key_prefix: String,
    },
    /// Measure performance against the product's goals (not part of the tests; built
    /// with the cargo feature `bench` only).
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// Everything about one run: sub-group, software, configuration, job, metrics,
    /// error and the tail of its log.
    Show {
        /// The run's id.
        id: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
}

#[derive(Debug, Subcommand)]
enum LineageCommand {
    /// A product's runs (across steps) down to the raw data packages.
    Product {
        /// The data product's id.
        id: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Every product derived from a raw data package, directly or through other products.
    Package {
        /// The raw data package's id.
        id: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArg,
    },
}

#[derive(Debug, clap::Args)]
struct DatabaseArg {
    /// Database to use instead of the configured one (postgres://… or sqlite://…).
    /// Note that a password in a URL is visible to other users of this machine.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

/// Where a long-running command serves its metrics.
#[derive(Debug, clap::Args)]
struct MetricsArg {
    /// Serve Prometheus `/metrics` and `/healthz` on HOST:PORT (overrides METRICS_ADDRESS).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,
}

impl MetricsArg {
    fn apply(self, mut settings: Settings) -> Settings {
        if let Some(address) = self.metrics_address {
            settings.metrics_address = address;
        }
        settings
    }
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Apply the product's migrations (for standalone use; ops-db owns production).
    Migrate {
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Report every table, column and change-tracking trigger the product needs that
    /// the database lacks; exits 1 when anything is missing.
    Check {
        #[command(flatten)]
        db: DatabaseArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the PostgreSQL DDL of the change tracking the trigger-manager needs
    /// (columns, functions, triggers), for ops-db's Alembic migration.
    ChangeTrackingSql,
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

/// [`main`] with the exit code as a number.
pub fn run_to_code<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with_launcher(args, None)
}

/// [`run_to_code`] for callers that are not this executable (Python): `launcher` starts
/// the local backend's job wrapper (None: this executable).
pub fn run_with_launcher<I, T>(args: I, launcher: Option<Vec<String>>) -> u8
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
    // The wrapper runs beside the job, with nothing to configure or log.
    if let Command::JobWrapper {
        dir,
        time_limit,
        argv,
    } = &cli.command
    {
        return crate::backend::local::run_wrapper(
            dir,
            std::time::Duration::from_secs(*time_limit),
            argv,
        );
    }
    let level = cli.log_level.clone().unwrap_or_else(|| {
        match cli.command {
            Command::Demo { .. } => "warn",
            _ => "info",
        }
        .to_owned()
    });
    logging::init(cli.log_format, &level);

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
    match runtime.block_on(run(cli.command, settings, launcher)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            // A database URL of another kind is a configuration mistake, not a failure.
            if matches!(
                err.downcast_ref::<crate::db::DbError>(),
                Some(crate::db::DbError::UnknownScheme { .. })
            ) {
                EXIT_USAGE
            } else {
                EXIT_PROBLEM
            }
        }
    }
}

async fn run(
    command: Command,
    settings: Settings,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    match command {
        Command::Demo { dir, timeout } => {
            demo::run(&dir, Duration::from_secs(timeout), settings, launcher).await
        }
        Command::Gaps { pipeline, json, db } => {
            let db = open_database(&settings, &db).await?;
            let code = pipelines::gaps(&settings, &db, pipeline, json).await;
            db.close().await;
            code
        }
        Command::Health { service, json } => service::health(&settings, service, json).await,
        Command::Send {
            task,
            queue,
            priority,
            args,
            kwargs,
            key_prefix,
        } => {
            admin::send(
                &settings, &task, &queue, priority, &args, &kwargs, key_prefix,
            )
            .await
        }
        #[cfg(feature = "bench")]
        Command::Bench { command } => bench::run(command).await,
        Command::Lineage { command } => views::lineage(&settings, command).await,
        Command::Status {
            json,
            watch,
            limit,
            db,
        } => runs::status(&settings, json, watch, limit, &db).await,
        Command::Apply { file, dry_run, db } => {
            pipelines::apply_file(&settings, &file, dry_run, &db).await
        }
        Command::Export { output, db } => pipelines::export(&settings, output, &db).await,
        Command::Enable { pipeline, db } => {
            pipelines::set_enabled(&settings, &db, &pipeline, true).await
        }
        Command::Disable { pipeline, db } => {
            pipelines::set_enabled(&settings, &db, &pipeline, false).await
        }
        Command::Retry { run_id, db } => runs::retry(&settings, run_id, &db).await,
        Command::Cancel { run_id, reason, db } => {
            runs::cancel(&settings, run_id, &reason, &db).await
        }
        Command::Runs {
            command: RunsCommand::Show { id, json, db },
        } => {
            let db = open_database(&settings, &db).await?;
            let code = views::run_detail(&settings, &db, id, json).await;
            db.close().await;
            code
        }
        Command::Run { db, serve } => {
            let settings = serve.apply(settings);
            let db = open_database(&settings, &db).await?;
            let code = service::run_all(&settings, &db, launcher).await;
            db.close().await;
            code
        }
        Command::JobWrapper { .. } => unreachable!("handled before the runtime starts"),
        Command::TriggerManager { once, db, serve } => {
            manager(ManagerKind::Trigger, settings, once, db, serve, launcher).await
        }
        Command::WorkflowManager { once, db, serve } => {
            manager(ManagerKind::Workflow, settings, once, db, serve, launcher).await
        }
        Command::ResultManager { once, db, serve } => {
            manager(ManagerKind::Result, settings, once, db, serve, launcher).await
        }
        Command::Trigger {
            pipeline,
            step,
            sub_group,
            force,
            db,
        } => {
            pipelines::request_trigger(
                &settings,
                &pipeline,
                step.as_deref(),
                sub_group.as_deref(),
                force,
                &db,
            )
            .await
        }
        Command::Config {
            command: ConfigCommand::Show { json },
        } => admin::config_show(&settings, json),
        Command::Db {
            command: DbCommand::Migrate { db },
        } => admin::db_migrate(&settings, &db).await,
        Command::Db {
            command: DbCommand::ChangeTrackingSql,
        } => {
            print!("{}", crate::db::schema::POSTGRES_CHANGE_TRACKING_SQL);
            Ok(0)
        }
        Command::Db {
            command: DbCommand::Check { db, json },
        } => admin::db_check(&settings, &db, json).await,
    }
}

/// One of the three managers, on its database, serving metrics as asked.
async fn manager(
    kind: ManagerKind,
    settings: Settings,
    once: bool,
    db: DatabaseArg,
    serve: MetricsArg,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    let settings = serve.apply(settings);
    let db = open_database(&settings, &db).await?;
    let code = service::manager(kind, &settings, &db, once, launcher).await;
    db.close().await;
    code
}

async fn open_database(settings: &Settings, arg: &DatabaseArg) -> anyhow::Result<Database> {
    Ok(match &arg.database_url {
        Some(url) => Database::connect_url(url).await?,
        None => Database::connect(&settings.database).await?,
    })
}

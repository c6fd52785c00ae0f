//! The `ccat-wfm` command line. The Rust binary and the Python entry point both call
//! [`main`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::config::Settings;
use crate::db::Database;
use crate::health::{self, Health, HealthKeys};
use crate::logging::{self, LogFormat};
use crate::managers::{self, ManagerKind, describe};
use crate::trigger::{self, TriggerOptions};
use chrono::Utc;

mod demo;
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
    /// Measure performance against the product's goals (not part of the tests).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
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

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time the collector's SHA-256 against sha256sum on the same files.
    Checksum {
        /// Number of files.
        #[arg(long, default_value_t = 8)]
        files: usize,
        /// Size of each file in MiB.
        #[arg(long, default_value_t = 128)]
        size_mb: usize,
        /// Directory to write them under (a scratch directory, removed afterwards).
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        dir: PathBuf,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time submitting runs to SLURM end to end and count the SLURM calls of a status
    /// cycle at several numbers of active jobs (the cluster of SLURM_CONF; scratch
    /// database; the benchmark's jobs are cancelled at the end).
    Slurm {
        /// PostgreSQL URL of a role that may create databases.
        #[arg(long, env = "CCAT_BENCH_POSTGRES_URL")]
        database_url: String,
        /// Runs to submit.
        #[arg(long, default_value_t = 500)]
        submit: i64,
        /// Active jobs at which a status cycle is counted.
        #[arg(long, value_delimiter = ',', default_value = "1,100,2000")]
        active: Vec<i64>,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time publishing Celery tasks to Redis (pipelined batches, scratch key prefix);
    /// `nox -s bench` runs it beside Python Celery's send_task.
    Publish {
        /// Redis URL.
        #[arg(long, env = "CCAT_BENCH_REDIS_URL", value_name = "URL")]
        redis_url: String,
        /// Tasks to publish.
        #[arg(long, default_value_t = 100_000)]
        tasks: usize,
        /// Tasks per pipelined round trip.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time trigger cycles on generated archives in scratch PostgreSQL databases: a fresh
    /// one (first full cycle, no-change cycle, cycle after 100 new packages, against the
    /// floor of one plain query reading the same packages), then a mature one (every
    /// sub-group processed: a restart, the steady state, new packages and their
    /// downstream runs, a reprocessing wave, a deleted run, against the mature floor).
    Trigger {
        /// PostgreSQL URL of a role that may create databases (a scratch database
        /// ccat_wfm_bench_<packages> is created and dropped).
        #[arg(long, env = "CCAT_BENCH_POSTGRES_URL", value_name = "URL")]
        database_url: String,
        /// Packages in the generated archive.
        #[arg(long, default_value_t = 100_000)]
        packages: i64,
        /// Pipelines per instrument module (five modules).
        #[arg(long, default_value_t = 4)]
        pipelines_per_module: i64,
        /// Keep the generated database.
        #[arg(long)]
        keep: bool,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The mature-archive cycles (a)–(e) of `bench trigger`, in a process of their own,
    /// on the archive it built; prints their figures as JSON.
    #[command(hide = true)]
    TriggerScenarios {
        #[arg(long, value_name = "URL")]
        database_url: String,
        /// Packages in the archive.
        #[arg(long)]
        packages: i64,
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
            let code = gaps(&settings, &db, pipeline, json).await;
            db.close().await;
            code
        }
        Command::Health { service, json } => health(&settings, service, json).await,
        Command::Send {
            task,
            queue,
            priority,
            args,
            kwargs,
            key_prefix,
        } => {
            let args: Vec<Value> = match serde_json::from_str(&args) {
                Ok(Value::Array(items)) => items,
                _ => {
                    eprintln!("error: --args must be a JSON list, got {args:?}");
                    return Ok(EXIT_USAGE);
                }
            };
            let kwargs = match serde_json::from_str(&kwargs) {
                Ok(Value::Object(map)) => map,
                _ => {
                    eprintln!("error: --kwargs must be a JSON object, got {kwargs:?}");
                    return Ok(EXIT_USAGE);
                }
            };
            let mut message = crate::celery::Task::new(&task, &queue, args);
            message.kwargs = kwargs;
            message.priority = priority;
            let client = health::redis_client(&settings.redis)
                .context("the Redis settings are not usable")?;
            let options = crate::celery::BrokerOptions {
                global_keyprefix: key_prefix,
                ..Default::default()
            };
            let mut producer = crate::celery::Producer::connect(client, options).await?;
            producer.publish(std::slice::from_ref(&message)).await?;
            println!("{}", message.id);
            Ok(0)
        }
        Command::Bench {
            command:
                BenchCommand::Publish {
                    redis_url,
                    tasks,
                    batch,
                    json,
                },
        } => {
            let figures = crate::bench::publish(&redis_url, tasks, batch).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                println!(
                    "Rust producer: {} tasks in {:.3} s = {:.0} tasks/s (batches of {})",
                    figures.tasks, figures.seconds, figures.tasks_per_s, figures.batch
                );
            }
            Ok(0)
        }
        Command::Bench {
            command:
                BenchCommand::Trigger {
                    database_url,
                    packages,
                    pipelines_per_module,
                    keep,
                    json,
                },
        } => {
            let bench = crate::bench::TriggerBench {
                admin_url: database_url,
                packages,
                pipelines_per_module,
                keep,
            };
            // A fresh archive (no run yet), then a mature one (every sub-group processed).
            let fresh = crate::bench::trigger(&bench).await?;
            if !json {
                print!("{}", crate::bench::render_trigger(&fresh));
            }
            let mature = crate::bench::trigger_mature(&bench).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"fresh": fresh, "mature": mature})
                    )?
                );
            } else {
                print!("{}", crate::bench::render_mature(&mature));
            }
            Ok(0)
        }
        Command::Bench {
            command:
                BenchCommand::TriggerScenarios {
                    database_url,
                    packages,
                },
        } => {
            let db = Database::connect_url(&database_url).await?;
            let figures = crate::bench::mature_scenarios(&db, packages).await?;
            db.close().await;
            println!("{}", serde_json::to_string(&figures)?);
            Ok(0)
        }
        Command::Bench {
            command:
                BenchCommand::Slurm {
                    database_url,
                    submit,
                    active,
                    json,
                },
        } => {
            let figures = crate::bench::slurm(&crate::bench::SlurmBench {
                admin_url: database_url,
                submit,
                active,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                print!("{}", crate::bench::render_slurm(&figures));
            }
            Ok(0)
        }
        Command::Bench {
            command:
                BenchCommand::Checksum {
                    files,
                    size_mb,
                    dir,
                    json,
                },
        } => {
            let figures = crate::bench::checksum(&crate::bench::ChecksumBench {
                files,
                size_mb,
                dir,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                print!("{}", crate::bench::render_checksum(&figures));
            }
            Ok(0)
        }
        Command::Lineage { command } => views::lineage(&settings, command).await,
        Command::Status {
            json,
            watch,
            limit,
            db,
        } => {
            let db = open_database(&settings, &db).await?;
            let code = match watch {
                None => views::status(&db, json, limit).await,
                Some(seconds) => {
                    let mut stop = stop_on_signals()?;
                    loop {
                        if !json {
                            // Clear the screen and go home, as `watch` does.
                            print!("\x1b[2J\x1b[H");
                        }
                        views::status(&db, json, limit).await?;
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(seconds.max(0.1))) => {}
                            _ = stop.changed() => break Ok(0),
                        }
                    }
                }
            };
            db.close().await;
            code
        }
        Command::Apply { file, dry_run, db } => {
            let shown = file.display().to_string();
            let bytes = match std::fs::read(&file) {
                Ok(bytes) => bytes,
                Err(e) => {
                    eprintln!("error: cannot read {shown}: {e}");
                    return Ok(EXIT_USAGE);
                }
            };
            // Bad content is a problem with the file, like any other invalid definition.
            let text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!(
                        "error: {shown}: file: not UTF-8 text (invalid bytes at offset {})",
                        e.utf8_error().valid_up_to()
                    );
                    return Ok(EXIT_PROBLEM);
                }
            };
            let definitions = match crate::definitions::Definitions::parse(&shown, &text) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(EXIT_PROBLEM);
                }
            };
            let db = open_database(&settings, &db).await?;
            let code = apply(&db, &shown, &definitions, dry_run).await;
            db.close().await;
            code
        }
        Command::Export { output, db } => {
            let db = open_database(&settings, &db).await?;
            let definitions = db.export_definitions().await;
            db.close().await;
            let text = definitions?.to_toml();
            match output {
                None => print!("{text}"),
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
            }
            Ok(0)
        }
        Command::Enable { pipeline, db } => set_enabled(&settings, &db, &pipeline, true).await,
        Command::Disable { pipeline, db } => set_enabled(&settings, &db, &pipeline, false).await,
        Command::Retry { run_id, db } => {
            let db = open_database(&settings, &db).await?;
            let done = db.retry_run(run_id).await;
            let status = db.run_status(run_id).await;
            db.close().await;
            if done? {
                println!(
                    "run {run_id} is PENDING again; the workflow-manager picks it up next cycle"
                );
                Ok(0)
            } else {
                Ok(wrong_state(
                    run_id,
                    status?,
                    "only a FAILED or CANCELLED run can be retried",
                ))
            }
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
            let code = run_all(&settings, &db, launcher).await;
            db.close().await;
            code
        }
        Command::JobWrapper { .. } => unreachable!("handled before the runtime starts"),
        Command::WorkflowManager { once, db, serve } => {
            let settings = serve.apply(settings);
            let db = open_database(&settings, &db).await?;
            let code = manager(ManagerKind::Workflow, &settings, &db, once, launcher).await;
            db.close().await;
            code
        }
        Command::ResultManager { once, db, serve } => {
            let settings = serve.apply(settings);
            let db = open_database(&settings, &db).await?;
            let code = manager(ManagerKind::Result, &settings, &db, once, launcher).await;
            db.close().await;
            code
        }
        Command::Cancel { run_id, reason, db } => {
            let db = open_database(&settings, &db).await?;
            let done = db.cancel_run(run_id, &reason).await;
            let status = db.run_status(run_id).await;
            db.close().await;
            if done? {
                println!("run {run_id} cancelled");
                Ok(0)
            } else {
                Ok(wrong_state(
                    run_id,
                    status?,
                    "only a run that has not finished can be cancelled",
                ))
            }
        }
        Command::TriggerManager { once, db, serve } => {
            let settings = serve.apply(settings);
            let db = open_database(&settings, &db).await?;
            let code = manager(ManagerKind::Trigger, &settings, &db, once, launcher).await;
            db.close().await;
            code
        }
        Command::Trigger {
            pipeline,
            step,
            sub_group,
            force,
            db,
        } => {
            let db = open_database(&settings, &db).await?;
            let Some(pipeline_id) = db.pipeline_id_by_name(&pipeline).await? else {
                eprintln!("error: no pipeline named {pipeline:?}");
                return Ok(EXIT_USAGE);
            };
            let step_id = match &step {
                None => None,
                Some(name) => match db.step_id_by_name(pipeline_id, name).await? {
                    Some(id) => Some(id),
                    None => {
                        eprintln!("error: pipeline {pipeline:?} has no step named {name:?}");
                        return Ok(EXIT_USAGE);
                    }
                },
            };
            let who = std::env::var("USER").unwrap_or_else(|_| "ccat-wfm".into());
            let id = db
                .request_trigger(pipeline_id, step_id, sub_group.as_deref(), force, &who)
                .await?;
            println!(
                "trigger request {id} recorded; the trigger-manager handles it in its next cycle"
            );
            db.close().await;
            Ok(0)
        }
        Command::Config {
            command: ConfigCommand::Show { json },
        } => {
            let value = serde_json::to_value(&settings).context("serialising the settings")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", views::render_flat(&value));
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
            command: DbCommand::ChangeTrackingSql,
        } => {
            print!("{}", crate::db::schema::POSTGRES_CHANGE_TRACKING_SQL);
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
                for function in &report.missing_functions {
                    println!("  missing change-tracking function {function}");
                }
                for trigger in &report.missing_triggers {
                    println!("  missing change-tracking trigger  {trigger}");
                }
                if !report.missing_functions.is_empty() || !report.missing_triggers.is_empty() {
                    println!(
                        "  (without them the trigger-manager never sees new data: \
                         `ccat-wfm db change-tracking-sql` prints what to install)"
                    );
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

async fn gaps(
    settings: &Settings,
    db: &Database,
    pipeline: Option<String>,
    json: bool,
) -> anyhow::Result<u8> {
    if let Some(name) = &pipeline
        && db.pipeline_id_by_name(name).await?.is_none()
    {
        eprintln!("error: no pipeline named {name:?}");
        return Ok(EXIT_USAGE);
    }
    let options = TriggerOptions {
        only_pipeline: pipeline,
        ..TriggerOptions::from_settings(settings, true)
    };
    let mut evaluator = trigger::Evaluator::default();
    let report = if json {
        // Each gap written as it is found: hundreds of thousands of gaps are never held.
        let out = std::io::BufWriter::new(std::io::stdout());
        let mut streamed = views::StreamedGaps::new(out);
        let report = evaluator
            .cycle_streaming(db, &options, Utc::now(), &mut streamed)
            .await?;
        streamed.finish(&report)?;
        report
    } else {
        evaluator.cycle(db, &options, Utc::now()).await?
    };
    if !json {
        let rows: Vec<Vec<String>> = report
            .pipelines
            .iter()
            .flat_map(|p| &p.gaps)
            .map(|g| {
                vec![
                    g.pipeline.clone(),
                    g.step.clone(),
                    g.sub_group_key.clone(),
                    format!("{:?}", g.reason).to_lowercase(),
                    g.inputs.to_string(),
                    g.software_version.clone(),
                    g.cooldown_until
                        .map_or_else(String::new, |t| t.to_rfc3339()),
                ]
            })
            .collect();
        print!(
            "{}",
            views::render_table(
                &[
                    "PIPELINE",
                    "STEP",
                    "SUB-GROUP",
                    "REASON",
                    "INPUTS",
                    "VERSION",
                    "COOLDOWN UNTIL"
                ],
                &rows
            )
        );
        println!("{} gap(s)", rows.len());
    }
    for error in &report.errors {
        eprintln!("error: {error}");
    }
    Ok(if report.errors.is_empty() {
        0
    } else {
        EXIT_PROBLEM
    })
}

/// Says why an action on a run was refused: no such run (a usage error), or the state
/// it is in (a problem).
fn wrong_state(run_id: i64, status: Option<String>, rule: &str) -> u8 {
    match status {
        None => {
            eprintln!("error: there is no run {run_id}");
            EXIT_USAGE
        }
        Some(status) => {
            let already = if matches!(status.as_str(), "CANCELLED" | "COMPLETED" | "FAILED") {
                "already "
            } else {
                ""
            };
            eprintln!("error: run {run_id} is {already}{status}: {rule}");
            EXIT_PROBLEM
        }
    }
}

/// Prints a one-shot cycle's report; exit 1 when it had errors.
fn print_once<T: serde::Serialize>(report: &T, errors: usize) -> anyhow::Result<u8> {
    println!("{}", serde_json::to_string_pretty(report)?);
    Ok(if errors == 0 { 0 } else { EXIT_PROBLEM })
}

/// Runs a manager: one cycle with `--once`, else its loop until SIGTERM or SIGINT.
async fn manager(
    kind: ManagerKind,
    settings: &Settings,
    db: &Database,
    once: bool,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    if once {
        return match kind {
            ManagerKind::Trigger => {
                let options = TriggerOptions::from_settings(settings, false);
                let report = trigger::run_cycle(db, &options, Utc::now()).await?;
                print_once(&report, report.errors.len())
            }
            ManagerKind::Workflow => {
                let manager = crate::workflow::WorkflowManager::new(
                    db.clone(),
                    crate::backend::from_settings(settings, launcher.clone())?,
                    crate::workflow::WorkflowOptions::from_settings(settings),
                )
                .with_publisher(
                    crate::dispatch::publisher_for(settings)
                        .context("the Redis settings for Celery dispatch")?,
                );
                let report = manager.cycle(Utc::now()).await?;
                print_once(&report, report.errors.len())
            }
            ManagerKind::Result => {
                let manager = crate::results::ResultManager::new(
                    db.clone(),
                    crate::backend::from_settings(settings, launcher.clone())?,
                    crate::results::ResultOptions::from_settings(settings),
                )
                .with_publisher(
                    crate::dispatch::publisher_for(settings)
                        .context("the Redis settings for Celery dispatch")?,
                );
                let report = manager.cycle(Utc::now()).await?;
                print_once(&report, report.errors.len())
            }
        };
    }
    let stop = stop_on_signals()?;
    serve_metrics(settings, &stop).await?;
    managers::run(kind, settings, db, launcher, stop).await?;
    Ok(0)
}

/// `ccat-wfm apply`: validate, show the changes, write them in one transaction.
async fn apply(
    db: &Database,
    file: &str,
    definitions: &crate::definitions::Definitions,
    dry_run: bool,
) -> anyhow::Result<u8> {
    let known = db.known_definitions().await?;
    let errors = definitions.validate(file, &known);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        eprintln!("nothing written: {} problem(s)", errors.len());
        return Ok(EXIT_PROBLEM);
    }
    let current = db.export_definitions().await?;
    let changes = crate::definitions::diff(&current, definitions);
    for c in &changes {
        if c.fields.is_empty() {
            println!("{} {}", c.action, c.entry);
        } else {
            println!("{} {} ({})", c.action, c.entry, c.fields.join(", "));
        }
    }
    if changes.is_empty() {
        println!("{file}: nothing to change");
    } else if dry_run {
        println!("dry run: {} change(s), nothing written", changes.len());
    } else {
        db.apply_definitions(definitions).await?;
        println!("{file}: applied {} change(s)", changes.len());
    }
    Ok(0)
}

/// `ccat-wfm enable` / `disable`.
async fn set_enabled(
    settings: &Settings,
    db: &DatabaseArg,
    pipeline: &str,
    enabled: bool,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let done = db.set_pipeline_enabled(pipeline, enabled).await;
    db.close().await;
    if done? {
        let state = if enabled { "enabled" } else { "disabled" };
        println!("pipeline {pipeline:?} {state}");
        Ok(0)
    } else {
        eprintln!("error: no pipeline named {pipeline:?}");
        Ok(EXIT_PROBLEM)
    }
}

/// The three manager loops in one process, stopped together.
async fn run_all(
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    match db.dialect() {
        // The embedded database is ours to create.
        crate::db::Dialect::Sqlite => {
            db.migrate().await?;
        }
        // ops-db owns a PostgreSQL schema: only check it.
        crate::db::Dialect::Postgres => {
            let report = db.check().await?;
            if !report.is_complete() {
                eprintln!(
                    "error: {} lacks tables or columns the managers need; see `ccat-wfm db check`",
                    db.describe()
                );
                return Ok(EXIT_PROBLEM);
            }
        }
    }
    let stop = stop_on_signals()?;
    serve_metrics(settings, &stop).await?;
    managers::run_all(settings, db, launcher, stop).await?;
    Ok(0)
}

/// Starts the `/metrics` and `/healthz` endpoint when `METRICS_ADDRESS` asks for one.
async fn serve_metrics(
    settings: &Settings,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !settings.metrics_address.is_empty() {
        crate::metrics::serve(&settings.metrics_address, stop.clone()).await?;
    }
    Ok(())
}

/// A stop request set by SIGINT or SIGTERM. The handlers are installed before the loop
/// starts, so a signal during a cycle is not lost: the cycle finishes, then the loop ends.
pub(super) fn stop_on_signals() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn health(settings: &Settings, service: Option<String>, json: bool) -> anyhow::Result<u8> {
    let client = health::redis_client(&settings.redis).context("Redis settings")?;
    let keys = HealthKeys::default();
    let redis_at = format!("{}:{}", settings.redis.host, settings.redis.port);
    let service_asked = service.is_some();
    let result = match service {
        Some(name) => health::service(&client, &keys, &name)
            .await
            .map(|s| vec![s]),
        None => health::report(&client, &keys).await,
    };
    let services = match result {
        Ok(services) => services,
        Err(e) => {
            eprintln!("error: cannot read health from Redis at {redis_at}: {e}");
            return Ok(EXIT_PROBLEM);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&services)?);
    } else {
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                let (state, reason) = match &s.health {
                    Health::Healthy => ("healthy", String::new()),
                    Health::Starting => ("starting", "no cycle finished yet".to_owned()),
                    Health::Stopped { at } => {
                        ("stopped", format!("stopped cleanly at {}", at.to_rfc3339()))
                    }
                    Health::Down => (
                        "down",
                        "no heartbeat: the process died or cannot reach Redis".to_owned(),
                    ),
                    Health::Stale { reason } => ("stale", reason.clone()),
                };
                let st = s.status.as_ref();
                vec![
                    s.service.clone(),
                    state.to_owned(),
                    st.map_or_else(String::new, |st| format!("{}:{}", st.host, st.pid)),
                    st.and_then(|st| st.last_cycle_end)
                        .map_or_else(String::new, |t| t.to_rfc3339()),
                    st.and_then(|st| st.last_cycle_seconds)
                        .map_or_else(String::new, |d| format!("{d:.3}")),
                    if reason.is_empty() {
                        st.and_then(|st| st.last_error.clone()).unwrap_or_default()
                    } else {
                        reason
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            views::render_table(
                &[
                    "SERVICE",
                    "STATE",
                    "PROCESS",
                    "LAST CYCLE END",
                    "SECONDS",
                    "NOTE"
                ],
                &rows
            )
        );
        if services.is_empty() {
            println!("no service reports to Redis at {redis_at}");
        }
    }
    // A service asked for by name must be running; in the whole report, a service that
    // stopped cleanly is no alarm.
    let ok = !services.is_empty()
        && services.iter().all(|s| {
            s.health.is_ok() && !(service_asked && matches!(s.health, Health::Stopped { .. }))
        });
    Ok(if ok { 0 } else { EXIT_PROBLEM })
}

async fn open_database(settings: &Settings, arg: &DatabaseArg) -> anyhow::Result<Database> {
    Ok(match &arg.database_url {
        Some(url) => Database::connect_url(url).await?,
        None => Database::connect(&settings.database).await?,
    })
}

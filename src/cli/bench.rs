//! `ccat-wfm bench`: the performance figures beside the goals they are judged against
//! (cargo feature `bench`; `nox -s bench` runs them). The measuring is in [`crate::bench`].

use std::path::PathBuf;

use clap::Subcommand;

use crate::db::Database;

#[derive(Debug, Subcommand)]
pub(super) enum BenchCommand {
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

/// Runs one benchmark and prints its figures.
pub(super) async fn run(command: BenchCommand) -> anyhow::Result<u8> {
    match command {
        BenchCommand::Publish {
            redis_url,
            tasks,
            batch,
            json,
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
        BenchCommand::Trigger {
            database_url,
            packages,
            pipelines_per_module,
            keep,
            json,
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
        BenchCommand::TriggerScenarios {
            database_url,
            packages,
        } => {
            let db = Database::connect_url(&database_url).await?;
            let figures = crate::bench::mature_scenarios(&db, packages).await?;
            db.close().await;
            println!("{}", serde_json::to_string(&figures)?);
            Ok(0)
        }
        BenchCommand::Slurm {
            database_url,
            submit,
            active,
            json,
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
        BenchCommand::Checksum {
            files,
            size_mb,
            dir,
            json,
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
    }
}

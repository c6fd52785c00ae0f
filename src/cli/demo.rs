//! `ccat-wfm demo`: the product at work within a minute on a fresh machine. Under one
//! directory it creates an SQLite database, a small archive of real files, and the
//! software of `examples/demo/`; applies the demo pipeline (per scan calibrate →
//! baseline, per source a map); runs the three managers with a live progress display
//! until every run is COMPLETED; then prints the products and the lineage of a map.
//! Everything it writes is either idempotent or skipped when present, so it can be run
//! again at any time.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{TimeZone, Utc};
use sha2::Digest;
use tokio::sync::watch;

use super::{EXIT_PROBLEM, views};
use crate::config::{DatabaseSettings, DispatchMode, HpcBackend, Settings, StagingMode};
use crate::db::Database;
use crate::db::demo::{DemoArchive, DemoPackage};
use crate::managers;
use crate::trigger::{self, TriggerOptions};
use crate::workflow::command::ContainerRuntime;

/// The pipeline file, with `@SOFTWARE_DIR@` where the software is.
const PIPELINE_FILE: &str = include_str!("../../examples/demo/pipeline.toml");
const STEPS_PY: &str = include_str!("../../examples/demo/steps.py");
const PIPELINE: &str = "demo-maps";
/// Where the demo keeps everything unless told otherwise.
pub(super) const DEFAULT_DIR: &str = "ccat-wfm-demo";
const SOURCES: [&str; 2] = ["NGC253", "Orion-KL"];
const MODULES: [&str; 2] = ["LFA", "HFA"];
const SCANS_PER_SOURCE: i64 = 2;
const CHANNELS: i64 = 64;

/// How the demo ended.
enum Outcome {
    Completed,
    Failed,
    Interrupted,
    TimedOut,
}

/// Runs the demo in `dir`; gives up after `timeout`.
pub(super) async fn run(
    dir: &Path,
    timeout: Duration,
    base: Settings,
    launcher: Option<Vec<String>>,
) -> anyhow::Result<u8> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("the demo directory {}", dir.display()))?;
    let settings = demo_settings(&dir, base);
    println!("demo directory: {}", dir.display());

    let software_dir = dir.join("software");
    write_file(&software_dir.join("steps.py"), STEPS_PY.as_bytes())?;
    let archive = write_archive(&dir)?;

    let db = Database::connect(&settings.database).await?;
    let result = async {
        db.migrate().await?;
        if db.seed_demo_archive(&archive).await? {
            println!(
                "seeded an archive of {} raw data packages ({} sources × {} scans × {} modules)",
                archive.packages.len(),
                SOURCES.len(),
                SCANS_PER_SOURCE,
                MODULES.len()
            );
        } else {
            println!("archive already seeded");
        }
        if !apply_pipeline(&db, &software_dir).await? {
            return Ok(EXIT_PROBLEM);
        }
        let outcome = run_managers(&settings, &db, launcher, timeout).await?;
        Ok::<u8, anyhow::Error>(match outcome {
            Outcome::Completed => {
                print_results(&db).await?;
                println!(
                    "\nmore: ccat-wfm status --database-url sqlite://{}",
                    dir.join("demo.sqlite").display()
                );
                0
            }
            Outcome::Failed => {
                eprintln!("the demo failed; the failures and their reasons:");
                views::status(&db, false, 20).await?;
                EXIT_PROBLEM
            }
            Outcome::Interrupted => {
                eprintln!("interrupted; run `ccat-wfm demo` again to go on");
                EXIT_PROBLEM
            }
            Outcome::TimedOut => {
                eprintln!("the demo did not finish within {} s", timeout.as_secs());
                views::status(&db, false, 20).await?;
                EXIT_PROBLEM
            }
        })
    }
    .await;
    db.close().await;
    result
}

/// The embedded setup in `dir`, whatever the configuration says: SQLite, the local
/// backend without a container runtime, inline dispatch, no Redis, quick cycles.
fn demo_settings(dir: &Path, mut settings: Settings) -> Settings {
    settings.database = DatabaseSettings::Sqlite {
        path: dir.join("demo.sqlite"),
    };
    settings.hpc_backend = HpcBackend::Local;
    settings.pipeline_base_dir = dir.join("pipelines");
    settings.processing_location_id = 1;
    settings.workflow.container_runtime = ContainerRuntime::None;
    settings.workflow.staging_mode = StagingMode::Local;
    settings.workflow.dispatch_mode = DispatchMode::Inline;
    settings.workflow.retry_backoff_seconds = 1.0;
    settings.redis.host = String::new();
    settings.poll_intervals.trigger_manager = 0.5;
    settings.poll_intervals.workflow_manager = 0.5;
    settings.poll_intervals.result_manager = 0.5;
    settings.metrics_address = String::new();
    settings
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes the archive's files (spectra of a CO line, one per scan and module) and
/// describes them for the database.
fn write_archive(dir: &Path) -> anyhow::Result<DemoArchive> {
    let archive_dir = dir.join("archive");
    let mut scans = Vec::new();
    let mut packages = Vec::new();
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 22, 0, 0).unwrap();
    for s in 0..SOURCES.len() as i64 {
        for k in 0..SCANS_PER_SOURCE {
            let scan = s * SCANS_PER_SOURCE + k + 1;
            scans.push((scan, s + 1, start + chrono::Duration::minutes(30 * scan)));
            for (m, module) in MODULES.iter().enumerate() {
                let id = (scan - 1) * MODULES.len() as i64 + m as i64 + 1;
                let name = format!("chai_{}_scan{scan}", module.to_lowercase());
                let text = spectrum(id, 2.0 + 3.0 * s as f64 + m as f64, 0.2 * k as f64);
                let path = archive_dir.join(format!("{name}.spec"));
                write_file(&path, text.as_bytes())?;
                packages.push(DemoPackage {
                    id,
                    name,
                    scan_id: scan,
                    module_id: m as i64 + 1,
                    full_path: path.display().to_string(),
                    size_bytes: text.len() as i64,
                    checksum: hex::encode(sha2::Sha256::digest(text)),
                });
            }
        }
    }
    Ok(DemoArchive {
        processing_base: dir.join("pipelines").display().to_string(),
        archive_base: archive_dir.display().to_string(),
        sources: SOURCES.iter().map(|s| (*s).to_owned()).collect(),
        scans,
        packages,
    })
}

/// A Gaussian line of `peak` in the middle of the band on a sloping baseline, with a
/// little noise that is the same on every run of the demo.
fn spectrum(seed: i64, peak: f64, offset: f64) -> String {
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f64 / 1000.0 - 0.5
    };
    (0..CHANNELS)
        .map(|c| {
            let x = (c - CHANNELS / 2) as f64 / 4.0;
            let value = peak * (-0.5 * x * x).exp() + 0.5 + offset + 0.002 * c as f64;
            format!("{c} {:.4}\n", value + 0.05 * noise())
        })
        .collect()
}

/// Applies the demo pipeline file (no change when it is applied already).
async fn apply_pipeline(db: &Database, software_dir: &Path) -> anyhow::Result<bool> {
    let file = "examples/demo/pipeline.toml";
    let text = PIPELINE_FILE.replace("@SOFTWARE_DIR@", &software_dir.display().to_string());
    let definitions = crate::definitions::Definitions::parse(file, &text)?;
    let errors = definitions.validate(file, &db.known_definitions().await?);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        return Ok(false);
    }
    let changes = crate::definitions::diff(&db.export_definitions().await?, &definitions);
    if changes.is_empty() {
        println!("pipeline {PIPELINE:?} is applied already");
    } else {
        db.apply_definitions(&definitions).await?;
        println!(
            "applied {file}: {} software version(s), grouping and pipeline {PIPELINE:?}",
            definitions
                .software
                .iter()
                .map(|s| s.versions.len())
                .sum::<usize>()
        );
    }
    Ok(true)
}

/// Runs the three managers until the pipeline is done, fails, times out or is
/// interrupted, with the progress on stdout.
async fn run_managers(
    settings: &Settings,
    db: &Database,
    launcher: Option<Vec<String>>,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let (stop, stopped) = watch::channel(false);
    let mut interrupted = super::service::stop_on_signals()?;
    let managers = managers::run_all(settings, db, launcher, stopped);
    let watcher = async {
        let started = Instant::now();
        let mut display = Progress::new();
        let outcome = loop {
            let counts = db.step_status_counts(PIPELINE).await?;
            display.show(&counts, started.elapsed())?;
            if let Some(outcome) = finished(db, settings, &counts).await? {
                break outcome;
            }
            if started.elapsed() > timeout {
                break Outcome::TimedOut;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = interrupted.changed() => break Outcome::Interrupted,
            }
        };
        let _ = stop.send(true);
        Ok::<Outcome, anyhow::Error>(outcome)
    };
    let (managers, outcome) = tokio::join!(managers, watcher);
    managers?;
    outcome
}

/// Done when no run is left to move and the trigger-manager would create none: every
/// run COMPLETED, or one FAILED for good.
async fn finished(
    db: &Database,
    settings: &Settings,
    counts: &[crate::db::runs::StepCount],
) -> anyhow::Result<Option<Outcome>> {
    let runs = |state: &str| {
        counts
            .iter()
            .filter(|c| c.status.as_deref() == Some(state))
            .map(|c| c.runs)
            .sum::<i64>()
    };
    let all: i64 = counts.iter().map(|c| c.runs).sum();
    if runs("FAILED") + runs("CANCELLED") > 0 {
        return Ok(Some(Outcome::Failed));
    }
    if all == 0 || runs("COMPLETED") < all {
        return Ok(None);
    }
    let options = TriggerOptions {
        only_pipeline: Some(PIPELINE.into()),
        ..TriggerOptions::from_settings(settings, true)
    };
    let preview = trigger::run_cycle(db, &options, Utc::now()).await?;
    let gaps: usize = preview.pipelines.iter().map(|p| p.gaps_found).sum();
    // The trigger-manager may have created runs between the counts and the preview (the
    // next step's, once the last upstream run completed); the preview then finds no gap
    // though the work is not done. Done only if the counts still hold afterwards.
    let unchanged = db.step_status_counts(PIPELINE).await? == counts;
    Ok((gaps == 0 && unchanged).then_some(Outcome::Completed))
}

/// The live display: a table of runs per step and state, redrawn in place on a
/// terminal, or a line whenever it changes otherwise.
struct Progress {
    terminal: bool,
    drawn_lines: usize,
    last: String,
}

impl Progress {
    fn new() -> Self {
        Progress {
            terminal: std::io::stdout().is_terminal(),
            drawn_lines: 0,
            last: String::new(),
        }
    }

    fn show(
        &mut self,
        counts: &[crate::db::runs::StepCount],
        elapsed: Duration,
    ) -> anyhow::Result<()> {
        let steps = views::counts_by_state(
            counts
                .iter()
                .map(|c| (c.step.as_str(), c.status.as_deref(), c.runs)),
        );
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let rows: Vec<Vec<String>> = steps
                .iter()
                .map(|(name, n)| {
                    std::iter::once(name.clone())
                        .chain(n.iter().map(i64::to_string))
                        .collect()
                })
                .collect();
            let header: Vec<&str> = std::iter::once("STEP")
                .chain(views::STATE_COLUMNS)
                .collect();
            let table = views::render_table(&header, &rows);
            let text = format!(
                "\n{PIPELINE} after {:.0} s:\n{table}",
                elapsed.as_secs_f64()
            );
            if self.drawn_lines > 0 {
                // Up to where the last drawing began, and clear below.
                write!(out, "\x1b[{}A\x1b[J", self.drawn_lines)?;
            }
            write!(out, "{text}")?;
            self.drawn_lines = text.matches('\n').count();
        } else {
            let line = steps
                .iter()
                .map(|(name, n)| {
                    let total: i64 = n.iter().sum();
                    format!("{name} {}/{total} completed", n[5])
                })
                .collect::<Vec<_>>()
                .join(", ");
            if line != self.last {
                writeln!(out, "[{:>4.0} s] {line}", elapsed.as_secs_f64())?;
                self.last = line;
            }
        }
        out.flush()?;
        Ok(())
    }
}

/// The pipeline's products, then the lineage of its first map.
async fn print_results(db: &Database) -> anyhow::Result<()> {
    let products = db.pipeline_products(PIPELINE).await?;
    println!("\ndata products of {PIPELINE} ({}):", products.len());
    let rows: Vec<Vec<String>> = products
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.step.clone(),
                p.sub_group_key.clone(),
                p.product_type.clone(),
                p.relative_path.clone(),
                p.checksum.chars().take(12).collect(),
            ]
        })
        .collect();
    print!(
        "{}",
        views::render_table(
            &["PRODUCT", "STEP", "SUB-GROUP", "TYPE", "PATH", "SHA-256"],
            &rows
        )
    );
    let map = products
        .iter()
        .find(|p| p.step == "map" && p.relative_path.ends_with("map.txt"));
    if let Some(map) = map
        && let Some(lineage) = db.product_lineage(map.id).await?
    {
        println!("\nlineage of the map {}:", map.id);
        views::print_product_lineage(&lineage);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::runs::StepCount;

    /// The watcher read "8 calibrate runs, all COMPLETED"; before it asks for the gaps,
    /// a trigger cycle creates runs. The gap preview then finds none, yet the demo is not
    /// done.
    #[tokio::test]
    async fn runs_created_after_the_counts_were_read_are_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::config::LoadContext::new(Vec::<(String, String)>::new(), dir.path());
        let base = Settings::load_with(&ctx, Some(&[])).unwrap();
        let settings = demo_settings(dir.path(), base);
        let software_dir = dir.path().join("software");
        write_file(&software_dir.join("steps.py"), STEPS_PY.as_bytes()).unwrap();
        let archive = write_archive(dir.path()).unwrap();
        let db = Database::connect(&settings.database).await.unwrap();
        db.migrate().await.unwrap();
        db.seed_demo_archive(&archive).await.unwrap();
        assert!(apply_pipeline(&db, &software_dir).await.unwrap());
        let count = |step: &str, status: Option<&str>, runs| StepCount {
            step: step.into(),
            status: status.map(Into::into),
            runs,
        };
        let read_before = vec![
            count("calibrate", Some("COMPLETED"), 8),
            count("baseline", None, 0),
            count("map", None, 0),
        ];

        let options = TriggerOptions::from_settings(&settings, false);
        let cycle = trigger::run_cycle(&db, &options, Utc::now()).await.unwrap();
        assert!(cycle.created() > 0, "the trigger cycle created no run");

        let outcome = finished(&db, &settings, &read_before).await.unwrap();
        assert!(
            outcome.is_none(),
            "the demo ended with runs it had not seen"
        );
        db.close().await;
    }
}

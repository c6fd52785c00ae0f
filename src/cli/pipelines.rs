//! The commands on pipelines and their definitions: `apply`, `export`, `enable`,
//! `disable`, `trigger` (a request) and `gaps` (what would run).

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;

use super::{DatabaseArg, EXIT_PROBLEM, EXIT_USAGE, open_database, views};
use crate::config::Settings;
use crate::db::Database;
use crate::trigger::{self, TriggerOptions};

/// `ccat-wfm apply FILE`: reads and parses the file, then [`apply`].
pub(super) async fn apply_file(
    settings: &Settings,
    file: &Path,
    dry_run: bool,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let shown = file.display().to_string();
    let bytes = match std::fs::read(file) {
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
    let db = open_database(settings, db).await?;
    let code = apply(&db, &shown, &definitions, dry_run).await;
    db.close().await;
    code
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

/// `ccat-wfm export`: the definitions in the database as a definitions file.
pub(super) async fn export(
    settings: &Settings,
    output: Option<PathBuf>,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let definitions = db.export_definitions().await;
    db.close().await;
    let text = definitions?.to_toml();
    match output {
        None => print!("{text}"),
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
    }
    Ok(0)
}

/// `ccat-wfm enable` / `disable`.
pub(super) async fn set_enabled(
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

/// `ccat-wfm trigger`: records a trigger request for the trigger-manager's next cycle.
pub(super) async fn request_trigger(
    settings: &Settings,
    pipeline: &str,
    step: Option<&str>,
    sub_group: Option<&str>,
    force: bool,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let Some(pipeline_id) = db.pipeline_id_by_name(pipeline).await? else {
        eprintln!("error: no pipeline named {pipeline:?}");
        return Ok(EXIT_USAGE);
    };
    let step_id = match step {
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
        .request_trigger(pipeline_id, step_id, sub_group, force, &who)
        .await?;
    println!("trigger request {id} recorded; the trigger-manager handles it in its next cycle");
    db.close().await;
    Ok(0)
}

/// `ccat-wfm gaps`: a dry-run cycle listing what the trigger-manager would run.
pub(super) async fn gaps(
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

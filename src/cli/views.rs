//! What the operator commands print: tables sized to the terminal, flat key–value
//! listings, and the documents behind `--json`.

use chrono::Utc;
use serde_json::Value;

use super::{EXIT_PROBLEM, LineageCommand, open_database};
use crate::config::Settings;
use crate::db::Database;

/// `ccat-wfm runs show`: every field of one run, then the tail of its log.
pub(super) async fn run_detail(
    settings: &Settings,
    db: &Database,
    id: i64,
    json: bool,
) -> anyhow::Result<u8> {
    let Some(mut run) = db.run_detail(id).await? else {
        eprintln!("error: no run with id {id}");
        return Ok(EXIT_PROBLEM);
    };
    // The tail kept on the run is the last failure's. A run that went on since (retried,
    // running, completed) shows its current attempt's log instead, when there is one.
    let layout = crate::workflow::layout::RunLayout::new(
        &settings.pipeline_base_dir,
        &run.pipeline,
        &run.sub_group_key,
        &run.step,
        run.id,
        run.retry_count + 1,
    );
    let current = crate::backend::read_tail(
        &layout.attempt_dir().join(crate::backend::JOB_LOG),
        crate::results::LOG_TAIL_BYTES,
    );
    if run.log_tail.is_none() || (run.status != "FAILED" && current.is_some()) {
        run.log_tail = current;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&run)?);
        return Ok(0);
    }
    let value = serde_json::to_value(&run)?;
    let mut fields = value.as_object().cloned().unwrap_or_default();
    let log_tail = fields.remove("log_tail");
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &fields {
        let shown = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{key:<width$}  {}", printable(&shown));
    }
    if let Some(Value::String(tail)) = log_tail {
        println!("\nlog tail:\n{}", printable(&tail));
    }
    Ok(0)
}

/// Text from jobs and the database as a terminal may show it: control characters other
/// than newline and tab (escape sequences could rewrite the screen or the title) are
/// shown as `\u{..}`.
pub(super) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Run states in lifecycle order, and the column headers they are shown under.
const STATES: [&str; 8] = [
    "PENDING",
    "STAGING_DATA",
    "SUBMITTED",
    "RUNNING",
    "COLLECTING_RESULTS",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
];
pub(super) const STATE_COLUMNS: [&str; 8] = [
    "PENDING",
    "STAGING",
    "SUBMITTED",
    "RUNNING",
    "COLLECTING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
];

/// Folds `(name, status, runs)` rows, grouped by name as the database orders them, into
/// run counts per name in [`STATES`] order; a name without runs (no status) counts zeros.
pub(super) fn counts_by_state<'a>(
    rows: impl IntoIterator<Item = (&'a str, Option<&'a str>, i64)>,
) -> Vec<(String, [i64; 8])> {
    let mut out: Vec<(String, [i64; 8])> = Vec::new();
    for (name, status, runs) in rows {
        if out.last().is_none_or(|(last, _)| last != name) {
            out.push((name.to_owned(), [0; 8]));
        }
        if let Some(i) = status.and_then(|s| STATES.iter().position(|x| *x == s)) {
            out.last_mut().expect("pushed above").1[i] += runs;
        }
    }
    out
}

/// `ccat-wfm status`: three tables, or one JSON document.
pub(super) async fn status(db: &Database, json: bool, limit: i64) -> anyhow::Result<u8> {
    let counts = db.status_counts().await?;
    let active = db.active_runs(limit).await?;
    let failures = db.recent_failures(limit).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "pipelines": counts,
                "active": active,
                "failures": failures,
            }))?
        );
        return Ok(0);
    }
    let disabled: std::collections::HashSet<&str> = counts
        .iter()
        .filter(|c| !c.enabled)
        .map(|c| c.pipeline.as_str())
        .collect();
    let pipelines = counts_by_state(
        counts
            .iter()
            .map(|c| (c.pipeline.as_str(), c.status.as_deref(), c.runs)),
    );
    let header: Vec<&str> = std::iter::once("PIPELINE").chain(STATE_COLUMNS).collect();
    let rows: Vec<Vec<String>> = pipelines
        .iter()
        .map(|(name, n)| {
            let mut row = vec![if disabled.contains(name.as_str()) {
                format!("{name} (disabled)")
            } else {
                name.clone()
            }];
            row.extend(n.iter().map(i64::to_string));
            row
        })
        .collect();
    print!("{}", render_table(&header, &rows));
    let now = Utc::now();
    let age = |t: chrono::DateTime<Utc>| {
        let s = (now - t).num_seconds().max(0);
        if s < 120 {
            format!("{s}s")
        } else if s < 7200 {
            format!("{}m", s / 60)
        } else {
            format!("{}h", s / 3600)
        }
    };
    println!("\nactive runs ({}):", active.len());
    if !active.is_empty() {
        let rows: Vec<Vec<String>> = active
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.pipeline.clone(),
                    r.step.clone(),
                    r.sub_group_key.clone(),
                    r.status.clone(),
                    age(r.updated_at),
                    format!(
                        "{} {}",
                        r.hpc_backend.as_deref().unwrap_or(""),
                        r.hpc_job_id.as_deref().unwrap_or("")
                    )
                    .trim()
                    .to_owned(),
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &[
                    "RUN",
                    "PIPELINE",
                    "STEP",
                    "SUB-GROUP",
                    "STATUS",
                    "AGE",
                    "JOB"
                ],
                &rows
            )
        );
    }
    println!("\nrecent failures ({}):", failures.len());
    if !failures.is_empty() {
        let rows: Vec<Vec<String>> = failures
            .iter()
            .map(|r| {
                let reason = r.error_message.as_deref().unwrap_or("").replace('\n', " ");
                let reason: String = reason.chars().take(80).collect();
                vec![
                    r.id.to_string(),
                    r.pipeline.clone(),
                    r.step.clone(),
                    r.sub_group_key.clone(),
                    age(r.updated_at),
                    reason,
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &["RUN", "PIPELINE", "STEP", "SUB-GROUP", "AGO", "REASON"],
                &rows
            )
        );
    }
    Ok(0)
}

pub(super) async fn lineage(settings: &Settings, command: LineageCommand) -> anyhow::Result<u8> {
    match command {
        LineageCommand::Product { id, json, db } => {
            let db = open_database(settings, &db).await?;
            let lineage = db.product_lineage(id).await;
            db.close().await;
            let Some(lineage) = lineage? else {
                eprintln!("error: no data product with id {id}");
                return Ok(EXIT_PROBLEM);
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&lineage)?);
                return Ok(0);
            }
            print_product_lineage(&lineage);
            Ok(0)
        }
        LineageCommand::Package { id, json, db } => {
            let db = open_database(settings, &db).await?;
            let products = db.derived_products(id).await;
            db.close().await;
            let products = products?;
            if json {
                println!("{}", serde_json::to_string_pretty(&products)?);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = products
                .iter()
                .map(|p| {
                    vec![
                        p.id.to_string(),
                        p.product_type.clone(),
                        p.relative_path.clone(),
                        p.run_id.to_string(),
                        p.pipeline.clone(),
                        p.step.clone(),
                        p.sub_group_key.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &[
                        "PRODUCT",
                        "TYPE",
                        "PATH",
                        "RUN",
                        "PIPELINE",
                        "STEP",
                        "SUB-GROUP"
                    ],
                    &rows
                )
            );
            if products.is_empty() {
                println!("nothing has been derived from raw data package {id} yet");
            }
            Ok(0)
        }
    }
}

fn join_ids(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Renders rows as columns under a header, two spaces apart. On a terminal the table
/// fits its width (long cells wrap); piped output is never wrapped.
pub(super) fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(header.iter().copied())
        .add_rows(
            rows.iter()
                .map(|row| row.iter().map(|cell| printable(cell).into_owned())),
        );
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    // A terminal that reports no usable width (a pseudo-terminal of `script`): no wrapping.
    if table.width().is_some_and(|w| w < 40) {
        table.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    out
}

/// Renders a JSON value as aligned `dotted.key  value` lines for people.
pub(super) fn render_flat(value: &Value) -> String {
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

/// A product, the runs of its chain with what each read, and the raw data packages.
pub(super) fn print_product_lineage(lineage: &crate::db::lineage::ProductLineage) {
    let p = &lineage.product;
    println!(
        "product {} {} ({}, sha256 {})\n  made by run {} ({} / {} / {})",
        p.id,
        p.relative_path,
        p.product_type,
        p.checksum,
        p.run_id,
        p.pipeline,
        p.step,
        p.sub_group_key
    );
    let rows: Vec<Vec<String>> = lineage
        .runs
        .iter()
        .map(|r| {
            vec![
                r.run.run_id.to_string(),
                r.run.pipeline.clone(),
                r.run.step.clone(),
                r.run.sub_group_key.clone(),
                r.run.status.clone(),
                join_ids(&r.product_inputs),
                join_ids(&r.raw_inputs),
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        render_table(
            &[
                "RUN",
                "PIPELINE",
                "STEP",
                "SUB-GROUP",
                "STATUS",
                "PRODUCTS READ",
                "PACKAGES READ"
            ],
            &rows
        )
    );
    let names: Vec<String> = lineage
        .raw_data_packages
        .iter()
        .map(|p| format!("{} ({})", p.name, p.id))
        .collect();
    println!("\nraw data packages: {}", names.join(", "));
}

/// `ccat-wfm gaps --json`: the cycle's report written while the cycle runs, each gap as
/// it is found, so that memory does not grow with their number. The document is the
/// report's JSON (each pipeline's `gaps` first, then its other fields), a gap a line.
pub(super) struct StreamedGaps<W: std::io::Write> {
    out: W,
    pipelines: usize,
    /// Gaps written in the pipeline being evaluated; None before its first.
    gaps: Option<usize>,
    /// The first write that failed (a closed pipe): later writes are skipped.
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> StreamedGaps<W> {
    pub(super) fn new(out: W) -> Self {
        let mut this = StreamedGaps {
            out,
            pipelines: 0,
            gaps: None,
            error: None,
        };
        this.write(|out| out.write_all(b"{\"pipelines\": ["));
        this
    }

    fn write(&mut self, f: impl FnOnce(&mut W) -> std::io::Result<()>) {
        if self.error.is_none()
            && let Err(e) = f(&mut self.out)
        {
            self.error = Some(e);
        }
    }

    /// `, "key": value` for each field of `value` but `skip` (an object).
    fn fields(out: &mut W, value: impl serde::Serialize, skip: &str) -> std::io::Result<()> {
        if let Value::Object(map) = serde_json::to_value(value)? {
            for (key, value) in map.iter().filter(|(k, _)| *k != skip) {
                write!(out, ", {}: {value}", Value::from(key.as_str()))?;
            }
        }
        Ok(())
    }

    fn open_pipeline(&mut self) {
        if self.gaps.is_none() {
            let comma = if self.pipelines > 0 { "," } else { "" };
            self.write(|out| write!(out, "{comma}\n{{\"gaps\": ["));
            self.gaps = Some(0);
        }
    }

    /// Closes the document with the cycle's other fields; the writer, or the first
    /// write error.
    pub(super) fn finish(mut self, report: &crate::trigger::CycleReport) -> std::io::Result<W> {
        self.write(|out| {
            out.write_all(b"\n]")?;
            Self::fields(out, report, "pipelines")?;
            out.write_all(b"}\n")?;
            out.flush()
        });
        self.error.map_or(Ok(self.out), Err)
    }
}

impl<W: std::io::Write + Send> crate::trigger::GapSink for StreamedGaps<W> {
    fn gap(&mut self, gap: crate::trigger::Gap) {
        self.open_pipeline();
        let comma = if matches!(self.gaps, Some(n) if n > 0) {
            ","
        } else {
            ""
        };
        self.write(|out| {
            writeln!(out, "{comma}")?;
            serde_json::to_writer(&mut *out, &gap)?;
            Ok(())
        });
        self.gaps = self.gaps.map(|n| n + 1);
    }

    fn pipeline_done(&mut self, report: &crate::trigger::PipelineReport) {
        self.open_pipeline();
        self.write(|out| {
            out.write_all(b"\n]")?;
            Self::fields(out, report, "gaps")?;
            out.write_all(b"}")
        });
        self.gaps = None;
        self.pipelines += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_from_jobs_are_shown_not_obeyed() {
        assert_eq!(printable("ok\n\tline"), "ok\n\tline");
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b"),
            "a\\u{1b}]0;pwned\\u{7}b"
        );
    }

    use crate::trigger::{CycleReport, Gap, GapReason, GapSink, PipelineReport};

    fn gap(pipeline: &str, key: &str) -> Gap {
        Gap {
            pipeline: pipeline.into(),
            step: "calibrate".into(),
            sub_group_key: key.into(),
            fingerprint: "f".repeat(64),
            software_version: "1.0.0".into(),
            inputs: 3,
            reason: GapReason::New,
            cooldown_until: None,
            run_id: None,
        }
    }

    #[test]
    fn the_streamed_gaps_document_is_the_reports_json() {
        let pipelines = [
            ("a", vec!["night=1", "night=\"2\""]),
            ("b", vec![]),
            ("c", vec!["x"]),
        ];
        let mut whole = CycleReport {
            errors: vec!["pipeline d: broken".into()],
            changed_packages: 4,
            ..Default::default()
        };
        let mut streamed = StreamedGaps::new(Vec::new());
        for (name, keys) in &pipelines {
            let mut report = PipelineReport {
                pipeline: (*name).into(),
                evaluated: true,
                gaps_found: keys.len(),
                ..Default::default()
            };
            for key in keys {
                streamed.gap(gap(name, key));
            }
            streamed.pipeline_done(&report);
            report.gaps = keys.iter().map(|k| gap(name, k)).collect();
            whole.pipelines.push(report);
        }
        let summary = CycleReport {
            pipelines: Vec::new(),
            ..whole.clone()
        };
        let written = streamed.finish(&summary).unwrap();
        let text = String::from_utf8(written).unwrap();
        // A gap a line, and the same document as the report kept whole.
        assert_eq!(
            text.lines().filter(|l| l.contains("fingerprint")).count(),
            3,
            "{text}"
        );
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, serde_json::to_value(&whole).unwrap(), "{text}");
    }
}

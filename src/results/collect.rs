//! Output collection (SPEC §7): the files a successful job left, found by convention,
//! checksummed in parallel, and registered as data products with their physical copies
//! in one transaction with the run's COMPLETED.
//!
//! - The final step's `output/{science,qa,plots,statistics,logs}/` → SCIENCE, QA_METRIC,
//!   PLOT, STATISTICS, LOG; an intermediate step's `workspace/{step}/` → INTERMEDIATE.
//! - `<file>.metrics.json` beside a product holds its quality metrics (docs/manifest.md);
//!   it is read, not registered. A corrupt one loses only the metrics.
//! - Symbolic links are never followed: a link (which could point anywhere) is refused
//!   and reported, and the walk cannot leave the run directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::workflow::layout::{OUTPUT_KINDS, RunLayout};

/// Suffix of a product's quality-metrics file.
pub const METRICS_SUFFIX: &str = ".metrics.json";

/// One output file found, before checksumming.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub path: PathBuf,
    /// Relative to the run's directory, e.g. `output/science/map.fits`.
    pub relative_path: String,
    pub product_type: &'static str,
}

/// A file ready to register.
#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub name: String,
    pub relative_path: String,
    pub full_path: String,
    pub product_type: &'static str,
    pub size_bytes: i64,
    pub checksum: String,
    pub quality_metrics: Option<Value>,
}

/// What a collection found.
#[derive(Debug, Default)]
pub struct Collected {
    pub products: Vec<Product>,
    /// Paths refused or unreadable, each with the reason; the rest is still registered.
    pub problems: Vec<String>,
}

fn product_type(kind: &str) -> &'static str {
    match kind {
        "science" => "SCIENCE",
        "qa" => "QA_METRIC",
        "plots" => "PLOT",
        "statistics" => "STATISTICS",
        _ => "LOG",
    }
}

/// The files of a run by the conventions above, without following links.
pub fn discover(layout: &RunLayout, final_step: bool) -> (Vec<Found>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let roots: Vec<(PathBuf, &'static str)> = if final_step {
        OUTPUT_KINDS
            .iter()
            .map(|k| (layout.output().join(k), product_type(k)))
            .collect()
    } else {
        vec![(layout.step_workspace(), "INTERMEDIATE")]
    };
    let mut missing = Vec::new();
    for (root, kind) in &roots {
        let shown = root.strip_prefix(&layout.root).unwrap_or(root).display();
        // Every directory from PIPELINE_BASE_DIR down to the root is checked like what
        // is below it: a job may have replaced any of them with a link to anywhere.
        match crate::workflow::outputs::first_link(layout.base(), root) {
            Ok(Some(link)) => {
                let link = link.strip_prefix(layout.base()).unwrap_or(&link).display();
                problems.push(format!("{shown}: refused: {link} is a symbolic link"));
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                problems.push(format!("{shown}: cannot be checked: {e}"));
                continue;
            }
        }
        match root.symlink_metadata() {
            Ok(meta) if meta.is_dir() => walk(&layout.root, root, kind, &mut found, &mut problems),
            Ok(_) => problems.push(format!("{shown}: refused: not a directory (a link?)")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(shown.to_string()),
            Err(e) => problems.push(format!("{shown}: cannot be read: {e}")),
        }
    }
    if missing.len() == roots.len() {
        problems.push(format!(
            "nothing collected: {} missing after the job",
            missing.join(", ")
        ));
    }
    found.sort_by(|a, b| a.relative_path.cmp(&b.relative_path));
    (found, problems)
}

fn walk(
    run_root: &Path,
    dir: &Path,
    kind: &'static str,
    found: &mut Vec<Found>,
    problems: &mut Vec<String>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            problems.push(format!("{}: cannot be read: {e}", dir.display()));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("{}: cannot be read: {e}", dir.display()));
                continue;
            }
        };
        let path = entry.path();
        let relative = path.strip_prefix(run_root).unwrap_or(&path);
        // Names are recorded as text: one that is not UTF-8 could not be found again.
        let Some(relative) = relative.to_str().map(str::to_owned) else {
            problems.push(format!(
                "{}: refused: the name is not UTF-8",
                relative.display()
            ));
            continue;
        };
        // A newline or an escape sequence in a registered name would break every listing
        // and log line that shows it.
        if let Some(c) = relative.chars().find(|c| c.is_control()) {
            problems.push(format!(
                "{}: refused: the name contains the control character U+{:04X}",
                relative.escape_debug(),
                c as u32
            ));
            continue;
        }
        // symlink_metadata: the link itself, never what it points to.
        match entry.path().symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => problems.push(format!(
                "{relative}: refused: a symbolic link (to {})",
                std::fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into())
            )),
            Ok(meta) if meta.is_dir() => walk(run_root, &path, kind, found, problems),
            Ok(meta) if meta.is_file() => {
                if !relative.ends_with(METRICS_SUFFIX) {
                    found.push(Found {
                        path,
                        relative_path: relative,
                        product_type: kind,
                    });
                }
            }
            Ok(_) => problems.push(format!("{relative}: refused: not a regular file")),
            Err(e) => problems.push(format!("{relative}: cannot be read: {e}")),
        }
    }
}

/// SHA-256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// The quality metrics beside `path`, if any: Ok(None) without a file, Err when the file
/// is there but not a JSON object.
const MAX_METRICS_BYTES: u64 = 1 << 20;

fn read_metrics(path: &Path) -> Result<Option<Value>, String> {
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push(METRICS_SUFFIX);
    let sidecar = PathBuf::from(sidecar);
    match sidecar.symlink_metadata() {
        Err(_) => return Ok(None),
        Ok(meta) if !meta.is_file() => return Err("not a regular file".into()),
        // Metrics are a handful of numbers; a huge (or sparse) file is not read whole.
        Ok(meta) if meta.len() > MAX_METRICS_BYTES => {
            return Err(format!("larger than {MAX_METRICS_BYTES} bytes"));
        }
        Ok(_) => {}
    }
    let text = std::fs::read(&sidecar).map_err(|e| e.to_string())?;
    parse_metrics(&text).map(Some)
}

/// A quality-metrics sidecar's content: a JSON object that PostgreSQL's JSONB can hold
/// (fuzzed: `fuzz/`).
pub fn parse_metrics(text: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(text) {
        // PostgreSQL's JSONB refuses the NUL character: one such file must not cost the
        // run its products.
        Ok(Value::Object(_)) if has_escaped_nul(text) => Err("contains a NUL character".into()),
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a JSON text holds a NUL character (only escaped: raw control characters are
/// not valid JSON).
fn has_escaped_nul(text: &[u8]) -> bool {
    text.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

/// Checksums the found files, `parallelism` at a time on blocking threads.
pub async fn checksum_all(found: Vec<Found>, parallelism: usize) -> Collected {
    let permits = Arc::new(tokio::sync::Semaphore::new(parallelism.max(1)));
    let mut tasks = Vec::with_capacity(found.len());
    for item in found {
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("never closed");
            tokio::task::spawn_blocking(move || {
                let digest = sha256_file(&item.path);
                let metrics = read_metrics(&item.path);
                (item, digest, metrics)
            })
            .await
        }));
    }
    let mut collected = Collected::default();
    for task in tasks {
        let Ok(Ok((item, digest, metrics))) = task.await else {
            collected
                .problems
                .push("a checksum task failed unexpectedly".into());
            continue;
        };
        let (checksum, size) = match digest {
            Ok(d) => d,
            Err(e) => {
                collected
                    .problems
                    .push(format!("{}: cannot be read: {e}", item.relative_path));
                continue;
            }
        };
        let quality_metrics = match metrics {
            Ok(m) => m,
            Err(e) => {
                collected.problems.push(format!(
                    "{}{METRICS_SUFFIX}: metrics ignored: {e}",
                    item.relative_path
                ));
                None
            }
        };
        collected.products.push(Product {
            name: item
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            relative_path: item.relative_path,
            full_path: item.path.display().to_string(),
            product_type: item.product_type,
            size_bytes: size as i64,
            checksum,
            quality_metrics,
        });
    }
    collected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outputs_are_found_by_convention_and_links_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "map", 1, 1);
        for d in layout.directories(true) {
            std::fs::create_dir_all(d).unwrap();
        }
        let out = layout.output();
        std::fs::write(out.join("science/map.fits"), b"abc").unwrap();
        std::fs::write(
            out.join("science/map.fits.metrics.json"),
            br#"{"rms": 1.5}"#,
        )
        .unwrap();
        std::fs::create_dir_all(out.join("plots/deep")).unwrap();
        std::fs::write(out.join("plots/deep/p.png"), b"png").unwrap();
        std::fs::write(out.join("qa/q.txt"), b"q").unwrap();
        std::fs::write(out.join("qa/q.txt.metrics.json"), b"{not json").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", out.join("science/escape")).unwrap();
        let (found, problems) = discover(&layout, true);
        let paths: Vec<&str> = found.iter().map(|f| f.relative_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "output/plots/deep/p.png",
                "output/qa/q.txt",
                "output/science/map.fits"
            ]
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("output/science/escape: refused"),
            "{problems:?}"
        );
        let collected = checksum_all(found, 2).await;
        let map = collected
            .products
            .iter()
            .find(|p| p.name == "map.fits")
            .unwrap();
        assert_eq!(
            map.checksum,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(map.size_bytes, 3);
        assert_eq!(map.product_type, "SCIENCE");
        assert_eq!(map.quality_metrics, Some(serde_json::json!({"rms": 1.5})));
        let q = collected
            .products
            .iter()
            .find(|p| p.name == "q.txt")
            .unwrap();
        assert_eq!(q.quality_metrics, None);
        assert!(
            collected.problems[0].contains("metrics ignored"),
            "{:?}",
            collected.problems
        );
    }

    // Hostile corpus: what a job can leave in its output directory.

    #[test]
    fn a_linked_output_root_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        std::fs::create_dir_all(layout.workspace()).unwrap();
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("elsewhere/secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), layout.step_workspace()).unwrap();
        let (found, problems) = discover(&layout, false);
        assert!(found.is_empty(), "{found:?}");
        assert!(
            problems[0].contains("workspace/cal: refused"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_link_above_the_output_root_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        for kind in OUTPUT_KINDS {
            std::fs::create_dir_all(elsewhere.join(kind)).unwrap();
        }
        std::fs::write(elsewhere.join("science/secret.fits"), b"s").unwrap();
        // workspace/ (another step's and this one's) and output/ replaced by links.
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        std::fs::create_dir_all(&layout.root).unwrap();
        std::os::unix::fs::symlink(&elsewhere, layout.workspace()).unwrap();
        std::fs::create_dir_all(elsewhere.join("cal")).unwrap();
        std::fs::write(elsewhere.join("cal/secret.dat"), b"s").unwrap();
        let (found, problems) = discover(&layout, false);
        assert!(found.is_empty(), "{found:?}");
        assert!(
            problems[0].contains("refused: p/all/workspace is a symbolic link"),
            "{problems:?}"
        );
        std::os::unix::fs::symlink(&elsewhere, layout.output()).unwrap();
        let (found, problems) = discover(&layout, true);
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(problems.len(), OUTPUT_KINDS.len(), "{problems:?}");
        // And the sub-group's own directory.
        let moved = dir.path().join("moved");
        std::fs::rename(&layout.root, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &layout.root).unwrap();
        let (found, problems) = discover(&layout, true);
        assert!(found.is_empty(), "{found:?}");
        assert!(
            problems[0].contains("p/all is a symbolic link"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_vanished_output_directory_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        let (found, problems) = discover(&layout, false);
        assert!(found.is_empty());
        assert_eq!(
            problems,
            ["nothing collected: workspace/cal missing after the job"]
        );
    }

    #[test]
    fn names_that_are_not_utf8_lose_only_themselves() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        std::fs::create_dir_all(layout.step_workspace()).unwrap();
        for name in [&b"a\xff.dat"[..], b"a\xfe.dat"] {
            let path = layout
                .step_workspace()
                .join(std::ffi::OsStr::from_bytes(name));
            std::fs::write(path, b"x").unwrap();
        }
        std::fs::write(layout.step_workspace().join("good.dat"), b"g").unwrap();
        let (found, problems) = discover(&layout, false);
        let paths: Vec<&str> = found.iter().map(|f| f.relative_path.as_str()).collect();
        assert_eq!(paths, ["workspace/cal/good.dat"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| p.contains("not UTF-8")),
            "{problems:?}"
        );
    }

    #[test]
    fn names_with_control_characters_lose_only_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        std::fs::create_dir_all(layout.step_workspace()).unwrap();
        for name in ["map\n.fits", "esc\x1b[31m.fits", "good.fits"] {
            std::fs::write(layout.step_workspace().join(name), b"x").unwrap();
        }
        let (found, problems) = discover(&layout, false);
        let paths: Vec<&str> = found.iter().map(|f| f.relative_path.as_str()).collect();
        assert_eq!(paths, ["workspace/cal/good.fits"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.contains("control character") && !p.contains('\n')),
            "{problems:?}"
        );
    }

    #[tokio::test]
    async fn huge_sparse_outputs_are_checksummed_and_huge_metrics_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path(), "p", "all", "cal", 1, 1);
        std::fs::create_dir_all(layout.step_workspace()).unwrap();
        let cube = layout.step_workspace().join("cube.fits");
        std::fs::File::create(&cube)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let sidecar = layout.step_workspace().join("cube.fits.metrics.json");
        std::fs::File::create(&sidecar)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let (found, problems) = discover(&layout, false);
        assert!(problems.is_empty(), "{problems:?}");
        let collected = checksum_all(found, 2).await;
        let product = &collected.products[0];
        assert_eq!(product.size_bytes, 256 << 20);
        // SHA-256 of 256 MiB of zeros.
        assert_eq!(
            product.checksum,
            "a6d72ac7690f53be6ae46ba88506bd97302a093f7108472bd9efc3cefda06484"
        );
        assert_eq!(product.quality_metrics, None);
        assert!(
            collected.problems[0].contains("metrics ignored: larger than"),
            "{:?}",
            collected.problems
        );
    }

    #[test]
    fn metrics_with_a_nul_character_are_refused() {
        assert!(
            parse_metrics(br#"{"a": "x\u0000y"}"#)
                .unwrap_err()
                .contains("NUL")
        );
        assert!(parse_metrics(br#"{"a": 1}"#).is_ok());
        assert!(
            parse_metrics(b"[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
    }
}

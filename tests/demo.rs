//! `ccat-wfm demo`, the README's first command, from an empty directory: it runs the
//! demo pipeline to completion and shows the products and a map's lineage; run again,
//! it changes nothing and shows the same.

use std::process::{Command, Output};

fn demo(dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(["demo", "--dir"]).arg(dir).env_remove("RUST_LOG");
    // The demo ignores the configuration; prove it with a hostile one.
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("CCAT_OPS_DB_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "slurm")
        .env("CCAT_WORKFLOW_MANAGER_DISPATCH_MODE", "celery")
        .env("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", "/nonexistent")
        .current_dir(dir.parent().unwrap());
    cmd.output().expect("run ccat-wfm demo")
}

#[test]
fn the_demo_runs_to_completion_and_can_be_run_again() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    let out = demo(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{stderr}");
    assert!(
        text.contains("seeded an archive of 8 raw data packages"),
        "{text}"
    );
    // 8 calibrated and 8 baselined spectra, 4 maps with their QA summaries.
    assert!(text.contains("data products of demo-maps (24)"), "{text}");
    assert!(text.contains("map 4/4 completed"), "{text}");
    assert!(text.contains("lineage of the map"), "{text}");
    assert!(text.contains("raw data packages: chai_"), "{text}");
    for step in ["calibrate", "baseline", "map"] {
        assert!(
            text.contains(&format!("demo-maps  {step}")),
            "{step}: {text}"
        );
    }
    // The products are real files whose content the steps computed.
    let maps: Vec<_> = walk(&dir.join("pipelines"))
        .into_iter()
        .filter(|p| p.ends_with("output/science/map.txt"))
        .collect();
    assert_eq!(maps.len(), 4, "{maps:?}");
    let metrics = std::fs::read_to_string(maps[0].with_file_name("map.txt.metrics.json")).unwrap();
    let metrics: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert_eq!(metrics["spectra"], 2);
    assert!(
        metrics["peak_channel"]
            .as_i64()
            .is_some_and(|c| (28..=36).contains(&c))
    );

    let again = demo(&dir);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{text}");
    assert!(text.contains("archive already seeded"), "{text}");
    assert!(text.contains("is applied already"), "{text}");
    assert!(text.contains("data products of demo-maps (24)"), "{text}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

//! Where a run lives on the host (SPEC §6) and the manifest that tells the software
//! what to do. Pure: paths and documents are computed here, created by [`super::prepare`].
//!
//! ```text
//! {PIPELINE_BASE_DIR}/{pipeline}/{sub_group_key}/
//!     input/{step}/                 links to the run's inputs (read-only in the container)
//!     workspace/{step}/             intermediates, shared by the pipeline's steps
//!     output/{science,qa,plots,statistics,logs}/   the final step's products
//!     config/{step}/run-{id}/attempt-{n}/   manifest.json, and the backend's job.log,
//!                                   exit.json, job.sbatch (read-only to the job)
//!     logs/                         the software's own logs (/workflow/logs)
//!     superseded/run-{id}/...       products of earlier runs of the sub-group, set aside
//! ```
//!
//! Runs of one step and sub-group share its output directory, one after the other (never
//! two at once); everything per attempt is also per run, so no record of an earlier
//! run's attempt can be taken for a later one's.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// Version of the manifest schema; bumped on any incompatible change (docs/manifest.md).
pub const MANIFEST_VERSION: u32 = 1;

/// Sub-directories of the final step's output, one per product type.
pub const OUTPUT_KINDS: [&str; 5] = ["science", "qa", "plots", "statistics", "logs"];

/// Paths inside the container.
pub mod container {
    pub const INPUT: &str = "/workflow/input";
    pub const WORKSPACE: &str = "/workflow/workspace";
    pub const OUTPUT: &str = "/workflow/output";
    pub const CONFIG: &str = "/workflow/config";
    pub const LOGS: &str = "/workflow/logs";
}

/// A path component made from a name read from the database: every byte outside
/// `[A-Za-z0-9._-]` becomes `~XX`, so no name can add a directory level or leave the tree.
pub fn path_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'=' | b'+')
            || (b == b'.' && !out.is_empty())
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    if out.is_empty() {
        return "~".into();
    }
    if out.len() <= MAX_COMPONENT_LEN {
        return out;
    }
    // File systems take 255 bytes a name: a longer one is cut, and a hash of the whole
    // name keeps it apart from every other.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut cut = MAX_COMPONENT_LEN - hash.len() - 2;
    // Not inside an escape (`~XX`).
    while out[..cut].ends_with('~') || out[..cut - 1].ends_with('~') {
        cut -= 1;
    }
    format!("{}~~{hash}", &out[..cut])
}

/// The longest path component made from a name (file systems allow 255 bytes).
const MAX_COMPONENT_LEN: usize = 200;

/// The host directories of one attempt of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLayout {
    pub root: PathBuf,
    pub step: String,
    pub run_id: i64,
    pub attempt: i32,
}

impl RunLayout {
    pub fn new(
        base: &Path,
        pipeline: &str,
        sub_group_key: &str,
        step: &str,
        run_id: i64,
        attempt: i32,
    ) -> Self {
        RunLayout {
            root: base
                .join(path_component(pipeline))
                .join(path_component(sub_group_key)),
            step: path_component(step),
            run_id,
            attempt,
        }
    }
    /// `PIPELINE_BASE_DIR`, two levels above the sub-group's directory.
    pub fn base(&self) -> &Path {
        self.root
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.root)
    }
    pub fn input(&self) -> PathBuf {
        self.root.join("input").join(&self.step)
    }
    pub fn workspace(&self) -> PathBuf {
        self.root.join("workspace")
    }
    pub fn step_workspace(&self) -> PathBuf {
        self.workspace().join(&self.step)
    }
    pub fn output(&self) -> PathBuf {
        self.root.join("output")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn config(&self) -> PathBuf {
        self.root
            .join("config")
            .join(&self.step)
            .join(format!("run-{}", self.run_id))
            .join(format!("attempt-{}", self.attempt))
    }
    pub fn manifest(&self) -> PathBuf {
        self.config().join("manifest.json")
    }
    /// The backend's per-attempt directory (job log, exit record, batch script): the
    /// attempt's config directory, which the job sees read-only (`/workflow/config`), so
    /// it can neither forge its exit record nor plant a link where the manager writes.
    pub fn attempt_dir(&self) -> PathBuf {
        self.config()
    }
    /// Where this step writes its products: `output/` for the final step, else its
    /// workspace directory.
    pub fn step_output(&self, final_step: bool) -> PathBuf {
        if final_step {
            self.output()
        } else {
            self.step_workspace()
        }
    }
    /// Where a registered product of an earlier run `run_id` of this sub-group goes when a
    /// later run needs the output directory (`relative_path` as registered).
    pub fn superseded(&self, run_id: i64, relative_path: &str) -> PathBuf {
        self.root
            .join("superseded")
            .join(format!("run-{run_id}"))
            .join(relative_path)
    }
    /// Every directory to create before the job starts.
    pub fn directories(&self, final_step: bool) -> Vec<PathBuf> {
        let mut dirs = vec![
            self.input(),
            self.step_workspace(),
            self.config(),
            self.logs(),
        ];
        if final_step {
            dirs.extend(OUTPUT_KINDS.iter().map(|k| self.output().join(k)));
        }
        dirs
    }
}

/// The manifest: everything the software needs to know about its run
/// (`/workflow/config/manifest.json`, schema in `docs/manifest.md`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub run_id: i64,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub pipeline: Named,
    pub step: ManifestStep,
    pub sub_group: ManifestSubGroup,
    pub software: ManifestSoftware,
    /// The step configuration (`ReductionStepConfig.parameters`) the run was created with.
    pub configuration: Value,
    pub inputs: Vec<ManifestInput>,
    pub upstream_products: Vec<ManifestProduct>,
    /// Upstream sub-groups left out because they failed for good.
    pub excluded_upstream: Value,
    /// Directories as the software sees them (container paths, or host paths when the
    /// container runtime is `none`).
    pub directories: ManifestDirectories,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Named {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestStep {
    pub id: i64,
    pub name: String,
    /// The final step writes to `output/`, others to their workspace directory.
    pub is_final: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestSubGroup {
    pub key: String,
    pub values: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestSoftware {
    pub name: String,
    pub version: String,
    pub image_ref: String,
    pub image_digest: Option<String>,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestInput {
    pub raw_data_package_id: i64,
    pub name: String,
    pub path: String,
    pub size_bytes: i64,
    pub checksum: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestProduct {
    pub data_product_id: i64,
    pub run_id: i64,
    pub name: String,
    pub product_type: String,
    pub path: String,
    pub size_bytes: i64,
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestDirectories {
    pub input: String,
    pub workspace: String,
    /// Where this step writes its products (`WORKFLOW_OUTPUT_DIR`).
    pub output: String,
    pub logs: String,
    pub config: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_database_stay_one_path_component() {
        assert_eq!(path_component("calibrate"), "calibrate");
        assert_eq!(path_component("a/b"), "a~2Fb");
        assert_eq!(path_component(".."), "~2E.");
        assert_eq!(path_component(""), "~");
        assert_eq!(path_component("x y\n$(z)"), "x~20y~0A~24~28z~29");
        assert_eq!(path_component("v1.2"), "v1.2");
        assert_eq!(path_component("s=a~20b"), "s=a~7E20b");
        // Long names are cut with a hash that keeps them apart.
        let long = path_component(&"/".repeat(100));
        assert!(long.len() <= 200 && long.contains("~~"), "{long}");
        assert_ne!(long, path_component(&"/".repeat(101)));
        assert!(!long[..long.find("~~").unwrap()].ends_with("~2"));
    }

    #[test]
    fn layout_follows_the_spec() {
        let l = RunLayout::new(
            Path::new("/data/p"),
            "chai maps",
            "source=NGC253",
            "map",
            7,
            2,
        );
        assert_eq!(l.root, Path::new("/data/p/chai~20maps/source=NGC253"));
        assert_eq!(l.step_workspace(), l.root.join("workspace/map"));
        assert_eq!(
            l.manifest(),
            l.root.join("config/map/run-7/attempt-2/manifest.json")
        );
        assert_eq!(l.attempt_dir(), l.root.join("config/map/run-7/attempt-2"));
        assert_eq!(
            l.superseded(5, "output/science/map.fits"),
            l.root.join("superseded/run-5/output/science/map.fits")
        );
        assert_eq!(l.directories(true).len(), 9);
        assert_eq!(l.directories(false).len(), 4);
    }
}

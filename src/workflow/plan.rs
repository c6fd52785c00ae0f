//! A run's job, decided before anything is written: its directories, the inputs bound
//! into it, its manifest and its command (what is submitted, and what Python's
//! `CommandBuilder` shows); and the writing of its directories.

use super::*;

/// Everything about a run's job, decided before anything is written: its directories,
/// the inputs bound into it, its manifest and its command.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub layout: RunLayout,
    pub inputs: Vec<BoundInput>,
    pub manifest: Manifest,
    pub spec: JobSpec,
}

/// Plans a run's job from its rows (no I/O beyond looking for a cached SIF): what
/// [`WorkflowManager`] submits, and what `CommandBuilder` shows in Python.
/// A raw input's copy must lie inside its data location's base path, when the location
/// has one: a path in the database (`~/.ssh/id_rsa`, `/etc/shadow`) is otherwise bound
/// into the job as one of its inputs. Links are resolved first.
pub(super) fn confined(package: &RawInput) -> Result<(), String> {
    let (Some(path), Some(base)) = (&package.full_path, &package.location_base_path) else {
        return Ok(());
    };
    if base.is_empty() {
        return Ok(());
    }
    let (Ok(path), Ok(base)) = (
        Path::new(path).canonicalize(),
        Path::new(base).canonicalize(),
    ) else {
        // Missing: the readability checks say so.
        return Ok(());
    };
    if path.starts_with(&base) {
        Ok(())
    } else {
        Err(format!(
            "raw data package {} ({}): its copy {} lies outside its location's base path {}",
            package.name,
            package.raw_data_package_id,
            path.display(),
            base.display()
        ))
    }
}

pub fn plan_job(
    options: &WorkflowOptions,
    identity: &AttemptIdentity,
    run: &RunWork,
    raw: &[RawInput],
    products: &[ProductInput],
    now: DateTime<Utc>,
) -> Result<JobPlan, String> {
    let argv: Vec<String> = serde_json::from_str(&run.command.0).map_err(|e| {
        format!(
            "{} {}: its command is not a JSON list of strings ({e})",
            run.software_name, run.software_version
        )
    })?;
    let layout = run_layout(&options.pipeline_base_dir, run);
    let mut inputs = Vec::with_capacity(raw.len() + products.len());
    let mut manifest_inputs = Vec::with_capacity(raw.len());
    let visible = command::visible_dirs(options.runtime, &layout, run.is_final);
    for package in raw {
        let Some(path) = package.full_path.as_deref() else {
            return Err(format!(
                "raw data package {} ({}) has no copy to read",
                package.name, package.raw_data_package_id
            ));
        };
        let name = format!("{}_{}", package.raw_data_package_id, file_name(path));
        manifest_inputs.push(ManifestInput {
            raw_data_package_id: package.raw_data_package_id,
            name: package.name.clone(),
            path: format!("{}/{}", visible.input, name),
            size_bytes: package.size_bytes,
            checksum: package.checksum.clone(),
        });
        inputs.push(BoundInput {
            host_path: path.into(),
            name,
        });
    }
    let mut manifest_products = Vec::with_capacity(products.len());
    for product in products {
        let Some(path) = product.full_path.as_deref() else {
            return Err(format!(
                "upstream product {} ({}) has no copy at processing location {}",
                product.data_product_id, product.relative_path, run.processing_location_id
            ));
        };
        let name = format!("products/{}_{}", product.data_product_id, file_name(path));
        manifest_products.push(ManifestProduct {
            data_product_id: product.data_product_id,
            run_id: product.run_id,
            name: product.name.clone(),
            product_type: product.product_type.clone(),
            path: format!("{}/{}", visible.input, name),
            size_bytes: product.size_bytes,
            checksum: product.checksum.clone(),
        });
        inputs.push(BoundInput {
            host_path: path.into(),
            name,
        });
    }
    let manifest = Manifest {
        manifest_version: layout::MANIFEST_VERSION,
        run_id: run.id,
        attempt: run.attempt(),
        created_at: now,
        pipeline: layout::Named {
            id: run.pipeline_id,
            name: run.pipeline_name.clone(),
        },
        step: layout::ManifestStep {
            id: run.reduction_step_id,
            name: run.step_name.clone(),
            is_final: run.is_final,
        },
        sub_group: layout::ManifestSubGroup {
            key: run.sub_group_key.clone(),
            values: run.sub_group.0.clone(),
        },
        software: layout::ManifestSoftware {
            name: run.software_name.clone(),
            version: run.software_version.clone(),
            image_ref: run.image_ref.clone(),
            image_digest: run.image_digest.clone(),
            command: argv.clone(),
        },
        configuration: run.config_snapshot.0.clone(),
        inputs: manifest_inputs,
        upstream_products: manifest_products,
        excluded_upstream: run.excluded_upstream.0.clone(),
        directories: visible,
    };
    let image = match options.runtime {
        ContainerRuntime::Apptainer => command::image_for(
            &options.sif_cache_dir,
            &run.image_ref,
            run.image_digest.as_deref(),
        ),
        // Pinned by digest when known (a reference may carry both tag and digest).
        ContainerRuntime::Pod => match run.image_digest.as_deref() {
            Some(digest) if !digest.is_empty() => format!("{}@{digest}", run.image_ref),
            _ => run.image_ref.clone(),
        },
        ContainerRuntime::None => String::new(),
    };
    let job_command = command::build(&CommandRequest {
        runtime: options.runtime,
        apptainer: &options.apptainer,
        image: &image,
        command: &argv,
        layout: &layout,
        final_step: run.is_final,
        inputs: &inputs,
        run_id: run.id,
        step_name: &run.step_name,
    })
    .map_err(|e| format!("{} {}: {e}", run.software_name, run.software_version))?;
    let spec = JobSpec {
        tag: identity.tag.clone(),
        nonce: identity.nonce.clone(),
        command: job_command,
        attempt_dir: layout.attempt_dir(),
        cpus: run.cpu.clamp(1, 100_000) as u32,
        // Bounded, so that no value in the database makes a nonsense request (at most
        // a petabyte, ten years).
        memory_mb: (run.memory_gb * 1024.0).ceil().clamp(1.0, 1e9) as u64,
        time_limit_seconds: (run.time_hours * 3600.0).ceil().clamp(1.0, 315_360_000.0) as u64,
    };
    Ok(JobPlan {
        layout,
        inputs,
        manifest,
        spec,
    })
}

/// A run's job as the workflow-manager would submit it now, read from the database
/// and planned without writing anything (None: no such run). Inputs without a usable
/// copy are an error naming them.
pub async fn preview_job(
    db: &Database,
    options: &WorkflowOptions,
    run_id: i64,
) -> Result<Option<Result<JobPlan, String>>, DbError> {
    let Some(run) = db.run_work(run_id).await? else {
        return Ok(None);
    };
    let raw = db
        .run_raw_input_copies(run.id, run.processing_location_id)
        .await?;
    let products = db
        .run_product_input_copies(run.id, run.processing_location_id)
        .await?;
    let tag = job_tag(&deployment_tag_prefix(db).await?, run.id, run.attempt());
    let identity = AttemptIdentity::read_for(
        &tag,
        &run_layout(&options.pipeline_base_dir, &run).attempt_dir(),
    )
    .unwrap_or_else(|| AttemptIdentity::new(&tag));
    Ok(Some(plan_job(
        options,
        &identity,
        &run,
        &raw,
        &products,
        Utc::now(),
    )))
}

/// Where a run's current attempt lives.
pub(super) fn run_layout(base: &Path, run: &RunWork) -> RunLayout {
    RunLayout::new(
        base,
        &run.pipeline_name,
        &run.sub_group_key,
        &run.step_name,
        run.id,
        run.attempt(),
    )
}

/// The tag a job carries (SLURM job name and comment), findable after a crash:
/// `ccat-{database}-run-{id}-a{attempt}`.
pub fn job_tag(prefix: &str, run_id: i64, attempt: i32) -> String {
    format!("{prefix}-run-{run_id}-a{attempt}")
}

/// `ccat-` and the first 12 characters of the deployment id (random per database, see
/// [`Database::deployment_id`]): the same for every manager of one deployment, different
/// between two, and between two incarnations of a database of the same name.
pub fn tag_prefix(deployment_id: &str) -> String {
    let id: String = deployment_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("ccat-{}", id.to_ascii_lowercase())
}

/// The tag prefix of the deployment `db` belongs to.
pub async fn deployment_tag_prefix(db: &Database) -> Result<String, DbError> {
    Ok(tag_prefix(&db.deployment_id().await?))
}

pub(super) fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into())
}

/// Creates the run's directories (owner and group only), links its inputs and writes
/// its manifest.
pub fn prepare(
    layout: &RunLayout,
    final_step: bool,
    inputs: &[BoundInput],
    manifest: &Manifest,
) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let with = |path: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(0o750);
    for dir in layout.directories(final_step) {
        builder.create(&dir).map_err(|e| with(&dir, e))?;
    }
    // The input links of an earlier attempt may differ: start from an empty directory.
    let input_dir = layout.input();
    std::fs::remove_dir_all(&input_dir).map_err(|e| with(&input_dir, e))?;
    builder
        .create(&input_dir)
        .map_err(|e| with(&input_dir, e))?;
    for input in inputs {
        let link = input_dir.join(&input.name);
        if let Some(parent) = link.parent() {
            builder.create(parent).map_err(|e| with(parent, e))?;
        }
        std::os::unix::fs::symlink(&input.host_path, &link).map_err(|e| with(&link, e))?;
    }
    let path = layout.manifest();
    let text = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    let tmp = path.with_extension("json.tmp");
    crate::backend::write_private(&tmp, &text).map_err(|e| with(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| with(&path, e))?;
    Ok(())
}

//! Benchmarks that anyone can run (`ccat-wfm bench …`, `nox -s bench`): each prints the
//! figure it measured beside the figure it is judged against. Never part of the tests.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::db::{Database, scratch};

mod trigger;
pub use trigger::{
    MatureFigures, ScenarioFigures, TriggerBench, TriggerFigures, mature_scenarios, render_mature,
    render_trigger, trigger, trigger_mature,
};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident and peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn memory_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The figures of one publishing benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct PublishFigures {
    pub tasks: usize,
    pub batch: usize,
    pub seconds: f64,
    pub tasks_per_s: f64,
}

/// Publishes `tasks` protocol-2 messages to Redis in pipelined batches of `batch`, under a
/// scratch key prefix that is deleted afterwards, and times it.
pub async fn publish(
    redis_url: &str,
    tasks: usize,
    batch: usize,
) -> Result<PublishFigures, crate::celery::CeleryError> {
    use crate::celery::{BrokerOptions, CeleryError, Producer, QUEUE_HPC, Task};
    let client = redis::Client::open(redis_url)
        .map_err(|source| CeleryError::Publish { count: 0, source })?;
    let prefix = format!("ccat-bench-{}:", uuid::Uuid::new_v4());
    let options = BrokerOptions {
        global_keyprefix: prefix.clone(),
        ..Default::default()
    };
    let mut producer = Producer::connect(client.clone(), options).await?;
    let batch = batch.max(1);
    let started = Instant::now();
    let mut sent = 0;
    while sent < tasks {
        let n = batch.min(tasks - sent);
        // Building the messages is part of publishing, as it is for send_task.
        let messages: Vec<Task> = (sent..sent + n)
            .map(|i| {
                let mut t = Task::new(
                    "ccat_workflow_manager.tasks.submit_run",
                    QUEUE_HPC,
                    vec![serde_json::json!(i)],
                );
                t.priority = (i % 10) as u8;
                t
            })
            .collect();
        producer.publish(&messages).await?;
        sent += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Drop the scratch queues.
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|source| CeleryError::Publish { count: 0, source })?;
    // SCAN, not KEYS: the broker may be shared, and KEYS blocks it for the whole keyspace.
    let failed = |source| CeleryError::Publish { count: 0, source };
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await
                .map_err(failed)?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(PublishFigures {
        tasks,
        batch,
        seconds,
        tasks_per_s: tasks as f64 / seconds,
    })
}

/// What to measure the SLURM backend on.
#[derive(Debug, Clone)]
pub struct SlurmBench {
    /// A PostgreSQL URL of a role that may create databases.
    pub admin_url: String,
    /// Runs submitted end to end (claim, layout, manifest, sbatch, record).
    pub submit: i64,
    /// Numbers of active jobs at which one status cycle is counted.
    pub active: Vec<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlurmFigures {
    pub submitted: i64,
    pub submit_s: f64,
    pub submit_goal_s: f64,
    pub polls: Vec<PollFigure>,
}

/// One result-manager cycle over `active_jobs` jobs: the SLURM calls it made.
#[derive(Debug, Clone, Serialize)]
pub struct PollFigure {
    pub active_jobs: i64,
    pub calls: std::collections::BTreeMap<String, u64>,
    pub cycle_ms: f64,
}

/// Times submitting runs to the SLURM cluster the environment points at (`SLURM_CONF`)
/// and counts the SLURM calls of a status cycle at several numbers of active jobs. Runs
/// in a scratch database and a scratch directory; cancels its jobs at the end.
pub async fn slurm(bench: &SlurmBench) -> anyhow::Result<SlurmFigures> {
    let name = "ccat_wfm_bench_slurm";
    let url = scratch::recreate(&bench.admin_url, name).await?;
    let db = Database::connect_url(&url).await?;
    let dir = std::env::temp_dir().join(format!("ccat-wfm-bench-slurm-{}", std::process::id()));
    let backend = crate::backend::slurm::SlurmBackend::default();
    let result = slurm_on(&db, bench, &dir, &backend).await;
    // Whatever happened, leave no job behind.
    let jobs: Vec<String> = db
        .active_jobs("slurm", 1)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|j| j.hpc_job_id)
        .collect();
    if let Err(e) = backend.cancel_all(&jobs).await {
        tracing::warn!(error = %e, "cancelling the benchmark's jobs failed");
    }
    db.close().await;
    scratch::drop(&bench.admin_url, name).await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn slurm_on(
    db: &Database,
    bench: &SlurmBench,
    dir: &std::path::Path,
    backend: &crate::backend::slurm::SlurmBackend,
) -> anyhow::Result<SlurmFigures> {
    use crate::workflow::{WorkflowManager, WorkflowOptions, command::ContainerRuntime};
    db.migrate().await?;
    let options = WorkflowOptions {
        processing_location_id: 1,
        pipeline_base_dir: dir.to_owned(),
        sif_cache_dir: dir.join("sif"),
        runtime: ContainerRuntime::None,
        apptainer: "apptainer".into(),
        staging_mode: crate::config::StagingMode::Local,
        claim_batch_size: 100,
        max_active_jobs: 100_000,
        lease: chrono::Duration::minutes(5),
        retry_backoff: chrono::Duration::minutes(1),
    };
    let wm = WorkflowManager::new(db.clone(), backend.clone(), options);
    let results = crate::results::ResultManager::new(
        db.clone(),
        backend.clone(),
        crate::results::ResultOptions {
            processing_location_id: 1,
            pipeline_base_dir: dir.to_owned(),
            retry_backoff: chrono::Duration::minutes(1),
            vanish_grace: chrono::Duration::seconds(30),
            handoff_timeout: chrono::Duration::minutes(5),
        },
    );
    let submit_all = |wanted: i64| {
        let wm = &wm;
        async move {
            let mut submitted = 0;
            while submitted < wanted {
                let report = wm.cycle(Utc::now()).await?;
                if let Some(e) = report.errors.first() {
                    anyhow::bail!("submission failed: {e}");
                }
                if report.submitted == 0 && report.failed > 0 {
                    anyhow::bail!("runs failed at submission; see the log");
                }
                submitted += report.submitted as i64;
            }
            Ok(())
        }
    };

    // Submission, end to end: claim, layout, manifest, sbatch, record.
    db.install_bench_runs(&["/bin/true".to_owned()], bench.submit, "submit-")
        .await?;
    let started = Instant::now();
    submit_all(bench.submit).await?;
    let submit_s = started.elapsed().as_secs_f64();
    // Let those jobs finish and be recorded, so they do not count below.
    let deadline = Instant::now() + Duration::from_secs(600);
    while results.cycle(Utc::now()).await?.polled > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut active = bench.active.clone();
    active.sort_unstable();
    let mut polls = Vec::new();
    let mut have = 0;
    for n in active {
        db.install_bench_runs(
            &["/bin/sleep".to_owned(), "3600".to_owned()],
            n - have,
            &format!("active{n}-"),
        )
        .await?;
        submit_all(n - have).await?;
        have = n;
        backend.calls.take();
        let started = Instant::now();
        let report = results.cycle(Utc::now()).await?;
        let cycle_ms = ms(started.elapsed());
        if let Some(e) = report.errors.first() {
            anyhow::bail!("status cycle failed: {e}");
        }
        polls.push(PollFigure {
            active_jobs: report.polled as i64,
            calls: backend.calls.take(),
            cycle_ms,
        });
    }
    Ok(SlurmFigures {
        submitted: bench.submit,
        submit_s,
        submit_goal_s: 60.0,
        polls,
    })
}

/// The SLURM figures as text, each beside its goal.
pub fn render_slurm(f: &SlurmFigures) -> String {
    let mut out = format!(
        "submitting {} runs to SLURM, end to end: {:.1} s (goal < {:.0} s: {})\n",
        f.submitted,
        f.submit_s,
        f.submit_goal_s,
        if f.submit_s < f.submit_goal_s {
            "met"
        } else {
            "NOT met"
        }
    );
    for p in &f.polls {
        let total: u64 = p.calls.values().sum();
        let squeue = p.calls.get("squeue").copied().unwrap_or(0);
        let calls: Vec<String> = p.calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!(
            "status cycle over {:>5} active jobs: {} SLURM call(s) ({}) (goal: 1 squeue + at \
             most 1 sacct: {}); {:.0} ms (goal < 1000 ms: {})\n",
            p.active_jobs,
            total,
            calls.join(", "),
            if squeue == 1 && total <= 2 {
                "met"
            } else {
                "NOT met"
            },
            p.cycle_ms,
            if p.cycle_ms < 1000.0 {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    out
}

/// What to checksum.
#[derive(Debug, Clone)]
pub struct ChecksumBench {
    pub files: usize,
    pub size_mb: usize,
    /// Where to write the files (a scratch directory under it, removed afterwards).
    pub dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChecksumFigures {
    pub files: usize,
    pub total_mb: f64,
    /// `sha256sum` over the same files, one process (best of two).
    pub sha256sum_mb_s: f64,
    /// The collector's checksumming, one file at a time.
    pub ours_one_thread_mb_s: f64,
    /// The collector's checksumming as the result-manager runs it (one task per core).
    pub ours_parallel_mb_s: f64,
    pub parallelism: usize,
}

/// Times the collector's streamed SHA-256 against `sha256sum` on the same files (the
/// files are read once first, so both read from the page cache).
pub async fn checksum(bench: &ChecksumBench) -> anyhow::Result<ChecksumFigures> {
    use anyhow::Context;
    let dir = bench
        .dir
        .join(format!("ccat-wfm-bench-checksum-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = checksum_in(&dir, bench).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn checksum_in(
    dir: &std::path::Path,
    bench: &ChecksumBench,
) -> anyhow::Result<ChecksumFigures> {
    use crate::results::collect::{Found, checksum_all};
    use anyhow::Context;
    let mut paths = Vec::with_capacity(bench.files);
    // Incompressible content from a xorshift generator: no file system shortcut applies.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..bench.files {
        let path = dir.join(format!("product-{i}.fits"));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        for _ in 0..bench.size_mb {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            std::io::Write::write_all(&mut file, &block)?;
        }
        std::io::Write::flush(&mut file)?;
        paths.push(path);
    }
    let total_mb = (bench.files * bench.size_mb) as f64;
    let found = || -> Vec<Found> {
        paths
            .iter()
            .map(|p| Found {
                path: p.clone(),
                relative_path: p.display().to_string(),
                product_type: "SCIENCE",
            })
            .collect()
    };
    let sha256sum = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let status = std::process::Command::new("sha256sum")
            .args(&paths)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running sha256sum")?;
        anyhow::ensure!(status.success(), "sha256sum failed: {status}");
        Ok(started.elapsed().as_secs_f64())
    };
    sha256sum()?; // warms the page cache
    let reference = sha256sum()?.min(sha256sum()?);
    let started = Instant::now();
    let one = checksum_all(found(), 1).await;
    let one_s = started.elapsed().as_secs_f64();
    let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    let many = checksum_all(found(), parallelism).await;
    let many_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        one.problems.is_empty() && many.problems.is_empty() && many.products.len() == bench.files,
        "checksumming failed: {:?}",
        many.problems
    );
    Ok(ChecksumFigures {
        files: bench.files,
        total_mb,
        sha256sum_mb_s: total_mb / reference,
        ours_one_thread_mb_s: total_mb / one_s,
        ours_parallel_mb_s: total_mb / many_s,
        parallelism,
    })
}

pub fn render_checksum(f: &ChecksumFigures) -> String {
    let pct = |x: f64| 100.0 * x / f.sha256sum_mb_s;
    let verdict = |x: f64| if pct(x) >= 80.0 { "met" } else { "NOT met" };
    format!(
        "checksumming {} files, {:.0} MB in all (page cache):\n\
         \x20 sha256sum (one process)           {:>8.0} MB/s\n\
         \x20 collector, one file at a time      {:>8.0} MB/s = {:.0} % of sha256sum (goal >= 80 %: {})\n\
         \x20 collector, {} at a time (as run)    {:>8.0} MB/s = {:.0} % of sha256sum (goal >= 80 %: {})\n",
        f.files,
        f.total_mb,
        f.sha256sum_mb_s,
        f.ours_one_thread_mb_s,
        pct(f.ours_one_thread_mb_s),
        verdict(f.ours_one_thread_mb_s),
        f.parallelism,
        f.ours_parallel_mb_s,
        pct(f.ours_parallel_mb_s),
        verdict(f.ours_parallel_mb_s),
    )
}

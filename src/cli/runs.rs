//! The commands on runs: `status` (once or watching), `retry` and `cancel`.

use super::{DatabaseArg, EXIT_PROBLEM, EXIT_USAGE, open_database, service, views};
use crate::config::Settings;

/// `ccat-wfm status`: once, or redrawn every `watch` seconds until SIGINT/SIGTERM.
pub(super) async fn status(
    settings: &Settings,
    json: bool,
    watch: Option<f64>,
    limit: i64,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let code = match watch {
        None => views::status(&db, json, limit).await,
        Some(seconds) => {
            let mut stop = service::stop_on_signals()?;
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

/// `ccat-wfm retry`: a FAILED or CANCELLED run back to PENDING.
pub(super) async fn retry(
    settings: &Settings,
    run_id: i64,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let done = db.retry_run(run_id).await;
    let status = db.run_status(run_id).await;
    db.close().await;
    if done? {
        println!("run {run_id} is PENDING again; the workflow-manager picks it up next cycle");
        Ok(0)
    } else {
        Ok(wrong_state(
            run_id,
            status?,
            "only a FAILED or CANCELLED run can be retried",
        ))
    }
}

/// `ccat-wfm cancel`: a run that has not finished is cancelled (its job with it).
pub(super) async fn cancel(
    settings: &Settings,
    run_id: i64,
    reason: &str,
    db: &DatabaseArg,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let done = db.cancel_run(run_id, reason).await;
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

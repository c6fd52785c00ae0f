//! The administrative commands: `config show`, `db migrate`, `db check`,
//! `db change-tracking-sql`, and `send` (one Celery task, by hand).

use anyhow::Context;
use serde_json::Value;

use super::{DatabaseArg, EXIT_PROBLEM, EXIT_USAGE, open_database, views};
use crate::config::Settings;
use crate::health;

/// `ccat-wfm config show`: the effective settings (secrets hidden).
pub(super) fn config_show(settings: &Settings, json: bool) -> anyhow::Result<u8> {
    let value = serde_json::to_value(settings).context("serialising the settings")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", views::render_flat(&value));
    }
    Ok(0)
}

/// `ccat-wfm db migrate`: applies the migrations the database lacks.
pub(super) async fn db_migrate(settings: &Settings, db: &DatabaseArg) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let applied = db.migrate().await?;
    if applied.is_empty() {
        println!("{} is up to date", db.describe());
    } else {
        let versions: Vec<String> = applied.iter().map(i64::to_string).collect();
        println!(
            "applied migration(s) {} to {}",
            versions.join(", "),
            db.describe()
        );
    }
    db.close().await;
    Ok(0)
}

/// `ccat-wfm db check`: what the database lacks of what the managers need; exit 1 if
/// anything.
pub(super) async fn db_check(
    settings: &Settings,
    db: &DatabaseArg,
    json: bool,
) -> anyhow::Result<u8> {
    let db = open_database(settings, db).await?;
    let report = db.check().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.is_complete() {
        println!(
            "{}: every table and column the workflow manager needs is present",
            db.describe()
        );
    } else {
        println!("{} lacks what the workflow manager needs:", db.describe());
        for table in &report.missing_tables {
            println!("  missing table  {table}");
        }
        for (table, column) in &report.missing_columns {
            println!("  missing column {table}.{column}");
        }
        for function in &report.missing_functions {
            println!("  missing change-tracking function {function}");
        }
        for trigger in &report.missing_triggers {
            println!("  missing change-tracking trigger  {trigger}");
        }
        if !report.missing_functions.is_empty() || !report.missing_triggers.is_empty() {
            println!(
                "  (without them the trigger-manager never sees new data: \
                     `ccat-wfm db change-tracking-sql` prints what to install)"
            );
        }
    }
    db.close().await;
    Ok(if report.is_complete() {
        0
    } else {
        EXIT_PROBLEM
    })
}

/// `ccat-wfm send`: publishes one Celery task; prints its id.
pub(super) async fn send(
    settings: &Settings,
    task: &str,
    queue: &str,
    priority: u8,
    args: &str,
    kwargs: &str,
    key_prefix: String,
) -> anyhow::Result<u8> {
    let args: Vec<Value> = match serde_json::from_str(args) {
        Ok(Value::Array(items)) => items,
        _ => {
            eprintln!("error: --args must be a JSON list, got {args:?}");
            return Ok(EXIT_USAGE);
        }
    };
    let kwargs = match serde_json::from_str(kwargs) {
        Ok(Value::Object(map)) => map,
        _ => {
            eprintln!("error: --kwargs must be a JSON object, got {kwargs:?}");
            return Ok(EXIT_USAGE);
        }
    };
    let mut message = crate::celery::Task::new(task, queue, args);
    message.kwargs = kwargs;
    message.priority = priority;
    let client =
        health::redis_client(&settings.redis).context("the Redis settings are not usable")?;
    let options = crate::celery::BrokerOptions {
        global_keyprefix: key_prefix,
        ..Default::default()
    };
    let mut producer = crate::celery::Producer::connect(client, options).await?;
    producer.publish(std::slice::from_ref(&message)).await?;
    println!("{}", message.id);
    Ok(0)
}

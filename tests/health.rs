//! Heartbeats against a real Redis: key, TTL, refresh, status record, a stuck loop, the
//! `ccat-wfm health` exit codes, and a Redis that is not there.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ccat_workflow_manager::health::{self, Health, HealthKeys, HealthReporter};
use redis::AsyncCommands;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn redis_url() -> String {
    std::env::var("CCAT_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("CCAT_TEST_REDIS_URL is not set: run the tests with `nox -s tests` or scripts/services.sh")
    })
}

fn client() -> redis::Client {
    redis::Client::open(redis_url()).unwrap()
}

/// A name no other test uses.
fn unique(label: &str) -> String {
    format!(
        "test-{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn private_keys(label: &str) -> HealthKeys {
    HealthKeys {
        prefix: format!("{}:health:workflow:", unique(label)),
    }
}

async fn conn() -> redis::aio::MultiplexedConnection {
    client().get_multiplexed_async_connection().await.unwrap()
}

async fn wait_for_key(key: &str) {
    let mut c = conn().await;
    for _ in 0..100 {
        if c.exists::<_, bool>(key).await.unwrap() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} never appeared");
}

#[tokio::test]
async fn heartbeat_keeps_the_key_alive_with_its_ttl_and_a_status_record() {
    let keys = private_keys("beat");
    let reporter = HealthReporter::new("trigger-manager", Duration::from_secs(300));
    let task = health::spawn_heartbeat(
        client(),
        keys.clone(),
        reporter.clone(),
        Duration::from_millis(100),
    );
    wait_for_key(&keys.alive("trigger-manager")).await;
    let mut c = conn().await;
    assert_eq!(
        c.get::<_, String>(keys.alive("trigger-manager"))
            .await
            .unwrap(),
        "alive"
    );
    let ttl: i64 = c.ttl(keys.alive("trigger-manager")).await.unwrap();
    assert!((80..=90).contains(&ttl), "ttl {ttl}");

    let first: String = c.get(keys.status("trigger-manager")).await.unwrap();
    let first: health::ServiceStatus = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (first.pid, first.version.as_str()),
        (std::process::id(), env!("CARGO_PKG_VERSION"))
    );
    // The record is refreshed by later beats, and carries the loop's progress.
    reporter.cycle_started();
    reporter.cycle_finished(5, None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let later: String = c.get(keys.status("trigger-manager")).await.unwrap();
    let later: health::ServiceStatus = serde_json::from_str(&later).unwrap();
    assert!(later.updated_at > first.updated_at);
    assert_eq!(later.last_cycle_items, 5);

    let report = health::report(&client(), &keys).await.unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].health, Health::Healthy);
    task.abort();
    remove_all(&keys).await;
}

/// Removes a test's keys.
async fn remove_all(keys: &HealthKeys) {
    let mut c = conn().await;
    let found: Vec<String> = c.keys(format!("{}*", keys.prefix)).await.unwrap();
    if !found.is_empty() {
        let _: () = c.del(found).await.unwrap();
    }
}

#[tokio::test]
async fn a_stuck_loop_is_stale_while_its_key_is_alive() {
    let keys = private_keys("stuck");
    let reporter = HealthReporter::new("result-manager", Duration::from_millis(300));
    reporter.cycle_started();
    let task =
        health::spawn_heartbeat(client(), keys.clone(), reporter, Duration::from_millis(100));
    wait_for_key(&keys.alive("result-manager")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = health::service(&client(), &keys, "result-manager")
        .await
        .unwrap();
    assert!(
        matches!(&s.health, Health::Stale { reason } if reason.contains("running")),
        "{s:?}"
    );
    task.abort();
    let unknown = health::service(&client(), &keys, "nobody").await.unwrap();
    assert_eq!(unknown.health, Health::Down);
    remove_all(&keys).await;
}

#[tokio::test]
async fn redis_being_away_does_not_stop_the_heartbeat_task() {
    let nowhere = redis::Client::open("redis://127.0.0.1:1/0").unwrap();
    let reporter = HealthReporter::new("workflow-manager", Duration::from_secs(300));
    let task = health::spawn_heartbeat(
        nowhere,
        HealthKeys::default(),
        reporter,
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!task.is_finished(), "the heartbeat gave up");
    task.abort();
}

#[tokio::test]
async fn health_command_exit_codes() {
    let url = url_parts(&redis_url());
    let service = unique("cli");
    let keys = HealthKeys::default();
    let wfm = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ccat-wfm"))
            .args(args)
            .env("CCAT_WORKFLOW_MANAGER_REDIS_HOST", &url.0)
            .env("CCAT_WORKFLOW_MANAGER_REDIS_PORT", url.1.to_string())
            .output()
            .unwrap()
    };
    // Unknown: down.
    assert_eq!(
        wfm(&["health", "--service", &service]).status.code(),
        Some(1)
    );

    let reporter = HealthReporter::new(&service, Duration::from_secs(300));
    reporter.cycle_started();
    reporter.cycle_finished(1, None);
    let mut cm = client().get_connection_manager().await.unwrap();
    health::beat(&mut cm, &keys, &reporter.snapshot())
        .await
        .unwrap();
    let out = wfm(&["health", "--service", &service]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("healthy"));

    // Stuck: alive, but a cycle started long ago.
    let stuck = HealthReporter::new(&service, Duration::from_millis(1));
    stuck.cycle_started();
    tokio::time::sleep(Duration::from_millis(20)).await;
    health::beat(&mut cm, &keys, &stuck.snapshot())
        .await
        .unwrap();
    let out = wfm(&["health", "--service", &service, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["state"], "stale");

    // A clean stop: listed as stopped, with the time; asked for by name it is not running.
    let mut done = reporter.snapshot();
    done.stopped_at = Some(chrono::Utc::now());
    health::stopped(&mut cm, &keys, &done).await.unwrap();
    let out = wfm(&["health", "--service", &service, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["state"], "stopped", "{json}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    health::beat(&mut cm, &keys, &stuck.snapshot())
        .await
        .unwrap();

    // The key expires (here: removed): down.
    let mut c = conn().await;
    let _: () = c.del(keys.alive(&service)).await.unwrap();
    assert_eq!(
        wfm(&["health", "--service", &service]).status.code(),
        Some(1)
    );
    let _: () = c.del(keys.status(&service)).await.unwrap();

    // No Redis at all: a clear error, exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"))
        .args(["health"])
        .env("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read health from Redis"));
}

/// Host and port of a `redis://host:port/db` URL.
pub fn url_parts(url: &str) -> (String, u16) {
    let rest = url.trim_start_matches("redis://");
    let authority = rest.split('/').next().unwrap();
    let hostport = authority.rsplit('@').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "6379"));
    (host.to_owned(), port.parse().unwrap())
}

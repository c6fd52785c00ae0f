//! The Celery outbox on SQLite and PostgreSQL against a private Redis that is stopped in
//! the middle of dispatching: every recorded hand-off is delivered, as recorded and in
//! order, once Redis is back; none is lost.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine;
use ccat_workflow_manager::config::{RedisSettings, Secret};
use ccat_workflow_manager::db::outbox::Handoff;
use ccat_workflow_manager::dispatch::Publisher;
use common::TestDatabase;
use serde_json::{Value, json};

/// A Redis of this test's own, persisting to an append-only file so that a restart
/// keeps what was delivered before it stopped.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(dir: &Path, port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services.sh installs it)");
        let redis = PrivateRedis {
            port,
            child: Some(child),
        };
        for _ in 0..100 {
            if redis.client().get_connection().is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the private redis-server did not start on port {port}");
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port)).unwrap()
    }

    /// SIGTERM: Redis flushes its append-only file and exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn handoffs(from: i64, to: i64) -> Vec<Handoff> {
    (from..to)
        .map(|i| Handoff {
            processing_location_id: Some(1),
            task_id: uuid::Uuid::new_v4().to_string(),
            task_name: "ccat_workflow_manager.tasks.submit_run".into(),
            queue: "workflow.hpc".into(),
            priority: 0,
            args: json!([i]),
            kwargs: json!({"why": "test"}),
        })
        .collect()
}

#[tokio::test]
async fn a_redis_outage_mid_dispatch_loses_no_hand_off() {
    for t in TestDatabase::both_migrated("dispatch").await {
        let db = &t.db;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut redis = PrivateRedis::start(dir.path(), port);
        let settings = RedisSettings {
            host: "127.0.0.1".into(),
            port,
            password: Secret::new(String::new()),
        };
        let prefix = format!("outbox-{}:", uuid::Uuid::new_v4());
        let mut publisher = Publisher::new(&settings, &prefix).unwrap();

        let first = handoffs(0, 150);
        db.record_handoffs(&first).await.unwrap();
        let report = publisher.publish_pending(db).await.unwrap();
        assert_eq!((report.published, report.backlog), (150, 0), "{}", t.url);

        // Redis stops; the managers go on recording hand-offs.
        redis.stop();
        let second = handoffs(150, 300);
        db.record_handoffs(&second[..100]).await.unwrap();
        let report = publisher.publish_pending(db).await.unwrap();
        assert_eq!(report.published, 0);
        assert_eq!(report.backlog, 100);
        assert!(report.error.is_some());
        db.record_handoffs(&second[100..]).await.unwrap();
        let report = publisher.publish_pending(db).await.unwrap();
        assert_eq!((report.published, report.backlog), (0, 150));

        // Back: everything recorded is delivered, with the ids it was recorded with.
        let redis = PrivateRedis::start(dir.path(), port);
        let report = publisher.publish_pending(db).await.unwrap();
        assert_eq!((report.published, report.backlog), (150, 0), "{report:?}");
        assert!(report.error.is_none());

        let mut conn = redis.client().get_connection().unwrap();
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{prefix}workflow.hpc"))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        // LPUSH puts the newest first; workers pop from the other end.
        let delivered: Vec<Value> = raw
            .iter()
            .rev()
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        let recorded: Vec<&Handoff> = first.iter().chain(&second).collect();
        assert_eq!(delivered.len(), recorded.len(), "each hand-off once");
        for (message, handoff) in delivered.iter().zip(&recorded) {
            assert_eq!(message["headers"]["id"], handoff.task_id.as_str());
            assert_eq!(message["headers"]["task"], handoff.task_name.as_str());
            let body = base64::engine::general_purpose::STANDARD
                .decode(message["body"].as_str().unwrap())
                .unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body[0], handoff.args);
            assert_eq!(body[1], handoff.kwargs);
        }
        // The retried ones record their attempts.
        let attempts: Vec<(i32, Option<String>)> = match db {
            ccat_workflow_manager::db::Database::Postgres(p) => {
                sqlx::query_as("SELECT attempts, last_error FROM celery_outbox ORDER BY id")
                    .fetch_all(p)
                    .await
                    .unwrap()
            }
            ccat_workflow_manager::db::Database::Sqlite(p) => {
                sqlx::query_as("SELECT attempts, last_error FROM celery_outbox ORDER BY id")
                    .fetch_all(p)
                    .await
                    .unwrap()
            }
        };
        assert!(attempts[..150].iter().all(|(a, e)| *a == 1 && e.is_none()));
        assert!(
            attempts[150..250]
                .iter()
                .all(|(a, e)| *a == 3 && e.is_none())
        );
        assert!(attempts[250..].iter().all(|(a, e)| *a == 2 && e.is_none()));
    }
}

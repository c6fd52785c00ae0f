//! Celery protocol 2 over Redis, the producer side: the data center's Python Celery
//! workers execute what the Rust managers publish. The envelope, the priority queue keys
//! and `global_keyprefix` follow `shared/reference/celery-wire-format.md` (checked
//! against celery/kombu 5.7); the fields whose absence makes a worker drop a message
//! (`delivery_tag`, `delivery_info`, `body_encoding`) are always set.
//!
//! Building envelopes is pure; [`Producer`] pushes a batch with one pipelined round trip.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// The queues the managers publish to.
pub const QUEUE_STAGING: &str = "workflow.staging";
pub const QUEUE_HPC: &str = "workflow.hpc";
pub const QUEUE_RESULTS: &str = "workflow.results";

/// What went wrong publishing.
#[derive(Debug, thiserror::Error)]
pub enum CeleryError {
    #[error("priority {0} is outside 0..=9 (0 is the highest)")]
    Priority(u8),
    #[error("publishing {count} task(s) to Redis failed: {source}")]
    Publish {
        count: usize,
        #[source]
        source: redis::RedisError,
    },
}

/// Broker transport options that must match the workers' (kombu's Redis transport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOptions {
    /// Prepended to every key (`broker_transport_options["global_keyprefix"]`).
    pub global_keyprefix: String,
    /// Priority buckets (`priority_steps`), ascending, starting at 0.
    pub priority_steps: Vec<u8>,
    /// Between a queue's name and its bucket (`sep`).
    pub separator: String,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            global_keyprefix: String::new(),
            priority_steps: vec![0, 3, 6, 9],
            separator: "\x06\x16".to_owned(),
        }
    }
}

impl BrokerOptions {
    /// The Redis list a message of `priority` on `queue` goes to: the largest bucket not
    /// above the priority; bucket 0 is the bare queue name.
    pub fn queue_key(&self, queue: &str, priority: u8) -> Result<String, CeleryError> {
        if priority > 9 {
            return Err(CeleryError::Priority(priority));
        }
        let bucket = self
            .priority_steps
            .iter()
            .copied()
            .filter(|step| *step <= priority)
            .max()
            .unwrap_or(0);
        Ok(if bucket == 0 {
            format!("{}{queue}", self.global_keyprefix)
        } else {
            format!("{}{queue}{}{bucket}", self.global_keyprefix, self.separator)
        })
    }
}

/// One task to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The registered task name, e.g. `ccat_workflow_manager.tasks.submit_run`.
    pub name: String,
    /// The task id (a UUID); also the root id and correlation id.
    pub id: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub queue: String,
    /// 0 (highest) to 9.
    pub priority: u8,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// Hard and soft time limits in seconds.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
}

impl Task {
    /// A task with a fresh id, priority 0 and no ETA, expiry or time limits.
    pub fn new(name: &str, queue: &str, args: Vec<Value>) -> Task {
        Task {
            name: name.to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            args,
            kwargs: Map::new(),
            queue: queue.to_owned(),
            priority: 0,
            eta: None,
            expires: None,
            time_limit: None,
            soft_time_limit: None,
        }
    }
}

fn iso(t: Option<DateTime<Utc>>) -> Value {
    // With the offset: a naive time is read as the worker's local time.
    t.map_or(Value::Null, |t| {
        Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, false))
    })
}

/// The protocol-2 message for `task`, sent by `origin` (`name@host`), with a fresh
/// delivery tag.
pub fn envelope(task: &Task, origin: &str) -> Value {
    let body = json!([
        task.args,
        task.kwargs,
        {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
    ]);
    let body = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    json!({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task.name,
            "id": task.id,
            "shadow": null,
            "eta": iso(task.eta),
            "expires": iso(task.expires),
            "group": null,
            "group_index": null,
            "retries": 0,
            // [hard, soft], as celery's amqp.py builds it.
            "timelimit": [task.time_limit, task.soft_time_limit],
            "root_id": task.id,
            "parent_id": null,
            "argsrepr": py_repr(&Value::Array(task.args.clone())),
            "kwargsrepr": py_repr(&Value::Object(task.kwargs.clone())),
            "origin": origin,
            "ignore_result": null,
            "replaced_task_nesting": 0,
            "stamped_headers": null,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task.id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": task.queue},
            "priority": task.priority,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
}

/// The Python `repr` of a JSON value, as Celery shows arguments in its logs.
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        // A list, as `send_task(args=[…])` shows it.
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// A string as Celery's `saferepr` writes it: always in single quotes.
fn py_str(s: &str) -> String {
    let quote = '\'';
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Publishes tasks to a Redis broker.
pub struct Producer {
    conn: redis::aio::ConnectionManager,
    options: BrokerOptions,
    origin: String,
}

impl Producer {
    pub async fn connect(
        client: redis::Client,
        options: BrokerOptions,
    ) -> Result<Self, CeleryError> {
        // redis-rs waits 500 ms for a reply by default: too little for a batch of a
        // thousand messages on a loaded broker, and a timed-out batch is sent again.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(30)))
            // A broker that is away is retried by the next cycle, not here.
            .set_number_of_retries(1);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|source| CeleryError::Publish { count: 0, source })?;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Ok(Producer {
            conn,
            options,
            origin: format!("{}@{host}", std::process::id()),
        })
    }

    /// Pushes every task in one pipelined round trip (each `LPUSH` onto its queue's
    /// priority list; workers `BRPOP`, so this keeps first-in first-out order).
    pub async fn publish(&mut self, tasks: &[Task]) -> Result<(), CeleryError> {
        let mut pipe = redis::pipe();
        for task in tasks {
            let key = self.options.queue_key(&task.queue, task.priority)?;
            pipe.lpush(key, envelope(task, &self.origin).to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn)
            .await
            .map_err(|source| CeleryError::Publish {
                count: tasks.len(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_to_the_largest_bucket_not_above_them() {
        let o = BrokerOptions::default();
        assert_eq!(o.queue_key("q", 0).unwrap(), "q");
        assert_eq!(o.queue_key("q", 2).unwrap(), "q");
        assert_eq!(o.queue_key("q", 3).unwrap(), "q\x06\x163");
        assert_eq!(o.queue_key("q", 8).unwrap(), "q\x06\x166");
        assert_eq!(o.queue_key("q", 9).unwrap(), "q\x06\x169");
        assert!(matches!(
            o.queue_key("q", 10),
            Err(CeleryError::Priority(10))
        ));
        let prefixed = BrokerOptions {
            global_keyprefix: "ccat:".into(),
            ..Default::default()
        };
        assert_eq!(prefixed.queue_key("q", 6).unwrap(), "ccat:q\x06\x166");
    }

    #[test]
    fn the_envelope_carries_every_field_a_worker_needs() {
        let mut task = Task::new("tasks.add", QUEUE_HPC, vec![json!(1), json!("a'b")]);
        task.kwargs.insert("force".into(), json!(true));
        task.priority = 6;
        task.eta = Some(
            DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
                .unwrap()
                .into(),
        );
        task.time_limit = Some(60.0);
        let e = envelope(&task, "1@host");
        let p = &e["properties"];
        assert!(p["delivery_tag"].as_str().is_some_and(|t| t.len() == 36));
        assert_eq!(
            p["delivery_info"],
            json!({"exchange": "", "routing_key": "workflow.hpc"})
        );
        assert_eq!(p["body_encoding"], "base64");
        assert_eq!(p["priority"], 6);
        assert_eq!(p["correlation_id"], json!(task.id));
        let h = &e["headers"];
        assert_eq!(h["task"], "tasks.add");
        assert_eq!(h["root_id"], json!(task.id));
        assert_eq!(h["timelimit"], json!([60.0, null]));
        assert_eq!(h["eta"], "2026-11-28T10:00:00.000000+00:00");
        assert_eq!(h["argsrepr"], "[1, 'a\\'b']");
        assert_eq!(h["kwargsrepr"], "{'force': True}");
        let body = base64::engine::general_purpose::STANDARD
            .decode(e["body"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body[0], json!([1, "a'b"]));
        assert_eq!(body[1], json!({"force": true}));
        assert_eq!(body[2]["chord"], Value::Null);
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!([])), "[]");
        assert_eq!(py_repr(&json!([5])), "[5]");
        assert_eq!(py_repr(&json!([null, false, 1.5])), "[None, False, 1.5]");
        assert_eq!(py_repr(&json!("it's \"x\"")), "'it\\'s \"x\"'");
        assert_eq!(py_repr(&json!("a\nb")), "'a\\nb'");
    }
}

//! Health: each manager keeps `health:workflow:<name>` = `alive` in Redis (TTL 90 s,
//! refreshed every 30 s, the convention of data-transfer's HealthCheck) and, beside it,
//! a status record that says more: host, pid, version, last cycle, last error.
//!
//! The beat runs on its own task, so a long cycle never lets the key expire; a loop that
//! is stuck is caught by the status record instead (see [`assess`]). Redis being away
//! never stops a manager's database work: the beat logs the outage and tries again.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::config::RedisSettings;

/// Prefix of every health key, as data-transfer writes them: `health:{type}:{name}`.
pub const KEY_PREFIX: &str = "health:workflow:";
/// Suffix of the status record beside a health key.
const STATUS_SUFFIX: &str = ":status";
pub const TTL: Duration = Duration::from_secs(90);
pub const REFRESH: Duration = Duration::from_secs(30);
/// How long a status record outlives its service, so that a dead one shows as down.
const STATUS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the record of a clean stop is kept ("stopped at T"), then forgotten: a
/// worker per pod would otherwise leave one more entry with every restart.
const STOPPED_TTL: Duration = Duration::from_secs(24 * 3600);

fn yes() -> bool {
    true
}

/// What a manager reports about its loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_cycle_start: Option<DateTime<Utc>>,
    pub last_cycle_end: Option<DateTime<Utc>>,
    pub last_cycle_seconds: Option<f64>,
    /// Items handled in the last cycle (runs created, claimed, collected…).
    pub last_cycle_items: u64,
    pub last_error: Option<String>,
    pub cycle_in_progress: bool,
    /// A cycle running, or none finished, for longer than this means the loop is stuck.
    pub stale_after_seconds: f64,
    /// Whether a service with no cycle finished for that long is stale: true for the
    /// manager loops, false for services that may rightly sit idle (a Celery worker).
    #[serde(default = "yes")]
    pub stale_when_idle: bool,
    /// Set when the service stopped cleanly (its key removed on purpose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The handle a manager loop reports its cycles through; cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthReporter {
    status: Arc<Mutex<ServiceStatus>>,
}

impl HealthReporter {
    pub fn new(service: &str, stale_after: Duration) -> Self {
        let now = Utc::now();
        HealthReporter {
            status: Arc::new(Mutex::new(ServiceStatus {
                service: service.to_owned(),
                host: gethostname::gethostname().to_string_lossy().into_owned(),
                pid: std::process::id(),
                version: crate::VERSION.to_owned(),
                started_at: now,
                last_cycle_start: None,
                last_cycle_end: None,
                last_cycle_seconds: None,
                last_cycle_items: 0,
                last_error: None,
                cycle_in_progress: false,
                stale_after_seconds: stale_after.as_secs_f64(),
                stale_when_idle: true,
                stopped_at: None,
                updated_at: now,
            })),
        }
    }

    /// The stale threshold for a loop polling every `interval`: ten missed cycles, and
    /// never less than five minutes, so that one slow cycle is not an alarm.
    pub fn stale_after_for(interval: Duration) -> Duration {
        (interval * 10).max(Duration::from_secs(300))
    }

    pub fn cycle_started(&self) {
        let mut s = self.lock();
        s.last_cycle_start = Some(Utc::now());
        s.cycle_in_progress = true;
    }

    pub fn cycle_finished(&self, items: u64, error: Option<String>) {
        let mut s = self.lock();
        let now = Utc::now();
        s.last_cycle_end = Some(now);
        s.last_cycle_seconds = s
            .last_cycle_start
            .map(|start| (now - start).num_milliseconds() as f64 / 1000.0);
        s.last_cycle_items = items;
        if error.is_some() {
            s.last_error = error;
        }
        s.cycle_in_progress = false;
    }

    pub fn snapshot(&self) -> ServiceStatus {
        let mut s = self.lock().clone();
        s.updated_at = Utc::now();
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServiceStatus> {
        // A panic elsewhere while holding the lock leaves plain data; keep using it.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The loops of this process whose heartbeat runs, for `/healthz`.
static LOCAL: Mutex<Vec<Weak<Mutex<ServiceStatus>>>> = Mutex::new(Vec::new());

fn local_registry() -> std::sync::MutexGuard<'static, Vec<Weak<Mutex<ServiceStatus>>>> {
    LOCAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The status of every loop of this process that is running now.
pub fn local_services() -> Vec<ServiceStatus> {
    let mut registry = local_registry();
    registry.retain(|w| w.strong_count() > 0);
    registry
        .iter()
        .filter_map(Weak::upgrade)
        .map(|s| HealthReporter { status: s }.snapshot())
        .collect()
}

/// A Redis client for the configured server; the password never enters a URL or a log.
pub fn redis_client(settings: &RedisSettings) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let mut info = (settings.host.clone(), settings.port).into_connection_info()?;
    if !settings.password.expose().is_empty() {
        let redis = info
            .redis_settings()
            .clone()
            .set_password(settings.password.expose());
        info = info.set_redis_settings(redis);
    }
    redis::Client::open(info)
}

/// Where health keys live: the standard prefix, or a private one (tests).
#[derive(Debug, Clone)]
pub struct HealthKeys {
    pub prefix: String,
}

impl Default for HealthKeys {
    fn default() -> Self {
        HealthKeys {
            prefix: KEY_PREFIX.to_owned(),
        }
    }
}

impl HealthKeys {
    pub fn alive(&self, service: &str) -> String {
        format!("{}{service}", self.prefix)
    }
    pub fn status(&self, service: &str) -> String {
        format!("{}{service}{STATUS_SUFFIX}", self.prefix)
    }
}

/// Writes the health key and the status record once.
pub async fn beat(
    conn: &mut redis::aio::ConnectionManager,
    keys: &HealthKeys,
    status: &ServiceStatus,
) -> redis::RedisResult<()> {
    let record = serde_json::to_string(status).expect("status serialises");
    redis::pipe()
        .set_ex(keys.alive(&status.service), "alive", TTL.as_secs())
        .ignore()
        .set_ex(keys.status(&status.service), record, STATUS_TTL.as_secs())
        .ignore()
        .query_async(conn)
        .await
}

/// Removes the health key and records a clean stop (kept for [`STOPPED_TTL`]).
pub async fn stopped(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &HealthKeys,
    status: &ServiceStatus,
) -> redis::RedisResult<()> {
    let record = serde_json::to_string(status).expect("status serialises");
    redis::pipe()
        .del(keys.alive(&status.service))
        .ignore()
        .set_ex(keys.status(&status.service), record, STOPPED_TTL.as_secs())
        .ignore()
        .query_async(conn)
        .await
}

/// Keeps the heartbeat going every `refresh` until the task is aborted. A Redis outage is
/// logged once per beat interval, and the connection is re-established when Redis returns.
pub fn spawn_heartbeat(
    client: redis::Client,
    keys: HealthKeys,
    reporter: HealthReporter,
    refresh: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<redis::aio::ConnectionManager> = None;
        let mut ticker = tokio::time::interval(refresh);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down = false;
        loop {
            ticker.tick().await;
            if conn.is_none() {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(1);
                conn = client.get_connection_manager_with_config(config).await.ok();
            }
            let status = reporter.snapshot();
            let result = match conn.as_mut() {
                Some(c) => beat(c, &keys, &status).await,
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "cannot connect to Redis",
                ))),
            };
            match result {
                Ok(()) if down => {
                    tracing::info!(service = %status.service, "Redis reachable again; heartbeat resumed");
                    down = false;
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(service = %status.service, error = %e, "heartbeat not written: Redis unavailable");
                    down = true;
                }
            }
        }
    })
}

/// A manager's Redis heartbeat for as long as its loop runs.
pub struct ManagerHeartbeat {
    /// Where the loop reports its cycles.
    pub reporter: HealthReporter,
    task: Option<tokio::task::JoinHandle<()>>,
    client: Option<redis::Client>,
}

impl ManagerHeartbeat {
    /// Starts beating for `service`, whose loop polls every `interval`.
    pub fn start(redis: &RedisSettings, service: &str, interval: Duration) -> ManagerHeartbeat {
        let reporter = HealthReporter::new(service, HealthReporter::stale_after_for(interval));
        Self::start_with(redis, reporter)
    }

    /// The heartbeat of a service that may sit idle, such as a Celery worker: alive while
    /// the process runs, never stale for want of cycles. Needs a tokio runtime context.
    pub fn start_idle(redis: &RedisSettings, service: &str) -> ManagerHeartbeat {
        let reporter = HealthReporter::new(service, Duration::from_secs(3600));
        reporter.lock().stale_when_idle = false;
        Self::start_with(redis, reporter)
    }

    fn start_with(redis: &RedisSettings, reporter: HealthReporter) -> ManagerHeartbeat {
        let client = match redis_client(redis) {
            // No Redis configured (the demo): the loop runs without a heartbeat.
            _ if redis.host.is_empty() => None,
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "no heartbeat: invalid Redis settings");
                None
            }
        };
        let task = client.clone().map(|client| {
            spawn_heartbeat(client, HealthKeys::default(), reporter.clone(), REFRESH)
        });
        local_registry().push(Arc::downgrade(&reporter.status));
        ManagerHeartbeat {
            reporter,
            task,
            client,
        }
    }

    /// Stops beating, removes the health key and records the clean stop, so the service
    /// shows as stopped (not down) at once.
    pub async fn stop(self) {
        local_registry().retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.reporter.status)));
        if let Some(task) = self.task {
            task.abort();
        }
        if let Some(client) = self.client {
            let mut status = self.reporter.snapshot();
            status.stopped_at = Some(status.updated_at);
            status.cycle_in_progress = false;
            let written = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                stopped(&mut conn, &HealthKeys::default(), &status).await
            };
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(3), written).await {
                tracing::debug!(error = %e, "clean stop not recorded");
            }
        }
    }
}

/// A service's state as `ccat-wfm health` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Alive, and no cycle finished yet since it started.
    Starting,
    /// Stopped cleanly (its heartbeat removed on purpose) at this time.
    Stopped {
        at: DateTime<Utc>,
    },
    /// The health key expired: the process died or cannot reach Redis.
    Down,
    /// The key is alive but the loop is not making progress.
    Stale {
        reason: String,
    },
}

/// Judges a service from its key and status record.
pub fn assess(alive: bool, status: Option<&ServiceStatus>, now: DateTime<Utc>) -> Health {
    if !alive {
        return match status.and_then(|s| s.stopped_at) {
            Some(at) => Health::Stopped { at },
            None => Health::Down,
        };
    }
    let Some(s) = status else {
        // A key without a record (a data-transfer style service): alive is all we know.
        return Health::Healthy;
    };
    let seconds = |t: DateTime<Utc>| (now - t).num_milliseconds() as f64 / 1000.0;
    let limit = s.stale_after_seconds;
    if s.cycle_in_progress {
        if let Some(start) = s.last_cycle_start.filter(|t| seconds(*t) > limit) {
            return Health::Stale {
                reason: format!("a cycle has been running for {:.0} s", seconds(start)),
            };
        }
    } else if s.stale_when_idle {
        let since = s.last_cycle_end.unwrap_or(s.started_at);
        if seconds(since) > limit {
            return Health::Stale {
                reason: format!("no cycle finished for {:.0} s", seconds(since)),
            };
        }
    }
    if s.stale_when_idle && s.last_cycle_end.is_none() {
        return Health::Starting;
    }
    Health::Healthy
}

impl Health {
    /// Whether the service is as it should be: running (healthy or starting) or stopped
    /// on purpose; not down or stale.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Health::Down | Health::Stale { .. })
    }
}

/// One service in a health report.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceHealth {
    pub service: String,
    #[serde(flatten)]
    pub health: Health,
    pub status: Option<ServiceStatus>,
}

/// Every service with a health key or a status record under `keys.prefix`.
pub async fn report(
    client: &redis::Client,
    keys: &HealthKeys,
) -> redis::RedisResult<Vec<ServiceHealth>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut names = std::collections::BTreeSet::new();
    {
        let mut iter: redis::AsyncIter<String> =
            conn.scan_match(format!("{}*", keys.prefix)).await?;
        while let Some(key) = iter.next_item().await {
            let key = key?;
            let name = key.strip_prefix(&keys.prefix).unwrap_or(&key);
            names.insert(name.strip_suffix(STATUS_SUFFIX).unwrap_or(name).to_owned());
        }
    }
    let now = Utc::now();
    let mut services = Vec::with_capacity(names.len());
    for name in names {
        services.push(service_health(&mut conn, keys, &name, now).await?);
    }
    Ok(services)
}

/// The health of one named service (down when nothing is known of it).
pub async fn service(
    client: &redis::Client,
    keys: &HealthKeys,
    name: &str,
) -> redis::RedisResult<ServiceHealth> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    service_health(&mut conn, keys, name, Utc::now()).await
}

async fn service_health(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &HealthKeys,
    name: &str,
    now: DateTime<Utc>,
) -> redis::RedisResult<ServiceHealth> {
    let (alive, record): (Option<String>, Option<String>) = redis::pipe()
        .get(keys.alive(name))
        .get(keys.status(name))
        .query_async(conn)
        .await?;
    // A record that does not parse (another writer, an old version) is not fatal.
    let status = record.and_then(|r| serde_json::from_str::<ServiceStatus>(&r).ok());
    Ok(ServiceHealth {
        service: name.to_owned(),
        health: assess(alive.as_deref() == Some("alive"), status.as_ref(), now),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(in_progress: bool, start_ago: i64, end_ago: Option<i64>) -> ServiceStatus {
        let now = Utc::now();
        let mut s = HealthReporter::new("trigger-manager", Duration::from_secs(60)).snapshot();
        s.cycle_in_progress = in_progress;
        s.last_cycle_start = Some(now - chrono::Duration::seconds(start_ago));
        s.last_cycle_end = end_ago.map(|a| now - chrono::Duration::seconds(a));
        s
    }

    #[test]
    fn an_idle_worker_is_healthy_but_a_stuck_task_is_not() {
        let now = Utc::now();
        let mut idle = status(false, 100_000, Some(100_000));
        idle.stale_when_idle = false;
        assert_eq!(assess(true, Some(&idle), now), Health::Healthy);
        idle.cycle_in_progress = true;
        assert!(matches!(
            assess(true, Some(&idle), now),
            Health::Stale { .. }
        ));
        // Records written before the field existed read as the managers' default.
        let mut old = serde_json::to_value(status(false, 1, Some(1))).unwrap();
        old.as_object_mut().unwrap().remove("stale_when_idle");
        let old: ServiceStatus = serde_json::from_value(old).unwrap();
        assert!(old.stale_when_idle);
    }

    #[test]
    fn health_follows_key_and_progress() {
        let now = Utc::now();
        assert_eq!(assess(false, None, now), Health::Down);
        assert_eq!(assess(true, None, now), Health::Healthy);
        let fresh = HealthReporter::new("trigger-manager", Duration::from_secs(60)).snapshot();
        assert_eq!(assess(true, Some(&fresh), now), Health::Starting);
        let mut stopped = status(false, 10, Some(5));
        stopped.stopped_at = Some(now);
        assert_eq!(
            assess(false, Some(&stopped), now),
            Health::Stopped { at: now }
        );
        assert!(Health::Stopped { at: now }.is_ok() && Health::Starting.is_ok());
        assert!(!Health::Down.is_ok());
        assert_eq!(
            assess(true, Some(&status(false, 10, Some(5))), now),
            Health::Healthy
        );
        assert_eq!(
            assess(true, Some(&status(true, 30, Some(40))), now),
            Health::Healthy
        );
        assert!(
            matches!(assess(true, Some(&status(true, 120, Some(130))), now), Health::Stale { reason } if reason.contains("running"))
        );
        assert!(
            matches!(assess(true, Some(&status(false, 200, Some(190))), now), Health::Stale { reason } if reason.contains("no cycle"))
        );
        assert_eq!(
            assess(false, Some(&status(false, 10, Some(5))), now),
            Health::Down
        );
    }

    #[test]
    fn reporter_records_cycles() {
        let r = HealthReporter::new("result-manager", Duration::from_secs(300));
        r.cycle_started();
        assert!(r.snapshot().cycle_in_progress);
        r.cycle_finished(7, Some("boom".into()));
        r.cycle_started();
        r.cycle_finished(2, None);
        let s = r.snapshot();
        assert!(!s.cycle_in_progress);
        assert_eq!(s.last_cycle_items, 2);
        assert_eq!(
            s.last_error.as_deref(),
            Some("boom"),
            "the last error stays visible"
        );
        assert_eq!(s.pid, std::process::id());
        assert_eq!(
            HealthReporter::stale_after_for(Duration::from_secs(60)),
            Duration::from_secs(600)
        );
        assert_eq!(
            HealthReporter::stale_after_for(Duration::from_secs(1)),
            Duration::from_secs(300)
        );
    }
}

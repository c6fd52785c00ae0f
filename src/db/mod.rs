//! The database layer: connections, migrations, the schema check, and (in submodules)
//! every SQL statement of the product.
//!
//! PostgreSQL and SQLite are both first-class. Statements are written once with `$N`
//! placeholders, which both drivers accept; where the dialects differ (row locking, JSON
//! access) a submodule holds one text per dialect. `on_pool!` runs the same query builder
//! against whichever pool is in use, so each call site is monomorphised for both drivers.

pub mod changes;
pub mod definitions;
pub mod demo;
pub mod filter_sql;
pub mod lineage;
pub mod outbox;
pub mod pipelines;
pub mod runs;
pub mod schema;
#[cfg(feature = "bench")]
pub mod scratch;
#[cfg(feature = "bench")]
pub mod synthetic;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::config::DatabaseSettings;

static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
/// SQLite's migration files; migration 3 is generated (see [`sqlite_migrator`]).
static SQLITE_MIGRATION_FILES: Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite's migrations: the files, and migration 3, the change tracking generated from
/// the list of tracked tables ([`schema::sqlite_change_tracking_sql`]).
fn sqlite_migrator() -> &'static Migrator {
    static MIGRATOR: std::sync::OnceLock<Migrator> = std::sync::OnceLock::new();
    MIGRATOR.get_or_init(|| {
        use sqlx::SqlSafeStr;
        let generated = Migration::new(
            3,
            "change tracking".into(),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(schema::sqlite_change_tracking_sql()).into_sql_str(),
            false,
        );
        let migrations = SQLITE_MIGRATION_FILES
            .iter()
            .cloned()
            .chain(std::iter::once(generated))
            .collect();
        Migrator::with_migrations(migrations)
    })
}

/// Errors of the database layer. Connection errors name the target, never the password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("refusing the SQLite database {path}: {reason}")]
    SqliteUnsafe { path: String, reason: String },
    #[error("cannot create the SQLite directory {path}: {source}")]
    SqliteDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("applying migrations to {target} failed: {source}")]
    Migrate {
        target: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "{target}: {scheme:?} is not a database this product speaks: use a postgresql:// or \
         sqlite:// URL"
    )]
    UnknownScheme { target: String, scheme: String },
    #[error(
        "{target} has no deployment identity (table wfm_deployment): run `ccat-wfm db migrate`"
    )]
    NoDeployment { target: String },
    #[error("{what} failed: {}", plain(source))]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// A query error as an operator reads it: the server's message without its internal
/// source position, and, where a table or column is missing, what to run.
fn plain(error: &sqlx::Error) -> String {
    let sqlx::Error::Database(e) = error else {
        return error.to_string();
    };
    let message = e.message();
    // PostgreSQL: undefined_table, undefined_column, undefined_function; SQLite says
    // "no such table" / "no such column".
    let missing = matches!(e.code().as_deref(), Some("42P01" | "42703" | "42883"))
        || message.starts_with("no such table")
        || message.starts_with("no such column");
    if missing {
        format!(
            "{message} (the schema is not what this version needs: run `ccat-wfm db check`, \
             or `ccat-wfm db migrate` for a database of its own)"
        )
    } else {
        message.to_owned()
    }
}

impl DbError {
    /// Wraps a query error with what the query was for.
    pub fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
        move |source| DbError::Query { what, source }
    }
}

/// Which SQL dialect a [`Database`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A connection pool to the operations database.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the concrete pool, for either database.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Database::Postgres($pool) => $body,
            $crate::db::Database::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

impl Database {
    /// Opens a pool. A SQLite file (and its directory) is created when missing.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, DbError> {
        let target = settings.to_string();
        match settings {
            DatabaseSettings::Sqlite { path } => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| DbError::SqliteDir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                check_sqlite_file(path)?;
                let options = sqlite_options(SqliteConnectOptions::new().filename(path));
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .connect_with(options)
                    .await
                    .map_err(|source| DbError::Connect { target, source })?;
                Ok(Database::Sqlite(pool))
            }
            DatabaseSettings::Postgresql {
                host,
                port,
                user,
                password,
                database,
            } => {
                let mut options = PgConnectOptions::new()
                    .host(host)
                    .port(*port)
                    .username(user)
                    .database(database)
                    .application_name("ccat-workflow-manager");
                if !password.expose().is_empty() {
                    options = options.password(password.expose());
                }
                let pool = postgres_pool(options)
                    .await
                    .map_err(|source| DbError::Connect { target, source })?;
                Ok(Database::Postgres(pool))
            }
        }
    }

    /// Opens a pool from a URL (`postgres://…` or `sqlite://…`); used by tests and tools.
    pub async fn connect_url(url: &str) -> Result<Self, DbError> {
        let target = redact_url(url);
        let connect = |source| DbError::Connect {
            target: target.clone(),
            source,
        };
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        if !matches!(scheme, "sqlite" | "postgres" | "postgresql") {
            return Err(DbError::UnknownScheme {
                target,
                scheme: scheme.to_owned(),
            });
        }
        if scheme == "sqlite" {
            let options = SqliteConnectOptions::from_str(url).map_err(connect)?;
            check_sqlite_file(options.get_filename())?;
            let options = sqlite_options(options);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(options)
                .await
                .map_err(connect)?;
            Ok(Database::Sqlite(pool))
        } else {
            let options = PgConnectOptions::from_str(url).map_err(connect)?;
            let pool = postgres_pool(options).await.map_err(connect)?;
            Ok(Database::Postgres(pool))
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Database::Postgres(_) => Dialect::Postgres,
            Database::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Applies every migration of this dialect that the database has not seen yet.
    /// Returns the versions applied by this call.
    pub async fn migrate(&self) -> Result<Vec<i64>, DbError> {
        let before = self.applied_migrations().await?;
        let result = match self {
            Database::Postgres(pool) => PG_MIGRATOR.run(pool).await,
            Database::Sqlite(pool) => sqlite_migrator().run(pool).await,
        };
        result.map_err(|source| DbError::Migrate {
            target: self.describe(),
            source,
        })?;
        let after = self.applied_migrations().await?;
        Ok(after.difference(&before).copied().collect())
    }

    /// Versions recorded in sqlx's migration table (empty when it does not exist yet).
    async fn applied_migrations(&self) -> Result<BTreeSet<i64>, DbError> {
        let columns = self.columns().await?;
        if !columns.contains_key("_sqlx_migrations") {
            return Ok(BTreeSet::new());
        }
        let versions: Vec<i64> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await
        })
        .map_err(DbError::query("reading applied migrations"))?;
        Ok(versions.into_iter().collect())
    }

    /// Every table of the current schema with its columns.
    pub async fn columns(&self) -> Result<BTreeMap<String, BTreeSet<String>>, DbError> {
        let rows: Vec<(String, String)> =
            match self {
                Database::Postgres(pool) => sqlx::query_as(
                    "SELECT table_name::text, column_name::text FROM information_schema.columns \
                     WHERE table_schema = current_schema()",
                )
                .fetch_all(pool)
                .await,
                Database::Sqlite(pool) => {
                    sqlx::query_as(
                        "SELECT m.name, p.name FROM sqlite_master AS m \
                     JOIN pragma_table_info(m.name) AS p WHERE m.type = 'table'",
                    )
                    .fetch_all(pool)
                    .await
                }
            }
            .map_err(DbError::query("listing the schema's columns"))?;
        let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (table, column) in rows {
            tables.entry(table).or_default().insert(column);
        }
        Ok(tables)
    }

    /// Compares the database with [`schema::tables`] and the change-tracking triggers:
    /// what the product needs and lacks.
    pub async fn check(&self) -> Result<SchemaReport, DbError> {
        let present = self.columns().await?;
        let mut report = SchemaReport::compare(&schema::tables(self.dialect()), &present);
        let (functions, triggers) = self.change_tracking_present().await?;
        if self.dialect() == Dialect::Postgres {
            report.missing_functions = schema::CHANGE_TRACKING_FUNCTIONS
                .iter()
                .filter(|f| !functions.contains(**f))
                .map(|f| (*f).to_owned())
                .collect();
        }
        report.missing_triggers = schema::change_tracking_triggers(self.dialect())
            .into_iter()
            .filter(|t| !triggers.contains(t))
            .collect();
        Ok(report)
    }

    /// The functions and triggers of the current schema, by name.
    async fn change_tracking_present(
        &self,
    ) -> Result<(BTreeSet<String>, BTreeSet<String>), DbError> {
        let what = DbError::query("listing the schema's triggers");
        match self {
            Database::Postgres(pool) => {
                let functions: Vec<String> = sqlx::query_scalar(
                    "SELECT p.proname::text FROM pg_proc p \
                     JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname = current_schema()",
                )
                .fetch_all(pool)
                .await
                .map_err(DbError::query("listing the schema's functions"))?;
                let triggers: Vec<String> = sqlx::query_scalar(
                    "SELECT t.tgname::text FROM pg_trigger t \
                     JOIN pg_class c ON c.oid = t.tgrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND NOT t.tgisinternal AND t.tgenabled <> 'D'",
                )
                .fetch_all(pool)
                .await
                .map_err(what)?;
                Ok((
                    functions.into_iter().collect(),
                    triggers.into_iter().collect(),
                ))
            }
            Database::Sqlite(pool) => {
                let triggers: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'trigger'")
                        .fetch_all(pool)
                        .await
                        .map_err(what)?;
                Ok((BTreeSet::new(), triggers.into_iter().collect()))
            }
        }
    }

    /// This deployment's random identity, made once by `db migrate` (wfm_deployment).
    /// Job tags carry it: a database re-created under the same name, or a second
    /// deployment on the same server, gets another one.
    pub async fn deployment_id(&self) -> Result<String, DbError> {
        let id: Option<String> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT deployment_id FROM wfm_deployment")
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.message().contains("wfm_deployment") => {
                DbError::NoDeployment {
                    target: self.describe(),
                }
            }
            _ => DbError::Query {
                what: "reading the deployment identity",
                source: e,
            },
        })?;
        id.filter(|id| !id.is_empty())
            .ok_or_else(|| DbError::NoDeployment {
                target: self.describe(),
            })
    }

    /// A description of the target for messages: kind and location, no secrets.
    pub fn describe(&self) -> String {
        match self {
            Database::Postgres(pool) => {
                let o = pool.connect_options();
                format!(
                    "postgresql://{}@{}:{}/{}",
                    o.get_username(),
                    o.get_host(),
                    o.get_port(),
                    o.get_database().unwrap_or("")
                )
            }
            Database::Sqlite(pool) => {
                format!(
                    "sqlite://{}",
                    pool.connect_options().get_filename().display()
                )
            }
        }
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}

/// A PostgreSQL pool. One direct connection first: the pool retries a refused
/// connection until its acquire timeout and then reports only the timeout, while an
/// operator starting a manager wants the real reason (refused, authentication) at once.
/// Once running, the pool's retries ride out a database restart.
async fn postgres_pool(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    use sqlx::{ConnectOptions, Connection};
    options.connect().await?.close().await?;
    PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
}

/// The connection settings every SQLite connection of the product uses.
fn sqlite_options(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .create_if_missing(true)
        .foreign_keys(true)
        // WAL lets the managers read while one of them writes.
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30))
        // LIKE is case-sensitive on PostgreSQL; make SQLite agree.
        .pragma("case_sensitive_like", "ON")
}

/// What `db check` found missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchemaReport {
    pub missing_tables: Vec<String>,
    /// `(table, column)` for tables that exist but lack a column.
    pub missing_columns: Vec<(String, String)>,
    /// Change-tracking functions and triggers that are not there (`db
    /// change-tracking-sql` prints them): without them the trigger-manager never sees
    /// what is written to their tables.
    pub missing_functions: Vec<String>,
    pub missing_triggers: Vec<String>,
}

impl SchemaReport {
    pub fn compare(needed: &[schema::Table], present: &BTreeMap<String, BTreeSet<String>>) -> Self {
        let mut report = SchemaReport::default();
        for table in needed {
            match present.get(table.name) {
                None => report.missing_tables.push(table.name.to_owned()),
                Some(columns) => report.missing_columns.extend(
                    table
                        .columns
                        .iter()
                        .filter(|c| !columns.contains(**c))
                        .map(|c| (table.name.to_owned(), (*c).to_owned())),
                ),
            }
        }
        report
    }

    pub fn is_complete(&self) -> bool {
        self.missing_tables.is_empty()
            && self.missing_columns.is_empty()
            && self.missing_functions.is_empty()
            && self.missing_triggers.is_empty()
    }
}

/// The database holds the commands the managers run: an existing SQLite file that
/// another user owns or anyone may write (the default lives in `/tmp`, where anyone can
/// create it first) is refused.
fn check_sqlite_file(path: &std::path::Path) -> Result<(), DbError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // created by us
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let reason = if meta.uid() != me {
        format!("it belongs to another user (uid {})", meta.uid())
    } else if meta.mode() & 0o002 != 0 {
        "anyone may write it (chmod o-w)".to_owned()
    } else {
        return Ok(());
    };
    Err(DbError::SqliteUnsafe {
        path: path.display().to_string(),
        reason,
    })
}

/// Statuses in which a run counts against its pipeline's `max_active_runs`.
const ACTIVE: &str = "('STAGING_DATA', 'SUBMITTED', 'RUNNING', 'COLLECTING_RESULTS')";

/// Query text with `{ids}` replaced by the dialect's expansion of the JSON list of ids
/// bound at `$1`. Only this constant fragment is spliced in, never a value.
pub(crate) fn with_ids(dialect: Dialect, text: &str) -> sqlx::AssertSqlSafe<String> {
    let ids = match dialect {
        Dialect::Postgres => {
            "(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text($1::jsonb))"
        }
        Dialect::Sqlite => "(SELECT value FROM json_each($1))",
    };
    sqlx::AssertSqlSafe(text.replace("{ids}", ids).replace("{active}", ACTIVE))
}

/// `url` with its database replaced by `database` (query parameters kept).
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{database}?{q}"),
        None => format!("{root}/{database}"),
    }
}

/// Drops the password from a database URL before it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    // Credentials end at the last '@' (a password may hold '/' or '@' when not escaped).
    let mut out = format!("{scheme}://");
    match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            out.push_str(user);
            out.push_str(&rest[at..]);
        }
        None => out.push_str(rest),
    }
    // sqlx also takes the password as a query parameter.
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_world_writable_sqlite_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.sqlite");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let url = format!("sqlite://{}", path.display());
        let err = Database::connect_url(&url).await.unwrap_err().to_string();
        assert!(err.contains("anyone may write it"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        Database::connect_url(&url).await.unwrap();
    }

    #[test]
    fn redacts_passwords_from_urls() {
        assert_eq!(
            redact_url("postgres://wm:s3cr%40t@db:5432/ops"),
            "postgres://wm@db:5432/ops"
        );
        assert_eq!(redact_url("postgres://wm@db/ops"), "postgres://wm@db/ops");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        assert_eq!(
            redact_url("postgres://wm:pa/ss@db/ops"),
            "postgres://wm@db/ops"
        );
        assert_eq!(
            redact_url("postgres://db/ops?user=wm&password=s3cret&sslmode=require"),
            "postgres://db/ops?user=wm&password=***&sslmode=require"
        );
    }

    #[test]
    fn report_names_missing_tables_and_columns() {
        let needed = [
            schema::Table {
                name: "a",
                columns: &["id", "x"],
            },
            schema::Table {
                name: "b",
                columns: &["id"],
            },
        ];
        let present = BTreeMap::from([("a".to_owned(), BTreeSet::from(["id".to_owned()]))]);
        let report = SchemaReport::compare(&needed, &present);
        assert_eq!(report.missing_tables, vec!["b"]);
        assert_eq!(report.missing_columns, vec![("a".into(), "x".into())]);
        assert!(!report.is_complete());
    }
}

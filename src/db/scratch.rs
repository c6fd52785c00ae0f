//! Scratch PostgreSQL databases for the benchmarks: created fresh from an
//! administrative URL, dropped afterwards.

use sqlx::Connection;

use super::{DbError, redact_url, with_database};

fn checked(name: &str) -> &str {
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "scratch database names are [a-z0-9_]"
    );
    name
}

/// Runs one administrative statement on a connection of its own.
async fn administer(admin_url: &str, sql: String, what: &'static str) -> Result<(), DbError> {
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|source| DbError::Connect {
            target: redact_url(admin_url),
            source,
        })?;
    // Only ever a statement naming a database checked to be [a-z0-9_].
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await
        .map_err(DbError::query(what))?;
    admin.close().await.ok();
    Ok(())
}

/// Drops (if present) and creates database `name`; returns its URL.
pub async fn recreate(admin_url: &str, name: &str) -> Result<String, DbError> {
    let name = checked(name);
    drop(admin_url, name).await?;
    let sql = format!("CREATE DATABASE \"{name}\"");
    administer(admin_url, sql, "creating a scratch database").await?;
    Ok(with_database(admin_url, name))
}

/// Drops database `name` if it exists, ending its sessions.
pub async fn drop(admin_url: &str, name: &str) -> Result<(), DbError> {
    let name = checked(name);
    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    administer(admin_url, sql, "dropping a scratch database").await
}

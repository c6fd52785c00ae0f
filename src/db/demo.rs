//! The small archive `ccat-wfm demo` seeds into its SQLite database: real files behind
//! every package (the demo writes them; this module records them).

use super::{Database, DbError, on_pool};

/// The small archive `ccat-wfm demo` seeds: real files behind every package.
#[derive(Debug, Clone)]
pub struct DemoArchive {
    /// `base_path` of the processing location (the pipeline base directory).
    pub processing_base: String,
    /// `base_path` of the archive location holding the packages' files.
    pub archive_base: String,
    /// Source names; source `i` (from 1) is observed by observation unit `i`.
    pub sources: Vec<String>,
    /// Scans as (scan id, observation unit id, start time).
    pub scans: Vec<(i64, i64, chrono::DateTime<chrono::Utc>)>,
    pub packages: Vec<DemoPackage>,
}

/// One raw data package of the demo archive and its file.
#[derive(Debug, Clone)]
pub struct DemoPackage {
    pub id: i64,
    pub name: String,
    pub scan_id: i64,
    /// 1: CHAI LFA, 2: CHAI HFA.
    pub module_id: i64,
    pub full_path: String,
    pub size_bytes: i64,
    pub checksum: String,
}

/// Locations, instrument and modules of the demo archive.
const DEMO_FIXED_ROWS: &str = "
INSERT INTO instrument (id, name) VALUES (1, 'CHAI');
INSERT INTO instrument_module (id, name, instrument_id) VALUES (1, 'LFA', 1), (2, 'HFA', 1);
INSERT INTO line (id, name, rest_frequency_ghz) VALUES (1, 'CO43', 461.04);
";

impl Database {
    /// Seeds the demo archive into a migrated database, in one transaction, unless it
    /// holds raw data packages already; returns whether it seeded.
    pub async fn seed_demo_archive(&self, archive: &DemoArchive) -> Result<bool, DbError> {
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let (packages,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM raw_data_package")
                .fetch_one(&mut *tx)
                .await?;
            if packages > 0 {
                return Ok(false);
            }
            sqlx::raw_sql(DEMO_FIXED_ROWS).execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO data_location (id, name, location_type, base_path) VALUES \
                 (1, 'demo-processing', 'PROCESSING', $1), (2, 'demo-archive', 'LONG_TERM_ARCHIVE', $2)",
            )
            .bind(&archive.processing_base)
            .bind(&archive.archive_base)
            .execute(&mut *tx)
            .await?;
            for (i, name) in archive.sources.iter().enumerate() {
                let id = i as i64 + 1;
                sqlx::query("INSERT INTO source (id, name) VALUES ($1, $2)")
                    .bind(id)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO obs_unit (id, name, source_id, line_id) VALUES ($1, $2, $1, 1)",
                )
                .bind(id)
                .bind(format!("{name}-CO43"))
                .execute(&mut *tx)
                .await?;
            }
            for (scan, obs_unit, start) in &archive.scans {
                sqlx::query(
                    "INSERT INTO executed_obs_unit (id, obs_unit_id, start_time, end_time) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(scan)
                .bind(obs_unit)
                .bind(start)
                .bind(*start + chrono::Duration::minutes(20))
                .execute(&mut *tx)
                .await?;
            }
            for p in &archive.packages {
                sqlx::query(
                    "INSERT INTO raw_data_package (id, name, executed_obs_unit_id, \
                     instrument_module_id, state, relative_path, size_bytes, checksum, metadata) \
                     VALUES ($1, $2, $3, $4, 'ARCHIVED', $5, $6, $7, $8)",
                )
                .bind(p.id)
                .bind(&p.name)
                .bind(p.scan_id)
                .bind(p.module_id)
                .bind(format!("{}.spec", p.name))
                .bind(p.size_bytes)
                .bind(&p.checksum)
                .bind(sqlx::types::Json(serde_json::json!({"quality": {"ok": true}})))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path, status) \
                     VALUES (2, $1, $2, 'PRESENT')",
                )
                .bind(p.id)
                .bind(&p.full_path)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        }.await)
        .map_err(DbError::query("seeding the demo archive"))
    }
}

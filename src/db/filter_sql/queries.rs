//! Running the filter engine's queries: the packages of selections, and the packages a
//! change touched.

use futures_util::TryStreamExt;
use sqlx::Row;

use super::*;
use crate::db::on_pool;

impl Database {
    /// The packages matching one selection, with their dimension values, ordered by id
    /// (the shared query, for one selection).
    pub async fn select_packages(
        &self,
        selection: &Selection<'_>,
    ) -> Result<Vec<PackageRow>, DbError> {
        let spec = SelectionSpec {
            rules: selection.rules,
            instrument_module_id: selection.instrument_module_id,
        };
        let shared = render_shared(
            &[spec],
            selection.group_by,
            None,
            selection.only_archived,
            self.dialect(),
        );
        let mut rows = Vec::new();
        self.stream_shared(shared, selection.group_by.len(), true, |id, dims, _| {
            rows.push(PackageRow {
                id,
                dimensions: dims.iter().map(|d| (*d).to_owned()).collect(),
            })
        })
        .await?;
        rows.sort_unstable_by_key(|r| r.id);
        Ok(rows)
    }

    /// Streams the archived packages of several selections, read in one pass, to
    /// `each(id, dimension values, matches)` where `matches[i]` says whether selection
    /// `i` holds the package; packages no selection holds are skipped. With
    /// `only_packages`, only those are read (an incremental re-selection). Returns how
    /// many packages were read.
    pub async fn for_each_shared(
        &self,
        selections: &[SelectionSpec<'_>],
        group_by: &[Dimension],
        only_packages: Option<&[i64]>,
        each: impl FnMut(i64, &[&str], &[bool]),
    ) -> Result<usize, DbError> {
        let shared = render_shared(selections, group_by, only_packages, true, self.dialect());
        self.stream_shared(shared, group_by.len(), only_packages.is_none(), each)
            .await
    }

    /// Runs a shared query and hands each package some selection holds to `each`, with
    /// which selections hold it.
    async fn stream_shared(
        &self,
        shared: SharedQuery,
        width: usize,
        bulk: bool,
        mut each: impl FnMut(i64, &[&str], &[bool]),
    ) -> Result<usize, DbError> {
        let mut matches = vec![false; shared.selection_conditions.len()];
        let per_selection = shared.selection_conditions;
        let masks = shared.conditions.div_ceil(MASK_BITS);
        self.stream(shared.query, width, masks, bulk, |id, dims, masks| {
            let holds = |c: &usize| masks[c / MASK_BITS] & (1 << (c % MASK_BITS)) != 0;
            for (m, mine) in matches.iter_mut().zip(&per_selection) {
                *m = mine.iter().all(holds);
            }
            if matches.contains(&true) {
                each(id, dims, &matches)
            }
        })
        .await
    }

    /// Runs a rendered package query and streams its rows: id, `width` dimension values
    /// and `masks` integers. `bulk` marks a read of a large share of the archive:
    /// PostgreSQL then plans it without nested loops, because its row estimates for JSON
    /// conditions are guesses, and a nested loop chosen on a guess of five rows costs
    /// minutes when the answer is a million.
    async fn stream(
        &self,
        rendered: RenderedQuery,
        width: usize,
        masks: usize,
        bulk: bool,
        mut each: impl FnMut(i64, &[&str], &[i64]),
    ) -> Result<usize, DbError> {
        // The text is built from registry identifiers and placeholders only.
        let sql = sqlx::AssertSqlSafe(rendered.sql);
        let mut count = 0;
        let mut mask_values = vec![0i64; masks];
        macro_rules! rows {
            ($rows:expr) => {{
                let mut rows = $rows;
                while let Some(row) = rows
                    .try_next()
                    .await
                    .map_err(DbError::query("selecting packages"))?
                {
                    let id: i64 = row
                        .try_get(0)
                        .map_err(DbError::query("reading a selected package"))?;
                    // No dimension list is longer than the seven dimensions there are.
                    let mut dims: [&str; 8] = [""; 8];
                    for i in 0..width {
                        let value: Option<&str> = row
                            .try_get(i + 1)
                            .map_err(DbError::query("reading a dimension value"))?;
                        dims[i] = value.unwrap_or_default();
                    }
                    for (m, value) in mask_values.iter_mut().enumerate() {
                        *value = row
                            .try_get(width + 1 + m)
                            .map_err(DbError::query("reading a selection mask"))?;
                    }
                    each(id, &dims[..width], &mask_values);
                    count += 1;
                }
            }};
        }
        match self {
            Database::Postgres(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(DbError::query("selecting packages"))?;
                if bulk {
                    sqlx::query("SET LOCAL enable_nestloop = off")
                        .execute(&mut *tx)
                        .await
                        .map_err(DbError::query("planning a bulk selection"))?;
                }
                let mut q = sqlx::query(sql);
                for b in rendered.binds {
                    q = match b {
                        Bind::Text(s) => q.bind(s),
                        Bind::Int(i) => q.bind(i),
                        Bind::Float(f) => q.bind(f),
                        Bind::Timestamp(t) => q.bind(t),
                        Bind::TextArray(a) => q.bind(a),
                        Bind::IntArray(a) => q.bind(a),
                    };
                }
                rows!(q.fetch(&mut *tx));
                tx.rollback()
                    .await
                    .map_err(DbError::query("selecting packages"))?;
            }
            Database::Sqlite(pool) => {
                let mut q = sqlx::query(sql);
                for b in rendered.binds {
                    q = match b {
                        Bind::Text(s) => q.bind(s),
                        Bind::Int(i) => q.bind(i),
                        Bind::Float(f) => q.bind(f),
                        // Text SQLite's date functions read, in UTC.
                        Bind::Timestamp(t) => {
                            q.bind(t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string())
                        }
                        Bind::TextArray(_) | Bind::IntArray(_) => {
                            unreachable!("the SQLite renderer writes lists as JSON text")
                        }
                    };
                }
                rows!(q.fetch(pool));
            }
        }
        Ok(count)
    }

    /// Packages whose selection may have changed since `horizon`: written themselves, or
    /// joined (by the registry's paths) to a row of another filterable table written since.
    /// Only the tables named in `tables` are looked at (those with newer marks).
    pub async fn changed_packages(
        &self,
        horizon: i64,
        tables: &[&str],
    ) -> Result<Vec<i64>, DbError> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let sql = sqlx::AssertSqlSafe(changed_packages_sql(tables));
        let mut ids: Vec<i64> = on_pool!(self, pool => {
            sqlx::query_scalar(sql).bind(horizon).fetch_all(pool).await
        })
        .map_err(DbError::query("finding changed packages"))?;
        ids.sort_unstable();
        Ok(ids)
    }
}

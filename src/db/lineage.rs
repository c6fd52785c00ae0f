//! Lineage, both ways (SPEC §7): from a data product down through the runs that made
//! it (across steps, through upstream products) to the raw data packages, and from a raw
//! data package up to every product derived from it. One recursive query each.

use serde::Serialize;

use super::{Database, DbError, on_pool};

/// A run in a product's chain, with what it read.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct LineageRun {
    pub run_id: i64,
    pub pipeline: String,
    pub step: String,
    pub sub_group_key: String,
    pub status: String,
    /// JSON list of the raw data package ids the run read.
    #[serde(skip)]
    pub raw_inputs_json: String,
    /// JSON list of the upstream data product ids the run read.
    #[serde(skip)]
    pub product_inputs_json: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct LineagePackage {
    pub id: i64,
    pub name: String,
}

/// A product with the run that made it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct LineageProduct {
    pub id: i64,
    pub name: String,
    pub product_type: String,
    pub relative_path: String,
    pub checksum: String,
    pub run_id: i64,
    pub pipeline: String,
    pub step: String,
    pub sub_group_key: String,
}

/// Where a product comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProductLineage {
    pub product: LineageProduct,
    /// Every run of the chain, the product's own first, each with its inputs.
    pub runs: Vec<RunInputs>,
    /// Every raw data package the chain read.
    pub raw_data_packages: Vec<LineagePackage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunInputs {
    #[serde(flatten)]
    pub run: LineageRun,
    pub raw_inputs: Vec<i64>,
    pub product_inputs: Vec<i64>,
}

const PRODUCT: &str = "\
    SELECT d.id, d.name, d.product_type, d.relative_path, d.checksum, \
           r.id AS run_id, p.name AS pipeline, s.name AS step, r.sub_group_key \
    FROM data_product d \
    JOIN executed_reduction_step r ON r.id = d.executed_reduction_step_id \
    JOIN reduction_step s ON s.id = r.reduction_step_id \
    JOIN pipeline p ON p.id = s.pipeline_id";

/// The runs below a product: its own, then those whose products it read, recursively.
const CHAIN: &str = "\
    WITH RECURSIVE chain(run_id, depth) AS ( \
        SELECT executed_reduction_step_id, 0 FROM data_product WHERE id = $1 \
        UNION \
        SELECT d.executed_reduction_step_id, c.depth + 1 FROM chain c \
        JOIN executed_reduction_step_product_input i ON i.executed_reduction_step_id = c.run_id \
        JOIN data_product d ON d.id = i.data_product_id \
        WHERE c.depth < 100 \
    )";

impl Database {
    /// A product's lineage, or None when there is no such product.
    pub async fn product_lineage(
        &self,
        product_id: i64,
    ) -> Result<Option<ProductLineage>, DbError> {
        let product_sql = sqlx::AssertSqlSafe(format!("{PRODUCT} WHERE d.id = $1"));
        let product: Option<LineageProduct> = on_pool!(self, pool => {
            sqlx::query_as(product_sql).bind(product_id).fetch_optional(pool).await
        })
        .map_err(DbError::query("reading a product"))?;
        let Some(product) = product else {
            return Ok(None);
        };
        // The id lists are aggregated as text by each dialect's own function.
        let (raw_agg, product_agg) = match self.dialect() {
            super::Dialect::Postgres => (
                "COALESCE((SELECT json_agg(raw_data_package_id ORDER BY raw_data_package_id)::text \
                   FROM executed_reduction_step_raw_input WHERE executed_reduction_step_id = r.id), '[]')",
                "COALESCE((SELECT json_agg(data_product_id ORDER BY data_product_id)::text \
                   FROM executed_reduction_step_product_input WHERE executed_reduction_step_id = r.id), '[]')",
            ),
            super::Dialect::Sqlite => (
                "COALESCE((SELECT json_group_array(raw_data_package_id) FROM \
                   (SELECT raw_data_package_id FROM executed_reduction_step_raw_input \
                    WHERE executed_reduction_step_id = r.id ORDER BY 1)), '[]')",
                "COALESCE((SELECT json_group_array(data_product_id) FROM \
                   (SELECT data_product_id FROM executed_reduction_step_product_input \
                    WHERE executed_reduction_step_id = r.id ORDER BY 1)), '[]')",
            ),
        };
        let runs_sql = sqlx::AssertSqlSafe(format!(
            "{CHAIN} SELECT r.id AS run_id, p.name AS pipeline, s.name AS step, r.sub_group_key, \
                     r.status, {raw_agg} AS raw_inputs_json, {product_agg} AS product_inputs_json \
             FROM (SELECT run_id, MIN(depth) AS depth FROM chain GROUP BY run_id) c \
             JOIN executed_reduction_step r ON r.id = c.run_id \
             JOIN reduction_step s ON s.id = r.reduction_step_id \
             JOIN pipeline p ON p.id = s.pipeline_id \
             ORDER BY c.depth, r.id"
        ));
        let runs: Vec<LineageRun> = on_pool!(self, pool => {
            sqlx::query_as(runs_sql).bind(product_id).fetch_all(pool).await
        })
        .map_err(DbError::query("walking a product's lineage"))?;
        let packages_sql = sqlx::AssertSqlSafe(format!(
            "{CHAIN} SELECT DISTINCT pk.id, pk.name FROM chain c \
             JOIN executed_reduction_step_raw_input i ON i.executed_reduction_step_id = c.run_id \
             JOIN raw_data_package pk ON pk.id = i.raw_data_package_id ORDER BY pk.id"
        ));
        let raw_data_packages: Vec<LineagePackage> = on_pool!(self, pool => {
            sqlx::query_as(packages_sql).bind(product_id).fetch_all(pool).await
        })
        .map_err(DbError::query("reading a product's raw data packages"))?;
        let ids = |text: &str| serde_json::from_str::<Vec<i64>>(text).unwrap_or_default();
        let runs = runs
            .into_iter()
            .map(|run| RunInputs {
                raw_inputs: ids(&run.raw_inputs_json),
                product_inputs: ids(&run.product_inputs_json),
                run,
            })
            .collect();
        Ok(Some(ProductLineage {
            product,
            runs,
            raw_data_packages,
        }))
    }

    /// Every product derived from a raw data package, directly or through upstream
    /// products, oldest first.
    pub async fn derived_products(&self, package_id: i64) -> Result<Vec<LineageProduct>, DbError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "WITH RECURSIVE runs(run_id, depth) AS ( \
                SELECT executed_reduction_step_id, 0 FROM executed_reduction_step_raw_input \
                WHERE raw_data_package_id = $1 \
                UNION \
                SELECT i.executed_reduction_step_id, r.depth + 1 FROM runs r \
                JOIN data_product d ON d.executed_reduction_step_id = r.run_id \
                JOIN executed_reduction_step_product_input i ON i.data_product_id = d.id \
                WHERE r.depth < 100 \
             ) {PRODUCT} WHERE r.id IN (SELECT run_id FROM runs) ORDER BY d.id"
        ));
        on_pool!(self, pool => {
            sqlx::query_as(sql).bind(package_id).fetch_all(pool).await
        })
        .map_err(DbError::query("finding products derived from a package"))
    }

    /// Every product of a pipeline's runs, by step order then id.
    pub async fn pipeline_products(&self, pipeline: &str) -> Result<Vec<LineageProduct>, DbError> {
        let sql = sqlx::AssertSqlSafe(format!("{PRODUCT} WHERE p.name = $1 ORDER BY s.id, d.id"));
        on_pool!(self, pool => {
            sqlx::query_as(sql).bind(pipeline).fetch_all(pool).await
        })
        .map_err(DbError::query("listing a pipeline's products"))
    }
}

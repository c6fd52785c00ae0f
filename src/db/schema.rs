//! The catalogue of every table and column the product reads or writes.
//!
//! Table and column names follow ops-db. This list is what `ccat-wfm db check` compares a
//! database against, so an ops-db schema that renames something shows up here first; a
//! test keeps it equal to what `migrations/` creates.

/// One table and the columns the product needs from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [&'static str],
}

/// Every table of the schema, in creation order.
pub const TABLES: &[Table] = &[
    Table {
        name: "instrument",
        columns: &["id", "name", "description", "change_mark"],
    },
    Table {
        name: "instrument_module",
        columns: &["id", "name", "instrument_id", "change_mark"],
    },
    Table {
        name: "source",
        columns: &["id", "name", "ra_deg", "dec_deg", "change_mark"],
    },
    Table {
        name: "line",
        columns: &["id", "name", "rest_frequency_ghz", "change_mark"],
    },
    Table {
        name: "obs_unit",
        columns: &["id", "name", "source_id", "line_id", "change_mark"],
    },
    Table {
        name: "executed_obs_unit",
        columns: &["id", "obs_unit_id", "start_time", "end_time", "change_mark"],
    },
    Table {
        name: "raw_data_package",
        columns: &[
            "id",
            "name",
            "executed_obs_unit_id",
            "instrument_module_id",
            "state",
            "relative_path",
            "size_bytes",
            "checksum",
            "metadata",
            "created_at",
            "updated_at",
            "change_mark",
        ],
    },
    Table {
        name: "data_location",
        columns: &["id", "name", "location_type", "base_path", "active"],
    },
    Table {
        name: "data_grouping",
        columns: &[
            "id",
            "name",
            "description",
            "filter_rules",
            "instrument_module_id",
            "created_at",
            "updated_at",
            "change_mark",
        ],
    },
    Table {
        name: "pipeline",
        columns: &[
            "id",
            "name",
            "description",
            "data_grouping_id",
            "processing_location_id",
            "trigger_type",
            "trigger_config",
            "enabled",
            "priority",
            "max_active_runs",
            "created_by_user_id",
            "created_at",
            "updated_at",
            "change_mark",
        ],
    },
    Table {
        name: "reduction_software",
        columns: &["id", "name", "description", "repository_url"],
    },
    Table {
        name: "reduction_software_version",
        columns: &[
            "id",
            "reduction_software_id",
            "version",
            "image_ref",
            "image_digest",
            "command",
            "default_cpu",
            "default_memory_gb",
            "default_time_hours",
            "deprecated",
            "created_at",
            "change_mark",
        ],
    },
    Table {
        name: "reduction_step",
        columns: &[
            "id",
            "pipeline_id",
            "name",
            "step_order",
            "reduction_software_id",
            "reduction_software_version_id",
            "version_policy",
            "group_by",
            "cooldown_seconds",
            "max_retries",
            "cpu",
            "memory_gb",
            "time_hours",
            "allow_empty_output",
            "created_at",
            "updated_at",
            "change_mark",
        ],
    },
    Table {
        name: "reduction_step_dependency",
        columns: &["reduction_step_id", "depends_on_step_id", "change_mark"],
    },
    Table {
        name: "reduction_step_config",
        columns: &[
            "id",
            "reduction_step_id",
            "parameters",
            "updated_at",
            "change_mark",
        ],
    },
    Table {
        name: "executed_reduction_step",
        columns: &[
            "id",
            "reduction_step_id",
            "sub_group_key",
            "sub_group",
            "fingerprint",
            "status",
            "reduction_software_version_id",
            "config_snapshot",
            "excluded_upstream",
            "hpc_backend",
            "hpc_job_id",
            "retry_count",
            "max_retries",
            "next_attempt_at",
            "lease_owner",
            "lease_expires_at",
            "exit_code",
            "wall_time_seconds",
            "cpu_hours",
            "peak_memory_gb",
            "error_message",
            "log_tail",
            "created_at",
            "updated_at",
            "submitted_at",
            "started_at",
            "finished_at",
            "change_mark",
        ],
    },
    Table {
        name: "executed_reduction_step_raw_input",
        columns: &["executed_reduction_step_id", "raw_data_package_id"],
    },
    Table {
        name: "data_product",
        columns: &[
            "id",
            "executed_reduction_step_id",
            "name",
            "product_type",
            "relative_path",
            "size_bytes",
            "checksum",
            "checksum_algorithm",
            "quality_metrics",
            "created_at",
        ],
    },
    Table {
        name: "executed_reduction_step_product_input",
        columns: &["executed_reduction_step_id", "data_product_id"],
    },
    Table {
        name: "physical_copy",
        columns: &[
            "id",
            "data_location_id",
            "raw_data_package_id",
            "data_product_id",
            "full_path",
            "status",
            "created_at",
        ],
    },
    Table {
        name: "staging_job",
        columns: &[
            "id",
            "destination_data_location_id",
            "executed_reduction_step_id",
            "status",
            "failure_error_message",
            "created_at",
            "updated_at",
        ],
    },
    Table {
        name: "staging_job_raw_data_package",
        columns: &["staging_job_id", "raw_data_package_id"],
    },
    Table {
        name: "trigger_request",
        columns: &[
            "id",
            "pipeline_id",
            "reduction_step_id",
            "sub_group_key",
            "force",
            "requested_by",
            "status",
            "message",
            "created_at",
            "processed_at",
            "change_mark",
        ],
    },
    Table {
        name: "pipeline_trigger_state",
        columns: &[
            "pipeline_id",
            "last_cron_tick",
            "last_evaluated_at",
            "change_mark",
        ],
    },
    Table {
        name: "change_tombstone",
        columns: &[
            "table_name",
            "row_id",
            "change_mark",
            "deleted_at",
            "reduction_step_id",
            "sub_group_key",
        ],
    },
    Table {
        name: "celery_outbox",
        columns: &[
            "id",
            "task_id",
            "task_name",
            "queue",
            "priority",
            "args",
            "kwargs",
            "created_at",
            "published_at",
            "attempts",
            "last_error",
            "processing_location_id",
        ],
    },
    Table {
        name: "wfm_deployment",
        columns: &["singleton", "deployment_id", "created_at"],
    },
];

/// Tables whose writes the trigger-manager follows through change marks
/// (`migrations/postgres/0003_change_tracking.sql`, [`sqlite_change_tracking_sql`]): each
/// needs its triggers, or the evaluation
/// silently never sees what is written there.
pub const TRACKED_TABLES: &[&str] = &[
    "instrument",
    "instrument_module",
    "source",
    "line",
    "obs_unit",
    "executed_obs_unit",
    "raw_data_package",
    "executed_reduction_step",
    "data_grouping",
    "pipeline",
    "reduction_step",
    "reduction_step_config",
    "reduction_step_dependency",
    "reduction_software_version",
    "trigger_request",
    "pipeline_trigger_state",
];

/// How many of [`TRACKED_TABLES`], from the first, have their change mark indexed: the
/// evaluation reads them row by row; of the small definition tables it only asks
/// whether anything changed.
const INDEXED_TRACKED_TABLES: usize = 8;

/// Tracked tables without an `id` column: their tombstones carry row id 0.
const TRACKED_WITHOUT_ID: &[&str] = &["reduction_step_dependency", "pipeline_trigger_state"];

/// SQLite's change tracking (migration 3), generated from [`TRACKED_TABLES`]: SQLite has
/// no procedural DDL to loop with, as the PostgreSQL migration does. Databases migrated
/// earlier recorded the checksum of this exact text (then a file), so it must not change;
/// the later migrations change what is needed.
pub fn sqlite_change_tracking_sql() -> String {
    let mut sql = String::from(
        "-- Change tracking for incremental trigger evaluation (see the PostgreSQL migration).
--
-- SQLite runs one writer at a time, so a counter is enough: every insert or update of a
-- tracked row takes the next value of change_clock as its change_mark, and a reader's
-- horizon is the clock's value + 1 read before it reads. Deletions leave a tombstone.

CREATE TABLE change_clock (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO change_clock (id, value) VALUES (1, 0);

CREATE TABLE change_tombstone (
    table_name  TEXT NOT NULL,
    row_id      INTEGER NOT NULL,
    change_mark INTEGER NOT NULL,
    deleted_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE INDEX ix_change_tombstone_change_mark ON change_tombstone (change_mark);
",
    );
    // Each write takes the clock's next value: insert, update (unless the update is the
    // trigger's own, which sets the mark), and delete (as a tombstone).
    let set_mark = |t: &str| {
        format!(
            "BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE {t} SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
"
        )
    };
    for (i, t) in TRACKED_TABLES.iter().enumerate() {
        sql += &format!("\nALTER TABLE {t} ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;\n");
        if i < INDEXED_TRACKED_TABLES {
            sql += &format!("CREATE INDEX ix_{t}_change_mark ON {t} (change_mark);\n");
        }
        sql += &format!("CREATE TRIGGER {t}_change_mark_insert AFTER INSERT ON {t}\n");
        sql += &set_mark(t);
        sql += &format!(
            "CREATE TRIGGER {t}_change_mark_update AFTER UPDATE ON {t}\n\
             WHEN NEW.change_mark IS OLD.change_mark\n"
        );
        sql += &set_mark(t);
        let row_id = if TRACKED_WITHOUT_ID.contains(t) {
            "0"
        } else {
            "OLD.id"
        };
        sql += &format!(
            "CREATE TRIGGER {t}_tombstone AFTER DELETE ON {t}
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('{t}', {row_id}, (SELECT value FROM change_clock));
END;
"
        );
    }
    sql
}

/// Tables whose change mark moves on an update only when the evaluation's columns change
/// (`0006_bookkeeping_is_no_change.sql`): they have an update trigger of their own.
const FILTERED_UPDATES: &[&str] = &["executed_reduction_step", "pipeline_trigger_state"];

/// The change-tracking functions (PostgreSQL only).
pub const CHANGE_TRACKING_FUNCTIONS: &[&str] = &[
    "ccat_set_change_mark",
    "ccat_record_delete",
    "ccat_record_run_delete",
];

/// Every change-tracking trigger of one database, by name.
pub fn change_tracking_triggers(dialect: super::Dialect) -> Vec<String> {
    let mut names = Vec::new();
    for table in TRACKED_TABLES {
        match dialect {
            super::Dialect::Postgres => {
                names.push(format!("{table}_change_mark"));
                if FILTERED_UPDATES.contains(table) {
                    names.push(format!("{table}_change_mark_update"));
                }
            }
            super::Dialect::Sqlite => {
                names.push(format!("{table}_change_mark_insert"));
                names.push(format!("{table}_change_mark_update"));
            }
        }
        names.push(format!("{table}_tombstone"));
    }
    names
}

/// The DDL that gives an existing PostgreSQL schema (ops-db's) the change tracking the
/// trigger-manager needs, for ops-db's maintainers to put in an Alembic migration.
pub const POSTGRES_CHANGE_TRACKING_SQL: &str = concat!(
    include_str!("../../migrations/postgres/0003_change_tracking.sql"),
    "\n",
    include_str!("../../migrations/postgres/0006_bookkeeping_is_no_change.sql"),
    "\n",
    include_str!("../../migrations/postgres/0007_run_tombstones.sql"),
);

/// Tables only the SQLite schema has: its change clock (PostgreSQL uses transaction ids).
pub const SQLITE_ONLY_TABLES: &[Table] = &[Table {
    name: "change_clock",
    columns: &["id", "value"],
}];

/// Every table of the schema on one database.
pub fn tables(dialect: super::Dialect) -> Vec<Table> {
    let mut tables = TABLES.to_vec();
    if dialect == super::Dialect::Sqlite {
        tables.extend_from_slice(SQLITE_ONLY_TABLES);
    }
    tables
}

#[cfg(test)]
mod tests {
    /// Generated SQLite change tracking: identical, byte for byte, to the migration file
    /// that databases created before it was generated have applied (sqlx refuses to run
    /// on a database whose applied migration's checksum differs).
    #[test]
    fn sqlite_change_tracking_is_the_migration_databases_applied() {
        let migration = super::super::sqlite_migrator()
            .iter()
            .find(|m| m.version == 3)
            .expect("migration 3 is among SQLite's");
        let hex: String = migration
            .checksum
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // SHA-384 of migrations/sqlite/0003_change_tracking.sql as it was.
        assert_eq!(
            hex,
            "a5282d71a21b7ca45ceda585c300e9f826c6707bab4989b1fcbff0122aad410665a906dbe0ed6560418b13928ada189d"
        );
    }
}

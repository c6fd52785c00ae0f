"""The managers' Python entry points against a real SQLite database, also after fork()."""

from __future__ import annotations

import os
import sqlite3

import pytest

from ccat_workflow_manager import DatabaseError, Settings, _core
from ccat_workflow_manager.config import make_settings
from ccat_workflow_manager.managers.trigger_manager import process_triggers

SEED = """
INSERT INTO instrument (id, name) VALUES (1, 'CHAI');
INSERT INTO instrument_module (id, name, instrument_id) VALUES (1, 'LFA', 1);
INSERT INTO source (id, name) VALUES (1, 'NGC253');
INSERT INTO obs_unit (id, name, source_id) VALUES (1, 'ou', 1);
INSERT INTO executed_obs_unit (id, obs_unit_id, start_time) VALUES (1, 1, '2026-01-10T23:30:00+00:00'),
                                                                   (2, 1, '2026-01-11T23:30:00+00:00');
INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state) VALUES
  (1, 'p1', 1, 1, 'ARCHIVED'), (2, 'p2', 2, 1, 'ARCHIVED');
INSERT INTO data_location (id, name, location_type) VALUES (1, 'proc', 'PROCESSING');
INSERT INTO data_grouping (id, name, filter_rules) VALUES (1, 'all', '[]');
INSERT INTO reduction_software (id, name) VALUES (1, 'calib');
INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref) VALUES (1, 1, '1.0.0', 'c:1');
INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id) VALUES (1, 'p', 1, 1);
INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id, group_by)
  VALUES (1, 1, 'calibrate', 1, 1, '["night"]');
"""


@pytest.fixture
def database(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith(("CCAT_WORKFLOW_MANAGER_", "CCAT_OPS_DB_")) or key.endswith("_FOR_DYNACONF"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ops.sqlite"
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_SQLITE_DATABASE", str(path))
    assert _core.migrate(Settings.load()) == [1, 2, 3]
    with sqlite3.connect(path) as conn:
        conn.executescript(SEED)
    return path


def test_process_triggers_creates_runs_once(database):
    preview = process_triggers(make_settings(), dry_run=True)
    assert [g["sub_group_key"] for g in preview["pipelines"][0]["gaps"]] == [
        "night=2026-01-10",
        "night=2026-01-11",
    ]
    report = process_triggers(make_settings())
    assert report["pipelines"][0]["created"] == 2
    assert process_triggers(make_settings())["pipelines"][0]["created"] == 0
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM executed_reduction_step").fetchone() == (2,)


def test_entry_points_work_in_a_forked_child(database):
    # The parent builds the runtime first, as a Celery master importing tasks would.
    process_triggers(make_settings(), dry_run=True)
    pid = os.fork()
    if pid == 0:  # child: must not hang on the parent's runtime
        try:
            report = process_triggers(make_settings())
            os._exit(0 if report["pipelines"][0]["created"] == 2 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_unusable_database_raises_database_error(database, monkeypatch):
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_SQLITE_DATABASE", "/proc/no-such-dir/ops.sqlite")
    with pytest.raises(DatabaseError, match="/proc/no-such-dir"):
        process_triggers(make_settings())

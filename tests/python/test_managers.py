"""The managers' Python entry points against a real SQLite database, also after fork()."""

from __future__ import annotations

import os
from pathlib import Path
import sqlite3

import pytest

from ccat_workflow_manager import DatabaseError, Settings, _core
from ccat_workflow_manager.config import make_settings
from ccat_workflow_manager.managers.result_manager import ResultManager, process_running_steps
from ccat_workflow_manager.managers.trigger_manager import TriggerManager, process_triggers
from ccat_workflow_manager.managers.workflow_manager import WorkflowManager, process_pending_runs

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
    assert _core.migrate(Settings.load()) == [1, 2, 3, 4, 5, 6, 7]
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


def test_a_trigger_manager_keeps_its_evaluator_between_cycles(database):
    manager = TriggerManager(make_settings())
    first = manager.cycle()
    assert first["pipelines"][0]["created"] == 2
    assert first["pipelines"][0]["mode"] == "full"
    # Its own runs are a change to look at once; then nothing is read but the marks.
    manager.cycle()
    quiet = manager.cycle()
    pipeline = quiet["pipelines"][0]
    assert pipeline["mode"] == "incremental", quiet
    assert (quiet["changed_packages"], quiet["changed_runs"], pipeline["sub_groups_evaluated"]) == (0, 0, 0)
    # A new package: only its sub-group is looked at.
    with sqlite3.connect(database) as conn:
        conn.executescript(
            "INSERT INTO executed_obs_unit (id, obs_unit_id, start_time) VALUES (3, 1, '2026-01-12T23:30:00+00:00');"
            "INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state)"
            " VALUES (3, 'p3', 3, 1, 'ARCHIVED');"
        )
    report = manager.cycle()
    assert report["pipelines"][0]["created"] == 1
    assert report["pipelines"][0]["sub_groups_evaluated"] == 1
    manager.close()


def test_a_trigger_manager_cycles_from_asyncio(database):
    import asyncio

    async def main():
        manager = TriggerManager(make_settings())
        first = await manager.acycle()
        second = await manager.acycle()
        manager.close()
        return first, second

    first, second = asyncio.run(main())
    assert first["pipelines"][0]["created"] == 2
    assert second["pipelines"][0]["mode"] == "incremental"


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


def _jobs_that_write_a_map(database, tmp_path, monkeypatch):
    """Gives the step a command the local backend can run, and the packages a copy."""
    archive = tmp_path / "archive"
    archive.mkdir()
    command = (
        '["/bin/sh", "-c", "test -r \\"$WORKFLOW_MANIFEST\\" && '
        'echo map > \\"$WORKFLOW_OUTPUT_DIR/science/map.fits\\""]'
    )
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE reduction_software_version SET command = ?", (command,))
        for package in (1, 2):
            path = archive / f"p{package}.tar"
            path.write_text(f"package {package}")
            conn.execute(
                "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path) VALUES (1, ?, ?)",
                (package, str(path)),
            )
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", str(tmp_path / "pipelines"))


def _statuses(database):
    with sqlite3.connect(database) as conn:
        return [s for (s,) in conn.execute("SELECT status FROM executed_reduction_step ORDER BY id")]


def test_workflow_and_result_managers_run_jobs_to_their_end(database, tmp_path, monkeypatch):
    """process_pending_runs submits to the local backend (the job wrapper started through
    this interpreter); process_running_steps follows the jobs to COMPLETED."""
    import time

    _jobs_that_write_a_map(database, tmp_path, monkeypatch)
    assert process_triggers(make_settings())["pipelines"][0]["created"] == 2
    report = process_pending_runs(make_settings())
    assert (report["claimed"], report["submitted"], report["errors"]) == (2, 2, [])
    deadline = time.monotonic() + 30
    while True:
        report = process_running_steps(make_settings())
        assert report["errors"] == []
        states = _statuses(database)
        if states == ["COMPLETED"] * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert states == ["COMPLETED"] * 2
    assert (tmp_path / "pipelines/p/night=2026-01-10/output/science/map.fits").read_text() == "map\n"


def test_the_three_long_lived_managers_run_jobs_to_their_end_from_asyncio(database, tmp_path, monkeypatch):
    """The manager classes, as an asyncio service keeps them: one each, awaited cycles;
    closed and used again, a manager opens a new pool."""
    import asyncio

    _jobs_that_write_a_map(database, tmp_path, monkeypatch)

    async def main():
        trigger = TriggerManager(make_settings())
        workflow = WorkflowManager(make_settings())
        results = ResultManager(make_settings())
        assert (await trigger.acycle())["pipelines"][0]["created"] == 2
        submitted = await workflow.acycle()
        assert (submitted["claimed"], submitted["submitted"], submitted["errors"]) == (2, 2, [])
        workflow.close()
        assert workflow.cycle()["claimed"] == 0
        for _ in range(150):
            report = await results.acycle()
            assert report["errors"] == []
            if _statuses(database) == ["COMPLETED"] * 2:
                break
            await asyncio.sleep(0.2)
        # The completed runs are one change for the kept evaluator; then it is quiet.
        await trigger.acycle()
        quiet = await trigger.acycle()
        for manager in (trigger, workflow, results):
            manager.close()
        return quiet

    quiet = asyncio.run(main())
    assert _statuses(database) == ["COMPLETED"] * 2
    assert (quiet["changed_runs"], quiet["pipelines"][0]["sub_groups_evaluated"]) == (0, 0), quiet


LOOP_SCRIPT = """
import logging, signal, sys
# Python leaves SIGINT ignored when it starts with it ignored (a background job of a
# non-interactive shell, as CI may be); a user's terminal has the default handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from ccat_workflow_manager.config import make_settings
from ccat_workflow_manager.managers import run_manager
try:
    run_manager("trigger-manager", make_settings())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_manager_loop_runs_from_python_logs_through_logging_and_stops_on_ctrl_c(
    database, tmp_path, monkeypatch
):
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_TRIGGER_MANAGER_POLL_INTERVAL", "0.2")
    # No heartbeat to a shared Redis: nothing listens on port 1 (the loop logs and goes on).
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "1")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if "trigger cycle done" in line:
                break
        assert any("trigger cycle done" in line and "runs_created=2" in line for line in seen), seen
        assert any(line.startswith("ccat_workflow_manager.managers INFO manager started") for line in seen), seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert out == "interrupted\n", (out, err)
    assert "manager stopping" in err, err
    assert proc.returncode == 0
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM executed_reduction_step").fetchone() == (2,)


INTERRUPT_IN_LOGGING_SCRIPT = """
import logging, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlCWhileLogging(logging.Handler):
    # Ctrl-C that arrives while Python code of a logging call runs: the handler raises
    # KeyboardInterrupt inside that call, not where the loop checks for signals.
    fired = False

    def emit(self, record):
        if not self.fired and "trigger cycle done" in record.getMessage():
            CtrlCWhileLogging.fired = True
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
logging.getLogger().addHandler(CtrlCWhileLogging())
from ccat_workflow_manager.config import make_settings
from ccat_workflow_manager.managers import run_manager
try:
    run_manager("trigger-manager", make_settings())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_that_lands_inside_a_logging_call_still_stops_the_loop(database, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_TRIGGER_MANAGER_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "1")
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPT_IN_LOGGING_SCRIPT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.stdout == "interrupted\n", (proc.stdout, proc.stderr)
    assert "manager stopping" in proc.stderr, proc.stderr


def test_command_builder_shows_the_job_without_writing_anything(database, tmp_path, monkeypatch):
    from ccat_workflow_manager import WorkflowManagerError
    from ccat_workflow_manager.execution.command_builder import CommandBuilder

    archive = tmp_path / "archive"
    archive.mkdir()
    with sqlite3.connect(database) as conn:
        conn.execute(
            "UPDATE reduction_software_version SET command = ?",
            ('["calibrate", "--mode", "hot cold; $(x)"]',),
        )
        path = archive / "p1.tar"
        path.write_text("package 1")
        conn.execute(
            "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path) VALUES (1, 1, ?)",
            (str(path),),
        )
    base = tmp_path / "pipelines"
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", str(base))
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "slurm")
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_SIF_CACHE_DIR", str(tmp_path / "sif"))
    process_triggers(make_settings())
    with sqlite3.connect(database) as conn:
        first, second = [i for (i,) in conn.execute("SELECT id FROM executed_reduction_step ORDER BY id")]

    builder = CommandBuilder(make_settings())
    argv = builder.build_command(first)
    root = base / "p" / "night=2026-01-10"
    assert argv[:4] == ["apptainer", "exec", "--containall", "--no-home"]
    assert f"{root}/config/calibrate/run-{first}/attempt-1:/workflow/config:ro" in argv
    assert f"{path}:/workflow/input/1_p1.tar:ro" in argv
    assert argv[-4:] == ["docker://c:1", "calibrate", "--mode", "hot cold; $(x)"]
    manifest = builder.build_manifest(first)
    assert manifest["manifest_version"] == 1
    assert manifest["run_id"] == first
    assert [i["path"] for i in manifest["inputs"]] == ["/workflow/input/1_p1.tar"]
    assert manifest["directories"]["output"] == "/workflow/output"
    assert not base.exists(), "a preview writes nothing"
    # Package 2 has no copy anywhere: the reason names it.
    with pytest.raises(WorkflowManagerError, match=r"raw data package p2 \(2\) has no copy"):
        builder.build(second)
    with pytest.raises(LookupError):
        builder.build(999)


LOCK_SCRIPT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def test_the_asyncio_face_does_not_block_the_event_loop(database):
    """While the Rust core waits for a database write lock held by another process, the
    event loop keeps running coroutines; once the lock is released the cycle completes.
    (The lock is held in another process: POSIX locks do not separate two SQLite
    libraries inside one process.)"""
    import asyncio
    import subprocess
    import sys

    from ccat_workflow_manager import aio
    from ccat_workflow_manager.lineage import derived_products, product_lineage

    async def main():
        preview = await aio.preview_gaps(make_settings(), pipeline="p")
        assert [g["sub_group_key"] for g in preview["pipelines"][0]["gaps"]] == [
            "night=2026-01-10",
            "night=2026-01-11",
        ]
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_SCRIPT, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline() == "locked\n"
            task = asyncio.ensure_future(aio.process_triggers(make_settings()))
            ticks = 0
            for _ in range(20):  # the loop runs other work while the core waits
                await asyncio.sleep(0.01)
                ticks += 1
            assert not task.done(), "the cycle cannot have written through the lock"
            holder.stdin.write("\n")
            holder.stdin.flush()
            report = await task
        finally:
            holder.kill()
        assert ticks == 20
        assert report["errors"] == []
        assert report["pipelines"][0]["created"] == 2
        assert await aio.product_lineage(12345, make_settings()) is None
        assert await aio.derived_products(1, make_settings()) == []

    asyncio.run(main())
    assert product_lineage(12345, make_settings()) is None
    assert derived_products(1, make_settings()) == []


def test_celery_dispatch_runs_submission_and_collection_in_a_prefork_worker(database, tmp_path, monkeypatch):
    """DISPATCH_MODE=celery: the managers record hand-offs and publish them; a real Celery
    worker with the prefork pool runs submit_run and collect_run, calling the Rust core in
    its forked children, until every run is COMPLETED."""
    import subprocess
    import sys
    import time
    import uuid
    from urllib.parse import urlparse

    redis_url = os.environ.get("CCAT_TEST_REDIS_URL")
    assert redis_url, "CCAT_TEST_REDIS_URL is not set: run the tests with `nox -s tests`"
    url = urlparse(redis_url)
    archive = tmp_path / "archive"
    archive.mkdir()
    command = '["/bin/sh", "-c", "echo map > \\"$WORKFLOW_OUTPUT_DIR/science/map.fits\\""]'
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE reduction_software_version SET command = ?", (command,))
        for package in (1, 2):
            path = archive / f"p{package}.tar"
            path.write_text(f"package {package}")
            conn.execute(
                "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path) VALUES (1, ?, ?)",
                (package, str(path)),
            )
    for key, value in {
        "PIPELINE_BASE_DIR": str(tmp_path / "pipelines"),
        "DISPATCH_MODE": "celery",
        "CELERY_GLOBAL_KEYPREFIX": f"test-dispatch-{uuid.uuid4()}:",
        "REDIS_HOST": url.hostname or "localhost",
        "REDIS_PORT": str(url.port or 6379),
        "WORKER_HEALTH_NAME": f"test-worker-{uuid.uuid4()}",
    }.items():
        monkeypatch.setenv(f"CCAT_WORKFLOW_MANAGER_{key}", value)
    import json

    import redis as redis_client
    import shutil

    health_key = "health:workflow:" + os.environ["CCAT_WORKFLOW_MANAGER_WORKER_HEALTH_NAME"]
    r = redis_client.Redis.from_url(redis_url)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ccat_workflow_manager.worker", "worker",
         "--pool", "prefork", "--concurrency", "1", "-Q", "workflow.hpc,workflow.results",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # The worker's heartbeat: alive, with the managers' TTL; `ccat-wfm health` agrees.
        deadline = time.monotonic() + 60
        while r.get(health_key) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.get(health_key) == b"alive"
        assert 0 < r.ttl(health_key) <= 90
        exe = shutil.which("ccat-wfm", path=str(Path(sys.executable).parent))
        service = health_key.removeprefix("health:workflow:")
        health = subprocess.run([exe, "health", "--service", service], capture_output=True, text=True)
        assert health.returncode == 0, health
        assert process_triggers(make_settings())["pipelines"][0]["created"] == 2
        dispatched = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            report = process_pending_runs(make_settings())
            assert report["submitted"] == 0, "in celery mode the workers submit"
            dispatched += report["dispatched"]
            results = process_running_steps(make_settings())
            assert results["completed"] == 0, "in celery mode the workers collect"
            with sqlite3.connect(database) as conn:
                states = [s for (s,) in conn.execute("SELECT status FROM executed_reduction_step")]
            if states == ["COMPLETED"] * 2:
                break
            time.sleep(0.3)
        assert states == ["COMPLETED"] * 2, states
        assert dispatched == 2
        with sqlite3.connect(database) as conn:
            products = conn.execute("SELECT product_type, relative_path FROM data_product").fetchall()
            outbox = conn.execute(
                "SELECT task_name, published_at IS NOT NULL FROM celery_outbox ORDER BY id"
            ).fetchall()
        assert products == [("SCIENCE", "output/science/map.fits")] * 2
        assert sorted(outbox) == sorted(
            [("ccat_workflow_manager.tasks.submit_run", 1)] * 2
            + [("ccat_workflow_manager.tasks.collect_run", 1)] * 2
        )
    finally:
        worker.terminate()
        log, _ = worker.communicate(timeout=30)
    assert log.count("ccat_workflow_manager.tasks.submit_run[") >= 2, log
    assert "ForkPoolWorker" in log, log
    # A clean shutdown removes the health key at once and says so: `ccat-wfm health` lists
    # the worker as stopped (not down), and the report stays green.
    assert r.get(health_key) is None
    report = subprocess.run([exe, "health", "--json"], capture_output=True, text=True)
    states = {s["service"]: s for s in json.loads(report.stdout)}
    assert states[service]["state"] == "stopped", states[service]
    assert states[service]["status"]["stopped_at"], states[service]
    assert report.returncode == 0, (report, states)
    r.delete(health_key + ":status")

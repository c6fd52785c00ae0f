"""Soak test: the production layout under faults, then the data-safety invariants.

Two instances of each manager run against one PostgreSQL with Celery dispatch over Redis
(a real worker with the prefork pool) and a real backend (local processes or the SLURM
test cluster). A feeder streams new raw data packages into the archive — new scans, and
late packages for scans already processed — through a three-step pipeline (per scan
calibrate → baseline, per source and module a map), while a fault driver SIGKILLs random
manager and worker processes (and restarts them), restarts Redis (losing what it held),
restarts PostgreSQL (as after a crash) and kills running jobs. Then the faults stop, the
system is left to settle, and the invariants are checked:

- every sub-group is processed for its final fingerprint: no gap remains, and the run of
  that fingerprint is COMPLETED, or FAILED with a reason;
- no two runs of one step and sub-group were ever in flight at once: not in the database
  (sampled throughout), and not as jobs (the jobs' own ledger of start and end times);
- no attempt had two backend jobs, per the backend's own records sampled throughout (the
  job names `squeue` shows on SLURM, the job wrappers' processes of the local backend),
  and no attempt started twice, per the jobs' own ledger;
- no product was registered twice or by two runs, and none is without lineage;
- every registered product's file is where it was registered, with its checksum;
- no file is left in a run directory that is not a registered product, a log or the
  layout's own bookkeeping.

The closing figures — faults injected per kind, runs per state, jobs, products,
violations — are printed; the exit status is 1 when any invariant is violated.

    python scripts/soak.py --backend local --packages 2000 --stream-seconds 300

Needs: this package installed (the `ccat-wfm` console script and the worker app), psycopg,
redis-py, and what scripts/services.sh needs. It starts its own PostgreSQL and Redis
(so it can restart them) and uses CCAT_TEST_SLURM_CONF's cluster (or starts one).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services.sh"
STEP = ROOT / "scripts" / "soak_step.sh"
MODULES = {1: "LFA", 2: "HFA"}
ACTIVE = ("PENDING", "STAGING_DATA", "SUBMITTED", "RUNNING", "COLLECTING_RESULTS")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- services ------------------------------------------------------------------------


class Services:
    """Private PostgreSQL and Redis (so they can be restarted) from scripts/services.sh."""

    def __init__(self, state: Path):
        self.state = state
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CCAT_TEST_POSTGRES_URL", "CCAT_TEST_REDIS_URL")}
        self.env["CCAT_TEST_SERVICES_DIR"] = str(state)
        out = subprocess.run(["bash", str(SERVICES), "up"], env=self.env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        urls = dict(line[len("export "):].split("=", 1) for line in out.splitlines()
                    if line.startswith("export "))
        self.postgres_url = urls["CCAT_TEST_POSTGRES_URL"].strip("'")
        self.redis_url = urls["CCAT_TEST_REDIS_URL"].strip("'")
        self.slurm_conf = urls["CCAT_TEST_SLURM_CONF"].strip("'")

    def restart(self, which: str) -> None:
        subprocess.run(["bash", str(SERVICES), "restart", which], env=self.env, check=True)

    def down(self) -> None:
        env = dict(self.env)
        # The cluster is stopped only when it is ours (a given one is left alone).
        subprocess.run(["bash", str(SERVICES), "down"], env=env, check=False)


def connect(url: str, attempts: int = 60) -> psycopg.Connection:
    """A connection, waiting out a PostgreSQL restart."""
    for i in range(attempts):
        try:
            return psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError:
            if i == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


# --- the archive and the pipeline ---------------------------------------------------------

PIPELINE_TOML = """
[[software]]
name = "soak-step"

[[software.version]]
version = "1.0.0"
image_ref = "local/soak-step:1.0.0"
command = ["/bin/sh", "{step}", "{ledger}"]
cpu = 1
memory_gb = 0.1
time_hours = 0.05

[[grouping]]
name = "soak-chai"
filter_rules = [
    {{ table = "Instrument", column = "name", operator = "eq", value = "CHAI" }},
]

[[pipeline]]
name = "soak-maps"
grouping = "soak-chai"
processing_location = "soak-processing"
trigger = "continuous"

[[pipeline.step]]
name = "calibrate"
software = "soak-step"
version = "1.0.0"
group_by = ["executed_obs_unit", "instrument_module"]
max_retries = {retries}

[[pipeline.step]]
name = "baseline"
software = "soak-step"
version = "1.0.0"
group_by = ["executed_obs_unit", "instrument_module"]
depends_on = ["calibrate"]
max_retries = {retries}

[[pipeline.step]]
name = "map"
software = "soak-step"
version = "1.0.0"
group_by = ["source", "instrument_module"]
depends_on = ["baseline"]
max_retries = {retries}
"""


def seed(db: psycopg.Connection, work: Path, sources: int) -> None:
    (work / "archive").mkdir()
    (work / "processing").mkdir()
    db.execute("INSERT INTO instrument (id, name) VALUES (1, 'CHAI')")
    db.execute("INSERT INTO instrument_module (id, name, instrument_id) VALUES (1, 'LFA', 1), (2, 'HFA', 1)")
    db.execute("INSERT INTO line (id, name, rest_frequency_ghz) VALUES (1, 'CO43', 461.04)")
    db.execute(
        "INSERT INTO data_location (id, name, location_type, base_path) VALUES "
        "(1, 'soak-processing', 'PROCESSING', %s), (2, 'soak-archive', 'LONG_TERM_ARCHIVE', %s)",
        (str(work / "processing"), str(work / "archive")),
    )
    for s in range(1, sources + 1):
        db.execute("INSERT INTO source (id, name) VALUES (%s, %s)", (s, f"SRC{s:03d}"))
        db.execute("INSERT INTO obs_unit (id, name, source_id, line_id) VALUES (%s, %s, %s, 1)",
                   (s, f"SRC{s:03d}-CO43", s))


class Feeder(threading.Thread):
    """Streams packages in: mostly new scans (a package per module each), sometimes a late
    package for a scan seen before, which changes that scan's fingerprint (a rerun)."""

    def __init__(self, url: str, work: Path, sources: int, packages: int, seconds: float):
        super().__init__(daemon=True)
        self.url, self.work, self.sources = url, work, sources
        self.packages, self.seconds = packages, seconds
        self.added = 0
        self.late = 0
        self.errors = 0
        self.rng = random.Random(7)

    def run(self) -> None:
        db = connect(self.url)
        scans: list[int] = []
        start = time.monotonic()
        while self.added < self.packages:
            due = int(self.packages * min(1.0, (time.monotonic() - start) / self.seconds))
            batch: list[tuple[int, int]] = []  # (scan, module) of each new package
            new_scans: list[int] = []
            while self.added + len(batch) < min(max(due, 1), self.packages):
                if scans and self.rng.random() < 0.1:
                    batch.append((self.rng.choice(scans), self.rng.choice(list(MODULES))))
                else:
                    scan = len(scans) + len(new_scans) + 1
                    new_scans.append(scan)
                    batch += [(scan, module) for module in MODULES]
            try:
                with db.transaction():
                    for scan in new_scans:
                        db.execute(
                            "INSERT INTO executed_obs_unit (id, obs_unit_id, start_time, end_time) "
                            "VALUES (%s, %s, now(), now())",
                            (scan, 1 + scan % self.sources),
                        )
                    for i, (scan, module) in enumerate(batch, start=self.added + 1):
                        path = self.work / "archive" / f"pkg{i:06d}.spec"
                        path.write_bytes(os.urandom(256))
                        db.execute(
                            "INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, "
                            "state, relative_path, size_bytes, checksum, metadata) "
                            "VALUES (%s, %s, %s, %s, 'ARCHIVED', %s, 256, %s, '{}')",
                            (i, path.stem, scan, module, path.name,
                             hashlib.sha256(path.read_bytes()).hexdigest()),
                        )
                        db.execute(
                            "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path) "
                            "VALUES (2, %s, %s)", (i, str(path)))
                scans += new_scans
                self.added += len(batch)
                self.late += sum(1 for scan, _ in batch if scan not in new_scans)
            except psycopg.Error:
                # PostgreSQL restarted under us: unless the commit got through, the batch
                # was rolled back; go again.
                self.errors += 1
                db = connect(self.url)
                last = self.added + len(batch)
                if db.execute("SELECT 1 FROM raw_data_package WHERE id = %s", (last,)).fetchone():
                    scans += new_scans
                    self.added = last
            time.sleep(0.25)
        db.close()


# --- processes -------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            # Its own process group, so a kill takes a worker's pool children with it.
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.log_path.parent)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Faults:
    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)


class FaultDriver(threading.Thread):
    def __init__(self, soak: "Soak", every: float):
        super().__init__(daemon=True)
        self.soak, self.every = soak, every
        self.stopping = threading.Event()
        self.faults = Faults()
        self.rng = random.Random(11)

    def run(self) -> None:
        # Dealt from a shuffled deck, so every kind comes up in each round of ten.
        deck = ["kill-manager"] * 4 + ["kill-worker", "restart-redis", "restart-postgres"] + ["kill-job"] * 3
        hand: list[str] = []
        while not self.stopping.wait(self.rng.uniform(0.5, 1.5) * self.every):
            if not hand:
                hand = self.rng.sample(deck, len(deck))
            kind = hand.pop()
            try:
                if self.inject(kind):
                    self.faults.counts[kind] += 1
            except Exception as e:  # a fault that could not be injected is reported, not fatal
                self.faults.errors.append(f"{kind}: {e}")

    def inject(self, kind: str) -> bool:
        soak = self.soak
        if kind == "kill-manager":
            victim = self.rng.choice([p for p in soak.processes if p.name != "worker"])
        elif kind == "kill-worker":
            victim = next(p for p in soak.processes if p.name == "worker")
        elif kind in ("restart-redis", "restart-postgres"):
            soak.services.restart(kind.removeprefix("restart-"))
            return True
        else:
            # Wait a little for a job to be running.
            for _ in range(20):
                if soak.kill_a_job(self.rng):
                    return True
                time.sleep(0.3)
            return False
        victim.kill()
        time.sleep(self.rng.uniform(0, 2))
        victim.restarts += 1
        victim.start()
        return True


class Watcher(threading.Thread):
    """Samples, throughout the soak, what the final state no longer shows: runs of one step
    and sub-group in flight together (the database), and the jobs each attempt has (the
    backend's own records: SLURM job names, or the local job wrappers' processes)."""

    def __init__(self, soak: "Soak", every: float = 0.5):
        super().__init__(daemon=True)
        self.soak, self.every = soak, every
        self.stopping = threading.Event()
        self.samples = 0
        self.in_flight_together: set[str] = set()
        # attempt (SLURM job name, or local attempt directory) -> backend job ids seen
        self.jobs: dict[str, set[str]] = collections.defaultdict(set)

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.sample()
                self.samples += 1
            except (psycopg.Error, OSError, subprocess.SubprocessError):
                pass  # PostgreSQL restarting, a process gone mid-read: the next sample

    def sample(self) -> None:
        with connect(self.soak.services.postgres_url, attempts=1) as db:
            for step, key, runs in db.execute(
                "SELECT reduction_step_id, sub_group_key, array_agg(id ORDER BY id) "
                "FROM executed_reduction_step WHERE status = ANY(%s) "
                "GROUP BY 1, 2 HAVING COUNT(*) > 1",
                (list(ACTIVE[1:]),),
            ):
                self.in_flight_together.add(f"step {step} sub-group {key}: runs {runs}")
        if self.soak.args.backend == "slurm":
            out = subprocess.run(
                ["squeue", "--noheader", "--me", "--states=all", "--format=%i|%j"],
                env=self.soak.env, capture_output=True, text=True, timeout=30,
            ).stdout
            for line in out.splitlines():
                job, _, name = line.strip().partition("|")
                if name.startswith("ccat-"):
                    self.jobs[name].add(job)
        else:
            wrappers: dict[str, tuple[str, str]] = {}  # pid -> (attempt, parent pid)
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    # Field 4 of stat, after the parenthesised command name.
                    parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                except (OSError, IndexError):
                    continue
                if b"job-wrapper" in argv and b"--dir" in argv:
                    attempt = argv[argv.index(b"--dir") + 1].decode(errors="replace")
                    wrappers[pid] = (attempt, parent)
            for pid, (attempt, parent) in wrappers.items():
                # A wrapper's child between fork and exec still shows the wrapper's
                # command line: it is that job, not a second one.
                if wrappers.get(parent, (None,))[0] == attempt:
                    continue
                self.jobs[attempt].add(pid)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="ccat-soak-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        # As root, the private PostgreSQL runs as the postgres user: it must reach its dir
        # (so the dir must not sit under a private one such as pytest's tmp_path).
        self.work.chmod(0o755)
        self.exe = args.ccat_wfm or shutil.which("ccat-wfm", path=str(Path(sys.executable).parent)) \
            or shutil.which("ccat-wfm")
        if not self.exe:
            sys.exit("soak: no ccat-wfm (install this package, or give --ccat-wfm)")
        self.ledger = self.work / "ledger.txt"
        self.ledger.touch()
        self.processes: list[Process] = []
        self.services: Services

    # The managers' settings, shared by every process.
    def environment(self) -> dict[str, str]:
        from urllib.parse import urlparse

        pg = urlparse(self.services.postgres_url)
        redis = urlparse(self.services.redis_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_WORKFLOW_MANAGER_", "CCAT_OPS_DB_"))}
        env.update({
            "CCAT_OPS_DB_DATABASE_TYPE": "postgresql",
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST": pg.hostname,
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_PORT": str(pg.port),
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_USER": pg.username or "postgres",
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD": "",
            "CCAT_OPS_DB_DATABASE_POSTGRESQL_DATABASE": pg.path.lstrip("/"),
            "CCAT_WORKFLOW_MANAGER_REDIS_HOST": redis.hostname,
            "CCAT_WORKFLOW_MANAGER_REDIS_PORT": str(redis.port),
            "CCAT_WORKFLOW_MANAGER_DISPATCH_MODE": "celery",
            "CCAT_WORKFLOW_MANAGER_CELERY_GLOBAL_KEYPREFIX": f"soak-{uuid.uuid4().hex[:8]}:",
            "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": self.args.backend,
            "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "none",
            "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": str(self.work / "processing" / "pipelines"),
            "CCAT_WORKFLOW_MANAGER_TRIGGER_MANAGER_POLL_INTERVAL": "1",
            "CCAT_WORKFLOW_MANAGER_WORKFLOW_MANAGER_POLL_INTERVAL": "1",
            "CCAT_WORKFLOW_MANAGER_RESULT_MANAGER_POLL_INTERVAL": "1",
            # Short leases: a hand-off lost with Redis, or a run of a killed instance on
            # another "host", comes back within the soak.
            "CCAT_WORKFLOW_MANAGER_LEASE_SECONDS": "20",
            "CCAT_WORKFLOW_MANAGER_RETRY_BACKOFF_SECONDS": "1",
            "CCAT_WORKFLOW_MANAGER_MAX_ACTIVE_JOBS": str(self.args.max_active_jobs),
            "SLURM_CONF": self.services.slurm_conf,
            "RUST_LOG": "info,sqlx=warn",
        })
        return env

    def ccat(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *argv], env=self.env, capture_output=True, text=True, check=check)

    def setup(self) -> None:
        log(f"work dir {self.work}; backend {self.args.backend}")
        self.services = Services(self.work / "services")
        self.env = self.environment()
        # scripts/services.sh trades durability for speed; production keeps commits
        # through a crash, and the soak's PostgreSQL restarts are crashes.
        with connect(self.services.postgres_url) as db:
            db.execute("ALTER SYSTEM SET synchronous_commit TO on")
            db.execute("ALTER SYSTEM SET fsync TO on")
            db.execute("SELECT pg_reload_conf()")
        self.ccat("db", "migrate")
        with connect(self.services.postgres_url) as db:
            seed(db, self.work, self.args.sources)
        toml = self.work / "pipeline.toml"
        toml.write_text(PIPELINE_TOML.format(step=STEP, ledger=self.ledger, retries=self.args.max_retries))
        self.ccat("apply", str(toml))
        logs = self.work / "logs"
        logs.mkdir()
        for manager in ("trigger-manager", "workflow-manager", "result-manager"):
            for i in (1, 2):
                self.processes.append(Process(f"{manager}-{i}", [self.exe, manager], self.env,
                                              logs / f"{manager}-{i}.log"))
        self.processes.append(Process(
            "worker",
            [sys.executable, "-m", "celery", "-A", "ccat_workflow_manager.worker", "worker",
             "--pool", "prefork", "--concurrency", "2", "-Q", "workflow.hpc,workflow.results",
             "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
            self.env, logs / "worker.log"))
        for p in self.processes:
            p.start()

    def kill_a_job(self, rng: random.Random) -> bool:
        """Kills a running job the way a node or the OOM killer would; False when none runs."""
        try:
            with connect(self.services.postgres_url, attempts=1) as db:
                jobs = db.execute("SELECT hpc_job_id FROM executed_reduction_step "
                                  "WHERE status = 'RUNNING' AND hpc_job_id IS NOT NULL").fetchall()
        except psycopg.Error:
            return False
        if not jobs:
            return False
        (job,) = rng.choice(jobs)
        if self.args.backend == "slurm":
            r = subprocess.run(["scancel", "--signal=KILL", job], env=self.env, capture_output=True, text=True)
            return r.returncode == 0
        # Local: the job's processes, not its wrapper (the group leader), which records how
        # the job ended.
        pgid = int(job)
        killed = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == pgid:
                continue
            try:
                if os.getpgid(int(pid)) == pgid:
                    os.kill(int(pid), signal.SIGKILL)
                    killed = True
            except (ProcessLookupError, PermissionError):
                pass
        return killed

    def settle(self) -> bool:
        """Waits until nothing is in flight and no gap remains; False on timeout."""
        deadline = time.monotonic() + self.args.settle_timeout
        quiet_since = None
        while time.monotonic() < deadline:
            for p in self.processes:
                if p.proc.poll() is not None:
                    log(f"{p.name} exited with {p.proc.returncode}; restarting it")
                    p.restarts += 1
                    p.start()
            with connect(self.services.postgres_url) as db:
                active = db.execute("SELECT COUNT(*) FROM executed_reduction_step WHERE status = ANY(%s)",
                                    (list(ACTIVE),)).fetchone()[0]
                unpublished = db.execute("SELECT COUNT(*) FROM celery_outbox WHERE published_at IS NULL").fetchone()[0]
            gaps = self.gaps() if active == 0 else None
            if active == 0 and unpublished == 0 and gaps == []:
                # Quiet twice in a row, a poll interval apart: nothing was about to start.
                if quiet_since and time.monotonic() - quiet_since > 3:
                    return True
                quiet_since = quiet_since or time.monotonic()
            else:
                quiet_since = None
                log(f"settling: {active} run(s) in flight, {unpublished} hand-off(s) unpublished, "
                    f"gaps {'?' if gaps is None else len(gaps)}")
            time.sleep(2)
        return False

    def gaps(self) -> list[dict]:
        out = self.ccat("gaps", "--json", check=False)
        if out.returncode != 0:
            return [{"error": out.stderr.strip()}]
        return [g for p in json.loads(out.stdout)["pipelines"] for g in p["gaps"]]

    def run(self) -> int:
        self.setup()
        feeder = Feeder(self.services.postgres_url, self.work, self.args.sources, self.args.packages,
                        self.args.stream_seconds)
        driver = FaultDriver(self, self.args.fault_every)
        self.watcher = Watcher(self)
        started = time.monotonic()
        feeder.start()
        driver.start()
        self.watcher.start()
        while feeder.is_alive():
            feeder.join(timeout=15)
            log(f"{feeder.added}/{self.args.packages} packages in; faults so far: {dict(driver.faults.counts)}")
        # Faults go on a little after the last package, then stop.
        time.sleep(min(10.0, self.args.stream_seconds / 5))
        driver.stopping.set()
        driver.join()
        log("stream done, faults stopped; settling")
        settled = self.settle()
        elapsed = time.monotonic() - started
        self.watcher.stopping.set()
        self.watcher.join()
        for p in self.processes:
            p.stop()
        violations = check(self.services.postgres_url, self.work, self.ledger, self.watcher)
        if not settled:
            violations.insert(0, f"not settled within {self.args.settle_timeout} s: gaps {self.gaps()[:5]}")
        report(self.services.postgres_url, self.ledger, feeder, driver.faults, self.processes, violations, elapsed,
               self.watcher)
        return 1 if violations else 0


# --- the invariants ---------------------------------------------------------------------


def check(url: str, work: Path, ledger: Path, watcher: Watcher) -> list[str]:
    v: list[str] = []
    with connect(url) as db:
        q = db.execute
        for step, key, status in q(
            "SELECT s.name, r.sub_group_key, r.status FROM executed_reduction_step r "
            "JOIN reduction_step s ON s.id = r.reduction_step_id "
            "WHERE r.id IN (SELECT MAX(id) FROM executed_reduction_step GROUP BY reduction_step_id, sub_group_key) "
            "AND NOT (r.status = 'COMPLETED' OR (r.status = 'FAILED' AND COALESCE(r.error_message, '') <> ''))"
        ):
            v.append(f"{step} {key}: its latest run is {status}, not COMPLETED or FAILED with a reason")
        sub_group = {run: (step, key) for run, step, key in
                     q("SELECT id, reduction_step_id, sub_group_key FROM executed_reduction_step")}
        for row in q("SELECT full_path, COUNT(*) FROM physical_copy WHERE data_product_id IS NOT NULL "
                     "GROUP BY 1 HAVING COUNT(*) > 1"):
            v.append(f"product registered twice at {row[0]} ({row[1]} times)")
        for path, runs in q("SELECT c.full_path, array_agg(DISTINCT p.executed_reduction_step_id) "
                            "FROM physical_copy c JOIN data_product p ON p.id = c.data_product_id "
                            "GROUP BY 1 HAVING COUNT(DISTINCT p.executed_reduction_step_id) > 1"):
            v.append(f"product at {path} registered by runs {runs}")
        for row in q("SELECT p.id, p.relative_path FROM data_product p WHERE "
                     "NOT EXISTS (SELECT 1 FROM executed_reduction_step_raw_input i "
                     "            WHERE i.executed_reduction_step_id = p.executed_reduction_step_id) AND "
                     "NOT EXISTS (SELECT 1 FROM executed_reduction_step_product_input i "
                     "            WHERE i.executed_reduction_step_id = p.executed_reduction_step_id)"):
            v.append(f"product {row[0]} ({row[1]}) without lineage")
        registered = {}
        for product, path, checksum in q(
            "SELECT p.id, c.full_path, p.checksum FROM data_product p "
            "JOIN physical_copy c ON c.data_product_id = p.id WHERE c.status = 'PRESENT'"
        ):
            registered[path] = (product, checksum)
    for path, (product, checksum) in registered.items():
        try:
            actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            v.append(f"product {product}: its file {path} is gone ({e.strerror})")
            continue
        if actual != checksum:
            v.append(f"product {product}: {path} no longer has its registered checksum")
    # Files in run directories: registered products (and their metrics sidecars) in
    # output/ and workspace/; logs and the layout's config elsewhere.
    for path in (work / "processing" / "pipelines").rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        parts = path.relative_to(work / "processing" / "pipelines").parts
        if len(parts) < 3 or parts[2] not in ("output", "workspace"):
            continue
        if str(path) in registered or str(path).removesuffix(".metrics.json") in registered:
            continue
        v.append(f"file in a run directory that is no registered product: {path}")
    # The jobs' own ledger: no attempt started twice; no two runs of one step and
    # sub-group ran at once (attempts killed before their end line are left out).
    entries = [line.split() for line in ledger.read_text().splitlines() if line]
    starts = collections.Counter((e[0], e[1]) for e in entries if e[3] == "start")
    for (run, attempt), n in starts.items():
        if n > 1:
            v.append(f"run {run} attempt {attempt} started {n} times")
    spans: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for run, attempt, _step, what, at in entries:
        spans[(run, attempt)].append(float(at))
    by_group: dict[tuple, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for (run, attempt), times in spans.items():
        if len(times) == 2 and int(run) in sub_group:
            by_group[sub_group[int(run)]].append((min(times), max(times), f"run {run} attempt {attempt}"))
    for group, jobs in by_group.items():
        jobs.sort()
        for (s1, e1, a), (s2, e2, b) in zip(jobs, jobs[1:]):
            if s2 < e1 and a.split()[1] != b.split()[1]:
                v.append(f"step {group[0]} sub-group {group[1]}: {a} and {b} ran at the same time")
    # What was sampled while the soak ran.
    for line in sorted(watcher.in_flight_together):
        v.append(f"runs in flight at once: {line}")
    for attempt, jobs in sorted(watcher.jobs.items()):
        if len(jobs) > 1:
            v.append(f"attempt {attempt} had {len(jobs)} backend jobs: {sorted(jobs)}")
    if watcher.samples == 0:
        v.append("the watcher took no sample")
    return v


def report(url, ledger, feeder, faults, processes, violations, elapsed, watcher) -> None:
    with connect(url) as db:
        states = dict(db.execute("SELECT status, COUNT(*) FROM executed_reduction_step GROUP BY 1").fetchall())
        per_step = db.execute(
            "SELECT s.name, COUNT(*) FROM executed_reduction_step r JOIN reduction_step s "
            "ON s.id = r.reduction_step_id GROUP BY 1 ORDER BY 1").fetchall()
        retries = db.execute("SELECT COALESCE(SUM(retry_count), 0) FROM executed_reduction_step").fetchone()[0]
        products = db.execute("SELECT COUNT(*) FROM data_product").fetchone()[0]
        outbox = db.execute("SELECT COUNT(*) FROM celery_outbox").fetchone()[0]
    jobs = sum(1 for line in ledger.read_text().splitlines() if line.split()[3:4] == ["start"])
    print()
    print("=== soak: closing figures ===")
    print(f"elapsed                     {elapsed:.0f} s")
    print(f"packages streamed           {feeder.added} ({feeder.late} late, into scans seen before)")
    print("faults injected             " + ", ".join(f"{k} {n}" for k, n in sorted(faults.counts.items())))
    if faults.errors:
        print(f"faults not injected         {len(faults.errors)} (first: {faults.errors[0]})")
    print("process restarts            " + ", ".join(f"{p.name} {p.restarts}" for p in processes))
    print("runs per state              " + ", ".join(f"{k} {n}" for k, n in sorted(states.items())))
    print("runs per step               " + ", ".join(f"{k} {n}" for k, n in per_step))
    print(f"retries                     {retries}")
    print(f"job starts (ledger)         {jobs}")
    print(f"backend jobs seen           {sum(len(j) for j in watcher.jobs.values())} "
          f"for {len(watcher.jobs)} attempts, in {watcher.samples} samples")
    print(f"products registered         {products}")
    print(f"Celery hand-offs            {outbox}")
    print(f"invariant violations        {len(violations)}")
    for line in violations[:50]:
        print(f"  - {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["local", "slurm"], default="local")
    parser.add_argument("--packages", type=int, default=2000, help="raw data packages streamed in")
    parser.add_argument("--stream-seconds", type=float, default=300, help="over how long")
    parser.add_argument("--sources", type=int, default=12)
    parser.add_argument("--fault-every", type=float, default=4, help="mean seconds between faults")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--max-active-jobs", type=int, default=16,
                        help="MAX_ACTIVE_JOBS (more makes a small machine thrash, above all on "
                             "SLURM, whose every job adds its daemons' work)")
    parser.add_argument("--settle-timeout", type=float, default=None,
                        help="seconds to wait for the last runs after the faults stop "
                             "(default: 300 + 1 per package)")
    parser.add_argument("--workdir", help="keep everything here (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true", help="leave the services running and the dir in place")
    parser.add_argument("--ccat-wfm", help="the ccat-wfm executable (default: this environment's)")
    args = parser.parse_args()
    if args.settle_timeout is None:
        args.settle_timeout = 300 + args.packages
    soak = Soak(args)
    try:
        return soak.run()
    finally:
        for p in soak.processes:
            p.kill()
        if not args.keep and hasattr(soak, "services"):
            soak.services.down()
            shutil.rmtree(soak.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

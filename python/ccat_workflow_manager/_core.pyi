"""Type stubs of the Rust extension module."""

from collections.abc import Awaitable, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, TypedDict

__version__: str

class WorkflowManagerError(Exception):
    """Base class of every error raised by the Rust core."""

class ConfigurationError(WorkflowManagerError):
    """The settings are invalid; the message names the key and where it came from."""

class DatabaseError(WorkflowManagerError):
    """The operations database could not be reached or a statement on it failed."""

class Settings:
    """The typed settings of a manager (SPEC §8)."""

    @staticmethod
    def load(
        settings_files: list[str | PathLike[str]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings: ...
    @staticmethod
    def from_dict(values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings: ...
    def as_dict(self) -> dict[str, Any]:
        """The settings with secrets masked."""
    def __eq__(self, other: object) -> bool: ...

def dynaconf_values(
    settings_files: Sequence[str | PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | PathLike[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The values the Rust Dynaconf loader reads, and the files it read."""

def cli_main(argv: list[str]) -> int:
    """Runs ``ccat-wfm`` with ``argv`` (program name first); returns the exit code."""

class Gap(TypedDict):
    pipeline: str
    step: str
    sub_group_key: str
    fingerprint: str
    software_version: str
    inputs: int
    reason: Literal["new", "changed", "forced"]
    cooldown_until: str | None
    run_id: int | None

class PipelineReport(TypedDict):
    pipeline: str
    evaluated: bool
    mode: Literal["skipped", "full", "incremental"]
    sub_groups_evaluated: int
    gaps_found: int
    created: int
    deferred: int
    gaps: list[Gap]

class CycleReport(TypedDict, total=False):
    pipelines: list[PipelineReport]
    errors: list[str]
    changed_packages: int
    changed_runs: int
    horizon_blocked_by: str

class TriggerManager:
    """A trigger-manager keeping its pool and evaluator between cycles."""
    def __init__(self, settings: Settings, dry_run: bool = False) -> None: ...
    def cycle(self) -> CycleReport: ...
    def acycle(self) -> Awaitable[CycleReport]: ...
    def close(self) -> None: ...

def process_triggers(settings: Settings, dry_run: bool = False) -> CycleReport:
    """Runs one trigger-manager cycle from a cold start; returns its report."""

def preview_gaps(settings: Settings, pipeline: str | None = None) -> CycleReport:
    """The gaps the trigger-manager would turn into runs now, per pipeline; creates nothing."""

def migrate(settings: Settings) -> list[int]:
    """Applies the product's migrations to the configured database; returns the versions applied."""

class PublishReport(TypedDict):
    published: int
    backlog: int
    error: str | None

class WorkflowReport(TypedDict):
    claimed: int
    held: int
    staging_requested: int
    waiting_for_staging: int
    submitted: int
    adopted: int
    fenced: int
    failed: int
    dispatched: int
    dispatch: PublishReport | None
    errors: list[str]

class ResultReport(TypedDict):
    polled: int
    started: int
    succeeded: int
    failed: int
    retried: int
    cancelled: int
    completed: int
    dispatch: PublishReport | None
    products: int
    errors: list[str]

class WorkflowManager:
    """A workflow-manager keeping its pool and lease owner between cycles."""
    def __init__(self, settings: Settings) -> None: ...
    def cycle(self) -> WorkflowReport: ...
    def acycle(self) -> Awaitable[WorkflowReport]: ...
    def close(self) -> None: ...

class ResultManager:
    """A result-manager keeping its pool between cycles."""
    def __init__(self, settings: Settings) -> None: ...
    def cycle(self) -> ResultReport: ...
    def acycle(self) -> Awaitable[ResultReport]: ...
    def close(self) -> None: ...

def process_pending_runs(settings: Settings) -> WorkflowReport:
    """Runs one workflow-manager cycle; returns its report."""

def process_running_steps(settings: Settings) -> ResultReport:
    """Runs one result-manager cycle; returns its report."""

def run_manager(name: str, settings: Settings) -> None:
    """Runs a manager's loop until a signal's Python handler raises (Ctrl-C)."""

class JobPlan(TypedDict):
    """A run's job: what `build_job` returns."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    manifest: dict[str, Any]
    attempt_dir: str
    tag: str
    cpus: int
    memory_mb: int
    time_limit_seconds: int

def build_job(settings: Settings, run_id: int) -> JobPlan:
    """A run's job as the workflow-manager would submit it now; writes nothing."""

def product_lineage(settings: Settings, product_id: int) -> dict[str, Any] | None: ...
def derived_products(settings: Settings, package_id: int) -> list[dict[str, Any]]: ...

# Awaitables (pyo3-async-runtimes): each returns at once; awaiting never blocks the loop.
def aio_process_triggers(settings: Settings, dry_run: bool = False) -> Awaitable[CycleReport]: ...
def aio_preview_gaps(settings: Settings, pipeline: str | None = None) -> Awaitable[CycleReport]: ...
def aio_process_pending_runs(settings: Settings) -> Awaitable[WorkflowReport]: ...
def aio_process_running_steps(settings: Settings) -> Awaitable[ResultReport]: ...
def aio_product_lineage(settings: Settings, product_id: int) -> Awaitable[dict[str, Any] | None]: ...
def aio_derived_products(settings: Settings, package_id: int) -> Awaitable[list[dict[str, Any]]]: ...

def submit_run(settings: Settings, run_id: int) -> dict[str, Any]:
    """A worker's part of a submission hand-off."""

def collect_run(settings: Settings, run_id: int) -> dict[str, Any]:
    """A worker's part of a collection hand-off."""

class Heartbeat:
    """A service's Redis heartbeat, kept until :meth:`stop`."""
    def stop(self) -> None: ...

def start_heartbeat(service: str, settings: Settings) -> Heartbeat:
    """Starts the heartbeat of a service that may sit idle (a Celery worker)."""

"""Result-manager entry point: one cycle of job tracking (SPEC §7)."""

from __future__ import annotations

from typing import Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust


def process_running_steps(settings: Dynaconf | None = None) -> dict[str, Any]:
    """Ask the backend about every submitted job at once and move their runs on.

    Jobs that started become RUNNING, jobs that succeeded COLLECTING_RESULTS; failed jobs
    record their reason and log tail and go back to PENDING while retries are left;
    the jobs of cancelled runs are stopped. Returns the cycle's report. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_running_steps(to_rust(settings))

"""Result-manager entry point: one cycle of job tracking (SPEC §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust
from ccat_workflow_manager.managers._long_lived import LongLived

if TYPE_CHECKING:
    # Typed dicts of the stubs only; at run time the reports are plain dicts.
    from ccat_workflow_manager._core import ResultReport


class ResultManager(LongLived["ResultReport"]):
    """A result-manager that keeps its database pool between cycles.

    Keep one instance per process and call :meth:`cycle` (or ``await`` :meth:`acycle`)
    each period, instead of opening a pool per call with :func:`process_running_steps`.
    """

    def __init__(self, settings: Dynaconf | None = None) -> None:
        self._core = _core.ResultManager(to_rust(settings))


def process_running_steps(settings: Dynaconf | None = None) -> ResultReport:
    """Ask the backend about every submitted job at once and move their runs on.

    Jobs that started become RUNNING, jobs that succeeded COLLECTING_RESULTS; failed jobs
    record their reason and log tail and go back to PENDING while retries are left;
    the jobs of cancelled runs are stopped. Returns the cycle's report. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_running_steps(to_rust(settings))

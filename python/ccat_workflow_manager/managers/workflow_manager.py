"""Workflow-manager entry point: one cycle of claiming, staging and submission (SPEC §6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust
from ccat_workflow_manager.managers._long_lived import LongLived

if TYPE_CHECKING:
    # Typed dicts of the stubs only; at run time the reports are plain dicts.
    from ccat_workflow_manager._core import WorkflowReport


class WorkflowManager(LongLived["WorkflowReport"]):
    """A workflow-manager that keeps its database pool and its lease owner between cycles.

    Runs it holds while their inputs are staged stay its own, and its next cycle picks
    them up again. Keep one instance per process and call :meth:`cycle` (or ``await``
    :meth:`acycle`) each period, instead of opening a pool per call with
    :func:`process_pending_runs`.
    """

    def __init__(self, settings: Dynaconf | None = None) -> None:
        self._core = _core.WorkflowManager(to_rust(settings))


def process_pending_runs(settings: Dynaconf | None = None) -> WorkflowReport:
    """Claim PENDING runs, stage their inputs, lay out their directories and submit them.

    Returns the cycle's report: runs claimed, held, waiting for staging, submitted,
    adopted after a crash, failed, and problems that did not fail a run. The local
    backend's jobs are started through this interpreter (``python -m
    ccat_workflow_manager.cli job-wrapper``) and outlive the call. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_pending_runs(to_rust(settings))

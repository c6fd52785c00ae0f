"""Workflow-manager entry point: one cycle of claiming, staging and submission (SPEC §6)."""

from __future__ import annotations

from typing import Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust


def process_pending_runs(settings: Dynaconf | None = None) -> dict[str, Any]:
    """Claim PENDING runs, stage their inputs, lay out their directories and submit them.

    Returns the cycle's report: runs claimed, held, waiting for staging, submitted,
    adopted after a crash, failed, and problems that did not fail a run. The local
    backend's jobs are started through this interpreter (``python -m
    ccat_workflow_manager.cli job-wrapper``) and outlive the call. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_pending_runs(to_rust(settings))

"""Trigger-manager entry point: one cycle of gap evaluation and run creation (SPEC §5)."""

from __future__ import annotations

from typing import Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust


def process_triggers(settings: Dynaconf | None = None, *, dry_run: bool = False) -> dict[str, Any]:
    """Evaluate every enabled pipeline once and create the runs for its gaps.

    Returns the cycle's report: per pipeline the gaps found (with the run created for
    each), runs created and deferred, and the pipelines that could not be evaluated.
    ``dry_run=True`` only previews. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_triggers(to_rust(settings), dry_run=dry_run)

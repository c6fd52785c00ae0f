"""Trigger-manager entry point: one cycle of gap evaluation and run creation (SPEC §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust
from ccat_workflow_manager.managers._long_lived import LongLived

if TYPE_CHECKING:
    # Typed dicts of the stubs only; at run time the reports are plain dicts.
    from ccat_workflow_manager._core import CycleReport


class TriggerManager(LongLived["CycleReport"]):
    """A trigger-manager that keeps its database pool and its evaluator between cycles.

    The first :meth:`cycle` evaluates every pipeline in full; later ones look only at
    what changed since (new packages, run transitions, definition edits), and a cycle
    with nothing new reads the change marks and stops. This is how a long-lived caller —
    a Celery beat task, an asyncio service — should drive the trigger-manager: keep one
    instance (per process) and call :meth:`cycle` (or ``await`` :meth:`acycle`) each
    period. :func:`process_triggers` is the one-shot, cold, convenience.
    """

    def __init__(self, settings: Dynaconf | None = None, *, dry_run: bool = False) -> None:
        self._core = _core.TriggerManager(to_rust(settings), dry_run=dry_run)


def process_triggers(settings: Dynaconf | None = None, *, dry_run: bool = False) -> CycleReport:
    """Evaluate every enabled pipeline once and create the runs for its gaps.

    Returns the cycle's report: per pipeline the gaps found (with the run created for
    each), runs created and deferred, and the pipelines that could not be evaluated.
    ``dry_run=True`` only previews. Raises
    :class:`ccat_workflow_manager.ConfigurationError` or
    :class:`ccat_workflow_manager.DatabaseError`.
    """
    return _core.process_triggers(to_rust(settings), dry_run=dry_run)

"""The asyncio face, for asyncio services such as the data center's FastAPI ops-db-api.

Every function returns at once with an awaitable; the work runs in the Rust core on its
own threads (pyo3-async-runtimes), so awaiting it never blocks the event loop. Results
and errors are those of the synchronous entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust

if TYPE_CHECKING:
    # Typed dicts of the stubs only; at run time the reports are plain dicts.
    from ccat_workflow_manager._core import CycleReport, ResultReport, WorkflowReport


async def process_triggers(settings: Dynaconf | None = None, *, dry_run: bool = False) -> CycleReport:
    """One trigger-manager cycle (see ``managers.trigger_manager.process_triggers``)."""
    return await _core.aio_process_triggers(to_rust(settings), dry_run=dry_run)


async def preview_gaps(settings: Dynaconf | None = None, *, pipeline: str | None = None) -> CycleReport:
    """The gaps the trigger-manager would turn into runs now, per pipeline; creates nothing."""
    return await _core.aio_preview_gaps(to_rust(settings), pipeline=pipeline)


async def process_pending_runs(settings: Dynaconf | None = None) -> WorkflowReport:
    """One workflow-manager cycle (see ``managers.workflow_manager.process_pending_runs``)."""
    return await _core.aio_process_pending_runs(to_rust(settings))


async def process_running_steps(settings: Dynaconf | None = None) -> ResultReport:
    """One result-manager cycle (see ``managers.result_manager.process_running_steps``)."""
    return await _core.aio_process_running_steps(to_rust(settings))


async def product_lineage(product_id: int, settings: Dynaconf | None = None) -> dict[str, Any] | None:
    """Where a data product comes from (see :func:`ccat_workflow_manager.lineage.product_lineage`)."""
    return await _core.aio_product_lineage(to_rust(settings), product_id)


async def derived_products(package_id: int, settings: Dynaconf | None = None) -> list[dict[str, Any]]:
    """Every product derived from a raw data package."""
    return await _core.aio_derived_products(to_rust(settings), package_id)

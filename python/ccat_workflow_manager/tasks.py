"""The Celery tasks the managers hand work to (``DISPATCH_MODE=celery``); each calls the
Rust core. A message may arrive twice (late acknowledgement, a re-publish after a Redis
outage): the core checks the run's state first, so the second delivery does nothing.

``register(app)`` adds them to a Celery app; :func:`ccat_workflow_manager.celery_app.make_app`
does so, and ``celery -A ccat_workflow_manager.worker worker`` runs them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust

SUBMIT_RUN = "ccat_workflow_manager.tasks.submit_run"
COLLECT_RUN = "ccat_workflow_manager.tasks.collect_run"


def submit_run(run_id: int) -> dict[str, Any]:
    """Submit a run whose inputs are ready (queue ``workflow.hpc``)."""
    return _core.submit_run(to_rust(None), run_id)


def collect_run(run_id: int) -> dict[str, Any]:
    """Register the outputs of a run whose job succeeded (queue ``workflow.results``)."""
    return _core.collect_run(to_rust(None), run_id)


def register(app: Celery) -> None:
    """Registers the tasks on ``app`` under their published names."""
    app.task(name=SUBMIT_RUN)(submit_run)
    app.task(name=COLLECT_RUN)(collect_run)

"""The Celery worker's app:
``celery -A ccat_workflow_manager.worker worker -Q workflow.hpc,workflow.results``.

The worker keeps a health key ``health:workflow:celery-worker-<host>`` (or
``WORKER_HEALTH_NAME``) alive like the managers do (TTL 90 s, refreshed every 30 s),
removed when it shuts down; ``ccat-wfm health`` shows it. An idle worker is healthy.

Broker, key prefix (``CELERY_GLOBAL_KEYPREFIX``) and everything the tasks need come from
the package settings (``settings.toml`` and ``CCAT_WORKFLOW_MANAGER_*``). The Rust core
is fork-safe: under the prefork pool each child builds its own runtime and connections.
"""

from __future__ import annotations

import socket
from typing import Any

from celery import signals

from ccat_workflow_manager import _core
from ccat_workflow_manager.celery_app import make_app
from ccat_workflow_manager.config import settings, to_rust

app = make_app(settings=settings, global_keyprefix=settings.get("CELERY_GLOBAL_KEYPREFIX", ""))

_heartbeat: _core.Heartbeat | None = None


def health_name() -> str:
    """The worker's service name in ``health:workflow:<name>``: ``WORKER_HEALTH_NAME``, else
    ``celery-worker-<host>``."""
    return settings.get("WORKER_HEALTH_NAME") or f"celery-worker-{socket.gethostname()}"


@signals.worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    # In the worker's main process (under prefork, the parent of the pool's children).
    global _heartbeat
    _heartbeat = _core.start_heartbeat(health_name(), to_rust(None))


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()

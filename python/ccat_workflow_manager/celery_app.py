"""The Celery application the workflow manager's tasks run in.

The Rust managers publish protocol-2 messages to these queues on the same Redis broker;
the workers run them. JSON only, acknowledged late (a task may run twice, so tasks check
the run's state before acting).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from celery import Celery

QUEUE_STAGING = "workflow.staging"
QUEUE_HPC = "workflow.hpc"
QUEUE_RESULTS = "workflow.results"


def broker_url(settings: Any) -> str:
    """redis://[:password@]host:port/0 from Dynaconf settings (REDIS_HOST, _PORT, _PASSWORD)."""
    host = settings.get("REDIS_HOST", "localhost")
    port = settings.get("REDIS_PORT", 6379)
    password = settings.get("REDIS_PASSWORD", "")
    # Quoted: a password may hold any of @ : / %, which kombu unquotes again.
    auth = f":{quote(str(password), safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/0"


def make_app(
    broker: str | None = None,
    *,
    settings: Any = None,
    global_keyprefix: str = "",
    name: str = "ccat_workflow_manager",
) -> Celery:
    """A Celery app on `broker` (default: the Redis of `settings`, default the package's)."""
    if broker is None:
        if settings is None:
            from .config import settings as default_settings

            settings = default_settings
        broker = broker_url(settings)
    app = Celery(name, broker=broker)
    transport: dict[str, Any] = {"priority_steps": [0, 3, 6, 9], "sep": "\x06\x16"}
    if global_keyprefix:
        transport["global_keyprefix"] = global_keyprefix
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_routes={
            "ccat_workflow_manager.tasks.stage_*": {"queue": QUEUE_STAGING},
            "ccat_workflow_manager.tasks.submit_*": {"queue": QUEUE_HPC},
            "ccat_workflow_manager.tasks.collect_*": {"queue": QUEUE_RESULTS},
        },
        task_default_queue=QUEUE_HPC,
    )
    from ccat_workflow_manager import tasks

    tasks.register(app)
    return app

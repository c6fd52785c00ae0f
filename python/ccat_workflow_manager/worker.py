"""The Celery worker's app: ``celery -A ccat_workflow_manager.worker worker``.

Broker, key prefix (``CELERY_GLOBAL_KEYPREFIX``) and everything the tasks need come from
the package settings (``settings.toml`` and ``CCAT_WORKFLOW_MANAGER_*``). The Rust core
is fork-safe: under the prefork pool each child builds its own runtime and connections.
"""

from __future__ import annotations

from ccat_workflow_manager.celery_app import make_app
from ccat_workflow_manager.config import settings

app = make_app(settings=settings, global_keyprefix=settings.get("CELERY_GLOBAL_KEYPREFIX", ""))

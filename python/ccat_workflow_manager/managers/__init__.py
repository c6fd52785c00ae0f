"""The managers' entry points, as the data center's Python code calls them: one cycle
each (``trigger_manager.process_triggers``, ``workflow_manager.process_pending_runs``,
``result_manager.process_running_steps``), or a whole loop with :func:`run_manager`."""

from __future__ import annotations

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust

MANAGERS = ("trigger-manager", "workflow-manager", "result-manager")


def run_manager(name: str, settings: Dynaconf | None = None) -> None:
    """Run a manager's loop in this process until Ctrl-C.

    ``name`` is one of :data:`MANAGERS`. The loop runs in Rust with the GIL released
    (other Python threads keep running), keeps the manager's Redis heartbeat, and logs
    through Python's :mod:`logging` (loggers named after the Rust modules, e.g.
    ``ccat_workflow_manager.managers``). On Ctrl-C (or any signal whose Python handler
    raises) the current cycle finishes, the heartbeat is removed, and the exception is
    raised here. To stop the same way on SIGTERM (a container's stop), install a handler
    that raises, e.g. ``signal.signal(signal.SIGTERM, signal.default_int_handler)``.
    """
    _core.run_manager(name, to_rust(settings))

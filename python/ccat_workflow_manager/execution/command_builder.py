"""The command builder of SPEC §6, as the data center's Python code calls it.

The workflow-manager builds every job in Rust; this class shows, for a run in the
database, exactly what it would run: the argument vector (``apptainer exec`` with its
binds, or the command itself with the container runtime ``none``), the environment, and
the manifest (``docs/manifest.md``). Nothing is written and nothing is submitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust

if TYPE_CHECKING:
    # A typed dict of the stubs only; at run time a plain dict.
    from ccat_workflow_manager._core import JobPlan


class CommandBuilder:
    """Builds the command and manifest of a run's next attempt."""

    def __init__(self, settings: Dynaconf | None = None) -> None:
        self._settings = to_rust(settings)

    def build(self, run_id: int) -> JobPlan:
        """Everything about the job: ``argv``, ``env``, ``workdir``, ``manifest``,
        ``attempt_dir``, ``tag``, ``cpus``, ``memory_mb``, ``time_limit_seconds``.

        Raises :class:`LookupError` for an unknown run, and
        :class:`ccat_workflow_manager.WorkflowManagerError` naming what is missing when
        an input has no copy to read.
        """
        return _core.build_job(self._settings, run_id)

    def build_command(self, run_id: int) -> list[str]:
        """The job's argument vector (never a shell line)."""
        return self.build(run_id)["argv"]

    def build_manifest(self, run_id: int) -> dict[str, Any]:
        """The manifest the job will find at ``/workflow/config/manifest.json``."""
        return self.build(run_id)["manifest"]

"""CCAT Workflow Manager: the science-pipeline orchestrator of the CCAT Data Center.

The core is written in Rust (``ccat_workflow_manager._core``); this package is its
Python face: configuration through Dynaconf, and the entry points the data center's
Python services call.
"""

from ccat_workflow_manager._core import (
    ConfigurationError,
    DatabaseError,
    Settings,
    WorkflowManagerError,
    __version__,
)

__all__ = ["ConfigurationError", "DatabaseError", "Settings", "WorkflowManagerError", "__version__"]

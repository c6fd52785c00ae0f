"""What the three long-lived manager classes share: a core object that keeps its pool
(and whatever else makes the next cycle cheap) between calls."""

from __future__ import annotations

from types import TracebackType
from collections.abc import Awaitable
from typing import Any, Generic, Protocol, TypeVar

Report = TypeVar("Report")
ReportOut = TypeVar("ReportOut", covariant=True)
Manager = TypeVar("Manager", bound="LongLived[Any]")


class _Core(Protocol[ReportOut]):
    """The Rust manager object a class wraps (`_core.TriggerManager`, ...)."""

    def cycle(self) -> ReportOut: ...
    def acycle(self) -> Awaitable[ReportOut]: ...
    def close(self) -> None: ...


class LongLived(Generic[Report]):
    """Cycles of one manager on a kept database pool.

    Keep one instance per process and call :meth:`cycle` (or ``await`` :meth:`acycle`)
    each period; use it as a context manager, or call :meth:`close`, to release the pool.
    The pool is opened by the first cycle, so an instance made before a fork (a Celery
    master importing its tasks) opens it in the process that uses it.
    """

    _core: _Core[Report]

    def cycle(self) -> Report:
        """One cycle, blocking (other Python threads run meanwhile); its report."""
        return self._core.cycle()

    async def acycle(self) -> Report:
        """One cycle, awaited without blocking the event loop; its report."""
        return await self._core.acycle()

    def close(self) -> None:
        """Release the pool; a later cycle opens a new one and starts afresh."""
        self._core.close()

    def __enter__(self: Manager) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""A queue that runs its jobs one per reactor turn, so that a burst of costly work (the parse
of many big request lines at once) never blocks the reactor for long."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["TurnQueue"]


class TurnQueue:
    """Runs the jobs submitted to it one per reactor turn, in order (``callLater(0)``)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._jobs: deque[Callable[[], None]] = deque()
        self._scheduled = False

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        if not self._scheduled:
            self._scheduled = True
            self.clock.callLater(0, self._runOne)

    def _runOne(self) -> None:
        job = self._jobs.popleft()
        if self._jobs:
            self.clock.callLater(0, self._runOne)
        else:
            self._scheduled = False
        job()

"""Reactor work in bounded slices, so that a burst of small tasks cannot hold the reactor.

A burst of events can each ask for a little work on the reactor thread: 170 jobs whose output
grew in one batch of inotify events, 40 job runners reaped after one ``SIGCHLD``. Run at once,
they hold the reactor for tens of milliseconds, and a ``ping`` that arrives meanwhile waits
for all of them. L{TimeSlices} queues such work instead and runs it a slice per reactor turn:
at most L{SLICE} seconds, then it yields (a ``callLater(0)``), so that the connections that
became readable meanwhile are served between two slices. A slice of no time runs one task
per turn: the queue of big request lines' parses (tens of ms each) is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger(namespace="pyro_reactor.system.timeslices")

#: The longest run of queued work before the reactor gets a turn (seconds).
SLICE = 0.004


class TimeSlices:
    """A first-in first-out queue of work run on the reactor, a slice of time per turn.

    Work is queued under a key: while a key is queued, queueing it again changes nothing (the
    work it stands for, such as "look at this job's output again", will see the latest state
    anyway). The first task of a slice always runs, however long the clock says it took.
    C{busy} is the time spent running work so far, so that a source of work can pace itself
    by what its work cost (see L{whenIdle}).
    """

    def __init__(
        self,
        reactor: Any,
        slice: float = SLICE,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.reactor = reactor
        self.slice = slice
        self.clock = clock
        self._queue: dict[Hashable, Callable[[], object]] = {}
        self._turn: IDelayedCall | None = None
        self._idle: list[Callable[[], object]] = []
        self.busy = 0.0

    def __len__(self) -> int:
        return len(self._queue)

    def run(self, key: Hashable, work: Callable[[], object]) -> None:
        """Run C{work} in a coming slice, unless C{key} is queued already."""
        if key in self._queue:
            return
        self._queue[key] = work
        if self._turn is None:
            self._turn = self.reactor.callLater(0, self._slice)

    def whenIdle(self, callback: Callable[[], object]) -> None:
        """Call C{callback} once the queue is empty (now, if it is)."""
        if self._queue:
            self._idle.append(callback)
        else:
            callback()

    def cancel(self) -> None:
        """Drop every queued task and idle callback (the service is stopping)."""
        self._queue.clear()
        self._idle.clear()
        if self._turn is not None and self._turn.active():
            self._turn.cancel()
        self._turn = None

    def _slice(self) -> None:
        self._turn = None
        started = self.clock()
        deadline = started + self.slice
        while self._queue:
            key = next(iter(self._queue))
            work = self._queue.pop(key)
            try:
                work()
            except Exception:
                log.failure("queued work {key!r} failed", key=key)
            if self.clock() >= deadline:
                break
        self.busy += self.clock() - started
        if self._queue:
            if self._turn is None:
                self._turn = self.reactor.callLater(0, self._slice)
            return
        idle, self._idle = self._idle, []
        for callback in idle:
            try:
                callback()
            except Exception:
                log.failure("idle callback failed")


__all__ = ["SLICE", "TimeSlices"]

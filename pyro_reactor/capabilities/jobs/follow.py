"""Following the jobs' output files: which job printed, handled a slice of time at a time.

A job's output goes straight to its files (see the runner); the agent learns that a file grew
from inotify events on the jobs' directory. 200 jobs printing a line every 10 ms make 20 000
events a second, so L{OutputFollower}:

- reads the events raw (``system/inotify.py``: no path object per event);
- merges the events of one job into one piece of work, queued on L{TimeSlices} with the
  runners' exits: a batch of 170 jobs' output, 40 runners ending together, are handled a few
  milliseconds per reactor turn, with every other connection served in between;
- reads the next batch only once the last one's work is done, and then after four times what
  that work took (at least L{INOTIFY_PACE}, at most L{INOTIFY_MAX_PACE}): following output
  takes at most about a fifth of the reactor's time however many jobs print, and while the
  follower waits the kernel merges repeated events of one file into one.

Without inotify (or when it fails) every job is looked at every L{POLL_INTERVAL}.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from pyro_reactor.capabilities.jobs.records import STREAMS
from pyro_reactor.system.inotify import IN_CLOSE_WRITE, IN_MODIFY, IN_Q_OVERFLOW
from pyro_reactor.system.timeslices import TimeSlices

log = Logger(namespace="pyro_reactor.capabilities.jobs")

#: Seconds between two checks of the output files where inotify is missing, and of a
#: re-adopted runner without pidfd.
POLL_INTERVAL = 0.25
#: After a batch of inotify events has been handled, the agent waits before reading the next:
#: L{INOTIFY_PACE}, or four times what handling the batch took, at most L{INOTIFY_MAX_PACE}.
INOTIFY_PACE = 0.002
INOTIFY_MAX_PACE = 0.05
#: What the jobs' directory is watched for: a write to an output file, and its last close.
OUTPUT_EVENTS = IN_MODIFY | IN_CLOSE_WRITE


class OutputFollower:
    """Calls C{changed(jobId)} (through C{slices}) when a job's output files may have grown."""

    def __init__(
        self,
        reactor: Any,
        root: Path,
        jobIds: Callable[[], Iterable[str]],
        changed: Callable[[str], None],
        slices: TimeSlices,
    ) -> None:
        self.reactor = reactor
        self.root = root
        self.jobIds = jobIds
        self.changed = changed
        self.slices = slices
        self._notifier: Any = None
        self._resume: IDelayedCall | None = None
        self._poll: IDelayedCall | None = None
        #: Reading stopped until the last batch is handled and the pace waited.
        self._waiting = False

    @property
    def polling(self) -> bool:
        """Whether the files are polled (no inotify here)."""
        return self._poll is not None

    def start(self) -> None:
        """Start following: with inotify if it can, else by polling."""
        notifier: Any = None
        try:
            from pyro_reactor.system.inotify import addWatch, openINotify  # noqa: PLC0415

            notifier = openINotify(self._events, self.reactor)
            directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                addWatch(notifier.fileno(), directory, OUTPUT_EVENTS)
            finally:
                os.close(directory)
            notifier.startReading()
        except Exception as error:
            if notifier is not None:
                notifier.loseConnection()
            log.warn("no inotify for job output, polling: {error}", error=str(error))
            self._poll = self.reactor.callLater(POLL_INTERVAL, self._pollAll)
        else:
            self._notifier = notifier

    def stop(self) -> None:
        """Stop following; queued work is the owner's to cancel."""
        for call in (self._resume, self._poll):
            if call is not None and call.active():
                call.cancel()
        self._resume = self._poll = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def queue(self, jobId: str) -> None:
        """Look at C{jobId}'s output in a coming slice (once, however often asked)."""
        self.slices.run(("output", jobId), lambda: self.changed(jobId))

    def _events(self, events: list[Any], drained: bool) -> None:
        started, busy = time.perf_counter(), self.slices.busy
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                # The kernel dropped events: which jobs printed is unknown, so look at all.
                for anyJob in list(self.jobIds()):
                    self.queue(anyJob)
                continue
            jobId, _, stream = event.name.rpartition(".")
            if jobId and stream in STREAMS:
                self.queue(jobId)
        notifier = self._notifier
        if notifier is None or self._waiting:
            return
        notifier.stopReading()
        self._waiting = True
        took = time.perf_counter() - started

        def handled() -> None:
            if self._notifier is None:
                return
            spent = took + self.slices.busy - busy
            pace = min(max(INOTIFY_PACE, 4 * spent), INOTIFY_MAX_PACE)
            self._resume = self.reactor.callLater(pace, self._again)

        self.slices.whenIdle(handled)

    def _again(self) -> None:
        self._resume = None
        self._waiting = False
        if self._notifier is not None:
            self._notifier.startReading()

    def _pollAll(self) -> None:
        for jobId in list(self.jobIds()):
            self.queue(jobId)
        self._poll = self.reactor.callLater(POLL_INTERVAL, self._pollAll)


__all__ = ["INOTIFY_MAX_PACE", "INOTIFY_PACE", "POLL_INTERVAL", "OutputFollower"]

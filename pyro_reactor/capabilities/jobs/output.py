"""Following a job's two output files: sizes, what is still kept, and who waits for more.

The command appends to the files itself; the agent only learns that they grew (an inotify
event on the jobs directory, or a periodic check where inotify is missing), takes their new
sizes with ``fstat`` and wakes whoever follows them (attach streams, long polls). When a file
holds more than the limit, its oldest blocks are punched out (see L{records.punchBefore}):
offsets never move, and readers that were behind get a ``gap``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from pyro_reactor.capabilities.jobs import records

log = Logger(namespace="pyro_reactor.capabilities.jobs")

#: The largest read done on the reactor thread (see L{JobOutput.read}): an attach stream's
#: whole chunk. A page-cache read of 256 KiB takes tens of microseconds; a hop to a worker
#: thread per chunk held a 1 GiB stream at 135 MB/s, inline reads reach 220 MB/s.
INLINE_READ = 256 * 1024


class StreamFile:
    """One output stream: its read descriptor, size and first kept offset."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = records.size(fd)
        self.start = records.firstKept(fd) if self.size else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class JobOutput:
    """Both output streams of a job, and the callbacks waiting for them to change."""

    def __init__(
        self,
        paths: dict[str, Path],
        limit: int,
        inThread: Callable[..., Deferred[Any]],
    ) -> None:
        self.streams = {name: StreamFile(records.openForReading(p)) for name, p in paths.items()}
        self.limit = limit
        self._inThread = inThread
        self._listeners: list[Callable[[], None]] = []
        self._punching: Deferred[None] | None = None
        #: False once the filesystem refused a hole: output is then kept whole.
        self._canPunch = True

    def refresh(self) -> bool:
        """Take the files' sizes again; wake the listeners when something changed."""
        changed = False
        for stream in self.streams.values():
            if stream.fd < 0:
                continue
            size = records.size(stream.fd)
            if size != stream.size:
                stream.size = size
                changed = True
        if changed:
            self._trim()
            self.notify()
        return changed

    def notify(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    def listen(self, callback: Callable[[], None]) -> None:
        """Call C{callback} once, at the next change (or end)."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def settled(self) -> Deferred[None]:
        """Fires once the sizes are current and no bytes beyond the limit are kept."""
        self.refresh()
        self._trim()
        if self._punching is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._punching.addBoth(lambda _: self.settled().chainDeferred(done))
        return done

    def _trim(self) -> None:
        if self._punching is not None or not self._canPunch:
            return
        work = [
            (stream, stream.size - self.limit)
            for stream in self.streams.values()
            if stream.fd >= 0 and stream.size - stream.start > self.limit + records.HOLE_ALIGN
        ]
        if not work:
            return

        def punch() -> list[int]:
            return [records.punchBefore(s.fd, end, s.start) for s, end in work]

        def punched(starts: list[int]) -> None:
            self._punching = None
            for (stream, _), start in zip(work, starts, strict=True):
                if start <= stream.start:
                    self._canPunch = False
                    log.warn("cannot punch holes in job output: it is kept whole")
                stream.start = max(stream.start, start)

        def failed(failure: Any) -> None:
            self._punching = None
            log.failure("cannot drop old job output", failure)

        self._punching = Deferred()
        punching = self._punching
        self._inThread(punch).addCallbacks(punched, failed).addBoth(
            lambda _: punching.callback(None)
        )

    def read(self, stream: str, offset: int, count: int) -> Deferred[bytes]:
        """Up to C{count} bytes of C{stream} from C{offset}.

        Up to L{INLINE_READ} bytes are read on the reactor thread: the bytes were just written
        (so in the page cache; in a guest the state directory is a tmpfs), and a hop to a
        worker thread costs far more than such a read (a job printing a line every 10 ms
        would cost a thread hop per line). Larger reads go to a worker thread.
        """
        fd = self.streams[stream].fd
        if fd < 0:
            return succeed(b"")
        if count <= INLINE_READ:
            try:
                return succeed(records.readAt(fd, offset, count))
            except OSError:
                return fail()
        result: Deferred[bytes] = self._inThread(records.readAt, fd, offset, count)
        return result

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        self.notify()

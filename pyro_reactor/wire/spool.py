"""The upload spool: the raw body of an upload action, kept in a file until its handler runs.

Bodies go to ``upload-*.tar`` files under the state directory's ``pyro-spool/``, created 0600.
The directory holds only transfers in flight: L{emptySpool} removes whatever a previous run
left (an agent killed mid-upload leaves its file, and in a guest the state directory is RAM).

Writes happen on the reactor as the chunks arrive, as long as they are quick: a write into
the page cache (a tmpfs in a guest) takes microseconds, and a worker thread would halve the
upload's throughput for nothing (the GIL and a thread hand-off per batch). A write that
takes longer than L{STALL_SECONDS} (a disk under writeback) moves the rest of that upload to
the agent's worker threads, in order and with backpressure, so a slow disk never blocks the
reactor twice. ``benchmarks/bench_abuse.py`` measures a ``ping`` during 200 MiB uploads
(docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import BudgetExceeded, Reservation

log = Logger(namespace="pyro_reactor.wire.spool")

_DESCRIPTORS_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def spoolError(error: OSError, doing: str) -> ActionError:
    """The answer for an ``OSError`` while spooling (no path in it: the client never sees ours)."""
    if error.errno in _DESCRIPTORS_EXHAUSTED:
        return ActionError(f"could not {doing}: the agent is out of file descriptors, try again")
    return ActionError(f"could not {doing}: {error.strerror}")


def emptySpool(directory: Path) -> int:
    """Remove every file a previous run left in the spool; the number removed.

    Called once at start-up, before the agent listens: nothing of this run is in flight yet.
    """
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for entry in os.scandir(directory):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as error:
            log.warn(
                "could not remove {name} from the spool: {error}",
                name=entry.name,
                error=error.strerror,
            )
    if removed:
        log.info("spool emptied: {removed} files left by an earlier run", removed=removed)
    return removed


InThread = Callable[..., "Deferred[Any]"]

STALL_SECONDS = 0.002
"""A write on the reactor slower than this moves the rest of its upload to worker threads."""

BACKLOG_HIGH = 4 * 1024 * 1024
"""Bytes received but not yet written past which the connection stops being read."""

BACKLOG_LOW = 1024 * 1024
"""Bytes still to write below which a paused connection is read again."""


_IOV_MAX = 1024


def _writeAll(fd: int, chunks: list[bytes]) -> None:
    """Write every chunk, in order, with as few system calls (and GIL hand-overs) as can be."""
    views = [memoryview(chunk) for chunk in chunks if chunk]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


class UploadSpool:
    """One upload body being written to its spool file.

    L{write} takes the bytes as they arrive and returns how many belonged to the body (never
    more than is still missing); L{finish} fires with the file's path once every byte is
    written and the file closed: the path then belongs to the request (the handler reads it;
    the protocol removes it after the answer). L{discard} removes everything, whenever the
    upload cannot complete. Errors are L{ActionError}s ready to answer.

    With ``inThread``, once a write on the reactor was slow (L{STALL_SECONDS}), the writes
    happen in worker threads, one batch at a time and in order, so that a slow disk never
    blocks the reactor: L{backlog} says how many bytes wait to be written. They are held
    from the memory budget through ``hold`` as they wait: L{full} says to stop reading (above
    L{BACKLOG_HIGH}, or when the budget cannot hold them: an upload is slowed down by a full
    budget, never refused by it), and ``onDrained`` is called each time a batch written
    leaves the writes caught up (below L{BACKLOG_LOW}, and all held). Without ``inThread``,
    each write happens at once.
    """

    def __init__(
        self,
        directory: Path,
        size: int,
        inThread: InThread | None = None,
        onDrained: Callable[[], None] | None = None,
        hold: Reservation | None = None,
    ) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=directory)
        except OSError as error:
            raise spoolError(error, "spool the upload") from None
        self.path: Path | None = Path(name)
        self._fd: int | None = fd
        self.size = size
        self.remaining = size
        self.backlog = 0
        self._inThread = inThread
        self._onDrained = onDrained
        self._hold = hold
        self._queue: list[bytes] = []
        self._writing = False
        self._error: ActionError | None = None
        self._finished: Deferred[Path] | None = None
        self._threaded = False

    @property
    def received(self) -> int:
        return self.size - self.remaining

    @property
    def full(self) -> bool:
        """Whether reading should stop until ``onDrained``: too much waits to be written,
        or more than the memory budget could hold."""
        held = self._hold.size if self._hold is not None else self.backlog
        return self.backlog > BACKLOG_HIGH or held < self.backlog

    def _holdBacklog(self) -> None:
        """Hold the bytes waiting to be written from the budget, as many as it can give."""
        if self._hold is None:
            return
        try:
            self._hold.resize(self.backlog)
        except BudgetExceeded:
            self._hold.resize(min(self.backlog, self._hold.size + self._hold.budget.available))

    def write(self, data: bytes) -> int:
        """Keep the next bytes of the body; how many of ``data`` belonged to it."""
        if self._error is not None:
            raise self._error
        assert self._fd is not None
        chunk = data[: self.remaining] if len(data) > self.remaining else data
        self.remaining -= len(chunk)
        if not self._threaded:
            started = time.monotonic()
            try:
                _writeAll(self._fd, [chunk])
            except OSError as error:
                self.discard()
                raise spoolError(error, "spool the upload") from None
            if self._inThread is not None and time.monotonic() - started > STALL_SECONDS:
                log.info(
                    "spool write stalled for {stall_ms:.1f} ms: the rest of this upload is"
                    " written by worker threads",
                    stall_ms=(time.monotonic() - started) * 1000,
                )
                self._threaded = True
            return len(chunk)
        self._queue.append(chunk)
        self.backlog += len(chunk)
        self._holdBacklog()
        self._pump()
        return len(chunk)

    def _pump(self) -> None:
        if self._writing or self._fd is None:
            return
        if not self._queue:
            self._settle()
            return
        assert self._inThread is not None
        batch, self._queue = self._queue, []
        self._writing = True
        self._inThread(_writeAll, self._fd, batch).addCallbacks(
            lambda _: self._written(sum(len(chunk) for chunk in batch)), self._failed
        )

    def _written(self, size: int) -> None:
        self._writing = False
        self.backlog -= size
        self._holdBacklog()
        if self.path is None:
            self._close()  # discarded while the batch was being written
            return
        if self.backlog < BACKLOG_LOW and not self.full and self._onDrained is not None:
            self._onDrained()  # the protocol resumes reading if it had paused
        self._pump()

    def _failed(self, failure: Failure) -> None:
        self._writing = False
        error = failure.value
        self._error = (
            spoolError(error, "spool the upload")
            if isinstance(error, OSError)
            else ActionError(f"could not spool the upload: {error}")
        )
        self._queue = []
        self.backlog = 0
        self._holdBacklog()
        self._settle()

    def _settle(self) -> None:
        """Everything queued is written (or failed): fire L{finish}'s Deferred if asked."""
        finished = self._finished
        if finished is None or self._writing or self._queue:
            return
        self._finished = None
        if self._error is not None:
            self.discard()
            finished.errback(self._error)
            return
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
        except OSError as error:
            self.discard()
            finished.errback(spoolError(error, "spool the upload"))
            return
        if self._hold is not None:
            self._hold.release()
        path, self.path = self.path, None
        assert path is not None
        finished.callback(path)

    def finish(self) -> Deferred[Path]:
        """Once the whole body is written and its file closed, its path (handed over)."""
        assert self.remaining == 0 and self._finished is None
        self._finished = Deferred()
        finished = self._finished
        self._settle()
        return finished

    def discard(self) -> None:
        """Close and remove the file, if this spool still owns it.

        A batch being written in a worker thread keeps the descriptor until it is done.
        """
        self._queue = []
        if self.path is not None:
            path, self.path = self.path, None
            path.unlink(missing_ok=True)
        if not self._writing:
            self._close()

    def _close(self) -> None:
        if self._hold is not None:
            self._hold.release()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

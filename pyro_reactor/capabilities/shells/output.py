"""A shell's output stream: each concern its own small object, put together by L{ShellOutput}.

- decoding: an incremental UTF-8 decoder (invalid bytes become U+FFFD, a character split
  between two reads is decoded whole);
- redaction: L{StreamRedactor}, which only hands out decided text, so cursors never shift;
- the log: L{ShellLog}, where every decided character goes first (capped and rotated);
- the memory window: L{OutputWindow}, the last characters kept in memory, bounded in bytes;
- waiters: L{OutputWaiters}, long-polling ``read_shell`` calls, each cancellable.

The redacted stream's characters are numbered from 0: those are ``read_shell``'s cursors.
"""

from __future__ import annotations

import codecs
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pyro_reactor.capabilities.shells.encoding import fitEncoded
from pyro_reactor.capabilities.shells.log import ShellLog, readSegments
from pyro_reactor.capabilities.shells.redact import StreamRedactor
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import BudgetExceeded, Reservation

DEFAULT_LOG_BYTES = 64 * 1024 * 1024
"""``--log-bytes``'s default: the size at which a shell log is rotated."""


class OutputWindow:
    """The most recent characters of a stream, at most ``maxBytes`` of memory (whole chunks
    are let go from the oldest on; ``sys.getsizeof`` counts what a chunk really holds, one to
    four bytes a character).

    With a ``reservation``, the bytes held are also drawn from the agent's memory budget; when
    the budget is short, the window holds less (older output is read from the log anyway).
    """

    def __init__(self, maxBytes: int, reservation: Reservation | None = None) -> None:
        self.maxBytes = max(maxBytes, 0)
        self._reservation = reservation
        self.length = 0
        self.start = 0
        """The first character still held."""
        self.bytes = 0
        self._chunks: list[str] = []
        self._starts: list[int] = []
        self._sizes: list[int] = []
        self._head = 0

    def append(self, text: str) -> None:
        size = sys.getsizeof(text)
        self._chunks.append(text)
        self._starts.append(self.length)
        self._sizes.append(size)
        self.length += len(text)
        self.bytes += size
        self._trim(self.maxBytes)
        reservation = self._reservation
        if reservation is not None:
            try:
                reservation.resize(self.bytes)
            except BudgetExceeded:
                self._trim(reservation.size + reservation.budget.available)
                reservation.resize(self.bytes)

    def release(self) -> None:
        """The shell is closed: give the budget back (the text goes with the session)."""
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def _trim(self, limit: int) -> None:
        chunks, sizes = self._chunks, self._sizes
        while self._head < len(chunks) and self.bytes > limit:
            chunks[self._head] = ""
            self.bytes -= sizes[self._head]
            self._head += 1
        self.start = self._starts[self._head] if self._head < len(chunks) else self.length
        if self._head > 64 and self._head * 2 > len(chunks):
            del chunks[: self._head]
            del self._starts[: self._head]
            del sizes[: self._head]
            self._head = 0

    def slice(self, start: int, stop: int) -> str:
        """Characters ``[start, stop)``, which must lie in the window."""
        assert self.start <= start <= stop <= self.length
        if start == stop:
            return ""
        chunks, starts = self._chunks, self._starts
        index = bisect_right(starts, start, lo=self._head) - 1
        pieces = []
        position = start
        while position < stop:
            chunkStart = starts[index]
            chunk = chunks[index]
            pieces.append(chunk[position - chunkStart : stop - chunkStart])
            position = chunkStart + len(chunk)
            index += 1
        return "".join(pieces)


class OutputWaiters:
    """Readers waiting for more output; each wait ends on L{wake}, its timeout, or its
    cancellation (the client went away), and then leaves no timer behind."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: dict[Deferred[None], IDelayedCall] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def timers(self) -> list[IDelayedCall]:
        """The timeouts of the waits in progress."""
        return list(self._waiting.values())

    def wait(self, seconds: float) -> Deferred[None]:
        def cancel(waiter: Deferred[None]) -> None:
            timer = self._waiting.pop(waiter, None)
            if timer is not None and timer.active():
                timer.cancel()

        waiter: Deferred[None] = Deferred(cancel)

        def expire() -> None:
            if self._waiting.pop(waiter, None) is not None:
                waiter.callback(None)

        self._waiting[waiter] = self._clock.callLater(seconds, expire)
        return waiter

    def wake(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiter, timer in waiting.items():
            if timer.active():
                timer.cancel()
            waiter.callback(None)


class ShellOutput:
    """A shell's output: decoded, redacted, logged, kept in a bounded window, waited on.

    Everything decided goes to the log first, so any range since the log's first character
    is there; the last ``windowBytes`` of it (at most) are also in memory.
    """

    def __init__(  # noqa: PLR0917
        self,
        logPath: Path,
        secrets: Iterable[str],
        windowBytes: int,
        clock: IReactorTime,
        logBytes: int = DEFAULT_LOG_BYTES,
        reservation: Reservation | None = None,
    ) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._redactor = StreamRedactor(secrets)
        self.log = ShellLog(logPath, logBytes)
        self.window = OutputWindow(windowBytes, reservation)
        self.waiters = OutputWaiters(clock)
        self.ended = False

    @property
    def length(self) -> int:
        """Characters of the redacted stream so far."""
        return self.window.length

    @property
    def windowStart(self) -> int:
        """The first character still held in memory."""
        return self.window.start

    @property
    def first(self) -> int:
        """The first character that can still be read."""
        return min(self.log.first, self.window.start)

    def feed(self, data: bytes) -> None:
        """Bytes from the terminal."""
        text = self._decoder.decode(data)
        if text:
            self._append(self._redactor.feed(text))

    def finish(self) -> None:
        """The terminal is gone: decide what was held back, wake readers.

        The log stays open (for reads below the window) until L{closeLog}.
        """
        if self.ended:
            return
        tail = self._decoder.decode(b"", final=True)
        self.ended = True
        self._append(self._redactor.feed(tail) + self._redactor.finish())
        self.waiters.wake()

    def closeLog(self) -> None:
        """The shell is closed: close the log, give the window's budget back."""
        if not self.log.closed:
            self.log.close()
        self.window.release()

    def _append(self, text: str) -> None:
        if not text:
            return
        self.log.append(text, self.window.length)
        self.window.append(text)
        self.waiters.wake()

    def read(
        self, start: int, stop: int, inThread: Callable[..., Deferred[str]], limit: int
    ) -> str | Deferred[str]:
        """Characters ``[start, stop)`` (``start`` at least L{first}), cut to at most ``limit``
        bytes once JSON-encoded: from memory if there, else from the log in a thread."""
        if start >= self.window.start:
            return fitEncoded(self.window.slice(start, stop), limit).text
        if start < self.log.first or min(stop, self.window.start) > self.log.end:
            raise ActionError(
                f"shell output before character {self.window.start} is no longer available:"
                " the shell log could not be written"
            )
        # What the log holds, up to the window at most (the rest comes with the next read).
        stop = min(stop, self.log.end)
        try:
            plan = self.log.plan(start, stop)
        except OSError as error:
            raise ActionError(f"cannot read the shell log: {error.strerror or error}") from None
        return inThread(readSegments, plan, limit)

    def waitBeyond(self, cursor: int, seconds: float) -> Deferred[None]:
        """Fires once the stream is longer than ``cursor``, it has ended, or ``seconds``
        passed. Cancelling it forgets the wait and its timer."""
        if self.length > cursor or self.ended or seconds <= 0:
            return succeed(None)
        return self.waiters.wait(seconds)


__all__ = ["DEFAULT_LOG_BYTES", "OutputWaiters", "OutputWindow", "ShellOutput"]

"""A job's stdin: what hosts sent that the job has not read yet, bounded and budgeted.

Input is queued here, not in the pipe's transport: the transport is given a piece at a time
while it does not pause us (it holds at most about two pieces), and L{StdinQueue} counts the
rest, at most L{MAX_QUEUED_STDIN} bytes per job, held from the agent's memory budget. A
``write_job`` that does not fit is refused whole (L{StdinQueue.write}); an attach stream takes
what fits (L{StdinQueue.offer}) and stops reading its connection until L{StdinQueue.whenRoom}
fires, so a host that keeps sending blocks instead of growing the agent. When the pipe goes
(the job closed its stdin or ended, or the agent let it go) what is queued is dropped and the
budget given back.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import Reservation

MAX_QUEUED_STDIN = 4 * 1024 * 1024
"""Bytes of stdin a job may have waiting beyond its pipe (the same bound as a shell's input)."""


class StdinFull(ActionError):
    """A write that does not fit in the job's stdin queue; nothing of it was queued."""


@implementer(IPushProducer)
class StdinQueue:
    """The stdin of one running job, fed to the runner's pipe as fast as the job reads it.

    ``pipe`` is the runner's process transport (a consumer of its fd 0). L{queued} is what
    waits here; those bytes are held in ``reservation``. Waiters of L{whenRoom} are told once
    the queue has drained to half the bound (or was dropped), so a blocked sender resumes in
    large steps rather than one pipe's worth at a time; they are told on a later turn of
    ``clock``, never inside the call that drained or dropped the queue (which may be the job's
    machine ending).
    """

    piece = 64 * 1024

    def __init__(
        self,
        jobId: str,
        pipe: Any,
        clock: IReactorTime,
        reservation: Reservation | None = None,
        bound: int = MAX_QUEUED_STDIN,
    ) -> None:
        self.jobId = jobId
        self.bound = bound
        self.queued = 0
        self._pipe = pipe
        self._clock = clock
        self._reservation = reservation
        self._pending: deque[bytes] = deque()
        self._offset = 0
        self._paused = False
        self._closing = False
        self._done = False
        self._waiters: list[Deferred[None]] = []
        self._registered = True
        pipe.registerProducer(self, True)

    @property
    def room(self) -> int:
        """Bytes that may still be queued."""
        return 0 if self._done else max(self.bound - self.queued, 0)

    def write(self, data: bytes) -> None:
        """Queue all of ``data`` or nothing: L{StdinFull} (or L{BudgetExceeded}) when it does
        not fit."""
        if len(data) > self.room:
            raise StdinFull(
                f"job {self.jobId!r} has {self.queued} bytes of stdin queued that it has not"
                f" read yet, and at most {self.bound} may wait: cannot queue {len(data)} more"
                " (nothing was written); retry once the job reads, or send less"
            )
        self._queue(data)

    def offer(self, data: bytes) -> int:
        """Queue as much of ``data`` as fits; how many bytes were taken."""
        taken = data[: self.room]
        self._queue(taken)
        return len(taken)

    def whenRoom(self) -> Deferred[None]:
        """Fires once at most half the bound is queued, or the queue was dropped."""
        if self._done or self.queued <= self.bound // 2:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def close(self) -> None:
        """Close the pipe once everything queued has been handed to it."""
        self._closing = True
        self._flush()

    def drop(self) -> None:
        """Forget what is queued (the pipe is gone or going) and give the budget back."""
        if self._done and not self._pending:
            return
        self._done = True
        self._pending.clear()
        self._offset = 0
        self.queued = 0
        self._paused = True
        if self._reservation is not None:
            self._reservation.release()
        self._letGo()
        self._wake()

    def _queue(self, data: bytes) -> None:
        if not data:
            return
        if self._reservation is not None:
            self._reservation.grow(len(data))
        self._pending.append(data)
        self.queued += len(data)
        self._flush()

    def _flush(self) -> None:
        if self._done:
            return
        while self._pending and not self._paused:
            first = self._pending[0]
            chunk = first[self._offset : self._offset + self.piece]
            self._offset += len(chunk)
            if self._offset >= len(first):
                self._pending.popleft()
                self._offset = 0
            self.queued -= len(chunk)
            # May call pauseProducing() before it returns.
            self._pipe.write(chunk)
        if self._reservation is not None:
            self._reservation.resize(self.queued)
        if self._closing and not self._pending:
            self._done = True
            self._letGo()
            self._pipe.closeChildFD(0)
        if self.queued <= self.bound // 2 or self._done:
            self._wake()

    def _letGo(self) -> None:
        # A registered producer would keep the pipe open after loseConnection.
        if self._registered:
            self._registered = False
            self._pipe.unregisterProducer()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._clock.callLater(0, waiter.callback, None)

    # -- IPushProducer: the pipe's transport pauses us while it holds a full buffer ---------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self.drop()


__all__ = ["MAX_QUEUED_STDIN", "StdinFull", "StdinQueue"]

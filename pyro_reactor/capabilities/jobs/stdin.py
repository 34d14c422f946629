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

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from pyro_reactor.capabilities.inputqueue import InputQueue
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import Reservation

MAX_QUEUED_STDIN = 4 * 1024 * 1024
"""Bytes of stdin a job may have waiting beyond its pipe (the same bound as a shell's input)."""


class StdinFull(ActionError):
    """A write that does not fit in the job's stdin queue; nothing of it was queued."""


class StdinQueue(InputQueue):
    """The stdin of one running job, fed to the runner's pipe as fast as the job reads it.

    ``pipe`` is the runner's process transport (a consumer of its fd 0). L{queued} is what
    waits here; those bytes are held in ``reservation``. Waiters of L{whenRoom} are told once
    the queue has drained to half the bound (or was dropped), so a blocked sender resumes in
    large steps rather than one pipe's worth at a time; they are told on a later turn of
    ``clock``, never inside the call that drained or dropped the queue (which may be the job's
    machine ending).
    """

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
        self._pipe = pipe
        self._clock = clock
        self._closing = False
        self._done = False
        self._waiters: list[Deferred[None]] = []
        self._registered = True
        super().__init__(pipe, reservation)

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
        super().write(data)

    def offer(self, data: bytes) -> int:
        """Queue as much of ``data`` as fits; how many bytes were taken."""
        taken = data[: self.room]
        super().write(taken)
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
        super().drop()
        self._letGo()
        self._wake()

    def _flush(self) -> None:
        if not self._done:
            super()._flush()

    def _flushed(self) -> None:
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


__all__ = ["MAX_QUEUED_STDIN", "StdinFull", "StdinQueue"]

"""Input for a child process, handed to its terminal or pipe a piece at a time, in bounded memory.

Shells (their PTY) and jobs (their stdin pipe) queue what hosts write here rather than in the
process transport: the transport is given one piece at a time while it does not pause us (it
holds at most about two pieces), and L{InputQueue.queued} counts the rest, which is also held
from the agent's memory budget (``reservation``): a write that does not fit is refused,
queuing nothing.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from pyro_reactor.wire.budget import Reservation


@implementer(IPushProducer)
class InputQueue:
    """Bytes waiting for a consumer that reads them at its own pace; the consumer's producer."""

    piece = 64 * 1024

    def __init__(self, consumer: IConsumer, reservation: Reservation | None = None) -> None:
        self._consumer = consumer
        self._reservation = reservation
        self._pending: deque[bytes] = deque()
        self._offset = 0
        self.queued = 0
        self._paused = False
        consumer.registerProducer(self, True)

    def write(self, data: bytes) -> None:
        """Queue ``data`` (raises L{BudgetExceeded}, queuing nothing, past the budget)."""
        if not data:
            return
        if self._reservation is not None:
            self._reservation.grow(len(data))
        self._pending.append(data)
        self.queued += len(data)
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self._paused:
            first = self._pending[0]
            chunk = first[self._offset : self._offset + self.piece]
            self._offset += len(chunk)
            if self._offset >= len(first):
                self._pending.popleft()
                self._offset = 0
            self.queued -= len(chunk)
            # May call pauseProducing() before it returns.
            self._consumer.write(chunk)
        if self._reservation is not None:
            self._reservation.resize(self.queued)
        self._flushed()

    def _flushed(self) -> None:
        """Called after each flush (a subclass reacts to what drained)."""

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self.drop()

    def drop(self) -> None:
        """Forget what is queued (the consumer is closing) and stop producing."""
        self._pending.clear()
        self._offset = 0
        self.queued = 0
        self._paused = True
        if self._reservation is not None:
            self._reservation.release()

"""The wire protocol: one JSON request line per connection, one answer, then close.

``RequestProtocol`` only frames bytes. It reads the request line (bounded by
``maxRequestBytes`` and by the agent's memory budget), has an upload's raw body written to its
L{UploadSpool}, hands the whole request to the L{Dispatcher}, and has the answer written by its
answer side (L{Answering}, in ``answering.py``): one JSON line, a JSON header line followed by
a streamed file, or a JSON header line after which the connection is handed to the protocol of
a streaming action (L{HandOff}). ``RequestFactory`` counts the connections.

Deadlines: the request line must arrive within ``timeout`` seconds of the connection, and an
upload's body at no less than ``minUploadRate`` bytes a second averaged over the whole
upload (a trickle of bytes does not restart any timer). An answer the client stops reading is
dropped after ``answerTimeout`` seconds without progress. A connection beyond the factory's
``maxConnections`` gets one second to send its line, and only a ``ping`` is answered there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.errors import ActionError
from pyro_reactor.system.timeslices import TimeSlices
from pyro_reactor.wire.answering import Answering, Encoder
from pyro_reactor.wire.budget import MemoryBudget, ParseCost, Reservation
from pyro_reactor.wire.dispatch import Dispatcher
from pyro_reactor.wire.limits import (
    EARLY_BYTES_LIMIT,
    LARGE_LINE_BYTES,
    LINE_HOLD_STEP,
    OVERFLOW_LINE_BYTES,
    WireLimits,
)
from pyro_reactor.wire.phases import Phase
from pyro_reactor.wire.receiving import Receiving
from pyro_reactor.wire.request import Request, parseRequestLine
from pyro_reactor.wire.sender import encodeAnswer
from pyro_reactor.wire.spool import InThread, UploadSpool

__all__ = [
    "EARLY_BYTES_LIMIT",
    "RequestFactory",
    "RequestProtocol",
    "WireLimits",
    "encodeAnswer",
]

log = Logger(namespace="pyro_reactor.wire.protocol")

TOO_MANY_CONNECTIONS = "too many connections"


def parseTurns(clock: IReactorTime) -> TimeSlices:
    """The queue of big lines' parses: one parse per reactor turn (a slice of no time runs
    one task), each connection's single pending parse under the connection as its key."""
    return TimeSlices(clock, slice=0)


@implementer(IHalfCloseableProtocol)
class RequestProtocol(Receiving, Answering, Protocol):
    """Frames one request and its answer on one connection.

    A client may half-close after its request (``shutdown(SHUT_WR)``), as the reference
    allows: a last line without its newline is still the request, and an upload body that
    ends early is answered with an error.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        spoolDirectory: Path,
        maxRequestBytes: int,
        timeout: float,
        *,
        encodeInThread: Encoder | None = None,
        limits: WireLimits | None = None,
        budget: MemoryBudget | None = None,
        overflow: bool = False,
        writeInThread: InThread | None = None,
        parseQueue: TimeSlices | None = None,
    ) -> None:
        limits = limits if limits is not None else WireLimits()
        self.parseQueue = parseQueue if parseQueue is not None else parseTurns(clock)
        self.dispatcher = dispatcher
        self.encodeInThread = encodeInThread
        self.clock = clock
        self.spoolDirectory = spoolDirectory
        self.maxRequestBytes = maxRequestBytes
        self.timeout = timeout
        self.limits = limits
        self.budget = budget if budget is not None else MemoryBudget()
        self.overflow = False
        self._counted = False
        if overflow:
            self._overflow()
        self.writeInThread = writeInThread
        self._phase = Phase.READING_LINE
        self._buffer = bytearray()
        #: The parse cost of a big line in the buffer, counted as it arrives.
        self._bufferCost = ParseCost()
        self._timer: IDelayedCall | None = None
        self._request: Request | None = None
        self._spool: UploadSpool | None = None
        self._lost = False
        self._pendingLog: Callable[[], None] | None = None
        self._pending: Deferred[Any] | None = None
        self._deadline = 0.0
        self._bodyStarted = self._lastProgress = 0.0
        self._early = bytearray()
        self._earlyEOF = False
        self._paused = False
        self._handedTo: IProtocol | None = None
        self._lineHold: Reservation | None = None
        self._answerHold: Reservation | None = None
        self._upload: Path | None = None

    # -- connection events ---------------------------------------------------------------

    def _overflow(self) -> None:
        """This connection is beyond the cap: it may only ping, a few bytes within a second."""
        self.overflow = True
        self.maxRequestBytes = min(self.maxRequestBytes, OVERFLOW_LINE_BYTES)
        self.timeout = min(self.timeout, self.limits.overflowTimeout)

    def connectionMade(self) -> None:
        factory = self.factory
        if isinstance(factory, RequestFactory):
            # Counted once connected (never for a protocol built and dropped).
            self._counted = True
            if not factory.admit(self):
                self._overflow()
        self._deadline = self.clock.seconds() + self.timeout
        self._timer = self.clock.callLater(self.timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._phase == Phase.READING_LINE:
            self._receiveLine(data)
        elif self._phase == Phase.READING_BODY:
            self._receiveBody(data)
        elif self._phase == Phase.HANDED_OFF:
            assert self._handedTo is not None
            self._handedTo.dataReceived(data)
        elif self._phase in (Phase.WORKING, Phase.PARSING):
            self._keepEarly(data)
        # Bytes after a complete request are otherwise ignored, as the reference ignores them.

    def _keepEarly(self, data: bytes) -> None:
        self._early += data
        if len(self._early) >= EARLY_BYTES_LIMIT and not self._paused:
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()

    def readConnectionLost(self) -> None:
        if self._phase == Phase.HANDED_OFF:
            handedTo = self._handedTo
            if IHalfCloseableProtocol.providedBy(handedTo):
                handedTo.readConnectionLost()
            else:
                assert self.transport is not None
                self.transport.loseConnection()
            return
        if self._phase in (Phase.WORKING, Phase.PARSING):
            self._earlyEOF = True
            return
        if self._phase == Phase.READING_LINE:
            self._receiveLine(b"\n")
        elif self._phase == Phase.READING_BODY:
            self._logCutOff()
            self._discardSpool()
            self._refuse(ActionError("unexpected EOF while reading archive payload"))

    def writeConnectionLost(self) -> None:
        """Nothing to do: the answer can no longer be delivered, the work still ends."""
        if self._phase == Phase.HANDED_OFF and IHalfCloseableProtocol.providedBy(self._handedTo):
            self._handedTo.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancelTimer()
        self._releaseLine()
        if self._handedTo is not None:
            handedTo, self._handedTo = self._handedTo, None
            handedTo.connectionLost(reason)
        if self._phase == Phase.READING_BODY:
            self._logCutOff()
        self._discardSpool()
        self._phase = Phase.DONE
        pending, self._pending = self._pending, None
        if pending is not None:
            # The client left before its answer: a cancellable handler stops waiting now.
            pending.cancel()
        self._answered()
        factory = self.factory
        if self._counted and isinstance(factory, RequestFactory):
            self._counted = False
            factory.connectionClosed(self)

    def _logCutOff(self) -> None:
        log.warn(
            "upload cut off: {missing} of its bytes never arrived",
            missing=self._spool.remaining if self._spool else None,
            action=self._request.action if self._request else None,
            outcome="cut-off",
        )

    # -- framing -------------------------------------------------------------------------

    def _receiveLine(self, data: bytes) -> None:
        newline = data.find(b"\n")
        end = len(data) if newline < 0 else newline
        if len(self._buffer) + end > self.maxRequestBytes:
            self._refuse(
                ActionError(f"request line exceeds the maximum of {self.maxRequestBytes} bytes")
            )
            return
        if newline < 0:
            self._buffer += data
            if len(self._buffer) > LARGE_LINE_BYTES:
                self._bufferCost.add(self._buffer, self._bufferCost.size)
            self._holdLine(len(self._buffer))
            return
        line: bytes | bytearray
        if self._buffer:
            # The buffer itself becomes the line (a copy of 16 MiB costs 5 ms on the reactor).
            self._buffer += data[:newline]
            line, self._buffer = self._buffer, bytearray()
        else:
            line = data[:newline]
        cost, self._bufferCost = self._bufferCost, ParseCost()
        rest = data[newline + 1 :]
        if len(line) > LARGE_LINE_BYTES:
            cost.add(line, cost.size)
            # A big line costs tens of ms to parse: one such parse per reactor turn, so that
            # many at once (clients closing together) never block the reactor long. What
            # arrives meanwhile waits with the early bytes.
            self._phase = Phase.PARSING
            self._early += rest
            self.parseQueue.run(self, lambda: self._parseLater(line, cost))
            return
        self._lineReceived(line, rest, cost)

    def _parseLater(self, line: bytes | bytearray, cost: ParseCost) -> None:
        if self._lost or self._phase != Phase.PARSING:
            self._releaseLine()
            return
        rest, self._early = bytes(self._early), bytearray()
        if self._paused:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()
        self._phase = Phase.READING_LINE
        self._lineReceived(line, rest, cost)
        if self._earlyEOF and self._phase == Phase.READING_BODY:
            self.readConnectionLost()

    def _lineReceived(self, line: bytes | bytearray, rest: bytes, cost: ParseCost) -> None:
        try:
            request = self._request = self._parse(line, cost)
            if self.overflow and request.fields.get("action") != "ping":
                raise ActionError(TOO_MANY_CONNECTIONS)
            size = self.dispatcher.uploadSize(request)
        except ActionError as error:
            self._refuse(error)
            return
        finally:
            self._releaseLine()
        if size is None:
            self._dispatch()
            if rest:
                self.dataReceived(rest)
            return
        self._startBody(size)
        if rest and self._phase == Phase.READING_BODY:
            self._receiveBody(rest)

    def _holdLine(self, size: int) -> None:
        """Draw a line in flight from the memory budget, a step at a time."""
        if size < LINE_HOLD_STEP and self._lineHold is None:
            return
        if self._lineHold is None:
            self._lineHold = self.budget.reserve(0, "a request line in flight")
        if size > self._lineHold.size:
            try:
                # A growing bytearray holds up to an eighth more than its length.
                self._lineHold.resize(size + size // 8 + LINE_HOLD_STEP)
            except ActionError as error:
                self._refuse(error)

    def _releaseLine(self) -> None:
        hold, self._lineHold = self._lineHold, None
        if hold is not None:
            hold.release()

    def _parse(self, line: bytes | bytearray, cost: ParseCost) -> Request:
        if len(line) <= LARGE_LINE_BYTES:
            return parseRequestLine(line)
        # The parse of a big line can take many times its size (a million tiny objects):
        # its estimate is drawn from the budget for as long as the parse runs.
        hold = self.budget.reserve(cost.bytes, "the parse of a request line")
        try:
            return parseRequestLine(line)
        finally:
            hold.release()

    def _dispatch(self) -> None:
        assert self._request is not None
        self._cancelTimer()
        self._phase = Phase.WORKING
        pending = self.dispatcher.dispatch(self._request, self._logAfterAnswer)
        pending.addCallback(self._answer).addErrback(self._answerFailed)
        if not pending.called:
            self._pending = pending

    def _logAfterAnswer(self, emit: Callable[[], None]) -> None:
        # The request's log event waits until the answer is out and the connection closed
        # (see Dispatcher.dispatch): writing it would otherwise delay every answer.
        if self._lost:
            emit()
        else:
            self._pendingLog = emit

    # -- refusals (the answers themselves: Answering) -----------------------------------

    def _refuse(self, error: ActionError) -> None:
        self._cancelTimer()
        self._buffer = bytearray()
        self._bufferCost = ParseCost()
        self._releaseLine()
        self._discardSpool()
        action = self._request.fields.get("action", "exec") if self._request else None
        self._phase = Phase.ANSWERING
        self._writeLine(encodeAnswer(self.dispatcher.reject(error, action)))

    # -- housekeeping --------------------------------------------------------------------

    def _timedOut(self) -> None:
        self._timer = None
        spool = self._spool
        if spool is not None and self.limits.minUploadRate > 0:
            # The body may take as long as its bytes at the minimum rate, averaged over the
            # whole upload: the deadline moves by what arrived, never restarts.
            deadline = self._deadline + spool.received / self.limits.minUploadRate
            now = self.clock.seconds()
            if deadline > now:
                self._timer = self.clock.callLater(deadline - now, self._timedOut)
                return
        log.info(
            "connection closed: no complete request in time ({timeout} s for the line, then"
            " {rate} bytes/s)",
            timeout=self.timeout,
            rate=self.limits.minUploadRate,
            outcome="timeout",
        )
        self._discardSpool()
        self._releaseLine()
        assert self.transport is not None
        self.transport.loseConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _answered(self) -> None:
        emit, self._pendingLog = self._pendingLog, None
        if emit is not None:
            emit()


class RequestFactory(Factory):
    """Builds a L{RequestProtocol} per connection, all sharing one dispatcher and budget.

    Counts the open connections: beyond ``limits.maxConnections`` a connection is an
    overflow one (one second for its line, only ``ping`` answered), so that descriptors stay
    free for real work and a ping always gets through.
    """

    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        spoolDirectory: Path,
        maxRequestBytes: int = 16 * 1024 * 1024,
        timeout: float = 60.0,
        *,
        encodeInThread: Encoder | None = None,
        limits: WireLimits | None = None,
        budget: MemoryBudget | None = None,
        writeInThread: InThread | None = None,
    ) -> None:
        limits = limits if limits is not None else WireLimits()
        self.writeInThread = writeInThread
        self.dispatcher = dispatcher
        self.clock = clock
        self.spoolDirectory = spoolDirectory
        self.maxRequestBytes = maxRequestBytes
        self.timeout = timeout
        self.encodeInThread = encodeInThread
        self.limits = limits
        self.budget = budget if budget is not None else MemoryBudget()
        self.connections = 0
        self.overflowing = 0
        self.parseQueue = parseTurns(clock)

    def buildProtocol(self, addr: object) -> RequestProtocol:
        protocol = RequestProtocol(
            self.dispatcher,
            self.clock,
            self.spoolDirectory,
            self.maxRequestBytes,
            self.timeout,
            encodeInThread=self.encodeInThread,
            limits=self.limits,
            budget=self.budget,
            writeInThread=self.writeInThread,
            parseQueue=self.parseQueue,
        )
        protocol.factory = self
        return protocol

    def admit(self, protocol: RequestProtocol) -> bool:
        """Count a new connection; whether it has a place (else it is an overflow one)."""
        if self.connections >= self.limits.maxConnections:
            self.overflowing += 1
            return False
        self.connections += 1
        return True

    def connectionClosed(self, protocol: RequestProtocol) -> None:
        """A connection of this factory ended: its place is free again."""
        if protocol.overflow:
            self.overflowing -= 1
        else:
            self.connections -= 1

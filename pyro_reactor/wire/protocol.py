"""The wire protocol: one JSON request line per connection, one answer, then close.

``RequestProtocol`` only frames bytes. It reads the request line (bounded by
``maxRequestBytes``, with an idle timeout), spools the raw body of an upload action to a file
under the state directory as it arrives, hands the whole request to the L{Dispatcher}, and
writes the answer: one JSON line, a JSON header line followed by a streamed file, or a JSON
header line after which the connection is handed to the protocol of a streaming action
(L{HandOff}).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Answer, Dispatcher, HandOff, StreamedAnswer
from pyro_reactor.wire.request import Request, parseRequestLine

log = Logger(namespace="pyro_reactor.wire.protocol")

_READING_LINE, _READING_BODY, _WORKING, _ANSWERING, _HANDED_OFF, _DONE = range(6)

EARLY_BYTES_LIMIT = 1024 * 1024
"""Bytes a client may send after its request line while the answer is being prepared.

They are kept for an answer that takes the connection over (L{HandOff}: a TCP relay must not
lose what the host sent before ``connected``); past this the connection stops being read until
the answer is ready. Other answers drop them, as the reference ignores them."""

PROGRESS_INTERVAL = 5.0
"""Seconds between two progress events of a long upload or export."""

EXPORT_CHUNK = 256 * 1024
"""Bytes of an export read and written at a time (FileSender's 16 KiB costs a third of the
throughput on loopback)."""


def _logTransfer(event: str, action: object, sent: int, started: float, now: float) -> None:
    duration = max(now - started, 0.0)
    log.info(
        "{action} " + event + ": {bytes} bytes in {duration_s:.1f} s ({rate_mbps:.1f} MB/s)",
        action=action,
        outcome=event,
        bytes=sent,
        duration_s=duration,
        rate_mbps=sent / duration / 1e6 if duration > 0 else 0.0,
    )


LARGE_ANSWER_CHARS = 64 * 1024
"""Answers carrying more text than this are encoded in a worker thread, off the reactor."""

Encoder = Callable[[Callable[[dict[str, Any]], bytes], dict[str, Any]], "Deferred[bytes]"]


def encodeAnswer(answer: dict[str, Any]) -> bytes:
    """One answer line, encoded as the reference encodes it (``json.dumps`` defaults)."""
    return (json.dumps(answer) + "\n").encode("utf-8")


def _carriesMuchText(answer: dict[str, Any]) -> bool:
    # A cheap look at the top-level strings (exec output, file content, shell output): enough
    # to tell a 16 MiB exec answer, whose encoding takes tens of ms, from a small one.
    return sum(len(v) for v in answer.values() if isinstance(v, str)) > LARGE_ANSWER_CHARS


@implementer(IHalfCloseableProtocol)
class RequestProtocol(Protocol):
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
    ) -> None:
        self.dispatcher = dispatcher
        self.encodeInThread = encodeInThread
        self.clock = clock
        self.spoolDirectory = spoolDirectory
        self.maxRequestBytes = maxRequestBytes
        self.timeout = timeout
        self._phase = _READING_LINE
        self._buffer = bytearray()
        self._timer: IDelayedCall | None = None
        self._request: Request | None = None
        self._spool: IO[bytes] | None = None
        self._spoolPath: Path | None = None
        self._remaining = 0
        self._lost = False
        self._pendingLog: Callable[[], None] | None = None
        self._bodySize = 0
        self._bodyStarted = self._lastProgress = 0.0
        self._early = bytearray()
        self._earlyEOF = False
        self._paused = False
        self._handedTo: IProtocol | None = None
        self._counted = False

    # -- connection events ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._timedOut)
        if isinstance(self.factory, RequestFactory):
            self.factory.openConnections += 1
            self._counted = True

    def dataReceived(self, data: bytes) -> None:
        if self._phase == _READING_LINE:
            self._receiveLine(data)
        elif self._phase == _READING_BODY:
            self._receiveBody(data)
        elif self._phase == _HANDED_OFF:
            assert self._handedTo is not None
            self._handedTo.dataReceived(data)
        elif self._phase == _WORKING:
            self._keepEarly(data)
        # Bytes after a complete request are otherwise ignored, as the reference ignores them.

    def _keepEarly(self, data: bytes) -> None:
        self._early += data
        if len(self._early) >= EARLY_BYTES_LIMIT and not self._paused:
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()

    def readConnectionLost(self) -> None:
        if self._phase == _HANDED_OFF:
            handedTo = self._handedTo
            if IHalfCloseableProtocol.providedBy(handedTo):
                handedTo.readConnectionLost()
            else:
                assert self.transport is not None
                self.transport.loseConnection()
            return
        if self._phase == _WORKING:
            self._earlyEOF = True
            return
        if self._phase == _READING_LINE:
            self._receiveLine(b"\n")
        elif self._phase == _READING_BODY:
            self._logCutOff()
            self._discardSpool()
            self._refuse(ActionError("unexpected EOF while reading archive payload"))

    def writeConnectionLost(self) -> None:
        """Nothing to do: the answer can no longer be delivered, the work still ends."""
        if self._phase == _HANDED_OFF and IHalfCloseableProtocol.providedBy(self._handedTo):
            self._handedTo.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted and isinstance(self.factory, RequestFactory):
            self.factory.openConnections -= 1
            self._counted = False
        self._lost = True
        self._cancelTimer()
        if self._handedTo is not None:
            handedTo, self._handedTo = self._handedTo, None
            handedTo.connectionLost(reason)
        emit, self._pendingLog = self._pendingLog, None
        if emit is not None:
            emit()
        if self._phase == _READING_BODY:
            self._logCutOff()
            self._discardSpool()
        self._phase = _DONE

    def _logCutOff(self) -> None:
        log.warn(
            "upload cut off: {missing} of its bytes never arrived",
            missing=self._remaining,
            action=self._request.action if self._request else None,
            outcome="cut-off",
        )

    # -- framing -------------------------------------------------------------------------

    def _receiveLine(self, data: bytes) -> None:
        newline = data.find(b"\n")
        if newline < 0:
            if len(self._buffer) + len(data) > self.maxRequestBytes:
                self._refuse(
                    ActionError(f"request line exceeds the maximum of {self.maxRequestBytes} bytes")
                )
                return
            self._buffer += data
            return
        if len(self._buffer) + newline > self.maxRequestBytes:
            self._refuse(
                ActionError(f"request line exceeds the maximum of {self.maxRequestBytes} bytes")
            )
            return
        self._buffer += data[:newline]
        rest = data[newline + 1 :]
        line = bytes(self._buffer)
        self._buffer = bytearray()
        try:
            request = self._request = parseRequestLine(line)
            size = self.dispatcher.uploadSize(request)
        except ActionError as error:
            self._refuse(error)
            return
        if size is None:
            self._dispatch()
            if rest:
                self.dataReceived(rest)
            return
        self._startBody(size)
        if rest and self._phase == _READING_BODY:
            self._receiveBody(rest)

    def _startBody(self, size: int) -> None:
        self.spoolDirectory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=self.spoolDirectory)
        self._spool = os.fdopen(fd, "wb")
        self._spoolPath = Path(name)
        self._remaining = self._bodySize = size
        self._bodyStarted = self._lastProgress = self.clock.seconds()
        self._phase = _READING_BODY
        if size == 0:
            self._finishBody()

    def _receiveBody(self, data: bytes) -> None:
        assert self._spool is not None
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        chunk = data[: self._remaining]
        try:
            self._spool.write(chunk)
        except OSError as error:
            self._discardSpool()
            self._refuse(ActionError(f"could not spool the upload: {error.strerror}"))
            return
        self._remaining -= len(chunk)
        now = self.clock.seconds()
        if now - self._lastProgress >= PROGRESS_INTERVAL and self._remaining:
            self._lastProgress = now
            action = self._request.action if self._request else None
            received = self._bodySize - self._remaining
            _logTransfer("upload in progress", action, received, self._bodyStarted, now)
        if self._remaining == 0:
            self._finishBody()

    def _finishBody(self) -> None:
        assert self._spool is not None and self._request is not None
        try:
            self._spool.close()
        except OSError as error:
            self._discardSpool()
            self._refuse(ActionError(f"could not spool the upload: {error.strerror}"))
            return
        self._spool = None
        now = self.clock.seconds()
        _logTransfer(
            "upload received", self._request.action, self._bodySize, self._bodyStarted, now
        )
        self._request.upload = self._spoolPath
        self._dispatch()

    def _dispatch(self) -> None:
        assert self._request is not None
        self._cancelTimer()
        self._phase = _WORKING
        self.dispatcher.dispatch(self._request, self._logAfterAnswer).addCallback(self._answer)

    def _logAfterAnswer(self, emit: Callable[[], None]) -> None:
        # The request's log event waits until the answer is out and the connection closed
        # (see Dispatcher.dispatch): writing it would otherwise delay every answer.
        if self._lost:
            emit()
        else:
            self._pendingLog = emit

    # -- answers -------------------------------------------------------------------------

    def _refuse(self, error: ActionError) -> None:
        self._cancelTimer()
        action = self._request.fields.get("action", "exec") if self._request else None
        self._phase = _ANSWERING
        self._writeLine(self.dispatcher.reject(error, action))

    def _answer(self, answer: Answer) -> None:
        self._discardSpool()
        if self._lost:
            if isinstance(answer, StreamedAnswer):
                answer.path.unlink(missing_ok=True)
            elif isinstance(answer, HandOff):
                answer.protocol.connectionLost(Failure(ConnectionDone("client went away")))
            return
        self._phase = _ANSWERING
        if isinstance(answer, HandOff):
            self._handOff(answer)
            return
        self._early = bytearray()
        if isinstance(answer, StreamedAnswer):
            self._stream(answer)
        elif self.encodeInThread is not None and _carriesMuchText(answer):
            self.encodeInThread(encodeAnswer, answer).addCallback(self._writeEncoded)
        else:
            self._writeLine(answer)

    def _handOff(self, answer: HandOff) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(encodeAnswer(answer.header))
        self._phase = _HANDED_OFF
        self._handedTo = handedTo = answer.protocol
        early, self._early = bytes(self._early), bytearray()
        handedTo.makeConnection(transport)
        if self._paused:
            self._paused = False
            cast(IPushProducer, transport).resumeProducing()
        if early and self._handedTo is handedTo:
            handedTo.dataReceived(early)
        if self._earlyEOF and self._handedTo is handedTo:
            self.readConnectionLost()

    def _writeLine(self, answer: dict[str, Any]) -> None:
        self._writeEncoded(encodeAnswer(answer))

    def _writeEncoded(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line)
        self._phase = _DONE
        self.transport.loseConnection()

    def _stream(self, answer: StreamedAnswer) -> None:
        assert self.transport is not None
        transport = self.transport
        try:
            handle = answer.path.open("rb")
        except OSError as error:
            answer.path.unlink(missing_ok=True)
            self._writeLine({"error": f"could not open the export: {error.strerror}"})
            return
        transport.write(encodeAnswer(answer.header))
        started = self.clock.seconds()
        action = self._request.action if self._request else None

        def progress() -> None:
            sent = handle.tell()
            _logTransfer("export in progress", action, sent, started, self.clock.seconds())

        ticker = LoopingCall(progress)
        ticker.clock = self.clock
        ticker.start(PROGRESS_INTERVAL, now=False)

        def finished(result: object) -> None:
            ticker.stop()
            event = "export sent" if not isinstance(result, Failure) else "export cut off"
            _logTransfer(event, action, handle.tell(), started, self.clock.seconds())
            handle.close()
            answer.path.unlink(missing_ok=True)
            self._phase = _DONE
            if not self._lost:
                transport.loseConnection()

        sender = FileSender()
        sender.CHUNK_SIZE = EXPORT_CHUNK
        sender.beginFileTransfer(handle, transport).addBoth(finished)

    # -- housekeeping --------------------------------------------------------------------

    def _timedOut(self) -> None:
        self._timer = None
        log.info(
            "connection closed: no complete request within {timeout} s",
            timeout=self.timeout,
            outcome="timeout",
        )
        self._discardSpool()
        assert self.transport is not None
        self.transport.loseConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _discardSpool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._spoolPath is not None:
            self._spoolPath.unlink(missing_ok=True)
            self._spoolPath = None


class RequestFactory(Factory):
    """Builds a L{RequestProtocol} per connection, all sharing one dispatcher."""

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
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.spoolDirectory = spoolDirectory
        self.maxRequestBytes = maxRequestBytes
        self.timeout = timeout
        self.encodeInThread = encodeInThread
        #: Connections whose protocol this factory built and that are still open (``stats``).
        self.openConnections = 0

    def buildProtocol(self, addr: object) -> RequestProtocol:
        protocol = RequestProtocol(
            self.dispatcher,
            self.clock,
            self.spoolDirectory,
            self.maxRequestBytes,
            self.timeout,
            encodeInThread=self.encodeInThread,
        )
        protocol.factory = self
        return protocol

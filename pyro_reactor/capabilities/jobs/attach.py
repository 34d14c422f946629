"""The attach stream: a job's output as JSON event lines, the host's stdin and signals back.

After the header line the connection belongs to an L{AttachStream} (see
L{pyro_reactor.wire.dispatch.HandOff}). It reads the job's output files from where the host
said it was, one chunk at a time in a worker thread, and writes ``output`` (and ``gap``)
events; it registers as the transport's producer, so when the host reads slowly the transport
pauses it and nothing more is read: the agent's memory holds at most one chunk per stream,
whatever the job prints. Once the job has ended and every byte is sent, ``exit`` follows and
the stream closes. Lines from the host (``stdin``, ``stdin_base64``, ``close_stdin``,
``signal``) are handled in order as they come; a bad one is answered with an ``error`` event.
Stdin has backpressure: when the job's stdin queue is full (the job does not read), the rest of
the line waits here and the stream stops reading the connection (``pauseProducing`` on its
transport) until the queue has drained, so a host that keeps sending blocks, nothing is lost,
and the agent holds at most the queue's bound plus the line being fed.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import MemoryBudget
from pyro_reactor.wire.sender import asciiJsonText

if TYPE_CHECKING:
    from pyro_reactor.capabilities.jobs.registry import Job, Jobs

log = Logger(namespace="pyro_reactor.capabilities.jobs.attach")

#: Bytes read from an output file per event.
CHUNK = 256 * 1024
#: The longest line a host may send on an attach stream.
MAX_LINE = 16 * 1024 * 1024
STREAMS = ("stdout", "stderr")


class _Cursor:
    """Where one stream of an attached client is: next byte to read and its decoder."""

    def __init__(self, offset: int, text: bool) -> None:
        self.offset = offset
        self.eventOffset = offset
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace") if text else None


@implementer(IPushProducer, IHalfCloseableProtocol)
class AttachStream(Protocol):
    """One attached client of one job."""

    def __init__(  # noqa: PLR0917 - the request's fields
        self,
        jobs: Jobs,
        job: Job,
        stdout: int,
        stderr: int,
        encoding: str,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.jobs = jobs
        self.job = job
        text = encoding == "text"
        self.cursors = {"stdout": _Cursor(stdout, text), "stderr": _Cursor(stderr, text)}
        self.paused = False
        self.reading = False
        self.listening = False
        self.finished = False
        self.gone = False
        self.buffer = b""
        self.turn = 0
        #: Stdin of the current line the job's full queue did not take yet.
        self.blocked = b""
        self.waiting = False
        #: The bytes of lines read and not yet handled, held from the agent's memory budget.
        self.hold = (budget or MemoryBudget(1 << 62)).reserve(0, "the lines of an attach stream")

    # -- the connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.job.machine.whenEnded().addCallback(lambda _: self.pump())
        self.pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.blocked = self.buffer = b""
        self.hold.release()
        self.job.output.unlisten(self._changed)

    def readConnectionLost(self) -> None:
        """The host half-closed: it sends nothing more, but still reads."""

    def writeConnectionLost(self) -> None:
        self.gone = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.gone = True

    def send(self, event: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n")

    def _sendOutput(self, name: str, offset: int, escaped: bytes) -> None:
        """An ``output`` event whose data is already JSON string content (``escaped``),
        byte for byte as L{send} would write it."""
        assert self.transport is not None
        head = f'{{"event": "output", "stream": "{name}", "offset": {offset}, "data": "'
        self.transport.write(b"".join((head.encode("ascii"), escaped, b'"}\n')))

    # -- output --------------------------------------------------------------------------

    def pump(self) -> None:
        """Send what the files hold beyond the cursors, one chunk at a time."""
        if self.gone or self.finished or self.reading or self.paused:
            return
        output = self.job.output
        ended = self.job.machine.state() in ("exited", "removed")
        for index in range(len(STREAMS)):
            name = STREAMS[(self.turn + index) % len(STREAMS)]
            cursor, stream = self.cursors[name], output.streams[name]
            if cursor.offset < stream.start:
                self.send(
                    {
                        "event": "gap",
                        "stream": name,
                        "offset": cursor.offset,
                        "resumed_at": stream.start,
                    }
                )
                cursor.offset = cursor.eventOffset = stream.start
                if cursor.decoder is not None:
                    cursor.decoder.reset()
            if cursor.offset < stream.size:
                self.turn = (self.turn + index + 1) % len(STREAMS)
                self._read(name, cursor, min(CHUNK, stream.size - cursor.offset))
                return
        if ended:
            self._finish()
        elif not self.listening:
            self.listening = True
            output.listen(self._changed)

    def _changed(self) -> None:
        self.listening = False
        self.pump()

    def _read(self, name: str, cursor: _Cursor, count: int) -> None:
        self.reading = True
        offset = cursor.offset

        def got(data: bytes) -> None:
            self.reading = False
            if self.gone:
                return
            if not data:
                # The file was closed meanwhile (the job removed): end the stream.
                if self.job.machine.state() == "removed":
                    self._finish()
                elif not self.listening:
                    self.listening = True
                    self.job.output.listen(self._changed)
                return
            cursor.offset = offset + len(data)
            self._emit(name, cursor, data, final=False)
            self.pump()

        def failed(failure: Failure) -> None:
            self.reading = False
            log.failure("cannot read job output", failure, job_id=self.job.jobId)
            self._close()

        self.job.output.read(name, offset, count).addCallbacks(got, failed)

    def _emit(self, name: str, cursor: _Cursor, data: bytes, final: bool) -> None:
        if cursor.decoder is None:
            if data:
                self._sendOutput(name, cursor.eventOffset, base64.b64encode(data))
                cursor.eventOffset += len(data)
            return
        if data and not cursor.decoder.getstate()[0]:
            # Plain ASCII text (most output) needs no decoding: its JSON is spliced in, the
            # same bytes json.dumps would write, at a fifth of the cost.
            escaped = asciiJsonText(data)
            if escaped is not None:
                self._sendOutput(name, cursor.eventOffset, escaped)
                cursor.eventOffset = cursor.offset
                return
        text = cursor.decoder.decode(data, final)
        covered = cursor.offset - len(cursor.decoder.getstate()[0])
        if text:
            self.send(
                {"event": "output", "stream": name, "offset": cursor.eventOffset, "data": text}
            )
        cursor.eventOffset = covered

    def _finish(self) -> None:
        self.finished = True
        for name in STREAMS:
            cursor = self.cursors[name]
            if cursor.decoder is not None:
                self._emit(name, cursor, b"", final=True)
        exit_ = self.job.exitInfo()
        if exit_ is None:
            self.send({"event": "error", "error": f"job {self.job.jobId!r} was removed"})
        else:
            self.send({"event": "exit", **exit_})
        self._close()

    def _close(self) -> None:
        self.job.output.unlisten(self._changed)
        if self.transport is not None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    # -- input from the host -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._readLines()

    def _readLines(self) -> None:
        while not self.waiting and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line.strip():
                self._line(line)
        if not self.waiting and len(self.buffer) > MAX_LINE:
            self.buffer = b""
            self.send({"event": "error", "error": f"line longer than {MAX_LINE} bytes"})
        try:
            self.hold.resize(len(self.buffer) + len(self.blocked))
        except ActionError as error:
            # The unfinished line goes; what is blocked stays (it was read whole already).
            self.buffer = b""
            with contextlib.suppress(ActionError):
                self.hold.resize(len(self.blocked))
            self.send({"event": "error", "error": error.message})

    def _feed(self, data: bytes) -> None:
        """Queue ``data`` for the job's stdin; what does not fit waits, reading paused."""
        taken = self.job.offerStdin(data)
        if taken < len(data):
            self.blocked = data[taken:]
            self.waiting = True
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.job.whenStdinRoom().addCallback(self._room)

    def _room(self, ignored: None) -> None:
        self.waiting = False
        rest, self.blocked = self.blocked, b""
        if self.gone:
            return
        try:
            self._feed(rest)
        except ActionError as error:
            self.send({"event": "error", "error": error.message})
        if not self.waiting:
            assert self.transport is not None
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._readLines()

    def _line(self, line: bytes) -> None:
        from pyro_reactor.capabilities.jobs.actions import decodeBase64, signalOf  # noqa: PLC0415

        try:
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                raise ActionError("not a JSON object") from None
            if not isinstance(message, dict) or len(message) != 1:
                raise ActionError(
                    'expected one of {"stdin": text}, {"stdin_base64": ...},'
                    ' {"close_stdin": true}, {"signal": NAME}'
                )
            ((key, value),) = message.items()
            if key == "stdin":
                if not isinstance(value, str):
                    raise ActionError("stdin must be a string")
                try:
                    data = value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ActionError("stdin must be valid Unicode text") from None
                self._feed(data)
            elif key == "stdin_base64":
                if not isinstance(value, str):
                    raise ActionError("stdin_base64 must be a string")
                self._feed(decodeBase64(value, "stdin_base64"))
            elif key == "close_stdin":
                if value is not True:
                    raise ActionError("close_stdin must be true")
                self.job.write(b"", True)
            elif key == "signal":
                _, number = signalOf(value)
                if not self.jobs.signal(self.job, number):
                    raise ActionError(f"job {self.job.jobId!r} has ended")
            else:
                raise ActionError(f"unknown field {key!r}")
        except ActionError as error:
            self.send({"event": "error", "error": error.message})

"""The answer side of a request's connection: encode, write, stream or hand off the answer.

``Answering`` is a mixin of L{RequestProtocol}, which frames the request: once the
L{Dispatcher} has an answer, it is written as one JSON line (at once when short, else by an
L{AnswerSender} with backpressure and the answer timeout), encoded in a worker thread first
when it carries much text, sent as a JSON header line followed by a streamed file, or
answered with its header line after which the connection belongs to the action's own
protocol (L{HandOff}). Every answer chain ends in ``_answerFailed``: a failure answers
``{"error"}`` and closes. The answer's memory is held from the budget until it is out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol, IPushProducer, IReactorTime, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import MemoryBudget, Reservation
from pyro_reactor.wire.dispatch import (
    Answer,
    EncodedAnswer,
    HandOff,
    HeldAnswer,
    StreamedAnswer,
    disposeAnswer,
)
from pyro_reactor.wire.limits import WireLimits
from pyro_reactor.wire.phases import Phase
from pyro_reactor.wire.request import Request
from pyro_reactor.wire.sender import AnswerSender, Line, encodeAnswer, logTransfer

__all__ = ["DIRECT_LINE_BYTES", "LARGE_ANSWER_CHARS", "Answering", "Encoder"]

_R = TypeVar("_R")

# The protocol's namespace: the answer side's events are the connection's, as before the split.
log = Logger(namespace="pyro_reactor.wire.protocol")

LARGE_ANSWER_CHARS = 64 * 1024
"""Answers carrying more text than this are encoded in a worker thread, off the reactor."""

DIRECT_LINE_BYTES = 16 * 1024
"""Answer lines up to this size are written at once (the socket's buffer takes them whole);
longer ones go through an L{AnswerSender}, with backpressure and the answer timeout."""

Encoder = Callable[[Callable[[dict[str, Any]], Line], dict[str, Any]], "Deferred[Line]"]


def _encodedEstimate(answer: dict[str, Any]) -> int:
    """About the size of an answer's JSON line: non-ASCII text costs 6 bytes a character."""
    return 256 + sum(
        len(v) if v.isascii() else 6 * len(v) for v in answer.values() if isinstance(v, str)
    )


def _passThrough(call: Callable[[], None]) -> Callable[[_R], _R]:
    """A callback that calls C{call} and passes its result (or failure) on."""

    def passing(result: _R) -> _R:
        call()
        return result

    return passing


def _carriesMuchText(answer: dict[str, Any]) -> bool:
    # A cheap look at the top-level strings (exec output, file content, shell output): enough
    # to tell a 16 MiB exec answer, whose encoding takes tens of ms, from a small one.
    return sum(len(v) for v in answer.values() if isinstance(v, str)) > LARGE_ANSWER_CHARS


class Answering:
    """The answer side of L{RequestProtocol}: writes the answer once the request is handled.

    The attributes and the two methods below the docstring are the protocol's, declared here
    for the type checker; the phase moves to answering, handed off or done here.
    """

    transport: ITransport | None
    clock: IReactorTime
    budget: MemoryBudget
    encodeInThread: Encoder | None
    limits: WireLimits
    _phase: Phase
    _lost: bool
    _pending: Deferred[Any] | None
    _request: Request | None
    _early: bytearray
    _earlyEOF: bool
    _paused: bool
    _handedTo: IProtocol | None
    _answerHold: Reservation | None
    readConnectionLost: Callable[[], None]
    _discardUpload: Callable[[], None]

    def _answer(self, answer: Answer) -> None:
        self._pending = None
        self._discardUpload()
        if self._lost:
            disposeAnswer(answer)
            return
        self._phase = Phase.ANSWERING
        if isinstance(answer, HandOff):
            self._handOff(answer)
            return
        self._early = bytearray()
        if isinstance(answer, StreamedAnswer):
            self._stream(answer)
        elif isinstance(answer, EncodedAnswer):
            self._writeLine(answer.line)
        elif isinstance(answer, HeldAnswer):
            self._encode(answer.answer, answer.release)
        else:
            self._encode(answer, None)

    def _encode(self, answer: dict[str, Any], held: Callable[[], None] | None) -> None:
        """Encode and write a plain answer; C{held} gives its text's holds back once the
        line is built."""
        if not _carriesMuchText(answer):
            line = encodeAnswer(answer)
            if held is not None:
                held()
            self._writeLine(line)
            return
        # Hold the encoded size before encoding: a replacement character is 6 bytes of
        # JSON, so 16 MiB of bad output is a 100 MB line.
        try:
            self._answerHold = self.budget.reserve(_encodedEstimate(answer), "the answer")
        except ActionError as error:
            if held is not None:
                held()
            self._writeLine(encodeAnswer({"error": error.message}))
            return
        if self.encodeInThread is None:
            line = encodeAnswer(answer)
            if held is not None:
                held()
            self._writeLine(line)
            return
        encoded = self.encodeInThread(encodeAnswer, answer)
        if held is not None:
            encoded.addBoth(_passThrough(held))
        encoded.addCallback(self._writeLine).addErrback(self._answerFailed)

    def _answerFailed(self, failure: Failure) -> None:
        """The terminal errback of every answer chain: answer an error and close."""
        self._pending = None
        self._releaseAnswer()
        if failure.check(CancelledError) or self._lost:
            return
        log.failure("could not write the answer", failure, outcome="crash")
        transport = self.transport
        assert transport is not None
        if self._phase in (Phase.WORKING, Phase.ANSWERING):
            self._phase = Phase.DONE
            message = str(failure.value) or repr(failure.value)
            transport.write(
                bytes(encodeAnswer({"error": f"could not encode the answer: {message}"}))
            )
        transport.loseConnection()

    def _handOff(self, answer: HandOff) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(bytes(encodeAnswer(answer.header)))
        self._phase = Phase.HANDED_OFF
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

    def _writeLine(self, line: Line) -> None:
        if self._lost:
            self._releaseAnswer()
            return
        transport = self.transport
        assert transport is not None
        if len(line) <= DIRECT_LINE_BYTES:
            self._releaseAnswer()
            transport.write(bytes(line))
            self._phase = Phase.DONE
            transport.loseConnection()
            return
        try:
            if self._answerHold is None:
                self._answerHold = self.budget.reserve(len(line), "the answer")
            else:
                self._answerHold.resize(len(line))
        except ActionError as error:
            self._releaseAnswer()
            transport.write(bytes(encodeAnswer({"error": error.message})))
            self._phase = Phase.DONE
            transport.loseConnection()
            return
        self._send(line)

    def _send(self, line: Line, answer: StreamedAnswer | None = None) -> None:
        transport = self.transport
        assert transport is not None
        handle = None
        progress = None
        started = self.clock.seconds()
        action = self._request.action if self._request else None
        if answer is not None:
            try:
                handle = answer.path.open("rb")
            except OSError as error:
                answer.path.unlink(missing_ok=True)
                self._writeLine(
                    encodeAnswer({"error": f"could not open the export: {error.strerror}"})
                )
                return

            def progress(sent: int) -> None:
                logTransfer("export in progress", action, sent, started, self.clock.seconds())

        sender = AnswerSender(
            transport, self.clock, self.limits.answerTimeout, line, handle, progress=progress
        )

        def finished(result: object) -> None:
            self._releaseAnswer()
            if answer is not None and handle is not None:
                event = "export sent" if not isinstance(result, Failure) else "export cut off"
                logTransfer(event, action, sender.sent - len(line), started, self.clock.seconds())
                handle.close()
                answer.path.unlink(missing_ok=True)
            self._phase = Phase.DONE
            if not self._lost:
                transport.loseConnection()

        sender.send().addBoth(finished)

    def _stream(self, answer: StreamedAnswer) -> None:
        self._send(encodeAnswer(answer.header), answer)

    def _releaseAnswer(self) -> None:
        hold, self._answerHold = self._answerHold, None
        if hold is not None:
            hold.release()

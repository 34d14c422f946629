"""The action registry: looks a request's action up, runs its handler, logs the outcome.

The protocol hands whole requests here and gets a ``Deferred`` answer back; it knows nothing
about actions. Handlers know nothing about connections. This is the one place where every
request is logged (action, outcome, duration; never a field's value) and where any failure
becomes the ``{"error": ...}`` answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.request import Request
from pyro_reactor.wire.sender import LinePieces

log = Logger(namespace="pyro_reactor.wire.dispatch")


@dataclass(frozen=True)
class StreamedAnswer:
    """An answer made of a JSON header line followed by the raw bytes of a file.

    The protocol writes ``header`` as one line, streams ``path`` with backpressure, then removes
    ``path`` whatever happens (it is a temporary file owned by the answer).
    """

    header: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class HandOff:
    """An answer that takes the connection over after its first line.

    The protocol writes ``header`` as one JSON line, then connects ``protocol`` to the
    connection's transport (``makeConnection``). From then on ``protocol`` owns the connection:
    every byte the client sends goes to its ``dataReceived`` (bytes that arrived after the
    request line, before the answer was ready, first and in order), a half-close to its
    ``readConnectionLost`` when it provides ``IHalfCloseableProtocol`` (otherwise the
    connection is closed), and the end of the connection to its ``connectionLost``. It writes
    to the transport itself, may register itself as a producer, and closes the connection
    when its stream ends.

    Streaming actions (attach a job, relay TCP, watch the workspace) answer this. When the
    client has gone before the answer was ready, ``protocol.connectionLost`` is called without
    ``makeConnection`` having been called, so that it can release what it holds.
    """

    header: dict[str, Any]
    protocol: IProtocol


Answer: TypeAlias = "dict[str, Any] | StreamedAnswer | HandOff | EncodedAnswer | HeldAnswer"
Handler: TypeAlias = (
    "Callable[[Request], Deferred[dict[str, Any]] | Deferred[StreamedAnswer]"
    " | Deferred[HandOff] | Deferred[EncodedAnswer] | Deferred[HeldAnswer]"
    " | Deferred[Answer] | Answer]"
)


@dataclass(frozen=True)
class HeldAnswer:
    """An answer whose text is already held from the memory budget (command output gathered
    under reservations).

    The protocol holds the encoded line's size as well while it encodes ``answer``, and calls
    ``release`` once the line is built (or the answer dropped): the text and its JSON line
    are both counted for as long as both exist.
    """

    answer: dict[str, Any]
    release: Callable[[], None]


@dataclass(frozen=True)
class EncodedAnswer:
    """An answer already encoded as its one JSON line (with its newline), written as is.

    For handlers that build a large answer in a worker thread: encoding it there too (with
    L{pyro_reactor.wire.sender.encodeAnswer}) saves a second trip to the pool.
    """

    line: bytes | bytearray | LinePieces


def disposeAnswer(answer: object) -> None:
    """Release what an answer that will never be written holds (its file, its protocol)."""
    if isinstance(answer, HeldAnswer):
        answer.release()
    elif isinstance(answer, StreamedAnswer):
        answer.path.unlink(missing_ok=True)
    elif isinstance(answer, HandOff):
        answer.protocol.connectionLost(Failure(ConnectionDone("client went away")))


@dataclass(frozen=True)
class Action:
    """One action of the protocol.

    ``upload`` actions are followed on the wire by ``archive_size`` raw bytes, which the protocol
    spools to a file (``Request.upload``) before the handler runs.

    ``cancellable`` actions have their handler's Deferred cancelled when the client goes away
    before the answer is ready (a long-poll, a readiness wait): their Deferred's canceller
    must remove its timers and release what it holds. Other handlers run to their end; an
    answer that comes after the client left is released (L{disposeAnswer}) and logged.
    """

    name: str
    handler: Handler
    upload: bool = False
    cancellable: bool = False


@dataclass
class Dispatcher:
    """Validates requests, routes them to handlers, and turns failures into error answers."""

    spoolDirectory: Path
    maxUploadBytes: int = 8 * 1024**3
    clock: Callable[[], float] = time.monotonic
    _actions: dict[str, Action] = field(default_factory=dict)

    def register(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if action.name in self._actions:
                raise ValueError(f"action {action.name!r} registered twice")
            self._actions[action.name] = action

    def actionNames(self) -> list[str]:
        return sorted(self._actions)

    def lookup(self, request: Request) -> Action:
        name = request.action
        action = self._actions.get(name)
        if action is None:
            raise ActionError(f"unknown action: {name!r}")
        return action

    def uploadSize(self, request: Request) -> int | None:
        """How many raw bytes follow this request's line (``None``: it takes no body).

        Refuses a size that is negative, over the configured maximum, or larger than the free
        space where it would be spooled, before a byte of the body is read.
        """
        if not self.lookup(request).upload:
            return None
        size = request.integer("archive_size", 0)
        if size < 0:
            raise ActionError("archive_size must not be negative")
        if size > self.maxUploadBytes:
            raise ActionError(
                f"archive_size {size} exceeds the maximum of {self.maxUploadBytes} bytes"
            )
        self.spoolDirectory.mkdir(parents=True, exist_ok=True)
        stats = os.statvfs(self.spoolDirectory)
        free = stats.f_bavail * stats.f_frsize
        if size > free:
            raise ActionError(
                f"archive_size {size} exceeds the free space of the agent's state directory"
                f" ({free} bytes)"
            )
        return size

    def dispatch(
        self, request: Request, deferLog: Callable[[Callable[[], None]], None] | None = None
    ) -> Deferred[Answer]:
        """Run the request's handler; the result is always an answer, never a failure.

        Cancelling the result (the client went away) cancels a C{cancellable} action's
        handler; any other handler runs on, and its answer is released when it comes.
        The request's log event (ok or error; a crash is logged at once, with its traceback)
        is emitted when the answer is ready, or, if C{deferLog} is given, handed to it as a
        callable to emit later: the protocol emits it once the answer has been delivered, so
        that formatting and writing the log line (about 0.1 ms with twistd's text observer)
        never delays an answer. The duration logged is the time to the answer either way.
        """
        started = self.clock()
        name = request.fields.get("action", "exec")
        name = name if isinstance(name, str) else repr(name)
        try:
            action = self.lookup(request)
        except ActionError as error:
            return succeed(self._failed(name, started, Failure(error), deferLog))
        result: Deferred[Answer]
        try:
            outcome = action.handler(request)
        except Exception:
            result = fail()
        else:
            result = cast(
                "Deferred[Answer]", outcome if isinstance(outcome, Deferred) else succeed(outcome)
            )

        def answered(answer: Answer) -> Answer:
            _emit(
                deferLog,
                "{action} ok in {duration_ms:.1f} ms",
                action=name,
                outcome="ok",
                duration_ms=(self.clock() - started) * 1000,
            )
            return answer

        result.addCallbacks(
            answered, lambda failure: self._failed(name, started, failure, deferLog)
        )
        if result.called:
            return result
        return _detached(result, action.cancellable)

    def reject(self, error: ActionError, action: object = None) -> dict[str, Any]:
        """Log and answer a request the protocol refused before dispatching it."""
        log.info(
            "request refused: {error}",
            action=action if action is None or isinstance(action, str) else repr(action),
            outcome="error",
            error=error.message,
        )
        return {"error": error.message}

    def _failed(
        self,
        name: str,
        started: float,
        failure: Failure,
        deferLog: Callable[[Callable[[], None]], None] | None = None,
    ) -> dict[str, Any]:
        duration = (self.clock() - started) * 1000
        if failure.check(CancelledError):
            _emit(
                deferLog,
                "{action} cancelled after {duration_ms:.1f} ms: the client went away",
                action=name,
                outcome="cancelled",
                duration_ms=duration,
            )
            return {"error": "cancelled: the client went away"}
        if failure.check(ActionError):
            message = str(failure.value)
            _emit(
                deferLog,
                "{action} failed in {duration_ms:.1f} ms: {error}",
                action=name,
                outcome="error",
                duration_ms=duration,
                error=message,
            )
            return {"error": message}
        # An unexpected exception: answer its message as the reference does, keep the
        # traceback in the log for the operator.
        message = str(failure.value) or repr(failure.value)
        log.failure(
            "{action} crashed in {duration_ms:.1f} ms",
            failure,
            action=name,
            outcome="crash",
            duration_ms=duration,
        )
        return {"error": message}


def _detached(result: Deferred[Answer], cancellable: bool) -> Deferred[Answer]:
    """A Deferred of C{result}'s answer whose cancellation never loses that answer.

    Twisted drops the result of a Deferred cancelled without a canceller: an export's file
    or a streaming protocol would leak. The answer is delivered through a second Deferred
    instead; when that one was cancelled first, the answer is released on arrival.
    """

    def cancel(outer: Deferred[Answer]) -> None:
        if cancellable:
            result.cancel()

    outer: Deferred[Answer] = Deferred(cancel)

    def deliver(answer: Answer) -> None:
        if outer.called:
            disposeAnswer(answer)
        else:
            outer.callback(answer)

    result.addCallback(deliver)
    return outer


def _emit(
    deferLog: Callable[[Callable[[], None]], None] | None, logFormat: str, **fields: Any
) -> None:
    """Log one request event now, or hand it to C{deferLog} to be logged later."""
    if deferLog is None:
        log.info(logFormat, **fields)
    else:
        deferLog(partial(log.info, logFormat, **fields))

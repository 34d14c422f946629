"""The host side of a job's attach stream (``attach_job``, ``start_job`` with ``attach``).

L{JobAttachment} is one open stream: its header (the attach answer, or the start answer),
its events (``output``, ``gap``, ``error``, and ``exit`` last) either handed to a callback as
they come or pulled with L{JobAttachment.next} / ``async for``, and the way back to the job:
L{JobAttachment.write}, L{JobAttachment.closeStdin}, L{JobAttachment.signal},
L{JobAttachment.detach}, and L{JobAttachment.registerProducer} for what feeds stdin and
should wait while the connection is full (the CLI's stdin pump). ``done`` fires with the
``exit`` event (``None`` if the stream ended without one: detached or connection lost).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from pyro_reactor.client.errors import AgentError, AgentProtocolError

#: The longest event line accepted from the agent.
MAX_EVENT_BYTES = 64 * 1024 * 1024


class JobAttachment(Protocol):
    """One attach stream of a job, as a protocol over its own connection."""

    def __init__(
        self, request: dict[str, Any], onEvent: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.request = request
        self.onEvent = onEvent
        self.header: dict[str, Any] | None = None
        self.headerReceived: Deferred[JobAttachment] = Deferred()
        self.done: Deferred[dict[str, Any] | None] = Deferred()
        self._queue: DeferredQueue[dict[str, Any] | None] = DeferredQueue()
        self._buffer = b""
        self._exit: dict[str, Any] | None = None
        self._ended = False

    @property
    def jobId(self) -> str:
        return str((self.header or {}).get("job_id", self.request.get("job_id", "")))

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode("utf-8") + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            try:
                message = json.loads(line)
            except ValueError:
                self._abort(AgentProtocolError("the agent sent a line that is not JSON"))
                return
            self._message(message)
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._abort(AgentProtocolError("the agent sent an over-long event line"))

    def _message(self, message: dict[str, Any]) -> None:
        if self.header is None:
            self.header = message
            if "error" in message:
                error = AgentError(str(message["error"]), str(self.request.get("action")))
                self.headerReceived.errback(error)
                self._close()
            else:
                self.headerReceived.callback(self)
            return
        if message.get("event") == "exit":
            self._exit = message
        if self.onEvent is not None:
            self.onEvent(message)
        else:
            self._queue.put(message)

    def _abort(self, error: AgentError) -> None:
        if not self.headerReceived.called:
            self.headerReceived.errback(error)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._ended:
            return
        self._ended = True
        if not self.headerReceived.called:
            self.headerReceived.errback(
                AgentProtocolError("the agent closed the stream before answering")
            )
        if self.onEvent is None:
            self._queue.put(None)
        self.done.callback(self._exit)

    # -- pulling events --------------------------------------------------------------------

    def next(self) -> Deferred[dict[str, Any] | None]:
        """The next event, or ``None`` once the stream has ended."""
        if self._ended and not self._queue.pending:
            return Deferred.fromCoroutine(_none())
        return self._queue.get()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            event = await self.next()
            if event is None:
                return
            yield event

    # -- talking back ----------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self.transport is None or self._ended:
            raise AgentError("the stream has ended", "attach_job")
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")

    def write(self, data: bytes | str) -> None:
        """Send bytes (or text) to the job's stdin."""
        if isinstance(data, str):
            self._send({"stdin": data})
        else:
            self._send({"stdin_base64": base64.b64encode(data).decode("ascii")})

    def closeStdin(self) -> None:
        self._send({"close_stdin": True})

    def signal(self, name: str) -> None:
        self._send({"signal": name})

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Have C{producer} (what feeds L{write}) paused while the connection's buffer is full
        and resumed when it drains, as the connection's consumer does; see
        L{pyro_reactor.client.stdinpump}."""
        if self.transport is None or self._ended:
            producer.stopProducing()
            return
        IConsumer(self.transport).registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            IConsumer(self.transport).unregisterProducer()

    def detach(self) -> None:
        """Close the stream; the job runs on."""
        self._close()


async def _none() -> None:
    return None


def eventBytes(event: dict[str, Any]) -> bytes:
    """The bytes of an ``output`` event, whichever encoding the stream uses."""
    data = event.get("data", "")
    if event.get("encoding") == "base64":
        return base64.b64decode(data)
    return str(data).encode("utf-8")

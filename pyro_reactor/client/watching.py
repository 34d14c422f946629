"""The host side of ``watch_workspace``: a stream of workspace events, one callback each.

``AgentClient.watchWorkspace(onEvent, path)`` fires with a L{WorkspaceWatch} once the agent
answered ``{"watching": ...}`` (every watch is then in place: anything done afterwards is
reported), and calls ``onEvent`` with each event line (a ``dict``: ``event``, ``path``,
``is_dir``, ``from`` for moves; ``{"event": "overflow"}``; ``{"event": "error", ...}``).
``WorkspaceWatch.ended`` fires when the stream ends (the watched directory went, or
L{WorkspaceWatch.stop} was called); ``stop`` closes the connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from pyro_reactor.client.errors import AgentError, AgentProtocolError

MAX_EVENT_LINE = 1024 * 1024

EventCallback = Callable[[dict[str, Any]], None]


class WorkspaceWatch:
    """A running watch: its normalised ``path``, ``ended``, and ``stop()``."""

    def __init__(self, protocol: WatchProtocol, path: str) -> None:
        self._protocol = protocol
        self.path = path
        self.ended = protocol.ended

    def stop(self) -> None:
        """Close the stream; ``ended`` fires."""
        if self._protocol.transport is not None:
            self._protocol.transport.loseConnection()


class WatchProtocol(Protocol):
    """Sends the request, reads the first line, then one event per line."""

    def __init__(self, request: dict[str, Any], onEvent: EventCallback) -> None:
        self.request = request
        self.onEvent = onEvent
        self.started: Deferred[WorkspaceWatch] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_EVENT_LINE:
            self._fail(AgentProtocolError("the agent sent an over-long line", "watch_workspace"))
            return
        for line in lines:
            if self.transport is None or self.ended.called:
                return
            try:
                item = json.loads(line)
            except ValueError:
                self._fail(AgentProtocolError(f"not JSON: {line[:80]!r}", "watch_workspace"))
                return
            if not isinstance(item, dict):
                continue
            if not self.started.called:
                if "watching" in item:
                    self.started.callback(WorkspaceWatch(self, str(item["watching"])))
                else:
                    message = str(item.get("error", f"unexpected answer {item!r}"))
                    self._fail(AgentError(message, "watch_workspace"))
                    return
                continue
            self.onEvent(item)

    def _fail(self, reason: Exception) -> None:
        if not self.started.called:
            self.started.errback(reason)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.started.called:
            self.started.errback(
                AgentProtocolError("the agent closed the connection before answering", "watch")
            )
        if not self.ended.called:
            self.ended.callback(None)


class WatchFactory(Factory):
    noisy = False

    def __init__(self, protocol: WatchProtocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: Any) -> WatchProtocol:
        return self.protocol_

"""Reaching a guest TCP port through the agent (``connect_tcp``), as a Twisted client endpoint.

L{GuestTCPEndpoint} connects to the agent through its own endpoint (``fcvsock:``, ``vsock:``,
``tcp:``, ``unix:``), asks ``{"action": "connect_tcp", "port": P}``, and once the agent answers
``{"connected": true, ...}`` hands the connection to the caller's protocol: from then on the
protocol talks to the guest server as if it were local. Bytes after the answer line are the
guest's; half-close is passed both ways when the caller's protocol provides
``IHalfCloseableProtocol`` (and the agent endpoint's transport supports it: ``tcp:``,
``unix:`` and ``vsock:`` do). An ``{"error"}`` answer fails ``connect`` with a
L{GuestConnectError} carrying the agent's message.

``pyro:`` is its endpoint string: the agent's endpoint string after ``pyro:``, plus
``guest_port=`` and optionally ``guest_host=`` (default ``127.0.0.1``) and
``guest_timeout=`` (seconds for the guest-side connect)::

    clientFromString(reactor, "pyro:fcvsock:path=/srv/vm1/v.sock:port=5005:guest_port=8080")
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.internet.protocol import Factory
from twisted.plugin import IPlugin
from zope.interface import implementer

from pyro_reactor.client.errors import MessageConnectError
from pyro_reactor.client.handshake import LineHandshake

MAX_ANSWER_LINE = 64 * 1024


class GuestConnectError(MessageConnectError):
    """The agent could not (or would not) connect to the guest port; its message says why."""


class _RelayHandshake(LineHandshake):
    """Sends ``connect_tcp``, reads the answer line, then stands for the caller's protocol."""

    maxLine = MAX_ANSWER_LINE

    def __init__(self, request: bytes, factory: IProtocolFactory, where: str) -> None:
        super().__init__(factory)
        self.request = request
        self.where = where

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def _accepted(self, line: bytes) -> bool:
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self._abandon(GuestConnectError(f"{self.where}: the agent answered {line[:80]!r}"))
            return False
        if answer.get("connected") is not True:
            message = answer.get("error", f"unexpected answer {answer!r}")
            self._abandon(GuestConnectError(f"{self.where}: {message}"))
            return False
        return True

    def _tooLong(self) -> Exception:
        return GuestConnectError(f"{self.where}: the agent's answer is too long")

    def _closedEarly(self) -> Exception:
        return GuestConnectError(f"{self.where}: the agent closed the connection before answering")

    def _cancel(self, ready: Deferred[IProtocol]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _HandshakeFactory(Factory):
    noisy = False

    def __init__(self, request: bytes, factory: IProtocolFactory, where: str) -> None:
        self.request = request
        self.wrappedFactory = factory
        self.where = where
        self.handshake: _RelayHandshake | None = None

    def buildProtocol(self, addr: Any) -> _RelayHandshake:
        self.handshake = _RelayHandshake(self.request, self.wrappedFactory, self.where)
        return self.handshake

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()


@implementer(IStreamClientEndpoint)
class GuestTCPEndpoint:
    """A guest TCP port, reached through the agent at ``agent`` (an endpoint)."""

    def __init__(
        self,
        agent: IStreamClientEndpoint,
        port: int,
        host: str | None = None,
        timeout: int | None = None,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"guest port must be between 1 and 65535, not {port}")
        self.agent = agent
        self.port = port
        self.host = host
        self.timeout = timeout

    def request(self) -> bytes:
        fields: dict[str, Any] = {"action": "connect_tcp", "port": self.port}
        if self.host is not None:
            fields["host"] = self.host
        if self.timeout is not None:
            fields["timeout_seconds"] = self.timeout
        return json.dumps(fields).encode() + b"\n"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        where = f"guest port {self.port}" + (f" on {self.host}" if self.host else "")
        factory = _HandshakeFactory(self.request(), protocolFactory, where)
        connecting: Deferred[IProtocol] = self.agent.connect(factory)

        def connected(_: IProtocol) -> Deferred[IProtocol]:
            assert factory.handshake is not None
            return factory.handshake.ready

        return connecting.addCallback(connected)

    def __repr__(self) -> str:
        return f"GuestTCPEndpoint({self.agent!r}, port={self.port}, host={self.host!r})"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


_OWN = ("guest_port", "guest_host", "guest_timeout")


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class PyroClientParser:
    """``pyro:AGENT-ENDPOINT...:guest_port=P[:guest_host=H][:guest_timeout=S]``."""

    prefix = "pyro"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> GuestTCPEndpoint:
        if not args:
            raise ValueError(
                "pyro endpoint needs the agent's endpoint first, e.g."
                " pyro:fcvsock:path=V.SOCK:port=5005:guest_port=8080"
            )
        if "guest_port" not in kwargs:
            raise ValueError("pyro endpoint needs guest_port=PORT")
        try:
            port = int(str(kwargs["guest_port"]))
        except ValueError:
            raise ValueError(f"guest_port must be a number, not {kwargs['guest_port']!r}") from None
        host = str(kwargs["guest_host"]) if "guest_host" in kwargs else None
        timeout = None
        if "guest_timeout" in kwargs:
            try:
                timeout = int(str(kwargs["guest_timeout"]))
            except ValueError:
                raise ValueError("guest_timeout must be a whole number of seconds") from None
        inner = [_quote(str(arg)) for arg in args]
        inner += [f"{_quote(k)}={_quote(str(v))}" for k, v in kwargs.items() if k not in _OWN]
        agent = clientFromString(reactor, ":".join(inner))
        return GuestTCPEndpoint(agent, port, host, timeout)

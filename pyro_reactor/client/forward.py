"""``pyro-agent-client forward``: host ports relayed to guest ports, like ``ssh -L``.

Each ``[BIND_ADDR:]LOCAL_PORT:GUEST_PORT`` listens on the host (``127.0.0.1`` unless
``BIND_ADDR`` says otherwise); every accepted connection gets its own agent connection
(``connect_tcp`` through L{pyro_reactor.client.tcp.GuestTCPEndpoint}) and bytes are relayed
both ways with each transport the other's producer (a slow side stalls the other, nothing
piles up), half-close passed both ways. One line is reported per connection opened and closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

_SPEC = re.compile(r"^(?:(?P<bind>\[[^\]]+\]|[^:\[\]]+):)?(?P<local>\d+):(?P<guest>\d+)$")


@dataclass(frozen=True)
class ForwardSpec:
    """One ``[BIND_ADDR:]LOCAL_PORT:GUEST_PORT``."""

    bind: str
    local: int
    guest: int

    def __str__(self) -> str:
        bind = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{bind}:{self.local} -> guest port {self.guest}"


def parseForward(text: str) -> ForwardSpec:
    """Parse ``[BIND_ADDR:]LOCAL_PORT:GUEST_PORT`` (an IPv6 address in brackets)."""
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"forward wants [BIND_ADDR:]LOCAL_PORT:GUEST_PORT, not {text!r}")
    local, guest = int(match["local"]), int(match["guest"])
    if not 0 <= local <= 65535:
        raise ValueError(f"local port must be between 0 and 65535, not {local}")
    if not 1 <= guest <= 65535:
        raise ValueError(f"guest port must be between 1 and 65535, not {guest}")
    bind = (match["bind"] or "127.0.0.1").strip("[]")
    return ForwardSpec(bind, local, guest)


class _Pair:
    """One forwarded connection: the local one and its agent connection."""

    def __init__(self, report: Callable[[str], None], label: str) -> None:
        self.report = report
        self.label = label
        self.local: Any = None
        self.remote: Any = None
        self.ended: set[str] = set()
        self.closed = False
        self.sent = self.received = 0

    def wire(self) -> None:
        self.local.registerProducer(self.remote, True)
        self.remote.registerProducer(self.local, True)
        self.local.resumeProducing()

    def eof(self, side: str) -> None:
        """``side`` (``local`` or ``remote``) sent EOF: pass it on; both done: close."""
        self.ended.add(side)
        other = self.remote if side == "local" else self.local
        if len(self.ended) == 2:
            self.close(False)
            return
        if other.producer is not None:
            other.unregisterProducer()
        other.loseWriteConnection()

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for transport in (self.local, self.remote):
            if transport is None:
                continue
            if transport.producer is not None:
                transport.unregisterProducer()
            if reset:
                transport.abortConnection()
            else:
                transport.loseConnection()
        how = "reset" if reset else "closed"
        self.report(f"{self.label}: {how} ({self.sent} bytes sent, {self.received} received)")


@implementer(IHalfCloseableProtocol)
class _RemoteSide(Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def dataReceived(self, data: bytes) -> None:
        self.pair.received += len(data)
        self.pair.local.write(data)

    def readConnectionLost(self) -> None:
        self.pair.eof("remote")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pair.close(not reason.check(ConnectionDone))


@implementer(IHalfCloseableProtocol)
class _LocalSide(Protocol):
    def __init__(self, endpoint: IStreamClientEndpoint, report: Callable[[str], None]) -> None:
        self.endpoint = endpoint
        self.report = report
        self.pair: _Pair | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        peer = transport.getPeer()
        label = f"connection from {peer.host}:{peer.port}"
        pair = self.pair = _Pair(self.report, label)
        pair.local = transport
        transport.pauseProducing()  # nothing is read until the guest side is connected
        remote = _RemoteSide(pair)

        def connected(protocol: Any) -> None:
            pair.remote = remote.transport
            if pair.closed:
                pair.remote.loseConnection()
                return
            self.report(f"{label}: opened")
            pair.wire()

        def failed(reason: Failure) -> None:
            self.report(f"{label}: {reason.getErrorMessage()}")
            pair.closed = True
            transport.loseConnection()

        self.endpoint.connect(Factory.forProtocol(lambda: remote)).addCallbacks(connected, failed)

    def dataReceived(self, data: bytes) -> None:
        assert self.pair is not None
        self.pair.sent += len(data)
        self.pair.remote.write(data)

    def readConnectionLost(self) -> None:
        assert self.pair is not None
        self.pair.eof("local")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pair = self.pair
        if pair is None:
            return
        if pair.remote is None:
            pair.closed = True  # still connecting: the agent connection is closed once made
            return
        pair.close(not reason.check(ConnectionDone))


class ForwardFactory(Factory):
    """Builds one L{_LocalSide} per accepted host connection."""

    noisy = False

    def __init__(self, endpoint: IStreamClientEndpoint, report: Callable[[str], None]) -> None:
        self.endpoint = endpoint
        self.report = report

    def buildProtocol(self, addr: Any) -> _LocalSide:
        return _LocalSide(self.endpoint, self.report)


async def listenForward(
    reactor: Any, spec: ForwardSpec, endpoint: IStreamClientEndpoint, report: Callable[[str], None]
) -> Any:
    """Listen for ``spec`` on the host; the listening port."""
    server = (
        TCP6ServerEndpoint(reactor, spec.local, interface=spec.bind)
        if ":" in spec.bind
        else TCP4ServerEndpoint(reactor, spec.local, interface=spec.bind)
    )
    label = [str(spec)]
    port = await server.listen(ForwardFactory(endpoint, lambda line: report(f"{label[0]}: {line}")))
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    label[0] = f"{host}:{address.port} -> guest port {spec.guest}"  # the real port, if 0 was asked
    return port

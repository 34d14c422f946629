"""Fixtures for the client's tests: one agent on TCP and UNIX, a Firecracker-style bridge.

``startAgentEverywhere(case)`` runs one in-process agent (one dispatcher, so one set of shells
and services) listening on 127.0.0.1 and on a UNIX socket. ``startBridge(case, target)`` is a
stand-in for Firecracker's hybrid vsock socket: a UNIX server that reads ``CONNECT <port>\\n``,
connects to the agent, answers ``OK 1073741824\\n`` and relays both ways with flow control. It
can instead refuse (answer a line of its choice, or close), stay silent, or close the first
few connections without a word (what QEMU's slirp ``hostfwd`` does while the guest boots).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from pyro_reactor.agent import buildFactory
from pyro_reactor.context import AgentContext
from tests.helpers import makeContext, reactor


def shortSocketPath(case: TestCase, name: str) -> str:
    """A UNIX socket path short enough for sun_path (trial's temp dirs can be too deep)."""
    directory = tempfile.mkdtemp(prefix="pyro-client-")

    def clean() -> None:
        for entry in os.listdir(directory):
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)

    case.addCleanup(clean)
    return os.path.join(directory, name)


@dataclass
class Agent:
    context: AgentContext
    tcpPort: int
    unixPath: str
    listeningPorts: list[Any] = field(default_factory=list)

    @property
    def workspace(self) -> Path:
        return self.context.config.workspace

    @property
    def tcp(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.tcpPort}"

    @property
    def unix(self) -> str:
        return f"unix:path={self.unixPath}"


async def startAgentEverywhere(case: TestCase, **overrides: Any) -> Agent:
    context = makeContext(case, **overrides)
    factory = buildFactory(context)
    tcpPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    case.addCleanup(tcpPort.stopListening)
    path = shortSocketPath(case, "agent.sock")
    unixPort = await UNIXServerEndpoint(reactor, path).listen(factory)
    case.addCleanup(unixPort.stopListening)
    return Agent(context, tcpPort.getHost().port, path, [tcpPort, unixPort])


async def agentActions(agent: Agent) -> list[str]:
    from tests.helpers import call

    answer = await call(agent.tcpPort, {"action": "ping"})
    actions = answer.get("actions", [])
    assert isinstance(actions, list)
    return actions


async def requireActions(case: TestCase, agent: Agent, *names: str) -> None:
    """Skip the test (with the reason) while the agent does not serve these actions yet."""
    missing = [name for name in names if name not in await agentActions(agent)]
    if missing:
        case.skipTest(f"the agent does not serve {', '.join(missing)} yet")


def _stream(transport: object) -> Any:
    """A connected socket transport: also a producer and a consumer."""
    return transport


class _Back(Protocol):
    """The bridge's connection to the agent: relays the agent's bytes to the host side."""

    def __init__(self, front: _BridgeProtocol) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        assert self.front.transport is not None
        self.front.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.front.transport is not None:
            _stream(self.front.transport).unregisterProducer()
            self.front.transport.loseConnection()


class _BridgeProtocol(Protocol):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.buffer = b""
        self.back: _Back | None = None
        self.handshaking = True

    def connectionMade(self) -> None:
        self.bridge.connections += 1
        assert self.transport is not None
        if self.bridge.connections <= self.bridge.closeFirst:
            self.transport.loseConnection()
        elif not self.bridge.handshake:
            self.handshaking = False
            _stream(self.transport).pauseProducing()
            connectProtocol(self.bridge.target, _Back(self)).addCallbacks(
                self._connected, self._failed
            )

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.handshaking:
            if self.back is not None and self.back.transport is not None:
                self.back.transport.write(data)
            else:
                self.buffer += data
            return
        self.buffer += data
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            return
        self.handshaking = False
        self.buffer = rest
        self.bridge.requests.append(line)
        if self.bridge.mode == "silent":
            return
        if self.bridge.mode == "close":
            self.transport.loseConnection()
            return
        if self.bridge.mode == "refuse":
            self.transport.write(self.bridge.refusal)
            self.transport.loseConnection()
            return
        _stream(self.transport).pauseProducing()
        back = _Back(self)
        connecting: Deferred[Any] = connectProtocol(self.bridge.target, back)
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, back: _Back) -> None:
        assert self.transport is not None and back.transport is not None
        self.back = back
        if self.bridge.handshake:
            self.transport.write(b"OK 1073741824\n")
        # Flow control both ways, as a real VMM applies it.
        _stream(back.transport).registerProducer(self.transport, True)
        _stream(self.transport).registerProducer(back.transport, True)
        if self.buffer:
            back.transport.write(self.buffer)
            self.buffer = b""
        _stream(self.transport).resumeProducing()

    def _failed(self, reason: Failure) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.back is not None and self.back.transport is not None:
            _stream(self.back.transport).unregisterProducer()
            self.back.transport.loseConnection()


@dataclass
class Bridge:
    """A stand-in for Firecracker's vsock UNIX socket in front of an agent."""

    target: Any
    path: str = ""
    mode: str = "relay"  # relay | refuse | close | silent
    refusal: bytes = b"FAILURE no listener\n"
    closeFirst: int = 0
    handshake: bool = True
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    def endpoint(self, port: int = 5005, **options: object) -> str:
        extra = "".join(f":{k}={v}" for k, v in options.items())
        return f"fcvsock:path={self.path}:port={port}{extra}"


async def startBridge(case: TestCase, agent: Agent | None = None, **options: Any) -> Bridge:
    target = (
        TCP4ClientEndpoint(reactor, "127.0.0.1", agent.tcpPort, timeout=5)
        if agent is not None
        else None
    )
    bridge = Bridge(target, **options)
    bridge.path = shortSocketPath(case, "v.sock")
    port = await UNIXServerEndpoint(reactor, bridge.path).listen(
        Factory.forProtocol(lambda: _BridgeProtocol(bridge))
    )
    case.addCleanup(port.stopListening)
    return bridge


class _Scripted(Protocol):
    def __init__(self, script: bytes, close: bool) -> None:
        self.script = script
        self.close = close

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.script:
            self.transport.write(self.script)
            self.script = b""
        if self.close:
            self.transport.loseConnection()


async def startScriptedServer(case: TestCase, answer: bytes, close: bool = True) -> int:
    """A TCP server that answers any request with ``answer`` (then closes, unless told not)."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: _Scripted(answer, close))
    )
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


async def startForwarder(case: TestCase, agent: Agent, closeFirst: int) -> tuple[Bridge, int]:
    """A TCP forwarder to the agent that accepts then closes its first ``closeFirst``
    connections, as QEMU's slirp ``hostfwd`` does while the guest boots."""
    target = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.tcpPort, timeout=5)
    bridge = Bridge(target, closeFirst=closeFirst, handshake=False)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: _BridgeProtocol(bridge))
    )
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return bridge, number

"""Shared test fixtures: an agent in this process on a real socket, and a tiny wire client.

``startAgent(case)`` builds a full agent (every capability) around the global reactor with
temporary workspace and state directories and listens on 127.0.0.1 on a free port; the test
case's cleanups stop it. ``call(port, request)`` sends one request line (plus optional raw body
bytes) and returns the parsed first answer line; ``exchange`` returns the raw answer bytes.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from pyro_reactor.agent import buildFactory
from pyro_reactor.context import AgentConfig, AgentContext

reactor: Any = _reactor


@dataclass
class RunningAgent:
    """An agent listening in this process, as ``startAgent`` returns it."""

    context: AgentContext
    port: int

    @property
    def workspace(self) -> Path:
        return self.context.config.workspace

    @property
    def stateDir(self) -> Path:
        return self.context.config.stateDir

    def call(self, request: dict[str, Any], body: bytes = b"") -> Deferred[dict[str, Any]]:
        return call(self.port, request, body)

    def exchange(self, request: dict[str, Any] | bytes, body: bytes = b"") -> Deferred[bytes]:
        return exchange(self.port, request, body)


def makeContext(case: TestCase, **overrides: Any) -> AgentContext:
    """An agent context with fresh directories and a started thread pool."""
    base = Path(case.mktemp()).absolute()
    workspace = base / "workspace"
    state = base / "state"
    workspace.mkdir(parents=True)
    state.mkdir(parents=True)
    config = AgentConfig(workspace=workspace, stateDir=state, **overrides)
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-agent")
    pool.start()
    case.addCleanup(pool.stop)
    context = AgentContext(
        config=config, reactor=reactor, threadPool=pool, startedAt=reactor.seconds()
    )
    context.services.startService()
    case.addCleanup(context.services.stopService)
    return context


def startAgent(case: TestCase, **overrides: Any) -> Deferred[RunningAgent]:
    """A whole agent on 127.0.0.1:<free port>, stopped by the test's cleanups."""
    context = makeContext(case, **overrides)
    factory = buildFactory(context)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listening(port: Any) -> RunningAgent:
        case.addCleanup(port.stopListening)
        return RunningAgent(context, port.getHost().port)

    listened: Deferred[Any] = endpoint.listen(factory)
    return listened.addCallback(listening)


class _Collector(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(bytes(self.received))


def exchange(port: int, request: dict[str, Any] | bytes, body: bytes = b"") -> Deferred[bytes]:
    """Send one request (a dict, or raw bytes sent as they are) and collect the whole answer."""
    line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    collector = _Collector(line + body)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    connected: Deferred[Any] = connectProtocol(endpoint, collector)
    return connected.addCallback(lambda _: collector.done)


def call(port: int, request: dict[str, Any], body: bytes = b"") -> Deferred[dict[str, Any]]:
    """Send one request and parse the first line of the answer."""

    def parse(raw: bytes) -> dict[str, Any]:
        line, _, _ = raw.partition(b"\n")
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    return exchange(port, request, body).addCallback(parse)


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie waiting for init counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred firing after C{seconds} on the global reactor, without blocking it.

    For pacing a poll or letting a process run on for a while; never as the only
    synchronisation between a test and what it waits for (wait on a condition with
    L{waitUntil} or a bounded loop instead).
    """
    return deferLater(reactor, seconds, lambda: None)


async def waitUntil(predicate: Any, seconds: float = 5.0) -> bool:
    """Poll C{predicate} every 50 ms on the reactor for up to C{seconds}; its last value."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await deferLater(reactor, 0.05)
    return bool(predicate())


__all__ = [
    "RunningAgent",
    "alive",
    "call",
    "exchange",
    "freePort",
    "makeContext",
    "sleep",
    "startAgent",
    "waitUntil",
]

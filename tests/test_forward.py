"""The host side of the relay and the watch: the ``pyro:`` endpoint, ``AgentClient.connectTCP``,
``listPorts`` / ``watchWorkspace``, and the CLI's ``forward``, ``ports`` and ``watch``."""

from __future__ import annotations

import io
import json
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pyro_reactor.client import AgentClient
from pyro_reactor.client.cli import Console, run
from pyro_reactor.client.forward import ForwardSpec, listenForward, parseForward
from pyro_reactor.client.tcp import GuestConnectError, GuestTCPEndpoint
from tests.client_helpers import Agent, startAgentEverywhere, startBridge
from tests.helpers import reactor, waitUntil
from tests.test_ports import EchoUntilEOF


@implementer(IHalfCloseableProtocol)
class Talker(Protocol):
    """A host protocol: sends, half-closes, collects the whole answer."""

    def __init__(self, payload: bytes, halfClose: bool = True) -> None:
        self.payload = payload
        self.halfClose = halfClose
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.payload)
        if self.halfClose:
            transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.halfClose and len(self.received) >= len(self.payload):
            assert self.transport is not None
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.received)


def _clients() -> list[Any]:
    from twisted.internet import tcp

    return [r for r in reactor.getReaders() + reactor.getWriters() if isinstance(r, tcp.Client)]


async def echoServer(case: TestCase) -> int:
    port: Any = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(EchoUntilEOF)
    )
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


class ParseTests(SynchronousTestCase):
    """Command-line and endpoint-string syntax."""

    def test_forwardSpecs(self) -> None:
        """``[BIND_ADDR:]LOCAL_PORT:GUEST_PORT``, IPv6 in brackets; bad ones are refused."""
        self.assertEqual(parseForward("8080:80"), ForwardSpec("127.0.0.1", 8080, 80))
        self.assertEqual(parseForward("0.0.0.0:1:2"), ForwardSpec("0.0.0.0", 1, 2))
        self.assertEqual(parseForward("[::1]:1:2"), ForwardSpec("::1", 1, 2))
        for bad in ("80", "a:b", "1:0", "1:70000", "70000:1", ":1:2"):
            self.assertRaises(ValueError, parseForward, bad)

    def test_pyroEndpointString(self) -> None:
        """``pyro:`` wraps the agent's own endpoint string (escaped values kept) and takes
        ``guest_port``, ``guest_host`` and ``guest_timeout``."""
        endpoint = clientFromString(
            reactor, r"pyro:fcvsock:path=/tmp/a\:b.sock:port=5005:guest_port=8080"
        )
        assert isinstance(endpoint, GuestTCPEndpoint)
        self.assertEqual(endpoint.port, 8080)
        self.assertEqual(endpoint.agent.path, "/tmp/a:b.sock")  # type: ignore[attr-defined]
        endpoint = clientFromString(
            reactor,
            "pyro:tcp:host=127.0.0.1:port=5005:guest_port=80:guest_host=localhost:guest_timeout=3",
        )
        assert isinstance(endpoint, GuestTCPEndpoint)
        self.assertEqual(
            json.loads(endpoint.request()),
            {"action": "connect_tcp", "port": 80, "host": "localhost", "timeout_seconds": 3},
        )
        for bad in ("pyro:tcp:host=h:port=1", "pyro:guest_port=80", "pyro:tcp:port=1:guest_port=x"):
            self.assertRaises(ValueError, clientFromString, reactor, bad)


class EndpointTests(TestCase):
    """A guest port reached through the agent as a Twisted client endpoint."""

    timeout = 60

    async def test_connectTCP(self) -> None:
        """``AgentClient.connectTCP`` gives an endpoint whose protocol talks to the guest
        server, half-close included."""
        agent = await startAgentEverywhere(self)
        guest = await echoServer(self)
        for where in (agent.tcp, agent.unix):
            endpoint = AgentClient(reactor, where).connectTCP(guest)
            talker = Talker(b"hello ")
            await connectProtocol(endpoint, talker)
            self.assertEqual(await talker.done, b"hello bye")

    async def test_throughFirecrackerSocket(self) -> None:
        """Through Firecracker's hybrid vsock socket (``pyro:fcvsock:...``). (The test's
        stand-in for Firecracker's socket does not pass half-closes on.)"""
        agent = await startAgentEverywhere(self)
        bridge = await startBridge(self, agent)
        guest = await echoServer(self)
        endpoint = clientFromString(reactor, f"pyro:{bridge.endpoint()}:guest_port={guest}")
        talker = Talker(b"via fc " * 1000, halfClose=False)
        await connectProtocol(endpoint, talker)
        self.assertEqual(await talker.done, b"via fc " * 1000)
        # The relay winds down behind the closed connection: let it finish.
        self.assertTrue(await waitUntil(lambda: not _clients(), 10))

    async def test_refused(self) -> None:
        """A guest port nothing listens on fails ``connect`` with the agent's message."""
        agent = await startAgentEverywhere(self)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        endpoint = clientFromString(reactor, f"pyro:{agent.tcp}:guest_port={free}")
        with self.assertRaises(GuestConnectError) as caught:
            await connectProtocol(endpoint, Protocol())
        self.assertIn(f"connection to 127.0.0.1:{free} refused", str(caught.exception))

    async def test_listPortsAndWatch(self) -> None:
        """``listPorts`` lists the agent's own port; ``watchWorkspace`` reports a file written
        after it fired, and ``stop`` ends it."""
        agent = await startAgentEverywhere(self)
        client = AgentClient(reactor, agent.tcp)
        ports = await client.listPorts()
        self.assertIn(agent.tcpPort, [entry["port"] for entry in ports])
        events: list[dict[str, Any]] = []
        watch = await client.watchWorkspace(events.append)
        self.assertEqual(watch.path, "/workspace")
        (agent.workspace / "f").write_text("x")
        wanted = {"event": "modified", "path": "/workspace/f", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: wanted in events, 10), events)
        watch.stop()
        await watch.ended


class ForwardTests(TestCase):
    """``forward``: a host port relayed to a guest port."""

    timeout = 60

    async def test_forward(self) -> None:
        """A connection to the forwarded host port reaches the guest server, half-close
        included; one line is reported when it opens and one when it closes."""
        agent = await startAgentEverywhere(self)
        guest = await echoServer(self)
        lines: list[str] = []
        spec = ForwardSpec("127.0.0.1", 0, guest)
        port = await listenForward(
            reactor, spec, AgentClient(reactor, agent.unix).connectTCP(guest), lines.append
        )
        self.addCleanup(port.stopListening)
        local = port.getHost().port

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
                sock.sendall(b"x" * 100000)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        self.assertEqual(await deferToThread(talk), b"x" * 100000 + b"bye")
        self.assertTrue(await waitUntil(lambda: len(lines) == 2, 10), lines)
        self.assertIn("opened", lines[0])
        self.assertTrue(lines[0].startswith(f"127.0.0.1:{local} -> guest port {guest}: "), lines)
        self.assertIn("closed (100000 bytes sent, 100003 received)", lines[1])

    async def test_cliForwardUsage(self) -> None:
        """A malformed forward spec is a usage error (exit 2) naming the expected form."""
        agent = await startAgentEverywhere(self)
        out, err = io.StringIO(), io.StringIO()
        code = await run(
            reactor, ["--connect", agent.tcp, "forward", "8080"], Console(io.StringIO(), out, err)
        )
        self.assertEqual(code, 2)
        self.assertIn("[BIND_ADDR:]LOCAL_PORT:GUEST_PORT", err.getvalue())

    async def test_cliPorts(self) -> None:
        """``pyro-agent-client ports`` lists the agent's own listening port."""
        agent = await startAgentEverywhere(self)
        out, err = io.StringIO(), io.StringIO()
        code = await run(
            reactor, ["--connect", agent.tcp, "ports"], Console(io.StringIO(), out, err)
        )
        self.assertEqual(code, 0, err.getvalue())
        self.assertIn(f"127.0.0.1:{agent.tcpPort}", out.getvalue())

    async def test_cliWatch(self) -> None:
        """``pyro-agent-client watch PATH`` prints events until the watched directory goes."""
        agent = await startAgentEverywhere(self)
        (agent.workspace / "d").mkdir()
        out, err = io.StringIO(), io.StringIO()
        running = Deferred.fromCoroutine(
            run(reactor, ["--connect", agent.tcp, "watch", "d"], Console(io.StringIO(), out, err))
        )
        self.assertTrue(await waitUntil(lambda: "watching" in out.getvalue(), 10))
        (agent.workspace / "d" / "f").write_text("x")
        self.assertTrue(await waitUntil(lambda: "modified" in out.getvalue(), 10))
        (agent.workspace / "d" / "f").unlink()
        (agent.workspace / "d").rmdir()
        self.assertEqual(await running, 0, err.getvalue())
        text = out.getvalue()
        self.assertIn("watching /workspace/d", text)
        self.assertIn("created  /workspace/d/f", text)
        self.assertIn("deleted  /workspace/d/", text)


__all__ = ["Agent"]

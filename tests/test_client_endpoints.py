"""Client endpoint strings (``fcvsock:``, ``vsock:``) and the Firecracker handshake in memory.

The handshake over real sockets (a bridge that answers OK, refuses, closes or stays silent) is
in ``test_client.py``. A successful AF_VSOCK connection needs a VM (``tests/vm/``); here the
vsock transport is checked to try a real AF_VSOCK connect and to report its failure.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.client import AgentClient, AgentTimeoutError, AgentUnavailableError
from pyro_reactor.client.endpoints import (
    FirecrackerVSockClientEndpoint,
    VSockClientEndpoint,
    VSockConnectError,
    _HandshakeProtocol,
)
from pyro_reactor.system.vsock import AF_VSOCK, VSockServerEndpoint
from tests.helpers import reactor


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.lost.append(reason)


class ParserTests(SynchronousTestCase):
    def test_fcvsockKeywordsAndPositionals(self) -> None:
        """fcvsock endpoint strings accept path, port and timeout as keywords or positionals."""
        for text in (
            "fcvsock:path=/run/vm/v.sock:port=5005",
            "fcvsock:/run/vm/v.sock:5005",
            "fcvsock:port=5005:path=/run/vm/v.sock:timeout=2.5",
        ):
            endpoint = clientFromString(reactor, text)
            self.assertIsInstance(endpoint, FirecrackerVSockClientEndpoint, text)
            assert isinstance(endpoint, FirecrackerVSockClientEndpoint)
            self.assertEqual((endpoint.path, endpoint.port), ("/run/vm/v.sock", 5005))
        endpoint = clientFromString(reactor, "fcvsock:path=/v.sock:port=1:timeout=2.5")
        assert isinstance(endpoint, FirecrackerVSockClientEndpoint)
        self.assertEqual(endpoint.timeout, 2.5)

    def test_vsockClientBesideTheServerParser(self) -> None:
        """The vsock client endpoint parses cid and port and coexists with the agent's vsock
        server parser."""
        client = clientFromString(reactor, "vsock:cid=3:port=5005")
        self.assertIsInstance(client, VSockClientEndpoint)
        assert isinstance(client, VSockClientEndpoint)
        self.assertEqual((client.cid, client.port), (3, 5005))
        self.assertIsInstance(clientFromString(reactor, "vsock:1:5005"), VSockClientEndpoint)
        # The server side's "vsock" parser is another interface: both work.
        self.assertIsInstance(serverFromString(reactor, "vsock:5005"), VSockServerEndpoint)

    def test_mistakesAreExplained(self) -> None:
        """Malformed fcvsock and vsock endpoint strings are refused with a message saying what is
        wrong."""
        for text, expected in (
            ("fcvsock:path=/v.sock", "fcvsock endpoint needs port="),
            ("fcvsock:port=5005", "fcvsock endpoint needs path="),
            ("fcvsock:path=/v.sock:port=http", "vsock port must be a number, not 'http'"),
            ("fcvsock:path=/v.sock:port=5005:colour=red", "unknown fcvsock endpoint option(s)"),
            ("fcvsock:path=/v.sock:port=5005:timeout=0", "timeout must be positive"),
            ("vsock:cid=3", "vsock endpoint needs port="),
            ("vsock:cid=-1:port=5", "vsock cid must be between 0 and 4294967295"),
            ("vsock:cid=3:port=4294967296", "vsock port must be between 0 and 4294967295"),
            ("vsock:3:5005:7", "at most 2 positional values"),
        ):
            with self.assertRaises(ValueError, msg=text) as caught:
                clientFromString(reactor, text)
            self.assertIn(expected, str(caught.exception), text)


class HandshakeTests(SynchronousTestCase):
    def handshake(self) -> tuple[_HandshakeProtocol, StringTransport, Recorder, MemoryReactorClock]:
        clock = MemoryReactorClock()
        endpoint = FirecrackerVSockClientEndpoint(clock, "/v.sock", 5005, timeout=3)
        inner = Recorder()
        proto = _HandshakeProtocol(endpoint, Factory.forProtocol(lambda: inner))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport, inner, clock

    def test_okHandsTheStreamOverWithTheBytesThatFollow(self) -> None:
        """After CONNECT is answered OK, the stream is handed to the agent protocol together with
        the bytes that followed the OK line."""
        proto, transport, inner, _ = self.handshake()
        self.assertEqual(transport.value(), b"CONNECT 5005\n")
        ready: list[Any] = []
        proto.ready.addCallback(ready.append)
        proto.dataReceived(b"OK 10737")
        self.assertEqual(ready, [])
        proto.dataReceived(b'41824\n{"pong"')
        self.assertEqual(ready, [inner])
        self.assertIs(inner.transport, transport)
        proto.dataReceived(b": true}\n")
        self.assertEqual(inner.received, b'{"pong": true}\n')
        proto.connectionLost(Failure(Exception("done")))
        self.assertEqual(len(inner.lost), 1)

    def test_anythingElseIsAnErrorNamingIt(self) -> None:
        """A CONNECT answer other than OK closes the connection and fails naming the answer, the
        port and the socket."""
        proto, transport, _, _ = self.handshake()
        failures: list[Failure] = []
        proto.ready.addErrback(failures.append)
        proto.dataReceived(b"ERR unknown port\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsInstance(failures[0].value, VSockConnectError)
        self.assertEqual(
            str(failures[0].value),
            "/v.sock: the vsock socket answered 'ERR unknown port' to CONNECT 5005, not OK",
        )

    def test_endlessLineIsRefused(self) -> None:
        """A CONNECT answer without a line end within a bound is refused instead of buffered
        forever."""
        proto, transport, _, _ = self.handshake()
        failures: list[Failure] = []
        proto.ready.addErrback(failures.append)
        proto.dataReceived(b"x" * 600)
        self.assertIn("no line end", str(failures[0].value))
        self.assertTrue(transport.disconnecting)

    def test_timeout(self) -> None:
        """A CONNECT left unanswered fails after the endpoint's timeout, naming the socket and
        port, and closes the connection."""
        proto, transport, _, clock = self.handshake()
        failures: list[Failure] = []
        proto.ready.addErrback(failures.append)
        clock.advance(3)
        self.assertEqual(str(failures[0].value), "/v.sock: no answer to CONNECT 5005 within 3 s")
        self.assertTrue(transport.disconnecting)

    def test_okCancelsTheTimer(self) -> None:
        """An OK answer cancels the handshake timer."""
        proto, _, _, clock = self.handshake()
        proto.dataReceived(b"OK 1\n")
        self.assertEqual(clock.getDelayedCalls(), [])


class VSockTransportTests(TestCase):
    async def test_failureIsReported(self) -> None:
        """A vsock connect to a CID that does not exist fails with an error naming the address."""
        if AF_VSOCK is None:
            self.skipTest("no AF_VSOCK on this platform")
        # CID 3 is a guest that does not exist here: the kernel refuses (ENODEV) or the
        # attempt times out, depending on the host's vsock transport.
        client = AgentClient(reactor, "vsock:cid=3:port=5005:timeout=2", connectTimeout=3)
        with self.assertRaises((AgentUnavailableError, AgentTimeoutError)) as caught:
            await client.ping()
        self.assertIn("could not connect to vsock:cid=3:port=5005", str(caught.exception))

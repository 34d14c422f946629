"""The TCP relay (``connect_tcp``) and ``list_ports``.

The relay machine is driven with fake ends; the two relay protocols with ``StringTransport``s;
the whole path (host -> agent -> guest server) with real sockets on loopback.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pyro_reactor.capabilities.ports._machine import End, RelayCore, RelayMachine
from pyro_reactor.capabilities.ports.listing import listPorts, parseProcNet
from pyro_reactor.capabilities.ports.relay import Relay
from tests.helpers import RunningAgent, freePort, startAgent, waitUntil

reactor: Any = _reactor


class FakeEnd:
    """An end that records what the machine asked of it."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    def pause(self) -> None:
        self.events.append(f"{self.name}.pause")

    def resume(self) -> None:
        self.events.append(f"{self.name}.resume")

    def pipeFrom(self, other: End) -> None:
        assert isinstance(other, FakeEnd)
        self.events.append(f"{self.name}.pipeFrom({other.name})")

    def shutdownWrite(self) -> None:
        self.events.append(f"{self.name}.shutdownWrite")

    def close(self) -> None:
        self.events.append(f"{self.name}.close")

    def reset(self) -> None:
        self.events.append(f"{self.name}.reset")


class RelayMachineTests(SynchronousTestCase):
    """The relay lifecycle: connect, relay, half-close each way, end, reset."""

    def setUp(self) -> None:
        self.events: list[str] = []
        self.machine = RelayMachine(RelayCore())
        self.guest = FakeEnd("guest", self.events)
        self.host = FakeEnd("host", self.events)

    def relaying(self) -> None:
        self.machine.guestConnected(self.guest)
        self.machine.hostAttached(self.host)
        del self.events[:]

    def test_guestHeldUntilHostAttached(self) -> None:
        """The guest connection is paused until the host end is attached, then both are
        piped to each other and the guest is read again."""
        self.machine.guestConnected(self.guest)
        self.assertEqual(self.events, ["guest.pause"])
        self.machine.hostAttached(self.host)
        self.assertEqual(
            self.events,
            ["guest.pause", "host.pipeFrom(guest)", "guest.pipeFrom(host)", "guest.resume"],
        )
        self.assertFalse(self.machine.isClosed())

    def test_hostHalfCloseFirst(self) -> None:
        """A host EOF shuts the guest's write side; the relay ends when the guest's EOF
        follows, closing both."""
        self.relaying()
        self.machine.hostEOF()
        self.assertEqual(self.events, ["guest.shutdownWrite"])
        self.assertFalse(self.machine.isClosed())
        self.machine.guestEOF()
        self.assertEqual(self.events, ["guest.shutdownWrite", "host.close", "guest.close"])
        self.assertTrue(self.machine.isClosed())

    def test_guestHalfCloseFirst(self) -> None:
        """A guest EOF shuts the host's write side; the host's EOF then ends the relay."""
        self.relaying()
        self.machine.guestEOF()
        self.assertEqual(self.events, ["host.shutdownWrite"])
        self.machine.hostEOF()
        self.assertTrue(self.machine.isClosed())

    def test_guestResetIsPassedOn(self) -> None:
        """A guest connection lost abnormally resets the host connection; a clean loss
        closes it."""
        self.relaying()
        self.machine.guestLost(True)
        self.assertEqual(self.events, ["host.reset"])
        self.assertTrue(self.machine.isClosed())
        machine = RelayMachine(RelayCore())
        events: list[str] = []
        machine.guestConnected(FakeEnd("guest", events))
        machine.hostAttached(FakeEnd("host", events))
        machine.guestLost(False)
        self.assertEqual(events[-1], "host.close")

    def test_hostLostClosesGuest(self) -> None:
        """A host gone in any open state closes (or resets) the guest connection."""
        self.relaying()
        self.machine.hostEOF()
        self.machine.hostLost(True)
        self.assertEqual(self.events, ["guest.shutdownWrite", "guest.reset"])

    def test_hostGoneBeforeHandOver(self) -> None:
        """A host that left before the answer: the guest connection is closed."""
        self.machine.guestConnected(self.guest)
        self.machine.hostLost(False)
        self.assertEqual(self.events, ["guest.pause", "guest.close"])
        self.assertTrue(self.machine.isClosed())

    def test_lateEventsIgnored(self) -> None:
        """After the end, late reports from either connection change nothing; a host end
        attached after the guest already went is closed at once."""
        self.machine.guestConnected(self.guest)
        self.machine.guestLost(True)
        self.machine.hostAttached(self.host)
        self.assertEqual(self.events, ["guest.pause", "host.close"])
        for late in (self.machine.hostEOF, self.machine.guestEOF, self.machine.guestFailed):
            late()
        self.machine.hostLost(False)
        self.machine.guestLost(False)
        self.assertEqual(self.events, ["guest.pause", "host.close"])

    def test_connectFailed(self) -> None:
        """A failed guest connect ends the relay with nothing to close."""
        self.machine.guestFailed()
        self.assertTrue(self.machine.isClosed())
        self.assertEqual(self.events, [])


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes and resets."""

    def __init__(self) -> None:
        super().__init__()
        self.writeClosed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True


class RelayProtocolTests(SynchronousTestCase):
    """The two relay protocols move bytes straight across and report to the machine."""

    def setUp(self) -> None:
        self.relay = Relay("test")
        self.guestTransport = HalfCloseTransport()
        self.hostTransport = HalfCloseTransport()
        self.relay.guest.makeConnection(self.guestTransport)

    def test_bytesBothWays(self) -> None:
        """Bytes from the host reach the guest and the other way round, unchanged; each
        transport is the other's producer."""
        self.relay.host.makeConnection(self.hostTransport)
        self.relay.host.dataReceived(b"ping")
        self.relay.guest.dataReceived(b"pong")
        self.assertEqual(self.guestTransport.value(), b"ping")
        self.assertEqual(self.hostTransport.value(), b"pong")
        self.assertIs(self.hostTransport.producer, self.guestTransport)
        self.assertIs(self.guestTransport.producer, self.hostTransport)

    def test_guestPausedUntilHandOver(self) -> None:
        """The guest is not read before the host connection is handed over; a guest byte that
        raced the pause is delivered first."""
        self.assertEqual(self.guestTransport.producerState, "paused")
        self.relay.guest.dataReceived(b"banner")
        self.relay.host.makeConnection(self.hostTransport)
        self.assertEqual(self.guestTransport.producerState, "producing")
        self.assertEqual(self.hostTransport.value(), b"banner")

    def test_halfClose(self) -> None:
        """A host EOF half-closes the guest connection (its producer released first); the
        guest's EOF then closes both."""
        self.relay.host.makeConnection(self.hostTransport)
        self.relay.host.readConnectionLost()
        self.assertTrue(self.guestTransport.writeClosed)
        self.assertIsNone(self.guestTransport.producer)
        self.assertFalse(self.hostTransport.disconnecting)
        self.relay.guest.readConnectionLost()
        self.assertTrue(self.hostTransport.disconnecting)
        self.assertTrue(self.guestTransport.disconnecting)

    def test_reset(self) -> None:
        """A guest connection lost with an error aborts the host connection."""
        self.relay.host.makeConnection(self.hostTransport)
        self.relay.guest.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.hostTransport.aborted)

    def test_cleanLoss(self) -> None:
        """A guest connection closed cleanly closes the host connection after its data."""
        self.relay.host.makeConnection(self.hostTransport)
        self.relay.guest.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.hostTransport.disconnecting)
        self.assertFalse(self.hostTransport.aborted)


# -- real sockets ------------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class EchoUntilEOF(Protocol):
    """A guest server: echoes, answers ``bye`` after the client's EOF, then closes."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Resetter(Protocol):
    """A guest server that resets the connection after its first bytes."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        transport.abortConnection()


class Flooder(Protocol):
    """A guest server that writes as fast as its consumer takes, counting what it wrote."""

    written = 0
    paused = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"x" * 65536
        while not self.paused and self.transport is not None and self.written < 512 * 2**20:
            Flooder.written += len(chunk)
            self.transport.write(chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


async def listen(case: TestCase, factory: Factory) -> int:
    port: Any = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


def blockingRelay(
    port: int, request: dict[str, Any], early: bytes = b""
) -> tuple[socket.socket, Any]:
    """A plain socket to the agent with the request (and early bytes) sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(json.dumps(request).encode() + b"\n" + early)
    return sock, sock.makefile("rb")


def inThread(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args)


def readHeader(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    header = json.loads(line)
    assert isinstance(header, dict)
    return header, rest


def readAll(sock: socket.socket, rest: bytes = b"") -> bytes:
    data = rest
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


class RelaySocketTests(TestCase):
    """connect_tcp end to end, on loopback sockets."""

    timeout = 60

    async def agent(self, **overrides: Any) -> RunningAgent:
        return await startAgent(self, **overrides)

    async def test_echoWithHalfClose(self) -> None:
        """Bytes sent before ``connected`` arrive after it, nothing lost; a host
        ``shutdown(SHUT_WR)`` reaches the guest server as EOF and its answer still comes back,
        then the guest's close reaches the host."""
        agent = await self.agent()
        guestPort = await listen(self, Factory.forProtocol(EchoUntilEOF))

        def talk() -> tuple[dict[str, Any], bytes]:
            sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
            with sock:
                sock.sendall(
                    json.dumps({"action": "connect_tcp", "port": guestPort}).encode()
                    + b"\nearly bytes|"
                )
                sock.sendall(b"more")
                sock.shutdown(socket.SHUT_WR)
                header, rest = readHeader(sock)
                return header, readAll(sock, rest)

        header, body = await inThread(talk)
        self.assertEqual(header, {"connected": True, "host": "127.0.0.1", "port": guestPort})
        self.assertEqual(body, b"early bytes|morebye")

    async def test_guestHalfClose(self) -> None:
        """A guest server that half-closes first: the host sees EOF and can still send, and
        the guest still receives."""
        received: list[bytes] = []
        ended: Deferred[None] = Deferred()

        @implementer(IHalfCloseableProtocol)
        class SaysHelloFirst(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"hello")
                self.transport.loseWriteConnection()  # type: ignore[attr-defined]

            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def readConnectionLost(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                ended.callback(None)

        agent = await self.agent()
        guestPort = await listen(self, Factory.forProtocol(SaysHelloFirst))

        def talk() -> bytes:
            sock, _ = blockingRelay(agent.port, {"action": "connect_tcp", "port": guestPort})
            with sock:
                header, rest = readHeader(sock)
                assert header["connected"] is True
                data = readAll(sock, rest)  # the guest's EOF arrives...
                sock.sendall(b"after eof")  # ...and the host can still send
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)
                return data

        self.assertEqual(await inThread(talk), b"hello")
        await ended
        self.assertEqual(b"".join(received), b"after eof")

    async def test_refused(self) -> None:
        """A port nothing listens on is answered with an error naming the address."""
        agent = await self.agent()
        port = freePort()
        answer = await agent.call({"action": "connect_tcp", "port": port})
        self.assertEqual(answer, {"error": f"connection to 127.0.0.1:{port} refused"})

    async def test_badPorts(self) -> None:
        """Port 0 and ports over 65535 are refused."""
        agent = await self.agent()
        for port in (0, 65536, -1):
            answer = await agent.call({"action": "connect_tcp", "port": port})
            self.assertEqual(answer, {"error": f"port must be between 1 and 65535, not {port}"})
        answer = await agent.call({"action": "connect_tcp"})
        self.assertEqual(answer, {"error": "port must be between 1 and 65535, not 0"})

    async def test_nonLoopbackRefused(self) -> None:
        """Without --relay-hosts any, only loopback addresses are reachable."""
        agent = await self.agent()
        answer = await agent.call({"action": "connect_tcp", "port": 80, "host": "10.1.2.3"})
        self.assertIn("connecting to 10.1.2.3:80 is not allowed", answer["error"])
        self.assertIn("--relay-hosts any", answer["error"])

    async def test_anyHost(self) -> None:
        """With --relay-hosts any, another address is tried (here: refused, not forbidden),
        and ``localhost`` is always allowed."""
        agent = await self.agent(relayHosts="any")
        port = freePort()
        answer = await agent.call({"action": "connect_tcp", "port": port, "host": "127.0.0.2"})
        self.assertEqual(answer, {"error": f"connection to 127.0.0.2:{port} refused"})
        guestPort = await listen(self, Factory.forProtocol(EchoUntilEOF))

        def talk() -> tuple[dict[str, Any], bytes]:
            request = {"action": "connect_tcp", "port": guestPort, "host": "localhost"}
            sock, _ = blockingRelay(agent.port, request, b"hi")
            with sock:
                sock.shutdown(socket.SHUT_WR)
                header, rest = readHeader(sock)
                return header, readAll(sock, rest)

        header, body = await inThread(talk)
        self.assertEqual(header, {"connected": True, "host": "localhost", "port": guestPort})
        self.assertEqual(body, b"hibye")

    async def test_guestReset(self) -> None:
        """A guest server that resets mid-stream: the host sees the reset (or at least the
        end), and the agent goes on answering."""
        agent = await self.agent()
        guestPort = await listen(self, Factory.forProtocol(Resetter))

        def talk() -> str:
            sock, _ = blockingRelay(agent.port, {"action": "connect_tcp", "port": guestPort})
            with sock:
                header, _ = readHeader(sock)
                assert header["connected"] is True
                sock.sendall(b"x")
                try:
                    while sock.recv(65536):
                        pass
                except ConnectionResetError:
                    return "reset"
                return "closed"

        self.assertEqual(await inThread(talk), "reset")
        answer = await agent.call({"action": "ping"})
        self.assertTrue(answer["pong"])

    async def test_backpressure(self) -> None:
        """A host that stops reading stalls the guest server: the bytes the agent holds for
        the host stay bounded (about 1 MiB at most), and the guest server stops being read,
        whatever it tries to send."""
        agent = await self.agent()
        Flooder.written = 0
        guestPort = await listen(self, Factory.forProtocol(Flooder))
        sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(json.dumps({"action": "connect_tcp", "port": guestPort}).encode() + b"\n")
        last = -1

        def settled() -> bool:
            nonlocal last
            now, last = Flooder.written, Flooder.written
            return now == last and now > 0

        # Wait until the flood stops growing (the producers have paused).
        for _ in range(3):
            await waitUntil(settled, 10)
            await waitUntil(lambda: False, 0.3)
        stalled = Flooder.written
        await waitUntil(lambda: False, 0.5)
        self.assertEqual(Flooder.written, stalled)
        self.assertLess(stalled, 64 * 2**20)
        held = 0
        for transport in _agentTransports():
            held = max(held, _buffered(transport))
        self.assertLessEqual(held, 2**20)
        # Reading again lets it all flow: nothing was lost.
        sock.settimeout(10)
        header, rest = await inThread(readHeader, sock)
        self.assertEqual(header["connected"], True)
        got = len(rest)
        while got < stalled:
            chunk = await inThread(sock.recv, 2**20)
            self.assertTrue(chunk)
            got += len(chunk)
        self.assertGreaterEqual(got, stalled)


class RelayEdgeTests(TestCase):
    """Timeouts, the other direction's backpressure, and descriptors given back."""

    timeout = 60

    async def test_timeout(self) -> None:
        """A guest-side connect that times out is answered with an error naming the address
        and the timeout."""
        from twisted.internet.defer import fail
        from twisted.internet.error import TimeoutError as ConnectTimeout

        from pyro_reactor.capabilities.ports import PortsCapability

        class Never:
            def connect(self, factory: Any) -> Deferred[Any]:
                return fail(ConnectTimeout())

        self.patch(PortsCapability, "_endpoint", lambda self, host, port, timeout: Never())
        agent = await startAgent(self)
        answer = await agent.call({"action": "connect_tcp", "port": 9, "timeout_seconds": 3})
        self.assertEqual(answer, {"error": "connection to 127.0.0.1:9 timed out after 3 s"})
        answer = await agent.call({"action": "connect_tcp", "port": 9, "host": "::1"})
        self.assertEqual(answer, {"error": "connection to [::1]:9 timed out after 10 s"})

    async def test_guestNotReading(self) -> None:
        """A guest server that does not read stalls the host: the agent holds a bounded
        amount for the guest, and the host's sends stop being taken."""
        guests: list[Any] = []

        class Deaf(Protocol):
            def connectionMade(self) -> None:
                transport: Any = self.transport
                transport.pauseProducing()
                guests.append(transport)

        agent = await startAgent(self)
        guestPort = await listen(self, Factory.forProtocol(Deaf))
        sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(json.dumps({"action": "connect_tcp", "port": guestPort}).encode() + b"\n")
        sock.setblocking(False)
        sent = 0
        chunk = b"y" * 65536
        idle = 0
        while idle < 10:
            try:
                sent += sock.send(chunk)
                idle = 0
            except BlockingIOError:
                idle += 1
                await waitUntil(lambda: False, 0.1)
        self.assertLess(sent, 64 * 2**20)
        held = max(_buffered(t) for t in _agentTransports() + _guestClients())
        self.assertLessEqual(held, 2**20)
        for transport in guests:
            transport.loseConnection()

    async def test_descriptorsGiveBack(self) -> None:
        """After many relays (answered, refused, cut short) the agent holds no more sockets
        than before."""
        agent = await startAgent(self)
        guestPort = await listen(self, Factory.forProtocol(EchoUntilEOF))
        before = sockets()

        def many() -> None:
            for number in range(20):
                sock, _ = blockingRelay(agent.port, {"action": "connect_tcp", "port": guestPort})
                with sock:
                    if number % 2:
                        sock.shutdown(socket.SHUT_WR)
                        readAll(sock)
            for _ in range(5):
                sock, _ = blockingRelay(agent.port, {"action": "connect_tcp", "port": freePort()})
                with sock:
                    readAll(sock)

        await inThread(many)
        self.assertTrue(await waitUntil(lambda: sockets() <= before, 10), (before, sockets()))


def sockets() -> int:
    """How many sockets this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


def _guestClients() -> list[Any]:
    from twisted.internet import tcp

    return [r for r in reactor.getReaders() + reactor.getWriters() if isinstance(r, tcp.Client)]


def _agentTransports() -> list[Any]:
    from pyro_reactor.wire.protocol import RequestProtocol

    return [
        reader
        for reader in reactor.getReaders() + reactor.getWriters()
        if isinstance(getattr(reader, "protocol", None), RequestProtocol)
    ]


def _buffered(transport: Any) -> int:
    """Bytes a Twisted socket transport holds, not yet written."""
    pending = sum(len(b) for b in getattr(transport, "_tempDataBuffer", []))
    held: int = len(transport.dataBuffer) - transport.offset + pending
    return held


class ListPortsTests(TestCase):
    """list_ports reads the guest's listening sockets."""

    def test_parse(self) -> None:
        """Lines of /proc/net/tcp and tcp6 become addresses, ports and inodes; only LISTEN
        sockets count."""
        tcp = (
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
            "  timeout inode\n"
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000"
            "        0 4242 1 0000000000000000 100 0 0 10 0\n"
            "   1: 0100007F:A837 0100007F:96C2 01 00000000:00000000 03:00000703 00000000     0"
            "        0 0 3 0000000000000000\n"
        )
        self.assertEqual(parseProcNet(tcp, "ipv4"), [("127.0.0.1", 8080, 4242)])
        tcp6 = (
            "  sl  local_address                         remote_address                        st"
            "\n"
            "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A"
            " 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000\n"
        )
        self.assertEqual(parseProcNet(tcp6, "ipv6"), [("::1", 80, 77)])

    async def test_ownListeningSocket(self) -> None:
        """A socket this process listens on is listed with this process's pid and name."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "list_ports"})
        mine = [entry for entry in answer["ports"] if entry["port"] == agent.port]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["host"], "127.0.0.1")
        self.assertEqual(mine[0]["family"], "ipv4")
        self.assertEqual(mine[0]["pid"], os.getpid())
        self.assertEqual(mine[0]["command"], Path(f"/proc/{os.getpid()}/comm").read_text().strip())
        self.assertEqual(set(mine[0]), {"port", "host", "family", "pid", "command"})

    def test_unknownOwner(self) -> None:
        """A socket whose owner cannot be found has null pid and command."""
        proc = Path(self.mktemp())
        (proc / "net").mkdir(parents=True)
        (proc / "net" / "tcp").write_text(
            "header\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
            "     0        0 999 1 0 100 0 0 10 0\n"
        )
        self.assertEqual(
            listPorts(proc),
            {
                "ports": [
                    {"port": 22, "host": "0.0.0.0", "family": "ipv4", "pid": None, "command": None}
                ]
            },
        )


class WriteThroughTests(TestCase):
    """Canary on the private Twisted attributes the relay's write-through relies on."""

    async def test_sendsAtOnceWhenIdle(self) -> None:
        """On a real TCP connection with nothing queued, bytes reach the socket without a
        reactor turn; with bytes queued, they are queued behind them (order kept)."""
        from pyro_reactor.capabilities.ports._writethrough import sendNow

        received: list[bytes] = []

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        port = await listen(self, Factory.forProtocol(Collect))
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = Protocol()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        transport: Any = client.transport
        for name in ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnected", "socket"):
            self.assertTrue(hasattr(transport, name), name)
        sendNow(transport, b"now")
        self.assertEqual(transport._tempDataLen, 0)  # not queued: already in the socket
        transport.write(b"queued")
        sendNow(transport, b"after")
        self.assertEqual(transport._tempDataLen, len(b"queuedafter"))
        self.assertTrue(await waitUntil(lambda: b"".join(received) == b"nowqueuedafter", 10))
        transport.loseConnection()

"""The vsock endpoint: its string parser, address, listening port and accepted connections.

These machines are themselves guests without a vsock loopback transport, so an ``AF_VSOCK``
socket can be created and bound here but nothing can connect to it. The tests therefore:

- parse endpoint strings through ``serverFromString`` (which also proves the plugin is found);
- listen for real on ``AF_VSOCK`` (bound socket, kernel-chosen port, clear errors);
- drive the accept path of L{VSockPort} over a TCP socket dressed up as a vsock one
  (``_VSockCostume``), a real connection whose addresses the kernel would have reported as
  ``(cid, port)`` pairs, including the ``peers=`` admission check (the costume says which CID
  the next peer has);
- start ``twistd pyro-agent`` with a ``peers=`` endpoint, good and bad;
- when ``vsock_loopback`` is loaded, run a real ping over ``AF_VSOCK`` to CID 1, and check that
  ``peers=HOST`` refuses it (skipped here).
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pyro_reactor.agent import buildFactory
from pyro_reactor.system.vsock import (
    AF_VSOCK,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    VMADDR_PORT_ANY,
    VSockAddress,
    VSockPort,
    VSockServer,
    VSockServerEndpoint,
)
from tests.helpers import call, makeContext, reactor
from tests.twistd_helpers import TWISTD, spawnTwistd


def _vsockUnavailable() -> str | None:
    """Why an AF_VSOCK socket cannot be made here, or None if it can."""
    if AF_VSOCK is None:
        return "this platform has no AF_VSOCK"
    try:
        socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as error:
        return f"AF_VSOCK sockets are unavailable: {error}"
    return None


class ParserTests(SynchronousTestCase):
    """``serverFromString`` finds the ``vsock`` parser plugin and reads every spelling."""

    def parse(self, description: str) -> VSockServerEndpoint:
        endpoint = serverFromString(MemoryReactor(), description)
        self.assertIsInstance(endpoint, VSockServerEndpoint)
        assert isinstance(endpoint, VSockServerEndpoint)
        verifyObject(IStreamServerEndpoint, endpoint)
        return endpoint

    def assertEndpoint(
        self,
        description: str,
        port: int,
        cid: int,
        backlog: int = 50,
        peers: frozenset[int] | None = None,
    ) -> None:
        endpoint = self.parse(description)
        self.assertEqual(
            (endpoint.port, endpoint.cid, endpoint.backlog, endpoint.peers),
            (port, cid, backlog, peers),
        )

    def test_positionalPort(self) -> None:
        """`vsock:PORT` listens on that port for any CID."""
        self.assertEndpoint("vsock:5005", 5005, VMADDR_CID_ANY)

    def test_namedPort(self) -> None:
        """The port may also be given as `port=PORT`."""
        self.assertEndpoint("vsock:port=5005", 5005, VMADDR_CID_ANY)

    def test_cidByName(self) -> None:
        """The CID may be given by name (ANY, LOCAL or HOST), in any letter case."""
        self.assertEndpoint("vsock:port=5005:cid=ANY", 5005, VMADDR_CID_ANY)
        self.assertEndpoint("vsock:5005:cid=any", 5005, VMADDR_CID_ANY)
        self.assertEndpoint("vsock:5005:cid=LOCAL", 5005, VMADDR_CID_LOCAL)
        self.assertEndpoint("vsock:5005:cid=HOST", 5005, VMADDR_CID_HOST)

    def test_cidByNumber(self) -> None:
        """The CID may be given as a number."""
        self.assertEndpoint("vsock:5005:cid=3", 5005, 3)

    def test_backlog(self) -> None:
        """A `backlog` option sets the listen backlog."""
        self.assertEndpoint("vsock:5005:backlog=7", 5005, VMADDR_CID_ANY, backlog=7)

    def test_portZeroMeansAnyPort(self) -> None:
        """As with ``tcp:0``, port 0 lets the kernel choose (vsock spells it 0xFFFFFFFF)."""
        self.assertEndpoint("vsock:0", VMADDR_PORT_ANY, VMADDR_CID_ANY)
        self.assertEndpoint("vsock:any", VMADDR_PORT_ANY, VMADDR_CID_ANY)
        self.assertEndpoint("vsock:4294967295", VMADDR_PORT_ANY, VMADDR_CID_ANY)

    def test_peersDefaultToAny(self) -> None:
        """Without ``peers=`` every peer is served, as by the reference agent."""
        self.assertEndpoint("vsock:5005", 5005, VMADDR_CID_ANY, peers=None)
        self.assertEndpoint("vsock:5005:peers=ANY", 5005, VMADDR_CID_ANY, peers=None)
        self.assertEndpoint("vsock:5005:peers=any", 5005, VMADDR_CID_ANY, peers=None)

    def test_peersByName(self) -> None:
        """`peers` may name the CIDs allowed to connect (HOST, hypervisor), in any letter case."""
        host = frozenset({VMADDR_CID_HOST})
        self.assertEndpoint("vsock:5005:peers=HOST", 5005, VMADDR_CID_ANY, peers=host)
        self.assertEndpoint("vsock:port=5005:peers=host", 5005, VMADDR_CID_ANY, peers=host)
        self.assertEndpoint(
            "vsock:5005:peers=hypervisor",
            5005,
            VMADDR_CID_ANY,
            peers=frozenset({VMADDR_CID_HYPERVISOR}),
        )

    def test_peersList(self) -> None:
        """`peers` may list several CIDs, by number or name, with spaces and repeats allowed,
        alongside a `cid` option."""
        both = frozenset({VMADDR_CID_HOST, VMADDR_CID_LOCAL})
        self.assertEndpoint("vsock:5005:peers=2,1", 5005, VMADDR_CID_ANY, peers=both)
        self.assertEndpoint("vsock:5005:peers=HOST, LOCAL", 5005, VMADDR_CID_ANY, peers=both)
        self.assertEndpoint("vsock:5005:peers=2,HOST,1", 5005, VMADDR_CID_ANY, peers=both)
        self.assertEndpoint("vsock:5005:cid=3:peers=7", 5005, 3, peers=frozenset({7}))

    def test_peersInRepr(self) -> None:
        """An endpoint's repr shows its port, CID and allowed peers by name."""
        self.assertEqual(
            repr(self.parse("vsock:5005:peers=1,HOST")),
            "VSockServerEndpoint(port=5005, cid=ANY, peers=LOCAL,HOST)",
        )

    def assertRefused(self, description: str, fragment: str) -> None:
        with self.assertRaises(ValueError) as caught:
            serverFromString(MemoryReactor(), description)
        self.assertIn(fragment, str(caught.exception))

    def test_missingPort(self) -> None:
        """A vsock endpoint without a port is refused with a clear message."""
        self.assertRefused("vsock:cid=3", "needs a port")

    def test_portNotANumber(self) -> None:
        """A port that is not a number is refused."""
        self.assertRefused("vsock:http", "port must be a number")

    def test_portOutOfRange(self) -> None:
        """A port outside 0 to 4294967295 is refused."""
        self.assertRefused("vsock:4294967296", "between 0 and 4294967295")
        self.assertRefused("vsock:-1", "between 0 and 4294967295")

    def test_badCid(self) -> None:
        """A CID that is neither a number nor a known name is refused."""
        self.assertRefused("vsock:5005:cid=guest", "cid must be a number or one of ANY")

    def test_portTwice(self) -> None:
        """Giving the port both positionally and by name is refused."""
        self.assertRefused("vsock:5005:port=5006", "port given twice")

    def test_unknownOption(self) -> None:
        """An option vsock does not know, such as a TCP interface, is refused."""
        self.assertRefused("vsock:5005:interface=127.0.0.1", "unknown vsock endpoint option")

    def test_badPeers(self) -> None:
        """A `peers` value that is empty, malformed, mixes ANY with CIDs or holds an out-of-range
        CID is refused with a clear message."""
        expected = "peers must be ANY or a comma-separated list of CIDs"
        self.assertRefused("vsock:5005:peers=", expected)
        self.assertRefused("vsock:5005:peers=guest", expected)
        self.assertRefused("vsock:5005:peers=2,,1", expected)
        self.assertRefused("vsock:5005:peers=2;1", expected)
        self.assertRefused("vsock:5005:peers=ANY,2", "peers=ANY admits every peer")
        self.assertRefused("vsock:5005:peers=-1", "peer CID must be between 0 and 4294967294")
        self.assertRefused(
            "vsock:5005:peers=4294967295", "peer CID must be between 0 and 4294967294"
        )

    def test_endpointRefusesNoPeers(self) -> None:
        """An empty list would refuse everyone: a mistake, not a setting."""
        with self.assertRaises(ValueError) as caught:
            VSockServerEndpoint(MemoryReactor(), 5005, peers=[])
        self.assertIn("must name at least one CID", str(caught.exception))

    def test_badBacklog(self) -> None:
        """A backlog that is zero or not a number is refused."""
        self.assertRefused("vsock:5005:backlog=0", "backlog must be positive")
        self.assertRefused("vsock:5005:backlog=lots", "backlog must be a number")


class AddressTests(SynchronousTestCase):
    def test_providesIAddress(self) -> None:
        """A vsock address is a Twisted IAddress."""
        verifyObject(IAddress, VSockAddress(3, 5005))

    def test_valueSemantics(self) -> None:
        """Vsock addresses compare and hash by CID and port."""
        self.assertEqual(VSockAddress(3, 5005), VSockAddress(3, 5005))
        self.assertNotEqual(VSockAddress(3, 5005), VSockAddress(4, 5005))
        self.assertEqual(len({VSockAddress(3, 5005), VSockAddress(3, 5005)}), 1)

    def test_str(self) -> None:
        """A vsock address prints as `vsock:cid=CID:port=PORT`, with well-known CIDs by name."""
        self.assertEqual(str(VSockAddress(VMADDR_CID_ANY, 5005)), "vsock:cid=ANY:port=5005")
        self.assertEqual(str(VSockAddress(3, 1024)), "vsock:cid=3:port=1024")


@implementer(ILogObserver)
class _Recorder:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)


def _recordEvents(case: TestCase, namespace: str) -> list[LogEvent]:
    """Log events of ``namespace`` emitted until the end of ``case``."""
    recorder = _Recorder(namespace)
    globalLogPublisher.addObserver(recorder)
    case.addCleanup(globalLogPublisher.removeObserver, recorder)
    return recorder.events


def _recordVSockEvents(case: TestCase) -> list[LogEvent]:
    return _recordEvents(case, "pyro_reactor.system.vsock")


class _AddressRecorder(Protocol):
    """Reports what the transport says about both ends, then closes."""

    def __init__(self, built: list[object]) -> None:
        self.built = built

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.built.append(
            (type(self.transport), self.transport.getPeer(), self.transport.getHost())
        )
        self.transport.write(b"hello\n")
        self.transport.loseConnection()


class _RecordingFactory(Factory):
    def __init__(self) -> None:
        self.addresses: list[object] = []
        self.transports: list[object] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        self.addresses.append(addr)
        return _AddressRecorder(self.transports)


class _VSockCostume:
    """A real TCP socket that reports ``(cid, port)`` addresses as an AF_VSOCK one would.

    The listener is CID ANY in the guest; accepted connections are CID 3 (the guest) on the
    listening port, and their peer is CID ``peerCid`` (the host, unless a test says otherwise)
    on the client's TCP port.
    """

    def __init__(self, real: socket.socket, name: tuple[int, int]) -> None:
        self._real = real
        self._name = name
        self.peerCid = VMADDR_CID_HOST

    def getsockname(self) -> tuple[int, int]:
        return self._name

    def accept(self) -> tuple[_VSockCostume, tuple[int, int]]:
        connection, (_, clientPort) = self._real.accept()
        return _VSockCostume(connection, (3, self._name[1])), (self.peerCid, clientPort)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class AcceptTests(TestCase):
    """L{VSockPort} accepts connections and labels both ends with L{VSockAddress}es."""

    def listenInCostume(
        self, factory: Factory, peers: frozenset[int] | None = None
    ) -> tuple[VSockPort, int]:
        port, tcpPort, _ = self.listenInCostumeAs(factory, peers)
        return port, tcpPort

    def listenInCostumeAs(
        self, factory: Factory, peers: frozenset[int] | None = None
    ) -> tuple[VSockPort, int, _VSockCostume]:
        """A listening L{VSockPort} in costume, and the costume (to set the next peer's CID)."""
        real = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        real.bind(("127.0.0.1", 0))
        real.listen(50)
        real.setblocking(False)
        tcpPort = real.getsockname()[1]
        port = VSockPort(tcpPort, factory, cid=VMADDR_CID_ANY, reactor=reactor, peers=peers)
        costume = _VSockCostume(real, (VMADDR_CID_ANY, tcpPort))
        port.adoptSocket(costume)
        port.startListening()
        self.addCleanup(port.stopListening)
        return port, tcpPort, costume

    async def test_acceptedConnectionAddresses(self) -> None:
        """An accepted connection is served over a vsock transport whose peer and host are
        reported as vsock addresses, and the protocol's reply reaches the client."""
        factory = _RecordingFactory()
        port, tcpPort = self.listenInCostume(factory)
        self.assertEqual(port.getHost(), VSockAddress(VMADDR_CID_ANY, tcpPort))

        received: Deferred[tuple[bytes, int]] = deferToThread(self.connectAndRead, tcpPort)
        reply, clientPort = await received
        self.assertEqual(reply, b"hello\n")
        self.assertEqual(factory.addresses, [VSockAddress(VMADDR_CID_HOST, clientPort)])
        self.assertEqual(
            factory.transports,
            [(VSockServer, VSockAddress(VMADDR_CID_HOST, clientPort), VSockAddress(3, tcpPort))],
        )

    @staticmethod
    def connectAndRead(tcpPort: int) -> tuple[bytes, int]:
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as client:
            clientPort = client.getsockname()[1]
            chunks = []
            while chunk := client.recv(4096):
                chunks.append(chunk)
        return b"".join(chunks), clientPort

    @staticmethod
    def askAndRead(tcpPort: int) -> tuple[bytes, int]:
        """Send a ping and read until the agent closes; a reset counts as no answer."""
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as client:
            clientPort = client.getsockname()[1]
            chunks = []
            try:
                client.sendall(b'{"action": "ping"}\n')
                while chunk := client.recv(4096):
                    chunks.append(chunk)
            except (ConnectionResetError, BrokenPipeError):
                # Closing an accepted TCP socket with unread bytes resets the connection.
                pass
        return b"".join(chunks), clientPort

    async def test_allowedPeerIsServed(self) -> None:
        """With ``peers=HOST`` the host (CID 2) gets its answer and nothing is refused."""
        events = _recordVSockEvents(self)
        factory = buildFactory(makeContext(self))
        _, tcpPort = self.listenInCostume(factory, peers=frozenset({VMADDR_CID_HOST}))
        reply, _ = await deferToThread(self.askAndRead, tcpPort)
        self.assertEqual(json.loads(reply)["pong"], True)
        self.assertEqual(events, [])

    async def test_refusedPeerIsClosedUnanswered(self) -> None:
        """With ``peers=HOST`` a local peer (CID 1) is closed unread, and the refusal logged."""
        events = _recordVSockEvents(self)
        dispatched = _recordEvents(self, "pyro_reactor.wire.dispatch")
        factory = buildFactory(makeContext(self))
        _, tcpPort, costume = self.listenInCostumeAs(factory, frozenset({VMADDR_CID_HOST}))
        costume.peerCid = VMADDR_CID_LOCAL
        reply, clientPort = await deferToThread(self.askAndRead, tcpPort)
        self.assertEqual(reply, b"")
        self.assertEqual(dispatched, [])
        self.assertEqual(len(events), 1)
        event = events[0]
        self.assertEqual(
            {key: event.get(key) for key in ("peer_cid", "peer_port", "port", "outcome")},
            {
                "peer_cid": VMADDR_CID_LOCAL,
                "peer_port": clientPort,
                "port": tcpPort,
                "outcome": "refused",
            },
        )
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(
            formatEvent(event),
            f"refused a vsock connection from CID 1 on port {tcpPort}: only HOST may connect",
        )

    async def test_onlyListedPeersReachTheFactory(self) -> None:
        """On one port, refused and allowed peers alternate; the factory sees only the allowed."""
        factory = _RecordingFactory()
        allowed = frozenset({VMADDR_CID_HOST, 7})
        port, tcpPort, costume = self.listenInCostumeAs(factory, allowed)
        served = []
        for cid in (VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, 3, 7):
            costume.peerCid = cid
            reply, clientPort = await deferToThread(self.connectAndRead, tcpPort)
            self.assertEqual(reply, b"hello\n" if cid in allowed else b"", f"peer CID {cid}")
            if cid in allowed:
                served.append(VSockAddress(cid, clientPort))
        self.assertEqual(factory.addresses, served)
        self.assertEqual(port.peers, allowed)

    async def test_anyPeerByDefault(self) -> None:
        """Without peers every CID is served: the VM tier's in-guest checks come from CID 1."""
        events = _recordVSockEvents(self)
        factory = _RecordingFactory()
        _, tcpPort, costume = self.listenInCostumeAs(factory)
        costume.peerCid = VMADDR_CID_LOCAL
        reply, clientPort = await deferToThread(self.connectAndRead, tcpPort)
        self.assertEqual(reply, b"hello\n")
        self.assertEqual(factory.addresses, [VSockAddress(VMADDR_CID_LOCAL, clientPort)])
        self.assertEqual(events, [])

    async def test_peerCheckStartsAndStopsTheFactory(self) -> None:
        """The admission check stands between port and factory without hiding its lifecycle."""
        factory = _RecordingFactory()
        port, _ = self.listenInCostume(factory, peers=frozenset({VMADDR_CID_HOST}))
        self.assertEqual(factory.numPorts, 1)
        self.assertIn("_RecordingFactory", repr(port))
        self.assertIn("peers=HOST", repr(port))
        await port.stopListening()
        self.assertEqual(factory.numPorts, 0)

    async def test_agentAnswersOverVSockPort(self) -> None:
        """The whole agent (every capability's actions) serves a ping through a VSockPort."""
        factory = buildFactory(makeContext(self))
        port, tcpPort = self.listenInCostume(factory)
        self.assertIsInstance(port, VSockPort)
        answer = await call(tcpPort, {"action": "ping"})
        self.assertEqual(answer["pong"], True)


class ListenTests(TestCase):
    """Listening for real on AF_VSOCK, where the kernel allows it."""

    def setUp(self) -> None:
        reason = _vsockUnavailable()
        if reason is not None:
            raise self.skipTest(reason)

    async def listen(self, endpoint: VSockServerEndpoint) -> VSockPort:
        port = await endpoint.listen(_RecordingFactory())
        self.addCleanup(port.stopListening)
        assert isinstance(port, VSockPort)
        return port

    async def test_listensOnAFreePort(self) -> None:
        """Listening on port 0 gets a real vsock port chosen by the kernel, reported as a vsock
        address for any CID."""
        port = await self.listen(VSockServerEndpoint(reactor, 0))
        verifyObject(IListeningPort, port)
        self.assertEqual(port.socket.family, AF_VSOCK)
        host = port.getHost()
        self.assertIsInstance(host, VSockAddress)
        self.assertEqual(host.cid, VMADDR_CID_ANY)
        self.assertNotIn(host.port, (0, VMADDR_PORT_ANY))

    async def test_portInUse(self) -> None:
        """Listening on a port already in use fails with EADDRINUSE and a message naming the CID
        and port."""
        port = await self.listen(VSockServerEndpoint(reactor, 0))
        with self.assertRaises(CannotListenError) as caught:
            await self.listen(VSockServerEndpoint(reactor, port.getHost().port))
        self.assertEqual(caught.exception.socketError.errno, errno.EADDRINUSE)
        self.assertIn(f"vsock cid ANY:{port.getHost().port}", str(caught.exception))

    async def test_foreignCid(self) -> None:
        """A CID that is not this machine's cannot be bound; the error says which one."""
        with self.assertRaises(CannotListenError) as caught:
            await self.listen(VSockServerEndpoint(reactor, 0, cid=0x7FFFFFF0))
        self.assertEqual(caught.exception.socketError.errno, errno.EADDRNOTAVAIL)
        self.assertIn("vsock cid 2147483632", str(caught.exception))

    async def test_closesItsSocket(self) -> None:
        """A port that stops listening frees its socket, so the same port number can be listened
        on again."""
        port = await self.listen(VSockServerEndpoint(reactor, 0))
        number = port.getHost().port
        await port.stopListening()
        again = await self.listen(VSockServerEndpoint(reactor, number))
        self.assertEqual(again.getHost().port, number)

    async def test_serverFromString(self) -> None:
        """A `vsock:` string description works with Twisted's serverFromString."""
        port = await serverFromString(reactor, "vsock:0").listen(_RecordingFactory())
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port.getHost(), VSockAddress)


BAD_PEERS_ENDPOINT = "vsock:5005:peers=guest"


class TwistdPeersTests(TestCase):
    """``twistd pyro-agent --listen vsock:...:peers=...`` as a guest's unit would start it."""

    def test_badPeersStopStartUp(self) -> None:
        """A bad ``peers=`` value is reported and the agent does not start."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        result = subprocess.run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "pyro-agent", "--listen", BAD_PEERS_ENDPOINT],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=base,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            b"vsock peers must be ANY or a comma-separated list of CIDs",
            result.stdout + result.stderr,
        )

    def test_listensWithPeers(self) -> None:
        """The unit's endpoint with ``peers=HOST`` listens, and the log says so."""
        reason = _vsockUnavailable()
        if reason is not None:
            raise self.skipTest(reason)
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        log = base / "twistd.log"
        process = spawnTwistd(self, base, ["--listen", "vsock:0:peers=HOST"], log=log)
        giveUp = time.monotonic() + 30
        while "listening on" not in log.read_text() and process.poll() is None:
            if time.monotonic() > giveUp:
                self.fail(f"twistd did not listen within 30 s:\n{log.read_text()}")
            time.sleep(0.05)
        self.assertIn("listening on vsock:0:peers=HOST (vsock:cid=ANY:port=", log.read_text())


class LoopbackTests(TestCase):
    """A real request over AF_VSOCK to CID 1, when the host kernel has ``vsock_loopback``."""

    def setUp(self) -> None:
        reason = _vsockUnavailable()
        if reason is None and not Path("/sys/module/vsock_loopback").exists():
            reason = "no vsock loopback transport (kernel module vsock_loopback not loaded)"
        if reason is not None:
            raise self.skipTest(reason)

    async def test_pingOverVSock(self) -> None:
        """The agent answers `ping` over a real vsock connection."""
        factory = buildFactory(makeContext(self))
        port = await VSockServerEndpoint(reactor, 0).listen(factory)
        self.addCleanup(port.stopListening)
        host = port.getHost()
        assert isinstance(host, VSockAddress)
        number = host.port

        def ping() -> bytes:
            assert AF_VSOCK is not None
            with socket.socket(AF_VSOCK, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect((VMADDR_CID_LOCAL, number))
                client.sendall(b'{"action": "ping"}\n')
                chunks = []
                while chunk := client.recv(4096):
                    chunks.append(chunk)
            return b"".join(chunks)

        raw = await deferToThread(ping)
        self.assertEqual(json.loads(raw)["pong"], True)

    async def test_localPeerRefused(self) -> None:
        """With ``peers=HOST`` a connection over the loopback transport (CID 1) gets nothing."""
        factory = buildFactory(makeContext(self))
        port = await serverFromString(reactor, "vsock:0:peers=HOST").listen(factory)
        self.addCleanup(port.stopListening)
        host = port.getHost()
        assert isinstance(host, VSockAddress)
        number = host.port

        def ping() -> bytes:
            assert AF_VSOCK is not None
            with socket.socket(AF_VSOCK, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect((VMADDR_CID_LOCAL, number))
                chunks = []
                try:
                    client.sendall(b'{"action": "ping"}\n')
                    while chunk := client.recv(4096):
                        chunks.append(chunk)
                except (ConnectionResetError, BrokenPipeError):
                    pass
            return b"".join(chunks)

        self.assertEqual(await deferToThread(ping), b"")

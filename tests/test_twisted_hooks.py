"""Canaries for every private Twisted (and CPython) hook, agent and client side.

Each hook lives in ``pyro_reactor/system/_twisted.py`` or ``pyro_reactor/client/_twisted.py``;
each test here fails if a Twisted (or Python) upgrade takes the name away or changes what it
does. If one fails, revisit that module before widening the Twisted range in setup.cfg.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Any

from twisted.internet import base, endpoints, process, tcp
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.client._twisted import StreamClient, StreamConnector, connectWrapped
from pyro_reactor.system import _twisted as hooks
from pyro_reactor.system.processes import spawnInGroup
from pyro_reactor.system.vsock import VSockPort

reactor: Any = _reactor


class SpawnHookTests(TestCase):
    """L{hooks.SpawningProcess}: Twisted's ``Process`` spawn internals are still there."""

    def test_namesExist(self) -> None:
        """The overridden methods and the two helpers exist, so the fast path is taken."""
        self.assertTrue(hooks.SPAWN_HOOKS)
        self.assertTrue(callable(process._getFileActions))
        self.assertTrue(callable(process._listOpenFDs))
        parameters = list(inspect.signature(process.Process._trySpawnInsteadOfFork).parameters)
        self.assertEqual(
            parameters,
            ["self", "path", "uid", "gid", "executable", "args", "environment", "kwargs"],
        )
        self.assertTrue(callable(process.Process._setupChild))

    async def test_spawnedChildLeadsItsGroup(self) -> None:
        """A child spawned through the hook (posix_spawn, no fork) leads a new group."""
        ended: Deferred[None] = Deferred()
        output: list[bytes] = []

        from twisted.internet.protocol import ProcessProtocol

        class Collect(ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                output.append(data)

            def processEnded(self, reason: object) -> None:
                ended.callback(None)

        transport = spawnInGroup(
            reactor, Collect(), ["/bin/sh", "-c", "ps -o pgid= -p $$"], dict(os.environb)
        )
        self.assertIsInstance(transport, hooks.SpawningProcess)
        pid = transport.pid
        await ended
        self.assertEqual(int(b"".join(output)), pid)


class PortHookTests(TestCase):
    """L{hooks.PreboundPort}: ``tcp.Port`` adopts a socket and asks us for addresses."""

    def test_namesExist(self) -> None:
        """The attributes the port wraps exist on Twisted's TCP port."""
        self.assertTrue(hasattr(tcp.Port, "_preexistingSocket"))
        self.assertTrue(callable(getattr(tcp.Port, "_buildAddr", None)))
        self.assertTrue(hasattr(tcp.Port, "_realPortNumber"))
        self.assertEqual(tcp.Port._type, "TCP")
        self.assertEqual(VSockPort._type, "VSOCK")
        self.assertTrue(issubclass(VSockPort.transport, tcp.Server))
        parameters = list(inspect.signature(tcp.Server.__init__).parameters)
        self.assertEqual(
            parameters, ["self", "sock", "protocol", "client", "server", "sessionno", "reactor"]
        )

    async def test_preboundPortServes(self) -> None:
        """A port listens on the socket L{makeSocket} gave, and labels peers L{buildAddress}."""
        addresses: list[object] = []

        class Labelled(hooks.PreboundPort):
            portType = "LABELLED"

            def makeSocket(self) -> socket.socket:
                skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                skt.bind(("127.0.0.1", 0))
                skt.listen(5)
                skt.setblocking(False)
                return skt

            def buildAddress(self, address: Any) -> Any:
                return ("labelled", address[1])

        class Hello(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"hi")
                self.transport.loseConnection()

        class Record(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                addresses.append(addr)
                return Hello()

        port = Labelled(0, Record(), reactor=reactor)
        base.BasePort.__init__(port, reactor=reactor)
        port.factory = Record()
        port.backlog = 5
        port.startListening()
        self.addCleanup(port.stopListening)
        number = port.realPortNumber
        assert number is not None
        self.assertEqual(number, port.socket.getsockname()[1])

        def fetch() -> bytes:
            with socket.create_connection(("127.0.0.1", number)) as client:
                return client.recv(10)

        from twisted.internet.threads import deferToThread

        self.assertEqual(await deferToThread(fetch), b"hi")
        self.assertEqual(len(addresses), 1)
        self.assertEqual(addresses[0][0], "labelled")  # type: ignore[index]


class EnvironmentHookTests(SynchronousTestCase):
    """L{hooks.environmentBytes}: the interpreter's bytes mapping behind ``os.environ``."""

    def test_sameAsEnvironb(self) -> None:
        """The copy is the environment in bytes, and the private mapping is still there."""
        self.assertIsInstance(getattr(os.environ, "_data", None), dict)
        self.assertEqual(hooks.environmentBytes(), dict(os.environb))
        copy = hooks.environmentBytes()
        copy[b"PYRO_HOOK_TEST"] = b"x"
        self.assertNotIn("PYRO_HOOK_TEST", os.environ)


class ClientHookTests(TestCase):
    """The client's hooks (``pyro_reactor/client/_twisted.py``)."""

    def test_namesExist(self) -> None:
        """``_finishInit``, ``_requiresResolution``, ``_makeTransport``, ``_WrappingFactory``."""
        self.assertTrue(callable(tcp.BaseClient._finishInit))
        # BaseClient reads it (tcp.Client sets it per instance): resolution is skipped.
        self.assertIn("_requiresResolution", inspect.getsource(tcp.BaseClient.resolveAddress))
        self.assertFalse(StreamClient._requiresResolution)
        self.assertTrue(callable(base.BaseConnector._makeTransport))
        self.assertTrue(issubclass(StreamConnector, base.BaseConnector))
        wrapping = endpoints._WrappingFactory(Factory())
        self.assertIsInstance(wrapping._onConnection, Deferred)

    async def test_connectWrapped(self) -> None:
        """``connectWrapped`` fires with the connected protocol, as Twisted's endpoints do."""
        server = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        port = server.getHost().port

        protocol = await connectWrapped(
            Factory.forProtocol(Protocol),
            lambda wrapping: reactor.connectTCP("127.0.0.1", port, wrapping),
        )
        assert isinstance(protocol, Protocol)
        assert protocol.transport is not None
        protocol.transport.loseConnection()

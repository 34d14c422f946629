"""AF_VSOCK server support: an address, a listening port, a server endpoint and its parser.

Inside a Firecracker guest the host reaches the agent over vsock (``AF_VSOCK``), where an
address is a pair of 32-bit numbers ``(cid, port)`` rather than a host name and a port.
Twisted has no vsock transport and ``adoptStreamPort`` refuses the family, so this module
teaches Twisted's TCP port about it:

- L{VSockAddress} is the ``IAddress`` of either end of a vsock connection.
- L{VSockPort} is a ``twisted.internet.tcp.Port`` whose socket is an ``AF_VSOCK`` one bound to
  ``(cid, port)``. Streams on it behave exactly like TCP streams once accepted, so everything
  else (reading, writing, producers, closing) is Twisted's own code.
- L{VSockServerEndpoint} and L{VSockServerParser} make ``serverFromString(reactor,
  "vsock:5005")`` work; the parser instance is registered in
  ``twisted/plugins/pyro_reactor_plugins.py``.

Endpoint strings: ``vsock:PORT`` or ``vsock:port=PORT``, with optional ``cid=CID`` (a number
or ``ANY``, ``LOCAL``, ``HOST``, ``HYPERVISOR``; default ``ANY``), ``backlog=N`` (default 50)
and ``peers=CIDS`` (``ANY``, the default, or a comma-separated list of CIDs such as ``HOST`` or
``2,1``). Port ``0`` (or ``ANY``) asks the kernel for a free port, as ``tcp:0`` does: vsock's
own spelling of that is ``VMADDR_PORT_ANY`` (``0xFFFFFFFF``), which is also accepted.

``peers`` is the port's admission check: an accepted connection whose peer CID is not in the
list is closed at once, before any of its bytes is read and before the factory builds a
protocol for it, and a ``refused`` event is logged. The default admits every peer, as the
reference agent does and as the VM test tier needs (its in-guest checks connect over the
loopback transport, CID 1); production guests with no in-guest client should say
``peers=HOST`` (see ``docs/vsock.md`` and ``docs/security.md``).

The port leans on internals of ``tcp.Port`` (a socket adopted instead of created, the address
built for each accepted connection); they are wrapped by
L{pyro_reactor.system._twisted.PreboundPort}, with the agent's other private Twisted hooks, and
checked by ``tests/test_twisted_hooks.py``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any, cast

import attrs
from twisted.internet import tcp
from twisted.internet.base import BasePort
from twisted.internet.defer import Deferred, execute
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    ILoggingContext,
    IProtocolFactory,
    IReactorCore,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from pyro_reactor.system._twisted import PreboundPort

AF_VSOCK: socket.AddressFamily | None = getattr(socket, "AF_VSOCK", None)
"""The address family, or ``None`` on a platform without vsock (the module still imports)."""

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1  # Python 3.11's socket module lacks this constant.
VMADDR_CID_HOST = 2
VMADDR_PORT_ANY = 0xFFFFFFFF

_CID_NAMES = {
    "ANY": VMADDR_CID_ANY,
    "HYPERVISOR": VMADDR_CID_HYPERVISOR,
    "LOCAL": VMADDR_CID_LOCAL,
    "HOST": VMADDR_CID_HOST,
}
_MAX_U32 = 0xFFFFFFFF
_PEER_NAMES = {
    "HYPERVISOR": VMADDR_CID_HYPERVISOR,
    "LOCAL": VMADDR_CID_LOCAL,
    "HOST": VMADDR_CID_HOST,
}

log = Logger(namespace="pyro_reactor.system.vsock")


def cidName(cid: int) -> str:
    """``ANY``, ``LOCAL``, ``HOST``, ``HYPERVISOR`` for the well-known CIDs, else the number."""
    for name, value in _CID_NAMES.items():
        if value == cid:
            return name
    return str(cid)


def peersName(peers: Iterable[int] | None) -> str:
    """How a peer list is spelled in an endpoint string: ``ANY`` or e.g. ``LOCAL,HOST``."""
    if peers is None:
        return "ANY"
    return ",".join(cidName(cid) for cid in sorted(peers))


@implementer(IAddress)
@attrs.frozen
class VSockAddress:
    """One end of a vsock connection: a context id (the VM, or the host) and a port."""

    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock:cid={cidName(self.cid)}:port={self.port}"


class VSockServer(tcp.Server):
    """An accepted vsock connection: a TCP stream whose addresses are L{VSockAddress}es."""

    def getHost(self) -> VSockAddress:
        cid, port = self.socket.getsockname()
        return VSockAddress(cid, port)

    def getPeer(self) -> VSockAddress:
        cid, port = self.client
        return VSockAddress(cast(int, cid), cast(int, port))


def _listeningSocket(cid: int, port: int, backlog: int) -> socket.socket:
    """A non-blocking ``AF_VSOCK`` stream socket bound to ``(cid, port)`` and listening."""
    if AF_VSOCK is None:
        raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK is not supported on this platform")
    try:
        skt = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
    except OSError as error:
        if error.errno == errno.EAFNOSUPPORT:
            raise OSError(
                error.errno,
                "AF_VSOCK sockets are unavailable here (is the kernel's vsock transport loaded?)",
            ) from error
        raise
    try:
        skt.setblocking(False)
        skt.bind((cid, port))
        skt.listen(backlog)
    except OSError:
        skt.close()
        raise
    return skt


@implementer(IProtocolFactory, ILoggingContext)
class _AllowedPeers:
    """The factory a L{VSockPort} listens with when only some peer CIDs may connect.

    It refuses the others the way ``IProtocolFactory`` lets a factory refuse: ``buildProtocol``
    returns ``None`` and the port closes the accepted socket without reading from it. Everything
    else is the wrapped factory's.
    """

    def __init__(self, factory: IProtocolFactory, peers: frozenset[int], port: VSockPort) -> None:
        self.factory = factory
        self.peers = peers
        self.listeningPort = port

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self.factory):
            return cast(ILoggingContext, self.factory).logPrefix()
        return type(self.factory).__name__

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        # VSockPort.buildAddress makes every address a VSockAddress; anything else is refused.
        peer = addr if isinstance(addr, VSockAddress) else VSockAddress(VMADDR_CID_ANY, 0)
        if peer.cid not in self.peers:
            log.warn(
                "refused a vsock connection from CID {peer_cid} on port {port}:"
                " only {peers} may connect",
                peer_cid=peer.cid,
                peer_port=peer.port,
                port=self.listeningPort.listeningPortNumber(),
                peers=peersName(self.peers),
                outcome="refused",
            )
            return None
        return cast("Protocol | None", self.factory.buildProtocol(addr))


@implementer(IListeningPort)
class VSockPort(PreboundPort):
    """A Twisted TCP port that listens on an ``AF_VSOCK`` socket bound to ``(cid, port)``."""

    transport = VSockServer
    portType = "VSOCK"

    def __init__(
        self,
        port: int,
        factory: IProtocolFactory,
        backlog: int = 50,
        cid: int = VMADDR_CID_ANY,
        reactor: Any = None,
        *,
        peers: frozenset[int] | None = None,
    ) -> None:
        """
        @param peers: the peer CIDs whose connections are served, or C{None} for any peer.
        """
        # tcp.Port.__init__ would resolve an IP interface; only BasePort's part applies.
        BasePort.__init__(self, reactor=reactor)
        if AF_VSOCK is not None:
            self.addressFamily = AF_VSOCK
        self.port = port
        self.vsockPort = port
        self.cid = cid
        self.interface = cidName(cid)
        self.peers = peers
        self.servedFactory = factory
        # tcp.Port.doRead hands every accepted connection to self.factory.buildProtocol.
        listening = factory if peers is None else _AllowedPeers(factory, peers, self)
        self.factory = cast("Factory[Any]", listening)
        self.backlog = backlog

    def makeSocket(self) -> socket.socket:
        try:
            return _listeningSocket(self.cid, self.vsockPort, self.backlog)
        except OSError as error:
            raise CannotListenError(f"vsock cid {self.interface}", self.port, error) from error

    def buildAddress(self, address: tuple[int, int]) -> VSockAddress:
        return VSockAddress(*address)

    def getHost(self) -> VSockAddress:
        cid, port = self.socket.getsockname()
        return VSockAddress(cid, port)

    def listeningPortNumber(self) -> int:
        """The port number listened on (the kernel's choice for port ANY, once listening)."""
        number = self.realPortNumber
        return self.vsockPort if number is None else number

    def __repr__(self) -> str:
        number = self.realPortNumber
        state = "not listening" if number is None else str(number)
        name = type(self.servedFactory).__name__
        return f"<VSockPort of {name} on {self.interface}:{state} peers={peersName(self.peers)}>"


@implementer(IStreamServerEndpoint)
class VSockServerEndpoint:
    """Listens on vsock ``(cid, port)``; ``cid`` defaults to any of this machine's CIDs.

    ``peers``, when given, lists the peer CIDs allowed to connect (``{VMADDR_CID_HOST}`` for
    the host only); connections from any other CID are closed unread. ``None`` (the default)
    serves every peer.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        cid: int = VMADDR_CID_ANY,
        backlog: int = 50,
        peers: Iterable[int] | None = None,
    ) -> None:
        for name, value in (("port", port), ("cid", cid)):
            if not 0 <= value <= _MAX_U32:
                raise ValueError(f"vsock {name} must be between 0 and {_MAX_U32}, not {value}")
        if backlog < 1:
            raise ValueError(f"vsock backlog must be positive, not {backlog}")
        allowed = None if peers is None else frozenset(peers)
        if allowed is not None:
            if not allowed:
                raise ValueError("vsock peers must name at least one CID (or be ANY)")
            for peer in sorted(allowed):
                if not 0 <= peer < VMADDR_CID_ANY:
                    raise ValueError(
                        f"vsock peer CID must be between 0 and {VMADDR_CID_ANY - 1}, not {peer}"
                    )
        self.reactor = reactor
        self.port = VMADDR_PORT_ANY if port == 0 else port
        self.cid = cid
        self.backlog = backlog
        self.peers = allowed

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def start() -> IListeningPort:
            port = VSockPort(
                self.port, protocolFactory, self.backlog, self.cid, self.reactor, peers=self.peers
            )
            port.startListening()
            return port

        return execute(start)

    def __repr__(self) -> str:
        return (
            f"VSockServerEndpoint(port={self.port}, cid={cidName(self.cid)},"
            f" peers={peersName(self.peers)})"
        )


def _peers(text: str) -> frozenset[int] | None:
    """The CIDs of a ``peers=`` option: ``None`` for ``ANY``, else a non-empty set.

    Ranges are the endpoint's to check.
    """
    items = [item.strip() for item in text.split(",")]
    if any(item.upper() == "ANY" for item in items):
        if len(items) > 1:
            raise ValueError(f"vsock peers=ANY admits every peer: list CIDs or ANY, not {text!r}")
        return None
    peers = set()
    for item in items:
        peer = _PEER_NAMES.get(item.upper())
        if peer is None:
            try:
                peer = int(item, 10)
            except ValueError:
                raise ValueError(
                    "vsock peers must be ANY or a comma-separated list of CIDs"
                    f" (numbers or {', '.join(_PEER_NAMES)}), not {text!r}"
                ) from None
        peers.add(peer)
    return frozenset(peers)


def _number(kind: str, text: str, names: dict[str, int]) -> int:
    value = names.get(text.strip().upper())
    if value is not None:
        return value
    try:
        number = int(text, 10)
    except ValueError:
        choices = ", ".join(names)
        raise ValueError(
            f"vsock {kind} must be a number or one of {choices}, not {text!r}"
        ) from None
    if not 0 <= number <= _MAX_U32:
        raise ValueError(f"vsock {kind} must be between 0 and {_MAX_U32}, not {number}")
    return number


@implementer(IPlugin, IStreamServerEndpointStringParser)
class VSockServerParser:
    """Parses ``vsock:PORT[:cid=CID][:backlog=N][:peers=CIDS]`` (or ``port=PORT``)."""

    prefix = "vsock"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> VSockServerEndpoint:
        return self._parse(reactor, *map(str, args), **{k: str(v) for k, v in kwargs.items()})

    def _parse(self, reactor: IReactorCore, *args: str, **kwargs: str) -> VSockServerEndpoint:
        unknown = sorted(set(kwargs) - {"port", "cid", "backlog", "peers"})
        if unknown:
            raise ValueError(
                f"unknown vsock endpoint option(s): {', '.join(unknown)}"
                " (known: port, cid, backlog, peers)"
            )
        if len(args) > 1:
            raise ValueError(f"vsock endpoint takes one positional port, got {list(args)}")
        if args and "port" in kwargs:
            raise ValueError("vsock port given twice")
        portText = args[0] if args else kwargs.get("port")
        if portText is None or portText == "":
            raise ValueError("vsock endpoint needs a port: vsock:PORT or vsock:port=PORT")
        port = _number("port", portText, {"ANY": VMADDR_PORT_ANY})
        cid = _number("cid", kwargs.get("cid", "ANY"), _CID_NAMES)
        backlogText = kwargs.get("backlog", "50")
        try:
            backlog = int(backlogText, 10)
        except ValueError:
            raise ValueError(f"vsock backlog must be a number, not {backlogText!r}") from None
        peers = _peers(kwargs.get("peers", "ANY"))
        return VSockServerEndpoint(reactor, port, cid=cid, backlog=backlog, peers=peers)

"""Client endpoints to reach a guest agent: Firecracker's hybrid vsock, and AF_VSOCK.

``fcvsock:path=/path/to/v.sock:port=5005`` (or ``fcvsock:/path/to/v.sock:5005``)
    Firecracker exposes a guest's vsock device on the host as a UNIX socket. A host connects
    to it, writes ``CONNECT <port>\\n`` and reads ``OK <assigned port>\\n``; from then on the
    stream is the guest's. Anything else (another line, a close) means no connection, and the
    error says what the socket answered. Option ``timeout=SECONDS`` bounds connecting and the
    handshake (default 30).

``vsock:cid=3:port=5005`` (or ``vsock:3:5005``)
    An ``AF_VSOCK`` stream to a guest's context id, for hosts with ``vhost-vsock`` (QEMU,
    Cloud Hypervisor) and for a guest talking to itself (``cid=1``). Option ``timeout``.

Both are ``IStreamClientEndpointStringParserWithReactor`` plugins (instances in
``twisted/plugins/pyro_reactor_plugins.py``), so ``clientFromString(reactor, "fcvsock:...")``
works anywhere, next to Twisted's own ``tcp:`` and ``unix:``. The server side's ``vsock``
parser is a different interface (``IStreamServerEndpointStringParser``); both live together.

The AF_VSOCK transport reuses Twisted's TCP client (``tcp.BaseClient``) with the socket's family
changed and no name resolution, through the hooks of ``pyro_reactor/client/_twisted.py``.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.internet.protocol import Factory
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.client._twisted import StreamClient, StreamConnector, connectWrapped
from pyro_reactor.client.errors import MessageConnectError
from pyro_reactor.client.handshake import LineHandshake
from pyro_reactor.system.vsock import AF_VSOCK, VSockAddress, cidName

_MAX_U32 = 0xFFFFFFFF
_OK_LINE = re.compile(rb"OK (\d+)")
_MAX_HANDSHAKE_LINE = 512


class VSockConnectError(MessageConnectError):
    """The Firecracker vsock socket could not be reached or did not accept ``CONNECT``."""


# -- Firecracker hybrid vsock ------------------------------------------------------------


class _HandshakeProtocol(LineHandshake):
    """Says ``CONNECT <port>``, waits for ``OK``, then hands the stream to the real protocol."""

    maxLine = _MAX_HANDSHAKE_LINE

    def __init__(self, endpoint: FirecrackerVSockClientEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        self.endpoint = endpoint
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"CONNECT %d\n" % self.endpoint.port)
        self._timer = self.endpoint.reactor.callLater(self.endpoint.timeout, self._timedOut)

    def _accepted(self, line: bytes) -> bool:
        if _OK_LINE.fullmatch(line.rstrip(b"\r")) is None:
            self._abandon(self._refused(f"answered {line.decode('utf-8', 'replace')!r}"))
            return False
        return True

    def _tooLong(self) -> Exception:
        return self._refused(f"answered {self._buffer[:80]!r}... (no line end)")

    def _closedEarly(self) -> Exception:
        said = f" after {self._buffer[:80]!r}" if self._buffer else ""
        return VSockConnectError(
            f"{self.endpoint.path}: the vsock socket closed the connection{said} without"
            f" answering CONNECT {self.endpoint.port} (is the guest listening on vsock"
            f" port {self.endpoint.port}?)"
        )

    def _refused(self, said: str) -> VSockConnectError:
        return VSockConnectError(
            f"{self.endpoint.path}: the vsock socket {said} to CONNECT {self.endpoint.port}, not OK"
        )

    def _timedOut(self) -> None:
        self._timer = None
        self._abandon(
            VSockConnectError(
                f"{self.endpoint.path}: no answer to CONNECT {self.endpoint.port} within"
                f" {self.endpoint.timeout} s"
            )
        )

    def _cancel(self, ready: Deferred[IProtocol]) -> None:
        self._settled()
        if self.transport is not None:
            self.transport.loseConnection()

    def _settled(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _HandshakeFactory(Factory):
    noisy = False

    def __init__(self, endpoint: FirecrackerVSockClientEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.wrappedFactory = factory
        self.handshake: _HandshakeProtocol | None = None

    def buildProtocol(self, addr: IAddress | None) -> _HandshakeProtocol:
        self.handshake = _HandshakeProtocol(self.endpoint, self.wrappedFactory)
        return self.handshake

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()


@implementer(IStreamClientEndpoint)
class FirecrackerVSockClientEndpoint:
    """Connects to a guest's vsock port through Firecracker's UNIX socket (hybrid vsock)."""

    def __init__(self, reactor: Any, path: str, port: int, timeout: float = 30.0) -> None:
        if not 0 <= port <= _MAX_U32:
            raise ValueError(f"vsock port must be between 0 and {_MAX_U32}, not {port}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.reactor = reactor
        self.path = path
        self.port = port
        self.timeout = timeout
        self._unix = UNIXClientEndpoint(reactor, path, timeout=max(1, round(timeout)))

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = _HandshakeFactory(self, protocolFactory)
        connecting: Deferred[IProtocol] = self._unix.connect(factory)

        def connected(_: IProtocol) -> Deferred[IProtocol]:
            assert factory.handshake is not None
            return factory.handshake.ready

        def failed(reason: Failure) -> Failure:
            if reason.check(error.ConnectError) and not reason.check(
                VSockConnectError, error.ConnectingCancelledError
            ):
                value = reason.value
                assert value is not None
                detail = value.args[0] if value.args and value.args[0] else str(value)
                raise VSockConnectError(
                    f"{self.path}: cannot connect to the vsock socket: {detail}"
                )
            return reason

        return connecting.addCallback(connected).addErrback(failed)

    def __repr__(self) -> str:
        return f"FirecrackerVSockClientEndpoint(path={self.path!r}, port={self.port})"


# -- AF_VSOCK --------------------------------------------------------------------------------


class VSockClient(StreamClient):
    """An outgoing ``AF_VSOCK`` stream: Twisted's TCP client with vsock addresses."""

    socketType = socket.SOCK_STREAM

    def __init__(self, cid: int, port: int, connector: VSockConnector, reactor: Any) -> None:
        self.connector = connector
        self.addr = (cid, port)
        if AF_VSOCK is not None:
            self.addressFamily = AF_VSOCK
        whenDone: Any = self.resolveAddress
        err = None
        skt = None
        try:
            if AF_VSOCK is None:
                raise OSError(0, "AF_VSOCK is not supported on this platform")
            skt = self.createInternetSocket()
        except OSError as se:
            err = error.ConnectBindError(se.args[0], se.args[1])
            whenDone = None
        self.finishInit(whenDone, skt, err, reactor)

    def getHost(self) -> VSockAddress:
        cid, port = self.socket.getsockname()
        return VSockAddress(cid, port)

    def getPeer(self) -> VSockAddress:
        cid, port = self.addr
        return VSockAddress(cid, port)


class VSockConnector(StreamConnector):
    """Drives one L{VSockClient} connection attempt (with the connect timeout)."""

    def __init__(
        self, cid: int, port: int, factory: Any, timeout: float, reactor: Any = None
    ) -> None:
        self.cid = cid
        self.port = port
        StreamConnector.__init__(self, factory, timeout, reactor)

    def makeTransport(self) -> VSockClient:
        return VSockClient(self.cid, self.port, self, self.reactor)

    def getDestination(self) -> VSockAddress:
        return VSockAddress(self.cid, self.port)


@implementer(IStreamClientEndpoint)
class VSockClientEndpoint:
    """Connects to ``(cid, port)`` over ``AF_VSOCK``."""

    def __init__(self, reactor: Any, cid: int, port: int, timeout: float = 30.0) -> None:
        for name, value in (("cid", cid), ("port", port)):
            if not 0 <= value <= _MAX_U32:
                raise ValueError(f"vsock {name} must be between 0 and {_MAX_U32}, not {value}")
        self.reactor = reactor
        self.cid = cid
        self.port = port
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def connect(wrapping: IProtocolFactory) -> None:
            VSockConnector(self.cid, self.port, wrapping, self.timeout, self.reactor).connect()

        return connectWrapped(protocolFactory, connect)

    def __repr__(self) -> str:
        return f"VSockClientEndpoint(cid={cidName(self.cid)}, port={self.port})"


# -- string parsers ------------------------------------------------------------------------


def _number(kind: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"vsock {kind} must be a number, not {text!r}") from None
    if not 0 <= value <= _MAX_U32:
        raise ValueError(f"vsock {kind} must be between 0 and {_MAX_U32}, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"timeout must be a number of seconds, not {text!r}") from None
    if value <= 0:
        raise ValueError(f"timeout must be positive, not {text}")
    return value


def _fields(
    prefix: str, names: tuple[str, str], args: tuple[object, ...], kwargs: dict[str, object]
) -> dict[str, str]:
    unknown = sorted(set(kwargs) - {*names, "timeout"})
    if unknown:
        raise ValueError(
            f"unknown {prefix} endpoint option(s): {', '.join(unknown)}"
            f" (known: {', '.join(names)}, timeout)"
        )
    if len(args) > len(names):
        raise ValueError(f"{prefix} endpoint takes at most {len(names)} positional values")
    fields = {k: str(v) for k, v in kwargs.items()}
    for name, value in zip(names, args, strict=False):
        if name in fields:
            raise ValueError(f"{prefix} endpoint: {name} given twice")
        fields[name] = str(value)
    for name in names:
        if fields.get(name, "") == "":
            raise ValueError(
                f"{prefix} endpoint needs {name}= (e.g. {prefix}:{names[0]}=...:{names[1]}=...)"
            )
    return fields


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class FirecrackerVSockClientParser:
    """``fcvsock:path=PATH:port=PORT[:timeout=S]`` -> L{FirecrackerVSockClientEndpoint}."""

    prefix = "fcvsock"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> FirecrackerVSockClientEndpoint:
        fields = _fields(self.prefix, ("path", "port"), args, kwargs)
        timeout = _seconds(fields["timeout"]) if "timeout" in fields else 30.0
        return FirecrackerVSockClientEndpoint(
            reactor, fields["path"], _number("port", fields["port"]), timeout
        )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class VSockClientParser:
    """``vsock:cid=CID:port=PORT[:timeout=S]`` -> L{VSockClientEndpoint}."""

    prefix = "vsock"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> VSockClientEndpoint:
        fields = _fields(self.prefix, ("cid", "port"), args, kwargs)
        timeout = _seconds(fields["timeout"]) if "timeout" in fields else 30.0
        return VSockClientEndpoint(
            reactor, _number("cid", fields["cid"]), _number("port", fields["port"]), timeout
        )

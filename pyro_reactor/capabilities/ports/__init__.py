"""TCP into the guest: the ``connect_tcp`` relay and ``list_ports`` (ping feature ``"tcp"``).

``connect_tcp`` connects to a guest TCP port itself (loopback only, unless the agent runs with
``--relay-hosts any``), answers ``{"connected": true, "host": H, "port": P}`` once connected
(an ``{"error"}`` naming the address otherwise), and then relays raw bytes both ways on the
same connection (L{HandOff}); see L{pyro_reactor.capabilities.ports.relay} for the relay and
L{pyro_reactor.capabilities.ports._machine} for its lifecycle. ``list_ports`` reports the
guest's listening sockets (L{pyro_reactor.capabilities.ports.listing}).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Action, HandOff
from pyro_reactor.wire.request import Request

if TYPE_CHECKING:
    from pyro_reactor.capabilities.ports.relay import Relay

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
"""The guest addresses ``connect_tcp`` reaches by default."""

RELAY_HOSTS_CHOICES = ("loopback", "any")


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: object) -> Any:
        return self.relay.guest


class PortsCapability:
    """``connect_tcp`` and ``list_ports``."""

    features = ("tcp",)
    service = None

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.anyHost = context.config.relayHosts == "any"
        self._ids = itertools.count(1)
        self.actions = [
            Action("connect_tcp", self.connectTCP),
            Action("list_ports", self.listPorts),
        ]

    def listPorts(self, request: Request) -> Deferred[dict[str, Any]]:
        from pyro_reactor.capabilities.ports.listing import listPorts  # noqa: PLC0415

        return self.context.inThread(listPorts)

    def _endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        reactor = self.context.reactor
        if host == "localhost":
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
        import ipaddress  # noqa: PLC0415 (only a relay needs it)

        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
        if address.version == 6:
            return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)

    def connectTCP(self, request: Request) -> Deferred[HandOff]:
        port = request.integer("port", 0)
        if not 1 <= port <= 65535:
            raise ActionError(f"port must be between 1 and 65535, not {port}")
        host = request.string("host", "127.0.0.1").strip()
        if not host or "\x00" in host:
            raise ActionError("host must be a guest address or name")
        timeout = request.integer("timeout_seconds", 10)
        if timeout <= 0:
            raise ActionError("timeout_seconds must be positive")
        where = _display(host, port)
        if not self.anyHost and host not in LOOPBACK_HOSTS:
            raise ActionError(
                f"connecting to {where} is not allowed: the agent relays only to loopback"
                " addresses (127.0.0.1, ::1, localhost) unless it runs with --relay-hosts any"
            )
        from pyro_reactor.capabilities.ports.relay import Relay  # noqa: PLC0415 (first relay)

        relay = Relay(f"{next(self._ids)} to {where}")
        try:
            endpoint = self._endpoint(host, port, timeout)
        except (ValueError, UnicodeError) as reason:
            raise ActionError(f"cannot connect to {where}: {reason}") from None

        def connected(_: object) -> HandOff:
            return HandOff({"connected": True, "host": host, "port": port}, relay.host)

        def failed(reason: Failure) -> Failure:
            relay.machine.guestFailed()
            if reason.check(error.ConnectionRefusedError):
                raise ActionError(f"connection to {where} refused")
            if reason.check(error.TimeoutError):
                raise ActionError(f"connection to {where} timed out after {timeout} s")
            if reason.check(error.DNSLookupError):
                raise ActionError(f"cannot connect to {where}: no such host")
            value = reason.value
            args = getattr(value, "args", ())
            detail = (args[0] if args else None) or str(value)
            raise ActionError(f"cannot connect to {where}: {detail}")

        connecting: Deferred[Any] = endpoint.connect(_OneProtocol(relay))
        return connecting.addCallbacks(connected, failed)

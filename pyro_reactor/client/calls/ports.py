"""The port calls: TCP connections into the guest, and its listening ports."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint

from pyro_reactor.client.calls.base import CallBase, _items


class PortCalls(CallBase):
    """``connect_tcp`` (as an endpoint) and ``list_ports``."""

    def connectTCP(
        self, port: int, host: str | None = None, timeout: int | None = None
    ) -> IStreamClientEndpoint:
        """An endpoint reaching guest TCP ``port`` (on ``host``, default the guest's
        127.0.0.1) through the agent: each ``connect`` is one ``connect_tcp`` relay."""
        from pyro_reactor.client.tcp import GuestTCPEndpoint  # noqa: PLC0415 (on demand)

        return GuestTCPEndpoint(self.endpoint, port, host, timeout)

    def listPorts(self) -> Deferred[list[dict[str, Any]]]:
        """The guest's listening TCP sockets (``port``, ``host``, ``family``, ``pid``,
        ``command``)."""
        return self._simple({"action": "list_ports"}, lambda answer: _items(answer, "ports"))

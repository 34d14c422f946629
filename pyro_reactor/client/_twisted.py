"""The host side's private hooks into Twisted, in one module.

The ``vsock:`` client endpoint reuses Twisted's TCP client with another address family and
no name resolution. That leans on names Twisted does not promise to keep:
``tcp.BaseClient._finishInit`` and ``_requiresResolution``, ``base.BaseConnector._makeTransport``
and ``endpoints._WrappingFactory`` (with its ``_onConnection`` Deferred). They are wrapped
here under public names; ``tests/test_twisted_hooks.py`` keeps a canary test on each, and the
Twisted range is pinned in setup.cfg. (The agent's own hooks are in
``pyro_reactor/system/_twisted.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import base, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import IProtocol, IProtocolFactory


class StreamClient(tcp.BaseClient):
    """Twisted's TCP client transport for an address that needs no name resolution."""

    _requiresResolution = False

    def finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        """Complete the construction: connect C{skt} (C{whenDone}), or report C{error}."""
        self._finishInit(whenDone, skt, error, reactor)


class StreamConnector(base.BaseConnector):
    """Twisted's connector (connect timeout, factory calls) around L{makeTransport}."""

    def makeTransport(self) -> Any:
        """The transport of one connection attempt."""
        raise NotImplementedError

    def _makeTransport(self) -> Any:
        return self.makeTransport()


def connectWrapped(
    protocolFactory: IProtocolFactory, connect: Callable[[IProtocolFactory], object]
) -> Deferred[IProtocol]:
    """Connect as Twisted's own endpoints do: C{connect} is given a factory wrapping
    C{protocolFactory}; the result fires with the protocol once connected (or fails)."""
    wrapping = _WrappingFactory(protocolFactory)
    connect(wrapping)
    connected: Deferred[IProtocol] = wrapping._onConnection
    return connected


__all__ = ["StreamClient", "StreamConnector", "connectWrapped"]

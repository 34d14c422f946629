"""Endpoint string parser plugins that load their endpoint code on first use.

``twistd`` imports every plugin module holding a service maker at each start, the agent's
included, so ``twisted/plugins/pyro_reactor_plugins.py`` must stay cheap: it holds instances of
these small classes, which only know their prefix. The first ``parseStreamServer`` or
``parseStreamClient`` call imports the real parser (``pyro_reactor.system.vsock`` for the ``vsock:``
server endpoint, ``pyro_reactor.client.endpoints`` for the host's ``fcvsock:`` and ``vsock:``
client endpoints) and hands the arguments over unchanged, so every error message is the real
parser's.

This module imports nothing that ``twistd`` has not already imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from twisted.internet.interfaces import (
    IReactorCore,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


class _Deferred:
    """Names a parser class by module and attribute, and builds it on first use."""

    def __init__(self, prefix: str, module: str, name: str) -> None:
        self.prefix = prefix
        self._module = module
        self._name = name
        self._parser: Any = None

    def _real(self) -> Any:
        if self._parser is None:
            self._parser = getattr(importlib.import_module(self._module), self._name)()
        return self._parser

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.prefix}: -> {self._module}.{self._name}>"


@implementer(IPlugin, IStreamServerEndpointStringParser)
class LazyServerParser(_Deferred):
    """A server endpoint parser plugin standing for ``module.name`` until first used."""

    def parseStreamServer(self, reactor: IReactorCore, *args: object, **kwargs: object) -> Any:
        return self._real().parseStreamServer(reactor, *args, **kwargs)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class LazyClientParser(_Deferred):
    """A client endpoint parser plugin standing for ``module.name`` until first used."""

    def parseStreamClient(self, reactor: IReactorCore, *args: object, **kwargs: object) -> Any:
        return self._real().parseStreamClient(reactor, *args, **kwargs)

"""The host side of pyro-reactor: a client for the guest agent's protocol.

- L{AgentClient} (``api.py``): asynchronous, one method per action, typed results; its calls
  are in ``calls/``, one module per area.
- L{BlockingClient} (``blocking.py``): the same calls for scripts, without a reactor in sight.
- ``endpoints.py``: ``fcvsock:`` (Firecracker's hybrid vsock) and ``vsock:`` client endpoints.
- ``cli.py``: the ``pyro-agent-client`` command; its commands are in ``commands/``, one module
  per area.

Every failure is an L{AgentError}; see ``errors.py`` for its kinds.

The names below are loaded on first use: the twistd plugin module imports
``pyro_reactor.client.endpoints`` in every agent, which should not pay for the whole client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyro_reactor.client.api import (
        AgentClient,
        commandReadiness,
        fileReadiness,
        httpReadiness,
        tcpReadiness,
    )
    from pyro_reactor.client.blocking import BlockingClient
    from pyro_reactor.client.errors import (
        AgentClosedError,
        AgentError,
        AgentProtocolError,
        AgentTimeoutError,
        AgentUnavailableError,
    )
    from pyro_reactor.client.results import (
        ArchiveResult,
        DeleteResult,
        DownloadResult,
        ExecResult,
        ExportResult,
        FileContent,
        Listing,
        PingResult,
        ServiceInfo,
        ServiceLogs,
        ShellInfo,
        ShellOutput,
        WorkspaceEntry,
        WriteResult,
    )

_HOMES = {
    "AgentClient": "api",
    "commandReadiness": "api",
    "fileReadiness": "api",
    "httpReadiness": "api",
    "tcpReadiness": "api",
    "BlockingClient": "blocking",
    "AgentClosedError": "errors",
    "AgentError": "errors",
    "AgentProtocolError": "errors",
    "AgentTimeoutError": "errors",
    "AgentUnavailableError": "errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name, "results" if name in __all__ else None)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AgentClient",
    "AgentClosedError",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeoutError",
    "AgentUnavailableError",
    "ArchiveResult",
    "BlockingClient",
    "DeleteResult",
    "DownloadResult",
    "ExecResult",
    "ExportResult",
    "FileContent",
    "Listing",
    "PingResult",
    "ServiceInfo",
    "ServiceLogs",
    "ShellInfo",
    "ShellOutput",
    "WorkspaceEntry",
    "WriteResult",
    "commandReadiness",
    "fileReadiness",
    "httpReadiness",
    "tcpReadiness",
]

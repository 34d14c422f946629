"""The archive actions: ``extract_archive``, ``install_secrets``, ``export_archive``.

The wire has already spooled an upload to a file under the state directory when a handler
here runs, and it streams an export's temporary file back with backpressure; the work (in
L{extract}, L{secrets}, L{export}) always runs in a worker thread (``context.inThread``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.capabilities.archives.export import buildExport
from pyro_reactor.capabilities.archives.extract import extractArchive, recoverExtracts
from pyro_reactor.capabilities.archives.progress import Transfer
from pyro_reactor.capabilities.archives.secrets import installSecrets, recoverSecrets
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Action, StreamedAnswer
from pyro_reactor.wire.request import Request


class ArchivesCapability:
    """The three archive actions, working in the context's workspace and state directory.

    Building it is the agent's start-up for archives: what an interrupted install or
    extraction left is recovered (the newest complete secret set, an extraction rolled back
    or forward), then the secrets root is readied (created 0700).
    """

    features: tuple[str, ...] = ()
    service = None

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self._config = config = context.config
        self._workspace = context.workspace
        config.secretRoot.parent.mkdir(parents=True, exist_ok=True)
        recoverSecrets(config.secretRoot)
        config.secretRoot.mkdir(parents=True, exist_ok=True)
        os.chmod(config.secretRoot, 0o700)
        recoverExtracts(context.workspace)
        self.actions = [
            Action("extract_archive", self._extract, upload=True),
            Action("install_secrets", self._install, upload=True),
            Action("export_archive", self._export),
        ]

    def _transferred(self, name: str, work: Callable[[Transfer], Any]) -> Deferred[Any]:
        transfer = Transfer.begin(name, self._context.reactor)
        result: Deferred[Any] = self._context.inThread(work, transfer)
        return result.addBoth(transfer.end)

    def _extract(self, request: Request) -> Deferred[dict[str, Any]]:
        workspace = self._workspace
        destination = workspace.resolve(request.string("destination", "/workspace"))
        upload = _upload(request)
        limit = self._config.maxArchiveMembers
        return self._transferred(
            "extract_archive",
            lambda transfer: extractArchive(
                workspace, upload, destination, transfer, maxMembers=limit
            ),
        )

    def _install(self, request: Request) -> Deferred[dict[str, Any]]:
        upload = _upload(request)
        root = self._config.secretRoot
        limit = self._config.maxArchiveMembers
        return self._transferred(
            "install_secrets",
            lambda transfer: installSecrets(root, upload, transfer, maxMembers=limit, consume=True),
        )

    def _export(self, request: Request) -> Deferred[StreamedAnswer]:
        workspace = self._workspace
        path = workspace.resolve(request.string("path", "/workspace"))
        spool = self._config.spoolRoot
        return self._transferred(
            "export_archive", lambda transfer: buildExport(workspace, path, spool, transfer)
        )


def _upload(request: Request) -> Path:
    if request.upload is None:
        raise ActionError("archive_size bytes were expected after the request line")
    return request.upload


__all__ = ["ArchivesCapability"]

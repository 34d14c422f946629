"""The workspace calls: files, archives (upload, download, secrets) and watches."""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.client.archives import (
    UnsafeArchiveError,
    buildSecretsArchive,
    buildUploadArchive,
    extractSafely,
)
from pyro_reactor.client.calls.base import CallBase, _describe
from pyro_reactor.client.errors import AgentError, AgentTimeoutError, AgentUnavailableError
from pyro_reactor.client.protocol import Progress
from pyro_reactor.client.results import (
    ArchiveResult,
    DeleteResult,
    DownloadResult,
    ExportResult,
    FileContent,
    Listing,
    WriteResult,
)
from pyro_reactor.client.watching import WorkspaceWatch


class FileCalls(CallBase):
    """Workspace files (``list_workspace`` ...), archive transfers, ``watch_workspace``."""

    # -- workspace files ------------------------------------------------------------------

    def listWorkspace(self, path: str = "/workspace", recursive: bool = False) -> Deferred[Listing]:
        fields = {"action": "list_workspace", "path": path, "recursive": recursive}
        return self._simple(fields, Listing.fromAnswer)

    def readWorkspaceFile(self, path: str, maxBytes: int | None = None) -> Deferred[FileContent]:
        """A file's bytes (at most 1 MiB; ``maxBytes`` lowers the limit)."""
        fields: dict[str, Any] = {"action": "read_workspace_file", "path": path}
        if maxBytes is not None:
            fields["max_bytes"] = maxBytes
        return self._simple(fields, FileContent.fromAnswer)

    def writeWorkspaceFile(self, path: str, text: str) -> Deferred[WriteResult]:
        """Replace a file with ``text`` (UTF-8, at most 1 MiB), atomically."""
        fields = {"action": "write_workspace_file", "path": path, "text": text}
        return self._simple(fields, WriteResult.fromAnswer)

    def deleteWorkspacePath(self, path: str) -> Deferred[DeleteResult]:
        """Delete a file or a symlink (not a directory)."""
        fields = {"action": "delete_workspace_path", "path": path}
        return self._simple(fields, DeleteResult.fromAnswer)

    # -- archives -------------------------------------------------------------------------

    def extractArchive(
        self,
        archive: Path,
        destination: str = "/workspace",
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> Deferred[ArchiveResult]:
        """Stream the tar file ``archive`` to the agent, which unpacks it into ``destination``."""
        return Deferred.fromCoroutine(
            self._uploadArchive(
                {"action": "extract_archive", "destination": destination},
                archive,
                progress,
                timeout,
            )
        )

    def installSecrets(
        self, archive: Path, timeout: float | None = None
    ) -> Deferred[ArchiveResult]:
        """Replace the guest's secrets with the contents of the tar file ``archive``."""
        return Deferred.fromCoroutine(
            self._uploadArchive({"action": "install_secrets"}, archive, None, timeout)
        )

    def installSecretValues(
        self, values: Mapping[str, str | bytes], timeout: float | None = None
    ) -> Deferred[ArchiveResult]:
        """Replace the guest's secrets with one file per ``name: value``."""

        async def install() -> ArchiveResult:
            archive = await self._inThread(buildSecretsArchive, dict(values), self.spoolDirectory)
            with self._transient(archive):
                return await self._uploadArchive(
                    {"action": "install_secrets"}, archive, None, timeout
                )

        return Deferred.fromCoroutine(install())

    async def _uploadArchive(
        self,
        fields: dict[str, Any],
        archive: Path,
        progress: Progress | None,
        timeout: float | None,
    ) -> ArchiveResult:
        fields = {**fields, "archive_size": archive.stat().st_size}
        answer = await self._exchange(
            fields,
            upload=archive,
            progress=progress,
            timeout=self.transferTimeout if timeout is None else timeout,
        )
        return ArchiveResult.fromAnswer(answer)

    def upload(
        self,
        local: Path,
        destination: str = "/workspace",
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> Deferred[ArchiveResult]:
        """Put a local file, or the contents of a local directory, into ``destination``.

        The tar is built in a worker thread into a temporary file (in ``spoolDirectory``),
        streamed to the agent, and removed.
        """

        async def send() -> ArchiveResult:
            try:
                archive, _ = await self._inThread(buildUploadArchive, local, self.spoolDirectory)
            except (OSError, UnsafeArchiveError) as reason:
                raise AgentError(
                    f"cannot upload {local}: {_describe(reason)}", "extract_archive"
                ) from reason
            with self._transient(archive):
                return await self._uploadArchive(
                    {"action": "extract_archive", "destination": destination},
                    archive,
                    progress,
                    timeout,
                )

        return Deferred.fromCoroutine(send())

    def exportArchive(
        self,
        path: str,
        target: Path,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> Deferred[ExportResult]:
        """Write a tar of the guest's ``path`` (a file, link, or a directory's contents) to
        ``target``; ``target`` is removed again if the export fails."""

        async def receive() -> ExportResult:
            with self._transient(target, keep=True):
                answer = await self._exchange(
                    {"action": "export_archive", "path": path},
                    export=target,
                    progress=progress,
                    timeout=self.transferTimeout if timeout is None else timeout,
                )
            return ExportResult.fromAnswer(answer, target)

        return Deferred.fromCoroutine(receive())

    def download(
        self,
        path: str,
        localDirectory: Path,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> Deferred[DownloadResult]:
        """Write the guest's file (or directory contents) at ``path`` into ``localDirectory``.

        The export is spooled to a temporary file, then unpacked in a worker thread; a member
        that would land outside ``localDirectory`` makes the whole download fail with nothing
        written.
        """

        async def fetch() -> DownloadResult:
            fd, name = tempfile.mkstemp(
                prefix="pyro-export-", suffix=".tar", dir=self.spoolDirectory
            )
            os.close(fd)
            spool = Path(name)
            with self._transient(spool):
                export = await self.exportArchive(path, spool, progress, timeout)
                try:
                    written = await self._inThread(extractSafely, spool, localDirectory)
                except (OSError, UnsafeArchiveError, tarfile.TarError) as reason:
                    raise AgentError(
                        f"cannot unpack {path} into {localDirectory}: {_describe(reason)}",
                        "export_archive",
                    ) from reason
                return DownloadResult(
                    ExportResult.fromAnswer(export.raw, None), localDirectory, tuple(written)
                )

        return Deferred.fromCoroutine(fetch())

    # -- workspace watches ----------------------------------------------------------------

    def watchWorkspace(
        self,
        onEvent: Callable[[dict[str, Any]], None],
        path: str = "/workspace",
        recursive: bool = True,
    ) -> Deferred[WorkspaceWatch]:
        """Watch a workspace directory: fires once every watch is in place, then calls
        ``onEvent`` with each event until the stream ends (``WorkspaceWatch.ended``)."""
        from pyro_reactor.client.watching import WatchFactory, WatchProtocol  # noqa: PLC0415

        request = {"action": "watch_workspace", "path": path, "recursive": recursive}
        protocol = WatchProtocol(request, onEvent)

        async def start() -> WorkspaceWatch:
            try:
                await self._bounded(
                    self.endpoint.connect(WatchFactory(protocol)),
                    self.connectTimeout,
                    lambda: AgentTimeoutError(
                        f"could not connect to {self.where} within {self.connectTimeout:g} s",
                        "watch_workspace",
                    ),
                )
            except AgentError:
                raise
            except Exception as reason:
                raise AgentUnavailableError(
                    f"could not connect to {self.where}: {_describe(reason)}", "watch_workspace"
                ) from reason
            return await protocol.started

        return Deferred.fromCoroutine(start())

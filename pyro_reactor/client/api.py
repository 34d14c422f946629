"""The asynchronous client: one method per action of the guest agent, each a ``Deferred``.

Usage::

    client = AgentClient(reactor, "fcvsock:path=/srv/vm1/v.sock:port=5005")
    await client.waitUntilReady(timeout=60)
    result = await client.execute("uname -a")
    print(result.exitCode, result.stdout)

Each call opens its own connection (the protocol is one request per connection), so calls may
run concurrently. Every call has a timeout for connecting and one for the whole call; every
failure is an L{AgentError} (the agent's own message when it answered ``{"error": ...}``).
Uploads stream from a file and exports stream to a file; nothing holds an archive in memory.
"""

from __future__ import annotations

import base64
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.client.archives import (
    UnsafeArchiveError,
    buildSecretsArchive,
    buildUploadArchive,
    extractSafely,
)
from pyro_reactor.client.endpoints import VSockConnectError
from pyro_reactor.client.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from pyro_reactor.client.jobs import JobAttachment
from pyro_reactor.client.protocol import (
    DEFAULT_MAX_ANSWER_BYTES,
    ExchangeFactory,
    ExchangeProtocol,
    Progress,
    encodeRequest,
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
    WriteResult,
)
from pyro_reactor.client.watching import WorkspaceWatch

log = Logger(namespace="pyro_reactor.client")

_T = TypeVar("_T")
_R = TypeVar("_R")


def fileReadiness(path: str) -> dict[str, Any]:
    """A service is ready once this workspace path exists."""
    return {"type": "file", "path": path}


def tcpReadiness(address: str) -> dict[str, Any]:
    """A service is ready once ``host:port`` accepts a connection."""
    return {"type": "tcp", "address": address}


def httpReadiness(url: str) -> dict[str, Any]:
    """A service is ready once ``url`` answers 2xx or 3xx."""
    return {"type": "http", "url": url}


def commandReadiness(command: str) -> dict[str, Any]:
    """A service is ready once ``command`` exits 0."""
    return {"type": "command", "command": command}


class AgentClient:
    """Talks to one guest agent through one endpoint.

    ``endpoint`` is an endpoint string (``fcvsock:path=...:port=5005``, ``vsock:cid=3:port=5005``,
    ``tcp:host=127.0.0.1:port=5005``, ``unix:path=...``) or an ``IStreamClientEndpoint``.
    ``timeout`` bounds each ordinary call (calls that wait on purpose: an exec, a service
    start, a ``read_shell`` with ``waitMs``, get their own wait added); ``connectTimeout``
    bounds connecting; ``transferTimeout`` bounds an upload or an export.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        timeout: float = 30.0,
        connectTimeout: float = 10.0,
        transferTimeout: float = 3600.0,
        maxAnswerBytes: int = DEFAULT_MAX_ANSWER_BYTES,
        spoolDirectory: Path | None = None,
    ) -> None:
        self.reactor = reactor
        if isinstance(endpoint, str):
            self.where = endpoint
            self.endpoint: IStreamClientEndpoint = clientFromString(reactor, endpoint)
        else:
            self.where = repr(endpoint)
            self.endpoint = endpoint
        self.timeout = timeout
        self.connectTimeout = connectTimeout
        self.transferTimeout = transferTimeout
        self.maxAnswerBytes = maxAnswerBytes
        self.spoolDirectory = spoolDirectory

    # -- the exchange ----------------------------------------------------------------------

    def call(
        self,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        raiseOnError: bool = True,
    ) -> Deferred[dict[str, Any]]:
        """Send one request; the answer as a ``dict`` (an ``error`` answer raises)."""
        return Deferred.fromCoroutine(
            self._exchange(fields, timeout=timeout, raiseOnError=raiseOnError)
        )

    async def _exchange(
        self,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        upload: Path | None = None,
        export: Path | None = None,
        progress: Progress | None = None,
        raiseOnError: bool = True,
    ) -> dict[str, Any]:
        action = str(fields.get("action", "exec"))
        budget = self.timeout if timeout is None else timeout
        started = self.reactor.seconds()
        uploadHandle = upload.open("rb") if upload is not None else None
        exportHandle = export.open("wb") if export is not None else None
        try:
            uploadSize = os.fstat(uploadHandle.fileno()).st_size if uploadHandle else 0
            protocol = ExchangeProtocol(
                encodeRequest(fields),
                upload=uploadHandle,
                uploadSize=uploadSize,
                export=exportHandle,
                progress=progress,
                maxAnswerBytes=self.maxAnswerBytes,
            )
            connectFor = min(self.connectTimeout, budget)
            try:
                await self._bounded(
                    self.endpoint.connect(ExchangeFactory(protocol)),
                    connectFor,
                    lambda: AgentTimeoutError(
                        f"could not connect to {self.where} within {connectFor:g} s", action
                    ),
                )
            except AgentError:
                raise
            except ierror.TimeoutError as reason:
                raise AgentTimeoutError(
                    f"could not connect to {self.where}: {reason}", action
                ) from reason
            except Exception as reason:
                raise AgentUnavailableError(
                    f"could not connect to {self.where}: {_describe(reason)}", action
                ) from reason
            remaining = max(budget - (self.reactor.seconds() - started), 0.001)
            try:
                answer = await self._bounded(
                    protocol.answered,
                    remaining,
                    lambda: AgentTimeoutError(
                        f"no answer to {action} from {self.where} within {budget:g} s", action
                    ),
                )
            except AgentError as reason:
                if reason.action is None:
                    reason.action = action
                raise
        finally:
            if uploadHandle is not None:
                uploadHandle.close()
            if exportHandle is not None:
                exportHandle.close()
        if raiseOnError and "error" in answer:
            raise AgentError(str(answer["error"]), action)
        return answer

    async def _bounded(
        self, waiting: Deferred[_T], seconds: float, timedOut: Callable[[], AgentError]
    ) -> _T:
        fired: list[bool] = []

        def expire() -> None:
            fired.append(True)
            waiting.cancel()

        timer: IDelayedCall = self.reactor.callLater(seconds, expire)
        try:
            return await waiting
        except (CancelledError, ierror.ConnectingCancelledError) as reason:
            if fired:
                raise timedOut() from reason
            raise
        except Exception as reason:
            if fired:
                raise timedOut() from reason
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _simple(
        self,
        fields: dict[str, Any],
        parse: Callable[[dict[str, Any]], _R],
        timeout: float | None = None,
    ) -> Deferred[_R]:
        return self.call(fields, timeout=timeout).addCallback(parse)

    @contextmanager
    def _transient(self, path: Path, keep: bool = False) -> Iterator[None]:
        """``path`` is removed when the block fails (or, unless ``keep``, ends), and also if
        the reactor shuts down meanwhile (Ctrl-C in the CLI): no half-written file stays."""
        trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", path.unlink, missing_ok=True
        )
        try:
            yield
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        else:
            if not keep:
                path.unlink(missing_ok=True)
        finally:
            self.reactor.removeSystemEventTrigger(trigger)

    def _inThread(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    # -- ping and readiness ----------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> Deferred[PingResult]:
        """Who answers, its version, and the actions it serves."""
        return self._simple({"action": "ping"}, PingResult.fromAnswer, timeout)

    def waitUntilReady(
        self,
        timeout: float = 60.0,
        initialDelay: float = 0.05,
        maxDelay: float = 1.0,
        attemptTimeout: float | None = None,
    ) -> Deferred[PingResult]:
        """Ping with backoff until the agent answers (what a host does after booting a VM).

        Refused connections, missing sockets, a refused ``CONNECT``, connections closed
        without an answer (a forwarder that accepts before the guest listens) and timeouts
        are retried until ``timeout`` seconds have passed; then L{AgentTimeoutError} says why
        the last attempt failed. Any answer, even an error answer, means the agent is up.
        """
        return Deferred.fromCoroutine(
            self._waitUntilReady(timeout, initialDelay, maxDelay, attemptTimeout)
        )

    async def _waitUntilReady(
        self, timeout: float, initialDelay: float, maxDelay: float, attemptTimeout: float | None
    ) -> PingResult:
        deadline = self.reactor.seconds() + timeout
        delay = initialDelay
        attempts = 0
        normal = attemptTimeout or self.timeout
        last: AgentError | None = None
        while True:
            attempts += 1
            left = deadline - self.reactor.seconds()
            perAttempt = min(normal, max(left, 0.001))
            try:
                answer = await self.call({"action": "ping"}, timeout=perAttempt, raiseOnError=False)
            except (AgentUnavailableError, AgentTimeoutError, AgentProtocolError) as reason:
                # An attempt cut short by the overall deadline says less than the one before.
                cutShort = isinstance(reason, AgentTimeoutError) and perAttempt < normal
                if last is None or not cutShort:
                    last = reason
            else:
                log.debug("agent ready after {attempts} attempt(s)", attempts=attempts)
                return PingResult.fromAnswer(answer)
            left = deadline - self.reactor.seconds()
            if left <= 0:
                raise AgentTimeoutError(
                    f"the agent at {self.where} did not answer within {timeout:g} s"
                    f" ({attempts} attempts; last: {last.message if last else 'no attempt'})",
                    "ping",
                ) from last
            await deferLater(self.reactor, min(delay, left), lambda: None)
            delay = min(delay * 2, maxDelay)

    # -- exec -------------------------------------------------------------------------------

    def execute(
        self,
        command: str,
        timeoutSeconds: int = 30,
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ExecResult]:
        """Run ``/bin/sh -lc command`` in the guest (``exec``)."""
        fields: dict[str, Any] = {
            "action": "exec",
            "command": command,
            "timeout_seconds": timeoutSeconds,
        }
        if env is not None:
            fields["env"] = dict(env)
        return self._simple(fields, ExecResult.fromAnswer, timeoutSeconds + self.timeout)

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

    # -- shells ---------------------------------------------------------------------------

    def openShell(
        self,
        shellId: str,
        *,
        cwd: str = "/workspace",
        cols: int = 120,
        rows: int = 30,
        env: Mapping[str, str] | None = None,
        redactValues: Sequence[str] | None = None,
    ) -> Deferred[ShellInfo]:
        fields: dict[str, Any] = {
            "action": "open_shell",
            "shell_id": shellId,
            "cwd": cwd,
            "cols": cols,
            "rows": rows,
        }
        if env is not None:
            fields["env"] = dict(env)
        if redactValues is not None:
            fields["redact_values"] = list(redactValues)
        return self._simple(fields, ShellInfo.fromAnswer)

    def readShell(
        self,
        shellId: str,
        cursor: int = 0,
        maxChars: int = 65536,
        waitMs: int | None = None,
    ) -> Deferred[ShellOutput]:
        """Output from ``cursor``; with ``waitMs``, the agent waits up to that long for some."""
        fields: dict[str, Any] = {
            "action": "read_shell",
            "shell_id": shellId,
            "cursor": cursor,
            "max_chars": maxChars,
        }
        timeout = None
        if waitMs is not None:
            fields["wait_ms"] = waitMs
            timeout = waitMs / 1000 + self.timeout
        return self._simple(fields, ShellOutput.fromAnswer, timeout)

    def writeShell(
        self, shellId: str, input: str, appendNewline: bool = True
    ) -> Deferred[ShellInfo]:
        fields = {
            "action": "write_shell",
            "shell_id": shellId,
            "input": input,
            "append_newline": appendNewline,
        }
        return self._simple(fields, ShellInfo.fromAnswer)

    def signalShell(self, shellId: str, signal: str = "INT") -> Deferred[ShellInfo]:
        """Send ``HUP``, ``INT``, ``TERM`` or ``KILL``."""
        fields = {"action": "signal_shell", "shell_id": shellId, "signal": signal}
        return self._simple(fields, ShellInfo.fromAnswer)

    def resizeShell(self, shellId: str, cols: int, rows: int) -> Deferred[ShellInfo]:
        fields = {"action": "resize_shell", "shell_id": shellId, "cols": cols, "rows": rows}
        return self._simple(fields, ShellInfo.fromAnswer)

    def closeShell(self, shellId: str) -> Deferred[ShellInfo]:
        fields = {"action": "close_shell", "shell_id": shellId}
        return self._simple(fields, ShellInfo.fromAnswer, 10 + self.timeout)

    def listShells(self) -> Deferred[list[ShellInfo]]:
        return self._simple(
            {"action": "list_shells"},
            lambda answer: [ShellInfo.fromAnswer(s) for s in _items(answer, "shells")],
        )

    # -- services ---------------------------------------------------------------------------

    def startService(
        self,
        serviceName: str,
        command: str,
        *,
        cwd: str = "/workspace",
        readiness: Mapping[str, Any] | None = None,
        readyTimeoutSeconds: int = 30,
        readyIntervalMs: int = 500,
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ServiceInfo]:
        """Start a service; answers once it is ready or has failed (see ``*Readiness``)."""
        fields: dict[str, Any] = {
            "action": "start_service",
            "service_name": serviceName,
            "command": command,
            "cwd": cwd,
            "ready_timeout_seconds": readyTimeoutSeconds,
            "ready_interval_ms": readyIntervalMs,
        }
        if readiness is not None:
            fields["readiness"] = dict(readiness)
        if env is not None:
            fields["env"] = dict(env)
        return self._simple(fields, ServiceInfo.fromAnswer, readyTimeoutSeconds + 10 + self.timeout)

    def statusService(self, serviceName: str) -> Deferred[ServiceInfo]:
        fields = {"action": "status_service", "service_name": serviceName}
        return self._simple(fields, ServiceInfo.fromAnswer)

    def logsService(self, serviceName: str, tailLines: int | None = None) -> Deferred[ServiceLogs]:
        fields: dict[str, Any] = {"action": "logs_service", "service_name": serviceName}
        if tailLines is not None:
            fields["tail_lines"] = tailLines
        return self._simple(fields, ServiceLogs.fromAnswer)

    def stopService(self, serviceName: str) -> Deferred[ServiceInfo]:
        """TERM the service's group, KILL it after a grace; answers its final record."""
        fields = {"action": "stop_service", "service_name": serviceName}
        return self._simple(fields, ServiceInfo.fromAnswer, 15 + self.timeout)

    def listServices(self) -> Deferred[list[ServiceInfo]]:
        return self._simple(
            {"action": "list_services"},
            lambda answer: [ServiceInfo.fromAnswer(s) for s in _items(answer, "services")],
        )

    # -- TCP into the guest and workspace watches ----------------------------------------

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

    # -- snapshots and stats -----------------------------------------------------------------

    def restored(
        self,
        unixTime: float | None = None,
        entropy: bytes | None = None,
        generation: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Tell a guest just restored from a snapshot: the host's clock, fresh entropy.

        ``unixTime`` defaults to this host's clock at the moment of the call and ``entropy`` to
        64 bytes of ``os.urandom``; the answer is the agent's, as docs/actions/snapshots.md
        describes it (``clock_error``/``entropy_error`` say what it could not do).
        """
        fields: dict[str, Any] = {
            "action": "restored",
            "unix_time": time.time() if unixTime is None else unixTime,
            "entropy": base64.b64encode(os.urandom(64) if entropy is None else entropy).decode(),
        }
        if generation is not None:
            fields["generation"] = generation
        return self._simple(fields, dict)

    def quiesce(
        self,
        freeze: Sequence[str] = (),
        freezeJobs: bool = False,
        timeoutSeconds: float = 30.0,
    ) -> Deferred[dict[str, Any]]:
        """Sync, and freeze the given guest mount points (and jobs) before a snapshot."""
        fields: dict[str, Any] = {
            "action": "quiesce",
            "freeze": list(freeze),
            "freeze_jobs": freezeJobs,
            "timeout_seconds": timeoutSeconds,
        }
        return self._simple(fields, dict, 30 + self.timeout)

    def thaw(self) -> Deferred[dict[str, Any]]:
        """Undo ``quiesce`` (nothing frozen is not an error)."""
        return self._simple({"action": "thaw"}, dict)

    def stats(self) -> Deferred[dict[str, Any]]:
        """Memory, CPU, pressure, disks and the agent's own figures."""
        return self._simple({"action": "stats"}, dict)

    # -- jobs -------------------------------------------------------------------------------

    def startJob(
        self,
        command: str | None = None,
        *,
        argv: Sequence[str] | None = None,
        cwd: str = "/workspace",
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
        timeoutSeconds: float | None = None,
        jobId: str | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Start a job (a shell ``command`` or an ``argv``); its ``job_id``, ``pid``, ...

        To start and follow it on one connection, use L{attachJob} with ``start=...``.
        """
        return self.call(_jobFields(command, argv, cwd, env, stdin, timeoutSeconds, jobId, limits))

    def attachJob(
        self,
        jobId: str | None = None,
        *,
        stdoutOffset: int = 0,
        stderrOffset: int = 0,
        encoding: str = "text",
        onEvent: Callable[[dict[str, Any]], None] | None = None,
        start: Mapping[str, Any] | None = None,
    ) -> Deferred[JobAttachment]:
        """Follow a job's output (or, with ``start``: ``startJob``'s keyword arguments, start
        one and follow it); fires with the open L{JobAttachment} once the agent answered."""
        if start is not None:
            options = dict(start)
            fields = _jobFields(
                options.pop("command", None),
                options.pop("argv", None),
                options.pop("cwd", "/workspace"),
                options.pop("env", None),
                options.pop("stdin", False),
                options.pop("timeoutSeconds", None),
                options.pop("jobId", jobId),
                options.pop("limits", None),
            )
            if options:
                raise TypeError(f"unknown startJob options: {sorted(options)}")
            fields["attach"] = True
            fields["encoding"] = encoding
        else:
            fields = {
                "action": "attach_job",
                "job_id": jobId,
                "stdout_offset": stdoutOffset,
                "stderr_offset": stderrOffset,
                "encoding": encoding,
            }
        attachment = JobAttachment(fields, onEvent)
        action = str(fields["action"])

        async def connect() -> JobAttachment:
            try:
                await self._bounded(
                    self.endpoint.connect(_OneProtocolFactory(attachment)),
                    self.connectTimeout,
                    lambda: AgentTimeoutError(f"could not connect to {self.where}", action),
                )
            except AgentError:
                raise
            except Exception as reason:
                raise AgentUnavailableError(
                    f"could not connect to {self.where}: {_describe(reason)}", action
                ) from reason
            return await self._bounded(
                attachment.headerReceived,
                self.timeout,
                lambda: AgentTimeoutError(f"no answer to {action} from {self.where}", action),
            )

        return Deferred.fromCoroutine(connect())

    def readJob(
        self,
        jobId: str,
        stdoutOffset: int = 0,
        stderrOffset: int = 0,
        *,
        maxBytes: int | None = None,
        waitMs: int = 0,
        encoding: str = "text",
    ) -> Deferred[dict[str, Any]]:
        """Output from the given offsets (waiting up to ``waitMs`` for some); then ``exit``."""
        fields: dict[str, Any] = {
            "action": "read_job",
            "job_id": jobId,
            "stdout_offset": stdoutOffset,
            "stderr_offset": stderrOffset,
            "wait_ms": waitMs,
            "encoding": encoding,
        }
        if maxBytes is not None:
            fields["max_bytes"] = maxBytes
        return self.call(fields, timeout=waitMs / 1000 + self.timeout)

    def writeJob(
        self, jobId: str, data: bytes | str = b"", closeStdin: bool = False
    ) -> Deferred[dict[str, Any]]:
        fields: dict[str, Any] = {"action": "write_job", "job_id": jobId, "close_stdin": closeStdin}
        if isinstance(data, str):
            fields["data"] = data
        elif data:
            fields["data_base64"] = base64.b64encode(data).decode("ascii")
        return self.call(fields)

    def signalJob(self, jobId: str, signal: str = "TERM") -> Deferred[dict[str, Any]]:
        return self.call({"action": "signal_job", "job_id": jobId, "signal": signal})

    def statusJob(self, jobId: str) -> Deferred[dict[str, Any]]:
        return self.call({"action": "status_job", "job_id": jobId})

    def listJobs(self) -> Deferred[list[dict[str, Any]]]:
        return self.call({"action": "list_jobs"}).addCallback(lambda a: _items(a, "jobs"))

    def removeJob(self, jobId: str, force: bool = False) -> Deferred[dict[str, Any]]:
        return self.call({"action": "remove_job", "job_id": jobId, "force": force})


def _jobFields(  # noqa: PLR0917 - startJob's fields, in its order
    command: str | None,
    argv: Sequence[str] | None,
    cwd: str,
    env: Mapping[str, str] | None,
    stdin: bool,
    timeoutSeconds: float | None,
    jobId: str | None,
    limits: Mapping[str, Any] | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"action": "start_job", "cwd": cwd, "stdin": stdin}
    if command is not None:
        fields["command"] = command
    if argv is not None:
        fields["argv"] = list(argv)
    if env is not None:
        fields["env"] = dict(env)
    if timeoutSeconds is not None:
        fields["timeout_seconds"] = timeoutSeconds
    if jobId is not None:
        fields["job_id"] = jobId
    if limits is not None:
        fields["limits"] = dict(limits)
    return fields


class _OneProtocolFactory(Factory):
    """Connects one given protocol (an attach stream)."""

    def __init__(self, protocol: JobAttachment) -> None:
        self.attachment = protocol

    def buildProtocol(self, addr: object) -> JobAttachment:
        return self.attachment


def _items(answer: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = answer.get(key)
    if not isinstance(items, list):
        raise AgentProtocolError(f"the agent's answer has no {key!r} list")
    return [item for item in items if isinstance(item, dict)]


def _describe(reason: BaseException) -> str:
    if isinstance(reason, ierror.ConnectError) and not isinstance(reason, VSockConnectError):
        # Twisted's str() of these reads "An error occurred while connecting: 19: ...".
        kind = str(getattr(reason, "MESSAGE", "") or type(reason).__name__).rstrip(".")
        detail = reason.osError
        if isinstance(detail, Failure):
            detail = detail.getErrorMessage()
        elif isinstance(detail, int):
            detail = None
        first = reason.args[0] if reason.args else ""
        if isinstance(first, Failure):
            first = first.getErrorMessage()
        text = str(first or "") or (str(detail) if detail else "")
        return f"{kind}: {text}" if text else kind
    if isinstance(reason, OSError) and reason.strerror:
        where = f": {reason.filename}" if reason.filename else ""
        return f"{reason.strerror}{where}"
    return str(reason) or type(reason).__name__

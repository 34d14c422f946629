"""The job calls: start, attach (one connection that follows a job), read, write, signal."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory

from pyro_reactor.client.calls.base import CallBase, _describe, _items
from pyro_reactor.client.errors import AgentError, AgentTimeoutError, AgentUnavailableError
from pyro_reactor.client.jobs import JobAttachment


class JobCalls(CallBase):
    """``start_job`` ... ``remove_job``; ``attach_job`` as an open L{JobAttachment}."""

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

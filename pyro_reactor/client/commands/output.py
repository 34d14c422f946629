"""How commands print: binary output on text streams, one-line summaries of jobs,
services and shells."""

from __future__ import annotations

import shlex
from typing import Any, TextIO

from pyro_reactor.client.results import ServiceInfo, ShellInfo


def _binary(stream: TextIO) -> Any:
    stream.flush()
    return getattr(stream, "buffer", None) or _TextAsBinary(stream)


class _TextAsBinary:
    """A text stream (a test's StringIO) written to as bytes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        self.stream.flush()


def _jobLine(job: dict[str, Any]) -> str:
    what = job.get("command") or shlex.join(job.get("argv") or [])
    if job.get("state") == "exited":
        how = (
            f"exit {job['exit_code']}"
            if job.get("exit_code") is not None
            else f"signal {job.get('signal')}"
        )
    else:
        how = f"running, pid {job.get('pid')}"
    return f"{job.get('job_id')}: {how}: {what}"


def _serviceLine(info: ServiceInfo) -> str:
    detail = f"pid {info.pid}" if info.state == "running" else f"exit code {info.exitCode}"
    reason = f", {info.stopReason}" if info.stopReason else ""
    return f"{info.serviceName}: {info.state} ({detail}{reason})"


def _shellLine(shell: ShellInfo) -> str:
    ended = "" if shell.running else f", exit code {shell.exitCode}"
    return f"{shell.shellId}: {shell.state} ({shell.cols}x{shell.rows}, {shell.cwd}{ended})"

"""Typed results of the client's calls, one frozen dataclass per kind of answer.

Each is built from the agent's answer with ``fromAnswer``; the answer itself stays available as
``raw`` (an agent newer than this client may add fields). Field names are the protocol's, in
the project's camelCase; values keep the protocol's units (``durationMs``, ``startedAt`` as a
UNIX time).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


def _get(answer: dict[str, Any], name: str, kind: type[_T], default: _T) -> _T:
    value = answer.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    return value if isinstance(value, kind) else default


def _optional(answer: dict[str, Any], name: str, kind: type[_T]) -> _T | None:
    value = answer.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    return value if isinstance(value, kind) else None


@dataclass(frozen=True)
class PingResult:
    """``ping``: who answers, and which actions it serves."""

    agent: str
    version: str
    actions: tuple[str, ...]
    uptimeSeconds: float
    pid: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> PingResult:
        actions = answer.get("actions")
        return cls(
            agent=_get(answer, "agent", str, ""),
            version=_get(answer, "version", str, ""),
            actions=tuple(a for a in actions if isinstance(a, str))
            if isinstance(actions, list)
            else (),
            uptimeSeconds=_get(answer, "uptime_seconds", float, 0.0),
            pid=_optional(answer, "pid", int),
            raw=answer,
        )

    def supports(self, action: str) -> bool:
        return action in self.actions


@dataclass(frozen=True)
class ExecResult:
    """``exec``: the command's output and exit code (124 when the agent timed it out)."""

    stdout: str
    stderr: str
    exitCode: int
    durationMs: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ExecResult:
        return cls(
            stdout=_get(answer, "stdout", str, ""),
            stderr=_get(answer, "stderr", str, ""),
            exitCode=_get(answer, "exit_code", int, -1),
            durationMs=_get(answer, "duration_ms", int, 0),
            raw=answer,
        )


@dataclass(frozen=True)
class WorkspaceEntry:
    """One entry of a listing: ``artifactType`` is ``file``, ``directory`` or ``symlink``."""

    path: str
    artifactType: str
    sizeBytes: int
    linkTarget: str | None

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> WorkspaceEntry:
        return cls(
            path=_get(answer, "path", str, ""),
            artifactType=_get(answer, "artifact_type", str, ""),
            sizeBytes=_get(answer, "size_bytes", int, 0),
            linkTarget=_optional(answer, "link_target", str),
        )


@dataclass(frozen=True)
class Listing:
    """``list_workspace``: a directory's entries (or the one entry of a file or link)."""

    path: str
    artifactType: str
    entries: tuple[WorkspaceEntry, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> Listing:
        entries = answer.get("entries")
        return cls(
            path=_get(answer, "path", str, ""),
            artifactType=_get(answer, "artifact_type", str, ""),
            entries=tuple(
                WorkspaceEntry.fromAnswer(e) for e in entries or () if isinstance(e, dict)
            ),
            raw=answer,
        )


@dataclass(frozen=True)
class FileContent:
    """``read_workspace_file``: the file's bytes (decoded from the answer's base64)."""

    path: str
    sizeBytes: int
    content: bytes
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> FileContent:
        encoded = _get(answer, "content_b64", str, "")
        return cls(
            path=_get(answer, "path", str, ""),
            sizeBytes=_get(answer, "size_bytes", int, 0),
            content=base64.b64decode(encoded),
            raw=answer,
        )

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class WriteResult:
    """``write_workspace_file``."""

    path: str
    sizeBytes: int
    bytesWritten: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> WriteResult:
        return cls(
            path=_get(answer, "path", str, ""),
            sizeBytes=_get(answer, "size_bytes", int, 0),
            bytesWritten=_get(answer, "bytes_written", int, 0),
            raw=answer,
        )


@dataclass(frozen=True)
class DeleteResult:
    """``delete_workspace_path``."""

    path: str
    deleted: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> DeleteResult:
        return cls(
            path=_get(answer, "path", str, ""),
            deleted=_get(answer, "deleted", bool, False),
            raw=answer,
        )


@dataclass(frozen=True)
class ArchiveResult:
    """``extract_archive`` and ``install_secrets``: where, how many entries, how many bytes."""

    destination: str
    entryCount: int
    bytesWritten: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ArchiveResult:
        return cls(
            destination=_get(answer, "destination", str, ""),
            entryCount=_get(answer, "entry_count", int, 0),
            bytesWritten=_get(answer, "bytes_written", int, 0),
            raw=answer,
        )


@dataclass(frozen=True)
class ExportResult:
    """``export_archive``: the header, and where the tar bytes were written on this host."""

    workspacePath: str
    artifactType: str
    archiveSize: int
    entryCount: int
    bytesWritten: int
    archive: Path | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any], archive: Path | None = None) -> ExportResult:
        return cls(
            workspacePath=_get(answer, "workspace_path", str, ""),
            artifactType=_get(answer, "artifact_type", str, ""),
            archiveSize=_get(answer, "archive_size", int, 0),
            entryCount=_get(answer, "entry_count", int, 0),
            bytesWritten=_get(answer, "bytes_written", int, 0),
            archive=archive,
            raw=answer,
        )


@dataclass(frozen=True)
class DownloadResult:
    """``download``: an export unpacked into a local directory."""

    export: ExportResult
    localDirectory: Path
    paths: tuple[Path, ...]
    """The local paths written (top-level entries first), in archive order."""


@dataclass(frozen=True)
class ShellInfo:
    """A shell's summary, part of every shell answer."""

    shellId: str
    cwd: str
    cols: int
    rows: int
    state: str
    startedAt: float | None
    endedAt: float | None
    exitCode: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ShellInfo:
        return cls(**_shellFields(answer), raw=answer)

    @property
    def running(self) -> bool:
        return self.state == "running"


def _shellFields(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "shellId": _get(answer, "shell_id", str, ""),
        "cwd": _get(answer, "cwd", str, ""),
        "cols": _get(answer, "cols", int, 0),
        "rows": _get(answer, "rows", int, 0),
        "state": _get(answer, "state", str, ""),
        "startedAt": _optional(answer, "started_at", float),
        "endedAt": _optional(answer, "ended_at", float),
        "exitCode": _optional(answer, "exit_code", int),
    }


@dataclass(frozen=True)
class ShellOutput:
    """``read_shell``: output from ``cursor`` to ``nextCursor`` (characters), and the summary."""

    shell: ShellInfo
    cursor: int
    nextCursor: int
    output: str
    truncated: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ShellOutput:
        return cls(
            shell=ShellInfo.fromAnswer(answer),
            cursor=_get(answer, "cursor", int, 0),
            nextCursor=_get(answer, "next_cursor", int, 0),
            output=_get(answer, "output", str, ""),
            truncated=_get(answer, "truncated", bool, False),
            raw=answer,
        )


@dataclass(frozen=True)
class ServiceInfo:
    """A service's record: ``state`` ``running``, ``exited``, ``failed`` or ``stopped``."""

    serviceName: str
    command: str
    cwd: str
    state: str
    pid: int | None
    exitCode: int | None
    stopReason: str | None
    startedAt: float | None
    readyAt: float | None
    endedAt: float | None
    readiness: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ServiceInfo:
        return cls(
            serviceName=_get(answer, "service_name", str, ""),
            command=_get(answer, "command", str, ""),
            cwd=_get(answer, "cwd", str, ""),
            state=_get(answer, "state", str, ""),
            pid=_optional(answer, "pid", int),
            exitCode=_optional(answer, "exit_code", int),
            stopReason=_optional(answer, "stop_reason", str),
            startedAt=_optional(answer, "started_at", float),
            readyAt=_optional(answer, "ready_at", float),
            endedAt=_optional(answer, "ended_at", float),
            readiness=_optional(answer, "readiness", dict),
            raw=answer,
        )


@dataclass(frozen=True)
class ServiceLogs:
    """``logs_service``: the service's record and the (tail of its) output."""

    service: ServiceInfo
    stdout: str
    stderr: str
    tailLines: int | None
    truncated: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def fromAnswer(cls, answer: dict[str, Any]) -> ServiceLogs:
        return cls(
            service=ServiceInfo.fromAnswer(answer),
            stdout=_get(answer, "stdout", str, ""),
            stderr=_get(answer, "stderr", str, ""),
            tailLines=_optional(answer, "tail_lines", int),
            truncated=_get(answer, "truncated", bool, False),
            raw=answer,
        )

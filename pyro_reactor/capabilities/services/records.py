"""A service's files under the service root: its record, logs, runner and exit status.

The layout is the reference's contract, under ``config.serviceRoot`` (a 0700 directory; every
file in it is 0600, the runner 0700, so that no other user reads a service's environment or
output):

  - ``NAME.json``: the record (``service_name``, ``command``, ``cwd``, ``state``,
    ``started_at``, ``readiness``, ``ready_at``, ``ended_at``, ``exit_code``, ``pid``,
    ``stop_reason``), written ``sort_keys=True, indent=2``, atomically (temporary file and
    rename) from a worker thread. We add ``pid_start_ticks`` (the process's start time from
    ``/proc/PID/stat``), which answers do not show: it tells a re-adopted pid from a reused one;
    and, where the guest has cgroup v2, ``cgroup_path`` (the service's cgroup, not shown either):
    the next agent kills what the service left through it (an older record without it: the
    session, as before);
  - ``NAME.stdout`` / ``NAME.stderr``: the command's output, written by the runner's log
    writer and capped at ``--log-bytes`` each, the previous part in ``NAME.stdout.1`` /
    ``NAME.stderr.1`` (see L{pyro_reactor.capabilities.services._runner});
  - ``NAME.runner.sh``: the runner, a ``/bin/sh`` script that ``exec``s the agent's Python on
    L{pyro_reactor.capabilities.services._runner} (its file; its text where the agent has no
    source files); it runs ``/bin/sh -lc COMMAND`` and writes
    its exit status to ``NAME.status``, so a service that ends while no agent watches it still
    leaves its exit code. It does not ``cd`` to the working directory by name: the agent
    starts it in the very directory it checked (L{WorkingDirectory}).

When the state directory is full, a record that cannot be replaced atomically is rewritten in
place (a record is small: the page the file already holds fits it), and one that cannot be
written at all is retried until it can (L{RecordWriter}): a record on disk never silently
stays behind its service. A temporary file is never left behind.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.services import _runner

log = Logger(namespace="pyro_reactor.capabilities.services")

#: Block size of the backwards read of a log tail.
TAIL_BLOCK = 64 * 1024
#: Seconds between two attempts at a record write that failed.
RETRY_INTERVAL = 1.0
#: Record fields kept on disk but not shown in answers.
PRIVATE_FIELDS = frozenset({"pid_start_ticks", "cgroup_path"})
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


@dataclass(frozen=True)
class ServiceFiles:
    """The paths of one service's files under the service root."""

    root: Path
    name: str

    @property
    def record(self) -> Path:
        return self.root / f"{self.name}.json"

    @property
    def stdout(self) -> Path:
        return self.root / f"{self.name}.stdout"

    @property
    def stderr(self) -> Path:
        return self.root / f"{self.name}.stderr"

    @property
    def status(self) -> Path:
        return self.root / f"{self.name}.status"

    @property
    def runner(self) -> Path:
        return self.root / f"{self.name}.runner.sh"

    def rotated(self, log_: Path) -> Path:
        """Where the runner keeps the earlier part of a log (see L{_runner})."""
        return log_.with_name(log_.name + ".1")


def makePrivateRoot(root: Path) -> None:
    """Create the service root if needed and make it (and what it holds) owner-only."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, DIRECTORY_MODE)
    for path in root.iterdir():
        try:
            mode = path.lstat().st_mode & 0o777
            if not path.is_symlink() and mode & 0o077:
                os.chmod(path, mode & 0o700)
        except OSError:
            continue


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _runnerProgram() -> list[str]:
    """The arguments that run L{_runner}: its file, or its text where there is no source file."""
    path = _runner.__file__
    if path is not None and path.endswith(".py"):
        return [path]
    spec = _runner.__spec__
    loader = None if spec is None else spec.loader
    source = getattr(loader, "get_source", lambda name: None)(_runner.__name__)
    if not isinstance(source, str):
        raise RuntimeError("the service runner's source is not available")
    return ["-c", source]


def runnerScript(
    files: ServiceFiles, command: str, logBytes: int, python: str = sys.executable
) -> str:
    """The text of ``NAME.runner.sh`` (it runs where it is started: no ``cd`` by name)."""
    arguments = [
        python,
        "-I",
        "-S",
        *_runnerProgram(),
        command,
        str(files.stdout),
        str(files.stderr),
        str(files.status),
        str(logBytes),
    ]
    return "\n".join(
        [
            "#!/bin/sh",
            f"# pyro service {files.name}: runs its command with logs capped at {logBytes}"
            " bytes each, then records its exit status.",
            "exec "
            + " ".join(_quote(argument) for argument in arguments)
            + ' "${LC_CTYPE+set}" "${LC_CTYPE-}"',
            "",
        ]
    )


def _writePrivate(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Create or replace the contents of C{path} (blocking), owner-only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def prepareFiles(files: ServiceFiles, runner: str) -> None:
    """Empty the logs, forget the old status and write the runner (blocking).

    On failure (a full state directory), nothing temporary is left behind.
    """
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, DIRECTORY_MODE)
    for log_ in (files.stdout, files.stderr):
        _writePrivate(log_, b"")
        files.rotated(log_).unlink(missing_ok=True)
    files.status.unlink(missing_ok=True)
    temporary = files.root / f".{files.name}.runner.sh.tmp"
    try:
        _writePrivate(temporary, runner.encode("utf-8"), 0o700)
        os.replace(temporary, files.runner)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def encodeRecord(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), indent=2, sort_keys=True)


def writeRecord(files: ServiceFiles, text: str) -> None:
    """Replace ``NAME.json`` atomically (blocking).

    When the directory is full, the record is rewritten in place instead (its file already
    holds a page, which a record fits); the temporary file is removed whatever happens.
    """
    data = text.encode("utf-8")
    temporary = files.root / f".{files.name}.json.tmp"
    try:
        _writePrivate(temporary, data)
        os.replace(temporary, files.record)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not files.record.exists():
            raise
        _rewriteInPlace(files.record, data)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _rewriteInPlace(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def readExitStatus(files: ServiceFiles) -> int | None:
    """The exit status the runner recorded, or ``None`` (blocking)."""
    try:
        text = files.status.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


class _Chain:
    """Two open files read as one: the rotated part (if any), then the current log."""

    def __init__(self, paths: list[Path]) -> None:
        self.handles = []
        for path in paths:
            try:
                self.handles.append(path.open("rb"))
            except FileNotFoundError:
                continue
        self.sizes = [os.fstat(handle.fileno()).st_size for handle in self.handles]
        self.size = sum(self.sizes)

    def read(self, position: int, length: int) -> bytes:
        parts, start = [], 0
        for handle, size in zip(self.handles, self.sizes, strict=True):
            end = start + size
            if position < end and position + length > start:
                offset = max(position - start, 0)
                count = min(position + length, end) - start - offset
                handle.seek(offset)
                parts.append(handle.read(count))
            start = end
        return b"".join(parts)

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def tailText(path: Path, tailLines: int | None, maxBytes: int) -> tuple[str, bool]:
    """The last C{tailLines} lines of a log (all of it for ``None``), and whether more exist.

    The log's rotated part (``PATH.1``) comes first, as if the two were one file. Lines are
    counted as ``str.splitlines`` counts them, as the reference does. Only the end is read,
    backwards in blocks, and never more than C{maxBytes} bytes: a longer answer is cut at
    the start (and flagged truncated) rather than read into memory.
    """
    chain = _Chain([path.with_name(path.name + ".1"), path])
    try:
        return _tail(chain, tailLines, maxBytes)
    finally:
        chain.close()


def _tail(chain: _Chain, tailLines: int | None, maxBytes: int) -> tuple[str, bool]:
    size = chain.size
    if tailLines is not None and tailLines <= 0:
        return "", size > 0
    if tailLines is None:
        if size <= maxBytes:
            return chain.read(0, size).decode("utf-8", "replace"), False
        data = chain.read(size - maxBytes, maxBytes)
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
        return data.decode("utf-8", "replace"), True
    # Read back until the chunk holds tailLines + 1 newlines: then its first line (maybe
    # partial) can be dropped and the last tailLines lines are all whole.
    blocks: list[bytes] = []
    position, newlines, total = size, 0, 0
    while position > 0 and newlines <= tailLines and total < maxBytes:
        step = min(TAIL_BLOCK, position, maxBytes - total)
        position -= step
        block = chain.read(position, step)
        blocks.append(block)
        newlines += block.count(b"\n")
        total += len(block)
    text = b"".join(reversed(blocks)).decode("utf-8", "replace")
    lines = text.splitlines(keepends=True)
    if position == 0:
        if len(lines) <= tailLines:
            return text, False
        return "".join(lines[-tailLines:]), True
    whole = lines[1:] or lines
    return "".join(whole[-tailLines:]), True


class RecordWriter:
    """Writes one service's record in a worker thread; the latest record always wins.

    Writes never overlap and never reorder: while one is in flight, only the newest record
    waiting is written next. A write that fails is logged and retried every
    L{RETRY_INTERVAL} seconds until a write succeeds (or a newer record replaces it); the
    answers waiting for it are not held back.
    """

    def __init__(
        self,
        files: ServiceFiles,
        inThread: Callable[..., Deferred[Any]],
        clock: IReactorTime | None = None,
    ) -> None:
        self._files = files
        self._inThread = inThread
        self._clock = clock
        self._pending: str | None = None
        self._waiters: list[Deferred[None]] = []
        self._busy = False
        self._retry: IDelayedCall | None = None

    def save(self, record: Mapping[str, Any]) -> Deferred[None]:
        self._pending = encodeRecord(record)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._retry = None
        if not self._busy:
            self._flush()
        return waiter

    @property
    def failing(self) -> bool:
        """Whether the newest record is waiting for a retry (the last write failed)."""
        return self._retry is not None and self._retry.active()

    def _flush(self) -> None:
        self._retry = None
        text, self._pending = self._pending, None
        waiters, self._waiters = self._waiters, []
        assert text is not None
        self._busy = True

        def written(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                log.failure(
                    "cannot write the record of service {service}; retrying",
                    result,
                    service=self._files.name,
                )
                if self._pending is None:
                    self._pending = text
                    if self._clock is not None:
                        self._retry = self._clock.callLater(RETRY_INTERVAL, self._flush)
            for waiter in waiters:
                waiter.callback(None)
            if self._pending is not None and self._retry is None:
                if isinstance(result, Failure) and self._clock is None:
                    return
                self._flush()

        self._inThread(writeRecord, self._files, text).addBoth(written)

    def stop(self) -> None:
        """Give up retrying (the agent is stopping)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None


__all__ = [
    "PRIVATE_FIELDS",
    "RecordWriter",
    "ServiceFiles",
    "encodeRecord",
    "makePrivateRoot",
    "prepareFiles",
    "readExitStatus",
    "runnerScript",
    "tailText",
    "writeRecord",
]

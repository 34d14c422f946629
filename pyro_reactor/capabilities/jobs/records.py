"""A job's files under ``<state dir>/pyro-jobs/``: its record, its output, its exit status.

Per job ``ID``:

  - ``ID.json``: the record (``job_id``, ``command`` or ``argv``, ``cwd``, ``started_at``,
    ``pid``, ``stdin``, ``cgroup``, ``limits_applied``, ``timeout_seconds``; after the end
    ``ended_at``, ``exit_code``, ``signal``, ``timed_out``, ``oom_killed``, ``usage``), plus
    private fields the answers never show: ``runner_pid`` and ``runner_start_ticks`` (to tell
    a re-adopted runner from a reused pid) and ``cgroup_path``. Written atomically (temporary
    file and rename) from a worker thread.
  - ``ID.stdout`` / ``ID.stderr``: the command's output, exactly as written, appended by the
    command itself (the runner hands it the files). A byte's offset in its stream is its
    offset in the file, forever: when a file holds more than the limit, the agent punches a
    hole over its oldest blocks (``fallocate(PUNCH_HOLE)``), which frees them but moves
    nothing; the first byte still kept is found again after a restart with ``SEEK_DATA``.
  - ``ID.exit``: written by the runner when the main process has ended (JSON: ``exit_code``,
    ``signal``, ``timed_out``, ``ended_at``), so an exit that happens while no agent runs is
    not lost.

Everything here is 0600 in a 0700 directory. The functions block: call them in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_reactor.system._linux import libcFunction

#: Record fields kept on disk but not shown in answers.
PRIVATE_FIELDS = frozenset({"runner_pid", "runner_start_ticks", "cgroup_path", "timeout_seconds"})
STREAMS = ("stdout", "stderr")
#: Holes are punched in whole blocks of this size (a multiple of every filesystem's block).
HOLE_ALIGN = 64 * 1024

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class JobFiles:
    """The paths of one job's files."""

    root: Path
    jobId: str

    @property
    def record(self) -> Path:
        return self.root / f"{self.jobId}.json"

    @property
    def exit(self) -> Path:
        return self.root / f"{self.jobId}.exit"

    def output(self, stream: str) -> Path:
        return self.root / f"{self.jobId}.{stream}"

    def all(self) -> list[Path]:
        return [self.record, self.exit, *(self.output(s) for s in STREAMS)]


def prepareOutput(files: JobFiles) -> dict[str, int]:
    """Create the job's empty output files; their append-mode descriptors for the command."""
    files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.exit.unlink(missing_ok=True)
    result: dict[str, int] = {}
    try:
        for stream in STREAMS:
            result[stream] = os.open(
                files.output(stream),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            )
    except BaseException:
        for fd in result.values():
            os.close(fd)
        raise
    return result


def writeRecord(files: JobFiles, record: Mapping[str, Any]) -> None:
    """Replace ``ID.json`` atomically."""
    temporary = files.root / f".{files.jobId}.json.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(dict(record), sort_keys=True, indent=2).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(temporary, files.record)


def readRecords(root: Path) -> list[dict[str, Any]]:
    """Every readable job record under C{root}, oldest start first."""
    records = []
    try:
        paths = sorted(root.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("job_id"), str):
            records.append(record)
    records.sort(key=lambda r: (r.get("started_at") or 0.0, r["job_id"]))
    return records


def readExit(files: JobFiles) -> dict[str, Any] | None:
    """What the runner recorded when the main process ended, or ``None``."""
    try:
        value = json.loads(files.exit.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def removeFiles(files: JobFiles) -> None:
    for path in files.all():
        path.unlink(missing_ok=True)


def publicRecord(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in PRIVATE_FIELDS}


# -- output files ----------------------------------------------------------------------------


def openForReading(path: Path) -> int:
    """The agent's descriptor of an output file: read, and punched (which needs write)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def size(fd: int) -> int:
    return os.fstat(fd).st_size


def firstKept(fd: int) -> int:
    """The offset of the first byte still kept (after the punched holes)."""
    end = size(fd)
    try:
        return min(os.lseek(fd, 0, os.SEEK_DATA), end)
    except OSError as error:
        if error.errno == errno.ENXIO:  # only holes (or empty)
            return end
        return 0


@functools.cache
def _fallocate() -> Any:
    function = libcFunction(
        "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int
    )
    if function is None:
        raise OSError(errno.ENOSYS, "no C library to call fallocate through")
    return function


def punchBefore(fd: int, end: int, start: int = 0) -> int:
    """Free the bytes from C{start} to C{end} (rounded down to L{HOLE_ALIGN}); the new start.

    Offsets do not move: the file keeps its size, the range reads as zeros. Returns C{start}
    unchanged when the filesystem cannot punch holes.
    """
    end -= end % HOLE_ALIGN
    if end <= start:
        return start
    result = _fallocate()(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start)
    if result != 0:
        return start
    return end


def readAt(fd: int, offset: int, count: int) -> bytes:
    return os.pread(fd, count, offset)

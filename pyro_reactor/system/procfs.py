"""What ``/proc`` says about processes: the agent's one ``/proc/<pid>/stat`` parser and walks.

L{readProcStat} reads one process (state, parent, group, session, start time); L{allProcesses}
scans them all; L{descendantsOf} walks ``/proc/<pid>/task/*/children`` (or, where the kernel
lacks it, one scan) to find what a process started. Blocking, cheap per process, but a scan
costs milliseconds: not for hot paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says of a process that the agent needs.

    ``state`` is the one-letter state (``R``, ``S``, ``Z`` for a zombie...), ``startTicks`` the
    start time in clock ticks after boot: with the pid, it tells a process from a later one
    that was given the same pid.
    """

    pid: int
    state: str
    ppid: int
    pgid: int
    session: int
    startTicks: int

    @property
    def zombie(self) -> bool:
        """Dead but not yet reaped (``Z``), or being torn down (``X``)."""
        return self.state in ("Z", "X")


def parseProcStat(pid: int, raw: bytes) -> ProcStat | None:
    """Parse the content of ``/proc/<pid>/stat`` (``None`` if it is not in the known shape)."""
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            session=int(fields[3]),
            startTicks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def readProcStat(pid: int, procRoot: Path = Path("/proc")) -> ProcStat | None:
    """The L{ProcStat} of C{pid}, or ``None`` if it is gone (or ``/proc`` is missing)."""
    try:
        with open(f"{procRoot}/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    return parseProcStat(pid, raw)


def allProcesses(procRoot: Path = Path("/proc")) -> list[ProcStat]:
    """Every process ``/proc`` shows (a scan: milliseconds; not for hot paths)."""
    try:
        entries = os.listdir(procRoot)
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.isdigit():
            info = readProcStat(int(entry), procRoot)
            if info is not None:
                found.append(info)
    return found


def childrenOf(pid: int, procRoot: Path = Path("/proc")) -> list[int] | None:
    """The pids of C{pid}'s children, from ``/proc/<pid>/task/*/children``.

    ``None`` when the kernel has no such file (``CONFIG_PROC_CHILDREN`` unset): the caller
    then scans ``/proc`` for parents instead (L{descendantsOf} does).
    """
    try:
        tasks = os.listdir(procRoot / str(pid) / "task")
    except FileNotFoundError:
        return []
    except OSError:
        return None
    found: list[int] = []
    for task in tasks:
        try:
            with open(procRoot / str(pid) / "task" / task / "children", "rb") as handle:
                found.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            if not (procRoot / str(pid) / "task" / task).exists():
                continue  # the thread ended meanwhile
            return None
        except (OSError, ValueError):
            continue
    return found


def descendantsOf(roots: Iterable[int], procRoot: Path = Path("/proc")) -> list[ProcStat]:
    """Every live descendant of the processes C{roots} (not the roots), parents first.

    Walks ``/proc/<pid>/task/*/children``; where the kernel lacks it, one scan of ``/proc``.
    A process whose parent has already exited was re-parented (to init, or a subreaper) and
    is not found: callers remember what they saw (see L{ProcessTree}).
    """
    pending = list(roots)
    seen: set[int] = set(pending)
    found: list[ProcStat] = []
    table: dict[int, list[int]] | None = None
    while pending:
        pid = pending.pop(0)
        kids = childrenOf(pid, procRoot) if table is None else None
        if kids is None:
            if table is None:
                table = {}
                for each in allProcesses(procRoot):
                    table.setdefault(each.ppid, []).append(each.pid)
            kids = table.get(pid, [])
        for kid in kids:
            if kid in seen:
                continue
            seen.add(kid)
            info = readProcStat(kid, procRoot)
            if info is not None and not info.zombie:
                found.append(info)
                pending.append(kid)
    return found


__all__ = [
    "ProcStat",
    "allProcesses",
    "childrenOf",
    "descendantsOf",
    "parseProcStat",
    "readProcStat",
]

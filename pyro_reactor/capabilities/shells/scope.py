"""What a shell started, found so that closing the shell can end all of it.

Without a cgroup per unit, the processes a shell started are found three ways, each a best
effort (docs/actions/shells.md lists what can still escape):

- its session: ``nohup``, ``disown`` and ``trap '' HUP`` jobs stay in the shell's session
  (the shell is its leader, so the session id is the shell's pid) even once the shell is gone;
- its descendants, through ``/proc/PID/task/*/children``, walked from the shell *before*
  anything is killed: a ``setsid`` job is in another session but still a descendant while
  its parent lives;
- a marker in the environment (``PYRO_UNIT=<token>``) the shell's processes inherit: a job
  whose parent already exited (util-linux ``setsid`` forks and exits when called from an
  interactive job) is found by scanning ``/proc/*/environ`` for it.

Each process found is held by a pidfd where the kernel has them, so a pid reused between the
look and the kill is never signalled. L{ProcessScope} is the interface the terminal uses. Where the
guest has cgroup v2, a shell gets a cgroup of its own instead (L{CgroupScope}): entered by
the agent around the fork (see L{pyro_reactor.system.unitcgroups.UnitCgroups}), killed whole
with ``cgroup.kill``; nothing escapes it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger

from pyro_reactor.system.cgroups import Cgroup
from pyro_reactor.system.processes import allProcesses, descendantsOf, readProcStat
from pyro_reactor.system.unitcgroups import CgroupUnit, UnitCgroups

log = Logger(namespace="pyro_reactor.capabilities.shells")

UNIT_VARIABLE = "PYRO_UNIT"
"""The environment variable marking a shell's processes (its value: the shell's token)."""

_PROC = Path("/proc")


class ProcessScope(Protocol):
    """The processes one shell started."""

    def collect(self) -> None:
        "Look for the scope's processes now (before anything is killed) and hold on to them."

    def kill(self) -> None:
        "SIGKILL every process of the scope (those collected and those found now)."

    def leaderAlive(self) -> bool:
        "Whether the shell is not reaped yet (so its pid and group id are still its own)."


def _pids(procRoot: Path) -> list[int]:
    try:
        return [int(entry) for entry in os.listdir(procRoot) if entry.isdigit()]
    except OSError:
        return []


def sessionMembers(sessionId: int, procRoot: Path = _PROC) -> list[int]:
    """The live processes (zombies left out) of the session ``sessionId``, from ``/proc``."""
    return [
        info.pid for info in allProcesses(procRoot) if info.session == sessionId and not info.zombie
    ]


def descendants(roots: Iterable[int], procRoot: Path = _PROC) -> list[int]:
    """``roots`` and all their live descendants still linked to them, parents first."""
    roots = list(roots)
    return list(dict.fromkeys([*roots, *(info.pid for info in descendantsOf(roots, procRoot))]))


def marked(token: str, procRoot: Path = _PROC) -> list[int]:
    """The live processes whose environment holds ``PYRO_UNIT=<token>``."""
    needle = f"{UNIT_VARIABLE}={token}".encode()
    found = []
    for pid in _pids(procRoot):
        try:
            with open(f"{procRoot}/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            info = readProcStat(pid, procRoot)
            if info is not None and not info.zombie:
                found.append(pid)
    return found


def _signalled(pidfd: int, signum: int) -> bool:
    """Send ``signum`` through ``pidfd``; ``False`` if its process is gone (reaped)."""
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


class TreeScope:
    """A shell's processes without cgroups: its session, descendants and marked processes.

    @param leader: the shell's pid (the session's id and its process group's id).
    @param token: the value of L{UNIT_VARIABLE} in the shell's environment.
    """

    def __init__(self, leader: int, token: str, procRoot: Path = _PROC) -> None:
        self.leader = leader
        self.token = token
        self._procRoot = procRoot
        self._held: dict[int, int | None] = {}
        """Collected pids and their pidfds (``None`` where pidfds are not available)."""
        # Held from the start: once the shell is reaped its pid may be reused, and only a
        # live pidfd says the pid is still the shell's, whose children may be walked.
        self._hold(leader)

    def _hold(self, pid: int) -> None:
        try:
            self._held[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:
            self._held[pid] = None

    def leaderAlive(self) -> bool:
        if self.leader not in self._held:
            return False
        pidfd = self._held[self.leader]
        return pidfd is None or _signalled(pidfd, 0)

    def _roots(self) -> list[int]:
        """Held processes still alive (so still the ones we found): safe to walk from."""
        roots = []
        for pid, pidfd in self._held.items():
            if pidfd is None or _signalled(pidfd, 0):
                roots.append(pid)
        return roots

    def _find(self) -> list[int]:
        root = self._procRoot
        found = descendants(self._roots(), root)
        found += sessionMembers(self.leader, root)
        found += marked(self.token, root)
        # Descendants of the session's and marked processes too (a setsid job's children).
        found = descendants(found, root)
        me = os.getpid()
        return [pid for pid in dict.fromkeys(found) if pid > 1 and pid != me]

    def collect(self) -> None:
        for pid in self._find():
            if pid not in self._held:
                self._hold(pid)

    def kill(self) -> None:
        self.collect()
        killed = 0
        for pid, pidfd in self._held.items():
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                continue
        self.release()
        if killed:
            log.debug(
                "killed {count} processes of shell unit {token}", count=killed, token=self.token
            )

    def release(self) -> None:
        """Let go of the pidfds held."""
        for pidfd in self._held.values():
            if pidfd is not None:
                os.close(pidfd)
        self._held.clear()


class CgroupScope:
    """A shell's processes as its cgroup, entered before the shell's first fork.

    Nothing it started can leave: ``setsid``, ``nohup``, double forks all stay in the cgroup,
    and L{kill} (``cgroup.kill``) ends them all at once. The cgroup is removed once empty.
    C{leader} (a L{TreeScope} of the shell) only answers L{leaderAlive} through its pidfd.
    """

    def __init__(self, cgroup: Cgroup, cgroups: UnitCgroups, leader: TreeScope) -> None:
        self.cgroup = cgroup
        self.cgroups = cgroups
        self.leader = leader

    def collect(self) -> None:
        """Nothing to look for: the cgroup holds every process the shell started."""

    def leaderAlive(self) -> bool:
        return self.leader.leaderAlive()

    def kill(self) -> None:
        if CgroupUnit(self.cgroup).signal(signal.SIGKILL):
            log.debug("killed the cgroup of shell unit {token}", token=self.leader.token)
        self.leader.release()
        self.cgroups.release(self.cgroup, killed=True)


__all__ = [
    "UNIT_VARIABLE",
    "CgroupScope",
    "ProcessScope",
    "TreeScope",
    "descendants",
    "marked",
    "sessionMembers",
]

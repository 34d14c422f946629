"""The unit of a service: everything it started, how to signal it, and how to see it end.

Everything the service started is its *unit* (L{UnitGroup}). Without a cgroup per service
(not built yet: a C{cgroup.kill}-based L{UnitGroup} can replace L{SessionUnit} later without
touching the machine), the unit is found in ``/proc``, best effort (L{SessionUnit}):

  - every process of the runner's session or process group (``setsid``-less background
    children, nohup'ed ones, a daemon that forked twice without ``setsid``), also once the
    runner is gone: a session id is not reused while a process of the session lives;
  - plus every *live descendant* of those, through their parent links, which catches
    ``setsid`` children (and their own children) as long as their parent still runs.

What can still escape: a process that left the session (``setsid``, ``setpgid`` to a new
group, a double fork with ``setsid`` as daemons do) *and* whose parent has already ended is
reparented to init and no longer linked to the service; it is neither signalled nor waited
for. The agent is not made a child subreaper (``PR_SET_CHILD_SUBREAPER``) for that: it would
have to reap every orphan of every unit, which Twisted's child handling does not do.

Stopping a unit does not scan ``/proc`` on a timer: L{UnitWatch} opens a pidfd for each
member and registers it with the reactor; when all have ended it looks once more (for
members forked meanwhile), and reports the unit empty when none is left. Only where the
kernel has no ``pidfd_open`` (before Linux 5.3) does it poll, at growing intervals.
"""

from __future__ import annotations

import errno
import os
import signal as _signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.system.processes import signalGroup
from pyro_reactor.system.procfs import ProcStat, allProcesses, readProcStat

log = Logger(namespace="pyro_reactor.capabilities.services")

#: First and longest wait between two checks of a unit when there is no pidfd.
DRAIN_FIRST = 0.01
DRAIN_LONGEST = 0.2


def processStat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks after boot), or ``None``."""
    stat = readProcStat(pid)
    return None if stat is None else (stat.state, stat.startTicks)


def _live(stat: ProcStat) -> bool:
    return not stat.zombie and stat.state != "x"


def sameProcessAlive(pid: int, startTicks: int | None) -> bool:
    """Whether C{pid} is still the process that was recorded, and not a zombie."""
    stat = readProcStat(pid)
    if stat is None or not _live(stat):
        return False
    return startTicks is None or stat.startTicks == startTicks


def _processTable() -> dict[int, ProcStat]:
    return {stat.pid: stat for stat in allProcesses()}


class UnitGroup(Protocol):
    """Every process one unit (a service) started; a cgroup can implement this later."""

    def members(self) -> list[int]:
        "The pids of the unit's live processes (none: the unit is empty)."

    def kill(self, signum: int) -> bool:
        "Signal every live member; False if there is none."


@dataclass
class SessionUnit:
    """A unit found through ``/proc``: the leader's session and group, and their descendants.

    C{startTicks} is the leader's recorded start time: if a live process holds the leader's
    pid with another start time, the pid was reused, which the kernel only does once the
    session and group are empty: the unit is then empty too.
    """

    leader: int
    startTicks: int | None

    def members(self) -> list[int]:
        if self.leader <= 1:
            return []
        table = _processTable()
        own = table.get(self.leader)
        if own is not None and self.startTicks is not None and own.startTicks != self.startTicks:
            return []
        agent = os.getpid()
        found = {pid for pid, stat in table.items() if self.leader in (stat.session, stat.pgid)}
        children: dict[int, list[int]] = {}
        for pid, stat in table.items():
            children.setdefault(stat.ppid, []).append(pid)
        pending = list(found)
        while pending:
            for child in children.get(pending.pop(), ()):
                if child not in found:
                    found.add(child)
                    pending.append(child)
        return sorted(pid for pid in found if pid not in (agent, 1) and _live(table[pid]))

    def kill(self, signum: int) -> bool:
        members = self.members()
        for pid in members:
            _signalMember(pid, signum)
        if members:
            # Also as a group, atomically: catches a member forked since the look.
            signalGroup(self.leader, signum)
        return bool(members)


def _signalMember(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@implementer(IReadDescriptor)
class _Pidfd:
    """A pidfd registered with the reactor: readable once its process has ended."""

    def __init__(self, reactor: Any, fd: int, onEnd: Callable[[_Pidfd], None]) -> None:
        self.reactor = reactor
        self.fd = fd
        self.onEnd = onEnd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.close()
        self.onEnd(self)

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "service-pidfd"

    def close(self) -> None:
        if self.fd >= 0:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = -1


def openPidfd(pid: int) -> int | None:
    """A pidfd for C{pid}; ``None`` if it is gone. Raises L{NotImplementedError} without."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except AttributeError:
        raise NotImplementedError("no pidfd_open") from None
    except OSError as error:
        if error.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            raise NotImplementedError("no pidfd_open") from None
        raise


class UnitWatch:
    """Reports once that nothing of a unit is left, by pidfd events (polling without them)."""

    def __init__(self, reactor: Any, unit: UnitGroup, onEmpty: Callable[[], None]) -> None:
        self._reactor = reactor
        self._unit = unit
        self._onEmpty: Callable[[], None] | None = onEmpty
        self._pidfds: list[_Pidfd] = []
        self._poll: IDelayedCall | None = None
        self._interval = DRAIN_FIRST
        self._look()

    def _look(self) -> None:
        if self._onEmpty is None:
            return
        members = self._unit.members()
        if not members:
            onEmpty, self._onEmpty = self._onEmpty, None
            onEmpty()
            return
        try:
            for pid in members:
                fd = openPidfd(pid)
                if fd is not None:
                    pidfd = _Pidfd(self._reactor, fd, self._ended)
                    self._pidfds.append(pidfd)
                    self._reactor.addReader(pidfd)
        except NotImplementedError:
            self._closeAll()
            self._poll = self._reactor.callLater(self._interval, self._polled)
            self._interval = min(self._interval * 2, DRAIN_LONGEST)
            return
        if not self._pidfds:
            self._look()

    def _polled(self) -> None:
        self._poll = None
        self._look()

    def _ended(self, pidfd: _Pidfd) -> None:
        self._pidfds.remove(pidfd)
        if not self._pidfds:
            self._look()

    def _closeAll(self) -> None:
        pidfds, self._pidfds = self._pidfds, []
        for pidfd in pidfds:
            pidfd.close()

    def checkNow(self) -> None:
        """Look again at once (a member was seen to end another way)."""
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
            self._poll = None
            self._look()

    def stop(self) -> None:
        self._onEmpty = None
        self._closeAll()
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None


class Watch(Protocol):
    """A running watch of a unit, as the machine holds it."""

    def checkNow(self) -> None:
        "Look again at once."

    def stop(self) -> None:
        "Stop watching; nothing is reported."


def sweep(reactor: Any, unit: UnitGroup, timeout: float) -> Deferred[bool]:
    """SIGKILL what is left of an ended unit.

    Fires with C{True} once nothing of it is left, or C{False} if something still is after
    C{timeout} seconds (a process stuck in the kernel).
    """
    done: Deferred[bool] = Deferred()
    if unit.kill(_signal.SIGKILL):
        log.info("killed what was left of an ended service")

    def gone() -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(True)

    def stuck() -> None:
        watch.stop()
        done.callback(False)

    timer = reactor.callLater(timeout, stuck)
    watch = UnitWatch(reactor, unit, gone)
    return done


__all__ = [
    "ProcStat",
    "SessionUnit",
    "UnitGroup",
    "UnitWatch",
    "Watch",
    "openPidfd",
    "processStat",
    "sameProcessAlive",
    "sweep",
]

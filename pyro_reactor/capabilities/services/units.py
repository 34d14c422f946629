"""A service's processes: the runner the machine watches, and the unit of all it started.

The runner (``NAME.runner.sh``) is spawned as the leader of a new session and process group
(``pid == pgid == sid``). Its exit is an event: our own child is reaped by the reactor
(L{ChildProcess}); a runner re-adopted from an earlier agent is watched through a pidfd
registered with the reactor (L{AdoptedProcess}; polled where the kernel has no pidfds).

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
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.system.processes import signalGroup
from pyro_reactor.system.workspace import WorkingDirectory

log = Logger(namespace="pyro_reactor.capabilities.services")

#: Seconds between two liveness checks of a re-adopted process when there is no pidfd.
POLL_INTERVAL = 0.5
#: First and longest wait between two checks of a unit when there is no pidfd.
DRAIN_FIRST = 0.01
DRAIN_LONGEST = 0.2


class ProcStat(NamedTuple):
    """The fields of ``/proc/PID/stat`` a unit needs."""

    state: str
    ppid: int
    pgrp: int
    session: int
    startTicks: int


def readStat(pid: int | str) -> ProcStat | None:
    """One process's L{ProcStat}, or ``None`` if it is gone."""
    # TODO(integrator): switch to the shared /proc/PID/stat parser of system/processes.py.
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            fields[0].decode("ascii", "replace"),
            int(fields[1]),
            int(fields[2]),
            int(fields[3]),
            int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def processStat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks after boot), or ``None``."""
    stat = readStat(pid)
    return None if stat is None else (stat.state, stat.startTicks)


def _live(stat: ProcStat) -> bool:
    return stat.state not in ("Z", "X", "x")


def sameProcessAlive(pid: int, startTicks: int | None) -> bool:
    """Whether C{pid} is still the process that was recorded, and not a zombie."""
    stat = readStat(pid)
    if stat is None or not _live(stat):
        return False
    return startTicks is None or stat.startTicks == startTicks


def _processTable() -> dict[int, ProcStat]:
    table: dict[int, ProcStat] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if entry.isdigit():
            stat = readStat(entry)
            if stat is not None:
                table[int(entry)] = stat
    return table


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
        found = {pid for pid, stat in table.items() if self.leader in (stat.session, stat.pgrp)}
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


class ServiceProcess(Protocol):
    """A service's runner (leader of its session), and the unit of everything it started."""

    pid: int
    startTicks: int | None

    def signal(self, signum: int) -> bool:
        "Signal every process of the unit; False if nothing of it is left."

    def watchUnit(self, onEmpty: Callable[[], None]) -> Watch:
        "Call C{onEmpty} once nothing of the unit is left."

    def release(self) -> None:
        "Stop reporting the exit (the agent is stopping); the process keeps running."


class RunnerProtocol(ProcessProtocol):
    """The runner's process protocol: reports its exit, then lets its directory go."""

    def __init__(
        self,
        clock: IReactorTime,
        onExit: Callable[[int | None], None],
        directory: WorkingDirectory | None = None,
    ) -> None:
        self.clock = clock
        self.onExit: Callable[[int | None], None] | None = onExit
        #: The runner's working directory, held open until the runner has exited.
        self.directory = directory
        self.exited = False
        self.pid: int | None = None
        self.spawning = True

    def connectionMade(self) -> None:
        # Kept here: Twisted clears transport.pid once the child is reaped, which for a
        # command that ends at once can happen before spawnProcess has even returned.
        assert self.transport is not None
        self.pid = self.transport.pid

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.releaseDirectory()
        # TODO(integrator): the shared exitCodeOf of system/processes.py.
        # ProcessDone carries 0; ProcessTerminated the status, or None after a signal.
        exitCode = getattr(reason.value, "exitCode", None)
        if self.spawning:
            # Reaped inside spawnProcess (it ended at once, on a busy machine): report it once
            # the launch is complete, so that it comes after the launch's own events.
            self.clock.callLater(0, self._report, exitCode)
        else:
            self._report(exitCode)

    def releaseDirectory(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            directory.close()

    def _report(self, exitCode: int | None) -> None:
        onExit, self.onExit = self.onExit, None
        if onExit is not None:
            onExit(exitCode)


class ChildProcess:
    """A runner this agent spawned: the reactor reaps it and reports its exit."""

    def __init__(
        self, reactor: Any, pid: int, startTicks: int | None, protocol: RunnerProtocol
    ) -> None:
        self.reactor = reactor
        self.pid = pid
        self.startTicks = startTicks
        self.protocol = protocol
        self.unit: UnitGroup = SessionUnit(pid, startTicks)

    def signal(self, signum: int) -> bool:
        signalled = self.unit.kill(signum)
        if signalled or self.protocol.exited:
            return signalled
        # Not reaped, yet not found: the child has not reached setsid() (a stop right after
        # a start). It is alone, so signal it; then the group, in case setsid() just happened.
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        signalGroup(self.pid, signum)
        return True

    def watchUnit(self, onEmpty: Callable[[], None]) -> Watch:
        return UnitWatch(self.reactor, self.unit, onEmpty)

    def release(self) -> None:
        self.protocol.onExit = None


@implementer(IReadDescriptor)
class AdoptedProcess:
    """A runner started by an earlier agent: not our child, so watched by a pidfd.

    A pidfd becomes readable when its process exits (Linux 5.3+); registered as a reader, the
    exit is an event like a child's. The exit code comes from the runner's ``NAME.status``.
    The unit is found from the recorded pid and start time (L{SessionUnit}), so a reused pid
    is never signalled.
    """

    def __init__(
        self,
        reactor: Any,
        pid: int,
        startTicks: int | None,
        exitStatus: Callable[[], Deferred[int | None]],
    ) -> None:
        self.reactor = reactor
        self.pid = pid
        self.startTicks = startTicks
        self.unit: UnitGroup = SessionUnit(pid, startTicks)
        self._exitStatus = exitStatus
        self._onExit: Callable[[int | None], None] | None = None
        self._pidfd: int | None = None
        self._poll: IDelayedCall | None = None

    def watch(self, onExit: Callable[[int | None], None]) -> None:
        self._onExit = onExit
        try:
            pidfd = openPidfd(self.pid)
        except NotImplementedError:
            self._schedulePoll()
            return
        if pidfd is None:
            self._exited()
            return
        # Opened after the check at adoption: make sure the pid was not reused in between.
        if not self.alive():
            os.close(pidfd)
            self._exited()
            return
        self._pidfd = pidfd
        self.reactor.addReader(self)

    def alive(self) -> bool:
        return sameProcessAlive(self.pid, self.startTicks)

    def _schedulePoll(self) -> None:
        self._poll = self.reactor.callLater(POLL_INTERVAL, self._pollOnce)

    def _pollOnce(self) -> None:
        self._poll = None
        if self.alive():
            self._schedulePoll()
        else:
            self._exited()

    def fileno(self) -> int:
        return -1 if self._pidfd is None else self._pidfd

    def doRead(self) -> None:
        self._unwatch()
        self._exited()

    def connectionLost(self, reason: Failure) -> None:
        self._unwatch()

    def logPrefix(self) -> str:
        return f"service-pid-{self.pid}"

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            self.reactor.removeReader(self)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None

    def _exited(self) -> None:
        def report(exitCode: int | None) -> None:
            onExit, self._onExit = self._onExit, None
            if onExit is not None:
                onExit(exitCode)

        self._exitStatus().addCallback(report)

    def signal(self, signum: int) -> bool:
        members = self.unit.members()
        for pid in members:
            _signalMember(pid, signum)
        return bool(members)

    def watchUnit(self, onEmpty: Callable[[], None]) -> Watch:
        return UnitWatch(self.reactor, self.unit, onEmpty)

    def release(self) -> None:
        self._onExit = None
        self._unwatch()


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
    "AdoptedProcess",
    "ChildProcess",
    "RunnerProtocol",
    "ServiceProcess",
    "SessionUnit",
    "UnitGroup",
    "UnitWatch",
    "processStat",
    "sameProcessAlive",
    "sweep",
]

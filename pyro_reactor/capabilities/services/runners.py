"""A service's runner: the process the machine watches, spawned here or by an earlier agent.

The runner (``NAME.runner.sh``) is spawned as the leader of a new session and process group
(``pid == pgid == sid``). Its exit is an event: our own child is reaped by the reactor
(L{ChildProcess}); a runner re-adopted from an earlier agent is watched through a pidfd
registered with the reactor (L{AdoptedProcess}; polled where the kernel has no pidfds).
Both signal, and watch the end of, the whole unit of the service (L{units}): its cgroup
where the guest has cgroup v2 (the runner is spawned inside it, see
L{pyro_reactor.system.unitcgroups.UnitCgroups}; the cgroup outlives the agent with the
service, and its path is kept in the record for the next agent), else its session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities.services.units import (
    SessionUnit,
    UnitGroup,
    UnitWatch,
    Watch,
    openPidfd,
    sameProcessAlive,
)
from pyro_reactor.system.processes import processEndOf, signalGroup
from pyro_reactor.system.workspace import WorkingDirectory

#: Seconds between two liveness checks of a re-adopted process when there is no pidfd.
POLL_INTERVAL = 0.5


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
        # A runner killed by a signal has no exit status: the record keeps no code then.
        exitCode = processEndOf(reason).exitCode
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
        self,
        reactor: Any,
        pid: int,
        startTicks: int | None,
        protocol: RunnerProtocol,
        unit: UnitGroup | None = None,
    ) -> None:
        self.reactor = reactor
        self.pid = pid
        self.startTicks = startTicks
        self.protocol = protocol
        #: Its cgroup where it has one, else found through /proc.
        self.unit: UnitGroup = SessionUnit(pid, startTicks) if unit is None else unit

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
    The unit is the cgroup recorded with it (``cgroup_path``) where it is still there, else it
    is found from the recorded pid and start time (L{SessionUnit}), so a reused pid is never
    signalled.
    """

    def __init__(
        self,
        reactor: Any,
        pid: int,
        startTicks: int | None,
        exitStatus: Callable[[], Deferred[int | None]],
        unit: UnitGroup | None = None,
    ) -> None:
        self.reactor = reactor
        self.pid = pid
        self.startTicks = startTicks
        self.unit: UnitGroup = SessionUnit(pid, startTicks) if unit is None else unit
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
        return self.unit.kill(signum)

    def watchUnit(self, onEmpty: Callable[[], None]) -> Watch:
        return UnitWatch(self.reactor, self.unit, onEmpty)

    def release(self) -> None:
        self._onExit = None
        self._unwatch()


__all__ = ["AdoptedProcess", "ChildProcess", "RunnerProtocol", "ServiceProcess"]

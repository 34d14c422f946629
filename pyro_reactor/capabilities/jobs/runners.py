"""The runner's process side: the runner spawned as our child, or watched after a restart.

Each job's command runs under a runner (``_runner.py``), a small program that outlives the
agent: it records the exit status and kills what the command left behind. While this agent is
the one that started it, the runner is our child (L{_RunnerProtocol}: its pid report, its exit,
the job's stdin); a runner started by an earlier agent is watched through a pidfd registered
with the reactor (L{PidWatch}; polled where the kernel has no pidfds).
"""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities.jobs.follow import POLL_INTERVAL
from pyro_reactor.system.workspace import WorkingDirectory

if TYPE_CHECKING:
    from pyro_reactor.capabilities.jobs.job import Job

RUNNER = Path(__file__).with_name("_runner.py")
#: Runners starting at once. Each is a Python interpreter starting (tens of ms of CPU): 200 at
#: once took the two cores from the agent for a second (a ping waited 0.9-1.8 s); the rest
#: wait their turn, and only their start_job answers wait with them.
LAUNCHING_RUNNERS = 4
#: Signal numbers and their names without ``SIG`` ("TERM"), for the runner (which does not
#: import ``signal``: see its docstring).
SIGNAL_NAMES = {number.value: number.name[3:] for number in _signal.Signals}


def processStartTicks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class _RunnerProtocol(ProcessProtocol):
    """The runner as our child: its pid report (fd 4), its exit, the job's stdin (fd 0)."""

    def __init__(self, job: Job, directory: WorkingDirectory, spec: bytes) -> None:
        self.job = job
        self.directory: WorkingDirectory | None = directory
        self.spec = spec
        self.report = b""
        self.exited = False
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.writeToChild(3, self.spec)
        self.transport.closeChildFD(3)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 4:
            return
        self.report += data
        if b"\n" in self.report:
            line = self.report.split(b"\n", 1)[0]
            self.releaseDirectory()
            try:
                pid = int(line)
            except ValueError:
                return
            self.job.machine._started(pid)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            # The job closed its stdin (or ended): what it was sent and never read is dropped.
            self.job.stdinGone()

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.releaseDirectory()
        self.job.stdinGone()
        self.job.runner = None
        # Queued, not called: runners reaped together (one SIGCHLD) are handled a few at a
        # time, with the reactor's other connections served in between.
        self.job.jobs.slices.run(self, self.job.machine._runnerExited)

    def releaseDirectory(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            directory.close()


@implementer(IReadDescriptor)
class PidWatch:
    """A runner started by an earlier agent, watched through a pidfd (or polled)."""

    def __init__(self, reactor: Any, pid: int, ticks: int | None, onExit: Callable[[], None]):
        self.reactor = reactor
        self.pid = pid
        self.ticks = ticks
        self.onExit: Callable[[], None] | None = onExit
        self.pidfd: int | None = None
        self.poll: IDelayedCall | None = None

    def alive(self) -> bool:
        ticks = processStartTicks(self.pid)
        return ticks is not None and (self.ticks is None or ticks == self.ticks)

    def start(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        if not self.alive():
            self._ended()
        elif self.pidfd is not None:
            self.reactor.addReader(self)
        else:
            self.poll = self.reactor.callLater(POLL_INTERVAL, self._check)

    def _check(self) -> None:
        self.poll = None
        if self.alive():
            self.poll = self.reactor.callLater(POLL_INTERVAL, self._check)
        else:
            self._ended()

    def fileno(self) -> int:
        return -1 if self.pidfd is None else self.pidfd

    def doRead(self) -> None:
        self._ended()

    def connectionLost(self, reason: Failure) -> None:
        self.stop()

    def logPrefix(self) -> str:
        return f"job-runner-{self.pid}"

    def stop(self) -> None:
        if self.pidfd is not None:
            self.reactor.removeReader(self)
            os.close(self.pidfd)
            self.pidfd = None
        if self.poll is not None and self.poll.active():
            self.poll.cancel()
        self.poll = None

    def _ended(self) -> None:
        self.stop()
        onExit, self.onExit = self.onExit, None
        if onExit is not None:
            onExit()


__all__ = ["LAUNCHING_RUNNERS", "RUNNER", "SIGNAL_NAMES", "PidWatch", "processStartTicks"]

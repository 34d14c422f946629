"""L{runCommand}, the one way the agent runs a shell command to its end, and its process protocol.

``runCommand`` runs ``/bin/sh -lc COMMAND`` as the leader of a new process group (see
L{pyro_reactor.system.processes.spawnInGroup}) and collects its output:

- Output is decoded incrementally as UTF-8 with replacement characters (a character split
  across two reads stays whole; invalid bytes become U+FFFD), and bytes are kept as they are
  (``\\r`` stays ``\\r``). Each stream keeps at most ``maxOutputBytes`` bytes of JSON text (as
  the answer writes it); the rest is read and dropped, so the child never blocks on a full pipe,
  and the result says it was truncated.
- The answer comes when the shell has exited and its pipes are closed. A background child that
  keeps a pipe open (``sleep 30 & echo hi``) does not hold it: once the shell has exited, the
  pipes are closed after L{PIPE_GRACE} seconds and the answer carries what was read so far.
  Such a child is left running, as it would be in a terminal.
- On timeout the whole process group gets SIGTERM, then SIGKILL after L{KILL_GRACE} seconds
  if anything of it is left; so does every descendant of the shell found in ``/proc`` (one
  that left the group with ``setsid``, say: see L{pyro_reactor.system.processes.ProcessTree}
  for what can still escape without cgroups). The answer comes once the shell has ended and
  nothing alive is left of it (so at most ``KILL_GRACE`` after the timeout, plus the pipe
  grace).

One ``_CommandProtocol`` per command; it is a small process protocol with two timers rather than
an automat machine: it has no public inputs, only the process's own events, and one outcome.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, MutableMapping, MutableSet
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from pyro_reactor.capabilities.execute.environment import SHELL, _devNull, _spawnEnvironment
from pyro_reactor.capabilities.execute.result import CommandResult, _Capture, _reserve
from pyro_reactor.capabilities.execute.units import KILL_GRACE, Unit
from pyro_reactor.errors import ActionError
from pyro_reactor.system.cgroups import Cgroup
from pyro_reactor.system.processes import ProcessTree, exitCodeOf, spawnInGroup
from pyro_reactor.system.unitcgroups import CgroupUnit, UnitCgroups
from pyro_reactor.wire.budget import MemoryBudget

#: How long after the shell has exited its pipes stay open for output still in flight.
PIPE_GRACE = 0.15


class _CommandProtocol(ProcessProtocol):
    """Collects one command's output and answers once the shell is gone (see module doc)."""

    transport: IProcessTransport | None

    def __init__(
        self,
        clock: Any,
        timeoutSeconds: float,
        maxOutputBytes: int,
        now: Callable[[], float],
        unitOf: Callable[[int], Unit] = ProcessTree,
        *,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._clock = clock
        self._unitOf = unitOf
        self._unit: Unit | None = None
        self._timeoutSeconds = timeoutSeconds
        self._now = now
        self._started = now()
        self._stdout = _Capture(maxOutputBytes, _reserve(budget, "exec stdout"))
        self._stderr = _Capture(maxOutputBytes, _reserve(budget, "exec stderr"))
        #: The child's pid and process group id, kept after Twisted forgets it.
        self.pgid: int | None = None
        self._exitCode: int | None = None
        self._ended = False
        self._timedOut = False
        self._timeout: IDelayedCall | None = None
        self._pipeGrace: IDelayedCall | None = None
        self._killer: IDelayedCall | None = None
        #: Called once, when the shell has exited (its working directory can be let go).
        self.onExited: Callable[[], object] | None = None
        self.done: Deferred[CommandResult] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pgid = self.transport.pid
        self._timeout = self._clock.callLater(max(0.0, self._timeoutSeconds), self._timeUp)

    def outReceived(self, data: bytes) -> None:
        self._stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr.feed(data)

    def _reportExit(self) -> None:
        onExited, self.onExited = self.onExited, None
        if onExited is not None:
            onExited()

    def processExited(self, reason: Failure) -> None:
        self._reportExit()
        self._exitCode = exitCodeOf(reason)
        self._timeout = _cancel(self._timeout)
        if not self._ended:
            self._pipeGrace = self._clock.callLater(PIPE_GRACE, self._closePipes)

    def processEnded(self, reason: Failure) -> None:
        self._reportExit()
        self._ended = True
        if self._exitCode is None:
            self._exitCode = exitCodeOf(reason)
        self._timeout = _cancel(self._timeout)
        self._pipeGrace = _cancel(self._pipeGrace)
        if self._killer is not None and self._unit is not None and not self._unit.alive():
            # Everything went with the SIGTERM: no need to wait for the SIGKILL.
            self._killer = _cancel(self._killer)
        self._maybeFinish()

    def _timeUp(self) -> None:
        self._timeout = None
        self._timedOut = True
        if self.pgid is None:
            return
        # Made now, not at the spawn (a /proc read off the hot path): the shell has not been
        # reaped yet, so its pid still names it.
        self._unit = self._unitOf(self.pgid)
        if self._unit.signal(signal.SIGTERM):
            self._killer = self._clock.callLater(KILL_GRACE, self._kill)

    def _kill(self) -> None:
        self._killer = None
        if self._unit is not None:
            self._unit.signal(signal.SIGKILL)
        self._maybeFinish()

    def _closePipes(self) -> None:
        self._pipeGrace = None
        if self.transport is not None:
            self.transport.loseConnection()

    def _maybeFinish(self) -> None:
        if not self._ended or self._killer is not None or self.done.called:
            return
        assert self._exitCode is not None
        result = CommandResult(
            stdout=self._stdout.text(),
            stderr=self._stderr.text(),
            exitCode=self._exitCode,
            durationMs=int((self._now() - self._started) * 1000),
            timedOut=self._timedOut,
            timeoutSeconds=self._timeoutSeconds,
            stdoutTruncated=self._stdout.truncated,
            stderrTruncated=self._stderr.truncated,
            holds=tuple(c.hold for c in (self._stdout, self._stderr) if c.hold is not None),
        )
        self.done.callback(result)


def _cancel(call: IDelayedCall | None) -> IDelayedCall | None:
    """Cancel C{call} if it is pending; returns C{None} to clear the caller's reference."""
    if call is not None and call.active():
        call.cancel()
    return None


def runCommand(
    reactor: Any,
    command: str,
    *,
    timeoutSeconds: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    maxOutputBytes: int,
    now: Callable[[], float] = time.monotonic,
    running: MutableSet[int] | None = None,
    onExited: Callable[[], object] | None = None,
    unitOf: Callable[[int], Unit] = ProcessTree,
    budget: MemoryBudget | None = None,
    cgroups: UnitCgroups | None = None,
    keepBackground: bool = True,
    units: MutableMapping[int, Unit] | None = None,
) -> Deferred[CommandResult]:
    """Run C{/bin/sh -lc command} in a new process group and collect its result.

    The child gets the agent's environment with C{env} applied on top (as the reference does
    for exec, services and command probes), runs in C{cwd} (default: the agent's own working
    directory) with an empty stdin. A timed-out command is not a failure: its result has
    ``timedOut`` set. The Deferred fails with L{ActionError} only if the shell cannot be
    started (a missing C{cwd}, say). It cannot be cancelled: a command runs to its end or
    its timeout. C{running}, if given, holds the command's process group id while it runs
    (L{RunningCommands} uses it to end what is left when the agent stops). C{onExited}, if
    given, is called once the shell process has exited, or at once if it could not be
    started, even when the returned Deferred was cancelled: what keeps C{cwd} valid (an open
    L{pyro_reactor.system.workspace.WorkingDirectory}) is let go there. C{unitOf} makes, from
    the shell's pid, what a timeout ends (default: its L{ProcessTree}).

    With C{cgroups} (L{unitCgroups}), the command runs in a cgroup of its own, which is what a
    timeout ends instead (``cgroup.kill``: nothing escapes); once the command has ended, its
    cgroup is removed as soon as it is empty. C{keepBackground} (exec) lets background
    children of a command that ended by itself run on (their cgroup stays until they end);
    without it (command probes) they are killed with the cgroup when the shell has ended.
    C{units}, if given, holds the command's cgroup unit by process group id while it runs.
    With a C{budget}, the output kept is drawn from it while the command runs.
    """
    protocol = _CommandProtocol(reactor, timeoutSeconds, maxOutputBytes, now, unitOf, budget=budget)
    protocol.onExited = onExited
    kind = "exec" if keepBackground else "probe"
    cgroup = None if cgroups is None else cgroups.create(kind, reuse=True)

    def spawn() -> None:
        spawnInGroup(
            reactor,
            protocol,
            [SHELL, "-lc", command],
            _spawnEnvironment(env),
            cwd=cwd,
            childFDs={0: _devNull(), 1: "r", 2: "r"},
        )

    inside = False
    try:
        if cgroups is not None and cgroup is not None:
            _, inside = cgroups.spawnIn(cgroup, spawn)
        else:
            spawn()
    except OSError as error:
        protocol._reportExit()
        if cgroups is not None and cgroup is not None:
            cgroups.release(cgroup)
        return fail(ActionError(f"cannot start {SHELL}: {error.strerror or error}"))
    except BaseException:
        protocol._reportExit()
        if cgroups is not None and cgroup is not None:
            cgroups.release(cgroup)
        raise
    if cgroups is not None and cgroup is not None:
        if inside:
            _endWithCgroup(reactor, protocol, cgroups, cgroup, keepBackground, units)
        else:
            cgroups.release(cgroup, reuse=kind)
    # Not transport.pid: Twisted clears it once the child is reaped, which on a busy machine
    # can happen before spawnInGroup returns. The protocol kept it when it was connected.
    pgid = protocol.pgid
    if running is not None and pgid is not None and not protocol.done.called:
        running.add(pgid)

        def finished(result: CommandResult) -> CommandResult:
            running.discard(pgid)
            return result

        protocol.done.addCallback(finished)
    return protocol.done


def _endWithCgroup(  # noqa: PLR0917
    reactor: Any,
    protocol: _CommandProtocol,
    cgroups: UnitCgroups,
    cgroup: Cgroup,
    keepBackground: bool,
    units: MutableMapping[int, Unit] | None,
) -> None:
    """The command's cgroup is its unit: a timeout kills it; its end releases it."""
    unit = CgroupUnit(cgroup)
    protocol._unitOf = lambda pid: unit
    pgid = protocol.pgid
    if units is not None and pgid is not None:
        units[pgid] = unit

    def ended(result: CommandResult) -> CommandResult | Deferred[CommandResult]:
        if units is not None and pgid is not None:
            units.pop(pgid, None)
        if result.timedOut or not keepBackground:
            # Answered once nothing of it is left (a few ms after the kill).
            unit.signal(signal.SIGKILL)
            return cgroups.removeWhenEmpty(cgroup, reactor).addCallback(lambda _: result)
        cgroups.release(cgroup, reuse="exec")
        return result

    protocol.done.addCallback(ended)

"""Background services: one automat machine per service, their on-disk records, and re-adoption.

``start_service`` runs a command in the background, in a session (process group) of its own,
and answers once the service is ready (its readiness probe passed, or at once without one) or
has failed; ``status_service``, ``logs_service``, ``stop_service`` and ``list_services``
report on it and end it. Every request is served while others wait: a 20 s readiness wait
holds only its own answer.

The on-disk layout is the reference's contract, under ``config.serviceRoot``:

  - ``NAME.json``: the record (``service_name``, ``command``, ``cwd``, ``state``,
    ``started_at``, ``readiness``, ``ready_at``, ``ended_at``, ``exit_code``, ``pid``,
    ``stop_reason``), written ``sort_keys=True, indent=2``, atomically (temporary file and
    rename) from a worker thread. We add ``pid_start_ticks`` (the process's start time from
    ``/proc/PID/stat``), which answers do not show: it tells a re-adopted pid from a reused one;
  - ``NAME.stdout`` / ``NAME.stderr``: the command's output, appended by the runner;
  - ``NAME.runner.sh``: ``/bin/sh`` script that runs ``/bin/sh -lc COMMAND``, then writes its
    exit status to ``NAME.status``. The runner records the status itself, so a service that
    ends while no agent watches it still leaves its exit code. Unlike the reference's, it does
    not ``cd`` to the working directory by name: the agent starts it in the very directory it
    checked, held open until the runner exits (L{WorkingDirectory}), so that a directory
    swapped for a symlink meanwhile cannot start the service outside the workspace.

The runner is the process the agent spawns (``pid``) and the leader of the service's process
group. It deliberately traps no signal: a shell's trap handler is inherited by the children it
forks until they exec, and a SIGTERM landing in that window is swallowed (measured: about 7%
of stops within 3 ms of a start hung until the SIGKILL). So a stop's SIGTERM ends the runner
at once, and the stop ends when nothing of the *group* is left (L{GroupWatch}), not when the
runner exits: a command that ignores SIGTERM is still there, and gets the SIGKILL.

The lifecycle (see docs/services.md for the diagram) is L{ServiceMachine}: ``starting`` while
the probe polls, ``running`` once ready, ``stopping`` (SIGTERM sent to the group) then
``killing`` (SIGKILL after L{STOP_GRACE} seconds), ``abandoning`` / ``abandoningKilled`` for a
readiness timeout, and the terminal ``failed``, ``exited``, ``stopped``, plus ``detached`` for
machines the agent let go of when it stopped (the processes keep running). The runner's exit
is an event (``_exited``): our own children are reaped by the reactor the moment they exit;
a process re-adopted from an earlier agent is watched through a pidfd registered with the
reactor (polled where the kernel has no ``pidfd_open``).

Services outlive the agent. Nothing is stopped when the agent stops; a new agent reads every
record at start-up (L{Services.startService}, synchronously, before any request is served, so
that no name can be started twice) and takes each service back: a live one is watched again,
one that ended meanwhile becomes ``exited`` with the code from ``NAME.status``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities import probes
from pyro_reactor.capabilities.execute import commandEnvironment
from pyro_reactor.capabilities.probes import Probe, ProbeCore, parseReadiness
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.processes import groupAlive, signalGroup, spawnInSession
from pyro_reactor.system.workspace import WorkingDirectory
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request

log = Logger(namespace="pyro_reactor.capabilities.services")

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Seconds between SIGTERM and SIGKILL when a service is stopped.
STOP_GRACE = 5.0
#: Seconds between two liveness checks of a re-adopted process when there is no pidfd.
POLL_INTERVAL = 0.5
#: First and longest wait between two checks that a stopping service's group is gone.
DRAIN_FIRST = 0.01
DRAIN_LONGEST = 0.2
#: Block size of the backwards read of a log tail.
TAIL_BLOCK = 64 * 1024

DEFAULT_READY_TIMEOUT = 30
DEFAULT_READY_INTERVAL_MS = 500

#: Record fields kept on disk but not shown in answers.
PRIVATE_FIELDS = frozenset({"pid_start_ticks"})


def normalizeServiceName(text: str) -> str:
    """A request's ``service_name``, checked with the reference's rule and messages."""
    name = text.strip()
    if name == "":
        raise ActionError("service_name is required")
    if SERVICE_NAME_RE.fullmatch(name) is None:
        raise ActionError("service_name is invalid")
    return name


# -- files -----------------------------------------------------------------------------------


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


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def runnerScript(files: ServiceFiles, command: str) -> str:
    """The text of ``NAME.runner.sh`` (it runs where it is started: no ``cd`` by name)."""
    return "\n".join(
        [
            "#!/bin/sh",
            f"# pyro service {files.name}: runs its command, then records its exit status.",
            f"/bin/sh -lc {_quote(command)} >> {_quote(str(files.stdout))}"
            f" 2>> {_quote(str(files.stderr))}",
            "status=$?",
            f"printf '%s' \"$status\" > {_quote(str(files.status))}",
            'exit "$status"',
            "",
        ]
    )


def prepareFiles(files: ServiceFiles, runner: str) -> None:
    """Empty the logs, forget the old status and write the runner (blocking)."""
    files.root.mkdir(parents=True, exist_ok=True)
    for log_ in (files.stdout, files.stderr):
        with log_.open("wb"):
            pass
    files.status.unlink(missing_ok=True)
    temporary = files.root / f".{files.name}.runner.sh.tmp"
    temporary.write_text(runner, encoding="utf-8")
    temporary.chmod(0o700)
    os.replace(temporary, files.runner)


def encodeRecord(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), indent=2, sort_keys=True)


def writeRecord(files: ServiceFiles, text: str) -> None:
    """Replace ``NAME.json`` atomically (blocking)."""
    temporary = files.root / f".{files.name}.json.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, files.record)


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


def tailText(path: Path, tailLines: int | None, maxBytes: int) -> tuple[str, bool]:
    """The last C{tailLines} lines of a log (all of it for ``None``), and whether more exist.

    Lines are counted as ``str.splitlines`` counts them, as the reference does. Only the end of
    the file is read, backwards in blocks, and never more than C{maxBytes} bytes: a longer
    answer is cut at the start (and flagged truncated) rather than read into memory.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return "", False
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if tailLines is not None and tailLines <= 0:
            return "", size > 0
        if tailLines is None:
            if size <= maxBytes:
                return handle.read(size).decode("utf-8", "replace"), False
            handle.seek(size - maxBytes)
            data = handle.read(maxBytes)
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
            handle.seek(position)
            block = handle.read(step)
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


def processStat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks after boot), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def sameProcessAlive(pid: int, startTicks: int | None) -> bool:
    """Whether C{pid} is still the process that was recorded, and not a zombie."""
    stat = processStat(pid)
    if stat is None:
        return False
    state, ticks = stat
    if state in ("Z", "X", "x"):
        return False
    return startTicks is None or ticks == startTicks


class RecordWriter:
    """Writes one service's record in a worker thread; the latest record always wins.

    Writes never overlap and never reorder: while one is in flight, only the newest record
    waiting is written next.
    """

    def __init__(self, files: ServiceFiles, inThread: Callable[..., Deferred[Any]]) -> None:
        self._files = files
        self._inThread = inThread
        self._pending: str | None = None
        self._waiters: list[Deferred[None]] = []
        self._busy = False

    def save(self, record: Mapping[str, Any]) -> Deferred[None]:
        self._pending = encodeRecord(record)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if not self._busy:
            self._flush()
        return waiter

    def _flush(self) -> None:
        text, self._pending = self._pending, None
        waiters, self._waiters = self._waiters, []
        assert text is not None
        self._busy = True

        def written(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                log.failure(
                    "cannot write the record of service {service}",
                    result,
                    service=self._files.name,
                )
            for waiter in waiters:
                waiter.callback(None)
            if self._pending is not None:
                self._flush()

        self._inThread(writeRecord, self._files, text).addBoth(written)


# -- processes -------------------------------------------------------------------------------


class ServiceProcess(Protocol):
    """A service's process (the runner, leader of the service's process group)."""

    pid: int
    startTicks: int | None

    def signal(self, signum: int) -> bool:
        "Signal the process's group; False if it is gone."

    def groupAlive(self) -> bool:
        "Whether anything of the process group is still running."

    def release(self) -> None:
        "Stop reporting the exit (the agent is stopping); the process keeps running."


class _ChildProtocol(ProcessProtocol):
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


@dataclass
class ChildProcess:
    """A service process this agent spawned: the reactor reaps it and reports its exit."""

    pid: int
    startTicks: int | None
    protocol: _ChildProtocol

    def signal(self, signum: int) -> bool:
        if signalGroup(self.pid, signum):
            return True
        if self.protocol.exited:
            return False
        # Not reaped, yet no group: the child has not reached setsid() (a stop right after a
        # start). It is alone, so signal it; then the group, in case setsid() just happened.
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        signalGroup(self.pid, signum)
        return True

    def groupAlive(self) -> bool:
        return not self.protocol.exited or groupAlive(self.pid)

    def release(self) -> None:
        self.protocol.onExit = None


@implementer(IReadDescriptor)
class AdoptedProcess:
    """A service process started by an earlier agent: not our child, so watched by a pidfd.

    A pidfd becomes readable when its process exits (Linux 5.3+); registered as a reader, the
    exit is an event like a child's. The exit code comes from the runner's ``NAME.status``.
    Every signal first checks that the pid is still the recorded process (same start time).
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
        self._exitStatus = exitStatus
        self._onExit: Callable[[int | None], None] | None = None
        self._pidfd: int | None = None
        self._poll: IDelayedCall | None = None
        self._exitSeen = False

    def watch(self, onExit: Callable[[int | None], None]) -> None:
        self._onExit = onExit
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._exited()
            return
        except (AttributeError, OSError) as error:
            if isinstance(error, OSError) and error.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            self._schedulePoll()
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
        self._exitSeen = True

        def report(exitCode: int | None) -> None:
            onExit, self._onExit = self._onExit, None
            if onExit is not None:
                onExit(exitCode)

        self._exitStatus().addCallback(report)

    def signal(self, signum: int) -> bool:
        # The recorded process itself, or its group once we have seen it exit (a group id
        # is not reused while the group has members).
        if not (self.alive() or self._exitSeen):
            return False
        return signalGroup(self.pid, signum)

    def groupAlive(self) -> bool:
        return groupAlive(self.pid) if (self.alive() or self._exitSeen) else False

    def release(self) -> None:
        self._onExit = None
        self._unwatch()


# -- the service machine ---------------------------------------------------------------------


class ServiceInputs(Protocol):
    """The inputs of a service machine."""

    def start(self) -> None:
        "Spawn the process and wait for readiness."

    def stop(self) -> None:
        "SIGTERM the group, SIGKILL it after the grace; ends in stopped (or failed)."

    def detach(self) -> None:
        "The agent is stopping: stop watching, leave the process running."

    def _ready(self) -> None:
        "The readiness probe passed (or there is none)."

    def _unready(self) -> None:
        "The readiness probe reached its deadline."

    def _exited(self, exitCode: int | None) -> None:
        "The runner ended (C{exitCode} is None after a signal or when nobody recorded it)."

    def _graceOver(self) -> None:
        "The SIGTERM grace is over."

    def _drained(self) -> None:
        "Nothing of the process group is left (while stopping)."


ProbeFactory = Callable[[Callable[[], None], Callable[[], None]], Probe]


@dataclass
class ServiceCore:
    """What a service machine needs from the world, and the record it keeps up to date.

    ``launch(onExit)`` spawns the process; ``makeProbe(onReady, onTimeout)`` builds the
    readiness probe (``None``: ready at once); ``save(record)`` persists the record.
    """

    clock: IReactorTime
    record: dict[str, Any]
    launch: Callable[[Callable[[int | None], None]], ServiceProcess]
    makeProbe: ProbeFactory | None
    save: Callable[[dict[str, Any]], Deferred[None]]
    now: Callable[[], float] = time.time
    stopGrace: float = STOP_GRACE
    process: ServiceProcess | None = None
    exitCode: int | None = None
    graceTimer: IDelayedCall | None = None
    settled: bool = False
    ended: bool = False
    detached: bool = False
    _settleWaiters: list[Deferred[dict[str, Any]]] = field(default_factory=list)
    _endWaiters: list[Deferred[dict[str, Any]]] = field(default_factory=list)
    _savesInFlight: int = 0
    _savedWaiters: list[Deferred[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.record.get("service_name"))

    def snapshot(self) -> dict[str, Any]:
        """The record as answers show it."""
        return {key: value for key, value in self.record.items() if key not in PRIVATE_FIELDS}

    def publish(self, **changes: Any) -> None:
        self.record.update(changes)
        self._savesInFlight += 1
        self.save(dict(self.record)).addBoth(self._saved)

    def _saved(self, result: object) -> None:
        self._savesInFlight -= 1
        if self._savesInFlight == 0:
            waiters, self._savedWaiters = self._savedWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _whenSaved(self) -> Deferred[None]:
        if self._savesInFlight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._savedWaiters.append(waiter)
        return waiter

    def _answer(self) -> Deferred[dict[str, Any]]:
        return self._whenSaved().addCallback(lambda _: self.snapshot())

    def whenSettled(self) -> Deferred[dict[str, Any]]:
        """Fires with the record once the service is ready or has ended."""
        if self.detached:
            return fail(ActionError("the agent is stopping"))
        if self.settled:
            return self._answer()
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._settleWaiters.append(waiter)
        return waiter

    def whenEnded(self) -> Deferred[dict[str, Any]]:
        """Fires with the record once the service has ended."""
        if self.detached:
            return fail(ActionError("the agent is stopping"))
        if self.ended:
            return self._answer()
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._endWaiters.append(waiter)
        return waiter

    def settle(self) -> None:
        self.settled = True
        waiters, self._settleWaiters = self._settleWaiters, []
        for waiter in waiters:
            self._answer().chainDeferred(waiter)

    def finish(self, **changes: Any) -> None:
        """Record the end of the service and answer everyone waiting for it."""
        self.publish(ended_at=self.now(), **changes)
        self.ended = True
        self.settle()
        waiters, self._endWaiters = self._endWaiters, []
        for waiter in waiters:
            self._answer().chainDeferred(waiter)
        log.info(
            "service {service} ended: {state} ({reason}, exit code {exitCode})",
            service=self.name,
            state=self.record.get("state"),
            reason=self.record.get("stop_reason"),
            exitCode=self.record.get("exit_code"),
        )

    def markEnded(self) -> None:
        """For a machine created in a terminal state."""
        self.settled = self.ended = True

    def signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.signal(signum)

    def cancelGrace(self) -> None:
        if self.graceTimer is not None and self.graceTimer.active():
            self.graceTimer.cancel()
        self.graceTimer = None

    def letGo(self) -> None:
        self.detached = True
        self.cancelGrace()
        if self.process is not None:
            self.process.release()
        waiters = self._settleWaiters + self._endWaiters
        self._settleWaiters, self._endWaiters = [], []
        for waiter in waiters:
            waiter.errback(ActionError("the agent is stopping"))


@dataclass
class Launched:
    """The data of ``starting``: the readiness probe, if there is one."""

    probe: Probe | None

    def stopProbe(self) -> None:
        if self.probe is not None:
            self.probe.stop()


class GroupWatch:
    """Checks a stopping service's process group until nothing of it is left.

    The runner's own exit is not the end of a stop: a command that ignores SIGTERM outlives
    its runner, so the end is the group having no live member. Checked at growing intervals
    (from L{DRAIN_FIRST} to L{DRAIN_LONGEST}); a stop only lasts until the SIGKILL.
    """

    def __init__(
        self, clock: IReactorTime, alive: Callable[[], bool], onDrained: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._alive = alive
        self._onDrained = onDrained
        self._interval = DRAIN_FIRST
        self._call: IDelayedCall | None = clock.callLater(self._interval, self._check)

    def _check(self) -> None:
        if self._alive():
            self._interval = min(self._interval * 2, DRAIN_LONGEST)
            self._call = self._clock.callLater(self._interval, self._check)
            return
        self._call = None
        self._onDrained()

    def checkNow(self) -> None:
        """The runner just ended: the rest of the group is most likely gone too."""
        if self._call is not None and self._call.active():
            self._call.cancel()
            self._interval = DRAIN_FIRST / 2
            self._check()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _processGroupAlive(core: ServiceCore) -> Callable[[], bool]:
    process = core.process
    return (lambda: False) if process is None else process.groupAlive


def _launch(service: ServiceInputs, core: ServiceCore) -> Launched:
    process = core.launch(service._exited)
    core.process = process
    core.publish(
        state="running",
        pid=process.pid,
        pid_start_ticks=process.startTicks,
        started_at=core.now(),
        ready_at=None,
        ended_at=None,
        exit_code=None,
        stop_reason=None,
    )
    log.info("service {service} started as pid {pid}", service=core.name, pid=process.pid)
    if core.makeProbe is None:
        service._ready()
        return Launched(None)
    probe = core.makeProbe(service._ready, service._unready)
    probe.start()
    return Launched(probe)


def _terminate(service: ServiceInputs, core: ServiceCore) -> GroupWatch:
    core.signal(signal.SIGTERM)
    core.graceTimer = core.clock.callLater(core.stopGrace, service._graceOver)
    return GroupWatch(core.clock, _processGroupAlive(core), service._drained)


def _watchKilled(service: ServiceInputs, core: ServiceCore) -> GroupWatch:
    return GroupWatch(core.clock, _processGroupAlive(core), service._drained)


builder = TypeMachineBuilder(ServiceInputs, ServiceCore)
idle = builder.state("idle")
starting = builder.state("starting", _launch)
running = builder.state("running")
stopping = builder.state("stopping", _terminate)
killing = builder.state("killing", _watchKilled)
abandoning = builder.state("abandoning", _terminate)
abandoningKilled = builder.state("abandoningKilled", _watchKilled)
failed = builder.state("failed")
exited = builder.state("exited")
stopped = builder.state("stopped")
detached = builder.state("detached")

TERMINAL = {"failed": failed, "exited": exited, "stopped": stopped}
ENDING = (stopping, killing, abandoning, abandoningKilled)

idle.upon(ServiceInputs.start).to(starting).returns(None)


@idle.upon(ServiceInputs.stop).to(stopped)
def _stopBeforeStart(service: ServiceInputs, core: ServiceCore) -> None:
    core.finish(state="stopped")


@idle.upon(ServiceInputs.detach).to(detached)
def _detachIdle(service: ServiceInputs, core: ServiceCore) -> None:
    core.letGo()


@starting.upon(ServiceInputs._ready).to(running)
def _becomeReady(service: ServiceInputs, core: ServiceCore, launched: Launched) -> None:
    core.publish(ready_at=core.now())
    core.settle()
    log.info("service {service} is ready", service=core.name)


@starting.upon(ServiceInputs._exited).to(failed)
def _exitBeforeReady(
    service: ServiceInputs, core: ServiceCore, launched: Launched, exitCode: int | None
) -> None:
    launched.stopProbe()
    core.finish(state="failed", stop_reason="process_exited_before_ready", exit_code=exitCode)


@starting.upon(ServiceInputs._unready).to(abandoning)
def _readinessTimedOut(service: ServiceInputs, core: ServiceCore, launched: Launched) -> None:
    launched.stopProbe()
    log.info("service {service} was not ready in time", service=core.name)


@starting.upon(ServiceInputs.stop).to(stopping)
def _stopWhileStarting(service: ServiceInputs, core: ServiceCore, launched: Launched) -> None:
    launched.stopProbe()


@starting.upon(ServiceInputs.detach).to(detached)
def _detachStarting(service: ServiceInputs, core: ServiceCore, launched: Launched) -> None:
    launched.stopProbe()
    core.letGo()


running.upon(ServiceInputs.stop).to(stopping).returns(None)


@running.upon(ServiceInputs._exited).to(exited)
def _exitAfterReady(service: ServiceInputs, core: ServiceCore, exitCode: int | None) -> None:
    core.finish(state="exited", exit_code=exitCode)


@running.upon(ServiceInputs.detach).to(detached)
def _detachRunning(service: ServiceInputs, core: ServiceCore) -> None:
    core.letGo()


@stopping.upon(ServiceInputs._graceOver).to(killing)
@abandoning.upon(ServiceInputs._graceOver).to(abandoningKilled)
def _kill(service: ServiceInputs, core: ServiceCore, watch: GroupWatch) -> None:
    watch.stop()
    core.graceTimer = None
    core.signal(signal.SIGKILL)


def _recordExit(
    service: ServiceInputs, core: ServiceCore, watch: GroupWatch, exitCode: int | None
) -> None:
    core.exitCode = exitCode
    watch.checkNow()


def _detachEnding(service: ServiceInputs, core: ServiceCore, watch: GroupWatch) -> None:
    watch.stop()
    core.letGo()


for _ending in ENDING:
    # The runner's exit is only noted: the stop ends when the whole group is gone.
    _ending.upon(ServiceInputs._exited).loop()(_recordExit)
    _ending.upon(ServiceInputs.detach).to(detached)(_detachEnding)


def _drainedAs(state: str, reason: str) -> Callable[[ServiceInputs, ServiceCore, GroupWatch], None]:
    def drained(service: ServiceInputs, core: ServiceCore, watch: GroupWatch) -> None:
        core.cancelGrace()
        core.finish(state=state, stop_reason=reason, exit_code=core.exitCode)

    drained.__name__ = f"ended_{state}_{reason}"
    return drained


stopping.upon(ServiceInputs._drained).to(stopped)(_drainedAs("stopped", "sigterm"))
killing.upon(ServiceInputs._drained).to(stopped)(_drainedAs("stopped", "sigkill"))
abandoning.upon(ServiceInputs._drained).to(failed)(_drainedAs("failed", "readiness_timeout"))
abandoningKilled.upon(ServiceInputs._drained).to(failed)(_drainedAs("failed", "readiness_timeout"))

# Everything else is a late or repeated event, explicitly ignored: a probe result after a stop,
# a second stop, a start of a machine already started.
_LATE = (
    ServiceInputs.start,
    ServiceInputs.stop,
    ServiceInputs.detach,
    ServiceInputs._ready,
    ServiceInputs._unready,
    ServiceInputs._exited,
    ServiceInputs._graceOver,
    ServiceInputs._drained,
)
_IGNORED: list[tuple[Any, tuple[Callable[..., None], ...]]] = [
    (idle, (ServiceInputs._ready, ServiceInputs._unready, ServiceInputs._graceOver)),
    (idle, (ServiceInputs._exited, ServiceInputs._drained)),
    (starting, (ServiceInputs.start, ServiceInputs._graceOver, ServiceInputs._drained)),
    (running, (ServiceInputs.start, ServiceInputs._ready, ServiceInputs._unready)),
    (running, (ServiceInputs._graceOver, ServiceInputs._drained)),
    (killing, (ServiceInputs._graceOver,)),
    (abandoningKilled, (ServiceInputs._graceOver,)),
    *[(state, _LATE) for state in (failed, exited, stopped, detached)],
]
for _ending in ENDING:
    _IGNORED.append((_ending, (ServiceInputs.start, ServiceInputs.stop, ServiceInputs._ready)))
    _IGNORED.append((_ending, (ServiceInputs._unready,)))
for _state, _inputs in _IGNORED:
    for _input in _inputs:
        _state.upon(_input).loop().returns(None)

ServiceMachine = builder.build()


# -- the registry and the actions ------------------------------------------------------------


@dataclass
class ServiceHandle:
    """A service the registry knows: its machine and the core holding its record."""

    machine: ServiceInputs
    core: ServiceCore
    files: ServiceFiles


class Services(Service):
    """Every service of this agent by name; serves the service actions.

    Started with the agent (a child of ``context.services``), it re-adopts the services an
    earlier agent left in the service root. Stopped with the agent, it lets them go: the
    processes keep running for the next agent.
    """

    def __init__(self, context: AgentContext, *, stopGrace: float = STOP_GRACE) -> None:
        self.context = context
        self.reactor = context.reactor
        self.root = context.config.serviceRoot
        self.workspace = context.workspace
        self.stopGrace = stopGrace
        self.handles: dict[str, ServiceHandle] = {}
        self.writers: dict[str, RecordWriter] = {}
        self.invalid: set[str] = set()

    # -- agent lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Synchronous on purpose: before the reactor serves a request, every recorded service
        # is known, so none can be started twice. A few small files on a tmpfs.
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("*.json")):
            name = path.name[: -len(".json")]
            if SERVICE_NAME_RE.fullmatch(name) is None:
                continue
            try:
                self._adopt(ServiceFiles(self.root, name))
            except Exception as error:
                self.invalid.add(name)
                log.warn(
                    "cannot take service {service} back: {error}", service=name, error=str(error)
                )

    def stopService(self) -> None:
        super().stopService()
        for handle in list(self.handles.values()):
            handle.machine.detach()

    def _adopt(self, files: ServiceFiles) -> None:
        record = json.loads(files.record.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("the record is not a JSON object")
        state = record.get("state")
        core = self._core(files, record)
        pid = record.get("pid")
        ticks = record.get("pid_start_ticks")
        if state == "running":
            if isinstance(pid, int) and sameProcessAlive(
                pid, ticks if isinstance(ticks, int) else None
            ):
                machine = ServiceMachine(core, running)
                process = AdoptedProcess(
                    self.reactor,
                    pid,
                    ticks if isinstance(ticks, int) else None,
                    lambda: self.context.inThread(readExitStatus, files),
                )
                core.process = process
                core.settled = True
                self.handles[files.name] = ServiceHandle(machine, core, files)
                process.watch(machine._exited)
                log.info("service {service} (pid {pid}) taken back", service=files.name, pid=pid)
                return
            machine = ServiceMachine(core, exited)
            core.markEnded()
            core.publish(
                state="exited",
                exit_code=readExitStatus(files),
                ended_at=record.get("ended_at") or core.now(),
            )
            self.handles[files.name] = ServiceHandle(machine, core, files)
            log.info("service {service} ended while no agent watched it", service=files.name)
            return
        if state not in TERMINAL:
            raise ValueError(f"unknown state {state!r}")
        machine = ServiceMachine(core, TERMINAL[state])
        core.markEnded()
        self.handles[files.name] = ServiceHandle(machine, core, files)

    def _core(
        self,
        files: ServiceFiles,
        record: dict[str, Any],
        launch: Callable[[Callable[[int | None], None]], ServiceProcess] | None = None,
    ) -> ServiceCore:
        # One writer per name, shared by the records that follow each other under it: a
        # late write of an ended service never lands after its successor's.
        writer = self.writers.get(files.name)
        if writer is None:
            writer = self.writers[files.name] = RecordWriter(files, self.context.inThread)

        def noLaunch(onExit: Callable[[int | None], None]) -> ServiceProcess:
            raise RuntimeError("a re-adopted service cannot be launched")

        return ServiceCore(
            clock=self.reactor,
            record=record,
            launch=launch or noLaunch,
            makeProbe=None,
            save=writer.save,
            stopGrace=self.stopGrace,
        )

    # -- actions -----------------------------------------------------------------------------

    def _lookup(self, request: Request) -> ServiceHandle:
        name = normalizeServiceName(request.string("service_name", ""))
        handle = self.handles.get(name)
        if handle is None:
            if name in self.invalid:
                raise ActionError(f"service record for {name!r} is invalid")
            raise ActionError(f"service {name!r} does not exist")
        return handle

    def startAction(self, request: Request) -> Deferred[dict[str, Any]]:
        env = commandEnvironment(request.environment("service"))
        readyTimeout = request.integer("ready_timeout_seconds", DEFAULT_READY_TIMEOUT)
        readyIntervalMs = request.integer("ready_interval_ms", DEFAULT_READY_INTERVAL_MS)
        name = normalizeServiceName(request.string("service_name", ""))
        command = request.string("command", "")
        cwdText = request.string("cwd", "/workspace")
        cwd = self.workspace.resolve(cwdText)
        if "\x00" in command:
            raise ActionError("command must not contain NUL bytes")
        previous = self.handles.get(name)
        if previous is not None and not previous.core.ended:
            raise ActionError(f"service {name!r} is already running")
        readiness = request.mapping("readiness")
        spec = None if readiness is None else parseReadiness(readiness, self.workspace)
        if readyTimeout < 0:
            raise ActionError("ready_timeout_seconds must not be negative")
        interval = max(readyIntervalMs, 1) / 1000

        files = ServiceFiles(self.root, name)
        record: dict[str, Any] = {
            "service_name": name,
            "command": command,
            "cwd": cwd.text,
            "state": "running",
            "started_at": None,
            "readiness": readiness,
            "ready_at": None,
            "ended_at": None,
            "exit_code": None,
            "pid": None,
            "stop_reason": None,
        }

        # The directory prepare() opened, until launch takes it over (at most once).
        held: list[WorkingDirectory] = []

        def launch(onExit: Callable[[int | None], None]) -> ServiceProcess:
            if not held:
                raise OSError(errno.EBADF, "the working directory is not open")
            return self._spawn(files, held.pop(), env, onExit)

        core = self._core(files, record, launch)
        if spec is not None:
            check = spec.check(
                self.reactor,
                workspace=self.workspace,
                inThread=self.context.inThread,
                cwd=cwd.text,
                env=env,
            )

            def makeProbe(onReady: Callable[[], None], onTimeout: Callable[[], None]) -> Probe:
                return probes.ProbeMachine(
                    ProbeCore(
                        clock=self.reactor,
                        check=check,
                        interval=interval,
                        timeout=float(readyTimeout),
                        onReady=onReady,
                        onTimeout=onTimeout,
                    )
                )

            core.makeProbe = makeProbe
        handle = ServiceHandle(ServiceMachine(core), core, files)
        # The name is taken from here on: a second start is refused while this one prepares.
        self.handles[name] = handle

        def prepare() -> WorkingDirectory:
            directory = self.workspace.openWorkingDirectory(cwd.text)
            try:
                prepareFiles(files, runnerScript(files, command))
            except BaseException:
                directory.close()
                raise
            return directory

        def giveBackTheName() -> None:
            if self.handles.get(name) is handle:
                if previous is None:
                    del self.handles[name]
                else:
                    self.handles[name] = previous

        def prepared(directory: WorkingDirectory) -> Deferred[dict[str, Any]]:
            held.append(directory)
            try:
                handle.machine.start()
            except OSError as error:
                giveBackTheName()
                raise ActionError(
                    f"cannot start service {name!r}: {error.strerror or error}"
                ) from None
            finally:
                # Not launched (stopped or detached while preparing, or the spawn failed).
                while held:
                    held.pop().close()
            return core.whenSettled()

        def failedToPrepare(failure: Failure) -> Failure:
            giveBackTheName()
            return failure

        prepared_: Deferred[WorkingDirectory] = self.context.inThread(prepare)
        return prepared_.addErrback(failedToPrepare).addCallback(prepared)

    def _spawn(
        self,
        files: ServiceFiles,
        directory: WorkingDirectory,
        env: Mapping[str, str],
        onExit: Callable[[int | None], None],
    ) -> ChildProcess:
        """Start the runner in C{directory}, which its protocol closes once the runner exits
        (here if it cannot be started)."""
        protocol = _ChildProtocol(self.reactor, onExit, directory)
        # The runner writes the command's output to the log files itself; its own standard
        # streams go nowhere, so the service never depends on this agent's pipes.
        null = os.open(os.devnull, os.O_RDWR)
        try:
            transport = spawnInSession(
                self.reactor,
                protocol,
                [str(files.runner)],
                env,
                cwd=directory.path,
                childFDs={0: null, 1: null, 2: null},
            )
        except BaseException:
            protocol.releaseDirectory()
            raise
        finally:
            os.close(null)
            protocol.spawning = False
        pid = protocol.pid if protocol.pid is not None else transport.pid
        assert pid is not None
        stat = processStat(pid)
        return ChildProcess(pid, None if stat is None else stat[1], protocol)

    def statusAction(self, request: Request) -> dict[str, Any]:
        return self._lookup(request).core.snapshot()

    def logsAction(self, request: Request) -> Deferred[dict[str, Any]]:
        handle = self._lookup(request)
        tailLines = request.optionalInteger("tail_lines")
        if tailLines is not None and tailLines < 0:
            raise ActionError("tail_lines must not be negative")
        answer = handle.core.snapshot()
        limit = self.context.config.maxOutputBytes

        def read() -> dict[str, Any]:
            stdout, stdoutCut = tailText(handle.files.stdout, tailLines, limit)
            stderr, stderrCut = tailText(handle.files.stderr, tailLines, limit)
            return {
                "stdout": stdout,
                "stderr": stderr,
                "tail_lines": tailLines,
                "truncated": stdoutCut or stderrCut,
            }

        def combine(tails: dict[str, Any]) -> dict[str, Any]:
            answer.update(tails)
            return answer

        tails: Deferred[dict[str, Any]] = self.context.inThread(read)
        return tails.addCallback(combine)

    def stopAction(self, request: Request) -> Deferred[dict[str, Any]]:
        handle = self._lookup(request)
        handle.machine.stop()
        return handle.core.whenEnded()

    def listAction(self, request: Request) -> dict[str, Any]:
        return {"services": [self.handles[name].core.snapshot() for name in sorted(self.handles)]}


class ServicesCapability:
    """The service actions, served by a L{Services} registry started with the agent."""

    features: tuple[str, ...] = ()

    def __init__(self, context: AgentContext) -> None:
        self.service = services = Services(context)
        self.actions = [
            Action("start_service", services.startAction),
            Action("status_service", services.statusAction),
            Action("logs_service", services.logsAction),
            Action("stop_service", services.stopAction),
            Action("list_services", services.listAction),
        ]


__all__ = [
    "STOP_GRACE",
    "AdoptedProcess",
    "ServiceCore",
    "ServiceInputs",
    "ServiceMachine",
    "Services",
    "ServicesCapability",
    "normalizeServiceName",
    "runnerScript",
    "tailText",
]

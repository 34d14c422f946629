"""The process layer shared by exec, services and command probes.

Non-PTY ``reactor.spawnProcess`` cannot start a child in a process group of its own: the child
shares the agent's group, so signalling "the child's group" would signal the agent. Every
non-PTY child therefore goes through L{spawnInSession}, which starts it as the leader of a new
session and process group (``pid == pgid``; services, as the reference starts them), or
L{spawnInGroup}, a new process group in the agent's session (exec and command probes: see its
docstring for why), and is stopped through L{signalGroup}, which refuses to signal the agent's
own group.

How the new session is made, fastest first (numbers in docs/actions/exec.md):

1. On Twisted's POSIX reactors, L{_SessionProcess}: Twisted's own ``Process`` (so the reactor
   reaps it and reads its pipes as usual) whose ``posix_spawnp`` call also passes
   ``setsid=True`` (``POSIX_SPAWN_SETSID``). No extra program runs: an exec costs what a bare
   ``posix_spawn`` costs. ``posix_spawn`` cannot change directory: for a working directory,
   coreutils ``env --chdir=DIR`` goes in front of the argv (one more ``execve``, under a
   millisecond), because Twisted's other way, forking the agent and running Python in the
   child, costs 4-6 ms more (measured: no directory 5.06 ms, ``env --chdir`` 5.29 ms, fork
   9.13 ms for ``sh -lc true``). Whether ``env`` knows ``--chdir`` is found out once, in a
   worker thread at start-up (L{probeChdirProgram}); until then, and without such an ``env``,
   the fork path is taken, and the child calls ``os.setsid()`` before its exec. The hooks
   into Twisted's ``Process`` are L{pyro_reactor.system._twisted.SpawningProcess}'s; a
   Twisted without them falls back to (2).
2. Any other reactor: ``reactor.spawnProcess`` with util-linux ``setsid`` in front of the argv
   (it calls ``setsid(2)`` and execs the program in the same process: it only forks when it is
   already a group leader, which a freshly spawned child never is), so the pid is the program's
   and so is its exit status. One extra ``execve``: about 0.5-1 ms on the development machines.
3. Without util-linux: the same with a Python trampoline (about 13 ms more).

Pitfalls for users of these children. ``transport.pid`` becomes ``None`` once Twisted has
reaped the child, and a child that exits at once on a busy machine can be reaped *before*
``spawnInSession`` returns (Twisted reaps once when it registers the child): read the pid in
the protocol's ``connectionMade`` (``self.transport.pid`` is set there) and keep it. And
``processExited`` fires when the child is reaped, ``processEnded`` only once every
pipe is closed too. A background grandchild that keeps
stdout open (``sleep 30 & echo hi``) holds ``processEnded`` back; after ``processExited`` give
a short grace and then close the pipes yourself (``execute.runCommand`` does).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.system._twisted import SPAWN_HOOKS, SpawningProcess
from pyro_reactor.system.procfs import (
    ProcStat,
    allProcesses,
    childrenOf,
    descendantsOf,
    parseProcStat,
    readProcStat,
)

try:
    from twisted.internet.posixbase import PosixReactorBase
except ImportError:  # pragma: no cover - not a POSIX Twisted
    PosixReactorBase = None  # type: ignore[assignment,misc]

log = Logger(namespace="pyro_reactor.system.processes")

#: The trampoline used when util-linux ``setsid`` is missing: chdir, a new session, then exec.
_PYTHON_TRAMPOLINE = (
    "import os, sys\n"
    "if sys.argv[1]:\n"
    "    os.chdir(sys.argv[1])\n"
    "os.setsid()\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


@cache
def _setsidProgram() -> str | None:
    return shutil.which("setsid")


_chdir: dict[str, str | None] = {}


def probeChdirProgram() -> str | None:
    """Find coreutils ``env`` if it knows ``--chdir`` (coreutils 8.28, 2017, and newer).

    Blocking (it runs ``env --chdir=/ true`` once, a millisecond): call it in a worker thread
    at start-up. Until it has answered, L{chdirProgram} says ``None`` and children with a
    working directory take the (slower, equally correct) fork path.
    """
    if "program" in _chdir:
        return _chdir["program"]
    program = shutil.which("env")
    found: str | None = None
    if program is not None:
        try:
            probe = subprocess.run(  # a fixed argv, run once
                [program, "--chdir=/", "true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            found = program if probe.returncode == 0 else None
    _chdir["program"] = found
    return found


def chdirProgram() -> str | None:
    """The ``env`` that knows ``--chdir``, if L{probeChdirProgram} found one; never blocks."""
    return _chdir.get("program")


def sessionArgv(argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
    """The argv that runs C{argv} as the leader of a new session (in C{cwd} if given).

    Used with reactors other than Twisted's POSIX ones: util-linux ``setsid`` if installed
    (only without C{cwd}), else a Python trampoline.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    setsid = _setsidProgram()
    if setsid is not None and cwd is None:
        return [setsid, *argv]
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _PYTHON_TRAMPOLINE,
        "" if cwd is None else os.fspath(cwd),
        *argv,
    ]


class _SessionProcess(SpawningProcess):
    """The child leads a new session (and process group)."""

    newSession = True


class _GroupProcess(SpawningProcess):
    """The child leads a new process group in the agent's session."""

    newSession = False


def spawnInSession(  # noqa: PLR0917 - the spawnProcess order, as callers expect
    reactor: Any,
    processProtocol: IProcessProtocol,
    argv: Sequence[str],
    env: Mapping[str, str] | Mapping[bytes, bytes],
    cwd: str | os.PathLike[str] | None = None,
    childFDs: Mapping[int, int | str] | None = None,
) -> IProcessTransport:
    """Spawn C{argv} (its first item looked up on ``PATH``) as a new session's leader.

    The returned transport's ``pid`` is also the child's session and process group id: stop
    the child and everything it started with L{signalGroup}C{(transport.pid, ...)}. C{env} is
    the child's whole environment, str or bytes (nothing is inherited implicitly). C{cwd}, if
    given, is checked to be a directory first so that a missing one fails here with a clear
    error rather than as an exit status; for a workspace directory it is a
    L{pyro_reactor.system.workspace.WorkingDirectory}'s ``/proc/<agent pid>/fd/<n>`` path, which
    ``env --chdir``, the forked child's ``chdir`` and the trampoline all enter as the open
    directory itself. C{childFDs} is as for ``spawnProcess`` (default:
    stdin, stdout and stderr as pipes).

    With Twisted's POSIX reactors the child is spawned directly (L{_SessionProcess}); with any
    other reactor (a test's fake, say) C{reactor.spawnProcess} gets L{sessionArgv}C{(argv)}.

    @raise OSError: the working directory is missing or not a directory, or the spawn failed.
    """
    return _spawn(_SessionProcess, reactor, processProtocol, argv, env, cwd, childFDs)


def spawnInGroup(  # noqa: PLR0917 - the spawnProcess order, as callers expect
    reactor: Any,
    processProtocol: IProcessProtocol,
    argv: Sequence[str],
    env: Mapping[str, str] | Mapping[bytes, bytes],
    cwd: str | os.PathLike[str] | None = None,
    childFDs: Mapping[int, int | str] | None = None,
) -> IProcessTransport:
    """Like L{spawnInSession}, but the child leads only a new process group (``pid == pgid``).

    It stays in the agent's session. That is what short commands want: a new session also
    gets a new scheduler autogroup on kernels with ``CONFIG_SCHED_AUTOGROUP``, and on a busy
    machine that made ``sh -lc true`` 1.4-2.5 times slower (see docs/actions/exec.md), while a
    new group costs nothing. Group signals work the same. (A child that opens the agent's
    controlling terminal, if it has one, is a background job there; under systemd it has none.)
    With reactors other than Twisted's POSIX ones this falls back to a new session.
    """
    return _spawn(_GroupProcess, reactor, processProtocol, argv, env, cwd, childFDs)


def _spawn(  # noqa: PLR0917
    kind: type[SpawningProcess],
    reactor: Any,
    processProtocol: IProcessProtocol,
    argv: Sequence[str],
    env: Mapping[str, str] | Mapping[bytes, bytes],
    cwd: str | os.PathLike[str] | None,
    childFDs: Mapping[int, int | str] | None,
) -> IProcessTransport:
    if not argv:
        raise ValueError("argv must not be empty")
    if cwd is not None and not Path(cwd).is_dir():
        raise NotADirectoryError(f"working directory does not exist: {os.fspath(cwd)}")
    fds = None if childFDs is None else dict(childFDs)
    if SPAWN_HOOKS and PosixReactorBase is not None and isinstance(reactor, PosixReactorBase):
        program, path = list(argv), None if cwd is None else os.fspath(cwd)
        chdir = None if path is None else chdirProgram()
        # env would read a program name holding "=" as a variable to set.
        if path is not None and chdir is not None and "=" not in program[0]:
            program, path = [chdir, f"--chdir={path}", *program], None
        process = kind(
            reactor, program[0], program, dict(env), path, processProtocol, None, None, fds
        )
        if path is not None and not kind.newSession and process.pid is not None:
            # Forked: set the group from this side too, so that it exists when we return
            # whichever of parent and child runs first (as shells do).
            try:
                os.setpgid(process.pid, process.pid)
            except OSError:
                pass  # the child has already exec'ed (after its own setpgid) or is gone
        return process
    full = sessionArgv(argv, cwd)
    transport: IProcessTransport = reactor.spawnProcess(
        processProtocol, full[0], full, env=dict(env), path=None, childFDs=fds
    )
    return transport


def signalGroup(pgid: int | None, signum: int) -> bool:
    """Send C{signum} to every process of the group C{pgid}.

    Returns C{False} if the group no longer exists (or C{pgid} is C{None}). Never signals the
    agent's own process group, nor C{pgid <= 1} (``killpg`` would read 0 as "my group"):
    that would be a caller's bug, so it is logged and refused.
    """
    if pgid is None:
        return False
    if pgid <= 1 or pgid == os.getpgrp():
        log.error(
            "refusing to signal process group {pgid}: not a child's group",
            pgid=pgid,
            signal=signum,
        )
        return False
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        # Gone (or, in theory, its id reused by a process we may not signal).
        return False
    return True


def groupAlive(pgid: int | None) -> bool:
    """Whether the group C{pgid} still has a process that is not a zombie.

    A member killed after its parent died is a zombie until init reaps it, which can take a
    while; ``killpg(pgid, 0)`` still counts it. This looks in ``/proc`` (only when ``killpg``
    says the group exists), so it costs a few milliseconds: not for hot paths.
    """
    if pgid is None or pgid <= 1 or not signalGroup(pgid, 0):
        return False
    if not os.path.isdir("/proc/self"):
        return True
    return any(info.pgid == pgid and not info.zombie for info in allProcesses())


class ProcessTree:
    """Everything a unit started: its process group, and each descendant seen so far.

    A group signal misses a descendant that moved to a group or session of its own
    (``setsid``, a daemon); this also signals each descendant of the group's leader found
    in ``/proc``, and remembers them (with their start time, so that a reused pid is never
    signalled), because once their parent is gone they are re-parented and no walk from the
    leader finds them again. What can still escape: a process that was already re-parented
    away before the first signal (a daemon's double fork that completed), and processes
    started by one in the instant between the walk and the signal. The hook a cgroup plugs
    into: something with the same ``signal`` and ``alive`` methods.
    """

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self._seen: dict[int, int] = {}
        leader = readProcStat(pgid)
        self._leaderTicks = None if leader is None else leader.startTicks

    def _collect(self) -> list[int]:
        """The remembered descendants still alive and still the same processes."""
        leader = readProcStat(self.pgid)
        sameLeader = leader is not None and leader.startTicks == self._leaderTicks
        roots = [self.pgid] if sameLeader else []
        roots.extend(self._seen)
        for found in descendantsOf(roots):
            self._seen.setdefault(found.pid, found.startTicks)
        live = []
        for pid, ticks in list(self._seen.items()):
            info = readProcStat(pid)
            if info is None or info.zombie or info.startTicks != ticks:
                del self._seen[pid]
            else:
                live.append(pid)
        return live

    def signal(self, signum: int) -> bool:
        """Send C{signum} to the group and every descendant; whether anything was there."""
        members = self._collect()
        sent = signalGroup(self.pgid, signum)
        for pid in members:
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, signum)
            except OSError as error:
                if error.errno not in (errno.ESRCH, errno.EPERM):
                    raise
            else:
                sent = True
        return sent

    def alive(self) -> bool:
        """Whether the group or a remembered descendant still has a live process."""
        return groupAlive(self.pgid) or bool(self._collect())


@dataclass(frozen=True)
class ProcessEnd:
    """How a child ended: its exit status, or the signal that killed it."""

    exitCode: int | None
    signal: int | None

    @property
    def code(self) -> int:
        """The ``subprocess`` convention: the exit status, or minus the signal's number."""
        if self.exitCode is not None:
            return self.exitCode
        if self.signal is not None:
            return -self.signal
        return -1


def processEndOf(reason: Failure) -> ProcessEnd:
    """The L{ProcessEnd} that C{reason} (given to ``processExited``/``processEnded``) tells.

    ``ProcessDone`` is status 0. ``ProcessTerminated`` carries either an exit status (the
    child exited) or a signal (it was killed); if it ever carries both, the exit status wins.
    Anything else (not a process's end) is neither.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated):
        exitCode = None if value.exitCode is None else int(value.exitCode)
        signum = None if value.signal is None else int(value.signal)
        return ProcessEnd(exitCode, None if exitCode is not None else signum)
    if isinstance(value, ProcessDone):
        return ProcessEnd(0, None)
    return ProcessEnd(None, None)


def exitCodeOf(reason: Failure) -> int:
    """The exit code ``subprocess`` would report for a child that ended with C{reason}.

    Precedence: the exit status if the child exited (``ProcessDone`` is 0), else minus the
    number of the signal that killed it, else ``-1`` (a reason that is no process end). Use
    L{processEndOf} to tell "killed" from "exited" (a service's record keeps no code then).
    """
    return processEndOf(reason).code


def terminateGroup(clock: Any, pgid: int | None, grace: float = 0.5) -> IDelayedCall | None:
    """SIGTERM the group C{pgid} now and SIGKILL it after C{grace} seconds.

    Returns the pending SIGKILL call (cancel it when the caller knows everything is gone
    sooner), or C{None} if the group was already gone. C{clock} is an ``IReactorTime``.
    """
    if not signalGroup(pgid, signal.SIGTERM):
        return None
    killer: IDelayedCall = clock.callLater(grace, signalGroup, pgid, signal.SIGKILL)
    return killer


__all__ = [
    "ProcStat",
    "ProcessEnd",
    "ProcessTree",
    "allProcesses",
    "chdirProgram",
    "childrenOf",
    "descendantsOf",
    "exitCodeOf",
    "groupAlive",
    "parseProcStat",
    "probeChdirProgram",
    "processEndOf",
    "readProcStat",
    "sessionArgv",
    "signalGroup",
    "spawnInGroup",
    "spawnInSession",
    "terminateGroup",
]

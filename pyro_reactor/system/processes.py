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
   9.13 ms for ``sh -lc true``). Without such an ``env``, that fork path is taken, and its
   ``_setupChild`` calls ``os.setsid()`` in the child. This overrides one
   private method of ``twisted.internet.process.Process`` and uses two private helpers; the
   Twisted range is pinned in setup.cfg and ``tests/test_processes.py`` checks ``pid == pgid``
   on this path, so a Twisted change that breaks it fails the tests, and a Twisted without
   those helpers falls back to (2).
2. Any other reactor: ``reactor.spawnProcess`` with util-linux ``setsid`` in front of the argv
   (it calls ``setsid(2)`` and execs the program in the same process: it only forks when it is
   already a group leader, which a freshly spawned child never is), so the pid is the program's
   and so is its exit status. One extra ``execve``: about 0.5-1 ms on the development machines.
3. Without util-linux: the same with a Python trampoline (about 13 ms more).

Pitfalls for users of these children. ``transport.pid`` becomes ``None`` once Twisted has
reaped the child, and a child that exits at once on a busy machine can be reaped *before*
``spawnInSession`` returns (Twisted reaps once when it registers the child): read the pid in
the protocol's ``connectionMade`` (``self.transport.pid`` is set there) and keep it. And (see
STYLE.md) ``processExited`` fires when the child is reaped, ``processEnded`` only once every
pipe is closed too. A background grandchild that keeps
stdout open (``sleep 30 & echo hi``) holds ``processEnded`` back; after ``processExited`` give
a short grace and then close the pipes yourself (``execute.runCommand`` does).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from twisted.internet import process as _twistedProcess
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport
from twisted.logger import Logger

try:
    from twisted.internet.posixbase import PosixReactorBase
    from twisted.internet.process import _PS_CLOSE, _PS_DUP2, _getFileActions, _listOpenFDs
except ImportError:  # pragma: no cover - a Twisted without them: use the setsid program
    _SPAWN_INTERNALS = False
else:
    _SPAWN_INTERNALS = hasattr(os, "posix_spawnp") and hasattr(
        _twistedProcess.Process, "_trySpawnInsteadOfFork"
    )

log = Logger(namespace="pyro_reactor.system.processes")

#: The trampoline used when util-linux ``setsid`` is missing: chdir, a new session, then exec.
_PYTHON_TRAMPOLINE = (
    "import os, sys\n"
    "if sys.argv[1]:\n"
    "    os.chdir(sys.argv[1])\n"
    "os.setsid()\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


#: Every signal the child starts with at its default action. Twisted lists the ones the agent
#: ignores (Python ignores SIGPIPE and SIGXFSZ) at each spawn, which costs 80 us; resetting
#: all of them is the same for the child (handled ones are reset by exec anyway) and free.
_DEFAULT_SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})


@cache
def _setsidProgram() -> str | None:
    return shutil.which("setsid")


@cache
def _chdirProgram() -> str | None:
    """coreutils ``env``, if it knows ``--chdir`` (coreutils 8.28, 2017, and newer).

    Found out once, by running it (a millisecond, the first time a child needs a directory).
    """
    program = shutil.which("env")
    if program is None:
        return None
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
        return None
    return program if probe.returncode == 0 else None


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


def _openFDs() -> list[tuple[int, bool]]:
    """Every descriptor open in the agent, with its close-on-exec flag, for the spawn.

    What Twisted's spawn lists too (the spawn closes in the child each one not marked
    close-on-exec), in one pass over ``/proc/self/fd``: Twisted's detector adds a
    ``getpid`` and a second list (with 20 descriptors open: 19 us instead of 28 us).
    """
    try:
        names: list[str] | list[int] = os.listdir("/proc/self/fd")
    except OSError:
        names = list(_listOpenFDs())
    state = []
    for name in names:
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        state.append((fd, bool(flags & fcntl.FD_CLOEXEC)))
    return state


class _SessionProcess(_twistedProcess.Process):
    """Twisted's POSIX process transport, with the child made a session or group leader.

    Without a working directory Twisted spawns with ``posix_spawnp``: we make the same call
    with ``setsid=True`` (or ``setpgroup=0``). With one it forks: ``_setupChild`` runs in the
    child before the exec. ``newSession`` is set on the class by the two subclasses below
    because Twisted's ``Process.__init__`` spawns before a subclass could set an attribute.
    """

    newSession = True

    def _trySpawnInsteadOfFork(  # noqa: PLR0917 - Twisted's signature
        self,
        path: object,
        uid: object,
        gid: object,
        executable: str,
        args: list[str],
        environment: dict[str, str] | None,
        kwargs: dict[str, Any],
    ) -> bool:
        if path is not None or uid is not None or gid is not None:
            return False
        self.pid = os.posix_spawnp(
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=_getFileActions(
                _openFDs(), kwargs["fdmap"], doClose=_PS_CLOSE, doDup2=_PS_DUP2
            ),
            setsigdef=_DEFAULT_SIGNALS,
            **({"setsid": True} if self.newSession else {"setpgroup": 0}),
        )
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        if self.newSession:
            os.setsid()
        else:
            os.setpgid(0, 0)
        super()._setupChild(*args, **kwargs)


class _GroupProcess(_SessionProcess):
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
    kind: type[_SessionProcess],
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
    if _SPAWN_INTERNALS and isinstance(reactor, PosixReactorBase):
        program, path = list(argv), None if cwd is None else os.fspath(cwd)
        chdir = None if path is None else _chdirProgram()
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
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


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
    "groupAlive",
    "sessionArgv",
    "signalGroup",
    "spawnInGroup",
    "spawnInSession",
    "terminateGroup",
]

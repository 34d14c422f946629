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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.system._twisted import SPAWN_HOOKS, SpawningProcess
from pyro_reactor.system.cgroups import Cgroup, CgroupTree, ownCgroup, unifiedMount
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


# -- a cgroup per unit ----------------------------------------------------------------------

_T = TypeVar("_T")

#: The kinds of units (cgroup name prefixes) this module makes.
UNIT_KINDS = frozenset({"exec", "probe", "shell", "service"})
#: Empty cgroups kept for reuse, per kind of unit (a mkdir and an rmdir less per exec).
POOL_SIZE = 4
#: How long L{UnitCgroups.removeWhenEmpty} waits for a killed unit's processes to be gone.
EMPTY_TIMEOUT = 5.0


class UnitCgroups:
    """The cgroups of the units the reactor thread spawns: exec, shells, services, probes.

    How a unit's first process gets in, race-free and without a helper program: the reactor
    thread writes the *agent's own* pid to the unit's ``cgroup.procs``, spawns the child
    (``posix_spawn``, or a fork for PTYs and working directories: either way the child starts
    in the agent's cgroup of the moment, the unit's) and writes its pid back to its own cgroup
    (L{entered}). Nothing can fork outside before the child is in, and nothing inside can
    escape. The agent sits in a unit's cgroup only for the spawn, on the reactor thread, and
    only the reactor thread kills units (``cgroup.kill``): no kill can find it there. The
    one thing that may spawn from another thread, L{probeChdirProgram} (once, at start-up),
    would put its ``env --chdir=/ true`` into that unit: at worst the probe is killed with the
    unit and the slower fork path is used.

    A unit's cgroup is removed once it is empty: a killed one as soon as its processes are
    gone (L{removeWhenEmpty}, which the unit's end waits for); one that still has processes it
    may keep (an exec's background daemon) when it is released (L{release}), by the next
    L{create}, which tries every cgroup still waiting (one rmdir each, no scan): one small
    directory per such daemon while it runs, nothing more.
    """

    def __init__(self, tree: CgroupTree, home: Path) -> None:
        self.tree = tree
        #: The agent's own cgroup, where it goes back to after each spawn.
        self.home = home
        self.waiting: set[Path] = set()
        self.free: dict[str, list[Cgroup]] = {}
        self._fds: dict[Path, int] = {}
        #: Waiting cgroups whose processes were killed: gone within milliseconds.
        self.dying: set[Path] = set()

    def create(self, prefix: str, reuse: bool = False) -> Cgroup | None:
        """A new unit cgroup, or ``None`` (logged) if the kernel refused one.

        With C{reuse}, an empty one of the same C{prefix} released with C{reuse} may be
        given again (units whose cgroup is never recorded: exec and probes).
        """
        if self.waiting:
            self.sweep()
        pool = self.free.get(prefix) if reuse else None
        while pool:
            kept = pool.pop()
            if kept.exists():
                return kept
        try:
            return self.tree.create(prefix)
        except OSError as error:
            log.warn("no cgroup for a {unit} unit: {error}", unit=prefix, error=str(error))
            return None

    def adopt(self, path: object) -> Cgroup | None:
        """The recorded unit cgroup C{path} if it still exists and is one of ours."""
        if not isinstance(path, str) or not path:
            return None
        return self.tree.adopt(path)

    @contextmanager
    def entered(self, cgroup: Cgroup | None) -> Iterator[bool]:
        """The agent is in C{cgroup} inside the block (which must not yield to the reactor).

        Yields whether it got in (``False``: no cgroup, or the kernel refused: the child is
        then spawned in the agent's own cgroup and the caller falls back to process groups).
        """
        if cgroup is None:
            yield False
            return
        me = str(os.getpid()).encode("ascii")
        try:
            self._write(cgroup.procs, me)
        except OSError as error:
            log.warn(
                "cannot enter unit cgroup {cgroup}: {error}",
                cgroup=str(cgroup.path),
                error=str(error),
            )
            yield False
            return
        try:
            yield True
        finally:
            try:
                self._write(self.home / "cgroup.procs", me)
            except OSError as error:
                # Never seen; the unit's kill refuses while the agent is inside (CgroupUnit).
                log.error(
                    "cannot leave unit cgroup {cgroup}: {error}",
                    cgroup=str(cgroup.path),
                    error=str(error),
                )

    def _write(self, procs: Path, pid: bytes) -> None:
        """Write to a ``cgroup.procs`` through a descriptor kept open (an open less a spawn)."""
        fd = self._fds.get(procs)
        if fd is not None:
            try:
                os.write(fd, pid)
            except OSError:
                self._forget(procs)  # a cgroup removed meanwhile: try afresh below
            else:
                return
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, pid)
        except BaseException:
            os.close(fd)
            raise
        self._fds[procs] = fd

    def _forget(self, procs: Path) -> None:
        fd = self._fds.pop(procs, None)
        if fd is not None:
            os.close(fd)

    def _remove(self, cgroup: Cgroup) -> bool:
        self._forget(cgroup.procs)
        return cgroup.remove()

    def spawnIn(self, cgroup: Cgroup | None, spawn: Callable[[], _T]) -> tuple[_T, bool]:
        """C{spawn()} with the agent inside C{cgroup}; its result and whether it was in."""
        with self.entered(cgroup) as inside:
            return spawn(), inside

    def release(self, cgroup: Cgroup, reuse: str | None = None, killed: bool = False) -> None:
        """Remove C{cgroup} now if it is empty, else at a later L{sweep}. Never kills.

        With C{reuse} (the prefix it was created with), an empty one is kept for L{create}.
        C{killed}: its processes were just killed (L{close} waits a moment for them).
        """
        if reuse is not None and not cgroup.populated():
            pool = self.free.setdefault(reuse, [])
            if len(pool) < POOL_SIZE:
                pool.append(cgroup)
                return
        if self._remove(cgroup):
            self.waiting.discard(cgroup.path)
            self.dying.discard(cgroup.path)
        else:
            self.waiting.add(cgroup.path)
            if killed:
                self.dying.add(cgroup.path)

    def removeWhenEmpty(
        self, cgroup: Cgroup, clock: Any, timeout: float = EMPTY_TIMEOUT
    ) -> Deferred[bool]:
        """Remove a just-killed C{cgroup} once its processes are gone (a few ms).

        Fires with whether it was removed; if something is still there after C{timeout}
        seconds (a process stuck in the kernel), it is left to L{sweep}.
        """
        done: Deferred[bool] = Deferred()
        deadline = clock.seconds() + timeout

        def look(interval: float) -> None:
            if self._remove(cgroup):
                self.waiting.discard(cgroup.path)
                done.callback(True)
            elif clock.seconds() >= deadline:
                self.waiting.add(cgroup.path)
                done.callback(False)
            else:
                clock.callLater(interval, look, min(interval * 2, 0.1))

        look(0.002)
        return done

    def close(self, patience: float = 1.0) -> None:
        """Remove the empty cgroups kept for reuse and those released that are empty now.

        For the agent's stop: blocks up to C{patience} seconds for the processes of killed
        units to be gone (a few milliseconds), so that their cgroups are removed too.
        """
        pools, self.free = self.free, {}
        for pool in pools.values():
            for cgroup in pool:
                self.release(cgroup)
        deadline = time.monotonic() + patience
        while self.sweep() and self.dying and time.monotonic() < deadline:
            time.sleep(0.005)
        self.removeLeftovers()
        for procs in list(self._fds):
            self._forget(procs)

    def removeLeftovers(self) -> int:
        """Remove the empty unit cgroups an earlier agent left (at start-up and stop).

        An exec's daemon that outlived that agent kept its cgroup; once it ended, nobody was
        left to remove it. Only empty cgroups of this module's kinds are removed (``rmdir``
        fails on any other): a unit being started by another agent sharing the tree has
        just made its own and would fall back to process groups, nothing worse.
        """
        removed = 0
        try:
            entries = list(self.tree.units.iterdir())
        except OSError:
            return 0
        for entry in entries:
            kind = entry.name.partition("-")[0]
            if kind in UNIT_KINDS and entry.is_dir() and Cgroup(entry).remove():
                removed += 1
        return removed

    def sweep(self) -> int:
        """Remove every released cgroup that is empty now; how many are still waiting."""
        for path in list(self.waiting):
            if self._remove(Cgroup(path)):
                self.waiting.discard(path)
                self.dying.discard(path)
        return len(self.waiting)


_unitCgroups: dict[str, UnitCgroups | None] = {}


def unitCgroups() -> UnitCgroups | None:
    """The agent's L{UnitCgroups}, set up on first use; ``None`` without a writable cgroup v2.

    Set C{PYRO_REACTOR_UNIT_CGROUPS=0} in the agent's environment (or call
    L{setUnitCgroups}C{(None)}, as tests do) to use process groups and sessions only.
    """
    if "units" not in _unitCgroups:
        _unitCgroups["units"] = _detectUnitCgroups()
    return _unitCgroups["units"]


def setUnitCgroups(units: UnitCgroups | None) -> Callable[[], None]:
    """Use C{units} from now on (``None``: no cgroups); returns what undoes it."""
    had = "units" in _unitCgroups
    previous = _unitCgroups.get("units")
    _unitCgroups["units"] = units

    def restore() -> None:
        if had:
            _unitCgroups["units"] = previous
        else:
            _unitCgroups.pop("units", None)

    return restore


def _detectUnitCgroups() -> UnitCgroups | None:
    if os.environ.get("PYRO_REACTOR_UNIT_CGROUPS", "1") == "0":
        return None
    tree = CgroupTree.detect()
    mount, own = unifiedMount(), ownCgroup()  # read after detect: it may have moved us
    if tree is None or mount is None or own is None:
        return None
    home = mount / own.lstrip("/")
    if not (home / "cgroup.procs").exists():
        return None
    log.info("a cgroup per unit under {units}", units=str(tree.units))
    units = UnitCgroups(tree, home)
    units.removeLeftovers()
    return units


class CgroupUnit:
    """Everything a unit started, as its cgroup: signalled, killed and watched whole.

    Implements exec's C{Unit} (``signal``/``alive``), a service's ``UnitGroup``
    (``members``/``kill``) and is what a shell's cgroup scope kills.
    """

    def __init__(self, cgroup: Cgroup, releaseTo: UnitCgroups | None = None) -> None:
        self.cgroup = cgroup
        #: Where the cgroup is released (removed once empty) when it is seen empty.
        self.releaseTo = releaseTo

    def members(self) -> list[int]:
        """The live (not zombie) processes of the cgroup (never the agent)."""
        live = []
        me = os.getpid()
        for pid in self.cgroup.pids():
            if pid == me:
                continue
            stat = readProcStat(pid)
            if stat is not None and not stat.zombie and stat.state != "x":
                live.append(pid)
        if not live and self.releaseTo is not None:
            self.releaseTo.release(self.cgroup, killed=True)
        return live

    def alive(self) -> bool:
        return self.cgroup.populated() and bool(self.members())

    def signal(self, signum: int) -> bool:
        """Send C{signum} to every process (SIGKILL: ``cgroup.kill``); whether any was there."""
        if not self.members():
            return False
        if os.getpid() in self.cgroup.pids():
            log.error(
                "refusing to signal unit cgroup {cgroup}: the agent is in it",
                cgroup=str(self.cgroup.path),
            )
            return False
        if signum == signal.SIGKILL:
            self.cgroup.kill()
        else:
            self.cgroup.signal(signum)
        return True

    def kill(self, signum: int) -> bool:
        return self.signal(signum)


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
    "CgroupUnit",
    "ProcStat",
    "ProcessEnd",
    "ProcessTree",
    "UnitCgroups",
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
    "setUnitCgroups",
    "signalGroup",
    "spawnInGroup",
    "spawnInSession",
    "terminateGroup",
    "unitCgroups",
]

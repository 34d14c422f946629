"""One cgroup per unit the agent starts (exec, probe, shell, service), entered before it forks.

L{UnitCgroups} creates a unit's cgroup under the hierarchy L{pyro_reactor.system.cgroups}
manages, puts the unit's first process in it race-free (the agent moves itself in around the
spawn, on the reactor thread, and back out), ends a unit with ``cgroup.kill``, keeps a few
empty cgroups for reuse and removes the rest once empty. L{unitCgroups} is the agent's one
instance (``None`` where cgroup v2 is not writable, or with ``PYRO_REACTOR_UNIT_CGROUPS=0``);
L{CgroupUnit} is a unit seen through its cgroup (what a timeout or a stop ends).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pyro_reactor.system.cgroups import Cgroup, CgroupTree, ownCgroup, unifiedMount
from pyro_reactor.system.procfs import readProcStat

log = Logger(namespace="pyro_reactor.system.unitcgroups")

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

"""What ends a command: its L{Unit}, and L{RunningCommands}, what the agent ends when it stops.

A timed-out command's unit (its L{ProcessTree}, or its cgroup) gets SIGTERM, then SIGKILL
L{KILL_GRACE} seconds later if anything of it is left; the exec commands still running when the
agent stops are ended the same way.
"""

from __future__ import annotations

import signal
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pyro_reactor.system.processes import ProcessTree
from pyro_reactor.system.unitcgroups import CgroupUnit, unitCgroups

log = Logger(namespace="pyro_reactor.capabilities.execute")

#: How long a timed-out command's group has between SIGTERM and SIGKILL.
KILL_GRACE = 0.5


class Unit(Protocol):
    """What ends a timed-out command: everything it started (a process tree, or a cgroup)."""

    def signal(self, signum: int) -> bool:
        """Send C{signum} to all of it; whether anything was there."""

    def alive(self) -> bool:
        """Whether anything of it is still running."""


class RunningCommands(Service):
    """The process groups of the exec commands in flight; ended when the agent stops.

    On stop, each group still there (and every descendant of its shell, as on a timeout) gets
    SIGTERM, and SIGKILL L{KILL_GRACE} seconds later; the stop waits for that, so nothing
    started by an exec outlives the agent (under systemd the
    unit's cgroup would be killed anyway; under a plain init it would not).
    """

    name = "exec-commands"

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.groups: set[int] = set()
        #: The cgroup units of the commands running in one (by process group id).
        self.units: dict[int, Unit] = {}

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        # Each shell is still running (its group is discarded when it ends), so its pid still
        # names it: the trees are taken now, descendants that left the group included.
        trees = [self.units.get(pgid) or ProcessTree(pgid) for pgid in sorted(self.groups)]
        signalled = [tree for tree in trees if tree.signal(signal.SIGTERM)]
        cgroups = unitCgroups()
        if cgroups is not None:
            cgroups.close()
        if not signalled:
            return None
        log.info("agent stopping: ending {count} running commands", count=len(signalled))

        def kill() -> None:
            for tree in signalled:
                tree.signal(signal.SIGKILL)
                if cgroups is not None and isinstance(tree, CgroupUnit):
                    cgroups.release(tree.cgroup, killed=True)
            if cgroups is not None:
                cgroups.close()

        return deferLater(self.clock, KILL_GRACE, kill)

"""What the agent does to itself at start-up so that it still answers promptly when the guest's
CPUs are busy with its own jobs.

Two causes of late answers were measured with 200 jobs printing a line every 10 ms on two
cores, each followed by an attached client (``benchmarks/bench_jobs.py``), by sampling the
reactor thread's lateness every 2 ms with its CPU time and run-queue wait:

- **The scheduler.** On kernels with ``CONFIG_SCHED_AUTOGROUP`` every session is a scheduling
  group of equal weight. Each job (and service, and shell) leads a session of its own, so the
  agent's session weighed 1/201 of the machine while the agent needed about 28 % of a core to
  follow that output: its reactor thread waited runnable for 26-54 ms of a 45-74 ms gap.
  Renicing the agent's threads changes nothing there (a task's nice only weighs inside its
  group); the group's own nice does. L{Autogroup} sets it for the session the agent leads
  (``/proc/self/autogroup``), as the agent already tells the OOM killer to spare it
  (``oom_score_adj``): the host's requests come before its background work. The agent's
  session also holds ``exec`` commands and readiness probes (see
  L{pyro_reactor.system.processes.spawnInGroup}), so they share that weight; jobs, services
  and shells lead sessions of their own at the default. Where units get a cgroup with the
  ``cpu`` controller (a guest with the full cgroup v2 hierarchy), autogroups do not apply: all
  units together weigh one cgroup against the agent's (``system/cgroups.py``).
- **The cycle collector.** A full collection walked the ~55 000 objects that importing Twisted
  and building the agent left behind: 16-36 ms of the reactor thread each time, several times
  a minute under that load. L{Responsiveness} moves them to the collector's permanent
  generation (``gc.freeze``) once the agent has started; full collections then walk the
  ~10 000 objects made since, in 3-7 ms. The few objects of start-up that were already
  garbage (about 60 measured) stay for the agent's life.

Figures before and after are in docs/jobs.md.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Protocol

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger(namespace="pyro_reactor.system.responsiveness")

#: The nice value the agent gives the autogroup of the session it leads (the highest weight:
#: 86 times a nice-0 group's, so that the agent's share stays above what it uses with a few
#: hundred jobs busy; -10, 9 times, still left pings of 50 ms or more in one run of four).
AUTOGROUP_NICE = -20
#: Where the kernel shows (and takes) the calling process's autogroup nice value.
PROC_AUTOGROUP = Path("/proc/self/autogroup")


class IAutogroup(Protocol):
    """The scheduler autogroup of the agent's session, as L{Responsiveness} sees it."""

    def leader(self) -> bool:
        """Whether the agent leads its session (so that the autogroup is the agent's own)."""

    def nice(self) -> int | None:
        """The group's nice value; C{None} where the kernel has no autogroups."""

    def setNice(self, value: int) -> None:
        """Set the group's nice value (C{OSError} if not allowed)."""


class Autogroup:
    """The calling process's autogroup, through ``/proc/self/autogroup``."""

    def __init__(self, path: Path = PROC_AUTOGROUP) -> None:
        self.path = path

    def leader(self) -> bool:
        return os.getsid(0) == os.getpid()

    def nice(self) -> int | None:
        # "/autogroup-1234 nice 0"
        try:
            fields = self.path.read_text(encoding="ascii").split()
        except OSError:
            return None
        if len(fields) != 3 or fields[1] != "nice" or not fields[2].lstrip("-").isdigit():
            return None
        return int(fields[2])

    def setNice(self, value: int) -> None:
        self.path.write_text(str(value), encoding="ascii")


class Responsiveness(Service):
    """Started last, stopped first: raises the agent's autogroup weight and freezes the objects
    of start-up (see the module's docstring); undoes both when stopped.

    C{nice} is the autogroup's nice value wanted (0, the kernel's default, changes nothing).
    """

    def __init__(self, nice: int = AUTOGROUP_NICE, autogroup: IAutogroup | None = None) -> None:
        self.wanted = nice
        self.autogroup: IAutogroup = Autogroup() if autogroup is None else autogroup
        #: The nice value found at start, put back at stop (C{None}: nothing was changed).
        self._previous: int | None = None

    def startService(self) -> None:
        super().startService()
        gc.freeze()
        log.info("{count} objects of start-up left out of collections", count=gc.get_freeze_count())
        self._raise()

    def stopService(self) -> None:
        super().stopService()
        gc.unfreeze()
        if self._previous is not None:
            try:
                self.autogroup.setNice(self._previous)
            except OSError as error:
                log.warn("cannot put the autogroup nice value back: {error}", error=str(error))
            self._previous = None

    def _raise(self) -> None:
        wanted = self.wanted
        current = self.autogroup.nice()
        if current is None:
            log.info("no scheduler autogroups on this kernel: the agent's priority is as is")
            return
        if not self.autogroup.leader():
            # The autogroup is the session's, shared with whatever started the agent (a
            # terminal's shell, say): not the agent's to change.
            log.info("the agent does not lead its session: its autogroup is left as is")
            return
        if current == wanted:
            return
        try:
            self.autogroup.setNice(wanted)
        except OSError as error:
            log.warn(
                "cannot set the agent's autogroup nice value to {nice}: {error}",
                nice=wanted,
                error=str(error),
            )
            return
        self._previous = current
        log.info(
            "the agent's autogroup nice value is now {nice} (was {previous})",
            nice=wanted,
            previous=current,
        )


__all__ = ["AUTOGROUP_NICE", "Autogroup", "IAutogroup", "Responsiveness"]

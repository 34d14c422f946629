"""A service the registry knows by name: the name rule, its handle and what it may leave.

L{normalizeServiceName} checks a request's ``service_name``; L{ServiceHandle} holds a service's
machine, core and files, and tells what an ended service may have left running (its unit, found
from the process this agent watched or from the record an earlier agent wrote);
L{releasingOnExit} hands a cgroup unit's cgroup back once its service has exited.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyro_reactor.capabilities.services._machine import ServiceCore, ServiceInput
from pyro_reactor.capabilities.services.records import ServiceFiles
from pyro_reactor.capabilities.services.units import SessionUnit, UnitGroup
from pyro_reactor.system.unitcgroups import CgroupUnit, unitCgroups
from pyro_reactor.wire.request import checkedName

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Record = dict[str, Any]


def normalizeServiceName(text: str) -> str:
    """A request's ``service_name``, checked with the reference's rule and messages."""
    return checkedName(text, SERVICE_NAME_RE, "service_name")


@dataclass
class ServiceHandle:
    """A service the registry knows: its machine and the core holding its record."""

    machine: ServiceInput
    core: ServiceCore
    files: ServiceFiles

    def leftovers(self) -> UnitGroup | None:
        """What may be left running of this (ended) service: its unit, if it had one."""
        process = self.core.process
        unit = getattr(process, "unit", None)
        if isinstance(unit, CgroupUnit):
            return unit
        if process is not None:
            # Without a start time, a reused pid could not be told from the runner.
            if process.startTicks is None:
                return None
            return SessionUnit(process.pid, process.startTicks)
        recorded = recordedCgroup(self.core.record)
        if recorded is not None:
            return recorded
        pid, ticks = self.core.record.get("pid"), self.core.record.get("pid_start_ticks")
        if isinstance(pid, int) and pid > 1 and isinstance(ticks, int):
            return SessionUnit(pid, ticks)
        return None


def recordedCgroup(record: Record) -> CgroupUnit | None:
    """The service's cgroup named in its record (``cgroup_path``), if it is still there."""
    cgroups = unitCgroups()
    if cgroups is None:
        return None
    cgroup = cgroups.adopt(record.get("cgroup_path"))
    return None if cgroup is None else CgroupUnit(cgroup, cgroups)


def releasingOnExit(
    unit: object, onExit: Callable[[int | None], None]
) -> Callable[[int | None], None]:
    """C{onExit}, after handing a cgroup unit's cgroup back to be removed once it is empty.

    What the service left running keeps it (a stop kills them, even once it has exited).
    """
    if not isinstance(unit, CgroupUnit) or unit.releaseTo is None:
        return onExit
    cgroups = unit.releaseTo

    def exited(code: int | None) -> None:
        cgroups.release(unit.cgroup)
        onExit(code)

    return exited


__all__ = [
    "SERVICE_NAME_RE",
    "Record",
    "ServiceHandle",
    "normalizeServiceName",
    "recordedCgroup",
    "releasingOnExit",
]

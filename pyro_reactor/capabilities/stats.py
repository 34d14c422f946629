"""``stats``: the guest and the agent at a glance, cheap enough to poll once a second.

Everything comes from ``/proc`` and ``statvfs`` on the reactor thread: a few small reads that
never block (``/proc`` is not a disk, ``statvfs`` writes nothing, so a filesystem frozen by
``quiesce`` does not hold it up), and no worker thread, which ``quiesce`` may leave busy.
About 0.06 ms of CPU in the handler, 0.4 ms for a whole request (docs/actions/stats.md).

  - ``uptime_seconds``: ``/proc/uptime`` (the guest's, not the agent's: ``ping`` has that);
  - ``memory``: ``MemTotal``, ``MemAvailable`` and ``SwapTotal - SwapFree``, in bytes;
  - ``cpu``: online CPUs, ``/proc/loadavg``, and ``usage_seconds``: CPU time spent busy
    (user, nice, system, irq, softirq, steal) summed over all CPUs since boot, from
    ``/proc/stat``;
  - ``pressure``: ``some``/``full`` ``avg10`` of ``/proc/pressure/{cpu,memory,io}``, each
    ``null`` when the kernel has no PSI (``full`` is ``null`` for ``cpu`` before Linux 5.13);
  - ``disks``: the workspace (as ``/workspace``) and the state directory;
  - ``agent``: resident memory, open descriptors, open connections, threads;
  - ``counts``: shells, services, jobs, through L{pyro_reactor.hooks.Hooks.counts} (``null``
    for a name no capability registered);
  - ``jobs``: per-job usage, only when the jobs capability registered ``usage["jobs"]`` and
    there are jobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pyro_reactor.context import AgentContext
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Fields of the ``cpu`` line of /proc/stat counted as busy: user nice system (idle iowait)
#: irq softirq steal. guest and guest_nice are already inside user and nice.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
COUNTED = ("shells", "services", "jobs")


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("ascii", "replace")
    except OSError:
        return None  # EOPNOTSUPP: /proc/pressure exists but PSI is off (psi=0)
    finally:
        os.close(fd)


def memory(text: str | None) -> dict[str, int | None]:
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
            values[name] = int(rest.split()[0]) * 1024
    swap = None
    if "SwapTotal" in values and "SwapFree" in values:
        swap = values["SwapTotal"] - values["SwapFree"]
    return {
        "total_bytes": values.get("MemTotal"),
        "available_bytes": values.get("MemAvailable"),
        "swap_used_bytes": swap,
    }


def cpuUsageSeconds(text: str | None) -> float | None:
    for line in (text or "").splitlines():
        if line.startswith("cpu "):
            ticks = [int(value) for value in line.split()[1:]]
            busy = sum(ticks[index] for index in _BUSY_FIELDS if index < len(ticks))
            return round(busy / _CLOCK_TICKS, 2)
    return None


def pressure(text: str | None) -> dict[str, float | None] | None:
    if text is None:
        return None
    averages: dict[str, float | None] = {"some_avg10": None, "full_avg10": None}
    for line in text.splitlines():
        kind, *fields = line.split()
        for item in fields:
            if item.startswith("avg10="):
                averages[f"{kind}_avg10"] = float(item[6:])
    return averages


def disk(name: str, path: Path) -> dict[str, Any]:
    try:
        stats = os.statvfs(path)
    except OSError:
        return {"path": name, "total_bytes": None, "free_bytes": None, "free_inodes": None}
    return {
        "path": name,
        "total_bytes": stats.f_blocks * stats.f_frsize,
        "free_bytes": stats.f_bavail * stats.f_frsize,
        "free_inodes": stats.f_favail,
    }


def agentProcess(statText: str | None) -> tuple[int | None, int | None]:
    """(resident bytes, threads) from /proc/self/stat."""
    if statText is None:
        return None, None
    fields = statText[statText.rfind(")") + 2 :].split()
    # Fields after the command: state is index 0, num_threads 17, rss 21 (in pages).
    return int(fields[21]) * _PAGE_SIZE, int(fields[17])


class StatsCapability:
    """Serves ``stats``; ``ping`` lists the feature ``"stats"``."""

    features = ("stats",)
    service = None

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self.actions = [Action("stats", self._stats)]

    def _stats(self, request: Request) -> dict[str, Any]:
        hooks = self._context.hooks
        config = self._context.config
        uptime = _read("/proc/uptime")
        load = (_read("/proc/loadavg") or "").split()
        rss, threads = agentProcess(_read("/proc/self/stat"))
        try:
            openFds: int | None = len(os.listdir("/proc/self/fd"))
        except OSError:
            openFds = None
        connections = hooks.counts.get("connections")
        answer: dict[str, Any] = {
            "uptime_seconds": float(uptime.split()[0]) if uptime else None,
            "memory": memory(_read("/proc/meminfo")),
            "cpu": {
                "count": os.cpu_count(),
                "load": [float(value) for value in load[:3]] if len(load) >= 3 else None,
                "usage_seconds": cpuUsageSeconds(_read("/proc/stat")),
            },
            "pressure": {
                kind: pressure(_read(f"/proc/pressure/{kind}")) for kind in ("cpu", "memory", "io")
            },
            "disks": [
                disk("/workspace", config.workspace),
                disk(str(config.stateDir), config.stateDir),
            ],
            "agent": {
                "rss_bytes": rss,
                "open_fds": openFds,
                "connections": connections() if connections is not None else None,
                "threads": threads,
            },
            "counts": {
                name: (hooks.counts[name]() if name in hooks.counts else None) for name in COUNTED
            },
        }
        usage = hooks.usage.get("jobs")
        if usage is not None:
            jobs = usage()
            if jobs:
                answer["jobs"] = jobs
        return answer

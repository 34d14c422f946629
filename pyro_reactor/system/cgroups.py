"""One cgroup (v2) per unit the agent starts: create, enter race-free, kill, freeze, limit, measure.

Built once for every process-starting unit (jobs today; exec, shells, services and command
probes can use the same objects). Where the guest has no cgroup v2, L{CgroupTree.detect}
answers ``None`` and callers fall back to process groups and sessions.

Where the units live. The agent finds the unified hierarchy (``cgroup2`` in
``/proc/self/mounts``: ``/sys/fs/cgroup`` on a modern guest, ``/sys/fs/cgroup/unified`` on a
hybrid host) and makes its units in ``pyro-units/`` at the hierarchy's root, never inside its
own cgroup. Inside its own cgroup (under systemd, with ``Delegate=yes``) the agent would have
to move itself into a leaf and enable controllers for the unit's cgroup; after the agent is
killed, systemd then puts the new agent back into the unit's cgroup, which the kernel refuses
(a cgroup that hands controllers down may hold no process): the restart fails (seen in the VM
tier). At the root, whose processes are exempt from that rule, the agent's own cgroup stays
as systemd or the init script made it, units outlive agent restarts, and the agent is never
in a unit's cgroup: ``cgroup.kill`` of a unit cannot reach it. This needs a writable root
(the agent runs as root in a guest); without one there are no unit cgroups (callers fall back
to process groups).

The controllers the parent has (``memory``, ``pids``, ``cpu``) are enabled for ``pyro-units``'
children as far as the kernel lets us; L{CgroupTree.controllers} says which ones units really
get, and asking for a limit whose controller is missing is an error (L{LimitError}), never
ignored. A unit's process enters its cgroup *before* it can fork: the child writes its own pid
to the unit's ``cgroup.procs`` and only then execs the command (see the jobs runner), so
nothing it starts is ever outside.

Every call here is a few small writes to cgroupfs (kernel memory, no disk): cheap enough for
the reactor thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="pyro_reactor.system.cgroups")

UNITS = "pyro-units"
#: The controllers a unit's limits need, by limit name.
LIMIT_CONTROLLERS = {"memory_bytes": "memory", "pids": "pids", "cpu": "cpu"}
#: cpu.max period in microseconds.
CPU_PERIOD = 100_000
#: The smallest memory.max accepted (the kernel takes less, but nothing runs in it).
MIN_MEMORY_BYTES = 1024 * 1024


class LimitError(ValueError):
    """A limit cannot be applied: bad value or missing controller. The message is for the host."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one unit; ``None`` means not limited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpu: float | None = None

    def asked(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None}


def parseLimits(payload: Mapping[str, Any] | None) -> Limits:
    """Check a request's ``limits`` object field by field (raises L{LimitError})."""
    if payload is None:
        return Limits()
    unknown = sorted(set(payload) - set(LIMIT_CONTROLLERS))
    if unknown:
        raise LimitError(f"unknown limit: {unknown[0]!r} (known: memory_bytes, pids, cpu)")

    def integer(name: str, least: int) -> int | None:
        value = payload.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise LimitError(f"limits.{name} must be an integer")
        if value < least or value > 2**62:
            raise LimitError(f"limits.{name} must be between {least} and {2**62}")
        return value

    cpu = payload.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)):
            raise LimitError("limits.cpu must be a number (a fraction of one CPU)")
        if not 0.01 <= cpu <= 1024:
            raise LimitError("limits.cpu must be between 0.01 and 1024")
    return Limits(
        memory_bytes=integer("memory_bytes", MIN_MEMORY_BYTES),
        pids=integer("pids", 1),
        cpu=None if cpu is None else float(cpu),
    )


def unifiedMount(mounts: str | None = None) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, from ``/proc/self/mounts``."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    return None


def ownCgroup(text: str | None = None) -> str | None:
    """This process's cgroup v2 path (``0::/a/b`` in ``/proc/self/cgroup``)."""
    if text is None:
        try:
            text = Path("/proc/self/cgroup").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _keyed(text: str | None) -> dict[str, int]:
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            result[key] = int(value)
        except ValueError:
            continue
    return result


class Cgroup:
    """One unit's cgroup: a directory under the tree's ``pyro-units``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def procs(self) -> Path:
        """The file a process writes its pid to, to enter this cgroup."""
        return self.path / "cgroup.procs"

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").exists()

    def pids(self) -> list[int]:
        text = _read(self.procs) or ""
        return [int(line) for line in text.split() if line.isdigit()]

    def populated(self) -> bool:
        return _keyed(_read(self.path / "cgroup.events")).get("populated", 0) == 1

    def kill(self) -> bool:
        """SIGKILL every process of the cgroup, new ones and new sessions included.

        Uses ``cgroup.kill`` (Linux 5.14); on older kernels, freezes the cgroup (so nothing
        forks meanwhile), SIGKILLs every member and thaws it.
        """
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:
            if not self.exists():
                return False
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise
        else:
            return True
        frozen = self.freeze()
        for pid in self.pids():
            _signal(pid, signal.SIGKILL)
        if frozen:
            self.thaw()
        return True

    def signal(self, signum: int) -> int:
        """Send C{signum} to every process of the cgroup; how many got it."""
        if signum == signal.SIGKILL:
            members = len(self.pids())
            self.kill()
            return members
        count = 0
        for pid in self.pids():
            count += _signal(pid, signum)
        return count

    def freeze(self) -> bool:
        """Freeze every process of the cgroup (``cgroup.freeze``); False when unsupported."""
        return self._freezer("1")

    def thaw(self) -> bool:
        return self._freezer("0")

    def _freezer(self, value: str) -> bool:
        try:
            _write(self.path / "cgroup.freeze", value)
        except OSError:
            return False
        return True

    def frozen(self) -> bool:
        return _keyed(_read(self.path / "cgroup.events")).get("frozen", 0) == 1

    def controllers(self) -> set[str]:
        return set((_read(self.path / "cgroup.controllers") or "").split())

    def applyLimits(self, limits: Limits) -> dict[str, Any]:
        """Write each limit asked for; the ``limits_applied`` answer.

        @raise LimitError: a controller is missing or the kernel refused a value.
        """
        asked = limits.asked()
        have = self.controllers()
        for name in asked:
            controller = LIMIT_CONTROLLERS[name]
            if controller not in have:
                raise LimitError(
                    f"limits.{name} needs the {controller} cgroup controller, which this"
                    " guest does not provide"
                )
        writes: list[tuple[str, str]] = []
        if limits.memory_bytes is not None:
            writes += [("memory.max", str(limits.memory_bytes)), ("memory.swap.max", "0")]
        if limits.pids is not None:
            writes.append(("pids.max", str(limits.pids)))
        if limits.cpu is not None:
            quota = max(int(limits.cpu * CPU_PERIOD), 1000)
            writes.append(("cpu.max", f"{quota} {CPU_PERIOD}"))
        for name, value in writes:
            try:
                _write(self.path / name, value)
            except FileNotFoundError:
                if name == "memory.swap.max":
                    continue  # a kernel without swap accounting has no swap to turn off
                raise LimitError(f"cannot set {name}: the kernel has no such file") from None
            except OSError as error:
                raise LimitError(
                    f"the kernel refused {name} = {value}: {error.strerror or error}"
                ) from None
        return asked

    def oomKilled(self) -> bool:
        events = _keyed(_read(self.path / "memory.events"))
        return events.get("oom_kill", 0) > 0 or events.get("oom_group_kill", 0) > 0

    def usage(self) -> dict[str, Any]:
        """``memory_peak_bytes``, ``cpu_seconds``, ``pids_peak`` (``None`` where unknown)."""
        peak = _read(self.path / "memory.peak")
        pids = _read(self.path / "pids.peak")
        cpu = _keyed(_read(self.path / "cpu.stat")).get("usage_usec")
        return {
            "memory_peak_bytes": int(peak) if peak and peak.strip().isdigit() else None,
            "cpu_seconds": None if cpu is None else cpu / 1e6,
            "pids_peak": int(pids) if pids and pids.strip().isdigit() else None,
        }

    def remove(self) -> bool:
        """Remove the (empty) cgroup; False while processes are still in it."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _signal(pid: int, signum: int) -> int:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return 0
    return 1


class CgroupTree:
    """The ``pyro-units`` directory of this agent's cgroup, and the controllers units get."""

    def __init__(self, units: Path) -> None:
        self.units = units

    @classmethod
    def detect(cls, mount: Path | None = None) -> CgroupTree | None:
        """Set the tree up at the hierarchy's root; ``None`` without a usable cgroup v2."""
        mount = unifiedMount() if mount is None else mount
        if mount is None:
            return None
        units = mount / UNITS
        try:
            units.mkdir(mode=0o755, exist_ok=True)
        except OSError as error:
            log.warn("no cgroups for units: {error}", error=str(error))
            return None
        if not (units / "cgroup.procs").exists():
            return None
        _enable(mount, units)
        return cls(units)

    @property
    def controllers(self) -> set[str]:
        """The controllers a unit cgroup gets (those enabled in ``pyro-units``)."""
        return set((_read(self.units / "cgroup.subtree_control") or "").split())

    def create(self, prefix: str) -> Cgroup:
        """A new, empty unit cgroup named C{prefix} plus a random suffix (unique on the host)."""
        path = self.units / f"{prefix}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o755)
        return Cgroup(path)

    def adopt(self, path: str) -> Cgroup | None:
        """The unit cgroup recorded as C{path}, when it is still one of ours."""
        candidate = Path(path)
        if candidate.parent != self.units or not (candidate / "cgroup.procs").exists():
            return None
        return Cgroup(candidate)


def _enable(root: Path, units: Path) -> None:
    """Hand the available controllers down to the units' cgroups, as far as allowed."""
    for parent in (root, units):
        available = set((_read(parent / "cgroup.controllers") or "").split())
        for controller in ("memory", "pids", "cpu"):
            if controller not in available:
                continue
            try:
                _write(parent / "cgroup.subtree_control", f"+{controller}")
            except OSError as error:
                log.warn(
                    "cannot enable the {controller} controller in {cgroup}: {error}",
                    controller=controller,
                    cgroup=str(parent),
                    error=str(error),
                )


def lowerOwnOomScore(value: int = -900) -> bool:
    """Make the kernel's OOM killer pick a unit's process before the agent."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(value), encoding="ascii")
    except OSError:
        return False
    return True


__all__ = [
    "Cgroup",
    "CgroupTree",
    "LimitError",
    "Limits",
    "lowerOwnOomScore",
    "ownCgroup",
    "parseLimits",
    "unifiedMount",
]

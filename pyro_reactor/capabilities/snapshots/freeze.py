"""What ``quiesce`` freezes and how: the checked request, and the freezing and thawing work.

L{parseQuiesce} turns a request into a L{FreezePlan}, refusing what must never be frozen:

  - the root filesystem (the agent, its Python and everything it would load live there: a
    frozen ``/`` hangs the agent, and with it the ``thaw`` that would undo it),
  - the filesystem holding the agent's state directory (service records, uploads in flight),
  - anything that is not a mount point of the guest's mount table (``/proc/self/mountinfo``),
    or that is a kernel filesystem (``proc``, ``sysfs``, ``cgroup2``...) with nothing to sync.

A guest path under ``/workspace`` names the agent's workspace directory, as everywhere else in
the protocol; other paths are the guest's own.

L{FreezeWork} does the work for the machine (L{pyro_reactor.capabilities.snapshots._machine}):
jobs first (so that they stop writing), then ``sync()``, then ``FIFREEZE`` on each mount, in a
worker thread because freezing writes out dirty data first. A failure half-way thaws what was
already frozen before it is answered: a failed ``quiesce`` leaves nothing frozen. Thawing runs
on the reactor thread: ``FITHAW`` never blocks, and every worker thread may be blocked writing
to the frozen filesystem on a host's behalf, so a thaw queued behind them would never run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.snapshots.kernel import GuestKernel
from pyro_reactor.errors import ActionError
from pyro_reactor.hooks import Freezable
from pyro_reactor.wire.request import Request

log = Logger(namespace="pyro_reactor.capabilities.snapshots")

#: Seconds after which the agent thaws by itself when ``timeout_seconds`` is not given.
DEFAULT_TIMEOUT = 30.0
#: The longest ``timeout_seconds`` accepted: a guest frozen for longer is a guest lost.
MAX_TIMEOUT = 3600.0
#: Filesystems with nothing to sync or freeze.
KERNEL_FILESYSTEMS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "proc",
        "pstore",
        "securityfs",
        "selinuxfs",
        "sysfs",
        "tracefs",
    }
)

GUEST_WORKSPACE = PurePosixPath("/workspace")


@dataclass(frozen=True)
class FreezeTarget:
    """A mount to freeze: as the request named it, and where it is in this agent's view."""

    name: str
    path: str


@dataclass(frozen=True)
class FreezePlan:
    """A checked ``quiesce`` request."""

    targets: tuple[FreezeTarget, ...]
    freezeJobs: bool
    timeout: float


@dataclass(frozen=True)
class Frozen:
    """What a ``quiesce`` froze, and when the agent thaws it by itself."""

    targets: tuple[FreezeTarget, ...]
    freezables: tuple[Freezable, ...]
    jobsFrozen: int
    timeout: float
    deadline: float

    def answer(self) -> dict[str, Any]:
        return {
            "synced": True,
            "frozen": [target.name for target in self.targets],
            "jobs_frozen": self.jobsFrozen,
            "thaw_deadline": round(self.deadline, 3),
        }


NOTHING_THAWED: dict[str, Any] = {"thawed": [], "jobs_thawed": 0}


def parseQuiesce(
    request: Request, kernel: GuestKernel, workspace: Path, stateDir: Path
) -> FreezePlan:
    """Check a ``quiesce`` request against the guest's mount table."""
    timeout = request.fields.get("timeout_seconds")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise ActionError(
            f"timeout_seconds must be a number of seconds, above 0 and at most {MAX_TIMEOUT:g}"
        )
    names = request.fields.get("freeze")
    if names is None:
        names = []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ActionError("freeze must be a list of guest mount points")
    targets = _resolveTargets(names, kernel, workspace, stateDir) if names else ()
    return FreezePlan(targets, request.boolean("freeze_jobs", False), float(timeout))


def _hostPath(name: str, workspace: Path) -> str:
    if not name.startswith("/") or "\x00" in name:
        raise ActionError(f"freeze: {name!r} must be an absolute guest path")
    guest = PurePosixPath(os.path.normpath(name))
    if guest == GUEST_WORKSPACE or GUEST_WORKSPACE in guest.parents:
        return str(workspace / guest.relative_to(GUEST_WORKSPACE))
    return str(guest)


def _device(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def _resolveTargets(
    names: Sequence[str], kernel: GuestKernel, workspace: Path, stateDir: Path
) -> tuple[FreezeTarget, ...]:
    mountTypes = {mount.mountPoint: mount.fsType for mount in kernel.mounts()}
    rootDevice, stateDevice = _device("/"), _device(str(stateDir))
    targets: list[FreezeTarget] = []
    seen: set[int] = set()
    for name in names:
        path = os.path.realpath(_hostPath(name, workspace))
        device = _device(path)
        if path == "/" or (device is not None and device == rootDevice):
            raise ActionError(
                f"freeze: {name} is the root filesystem; freezing it would hang the agent"
            )
        if device is None:
            raise ActionError(f"freeze: {name} does not exist in the guest")
        if path not in mountTypes:
            raise ActionError(f"freeze: {name} is not a mount point of the guest")
        if mountTypes[path] in KERNEL_FILESYSTEMS:
            raise ActionError(
                f"freeze: {name} is a {mountTypes[path]} filesystem, which cannot be frozen"
            )
        if device == stateDevice:
            raise ActionError(
                f"freeze: {name} holds the agent's state directory; freezing it would hang"
                " the agent"
            )
        if device in seen:
            continue  # the same filesystem named twice (a bind mount): frozen once
        seen.add(device)
        targets.append(FreezeTarget(name, path))
    return tuple(targets)


def _sumCounts(
    freezables: Sequence[Freezable], call: Callable[[Freezable], Deferred[int]]
) -> Deferred[list[int]]:
    return gatherResults([maybeDeferred(call, item) for item in freezables], consumeErrors=True)


@dataclass
class FreezeWork:
    """The freezing and thawing a L{FreezerMachine} asks for (its Core's work)."""

    kernel: GuestKernel
    freezables: Callable[[], Sequence[Freezable]]
    inThread: Callable[..., Deferred[Any]]
    wallclock: Callable[[], float]

    def freeze(self, plan: FreezePlan) -> Deferred[Frozen]:
        """Freeze jobs, sync, freeze mounts; undo all of it if any step fails."""
        freezables = tuple(self.freezables()) if plan.freezeJobs else ()
        jobs = _sumCounts(freezables, lambda item: item.freeze())

        def jobsFrozen(counts: list[int]) -> Deferred[Frozen]:
            frozen = self.inThread(self._syncAndFreeze, plan.targets)

            def done(_: None) -> Frozen:
                return Frozen(
                    targets=plan.targets,
                    freezables=freezables,
                    jobsFrozen=sum(counts),
                    timeout=plan.timeout,
                    deadline=self.wallclock() + plan.timeout,
                )

            def mountsFailed(failure: Failure) -> Deferred[Frozen]:
                thawed = _sumCounts(freezables, lambda item: item.thaw())
                return thawed.addBoth(lambda _: failure)

            return frozen.addCallbacks(done, mountsFailed)

        def jobsFailed(failure: Failure) -> Failure:
            # Some froze, one failed: thaw every one (thawing a thawed unit is harmless).
            _sumCounts(freezables, lambda item: item.thaw()).addErrback(lambda _: None)
            if isinstance(failure.value, FirstError):
                failure = failure.value.subFailure
            if failure.check(ActionError):
                return failure
            return Failure(ActionError(f"could not freeze the jobs: {failure.value}"))

        return jobs.addCallbacks(jobsFrozen, jobsFailed)

    def _syncAndFreeze(self, targets: Sequence[FreezeTarget]) -> None:
        self.kernel.sync()
        done: list[FreezeTarget] = []
        for target in targets:
            try:
                self.kernel.freeze(target.path)
            except OSError as error:
                for earlier in reversed(done):
                    try:
                        self.kernel.thaw(earlier.path)
                    except OSError:
                        pass
                raise ActionError(
                    f"could not freeze {target.name}: {error.strerror or error}"
                ) from None
            done.append(target)

    def thaw(self, frozen: Frozen) -> Deferred[dict[str, Any]]:
        """Thaw the mounts (at once, on this thread), then the jobs; never fails."""
        thawed = []
        for target in frozen.targets:
            try:
                self.kernel.thaw(target.path)
            except OSError as error:
                # EINVAL: someone else thawed it already. Either way it is not frozen by us.
                log.warn("could not thaw {mount}: {error}", mount=target.name, error=error.strerror)
            else:
                thawed.append(target.name)
        jobs = _sumCounts(frozen.freezables, lambda item: item.thaw())

        def answer(counts: list[int] | Failure) -> dict[str, Any]:
            if isinstance(counts, Failure):
                log.failure("could not thaw every job", counts)
                counts = []
            return {"thawed": thawed, "jobs_thawed": sum(counts)}

        return jobs.addBoth(answer)

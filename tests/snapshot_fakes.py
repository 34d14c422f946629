"""Fakes for the snapshot tests: a kernel that never touches this machine's clock or pool."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock

from pyro_reactor.system._linux_snapshot import Mount


@dataclass
class FakeKernel:
    """A L{GuestKernel} that records calls; its wall clock is the C{Clock} given to it.

    Setting the wall clock advances the C{Clock}, as stepping ``CLOCK_REALTIME`` moves
    ``reactor.seconds`` (``time.time``) of a real reactor. ``denied`` names the calls that fail
    with ``EPERM``, as they do without ``CAP_SYS_TIME``/``CAP_SYS_ADMIN``.
    """

    clock: Clock
    denied: set[str] = field(default_factory=set)
    mountTable: list[Mount] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    frozenPaths: set[str] = field(default_factory=set)
    failFreeze: set[str] = field(default_factory=set)

    def _check(self, name: str) -> None:
        if name in self.denied:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    def realtime(self) -> float:
        return self.clock.seconds()

    def setRealtime(self, unixTime: float) -> None:
        self._check("setRealtime")
        self.calls.append(("setRealtime", unixTime))
        self.clock.advance(unixTime - self.clock.seconds())

    def addEntropy(self, data: bytes) -> None:
        self._check("addEntropy")
        self.calls.append(("addEntropy", data))

    def mixEntropy(self, data: bytes) -> None:
        self._check("mixEntropy")
        self.calls.append(("mixEntropy", data))

    def reseed(self) -> None:
        self._check("reseed")
        self.calls.append(("reseed", None))

    def sync(self) -> None:
        self.calls.append(("sync", None))

    def freeze(self, path: str) -> None:
        if path in self.failFreeze:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        if path in self.frozenPaths:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.calls.append(("freeze", path))
        self.frozenPaths.add(path)

    def thaw(self, path: str) -> None:
        if path not in self.frozenPaths:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.calls.append(("thaw", path))
        self.frozenPaths.discard(path)

    def mounts(self) -> list[Mount]:
        return list(self.mountTable)

"""The kernel as the snapshot actions see it: a small interface, the real one, nothing else.

Tests give the actions a fake L{GuestKernel} (a clock that does not move this machine's clock,
a pool that records what it was given, an ioctl that fails with ``EPERM``); the agent gives
them L{LinuxKernel}, whose methods are the system calls of
L{pyro_reactor.system._linux_snapshot}.
"""

from __future__ import annotations

import os
from typing import Protocol

from pyro_reactor.system import _linux_snapshot as linux
from pyro_reactor.system._linux_snapshot import Mount


class GuestKernel(Protocol):
    """What ``restored``, ``quiesce`` and ``thaw`` ask of the kernel; each may raise OSError."""

    def realtime(self) -> float:
        """The wall clock, seconds since the epoch."""

    def setRealtime(self, unixTime: float) -> None:
        """Step the wall clock."""

    def addEntropy(self, data: bytes) -> None:
        """Mix bytes into the input pool, credited."""

    def mixEntropy(self, data: bytes) -> None:
        """Mix bytes into the input pool without credit."""

    def reseed(self) -> None:
        """Reseed the CRNG from the input pool now."""

    def sync(self) -> None:
        """Write every dirty buffer of every filesystem out."""

    def freeze(self, path: str) -> None:
        """``FIFREEZE`` the filesystem mounted at C{path}."""

    def thaw(self, path: str) -> None:
        """``FITHAW`` the filesystem mounted at C{path}."""

    def mounts(self) -> list[Mount]:
        """This mount namespace's mounts."""


class LinuxKernel:
    """L{GuestKernel} by system calls."""

    def realtime(self) -> float:
        return linux.realtime()

    def setRealtime(self, unixTime: float) -> None:
        linux.setRealtime(unixTime)

    def addEntropy(self, data: bytes) -> None:
        linux.addEntropy(data)

    def mixEntropy(self, data: bytes) -> None:
        linux.mixEntropy(data)

    def reseed(self) -> None:
        linux.reseedCrng()

    def sync(self) -> None:
        os.sync()

    def freeze(self, path: str) -> None:
        linux.freezeFilesystem(path)

    def thaw(self, path: str) -> None:
        linux.thawFilesystem(path)

    def mounts(self) -> list[Mount]:
        return linux.mounts()

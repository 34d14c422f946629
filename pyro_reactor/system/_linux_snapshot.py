"""Kernel calls the snapshot actions need: the wall clock, the entropy pool, filesystem freeze.

Every function here is one or two system calls; callers decide which thread runs them.

  - The wall clock: ``clock_settime(CLOCK_REALTIME)`` (needs ``CAP_SYS_TIME``).
  - Entropy: ``RNDADDENTROPY`` on ``/dev/random`` adds bytes to the input pool and credits them
    (needs ``CAP_SYS_ADMIN``); ``RNDRESEEDCRNG`` makes the CRNG take a new key from the pool at
    once instead of at its next scheduled reseed (``CAP_SYS_ADMIN``). Writing to
    ``/dev/urandom`` mixes bytes in without credit and without a reseed (anyone may).
  - ``FIFREEZE``/``FITHAW`` on a directory of the filesystem (``CAP_SYS_ADMIN``).
  - The mount table of this mount namespace, from ``/proc/self/mountinfo``.

Each raises ``OSError`` as the kernel answers (``EPERM`` without the capability).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

#: ``_IOW('R', 0x03, int[2])``: add entropy and credit it.
RNDADDENTROPY = 0x40085203
#: ``_IO('R', 0x07)``: reseed the CRNG from the input pool now.
RNDRESEEDCRNG = 0x5207
#: ``_IOWR('X', 119, int)`` and ``_IOWR('X', 120, int)``.
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def realtime() -> float:
    """The wall clock (``CLOCK_REALTIME``), seconds since the epoch."""
    return time.clock_gettime(time.CLOCK_REALTIME)


def setRealtime(unixTime: float) -> None:
    """Step the wall clock to C{unixTime}."""
    time.clock_settime_ns(time.CLOCK_REALTIME, round(unixTime * 1e9))


def addEntropy(data: bytes, device: str = "/dev/random") -> None:
    """Mix C{data} into the input pool and credit all of its bits."""
    request = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
    finally:
        os.close(fd)


def mixEntropy(data: bytes, device: str = "/dev/urandom") -> None:
    """Mix C{data} into the input pool without credit (no capability needed)."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def reseedCrng(device: str = "/dev/random") -> None:
    """Make the kernel's CRNG take a fresh key from the input pool now."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _onDirectory(path: str, request: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freezeFilesystem(path: str) -> None:
    """``FIFREEZE`` the filesystem mounted at C{path}: writes to it block until thawed."""
    _onDirectory(path, FIFREEZE)


def thawFilesystem(path: str) -> None:
    """``FITHAW`` the filesystem mounted at C{path} (``EINVAL`` when it is not frozen)."""
    _onDirectory(path, FITHAW)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, which device, what type."""

    mountPoint: str
    device: str
    fsType: str


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    """The mounts of this mount namespace, in the kernel's order."""
    result = []
    for line in mountinfo.read_text(errors="surrogateescape").splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        result.append(
            Mount(
                mountPoint=_unescape(fields[4]),
                device=fields[2],
                fsType=fields[separator + 1],
            )
        )
    return result

"""Linux system calls the standard library lacks, called through ctypes, in one place.

- ``openat2(2)`` (Linux 5.6+) with its ``RESOLVE_*`` flags: the kernel confines a path
  beneath a directory descriptor (L{openat2Function}).
- ``renameat2(2)`` with ``RENAME_EXCHANGE``: two entries swapped atomically (L{exchange}).

Each is looked up once and probed: on a kernel or sandbox without it, callers get ``None`` or
``False`` and take their portable way. Nothing here touches Twisted.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

from pyro_reactor.system.fds import DIRECTORY_FLAGS

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# openat2 has the same number on every architecture using the unified syscall table
# (x86_64, i386, aarch64, arm, riscv64, ppc64, s390x...); elsewhere callers use the walk.
_OPENAT2_SYSCALLS = dict.fromkeys(
    (
        "x86_64",
        "amd64",
        "i386",
        "i686",
        "aarch64",
        "arm64",
        "armv7l",
        "armv8l",
        "riscv64",
        "ppc64le",
        "ppc64",
        "s390x",
    ),
    437,
)

Openat2 = Callable[[int, bytes, int, int], int]
"""``openat2(dirfd, path, flags, resolve)``: a new descriptor, or ``OSError``."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once (the process's own symbols: no search, no ``ldconfig``),
    with ``errno`` kept for ``ctypes.get_errno``; C{None} if it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def libcFunction(name: str, argtypes: Sequence[Any] | None, restype: Any) -> Any:
    """The C library's function C{name}, typed; C{None} where there is no such function (no C
    library, or one without it, as musl has no ``malloc_trim``)."""
    library = libc()
    try:
        function = getattr(library, name) if library is not None else None
    except AttributeError:
        return None
    if function is None:
        return None
    if argtypes is not None:
        function.argtypes = argtypes
    function.restype = restype
    return function


@functools.cache
def openat2Function() -> Openat2 | None:
    """This machine's ``openat2(dirfd, path, flags, resolve)``, or ``None`` if it has none."""
    number = _OPENAT2_SYSCALLS.get(platform.machine())
    syscall = libcFunction("syscall", None, ctypes.c_long) if number is not None else None
    if number is None or syscall is None:
        return None
    return probedOpenat2(syscall, number)


def probedOpenat2(syscall: Callable[..., int], number: int) -> Openat2 | None:
    """``openat2`` through ``syscall``, if one call of it works here.

    A kernel older than 5.6 answers ``ENOSYS``, a seccomp sandbox often ``EPERM``: either way
    (or any other failure) ``None``.
    """

    def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        how = _OpenHow(flags=flags, mode=0, resolve=resolve)
        result = syscall(
            ctypes.c_long(number),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(result)

    try:
        probe = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.close(openat2(probe, b".", DIRECTORY_FLAGS, _STRICT))
    except OSError:
        return None
    finally:
        os.close(probe)
    return openat2


_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    return libcFunction(
        "renameat2",
        (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint),
        ctypes.c_int,
    )


def exchange(dirfd: int, first: str, second: str) -> bool:
    """Atomically swap two entries of ``dirfd``; ``False`` if this system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(dirfd, os.fsencode(first), dirfd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code))


__all__ = [
    "RESOLVE_BENEATH",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "exchange",
    "openat2Function",
    "probedOpenat2",
]

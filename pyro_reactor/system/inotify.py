"""One inotify instance on the reactor, with the raw events Twisted's callbacks leave out.

Used by workspace watches (``capabilities/watch``) and by the jobs' output follower
(``capabilities/jobs/follow.py``), which reads batches of thousands of events a second: raw
parsing costs a few microseconds an event, Twisted's ``FilePath`` per event far more.

L{openINotify} makes a L{twisted.internet.inotify.INotify}: Twisted creates the descriptor
(non-blocking, close-on-exec), reads it on the reactor when it is readable (no thread, no
polling) and closes it with ``loseConnection``. Two things of Twisted's ``watch`` API do not fit
a workspace watch, so they are done here instead:

- its callbacks get neither the rename cookie (needed to pair ``IN_MOVED_FROM`` with
  ``IN_MOVED_TO``) nor ``IN_Q_OVERFLOW``, and its ``IN_DELETE_SELF`` handling closes the whole
  descriptor when any watched subdirectory is deleted: its ``doRead`` is replaced by one that
  parses the events itself and hands each batch, cookies included, to C{onEvents};
- its ``add`` loses ``errno``, so the kernel's watch limit (``ENOSPC``) cannot be told from a
  directory that vanished: L{addWatch} calls ``inotify_add_watch`` through ctypes with
  ``use_errno``.

Watches are added on ``/proc/self/fd/N`` of a directory the workspace opened (confined, no
symlink crossed): the kernel resolves that magic link to the opened directory itself, so what is
watched is exactly what was checked, never a name that could be swapped meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyro_reactor.system._linux import libc

# The kernel's inotify(7) ABI (the same numbers as twisted.internet.inotify's, which is only
# imported when a watch starts: loading it looks libc up, a cost every agent start would pay).
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_EXCL_UNLINK = 0x04000000

WATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
"""What a workspace watch asks the kernel for (no ``IN_MODIFY``: a write burst to one file is
reported once, on close-after-write)."""

READ_SIZE = 64 * 1024
"""Bytes read from the inotify descriptor at a time."""

_EVENT = struct.Struct("iIII")
_MAX_EVENT = _EVENT.size + 256


class WatchLimitError(OSError):
    """The kernel's limit on inotify watches (``fs.inotify.max_user_watches``) is reached."""


_libc: Any = None


def _library() -> Any:
    global _libc  # loaded once, on first use
    if _libc is None:
        library = libc()
        if library is None:
            raise OSError(errno.ENOSYS, "no C library to call inotify through")
        library.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        library.inotify_add_watch.restype = ctypes.c_int
        library.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        library.inotify_rm_watch.restype = ctypes.c_int
        _libc = library
    return _libc


def addWatch(inotifyFD: int, directoryFD: int, mask: int = WATCH_MASK) -> int:
    """Watch the directory open as ``directoryFD``; its watch descriptor.

    Raises L{WatchLimitError} at the kernel's watch limit, ``OSError`` otherwise.
    """
    path = b"/proc/self/fd/%d" % directoryFD
    wd: int = _library().inotify_add_watch(inotifyFD, path, mask)
    if wd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOSPC:
            raise WatchLimitError(code, "inotify watch limit reached (fs.inotify.max_user_watches)")
        raise OSError(code, os.strerror(code))
    return wd


def removeWatch(inotifyFD: int, wd: int) -> None:
    """Stop watching ``wd`` (quietly: the kernel may have dropped it already)."""
    _library().inotify_rm_watch(inotifyFD, wd)


@dataclass(frozen=True)
class RawEvent:
    """One inotify event as the kernel wrote it."""

    wd: int
    mask: int
    cookie: int
    name: str


def parseEvents(buffer: bytes) -> tuple[list[RawEvent], bytes]:
    """The whole events at the start of ``buffer``, and what is left of it."""
    events: list[RawEvent] = []
    offset = 0
    size = len(buffer)
    while size - offset >= _EVENT.size:
        wd, mask, cookie, length = _EVENT.unpack_from(buffer, offset)
        end = offset + _EVENT.size + length
        if end > size:
            break
        raw = buffer[offset + _EVENT.size : end].split(b"\0", 1)[0]
        events.append(RawEvent(wd, mask, cookie, os.fsdecode(raw)))
        offset = end
    return events, buffer[offset:]


EventsCallback = Callable[[list[RawEvent], bool], None]

_RawINotify: Any = None


def openINotify(onEvents: EventsCallback, reactor: Any = None) -> Any:
    """A new L{twisted.internet.inotify.INotify} whose batches of raw events (cookies
    included) go to ``onEvents(events, drained)``: ``drained`` is true when the read was short,
    i.e. the kernel's queue held no more at that moment."""
    global _RawINotify  # defined once, on first use
    if _RawINotify is None:
        from twisted.internet import inotify  # noqa: PLC0415 (on first use, see above)

        class RawINotify(inotify.INotify):
            def __init__(self, onEvents: EventsCallback, reactor: Any = None) -> None:
                super().__init__(reactor=reactor)
                self.onEvents = onEvents
                self._rest = b""

            def doRead(self) -> object:
                try:
                    data = os.read(self.fileno(), READ_SIZE)
                except BlockingIOError:
                    return None
                except OSError as error:
                    return error  # the reactor's way to say the descriptor is lost
                if not data:
                    return None
                events, self._rest = parseEvents(self._rest + data)
                self.onEvents(events, len(data) <= READ_SIZE - _MAX_EVENT)
                return None

        _RawINotify = RawINotify
    return _RawINotify(onEvents, reactor)

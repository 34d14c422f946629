"""What a workspace watch watches, and how kernel events become the stream's event lines.

A L{WatchTree} keeps one inotify watch per directory of the watched tree (only the root when
not recursive) and the guest path of each, and turns each batch of raw events into lines:

- ``IN_CREATE`` -> ``created``; a new directory is watched at once (opened through the
  workspace, no symlink crossed) and scanned once, so entries made in it before its watch
  was in place are reported too (``mkdir -p a/b && touch a/b/c`` is seen whole); an entry
  both scanned and then reported by the kernel is reported once;
- ``IN_CLOSE_WRITE`` -> ``modified`` (once per close after writing, not once per write);
- ``IN_DELETE`` -> ``deleted``;
- ``IN_MOVED_FROM`` + ``IN_MOVED_TO`` with the same cookie -> ``moved`` with ``from``; a
  ``IN_MOVED_FROM`` left unpaired (moved out of the watched tree) becomes ``deleted`` and
  an unpaired ``IN_MOVED_TO`` (moved in) ``created``;
- ``IN_Q_OVERFLOW`` -> ``overflow`` (the kernel dropped events: the host should rescan); the
  tree is walked again (on the reactor) so that directories whose creation was dropped are
  watched from then on;
- the watched root deleted, moved away or unmounted -> ``deleted`` with its own path, and the
  stream ends.

A directory moved out of the tree has its watches removed, so nothing outside the watched
tree is ever reported; a directory moved within the tree keeps its watches under its new path.
Symlinks are reported as entries and never followed.

The first placement (the whole tree, possibly large) runs in a worker thread before the
descriptor is read; placing a watch on a directory that appears later (a handful of
syscalls, plus one listing) is done on the reactor at once, so that its events stay in order
with the rest.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pyro_reactor.errors import ActionError
from pyro_reactor.system.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    RawEvent,
    WatchLimitError,
    addWatch,
    removeWatch,
)
from pyro_reactor.system.workspace import WORKSPACE_ROOT, Workspace, WorkspaceError

log = Logger(namespace="pyro_reactor.capabilities.watch")

Parts = tuple[str, ...]
Event = dict[str, Any]

MOVE_PAIRING_WAIT = 0.01
"""Seconds an ``IN_MOVED_FROM`` that ended a read waits for its ``IN_MOVED_TO``."""


def guestText(parts: Parts) -> str:
    return str(WORKSPACE_ROOT.joinpath(*parts))


class WatchTree:
    """The watches of one stream and the translation of its events.

    @param emit: called with each event line (a ``dict``), in order.
    @param rootGone: called once the watched root is gone (after its ``deleted`` line).
    """

    def __init__(
        self,
        *,
        workspace: Workspace,
        inotifyFD: int,
        root: Parts,
        recursive: bool,
        clock: IReactorTime,
        emit: Callable[[Event], None],
        rootGone: Callable[[], None],
    ) -> None:
        self.workspace = workspace
        self.fd = inotifyFD
        self.root = root
        self.recursive = recursive
        self.clock = clock
        self.emit = emit
        self.rootGone = rootGone
        self.paths: dict[int, Parts] = {}
        self.wds: dict[Parts, int] = {}
        self.rootWd = -1
        self._pendingMove: tuple[int, Parts, bool] | None = None
        self._moveTimer: IDelayedCall | None = None
        # (wd, name) of entries reported by a scan: the kernel's own event for them, if it
        # comes, is not reported again. Dropped once a drained read shows no such event can
        # still be queued.
        self._scanned: set[tuple[int, str]] = set()
        self._scannedEarlier: set[tuple[int, str]] = set()
        self.ended = False

    # -- placement ---------------------------------------------------------------------------

    def placeInitial(self) -> list[Event]:
        """Watch the root (and, recursively, every directory below it). Blocking: run in a
        worker thread before the descriptor is read. Returns ``error`` event lines for
        directories that could not be watched; raises L{ActionError} if the root cannot."""
        display = guestText(self.root)
        rootFD = self.workspace.openDirectory(self.root)
        try:
            try:
                self.rootWd = self._add(rootFD, self.root)
            except WatchLimitError as error:
                raise ActionError(f"cannot watch {display}: {error.strerror}") from None
            except OSError as error:
                raise ActionError(f"cannot watch {display}: {error.strerror}") from None
            if not self.recursive:
                return []
            return self._placeBelow(rootFD, self.root, scan=False)
        finally:
            os.close(rootFD)

    def _add(self, directoryFD: int, parts: Parts) -> int:
        wd = addWatch(self.fd, directoryFD)
        old = self.paths.get(wd)
        if old is not None and old != parts:
            self._remap(old, parts)
        self.paths[wd] = parts
        self.wds[parts] = wd
        return wd

    def _placeBelow(self, directoryFD: int, parts: Parts, scan: bool) -> list[Event]:
        """Watch every directory below the open ``directoryFD``; with ``scan``, report every
        entry found as ``created`` (it appeared before its directory was watched)."""
        errors: list[Event] = []
        skipped = 0
        stack: list[tuple[int, Parts]] = [(os.dup(directoryFD), parts)]
        try:
            while stack:
                fd, here = stack.pop()
                try:
                    entries = self._entries(fd)
                    for name, mode, size in entries:
                        child = (*here, name)
                        isDir = stat.S_ISDIR(mode)
                        if scan and not (isDir and child in self.wds):
                            self._emitScanned(here, name, isDir, stat.S_ISREG(mode) and size > 0)
                        if not isDir:
                            continue
                        if errors:
                            skipped += 1
                            continue
                        childFD = self.workspace.openChildDirectory(fd, name)
                        if childFD is None:
                            continue
                        try:
                            self._add(childFD, child)
                        except WatchLimitError as error:
                            os.close(childFD)
                            errors.append(self._limitEvent(child, error))
                            continue
                        except OSError:
                            os.close(childFD)
                            continue
                        stack.append((childFD, child))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)
        if skipped and errors:
            errors[0]["error"] += f"; {skipped} more directories below are not watched either"
        return errors

    @staticmethod
    def _entries(fd: int) -> list[tuple[str, int, int]]:
        result = []
        try:
            with os.scandir(fd) as listing:
                for entry in listing:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    result.append((entry.name, info.st_mode, info.st_size))
        except OSError:
            return []
        result.sort()
        return result

    def _limitEvent(self, parts: Parts, error: OSError) -> Event:
        text = guestText(parts)
        return {
            "event": "error",
            "path": text,
            "error": f"{error.strerror}: {text} is not watched",
        }

    def _emitScanned(self, parent: Parts, name: str, isDir: bool, written: bool) -> None:
        wd = self.wds.get(parent)
        if wd is not None:
            self._scanned.add((wd, name))
        text = guestText((*parent, name))
        self.emit({"event": "created", "path": text, "is_dir": isDir})
        if written:
            self.emit({"event": "modified", "path": text, "is_dir": False})

    def _watchNew(self, parts: Parts) -> None:
        """A directory appeared in the tree: watch it and what it already holds."""
        if not self.recursive:
            return
        try:
            fd = self.workspace.openDirectory(parts)
        except (WorkspaceError, OSError):
            return  # gone or replaced already: its own events say so
        try:
            try:
                self._add(fd, parts)
            except WatchLimitError as error:
                self.emit(self._limitEvent(parts, error))
                return
            except OSError:
                return
            for line in self._placeBelow(fd, parts, scan=True):
                self.emit(line)
        finally:
            os.close(fd)

    def _rewatch(self) -> None:
        """After an overflow: watch the directories whose creation events were dropped (the
        ones already watched keep their watch). Nothing is reported: the host rescans."""
        if not self.recursive:
            return
        try:
            fd = self.workspace.openDirectory(self.root)
        except (WorkspaceError, OSError):
            return  # the root is going: its own event ends the stream
        try:
            for line in self._placeBelow(fd, self.root, scan=False):
                self.emit(line)
        finally:
            os.close(fd)

    def _remap(self, old: Parts, new: Parts) -> None:
        size = len(old)
        for wd, parts in list(self.paths.items()):
            if parts[:size] == old:
                moved = new + parts[size:]
                self.paths[wd] = moved
                if self.wds.get(parts) == wd:
                    del self.wds[parts]
                self.wds[moved] = wd

    def _drop(self, top: Parts) -> None:
        size = len(top)
        for wd, parts in list(self.paths.items()):
            if parts[:size] == top:
                removeWatch(self.fd, wd)
                self._forget(wd)

    def _forget(self, wd: int) -> None:
        parts = self.paths.pop(wd, None)
        if parts is not None and self.wds.get(parts) == wd:
            del self.wds[parts]

    # -- events ------------------------------------------------------------------------------

    def handle(self, events: list[RawEvent], drained: bool) -> None:
        """Translate one batch read from the descriptor."""
        for event in events:
            if self.ended:
                return
            self._handleOne(event)
        if self.ended:
            return
        if self._pendingMove is not None and self._moveTimer is None:
            self._moveTimer = self.clock.callLater(MOVE_PAIRING_WAIT, self._flushMove)
        if drained:
            self._scannedEarlier = self._scanned
            self._scanned = set()
        else:
            self._scannedEarlier |= self._scanned
            self._scanned = set()

    def _handleOne(self, event: RawEvent) -> None:
        mask = event.mask
        if mask & IN_Q_OVERFLOW:
            self._flushMove()
            self.emit({"event": "overflow"})
            self._rewatch()
            return
        parts = self.paths.get(event.wd)
        if parts is None:
            return
        if mask & IN_IGNORED:
            self._forget(event.wd)
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if event.wd == self.rootWd:
                self._flushMove()
                self.emit({"event": "deleted", "path": guestText(parts), "is_dir": True})
                self.end()
                self.rootGone()
            return
        if not event.name:
            return
        isDir = bool(mask & IN_ISDIR)
        child = (*parts, event.name)
        key = (event.wd, event.name)
        scanned = key in self._scanned or key in self._scannedEarlier
        if scanned:
            self._scanned.discard(key)
            self._scannedEarlier.discard(key)
        pending = self._pendingMove
        if pending is not None and not (mask & IN_MOVED_TO and event.cookie == pending[0]):
            self._flushMove()
            pending = None
        if mask & IN_MOVED_FROM:
            self._pendingMove = (event.cookie, child, isDir)
            return
        if mask & IN_MOVED_TO:
            if pending is not None:
                self._pendingMove = None
                self._cancelMoveTimer()
                self.emit(
                    {
                        "event": "moved",
                        "path": guestText(child),
                        "from": guestText(pending[1]),
                        "is_dir": isDir,
                    }
                )
                if isDir:
                    self._remap(pending[1], child)
                return
            self._created(child, isDir, scanned)
        elif mask & IN_CREATE:
            self._created(child, isDir, scanned)
        elif mask & IN_DELETE:
            self.emit({"event": "deleted", "path": guestText(child), "is_dir": isDir})
            if isDir:
                self._drop(child)
        elif mask & IN_CLOSE_WRITE:
            self.emit({"event": "modified", "path": guestText(child), "is_dir": False})

    def _created(self, child: Parts, isDir: bool, scanned: bool) -> None:
        if not scanned:
            self.emit({"event": "created", "path": guestText(child), "is_dir": isDir})
        if isDir and child not in self.wds:
            self._watchNew(child)

    def _flushMove(self) -> None:
        self._cancelMoveTimer()
        pending, self._pendingMove = self._pendingMove, None
        if pending is None or self.ended:
            return
        _, parts, isDir = pending
        self.emit({"event": "deleted", "path": guestText(parts), "is_dir": isDir})
        if isDir:
            self._drop(parts)

    def _cancelMoveTimer(self) -> None:
        if self._moveTimer is not None and self._moveTimer.active():
            self._moveTimer.cancel()
        self._moveTimer = None

    def end(self) -> None:
        """Stop translating (the stream is over); pending timers are cancelled."""
        self.ended = True
        self._cancelMoveTimer()
        self._pendingMove = None

"""Listing directories and walking trees through descriptors, never following a symlink.

L{children} lists one open directory; L{walkTree} walks everything below one, depth first in
name order, with a stack of open descriptors of its own (no recursion: a guest can make a tree
deeper than Python's recursion limit). Listing a workspace and exporting an archive both walk
with it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator
from typing import NamedTuple

from pyro_reactor.system.fds import DIRECTORY_FLAGS
from pyro_reactor.system.workspace.paths import checkComponent


class Child(NamedTuple):
    """One entry of a listed directory: its name, ``lstat`` result and symlink target."""

    name: str
    stat: os.stat_result
    linkTarget: str | None = None


def children(dirfd: int) -> list[Child]:
    """The entries of the open directory ``dirfd``, sorted by name, each ``lstat``-ed.

    Symlinks carry their target text. An entry that vanishes while listed is skipped, and so
    is a symlink replaced by something else between its ``lstat`` and ``readlink``.
    """
    result: list[Child] = []
    with os.scandir(dirfd) as entries:
        names = [entry.name for entry in entries]
    for name in sorted(names):
        try:
            info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=dirfd) if stat.S_ISLNK(info.st_mode) else None
        except FileNotFoundError:
            continue
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            continue  # a symlink replaced by something else since the stat: changing
        result.append(Child(name, info, target))
    return result


def openChildDirectory(dirfd: int, name: str) -> int | None:
    """A descriptor of the subdirectory ``name`` of ``dirfd``, or ``None`` if it is not one.

    ``None`` also when it was replaced (by a symlink, say) since it was listed.
    """
    checkComponent(name)
    try:
        return os.open(name, DIRECTORY_FLAGS, dir_fd=dirfd)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


class TreeEntry(NamedTuple):
    """One entry met by L{walkTree}.

    ``parent`` is the open descriptor of the directory holding it, valid until the walk
    moves on; ``path`` is the entry's name joined to the walk's prefix with ``/``.
    """

    parent: int
    path: str
    child: Child

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def stat(self) -> os.stat_result:
        return self.child.stat

    @property
    def isDirectory(self) -> bool:
        return stat.S_ISDIR(self.child.stat.st_mode)


def walkTree(
    top: int, prefix: str = "", *, recursive: bool = True
) -> Generator[TreeEntry, None, None]:
    """Every entry below the open directory ``top``, depth first, each directory's in name order.

    A directory is yielded before its content. ``top`` itself is neither yielded nor closed;
    the descriptors the walk opens are closed as it leaves each directory, and all of them
    when the iterator is closed or dropped early. A directory replaced since it was listed
    (by a symlink, say) is yielded but not entered. Without ``recursive``, only ``top``'s own
    entries.
    """
    # Each level: an open directory (None: top, not ours to close), its path, and its
    # children still to visit (reversed, so that pop() takes them in order).
    stack: list[tuple[int | None, int, str, list[Child]]] = [
        (None, top, prefix, children(top)[::-1])
    ]
    try:
        while stack:
            owned, directory, text, pending = stack[-1]
            if not pending:
                stack.pop()
                if owned is not None:
                    os.close(owned)
                continue
            child = pending.pop()
            path = f"{text}/{child.name}" if text else child.name
            entry = TreeEntry(directory, path, child)
            yield entry
            if recursive and entry.isDirectory:
                sub = openChildDirectory(directory, child.name)
                if sub is not None:
                    # On the stack before it is listed, so that a failure closes it too.
                    stack.append((sub, sub, path, []))
                    stack[-1] = (sub, sub, path, children(sub)[::-1])
    finally:
        for owned, _, _, _ in stack:
            if owned is not None:
                os.close(owned)


__all__ = ["Child", "TreeEntry", "children", "openChildDirectory", "walkTree"]

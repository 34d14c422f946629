"""The two resolvers: how a guest path's components become a directory descriptor.

Both start from a fresh descriptor of the workspace root and never let the kernel follow a
symlink or ``..`` out of it:

  - L{Resolver.walk} (the default, strict): with ``openat2(2)`` and
    ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` where the kernel has it,
    else one component at a time with ``O_NOFOLLOW | O_DIRECTORY``; no symlink is crossed
    at all, and missing directories can be made on the way (``create``).
  - L{Resolver.follow} (reads that follow a symlinked parent inside): ``RESOLVE_BENEATH``
    alone, or its userspace emulation handling each symlink target and ``..`` against a
    stack of open directories.

Everything here blocks; errors are L{WorkspaceError}s naming the guest path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from pyro_reactor.system._linux import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    Openat2,
)
from pyro_reactor.system.fds import DIRECTORY_FLAGS, closeQuietly
from pyro_reactor.system.workspace.paths import (
    EscapingSymlink,
    MissingPath,
    NotADirectoryInPath,
    SymlinkInPath,
    WorkspaceError,
    checkComponent,
    osError,
)

_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS

MAX_SYMLINKS = 40
"""As the kernel: more symlinks than this while resolving one path is a loop."""


class Resolver:
    """Opens directories beneath a root, strictly (L{walk}) or following inside (L{follow}).

    @param openRoot: returns a new descriptor of the root (closed here after each use).
    @param openat2: the kernel's ``openat2``, or ``None`` to always take the walk.
    """

    def __init__(self, openRoot: Callable[[], int], openat2: Openat2 | None) -> None:
        self.openRoot = openRoot
        self._openat2 = openat2

    # -- following symlinks beneath the root ----------------------------------------------

    def follow(self, parts: tuple[str, ...], *, display: str, directory: bool = True) -> int:
        """Open ``parts`` following symlinks that stay beneath the root.

        Returns a directory descriptor, or with ``directory=False`` an ``O_PATH`` descriptor
        of whatever is there.
        """
        for part in parts:
            checkComponent(part)
        flags = DIRECTORY_FLAGS & ~os.O_NOFOLLOW if directory else os.O_PATH | os.O_CLOEXEC
        root = self.openRoot()
        if not parts:
            if directory:
                return root
            try:
                return os.open(".", flags, dir_fd=root)
            finally:
                os.close(root)
        try:
            if self._openat2 is not None:
                try:
                    return self._openat2(root, os.fsencode("/".join(parts)), flags, _BENEATH)
                except OSError as error:
                    if error.errno not in (
                        errno.ENOENT,
                        errno.ENOTDIR,
                        errno.ELOOP,
                        errno.EXDEV,
                        errno.EAGAIN,
                    ):
                        raise osError(display, error) from None
            return self._followFrom(root, list(parts), display, directory)
        finally:
            os.close(root)

    def _followFrom(self, root: int, pending: list[str], display: str, directory: bool) -> int:
        """The userspace ``RESOLVE_BENEATH``: one component at a time, never through the kernel's
        own symlink or ``..`` resolution.

        ``stack`` holds a descriptor of each directory from the root to the current one, so
        ``..`` (from a symlink's target) goes back to a directory already held, and never above
        the root.
        """
        stack = [os.dup(root)]
        links = 0
        retries = 0
        try:
            while pending:
                name = pending.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) == 1:
                        raise EscapingSymlink(display)
                    os.close(stack.pop())
                    continue
                last = not pending
                if directory or not last:
                    opened = self._tryOpen(stack[-1], name, DIRECTORY_FLAGS, display)
                else:
                    opened = self._tryOpen(
                        stack[-1], name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, display
                    )
                    if opened is not None and stat.S_ISLNK(os.fstat(opened).st_mode):
                        os.close(opened)
                        opened = None
                if opened is not None:
                    stack.append(opened)
                    continue
                try:
                    info = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
                    target = (
                        os.readlink(name, dir_fd=stack[-1]) if stat.S_ISLNK(info.st_mode) else None
                    )
                except FileNotFoundError:
                    raise MissingPath(display) from None
                except OSError as error:
                    raise osError(display, error) from None
                if target is not None:
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise EscapingSymlink(display, loop=True)
                    if target.startswith("/"):
                        raise EscapingSymlink(display)
                    pending[0:0] = target.split("/")
                    continue
                if stat.S_ISDIR(info.st_mode) or (not directory and last):
                    # It changed since the open failed: look again.
                    retries += 1
                    if retries > 10:
                        raise WorkspaceError(f"workspace path keeps changing: {display}")
                    pending.insert(0, name)
                    continue
                raise MissingPath(display)
            return stack.pop()
        finally:
            for fd in stack:
                closeQuietly(fd)

    @staticmethod
    def _tryOpen(dirfd: int, name: str, flags: int, display: str) -> int | None:
        try:
            return os.open(name, flags, dir_fd=dirfd)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise osError(display, error) from None

    # -- the walk ------------------------------------------------------------------------

    def walk(
        self, parts: tuple[str, ...], *, create: bool, display: str, finalIsTarget: bool
    ) -> int:
        for part in parts:
            checkComponent(part)
        root = self.openRoot()
        if not parts:
            return root
        try:
            if self._openat2 is not None:
                try:
                    return self._openat2(
                        root, os.fsencode("/".join(parts)), DIRECTORY_FLAGS, _STRICT
                    )
                except OSError as error:
                    if error.errno not in (
                        errno.ENOENT,
                        errno.ENOTDIR,
                        errno.ELOOP,
                        errno.EXDEV,
                        errno.EAGAIN,
                    ):
                        raise osError(display, error) from None
                    # Take the walk: it creates what is missing, or says what is wrong.
            return self._walkFrom(root, parts, create, display, finalIsTarget)
        finally:
            os.close(root)

    def _walkFrom(
        self, root: int, parts: tuple[str, ...], create: bool, display: str, finalIsTarget: bool
    ) -> int:
        current = os.dup(root)
        try:
            for index, part in enumerate(parts):
                final = finalIsTarget and index == len(parts) - 1
                following = self._step(current, part, create, display, final)
                os.close(current)
                current = following
        except BaseException:
            closeQuietly(current)
            raise
        return current

    def _step(self, dirfd: int, name: str, create: bool, display: str, final: bool) -> int:
        for _ in range(10):
            try:
                return os.open(name, DIRECTORY_FLAGS, dir_fd=dirfd)
            except OSError as error:
                if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise osError(display, error) from None
            # Say why it failed; nothing below is used to decide what to open.
            try:
                info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise MissingPath(display) from None
                try:
                    os.mkdir(name, 0o777, dir_fd=dirfd)
                except FileExistsError:
                    pass  # made by someone else meanwhile: open it on the next round
                except OSError as error:
                    raise osError(display, error) from None
                continue
            if stat.S_ISLNK(info.st_mode):
                raise SymlinkInPath(display, final=final)
            if not stat.S_ISDIR(info.st_mode):
                if create or final:
                    raise NotADirectoryInPath(display, final=final)
                raise MissingPath(display)
            # It is a directory now: it changed under us, try again.
        raise WorkspaceError(f"workspace path keeps changing: {display}")


__all__ = ["MAX_SYMLINKS", "Resolver"]

"""Guest paths and kernel-confined access to the workspace directory.

Requests speak of ``/workspace/...`` whatever directory the agent serves as its workspace. This
module turns such a guest path into a L{GuestPath} (``resolve``), and offers the blocking
primitives every capability uses to touch the workspace: open a directory or a file, ``lstat``,
list, replace a file atomically, unlink, hold a child's working directory open
(L{WorkingDirectory}), probe for a file.

Confinement is done by the kernel, not by string checks on host paths. Every operation starts
from a directory file descriptor of the workspace root and reaches its target through file
descriptors only:

  - with ``openat2(2)`` (Linux 5.6+, called through ctypes) and
    ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``, the kernel refuses any
    path that would leave the root or cross a symlink;
  - where ``openat2`` is missing (``ENOSYS``, or a seccomp filter answering ``EPERM``), a walk
    opens one component at a time with ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous
    component's descriptor.

The last component is then used relative to its parent's descriptor (``dir_fd=...``,
``follow_symlinks=False``, ``O_NOFOLLOW``), so a symlink swapped in between a check and a use
cannot redirect the agent: the check and the use both name the entry inside a directory the
agent already holds open, and neither follows a symlink.

By default no symlink is followed anywhere in a guest path (``RESOLVE_NO_SYMLINKS``), even one
pointing inside the workspace. Reads that the reference lets through a symlinked parent ask for
``followInside``: parents that are symlinks are then followed as long as they resolve beneath
the workspace (``RESOLVE_BENEATH``; the walk emulates it, handling each symlink target and
``..`` itself against a stack of open directories), and refused when they would leave it. The
last component of a request's path is left to the caller (``openParent``), which ``lstat``s it
without following, as the reference does; only L{Workspace.fileExists} follows it (inside). A
``..`` component in a request is refused outright (the reference lets
``/workspace/../etc/hostname`` out).

Everything here blocks: callers run it in ``context.inThread``. Expected failures raise
L{WorkspaceError} (an L{ActionError}) whose message names the guest path, never the host path.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pyro_reactor.system._linux import openat2Function
from pyro_reactor.system.fds import closeQuietly, writeAll
from pyro_reactor.system.workspace.paths import (
    TEMP_PREFIX,
    WORKSPACE_ROOT,
    GuestPath,
    MissingPath,
    NotADirectoryInPath,
    NotARegularFile,
    SymlinkInPath,
    WorkspaceError,
    displayText,
    osError,
    resolveGuestPath,
)
from pyro_reactor.system.workspace.resolvers import Resolver
from pyro_reactor.system.workspace.walk import Child, children, openChildDirectory


def openat2Available() -> bool:
    """Whether this kernel (and sandbox) lets us call ``openat2``."""
    return openat2Function() is not None


@functools.cache
def processUmask() -> int:
    """The agent's umask, read once without changing it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Kernels before 4.7 do not show it: set and restore (the first call happens at start-up,
    # before worker threads create files).
    current = os.umask(0o022)
    os.umask(current)
    return current


class WorkingDirectory:
    """A workspace directory held open for a child process to enter (its working directory).

    Checking a directory and then letting the child ``chdir`` to its name is a race: a guest
    program can swap the directory for a symlink in between, and the child starts outside the
    workspace. So the agent keeps the checked directory open and gives the child C{path},
    ``/proc/<agent pid>/fd/<n>``: a magic link to the open file itself, which a ``chdir``
    enters whatever has become of the name since. It is the agent's pid, not ``self``:
    Twisted's fork path closes the child's other descriptors before its ``chdir``, and a
    posix_spawned ``env --chdir`` never had them.

    The descriptor must stay open until the child has entered the directory, which the agent
    cannot observe: callers close it (L{close}, idempotent) when the child process has ended,
    or when it could not be started. One descriptor per running shell, service and command
    probe.

    C{guestPath} is what answers and records show; C{path} is only for the spawn.
    """

    def __init__(self, guestPath: GuestPath, fd: int, path: str) -> None:
        self.guestPath = guestPath
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def holding(cls, guestPath: GuestPath, fd: int) -> WorkingDirectory:
        """Take over C{fd}, an open directory, and make its ``/proc`` path (closed on error).

        The path is checked to lead to the same directory: without ``/proc`` (or with one of
        another pid namespace) it does not, and the child could not be started safely.
        """
        try:
            # /proc's own idea of our pid: right even in a pid namespace /proc is not from.
            path = f"/proc/{os.readlink('/proc/self')}/fd/{fd}"
            seen, held = os.stat(path), os.fstat(fd)
            if (seen.st_dev, seen.st_ino) != (held.st_dev, held.st_ino):
                raise OSError(errno.ENOENT, "not the directory held open")
        except OSError:
            os.close(fd)
            raise WorkspaceError(
                f"cannot use {guestPath.text} as a working directory: /proc is not available"
            ) from None
        return cls(guestPath, fd, path)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        """Let the directory go (again: nothing). Only once the child is in it, or gone."""
        fd, self._fd = self._fd, None
        if fd is not None:
            closeQuietly(fd)

    def __repr__(self) -> str:
        return f"<WorkingDirectory {self.guestPath.text} fd={self._fd}>"


class Workspace:
    """The agent's workspace directory, reached only through kernel-confined descriptors.

    @param root: the host directory that ``/workspace`` maps to.
    @param useOpenat2: ``None`` to use ``openat2`` where the kernel has it, ``False`` to force
        the ``O_NOFOLLOW`` walk (tests cover both), ``True`` to require ``openat2``.
    """

    def __init__(self, root: Path, *, useOpenat2: bool | None = None) -> None:
        self.root = root
        openat2 = openat2Function() if useOpenat2 is not False else None
        if useOpenat2 is True and openat2 is None:
            raise RuntimeError("openat2 is not available on this machine")
        self._openat2 = openat2
        self._resolver = Resolver(self.openRoot, openat2)

    @property
    def usesOpenat2(self) -> bool:
        return self._openat2 is not None

    # -- paths ---------------------------------------------------------------------------

    def resolve(self, guestPath: str) -> GuestPath:
        """Normalise a request's guest path (see L{resolveGuestPath}); does no I/O."""
        return resolveGuestPath(self.root, guestPath)

    # -- descriptors ---------------------------------------------------------------------

    def openRoot(self) -> int:
        """A new descriptor of the workspace root directory; the caller closes it.

        Opened afresh on each use rather than held: the guest may mount the workspace drive
        after the agent has started.
        """
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingPath(str(WORKSPACE_ROOT)) from None
        except OSError as error:
            raise osError(str(WORKSPACE_ROOT), error) from None

    def openDirectory(
        self, parts: tuple[str, ...], *, create: bool = False, followInside: bool = False
    ) -> int:
        """A descriptor of the directory ``parts`` beneath the root; the caller closes it.

        No component may be a symlink, unless ``followInside`` (then symlinks resolving beneath
        the root are followed, the last component included). With ``create`` (not together
        with ``followInside``), missing directories are made (mode 0777 less the umask, as
        ``mkdir -p``). Raises L{MissingPath}, L{SymlinkInPath}, L{EscapingSymlink} or
        L{NotADirectoryInPath}, naming this directory.
        """
        display = displayText(parts)
        if followInside:
            if create:
                raise ValueError("create and followInside cannot be combined")
            return self._resolver.follow(parts, display=display)
        return self._resolver.walk(parts, create=create, display=display, finalIsTarget=True)

    def openParent(
        self, path: GuestPath, *, create: bool = False, followInside: bool = False
    ) -> tuple[int, str]:
        """A descriptor of ``path``'s parent directory and ``path``'s last component.

        Errors name ``path`` and speak of its parents. ``path`` must not be the root.
        ``create`` and ``followInside`` are as for L{openDirectory}, applied to the parents;
        the last component is for the caller to use (without following it).
        """
        if path.isRoot:
            raise ValueError("the workspace root has no parent")
        parents = path.parts[:-1]
        if followInside:
            if create:
                raise ValueError("create and followInside cannot be combined")
            return self._resolver.follow(parents, display=path.text), path.name
        fd = self._resolver.walk(parents, create=create, display=path.text, finalIsTarget=False)
        return fd, path.name

    @contextmanager
    def openedDirectory(
        self, parts: tuple[str, ...], *, create: bool = False, followInside: bool = False
    ) -> Iterator[int]:
        """L{openDirectory} as a context manager that closes the descriptor."""
        fd = self.openDirectory(parts, create=create, followInside=followInside)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def openedParent(
        self, path: GuestPath, *, create: bool = False, followInside: bool = False
    ) -> Iterator[tuple[int, str]]:
        """L{openParent} as a context manager that closes the descriptor."""
        fd, name = self.openParent(path, create=create, followInside=followInside)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def openFile(self, path: GuestPath, flags: int, mode: int = 0o600) -> int:
        """Open the file at ``path`` with ``os.open`` flags; the caller closes it.

        ``O_NOFOLLOW | O_CLOEXEC | O_NOCTTY`` are always added: a symlink at ``path`` raises
        L{SymlinkInPath}, a missing one L{MissingPath} (unless ``O_CREAT``).
        """
        if path.isRoot:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise NotARegularFile(path.text)
            return self.openRoot()
        parent, name = self.openParent(path)
        try:
            return os.open(
                name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=parent
            )
        except FileNotFoundError:
            raise MissingPath(path.text) from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise SymlinkInPath(path.text, final=True) from None
            if error.errno == errno.EISDIR:
                raise NotARegularFile(path.text) from None
            raise osError(path.text, error) from None
        finally:
            os.close(parent)

    # -- queries -------------------------------------------------------------------------

    def lstat(self, path: GuestPath, *, followInside: bool = False) -> os.stat_result:
        """The ``lstat`` of ``path`` (a final symlink is described, not followed).

        ``followInside`` applies to the parents, as for L{openParent}.
        """
        if path.isRoot:
            fd = self.openRoot()
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        with self.openedParent(path, followInside=followInside) as (parent, name):
            return self.lstatAt(parent, name, path.text)

    def lstatAt(self, dirfd: int, name: str, display: str) -> os.stat_result:
        """``lstat`` of the entry ``name`` in the open directory ``dirfd``."""
        try:
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            raise MissingPath(display) from None
        except OSError as error:
            raise osError(display, error) from None

    def readlink(self, path: GuestPath, *, followInside: bool = False) -> str:
        """The target text of the symlink at ``path`` (never followed).

        ``followInside`` applies to the parents, as for L{openParent}.
        """
        with self.openedParent(path, followInside=followInside) as (parent, name):
            try:
                return os.readlink(name, dir_fd=parent)
            except FileNotFoundError:
                raise MissingPath(path.text) from None
            except OSError as error:
                raise osError(path.text, error) from None

    def children(self, dirfd: int) -> list[Child]:
        """The entries of the open directory ``dirfd`` (see L{walk.children})."""
        return children(dirfd)

    def openChildDirectory(self, dirfd: int, name: str) -> int | None:
        """The subdirectory ``name`` of ``dirfd``, or ``None`` (see L{walk.openChildDirectory})."""
        return openChildDirectory(dirfd, name)

    def openWorkingDirectory(self, guestPath: str) -> WorkingDirectory:
        """Open an existing workspace directory for a child process to start in.

        ``guestPath`` must be a directory beneath the workspace reached without any symlink
        (as L{openDirectory}). The directory stays open until the caller closes the returned
        L{WorkingDirectory}, and the child is started in its C{path}, which names the opened
        directory itself rather than a name that could be swapped meanwhile.
        """
        path = self.resolve(guestPath)
        return WorkingDirectory.holding(path, self.openDirectory(path.parts))

    def fileExists(self, guestPath: str) -> bool:
        """Whether something exists at ``guestPath`` (a service's "file" readiness probe).

        Symlinks are followed (the last one too, as the reference's ``Path.exists``) only
        while they resolve beneath the workspace: one leading out, a dangling one, or a path
        outside the workspace counts as absent. Raises L{ActionError} only for a malformed
        guest path.
        """
        path = self.resolve(guestPath)
        try:
            os.close(self._resolver.follow(path.parts, display=path.text, directory=False))
        except WorkspaceError:
            return False
        return True

    # -- changes -------------------------------------------------------------------------

    def replaceFile(
        self,
        path: GuestPath,
        data: bytes | Callable[[int], None],
        *,
        mode: int | None = None,
        createParents: bool = True,
    ) -> None:
        """Atomically make ``path`` a regular file holding ``data``.

        ``data`` is bytes, or a callable given the temporary file's descriptor to write into.
        A temporary file in the same directory is written then renamed over ``path``, so a
        reader sees the old content or the new, never a part; on any error it is removed.
        The file ends up with ``mode`` if given, else an existing file keeps its mode (and, as
        far as the agent may, its owner), and a new one gets 0666 less the umask. Missing
        parents are created when ``createParents``. Raises L{NotARegularFile} if ``path`` is a
        directory, symlink or other non-regular file.
        """
        if path.isRoot:
            raise NotARegularFile(path.text)
        with self.openedParent(path, create=createParents) as (parent, name):
            try:
                old: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            except OSError as error:
                raise osError(path.text, error) from None
            if old is not None and not stat.S_ISREG(old.st_mode):
                unsupported = not (stat.S_ISDIR(old.st_mode) or stat.S_ISLNK(old.st_mode))
                raise NotARegularFile(path.text, unsupported=unsupported)
            tempName, tempFd = self._createTemporary(parent, path.text)
            try:
                try:
                    if callable(data):
                        data(tempFd)
                    else:
                        writeAll(tempFd, data)
                    if old is not None and (old.st_uid, old.st_gid) != _owner(tempFd):
                        try:
                            os.fchown(tempFd, old.st_uid, old.st_gid)
                        except PermissionError:
                            pass
                    if mode is None:
                        mode = (
                            stat.S_IMODE(old.st_mode)
                            if old is not None
                            else 0o666 & ~processUmask()
                        )
                    os.fchmod(tempFd, mode)
                finally:
                    os.close(tempFd)
                os.rename(tempName, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException as failure:
                try:
                    os.unlink(tempName, dir_fd=parent)
                except OSError:
                    pass
                if isinstance(failure, IsADirectoryError):
                    # It became a directory after our check.
                    raise NotARegularFile(path.text) from None
                if isinstance(failure, OSError):
                    raise osError(path.text, failure) from None
                raise

    def _createTemporary(self, parent: int, display: str) -> tuple[str, int]:
        for _ in range(100):
            name = TEMP_PREFIX + secrets.token_hex(6)
            try:
                fd = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                    dir_fd=parent,
                )
            except FileExistsError:
                continue
            except OSError as error:
                raise osError(display, error) from None
            return name, fd
        raise WorkspaceError(f"cannot create a temporary file next to {display}")

    def unlink(self, path: GuestPath) -> None:
        """Remove the non-directory entry at ``path`` (a symlink itself, never its target)."""
        if path.isRoot:
            raise NotADirectoryInPath(path.text, final=True)
        with self.openedParent(path) as (parent, name):
            try:
                os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                raise MissingPath(path.text) from None
            except IsADirectoryError:
                raise WorkspaceError(f"workspace path is a directory: {path.text}") from None
            except OSError as error:
                raise osError(path.text, error) from None


def _owner(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_uid, info.st_gid


__all__ = ["WorkingDirectory", "Workspace", "openat2Available", "processUmask"]

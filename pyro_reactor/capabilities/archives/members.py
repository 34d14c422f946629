"""The member plan: every member of an archive checked before anything is written.

Every member is read (headers only) and checked against the reference's rules (normalised
names, no absolute or ``..`` members, no hard links, symlink targets kept inside, no member
below a symlink or a file, no conflicts between directories, files and links) and against PEP
706's ``tarfile.data_filter``, on a model of the destination tree (L{Tree}): what exists on
disk (``lstat``-ed fd-relative, never following a symlink) overlaid with what the earlier
members would make. The plan is refused whole, before a byte is written, if it has more
members than allowed or its files would not fit in the destination's free space.
"""

from __future__ import annotations

import functools
import lzma
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from pyro_reactor.errors import ActionError
from pyro_reactor.system.fds import DIRECTORY_FLAGS
from pyro_reactor.system.tarnames import UnsafeMemberName, memberParts
from pyro_reactor.system.workspace import (
    GuestPath,
    NotADirectoryInPath,
    SymlinkInPath,
    processUmask,
)

if TYPE_CHECKING:
    import tarfile

# data_filter() resolves names with os.path.realpath() against the live filesystem: that
# follows symlinks an archive may legitimately replace, and races with guest processes. Given
# a root that does not exist its checks become lexical; the live tree is checked by us,
# fd-relative.
_FILTER_ROOT = "/nonexistent-pyro-archive-root"


# tarfile is imported where archives are read or written, not at the top: an idle agent never
# needs it (about 0.3 MiB of its resident memory and a millisecond of its start-up).
@functools.cache
def archiveErrors() -> tuple[type[BaseException], ...]:
    """Errors a damaged archive raises while it is read.

    gzip's BadGzipFile and bz2's errors are OSErrors.
    """
    import tarfile  # noqa: PLC0415

    return (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


class Kind(Enum):
    """What a path is, on disk or in the plan."""

    MISSING = "missing"
    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"
    OTHER = "other"


def kindOf(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return Kind.DIRECTORY
    if stat.S_ISREG(mode):
        return Kind.FILE
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    return Kind.OTHER


# -- member rules (pure) -----------------------------------------------------------------------


def normalizeMemberName(name: str) -> tuple[str, ...]:
    """The components of a member's name, as the reference normalises it.

    ``()`` means the archive's root (``.`` or ``./``): the caller accepts it for a directory
    member only. Raises L{ActionError} with the reference's messages.
    """
    if name.strip() == "":
        raise ActionError("archive member path is empty")
    try:
        return memberParts(name)
    except UnsafeMemberName as unsafe:
        if unsafe.absolute:
            raise ActionError(f"absolute archive member paths are not allowed: {name}") from None
        raise ActionError(f"unsafe archive member path: {name}") from None


def checkSymlinkTarget(parts: tuple[str, ...], target: str) -> None:
    """Refuse a symlink member whose target is empty, absolute or climbs with ``..``.

    ``parts`` is the member's normalised name; messages are the reference's.
    """
    display = "/".join(parts)
    text = target.strip()
    if text == "":
        raise ActionError(f"symlink {display} has an empty target")
    pure = PurePosixPath(text)
    if pure.is_absolute():
        raise ActionError(f"symlink {display} escapes the workspace")
    combined = (*parts[:-1], *pure.parts)
    if ".." in combined:
        raise ActionError(f"symlink {display} escapes the workspace")


@dataclass(frozen=True)
class Rules:
    """The member rules and messages of one action (extraction or secrets)."""

    secrets: bool

    def refuseType(self, member: tarfile.TarInfo) -> None:
        """Raise for a member type this action never writes (links, devices, fifos)."""
        if self.secrets:
            if member.issym() or member.islnk():
                raise ActionError(f"secret archive may not contain links: {member.name}")
            if not (member.isdir() or member.isreg()):
                raise ActionError(f"unsupported secret archive member type: {member.name}")
            return
        if member.islnk():
            raise ActionError(f"hard links are not allowed in workspace archives: {member.name}")
        if not (member.isdir() or member.isreg() or member.issym()):
            raise ActionError(f"unsupported archive member type: {member.name}")

    def unreadable(self, member: tarfile.TarInfo) -> ActionError:
        if self.secrets:
            return ActionError(f"failed to read secret archive member: {member.name}")
        return ActionError(f"failed to read archive member: {member.name}")

    def writeFailed(self, member: tarfile.TarInfo, error: OSError) -> ActionError:
        reason = error.strerror or type(error).__name__
        if self.secrets:
            return ActionError(f"could not install secret archive member {member.name}: {reason}")
        return ActionError(f"could not extract archive member {member.name}: {reason}")


EXTRACT_RULES = Rules(secrets=False)
SECRET_RULES = Rules(secrets=True)


# -- directories reached by descriptor --------------------------------------------------------


class Directories:
    """Directory descriptors below one root descriptor, reached without following symlinks.

    Each directory is opened from its parent with ``O_NOFOLLOW | O_DIRECTORY``; a bounded
    number stay open (least recently used closed first). With ``create``, missing directories
    are made with ``createMode`` (the umask applies, as ``mkdir -p``) or exactly
    ``exactMode``. Given ``stageName``, a missing directory whose parent exists is made under
    a name it returns instead (recorded in ``staged``, to be renamed into place at the end),
    and what goes below it is made in place inside it: nothing new shows under its final name
    until it is published. Directories made in place are recorded in ``created``.
    """

    def __init__(
        self,
        root: int,
        *,
        createMode: int = 0o777,
        exactMode: int | None = None,
        limit: int = 32,
        stageName: Callable[[tuple[str, ...]], str] | None = None,
    ) -> None:
        self.root = root
        self.createMode = createMode
        self.exactMode = exactMode
        self.limit = max(limit, 2)
        self.stageName = stageName
        self.created: list[tuple[str, ...]] = []
        self.staged: dict[tuple[str, ...], str] = {}
        self._open: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def onDisk(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """``parts`` as named on disk now (a staged directory under its stage name)."""
        return tuple(
            self.staged.get(parts[:depth], parts[depth - 1]) for depth in range(1, len(parts) + 1)
        )

    def insideStage(self, parts: tuple[str, ...]) -> bool:
        """Whether ``parts`` is a staged directory or below one (not yet visible)."""
        return any(parts[:depth] in self.staged for depth in range(1, len(parts) + 1))

    def open(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        """The descriptor of ``parts`` (owned by this object: do not close it)."""
        if not parts:
            return self.root
        known = self._open.get(parts)
        if known is not None:
            self._open.move_to_end(parts)
            return known
        # From the deepest directory already open, one component at a time (a loop, not a
        # recursion: a request may name thousands of nested directories).
        opened = len(parts) - 1
        while opened and parts[:opened] not in self._open:
            opened -= 1
        fd = self.open(parts[:opened])
        for depth in range(opened + 1, len(parts) + 1):
            fd = self._openChild(fd, parts[:depth], create)
        return fd

    def _openChild(self, parent: int, parts: tuple[str, ...], create: bool) -> int:
        name = self.staged.get(parts, parts[-1])
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            if self.stageName is not None and not self.insideStage(parts[:-1]):
                name = self.stageName(parts)
                os.mkdir(name, self.createMode, dir_fd=parent)
                self.staged[parts] = name
            else:
                os.mkdir(name, self.createMode, dir_fd=parent)
                self.created.append(parts)
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
            if self.exactMode is not None and self.exactMode & processUmask():
                os.fchmod(fd, self.exactMode)
        self._open[parts] = fd
        # The parent was opened or used just before: it is never the one closed here.
        while len(self._open) > self.limit:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        return fd

    def forget(self, parts: tuple[str, ...]) -> None:
        """Close the descriptor of ``parts`` and of everything below it, if open."""
        for known in [known for known in self._open if known[: len(parts)] == parts]:
            os.close(self._open.pop(known))

    def close(self) -> None:
        while self._open:
            _, fd = self._open.popitem()
            os.close(fd)


class Tree:
    """The destination as it is on disk, overlaid with what the checked members would make."""

    def __init__(self, directories: Directories) -> None:
        self._directories = directories
        self._known: dict[tuple[str, ...], Kind] = {}
        self._new: set[tuple[str, ...]] = set()

    def kind(self, parts: tuple[str, ...]) -> Kind:
        """What ``parts`` is; its parents must all be directories (on disk or planned)."""
        if not parts:
            return Kind.DIRECTORY
        known = self._known.get(parts)
        if known is not None:
            return known
        parent = parts[:-1]
        if parent in self._new:
            result = Kind.MISSING
        else:
            try:
                fd = self._directories.open(parent)
                result = kindOf(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                result = Kind.MISSING
            except OSError as error:
                display = "/".join(parts)
                raise ActionError(f"cannot inspect {display}: {error.strerror}") from None
        self._known[parts] = result
        return result

    def plan(self, parts: tuple[str, ...], kind: Kind) -> None:
        """Record that ``parts`` will be ``kind`` once the archive is applied."""
        if kind is Kind.DIRECTORY and self.kind(parts) is Kind.MISSING:
            self._new.add(parts)
        self._known[parts] = kind


@dataclass(frozen=True, slots=True)
class Step:
    """One checked member: where it goes (below the root descriptor) and what it becomes."""

    member: tarfile.TarInfo
    parts: tuple[str, ...]
    kind: Kind
    mode: int | None = None
    fresh: bool = False
    """Nothing is at ``parts`` now: it is written in place (else staged, then renamed)."""


def checkBase(tree: Tree, base: GuestPath) -> None:
    """The extraction's destination must be a directory, or missing (it will be made)."""
    for index in range(1, len(base.parts) + 1):
        parts = base.parts[:index]
        final = index == len(base.parts)
        kind = tree.kind(parts)
        if kind is Kind.SYMLINK:
            raise SymlinkInPath(base.text, final=final)
        if kind is not Kind.DIRECTORY and kind is not Kind.MISSING:
            raise NotADirectoryInPath(base.text, final=final)
        tree.plan(parts, Kind.DIRECTORY)


def checkMember(tree: Tree, base: tuple[str, ...], member: tarfile.TarInfo, rules: Rules) -> Step:
    """Check one member against the rules and the tree, record its effect, say what to do."""
    name = member.name
    parts = normalizeMemberName(name)
    if not parts:
        if member.isdir():
            # "./", the first member of `tar -C dir -cf - .`: the destination itself.
            return Step(member, base, Kind.DIRECTORY)
        raise ActionError(f"unsafe archive member path: {name}")
    full = base + parts
    for index in range(len(base) + 1, len(full)):
        kind = tree.kind(full[:index])
        if kind is Kind.SYMLINK:
            raise ActionError(f"archive member would traverse through a symlinked path: {name}")
        if kind is not Kind.DIRECTORY and kind is not Kind.MISSING:
            raise ActionError(f"archive member would traverse through a non-directory path: {name}")
    rules.refuseType(member)
    existing = tree.kind(full)
    if member.isdir():
        if existing is not Kind.DIRECTORY and existing is not Kind.MISSING:
            raise ActionError(f"directory conflicts with existing path: {name}")
        kind = Kind.DIRECTORY
    elif member.isreg():
        if existing is not Kind.FILE and existing is not Kind.MISSING:
            raise ActionError(f"file conflicts with existing path: {name}")
        kind = Kind.FILE
    else:
        checkSymlinkTarget(parts, member.linkname)
        if existing is not Kind.SYMLINK and existing is not Kind.MISSING:
            raise ActionError(f"symlink conflicts with existing path: {name}")
        kind = Kind.SYMLINK
    mode = _filteredMode(member, "/".join(parts), name)
    for index in range(len(base) + 1, len(full)):
        tree.plan(full[:index], Kind.DIRECTORY)
    tree.plan(full, kind)
    return Step(member, full, kind, mode, fresh=existing is Kind.MISSING)


def _filteredMode(member: tarfile.TarInfo, normalized: str, name: str) -> int | None:
    """The mode PEP 706's ``data_filter`` gives a member (``None``: the default mode).

    Python before 3.11.4 (Debian 12 ships 3.11.2) has no extraction filters: there the same
    mode rules are applied here; the member rules above already refuse what the filter's
    path and link checks would.
    """
    import tarfile  # noqa: PLC0415 (see archiveErrors)

    dataFilter = getattr(tarfile, "data_filter", None)
    if dataFilter is not None:
        try:
            filtered = dataFilter(member.replace(name=normalized, deep=False), _FILTER_ROOT)
        except tarfile.FilterError as error:  # type: ignore[misc,unused-ignore]
            raise ActionError(f"archive member refused: {name}: {error}") from None
        mode: int | None = filtered.mode
        return mode
    if not (member.isreg() or member.islnk()):
        return None
    mode = member.mode & 0o755
    if not mode & stat.S_IXUSR:
        mode &= ~0o111
    return mode | stat.S_IRUSR | stat.S_IWUSR


@dataclass(frozen=True)
class Limits:
    """What a plan may not exceed: members, and bytes of file data (``None``: unbounded)."""

    maxMembers: int | None = None
    freeBytes: int | None = None
    blockSize: int = 4096


def freeSpace(fd: int) -> tuple[int, int]:
    """The bytes free to unprivileged writers on ``fd``'s filesystem, and its block size."""
    stats = os.fstatvfs(fd)
    return stats.f_bavail * stats.f_frsize, max(stats.f_frsize, 512)


def checkAll(
    archive: tarfile.TarFile,
    tree: Tree,
    base: tuple[str, ...],
    rules: Rules,
    limits: Limits = Limits(),
) -> list[Step]:
    """Check every member (see L{checkMember}); the plan, or L{ActionError} before any write.

    Stops reading at the first member past ``limits.maxMembers`` (so a stream of countless
    empty members costs at most that many headers in memory). The files' sizes, each rounded
    up to a block, must fit in ``limits.freeBytes``: a sparse member or a compression bomb of
    any apparent size is refused from its headers.
    """
    steps: list[Step] = []
    needed = 0
    block = limits.blockSize
    readErrors: tuple[type[BaseException], ...] = (*archiveErrors(), OSError)
    try:
        for member in archive:
            if limits.maxMembers is not None and len(steps) >= limits.maxMembers:
                raise ActionError(
                    f"archive has more than {limits.maxMembers} members"
                    " (the agent's --max-archive-members)"
                )
            step = checkMember(tree, base, member, rules)
            if step.kind is Kind.FILE:
                needed += -(-member.size // block) * block
            steps.append(step)
    except readErrors as error:
        # Reading the archive itself failed (a damaged header or compressed stream); the
        # checks raise ActionError, and inspecting the tree turns its OSErrors into them.
        raise ActionError(str(error)) from None
    if limits.freeBytes is not None and needed > limits.freeBytes:
        raise ActionError(
            f"archive needs {needed} bytes for its files but only {limits.freeBytes} bytes"
            " are free: nothing was extracted"
        )
    return steps

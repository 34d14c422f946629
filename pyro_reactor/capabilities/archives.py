"""Archives in and out of the guest: ``extract_archive``, ``install_secrets``, ``export_archive``.

The protocol has already spooled an upload to a file under the state directory when a handler
here runs, and it streams an export's temporary file back with backpressure; this module only
reads and writes tars, always in a worker thread (``context.inThread``).

Extraction is all-or-nothing, in three phases:

1. *check*: every member is read (headers only) and checked against the reference's rules
   (normalised names, no absolute or ``..`` members, no hard links, symlink targets kept inside,
   no member below a symlink or a file, no conflicts between directories, files and links) and
   against PEP 706's ``tarfile.data_filter``, on a model of the destination tree: what exists
   on disk (``lstat``-ed fd-relative, never following a symlink) overlaid with what the earlier
   members would make. Nothing is written in this phase.
2. *write*: missing directories are made; a file or symlink where nothing was is created in
   place (``O_EXCL``), one that replaces an existing entry is staged under a temporary name
   (``.pyro-extract-...``) next to its target. A failure here (a corrupt stream, ENOSPC)
   removes everything created and every directory made, so the workspace is as it was. A
   plain tar's data is copied with ``copy_file_range``; memory never grows with the archive.
3. *commit*: each staged entry is renamed over its target, in archive order (the last of
   duplicate members wins, as with tar).

Every write is relative to a directory descriptor reached from the workspace root one
component at a time with ``O_NOFOLLOW | O_DIRECTORY``, so a symlink swapped in after the
check cannot redirect a write outside the workspace.

``install_secrets`` builds the new set in a private sibling of the secret root (0700) with
files created 0600 and directories 0700, then swaps it in with one ``renameat2(EXCHANGE)``
(or two renames where that is missing): a failed install leaves the previous secrets. Its
messages name members, never their content.

``export_archive`` walks the exported path with descriptors too (symlinks archived as links,
never followed) and writes the tar into a temporary file under the spool directory.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import grp
import io
import lzma
import os
import pwd
import secrets
import shutil
import stat
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import (
    GuestPath,
    NotADirectoryInPath,
    SymlinkInPath,
    Workspace,
    processUmask,
)
from pyro_reactor.wire.dispatch import Action, StreamedAnswer
from pyro_reactor.wire.request import Request

if TYPE_CHECKING:
    import tarfile

log = Logger(namespace="pyro_reactor.capabilities.archives")

CHUNK = 1024 * 1024
"""Bytes copied at a time between a tar and a file: the bound on memory per transfer."""

PROGRESS_INTERVAL = 5.0
"""Seconds between two progress events of a long transfer."""

STAGE_PREFIX = ".pyro-extract-"
"""Name prefix of the temporary entries an extraction writes before renaming them."""

SECRETS_STAGE_PREFIX = ".pyro-secrets-new-"
"""Name prefix of the directory a secrets install is built in, beside the secret root."""

# data_filter() resolves names with os.path.realpath() against the live filesystem: that
# follows symlinks an archive may legitimately replace, and races with guest processes. Given
# a root that does not exist its checks become lexical; the live tree is checked by us,
# fd-relative.
_FILTER_ROOT = "/nonexistent-pyro-archive-root"

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


# tarfile is imported where archives are read or written, not at the top: an idle agent never
# needs it (about 0.3 MiB of its resident memory and a millisecond of its start-up).
@functools.cache
def _archiveErrors() -> tuple[type[BaseException], ...]:
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
    candidate = name.strip()
    if candidate == "":
        raise ActionError("archive member path is empty")
    pure = PurePosixPath(candidate)
    if pure.is_absolute():
        raise ActionError(f"absolute archive member paths are not allowed: {name}")
    parts = tuple(part for part in pure.parts if part not in ("", "."))
    if ".." in parts:
        raise ActionError(f"unsafe archive member path: {name}")
    return parts


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
    ``exactMode``, and recorded in ``created`` so that they can be removed again.
    """

    def __init__(
        self, root: int, *, createMode: int = 0o777, exactMode: int | None = None, limit: int = 32
    ) -> None:
        self.root = root
        self.createMode = createMode
        self.exactMode = exactMode
        self.limit = max(limit, 2)
        self.created: list[tuple[str, ...]] = []
        self._open: OrderedDict[tuple[str, ...], int] = OrderedDict()

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
        name = parts[-1]
        try:
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, self.createMode, dir_fd=parent)
            self.created.append(parts)
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
            if self.exactMode is not None and self.exactMode & processUmask():
                os.fchmod(fd, self.exactMode)
        self._open[parts] = fd
        # The parent was opened or used just before: it is never the one closed here.
        while len(self._open) > self.limit:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        return fd

    def forget(self, parts: tuple[str, ...]) -> None:
        fd = self._open.pop(parts, None)
        if fd is not None:
            os.close(fd)

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
    import tarfile  # noqa: PLC0415 (see _archiveErrors)

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


# -- progress --------------------------------------------------------------------------------


@dataclass
class Transfer:
    """Counters of one transfer, bumped by the worker thread and logged by the reactor.

    Plain integer updates from one thread, read from another: each read sees a value that
    was current at some moment, which is all a progress event needs.
    """

    action: str
    clock: IReactorTime
    started: float
    bytes: int = 0
    entries: int = 0
    _ticker: LoopingCall | None = field(default=None, repr=False)

    @classmethod
    def begin(cls, action: str, clock: IReactorTime) -> Transfer:
        transfer = cls(action, clock, clock.seconds())
        ticker = LoopingCall(transfer._progress)
        ticker.clock = clock
        ticker.start(PROGRESS_INTERVAL, now=False)
        transfer._ticker = ticker
        return transfer

    def rate(self) -> tuple[float, float]:
        duration = max(self.clock.seconds() - self.started, 0.0)
        return duration, (self.bytes / duration / 1e6 if duration > 0 else 0.0)

    def _progress(self) -> None:
        duration, rate = self.rate()
        log.info(
            "{action} in progress: {bytes} bytes, {entries} entries after {duration_s:.1f} s"
            " ({rate_mbps:.1f} MB/s)",
            action=self.action,
            outcome="progress",
            bytes=self.bytes,
            entries=self.entries,
            duration_s=duration,
            rate_mbps=rate,
        )

    def end(self, result: object) -> object:
        """Stop the progress events and log the transfer (``addBoth`` callback)."""
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        duration, rate = self.rate()
        if isinstance(result, Failure):
            log.info(
                "{action} stopped after {bytes} bytes, {entries} entries, {duration_s:.3f} s",
                action=self.action,
                outcome="transfer-failed",
                bytes=self.bytes,
                entries=self.entries,
                duration_s=duration,
            )
        else:
            log.info(
                "{action} moved {bytes} bytes in {entries} entries in {duration_s:.3f} s"
                " ({rate_mbps:.1f} MB/s)",
                action=self.action,
                outcome="transferred",
                bytes=self.bytes,
                entries=self.entries,
                duration_s=duration,
                rate_mbps=rate,
            )
        return result


class _Counter:
    """A stand-in for L{Transfer} when a blocking function is called directly."""

    bytes = 0
    entries = 0


# -- extraction ------------------------------------------------------------------------------


def _openArchive(path: Path) -> tarfile.TarFile:
    import tarfile  # noqa: PLC0415 (see _archiveErrors)

    try:
        return tarfile.open(path, "r:*")
    except _archiveErrors() as error:
        raise ActionError(str(error)) from None


def _stagingName(parent: int, create: Callable[[str], None]) -> str:
    for _ in range(100):
        name = STAGE_PREFIX + secrets.token_hex(6)
        try:
            create(name)
        except FileExistsError:
            continue
        return name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


def _symlinkAt(target: str, parent: int, name: str) -> None:
    os.symlink(target, name, dir_fd=parent)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _checkAll(
    archive: tarfile.TarFile, tree: Tree, base: tuple[str, ...], rules: Rules
) -> list[Step]:
    steps: list[Step] = []
    readErrors: tuple[type[BaseException], ...] = (*_archiveErrors(), OSError)
    try:
        for member in archive:
            steps.append(checkMember(tree, base, member, rules))
    except readErrors as error:
        # Reading the archive itself failed (a damaged header or compressed stream); the
        # checks raise ActionError, and inspecting the tree turns its OSErrors into them.
        raise ActionError(str(error)) from None
    return steps


def applySteps(
    archive: tarfile.TarFile,
    steps: list[Step],
    directories: Directories,
    rules: Rules,
    counter: Transfer | _Counter,
    *,
    base: tuple[str, ...] = (),
    fileMode: int | None = None,
) -> None:
    """Write every step, then rename the staged ones into place.

    An entry where nothing was is written in place (created exclusively); one that replaces an
    existing file or symlink is staged under a temporary name and renamed over it at the end.
    The directory ``base`` is made first (even for an empty archive, as the reference does).
    On any failure, whatever was staged or made is removed again before the error is raised.
    ``fileMode`` forces every file's mode (secrets); otherwise each file gets its filtered mode.
    """
    staged: list[tuple[tuple[str, ...], str]] = []
    made: list[tuple[tuple[str, ...], str]] = []
    committed = 0
    current: Step | None = None
    try:
        directories.open(base, create=True)
        for step in steps:
            current = step
            if step.kind is Kind.DIRECTORY:
                directories.open(step.parts, create=True)
            else:
                parent = directories.open(step.parts[:-1], create=True)
                if step.kind is Kind.FILE:
                    mode = fileMode if fileMode is not None else (step.mode or 0o644) & 0o7777
                    _writeFile(
                        archive,
                        step,
                        parent,
                        mode,
                        written=made if step.fresh else staged,
                        rules=rules,
                        counter=counter,
                    )
                elif step.fresh:
                    os.symlink(step.member.linkname, step.parts[-1], dir_fd=parent)
                    made.append((step.parts, step.parts[-1]))
                else:
                    temp = _stagingName(
                        parent, functools.partial(_symlinkAt, step.member.linkname, parent)
                    )
                    staged.append((step.parts, temp))
            counter.entries += 1
        current = None
        for parts, temp in staged:
            parent = directories.open(parts[:-1])
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            committed += 1
    except BaseException as failure:
        _rollBack(directories, staged[committed:] + made)
        if isinstance(failure, OSError):
            if current is not None:
                raise rules.writeFailed(current.member, failure) from None
            message = f"could not move an extracted entry into place: {failure.strerror}"
            raise ActionError(message) from None
        if isinstance(failure, _archiveErrors()):
            raise ActionError(str(failure)) from None
        raise


def _writeFile(
    archive: tarfile.TarFile,
    step: Step,
    parent: int,
    mode: int,
    *,
    written: list[tuple[tuple[str, ...], str]],
    rules: Rules,
    counter: Transfer | _Counter,
) -> None:
    """Write a file member, in place if ``step.fresh`` else under a temporary name.

    The file is created with its mode (never wider); ``written`` records the name it got.
    """
    source = archive.extractfile(step.member)
    if source is None:
        raise rules.unreadable(step.member)
    opened: list[int] = []

    def create(name: str) -> None:
        opened.append(os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=parent))

    if step.fresh:
        create(step.parts[-1])
        written.append((step.parts, step.parts[-1]))
    else:
        written.append((step.parts, _stagingName(parent, create)))
    fd = opened[0]
    try:
        if mode & (processUmask() | 0o7000):
            os.fchmod(fd, mode)
        with source:
            if not _copyInKernel(archive, step.member, fd, counter):
                while True:
                    chunk = source.read(CHUNK)
                    if not chunk:
                        break
                    _writeAll(fd, chunk)
                    counter.bytes += len(chunk)
    finally:
        os.close(fd)


_kernelCopy = {"usable": hasattr(os, "copy_file_range")}


def _copyInKernel(
    archive: tarfile.TarFile, member: tarfile.TarInfo, fd: int, counter: Transfer | _Counter
) -> bool:
    """Copy a plain tar's member with ``copy_file_range`` (no copy through user space).

    ``False`` (nothing copied) when the archive is compressed, the member sparse, or the
    kernel or filesystems cannot do it: the caller then copies through a buffer.
    """
    import tarfile  # noqa: PLC0415 (see _archiveErrors)

    source = archive.fileobj
    if not _kernelCopy["usable"] or member.issparse() or not isinstance(source, io.BufferedReader):
        return False
    offset, left = member.offset_data, member.size
    while left:
        try:
            copied = os.copy_file_range(source.fileno(), fd, min(left, 64 * CHUNK), offset)
        except OSError as error:
            if offset == member.offset_data and error.errno in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.EPERM,
            ):
                _kernelCopy["usable"] = error.errno == errno.EXDEV
                return False
            raise
        if copied == 0:
            raise tarfile.ReadError("unexpected end of data")
        offset += copied
        left -= copied
        counter.bytes += copied
    return True


def _rollBack(directories: Directories, written: list[tuple[tuple[str, ...], str]]) -> None:
    for parts, temp in written:
        try:
            os.unlink(temp, dir_fd=directories.open(parts[:-1]))
        except OSError:
            pass
    for parts in reversed(directories.created):
        directories.forget(parts)
        try:
            os.rmdir(parts[-1], dir_fd=directories.open(parts[:-1]))
        except OSError:
            pass
    directories.created.clear()


def extractArchive(
    workspace: Workspace,
    archivePath: Path,
    destination: GuestPath,
    counter: Transfer | _Counter | None = None,
) -> dict[str, Any]:
    """Extract the tar at ``archivePath`` into ``destination``, all or nothing (blocking)."""
    counter = counter if counter is not None else _Counter()
    root = workspace.openRoot()
    directories = Directories(root)
    try:
        with _openArchive(archivePath) as archive:
            tree = Tree(directories)
            checkBase(tree, destination)
            steps = _checkAll(archive, tree, destination.parts, EXTRACT_RULES)
            applySteps(archive, steps, directories, EXTRACT_RULES, counter, base=destination.parts)
    finally:
        directories.close()
        os.close(root)
    return {
        "destination": destination.text,
        "entry_count": len(steps),
        "bytes_written": sum(step.member.size for step in steps if step.kind is Kind.FILE),
    }


# -- secrets ---------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    function.restype = ctypes.c_int
    return function


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


def removeStaleSecretStages(secretRoot: Path) -> None:
    """Remove half-built secret sets an interrupted agent left beside the secret root."""
    parent = secretRoot.parent
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(SECRETS_STAGE_PREFIX):
            shutil.rmtree(parent / name, ignore_errors=True)


def installSecrets(
    secretRoot: Path, archivePath: Path, counter: Transfer | _Counter | None = None
) -> dict[str, Any]:
    """Replace the secret set at ``secretRoot`` with the archive's content (blocking)."""
    counter = counter if counter is not None else _Counter()
    parent = os.open(secretRoot.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stage = SECRETS_STAGE_PREFIX + secrets.token_hex(6)
    try:
        os.mkdir(stage, 0o700, dir_fd=parent)
        try:
            stageFd = os.open(stage, _DIRECTORY_FLAGS, dir_fd=parent)
            os.fchmod(stageFd, 0o700)
            directories = Directories(stageFd, createMode=0o700, exactMode=0o700)
            try:
                with _openArchive(archivePath) as archive:
                    steps = _checkAll(archive, Tree(directories), (), SECRET_RULES)
                    applySteps(archive, steps, directories, SECRET_RULES, counter, fileMode=0o600)
            finally:
                directories.close()
                os.close(stageFd)
            _swapIn(parent, stage, secretRoot.name)
        except BaseException:
            shutil.rmtree(stage, dir_fd=parent, ignore_errors=True)
            raise
    finally:
        os.close(parent)
    return {
        "destination": str(secretRoot),
        "entry_count": len(steps),
        "bytes_written": sum(step.member.size for step in steps if step.kind is Kind.FILE),
    }


def _swapIn(parent: int, stage: str, rootName: str) -> None:
    try:
        os.stat(rootName, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(stage, rootName, src_dir_fd=parent, dst_dir_fd=parent)
        return
    if not exchange(parent, stage, rootName):
        # No atomic exchange here: for a moment there is no secret root at all.
        os.rename(rootName, stage + "-old", src_dir_fd=parent, dst_dir_fd=parent)
        os.rename(stage, rootName, src_dir_fd=parent, dst_dir_fd=parent)
        stage += "-old"
    shutil.rmtree(stage, dir_fd=parent, ignore_errors=True)


# -- export ----------------------------------------------------------------------------------


@functools.cache
def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@functools.cache
def _groupName(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def tarInfoFor(arcname: str, info: os.stat_result, linkname: str = "") -> tarfile.TarInfo | None:
    """A member describing ``info`` as ``tarfile``'s ``gettarinfo`` does (``None``: a socket).

    Unlike ``gettarinfo``, a file with several hard links is a regular member each time: an
    archive we export can always be extracted again.
    """
    import tarfile  # noqa: PLC0415 (see _archiveErrors)

    mode = info.st_mode
    types = (
        (stat.S_ISREG, tarfile.REGTYPE),
        (stat.S_ISDIR, tarfile.DIRTYPE),
        (stat.S_ISLNK, tarfile.SYMTYPE),
        (stat.S_ISFIFO, tarfile.FIFOTYPE),
        (stat.S_ISCHR, tarfile.CHRTYPE),
        (stat.S_ISBLK, tarfile.BLKTYPE),
    )
    kinds = [kind for test, kind in types if test(mode)]
    if not kinds:
        return None
    kind = kinds[0]
    member = tarfile.TarInfo(arcname)
    member.type = kind
    member.mode = mode
    member.uid = info.st_uid
    member.gid = info.st_gid
    member.size = info.st_size if kind == tarfile.REGTYPE else 0
    member.mtime = info.st_mtime
    member.linkname = linkname
    member.uname = _userName(info.st_uid)
    member.gname = _groupName(info.st_gid)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        member.devmajor = os.major(info.st_rdev)
        member.devminor = os.minor(info.st_rdev)
    return member


class ExportTooLarge(ActionError):
    """The export would not fit in the free space of the spool's filesystem."""


class _Exporter:
    """Writes members into ``archive``, refusing to grow it beyond ``room`` bytes.

    ``room`` is the spool's free space when the export began: a guest program can make a
    sparse file of any apparent size (``truncate -s 1T``), which a tar stores in full, and the
    state directory is often a tmpfs (memory). Such an export is refused before its data is
    copied, instead of filling the filesystem up to ``ENOSPC``.
    """

    def __init__(
        self,
        archive: tarfile.TarFile,
        counter: Transfer | _Counter,
        room: int | None = None,
        display: str = "",
    ) -> None:
        self.archive = archive
        self.counter = counter
        self.room = room
        self.display = display
        self.entries = 0
        self.bytesWritten = 0

    def add(self, parent: int, name: str, arcname: str) -> None:
        """Archive the entry ``name`` of ``parent``, and everything below it for a directory.

        Depth first with a stack of its own rather than recursion: a guest can make a tree
        deeper than Python's recursion limit. One descriptor stays open per level walked.
        """
        stack: list[tuple[int, list[str], str]] = []
        try:
            opened = self._addOne(parent, name, arcname)
            if opened is not None:
                stack.append((*opened, arcname))
            while stack:
                directory, pending, prefix = stack[-1]
                if not pending:
                    stack.pop()
                    os.close(directory)
                    continue
                child = pending.pop()
                childArcname = f"{prefix}/{child}"
                opened = self._addOne(directory, child, childArcname)
                if opened is not None:
                    stack.append((*opened, childArcname))
        finally:
            for directory, _, _ in stack:
                os.close(directory)

    def _addOne(self, parent: int, name: str, arcname: str) -> tuple[int, list[str]] | None:
        """Archive one entry; for a directory, also its open descriptor and its children's
        names (last first), for the caller to walk and close."""
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None  # removed since it was listed
        if stat.S_ISREG(info.st_mode):
            fd = os.open(name, _READ_FLAGS, dir_fd=parent)
            with open(fd, "rb", buffering=0) as handle:
                info = os.fstat(fd)
                self._member(arcname, info, handle=handle)
        elif stat.S_ISDIR(info.st_mode):
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
            try:
                self._member(arcname, os.fstat(fd))
                return fd, sorted(os.listdir(fd), reverse=True)
            except BaseException:
                os.close(fd)
                raise
        elif stat.S_ISLNK(info.st_mode):
            self._member(arcname, info, linkname=os.readlink(name, dir_fd=parent))
        else:
            self._member(arcname, info)
        return None

    def _member(
        self,
        arcname: str,
        info: os.stat_result,
        *,
        linkname: str = "",
        handle: IO[bytes] | None = None,
    ) -> None:
        import tarfile  # noqa: PLC0415 (see _archiveErrors)

        member = tarInfoFor(arcname, info, linkname)
        if member is None:
            return
        if not member.isreg():
            handle = None
        if self.room is not None:
            # Headers (a long name takes a pax header too), the data padded to a block, and
            # the end of the archive padded to a record.
            names = len(os.fsencode(member.name)) + len(os.fsencode(member.linkname))
            needed = (
                self.archive.offset
                + 4 * tarfile.BLOCKSIZE
                + names
                + member.size
                + tarfile.RECORDSIZE
            )
            if needed > self.room:
                raise ExportTooLarge(
                    f"could not export {self.display}: the archive would need more than"
                    f" {needed} bytes, and the agent's state directory has {self.room} bytes free"
                )
        self.archive.addfile(member, handle)
        self.entries += 1
        self.counter.entries += 1
        if member.isreg():
            self.bytesWritten += member.size
            self.counter.bytes += member.size


def buildExport(
    workspace: Workspace,
    path: GuestPath,
    spoolRoot: Path,
    counter: Transfer | _Counter | None = None,
) -> StreamedAnswer:
    """Write the tar of ``path`` into a temporary file under ``spoolRoot`` (blocking)."""
    import tarfile  # noqa: PLC0415 (see _archiveErrors)

    counter = counter if counter is not None else _Counter()
    # A read, like list_workspace: symlinked parents are followed while they stay inside.
    info = workspace.lstat(path, followInside=True)
    kind = kindOf(info.st_mode)
    if kind is Kind.OTHER:
        raise ActionError(f"unsupported workspace path type: {path.text}")
    artifactType = kind.value
    spoolRoot.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="export-", suffix=".tar", dir=spoolRoot)
    target = Path(name)
    try:
        with (
            open(fd, "wb") as output,
            tarfile.TarFile(fileobj=output, mode="w", copybufsize=CHUNK) as archive,
        ):
            stats = os.statvfs(spoolRoot)
            exporter = _Exporter(
                archive, counter, room=stats.f_bavail * stats.f_frsize, display=path.text
            )
            if kind is Kind.DIRECTORY:
                with workspace.openedDirectory(path.parts, followInside=True) as directory:
                    for child in sorted(os.listdir(directory)):
                        exporter.add(directory, child, child)
            else:
                with workspace.openedParent(path, followInside=True) as (parent, entry):
                    exporter.add(parent, entry, entry)
        header = {
            "workspace_path": path.text,
            "artifact_type": artifactType,
            "archive_size": target.stat().st_size,
            "entry_count": exporter.entries,
            "bytes_written": exporter.bytesWritten,
        }
    except BaseException as failure:
        target.unlink(missing_ok=True)
        if isinstance(failure, OSError):
            raise ActionError(
                f"could not export {path.text}: {failure.strerror or failure}"
            ) from None
        raise
    return StreamedAnswer(header, target)


# -- actions ---------------------------------------------------------------------------------


class ArchivesCapability:
    """The three archive actions, working in the context's workspace and state directory.

    Building it readies the secrets root: created 0700, and stages an interrupted install
    left behind removed.
    """

    features: tuple[str, ...] = ()
    service = None

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self._config = config = context.config
        self._workspace = context.workspace
        config.secretRoot.mkdir(parents=True, exist_ok=True)
        os.chmod(config.secretRoot, 0o700)
        removeStaleSecretStages(config.secretRoot)
        self.actions = [
            Action("extract_archive", self._extract, upload=True),
            Action("install_secrets", self._install, upload=True),
            Action("export_archive", self._export),
        ]

    def _transferred(self, name: str, work: Callable[[Transfer], Any]) -> Deferred[Any]:
        transfer = Transfer.begin(name, self._context.reactor)
        result: Deferred[Any] = self._context.inThread(work, transfer)
        return result.addBoth(transfer.end)

    def _extract(self, request: Request) -> Deferred[dict[str, Any]]:
        workspace = self._workspace
        destination = workspace.resolve(request.string("destination", "/workspace"))
        upload = _upload(request)
        return self._transferred(
            "extract_archive",
            lambda transfer: extractArchive(workspace, upload, destination, transfer),
        )

    def _install(self, request: Request) -> Deferred[dict[str, Any]]:
        upload = _upload(request)
        root = self._config.secretRoot
        return self._transferred(
            "install_secrets", lambda transfer: installSecrets(root, upload, transfer)
        )

    def _export(self, request: Request) -> Deferred[StreamedAnswer]:
        workspace = self._workspace
        path = workspace.resolve(request.string("path", "/workspace"))
        spool = self._config.spoolRoot
        return self._transferred(
            "export_archive", lambda transfer: buildExport(workspace, path, spool, transfer)
        )


def _upload(request: Request) -> Path:
    if request.upload is None:
        raise ActionError("archive_size bytes were expected after the request line")
    return request.upload

"""``export_archive``: a workspace path as a tar in a spool file, streamed back by the wire.

The exported tree is walked with descriptors (L{pyro_reactor.system.workspace.walkTree}):
symlinks are archived as links, never followed, and a guest program swapping a directory for
a symlink meanwhile cannot redirect the walk. The tar is written into a temporary file under
the spool directory, refused before its data is copied if it would not fit there.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import stat
import tempfile
from contextlib import closing
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pyro_reactor.capabilities.archives.extract import CHUNK
from pyro_reactor.capabilities.archives.members import Kind, kindOf
from pyro_reactor.capabilities.archives.progress import Counter, Transfer
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import GuestPath, TreeEntry, Workspace, walkTree
from pyro_reactor.system.workspace.walk import Child
from pyro_reactor.wire.dispatch import StreamedAnswer

if TYPE_CHECKING:
    import tarfile

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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
    import tarfile  # noqa: PLC0415 (see members.archiveErrors)

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
        counter: Transfer | Counter,
        room: int | None = None,
        display: str = "",
    ) -> None:
        self.archive = archive
        self.counter = counter
        self.room = room
        self.display = display
        self.entries = 0
        self.bytesWritten = 0

    def add(self, entry: TreeEntry) -> None:
        """Archive one entry met by the walk (its parent is open: a file is read from it)."""
        info = entry.stat
        if stat.S_ISREG(info.st_mode):
            try:
                fd = os.open(entry.name, _READ_FLAGS, dir_fd=entry.parent)
            except FileNotFoundError:
                return  # removed since it was listed
            with open(fd, "rb", buffering=0) as handle:
                self._member(entry.path, os.fstat(fd), handle=handle)
        elif stat.S_ISLNK(info.st_mode):
            self._member(entry.path, info, linkname=entry.child.linkTarget or "")
        else:
            self._member(entry.path, info)

    def _member(
        self,
        arcname: str,
        info: os.stat_result,
        *,
        linkname: str = "",
        handle: IO[bytes] | None = None,
    ) -> None:
        import tarfile  # noqa: PLC0415 (see members.archiveErrors)

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


def _single(parent: int, name: str) -> TreeEntry | None:
    """The entry ``name`` of ``parent`` as the walk would give it (``None``: removed since)."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        link = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(info.st_mode) else None
    except FileNotFoundError:
        return None
    return TreeEntry(parent, name, Child(name, info, link))


def buildExport(
    workspace: Workspace,
    path: GuestPath,
    spoolRoot: Path,
    counter: Transfer | Counter | None = None,
) -> StreamedAnswer:
    """Write the tar of ``path`` into a temporary file under ``spoolRoot`` (blocking)."""
    import tarfile  # noqa: PLC0415 (see members.archiveErrors)

    counter = counter if counter is not None else Counter()
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
                with (
                    workspace.openedDirectory(path.parts, followInside=True) as directory,
                    closing(walkTree(directory)) as walker,
                ):
                    for entry in walker:
                        exporter.add(entry)
            else:
                with workspace.openedParent(path, followInside=True) as (parent, name):
                    single = _single(parent, name)
                    if single is not None:
                        exporter.add(single)
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


__all__ = ["ExportTooLarge", "buildExport", "tarInfoFor"]

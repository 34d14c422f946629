"""Writing a checked plan: ``extract_archive``'s all-or-nothing extraction, crash included.

After the check (L{members.checkAll}), nothing new appears under its final name until the
whole archive is written:

1. *write*: a new directory whose parent exists is made under a stage name
   (``.pyro-extract-<token>-<n>``) and filled in place; every other file or symlink is written
   under a stage name next to its target. A plain tar's data is copied with
   ``copy_file_range``; memory never grows with the archive.
2. *publish*: each staged file or symlink is renamed over its target, in archive order (the
   last of duplicate members wins, as with tar), then each staged directory into place.

A failure (a corrupt stream, ENOSPC) removes every stage, so the workspace is as it was. Across
a crash (``kill -9``, a reboot), a journal at the workspace root
(``.pyro-extract-<token>.journal``, on the workspace's own filesystem) names each stage before
it is made, and says when publishing began: at start-up, L{recoverExtracts} rolls an
interrupted extraction back (stages removed) or, if it was publishing, forward (the remaining
renames done). A stage an older agent left at the workspace root (it kept no journal) is
removed too; one it left deeper in the tree is not looked for.

Every write is relative to a directory descriptor reached from the workspace root one
component at a time with ``O_NOFOLLOW | O_DIRECTORY``, so a symlink swapped in after the
check cannot redirect a write outside the workspace.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from pyro_reactor.capabilities.archives.members import (
    EXTRACT_RULES,
    Directories,
    Kind,
    Limits,
    Rules,
    Step,
    Tree,
    archiveErrors,
    checkAll,
    checkBase,
    freeSpace,
)
from pyro_reactor.capabilities.archives.progress import Counter, Transfer
from pyro_reactor.errors import ActionError
from pyro_reactor.system.fds import closeQuietly, writeAll
from pyro_reactor.system.workspace import GuestPath, MissingPath, Workspace, processUmask

if TYPE_CHECKING:
    import tarfile

log = Logger(namespace="pyro_reactor.capabilities.archives")

CHUNK = 1024 * 1024
"""Bytes copied at a time between a tar and a file: the bound on memory per transfer."""

STAGE_PREFIX = ".pyro-extract-"
"""Name prefix of the entries an extraction writes before publishing them (and its journal)."""

JOURNAL_SUFFIX = ".journal"

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def openArchive(path: Path) -> tarfile.TarFile:
    """The tar (compressed or not) at ``path``, or L{ActionError}."""
    import tarfile  # noqa: PLC0415 (see members.archiveErrors)

    try:
        return tarfile.open(path, "r:*")
    except archiveErrors() as error:
        raise ActionError(str(error)) from None


class Stager:
    """Names the stages of one extraction and journals them at the root (see module doc).

    Without ``journal`` (a secrets set, built in a private directory of its own), stages get
    names but nothing is written down.
    """

    def __init__(self, root: int, directories: Directories | None = None, *, journal: bool = True):
        self.root = root
        self.directories = directories
        self.token = secrets.token_hex(6)
        self.journalName = f"{STAGE_PREFIX}{self.token}{JOURNAL_SUFFIX}"
        self._journal: int | None = None
        self._wanted = journal
        self._count = 0

    def begin(self) -> None:
        if not self._wanted:
            return
        self._journal = os.open(
            self.journalName,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self.root,
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self._journal is not None:
            writeAll(self._journal, json.dumps(record).encode() + b"\n")

    def stage(self, parts: tuple[str, ...], *, directory: bool) -> str:
        """A stage name for the entry ``parts``, journalled before it is made."""
        name = f"{STAGE_PREFIX}{self.token}-{self._count}"
        self._count += 1
        parent = parts[:-1] if self.directories is None else self.directories.onDisk(parts[:-1])
        self._write(
            {"parent": list(parent), "stage": name, "final": parts[-1], "directory": directory}
        )
        return name

    def publishing(self) -> None:
        """Say that the renames begin: from now on a crash is rolled forward."""
        self._write({"publish": True})

    def finish(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            os.close(journal)
            try:
                os.unlink(self.journalName, dir_fd=self.root)
            except FileNotFoundError:
                pass


def applySteps(
    archive: tarfile.TarFile,
    steps: list[Step],
    directories: Directories,
    rules: Rules,
    counter: Transfer | Counter,
    *,
    base: tuple[str, ...] = (),
    fileMode: int | None = None,
    stager: Stager | None = None,
) -> None:
    """Write every step under stage names, then publish them (see the module docstring).

    The directory ``base`` is made first (even for an empty archive, as the reference does).
    On any failure, whatever was staged or made is removed again before the error is raised.
    ``fileMode`` forces every file's mode (secrets); otherwise each file gets its filtered
    mode. Without a ``stager`` (a secrets set, whose whole directory is the stage), a file
    where nothing was is written in place, and only a replacement is staged.
    """
    stager = stager if stager is not None else Stager(directories.root, journal=False)
    pending: list[tuple[tuple[str, ...], str]] = []
    made: list[tuple[tuple[str, ...], str]] = []
    committed = 0
    current: Step | None = None
    published = False
    try:
        stager.begin()
    except OSError as error:
        raise ActionError(f"could not start the extraction: {error.strerror}") from None
    try:
        directories.open(base, create=True)
        for step in steps:
            current = step
            if step.kind is Kind.DIRECTORY:
                directories.open(step.parts, create=True)
                counter.entries += 1
                continue
            parent = directories.open(step.parts[:-1], create=True)
            inPlace = step.fresh and (
                directories.stageName is None or directories.insideStage(step.parts[:-1])
            )
            if inPlace:
                name = step.parts[-1]
                if not directories.insideStage(step.parts[:-1]):
                    made.append((step.parts, name))
            else:
                name = stager.stage(step.parts, directory=False)
                pending.append((step.parts, name))
            if step.kind is Kind.FILE:
                mode = fileMode if fileMode is not None else (step.mode or 0o644) & 0o7777
                _writeFile(archive, step, parent, name, mode, rules=rules, counter=counter)
            else:
                os.symlink(step.member.linkname, name, dir_fd=parent)
            counter.entries += 1
        current = None
        stager.publishing()
        published = True
        for parts, temp in pending:
            parent = directories.open(parts[:-1])
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            committed += 1
        for parts, temp in list(directories.staged.items()):
            parent = directories.open(parts[:-1])
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            del directories.staged[parts]
        stager.finish()
    except BaseException as failure:
        if not published or committed < len(pending) or directories.staged:
            _rollBack(directories, pending[committed:] + made)
        stager.finish()
        if isinstance(failure, OSError):
            if current is not None:
                raise rules.writeFailed(current.member, failure) from None
            message = f"could not move an extracted entry into place: {failure.strerror}"
            raise ActionError(message) from None
        if isinstance(failure, archiveErrors()):
            raise ActionError(str(failure)) from None
        raise


def _writeFile(
    archive: tarfile.TarFile,
    step: Step,
    parent: int,
    name: str,
    mode: int,
    *,
    rules: Rules,
    counter: Transfer | Counter,
) -> None:
    """Write a file member as ``name`` in ``parent``, created with its mode (never wider)."""
    source = archive.extractfile(step.member)
    if source is None:
        raise rules.unreadable(step.member)
    fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=parent)
    try:
        if mode & (processUmask() | 0o7000):
            os.fchmod(fd, mode)
        with source:
            if not _copyInKernel(archive, step.member, fd, counter):
                while True:
                    chunk = source.read(CHUNK)
                    if not chunk:
                        break
                    writeAll(fd, chunk)
                    counter.bytes += len(chunk)
    finally:
        os.close(fd)


_kernelCopy = {"usable": hasattr(os, "copy_file_range")}


def _copyInKernel(
    archive: tarfile.TarFile, member: tarfile.TarInfo, fd: int, counter: Transfer | Counter
) -> bool:
    """Copy a plain tar's member with ``copy_file_range`` (no copy through user space).

    ``False`` (nothing copied) when the archive is compressed, the member sparse, or the
    kernel or filesystems cannot do it: the caller then copies through a buffer.
    """
    import tarfile  # noqa: PLC0415 (see members.archiveErrors)

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
    for parts, temp in reversed(written):
        try:
            os.unlink(temp, dir_fd=directories.open(parts[:-1]))
        except OSError:
            pass
    for parts, temp in reversed(list(directories.staged.items())):
        directories.forget(parts)
        try:
            shutil.rmtree(temp, dir_fd=directories.open(parts[:-1]))
        except OSError:
            pass
    directories.staged.clear()
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
    counter: Transfer | Counter | None = None,
    *,
    maxMembers: int | None = None,
) -> dict[str, Any]:
    """Extract the tar at ``archivePath`` into ``destination``, all or nothing (blocking)."""
    counter = counter if counter is not None else Counter()
    root = workspace.openRoot()
    directories = Directories(root)
    stager = Stager(root, directories)
    directories.stageName = lambda parts: stager.stage(parts, directory=True)
    try:
        free, block = freeSpace(root)
        with openArchive(archivePath) as archive:
            tree = Tree(directories)
            checkBase(tree, destination)
            limits = Limits(maxMembers=maxMembers, freeBytes=free, blockSize=block)
            steps = checkAll(archive, tree, destination.parts, EXTRACT_RULES, limits)
            applySteps(
                archive,
                steps,
                directories,
                EXTRACT_RULES,
                counter,
                base=destination.parts,
                stager=stager,
            )
    finally:
        directories.close()
        os.close(root)
    return {
        "destination": destination.text,
        "entry_count": len(steps),
        "bytes_written": sum(step.member.size for step in steps if step.kind is Kind.FILE),
    }


def _removeEntry(parent: int, name: str) -> None:
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if info.st_mode & 0o170000 == 0o040000:
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def _replay(root: int, journalName: str) -> tuple[str, int]:
    """Roll one interrupted extraction back or forward; its outcome and entries handled."""
    with open(
        os.open(journalName, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    ) as handle:
        lines = handle.read().splitlines()
    records: list[dict[str, Any]] = []
    publish = False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash: its stage was never made
        if record.get("publish"):
            publish = True
        elif isinstance(record, dict) and "stage" in record:
            records.append(record)
    # Publishing renames files and symlinks first, then directories: the same order here.
    ordered = [r for r in records if not r.get("directory")] + [
        r for r in records if r.get("directory")
    ]
    directories = Directories(root)
    handled = 0
    try:
        for record in ordered if publish else reversed(records):
            stage, final = str(record["stage"]), str(record["final"])
            if not stage.startswith(STAGE_PREFIX) or "/" in stage or "/" in final:
                continue
            try:
                parent = directories.open(tuple(str(part) for part in record["parent"]))
                if publish:
                    os.rename(stage, final, src_dir_fd=parent, dst_dir_fd=parent)
                else:
                    _removeEntry(parent, stage)
            except OSError:
                continue  # gone, or its parent changed since: nothing of ours to do there
            handled += 1
    finally:
        directories.close()
    os.unlink(journalName, dir_fd=root)
    return ("rolled forward" if publish else "rolled back"), handled


def recoverExtracts(workspace: Workspace) -> int:
    """Finish what interrupted extractions left (see the module docstring); blocking.

    Only at start-up, before any extraction runs. Returns how many leftovers were handled.
    """
    try:
        root = workspace.openRoot()
    except MissingPath:
        return 0  # not mounted (yet): nothing to recover now
    try:
        names = os.listdir(root)
        journals = sorted(
            n for n in names if n.startswith(STAGE_PREFIX) and n.endswith(JOURNAL_SUFFIX)
        )
        handled = 0
        for journal in journals:
            try:
                outcome, count = _replay(root, journal)
            except OSError as error:
                log.warn(
                    "could not recover the interrupted extraction {journal}: {reason}",
                    journal=journal,
                    reason=error.strerror,
                )
                continue
            log.info(
                "an interrupted extraction was {outcome} ({count} entries)",
                outcome=outcome,
                count=count,
                journal=journal,
            )
            handled += 1
        # Stages an older agent (no journal) left at the root.
        for name in os.listdir(root):
            if name.startswith(STAGE_PREFIX) and not name.endswith(JOURNAL_SUFFIX):
                try:
                    _removeEntry(root, name)
                except OSError:
                    continue
                handled += 1
        return handled
    finally:
        closeQuietly(root)


__all__ = [
    "CHUNK",
    "STAGE_PREFIX",
    "Stager",
    "applySteps",
    "extractArchive",
    "openArchive",
    "recoverExtracts",
]

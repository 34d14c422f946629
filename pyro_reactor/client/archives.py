"""The host's side of archives: building an upload's tar, unpacking an export safely.

Blocking file work, meant to run in a worker thread (the client calls these through
``deferToThread``). Nothing here holds a whole archive in memory.

- L{buildUploadArchive} packs a local file (one member, its name) or the contents of a local
  directory (its children, recursively; the directory itself is not a member), the shape the
  agent's ``extract_archive`` puts into a destination directory. Symlinks stay links; a file
  with several hard links is packed as a plain file each time (the agent refuses hard links);
  sockets, FIFOs and devices are refused.
- L{extractSafely} unpacks an export into a local directory and refuses (before writing
  anything) every member that could land outside it: absolute or ``..`` names, links whose
  target leaves the directory, members below a symlink (from the archive or already on disk),
  hard links and special files.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from pyro_reactor.system.tarnames import UnsafeMemberName, memberParts

_CHUNK = 256 * 1024


class UnsafeArchiveError(Exception):
    """An export or upload could not be handled without leaving its directory."""


def buildUploadArchive(source: Path, spool: Path | None = None) -> tuple[Path, int]:
    """Pack ``source`` into a new temporary tar file; returns its path and size.

    The caller owns (and removes) the file.
    """
    info = os.lstat(source)
    fd, name = tempfile.mkstemp(prefix="pyro-upload-", suffix=".tar", dir=spool)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            tar.dereference = False
            if stat.S_ISDIR(info.st_mode):
                for child in sorted(os.listdir(source)):
                    _addTree(tar, source / child, child)
            else:
                _addOne(tar, source, source.name)
        return path, path.stat().st_size
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def buildSecretsArchive(values: Mapping[str, str | bytes], spool: Path | None = None) -> Path:
    """A tar of one file per secret (name -> value), for ``install_secrets``; 0600 members."""
    fd, name = tempfile.mkstemp(prefix="pyro-secrets-", suffix=".tar", dir=spool)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for secretName, value in values.items():
                data = value.encode("utf-8") if isinstance(value, str) else value
                member = tarfile.TarInfo(secretName)
                member.size = len(data)
                member.mode = 0o600
                tar.addfile(member, _BytesReader(data))
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = bytes(self._data[self._offset : end])
        self._offset += len(chunk)
        return chunk


def _addTree(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    _addOne(tar, path, arcname)
    if path.is_dir() and not path.is_symlink():
        for child in sorted(os.listdir(path)):
            _addTree(tar, path / child, f"{arcname}/{child}")


def _addOne(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    member = tar.gettarinfo(str(path), arcname)
    if member.islnk():
        # A second name of a file already packed: pack it as a file (the agent refuses links).
        member.type = tarfile.REGTYPE
        member.linkname = ""
        member.size = os.lstat(path).st_size
    if member.isfile():
        with path.open("rb") as handle:
            tar.addfile(member, handle)
    elif member.isdir() or member.issym():
        tar.addfile(member)
    else:
        raise UnsafeArchiveError(f"cannot upload {path}: not a file, directory or symlink")


def _memberParts(name: str) -> tuple[str, ...]:
    try:
        return memberParts(name)
    except UnsafeMemberName as unsafe:
        if unsafe.absolute:
            raise UnsafeArchiveError(
                f"refusing archive member with an absolute path: {name}"
            ) from None
        raise UnsafeArchiveError(
            f"refusing archive member that leaves the directory: {name}"
        ) from None


def _linkStaysInside(parts: tuple[str, ...], target: str) -> bool:
    if target == "" or PurePosixPath(target).is_absolute():
        return False
    depth = len(parts) - 1
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _checkOnDisk(root: Path, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
    current = root
    for index, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return
        last = index == len(parts) - 1
        if stat.S_ISLNK(info.st_mode):
            if last and member.issym():
                return  # an existing link is replaced by the archive's link
            raise UnsafeArchiveError(
                f"refusing to write {member.name}: {current} is a symlink on this host"
            )
        if not last and not stat.S_ISDIR(info.st_mode):
            raise UnsafeArchiveError(f"refusing to write {member.name}: {current} is not a dir")
        if last and stat.S_ISDIR(info.st_mode) and not member.isdir():
            raise UnsafeArchiveError(f"{member.name} conflicts with the directory {current}")
        if last and member.isdir() and not stat.S_ISDIR(info.st_mode):
            raise UnsafeArchiveError(f"{member.name} conflicts with the file {current}")


def _plan(tar: tarfile.TarFile, root: Path) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    plan: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    links: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    for member in tar:
        parts = _memberParts(member.name)
        if not parts:
            if member.isdir():
                continue  # "./" of `tar -C dir -cf - .`
            raise UnsafeArchiveError(f"refusing archive member with an empty name: {member.name}")
        for end in range(1, len(parts)):
            if parts[:end] in links:
                raise UnsafeArchiveError(f"refusing {member.name}: it lies below a symlink")
            if parts[:end] in files:
                raise UnsafeArchiveError(f"refusing {member.name}: it lies below a file")
        if member.issym():
            if not _linkStaysInside(parts, member.linkname):
                raise UnsafeArchiveError(
                    f"refusing symlink {member.name}: its target {member.linkname!r} leaves"
                    " the directory"
                )
            links.add(parts)
        elif member.isfile():
            files.add(parts)
        elif not member.isdir():
            kind = "hard link" if member.islnk() else "special file"
            raise UnsafeArchiveError(f"refusing archive member {member.name}: a {kind}")
        _checkOnDisk(root, parts, member)
        plan.append((member, parts))
    return plan


def extractSafely(archive: Path, destination: Path) -> list[Path]:
    """Unpack ``archive`` into ``destination`` (created if missing); all checks come first.

    Returns the paths written, in archive order. Raises L{UnsafeArchiveError} (having written
    nothing) for any member that could leave ``destination``.
    """
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.absolute()
    written: list[Path] = []
    with tarfile.open(archive, "r:*") as tar:
        plan = _plan(tar, root)
        for member, parts in plan:
            target = root.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                target.chmod((member.mode & 0o777) | 0o700)
            elif member.issym():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink():
                    target.unlink()
                os.symlink(member.linkname, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _writeFile(tar, member, target)
            written.append(target)
    return written


def _writeFile(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise UnsafeArchiveError(f"cannot read archive member {member.name}")
    fd, name = tempfile.mkstemp(prefix=".pyro-download-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            while chunk := source.read(_CHUNK):
                handle.write(chunk)
        os.chmod(name, member.mode & 0o777)
        os.utime(name, (member.mtime, member.mtime))
        # rename replaces the final name itself, never what a symlink there points to.
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise

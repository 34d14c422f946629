"""Building tars in memory and taking snapshots of directory trees, for the archive tests."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

Entry = tuple[str, int, bytes | str | None]
Member = tuple[tarfile.TarInfo, bytes | None]


@implementer(ILogObserver)
class _Recorder:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


def recordEvents(case: SynchronousTestCase) -> list[LogEvent]:
    """Every log event emitted until the end of ``case``."""
    recorder = _Recorder()
    globalLogPublisher.addObserver(recorder)
    case.addCleanup(globalLogPublisher.removeObserver, recorder)
    return recorder.events


def fileMember(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = mode
    return member, data


def dirMember(name: str, mode: int = 0o755) -> Member:
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE
    member.mode = mode
    return member, None


def linkMember(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = target
    member.mode = 0o777
    return member, None


def specialMember(name: str, kind: bytes) -> Member:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = 0o644
    return member, None


def makeTar(members: Sequence[Member], compression: str = "") -> bytes:
    """The bytes of a tar holding ``members`` (``compression``: "", "gz", "bz2" or "xz")."""
    buffer = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for member, data in members:
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry below ``root``: its kind, permission bits and content or link target.

    Symlinks are described, never followed.
    """
    result: dict[str, Entry] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                result[relative] = ("symlink", mode, os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                result[relative] = ("file", mode, path.read_bytes())
            elif stat.S_ISDIR(info.st_mode):
                result[relative] = ("directory", mode, None)
            else:
                result[relative] = ("other", mode, None)
    return result

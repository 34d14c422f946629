"""The upload spool: the raw body of an upload action, kept in a file until its handler runs.

Bodies go to ``upload-*.tar`` files under the state directory's ``pyro-spool/``, created 0600.
The directory holds only transfers in flight: L{emptySpool} removes whatever a previous run
left (an agent killed mid-upload leaves its file, and in a guest the state directory is RAM).

Writes happen on the reactor, chunk by chunk as they arrive: a write into the page cache of a
chunk the reactor has just read (at most 64 KiB) costs microseconds, and
``benchmarks/bench_abuse.py`` shows that a 200 MiB upload does not delay a concurrent ``ping``
beyond a millisecond or two (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from twisted.logger import Logger

from pyro_reactor.errors import ActionError

log = Logger(namespace="pyro_reactor.wire.spool")

_DESCRIPTORS_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def spoolError(error: OSError, doing: str) -> ActionError:
    """The answer for an ``OSError`` while spooling (no path in it: the client never sees ours)."""
    if error.errno in _DESCRIPTORS_EXHAUSTED:
        return ActionError(f"could not {doing}: the agent is out of file descriptors, try again")
    return ActionError(f"could not {doing}: {error.strerror}")


def emptySpool(directory: Path) -> int:
    """Remove every file a previous run left in the spool; the number removed.

    Called once at start-up, before the agent listens: nothing of this run is in flight yet.
    """
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for entry in os.scandir(directory):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as error:
            log.warn(
                "could not remove {name} from the spool: {error}",
                name=entry.name,
                error=error.strerror,
            )
    if removed:
        log.info("spool emptied: {removed} files left by an earlier run", removed=removed)
    return removed


class UploadSpool:
    """One upload body being written to its spool file.

    L{write} takes the bytes as they arrive and returns how many it kept (never more than the
    body still missing); L{finish} closes the file and returns its path, which then belongs to
    the request (the handler reads it; the protocol removes it after the answer). L{discard}
    removes everything, whenever the upload cannot complete. Errors are L{ActionError}s ready
    to answer.
    """

    def __init__(self, directory: Path, size: int) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=directory)
        except OSError as error:
            raise spoolError(error, "spool the upload") from None
        self.path: Path | None = Path(name)
        self._fd: int | None = fd
        self.size = size
        self.remaining = size

    @property
    def received(self) -> int:
        return self.size - self.remaining

    def write(self, data: bytes) -> int:
        """Keep the next bytes of the body; how many of ``data`` belonged to it."""
        assert self._fd is not None
        chunk = data[: self.remaining] if len(data) > self.remaining else data
        view = memoryview(chunk)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as error:
            self.discard()
            raise spoolError(error, "spool the upload") from None
        self.remaining -= len(chunk)
        return len(chunk)

    def finish(self) -> Path:
        """Close the complete body's file and hand its path over."""
        assert self._fd is not None and self.path is not None and self.remaining == 0
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError as error:
            self.discard()
            raise spoolError(error, "spool the upload") from None
        path, self.path = self.path, None
        return path

    def discard(self) -> None:
        """Close and remove the file, if this spool still owns it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self.path is not None:
            path, self.path = self.path, None
            path.unlink(missing_ok=True)

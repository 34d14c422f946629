"""A shell's log file: the redacted stream on disk, capped and rotated once.

``<id>.log`` holds the redacted output from some character on; when appending would take it
past ``maxBytes``, it becomes ``<id>.log.1`` (replacing the older one) and a fresh
``<id>.log`` starts. So a shell never holds more than twice ``maxBytes`` of log, and output
from the start of ``<id>.log.1`` on is readable. Each file (a L{LogSegment}) keeps
character-to-byte checkpoints, so a read starts near its first character rather than at the
file's start. Reads run in the agent's thread pool (L{readSegments}), on duplicated
descriptors: a rotation meanwhile does not disturb them.
"""

from __future__ import annotations

import codecs
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from pyro_reactor.capabilities.shells.encoding import fitEncoded

log = Logger(namespace="pyro_reactor.capabilities.shells")

CHECKPOINT_CHARS = 64 * 1024
"""Distance (in characters) between a log file's character-to-byte checkpoints."""

_READ_BLOCK = 256 * 1024
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass
class LogSegment:
    """One log file: characters ``[start, start + chars)`` of the stream."""

    fd: int
    start: int
    chars: int = 0
    size: int = 0
    checkpoints: list[tuple[int, int]] = field(default_factory=list)

    def locate(self, char: int) -> tuple[int, int]:
        """A byte offset to read from for stream character ``char``, and the characters to
        skip from there."""
        index = bisect_right(self.checkpoints, (char, 2**63)) - 1
        if index < 0:
            return 0, char - self.start
        atChar, atByte = self.checkpoints[index]
        return atByte, char - atChar


def readSegments(pieces: list[tuple[int, int, int, int]], limit: int) -> str:
    """Read ``(fd, byteOffset, skipChars, count)`` pieces, one after the other, keeping at most
    ``limit`` bytes of JSON-encoded text. Blocking (the thread pool); closes every ``fd``."""
    try:
        parts: list[str] = []
        budget = limit
        for fd, byteOffset, skipChars, count in pieces:
            text, used, complete = _readText(fd, byteOffset, skipChars, count, budget)
            parts.append(text)
            budget -= used
            if not complete:
                break
        return "".join(parts)
    finally:
        for piece in pieces:
            os.close(piece[0])


def _readText(
    fd: int, byteOffset: int, skipChars: int, count: int, budget: int
) -> tuple[str, int, bool]:
    """Up to ``count`` characters from ``byteOffset`` after skipping ``skipChars``, as long as
    they fit ``budget`` encoded bytes: the text, its encoded size, and whether all ``count``
    characters (or the file's end) fit. Never decodes more than a block past the budget."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces: list[str] = []
    have = used = 0
    offset = byteOffset
    while have < count:
        data = os.pread(fd, _READ_BLOCK, offset)
        if not data:
            break
        offset += len(data)
        text = decoder.decode(data)
        if skipChars:
            if len(text) <= skipChars:
                skipChars -= len(text)
                continue
            text = text[skipChars:]
            skipChars = 0
        text = text[: count - have]
        kept = fitEncoded(text, budget - used)
        pieces.append(kept.text)
        have += len(kept.text)
        used += kept.size
        if len(kept.text) < len(text):
            return "".join(pieces), used, False
    return "".join(pieces), used, True


class ShellLog:
    """The append side and the read plan of a shell's log (see the module docstring).

    @param path: ``<id>.log``; an earlier shell's files of the same id are replaced.
    @param maxBytes: the size past which the file is rotated to ``<path>.1``.
    """

    def __init__(self, path: Path, maxBytes: int) -> None:
        self.path = path
        self.oldPath = path.with_name(path.name + ".1")
        self.maxBytes = max(maxBytes, 1)
        for stale in (self.path, self.oldPath):
            # Fresh files, never the log of an earlier shell of the same id (a pending read
            # may still hold that one open).
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
        self._current: LogSegment | None = LogSegment(os.open(path, _OPEN_FLAGS, 0o600), 0)
        self._old: LogSegment | None = None
        self.broken = False
        """An append failed: the log no longer follows the stream."""
        self.closed = False

    @property
    def end(self) -> int:
        """The stream's characters up to here are in the log (from L{first})."""
        current = self._current
        return 0 if current is None or self.broken else current.start + current.chars

    @property
    def first(self) -> int:
        """The first character still in the log."""
        segment = self._old or self._current
        return 0 if segment is None or self.broken else segment.start

    def append(self, text: str, position: int) -> None:
        """Add ``text``, the stream's characters from ``position`` on, to the log.

        After a failed append (a full disk), each later append first tries to start the log
        afresh at its ``position``: what was logged before is dropped (it no longer lines up
        with the stream) and the log follows the stream again once there is room.
        """
        if self.closed or not text:
            return
        if self.broken and not self._restart(position):
            return
        current = self._current
        assert current is not None
        data = text.encode("utf-8")
        try:
            if current.size and current.size + len(data) > self.maxBytes:
                current = self._rotate(current)
            if not current.checkpoints or position - current.checkpoints[-1][0] >= CHECKPOINT_CHARS:
                current.checkpoints.append((position, current.size))
            view = memoryview(data)
            while view:
                written = os.write(current.fd, view)
                view = view[written:]
        except OSError as error:
            # Keep the shell going; what falls out of the memory window meanwhile is lost.
            self.broken = True
            log.error(
                "cannot append to shell log {path}: {error}",
                path=str(self.path),
                error=error.strerror,
            )
            return
        current.size += len(data)
        current.chars += len(text)

    def _restart(self, position: int) -> bool:
        self._closeSegments()
        for stale in (self.oldPath, self.path):
            try:
                stale.unlink()
            except OSError:
                pass
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        except OSError:
            return False
        self._current = LogSegment(fd, position)
        self.broken = False
        log.info(
            "shell log {path} restarted at character {position}",
            path=str(self.path),
            position=position,
        )
        return True

    def _closeSegments(self) -> None:
        for segment in (self._old, self._current):
            if segment is not None:
                os.close(segment.fd)
        self._old = self._current = None

    def _rotate(self, current: LogSegment) -> LogSegment:
        os.replace(self.path, self.oldPath)
        if self._old is not None:
            os.close(self._old.fd)
        self._old = current
        fresh = LogSegment(os.open(self.path, _OPEN_FLAGS, 0o600), current.start + current.chars)
        self._current = fresh
        return fresh

    def plan(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """The pieces L{readSegments} reads for characters ``[start, stop)``, each on a
        duplicated descriptor. ``start`` must be at least L{first} and ``stop`` at most L{end}.
        """
        pieces: list[tuple[int, int, int, int]] = []
        for segment in (self._old, self._current):
            if segment is None:
                continue
            low, high = max(start, segment.start), min(stop, segment.start + segment.chars)
            if low >= high:
                continue
            byteOffset, skip = segment.locate(low)
            try:
                pieces.append((os.dup(segment.fd), byteOffset, skip, high - low))
            except OSError:
                for piece in pieces:
                    os.close(piece[0])
                raise
        return pieces

    def close(self) -> None:
        """Close the files (their content stays until the id is reused)."""
        self.closed = True
        self._closeSegments()


__all__ = ["CHECKPOINT_CHARS", "LogSegment", "ShellLog", "readSegments"]

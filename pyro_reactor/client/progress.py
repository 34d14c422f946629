"""A one-line progress bar for uploads and downloads: bytes, percentage, rate, ETA.

The CLI draws it on its standard output when that is a terminal. It redraws at most ten times
a second (and once at 100 %), so a fast local transfer does not spend its time printing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TextIO


def formatBytes(count: float) -> str:
    """``1.5 MiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def formatDuration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Call it with ``(done, total)`` as bytes move; ``finish()`` ends the line."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        clock: Callable[[], float],
        width: int | None = None,
        interval: float = 0.1,
    ) -> None:
        self.stream = stream
        self.label = label
        self.clock = clock
        self.width = width
        self.interval = interval
        self.started = clock()
        self._lastDraw: float | None = None
        self._drawn = False
        self._last = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        self._last = (done, total)
        now = self.clock()
        if done < total and self._lastDraw is not None and now - self._lastDraw < self.interval:
            return
        self._lastDraw = now
        self.stream.write("\r" + self.render(done, total, now - self.started))
        self.stream.flush()
        self._drawn = True

    def render(self, done: int, total: int, elapsed: float) -> str:
        columns = self.width or shutil.get_terminal_size((80, 24)).columns
        rate = done / elapsed if elapsed > 0 else 0.0
        if total > 0:
            fraction = min(done / total, 1.0)
            eta = formatDuration((total - done) / rate) if rate > 0 else "--:--"
            tail = (
                f" {fraction * 100:3.0f}% {formatBytes(done)}/{formatBytes(total)}"
                f" {formatBytes(rate)}/s ETA {eta}"
            )
        else:
            fraction = 1.0
            tail = f" 100% {formatBytes(done)} {formatBytes(rate)}/s"
        barWidth = max(columns - len(self.label) - len(tail) - 4, 5)
        filled = int(barWidth * fraction)
        bar = "#" * filled + "." * (barWidth - filled)
        return f"{self.label} [{bar}]{tail}"[: columns - 1]

    def finish(self) -> None:
        if self._drawn:
            done, total = self._last
            self.stream.write("\r" + self.render(done, total, self.clock() - self.started) + "\n")
            self.stream.flush()

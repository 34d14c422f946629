"""Progress of a long transfer: counters bumped by a worker thread, logged by the reactor."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="pyro_reactor.capabilities.archives")

PROGRESS_INTERVAL = 5.0
"""Seconds between two progress events of a long transfer."""


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


class Counter:
    """A stand-in for L{Transfer} when a blocking function is called directly."""

    bytes = 0
    entries = 0


__all__ = ["PROGRESS_INTERVAL", "Counter", "Transfer"]

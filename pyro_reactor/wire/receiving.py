"""The upload side of a request's connection: the raw bytes after an upload's request line.

``Receiving`` is a mixin of L{RequestProtocol}, which frames the request: once an upload's
line is parsed, its ``archive_size`` bytes go to an L{UploadSpool} (a file in the spool
directory, written off the reactor once writes stall; reading from the client pauses while
the disk lags), progress is logged, and the finished file is handed to the request before
dispatch. A spool or upload left behind by a connection that ends is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

from twisted.internet.interfaces import IPushProducer, IReactorTime, ITransport
from twisted.python.failure import Failure

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import MemoryBudget
from pyro_reactor.wire.limits import EARLY_BYTES_LIMIT
from pyro_reactor.wire.phases import Phase
from pyro_reactor.wire.request import Request
from pyro_reactor.wire.sender import PROGRESS_INTERVAL, logTransfer
from pyro_reactor.wire.spool import InThread, UploadSpool

__all__ = ["Receiving"]


class Receiving:
    """The upload side of L{RequestProtocol}: spools an upload's body, then dispatches.

    The attributes and methods below the docstring are the protocol's, declared here for the
    type checker; the phase moves to reading the body and then to working here.
    """

    transport: ITransport | None
    clock: IReactorTime
    spoolDirectory: Path
    budget: MemoryBudget
    writeInThread: InThread | None
    _phase: Phase
    _lost: bool
    _paused: bool
    _request: Request | None
    _early: bytearray
    _spool: UploadSpool | None
    _upload: Path | None
    _bodyStarted: float
    _lastProgress: float
    _refuse: Callable[[ActionError], None]
    _cancelTimer: Callable[[], None]
    _dispatch: Callable[[], None]

    def _startBody(self, size: int) -> None:
        try:
            self._spool = UploadSpool(
                self.spoolDirectory,
                size,
                self.writeInThread,
                self._spoolDrained,
                self.budget.reserve(0, "an upload's bytes waiting for the disk"),
            )
        except ActionError as error:
            self._refuse(error)
            return
        self._bodyStarted = self._lastProgress = self.clock.seconds()
        self._phase = Phase.READING_BODY
        if size == 0:
            self._finishBody()

    def _receiveBody(self, data: bytes) -> None:
        spool = self._spool
        assert spool is not None
        try:
            spool.write(data)
        except ActionError as error:
            self._refuse(error)
            return
        if spool.remaining == 0:
            self._finishBody()
            return
        if spool.full and not self._paused:
            # The disk is slower than the client: stop reading until the writes catch up.
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()
        now = self.clock.seconds()
        if now - self._lastProgress >= PROGRESS_INTERVAL:
            self._lastProgress = now
            action = self._request.action if self._request else None
            logTransfer("upload in progress", action, spool.received, self._bodyStarted, now)

    def _spoolDrained(self) -> None:
        if self._paused and self._phase == Phase.READING_BODY and not self._lost:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()

    def _finishBody(self) -> None:
        assert self._spool is not None
        self._cancelTimer()
        self._phase = Phase.WORKING
        self._spool.finish().addCallbacks(self._bodyWritten, self._bodyFailed)

    def _bodyWritten(self, path: Path) -> None:
        assert self._request is not None and self._spool is not None
        spool, self._spool = self._spool, None
        self._upload = self._request.upload = path
        if self._lost:
            self._discardUpload()
            return
        if self._paused and len(self._early) < EARLY_BYTES_LIMIT:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()
        now = self.clock.seconds()
        logTransfer("upload received", self._request.action, spool.size, self._bodyStarted, now)
        self._dispatch()

    def _bodyFailed(self, failure: Failure) -> None:
        self._spool = None
        if self._lost:
            return
        error = failure.value
        self._refuse(
            error if isinstance(error, ActionError) else ActionError("could not spool the upload")
        )

    def _discardSpool(self) -> None:
        if self._spool is not None:
            spool, self._spool = self._spool, None
            spool.discard()
        self._discardUpload()

    def _discardUpload(self) -> None:
        if self._upload is not None:
            upload, self._upload = self._upload, None
            upload.unlink(missing_ok=True)

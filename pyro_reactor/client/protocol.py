"""The client's side of the wire: one request on one connection, one answer back.

L{ExchangeProtocol} writes a request line (and, for an upload, streams ``archive_size`` bytes
from a file with a producer, so the body is never in memory), then reads the agent's answer
line. For an export, the answer line is a header followed by ``archive_size`` raw bytes, which
are written to a file as they arrive. The result is a ``Deferred`` on ``protocol.answered``:
the answer ``dict``, or a failure with an L{AgentError}. The protocol knows bytes and JSON and
nothing about actions; ``api.py`` gives the calls their meaning.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from pyro_reactor.client.errors import (
    AgentClosedError,
    AgentError,
    AgentProtocolError,
    AgentUnavailableError,
)

Progress = Callable[[int, int], None]
"""Told ``(done, total)`` bytes as an upload or an export moves."""

DEFAULT_MAX_ANSWER_BYTES = 256 * 1024 * 1024
"""Longest answer line accepted: exec output may be 16 MiB per stream before JSON escaping."""


def encodeRequest(fields: dict[str, Any]) -> bytes:
    """One request line, as the agent reads it."""
    return json.dumps(fields, separators=(",", ":")).encode("utf-8") + b"\n"


class ExchangeProtocol(Protocol):
    """Sends one request (and its upload body), receives one answer (and its export body)."""

    def __init__(
        self,
        request: bytes,
        *,
        upload: IO[bytes] | None = None,
        uploadSize: int = 0,
        export: IO[bytes] | None = None,
        progress: Progress | None = None,
        maxAnswerBytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self.request = request
        self.upload = upload
        self.uploadSize = uploadSize
        self.export = export
        self.progress = progress
        self.maxAnswerBytes = maxAnswerBytes
        self.answered: Deferred[dict[str, Any]] = Deferred(self._cancel)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._header: dict[str, Any] | None = None
        self._remaining = 0
        self._total = 0
        self._sender: FileSender | None = None
        self._sent = 0
        self._done = False

    # -- sending -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        if self.upload is None:
            return
        if self.progress is not None:
            self.progress(0, self.uploadSize)
        self._sender = FileSender()
        consumer: IConsumer = self.transport  # type: ignore[assignment]
        sending = self._sender.beginFileTransfer(self.upload, consumer, self._counted)
        # Stopped early (the agent answered an error first, or the connection went away):
        # what happens to the call is decided by the answer or by connectionLost.
        sending.addBoth(self._uploadEnded)

    def _counted(self, data: bytes) -> bytes:
        self._sent += len(data)
        if self.progress is not None:
            self.progress(self._sent, self.uploadSize)
        return data

    def _uploadEnded(self, result: object) -> None:
        self._sender = None
        if isinstance(result, Failure) or self._done:
            return
        if self._sent != self.uploadSize:
            self._fail(
                AgentError(
                    f"the upload file holds {self._sent} bytes, not the {self.uploadSize} announced"
                )
            )

    # -- receiving -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        if self._header is not None:
            self._receiveExport(data)
            return
        newline = data.find(b"\n")
        if newline < 0:
            self._buffered += len(data)
            if self._buffered > self.maxAnswerBytes:
                self._fail(
                    AgentProtocolError(
                        f"the agent's answer exceeds the limit of {self.maxAnswerBytes} bytes"
                    )
                )
                return
            self._chunks.append(data)
            return
        self._chunks.append(data[:newline])
        line = b"".join(self._chunks)
        self._chunks = []
        rest = data[newline + 1 :]
        try:
            answer = json.loads(line)
        except ValueError:
            shown = line[:200].decode("utf-8", "replace")
            self._fail(AgentProtocolError(f"the agent's answer is not JSON: {shown!r}"))
            return
        if not isinstance(answer, dict):
            self._fail(AgentProtocolError("the agent's answer is not a JSON object"))
            return
        if self.export is None or "error" in answer:
            self._succeed(answer)
            return
        size = answer.get("archive_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            self._fail(AgentProtocolError("the export header has no valid archive_size"))
            return
        self._header = answer
        self._remaining = self._total = size
        if self.progress is not None:
            self.progress(0, size)
        if size == 0:
            self._succeed(answer)
        elif rest:
            self._receiveExport(rest)

    def _receiveExport(self, data: bytes) -> None:
        assert self.export is not None and self._header is not None
        chunk = data[: self._remaining]
        try:
            self.export.write(chunk)
        except OSError as error:
            self._fail(AgentError(f"could not write the export: {error.strerror or error}"))
            return
        self._remaining -= len(chunk)
        if self.progress is not None:
            self.progress(self._total - self._remaining, self._total)
        if self._remaining == 0:
            self._succeed(self._header)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done:
            return
        if self._header is not None:
            got = self._total - self._remaining
            self._fail(
                AgentProtocolError(
                    f"the connection closed after {got} of the export's {self._total} bytes"
                )
            )
        elif self._buffered or self._chunks:
            self._fail(AgentProtocolError("the connection closed in the middle of the answer"))
        elif self._sent < self.uploadSize:
            self._fail(
                AgentClosedError(
                    f"the connection closed after {self._sent} of the upload's"
                    f" {self.uploadSize} bytes, without an answer"
                )
            )
        else:
            self._fail(AgentClosedError("the agent closed the connection without answering"))

    # -- outcome -------------------------------------------------------------------------

    def _succeed(self, answer: dict[str, Any]) -> None:
        self._finish(abort=False)
        self.answered.callback(answer)

    def _fail(self, error: AgentError) -> None:
        self._finish(abort=True)
        self.answered.errback(Failure(error))

    def _finish(self, abort: bool) -> None:
        self._done = True
        self._chunks = []
        transport: ITransport | None = self.transport
        if transport is None:
            return
        if self._sender is not None:
            # The agent answered before taking the whole body (an error): stop sending, and
            # drop the connection rather than wait for a body nobody reads.
            self._sender.stopProducing()
            self._sender = None
            unregister = getattr(transport, "unregisterProducer", None)
            if unregister is not None:
                unregister()
            abort = True
        _close(transport, abort)

    def _cancel(self, answered: Deferred[dict[str, Any]]) -> None:
        # Timeout or caller's cancel: drop the connection now; the Deferred fails with
        # CancelledError (the caller's timeout turns that into its own error).
        self._done = True
        if self.transport is not None:
            _close(self.transport, abort=True)


def _close(transport: ITransport, abort: bool) -> None:
    abortConnection = getattr(transport, "abortConnection", None)
    if abort and abortConnection is not None:
        abortConnection()
    else:
        transport.loseConnection()


class ExchangeFactory(Factory):
    """Hands out the one L{ExchangeProtocol} of a call (an endpoint connects once)."""

    noisy = False

    def __init__(self, protocol: ExchangeProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> ExchangeProtocol:
        self._protocol.factory = self
        return self._protocol


__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "AgentUnavailableError",
    "ExchangeFactory",
    "ExchangeProtocol",
    "Progress",
    "encodeRequest",
]

"""Writing answers: the JSON line encoder, and a sender with backpressure and a deadline.

L{encodeAnswer} gives exactly the bytes of ``json.dumps(answer) + "\\n"`` in UTF-8 (the
reference's encoding), but splices long top-level strings that need no escaping (base64
content, most command output) in as raw bytes: the C encoder's escaping scan of a 1.4 MB
base64 string costs 2.7 ms, a check and a copy 0.7 ms.

L{AnswerSender} writes an answer's bytes (a line, then possibly a file) in chunks, each when
the transport has sent the last one, so that an answer the client does not read is never
copied whole into the transport's buffer. It drops the connection when the client accepts
nothing for ``timeout`` seconds (``--answer-timeout``), so a client that stops reading frees
what its answer holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime, ITransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import Reservation

log = Logger(namespace="pyro_reactor.wire.sender")

CHUNK = 256 * 1024
"""Bytes written at a time (FileSender's 16 KiB costs a third of the throughput on loopback)."""

PROGRESS_INTERVAL = 5.0
"""Seconds between two progress events of a long upload or export."""

SPLICE_CHARS = 4096
"""Top-level strings at least this long are checked for a raw splice instead of escaped."""

_BOUND_PIECE = 64 * 1024
"""Characters of text escaped at a time (a bound on the copies one escape step makes)."""


class LinePieces:
    """An answer line kept as the pieces it was encoded in, never joined into one buffer.

    A line grown in one buffer is copied each time the allocator cannot extend it in place,
    and the old copies stay resident as holes in the heap until a trim: with 8 exec answers
    encoded while other connections filled the heap, 30 MB more than the answers themselves
    for 0.2 s. Pieces are each allocated once, at their size.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0

    def __iadd__(self, data: bytes | bytearray) -> LinePieces:
        if data:
            self.pieces.append(bytes(data))
            self.size += len(data)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


Line = bytes | bytearray | LinePieces
"""An encoded answer line (large ones are kept in pieces, see L{LinePieces})."""


def encodeAnswer(answer: dict[str, Any]) -> Line:
    """One answer line, byte for byte as ``(json.dumps(answer) + "\\n").encode("utf-8")``.

    An answer with long strings is built as L{LinePieces}: a long string that needs no
    escaping is taken as it is, any other is escaped a piece at a time. So a 16 MiB output of
    replacement characters costs its 100 MB of JSON once, not three times over
    (``json.dumps``'s string, the string with its newline, and the bytes).
    """
    if not any(isinstance(v, str) and len(v) >= SPLICE_CHARS for v in answer.values()):
        return (json.dumps(answer) + "\n").encode("utf-8")
    line = LinePieces()
    line += b"{"
    for index, (name, value) in enumerate(answer.items()):
        if index:
            line += b", "
        if isinstance(value, str) and len(value) >= SPLICE_CHARS:
            line += json.dumps(name).encode("utf-8")
            line += b': "'
            _appendText(line, value)
            line += b'"'
        else:
            # A field alone, as json.dumps writes it inside the object: '"name": value'.
            line += json.dumps({name: value})[1:-1].encode("utf-8")
    line += b"}\n"
    return line


def _appendText(line: LinePieces, text: str) -> None:
    """Append ``text`` as JSON string content (without quotes), as json.dumps escapes it.

    A piece at a time (a piece's escapes are the same inside the whole text: escaping is per
    character, and a surrogate pair is one character in a str); plain ASCII pieces through
    L{asciiJsonText}, which needs no decoding and no ``str`` of the escaped piece.
    """
    data = text.encode("ascii") if text.isascii() else None
    for start in range(0, len(text), _BOUND_PIECE):
        escaped = asciiJsonText(data[start : start + _BOUND_PIECE]) if data is not None else None
        if escaped is None:
            escaped = json.dumps(text[start : start + _BOUND_PIECE])[1:-1].encode("ascii")
        line += escaped


#: Characters json.dumps writes as ``\\b``, ``\\f`` or ``\\u00XX`` (DEL too, with
#: ``ensure_ascii``, the answers' encoding): bytes with any of them take the general path in
#: L{asciiJsonText}.
_UNUSUAL_CONTROLS = bytes(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)) + b"\x7f"
#: How json.dumps writes the other characters it escapes in ASCII text, backslash first.
_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))


def asciiJsonText(data: bytes) -> bytes | None:
    """``data``'s JSON string content (without quotes) exactly as ``json.dumps`` writes it,
    with or without ``ensure_ascii``, for printable ASCII text with tabs and line breaks;
    C{None} for any other bytes (the caller then decodes and escapes them as usual).

    A few C passes over the bytes and no decoding: a 256 KiB chunk of command output costs
    ~0.2 ms this way, ~1 ms through ``str`` and ``json.dumps``.
    """
    if not data.isascii() or len(data.translate(None, _UNUSUAL_CONTROLS)) != len(data):
        return None
    for raw, escaped in _ESCAPES:
        if raw in data:  # a fast scan; a replace that finds nothing costs far more
            data = data.replace(raw, escaped)
    return data


def boundEncodedText(text: str, limit: int) -> tuple[str, bool]:
    """The longest prefix of ``text`` whose JSON text (as L{encodeAnswer} writes it, without
    its quotes) is at most ``limit`` bytes, and whether anything was cut.

    A limit on output must hold for the answer as written: a replacement character is one
    character but six bytes (``\\ufffd``), so 16 MiB of invalid UTF-8 is a 96 MiB string in
    an answer. The text is encoded a piece at a time, never whole.
    """
    if len(text) * 12 <= limit:  # no character encodes to more than 12 bytes
        return text, False
    total = 0
    for start in range(0, len(text), _BOUND_PIECE):
        piece = text[start : start + _BOUND_PIECE]
        encoded = json.dumps(piece)[1:-1]
        if total + len(encoded) <= limit:
            total += len(encoded)
            continue
        kept = _cutEncoded(encoded, limit - total)
        return text[:start] + json.loads('"' + kept + '"'), True
    return text, False


class BoundedText:
    """Text gathered piece by piece (command output as it is decoded), bounded by the size of
    its JSON text in the answer: ``--max-output-bytes`` holds for the answer as written.

    ``feed`` each decoded piece; once the limit is reached the rest is dropped and
    ``truncated`` is set. With a ``reservation`` (``context.budget.reserve(0, "command
    output")``), what is kept is also drawn from the agent's memory budget, and a full budget
    truncates like the limit; call L{release} once the answer holds the text. Memory stays at
    about the limit whatever the output: 16 MiB of invalid UTF-8 keeps 2.8 M replacement
    characters (16 MiB of ``\\ufffd``), not 16 M.
    """

    def __init__(self, limit: int, reservation: Reservation | None = None) -> None:
        self.limit = limit
        self.size = 0
        self.truncated = False
        self._parts: list[str] = []
        self._reservation = reservation

    def feed(self, text: str) -> None:
        if self.truncated or not text:
            return
        if text.isascii():
            escaped = asciiJsonText(text.encode("ascii"))
            if escaped is not None and len(escaped) <= self.limit - self.size:
                self._keep(text, len(escaped), False)
                return
        kept, cut = boundEncodedText(text, self.limit - self.size)
        self._keep(kept, len(json.dumps(kept)) - 2, cut)

    def _keep(self, text: str, size: int, cut: bool) -> None:
        if self._reservation is not None:
            try:
                # What is kept is held from the agent's memory budget; when the budget is
                # full, the output is cut there as if the limit had been reached.
                self._reservation.grow(size)
            except ActionError:
                self.truncated = True
                return
        self._parts.append(text)
        self.size += size
        self.truncated = cut

    def release(self) -> None:
        """Give the kept text's share of the memory budget back (once the answer is built)."""
        if self._reservation is not None:
            self._reservation.release()

    def text(self) -> str:
        """The text kept so far (it stays kept: see L{take})."""
        joined = "".join(self._parts)
        self._parts = [joined]
        return joined

    def take(self) -> str:
        """The text kept, handed over: this object keeps nothing more of it, so that the
        text lives only as long as the answer that carries it."""
        joined = "".join(self._parts)
        self._parts = []
        return joined


def _cutEncoded(encoded: str, size: int) -> str:
    """``encoded[:size]``, shortened so that no escape (nor surrogate pair) is cut in two."""
    cut = encoded[:size]
    start = cut.rfind("\\", max(0, size - 6))
    while start >= 0:
        run = 0
        while start - run - 1 >= 0 and cut[start - run - 1] == "\\":
            run += 1
        if run % 2:
            start -= 1  # the second half of an escaped backslash: that escape is complete
            continue
        length = 6 if cut[start + 1 : start + 2] == "u" else 2
        if start + length > len(cut):
            cut = cut[:start]
        break
    # A high surrogate escape at the end has lost its pair.
    tail = cut[-6:]
    if len(tail) == 6 and tail[:3] == "\\ud" and tail[3] in "89ab":
        run = 0
        while len(cut) - 7 - run >= 0 and cut[len(cut) - 7 - run] == "\\":
            run += 1
        if run % 2 == 0:
            cut = cut[:-6]
    return cut


def logTransfer(event: str, action: object, sent: int, started: float, now: float) -> None:
    """One structured event of a transfer: bytes, duration and rate."""
    duration = max(now - started, 0.0)
    log.info(
        "{action} " + event + ": {bytes} bytes in {duration_s:.1f} s ({rate_mbps:.1f} MB/s)",
        action=action,
        outcome=event,
        bytes=sent,
        duration_s=duration,
        rate_mbps=sent / duration / 1e6 if duration > 0 else 0.0,
    )


class AnswerTimeout(Exception):
    """The client accepted no bytes of its answer for the answer timeout."""


@implementer(IPullProducer)
class AnswerSender:
    """Writes ``line`` and then (optionally) the rest of ``handle`` to ``transport``.

    A pull producer: the transport asks for the next chunk when it has sent the previous one.
    L{send} fires with the number of bytes written once the last chunk is handed to the
    transport, or fails (L{AnswerTimeout}, or the connection's end) when it cannot finish;
    either way the caller closes the connection and releases what the answer holds.
    """

    def __init__(
        self,
        transport: ITransport,
        clock: IReactorTime,
        timeout: float,
        line: Line,
        handle: IO[bytes] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.timeout = timeout
        self.sent = 0
        pieces = line.pieces if isinstance(line, LinePieces) else [line]
        #: What is left of the line, last piece first (sent from the end of the list).
        self._line: list[memoryview] = [memoryview(piece) for piece in reversed(pieces) if piece]
        self._handle = handle
        self._progress = progress
        self._done: Deferred[int] = Deferred()
        self._deadline: IDelayedCall | None = None
        self._ticker: LoopingCall | None = None

    def send(self) -> Deferred[int]:
        self._deadline = self.clock.callLater(self.timeout, self._expired)
        if self._progress is not None:
            progress = self._progress
            self._ticker = LoopingCall(lambda: progress(self.sent))
            self._ticker.clock = self.clock
            self._ticker.start(PROGRESS_INTERVAL, now=False)
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]
        return self._done

    def resumeProducing(self) -> None:
        if self._done.called:
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.timeout)
        chunk = self._next()
        if isinstance(chunk, bytes) and chunk:
            self.sent += len(chunk)
            self.transport.write(chunk)
            return
        self._finish()
        if isinstance(chunk, Exception):
            self._done.errback(chunk)
        else:
            self._done.callback(self.sent)

    def _next(self) -> bytes | OSError:
        if self._line:
            # Up to CHUNK bytes, gathered across pieces (a line's pieces can be tiny) and
            # copied once.
            views: list[memoryview] = []
            room = CHUNK
            while self._line and room:
                piece = self._line.pop()
                if len(piece) > room:
                    self._line.append(piece[room:])
                    piece = piece[:room]
                views.append(piece)
                room -= len(piece)
            return b"".join(views)
        if self._handle is not None:
            try:
                return self._handle.read(CHUNK)
            except OSError as error:
                return error
        return b""

    def stopProducing(self) -> None:
        """The connection ended before the answer was out."""
        if not self._done.called:
            self._finish()
            self._done.errback(ConnectionError("the client went away"))

    def _expired(self) -> None:
        self._deadline = None
        log.info(
            "answer dropped: the client accepted no bytes for {timeout} s",
            timeout=self.timeout,
            outcome="answer-timeout",
            bytes=self.sent,
        )
        self._finish()
        self._done.errback(AnswerTimeout())
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _finish(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        self._line = []
        self.transport.unregisterProducer()  # type: ignore[attr-defined]

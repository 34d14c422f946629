"""Streaming redaction of secret values in text that arrives in pieces.

A shell's output reaches the agent in arbitrary chunks, and a host may read it between any two
of them. L{StreamRedactor} turns that stream into a redacted stream that only ever grows: each
piece of text it hands out is final. Text that could still turn out to be the start of a secret
is held back until more text (or the end of the stream) decides it, so no read ever shows a
prefix of a secret, and character offsets into the redacted stream never shift.

Matching is leftmost-longest and non-overlapping: the same result as replacing, in one pass
over the whole text, the longest secret that starts at the earliest position. For every way of
cutting a text into pieces, ``"".join(feed(piece) for piece in pieces) + finish()`` equals
L{redactText} of the whole text.

The cost is linear in the text: one regular-expression search per secret occurrence, plus a look
at the last ``len(longest secret) - 1`` characters of each piece for a possible secret start.
This module is pure (no Twisted, no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"
"""What replaces each occurrence of a secret (as the reference agent writes it)."""


def _secretsPattern(secrets: list[str]) -> re.Pattern[str] | None:
    # Alternatives are tried in order at each position: longest first makes the match at the
    # leftmost position the longest one there.
    if not secrets:
        return None
    return re.compile("|".join(re.escape(secret) for secret in secrets))


def _normalize(secrets: Iterable[str]) -> list[str]:
    return sorted({secret for secret in secrets if secret}, key=len, reverse=True)


def redactText(text: str, secrets: Iterable[str], mask: str = MASK) -> str:
    """Redact a whole, finished text at once (what the streaming redactor converges to)."""
    pattern = _secretsPattern(_normalize(secrets))
    return text if pattern is None else pattern.sub(lambda _match: mask, text)


class StreamRedactor:
    """Redacts secrets in a stream of text pieces, handing out only decided text.

    @param secrets: the values to hide; empty strings and duplicates are ignored.
    @param mask: the replacement of each occurrence.
    """

    def __init__(self, secrets: Iterable[str], mask: str = MASK) -> None:
        self._secrets = _normalize(secrets)
        self._pattern = _secretsPattern(self._secrets)
        self._mask = mask
        self._longest = len(self._secrets[0]) if self._secrets else 0
        self._byFirst: dict[str, list[str]] = {}
        for secret in self._secrets:
            if len(secret) > 1:
                self._byFirst.setdefault(secret[0], []).append(secret)
        self._pending = ""

    @property
    def held(self) -> int:
        """How many characters are held back, waiting for more text to decide them."""
        return len(self._pending)

    def feed(self, text: str) -> str:
        """Take the next piece of the stream; return the text it decided (possibly ``""``)."""
        if self._pattern is None:
            return text
        buffer = self._pending + text if self._pending else text
        pieces: list[str] = []
        position = 0
        hold = self._holdFrom(buffer, 0)
        while True:
            match = self._pattern.search(buffer, position)
            if match is None or match.start() >= hold:
                break
            pieces.append(buffer[position : match.start()])
            pieces.append(self._mask)
            position = match.end()
            if position > hold:
                # The match swallowed a possible secret start: look again after it.
                hold = self._holdFrom(buffer, position)
        pieces.append(buffer[position:hold])
        self._pending = buffer[hold:]
        return "".join(pieces)

    def finish(self) -> str:
        """The stream has ended: decide and return whatever was held back."""
        rest, self._pending = self._pending, ""
        if self._pattern is None or not rest:
            return rest
        return self._pattern.sub(lambda _match: self._mask, rest)

    def _holdFrom(self, buffer: str, start: int) -> int:
        """The first position >= ``start`` whose rest of ``buffer`` could still grow into a
        secret longer than that rest (``len(buffer)`` if there is none).

        Only the last ``longest - 1`` positions can be such a start: from any earlier one the
        rest is already as long as the longest secret.
        """
        size = len(buffer)
        byFirst = self._byFirst
        for index in range(max(start, size - self._longest + 1), size):
            candidates = byFirst.get(buffer[index])
            if candidates is None:
                continue
            rest = size - index
            for secret in candidates:
                if len(secret) > rest and secret.startswith(buffer[index:]):
                    return index
        return size


__all__ = ["MASK", "StreamRedactor", "redactText"]

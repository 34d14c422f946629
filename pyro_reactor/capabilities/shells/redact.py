"""Streaming redaction of secret values in text that arrives in pieces.

A shell's output reaches the agent in arbitrary chunks, and a host may read it between any two
of them. L{StreamRedactor} turns that stream into a redacted stream that only ever grows: each
piece of text it hands out is final. Text that could still turn out to be the start of a secret
is held back until more text (or the end of the stream) decides it, so no read ever shows a
prefix of a secret, and character offsets into the redacted stream never shift.

Line breaks inside a secret match any line break of the output: a terminal's ONLCR turns the
``\\n`` of a PEM key into ``\\r\\n`` (and a ``\\r\\n`` into ``\\r\\r\\n``), so each break of a
secret (``\\r\\n``, ``\\n`` or ``\\r``) matches ``\\r{0,2}\\n`` or a bare ``\\r`` in the text.

Matching takes, at the earliest position, the first secret (longest possible match first)
that matches there, and continues after the match. For every way of cutting a text into
pieces, ``"".join(feed(piece) for piece in pieces) + finish()`` equals L{redactText} of the
whole text: a match is only taken once no more text could change it.

The cost is linear in the text: one regular-expression search per secret occurrence, plus a look
at the last ``longest possible match - 1`` characters of each piece for a possible secret start.
This module is pure (no Twisted, no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"
"""What replaces each occurrence of a secret (as the reference agent writes it)."""

_BREAK = None
"""The atom standing for a line break in a parsed secret."""
_BREAK_PATTERN = r"(?:\r{0,2}\n|\r)"
_BREAK_MAX = 3
_BREAK_FIRST = ("\r", "\n")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

_Atoms = tuple[str | None, ...]


def _atoms(secret: str) -> _Atoms:
    """A secret as characters and line breaks (L{_BREAK})."""
    atoms: list[str | None] = []
    for index, line in enumerate(_LINE_BREAK.split(secret)):
        if index:
            atoms.append(_BREAK)
        atoms.extend(line)
    return tuple(atoms)


def _maxLength(atoms: _Atoms) -> int:
    return sum(_BREAK_MAX if atom is _BREAK else 1 for atom in atoms)


def _regex(atoms: _Atoms) -> str:
    return "".join(_BREAK_PATTERN if atom is _BREAK else re.escape(atom) for atom in atoms)


def _couldGrow(atoms: _Atoms, text: str) -> bool:
    """Whether ``text`` is a proper prefix of some text the secret ``atoms`` matches.

    A small NFA: a state is (atom index, ``\\r`` already taken inside the current break).
    """
    states = {(0, 0)}
    end = len(atoms)
    for char in text:
        following: set[tuple[int, int]] = set()
        for index, taken in states:
            if index == end:
                continue
            atom = atoms[index]
            if atom is _BREAK:
                if char == "\n":
                    following.add((index + 1, 0))
                elif char == "\r":
                    if taken == 0:
                        following.add((index + 1, 0))  # a bare \r
                    if taken < 2:
                        following.add((index, taken + 1))  # or the start of \r\n, \r\r\n
            elif char == atom:
                following.add((index + 1, 0))
        if not following:
            return False
        states = following
    return any(index < end for index, _taken in states)


def _normalize(secrets: Iterable[str]) -> list[_Atoms]:
    unique = {_atoms(secret) for secret in secrets if secret}
    # Alternatives are tried in order at each position: longest first.
    return sorted(unique, key=lambda atoms: (-_maxLength(atoms), _regex(atoms)))


def _secretsPattern(secrets: list[_Atoms]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    return re.compile("|".join(_regex(atoms) for atoms in secrets))


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
        self._longest = _maxLength(self._secrets[0]) if self._secrets else 0
        # Per possible first character: the secrets starting with it, as plain text when they
        # hold no line break (a prefix test is then a string comparison), else as atoms.
        self._byFirst: dict[str, list[str | _Atoms]] = {}
        for atoms in self._secrets:
            if _maxLength(atoms) > 1:
                first = atoms[0]
                plain = None if _BREAK in atoms else "".join(atoms)  # type: ignore[arg-type]
                for char in _BREAK_FIRST if first is _BREAK else (first,):
                    self._byFirst.setdefault(char, []).append(atoms if plain is None else plain)
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
        match of a secret (``len(buffer)`` if there is none).

        Only the last ``longest - 1`` positions can be such a start: from any earlier one the
        rest is already as long as the longest possible match.
        """
        size = len(buffer)
        byFirst = self._byFirst
        for index in range(max(start, size - self._longest + 1), size):
            candidates = byFirst.get(buffer[index])
            if candidates is None:
                continue
            rest = buffer[index:]
            for secret in candidates:
                if isinstance(secret, str):
                    if len(secret) > len(rest) and secret.startswith(rest):
                        return index
                elif _couldGrow(secret, rest):
                    return index
        return size


__all__ = ["MASK", "StreamRedactor", "redactText"]

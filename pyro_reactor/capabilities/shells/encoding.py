"""The size of shell output in a JSON answer, and cutting text to fit a size.

Answers are ``json.dumps`` text (ASCII only): a control character takes 2 or 6 bytes, any
other non-ASCII character 6, one beyond the BMP 12. So 8 Mi emoji are a 100 MB answer while
8 Mi ASCII characters are 8 MB: a ``read_shell`` answer is bounded by its encoded size.
"""

from __future__ import annotations

import json.encoder
from collections.abc import Callable
from dataclasses import dataclass

_encode: Callable[[str], str] = json.encoder.encode_basestring_ascii
_STEP = 64 * 1024


def encodedSize(text: str) -> int:
    """Bytes ``text`` takes inside a JSON answer's string (quotes left out)."""
    return len(_encode(text)) - 2


@dataclass(frozen=True)
class Fitted:
    """The longest prefix of a text whose encoded size is at most a limit, and that size."""

    text: str
    size: int


def fitEncoded(text: str, limit: int) -> Fitted:
    """The longest prefix of ``text`` whose JSON-encoded size is at most ``limit``."""
    whole = encodedSize(text)
    if whole <= limit:
        return Fitted(text, whole)
    used = 0
    position = 0
    while position < len(text):
        step = text[position : position + _STEP]
        size = encodedSize(step)
        if used + size > limit:
            # The cut is inside this step: find it by bisection on the step's prefixes.
            low, high = 0, len(step)
            while low < high:
                middle = (low + high + 1) // 2
                if used + encodedSize(step[:middle]) <= limit:
                    low = middle
                else:
                    high = middle - 1
            kept = step[:low]
            return Fitted(text[:position] + kept, used + encodedSize(kept))
        used += size
        position += len(step)
    return Fitted(text, used)


__all__ = ["Fitted", "encodedSize", "fitEncoded"]

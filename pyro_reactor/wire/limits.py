"""The limits of the wire's framing: ``WireLimits``, those that each have an option
(``--answer-timeout``, ``--min-upload-rate``, ``--max-connections``, beside the request line's
own size and timeout), and the fixed sizes below."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EARLY_BYTES_LIMIT",
    "LARGE_LINE_BYTES",
    "LINE_HOLD_STEP",
    "OVERFLOW_LINE_BYTES",
    "WireLimits",
]

EARLY_BYTES_LIMIT = 1024 * 1024
"""Bytes a client may send after its request line while the answer is being prepared.

They are kept for an answer that takes the connection over (L{HandOff}: a TCP relay must not
lose what the host sent before ``connected``); past this the connection stops being read until
the answer is ready. Other answers drop them, as the reference ignores them."""

LARGE_LINE_BYTES = 64 * 1024
"""Request lines longer than this draw their parse's cost from the memory budget first."""

LINE_HOLD_STEP = 1024 * 1024
"""A request line in flight draws from the budget in steps of this many bytes."""

OVERFLOW_LINE_BYTES = 4096
"""The longest line a connection beyond the cap may send (a ping is 20 bytes)."""


@dataclass(frozen=True)
class WireLimits:
    """The limits of the wire beyond the line's size and timeout (one per option)."""

    answerTimeout: float = 60.0
    minUploadRate: int = 64 * 1024
    maxConnections: int = 256
    overflowTimeout: float = 1.0

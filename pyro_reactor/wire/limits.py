"""The limits of the wire that each have an option (``--answer-timeout``, ``--min-upload-rate``,
``--max-connections``), beside the request line's own size and timeout."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WireLimits"]


@dataclass(frozen=True)
class WireLimits:
    """The limits of the wire beyond the line's size and timeout (one per option)."""

    answerTimeout: float = 60.0
    minUploadRate: int = 64 * 1024
    maxConnections: int = 256
    overflowTimeout: float = 1.0

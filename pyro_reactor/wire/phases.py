"""The phases of a request's connection, shared by its framing and its answer side."""

from __future__ import annotations

_READING_LINE, _READING_BODY, _WORKING, _ANSWERING, _HANDED_OFF, _DONE, _PARSING = range(7)

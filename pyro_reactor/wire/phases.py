"""The phases of a request's connection, shared by its framing and its answer side."""

from __future__ import annotations

from enum import Enum

__all__ = ["Phase"]


class Phase(Enum):
    """Where a request's connection is: what arriving bytes mean, what an end of input does."""

    #: Reading the request line.
    READING_LINE = 0
    #: Reading an upload's body into its spool.
    READING_BODY = 1
    #: The request is with its handler (or its upload is being finished); bytes are kept.
    WORKING = 2
    #: The answer is being encoded or written.
    ANSWERING = 3
    #: The connection belongs to the protocol of a streaming action.
    HANDED_OFF = 4
    #: Answered or closed; nothing more happens.
    DONE = 5
    #: A big request line waits for its turn to be parsed; bytes are kept.
    PARSING = 6

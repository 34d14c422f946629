"""Small descriptor helpers every blocking file path of the agent shares.

L{DIRECTORY_FLAGS} opens a directory without following a final symlink, L{writeAll} writes a
whole buffer to a descriptor, L{closeQuietly} closes one on an error path.
"""

from __future__ import annotations

import os

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
"""Open a directory, never through a symlink at the last component."""


def writeAll(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def closeQuietly(fd: int) -> None:
    """Close ``fd``, ignoring an error (for cleanup paths that already report another)."""
    try:
        os.close(fd)
    except OSError:
        pass


__all__ = ["DIRECTORY_FLAGS", "closeQuietly", "writeAll"]

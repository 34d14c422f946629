"""How an archive member's name is read, on both sides of the protocol.

The guest agent (checking an upload) and the host client (checking an archive before it
extracts it locally) split a member's name the same way: surrounding blanks stripped, empty
and ``.`` components dropped, an absolute name or a ``..`` component refused. Each side words
its own errors. Pure: no I/O, no Twisted, importable by the client package.
"""

from __future__ import annotations

from pathlib import PurePosixPath


class UnsafeMemberName(ValueError):
    """A member name that is absolute (``absolute``) or climbs with ``..`` (not ``absolute``)."""

    def __init__(self, name: str, *, absolute: bool) -> None:
        super().__init__(name)
        self.name = name
        self.absolute = absolute


def memberParts(name: str) -> tuple[str, ...]:
    """The components of the member name ``name``; ``()`` for ``.``, ``./`` or a blank name.

    @raise UnsafeMemberName: the name is absolute or has a ``..`` component.
    """
    pure = PurePosixPath(name.strip())
    if pure.is_absolute():
        raise UnsafeMemberName(name, absolute=True)
    parts = tuple(part for part in pure.parts if part not in ("", "."))
    if ".." in parts:
        raise UnsafeMemberName(name, absolute=False)
    return parts


__all__ = ["UnsafeMemberName", "memberParts"]

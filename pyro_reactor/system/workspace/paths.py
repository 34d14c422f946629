"""Guest paths: what a request's ``/workspace/...`` names, and the errors about it.

A request's path becomes a L{GuestPath} (L{resolveGuestPath}) without any I/O: the reference's
normalisation, except that ``..`` is refused outright. Every error names the guest path, never
the host directory that backs the workspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pyro_reactor.errors import ActionError

WORKSPACE_ROOT = PurePosixPath("/workspace")
"""The guest path every request uses for the workspace, whatever directory backs it."""

TEMP_PREFIX = ".pyro-workspace-write-"
"""Name prefix of the temporary file an atomic replace writes before renaming it."""


class WorkspaceError(ActionError):
    """A guest path could not be used; the message names the guest path."""


class MissingPath(WorkspaceError):
    """The path (or one of its parents) does not exist."""

    def __init__(self, text: str) -> None:
        super().__init__(f"workspace path does not exist: {text}")


class SymlinkInPath(WorkspaceError):
    """A component of the path is a symlink, which the agent never follows."""

    def __init__(self, text: str, *, final: bool) -> None:
        if final:
            super().__init__(f"workspace path is a symlink: {text}")
        else:
            super().__init__(f"workspace path would traverse through a symlinked parent: {text}")


class NotADirectoryInPath(WorkspaceError):
    """A component that must be a directory is something else."""

    def __init__(self, text: str, *, final: bool) -> None:
        if final:
            super().__init__(f"workspace path is not a directory: {text}")
        else:
            super().__init__(
                f"workspace path would traverse through a non-directory parent: {text}"
            )


class EscapingSymlink(WorkspaceError):
    """Following a symlink would leave the workspace (or loops)."""

    def __init__(self, text: str, *, loop: bool = False) -> None:
        if loop:
            super().__init__(f"workspace path has too many levels of symlinks: {text}")
        else:
            super().__init__(f"workspace path would leave the workspace through a symlink: {text}")


class NotARegularFile(WorkspaceError):
    """An atomic replace found something other than a regular file at its target.

    The reference's messages: a directory or symlink is "not a regular file target", anything
    else (FIFO, socket, device) an "unsupported workspace path type".
    """

    def __init__(self, text: str, *, unsupported: bool = False) -> None:
        if unsupported:
            super().__init__(f"unsupported workspace path type: {text}")
        else:
            super().__init__("workspace file write only supports regular file targets")
        self.text = text


def displayText(parts: tuple[str, ...]) -> str:
    return str(WORKSPACE_ROOT.joinpath(*parts))


def osError(text: str, error: OSError) -> WorkspaceError:
    """An unexpected OS error as a message naming the guest path (not the host path)."""
    reason = error.strerror or str(error)
    return WorkspaceError(f"cannot access workspace path {text}: {reason}")


@dataclass(frozen=True)
class GuestPath:
    """A normalised guest path inside the workspace.

    ``text`` is what answers show (``/workspace/a/b``); ``parts`` the components below the
    workspace root (``()`` for the root itself); ``hostPath`` where it lives on this machine,
    for display only: never open it by name, nor start a child in it (see
    L{WorkingDirectory}).
    """

    text: str
    parts: tuple[str, ...]
    hostPath: Path

    @property
    def isRoot(self) -> bool:
        return self.parts == ()

    @property
    def name(self) -> str:
        """The last component (``""`` for the workspace root)."""
        return self.parts[-1] if self.parts else ""

    def child(self, name: str) -> GuestPath:
        """The guest path of an entry named ``name`` in this directory."""
        checkComponent(name)
        return GuestPath(
            text=f"{self.text}/{name}", parts=(*self.parts, name), hostPath=self.hostPath / name
        )


def checkComponent(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise WorkspaceError(f"invalid workspace path component: {name!r}")


def resolveGuestPath(root: Path, guestPath: str) -> GuestPath:
    """Normalise a request's path as the reference does, refusing ``..``.

    A relative path is taken under ``/workspace``; empty and ``.`` components are dropped.
    """
    candidate = guestPath.strip()
    if candidate == "":
        raise ActionError("destination must not be empty")
    if "\x00" in candidate:
        raise ActionError("destination must not contain NUL bytes")
    pure = PurePosixPath(candidate)
    if not pure.is_absolute():
        pure = WORKSPACE_ROOT / pure
    # PurePosixPath keeps a leading "//" as its own anchor, which the reference (and we)
    # then refuse as outside /workspace.
    anchor, *rest = pure.parts
    parts = [part for part in rest if part not in ("", ".")]
    if ".." in parts:
        raise ActionError("destination must stay inside /workspace: '..' is not allowed")
    if anchor != "/" or not parts or parts[0] != WORKSPACE_ROOT.name:
        raise ActionError("destination must stay inside /workspace")
    inside = tuple(parts[1:])
    return GuestPath(text=displayText(inside), parts=inside, hostPath=root.joinpath(*inside))


__all__ = [
    "TEMP_PREFIX",
    "WORKSPACE_ROOT",
    "EscapingSymlink",
    "GuestPath",
    "MissingPath",
    "NotADirectoryInPath",
    "NotARegularFile",
    "SymlinkInPath",
    "WorkspaceError",
    "checkComponent",
    "displayText",
    "osError",
    "resolveGuestPath",
]

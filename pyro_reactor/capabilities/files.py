"""The list_workspace, read_workspace_file, write_workspace_file and delete_workspace_path actions.

Same requests, answers and error messages as the reference agent, with every path reached
through L{pyro_reactor.system.workspace.Workspace} (kernel-confined, no symlink followed, ``..``
refused) and every filesystem call made in the agent's thread pool, so a big listing or file
never delays another client.

Besides the reference's defects (``..`` escapes, whole-file reads before the size check, files
left 0600 by a write), deliberate differences: list, read and delete follow a symlinked parent
only while it resolves inside the workspace (the reference follows it anywhere); and a path
through a regular file is reported as not existing rather than with a raw ``ENOTDIR``.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from contextlib import closing
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import (
    GuestPath,
    MissingPath,
    Workspace,
    WorkspaceError,
    processUmask,
    walkTree,
)
from pyro_reactor.wire.dispatch import Action, EncodedAnswer
from pyro_reactor.wire.request import Request

WORKSPACE_FILE_MAX_BYTES = 1024 * 1024
"""The largest file read_workspace_file returns and write_workspace_file accepts."""

_READ_CHUNK = 256 * 1024


def _entry(text: str, info: os.stat_result, linkTarget: str | None) -> dict[str, Any]:
    """One listing entry, shaped as the reference's."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return {
            "path": text,
            "artifact_type": "symlink",
            "size_bytes": info.st_size,
            "link_target": linkTarget,
        }
    if stat.S_ISDIR(mode):
        return {"path": text, "artifact_type": "directory", "size_bytes": 0, "link_target": None}
    if stat.S_ISREG(mode):
        return {
            "path": text,
            "artifact_type": "file",
            "size_bytes": info.st_size,
            "link_target": None,
        }
    raise ActionError(f"unsupported workspace path type: {text}")


class WorkspaceFiles:
    """The blocking work behind the four actions; run each method in a worker thread."""

    def __init__(self, workspace: Workspace, maxEntries: int = 100_000) -> None:
        self.workspace = workspace
        self.maxEntries = maxEntries

    def _describe(self, path: GuestPath) -> tuple[dict[str, Any], int | None]:
        """The entry of ``path`` and, if it is a directory, an open descriptor of it."""
        workspace = self.workspace
        if path.isRoot:
            fd = workspace.openRoot()
            try:
                return _entry(path.text, os.fstat(fd), None), fd
            except BaseException:
                os.close(fd)
                raise
        with workspace.openedParent(path, followInside=True) as (parent, name):
            info = workspace.lstatAt(parent, name, path.text)
            try:
                target = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(info.st_mode) else None
            except OSError:
                # No longer a symlink since the lstat (a guest program swapping it).
                raise WorkspaceError(
                    f"workspace path changed while it was listed: {path.text}"
                ) from None
            entry = _entry(path.text, info, target)
            if entry["artifact_type"] != "directory":
                return entry, None
            child = workspace.openChildDirectory(parent, name)
            if child is None:
                # No longer a directory since the lstat.
                raise MissingPath(path.text)
            return entry, child

    def listWorkspace(self, guestPath: str, *, recursive: bool) -> dict[str, Any]:
        """``list_workspace``: the entry itself, or a directory's children (depth first)."""
        path = self.workspace.resolve(guestPath)
        entry, fd = self._describe(path)
        if fd is None:
            return {"path": path.text, "artifact_type": entry["artifact_type"], "entries": [entry]}
        entries: list[dict[str, Any]] = []
        try:
            with closing(walkTree(fd, path.text, recursive=recursive)) as walker:
                for found in walker:
                    if len(entries) >= self.maxEntries:
                        raise ActionError(
                            f"{path.text} has more than {self.maxEntries} entries to list"
                            " (the agent's --max-list-entries): list a subdirectory, or not"
                            " recursively"
                        )
                    child = found.child
                    entries.append(_entry(found.path, child.stat, child.linkTarget))
        finally:
            os.close(fd)
        return {"path": path.text, "artifact_type": "directory", "entries": entries}

    def readFile(self, guestPath: str, *, maxBytes: int) -> dict[str, Any]:
        """``read_workspace_file``: a regular file of at most ``maxBytes``, base64-encoded.

        The size is checked on the open descriptor before anything is read.
        """
        if maxBytes <= 0:
            raise ActionError("max_bytes must be positive")
        if maxBytes > WORKSPACE_FILE_MAX_BYTES:
            raise ActionError(f"max_bytes must be at most {WORKSPACE_FILE_MAX_BYTES} bytes")
        path = self.workspace.resolve(guestPath)
        notRegular = ActionError("workspace file read only supports regular files")
        if path.isRoot:
            raise notRegular
        with self.workspace.openedParent(path, followInside=True) as (parent, name):
            info = self.workspace.lstatAt(parent, name, path.text)
            # The reference's answers: unknown types first, then anything not a file.
            _entry(path.text, info, None)
            if not stat.S_ISREG(info.st_mode):
                raise notRegular
            try:
                # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the open.
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                    dir_fd=parent,
                )
            except FileNotFoundError:
                raise MissingPath(path.text) from None
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise notRegular from None
                raise ActionError(f"cannot read {path.text}: {error.strerror}") from None
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise notRegular
            tooLarge = ActionError(
                f"workspace file exceeds the maximum supported size of {maxBytes} bytes"
            )
            if opened.st_size > maxBytes:
                raise tooLarge
            content = bytearray()
            # Read one byte past the limit to notice a file that grew since the fstat.
            while len(content) <= maxBytes:
                chunk = os.read(fd, min(_READ_CHUNK, maxBytes + 1 - len(content)))
                if not chunk:
                    break
                content += chunk
            if len(content) > maxBytes:
                raise tooLarge
        finally:
            os.close(fd)
        return {
            "path": path.text,
            "size_bytes": len(content),
            "content_b64": base64.b64encode(content).decode("ascii"),
        }

    def writeFile(self, guestPath: str, *, text: str) -> dict[str, Any]:
        """``write_workspace_file``: atomically replace (or create) a regular file with ``text``.

        Missing parent directories are created; a new file is 0666 less the umask, an
        existing one keeps its mode.
        """
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ActionError(str(error)) from None
        if len(raw) > WORKSPACE_FILE_MAX_BYTES:
            raise ActionError(
                f"text must be at most {WORKSPACE_FILE_MAX_BYTES} bytes when encoded as UTF-8"
            )
        path = self.workspace.resolve(guestPath)
        self.workspace.replaceFile(path, raw)
        return {"path": path.text, "size_bytes": len(raw), "bytes_written": len(raw)}

    def deletePath(self, guestPath: str) -> dict[str, Any]:
        """``delete_workspace_path``: remove a file or a symlink (never its target)."""
        path = self.workspace.resolve(guestPath)
        isDirectory = ActionError("workspace file delete does not support directories")
        if path.isRoot:
            raise isDirectory
        with self.workspace.openedParent(path, followInside=True) as (parent, name):
            info = self.workspace.lstatAt(parent, name, path.text)
            if _entry(path.text, info, None)["artifact_type"] == "directory":
                raise isDirectory
            try:
                os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                raise MissingPath(path.text) from None
            except IsADirectoryError:
                raise isDirectory from None
            except OSError as error:
                raise ActionError(f"cannot delete {path.text}: {error.strerror}") from None
        return {"path": path.text, "deleted": True}


class FilesCapability:
    """The four workspace file actions, working on the context's workspace."""

    features: tuple[str, ...] = ()
    service = None

    def __init__(self, context: AgentContext) -> None:
        processUmask()  # read once now, before worker threads start creating files
        self._inThread = context.inThread
        self._answerInThread = context.answerInThread
        self._files = WorkspaceFiles(context.workspace, context.config.maxListEntries)
        self.actions = [
            Action("list_workspace", self._listWorkspace),
            Action("read_workspace_file", self._readWorkspaceFile),
            Action("write_workspace_file", self._writeWorkspaceFile),
            Action("delete_workspace_path", self._deleteWorkspacePath),
        ]

    def _listWorkspace(self, request: Request) -> Deferred[dict[str, Any]]:
        path = request.string("path", "/workspace")
        recursive = request.boolean("recursive", False)
        return self._inThread(self._files.listWorkspace, path, recursive=recursive)

    def _readWorkspaceFile(self, request: Request) -> Deferred[EncodedAnswer]:
        path = request.string("path", "/workspace")
        maxBytes = request.integer("max_bytes", WORKSPACE_FILE_MAX_BYTES)
        return self._answerInThread(self._files.readFile, path, maxBytes=maxBytes)

    def _writeWorkspaceFile(self, request: Request) -> Deferred[dict[str, Any]]:
        path = request.string("path", "/workspace")
        text = request.string("text", "", codecMessage=True)
        return self._inThread(self._files.writeFile, path, text=text)

    def _deleteWorkspacePath(self, request: Request) -> Deferred[dict[str, Any]]:
        path = request.string("path", "/workspace")
        return self._inThread(self._files.deletePath, path)

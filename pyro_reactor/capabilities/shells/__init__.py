"""Interactive PTY shells: one automat machine per shell, its output stream, the actions.

See docs/shells.md for the design and docs/actions/shells.md for the wire reference.

- L{terminal}: the PTY terminal (L{PTYTerminal}), its input queue, the process protocol;
- L{scope}: what a shell started, found so that closing it ends all of it;
- L{output} (with L{log}, L{encoding} and L{redact}): the output stream, each concern its own
  object — decoding, redaction, the capped log, the memory window, waiting readers;
- L{_machine}: the L{ShellMachine} alone; L{records}: the on-disk summary;
- L{registry}: L{Shells}, the registry (a child service of the agent);
- L{actions}: the request handlers and L{ShellsCapability}.

Differences from the reference, on purpose: the log holds the redacted stream (the reference
writes the raw output, secrets included, to disk), and is started afresh when a shell id is
reused (the reference appends, so its log no longer matches the cursors); INT goes to the
terminal's foreground process group, TERM and KILL to it and to the shell's group, so that
Ctrl-C stops the job an interactive bash is running; ``close_shell`` does not hold up other
requests while the shell takes its time to exit, and ends what the shell started.
"""

from __future__ import annotations

from pyro_reactor.capabilities.shells._machine import (
    CLOSE_TIMEOUT_SECONDS,
    EXIT_GRACE_SECONDS,
    KILL_TIMEOUT_SECONDS,
    ShellCore,
    ShellInput,
    ShellMachine,
    makeShellMachine,
)
from pyro_reactor.capabilities.shells.actions import ShellActions, ShellsCapability
from pyro_reactor.capabilities.shells.output import ShellOutput
from pyro_reactor.capabilities.shells.records import ShellRecord
from pyro_reactor.capabilities.shells.registry import Shells, ShellSession
from pyro_reactor.capabilities.shells.scope import sessionMembers
from pyro_reactor.capabilities.shells.terminal import (
    SIGNALS,
    PTYTerminal,
    Terminal,
    shellArgv,
    shellEnvironment,
)

__all__ = [
    "CLOSE_TIMEOUT_SECONDS",
    "EXIT_GRACE_SECONDS",
    "KILL_TIMEOUT_SECONDS",
    "SIGNALS",
    "PTYTerminal",
    "ShellActions",
    "ShellCore",
    "ShellInput",
    "ShellMachine",
    "ShellOutput",
    "ShellRecord",
    "ShellSession",
    "Shells",
    "ShellsCapability",
    "Terminal",
    "makeShellMachine",
    "sessionMembers",
    "shellArgv",
    "shellEnvironment",
]

"""The ``exec`` action, and L{runCommand}, the one way the agent runs a shell command to its end.

The package, by concern:

  - L{result}: L{CommandResult} (what a command did, and the ``exec`` answer) and the capture
    of its output, decoded and bounded;
  - L{environment}: what every command starts with (the shell, the agent's environment with
    the request's overrides, ``/dev/null`` as stdin);
  - L{command}: L{runCommand} and the command's process protocol (timeout, pipe grace, its
    cgroup);
  - L{units}: what ends a timed-out command (L{Unit}), and L{RunningCommands}, the exec
    commands the agent ends when it stops (SIGTERM, SIGKILL after ``KILL_GRACE``);
  - L{capability}: L{ExecCapability}, the ``exec`` action.
"""

from pyro_reactor.capabilities.execute.capability import ExecCapability
from pyro_reactor.capabilities.execute.command import PIPE_GRACE, runCommand
from pyro_reactor.capabilities.execute.environment import (
    SHELL,
    _spawnEnvironment,
    commandEnvironment,
)
from pyro_reactor.capabilities.execute.result import (
    DEFAULT_TIMEOUT_SECONDS,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    _Capture,
)
from pyro_reactor.capabilities.execute.units import KILL_GRACE, RunningCommands, Unit
from pyro_reactor.system.processes import exitCodeOf

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "KILL_GRACE",
    "PIPE_GRACE",
    "SHELL",
    "TIMEOUT_EXIT_CODE",
    "CommandResult",
    "ExecCapability",
    "RunningCommands",
    "Unit",
    "_Capture",
    "_spawnEnvironment",
    "commandEnvironment",
    "exitCodeOf",
    "runCommand",
]

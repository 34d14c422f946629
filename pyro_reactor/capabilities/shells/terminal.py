"""The shell's terminal: a PTY we open and size, the shell process on it, its input queue.

L{Terminal} is what the shell machine does to its terminal (a fake one in tests);
L{PTYTerminal} is the real one: ``reactor.spawnProcess(..., usePTY=(master, slave, name))``
on a pair opened and sized before the child starts, so the shell is born with its window size.
L{ShellProcess} feeds the process's events to the shell machine.

Input is queued here, not in the transport: the transport holds at most its buffer's worth
(it pauses us as a producer beyond that), and L{InputQueue} counts the rest, so a host writing
into a shell that does not read is refused past L{MAX_QUEUED_INPUT} rather than growing the
agent without bound.

Ending the shell never reaches into the transport: a hang-up is SIGHUP plus
``loseConnection()``; once the session is killed, writing the rest of the input fails (the
terminal has no reader left) and the reactor itself closes the master, then reaps the shell,
which is when ``processEnded`` says all output is in.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import termios
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IConsumer, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from pyro_reactor.capabilities.inputqueue import InputQueue
from pyro_reactor.capabilities.shells.scope import (
    UNIT_VARIABLE,
    CgroupScope,
    ProcessScope,
    TreeScope,
)
from pyro_reactor.system.processes import exitCodeOf, signalGroup
from pyro_reactor.system.unitcgroups import unitCgroups
from pyro_reactor.system.workspace import WorkingDirectory
from pyro_reactor.wire.budget import Reservation

if TYPE_CHECKING:
    from pyro_reactor.capabilities.shells._machine import ShellInput

SIGNALS: dict[str, signal.Signals] = {
    "HUP": signal.SIGHUP,
    "INT": signal.SIGINT,
    "TERM": signal.SIGTERM,
    "KILL": signal.SIGKILL,
}
"""The signals ``signal_shell`` accepts, in the reference's order."""

MAX_QUEUED_INPUT = 4 * 1024 * 1024
"""Bytes of input a shell may have waiting to be read (beyond the terminal's own buffer)."""


def shellArgv() -> list[str]:
    """The reference's interactive shell: bash without profile or rc files, else ``/bin/sh``."""
    program = shutil.which("bash") or "/bin/sh"
    argv = [program]
    if program.endswith("bash"):
        argv += ["--noprofile", "--norc"]
    return [*argv, "-i"]


def shellEnvironment(
    overrides: Mapping[str, str] | None,
    base: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, str]:
    """The agent's environment, a terminal type, a plain prompt, the request's overrides, and
    the unit marker (``token``) last, so that overrides cannot remove it."""
    env = dict(os.environ if base is None else base)
    env["TERM"] = env.get("TERM", "xterm-256color")
    env["PS1"] = "pyro$ "
    env["PROMPT_COMMAND"] = ""
    if overrides:
        env.update(overrides)
    if token is not None:
        env[UNIT_VARIABLE] = token
    return env


def setWindowSize(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (on the master, the foreground group also gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal(Protocol):
    """What the shell machine does to its terminal and process (a fake one in tests)."""

    @property
    def queued(self) -> int:
        "Bytes of input written but not yet handed to the terminal."

    def write(self, data: bytes) -> None:
        "Send input to the shell as if typed."

    def sendSignal(self, name: str) -> None:
        "Deliver one of L{SIGNALS} as a person at the terminal would mean it."

    def resize(self, cols: int, rows: int) -> None:
        "Set the window size; the running program sees SIGWINCH."

    def hangUp(self) -> None:
        "Note what the shell started, SIGHUP the shell and close the terminal."

    def killSession(self) -> None:
        "SIGKILL the shell (not yet reaped) and everything it started."

    def endRemains(self) -> None:
        "The shell has been reaped: SIGKILL what it started and left behind."


class PTYTerminal:
    """The real L{Terminal}: a Twisted PTY process transport, and the shell's processes."""

    def __init__(
        self,
        transport: IProcessTransport,
        pid: int,
        fd: int,
        scope: ProcessScope,
        reservation: Reservation | None = None,
    ) -> None:
        self.transport = transport
        self.pid = pid
        self.fd = fd
        self.scope = scope
        self.consumer = IConsumer(transport)
        self.input = InputQueue(self.consumer, reservation)

    @classmethod
    def spawn(  # noqa: PLR0917 - mirrors spawnProcess
        cls,
        reactor: Any,
        protocol: ProcessProtocol,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        cols: int,
        rows: int,
        reservation: Reservation | None = None,
    ) -> PTYTerminal:
        """Open a PTY pair, size it, and start ``argv`` on it as a new session's leader.

        ``cwd`` is a L{WorkingDirectory}'s path, which Twisted's forked child ``chdir``s to.
        ``env`` must hold L{UNIT_VARIABLE}: it marks the shell's processes. ``reservation``
        holds the queued input's bytes from the agent's memory budget.
        """
        master, slave = os.openpty()
        cgroups = unitCgroups()
        cgroup = None if cgroups is None else cgroups.create("shell")
        inside = False
        try:
            setWindowSize(slave, cols, rows)

            def spawn() -> IProcessTransport:
                spawned: IProcessTransport = reactor.spawnProcess(
                    protocol,
                    argv[0],
                    argv,
                    env=env,
                    path=cwd,
                    usePTY=(master, slave, os.ttyname(slave)),
                )
                return spawned

            if cgroups is not None and cgroup is not None:
                transport, inside = cgroups.spawnIn(cgroup, spawn)
            else:
                transport = spawn()
        except BaseException:
            # Twisted only takes the pair over once the child is started.
            os.close(master)
            os.close(slave)
            if cgroups is not None and cgroup is not None:
                cgroups.release(cgroup)
            raise
        assert transport.pid is not None
        tree = TreeScope(transport.pid, env[UNIT_VARIABLE])
        scope: ProcessScope = tree
        if cgroups is not None and cgroup is not None:
            if inside:
                scope = CgroupScope(cgroup, cgroups, tree)
            else:
                cgroups.release(cgroup)
        return cls(transport, transport.pid, master, scope, reservation)

    @property
    def queued(self) -> int:
        return self.input.queued

    def write(self, data: bytes) -> None:
        self.input.write(data)

    def foregroundGroup(self) -> int | None:
        try:
            group = os.tcgetpgrp(self.fd)
        except OSError:
            return None
        return group if group > 0 else None

    def sendSignal(self, name: str) -> None:
        signum = SIGNALS[name]
        groups: list[int] = []
        if name != "HUP":
            foreground = self.foregroundGroup()
            if foreground is not None:
                groups.append(foreground)
        # Ctrl-C reaches only the foreground job (the shell itself when idle); the others
        # also reach the shell's own group, as the reference sends them.
        if name != "INT" or not groups:
            groups.append(self.pid)
        for group in dict.fromkeys(groups):
            signalGroup(group, signum)

    def resize(self, cols: int, rows: int) -> None:
        setWindowSize(self.fd, cols, rows)

    def hangUp(self) -> None:
        self.scope.collect()
        # Once the shell is reaped its group id may be someone else's; closing the terminal
        # still hangs up whatever has it as its controlling terminal.
        if self.scope.leaderAlive():
            signalGroup(self.pid, signal.SIGHUP)
        self._close()

    def killSession(self) -> None:
        if self.scope.leaderAlive():
            signalGroup(self.pid, signal.SIGKILL)
        self.scope.kill()
        self._close()

    def endRemains(self) -> None:
        # The shell's group id may belong to someone else by now: only the scope (pidfds,
        # and the session, whose id stays taken while it has members) is safe to use.
        self.scope.kill()
        self._close()

    def _close(self) -> None:
        # Unread input is dropped; what the transport still holds fails to write once nobody
        # holds the terminal, and the reactor then closes it.
        self.input.drop()
        self.consumer.unregisterProducer()
        self.transport.loseConnection()


class ShellProcess(ProcessProtocol):
    """Feeds the PTY process's events to its shell machine.

    It also holds the shell's working directory open until the shell has exited: the forked
    child enters it through the agent's descriptor (see L{WorkingDirectory}).
    """

    def __init__(self, directory: WorkingDirectory | None = None) -> None:
        self.directory = directory
        self.shell: ShellInput | None = None
        """The shell machine, once it exists."""

    def releaseDirectory(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            directory.close()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.shell is not None:
            self.shell._received(data)

    def processExited(self, reason: Failure) -> None:
        self.releaseDirectory()
        if self.shell is not None:
            self.shell._exited(exitCodeOf(reason))

    def processEnded(self, reason: Failure) -> None:
        self.releaseDirectory()
        if self.shell is not None:
            self.shell._ended()


__all__ = [
    "MAX_QUEUED_INPUT",
    "SIGNALS",
    "InputQueue",
    "PTYTerminal",
    "ShellProcess",
    "Terminal",
    "setWindowSize",
    "shellArgv",
    "shellEnvironment",
]

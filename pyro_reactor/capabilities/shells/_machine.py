"""The lifecycle of one shell: L{ShellMachine}, built by L{makeShellMachine} (see docs/shells.md).

The machine acts on the world only through its L{ShellCore}: a L{Terminal} (write, signal,
resize, hang up, kill what the shell started), a L{ShellOutput}, a L{ShellRecord} and a clock.
It is the only authority on the shell's lifecycle: the registry asks it (L{ShellInput.whenClosed},
L{ShellInput.closeRequested}) rather than keeping flags of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pyro_reactor.capabilities.shells.output import ShellOutput
from pyro_reactor.capabilities.shells.records import ShellRecord
from pyro_reactor.capabilities.shells.terminal import MAX_QUEUED_INPUT, Terminal
from pyro_reactor.errors import ActionError

log = Logger(namespace="pyro_reactor.capabilities.shells")

EXIT_GRACE_SECONDS = 1.0
"""After the shell has exited, how long output still in the PTY (or written by a background
job that kept the terminal open) is collected before the terminal is hung up."""
CLOSE_TIMEOUT_SECONDS = 5.0
"""How long ``close_shell`` waits for a hung-up shell before killing everything it started."""
KILL_TIMEOUT_SECONDS = 5.0
"""How long after SIGKILL the shell may take to be reaped before it is given up on."""


class ShellInput(Protocol):
    """The inputs of one shell's lifecycle (see docs/shells.md)."""

    def write(self, data: bytes) -> None:
        "Input for the shell (raises L{ActionError} unless it is running and has room)."

    def sendSignal(self, name: str) -> None:
        "A signal from L{SIGNALS} (raises L{ActionError} unless it is running)."

    def resize(self, cols: int, rows: int) -> None:
        "A new window size (raises L{ActionError} unless it is running)."

    def close(self) -> Deferred[None]:
        "End the shell and what it started; fires once it is gone."

    def whenClosed(self) -> Deferred[None]:
        "Fires once the shell is closed (at once if it is)."

    def closeRequested(self) -> bool:
        "Whether the shell is being (or has been) closed."

    def _received(self, data: bytes) -> None:
        "Bytes arrived from the terminal."

    def _exited(self, exitCode: int) -> None:
        "The shell process was reaped."

    def _ended(self) -> None:
        "The shell was reaped and its terminal is closed: all output is in."

    def _graceElapsed(self) -> None:
        "The shell exited a while ago and its terminal is still open."

    def _timedOut(self) -> None:
        "Closing (or killing) took too long."


@dataclass
class ShellCore:
    """What a shell machine reaches of the world."""

    record: ShellRecord
    terminal: Terminal
    output: ShellOutput
    clock: IReactorTime
    graceSeconds: float = EXIT_GRACE_SECONDS
    closeTimeout: float = CLOSE_TIMEOUT_SECONDS
    killTimeout: float = KILL_TIMEOUT_SECONDS
    maxQueuedInput: int = MAX_QUEUED_INPUT
    exitCode: int | None = None
    closeWaiters: list[Deferred[None]] = field(default_factory=list)
    """Who waits for the close (fired by the transition into C{closed})."""

    def notRunning(self) -> ActionError:
        return ActionError(f"shell {self.record.shellId} is not running")

    def waitClosed(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.closeWaiters.append(waiter)
        return waiter

    def finish(self) -> None:
        """All output is in (or will never be): the shell is stopped."""
        record = self.record
        record.state = "stopped"
        record.endedAt = self.clock.seconds()
        record.exitCode = self.exitCode
        record.save()
        log.info(
            "shell {shell_id} ended (exit code {exit_code})",
            shell_id=record.shellId,
            exit_code=record.exitCode,
        )
        # Readers woken now answer with the final state and the last of the output.
        self.output.finish()

    def closed(self) -> None:
        self.output.closeLog()
        waiters, self.closeWaiters = self.closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)


def _cancel(timer: IDelayedCall) -> None:
    if timer.active():
        timer.cancel()


def makeShellMachine() -> Callable[[ShellCore], ShellInput]:
    """Build the shell machine's factory (states stay local to this function)."""

    def startGrace(shell: ShellInput, core: ShellCore, exitCode: int) -> IDelayedCall:
        core.exitCode = exitCode
        return core.clock.callLater(core.graceSeconds, shell._graceElapsed)

    def hangUp(shell: ShellInput, core: ShellCore) -> IDelayedCall:
        timer = core.clock.callLater(core.closeTimeout, shell._timedOut)
        core.terminal.hangUp()
        return timer

    def killAll(shell: ShellInput, core: ShellCore) -> IDelayedCall:
        log.warn(
            "shell {shell_id} did not end within {timeout} s of hang-up: killing its processes",
            shell_id=core.record.shellId,
            timeout=core.closeTimeout,
        )
        timer = core.clock.callLater(core.killTimeout, shell._timedOut)
        core.terminal.killSession()
        return timer

    builder = TypeMachineBuilder(ShellInput, ShellCore)
    running = builder.state("running")
    exiting = builder.state("exiting", startGrace)
    closing = builder.state("closing", hangUp)
    killing = builder.state("killing", killAll)
    exited = builder.state("exited")
    closed = builder.state("closed")

    # Output is collected in every state where the terminal may still be open.
    @running.upon(ShellInput._received).loop()
    @exiting.upon(ShellInput._received, nodata=True).loop()
    @closing.upon(ShellInput._received, nodata=True).loop()
    @killing.upon(ShellInput._received, nodata=True).loop()
    def collect(shell: ShellInput, core: ShellCore, data: bytes) -> None:
        core.output.feed(data)

    @running.upon(ShellInput.write).loop()
    def write(shell: ShellInput, core: ShellCore, data: bytes) -> None:
        queued = core.terminal.queued
        if queued + len(data) > core.maxQueuedInput:
            raise ActionError(
                f"shell {core.record.shellId} input is too large: {queued} bytes are still"
                f" waiting to be read, and at most {core.maxQueuedInput} may wait"
            )
        core.terminal.write(data)

    @running.upon(ShellInput.sendSignal).loop()
    def sendSignal(shell: ShellInput, core: ShellCore, name: str) -> None:
        core.terminal.sendSignal(name)

    @running.upon(ShellInput.resize).loop()
    def resize(shell: ShellInput, core: ShellCore, cols: int, rows: int) -> None:
        core.terminal.resize(cols, rows)
        core.record.cols, core.record.rows = cols, rows
        core.record.save()

    running.upon(ShellInput._exited).to(exiting).returns(None)

    @running.upon(ShellInput._ended).to(exited)
    def endedWithoutExit(shell: ShellInput, core: ShellCore) -> None:
        core.finish()

    @running.upon(ShellInput.close).to(closing)
    def closeRunning(shell: ShellInput, core: ShellCore) -> Deferred[None]:
        return core.waitClosed()

    @exiting.upon(ShellInput._ended).to(exited)
    def exitedAndDrained(shell: ShellInput, core: ShellCore, grace: IDelayedCall) -> None:
        _cancel(grace)
        core.finish()

    @exiting.upon(ShellInput._graceElapsed, nodata=True).loop()
    def dropTerminal(shell: ShellInput, core: ShellCore) -> None:
        # A background job still holds the terminal: stop waiting for it; processEnded follows.
        core.terminal.hangUp()

    @exiting.upon(ShellInput.close).to(closing)
    def closeExiting(shell: ShellInput, core: ShellCore, grace: IDelayedCall) -> Deferred[None]:
        _cancel(grace)
        return core.waitClosed()

    @closing.upon(ShellInput._exited, nodata=True).loop()
    @killing.upon(ShellInput._exited, nodata=True).loop()
    def rememberExit(shell: ShellInput, core: ShellCore, exitCode: int) -> None:
        core.exitCode = exitCode

    @closing.upon(ShellInput._ended).to(closed)
    @killing.upon(ShellInput._ended).to(closed)
    def closedInTime(shell: ShellInput, core: ShellCore, timer: IDelayedCall) -> None:
        _cancel(timer)
        # What the shell started and left behind (nohup, disown, trap '' HUP, setsid jobs).
        core.terminal.endRemains()
        core.finish()
        core.closed()

    closing.upon(ShellInput._timedOut).to(killing).returns(None)

    @killing.upon(ShellInput._timedOut).to(closed)
    def givenUp(shell: ShellInput, core: ShellCore, timer: IDelayedCall) -> None:
        # ``timer`` is the one that just fired.
        log.error(
            "shell {shell_id} was not reaped {timeout} s after SIGKILL: giving up on it",
            shell_id=core.record.shellId,
            timeout=core.killTimeout,
        )
        core.finish()
        core.closed()

    @closing.upon(ShellInput.close, nodata=True).loop()
    @killing.upon(ShellInput.close, nodata=True).loop()
    @running.upon(ShellInput.whenClosed).loop()
    @exiting.upon(ShellInput.whenClosed, nodata=True).loop()
    @closing.upon(ShellInput.whenClosed, nodata=True).loop()
    @killing.upon(ShellInput.whenClosed, nodata=True).loop()
    @exited.upon(ShellInput.whenClosed).loop()
    def notYetClosed(shell: ShellInput, core: ShellCore) -> Deferred[None]:
        return core.waitClosed()

    @exited.upon(ShellInput.close).to(closed)
    def closeExited(shell: ShellInput, core: ShellCore) -> Deferred[None]:
        # The shell is gone; what it left in its session (or marked) is not.
        core.terminal.endRemains()
        core.closed()
        return succeed(None)

    @closed.upon(ShellInput.close).loop()
    @closed.upon(ShellInput.whenClosed).loop()
    def alreadyClosed(shell: ShellInput, core: ShellCore) -> Deferred[None]:
        return succeed(None)

    running.upon(ShellInput.closeRequested).loop().returns(False)
    exiting.upon(ShellInput.closeRequested, nodata=True).loop().returns(False)
    exited.upon(ShellInput.closeRequested).loop().returns(False)
    closing.upon(ShellInput.closeRequested, nodata=True).loop().returns(True)
    killing.upon(ShellInput.closeRequested, nodata=True).loop().returns(True)
    closed.upon(ShellInput.closeRequested).loop().returns(True)

    # Input, signals and resizing need a running shell: the reference's error everywhere else.
    @exiting.upon(ShellInput.write, nodata=True).loop()
    @closing.upon(ShellInput.write, nodata=True).loop()
    @killing.upon(ShellInput.write, nodata=True).loop()
    @exited.upon(ShellInput.write).loop()
    @closed.upon(ShellInput.write).loop()
    def writeNotRunning(shell: ShellInput, core: ShellCore, data: bytes) -> None:
        raise core.notRunning()

    @exiting.upon(ShellInput.sendSignal, nodata=True).loop()
    @closing.upon(ShellInput.sendSignal, nodata=True).loop()
    @killing.upon(ShellInput.sendSignal, nodata=True).loop()
    @exited.upon(ShellInput.sendSignal).loop()
    @closed.upon(ShellInput.sendSignal).loop()
    def signalNotRunning(shell: ShellInput, core: ShellCore, name: str) -> None:
        raise core.notRunning()

    @exiting.upon(ShellInput.resize, nodata=True).loop()
    @closing.upon(ShellInput.resize, nodata=True).loop()
    @killing.upon(ShellInput.resize, nodata=True).loop()
    @exited.upon(ShellInput.resize).loop()
    @closed.upon(ShellInput.resize).loop()
    def resizeNotRunning(shell: ShellInput, core: ShellCore, cols: int, rows: int) -> None:
        raise core.notRunning()

    # Late events: timers cancelled too late, a terminal closing after we gave up on it.
    for late in (
        ShellInput._received,
        ShellInput._exited,
        ShellInput._ended,
        ShellInput._graceElapsed,
        ShellInput._timedOut,
    ):
        exited.upon(late).loop().returns(None)
        closed.upon(late).loop().returns(None)
    for state in (closing, killing):
        state.upon(ShellInput._graceElapsed, nodata=True).loop().returns(None)

    return builder.build()


ShellMachine = makeShellMachine()
"""The built factory: ``ShellMachine(core)`` is a new shell in state ``running``."""

__all__ = [
    "CLOSE_TIMEOUT_SECONDS",
    "EXIT_GRACE_SECONDS",
    "KILL_TIMEOUT_SECONDS",
    "ShellCore",
    "ShellInput",
    "ShellMachine",
    "makeShellMachine",
]

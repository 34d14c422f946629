"""Interactive PTY shells: one automat machine per shell, its output stream, the actions.

The reference's ``open_shell``, ``read_shell``, ``write_shell``, ``signal_shell`` and
``close_shell`` (same fields, answers and error messages), plus ``resize_shell``,
``list_shells`` and the optional ``wait_ms`` of ``read_shell``. See docs/shells.md for the
machine and docs/actions/shells.md for the wire reference.

How a shell is built:

- L{ShellMachine} (the lifecycle) acts on the world only through its L{ShellCore}: a
  L{Terminal} (write, signal, resize, hang up, kill the session), a L{ShellOutput}, a
  L{ShellRecord} and a clock. Tests drive it with a fake terminal and a ``Clock``.
- L{PTYTerminal} is the real terminal: ``reactor.spawnProcess(..., usePTY=(master, slave,
  name))`` on a pair we open and size ourselves before the child starts. No threads.
- L{ShellOutput} decodes the PTY's bytes incrementally (UTF-8, replacement characters),
  redacts them with L{StreamRedactor} (only decided text comes out, so cursors never shift),
  appends the redacted text to ``<id>.log`` and keeps at most ``shellBufferChars`` characters
  in memory; an older range is read back from the log in the agent's thread pool.
- L{Shells} is the registry (a child service of the agent: stopping the agent closes every
  shell) and holds the action handlers.

Differences from the reference, on purpose: the log holds the redacted stream (the reference
writes the raw output, secrets included, to disk), and is started afresh when a shell id is
reused (the reference appends, so its log no longer matches the cursors); INT goes to the
terminal's foreground process group, TERM and KILL to it and to the shell's group, so that
Ctrl-C stops the job an interactive bash is running; ``close_shell`` does not hold up other
requests while the shell takes its time to exit.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import termios
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.redact import StreamRedactor
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.processes import signalGroup
from pyro_reactor.system.workspace import WorkingDirectory
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request

log = Logger(namespace="pyro_reactor.capabilities.shells")

SIGNALS: dict[str, signal.Signals] = {
    "HUP": signal.SIGHUP,
    "INT": signal.SIGINT,
    "TERM": signal.SIGTERM,
    "KILL": signal.SIGKILL,
}
"""The signals ``signal_shell`` accepts, in the reference's order."""

DEFAULT_COLS = 120
DEFAULT_ROWS = 30
DEFAULT_READ_CHARS = 65536
MAX_WAIT_MS = 60_000
"""``wait_ms`` above this is taken as this (a read never holds a connection longer)."""

EXIT_GRACE_SECONDS = 1.0
"""After the shell has exited, how long output still in the PTY (or written by a background
job that kept the terminal open) is collected before the terminal is hung up."""
CLOSE_TIMEOUT_SECONDS = 5.0
"""How long ``close_shell`` waits for a hung-up shell before killing its whole session."""
KILL_TIMEOUT_SECONDS = 5.0
"""How long after SIGKILL the shell may take to be reaped before it is given up on."""
CHECKPOINT_CHARS = 64 * 1024
"""Distance (in characters) between the log's character-to-byte checkpoints."""

_SHELL_ID_MAX_BYTES = 200
_LOG_READ_BLOCK = 256 * 1024


# -- the process ---------------------------------------------------------------------------


def shellArgv() -> list[str]:
    """The reference's interactive shell: bash without profile or rc files, else ``/bin/sh``."""
    program = shutil.which("bash") or "/bin/sh"
    argv = [program]
    if program.endswith("bash"):
        argv += ["--noprofile", "--norc"]
    return [*argv, "-i"]


def shellEnvironment(
    overrides: Mapping[str, str] | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The agent's environment, a terminal type, a plain prompt, then the request's overrides."""
    env = dict(os.environ if base is None else base)
    env["TERM"] = env.get("TERM", "xterm-256color")
    env["PS1"] = "pyro$ "
    env["PROMPT_COMMAND"] = ""
    if overrides:
        env.update(overrides)
    return env


def setWindowSize(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (on the master, the foreground group also gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exitCodeOf(reason: Failure) -> int:
    """The exit status as ``subprocess`` reports it: negative signal number if killed."""
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return -int(value.signal)
        return int(value.exitCode or 0)
    return 0


def sessionMembers(sessionId: int, procRoot: Path = Path("/proc")) -> list[int]:
    """The live processes (zombies left out) of the session ``sessionId``, from ``/proc``."""
    members = []
    try:
        entries = list(procRoot.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sessionId and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


class Terminal(Protocol):
    """What the shell machine does to its terminal and process (a fake one in tests)."""

    def write(self, data: bytes) -> None:
        "Send input to the shell as if typed."

    def sendSignal(self, name: str) -> None:
        "Deliver one of L{SIGNALS} as a person at the terminal would mean it."

    def resize(self, cols: int, rows: int) -> None:
        "Set the window size; the running program sees SIGWINCH."

    def hangUp(self) -> None:
        "SIGHUP the shell and close the terminal (its unread output is dropped)."

    def killSession(self) -> None:
        "SIGKILL every process left in the shell's session and drop the terminal."


@dataclass
class PTYTerminal:
    """The real L{Terminal}: a Twisted PTY process transport and the shell's session."""

    transport: IProcessTransport
    pid: int
    fd: int

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
    ) -> PTYTerminal:
        """Open a PTY pair, size it, and start ``argv`` on it as a new session's leader.

        ``cwd`` is a L{WorkingDirectory}'s path, which Twisted's forked child ``chdir``s to.
        """
        master, slave = os.openpty()
        try:
            setWindowSize(slave, cols, rows)
            transport: IProcessTransport = reactor.spawnProcess(
                protocol,
                argv[0],
                argv,
                env=env,
                path=cwd,
                usePTY=(master, slave, os.ttyname(slave)),
            )
        except BaseException:
            # Twisted only takes the pair over once the child is started.
            os.close(master)
            os.close(slave)
            raise
        assert transport.pid is not None
        return cls(transport, transport.pid, master)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

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
        signalGroup(self.pid, signal.SIGHUP)
        self.transport.loseConnection()

    def killSession(self) -> None:
        signalGroup(self.pid, signal.SIGKILL)
        for member in sessionMembers(self.pid):
            if member != os.getpid():
                try:
                    os.kill(member, signal.SIGKILL)
                except OSError:
                    pass
        # A hang-up waits for buffered input to be written, which a stuck shell never reads:
        # drop the terminal now so that reaping the shell ends it.
        connectionLost = getattr(self.transport, "connectionLost", None)
        if getattr(self.transport, "connected", False) and connectionLost is not None:
            connectionLost(Failure(ConnectionDone("shell killed")))


# -- the record and the output --------------------------------------------------------------


@dataclass
class ShellRecord:
    """A shell's summary as the reference answers it, kept current in ``<id>.json``."""

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
        """Replace ``<id>.json`` atomically (a few hundred bytes: written in place, not in a
        thread)."""
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            temporary.write_text(json.dumps(self.summary(), indent=2), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as error:
            log.error(
                "cannot write shell metadata {path}: {error}",
                path=str(self.path),
                error=error.strerror,
                shell_id=self.shellId,
            )


def _readLogText(fd: int, byteOffset: int, skipChars: int, count: int) -> str:
    """Read ``count`` characters of a log from ``byteOffset`` after skipping ``skipChars``.

    Blocking (runs in the thread pool); closes ``fd``, a duplicate made for this read.
    """
    try:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pieces: list[str] = []
        have = 0
        offset = byteOffset
        while have < count:
            data = os.pread(fd, _LOG_READ_BLOCK, offset)
            if not data:
                break
            offset += len(data)
            text = decoder.decode(data)
            if skipChars:
                if len(text) <= skipChars:
                    skipChars -= len(text)
                    continue
                text = text[skipChars:]
                skipChars = 0
            text = text[: count - have]
            pieces.append(text)
            have += len(text)
        return "".join(pieces)
    finally:
        os.close(fd)


class ShellOutput:
    """A shell's output: decoded, redacted, logged, and kept in a bounded window.

    The redacted stream's characters are numbered from 0 (the cursors of ``read_shell``).
    Everything decided goes to the log first, so any range is in the log; the last
    ``windowChars`` characters (at most) are also in memory.
    """

    def __init__(self, logPath: Path, secrets: Iterable[str], windowChars: int) -> None:
        self.logPath = logPath
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._redactor = StreamRedactor(secrets)
        self._windowChars = max(windowChars, 0)
        # A fresh file, never the log of an earlier shell of the same id that a pending
        # read may still hold open.
        try:
            logPath.unlink()
        except FileNotFoundError:
            pass
        self._fd: int | None = os.open(
            logPath,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        self.length = 0
        """Characters of the redacted stream so far."""
        self.ended = False
        self._logBytes = 0
        self._loggedChars = 0
        self._logBroken = False
        self._checkpoints: list[tuple[int, int]] = [(0, 0)]
        self._chunks: list[str] = []
        self._starts: list[int] = []
        self._head = 0
        self._windowStart = 0
        self._waiters: list[Deferred[None]] = []

    @property
    def windowStart(self) -> int:
        """The first character still held in memory."""
        return self._windowStart

    def feed(self, data: bytes) -> None:
        """Bytes from the terminal."""
        text = self._decoder.decode(data)
        if text:
            self._append(self._redactor.feed(text))

    def finish(self) -> None:
        """The terminal is gone: decide what was held back, wake readers.

        The log stays open (for reads below the window) until L{closeLog}.
        """
        if self.ended:
            return
        tail = self._decoder.decode(b"", final=True)
        self.ended = True
        self._append(self._redactor.feed(tail) + self._redactor.finish())
        self._wake()

    def closeLog(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, text: str) -> None:
        if not text:
            return
        self._log(text)
        self._chunks.append(text)
        self._starts.append(self.length)
        self.length += len(text)
        self._trim()
        self._wake()

    def _log(self, text: str) -> None:
        if self._fd is None or self._logBroken:
            return
        if self.length - self._checkpoints[-1][0] >= CHECKPOINT_CHARS:
            self._checkpoints.append((self.length, self._logBytes))
        data = text.encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as error:
            # Keep the shell going; what falls out of the window from now on is lost.
            self._logBroken = True
            log.error(
                "cannot append to shell log {path}: {error}",
                path=str(self.logPath),
                error=error.strerror,
            )
            return
        self._logBytes += len(data)
        self._loggedChars = self.length + len(text)

    def _trim(self) -> None:
        chunks, starts = self._chunks, self._starts
        while self._head < len(chunks) and self.length - starts[self._head] > self._windowChars:
            chunks[self._head] = ""
            self._head += 1
        if self._head < len(chunks):
            self._windowStart = starts[self._head]
        else:
            self._windowStart = self.length
        if self._head > 64 and self._head * 2 > len(chunks):
            del chunks[: self._head]
            del starts[: self._head]
            self._head = 0

    def window(self, start: int, stop: int) -> str:
        """Characters ``[start, stop)``, which must lie in the in-memory window."""
        assert self._windowStart <= start <= stop <= self.length
        if start == stop:
            return ""
        chunks, starts = self._chunks, self._starts
        index = bisect_right(starts, start, lo=self._head) - 1
        pieces = []
        position = start
        while position < stop:
            chunkStart = starts[index]
            chunk = chunks[index]
            pieces.append(chunk[position - chunkStart : stop - chunkStart])
            position = chunkStart + len(chunk)
            index += 1
        return "".join(pieces)

    def read(
        self, start: int, stop: int, inThread: Callable[..., Deferred[str]]
    ) -> str | Deferred[str]:
        """Characters ``[start, stop)``: from memory if there, else from the log in a thread."""
        if start >= self._windowStart:
            return self.window(start, stop)
        if stop > self._loggedChars:
            raise ActionError(
                f"shell output before character {self._windowStart} is no longer available:"
                " the shell log could not be written"
            )
        checkpoint = self._checkpoints[bisect_right(self._checkpoints, (start, 2**63)) - 1]
        if self._fd is not None:
            fd = os.dup(self._fd)
        else:
            try:
                fd = os.open(self.logPath, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as error:
                raise ActionError(f"cannot read the shell log: {error.strerror or error}") from None
        return inThread(_readLogText, fd, checkpoint[1], start - checkpoint[0], stop - start)

    def waitBeyond(self, cursor: int, seconds: float, clock: IReactorTime) -> Deferred[None]:
        """Fires once the stream is longer than ``cursor``, it has ended, or ``seconds`` passed."""
        if self.length > cursor or self.ended or seconds <= 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)

        def expire() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                waiter.callback(None)

        timer = clock.callLater(seconds, expire)

        def stopTimer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(stopTimer)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


# -- the machine ----------------------------------------------------------------------------


class Shell(Protocol):
    """The inputs of one shell's lifecycle (see docs/shells.md)."""

    def write(self, data: bytes) -> None:
        "Input for the shell (raises L{ActionError} unless it is running)."

    def sendSignal(self, name: str) -> None:
        "A signal from L{SIGNALS} (raises L{ActionError} unless it is running)."

    def resize(self, cols: int, rows: int) -> None:
        "A new window size (raises L{ActionError} unless it is running)."

    def close(self) -> Deferred[None]:
        "End the shell; fires once it is gone."

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
    exitCode: int | None = None
    closeWaiters: list[Deferred[None]] = field(default_factory=list)

    def notRunning(self) -> ActionError:
        return ActionError(f"shell {self.record.shellId} is not running")

    def whenClosed(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.closeWaiters.append(waiter)
        return waiter

    def finish(self) -> None:
        """All output is in (or will never be): the shell is stopped."""
        record = self.record
        if record.state != "stopped":
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


def _startGrace(shell: Shell, core: ShellCore, exitCode: int) -> IDelayedCall:
    core.exitCode = exitCode
    return core.clock.callLater(core.graceSeconds, shell._graceElapsed)


def _hangUp(shell: Shell, core: ShellCore) -> IDelayedCall:
    timer = core.clock.callLater(core.closeTimeout, shell._timedOut)
    core.terminal.hangUp()
    return timer


def _killSession(shell: Shell, core: ShellCore) -> IDelayedCall:
    log.warn(
        "shell {shell_id} did not end within {timeout} s of hang-up: killing its session",
        shell_id=core.record.shellId,
        timeout=core.closeTimeout,
    )
    timer = core.clock.callLater(core.killTimeout, shell._timedOut)
    core.terminal.killSession()
    return timer


def _cancel(timer: IDelayedCall) -> None:
    if timer.active():
        timer.cancel()


builder = TypeMachineBuilder(Shell, ShellCore)
running = builder.state("running")
exiting = builder.state("exiting", _startGrace)
closing = builder.state("closing", _hangUp)
killing = builder.state("killing", _killSession)
exited = builder.state("exited")
closed = builder.state("closed")


# Output is collected in every state where the terminal may still be open.
@running.upon(Shell._received).loop()
@exiting.upon(Shell._received, nodata=True).loop()
@closing.upon(Shell._received, nodata=True).loop()
@killing.upon(Shell._received, nodata=True).loop()
def _collect(shell: Shell, core: ShellCore, data: bytes) -> None:
    core.output.feed(data)


@running.upon(Shell.write).loop()
def _write(shell: Shell, core: ShellCore, data: bytes) -> None:
    core.terminal.write(data)


@running.upon(Shell.sendSignal).loop()
def _signal(shell: Shell, core: ShellCore, name: str) -> None:
    core.terminal.sendSignal(name)


@running.upon(Shell.resize).loop()
def _resize(shell: Shell, core: ShellCore, cols: int, rows: int) -> None:
    core.terminal.resize(cols, rows)
    core.record.cols, core.record.rows = cols, rows
    core.record.save()


running.upon(Shell._exited).to(exiting).returns(None)


@running.upon(Shell._ended).to(exited)
def _endedWithoutExit(shell: Shell, core: ShellCore) -> None:
    core.finish()


@running.upon(Shell.close).to(closing)
def _closeRunning(shell: Shell, core: ShellCore) -> Deferred[None]:
    return core.whenClosed()


@exiting.upon(Shell._ended).to(exited)
def _exitedAndDrained(shell: Shell, core: ShellCore, grace: IDelayedCall) -> None:
    _cancel(grace)
    core.finish()


@exiting.upon(Shell._graceElapsed, nodata=True).loop()
def _dropTerminal(shell: Shell, core: ShellCore) -> None:
    # A background job still holds the terminal: stop waiting for it; processEnded follows.
    core.terminal.hangUp()


@exiting.upon(Shell.close).to(closing)
def _closeExiting(shell: Shell, core: ShellCore, grace: IDelayedCall) -> Deferred[None]:
    _cancel(grace)
    return core.whenClosed()


@closing.upon(Shell._exited, nodata=True).loop()
@killing.upon(Shell._exited, nodata=True).loop()
def _rememberExit(shell: Shell, core: ShellCore, exitCode: int) -> None:
    core.exitCode = exitCode


@closing.upon(Shell._ended).to(closed)
@killing.upon(Shell._ended).to(closed)
def _closedInTime(shell: Shell, core: ShellCore, timer: IDelayedCall) -> None:
    _cancel(timer)
    core.finish()
    core.closed()


closing.upon(Shell._timedOut).to(killing).returns(None)


@killing.upon(Shell._timedOut).to(closed)
def _givenUp(shell: Shell, core: ShellCore, timer: IDelayedCall) -> None:
    # ``timer`` is the one that just fired. (automat 25.4 passes the data even with
    # ``nodata=True`` when the target state has none.)
    log.error(
        "shell {shell_id} was not reaped {timeout} s after SIGKILL: giving up on it",
        shell_id=core.record.shellId,
        timeout=core.killTimeout,
    )
    core.finish()
    core.closed()


@closing.upon(Shell.close, nodata=True).loop()
@killing.upon(Shell.close, nodata=True).loop()
def _alreadyClosing(shell: Shell, core: ShellCore) -> Deferred[None]:
    return core.whenClosed()


@exited.upon(Shell.close).to(closed)
def _closeExited(shell: Shell, core: ShellCore) -> Deferred[None]:
    core.closed()
    return succeed(None)


@closed.upon(Shell.close).loop()
def _closeClosed(shell: Shell, core: ShellCore) -> Deferred[None]:
    return succeed(None)


# Input, signals and resizing need a running shell: the reference's error everywhere else.
@exiting.upon(Shell.write, nodata=True).loop()
@closing.upon(Shell.write, nodata=True).loop()
@killing.upon(Shell.write, nodata=True).loop()
@exited.upon(Shell.write).loop()
@closed.upon(Shell.write).loop()
def _writeNotRunning(shell: Shell, core: ShellCore, data: bytes) -> None:
    raise core.notRunning()


@exiting.upon(Shell.sendSignal, nodata=True).loop()
@closing.upon(Shell.sendSignal, nodata=True).loop()
@killing.upon(Shell.sendSignal, nodata=True).loop()
@exited.upon(Shell.sendSignal).loop()
@closed.upon(Shell.sendSignal).loop()
def _signalNotRunning(shell: Shell, core: ShellCore, name: str) -> None:
    raise core.notRunning()


@exiting.upon(Shell.resize, nodata=True).loop()
@closing.upon(Shell.resize, nodata=True).loop()
@killing.upon(Shell.resize, nodata=True).loop()
@exited.upon(Shell.resize).loop()
@closed.upon(Shell.resize).loop()
def _resizeNotRunning(shell: Shell, core: ShellCore, cols: int, rows: int) -> None:
    raise core.notRunning()


# Late events: timers cancelled too late, a terminal closing after we gave up on it.
for _late in (Shell._received, Shell._exited, Shell._ended, Shell._graceElapsed, Shell._timedOut):
    exited.upon(_late).loop().returns(None)
    closed.upon(_late).loop().returns(None)
for _state in (closing, killing):
    _state.upon(Shell._graceElapsed, nodata=True).loop().returns(None)

ShellMachine = builder.build()


# -- the registry and the actions -----------------------------------------------------------


class _ShellProcess(ProcessProtocol):
    """Feeds the PTY process's events to its shell machine.

    It also holds the shell's working directory open until the shell has exited: the forked
    child enters it through the agent's descriptor (see L{WorkingDirectory}).
    """

    shell: Shell | None = None

    def __init__(self, directory: WorkingDirectory | None = None) -> None:
        self.directory = directory

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


@dataclass
class ShellSession:
    """One open shell as the registry holds it."""

    record: ShellRecord
    output: ShellOutput
    shell: Shell
    pid: int


_UNSAFE_ID = re.compile(r"[/\x00]")


def _shellId(request: Request) -> str:
    shellId = request.string("shell_id", "").strip()
    if shellId == "":
        raise ActionError("shell_id is required")
    return shellId


def _checkFileName(shellId: str) -> None:
    """The id names ``<id>.json`` and ``<id>.log``: it must stay a plain file name."""
    if (
        _UNSAFE_ID.search(shellId)
        or shellId.startswith(".")
        or len(shellId.encode("utf-8", "surrogatepass")) > _SHELL_ID_MAX_BYTES
    ):
        raise ActionError(
            "shell_id is invalid: it must not contain '/' or NUL, start with '.', "
            f"or be longer than {_SHELL_ID_MAX_BYTES} bytes"
        )


def _dimension(request: Request, name: str, default: int) -> int:
    value = request.integer(name, default)
    if not 0 <= value <= 0xFFFF:
        raise ActionError(f"{name} must be between 0 and 65535")
    return value


class Shells(Service):
    """The agent's open shells and their action handlers.

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
        self._shells: dict[str, ShellSession] = {}
        self._closing: dict[str, tuple[ShellSession, Deferred[None]]] = {}
        self._opening: set[str] = set()
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        for shellId in list(self._shells):
            self._startClosing(shellId)
        pending = [done for _session, done in self._closing.values()]
        stopped: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return stopped.addCallback(lambda _: None)

    def session(self, shellId: str) -> ShellSession:
        try:
            return self._shells[shellId]
        except KeyError:
            raise ActionError(f"shell {shellId!r} does not exist") from None

    def _startClosing(self, shellId: str) -> Deferred[None]:
        session = self._shells.pop(shellId)
        done = session.shell.close()
        self._closing[shellId] = (session, done)

        def forget(result: object) -> object:
            self._closing.pop(shellId, None)
            return result

        done.addBoth(forget)
        return done

    # -- handlers ---------------------------------------------------------------------------

    def openShell(self, request: Request) -> Deferred[dict[str, Any]]:
        shellId = _shellId(request)
        cwdText = self.workspace.resolve(request.string("cwd", "/workspace")).text
        env = request.environment("shell")
        secrets = request.stringList("redact_values") or []
        cols = _dimension(request, "cols", DEFAULT_COLS)
        rows = _dimension(request, "rows", DEFAULT_ROWS)
        _checkFileName(shellId)
        if shellId in self._shells or shellId in self._opening:
            raise ActionError(f"shell {shellId!r} already exists")
        if shellId in self._closing:
            raise ActionError(f"shell {shellId!r} is still closing")
        self._opening.add(shellId)
        checked: Deferred[WorkingDirectory] = self.context.inThread(
            self.workspace.openWorkingDirectory, cwdText
        )

        def start(directory: WorkingDirectory) -> dict[str, Any]:
            if self._stopping:
                directory.close()
                raise ActionError("the agent is stopping")
            session = self._start(shellId, cwdText, directory, env, secrets, cols, rows)
            self._shells[shellId] = session
            return session.record.summary()

        def done(result: object) -> object:
            self._opening.discard(shellId)
            return result

        return checked.addCallback(start).addBoth(done)

    def _start(  # noqa: PLR0917
        self,
        shellId: str,
        cwdText: str,
        directory: WorkingDirectory,
        env: dict[str, str] | None,
        secrets: list[str],
        cols: int,
        rows: int,
    ) -> ShellSession:
        # The protocol closes the directory once the shell has exited (here if it cannot start).
        protocol = _ShellProcess(directory)
        root = self.config.shellRoot
        reactor = self.context.reactor
        try:
            root.mkdir(parents=True, exist_ok=True)
            output = ShellOutput(root / f"{shellId}.log", secrets, self.config.shellBufferChars)
        except BaseException:
            protocol.releaseDirectory()
            raise
        try:
            terminal = PTYTerminal.spawn(
                reactor,
                protocol,
                self.argv or shellArgv(),
                shellEnvironment(env),
                directory.path,
                cols,
                rows,
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
            shellId=shellId,
            cwd=cwdText,
            cols=cols,
            rows=rows,
            startedAt=reactor.seconds(),
            path=root / f"{shellId}.json",
        )
        record.save()
        core = ShellCore(
            record=record,
            terminal=terminal,
            output=output,
            clock=reactor,
            closeTimeout=self.closeTimeout,
        )
        shell = ShellMachine(core)
        protocol.shell = shell
        log.info("shell {shell_id} started (pid {pid})", shell_id=shellId, pid=terminal.pid)
        return ShellSession(record, output, shell, terminal.pid)

    def readShell(self, request: Request) -> dict[str, Any] | Deferred[dict[str, Any]]:
        session = self.session(_shellId(request))
        cursor = request.integer("cursor", 0)
        maxChars = request.integer("max_chars", DEFAULT_READ_CHARS)
        if maxChars < 0:
            raise ActionError("max_chars must not be negative")
        waitMs = request.integer("wait_ms", 0)
        if waitMs < 0:
            raise ActionError("wait_ms must not be negative")
        output = session.output
        if waitMs > 0 and max(cursor, 0) >= output.length and not output.ended:
            start = output.length
            waited = output.waitBeyond(start, min(waitMs, MAX_WAIT_MS) / 1000, self.context.reactor)
            return waited.addCallback(lambda _: self._read(session, cursor, maxChars))
        return self._read(session, cursor, maxChars)

    def _read(
        self, session: ShellSession, cursor: int, maxChars: int
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        output = session.output
        start = min(max(cursor, 0), output.length)
        # One answer carries at most the in-memory window's worth; `truncated` says there is
        # more, as it does for any read shorter than the stream.
        count = min(maxChars, max(self.config.shellBufferChars, DEFAULT_READ_CHARS))
        stop = min(start + count, output.length)

        def answer(text: str) -> dict[str, Any]:
            payload = session.record.summary()
            nextCursor = start + len(text)
            payload.update(
                {
                    "cursor": start,
                    "next_cursor": nextCursor,
                    "output": text,
                    "truncated": nextCursor < output.length,
                }
            )
            return payload

        text = output.read(start, stop, self.context.inThread)
        if isinstance(text, Deferred):
            return text.addCallback(answer)
        return answer(text)

    def writeShell(self, request: Request) -> dict[str, Any]:
        session = self.session(_shellId(request))
        text = request.string("input", "")
        appendNewline = request.boolean("append_newline", True)
        payload = text + "\n" if appendNewline else text
        session.shell.write(payload.encode("utf-8", "replace"))
        answer = session.record.summary()
        answer.update({"input_length": len(text), "append_newline": appendNewline})
        return answer

    def signalShell(self, request: Request) -> dict[str, Any]:
        shellId = _shellId(request)
        name = request.string("signal", "INT").upper()
        if name not in SIGNALS:
            raise ActionError(f"signal must be one of: {', '.join(SIGNALS)}")
        session = self.session(shellId)
        session.shell.sendSignal(name)
        answer = session.record.summary()
        answer["signal"] = name
        return answer

    def closeShell(self, request: Request) -> Deferred[dict[str, Any]]:
        shellId = _shellId(request)
        session = self.session(shellId)
        done = self._startClosing(shellId)

        def answer(_: None) -> dict[str, Any]:
            payload = session.record.summary()
            payload["closed"] = True
            return payload

        return done.addCallback(answer)

    def resizeShell(self, request: Request) -> dict[str, Any]:
        session = self.session(_shellId(request))
        cols = _dimension(request, "cols", session.record.cols)
        rows = _dimension(request, "rows", session.record.rows)
        session.shell.resize(cols, rows)
        return session.record.summary()

    def listShells(self, request: Request) -> dict[str, Any]:
        return {"shells": [session.record.summary() for session in self._shells.values()]}

    def actions(self) -> list[Action]:
        return [
            Action("open_shell", self.openShell),
            Action("read_shell", self.readShell),
            Action("write_shell", self.writeShell),
            Action("signal_shell", self.signalShell),
            Action("close_shell", self.closeShell),
            Action("resize_shell", self.resizeShell),
            Action("list_shells", self.listShells),
        ]


class ShellsCapability:
    """The shell actions; the L{Shells} registry is its service, closing shells at stop."""

    features: tuple[str, ...] = ()

    def __init__(self, context: AgentContext) -> None:
        self.service = Shells(context)
        self.actions = self.service.actions()


__all__ = [
    "SIGNALS",
    "PTYTerminal",
    "Shell",
    "ShellCore",
    "ShellMachine",
    "ShellOutput",
    "ShellRecord",
    "Shells",
    "ShellsCapability",
    "Terminal",
    "shellArgv",
    "shellEnvironment",
]

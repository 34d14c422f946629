"""Attaching the local terminal to an agent shell (the CLI's ``shell`` command).

The terminal goes to raw mode; every keystroke goes to the shell with ``write_shell``
(``append_newline: false``, one request in flight at a time, in order); output is followed with
``read_shell`` from a cursor, waiting on the agent's side (``wait_ms``) when it supports that
and polling gently when it does not; the window size is sent at the start and on every SIGWINCH
with ``resize_shell``. Ctrl-] detaches (the shell keeps running in the guest); the shell's own
end ends the session with its exit code.

The terminal's settings are restored whatever happens: on the way out of ``attach`` (detach,
shell exit, agent error, cancellation), and by a reactor shutdown trigger and an ``atexit``
hook for a SIGTERM or an exception that unwinds past it.

Keystrokes are read by a reactor reader on the terminal's descriptor, left in blocking mode
(a raw terminal reports readable only with bytes to read). Output is written to the terminal
with blocking writes: a terminal drains fast, and leaving the descriptors' flags untouched
means the user's shell finds its terminal exactly as it was.
"""

from __future__ import annotations

import atexit
import codecs
import os
import select
import signal
import termios
import tty
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.client.api import AgentClient
from pyro_reactor.client.errors import AgentError

DETACH_KEY = b"\x1d"  # Ctrl-]
DETACH_KEY_NAME = "Ctrl-]"


@dataclass(frozen=True)
class SessionEnd:
    """How an attached session ended: detached (shell still running) or the shell exited."""

    detached: bool
    exitCode: int | None
    cursor: int


def terminalSize(fd: int) -> tuple[int, int]:
    """``(cols, rows)`` of the terminal on ``fd`` (80x24 when it cannot say)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


def writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


@implementer(IReadDescriptor)
class _KeyReader:
    def __init__(self, session: TerminalSession) -> None:
        self.session = session

    def fileno(self) -> int:
        return self.session.inputFd

    def doRead(self) -> None:
        try:
            data = os.read(self.session.inputFd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            self.session.keysTyped(data)
        else:
            self.session.inputClosed()
        return None

    def connectionLost(self, reason: Failure) -> None:
        return None

    def logPrefix(self) -> str:
        return "terminal"


class TerminalSession:
    """One attachment of a terminal (``inputFd``/``outputFd``) to the agent shell ``shellId``."""

    def __init__(
        self,
        reactor: Any,
        client: AgentClient,
        shellId: str,
        inputFd: int,
        outputFd: int,
        *,
        cursor: int = 0,
        waitMs: int | None = 500,
        resize: bool = True,
        pollInterval: float = 0.05,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.shellId = shellId
        self.inputFd = inputFd
        self.outputFd = outputFd
        self.cursor = cursor
        self.waitMs = waitMs
        self.resize = resize
        self.pollInterval = pollInterval
        self._done: Deferred[SessionEnd] = Deferred()
        self._finished = False
        self._pending = b""
        self._writing = False
        self._detachRequested = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._reading: Deferred[Any] | None = None
        self._saved: list[Any] | None = None
        self._resizing = False
        self._resizeAgain = False

    # -- the whole session ---------------------------------------------------------------

    async def attach(self) -> SessionEnd:
        reader = _KeyReader(self)
        self._saved = termios.tcgetattr(self.inputFd)
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.restoreTerminal)
        atexit.register(self.restoreTerminal)
        previous = signal.signal(signal.SIGWINCH, self._windowChanged)
        try:
            tty.setraw(self.inputFd, termios.TCSANOW)
            self.reactor.addReader(reader)
            if self.resize:
                self._sendSize()
            following = Deferred.fromCoroutine(self._follow())
            following.addErrback(self._fail)
            return await self._done
        finally:
            self._finished = True
            self.reactor.removeReader(reader)
            signal.signal(signal.SIGWINCH, previous)
            if self._reading is not None:
                self._reading.cancel()
            self.restoreTerminal()
            self.reactor.removeSystemEventTrigger(trigger)
            atexit.unregister(self.restoreTerminal)

    def restoreTerminal(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.inputFd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass

    def _end(self, end: SessionEnd) -> None:
        if not self._done.called:
            self._finished = True
            self._done.callback(end)

    def _fail(self, reason: Failure) -> None:
        if not self._done.called:
            self._finished = True
            self._done.errback(reason)

    # -- output --------------------------------------------------------------------------

    async def _follow(self) -> None:
        while not self._finished:
            self._reading = self.client.readShell(
                self.shellId, self.cursor, maxChars=65536, waitMs=self.waitMs
            )
            try:
                read = await self._reading
            except CancelledError:
                if self._finished:
                    return
                raise
            finally:
                self._reading = None
            if self._finished:
                return
            if read.output:
                writeAll(self.outputFd, read.output.encode("utf-8"))
            self.cursor = read.nextCursor
            if not read.shell.running and not read.output and not read.truncated:
                self._end(SessionEnd(False, read.shell.exitCode, self.cursor))
                return
            if not read.output:
                # An agent without wait_ms answers at once: do not spin.
                await deferLater(self.reactor, self.pollInterval, lambda: None)

    # -- input ---------------------------------------------------------------------------

    def keysTyped(self, data: bytes) -> None:
        if self._finished:
            return
        before, detach, _ = data.partition(DETACH_KEY)
        self._pending += before
        if detach:
            self._detachRequested = True
        self._flush()

    def inputClosed(self) -> None:
        self._detachRequested = True
        self._flush()

    def _flush(self) -> None:
        if self._writing:
            return
        text = self._decoder.decode(self._pending)
        self._pending = b""
        if not text:
            if self._detachRequested:
                self._end(SessionEnd(True, None, self.cursor))
            return
        self._writing = True
        writing = self.client.writeShell(self.shellId, text, appendNewline=False)
        writing.addCallbacks(self._written, self._writeFailed)

    def _written(self, _: object) -> None:
        self._writing = False
        self._flush()

    def _writeFailed(self, reason: Failure) -> None:
        self._writing = False
        if reason.check(AgentError) and "is not running" in str(reason.value):
            return  # the shell has ended: the output loop reports its exit
        self._fail(reason)

    # -- window size ---------------------------------------------------------------------

    def _windowChanged(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._sendSize)

    def _sendSize(self) -> None:
        if self._finished:
            return
        if self._resizing:
            self._resizeAgain = True
            return
        self._resizing = True
        cols, rows = terminalSize(self.inputFd)
        resizing = self.client.resizeShell(self.shellId, cols, rows)

        def sent(result: object) -> None:
            self._resizing = False
            if self._resizeAgain:
                self._resizeAgain = False
                self._sendSize()

        def failed(reason: Failure) -> None:
            sent(None)
            self._fail(reason)

        resizing.addCallbacks(sent, failed)

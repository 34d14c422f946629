"""The shell machine and its output stream, without processes: a fake terminal and a Clock."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.inputqueue import InputQueue
from pyro_reactor.capabilities.shells import (
    CLOSE_TIMEOUT_SECONDS,
    EXIT_GRACE_SECONDS,
    KILL_TIMEOUT_SECONDS,
    ShellCore,
    ShellInput,
    ShellMachine,
    ShellOutput,
    ShellRecord,
)
from pyro_reactor.capabilities.shells.redact import MASK
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.budget import BudgetExceeded, MemoryBudget


class FakeTerminal:
    """Records what the machine does to the terminal."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.queued = 0

    def write(self, data: bytes) -> None:
        self.events.append(("write", data))

    def sendSignal(self, name: str) -> None:
        self.events.append(("signal", name))

    def resize(self, cols: int, rows: int) -> None:
        self.events.append(("resize", cols, rows))

    def hangUp(self) -> None:
        self.events.append(("hangUp",))

    def killSession(self) -> None:
        self.events.append(("killSession",))

    def endRemains(self) -> None:
        self.events.append(("endRemains",))


def syncThread(function: Callable[..., str], *args: Any) -> Deferred[str]:
    return succeed(function(*args))


class MachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.clock = Clock()
        self.clock.advance(1000)
        self.terminal = FakeTerminal()
        self.output = ShellOutput(self.root / "s.log", ["hunter2"], 1024, self.clock)
        self.addCleanup(self.output.closeLog)
        self.record = ShellRecord("s", "/workspace", 80, 24, 1000.0, path=self.root / "s.json")
        self.core = ShellCore(self.record, self.terminal, self.output, self.clock)
        self.shell: ShellInput = ShellMachine(self.core)

    def saved(self) -> dict[str, Any]:
        loaded = json.loads((self.root / "s.json").read_text())
        assert isinstance(loaded, dict)
        return loaded

    def assertNotRunning(self, call: Callable[[], object]) -> None:
        error = self.assertRaises(ActionError, call)
        self.assertEqual(str(error), "shell s is not running")

    def closeDeferred(self) -> tuple[Deferred[None], list[None]]:
        fired: list[None] = []
        closing = self.shell.close()
        closing.addCallback(fired.append)
        return closing, fired

    def test_machineAnswersWhetherAndWhenItIsClosed(self) -> None:
        """The registry asks the machine (no flags beside it): ``closeRequested`` per state,
        and ``whenClosed`` fires with the transition into ``closed``."""
        self.assertFalse(self.shell.closeRequested())
        closedWaiter: list[None] = []
        self.shell.whenClosed().addCallback(closedWaiter.append)
        self.shell.close()
        self.assertTrue(self.shell.closeRequested())
        self.clock.advance(CLOSE_TIMEOUT_SECONDS)
        self.assertTrue(self.shell.closeRequested())
        self.assertEqual(closedWaiter, [])
        self.shell._ended()
        self.assertEqual(closedWaiter, [None])
        self.assertTrue(self.shell.closeRequested())
        self.assertIsNone(self.successResultOf(self.shell.whenClosed()))

    def test_exitedShellIsNotClosingUntilClosed(self) -> None:
        """A shell that exited by itself is still listed (not closing) until closed."""
        self.shell._exited(0)
        self.assertFalse(self.shell.closeRequested())
        self.shell._ended()
        self.assertFalse(self.shell.closeRequested())
        waiting = self.shell.whenClosed()
        self.assertNoResult(waiting)
        self.shell.close()
        self.successResultOf(waiting)

    def test_inputBeyondTheQueueBoundIsRefused(self) -> None:
        """Input is refused with a clear error once the shell has too much of it unread."""
        self.core.maxQueuedInput = 100
        self.shell.write(b"x" * 60)
        self.terminal.queued = 60
        error = self.assertRaises(ActionError, self.shell.write, b"y" * 41)
        self.assertIn("60 bytes are still waiting to be read, and at most 100", str(error))
        self.shell.write(b"y" * 40)
        self.assertEqual(len(self.terminal.events), 2)

    # running

    def test_runningPassesInputSignalsAndSizeToTheTerminal(self) -> None:
        """A running shell hands input, signals and sizes to its terminal; the size is saved."""
        self.shell.write(b"ls\n")
        self.shell.sendSignal("INT")
        self.shell.resize(100, 40)
        self.assertEqual(
            self.terminal.events, [("write", b"ls\n"), ("signal", "INT"), ("resize", 100, 40)]
        )
        self.assertEqual((self.record.cols, self.record.rows), (100, 40))
        self.assertEqual((self.saved()["cols"], self.saved()["rows"]), (100, 40))

    def test_outputIsCollectedAndRedacted(self) -> None:
        """Terminal bytes become redacted output; a secret split over two reads is never shown."""
        self.shell._received(b"pass: hun")
        self.assertEqual(self.output.window.slice(0, self.output.length), "pass: ")
        self.shell._received(b"ter2\r\n")
        self.assertEqual(self.output.window.slice(0, self.output.length), f"pass: {MASK}\r\n")

    # the shell exits by itself

    def test_exitThenEndStopsWithTheExitCode(self) -> None:
        """Exit then end: the shell is stopped with its exit code, and its last output is kept."""
        self.shell._exited(3)
        self.assertEqual(self.record.state, "running")
        self.assertIsNone(self.record.exitCode)
        self.assertNotRunning(lambda: self.shell.write(b"x"))
        self.shell._received(b"last words")
        self.clock.advance(0.25)
        self.shell._ended()
        self.assertEqual(self.record.state, "stopped")
        self.assertEqual(self.record.exitCode, 3)
        self.assertEqual(self.record.endedAt, 1000.25)
        self.assertEqual(self.saved()["state"], "stopped")
        self.assertEqual(self.saved()["exit_code"], 3)
        self.assertTrue(self.output.ended)
        self.assertEqual(self.output.window.slice(0, self.output.length), "last words")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.terminal.events, [])

    def test_terminalHeldOpenAfterExitIsHungUpAfterTheGrace(self) -> None:
        """A background job holding the terminal after exit is cut off after the grace."""
        self.shell._exited(0)
        self.clock.advance(EXIT_GRACE_SECONDS)
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._ended()
        self.assertEqual(self.record.state, "stopped")
        self.assertEqual(self.record.exitCode, 0)

    def test_endWithoutExitStillStops(self) -> None:
        """A terminal closing without an exit status still stops the shell."""
        self.shell._ended()
        self.assertEqual(self.record.state, "stopped")
        self.assertIsNone(self.record.exitCode)

    def test_exitedShellRefusesInputSignalsAndResize(self) -> None:
        """An exited shell answers input, signals and resizing with the reference's error."""
        self.shell._exited(0)
        self.shell._ended()
        self.assertNotRunning(lambda: self.shell.write(b"x"))
        self.assertNotRunning(lambda: self.shell.sendSignal("TERM"))
        self.assertNotRunning(lambda: self.shell.resize(1, 1))

    def test_lateEventsAfterExitAreIgnored(self) -> None:
        """Events after the end (late output, a second exit, old timers) change nothing."""
        self.shell._exited(0)
        self.shell._ended()
        length = self.output.length
        self.shell._received(b"too late")
        self.shell._exited(9)
        self.shell._ended()
        self.shell._graceElapsed()
        self.shell._timedOut()
        self.assertEqual(self.output.length, length)
        self.assertEqual(self.record.exitCode, 0)

    def test_closeAfterExitFiresAtOnce(self) -> None:
        """Closing an exited shell fires at once, ending what it left in its session."""
        self.shell._exited(0)
        self.shell._ended()
        _, fired = self.closeDeferred()
        self.assertEqual(fired, [None])
        self.assertEqual(self.terminal.events, [("endRemains",)])

    # close

    def test_closeHangsUpAndFiresWhenTheShellHasEnded(self) -> None:
        """Close hangs up and fires once the shell has ended; leftovers are then killed."""
        _, fired = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.assertEqual(fired, [])
        self.assertNotRunning(lambda: self.shell.write(b"x"))
        self.shell._exited(-1)
        self.assertEqual(fired, [])
        self.shell._ended()
        self.assertEqual(fired, [None])
        self.assertEqual(self.terminal.events, [("hangUp",), ("endRemains",)])
        self.assertEqual(self.record.state, "stopped")
        self.assertEqual(self.record.exitCode, -1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_secondCloseWaitsForTheSameEnd(self) -> None:
        """A second close while closing waits for the same end; a close after it fires at once."""
        _, first = self.closeDeferred()
        _, second = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._exited(-1)
        self.shell._ended()
        self.assertEqual((first, second), ([None], [None]))
        _, third = self.closeDeferred()
        self.assertEqual(third, [None])

    def test_closeTimeoutKillsTheSession(self) -> None:
        """A shell not gone within the close timeout has everything it started killed."""
        _, fired = self.closeDeferred()
        self.clock.advance(CLOSE_TIMEOUT_SECONDS - 0.1)
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.clock.advance(0.1)
        self.assertEqual(self.terminal.events, [("hangUp",), ("killSession",)])
        self.assertEqual(fired, [])
        self.assertNotRunning(lambda: self.shell.sendSignal("KILL"))
        self.shell._exited(-9)
        self.shell._ended()
        self.assertEqual(fired, [None])
        self.assertEqual(self.record.exitCode, -9)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shellNeverReapedIsGivenUpOn(self) -> None:
        """A shell never reaped after SIGKILL is given up on; late events are then ignored."""
        _, fired = self.closeDeferred()
        self.clock.advance(CLOSE_TIMEOUT_SECONDS)
        self.clock.advance(KILL_TIMEOUT_SECONDS)
        self.assertEqual(fired, [None])
        self.assertEqual(self.record.state, "stopped")
        self.assertTrue(self.output.ended)
        # The process may still be reaped later: that is a late event, not an error.
        self.shell._exited(-9)
        self.shell._ended()
        self.shell._received(b"x")

    def test_closeWhileExitingCancelsTheGrace(self) -> None:
        """Closing during the exit grace replaces the grace timer with the close timer."""
        self.shell._exited(0)
        _, fired = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [1005.0])
        self.shell._ended()
        self.assertEqual(fired, [None])
        self.assertEqual(self.record.exitCode, 0)

    def test_outputDuringCloseIsKept(self) -> None:
        """Output arriving while the shell closes is kept."""
        self.closeDeferred()
        self.shell._received(b"bye")
        self.shell._ended()
        self.assertEqual(self.output.window.slice(0, self.output.length), "bye")

    def test_closeFinishesHeldBackText(self) -> None:
        """At the end, text held back as a possible secret start is released."""
        self.shell._received(b"almost hunt")
        self.assertEqual(self.output.length, len("almost "))
        self.closeDeferred()
        self.shell._ended()
        self.assertEqual(self.output.window.slice(0, self.output.length), "almost hunt")

    def driveTo(self, state: str) -> None:
        """Put the machine in ``state`` through the inputs that lead there."""
        if state == "exiting":
            self.shell._exited(0)
        elif state in ("closing", "killing", "closed"):
            self.shell.close()
            if state == "killing":
                self.clock.advance(CLOSE_TIMEOUT_SECONDS)
            elif state == "closed":
                self.shell._ended()
        elif state == "exited":
            self.shell._exited(0)
            self.shell._ended()

    def test_everyStateButRunningRefusesInputSignalsAndResize(self) -> None:
        """Every state but running refuses input, signals and resizing, terminal untouched."""
        for state in ("exiting", "closing", "killing", "exited", "closed"):
            self.setUp()
            self.driveTo(state)
            events = list(self.terminal.events)
            self.assertNotRunning(lambda: self.shell.write(b"x"))
            self.assertNotRunning(lambda: self.shell.sendSignal("INT"))
            self.assertNotRunning(lambda: self.shell.resize(10, 10))
            self.assertEqual(self.terminal.events, events, state)

    def test_whileKillingOutputIsKeptAndClosesShareTheEnd(self) -> None:
        """While killing, output is kept and every close fires at the end."""
        _, first = self.closeDeferred()
        self.clock.advance(CLOSE_TIMEOUT_SECONDS)
        _, second = self.closeDeferred()
        self.shell._received(b"dying words")
        self.shell._graceElapsed()
        self.shell._ended()
        self.assertEqual((first, second), ([None], [None]))
        self.assertEqual(self.output.window.slice(0, self.output.length), "dying words")

    def test_lateGraceWhileClosingIsIgnored(self) -> None:
        """A grace timer firing late while closing does nothing."""
        _, fired = self.closeDeferred()
        self.shell._graceElapsed()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._ended()
        self.assertEqual(fired, [None])

    def test_readersWaitingForOutputAreWokenByTheEnd(self) -> None:
        """A reader woken by the end sees the final state and the released text."""
        woken: list[tuple[str, int]] = []
        waiting = self.output.waitBeyond(0, 30)
        waiting.addCallback(lambda _: woken.append((self.record.state, self.output.length)))
        self.shell._received(b"held: hunt")
        self.assertEqual(woken, [("running", len("held: "))])
        waiting = self.output.waitBeyond(len("held: "), 30)
        waiting.addCallback(lambda _: woken.append((self.record.state, self.output.length)))
        self.shell._exited(0)
        self.assertEqual(len(woken), 1)
        self.shell._ended()
        # The reader woken by the end sees the final state and the released text at once.
        self.assertEqual(woken[1], ("stopped", len("held: hunt")))


class OutputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.clock = Clock()

    def makeOutput(self, secrets: list[str], window: int, logBytes: int = 1 << 30) -> ShellOutput:
        output = ShellOutput(self.root / "o.log", secrets, window, self.clock, logBytes)
        self.addCleanup(output.closeLog)
        return output

    def readAll(self, output: ShellOutput, start: int = 0, limit: int = 1 << 30) -> str:
        result = output.read(start, output.length, syncThread, limit)
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def test_characterSplitAcrossReadsIsDecodedWhole(self) -> None:
        """A UTF-8 character cut between two reads of the terminal comes out whole."""
        output = self.makeOutput([], 100)
        data = "é€😀".encode()
        for index in range(len(data)):
            output.feed(data[index : index + 1])
        self.assertEqual(self.readAll(output), "é€😀")

    def test_invalidBytesBecomeReplacementCharacters(self) -> None:
        """Bytes that are not UTF-8 (and a truncated character at the end) become U+FFFD."""
        output = self.makeOutput([], 100)
        output.feed(b"a\xffb\xe2\x82")
        output.finish()
        self.assertEqual(self.readAll(output), "a\ufffdb\ufffd")

    def test_memoryIsBoundedAndOlderOutputComesFromTheLog(self) -> None:
        """The window keeps at most its bytes; any older range is read exactly from the log."""
        output = self.makeOutput(["SECRET"], 1000)
        expected = []
        for index in range(8000):
            piece = f"line {index} é SECRET\r\n"
            output.feed(piece.encode())
            expected.append(piece.replace("SECRET", MASK))
        text = "".join(expected)
        self.assertEqual(output.length, len(text))
        self.assertLessEqual(output.window.bytes, 1000)
        self.assertGreater(output.windowStart, 0)
        # A read below the window goes to the log (a Deferred), and every range is exact.
        self.assertIsInstance(output.read(0, 10, syncThread, 1 << 20), Deferred)
        for start in (0, 1, 70_000, 131_072, output.windowStart - 5, output.windowStart):
            result = output.read(start, min(start + 5000, output.length), syncThread, 1 << 20)
            got = self.successResultOf(result) if isinstance(result, Deferred) else result
            self.assertEqual(got, text[start : start + 5000])
        self.assertEqual((self.root / "o.log").read_bytes().decode(), text)

    def test_windowIsBoundedInBytesNotCharacters(self) -> None:
        """Four-byte characters fill the window four times faster than ASCII: the bound is
        memory, so many shells' windows cannot add up past their shares."""
        output = self.makeOutput([], 64 * 1024)
        for _ in range(64):
            output.feed(("😀" * 4096).encode())
        self.assertLessEqual(output.window.bytes, 64 * 1024)
        self.assertLess(output.length - output.windowStart, 16 * 1024)
        self.assertEqual(self.readAll(output), "😀" * 4096 * 64)

    def test_readIsCutToItsEncodedSize(self) -> None:
        """A read keeps at most ``limit`` bytes of JSON-encoded text, from memory or the log:
        an emoji is 12 bytes in an answer (``\\ud83d\\ude00``), an ASCII letter 1."""
        output = self.makeOutput([], 1 << 20)
        output.feed(("ab" + "😀" * 100).encode())
        self.assertEqual(self.readAll(output, limit=2 + 12 * 10 + 11), "ab" + "😀" * 10)
        small = self.makeOutput([], 10)
        small.feed(("😀" * 100).encode())
        self.assertEqual(self.readAll(small, limit=120), "😀" * 10)

    def test_logIsRotatedOnceAndTheTailStaysReadable(self) -> None:
        """Past ``logBytes`` the log becomes ``.log.1`` and a fresh one starts: at most twice
        the cap is on disk, reads span both files, and older output is skipped by ``first``."""
        output = self.makeOutput([], 100, logBytes=1000)
        pieces = [f"{index:04d}{'x' * 96}\n" for index in range(50)]
        for piece in pieces:
            output.feed(piece.encode())
        text = "".join(pieces)
        current = (self.root / "o.log").read_bytes()
        old = (self.root / "o.log.1").read_bytes()
        self.assertLessEqual(len(current), 1000)
        self.assertLessEqual(len(old), 1000)
        self.assertTrue(text.endswith((old + current).decode()))
        self.assertEqual(output.first, len(text) - len(old) - len(current))
        self.assertEqual(self.readAll(output, output.first), (old + current).decode())
        middle = output.first + len(old) - 50
        got = self.successResultOf(output.read(middle, middle + 100, syncThread, 1 << 20))  # type: ignore[arg-type]
        self.assertEqual(got, text[middle : middle + 100])

    def test_logFollowsTheStreamAgainAfterAFailedWrite(self) -> None:
        """A write failing (full disk) breaks the log; the next append starts it afresh at
        its position, older log output is dropped, and reads line up with the stream."""
        output = self.makeOutput([], 10)
        output.feed(b"a" * 100)
        realWrite = os.write

        def full(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", full)
        output.feed(b"b" * 100)
        self.assertTrue(output.log.broken)
        error = self.assertRaises(ActionError, output.read, 0, 50, syncThread, 1 << 20)
        self.assertIn("could not be written", str(error))
        self.patch(os, "write", realWrite)
        output.feed(b"c" * 100)
        self.assertFalse(output.log.broken)
        self.assertEqual(output.first, 200)
        self.assertEqual((self.root / "o.log").read_text(), "c" * 100)
        self.assertEqual(self.readAll(output, 200), "c" * 100)

    def test_logHoldsOnlyRedactedText(self) -> None:
        """The log on disk holds the redacted stream, never the secret."""
        output = self.makeOutput(["hunter2"], 100)
        output.feed(b"pw=hunt")
        output.feed(b"er2 done")
        output.finish()
        self.assertEqual((self.root / "o.log").read_text(), f"pw={MASK} done")

    def test_multiLineSecretIsRedactedInTheLogDespiteOnlcr(self) -> None:
        """A PEM-like secret with ``\\n`` shows on a terminal with ``\\r\\n``: it is redacted
        in reads and in the log all the same."""
        key = "-----BEGIN KEY-----\nAAAA\nBBBB\n-----END KEY-----"
        output = self.makeOutput([key], 1000)
        shown = key.replace("\n", "\r\n") + "\r\n"
        output.feed(b"$ cat key.pem\r\n")
        for index in range(0, len(shown), 7):
            output.feed(shown[index : index + 7].encode())
        output.finish()
        self.assertEqual(self.readAll(output), f"$ cat key.pem\r\n{MASK}\r\n")
        self.assertNotIn("AAAA", (self.root / "o.log").read_text())

    def test_reusedIdStartsAFreshLog(self) -> None:
        """A shell reusing an id starts with an empty log, not the earlier shell's."""
        first = self.makeOutput([], 100)
        first.feed(b"old shell")
        first.finish()
        second = self.makeOutput([], 100)
        second.feed(b"new")
        self.assertEqual((self.root / "o.log").read_text(), "new")

    def test_waitingReaderWokenByOutputOrTimeout(self) -> None:
        """A waiting reader is woken by new output (its timer removed) or by its timeout."""
        output = self.makeOutput([], 100)
        woken: list[None] = []
        output.waitBeyond(0, 2.0).addCallback(woken.append)
        output.feed(b"x")
        self.assertEqual(woken, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        late: list[None] = []
        output.waitBeyond(1, 2.0).addCallback(late.append)
        self.clock.advance(1.9)
        self.assertEqual(late, [])
        self.clock.advance(0.1)
        self.assertEqual(late, [None])

    def test_cancelledWaitLeavesNoWaiterNorTimer(self) -> None:
        """Cancelling a wait (its client went away) removes the waiter and its timer."""
        output = self.makeOutput([], 100)
        waiting = output.waitBeyond(0, 30.0)
        self.assertEqual((len(output.waiters), len(self.clock.getDelayedCalls())), (1, 1))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual((len(output.waiters), self.clock.getDelayedCalls()), (0, []))
        output.feed(b"x")  # nothing left to wake

    def test_heldBackSecretPrefixDoesNotWakeReaders(self) -> None:
        """Text held back as a possible secret start is not output yet: nobody is woken."""
        output = self.makeOutput(["hunter2"], 100)
        woken: list[None] = []
        output.waitBeyond(0, 2.0).addCallback(woken.append)
        output.feed(b"hunt")
        self.assertEqual((output.length, woken), (0, []))
        output.feed(b"er2")
        self.assertEqual((output.length, woken), (len(MASK), [None]))


class FakeConsumer:
    """A transport that pauses its producer past ``bufferSize`` held bytes, as Twisted's
    file descriptors do, and drains on demand."""

    bufferSize = 64 * 1024

    def __init__(self) -> None:
        self.held = 0
        self.written = 0
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.held += len(data)
        if self.held > self.bufferSize and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.written += self.held
        self.held = 0
        if self.producer is not None:
            self.producer.resumeProducing()


class InputQueueTests(SynchronousTestCase):
    def test_transportHoldsLittleAndTheQueueCountsTheRest(self) -> None:
        """Input goes to the transport a piece at a time until it pauses us; the rest is
        queued and counted, and flows on as the transport drains."""
        consumer = FakeConsumer()
        queue = InputQueue(consumer)  # type: ignore[arg-type]
        queue.write(b"x" * 1_000_000)
        self.assertLessEqual(consumer.held, 2 * InputQueue.piece)
        self.assertEqual(queue.queued + consumer.held, 1_000_000)
        while queue.queued:
            consumer.drain()
        consumer.drain()
        self.assertEqual(consumer.written, 1_000_000)

    def test_dropForgetsWhatIsQueued(self) -> None:
        """Closing the terminal drops queued input and stops producing."""
        consumer = FakeConsumer()
        queue = InputQueue(consumer)  # type: ignore[arg-type]
        queue.write(b"x" * 500_000)
        queue.drop()
        self.assertEqual(queue.queued, 0)
        held = consumer.held
        consumer.drain()
        self.assertEqual(consumer.written, held)


class BudgetTests(SynchronousTestCase):
    """Queued input and output windows draw from the agent's one memory budget."""

    def test_queuedInputIsHeldFromTheBudget(self) -> None:
        """Queued input holds its bytes from the budget; a write that does not fit is refused
        whole, and draining or dropping gives the bytes back."""
        budget = MemoryBudget(300_000)
        consumer = FakeConsumer()
        queue = InputQueue(consumer, budget.reserve(0, "input queued for shell 's'"))  # type: ignore[arg-type]
        queue.write(b"x" * 250_000)
        self.assertEqual(budget.used, queue.queued)
        error = self.assertRaises(BudgetExceeded, queue.write, b"y" * 200_000)
        self.assertIn("input queued for shell 's'", str(error))
        self.assertEqual(budget.used, queue.queued)
        consumer.drain()
        self.assertEqual(budget.used, queue.queued)
        queue.drop()
        self.assertEqual(budget.used, 0)

    def test_windowShrinksToWhatTheBudgetHolds(self) -> None:
        """A window whose budget is short holds less (the log has the rest); closing the
        output gives its bytes back."""
        budget = MemoryBudget(20_000)
        root = Path(self.mktemp())
        root.mkdir()
        output = ShellOutput(
            root / "b.log", [], 1 << 20, Clock(), 1 << 30, budget.reserve(0, "the output")
        )
        for _ in range(100):
            output.feed(b"z" * 1000)
        self.assertLessEqual(output.window.bytes, 20_000)
        self.assertEqual(budget.used, output.window.bytes)
        self.assertGreater(output.windowStart, 0)
        output.closeLog()
        self.assertEqual(budget.used, 0)

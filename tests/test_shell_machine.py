"""The shell machine and its output stream, without processes: a fake terminal and a Clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.redact import MASK
from pyro_reactor.capabilities.shells import (
    CLOSE_TIMEOUT_SECONDS,
    EXIT_GRACE_SECONDS,
    KILL_TIMEOUT_SECONDS,
    Shell,
    ShellCore,
    ShellMachine,
    ShellOutput,
    ShellRecord,
)
from pyro_reactor.errors import ActionError


class FakeTerminal:
    """Records what the machine does to the terminal."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

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


def syncThread(function: Callable[..., str], *args: Any) -> Deferred[str]:
    return succeed(function(*args))


class MachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.clock = Clock()
        self.clock.advance(1000)
        self.terminal = FakeTerminal()
        self.output = ShellOutput(self.root / "s.log", ["hunter2"], windowChars=1024)
        self.addCleanup(self.output.closeLog)
        self.record = ShellRecord("s", "/workspace", 80, 24, 1000.0, path=self.root / "s.json")
        self.core = ShellCore(self.record, self.terminal, self.output, self.clock)
        self.shell: Shell = ShellMachine(self.core)

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

    # running

    def test_runningPassesInputSignalsAndSizeToTheTerminal(self) -> None:
        self.shell.write(b"ls\n")
        self.shell.sendSignal("INT")
        self.shell.resize(100, 40)
        self.assertEqual(
            self.terminal.events, [("write", b"ls\n"), ("signal", "INT"), ("resize", 100, 40)]
        )
        self.assertEqual((self.record.cols, self.record.rows), (100, 40))
        self.assertEqual((self.saved()["cols"], self.saved()["rows"]), (100, 40))

    def test_outputIsCollectedAndRedacted(self) -> None:
        self.shell._received(b"pass: hun")
        self.assertEqual(self.output.window(0, self.output.length), "pass: ")
        self.shell._received(b"ter2\r\n")
        self.assertEqual(self.output.window(0, self.output.length), f"pass: {MASK}\r\n")

    # the shell exits by itself

    def test_exitThenEndStopsWithTheExitCode(self) -> None:
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
        self.assertEqual(self.output.window(0, self.output.length), "last words")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.terminal.events, [])

    def test_terminalHeldOpenAfterExitIsHungUpAfterTheGrace(self) -> None:
        self.shell._exited(0)
        self.clock.advance(EXIT_GRACE_SECONDS)
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._ended()
        self.assertEqual(self.record.state, "stopped")
        self.assertEqual(self.record.exitCode, 0)

    def test_endWithoutExitStillStops(self) -> None:
        self.shell._ended()
        self.assertEqual(self.record.state, "stopped")
        self.assertIsNone(self.record.exitCode)

    def test_exitedShellRefusesInputSignalsAndResize(self) -> None:
        self.shell._exited(0)
        self.shell._ended()
        self.assertNotRunning(lambda: self.shell.write(b"x"))
        self.assertNotRunning(lambda: self.shell.sendSignal("TERM"))
        self.assertNotRunning(lambda: self.shell.resize(1, 1))

    def test_lateEventsAfterExitAreIgnored(self) -> None:
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
        self.shell._exited(0)
        self.shell._ended()
        _, fired = self.closeDeferred()
        self.assertEqual(fired, [None])
        self.assertEqual(self.terminal.events, [])

    # close

    def test_closeHangsUpAndFiresWhenTheShellHasEnded(self) -> None:
        _, fired = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.assertEqual(fired, [])
        self.assertNotRunning(lambda: self.shell.write(b"x"))
        self.shell._exited(-1)
        self.assertEqual(fired, [])
        self.shell._ended()
        self.assertEqual(fired, [None])
        self.assertEqual(self.record.state, "stopped")
        self.assertEqual(self.record.exitCode, -1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_secondCloseWaitsForTheSameEnd(self) -> None:
        _, first = self.closeDeferred()
        _, second = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._exited(-1)
        self.shell._ended()
        self.assertEqual((first, second), ([None], [None]))
        _, third = self.closeDeferred()
        self.assertEqual(third, [None])

    def test_closeTimeoutKillsTheSession(self) -> None:
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
        self.shell._exited(0)
        _, fired = self.closeDeferred()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [1005.0])
        self.shell._ended()
        self.assertEqual(fired, [None])
        self.assertEqual(self.record.exitCode, 0)

    def test_outputDuringCloseIsKept(self) -> None:
        self.closeDeferred()
        self.shell._received(b"bye")
        self.shell._ended()
        self.assertEqual(self.output.window(0, self.output.length), "bye")

    def test_closeFinishesHeldBackText(self) -> None:
        self.shell._received(b"almost hunt")
        self.assertEqual(self.output.length, len("almost "))
        self.closeDeferred()
        self.shell._ended()
        self.assertEqual(self.output.window(0, self.output.length), "almost hunt")

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
        for state in ("exiting", "closing", "killing", "exited", "closed"):
            self.setUp()
            self.driveTo(state)
            events = list(self.terminal.events)
            self.assertNotRunning(lambda: self.shell.write(b"x"))
            self.assertNotRunning(lambda: self.shell.sendSignal("INT"))
            self.assertNotRunning(lambda: self.shell.resize(10, 10))
            self.assertEqual(self.terminal.events, events, state)

    def test_whileKillingOutputIsKeptAndClosesShareTheEnd(self) -> None:
        _, first = self.closeDeferred()
        self.clock.advance(CLOSE_TIMEOUT_SECONDS)
        _, second = self.closeDeferred()
        self.shell._received(b"dying words")
        self.shell._graceElapsed()
        self.shell._ended()
        self.assertEqual((first, second), ([None], [None]))
        self.assertEqual(self.output.window(0, self.output.length), "dying words")

    def test_lateGraceWhileClosingIsIgnored(self) -> None:
        _, fired = self.closeDeferred()
        self.shell._graceElapsed()
        self.assertEqual(self.terminal.events, [("hangUp",)])
        self.shell._ended()
        self.assertEqual(fired, [None])

    def test_readersWaitingForOutputAreWokenByTheEnd(self) -> None:
        woken: list[tuple[str, int]] = []
        waiting = self.output.waitBeyond(0, 30, self.clock)
        waiting.addCallback(lambda _: woken.append((self.record.state, self.output.length)))
        self.shell._received(b"held: hunt")
        self.assertEqual(woken, [("running", len("held: "))])
        waiting = self.output.waitBeyond(len("held: "), 30, self.clock)
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

    def makeOutput(self, secrets: list[str], window: int) -> ShellOutput:
        output = ShellOutput(self.root / "o.log", secrets, windowChars=window)
        self.addCleanup(output.closeLog)
        return output

    def readAll(self, output: ShellOutput, start: int = 0) -> str:
        result = output.read(start, output.length, syncThread)
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def test_characterSplitAcrossReadsIsDecodedWhole(self) -> None:
        output = self.makeOutput([], 100)
        data = "é€😀".encode()
        for index in range(len(data)):
            output.feed(data[index : index + 1])
        self.assertEqual(self.readAll(output), "é€😀")

    def test_invalidBytesBecomeReplacementCharacters(self) -> None:
        output = self.makeOutput([], 100)
        output.feed(b"a\xffb\xe2\x82")
        output.finish()
        self.assertEqual(self.readAll(output), "a\ufffdb\ufffd")

    def test_memoryIsBoundedAndOlderOutputComesFromTheLog(self) -> None:
        output = self.makeOutput(["SECRET"], 1000)
        expected = []
        for index in range(8000):
            piece = f"line {index} é SECRET\r\n"
            output.feed(piece.encode())
            expected.append(piece.replace("SECRET", MASK))
        text = "".join(expected)
        self.assertEqual(output.length, len(text))
        self.assertLessEqual(output.length - output.windowStart, 1000)
        self.assertGreater(output.windowStart, 0)
        # A read below the window goes to the log (a Deferred), and every range is exact.
        self.assertIsInstance(output.read(0, 10, syncThread), Deferred)
        for start in (0, 1, 70_000, 131_072, output.windowStart - 5, output.windowStart):
            result = output.read(start, min(start + 5000, output.length), syncThread)
            got = self.successResultOf(result) if isinstance(result, Deferred) else result
            self.assertEqual(got, text[start : start + 5000])
        self.assertEqual((self.root / "o.log").read_bytes().decode(), text)

    def test_logHoldsOnlyRedactedText(self) -> None:
        output = self.makeOutput(["hunter2"], 100)
        output.feed(b"pw=hunt")
        output.feed(b"er2 done")
        output.finish()
        self.assertEqual((self.root / "o.log").read_text(), f"pw={MASK} done")

    def test_reusedIdStartsAFreshLog(self) -> None:
        first = self.makeOutput([], 100)
        first.feed(b"old shell")
        first.finish()
        second = self.makeOutput([], 100)
        second.feed(b"new")
        self.assertEqual((self.root / "o.log").read_text(), "new")

    def test_waitingReaderWokenByOutputOrTimeout(self) -> None:
        clock = Clock()
        output = self.makeOutput([], 100)
        woken: list[None] = []
        output.waitBeyond(0, 2.0, clock).addCallback(woken.append)
        output.feed(b"x")
        self.assertEqual(woken, [None])
        self.assertEqual(clock.getDelayedCalls(), [])
        late: list[None] = []
        output.waitBeyond(1, 2.0, clock).addCallback(late.append)
        clock.advance(1.9)
        self.assertEqual(late, [])
        clock.advance(0.1)
        self.assertEqual(late, [None])

    def test_heldBackSecretPrefixDoesNotWakeReaders(self) -> None:
        clock = Clock()
        output = self.makeOutput(["hunter2"], 100)
        woken: list[None] = []
        output.waitBeyond(0, 2.0, clock).addCallback(woken.append)
        output.feed(b"hunt")
        self.assertEqual((output.length, woken), (0, []))
        output.feed(b"er2")
        self.assertEqual((output.length, woken), (len(MASK), [None]))

"""The readiness probe machine, driven by a fake check and a L{Clock}: no sockets, no processes.

Except L{CommandCheckTests}: the real ``command`` check, with real processes.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.services._probe_machine import ProbeCore, ProbeInput, ProbeMachine
from pyro_reactor.capabilities.services.readiness import commandCheck, parseReadiness
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import WorkingDirectory, Workspace
from tests.helpers import reactor, waitUntil


class FakeCheck:
    """A check whose every run is a Deferred the test fires (or a canned result)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []
        self.canned: list[Deferred[bool]] = []
        self.cancelled: list[Deferred[bool]] = []

    def __call__(self) -> Deferred[bool]:
        if self.canned:
            return self.canned.pop(0)
        result: Deferred[bool] = Deferred(self.cancelled.append)
        self.pending.append(result)
        return result

    @property
    def runs(self) -> int:
        return len(self.pending)


class ProbeMachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.check = FakeCheck()
        self.events: list[str] = []
        self.core = ProbeCore(
            clock=self.clock,
            check=self.check,
            interval=0.1,
            timeout=1.0,
            onReady=lambda: self.events.append("ready"),
            onTimeout=lambda: self.events.append("timeout"),
        )
        self.probe: ProbeInput = ProbeMachine(self.core)

    def assertQuiet(self) -> None:
        """No timer is left behind."""
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_firstCheckRunsAtOnce(self) -> None:
        """Starting runs the first check at once, and nothing is reported yet."""
        self.probe.start()
        self.assertEqual(self.check.runs, 1)
        self.assertEqual(self.events, [])

    def test_passingCheckMeansReady(self) -> None:
        """A check that passes makes the probe ready, and no timer is left."""
        self.probe.start()
        self.check.pending[0].callback(True)
        self.assertEqual(self.events, ["ready"])
        self.assertQuiet()

    def test_synchronousPassIsReadyAtOnce(self) -> None:
        """A check that has already passed when it returns makes the probe ready within start."""
        self.check.canned.append(succeed(True))
        self.probe.start()
        self.assertEqual(self.events, ["ready"])
        self.assertQuiet()

    def test_failedCheckIsRetriedAfterTheInterval(self) -> None:
        """A failed check is run again only once the interval has passed."""
        self.probe.start()
        self.check.pending[0].callback(False)
        self.clock.advance(0.05)
        self.assertEqual(self.check.runs, 1)
        self.clock.advance(0.05)
        self.assertEqual(self.check.runs, 2)
        self.check.pending[1].callback(True)
        self.assertEqual(self.events, ["ready"])
        self.assertEqual(self.core.attempts, 2)
        self.assertQuiet()

    def test_brokenCheckCountsAsNotReady(self) -> None:
        """A check that fails with an error counts as not ready and is retried."""
        self.check.canned.append(fail(OSError("connection refused")))
        self.probe.start()
        self.assertEqual(self.events, [])
        self.clock.advance(0.1)
        self.assertEqual(self.check.runs, 1)

    def test_checkRaisingCountsAsNotReady(self) -> None:
        """A check that raises counts as not ready: the retry and the deadline stay pending."""

        def broken() -> Deferred[bool]:
            raise RuntimeError("boom")

        self.core.check = broken
        self.probe.start()
        self.assertEqual(self.events, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # retry and deadline

    def test_deadlineWhileWaiting(self) -> None:
        """The deadline passing between two checks reports the timeout once and stops polling."""
        runs: list[None] = []

        def notYet() -> Deferred[bool]:
            runs.append(None)
            return succeed(False)

        self.core.check = notYet
        self.core.interval = 0.3
        self.probe.start()
        self.clock.pump([0.3, 0.3, 0.3])
        self.assertEqual((len(runs), self.events), (4, []))
        self.clock.advance(0.2)
        self.assertEqual(self.events, ["timeout"])
        self.clock.advance(5)
        self.assertEqual(len(runs), 4)
        self.assertQuiet()

    def test_checkAnsweringAfterTheDeadlineIsIgnored(self) -> None:
        """A slow check is cancelled at the deadline; its answer afterwards changes nothing.

        Like a command check (runCommand cannot be cancelled), the Deferred has no canceller:
        the command's real result comes later anyway.
        """
        slow: Deferred[bool] = Deferred()
        self.check.canned.append(slow)
        self.probe.start()
        self.clock.advance(1.0)
        self.assertEqual(self.events, ["timeout"])
        self.assertTrue(slow.called)
        slow.callback(True)  # the late answer: swallowed by the cancelled Deferred
        self.probe._passed()  # and as an input, too
        self.assertEqual(self.events, ["timeout"])
        self.assertQuiet()

    def test_stopWhileChecking(self) -> None:
        """A stop while a check runs cancels it and reports nothing."""
        self.probe.start()
        self.probe.stop()
        self.assertEqual(self.check.cancelled, self.check.pending)
        self.assertEqual(self.events, [])
        self.assertQuiet()

    def test_stopWhileWaiting(self) -> None:
        """A stop between two checks cancels the retry timer and reports nothing."""
        self.probe.start()
        self.check.pending[0].callback(False)
        self.probe.stop()
        self.clock.advance(10)
        self.assertEqual(self.check.runs, 1)
        self.assertEqual(self.events, [])
        self.assertQuiet()

    def test_stopBeforeStart(self) -> None:
        """A probe stopped before it started never runs a check."""
        self.probe.stop()
        self.probe.start()
        self.assertEqual(self.check.runs, 0)
        self.assertQuiet()

    def test_lateEventsInTerminalStatesAreIgnored(self) -> None:
        """Every input after ready, timeout or stop is ignored: no report, no check, no timer."""
        for finish in ("ready", "timeout", "stop"):
            self.events.clear()
            self.check = FakeCheck()
            self.core.check = self.check
            probe: ProbeInput = ProbeMachine(self.core)
            probe.start()
            if finish == "ready":
                self.check.pending[0].callback(True)
            elif finish == "timeout":
                self.clock.advance(1.0)
            else:
                probe.stop()
            before = list(self.events)
            for late in (
                probe.start,
                probe.stop,
                probe._tick,
                probe._passed,
                probe._failed,
                probe._expired,
            ):
                late()
            self.assertEqual(self.events, before, finish)
            self.assertEqual(self.check.runs, 1)
            self.assertQuiet()

    def test_startTwiceChecksOnce(self) -> None:
        """A second start while checking does not run a second check."""
        self.probe.start()
        self.probe.start()
        self.assertEqual(self.check.runs, 1)


class ReadinessParsingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workspace = Workspace(Path(self.mktemp()))

    def test_unsupportedType(self) -> None:
        """An unknown readiness type is refused with the reference's message."""
        error = self.assertRaises(
            ActionError, parseReadiness, {"type": "smoke-signal"}, self.workspace
        )
        self.assertEqual(str(error), "unsupported readiness type: smoke-signal")

    def test_missingType(self) -> None:
        """A readiness object without a type is refused with the reference's message."""
        error = self.assertRaises(ActionError, parseReadiness, {}, self.workspace)
        self.assertEqual(str(error), "unsupported readiness type: None")

    def test_fileMustStayInTheWorkspace(self) -> None:
        """A file path outside the workspace is refused; a relative one is under /workspace."""
        self.assertRaises(
            ActionError, parseReadiness, {"type": "file", "path": "/etc/passwd"}, self.workspace
        )
        self.assertRaises(
            ActionError,
            parseReadiness,
            {"type": "file", "path": "/workspace/../etc/passwd"},
            self.workspace,
        )
        spec = parseReadiness({"type": "file", "path": "ready"}, self.workspace)
        self.assertEqual(spec.target, "/workspace/ready")

    def test_tcpAddress(self) -> None:
        """A tcp readiness address must be HOST:PORT with a port in 1..65535 (IPv6 in brackets)."""
        spec = parseReadiness({"type": "tcp", "address": "127.0.0.1:8080"}, self.workspace)
        self.assertEqual((spec.host, spec.port), ("127.0.0.1", 8080))
        spec = parseReadiness({"type": "tcp", "address": "[::1]:80"}, self.workspace)
        self.assertEqual((spec.host, spec.port), ("::1", 80))
        for bad in ("localhost", "host:port", ":80", "host:0", "host:70000"):
            error = self.assertRaises(
                ActionError, parseReadiness, {"type": "tcp", "address": bad}, self.workspace
            )
            self.assertIn("HOST:PORT", str(error))

    def test_httpUrl(self) -> None:
        """An http readiness url must be an http:// or https:// URL with a host."""
        parseReadiness({"type": "http", "url": "http://127.0.0.1:1/x"}, self.workspace)
        for bad in ("file:///etc/passwd", "ftp://host/", "http://"):
            self.assertRaises(
                ActionError, parseReadiness, {"type": "http", "url": bad}, self.workspace
            )

    def test_missingField(self) -> None:
        """A readiness object without its field, or with a blank one, is refused."""
        error = self.assertRaises(ActionError, parseReadiness, {"type": "command"}, self.workspace)
        self.assertEqual(str(error), "readiness command must be a string")
        error = self.assertRaises(
            ActionError, parseReadiness, {"type": "command", "command": " "}, self.workspace
        )
        self.assertEqual(str(error), "readiness command is required")


class CommandCheckTests(TestCase):
    """The ``command`` check runs in the directory it opened, and lets it go only once the
    command has exited, even when the probe stopped waiting (its deadline) before that."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        (base / "ws" / "sub").mkdir(parents=True)
        self.workspace = Workspace(base / "ws")
        self.opened: list[WorkingDirectory] = []
        opening = self.workspace.openWorkingDirectory

        def recordOpened(guestPath: str) -> WorkingDirectory:
            directory = opening(guestPath)
            self.opened.append(directory)
            return directory

        self.patch(self.workspace, "openWorkingDirectory", recordOpened)
        pool = ThreadPool(minthreads=0, maxthreads=2, name="command-check-test")
        pool.start()
        self.addCleanup(pool.stop)
        self.inThread = lambda f, *args: deferToThreadPool(reactor, pool, f, *args)
        self.marker = base / "ran-in"

    def check(self, command: str, cwd: str = "/workspace/sub") -> Deferred[bool]:
        check: Deferred[bool] = commandCheck(
            reactor, command, workspace=self.workspace, inThread=self.inThread, cwd=cwd, env={}
        )()
        return check

    async def test_runsInTheDirectoryAndLetsItGo(self) -> None:
        """The command runs in the opened directory, closed once it exited; exit 1 is unready."""
        ready = await self.check(f"pwd > {self.marker}")
        self.assertTrue(ready)
        self.assertEqual(self.marker.read_text().strip(), str(self.workspace.root / "sub"))
        self.assertEqual([directory.closed for directory in self.opened], [True])
        self.assertFalse(await self.check("false"))

    async def test_missingDirectoryFailsTheCheck(self) -> None:
        """A working directory that does not exist fails the check before anything runs."""
        with self.assertRaises(ActionError):
            await self.check("true", cwd="/workspace/nope")
        self.assertEqual(self.opened, [])

    async def test_cancelledCheckKeepsTheDirectoryUntilTheCommandExits(self) -> None:
        """Cancelling a check keeps its directory open until the command it started has exited."""
        pending = self.check(f"sleep 1; pwd > {self.marker}")
        self.assertTrue(await waitUntil(lambda: bool(self.opened), 15))
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        self.assertFalse(self.opened[0].closed)
        self.assertTrue(await waitUntil(lambda: self.opened[0].closed, 15))
        self.assertEqual(self.marker.read_text().strip(), str(self.workspace.root / "sub"))

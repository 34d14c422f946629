"""The job machine alone, driven with a fake core and a Clock: no process, no reactor."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.jobs._machine import JobCore, JobInputs, JobMachine


class FakeWorld:
    """Records what the machine asks of the world; collections are answered by the test."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, Any]] = []
        self.collecting: list[Deferred[dict[str, Any]]] = []

    def core(self) -> JobCore:
        return JobCore(
            clock=self.clock,
            launch=lambda: self.events.append(("launch", None)),
            collect=self.collect,
            deliver=self.deliver,
            started=lambda pid: self.events.append(("started", pid)),
            ended=lambda outcome: self.events.append(("ended", outcome)),
            forget=lambda: self.events.append(("forget", None)),
        )

    def deliver(self, signum: int) -> bool:
        self.events.append(("deliver", signum))
        return True

    def collect(self) -> Deferred[dict[str, Any]]:
        self.events.append(("collect", None))
        pending: Deferred[dict[str, Any]] = Deferred()
        self.collecting.append(pending)
        return pending


class JobMachineTests(SynchronousTestCase):
    """Each lifecycle path, and the questions asked of it in each state."""

    def setUp(self) -> None:
        self.world = FakeWorld()
        self.job: JobInputs = JobMachine(self.world.core())

    def test_wholeLife(self) -> None:
        """start → running on the pid report → ending on the runner's exit → exited once
        collected → removed; waiters fire after each transition, not inside it."""
        started = self.job.whenStarted()
        ended = self.job.whenEnded()
        self.job.start()
        self.assertEqual(self.job.state(), "running")
        self.job._started(42)
        self.world.clock.advance(0)
        self.assertIsNone(self.successResultOf(started))
        self.assertNoResult(ended)
        self.assertTrue(self.job.signal(signal.SIGTERM))
        self.job._runnerExited()
        self.assertEqual(self.job.state(), "running")  # still collecting
        self.assertFalse(self.job.remove())
        self.world.collecting[0].callback({"exit_code": 0})
        self.assertNoResult(ended)
        self.world.clock.advance(0)
        self.successResultOf(ended)
        self.assertEqual(self.job.state(), "exited")
        self.assertFalse(self.job.signal(signal.SIGTERM))
        self.assertTrue(self.job.remove())
        self.assertEqual(self.job.state(), "removed")
        self.assertFalse(self.job.remove())
        self.assertEqual(
            self.world.events,
            [
                ("launch", None),
                ("started", 42),
                ("deliver", signal.SIGTERM),
                ("collect", None),
                ("ended", {"exit_code": 0}),
                ("forget", None),
            ],
        )

    def test_endsBeforeItsPidIsReported(self) -> None:
        """A runner that dies before reporting a pid still ends the job (start waiters fire)."""
        started = self.job.whenStarted()
        self.job.start()
        self.job._runnerExited()
        self.world.clock.advance(0)
        self.successResultOf(started)
        self.job._started(5)  # a late report is ignored
        self.world.collecting[0].callback({"exit_code": None})
        self.world.clock.advance(0)
        self.assertEqual(self.job.state(), "exited")
        self.assertNotIn(("started", 5), self.world.events)

    def test_adoptedRunning(self) -> None:
        """A job re-adopted with a live runner is running; its runner's end is collected."""
        self.job.adopt()
        self.successResultOf(self.job.whenStarted())
        ended = self.job.whenEnded()
        self.job._runnerExited()
        self.world.collecting[0].callback({"exit_code": 1})
        self.world.clock.advance(0)
        self.successResultOf(ended)
        self.assertEqual(self.world.events[-1], ("ended", {"exit_code": 1}))

    def test_adoptedEnded(self) -> None:
        """A job whose runner ended while no agent ran is collected at once."""
        self.job.adoptEnded()
        self.assertEqual(self.world.events, [("collect", None)])
        self.world.collecting[0].callback({"exit_code": 2})
        self.world.clock.advance(0)
        self.assertEqual(self.job.state(), "exited")

    def test_restoredExited(self) -> None:
        """A job recorded as ended is exited straight away, with nothing collected."""
        self.job.restore()
        self.assertEqual(self.job.state(), "exited")
        self.successResultOf(self.job.whenEnded())
        self.assertEqual(self.world.events, [])

    def test_lateEventsIgnored(self) -> None:
        """Repeated and late events change nothing and raise nothing."""
        self.job.start()
        self.job.start()
        self.job._started(1)
        self.job._started(2)
        self.job._runnerExited()
        self.job._runnerExited()
        self.world.collecting[0].callback({})
        self.job._collected({})
        self.job.adopt()
        self.assertEqual([name for name, _ in self.world.events].count("collect"), 1)
        self.assertEqual(self.job.state(), "exited")

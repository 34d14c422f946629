"""Reactor work in slices, and the jobs' output follower that queues its work there."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.jobs.follow import POLL_INTERVAL, OutputFollower
from pyro_reactor.system.timeslices import TimeSlices
from tests.helpers import reactor


class FakeClock:
    """A perf_counter that each task moves on by its cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Turns:
    """A reactor whose ``callLater(0)`` calls run on the next turn, as the real one's do
    (L{Clock.advance} would run calls scheduled meanwhile in the same advance)."""

    def __init__(self) -> None:
        self.calls: list[Turns.Call] = []

    class Call:
        def __init__(self, turns: Turns, function: Callable[[], object]) -> None:
            self.turns = turns
            self.function = function

        def active(self) -> bool:
            return self in self.turns.calls

        def cancel(self) -> None:
            self.turns.calls.remove(self)

    def callLater(self, delay: float, function: Callable[[], object]) -> Turns.Call:
        call = Turns.Call(self, function)
        self.calls.append(call)
        return call

    def advance(self, ignored: float) -> None:
        """One reactor turn: the calls scheduled before it."""
        due, self.calls = self.calls, []
        for call in due:
            call.function()

    def getDelayedCalls(self) -> list[Turns.Call]:
        return self.calls


class TimeSlicesTests(SynchronousTestCase):
    """Queued work runs a slice at a time, merged by key, failures logged."""

    def setUp(self) -> None:
        self.reactor = Turns()
        self.time = FakeClock()
        self.slices = TimeSlices(self.reactor, slice=0.005, clock=self.time)
        self.ran: list[int] = []

    def task(self, number: int, cost: float = 0.002) -> None:
        def work() -> None:
            self.ran.append(number)
            self.time.now += cost

        self.slices.run(number, work)

    def test_slices(self) -> None:
        """Nothing runs at once; then each reactor turn runs work until its slice is used."""
        for number in range(7):
            self.task(number)
        self.assertEqual(self.ran, [])
        self.reactor.advance(0)
        self.assertEqual(self.ran, [0, 1, 2])  # 6 ms: the third task ended the slice
        self.reactor.advance(0)
        self.assertEqual(self.ran, [0, 1, 2, 3, 4, 5])
        self.reactor.advance(0)
        self.assertEqual(self.ran, list(range(7)))
        self.assertEqual(len(self.slices), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_longTaskStillRuns(self) -> None:
        """A task longer than a slice runs alone in its turn, and the queue goes on."""
        self.task(1, cost=0.1)
        self.task(2)
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1])
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1, 2])

    def test_noTimeOneTaskPerTurn(self) -> None:
        """A slice of no time (the big lines' parse queue) runs one task per turn, however
        cheap, in order."""
        slices = TimeSlices(self.reactor, slice=0, clock=self.time)
        for number in range(3):
            slices.run(number, partial(self.ran.append, number))
        for expected in ([0], [0, 1], [0, 1, 2]):
            self.reactor.advance(0)
            self.assertEqual(self.ran, expected)

    def test_mergedByKey(self) -> None:
        """A key queued again before it ran runs once; after it ran, it runs again."""
        for _ in range(5):
            self.task(1)
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1])
        self.task(1)
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1, 1])

    def test_queuedWhileRunning(self) -> None:
        """Work queued by a task runs in the same slice while time is left, else in the
        next turn."""

        def first(cost: float) -> Callable[[], None]:
            def work() -> None:
                self.ran.append(1)
                self.time.now += cost
                self.slices.run("second", lambda: self.ran.append(2))

            return work

        self.slices.run("first", first(0.001))
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1, 2])
        self.ran.clear()
        self.slices.run("first", first(0.01))
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1])
        self.reactor.advance(0)
        self.assertEqual(self.ran, [1, 2])

    def test_whenIdle(self) -> None:
        """An idle callback runs at once on an empty queue, else once the queue is empty;
        C{busy} adds up the time the work took."""
        called: list[str] = []
        self.slices.whenIdle(lambda: called.append("now"))
        self.assertEqual(called, ["now"])
        for number in range(4):
            self.task(number)
        self.slices.whenIdle(lambda: called.append("later"))
        self.reactor.advance(0)
        self.assertEqual(called, ["now"])
        self.reactor.advance(0)
        self.assertEqual(called, ["now", "later"])
        self.assertAlmostEqual(self.slices.busy, 0.008)

    def test_failureLogged(self) -> None:
        """A failing task is logged; the tasks after it run."""

        def fails() -> None:
            raise ValueError("no")

        self.slices.run("bad", fails)
        self.task(2)
        self.reactor.advance(0)
        self.assertEqual(self.ran, [2])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_cancel(self) -> None:
        """Cancelling drops the queue and the pending turn."""
        self.task(1)
        self.slices.cancel()
        self.reactor.advance(1)
        self.assertEqual(self.ran, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class PollingFollowerTests(SynchronousTestCase):
    """Without inotify, every job is looked at every poll interval."""

    def test_polls(self) -> None:
        """Each poll queues every job once."""
        clock = MemoryReactorClock()
        changed: list[str] = []
        follower = OutputFollower(
            clock, Path("/nonexistent-dir"), lambda: ["a", "b"], changed.append, TimeSlices(clock)
        )
        before = set(os.listdir("/proc/self/fd"))
        follower.start()  # no such directory: it polls, and says so
        self.assertTrue(follower.polling)
        self.assertEqual(set(os.listdir("/proc/self/fd")), before)  # no inotify left open
        clock.advance(POLL_INTERVAL)
        clock.advance(0)
        self.assertEqual(sorted(changed), ["a", "b"])
        follower.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class OverflowTests(SynchronousTestCase):
    """When the kernel's event queue overflowed, every job is looked at."""

    def test_overflow(self) -> None:
        """An ``IN_Q_OVERFLOW`` event queues every job once; named events their job."""
        from pyro_reactor.system.inotify import IN_MODIFY, IN_Q_OVERFLOW, RawEvent

        clock = Turns()
        changed: list[str] = []
        follower = OutputFollower(
            clock, Path("/nowhere"), lambda: ["a", "b", "c"], changed.append, TimeSlices(clock)
        )
        follower._events(
            [RawEvent(-1, IN_Q_OVERFLOW, 0, ""), RawEvent(1, IN_MODIFY, 0, "a.stdout")], False
        )
        clock.advance(0)
        self.assertEqual(sorted(changed), ["a", "b", "c"])


class InotifyFollowerTests(TestCase):
    """With inotify (on the real reactor), a write to a job's output file is noticed."""

    async def test_writeNoticed(self) -> None:
        """Writes to ``ID.stdout`` and ``ID.stderr`` tell the job's id (merged); other files
        in the directory tell nothing."""
        from twisted.internet.defer import Deferred

        root = Path(self.mktemp())
        root.mkdir()
        seen: list[str] = []
        noticed: Deferred[None] = Deferred()

        def changed(jobId: str) -> None:
            seen.append(jobId)
            if not noticed.called:
                reactor.callLater(0.05, noticed.callback, None)

        follower = OutputFollower(reactor, root, lambda: [], changed, TimeSlices(reactor))
        follower.start()
        self.addCleanup(follower.stop)
        self.assertFalse(follower.polling)
        (root / "job-1.json").write_text("{}")
        for name in ("job-1.stdout", "job-1.stderr"):
            descriptor = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(descriptor, b"out\n")
            os.close(descriptor)
        await noticed
        self.assertEqual(set(seen), {"job-1"})

"""The heap trimmer: freed heap pages go back to the kernel after large releases."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pyro_reactor.system.heap import TRIM_AFTER, HeapTrimmer, mallocTrim
from pyro_reactor.wire.budget import MemoryBudget


class FakeThreads:
    """Runs "thread" work when told to, so that a test sees a trim in flight."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], object], Deferred[object]]] = []

    def __call__(self, work: Callable[[], object]) -> Deferred[object]:
        done: Deferred[object] = Deferred()
        self.waiting.append((work, done))
        return done

    def finish(self) -> None:
        work, done = self.waiting.pop(0)
        done.callback(work())


class HeapTrimmerTests(SynchronousTestCase):
    """When the trimmer trims, and how often."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = FakeThreads()
        self.calls: list[str] = []
        self.trimmer = HeapTrimmer(
            self.clock, self.threads, lambda: self.calls.append("trim"), interval=0.25
        )
        self.trimmer.startService()

    def test_largeReleaseTrims(self) -> None:
        """A large release trims the heap in a thread, on the next reactor turn."""
        self.trimmer.released(TRIM_AFTER)
        self.assertEqual(self.threads.waiting, [])
        self.clock.advance(0)
        self.threads.finish()
        self.assertEqual(self.calls, ["trim"])
        self.assertEqual(self.trimmer.trims, 1)

    def test_smallReleaseDoesNot(self) -> None:
        """Releases below the threshold never trim."""
        for _ in range(100):
            self.trimmer.released(TRIM_AFTER - 1)
        self.clock.advance(10)
        self.assertEqual(self.threads.waiting, [])

    def test_burstTrimsOnce(self) -> None:
        """Many large releases on one turn ask for one trim."""
        for _ in range(10):
            self.trimmer.released(TRIM_AFTER * 2)
        self.clock.advance(0)
        self.assertEqual(len(self.threads.waiting), 1)

    def test_releaseDuringTrimTrimsAgain(self) -> None:
        """A release while a trim runs gets a trim of its own after it, no sooner than the
        interval after the first began."""
        self.trimmer.released(TRIM_AFTER)
        self.clock.advance(0)
        self.trimmer.released(TRIM_AFTER)
        self.trimmer.released(TRIM_AFTER)
        self.assertEqual(len(self.threads.waiting), 1)
        self.threads.finish()
        self.clock.advance(0.2)
        self.assertEqual(self.threads.waiting, [])
        self.clock.advance(0.05)
        self.threads.finish()
        self.assertEqual(self.calls, ["trim", "trim"])

    def test_failedTrimLogged(self) -> None:
        """A trim that fails is logged, and the next release trims again."""
        trimmer = HeapTrimmer(self.clock, lambda work: fail(OSError("no")), lambda: None)
        trimmer.startService()
        trimmer.released(TRIM_AFTER)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        ran: list[object] = []

        def inThread(work: Callable[[], object]) -> Deferred[object]:
            ran.append(work())
            return succeed(None)

        trimmer.inThread = inThread
        trimmer.released(TRIM_AFTER)
        self.clock.advance(1)
        self.assertEqual(len(ran), 1)

    def test_stoppedNeverTrims(self) -> None:
        """A trim not yet begun is cancelled by stopping; a stopped trimmer never trims."""
        self.trimmer.released(TRIM_AFTER)
        self.trimmer.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.trimmer.released(TRIM_AFTER)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noTrimFunction(self) -> None:
        """Where the C library has no malloc_trim, nothing is ever scheduled."""
        trimmer = HeapTrimmer(self.clock, self.threads, None)
        trimmer.startService()
        trimmer.released(TRIM_AFTER * 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_budgetTellsReleases(self) -> None:
        """The memory budget tells its listener how much each give-back returned."""
        budget = MemoryBudget(100 * TRIM_AFTER)
        budget.onReleased = self.trimmer.released
        hold = budget.reserve(3 * TRIM_AFTER, "a test")
        hold.resize(TRIM_AFTER // 2)
        self.clock.advance(0)
        self.assertEqual(len(self.threads.waiting), 1)
        self.threads.finish()
        hold.release()
        self.clock.advance(1)
        self.assertEqual(self.threads.waiting, [])  # the last give-back was small


class MallocTrimTests(SynchronousTestCase):
    """The real malloc_trim, where the C library is glibc (as in the guest image)."""

    def test_trimRuns(self) -> None:
        """malloc_trim is found and called as glibc declares it (it says 1 when it gave
        memory back, 0 when there was none to give)."""
        trim = mallocTrim()
        if trim is None:
            raise self.skipTest("this C library has no malloc_trim")
        blocks = [bytearray(100_000) for _ in range(200)]
        del blocks[::2]
        self.assertIn(trim(), (0, 1))


_ARENAS_SCRIPT = """
import ctypes, os, sys, threading
from pyro_reactor.system.heap import singleArena
if sys.argv[1] == "single":
    assert singleArena()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
held = []
together = threading.Barrier(4)
def allocate():
    # All four alive at once: an exited thread's arena would be handed to the next one.
    together.wait()
    held.append(libc.malloc(64 * 1024))
    together.wait()
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(10)
libc.malloc_stats()
"""


class SingleArenaTests(SynchronousTestCase):
    """With C{singleArena}, worker threads allocate from the heap that a trim shrinks."""

    def arenas(self, mode: str) -> int:
        """How many arenas glibc reports after four threads allocated, in a fresh process."""
        result = subprocess.run(
            [sys.executable, "-c", _ARENAS_SCRIPT, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return len(re.findall(r"^Arena \d+:", result.stderr, re.MULTILINE))

    def test_threadsShareOneArena(self) -> None:
        """Without it, threads get arenas of their own; with it, there is only the main one."""
        if mallocTrim() is None:
            raise SkipTest("the C library is not glibc")
        self.assertGreater(self.arenas("default"), 1)
        self.assertEqual(self.arenas("single"), 1)

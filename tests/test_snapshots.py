"""``restored``, ``quiesce`` and ``thaw``: the checks, the freeze machine, the kernel calls.

The clock is never stepped on this machine (other agents and tests share it): restore tests
use a fake kernel whose wall clock is a C{Clock}; the real ``clock_settime`` is exercised in
the VM tier. The unprivileged path runs the real system calls in a child process that has
dropped every capability. Freezing runs for real on an ext4 image this test mounts itself.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.snapshots import SnapshotsCapability
from pyro_reactor.capabilities.snapshots._machine import FreezerCore, FreezerMachine
from pyro_reactor.capabilities.snapshots.freeze import (
    NOTHING_THAWED,
    FreezePlan,
    FreezeTarget,
    FreezeWork,
    Frozen,
    parseQuiesce,
)
from pyro_reactor.capabilities.snapshots.kernel import LinuxKernel
from pyro_reactor.capabilities.snapshots.restore import (
    GENERATION_FILE,
    RestoreCore,
    Restorer,
    RestoreRequest,
    parseRestored,
)
from pyro_reactor.errors import ActionError
from pyro_reactor.system import _linux_snapshot as linux
from pyro_reactor.wire.request import Request
from tests.helpers import startAgent, waitUntil
from tests.snapshot_fakes import FakeKernel

NOW = 1_790_000_000.0  # 2026-09
ENTROPY = bytes(range(48))
ROOT = os.geteuid() == 0


def restoredRequest(**fields: Any) -> Request:
    payload = {
        "action": "restored",
        "unix_time": NOW,
        "entropy": base64.b64encode(ENTROPY).decode(),
    }
    payload.update(fields)
    return Request({key: value for key, value in payload.items() if value is not None})


class ParseRestoredTests(SynchronousTestCase):
    """Bad ``restored`` input is refused before anything is done."""

    def refused(self, **fields: Any) -> str:
        with self.assertRaises(ActionError) as caught:
            parseRestored(restoredRequest(**fields))
        message: str = caught.exception.message
        return message

    def test_goodRequest(self) -> None:
        """A good request keeps the time, the decoded bytes and the generation."""
        parsed = parseRestored(restoredRequest(generation=7))
        self.assertEqual(parsed, RestoreRequest(NOW, ENTROPY, 7))

    def test_entropyRefused(self) -> None:
        """Missing, not base64, under 32 bytes, over 4 KiB, not a string: each refused."""
        self.assertIn("entropy is required", self.refused(entropy=None))
        self.assertIn("base64", self.refused(entropy="not base64!"))
        self.assertIn("base64", self.refused(entropy=12))
        short = base64.b64encode(bytes(31)).decode()
        self.assertEqual(self.refused(entropy=short), "entropy must be at least 32 bytes (got 31)")
        long = base64.b64encode(bytes(4097)).decode()
        self.assertEqual(self.refused(entropy=long), "entropy must be at most 4096 bytes")
        self.assertEqual(
            parseRestored(restoredRequest(entropy=base64.b64encode(bytes(4096)).decode())).entropy,
            bytes(4096),
        )

    def test_unixTimeRefused(self) -> None:
        """Negative, NaN, infinite, before 2020, in 2100, a string, a boolean: each refused."""
        for bad in (-1, 0, 1_500_000_000, 4_200_000_000):
            self.assertIn("not between 2020-01-01 and 2100-01-01", self.refused(unix_time=bad))
        for wrong in (math.nan, math.inf, "1790000000", True, None):
            self.assertIn("unix_time must be a number", self.refused(unix_time=wrong))

    def test_generationRefused(self) -> None:
        """A negative or non-integer generation is refused."""
        self.assertEqual(self.refused(generation=-1), "generation must not be negative")
        self.assertIn("integer", self.refused(generation="x"))


class RestorerTests(SynchronousTestCase):
    """What ``restored`` does, against a fake kernel whose wall clock drives a C{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW - 20.0)  # the guest's clock is 20 s stale
        self.kernel = FakeKernel(self.clock)
        self.stateDir = Path(self.mktemp())
        self.stateDir.mkdir()
        self.rechecks: list[Any] = []
        self.shifts: list[float] = []
        self.thawAnswer: dict[str, Any] = dict(NOTHING_THAWED)
        self.restorer = Restorer(
            RestoreCore(
                reactor=self.clock,
                kernel=self.kernel,
                stateDir=self.stateDir,
                inThread=maybeDeferred,
                thaw=lambda: succeed(self.thawAnswer),
                rechecks=lambda: self.rechecks,
                shiftStart=self.shifts.append,
                monotonic=lambda: 0.0,
            )
        )

    def restore(self, **fields: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self.successResultOf(
            self.restorer.restore(parseRestored(restoredRequest(**fields)))
        )
        return answer

    def test_stepsClockMixesEntropyReseeds(self) -> None:
        """The clock is stepped to the host's time, the bytes credited, the CRNG reseeded."""
        answer = self.restore(generation=3)
        self.assertEqual(
            answer,
            {
                "clock_step_seconds": 20.0,
                "timers_rearmed": 0,
                "entropy_bytes": 48,
                "reseeded": True,
                "generation": 3,
                "thawed": [],
                "jobs_thawed": 0,
                "services_rechecked": 0,
            },
        )
        self.assertEqual(
            self.kernel.calls,
            [("setRealtime", NOW), ("addEntropy", ENTROPY), ("reseed", None)],
        )
        self.assertEqual(self.clock.seconds(), NOW)

    def test_smallOffsetLeavesClock(self) -> None:
        """A clock off by 10 ms or less is not stepped."""
        self.clock.advance(20.0 - 0.005)
        answer = self.restore()
        self.assertEqual(answer["clock_step_seconds"], 0.0)
        self.assertNotIn("setRealtime", [name for name, _ in self.kernel.calls])
        self.assertIsNone(answer["generation"])

    def test_timersRearmedAfterStep(self) -> None:
        """A timeout pending before the step fires after its own delay, not the time on disk.

        The reactor keeps time by the wall clock: without re-arming, stepping 20 s forward
        would leave a 30 s timer 10 s from firing.
        """
        fired: list[bool] = []
        self.clock.callLater(30, fired.append, True)
        answer = self.restore()
        self.assertEqual(answer["timers_rearmed"], 1)
        self.assertEqual(self.shifts, [20.0])
        self.clock.advance(29)
        self.assertEqual(fired, [])
        self.clock.advance(1.5)
        self.assertEqual(fired, [True])

    def test_backwardsStep(self) -> None:
        """A guest clock ahead of the host's is stepped back, and its timers with it."""
        self.clock.advance(40)  # 20 s ahead of the host now
        fired: list[bool] = []
        self.clock.callLater(5, fired.append, True)
        answer = self.restore()
        self.assertEqual(answer["clock_step_seconds"], -20.0)
        self.assertEqual(self.shifts, [-20.0])
        self.clock.advance(4.5)
        self.assertEqual(fired, [])
        self.clock.advance(1)
        self.assertEqual(fired, [True])

    def test_noCapabilitiesSaysWhatFailed(self) -> None:
        """Without CAP_SYS_TIME/CAP_SYS_ADMIN: clock_error, uncredited mix, reseeded false."""
        self.kernel.denied = {"setRealtime", "addEntropy", "reseed"}
        fired: list[bool] = []
        self.clock.callLater(5, fired.append, True)
        answer = self.restore()
        self.assertEqual(answer["clock_step_seconds"], 0.0)
        self.assertEqual(
            answer["clock_error"],
            "the clock is off by 20.000 s and could not be set: Operation not permitted"
            " (CAP_SYS_TIME is needed)",
        )
        self.assertIs(answer["reseeded"], False)
        self.assertEqual(answer["entropy_bytes"], 48)
        self.assertIn("could not credit entropy", answer["entropy_error"])
        self.assertIn("could not reseed the CRNG", answer["entropy_error"])
        self.assertEqual(self.kernel.calls, [("mixEntropy", ENTROPY)])
        self.assertEqual(self.shifts, [])
        self.clock.advance(5)
        self.assertEqual(fired, [True])

    def test_nothingMixed(self) -> None:
        """When even the uncredited write fails, no byte is claimed."""
        self.kernel.denied = {"addEntropy", "mixEntropy"}
        answer = self.restore()
        self.assertEqual(answer["entropy_bytes"], 0)
        self.assertIn("could not mix entropy in", answer["entropy_error"])

    def test_generationRecordedAtomically(self) -> None:
        """The generation is written to a 0600 file under the state directory, replaced whole."""
        self.restore(generation=1)
        self.restore(generation=2)
        record = self.stateDir / GENERATION_FILE
        self.assertEqual(json.loads(record.read_text()), {"generation": 2, "restored_at": NOW})
        self.assertEqual(stat.S_IMODE(record.stat().st_mode), 0o600)
        self.assertEqual(sorted(path.name for path in self.stateDir.iterdir()), [GENERATION_FILE])

    def test_generationNotRecorded(self) -> None:
        """A state directory that cannot be written is a clear error, not a traceback."""
        self.restorer.core.stateDir = self.stateDir / "missing"
        failure = self.failureResultOf(
            self.restorer.restore(parseRestored(restoredRequest(generation=1))), ActionError
        )
        self.assertEqual(
            failure.getErrorMessage(), "could not record the generation in the state directory"
        )
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)

    def test_servicesRechecked(self) -> None:
        """Every registered re-check runs; the answer sums their counts; one failing counts 0."""
        self.rechecks = [lambda: succeed(2), lambda: fail(RuntimeError("boom")), lambda: 1]
        answer = self.restore()
        self.assertEqual(answer["services_rechecked"], 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_thawsWhatQuiesceFroze(self) -> None:
        """A clone wakes up frozen (the snapshot was taken between quiesce and thaw)."""
        self.thawAnswer = {"thawed": ["/workspace"], "jobs_thawed": 2}
        answer = self.restore()
        self.assertEqual(answer["thawed"], ["/workspace"])
        self.assertEqual(answer["jobs_thawed"], 2)


def frozenOf(*names: str, timeout: float = 30.0) -> Frozen:
    targets = tuple(FreezeTarget(name, name) for name in names)
    return Frozen(targets, (), 0, timeout, NOW + timeout)


class FreezerMachineTests(SynchronousTestCase):
    """The freeze lifecycle, driven with fake work and a C{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.freezes: list[Deferred[Frozen]] = []
        self.thaws: list[Deferred[dict[str, Any]]] = []
        self.events: list[Any] = []

        def freeze(plan: FreezePlan) -> Deferred[Frozen]:
            self.events.append(("freeze", plan))
            work: Deferred[Frozen] = Deferred()
            self.freezes.append(work)
            return work

        def thaw(frozen: Frozen) -> Deferred[dict[str, Any]]:
            self.events.append(("thaw", frozen))
            work: Deferred[dict[str, Any]] = Deferred()
            self.thaws.append(work)
            return work

        self.machine = FreezerMachine(FreezerCore(self.clock, freeze, thaw))
        self.plan = FreezePlan((FreezeTarget("/data", "/data"),), False, 30.0)

    def quiesce(self) -> Deferred[dict[str, Any]]:
        reply: Deferred[dict[str, Any]] = Deferred()
        self.machine.quiesce(self.plan, reply)
        return reply

    def thaw(self) -> Deferred[dict[str, Any]]:
        reply: Deferred[dict[str, Any]] = Deferred()
        self.machine.thaw(reply)
        return reply

    def freezeNow(self) -> dict[str, Any]:
        answer = self.quiesce()
        self.freezes[-1].callback(frozenOf("/data"))
        result: dict[str, Any] = self.successResultOf(answer)
        return result

    def test_quiesceThenThaw(self) -> None:
        """quiesce answers what it froze; thaw answers what it thawed; the timer is gone."""
        self.assertEqual(
            self.freezeNow(),
            {"synced": True, "frozen": ["/data"], "jobs_frozen": 0, "thaw_deadline": NOW + 30},
        )
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        thawed = self.thaw()
        self.assertNoResult(thawed)
        self.thaws[0].callback({"thawed": ["/data"], "jobs_thawed": 0})
        self.assertEqual(self.successResultOf(thawed), {"thawed": ["/data"], "jobs_thawed": 0})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_thawWhenThawedIsNotAnError(self) -> None:
        """Thawing with nothing frozen answers that nothing was thawed."""
        self.assertEqual(self.successResultOf(self.thaw()), {"thawed": [], "jobs_thawed": 0})
        self.assertEqual(self.events, [])

    def test_secondQuiesceAnswersAtOnce(self) -> None:
        """A quiesce while freezing, frozen or thawing is refused at once, never left waiting."""
        first = self.quiesce()
        failure = self.failureResultOf(self.quiesce(), ActionError)
        self.assertEqual(failure.getErrorMessage(), "a quiesce is already in progress")
        self.freezes[0].callback(frozenOf("/data"))
        self.successResultOf(first)
        failure = self.failureResultOf(self.quiesce(), ActionError)
        self.assertIn("already quiesced (/data; 0 jobs) until 2026-", failure.getErrorMessage())
        self.assertIn("thaw first", failure.getErrorMessage())
        self.thaw()
        failure = self.failureResultOf(self.quiesce(), ActionError)
        self.assertIn("a thaw is in progress", failure.getErrorMessage())
        self.assertEqual(len(self.freezes), 1)

    def test_autoThaw(self) -> None:
        """Nobody thaws: the agent thaws by itself after timeout_seconds."""
        self.freezeNow()
        self.clock.advance(29.9)
        self.assertEqual(self.thaws, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.thaws), 1)
        self.thaws[0].callback({"thawed": ["/data"], "jobs_thawed": 0})
        self.assertEqual(self.successResultOf(self.thaw()), {"thawed": [], "jobs_thawed": 0})

    def test_thawWhileFreezingWaitsThenThaws(self) -> None:
        """A thaw from another connection while the freeze runs is served once it is done."""
        quiesced = self.quiesce()
        thawed = self.thaw()
        self.assertNoResult(thawed)
        self.assertEqual(self.thaws, [])
        self.freezes[0].callback(frozenOf("/data"))
        self.assertEqual(self.successResultOf(quiesced)["frozen"], ["/data"])
        self.assertEqual(len(self.thaws), 1)
        self.thaws[0].callback({"thawed": ["/data"], "jobs_thawed": 0})
        self.assertEqual(self.successResultOf(thawed)["thawed"], ["/data"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failedFreeze(self) -> None:
        """A freeze that fails is answered as an error; a waiting thaw hears nothing was frozen."""
        quiesced = self.quiesce()
        thawed = self.thaw()
        self.freezes[0].errback(ActionError("could not freeze /data: nope"))
        self.assertEqual(
            self.failureResultOf(quiesced, ActionError).getErrorMessage(),
            "could not freeze /data: nope",
        )
        self.assertEqual(self.successResultOf(thawed), {"thawed": [], "jobs_thawed": 0})
        self.freezeNow()  # and the machine is usable again

    def test_thawsJoinTheThawInProgress(self) -> None:
        """Two thaws at once get the same answer from one thaw."""
        self.freezeNow()
        first, second = self.thaw(), self.thaw()
        self.assertEqual(len(self.thaws), 1)
        self.thaws[0].callback({"thawed": ["/data"], "jobs_thawed": 1})
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))


class FakeFreezable:
    """A jobs registry stand-in that counts freezes and thaws, and can refuse to freeze."""

    def __init__(self, units: int, failing: bool = False) -> None:
        self.units, self.failing = units, failing
        self.frozen = 0

    def freeze(self) -> Deferred[int]:
        if self.failing:
            return fail(ActionError("cgroup.freeze: no"))
        self.frozen = self.units
        return succeed(self.units)

    def thaw(self) -> Deferred[int]:
        thawed, self.frozen = self.frozen, 0
        return succeed(thawed)


class FreezeWorkTests(SynchronousTestCase):
    """Freezing jobs and mounts through the registries and a fake kernel; undoing on failure."""

    def setUp(self) -> None:
        self.kernel = FakeKernel(Clock())
        self.freezables: list[Any] = []
        self.work = FreezeWork(
            kernel=self.kernel,
            freezables=lambda: self.freezables,
            inThread=maybeDeferred,
            wallclock=lambda: NOW,
        )

    def plan(self, *paths: str, jobs: bool = True) -> FreezePlan:
        return FreezePlan(tuple(FreezeTarget(path, path) for path in paths), jobs, 5.0)

    def test_jobsThenSyncThenMounts(self) -> None:
        """Jobs freeze first, then sync, then each mount; thaw undoes both."""
        jobs = FakeFreezable(3)
        self.freezables = [jobs]
        frozen = self.successResultOf(self.work.freeze(self.plan("/a", "/b")))
        self.assertEqual(
            frozen.answer(),
            {"synced": True, "frozen": ["/a", "/b"], "jobs_frozen": 3, "thaw_deadline": NOW + 5},
        )
        self.assertEqual(self.kernel.calls, [("sync", None), ("freeze", "/a"), ("freeze", "/b")])
        answer = self.successResultOf(self.work.thaw(frozen))
        self.assertEqual(answer, {"thawed": ["/a", "/b"], "jobs_thawed": 3})
        self.assertEqual(jobs.frozen, 0)

    def test_jobsLeftAloneUnlessAsked(self) -> None:
        """Without freeze_jobs, registered jobs are not touched."""
        jobs = FakeFreezable(3)
        self.freezables = [jobs]
        frozen = self.successResultOf(self.work.freeze(self.plan(jobs=False)))
        self.assertEqual(frozen.jobsFrozen, 0)
        self.assertEqual(jobs.frozen, 0)

    def test_mountFailureUndoesEverything(self) -> None:
        """A mount that cannot be frozen: earlier mounts and the jobs are thawed, then the error."""
        jobs = FakeFreezable(2)
        self.freezables = [jobs]
        self.kernel.failFreeze = {"/b"}
        failure = self.failureResultOf(self.work.freeze(self.plan("/a", "/b")), ActionError)
        self.assertEqual(failure.getErrorMessage(), "could not freeze /b: Operation not supported")
        self.assertEqual(self.kernel.frozenPaths, set())
        self.assertEqual(jobs.frozen, 0)

    def test_jobFailureUndoesJobs(self) -> None:
        """A job registry that fails: the others are thawed again, no mount is touched."""
        good = FakeFreezable(2)
        self.freezables = [good, FakeFreezable(1, failing=True)]
        failure = self.failureResultOf(self.work.freeze(self.plan("/a")), ActionError)
        self.assertEqual(failure.getErrorMessage(), "cgroup.freeze: no")
        self.assertEqual(good.frozen, 0)
        self.assertEqual(self.kernel.calls, [])

    def test_thawOfSomethingAlreadyThawed(self) -> None:
        """A mount someone else thawed is left out of the answer, and logged."""
        frozen = self.successResultOf(self.work.freeze(self.plan("/a")))
        self.kernel.thaw("/a")
        answer = self.successResultOf(self.work.thaw(frozen))
        self.assertEqual(answer, {"thawed": [], "jobs_thawed": 0})


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


class MountedTestCase(TestCase):
    """A test with mounts of its own (root only): ext4 images on loop devices, tmpfs."""

    def setUp(self) -> None:
        if not ROOT or shutil.which("mkfs.ext4") is None:
            raise self.skipTest("needs root and mkfs.ext4 to mount a filesystem of its own")

    def mountTmpfs(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "pyro-test", str(where))
        self.addCleanup(run, "umount", str(where))

    def mountExt4(self, where: Path) -> None:
        image = Path(self.mktemp()).absolute().with_suffix(".ext4")
        image.parent.mkdir(parents=True, exist_ok=True)
        with image.open("wb") as handle:
            handle.truncate(16 * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", str(image))
        where.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", "loop", str(image), str(where))

        def unmount() -> None:
            try:
                linux.thawFilesystem(str(where))  # never leave it frozen, whatever failed
            except OSError:
                pass
            run("umount", str(where))

        self.addCleanup(unmount)


class ParseQuiesceTests(MountedTestCase):
    """``freeze`` names must be mount points of the guest, never its root or the state dir."""

    def setUp(self) -> None:
        super().setUp()
        base = Path(self.mktemp()).absolute()
        self.workspace, self.stateDir = base / "workspace", base / "state"
        self.stateDir.mkdir(parents=True)
        self.mountTmpfs(self.workspace / "data")
        (self.workspace / "data" / "sub").mkdir()

    def parse(self, **fields: Any) -> FreezePlan:
        return parseQuiesce(
            Request({"action": "quiesce", **fields}), LinuxKernel(), self.workspace, self.stateDir
        )

    def refused(self, **fields: Any) -> str:
        with self.assertRaises(ActionError) as caught:
            self.parse(**fields)
        message: str = caught.exception.message
        return message

    def test_mountUnderWorkspace(self) -> None:
        """``/workspace/data`` names the workspace's mount; defaults are 30 s, no jobs."""
        plan = self.parse(freeze=["/workspace/data", "/workspace/data/"])
        self.assertEqual(
            plan,
            FreezePlan(
                (FreezeTarget("/workspace/data", str(self.workspace / "data")),), False, 30.0
            ),
        )
        self.assertEqual(self.parse(freeze_jobs=True, timeout_seconds=2).timeout, 2.0)

    def test_refusals(self) -> None:
        """Root, not a mount point, kernel filesystems, missing, relative, bad types: refused."""
        self.assertEqual(
            self.refused(freeze=["/"]),
            "freeze: / is the root filesystem; freezing it would hang the agent",
        )
        self.assertIn("is the root filesystem", self.refused(freeze=["/workspace/../etc"]))
        self.assertEqual(
            self.refused(freeze=["/workspace/data/sub"]),
            "freeze: /workspace/data/sub is not a mount point of the guest",
        )
        self.assertEqual(
            self.refused(freeze=["/proc"]),
            "freeze: /proc is a proc filesystem, which cannot be frozen",
        )
        self.assertEqual(
            self.refused(freeze=["/workspace/nope"]),
            "freeze: /workspace/nope does not exist in the guest",
        )
        self.assertIn("must be an absolute guest path", self.refused(freeze=["data"]))
        self.assertIn("must be a list", self.refused(freeze="/workspace/data"))
        for bad in (0, -1, 3601, math.nan, "5", True):
            self.assertIn("timeout_seconds must be", self.refused(timeout_seconds=bad))
        self.assertIn("must be a boolean", self.refused(freeze_jobs="yes"))

    def test_stateDirectoryFilesystemRefused(self) -> None:
        """The filesystem holding the agent's state directory is never frozen."""
        stateMount = self.stateDir / "mnt"
        self.mountTmpfs(stateMount)
        message = parseQuiesce(
            Request({"freeze": ["/workspace/data"]}), LinuxKernel(), self.workspace, self.stateDir
        )
        self.assertEqual(len(message.targets), 1)
        with self.assertRaises(ActionError) as caught:
            parseQuiesce(
                Request({"freeze": ["/workspace/data"]}),
                LinuxKernel(),
                self.workspace,
                self.workspace / "data" / "sub",
            )
        self.assertIn("holds the agent's state directory", caught.exception.message)


class RealFreezeTests(MountedTestCase):
    """quiesce/thaw over the wire with real FIFREEZE/FITHAW on an ext4 image of the test's own."""

    async def startAgent(self) -> Any:
        agent = await startAgent(self)
        self.mountExt4(agent.workspace / "data")
        return agent

    def frozen(self, path: Path) -> bool:
        """FIFREEZE says EBUSY on a frozen filesystem; otherwise freeze and thaw it back."""
        try:
            linux.freezeFilesystem(str(path))
        except OSError:
            return True
        linux.thawFilesystem(str(path))
        return False

    async def test_freezeKeepsAnsweringThenThaw(self) -> None:
        """Frozen: writers wait, ping/stats/thaw answer, a second quiesce is refused; thaw frees."""
        agent = await self.startAgent()
        data = agent.workspace / "data"
        answer = await agent.call({"action": "quiesce", "freeze": ["/workspace/data"]})
        self.assertEqual(answer["synced"], True)
        self.assertEqual(answer["frozen"], ["/workspace/data"])
        self.assertEqual(answer["jobs_frozen"], 0)
        self.assertTrue(self.frozen(data))
        written = threading.Event()

        def write() -> None:
            (data / "file").write_text("after the thaw")
            written.set()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        self.assertFalse(written.wait(0.3))  # blocked by the freeze
        self.assertEqual((await agent.call({"action": "ping"}))["pong"], True)
        stats = await agent.call({"action": "stats"})
        self.assertIn("memory", stats)
        again = await agent.call({"action": "quiesce", "freeze": ["/workspace/data"]})
        self.assertIn("already quiesced", again["error"])
        thawed = await agent.call({"action": "thaw"})
        self.assertEqual(thawed, {"thawed": ["/workspace/data"], "jobs_thawed": 0})
        self.assertTrue(await waitUntil(written.is_set, 10))
        self.assertFalse(self.frozen(data))
        self.assertEqual(await agent.call({"action": "thaw"}), {"thawed": [], "jobs_thawed": 0})

    async def test_autoThawOnTheRealReactor(self) -> None:
        """Nobody thaws: the filesystem is thawed after timeout_seconds."""
        agent = await self.startAgent()
        data = agent.workspace / "data"
        answer = await agent.call(
            {"action": "quiesce", "freeze": ["/workspace/data"], "timeout_seconds": 0.5}
        )
        self.assertEqual(answer["frozen"], ["/workspace/data"])
        self.assertTrue(await waitUntil(lambda: not self.frozen(data), 10))

    async def test_unsupportedFilesystemLeavesNothingFrozen(self) -> None:
        """tmpfs cannot be frozen: the error names it, and the ext4 mount frozen first is thawed."""
        agent = await self.startAgent()
        self.mountTmpfs(agent.workspace / "tmp")
        answer = await agent.call(
            {"action": "quiesce", "freeze": ["/workspace/data", "/workspace/tmp"]}
        )
        self.assertEqual(
            answer, {"error": "could not freeze /workspace/tmp: Operation not supported"}
        )
        self.assertFalse(self.frozen(agent.workspace / "data"))

    async def test_agentStopThaws(self) -> None:
        """An agent that stops while frozen thaws first."""
        agent = await self.startAgent()
        await agent.call({"action": "quiesce", "freeze": ["/workspace/data"]})
        await agent.context.services.stopService()
        self.assertFalse(self.frozen(agent.workspace / "data"))


class WireTests(TestCase):
    """``restored``/``quiesce``/``thaw`` through a whole agent; bad input refused."""

    async def test_pingListsSnapshotFeature(self) -> None:
        """``ping`` lists the new actions and the ``snapshot`` feature."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "ping"})
        self.assertIn("snapshot", answer["features"])
        for name in ("restored", "quiesce", "thaw"):
            self.assertIn(name, answer["actions"])

    async def test_badRestoredInput(self) -> None:
        """NaN (which Python's JSON reads), a bad entropy, an absurd time: clear errors."""
        agent = await startAgent(self)
        entropy = base64.b64encode(bytes(32)).decode()
        raw = b'{"action": "restored", "unix_time": NaN, "entropy": "%s"}\n' % entropy.encode()
        answer = json.loads(await agent.exchange(raw))
        self.assertIn("unix_time must be a number", answer["error"])
        answer = await agent.call({"action": "restored", "unix_time": NOW})
        self.assertIn("entropy is required", answer["error"])
        answer = await agent.call(
            {"action": "restored", "unix_time": 4_200_000_000, "entropy": entropy}
        )
        self.assertIn("refusing to set the clock", answer["error"])

    async def test_restoredWithFakeClock(self) -> None:
        """A whole ``restored`` by a capability built on a running agent's context (fake clock)."""
        agent = await startAgent(self)
        clock = Clock()
        clock.advance(NOW - 5)
        kernel = FakeKernel(clock)
        capability = SnapshotsCapability(agent.context, kernel=kernel)
        capability.restorer.core.reactor = clock
        answer = await capability.restorer.restore(parseRestored(restoredRequest(generation=9)))
        self.assertEqual(answer["clock_step_seconds"], 5.0)
        self.assertEqual(answer["generation"], 9)
        record = agent.stateDir / GENERATION_FILE
        self.assertEqual(json.loads(record.read_text())["generation"], 9)


UNPRIVILEGED_RESTORE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock
    status = Path("/proc/self/status").read_text()
    effective = [line for line in status.splitlines() if line.startswith("CapEff:")][0]
    if int(effective.split()[1], 16) != 0:
        sys.exit("capabilities were not dropped: " + effective)
    from pyro_reactor.capabilities.snapshots.kernel import LinuxKernel
    from pyro_reactor.capabilities.snapshots.restore import Restorer, RestoreCore, RestoreRequest
    core = RestoreCore(
        reactor=Clock(), kernel=LinuxKernel(), stateDir=Path("/nonexistent"),
        inThread=None, thaw=lambda: succeed({"thawed": [], "jobs_thawed": 0}),
        rechecks=lambda: [], shiftStart=lambda jump: None,
    )
    answers = []
    request = RestoreRequest(time.time() + 5, bytes(range(64)), None)
    Restorer(core).restore(request).addCallback(answers.append)
    print(json.dumps(answers[0]))
    """
)


class UnprivilegedTests(TestCase):
    """The real system calls, from a process without CAP_SYS_TIME or CAP_SYS_ADMIN."""

    def test_restoredSaysWhatItCouldNotDo(self) -> None:
        """EPERM everywhere: clock_error, reseeded false, the bytes mixed in uncredited."""
        setpriv = shutil.which("setpriv")
        if not ROOT or setpriv is None:
            raise self.skipTest("needs root and setpriv to start a process without capabilities")
        checkout = Path(__file__).resolve().parent.parent
        result = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                sys.executable,
                "-c",
                UNPRIVILEGED_RESTORE,
            ],
            check=False,
            cwd=checkout,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(checkout)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        answer = json.loads(result.stdout)
        self.assertEqual(answer["clock_step_seconds"], 0.0)
        self.assertIn("could not be set: Operation not permitted", answer["clock_error"])
        self.assertIs(answer["reseeded"], False)
        self.assertEqual(answer["entropy_bytes"], 64)
        self.assertIn("could not credit entropy: Operation not permitted", answer["entropy_error"])


class RealEntropyTests(SynchronousTestCase):
    """As root, RNDADDENTROPY and RNDRESEEDCRNG are accepted by this machine's kernel."""

    def test_creditAndReseed(self) -> None:
        """32 fresh random bytes credited, then a reseed: neither raises."""
        if not ROOT:
            raise self.skipTest("needs CAP_SYS_ADMIN")
        kernel = LinuxKernel()
        kernel.addEntropy(os.urandom(32))
        kernel.reseed()
        mounts = kernel.mounts()
        self.assertIn("/", [mount.mountPoint for mount in mounts])
        self.assertIn("proc", [mount.fsType for mount in mounts if mount.mountPoint == "/proc"])


class MountinfoTests(SynchronousTestCase):
    """``/proc/self/mountinfo`` lines, escapes included."""

    def test_parse(self) -> None:
        """The mount point is field 5 with octal escapes; the type follows the separator."""
        path = Path(self.mktemp())
        path.write_text(
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            "40 22 0:5 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
            "garbage\n"
        )
        self.assertEqual(
            linux.mounts(path),
            [
                linux.Mount("/", "8:1", "ext4"),
                linux.Mount("/mnt/with space", "0:5", "tmpfs"),
            ],
        )


del Failure

"""The agent's start-up measures for prompt answers on a busy guest: its autogroup's weight,
and the objects of start-up kept out of the cycle collector's walks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

from twisted.application.service import MultiService
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pyro_reactor import tap
from pyro_reactor.system.responsiveness import (
    AUTOGROUP_NICE,
    PROC_AUTOGROUP,
    Autogroup,
    Responsiveness,
)


class FakeAutogroup:
    """An autogroup that records what it was set to; C{refuse} makes setting fail."""

    def __init__(self, nice: int | None = 0, leader: bool = True, refuse: bool = False) -> None:
        self.value = nice
        self.isLeader = leader
        self.refuse = refuse
        self.writes: list[int] = []

    def leader(self) -> bool:
        return self.isLeader

    def nice(self) -> int | None:
        return self.value

    def setNice(self, value: int) -> None:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        self.writes.append(value)
        self.value = value


class _Cycle:
    """Garbage only the cycle collector can free."""

    def __init__(self) -> None:
        self.me = self


class AutogroupPriorityTests(SynchronousTestCase):
    """The autogroup of the session the agent leads gets the wanted nice value, and back."""

    def test_raisedWhileRunning(self) -> None:
        """Started, the agent's group is at the wanted value; stopped, back where it was."""
        group = FakeAutogroup(nice=0)
        service = Responsiveness(-20, group)
        service.startService()
        self.assertEqual(group.value, -20)
        service.stopService()
        self.assertEqual((group.value, group.writes), (0, [-20, 0]))

    def test_defaultIsTheHighestWeight(self) -> None:
        """By default the agent asks for -20, and the option says so."""
        self.assertEqual(AUTOGROUP_NICE, -20)
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0"])
        self.assertEqual(options["autogroup-nice"], -20)

    def test_notTheLeader(self) -> None:
        """A group shared with whatever started the agent (a terminal's shell) is left alone."""
        group = FakeAutogroup(nice=0, leader=False)
        service = Responsiveness(-20, group)
        service.startService()
        service.stopService()
        self.assertEqual(group.writes, [])

    def test_noAutogroups(self) -> None:
        """A kernel without autogroups: nothing to set, and the agent starts all the same."""
        group = FakeAutogroup(nice=None)
        service = Responsiveness(-20, group)
        service.startService()
        self.assertTrue(service.running)
        service.stopService()
        self.assertEqual(group.writes, [])

    def test_refused(self) -> None:
        """Without the right to raise it (not root), the agent starts and logs why."""
        group = FakeAutogroup(nice=0, refuse=True)
        service = Responsiveness(-20, group)
        service.startService()
        self.assertTrue(service.running)
        service.stopService()
        self.assertEqual((group.value, group.writes), (0, []))

    def test_alreadyThere(self) -> None:
        """A group already at the wanted value is neither written nor put back."""
        group = FakeAutogroup(nice=-5)
        service = Responsiveness(-5, group)
        service.startService()
        service.stopService()
        self.assertEqual(group.writes, [])

    def test_optionRange(self) -> None:
        """``--autogroup-nice`` takes the kernel's nice range, -20 to 19, and nothing else."""
        for good in ("-20", "0", "19"):
            options = tap.Options()
            options.parseOptions(["--listen", "tcp:0", "--autogroup-nice", good])
            self.assertEqual(options["autogroup-nice"], int(good))
        for bad in ("-21", "20", "high"):
            options = tap.Options()
            self.assertRaises(
                usage.UsageError,
                options.parseOptions,
                ["--listen", "tcp:0", "--autogroup-nice", bad],
            )

    def test_startedLastStoppedFirst(self) -> None:
        """The agent's service tree ends with it: what the others build at start is frozen."""
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--autogroup-nice", "-3"])
        options["workspace"] = self.mktemp()
        options["state-dir"] = self.mktemp()
        top = tap.makeService(options)
        assert isinstance(top, MultiService)
        last = list(top)[-1]
        assert isinstance(last, Responsiveness)
        self.assertEqual(last.wanted, -3)


_SET_NICE = """
import sys
from pyro_reactor.system.responsiveness import Autogroup
group = Autogroup()
print(group.leader(), group.nice())
if group.leader():
    group.setNice(int(sys.argv[1]))
print(group.nice(), open("/proc/self/autogroup").read().split()[2])
"""


class RealAutogroupTests(SynchronousTestCase):
    """L{Autogroup} against the kernel's ``/proc/self/autogroup``."""

    def setUp(self) -> None:
        if not PROC_AUTOGROUP.exists():
            raise SkipTest("this kernel has no scheduler autogroups")

    def run_(self, nice: int, newSession: bool) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", _SET_NICE, str(nice)],
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=newSession,
            check=False,
        )
        return result.stdout.split() + result.stderr.strip().splitlines()[-1:]

    def test_sessionLeaderSetsItsGroup(self) -> None:
        """A process leading its session reads its group's nice value, and (as root) sets it."""
        if os.geteuid() != 0:
            raise SkipTest("raising an autogroup's weight needs root")
        self.assertEqual(self.run_(-7, newSession=True), ["True", "0", "-7", "-7"])

    def test_loweringNeedsNoPrivilege(self) -> None:
        """Anyone may lower their group's weight; only a leader is told it owns the group."""
        self.assertEqual(self.run_(3, newSession=True)[:4], ["True", "0", "3", "3"])
        self.assertEqual(self.run_(0, newSession=False)[0], "False")  # and sets nothing

    def test_parsesTheKernelsFormat(self) -> None:
        """``/autogroup-N nice V`` gives V; anything else (no such file) gives None."""
        path = Path(self.mktemp())
        path.write_text("/autogroup-42 nice -12\n")
        self.assertEqual(Autogroup(path).nice(), -12)
        self.assertIsNone(Autogroup(Path(self.mktemp())).nice())
        path.write_text("/autogroup-42 nice x\n")
        self.assertIsNone(Autogroup(path).nice())


class FrozenStartupTests(SynchronousTestCase):
    """What exists when the agent has started is left out of collections until it stops."""

    def test_startupObjectsLeftOut(self) -> None:
        """A cycle made before start survives collections while running, and not after."""
        gc.collect()
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        service = Responsiveness(0, FakeAutogroup())
        service.startService()
        try:
            self.assertGreater(gc.get_freeze_count(), 0)
            gc.collect()
            self.assertIsNotNone(alive())
            made = _Cycle()
            after = weakref.ref(made)
            del made
            gc.collect()
            self.assertIsNone(after())
        finally:
            service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)
        gc.collect()
        self.assertIsNone(alive())

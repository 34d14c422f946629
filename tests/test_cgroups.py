"""The cgroup layer: parsing, limits checking, and real cgroup v2 kill/freeze where available.

The real-cgroup tests run where this process may create cgroups (root, cgroup v2 mounted);
elsewhere they are skipped. Memory and pids limits and OOM are checked in the VM tier, whose
guest has every controller.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pyro_reactor.system.cgroups import (
    Cgroup,
    CgroupTree,
    LimitError,
    Limits,
    ownCgroup,
    parseLimits,
    unifiedMount,
)
from tests.helpers import alive


def waitUntil(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class ParsingTests(SynchronousTestCase):
    """Where the hierarchy is, where we are in it, and which limits a request asks for."""

    def test_unifiedMount(self) -> None:
        """The cgroup2 line of the mount table gives the hierarchy's place, hybrid or not."""
        hybrid = (
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
            "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
        )
        self.assertEqual(unifiedMount(hybrid), Path("/sys/fs/cgroup/unified"))
        self.assertIsNone(unifiedMount("proc /proc proc rw 0 0\n"))

    def test_ownCgroup(self) -> None:
        """The ``0::`` line is this process's v2 cgroup."""
        self.assertEqual(
            ownCgroup("4:memory:/x\n0::/system.slice/a.service\n"), "/system.slice/a.service"
        )
        self.assertEqual(ownCgroup("0::/\n"), "/")
        self.assertIsNone(ownCgroup("4:memory:/x\n"))

    def test_limits(self) -> None:
        """Each limit is checked: types, ranges and unknown names are errors."""
        self.assertEqual(
            parseLimits({"memory_bytes": 64 << 20, "pids": 10, "cpu": 0.5}),
            Limits(64 << 20, 10, 0.5),
        )
        self.assertEqual(parseLimits(None).asked(), {})
        for bad in (
            {"memory_bytes": 1000},
            {"memory_bytes": "1G"},
            {"pids": 0},
            {"pids": True},
            {"cpu": 0},
            {"cpu": "half"},
            {"swap": 1},
        ):
            self.assertRaises(LimitError, parseLimits, bad)

    def test_missingControllerIsAnError(self) -> None:
        """A limit whose controller the cgroup lacks is refused, never silently ignored."""
        base = Path(self.mktemp())
        base.mkdir()
        (base / "cgroup.controllers").write_text("cpu\n")
        (base / "cpu.max").write_text("max 100000\n")
        cgroup = Cgroup(base)
        error = self.assertRaises(LimitError, cgroup.applyLimits, Limits(memory_bytes=64 << 20))
        self.assertIn("memory", str(error))
        self.assertEqual(cgroup.applyLimits(Limits(cpu=0.5)), {"cpu": 0.5})
        self.assertEqual((base / "cpu.max").read_text(), "50000 100000")


class RealCgroupTests(SynchronousTestCase):
    """Against the machine's cgroup v2 hierarchy (skipped without one we may write)."""

    def setUp(self) -> None:
        tree = CgroupTree.detect() if os.geteuid() == 0 else None
        if tree is None:
            raise SkipTest("no writable cgroup v2 hierarchy here")
        self.tree = tree
        self.cgroup = self.tree.create("test")
        self.addCleanup(self.cleanUp)

    def cleanUp(self) -> None:
        self.cgroup.kill()
        waitUntil(lambda: not self.cgroup.populated())
        waitUntil(self.cgroup.remove)

    def spawnInside(self, script: str) -> subprocess.Popen[bytes]:
        """Run C{script} with sh, entering the cgroup before anything else runs."""
        return subprocess.Popen(
            ["sh", "-c", f'echo $$ > "$1"; {script}', "sh", str(self.cgroup.procs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def test_killReachesADoubleForkedDaemon(self) -> None:
        """cgroup.kill ends a daemon that double-forked into a new session, which a process
        group kill would miss."""
        pidFile = Path(self.mktemp())
        child = self.spawnInside(f"setsid sh -c 'sleep 300 & echo $! > {pidFile}' & wait")
        child.wait()
        waitUntil(lambda: pidFile.exists() and pidFile.read_text().strip())
        daemon = int(pidFile.read_text())
        self.assertTrue(alive(daemon))
        self.assertNotEqual(os.getsid(daemon), os.getsid(0))
        self.assertIn(daemon, self.cgroup.pids())
        self.assertTrue(self.cgroup.kill())
        waitUntil(lambda: not alive(daemon))
        waitUntil(lambda: not self.cgroup.populated())

    def test_freezeAndThaw(self) -> None:
        """A frozen cgroup's processes stop running until thawed."""
        child = self.spawnInside("while :; do echo tick; sleep 0.01; done")
        assert child.stdout is not None
        child.stdout.readline()
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.wait)
        self.addCleanup(self.cgroup.kill)
        self.assertTrue(self.cgroup.freeze())
        waitUntil(self.cgroup.frozen)
        self.assertTrue(self.cgroup.thaw())
        waitUntil(lambda: not self.cgroup.frozen())
        child.stdout.readline()

    def test_signalEveryMember(self) -> None:
        """A signal reaches every process of the cgroup, whatever its session."""
        pidFile = Path(self.mktemp())
        self.spawnInside(f"setsid sh -c 'sleep 300 & echo $! > {pidFile}' & wait").wait()
        waitUntil(lambda: pidFile.exists() and pidFile.read_text().strip())
        daemon = int(pidFile.read_text())
        self.assertGreaterEqual(self.cgroup.signal(15), 1)
        waitUntil(lambda: not alive(daemon))

    def test_usageWithoutControllers(self) -> None:
        """Usage reports what the cgroup has: CPU always, memory/pids only with controllers."""
        usage = self.cgroup.usage()
        self.assertEqual(set(usage), {"memory_peak_bytes", "cpu_seconds", "pids_peak"})
        if "memory" not in self.cgroup.controllers():
            self.assertIsNone(usage["memory_peak_bytes"])
            self.assertRaises(LimitError, self.cgroup.applyLimits, Limits(memory_bytes=64 << 20))

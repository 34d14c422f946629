"""What a shell started, found and killed without cgroups: real processes, no reactor."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.shells.scope import (
    UNIT_VARIABLE,
    TreeScope,
    descendants,
    marked,
    sessionMembers,
)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def waitFor(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Look at ``condition()`` every 20 ms until it holds or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class TreeScopeTests(SynchronousTestCase):
    def spawn(self, script: str, token: str) -> subprocess.Popen[bytes]:
        """``sh -c script`` as a session leader, marked with ``token``."""
        env = dict(os.environ, **{UNIT_VARIABLE: token})
        process = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)
        self.addCleanup(process.wait, 10)
        self.addCleanup(_killQuietly, process.pid)
        return process

    def test_descendantsSessionAndMarkerAreFoundAndKilled(self) -> None:
        """Children, a setsid grandchild whose parent exited, and session members are found
        (by descendants, marker and session) and all killed, the leader included."""
        token = f"test-{secrets.token_hex(4)}"
        process = self.spawn("sleep 300 & setsid sh -c 'sleep 301' & sleep 302; wait", token)
        self.assertTrue(waitFor(lambda: len(marked(token)) >= 4), marked(token))
        self.assertGreaterEqual(len(descendants([process.pid])), 3)
        self.assertIn(process.pid, sessionMembers(process.pid))
        found = set(marked(token))
        scope = TreeScope(process.pid, token)
        self.assertTrue(scope.leaderAlive())
        scope.kill()
        process.wait(10)
        self.assertTrue(waitFor(lambda: not any(alive(pid) for pid in found)))
        self.assertFalse(scope.leaderAlive())

    def test_reapedLeaderIsNotAlive(self) -> None:
        """Once the shell is reaped, the scope says so (its group id may be reused)."""
        process = self.spawn("exit 0", "unused")
        scope = TreeScope(process.pid, "unused")
        process.wait(10)
        self.assertFalse(scope.leaderAlive())
        scope.release()


def _killQuietly(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except OSError:
        pass

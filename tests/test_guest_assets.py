"""The guest assets on the host: the init script's supervisor, and the VM runner's plumbing.

The real proof is the VM tier (``make vm-test``), which boots a guest and starts the agent
through the systemd unit and the init script. These tests are the fast part of it that needs
no VM: the init script's supervisor (start, restart after SIGKILL, stop, status, settings)
with a stand-in for twistd that records its command line and sleeps, and the runner's
serial-port follower.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import pyro_reactor.guest
from tests.vm.guest_checks import alive
from tests.vm.runner import Follower

GUEST = Path(pyro_reactor.guest.__path__[0])
INIT_SCRIPT = GUEST / "pyro-agent.init"

FAKE_TWISTD = """#!/bin/sh
echo "$$ $*" >> "{calls}"
exec sleep 300
"""


class InitScriptTests(SynchronousTestCase):
    """``pyro-agent.init`` with a stand-in twistd, pid files and log in a temporary dir."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.calls = self.root / "calls"
        twistd = self.root / "twistd"
        twistd.write_text(FAKE_TWISTD.format(calls=self.calls))
        twistd.chmod(0o755)
        self.env = {
            **os.environ,
            "PYRO_AGENT_TWISTD": str(twistd),
            "PYRO_AGENT_LOG": str(self.root / "agent.log"),
            "PYRO_AGENT_RUNDIR": str(self.root),
            "PYRO_AGENT_ARGS": "--listen tcp:5006 --threads 2",
        }
        self.addCleanup(self.script, "stop")

    def script(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", str(INIT_SCRIPT), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def agentPid(self, other: int = 0, timeout: float = 10.0) -> int:
        """The agent's pid from its pid file, once it is a live process other than ``other``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = int((self.root / "pyro-agent.pid").read_text())
            except (OSError, ValueError):
                pid = 0
            if pid and pid != other and alive(pid):
                return pid
            time.sleep(0.05)
        self.fail(f"no agent other than {other} started; log: {self.log()}")

    def log(self) -> str:
        try:
            return (self.root / "agent.log").read_text()
        except OSError:
            return ""

    def test_startRunsTheAgentCommand(self) -> None:
        """The agent runs as twistd's ``pyro-agent`` on vsock:5005, plus the settings."""
        self.assertEqual(self.script("start").returncode, 0)
        pid = self.agentPid()
        [call] = self.calls.read_text().splitlines()
        self.assertEqual(
            call,
            f"{pid} --nodaemon --pidfile= --logger=pyro_reactor.logs.observer pyro-agent"
            " --listen vsock:5005 --listen tcp:5006 --threads 2",
        )
        status = self.script("status")
        self.assertEqual(status.returncode, 0)
        self.assertIn(f"agent {pid}", status.stdout)

    def test_agentLeadsItsSession(self) -> None:
        """The agent leads a session of its own (its scheduler autogroup is its own to weigh),
        under the pid the supervisor waits for and ``stop`` signals."""
        if shutil.which("setsid") is None:
            raise SkipTest("no setsid program here")
        self.script("start")
        pid = self.agentPid()
        self.assertEqual(os.getsid(pid), pid)
        supervisor = int((self.root / "pyro-agent.supervisor.pid").read_text())
        self.assertNotEqual(os.getsid(supervisor), pid)
        self.assertEqual(self.script("stop").returncode, 0)
        self.assertFalse(alive(pid))

    def test_killedAgentIsStartedAgain(self) -> None:
        """SIGKILL to the agent: the supervisor starts a new one; the log says why."""
        self.script("start")
        first = self.agentPid()
        os.kill(first, signal.SIGKILL)
        second = self.agentPid(other=first)
        self.assertNotEqual(first, second)
        self.assertIn("the agent stopped (status 137); starting it again", self.log())

    def test_stopEndsSupervisorAndAgent(self) -> None:
        """After ``stop`` nothing is left running, and ``status`` says so with exit 3."""
        self.script("start")
        agent = self.agentPid()
        supervisor = int((self.root / "pyro-agent.supervisor.pid").read_text())
        stopped = self.script("stop")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertFalse(alive(agent))
        self.assertFalse(alive(supervisor))
        self.assertFalse((self.root / "pyro-agent.pid").exists())
        self.assertEqual(self.script("status").returncode, 3)

    def test_startTwiceKeepsOneAgent(self) -> None:
        """A second ``start`` is a no-op: still one supervisor, one agent."""
        self.script("start")
        agent = self.agentPid()
        again = self.script("start")
        self.assertEqual(again.returncode, 0)
        self.assertIn("already running", again.stdout)
        time.sleep(0.3)
        self.assertEqual(len(self.calls.read_text().splitlines()), 1)
        self.assertTrue(alive(agent))

    def test_runRaisesTheDescriptorLimit(self) -> None:
        """``run`` raises ``ulimit -n`` to 65536 (the systemd unit's limit) before twistd."""
        twistd = self.root / "twistd"
        twistd.write_text('#!/bin/sh\nulimit -n > "{}"\n'.format(self.root / "nofile"))
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

        def lowLimit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

        subprocess.run(
            ["/bin/sh", str(INIT_SCRIPT), "run"],
            env=self.env,
            preexec_fn=lowLimit,
            timeout=30,
            check=True,
        )
        limit = int((self.root / "nofile").read_text())
        if hard == resource.RLIM_INFINITY or hard >= 65536:
            self.assertEqual(limit, 65536)
        else:
            # Raising the hard limit needs CAP_SYS_RESOURCE: without it, the hard limit.
            self.assertIn(limit, (65536, hard))

    def test_unknownCommand(self) -> None:
        """The init script refuses an unknown command with exit status 2 and its usage."""
        result = self.script("bounce")
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage:", result.stderr)


class FollowerTests(SynchronousTestCase):
    """The runner reads serial-port files as QEMU writes them: whole lines only."""

    def test_linesAcrossWrites(self) -> None:
        """The serial-port follower yields whole lines only, joining lines split across writes
        and replacing invalid bytes."""
        path = Path(self.mktemp())
        follower = Follower(path)
        self.assertEqual(list(follower.lines()), [])
        with path.open("ab") as port:
            port.write(b"ok vsock.ping\r\nok vsock.ex")
            port.flush()
            self.assertEqual(list(follower.lines()), ["ok vsock.ping"])
            port.write(b"ec: exit 7\n\xff\n")
            port.flush()
            self.assertEqual(list(follower.lines()), ["ok vsock.exec: exit 7", "\ufffd"])
        self.assertEqual(list(follower.lines()), [])

"""The reference launcher's pieces that do not need root: the loopback socket view and the
re-pointing of the reference agent's module globals (the namespace part is exercised by every
test of tests/test_parity.py, which start the reference through it)."""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.reference_launcher import LoopbackSocketModule, loadAgent

FAKE_AGENT = """\
import socket
from pathlib import Path
PORT = 5005
SHELL_ROOT = Path("/run/pyro-shells")
SERVICE_ROOT = Path("/run/pyro-services")
SECRET_ROOT = Path("/run/pyro-secrets")
"""


class LauncherTests(SynchronousTestCase):
    def test_vsockMeansLoopback(self) -> None:
        """The socket view answers the vsock family and "any CID" with IPv4 loopback, and
        everything else with the real socket module's names."""
        view = LoopbackSocketModule()
        self.assertEqual(view.AF_VSOCK, socket.AF_INET)
        self.assertEqual(view.VMADDR_CID_ANY, "127.0.0.1")
        self.assertIs(view.socket, socket.socket)
        self.assertEqual(view.SOCK_STREAM, socket.SOCK_STREAM)

    def test_agentGlobalsRepointed(self) -> None:
        """The loaded agent listens on the given port, keeps its /run roots in the state
        directory and sees the loopback socket view."""
        directory = Path(self.mktemp())
        directory.mkdir()
        script = directory / "agent.py"
        script.write_text(FAKE_AGENT)
        state = directory / "state"
        agent = loadAgent(script, 4321, state)
        self.assertEqual(agent.PORT, 4321)
        self.assertEqual(agent.SHELL_ROOT, state / "pyro-shells")
        self.assertEqual(agent.SERVICE_ROOT, state / "pyro-services")
        self.assertEqual(agent.SECRET_ROOT, state / "pyro-secrets")
        self.assertIsInstance(agent.socket, LoopbackSocketModule)

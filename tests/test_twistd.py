"""The agent as users start it: ``twistd pyro-agent`` in its own process, over TCP and UNIX."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from pyro_reactor.tap import LISTEN_BACKLOG, checkEndpoint, withBacklog
from tests.helpers import freePort
from tests.twistd_helpers import TWISTD, ask, spawnTwistd, tcpConnector, unixConnector


class BacklogTests(SynchronousTestCase):
    """Listening endpoints get a backlog fit for hosts that connect by the hundred."""

    def test_added(self) -> None:
        """tcp, tcp6, unix and vsock endpoints without a backlog get L{LISTEN_BACKLOG}; the
        result still parses."""
        for description in [
            "tcp:5005:interface=127.0.0.1",
            "tcp6:5005",
            "unix:/run/pyro.sock",
            "vsock:5005",
        ]:
            with_ = withBacklog(description)
            self.assertEqual(with_, f"{description}:backlog={LISTEN_BACKLOG}")
            checkEndpoint(with_)

    def test_kept(self) -> None:
        """A backlog the user gave is kept; other endpoint types are left alone."""
        for description in [
            "tcp:5005:backlog=7",
            "vsock:5005:backlog=3",
            "systemd:domain=INET:index=0",
        ]:
            self.assertEqual(withBacklog(description), description)


class TwistdTests(TestCase):
    def startTwistd(self, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        """The agent with C{extra} options (``--logger`` ones go to twistd) and its directory."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        twistdArgs = [a for a in extra if a.startswith("--logger")]
        agentArgs = [a for a in extra if not a.startswith("--logger")]
        return spawnTwistd(self, base, agentArgs, twistdArgs=twistdArgs), base

    def test_tcpAndUnixTogether(self) -> None:
        """--listen is repeatable; both endpoints serve the same agent; dirs are created."""
        port = freePort()
        sock = Path(self.mktemp()).absolute()
        process, base = self.startTwistd(
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", f"unix:{sock}"
        )
        overTcp = ask(tcpConnector(port), {"action": "ping"})
        self.assertEqual(overTcp["pid"], process.pid)
        overUnix = ask(unixConnector(sock), {"action": "ping"})
        self.assertEqual(overUnix["pid"], process.pid)
        for name in ("pyro-shells", "pyro-services", "pyro-secrets"):
            self.assertTrue((base / "state" / name).is_dir(), name)
        self.assertTrue((base / "ws").is_dir())
        log = (base / "twistd.log").read_text()
        self.assertIn(f"listening on tcp:{port}", log)

    def test_listenBacklog(self) -> None:
        """The agent's TCP socket listens with a backlog of L{LISTEN_BACKLOG} (``ss`` shows
        a listening socket's backlog as its Send-Q)."""
        ss = shutil.which("ss")
        if ss is None:
            raise SkipTest("no ss (iproute2) on this machine")
        port = freePort()
        self.startTwistd("--listen", f"tcp:{port}:interface=127.0.0.1")
        ask(tcpConnector(port), {"action": "ping"})
        shown = subprocess.run(
            [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        self.assertEqual(shown[0], "LISTEN")
        self.assertEqual(int(shown[2]), LISTEN_BACKLOG)

    def test_jsonLogsOneEventPerRequest(self) -> None:
        """--logger gives JSON lines; each request is logged with action, outcome, duration."""
        port = freePort()
        process, base = self.startTwistd(
            "--logger=pyro_reactor.logs.observer", "--listen", f"tcp:{port}:interface=127.0.0.1"
        )
        connect = tcpConnector(port)
        ask(connect, {"action": "ping"})
        ask(connect, {"action": "no-such-action"})
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        events = [json.loads(line) for line in (base / "twistd.log").read_text().splitlines()]
        requests = [e for e in events if e.get("log_namespace") == "pyro_reactor.wire.dispatch"]
        self.assertEqual([e["action"] for e in requests], ["ping", "no-such-action"])
        self.assertEqual([e["outcome"] for e in requests], ["ok", "error"])
        self.assertIsInstance(requests[0]["duration_ms"], float)

    def test_badOption(self) -> None:
        """A bad option is reported and the agent does not start."""
        result = subprocess.run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "pyro-agent", "--max-request-bytes", "-5"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"must be positive", result.stdout + result.stderr)

    def test_badListenEndpoint(self) -> None:
        """A --listen string that does not parse is a usage error naming it, not a traceback.

        One good endpoint before the bad one: nothing may start listening either way.
        """
        port = freePort()
        base = Path(self.mktemp()).absolute()
        for bad, reason in [
            ("tcp:5005:inteface=127.0.0.1", b"inteface"),
            ("nosuchtype:5005", b"Unknown endpoint type"),
            ("vsock:port=5005:cid=WHAT", b"vsock cid"),
            ("tcp:abc", b"abc"),
        ]:
            argv = [str(TWISTD), "--nodaemon", "--pidfile=", "pyro-agent"]
            argv += ["--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", bad]
            argv += ["--workspace", str(base / "ws"), "--state-dir", str(base / "state")]
            result = subprocess.run(
                argv,
                capture_output=True,
                timeout=60,
                check=False,
            )
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0, bad)
            self.assertIn(f"bad --listen endpoint {bad!r}".encode(), output)
            self.assertIn(reason, output)
            self.assertNotIn(b"Traceback", output)
            self.assertFalse((base / "ws").exists(), "the agent must not have started")

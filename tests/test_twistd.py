"""The agent as users start it: ``twistd pyro-agent`` in its own process, over TCP and UNIX."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

TWISTD = Path(sys.executable).with_name("twistd")


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ask(connect: Any, request: dict[str, Any], deadline: float = 20.0) -> dict[str, Any]:
    """Send one request with a blocking socket, retrying until the agent listens."""
    give_up = time.monotonic() + deadline
    while True:
        try:
            with connect() as conn:
                conn.settimeout(10)
                conn.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answer = json.loads(data)
                assert isinstance(answer, dict)
                return answer
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)


class TwistdTests(TestCase):
    def startTwistd(self, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        log = base / "twistd.log"
        argv = [str(TWISTD), "--nodaemon", "--pidfile="]
        argv += [a for a in extra if a.startswith("--logger")]
        argv += ["pyro-agent"] + [a for a in extra if not a.startswith("--logger")]
        argv += ["--workspace", str(base / "ws"), "--state-dir", str(base / "state")]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=base)

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

        self.addCleanup(stop)
        return process, base

    def test_tcpAndUnixTogether(self) -> None:
        """--listen is repeatable; both endpoints serve the same agent; dirs are created."""
        port = freePort()
        sock = Path(self.mktemp()).absolute()
        process, base = self.startTwistd(
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", f"unix:{sock}"
        )
        overTcp = ask(lambda: socket.create_connection(("127.0.0.1", port)), {"action": "ping"})
        self.assertEqual(overTcp["pid"], process.pid)

        def unixConnection() -> socket.socket:
            conn = socket.socket(socket.AF_UNIX)
            try:
                conn.connect(str(sock))
            except OSError:
                conn.close()
                raise
            return conn

        overUnix = ask(unixConnection, {"action": "ping"})
        self.assertEqual(overUnix["pid"], process.pid)
        for name in ("pyro-shells", "pyro-services", "pyro-secrets"):
            self.assertTrue((base / "state" / name).is_dir(), name)
        self.assertTrue((base / "ws").is_dir())
        log = (base / "twistd.log").read_text()
        self.assertIn(f"listening on tcp:{port}", log)

    def test_jsonLogsOneEventPerRequest(self) -> None:
        """--logger gives JSON lines; each request is logged with action, outcome, duration."""
        port = freePort()
        process, base = self.startTwistd(
            "--logger=pyro_reactor.logs.observer", "--listen", f"tcp:{port}:interface=127.0.0.1"
        )
        connect = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
        ask(connect, {"action": "ping"})
        ask(connect, {"action": "no-such-action"})
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        events = [json.loads(line) for line in (base / "twistd.log").read_text().splitlines()]
        requests = [e for e in events if e.get("log_namespace") == "pyro_reactor.dispatch"]
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

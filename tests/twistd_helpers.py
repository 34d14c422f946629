"""Shared fixtures for tests of the agent as users run it: ``twistd pyro-agent`` in a subprocess.

``spawnTwistd(case, base, [...])`` starts the agent with its workspace and state directory
under ``base`` and output in a log file, stopped by the test case's cleanups. ``ask`` sends one
request over a blocking socket (retrying until the agent listens) and returns the parsed answer;
``unixConnector`` and ``tcpConnector`` make the connections it asks over. (``freePort``, for a
``--listen`` option, is in L{tests.helpers}.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

TWISTD = Path(sys.executable).with_name("twistd")


def spawnTwistd(
    case: SynchronousTestCase,
    base: Path,
    agentArgs: Sequence[str],
    *,
    twistdArgs: Sequence[str] = (),
    log: Path | None = None,
    graceful: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``twistd [twistdArgs] pyro-agent [agentArgs]`` on ``base/ws`` and ``base/state``.

    Its output goes to C{log} (default ``base/twistd.log``). The case's cleanup stops it if it
    still runs: with SIGTERM and up to 10 s for an orderly shutdown (then SIGKILL) when
    C{graceful}, with SIGKILL straight away otherwise.
    """
    log = base / "twistd.log" if log is None else log
    argv = [str(TWISTD), "--nodaemon", "--pidfile=", *twistdArgs, "pyro-agent", *agentArgs]
    argv += ["--workspace", str(base / "ws"), "--state-dir", str(base / "state")]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=base)

    def stop() -> None:
        if process.poll() is None:
            if graceful:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                    return
                except subprocess.TimeoutExpired:
                    pass
            process.kill()
        process.wait()

    case.addCleanup(stop)
    return process


def tcpConnector(port: int) -> Callable[[], socket.socket]:
    """Connections to 127.0.0.1:C{port}, for L{ask}."""
    return lambda: socket.create_connection(("127.0.0.1", port))


def unixConnector(path: Path) -> Callable[[], socket.socket]:
    """Connections to the UNIX socket at C{path}, for L{ask}."""

    def connect() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            raise
        return conn

    return connect


def ask(
    connect: Callable[[], socket.socket],
    request: dict[str, Any],
    deadline: float = 20.0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Send one request with a blocking socket and return the answer line, parsed.

    While the agent is not listening yet (connection refused, socket file missing) it retries
    every 50 ms for up to C{deadline} seconds; C{timeout} bounds each read.
    """
    giveUp = time.monotonic() + deadline
    while True:
        try:
            with connect() as conn:
                conn.settimeout(timeout)
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
            if time.monotonic() > giveUp:
                raise
            time.sleep(0.05)

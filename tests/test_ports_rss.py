"""The relay's memory bound on a real agent process: a host that stops reading while its guest
server floods must not grow the agent's RSS."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import freePort
from tests.twistd_helpers import ask, spawnTwistd, tcpConnector

MiB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class FloodServer:
    """A guest server writing 1 MiB chunks for as long as it can, counting them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(connection)
        chunk = b"f" * MiB
        try:
            while True:
                connection.sendall(chunk)
                self.sent += len(chunk)
        except OSError:
            return

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.listener.close()


class StalledReaderTests(SynchronousTestCase):
    def test_agentDoesNotGrow(self) -> None:
        """With the host not reading, the flood stalls after a few MiB (socket buffers and
        the relay's bounded buffers) and the agent's RSS stays within a few MiB of idle."""
        base = Path(self.mktemp())
        base.mkdir()
        port = freePort()
        agent = spawnTwistd(self, base, ["--listen", f"tcp:{port}:interface=127.0.0.1"])
        ask(tcpConnector(port), {"action": "ping"})
        idle = rss(agent.pid)
        server = FloodServer()
        self.addCleanup(server.close)
        host = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(host.close)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        host.sendall(json.dumps({"action": "connect_tcp", "port": server.port}).encode() + b"\n")
        # Wait until the flood has stalled: nothing sent for a while.
        deadline = time.monotonic() + 30
        last, stableSince = -1, time.monotonic()
        while time.monotonic() < deadline:
            if server.sent != last:
                last, stableSince = server.sent, time.monotonic()
            elif server.sent and time.monotonic() - stableSince > 1.0:
                break
            time.sleep(0.1)
        self.assertGreater(server.sent, 0)
        self.assertLess(server.sent, 64 * MiB, "the flood never stalled")
        grown = rss(agent.pid) - idle
        self.assertLess(grown, 16 * MiB, f"the agent grew by {grown / MiB:.1f} MiB")
        # Reading again gets everything that was sent, in order.
        host.settimeout(10)
        received = 0
        target = server.sent
        while received < target:
            received += len(host.recv(MiB))
        self.assertGreaterEqual(received, target)

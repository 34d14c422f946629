"""The TCP relay (``connect_tcp``) beside socat and a direct connection, on loopback.

A guest-side server process (echo, sink, flood; one thread per connection, the same for every
path) is reached three ways: through our agent's relay, through ``socat
TCP-LISTEN:...,fork TCP:127.0.0.1:...`` (how E2B forwards guest ports), and directly (the
floor). The reference agent has no relay, so the "reference" column here is **socat**.

- bulk: 1 GiB one way to the sink (256 MiB with ``--quick``), best of the rounds;
- round trips: 1 KiB request, 1 KiB answer, 10 000 sequential on one connection (2 000 with
  ``--quick``), p50;
- 200 relays at once, each moving 10 MiB to the sink: all must complete; the agent's RSS peak
  above its idle RSS (goal: at most 64 MiB);
- a host that stops reading while the guest floods: the agent's RSS growth after 3 s.

Runs standalone too: ``.venv/bin/python benchmarks/bench_relay.py [--quick]`` (needs socat).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__" and __package__ is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    OURS,
    Agent,
    Bench,
    BenchError,
    BenchSkipped,
    Row,
    freePort,
    percentile,
)

NAME = "relay"
ORDER = 95
MiB = 1024 * 1024
CHUNK = b"\0" * MiB


# -- the guest-side servers (run in their own process) -------------------------------------


def _serve(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_guarded, args=(handle, connection), daemon=True).start()


def _guarded(handle: Callable[[socket.socket], None], connection: socket.socket) -> None:
    try:
        with connection:
            handle(connection)
    except OSError:
        pass


def _echo(connection: socket.socket) -> None:
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := connection.recv(65536):
        connection.sendall(data)


def _sink(connection: socket.socket) -> None:
    total = 0
    while data := connection.recv(1024 * 1024):
        total += len(data)
    connection.sendall(b"%d\n" % total)


def _flood(connection: socket.socket) -> None:
    while True:
        connection.sendall(CHUNK)


def serveForever() -> None:
    """Listen for echo, sink and flood on free ports; print them as one JSON line."""
    ports = {}
    for name, handle in (("echo", _echo), ("sink", _sink), ("flood", _flood)):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        ports[name] = listener.getsockname()[1]
        threading.Thread(target=_serve, args=(listener, handle), daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


# -- the three paths ------------------------------------------------------------------------


class Paths:
    """The guest servers, and how to reach them: ``ours``, ``socat`` or ``direct``."""

    def __init__(self, bench: Bench) -> None:
        if shutil.which("socat") is None:
            raise BenchSkipped("socat is not installed (apt-get install socat)")
        self.processes: list[subprocess.Popen[bytes]] = []
        server = subprocess.Popen(
            [sys.executable, __file__, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=bench.repo,
        )
        self.processes.append(server)
        assert server.stdout is not None
        self.ports: dict[str, int] = json.loads(server.stdout.readline())
        self.socat: dict[str, int] = {}
        for name, port in self.ports.items():
            front = freePort()
            self.processes.append(
                subprocess.Popen(
                    [
                        "socat",
                        f"TCP-LISTEN:{front},fork,reuseaddr,bind=127.0.0.1,backlog=512",
                        f"TCP:127.0.0.1:{port}",
                    ],
                    stdin=subprocess.DEVNULL,
                )
            )
            self.socat[name] = front
        for front in self.socat.values():
            _waitListening(front)

    def open(self, how: str, server: str, agent: Agent | None = None) -> socket.socket:
        """A connected socket carrying raw bytes to ``server``."""
        if how == "direct":
            return socket.create_connection(("127.0.0.1", self.ports[server]), timeout=120)
        if how == "socat":
            return socket.create_connection(("127.0.0.1", self.socat[server]), timeout=120)
        assert agent is not None
        sock = socket.create_connection(("127.0.0.1", agent.port), timeout=120)
        request = {"action": "connect_tcp", "port": self.ports[server]}
        sock.sendall(json.dumps(request).encode() + b"\n")
        header = b""
        while not header.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                raise BenchError(f"the agent closed the relay: {header!r}")
            header += byte
        if json.loads(header).get("connected") is not True:
            raise BenchError(f"connect_tcp failed: {header!r}")
        return sock

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
            process.kill()
            process.wait()


def _waitListening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise BenchError(f"nothing listens on {port}")


# -- measurements ---------------------------------------------------------------------------


def bulk(sock: socket.socket, size: int) -> float:
    """Seconds to send ``size`` bytes to the sink and have it confirm them all."""
    view = memoryview(CHUNK)
    started = time.perf_counter()
    with sock:
        for _ in range(size // MiB):
            sock.sendall(view)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    elapsed = time.perf_counter() - started
    if int(answer or b"0") != size:
        raise BenchError(f"the sink got {answer!r} bytes, not {size}")
    return elapsed


def roundTrips(sock: socket.socket, count: int) -> list[float]:
    """Milliseconds of each of ``count`` sequential 1 KiB echo round trips."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"r" * 1024
    samples = []
    with sock:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the echo connection closed")
                got += len(chunk)
            samples.append((time.perf_counter() - started) * 1000)
    return samples


class RSSPeak:
    """Samples an agent's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.peak = agent.rssBytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.agent.rssBytes())
            except (OSError, BenchError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def many(paths: Paths, how: str, agent: Agent | None, count: int, size: int) -> tuple[float, int]:
    """Seconds for ``count`` relays at once to each move ``size`` bytes; how many completed."""

    def one(_: int) -> bool:
        try:
            bulk(paths.open(how, "sink", agent), size)
        except (OSError, BenchError):
            return False
        return True

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        done = sum(pool.map(one, range(count)))
    return time.perf_counter() - started, done


def stalledReader(paths: Paths, agent: Agent, seconds: float) -> int:
    """RSS growth (bytes) of the agent while a host does not read a flooding guest server."""
    before = agent.rssBytes()
    sock = paths.open("ours", "flood", agent)
    with sock:
        peak = RSSPeak(agent)
        time.sleep(seconds)
        highest = peak.stop()
    return max(0, highest - before)


def run(bench: Bench) -> list[Row]:
    paths = Paths(bench)
    try:
        return _measure(bench, paths)
    finally:
        paths.close()


def _measure(bench: Bench, paths: Paths) -> list[Row]:
    quick = bench.quick
    rounds = 1 if quick else min(bench.rounds, 3)
    size = (256 if quick else 1024) * MiB
    trips = 2000 if quick else 10_000
    agent = bench.launch(OURS)
    agent.waitForAnswer()
    hows = ("ours", "socat", "direct")

    seconds: dict[str, list[float]] = {how: [] for how in hows}
    for number in range(rounds):
        order = hows if number % 2 == 0 else hows[::-1]
        for how in order:
            seconds[how].append(bulk(paths.open(how, "sink", agent), size))
    rate = {how: size / min(values) / MiB for how, values in seconds.items()}

    latencies: dict[str, list[float]] = {how: [] for how in hows}
    slices = 10
    for number in range(slices):
        order = hows if number % 2 == 0 else hows[::-1]
        for how in order:
            latencies[how] += roundTrips(paths.open(how, "echo", agent), trips // slices)
    p50 = {how: percentile(values, 0.5) for how, values in latencies.items()}

    # Many at once: a fresh agent, so that its idle RSS is its own.
    crowd = bench.launch(OURS)
    crowd.waitForAnswer()
    idle = crowd.rssBytes()
    peak = RSSPeak(crowd)
    relays, size10 = 200, (2 if quick else 10) * MiB
    oursTime, oursDone = many(paths, "ours", crowd, relays, size10)
    highest = peak.stop()
    socatTime, socatDone = many(paths, "socat", None, relays, size10)
    growth = stalledReader(paths, crowd, 3.0)

    return [
        Row(
            f"relay bulk {size // MiB} MiB one way, time (ref = socat)",
            "s",
            min(seconds["ours"]),
            min(seconds["socat"]),
            goal=1.0,
            note=f"ours {rate['ours']:.0f} MiB/s, socat {rate['socat']:.0f} MiB/s, direct"
            f" {rate['direct']:.0f} MiB/s; best of {rounds}",
        ),
        Row(
            f"relay 1 KiB round trip p50 ({trips} seq.; ref = socat)",
            "ms",
            p50["ours"],
            p50["socat"],
            goal=1.2,
            note=f"direct {p50['direct']:.3f} ms; p90 ours"
            f" {percentile(latencies['ours'], 0.9):.3f} ms, socat"
            f" {percentile(latencies['socat'], 0.9):.3f} ms",
        ),
        Row(
            f"{relays} relays x {size10 // MiB} MiB at once (ref = socat)",
            "s",
            oursTime,
            socatTime,
            note=f"completed: ours {oursDone}/{relays}, socat {socatDone}/{relays}",
        ),
        Row(
            f"{relays} relays: agent RSS above idle",
            "MiB",
            (highest - idle) / MiB,
            None,
            note=f"goal <= 64 MiB; idle {idle / MiB:.1f} MiB, peak {highest / MiB:.1f} MiB",
        ),
        Row(
            "host stops reading a flooding guest (3 s): agent RSS growth",
            "MiB",
            growth / MiB,
            None,
            note="bounded by the relay's producers (no goal in the issue beyond 'must not grow')",
        ),
    ]


def main() -> int:
    from benchmarks.run import runAlone

    return runAlone(run, NAME)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serveForever()
    else:
        sys.exit(main())

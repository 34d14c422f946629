"""Our agent under abuse: does a ping still get through, and does memory stay in its budget?

Two measurements, ours only (the reference serves one connection at a time, so it has no
such figures to compare with):

- **A 200 MiB upload** (``extract_archive`` of 200 MiB that are not a tar, spooled to the
  state directory as they arrive, then refused) while a ping is sent every 20 ms: the ping's
  p99 and worst latency, beside the same pings on an idle agent. Goal: the upload delays a
  ping by at most 20 ms p99.
- **Every memory attack at once** (run by ``python benchmarks/bench_abuse.py`` alone, or by
  ``run.py --only abuse``): 8 clients that never read an exec answer of 16 MiB of ``0xff`` per
  stream, 30 connections each holding an unfinished 16 MiB request line, 2 lines of 16 MiB of
  ``{}`` objects, 4 exports of a 50 MB file never read, and a 200 MiB upload, while a ping is
  sent every 20 ms. Figures: the agent's peak resident size above its idle size (goal: under
  ``--memory-budget``, here 256 MiB), the ping's worst latency (goal: 100 ms) and pings failed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    OURS,
    Agent,
    Bench,
    BenchError,
    MiB,
    Pinger,
    Row,
    percentile,
)

NAME = "abuse"
ORDER = 90

PING = {"action": "ping"}
BUDGET = 256 * MiB
OPTIONS = ("--answer-timeout", "10", "--memory-budget", str(BUDGET))


class RssSampler:
    """Samples the agent's resident size every 20 ms in a thread; keeps the peak."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.agent.rssBytes())
            except (OSError, BenchError):
                return
            self._stop.wait(0.02)


def _upload(port: int, size: int) -> None:
    request = {"action": "extract_archive", "destination": "/workspace/up", "archive_size": size}
    with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
        connection.sendall(json.dumps(request).encode() + b"\n")
        # Not a tar: the agent answers an error right after spooling, so that the figure is
        # the transfer's (200 MiB of zeros would be scanned as a tar for tens of seconds).
        chunk = b"garbage!" * (MiB // 8)
        for _ in range(size // MiB):
            connection.sendall(chunk)
        connection.recv(65536)


def _silent(port: int, payload: bytes, hold: threading.Event) -> None:
    """Send ``payload`` and never read; close when ``hold`` is set."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        connection.connect(("127.0.0.1", port))
        connection.settimeout(60)
        connection.sendall(payload)
        hold.wait(60)
    except OSError:
        pass
    finally:
        connection.close()


def _answered(port: int, payload: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(payload)
            while connection.recv(65536):
                pass
    except OSError:
        pass


def _threads(jobs: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    return threads


def measureUpload(agent: Agent, rounds: int = 8) -> tuple[Pinger, Pinger, float]:
    """Pings on the idle agent, then pings during 200 MiB uploads; an upload's duration."""
    with Pinger(agent.port) as busy:
        started = time.monotonic()
        for _ in range(rounds):
            _upload(agent.port, 200 * MiB)
        took = (time.monotonic() - started) / rounds
    with Pinger(agent.port) as idle:
        time.sleep(took * rounds)
    return idle, busy, took


ATTACKS = ("exec", "lines", "objects", "exports", "upload")


def measureAttacks(agent: Agent, attacks: tuple[str, ...] = ATTACKS) -> tuple[int, int, Pinger]:
    """Every memory attack at once: (idle RSS, peak RSS, pinger)."""
    (agent.workspace / "big.bin").write_bytes(os.urandom(50 * 1000 * 1000))
    time.sleep(0.5)
    idle = agent.rssBytes()
    hold = threading.Event()
    ff = "head -c 16777216 /dev/zero | tr '\\0' '\\377'"
    execLine = json.dumps({"command": f"{ff}; {ff} >&2", "timeout_seconds": 60}).encode()
    openLine = b'{"action": "exec", "command": "' + b"a" * (16 * MiB - 100)
    objects = b'{"x": [' + b"{}," * (16 * MiB // 3 - 10) + b"{}]}\n"
    export = json.dumps({"action": "export_archive", "path": "/workspace/big.bin"}).encode()
    jobs: list[Callable[[], None]] = []
    if "exec" in attacks:
        jobs += [lambda: _silent(agent.port, execLine + b"\n", hold) for _ in range(8)]
    if "lines" in attacks:
        jobs += [lambda: _silent(agent.port, openLine, hold) for _ in range(30)]
    if "objects" in attacks:
        jobs += [lambda: _answered(agent.port, objects) for _ in range(2)]
    if "exports" in attacks:
        jobs += [lambda: _silent(agent.port, export + b"\n", hold) for _ in range(4)]
    if "upload" in attacks:
        jobs += [lambda: _upload(agent.port, 200 * MiB)]
    with RssSampler(agent) as rss, Pinger(agent.port) as pinger:
        threads = _threads(jobs)
        time.sleep(20)
        hold.set()
        for thread in threads:
            thread.join(60)
        time.sleep(1)
    return idle, rss.peak, pinger


def uploadRows(agent: Agent) -> list[Row]:
    idle, busy, took = measureUpload(agent)
    return [
        Row(
            "ping p99 during a 200 MiB upload (abs. goal 20 ms)",
            "ms",
            percentile(busy.latencies, 0.99),
            None,
            note=(
                f"idle p99 {percentile(idle.latencies, 0.99):.2f} ms;"
                f" max {max(busy.latencies):.1f} ms;"
                f" {len(busy.latencies)} pings, {busy.failures} failed;"
                f" upload {200 / took:.0f} MiB/s"
            ),
        )
    ]


def attackRows(agent: Agent, attacks: tuple[str, ...]) -> list[Row]:
    idleRss, peakRss, pinger = measureAttacks(agent, attacks)
    return [
        Row(
            f"RSS above idle under attack ({','.join(attacks)}; budget 256 MiB)",
            "MB",
            (peakRss - idleRss) / 1e6,
            None,
            note=f"idle {idleRss / 1e6:.1f} MB, peak {peakRss / 1e6:.1f} MB",
        ),
        Row(
            "worst ping under attack (abs. goal 100 ms)",
            "ms",
            max(pinger.latencies) if pinger.latencies else None,
            None,
            note=(
                f"p99 {percentile(pinger.latencies, 0.99):.1f} ms;"
                f" {len(pinger.latencies)} pings answered, {pinger.failures} failed"
            ),
        ),
    ]


def run(bench: Bench) -> list[Row]:
    """The upload row (also with ``--quick``), then every attack at once.

    ``PYRO_ABUSE_ATTACKS=exec,lines`` runs only those attacks (and no upload row).
    """
    agent = bench.launch(OURS, OPTIONS)
    agent.waitForAnswer()
    chosen = os.environ.get("PYRO_ABUSE_ATTACKS")
    if chosen:
        return attackRows(agent, tuple(chosen.split(",")))
    rows = uploadRows(agent)
    if not bench.quick:
        rows += attackRows(agent, ATTACKS)
    return rows


if __name__ == "__main__":
    from benchmarks.run import runAlone

    sys.exit(runAlone(run, NAME))

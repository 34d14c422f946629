"""Latency of ``exec`` of ``true``: the per-request cost on top of a fork+exec of a shell.

Alternating rounds of sequential requests, one connection each; p50 and p90 over all samples.
For scale, the note gives a bare ``/bin/sh -lc true`` run from this process, which is the floor
both agents sit on, and our ``ping`` (no process at all) shows our own per-request overhead.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from benchmarks.harness import OURS, REFERENCE, Agent, Bench, BenchError, Row, call, percentile

NAME = "exec"
ORDER = 20
REQUEST = {"command": "true", "timeout_seconds": 10}


def _samples(count: int) -> Callable[[Agent], list[float]]:
    def measure(agent: Agent) -> list[float]:
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            answer = call(agent.port, REQUEST)
            latencies.append((time.perf_counter() - started) * 1000)
            if answer.get("exit_code") != 0:
                raise BenchError(f"{agent.kind} did not run `true`: {answer}")
        return latencies

    return measure


def _ping(agent: Agent, count: int) -> float:
    """p50 of our ``ping``: the agent's own per-request cost, without any process."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        answer = call(agent.port, {"action": "ping"})
        latencies.append((time.perf_counter() - started) * 1000)
        if answer.get("pong") is not True:
            raise BenchError(f"ours did not answer ping: {answer}")
    return percentile(latencies, 0.5)


def _bareShell(count: int) -> float:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run(["/bin/sh", "-lc", "true"], check=True)
        latencies.append((time.perf_counter() - started) * 1000)
    return percentile(latencies, 0.5)


def run(bench: Bench) -> list[Row]:
    perRound = 30 if bench.quick else 100
    bench.alternate(1, _samples(10))  # warm-up: page cache, first imports
    rounds = bench.alternate(bench.rounds, _samples(perRound))
    ours = [sample for batch in rounds[OURS] for sample in batch]
    reference = [sample for batch in rounds[REFERENCE] for sample in batch]
    bare = _bareShell(perRound)
    count = f"{len(ours)} requests each"
    return [
        Row(
            "exec `true` p50",
            "ms",
            percentile(ours, 0.5),
            percentile(reference, 0.5),
            goal=1.0,
            note=f"{count}; bare sh -lc true p50 {bare:.2f} ms",
        ),
        Row("exec `true` p90", "ms", percentile(ours, 0.9), percentile(reference, 0.9)),
        Row(
            "ping p50 (ours only)",
            "ms",
            _ping(bench.agent(OURS), perRound),
            None,
            note="connect + one request + close, no process: the agent's own overhead",
        ),
    ]

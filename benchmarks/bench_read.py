"""A 1 MiB ``read_workspace_file``: a plain read, base64 and one JSON line of about 1.4 MB.

The file is written once into each agent's workspace (random bytes: base64 has nothing to
compress), then read back whole; each answer's content is checked against it.
"""

from __future__ import annotations

import base64
import os
import time

from benchmarks.harness import (
    OURS,
    REFERENCE,
    Agent,
    Bench,
    BenchError,
    MiB,
    Row,
    call,
    expectOk,
    median,
    percentile,
)

NAME = "read"
ORDER = 31


def run(bench: Bench) -> list[Row]:
    content = os.urandom(MiB)
    request = {"action": "read_workspace_file", "path": "/workspace/big.bin", "max_bytes": MiB}
    samples = 5 if bench.quick else 25

    def measure(agent: Agent) -> list[float]:
        (agent.workspace / "big.bin").write_bytes(content)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            answer = expectOk(agent.kind, call(agent.port, request, timeout=60))
            times.append((time.perf_counter() - started) * 1000)
            if base64.b64decode(answer.get("content_b64", "")) != content:
                raise BenchError(f"{agent.kind} read back other bytes")
        return times

    rounds = bench.alternate(1 if bench.quick else bench.rounds, measure)
    ours = [median(batch) for batch in rounds[OURS]]
    reference = [median(batch) for batch in rounds[REFERENCE]]
    tails = [percentile(batch, 0.9) for batch in rounds[OURS]]
    return [
        Row(
            "1 MiB read_workspace_file p50",
            "ms",
            median(ours),
            median(reference),
            goal=1.0,
            note=f"median of {len(ours)} rounds x {samples} reads; ours p90 {median(tails):.1f} ms",
        )
    ]

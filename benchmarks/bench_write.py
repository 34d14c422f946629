"""A 1 MiB ``write_workspace_file``: request parsing and an atomic write of the largest file.

The text is exactly 1 MiB of printable ASCII lines (the reference's limit is inclusive); its JSON
escaping adds a few percent. The file is checked on disk after each write.
"""

from __future__ import annotations

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
)

NAME = "write"
ORDER = 30


def _text() -> str:
    line = "".join(chr(32 + (i % 95)) for i in range(63)) + "\n"
    text = line * (MiB // len(line))
    return text + "x" * (MiB - len(text))


def run(bench: Bench) -> list[Row]:
    text = _text()
    assert len(text.encode()) == MiB
    request = {"action": "write_workspace_file", "path": "/workspace/big.txt", "text": text}

    def measure(agent: Agent) -> float:
        target = agent.workspace / "big.txt"
        target.unlink(missing_ok=True)
        started = time.perf_counter()
        answer = expectOk(agent.kind, call(agent.port, request, timeout=60))
        elapsed = (time.perf_counter() - started) * 1000
        if answer.get("bytes_written") != MiB or target.stat().st_size != MiB:
            raise BenchError(f"{agent.kind} wrote {answer} / {target.stat().st_size} bytes")
        return elapsed

    rounds = bench.alternate(1 if bench.quick else 3, measure)
    return [
        Row(
            "1 MiB write_workspace_file (median)",
            "ms",
            median(rounds[OURS]),
            median(rounds[REFERENCE]),
            goal=0.05,
            note=f"{len(rounds[OURS])} writes each",
        )
    ]

"""``stats``: the agent's CPU time per request, against the goal of 1 ms (issue 14).

The reference agent has no ``stats`` (nor ``ping``), so there is no reference column: the
figure stands against the goal, with a ``ping`` measured the same way beside it (what any
request costs: accept, framing, dispatch, the log line). CPU time is the agent process's
``utime + stime`` from ``/proc/PID/stat`` over a batch of sequential requests, so the
client's own work is not counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.harness import OURS, Bench, Row, call, expectOk, median

NAME = "stats"
ORDER = 60
BATCH = 300


def _cpuSeconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _perRequest(bench: Bench, action: str) -> float:
    """Milliseconds of the agent's CPU per request, over one batch."""
    agent = bench.agent(OURS)
    before = _cpuSeconds(agent.process.pid)
    for _ in range(BATCH):
        expectOk(OURS, call(agent.port, {"action": action}))
    return (_cpuSeconds(agent.process.pid) - before) / BATCH * 1000


def run(bench: Bench) -> list[Row]:
    stats: list[float] = []
    ping: list[float] = []
    for _ in range(bench.rounds):
        stats.append(_perRequest(bench, "stats"))
        ping.append(_perRequest(bench, "ping"))
    return [
        Row(
            "stats: agent CPU per request (median)",
            "ms",
            median(stats),
            None,
            note=f"goal <= 1 ms; a ping costs {median(ping):.2f} ms; {bench.rounds} x {BATCH}",
        )
    ]

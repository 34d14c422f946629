"""Start-up to first answer, and idle RSS, of freshly started agents.

Each round starts a new agent of each kind (alternating who goes first), times from spawning the
process to its first answer (an exec of ``true``: any JSON answer counts), lets it sit idle for a
moment, reads its resident set size, and stops it.
"""

from __future__ import annotations

import time

from benchmarks.harness import KINDS, OURS, REFERENCE, Bench, MiB, Row, median

NAME = "startup"
ORDER = 10
IDLE_SECONDS = 1.0


def run(bench: Bench) -> list[Row]:
    startup: dict[str, list[float]] = {kind: [] for kind in KINDS}
    rss: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for number in range(bench.rounds):
        order = KINDS if number % 2 == 0 else KINDS[::-1]
        for kind in order:
            agent = bench.launch(kind)
            try:
                answered = agent.waitForAnswer()
                startup[kind].append(answered - agent.startedAt)
                time.sleep(IDLE_SECONDS)
                rss[kind].append(agent.rssBytes() / MiB)
            finally:
                agent.stop()
    return [
        Row(
            "start-up to first answer (median)",
            "s",
            median(startup[OURS]),
            median(startup[REFERENCE]),
            goal=2.0,
            note=f"{bench.rounds} fresh starts each",
        ),
        Row(
            "idle RSS (median)",
            "MiB",
            median(rss[OURS]),
            median(rss[REFERENCE]),
            goal=1.5,
            note=f"VmRSS {IDLE_SECONDS:g} s after the first answer",
        ),
    ]

"""``watch_workspace``: how soon a change is reported, and a burst of 10 000 new files.

- latency: a file written (open, write, close) in the workspace, until its ``modified`` line
  reaches the host; 200 files one after the other (50 with ``--quick``), p50 and p90 (the
  issue's goal: p50 within 20 ms);
- burst: 10 000 files created as fast as this process can (2 000 with ``--quick``); every one
  must be reported, or an ``overflow`` line sent (never silently dropped).

There is no reference column: the reference agent has no watch. Runs standalone too:
``.venv/bin/python benchmarks/bench_watch.py [--quick]``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and __package__ is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import OURS, Bench, BenchError, Row, percentile

NAME = "watch"
ORDER = 96


class Stream:
    """A watch stream read in a thread; each event's arrival time, by event and path."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(json.dumps({"action": "watch_workspace"}).encode() + b"\n")
        self.file = self.sock.makefile("rb")
        first = json.loads(self.file.readline())
        if "watching" not in first:
            raise BenchError(f"watch_workspace answered {first}")
        self.seen: dict[tuple[str, str], float] = {}
        self.overflows = 0
        self.count = 0
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.file:
            now = time.perf_counter()
            event = json.loads(line)
            with self.changed:
                if event.get("event") == "overflow":
                    self.overflows += 1
                else:
                    self.seen.setdefault((event.get("event", ""), event.get("path", "")), now)
                self.count += 1
                self.changed.notify_all()

    def waitFor(self, key: tuple[str, str], timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        with self.changed:
            while key not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {key} within {timeout} s")
                self.changed.wait(left)
            return self.seen[key]

    def close(self) -> None:
        self.sock.close()


def run(bench: Bench) -> list[Row]:
    agent = bench.launch(OURS)
    agent.waitForAnswer()
    workspace = agent.workspace
    files = 50 if bench.quick else 200
    burst = 2000 if bench.quick else 10_000

    stream = Stream(agent.port)
    try:
        latencies = []
        for number in range(files):
            path = workspace / f"latency-{number}.txt"
            started = time.perf_counter()
            with path.open("w") as handle:
                handle.write("x" * 100)
            arrived = stream.waitFor(("modified", f"/workspace/latency-{number}.txt"))
            latencies.append((arrived - started) * 1000)
            time.sleep(0.005)
    finally:
        stream.close()

    stream = Stream(agent.port)
    try:
        (workspace / "burst").mkdir()
        started = time.perf_counter()
        for number in range(burst):
            (workspace / "burst" / f"f{number}").touch()
        created = time.perf_counter() - started
        deadline = time.monotonic() + 60
        wanted = [("created", f"/workspace/burst/f{n}") for n in range(burst)]
        with stream.changed:
            while time.monotonic() < deadline and not stream.overflows:
                if all(key in stream.seen for key in wanted):
                    break
                stream.changed.wait(0.5)
            reported = sum(key in stream.seen for key in wanted)
            last = max((stream.seen[key] for key in wanted if key in stream.seen), default=0.0)
            overflows = stream.overflows
    finally:
        stream.close()

    p50 = percentile(latencies, 0.5)
    complete = reported == burst or overflows > 0
    return [
        Row(
            "watch: write -> modified line, p50",
            "ms",
            p50,
            None,
            note=f"goal <= 20 ms: {'met' if p50 <= 20 else 'MISSED'}; p90"
            f" {percentile(latencies, 0.9):.2f} ms over {files} files",
        ),
        Row(
            f"watch: burst of {burst} new files, reported",
            "files",
            float(reported),
            None,
            note=f"overflow lines: {overflows}; {'never silently dropped' if complete else 'LOST'}"
            f"; created in {created * 1000:.0f} ms, last reported"
            f" {(last - started) * 1000:.0f} ms after the first was made",
        ),
    ]


def main() -> int:
    from benchmarks.run import runAlone

    return runAlone(run, NAME)


if __name__ == "__main__":
    sys.exit(main())

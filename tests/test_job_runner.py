"""The job runner's own pieces: the exit record it writes without ``json``, the signal names
it is given, and the spec it reads."""

from __future__ import annotations

import json
import marshal
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.jobs import _runner
from pyro_reactor.capabilities.jobs.registry import SIGNAL_NAMES


class ExitRecordTests(SynchronousTestCase):
    """The ``exit`` file is the JSON ``json.dumps`` would write."""

    def test_outcomes(self) -> None:
        """Exit codes, signals, time-outs and end times come out as JSON of the same values."""
        outcomes: list[dict[str, Any]] = [
            {"exit_code": 0, "signal": None, "timed_out": False, "ended_at": 1796425694.2415},
            {"exit_code": 255, "signal": None, "timed_out": True, "ended_at": 1.5e9},
            {"exit_code": None, "signal": "TERM", "timed_out": False, "ended_at": 0.1},
            {"exit_code": None, "signal": "64", "timed_out": True, "ended_at": 12.0},
        ]
        for outcome in outcomes:
            self.assertEqual(json.loads(_runner.exitRecord(outcome)), outcome)

    def test_signalNames(self) -> None:
        """The names the agent gives the runner are the ones ``signal`` knows, without SIG."""
        self.assertEqual(SIGNAL_NAMES[signal.SIGTERM], "TERM")
        self.assertEqual(SIGNAL_NAMES[signal.SIGKILL], "KILL")
        self.assertEqual(SIGNAL_NAMES[signal.SIGABRT], "ABRT")
        self.assertTrue(all(name.isalnum() for name in SIGNAL_NAMES.values()))


class RunnerProcessTests(SynchronousTestCase):
    """The runner as the agent starts it: spec on descriptor 3, pid on descriptor 4."""

    def runJob(self, argv: list[str]) -> tuple[bytes, dict[str, object]]:
        exitPath = Path(self.mktemp())
        spec = {
            "argv": argv,
            "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            "cgroup_procs": None,
            "timeout_seconds": None,
            "exit_path": str(exitPath),
            "signal_names": SIGNAL_NAMES,
        }
        specRead, specWrite = os.pipe()
        pidRead, pidWrite = os.pipe()
        os.write(specWrite, marshal.dumps(spec))
        os.close(specWrite)

        def descriptors() -> None:
            os.dup2(specRead, 3)
            os.dup2(pidWrite, 4)

        runner = subprocess.Popen(
            [sys.executable, "-I", "-S", _runner.__file__],
            close_fds=False,  # the descriptors 3 and 4 made in the child stay open
            preexec_fn=descriptors,  # noqa: PLW1509 - no threads in this test
            stdout=subprocess.PIPE,
        )
        os.close(specRead)
        os.close(pidWrite)
        output, _ = runner.communicate(timeout=30)
        pid = os.read(pidRead, 100)
        os.close(pidRead)
        self.assertEqual(runner.returncode, 0)
        self.assertTrue(pid.strip().isdigit())
        return output, json.loads(exitPath.read_text())

    def test_exitCode(self) -> None:
        """A command's output goes to the runner's standard output; its exit code is kept."""
        output, outcome = self.runJob(["sh", "-c", "echo hello; exit 3"])
        self.assertEqual(output, b"hello\n")
        self.assertEqual((outcome["exit_code"], outcome["signal"]), (3, None))

    def test_signal(self) -> None:
        """A command ended by a signal is recorded with the signal's name."""
        _, outcome = self.runJob(["sh", "-c", "kill -TERM $$"])
        self.assertEqual((outcome["exit_code"], outcome["signal"]), (None, "TERM"))

"""The ``exec`` action over a real socket, and ``runCommand`` with real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.execute import (
    CommandResult,
    _Capture,
    _spawnEnvironment,
    commandEnvironment,
    exitCodeOf,
    runCommand,
)
from pyro_reactor.errors import ActionError
from pyro_reactor.system import processes
from pyro_reactor.system._twisted import SpawningProcess
from pyro_reactor.system.processes import signalGroup
from tests.helpers import alive, startAgent, waitUntil

reactor: Any = _reactor


class ExecOverTheWireTests(TestCase):
    async def test_answerShape(self) -> None:
        """An `exec` answer carries the command's stdout, stderr, exit code, a whole-millisecond
        duration and false truncation flags."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "exec", "command": "echo out; echo err >&2; exit 3"})
        self.assertEqual(answer["stdout"], "out\n")
        self.assertEqual(answer["stderr"], "err\n")
        self.assertEqual(answer["exit_code"], 3)
        self.assertIsInstance(answer["duration_ms"], int)
        self.assertGreaterEqual(answer["duration_ms"], 0)
        self.assertIs(answer["stdout_truncated"], False)
        self.assertIs(answer["stderr_truncated"], False)

    async def test_noActionFieldIsExec(self) -> None:
        """A request with a command and no `action` field runs the command, as the reference
        agent does."""
        agent = await startAgent(self)
        answer = await agent.call({"command": "echo plain"})
        self.assertEqual(answer["stdout"], "plain\n")
        self.assertEqual(answer["exit_code"], 0)

    async def test_unknownActionRunsNothing(self) -> None:
        """A misspelt action is answered with an error and its command is never run."""
        agent = await startAgent(self)
        marker = agent.workspace / "ran"
        answer = await agent.call({"action": "exce", "command": f"touch {marker}"})
        self.assertIn("error", answer)
        self.assertFalse(marker.exists())

    async def test_loginShell(self) -> None:
        """Commands run in a login shell, so the `.profile` in the given HOME is read first."""
        # sh -lc: a login shell, which reads $HOME/.profile.
        agent = await startAgent(self)
        home = agent.workspace / "home"
        home.mkdir()
        (home / ".profile").write_text("export FROM_PROFILE=yes\n")
        answer = await agent.call({"command": "echo $FROM_PROFILE", "env": {"HOME": str(home)}})
        self.assertEqual(answer["stdout"], "yes\n")

    async def test_signalledShellExitCodeIsNegative(self) -> None:
        """When the shell is killed by a signal, the exit code is the negative signal number."""
        agent = await startAgent(self)
        answer = await agent.call({"command": "kill -9 $$"})
        self.assertEqual(answer["exit_code"], -signal.SIGKILL)

    async def test_environment(self) -> None:
        """Variables from the request's `env` reach the command, numbers as text, and the agent's
        own environment is inherited beside them."""
        agent = await startAgent(self)
        os.environ["PYRO_TEST_INHERITED"] = "from the agent"
        self.addCleanup(os.environ.pop, "PYRO_TEST_INHERITED", None)
        answer = await agent.call(
            {
                "command": 'printf "%s|%s" "$PYRO_TEST_VALUE" "$PYRO_TEST_INHERITED"',
                "env": {"PYRO_TEST_VALUE": 42},
            }
        )
        self.assertEqual(answer["stdout"], "42|from the agent")

    async def test_environmentErrors(self) -> None:
        """An invalid variable name, an `env` that is not an object or a non-integer timeout is
        answered with an error instead of running the command."""
        agent = await startAgent(self)
        bad = await agent.call({"command": "true", "env": {"1BAD": "x"}})
        self.assertEqual(bad, {"error": "secret name is invalid"})
        notObject = await agent.call({"command": "true", "env": ["A=1"]})
        self.assertEqual(notObject, {"error": "exec env must be a JSON object"})
        badTimeout = await agent.call({"command": "true", "timeout_seconds": "soon"})
        self.assertEqual(badTimeout, {"error": "timeout_seconds must be an integer"})

    async def test_timeoutKillsTheWholeGroup(self) -> None:
        """A command that outlives its timeout is answered with exit code 124 and a timeout
        message, and its whole process group, background children included, is killed."""
        agent = await startAgent(self)
        pidFile = agent.workspace / "grandchild.pid"
        started = time.monotonic()
        answer = await agent.call(
            {
                "command": f"sleep 60 & echo $! > {pidFile}; echo partial; wait",
                "timeout_seconds": 1,
            }
        )
        elapsed = time.monotonic() - started
        self.assertEqual(
            {key: answer[key] for key in ("stdout", "stderr", "exit_code")},
            {"stdout": "", "stderr": "command timed out after 1s", "exit_code": 124},
        )
        self.assertGreaterEqual(answer["duration_ms"], 1000)
        self.assertLess(elapsed, 20)
        grandchild = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(grandchild)))

    async def test_timeoutKillsWhatIgnoresSigterm(self) -> None:
        """A command group that ignores SIGTERM is still killed after the grace period once its
        timeout passes."""
        pidFile = Path(self.mktemp()).absolute()
        result = await runCommand(
            reactor,
            f"trap '' TERM; sleep 60 & echo $! > {pidFile}; wait",
            timeoutSeconds=0.3,
            maxOutputBytes=1024,
        )
        self.assertTrue(result.timedOut)
        # The answer comes once the group is gone (after the SIGKILL grace).
        grandchild = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(grandchild), seconds=2))

    async def test_timeoutEndsChildrenThatLeftTheGroup(self) -> None:
        """A timed-out command leaves nothing: not even a ``setsid`` child (own session) that
        ignores SIGTERM, nor that child's own child."""
        pidFile = Path(self.mktemp()).absolute()
        script = (
            f"setsid sh -c 'trap \"\" TERM; sleep 300 & echo $$ $! > {pidFile}; wait' & sleep 300"
        )
        result = await runCommand(reactor, script, timeoutSeconds=1, maxOutputBytes=1024)
        self.assertTrue(result.timedOut)
        self.assertTrue(await waitUntil(lambda: pidFile.exists() and pidFile.read_text()))
        escaped = [int(pid) for pid in pidFile.read_text().split()]
        self.assertEqual(len(escaped), 2)
        self.assertTrue(await waitUntil(lambda: not any(alive(pid) for pid in escaped)))

    async def test_timeoutHookIsPluggable(self) -> None:
        """What a timeout ends is made by ``unitOf`` (a cgroup can take the tree's place)."""
        signalled: list[tuple[int, int]] = []

        class Recording:
            def __init__(self, pgid: int) -> None:
                self.pgid = pgid

            def signal(self, signum: int) -> bool:
                signalled.append((self.pgid, signum))
                return signalGroup(self.pgid, signal.SIGKILL)

            def alive(self) -> bool:
                return False

        result = await runCommand(
            reactor, "sleep 300", timeoutSeconds=0.2, maxOutputBytes=64, unitOf=Recording
        )
        self.assertTrue(result.timedOut)
        self.assertEqual([signum for _, signum in signalled], [signal.SIGTERM])

    async def test_agentStopEndsRunningCommands(self) -> None:
        """Stopping the agent's command service ends running commands, even ones ignoring
        SIGTERM, and still answers their requests."""
        agent = await startAgent(self)
        pidFile = agent.workspace / "grandchild.pid"
        # Both the shell and its child ignore SIGTERM: only the SIGKILL after the grace ends them.
        answered = agent.call(
            {
                "command": f"trap '' TERM; sleep 60 & echo $! > {pidFile}; wait",
                "timeout_seconds": 60,
            }
        )
        self.assertTrue(await waitUntil(lambda: pidFile.exists() and pidFile.read_text() != ""))
        commands = agent.context.services.getServiceNamed("exec-commands")
        await commands.stopService()
        answer = await answered
        self.assertEqual(answer["exit_code"], -signal.SIGKILL)
        grandchild = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(grandchild)))

    async def test_backgroundChildDoesNotHoldTheAnswer(self) -> None:
        """The answer comes as soon as the shell exits, and a child it started in the background
        is left running, as in a terminal."""
        agent = await startAgent(self)
        started = time.monotonic()
        answer = await agent.call({"command": "sleep 30 & echo $!", "timeout_seconds": 20})
        elapsed = time.monotonic() - started
        background = int(answer["stdout"])
        self.addCleanup(os.kill, background, signal.SIGKILL)
        self.assertEqual(answer["exit_code"], 0)
        self.assertLess(elapsed, 10)
        # Left running, as in a terminal.
        self.assertTrue(alive(background))

    async def test_outputAfterShellExitWithinGraceIsKept(self) -> None:
        """Output a background child writes shortly after the shell exits is still included in
        the result."""
        result = await runCommand(
            reactor,
            "(sleep 0.05; echo late) & echo early",
            timeoutSeconds=10,
            maxOutputBytes=1024,
        )
        self.assertEqual(result.stdout, "early\nlate\n")

    async def test_invalidUtf8AndSplitCharacters(self) -> None:
        """Output is decoded as UTF-8 with invalid bytes replaced, and a character split across
        two writes comes out whole."""
        agent = await startAgent(self)
        answer = await agent.call({"command": r"printf 'a\377b\303'; sleep 0.1; printf '\251'"})
        self.assertEqual(answer["stdout"], "a\ufffdb\u00e9")
        trailing = await agent.call({"command": r"printf 'x\303' >&2"})
        self.assertEqual(trailing["stderr"], "x\ufffd")

    async def test_carriageReturnsKept(self) -> None:
        """Carriage returns in output reach the host unchanged."""
        agent = await startAgent(self)
        answer = await agent.call({"command": r"printf 'a\r\nb\rc'"})
        self.assertEqual(answer["stdout"], "a\r\nb\rc")

    async def test_outputBounded(self) -> None:
        """Output beyond the agent's limit is cut off and flagged as truncated, each stream on
        its own, without failing the command."""
        agent = await startAgent(self, maxOutputBytes=10)
        answer = await agent.call(
            {"command": "head -c 1048576 /dev/zero | tr '\\0' x; echo short >&2"}
        )
        self.assertEqual(answer["stdout"], "x" * 10)
        self.assertIs(answer["stdout_truncated"], True)
        self.assertEqual(answer["stderr"], "short\n")
        self.assertIs(answer["stderr_truncated"], False)
        self.assertEqual(answer["exit_code"], 0)

    async def test_invalidOutputBoundedAsTheAnswerWritesIt(self) -> None:
        """A command printing invalid bytes gets an answer whose stdout, as JSON text, stays
        within --max-output-bytes (each U+FFFD is a six-byte escape), flagged truncated."""
        agent = await startAgent(self, maxOutputBytes=600)
        line = await agent.exchange({"command": "head -c 1048576 /dev/zero | tr '\\0' '\\377'"})
        answer = json.loads(line)
        self.assertIs(answer["stdout_truncated"], True)
        self.assertEqual(answer["stdout"], "\ufffd" * 100)
        self.assertLess(len(line), 600 + 200)

    async def test_manyAtOnce(self) -> None:
        """Many commands sent at once run side by side rather than one after another."""
        agent = await startAgent(self)
        started = time.monotonic()
        answers = await gatherResults(
            [agent.call({"command": "sleep 0.5; echo done"}) for _ in range(32)]
        )
        elapsed = time.monotonic() - started
        self.assertEqual([a["stdout"] for a in answers], ["done\n"] * 32)
        # One after another would take 16 s.
        self.assertLess(elapsed, 8)

    async def test_emptyCommand(self) -> None:
        """An `exec` with no command succeeds with empty output and exit code 0."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "exec"})
        self.assertEqual((answer["stdout"], answer["exit_code"]), ("", 0))

    async def test_nonPositiveTimeoutTimesOutAtOnce(self) -> None:
        """A timeout of zero times the command out at once, with exit code 124."""
        agent = await startAgent(self)
        answer = await agent.call({"command": "sleep 5", "timeout_seconds": 0})
        self.assertEqual(answer["exit_code"], 124)
        self.assertEqual(answer["stderr"], "command timed out after 0s")


class RunCommandTests(TestCase):
    async def test_workingDirectoryAndEnvironment(self) -> None:
        """A command runs in the given working directory with the given variables added to the
        agent's inherited environment."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        os.environ["PYRO_TEST_INHERITED"] = "kept"
        self.addCleanup(os.environ.pop, "PYRO_TEST_INHERITED", None)
        result = await runCommand(
            reactor,
            'echo "$PWD $ONLY $PYRO_TEST_INHERITED"',
            timeoutSeconds=10,
            env={"ONLY": "this"},
            cwd=directory,
            maxOutputBytes=1024,
        )
        self.assertEqual(result.stdout, f"{directory} this kept\n")
        self.assertEqual(result.exitCode, 0)
        self.assertFalse(result.timedOut)

    async def test_childReapedBeforeTheSpawnReturns(self) -> None:
        """A command that exits before the spawn call returns still gives its output and exit
        code, and is not left counted as running."""
        # On a busy machine a command can end before Twisted registers it, which reaps it at
        # once and clears transport.pid: make that happen every time.
        spawnOnly = SpawningProcess._trySpawnInsteadOfFork

        def spawnAndWaitForExit(process: Any, *args: Any) -> bool:
            spawned = spawnOnly(process, *args)
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            return spawned

        self.patch(SpawningProcess, "_trySpawnInsteadOfFork", spawnAndWaitForExit)
        running: set[int] = set()
        result = await runCommand(
            reactor, "echo quick", timeoutSeconds=5, maxOutputBytes=64, running=running
        )
        self.assertEqual((result.stdout, result.exitCode), ("quick\n", 0))
        self.assertEqual(running, set())

    async def test_agentIsNeverForked(self) -> None:
        """Commands are started with posix_spawn and the agent process is never forked, also when
        a working directory is given."""
        # posix_spawn only: forking the agent (Twisted's other way) costs 4-6 ms per command.

        def forbidden() -> int:
            raise AssertionError("the agent forked")

        self.patch(os, "fork", forbidden)
        plain = await runCommand(reactor, "echo plain", timeoutSeconds=5, maxOutputBytes=64)
        self.assertEqual(plain.stdout, "plain\n")
        if processes.probeChdirProgram() is not None:
            directory = Path(self.mktemp()).absolute()
            directory.mkdir()
            inside = await runCommand(
                reactor, "pwd", timeoutSeconds=5, cwd=directory, maxOutputBytes=1024
            )
            self.assertEqual(inside.stdout, f"{directory}\n")

    async def test_stdinIsEmpty(self) -> None:
        """A command's stdin is empty, so a program reading it does not hang."""
        result = await runCommand(reactor, "cat; echo end", timeoutSeconds=5, maxOutputBytes=64)
        self.assertEqual(result.stdout, "end\n")

    async def test_missingWorkingDirectory(self) -> None:
        """A working directory that does not exist is refused with an error naming it."""
        with self.assertRaises(ActionError) as caught:
            await runCommand(
                reactor, "true", timeoutSeconds=5, cwd="/nonexistent/dir", maxOutputBytes=64
            )
        self.assertIn("/nonexistent/dir", str(caught.exception))

    async def test_onExitedOnceTheShellHasExited(self) -> None:
        """What keeps the working directory valid is let go when the shell has exited, or at
        once when it cannot start; never twice."""
        calls: list[str] = []
        ran = runCommand(
            reactor,
            "sleep 0.2; echo late",
            timeoutSeconds=5,
            maxOutputBytes=64,
            onExited=lambda: calls.append("exited"),
        )
        self.assertEqual(calls, [])  # still sleeping
        result = await ran
        self.assertEqual((result.stdout, calls), ("late\n", ["exited"]))
        with self.assertRaises(ActionError):
            await runCommand(
                reactor,
                "true",
                timeoutSeconds=5,
                cwd="/nonexistent/dir",
                maxOutputBytes=64,
                onExited=lambda: calls.append("refused"),
            )
        self.assertEqual(calls, ["exited", "refused"])

    async def test_timedOutResultKeepsOutputForCallers(self) -> None:
        """A timed-out result still holds the output written before the timeout and the SIGTERM
        exit code, for callers other than `exec`."""
        result = await runCommand(
            reactor, "echo begun; sleep 30", timeoutSeconds=0.3, maxOutputBytes=64
        )
        self.assertTrue(result.timedOut)
        self.assertEqual(result.stdout, "begun\n")
        self.assertEqual(result.exitCode, -signal.SIGTERM)


class PiecesTests(SynchronousTestCase):
    def test_captureDecodesAcrossReadsAndBounds(self) -> None:
        """Captured output decodes characters split across reads and stops where its JSON text
        (as the answer writes it: ``\\u00e9`` is six bytes) reaches the limit, marking itself
        truncated."""
        capture = _Capture(13)
        for piece in (b"\xc3", b"\xa9t\xe2\x82", b"\xacabc"):
            capture.feed(piece)
        self.assertTrue(capture.truncated)
        self.assertEqual(capture.text(), "\u00e9t\u20ac")

    def test_captureNeverCutsAnEscape(self) -> None:
        """A limit falling inside a character's escape keeps the characters before it whole."""
        capture = _Capture(8)
        capture.feed("\u20ac\u20ac".encode())
        self.assertTrue(capture.truncated)
        self.assertEqual(capture.text(), "\u20ac")

    def test_captureBoundsInvalidBytesByTheirEscapes(self) -> None:
        """Invalid bytes become U+FFFD, each a six-byte escape in the answer, so the limit keeps
        a sixth as many of them: the answer never grows past the limit."""
        capture = _Capture(60)
        capture.feed(b"\xff" * 100)
        self.assertTrue(capture.truncated)
        self.assertEqual(capture.text(), "\ufffd" * 10)

    def test_exitCodes(self) -> None:
        """A normal exit gives its exit code and a death by signal gives the negative signal
        number."""
        self.assertEqual(exitCodeOf(Failure(ProcessDone(0))), 0)
        self.assertEqual(exitCodeOf(Failure(ProcessTerminated(exitCode=5))), 5)
        self.assertEqual(exitCodeOf(Failure(ProcessTerminated(signal=9))), -9)

    def test_environmentOverrides(self) -> None:
        """Request variables override the inherited environment, no variables means the inherited
        environment unchanged, and values are passed to the process as UTF-8 bytes."""
        env = commandEnvironment({"PYRO_X": "1", "PATH": "/nowhere"})
        self.assertEqual(env["PYRO_X"], "1")
        self.assertEqual(env["PATH"], "/nowhere")
        self.assertEqual(commandEnvironment(None), dict(os.environ))
        raw = _spawnEnvironment({"PYRO_X": "\u00e9"})
        self.assertEqual(raw[b"PYRO_X"], "\u00e9".encode())
        self.assertEqual(raw[b"PATH"], os.environ["PATH"].encode())

    def test_timedOutAnswer(self) -> None:
        """A timed-out command's answer matches the reference agent: empty stdout, the timeout
        message in stderr and exit code 124."""
        result = CommandResult("out", "err", -15, 1500, timedOut=True, timeoutSeconds=1)
        self.assertEqual(
            result.execAnswer(),
            {
                "stdout": "",
                "stderr": "command timed out after 1s",
                "exit_code": 124,
                "duration_ms": 1500,
                "stdout_truncated": False,
                "stderr_truncated": False,
            },
        )

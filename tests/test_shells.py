"""Real PTY shells driven over the wire: an in-process agent, bash on a real terminal."""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pyro_reactor.capabilities.redact import MASK
from pyro_reactor.capabilities.shells import Shells, sessionMembers
from tests.helpers import RunningAgent, startAgent

SECRET = "s3cr3tvalue"


def octal(text: str) -> str:
    """``text`` as printf octal escapes: the command's echo then never shows ``text``."""
    return "".join(f"\\{ord(char):03o}" for char in text)


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


async def remainingMembers(sessionId: int, within: float = 5.0) -> list[int]:
    """The session's live members once they are gone, or after ``within`` seconds.

    A process sent SIGKILL is still listed (not yet a zombie) for a moment on a loaded
    machine: wait for the kernel to finish with it rather than racing it.
    """
    deadline = time.monotonic() + within
    members = sessionMembers(sessionId)
    while members and time.monotonic() < deadline:
        await sleep(0.05)
        members = sessionMembers(sessionId)
    return members


class ShellTestCase(TestCase):
    timeout = 60
    agentOptions: dict[str, Any] = {}
    agent: RunningAgent

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        async def start() -> None:
            self.agent = await startAgent(self, **self.agentOptions)

        return Deferred.fromCoroutine(start())

    async def openShell(self, shellId: str = "s", **fields: Any) -> dict[str, Any]:
        answer: dict[str, Any] = await self.agent.call(
            {"action": "open_shell", "shell_id": shellId, **fields}
        )
        self.assertNotIn("error", answer)
        return answer

    async def write(self, text: str, shellId: str = "s") -> dict[str, Any]:
        answer: dict[str, Any] = await self.agent.call(
            {"action": "write_shell", "shell_id": shellId, "input": text}
        )
        return answer

    async def readUntil(
        self, marker: str, shellId: str = "s", cursor: int = 0, limit: float = 20.0
    ) -> tuple[str, dict[str, Any]]:
        """Follow the stream from ``cursor`` (reading from each ``next_cursor``) until
        ``marker`` is in what was read or the shell stopped; return the text and last answer."""
        pieces: list[str] = []
        tail = ""
        deadline = time.monotonic() + limit
        while True:
            answer = await self.agent.call(
                {
                    "action": "read_shell",
                    "shell_id": shellId,
                    "cursor": cursor,
                    "max_chars": 65536,
                    "wait_ms": 1000,
                }
            )
            self.assertNotIn("error", answer)
            self.assertEqual(answer["cursor"], cursor)
            pieces.append(answer["output"])
            cursor = answer["next_cursor"]
            # Only the new text (and what a marker could straddle) needs looking at.
            tail = tail[-len(marker) :] + answer["output"]
            if marker in tail or (answer["state"] == "stopped" and not answer["truncated"]):
                return "".join(pieces), answer
            if time.monotonic() > deadline:
                self.fail(f"{marker!r} not seen; output so far: {''.join(pieces)[-500:]!r}")

    def shells(self) -> Shells:
        return cast(Shells, self.agent.context.services.getServiceNamed("shells"))


class ShellTests(ShellTestCase):
    async def test_openWriteAndRead(self) -> None:
        (self.agent.workspace / "sub").mkdir()
        opened = await self.openShell(cwd="sub", cols=90, rows=20)
        self.assertEqual(
            {key: opened[key] for key in ("shell_id", "cwd", "cols", "rows", "state")},
            {"shell_id": "s", "cwd": "/workspace/sub", "cols": 90, "rows": 20, "state": "running"},
        )
        self.assertIsNone(opened["exit_code"])
        self.assertIsNone(opened["ended_at"])
        written = await self.write("echo hello-$((6*7)); pwd; echo $TERM")
        self.assertEqual(written["input_length"], len("echo hello-$((6*7)); pwd; echo $TERM"))
        self.assertTrue(written["append_newline"])
        self.assertEqual(written["state"], "running")
        term = os.environ.get("TERM", "xterm-256color")
        text, _ = await self.readUntil(f"\n{term}\r\n")
        self.assertIn("pyro$ ", text)
        self.assertIn("hello-42\r\n", text)
        self.assertIn(f"{self.agent.workspace / 'sub'}\r\n", text)
        record = json.loads((self.agent.stateDir / "pyro-shells" / "s.json").read_text())
        self.assertEqual(record["state"], "running")
        self.assertEqual(record["shell_id"], "s")

    async def test_cursorMaxCharsAndTruncated(self) -> None:
        await self.openShell()
        await self.write("echo 0123456789abcdef")
        text, last = await self.readUntil("0123456789abcdef\r\n")
        total = last["next_cursor"]
        part = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": 2, "max_chars": 5}
        )
        self.assertEqual(
            (part["cursor"], part["next_cursor"], part["output"], part["truncated"]),
            (2, 7, text[2:7], True),
        )
        beyond = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": total + 1000}
        )
        self.assertGreaterEqual(beyond["cursor"], total)
        self.assertEqual(beyond["cursor"], beyond["next_cursor"])
        self.assertEqual(beyond["output"], "")
        self.assertFalse(beyond["truncated"])
        negative = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": -5, "max_chars": 3}
        )
        self.assertEqual((negative["cursor"], negative["output"]), (0, text[:3]))

    async def test_exitCodeAfterExit(self) -> None:
        await self.openShell()
        await self.write("exit 3")
        _, answer = await self.readUntil("never printed")
        self.assertEqual((answer["state"], answer["exit_code"]), ("stopped", 3))
        self.assertIsInstance(answer["ended_at"], float)
        refused = await self.write("echo hi")
        self.assertEqual(refused, {"error": "shell s is not running"})
        refused = await self.agent.call({"action": "signal_shell", "shell_id": "s"})
        self.assertEqual(refused, {"error": "shell s is not running"})
        record = json.loads((self.agent.stateDir / "pyro-shells" / "s.json").read_text())
        self.assertEqual((record["state"], record["exit_code"]), ("stopped", 3))
        closed = await self.agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertEqual((closed["closed"], closed["exit_code"]), (True, 3))

    async def test_backgroundJobHoldingTheTerminalDoesNotHoldTheEnd(self) -> None:
        await self.openShell()
        pid = self.shells().session("s").pid
        self.addCleanup(_killAll, pid)
        await self.write("sleep 30 & exit 4")
        started = time.monotonic()
        _, answer = await self.readUntil("never printed")
        self.assertEqual((answer["state"], answer["exit_code"]), ("stopped", 4))
        self.assertLess(time.monotonic() - started, 15)

    async def test_interruptStopsTheForegroundJobAndTheShellLivesOn(self) -> None:
        await self.openShell()
        pid = self.shells().session("s").pid
        await self.write("sleep 100")
        for _ in range(200):
            if any(_command(member) == "sleep" for member in sessionMembers(pid)):
                break
            await sleep(0.05)
        else:
            self.fail("sleep never started")
        signalled = await self.agent.call(
            {"action": "signal_shell", "shell_id": "s", "signal": "int"}
        )
        self.assertEqual((signalled["signal"], signalled["state"]), ("INT", "running"))
        await self.write("echo alive-$((40+2))")
        _, answer = await self.readUntil("alive-42\r\n", limit=15)
        self.assertEqual(answer["state"], "running")
        self.assertFalse(any(_command(member) == "sleep" for member in sessionMembers(pid)))

    async def test_resizeIsSeenByStty(self) -> None:
        await self.openShell(cols=80, rows=24)
        resized = await self.agent.call(
            {"action": "resize_shell", "shell_id": "s", "cols": 100, "rows": 40}
        )
        self.assertEqual((resized["cols"], resized["rows"]), (100, 40))
        await self.write("stty size")
        await self.readUntil("40 100\r\n")
        record = json.loads((self.agent.stateDir / "pyro-shells" / "s.json").read_text())
        self.assertEqual((record["cols"], record["rows"]), (100, 40))

    async def test_secretWrittenInTwoHalvesIsNeverShown(self) -> None:
        await self.openShell(redact_values=[SECRET])
        first, second = SECRET[:4], SECRET[4:]
        await self.write(
            f"printf '{octal('MARK' + first)}'; sleep 1; printf '{octal(second + ' END')}\\n'"
        )
        before, answer = await self.readUntil("MARK")
        # The first half has been printed: what the reader has seen stops right before it.
        self.assertTrue(before.endswith("MARK"), before[-40:])
        after, _ = await self.readUntil(" END\r\n", cursor=answer["next_cursor"])
        self.assertTrue(after.startswith(f"{MASK} END\r\n"), after)
        whole = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": 0, "max_chars": 1 << 20}
        )
        self.assertTrue(whole["output"].startswith(before + after))
        log = (self.agent.stateDir / "pyro-shells" / "s.log").read_bytes().decode()
        self.assertIn(f"MARK{MASK} END", log)
        for text in (whole["output"], log):
            self.assertNotIn(first, text)
            self.assertNotIn(SECRET, text)

    async def test_waitMsReturnsWhenOutputArrives(self) -> None:
        await self.openShell()
        await self.write('echo rea""dy')
        text, answer = await self.readUntil("ready\r\n")
        if "pyro$ " not in text[text.index("ready\r\n") :]:
            _, answer = await self.readUntil("pyro$ ", cursor=answer["next_cursor"])
        cursor = answer["next_cursor"]
        started = time.monotonic()
        idle = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": cursor, "wait_ms": 300}
        )
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual((idle["output"], idle["next_cursor"]), ("", cursor))
        started = time.monotonic()
        waiting = self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": cursor, "wait_ms": 20000}
        )
        await sleep(0.2)
        await self.write("echo woke")
        woken = await waiting
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(woken["cursor"], cursor)
        self.assertNotEqual(woken["output"], "")

    async def test_errorsAsTheReference(self) -> None:
        call = self.agent.call
        self.assertEqual(await call({"action": "open_shell"}), {"error": "shell_id is required"})
        self.assertEqual(
            await call({"action": "read_shell", "shell_id": " "}),
            {"error": "shell_id is required"},
        )
        self.assertEqual(
            await call({"action": "read_shell", "shell_id": "x"}),
            {"error": "shell 'x' does not exist"},
        )
        self.assertEqual(
            await call({"action": "close_shell", "shell_id": "x"}),
            {"error": "shell 'x' does not exist"},
        )
        await self.openShell("x")
        self.assertEqual(
            await call({"action": "open_shell", "shell_id": "x"}),
            {"error": "shell 'x' already exists"},
        )
        self.assertEqual(
            await call({"action": "signal_shell", "shell_id": "x", "signal": "USR1"}),
            {"error": "signal must be one of: HUP, INT, TERM, KILL"},
        )
        outside = await call({"action": "open_shell", "shell_id": "y", "cwd": "/workspace/../etc"})
        self.assertIn("must stay inside /workspace", outside["error"])
        missing = await call({"action": "open_shell", "shell_id": "y", "cwd": "/workspace/nope"})
        self.assertEqual(missing, {"error": "workspace path does not exist: /workspace/nope"})
        unsafe = await call({"action": "open_shell", "shell_id": "../evil"})
        self.assertIn("shell_id is invalid", unsafe["error"])
        badEnv = await call({"action": "open_shell", "shell_id": "y", "env": ["A"]})
        self.assertEqual(badEnv, {"error": "shell env must be a JSON object"})
        self.assertEqual(await call({"action": "list_shells"}), {"shells": [self._summary("x")]})

    def _summary(self, shellId: str) -> dict[str, Any]:
        summary = self.shells().session(shellId).record.summary()
        return summary

    async def test_envOverridesAndPrompt(self) -> None:
        await self.openShell(env={"GREETING": "bonjour", "TERM": "dumb"})
        await self.write('echo "$GREETING/$TERM/[$PROMPT_COMMAND]"')
        text, _ = await self.readUntil("bonjour/dumb/[]\r\n")
        self.assertIn("pyro$ ", text)

    async def test_closeAnswersAndOtherRequestsAreNotHeldUp(self) -> None:
        self.shells().closeTimeout = 2.0
        await self.openShell()
        pid = self.shells().session("s").pid
        # A shell (and its job) ignoring the hang-up is killed after the close timeout.
        await self.write("trap '' HUP; echo trapped; sleep 100")
        await self.readUntil("trapped\r\n")
        closing = self.agent.call({"action": "close_shell", "shell_id": "s"})
        answered: list[dict[str, Any]] = []

        def record(answer: dict[str, Any]) -> dict[str, Any]:
            answered.append(answer)
            return answer

        closing.addCallback(record)
        pong = await self.agent.call({"action": "ping"})
        self.assertTrue(pong["pong"])
        # Answered while the close is still waiting out its timeout.
        self.assertEqual(answered, [])
        closed = await closing
        self.assertEqual((closed["closed"], closed["state"]), (True, "stopped"))
        self.assertEqual(closed["exit_code"], -9)
        self.assertEqual(await remainingMembers(pid), [])
        self.assertEqual(
            await self.agent.call({"action": "close_shell", "shell_id": "s"}),
            {"error": "shell 's' does not exist"},
        )
        self.assertEqual(await self.agent.call({"action": "list_shells"}), {"shells": []})
        # The id can be used again, with a fresh log.
        await self.openShell()
        log = (self.agent.stateDir / "pyro-shells" / "s.log").read_bytes()
        self.assertNotIn(b"trapped", log)

    async def test_stoppingTheAgentClosesShells(self) -> None:
        await self.openShell("a")
        await self.openShell("b")
        pids = [self.shells().session(name).pid for name in ("a", "b")]
        await self.shells().stopService()
        for pid in pids:
            self.assertEqual(await remainingMembers(pid), [])


class BurstTests(ShellTestCase):
    # A small in-memory window: most of the burst is read back from the log.
    agentOptions = {"shellBufferChars": 1 << 20}

    async def test_twentyMegabytesReadFullyAndExactly(self) -> None:
        line = "abcdefghijklmnopqrstuvwxy\n"
        count = 769_231  # 20 000 006 bytes
        await self.openShell()
        await self.write(
            f"printf '{octal('START')}\\n'; yes {line.strip()} | head -c {len(line) * count};"
            f" printf '{octal('DONE')}\\n'"
        )
        text, _ = await self.readUntil("DONE\r\n", limit=50)
        body = text[text.index("START\r\n") : text.index("DONE\r\n") + len("DONE\r\n")]
        self.assertEqual(len(body), len("START\r\n") + (len(line) + 1) * count + len("DONE\r\n"))
        self.assertEqual(body, "START\r\n" + line.replace("\n", "\r\n") * count + "DONE\r\n")


def _killAll(sessionId: int) -> None:
    for member in sessionMembers(sessionId):
        try:
            os.kill(member, 9)
        except OSError:
            pass


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
            return comm.read().strip()
    except OSError:
        return ""

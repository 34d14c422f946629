"""Real PTY shells driven over the wire: an in-process agent, bash on a real terminal."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from pyro_reactor.capabilities.shells import Shells, sessionMembers
from pyro_reactor.capabilities.shells.actions import ShellActions
from pyro_reactor.capabilities.shells.redact import MASK
from pyro_reactor.wire.request import Request
from tests.helpers import RunningAgent, reactor, sleep, startAgent

SECRET = "s3cr3tvalue"
MAX = 128 * 1024 - 1
RAISE = "close one, or raise --max-shells"


def octal(text: str) -> str:
    """``text`` as printf octal escapes: the command's echo then never shows ``text``."""
    return "".join(f"\\{ord(char):03o}" for char in text)


async def until(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Wait, looking every 20 ms, until ``condition()`` holds (``False`` after ``within`` s)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await sleep(0.02)
    return True


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
        """A shell opens in its cwd with its size, runs input, and its output reads back."""
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
        root = self.agent.stateDir / "pyro-shells"
        paths = (root, root / "s.json", root / "s.log")
        modes = {path.name: path.stat().st_mode & 0o777 for path in paths}
        self.assertEqual(modes, {"pyro-shells": 0o700, "s.json": 0o600, "s.log": 0o600})

    async def test_cursorMaxCharsAndTruncated(self) -> None:
        """Cursors, max_chars and truncated behave as the reference's."""
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
        """A shell that exits reports stopped with its exit code and refuses input."""
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
        """A background job keeping the terminal open does not keep the shell from stopping."""
        await self.openShell()
        pid = self.shells().session("s").pid
        self.addCleanup(_killAll, pid)
        await self.write("sleep 30 & exit 4")
        started = time.monotonic()
        _, answer = await self.readUntil("never printed")
        self.assertEqual((answer["state"], answer["exit_code"]), ("stopped", 4))
        self.assertLess(time.monotonic() - started, 15)

    async def test_interruptStopsTheForegroundJobAndTheShellLivesOn(self) -> None:
        """INT stops the foreground job; the shell goes on."""
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
        """A resize reaches the terminal (stty sees it) and the record."""
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
        """A secret printed in two halves a second apart is never shown, nor logged."""
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
        """A read with wait_ms waits for output, and returns as soon as it comes."""
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
        output = self.shells().session("s").output
        self.assertTrue(await until(lambda: len(output.waiters) == 1))
        await self.write("echo woke")
        woken = await waiting
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(woken["cursor"], cursor)
        self.assertNotEqual(woken["output"], "")

    async def test_errorsAsTheReference(self) -> None:
        """Errors are the reference's messages."""
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
        """env overrides reach the shell; the prompt is the plain one."""
        await self.openShell(env={"GREETING": "bonjour", "TERM": "dumb"})
        await self.write('echo "$GREETING/$TERM/[$PROMPT_COMMAND]"')
        text, _ = await self.readUntil("bonjour/dumb/[]\r\n")
        self.assertIn("pyro$ ", text)

    async def test_closeAnswersAndOtherRequestsAreNotHeldUp(self) -> None:
        """close_shell kills a shell ignoring the hang-up after the timeout, without holding
        up other requests."""
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

    async def test_shellMemoryGoesBackToTheBudgetWhenClosed(self) -> None:
        """A shell's window draws from the agent's memory budget while open; closing it
        gives every byte back."""
        budget = self.agent.context.budget
        before = budget.used
        await self.openShell()
        await self.write("echo budget-$((6*7))")
        await self.readUntil("budget-42\r\n")
        self.assertGreater(budget.used, before)
        await self.agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertTrue(await until(lambda: budget.used == before), (budget.used, before))

    async def test_stoppingTheAgentClosesShells(self) -> None:
        """Stopping the agent closes every shell and its processes."""
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
        """20 MB of output read back fully and exactly, mostly from the log."""
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


def sleepers(tag: str) -> list[int]:
    """Live processes running ``sleep <tag>.N`` (zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        ours = argv[:1] == [b"sleep"] and argv[1:2] and argv[1].startswith(f"{tag}.".encode())
        if ours and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


class LimitTests(ShellTestCase):
    """Shells hold up under abuse: counts, sizes, odd text, leftovers, secrets."""

    agentOptions = {"maxShells": 3, "shellBufferChars": 65536}

    async def test_oversizedEnvIsRefusedAndNothingStarts(self) -> None:
        """An env the kernel would refuse is a clear error, and no shell starts."""
        call = self.agent.call
        one = await call({"action": "open_shell", "shell_id": "s", "env": {"BIG": "x" * 200_000}})
        tooLong = f"shell env BIG is too long: 200004 bytes, at most {MAX} bytes for NAME=VALUE"
        self.assertEqual(one, {"error": tooLong})
        many = {f"V{index}": "y" * 100_000 for index in range(40)}
        total = await call({"action": "open_shell", "shell_id": "s", "env": many})
        self.assertTrue(total["error"].startswith("shell env is too large: "), total)
        self.assertEqual(await call({"action": "list_shells"}), {"shells": []})
        self.assertFalse((self.agent.stateDir / "pyro-shells" / "s.json").exists())

    async def test_loneSurrogatesAreRefusedBeforeAnythingStarts(self) -> None:
        """A lone surrogate in any text field is a clear error, never a traceback."""
        call = self.agent.call
        for fields, message in (
            ({"shell_id": "a\ud800"}, "shell_id must be valid Unicode text"),
            ({"cwd": "/workspace/\ud800"}, "cwd must be valid Unicode text"),
            ({"env": {"A": "\udfff"}}, "shell env values must be valid Unicode text"),
            ({"redact_values": ["x\ud800"]}, "redact_values must be valid Unicode text"),
        ):
            answer = await call({"action": "open_shell", "shell_id": "s", **fields})
            self.assertEqual(answer, {"error": message}, fields)
        self.assertEqual(await call({"action": "list_shells"}), {"shells": []})

    async def test_shellsAreCapped(self) -> None:
        """Beyond --max-shells, open_shell is refused with a clear error; closing frees a place."""
        for name in ("a", "b", "c"):
            await self.openShell(name)
        refused = await self.agent.call({"action": "open_shell", "shell_id": "d"})
        self.assertEqual(
            refused,
            {"error": f"too many shells: at most 3 may be open at once ({RAISE})"},
        )
        await self.agent.call({"action": "close_shell", "shell_id": "a"})
        await self.openShell("d")

    async def test_queuedInputIsBounded(self) -> None:
        """Input into a shell that does not read is refused past the bound, not held."""
        await self.openShell()
        pid = self.shells().session("s").pid
        await self.write("sleep 1000")
        # Once sleep runs in the foreground, nobody reads the terminal.
        self.assertTrue(
            await until(lambda: any(_command(m) == "sleep" for m in sessionMembers(pid)))
        )
        chunk = "z" * (3 * 1024 * 1024)
        first = await self.agent.call(
            {"action": "write_shell", "shell_id": "s", "input": chunk, "append_newline": False}
        )
        self.assertEqual(first["input_length"], len(chunk))
        second = await self.agent.call(
            {"action": "write_shell", "shell_id": "s", "input": chunk, "append_newline": False}
        )
        self.assertIn("input is too large", second["error"])
        closed = await self.agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertTrue(closed["closed"])

    async def test_closeEndsWhatTheShellStarted(self) -> None:
        """nohup, disown, trap '' HUP and setsid jobs do not outlive close_shell."""
        tag = str(random.randrange(10_000, 100_000))
        await self.openShell()
        self.addCleanup(_killSleepers, tag)
        await self.write(
            f"nohup sleep {tag}.1 >/dev/null 2>&1 & sleep {tag}.2 & disown;"
            f" (trap '' HUP; exec sleep {tag}.3) & setsid sleep {tag}.4 &"
        )
        self.assertTrue(await until(lambda: len(sleepers(tag)) == 4), sleepers(tag))
        closed = await self.agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertTrue(closed["closed"])
        self.assertTrue(await until(lambda: sleepers(tag) == []), sleepers(tag))

    async def test_multiLineSecretShownByCatIsRedacted(self) -> None:
        """A PEM key shown by ``cat`` (ONLCR makes its breaks \\r\\n) is redacted in
        read_shell and in the log."""
        key = "-----BEGIN TEST KEY-----\nQUFBQUFB\nQkJCQkJC\n-----END TEST KEY-----\n"
        (self.agent.workspace / "key.pem").write_text(key)
        await self.openShell(redact_values=[key])
        await self.write(f"cat key.pem; printf '{octal('DONE')}\\n'")
        text, _ = await self.readUntil("DONE\r\n")
        self.assertIn(MASK, text)
        log = (self.agent.stateDir / "pyro-shells" / "s.log").read_text()
        for shown in (text, log):
            self.assertNotIn("QUFBQUFB", shown)
            self.assertNotIn("QkJCQkJC", shown)

    async def test_readAnswerIsBoundedByItsEncodedSize(self) -> None:
        """Emoji cost 12 bytes each in an answer: one read carries at most
        --shell-buffer-chars bytes of encoded output, and the rest follows."""
        await self.openShell()
        await self.write(
            f"printf '\\360\\237\\230\\200%.0s' {{1..20000}}; printf '{octal('DONE')}\\n'"
        )
        await self.readUntil("DONE\r\n")
        whole = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": 0, "max_chars": 10**6}
        )
        self.assertLessEqual(len(json.dumps(whole["output"])) - 2, 65536)
        self.assertTrue(whole["truncated"])
        self.assertGreater(whole["output"].count("😀"), 1000)

    async def test_cancelledReadRemovesItsWaiterAndTimer(self) -> None:
        """A read_shell waiting with wait_ms, cancelled (its client left), leaves no waiter
        nor timer behind."""
        await self.openShell()
        output = self.shells().session("s").output
        await self.write('echo rea""dy')
        await self.readUntil("ready\r\n")
        self.assertTrue(
            await until(
                lambda: "pyro$ " in output.window.slice(output.windowStart, output.length)[-10:]
            )
        )
        handlers = ShellActions(self.shells())
        cursor = output.length
        reading = handlers.readShell(
            Request({"action": "read_shell", "shell_id": "s", "cursor": cursor, "wait_ms": 30000})
        )
        assert isinstance(reading, Deferred)
        self.assertEqual(len(output.waiters), 1)
        [timer] = output.waiters.timers
        reading.cancel()
        self.failureResultOf(reading, CancelledError)
        self.assertEqual(len(output.waiters), 0)
        self.assertFalse(timer.active())

    async def test_clientLeavingMidWaitFreesTheWait(self) -> None:
        """A client that disconnects while its read_shell waits (wait_ms) does not leave the
        wait behind in the agent: its waiter and timer go with the connection."""
        await self.openShell()
        output = self.shells().session("s").output
        await self.write('echo rea""dy')
        await self.readUntil("ready\r\n")
        self.assertTrue(
            await until(
                lambda: "pyro$ " in output.window.slice(output.windowStart, output.length)[-10:]
            )
        )
        request = {
            "action": "read_shell",
            "shell_id": "s",
            "cursor": output.length,
            "wait_ms": 30000,
        }
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.agent.port)
        client = await connectProtocol(endpoint, Protocol())
        assert client.transport is not None
        client.transport.write(json.dumps(request).encode() + b"\n")
        self.assertTrue(await until(lambda: len(output.waiters) == 1))
        [timer] = output.waiters.timers
        client.transport.abortConnection()
        self.assertTrue(await until(lambda: len(output.waiters) == 0))
        self.assertFalse(timer.active())

    async def test_openCancelledBeforeItStartsStartsNothing(self) -> None:
        """An open_shell whose client left before the shell started (its answer cancelled)
        starts no shell and frees the id."""
        handlers = ShellActions(self.shells())
        opening = handlers.openShell(Request({"action": "open_shell", "shell_id": "gone"}))
        opening.cancel()
        self.failureResultOf(opening, CancelledError)
        self.assertTrue(await until(lambda: not self.shells().reserved))
        self.assertEqual(await self.agent.call({"action": "list_shells"}), {"shells": []})
        self.assertFalse((self.agent.stateDir / "pyro-shells" / "gone.json").exists())
        await self.openShell("gone")


class LogCapTests(ShellTestCase):
    """``--log-bytes`` caps each shell log file; it is rotated once."""

    agentOptions = {"logBytes": 64 * 1024, "shellBufferChars": 65536}

    async def test_logIsCappedRotatedAndTheTailReadable(self) -> None:
        """400 KB of output leave at most two 64 KiB files; a read from 0 starts at the
        first character kept, and the stream reads on to the end from there."""
        await self.openShell()
        await self.write(f"yes 0123456789 | head -c 400000; printf '{octal('DONE')}\\n'")
        output = self.shells().session("s").output
        # Not followed with reads: a reader falling behind the rotation would see a jump.
        self.assertTrue(
            await until(
                lambda: "DONE\r\n" in output.window.slice(output.windowStart, output.length), 60
            )
        )
        root = self.agent.stateDir / "pyro-shells"
        self.assertLessEqual((root / "s.log").stat().st_size, 64 * 1024)
        self.assertLessEqual((root / "s.log.1").stat().st_size, 64 * 1024)
        first = await self.agent.call(
            {"action": "read_shell", "shell_id": "s", "cursor": 0, "max_chars": 100}
        )
        self.assertGreater(first["cursor"], 0)
        self.assertEqual(len(first["output"]), 100)
        self.assertIn(first["output"], "0123456789\r\n" * 20)


def _killSleepers(tag: str) -> None:
    for pid in sleepers(tag):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


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

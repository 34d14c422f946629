"""Services with real processes, over the wire: readiness, exits, stops, logs, restarts."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.services import (
    STOP_GRACE,
    ServiceActions,
    Services,
    processStat,
    records,
)
from pyro_reactor.capabilities.services.records import tailText
from pyro_reactor.context import AgentConfig, AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.procfs import readProcStat
from pyro_reactor.wire.request import Request
from tests.helpers import RunningAgent, freePort, reactor, sleep, startAgent
from tests.twistd_helpers import ask, spawnTwistd, unixConnector

PYTHON = sys.executable
NEVER = {"type": "file", "path": "/workspace/never-there"}


def killGroups(stateDir: Path) -> None:
    """Leave no service behind, whatever the test did.

    Only a group whose leader is still the recorded process (same start time) is killed: pids
    are reused quickly on a busy machine, and another test's processes must not be hit.
    """
    for record in (stateDir / "pyro-services").glob("*.json"):
        try:
            fields = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        pid, ticks = fields.get("pid"), fields.get("pid_start_ticks")
        stat = readProcStat(pid) if isinstance(pid, int) and pid > 1 else None
        if stat is not None and stat.startTicks == ticks:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def groupGone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    # Members may be zombies waiting for a reaper that is not us; those count as gone.
    members = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _pgid(int(entry.name)) == pid
    ]
    return all((processStat(int(member)) or ("Z", 0))[0] == "Z" for member in members)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class ServiceTestCase(TestCase):
    """Starts agents whose service groups are killed at the end of the test."""

    async def startAgent(self) -> RunningAgent:
        agent = await startAgent(self)
        self.addCleanup(killGroups, agent.stateDir)
        return agent

    async def eventually(
        self, ask: Callable[[], Awaitable[dict[str, Any]]], test: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while True:
            answer = await ask()
            if test(answer) or time.monotonic() > deadline:
                return answer
            await sleep(0.05)


class ReadinessTests(ServiceTestCase):
    async def test_http(self) -> None:
        """A real ``python3 -m http.server``: ready once it answers, stopped by SIGTERM."""
        agent = await self.startAgent()
        port = freePort()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "web",
                "command": f"exec {PYTHON} -m http.server --bind 127.0.0.1 {port}",
                "readiness": {"type": "http", "url": f"http://127.0.0.1:{port}/"},
                "ready_interval_ms": 50,
                "ready_timeout_seconds": 20,
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        self.assertIsNotNone(answer["ready_at"])
        self.assertEqual(answer["readiness"]["type"], "http")
        started = time.monotonic()
        stopped = await agent.call({"action": "stop_service", "service_name": "web"})
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))
        self.assertTrue(groupGone(answer["pid"]))

    async def test_httpErrorStatusIsNotReady(self) -> None:
        """An HTTP readiness URL answering 404 is never ready: failed/readiness_timeout."""
        agent = await self.startAgent()
        port = freePort()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "web",
                "command": f"exec {PYTHON} -m http.server --bind 127.0.0.1 {port}",
                "readiness": {"type": "http", "url": f"http://127.0.0.1:{port}/missing"},
                "ready_interval_ms": 50,
                "ready_timeout_seconds": 1,
            }
        )
        self.assertEqual((answer["state"], answer["stop_reason"]), ("failed", "readiness_timeout"))

    async def test_tcp(self) -> None:
        """A tcp readiness check is ready once something listens on the address."""
        agent = await self.startAgent()
        port = freePort()
        listen = (
            "import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
        )
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "listener",
                "command": f'sleep 0.3; exec {PYTHON} -c "{listen}"',
                "readiness": {"type": "tcp", "address": f"127.0.0.1:{port}"},
                "ready_interval_ms": 50,
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    async def test_file(self) -> None:
        """A file readiness check is ready once the file exists in the workspace."""
        agent = await self.startAgent()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "filer",
                "command": "sleep 0.3; touch ready; sleep 60",
                "readiness": {"type": "file", "path": "/workspace/ready"},
                "ready_interval_ms": 50,
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        self.assertTrue((agent.workspace / "ready").exists())

    async def test_commandInTheServiceDirectoryAndEnvironment(self) -> None:
        """A command readiness check runs in the service's directory with its environment."""
        agent = await self.startAgent()
        (agent.workspace / "sub").mkdir()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "cmd",
                "command": "sleep 0.3; echo up > marker; sleep 60",
                "cwd": "/workspace/sub",
                "env": {"EXPECTED": "up"},
                "readiness": {"type": "command", "command": 'test "$(cat marker)" = "$EXPECTED"'},
                "ready_interval_ms": 50,
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        self.assertEqual((agent.workspace / "sub" / "marker").read_text(), "up\n")

    async def test_readinessTimeout(self) -> None:
        """A service never ready is stopped at its readiness deadline and answered failed."""
        agent = await self.startAgent()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "slow",
                "command": "sleep 60",
                "readiness": NEVER,
                "ready_interval_ms": 50,
                "ready_timeout_seconds": 1,
            }
        )
        self.assertEqual((answer["state"], answer["stop_reason"]), ("failed", "readiness_timeout"))
        self.assertTrue(groupGone(answer["pid"]))
        status = await agent.call({"action": "status_service", "service_name": "slow"})
        self.assertEqual(status, answer)

    async def test_exitBeforeReadyAtOnceWithItsCode(self) -> None:
        """A service exiting before ready is answered failed at once, with its exit code."""
        agent = await self.startAgent()
        started = time.monotonic()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "crash",
                "command": "echo bye >&2; exit 7",
                "readiness": NEVER,
                "ready_timeout_seconds": 20,
            }
        )
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(answer["state"], "failed")
        self.assertEqual(answer["stop_reason"], "process_exited_before_ready")
        self.assertEqual(answer["exit_code"], 7)
        logs = await agent.call({"action": "logs_service", "service_name": "crash"})
        self.assertEqual(logs["stderr"], "bye\n")

    async def test_pingAnswersDuringAReadinessWait(self) -> None:
        """A start waiting 20 s on readiness does not hold any other client."""
        agent = await self.startAgent()
        answered: list[object] = []
        pending = agent.call(
            {
                "action": "start_service",
                "service_name": "waiting",
                "command": "sleep 60",
                "readiness": NEVER,
                "ready_timeout_seconds": 20,
            }
        )

        def note(result: dict[str, Any]) -> dict[str, Any]:
            answered.append(result)
            return result

        pending.addCallback(note)
        await self.eventually(
            lambda: agent.call({"action": "status_service", "service_name": "waiting"}),
            lambda answer: answer.get("pid") is not None,
        )
        started = time.monotonic()
        pong = await agent.call({"action": "ping"})
        self.assertTrue(pong["pong"])
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(answered, [])
        stopped = await agent.call({"action": "stop_service", "service_name": "waiting"})
        answer = await pending
        self.assertEqual(answer, stopped)
        self.assertEqual((answer["state"], answer["stop_reason"]), ("stopped", "sigterm"))


class LifecycleTests(ServiceTestCase):
    async def test_exitAfterReady(self) -> None:
        """A ready service's exit ends it exited with its code, without a signal."""
        agent = await self.startAgent()
        answer = await agent.call(
            {"action": "start_service", "service_name": "brief", "command": "sleep 0.3; exit 5"}
        )
        self.assertEqual((answer["state"], answer["exit_code"]), ("running", None))
        status = await self.eventually(
            lambda: agent.call({"action": "status_service", "service_name": "brief"}),
            lambda answer: answer["state"] != "running",
        )
        self.assertEqual((status["state"], status["exit_code"]), ("exited", 5))
        self.assertIsNotNone(status["ended_at"])
        root = agent.stateDir / "pyro-services"
        self.assertEqual((root / "brief.status").read_text(), "5")
        record = await self.eventually(
            lambda: succeedWith(json.loads((root / "brief.json").read_text())),
            lambda record: record["state"] == "exited",
        )
        self.assertEqual(record["exit_code"], 5)

    async def test_stopTermObeying(self) -> None:
        """A service obeying SIGTERM is stopped/sigterm quickly, and nothing of it is left."""
        agent = await self.startAgent()
        answer = await agent.call(
            {"action": "start_service", "service_name": "obedient", "command": "sleep 60"}
        )
        started = time.monotonic()
        stopped = await agent.call({"action": "stop_service", "service_name": "obedient"})
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))
        self.assertTrue(groupGone(answer["pid"]))
        again = await agent.call({"action": "stop_service", "service_name": "obedient"})
        self.assertEqual(again, stopped)

    async def test_stopRightAfterStart(self) -> None:
        """A SIGTERM landing while the runner starts the command is never lost."""
        agent = await self.startAgent()
        for attempt in range(15):
            name = f"quick{attempt}"
            await agent.call(
                {"action": "start_service", "service_name": name, "command": "sleep 60"}
            )
            started = time.monotonic()
            stopped = await agent.call({"action": "stop_service", "service_name": name})
            self.assertEqual(stopped["stop_reason"], "sigterm", attempt)
            self.assertLess(time.monotonic() - started, 2.0)

    async def test_stopTermIgnoring(self) -> None:
        """A service ignoring SIGTERM is killed after the grace: stopped/sigkill, nothing left."""
        agent = await self.startAgent()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "stubborn",
                "command": "trap '' TERM; echo ignoring; sleep 60",
            }
        )
        await self.eventually(
            lambda: agent.call({"action": "logs_service", "service_name": "stubborn"}),
            lambda answer: answer["stdout"] == "ignoring\n",
        )
        started = time.monotonic()
        stopped = await agent.call({"action": "stop_service", "service_name": "stubborn"})
        self.assertGreaterEqual(time.monotonic() - started, STOP_GRACE - 0.5)
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigkill"))
        self.assertTrue(groupGone(answer["pid"]))

    async def test_startAgainReplacesAnEndedService(self) -> None:
        """A running name refuses a second start; once stopped, a new start replaces it."""
        agent = await self.startAgent()
        first = await agent.call(
            {"action": "start_service", "service_name": "svc", "command": "echo one; sleep 60"}
        )
        refused = await agent.call(
            {"action": "start_service", "service_name": "svc", "command": "sleep 1"}
        )
        self.assertEqual(refused, {"error": "service 'svc' is already running"})
        await agent.call({"action": "stop_service", "service_name": "svc"})
        second = await agent.call(
            {"action": "start_service", "service_name": "svc", "command": "echo two; sleep 60"}
        )
        self.assertNotEqual(first["pid"], second["pid"])
        logs = await self.eventually(
            lambda: agent.call({"action": "logs_service", "service_name": "svc"}),
            lambda answer: answer["stdout"] != "",
        )
        self.assertEqual(logs["stdout"], "two\n")

    async def test_listServices(self) -> None:
        """list_services shows every service, sorted by name."""
        agent = await self.startAgent()
        self.assertEqual(await agent.call({"action": "list_services"}), {"services": []})
        for name in ("b", "a"):
            await agent.call({"action": "start_service", "service_name": name, "command": "true"})
        listed = await agent.call({"action": "list_services"})
        self.assertEqual([record["service_name"] for record in listed["services"]], ["a", "b"])


async def succeedWith(value: dict[str, Any]) -> dict[str, Any]:
    return value


class RulesTests(ServiceTestCase):
    async def test_names(self) -> None:
        """Every service action checks service_name with the reference's rule and messages."""
        agent = await self.startAgent()
        for fields, error in [
            ({}, "service_name is required"),
            ({"service_name": "  "}, "service_name is required"),
            ({"service_name": "bad name"}, "service_name is invalid"),
            ({"service_name": "-dash"}, "service_name is invalid"),
            ({"service_name": "x" * 65}, "service_name is invalid"),
        ]:
            for action in ("start_service", "status_service", "logs_service", "stop_service"):
                answer = await agent.call({"action": action, "command": "true", **fields})
                self.assertEqual(answer, {"error": error}, (action, fields))
        for action in ("status_service", "logs_service", "stop_service"):
            answer = await agent.call({"action": action, "service_name": "nope"})
            self.assertEqual(answer, {"error": "service 'nope' does not exist"})

    async def test_refusedRequestsStartNothing(self) -> None:
        """A refused start_service runs nothing and leaves no service behind."""
        agent = await self.startAgent()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"env": "A=1"}, "service env must be a JSON object"),
            ({"env": {"1A": "x"}}, "secret name is invalid"),
            ({"cwd": "/tmp"}, "destination must stay inside /workspace"),
            ({"cwd": "/workspace/../etc"}, "'..' is not allowed"),
            ({"cwd": "/workspace/missing"}, "workspace path does not exist: /workspace/missing"),
            ({"readiness": {"type": "bogus"}}, "unsupported readiness type: bogus"),
            ({"readiness": {"type": "file", "path": "/etc/hostname"}}, "inside /workspace"),
            ({"readiness": "file"}, "readiness must be a JSON object"),
            ({"ready_timeout_seconds": -1}, "ready_timeout_seconds must not be negative"),
            ({"command": "a\x00b"}, "command must not contain NUL bytes"),
        ]
        for fields, error in cases:
            answer = await agent.call(
                {"action": "start_service", "service_name": "x", "command": "touch ran", **fields}
            )
            self.assertIn(error, answer.get("error", ""), fields)
            status = await agent.call({"action": "status_service", "service_name": "x"})
            self.assertEqual(status, {"error": "service 'x' does not exist"})
        self.assertFalse((agent.workspace / "ran").exists())

    async def test_envAndCwdReachTheService(self) -> None:
        """The env overrides and the working directory reach the service's command."""
        agent = await self.startAgent()
        (agent.workspace / "sub").mkdir()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "greeter",
                "command": 'echo "$GREETING from $(pwd)"',
                "cwd": "sub",
                "env": {"GREETING": "hello"},
            }
        )
        self.assertEqual(answer["cwd"], "/workspace/sub")
        logs = await self.eventually(
            lambda: agent.call({"action": "logs_service", "service_name": "greeter"}),
            lambda answer: answer["state"] == "exited",
        )
        self.assertEqual(logs["stdout"], f"hello from {agent.workspace / 'sub'}\n")
        self.assertEqual(logs["exit_code"], 0)

    async def test_theRunnerAddsNothingToTheEnvironment(self) -> None:
        """The Python runner's locale coercion (PEP 538) never reaches the command."""
        agent = await self.startAgent()
        expected = {"C": os.environ.get("LC_CTYPE", "unset"), "POSIX": "POSIX"}
        for name, (lang, ctype) in {"plain": ("C", None), "posix": ("C", "POSIX")}.items():
            env = {"LANG": lang, **({"LC_CTYPE": ctype} if ctype else {})}
            await agent.call(
                {
                    "action": "start_service",
                    "service_name": name,
                    "command": 'echo "ctype=${LC_CTYPE-unset}"',
                    "env": env,
                }
            )
            logs = await self.eventually(
                partial(agent.call, {"action": "logs_service", "service_name": name}),
                lambda answer: answer["state"] == "exited",
            )
            self.assertEqual(logs["stdout"], f"ctype={expected[ctype or 'C']}\n", name)

    async def test_logsTails(self) -> None:
        """logs_service answers the whole logs or their last lines, as the reference counts them."""
        agent = await self.startAgent()
        await agent.call(
            {
                "action": "start_service",
                "service_name": "chatty",
                "command": "printf 'a\\nb\\nc\\nd\\n'; printf 'x\\ny\\n' >&2; sleep 60",
            }
        )

        def logs(**fields: Any) -> Deferred[dict[str, Any]]:
            return agent.call({"action": "logs_service", "service_name": "chatty", **fields})

        whole = await self.eventually(
            logs, lambda answer: answer["stdout"].count("\n") == 4 and answer["stderr"] != ""
        )
        self.assertEqual((whole["stdout"], whole["stderr"]), ("a\nb\nc\nd\n", "x\ny\n"))
        self.assertEqual((whole["tail_lines"], whole["truncated"]), (None, False))
        self.assertEqual(whole["state"], "running")
        two = await logs(tail_lines=2)
        self.assertEqual(
            (two["stdout"], two["stderr"], two["truncated"]), ("c\nd\n", "x\ny\n", True)
        )
        self.assertEqual(two["tail_lines"], 2)
        none = await logs(tail_lines=0)
        self.assertEqual((none["stdout"], none["stderr"], none["truncated"]), ("", "", True))
        many = await logs(tail_lines=10)
        self.assertEqual((many["stdout"], many["truncated"]), ("a\nb\nc\nd\n", False))
        self.assertEqual(await logs(tail_lines=-1), {"error": "tail_lines must not be negative"})


class TailTests(SynchronousTestCase):
    def reference(self, text: str, tailLines: int) -> tuple[str, bool]:
        """What the reference answers (except for 0, where it answers everything)."""
        lines = text.splitlines(keepends=True)
        if len(lines) <= tailLines:
            return text, False
        return "".join(lines[-tailLines:]) if tailLines else "", True

    def test_sameLinesAsTheReference(self) -> None:
        """Across block boundaries, CRLF, lone CR and multi-byte characters."""
        self.patch(records, "TAIL_BLOCK", 3)
        path = Path(self.mktemp())
        rng = random.Random(5)
        for _ in range(300):
            text = "".join(rng.choice(["a", "é", "\n", "\r\n", "\r", "xyz"]) for _ in range(30))
            path.write_bytes(text.encode())
            for tailLines in range(7):
                self.assertEqual(
                    tailText(path, tailLines, 1 << 20),
                    self.reference(text, tailLines),
                    (text, tailLines),
                )

    def test_missingFile(self) -> None:
        """The tail of a log that does not exist is empty."""
        self.assertEqual(tailText(Path(self.mktemp()), 3, 100), ("", False))

    def test_aHugeLogIsNotReadIntoMemory(self) -> None:
        """The end of a 2 GiB log, without reading the 2 GiB."""
        path = Path(self.mktemp())
        self.addCleanup(path.unlink, missing_ok=True)
        with path.open("wb") as log:
            log.truncate(2 * 1024**3)  # sparse: nothing is written
            log.seek(0, os.SEEK_END)
            log.write(b"first\nsecond\nthird\n")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.assertEqual(tailText(path, 2, 16 << 20), ("second\nthird\n", True))
        whole, truncated = tailText(path, None, 1 << 20)
        self.assertTrue(truncated)
        self.assertLessEqual(len(whole), 1 << 20)
        self.assertTrue(whole.endswith("second\nthird\n"))  # cut at a line start
        # A line longer than the limit: only its end is shown.
        self.assertEqual(tailText(path, 1, 6 + 7 + 6 + 10), ("third\n", True))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        self.assertLess(grown, 128 * 1024)  # KiB: far below the file's size


class AdoptionTests(ServiceTestCase):
    """A registry taking services back from records written by an earlier agent."""

    def context(self) -> AgentContext:
        base = Path(self.mktemp()).absolute()
        (base / "workspace").mkdir(parents=True)
        (base / "state" / "pyro-services").mkdir(parents=True)
        pool = ThreadPool(minthreads=0, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        config = AgentConfig(workspace=base / "workspace", stateDir=base / "state")
        return AgentContext(config=config, reactor=reactor, threadPool=pool)

    def record(self, context: AgentContext, name: str, **fields: Any) -> None:
        record = {
            "service_name": name,
            "command": "sleep 60",
            "cwd": "/workspace",
            "state": "running",
            "started_at": 1.0,
            "readiness": None,
            "ready_at": 1.0,
            "ended_at": None,
            "exit_code": None,
            "pid": None,
            "stop_reason": None,
            **fields,
        }
        path = context.config.serviceRoot / f"{name}.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True))

    def spawnElsewhere(self) -> subprocess.Popen[bytes]:
        """A process this agent did not spawn through the reactor (an earlier agent's)."""
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)

        def reap() -> None:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

        self.addCleanup(reap)
        return process

    def registry(self, context: AgentContext) -> Services:
        registry = Services(context)
        registry.startService()
        self.addCleanup(registry.stopService)
        return registry

    def ask(self, registry: Services, handler: str, **fields: Any) -> Any:
        return getattr(ServiceActions(registry), handler)(Request(fields))

    async def test_liveServiceIsTakenBackAndStoppable(self) -> None:
        """A live service recorded by an earlier agent is running again, refuses a start, stops."""
        context = self.context()
        process = self.spawnElsewhere()
        ticks = processStat(process.pid)
        assert ticks is not None
        self.record(context, "web", pid=process.pid, pid_start_ticks=ticks[1])
        registry = self.registry(context)
        status = self.ask(registry, "status", service_name="web")
        self.assertEqual((status["state"], status["pid"]), ("running", process.pid))
        refused = self.assertRaises(
            ActionError, self.ask, registry, "start", service_name="web", command="true"
        )
        self.assertEqual(str(refused), "service 'web' is already running")
        stopped = await self.ask(registry, "stop", service_name="web")
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))

    async def test_exitWhileAdoptedIsSeen(self) -> None:
        """A taken-back service that exits is seen (pidfd) as exited with its recorded status."""
        context = self.context()
        process = self.spawnElsewhere()
        ticks = processStat(process.pid)
        assert ticks is not None
        self.record(context, "web", pid=process.pid, pid_start_ticks=ticks[1])
        (context.config.serviceRoot / "web.status").write_text("3")
        registry = self.registry(context)
        os.killpg(process.pid, signal.SIGKILL)
        status = await self.eventually(
            lambda: succeedWith(self.ask(registry, "status", service_name="web")),
            lambda answer: answer["state"] != "running",
        )
        self.assertEqual((status["state"], status["exit_code"]), ("exited", 3))

    async def test_exitSeenWithoutPidfd(self) -> None:
        """Where the kernel has no pidfd_open, the adopted pid is polled instead."""

        def noPidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open not implemented")

        self.patch(os, "pidfd_open", noPidfd)
        context = self.context()
        process = self.spawnElsewhere()
        ticks = processStat(process.pid)
        assert ticks is not None
        self.record(context, "web", pid=process.pid, pid_start_ticks=ticks[1])
        (context.config.serviceRoot / "web.status").write_text("6")
        registry = self.registry(context)
        self.assertEqual(self.ask(registry, "status", service_name="web")["state"], "running")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = await self.eventually(
            lambda: succeedWith(self.ask(registry, "status", service_name="web")),
            lambda answer: answer["state"] != "running",
        )
        self.assertEqual((status["state"], status["exit_code"]), ("exited", 6))

    async def test_endedMeanwhileShowsExitedWithItsStatus(self) -> None:
        """A service that ended while no agent watched is exited with the code it left."""
        context = self.context()
        process = self.spawnElsewhere()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.record(context, "gone", pid=process.pid)
        (context.config.serviceRoot / "gone.status").write_text("4")
        registry = self.registry(context)
        status = self.ask(registry, "status", service_name="gone")
        self.assertEqual((status["state"], status["exit_code"]), ("exited", 4))
        self.assertIsNotNone(status["ended_at"])

    def test_leftoversGoneBeforeRecordsAreRewritten(self) -> None:
        """Leftover temporary files are removed before any record is taken back: taking an
        ended service back rewrites its record through such a file, which a later sweep
        would pull from under the write (the write then fails and is retried)."""
        context = self.context()
        process = self.spawnElsewhere()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.record(context, "gone", pid=process.pid)
        leftover = context.config.serviceRoot / ".gone.json.tmp"
        leftover.write_text("{}")
        seen: list[bool] = []

        def inThread(function: Any, *args: Any) -> Deferred[Any]:
            seen.append(leftover.exists())
            return succeed(function(*args))

        context.inThread = inThread  # type: ignore[method-assign,assignment]
        self.registry(context)
        self.assertEqual(seen, [False])
        record = json.loads((context.config.serviceRoot / "gone.json").read_text())
        self.assertEqual(record["state"], "exited")

    async def test_reusedPidIsNotAdopted(self) -> None:
        """A live pid whose start time differs is someone else: never signalled."""
        context = self.context()
        process = self.spawnElsewhere()
        ticks = processStat(process.pid)
        assert ticks is not None
        self.record(context, "old", pid=process.pid, pid_start_ticks=ticks[1] - 1)
        registry = self.registry(context)
        status = self.ask(registry, "status", service_name="old")
        self.assertEqual((status["state"], status["exit_code"]), ("exited", None))
        await self.ask(registry, "stop", service_name="old")
        self.assertIsNone(process.poll())

    async def test_terminalAndInvalidRecords(self) -> None:
        """Terminal records come back as they were; an invalid one is reported, its name free."""
        context = self.context()
        self.record(context, "done", state="stopped", stop_reason="sigkill", pid=12345)
        (context.config.serviceRoot / "broken.json").write_text("{not json")
        registry = self.registry(context)
        done = self.ask(registry, "status", service_name="done")
        self.assertEqual((done["state"], done["stop_reason"]), ("stopped", "sigkill"))
        error = self.assertRaises(ActionError, self.ask, registry, "status", service_name="broken")
        self.assertEqual(str(error), "service record for 'broken' is invalid")
        answer = await self.ask(registry, "start", service_name="broken", command="exec sleep 30")
        self.addCleanup(self.ask, registry, "stop", service_name="broken")
        self.assertEqual(answer["state"], "running")


class AgentRestartTests(TestCase):
    """A real ``twistd pyro-agent`` killed with SIGKILL, and a new one on the same state."""

    def startTwistd(self, base: Path) -> tuple[subprocess.Popen[bytes], Path]:
        number = len(list(base.glob("agent-*.log")))
        log = base / f"agent-{number}.log"
        # A UNIX socket path must be short (108 bytes): not in the test's directory.
        sockets = Path(tempfile.mkdtemp(prefix="pyro-svc-"))
        self.addCleanup(shutil.rmtree, sockets, True)
        sock = sockets / "agent.sock"
        # Cleanup kills the agent outright: no orderly shutdown the test did not ask for.
        agent = spawnTwistd(self, base, ["--listen", f"unix:{sock}"], log=log, graceful=False)
        return agent, sock

    def ask(self, sock: Path, request: dict[str, Any]) -> dict[str, Any]:
        return ask(unixConnector(sock), request, deadline=20, timeout=20)

    def test_servicesOutliveTheAgent(self) -> None:
        """Services survive the agent being killed or stopped, and a new agent takes them back."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.addCleanup(killGroups, base / "state")
        first, sock = self.startTwistd(base)
        web = self.ask(
            sock,
            {
                "action": "start_service",
                "service_name": "web",
                "command": "echo hello; sleep 60",
                "readiness": {"type": "file", "path": "/workspace"},
            },
        )
        self.assertEqual(web["state"], "running", web)
        brief = self.ask(
            sock,
            {
                "action": "start_service",
                "service_name": "brief",
                "command": "echo begun; sleep 1; exit 4",
            },
        )
        self.assertEqual(brief["state"], "running", brief)

        first.kill()
        first.wait()
        # "brief" ends while no agent watches it: its runner leaves its status.
        briefStatus = base / "state" / "pyro-services" / "brief.status"
        deadline = time.monotonic() + 20
        while not briefStatus.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(briefStatus.exists())
        second, sock = self.startTwistd(base)

        status = self.ask(sock, {"action": "status_service", "service_name": "web"})
        self.assertEqual((status["state"], status["pid"]), ("running", web["pid"]))
        ended = self.ask(sock, {"action": "status_service", "service_name": "brief"})
        self.assertEqual((ended["state"], ended["exit_code"]), ("exited", 4))
        logs = self.ask(sock, {"action": "logs_service", "service_name": "web"})
        self.assertEqual(logs["stdout"], "hello\n")
        again = self.ask(
            sock, {"action": "start_service", "service_name": "web", "command": "sleep 1"}
        )
        self.assertEqual(again, {"error": "service 'web' is already running"})

        # An orderly stop of the agent leaves the services running too: the one it took back
        # and one it started itself.
        late = self.ask(
            sock, {"action": "start_service", "service_name": "late", "command": "sleep 60"}
        )
        self.assertEqual(late["state"], "running", late)
        second.send_signal(signal.SIGTERM)
        # twistd ends an orderly shutdown by re-raising the signal it got.
        self.assertEqual(second.wait(20), -signal.SIGTERM)
        self.assertFalse(groupGone(web["pid"]))
        self.assertFalse(groupGone(late["pid"]))
        _third, sock = self.startTwistd(base)
        for name in ("web", "late"):
            stopped = self.ask(sock, {"action": "stop_service", "service_name": name})
            self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))
        self.assertTrue(groupGone(web["pid"]))
        self.assertTrue(groupGone(late["pid"]))
        listed = self.ask(sock, {"action": "list_services"})
        self.assertEqual(
            [(record["service_name"], record["state"]) for record in listed["services"]],
            [("brief", "exited"), ("late", "stopped"), ("web", "stopped")],
        )

"""Jobs with real processes over the wire: start, read, attach, stdin, signals, limits, removal."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from pyro_reactor.capabilities.jobs.actions import JobActions
from pyro_reactor.capabilities.jobs.registry import Jobs
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.request import Request
from tests.helpers import RunningAgent, alive, makeContext, reactor, startAgent


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def waitFor(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll C{check} until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await sleep(interval)


class StreamClient(Protocol):
    """A client of an attach stream: collects event lines, may send lines."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.lines: list[dict[str, Any]] = []
        self.buffer = b""
        self.done: Deferred[list[dict[str, Any]]] = Deferred()
        self.waiters: list[tuple[Callable[[dict[str, Any]], bool], Deferred[dict[str, Any]]]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode() + b"\n")

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            event = json.loads(line)
            self.lines.append(event)
            for waiter in self.waiters[:]:
                if waiter[0](event):
                    self.waiters.remove(waiter)
                    waiter[1].callback(event)

    def waitFor(self, match: Callable[[dict[str, Any]], bool]) -> Deferred[dict[str, Any]]:
        for event in self.lines:
            if match(event):
                return Deferred.fromFuture(_done(event))
        waiter: Deferred[dict[str, Any]] = Deferred()
        self.waiters.append((match, waiter))
        return waiter

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.lines)


def _done(value: Any) -> Any:
    import asyncio

    future: asyncio.Future[Any] = asyncio.Future(loop=asyncio.new_event_loop())
    future.set_result(value)
    return future


async def attach(agent: RunningAgent, request: dict[str, Any]) -> StreamClient:
    client = StreamClient(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port, timeout=5)
    await connectProtocol(endpoint, client)
    return client


def outputOf(events: list[dict[str, Any]], stream: str = "stdout") -> str:
    return "".join(
        e["data"] for e in events if e.get("event") == "output" and e["stream"] == stream
    )


def jobsOf(agent: RunningAgent) -> Jobs:
    for service in agent.context.services:
        if isinstance(service, Jobs):
            return service
    raise AssertionError("no jobs service")


class JobsTests(TestCase):
    """The job actions against a whole agent with real processes."""

    timeout = 120

    async def agent(self, **overrides: Any) -> RunningAgent:
        agent = await startAgent(self, **overrides)
        self.addCleanup(self._killAll, agent)
        return agent

    async def _killAll(self, agent: RunningAgent) -> None:
        """Kill what the test left running and wait until the agent has seen every end."""
        registry = jobsOf(agent)
        for path in (agent.stateDir / "pyro-jobs").glob("*.json"):
            record = json.loads(path.read_text())
            for key in ("pid", "runner_pid"):
                pid = record.get(key)
                if isinstance(pid, int) and alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            cgroupPath = record.get("cgroup_path")
            if cgroupPath and os.path.exists(os.path.join(cgroupPath, "cgroup.kill")):
                with open(os.path.join(cgroupPath, "cgroup.kill"), "w") as kill:
                    kill.write("1")
        await waitFor(
            lambda: all(job.machine.state() != "running" for job in registry.jobs.values())
        )

    async def ended(self, agent: RunningAgent, jobId: str) -> dict[str, Any]:
        async def check() -> dict[str, Any]:
            return await agent.call({"action": "status_job", "job_id": jobId})

        deadline = time.monotonic() + 30
        while True:
            status = await check()
            if status.get("state") == "exited":
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {jobId} did not end: {status}")
            await sleep(0.05)

    async def test_startReadStatus(self) -> None:
        """A started job answers its id, pid and state; its output and exit are read back,
        and status reports the exit code and byte counts."""
        agent = await self.agent()
        answer = await agent.call(
            {"action": "start_job", "command": "echo out; echo err >&2; exit 3", "job_id": "j1"}
        )
        self.assertEqual(answer["job_id"], "j1")
        self.assertEqual(answer["state"], "running")
        self.assertIsInstance(answer["pid"], int)
        self.assertIn("limits_applied", answer)
        status = await self.ended(agent, "j1")
        self.assertEqual(status["exit_code"], 3)
        self.assertIsNone(status["signal"])
        self.assertEqual((status["stdout_bytes"], status["stderr_bytes"]), (4, 4))
        self.assertEqual(status["stdin"], "none")
        self.assertEqual(status["command"], "echo out; echo err >&2; exit 3")
        read = await agent.call({"action": "read_job", "job_id": "j1"})
        self.assertEqual((read["stdout"], read["stderr"]), ("out\n", "err\n"))
        self.assertEqual((read["stdout_offset"], read["stderr_offset"]), (4, 4))
        self.assertEqual(read["exit"]["exit_code"], 3)
        self.assertFalse(read["gap"])
        listing = await agent.call({"action": "list_jobs"})
        self.assertEqual([job["job_id"] for job in listing["jobs"]], ["j1"])

    async def test_argvAndGeneratedId(self) -> None:
        """argv runs without a shell; a generated id follows the id rule."""
        agent = await self.agent()
        answer = await agent.call(
            {"action": "start_job", "argv": ["printf", "%s|", "a b", "$HOME"]}
        )
        self.assertRegex(answer["job_id"], r"^[A-Za-z0-9._-]{1,64}$")
        await self.ended(agent, answer["job_id"])
        read = await agent.call({"action": "read_job", "job_id": answer["job_id"]})
        self.assertEqual(read["stdout"], "a b|$HOME|")

    async def test_badInput(self) -> None:
        """Every bad field is refused with a clear error and nothing starts."""
        agent = await self.agent()
        await agent.call({"action": "start_job", "command": "true", "job_id": "taken"})
        cases: list[tuple[dict[str, Any], str]] = [
            ({"action": "start_job"}, "exactly one"),
            ({"action": "start_job", "command": "true", "argv": ["true"]}, "exactly one"),
            ({"action": "start_job", "argv": []}, "must not be empty"),
            ({"action": "start_job", "argv": "true"}, "list of strings"),
            ({"action": "start_job", "argv": ["no-such-program-xyz"]}, "not found"),
            ({"action": "start_job", "command": "true", "job_id": "taken"}, "already exists"),
            ({"action": "start_job", "command": "true", "job_id": "a/b"}, "job_id"),
            ({"action": "start_job", "command": "true", "timeout_seconds": -1}, "timeout"),
            ({"action": "start_job", "command": "true", "cwd": "/etc"}, "workspace"),
            ({"action": "start_job", "command": "true", "limits": {"bogus": 1}}, "unknown limit"),
            ({"action": "read_job", "job_id": "taken", "wait_ms": 60001}, "wait_ms"),
            ({"action": "read_job", "job_id": "taken", "max_bytes": 2}, "at least 4"),
            ({"action": "read_job", "job_id": "taken", "stdout_offset": -1}, "stdout_offset"),
            ({"action": "read_job", "job_id": "taken", "stdout_offset": 10**6}, "beyond"),
            ({"action": "signal_job", "job_id": "taken", "signal": "BOGUS"}, "unknown signal"),
            ({"action": "status_job", "job_id": "nope"}, "does not exist"),
            ({"action": "write_job", "job_id": "taken", "data": "x"}, "no stdin"),
            ({"action": "attach_job", "job_id": "taken", "stderr_offset": 10**6}, "beyond"),
        ]
        for request, message in cases:
            answer = await agent.call(request)
            self.assertIn("error", answer, request)
            self.assertIn(message, answer["error"], request)
        listing = await agent.call({"action": "list_jobs"})
        self.assertEqual([job["job_id"] for job in listing["jobs"]], ["taken"])

    async def test_attachStreamsLiveThenExit(self) -> None:
        """An attached client gets output as it is produced, with offsets, then the exit;
        a character split between two writes is never split between events."""
        agent = await self.agent()
        await agent.call(
            {
                "action": "start_job",
                "job_id": "live",
                "stdin": True,
                "command": "read line; printf 'caf\\303'; sleep 0.2; printf '\\251 %s' \"$line\"",
            }
        )
        client = await attach(agent, {"action": "attach_job", "job_id": "live"})
        header = await client.waitFor(lambda e: "attached" in e)
        self.assertEqual(header["state"], "running")
        client.send({"stdin": "hello\n"})
        events = await client.done
        outputs = [e for e in events if e.get("event") == "output"]
        self.assertEqual(
            outputs[0], {"event": "output", "stream": "stdout", "offset": 0, "data": "caf"}
        )
        self.assertEqual(outputs[-1]["offset"], 3)
        self.assertEqual(outputOf(events), "café hello")
        self.assertEqual(events[-1]["event"], "exit")
        self.assertEqual(events[-1]["exit_code"], 0)
        self.assertEqual(events[-1]["stdout_bytes"], len("café hello".encode()))

    async def test_startWithAttachAndStdinEOF(self) -> None:
        """start_job with attach answers the start line, then the stream; stdin lines and
        close_stdin reach the command; a bad line gets an error event and the stream goes on."""
        agent = await self.agent()
        client = await attach(
            agent,
            {"action": "start_job", "command": "cat; echo done", "stdin": True, "attach": True},
        )
        start = await client.waitFor(lambda e: "job_id" in e)
        self.assertEqual(start["state"], "running")
        client.send({"stdin_base64": base64.b64encode(b"raw\n").decode()})
        client.send({"bogus": 1})
        await client.waitFor(lambda e: e.get("event") == "error")
        client.send({"stdin": "text\n"})
        client.send({"close_stdin": True})
        events = await client.done
        self.assertEqual(outputOf(events), "raw\ntext\ndone\n")
        self.assertEqual(events[-1]["event"], "exit")

    async def test_base64AndReattachFromOffset(self) -> None:
        """Attaching to an ended job replays from the given offsets; base64 gives exact bytes."""
        agent = await self.agent()
        await agent.call({"action": "start_job", "job_id": "b", "command": "printf 'ab\\377cd'"})
        await self.ended(agent, "b")
        client = await attach(
            agent, {"action": "attach_job", "job_id": "b", "stdout_offset": 2, "encoding": "base64"}
        )
        events = await client.done
        outputs = [e for e in events if e.get("event") == "output"]
        self.assertEqual(
            outputs,
            [
                {
                    "event": "output",
                    "stream": "stdout",
                    "offset": 2,
                    "data": base64.b64encode(b"\xffcd").decode(),
                }
            ],
        )
        client = await attach(agent, {"action": "attach_job", "job_id": "b"})
        events = await client.done
        self.assertEqual(outputOf(events), "ab\ufffdcd")

    async def test_readWaitsForOutput(self) -> None:
        """read_job with wait_ms returns as soon as new output arrives, with the next offsets."""
        agent = await self.agent()
        await agent.call(
            {"action": "start_job", "job_id": "w", "stdin": True, "command": "read x; echo got $x"}
        )
        pending = agent.call({"action": "read_job", "job_id": "w", "wait_ms": 30000})
        early: list[dict[str, Any]] = []

        def seen(answer: dict[str, Any]) -> dict[str, Any]:
            early.append(answer)
            return answer

        pending.addCallback(seen)
        await sleep(0.2)
        self.assertEqual(early, [])
        written = await agent.call({"action": "write_job", "job_id": "w", "data": "it\n"})
        self.assertEqual(written, {"job_id": "w", "written": 3})
        read = await pending
        self.assertEqual(read["stdout"], "got it\n")
        self.assertEqual(read["stdout_offset"], 7)
        await self.ended(agent, "w")
        answer = await agent.call({"action": "write_job", "job_id": "w", "data": "late"})
        self.assertIn("ended", answer["error"])

    async def test_signalAndTimeout(self) -> None:
        """signal_job ends a job with the signal's name; a timeout kills it, timed_out."""
        agent = await self.agent()
        await agent.call({"action": "start_job", "job_id": "s", "command": "exec sleep 60"})
        answer = await agent.call({"action": "signal_job", "job_id": "s", "signal": "TERM"})
        self.assertEqual(answer, {"job_id": "s", "signal": "TERM"})
        status = await self.ended(agent, "s")
        self.assertEqual((status["exit_code"], status["signal"]), (None, "TERM"))
        await agent.call(
            {"action": "start_job", "job_id": "t", "command": "sleep 60", "timeout_seconds": 0.3}
        )
        status = await self.ended(agent, "t")
        self.assertTrue(status["timed_out"])
        self.assertEqual(status["signal"], "KILL")
        answer = await agent.call({"action": "signal_job", "job_id": "t", "signal": "TERM"})
        self.assertIn("ended", answer["error"])

    async def test_leftoversKilledWithTheMainProcess(self) -> None:
        """What the main process leaves behind (even in a new session) dies when it exits."""
        agent = await self.agent()
        pidFile = agent.workspace / "daemon.pid"
        await agent.call(
            {
                "action": "start_job",
                "job_id": "d",
                "command": "setsid sh -c 'echo $$ > daemon.pid; exec sleep 300' & sleep 0.3",
            }
        )
        await waitFor(lambda: pidFile.exists() and pidFile.read_text().strip())
        daemon = int(pidFile.read_text())
        await self.ended(agent, "d")
        await waitFor(lambda: not alive(daemon))

    async def test_removeAndForce(self) -> None:
        """remove_job refuses a running job unless forced (which kills it); removal forgets
        the job and its files."""
        agent = await self.agent()
        await agent.call({"action": "start_job", "job_id": "r", "command": "sleep 60"})
        answer = await agent.call({"action": "remove_job", "job_id": "r"})
        self.assertIn("running", answer["error"])
        answer = await agent.call({"action": "remove_job", "job_id": "r", "force": True})
        self.assertEqual(answer, {"job_id": "r", "removed": True})
        answer = await agent.call({"action": "status_job", "job_id": "r"})
        self.assertIn("does not exist", answer["error"])
        await waitFor(lambda: not list((agent.stateDir / "pyro-jobs").glob("r.*")))

    async def test_maxJobs(self) -> None:
        """Beyond --max-jobs the oldest ended job is dropped; with none ended, an error."""
        agent = await self.agent(maxJobs=2)
        await agent.call({"action": "start_job", "job_id": "old", "command": "true"})
        await self.ended(agent, "old")
        await agent.call({"action": "start_job", "job_id": "run1", "command": "sleep 60"})
        answer = await agent.call({"action": "start_job", "job_id": "run2", "command": "sleep 60"})
        self.assertEqual(answer["job_id"], "run2")
        answer = await agent.call({"action": "status_job", "job_id": "old"})
        self.assertIn("does not exist", answer["error"])
        answer = await agent.call({"action": "start_job", "job_id": "run3", "command": "true"})
        self.assertIn("too many jobs", answer["error"])

    async def test_outputCapLeavesAGap(self) -> None:
        """Beyond --job-output-bytes the oldest output is dropped: readers get a gap and the
        offsets of what is kept never move."""
        limit = 256 * 1024
        agent = await self.agent(jobOutputBytes=limit)
        await agent.call(
            {
                "action": "start_job",
                "job_id": "big",
                "command": "head -c 2000000 /dev/zero | tr '\\0' x",
            }
        )
        await self.ended(agent, "big")
        read = await agent.call({"action": "read_job", "job_id": "big", "encoding": "base64"})
        self.assertTrue(read["gap"])
        kept = len(base64.b64decode(read["stdout"]))
        self.assertEqual(read["stdout_offset"], 2000000)
        self.assertLessEqual(kept, limit + 128 * 1024)
        self.assertGreaterEqual(kept, limit)
        client = await attach(agent, {"action": "attach_job", "job_id": "big"})
        events = await client.done
        gap = events[1]
        self.assertEqual(gap["event"], "gap")
        self.assertEqual((gap["offset"], gap["resumed_at"]), (0, 2000000 - kept))
        usage = (agent.stateDir / "pyro-jobs" / "big.stdout").stat().st_blocks * 512
        self.assertLess(usage, 2000000)


class FallbackTests(TestCase):
    """Without cgroups: process groups, the runner as subreaper, ``cgroup: false``."""

    timeout = 120

    async def test_noCgroup(self) -> None:
        """A job says ``cgroup: false``, limits are refused, signals reach its group, and
        what the main process left behind (even a new session) is killed when it exits."""
        context = makeContext(self)
        jobs = Jobs(context, cgroups=None)
        jobs.startService()
        self.addCleanup(jobs.stopService)
        actions = JobActions(jobs)
        answer = await actions.start(
            Request({"action": "start_job", "command": "sleep 60", "job_id": "g"})
        )
        self.assertFalse(answer["cgroup"])
        self.assertIsNone(actions.status(Request({"job_id": "g"}))["usage"])
        actions.signal(Request({"job_id": "g", "signal": "TERM"}))
        await jobs.get("g").machine.whenEnded()
        self.assertEqual(jobs.get("g").record["signal"], "TERM")
        with self.assertRaises(ActionError):
            await actions.start(
                Request({"command": "true", "limits": {"pids": 5}, "job_id": "lim"})
            )
        pidFile = context.config.workspace / "daemon.pid"
        await actions.start(
            Request(
                {
                    "command": "setsid sh -c 'echo $$ > daemon.pid; exec sleep 300' & sleep 0.3",
                    "job_id": "d",
                }
            )
        )
        await waitFor(lambda: pidFile.exists() and pidFile.read_text().strip())
        daemon = int(pidFile.read_text())
        await jobs.get("d").machine.whenEnded()
        await waitFor(lambda: not alive(daemon))

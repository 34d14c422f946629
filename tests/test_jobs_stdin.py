"""A job's stdin is bounded: the queue by itself, and write_job and attach streams over TCP."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pyro_reactor.capabilities.jobs.attach import AttachStream
from pyro_reactor.capabilities.jobs.output import JobOutput
from pyro_reactor.capabilities.jobs.stdin import MAX_QUEUED_STDIN, StdinFull, StdinQueue
from pyro_reactor.wire.budget import BudgetExceeded, MemoryBudget
from tests.helpers import RunningAgent, reactor, startAgent
from tests.test_job_attach import inline
from tests.test_jobs import attach, jobsOf, waitFor

MiB = 1024 * 1024


class FakePipe:
    """The runner's process transport as the queue sees it: a consumer of fd 0."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.closed = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if sum(map(len, self.written)) > 64 * 1024:
            self.producer.pauseProducing()

    def closeChildFD(self, fd: int) -> None:
        self.closed = True

    def drain(self) -> bytes:
        data, self.written = b"".join(self.written), []
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


class StdinQueueTests(SynchronousTestCase):
    """The queue between hosts and a job's stdin pipe, with a fake pipe."""

    def setUp(self) -> None:
        self.pipe = FakePipe()
        self.clock = Clock()
        self.budget = MemoryBudget(8 * MiB)
        self.queue = StdinQueue(
            "j", self.pipe, self.clock, self.budget.reserve(0, "stdin"), bound=MiB
        )

    def fill(self) -> None:
        while self.queue.room:
            self.queue.offer(b"x" * self.queue.room)

    def test_writeRefusedWhole(self) -> None:
        """A write past the bound is refused naming the bound and what is queued; nothing of
        it is queued and the budget holds exactly the queued bytes."""
        self.fill()
        self.assertEqual(self.queue.queued, MiB)
        with self.assertRaises(StdinFull) as caught:
            self.queue.write(b"y" * 10)
        self.assertIn(f"{MiB} bytes of stdin queued", caught.exception.message)
        self.assertIn(f"at most {MiB}", caught.exception.message)
        self.assertEqual(self.queue.queued, MiB)
        self.assertEqual(self.budget.used, MiB)

    def test_offerTakesWhatFitsAndRoomComesAtHalf(self) -> None:
        """offer takes only what fits; whenRoom fires once the pipe drained half the bound,
        and the budget shrinks as the pipe takes bytes."""
        self.fill()
        taken = self.queue.offer(b"z" * 100)
        self.assertEqual(taken, 0)
        room = self.queue.whenRoom()
        self.assertNoResult(room)
        while self.queue.queued > MiB // 2:
            self.pipe.drain()
            self.clock.advance(0)
            self.assertEqual(self.queue.queued > MiB // 2, not room.called)
        self.successResultOf(room)
        self.assertEqual(self.budget.used, self.queue.queued)

    def test_orderKeptAndCloseAfterDrain(self) -> None:
        """Bytes reach the pipe in order; close_stdin closes only after the last byte."""
        sent = bytes(range(256)) * 2000
        self.queue.write(sent[:300_000])
        self.queue.write(sent[300_000:])
        self.queue.close()
        received = b""
        while self.queue.queued:
            self.assertFalse(self.pipe.closed)
            received += self.pipe.drain()
        received += self.pipe.drain()
        self.assertEqual(received, sent)
        self.assertTrue(self.pipe.closed)
        self.assertEqual(self.budget.used, 0)

    def test_dropGivesTheBudgetBack(self) -> None:
        """Dropping (the pipe is gone) forgets the queue, gives the budget back, wakes the
        waiters and refuses later writes."""
        self.fill()
        room = self.queue.whenRoom()
        self.queue.drop()
        self.assertNoResult(room)
        self.clock.advance(0)
        self.successResultOf(room)
        self.assertEqual((self.queue.queued, self.budget.used), (0, 0))
        self.assertIsNone(self.pipe.producer)
        with self.assertRaises(StdinFull):
            self.queue.write(b"late")

    def test_budgetRefusal(self) -> None:
        """A write that fits the queue but not the agent's budget is refused by the budget."""
        small = MemoryBudget(256 * 1024)
        queue = StdinQueue("j", FakePipe(), Clock(), small.reserve(0, "stdin"), bound=MiB)
        queue.pauseProducing()
        queue.write(b"a" * 200_000)
        with self.assertRaises(BudgetExceeded):
            queue.write(b"b" * 100_000)
        self.assertEqual((queue.queued, small.used), (200_000, 200_000))


@implementer(IPushProducer)
class StdinSender(Protocol):
    """An attach client that sends ``total`` bytes as stdin lines as fast as TCP lets it."""

    line = 256 * 1024

    def __init__(self, request: dict[str, Any], total: int) -> None:
        self.request = request
        self.total = total
        self.sent = 0
        self.paused = False
        self.digest = hashlib.sha256()
        self.events: list[dict[str, Any]] = []
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode() + b"\n")
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()

    def chunk(self, index: int) -> bytes:
        return index.to_bytes(4, "big") * (self.line // 4)

    def resumeProducing(self) -> None:
        self.paused = False
        assert self.transport is not None
        while not self.paused and self.sent < self.total:
            data = self.chunk(self.sent // self.line)
            self.digest.update(data)
            self.sent += len(data)
            line = {"stdin_base64": base64.b64encode(data).decode()}
            # May call pauseProducing() before it returns.
            self.transport.write(json.dumps(line).encode() + b"\n")

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.events.append(json.loads(line))


def readingPeers() -> set[int]:
    """The peer ports of the TCP connections the reactor is reading from."""
    ports = set()
    for reader in reactor.getReaders():
        try:
            ports.add(reader.getPeer().port)
        except Exception:  # not a TCP connection
            continue
    return ports


class JobStdinTests(TestCase):
    """Stdin of real jobs over TCP stays within its bound, and nothing sent is lost."""

    timeout = 180

    async def agent(self, **overrides: Any) -> RunningAgent:
        agent = await startAgent(self, **overrides)
        self.addCleanup(self._endAll, agent)
        return agent

    async def _endAll(self, agent: RunningAgent) -> None:
        """Kill the jobs the test left running and wait until the agent has seen them end."""
        registry = jobsOf(agent)
        for job in list(registry.jobs.values()):
            if job.machine.state() == "running":
                job.machine.signal(signal.SIGKILL)
        await waitFor(
            lambda: all(job.machine.state() != "running" for job in registry.jobs.values())
        )

    WAITING = "while [ ! -e go ]; do sleep 0.05; done; "

    async def start(self, agent: RunningAgent, jobId: str, then: str) -> None:
        answer = await agent.call(
            {"action": "start_job", "job_id": jobId, "stdin": True, "command": self.WAITING + then}
        )
        self.assertEqual(answer["state"], "running", answer)

    async def test_writeJobBeyondTheBoundIsRefused(self) -> None:
        """write_job to a job that does not read is refused once 4 MiB are queued, with an
        error naming the bound and the queued size; the agent never holds more; once the job
        reads, the budget is given back and writes are accepted again."""
        agent = await self.agent()
        await self.start(agent, "full", "exec cat > /dev/null")
        job = jobsOf(agent).get("full")
        budget = agent.context.budget
        piece = base64.b64encode(b"x" * MiB).decode()
        refusal = None
        for _ in range(16):
            answer = await agent.call(
                {"action": "write_job", "job_id": "full", "data_base64": piece}
            )
            assert job.stdinQueue is not None
            self.assertLessEqual(job.stdinQueue.queued, MAX_QUEUED_STDIN)
            if "error" in answer:
                refusal = answer["error"]
                break
            self.assertEqual(answer, {"job_id": "full", "written": MiB})
        assert refusal is not None, "no write was refused"
        assert job.stdinQueue is not None
        queued = job.stdinQueue.queued
        self.assertIn(f"at most {MAX_QUEUED_STDIN}", refusal)
        self.assertIn(f"has {queued} bytes of stdin queued", refusal)
        self.assertIn("nothing was written", refusal)
        self.assertGreater(queued, MAX_QUEUED_STDIN - MiB)
        self.assertLessEqual(budget.used, MAX_QUEUED_STDIN)
        (agent.workspace / "go").touch()
        await waitFor(lambda: job.stdinQueue is not None and job.stdinQueue.queued == 0)
        await waitFor(lambda: budget.used == 0)
        answer = await agent.call({"action": "write_job", "job_id": "full", "data_base64": piece})
        self.assertEqual(answer, {"job_id": "full", "written": MiB})

    async def test_stdinClosedByTheJobDropsTheQueue(self) -> None:
        """When the job closes its stdin, what was queued is dropped, the budget given back
        and stdin shows closed; removing a job does the same."""
        agent = await self.agent()
        budget = agent.context.budget
        await self.start(agent, "closer", "exec 0<&-; sleep 60")
        await self.start(agent, "other", "sleep 60")
        piece = base64.b64encode(b"y" * MiB).decode()
        for jobId in ("closer", "other"):
            for _ in range(3):
                answer = await agent.call(
                    {"action": "write_job", "job_id": jobId, "data_base64": piece}
                )
                self.assertEqual(answer["written"], MiB, answer)
        self.assertGreater(budget.used, 2 * MiB)
        other = jobsOf(agent).get("other")
        (agent.workspace / "go").touch()

        async def closed() -> bool:
            status = await agent.call({"action": "status_job", "job_id": "closer"})
            return bool(status["stdin"] == "closed")

        await waitFor(lambda: jobsOf(agent).get("closer").stdinQueue is None)
        self.assertTrue(await closed())
        answer = await agent.call({"action": "write_job", "job_id": "closer", "data": "x"})
        self.assertIn("stdin closed", answer["error"])
        # "other" is still waiting in its loop and holds its own queue.
        assert other.stdinQueue is not None
        self.assertEqual(budget.used, other.stdinQueue.queued)
        await agent.call({"action": "remove_job", "job_id": "other", "force": True})
        await waitFor(lambda: budget.used == 0)

    async def test_attachStdinHasBackpressure(self) -> None:
        """64 MiB of stdin lines on an attach stream to a job that does not read: the agent
        stops reading the connection while the job's queue is full and holds no more than the
        bound; once the job reads, every byte arrives, in order."""
        agent = await self.agent()
        budget = agent.context.budget
        total = 64 * MiB
        await self.start(agent, "slow", f"head -c {total} | sha256sum")
        job = jobsOf(agent).get("slow")
        sender = StdinSender({"action": "attach_job", "job_id": "slow"}, total)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port), sender)
        assert sender.transport is not None
        ours = sender.transport.getHost().port  # type: ignore[attr-defined]

        def blocked() -> bool:
            queue = job.stdinQueue
            return (
                queue is not None
                and queue.queued > MAX_QUEUED_STDIN // 2
                and sender.paused
                and ours not in readingPeers()
            )

        await waitFor(blocked, timeout=60)
        assert job.stdinQueue is not None
        self.assertLessEqual(job.stdinQueue.queued, MAX_QUEUED_STDIN)
        self.assertLess(sender.sent, total // 2)
        self.assertEqual(job.status()["stdout_bytes"], 0)
        (agent.workspace / "go").touch()
        await waitFor(lambda: any(e.get("event") == "exit" for e in sender.events), timeout=150)
        self.assertEqual(sender.sent, total)
        output = "".join(e["data"] for e in sender.events if e.get("event") == "output")
        self.assertEqual(output.split()[0], sender.digest.hexdigest())
        self.assertFalse([e for e in sender.events if e.get("event") == "error"])
        # Everything the agent held for this stream fitted the bound (plus request lines).
        self.assertLessEqual(budget.peak, MAX_QUEUED_STDIN + MiB)
        await waitFor(lambda: budget.used == 0)

    async def test_attachStdinAfterTheJobEnds(self) -> None:
        """A stream blocked on a full queue gets an error event for the rest of its line when
        the job ends, and the queue's budget is given back."""
        agent = await self.agent()
        budget = agent.context.budget
        await self.start(agent, "quitter", "exit 0")
        client = await attach(agent, {"action": "attach_job", "job_id": "quitter"})
        job = jobsOf(agent).get("quitter")
        data = base64.b64encode(b"q" * (6 * MiB)).decode()
        client.send({"stdin_base64": data})
        await waitFor(
            lambda: job.stdinQueue is not None and job.stdinQueue.queued > MAX_QUEUED_STDIN // 2
        )
        (agent.workspace / "go").touch()
        events = await client.done
        errors = [e["error"] for e in events if e.get("event") == "error"]
        self.assertEqual(len(errors), 1, events)
        self.assertTrue("ended" in errors[0] or "closed" in errors[0], errors)
        self.assertEqual(events[-1]["event"], "exit")
        self.assertEqual(budget.used, 0)

    async def test_attachLinesCountAgainstTheBudget(self) -> None:
        """An unfinished line on an attach stream is held from the memory budget: past it the
        line is dropped with an error event, the budget is given back and the stream goes on."""
        agent = await self.agent(memoryBudget=2 * MiB)
        budget = agent.context.budget
        await self.start(agent, "fed", "cat")
        client = await attach(agent, {"action": "attach_job", "job_id": "fed"})
        await client.waitFor(lambda e: "attached" in e)
        assert client.transport is not None
        client.transport.write(b'{"stdin": "' + b"a" * (3 * MiB))
        error = await client.waitFor(lambda e: e.get("event") == "error")
        self.assertIn("memory budget", error["error"])
        self.assertLess(budget.used, MiB)
        client.transport.write(b'"}\n')
        client.send({"stdin": "after\n"})
        (agent.workspace / "go").touch()
        await client.waitFor(lambda e: e.get("event") == "output")
        client.send({"close_stdin": True})
        events = await client.done
        output = "".join(e["data"] for e in events if e.get("event") == "output")
        self.assertTrue(output.endswith("after\n"), output[-100:])
        self.assertEqual(events[-1]["event"], "exit")
        await waitFor(lambda: budget.used == 0)


class QueueJob:
    """What an attach stream needs of a job, with a real stdin queue on a fake pipe."""

    jobId = "fake"

    def __init__(self, output: JobOutput, queue: StdinQueue) -> None:
        self.output = output
        self.queue = queue
        self.machine = self

    def state(self) -> str:
        return "running"

    def whenEnded(self) -> Deferred[None]:
        return Deferred()

    def offerStdin(self, data: bytes) -> int:
        return self.queue.offer(data)

    def whenStdinRoom(self) -> Deferred[None]:
        return self.queue.whenRoom()


class AttachBackpressureTests(SynchronousTestCase):
    """An attach stream in memory stops reading its connection while the stdin queue is full."""

    def test_pausedWhileFullResumedWhenDrained(self) -> None:
        """Lines beyond the queue's bound pause the transport and wait, later lines included;
        once the pipe drains the transport resumes and every byte reaches it in order."""
        base = Path(self.mktemp())
        base.mkdir()
        for name in ("stdout", "stderr"):
            (base / f"j.{name}").write_bytes(b"")
        output = JobOutput({s: base / f"j.{s}" for s in ("stdout", "stderr")}, 1 << 20, inline)
        self.addCleanup(output.close)
        pipe, clock = FakePipe(), Clock()
        job = QueueJob(output, StdinQueue("fake", pipe, clock, None, bound=MiB))
        transport = StringTransport()
        stream = AttachStream(job, job, 0, 0, "text")  # type: ignore[arg-type]
        stream.makeConnection(transport)
        pieces = [bytes([index]) * (300 * 1024) for index in range(10)]
        stream.dataReceived(
            b"".join(
                json.dumps({"stdin_base64": base64.b64encode(p).decode()}).encode() + b"\n"
                for p in pieces
            )
        )
        self.assertEqual(transport.producerState, "paused")
        self.assertLessEqual(job.queue.queued, MiB)
        received = b""
        while transport.producerState == "paused":
            received += pipe.drain()
            clock.advance(0)
            self.assertLessEqual(job.queue.queued, MiB)
        while job.queue.queued or pipe.written:
            received += pipe.drain()
        self.assertEqual(received, b"".join(pieces))
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse([line for line in transport.value().splitlines() if b"error" in line])

"""The CLI's stdin pump: local stdin copied to a job's stdin at the pace the connection takes.

In memory: the pump over a L{JobAttachment} on a L{StringTransport} (paused and resumed by
hand, as a full and a drained connection would) and a fake reader that only reads when
granted. For real: ``pyro-agent-client run --stdin`` as a process, fed tens of MiB through a
pipe, against an agent in this process whose job reads slowly; the client's peak memory must
not follow the input's size.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pyro_reactor.client.jobs import JobAttachment
from pyro_reactor.client.stdinpump import (
    StdinPump,
    StdinPumpCore,
    StdinPumpMachine,
    ThreadedReader,
)
from tests.helpers import RunningAgent, reactor, startAgent
from tests.test_jobs import jobsOf, waitFor


class FakeReader:
    """A reader that reads only what the test hands it, and only when granted."""

    def __init__(self) -> None:
        self.grants: list[tuple[Callable[[bytes | str], None], Callable[[], None]]] = []
        self.stopped = False

    def grant(self, received: Callable[[bytes | str], None], exhausted: Callable[[], None]) -> None:
        self.grants.append((received, exhausted))

    def stop(self) -> None:
        self.stopped = True

    def give(self, data: bytes) -> None:
        """Answer the oldest grant with C{data}."""
        received, _ = self.grants.pop(0)
        received(data)

    def end(self) -> None:
        """Answer the oldest grant with the end of the input."""
        _, exhausted = self.grants.pop(0)
        exhausted()


def attached() -> tuple[JobAttachment, StringTransport]:
    """An attachment whose header has arrived, over a StringTransport."""
    attachment = JobAttachment({"action": "attach_job", "job_id": "j"})
    transport = StringTransport()
    attachment.makeConnection(transport)
    attachment.dataReceived(b'{"job_id": "j", "state": "running"}\n')
    transport.clear()
    return attachment, transport


def sentLines(transport: StringTransport) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in transport.value().splitlines()]
    transport.clear()
    return lines


def stdinBytes(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(line["stdin_base64"]) for line in lines)


class PausingConsumer:
    """A consumer that pauses its producer from inside C{write} once it holds C{mark} bytes,
    as Twisted's transports do, and resumes it when the test drains it."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.held: list[bytes | str] = []
        self.producer: Any = None
        self.closed = False

    def write(self, data: bytes | str) -> None:
        self.held.append(data)
        if sum(len(chunk) for chunk in self.held) >= self.mark:
            self.producer.pauseProducing()

    def closeStdin(self) -> None:
        self.closed = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def drain(self) -> list[bytes | str]:
        drained, self.held = self.held, []
        self.producer.resumeProducing()
        return drained


class StdinPumpTests(SynchronousTestCase):
    """The pump machine, driven by hand."""

    def start(self) -> tuple[StdinPump, FakeReader, StringTransport]:
        attachment, transport = attached()
        reader = FakeReader()
        pump = StdinPumpMachine(StdinPumpCore(attachment, reader))
        pump.start()
        return pump, reader, transport

    def test_readsOnlyWhileTheConnectionTakesData(self) -> None:
        """The pump registers as the connection's streaming producer and has one read under
        way at a time; while the connection is paused it grants no new read (the chunk read
        before the pause is still written); once resumed it reads on."""
        pump, reader, transport = self.start()
        self.assertIs(transport.producer, pump)
        self.assertTrue(transport.streaming)
        self.assertEqual(len(reader.grants), 1)
        reader.give(b"one")
        self.assertEqual(stdinBytes(sentLines(transport)), b"one")
        self.assertEqual(len(reader.grants), 1)

        pump.pauseProducing()  # the write buffer is full
        reader.give(b"two")
        self.assertEqual(stdinBytes(sentLines(transport)), b"two")
        self.assertEqual(reader.grants, [])
        pump.pauseProducing()
        self.assertEqual(reader.grants, [])

        pump.resumeProducing()  # drained
        self.assertEqual(len(reader.grants), 1)
        pump.resumeProducing()
        self.assertEqual(len(reader.grants), 1)
        reader.give(b"three")
        self.assertEqual(stdinBytes(sentLines(transport)), b"three")

    def test_pausedAndResumedBeforeTheChunkArrives(self) -> None:
        """A pause and a resume while a read is under way change nothing: its chunk is
        written and the next read granted."""
        pump, reader, transport = self.start()
        pump.pauseProducing()
        pump.resumeProducing()
        reader.give(b"x")
        self.assertEqual(stdinBytes(sentLines(transport)), b"x")
        self.assertEqual(len(reader.grants), 1)

    def test_pausedFromInsideTheWrite(self) -> None:
        """A consumer that pauses the pump from inside ``write`` (as a transport past its
        buffer mark does) gets the one chunk granted before the pause and no more until it
        drains; then the pump reads on, and the end of the input closes stdin."""
        consumer = PausingConsumer(mark=8)
        reader = FakeReader()
        pump = StdinPumpMachine(StdinPumpCore(consumer, reader))
        pump.start()
        self.assertIs(consumer.producer, pump)
        reader.give(b"aaaa")
        self.assertEqual(len(reader.grants), 1)
        reader.give(b"bbbb")  # the mark: paused inside this write
        self.assertEqual(len(reader.grants), 1)
        reader.give(b"cccc")
        self.assertEqual(reader.grants, [])
        self.assertEqual(consumer.drain(), [b"aaaa", b"bbbb", b"cccc"])
        self.assertEqual(len(reader.grants), 1)
        reader.end()
        self.assertTrue(consumer.closed)
        self.assertIsNone(consumer.producer)

    def test_endOfInputClosesStdinAfterTheData(self) -> None:
        """At the end of the input ``close_stdin`` goes after every data line, even while the
        connection is paused, and the pump unregisters (so a later detach can close)."""
        pump, reader, transport = self.start()
        reader.give(b"last")
        pump.pauseProducing()
        reader.end()
        lines = sentLines(transport)
        self.assertEqual(lines, [{"stdin_base64": "bGFzdA=="}, {"close_stdin": True}])
        self.assertIsNone(transport.producer)
        self.assertEqual(reader.grants, [])

    def test_connectionGoneStopsReading(self) -> None:
        """``stopProducing`` (the connection is gone) stops the reader; a chunk read before
        that is dropped, and the end of the input sends nothing."""
        pump, reader, transport = self.start()
        pump.stopProducing()
        self.assertTrue(reader.stopped)
        reader.give(b"late")
        self.assertEqual(transport.value(), b"")
        pump.resumeProducing()
        self.assertEqual(reader.grants, [])

    def test_attachmentAlreadyEnded(self) -> None:
        """Registering with an attachment whose stream has ended stops the pump at once."""
        attachment, transport = attached()
        attachment.connectionLost(Failure(Exception("gone")))
        reader = FakeReader()
        pump = StdinPumpMachine(StdinPumpCore(attachment, reader))
        pump.start()
        self.assertTrue(reader.stopped)
        self.assertIsNone(transport.producer)


@implementer(IReactorFromThreads)
class _CallsQueue:
    """A stand-in for the reactor's C{callFromThread}: calls are queued for the test."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.calls.put((callable, args))

    def next(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.calls.get(timeout=30)


class ThreadedReaderTests(SynchronousTestCase):
    """The daemon-thread reader of a blocking file."""

    def test_oneChunkPerGrant(self) -> None:
        """Each grant reads one chunk (at most the chunk size) and hands it over through
        ``callFromThread``; nothing is read ahead of a grant; the end of the file is reported
        once."""
        reads: list[int] = []
        source = io.BytesIO(b"a" * 10 + b"b" * 3)

        def read(size: int) -> bytes:
            reads.append(size)
            return source.read(size)

        calls = _CallsQueue()
        reader = ThreadedReader(calls, read, chunkBytes=10)
        got: list[bytes | str] = []
        ended: list[bool] = []
        reader.grant(got.append, lambda: ended.append(True))
        function, args = calls.next()
        self.assertEqual(reads, [10])
        function(*args)
        self.assertEqual(got, [b"a" * 10])
        reader.grant(got.append, lambda: ended.append(True))
        function, args = calls.next()
        function(*args)
        reader.grant(got.append, lambda: ended.append(True))
        function, args = calls.next()
        function(*args)
        self.assertEqual((got, ended, len(reads)), ([b"a" * 10, b"b" * 3], [True], 3))

    def test_stopEndsTheThread(self) -> None:
        """``stop`` lets the thread end without reading again."""
        reads: list[int] = []
        calls = _CallsQueue()

        def read(size: int) -> bytes:
            reads.append(size)
            return b"x"

        reader = ThreadedReader(calls, read)
        reader.grant(lambda data: None, lambda: None)
        calls.next()
        reader.stop()
        assert reader._thread is not None
        reader._thread.join(30)
        self.assertFalse(reader._thread.is_alive())
        self.assertEqual(len(reads), 1)

    def test_readErrorEndsTheInput(self) -> None:
        """A read error ends the input as the end of the file would."""

        def read(size: int) -> bytes:
            raise OSError(5, "Input/output error")

        calls = _CallsQueue()
        reader = ThreadedReader(calls, read)
        ended: list[bool] = []
        reader.grant(lambda data: None, lambda: ended.append(True))
        function, args = calls.next()
        function(*args)
        self.assertEqual(ended, [True])


# The client as a process, reporting its peak RSS (VmHWM) on stderr as it exits.
_MEASURED_CLIENT = """
import atexit, sys
def report():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                sys.stderr.write("PEAK " + line.split()[1] + "\\n")
atexit.register(report)
from pyro_reactor.client.cli import main
main(sys.argv[1:])
"""


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code if code is not None else -1)


class RunStdinMemoryTests(TestCase):
    """``run --stdin`` as a process against a real agent over TCP."""

    timeout = 300

    async def runClient(self, agent: RunningAgent, inputBytes: int) -> tuple[bytes, int]:
        """Pipe C{inputBytes} zero bytes into ``run --stdin`` of a job that sleeps before
        reading; its stdout and peak RSS in KiB."""
        process = _Collect()
        pipeline = f'head -c {inputBytes} /dev/zero | "$0" "$@"'
        reactor.spawnProcess(
            process,
            "/bin/sh",
            [
                "sh",
                "-c",
                pipeline,
                sys.executable,
                "-c",
                _MEASURED_CLIENT,
                "--connect",
                f"tcp:host=127.0.0.1:port={agent.port}",
                "run",
                "--stdin",
                "--",
                "sleep 2; wc -c",
            ],
            env=dict(os.environ),
        )
        code = await process.ended
        self.assertEqual(code, 0, process.err)
        peaks = [line for line in process.err.splitlines() if line.startswith(b"PEAK ")]
        self.assertEqual(len(peaks), 1, process.err)
        return process.out, int(peaks[0].split()[1])

    async def test_largeInputIntoASlowJob(self) -> None:
        """64 MiB piped into a job that sleeps before reading arrives whole, and the client's
        peak RSS grows by far less than the input (it reads stdin only while the connection
        takes data), compared with the same client fed nothing."""
        agent = await startAgent(self)

        async def settle() -> None:
            registry = jobsOf(agent)
            for job in list(registry.jobs.values()):
                if job.machine.state() == "running":
                    job.machine.signal(9)
            await waitFor(
                lambda: all(j.machine.state() != "running" for j in registry.jobs.values()),
                timeout=60,
            )

        self.addCleanup(settle)
        out, idlePeak = await self.runClient(agent, 0)
        self.assertEqual(out.strip(), b"0")
        size = 64 * 1024 * 1024
        out, peak = await self.runClient(agent, size)
        self.assertEqual(out.strip(), str(size).encode())
        self.assertLess(peak - idlePeak, 32 * 1024, (idlePeak, peak))

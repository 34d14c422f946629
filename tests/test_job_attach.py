"""The attach stream in memory: backpressure from a slow reader, UTF-8 boundaries, gaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.jobs.attach import CHUNK, AttachStream
from pyro_reactor.capabilities.jobs.output import JobOutput


def inline(function: Any, *args: Any) -> Deferred[Any]:
    return succeed(function(*args))


class PausingTransport(StringTransport):
    """Pauses its producer once it holds more than a socket's worth, as a real one does."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) > 64 * 1024 and self.producer is not None:
            self.producer.pauseProducing()


class FakeMachine:
    def __init__(self) -> None:
        self.current = "running"

    def state(self) -> str:
        return self.current

    def whenEnded(self) -> Deferred[None]:
        return Deferred()


class FakeJob:
    """What an attach stream needs of a job."""

    jobId = "fake"

    def __init__(self, output: JobOutput) -> None:
        self.output = output
        self.machine = FakeMachine()

    def exitInfo(self) -> dict[str, Any] | None:
        if self.machine.current != "exited":
            return None
        return {"exit_code": 0, "signal": None}


class AttachStreamTests(SynchronousTestCase):
    """An attach stream reads no more than its transport accepts."""

    def makeJob(self, stdout: bytes, limit: int = 1 << 30) -> FakeJob:
        base = Path(self.mktemp())
        base.mkdir()
        (base / "j.stdout").write_bytes(stdout)
        (base / "j.stderr").write_bytes(b"")
        output = JobOutput(
            {"stdout": base / "j.stdout", "stderr": base / "j.stderr"}, limit, inline
        )
        self.addCleanup(output.close)
        return FakeJob(output)

    def events(self, transport: StringTransport) -> list[dict[str, Any]]:
        return [json.loads(line) for line in transport.value().splitlines()]

    def test_slowReaderBoundsWhatIsRead(self) -> None:
        """With a reader that takes nothing, at most one chunk is read and written; each
        resume reads one more; every byte arrives in order with its offset."""
        data = bytes(range(32, 127)) * 100_000  # 9.5 MB of ASCII
        job = self.makeJob(data)
        transport = PausingTransport()
        stream = AttachStream(job, job, 0, 0, "text")  # type: ignore[arg-type]
        stream.makeConnection(transport)
        self.assertTrue(stream.paused)
        self.assertLessEqual(len(transport.value()), 2 * CHUNK)
        received = b""
        while stream.paused:
            for event in self.events(transport):
                self.assertEqual(event["offset"], len(received))
                received += event["data"].encode()
            transport.clear()
            stream.resumeProducing()
            self.assertLessEqual(len(transport.value()), 2 * CHUNK)
        for event in self.events(transport):
            received += event["data"].encode()
        self.assertEqual(received, data)
        job.machine.current = "exited"
        transport.clear()
        stream.pump()
        self.assertEqual(
            self.events(transport), [{"event": "exit", "exit_code": 0, "signal": None}]
        )
        self.assertTrue(transport.disconnecting)

    def test_eventsAreJsonDumpsBytes(self) -> None:
        """Whether a chunk is plain ASCII (spliced in) or not (decoded): every event line is
        byte for byte what json.dumps writes, and the texts put together are the output's."""
        data = (
            b"a" * (CHUNK - 1)
            + "\u00e9".encode()  # cut in two by the end of the first chunk
            + b'quote " backslash \\ tab \t cr \r lf \n' * 5000
            + b"\x1b[31mred\x1b[0m \x7f\n" * 20000
            + b"plain line\n" * 30000
        )
        job = self.makeJob(data)
        transport = StringTransport()
        stream = AttachStream(job, job, 0, 0, "text")  # type: ignore[arg-type]
        stream.makeConnection(transport)
        job.machine.current = "exited"
        stream.pump()
        lines = transport.value().splitlines()
        text = ""
        for line in lines:
            event = json.loads(line)
            self.assertEqual(line, json.dumps(event, ensure_ascii=False).encode())
            if event["event"] == "output":
                self.assertEqual(event["offset"], len(text.encode()))
                text += event["data"]
        self.assertEqual(text, data.decode())
        self.assertEqual(json.loads(lines[-1])["event"], "exit")

    def test_characterNeverSplit(self) -> None:
        """A character cut by the end of what was written waits for its other bytes; an
        incomplete one at the very end becomes U+FFFD."""
        job = self.makeJob("café".encode()[:-1])
        transport = StringTransport()
        stream = AttachStream(job, job, 0, 0, "text")  # type: ignore[arg-type]
        stream.makeConnection(transport)
        self.assertEqual(
            self.events(transport),
            [{"event": "output", "stream": "stdout", "offset": 0, "data": "caf"}],
        )
        job.machine.current = "exited"
        transport.clear()
        stream.pump()
        events = self.events(transport)
        self.assertEqual(
            events[0], {"event": "output", "stream": "stdout", "offset": 3, "data": "\ufffd"}
        )
        self.assertEqual(events[-1]["event"], "exit")

    def test_gap(self) -> None:
        """A reader behind what is kept gets a gap event, then output from the first kept byte."""
        job = self.makeJob(b"x" * (1 << 20), limit=256 * 1024)
        job.output.settled()
        start = job.output.streams["stdout"].start
        self.assertGreater(start, 0)
        transport = StringTransport()
        stream = AttachStream(job, job, 0, 0, "base64")  # type: ignore[arg-type]
        stream.makeConnection(transport)
        events = self.events(transport)
        self.assertEqual(
            events[0], {"event": "gap", "stream": "stdout", "offset": 0, "resumed_at": start}
        )
        self.assertEqual(events[1]["offset"], start)

"""The wire under abuse: deadlines, the connection cap, the memory budget, odd input, failures.

In memory (``StringTransport`` and a ``Clock``) for the protocol's rules, over real sockets for
the whole path (the connection cap, a client that never reads its answer).
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.errors import ActionError
from pyro_reactor.wire import spool as spoolModule
from pyro_reactor.wire.budget import MemoryBudget, ParseCost
from pyro_reactor.wire.dispatch import Action, Dispatcher, HeldAnswer, StreamedAnswer
from pyro_reactor.wire.protocol import RequestFactory, RequestProtocol, WireLimits
from pyro_reactor.wire.request import Request, parseRequestLine
from pyro_reactor.wire.sender import (
    CHUNK,
    AnswerSender,
    BoundedText,
    LinePieces,
    boundEncodedText,
    encodeAnswer,
)
from pyro_reactor.wire.spool import emptySpool
from tests.helpers import reactor, startAgent
from tests.test_protocol import drain


def parseCost(line: bytes) -> int:
    """The parse cost of a whole line counted at once."""
    cost = ParseCost()
    cost.add(line)
    return cost.bytes


class Harness:
    """A dispatcher of a few test actions and protocols built on it, all in memory."""

    def __init__(self, case: SynchronousTestCase, **limits: Any) -> None:
        self.spool = Path(case.mktemp())
        self.spool.mkdir()
        self.clock = Clock()
        self.cancelled: list[str] = []
        self.pending: list[Deferred[Any]] = []
        self.budget = MemoryBudget(limits.pop("budget", 256 * 1024 * 1024))
        self.limits = WireLimits(**limits)
        self.dispatcher = Dispatcher(spoolDirectory=self.spool)
        self.dispatcher.register(
            [
                Action("ping", lambda r: {"pong": True}),
                Action("exec", lambda r: {"ran": True}),
                Action("echo", lambda r: {"echo": r.fields}),
                Action("upload", lambda r: {"got": r.upload is not None}, upload=True),
                Action("unencodable", lambda r: {"value": object()}),
                Action("big", lambda r: {"text": "y" * 300_000}),
                Action("wait", self.wait, cancellable=True),
                Action("slowExport", self.slowExport),
                Action("text", lambda r: {"s": r.string("s"), "n": r.integer("n", 0)}),
            ]
        )

    def wait(self, request: Request) -> Deferred[dict[str, Any]]:
        waiting: Deferred[dict[str, Any]] = Deferred(lambda d: self.cancelled.append("wait"))
        self.pending.append(waiting)
        return waiting

    def slowExport(self, request: Request) -> Deferred[StreamedAnswer]:
        waiting: Deferred[StreamedAnswer] = Deferred()
        self.pending.append(waiting)
        return waiting

    def connect(
        self, *, overflow: bool = False, maxRequestBytes: int = 16 * 1024 * 1024
    ) -> tuple[RequestProtocol, StringTransport]:
        protocol = RequestProtocol(
            self.dispatcher,
            self.clock,
            self.spool,
            maxRequestBytes,
            10.0,
            limits=self.limits,
            budget=self.budget,
            overflow=overflow,
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def answerOf(transport: StringTransport) -> dict[str, Any]:
    line, newline, _ = transport.value().partition(b"\n")
    assert newline, f"no answer line in {transport.value()[:200]!r}"
    answer = json.loads(line)
    assert isinstance(answer, dict)
    return answer


class AnswerChainTests(SynchronousTestCase):
    """Every answer chain ends in an answer and a closed connection, whatever fails."""

    def test_unencodableAnswer(self) -> None:
        """An answer that cannot be encoded is answered with an error, and the connection
        closes (before: "Unhandled error in Deferred" and a connection left open)."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "unencodable"}\n')
        self.assertIn("could not encode the answer", answerOf(transport)["error"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_failingEncoder(self) -> None:
        """A failure of the worker thread that encodes a large answer is answered too."""
        harness = Harness(self)
        protocol = RequestProtocol(
            harness.dispatcher,
            harness.clock,
            harness.spool,
            1000,
            10.0,
            encodeInThread=lambda function, answer: Deferred.fromCoroutine(_raise()),
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b'{"action": "big"}\n')
        self.assertIn("could not encode the answer", answerOf(transport)["error"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(MemoryError)), 1)

    def test_clientGoneCancelsTheWait(self) -> None:
        """When the client leaves, a cancellable handler is cancelled (its timers go), and
        the cancellation is logged as such, not as a crash."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "wait"}\n')
        protocol.connectionLost()
        self.assertEqual(harness.cancelled, ["wait"])
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])
        self.assertEqual(transport.value(), b"")

    def test_lateExportIsRemoved(self) -> None:
        """An export whose client left before it was ready is removed when it comes."""
        harness = Harness(self)
        protocol, _transport = harness.connect()
        protocol.dataReceived(b'{"action": "slowExport"}\n')
        protocol.connectionLost()
        path = harness.spool / "export.tar"
        path.write_bytes(b"x")
        harness.pending[0].callback(StreamedAnswer({"archive_size": 1}, path))
        self.assertFalse(path.exists())


async def _raise() -> bytes:
    raise MemoryError("no room")


class DeadlineTests(SynchronousTestCase):
    """The line within the request timeout, the body at the minimum rate, no per-chunk reset."""

    def test_lineDeadlineIsNotReset(self) -> None:
        """A line trickling a byte at a time is cut at the request timeout from connection."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        for _ in range(4):
            protocol.dataReceived(b" ")
            harness.clock.advance(2.4)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_tricklingUploadIsCut(self) -> None:
        """An upload body sending a byte every 2 s is cut once it falls behind the minimum
        rate, however many chunks arrived (before: the timeout restarted on each chunk);
        its spool file is removed."""
        harness = Harness(self, minUploadRate=100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "upload", "archive_size": 100000}\n')
        elapsed = 0.0
        while not transport.disconnecting and elapsed < 100:
            protocol.dataReceived(b"x")
            harness.clock.advance(2)
            elapsed += 2
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(elapsed, 12)
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost()
        self.assertEqual(list(harness.spool.iterdir()), [])

    def test_uploadAtTheRateCompletes(self) -> None:
        """A body arriving at the minimum rate completes, however long it takes in all."""
        harness = Harness(self, minUploadRate=100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "upload", "archive_size": 6000}\n')
        for _ in range(60):
            harness.clock.advance(1)
            protocol.dataReceived(b"x" * 100)
        self.assertEqual(answerOf(transport), {"got": True})


class ConnectionCapTests(SynchronousTestCase):
    """Beyond the cap, a connection has one second, and only a ping is answered."""

    def test_overflowPing(self) -> None:
        """A ping on an overflow connection is answered."""
        harness = Harness(self)
        protocol, transport = harness.connect(overflow=True)
        protocol.dataReceived(b'{"action": "ping"}\n')
        self.assertEqual(answerOf(transport), {"pong": True})

    def test_overflowOther(self) -> None:
        """Anything but a ping on an overflow connection is refused and closed."""
        harness = Harness(self)
        protocol, transport = harness.connect(overflow=True)
        protocol.dataReceived(b'{"command": "true"}\n')
        self.assertEqual(answerOf(transport), {"error": "too many connections"})
        self.assertTrue(transport.disconnecting)

    def test_overflowLineIsShort(self) -> None:
        """A connection beyond the cap cannot make the agent buffer a long line."""
        harness = Harness(self)
        protocol, transport = harness.connect(overflow=True)
        protocol.dataReceived(b'{"action": "ping", "x": "' + b"a" * 5000)
        self.assertIn("exceeds the maximum of 4096 bytes", answerOf(transport)["error"])

    def test_overflowHasOneSecond(self) -> None:
        """An overflow connection that sends nothing is closed after a second."""
        harness = Harness(self)
        _protocol, transport = harness.connect(overflow=True)
        harness.clock.advance(1.01)
        self.assertTrue(transport.disconnecting)

    def test_factoryCounts(self) -> None:
        """Connections past the cap are overflow ones, a closed connection frees its place,
        and a protocol built but never connected takes none."""
        harness = Harness(self)
        factory = RequestFactory(
            harness.dispatcher,
            harness.clock,
            harness.spool,
            limits=WireLimits(maxConnections=2),
        )
        factory.buildProtocol(None)  # built but never connected: not counted
        protocols = [factory.buildProtocol(None) for _ in range(3)]
        for protocol in protocols:
            protocol.makeConnection(StringTransport())
        self.assertEqual([p.overflow for p in protocols], [False, False, True])
        protocols[0].connectionLost()
        protocols[2].connectionLost()
        self.assertEqual((factory.connections, factory.overflowing), (1, 0))
        again = factory.buildProtocol(None)
        again.makeConnection(StringTransport())
        self.assertFalse(again.overflow)


class BudgetTests(SynchronousTestCase):
    """Lines in flight, parses and answers draw from one memory budget."""

    def test_linesInFlight(self) -> None:
        """Unfinished lines together cannot hold more than the budget: the one that would
        exceed it is refused with a clear error, and a closed connection gives its share back."""
        harness = Harness(self, budget=5 * 1024 * 1024)
        first, firstTransport = harness.connect()
        first.dataReceived(b'{"x": "' + b"a" * (2 * 1024 * 1024))
        self.assertEqual(firstTransport.value(), b"")
        second, secondTransport = harness.connect()
        second.dataReceived(b'{"x": "' + b"a" * (3 * 1024 * 1024))
        self.assertIn("memory budget", answerOf(secondTransport)["error"])
        second.connectionLost()
        first.connectionLost()
        self.assertEqual(harness.budget.used, 0)

    def test_costlyParseRefused(self) -> None:
        """A line of a million tiny objects is refused before it is parsed (before: 487 MB
        peak for 16 MiB of them)."""
        harness = Harness(self, budget=64 * 1024 * 1024)
        protocol, transport = harness.connect()
        line = b'{"x": [' + b"{}," * 400_000 + b"{}]}\n"
        protocol.dataReceived(line)
        self.assertEqual(transport.value(), b"")  # big lines are parsed on a later turn
        harness.clock.advance(0)
        self.assertIn("memory budget", answerOf(transport)["error"])
        self.assertEqual(harness.budget.used, 0)

    def test_costlyParseRefusedInPieces(self) -> None:
        """A line of tiny objects that arrives in small pieces (its cost counted as they
        come, not all at once at the end) is refused just the same, and gives its hold
        back."""
        harness = Harness(self, budget=64 * 1024 * 1024)
        protocol, transport = harness.connect()
        line = b'{"x": [' + b"{}," * 400_000 + b"{}]}\n"
        for start in range(0, len(line), 4096):
            protocol.dataReceived(line[start : start + 4096])
        harness.clock.advance(0)
        self.assertIn("memory budget", answerOf(transport)["error"])
        self.assertEqual(harness.budget.used, 0)

    def test_parseCostCountedInPieces(self) -> None:
        """The cost counted piece by piece, from any split, is the whole line's cost."""
        line = b'{"a": [1, 2, {"b": "c,d:[e{"}], "f": "' + b"x" * 70_000 + b'"}'
        whole = parseCost(line)
        for size in (1, 7, 4096, 65_536):
            cost = ParseCost()
            growing = bytearray()
            for start in range(0, len(line), size):
                growing += line[start : start + size]
                cost.add(growing, cost.size)
            self.assertEqual(cost.bytes, whole)

    def test_bigLineInPiecesParsed(self) -> None:
        """A big line that arrives in pieces, its last piece with the newline, is parsed
        and answered once, whole."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        line = b'{"action": "upload", "archive_size": 3, "pad": "' + b"p" * 200_000 + b'"}\n'
        for start in range(0, len(line), 50_000):
            protocol.dataReceived(line[start : start + 50_000])
        protocol.dataReceived(b"xyz")
        harness.clock.advance(0)
        self.assertEqual(answerOf(transport), {"got": True})
        self.assertEqual(harness.budget.used, 0)

    def test_bigLineThenBody(self) -> None:
        """A big upload line's body bytes that come with it or during its parse are kept,
        in order, for the body."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        line = b'{"action": "upload", "archive_size": 6, "pad": "' + b"p" * 100_000 + b'"}\n'
        protocol.dataReceived(line + b"abc")
        protocol.dataReceived(b"def")
        harness.clock.advance(0)
        self.assertEqual(answerOf(transport), {"got": True})

    def test_parseCostOfText(self) -> None:
        """Text costs about its size: a 4 MiB string is not refused by a 64 MiB budget."""
        self.assertLess(parseCost(b'{"text": "' + b"a" * 4 * 1024 * 1024 + b'"}'), 16 * 1024**2)

    def test_answerHeldUntilWritten(self) -> None:
        """A large answer holds its size from the budget until it is written, then gives
        it back; one larger than the budget is answered with an error instead."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "big"}\n')
        self.assertGreater(harness.budget.used, 300_000)
        drain(transport)
        self.assertEqual(answerOf(transport), {"text": "y" * 300_000})
        self.assertEqual(harness.budget.used, 0)
        small = Harness(self, budget=100_000)
        protocol, transport = small.connect()
        protocol.dataReceived(b'{"action": "big"}\n')
        self.assertIn("memory budget", answerOf(transport)["error"])

    def test_unreadAnswerDropped(self) -> None:
        """A client that accepts no bytes of its answer for the answer timeout is dropped and
        the answer's memory given back."""
        harness = Harness(self, answerTimeout=5.0)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "big"}\n')
        self.assertGreater(harness.budget.used, 0)
        harness.clock.advance(6)
        self.assertTrue(transport.disconnected)
        self.assertEqual(harness.budget.used, 0)


class UnreadExportTests(SynchronousTestCase):
    """An export the client does not read is dropped at the answer timeout, file and all."""

    def test_unreadExportFreed(self) -> None:
        """The export's spool file is removed when the client accepted nothing for the
        answer timeout (before: 4 unread 50 MB exports held 210 MB of spool for 20 s past a
        5 s request timeout)."""
        harness = Harness(self, answerTimeout=5.0)
        path = harness.spool / "export.tar"
        path.write_bytes(b"t" * 1_000_000)
        harness.dispatcher.register(
            [Action("export", lambda r: StreamedAnswer({"archive_size": 1_000_000}, path))]
        )
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "export"}\n')
        producer = transport.producer
        assert producer is not None
        producer.resumeProducing()  # one chunk goes out, then the client stalls
        harness.clock.advance(4)
        self.assertTrue(path.exists())
        harness.clock.advance(2)
        self.assertTrue(transport.disconnected)
        self.assertFalse(path.exists())


class OddInputTests(SynchronousTestCase):
    """Odd input gets a clear error at the request layer, before anything starts."""

    def test_tooManyDigits(self) -> None:
        """A number of more than 4300 digits (before: no answer, "Unhandled Error")."""
        harness = Harness(self)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"n": ' + b"9" * 5000 + b"}\n")
        self.assertIn("more than 4300 digits", answerOf(transport)["error"])

    def test_hugeInteger(self) -> None:
        """``timeout_seconds: 10**400`` is out of range, not "no timeout"."""
        request = parseRequestLine(b'{"timeout_seconds": 1' + b"0" * 400 + b"}")
        error = self.assertRaises(ActionError, request.integer, "timeout_seconds", 30)
        self.assertIn("out of range", str(error))
        huge = Request({"timeout_seconds": 1e300})
        self.assertRaises(ActionError, huge.integer, "timeout_seconds", 30)
        bounded = Request({"n": 5})
        self.assertRaises(ActionError, bounded.integer, "n", 0, maximum=4)
        self.assertEqual(bounded.integer("n", 0, minimum=5, maximum=5), 5)

    def test_loneSurrogates(self) -> None:
        """A lone surrogate in a text field, a list item or an env name is a clear error naming
        the field, never the value."""
        for request, call in [
            (b'{"action": "text", "s": "a\\ud800b"}', None),
            (b'{"redact_values": ["\\udfff"]}', "stringList"),
            (b'{"env": {"\\ud800": "x"}}', "environment"),
        ]:
            parsed = parseRequestLine(request)
            if call is None:
                harness = Harness(self)
                protocol, transport = harness.connect()
                protocol.dataReceived(request + b"\n")
                self.assertEqual(answerOf(transport)["error"], "s must be valid Unicode text")
            elif call == "stringList":
                self.assertRaises(ActionError, parsed.stringList, "redact_values")
            else:
                self.assertRaises(ActionError, parsed.environment, "exec")

    def test_validTextUnchanged(self) -> None:
        """Text with emoji and escapes passes unchanged."""
        text = 'héllo \U0001f600 "q" \\ \n'
        self.assertEqual(Request({"s": text}).string("s"), text)


class SpoolTests(SynchronousTestCase):
    """The spool starts empty, and descriptor exhaustion is answered."""

    def test_emptiedAtStart(self) -> None:
        """Whatever an earlier run left in the spool is removed at start-up."""
        spool = Path(self.mktemp())
        (spool / "stage").mkdir(parents=True)
        (spool / "upload-1.tar").write_bytes(b"secret")
        (spool / "stage" / "f").write_bytes(b"x")
        self.assertEqual(emptySpool(spool), 2)
        self.assertEqual(list(spool.iterdir()), [])

    def test_descriptorsExhausted(self) -> None:
        """EMFILE while creating a spool file answers an error (before: "Unhandled Error"
        and a connection dropped without an answer)."""

        def exhausted(**kwargs: Any) -> tuple[int, str]:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(tempfile, "mkstemp", exhausted)
        harness = Harness(self)
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\n')
        self.assertIn("out of file descriptors", answerOf(transport)["error"])
        self.assertTrue(transport.disconnecting)


class QueuedWorker:
    """A worker-thread stand-in: queues each call, runs them (in order) when told to."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.jobs.append((done, function, args))
        return done

    def runNext(self) -> None:
        done, function, args = self.jobs.pop(0)
        done.callback(function(*args))

    def runAll(self) -> None:
        while self.jobs:
            self.runNext()


class ThreadedSpoolTests(SynchronousTestCase):
    """Once a write on the reactor stalls, upload bodies are written off the reactor, in
    order, with backpressure."""

    def setUp(self) -> None:
        # Every write counts as a stall: the first chunk is written on the reactor, the rest
        # by the worker.
        self.patch(spoolModule, "STALL_SECONDS", -1.0)

    def test_writesOffTheReactorInOrder(self) -> None:
        """Chunks are written by the worker in order; the connection pauses above the high
        mark, resumes when the writes catch up, and the handler runs only once every byte is
        on disk."""
        harness = Harness(self)
        worker = QueuedWorker()

        size = 8 * 1024 * 1024
        protocol = RequestProtocol(
            harness.dispatcher, harness.clock, harness.spool, 1000, 10.0, writeInThread=worker
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b'{"action": "upload", "archive_size": %d}\n' % size)
        body = bytes(range(256)) * (size // 256)
        for offset in range(0, size, 1024 * 1024):
            protocol.dataReceived(body[offset : offset + 1024 * 1024])
            if offset == 6 * 1024 * 1024:
                self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.value(), b"")
        worker.runAll()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(answerOf(transport), {"got": True})
        self.assertEqual(list(harness.spool.iterdir()), [])

    def test_backlogHeldFromTheBudget(self) -> None:
        """Bytes waiting for the disk are held from the memory budget; when the budget cannot
        hold more, the upload is paused rather than refused, and it completes (with every
        byte held given back) once the writes catch up."""
        harness = Harness(self, budget=5 * 512 * 1024)
        worker = QueuedWorker()

        size = 4 * 1024 * 1024
        protocol = RequestProtocol(
            harness.dispatcher,
            harness.clock,
            harness.spool,
            1000,
            10.0,
            writeInThread=worker,
            budget=harness.budget,
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b'{"action": "upload", "archive_size": %d}\n' % size)
        body = bytes(range(256)) * (size // 256)
        chunk = 512 * 1024
        protocol.dataReceived(body[:chunk])  # written on the reactor: it "stalls"
        protocol.dataReceived(body[chunk : 2 * chunk])
        self.assertEqual(harness.budget.used, chunk)
        self.assertEqual(transport.producerState, "producing")
        for offset in range(2 * chunk, size, chunk):
            protocol.dataReceived(body[offset : offset + chunk])
            if transport.producerState == "paused":
                break
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(harness.budget.used, harness.budget.total)
        self.assertEqual(transport.value(), b"")
        while transport.producerState == "paused":
            worker.runNext()
        # Resumed: the client sends the rest, which the worker writes.
        protocol.dataReceived(body[offset + chunk :])
        worker.runAll()
        self.assertEqual(answerOf(transport), {"got": True})
        self.assertEqual(harness.budget.used, 0)

    def test_quickWritesStayOnTheReactor(self) -> None:
        """While writes are quick, the worker is never asked."""
        self.patch(spoolModule, "STALL_SECONDS", 60.0)
        harness = Harness(self)
        protocol = RequestProtocol(
            harness.dispatcher,
            harness.clock,
            harness.spool,
            1000,
            10.0,
            writeInThread=lambda *args: self.fail("a worker was asked"),
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\nabcde')
        protocol.dataReceived(b"fghij")
        self.assertEqual(answerOf(transport), {"got": True})

    def test_clientGoneWhileWriting(self) -> None:
        """A client that leaves while its body is being written leaves no file behind, and
        the descriptor is closed only after the write in flight."""
        harness = Harness(self)
        worker = QueuedWorker()

        protocol = RequestProtocol(
            harness.dispatcher, harness.clock, harness.spool, 1000, 10.0, writeInThread=worker
        )
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\nabc')
        protocol.dataReceived(b"def")
        protocol.connectionLost()
        self.assertEqual(list(harness.spool.iterdir()), [])
        worker.runNext()
        self.assertEqual(list(harness.spool.iterdir()), [])


class EncodingTests(SynchronousTestCase):
    """The answer encoder is byte for byte ``json.dumps``; output bounds hold when encoded."""

    def test_sameBytesAsJsonDumps(self) -> None:
        """Spliced or not, every answer encodes exactly as ``json.dumps`` does, and gathered
        output is bounded by that same size."""
        rng = random.Random(7)
        alphabet = 'ab+/=0 \n\t"\\\x00\x7fé\U0001f600'
        for size in (0, 10, 5000, 70_000):
            # Plain ASCII; with DEL (\u007f in an answer) as its only escape; ASCII with
            # escapes; any text.
            for chars in (alphabet[:4], alphabet[:4] + "\x7f", alphabet[:-2], alphabet):
                text = "".join(rng.choice(chars) for _ in range(size))
                answer = {"path": "/w/x", "n": 3, "content": text, "ok": True, "more": text}
                line = encodeAnswer(answer)
                self.assertEqual(bytes(line), (json.dumps(answer) + "\n").encode())
                self.assertEqual(len(line), len(bytes(line)))
                # Output gathered for an answer counts the same JSON size.
                gathered = BoundedText(1 << 30)
                gathered.feed(text)
                self.assertEqual(gathered.size, len(json.dumps(text)) - 2)

    def test_piecesSentWhole(self) -> None:
        """A line kept in pieces (tiny and large ones) goes out byte for byte, in chunks of
        at most L{CHUNK} gathered across pieces, as the transport asks for them."""
        line = LinePieces()
        expected = bytearray()
        for index in range(40):
            piece = bytes([65 + index % 26]) * (1 if index % 3 else 100_000)
            line += piece
            expected += piece
        transport = StringTransport()
        sender = AnswerSender(transport, Clock(), 10.0, line)
        sent = sender.send()
        writes = 0
        while not sent.called:
            before = len(transport.value())
            sender.resumeProducing()
            self.assertLessEqual(len(transport.value()) - before, CHUNK)
            writes += 1
        self.assertEqual(transport.value(), bytes(expected))
        self.assertEqual(self.successResultOf(sent), len(expected))
        self.assertLessEqual(writes, len(expected) // CHUNK + 2)

    def test_boundEncodedText(self) -> None:
        """A bounded text's JSON is within the limit, never cuts an escape, and is a prefix."""
        for text in [
            "\ufffd" * 100_000,
            "a\\" * 50_000,
            "\U0001f600" * 30_000,
            "x" * 200_000,
            '\x01é"' * 40_000,
        ]:
            for limit in (0, 1, 5, 6, 7, 11, 12, 13, 1000, 99_999, 100_000):
                kept, cut = boundEncodedText(text, limit)
                self.assertTrue(text.startswith(kept))
                self.assertLessEqual(len(json.dumps(kept)) - 2, limit)
                self.assertEqual(cut, kept != text)
                # Nearly as much as fits: one more character would not.
                if cut:
                    more = text[: len(kept) + 1]
                    self.assertGreater(len(json.dumps(more)) - 2, limit)


class HeldAnswerTests(SynchronousTestCase):
    """An answer whose text is already held (exec output) keeps its hold until encoded."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.budget = self.harness.budget
        self.textHold = self.budget.reserve(0, "command output")

        def held(request: Request) -> HeldAnswer:
            size = request.integer("size", 10)
            self.textHold.grow(size)
            return HeldAnswer({"stdout": "o" * size}, self.textHold.release)

        self.harness.dispatcher.register([Action("held", held)])
        self.encodings: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def encodeLater(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.encodings.append((function, args, done))
        return done

    def test_smallHeldAnswer(self) -> None:
        """A small held answer is written as a plain one and its hold given back."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(b'{"action": "held", "size": 5}\n')
        self.assertEqual(answerOf(transport), {"stdout": "ooooo"})
        self.assertEqual(self.budget.used, 0)

    def test_textAndLineBothCountedWhileEncoding(self) -> None:
        """While a large held answer is encoded (in a thread), its text and its line are
        both counted; once encoded, only the line, until it is written."""
        protocol, transport = self.harness.connect()
        protocol.encodeInThread = self.encodeLater
        protocol.dataReceived(b'{"action": "held", "size": 300000}\n')
        self.assertGreaterEqual(self.budget.used, 2 * 300_000)
        function, args, done = self.encodings.pop()
        done.callback(function(*args))
        self.assertEqual(self.textHold.size, 0)
        self.assertLess(self.budget.used, 2 * 300_000)
        self.assertGreater(self.budget.used, 300_000)
        drain(transport)
        self.assertEqual(answerOf(transport), {"stdout": "o" * 300_000})
        self.assertEqual(self.budget.used, 0)

    def test_failedEncodingReleases(self) -> None:
        """An encoding that fails still gives the text's hold back (and answers an error)."""
        protocol, transport = self.harness.connect()
        protocol.encodeInThread = self.encodeLater
        protocol.dataReceived(b'{"action": "held", "size": 300000}\n')
        _, _, done = self.encodings.pop()
        done.errback(ValueError("cannot"))
        self.assertEqual(self.budget.used, 0)
        self.assertIn("could not encode", answerOf(transport)["error"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_clientGoneReleases(self) -> None:
        """A held answer that comes after its client left gives its hold back."""
        waiting: Deferred[HeldAnswer] = Deferred()
        self.harness.dispatcher.register([Action("late", lambda r: waiting)])
        protocol, _ = self.harness.connect()
        protocol.dataReceived(b'{"action": "late"}\n')
        protocol.connectionLost()
        self.textHold.grow(1000)
        waiting.callback(HeldAnswer({"stdout": "x" * 1000}, self.textHold.release))
        self.assertEqual(self.budget.used, 0)

    def test_refusedLineReleases(self) -> None:
        """A held answer whose line does not fit the budget is answered with an error and
        its text's hold given back."""
        harness = Harness(self, budget=500_000)
        hold = harness.budget.reserve(0, "command output")

        def held(request: Request) -> HeldAnswer:
            hold.grow(300_000)
            return HeldAnswer({"stdout": "o" * 300_000}, hold.release)

        harness.dispatcher.register([Action("held", held)])
        protocol, transport = harness.connect()
        protocol.dataReceived(b'{"action": "held"}\n')
        self.assertIn("memory budget", answerOf(transport)["error"])
        self.assertEqual(harness.budget.used, 0)


class BoundedTextTests(SynchronousTestCase):
    """Command output gathered piece by piece stays within its limit once encoded."""

    def test_invalidUtf8Output(self) -> None:
        """16 MiB of 0xff decoded in pieces keeps 16 MiB of JSON text, not 96 MiB."""
        limit = 1024 * 1024
        bounded = BoundedText(limit)
        piece = b"\xff" * 65536
        for _ in range(64):
            bounded.feed(piece.decode("utf-8", "replace"))
        text = bounded.text()
        self.assertTrue(bounded.truncated)
        self.assertLessEqual(len(json.dumps(text)) - 2, limit)
        self.assertGreater(len(json.dumps(text)) - 2, limit - 6)

    def test_budgetTruncates(self) -> None:
        """Kept output is drawn from the memory budget; a full budget truncates it, and
        release gives it back."""
        budget = MemoryBudget(1000)
        bounded = BoundedText(10_000, budget.reserve(0, "command output"))
        for _ in range(30):
            bounded.feed("x" * 100)
        self.assertTrue(bounded.truncated)
        self.assertEqual(len(bounded.text()), 1000)
        self.assertEqual(budget.used, 1000)
        bounded.release()
        self.assertEqual(budget.used, 0)

    def test_takeHandsTheTextOver(self) -> None:
        """take() returns the text and keeps nothing of it (so it lives only as long as the
        answer carrying it)."""
        bounded = BoundedText(1000)
        bounded.feed("abc")
        bounded.feed("def")
        self.assertEqual(bounded.take(), "abcdef")
        self.assertEqual(bounded.text(), "")

    def test_plainOutputUnchanged(self) -> None:
        """Output within the limit is kept whole, piece after piece."""
        bounded = BoundedText(1000)
        for piece in ["hello\n", "wörld\t", '"q"']:
            bounded.feed(piece)
        self.assertEqual(bounded.text(), 'hello\nwörld\t"q"')
        self.assertFalse(bounded.truncated)
        self.assertEqual(bounded.size, len(json.dumps(bounded.text())) - 2)


class OverTheWireTests(TestCase):
    """The connection cap and the answer timeout over real sockets."""

    async def test_pingGetsThroughAtTheCap(self) -> None:
        """With every place taken by idle connections, a ping is still answered, and any
        other request gets "too many connections"."""
        agent = await startAgent(self, maxConnections=3)
        idle = []
        for _ in range(3):
            connection = socket.create_connection(("127.0.0.1", agent.port))
            connection.sendall(b'{"action": ')
            idle.append(connection)
            self.addCleanup(connection.close)
        await _until(lambda: _factoryOf(agent).connections == 3)
        pong = await agent.call({"action": "ping"})
        self.assertNotIn("error", pong)
        self.assertIn("features", pong)
        answer = await agent.call({"command": "true"})
        self.assertEqual(answer, {"error": "too many connections"})

    async def test_execOutputGivenBack(self) -> None:
        """An exec's large output is held from the budget until its answer is written, then
        all of it is given back."""
        agent = await startAgent(self)
        request = {"command": "head -c 3000000 /dev/zero | tr '\\0' a", "timeout_seconds": 60}
        answer = await agent.call(request)
        self.assertEqual(len(answer["stdout"]), 3_000_000)
        budget = agent.context.budget
        self.assertGreater(budget.peak, 2 * 3_000_000)
        await _until(lambda: budget.used == 0)

    async def test_unreadAnswerDropped(self) -> None:
        """A client that never reads a large answer is dropped after the answer timeout and
        the answer's memory returns to the budget."""
        agent = await startAgent(self, answerTimeout=0.5)
        connection = socket.socket()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect(("127.0.0.1", agent.port))
        self.addCleanup(connection.close)
        # 12 MB of output: more than any socket buffer takes.
        request = {"command": "head -c 12000000 /dev/zero | tr '\\0' a", "timeout_seconds": 60}
        connection.sendall(json.dumps(request).encode() + b"\n")
        budget = agent.context.budget
        await _until(lambda: budget.used > 0, timeout=60)
        await _until(lambda: budget.used == 0, timeout=30)
        connection.setblocking(False)
        received = 0
        with contextlib.suppress(BlockingIOError, ConnectionResetError):
            while chunk := connection.recv(1 << 20):
                received += len(chunk)
        self.assertLess(received, 12_000_000)


def _factoryOf(agent: Any) -> RequestFactory:
    for port in reactor.getReaders():
        factory = getattr(port, "factory", None)
        if isinstance(factory, RequestFactory) and factory.budget is agent.context.budget:
            return factory
    raise AssertionError("no listening port of this agent")


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)

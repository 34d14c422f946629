"""The framing protocol in memory: lines, limits, timeouts, upload spooling, streamed answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Action, Dispatcher, StreamedAnswer
from pyro_reactor.wire.protocol import RequestProtocol
from pyro_reactor.wire.request import Request


def drain(transport: StringTransport) -> None:
    """Let a producer registered on an in-memory transport write all it has."""
    producer = transport.producer
    while producer is not None:
        producer.resumeProducing()
        producer = transport.producer


class Recorder:
    """Handlers that record what they were given."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.uploads: list[bytes] = []
        self.pending: Deferred[dict[str, Any]] | None = None

    def echo(self, request: Request) -> dict[str, Any]:
        self.requests.append(request)
        return {"echo": request.fields}

    def upload(self, request: Request) -> dict[str, Any]:
        assert request.upload is not None
        self.uploads.append(request.upload.read_bytes())
        return {"received": request.upload.stat().st_size}

    def slow(self, request: Request) -> Deferred[dict[str, Any]]:
        self.pending = Deferred()
        return self.pending

    def fails(self, request: Request) -> dict[str, Any]:
        raise ActionError("it went wrong")

    def crashes(self, request: Request) -> dict[str, Any]:
        raise ValueError("unexpected")


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = Path(self.mktemp())
        self.spool.mkdir()
        self.recorder = Recorder()
        self.clock = Clock()
        self.dispatcher = Dispatcher(spoolDirectory=self.spool, maxUploadBytes=1000)
        self.dispatcher.register(
            [
                Action("exec", self.recorder.echo),
                Action("echo", self.recorder.echo),
                Action("upload", self.recorder.upload, upload=True),
                Action("slow", self.recorder.slow),
                Action("fails", self.recorder.fails),
                Action("crashes", self.recorder.crashes),
                Action("export", self.export),
            ]
        )
        self.transport = StringTransport()
        self.protocol = RequestProtocol(
            self.dispatcher, self.clock, self.spool, maxRequestBytes=100, timeout=60
        )
        self.protocol.makeConnection(self.transport)

    def export(self, request: Request) -> StreamedAnswer:
        path = self.spool / "export.tar"
        path.write_bytes(b"tar-bytes" * 1000)
        return StreamedAnswer({"archive_size": 9000}, path)

    def answer(self) -> dict[str, Any]:
        line, newline, _ = self.transport.value().partition(b"\n")
        self.assertEqual(newline, b"\n", "no complete answer line was written")
        result = json.loads(line)
        assert isinstance(result, dict)
        return result

    def test_requestInPieces(self) -> None:
        """A request line split across reads is answered once the newline arrives."""
        self.protocol.dataReceived(b'{"action": "echo",')
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(b' "n": 1}\n')
        self.assertEqual(self.answer(), {"echo": {"action": "echo", "n": 1}})
        self.assertTrue(self.transport.disconnecting)

    def test_missingActionIsExec(self) -> None:
        """As in the reference, a request without an action is an exec request."""
        self.protocol.dataReceived(b'{"command": "true"}\n')
        self.assertEqual(self.answer(), {"echo": {"command": "true"}})

    def test_unknownActionRunsNothing(self) -> None:
        """An unknown action is answered with an error naming it, and no handler is called."""
        self.protocol.dataReceived(b'{"action": "rm-rf", "command": "true"}\n')
        self.assertEqual(self.answer(), {"error": "unknown action: 'rm-rf'"})
        self.assertEqual(self.recorder.requests, [])

    def test_badJson(self) -> None:
        """A request line that is not valid JSON is answered with an error and the connection is
        closed."""
        self.protocol.dataReceived(b"{nope\n")
        self.assertIn("not valid JSON", self.answer()["error"])
        self.assertTrue(self.transport.disconnecting)

    def test_notAnObject(self) -> None:
        """A request that is valid JSON but not an object is refused with an error."""
        self.protocol.dataReceived(b"[1, 2]\n")
        self.assertEqual(self.answer(), {"error": "request must be a JSON object"})

    def test_wrongFieldType(self) -> None:
        """A field of the wrong type is a clear error before any work is done."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": [1]}\n')
        self.assertEqual(self.answer(), {"error": "archive_size must be an integer"})

    def test_overlongLineRefusedWithoutBuffering(self) -> None:
        """A line over the limit is answered with an error and the connection closed."""
        self.protocol.dataReceived(b'{"action": "echo", "x": "' + b"a" * 60)
        self.protocol.dataReceived(b"a" * 60)
        self.assertIn("exceeds the maximum of 100 bytes", self.answer()["error"])
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(len(self.protocol._buffer), 100)
        self.protocol.dataReceived(b'"}\n')
        self.assertEqual(self.recorder.requests, [])

    def test_overlongLineWithNewline(self) -> None:
        """A request line longer than the limit is refused with an error even when its newline
        arrives."""
        self.protocol.dataReceived(b'{"x": "' + b"a" * 200 + b'"}\n')
        self.assertIn("exceeds the maximum", self.answer()["error"])

    def test_idleTimeoutCloses(self) -> None:
        """A connection that sends only part of a request is closed without an answer once the
        idle timeout passes, and not before."""
        self.protocol.dataReceived(b'{"action": ')
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_noTimeoutWhileWorking(self) -> None:
        """Once a request is complete, a slow handler is not cut off by the idle timeout."""
        self.protocol.dataReceived(b'{"action": "slow"}\n')
        self.clock.advance(600)
        self.assertFalse(self.transport.disconnecting)
        assert self.recorder.pending is not None
        self.recorder.pending.callback({"done": True})
        self.assertEqual(self.answer(), {"done": True})

    def test_handlerError(self) -> None:
        """An error raised by an action's handler reaches the host as an `error` answer."""
        self.protocol.dataReceived(b'{"action": "fails"}\n')
        self.assertEqual(self.answer(), {"error": "it went wrong"})

    def test_handlerCrash(self) -> None:
        """An unexpected exception still answers JSON (and is logged with its traceback)."""
        self.protocol.dataReceived(b'{"action": "crashes"}\n')
        self.assertEqual(self.answer(), {"error": "unexpected"})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_uploadSpooledToDiskAndRemoved(self) -> None:
        """Body bytes are spooled as they arrive; the spool is gone after the answer."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\nabc')
        self.assertEqual(self.recorder.uploads, [])
        self.protocol.dataReceived(b"defghij")
        self.assertEqual(self.recorder.uploads, [b"abcdefghij"])
        self.assertEqual(self.answer(), {"received": 10})
        self.assertEqual(list(self.spool.iterdir()), [])

    def test_emptyUpload(self) -> None:
        """An upload declaring an `archive_size` of zero is handled at once, without waiting for
        a body."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": 0}\n')
        self.assertEqual(self.answer(), {"received": 0})

    def test_uploadCutOff(self) -> None:
        """A body that ends early runs nothing and leaves no spool behind."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\nabc')
        self.assertEqual(len(list(self.spool.iterdir())), 1)
        self.protocol.connectionLost()
        self.assertEqual(self.recorder.uploads, [])
        self.assertEqual(list(self.spool.iterdir()), [])

    def test_uploadSizeRefusedBeforeBody(self) -> None:
        """An upload larger than the limit is refused from its declared size, before any of its
        body is spooled or handed on."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": 1001}\n')
        self.assertIn("exceeds the maximum of 1000 bytes", self.answer()["error"])
        self.protocol.dataReceived(b"x" * 1001)
        self.assertEqual(self.recorder.uploads, [])
        self.assertEqual(list(self.spool.iterdir()), [])

    def test_negativeUploadSize(self) -> None:
        """A negative `archive_size` is refused with an error."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": -1}\n')
        self.assertEqual(self.answer(), {"error": "archive_size must not be negative"})

    def test_streamedAnswer(self) -> None:
        """An export writes its header line, then the file's bytes, then removes the file."""
        self.protocol.dataReceived(b'{"action": "export"}\n')
        # StringTransport consumes what a producer offers only when asked.
        drain(self.transport)
        header, _, body = self.transport.value().partition(b"\n")
        self.assertEqual(json.loads(header), {"archive_size": 9000})
        self.assertEqual(body, b"tar-bytes" * 1000)
        self.assertFalse((self.spool / "export.tar").exists())
        self.assertTrue(self.transport.disconnecting)

    def logged(self) -> list[dict[str, Any]]:
        """The request events of the dispatcher logged from now on."""
        events: list[dict[str, Any]] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == "pyro_reactor.wire.dispatch":
                events.append(event)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def test_requestLoggedOnceAfterItsAnswer(self) -> None:
        """Each request is logged once, after its answer is out and the connection closed.

        Writing the log line costs about 0.1 ms with twistd's text observer: it must not
        delay the answer. The duration logged is still the time to the answer.
        """
        events = self.logged()
        self.protocol.dataReceived(b'{"action": "echo"}\n')
        self.assertEqual(self.answer(), {"echo": {"action": "echo"}})
        self.assertEqual(events, [])
        self.protocol.connectionLost()
        self.assertEqual([(e["action"], e["outcome"]) for e in events], [("echo", "ok")])
        self.assertIsInstance(events[0]["duration_ms"], float)

    def test_errorLoggedOnceAfterItsAnswer(self) -> None:
        """A failed request too is logged once, with its error, after the answer."""
        events = self.logged()
        self.protocol.dataReceived(b'{"action": "fails"}\n')
        self.assertEqual(self.answer(), {"error": "it went wrong"})
        self.assertEqual(events, [])
        self.protocol.connectionLost()
        self.assertEqual(
            [(e["action"], e["outcome"], e["error"]) for e in events],
            [("fails", "error", "it went wrong")],
        )

    def test_requestLoggedWhenClientLeftFirst(self) -> None:
        """A request whose client left before the answer is logged when the answer comes."""
        events = self.logged()
        self.protocol.dataReceived(b'{"action": "slow"}\n')
        self.protocol.connectionLost()
        self.assertEqual(events, [])
        assert self.recorder.pending is not None
        self.recorder.pending.callback({"done": True})
        self.assertEqual([(e["action"], e["outcome"]) for e in events], [("slow", "ok")])

    def test_answerAfterClientLeft(self) -> None:
        """A client that goes away before its answer does not break the agent."""
        self.protocol.dataReceived(b'{"action": "slow"}\n')
        self.protocol.connectionLost()
        assert self.recorder.pending is not None
        self.recorder.pending.callback({"done": True})
        self.assertEqual(self.transport.value(), b"")


class RequestFieldTests(SynchronousTestCase):
    def test_coercions(self) -> None:
        """Request fields are coerced where the meaning is clear: numeric strings and whole
        floats to integers, numbers to strings, and null to the default."""
        request = Request({"n": "30", "f": 2.0, "s": 5, "b": True, "none": None})
        self.assertEqual(request.integer("n", 0), 30)
        self.assertEqual(request.integer("f", 0), 2)
        self.assertEqual(request.string("s"), "5")
        self.assertEqual(request.boolean("b", False), True)
        self.assertEqual(request.string("none", "default"), "default")

    def test_wrongTypes(self) -> None:
        """A field of the wrong type is refused with an error naming the field and the type it
        must be."""
        request = Request({"n": "x", "s": [], "b": "yes", "m": [1]})
        for call, message in [
            (lambda: request.integer("n", 0), "n must be an integer"),
            (lambda: request.string("s"), "s must be a string"),
            (lambda: request.boolean("b", False), "b must be a boolean"),
            (lambda: request.mapping("m"), "m must be a JSON object"),
        ]:
            self.assertEqual(str(self.assertRaises(ActionError, call)), message)

    def test_environmentNames(self) -> None:
        """Env names follow the reference's rules and messages."""
        ok = Request({"env": {"A_1": "x", "B": 3}})
        self.assertEqual(ok.environment("exec"), {"A_1": "x", "B": "3"})
        bad = Request({"env": {"1A": "x"}})
        self.assertEqual(
            str(self.assertRaises(ActionError, bad.environment, "exec")), "secret name is invalid"
        )
        notObject = Request({"env": ["A"]})
        self.assertEqual(
            str(self.assertRaises(ActionError, notObject.environment, "shell")),
            "shell env must be a JSON object",
        )


class LargeAnswerTests(SynchronousTestCase):
    """Answers carrying a lot of text are encoded off the reactor thread."""

    def test_largeAnswerEncodedByTheEncoder(self) -> None:
        """A large answer is encoded off the reactor by the given encoder and sent once it is
        ready, while a small answer is encoded at once; both close the connection after
        sending."""
        spool = Path(self.mktemp())
        spool.mkdir()
        big = "x" * 100_000
        dispatcher = Dispatcher(spoolDirectory=spool)
        dispatcher.register(
            [Action("big", lambda r: {"stdout": big}), Action("small", lambda r: {"ok": 1})]
        )
        pending: list[Deferred[None]] = []
        calls: list[dict[str, Any]] = []

        def encoder(function: Any, answer: dict[str, Any]) -> Deferred[Any]:
            calls.append(answer)
            ready: Deferred[None] = Deferred()
            pending.append(ready)
            return ready.addCallback(lambda _: function(answer))

        for action, expected in [("big", {"stdout": big}), ("small", {"ok": 1})]:
            transport = StringTransport()
            protocol = RequestProtocol(dispatcher, Clock(), spool, 100, 60, encodeInThread=encoder)
            protocol.makeConnection(transport)
            protocol.dataReceived(json.dumps({"action": action}).encode() + b"\n")
            if pending:
                self.assertEqual(transport.value(), b"")
                pending.pop().callback(None)
            drain(transport)
            self.assertEqual(json.loads(transport.value()), expected)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(calls, [{"stdout": big}])


class HalfCloseTests(SynchronousTestCase):
    """A client that half-closes after its request still gets its answer (as the reference)."""

    def setUp(self) -> None:
        self.spool = Path(self.mktemp())
        self.spool.mkdir()
        self.uploads: list[Request] = []
        dispatcher = Dispatcher(spoolDirectory=self.spool)
        dispatcher.register(
            [
                Action("exec", lambda r: {"ran": r.string("command")}),
                Action("upload", self.upload, upload=True),
            ]
        )
        self.transport = StringTransport()
        self.protocol = RequestProtocol(dispatcher, Clock(), self.spool, 1000, 60)
        self.protocol.makeConnection(self.transport)

    def upload(self, request: Request) -> dict[str, Any]:
        self.uploads.append(request)
        return {}

    def answer(self) -> dict[str, Any]:
        result = json.loads(self.transport.value())
        assert isinstance(result, dict)
        return result

    def test_lineWithoutNewline(self) -> None:
        """A request without a trailing newline is still run when the host half-closes the
        connection."""
        self.protocol.dataReceived(b'{"command": "echo nonl"}')
        self.protocol.readConnectionLost()
        self.assertEqual(self.answer(), {"ran": "echo nonl"})

    def test_nothingSent(self) -> None:
        """A host that half-closes without sending anything gets an error saying the request is
        empty."""
        self.protocol.readConnectionLost()
        self.assertIn("request is empty", self.answer()["error"])

    def test_bodyCutShort(self) -> None:
        """An upload whose body ends before its declared size is refused, and nothing is handed
        on or left in the spool."""
        self.protocol.dataReceived(b'{"action": "upload", "archive_size": 10}\nabc')
        self.protocol.readConnectionLost()
        self.assertEqual(self.answer(), {"error": "unexpected EOF while reading archive payload"})
        self.assertEqual(self.uploads, [])
        self.assertEqual(list(self.spool.iterdir()), [])


class HalfCloseOverTheWireTests(TestCase):
    async def test_execAfterHalfClose(self) -> None:
        """Over real TCP, `printf '{...}' | nc -N` style clients get their answer."""
        from tests.helpers import reactor, startAgent

        agent = await startAgent(self)
        received: Deferred[bytes] = Deferred()
        chunks: list[bytes] = []

        class HalfCloser(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b'{"command": "echo nonl"}')
                self.transport.loseWriteConnection()  # type: ignore[attr-defined]

            def dataReceived(self, data: bytes) -> None:
                chunks.append(data)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                received.callback(b"".join(chunks))

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port)
        await connectProtocol(endpoint, HalfCloser())
        answer = json.loads(await received)
        self.assertEqual(answer["stdout"], "nonl\n")
        self.assertEqual(answer["exit_code"], 0)

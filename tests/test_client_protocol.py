"""The client's wire protocol in memory: framing of answers, uploads, exports and their failures."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.client.errors import AgentClosedError, AgentError, AgentProtocolError
from pyro_reactor.client.progress import ProgressBar, formatBytes, formatDuration
from pyro_reactor.client.protocol import ExchangeProtocol, encodeRequest


class AbortableTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


def outcome(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


class AnswerTests(SynchronousTestCase):
    def connect(self, proto: ExchangeProtocol) -> AbortableTransport:
        transport = AbortableTransport()
        proto.makeConnection(transport)
        return transport

    def test_requestLineThenAnswerInPieces(self) -> None:
        """The client sends one request line and assembles an answer split across reads, then
        closes politely."""
        proto = ExchangeProtocol(encodeRequest({"action": "ping"}))
        transport = self.connect(proto)
        self.assertEqual(transport.value(), b'{"action":"ping"}\n')
        results = outcome(proto.answered)
        proto.dataReceived(b'{"pong": ')
        proto.dataReceived(b"true, ")
        self.assertEqual(results, [])
        proto.dataReceived(b'"x": "\xc3\xa9"}\nignored')
        self.assertEqual(results, [{"pong": True, "x": "é"}])
        # Politely closed, not reset, after a whole answer.
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)

    def test_errorAnswerIsStillAnAnswer(self) -> None:
        """An error answer is handed back as the agent's answer; turning it into an exception is
        the API's job."""
        # The protocol hands back what the agent said; api.py turns "error" into AgentError.
        proto = ExchangeProtocol(b"{}\n")
        self.connect(proto)
        results = outcome(proto.answered)
        proto.dataReceived(b'{"error": "nope"}\n')
        self.assertEqual(results, [{"error": "nope"}])

    def test_closedWithoutAnAnswer(self) -> None:
        """A connection closed before an answer fails with AgentClosedError."""
        proto = ExchangeProtocol(b"{}\n")
        self.connect(proto)
        results = outcome(proto.answered)
        proto.connectionLost(Failure(Exception("gone")))
        self.assertIsInstance(results[0], Failure)
        self.assertIsInstance(results[0].value, AgentClosedError)

    def test_answerOverTheLimit(self) -> None:
        """An answer longer than the client's limit fails with AgentProtocolError and the
        connection is aborted."""
        proto = ExchangeProtocol(b"{}\n", maxAnswerBytes=10)
        transport = self.connect(proto)
        results = outcome(proto.answered)
        proto.dataReceived(b'{"a": "0123456789')
        self.assertIsInstance(results[0].value, AgentProtocolError)
        self.assertIn("exceeds the limit of 10 bytes", str(results[0].value))
        self.assertTrue(transport.aborted)

    def test_cancelAbortsTheConnection(self) -> None:
        """Cancelling a call aborts its connection and nothing arriving afterwards is delivered."""
        proto = ExchangeProtocol(b"{}\n")
        transport = self.connect(proto)
        results = outcome(proto.answered)
        proto.answered.cancel()
        self.assertTrue(transport.aborted)
        proto.connectionLost(Failure(Exception("aborted")))
        proto.dataReceived(b"{}\n")
        self.assertEqual(len(results), 1)


class UploadTests(SynchronousTestCase):
    def test_bodyStreamedWithAProducerAndProgress(self) -> None:
        """An upload body is streamed by a pull producer only as fast as the transport asks, with
        progress reported."""
        body = bytes(range(256)) * 1000
        seen: list[tuple[int, int]] = []
        proto = ExchangeProtocol(
            b'{"action":"extract_archive"}\n',
            upload=io.BytesIO(body),
            uploadSize=len(body),
            progress=lambda done, total: seen.append((done, total)),
        )
        transport = AbortableTransport()
        proto.makeConnection(transport)
        # A pull producer: nothing beyond the line until the transport asks.
        self.assertIsNotNone(transport.producer)
        self.assertEqual(transport.value(), b'{"action":"extract_archive"}\n')
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.assertEqual(transport.value(), b'{"action":"extract_archive"}\n' + body)
        self.assertEqual(seen[0], (0, len(body)))
        self.assertEqual(seen[-1], (len(body), len(body)))
        results = outcome(proto.answered)
        proto.dataReceived(b'{"entry_count": 1}\n')
        self.assertEqual(results, [{"entry_count": 1}])

    def test_earlyErrorAnswerStopsTheBody(self) -> None:
        """An error answered before the body is sent stops the upload and aborts the connection."""
        body = b"x" * 100000
        proto = ExchangeProtocol(b"{}\n", upload=io.BytesIO(body), uploadSize=len(body))
        transport = AbortableTransport()
        proto.makeConnection(transport)
        assert transport.producer is not None
        transport.producer.resumeProducing()
        results = outcome(proto.answered)
        proto.dataReceived(b'{"error": "archive_size 100000 exceeds the maximum"}\n')
        self.assertEqual(results, [{"error": "archive_size 100000 exceeds the maximum"}])
        self.assertTrue(transport.aborted)
        self.assertIsNone(transport.producer)

    def test_fileShorterThanAnnounced(self) -> None:
        """A local file that shrank below its announced size fails the upload with a clear error."""
        proto = ExchangeProtocol(b"{}\n", upload=io.BytesIO(b"abc"), uploadSize=10)
        transport = AbortableTransport()
        proto.makeConnection(transport)
        results = outcome(proto.answered)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.assertIsInstance(results[0].value, AgentError)
        self.assertIn("holds 3 bytes, not the 10 announced", str(results[0].value))


class ExportTests(SynchronousTestCase):
    def start(self) -> tuple[ExchangeProtocol, io.BytesIO, list[Any], list[tuple[int, int]]]:
        sink = io.BytesIO()
        seen: list[tuple[int, int]] = []
        proto = ExchangeProtocol(
            b"{}\n", export=sink, progress=lambda done, total: seen.append((done, total))
        )
        proto.makeConnection(AbortableTransport())
        return proto, sink, outcome(proto.answered), seen

    def test_headerThenExactlyArchiveSizeBytes(self) -> None:
        """An export is a header line followed by exactly archive_size bytes, written to the sink
        with progress."""
        proto, sink, results, seen = self.start()
        header = {"workspace_path": "/workspace/a", "archive_size": 10}
        proto.dataReceived(json.dumps(header).encode() + b"\n0123")
        self.assertEqual(results, [])
        proto.dataReceived(b"456789")
        self.assertEqual(results, [header])
        self.assertEqual(sink.getvalue(), b"0123456789")
        self.assertEqual(seen, [(0, 10), (4, 10), (10, 10)])

    def test_errorHeader(self) -> None:
        """An export answered with an error writes nothing to the sink."""
        proto, sink, results, _ = self.start()
        proto.dataReceived(b'{"error": "workspace path does not exist: /workspace/x"}\n')
        self.assertEqual(results, [{"error": "workspace path does not exist: /workspace/x"}])
        self.assertEqual(sink.getvalue(), b"")

    def test_cutShort(self) -> None:
        """An export cut off before archive_size bytes fails saying how many bytes arrived."""
        proto, _, results, _ = self.start()
        proto.dataReceived(b'{"archive_size": 10}\n0123')
        proto.connectionLost(Failure(Exception("gone")))
        self.assertIsInstance(results[0].value, AgentProtocolError)
        self.assertIn("after 4 of the export's 10 bytes", str(results[0].value))

    def test_headerWithoutSize(self) -> None:
        """An export header without a valid archive_size is refused."""
        proto, _, results, _ = self.start()
        proto.dataReceived(b'{"archive_size": -1}\n')
        self.assertIn("no valid archive_size", str(results[0].value))

    def test_emptyArchive(self) -> None:
        """An export of zero bytes completes with its header."""
        proto, _, results, _ = self.start()
        proto.dataReceived(b'{"archive_size": 0}\n')
        self.assertEqual(results, [{"archive_size": 0}])


class ProgressBarTests(SynchronousTestCase):
    def test_rendersBytesRateAndEta(self) -> None:
        """The progress bar shows percentage, bytes, rate and ETA within its width, and skips
        updates that come too often."""
        now = [100.0]
        out = io.StringIO()
        bar = ProgressBar(out, "upload x", lambda: now[0], width=100)
        bar(0, 4 * 1024 * 1024)
        now[0] = 102.0
        bar(2 * 1024 * 1024, 4 * 1024 * 1024)
        line = out.getvalue().split("\r")[-1]
        self.assertIn(" 50% 2.0 MiB/4.0 MiB 1.0 MiB/s ETA 0:02", line)
        self.assertTrue(line.startswith("upload x [#"))
        self.assertLess(len(line), 100)
        # Updates closer together than the interval are not drawn, except the last one.
        drawn = out.getvalue().count("\r")
        bar(3 * 1024 * 1024, 4 * 1024 * 1024)
        self.assertEqual(out.getvalue().count("\r"), drawn)
        bar(4 * 1024 * 1024, 4 * 1024 * 1024)
        self.assertIn("100%", out.getvalue().split("\r")[-1])
        bar.finish()
        self.assertTrue(out.getvalue().endswith("\n"))

    def test_formats(self) -> None:
        """Byte counts and durations are formatted for people (KiB, GiB, h:mm:ss)."""
        self.assertEqual(formatBytes(512), "512 B")
        self.assertEqual(formatBytes(1536), "1.5 KiB")
        self.assertEqual(formatBytes(3 * 1024**3), "3.0 GiB")
        self.assertEqual(formatDuration(75), "1:15")
        self.assertEqual(formatDuration(3725), "1:02:05")

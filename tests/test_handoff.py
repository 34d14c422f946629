"""Answers that take the connection over after their first line (L{HandOff}).

Streaming actions (attach a job, relay TCP, watch the workspace) answer a header line and then
own the connection: these tests drive L{RequestProtocol} in memory with such answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pyro_reactor.wire.dispatch import Action, Dispatcher, HandOff
from pyro_reactor.wire.protocol import EARLY_BYTES_LIMIT, RequestProtocol
from pyro_reactor.wire.request import Request


@implementer(IHalfCloseableProtocol)
class StreamRecorder(Protocol):
    """The protocol of a streaming action: records every event it gets."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def connectionMade(self) -> None:
        self.events.append(("made", None))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def readConnectionLost(self) -> None:
        self.events.append(("eof", None))

    def writeConnectionLost(self) -> None:
        self.events.append(("write-closed", None))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append(("lost", None))


class PlainRecorder(Protocol):
    """A streaming protocol that does not handle half-close."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class HandOffTests(SynchronousTestCase):
    """The protocol writes the header, then hands every later event to the action's protocol."""

    def setUp(self) -> None:
        spool = Path(self.mktemp())
        spool.mkdir()
        self.stream = StreamRecorder()
        self.pending: Deferred[HandOff] = Deferred()
        dispatcher = Dispatcher(spoolDirectory=spool)
        dispatcher.register(
            [
                Action("now", lambda r: HandOff({"streaming": True}, self.stream)),
                Action("later", self.later),
                Action("plain", lambda r: HandOff({"plain": True}, self.plain)),
            ]
        )
        self.plain = PlainRecorder()
        self.transport = StringTransport()
        self.protocol = RequestProtocol(dispatcher, Clock(), spool, 1000, 60)
        self.protocol.makeConnection(self.transport)

    def later(self, request: Request) -> Deferred[HandOff]:
        return self.pending

    def header(self) -> dict[str, Any]:
        line, newline, _ = self.transport.value().partition(b"\n")
        self.assertEqual(newline, b"\n")
        result = json.loads(line)
        assert isinstance(result, dict)
        return result

    def test_headerThenStream(self) -> None:
        """The header line goes out, the connection stays open, and later bytes reach the
        action's protocol, which now owns the transport."""
        self.protocol.dataReceived(b'{"action": "now"}\n')
        self.assertEqual(self.header(), {"streaming": True})
        self.assertFalse(self.transport.disconnecting)
        self.assertIs(self.stream.transport, self.transport)
        self.protocol.dataReceived(b"more")
        self.assertEqual(self.stream.events, [("made", None), ("data", b"more")])

    def test_bytesWithTheRequestLine(self) -> None:
        """Bytes sent in the same packet as the request line are delivered, after the header."""
        self.protocol.dataReceived(b'{"action": "now"}\nhello')
        self.assertEqual(self.stream.events, [("made", None), ("data", b"hello")])

    def test_bytesBeforeTheAnswer(self) -> None:
        """Bytes sent while the answer is prepared are kept and delivered in order, never lost;
        a half-close in that time is delivered after them."""
        self.protocol.dataReceived(b'{"action": "later"}\nab')
        self.protocol.dataReceived(b"cd")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")
        self.pending.callback(HandOff({"connected": True}, self.stream))
        self.assertEqual(self.header(), {"connected": True})
        self.assertEqual(self.stream.events, [("made", None), ("data", b"abcd"), ("eof", None)])

    def test_earlyBytesAreBounded(self) -> None:
        """A client sending much before the answer is ready stops being read, and is read
        again once the answer has taken the connection over."""
        self.protocol.dataReceived(b'{"action": "later"}\n')
        self.protocol.dataReceived(b"x" * EARLY_BYTES_LIMIT)
        self.assertEqual(self.transport.producerState, "paused")
        self.pending.callback(HandOff({"connected": True}, self.stream))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.stream.events[1], ("data", b"x" * EARLY_BYTES_LIMIT))

    def test_halfCloseAndLoss(self) -> None:
        """A half-close and the end of the connection are handed on."""
        self.protocol.dataReceived(b'{"action": "now"}\n')
        self.protocol.readConnectionLost()
        self.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.stream.events, [("made", None), ("eof", None), ("lost", None)])

    def test_halfCloseWithoutSupport(self) -> None:
        """A streaming protocol that cannot take a half-close has its connection closed."""
        self.protocol.dataReceived(b'{"action": "plain"}\n')
        self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_clientGoneBeforeTheAnswer(self) -> None:
        """When the client left before the answer was ready, the action's protocol is told
        the connection is lost (so it can release what it holds), and nothing is written."""
        self.protocol.dataReceived(b'{"action": "later"}\n')
        self.protocol.connectionLost(Failure(Exception("gone")))
        self.pending.callback(HandOff({"connected": True}, self.stream))
        self.assertEqual(self.stream.events, [("lost", None)])
        self.assertEqual(self.transport.value(), b"")

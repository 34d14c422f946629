"""A first line out, one answer line in, then the connection belongs to the caller's protocol.

Two client endpoints open their connection this way: Firecracker's hybrid vsock (``CONNECT
<port>`` answered ``OK <n>``) and the agent's ``connect_tcp`` relay (a request line answered
``{"connected": true, ...}``). L{LineHandshake} does what they share: it buffers the answer
line (bounded), hands every byte after it to the protocol the caller's factory builds, passes
half-closes on (a relayed TCP connection takes them; otherwise the connection is closed, as it
would be without us), and fails ``ready`` with the subclass's reason when the answer says no,
is too long, or never comes.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class LineHandshake(Protocol):
    """The shared handshake; ``ready`` fires with the caller's protocol once it has the stream.

    A subclass sends its line in ``connectionMade`` and says: whether an answer line accepts
    the connection (L{_accepted}, which abandons the handshake with its reason otherwise),
    what a line longer than L{maxLine} and a close before the answer mean (L{_tooLong},
    L{_closedEarly}), and what to do when ``ready`` is cancelled (L{_cancel}).
    """

    maxLine = 512

    def __init__(self, factory: IProtocolFactory) -> None:
        self.wrappedFactory = factory
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)
        self.wrapped: IProtocol | None = None
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self.ready.called:
            return
        self._buffer += data
        line, newline, rest = self._buffer.partition(b"\n")
        if not newline:
            if len(self._buffer) > self.maxLine:
                self._abandon(self._tooLong())
            return
        if self._accepted(line):
            self._handOver(rest)

    def _handOver(self, rest: bytes) -> None:
        self._settled()
        assert self.transport is not None
        wrapped = self.wrappedFactory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._abandon(error.NoProtocol())
            return
        self.wrapped = wrapped
        self._buffer = b""
        wrapped.makeConnection(self.transport)
        self.ready.callback(wrapped)
        if rest and self.wrapped is not None:
            self.wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._settled()
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(self._closedEarly())

    def readConnectionLost(self) -> None:
        wrapped = self.wrapped
        if wrapped is not None and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = self.wrapped
        if wrapped is not None and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()

    def _abandon(self, reason: Exception) -> None:
        self._settled()
        if not self.ready.called:
            self.ready.errback(reason)
        if self.transport is not None:
            self.transport.loseConnection()

    def _settled(self) -> None:
        """The handshake is over, one way or the other (a subclass stops its timer)."""

    def _accepted(self, line: bytes) -> bool:
        raise NotImplementedError

    def _tooLong(self) -> Exception:
        raise NotImplementedError

    def _closedEarly(self) -> Exception:
        raise NotImplementedError

    def _cancel(self, ready: Deferred[IProtocol]) -> None:
        raise NotImplementedError

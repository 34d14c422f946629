"""The two protocols of a TCP relay and the transport-backed L{End} the relay machine acts on.

Bytes go straight from one transport to the other (to the socket at once when nothing is
queued for it, see L{sendNow}). Backpressure is Twisted's own: each transport is registered as
the (streaming) producer of the other, so when the bytes written to one side pile up past its
buffer (L{RELAY_BUFFER}, 120 KiB), the other side stops being read until they drain. Neither
direction ever holds more than that buffer plus one read (240 KiB) in the agent, whatever the
speed difference; a peer that stops reading stalls the other one.

Half-close goes both ways: both protocols provide ``IHalfCloseableProtocol``, an EOF from one
side becomes a ``shutdown(SHUT_WR)`` on the other (after what is buffered for it), and the relay
ends when both directions have ended. A connection that ends abnormally (a reset) is passed on
as a reset (``SO_LINGER`` 0, then an abort), so a host sees its guest server's reset.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities.ports._machine import End, RelayCore, RelayInput, RelayMachine
from pyro_reactor.system._twisted import sendNow

_LINGER_RESET = struct.pack("ii", 1, 0)

RELAY_BUFFER = 120 * 1024
"""Bytes read at a time from each side, and written bytes that may pile up for a side before
the other side stops being read: each direction holds at most about twice this. Four times
Twisted's default for bulk throughput, but under glibc's 128 KiB mmap threshold: a read buffer
above it costs an mmap and munmap per read (about 10 us, measured), which small exchanges feel."""


def _tune(transport: Any) -> None:
    # FileDescriptor.bufferSize is both the read size and the producer-pausing threshold.
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = RELAY_BUFFER
    # Relayed bytes go out as they come: Nagle would hold small answers back.
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (a vsock or UNIX host connection)


class TransportEnd:
    """An L{End} over a Twisted stream transport (TCP, UNIX or vsock)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def pipeFrom(self, other: End) -> None:
        assert isinstance(other, TransportEnd)
        self.transport.registerProducer(other.transport, True)

    def _release(self) -> None:
        # A paused producer registered on a transport would hold its close back.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    def shutdownWrite(self) -> None:
        self._release()
        self.transport.loseWriteConnection()

    def close(self) -> None:
        self._release()
        self.transport.loseConnection()

    def reset(self) -> None:
        self._release()
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # not every socket family takes SO_LINGER; an abort is enough there
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()


def _isReset(reason: Failure) -> bool:
    return not reason.check(ConnectionDone)


RELAY_HOLDS = 4 * RELAY_BUFFER
"""What one relay may hold at most (both directions: a buffer and a read each), drawn from the
agent's memory budget for as long as the relay lives."""


class Relay:
    """One relay: its machine, and the two protocols that feed it.

    ``release`` is called once, when the relay ends (it gives the relay's memory reservation
    back).
    """

    def __init__(self, label: str, release: Callable[[], None] = lambda: None) -> None:
        self.label = label
        self.machine: RelayInput = RelayMachine(RelayCore(label=label, release=release))
        self.host = HostSide(self)
        self.guest = GuestSide(self)


@implementer(IHalfCloseableProtocol)
class GuestSide(Protocol):
    """The agent's connection to the guest server."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.peer: Any = None  # the host transport, once attached
        self.early = b""

    def connectionMade(self) -> None:
        _tune(self.transport)
        self.relay.machine.guestConnected(TransportEnd(self.transport))

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            # Only possible in the instant before the host end is attached (the guest is
            # paused meanwhile): kept, and written first.
            self.early += data
            return
        sendNow(self.peer, data)

    def attach(self, peer: Any) -> None:
        self.peer = peer
        early, self.early = self.early, b""
        if early:
            peer.write(early)

    def readConnectionLost(self) -> None:
        self.relay.machine.guestEOF()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.machine.guestLost(_isReset(reason))


@implementer(IHalfCloseableProtocol)
class HostSide(Protocol):
    """The host's connection, handed over after the ``connected`` line."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        _tune(self.transport)
        self.relay.guest.attach(self.transport)
        self.relay.machine.hostAttached(TransportEnd(self.transport))

    def dataReceived(self, data: bytes) -> None:
        sendNow(self.relay.guest.transport, data)

    def readConnectionLost(self) -> None:
        self.relay.machine.hostEOF()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.machine.hostLost(_isReset(reason))

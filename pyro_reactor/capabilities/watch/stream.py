"""The host connection of a watch stream, after its ``watching`` line (see the package)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities.watch._machine import WatchInput
from pyro_reactor.capabilities.watch.tree import Event


def encodeEvent(event: Event) -> bytes:
    return (json.dumps(event) + "\n").encode("utf-8")


@implementer(IPushProducer)
class WatchStream(Protocol):
    """The host connection of one watch, after the ``watching`` line: writes event lines.

    It is its transport's streaming producer: a host that does not read pauses it, and a
    paused stream does not read its inotify descriptor (the kernel queues, then overflows).
    Bytes from the host are ignored; a host half-close ends the stream (this protocol does not
    take half-closes, so the connection is closed).
    """

    def __init__(self) -> None:
        self.machine: WatchInput | None = None
        self._queued: list[bytes] = []

    def emit(self, event: Event) -> None:
        line = encodeEvent(event)
        if self.transport is None:
            self._queued.append(line)
        else:
            self.transport.write(line)

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)
        queued, self._queued = self._queued, []
        if queued:
            transport.writeSequence(queued)
        assert self.machine is not None
        self.machine.attach(transport)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert self.machine is not None
        self.machine.lost()

    def pauseProducing(self) -> None:
        assert self.machine is not None
        self.machine.pause()

    def resumeProducing(self) -> None:
        assert self.machine is not None
        self.machine.resume()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

"""Copying a local stream (the CLI's stdin) to a job's stdin at the pace the connection takes.

A job's attach stream is a TCP (or vsock, or UNIX) connection; the agent stops reading it
while the job's stdin queue is full, so the connection's send buffer fills up when the job
reads slowly. The pump is the push producer of that connection: it asks its reader for one
chunk at a time and only while the connection takes data, so however large the input and
however slow the job, the client holds at most about two chunks plus the transport's buffer.
At the end of the input it sends ``close_stdin`` after every data line (the transport keeps
their order).

States::

    idle --start--> flowing <--pause/resume--> throttled --chunk--> held --resume--> flowing
    flowing | throttled --exhausted--> finished (close_stdin sent)
    any --stopProducing (the connection is gone)--> finished

``flowing``: one read is granted and the connection takes data; each chunk is written and the
next read granted. ``throttled``: the connection is full but the read granted before it filled
is still under way; its chunk is written (the transport holds one chunk over its mark) and no
new read is granted: ``held`` until the transport drains.

L{ThreadedReader} reads a blocking file in a daemon thread of its own, one chunk per grant:
reading a terminal or a pipe may block for ever, and a reactor pool thread stuck there would
hold up the client's exit. (A regular file cannot be polled, so the reactor cannot read
stdin itself in every case.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

#: Bytes asked of the reader per grant.
CHUNK_BYTES = 64 * 1024

_log = Logger()


class StdinConsumer(Protocol):
    """Where the pump writes: a L{JobAttachment}, or a test's fake."""

    def write(self, data: bytes | str) -> None:
        "Send bytes (or text) to the job's stdin."

    def closeStdin(self) -> None:
        "Send the end of the job's stdin."

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        "Have C{producer} paused while the connection's buffer is full."

    def unregisterProducer(self) -> None:
        "Stop pausing and resuming the producer."


class ChunkReader(Protocol):
    """Where the pump reads: one chunk per grant, the answer called in the reactor thread."""

    def grant(self, received: Callable[[bytes | str], None], exhausted: Callable[[], None]) -> None:
        "Read one chunk; call C{received(chunk)}, or C{exhausted()} at the end of the input."

    def stop(self) -> None:
        "No more reads (the answer to a read under way, if any, is ignored by the pump)."


@dataclass
class StdinPumpCore:
    """What a pump acts on."""

    consumer: StdinConsumer
    reader: ChunkReader


class StdinPump(Protocol):
    """The inputs of a pump; it is the push producer of the consumer's connection."""

    def start(self) -> None:
        "Register with the consumer and grant the first read."

    def pauseProducing(self) -> None:
        "The connection's write buffer is full."

    def resumeProducing(self) -> None:
        "The connection's write buffer has drained."

    def stopProducing(self) -> None:
        "The connection is gone: read no more."

    def _received(self, data: bytes | str) -> None:
        "The reader read a chunk."

    def _exhausted(self) -> None:
        "The reader reached the end of the input."


def _grant(pump: StdinPump, core: StdinPumpCore) -> None:
    core.reader.grant(pump._received, pump._exhausted)


def _makeStdinPump() -> TypeMachine[StdinPump, StdinPumpCore]:
    builder = TypeMachineBuilder(StdinPump, StdinPumpCore)
    idle = builder.state("idle")
    flowing = builder.state("flowing")
    throttled = builder.state("throttled")
    held = builder.state("held")
    finished = builder.state("finished")

    @idle.upon(StdinPump.start).to(flowing)
    def _start(pump: StdinPump, core: StdinPumpCore) -> None:
        core.consumer.registerProducer(pump, True)
        _grant(pump, core)

    # A write that fills the transport pauses us from inside the write; automat runs that
    # input after this output, so the next read is already granted: ``throttled``.
    @flowing.upon(StdinPump._received).to(flowing)
    def _pass(pump: StdinPump, core: StdinPumpCore, data: bytes | str) -> None:
        core.consumer.write(data)
        _grant(pump, core)

    @throttled.upon(StdinPump._received).to(held)
    def _hold(pump: StdinPump, core: StdinPumpCore, data: bytes | str) -> None:
        core.consumer.write(data)

    flowing.upon(StdinPump.pauseProducing).to(throttled).returns(None)
    throttled.upon(StdinPump.resumeProducing).to(flowing).returns(None)
    held.upon(StdinPump.resumeProducing).to(flowing)(_grant)

    for state in (flowing, throttled):

        @state.upon(StdinPump._exhausted).to(finished)
        def _close(pump: StdinPump, core: StdinPumpCore) -> None:
            core.consumer.closeStdin()
            core.consumer.unregisterProducer()

    for state in (idle, flowing, throttled, held):

        @state.upon(StdinPump.stopProducing).to(finished)
        def _stop(pump: StdinPump, core: StdinPumpCore) -> None:
            core.reader.stop()

    for state, inputs in (
        (flowing, (StdinPump.resumeProducing,)),
        (throttled, (StdinPump.pauseProducing,)),
        (held, (StdinPump.pauseProducing,)),
        (idle, (StdinPump.pauseProducing, StdinPump.resumeProducing)),
        (
            finished,
            (
                StdinPump.start,
                StdinPump.pauseProducing,
                StdinPump.resumeProducing,
                StdinPump.stopProducing,
                StdinPump._exhausted,
            ),
        ),
    ):
        for late in inputs:
            state.upon(late).loop().returns(None)
    finished.upon(StdinPump._received).loop().returns(None)
    return builder.build()


StdinPumpMachine = _makeStdinPump()
"""Builds a pump: ``StdinPumpMachine(StdinPumpCore(consumer, reader))`` -> L{StdinPump}."""


class ThreadedReader:
    """Reads a blocking file one chunk per grant, in a daemon thread of its own.

    C{read} is the file's C{read1} (a binary stream: whatever is there, up to the size) or
    C{read} (a text stream); its answers reach the pump through C{reactor.callFromThread}.
    A read error ends the input as the end of the file would (and is logged).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        read: Callable[[int], bytes | str],
        chunkBytes: int = CHUNK_BYTES,
    ) -> None:
        self.reactor = reactor
        self.read = read
        self.chunkBytes = chunkBytes
        self._grants: queue.SimpleQueue[
            tuple[Callable[[bytes | str], None], Callable[[], None]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def grant(self, received: Callable[[bytes | str], None], exhausted: Callable[[], None]) -> None:
        self._grants.put((received, exhausted))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pyro-job-stdin", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._grants.put(None)

    def _run(self) -> None:
        while (granted := self._grants.get()) is not None:
            received, exhausted = granted
            try:
                data = self.read(self.chunkBytes)
            except (OSError, ValueError) as error:
                self.reactor.callFromThread(_readFailed, str(error), exhausted)
                return
            if not data:
                self.reactor.callFromThread(exhausted)
                return
            self.reactor.callFromThread(received, data)


def _readFailed(reason: str, exhausted: Callable[[], None]) -> None:
    _log.warn("reading the job's stdin failed ({reason}); closing it", reason=reason)
    exhausted()


def pumpStream(reactor: IReactorFromThreads, stream: Any, consumer: StdinConsumer) -> StdinPump:
    """Copy C{stream} (a binary file with C{read1}, or any file with C{read}) to C{consumer}'s
    job stdin at the pace its connection takes, then close that stdin; the started pump."""
    read1 = getattr(stream, "read1", None)
    reader = ThreadedReader(reactor, read1 if read1 is not None else stream.read)
    pump = StdinPumpMachine(StdinPumpCore(consumer, reader))
    pump.start()
    return pump


__all__ = [
    "CHUNK_BYTES",
    "ChunkReader",
    "StdinConsumer",
    "StdinPump",
    "StdinPumpCore",
    "StdinPumpMachine",
    "ThreadedReader",
    "pumpStream",
]

"""Give the C heap's free pages back to the kernel once large buffers have been let go.

Building a large answer (16 MiB of command output, decoded a pipe read at a time) leaves the
heap full of holes when its pieces are freed: glibc keeps them, and the agent's resident size
stays far above what it holds. Measured with 8 such answers held and then dropped: 127 MB
resident with nothing left to hold, 48 MB after one ``malloc_trim(0)``. L{HeapTrimmer} calls it
(in a worker thread: it walks the heap) after the memory budget gets a large reservation back,
at most once per L{TRIM_INTERVAL}, so that the resident size follows the budget down.

L{singleArena} keeps every thread on glibc's main heap. Each worker thread otherwise gets an
arena of its own, and ``malloc_trim`` never gives back the free top of a thread's arena: after
every memory attack of the abuse benchmark at once, 33-56 MB stayed resident in the worker
threads' arenas with 9 MB of the heap in use; with one arena the agent went back to its idle
size. Threads allocate under the GIL anyway, so sharing one arena costs no parallelism.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.system._linux import libcFunction

log = Logger(namespace="pyro_reactor.system.heap")

#: A released reservation at least this big asks for a trim.
TRIM_AFTER = 4 * 1024 * 1024
#: The shortest time between two trims (seconds): a trim walks the whole heap.
TRIM_INTERVAL = 0.25
#: glibc's ``mallopt`` parameter for the most arenas the allocator creates.
M_ARENA_MAX = -8


def mallocTrim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or C{None} where the C library has none (musl)."""
    trim = libcFunction("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    if trim is None:
        return None
    return lambda: trim(0)


def singleArena() -> bool:
    """Have threads started from now on allocate from glibc's main arena (see the module's
    docstring); C{False} where the C library has no ``mallopt`` (musl) or refuses."""
    mallopt = libcFunction("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


class HeapTrimmer(Service):
    """Trims the heap (in a thread) soon after large reservations are released.

    L{released} is the memory budget's hook. Trims never overlap and come at most once per
    C{interval}, however many releases ask for one; a release during a trim asks for one more
    after it. Stopping the service cancels a trim not yet begun.
    """

    def __init__(
        self,
        reactor: Any,
        inThread: Callable[[Callable[[], object]], Deferred[object]],
        trim: Callable[[], object] | None,
        interval: float = TRIM_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.inThread = inThread
        self.trim = trim
        self.interval = interval
        self.trims = 0
        self._last = -interval
        self._call: IDelayedCall | None = None
        self._trimming = False
        self._again = False

    def released(self, size: int) -> None:
        """C{size} bytes of the budget were given back: trim soon if that is a lot."""
        if self.trim is None or size < TRIM_AFTER or not self.running:
            return
        if self._trimming:
            self._again = True
        elif self._call is None:
            delay = max(0.0, self._last + self.interval - self.reactor.seconds())
            self._call = self.reactor.callLater(delay, self._run)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        assert self.trim is not None
        self._call = None
        self._trimming = True
        self._last = self.reactor.seconds()

        def done(result: object) -> None:
            self.trims += 1

        def failed(failure: Failure) -> None:
            log.failure("cannot trim the heap", failure)

        def over(result: object) -> None:
            self._trimming = False
            if self._again:
                self._again = False
                self.released(TRIM_AFTER)

        self.inThread(self.trim).addCallbacks(done, failed).addBoth(over)


__all__ = ["TRIM_AFTER", "TRIM_INTERVAL", "HeapTrimmer", "mallocTrim", "singleArena"]

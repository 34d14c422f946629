"""One memory budget for the whole agent, which every large buffer draws from.

Request lines in flight, the parse of a big line, answers being written (and whatever a
capability holds per request: shell input, shell windows) take a L{Reservation} from the one
L{MemoryBudget} on the context before they hold the memory, and give it back when they let it
go. A draw that does not fit is refused with L{BudgetExceeded}, a clear error answered to the
client that asked, never an agent that runs out of memory.

The budget counts bytes the agent decided to hold, not the interpreter's resident size: the
goal is that no client (nor all of them together) can make the agent hold more than the budget
on top of what the interpreter itself needs.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from pyro_reactor.errors import ActionError

log = Logger(namespace="pyro_reactor.wire.budget")

DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024


class BudgetExceeded(ActionError):
    """A draw on the memory budget that does not fit; its message is the client's answer."""


class MemoryBudget:
    """Bytes the agent may hold for requests and answers, shared by every connection.

    Only ever used on the reactor thread (a reservation made for work in a worker thread is
    taken before the work starts and released when its result is back).
    """

    def __init__(self, total: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        #: Told how many bytes each give-back returned (the heap trimmer listens).
        self.onReleased: Callable[[int], None] | None = None

    @property
    def available(self) -> int:
        return self.total - self.used

    def reserve(self, size: int, purpose: str) -> Reservation:
        """Take ``size`` bytes for ``purpose`` (words for the error message), or refuse."""
        reservation = Reservation(self, purpose)
        reservation.grow(size)
        return reservation

    def _take(self, size: int, purpose: str) -> None:
        if size > self.total - self.used:
            log.warn(
                "memory budget exhausted: {purpose} needs {size} bytes, {available} of {total}"
                " free",
                purpose=purpose,
                size=size,
                available=self.total - self.used,
                total=self.total,
                outcome="refused",
            )
            raise BudgetExceeded(
                f"the agent's memory budget ({self.total} bytes) cannot hold {purpose}"
                f" ({size} more bytes, {max(self.total - self.used, 0)} free): try again later"
                " or send less"
            )
        self.used += size
        self.peak = max(self.peak, self.used)

    def _give(self, size: int) -> None:
        self.used -= size
        if size > 0 and self.onReleased is not None:
            self.onReleased(size)


class Reservation:
    """Bytes held from a L{MemoryBudget} for one purpose; grows, shrinks, is released once."""

    def __init__(self, budget: MemoryBudget, purpose: str) -> None:
        self.budget = budget
        self.purpose = purpose
        self.size = 0

    def grow(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise L{BudgetExceeded} (holding nothing more)."""
        if size > 0:
            self.budget._take(size, self.purpose)
            self.size += size

    def resize(self, size: int) -> None:
        """Hold exactly ``size`` bytes (growing may raise L{BudgetExceeded})."""
        if size > self.size:
            self.grow(size - self.size)
        else:
            self.budget._give(self.size - size)
            self.size = size

    def release(self) -> None:
        """Give every byte back; releasing twice is harmless."""
        self.budget._give(self.size)
        self.size = 0


class ParseCost:
    """A generous estimate of the memory ``json.loads`` takes to parse a line, kept up to
    date as the line arrives in pieces.

    Text costs about its size once decoded; each container and each element costs a Python
    object (a dict about 64 bytes and more as it grows, a list slot 8, a small string 50). A
    few C-speed passes over each piece count them, so that a line of a million tiny objects
    is refused before it takes half a gigabyte to parse. Counted as the pieces come, the
    passes never hold the reactor long: over a whole 16 MiB line at once they take ~35 ms.
    """

    def __init__(self) -> None:
        self.size = 0
        self.objects = 0
        self.elements = 0

    def add(self, piece: bytes | bytearray, start: int = 0) -> None:
        """Count one more piece of the line: C{piece} from C{start} on."""
        self.size += len(piece) - start
        self.objects += piece.count(b"{", start) + piece.count(b"[", start)
        self.elements += piece.count(b",", start) + piece.count(b":", start)

    @property
    def bytes(self) -> int:
        """The estimate, in bytes."""
        return 2 * self.size + 160 * self.objects + 64 * self.elements

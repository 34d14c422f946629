"""What a command did, and how its output is captured.

L{CommandResult} is a command's outcome and the ``exec`` answer made from it; L{_Capture}
decodes one output stream and bounds it by the size of its JSON text (and by the agent's memory
budget).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

from pyro_reactor.wire.budget import MemoryBudget, Reservation
from pyro_reactor.wire.dispatch import HeldAnswer
from pyro_reactor.wire.sender import BoundedText

DEFAULT_TIMEOUT_SECONDS = 30
#: The reference's exit code and message for a command that ran out of time.
TIMEOUT_EXIT_CODE = 124

_utf8Decoder = codecs.getincrementaldecoder("utf-8")


@dataclass(frozen=True)
class CommandResult:
    """What a command did: its output (decoded), exit code and how long it took.

    ``exitCode`` is the shell's exit status, or minus the number of the signal that killed it
    (as Python's ``subprocess`` reports it). ``timedOut`` commands keep the output read before
    they were stopped here; the ``exec`` answer replaces it with the reference's text.
    """

    stdout: str
    stderr: str
    exitCode: int
    durationMs: int
    timedOut: bool = False
    timeoutSeconds: float = DEFAULT_TIMEOUT_SECONDS
    stdoutTruncated: bool = False
    stderrTruncated: bool = False
    #: The memory budget's holds on C{stdout} and C{stderr} (with a budget): whoever takes
    #: the output gives them back with L{release}.
    holds: tuple[Reservation, ...] = ()

    def release(self) -> None:
        """Give the output's share of the memory budget back."""
        for hold in self.holds:
            hold.release()

    def heldExecAnswer(self) -> HeldAnswer:
        """L{execAnswer}, its output held from the budget until the answer is encoded."""
        return HeldAnswer(self.execAnswer(), self.release)

    def execAnswer(self) -> dict[str, Any]:
        """The ``exec`` action's answer, in the reference's shape plus the truncation flags."""
        if self.timedOut:
            timeout = self.timeoutSeconds
            shown = int(timeout) if float(timeout).is_integer() else timeout
            return {
                "stdout": "",
                "stderr": f"command timed out after {shown}s",
                "exit_code": TIMEOUT_EXIT_CODE,
                "duration_ms": self.durationMs,
                "stdout_truncated": False,
                "stderr_truncated": False,
            }
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "exit_code": self.exitCode,
            "duration_ms": self.durationMs,
            "stdout_truncated": self.stdoutTruncated,
            "stderr_truncated": self.stderrTruncated,
        }


class _Capture:
    """One output stream: decoded incrementally, bounded by the size of its JSON text.

    ``--max-output-bytes`` holds for the answer as written (16 MiB of invalid bytes, each a
    six-byte ``\\ufffd`` escape, do not make a 100 MB line). Once the bound is reached the
    rest is read and dropped undecoded. With a C{reservation}, what is kept is also drawn from
    the agent's memory budget (a full budget truncates like the bound).
    """

    def __init__(self, limit: int, reservation: Reservation | None = None) -> None:
        self._decoder = _utf8Decoder(errors="replace")
        self._text = BoundedText(max(0, limit), reservation)
        #: What the kept text holds from the memory budget, if anything.
        self.hold = reservation

    @property
    def truncated(self) -> bool:
        return self._text.truncated

    def feed(self, data: bytes) -> None:
        if data and not self._text.truncated:
            self._text.feed(self._decoder.decode(data))

    def text(self) -> str:
        """The stream's text, once it has ended (its hold stays: see L{hold})."""
        self._text.feed(self._decoder.decode(b"", final=True))
        return self._text.take()


def _reserve(budget: MemoryBudget | None, purpose: str) -> Reservation | None:
    return None if budget is None else budget.reserve(0, purpose)

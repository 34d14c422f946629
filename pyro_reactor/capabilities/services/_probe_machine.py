"""The readiness probe machine: runs a check until it passes or the deadline passes.

A service started with a ``readiness`` object is not answered until its probe says it is ready
(or gives up). The probe runs its check at once, then again every ``ready_interval_ms`` after
each failed check, until a check passes or the deadline of ``ready_timeout_seconds`` (counted
from ``start``) passes. A check still running at the deadline is cancelled: the answer never
waits beyond the deadline, and a result that comes in afterwards is a late event the terminal
states ignore. The machine is built in L{_makeProbeMachine} with its states local.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

Check = Callable[[], "Deferred[bool]"]


class ProbeInput(Protocol):
    """The inputs of a readiness probe machine."""

    def start(self) -> None:
        "Run the first check now and start the deadline."

    def stop(self) -> None:
        "Stop polling (the service ended or is being stopped); nothing is reported."

    def _tick(self) -> None:
        "The wait between two checks is over."

    def _passed(self) -> None:
        "The running check says ready."

    def _failed(self) -> None:
        "The running check says not ready (or broke)."

    def _expired(self) -> None:
        "The deadline passed."


@dataclass
class ProbeCore:
    """What a probe needs from the world.

    ``onReady`` / ``onTimeout`` are called once, when the probe reaches ``ready`` or
    ``expired``; never after ``stop``.
    """

    clock: IReactorTime
    check: Check
    interval: float
    timeout: float
    onReady: Callable[[], None]
    onTimeout: Callable[[], None]
    deadline: IDelayedCall | None = None
    attempts: int = 0

    def cancelDeadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None


def _runCheck(probe: ProbeInput, core: ProbeCore) -> Deferred[None]:
    core.attempts += 1
    pending: Deferred[bool] = maybeDeferred(core.check)

    def report(ready: bool) -> None:
        if ready:
            probe._passed()
        else:
            probe._failed()

    def broken(failure: Failure) -> None:
        probe._failed()

    return pending.addCallbacks(report, broken)


def _scheduleTick(probe: ProbeInput, core: ProbeCore) -> IDelayedCall:
    return core.clock.callLater(core.interval, probe._tick)


def _makeProbeMachine() -> Callable[[ProbeCore], ProbeInput]:
    builder = TypeMachineBuilder(ProbeInput, ProbeCore)
    idle = builder.state("idle")
    checking = builder.state("checking", _runCheck)
    waiting = builder.state("waiting", _scheduleTick)
    ready = builder.state("ready")
    expired = builder.state("expired")
    stopped = builder.state("stopped")

    @idle.upon(ProbeInput.start).to(checking)
    def _startDeadline(probe: ProbeInput, core: ProbeCore) -> None:
        core.deadline = core.clock.callLater(core.timeout, probe._expired)

    idle.upon(ProbeInput.stop).to(stopped).returns(None)
    checking.upon(ProbeInput._failed, nodata=True).to(waiting).returns(None)
    waiting.upon(ProbeInput._tick, nodata=True).to(checking).returns(None)

    @checking.upon(ProbeInput._passed).to(ready)
    def _becomeReady(probe: ProbeInput, core: ProbeCore, pending: Deferred[None]) -> None:
        core.cancelDeadline()
        core.onReady()

    @checking.upon(ProbeInput._expired).to(expired)
    def _expireWhileChecking(probe: ProbeInput, core: ProbeCore, pending: Deferred[None]) -> None:
        core.deadline = None
        pending.cancel()
        core.onTimeout()

    @waiting.upon(ProbeInput._expired).to(expired)
    def _expireWhileWaiting(probe: ProbeInput, core: ProbeCore, timer: IDelayedCall) -> None:
        core.deadline = None
        timer.cancel()
        core.onTimeout()

    @checking.upon(ProbeInput.stop).to(stopped)
    def _stopWhileChecking(probe: ProbeInput, core: ProbeCore, pending: Deferred[None]) -> None:
        core.cancelDeadline()
        pending.cancel()

    @waiting.upon(ProbeInput.stop).to(stopped)
    def _stopWhileWaiting(probe: ProbeInput, core: ProbeCore, timer: IDelayedCall) -> None:
        core.cancelDeadline()
        timer.cancel()

    for _busy in (checking, waiting):
        _busy.upon(ProbeInput.start).loop().returns(None)
    # Events that cannot happen (each timer and check belongs to one state and is cancelled when it
    # is left), accepted anyway so that the machine is total.
    for _state, _impossible in (
        (idle, (ProbeInput._tick, ProbeInput._passed, ProbeInput._failed, ProbeInput._expired)),
        (checking, (ProbeInput._tick,)),
        (waiting, (ProbeInput._passed, ProbeInput._failed)),
    ):
        for _input in _impossible:
            _state.upon(_input).loop().returns(None)
    for _terminal in (ready, expired, stopped):
        # A cancelled check reports later; a stop may race the outcome: all of it is ignored.
        for _late in (
            ProbeInput.start,
            ProbeInput.stop,
            ProbeInput._tick,
            ProbeInput._passed,
            ProbeInput._failed,
        ):
            _terminal.upon(_late).loop().returns(None)
        _terminal.upon(ProbeInput._expired).loop().returns(None)
    return builder.build()


#: The built factory (``automat-visualize`` finds it here).
ProbeMachine = _makeProbeMachine()

__all__ = ["Check", "ProbeCore", "ProbeInput", "ProbeMachine"]

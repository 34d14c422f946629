"""The service machine: one per service, the only authority on its lifecycle.

``starting`` while the readiness probe polls, ``running`` once ready, ``stopping`` (SIGTERM
sent to the unit) then ``killing`` (SIGKILL after the grace), ``abandoning`` /
``abandoningKilled`` for a readiness timeout, and the terminal ``failed``, ``exited``,
``stopped``, plus ``detached`` for machines the agent let go of when it stopped (the processes
keep running). See docs/services.md for the diagram.

The runner's exit is an event (``_exited``), and so is the end of a stop (``_drained``:
nothing of the unit is left, seen by pidfd events, see L{units.UnitWatch}): a command that
ignores SIGTERM outlives its runner and gets the SIGKILL.

Questions about the lifecycle are inputs answered per state, as Twisted's ``ClientService``
answers ``whenConnected``: ``whenSettled`` (ready or ended) and ``whenEnded`` return
``succeed(record)`` in a state that has the answer, and otherwise a ``Deferred`` kept in the
core's waiting lists (as ``ClientService`` keeps ``awaitingConnected``), fired by the
transition that settles or ends the service; ``hasEnded`` tells the registry whether a new
service may take the name, ``canStart`` whether a runner may still be spawned (a stop, or
the agent stopping, may come while the registry prepares the files). The machine is built
in L{_makeServiceMachine}, with its states local; L{newService}, L{adoptedService} and
L{endedService} create one in the right state.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pyro_reactor.capabilities.services._probe_machine import ProbeInput
from pyro_reactor.capabilities.services.records import PRIVATE_FIELDS
from pyro_reactor.capabilities.services.units import ServiceProcess, Watch
from pyro_reactor.errors import ActionError

log = Logger(namespace="pyro_reactor.capabilities.services")

#: Seconds between SIGTERM and SIGKILL when a service is stopped.
STOP_GRACE = 5.0

Record = dict[str, Any]


class ServiceInput(Protocol):
    """The inputs of a service machine."""

    def start(self, process: ServiceProcess) -> None:
        "The runner was spawned: record it and wait for readiness."

    def stop(self) -> None:
        "SIGTERM the unit, SIGKILL it after the grace; ends in stopped (or failed)."

    def detach(self) -> None:
        "The agent is stopping: stop watching, leave the processes running."

    def whenSettled(self) -> Deferred[Record]:
        "Fires with the record once the service is ready or has ended."

    def whenEnded(self) -> Deferred[Record]:
        "Fires with the record once the service has ended."

    def hasEnded(self) -> bool:
        "Whether the service has ended (a new one may take its name)."

    def canStart(self) -> bool:
        "Whether a runner may be spawned for this machine (it is still idle)."

    def _ready(self) -> None:
        "The readiness probe passed (or there is none)."

    def _unready(self) -> None:
        "The readiness probe reached its deadline."

    def _exited(self, exitCode: int | None) -> None:
        "The runner ended (C{exitCode} is None after a signal or when nobody recorded it)."

    def _graceOver(self) -> None:
        "The SIGTERM grace is over."

    def _drained(self) -> None:
        "Nothing of the unit is left (while stopping)."


ProbeFactory = Callable[[Callable[[], None], Callable[[], None]], ProbeInput]


@dataclass
class ServiceCore:
    """What a service machine needs from the world, and the record it keeps up to date.

    ``makeProbe(onReady, onTimeout)`` builds the readiness probe (``None``: ready at once);
    ``save(record)`` persists the record.
    """

    clock: IReactorTime
    record: Record
    makeProbe: ProbeFactory | None
    save: Callable[[Record], Deferred[None]]
    now: Callable[[], float] = time.time
    stopGrace: float = STOP_GRACE
    process: ServiceProcess | None = None
    #: The runner's exit code, noted while a stop waits for the rest of the unit.
    exitCode: int | None = None
    settleWaiters: list[Deferred[Record]] = field(default_factory=list)
    endWaiters: list[Deferred[Record]] = field(default_factory=list)
    _savesInFlight: int = 0
    _savedWaiters: list[Deferred[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.record.get("service_name"))

    def snapshot(self) -> Record:
        """The record as answers show it."""
        return {key: value for key, value in self.record.items() if key not in PRIVATE_FIELDS}

    def publish(self, **changes: Any) -> None:
        self.record.update(changes)
        self._savesInFlight += 1
        self.save(dict(self.record)).addBoth(self._saved)

    def _saved(self, result: object) -> None:
        self._savesInFlight -= 1
        if self._savesInFlight == 0:
            waiters, self._savedWaiters = self._savedWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def answer(self) -> Deferred[Record]:
        """The record, once every write of it so far has been tried."""
        if self._savesInFlight == 0:
            return succeed(self.snapshot())
        waiter: Deferred[None] = Deferred()
        self._savedWaiters.append(waiter)
        return waiter.addCallback(lambda _: self.snapshot())

    def waitFor(self, waiters: list[Deferred[Record]]) -> Deferred[Record]:
        waiter: Deferred[Record] = Deferred()
        waiters.append(waiter)
        return waiter

    def settle(self) -> None:
        waiters, self.settleWaiters = self.settleWaiters, []
        for waiter in waiters:
            self.answer().chainDeferred(waiter)

    def finish(self, **changes: Any) -> None:
        """Record the end of the service and answer everyone waiting for it."""
        self.publish(ended_at=self.now(), **changes)
        self.settle()
        waiters, self.endWaiters = self.endWaiters, []
        for waiter in waiters:
            self.answer().chainDeferred(waiter)
        log.info(
            "service {service} ended: {state} ({reason}, exit code {exitCode})",
            service=self.name,
            state=self.record.get("state"),
            reason=self.record.get("stop_reason"),
            exitCode=self.record.get("exit_code"),
        )

    def signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.signal(signum)

    def letGo(self) -> None:
        if self.process is not None:
            self.process.release()
        waiters = self.settleWaiters + self.endWaiters
        self.settleWaiters, self.endWaiters = [], []
        for waiter in waiters:
            waiter.errback(ActionError("the agent is stopping"))


@dataclass
class Launched:
    """The data of ``starting``: the readiness probe, if there is one."""

    probe: ProbeInput | None

    def stopProbe(self) -> None:
        if self.probe is not None:
            self.probe.stop()


@dataclass
class Ending:
    """The data of an ending state: the watch of the unit and the grace timer (if any)."""

    watch: Watch
    grace: IDelayedCall | None = None

    def cancel(self) -> None:
        self.watch.stop()
        if self.grace is not None and self.grace.active():
            self.grace.cancel()
        self.grace = None


def _launched(service: ServiceInput, core: ServiceCore, process: ServiceProcess) -> Launched:
    core.process = process
    core.publish(
        state="running",
        pid=process.pid,
        pid_start_ticks=process.startTicks,
        started_at=core.now(),
        ready_at=None,
        ended_at=None,
        exit_code=None,
        stop_reason=None,
    )
    log.info("service {service} started as pid {pid}", service=core.name, pid=process.pid)
    if core.makeProbe is None:
        service._ready()
        return Launched(None)
    probe = core.makeProbe(service._ready, service._unready)
    probe.start()
    return Launched(probe)


def _watch(service: ServiceInput, core: ServiceCore) -> Watch:
    process = core.process
    if process is None:
        service._drained()
        return _NoWatch()
    return process.watchUnit(service._drained)


class _NoWatch:
    def checkNow(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _terminate(service: ServiceInput, core: ServiceCore) -> Ending:
    core.signal(signal.SIGTERM)
    grace = core.clock.callLater(core.stopGrace, service._graceOver)
    return Ending(_watch(service, core), grace)


def _kill(service: ServiceInput, core: ServiceCore) -> Ending:
    core.signal(signal.SIGKILL)
    return Ending(_watch(service, core))


@dataclass(frozen=True)
class ServiceMachines:
    """The built machine factory, and constructors of a machine in the right state."""

    factory: Callable[..., ServiceInput]
    new: Callable[[ServiceCore], ServiceInput]
    adopted: Callable[[ServiceCore, ServiceProcess], ServiceInput]
    ended: Callable[[ServiceCore, str], ServiceInput]
    terminalStates: frozenset[str]


def _makeServiceMachine() -> ServiceMachines:
    builder = TypeMachineBuilder(ServiceInput, ServiceCore)
    idle = builder.state("idle")
    starting = builder.state("starting", _launched)
    running = builder.state("running")
    stopping = builder.state("stopping", _terminate)
    killing = builder.state("killing", _kill)
    abandoning = builder.state("abandoning", _terminate)
    abandoningKilled = builder.state("abandoningKilled", _kill)
    failed = builder.state("failed")
    exited = builder.state("exited")
    stopped = builder.state("stopped")
    detached = builder.state("detached")

    terminal = {"failed": failed, "exited": exited, "stopped": stopped}
    ending = (stopping, killing, abandoning, abandoningKilled)

    idle.upon(ServiceInput.start).to(starting).returns(None)

    @idle.upon(ServiceInput.stop).to(stopped)
    def _stopBeforeStart(service: ServiceInput, core: ServiceCore) -> None:
        core.finish(state="stopped")

    @idle.upon(ServiceInput.detach).to(detached)
    def _detachIdle(service: ServiceInput, core: ServiceCore) -> None:
        core.letGo()

    @starting.upon(ServiceInput._ready).to(running)
    def _becomeReady(service: ServiceInput, core: ServiceCore, launched: Launched) -> None:
        core.publish(ready_at=core.now())
        core.settle()
        log.info("service {service} is ready", service=core.name)

    @starting.upon(ServiceInput._exited).to(failed)
    def _exitBeforeReady(
        service: ServiceInput, core: ServiceCore, launched: Launched, exitCode: int | None
    ) -> None:
        launched.stopProbe()
        core.finish(state="failed", stop_reason="process_exited_before_ready", exit_code=exitCode)

    @starting.upon(ServiceInput._unready).to(abandoning)
    def _readinessTimedOut(service: ServiceInput, core: ServiceCore, launched: Launched) -> None:
        launched.stopProbe()
        log.info("service {service} was not ready in time", service=core.name)

    @starting.upon(ServiceInput.stop).to(stopping)
    def _stopWhileStarting(service: ServiceInput, core: ServiceCore, launched: Launched) -> None:
        launched.stopProbe()

    @starting.upon(ServiceInput.detach).to(detached)
    def _detachStarting(service: ServiceInput, core: ServiceCore, launched: Launched) -> None:
        launched.stopProbe()
        core.letGo()

    running.upon(ServiceInput.stop).to(stopping).returns(None)

    @running.upon(ServiceInput._exited).to(exited)
    def _exitAfterReady(service: ServiceInput, core: ServiceCore, exitCode: int | None) -> None:
        core.finish(state="exited", exit_code=exitCode)

    @running.upon(ServiceInput.detach).to(detached)
    def _detachRunning(service: ServiceInput, core: ServiceCore) -> None:
        core.letGo()

    @stopping.upon(ServiceInput._graceOver).to(killing)
    @abandoning.upon(ServiceInput._graceOver).to(abandoningKilled)
    def _graceIsOver(service: ServiceInput, core: ServiceCore, ending_: Ending) -> None:
        ending_.grace = None
        ending_.cancel()

    def _recordExit(
        service: ServiceInput, core: ServiceCore, ending_: Ending, exitCode: int | None
    ) -> None:
        core.exitCode = exitCode
        ending_.watch.checkNow()

    def _detachEnding(service: ServiceInput, core: ServiceCore, ending_: Ending) -> None:
        ending_.cancel()
        core.letGo()

    for state in ending:
        # The runner's exit is only noted: the stop ends when the whole unit is gone.
        state.upon(ServiceInput._exited).loop()(_recordExit)
        state.upon(ServiceInput.detach).to(detached)(_detachEnding)

    def _drainedAs(state: str, reason: str) -> Callable[[ServiceInput, ServiceCore, Ending], None]:
        def drained(service: ServiceInput, core: ServiceCore, ending_: Ending) -> None:
            ending_.cancel()
            core.finish(state=state, stop_reason=reason, exit_code=core.exitCode)

        drained.__name__ = f"ended_{state}_{reason}"
        return drained

    stopping.upon(ServiceInput._drained).to(stopped)(_drainedAs("stopped", "sigterm"))
    killing.upon(ServiceInput._drained).to(stopped)(_drainedAs("stopped", "sigkill"))
    abandoning.upon(ServiceInput._drained).to(failed)(_drainedAs("failed", "readiness_timeout"))
    abandoningKilled.upon(ServiceInput._drained).to(failed)(
        _drainedAs("failed", "readiness_timeout")
    )

    # -- questions, answered per state ---------------------------------------------------
    def _answer(service: ServiceInput, core: ServiceCore) -> Deferred[Record]:
        return core.answer()

    def _awaitSettled(service: ServiceInput, core: ServiceCore) -> Deferred[Record]:
        return core.waitFor(core.settleWaiters)

    def _awaitEnded(service: ServiceInput, core: ServiceCore) -> Deferred[Record]:
        return core.waitFor(core.endWaiters)

    def _refuse(service: ServiceInput, core: ServiceCore) -> Deferred[Record]:
        return fail(ActionError("the agent is stopping"))

    # Plain states, then states with data (whose outputs here do not need it).
    plain: list[tuple[Any, Any, Any, bool]] = [
        (idle, _awaitSettled, _awaitEnded, False),
        (running, _answer, _awaitEnded, False),
        *[(state, _answer, _answer, True) for state in terminal.values()],
        (detached, _refuse, _refuse, False),
    ]
    for state, settledOutput, endedOutput, hasEnded in plain:
        state.upon(ServiceInput.whenSettled).loop()(settledOutput)
        state.upon(ServiceInput.whenEnded).loop()(endedOutput)
        state.upon(ServiceInput.hasEnded).loop().returns(hasEnded)
    notIdle: list[Any] = [running, *terminal.values(), detached]
    for state in notIdle:
        state.upon(ServiceInput.canStart).loop().returns(False)
    idle.upon(ServiceInput.canStart).loop().returns(True)
    withData: list[Any] = [starting, *ending]
    for state in withData:
        state.upon(ServiceInput.whenSettled, nodata=True).loop()(_awaitSettled)
        state.upon(ServiceInput.whenEnded, nodata=True).loop()(_awaitEnded)
        state.upon(ServiceInput.hasEnded, nodata=True).loop().returns(False)
        state.upon(ServiceInput.canStart, nodata=True).loop().returns(False)

    # -- late or repeated events, explicitly ignored -------------------------------------
    late = (
        ServiceInput.start,
        ServiceInput.stop,
        ServiceInput.detach,
        ServiceInput._ready,
        ServiceInput._unready,
        ServiceInput._exited,
        ServiceInput._graceOver,
        ServiceInput._drained,
    )
    ignored: list[tuple[Any, tuple[Callable[..., None], ...]]] = [
        (idle, (ServiceInput._ready, ServiceInput._unready, ServiceInput._graceOver)),
        (idle, (ServiceInput._exited, ServiceInput._drained)),
        (starting, (ServiceInput.start, ServiceInput._graceOver, ServiceInput._drained)),
        (running, (ServiceInput.start, ServiceInput._ready, ServiceInput._unready)),
        (running, (ServiceInput._graceOver, ServiceInput._drained)),
        (killing, (ServiceInput._graceOver,)),
        (abandoningKilled, (ServiceInput._graceOver,)),
        *[(state, late) for state in (failed, exited, stopped, detached)],
    ]
    for state in ending:
        ignored.append((state, (ServiceInput.start, ServiceInput.stop, ServiceInput._ready)))
        ignored.append((state, (ServiceInput._unready,)))
    for state, inputs in ignored:
        for input_ in inputs:
            state.upon(input_).loop().returns(None)

    factory = builder.build()

    def new(core: ServiceCore) -> ServiceInput:
        return factory(core)

    def adopted(core: ServiceCore, process: ServiceProcess) -> ServiceInput:
        core.process = process
        return factory(core, running)

    def ended(core: ServiceCore, state: str) -> ServiceInput:
        return factory(core, terminal[state])

    return ServiceMachines(factory, new, adopted, ended, frozenset(terminal))


_machines = _makeServiceMachine()
#: The built factory (``automat-visualize`` finds it here).
ServiceMachine = _machines.factory
#: A machine for a service about to be spawned (``idle``).
newService = _machines.new
#: A machine for a live service an earlier agent started (``running``).
adoptedService = _machines.adopted
#: A machine for a service recorded as ended (C{state}: ``failed``, ``exited``, ``stopped``).
endedService = _machines.ended
TERMINAL_STATES = _machines.terminalStates

__all__ = [
    "STOP_GRACE",
    "TERMINAL_STATES",
    "ServiceCore",
    "ServiceInput",
    "ServiceMachine",
    "adoptedService",
    "endedService",
    "newService",
]

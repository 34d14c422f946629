"""The lifecycle of one job, alone: L{JobMachine} (diagram in docs/jobs.md).

``idle`` → ``starting`` (the runner is spawned, its report of the command's pid awaited) →
``running`` → ``ending`` (the runner has exited: its exit record, the usage and the final
output sizes are being collected) → ``exited`` → ``removed``. A job taken back after an agent
restart enters ``running`` (``adopt``) or ``ending`` (``adoptEnded``) directly. Every outside
event is an input; the machine's L{JobCore} does the world's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime


class JobInputs(Protocol):
    """What can happen to a job."""

    def start(self) -> None:
        "Spawn the runner."

    def adopt(self) -> None:
        "Take back a job an earlier agent started, whose runner still runs."

    def adoptEnded(self) -> None:
        "Take back a job whose runner ended while no agent watched."

    def restore(self) -> None:
        "Take back a job whose end an earlier agent recorded."

    def signal(self, signum: int) -> bool:
        "Send a signal to every process of the job; False once it has ended."

    def remove(self) -> bool:
        "Forget an ended job; False while it runs."

    def state(self) -> str:
        "The public state: ``running`` or ``exited`` (``removed`` once forgotten)."

    def whenStarted(self) -> Deferred[None]:
        "Fires once the command runs (or the job has ended)."

    def whenEnded(self) -> Deferred[None]:
        "Fires once the job has ended and its exit is recorded."

    def _started(self, pid: int) -> None:
        "The runner reported the command's pid."

    def _runnerExited(self) -> None:
        "The runner ended (the main process ended and its leftovers are killed)."

    def _collected(self, outcome: dict[str, Any]) -> None:
        "The exit record, usage and final sizes are known."


@dataclass
class JobCore:
    """What a job machine needs from the world.

    ``launch()`` spawns the runner (its report comes back as ``_started``, its end as
    ``_runnerExited``); ``collect()`` gathers the outcome (``exit_code``, ``signal``,
    ``timed_out``, ``oom_killed``, ``ended_at``, ``usage``, byte counts); ``deliver(signum)``
    signals the job's processes; ``ended(outcome)`` records the end; ``forget()`` removes the
    job's files.
    """

    clock: IReactorTime
    launch: Callable[[], None]
    collect: Callable[[], Deferred[dict[str, Any]]]
    deliver: Callable[[int], bool]
    started: Callable[[int], None]
    ended: Callable[[dict[str, Any]], None]
    forget: Callable[[], None]
    startWaiters: list[Deferred[None]] = field(default_factory=list)
    endWaiters: list[Deferred[None]] = field(default_factory=list)


def _fire(core: JobCore, waiters: list[Deferred[None]]) -> None:
    """Fire C{waiters} once the transition is over (they may ask the machine questions)."""
    pending = waiters[:]
    del waiters[:]

    def fire() -> None:
        for waiter in pending:
            waiter.callback(None)

    if pending:
        core.clock.callLater(0, fire)


def _makeJobMachine() -> Callable[[JobCore], JobInputs]:
    builder = TypeMachineBuilder(JobInputs, JobCore)
    idle = builder.state("idle")
    starting = builder.state("starting")
    running = builder.state("running")
    ending = builder.state("ending")
    exited = builder.state("exited")
    removed = builder.state("removed")

    @idle.upon(JobInputs.start).to(starting)
    def _launch(job: JobInputs, core: JobCore) -> None:
        core.launch()

    idle.upon(JobInputs.adopt).to(running).returns(None)
    idle.upon(JobInputs.restore).to(exited).returns(None)

    @idle.upon(JobInputs.adoptEnded).to(ending)
    def _adoptEnded(job: JobInputs, core: JobCore) -> None:
        _collect(job, core)

    @starting.upon(JobInputs._started).to(running)
    def _run(job: JobInputs, core: JobCore, pid: int) -> None:
        core.started(pid)
        _fire(core, core.startWaiters)

    def _collect(job: JobInputs, core: JobCore) -> None:
        core.collect().addCallback(job._collected)

    @starting.upon(JobInputs._runnerExited).to(ending)
    def _endBeforeStart(job: JobInputs, core: JobCore) -> None:
        _fire(core, core.startWaiters)
        _collect(job, core)

    @running.upon(JobInputs._runnerExited).to(ending)
    def _end(job: JobInputs, core: JobCore) -> None:
        _collect(job, core)

    @ending.upon(JobInputs._collected).to(exited)
    def _record(job: JobInputs, core: JobCore, outcome: dict[str, Any]) -> None:
        core.ended(outcome)
        _fire(core, core.endWaiters)

    for live in (starting, running):

        @live.upon(JobInputs.signal).loop()
        def _deliver(job: JobInputs, core: JobCore, signum: int) -> bool:
            return core.deliver(signum)

    for over in (ending, exited, removed):
        over.upon(JobInputs.signal).loop().returns(False)

    for busy in (idle, starting, running, ending):
        busy.upon(JobInputs.remove).loop().returns(False)
        busy.upon(JobInputs.state).loop().returns("running")

    @exited.upon(JobInputs.remove).to(removed)
    def _forget(job: JobInputs, core: JobCore) -> bool:
        core.forget()
        return True

    removed.upon(JobInputs.remove).loop().returns(False)
    exited.upon(JobInputs.state).loop().returns("exited")
    removed.upon(JobInputs.state).loop().returns("removed")

    for state in (idle, starting):

        @state.upon(JobInputs.whenStarted).loop()
        def _waitStart(job: JobInputs, core: JobCore) -> Deferred[None]:
            waiter: Deferred[None] = Deferred()
            core.startWaiters.append(waiter)
            return waiter

    for state in (running, ending, exited, removed):

        @state.upon(JobInputs.whenStarted).loop()
        def _hasStarted(job: JobInputs, core: JobCore) -> Deferred[None]:
            return succeed(None)

    for state in (idle, starting, running, ending):

        @state.upon(JobInputs.whenEnded).loop()
        def _waitEnd(job: JobInputs, core: JobCore) -> Deferred[None]:
            waiter: Deferred[None] = Deferred()
            core.endWaiters.append(waiter)
            return waiter

    for state in (exited, removed):

        @state.upon(JobInputs.whenEnded).loop()
        def _hasEnded(job: JobInputs, core: JobCore) -> Deferred[None]:
            return succeed(None)

    # Late or repeated events, explicitly ignored.
    for state in (starting, running, ending, exited, removed):
        for late in (JobInputs.start, JobInputs.adopt, JobInputs.adoptEnded, JobInputs.restore):
            state.upon(late).loop().returns(None)
    for state in (idle, running, ending, exited, removed):
        state.upon(JobInputs._started).loop().returns(None)
    for state in (idle, ending, exited, removed):
        state.upon(JobInputs._runnerExited).loop().returns(None)
    for state in (idle, starting, running, exited, removed):
        state.upon(JobInputs._collected).loop().returns(None)

    return builder.build()


JobMachine = _makeJobMachine()

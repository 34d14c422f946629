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


class JobInput(Protocol):
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


def _makeJobMachine() -> Callable[[JobCore], JobInput]:
    builder = TypeMachineBuilder(JobInput, JobCore)
    idle = builder.state("idle")
    starting = builder.state("starting")
    running = builder.state("running")
    ending = builder.state("ending")
    exited = builder.state("exited")
    removed = builder.state("removed")

    @idle.upon(JobInput.start).to(starting)
    def _launch(job: JobInput, core: JobCore) -> None:
        core.launch()

    idle.upon(JobInput.adopt).to(running).returns(None)
    idle.upon(JobInput.restore).to(exited).returns(None)

    @idle.upon(JobInput.adoptEnded).to(ending)
    def _adoptEnded(job: JobInput, core: JobCore) -> None:
        _collect(job, core)

    @starting.upon(JobInput._started).to(running)
    def _run(job: JobInput, core: JobCore, pid: int) -> None:
        core.started(pid)
        _fire(core, core.startWaiters)

    def _collect(job: JobInput, core: JobCore) -> None:
        core.collect().addCallback(job._collected)

    @starting.upon(JobInput._runnerExited).to(ending)
    def _endBeforeStart(job: JobInput, core: JobCore) -> None:
        _fire(core, core.startWaiters)
        _collect(job, core)

    @running.upon(JobInput._runnerExited).to(ending)
    def _end(job: JobInput, core: JobCore) -> None:
        _collect(job, core)

    @ending.upon(JobInput._collected).to(exited)
    def _record(job: JobInput, core: JobCore, outcome: dict[str, Any]) -> None:
        core.ended(outcome)
        _fire(core, core.endWaiters)

    for live in (starting, running):

        @live.upon(JobInput.signal).loop()
        def _deliver(job: JobInput, core: JobCore, signum: int) -> bool:
            return core.deliver(signum)

    for over in (ending, exited, removed):
        over.upon(JobInput.signal).loop().returns(False)

    for busy in (idle, starting, running, ending):
        busy.upon(JobInput.remove).loop().returns(False)
        busy.upon(JobInput.state).loop().returns("running")

    @exited.upon(JobInput.remove).to(removed)
    def _forget(job: JobInput, core: JobCore) -> bool:
        core.forget()
        return True

    removed.upon(JobInput.remove).loop().returns(False)
    exited.upon(JobInput.state).loop().returns("exited")
    removed.upon(JobInput.state).loop().returns("removed")

    for state in (idle, starting):

        @state.upon(JobInput.whenStarted).loop()
        def _waitStart(job: JobInput, core: JobCore) -> Deferred[None]:
            waiter: Deferred[None] = Deferred()
            core.startWaiters.append(waiter)
            return waiter

    for state in (running, ending, exited, removed):

        @state.upon(JobInput.whenStarted).loop()
        def _hasStarted(job: JobInput, core: JobCore) -> Deferred[None]:
            return succeed(None)

    for state in (idle, starting, running, ending):

        @state.upon(JobInput.whenEnded).loop()
        def _waitEnd(job: JobInput, core: JobCore) -> Deferred[None]:
            waiter: Deferred[None] = Deferred()
            core.endWaiters.append(waiter)
            return waiter

    for state in (exited, removed):

        @state.upon(JobInput.whenEnded).loop()
        def _hasEnded(job: JobInput, core: JobCore) -> Deferred[None]:
            return succeed(None)

    # Late or repeated events, explicitly ignored.
    for state in (starting, running, ending, exited, removed):
        for late in (JobInput.start, JobInput.adopt, JobInput.adoptEnded, JobInput.restore):
            state.upon(late).loop().returns(None)
    for state in (idle, running, ending, exited, removed):
        state.upon(JobInput._started).loop().returns(None)
    for state in (idle, ending, exited, removed):
        state.upon(JobInput._runnerExited).loop().returns(None)
    for state in (idle, starting, running, exited, removed):
        state.upon(JobInput._collected).loop().returns(None)

    return builder.build()


JobMachine = _makeJobMachine()

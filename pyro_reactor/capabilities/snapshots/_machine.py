"""The freeze lifecycle of the guest: one machine, from ``quiesce`` to ``thaw``.

States: ``thawed`` (nothing frozen), ``freezing`` (the work of a ``quiesce`` runs),
``frozen`` (the auto-thaw timer is armed: its data), ``thawing``. Each input carries the
``Deferred`` its caller waits on (``reply``), so every answer comes from the state the machine
is in when the request arrives, and nothing ever waits on a state that will not end:

  - a second ``quiesce`` while freezing, frozen or thawing is answered at once with an error;
  - a ``thaw`` while freezing waits for the freeze to finish, then thaws (the ``quiesce`` is
    answered with what it froze, the ``thaw`` with what it thawed): the guest is never left
    frozen by a thaw that came too early;
  - a ``thaw`` while thawing gets the answer of the thaw in progress;
  - a ``thaw`` while thawed answers that nothing was thawed;
  - the auto-thaw timer is a ``thaw`` whose answer is logged.

The work itself (L{pyro_reactor.capabilities.snapshots.freeze.FreezeWork}) comes through
L{FreezerCore}, so tests drive the machine with fakes and a C{Clock}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.snapshots.freeze import NOTHING_THAWED, FreezePlan, Frozen
from pyro_reactor.errors import ActionError

log = Logger(namespace="pyro_reactor.capabilities.snapshots")

Reply = Deferred[dict[str, Any]]


class FreezerInput(Protocol):
    """The inputs of the freeze machine."""

    def quiesce(self, plan: FreezePlan, reply: Reply) -> None:
        "Freeze what the plan names; C{reply} fires with the ``quiesce`` answer."

    def thaw(self, reply: Reply) -> None:
        "Thaw everything frozen; C{reply} fires with the ``thaw`` answer."

    def _frozen(self, frozen: Frozen) -> None:
        "The freeze work finished."

    def _freezeFailed(self, failure: Failure) -> None:
        "The freeze work failed (and undid what it had frozen)."

    def _thawed(self, answer: dict[str, Any]) -> None:
        "The thaw work finished."


@dataclass
class FreezerCore:
    """The machine's world: a clock for the auto-thaw timer, and the work to do."""

    clock: IReactorTime
    freeze: Callable[[FreezePlan], Deferred[Frozen]]
    thaw: Callable[[Frozen], Deferred[dict[str, Any]]]


@dataclass
class Freezing:
    """Data of ``freezing``: the quiesce's reply, and thaws that arrived meanwhile."""

    reply: Reply
    thawReplies: list[Reply] = field(default_factory=list)


@dataclass
class Held:
    """Data of ``frozen``: what is frozen, and the timer that thaws it by itself."""

    frozen: Frozen
    timer: IDelayedCall


@dataclass
class Thawing:
    """Data of ``thawing``: every reply waiting for the thaw in progress."""

    replies: list[Reply]


def _autoThawReply() -> Reply:
    reply: Reply = Deferred()
    reply.addCallback(
        lambda answer: log.warn(
            "thawed by the quiesce timeout: {thawed}, {jobs_thawed} jobs",
            thawed=answer["thawed"],
            jobs_thawed=answer["jobs_thawed"],
        )
    )
    return reply


def _isoTime(unixTime: float) -> str:
    return datetime.fromtimestamp(unixTime, UTC).isoformat(timespec="seconds")


def _makeFreezerMachine() -> TypeMachine[FreezerInput, FreezerCore]:
    builder = TypeMachineBuilder(FreezerInput, FreezerCore)

    def startFreezing(
        freezer: FreezerInput, core: FreezerCore, plan: FreezePlan, reply: Reply
    ) -> Freezing:
        work = core.freeze(plan)
        work.addCallbacks(freezer._frozen, freezer._freezeFailed)
        return Freezing(reply)

    def armAutoThaw(freezer: FreezerInput, core: FreezerCore, frozen: Frozen) -> Held:
        timer = core.clock.callLater(frozen.timeout, freezer.thaw, _autoThawReply())
        return Held(frozen, timer)

    def collectReplies(freezer: FreezerInput, core: FreezerCore, reply: Reply) -> Thawing:
        return Thawing([reply])

    thawed = builder.state("thawed")
    freezing = builder.state("freezing", startFreezing)
    frozen = builder.state("frozen", armAutoThaw)
    thawing = builder.state("thawing", collectReplies)

    thawed.upon(FreezerInput.quiesce).to(freezing).returns(None)

    @thawed.upon(FreezerInput.thaw).loop()
    def nothingToThaw(freezer: FreezerInput, core: FreezerCore, reply: Reply) -> None:
        reply.callback(dict(NOTHING_THAWED, thawed=[]))

    @freezing.upon(FreezerInput.quiesce).loop()
    def alreadyFreezing(
        freezer: FreezerInput, core: FreezerCore, state: Freezing, plan: FreezePlan, reply: Reply
    ) -> None:
        reply.errback(ActionError("a quiesce is already in progress"))

    @freezing.upon(FreezerInput.thaw).loop()
    def thawWhenFrozen(
        freezer: FreezerInput, core: FreezerCore, state: Freezing, reply: Reply
    ) -> None:
        state.thawReplies.append(reply)

    @freezing.upon(FreezerInput._frozen).to(frozen)
    def answerQuiesce(
        freezer: FreezerInput, core: FreezerCore, state: Freezing, frozen: Frozen
    ) -> None:
        state.reply.callback(frozen.answer())
        for reply in state.thawReplies:
            freezer.thaw(reply)  # runs once this transition is over, from ``frozen``

    @freezing.upon(FreezerInput._freezeFailed).to(thawed)
    def refuseQuiesce(
        freezer: FreezerInput, core: FreezerCore, state: Freezing, failure: Failure
    ) -> None:
        state.reply.errback(failure)
        for reply in state.thawReplies:
            reply.callback(dict(NOTHING_THAWED, thawed=[]))

    @frozen.upon(FreezerInput.quiesce).loop()
    def alreadyFrozen(
        freezer: FreezerInput, core: FreezerCore, state: Held, plan: FreezePlan, reply: Reply
    ) -> None:
        names = ", ".join(state.frozen.answer()["frozen"]) or "no mount"
        reply.errback(
            ActionError(
                f"already quiesced ({names}; {state.frozen.jobsFrozen} jobs) until"
                f" {_isoTime(state.frozen.deadline)}: thaw first"
            )
        )

    @frozen.upon(FreezerInput.thaw).to(thawing)
    def startThawing(freezer: FreezerInput, core: FreezerCore, state: Held, reply: Reply) -> None:
        if state.timer.active():
            state.timer.cancel()
        core.thaw(state.frozen).addCallback(freezer._thawed)

    @thawing.upon(FreezerInput.quiesce).loop()
    def stillThawing(
        freezer: FreezerInput, core: FreezerCore, state: Thawing, plan: FreezePlan, reply: Reply
    ) -> None:
        reply.errback(ActionError("a thaw is in progress: quiesce again once it has answered"))

    @thawing.upon(FreezerInput.thaw).loop()
    def joinThaw(freezer: FreezerInput, core: FreezerCore, state: Thawing, reply: Reply) -> None:
        state.replies.append(reply)

    @thawing.upon(FreezerInput._thawed).to(thawed)
    def answerThaw(
        freezer: FreezerInput, core: FreezerCore, state: Thawing, answer: dict[str, Any]
    ) -> None:
        for reply in state.replies:
            reply.callback(answer)

    return builder.build()


FreezerMachine = _makeFreezerMachine()

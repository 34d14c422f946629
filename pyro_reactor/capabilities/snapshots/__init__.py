"""Snapshot-safe guests: ``restored`` after a restore, ``quiesce``/``thaw`` around a snapshot.

The capability builds one L{FreezerMachine} (the guest's freeze lifecycle) and one
L{Restorer}; the kernel calls go through a L{GuestKernel} (the real one unless a test gives a
fake). Its service thaws whatever is frozen when the agent stops: an agent that goes away never
leaves the guest frozen. See docs/snapshots.md for what a host does around a snapshot.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from pyro_reactor.capabilities.snapshots._machine import FreezerCore, FreezerInput, FreezerMachine
from pyro_reactor.capabilities.snapshots.freeze import FreezeWork, parseQuiesce
from pyro_reactor.capabilities.snapshots.kernel import GuestKernel, LinuxKernel
from pyro_reactor.capabilities.snapshots.restore import RestoreCore, Restorer, parseRestored
from pyro_reactor.context import AgentContext
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request


class _ThawOnStop(Service):
    def __init__(self, thaw: Any) -> None:
        self._thaw = thaw

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        result: Deferred[Any] = self._thaw()
        return result


class SnapshotsCapability:
    """``restored``, ``quiesce`` and ``thaw``; ``ping`` lists the feature ``"snapshot"``."""

    features = ("snapshot",)

    def __init__(self, context: AgentContext, kernel: GuestKernel | None = None) -> None:
        self._context = context
        self._kernel: GuestKernel = kernel if kernel is not None else LinuxKernel()
        work = FreezeWork(
            kernel=self._kernel,
            freezables=lambda: context.hooks.freezables,
            inThread=context.inThread,
            wallclock=context.reactor.seconds,
        )
        self.freezer: FreezerInput = FreezerMachine(
            FreezerCore(clock=context.reactor, freeze=work.freeze, thaw=work.thaw)
        )
        self.restorer = Restorer(
            RestoreCore(
                reactor=context.reactor,
                kernel=self._kernel,
                stateDir=context.config.stateDir,
                inThread=context.inThread,
                thaw=self.thaw,
                rechecks=lambda: context.hooks.readinessRechecks,
                shiftStart=self._shiftStart,
            )
        )
        self.service = _ThawOnStop(self.thaw)
        self.actions = [
            Action("restored", self._restored),
            Action("quiesce", self._quiesce),
            Action("thaw", lambda request: self.thaw()),
        ]

    def thaw(self) -> Deferred[dict[str, Any]]:
        """Thaw what is frozen (nothing is not an error): the ``thaw`` answer."""
        reply: Deferred[dict[str, Any]] = Deferred()
        self.freezer.thaw(reply)
        return reply

    def _quiesce(self, request: Request) -> Deferred[dict[str, Any]]:
        config = self._context.config
        plan = parseQuiesce(request, self._kernel, config.workspace, config.stateDir)
        reply: Deferred[dict[str, Any]] = Deferred()
        self.freezer.quiesce(plan, reply)
        return reply

    def _restored(self, request: Request) -> Deferred[dict[str, Any]]:
        return self.restorer.restore(parseRestored(request))

    def _shiftStart(self, jump: float) -> None:
        self._context.startedAt += jump

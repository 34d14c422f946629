"""L{ExecCapability}: the ``exec`` action, served with L{runCommand}."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from pyro_reactor.capabilities.execute.command import runCommand
from pyro_reactor.capabilities.execute.result import DEFAULT_TIMEOUT_SECONDS, CommandResult
from pyro_reactor.capabilities.execute.units import RunningCommands
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.processes import probeChdirProgram
from pyro_reactor.system.unitcgroups import unitCgroups
from pyro_reactor.wire.dispatch import Action, HeldAnswer
from pyro_reactor.wire.request import Request


class ExecCapability:
    """The ``exec`` action (also what a request without an ``action`` field runs).

    Its service is the set of exec commands in flight, ended when the agent stops.
    """

    features: tuple[str, ...] = ()

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self.service = RunningCommands(context.reactor)
        # Found out once, off the reactor; children with a working directory fork until then.
        context.inThread(probeChdirProgram)
        self.actions = [Action("exec", self._execute)]

    def _execute(self, request: Request) -> Deferred[HeldAnswer]:
        command = request.string("command", "")
        timeoutSeconds = request.integer("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
        env = request.environment("exec")
        if "\x00" in command:
            raise ActionError("command must not contain NUL bytes")
        result = runCommand(
            self._context.reactor,
            command,
            timeoutSeconds=timeoutSeconds,
            env=env,
            maxOutputBytes=self._context.config.maxOutputBytes,
            running=self.service.groups,
            budget=self._context.budget,
            cgroups=unitCgroups(),
            units=self.service.units,
        )
        return result.addCallback(CommandResult.heldExecAnswer)

"""Assembles the agent: the dispatcher with every capability's actions, and its factory.

The list of capability modules lives here and only here. Each module exposes
``actions(context) -> list[Action]``; a module with something to start or stop (shell and
service registries) attaches a child service to ``context.services``.
"""

from __future__ import annotations

from pyro_reactor import archives, execute, files, services, shells
from pyro_reactor.context import AgentContext
from pyro_reactor.dispatch import Dispatcher
from pyro_reactor.ping import pingAction
from pyro_reactor.protocol import RequestFactory

CAPABILITIES = (execute, files, archives, shells, services)


def buildDispatcher(context: AgentContext) -> Dispatcher:
    config = context.config
    for root in (config.shellRoot, config.serviceRoot, config.secretRoot, config.spoolRoot):
        root.mkdir(parents=True, exist_ok=True)
    dispatcher = Dispatcher(
        spoolDirectory=config.spoolRoot,
        maxUploadBytes=config.maxArchiveBytes,
        clock=context.reactor.seconds,
    )
    dispatcher.register([pingAction(context, dispatcher.actionNames)])
    for capability in CAPABILITIES:
        dispatcher.register(capability.actions(context))
    return dispatcher


def buildFactory(context: AgentContext) -> RequestFactory:
    """The protocol factory every listening endpoint of the agent shares."""
    config = context.config
    return RequestFactory(
        buildDispatcher(context),
        context.reactor,
        config.spoolRoot,
        maxRequestBytes=config.maxRequestBytes,
        timeout=config.requestTimeout,
        encodeInThread=context.inThread,
    )

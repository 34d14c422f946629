"""Assembles the agent: every capability, the dispatcher of their actions, and its factory.

The list of capabilities lives here and only here. Each entry is built once from the
L{AgentContext} into a L{Capability}: its actions are registered with the dispatcher, its
features are announced by ``ping``, and its service (if any) joins ``context.services``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyro_reactor.capabilities.archives import ArchivesCapability
from pyro_reactor.capabilities.base import Capability
from pyro_reactor.capabilities.execute import ExecCapability
from pyro_reactor.capabilities.files import FilesCapability
from pyro_reactor.capabilities.jobs import JobsCapability
from pyro_reactor.capabilities.ping import PingCapability
from pyro_reactor.capabilities.ports import PortsCapability
from pyro_reactor.capabilities.services import ServicesCapability
from pyro_reactor.capabilities.shells import ShellsCapability
from pyro_reactor.capabilities.snapshots import SnapshotsCapability
from pyro_reactor.capabilities.stats import StatsCapability
from pyro_reactor.capabilities.watch import WatchCapability
from pyro_reactor.context import AgentContext
from pyro_reactor.wire.dispatch import Dispatcher
from pyro_reactor.wire.protocol import RequestFactory, WireLimits
from pyro_reactor.wire.spool import emptySpool

CAPABILITIES: Sequence[Callable[[AgentContext], Capability]] = (
    ExecCapability,
    FilesCapability,
    ArchivesCapability,
    ShellsCapability,
    ServicesCapability,
    PortsCapability,
    WatchCapability,
    SnapshotsCapability,
    StatsCapability,
    JobsCapability,
)


def buildDispatcher(context: AgentContext) -> Dispatcher:
    """Build every capability and register its actions; attach their services to the agent."""
    config = context.config
    for root in (config.shellRoot, config.serviceRoot, config.secretRoot, config.spoolRoot):
        root.mkdir(parents=True, exist_ok=True)
    emptySpool(config.spoolRoot)
    dispatcher = Dispatcher(
        spoolDirectory=config.spoolRoot,
        maxUploadBytes=config.maxArchiveBytes,
        clock=context.reactor.seconds,
    )
    capabilities = [make(context) for make in CAPABILITIES]

    def features() -> list[str]:
        return sorted({name for capability in capabilities for name in capability.features})

    for capability in [PingCapability(context, dispatcher.actionNames, features), *capabilities]:
        dispatcher.register(capability.actions)
        if capability.service is not None:
            capability.service.setServiceParent(context.services)
    return dispatcher


def buildFactory(context: AgentContext) -> RequestFactory:
    """The protocol factory every listening endpoint of the agent shares."""
    config = context.config
    factory = RequestFactory(
        buildDispatcher(context),
        context.reactor,
        config.spoolRoot,
        maxRequestBytes=config.maxRequestBytes,
        timeout=config.requestTimeout,
        encodeInThread=context.inThread,
        limits=WireLimits(
            answerTimeout=config.answerTimeout,
            minUploadRate=config.minUploadRate,
            maxConnections=connectionCap(config.maxConnections),
        ),
        budget=context.budget,
        writeInThread=context.inThread,
    )
    context.hooks.counts["connections"] = lambda: factory.connections + factory.overflowing
    return factory


def connectionCap(maxConnections: int) -> int:
    """``--max-connections``, lowered so that half the descriptors stay for real work.

    Each connection holds one descriptor; commands, shells (three each), spool files and
    exports need theirs. With the init script's 1024 descriptors the cap is 480.
    """
    import resource  # noqa: PLC0415 (only here, once at start-up)

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return maxConnections
    return min(maxConnections, max(16, (soft - 64) // 2))

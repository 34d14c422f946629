"""Background services: one automat machine per service, its files, its unit, and re-adoption.

``start_service`` runs a command in the background, in a session (process group) of its own,
and answers once the service is ready (its readiness probe passed, or at once without one) or
has failed; ``status_service``, ``logs_service``, ``stop_service`` and ``list_services``
report on it and end it. Every request is served while others wait: a 20 s readiness wait
holds only its own answer.

The package, by concern:

  - L{_machine}: the service machine alone (L{ServiceMachine}), built in a function;
  - L{_probe_machine}: the readiness probe machine; L{readiness}: the checks it polls and
    the request's ``readiness`` object;
  - L{records}: the on-disk files (record, logs, runner, status) and their writer;
  - L{_runner}: the program the runner runs (the command, its capped logs, its status);
  - L{runners}: the runner process, spawned here or taken back;
  - L{units}: the unit of everything the service started, its signals and its end;
  - L{handles}: a service the registry knows, its name rule and what it may leave running;
  - L{launch}: what a start hands the machine (its probe factory, its spawned runner);
  - L{registry}: the services by name (L{Services}); L{actions}: the request handlers.
"""

from __future__ import annotations

from twisted.application.service import IService

from pyro_reactor.capabilities.services._machine import (
    STOP_GRACE,
    ServiceCore,
    ServiceInput,
    ServiceMachine,
)
from pyro_reactor.capabilities.services.actions import ServiceActions
from pyro_reactor.capabilities.services.records import runnerScript, tailText
from pyro_reactor.capabilities.services.registry import Services, normalizeServiceName
from pyro_reactor.capabilities.services.runners import AdoptedProcess
from pyro_reactor.capabilities.services.units import processStat
from pyro_reactor.context import AgentContext
from pyro_reactor.wire.dispatch import Action


class ServicesCapability:
    """The service actions, served by a L{Services} registry started with the agent."""

    features: tuple[str, ...] = ()

    def __init__(self, context: AgentContext) -> None:
        self.registry = registry = Services(context)
        self.service: IService = registry
        self.actions: list[Action] = ServiceActions(registry).actions()
        context.hooks.readinessRechecks.append(registry.recheckReady)
        context.hooks.counts["services"] = registry.runningCount


__all__ = [
    "STOP_GRACE",
    "AdoptedProcess",
    "ServiceActions",
    "ServiceCore",
    "ServiceInput",
    "ServiceMachine",
    "Services",
    "ServicesCapability",
    "normalizeServiceName",
    "processStat",
    "runnerScript",
    "tailText",
]

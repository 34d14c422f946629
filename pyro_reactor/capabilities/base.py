"""The shape every capability has: its actions, its ``ping`` features, the service it owns.

A capability is built once from the L{AgentContext} by L{pyro_reactor.agent}; building it has
no side effect beyond creating its objects. The agent registers its actions with the
dispatcher and attaches its service (if any) to the agent's service tree, so that whatever
the capability holds (running commands, shells, services, jobs) starts and stops with the
agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.application.service import IService

from pyro_reactor.wire.dispatch import Action


class Capability(Protocol):
    """One thing the agent can do, as L{pyro_reactor.agent} assembles it."""

    @property
    def actions(self) -> Sequence[Action]:
        """The actions this capability serves."""

    @property
    def features(self) -> Sequence[str]:
        """Names ``ping`` lists in ``features`` (optional capabilities a host may test for)."""

    @property
    def service(self) -> IService | None:
        """Started and stopped with the agent, or ``None`` when there is nothing to run."""

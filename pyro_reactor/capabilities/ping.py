"""The ``ping`` action: version, supported actions, optional features, uptime and pid.

Hosts ping right after booting a VM to learn when the agent answers, and read ``actions`` and
``features`` to find out which optional capabilities this agent has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from pyro_reactor._version import __version__
from pyro_reactor.context import AgentContext
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request


class PingCapability:
    """Answers ``ping`` from what the agent assembled: every action name and feature."""

    features: tuple[str, ...] = ()
    service = None

    def __init__(
        self,
        context: AgentContext,
        actionNames: Callable[[], list[str]],
        features: Callable[[], Sequence[str]],
    ) -> None:
        self._context = context
        self._actionNames = actionNames
        self._features = features
        self.actions = [Action("ping", self._ping)]

    def _ping(self, request: Request) -> dict[str, Any]:
        return {
            "pong": True,
            "agent": "pyro-reactor",
            "version": __version__,
            "actions": self._actionNames(),
            "features": sorted(self._features()),
            "uptime_seconds": round(self._context.reactor.seconds() - self._context.startedAt, 3),
            "pid": os.getpid(),
        }

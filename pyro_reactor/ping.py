"""The ``ping`` action: version, supported actions, uptime and pid.

Hosts ping right after booting a VM to learn when the agent answers, and read ``actions`` to
find out which optional capabilities this agent has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pyro_reactor._version import __version__
from pyro_reactor.context import AgentContext
from pyro_reactor.dispatch import Action
from pyro_reactor.request import Request


def pingAction(context: AgentContext, actionNames: Callable[[], list[str]]) -> Action:
    def ping(request: Request) -> dict[str, Any]:
        return {
            "pong": True,
            "agent": "pyro-reactor",
            "version": __version__,
            "actions": actionNames(),
            "uptime_seconds": round(context.reactor.seconds() - context.startedAt, 3),
            "pid": os.getpid(),
        }

    return Action("ping", ping)

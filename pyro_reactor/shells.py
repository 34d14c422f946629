"""The PTY shells actions (placeholder: being written)."""

from __future__ import annotations

from pyro_reactor.context import AgentContext
from pyro_reactor.dispatch import Action


def actions(context: AgentContext) -> list[Action]:
    return []

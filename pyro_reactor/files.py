"""The list_workspace, read_workspace_file, write_workspace_file and delete_workspace_path actions (placeholder: being written)."""

from __future__ import annotations

from pyro_reactor.context import AgentContext
from pyro_reactor.dispatch import Action


def actions(context: AgentContext) -> list[Action]:
    return []

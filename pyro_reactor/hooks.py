"""Small registries through which capabilities offer each other what they hold.

Capabilities are built independently from the L{AgentContext}; when one needs to ask another
something (the snapshot capability freezing every job, ``stats`` counting shells), the owner
registers a callable here at build time and the asker reads it at request time. Nothing here
imports a capability: the registries only hold plain callables and small protocols.

What is registered, by whom:

  - ``readinessRechecks``: each callable re-checks the readiness of the services that were
    ready (after a snapshot restore their sockets may be gone) and fires with how many it
    re-checked. The services capability registers one.
  - ``freezables``: each L{Freezable} freezes and thaws a group of units (every job's cgroup)
    for ``quiesce``/``thaw``. The jobs capability registers one.
  - ``counts``: named counters read by ``stats`` (``"shells"``, ``"services"``, ``"jobs"``,
    ``"connections"``); a name nobody registered is reported as ``null``.
  - ``usage``: named callables returning per-unit resource usage for ``stats`` (``"jobs"``:
    one object per job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred


class Freezable(Protocol):
    """A group of units ``quiesce`` can freeze (``cgroup.freeze``) and ``thaw`` can thaw."""

    def freeze(self) -> Deferred[int]:
        """Freeze every unit that can be frozen; fires with how many were frozen."""

    def thaw(self) -> Deferred[int]:
        """Thaw every unit this frozen; fires with how many were thawed. Never fails."""


@dataclass
class Hooks:
    """The registries, one per question (see the module docstring)."""

    readinessRechecks: list[Callable[[], Deferred[int]]] = field(default_factory=list)
    freezables: list[Freezable] = field(default_factory=list)
    counts: dict[str, Callable[[], int]] = field(default_factory=dict)
    usage: dict[str, Callable[[], list[dict[str, Any]]]] = field(default_factory=dict)

"""The calls about the guest as a whole: snapshots (restored, quiesce, thaw) and stats."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.client.calls.base import CallBase


class GuestCalls(CallBase):
    """``restored``, ``quiesce``, ``thaw`` and ``stats``."""

    def restored(
        self,
        unixTime: float | None = None,
        entropy: bytes | None = None,
        generation: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Tell a guest just restored from a snapshot: the host's clock, fresh entropy.

        ``unixTime`` defaults to this host's clock at the moment of the call and ``entropy`` to
        64 bytes of ``os.urandom``; the answer is the agent's, as docs/actions/snapshots.md
        describes it (``clock_error``/``entropy_error`` say what it could not do).
        """
        fields: dict[str, Any] = {
            "action": "restored",
            "unix_time": time.time() if unixTime is None else unixTime,
            "entropy": base64.b64encode(os.urandom(64) if entropy is None else entropy).decode(),
        }
        if generation is not None:
            fields["generation"] = generation
        return self._simple(fields, dict)

    def quiesce(
        self,
        freeze: Sequence[str] = (),
        freezeJobs: bool = False,
        timeoutSeconds: float = 30.0,
    ) -> Deferred[dict[str, Any]]:
        """Sync, and freeze the given guest mount points (and jobs) before a snapshot."""
        fields: dict[str, Any] = {
            "action": "quiesce",
            "freeze": list(freeze),
            "freeze_jobs": freezeJobs,
            "timeout_seconds": timeoutSeconds,
        }
        return self._simple(fields, dict, 30 + self.timeout)

    def thaw(self) -> Deferred[dict[str, Any]]:
        """Undo ``quiesce`` (nothing frozen is not an error)."""
        return self._simple({"action": "thaw"}, dict)

    def stats(self) -> Deferred[dict[str, Any]]:
        """Memory, CPU, pressure, disks and the agent's own figures."""
        return self._simple({"action": "stats"}, dict)

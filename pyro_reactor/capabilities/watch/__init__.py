"""``watch_workspace``: a stream of the changes below a workspace directory (feature ``"watch"``).

The handler confines the path (``context.workspace``: no ``..``, no symlink, a directory),
takes one of the ``--max-watches`` stream slots, creates the stream's own inotify instance,
places every watch (in a worker thread; see L{pyro_reactor.capabilities.watch.tree}) and only
then answers ``{"watching": "/workspace/..."}``: anything done after the host has read that
line is reported. The connection then belongs to a
L{pyro_reactor.capabilities.watch.stream.WatchStream}, which writes one JSON line
per event until the host closes (or half-closes) its connection or the watched directory goes.

One inotify instance per stream, not one per agent: closing it drops every watch of the
stream at once, and a stream's overflow is its own. The cost is one descriptor per stream,
bounded by ``--max-watches`` (64 by default, well under the kernel's default of 128 inotify
instances per user).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.dispatch import Action, HandOff
from pyro_reactor.wire.request import Request

if TYPE_CHECKING:
    from pyro_reactor.capabilities.watch.tree import Event, WatchTree
    from pyro_reactor.system.inotify import RawEvent


WATCH_HOLDS = 512 * 1024
"""What one stream may hold, reserved from the agent's memory budget while it lives: the event
lines of one read of the descriptor (64 KiB of raw events) and of the scans it starts, waiting
in the host connection's buffer (a paused stream reads no more)."""


class WatchCapability:
    """``watch_workspace``, limited to ``--max-watches`` streams at once."""

    features = ("watch",)
    service = None

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.maxWatches = context.config.maxWatches
        self.active = 0
        self.actions = [Action("watch_workspace", self.watch)]

    def watch(self, request: Request) -> Deferred[HandOff]:
        try:
            path = self.context.workspace.resolve(request.string("path", "/workspace"))
        except ActionError as error:
            # The shared resolver speaks of a "destination"; here it is the watched path.
            raise ActionError(str(error).replace("destination", "path", 1)) from None
        recursive = request.boolean("recursive", True)
        if self.active >= self.maxWatches:
            raise ActionError(
                f"too many workspace watches: at most {self.maxWatches} streams at once"
                " (--max-watches)"
            )
        # Loaded on the first watch: an agent that never watches does not pay for them.
        from pyro_reactor.capabilities.watch._machine import (  # noqa: PLC0415
            WatchCore,
            WatchMachine,
        )
        from pyro_reactor.capabilities.watch.stream import WatchStream  # noqa: PLC0415
        from pyro_reactor.capabilities.watch.tree import WatchTree  # noqa: PLC0415
        from pyro_reactor.system.inotify import openINotify  # noqa: PLC0415

        stream = WatchStream()
        tree: WatchTree | None = None

        def onEvents(events: list[RawEvent], drained: bool) -> None:
            assert tree is not None
            tree.handle(events, drained)

        reservation = self.context.budget.reserve(WATCH_HOLDS, f"a watch of {path.text}")
        try:
            inotify = openINotify(onEvents, reactor=self.context.reactor)
        except Exception as error:
            reservation.release()
            raise ActionError(f"cannot watch {path.text}: no inotify instance: {error}") from None
        self.active += 1

        def release() -> None:
            # Called once, by the machine's move to its end state.
            self.active -= 1
            reservation.release()
            if tree is not None:
                tree.end()
            inotify.loseConnection()

        def closeHost() -> None:
            transport: Any = stream.transport
            if transport is not None:
                transport.unregisterProducer()
                transport.loseConnection()

        machine = WatchMachine(
            WatchCore(
                startReading=inotify.startReading,
                stopReading=inotify.stopReading,
                closeHost=closeHost,
                release=release,
            )
        )
        stream.machine = machine
        tree = WatchTree(
            workspace=self.context.workspace,
            inotifyFD=inotify.fileno(),
            root=path.parts,
            recursive=recursive,
            clock=self.context.reactor,
            emit=stream.emit,
            rootGone=machine.rootGone,
        )

        def placed(errors: list[Event]) -> HandOff:
            for line in errors:
                stream.emit(line)
            return HandOff({"watching": path.text}, stream)

        def failed(reason: Failure) -> Failure:
            machine.lost()  # never handed over: end it, which gives the slot back
            return reason

        placing: Deferred[list[Event]] = self.context.inThread(tree.placeInitial)
        return placing.addCallbacks(placed, failed)

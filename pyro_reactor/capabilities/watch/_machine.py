"""The lifecycle of one ``watch_workspace`` stream.

States::

    pending --attach--> watching <--pause/resume--> paused
    pending | watching | paused --rootGone / lost--> ended

``pending``: the watches are placed and the kernel queues events, but nothing is read until
the host connection is handed over (after the ``watching`` line). ``paused``: the host does not
read fast enough (its transport paused us, as our producer): the descriptor is not read, the
kernel keeps queueing, and past its queue limit reports an overflow, which the host then
sees. ``ended``: the descriptor is closed (every watch with it) and the stream's slot is free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachine, TypeMachineBuilder


@dataclass
class WatchCore:
    """What a stream machine acts on."""

    startReading: Callable[[], None]
    stopReading: Callable[[], None]
    closeHost: Callable[[], None]
    release: Callable[[], None]
    transport: Any = None


class WatchInput(Protocol):
    """The inputs of a watch stream."""

    def attach(self, transport: Any) -> None:
        "The host connection was handed over: start reading events."

    def pause(self) -> None:
        "The host connection's write buffer is full."

    def resume(self) -> None:
        "The host connection drained its write buffer."

    def rootGone(self) -> None:
        "The watched directory is gone (its ``deleted`` line is written): end the stream."

    def lost(self) -> None:
        "The host connection is gone."

    def isEnded(self) -> bool:
        "Whether the stream has ended."


def _makeWatchMachine() -> TypeMachine[WatchInput, WatchCore]:
    builder = TypeMachineBuilder(WatchInput, WatchCore)
    pending = builder.state("pending")
    watching = builder.state("watching")
    paused = builder.state("paused")
    ended = builder.state("ended")

    @pending.upon(WatchInput.attach).to(watching)
    def _attach(stream: WatchInput, core: WatchCore, transport: Any) -> None:
        core.transport = transport
        core.startReading()

    @watching.upon(WatchInput.pause).to(paused)
    def _pause(stream: WatchInput, core: WatchCore) -> None:
        core.stopReading()

    @paused.upon(WatchInput.resume).to(watching)
    def _resume(stream: WatchInput, core: WatchCore) -> None:
        core.startReading()

    for state in (pending, watching, paused):

        @state.upon(WatchInput.lost).to(ended)
        def _lost(stream: WatchInput, core: WatchCore) -> None:
            core.stopReading()
            core.release()

        @state.upon(WatchInput.rootGone).to(ended)
        def _rootGone(stream: WatchInput, core: WatchCore) -> None:
            core.stopReading()
            core.release()
            core.closeHost()

        state.upon(WatchInput.isEnded).loop().returns(False)

    ended.upon(WatchInput.isEnded).loop().returns(True)

    @ended.upon(WatchInput.attach).loop()
    def _lateAttach(stream: WatchInput, core: WatchCore, transport: Any) -> None:
        transport.loseConnection()

    for state, inputs in (
        (pending, (WatchInput.pause, WatchInput.resume)),
        (watching, (WatchInput.attach, WatchInput.resume)),
        (paused, (WatchInput.attach, WatchInput.pause)),
        (ended, (WatchInput.pause, WatchInput.resume, WatchInput.rootGone, WatchInput.lost)),
    ):
        for late in inputs:
            state.upon(late).loop().returns(None)
    return builder.build()


WatchMachine = _makeWatchMachine()
"""Builds a stream machine: ``WatchMachine(WatchCore(...))`` -> L{WatchInput}."""

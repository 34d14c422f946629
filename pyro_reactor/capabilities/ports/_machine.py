"""The lifecycle of one TCP relay between a host connection and a guest server.

The machine decides what happens to both ends when either side opens, half-closes, closes or
resets; it never sees the bytes (they go straight from one transport to the other, with each
transport the other's producer, see L{pyro_reactor.capabilities.ports.relay}). It talks to the
two connections through L{End}s held by its L{RelayCore}, so tests drive it with fakes.

States::

    connecting --_guestConnected--> awaitingHost --hostAttached--> relaying
    relaying --hostEOF--> hostEnded --guestEOF--> closed
    relaying --guestEOF--> guestEnded --hostEOF--> closed
    any open state --hostLost / guestLost--> closed      (the other end is closed; a reset
                                                          is passed on as a reset)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.logger import Logger


class End(Protocol):
    """One side of a relay, as the machine acts on it."""

    def pause(self) -> None:
        "Stop reading from this side."

    def resume(self) -> None:
        "Read from this side again."

    def pipeFrom(self, other: End) -> None:
        "Make the other side's reading follow this side's write buffer (backpressure)."

    def shutdownWrite(self) -> None:
        "Send EOF to this side once what is buffered for it is written."

    def close(self) -> None:
        "Close this side once what is buffered for it is written."

    def reset(self) -> None:
        "Drop this side at once, with a reset where the transport can send one."


@dataclass
class RelayCore:
    """What a relay machine acts on: its two ends, once they exist."""

    log: Logger = field(default_factory=lambda: Logger(namespace="pyro_reactor.ports.relay"))
    guest: End | None = None
    host: End | None = None
    label: str = ""
    release: Callable[[], None] = lambda: None
    """Called once, on the way into ``closed`` (gives the relay's memory reservation back)."""


class RelayInput(Protocol):
    """The inputs of a relay: what its two connections report."""

    def guestConnected(self, guest: End) -> None:
        "The guest-side connection is up (it is kept paused until the host end is attached)."

    def guestFailed(self) -> None:
        "The guest-side connection could not be made."

    def hostAttached(self, host: End) -> None:
        "The host connection was handed over (after the ``connected`` line)."

    def hostEOF(self) -> None:
        "The host half-closed its connection."

    def guestEOF(self) -> None:
        "The guest server half-closed its connection."

    def hostLost(self, reset: bool) -> None:
        "The host connection is gone (``reset``: not cleanly)."

    def guestLost(self, reset: bool) -> None:
        "The guest connection is gone (``reset``: not cleanly)."

    def isClosed(self) -> bool:
        "Whether the relay has ended."


def _closeEnd(end: End | None, reset: bool) -> None:
    if end is None:
        return
    if reset:
        end.reset()
    else:
        end.close()


def _makeRelayMachine() -> TypeMachine[RelayInput, RelayCore]:
    builder = TypeMachineBuilder(RelayInput, RelayCore)
    connecting = builder.state("connecting")
    awaitingHost = builder.state("awaitingHost")
    relaying = builder.state("relaying")
    hostEnded = builder.state("hostEnded")
    guestEnded = builder.state("guestEnded")
    closed = builder.state("closed")

    @connecting.upon(RelayInput.guestConnected).to(awaitingHost)
    def _holdGuest(relay: RelayInput, core: RelayCore, guest: End) -> None:
        core.guest = guest
        guest.pause()

    @connecting.upon(RelayInput.guestFailed).to(closed)
    def _failed(relay: RelayInput, core: RelayCore) -> None:
        core.release()

    @awaitingHost.upon(RelayInput.hostAttached).to(relaying)
    def _startRelaying(relay: RelayInput, core: RelayCore, host: End) -> None:
        core.host = host
        assert core.guest is not None
        host.pipeFrom(core.guest)
        core.guest.pipeFrom(host)
        core.guest.resume()
        core.log.debug("relay {label} started", label=core.label)

    @awaitingHost.upon(RelayInput.hostLost).to(closed)
    def _hostGoneEarly(relay: RelayInput, core: RelayCore, reset: bool) -> None:
        core.release()
        _closeEnd(core.guest, reset)

    @awaitingHost.upon(RelayInput.guestLost).to(closed)
    def _guestGoneEarly(relay: RelayInput, core: RelayCore, reset: bool) -> None:
        core.release()

    @relaying.upon(RelayInput.hostEOF).to(hostEnded)
    def _forwardHostEOF(relay: RelayInput, core: RelayCore) -> None:
        assert core.guest is not None
        core.guest.shutdownWrite()

    @relaying.upon(RelayInput.guestEOF).to(guestEnded)
    def _forwardGuestEOF(relay: RelayInput, core: RelayCore) -> None:
        assert core.host is not None
        core.host.shutdownWrite()

    @hostEnded.upon(RelayInput.guestEOF).to(closed)
    @guestEnded.upon(RelayInput.hostEOF).to(closed)
    def _bothEnded(relay: RelayInput, core: RelayCore) -> None:
        core.release()
        _closeEnd(core.host, False)
        _closeEnd(core.guest, False)
        core.log.debug("relay {label} ended", label=core.label)

    for state in (relaying, hostEnded, guestEnded):

        @state.upon(RelayInput.hostLost).to(closed)
        def _hostGone(relay: RelayInput, core: RelayCore, reset: bool) -> None:
            core.release()
            _closeEnd(core.guest, reset)
            core.log.debug(
                "relay {label}: host gone (reset={reset})", label=core.label, reset=reset
            )

        @state.upon(RelayInput.guestLost).to(closed)
        def _guestGone(relay: RelayInput, core: RelayCore, reset: bool) -> None:
            core.release()
            _closeEnd(core.host, reset)
            core.log.debug(
                "relay {label}: guest gone (reset={reset})", label=core.label, reset=reset
            )

    @closed.upon(RelayInput.hostAttached).loop()
    def _lateHost(relay: RelayInput, core: RelayCore, host: End) -> None:
        # The guest went away between the answer and the hand-over: nothing to relay.
        core.host = host
        host.close()

    @closed.upon(RelayInput.guestConnected).loop()
    def _lateGuest(relay: RelayInput, core: RelayCore, guest: End) -> None:
        guest.close()

    for state in (connecting, awaitingHost, relaying, hostEnded, guestEnded):
        state.upon(RelayInput.isClosed).loop().returns(False)
    closed.upon(RelayInput.isClosed).loop().returns(True)

    # Events that cannot happen in a state (each connection reports in order), accepted so
    # that the machine is total; late events after the end are ignored.
    impossible = {
        connecting: (
            RelayInput.hostAttached,
            RelayInput.hostEOF,
            RelayInput.guestEOF,
            RelayInput.hostLost,
            RelayInput.guestLost,
        ),
        awaitingHost: (
            RelayInput.guestConnected,
            RelayInput.guestFailed,
            RelayInput.hostEOF,
            RelayInput.guestEOF,
        ),
        relaying: (RelayInput.guestConnected, RelayInput.guestFailed, RelayInput.hostAttached),
        hostEnded: (
            RelayInput.guestConnected,
            RelayInput.guestFailed,
            RelayInput.hostAttached,
            RelayInput.hostEOF,
        ),
        guestEnded: (
            RelayInput.guestConnected,
            RelayInput.guestFailed,
            RelayInput.hostAttached,
            RelayInput.guestEOF,
        ),
        closed: (
            RelayInput.guestFailed,
            RelayInput.hostEOF,
            RelayInput.guestEOF,
            RelayInput.hostLost,
            RelayInput.guestLost,
        ),
    }
    for state, inputs in impossible.items():
        for late in inputs:
            state.upon(late).loop().returns(None)
    return builder.build()


RelayMachine = _makeRelayMachine()
"""Builds a relay machine: ``RelayMachine(RelayCore())`` -> L{RelayInput}."""

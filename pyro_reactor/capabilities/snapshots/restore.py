"""``restored``: what the guest must redo when it wakes up from a snapshot.

A restored guest's wall clock is where it was when the snapshot was taken, and every clone of
one snapshot starts with the same kernel CRNG state. L{Restorer.restore}, on the reactor thread:

  1. steps ``CLOCK_REALTIME`` to the host's ``unix_time`` when it is off by more than 10 ms,
     and re-arms the agent's timers: Twisted's reactor keeps time by the wall clock
     (``reactor.seconds`` is ``time.time``), so a step forward by the time the snapshot sat on
     disk would make every pending timeout (a request's deadline, a readiness wait, the
     auto-thaw) fire at once. Each pending call is moved by the amount the reactor's time
     jumped beyond the time that really passed (measured on ``CLOCK_MONOTONIC``), and so is the
     agent's start time (``ping``'s ``uptime_seconds`` does not count time on disk). Stepping and
     re-arming happen in one reactor turn: no timer can run in between.
  2. mixes ``entropy`` into the input pool with ``RNDADDENTROPY`` (credited) and reseeds the
     CRNG (``RNDRESEEDCRNG``). Without ``CAP_SYS_ADMIN`` the bytes are still mixed in by a write
     to ``/dev/urandom`` (uncredited, no reseed) and the answer says so.
  3. thaws what a ``quiesce`` froze (a snapshot is taken between ``quiesce`` and ``thaw``, so
     every clone wakes up frozen);
  4. records ``generation`` under the state directory (``pyro-generation``, 0600, written to a
     temporary file and renamed) and re-checks the readiness of services that were ready,
     through the registry in L{pyro_reactor.hooks.Hooks.readinessRechecks}.

What could not be done is said in the answer (``clock_error``, ``entropy_error``,
``reseeded: false``), never pretended.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.snapshots.kernel import GuestKernel
from pyro_reactor.errors import ActionError
from pyro_reactor.wire.request import Request

log = Logger(namespace="pyro_reactor.capabilities.snapshots")

#: 2020-01-01T00:00:00Z and 2100-01-01T00:00:00Z: a host clock outside is broken, not news.
EARLIEST_UNIX_TIME = 1577836800.0
LATEST_UNIX_TIME = 4102444800.0
#: The clock is stepped only when it is off by more than this.
CLOCK_TOLERANCE = 0.010
MIN_ENTROPY_BYTES = 32
MAX_ENTROPY_BYTES = 4096
GENERATION_FILE = "pyro-generation"


@dataclass(frozen=True)
class RestoreRequest:
    """A checked ``restored`` request."""

    unixTime: float
    entropy: bytes
    generation: int | None


def parseRestored(request: Request) -> RestoreRequest:
    """Check ``unix_time``, ``entropy`` and ``generation``; refuse before anything is done."""
    unixTime = request.fields.get("unix_time")
    if (
        unixTime is None
        or isinstance(unixTime, bool)
        or not isinstance(unixTime, (int, float))
        or not math.isfinite(unixTime)
    ):
        raise ActionError("unix_time must be a number: the host's clock, seconds since the epoch")
    if not EARLIEST_UNIX_TIME <= unixTime < LATEST_UNIX_TIME:
        raise ActionError(
            f"unix_time {unixTime!r} is not between 2020-01-01 and 2100-01-01:"
            " refusing to set the clock"
        )
    encoded = request.fields.get("entropy")
    if encoded is None:
        raise ActionError(
            f"entropy is required: at least {MIN_ENTROPY_BYTES} bytes from the host's CSPRNG,"
            " base64"
        )
    if not isinstance(encoded, str):
        raise ActionError("entropy must be a base64 string")
    if len(encoded) > (MAX_ENTROPY_BYTES + 2) // 3 * 4:
        raise ActionError(f"entropy must be at most {MAX_ENTROPY_BYTES} bytes")
    try:
        entropy = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ActionError("entropy must be a base64 string") from None
    if len(entropy) < MIN_ENTROPY_BYTES:
        raise ActionError(
            f"entropy must be at least {MIN_ENTROPY_BYTES} bytes (got {len(entropy)})"
        )
    if len(entropy) > MAX_ENTROPY_BYTES:
        raise ActionError(f"entropy must be at most {MAX_ENTROPY_BYTES} bytes")
    generation = request.optionalInteger("generation")
    if generation is not None and generation < 0:
        raise ActionError("generation must not be negative")
    return RestoreRequest(float(unixTime), entropy, generation)


def writeGeneration(path: Path, generation: int, unixTime: float) -> None:
    """Replace the generation record at C{path} atomically (0600, fsynced)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps({"generation": generation, "restored_at": unixTime}) + "\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass
class RestoreCore:
    """What L{Restorer} needs from the agent.

    ``reactor`` provides ``seconds`` and ``getDelayedCalls`` (a real reactor, or a C{Clock});
    ``shiftStart`` moves the agent's start time by a clock jump; ``thaw`` undoes a quiesce;
    ``rechecks`` returns the registered readiness re-checks.
    """

    reactor: Any
    kernel: GuestKernel
    stateDir: Path
    inThread: Callable[..., Deferred[Any]]
    thaw: Callable[[], Deferred[dict[str, Any]]]
    rechecks: Callable[[], Sequence[Callable[[], Deferred[int]]]]
    shiftStart: Callable[[float], None]
    monotonic: Callable[[], float] = time.monotonic


def _why(error: OSError) -> str:
    return error.strerror or str(error)


class Restorer:
    """Serves ``restored``."""

    def __init__(self, core: RestoreCore) -> None:
        self.core = core

    def restore(self, request: RestoreRequest) -> Deferred[dict[str, Any]]:
        answer: dict[str, Any] = {}
        self._stepClock(request.unixTime, answer)
        self._mixEntropy(request.entropy, answer)
        answer["generation"] = request.generation
        thawed = self.core.thaw()

        def afterThaw(thaw: dict[str, Any]) -> Deferred[list[Any]]:
            answer["thawed"] = thaw["thawed"]
            answer["jobs_thawed"] = thaw["jobs_thawed"]
            work = [self._recheck()]
            if request.generation is not None:
                path = self.core.stateDir / GENERATION_FILE
                work.append(
                    self.core.inThread(writeGeneration, path, request.generation, request.unixTime)
                )
            return gatherResults(work, consumeErrors=True)

        def done(results: list[Any]) -> dict[str, Any]:
            answer["services_rechecked"] = results[0]
            log.info(
                "restored: clock stepped {clock_step_seconds} s, {entropy_bytes} bytes of"
                " entropy, reseeded {reseeded}, generation {generation}",
                **{key: answer.get(key) for key in _LOGGED},
            )
            return answer

        def failed(failure: Failure) -> Failure:
            if isinstance(failure.value, FirstError):
                failure = failure.value.subFailure
            log.failure("restored could not record the generation", failure)
            return Failure(ActionError("could not record the generation in the state directory"))

        return thawed.addCallback(afterThaw).addCallbacks(done, failed)

    def _stepClock(self, unixTime: float, answer: dict[str, Any]) -> None:
        core = self.core
        offset = unixTime - core.kernel.realtime()
        answer["clock_step_seconds"] = 0.0
        answer["timers_rearmed"] = 0
        if abs(offset) <= CLOCK_TOLERANCE:
            return
        reactorBefore, monotonicBefore = core.reactor.seconds(), core.monotonic()
        try:
            core.kernel.setRealtime(unixTime)
        except OSError as error:
            answer["clock_error"] = (
                f"the clock is off by {offset:.3f} s and could not be set: {_why(error)}"
                " (CAP_SYS_TIME is needed)"
            )
            return
        answer["clock_step_seconds"] = round(offset, 6)
        jump = (core.reactor.seconds() - reactorBefore) - (core.monotonic() - monotonicBefore)
        if abs(jump) > CLOCK_TOLERANCE:
            answer["timers_rearmed"] = self._rearm(jump)

    def _rearm(self, jump: float) -> int:
        moved = 0
        for call in self.core.reactor.getDelayedCalls():
            if call.active():
                call.delay(jump)
                moved += 1
        self.core.shiftStart(jump)
        return moved

    def _mixEntropy(self, entropy: bytes, answer: dict[str, Any]) -> None:
        kernel = self.core.kernel
        problems = []
        try:
            kernel.addEntropy(entropy)
        except OSError as error:
            problems.append(f"could not credit entropy: {_why(error)} (CAP_SYS_ADMIN is needed)")
            try:
                kernel.mixEntropy(entropy)
            except OSError as error:
                problems.append(f"could not mix entropy in: {_why(error)}")
                answer["entropy_bytes"] = 0
            else:
                answer["entropy_bytes"] = len(entropy)
        else:
            answer["entropy_bytes"] = len(entropy)
        try:
            kernel.reseed()
        except OSError as error:
            problems.append(f"could not reseed the CRNG: {_why(error)} (CAP_SYS_ADMIN is needed)")
            answer["reseeded"] = False
        else:
            answer["reseeded"] = True
        if problems:
            answer["entropy_error"] = "; ".join(problems)

    def _recheck(self) -> Deferred[int]:
        def oneFailed(failure: Failure) -> int:
            log.failure("a readiness re-check failed", failure)
            return 0

        checks = [maybeDeferred(check).addErrback(oneFailed) for check in self.core.rechecks()]
        return gatherResults(checks).addCallback(sum)


_LOGGED = ("clock_step_seconds", "entropy_bytes", "reseeded", "generation")

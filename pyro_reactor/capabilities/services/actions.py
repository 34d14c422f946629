"""The service actions: each request checked completely, then handed to the registry.

``start_service`` is validated field by field before anything is created or started
(L{parseStart}): a number too large for a timer, a lone surrogate in the command or the
working directory, an environment the kernel would refuse, a bad readiness object all get a
clear error and leave nothing behind. The order of the checks that existed before is kept, so
that a request with several faults gets the same error as from earlier versions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.capabilities.execute import commandEnvironment
from pyro_reactor.capabilities.services.readiness import (
    ReadinessSpec,
    parseReadiness,
)
from pyro_reactor.capabilities.services.registry import Services, normalizeServiceName
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import Workspace
from pyro_reactor.wire.dispatch import Action
from pyro_reactor.wire.request import Request

DEFAULT_READY_TIMEOUT = 30
DEFAULT_READY_INTERVAL_MS = 500
#: Longest readiness wait accepted (a day): the answer is held that long.
MAX_READY_TIMEOUT = 86_400
MAX_READY_INTERVAL_MS = MAX_READY_TIMEOUT * 1000
#: The kernel's limit on one argument or ``NAME=value`` string (``MAX_ARG_STRLEN``, with NUL).
MAX_ARGUMENT_BYTES = 128 * 1024 - 1
#: Bytes of ``env`` overrides accepted in all (the kernel's whole limit is about 2 MiB).
MAX_ENV_BYTES = 1024 * 1024

Record = dict[str, Any]


@dataclass(frozen=True)
class StartSpec:
    """A ``start_service`` request, checked."""

    name: str
    command: str
    cwd: str
    env: dict[str, str]
    readiness: dict[str, Any] | None
    probe: ReadinessSpec | None
    readyTimeout: int
    interval: float


def _checkEnvSize(overrides: dict[str, str] | None) -> None:
    if not overrides:
        return
    total = 0
    for name, value in overrides.items():
        size = len(name) + 1 + len(value.encode("utf-8"))
        if size > MAX_ARGUMENT_BYTES:
            raise ActionError(
                f"service env value of {name} is too large (at most {MAX_ARGUMENT_BYTES} bytes)"
            )
        total += size + 1
    if total > MAX_ENV_BYTES:
        raise ActionError(f"service env is too large (at most {MAX_ENV_BYTES} bytes in all)")


def parseStart(
    request: Request, workspace: Workspace, checkName: Callable[[str], None]
) -> StartSpec:
    """Check every field of a ``start_service`` request; C{checkName} refuses a taken name."""
    overrides = request.environment("service")
    env = commandEnvironment(overrides)
    readyTimeout = request.integer("ready_timeout_seconds", DEFAULT_READY_TIMEOUT)
    readyIntervalMs = request.integer("ready_interval_ms", DEFAULT_READY_INTERVAL_MS)
    name = normalizeServiceName(request.string("service_name", ""))
    command = request.string("command", "")
    cwdText = request.string("cwd", "/workspace")
    cwd = workspace.resolve(cwdText)
    if "\x00" in command:
        raise ActionError("command must not contain NUL bytes")
    checkName(name)
    readiness = request.mapping("readiness")
    probe = None if readiness is None else parseReadiness(readiness, workspace)
    if readyTimeout < 0:
        raise ActionError("ready_timeout_seconds must not be negative")
    if readyTimeout > MAX_READY_TIMEOUT:
        raise ActionError(f"ready_timeout_seconds must be at most {MAX_READY_TIMEOUT}")
    if readyIntervalMs > MAX_READY_INTERVAL_MS:
        raise ActionError(f"ready_interval_ms must be at most {MAX_READY_INTERVAL_MS}")
    if len(command.encode("utf-8")) > MAX_ARGUMENT_BYTES:
        raise ActionError(f"command is too long (at most {MAX_ARGUMENT_BYTES} bytes)")
    _checkEnvSize(overrides)
    return StartSpec(
        name=name,
        command=command,
        cwd=cwd.text,
        env=env,
        readiness=readiness,
        probe=probe,
        readyTimeout=readyTimeout,
        interval=max(readyIntervalMs, 1) / 1000,
    )


class ServiceActions:
    """The request handlers of the five service actions, served by a L{Services} registry."""

    def __init__(self, registry: Services) -> None:
        self.registry = registry

    def start(self, request: Request) -> Deferred[Record]:
        spec = parseStart(request, self.registry.workspace, self.registry.checkNameFree)
        return self.registry.start(spec)

    def status(self, request: Request) -> Record:
        return self.registry.lookup(request.string("service_name", "")).core.snapshot()

    def logs(self, request: Request) -> Deferred[Record]:
        handle = self.registry.lookup(request.string("service_name", ""))
        tailLines = request.optionalInteger("tail_lines")
        if tailLines is not None and tailLines < 0:
            raise ActionError("tail_lines must not be negative")
        return self.registry.logs(handle, tailLines)

    def stop(self, request: Request) -> Deferred[Record]:
        return self.registry.stop(self.registry.lookup(request.string("service_name", "")))

    def listAll(self, request: Request) -> Record:
        return {"services": self.registry.snapshots()}

    def actions(self) -> list[Action]:
        return [
            Action("start_service", self.start),
            Action("status_service", self.status),
            Action("logs_service", self.logs),
            Action("stop_service", self.stop),
            Action("list_services", self.listAll),
        ]


__all__ = ["ServiceActions", "StartSpec", "parseStart"]

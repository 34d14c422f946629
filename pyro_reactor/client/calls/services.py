"""The service calls, and the readiness checks ``startService`` takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from pyro_reactor.client.calls.base import CallBase, _items
from pyro_reactor.client.results import ServiceInfo, ServiceLogs


def fileReadiness(path: str) -> dict[str, Any]:
    """A service is ready once this workspace path exists."""
    return {"type": "file", "path": path}


def tcpReadiness(address: str) -> dict[str, Any]:
    """A service is ready once ``host:port`` accepts a connection."""
    return {"type": "tcp", "address": address}


def httpReadiness(url: str) -> dict[str, Any]:
    """A service is ready once ``url`` answers 2xx or 3xx."""
    return {"type": "http", "url": url}


def commandReadiness(command: str) -> dict[str, Any]:
    """A service is ready once ``command`` exits 0."""
    return {"type": "command", "command": command}


class ServiceCalls(CallBase):
    """``start_service`` ... ``list_services``."""

    def startService(
        self,
        serviceName: str,
        command: str,
        *,
        cwd: str = "/workspace",
        readiness: Mapping[str, Any] | None = None,
        readyTimeoutSeconds: int = 30,
        readyIntervalMs: int = 500,
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ServiceInfo]:
        """Start a service; answers once it is ready or has failed (see ``*Readiness``)."""
        fields: dict[str, Any] = {
            "action": "start_service",
            "service_name": serviceName,
            "command": command,
            "cwd": cwd,
            "ready_timeout_seconds": readyTimeoutSeconds,
            "ready_interval_ms": readyIntervalMs,
        }
        if readiness is not None:
            fields["readiness"] = dict(readiness)
        if env is not None:
            fields["env"] = dict(env)
        return self._simple(fields, ServiceInfo.fromAnswer, readyTimeoutSeconds + 10 + self.timeout)

    def statusService(self, serviceName: str) -> Deferred[ServiceInfo]:
        fields = {"action": "status_service", "service_name": serviceName}
        return self._simple(fields, ServiceInfo.fromAnswer)

    def logsService(self, serviceName: str, tailLines: int | None = None) -> Deferred[ServiceLogs]:
        fields: dict[str, Any] = {"action": "logs_service", "service_name": serviceName}
        if tailLines is not None:
            fields["tail_lines"] = tailLines
        return self._simple(fields, ServiceLogs.fromAnswer)

    def stopService(self, serviceName: str) -> Deferred[ServiceInfo]:
        """TERM the service's group, KILL it after a grace; answers its final record."""
        fields = {"action": "stop_service", "service_name": serviceName}
        return self._simple(fields, ServiceInfo.fromAnswer, 15 + self.timeout)

    def listServices(self) -> Deferred[list[ServiceInfo]]:
        return self._simple(
            {"action": "list_services"},
            lambda answer: [ServiceInfo.fromAnswer(s) for s in _items(answer, "services")],
        )

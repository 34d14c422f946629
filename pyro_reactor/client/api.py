"""The asynchronous client: one method per action of the guest agent, each a ``Deferred``.

Usage::

    client = AgentClient(reactor, "fcvsock:path=/srv/vm1/v.sock:port=5005")
    await client.waitUntilReady(timeout=60)
    result = await client.execute("uname -a")
    print(result.exitCode, result.stdout)

Each call opens its own connection (the protocol is one request per connection), so calls may
run concurrently. Every call has a timeout for connecting and one for the whole call; every
failure is an L{AgentError} (the agent's own message when it answered ``{"error": ...}``).
Uploads stream from a file and exports stream to a file; nothing holds an archive in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pyro_reactor.client.calls.files import FileCalls
from pyro_reactor.client.calls.guest import GuestCalls
from pyro_reactor.client.calls.jobs import JobCalls
from pyro_reactor.client.calls.ports import PortCalls
from pyro_reactor.client.calls.services import (
    ServiceCalls,
    commandReadiness,
    fileReadiness,
    httpReadiness,
    tcpReadiness,
)
from pyro_reactor.client.calls.shells import ShellCalls
from pyro_reactor.client.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from pyro_reactor.client.results import ExecResult, PingResult

log = Logger(namespace="pyro_reactor.client")


class AgentClient(FileCalls, ShellCalls, ServiceCalls, JobCalls, PortCalls, GuestCalls):
    """Talks to one guest agent through one endpoint.

    ``endpoint`` is an endpoint string (``fcvsock:path=...:port=5005``, ``vsock:cid=3:port=5005``,
    ``tcp:host=127.0.0.1:port=5005``, ``unix:path=...``) or an ``IStreamClientEndpoint``.
    ``timeout`` bounds each ordinary call (calls that wait on purpose: an exec, a service
    start, a ``read_shell`` with ``waitMs``, get their own wait added); ``connectTimeout``
    bounds connecting; ``transferTimeout`` bounds an upload or an export.
    """

    # -- ping and readiness ----------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> Deferred[PingResult]:
        """Who answers, its version, and the actions it serves."""
        return self._simple({"action": "ping"}, PingResult.fromAnswer, timeout)

    def waitUntilReady(
        self,
        timeout: float = 60.0,
        initialDelay: float = 0.05,
        maxDelay: float = 1.0,
        attemptTimeout: float | None = None,
    ) -> Deferred[PingResult]:
        """Ping with backoff until the agent answers (what a host does after booting a VM).

        Refused connections, missing sockets, a refused ``CONNECT``, connections closed
        without an answer (a forwarder that accepts before the guest listens) and timeouts
        are retried until ``timeout`` seconds have passed; then L{AgentTimeoutError} says why
        the last attempt failed. Any answer, even an error answer, means the agent is up.
        """
        return Deferred.fromCoroutine(
            self._waitUntilReady(timeout, initialDelay, maxDelay, attemptTimeout)
        )

    async def _waitUntilReady(
        self, timeout: float, initialDelay: float, maxDelay: float, attemptTimeout: float | None
    ) -> PingResult:
        deadline = self.reactor.seconds() + timeout
        delay = initialDelay
        attempts = 0
        normal = attemptTimeout or self.timeout
        last: AgentError | None = None
        while True:
            attempts += 1
            left = deadline - self.reactor.seconds()
            perAttempt = min(normal, max(left, 0.001))
            try:
                answer = await self.call({"action": "ping"}, timeout=perAttempt, raiseOnError=False)
            except (AgentUnavailableError, AgentTimeoutError, AgentProtocolError) as reason:
                # An attempt cut short by the overall deadline says less than the one before.
                cutShort = isinstance(reason, AgentTimeoutError) and perAttempt < normal
                if last is None or not cutShort:
                    last = reason
            else:
                log.debug("agent ready after {attempts} attempt(s)", attempts=attempts)
                return PingResult.fromAnswer(answer)
            left = deadline - self.reactor.seconds()
            if left <= 0:
                raise AgentTimeoutError(
                    f"the agent at {self.where} did not answer within {timeout:g} s"
                    f" ({attempts} attempts; last: {last.message if last else 'no attempt'})",
                    "ping",
                ) from last
            await deferLater(self.reactor, min(delay, left), lambda: None)
            delay = min(delay * 2, maxDelay)

    # -- exec -------------------------------------------------------------------------------

    def execute(
        self,
        command: str,
        timeoutSeconds: int = 30,
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ExecResult]:
        """Run ``/bin/sh -lc command`` in the guest (``exec``)."""
        fields: dict[str, Any] = {
            "action": "exec",
            "command": command,
            "timeout_seconds": timeoutSeconds,
        }
        if env is not None:
            fields["env"] = dict(env)
        return self._simple(fields, ExecResult.fromAnswer, timeoutSeconds + self.timeout)


__all__ = [
    "AgentClient",
    "commandReadiness",
    "fileReadiness",
    "httpReadiness",
    "tcpReadiness",
]

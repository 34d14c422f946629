"""The readiness checks a probe can poll, and the ``readiness`` object of a request.

L{parseReadiness} validates the request's object completely before anything is started;
L{ReadinessSpec.check} builds the callable the probe machine
(L{pyro_reactor.capabilities.services._probe_machine}) polls. The checks never block the
reactor:

  - ``file``: something exists at a workspace path, looked up in a worker thread through the
    kernel-confined L{Workspace} (a path outside the workspace is refused up front);
  - ``tcp``: a connection to ``host:port`` through a client endpoint with a 1 s timeout;
  - ``http``: a ``GET`` through L{twisted.web.client.Agent} with a connect timeout, no
    persistent connections, and timeouts on the response and on its body; 2xx and 3xx mean
    ready, as in the reference (which, unlike us, followed redirects);
  - ``command``: ``/bin/sh -lc COMMAND`` through L{runCommand} with its 10 s timeout, in the
    service's working directory (opened afresh for each check and entered through the open
    descriptor, never by name) and environment; exit status 0 means ready.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol as WireProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.execute import CommandResult, runCommand
from pyro_reactor.capabilities.services._probe_machine import Check
from pyro_reactor.errors import ActionError
from pyro_reactor.system.unitcgroups import unitCgroups
from pyro_reactor.system.workspace import WorkingDirectory, Workspace

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse

log = Logger(namespace="pyro_reactor.capabilities.services.readiness")

#: Seconds a TCP check waits for the connection (the reference's socket timeout).
TCP_TIMEOUT = 1.0
#: Seconds an HTTP check waits for the connection, the response head, and the body each.
HTTP_TIMEOUT = 2.0
#: Seconds a command check may run (the reference's ``subprocess.run`` timeout).
COMMAND_TIMEOUT = 10.0
#: Bytes of a command check's output kept (it is thrown away; only the status matters).
COMMAND_OUTPUT_BYTES = 64 * 1024
#: Bytes of an HTTP check's body read before the connection is dropped.
HTTP_BODY_BYTES = 64 * 1024

READINESS_TYPES = ("file", "tcp", "http", "command")


# -- the readiness object of a request --------------------------------------------------------


@dataclass(frozen=True)
class ReadinessSpec:
    """A validated ``readiness`` object; ``target`` is the path, address, URL or command."""

    type: str
    target: str
    host: str = ""
    port: int = 0

    def check(
        self,
        reactor: Any,
        *,
        workspace: Workspace,
        inThread: Callable[..., Deferred[Any]],
        cwd: str,
        env: Mapping[str, str],
    ) -> Check:
        """The callable the probe machine polls (C{cwd}: the service's guest directory)."""
        if self.type == "file":
            return fileCheck(workspace, self.target, inThread)
        if self.type == "tcp":
            return tcpCheck(reactor, self.host, self.port)
        if self.type == "http":
            return httpCheck(reactor, self.target)
        return commandCheck(
            reactor, self.target, workspace=workspace, inThread=inThread, cwd=cwd, env=env
        )


def _field(readiness: Mapping[str, Any], name: str) -> str:
    value = readiness.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ActionError(f"readiness {name} must be a string")
    text = value if isinstance(value, str) else str(value)
    if text.strip() == "":
        raise ActionError(f"readiness {name} is required")
    if "\x00" in text:
        raise ActionError(f"readiness {name} must not contain NUL bytes")
    if not isValidText(text):
        raise ActionError(f"readiness {name} must be valid Unicode text")
    return text


def isValidText(text: str) -> bool:
    """Whether C{text} can be encoded (no lone surrogate, as a JSON ``\\ud800`` makes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parseReadiness(readiness: Mapping[str, Any], workspace: Workspace) -> ReadinessSpec:
    """Check a request's ``readiness`` object before anything is started.

    The reference only found a bad type or field while polling, after the service had been
    started; here the request is refused first, with the reference's message for the type.
    """
    kind = readiness.get("type")
    kindText = kind if isinstance(kind, str) else str(kind)
    if kindText not in READINESS_TYPES:
        raise ActionError(f"unsupported readiness type: {kindText}")
    if kindText == "file":
        path = _field(readiness, "path")
        return ReadinessSpec("file", workspace.resolve(path).text)
    if kindText == "tcp":
        address = _field(readiness, "address").strip()
        host, separator, portText = address.rpartition(":")
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(portText)
        except ValueError:
            port = -1
        if not separator or not host or not 0 < port < 65536:
            raise ActionError(f"readiness address must be HOST:PORT, not {address!r}")
        return ReadinessSpec("tcp", address, host=host, port=port)
    if kindText == "http":
        url = _field(readiness, "url").strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ActionError("readiness url must be an http:// or https:// URL")
        return ReadinessSpec("http", url)
    return ReadinessSpec("command", _field(readiness, "command"))


# -- the checks ----------------------------------------------------------------------------------


def fileCheck(
    workspace: Workspace, guestPath: str, inThread: Callable[..., Deferred[Any]]
) -> Check:
    """Ready once something exists at C{guestPath} (looked up in a worker thread)."""

    def check() -> Deferred[bool]:
        found: Deferred[bool] = inThread(workspace.fileExists, guestPath)
        return found

    return check


class _Hangup(WireProtocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def tcpCheck(reactor: Any, host: str, port: int, timeout: float = TCP_TIMEOUT) -> Check:
    """Ready once a TCP connection to C{host}:C{port} succeeds within C{timeout} seconds."""

    def check() -> Deferred[bool]:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        connected: Deferred[Any] = connectProtocol(endpoint, _Hangup())
        # HostnameEndpoint's timeout covers each connection attempt, not the name lookup.
        connected.addTimeout(timeout * 2, reactor)
        return connected.addCallbacks(lambda _: True, lambda _: False)

    return check


class _BodyDiscarder(WireProtocol):
    """Reads and drops a response body, hanging up after C{limit} bytes."""

    def __init__(self, limit: int) -> None:
        self.remaining = limit
        self.done: Deferred[None] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        # The body's transport is a producer: stopping it drops the connection.
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.remaining -= len(data)
        if self.remaining < 0:
            self._abort()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)


def httpCheck(reactor: Any, url: str, timeout: float = HTTP_TIMEOUT) -> Check:
    """Ready once a ``GET`` of C{url} answers 2xx or 3xx."""
    # twisted.web's client costs the idle agent ~0.5 MiB and ~10 ms: only http probes need it.
    from twisted.web.client import Agent, HTTPConnectionPool  # noqa: PLC0415

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    target = url.encode("utf-8")

    def check() -> Deferred[bool]:
        requested: Deferred[IResponse] = agent.request(b"GET", target)
        requested.addTimeout(timeout, reactor)

        def answered(response: IResponse) -> Deferred[bool]:
            isReady = 200 <= response.code < 400
            discarder = _BodyDiscarder(HTTP_BODY_BYTES)
            response.deliverBody(discarder)
            body = discarder.done.addTimeout(timeout, reactor)
            return body.addBoth(lambda _: isReady)

        checked: Deferred[bool] = requested.addCallback(answered)
        return checked.addErrback(lambda _: False)

    return check


def commandCheck(
    reactor: Any,
    command: str,
    *,
    workspace: Workspace,
    inThread: Callable[..., Deferred[Any]],
    cwd: str,
    env: Mapping[str, str],
) -> Check:
    """Ready once C{command} exits 0 (run like the service: same directory and environment).

    Each check opens the guest directory C{cwd} afresh (in a worker thread, confined as the
    service's own) and runs the command in the directory it opened, held open until the
    command has exited (see L{WorkingDirectory}); a directory gone or swapped for a symlink
    fails the check. Cancelling the check (at the probe's deadline) only stops waiting: the
    command runs on, and its directory is let go when it exits.
    """

    def check() -> Deferred[bool]:
        outcome: Deferred[bool] = Deferred()
        opened: Deferred[WorkingDirectory] = inThread(workspace.openWorkingDirectory, cwd)

        def run(directory: WorkingDirectory) -> Deferred[bool]:
            ran: Deferred[CommandResult] = runCommand(
                reactor,
                command,
                timeoutSeconds=COMMAND_TIMEOUT,
                env=env,
                cwd=directory.path,
                maxOutputBytes=COMMAND_OUTPUT_BYTES,
                onExited=directory.close,
                # A cgroup of its own where there is one: nothing a check starts outlives it.
                cgroups=unitCgroups(),
                keepBackground=False,
            )
            return ran.addCallback(lambda result: result.exitCode == 0 and not result.timedOut)

        def report(ready: object) -> None:
            # Not chained to outcome: cancelling outcome must not drop an opened directory
            # (a thread's late result) nor cut the wait for the command's exit short.
            if not outcome.called:
                if isinstance(ready, Failure):
                    outcome.errback(ready)
                else:
                    outcome.callback(bool(ready))

        opened.addCallback(run).addBoth(report)
        return outcome

    return check


__all__ = [
    "ReadinessSpec",
    "commandCheck",
    "fileCheck",
    "httpCheck",
    "isValidText",
    "parseReadiness",
    "tcpCheck",
]

"""A blocking facade over L{AgentClient}, for scripts that have no reactor of their own.

Usage::

    from pyro_reactor.client import BlockingClient

    agent = BlockingClient("fcvsock:path=/srv/vm1/v.sock:port=5005")
    agent.waitUntilReady(timeout=60)
    print(agent.execute("uname -a").stdout)

The first BlockingClient starts the global reactor in a daemon thread; each method hands its
call to that thread with ``blockingCallFromThread`` and waits for the result (or raises the
same L{AgentError} the asynchronous client would). It is the same code as the asynchronous
client, so the same timeouts apply. Do not use it from the reactor's own thread (a program
already running the reactor should use L{AgentClient} directly): that would wait forever, so
it raises instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable

from pyro_reactor.client.api import AgentClient
from pyro_reactor.client.jobs import JobAttachment

_P = ParamSpec("_P")
_T = TypeVar("_T")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _reactor() -> Any:
    from twisted.internet import reactor  # noqa: PLC0415 (installed on first use only)

    return reactor


def runningReactor() -> Any:
    """The global reactor, running in a daemon thread (started on the first call)."""
    global _thread
    reactor = _reactor()
    with _lock:
        if reactor.running:
            if _thread is None and threadable.isInIOThread():
                raise RuntimeError(
                    "BlockingClient called from the reactor thread: use AgentClient there"
                )
            return reactor
        if _thread is not None:
            raise RuntimeError("the reactor of the blocking client has stopped")
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        _thread = threading.Thread(
            target=reactor.run,
            kwargs={"installSignalHandlers": False},
            name="pyro-client-reactor",
            daemon=True,
        )
        _thread.start()
    started.wait()
    return reactor


def _blocking(
    method: Callable[Concatenate[AgentClient, _P], Deferred[_T]],
) -> Callable[Concatenate[BlockingClient, _P], _T]:
    def call(self: BlockingClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        def start() -> Deferred[_T]:
            return method(self.client, *args, **kwargs)

        # (Twisted's annotation of blockingCallFromThread is a union mypy cannot solve here.)
        function: Any = start
        return cast(_T, blockingCallFromThread(self.reactor, function))

    call.__name__ = method.__name__
    call.__qualname__ = f"BlockingClient.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class BlockingClient:
    """The calls of L{AgentClient}, each blocking until its result (same arguments)."""

    def __init__(self, endpoint: str, **options: Any) -> None:
        self.reactor = runningReactor()
        self.client: AgentClient = blockingCallFromThread(
            self.reactor, lambda: AgentClient(self.reactor, endpoint, **options)
        )

    call = _blocking(AgentClient.call)
    ping = _blocking(AgentClient.ping)
    waitUntilReady = _blocking(AgentClient.waitUntilReady)
    execute = _blocking(AgentClient.execute)
    listWorkspace = _blocking(AgentClient.listWorkspace)
    readWorkspaceFile = _blocking(AgentClient.readWorkspaceFile)
    writeWorkspaceFile = _blocking(AgentClient.writeWorkspaceFile)
    deleteWorkspacePath = _blocking(AgentClient.deleteWorkspacePath)
    extractArchive = _blocking(AgentClient.extractArchive)
    installSecrets = _blocking(AgentClient.installSecrets)
    installSecretValues = _blocking(AgentClient.installSecretValues)
    exportArchive = _blocking(AgentClient.exportArchive)
    upload = _blocking(AgentClient.upload)
    download = _blocking(AgentClient.download)
    openShell = _blocking(AgentClient.openShell)
    readShell = _blocking(AgentClient.readShell)
    writeShell = _blocking(AgentClient.writeShell)
    signalShell = _blocking(AgentClient.signalShell)
    resizeShell = _blocking(AgentClient.resizeShell)
    closeShell = _blocking(AgentClient.closeShell)
    listShells = _blocking(AgentClient.listShells)
    startService = _blocking(AgentClient.startService)
    statusService = _blocking(AgentClient.statusService)
    logsService = _blocking(AgentClient.logsService)
    stopService = _blocking(AgentClient.stopService)
    listServices = _blocking(AgentClient.listServices)
    listPorts = _blocking(AgentClient.listPorts)
    startJob = _blocking(AgentClient.startJob)
    readJob = _blocking(AgentClient.readJob)
    writeJob = _blocking(AgentClient.writeJob)
    signalJob = _blocking(AgentClient.signalJob)
    statusJob = _blocking(AgentClient.statusJob)
    listJobs = _blocking(AgentClient.listJobs)
    removeJob = _blocking(AgentClient.removeJob)

    def attachJob(self, jobId: str | None = None, **options: Any) -> BlockingAttachment:
        """L{AgentClient.attachJob}: iterate the returned object for the events."""
        start: Any = lambda: self.client.attachJob(jobId, **options)  # noqa: E731
        attachment: JobAttachment = blockingCallFromThread(self.reactor, start)
        return BlockingAttachment(self.reactor, attachment)


class BlockingAttachment:
    """A job's attach stream for threads: iterate it for events; write, signal, detach."""

    def __init__(self, reactor: Any, attachment: JobAttachment) -> None:
        self.reactor = reactor
        self.attachment = attachment
        self.header = attachment.header

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            pull: Any = self.attachment.next
            event: dict[str, Any] | None = blockingCallFromThread(self.reactor, pull)
            if event is None:
                return
            yield event

    def write(self, data: bytes | str) -> None:
        self.reactor.callFromThread(self.attachment.write, data)

    def closeStdin(self) -> None:
        self.reactor.callFromThread(self.attachment.closeStdin)

    def signal(self, name: str) -> None:
        self.reactor.callFromThread(self.attachment.signal, name)

    def detach(self) -> None:
        self.reactor.callFromThread(self.attachment.detach)

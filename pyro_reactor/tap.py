"""The ``pyro-agent`` twistd plugin: command-line options and the service tree.

This is the only module that touches the global reactor. Run it as::

    twistd --nodaemon --pidfile= pyro-agent --listen tcp:5005:interface=127.0.0.1 \
        --workspace ./ws --state-dir ./state
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pyro_reactor._version import __version__
from pyro_reactor.agent import buildFactory
from pyro_reactor.context import AgentConfig, AgentContext
from pyro_reactor.system.heap import singleArena
from pyro_reactor.system.responsiveness import AUTOGROUP_NICE, Responsiveness

log = Logger(namespace="pyro_reactor.tap")

DEFAULT_LISTEN = "vsock:5005"
#: The listen backlog given to tcp, unix and vsock endpoints that name none. Twisted's 50 is
#: too few for a host that opens a few hundred connections at once: the kernel drops the
#: SYNs beyond it, and those clients wait a whole second to retry (measured: 200 jobs started
#: together made a ping wait 1.1 s; with 1024, 0.25 s). Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be positive, not {text}")
        return value

    return parse


def _nice(text: str) -> int:
    value = int(text)
    if not -20 <= value <= 19:
        raise ValueError(f"must be from -20 to 19, not {text}")
    return value


def _relayHosts(text: str) -> str:
    if text not in ("loopback", "any"):
        raise ValueError(f"must be loopback or any, not {text}")
    return text


class _ReactorNeeded(Exception):
    """A parser wanted a reactor while its endpoint string was only being checked."""


class _NoReactor:
    """Stands in for the reactor while ``--listen`` strings are checked.

    Options are parsed before twistd installs its reactor, so the check must not import
    ``twisted.internet.reactor``. Parsing an endpoint string only records the reactor for
    later; a parser that does use it at parse time is left to ``makeService``.
    """

    def __getattr__(self, name: str) -> Any:
        raise _ReactorNeeded(name)


def withBacklog(description: str) -> str:
    """C{description} with C{backlog=}L{LISTEN_BACKLOG} added, for the endpoint types that
    take one (tcp, tcp6, unix, vsock) when it names none."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "vsock") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def checkEndpoint(description: str) -> None:
    """Parse a ``--listen`` endpoint string, raising a ``UsageError`` that says what is wrong.

    ``serverFromString`` reports an unknown type or a bad value as ``ValueError``, an unknown
    option (``tcp:5005:inteface=...``) as ``TypeError`` from the parser's signature, and a type
    whose code is missing (``ssl:`` without pyOpenSSL) as ``ImportError``.
    """
    try:
        serverFromString(_NoReactor(), description)
    except _ReactorNeeded:
        return
    except (ValueError, TypeError, KeyError, OSError, ImportError) as error:
        raise usage.UsageError(f"bad --listen endpoint {description!r}: {error}") from error


class Options(usage.Options):
    """Options of ``twistd pyro-agent``."""

    synopsis = "[options]"
    longdesc = (
        "Serve the pyro guest protocol (one JSON request per connection) on every --listen "
        "endpoint: vsock:PORT (AF_VSOCK, the default in a guest), tcp:PORT:interface=ADDR, "
        "unix:PATH."
    )
    optParameters = [
        ["workspace", None, "/workspace", "Directory that guest paths under /workspace map to."],
        [
            "state-dir",
            None,
            "/run",
            "Directory holding pyro-shells/, pyro-services/, "
            "pyro-secrets/ (and pyro-spool/ for transfers in flight).",
        ],
        [
            "max-request-bytes",
            None,
            16 * 1024 * 1024,
            "Longest accepted request line.",
            _positive(int),
        ],
        [
            "request-timeout",
            None,
            60.0,
            "Seconds a connection may take to send its request.",
            _positive(float),
        ],
        ["max-archive-bytes", None, 8 * 1024**3, "Largest accepted upload body.", _positive(int)],
        [
            "max-output-bytes",
            None,
            16 * 1024 * 1024,
            "Bytes of exec output kept per stream (the rest is dropped and flagged).",
            _positive(int),
        ],
        [
            "shell-buffer-chars",
            None,
            8 * 1024 * 1024,
            "Bytes of JSON-encoded output a read_shell answer carries at most; also caps the"
            " output a shell keeps in memory (the rest is read from its log).",
            _positive(int),
        ],
        [
            "max-shells",
            None,
            64,
            "Shells that may be open at once (open_shell is refused beyond).",
            _positive(int),
        ],
        [
            "log-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes per shell or service log file before it is rotated once (to NAME.1).",
            _positive(int),
        ],
        ["threads", None, 4, "Worker threads for filesystem and archive work.", _positive(int)],
        [
            "max-list-entries",
            None,
            100_000,
            "Most entries a list_workspace answer holds (more is refused with an error).",
            _positive(int),
        ],
        [
            "max-archive-members",
            None,
            100_000,
            "Most members an uploaded archive may have (more is refused before writing).",
            _positive(int),
        ],
        [
            "answer-timeout",
            None,
            60.0,
            "Seconds a client may accept no bytes of its answer before it is dropped.",
            _positive(float),
        ],
        [
            "memory-budget",
            None,
            256 * 1024 * 1024,
            "Bytes of requests in flight and answers being written the agent holds at most.",
            _positive(int),
        ],
        [
            "max-connections",
            None,
            256,
            "Connections served at once; beyond, one second for the line and only ping answered.",
            _positive(int),
        ],
        [
            "min-upload-rate",
            None,
            64 * 1024,
            "Bytes a second an upload body must average (after --request-timeout for the line).",
            _positive(int),
        ],
        [
            "relay-hosts",
            None,
            "loopback",
            "Guest addresses connect_tcp may reach: loopback (127.0.0.1, ::1, localhost) or any.",
            _relayHosts,
        ],
        ["max-watches", None, 64, "Most watch_workspace streams at once.", _positive(int)],
        [
            "job-output-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes of job output kept on disk per stream (older bytes are dropped as a gap).",
            _positive(int),
        ],
        [
            "max-jobs",
            None,
            256,
            "Jobs kept at most (the oldest ended ones go first).",
            _positive(int),
        ],
        [
            "autogroup-nice",
            None,
            AUTOGROUP_NICE,
            "Nice value (-20 to 19) of the scheduler autogroup of the session the agent leads,"
            " so that it answers promptly while its jobs keep the CPUs busy (0: the default).",
            _nice,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint string; repeatable (default: vsock:5005)."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            checkEndpoint(description)

    def config(self) -> AgentConfig:
        return AgentConfig(
            workspace=Path(self["workspace"]).absolute(),
            stateDir=Path(self["state-dir"]).absolute(),
            maxRequestBytes=self["max-request-bytes"],
            requestTimeout=self["request-timeout"],
            maxArchiveBytes=self["max-archive-bytes"],
            maxOutputBytes=self["max-output-bytes"],
            shellBufferChars=self["shell-buffer-chars"],
            maxListEntries=self["max-list-entries"],
            maxArchiveMembers=self["max-archive-members"],
            maxShells=self["max-shells"],
            logBytes=self["log-bytes"],
            answerTimeout=self["answer-timeout"],
            memoryBudget=self["memory-budget"],
            maxConnections=self["max-connections"],
            minUploadRate=self["min-upload-rate"],
            relayHosts=self["relay-hosts"],
            maxWatches=self["max-watches"],
            jobOutputBytes=self["job-output-bytes"],
            maxJobs=self["max-jobs"],
        )


class ThreadPoolService(Service):
    """Starts and stops the agent's worker thread pool with the application."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@implementer(IStreamServerEndpoint)
class _AnnouncedEndpoint:
    """An endpoint that logs where it listens once its ``listen`` Deferred fires."""

    def __init__(self, description: str, endpoint: IStreamServerEndpoint) -> None:
        self.description = description
        self.endpoint = endpoint

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            log.info(
                "pyro-agent listening on {endpoint} ({address})",
                endpoint=self.description,
                address=str(port.getHost()),
            )
            return port

        return self.endpoint.listen(protocolFactory).addCallback(listening)


class ListeningService(StreamServerEndpointService):
    """A listening endpoint that says where it listens once it does."""

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        super().__init__(_AnnouncedEndpoint(description, endpoint), factory)
        self.description = description


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # noqa: PLC0415 (installed by twistd first)

    config = options.config()
    config.workspace.mkdir(parents=True, exist_ok=True)
    # Before the first worker thread exists: threads share the heap that malloc_trim shrinks.
    singleArena()
    pool = ThreadPool(minthreads=0, maxthreads=options["threads"], name="pyro-agent")
    top = MultiService()
    ThreadPoolService(pool).setServiceParent(top)
    context = AgentContext(
        config=config, reactor=reactor, threadPool=pool, startedAt=reactor.seconds()
    )
    context.services.setServiceParent(top)
    factory = buildFactory(context)
    for description in options["listen"]:
        endpoint = serverFromString(reactor, withBacklog(description))
        ListeningService(description, endpoint, factory).setServiceParent(top)
    # Last, so that what the other services build at start-up is frozen with the rest.
    Responsiveness(options["autogroup-nice"]).setServiceParent(top)
    log.info(
        "pyro-agent {version} serving workspace {workspace}, state in {state}",
        version=__version__,
        workspace=str(config.workspace),
        state=str(config.stateDir),
    )
    return top

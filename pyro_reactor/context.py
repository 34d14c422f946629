"""What every capability gets from the agent: its configuration, reactor and worker threads.

``tap.py`` builds one L{AgentContext} around the real reactor; tests build one around a
``MemoryReactorClock`` or a real reactor with temporary directories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from pyro_reactor.hooks import Hooks
from pyro_reactor.system.heap import HeapTrimmer, mallocTrim
from pyro_reactor.system.workspace import Workspace
from pyro_reactor.wire.budget import MemoryBudget
from pyro_reactor.wire.dispatch import EncodedAnswer
from pyro_reactor.wire.sender import encodeAnswer

_P = ParamSpec("_P")
_T = TypeVar("_T")

MiB = 1024 * 1024


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings, one field per command-line option."""

    workspace: Path
    stateDir: Path
    maxRequestBytes: int = 16 * MiB
    requestTimeout: float = 60.0
    maxArchiveBytes: int = 8 * 1024 * MiB
    maxOutputBytes: int = 16 * MiB
    shellBufferChars: int = 8 * MiB
    maxListEntries: int = 100_000
    maxArchiveMembers: int = 100_000
    maxShells: int = 64
    #: Bytes per service or shell log file before it is rotated once (to ``NAME.stdout.1``).
    logBytes: int = 64 * MiB
    answerTimeout: float = 60.0
    memoryBudget: int = 256 * MiB
    maxConnections: int = 256
    minUploadRate: int = 64 * 1024
    relayHosts: str = "loopback"
    maxWatches: int = 64
    jobOutputBytes: int = 64 * MiB
    maxJobs: int = 256

    @property
    def shellRoot(self) -> Path:
        return self.stateDir / "pyro-shells"

    @property
    def serviceRoot(self) -> Path:
        return self.stateDir / "pyro-services"

    @property
    def secretRoot(self) -> Path:
        return self.stateDir / "pyro-secrets"

    @property
    def spoolRoot(self) -> Path:
        """Uploads and exports in flight (ours; the reference keeps archives in memory)."""
        return self.stateDir / "pyro-spool"


@dataclass
class AgentContext:
    """The agent's world, from which each capability is built.

    ``reactor`` provides at least ``IReactorTime``, ``IReactorProcess``, ``IReactorTCP`` and
    ``IReactorCore``. ``services`` is the parent service of every capability's own service.
    ``workspace`` is the one confined view of ``config.workspace`` all capabilities share.
    ``budget`` is the agent's one memory budget (``--memory-budget``): request lines and answers
    draw from it, and so should every large buffer a capability holds for a client (queued
    shell input, shell windows): ``budget.reserve(size, "what it is for")`` before holding,
    ``release()`` after; a draw that does not fit raises an ``ActionError`` to answer.
    ``hooks`` holds what capabilities offer each other (see L{pyro_reactor.hooks}).
    """

    config: AgentConfig
    reactor: Any
    threadPool: ThreadPool
    services: MultiService = field(default_factory=MultiService)
    startedAt: float = 0.0
    workspace: Workspace = field(init=False)
    budget: MemoryBudget = field(init=False)
    hooks: Hooks = field(default_factory=Hooks)

    def __post_init__(self) -> None:
        self.workspace = Workspace(self.config.workspace)
        self.budget = MemoryBudget(self.config.memoryBudget)
        trimmer = HeapTrimmer(self.reactor, self.inThread, mallocTrim())
        trimmer.setServiceParent(self.services)
        self.budget.onReleased = trimmer.released

    def inThread(
        self, function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        """Run blocking work (filesystem, tar) in the agent's own thread pool.

        The result comes back on the reactor thread. Never touch a transport or a machine from
        ``function``.
        """
        return deferToThreadPool(self.reactor, self.threadPool, function, *args, **kwargs)

    def answerInThread(
        self,
        function: Callable[_P, dict[str, Any]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Deferred[EncodedAnswer]:
        """Like L{inThread} for work whose result is a (large) answer: encoded in the same trip.

        Building an answer in the pool and encoding it on a second trip costs two thread hops
        and a pass of the reactor in between; a 1 MiB file read spends more there than in the
        read itself.
        """

        def answer() -> EncodedAnswer:
            return EncodedAnswer(encodeAnswer(function(*args, **kwargs)))

        return deferToThreadPool(self.reactor, self.threadPool, answer)

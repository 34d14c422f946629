"""Every private hook the agent takes into Twisted (and CPython), in one module.

Each hook here leans on a name Twisted (or the interpreter) does not promise to keep; the
Twisted range is pinned in setup.cfg and ``tests/test_twisted_hooks.py`` holds one canary test
per hook, so an upgrade that breaks one fails there, next to this module, rather than deep in
a capability. Nothing outside this module (and ``pyro_reactor/client/_twisted.py``, the host
side's own) names a private Twisted attribute.

- L{SpawningProcess}: ``twisted.internet.process.Process`` with its child made a session or
  process-group leader, through ``_trySpawnInsteadOfFork`` (the ``posix_spawnp`` path, with
  ``setsid=True`` or ``setpgroup=0``) and ``_setupChild`` (the fork path), and the private
  ``_getFileActions`` / ``_listOpenFDs`` helpers. Without them (L{SPAWN_HOOKS} false),
  callers put util-linux ``setsid`` in front of the argv instead.
- L{PreboundPort}: ``twisted.internet.tcp.Port`` listening on a socket made beforehand (an
  ``AF_VSOCK`` one, which ``adoptStreamPort`` refuses), through ``_preexistingSocket``,
  ``_buildAddr`` and ``_realPortNumber``.
- L{environmentBytes}: the interpreter's own bytes mapping behind ``os.environ``
  (``os.environ._data``), copied in well under a microsecond where ``os.environb`` costs
  about 18 us per spawn.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
from typing import Any

from twisted.internet import process as _process
from twisted.internet import tcp

try:
    from twisted.internet.process import (  # type: ignore[attr-defined,unused-ignore]
        _PS_CLOSE,
        _PS_DUP2,
        _getFileActions,
        _listOpenFDs,
    )
except ImportError:  # pragma: no cover - a Twisted without them: use the setsid program
    SPAWN_HOOKS = False
else:
    SPAWN_HOOKS = hasattr(os, "posix_spawnp") and hasattr(
        _process.Process, "_trySpawnInsteadOfFork"
    )

#: Every signal the child starts with at its default action. Twisted lists the ones the agent
#: ignores (Python ignores SIGPIPE and SIGXFSZ) at each spawn, which costs 80 us; resetting
#: all of them is the same for the child (handled ones are reset by exec anyway) and free.
_DEFAULT_SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})


def _openFDs() -> list[tuple[int, bool]]:
    """Every descriptor open in the agent, with its close-on-exec flag, for the spawn.

    What Twisted's spawn lists too (the spawn closes in the child each one not marked
    close-on-exec), in one pass over ``/proc/self/fd``: Twisted's detector adds a
    ``getpid`` and a second list (with 20 descriptors open: 19 us instead of 28 us).
    """
    try:
        names: list[str] | list[int] = os.listdir("/proc/self/fd")
    except OSError:
        names = list(_listOpenFDs())
    state = []
    for name in names:
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        state.append((fd, bool(flags & fcntl.FD_CLOEXEC)))
    return state


class SpawningProcess(_process.Process):
    """Twisted's POSIX process transport, with the child made a session or group leader.

    Without a working directory Twisted spawns with ``posix_spawnp``: the same call is made
    with ``setsid=True`` (or ``setpgroup=0``). With one it forks: ``_setupChild`` runs in the
    child before the exec. ``newSession`` is a class attribute (see the two subclasses in
    L{pyro_reactor.system.processes}) because Twisted's ``Process.__init__`` spawns before a
    subclass could set an instance attribute.
    """

    newSession = True

    def _trySpawnInsteadOfFork(  # noqa: PLR0917 - Twisted's signature
        self,
        path: object,
        uid: object,
        gid: object,
        executable: str,
        args: list[str],
        environment: dict[str, str] | None,
        kwargs: dict[str, Any],
    ) -> bool:
        if path is not None or uid is not None or gid is not None:
            return False
        self.pid = os.posix_spawnp(
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=_getFileActions(
                _openFDs(), kwargs["fdmap"], doClose=_PS_CLOSE, doDup2=_PS_DUP2
            ),
            setsigdef=_DEFAULT_SIGNALS,
            **({"setsid": True} if self.newSession else {"setpgroup": 0}),
        )
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        if self.newSession:
            os.setsid()
        else:
            os.setpgid(0, 0)
        super()._setupChild(*args, **kwargs)


class PreboundPort(tcp.Port):
    """A Twisted TCP port that listens on a socket its subclass makes (L{makeSocket}).

    Accepted connections are Twisted's own stream code (the class attribute ``transport``);
    the address handed to the factory for each is L{buildAddress}'s. Subclasses call
    ``BasePort.__init__`` themselves (``tcp.Port.__init__`` resolves an IP interface).
    C{portType} names the port in Twisted's log lines ("VSOCK Port 5005 Closed").
    """

    portType = "TCP"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._type = cls.portType

    def makeSocket(self) -> socket.socket:
        """A bound, listening, non-blocking socket (called once, by ``startListening``)."""
        raise NotImplementedError

    def buildAddress(self, address: Any) -> Any:
        """The ``IAddress`` of a peer that ``accept`` described as ``address``."""
        raise NotImplementedError

    def adoptSocket(self, skt: Any) -> None:
        """Listen on ``skt`` instead of calling L{makeSocket} (tests give a stand-in)."""
        self._preexistingSocket = skt

    @property
    def realPortNumber(self) -> int | None:
        """The port number listened on once listening, else ``None``."""
        number = self._realPortNumber
        return None if number is None else int(number)

    def startListening(self) -> None:
        if self._preexistingSocket is None:
            self._preexistingSocket = self.makeSocket()
        super().startListening()

    def _buildAddr(self, address: Any) -> Any:
        return self.buildAddress(address)


def environmentBytes() -> dict[bytes, bytes]:
    """A copy of the agent's environment as bytes, for a spawn (see the module docstring)."""
    raw = getattr(os.environ, "_data", None)
    if isinstance(raw, dict):
        return dict(raw)
    return dict(os.environb)


__all__ = ["SPAWN_HOOKS", "PreboundPort", "SpawningProcess", "environmentBytes"]

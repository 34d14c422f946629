"""``install_secrets``: a new secret set swapped in whole, and recovered whole after a crash.

The new set is built in a private sibling of the secret root (``.pyro-secrets-new-X``, 0700)
with files created 0600 and directories 0700, then swapped in with one
``renameat2(RENAME_EXCHANGE)``. Where the kernel or filesystem cannot exchange, two renames do
it: the root becomes ``.pyro-secrets-new-X-old``, then the stage becomes the root. A failed
install leaves the previous secrets. Messages name members, never their content.

At start-up L{recoverSecrets} looks at what an interrupted install (of this agent or an older
one: the stage names are the same) left beside the root:

- the root is there: every stage is an unfinished new set or an old set already replaced;
  all are removed;
- the root is missing: a crash fell between the two renames. A stage ``X`` whose ``X-old``
  exists was complete (the root is renamed away only after the build), so it is the newest
  complete set and becomes the root; failing that, the newest ``X-old`` (the previous set)
  does. The rest is removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from pyro_reactor.capabilities.archives.extract import applySteps, openArchive
from pyro_reactor.capabilities.archives.members import (
    SECRET_RULES,
    Directories,
    Kind,
    Limits,
    Tree,
    checkAll,
    freeSpace,
)
from pyro_reactor.capabilities.archives.progress import Counter, Transfer
from pyro_reactor.system._linux import exchange
from pyro_reactor.system.fds import DIRECTORY_FLAGS

log = Logger(namespace="pyro_reactor.capabilities.archives")

SECRETS_STAGE_PREFIX = ".pyro-secrets-new-"
"""Name prefix of the directory a secrets install is built in, beside the secret root."""

OLD_SUFFIX = "-old"
"""Suffix of the previous set while two renames swap a new one in."""


def recoverSecrets(secretRoot: Path) -> str:
    """Put the newest complete secret set back at ``secretRoot`` and remove the stages.

    Blocking; at start-up only. Returns what was done: ``"clean"``, ``"removed stages"``,
    ``"recovered new set"`` or ``"recovered previous set"``.
    """
    parent = secretRoot.parent
    try:
        names = [name for name in os.listdir(parent) if name.startswith(SECRETS_STAGE_PREFIX)]
    except FileNotFoundError:
        return "clean"
    if not names:
        return "clean"
    outcome = "removed stages"
    if not secretRoot.exists() and not secretRoot.is_symlink():
        olds = {name for name in names if name.endswith(OLD_SUFFIX)}
        completeNew = [name[: -len(OLD_SUFFIX)] for name in olds]
        completeNew = [name for name in completeNew if name in names]
        chosen, outcome = _newest(parent, completeNew), "recovered new set"
        if chosen is None:
            chosen, outcome = _newest(parent, sorted(olds)), "recovered previous set"
        if chosen is not None:
            os.rename(parent / chosen, secretRoot)
            names.remove(chosen)
        else:
            outcome = "removed stages"
    for name in names:
        shutil.rmtree(parent / name, ignore_errors=True)
    log.info("secrets from an interrupted install: {outcome}", outcome=outcome)
    return outcome


def _newest(parent: Path, names: list[str]) -> str | None:
    best: tuple[float, str] | None = None
    for name in names:
        try:
            info = os.lstat(parent / name)
        except OSError:
            continue
        if not os.path.isdir(parent / name) or os.path.islink(parent / name):
            continue
        if best is None or (info.st_mtime, name) > best:
            best = (info.st_mtime, name)
    return None if best is None else best[1]


def installSecrets(
    secretRoot: Path,
    archivePath: Path,
    counter: Transfer | Counter | None = None,
    *,
    maxMembers: int | None = None,
    consume: bool = False,
) -> dict[str, Any]:
    """Replace the secret set at ``secretRoot`` with the archive's content (blocking).

    With ``consume``, the archive file is removed as soon as it has been read (a secrets
    upload must not outlive its use), whether the install succeeds or not.
    """
    counter = counter if counter is not None else Counter()
    parent = os.open(secretRoot.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stage = SECRETS_STAGE_PREFIX + secrets.token_hex(6)
    try:
        os.mkdir(stage, 0o700, dir_fd=parent)
        try:
            stageFd = os.open(stage, DIRECTORY_FLAGS, dir_fd=parent)
            os.fchmod(stageFd, 0o700)
            directories = Directories(stageFd, createMode=0o700, exactMode=0o700)
            try:
                free, block = freeSpace(stageFd)
                limits = Limits(maxMembers=maxMembers, freeBytes=free, blockSize=block)
                try:
                    with openArchive(archivePath) as archive:
                        steps = checkAll(archive, Tree(directories), (), SECRET_RULES, limits)
                        applySteps(
                            archive, steps, directories, SECRET_RULES, counter, fileMode=0o600
                        )
                finally:
                    if consume:
                        archivePath.unlink(missing_ok=True)
            finally:
                directories.close()
                os.close(stageFd)
            _swapIn(parent, stage, secretRoot.name)
        except BaseException:
            shutil.rmtree(stage, dir_fd=parent, ignore_errors=True)
            raise
    finally:
        os.close(parent)
    return {
        "destination": str(secretRoot),
        "entry_count": len(steps),
        "bytes_written": sum(step.member.size for step in steps if step.kind is Kind.FILE),
    }


def _swapIn(parent: int, stage: str, rootName: str) -> None:
    try:
        os.stat(rootName, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(stage, rootName, src_dir_fd=parent, dst_dir_fd=parent)
        return
    if not exchange(parent, stage, rootName):
        # No atomic exchange here: for a moment there is no secret root at all (a crash
        # now is what recoverSecrets repairs).
        os.rename(rootName, stage + OLD_SUFFIX, src_dir_fd=parent, dst_dir_fd=parent)
        os.rename(stage, rootName, src_dir_fd=parent, dst_dir_fd=parent)
        stage += OLD_SUFFIX
    shutil.rmtree(stage, dir_fd=parent, ignore_errors=True)


__all__ = ["SECRETS_STAGE_PREFIX", "exchange", "installSecrets", "recoverSecrets"]

"""Archives under abuse: a crash mid-extract, tar bombs, member counts, interrupted secrets.

A crash is a real ``kill -9`` of a process extracting (at a chosen point of the write or
publish phase); recovery is what the agent runs at start-up. Tar bombs are refused from their
headers, before a byte is written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.archives import (
    SECRETS_STAGE_PREFIX,
    STAGE_PREFIX,
    extractArchive,
    installSecrets,
    recoverExtracts,
    recoverSecrets,
)
from pyro_reactor.capabilities.archives import extract as extractModule
from pyro_reactor.capabilities.archives import members as membersModule
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import Workspace
from tests.archive_helpers import dirMember, fileMember, linkMember, makeTar, snapshot
from tests.helpers import startAgent

MiB = 1024 * 1024

# Runs an extraction and SIGKILLs itself at the Nth call of a patched function.
_CRASHING = """
import os, signal, sys
from pathlib import Path
from pyro_reactor.capabilities.archives import extract
from pyro_reactor.system.workspace import Workspace

root, archive, where, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = [0]
if where == "write":
    original = extract._writeFile
    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            # Half a file written, as a kill in the middle of a copy would leave it.
            archiveFile, step, parent, name = args[:4]
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=parent)
            os.write(fd, b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    extract._writeFile = crashing
else:
    original = os.rename
    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    extract.os.rename = crashing
workspace = Workspace(Path(root))
extract.extractArchive(workspace, Path(archive), workspace.resolve("/workspace/dest"))
"""


class CrashTests(SynchronousTestCase):
    """``kill -9`` during ``extract_archive``, then the start-up recovery."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.root = base / "workspace"
        (self.root / "dest" / "old").mkdir(parents=True)
        (self.root / "dest" / "keep").write_bytes(b"old content")
        (self.root / "dest" / "old" / "a").write_bytes(b"old a")
        self.archive = base / "upload.tar"
        members = [fileMember("keep", b"new content"), dirMember("fresh")]
        members += [fileMember(f"fresh/{n}", bytes([n]) * 1000) for n in range(20)]
        members += [fileMember(f"top{n}", b"t" * 5000) for n in range(10)]
        members += [fileMember("old/a", b"new a"), fileMember("old/b", b"new b")]
        members += [linkMember("link", "keep"), fileMember("big", b"b" * (3 * MiB))]
        self.archive.write_bytes(makeTar(members))
        self.before = snapshot(self.root)
        # What a complete extraction gives, in another workspace.
        other = base / "expected"
        shutil.copytree(self.root, other, symlinks=True)
        workspace = Workspace(other)
        extractArchive(workspace, self.archive, workspace.resolve("/workspace/dest"))
        self.after = snapshot(other)

    def crash(self, where: str, count: int) -> None:
        result = subprocess.run(
            [sys.executable, "-c", _CRASHING, str(self.root), str(self.archive), where, str(count)],
            capture_output=True,
            check=False,
            timeout=60,
        )
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)

    def leftovers(self) -> list[str]:
        return [
            str(path.relative_to(self.root))
            for path in self.root.rglob("*")
            if path.name.startswith(STAGE_PREFIX)
        ]

    def test_killedWhileWritingShowsNothingNew(self) -> None:
        """Killed halfway through the files: no new or changed file under its final name,
        and the start-up recovery removes every stage and the journal."""
        self.crash("write", 25)
        withoutStages = {
            name: entry for name, entry in snapshot(self.root).items() if STAGE_PREFIX not in name
        }
        self.assertEqual(withoutStages, self.before)
        self.assertNotEqual(self.leftovers(), [])
        self.assertGreater(recoverExtracts(Workspace(self.root)), 0)
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(snapshot(self.root), self.before)

    def test_killedWhilePublishingIsRolledForward(self) -> None:
        """Killed between two renames of the publish phase: the recovery finishes it, so the
        workspace holds the whole archive, as if nothing had happened."""
        self.crash("publish", 5)
        self.assertNotEqual(self.leftovers(), [])
        recoverExtracts(Workspace(self.root))
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(snapshot(self.root), self.after)

    def test_olderAgentsStagesAtTheRootAreRemoved(self) -> None:
        """A stage without a journal (what an older agent left) at the root goes too."""
        (self.root / f"{STAGE_PREFIX}0123456789ab").write_bytes(b"half")
        (self.root / f"{STAGE_PREFIX}abcdef012345").mkdir()
        self.assertEqual(recoverExtracts(Workspace(self.root)), 2)
        self.assertEqual(self.leftovers(), [])

    def test_nothingToRecover(self) -> None:
        """A clean workspace (or none mounted yet) is left alone."""
        self.assertEqual(recoverExtracts(Workspace(self.root)), 0)
        self.assertEqual(snapshot(self.root), self.before)
        self.assertEqual(recoverExtracts(Workspace(self.root / "missing")), 0)


class BombTests(SynchronousTestCase):
    """Archives whose files would not fit are refused from their headers, before any write."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.root = base / "workspace"
        self.root.mkdir(parents=True)
        (self.root / "existing").write_bytes(b"kept")
        self.base = base
        self.workspace = Workspace(self.root)

    def assertRefusedWithoutWriting(self, archive: Path, **kwargs: Any) -> ActionError:
        before = snapshot(self.root)
        writes: list[str] = []
        original = membersModule.Directories.open

        def recordingOpen(directories: Any, parts: tuple[str, ...], **kw: Any) -> int:
            if kw.get("create"):
                writes.append("/".join(parts))
            return original(directories, parts, **kw)

        self.patch(membersModule.Directories, "open", recordingOpen)
        with self.assertRaises(ActionError) as caught:
            extractArchive(
                self.workspace, archive, self.workspace.resolve("/workspace/d"), **kwargs
            )
        self.assertEqual(writes, [])
        self.assertEqual(snapshot(self.root), before)
        error: ActionError = caught.exception
        return error

    def test_sparseTarOfHugeApparentSize(self) -> None:
        """A GNU sparse tar of a few KB whose file is larger than the free space."""
        stats = os.statvfs(self.root)
        apparent = max(100 * 1024**3, 2 * stats.f_bavail * stats.f_frsize)
        source = self.base / "src"
        source.mkdir()
        with (source / "sparse").open("wb") as handle:
            handle.truncate(apparent)
        archive = self.base / "sparse.tar"
        subprocess.run(["tar", "-cSf", str(archive), "-C", str(source), "sparse"], check=True)
        self.assertLess(archive.stat().st_size, 64 * 1024)
        error = self.assertRefusedWithoutWriting(archive)
        self.assertIn("bytes for its files but only", str(error))
        self.assertIn("nothing was extracted", str(error))

    def test_gzipBomb(self) -> None:
        """A small gzip that expands past the free space is refused from the member sizes."""
        archive = self.base / "bomb.tar.gz"
        archive.write_bytes(makeTar([fileMember("zeros", bytes(8 * MiB))], "gz"))
        self.assertLess(archive.stat().st_size, 64 * 1024)
        self.patch(extractModule, "freeSpace", lambda fd: (4 * MiB, 4096))
        error = self.assertRefusedWithoutWriting(archive)
        self.assertEqual(
            str(error),
            f"archive needs {8 * MiB} bytes for its files but only {4 * MiB} bytes are free:"
            " nothing was extracted",
        )

    def test_tooManyMembers(self) -> None:
        """More members than ``--max-archive-members``: a clear error, nothing written."""
        archive = self.base / "many.tar.gz"
        archive.write_bytes(makeTar([fileMember(f"f{n}") for n in range(101)], "gz"))
        error = self.assertRefusedWithoutWriting(archive, maxMembers=100)
        self.assertEqual(
            str(error), "archive has more than 100 members (the agent's --max-archive-members)"
        )

    def test_atTheMemberLimit(self) -> None:
        """Exactly ``--max-archive-members`` members are extracted."""
        archive = self.base / "many.tar"
        archive.write_bytes(makeTar([fileMember(f"f{n}") for n in range(100)]))
        answer = extractArchive(
            self.workspace, archive, self.workspace.resolve("/workspace/d"), maxMembers=100
        )
        self.assertEqual(answer["entry_count"], 100)


_SECRETS_CRASH = """
import os, signal, sys
from pathlib import Path
from pyro_reactor.capabilities.archives import secrets

secrets.exchange = lambda dirfd, first, second: False  # a system without RENAME_EXCHANGE
original = os.rename
def crashing(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
secrets.os.rename = crashing
secrets.installSecrets(Path(sys.argv[1]), Path(sys.argv[2]))
"""


class SecretRecoveryTests(SynchronousTestCase):
    """An interrupted secrets install loses neither set: the newest complete one comes back."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.state = base / "state"
        self.root = self.state / "pyro-secrets"
        self.root.mkdir(parents=True)
        (self.root / "TOKEN").write_text("old")
        self.archive = base / "secrets.tar"
        self.archive.write_bytes(makeTar([fileMember("TOKEN", b"new")]))

    def stages(self) -> list[str]:
        return sorted(n for n in os.listdir(self.state) if n.startswith(SECRETS_STAGE_PREFIX))

    def test_killedBetweenTheTwoRenames(self) -> None:
        """A real kill between the renames: no root, both sets as stages; the new one wins."""
        result = subprocess.run(
            [sys.executable, "-c", _SECRETS_CRASH, str(self.root), str(self.archive)],
            capture_output=True,
            check=False,
            timeout=60,
        )
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        self.assertFalse(self.root.exists())
        self.assertEqual(len(self.stages()), 2)
        self.assertEqual(recoverSecrets(self.root), "recovered new set")
        self.assertEqual((self.root / "TOKEN").read_text(), "new")
        self.assertEqual(self.stages(), [])

    def test_olderAgentsStageNames(self) -> None:
        """The names today's agent leaves (``…-X`` and ``…-X-old``) are recovered the same."""
        shutil.move(self.root, self.state / f"{SECRETS_STAGE_PREFIX}0a1b2c3d4e5f-old")
        new = self.state / f"{SECRETS_STAGE_PREFIX}0a1b2c3d4e5f"
        new.mkdir()
        (new / "TOKEN").write_text("new")
        half = self.state / f"{SECRETS_STAGE_PREFIX}ffffffffffff"
        half.mkdir()
        self.assertEqual(recoverSecrets(self.root), "recovered new set")
        self.assertEqual((self.root / "TOKEN").read_text(), "new")
        self.assertEqual(self.stages(), [])

    def test_onlyThePreviousSetLeft(self) -> None:
        """No complete new set beside a missing root: the previous set is put back."""
        shutil.move(self.root, self.state / f"{SECRETS_STAGE_PREFIX}0a1b2c3d4e5f-old")
        self.assertEqual(recoverSecrets(self.root), "recovered previous set")
        self.assertEqual((self.root / "TOKEN").read_text(), "old")

    def test_rootPresentStagesRemoved(self) -> None:
        """With the root in place, stages are unfinished or replaced sets: removed."""
        (self.state / f"{SECRETS_STAGE_PREFIX}0a1b2c3d4e5f").mkdir()
        (self.state / f"{SECRETS_STAGE_PREFIX}0a1b2c3d4e5f-old").mkdir()
        self.assertEqual(recoverSecrets(self.root), "removed stages")
        self.assertEqual((self.root / "TOKEN").read_text(), "old")
        self.assertEqual(self.stages(), [])
        self.assertEqual(recoverSecrets(self.root), "clean")

    def test_uploadConsumed(self) -> None:
        """With ``consume``, the uploaded tar is gone once read, on success and on failure."""
        installSecrets(self.root, self.archive, consume=True)
        self.assertFalse(self.archive.exists())
        self.archive.write_bytes(makeTar([linkMember("link", "TOKEN")]))
        self.assertRaises(ActionError, installSecrets, self.root, self.archive, consume=True)
        self.assertFalse(self.archive.exists())
        self.assertEqual((self.root / "TOKEN").read_text(), "new")


class OptionsOverTheWireTests(TestCase):
    """``--max-archive-members`` and ``--max-list-entries`` reach the actions."""

    def test_optionsParsed(self) -> None:
        """Both options parse into the config, with 100 000 by default."""
        from pyro_reactor import tap

        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0"])
        config = options.config()
        self.assertEqual((config.maxArchiveMembers, config.maxListEntries), (100_000, 100_000))
        options = tap.Options()
        options.parseOptions(
            ["--listen", "tcp:0", "--max-archive-members", "7", "--max-list-entries", "9"]
        )
        config = options.config()
        self.assertEqual((config.maxArchiveMembers, config.maxListEntries), (7, 9))

    async def test_limitsAnswered(self) -> None:
        """Past either limit the agent answers a clear error, and writes nothing."""
        agent = await startAgent(self, maxArchiveMembers=3, maxListEntries=2)
        body = makeTar([fileMember(f"f{n}") for n in range(4)])
        answer = await agent.call(
            {"action": "extract_archive", "destination": "/workspace/x", "archive_size": len(body)},
            body,
        )
        self.assertEqual(
            answer, {"error": "archive has more than 3 members (the agent's --max-archive-members)"}
        )
        self.assertEqual(os.listdir(agent.workspace), [])
        for name in ("a", "b", "c"):
            (agent.workspace / name).write_text(name)
        listing = await agent.call({"action": "list_workspace", "recursive": True})
        self.assertEqual(
            listing,
            {
                "error": "/workspace has more than 2 entries to list (the agent's"
                " --max-list-entries): list a subdirectory, or not recursively"
            },
        )

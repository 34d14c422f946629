"""extract_archive, install_secrets and export_archive: member rules, all-or-nothing, secrets'
modes, exports of each type, and the agent staying responsive during big transfers."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities import archives
from pyro_reactor.capabilities.archives import (
    STAGE_PREFIX,
    Transfer,
    checkSymlinkTarget,
    extractArchive,
    installSecrets,
    normalizeMemberName,
)
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import Workspace
from pyro_reactor.wire.dispatch import Action, Dispatcher, StreamedAnswer
from pyro_reactor.wire.protocol import RequestProtocol
from pyro_reactor.wire.request import Request
from tests.archive_helpers import (
    Member,
    dirMember,
    fileMember,
    linkMember,
    makeTar,
    recordEvents,
    snapshot,
    specialMember,
)
from tests.helpers import RunningAgent, reactor, startAgent

MiB = 1024 * 1024


class MemberNameTests(SynchronousTestCase):
    """The reference's name rules, as pure functions."""

    def test_namesAreNormalised(self) -> None:
        """Archive member names are normalised: `.` parts, doubled and trailing slashes and
        surrounding spaces are dropped, and `./` or `.` alone names nothing."""
        self.assertEqual(normalizeMemberName("./a//b/./c/"), ("a", "b", "c"))
        self.assertEqual(normalizeMemberName(" a "), ("a",))
        self.assertEqual(normalizeMemberName("./"), ())
        self.assertEqual(normalizeMemberName("."), ())

    def test_refusedNames(self) -> None:
        """Empty, absolute and `..`-climbing member names are refused with the reference agent's
        exact error message."""
        cases = {
            "": "archive member path is empty",
            "  ": "archive member path is empty",
            "/etc/passwd": "absolute archive member paths are not allowed: /etc/passwd",
            "../x": "unsafe archive member path: ../x",
            "a/../../x": "unsafe archive member path: a/../../x",
            "a/..": "unsafe archive member path: a/..",
        }
        for name, message in cases.items():
            with self.assertRaises(ActionError) as caught:
                normalizeMemberName(name)
            self.assertEqual(str(caught.exception), message, name)

    def test_symlinkTargets(self) -> None:
        """A symlink member may point anywhere inside the workspace, but an empty target, an
        absolute one or one that climbs out with `..` is refused."""
        checkSymlinkTarget(("a", "l"), "b/c")
        checkSymlinkTarget(("l",), "./x")
        cases = {
            "": "symlink a/l has an empty target",
            " ": "symlink a/l has an empty target",
            "/etc": "symlink a/l escapes the workspace",
            "../b": "symlink a/l escapes the workspace",
            "b/../c": "symlink a/l escapes the workspace",
        }
        for target, message in cases.items():
            with self.assertRaises(ActionError) as caught:
                checkSymlinkTarget(("a", "l"), target)
            self.assertEqual(str(caught.exception), message, target)


class _WorkspaceCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.root = base / "workspace"
        self.outside = base / "outside"
        self.root.mkdir(parents=True)
        self.outside.mkdir()
        (self.outside / "target").write_bytes(b"outside")
        self.workspace = Workspace(self.root)
        self.archive = base / "upload.tar"

    def extract(self, data: bytes, destination: str = "/workspace") -> dict[str, Any]:
        self.archive.write_bytes(data)
        return extractArchive(self.workspace, self.archive, self.workspace.resolve(destination))

    def assertRefused(self, members: list[Member], message: str, **kw: Any) -> None:
        """Extracting ``members`` fails with ``message`` and changes nothing at all."""
        before = snapshot(self.root)
        outside = snapshot(self.outside)
        with self.assertRaises(ActionError) as caught:
            self.extract(makeTar(members), **kw)
        self.assertEqual(str(caught.exception), message)
        self.assertEqual(snapshot(self.root), before)
        self.assertEqual(snapshot(self.outside), outside)


class ExtractTests(_WorkspaceCase):
    def test_filesDirectoriesAndSymlinks(self) -> None:
        """Extracting an archive writes its directories, files and symlinks and reports the entry
        and byte counts; setuid and group/other write bits are dropped and no staging files
        are left behind."""
        answer = self.extract(
            makeTar(
                [
                    dirMember("d"),
                    fileMember("d/a.txt", b"alpha"),
                    fileMember("run.sh", b"#!/bin/sh\n", mode=0o4775),
                    fileMember("deep/er/b", b"bb", mode=0o600),
                    linkMember("d/link", "a.txt"),
                ]
            ),
            "/workspace/out",
        )
        self.assertEqual(
            answer, {"destination": "/workspace/out", "entry_count": 5, "bytes_written": 17}
        )
        out = self.root / "out"
        self.assertEqual((out / "d/a.txt").read_bytes(), b"alpha")
        self.assertEqual(os.readlink(out / "d/link"), "a.txt")
        self.assertEqual((out / "deep/er/b").read_bytes(), b"bb")
        # PEP 706's data filter: executable bits kept, setuid and group/other write dropped.
        self.assertEqual(stat.S_IMODE((out / "run.sh").stat().st_mode), 0o755)
        self.assertEqual(stat.S_IMODE((out / "deep/er/b").stat().st_mode), 0o600)
        self.assertEqual([p.name for p in out.rglob(f"{STAGE_PREFIX}*")], [])

    def test_copyThroughBufferWhereKernelCopyIsMissing(self) -> None:
        """Plain tars are copied with copy_file_range; without it, through a buffer."""
        payload = os.urandom(3 * MiB + 5)
        data = makeTar([fileMember("one", payload), fileMember("two", b"tail")])
        self.extract(data, "/workspace/kernel")
        self.patch(archives, "_kernelCopy", {"usable": False})
        self.extract(data, "/workspace/buffer")
        for copy in ("kernel", "buffer"):
            self.assertEqual((self.root / copy / "one").read_bytes(), payload)
            self.assertEqual((self.root / copy / "two").read_bytes(), b"tail")

    def test_relativeDestinationAndDefault(self) -> None:
        """A relative destination is taken inside the workspace, and with no destination the
        archive goes to the workspace root."""
        answer = self.extract(makeTar([fileMember("f", b"1")]), "sub")
        self.assertEqual(answer["destination"], "/workspace/sub")
        self.assertEqual((self.root / "sub/f").read_bytes(), b"1")
        self.assertEqual(self.extract(makeTar([]))["entry_count"], 0)

    def test_compressedArchives(self) -> None:
        """Gzip, bzip2 and xz compressed archives extract just like plain ones."""
        for compression in ("gz", "bz2", "xz"):
            data = makeTar([fileMember(f"{compression}.txt", compression.encode())], compression)
            self.assertEqual(self.extract(data)["bytes_written"], len(compression))
            self.assertEqual((self.root / f"{compression}.txt").read_text(), compression)

    def test_dotSlashFirstMember(self) -> None:
        """An archive made by `tar -C dir -cf - .` is accepted (the reference refuses it)."""
        tar = shutil.which("tar")
        if tar is None:
            raise self.skipTest("no tar command")
        source = self.outside / "tree"
        (source / "sub").mkdir(parents=True)
        (source / "sub/x").write_bytes(b"x")
        (source / "y").write_bytes(b"yy")
        data = subprocess.run(
            [tar, "-C", str(source), "-cf", "-", "."], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as listing:
            self.assertEqual(listing.getnames()[0], ".")
        answer = self.extract(data, "/workspace/copy")
        self.assertEqual(answer["entry_count"], 4)
        self.assertEqual((self.root / "copy/sub/x").read_bytes(), b"x")
        self.assertEqual((self.root / "copy/y").read_bytes(), b"yy")

    def test_replacesFilesAndSymlinks(self) -> None:
        """Extracting over an existing file or symlink replaces it with the archive's member."""
        (self.root / "f").write_bytes(b"old")
        os.symlink("f", self.root / "l")
        self.extract(makeTar([fileMember("f", b"new"), linkMember("l", "g")]))
        self.assertEqual((self.root / "f").read_bytes(), b"new")
        self.assertEqual(os.readlink(self.root / "l"), "g")

    def test_duplicatesLastOneWins(self) -> None:
        """When an archive holds the same file twice, the later member's contents are the ones
        kept, and both count as entries."""
        answer = self.extract(makeTar([fileMember("f", b"first"), fileMember("f", b"second")]))
        self.assertEqual(answer["entry_count"], 2)
        self.assertEqual((self.root / "f").read_bytes(), b"second")

    def test_overwriteDoesNotWriteThroughHardLink(self) -> None:
        """A file hard-linked to one outside is replaced, never written in place."""
        os.link(self.outside / "target", self.root / "f")
        self.extract(makeTar([fileMember("f", b"new")]))
        self.assertEqual((self.root / "f").read_bytes(), b"new")
        self.assertEqual((self.outside / "target").read_bytes(), b"outside")

    def test_refusedMembers(self) -> None:
        """Unsafe names, hard links, device and FIFO members and symlinks leading out of the
        workspace make the whole extraction fail with a clear message."""
        cases: list[tuple[list[Member], str]] = [
            ([fileMember(" ")], "archive member path is empty"),
            ([fileMember("/abs")], "absolute archive member paths are not allowed: /abs"),
            ([fileMember("../up")], "unsafe archive member path: ../up"),
            ([fileMember(".")], "unsafe archive member path: ."),
            (
                [linkMember("h", "f", tarfile.LNKTYPE)],
                "hard links are not allowed in workspace archives: h",
            ),
            ([specialMember("p", tarfile.FIFOTYPE)], "unsupported archive member type: p"),
            ([specialMember("c", tarfile.CHRTYPE)], "unsupported archive member type: c"),
            ([specialMember("b", tarfile.BLKTYPE)], "unsupported archive member type: b"),
            ([linkMember("l", "")], "symlink l has an empty target"),
            ([linkMember("l", "/etc/passwd")], "symlink l escapes the workspace"),
            ([linkMember("d/l", "../../x")], "symlink d/l escapes the workspace"),
        ]
        for members, message in cases:
            self.assertRefused(members, message)

    def test_noWritingThroughSymlinks(self) -> None:
        """No member is written through a symlink, whether it already existed or came earlier in
        the same archive, and even when the link stays inside the workspace."""
        os.symlink(self.outside, self.root / "out")
        self.assertRefused(
            [fileMember("out/target", b"x")],
            "archive member would traverse through a symlinked path: out/target",
        )
        self.assertRefused(
            [linkMember("l", "d"), fileMember("l/x", b"x")],
            "archive member would traverse through a symlinked path: l/x",
        )
        # A symlink that stays inside is still never written through.
        (self.root / "d").mkdir()
        os.symlink("d", self.root / "alias")
        self.assertRefused(
            [fileMember("alias/x", b"x")],
            "archive member would traverse through a symlinked path: alias/x",
        )

    def test_noWritingBelowFiles(self) -> None:
        """A member whose parent path is a file, already on disk or from earlier in the archive,
        is refused."""
        (self.root / "f").write_bytes(b"f")
        self.assertRefused(
            [fileMember("f/x", b"x")],
            "archive member would traverse through a non-directory path: f/x",
        )
        self.assertRefused(
            [fileMember("g", b"g"), dirMember("g/sub")],
            "archive member would traverse through a non-directory path: g/sub",
        )

    def test_conflicts(self) -> None:
        """A member whose type clashes with what is already at its path, on disk or made by an
        earlier member, is refused, and a dangling symlink is never written through."""
        (self.root / "f").write_bytes(b"f")
        (self.root / "d").mkdir()
        os.symlink("nowhere", self.root / "dangling")
        os.symlink("d", self.root / "dl")
        cases: list[tuple[list[Member], str]] = [
            ([dirMember("f")], "directory conflicts with existing path: f"),
            ([dirMember("dl")], "directory conflicts with existing path: dl"),
            ([fileMember("d", b"x")], "file conflicts with existing path: d"),
            ([fileMember("dl", b"x")], "file conflicts with existing path: dl"),
            # The reference writes through a dangling symlink, creating its target.
            ([fileMember("dangling", b"x")], "file conflicts with existing path: dangling"),
            ([linkMember("f", "d")], "symlink conflicts with existing path: f"),
            ([linkMember("d", "f")], "symlink conflicts with existing path: d"),
            # ...and with what earlier members make.
            ([fileMember("n", b"1"), dirMember("n")], "directory conflicts with existing path: n"),
            ([dirMember("m"), fileMember("m", b"1")], "file conflicts with existing path: m"),
            (
                [fileMember("k", b"1"), linkMember("k", "f")],
                "symlink conflicts with existing path: k",
            ),
            (
                [fileMember("q/x", b"1"), fileMember("q", b"1")],
                "file conflicts with existing path: q",
            ),
        ]
        for members, message in cases:
            self.assertRefused(members, message)

    def test_destinationChecks(self) -> None:
        """The destination must be a real directory inside the workspace: a file, a path below a
        file, a symlink or a path leaving the workspace is refused and nothing outside is
        touched."""
        (self.root / "f").write_bytes(b"f")
        os.symlink(self.outside, self.root / "out")
        members = [fileMember("x", b"x")]
        self.assertRefused(
            members, "workspace path is not a directory: /workspace/f", destination="/workspace/f"
        )
        self.assertRefused(
            members,
            "workspace path would traverse through a non-directory parent: /workspace/f/sub",
            destination="/workspace/f/sub",
        )
        self.assertRefused(
            members, "workspace path is a symlink: /workspace/out", destination="/workspace/out"
        )
        with self.assertRaises(ActionError):
            self.extract(makeTar(members), "/workspace/../etc")
        self.assertEqual(snapshot(self.outside)["target"][2], b"outside")

    def test_allOrNothingBad900thMember(self) -> None:
        """Every member is checked first: a bad 900th member leaves the workspace as it was."""
        members: list[Member] = [
            fileMember(f"dir{index % 7}/file{index}", b"x" * 10) for index in range(899)
        ]
        members.append(fileMember("../evil", b"evil"))
        self.assertRefused(members, "unsafe archive member path: ../evil")
        self.assertEqual(os.listdir(self.root), [])

    def test_failureWhileWritingRollsBack(self) -> None:
        """A stream cut inside the last member's data: staged files and new dirs are removed."""
        (self.root / "keep").write_bytes(b"old")
        data = makeTar(
            [
                fileMember("keep", b"new"),
                fileMember("new/dir/a", b"a" * 5000),
                fileMember("new/b", b"b" * 100_000),
            ]
        )
        before = snapshot(self.root)
        with self.assertRaises(ActionError) as caught:
            self.extract(data[: len(data) - 60_000])
        self.assertIn("unexpected end of data", str(caught.exception))
        self.assertEqual(snapshot(self.root), before)

    def test_writeFailureRollsBack(self) -> None:
        """A real write error midway (EFBIG under RLIMIT_FSIZE, as ENOSPC would be)."""
        (self.root / "keep").write_bytes(b"old")
        for copy in ("kernel", "buffer"):
            self.archive.write_bytes(
                makeTar(
                    [
                        fileMember("keep", b"new"),
                        fileMember("new/dir/small", b"s" * 1000),
                        fileMember("new/big", os.urandom(2 * MiB)),
                    ]
                )
            )
            before = snapshot(self.root)
            script = (
                "import resource, signal, sys\n"
                "from pathlib import Path\n"
                "from pyro_reactor.capabilities import archives\n"
                "from pyro_reactor.errors import ActionError\n"
                "from pyro_reactor.system.workspace import Workspace\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))\n"
                "archives._kernelCopy['usable'] = sys.argv[3] == 'kernel'\n"
                "workspace = Workspace(Path(sys.argv[1]))\n"
                "try:\n"
                "    archives.extractArchive(workspace, Path(sys.argv[2]),"
                " workspace.resolve('/workspace'))\n"
                "except ActionError as error:\n"
                "    print(error)\n"
            )
            result = subprocess.run(
                [sys.executable, "-c", script, str(self.root), str(self.archive), copy],
                capture_output=True,
                text=True,
                check=True,
            )
            self.assertEqual(
                result.stdout.strip(), "could not extract archive member new/big: File too large"
            )
            self.assertEqual(snapshot(self.root), before)

    def test_damagedArchives(self) -> None:
        """An empty, garbage or truncated archive fails with an error and leaves the workspace
        exactly as it was."""
        for data in (
            b"",
            b"not a tar at all" * 100,
            makeTar([fileMember("f", os.urandom(50_000))], "gz")[:20_000],
        ):
            before = snapshot(self.root)
            with self.assertRaises(ActionError):
                self.extract(data)
            self.assertEqual(snapshot(self.root), before)


class SecretTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.state = base / "state"
        self.root = self.state / "pyro-secrets"
        self.root.mkdir(parents=True)
        self.archive = base / "secrets.tar"
        self.events = recordEvents(self)

    def install(self, members: list[Member]) -> dict[str, Any]:
        self.archive.write_bytes(makeTar(members))
        return installSecrets(self.root, self.archive)

    def test_modesFromCreation(self) -> None:
        """Installed secrets are readable by the owner only: files get mode 0600 and directories
        0700 whatever modes the archive carries."""
        answer = self.install(
            [
                fileMember("TOKEN", b"tok", mode=0o644),
                dirMember("db", mode=0o755),
                fileMember("db/password", b"pw", mode=0o777),
                fileMember("implicit/dir/key", b"k"),
            ]
        )
        self.assertEqual(
            answer, {"destination": str(self.root), "entry_count": 4, "bytes_written": 6}
        )
        self.assertEqual(stat.S_IMODE(self.root.stat().st_mode), 0o700)
        tree = snapshot(self.root)
        self.assertEqual(tree["TOKEN"], ("file", 0o600, b"tok"))
        self.assertEqual(tree["db/password"], ("file", 0o600, b"pw"))
        for directory in ("db", "implicit", "implicit/dir"):
            self.assertEqual(tree[directory], ("directory", 0o700, None))

    def test_newSetReplacesOldAsAWhole(self) -> None:
        """Installing secrets replaces the previous set as a whole, so no old secret lingers, and
        leaves no staging directory behind."""
        self.install([fileMember("OLD", b"1"), fileMember("d/OLD2", b"2")])
        self.install([fileMember("NEW", b"3")])
        self.assertEqual(snapshot(self.root), {"NEW": ("file", 0o600, b"3")})
        self.assertEqual(os.listdir(self.state), ["pyro-secrets"])

    def test_failedInstallKeepsPreviousSecrets(self) -> None:
        """A refused secret archive leaves the previously installed secrets untouched, and no
        secret value appears in the logs."""
        self.install([fileMember("KEEP", b"kept-value")])
        before = snapshot(self.root)
        cases: list[tuple[list[Member], str]] = [
            (
                [fileMember("A", b"hunter2"), linkMember("L", "A")],
                "secret archive may not contain links: L",
            ),
            (
                [fileMember("A", b"hunter2"), linkMember("H", "A", tarfile.LNKTYPE)],
                "secret archive may not contain links: H",
            ),
            ([specialMember("P", tarfile.FIFOTYPE)], "unsupported secret archive member type: P"),
            ([fileMember("../A", b"hunter2")], "unsafe archive member path: ../A"),
            ([fileMember("/A", b"hunter2")], "absolute archive member paths are not allowed: /A"),
            (
                [fileMember("A", b"hunter2"), dirMember("A")],
                "directory conflicts with existing path: A",
            ),
        ]
        for members, message in cases:
            with self.assertRaises(ActionError) as caught:
                self.install(members)
            self.assertEqual(str(caught.exception), message)
            self.assertEqual(snapshot(self.root), before)
            self.assertEqual(os.listdir(self.state), ["pyro-secrets"])
        logged = "\n".join(formatEvent(event) + repr(event) for event in self.events)
        self.assertNotIn("hunter2", logged)
        self.assertNotIn("kept-value", logged)

    def test_truncatedSecretsKeepPrevious(self) -> None:
        """A truncated secret archive fails without quoting secret contents in its error and
        keeps the previous secrets in place."""
        self.install([fileMember("KEEP", b"kept")])
        data = makeTar([fileMember("A", b"s" * 3000), fileMember("B", b"t" * 30000)])
        self.archive.write_bytes(data[:20000])
        with self.assertRaises(ActionError) as caught:
            installSecrets(self.root, self.archive)
        self.assertNotIn("ssss", str(caught.exception))
        self.assertEqual(snapshot(self.root), {"KEEP": ("file", 0o600, b"kept")})

    def test_withoutAtomicExchange(self) -> None:
        """Where renameat2 is missing, two renames still leave exactly the new set."""
        self.patch(archives, "exchange", lambda dirfd, first, second: False)
        self.install([fileMember("OLD", b"1")])
        self.install([fileMember("NEW", b"2")])
        self.assertEqual(snapshot(self.root), {"NEW": ("file", 0o600, b"2")})
        self.assertEqual(os.listdir(self.state), ["pyro-secrets"])


class ExportTests(_WorkspaceCase):
    def setUp(self) -> None:
        super().setUp()
        self.spool = self.root.parent / "spool"
        (self.root / "tree/sub").mkdir(parents=True)
        (self.root / "tree/b.txt").write_bytes(b"bee")
        (self.root / "tree/a.bin").write_bytes(b"\x00\x01" * 1000)
        (self.root / "tree/sub/c").write_bytes(b"c")
        os.symlink(self.outside / "target", self.root / "tree/escape")
        os.symlink("b.txt", self.root / "tree/sub/rel")

    def export(self, path: str) -> tuple[dict[str, Any], list[tarfile.TarInfo], tarfile.TarFile]:
        answer = archives.buildExport(self.workspace, self.workspace.resolve(path), self.spool)
        data = answer.path.read_bytes()
        answer.path.unlink()
        self.assertEqual(answer.header["archive_size"], len(data))
        archive = tarfile.open(fileobj=io.BytesIO(data))  # noqa: SIM115
        self.addCleanup(archive.close)
        return answer.header, archive.getmembers(), archive

    def test_directory(self) -> None:
        """Exporting a directory sends a tar of its files, subdirectories and symlinks with a
        header giving the type, entry count and bytes; symlinks are archived as links, never
        followed."""
        header, members, archive = self.export("/workspace/tree")
        self.assertEqual(
            [(m.name, m.type) for m in members],
            [
                ("a.bin", tarfile.REGTYPE),
                ("b.txt", tarfile.REGTYPE),
                ("escape", tarfile.SYMTYPE),
                ("sub", tarfile.DIRTYPE),
                ("sub/c", tarfile.REGTYPE),
                ("sub/rel", tarfile.SYMTYPE),
            ],
        )
        self.assertEqual(
            {k: v for k, v in header.items() if k != "archive_size"},
            {
                "workspace_path": "/workspace/tree",
                "artifact_type": "directory",
                "entry_count": 6,
                "bytes_written": 2004,
            },
        )
        # Symlinks are archived as links, never followed (this one points outside).
        self.assertEqual(members[2].linkname, str(self.outside / "target"))
        extracted = archive.extractfile(members[0])
        assert extracted is not None
        self.assertEqual(extracted.read(), b"\x00\x01" * 1000)

    def test_workspaceRootAndFile(self) -> None:
        """The workspace root and a single file can both be exported, a file as a one-entry
        archive."""
        header, members, _ = self.export("/workspace")
        self.assertEqual(members[0].name, "tree")
        header, members, _ = self.export("/workspace/tree/b.txt")
        self.assertEqual(
            (header["artifact_type"], header["entry_count"], header["bytes_written"]),
            ("file", 1, 3),
        )
        self.assertEqual([m.name for m in members], ["b.txt"])

    def test_symlink(self) -> None:
        """Exporting a symlink sends the link itself as a one-entry archive, not what it points
        at."""
        header, members, _ = self.export("/workspace/tree/escape")
        self.assertEqual(
            (header["artifact_type"], header["entry_count"], header["bytes_written"]),
            ("symlink", 1, 0),
        )
        self.assertEqual(
            [(m.name, m.type, m.size) for m in members], [("escape", tarfile.SYMTYPE, 0)]
        )

    def test_symlinkedParentsInsideAreFollowed(self) -> None:
        """As list_workspace and the reference: a read follows parents that stay inside."""
        os.symlink("tree", self.root / "alias")
        header, members, _ = self.export("/workspace/alias/sub")
        self.assertEqual(header["workspace_path"], "/workspace/alias/sub")
        self.assertEqual([m.name for m in members], ["c", "rel"])
        header, members, _ = self.export("/workspace/alias")
        self.assertEqual(
            (header["artifact_type"], [m.name for m in members]), ("symlink", ["alias"])
        )

    def test_hardLinksExportedAsFiles(self) -> None:
        """Unlike tarfile's add(), an export can always be extracted again."""
        os.link(self.root / "tree/b.txt", self.root / "tree/sub/hard")
        _, members, _ = self.export("/workspace/tree")
        self.assertEqual([m.type for m in members if m.name == "sub/hard"], [tarfile.REGTYPE])
        self.assertTrue(all(m.type != tarfile.LNKTYPE for m in members))

    def test_errors(self) -> None:
        """Exporting a missing path, a FIFO or a path through a symlink out of the workspace
        fails with a clear message and leaves nothing in the spool."""
        os.mkfifo(self.root / "fifo")
        cases = {
            "/workspace/missing": "workspace path does not exist: /workspace/missing",
            "/workspace/fifo": "unsupported workspace path type: /workspace/fifo",
            "/workspace/tree/escape/x": (
                "workspace path would leave the workspace through a symlink:"
                " /workspace/tree/escape/x"
            ),
        }
        for path, message in cases.items():
            with self.assertRaises(ActionError) as caught:
                self.export(path)
            self.assertEqual(str(caught.exception), message)
        self.assertFalse(self.spool.exists() and os.listdir(self.spool))

    def test_roundTrip(self) -> None:
        """An exported directory extracts back to an identical tree, except that a symlink
        pointing outside the workspace is refused on the way back in."""
        answer = archives.buildExport(
            self.workspace, self.workspace.resolve("/workspace/tree"), self.spool
        )
        self.addCleanup(answer.path.unlink)
        # The link pointing outside cannot come back in; everything else does.
        with self.assertRaises(ActionError) as caught:
            extractArchive(self.workspace, answer.path, self.workspace.resolve("/workspace/copy"))
        self.assertEqual(str(caught.exception), "symlink escape escapes the workspace")
        (self.root / "tree/escape").unlink()
        answer = archives.buildExport(
            self.workspace, self.workspace.resolve("/workspace/tree"), self.spool
        )
        self.addCleanup(answer.path.unlink)
        extractArchive(self.workspace, answer.path, self.workspace.resolve("/workspace/copy"))
        self.assertEqual(snapshot(self.root / "copy"), snapshot(self.root / "tree"))


class TransferLogTests(SynchronousTestCase):
    def test_progressEventsAndFinalLine(self) -> None:
        """A long transfer logs progress events while it runs and one final event with its bytes
        and rate in MB/s, and nothing after it ends."""
        events = recordEvents(self)
        clock = Clock()
        transfer = Transfer.begin("extract_archive", clock)
        transfer.bytes, transfer.entries = 10_000_000, 3
        clock.advance(5)
        transfer.bytes = 20_000_000
        clock.advance(5)
        self.assertEqual(transfer.end({"ok": 1}), {"ok": 1})
        clock.advance(30)
        mine = [e for e in events if e.get("action") == "extract_archive"]
        self.assertEqual([e["outcome"] for e in mine], ["progress", "progress", "transferred"])
        self.assertEqual(mine[-1]["bytes"], 20_000_000)
        self.assertEqual(mine[-1]["rate_mbps"], 2.0)
        self.assertIn("MB/s", formatEvent(mine[-1]))


class ProtocolProgressTests(SynchronousTestCase):
    """The protocol's part of the transfer logs: upload and export progress, then totals."""

    def setUp(self) -> None:
        self.spool = Path(self.mktemp())
        self.spool.mkdir()
        self.clock = Clock()
        self.events = recordEvents(self)
        self.received: list[int] = []
        self.dispatcher = Dispatcher(spoolDirectory=self.spool)
        self.dispatcher.register(
            [
                Action("extract_archive", self.upload, upload=True),
                Action("export_archive", self.export),
            ]
        )

    def upload(self, request: Request) -> dict[str, Any]:
        assert request.upload is not None
        self.received.append(request.upload.stat().st_size)
        return {"ok": True}

    def export(self, request: Request) -> StreamedAnswer:
        path = self.spool / "export.tar"
        path.write_bytes(b"t" * (3 * MiB))
        return StreamedAnswer({"archive_size": 3 * MiB}, path)

    def connect(self) -> tuple[RequestProtocol, StringTransport]:
        protocol = RequestProtocol(self.dispatcher, self.clock, self.spool, 1000, 60)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def outcomes(self, action: str) -> list[tuple[str, int]]:
        return [
            (e["outcome"], e["bytes"])
            for e in self.events
            if e.get("action") == action and "bytes" in e
        ]

    def test_uploadProgress(self) -> None:
        """While an archive uploads, the agent logs how many bytes have arrived and logs once
        more when the whole upload is received."""
        protocol, _ = self.connect()
        protocol.dataReceived(b'{"action": "extract_archive", "archive_size": 3000}\n')
        for _ in range(3):
            protocol.dataReceived(b"x" * 1000)
            self.clock.advance(6)
        self.assertEqual(self.received, [3000])
        self.assertEqual(
            self.outcomes("extract_archive"),
            [("upload in progress", 2000), ("upload received", 3000)],
        )

    def test_exportProgressAndTotal(self) -> None:
        """While a host slowly pulls an export, the agent logs progress and then the total bytes
        sent, and removes the spooled archive afterwards."""
        protocol, transport = self.connect()
        protocol.dataReceived(b'{"action": "export_archive"}\n')
        # StringTransport pulls nothing by itself: pull the file as a slow host would.
        assert transport.producer is not None
        producer = transport.producer
        for _ in range(4):
            producer.resumeProducing()
            self.clock.advance(5)
        while not transport.disconnecting:
            producer.resumeProducing()
        outcomes = self.outcomes("export_archive")
        self.assertEqual(outcomes[0][0], "export in progress")
        self.assertEqual(outcomes[-1], ("export sent", 3 * MiB))
        self.assertFalse((self.spool / "export.tar").exists())


class _Uploader(Protocol):
    """Sends a request line and body in parts, on demand, and collects the answer."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(bytes(self.received))


async def _connect(agent: RunningAgent) -> _Uploader:
    uploader = _Uploader()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port), uploader)
    return uploader


async def _until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


def _zeroTar(size: int) -> tuple[bytes, bytes]:
    """The header and trailer of a plain tar of one file of ``size`` zero bytes."""
    member = tarfile.TarInfo("big.bin")
    member.size = size
    header = member.tobuf(tarfile.PAX_FORMAT)
    padding = (512 - size % 512) % 512
    return header, b"\0" * (padding + 1024)


class OverTheWireTests(TestCase):
    async def test_extractAndExportRoundTrip(self) -> None:
        """Over a real connection an uploaded archive is extracted and exported back with the
        header fields in the reference order, errors come back as `error` answers, and each
        transfer is logged with its bytes, entries and rate."""
        events = recordEvents(self)
        agent = await startAgent(self)
        data = makeTar([fileMember("p/q.txt", b"payload"), linkMember("p/l", "q.txt")], "gz")
        answer = await agent.call(
            {
                "action": "extract_archive",
                "destination": "/workspace/up",
                "archive_size": len(data),
            },
            data,
        )
        self.assertEqual(
            answer, {"destination": "/workspace/up", "entry_count": 2, "bytes_written": 7}
        )
        raw = await agent.exchange({"action": "export_archive", "path": "/workspace/up/p"})
        line, _, body = raw.partition(b"\n")
        header = json.loads(line)
        self.assertEqual(
            list(header),
            ["workspace_path", "artifact_type", "archive_size", "entry_count", "bytes_written"],
        )
        self.assertEqual(header["archive_size"], len(body))
        with tarfile.open(fileobj=io.BytesIO(body)) as archive:
            members = archive.getmembers()
        self.assertEqual(
            [(m.name, m.type) for m in members],
            [("l", tarfile.SYMTYPE), ("q.txt", tarfile.REGTYPE)],
        )
        self.assertEqual(os.listdir(agent.context.config.spoolRoot), [])
        missing = await agent.call({"action": "export_archive", "path": "/workspace/nope"})
        self.assertEqual(missing, {"error": "workspace path does not exist: /workspace/nope"})
        # Each transfer is logged once it ends, with its bytes, entries and rate.
        ended = {(e.get("action"), e.get("outcome")): e for e in events}
        self.assertEqual(ended["extract_archive", "upload received"]["bytes"], len(data))
        self.assertEqual(ended["extract_archive", "transferred"]["entries"], 2)
        self.assertEqual(ended["export_archive", "transferred"]["entries"], 2)
        self.assertEqual(ended["export_archive", "export sent"]["bytes"], len(body))
        self.assertIn("rate_mbps", ended["export_archive", "export sent"])

    async def test_installSecretsOverTheWire(self) -> None:
        """Over a real connection `install_secrets` installs the uploaded files owner-only under
        the secret root and reports what it wrote."""
        agent = await startAgent(self)
        data = makeTar([fileMember("API_KEY", b"abc123")])
        answer = await agent.call({"action": "install_secrets", "archive_size": len(data)}, data)
        root = agent.context.config.secretRoot
        self.assertEqual(answer, {"destination": str(root), "entry_count": 1, "bytes_written": 6})
        self.assertEqual(snapshot(root), {"API_KEY": ("file", 0o600, b"abc123")})

    async def test_cutOffUpload(self) -> None:
        """The client goes away mid-body: the spool is removed and the workspace untouched."""
        agent = await startAgent(self)
        (agent.workspace / "keep").write_bytes(b"k")
        before = snapshot(agent.workspace)
        data = makeTar([fileMember("f", b"x" * 200_000)])
        uploader = await _connect(agent)
        request = {"action": "extract_archive", "archive_size": len(data)}
        uploader.send(json.dumps(request).encode() + b"\n" + data[: len(data) // 2])
        spool = agent.context.config.spoolRoot
        await _until(lambda: any(p.stat().st_size >= len(data) // 2 for p in spool.iterdir()))
        assert uploader.transport is not None
        uploader.transport.loseConnection()
        await uploader.done
        await _until(lambda: not os.listdir(spool))
        self.assertEqual(snapshot(agent.workspace), before)

    async def test_pingAnswersWhile200MiBUploads(self) -> None:
        """The agent keeps answering `ping` while a 200 MiB archive is still uploading, and then
        extracts that archive completely."""
        agent = await startAgent(self)
        size = 200 * MiB
        header, trailer = _zeroTar(size)
        uploader = await _connect(agent)
        request = {
            "action": "extract_archive",
            "destination": "big",
            "archive_size": len(header) + size + len(trailer),
        }
        uploader.send(json.dumps(request).encode() + b"\n" + header)
        chunk = b"\0" * MiB
        for _ in range(size // MiB // 2):
            uploader.send(chunk)
        spool = agent.context.config.spoolRoot
        await _until(lambda: any(p.stat().st_size > 50 * MiB for p in spool.iterdir()), 60)
        pong = await agent.call({"action": "ping"})
        self.assertTrue(pong["pong"])
        self.assertEqual(uploader.received, b"")  # the upload is still waiting for its body
        for _ in range(size // MiB // 2):
            uploader.send(chunk)
        uploader.send(trailer)
        answer = json.loads(await uploader.done)
        self.assertEqual(
            answer, {"destination": "/workspace/big", "entry_count": 1, "bytes_written": size}
        )
        self.assertEqual((agent.workspace / "big/big.bin").stat().st_size, size)
        self.assertEqual(os.listdir(spool), [])

    async def test_pingAnswersWhileExtracting(self) -> None:
        """Extraction runs in a worker thread: a ping sent behind it is answered first."""
        agent = await startAgent(self)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
            for index in range(4):
                member = tarfile.TarInfo(f"zero{index}")
                member.size = 50 * MiB
                archive.addfile(member, _Zeros(member.size))
        data = buffer.getvalue()
        order: list[str] = []
        extracted = agent.call({"action": "extract_archive", "archive_size": len(data)}, data)

        def done(answer: dict[str, Any]) -> dict[str, Any]:
            order.append("extract")
            return answer

        extracted.addCallback(done)
        # Staged files appear once the checks are done and writing has begun.
        await _until(lambda: bool(list(agent.workspace.iterdir())) or bool(order), 30)
        pong = await agent.call({"action": "ping"})
        order.append("ping")
        self.assertTrue(pong["pong"])
        answer = await extracted
        self.assertEqual(answer["bytes_written"], 200 * MiB)
        self.assertEqual(order, ["ping", "extract"])


class _Zeros(io.RawIOBase):
    """A readable stream of ``size`` zero bytes, without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b"\0" * count
        self.left -= count
        return count


class FilterFallbackTests(SynchronousTestCase):
    """Before Python 3.11.4 (Debian 12's guests) there is no ``tarfile.data_filter``."""

    def test_fallbackGivesTheFilterModes(self) -> None:
        """The modes computed without the filter are the ones the filter gives."""
        cases = []
        for kind in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE):
            for mode in (0o644, 0o755, 0o777, 0o4755, 0o2711, 0o600, 0o000, 0o070, 0o1777):
                member = tarfile.TarInfo("a/b")
                member.type = kind
                member.mode = mode
                if kind == tarfile.SYMTYPE:
                    member.linkname = "c"
                cases.append(member)
        withFilter = [archives._filteredMode(m, m.name, m.name) for m in cases]
        self.patch(tarfile, "data_filter", None)  # restored after the test
        delattr(tarfile, "data_filter")
        withoutFilter = [archives._filteredMode(m, m.name, m.name) for m in cases]
        self.assertEqual(withoutFilter, withFilter)
        self.assertIn(0o755, withFilter)
        self.assertIn(None, withFilter)

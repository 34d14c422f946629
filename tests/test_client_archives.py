"""The host side of archives: what an upload packs, and what a download refuses to unpack."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.client.archives import (
    UnsafeArchiveError,
    buildSecretsArchive,
    buildUploadArchive,
    extractSafely,
)


def makeTar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
    return info


def snapshot(root: Path) -> list[str]:
    found = []
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(base, name), root))
    return sorted(found)


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()

    def test_directoryContentsNotTheDirectoryItself(self) -> None:
        """Uploading a directory packs its contents (files, subdirectories, symlinks as links),
        not the directory itself, and reports the archive's size."""
        tree = self.base / "tree"
        (tree / "a" / "b").mkdir(parents=True)
        (tree / "a" / "b" / "f.txt").write_text("f")
        (tree / "top").write_text("t")
        os.symlink("top", tree / "link")
        archive, size = buildUploadArchive(tree, spool=self.base)
        self.addCleanup(archive.unlink)
        self.assertEqual(size, archive.stat().st_size)
        with tarfile.open(archive) as tar:
            names = {m.name: m for m in tar.getmembers()}
        self.assertEqual(sorted(names), ["a", "a/b", "a/b/f.txt", "link", "top"])
        self.assertTrue(names["link"].issym())
        self.assertEqual(names["link"].linkname, "top")

    def test_singleFileUnderItsName(self) -> None:
        """Uploading a single file packs it under its own name."""
        source = self.base / "one.bin"
        source.write_bytes(b"\x00\x01")
        archive, _ = buildUploadArchive(source, spool=self.base)
        self.addCleanup(archive.unlink)
        with tarfile.open(archive) as tar:
            self.assertEqual(tar.getnames(), ["one.bin"])

    def test_hardLinksArePackedAsFiles(self) -> None:
        """Hard links are packed as plain files with their content, since the agent refuses hard-
        link members."""
        tree = self.base / "tree"
        tree.mkdir()
        (tree / "a").write_text("same")
        os.link(tree / "a", tree / "b")
        archive, _ = buildUploadArchive(tree, spool=self.base)
        self.addCleanup(archive.unlink)
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            self.assertTrue(all(m.isfile() for m in members))
            reader = tar.extractfile("b")
            assert reader is not None
            self.assertEqual(reader.read(), b"same")

    def test_specialFilesAreRefusedAndNoTempFileIsLeft(self) -> None:
        """A FIFO in an upload is refused with a clear error and no temporary archive is left in
        the spool."""
        tree = self.base / "tree"
        tree.mkdir()
        spool = self.base / "spool"
        spool.mkdir()
        os.mkfifo(tree / "fifo")
        with self.assertRaises(UnsafeArchiveError) as caught:
            buildUploadArchive(tree, spool=spool)
        self.assertIn("not a file, directory or symlink", str(caught.exception))
        self.assertEqual(os.listdir(spool), [])

    def test_secretsArchive(self) -> None:
        """A secrets archive holds each value as a 0600 file named after its key, text and bytes
        alike."""
        archive = buildSecretsArchive({"TOKEN": "abc", "RAW": b"\x00"}, spool=self.base)
        self.addCleanup(archive.unlink)
        with tarfile.open(archive) as tar:
            self.assertEqual(
                [(m.name, m.size, m.mode) for m in tar.getmembers()],
                [("TOKEN", 3, 0o600), ("RAW", 1, 0o600)],
            )


class ExtractTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.target = self.base / "target"
        self.target.mkdir()
        (self.target / "existing.txt").write_text("keep")

    def refused(self, *members: tuple[tarfile.TarInfo, bytes | None]) -> str:
        archive = makeTar(self.base / "bad.tar", *members)
        before = snapshot(self.base)
        with self.assertRaises(UnsafeArchiveError) as caught:
            extractSafely(archive, self.target)
        # All-or-nothing: the good members before the bad one were not written either.
        self.assertEqual(snapshot(self.base), before)
        return str(caught.exception)

    def test_goodArchive(self) -> None:
        """A download with a ./ member, directories, files and an inward symlink is extracted and
        every written path is returned."""
        archive = makeTar(
            self.base / "good.tar",
            (member("./", tarfile.DIRTYPE), None),
            (member("d", tarfile.DIRTYPE), None),
            (member("d/f.txt"), b"hello"),
            (member("d/up", tarfile.SYMTYPE, "../existing.txt"), None),
        )
        written = extractSafely(archive, self.target)
        self.assertEqual(
            written, [self.target / "d", self.target / "d/f.txt", self.target / "d/up"]
        )
        self.assertEqual((self.target / "d" / "f.txt").read_text(), "hello")
        self.assertEqual((self.target / "d" / "up").read_text(), "keep")
        self.assertEqual(oct((self.target / "d" / "f.txt").stat().st_mode & 0o777), oct(0o644))

    def test_escapingNames(self) -> None:
        """Member names with .. escapes or absolute paths are refused before anything is written."""
        good = (member("fine.txt"), b"x")
        self.assertIn("leaves the directory", self.refused(good, (member("../evil"), b"x")))
        self.assertIn("leaves the directory", self.refused(good, (member("a/../../evil"), b"x")))
        self.assertIn("absolute path", self.refused(good, (member("/etc/evil"), b"x")))

    def test_escapingLinks(self) -> None:
        """Symlinks pointing outside the target (absolute, .., or empty) are refused."""
        good = (member("fine.txt"), b"x")
        for target in ("/etc/passwd", "../outside", "a/../../outside", ""):
            message = self.refused(good, (member("l", tarfile.SYMTYPE, target), None))
            self.assertIn("refusing symlink l", message)

    def test_membersBelowALink(self) -> None:
        """A member that would be written through a symlink from the same archive is refused."""
        message = self.refused(
            (member("d", tarfile.DIRTYPE), None),
            (member("l", tarfile.SYMTYPE, "d"), None),
            (member("l/f"), b"x"),
        )
        self.assertIn("below a symlink", message)

    def test_existingSymlinkOnDiskIsNotFollowed(self) -> None:
        """A symlink already on disk under the target is never followed: writing below it or over
        it is refused and its target stays untouched."""
        outside = self.base / "outside"
        outside.mkdir()
        os.symlink(outside, self.target / "sneaky")
        message = self.refused((member("sneaky/f"), b"x"))
        self.assertIn("is a symlink on this host", message)
        message = self.refused((member("sneaky"), b"x"))
        self.assertIn("is a symlink on this host", message)
        self.assertEqual(os.listdir(outside), [])

    def test_hardLinksAndDevices(self) -> None:
        """Hard links and device files in a download are refused."""
        self.assertIn(
            "hard link", self.refused((member("h", tarfile.LNKTYPE, "existing.txt"), None))
        )
        self.assertIn("special file", self.refused((member("c", tarfile.CHRTYPE), None)))

    def test_conflicts(self) -> None:
        """A file member over an existing directory, or a directory member over an existing file,
        is refused."""
        (self.target / "dir").mkdir()
        self.assertIn("conflicts with the directory", self.refused((member("dir"), b"x")))
        self.assertIn(
            "conflicts with the file",
            self.refused((member("existing.txt", tarfile.DIRTYPE), None)),
        )

    def test_existingFilesAreReplaced(self) -> None:
        """An existing file is replaced by the archive's version and no temporary file is left
        beside it."""
        archive = makeTar(self.base / "new.tar", (member("existing.txt"), b"new"))
        extractSafely(archive, self.target)
        self.assertEqual((self.target / "existing.txt").read_text(), "new")
        self.assertEqual([n for n in os.listdir(self.target) if n.startswith(".pyro")], [])

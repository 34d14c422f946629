"""Guest path normalisation and the kernel-confined workspace primitives.

Every primitive test runs twice: with ``openat2`` (where the kernel has it) and with the
``O_NOFOLLOW`` walk forced, since guests on old kernels take the walk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.errors import ActionError
from pyro_reactor.system._linux import openat2Function, probedOpenat2
from pyro_reactor.system.workspace import (
    RESOLVE_BENEATH,
    RESOLVE_NO_SYMLINKS,
    TEMP_PREFIX,
    EscapingSymlink,
    GuestPath,
    MissingPath,
    NotADirectoryInPath,
    NotARegularFile,
    SymlinkInPath,
    Workspace,
    WorkspaceError,
    openat2Available,
    processUmask,
    resolveGuestPath,
    walkTree,
)

ROOT = Path("/srv/ws")


class ResolveTests(SynchronousTestCase):
    """``resolve`` follows the reference's normalisation, but refuses ``..``."""

    def assertResolves(self, guest: str, text: str, parts: tuple[str, ...]) -> None:
        path = resolveGuestPath(ROOT, guest)
        self.assertEqual((path.text, path.parts), (text, parts))
        self.assertEqual(path.hostPath, ROOT.joinpath(*parts))

    def assertRefused(self, guest: str, message: str) -> None:
        error = self.assertRaises(ActionError, resolveGuestPath, ROOT, guest)
        self.assertEqual(str(error), message)

    def test_absolute(self) -> None:
        """An absolute `/workspace/...` path resolves to the same place inside the workspace."""
        self.assertResolves("/workspace/a/b.txt", "/workspace/a/b.txt", ("a", "b.txt"))

    def test_relativeIsUnderWorkspace(self) -> None:
        """A relative path is taken under `/workspace`, even one that is itself named
        `workspace`."""
        self.assertResolves("a/b", "/workspace/a/b", ("a", "b"))
        self.assertResolves("workspace", "/workspace/workspace", ("workspace",))

    def test_emptyAndDotPartsDropped(self) -> None:
        """`.` parts, doubled and trailing slashes and surrounding spaces are dropped from a
        path."""
        self.assertResolves("/workspace/./a//b/.", "/workspace/a/b", ("a", "b"))
        self.assertResolves("  a/b/  ", "/workspace/a/b", ("a", "b"))

    def test_root(self) -> None:
        """Every spelling of the workspace root resolves to the root itself."""
        for guest in ("/workspace", "/workspace/", ".", "/workspace/.", "./"):
            path = resolveGuestPath(ROOT, guest)
            self.assertEqual((path.text, path.parts, path.hostPath), ("/workspace", (), ROOT))
            self.assertTrue(path.isRoot)

    def test_empty(self) -> None:
        """An empty or blank path is refused."""
        self.assertRefused("", "destination must not be empty")
        self.assertRefused("  ", "destination must not be empty")

    def test_outside(self) -> None:
        """Paths outside `/workspace`, including look-alike prefixes such as `/workspacex`, are
        refused."""
        for guest in ("/", "/etc/hostname", "/workspacex/a", "/work", "//workspace/a"):
            self.assertRefused(guest, "destination must stay inside /workspace")

    def test_dotDotRefused(self) -> None:
        """Any `..` part is refused, even one that would end up back inside the workspace."""
        for guest in (
            "/workspace/../etc/hostname",
            "..",
            "../x",
            "a/../b",
            "/workspace/a/..",
            "/etc/../workspace/a",
        ):
            self.assertRefused(
                guest, "destination must stay inside /workspace: '..' is not allowed"
            )

    def test_nul(self) -> None:
        """A path containing a NUL byte is refused."""
        self.assertRefused("a\x00b", "destination must not contain NUL bytes")

    def test_child(self) -> None:
        """A child name extends a resolved path by one plain component, and names that are empty,
        dots, nested or hold NUL are refused."""
        path = resolveGuestPath(ROOT, "a").child("b")
        self.assertEqual(path, GuestPath("/workspace/a/b", ("a", "b"), ROOT / "a" / "b"))
        for bad in ("", ".", "..", "x/y", "x\x00"):
            self.assertRaises(WorkspaceError, path.child, bad)


class Openat2Tests(SynchronousTestCase):
    """The raw ``openat2`` call: the kernel itself keeps us beneath the directory."""

    def setUp(self) -> None:
        function = openat2Function()
        if function is None:
            raise self.skipTest("openat2 is not available on this machine")
        self.openat2 = function
        base = Path(self.mktemp()).absolute()
        (base / "ws" / "d").mkdir(parents=True)
        (base / "ws" / "etc").symlink_to("/etc")
        (base / "ws" / "up").symlink_to("..")
        (base / "ws" / "inner").symlink_to("d")
        self.root = os.open(base / "ws", os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, self.root)

    def openErrno(self, path: bytes, resolve: int) -> int:
        try:
            os.close(self.openat2(self.root, path, os.O_RDONLY | os.O_CLOEXEC, resolve))
        except OSError as error:
            return error.errno or 0
        return 0

    def test_beneath(self) -> None:
        """The kernel's RESOLVE_BENEATH lets a lookup move around beneath the directory but
        refuses any path, absolute, `..` or through a symlink, that leaves it."""
        self.assertEqual(self.openErrno(b"d", RESOLVE_BENEATH), 0)
        self.assertEqual(self.openErrno(b"inner/../d", RESOLVE_BENEATH), 0)
        self.assertEqual(self.openErrno(b"../ws/d", RESOLVE_BENEATH), errno.EXDEV)
        self.assertEqual(self.openErrno(b"/etc", RESOLVE_BENEATH), errno.EXDEV)
        self.assertEqual(self.openErrno(b"etc/hostname", RESOLVE_BENEATH), errno.EXDEV)
        self.assertEqual(self.openErrno(b"up/ws", RESOLVE_BENEATH), errno.EXDEV)

    def test_noSymlinks(self) -> None:
        """With RESOLVE_NO_SYMLINKS the kernel refuses every symlink, including ones that stay
        inside."""
        strict = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
        self.assertEqual(self.openErrno(b"etc/hostname", strict), errno.ELOOP)
        self.assertEqual(self.openErrno(b"inner", strict), errno.ELOOP)


class WorkspacePrimitiveTests(SynchronousTestCase):
    """The primitives with ``openat2`` (skipped where the kernel lacks it)."""

    useOpenat2: bool | None = True

    def setUp(self) -> None:
        if self.useOpenat2 and not openat2Available():
            raise self.skipTest("openat2 is not available on this machine")
        base = Path(self.mktemp()).absolute()
        self.host = base / "ws"
        self.outside = base / "outside"
        (self.host / "d" / "e").mkdir(parents=True)
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("secret")
        (self.host / "d" / "f.txt").write_text("hello")
        (self.host / "abs").symlink_to(self.outside)
        (self.host / "rel").symlink_to("../outside")
        (self.host / "etc").symlink_to("/etc")
        (self.host / "inner").symlink_to("d")
        (self.host / "tofile").symlink_to("d/f.txt")
        self.workspace = Workspace(self.host, useOpenat2=self.useOpenat2)
        self.assertEqual(self.workspace.usesOpenat2, bool(self.useOpenat2))

    def path(self, guest: str) -> GuestPath:
        return self.workspace.resolve(guest)

    def openDirectory(self, parts: tuple[str, ...], create: bool = False) -> os.stat_result:
        fd = self.workspace.openDirectory(parts, create=create)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def assertOutsideUntouched(self) -> None:
        self.assertEqual(sorted(p.name for p in self.outside.iterdir()), ["secret.txt"])
        self.assertEqual((self.outside / "secret.txt").read_text(), "secret")

    # -- openDirectory -------------------------------------------------------------------

    def test_openDirectory(self) -> None:
        """Directories in the workspace, the root included, can be opened by their parts."""
        self.assertEqual(self.openDirectory(()).st_ino, self.host.stat().st_ino)
        self.assertEqual(
            self.openDirectory(("d", "e")).st_ino, (self.host / "d" / "e").stat().st_ino
        )

    def test_openDirectoryRefusesSymlinks(self) -> None:
        """A symlinked directory is never opened or passed through, wherever it points, and the
        error says which."""
        for name in ("abs", "rel", "etc", "inner"):
            error = self.assertRaises(SymlinkInPath, self.openDirectory, (name,))
            self.assertEqual(str(error), f"workspace path is a symlink: /workspace/{name}")
            error = self.assertRaises(SymlinkInPath, self.openDirectory, (name, "x"))
            self.assertEqual(
                str(error),
                f"workspace path would traverse through a symlinked parent: /workspace/{name}/x",
            )

    def test_openDirectoryMissingOrNotADirectory(self) -> None:
        """Opening a missing directory, or a path below or at a file, fails with an error naming
        the path."""
        error = self.assertRaises(MissingPath, self.openDirectory, ("d", "nope"))
        self.assertEqual(str(error), "workspace path does not exist: /workspace/d/nope")
        error = self.assertRaises(MissingPath, self.openDirectory, ("d", "f.txt", "x"))
        self.assertEqual(str(error), "workspace path does not exist: /workspace/d/f.txt/x")
        error = self.assertRaises(NotADirectoryInPath, self.openDirectory, ("d", "f.txt"))
        self.assertEqual(str(error), "workspace path is not a directory: /workspace/d/f.txt")

    def test_openDirectoryCreates(self) -> None:
        """Missing directories can be created on the way with umask-default modes, and existing
        ones are simply opened."""
        made = self.openDirectory(("n", "e", "w"), create=True)
        self.assertEqual(made.st_ino, (self.host / "n" / "e" / "w").stat().st_ino)
        self.assertEqual(stat.S_IMODE(made.st_mode), 0o777 & ~processUmask())
        # Existing directories are simply opened.
        self.assertEqual(
            self.openDirectory(("d",), create=True).st_ino, (self.host / "d").stat().st_ino
        )

    def test_createRefusesSymlinksAndFiles(self) -> None:
        """Creating directories never goes through a symlink or below a file, so nothing is made
        outside the workspace."""
        self.assertRaises(SymlinkInPath, self.openDirectory, ("abs", "new"), True)
        self.assertRaises(SymlinkInPath, self.openDirectory, ("etc", "new"), True)
        error = self.assertRaises(
            NotADirectoryInPath, self.openDirectory, ("d", "f.txt", "x"), True
        )
        self.assertEqual(
            str(error),
            "workspace path would traverse through a non-directory parent: /workspace/d/f.txt/x",
        )
        self.assertOutsideUntouched()
        self.assertFalse(os.path.lexists("/etc/new"))

    def test_badComponentsRefused(self) -> None:
        """Empty, dot, `..` and slash-holding path components are refused."""
        for parts in (("..",), ("d", ".."), ("",), ("a/b",), (".",)):
            self.assertRaises(WorkspaceError, self.openDirectory, parts)

    def test_missingRoot(self) -> None:
        """A workspace whose root directory is gone reports that `/workspace` does not exist."""
        workspace = Workspace(self.host / "gone", useOpenat2=self.useOpenat2)
        error = self.assertRaises(MissingPath, workspace.openRoot)
        self.assertEqual(str(error), "workspace path does not exist: /workspace")

    # -- openFile, lstat, readlink ---------------------------------------------------------

    def test_openFile(self) -> None:
        """A file inside the workspace can be opened and read."""
        fd = self.workspace.openFile(self.path("d/f.txt"), os.O_RDONLY)
        try:
            self.assertEqual(os.read(fd, 100), b"hello")
        finally:
            os.close(fd)

    def test_openFileCreates(self) -> None:
        """A new file can be created and written inside the workspace."""
        fd = self.workspace.openFile(self.path("d/new.txt"), os.O_WRONLY | os.O_CREAT, 0o640)
        os.write(fd, b"x")
        os.close(fd)
        self.assertEqual((self.host / "d" / "new.txt").read_bytes(), b"x")

    def test_openFileRefusesSymlinks(self) -> None:
        """A file is never opened through a symlink, whether it is the file itself or a parent,
        for reading or creating, so nothing outside is touched."""
        error = self.assertRaises(
            SymlinkInPath, self.workspace.openFile, self.path("tofile"), os.O_RDONLY
        )
        self.assertEqual(str(error), "workspace path is a symlink: /workspace/tofile")
        self.assertRaises(
            SymlinkInPath, self.workspace.openFile, self.path("abs/secret.txt"), os.O_RDONLY
        )
        self.assertRaises(
            SymlinkInPath, self.workspace.openFile, self.path("etc/hostname"), os.O_RDONLY
        )
        self.assertRaises(
            SymlinkInPath,
            self.workspace.openFile,
            self.path("abs/created.txt"),
            os.O_WRONLY | os.O_CREAT,
        )
        self.assertOutsideUntouched()

    def test_openFileMissing(self) -> None:
        """Opening a missing file fails with an error naming the path."""
        error = self.assertRaises(
            MissingPath, self.workspace.openFile, self.path("d/x"), os.O_RDONLY
        )
        self.assertEqual(str(error), "workspace path does not exist: /workspace/d/x")

    def test_lstat(self) -> None:
        """Paths can be stat'ed without following the last symlink, while a symlinked parent is
        refused."""
        self.assertTrue(stat.S_ISDIR(self.workspace.lstat(self.path("/workspace")).st_mode))
        self.assertEqual(self.workspace.lstat(self.path("d/f.txt")).st_size, 5)
        link = self.workspace.lstat(self.path("abs"))
        self.assertTrue(stat.S_ISLNK(link.st_mode))
        self.assertEqual(link.st_size, len(str(self.outside)))
        self.assertRaises(MissingPath, self.workspace.lstat, self.path("nope"))
        self.assertRaises(SymlinkInPath, self.workspace.lstat, self.path("abs/secret.txt"))
        self.assertRaises(SymlinkInPath, self.workspace.lstat, self.path("inner/f.txt"))

    def test_readlink(self) -> None:
        """A symlink's target can be read without following it, through an inside symlinked
        parent only when asked."""
        self.assertEqual(self.workspace.readlink(self.path("rel")), "../outside")
        self.assertEqual(self.workspace.readlink(self.path("etc")), "/etc")
        self.assertRaises(SymlinkInPath, self.workspace.readlink, self.path("inner/x"))
        (self.host / "d" / "link").symlink_to("e")
        self.assertEqual(self.workspace.readlink(self.path("inner/link"), followInside=True), "e")

    # -- listing ---------------------------------------------------------------------------

    def test_children(self) -> None:
        """A directory's children are listed sorted by name, each with its stat and, for a
        symlink, its target."""
        with self.workspace.openedDirectory(()) as fd:
            children = self.workspace.children(fd)
        self.assertEqual(
            [child.name for child in children], ["abs", "d", "etc", "inner", "rel", "tofile"]
        )
        byName = {child.name: child for child in children}
        self.assertEqual(byName["etc"].linkTarget, "/etc")
        self.assertTrue(stat.S_ISLNK(byName["etc"].stat.st_mode))
        self.assertTrue(stat.S_ISDIR(byName["d"].stat.st_mode))
        self.assertIsNone(byName["d"].linkTarget)

    def test_openChildDirectory(self) -> None:
        """A child directory can be opened from its parent, while a symlinked or missing child
        gives nothing and `..` is refused."""
        with self.workspace.openedDirectory(()) as fd:
            self.assertIsNone(self.workspace.openChildDirectory(fd, "abs"))
            self.assertIsNone(self.workspace.openChildDirectory(fd, "nope"))
            child = self.workspace.openChildDirectory(fd, "d")
            assert child is not None
            self.assertEqual(os.fstat(child).st_ino, (self.host / "d").stat().st_ino)
            os.close(child)
            self.assertRaises(WorkspaceError, self.workspace.openChildDirectory, fd, "..")

    # -- replaceFile -------------------------------------------------------------------------

    def assertNoTemporaries(self, directory: Path) -> None:
        self.assertEqual(
            [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)], []
        )

    def test_replaceNewFile(self) -> None:
        """Replacing a missing file creates it and its parents with umask-default modes and
        leaves no temporary file."""
        self.workspace.replaceFile(self.path("a/b/new.txt"), b"content")
        target = self.host / "a" / "b" / "new.txt"
        self.assertEqual(target.read_bytes(), b"content")
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o666 & ~processUmask())
        self.assertNoTemporaries(target.parent)

    def test_replaceKeepsMode(self) -> None:
        """Replacing an existing file keeps its permission bits."""
        for mode in (0o600, 0o755, 0o640):
            target = self.host / "d" / "f.txt"
            target.chmod(mode)
            self.workspace.replaceFile(self.path("d/f.txt"), b"again")
            self.assertEqual(target.read_bytes(), b"again")
            self.assertEqual(stat.S_IMODE(target.stat().st_mode), mode)

    def test_replaceExplicitModeAndWriter(self) -> None:
        """A file can be written by a callback with an explicit mode."""

        def writer(fd: int) -> None:
            os.write(fd, b"#!/bin/sh\n")

        self.workspace.replaceFile(self.path("d/run.sh"), writer, mode=0o700)
        target = self.host / "d" / "run.sh"
        self.assertEqual(target.read_bytes(), b"#!/bin/sh\n")
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o700)

    def test_replaceFailureLeavesOldContent(self) -> None:
        """A write that fails part way leaves the old contents in place and no temporary file,
        with an error naming the path."""

        def failing(fd: int) -> None:
            os.write(fd, b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        error = self.assertRaises(
            WorkspaceError, self.workspace.replaceFile, self.path("d/f.txt"), failing
        )
        self.assertEqual(
            str(error), "cannot access workspace path /workspace/d/f.txt: No space left on device"
        )
        self.assertEqual((self.host / "d" / "f.txt").read_text(), "hello")
        self.assertNoTemporaries(self.host / "d")

    def test_replaceRefusesNonRegularTargets(self) -> None:
        """Symlinks, directories, the root and FIFOs are never replaced by a file write, and
        nothing outside is touched."""
        for guest in ("tofile", "abs", "d", "/workspace"):
            error = self.assertRaises(
                NotARegularFile, self.workspace.replaceFile, self.path(guest), b"x"
            )
            self.assertEqual(str(error), "workspace file write only supports regular file targets")
        os.mkfifo(self.host / "fifo")
        error = self.assertRaises(
            NotARegularFile, self.workspace.replaceFile, self.path("fifo"), b"x"
        )
        self.assertEqual(str(error), "unsupported workspace path type: /workspace/fifo")
        self.assertTrue(stat.S_ISFIFO((self.host / "fifo").lstat().st_mode))
        self.assertTrue((self.host / "tofile").is_symlink())
        self.assertEqual((self.host / "d" / "f.txt").read_text(), "hello")
        self.assertOutsideUntouched()
        self.assertNoTemporaries(self.host)

    def test_replaceRefusesSymlinkedParents(self) -> None:
        """A file is never written below a symlinked parent, even one that stays inside the
        workspace."""
        for guest in ("abs/secret.txt", "rel/new.txt", "abs/sub/new.txt", "inner/f.txt"):
            error = self.assertRaises(
                SymlinkInPath, self.workspace.replaceFile, self.path(guest), b"x"
            )
            self.assertEqual(
                str(error),
                f"workspace path would traverse through a symlinked parent: /workspace/{guest}",
            )
        self.assertOutsideUntouched()
        self.assertEqual((self.host / "d" / "f.txt").read_text(), "hello")

    def test_replaceNotRedirectedBySwappedParent(self) -> None:
        """A parent swapped for a symlink after it was opened does not redirect the write."""
        original = self.workspace.openParent

        def openThenSwap(
            path: GuestPath, *, create: bool = False, followInside: bool = False
        ) -> tuple[int, str]:
            opened = original(path, create=create, followInside=followInside)
            (self.host / "d").rename(self.host / "d.moved")
            (self.host / "d").symlink_to(self.outside)
            return opened

        self.patch(self.workspace, "openParent", openThenSwap)
        self.workspace.replaceFile(self.path("d/secret.txt"), b"overwritten?")
        self.assertOutsideUntouched()
        self.assertEqual((self.host / "d.moved" / "secret.txt").read_bytes(), b"overwritten?")

    # -- unlink ----------------------------------------------------------------------------

    def test_unlink(self) -> None:
        """Deleting removes a file, or a symlink itself without touching its target."""
        self.workspace.unlink(self.path("d/f.txt"))
        self.assertFalse((self.host / "d" / "f.txt").exists())
        self.workspace.unlink(self.path("abs"))
        self.assertFalse(os.path.lexists(self.host / "abs"))
        self.assertOutsideUntouched()

    def test_unlinkRefused(self) -> None:
        """Deleting a missing path, a directory, the root or anything below a symlink is refused
        and nothing else is removed."""
        self.assertRaises(MissingPath, self.workspace.unlink, self.path("nope"))
        self.assertRaises(SymlinkInPath, self.workspace.unlink, self.path("abs/secret.txt"))
        self.assertRaises(SymlinkInPath, self.workspace.unlink, self.path("inner/f.txt"))
        error = self.assertRaises(WorkspaceError, self.workspace.unlink, self.path("d/e"))
        self.assertEqual(str(error), "workspace path is a directory: /workspace/d/e")
        self.assertRaises(WorkspaceError, self.workspace.unlink, self.path("/workspace"))
        self.assertOutsideUntouched()
        self.assertTrue((self.host / "d" / "f.txt").exists())

    # -- directory, fileExists --------------------------------------------------------------

    def test_openWorkingDirectory(self) -> None:
        """A working directory inside the workspace is held open and given to commands as a
        `/proc` path, while symlinks, files, missing paths and escapes are refused."""
        cases = (
            ("/workspace", "/workspace", self.host),
            ("d/e", "/workspace/d/e", self.host / "d" / "e"),
        )
        for guest, text, host in cases:
            directory = self.workspace.openWorkingDirectory(guest)
            self.addCleanup(directory.close)
            self.assertEqual(directory.guestPath.text, text)
            self.assertTrue(directory.path.startswith("/proc/"), directory.path)
            self.assertTrue(os.path.samefile(directory.path, host))
        opening = self.workspace.openWorkingDirectory
        self.assertRaises(SymlinkInPath, opening, "abs")
        self.assertRaises(SymlinkInPath, opening, "inner/e")
        self.assertRaises(NotADirectoryInPath, opening, "d/f.txt")
        self.assertRaises(MissingPath, opening, "nope")
        self.assertRaises(ActionError, opening, "/workspace/../outside")

    def test_workingDirectoryPinsTheCheckedDirectory(self) -> None:
        """Its path still leads to the opened directory after the name was swapped for a
        symlink to outside, and closing it (twice is harmless) lets the descriptor go."""
        directory = self.workspace.openWorkingDirectory("d/e")
        self.addCleanup(directory.close)
        held = os.stat(self.host / "d" / "e")
        os.rename(self.host / "d" / "e", self.host / "d" / "moved")
        os.symlink(self.outside, self.host / "d" / "e")
        entered = os.stat(directory.path)
        self.assertEqual((entered.st_dev, entered.st_ino), (held.st_dev, held.st_ino))
        fd = int(directory.path.rsplit("/", 1)[1])
        self.assertFalse(directory.closed)
        directory.close()
        directory.close()
        self.assertTrue(directory.closed)
        self.assertRaises(OSError, os.fstat, fd)

    def test_fileExists(self) -> None:
        """A file readiness check sees paths inside the workspace, through inside links too, but
        never anything outside, dangling or looping, and refuses paths outside."""
        self.makeInsideLinks()
        for present in ("d/f.txt", "/workspace/d/e", "/workspace", "tofile", "inner/f.txt"):
            self.assertTrue(self.workspace.fileExists(present), present)
        for absent in (
            "d/nope",
            "abs/secret.txt",
            "rel/secret.txt",
            "esc/secret.txt",
            "etc/hostname",
            "outfile",
            "dangling",
            "loop1",
            "d/f.txt/x",
        ):
            self.assertFalse(self.workspace.fileExists(absent), absent)
        self.assertRaises(ActionError, self.workspace.fileExists, "/etc/hostname")
        self.assertRaises(
            ActionError, self.workspace.fileExists, "/workspace/../outside/secret.txt"
        )

    # -- following symlinks that stay inside ------------------------------------------------

    def makeInsideLinks(self) -> None:
        (self.host / "up").symlink_to("..")
        (self.host / "loop1").symlink_to("loop2")
        (self.host / "loop2").symlink_to("loop1")
        (self.host / "dangling").symlink_to("nowhere")
        (self.host / "outfile").symlink_to(self.outside / "secret.txt")
        (self.host / "esc").symlink_to("d/../../outside")
        (self.host / "d" / "back").symlink_to("../d")
        (self.host / "d" / "e" / "deep").symlink_to("../../inner")

    def openFollowing(self, *parts: str) -> int:
        fd = self.workspace.openDirectory(parts, followInside=True)
        try:
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def test_followInside(self) -> None:
        """When asked, symlinks that stay inside the workspace are followed, including chains of
        them."""
        self.makeInsideLinks()
        d, e = (self.host / "d").stat().st_ino, (self.host / "d" / "e").stat().st_ino
        self.assertEqual(self.openFollowing("inner"), d)
        self.assertEqual(self.openFollowing("d", "back", "e"), e)
        self.assertEqual(self.openFollowing("d", "e", "deep", "e"), e)
        self.assertEqual(self.openFollowing(), self.host.stat().st_ino)
        self.assertEqual(
            self.workspace.lstat(self.path("inner/f.txt"), followInside=True).st_size, 5
        )
        parent, name = self.workspace.openParent(self.path("d/back/f.txt"), followInside=True)
        self.assertEqual((os.fstat(parent).st_ino, name), (d, "f.txt"))
        os.close(parent)

    def test_followInsideRefusesEscapes(self) -> None:
        """Following symlinks never leaves the workspace: links out or in loops are refused,
        dangling ones or ones to files are missing, and creation never follows links."""
        self.makeInsideLinks()
        for name in ("abs", "rel", "etc", "esc", "up"):
            error = self.assertRaises(EscapingSymlink, self.openFollowing, name)
            self.assertEqual(
                str(error),
                f"workspace path would leave the workspace through a symlink: /workspace/{name}",
            )
        self.assertRaises(EscapingSymlink, self.openFollowing, "up", "ws")
        error = self.assertRaises(EscapingSymlink, self.openFollowing, "loop1")
        self.assertEqual(
            str(error), "workspace path has too many levels of symlinks: /workspace/loop1"
        )
        self.assertRaises(
            EscapingSymlink, self.workspace.lstat, self.path("etc/hostname"), followInside=True
        )
        self.assertRaises(MissingPath, self.openFollowing, "dangling")
        self.assertRaises(MissingPath, self.openFollowing, "tofile")
        self.assertRaises(
            ValueError, self.workspace.openDirectory, ("d",), create=True, followInside=True
        )


class WalkFallbackTests(WorkspacePrimitiveTests):
    """The same primitives with the ``O_NOFOLLOW`` walk forced, as on kernels before 5.6."""

    useOpenat2 = False


class ForcedOpenat2Tests(SynchronousTestCase):
    def test_requireOpenat2(self) -> None:
        """Asking for openat2 works where the kernel has it and fails at once where it does not."""
        if openat2Available():
            self.assertTrue(Workspace(Path("/"), useOpenat2=True).usesOpenat2)
        else:
            self.assertRaises(RuntimeError, Workspace, Path("/"), useOpenat2=True)

    def test_kernelWithoutOpenat2(self) -> None:
        """A kernel answering ENOSYS (before 5.6) or a sandbox answering EPERM: no openat2."""
        refusals = [errno.ENOSYS, errno.EPERM]
        calls: list[int] = []

        def refusingSyscall(number: Any, *args: Any) -> int:
            calls.append(number.value)
            ctypes.set_errno(refusals[len(calls) - 1])
            return -1

        self.assertIsNone(probedOpenat2(refusingSyscall, 437))
        self.assertIsNone(probedOpenat2(refusingSyscall, 437))
        self.assertEqual(calls, [437, 437])

    def test_umaskUnchanged(self) -> None:
        """Reading the process umask leaves it unchanged."""
        before = os.umask(0o027)
        os.umask(before)
        self.assertEqual(processUmask(), before)


class WalkTreeTests(SynchronousTestCase):
    """The one descriptor walker (listings and exports)."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        (self.root / "b" / "c").mkdir(parents=True)
        (self.root / "a").write_text("a")
        (self.root / "b" / "c" / "d").write_text("d")
        (self.root / "b" / "link").symlink_to("c")
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, self.fd)

    def test_depthFirstInNameOrder(self) -> None:
        """Directories before their content, each level sorted, links described not followed."""
        found = [(entry.path, entry.child.linkTarget) for entry in walkTree(self.fd, "top")]
        self.assertEqual(
            found,
            [
                ("top/a", None),
                ("top/b", None),
                ("top/b/c", None),
                ("top/b/c/d", None),
                ("top/b/link", "c"),
            ],
        )
        flat = [entry.path for entry in walkTree(self.fd, recursive=False)]
        self.assertEqual(flat, ["a", "b"])

    def test_closesWhatItOpened(self) -> None:
        """Stopping a walk early closes its descriptors; the top one stays the caller's."""
        before = len(os.listdir("/proc/self/fd"))
        walker = walkTree(self.fd)
        next(walker), next(walker), next(walker)
        self.assertGreater(len(os.listdir("/proc/self/fd")), before)
        walker.close()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        os.fstat(self.fd)

    def test_deepTreeWithoutRecursion(self) -> None:
        """A tree deeper than Python's recursion limit is walked."""
        import sys

        depth = sys.getrecursionlimit() + 50
        current = self.fd
        opened = []
        for _ in range(depth):
            os.mkdir("deep", dir_fd=current)
            current = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            opened.append(current)
        for fd in opened:
            os.close(fd)
        count = sum(1 for entry in walkTree(self.fd) if entry.name == "deep")
        self.assertEqual(count, depth)

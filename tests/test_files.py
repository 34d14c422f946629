"""The four workspace file actions over a real socket, with the reference's answers and errors."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.files import WORKSPACE_FILE_MAX_BYTES, WorkspaceFiles
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import TEMP_PREFIX, Workspace, processUmask, walk
from tests.helpers import RunningAgent, reactor, startAgent

MiB = 1024 * 1024
ESCAPE = "destination must stay inside /workspace: '..' is not allowed"


def entry(path: str, kind: str, size: int = 0, target: str | None = None) -> dict[str, Any]:
    return {"path": path, "artifact_type": kind, "size_bytes": size, "link_target": target}


class FilesOverTheWireTests(TestCase):
    """Each action through a real agent on a TCP socket."""

    async def setUpAgent(self) -> RunningAgent:
        agent = await startAgent(self)
        self.host = agent.workspace
        self.outside = self.host.parent / "outside"
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("secret")
        (self.host / "src" / "sub").mkdir(parents=True)
        (self.host / "empty").mkdir()
        (self.host / "hello.txt").write_text("hello\n")
        (self.host / "src" / "a.py").write_text("x")
        (self.host / "src" / "B.txt").write_text("zzz")
        (self.host / "src" / "sub" / "b.py").write_text("yy")
        (self.host / "etclink").symlink_to("/etc")
        (self.host / "out").symlink_to("../outside")
        (self.host / "hl").symlink_to("hello.txt")
        (self.host / "srclink").symlink_to("src")
        return agent

    def assertOutsideUntouched(self) -> None:
        self.assertEqual(sorted(p.name for p in self.outside.iterdir()), ["secret.txt"])
        self.assertEqual((self.outside / "secret.txt").read_text(), "secret")

    async def assertError(self, agent: RunningAgent, request: dict[str, Any], message: str) -> None:
        self.assertEqual(await agent.call(request), {"error": message})

    # -- list_workspace ----------------------------------------------------------------------

    async def test_listDefaultIsWorkspaceRoot(self) -> None:
        """With no path, `list_workspace` lists the workspace root sorted by name, giving each
        symlink's target and size without following it."""
        agent = await self.setUpAgent()
        answer = await agent.call({"action": "list_workspace"})
        self.assertEqual(
            answer,
            {
                "path": "/workspace",
                "artifact_type": "directory",
                "entries": [
                    entry("/workspace/empty", "directory"),
                    entry("/workspace/etclink", "symlink", 4, "/etc"),
                    entry("/workspace/hello.txt", "file", 6),
                    entry("/workspace/hl", "symlink", 9, "hello.txt"),
                    entry("/workspace/out", "symlink", 10, "../outside"),
                    entry("/workspace/src", "directory"),
                    entry("/workspace/srclink", "symlink", 3, "src"),
                ],
            },
        )

    async def test_listRecursiveDepthFirstSorted(self) -> None:
        """A recursive listing walks subdirectories depth first, each level sorted by name."""
        agent = await self.setUpAgent()
        answer = await agent.call({"action": "list_workspace", "path": "src", "recursive": True})
        self.assertEqual(
            answer,
            {
                "path": "/workspace/src",
                "artifact_type": "directory",
                "entries": [
                    entry("/workspace/src/B.txt", "file", 3),
                    entry("/workspace/src/a.py", "file", 1),
                    entry("/workspace/src/sub", "directory"),
                    entry("/workspace/src/sub/b.py", "file", 2),
                ],
            },
        )

    async def test_listRecursiveDoesNotFollowSymlinks(self) -> None:
        """A recursive listing never descends through symlinks, so nothing outside the workspace
        is listed."""
        agent = await self.setUpAgent()
        answer = await agent.call({"action": "list_workspace", "recursive": True})
        paths = [item["path"] for item in answer["entries"]]
        self.assertIn("/workspace/src/sub/b.py", paths)
        self.assertFalse(
            [p for p in paths if p.startswith(("/workspace/etclink/", "/workspace/out/"))]
        )

    async def test_listNonDirectory(self) -> None:
        """Listing a file or a symlink answers with that one entry and its type."""
        agent = await self.setUpAgent()
        self.assertEqual(
            await agent.call({"action": "list_workspace", "path": "/workspace/hello.txt"}),
            {
                "path": "/workspace/hello.txt",
                "artifact_type": "file",
                "entries": [entry("/workspace/hello.txt", "file", 6)],
            },
        )
        self.assertEqual(
            await agent.call({"action": "list_workspace", "path": "etclink"}),
            {
                "path": "/workspace/etclink",
                "artifact_type": "symlink",
                "entries": [entry("/workspace/etclink", "symlink", 4, "/etc")],
            },
        )

    async def test_listThroughSymlinkInside(self) -> None:
        """As the reference, a symlinked parent that stays inside the workspace is followed."""
        agent = await self.setUpAgent()
        self.assertEqual(
            await agent.call({"action": "list_workspace", "path": "srclink/sub"}),
            {
                "path": "/workspace/srclink/sub",
                "artifact_type": "directory",
                "entries": [entry("/workspace/srclink/sub/b.py", "file", 2)],
            },
        )

    async def test_listErrors(self) -> None:
        """Listing a missing path, a path outside the workspace, a path through a symlink leading
        out or a directory holding a FIFO fails with a clear error, as does a non-boolean
        `recursive`."""
        agent = await self.setUpAgent()
        os.mkfifo(self.host / "src" / "fifo")
        cases = {
            "nope": "workspace path does not exist: /workspace/nope",
            "hello.txt/x": "workspace path does not exist: /workspace/hello.txt/x",
            "": "destination must not be empty",
            "/": "destination must stay inside /workspace",
            "/etc": "destination must stay inside /workspace",
            "/workspace/../outside": ESCAPE,
            "etclink/ssh": "workspace path would leave the workspace through a symlink:"
            " /workspace/etclink/ssh",
            "out/secret.txt": "workspace path would leave the workspace through a symlink:"
            " /workspace/out/secret.txt",
            "src": "unsupported workspace path type: /workspace/src/fifo",
        }
        for path, message in cases.items():
            await self.assertError(agent, {"action": "list_workspace", "path": path}, message)
        await self.assertError(
            agent,
            {"action": "list_workspace", "recursive": "yes"},
            "recursive must be a boolean",
        )

    # -- read_workspace_file -------------------------------------------------------------------

    async def test_read(self) -> None:
        """`read_workspace_file` returns any bytes as base64 with their size, and may read
        through a symlinked directory that stays inside the workspace."""
        agent = await self.setUpAgent()
        content = bytes(range(256)) * 3
        (self.host / "bin.dat").write_bytes(content)
        answer = await agent.call({"action": "read_workspace_file", "path": "bin.dat"})
        self.assertEqual(
            answer,
            {
                "path": "/workspace/bin.dat",
                "size_bytes": len(content),
                "content_b64": base64.b64encode(content).decode(),
            },
        )
        answer = await agent.call({"action": "read_workspace_file", "path": "srclink/a.py"})
        self.assertEqual(answer["content_b64"], base64.b64encode(b"x").decode())

    async def test_readLimits(self) -> None:
        """Reads are refused past 1 MiB or past a smaller `max_bytes` the host gives, which must
        be positive and at most 1 MiB."""
        agent = await self.setUpAgent()
        (self.host / "mib").write_bytes(b"a" * MiB)
        (self.host / "mibplus").write_bytes(b"a" * (MiB + 1))
        answer = await agent.call({"action": "read_workspace_file", "path": "mib"})
        self.assertEqual(answer["size_bytes"], MiB)
        self.assertEqual(base64.b64decode(answer["content_b64"]), b"a" * MiB)
        await self.assertError(
            agent,
            {"action": "read_workspace_file", "path": "mibplus"},
            "workspace file exceeds the maximum supported size of 1048576 bytes",
        )
        await self.assertError(
            agent,
            {"action": "read_workspace_file", "path": "hello.txt", "max_bytes": 5},
            "workspace file exceeds the maximum supported size of 5 bytes",
        )
        answer = await agent.call(
            {"action": "read_workspace_file", "path": "hello.txt", "max_bytes": "6"}
        )
        self.assertEqual(answer["size_bytes"], 6)
        for maxBytes, message in (
            (0, "max_bytes must be positive"),
            (-1, "max_bytes must be positive"),
            (MiB + 1, "max_bytes must be at most 1048576 bytes"),
        ):
            await self.assertError(
                agent,
                {"action": "read_workspace_file", "path": "hello.txt", "max_bytes": maxBytes},
                message,
            )

    async def test_readRefusesTwoGiBWithoutReadingIt(self) -> None:
        """A 2 GiB file is refused with the size error instead of being read."""
        agent = await self.setUpAgent()
        with (self.host / "huge").open("wb") as handle:
            handle.truncate(2 * 1024 * MiB)
        await self.assertError(
            agent,
            {"action": "read_workspace_file", "path": "huge"},
            "workspace file exceeds the maximum supported size of 1048576 bytes",
        )

    async def test_readErrors(self) -> None:
        """Only regular files inside the workspace can be read: directories, symlinks, FIFOs,
        missing paths and paths leaving the workspace are refused."""
        agent = await self.setUpAgent()
        os.mkfifo(self.host / "fifo")
        notRegular = "workspace file read only supports regular files"
        cases = {
            None: notRegular,  # the default path, /workspace
            "src": notRegular,
            "hl": notRegular,
            "etclink": notRegular,
            "fifo": "unsupported workspace path type: /workspace/fifo",
            "nope": "workspace path does not exist: /workspace/nope",
            "/workspace/../outside/secret.txt": ESCAPE,
            "/etc/hostname": "destination must stay inside /workspace",
            "etclink/hostname": "workspace path would leave the workspace through a symlink:"
            " /workspace/etclink/hostname",
            "out/secret.txt": "workspace path would leave the workspace through a symlink:"
            " /workspace/out/secret.txt",
        }
        for path, message in cases.items():
            request: dict[str, Any] = {"action": "read_workspace_file"}
            if path is not None:
                request["path"] = path
            await self.assertError(agent, request, message)

    # -- write_workspace_file ------------------------------------------------------------------

    async def test_writeNewFileCreatesParents(self) -> None:
        """Writing a new file creates its missing parent directories, stores the text as UTF-8
        with umask-default modes and leaves no temporary file behind."""
        agent = await self.setUpAgent()
        answer = await agent.call(
            {"action": "write_workspace_file", "path": "new/dir/n.txt", "text": "héllo"}
        )
        self.assertEqual(
            answer, {"path": "/workspace/new/dir/n.txt", "size_bytes": 6, "bytes_written": 6}
        )
        target = self.host / "new" / "dir" / "n.txt"
        self.assertEqual(target.read_text(encoding="utf-8"), "héllo")
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o666 & ~processUmask())
        self.assertEqual(stat.S_IMODE(target.parent.stat().st_mode), 0o777 & ~processUmask())
        self.assertNoTemporaries(target.parent)

    async def test_writeKeepsModeOfExistingFile(self) -> None:
        """Rewriting an existing file replaces its contents but keeps its permission bits."""
        agent = await self.setUpAgent()
        target = self.host / "hello.txt"
        for mode in (0o600, 0o755):
            target.chmod(mode)
            await agent.call({"action": "write_workspace_file", "path": "hello.txt", "text": "new"})
            self.assertEqual(target.read_text(), "new")
            self.assertEqual(stat.S_IMODE(target.stat().st_mode), mode)
        self.assertNoTemporaries(self.host)

    async def test_writeDefaultsAndCoercions(self) -> None:
        """A write with no text makes an empty file, and a number is written as its text."""
        agent = await self.setUpAgent()
        answer = await agent.call({"action": "write_workspace_file", "path": "empty.txt"})
        self.assertEqual(answer["bytes_written"], 0)
        self.assertEqual((self.host / "empty.txt").read_bytes(), b"")
        await agent.call({"action": "write_workspace_file", "path": "num.txt", "text": 5})
        self.assertEqual((self.host / "num.txt").read_text(), "5")

    async def test_writeSizeLimit(self) -> None:
        """Text up to 1 MiB once encoded as UTF-8 is written, and anything larger is refused
        without creating the file."""
        agent = await self.setUpAgent()
        answer = await agent.call(
            {"action": "write_workspace_file", "path": "exact", "text": "a" * MiB}
        )
        self.assertEqual(answer["bytes_written"], MiB)
        # 2 bytes per character once encoded: over the limit though fewer characters.
        await self.assertError(
            agent,
            {"action": "write_workspace_file", "path": "big", "text": "é" * (MiB // 2 + 1)},
            "text must be at most 1048576 bytes when encoded as UTF-8",
        )
        self.assertFalse((self.host / "big").exists())

    async def test_writeErrors(self) -> None:
        """Writes go only to regular files inside the workspace, never through a symlinked or
        non-directory parent, and text that cannot be encoded is refused, leaving everything
        untouched."""
        agent = await self.setUpAgent()
        os.mkfifo(self.host / "fifo")
        regularOnly = "workspace file write only supports regular file targets"
        cases = {
            None: regularOnly,
            "src": regularOnly,
            "hl": regularOnly,
            "out": regularOnly,
            "srclink/x.txt": "workspace path would traverse through a symlinked parent:"
            " /workspace/srclink/x.txt",
            "out/secret.txt": "workspace path would traverse through a symlinked parent:"
            " /workspace/out/secret.txt",
            "etclink/new/x.txt": "workspace path would traverse through a symlinked parent:"
            " /workspace/etclink/new/x.txt",
            "hello.txt/x": "workspace path would traverse through a non-directory parent:"
            " /workspace/hello.txt/x",
            "/workspace/../escape.txt": ESCAPE,
            "../outside/secret.txt": ESCAPE,
            "/tmp/x": "destination must stay inside /workspace",
            "fifo": "unsupported workspace path type: /workspace/fifo",
        }
        for path, message in cases.items():
            request: dict[str, Any] = {"action": "write_workspace_file", "text": "pwned"}
            if path is not None:
                request["path"] = path
            await self.assertError(agent, request, message)
        await self.assertError(
            agent,
            {"action": "write_workspace_file", "path": "s.txt", "text": "\ud800"},
            "'utf-8' codec can't encode character '\\ud800' in position 0: surrogates not allowed",
        )
        self.assertOutsideUntouched()
        self.assertFalse((self.host.parent / "escape.txt").exists())
        self.assertEqual((self.host / "hello.txt").read_text(), "hello\n")
        self.assertTrue((self.host / "hl").is_symlink())
        self.assertFalse(os.path.lexists("/etc/new"))

    def assertNoTemporaries(self, directory: Path) -> None:
        self.assertEqual(
            [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)], []
        )

    # -- delete_workspace_path -------------------------------------------------------------------

    async def test_delete(self) -> None:
        """`delete_workspace_path` removes a file, removes a symlink itself rather than its
        target, and can delete through a symlinked directory inside the workspace."""
        agent = await self.setUpAgent()
        self.assertEqual(
            await agent.call({"action": "delete_workspace_path", "path": "hello.txt"}),
            {"path": "/workspace/hello.txt", "deleted": True},
        )
        self.assertFalse((self.host / "hello.txt").exists())
        # A symlink is removed itself, never what it points to.
        await agent.call({"action": "delete_workspace_path", "path": "out"})
        self.assertFalse(os.path.lexists(self.host / "out"))
        self.assertOutsideUntouched()
        await agent.call({"action": "delete_workspace_path", "path": "srclink/a.py"})
        self.assertFalse((self.host / "src" / "a.py").exists())

    async def test_deleteErrors(self) -> None:
        """Directories, FIFOs, missing paths and paths leading out of the workspace are not
        deleted, and nothing outside is touched."""
        agent = await self.setUpAgent()
        (self.host / "out2").symlink_to(self.outside)
        os.mkfifo(self.host / "fifo")
        directories = "workspace file delete does not support directories"
        cases = {
            None: directories,
            "src": directories,
            "empty": directories,
            "fifo": "unsupported workspace path type: /workspace/fifo",
            "nope": "workspace path does not exist: /workspace/nope",
            "/workspace/../outside/secret.txt": ESCAPE,
            "out/secret.txt": "workspace path would leave the workspace through a symlink:"
            " /workspace/out/secret.txt",
            "out2/secret.txt": "workspace path would leave the workspace through a symlink:"
            " /workspace/out2/secret.txt",
        }
        for path, message in cases.items():
            request: dict[str, Any] = {"action": "delete_workspace_path"}
            if path is not None:
                request["path"] = path
            await self.assertError(agent, request, message)
        self.assertOutsideUntouched()
        self.assertTrue((self.host / "empty").is_dir())
        self.assertTrue((self.host / "fifo").exists())

    # -- concurrency ---------------------------------------------------------------------------

    async def test_pingAnswersWhileAListingIsStuck(self) -> None:
        """A listing stuck in a worker thread does not hold a ping back."""
        agent = await self.setUpAgent()
        release = threading.Event()
        self.addCleanup(release.set)
        entered: Deferred[None] = Deferred()
        original = walk.children

        def slowChildren(fd: int) -> Any:
            reactor.callFromThread(entered.callback, None)
            release.wait(10)
            return original(fd)

        self.patch(walk, "children", slowChildren)
        answers: list[dict[str, Any]] = []
        listing = agent.call({"action": "list_workspace"}).addCallback(answers.append)
        await entered  # the listing is now under way in a worker thread
        pong = await agent.call({"action": "ping"})
        self.assertTrue(pong["pong"])
        self.assertEqual(answers, [])
        release.set()
        await listing
        [answer] = answers
        self.assertEqual(answer["path"], "/workspace")


class ReadWithoutReadingTests(SynchronousTestCase):
    """The size check happens on the open descriptor, before a byte is read."""

    def test_tooLargeIsNeverRead(self) -> None:
        """A file over the limit is refused from its size alone, without a single read of its
        contents."""
        host = Path(self.mktemp()).absolute()
        host.mkdir()
        with (host / "huge").open("wb") as handle:
            handle.truncate(2 * 1024 * MiB)
        reads: list[int] = []
        realRead = os.read

        def countingRead(fd: int, size: int) -> bytes:
            reads.append(size)
            return realRead(fd, size)

        self.patch(os, "read", countingRead)
        files = WorkspaceFiles(Workspace(host))
        error = self.assertRaises(
            ActionError, files.readFile, "huge", maxBytes=WORKSPACE_FILE_MAX_BYTES
        )
        self.assertEqual(
            str(error), "workspace file exceeds the maximum supported size of 1048576 bytes"
        )
        self.assertEqual(reads, [])
        # The same counter does see an ordinary read.
        (host / "small").write_bytes(b"abc")
        self.assertEqual(files.readFile("small", maxBytes=10)["size_bytes"], 3)
        self.assertNotEqual(reads, [])

    def test_fileGrowingPastTheLimitWhileRead(self) -> None:
        """A file that grows past the limit while it is being read is still refused."""
        host = Path(self.mktemp()).absolute()
        host.mkdir()
        (host / "growing").write_bytes(b"abc")
        realRead = os.read

        def growingRead(fd: int, size: int) -> bytes:
            with (host / "growing").open("ab") as handle:
                handle.write(b"more")
            return realRead(fd, size)

        self.patch(os, "read", growingRead)
        error = self.assertRaises(
            ActionError, WorkspaceFiles(Workspace(host)).readFile, "growing", maxBytes=5
        )
        self.assertEqual(str(error), "workspace file exceeds the maximum supported size of 5 bytes")


class ListingLimitTests(SynchronousTestCase):
    """``list_workspace`` stops at ``--max-list-entries`` with a clear error."""

    def setUp(self) -> None:
        self.host = Path(self.mktemp()).absolute()
        (self.host / "a" / "b").mkdir(parents=True)
        for name in ("one", "two", "a/three", "a/b/four"):
            (self.host / name).write_text(name)

    def test_atTheLimitIsAnswered(self) -> None:
        """Exactly as many entries as the limit: answered whole, depth first in name order."""
        files = WorkspaceFiles(Workspace(self.host), maxEntries=6)
        answer = files.listWorkspace("/workspace", recursive=True)
        self.assertEqual(
            [entry["path"] for entry in answer["entries"]],
            [
                "/workspace/a",
                "/workspace/a/b",
                "/workspace/a/b/four",
                "/workspace/a/three",
                "/workspace/one",
                "/workspace/two",
            ],
        )

    def test_overTheLimitIsRefused(self) -> None:
        """One entry more than the limit: an error naming the option, no partial answer."""
        files = WorkspaceFiles(Workspace(self.host), maxEntries=5)
        error = self.assertRaises(ActionError, files.listWorkspace, "/workspace", recursive=True)
        self.assertEqual(
            str(error),
            "/workspace has more than 5 entries to list (the agent's --max-list-entries):"
            " list a subdirectory, or not recursively",
        )
        # Not recursive: only the three top-level entries count.
        flat = files.listWorkspace("/workspace", recursive=False)
        self.assertEqual(len(flat["entries"]), 3)

    def test_descriptorsAreClosedOnRefusal(self) -> None:
        """A refused walk leaves no directory descriptor open."""
        before = len(os.listdir("/proc/self/fd"))
        files = WorkspaceFiles(Workspace(self.host), maxEntries=2)
        self.assertRaises(ActionError, files.listWorkspace, "/workspace", recursive=True)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

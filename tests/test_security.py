"""Adversarial audit of the whole agent, against the real in-process agent (see docs/security.md).

Every way a request names a path or a file is attacked: ``..``, absolute paths, symlinks (to
a directory outside the workspace, to ``/etc``, to the state directory, dangling, loops),
symlinked parents, NUL bytes, over-long names, ``/`` in names, look-alike unicode, and a
directory swapped for a symlink while the agent works on it. Each attack must leave the
directory outside the workspace (and the state directory) exactly as it was and must never
bring outside content back. Then: secret values must never reach an answer's error, a log
event or a file the agent writes (shell logs hold the redacted stream), and the limits (request
line, upload size against free space, huge and sparse files, FIFOs, device nodes) must hold.

Nothing here writes to the real ``/etc``: symlinks pointing there are only read through.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, eventAsJSON, formatEvent
from twisted.trial.unittest import TestCase

from pyro_reactor.capabilities.archives import exchange
from pyro_reactor.capabilities.shells.redact import MASK
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
from tests.helpers import RunningAgent, startAgent

OUTSIDE_CONTENT = b"OUTSIDE-CONTENT-do-not-leak\n"
"""What the victim files outside the workspace hold; never to be seen in an answer."""

RACE_SECONDS = 3.0
"""Upper bound of each race: the flipping thread stops by then whatever happens."""


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def hostilePaths(outside: Path) -> list[str]:
    """Guest paths that try to reach outside the workspace, or to confuse the normalisation."""
    return [
        "/workspace/../outside/victim.txt",
        "../outside/victim.txt",
        "/workspace/real/../../outside/victim.txt",
        "//workspace/../outside/victim.txt",
        "/workspace/./real/./../../outside",
        str(outside / "victim.txt"),
        str(outside),
        "/etc/hostname",
        "/",
        "/workspace/link-out/victim.txt",
        "/workspace/link-out/sub",
        "/workspace/link-rel-out/victim.txt",
        "/workspace/link-etc/hostname",
        "/workspace/link-state/pyro-secrets",
        "/workspace/link-state/pyro-shells/x",
        "/workspace/link-file-out",
        "/workspace/link-in/../../outside/victim.txt",
        "/workspace/link-up/outside/victim.txt",
        "/workspace/dangling",
        "/workspace/dangling/x",
        "/workspace/loop",
        "/workspace/loop/x",
        "/workspace/loop-a/x",
        "/workspace/real\x00/../../outside/victim.txt",
        "/workspace/" + "n" * 300,
    ]


DEEP_PATH = "/workspace/" + "/".join(["d"] * 2100)
"""Longer than PATH_MAX, but inside: walked one component at a time, it may be used."""


LOOKALIKES = [
    "/workspace/\u2025/victim.txt",  # two dot leader
    "/workspace/\uff0e\uff0e/outside/victim.txt",  # fullwidth full stops
    "/workspace/..\\..\\outside\\victim.txt",  # backslashes are ordinary characters
    "/workspace/%2e%2e/outside/victim.txt",
    "/workspace/\u202e..txt",  # right-to-left override
]
"""Names that only look like ``..`` or separators: harmless names inside the workspace."""


def removeTree(top: Path) -> None:
    """``rm -rf`` for a tree deeper than the recursion limit and longer than ``PATH_MAX``
    (``shutil.rmtree`` and trial's own clean-up recurse and would fail on it)."""
    if not top.exists():
        return
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)]
    names: list[str] = []
    try:
        while fds:
            current = fds[-1]
            subdirectory = None
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirectory = entry.name
                        break
                    os.unlink(entry.name, dir_fd=current)
            if subdirectory is not None:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                fds.append(os.open(subdirectory, flags, dir_fd=current))
                names.append(subdirectory)
                continue
            os.close(fds.pop())
            if names:
                os.rmdir(names.pop(), dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)
    os.rmdir(top)


class Layout:
    """A workspace full of traps next to a directory (``outside``) the agent must not touch."""

    def __init__(self, agent: RunningAgent) -> None:
        self.agent = agent
        self.workspace = agent.workspace
        self.state = agent.stateDir
        self.outside = self.workspace.parent / "outside"
        self.outside.mkdir()
        (self.outside / "victim.txt").write_bytes(OUTSIDE_CONTENT)
        (self.outside / "sub").mkdir()
        (self.outside / "sub" / "victim.txt").write_bytes(OUTSIDE_CONTENT)
        ws = self.workspace
        (ws / "real").mkdir()
        (ws / "real" / "inner.txt").write_text("inside\n")
        links = {
            "link-out": str(self.outside),
            "link-rel-out": "../outside",
            "link-up": "..",
            "link-etc": "/etc",
            "link-state": str(self.state),
            "link-file-out": str(self.outside / "victim.txt"),
            "link-in": "real",
            "dangling": "/nonexistent/pyro-security-test",
            "loop": "loop",
            "loop-a": "loop-b",
            "loop-b": "loop-a",
        }
        for name, target in links.items():
            os.symlink(target, ws / name)
        self.outsideBefore = snapshot(self.outside)

    def assertOutsideUntouched(self, case: TestCase, context: object = None) -> None:
        case.assertEqual(snapshot(self.outside), self.outsideBefore, context)

    def assertNoLeak(self, case: TestCase, answer: object, context: object = None) -> None:
        text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
        case.assertNotIn(OUTSIDE_CONTENT.decode().strip(), text, context)
        if isinstance(answer, dict):
            encoded = answer.get("content_b64")
            if isinstance(encoded, str):
                case.assertNotIn(OUTSIDE_CONTENT, base64.b64decode(encoded), context)


class AgentTestCase(TestCase):
    timeout = 120
    agentOptions: dict[str, Any] = {}
    agent: RunningAgent
    layout: Layout

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        async def start() -> None:
            self.agent = await startAgent(self, **self.agentOptions)
            self.layout = Layout(self.agent)

        return Deferred.fromCoroutine(start())

    async def call(self, request: dict[str, Any], body: bytes = b"") -> dict[str, Any]:
        answer: dict[str, Any] = await self.agent.call(request, body)
        return answer

    async def upload(self, action: str, archive: bytes, **fields: Any) -> dict[str, Any]:
        return await self.call({"action": action, "archive_size": len(archive), **fields}, archive)


# -- paths named by requests --------------------------------------------------------------------


class WorkspacePathTests(AgentTestCase):
    """The ``path`` of the four file actions, ``destination`` and export's ``path``."""

    async def test_readNeverLeavesTheWorkspace(self) -> None:
        """No hostile path, whether absolute, climbing with `..` or going through a symlink out,
        reads a file outside the workspace or leaks its contents in an answer."""
        for path in [*hostilePaths(self.layout.outside), *LOOKALIKES]:
            answer = await self.call({"action": "read_workspace_file", "path": path})
            self.assertIn("error", answer, path)
            self.layout.assertNoLeak(self, answer, path)

    async def test_listNeverLeavesTheWorkspace(self) -> None:
        """No hostile path lists anything outside the workspace: at most a symlink itself is
        described, never followed, recursive or not."""
        for path in [*hostilePaths(self.layout.outside), *LOOKALIKES]:
            for recursive in (False, True):
                answer = await self.call(
                    {"action": "list_workspace", "path": path, "recursive": recursive}
                )
                if "error" not in answer:
                    # Only a symlink itself can be described (never followed).
                    self.assertEqual(answer["artifact_type"], "symlink", path)
                    self.assertEqual(len(answer["entries"]), 1, path)
                for entry in answer.get("entries", []):
                    self.assertNotIn("victim.txt", entry["path"].replace(path, ""), path)

    async def test_writeNeverLeavesTheWorkspace(self) -> None:
        """No hostile path writes outside the workspace or into the agent's state directory, and
        the symlinks it aims at are not replaced."""
        stateBefore = snapshot(self.layout.state)
        for path in hostilePaths(self.layout.outside):
            if path.startswith("/workspace/link-etc") or path == "/etc/hostname":
                continue  # never aim a write at the real /etc
            answer = await self.call(
                {"action": "write_workspace_file", "path": path, "text": "PWNED"}
            )
            self.assertIn("error", answer, path)
            self.layout.assertOutsideUntouched(self, path)
        self.assertEqual(snapshot(self.layout.state), stateBefore)
        # The symlinks themselves were not replaced either.
        self.assertEqual(os.readlink(self.layout.workspace / "link-out"), str(self.layout.outside))

    async def test_lookalikeNamesStayInside(self) -> None:
        """Names that only look like escapes (Unicode dot look-alikes, backslashes, percent
        escapes) are ordinary names inside the workspace that can be written and read back."""
        for path in LOOKALIKES:
            answer = await self.call(
                {"action": "write_workspace_file", "path": path, "text": "fine"}
            )
            self.assertNotIn("error", answer, path)
            read = await self.call({"action": "read_workspace_file", "path": path})
            self.assertEqual(base64.b64decode(read["content_b64"]), b"fine", path)
        self.layout.assertOutsideUntouched(self)
        self.assertEqual(
            set(os.listdir(self.layout.workspace.parent)), {"workspace", "state", "outside"}
        )

    async def test_deleteNeverLeavesTheWorkspace(self) -> None:
        """No hostile path deletes anything outside the workspace; where a delete succeeds it
        removed a symlink itself, never its target."""
        for path in hostilePaths(self.layout.outside):
            if path.startswith("/workspace/link-etc") or path == "/etc/hostname":
                continue
            answer = await self.call({"action": "delete_workspace_path", "path": path})
            self.layout.assertOutsideUntouched(self, path)
            if "error" not in answer:
                # Deleting a symlink removes the link itself, never its target.
                self.assertTrue(answer["deleted"], path)
                name = path.removeprefix("/workspace/")
                self.assertIn(name, ("link-file-out", "dangling", "loop"), path)
                self.assertFalse(os.path.lexists(self.layout.workspace / name), path)

    async def test_extractDestinationNeverLeavesTheWorkspace(self) -> None:
        """An archive aimed at a hostile destination is refused without writing outside the
        workspace or into the state directory."""
        archive = makeTar([fileMember("victim.txt", b"PWNED"), fileMember("new.txt", b"x")])
        stateBefore = snapshot(self.layout.state)
        for path in hostilePaths(self.layout.outside):
            if path.startswith("/workspace/link-etc") or path == "/etc/hostname":
                continue
            answer = await self.upload("extract_archive", archive, destination=path)
            self.assertIn("error", answer, path)
            self.layout.assertOutsideUntouched(self, path)
        self.assertEqual(snapshot(self.layout.state), stateBefore)

    async def test_exportNeverLeavesTheWorkspace(self) -> None:
        """No hostile path exports anything from outside the workspace: at most a symlink itself
        goes out as a link member, and the spool is left empty."""
        for path in hostilePaths(self.layout.outside):
            raw = await self.agent.exchange({"action": "export_archive", "path": path})
            header = json.loads(raw.partition(b"\n")[0])
            self.layout.assertNoLeak(self, raw, path)
            if "error" in header:
                continue
            # Only a symlink itself can be exported: as a link member, never followed.
            self.assertEqual(header["artifact_type"], "symlink", path)
            with tarfile.open(fileobj=io.BytesIO(raw.partition(b"\n")[2])) as archive:
                members = archive.getmembers()
            self.assertEqual([m.type for m in members], [tarfile.SYMTYPE], path)
        self.assertEqual(os.listdir(self.agent.context.config.spoolRoot), [])

    async def test_pathsLongerThanPathMax(self) -> None:
        """Thousands of components: every action answers (a clear error or a result, never a
        crash: trial fails a test that logs one), and nothing leaves the workspace."""
        (self.layout.workspace / "d").mkdir()
        self.addCleanup(removeTree, self.layout.workspace / "d")
        archive = makeTar([fileMember("inner.txt", b"y")])
        requests: list[tuple[dict[str, Any], bytes]] = [
            ({"action": "write_workspace_file", "path": DEEP_PATH, "text": "x"}, b""),
            ({"action": "read_workspace_file", "path": DEEP_PATH}, b""),
            ({"action": "list_workspace", "path": DEEP_PATH, "recursive": True}, b""),
            ({"action": "delete_workspace_path", "path": DEEP_PATH}, b""),
            (
                {
                    "action": "extract_archive",
                    "destination": DEEP_PATH,
                    "archive_size": len(archive),
                },
                archive,
            ),
            ({"action": "export_archive", "path": DEEP_PATH}, b""),
            ({"action": "export_archive", "path": "/workspace/d"}, b""),
            ({"action": "list_workspace", "path": "/workspace/d", "recursive": True}, b""),
            ({"action": "open_shell", "shell_id": "deep", "cwd": DEEP_PATH}, b""),
            ({"action": "start_service", "service_name": "deep", "cwd": DEEP_PATH}, b""),
        ]
        for request, body in requests:
            raw = await self.agent.exchange(request, body)
            answer = json.loads(raw.partition(b"\n")[0])
            self.assertIsInstance(answer, dict, request["action"])
            if "error" in answer:
                self.assertNotIn("recursion", answer["error"], request["action"])
        self.layout.assertOutsideUntouched(self)

    async def test_symlinksInsideAreStillUsable(self) -> None:
        """The confinement is not bought by refusing everything: inside links still read."""
        answer = await self.call({"action": "read_workspace_file", "path": "link-in/inner.txt"})
        self.assertEqual(base64.b64decode(answer["content_b64"]), b"inside\n")
        listed = await self.call({"action": "list_workspace", "path": "/workspace/link-in"})
        self.assertEqual(listed["artifact_type"], "symlink")


class ArchiveMemberTests(AgentTestCase):
    """Member names and link targets of ``extract_archive`` and ``install_secrets``."""

    def hostileArchives(self) -> list[list[Member]]:
        outside = str(self.layout.outside)
        benign = fileMember("benign.txt", b"first member, must not stay")
        dev = specialMember("null", tarfile.CHRTYPE)
        dev[0].devmajor, dev[0].devminor = 1, 3
        blk = specialMember("disk", tarfile.BLKTYPE)
        blk[0].devmajor, blk[0].devminor = 8, 0
        longName = "/".join(["l" * 200] * 5)
        return [
            [benign, fileMember("../outside/victim.txt", b"PWNED")],
            [benign, fileMember("a/../../outside/victim.txt", b"PWNED")],
            [benign, fileMember(outside + "/victim.txt", b"PWNED")],
            [benign, fileMember("/victim.txt", b"PWNED")],
            [benign, linkMember("esc", "../outside"), fileMember("esc/victim.txt", b"PWNED")],
            [benign, linkMember("esc", outside), fileMember("esc/victim.txt", b"PWNED")],
            [benign, linkMember("esc", "sub/../../.."), fileMember("esc/victim.txt", b"PWNED")],
            [benign, linkMember("etc", "/etc")],
            [benign, linkMember("up", "..")],
            [benign, dirMember("d"), linkMember("d/up", "../..")],
            [benign, linkMember("hard", outside + "/victim.txt", tarfile.LNKTYPE)],
            [benign, linkMember("hard", "benign.txt", tarfile.LNKTYPE)],
            [benign, dev],
            [benign, blk],
            [benign, specialMember("fifo", tarfile.FIFOTYPE)],
            [benign, fileMember("l" * 300, b"long")],
            [benign, fileMember(longName + "/" + "l" * 300, b"long")],
            [benign, fileMember("..", b"PWNED")],
            [benign, fileMember("", b"PWNED")],
        ]

    async def test_extractMembersNeverEscape(self) -> None:
        """A hostile archive member is refused wherever the archive is extracted, nothing outside
        is touched, and not even the harmless members before it are kept."""
        for destination in ("/workspace", "/workspace/dest"):
            before = snapshot(self.layout.workspace)
            for members in self.hostileArchives():
                names = [member.name for member, _ in members]
                answer = await self.upload(
                    "extract_archive", makeTar(members), destination=destination
                )
                self.assertIn("error", answer, names)
                self.layout.assertOutsideUntouched(self, names)
                # All or nothing: not even the benign first member stays.
                self.assertEqual(snapshot(self.layout.workspace), before, names)

    async def test_hardLinkToOutsideIsReplacedNotWrittenThrough(self) -> None:
        """A guest's hard link to an outside file: writes replace the link, never its data."""
        os.link(self.layout.outside / "victim.txt", self.layout.workspace / "hard")
        written = await self.call(
            {"action": "write_workspace_file", "path": "hard", "text": "PWNED"}
        )
        self.assertNotIn("error", written)
        self.layout.assertOutsideUntouched(self)
        os.unlink(self.layout.workspace / "hard")
        os.link(self.layout.outside / "victim.txt", self.layout.workspace / "hard")
        extracted = await self.upload("extract_archive", makeTar([fileMember("hard", b"PWNED")]))
        self.assertNotIn("error", extracted)
        self.layout.assertOutsideUntouched(self)
        self.assertEqual((self.layout.workspace / "hard").read_bytes(), b"PWNED")

    async def test_privilegedModeBitsDropped(self) -> None:
        """The agent runs as root: an archive cannot make setuid, setgid or world-writable
        files, nor give files away to another owner."""
        member, data = fileMember("tool", b"#!/bin/sh\n", mode=0o6777)
        member.uid, member.gid, member.uname, member.gname = 4242, 4242, "nobody", "nogroup"
        directory = dirMember("shared", mode=0o1777)
        answer = await self.upload("extract_archive", makeTar([(member, data), directory]))
        self.assertNotIn("error", answer)
        tool = (self.layout.workspace / "tool").stat()
        self.assertEqual(tool.st_mode & 0o7022, 0)
        self.assertEqual((tool.st_uid, tool.st_gid), (os.getuid(), os.getgid()))
        self.assertEqual((self.layout.workspace / "shared").stat().st_mode & 0o7022, 0)

    async def test_extractThroughExistingSymlinksRefused(self) -> None:
        """Archive members are never written through a symlink already in the workspace, whether
        it leads out, dangles or loops."""
        before = snapshot(self.layout.workspace)
        for name in ("link-out", "link-rel-out", "link-up", "link-state", "dangling", "loop"):
            for members in (
                [fileMember(f"{name}/victim.txt", b"PWNED")],
                [dirMember(name), fileMember(f"{name}/victim.txt", b"PWNED")],
                [fileMember(name, b"PWNED")],
            ):
                answer = await self.upload("extract_archive", makeTar(members))
                self.assertIn("error", answer, (name, members))
                self.layout.assertOutsideUntouched(self, name)
        self.assertEqual(snapshot(self.layout.workspace), before)
        self.assertNotIn("victim.txt", os.listdir(self.layout.state))

    async def test_secretMembersNeverEscape(self) -> None:
        """Hostile secret archives are refused without touching anything outside or the installed
        secrets, and secret archives may contain no links at all."""
        secretRoot = self.agent.context.config.secretRoot
        first = await self.upload("install_secrets", makeTar([fileMember("API_KEY", b"v1")]))
        self.assertNotIn("error", first)
        before = snapshot(secretRoot)
        stateBefore = sorted(os.listdir(self.layout.state))
        for members in self.hostileArchives():
            names = [member.name for member, _ in members]
            answer = await self.upload("install_secrets", makeTar(members))
            self.assertIn("error", answer, names)
            self.layout.assertOutsideUntouched(self, names)
            self.assertEqual(snapshot(secretRoot), before, names)
            self.assertEqual(sorted(os.listdir(self.layout.state)), stateBefore, names)
        # Links of any kind, even harmless ones, are refused for secrets.
        answer = await self.upload(
            "install_secrets", makeTar([fileMember("a", b"x"), linkMember("b", "a")])
        )
        self.assertIn("may not contain links", answer["error"])


class StateFileNameTests(AgentTestCase):
    """``shell_id`` names ``<id>.json``/``<id>.log``; ``service_name`` names files too."""

    hostileIds = [
        "../x",
        "../../outside/victim",
        "a/b",
        "/abs",
        "..",
        ".",
        ".hidden",
        "x\x00y",
        "n" * 300,
    ]

    def stateEntries(self) -> set[str]:
        return {str(path.relative_to(self.layout.state)) for path in self.layout.state.rglob("*")}

    async def test_shellIdsStayPlainNames(self) -> None:
        """A `shell_id` that could name a path is refused by every shell action, so no file is
        made or touched outside the shell directory."""
        before = self.stateEntries()
        for shellId in self.hostileIds:
            answer = await self.call({"action": "open_shell", "shell_id": shellId})
            self.assertIn("error", answer, shellId)
            for action in ("read_shell", "write_shell", "close_shell", "resize_shell"):
                other = await self.call({"action": action, "shell_id": shellId})
                self.assertIn("error", other, (action, shellId))
        self.assertEqual(self.stateEntries(), before)
        self.layout.assertOutsideUntouched(self)

    async def test_shellFilesAreNotFollowed(self) -> None:
        """Links planted where a shell's files go are replaced, never written through."""
        root = self.agent.context.config.shellRoot
        os.symlink(self.layout.outside / "victim.txt", root / "planted.log")
        os.symlink(self.layout.outside / "victim.txt", root / "planted.json")
        answer = await self.call({"action": "open_shell", "shell_id": "planted"})
        self.assertNotIn("error", answer)
        await self.call({"action": "write_shell", "shell_id": "planted", "input": "echo h''i"})
        # Wait (bounded) until the output went through the log file, not a fixed time.
        seen, cursor = "", 0
        deadline = time.monotonic() + 10
        while "hi" not in seen and time.monotonic() < deadline:
            read = await self.call(
                {"action": "read_shell", "shell_id": "planted", "cursor": cursor, "wait_ms": 200}
            )
            seen += read.get("output", "")
            cursor = read.get("next_cursor", cursor)
        self.assertIn("hi", seen)
        closed = await self.call({"action": "close_shell", "shell_id": "planted"})
        self.assertTrue(closed["closed"])
        self.layout.assertOutsideUntouched(self)
        self.assertFalse((root / "planted.log").is_symlink())
        self.assertFalse((root / "planted.json").is_symlink())

    async def test_serviceNamesStayPlainNames(self) -> None:
        """A `service_name` that is not a plain short name is refused by every service action,
        its command never runs and no state file is made."""
        before = self.stateEntries()
        for name in [*self.hostileIds, "a\nb", "\uff41", "x" * 65, "-x", "a b"]:
            answer = await self.call(
                {"action": "start_service", "service_name": name, "command": "touch ran"}
            )
            self.assertIn("error", answer, name)
            for action in ("status_service", "logs_service", "stop_service"):
                other = await self.call({"action": action, "service_name": name})
                self.assertIn("error", other, (action, name))
        # Every refusal is answered before anything is spawned: nothing is listed, no file.
        listed = await self.call({"action": "list_services"})
        self.assertEqual(listed["services"], [])
        self.assertEqual(self.stateEntries(), before)
        self.assertFalse((self.layout.workspace / "ran").exists())
        self.layout.assertOutsideUntouched(self)


class WorkingDirectoryTests(AgentTestCase):
    """``cwd`` of ``open_shell`` and ``start_service``, and readiness file paths."""

    async def test_shellCwdConfined(self) -> None:
        """A shell is never opened with a working directory outside the workspace."""
        for path in hostilePaths(self.layout.outside):
            answer = await self.call({"action": "open_shell", "shell_id": "s", "cwd": path})
            self.assertIn("error", answer, path)
        listed = await self.call({"action": "list_shells"})
        self.assertEqual(listed["shells"], [])

    async def test_serviceCwdConfined(self) -> None:
        """A service is never started with a working directory outside the workspace, so its
        command never runs there."""
        for path in hostilePaths(self.layout.outside):
            answer = await self.call(
                {
                    "action": "start_service",
                    "service_name": "svc",
                    "command": "touch ran-here",
                    "cwd": path,
                }
            )
            self.assertIn("error", answer, path)
        # Refused before anything is spawned: nothing is listed (no fixed wait needed).
        listed = await self.call({"action": "list_services"})
        self.assertEqual(listed["services"], [])
        self.layout.assertOutsideUntouched(self)
        self.assertNotIn("ran-here", os.listdir(Path("/etc")))

    async def startWithFileProbe(self, name: str, path: str) -> dict[str, Any]:
        answer = await self.call(
            {
                "action": "start_service",
                "service_name": name,
                "command": "sleep 30",
                "readiness": {"type": "file", "path": path},
                "ready_timeout_seconds": 1,
                "ready_interval_ms": 50,
            }
        )
        self.addCleanup(self.call, {"action": "stop_service", "service_name": name})
        return answer

    async def test_fileProbeDoesNotSeeOutside(self) -> None:
        """A readiness file probe never sees a file outside the workspace, so such a service
        fails its readiness, while files inside, even through an inside symlink, are seen."""
        paths = [
            path
            for path in hostilePaths(self.layout.outside)
            if path.startswith("/workspace/") and "/../" not in path and "\x00" not in path
        ]
        # All at once (each waits out its 1 s readiness timeout).
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(self.startWithFileProbe(f"probe{index}", path))
                for index, path in enumerate(paths)
            ]
        )
        for path, answer in zip(paths, answers, strict=True):
            self.assertEqual(
                (answer.get("state"), answer.get("stop_reason")),
                ("failed", "readiness_timeout"),
                path,
            )
        # The probe does see what is inside, through an inside symlink too.
        for path in ("/workspace/real/inner.txt", "/workspace/link-in/inner.txt"):
            answer = await self.startWithFileProbe("inside", path)
            self.assertEqual(answer.get("state"), "running", path)
            stopped = await self.call({"action": "stop_service", "service_name": "inside"})
            self.assertEqual(stopped["state"], "stopped")

    async def test_fileProbePathsOutsideRefusedUpFront(self) -> None:
        """A readiness file path outside the workspace is refused when the service is started."""
        for path in ("/workspace/../outside/victim.txt", str(self.layout.outside), "/etc"):
            answer = await self.call(
                {
                    "action": "start_service",
                    "service_name": "p",
                    "command": "sleep 30",
                    "readiness": {"type": "file", "path": path},
                }
            )
            self.assertIn("error", answer, path)


# -- races ------------------------------------------------------------------------------------


class Flipper:
    """A guest program racing the agent: swaps ``name`` between a directory and a symlink.

    ``renameat2(RENAME_EXCHANGE)`` swaps the directory ``name`` with the symlink ``<name>.alt``
    (pointing outside) in one step, so ``name`` is never missing; the thread stops when told,
    and in any case after L{RACE_SECONDS}.
    """

    def __init__(self, parent: Path, name: str, target: Path) -> None:
        (parent / name).mkdir()
        os.symlink(target, parent / f"{name}.alt")
        self.parent = parent
        self.name = name
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, case: TestCase) -> None:
        case.addCleanup(self.stop)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        # Leave the directory in place (so later checks see the agent's work, if any).
        if (self.parent / self.name).is_symlink():
            dirfd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                exchange(dirfd, self.name, f"{self.name}.alt")
            finally:
                os.close(dirfd)

    def _run(self) -> None:
        deadline = time.monotonic() + RACE_SECONDS
        dirfd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                exchange(dirfd, self.name, f"{self.name}.alt")
                self.flips += 1
        finally:
            os.close(dirfd)


class RaceTests(AgentTestCase):
    """A directory swapped for a symlink to outside while the agent uses it."""

    def flip(self, name: str = "d", content: dict[str, str] | None = None) -> Flipper:
        """Start flipping ``name`` (a directory holding ``content``) with a link to outside."""
        flipper = Flipper(self.layout.workspace, name, self.layout.outside)
        for child, text in (content or {}).items():
            (self.layout.workspace / name / child).write_text(text)
        flipper.start(self)
        return flipper

    async def race(self, flipper: Flipper, request: Any, rounds: int = 60) -> list[Any]:
        results = []
        started = time.monotonic()
        for index in range(rounds):
            if time.monotonic() - started > RACE_SECONDS:
                break
            results.append(await request(index))
        flipper.stop()
        self.assertGreater(flipper.flips, 0)
        return results

    async def test_writeRace(self) -> None:
        """Writes into a directory that is being swapped for a symlink to outside never land
        outside."""
        flipper = self.flip()

        async def write(index: int) -> dict[str, Any]:
            return await self.call(
                {"action": "write_workspace_file", "path": f"d/victim-{index}.txt", "text": "x"}
            )

        await self.race(flipper, write)
        self.layout.assertOutsideUntouched(self)

    async def test_deleteRace(self) -> None:
        """Deletes in a directory that is being swapped for a symlink to outside never remove
        anything outside."""
        flipper = self.flip(content={"victim.txt": "inside"})

        async def delete(index: int) -> dict[str, Any]:
            return await self.call({"action": "delete_workspace_path", "path": "d/victim.txt"})

        await self.race(flipper, delete)
        self.layout.assertOutsideUntouched(self)

    async def test_readAndListRace(self) -> None:
        """Reads and listings of a directory that is being swapped for a symlink to outside never
        show anything from outside."""
        flipper = self.flip(content={"victim.txt": "inside"})

        async def read(index: int) -> dict[str, Any]:
            answer = await self.call({"action": "read_workspace_file", "path": "d/victim.txt"})
            self.layout.assertNoLeak(self, answer)
            for path in ("/workspace/d", "/workspace"):
                listed = await self.call(
                    {"action": "list_workspace", "path": path, "recursive": True}
                )
                # Only the outside directory has a "sub": seeing it means a link was followed.
                for entry in listed.get("entries", []):
                    self.assertNotIn("sub", entry["path"].split("/"), entry)
            return answer

        await self.race(flipper, read)

    async def test_extractRace(self) -> None:
        """Extracting into a destination that is being swapped for a symlink to outside never
        writes outside."""
        flipper = self.flip()
        archive = makeTar([dirMember("sub2"), fileMember("sub2/new.txt", b"PWNED")])

        async def extract(index: int) -> dict[str, Any]:
            return await self.upload("extract_archive", archive, destination="/workspace/d")

        await self.race(flipper, extract)
        self.layout.assertOutsideUntouched(self)

    async def test_extractMemberParentRace(self) -> None:
        """Extracting members whose parent directory is being swapped for a symlink to outside
        never writes outside."""
        flipper = self.flip()
        archive = makeTar([fileMember("d/victim.txt", b"PWNED"), fileMember("d/new", b"x")])

        async def extract(index: int) -> dict[str, Any]:
            return await self.upload("extract_archive", archive)

        await self.race(flipper, extract)
        self.layout.assertOutsideUntouched(self)

    async def test_exportRace(self) -> None:
        """Exporting a directory that is being swapped for a symlink to outside never sends
        anything from outside, and leaves the spool empty."""
        flipper = self.flip(content={"inside.txt": "inside"})

        async def export(index: int) -> bytes:
            raw = await self.agent.exchange({"action": "export_archive", "path": "/workspace/d"})
            self.layout.assertNoLeak(self, raw)
            return raw

        await self.race(flipper, export)
        self.assertEqual(os.listdir(self.agent.context.config.spoolRoot), [])


# -- secrets ----------------------------------------------------------------------------------


class SecretTests(AgentTestCase):
    """Secret values never reach an error, a log event, or a file the agent writes."""

    secret = "S3CRET-" + secrets.token_hex(8)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.events = recordEvents(self)
        return super().setUp()

    def assertLogsClean(self) -> None:
        self.assertGreater(len(self.events), 0)
        for event in self.events:
            self.assertEventClean(event)

    def assertEventClean(self, event: LogEvent) -> None:
        texts = [formatEvent(event), repr(event), eventAsJSON(event)]
        failure = event.get("log_failure")
        if failure is not None:
            texts += [failure.getTraceback(), repr(failure.value), repr(failure.value.args)]
        for text in texts:
            self.assertNotIn(self.secret, text, event.get("log_format"))

    def assertNoSecret(self, answer: object) -> None:
        self.assertNotIn(self.secret, json.dumps(answer))

    def filesUnder(self, root: Path) -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}

    async def test_installSecretsContentNeverLogged(self) -> None:
        """Secret values never appear in answers or logs, whether an install succeeds or fails,
        and failed installs leave no copy of them in the state directory."""
        value = self.secret.encode()
        good = await self.upload("install_secrets", makeTar([fileMember("TOKEN", value)]))
        self.assertNoSecret(good)
        secretRoot = self.agent.context.config.secretRoot
        self.assertEqual((secretRoot / "TOKEN").read_bytes(), value)
        bad = [
            makeTar([fileMember("A", value), linkMember("B", "A")]),
            makeTar([fileMember("A", value), fileMember("../B", value)]),
            makeTar([fileMember("A", value), specialMember("F", tarfile.FIFOTYPE)]),
            makeTar([fileMember("A", value)], "gz")[:60],
            makeTar([fileMember("A", value + os.urandom(50000))], "xz")[:25000],
            value + b"\n",
            b"\x1f\x8b" + value,
        ]
        for archive in bad:
            answer = await self.upload("install_secrets", archive)
            self.assertIn("error", answer)
            self.assertNoSecret(answer)
        # Nothing of the failed installs is left under the state directory but the good set.
        for path, content in self.filesUnder(self.layout.state).items():
            if value in content:
                self.assertEqual(path, secretRoot / "TOKEN")
        self.assertLogsClean()

    async def test_execEnvNeverLogged(self) -> None:
        """Secret values given in an `exec` environment never appear in answers or logs, also
        when the environment is refused."""
        ok = await self.call({"action": "exec", "command": "true", "env": {"TOKEN": self.secret}})
        self.assertEqual(ok["exit_code"], 0)
        for env in (
            {"bad name": self.secret},
            {"TOKEN": self.secret + "\x00"},
            {"TOKEN": ["list", self.secret]},
            {"TOKEN": "\ud800" + self.secret},
            {self.secret + "-": "name is invalid"},
        ):
            answer = await self.call({"action": "exec", "command": "true", "env": env})
            self.assertNoSecret(answer)
        self.flushLoggedErrors()
        self.assertLogsClean()

    async def test_shellSecretsRedactedEverywhere(self) -> None:
        """Values a shell is told to redact are masked in its output, even when printed in
        pieces, and never appear in any answer, shell file or log."""
        opened = await self.call(
            {
                "action": "open_shell",
                "shell_id": "s",
                "env": {"TOKEN": self.secret},
                "redact_values": [self.secret],
            }
        )
        self.assertNoSecret(opened)
        half = len(self.secret) // 2
        # Print the secret in two halves with a pause between, and through the environment.
        await self.call(
            {
                "action": "write_shell",
                "shell_id": "s",
                "input": f"printf '%s' '{self.secret[:half]}'; sleep 0.3; "
                f"printf '%s\\n' '{self.secret[half:]}'; echo \"$TOKEN\"; echo done-$((1+1))",
            }
        )
        cursor, seen = 0, ""
        deadline = time.monotonic() + 15
        while "done-2" not in seen and time.monotonic() < deadline:
            answer = await self.call(
                {"action": "read_shell", "shell_id": "s", "cursor": cursor, "wait_ms": 500}
            )
            self.assertNoSecret(answer)
            cursor, seen = answer["next_cursor"], seen + answer["output"]
        self.assertIn("done-2", seen)
        self.assertGreaterEqual(seen.count(MASK), 2)
        for action in ("list_shells", "close_shell"):
            self.assertNoSecret(await self.call({"action": action, "shell_id": "s"}))
        shellRoot = self.agent.context.config.shellRoot
        logText = (shellRoot / "s.log").read_text()
        self.assertGreaterEqual(logText.count(MASK), 2)
        for path, content in self.filesUnder(shellRoot).items():
            self.assertNotIn(self.secret.encode(), content, path)
        refused = await self.call(
            {"action": "open_shell", "shell_id": "t", "env": {"1bad": self.secret}}
        )
        self.assertNoSecret(refused)
        self.assertLogsClean()

    async def test_serviceEnvNeverStoredOrLogged(self) -> None:
        """A service's environment reaches its command and probe but is never stored in its
        files, shown in any answer or logged."""
        started = await self.call(
            {
                "action": "start_service",
                "service_name": "svc",
                "command": "sleep 30",
                "env": {"TOKEN": self.secret},
                "readiness": {"type": "command", "command": 'test -n "$TOKEN"'},
                "ready_timeout_seconds": 10,
                "ready_interval_ms": 50,
            }
        )
        self.assertEqual(started.get("state"), "running", started)
        for action in ("status_service", "list_services", "logs_service"):
            self.assertNoSecret(await self.call({"action": action, "service_name": "svc"}))
        stopped = await self.call({"action": "stop_service", "service_name": "svc"})
        self.assertNoSecret(stopped)
        serviceRoot = self.agent.context.config.serviceRoot
        for path, content in self.filesUnder(serviceRoot).items():
            self.assertNotIn(self.secret.encode(), content, path)
        refused = await self.call(
            {
                "action": "start_service",
                "service_name": "bad",
                "command": "true",
                "env": {"A": self.secret + "\x00"},
            }
        )
        self.assertNoSecret(refused)
        self.assertLogsClean()


# -- limits -----------------------------------------------------------------------------------


class LimitTests(AgentTestCase):
    agentOptions = {"maxRequestBytes": 4096, "requestTimeout": 1.0, "maxArchiveBytes": 2**62}

    async def test_requestLineLimit(self) -> None:
        """An overlong request line is refused with a clear error, with or without a newline, and
        the agent keeps answering afterwards."""
        for payload in (b"{" + b"a" * 10000, b'{"action": "ping", "x": "' + b"a" * 10000 + b'"}\n'):
            raw = await self.agent.exchange(payload)
            answer = json.loads(raw.partition(b"\n")[0])
            self.assertIn("exceeds the maximum of 4096 bytes", answer["error"])
        ping = await self.call({"action": "ping"})
        self.assertTrue(ping["pong"])

    async def test_deeplyNestedRequest(self) -> None:
        """Nesting that exhausts the JSON parser is a clear error, not an unhandled one."""
        for payload in (b"[" * 4000 + b"\n", b'{"":' * 1000 + b"\n"):
            raw = await self.agent.exchange(payload)
            answer = json.loads(raw.partition(b"\n")[0])
            self.assertIn("not valid JSON", answer["error"])

    async def test_silentConnectionClosed(self) -> None:
        """A connection that never finishes its request is closed without an answer instead of
        being held open forever."""
        started = time.monotonic()
        raw = await self.agent.exchange(b'{"action": "ping"')
        self.assertEqual(raw, b"")
        self.assertLess(time.monotonic() - started, 30)

    async def test_uploadLargerThanFreeSpaceRefusedUpFront(self) -> None:
        """Uploads larger than the spool's free space or with an impossible size are refused
        before anything is spooled."""
        spool = self.agent.context.config.spoolRoot
        stats = os.statvfs(spool)
        free = stats.f_bavail * stats.f_frsize
        for action in ("extract_archive", "install_secrets"):
            for size in (free + 2**30, -1, 2**63):
                answer = await self.call({"action": action, "archive_size": size})
                self.assertIn("error", answer, (action, size))
        self.assertEqual(os.listdir(spool), [])

    async def test_hugeSparseFileRead(self) -> None:
        """Reading a huge sparse file, or asking for an impossible `max_bytes`, fails quickly
        without reading the file."""
        with open(self.layout.workspace / "huge", "wb") as handle:
            handle.truncate(8 * 2**30)
        started = time.monotonic()
        answer = await self.call({"action": "read_workspace_file", "path": "huge"})
        self.assertIn("exceeds the maximum supported size", answer["error"])
        for maxBytes in (2**40, 0, -1):
            answer = await self.call(
                {"action": "read_workspace_file", "path": "huge", "max_bytes": maxBytes}
            )
            self.assertIn("error", answer)
        self.assertLess(time.monotonic() - started, 10)

    async def test_sparseFileBiggerThanTheSpoolNotExported(self) -> None:
        """A guest's ``truncate -s`` file larger than the state dir's free space."""
        spool = self.agent.context.config.spoolRoot
        stats = os.statvfs(spool)
        free = stats.f_bavail * stats.f_frsize
        (self.layout.workspace / "big").mkdir()
        (self.layout.workspace / "big" / "small.txt").write_text("small")
        with open(self.layout.workspace / "big" / "sparse", "wb") as handle:
            handle.truncate(free + 2**30)
        for path in ("/workspace/big", "/workspace/big/sparse"):
            raw = await self.agent.exchange({"action": "export_archive", "path": path})
            answer = json.loads(raw.partition(b"\n")[0])
            self.assertIn("state directory has", answer["error"])
            self.assertEqual(os.listdir(spool), [])
        fine = await self.agent.exchange(
            {"action": "export_archive", "path": "/workspace/big/small.txt"}
        )
        self.assertEqual(json.loads(fine.partition(b"\n")[0])["entry_count"], 1)

    async def test_fifoAndDevicesNeverRead(self) -> None:
        """FIFOs and device files are never opened: reads, writes and extraction over them are
        refused, a file probe only checks they exist, and an export describes them while their
        archive is refused on the way back in."""
        special = self.layout.workspace / "special"
        special.mkdir()
        os.mkfifo(special / "fifo")
        os.mknod(special / "zero", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
        for name in ("fifo", "zero"):
            path = f"/workspace/special/{name}"
            read = await self.call({"action": "read_workspace_file", "path": path})
            self.assertIn("unsupported workspace path type", read["error"])
            write = await self.call({"action": "write_workspace_file", "path": path, "text": "x"})
            self.assertIn("unsupported workspace path type", write["error"])
            archive = makeTar([fileMember(f"special/{name}", b"x")])
            extracted = await self.upload("extract_archive", archive)
            self.assertIn("conflicts with existing path", extracted["error"])
        # A readiness file probe sees the FIFO exists without opening it for reading.
        started = await self.call(
            {
                "action": "start_service",
                "service_name": "fifo",
                "command": "sleep 30",
                "readiness": {"type": "file", "path": "/workspace/special/fifo"},
                "ready_timeout_seconds": 5,
            }
        )
        self.assertEqual(started.get("state"), "running", started)
        stopped = await self.call({"action": "stop_service", "service_name": "fifo"})
        self.assertEqual(stopped["state"], "stopped")
        # Exporting the directory describes them (as tar does) without opening them.
        raw = await self.agent.exchange({"action": "export_archive", "path": "/workspace/special"})
        header = json.loads(raw.partition(b"\n")[0])
        self.assertEqual(header["entry_count"], 2)
        self.assertEqual(header["bytes_written"], 0)
        exported = raw.partition(b"\n")[2]
        with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
            types = {member.name: member.type for member in tar.getmembers()}
        self.assertEqual(types, {"fifo": tarfile.FIFOTYPE, "zero": tarfile.CHRTYPE})
        # And such an archive is refused on the way back in.
        answer = await self.upload("extract_archive", exported, destination="back")
        self.assertIn("unsupported archive member type", answer["error"])
        self.assertFalse((self.layout.workspace / "back").exists())


# -- working directories raced --------------------------------------------------------------


CWD_RACE_SECONDS = 2.0
"""How long each working-directory race keeps starting children (the flipper runs on)."""

_PRINT_CWD = 'echo "CWD=$(readlink /proc/$$/cwd)="'
_CWD_LINE = re.compile(r"CWD=(/[^=\r\n]*)=")


class WorkingDirectoryRaceTests(AgentTestCase):
    """A shell, a service or a command probe never starts outside the workspace, even when its
    ``cwd`` is swapped for a symlink to outside between the agent's check and the child's
    ``chdir`` (the child enters the directory the agent opened, through ``/proc``).

    Each child prints its working directory as the kernel has it (``/proc/$$/cwd``; not
    ``pwd -P``, which bash computes by resolving its remembered path *name* again): the
    directory the flipper swaps is named ``d`` or ``d.alt`` inside the workspace, whereas a
    child that escaped prints the outside directory's path.
    """

    def flip(self) -> Flipper:
        flipper = Flipper(self.layout.workspace, "d", self.layout.outside)
        flipper.start(self)
        return flipper

    def assertInside(self, cwd: str, context: object) -> None:
        self.assertNotIn(str(self.layout.outside), cwd, (context, cwd))
        self.assertIn(str(self.layout.workspace / "d"), cwd, context)

    async def shellCwd(self, shellId: str) -> str:
        """Ask the shell for its physical directory and wait for the answer."""
        await self.call({"action": "write_shell", "shell_id": shellId, "input": f"{_PRINT_CWD}\n"})
        cursor, seen = 0, ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = await self.call(
                {"action": "read_shell", "shell_id": shellId, "cursor": cursor, "wait_ms": 200}
            )
            cursor, seen = answer["next_cursor"], seen + answer["output"]
            found = _CWD_LINE.search(seen)
            if found:
                return found.group(1)
        self.fail(f"shell {shellId} never printed its directory: {seen!r}")

    async def serviceStdout(self, name: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            logs = await self.call({"action": "logs_service", "service_name": name})
            if logs.get("state") != "running" and logs["stdout"]:
                return str(logs["stdout"])
            await sleep(0.01)
        self.fail(f"service {name} never printed its directory")

    async def test_shellsNeverStartOutside(self) -> None:
        """A shell whose working directory is being swapped for a symlink to outside is either
        refused or starts inside the workspace."""
        flipper = self.flip()
        opened = 0
        started = time.monotonic()
        for index in range(200):
            if time.monotonic() - started > CWD_RACE_SECONDS:
                break
            shellId = f"s{index}"
            answer = await self.call(
                {"action": "open_shell", "shell_id": shellId, "cwd": "/workspace/d"}
            )
            if "error" in answer:
                continue  # d was the symlink when the agent looked: refused, as it must be
            self.assertEqual(answer["cwd"], "/workspace/d")
            opened += 1
            self.assertInside(await self.shellCwd(shellId), shellId)
            await self.call({"action": "close_shell", "shell_id": shellId})
        flipper.stop()
        self.assertGreater(flipper.flips, 0)
        self.assertGreater(opened, 3)

    async def test_servicesNeverStartOutside(self) -> None:
        """A service whose working directory is being swapped for a symlink to outside is either
        refused or runs inside the workspace."""
        flipper = self.flip()
        names = []
        started = time.monotonic()
        for index in range(200):
            if time.monotonic() - started > CWD_RACE_SECONDS:
                break
            name = f"v{index}"
            answer = await self.call(
                {
                    "action": "start_service",
                    "service_name": name,
                    "command": _PRINT_CWD,
                    "cwd": "/workspace/d",
                }
            )
            if "error" in answer:
                continue
            self.assertEqual(answer["cwd"], "/workspace/d")
            names.append(name)
        flipper.stop()
        self.assertGreater(flipper.flips, 0)
        self.assertGreater(len(names), 3)
        for name in names:
            stdout = await self.serviceStdout(name)
            found = _CWD_LINE.search(stdout)
            self.assertIsNotNone(found, stdout)
            assert found is not None
            self.assertInside(found.group(1), name)
            record = json.loads(
                (self.agent.context.config.serviceRoot / f"{name}.json").read_text()
            )
            self.assertEqual(record["cwd"], "/workspace/d")

    async def test_commandProbesNeverRunOutside(self) -> None:
        """Readiness command probes never run outside the workspace while the service's working
        directory is being swapped for a symlink to outside."""
        probeLogs = Path(self.mktemp()).absolute()
        probeLogs.mkdir()
        flipper = self.flip()
        ready = 0
        started = time.monotonic()
        for index in range(200):
            if time.monotonic() - started > CWD_RACE_SECONDS:
                break
            name = f"p{index}"
            probeLog = probeLogs / f"{name}.log"
            # Ready on the third check that found the directory: three probe commands each.
            probe = f'{_PRINT_CWD} >> {probeLog}; [ "$(wc -l < {probeLog})" -ge 3 ]'
            answer = await self.call(
                {
                    "action": "start_service",
                    "service_name": name,
                    "command": "sleep 30",
                    "cwd": "/workspace/d",
                    "readiness": {"type": "command", "command": probe},
                    "ready_timeout_seconds": 5,
                    "ready_interval_ms": 1,
                }
            )
            if "error" in answer:
                continue
            self.assertEqual(answer["state"], "running", answer)
            ready += 1
            await self.call({"action": "stop_service", "service_name": name})
        flipper.stop()
        self.assertGreater(flipper.flips, 0)
        self.assertGreater(ready, 3)
        checks = 0
        for probeLog in probeLogs.iterdir():
            for line in probeLog.read_text().splitlines():
                checks += 1
                self.assertInside(line, probeLog.name)
        self.assertGreaterEqual(checks, 3 * ready)

    async def test_noDescriptorLeak(self) -> None:
        """Each shell, service and probe holds its directory open only while it runs."""

        async def round(index: int) -> None:
            shellId, name = f"leak{index}", f"leak{index}"
            opened = await self.call({"action": "open_shell", "shell_id": shellId, "cwd": "real"})
            self.assertEqual(opened["cwd"], "/workspace/real")
            await self.call({"action": "close_shell", "shell_id": shellId})
            started = await self.call(
                {
                    "action": "start_service",
                    "service_name": name,
                    "command": "sleep 30",
                    "cwd": "real",
                    "readiness": {"type": "command", "command": "test -f inner.txt"},
                }
            )
            self.assertEqual(started["state"], "running", started)
            stopped = await self.call({"action": "stop_service", "service_name": name})
            self.assertEqual(stopped["state"], "stopped")
            # Stopped before it could start, and refused: nothing held either.
            racing = self.call(
                {"action": "start_service", "service_name": f"{name}-x", "command": "true"}
            )
            await self.call({"action": "stop_service", "service_name": f"{name}-x"})
            await racing
            missing = await self.call({"action": "open_shell", "shell_id": "m", "cwd": "nope"})
            self.assertIn("error", missing)

        def descriptors() -> int:
            return len(os.listdir("/proc/self/fd"))

        await round(0)  # lazily opened descriptors (/dev/null, pools) are there from now on
        before = descriptors()
        for index in range(1, 11):
            await round(index)
        deadline = time.monotonic() + 5
        while descriptors() > before and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertLessEqual(descriptors(), before)

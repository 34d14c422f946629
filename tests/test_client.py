"""The client against the real agent: over TCP, a UNIX socket and a Firecracker-style bridge.

Methods whose action the agent does not serve yet are skipped (the reason names the action),
so they run as soon as the capability lands.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from pyro_reactor.client import (
    AgentClient,
    AgentClosedError,
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
    fileReadiness,
)
from tests.client_helpers import (
    Agent,
    requireActions,
    shortSocketPath,
    startAgentEverywhere,
    startBridge,
    startForwarder,
    startScriptedServer,
)
from tests.helpers import reactor


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def writeRandom(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            handle.write(chunk)
            left -= len(chunk)


class ConnectingTests(TestCase):
    """The same ping over every way of reaching an agent, and every way of failing to."""

    async def test_pingOverTcpUnixAndFirecrackerBridge(self) -> None:
        """The same client pings the agent over TCP, a UNIX socket and a Firecracker-style
        CONNECT bridge, and the bridge sees exactly one CONNECT line."""
        agent = await startAgentEverywhere(self)
        bridge = await startBridge(self, agent)
        for where in (agent.tcp, agent.unix, bridge.endpoint(port=5005)):
            result = await AgentClient(reactor, where).ping()
            self.assertEqual(result.agent, "pyro-reactor", where)
            self.assertIn("ping", result.actions)
            self.assertTrue(result.supports("ping"))
            self.assertEqual(result.pid, os.getpid())
        self.assertEqual(bridge.requests, [b"CONNECT 5005"])

    async def test_refusedConnectNamesWhatTheSocketSaid(self) -> None:
        """A refused CONNECT fails with a message that quotes the VMM's refusal, the CONNECT line
        sent and the socket path."""
        bridge = await startBridge(self, mode="refuse", refusal=b"FAILURE no listener on 5005\n")
        with self.assertRaises(AgentUnavailableError) as caught:
            await AgentClient(reactor, bridge.endpoint()).ping()
        message = caught.exception.message
        self.assertIn("FAILURE no listener on 5005", message)
        self.assertIn("CONNECT 5005", message)
        self.assertIn(bridge.path, message)

    async def test_connectClosedWithoutAnswer(self) -> None:
        """A VMM socket that closes without answering CONNECT is reported as such, naming the
        port asked for."""
        bridge = await startBridge(self, mode="close")
        with self.assertRaises(AgentUnavailableError) as caught:
            await AgentClient(reactor, bridge.endpoint(port=7)).ping()
        self.assertIn("closed the connection without answering CONNECT 7", caught.exception.message)

    async def test_silentVsockSocketTimesOut(self) -> None:
        """A VMM socket that never answers times out at the client's connect timeout, or at the
        endpoint's own handshake timeout with the step that hung named."""
        bridge = await startBridge(self, mode="silent")
        client = AgentClient(reactor, bridge.endpoint(), connectTimeout=0.3)
        with self.assertRaises(AgentTimeoutError) as caught:
            await client.ping()
        self.assertIn("within 0.3 s", caught.exception.message)
        # The endpoint's own handshake timeout says which step hung.
        client = AgentClient(reactor, bridge.endpoint(timeout=0.2), connectTimeout=5)
        with self.assertRaises(AgentUnavailableError) as caught2:
            await client.ping()
        self.assertIn("no answer to CONNECT 5005 within 0.2 s", caught2.exception.message)

    async def test_nothingListening(self) -> None:
        """Connecting to a UNIX or fcvsock path where nothing listens fails with a clear error
        naming the path."""
        missing = shortSocketPath(self, "nobody.sock")
        for where in (f"unix:path={missing}", f"fcvsock:path={missing}:port=5005"):
            with self.assertRaises(AgentUnavailableError) as caught:
                await AgentClient(reactor, where).ping()
            self.assertIn("could not connect to", caught.exception.message)
            self.assertIn(missing, caught.exception.message)

    async def test_agentErrorCarriesTheAgentsMessage(self) -> None:
        """An error answer raises AgentError carrying the agent's message and the action that
        failed."""
        agent = await startAgentEverywhere(self)
        with self.assertRaises(AgentError) as caught:
            await AgentClient(reactor, agent.unix).call({"action": "no_such_action"})
        self.assertEqual(type(caught.exception), AgentError)
        self.assertEqual(caught.exception.message, "unknown action: 'no_such_action'")
        self.assertEqual(caught.exception.action, "no_such_action")

    async def test_wholeCallTimeout(self) -> None:
        """A peer that accepts but never answers makes the call fail at the whole-call timeout,
        not hang."""
        port = await startScriptedServer(self, b"", close=False)
        client = AgentClient(reactor, f"tcp:host=127.0.0.1:port={port}", timeout=0.3)
        started = reactor.seconds()
        with self.assertRaises(AgentTimeoutError) as caught:
            await client.ping()
        self.assertIn("no answer to ping", caught.exception.message)
        self.assertLess(reactor.seconds() - started, 5)

    async def test_answersThatBreakTheProtocol(self) -> None:
        """Answers that are not JSON, not an object, or cut off mid-line raise AgentProtocolError
        saying which."""
        for answer, expected in (
            (b"not json\n", "not JSON"),
            (b"[1, 2]\n", "not a JSON object"),
            (b'{"pong": tr', "in the middle of the answer"),
        ):
            port = await startScriptedServer(self, answer)
            with self.assertRaises(AgentProtocolError) as caught:
                await AgentClient(reactor, f"tcp:host=127.0.0.1:port={port}").ping()
            self.assertIn(expected, caught.exception.message)

    async def test_waitUntilReadyRetriesPeersThatAcceptThenClose(self) -> None:
        """waitUntilReady retries a peer that accepts connections and closes them (as slirp does
        before the guest listens) until a real answer comes."""
        agent = await startAgentEverywhere(self)
        forwarder, port = await startForwarder(self, agent, closeFirst=3)
        client = AgentClient(reactor, f"tcp:host=127.0.0.1:port={port}")
        with self.assertRaises(AgentClosedError) as caught:
            await client.ping()
        self.assertIn("closed the connection without answering", caught.exception.message)
        result = await client.waitUntilReady(timeout=20, initialDelay=0.01)
        self.assertEqual(result.agent, "pyro-reactor")
        self.assertEqual(forwarder.connections, 4)

    async def test_waitUntilReadyRetriesAVsockSocketWithoutListener(self) -> None:
        """waitUntilReady retries through a VMM socket whose guest port has no listener yet,
        until the agent answers."""
        agent = await startAgentEverywhere(self)
        bridge = await startBridge(self, agent, closeFirst=2)
        result = await AgentClient(reactor, bridge.endpoint()).waitUntilReady(
            timeout=20, initialDelay=0.01
        )
        self.assertEqual(result.agent, "pyro-reactor")
        self.assertEqual(bridge.connections, 3)

    async def test_waitUntilReadyGivesUpWithTheLastReason(self) -> None:
        """waitUntilReady gives up at its deadline with a message that includes the last failure
        seen."""
        bridge = await startBridge(self, mode="refuse", refusal=b"NOPE\n")
        client = AgentClient(reactor, bridge.endpoint())
        with self.assertRaises(AgentTimeoutError) as caught:
            await client.waitUntilReady(timeout=0.5, initialDelay=0.01, maxDelay=0.1)
        self.assertIn("did not answer within 0.5 s", caught.exception.message)
        self.assertIn("NOPE", caught.exception.message)
        self.assertGreater(bridge.connections, 2)


class ExecTests(TestCase):
    async def prepare(self) -> None:
        self.agent = await startAgentEverywhere(self)
        await requireActions(self, self.agent, "exec")
        self.client = AgentClient(reactor, self.agent.unix)

    async def test_outputExitCodeAndEnv(self) -> None:
        """exec returns stdout, stderr, the exit code and sees the environment given to it."""
        await self.prepare()
        result = await self.client.execute(
            "echo out; echo err >&2; echo $GREETING; exit 3", env={"GREETING": "hello"}
        )
        self.assertEqual(result.stdout, "out\nhello\n")
        self.assertEqual(result.stderr, "err\n")
        self.assertEqual(result.exitCode, 3)
        self.assertGreaterEqual(result.durationMs, 0)

    async def test_agentTimeout(self) -> None:
        """A command past its timeout_seconds comes back with exit code 124 and the timeout
        message."""
        await self.prepare()
        result = await self.client.execute("sleep 10", timeoutSeconds=1)
        self.assertEqual(result.exitCode, 124)
        self.assertIn("timed out after 1s", result.stderr)

    async def test_invalidEnvName(self) -> None:
        """An invalid environment variable name is refused by the agent and raised as AgentError."""
        await self.prepare()
        with self.assertRaises(AgentError) as caught:
            await self.client.execute("true", env={"1BAD": "x"})
        self.assertIn("invalid", caught.exception.message)


class FileTests(TestCase):
    async def prepare(self) -> None:
        self.agent = await startAgentEverywhere(self)
        await requireActions(
            self,
            self.agent,
            "write_workspace_file",
            "read_workspace_file",
            "list_workspace",
            "delete_workspace_path",
        )
        self.client = AgentClient(reactor, self.agent.tcp)

    async def test_roundTrip(self) -> None:
        """A file written through the client can be read back as bytes and text, and shows in a
        recursive listing."""
        await self.prepare()
        written = await self.client.writeWorkspaceFile("/workspace/dir/hello.txt", "héllo\n")
        self.assertEqual(written.path, "/workspace/dir/hello.txt")
        self.assertEqual(written.bytesWritten, len("héllo\n".encode()))
        self.assertEqual((self.agent.workspace / "dir" / "hello.txt").read_text(), "héllo\n")
        content = await self.client.readWorkspaceFile("/workspace/dir/hello.txt")
        self.assertEqual(content.content, "héllo\n".encode())
        self.assertEqual(content.text, "héllo\n")
        listing = await self.client.listWorkspace("/workspace", recursive=True)
        self.assertEqual(listing.artifactType, "directory")
        self.assertEqual(
            [(e.path, e.artifactType) for e in listing.entries],
            [("/workspace/dir", "directory"), ("/workspace/dir/hello.txt", "file")],
        )
        self.assertEqual(listing.entries[1].sizeBytes, 7)
        deleted = await self.client.deleteWorkspacePath("/workspace/dir/hello.txt")
        self.assertTrue(deleted.deleted)
        self.assertFalse((self.agent.workspace / "dir" / "hello.txt").exists())

    async def test_errors(self) -> None:
        """Reading a missing file or a path escaping the workspace raises AgentError with the
        agent's message."""
        await self.prepare()
        with self.assertRaises(AgentError) as caught:
            await self.client.readWorkspaceFile("/workspace/missing")
        self.assertEqual(
            caught.exception.message, "workspace path does not exist: /workspace/missing"
        )
        with self.assertRaises(AgentError):
            await self.client.readWorkspaceFile("/workspace/../etc/hostname")


class ArchiveTests(TestCase):
    """Uploads and downloads, large ones through the Firecracker-style bridge, byte for byte."""

    async def prepare(self) -> None:
        self.agent = await startAgentEverywhere(self)
        await requireActions(self, self.agent, "extract_archive", "export_archive")
        self.bridge = await startBridge(self, self.agent)
        self.client = AgentClient(reactor, self.bridge.endpoint())
        self.local = Path(self.mktemp()).absolute()
        self.local.mkdir()

    async def test_largeTreeUpAndDownByteForByte(self) -> None:
        """A 48 MiB tree with small files, an empty file and a symlink goes up and comes back
        byte for byte, with progress reported on the way."""
        await self.prepare()
        tree = self.local / "tree"
        (tree / "sub" / "deeper").mkdir(parents=True)
        writeRandom(tree / "big.bin", 48 * 1024 * 1024 + 123)
        for index in range(50):
            (tree / "sub" / f"small-{index}.txt").write_text(f"file {index}\n" * index)
        (tree / "sub" / "deeper" / "empty").write_bytes(b"")
        os.symlink("big.bin", tree / "link")
        seen: list[tuple[int, int]] = []
        result = await self.client.upload(
            tree, "/workspace/up", progress=lambda done, total: seen.append((done, total))
        )
        self.assertEqual(result.destination, "/workspace/up")
        self.assertEqual(
            result.bytesWritten,
            48 * 1024 * 1024 + 123 + sum(len(f"file {i}\n" * i) for i in range(50)),
        )
        guest = self.agent.workspace / "up"
        self.assertEqual(digest(guest / "big.bin"), digest(tree / "big.bin"))
        self.assertEqual(os.readlink(guest / "link"), "big.bin")
        self.assertEqual((guest / "sub" / "small-7.txt").read_text(), "file 7\n" * 7)
        self.assertEqual(seen[-1][0], seen[-1][1])
        self.assertGreater(len(seen), 10)

        back = self.local / "back"
        progress: list[tuple[int, int]] = []
        download = await self.client.download(
            "/workspace/up", back, progress=lambda done, total: progress.append((done, total))
        )
        self.assertEqual(download.export.artifactType, "directory")
        self.assertEqual(digest(back / "big.bin"), digest(tree / "big.bin"))
        self.assertEqual(os.readlink(back / "link"), "big.bin")
        self.assertEqual((back / "sub" / "deeper" / "empty").read_bytes(), b"")
        self.assertEqual(sorted(os.listdir(back / "sub")), sorted(os.listdir(tree / "sub")))
        self.assertEqual(progress[-1], (download.export.archiveSize, download.export.archiveSize))

    async def test_singleFileUploadAndDownload(self) -> None:
        """A single file uploads into a directory and downloads back into a local directory
        unchanged."""
        await self.prepare()
        source = self.local / "notes.txt"
        source.write_text("remember\n")
        result = await self.client.upload(source, "/workspace/docs")
        self.assertEqual(result.entryCount, 1)
        self.assertEqual((self.agent.workspace / "docs" / "notes.txt").read_text(), "remember\n")
        target = self.local / "fetched"
        download = await self.client.download("/workspace/docs/notes.txt", target)
        self.assertEqual(download.export.artifactType, "file")
        self.assertEqual((target / "notes.txt").read_text(), "remember\n")
        self.assertEqual(download.paths, (target.absolute() / "notes.txt",))

    async def test_exportArchiveToAFile(self) -> None:
        """exportArchive writes the agent's tar of a directory to a local file of the announced
        size."""
        await self.prepare()
        (self.agent.workspace / "a").mkdir()
        (self.agent.workspace / "a" / "x").write_text("x\n")
        target = self.local / "a.tar"
        export = await self.client.exportArchive("/workspace/a", target)
        self.assertEqual(export.archive, target)
        self.assertEqual(export.archiveSize, target.stat().st_size)
        with tarfile.open(target) as tar:
            self.assertEqual(tar.getnames(), ["x"])

    async def test_exportErrorLeavesNoFile(self) -> None:
        """An export that fails on the agent leaves no local file behind."""
        await self.prepare()
        target = self.local / "missing.tar"
        with self.assertRaises(AgentError) as caught:
            await self.client.exportArchive("/workspace/missing", target)
        self.assertIn("does not exist", caught.exception.message)
        self.assertFalse(target.exists())

    async def test_uploadRefusedBeforeTheBodyStopsStreaming(self) -> None:
        """An upload the agent refuses from its header (too large) fails at once with the agent's
        message instead of streaming the whole body."""
        await self.prepare()
        agent = await startAgentEverywhere(self, maxArchiveBytes=1024)
        source = self.local / "large.bin"
        writeRandom(source, 8 * 1024 * 1024)
        client = AgentClient(reactor, agent.unix)
        with self.assertRaises(AgentError) as caught:
            await client.upload(source, "/workspace")
        self.assertIn("exceeds the maximum of 1024 bytes", caught.exception.message)

    async def test_uploadOfAMissingPath(self) -> None:
        """Uploading a local path that does not exist fails before contacting the agent, naming
        the OS error."""
        await self.prepare()
        with self.assertRaises(AgentError) as caught:
            await self.client.upload(self.local / "nothing", "/workspace")
        self.assertIn("cannot upload", caught.exception.message)
        self.assertIn("No such file or directory", caught.exception.message)


class SecretsTests(TestCase):
    async def test_installSecretValues(self) -> None:
        """installSecretValues installs text and binary secrets under the agent's secrets
        directory."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "install_secrets")
        client = AgentClient(reactor, agent.tcp)
        result = await client.installSecretValues({"API_TOKEN": "s3cr3t", "OTHER": b"\x00\x01"})
        self.assertEqual(result.entryCount, 2)
        secrets = agent.context.config.secretRoot
        self.assertEqual((secrets / "API_TOKEN").read_text(), "s3cr3t")
        self.assertEqual((secrets / "OTHER").read_bytes(), b"\x00\x01")


class ShellTests(TestCase):
    async def prepare(self) -> None:
        self.agent = await startAgentEverywhere(self)
        await requireActions(
            self, self.agent, "open_shell", "read_shell", "write_shell", "close_shell"
        )
        self.client = AgentClient(reactor, self.agent.unix)

    async def readUntil(self, shellId: str, text: str, cursor: int = 0) -> tuple[str, int]:
        seen = ""
        deadline = reactor.seconds() + 15
        while text not in seen and reactor.seconds() < deadline:
            read = await self.client.readShell(shellId, cursor, waitMs=500)
            seen += read.output
            cursor = read.nextCursor
        self.assertIn(text, seen)
        return seen, cursor

    async def test_shellLifecycle(self) -> None:
        """A shell opens with the asked size, runs input, is listed, reads output by cursor and
        closes."""
        await self.prepare()
        opened = await self.client.openShell("s1", cols=90, rows=20)
        self.addCleanup(lambda: self.client.closeShell("s1").addErrback(lambda _: None))
        self.assertEqual((opened.shellId, opened.cols, opened.rows), ("s1", 90, 20))
        self.assertTrue(opened.running)
        await self.client.writeShell("s1", "echo $((6 * 7))")
        _, cursor = await self.readUntil("s1", "42")
        listed = (
            await self.client.listShells()
            if "list_shells" in (await self.client.ping()).actions
            else None
        )
        if listed is not None:
            self.assertEqual([s.shellId for s in listed], ["s1"])
        if "resize_shell" in (await self.client.ping()).actions:
            resized = await self.client.resizeShell("s1", 100, 33)
            self.assertEqual((resized.cols, resized.rows), (100, 33))
            await self.client.writeShell("s1", "stty size")
            await self.readUntil("s1", "33 100", cursor)
        signalled = await self.client.signalShell("s1", "INT")
        self.assertEqual(signalled.raw["signal"], "INT")
        closed = await self.client.closeShell("s1")
        self.assertTrue(closed.raw["closed"])
        with self.assertRaises(AgentError) as caught:
            await self.client.readShell("s1")
        self.assertEqual(caught.exception.message, "shell 's1' does not exist")


class ServiceTests(TestCase):
    async def test_serviceLifecycle(self) -> None:
        """A service with a file readiness probe starts ready, shows in status and logs, and
        stops."""
        agent = await startAgentEverywhere(self)
        await requireActions(
            self, agent, "start_service", "status_service", "logs_service", "stop_service"
        )
        client = AgentClient(reactor, agent.tcp)
        started = await client.startService(
            "web",
            "echo starting; touch ready; exec sleep 60",
            readiness=fileReadiness("/workspace/ready"),
            readyTimeoutSeconds=10,
            readyIntervalMs=50,
        )
        self.addCleanup(lambda: client.stopService("web").addErrback(lambda _: None))
        self.assertEqual((started.serviceName, started.state), ("web", "running"))
        self.assertIsNotNone(started.readyAt)
        status = await client.statusService("web")
        self.assertEqual(status.pid, started.pid)
        logs = await client.logsService("web", tailLines=5)
        self.assertEqual(logs.stdout, "starting\n")
        if "list_services" in (await client.ping()).actions:
            self.assertEqual([s.serviceName for s in await client.listServices()], ["web"])
        stopped = await client.stopService("web")
        self.assertEqual(stopped.state, "stopped")
        self.assertIn(stopped.stopReason, ("sigterm", "sigkill"))
        with self.assertRaises(AgentError) as caught:
            await client.statusService("nope")
        self.assertEqual(caught.exception.message, "service 'nope' does not exist")


__all__ = ["Agent"]


class UnsafeExportTests(TestCase):
    """A download from a peer that serves an export escaping LOCAL_DIR writes nothing."""

    async def test_escapingMemberRefusedAndNothingWritten(self) -> None:
        """A download from a peer whose export has a member escaping the target directory is
        refused and writes nothing locally."""
        local = Path(self.mktemp()).absolute()
        local.mkdir()
        archive = local / "evil.tar"
        with tarfile.open(archive, "w") as tar:
            for name in ("fine.txt", "../escaped.txt"):
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"x\n"))
        body = archive.read_bytes()
        archive.unlink()
        header = {
            "workspace_path": "/workspace/x",
            "artifact_type": "directory",
            "archive_size": len(body),
        }
        port = await startScriptedServer(self, json.dumps(header).encode() + b"\n" + body)
        spool = local / "spool"
        spool.mkdir()
        target = local / "target"
        client = AgentClient(reactor, f"tcp:host=127.0.0.1:port={port}", spoolDirectory=spool)
        with self.assertRaises(AgentError) as caught:
            await client.download("/workspace/x", target)
        self.assertIn("leaves the directory: ../escaped.txt", caught.exception.message)
        self.assertEqual(os.listdir(target), [])
        self.assertFalse((local / "escaped.txt").exists())
        self.assertEqual(os.listdir(spool), [])

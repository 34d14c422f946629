"""``pyro-agent-client`` against the real agent: in-process runs of the CLI, the console script
as a process, and ``shell`` under a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import struct
import sys
import termios
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from pyro_reactor.client import AgentClient
from pyro_reactor.client.cli import Console, run
from tests.client_helpers import (
    Agent,
    requireActions,
    shortSocketPath,
    startAgentEverywhere,
    startBridge,
    startScriptedServer,
)
from tests.helpers import reactor

SCRIPT = Path(sys.executable).with_name("pyro-agent-client")


class FakeTty(io.StringIO):
    """A text stream that says it is a terminal (to see the progress bar)."""

    def isatty(self) -> bool:
        return True


class Ran:
    """What one in-process run of the CLI printed and returned."""

    def __init__(self, code: int, stdout: bytes, stderr: str) -> None:
        self.code = code
        self.stdoutBytes = stdout
        self.stdout = stdout.decode("utf-8", "replace")
        self.stderr = stderr


async def cli(*argv: str, stdin: str = "", stdout: FakeTty | None = None) -> Ran:
    """Run the CLI in this process; stdout is binary-capable unless a FakeTty is given."""
    binary = io.BytesIO()
    out: TextIO = io.TextIOWrapper(binary, encoding="utf-8") if stdout is None else stdout
    err = io.StringIO()
    code = await run(reactor, argv, Console(io.StringIO(stdin), out, err))
    out.flush()
    raw = binary.getvalue() if stdout is None else stdout.getvalue().encode()
    return Ran(code, raw, err.getvalue())


class BasicCommandTests(TestCase):
    async def prepare(self, *actions: str) -> Agent:
        agent = await startAgentEverywhere(self)
        if actions:
            await requireActions(self, agent, *actions)
        return agent

    async def test_ping(self) -> None:
        """pyro-agent-client ping prints the agent and its actions, or its JSON answer with
        --json."""
        agent = await self.prepare()
        ran = await cli("--connect", agent.unix, "ping")
        self.assertEqual(ran.code, 0, ran.stderr)
        self.assertIn("pyro-reactor", ran.stdout)
        self.assertIn("actions: ", ran.stdout)
        ran = await cli("--connect", agent.unix, "--json", "ping")
        self.assertEqual(json.loads(ran.stdout)["pong"], True)

    async def test_execExitsWithTheCommandsCode(self) -> None:
        """exec prints the command's stdout and stderr and exits with its exit code, passing -e
        variables."""
        agent = await self.prepare("exec")
        ran = await cli(
            "--connect",
            agent.tcp,
            "exec",
            "-e",
            "WHO=you",
            "--",
            "echo hi $WHO; echo oops >&2; exit 7",
        )
        self.assertEqual((ran.code, ran.stdout, ran.stderr), (7, "hi you\n", "oops\n"))
        ran = await cli("--connect", agent.tcp, "--json", "exec", "exit", "3")
        self.assertEqual(ran.code, 3)
        self.assertEqual(json.loads(ran.stdout)["exit_code"], 3)

    async def test_failureExitCodes(self) -> None:
        """The CLI exits 3 when the agent cannot be reached, 255 for exec, and 4 on a timeout."""
        missing = shortSocketPath(self, "none.sock")
        ran = await cli("--connect", f"unix:path={missing}", "ping")
        self.assertEqual(ran.code, 3)
        self.assertIn("could not connect to", ran.stderr)
        ran = await cli("--connect", f"unix:path={missing}", "exec", "true")
        self.assertEqual(ran.code, 255)
        silent = await startScriptedServer(self, b"", close=False)
        ran = await cli(
            "--connect", f"tcp:host=127.0.0.1:port={silent}", "--timeout", "0.3", "ping"
        )
        self.assertEqual(ran.code, 4)
        self.assertIn("no answer to ping", ran.stderr)
        refusing = await startBridge(self, mode="refuse", refusal=b"NO\n")
        ran = await cli("--connect", refusing.endpoint(), "ping")
        self.assertEqual(ran.code, 3)
        self.assertIn("'NO'", ran.stderr)

    async def test_usageErrors(self) -> None:
        """Usage mistakes (no endpoint, unknown command, bad endpoint, bad -e) exit with status 2
        and say what is wrong."""
        os.environ.pop("PYRO_AGENT", None)
        ran = await cli("ping")
        self.assertEqual(ran.code, 2)
        self.assertIn("--connect ENDPOINT is required", ran.stderr)
        ran = await cli("--connect", "tcp:host=127.0.0.1:port=1", "frobnicate")
        self.assertEqual(ran.code, 2)
        ran = await cli("--connect", "fcvsock:path=/x", "ping")
        self.assertEqual(ran.code, 2)
        self.assertIn("needs port=", ran.stderr)
        ran = await cli("--connect", "tcp:host=127.0.0.1:port=1", "exec", "-e", "NOEQUALS", "true")
        self.assertEqual(ran.code, 2)
        self.assertIn("NAME=VALUE", ran.stderr)

    async def test_filesCommands(self) -> None:
        """put, cat, ls and rm write, read, list and delete workspace files from stdin or local
        files."""
        agent = await self.prepare(
            "write_workspace_file", "read_workspace_file", "list_workspace", "delete_workspace_path"
        )
        ran = await cli("--connect", agent.unix, "put", "/workspace/a/b.txt", stdin="from stdin\n")
        self.assertEqual(ran.code, 0, ran.stderr)
        self.assertEqual((agent.workspace / "a" / "b.txt").read_text(), "from stdin\n")
        local = Path(self.mktemp())
        local.write_text("from a file\n")
        ran = await cli("--connect", agent.unix, "put", "/workspace/c.txt", str(local))
        self.assertEqual(ran.stdout, "wrote 12 bytes to /workspace/c.txt\n")
        (agent.workspace / "bin.dat").write_bytes(bytes(range(256)))
        ran = await cli("--connect", agent.unix, "cat", "/workspace/bin.dat")
        self.assertEqual(ran.stdoutBytes, bytes(range(256)))
        ran = await cli("--connect", agent.unix, "ls", "-r")
        self.assertEqual(ran.code, 0)
        lines = ran.stdout.splitlines()
        self.assertEqual(
            [line.split()[-1] for line in lines],
            ["/workspace/a", "/workspace/a/b.txt", "/workspace/bin.dat", "/workspace/c.txt"],
        )
        self.assertTrue(lines[0].startswith("d "))
        self.assertEqual(lines[2].split()[:2], ["-", "256"])
        ran = await cli("--connect", agent.unix, "rm", "/workspace/c.txt")
        self.assertEqual(ran.code, 0)
        self.assertFalse((agent.workspace / "c.txt").exists())
        ran = await cli("--connect", agent.unix, "cat", "/workspace/c.txt")
        self.assertEqual(ran.code, 1)
        self.assertIn("workspace path does not exist: /workspace/c.txt", ran.stderr)
        ran = await cli("--connect", agent.unix, "--json", "cat", "/workspace/c.txt")
        self.assertEqual(
            json.loads(ran.stdout), {"error": "workspace path does not exist: /workspace/c.txt"}
        )

    async def test_uploadAndDownload(self) -> None:
        """upload and download move a tree through the Firecracker-style bridge byte for byte,
        without a progress bar when not on a terminal."""
        agent = await self.prepare("extract_archive", "export_archive")
        bridge = await startBridge(self, agent)
        tree = Path(self.mktemp()).absolute()
        (tree / "nested").mkdir(parents=True)
        payload = os.urandom(3 * 1024 * 1024 + 5)
        (tree / "nested" / "data.bin").write_bytes(payload)
        (tree / "top.txt").write_text("top\n")
        ran = await cli("--connect", bridge.endpoint(), "upload", str(tree), "/workspace/project")
        self.assertEqual(ran.code, 0, ran.stderr)
        self.assertIn("uploaded", ran.stdout)
        self.assertNotIn("\r", ran.stdout)  # no progress bar when stdout is not a terminal
        self.assertEqual(
            (agent.workspace / "project" / "nested" / "data.bin").read_bytes(), payload
        )
        self.assertEqual((agent.workspace / "project" / "top.txt").read_text(), "top\n")
        # A single file goes into GUEST_DIR under its own name.
        ran = await cli(
            "--connect", bridge.endpoint(), "upload", str(tree / "top.txt"), "/workspace/one"
        )
        self.assertEqual((agent.workspace / "one" / "top.txt").read_text(), "top\n")

        back = Path(self.mktemp()).absolute()
        tty = FakeTty()
        ran = await cli(
            "--connect", bridge.endpoint(), "download", "/workspace/project", str(back), stdout=tty
        )
        self.assertEqual(ran.code, 0, ran.stderr)
        self.assertEqual(
            hashlib.sha256((back / "nested" / "data.bin").read_bytes()).digest(),
            hashlib.sha256(payload).digest(),
        )
        self.assertEqual(sorted(os.listdir(back)), ["nested", "top.txt"])
        self.assertIn("\rdownload /workspace/project [", ran.stdout)
        self.assertIn("100%", ran.stdout)
        self.assertIn("/s", ran.stdout)
        self.assertIn("ETA", ran.stdout)
        self.assertIn("downloaded /workspace/project (directory)", ran.stdout)

        ran = await cli("--connect", bridge.endpoint(), "download", "/workspace/nothing", str(back))
        self.assertEqual(ran.code, 1)
        self.assertIn("does not exist", ran.stderr)

    async def test_serviceCommands(self) -> None:
        """service start, status, logs and stop drive a service with a readiness file."""
        agent = await self.prepare(
            "start_service", "status_service", "logs_service", "stop_service"
        )
        endpoint = agent.tcp
        ran = await cli(
            "--connect",
            endpoint,
            "service",
            "start",
            "web",
            "--ready-file",
            "/workspace/up",
            "--ready-interval",
            "50",
            "--",
            "echo hello; touch up; exec sleep 60",
        )
        self.addCleanup(
            lambda: AgentClient(reactor, endpoint).stopService("web").addErrback(lambda _: None)
        )
        self.assertEqual(ran.code, 0, ran.stderr)
        self.assertIn("web: running (pid ", ran.stdout)
        ran = await cli("--connect", endpoint, "service", "logs", "web")
        self.assertEqual(ran.stdout, "hello\n")
        ran = await cli("--connect", endpoint, "--json", "service", "status", "web")
        self.assertEqual(json.loads(ran.stdout)["state"], "running")
        if "list_services" in (await AgentClient(reactor, endpoint).ping()).actions:
            ran = await cli("--connect", endpoint, "service", "list")
            self.assertTrue(ran.stdout.startswith("web: running"))
        ran = await cli("--connect", endpoint, "service", "stop", "web")
        self.assertEqual(ran.code, 0)
        self.assertIn("web: stopped", ran.stdout)
        ran = await cli(
            "--connect",
            endpoint,
            "service",
            "start",
            "bad",
            "--ready-file",
            "/workspace/never",
            "--ready-timeout",
            "1",
            "--",
            "exit 5",
        )
        self.assertEqual(ran.code, 1)
        self.assertIn("bad: failed", ran.stdout)


class ConsoleScriptTests(TestCase):
    """The installed ``pyro-agent-client`` script, as a process."""

    async def test_scriptRunsExecAndExitsWithItsCode(self) -> None:
        """The installed pyro-agent-client script runs exec and exits with the command's code."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "exec")
        out, err, code = await getProcessOutputAndValue(
            str(SCRIPT),
            ["--connect", agent.unix, "exec", "--", "echo via script; exit 42"],
            env=dict(os.environ),
            reactor=reactor,
        )
        self.assertEqual((out, code), (b"via script\n", 42), err)

    async def test_environmentVariableGivesTheEndpoint(self) -> None:
        """PYRO_AGENT gives the endpoint when --connect is not used."""
        agent = await startAgentEverywhere(self)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pyro_reactor.client.cli", "--json", "ping"],
            env={**os.environ, "PYRO_AGENT": agent.tcp},
            reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["agent"], "pyro-reactor")


# -- shell under a pseudo-terminal ------------------------------------------------------


def setWindowSize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class TerminalProcess(protocol.ProcessProtocol):
    """The CLI running on a pty: collects its screen output, tells when it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self.debug = os.environ.get("DEBUG_PTY")
        self.waiters: list[tuple[bytes, Deferred[None]]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.debug:
            print("PTY", repr(data))
        self.output += data
        for waiter in list(self.waiters):
            if waiter[0] in self.output:
                self.waiters.remove(waiter)
                waiter[1].callback(None)

    def waitFor(self, text: bytes, timeout: float = 15.0) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        if text in self.output:
            waiting.callback(None)
            return waiting
        self.waiters.append((text, waiting))
        return waiting.addTimeout(timeout, reactor)

    def processExited(self, reason: Failure) -> None:
        # Not processEnded: the test holds the pty's slave open, so the master never reports
        # the end of output.
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif isinstance(reason.value, ProcessTerminated):
            self.ended.callback(reason.value.exitCode)
        else:
            self.ended.errback(reason)


class ShellTerminalTests(TestCase):
    timeout = 40

    async def startShellCommand(
        self, agent: Agent, *extra: str
    ) -> tuple[TerminalProcess, Any, int]:
        master, slave = os.openpty()
        name = os.ttyname(slave)
        setWindowSize(slave, 24, 80)
        # A second descriptor on the slave, to look at the terminal's settings from outside.
        watcher = os.open(name, os.O_RDWR | os.O_NOCTTY)
        self.addCleanup(os.close, watcher)
        process = TerminalProcess()
        transport = reactor.spawnProcess(
            process,
            str(SCRIPT),
            [str(SCRIPT), "--connect", agent.unix, "shell", *extra],
            env={**os.environ, "TERM": "xterm"},
            usePTY=(master, slave, name),
        )

        def stop() -> Deferred[int] | None:
            if process.ended.called:
                return None
            transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(stop)
        return process, transport, watcher

    async def test_typeResizeDetachAndReattach(self) -> None:
        """An attached shell runs the terminal raw, forwards typing and window size, detaches
        with Ctrl-] and can be reattached."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "open_shell", "read_shell", "write_shell", "resize_shell")
        client = AgentClient(reactor, agent.tcp)
        watcherSettings: list[Any] = []
        process, transport, watcher = await self.startShellCommand(agent, "work")
        before = termios.tcgetattr(watcher)
        await process.waitFor(b"pyro$ ")
        # The terminal is raw while attached.
        raw = termios.tcgetattr(watcher)
        self.assertFalse(raw[3] & termios.ICANON)
        self.assertFalse(raw[3] & termios.ECHO)
        watcherSettings.append(raw)
        # Typing a command shows its output.
        transport.write(b"echo $((6 * 7))\r")
        await process.waitFor(b"42")
        # The size sent at the start reached the agent; a resize does too (SIGWINCH).
        self.assertEqual([(s.cols, s.rows) for s in await client.listShells()], [(80, 24)])
        setWindowSize(watcher, 33, 101)
        for _ in range(100):
            shells = await client.listShells()
            if (shells[0].cols, shells[0].rows) == (101, 33):
                break
            await deferLater(0.05)
        self.assertEqual((shells[0].cols, shells[0].rows), (101, 33))
        transport.write(b"stty size\r")
        await process.waitFor(b"33 101")
        # Ctrl-] detaches: the client exits 0, the terminal is as it was, the shell lives on.
        transport.write(b"\x1d")
        self.assertEqual(await process.ended, 0)
        self.assertEqual(termios.tcgetattr(watcher), before)
        await process.waitFor(b"detached from shell work")
        self.assertEqual([s.state for s in await client.listShells()], ["running"])

        # Reattach by id: the recent output is shown again and typing still works.
        again, transport2, watcher2 = await self.startShellCommand(agent, "work")
        await again.waitFor(b"attached to shell work")
        await again.waitFor(b"33 101")
        transport2.write(b"exit 3\r")
        self.assertEqual(await again.ended, 3)
        await again.waitFor(b"exited with 3")
        self.assertEqual(termios.tcgetattr(watcher2)[3] & termios.ICANON, termios.ICANON)
        self.assertEqual(await client.listShells(), [])

    async def test_terminalRestoredWhenTheAgentGoesAway(self) -> None:
        """When the agent goes away mid-shell the CLI fails and restores the terminal's settings."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "open_shell", "read_shell", "write_shell")
        process, _, watcher = await self.startShellCommand(agent)
        before = termios.tcgetattr(watcher)
        await process.waitFor(b"pyro$ ")
        self.assertFalse(termios.tcgetattr(watcher)[3] & termios.ICANON)
        # The agent goes away: nothing listens any more.
        for port in agent.listeningPorts:
            await port.stopListening()
        code = await process.ended
        self.assertNotEqual(code, 0)
        self.assertEqual(termios.tcgetattr(watcher), before)

    async def test_terminalRestoredOnSigterm(self) -> None:
        """SIGTERM to the CLI during a shell restores the terminal's settings."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "open_shell", "read_shell", "write_shell")
        process, transport, watcher = await self.startShellCommand(agent)
        before = termios.tcgetattr(watcher)
        await process.waitFor(b"pyro$ ")
        self.assertFalse(termios.tcgetattr(watcher)[3] & termios.ICANON)
        transport.signalProcess("TERM")
        await process.ended
        self.assertEqual(termios.tcgetattr(watcher), before)

    async def test_shellNeedsATerminal(self) -> None:
        """shell refuses to run without a terminal, with usage status 2."""
        agent = await startAgentEverywhere(self)
        ran = await cli("--connect", agent.unix, "shell")
        self.assertEqual(ran.code, 2)
        self.assertIn("needs a terminal", ran.stderr)


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class InterruptTests(TestCase):
    async def test_interruptedDownloadLeavesNoFiles(self) -> None:
        """A download interrupted mid-export leaves no partial files behind."""
        # A peer that sends an export header and a few bytes, then nothing more.
        header = {"workspace_path": "/workspace/x", "artifact_type": "file", "archive_size": 10**6}
        port = await startScriptedServer(
            self, json.dumps(header).encode() + b"\n" + b"\0" * 1000, close=False
        )
        spool = Path(self.mktemp()).absolute()
        spool.mkdir()
        ended: Deferred[tuple[bytes, bytes, int]] = Deferred()
        process = CollectingProcess(ended)
        reactor.spawnProcess(
            process,
            str(SCRIPT),
            [str(SCRIPT), "--connect", f"tcp:host=127.0.0.1:port={port}", "download", "/x", "out"],
            env={**os.environ, "TMPDIR": str(spool)},
            path=str(spool),
        )
        for _ in range(200):
            if os.listdir(spool) and any(n.startswith("pyro-export-") for n in os.listdir(spool)):
                break
            await deferLater(0.05)
        self.assertTrue(any(n.startswith("pyro-export-") for n in os.listdir(spool)))
        assert process.transport is not None
        process.transport.signalProcess("TERM")
        await ended
        self.assertEqual([n for n in os.listdir(spool) if n.startswith("pyro-export-")], [])


class CollectingProcess(protocol.ProcessProtocol):
    def __init__(self, ended: Deferred[tuple[bytes, bytes, int]]) -> None:
        self.out = b""
        self.err = b""
        self.ended = ended

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", 0)
        self.ended.callback((self.out, self.err, code if code is not None else -1))

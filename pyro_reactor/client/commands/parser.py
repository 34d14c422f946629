"""The command line of ``pyro-agent-client``: the parser and the helpers that read its words."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from typing import Any, NoReturn

from pyro_reactor._version import __version__
from pyro_reactor.client.commands.base import UsageError
from pyro_reactor.client.terminal import DETACH_KEY_NAME

ENDPOINT_VARIABLE = "PYRO_AGENT"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


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

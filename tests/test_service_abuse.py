"""Services under abuse: private files, a full state directory, capped logs, leftovers, odd input.

Each test reproduces one way a host (or a service) could misuse the agent, with real processes
over the wire where the path matters, and shows the agent holds.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.services import _runner, records, registry
from pyro_reactor.capabilities.services.records import (
    RecordWriter,
    ServiceFiles,
    runnerScript,
    writeRecord,
)
from pyro_reactor.capabilities.services.units import SessionUnit, UnitWatch, processStat
from pyro_reactor.context import AgentConfig, AgentContext
from tests.helpers import RunningAgent, alive, reactor, startAgent, waitUntil

PYTHON = sys.executable


def killUnits(stateDir: Path) -> None:
    """Leave nothing of any service behind, whatever the test did."""
    for record in (stateDir / "pyro-services").glob("*.json"):
        try:
            loaded = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        pid, ticks = loaded.get("pid"), loaded.get("pid_start_ticks")
        if isinstance(pid, int) and pid > 1:
            SessionUnit(pid, ticks if isinstance(ticks, int) else None).kill(signal.SIGKILL)


def findProcesses(*argv: str) -> list[int]:
    """The pids of live processes whose command line is exactly C{argv}."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def uniqueSleep() -> str:
    """A ``sleep`` duration no other test uses, to find the process again."""
    return f"3{uuid.uuid4().int % 10**6:06d}"


class AbuseTestCase(TestCase):
    """Starts an agent whose services are all killed at the end of the test."""

    async def agent(self, **overrides: Any) -> RunningAgent:
        agent = await startAgent(self, **overrides)
        self.addCleanup(killUnits, agent.stateDir)
        return agent

    async def ended(self, agent: RunningAgent, name: str) -> dict[str, Any]:
        """The status of C{name} once it is no longer running (bounded wait)."""
        answers: list[dict[str, Any]] = []

        for _ in range(300):
            answers.append(await agent.call({"action": "status_service", "service_name": name}))
            if answers[-1]["state"] != "running":
                break
            await deferLater(reactor, 0.05)
        return answers[-1]


class PrivateFilesTests(AbuseTestCase):
    """Everything under the service root is the owner's alone."""

    async def test_logsRecordsRunnerAndStatusAreOwnerOnly(self) -> None:
        """A service printing an env secret: its files are 0600 (runner 0700) in a 0700 root."""
        agent = await self.agent()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "secretive",
                "command": 'echo "$TOKEN"; echo e >&2; exit 3',
                "env": {"TOKEN": "s3cr3t-value"},
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        ended = await self.ended(agent, "secretive")
        self.assertEqual((ended["state"], ended["exit_code"]), ("exited", 3))
        root = agent.stateDir / "pyro-services"
        self.assertEqual(stat.S_IMODE(root.stat().st_mode), 0o700)
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in root.iterdir()}
        self.assertEqual(
            modes,
            {
                "secretive.json": 0o600,
                "secretive.stdout": 0o600,
                "secretive.stderr": 0o600,
                "secretive.status": 0o600,
                "secretive.runner.sh": 0o700,
            },
        )

    async def test_aRootLeftOpenByAnEarlierAgentIsClosed(self) -> None:
        """A 0755 root with a 0644 record from an older agent is made owner-only at start."""
        base = Path(self.mktemp()).absolute()
        root = base / "state" / "pyro-services"
        root.mkdir(parents=True, mode=0o755)
        os.chmod(root, 0o755)
        (base / "workspace").mkdir()
        record = root / "old.json"
        record.write_text(json.dumps({"service_name": "old", "state": "stopped"}))
        os.chmod(record, 0o644)
        pool = ThreadPool(minthreads=0, maxthreads=1)
        config = AgentConfig(workspace=base / "workspace", stateDir=base / "state")
        services = registry.Services(AgentContext(config=config, reactor=reactor, threadPool=pool))
        services.startService()
        self.addCleanup(services.stopService)
        self.assertEqual(stat.S_IMODE(root.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(record.stat().st_mode), 0o600)


class FullStateDirectoryTests(AbuseTestCase):
    """No space left under the state directory: clear errors, no lost record, no temporaries."""

    async def test_startAnswersAClearErrorAndLeavesNothing(self) -> None:
        """Writing the runner fails with ENOSPC: a clear error, the temporary file removed."""
        agent = await self.agent()
        original = records._writePrivate

        def full(path: Path, data: bytes, mode: int = 0o600) -> None:
            if path.name.endswith(".tmp"):
                original(path, data[:1], mode)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            original(path, data, mode)

        self.patch(records, "_writePrivate", full)
        answer = await agent.call(
            {"action": "start_service", "service_name": "web", "command": "sleep 60"}
        )
        self.assertEqual(
            answer, {"error": "cannot start service 'web': the state directory is full"}
        )
        root = agent.stateDir / "pyro-services"
        self.assertEqual([path.name for path in root.glob(".*")], [])
        status = await agent.call({"action": "status_service", "service_name": "web"})
        self.assertEqual(status, {"error": "service 'web' does not exist"})

    def test_recordRewrittenInPlaceWhenNoNewFileFits(self) -> None:
        """A full directory (no room for the temporary file): the record is rewritten in place."""
        root = Path(self.mktemp())
        root.mkdir()
        files = ServiceFiles(root, "web")
        writeRecord(files, json.dumps({"state": "running", "pid": 7}))

        def noRoom(source: Any, target: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "replace", noRoom)
        writeRecord(files, json.dumps({"state": "stopped"}))
        self.assertEqual(json.loads(files.record.read_text()), {"state": "stopped"})
        self.assertEqual(sorted(path.name for path in root.iterdir()), ["web.json"])

    def test_failedWriteIsRetriedUntilItLands(self) -> None:
        """A record write that fails is logged and retried; the newest record lands."""
        root = Path(self.mktemp())
        root.mkdir()
        files = ServiceFiles(root, "web")
        clock = Clock()
        failures = [2]

        def inThread(function: Callable[..., None], *args: Any) -> Deferred[None]:
            try:
                if failures[0]:
                    failures[0] -= 1
                    raise OSError(errno.ENOSPC, "No space left on device")
                function(*args)
            except OSError as error:
                failed: Deferred[None] = Deferred()
                failed.errback(error)
                return failed
            done: Deferred[None] = Deferred()
            done.callback(None)
            return done

        writer = RecordWriter(files, inThread, clock)
        saved = writer.save({"state": "stopped", "stop_reason": "sigterm"})
        self.successResultOf(saved)  # the answer is not held back
        self.assertTrue(writer.failing)
        self.assertFalse(files.record.exists())
        clock.advance(records.RETRY_INTERVAL)
        self.assertTrue(writer.failing)
        clock.advance(records.RETRY_INTERVAL)
        self.assertFalse(writer.failing)
        self.assertEqual(json.loads(files.record.read_text())["state"], "stopped")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    async def test_stoppedServiceComesBackStoppedAfterAFailedWrite(self) -> None:
        """The 'stopped' record fails to write at first; it is retried, so a restart sees it."""
        agent = await self.agent()
        started = await agent.call(
            {"action": "start_service", "service_name": "web", "command": "sleep 60"}
        )
        self.assertEqual(started["state"], "running")
        original = records.writeRecord
        blocked = [True]

        def fullDisk(files: ServiceFiles, text: str) -> None:
            if blocked[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            original(files, text)

        self.patch(records, "writeRecord", fullDisk)
        stopped = await agent.call({"action": "stop_service", "service_name": "web"})
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))
        path = agent.stateDir / "pyro-services" / "web.json"
        self.assertEqual(json.loads(path.read_text())["state"], "running")
        blocked[0] = False
        self.assertTrue(
            await waitUntil(lambda: json.loads(path.read_text())["state"] == "stopped", 15)
        )
        self.flushLoggedErrors(OSError)


class LogCapTests(AbuseTestCase):
    """A service's logs never hold more than twice ``--log-bytes`` per stream."""

    async def test_rotatedOnceAndTheTailReadsAcross(self) -> None:
        """400 lines through a 1000-byte cap: one rotation, and the tail shows all 400 lines."""
        agent = await self.agent(logBytes=1000)
        program = (
            "import sys\nfor i in range(400):\n    print(i, flush=True)\n"
            "print('x', file=sys.stderr)"
        )
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "chatty",
                "command": f"{PYTHON} -c {shlex.quote(program)}; exec sleep 60",
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        root = agent.stateDir / "pyro-services"
        current, rotated = root / "chatty.stdout", root / "chatty.stdout.1"

        def written() -> bool:
            try:
                return current.read_bytes().endswith(b"399\n")
            except FileNotFoundError:
                return False  # between the rename and the new file

        self.assertTrue(await waitUntil(written, 15))
        self.assertLessEqual(current.stat().st_size, 1000)
        self.assertLessEqual(rotated.stat().st_size, 1000)
        self.assertEqual(stat.S_IMODE(rotated.stat().st_mode), 0o600)
        self.assertEqual(
            rotated.read_bytes() + current.read_bytes(),
            "".join(f"{i}\n" for i in range(400)).encode(),
        )
        logs = await agent.call(
            {"action": "logs_service", "service_name": "chatty", "tail_lines": 400}
        )
        self.assertEqual(logs["stdout"], "".join(f"{i}\n" for i in range(400)))
        self.assertEqual((logs["stderr"], logs["truncated"]), ("x\n", False))
        few = await agent.call(
            {"action": "logs_service", "service_name": "chatty", "tail_lines": 2}
        )
        self.assertEqual((few["stdout"], few["truncated"]), ("398\n399\n", True))
        await agent.call({"action": "stop_service", "service_name": "chatty"})

    async def test_aFloodStaysWithinTwiceTheCap(self) -> None:
        """A service writing as fast as it can: each stream stays under twice the cap."""
        agent = await self.agent(logBytes=64 * 1024)
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "flood",
                "command": "head -c 20000000 /dev/zero; echo done; exec sleep 60",
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        root = agent.stateDir / "pyro-services"
        current = root / "flood.stdout"

        def finished() -> bool:
            try:
                return current.read_bytes().endswith(b"done\n")
            except FileNotFoundError:
                return False  # between the rename and the new file

        self.assertTrue(await waitUntil(finished, 60))
        total = sum(path.stat().st_size for path in root.glob("flood.stdout*"))
        self.assertLessEqual(total, 2 * 64 * 1024)
        await agent.call({"action": "stop_service", "service_name": "flood"})


class LeftoverTests(AbuseTestCase):
    """Nothing a service started outlives it (best effort without cgroups)."""

    async def test_stopOfAnExitedServiceKillsWhatItLeft(self) -> None:
        """``sleep N & echo started`` is exited at once; stop_service still kills the sleep."""
        agent = await self.agent()
        duration = uniqueSleep()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "forker",
                "command": f"sleep {duration} & echo started",
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        ended = await self.ended(agent, "forker")
        self.assertEqual((ended["state"], ended["exit_code"]), ("exited", 0))
        self.assertTrue(await waitUntil(lambda: len(findProcesses("sleep", duration)) == 1))
        stopped = await agent.call({"action": "stop_service", "service_name": "forker"})
        self.assertEqual(stopped, ended)  # the answer is the record, as before
        self.assertTrue(await waitUntil(lambda: findProcesses("sleep", duration) == [], 10))

    async def test_startingTheNameAgainCleansLeftoversFirst(self) -> None:
        """A new start of a name whose earlier run left processes kills them first."""
        agent = await self.agent()
        duration = uniqueSleep()
        await agent.call(
            {
                "action": "start_service",
                "service_name": "again",
                "command": f"sleep {duration} & echo started",
            }
        )
        await self.ended(agent, "again")
        self.assertTrue(await waitUntil(lambda: len(findProcesses("sleep", duration)) == 1))
        again = await agent.call(
            {"action": "start_service", "service_name": "again", "command": "exec sleep 60"}
        )
        self.assertEqual(again["state"], "running", again)
        self.assertEqual(findProcesses("sleep", duration), [])
        await agent.call({"action": "stop_service", "service_name": "again"})

    async def test_killAlsoEndsSetsidChildren(self) -> None:
        """A service ignoring TERM with a ``setsid`` child: after the KILL, the child is gone."""
        agent = await self.agent()
        duration = uniqueSleep()
        answer = await agent.call(
            {
                "action": "start_service",
                "service_name": "stubborn",
                "command": f"trap '' TERM; setsid sleep {duration} & sleep 60",
            }
        )
        self.assertEqual(answer["state"], "running", answer)
        self.assertTrue(await waitUntil(lambda: len(findProcesses("sleep", duration)) == 1))
        [child] = findProcesses("sleep", duration)
        self.assertNotEqual(os.getsid(child), answer["pid"])  # it left the service's session
        stopped = await agent.call({"action": "stop_service", "service_name": "stubborn"})
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigkill"))
        self.assertFalse(alive(child))


class RunnerScriptTests(SynchronousTestCase):
    """The runner script runs the command, its logs and its status, in both of its forms."""

    def runScript(self, files: ServiceFiles) -> int:
        """Run the script as the agent does: its directory on descriptor 3."""
        script = runnerScript(files, "echo out; echo err >&2; pwd >&2; exit 3", 1 << 20)
        files.runner.write_text(script)
        directory = os.open(files.root, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, directory)

        def handOver() -> None:
            os.dup2(directory, _runner.DIRECTORY_FD)

        return subprocess.run(
            ["/bin/sh", str(files.runner)],
            check=False,
            timeout=60,
            cwd="/",
            preexec_fn=handOver,
            pass_fds=(_runner.DIRECTORY_FD,),
        ).returncode

    def test_fromTheModuleFile(self) -> None:
        """Normally the runner names the module's file: a short command line in ``ps``."""
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        files = ServiceFiles(root, "svc")
        self.assertIn("_runner.py", runnerScript(files, "true", 100))
        self.assertEqual(self.runScript(files), 3)
        self.assertEqual(
            (files.stdout.read_text(), files.stderr.read_text()),
            ("out\n", f"err\n{files.root}\n"),
        )
        self.assertEqual(files.status.read_text(), "3")

    def test_fromItsTextWithoutASourceFile(self) -> None:
        """An agent installed without source files embeds the runner's text instead."""
        self.patch(_runner, "__file__", "/nowhere/_runner.pyc")
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        files = ServiceFiles(root, "svc")
        self.assertIn("def main(", runnerScript(files, "true", 100))
        self.assertEqual(self.runScript(files), 3)
        self.assertEqual(files.stdout.read_text(), "out\n")
        self.assertEqual(files.status.read_text(), "3")


class UnitWatchTests(TestCase):
    """The end of a unit is seen by pidfd events, without a timer."""

    def spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)

        def reap() -> None:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

        self.addCleanup(reap)
        return process

    async def test_pidfdEventsNoTimer(self) -> None:
        """While a live unit is watched no timer is pending; its end is reported."""
        process = self.spawn()
        found = processStat(process.pid)
        assert found is not None
        unit = SessionUnit(process.pid, found[1])
        self.assertEqual(unit.members(), [process.pid])
        emptied: Deferred[None] = Deferred()
        before = set(reactor.getDelayedCalls())
        watch = UnitWatch(reactor, unit, lambda: emptied.callback(None))
        self.addCleanup(watch.stop)
        self.assertEqual(set(reactor.getDelayedCalls()) - before, set())
        self.assertFalse(emptied.called)
        unit.kill(signal.SIGKILL)
        await emptied
        self.assertEqual(unit.members(), [])

    async def test_pollsWithoutPidfd(self) -> None:
        """Where the kernel has no pidfd_open, the unit is polled instead."""

        def noPidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open not implemented")

        self.patch(os, "pidfd_open", noPidfd)
        process = self.spawn()
        unit = SessionUnit(process.pid, None)
        emptied: Deferred[None] = Deferred()
        watch = UnitWatch(reactor, unit, lambda: emptied.callback(None))
        self.addCleanup(watch.stop)
        unit.kill(signal.SIGKILL)
        await emptied

    def test_aReusedLeaderPidIsNobodysUnit(self) -> None:
        """A live process holding the leader's pid with another start time: the unit is empty."""
        process = self.spawn()
        found = processStat(process.pid)
        assert found is not None
        self.assertEqual(SessionUnit(process.pid, found[1] - 1).members(), [])
        self.assertFalse(SessionUnit(process.pid, found[1] - 1).kill(signal.SIGKILL))
        self.assertIsNone(process.poll())


class OddInputTests(AbuseTestCase):
    """Every field is checked before anything starts; nothing crashes later."""

    async def assertRefused(self, agent: RunningAgent, raw: bytes, error: str) -> None:
        """C{raw} (a request line) is answered C{error}, and nothing of it exists."""
        answer = json.loads((await agent.exchange(raw)).partition(b"\n")[0])
        self.assertEqual(answer, {"error": error})
        self.assertEqual(list((agent.stateDir / "pyro-services").iterdir()), [])
        self.assertEqual(await agent.call({"action": "list_services"}), {"services": []})

    async def test_oddFieldsAreRefusedBeforeAnythingStarts(self) -> None:
        """Huge numbers, NaN, lone surrogates and an oversized env: clear errors, nothing left."""
        agent = await self.agent()
        start = b'{"action":"start_service","service_name":"odd","command":"sleep 60",'
        cases = [
            (
                b'"ready_timeout_seconds":1' + b"0" * 400,
                "ready_timeout_seconds is out of range (at most 9223372036854775807 in magnitude)",
            ),
            (b'"ready_timeout_seconds":86401', "ready_timeout_seconds must be at most 86400"),
            (
                b'"ready_timeout_seconds":"' + b"9" * 5000 + b'"',
                "ready_timeout_seconds must be an integer",
            ),
            (b'"ready_timeout_seconds":NaN', "ready_timeout_seconds must be an integer"),
            (b'"ready_timeout_seconds":1e400', "ready_timeout_seconds must be an integer"),
            (
                b'"ready_interval_ms":1' + b"0" * 400,
                "ready_interval_ms is out of range (at most 9223372036854775807 in magnitude)",
            ),
            (b'"ready_interval_ms":86400001', "ready_interval_ms must be at most 86400000"),
            (
                b'"ready_interval_ms":1' + b"0" * 5000,
                "request is not valid JSON: a number has more than 4300 digits",
            ),
            (b'"cwd":"/workspace/\\udcff"', "cwd must be valid Unicode text"),
            (
                b'"readiness":{"type":"command","command":"\\ud800"}',
                "readiness command must be valid Unicode text",
            ),
            (
                b'"env":{"BIG":"' + b"x" * 200_000 + b'"}',
                "service env value of BIG is too large (at most 131071 bytes)",
            ),
        ]
        for fields, error in cases:
            await self.assertRefused(agent, start + fields + b"}\n", error)
        await self.assertRefused(
            agent,
            b'{"action":"start_service","service_name":"odd","command":"echo \\ud800"}\n',
            "command must be valid Unicode text",
        )
        await self.assertRefused(
            agent,
            b'{"action":"start_service","service_name":"\\ud800","command":"true"}\n',
            "service_name must be valid Unicode text",
        )
        # The name was never taken: it starts and stops normally afterwards.
        started = await agent.call(
            {"action": "start_service", "service_name": "odd", "command": "exec sleep 60"}
        )
        self.assertEqual(started["state"], "running", started)
        stopped = await agent.call({"action": "stop_service", "service_name": "odd"})
        self.assertEqual((stopped["state"], stopped["stop_reason"]), ("stopped", "sigterm"))


__all__ = ["findProcesses", "killUnits"]

"""A cgroup per unit: nothing an exec, shell, service or command probe started outlives it.

Real processes on the real cgroup v2 tree. Each test starts a *daemon*: ``setsid`` then a
fork whose parent exits at once, so the daemon is in a session of its own and re-parented
away (what no process-group or descendant walk finds). The test's own L{UnitCgroups} records
every cgroup it makes, and the cleanup checks that none is left. Where cgroup v2 is not
writable the cgroup tests are skipped; the fallback (no cgroups) is tested everywhere.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, TestCase

from pyro_reactor.capabilities.execute import runCommand
from pyro_reactor.capabilities.services.actions import ServiceActions
from pyro_reactor.capabilities.services.registry import Services
from pyro_reactor.context import AgentConfig, AgentContext
from pyro_reactor.system import unitcgroups
from pyro_reactor.system.cgroups import Cgroup
from pyro_reactor.system.unitcgroups import UnitCgroups, setUnitCgroups
from pyro_reactor.wire.request import Request
from tests.helpers import alive, sleep, startAgent, waitUntil

reactor: Any = _reactor


def daemonCommand(pidFile: Path, seconds: int = 300) -> str:
    """A command starting a double-forked ``sleep`` in a new session; its pid in C{pidFile}."""
    return f"setsid sh -c 'sleep {seconds} & echo $! > {pidFile}' < /dev/null > /dev/null 2>&1 &"


def cgroupOf(pid: int) -> str:
    """The cgroup v2 path of C{pid} (``0::`` line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


class _Recording(UnitCgroups):
    """L{UnitCgroups} that remembers every cgroup it made (for the leak check)."""

    def __init__(self, base: UnitCgroups) -> None:
        super().__init__(base.tree, base.home)
        self.made: list[Path] = []

    def create(self, prefix: str, reuse: bool = False) -> Cgroup | None:
        cgroup = super().create(prefix, reuse)
        if cgroup is not None and cgroup.path not in self.made:
            self.made.append(cgroup.path)
        return cgroup


class UnitCgroupTestCase(TestCase):
    """Each test gets its own L{UnitCgroups}; a cleanup checks it leaked no cgroup."""

    timeout = 60

    def setUp(self) -> None:
        base = unitcgroups._detectUnitCgroups()
        if base is None:
            raise SkipTest("cgroup v2 is not mounted or not writable here (needs root)")
        self.units = _Recording(base)
        self.addCleanup(setUnitCgroups(self.units))
        self.daemons: list[Path] = []
        self.addCleanup(self.noCgroupLeft)
        self.addCleanup(self.killDaemons)

    def daemon(self, name: str) -> Path:
        pidFile = Path(self.mktemp()).absolute().with_name(f"{name}.pid")
        pidFile.parent.mkdir(parents=True, exist_ok=True)
        self.daemons.append(pidFile)
        return pidFile

    async def daemonPid(self, pidFile: Path) -> int:
        self.assertTrue(
            await waitUntil(lambda: pidFile.exists() and pidFile.read_text().strip() != "", 10)
        )
        return int(pidFile.read_text())

    def killDaemons(self) -> None:
        # Only the daemons these tests started, should a test have failed before its check.
        for pidFile in self.daemons:
            try:
                pid = int(pidFile.read_text())
            except (OSError, ValueError):
                continue
            if alive(pid) and cgroupOf(pid).rsplit("/", 1)[-1].startswith(
                ("exec-", "probe-", "shell-", "service-")
            ):
                os.kill(pid, signal.SIGKILL)

    async def noCgroupLeft(self) -> None:
        self.units.close()
        await waitUntil(lambda: not any(path.exists() for path in self.units.made), 5)
        self.units.sweep()
        left = [str(path) for path in self.units.made if path.exists()]
        self.assertEqual(left, [], "unit cgroups left behind")


class ExecCgroupTests(UnitCgroupTestCase):
    async def test_timeoutLeavesNothing(self) -> None:
        """An exec that times out takes its double-forked setsid daemon with it."""
        agent = await startAgent(self)
        pidFile = self.daemon("exec-timeout")
        answer = await agent.call(
            {"command": f"{daemonCommand(pidFile)} sleep 300", "timeout_seconds": 1}
        )
        self.assertEqual(answer["exit_code"], 124)
        pid = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(pid)))

    async def test_normalEndKeepsBackgroundChild(self) -> None:
        """An exec that ends by itself leaves its nohup child running, in the exec's cgroup;
        the cgroup is removed once that child has ended."""
        agent = await startAgent(self)
        pidFile = self.daemon("exec-nohup")
        answer = await agent.call(
            {"command": f"nohup sleep 300 > /dev/null 2>&1 & echo $! > {pidFile}"}
        )
        self.assertEqual(answer["exit_code"], 0)
        pid = await self.daemonPid(pidFile)
        await sleep(0.2)
        self.assertTrue(alive(pid))
        where = cgroupOf(pid).rsplit("/", 1)[-1]
        self.assertTrue(where.startswith("exec-"), where)
        cgroup = next(path for path in self.units.made if path.name == where)
        self.assertTrue(cgroup.exists())
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))
        # The next exec sweeps the cgroups released with processes in them.
        self.assertTrue(await waitUntil(lambda: self.units.sweep() == 0))
        self.assertFalse(cgroup.exists())

    async def test_agentStopEndsRunningExec(self) -> None:
        """Stopping the agent's exec service kills a running exec's cgroup, daemon included."""
        agent = await startAgent(self)
        pidFile = self.daemon("exec-stop")
        answered = agent.call({"command": f"{daemonCommand(pidFile)} sleep 300"})
        pid = await self.daemonPid(pidFile)
        await agent.context.services.getServiceNamed("exec-commands").stopService()
        answer = await answered
        self.assertNotEqual(answer["exit_code"], 0)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))

    async def test_probeLikeCommandLeavesNothing(self) -> None:
        """A command run without keeping background children (a readiness command) ends
        them when it ends, even a daemon in a new session."""
        pidFile = self.daemon("probe")
        result = await runCommand(
            reactor,
            f"{daemonCommand(pidFile)} for i in $(seq 100); do [ -s {pidFile} ] && break;"
            " sleep 0.05; done",
            timeoutSeconds=20,
            maxOutputBytes=1024,
            cgroups=self.units,
            keepBackground=False,
        )
        self.assertEqual(result.exitCode, 0)
        pid = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(pid)))


class ShellCgroupTests(UnitCgroupTestCase):
    async def test_closedShellLeavesNothing(self) -> None:
        """Closing a shell kills a double-forked setsid daemon started from it."""
        agent = await startAgent(self)
        pidFile = self.daemon("shell")
        opened = await agent.call({"action": "open_shell", "shell_id": "s"})
        self.assertNotIn("error", opened)
        await agent.call(
            {"action": "write_shell", "shell_id": "s", "input": daemonCommand(pidFile) + "\n"}
        )
        pid = await self.daemonPid(pidFile)
        self.assertTrue(cgroupOf(pid).rsplit("/", 1)[-1].startswith("shell-"))
        closed = await agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertNotIn("error", closed)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))


class ServiceCgroupTests(UnitCgroupTestCase):
    def context(self, base: Path | None = None) -> AgentContext:
        if base is None:
            base = Path(self.mktemp()).absolute()
            (base / "workspace").mkdir(parents=True)
            (base / "state").mkdir(parents=True)
        pool = ThreadPool(minthreads=0, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        config = AgentConfig(workspace=base / "workspace", stateDir=base / "state")
        return AgentContext(config=config, reactor=reactor, threadPool=pool)

    def registry(self, context: AgentContext) -> Services:
        registry = Services(context, stopGrace=2.0)
        registry.startService()

        def stop() -> None:
            if registry.running:
                registry.stopService()

        self.addCleanup(stop)
        return registry

    async def ask(self, registry: Services, handler: str, **fields: Any) -> dict[str, Any]:
        answer = getattr(ServiceActions(registry), handler)(Request(fields))
        if isinstance(answer, Deferred):
            answer = await answer
        assert isinstance(answer, dict)
        return answer

    async def test_stoppedServiceLeavesNothing(self) -> None:
        """Stopping a running service kills the daemon it started in a new session."""
        registry = self.registry(self.context())
        pidFile = self.daemon("service")
        started = await self.ask(
            registry,
            "start",
            service_name="web",
            command=f"{daemonCommand(pidFile)} exec sleep 300",
        )
        self.assertEqual(started["state"], "running", started)
        self.assertNotIn("cgroup_path", started)
        pid = await self.daemonPid(pidFile)
        stopped = await self.ask(registry, "stop", service_name="web")
        self.assertEqual(stopped["state"], "stopped", stopped)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))

    async def test_exitedServiceStopKillsWhatIsLeft(self) -> None:
        """A service that started a daemon and exited is ``exited``; stopping it still kills
        the daemon (through the cgroup, which the exit did not remove)."""
        registry = self.registry(self.context())
        pidFile = self.daemon("service-exited")
        started = await self.ask(
            registry,
            "start",
            service_name="bg",
            command=f"{daemonCommand(pidFile)} while [ ! -s {pidFile} ]; do sleep 0.05; done",
        )
        pid = await self.daemonPid(pidFile)
        self.assertIn(started["state"], ("running", "exited"))

        async def exited() -> bool:
            status = await self.ask(registry, "status", service_name="bg")
            return bool(status["state"] == "exited")

        for _ in range(200):
            if await exited():
                break
            await sleep(0.05)
        self.assertTrue(await exited())
        self.assertTrue(alive(pid))
        await self.ask(registry, "stop", service_name="bg")
        self.assertTrue(await waitUntil(lambda: not alive(pid)))

    async def waitExited(self, registry: Services, name: str) -> None:
        for _ in range(200):
            status = await self.ask(registry, "status", service_name=name)
            if status["state"] == "exited":
                return
            await sleep(0.05)
        self.fail(f"service {name} did not exit")

    async def test_restartCleansLeftoversFirst(self) -> None:
        """Starting a name again whose last run left a daemon running kills that daemon first
        (through the last run's cgroup), so there are never two copies."""
        registry = self.registry(self.context())
        pidFile = self.daemon("service-restart")
        await self.ask(
            registry,
            "start",
            service_name="again",
            command=f"{daemonCommand(pidFile)} while [ ! -s {pidFile} ]; do sleep 0.05; done",
        )
        pid = await self.daemonPid(pidFile)
        await self.waitExited(registry, "again")
        self.assertTrue(alive(pid))
        restarted = await self.ask(registry, "start", service_name="again", command="sleep 300")
        self.assertEqual(restarted["state"], "running", restarted)
        self.assertFalse(alive(pid))
        await self.ask(registry, "stop", service_name="again")

    async def test_commandProbeLeavesNothing(self) -> None:
        """A readiness command that starts a daemon: the daemon ends with the check."""
        registry = self.registry(self.context())
        pidFile = self.daemon("probe-service")
        started = await self.ask(
            registry,
            "start",
            service_name="probed",
            command="exec sleep 300",
            readiness={
                "type": "command",
                "command": f"{daemonCommand(pidFile)} while [ ! -s {pidFile} ]; do sleep 0.05;"
                " done",
            },
            ready_timeout_seconds=30,
        )
        self.assertEqual(started["state"], "running", started)
        pid = await self.daemonPid(pidFile)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))
        await self.ask(registry, "stop", service_name="probed")

    async def test_nextAgentFindsTheCgroupInTheRecord(self) -> None:
        """A service outlives the agent with its cgroup; the next agent takes the cgroup back
        from the record and its stop kills the daemon too."""
        context = self.context()
        first = Services(context, stopGrace=2.0)
        first.startService()
        pidFile = self.daemon("service-adopted")
        started = await self.ask(
            first,
            "start",
            service_name="kept",
            command=f"{daemonCommand(pidFile)} exec sleep 300",
        )
        self.assertEqual(started["state"], "running", started)
        pid = await self.daemonPid(pidFile)
        first.stopService()
        record = json.loads((context.config.serviceRoot / "kept.json").read_text())
        self.assertTrue(Path(record["cgroup_path"]).exists())
        second = self.registry(self.context(context.config.workspace.parent))
        stopped = await self.ask(second, "stop", service_name="kept")
        self.assertEqual(stopped["state"], "stopped", stopped)
        self.assertTrue(await waitUntil(lambda: not alive(pid)))
        self.assertTrue(await waitUntil(lambda: not Path(record["cgroup_path"]).exists()))


class WithoutCgroupsTests(TestCase):
    """Forced off (as on a guest without cgroup v2): process groups, as before."""

    def setUp(self) -> None:
        self.addCleanup(setUnitCgroups(None))

    async def test_execRunsOutsideAnyUnitCgroup(self) -> None:
        """Without cgroups an exec's child stays in the agent's cgroup, and a timeout still
        ends the command's process group."""
        agent = await startAgent(self)
        pidFile = Path(self.mktemp()).absolute()
        pidFile.parent.mkdir(parents=True, exist_ok=True)
        answer = await agent.call(
            {"command": f"sleep 300 & echo $! > {pidFile}; wait", "timeout_seconds": 1}
        )
        self.assertEqual(answer["exit_code"], 124)
        pid = int(pidFile.read_text())
        self.assertTrue(await waitUntil(lambda: not alive(pid)))
        answer = await agent.call({"command": "cat /proc/self/cgroup"})
        self.assertNotIn("pyro-units", answer["stdout"])

    async def test_shellCloseEndsItsSession(self) -> None:
        """Without cgroups a closed shell still ends a nohup job of its session."""
        agent = await startAgent(self)
        pidFile = Path(self.mktemp()).absolute()
        pidFile.parent.mkdir(parents=True, exist_ok=True)
        await agent.call({"action": "open_shell", "shell_id": "s"})
        await agent.call(
            {
                "action": "write_shell",
                "shell_id": "s",
                "input": f"nohup sleep 300 > /dev/null 2>&1 & echo $! > {pidFile}\n",
            }
        )
        self.assertTrue(await waitUntil(lambda: pidFile.exists() and pidFile.read_text() != ""))
        pid = int(pidFile.read_text())
        self.assertNotIn("pyro-units", cgroupOf(pid))
        await agent.call({"action": "close_shell", "shell_id": "s"})
        self.assertTrue(await waitUntil(lambda: not alive(pid), 10))

    async def test_serviceStopEndsItsSession(self) -> None:
        """Without cgroups a stopped service still ends a background child of its session."""
        agent = await startAgent(self)
        pidFile = agent.workspace / "child.pid"
        started = await agent.call(
            {
                "action": "start_service",
                "service_name": "plain",
                "command": f"sleep 300 & echo $! > {pidFile}; exec sleep 300",
            }
        )
        self.assertEqual(started["state"], "running", started)
        self.assertTrue(await waitUntil(lambda: pidFile.exists() and pidFile.read_text() != ""))
        pid = int(pidFile.read_text())
        self.assertNotIn("pyro-units", cgroupOf(pid))
        record = json.loads((agent.stateDir / "pyro-services" / "plain.json").read_text())
        self.assertNotIn("cgroup_path", record)
        await agent.call({"action": "stop_service", "service_name": "plain"})
        self.assertTrue(await waitUntil(lambda: not alive(pid), 10))

    def test_environmentTurnsThemOff(self) -> None:
        """``PYRO_REACTOR_UNIT_CGROUPS=0`` in the agent's environment means no cgroups."""
        self.patch(os, "environ", {**os.environ, "PYRO_REACTOR_UNIT_CGROUPS": "0"})
        self.assertIsNone(unitcgroups._detectUnitCgroups())

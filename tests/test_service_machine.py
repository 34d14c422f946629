"""The service machine, driven by a fake process, a fake probe and a L{Clock}: no processes."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.services import STOP_GRACE, Services
from pyro_reactor.capabilities.services._machine import (
    ServiceCore,
    ServiceInput,
    adoptedService,
    endedService,
    newService,
)
from pyro_reactor.capabilities.services.records import RecordWriter, ServiceFiles
from pyro_reactor.capabilities.services.units import DRAIN_LONGEST
from pyro_reactor.context import AgentConfig, AgentContext
from pyro_reactor.errors import ActionError


class FakeWatch:
    """A watch of a fake unit: reports it empty when the test ends the process."""

    def __init__(self, process: FakeProcess, onEmpty: Callable[[], None]) -> None:
        self.process = process
        self.onEmpty: Callable[[], None] | None = onEmpty

    def checkNow(self) -> None:
        if not self.process.group and self.onEmpty is not None:
            onEmpty, self.onEmpty = self.onEmpty, None
            onEmpty()

    def stop(self) -> None:
        self.onEmpty = None


class FakeProcess:
    """Records the signals a machine sends; the test decides when it exits."""

    def __init__(self, onExit: Callable[[int | None], None], pid: int = 4242) -> None:
        self.pid = pid
        self.startTicks: int | None = 777
        self.onExit = onExit
        self.signals: list[int] = []
        self.group = True
        self.released = False
        self.watches: list[FakeWatch] = []

    def signal(self, signum: int) -> bool:
        self.signals.append(signum)
        return True

    def watchUnit(self, onEmpty: Callable[[], None]) -> FakeWatch:
        watch = FakeWatch(self, onEmpty)
        self.watches.append(watch)
        watch.checkNow()
        return watch

    def unitEnds(self) -> None:
        """Nothing of the unit is left (the runner may have ended earlier)."""
        self.group = False
        for watch in self.watches:
            watch.checkNow()

    def end(self, exitCode: int | None) -> None:
        """The runner and everything in its unit end."""
        self.group = False
        self.onExit(exitCode)
        self.unitEnds()

    def release(self) -> None:
        self.released = True


class FakeProbe:
    """Stands for a probe machine: the test reports ready / timed out through it."""

    def __init__(self, onReady: Callable[[], None], onTimeout: Callable[[], None]) -> None:
        self.onReady = onReady
        self.onTimeout = onTimeout
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")

    def _tick(self) -> None: ...
    def _passed(self) -> None: ...
    def _failed(self) -> None: ...
    def _expired(self) -> None: ...


class MachineFixture(SynchronousTestCase):
    """A service machine driven by a fake runner and probe on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.saved: list[dict[str, Any]] = []
        self.processes: list[FakeProcess] = []
        self.probes: list[FakeProbe] = []

    def makeService(self, withProbe: bool = True) -> tuple[ServiceInput, ServiceCore]:
        def makeProbe(onReady: Callable[[], None], onTimeout: Callable[[], None]) -> FakeProbe:
            probe = FakeProbe(onReady, onTimeout)
            self.probes.append(probe)
            return probe

        def save(record: dict[str, Any]) -> Deferred[None]:
            self.saved.append(record)
            return succeed(None)

        core = ServiceCore(
            clock=self.clock,
            record={"service_name": "web", "command": "serve", "state": "running"},
            makeProbe=makeProbe if withProbe else None,
            save=save,
            now=self.clock.seconds,
        )
        return newService(core), core

    def launch(self, service: ServiceInput) -> FakeProcess:
        """Spawn a fake runner and hand it to the machine, as the registry does."""
        process = FakeProcess(service._exited)
        self.processes.append(process)
        service.start(process)
        return process

    @property
    def process(self) -> FakeProcess:
        return self.processes[-1]

    @property
    def probe(self) -> FakeProbe:
        return self.probes[-1]

    def started(self, withProbe: bool = True) -> tuple[ServiceInput, ServiceCore]:
        service, core = self.makeService(withProbe)
        self.launch(service)
        return service, core

    def ready(self) -> tuple[ServiceInput, ServiceCore]:
        service, core = self.started()
        self.probe.onReady()
        return service, core

    def assertNoTimers(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceMachineTests(MachineFixture):
    """The service machine's lifecycle, from start to every end."""

    # -- starting ---------------------------------------------------------------------------

    def test_startSpawnsAndRecords(self) -> None:
        """Starting records the spawned runner (pid, start time) and starts the probe."""
        service, _core = self.makeService()
        settled = service.whenSettled()
        self.launch(service)
        self.assertEqual(len(self.processes), 1)
        self.assertEqual(self.probe.events, ["start"])
        self.assertNoResult(settled)
        record = self.saved[-1]
        self.assertEqual(record["state"], "running")
        self.assertEqual(record["pid"], 4242)
        self.assertEqual(record["pid_start_ticks"], 777)
        self.assertEqual(record["started_at"], 1000)
        self.assertIsNone(record["ready_at"])

    def test_readyAnswersStart(self) -> None:
        """The probe passing settles the start with the record, ready_at set."""
        service, _core = self.started()
        settled = service.whenSettled()
        self.clock.advance(2)
        self.probe.onReady()
        answer = self.successResultOf(settled)
        self.assertEqual((answer["state"], answer["ready_at"]), ("running", 1002))
        self.assertNotIn("pid_start_ticks", answer)
        self.assertEqual(self.saved[-1]["ready_at"], 1002)
        self.assertEqual(self.process.signals, [])

    def test_withoutProbeReadyAtOnce(self) -> None:
        """Without a readiness probe a started service is ready at once."""
        service, _core = self.started(withProbe=False)
        answer = self.successResultOf(service.whenSettled())
        self.assertEqual((answer["state"], answer["ready_at"]), ("running", 1000))

    def test_exitBeforeReadyIsReportedAtOnce(self) -> None:
        """An exit before ready ends the service failed, stops the probe, keeps the code."""
        service, _core = self.started()
        settled = service.whenSettled()
        self.clock.advance(0.5)
        self.process.onExit(3)
        answer = self.successResultOf(settled)
        self.assertEqual(answer["state"], "failed")
        self.assertEqual(answer["stop_reason"], "process_exited_before_ready")
        self.assertEqual(answer["exit_code"], 3)
        self.assertEqual(answer["ended_at"], 1000.5)
        self.assertEqual(self.probe.events, ["start", "stop"])
        self.assertEqual(self.process.signals, [])
        self.assertEqual(self.saved[-1]["state"], "failed")

    def test_readinessTimeoutStopsTheService(self) -> None:
        """A readiness timeout sends SIGTERM; failed/readiness_timeout once the unit is gone."""
        service, core = self.started()
        settled = service.whenSettled()
        self.probe.onTimeout()
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.assertNoResult(settled)
        self.assertEqual(core.snapshot()["state"], "running")
        self.process.end(None)
        self.clock.advance(DRAIN_LONGEST)
        answer = self.successResultOf(settled)
        self.assertEqual(answer["state"], "failed")
        self.assertEqual(answer["stop_reason"], "readiness_timeout")
        self.assertIsNone(answer["exit_code"])
        self.assertNoTimers()

    def test_readinessTimeoutWithTermIgnored(self) -> None:
        """A readiness timeout with SIGTERM ignored sends SIGKILL after the grace."""
        service, _core = self.started()
        settled = service.whenSettled()
        self.probe.onTimeout()
        self.clock.advance(STOP_GRACE)
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertNoResult(settled)
        self.process.end(None)
        self.clock.advance(DRAIN_LONGEST)
        answer = self.successResultOf(settled)
        self.assertEqual((answer["state"], answer["stop_reason"]), ("failed", "readiness_timeout"))
        self.assertIsNone(answer["exit_code"])
        self.assertNoTimers()

    def test_stopDuringReadiness(self) -> None:
        """A stop while starting stops the probe; a late probe result is ignored."""
        service, _core = self.started()
        settled = service.whenSettled()
        service.stop()
        ended = service.whenEnded()
        self.assertEqual(self.probe.events, ["start", "stop"])
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.probe.onReady()  # a probe result racing the stop: ignored
        self.assertNoResult(settled)
        self.process.end(143)
        self.clock.advance(DRAIN_LONGEST)
        for answer in (self.successResultOf(settled), self.successResultOf(ended)):
            self.assertEqual((answer["state"], answer["stop_reason"]), ("stopped", "sigterm"))
            self.assertIsNone(answer["ready_at"])

    # -- running ----------------------------------------------------------------------------

    def test_exitAfterReady(self) -> None:
        """A ready service's exit ends it exited with its code, without a signal."""
        _service, core = self.ready()
        self.clock.advance(10)
        self.process.onExit(5)
        record = core.snapshot()
        self.assertEqual((record["state"], record["exit_code"]), ("exited", 5))
        self.assertEqual(record["ended_at"], 1010)
        self.assertIsNone(record["stop_reason"])
        self.assertEqual(self.saved[-1]["state"], "exited")
        self.assertEqual(self.process.signals, [])

    def test_stopObeyed(self) -> None:
        """A stop obeyed: the unit's end answers stopped/sigterm, no timer left."""
        service, _core = self.ready()
        service.stop()
        ended = service.whenEnded()
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.assertNoResult(ended)
        self.process.end(None)  # the runner's exit: the group is checked at once
        answer = self.successResultOf(ended)
        self.assertEqual((answer["state"], answer["stop_reason"]), ("stopped", "sigterm"))
        self.assertIsNone(answer["exit_code"])
        self.assertNoTimers()

    def test_stopWaitsForTheWholeGroup(self) -> None:
        """The runner dies of the SIGTERM; a command ignoring it keeps the stop going."""
        service, _core = self.ready()
        service.stop()
        ended = service.whenEnded()
        self.process.onExit(None)
        self.clock.advance(1)
        self.assertNoResult(ended)
        self.clock.advance(STOP_GRACE - 1)
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.process.unitEnds()
        self.clock.advance(DRAIN_LONGEST)
        answer = self.successResultOf(ended)
        self.assertEqual((answer["state"], answer["stop_reason"]), ("stopped", "sigkill"))
        self.assertNoTimers()

    def test_stopIgnoredEndsWithKill(self) -> None:
        """A stop ignored: SIGKILL exactly at the grace, then stopped/sigkill."""
        service, _core = self.ready()
        service.stop()
        ended = service.whenEnded()
        self.clock.advance(STOP_GRACE - 0.1)
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.clock.advance(0.1)
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertNoResult(ended)
        self.process.end(None)
        self.clock.advance(DRAIN_LONGEST)
        answer = self.successResultOf(ended)
        self.assertEqual((answer["state"], answer["stop_reason"]), ("stopped", "sigkill"))

    def test_serviceExitingDuringStop(self) -> None:
        """An exit while stopping is the end of the stop, whatever its code."""
        service, core = self.ready()
        service.stop()
        self.process.end(0)
        self.clock.advance(DRAIN_LONGEST)
        self.assertEqual(core.snapshot()["state"], "stopped")
        self.assertEqual(core.snapshot()["exit_code"], 0)
        self.assertNoTimers()

    def test_stopTwiceWaitsForTheSameEnd(self) -> None:
        """Repeated stops send no extra signal and all wait for the same end."""
        service, _core = self.ready()
        service.stop()
        first = service.whenEnded()
        service.stop()
        second = service.whenEnded()
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.clock.advance(STOP_GRACE)
        service.stop()
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.process.end(None)
        self.clock.advance(DRAIN_LONGEST)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))

    # -- terminal states --------------------------------------------------------------------

    def test_lateEventsInTerminalStates(self) -> None:
        """Every input in exited, stopped or failed is ignored: no signal, no save, no change."""

        def exitAlone(service: ServiceInput) -> None:
            self.process.onExit(1)

        def stop(service: ServiceInput) -> None:
            service.stop()
            self.process.end(143)
            self.clock.advance(DRAIN_LONGEST)

        def timeOut(service: ServiceInput) -> None:
            self.probe.onTimeout()
            self.process.end(143)
            self.clock.advance(DRAIN_LONGEST)

        endings = {"exited": exitAlone, "stopped": stop, "failed": timeOut}
        for state, end in endings.items():
            service, core = self.ready() if state != "failed" else self.started()
            end(service)
            record = core.snapshot()
            self.assertEqual(record["state"], state)
            signals = list(self.process.signals)
            saves = len(self.saved)
            service.start(FakeProcess(service._exited))
            service.stop()
            service._ready()
            service._unready()
            service._exited(9)
            service._graceOver()
            service._drained()
            self.clock.advance(60)
            self.assertEqual(core.snapshot(), record, state)
            self.assertEqual(self.process.signals, signals)
            self.assertEqual(len(self.saved), saves)
            self.assertEqual(len(self.processes), len(self.probes))
            self.assertEqual(self.successResultOf(service.whenEnded()), record)

    def test_stopOfAnEndedServiceAnswersItsRecord(self) -> None:
        """A stop of an ended service answers its record unchanged."""
        service, _core = self.ready()
        self.process.onExit(0)
        service.stop()
        answer = self.successResultOf(service.whenEnded())
        self.assertEqual((answer["state"], answer["stop_reason"]), ("exited", None))

    def test_stopBeforeStart(self) -> None:
        """A stop while the registry prepares ends the service; a late start is ignored."""
        service, _core = self.makeService()
        self.assertTrue(service.canStart())
        service.stop()
        self.assertTrue(service.hasEnded())
        self.assertFalse(service.canStart())
        late = FakeProcess(service._exited)
        service.start(late)
        self.assertEqual(late.signals, [])
        self.assertEqual(self.saved[-1]["state"], "stopped")
        self.assertEqual(self.successResultOf(service.whenSettled())["state"], "stopped")

    # -- the agent stopping, and the agent starting again -----------------------------------

    def test_detachLeavesTheProcessRunning(self) -> None:
        """Detaching (the agent stopping) releases the process unsignalled and fails the waiters."""
        service, core = self.started()
        settled = service.whenSettled()
        service.detach()
        self.assertEqual(self.process.signals, [])
        self.assertTrue(self.process.released)
        self.assertEqual(self.probe.events, ["start", "stop"])
        self.failureResultOf(settled, ActionError)
        self.failureResultOf(service.whenEnded(), ActionError)
        service._exited(0)
        self.assertEqual(core.snapshot()["state"], "running")

    def test_detachWhileStopping(self) -> None:
        """Detaching while stopping cancels the grace timer and the watch."""
        service, _core = self.ready()
        service.stop()
        service.detach()
        self.assertNoTimers()
        self.assertEqual(self.process.signals, [signal.SIGTERM])

    def test_adoptedRunningService(self) -> None:
        """A machine created in ``running`` from a record on disk, as a new agent does."""
        core = ServiceCore(
            clock=self.clock,
            record={"service_name": "web", "state": "running", "pid": 99, "exit_code": None},
            makeProbe=None,
            save=lambda record: succeed(None),
            now=self.clock.seconds,
        )
        process = FakeProcess(lambda code: None, pid=99)
        service = adoptedService(core, process)
        process.onExit = service._exited
        self.assertFalse(service.hasEnded())
        self.assertEqual(self.successResultOf(service.whenSettled())["state"], "running")
        service.stop()
        self.assertEqual(process.signals, [signal.SIGTERM])
        process.end(143)
        self.clock.advance(DRAIN_LONGEST)
        record = self.successResultOf(service.whenEnded())
        self.assertEqual((record["state"], record["stop_reason"]), ("stopped", "sigterm"))

    def test_adoptedEndedService(self) -> None:
        """A machine created ended answers at once and ignores starts and stops."""
        core = ServiceCore(
            clock=self.clock,
            record={"service_name": "web", "state": "exited", "exit_code": 4},
            makeProbe=None,
            save=lambda record: succeed(None),
        )
        service = endedService(core, "exited")
        self.assertTrue(service.hasEnded())
        service.start(FakeProcess(service._exited))
        service.stop()
        self.assertEqual(self.successResultOf(service.whenEnded())["exit_code"], 4)


class QuestionTests(MachineFixture):
    """Questions about the lifecycle are inputs, answered by the state the machine is in."""

    def test_hasEndedPerState(self) -> None:
        """hasEnded is false until a terminal state, and false once detached."""
        service, _core = self.makeService()
        self.assertFalse(service.hasEnded())
        self.launch(service)
        self.assertFalse(service.hasEnded())  # starting
        self.probe.onReady()
        self.assertFalse(service.hasEnded())  # running
        service.stop()
        self.assertFalse(service.hasEnded())  # stopping
        self.clock.advance(STOP_GRACE)
        self.assertFalse(service.hasEnded())  # killing
        self.process.end(None)
        self.assertTrue(service.hasEnded())
        detached, _core = self.started()
        detached.detach()
        self.assertFalse(detached.hasEnded())

    def test_canStartOnlyWhenIdle(self) -> None:
        """Only an idle machine takes a runner: not once started, stopped or detached."""
        service, _core = self.makeService()
        self.assertTrue(service.canStart())
        self.launch(service)
        self.assertFalse(service.canStart())
        idle, _core = self.makeService()
        idle.detach()
        self.assertFalse(idle.canStart())

    def test_whenSettledWaitsInSettlingStatesOnly(self) -> None:
        """Asked before the start, it waits; asked once running, it answers at once."""
        service, _core = self.makeService()
        early = service.whenSettled()
        self.launch(service)
        self.assertNoResult(early)
        self.probe.onReady()
        self.assertEqual(self.successResultOf(early)["state"], "running")
        self.assertEqual(self.successResultOf(service.whenSettled())["state"], "running")
        ended = service.whenEnded()
        self.assertNoResult(ended)
        self.process.onExit(7)
        self.assertEqual(self.successResultOf(ended)["exit_code"], 7)

    def test_answersWaitForTheRecordToBeWritten(self) -> None:
        """An answer comes once the record it shows has been written (or tried)."""
        pending: list[Deferred[None]] = []

        def save(record: dict[str, Any]) -> Deferred[None]:
            pending.append(Deferred())
            return pending[-1]

        service, core = self.makeService(withProbe=False)
        core.save = save
        self.launch(service)
        settled = service.whenSettled()
        self.assertNoResult(settled)
        for write in pending:
            write.callback(None)
        self.assertEqual(self.successResultOf(settled)["state"], "running")

    def test_detachedRefusesQuestions(self) -> None:
        """Once detached (the agent stopping), both questions fail with a clear error."""
        service, _core = self.ready()
        service.detach()
        self.assertEqual(
            str(self.failureResultOf(service.whenSettled(), ActionError).value),
            "the agent is stopping",
        )
        self.failureResultOf(service.whenEnded(), ActionError)


class RecordWriterTests(SynchronousTestCase):
    """The record is written off the reactor thread, in order, newest wins."""

    def test_newestRecordWinsAndNothingOverlaps(self) -> None:
        """Writes never overlap; only the newest waiting record is written; no temporary left."""
        root = Path(self.mktemp())
        root.mkdir()
        files = ServiceFiles(root, "web")
        calls: list[tuple[Deferred[None], Callable[[], None]]] = []

        def inThread(function: Callable[..., None], *args: Any) -> Deferred[None]:
            pending: Deferred[None] = Deferred()
            calls.append((pending, lambda: function(*args)))
            return pending

        def finishWrite() -> None:
            pending, write = calls.pop(0)
            write()
            pending.callback(None)

        writer = RecordWriter(files, inThread)
        first = writer.save({"state": "running", "n": 1})
        second = writer.save({"state": "running", "n": 2})
        third = writer.save({"state": "exited", "n": 3})
        self.assertEqual(len(calls), 1)  # one write at a time
        finishWrite()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(len(calls), 1)  # then only the newest of those waiting
        finishWrite()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(calls, [])
        text = files.record.read_text()
        self.assertEqual(json.loads(text), {"n": 3, "state": "exited"})
        self.assertEqual(text, json.dumps({"state": "exited", "n": 3}, indent=2, sort_keys=True))
        self.assertEqual(sorted(path.name for path in root.iterdir()), ["web.json"])


class _ReapedAtOnceReactor(Clock):
    """A reactor whose children exit (and are reaped) inside spawnProcess itself."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kwargs: Any) -> Any:
        self.spawned.append(args)
        transport = StringTransport()
        transport.pid = 4321  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        transport.pid = None  # type: ignore[attr-defined]  # as Twisted does once reaped
        protocol.processExited(Failure(ProcessDone(0)))
        return transport


class InstantExitTests(SynchronousTestCase):
    """A runner reaped inside the spawn itself."""

    def test_anExitDuringTheSpawnComesAfterReady(self) -> None:
        """A service without readiness that ends at once is ``exited``, not ``failed``."""
        base = Path(self.mktemp()).absolute()
        (base / "workspace").mkdir(parents=True)
        reactor = _ReapedAtOnceReactor()
        context = AgentContext(
            config=AgentConfig(workspace=base / "workspace", stateDir=base / "state"),
            reactor=reactor,
            threadPool=ThreadPool(),
        )
        registry = Services(context)
        files = ServiceFiles(context.config.serviceRoot, "quick")
        directory = registry.workspace.openWorkingDirectory("/workspace")
        self.addCleanup(directory.close)
        core = ServiceCore(
            clock=reactor,
            record={"service_name": "quick", "state": "running"},
            makeProbe=None,
            save=lambda record: succeed(None),
            now=reactor.seconds,
        )
        service = newService(core)
        service.start(registry._spawn(files, directory, {}, service))
        self.assertEqual(len(reactor.spawned), 1)
        self.assertEqual(self.successResultOf(service.whenSettled())["state"], "running")
        self.assertEqual(core.snapshot()["pid"], 4321)
        reactor.advance(0)
        record = self.successResultOf(service.whenEnded())
        self.assertEqual((record["state"], record["exit_code"]), ("exited", 0))
        # The runner's working directory is let go once it has exited.
        self.assertTrue(directory.closed)

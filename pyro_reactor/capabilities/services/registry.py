"""The registry of services by name: starts, stops, re-adopts and reports on them.

Services outlive the agent. Nothing is stopped when the agent stops; a new agent reads every
record at start-up (L{Services.startService}, synchronously, before any request is served, so
that no name can be started twice) and takes each service back: a live one is watched again,
one that ended meanwhile becomes ``exited`` with the code from ``NAME.status``.

A start is four steps (L{Services.start}): claim the name (a machine in ``idle``), sweep what
an ended service of the same name left running (SIGKILL, waiting until it is gone; a start is
refused if it is not gone after the stop grace), prepare
the files and open the working directory (in a worker thread), then spawn the runner and hand
it to the machine. A failed step gives the name back. Whether a name is free, and whether a
start was overtaken by a stop, is asked of the machine (``hasEnded``, ``canStart``).

A service's handle is in L{handles}; the probe factory and the runner spawn a start hands
the machine are in L{launch}.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.execute import commandEnvironment
from pyro_reactor.capabilities.services._machine import (
    STOP_GRACE,
    TERMINAL_STATES,
    ProbeFactory,
    ServiceCore,
    ServiceInput,
    adoptedService,
    endedService,
    newService,
)
from pyro_reactor.capabilities.services.handles import (
    SERVICE_NAME_RE,
    Record,
    ServiceHandle,
    normalizeServiceName,
    recordedCgroup,
    releasingOnExit,
)
from pyro_reactor.capabilities.services.launch import probeFactory, spawnRunner
from pyro_reactor.capabilities.services.readiness import parseReadiness
from pyro_reactor.capabilities.services.records import (
    RecordWriter,
    ServiceFiles,
    makePrivateRoot,
    prepareFiles,
    readExitStatus,
    runnerScript,
    tailText,
)
from pyro_reactor.capabilities.services.runners import AdoptedProcess, ServiceProcess
from pyro_reactor.capabilities.services.units import sameProcessAlive, sweep
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.unitcgroups import CgroupUnit
from pyro_reactor.system.workspace import WorkingDirectory

if TYPE_CHECKING:  # the actions module imports this one
    from pyro_reactor.capabilities.services.actions import StartSpec

log = Logger(namespace="pyro_reactor.capabilities.services")


def _startError(name: str, error: OSError) -> ActionError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ActionError(f"cannot start service {name!r}: the state directory is full")
    return ActionError(f"cannot start service {name!r}: {error.strerror or error}")


class Services(Service):
    """Every service of this agent by name.

    Started with the agent (a child of ``context.services``), it re-adopts the services an
    earlier agent left in the service root. Stopped with the agent, it lets them go: the
    processes keep running for the next agent.
    """

    def __init__(self, context: AgentContext, *, stopGrace: float = STOP_GRACE) -> None:
        self.context = context
        self.reactor = context.reactor
        self.root = context.config.serviceRoot
        self.workspace = context.workspace
        self.stopGrace = stopGrace
        self.logBytes = context.config.logBytes
        self.handles: dict[str, ServiceHandle] = {}
        self.writers: dict[str, RecordWriter] = {}
        self.invalid: set[str] = set()

    # -- agent lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Synchronous on purpose: before the reactor serves a request, every recorded service
        # is known, so none can be started twice. A few small files on a tmpfs.
        makePrivateRoot(self.root)
        # Leftovers first: taking a record back may write it anew, through a temporary file.
        for temporary in self.root.glob(".*.tmp"):
            temporary.unlink(missing_ok=True)
        for path in sorted(self.root.glob("*.json")):
            name = path.name[: -len(".json")]
            if SERVICE_NAME_RE.fullmatch(name) is None:
                continue
            try:
                self._adopt(ServiceFiles(self.root, name))
            except Exception as error:
                self.invalid.add(name)
                log.warn(
                    "cannot take service {service} back: {error}", service=name, error=str(error)
                )

    def stopService(self) -> None:
        super().stopService()
        for handle in list(self.handles.values()):
            handle.machine.detach()
        for writer in self.writers.values():
            writer.stop()

    def _adopt(self, files: ServiceFiles) -> None:
        record = json.loads(files.record.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("the record is not a JSON object")
        state = record.get("state")
        core = self._core(files, record, None)
        pid = record.get("pid")
        ticks = record.get("pid_start_ticks")
        startTicks = ticks if isinstance(ticks, int) else None
        if state == "running":
            if isinstance(pid, int) and pid > 1 and sameProcessAlive(pid, startTicks):
                process = AdoptedProcess(
                    self.reactor,
                    pid,
                    startTicks,
                    lambda: self.context.inThread(readExitStatus, files),
                    recordedCgroup(record),
                )
                machine = adoptedService(core, process)
                self.handles[files.name] = ServiceHandle(machine, core, files)
                process.watch(releasingOnExit(process.unit, machine._exited))
                log.info("service {service} (pid {pid}) taken back", service=files.name, pid=pid)
                return
            machine = endedService(core, "exited")
            core.publish(
                state="exited",
                exit_code=readExitStatus(files),
                ended_at=record.get("ended_at") or core.now(),
            )
            self.handles[files.name] = ServiceHandle(machine, core, files)
            log.info("service {service} ended while no agent watched it", service=files.name)
            return
        if state not in TERMINAL_STATES:
            raise ValueError(f"unknown state {state!r}")
        self.handles[files.name] = ServiceHandle(endedService(core, state), core, files)

    def _core(
        self, files: ServiceFiles, record: Record, makeProbe: ProbeFactory | None
    ) -> ServiceCore:
        # One writer per name, shared by the records that follow each other under it: a
        # late write of an ended service never lands after its successor's.
        writer = self.writers.get(files.name)
        if writer is None:
            writer = self.writers[files.name] = RecordWriter(
                files, self.context.inThread, self.reactor
            )
        return ServiceCore(
            clock=self.reactor,
            record=record,
            makeProbe=makeProbe,
            save=writer.save,
            stopGrace=self.stopGrace,
        )

    # -- lookups -----------------------------------------------------------------------------

    def lookup(self, text: str) -> ServiceHandle:
        name = normalizeServiceName(text)
        handle = self.handles.get(name)
        if handle is None:
            if name in self.invalid:
                raise ActionError(f"service record for {name!r} is invalid")
            raise ActionError(f"service {name!r} does not exist")
        return handle

    def checkNameFree(self, name: str) -> None:
        previous = self.handles.get(name)
        if previous is not None and not previous.machine.hasEnded():
            raise ActionError(f"service {name!r} is already running")

    def snapshots(self) -> list[Record]:
        return [self.handles[name].core.snapshot() for name in sorted(self.handles)]

    def runningCount(self) -> int:
        """How many services have not ended (for ``stats``)."""
        return sum(1 for handle in self.handles.values() if not handle.machine.hasEnded())

    def recheckReady(self) -> Deferred[int]:
        """Run one readiness check of each running service that was ready; fires with how many.

        After a snapshot restore a service's sockets may be gone: the outcome of each check is
        logged (a failed one as a warning, naming the service), and the service's record is
        left as it is — the host decides what to do with a service that no longer answers.
        """
        checks: list[Deferred[None]] = []
        for name in sorted(self.handles):
            handle = self.handles[name]
            record = handle.core.record
            readiness = record.get("readiness")
            if handle.machine.hasEnded() or record.get("ready_at") is None or not readiness:
                continue
            try:
                spec = parseReadiness(readiness, self.workspace)
            except ActionError:
                continue
            check = spec.check(
                self.reactor,
                workspace=self.workspace,
                inThread=self.context.inThread,
                cwd=str(record.get("cwd") or "/workspace"),
                env=commandEnvironment(None),
            )

            def report(ready: bool, name: str = name) -> None:
                if ready:
                    log.info("service {service} ready after the restore", service=name)
                else:
                    log.warn("service {service} NOT ready after the restore", service=name)

            checks.append(check().addCallbacks(report, lambda _f: None))
        done: Deferred[Any] = DeferredList(checks, consumeErrors=True)
        return done.addCallback(lambda _: len(checks))

    # -- start -------------------------------------------------------------------------------

    def start(self, spec: StartSpec) -> Deferred[Record]:
        """Start a checked request's service; fires with its record once it has settled."""
        self.checkNameFree(spec.name)
        previous = self.handles.get(spec.name)
        handle = self._claim(spec)
        swept: Deferred[bool] = succeed(True)
        leftovers = None if previous is None else previous.leftovers()
        if leftovers is not None:
            swept = sweep(self.reactor, leftovers, self.stopGrace)

        def prepare(gone: bool) -> Deferred[WorkingDirectory]:
            if not gone:
                raise ActionError(
                    f"cannot start service {spec.name!r}: processes of its last run do not end"
                )
            return self.context.inThread(self._prepare, handle.files, spec)

        def giveBack(failure: Failure) -> Failure:
            self._giveBack(handle, previous)
            if failure.check(OSError):
                error = failure.value
                assert isinstance(error, OSError)
                raise _startError(spec.name, error)
            return failure

        prepared = swept.addCallback(prepare).addErrback(giveBack)
        return prepared.addCallback(self._launch, handle, spec, previous)

    def _claim(self, spec: StartSpec) -> ServiceHandle:
        """A machine in ``idle`` takes the name: a second start is refused from here on."""
        files = ServiceFiles(self.root, spec.name)
        record: Record = {
            "service_name": spec.name,
            "command": spec.command,
            "cwd": spec.cwd,
            "state": "running",
            "started_at": None,
            "readiness": spec.readiness,
            "ready_at": None,
            "ended_at": None,
            "exit_code": None,
            "pid": None,
            "stop_reason": None,
        }
        core = self._core(files, record, probeFactory(self.context, spec))
        handle = ServiceHandle(newService(core), core, files)
        self.handles[spec.name] = handle
        return handle

    def _prepare(self, files: ServiceFiles, spec: StartSpec) -> WorkingDirectory:
        """Open the working directory and write the service's files (in a worker thread)."""
        directory = self.workspace.openWorkingDirectory(spec.cwd)
        try:
            prepareFiles(files, runnerScript(files, spec.command, self.logBytes))
        except BaseException:
            directory.close()
            raise
        return directory

    def _launch(
        self,
        directory: WorkingDirectory,
        handle: ServiceHandle,
        spec: StartSpec,
        previous: ServiceHandle | None,
    ) -> Deferred[Record]:
        """Spawn the runner in the prepared directory, unless a stop came first."""
        if not handle.machine.canStart():
            directory.close()  # stopped (or the agent stopped) while preparing
            return handle.machine.whenSettled()
        try:
            process = self._spawn(handle.files, directory, spec.env, handle.machine)
        except OSError as error:
            self._giveBack(handle, previous)
            raise _startError(spec.name, error) from None
        unit = getattr(process, "unit", None)
        if isinstance(unit, CgroupUnit):
            # Saved with the record the start publishes: a later agent finds it there.
            handle.core.record["cgroup_path"] = str(unit.cgroup.path)
        handle.machine.start(process)
        return handle.machine.whenSettled()

    def _giveBack(self, handle: ServiceHandle, previous: ServiceHandle | None) -> None:
        name = handle.files.name
        if self.handles.get(name) is handle:
            if previous is None:
                del self.handles[name]
            else:
                self.handles[name] = previous

    def _spawn(
        self,
        files: ServiceFiles,
        directory: WorkingDirectory,
        env: Mapping[str, str],
        machine: ServiceInput,
    ) -> ServiceProcess:
        """Start the runner in C{directory} (L{spawnRunner}); C{directory} is let go."""
        return spawnRunner(self.reactor, files, directory, env, machine)

    # -- stop and logs -----------------------------------------------------------------------

    def stop(self, handle: ServiceHandle) -> Deferred[Record]:
        """Stop a service; for an ended one, kill what it left running."""
        if handle.machine.hasEnded():
            leftovers = handle.leftovers()
            if leftovers is not None:
                return sweep(self.reactor, leftovers, self.stopGrace).addCallback(
                    lambda _: handle.machine.whenEnded()
                )
        handle.machine.stop()
        return handle.machine.whenEnded()

    def logs(self, handle: ServiceHandle, tailLines: int | None) -> Deferred[Record]:
        answer = handle.core.snapshot()
        limit = self.context.config.maxOutputBytes

        def read() -> Record:
            stdout, stdoutCut = tailText(handle.files.stdout, tailLines, limit)
            stderr, stderrCut = tailText(handle.files.stderr, tailLines, limit)
            return {
                "stdout": stdout,
                "stderr": stderr,
                "tail_lines": tailLines,
                "truncated": stdoutCut or stderrCut,
            }

        def combine(tails: Record) -> Record:
            answer.update(tails)
            return answer

        tails: Deferred[Record] = self.context.inThread(read)
        return tails.addCallback(combine)


__all__ = ["SERVICE_NAME_RE", "ServiceHandle", "Services", "normalizeServiceName"]
